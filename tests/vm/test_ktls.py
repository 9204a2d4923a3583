"""Kernel TLS, end to end, with real BPF, in the VM stage's guest.

Runs only inside the guest that tests/vm/stage.sh boots (a stock Debian
kernel under qemu, with kernel TLS, kprobes and BTF); a host run of the suite
does not collect this directory.

tests/clients/ktlsclient.c makes HTTPS requests with kernel TLS on: the head
goes through SSL_write, and a PUT body goes past OpenSSL to the kTLS socket by
SSL_sendfile(), by sendfile(2) on the socket's fd, by io_uring
IORING_OP_SPLICE (file -> pipe -> socket), by write(2) on the socket's fd
or by io_uring IORING_OP_SEND; a GET over TLS 1.2 has kTLS receive
on, so SSL_read is a recvmsg(2) underneath. tests/clients/ktlsserver.c (plain
OpenSSL, no kTLS) logs the exact bytes it got. The client times each request
on CLOCK_MONOTONIC and knows nothing of the tracer.

Each request must be reported exactly once (one record for the client's
pid, from the session tracer, which runs with plain HTTP on: the syscalls
under kernel TLS must not be reported again as plain HTTP), with its
operation, status, exact body byte counts, and a latency inside the client's
own: at most 0.05 ms above it (the tracer's first and last byte lie inside
the client's window) and at most 1 ms + 2 % below it, plus the tracer's own
probe cost under emulation (latency_slack_ms). Kernel TLS must really be on:
the client's BIO says so and /proc/net/tls_stat counts the connection.
"""

import json
import os
import subprocess
import tempfile
import time
import warnings

import pytest

from conftest import TESTS, require_vm_guest, run_client, wait_until

require_vm_guest()

BUCKET = "ktls-bkt"
KiB, MiB = 1 << 10, 1 << 20
SIZES = [0, KiB, MiB, 64 * MiB]
# A record may take a while under emulation: the tracer shares one vCPU.
RECORD_TIMEOUT = 120
SETTLE = 1.0


def size_id(size):
    for unit, name in ((MiB, "MiB"), (KiB, "KiB")):
        if size >= unit and size % unit == 0:
            return "%d%s" % (size // unit, name)
    return "%dB" % size


def tls_stat():
    with open("/proc/net/tls_stat") as f:
        return {k: int(v) for k, v in (line.split() for line in f if line.strip())}


class KtlsRig:
    """Built client and server, a certificate, body files, the server up."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="s3slower-vm-ktls")
        subprocess.run(["modprobe", "tls"], check=True)
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            assert "tls" in f.read().split(), "no kernel TLS in the guest"
        self.client = self._build("ktlsclient", "-lssl", "-lcrypto", "-luring")
        self.server_bin = self._build("ktlsserver", "-lssl", "-lcrypto")
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                        self.key, "-out", self.cert, "-days", "2", "-subj",
                        "/CN=127.0.0.1"], check=True, capture_output=True)
        block = os.urandom(MiB)
        self.bodies = {}
        for size in SIZES:
            path = os.path.join(self.dir, "body-%d" % size)
            with open(path, "wb") as f:
                for _ in range(size // MiB):
                    f.write(block)
                f.write(block[:size % MiB])
            self.bodies[size] = path
        self.log = os.path.join(self.dir, "server.log")
        self.server = subprocess.Popen(
            [self.server_bin, self.cert, self.key, self.log],
            stdout=subprocess.PIPE, text=True)
        line = self.server.stdout.readline()
        assert line.startswith("READY"), "ktlsserver did not start: %r" % line
        self.port = int(line.split()[1])

    def _build(self, name, *libs):
        out = os.path.join(self.dir, name)
        subprocess.run(["cc", "-O2", "-Wall", "-o", out,
                        os.path.join(TESTS, "clients", name + ".c")] + list(libs),
                       check=True)
        return out

    def run(self, tls, *requests):
        """Runs the client: (its JSON report, tls_stat before, after)."""
        before = tls_stat()
        pid, out = run_client([self.client, str(self.port), tls] + list(requests),
                              timeout=600)
        after = tls_stat()
        report = json.loads(out)
        assert report["pid"] == pid
        return report, before, after

    def server_lines(self, path):
        with open(self.log) as f:
            lines = [json.loads(line) for line in f]
        return [line for line in lines if line["path"] == path]

    def stop(self):
        self.server.kill()
        self.server.wait()


@pytest.fixture(scope="module")
def ktls(tracer, pytestconfig):
    started = time.monotonic()
    rig = KtlsRig()
    # Warm-up, not checked: under emulation the first pass through new code
    # (the BPF programs, kTLS, io_uring) pays for its translation.
    for mode in BODY_MODES:
        rig.run("tls1.3", "PUT:%s:/%s/warm-up-%s:%s"
                % (mode, BUCKET, mode, rig.bodies[KiB]))
    rig.run("tls1.2", "GET:/%s/get-%d-warm-up" % (BUCKET, KiB))
    report = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if report and capture:
        with capture.global_and_fixture_disabled():
            report.write_line("\n[vm] tracer started in %.1f s; client, "
                              "server and warm-up in %.1f s"
                              % (tracer.start_seconds,
                                 time.monotonic() - started))
    yield rig
    rig.stop()


def latency_slack_ms():
    """Extra room below the client's latency for the tracer's own probes.

    On hardware (or KVM) a uprobe and a uretprobe cost microseconds, well
    inside 1 ms + 2 %. Under qemu's emulation (TCG) the tracer's probe work
    before its first time stamp and after its last, inside the client's
    clock, measured 0.2-0.7 ms for GETs over kTLS receive, 1.5-2.5 ms for
    PUTs, with stragglers of 5-20 ms when the shared host is busy: 5 ms more
    are allowed there (and a request only late is tried again).
    """
    env = os.environ.get("S3SLOWER_LATENCY_SLACK_MS")
    if env:
        return float(env)
    with open("/proc/cmdline") as f:
        return 5.0 if "s3kvm.accel=tcg" in f.read().split() else 0.0


class LatencyOff(AssertionError):
    """Only the latency was outside the allowed window."""


def check_request(tracer, ktls, report, method, path, body, resp):
    """The server's bytes, then the one record the tracer made of it."""
    (req,) = report["requests"]
    assert (req["method"], req["path"], req["status"], req["req_bytes"],
            req["resp_bytes"]) == (method, path, 200, body, resp), report
    served = ktls.server_lines(path)
    assert [(s["body_bytes"], s["resp_body_bytes"]) for s in served] == \
        [(body, resp)], "server log: %s" % served

    pid = report["pid"]
    wait_until(lambda: tracer.records(pid=pid, path=path), RECORD_TIMEOUT, 0.2)
    time.sleep(SETTLE)      # a moment for strays and duplicates
    records = tracer.records(pid=pid)
    assert len(records) == 1, (
        "want exactly one record for pid %d %s %s; the tracer wrote %d:\n%s"
        % (pid, method, path, len(records),
           "\n".join(json.dumps(r) for r in records)))
    rec = records[0]
    key = path.split("/", 2)[2]
    got = {k: rec.get(k) for k in ("method", "path", "bucket", "key", "op",
                                   "status", "req_bytes", "resp_bytes",
                                   "complete")}
    want = {"method": method, "path": path, "bucket": BUCKET, "key": key,
            "op": "PutObject" if method == "PUT" else "GetObject",
            "status": 200, "req_bytes": body if method == "PUT" else 0,
            "resp_bytes": resp, "complete": True}
    assert got == want, "record: %s" % json.dumps(rec)
    client_ms = req["latency_ms"]
    lat = rec["latency_ms"]
    assert lat is not None, "no latency: %s" % json.dumps(rec)
    low = client_ms - (1 + 0.02 * client_ms + latency_slack_ms())
    high = client_ms + 0.05
    if not low <= lat <= high:
        raise LatencyOff(
            "tracer latency %.3f ms, client's %.3f ms (allowed %.3f..%.3f; "
            "client: head SSL_write %.3f ms, last SSL_read %.3f ms): %s"
            % (lat, client_ms, low, high, req["head_write_ms"],
               req["last_read_ms"], json.dumps(rec)))


ATTEMPTS = 3


def request_checked(tracer, ktls, tls, method, path, body, resp, spec,
                    verify_ktls):
    """Runs the request (spec(path) is the client's argument), checks that
    kernel TLS was on (verify_ktls(report, tls_stat before, after)), then the
    server's log and the tracer's record. Runs it again (a new key) if only
    the latency was off: a moment's stall of the emulator or the shared host
    inside the client's clock but outside the tracer's window."""
    misses = []
    for attempt in range(1, ATTEMPTS + 1):
        p = path if attempt == 1 else "%s-try%d" % (path, attempt)
        report, before, after = ktls.run(tls, spec(p))
        verify_ktls(report, before, after)
        try:
            check_request(tracer, ktls, report, method, p, body, resp)
            if misses:
                warnings.warn("%s %s: latency off in %d earlier attempt(s):\n%s"
                              % (method, path, len(misses), "\n".join(misses)))
            return
        except LatencyOff as exc:
            misses.append(str(exc))
            if body > 16 * MiB or resp > 16 * MiB:
                break       # no retrying a long transfer: the 2 % covers it
    raise AssertionError("latency off in every attempt:\n" + "\n".join(misses))


def ktls_send_on(report, before, after):
    assert report["ktls_send"] == 1, "kTLS send not on: %s" % report
    assert after["TlsTxSw"] > before["TlsTxSw"], \
        "/proc/net/tls_stat counted no kTLS send: %s -> %s" % (before, after)


def ktls_receive_on(report, before, after):
    assert (report["ktls_send"], report["ktls_recv"]) == (1, 1), \
        "kTLS not on both ways: %s" % report
    assert after["TlsRxSw"] > before["TlsRxSw"], \
        "/proc/net/tls_stat counted no kTLS receive: %s -> %s" % (before, after)


BODY_MODES = ("sslsendfile", "sendfile", "splice", "syswrite", "uringsend")


@pytest.mark.parametrize("mode, size", [
    pytest.param(mode, size, id="%s-%s" % (mode, size_id(size)))
    for mode in BODY_MODES for size in SIZES])
def test_ktls_put_body_past_openssl(tracer, ktls, mode, size):
    """TLS 1.3, kTLS send: head by SSL_write, body straight into the
    kernel's TLS by SSL_sendfile(), sendfile(2), io_uring splice (run by a
    kernel worker: no syscall to see), write(2) on the socket, or io_uring
    send."""
    path = "/%s/put-%s-%s" % (BUCKET, mode, size_id(size))
    request_checked(tracer, ktls, "tls1.3", "PUT", path, size, 0,
                    lambda p: "PUT:%s:%s:%s" % (mode, p, ktls.bodies[size]),
                    ktls_send_on)


def test_ktls_put_body_by_ssl_write(tracer, ktls):
    """Control: the same over kTLS send, the body through SSL_write."""
    path = "/%s/put-write-1MiB" % BUCKET
    request_checked(tracer, ktls, "tls1.3", "PUT", path, MiB, 0,
                    lambda p: "PUT:write:%s:%s" % (p, ktls.bodies[MiB]),
                    ktls_send_on)


@pytest.mark.parametrize("size", SIZES, ids=size_id)
def test_ktls_get_tls12_kernel_receive(tracer, ktls, size):
    """TLS 1.2 with kTLS receive: SSL_read is a recvmsg(2) of plaintext."""
    path = "/%s/get-%d" % (BUCKET, size)
    request_checked(tracer, ktls, "tls1.2", "GET", path, 0, size,
                    lambda p: "GET:" + p, ktls_receive_on)
