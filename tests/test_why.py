"""Why a request was slow (issue #18), end to end, with real faults.

The test's servers and clients run in private network namespaces of their
own; one tracer for the module runs on the host (its tracepoints see every
namespace). Faults come from the test server (`delay-<ms>`, the
x-test-delay-ms header, `dribble-<ms>`) and from Linux traffic control on a
namespace's `lo`:
  - loss: a BPF classifier (BCC, pinned in a private bpffs, attached with
    `tc filter ... bpf da pinned`) drops a seeded share of the new TCP data
    segments going to one server port. It sits on lo's *ingress*: a drop on
    egress is reported back to the sending socket at once (the write queue
    keeps the segment and sends it again, no retransmission happens), one
    on ingress is lost on the wire as far as TCP knows;
  - a slow link: a tbf qdisc (lo's MTU lowered to 1500 there, or tbf drops
    the 64 KiB loopback segments forever).
Clients measure themselves (monotonic clock, the kernel's TCP_INFO
retransmission count) and the tracer's fields are checked against that.

Every traced client runs under the process name s3why-client (symlinks to
the distribution's python3 and curl) and the tracer is started with --comm:
whatever else runs on the host (other tests, other tracers) stays out of
the records, tables and metrics checked here.

S3SLOWER_WHY_SEED=N reruns with the same generated values (the seed is
printed with every failure).
"""

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.request

import pytest

import s3slower
from matrixlib import RT
from conftest import (PYTHON, TESTS, Tracer, free_port, require_bpf,
                      require_tool, stop_process, wait_until)

SEED = int(os.environ.get("S3SLOWER_WHY_SEED") or random.randrange(1 << 30))
COMM = "s3why-client"
TAG = "s3why-%d" % os.getpid()

RETRANSMIT_FORMAT = "/sys/kernel/tracing/events/tcp/tcp_retransmit_skb/format"


def retransmit_has_err():
    """Kernels from 6.13 on fire tcp_retransmit_skb for failed attempts
    too, with an err field; before, only for segments that went out."""
    for path in (RETRANSMIT_FORMAT, RETRANSMIT_FORMAT.replace(
            "/sys/kernel/tracing", "/sys/kernel/debug/tracing")):
        try:
            with open(path) as f:
                return " err;" in f.read()
        except OSError:
            continue
    return False


RETRANSMIT_ERR = retransmit_has_err()


def rng_for(name):
    return random.Random("%d/%s" % (SEED, name))


@pytest.fixture(autouse=True)
def print_seed():
    print("why seed: %d (rerun: S3SLOWER_WHY_SEED=%d)" % (SEED, SEED))


def why(r):
    """The tracer's verdict from its own fields (s3slower's slow_part)."""
    if r["retrans"]:
        return "net"
    parts = [(r[k], n) for k, n in (("connect_ms", "conn"),
                                    ("tls_handshake_ms", "tls"),
                                    ("server_ms", "server"),
                                    ("transfer_ms", "xfer"))
             if r[k] is not None]
    return max(parts)[1] if parts else None


def ms(ns):
    return ns / 1e6


def show(r, m=None, **extra):
    """A record (and the client's measurement of it) for a failure."""
    keys = ("method", "path", "status", "ttfb_ms", "latency_ms", "server_ms",
            "transfer_ms", "connect_ms", "tls_handshake_ms", "new_conn",
            "retrans", "why", "tid")
    text = "seed %d: %s" % (SEED, {k: r.get(k) for k in keys})
    if m is not None:
        text += "\n  client: %s" % m
    if extra:
        text += "\n  %s" % extra
    return text


def assert_close(reported_ms, measured_ms, what):
    """Within 1 ms + 2 % of the client's own clock, and not above it."""
    assert reported_ms <= measured_ms + 0.05, (what, reported_ms, measured_ms)
    assert reported_ms >= measured_ms - (1 + 0.02 * measured_ms), \
        (what, reported_ms, measured_ms)


# --- the clients -------------------------------------------------------------

# Runs a plan on keep-alive connections, a new one where a step says so;
# prints what it measured itself, per request (monotonic ns): connect
# (connect_start..connected), TLS handshake (..handshaken), start, first
# (head parsed), end (body read), and the kernel's count of segments the
# connection retransmitted during the request (TCP_INFO total_retrans).
CLIENT = r"""
import http.client, json, socket, ssl, struct, sys, time
port, tls = int(sys.argv[1]), sys.argv[2] == "https"
plan = json.loads(sys.argv[3])
ctx = ssl._create_unverified_context()
now = time.monotonic_ns
def total_retrans(sock):
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, 100)[0]
conn, out = None, []
for step in plan:
    m = {"method": step["method"], "path": step["path"], "new": False}
    if conn is None or step.get("new"):
        if conn is not None:
            conn.close()
        t0 = now()
        sock = socket.create_connection(("127.0.0.1", port))
        t1 = now()
        if tls:
            sock = ctx.wrap_socket(sock)
        t2 = now()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.sock = sock
        m.update(new=True, connect_start=t0, connected=t1, handshaken=t2)
    body = b"b" * step["body"] if step.get("body") else None
    before = total_retrans(conn.sock)
    m["start"] = now()
    conn.request(step["method"], step["path"], body=body,
                 headers=step.get("headers", {}))
    resp = conn.getresponse()
    m["first"] = now()
    data = resp.read()
    m["end"] = now()
    m.update(status=resp.status, size=len(data),
             retrans=total_retrans(conn.sock) - before,
             port=conn.sock.getsockname()[1])
    out.append(m)
print(json.dumps(out))
"""

# One thread connects, another writes: "connect" (the main thread connects,
# a second thread writes `count` requests on the connection) and then
# "stale" (the second thread connects a new socket, the main thread writes
# its first request on it after `pause` s: its own connect is an old one).
HANDOFF_CLIENT = r"""
import http.client, json, socket, ssl, sys, threading, time
port, count, pause = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
ctx = ssl._create_unverified_context()
now = time.monotonic_ns
out = {"main_tid": threading.get_native_id()}
def requests(sock, path, n):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.sock = ctx.wrap_socket(sock)
    for _ in range(n):
        conn.request("GET", path)
        conn.getresponse().read()
    return conn
first = socket.create_connection(("127.0.0.1", port))
def other():
    out["other_tid"] = threading.get_native_id()
    out["keep"] = requests(first, "/why/handoff/connect", count)
    out["sock"] = socket.create_connection(("127.0.0.1", port))
t = threading.Thread(target=other)
t.start()
t.join()
time.sleep(pause)
t0 = now()
requests(out.pop("sock"), "/why/handoff/stale", 1)
out["stale_ns"] = now() - t0
out.pop("keep")
print(json.dumps(out))
"""


# --- namespaces, servers, traffic control ------------------------------------

def run(args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True,
                          timeout=60, **kw)


def remove_leftovers():
    """Namespaces, bpffs mounts and directories of runs that were killed."""
    names = run(["ip", "netns", "list"], check=False).stdout.split()
    for name in names:
        m = re.match(r"^s3why-(\d+)-", name)
        if m and not os.path.exists("/proc/" + m.group(1)):
            run(["ip", "netns", "del", name], check=False)
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            m = re.search(r"/s3why-(\d+)-bpffs", fields[1])
            if fields[2] == "bpf" and m and \
                    not os.path.exists("/proc/" + m.group(1)):
                run(["umount", fields[1]], check=False)
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        m = re.match(r"^s3why-(\d+)-", name)
        path = os.path.join(tmp, name)
        if m and not os.path.exists("/proc/" + m.group(1)) and \
                not os.path.ismount(path):
            shutil.rmtree(path, ignore_errors=True)


class Netns:
    def __init__(self, name, stack, mtu=None):
        self.name = name
        run(["ip", "netns", "add", name])
        stack.callback(run, ["ip", "netns", "del", name], check=False)
        self.enter = ["nsenter", "--net=/run/netns/" + name]
        run(self.enter + ["ip", "link", "set", "lo", "up"])
        if mtu:
            run(self.enter + ["ip", "link", "set", "lo", "mtu", str(mtu)])

    def tc(self, *args, check=True):
        return run(self.enter + ["tc"] + list(args), check=check)

    @contextlib.contextmanager
    def qdisc(self, *spec):
        """A root qdisc on lo for the with block."""
        self.tc("qdisc", "replace", "dev", "lo", "root", *spec)
        try:
            yield
        finally:
            self.tc("qdisc", "del", "dev", "lo", "root", check=False)


class NsServer:
    """tests/s3server.py inside a namespace (started: wait with ready())."""

    def __init__(self, ns, stack, cert, plain=False):
        self.ns, self.plain = ns, plain
        cmd = ns.enter + [PYTHON, os.path.join(TESTS, "s3server.py"),
                          "--port", "0", "--cert", cert[0], "--key", cert[1]]
        if plain:
            cmd.append("--plain")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        stack.callback(stop_process, self.proc)

    def ready(self):
        line = self.proc.stdout.readline()
        assert line.startswith("READY"), "server did not start: %r" % line
        self.port = int(line.split()[1])
        self.host = "127.0.0.1:%d" % self.port
        self.url = "%s://%s" % ("http" if self.plain else "https", self.host)
        self.scheme = "http" if self.plain else "https"
        return self


# The loss: new TCP data segments to the lossy server's port, at least
# MIN_PAYLOAD bytes (request heads pass), are numbered per connection; those
# numbered phase, phase + every, ... are dropped, once each: a segment that
# is not new (a retransmission) always passes. Counted per connection (by
# client port). A tracepoint program beside it counts the kernel's
# retransmission attempts per client port and outcome (err), when the
# kernel says (6.13+).
CLASSIFIER = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>

struct config { u32 port; u32 every; u32 phase; u32 min_payload; };
struct flow { u32 next_seq; u32 segments; u32 dropped; u32 pad; };
struct attempt { u16 sport; u16 pad; s32 err; };
BPF_ARRAY(config, struct config, 1);
BPF_HASH(flows, u32, struct flow, 4096);
BPF_HASH(attempts, struct attempt, u64, 4096);

int drop(struct __sk_buff *skb)
{
    int zero = 0;
    struct config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->port)
        return TC_ACT_OK;
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP))
        return TC_ACT_OK;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->protocol != 6 || ip->ihl != 5)
        return TC_ACT_OK;
    struct tcphdr *tcp = (void *)(ip + 1);
    if ((void *)(tcp + 1) > end || tcp->dest != htons(cfg->port))
        return TC_ACT_OK;
    u32 key = ntohs(tcp->source);
    if (tcp->syn) {                       /* a new connection on that port */
        flows.delete(&key);
        return TC_ACT_OK;
    }
    u32 payload = skb->len - sizeof(*eth) - sizeof(*ip) - tcp->doff * 4;
    if (payload < cfg->min_payload)
        return TC_ACT_OK;
    u32 seq = ntohl(tcp->seq);
    struct flow fresh = {.next_seq = seq};
    struct flow *f = flows.lookup_or_try_init(&key, &fresh);
    if (!f || (s32)(seq - f->next_seq) < 0)
        return TC_ACT_OK;                 /* sent before: never dropped */
    f->next_seq = seq + payload;
    u32 n = f->segments++;
    if (n % cfg->every != cfg->phase)
        return TC_ACT_OK;
    f->dropped++;
    return TC_ACT_SHOT;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    struct attempt a = {.sport = args->sport};
#ifdef HAVE_ERR
    a.err = args->err;
#endif
    attempts.increment(a);
    return 0;
}
"""


class Loss:
    """The classifier: compiled, pinned in a private bpffs, attached to the
    ingress of a namespace's lo (armed for a port later)."""

    def __init__(self, stack):
        from bcc import BPF, libbcc
        cflags = ["-DHAVE_ERR"] if RETRANSMIT_ERR else []
        self.bpf = BPF(text=CLASSIFIER.encode(), cflags=cflags)
        stack.callback(self.bpf.cleanup)
        fn = self.bpf.load_func(b"drop", BPF.SCHED_CLS)
        self.fs = tempfile.mkdtemp(prefix=TAG + "-bpffs")
        stack.callback(os.rmdir, self.fs)
        run(["mount", "-t", "bpf", "bpf", self.fs])
        stack.callback(run, ["umount", self.fs], check=False)
        self.pin = os.path.join(self.fs, "drop")
        assert libbcc.lib.bpf_obj_pin(fn.fd, self.pin.encode()) == 0, \
            "cannot pin the classifier in %s" % self.fs
        stack.callback(os.unlink, self.pin)

    def attach(self, ns):
        ns.tc("qdisc", "add", "dev", "lo", "clsact")
        ns.tc("filter", "add", "dev", "lo", "ingress", "bpf", "da", "pinned",
              self.pin)

    def arm(self, port, every, phase, min_payload=1000):
        cfg = self.bpf[b"config"]
        value = cfg.Leaf(port, every, phase, min_payload)
        cfg[cfg.Key(0)] = value

    def flow(self, client_port):
        flows = self.bpf[b"flows"]
        for k, v in flows.items():
            if k.value == client_port:
                return v.segments, v.dropped
        return 0, 0

    def attempts(self, client_port):
        """{err: count} of the retransmission attempts of a client socket
        (err 0 only, before 6.13)."""
        return {k.err: v.value for k, v in self.bpf[b"attempts"].items()
                if k.sport == client_port}


def make_cert(directory):
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
         "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1"])
    return cert, key


SETUP = r"""
import http.client, json, ssl, sys
for port, tls, puts in json.loads(sys.argv[1]):
    ctx = ssl._create_unverified_context()
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx) if tls \
        else http.client.HTTPConnection("127.0.0.1", port)
    for path, size in puts:
        conn.request("PUT", path, body=b"o" * size)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, (path, resp.status)
"""

# Generated once per module from the seed.
PARAMS = {}


def params():
    if not PARAMS:
        rng = rng_for("params")
        PARAMS.update(
            delays=[rng.randint(50, 300) for _ in range(4)],
            dribble=rng.randint(150, 450),
            rate_kbit=rng.randrange(2000, 8001, 250),
            slow_seconds=rng.uniform(0.35, 0.8),
            loss_size=rng.choice([512, 640, 768, 1024]) * 1024,
            loss_every=rng.randint(3, 8),
            new_https=rng.randint(3, 5), keep_https=rng.randint(3, 6),
            new_plain=rng.randint(2, 4), curls=rng.randint(2, 3))
        PARAMS["loss_phase"] = rng.randrange(PARAMS["loss_every"])
        PARAMS["slow_size"] = int(PARAMS["rate_kbit"] * 1000 / 8 *
                                  PARAMS["slow_seconds"]) // 1024 * 1024
    return PARAMS


class Env:
    pass


@pytest.fixture(scope="module")
def env():
    """The namespaces, servers, classifier and the module's one tracer."""
    require_bpf()
    for tool in ("ip", "tc", "nsenter", "curl", "openssl"):
        require_tool(tool)
    p = params()
    e = Env()
    e.metrics_port = free_port()
    started = {}

    def start_tracer():
        try:
            started["tracer"] = Tracer(
                "--comm", COMM, "--plain", "--interval", "1",
                "--prometheus-port", str(e.metrics_port), python=PYTHON)
        except BaseException as error:  # reported by the main thread
            started["error"] = error

    with contextlib.ExitStack() as stack:
        # The tracer starts (5-10 s) while everything else is set up.
        starter = threading.Thread(target=start_tracer)
        starter.start()
        stack.callback(lambda: started.get("tracer") and
                       started["tracer"].stop())
        stack.callback(starter.join)
        remove_leftovers()
        e.tmp = tempfile.mkdtemp(prefix=TAG + "-")
        stack.callback(shutil.rmtree, e.tmp, ignore_errors=True)
        for name, target in (("py", PYTHON), ("curl", shutil.which("curl"))):
            os.mkdir(os.path.join(e.tmp, name))
            os.symlink(target, os.path.join(e.tmp, name, COMM))
        e.python = os.path.join(e.tmp, "py", COMM)
        e.curl = os.path.join(e.tmp, "curl", COMM)
        cert = make_cert(e.tmp)
        e.ns = Netns(TAG + "-a", stack)
        # tbf needs a burst above the MTU: 1500, not loopback's 64 KiB
        e.slow_ns = Netns(TAG + "-b", stack, mtu=1500)
        e.main = NsServer(e.ns, stack, cert)
        e.conn = NsServer(e.ns, stack, cert)
        e.plain = NsServer(e.ns, stack, cert, plain=True)
        e.lossy = NsServer(e.ns, stack, cert)
        e.slow = NsServer(e.slow_ns, stack, cert)
        e.slow_plain = NsServer(e.slow_ns, stack, cert, plain=True)
        e.loss = Loss(stack)
        for server in (e.main, e.conn, e.plain, e.lossy, e.slow,
                       e.slow_plain):
            server.ready()
        e.loss.attach(e.ns)
        e.loss.arm(e.lossy.port, p["loss_every"], p["loss_phase"])
        # Objects, put by an untraced client (python3, not s3why-client).
        main = [("/why", 0), ("/why/obj", 1000),
                ("/why/delay-%d/obj" % p["delays"][1], 1000),
                ("/why/dribble-%d/obj" % p["dribble"], 200000)]
        other = [(e.conn.port, True, [("/conn", 0), ("/conn/obj", 2000)]),
                 (e.plain.port, False, [("/plain", 0), ("/plain/obj", 2000)]),
                 (e.lossy.port, True, [("/loss", 0), ("/loss/obj", 1000)])]
        setups = [subprocess.Popen(
            e.ns.enter + [PYTHON, "-c", SETUP,
                          json.dumps([(e.main.port, True, main)] + other)],
            stderr=subprocess.PIPE, text=True), subprocess.Popen(
            e.slow_ns.enter + [PYTHON, "-c", SETUP, json.dumps(
                [(e.slow.port, True, [("/slow", 0),
                                      ("/slow/obj", p["slow_size"])]),
                 (e.slow_plain.port, False, [("/slow", 0)])])],
            stderr=subprocess.PIPE, text=True)]
        for setup in setups:
            _, err = setup.communicate(timeout=60)
            assert setup.returncode == 0, "setup failed: %s" % err
        starter.join()
        if "error" in started:
            raise started["error"]
        e.tracer = started["tracer"]
        yield e


def client(e, server, plan, ns=None, timeout=120):
    """CLIENT in the server's namespace: (pid, measurements). At
    SCHED_FIFO, as the matrix's timing clients: nothing preempts it between
    a clock reading and the call it times. (curl stays at normal priority:
    at SCHED_FIFO it reuses a connection the server is closing, and
    retries.)"""
    pid, out = run_in(ns or server.ns, RT + [e.python, "-c", CLIENT,
                                             str(server.port), server.scheme,
                                             json.dumps(plan)], timeout)
    return pid, json.loads(out)


def run_in(ns, args, timeout=120):
    proc = subprocess.Popen(ns.enter + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("client timed out: %s\n%s" % (args[:3], err))
    assert proc.returncode == 0, "client failed: %s\n%s" % (args[:3], err)
    return proc.pid, out


def records(e, pid, count, timeout=20):
    found = e.tracer.wait_records(count, timeout=timeout, pid=pid)
    assert len(found) == count, "seed %d: %d records for pid %d, not %d:\n%s" \
        % (SEED, len(found), pid, count, "\n".join(show(r) for r in found))
    return found


# --- 1. the server's share ---------------------------------------------------

def test_server_delay_is_the_servers_share(env):
    d = params()["delays"]
    plan = [{"method": "GET", "path": "/why/obj",
             "headers": {"x-test-delay-ms": str(d[0])}},
            {"method": "GET", "path": "/why/delay-%d/obj" % d[1]},
            {"method": "HEAD", "path": "/why/obj",
             "headers": {"x-test-delay-ms": str(d[2])}},
            {"method": "PUT", "path": "/why/put", "body": 3000,
             "headers": {"x-test-delay-ms": str(d[3])}},
            {"method": "GET", "path": "/why/obj"}]
    pid, measured = client(env, env.main, plan)
    found = records(env, pid, len(plan))
    for r, m, delay in zip(found, measured, d + [0]):
        assert (r["method"], r["path"], r["status"]) == \
            (m["method"], m["path"], m["status"]), show(r, m)
        assert r["complete"], show(r, m)
        # The server slept `delay` between reading the request and
        # answering: its share holds it, and no more than the client saw.
        assert r["server_ms"] >= delay, show(r, m)
        assert_close(r["server_ms"], ms(m["first"] - m["start"]),
                     show(r, m))
        assert_close(r["latency_ms"], ms(m["end"] - m["start"]), show(r, m))
        assert abs(r["latency_ms"] - r["server_ms"] - r["transfer_ms"]) \
            < 0.01, show(r, m)
        assert r["retrans"] == m["retrans"] == 0, show(r, m)
        assert r["why"] == why(r), show(r, m)
        if delay:
            assert r["why"] == "server", show(r, m)
            assert r["transfer_ms"] < 20, show(r, m)


# --- 2. lost segments --------------------------------------------------------

@pytest.fixture(scope="module")
def loss_run(env):
    p = params()
    big = {"method": "PUT", "body": p["loss_size"]}
    small = {"method": "GET", "path": "/loss/obj"}
    plan = [dict(small), dict(big, path="/loss/big1"), dict(small),
            dict(big, path="/loss/big2"), dict(small)]
    pid, measured = client(env, env.lossy, plan)
    return pid, measured, records(env, pid, len(plan))


def test_lost_segments_are_net(env, loss_run):
    """Uploads lose segments: the client's socket sends them again. (Lost
    download segments are the server's to send again: a socket the tracer
    does not follow, and on a real network not on this host at all.)"""
    _pid, measured, found = loss_run
    p = params()
    context = "every %d (phase %d) of the new data segments >= 1000 bytes " \
        "dropped; PUT %d bytes" % (p["loss_every"], p["loss_phase"],
                                   p["loss_size"])
    segments, dropped = env.loss.flow(measured[0]["port"])
    context += "; on the connection: %d such segments, %d dropped" % (
        segments, dropped)
    for r, m in zip(found, measured):
        assert (r["method"], r["path"], r["status"]) == \
            (m["method"], m["path"], m["status"]), show(r, m)
        assert r["complete"], show(r, m)
        if m["method"] == "PUT":
            # The harness: a 512+ KiB body is 8+ segments on loopback (64 KiB
            # at most each): some of them were dropped and sent again.
            assert m["retrans"] > 0, "harness: no retransmission (%s)\n%s" \
                % (context, show(r, m))
            assert r["retrans"] == m["retrans"], show(r, m, loss=context)
            assert r["why"] == "net", show(r, m, loss=context)
        else:
            # Between the uploads: nothing lost, nothing counted (the count
            # is the connection's, taken at the request's start and end).
            assert m["retrans"] == 0, show(r, m)
            assert r["retrans"] == 0, show(r, m, loss=context)
            assert r["why"] != "net", show(r, m)
    assert [r["new_conn"] for r in found] == [True] + [False] * 4


# --- 3. moving the bytes -----------------------------------------------------

def test_slow_link_is_transfer(env):
    p = params()
    rate = p["rate_kbit"] * 1000
    size = p["slow_size"]
    with env.slow_ns.qdisc("tbf", "rate", "%dkbit" % p["rate_kbit"], "burst",
                           "16kb", "latency", "2s"):
        pid, measured = client(env, env.slow, [
            {"method": "GET", "path": "/slow/obj"},
            {"method": "GET", "path": "/slow/obj"}])
    found = records(env, pid, 2)
    # size / rate, give or take: frame and TCP/IP headers (~5 %), the ACKs
    # sharing the link, TLS framing, the 16 KiB burst.
    model_ms = size * 8 / rate * 1000
    for r, m in zip(found, measured):
        context = "tbf %d kbit/s, %d bytes: %.0f ms at that rate" % (
            p["rate_kbit"], size, model_ms)
        assert (r["status"], r["resp_bytes"]) == (200, size), show(r, m)
        assert 0.8 * model_ms <= r["transfer_ms"] <= 1.3 * model_ms + 30, \
            show(r, m, link=context)
        assert r["transfer_ms"] <= ms(m["end"] - m["start"]) + 0.05, \
            show(r, m)
        assert r["transfer_ms"] > r["server_ms"], show(r, m, link=context)
        assert r["retrans"] == m["retrans"] == 0, show(r, m)
        assert r["why"] == "xfer", show(r, m, link=context)


def test_dribbled_body_is_transfer(env):
    dribble = params()["dribble"]
    pid, measured = client(env, env.main, [
        {"method": "GET", "path": "/why/dribble-%d/obj" % dribble}])
    (r,), (m,) = records(env, pid, 1), measured
    assert (r["status"], r["resp_bytes"], r["complete"]) == (200, 200000, True)
    # The head goes out at once, the body in 13 pieces a pause apart.
    assert 0.95 * dribble - 1 <= r["transfer_ms"] <= \
        ms(m["end"] - m["start"]) + 0.05, show(r, m, dribble=dribble)
    assert r["server_ms"] < r["transfer_ms"], show(r, m)
    assert r["why"] == "xfer", show(r, m)


# --- 4. connections ----------------------------------------------------------

def check_connections(found, measured, tls):
    for r, m in zip(found, measured):
        assert (r["method"], r["path"], r["status"]) == \
            (m["method"], m["path"], m["status"]), show(r, m)
        assert r["retrans"] == 0, show(r, m)      # the socket is known
        if not m["new"]:
            assert (r["new_conn"], r["connect_ms"], r["tls_handshake_ms"]) \
                == (False, None, None), show(r, m)
            continue
        assert r["new_conn"] is True, show(r, m)
        # SYN sent in connect(), established before connect() returned.
        assert r["connect_ms"] is not None, show(r, m)
        assert 0 <= r["connect_ms"] <= \
            ms(m["connected"] - m["connect_start"]) + 0.05, show(r, m)
        if tls:
            # From the connect's end to the first request write: the
            # handshake the client timed, and no more than all of it.
            assert r["tls_handshake_ms"] is not None, show(r, m)
            assert ms(m["handshaken"] - m["connected"]) - 0.05 <= \
                r["tls_handshake_ms"] <= ms(m["first"] - m["connect_start"]), \
                show(r, m)
        else:
            assert r["tls_handshake_ms"] is None, show(r, m)
        assert r["why"] == why(r), show(r, m)


@pytest.fixture(scope="module")
def https_conns(env):
    p = params()
    get = {"method": "GET", "path": "/conn/obj"}
    plan = [dict(get, new=True) for _ in range(p["new_https"])] + \
        [dict(get, new=(i == 0)) for i in range(p["keep_https"])]
    pid, measured = client(env, env.conn, plan)
    return measured, records(env, pid, len(plan))


@pytest.fixture(scope="module")
def plain_conns(env):
    plan = [{"method": "GET", "path": "/plain/obj", "new": True}
            for _ in range(params()["new_plain"])]
    pid, measured = client(env, env.plain, plan)
    return measured, records(env, pid, len(plan))


CURL_TIMES = "%{num_connects} %{time_connect} %{time_appconnect}\\n"


@pytest.fixture(scope="module")
def curl_conns(env):
    """Processes of one request each, one process of three requests on one
    connection, one of two requests that closes the connection after each:
    (records, curl's own [num_connects, time_connect, time_appconnect])."""
    url = env.conn.url + "/conn/obj"
    one = ["-sk", "-o", "/dev/null", "-w", CURL_TIMES, url]
    runs = [one] * params()["curls"] + [
        ["-sk", "-w", CURL_TIMES, "-o", "/dev/null", url, "-o", "/dev/null",
         url, "-o", "/dev/null", url],
        ["-sk", "-H", "Connection: close", "-w", CURL_TIMES, "-o",
         "/dev/null", url, "-o", "/dev/null", url]]
    result = []
    for args in runs:
        pid, out = run_in(env.ns, [env.curl] + args)
        times = [[float(x) for x in line.split()] for line in out.splitlines()]
        result += list(zip(records(env, pid, len(times)), times))
    return result


def test_new_connections_https(env, https_conns):
    measured, found = https_conns
    check_connections(found, measured, tls=True)
    new = params()["new_https"]
    assert [r["new_conn"] for r in found] == [True] * (new + 1) + \
        [False] * (params()["keep_https"] - 1)


def test_new_connections_plain(env, plain_conns):
    measured, found = plain_conns
    assert all(r["lib"] == "plain" for r in found)
    check_connections(found, measured, tls=False)


def test_curl_connections(env, curl_conns):
    for r, (connects, connect, appconnect) in curl_conns:
        context = show(r, "num_connects %d time_connect %.6f time_appconnect "
                       "%.6f" % (connects, connect, appconnect))
        assert (r["status"], r["lib"]) == (200, "openssl"), context
        assert r["retrans"] == 0, context
        if connects == 0:
            assert (r["new_conn"], r["connect_ms"], r["tls_handshake_ms"]) \
                == (False, None, None), context
            continue
        assert r["new_conn"] is True, context
        # curl's connect time runs from its start to when it noticed the
        # connection (non-blocking connect, then poll): the SYN..ESTABLISHED
        # the kernel saw lies within; its handshake time lies within ours.
        assert r["connect_ms"] is not None and \
            0 <= r["connect_ms"] <= connect * 1000 + 0.05, context
        assert r["tls_handshake_ms"] is not None and \
            r["tls_handshake_ms"] >= (appconnect - connect) * 1000 - 0.05, \
            context
    kinds = [(r["new_conn"], c[0]) for r, c in curl_conns]
    curls = params()["curls"]
    assert kinds == [(True, 1)] * curls + [(True, 1), (False, 0), (False, 0)] \
        + [(True, 1), (True, 1)], kinds


@pytest.fixture(scope="module")
def handoff(env):
    pid, out = run_in(env.ns, [env.python, "-c", HANDOFF_CLIENT,
                               str(env.main.port), "2", "0.3"])
    result = json.loads(out)
    found = records(env, pid, 3)
    return result, found


# sock:sock_send_length (Linux 6.3+) ties a connection to its socket in the
# thread that sends; older kernels have the connecting thread's claim only.
SEND_LENGTH = s3slower.tracepoint_field("sock", "sock_send_length", "sk")


def test_connect_and_write_in_different_threads(env, handoff):
    """A connection connected by one thread and written by another has
    its own connect (this kernel), or none (older kernels): never another
    connection's."""
    result, found = handoff
    first, second, stale = found
    assert [r["path"] for r in found] == ["/why/handoff/connect"] * 2 + \
        ["/why/handoff/stale"]
    assert first["tid"] == second["tid"] == result["other_tid"]
    if not SEND_LENGTH:
        assert (first["new_conn"], first["connect_ms"],
                first["tls_handshake_ms"], first["retrans"]) == \
            (None, None, None, None), show(first)
        assert (second["new_conn"], second["connect_ms"],
                second["retrans"]) == (False, None, None), show(second)
        return
    assert first["new_conn"] is True and first["retrans"] == 0, show(first)
    assert 0 <= first["connect_ms"] < 50, show(first)
    assert first["tls_handshake_ms"] is not None, show(first)
    assert (second["new_conn"], second["connect_ms"], second["retrans"]) == \
        (False, None, 0), show(second)


def test_stale_connect_not_claimed_by_another_connection(env, handoff):
    """The main thread connected the first socket (written by the other
    thread), then writes first on a socket the other thread connected 0.3 s
    earlier: that request has its own socket's connect, and its TLS time
    runs from that connect's end, so it holds the pause."""
    result, (_first, _second, stale) = handoff
    assert stale["tid"] == result["main_tid"]
    if not SEND_LENGTH:
        assert stale["connect_ms"] is None, show(stale)
        return
    assert stale["new_conn"] is True and 0 <= stale["connect_ms"] < 50, \
        show(stale)
    assert 300 <= stale["tls_handshake_ms"] <= 300 + \
        ms(result["stale_ns"]) + 50, show(stale)


EBUSY_CLIENT = r"""
import http.client, json, socket, struct, sys, time
port = int(sys.argv[1])
def total_retrans(sock):
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, 100)[0]
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
conn.request("GET", "/slow/none")
conn.getresponse().read()
time.sleep(1.1)                   # the token bucket fills up (2 KB at 2 KB/s)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 0))
for _ in range(3):                # ~1 s of the link queued ahead of the PUT
    udp.sendto(b"q" * 1400, udp.getsockname())
before = total_retrans(conn.sock)
conn.request("PUT", "/slow/up", body=b"u" * 100)
resp = conn.getresponse()
resp.read()
print(json.dumps({"retrans": total_retrans(conn.sock) - before,
                  "port": conn.sock.getsockname()[1]}))
"""


def test_failed_retransmit_attempts_are_not_retransmissions(env):
    """The PUT's only segment waits ~1 s in tbf behind queued datagrams:
    the retransmission timer fires while it is still in the host's queue,
    so the kernel's attempts fail (-EBUSY) and send nothing."""
    plain = env.slow_plain
    for _attempt in range(3):
        with env.slow_ns.qdisc("tbf", "rate", "16kbit", "burst", "2kb",
                               "latency", "10s"):
            pid, out = run_in(env.slow_ns, [env.python, "-c", EBUSY_CLIENT,
                                            str(plain.port)])
        m = json.loads(out)
        r = records(env, pid, 2)[1]
        busy = env.loss.attempts(m["port"]).get(-16, 0)
        if busy or not RETRANSMIT_ERR:
            break
    assert busy or not RETRANSMIT_ERR, "harness: no failed attempt"
    assert r["retrans"] == m["retrans"], show(
        r, m, failed_attempts=busy,
        attempts=env.loss.attempts(m["port"]))
    assert (r["why"] == "net") == (m["retrans"] > 0), show(r, m)


# --- 5. tables and metrics (stops the module's tracer: the last test) --------

def table_rows(text, title, group):
    """{row: [columns]} of the table `=== title group ===` in text."""
    rows = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line == "=== %s %s ===" % (title, group):
            header = lines[i + 1].split()
            assert header[-5:] == ["srv_p50", "srv_p99", "xfer_p50",
                                   "xfer_p99", "New%"], header
            for row in lines[i + 2:]:
                if not row.strip():
                    break
                fields = row.split()
                rows[fields[0]] = fields[1:]
    return rows


def metric_sum(families, name, host):
    return sum(s.value for f in families for s in f.samples
               if s.name == name and s.labels.get("host") == host)


def test_tables_and_metrics(env, loss_run, https_conns, plain_conns,
                            curl_conns):
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" %
                                  env.metrics_port, timeout=10).read().decode()
    families = list(text_string_to_metric_families(text))
    by_host = {}
    for r in env.tracer.records():
        by_host.setdefault(r["endpoint"], []).append(r)
    for server in (env.lossy, env.conn, env.plain):
        found = by_host[server.host]
        complete = [r for r in found if r["complete"]]
        assert len(complete) == len(found) and all(
            r["server_ms"] is not None and r["transfer_ms"] is not None
            for r in found), "seed %d: %s" % (SEED, found)
        for name in ("s3slower_server_seconds_count",
                     "s3slower_transfer_seconds_count",
                     "s3slower_request_duration_seconds_count"):
            assert metric_sum(families, name, server.host) == len(complete), \
                (name, server.host, SEED)
        retrans = sum(r["retrans"] for r in found)
        assert metric_sum(families, "s3slower_retransmits_total",
                          server.host) == retrans, (server.host, SEED)
    lossy = sum(r["retrans"] for r in by_host[env.lossy.host])
    assert lossy > 0 and lossy == sum(m["retrans"] for m in loss_run[1])

    # Two more interval tables: every request seen so far is in one.
    printed = env.tracer.stderr().count(", last 1s ---")
    assert wait_until(lambda: env.tracer.stderr().count(", last 1s ---") >=
                      printed + 2, 15), "no interval tables"
    assert env.tracer.stop() == 0
    err = env.tracer.stderr()
    assert "Traceback" not in err
    final = err.rsplit("since start ---", 1)[1]
    intervals = err.split("since start ---")[0].split(", last 1s ---")[1:]
    assert intervals, "no interval tables:\n" + err[-3000:]
    for server in (env.lossy, env.conn, env.plain):
        found = by_host[server.host]
        for title, label, key in (("Statistics for", "method", "method"),
                                  ("S3 operations for", "op", "op")):
            rows = table_rows(final, title, server.host)
            for value in {r[key] for r in found}:
                mine = [r for r in found if r[key] == value]
                new = sum(r["new_conn"] is True for r in mine)
                columns = rows[value]
                assert int(columns[0]) == len(mine), (server.host, value,
                                                      columns, SEED)
                assert columns[-1] == "%d" % round(100.0 * new / len(mine)), \
                    (server.host, value, new, len(mine), columns, SEED)
                # server and transfer quantiles: of every request
                assert all(c != "-" for c in columns[7:11]), columns
        # Per interval: the interval's requests; the plain server's all
        # opened their connection.
        counted = 0
        for block in intervals:
            for value, columns in table_rows(block, "Statistics for",
                                             server.host).items():
                counted += int(columns[0])
                if server is env.plain:
                    assert columns[-1] == "100", (block, SEED)
        assert counted == len(found), (server.host, counted, len(found))
