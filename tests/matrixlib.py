"""The seeded request matrix of tests/test_matrix.py: generator, client
runners, and the checks of the tracer's records against the server's log
and the clients' own clocks.

A case is one request. Its response is a recipe in the path (see
tests/matrixserver.py), `/mx/<case>/<recipe>`, so every client can ask for
every response; a client process runs one or more keep-alive connections,
each 1-20 requests, a `close` response only as the last of its connection.
Everything is derived from one seed: the cases, the server's write sizes
and chunk sizes (the recipe's z), the request bodies' chunk sizes.
"""

import collections
import concurrent.futures
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time

import matrixserver
from conftest import PYTHON, TESTS, stop_process

MiB = 1024 * 1024
MAX_SIZE = 2 * MiB + 1
BOUNDARIES = (4096, 16384, 49152, 65536, MiB, 2 * MiB)
# How much of a precise client's time the tracer may miss (README: 1 ms + 2 %)
# and how far above the client's own clock it may be (rounding).
SLACK_MS, SLACK_FRACTION, ABOVE_MS = 1.0, 0.02, 0.05
ROUNDING_MS = 0.002          # the tracer prints ms with 3 decimals
# Clients run at SCHED_FIFO priority 1 (`chrt -f 1`): no ordinary task
# preempts them between a clock reading and the I/O call it times (without
# it, on 2 CPUs, the tracer's and the server's wake-ups did, right after the
# probes, in a few per cent of requests). The C, Python and Go clients also
# report any preemption in those windows ("preempted": their time is then
# an upper bound only). S3SLOWER_MATRIX_RT=0 runs them at normal priority.
RT = ["chrt", "-f", "1"]

CLIENT_DIR = os.path.join(TESTS, "clients")

# name: scheme, clock ("precise": per request; "wall": an upper bound only),
# share of the default matrix.
CLIENTS = collections.OrderedDict([
    ("http-tls", dict(scheme="https", clock="precise", share=100)),
    ("http-plain", dict(scheme="http", clock="precise", share=60)),
    ("curl-tls", dict(scheme="https", clock="precise", share=90)),
    ("curl-plain", dict(scheme="http", clock="precise", share=30)),
    ("wget", dict(scheme="https", clock="wall", share=50)),
    ("boto3", dict(scheme="https", clock="wall", share=50)),
    ("c-openssl", dict(scheme="https", clock="precise", share=70)),
    ("c-nss", dict(scheme="https", clock="precise", share=50)),
    ("c-plain", dict(scheme="http", clock="precise", share=40)),
    ("go", dict(scheme="https", clock="precise", share=60)),
])
DEFAULT_CASES = sum(c["share"] for c in CLIENTS.values())     # 600
# Connections per client process, one after the other (wget and curl: one
# process, one connection; every other Go process runs its connections at
# the same time, one goroutine each).
CONNS_PER_PROCESS = {"http-tls": 3, "http-plain": 3, "curl-tls": 1,
                     "curl-plain": 1, "wget": 1, "boto3": 4, "c-openssl": 3,
                     "c-nss": 3, "c-plain": 3, "go": 3}


def expected_op(method, target):
    query = target.partition("?")[2]
    if method == "POST":
        return ("CreateMultipartUpload" if query == "uploads"
                else "CompleteMultipartUpload")
    if method == "PUT" and "partNumber=" in query:
        return "UploadPart"
    return {"GET": "GetObject", "HEAD": "HeadObject", "PUT": "PutObject",
            "DELETE": "DeleteObject"}[method]


# ---------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------

def pick_size(rng, cap=MAX_SIZE):
    """0..2 MiB, heavily at 4/16/48/64 KiB and 1/2 MiB, +-1."""
    r = rng.random()
    if r < 0.55:
        base = rng.choice(BOUNDARIES[:4] * 3 + BOUNDARIES[4:])
        size = base + rng.choice((-1, 0, 1))
    elif r < 0.63:
        size = 0
    elif r < 0.78:
        size = rng.randint(1, 4095)
    elif r < 0.90:
        size = 4096 * rng.randint(1, 512) + rng.choice((-1, 0, 1))
    else:
        size = rng.randint(0, 2 * MiB)
    return min(size, cap)


def weighted(rng, table):
    total = sum(w for _v, w in table)
    x = rng.uniform(0, total)
    for value, w in table:
        x -= w
        if x <= 0:
            return value
    return table[-1][0]


METHODS = {
    "default": [("GET", 50), ("HEAD", 12), ("PUT", 20), ("DELETE", 8),
                ("POST", 10)],
    "boto3": [("GET", 50), ("HEAD", 15), ("PUT", 25), ("DELETE", 10)],
    "wget": [("GET", 60), ("HEAD", 15), ("PUT", 15), ("DELETE", 10)],
}
STATUSES = {
    "GET": [(200, 70), (204, 4), (304, 5), (403, 5), (404, 6), (500, 5),
            (503, 5)],
    "HEAD": [(200, 75), (304, 5), (403, 5), (404, 10), (500, 5)],
    "PUT": [(200, 85), (403, 5), (500, 5), (503, 5)],
    "DELETE": [(204, 60), (200, 25), (404, 10), (503, 5)],
    "POST": [(200, 85), (403, 5), (500, 10)],
}
PATTERNS = [("one", 25), ("small", 15), ("split", 15), ("chunked", 25),
            ("continue", 12)]


def gen_case(rng, client, case_id, last, conn_method=None, conn_body=None):
    """One request: what the client sends and the response it asks for."""
    wget, boto = client == "wget", client == "boto3"
    method = conn_method or weighted(
        rng, METHODS["boto3" if boto else "default"])
    statuses = STATUSES[method]
    if wget:                          # wget waits for a 304's body: no 304
        statuses = [(s, w) for s, w in statuses if s != 304]
    status = weighted(rng, statuses)
    pattern = weighted(rng, PATTERNS)
    if last and rng.random() < 0.3:
        pattern = "close"
    if method in ("GET", "HEAD") or status >= 400 or rng.random() < 0.3:
        size = pick_size(rng)
    else:
        size = rng.randint(0, 600)
    if boto and method in ("PUT", "DELETE") and status < 300:
        size = 0         # botocore parses any other 2xx body as XML
    if status >= 400:
        size = min(size, 70000)
    recipe = dict(s=size, p=pattern, st=status, z=rng.randrange(10 ** 6))
    if rng.random() < 0.15:
        recipe["d"] = rng.randint(1, 30)
    if rng.random() < 0.12:
        recipe["b"] = rng.randint(2, 30)
    if rng.random() < 0.12:
        recipe["a"] = 1
    if pattern == "chunked":
        recipe["ce"] = int(rng.random() < 0.35)
        recipe["tr"] = int(rng.random() < 0.12 and not wget)
    if status == 304:
        recipe["h"] = int(rng.random() < 0.5)
    query = ""
    if method == "POST":
        query = "?uploads" if rng.random() < 0.5 else "?uploadId=mx"
    elif method == "PUT" and rng.random() < 0.2:
        query = "?partNumber=%d&uploadId=mx" % rng.randint(1, 10000)
    key = "%s/%s" % (case_id, matrixserver.encode_recipe(**recipe))
    case = dict(case=case_id, client=client, method=method,
                target="/mx/%s%s" % (key, query), key=key, recipe=recipe,
                body=0, te="no", expect=False)
    if boto and query:
        case["target"] = "/mx/%s?partNumber=1&uploadId=mx" % key
    case["op"] = expected_op(method, case["target"])
    if method in ("PUT", "POST") and not (method == "POST" and
                                         query == "?uploads" and
                                         rng.random() < 0.5):
        if conn_body is not None:
            body = conn_body
        elif rng.random() < 0.5:
            body = pick_size(rng)
        else:
            body = rng.randint(0, 5000)
        case["body"] = body
        case["te"] = "cl"
        if not (wget or boto) and rng.random() < 0.3 and \
                (body or not client.startswith("curl")):
            case["te"] = "ch"    # (curl sends an empty body unframed)
        if not wget and rng.random() < 0.2:
            case["expect"] = True
    if client == "http-tls" or client == "http-plain":
        if case["te"] == "ch":
            case["chunks"] = split_sizes(rng, case["body"])
    if client.startswith("c-"):
        small_ok = size <= 70000 or status in (204, 304) or method == "HEAD"
        case["rmax"] = weighted(rng, [(16384, 50), (4096, 15), (65536, 15),
                                      (rng.randint(1, 997),
                                       20 if small_ok else 0)])
        case["wmax"] = weighted(rng, [(16384, 30), (4096, 15), (65536, 15),
                                      (rng.randint(1, 65536), 20),
                                      (rng.randint(1, 997),
                                       20 if case["body"] <= 70000 else 0)])
        case["hb"] = int(rng.random() < 0.5)
    if client == "go":
        case["wmax"] = rng.randint(1, 32768)
    return case


def split_sizes(rng, total):
    sizes = []
    while total > 0:
        n = min(total, rng.choice((rng.randint(1, 997),
                                   rng.randint(1, 70000))))
        sizes.append(n)
        total -= n
    return sizes


def allocation(total):
    """Cases per client for a matrix of about `total` cases."""
    scale = total / DEFAULT_CASES
    return collections.OrderedDict(
        (name, max(1, round(c["share"] * scale)))
        for name, c in CLIENTS.items())


def generate(seed, total=DEFAULT_CASES, prefix="m"):
    """[Run] for a matrix of about `total` cases, all from `seed`."""
    rng = random.Random(seed)
    runs = []
    n = 0
    for client, count in allocation(total).items():
        conns = []
        made = 0
        while made < count:
            length = min(rng.randint(1, 20), count - made)
            conn_method = conn_body = None
            if client == "wget":     # one method (and body) per process
                conn_method = weighted(rng, METHODS["wget"])
                if conn_method == "PUT":
                    conn_body = pick_size(rng)
            conn = []
            for i in range(length):
                n += 1
                conn.append(gen_case(rng, client, "%s%05d" % (prefix, n),
                                     i == length - 1, conn_method, conn_body))
            conns.append(conn)
            made += length
        per = CONNS_PER_PROCESS[client]
        for i in range(0, len(conns), per):
            runs.append(Run(client, conns[i:i + per]))
            # Every other Go process runs its connections at once.
            runs[-1].parallel = client == "go" and (i // per) % 2 == 1
    rng.shuffle(runs)
    return in_pairs(runs)


def in_pairs(runs):
    """The runs in an order where two processes of the same client follow
    each other, so that they run at the same time (same binary, same
    addresses: state keyed without the process would mix them up)."""
    out, waiting = [], {}
    for run in runs:
        kind = (run.client, run.parallel)
        other = waiting.pop(kind, None)
        if other:
            out += [other, run]
        else:
            waiting[kind] = run
    return out + list(waiting.values())


def at_once(seed, client, processes=3, conns=2, length=15, prefix="p"):
    """[Run]: `processes` processes of one client, to run at the same time
    (same program, likely the same addresses in each), each with `conns`
    connections of `length` generated requests, one after the other."""
    rng = random.Random("%s/%s" % (seed, client))
    runs = []
    n = 0
    for _p in range(processes):
        plan = []
        for _c in range(conns):
            conn = []
            for i in range(length):
                n += 1
                conn.append(gen_case(rng, client, "%s%05d" % (prefix, n),
                                     i == length - 1))
            plan.append(conn)
        runs.append(Run(client, plan))
    return runs


def sweep_sizes():
    """0..2 MiB in 4 KiB steps and +-1 around each step."""
    sizes = [0, 1]
    for k in range(1, 513):
        sizes += [4096 * k - 1, 4096 * k, 4096 * k + 1]
    return sizes


def sweep(client, processes=1, prefix="s"):
    """[Run]: GET every sweep size over TLS, `processes` keep-alive
    connections (one per process, sizes dealt out in turn), each ending
    with one more request."""
    sizes = sweep_sizes()
    runs = []
    n = 0
    for p in range(processes):
        conn = []
        for size in sizes[p::processes] + [1]:
            n += 1
            case_id = "%s%05d" % (prefix, n)
            recipe = dict(s=size, p="one", st=200)
            key = "%s/%s" % (case_id, matrixserver.encode_recipe(**recipe))
            conn.append(dict(case=case_id, client=client, method="GET",
                             target="/mx/" + key, key=key, recipe=recipe,
                             body=0, te="no", expect=False, op="GetObject",
                             rmax=16384, wmax=16384, hb=0))
        runs.append(Run(client, [conn]))
    return runs


# ---------------------------------------------------------------------------
# Running the clients
# ---------------------------------------------------------------------------

class Env:
    """Where the clients go and what they run with."""

    def __init__(self, tls_port, plain_port, binaries, workdir):
        self.tls_port = tls_port
        self.plain_port = plain_port
        self.binaries = binaries        # name -> path (c-*, go)
        self.workdir = workdir

    def port(self, client):
        return self.tls_port if CLIENTS[client]["scheme"] == "https" \
            else self.plain_port

    def base(self, client):
        return "%s://127.0.0.1:%d" % (CLIENTS[client]["scheme"],
                                      self.port(client))


class Run:
    """One client process: its connections of cases, its results."""

    counter = 0

    def __init__(self, client, conns):
        self.client = client
        self.conns = conns
        self.parallel = False
        self.pid = None
        self.results = {}        # case -> what the client measured
        self.wall = None         # (start, end) monotonic ns of the process
        self.error = None
        Run.counter += 1
        self.name = "%s-%d" % (client, Run.counter)

    def cases(self):
        return [c for conn in self.conns for c in conn]

    # -- command lines -----------------------------------------------------
    def command(self, env):
        path = os.path.join(env.workdir, self.name)
        c = self.client
        if c.startswith("http-"):
            plan = [[dict(case=x["case"], method=x["method"],
                          target=x["target"], body=x["body"], te=x["te"],
                          expect=x["expect"], chunks=x.get("chunks", []))
                     for x in conn] for conn in self.conns]
            write_json(path, plan)
            return [PYTHON, os.path.join(CLIENT_DIR, "mxhttp.py"),
                    CLIENTS[c]["scheme"], str(env.port(c)), path]
        if c == "boto3":
            plan = [[dict(case=x["case"], op=x["op"], key=x["key"],
                          body=x["body"], expect=x["expect"]) for x in conn]
                    for conn in self.conns]
            write_json(path, plan)
            return [PYTHON, os.path.join(CLIENT_DIR, "mxboto3.py"),
                    env.base(c), path]
        if c == "go":
            plan = [[dict(case=x["case"], method=x["method"],
                          target=x["target"], body=x["body"], te=x["te"],
                          expect=x["expect"], wmax=x.get("wmax", 16384))
                     for x in conn] for conn in self.conns]
            write_json(path, plan)
            return [env.binaries["go"], env.base(c), path] + (
                ["parallel"] if self.parallel else [])
        if c.startswith("c-"):
            with open(path, "w") as f:
                for conn in self.conns:
                    f.write("C\n")
                    for x in conn:
                        f.write("R %s %s %s %d %s %d %d %d %d\n" % (
                            x["case"], x["method"], x["target"], x["body"],
                            x["te"], x["expect"], x["rmax"], x["wmax"],
                            x["hb"]))
            return [env.binaries[c], str(env.port(c)), path]
        if c.startswith("curl"):
            return ["curl", "-K", self.curl_config(env, path)]
        if c == "wget":
            return self.wget_command(env, path)
        raise ValueError(c)

    def curl_config(self, env, path):
        (conn,) = self.conns
        lines = []
        for i, x in enumerate(conn):
            if i:
                lines.append("next")
            lines += ['url = "%s%s"' % (env.base(self.client), x["target"]),
                      "insecure", "silent", 'output = "/dev/null"',
                      'write-out = "%{json}\\n"']
            if x["method"] == "HEAD":
                lines.append("head")
            elif x["method"] != "GET":
                lines.append('request = "%s"' % x["method"])
            if x["te"] != "no":
                body = body_file(env.workdir, x["body"])
                lines.append('data-binary = "@%s"' % body)
                lines.append('header = "Content-Type: application/'
                             'octet-stream"')
                if x["te"] == "ch":
                    lines.append('header = "Transfer-Encoding: chunked"')
            lines.append('header = "Expect: 100-continue"' if x["expect"]
                         else 'header = "Expect:"')
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def wget_command(self, env, path):
        (conn,) = self.conns
        with open(path, "w") as f:
            for x in conn:
                f.write("%s%s\n" % (env.base(self.client), x["target"]))
        cmd = ["wget", "-q", "--no-check-certificate", "-O", "/dev/null",
               "--content-on-error", "--tries=1", "-i", path]
        method = conn[0]["method"]
        if method != "GET":
            cmd.append("--method=" + method)
        if method in ("PUT", "POST"):
            cmd.append("--body-file=" + body_file(env.workdir,
                                                  conn[0]["body"]))
        return cmd

    # -- running -----------------------------------------------------------
    def run(self, env, timeout=180):
        cmd = self.command(env)
        if os.environ.get("S3SLOWER_MATRIX_RT") != "0" and \
                shutil.which(RT[0]):
            cmd = RT + cmd
        start = time.monotonic_ns()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        self.pid = proc.pid
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            self.error = "timed out after %ds: %s" % (timeout, err[-2000:])
            return self
        self.wall = (start, time.monotonic_ns())
        # wget: 8 after an HTTP error, 4 after some HEADs (spider mode):
        # the server's log shows whether every request was answered.
        ok = (0, 4, 8) if self.client == "wget" else (0,)
        if proc.returncode not in ok:
            self.error = "exit %d: %s\n%s" % (proc.returncode, cmd,
                                             err[-2000:])
        try:
            self.parse(out)
        except (ValueError, KeyError) as exc:
            self.error = (self.error or "") + " unreadable output %r: %s" % (
                out[:500], exc)
        return self

    def parse(self, out):
        c = self.client
        if c.startswith("c-"):
            items = [json.loads(line) for line in out.splitlines() if line]
        elif c.startswith("curl"):
            items = []
            for line in out.splitlines():
                if not line.strip():
                    continue
                w = json.loads(line)
                case = w["url_effective"].split("/mx/")[1].split("/")[0]
                # curl's clock starts before the connection; what comes
                # after the connection (TLS) is set up is this request's.
                setup = max(w.get("time_appconnect") or 0,
                            w.get("time_connect") or 0)
                items.append(dict(case=case, status=w["http_code"],
                                  ms=(w["time_total"] - setup) * 1e3,
                                  resp_payload=w["size_download"],
                                  req_wire=w["size_upload"],
                                  new_conn=w["num_connects"]))
        elif c == "wget":
            items = [dict(case=x["case"]) for x in self.conns[0]]
        else:
            items = json.loads(out)
        for item in items:
            if item.get("error"):
                self.error = (self.error or "") + " %s: %s" % (
                    item["case"], item["error"])
            if "ms" not in item and "end" in item:
                item["ms"] = (item["end"] - item["start"]) / 1e6
            if c == "wget":
                item["ms"] = (self.wall[1] - self.wall[0]) / 1e6
            self.results[item["case"]] = item


def recheck_runs(runs, bad):
    """Cases whose only mismatch is BELOW_CLIENT, each again on a new
    connection of its own (the requests before it on its connection, then
    it; fresh case ids: 'q<n>' + the id), to run alone on a quiet host:
    {new case id: original case id}, [Run]."""
    fields = collections.defaultdict(set)
    for m in bad:
        fields[m.case].add(m.field)
    suspects = {case for case, f in fields.items() if f == {BELOW_CLIENT}}
    mapping, out = {}, []
    for run in runs:
        for conn in run.conns:
            for i, case in enumerate(conn):
                if case["case"] not in suspects:
                    continue
                copies = []
                prefix = "q%d" % len(out)
                for old in conn[max(0, i - 19):i + 1]:
                    new = dict(old, case=prefix + old["case"])
                    new["key"] = old["key"].replace(old["case"], new["case"],
                                                    1)
                    new["target"] = old["target"].replace(
                        "/mx/%s/" % old["case"], "/mx/%s/" % new["case"], 1)
                    copies.append(new)
                mapping[copies[-1]["case"]] = case["case"]
                out.append(Run(run.client, [copies]))
    return mapping, out


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def body_file(workdir, size):
    path = os.path.join(workdir, "body-%d" % size)
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            f.write(b"u" * size)
        os.rename(path + ".tmp", path)
    return path


def run_all(runs, env, parallel=3):
    """Every run, `parallel` client processes at a time."""
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda r: r.run(env), runs))
    return runs


# ---------------------------------------------------------------------------
# Server log and tracer records
# ---------------------------------------------------------------------------

def read_log(path):
    entries = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                entries.append(json.loads(line))
    return entries


def tracer_records(tracer):
    """(pid, case) -> [records] of matrix paths."""
    found = collections.defaultdict(list)
    for line in tracer.stdout().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        path = record.get("path") or ""
        if path.startswith("/mx/") and path.count("/") >= 3:
            found[(record["pid"], path.split("/")[2])].append(record)
    return found


def wait_progress(count, goal, timeout=60, quiet=5.0):
    """Until count() >= goal, or it has not grown for `quiet` seconds (a
    tracer that misses some), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = count()
        if n >= goal:
            return
        if n != seen:
            seen, since = n, time.monotonic()
        elif time.monotonic() - since > quiet:
            return
        time.sleep(0.25)


def wait_for_records(tracer, runs, settle=1.0):
    """The tracer's records once every request has one (or no more come),
    then `settle` seconds more for duplicates."""
    want = {(r.pid, c["case"]) for r in runs for c in r.cases()
            if r.pid is not None}
    wait_progress(lambda: len(want & set(tracer_records(tracer))), len(want))
    time.sleep(settle)
    return tracer_records(tracer)


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------

Mismatch = collections.namedtuple("Mismatch",
                                  "case client field expected got")
# The one mismatch a busy host can fake: the client's clock running longer
# than the tracer's interval by more than 1 ms + 2 % (the client stalled -
# another task, the VM's host - between a clock reading and its I/O).
BELOW_CLIENT = "latency_ms below client's"


def check(runs, log_entries, records):
    """(tracer mismatches, harness problems, cases checked, Counter of how
    the times were checked)."""
    stats = collections.Counter()
    by_case = collections.defaultdict(list)
    for entry in log_entries:
        by_case[entry["case"]].append(entry)
    bad, harness = [], []
    checked = 0
    for run in runs:
        if run.error:
            harness.append(Mismatch("-", run.client, "client run", "ok",
                                    run.error))
        for conn in run.conns:
            previous = None
            for case in conn:
                entries = by_case.get(case["case"], [])
                if len(entries) != 1:
                    harness.append(Mismatch(case["case"], run.client,
                                            "server log entries", 1,
                                            len(entries)))
                    previous = None
                    continue
                server = entries[0]
                # One keep-alive connection; but curl closes it after an
                # error answer to an upload it may not have finished.
                if previous and server["conn"] != previous[1]["conn"] and \
                        not (run.client.startswith("curl") and
                             previous[0]["te"] != "no" and
                             previous[1]["status"] >= 300):
                    harness.append(Mismatch(case["case"], run.client,
                                            "same connection as before",
                                            previous[1]["conn"],
                                            server["conn"]))
                previous = (case, server)
        for case in run.cases():
            entries = by_case.get(case["case"], [])
            if len(entries) != 1:
                continue
            checked += 1
            server = entries[0]
            harness += check_harness(run, case, server)
            bad += check_case(run, case, server,
                              records.get((run.pid, case["case"]), []),
                              stats)
    return bad, harness, checked, stats


def check_harness(run, case, server):
    """The server's log against what the client saw and asked for."""
    out = []
    m = run.results.get(case["case"])

    def expect(field, expected, got):
        if expected != got:
            out.append(Mismatch(case["case"], run.client, field, expected,
                                got))

    expect("server method", case["method"], server["method"])
    expect("server path", case["target"], server["path"])
    expect("server status", case["recipe"]["st"], server["status"])
    if case["te"] == "cl":
        expect("server req_body_wire", case["body"], server["req_body_wire"])
    if case["te"] != "no":
        expect("server req_body_payload", case["body"],
               server["req_body_payload"])
    if run.client == "wget":
        return out
    if m is None:
        out.append(Mismatch(case["case"], run.client, "client result",
                            "present", None))
        return out
    expect("client status", server["status"], m["status"])
    if m.get("resp_payload") is not None:
        expect("client resp_payload", server["resp_payload"],
               m["resp_payload"])
    if "resp_wire" in m:
        expect("client resp_wire", server["resp_body_wire"], m["resp_wire"])
    if "req_wire" in m and case["te"] != "no":      # curl's size_upload
        expect("client req_wire", server["req_body_wire"], m["req_wire"])
    if "start" in m:      # the same CLOCK_MONOTONIC: server inside client
        if not m["start"] <= server["t_head"]:
            out.append(Mismatch(case["case"], run.client,
                                "client start <= server head", m["start"],
                                server["t_head"]))
        if not server["t_first"] <= m["end"]:
            out.append(Mismatch(case["case"], run.client,
                                "server first write <= client end",
                                server["t_first"], m["end"]))
    return out


def check_case(run, case, server, found, stats):
    """The tracer's record of one request against the server and client."""
    out = []

    def add(field, expected, got):
        out.append(Mismatch(case["case"], run.client, field, expected, got))

    if len(found) != 1:
        add("records", 1, len(found))
        if not found:
            return out
    r = found[0]
    for field, expected in (("method", server["method"]),
                            ("op", case["op"]),
                            ("status", server["status"]),
                            ("req_bytes", server["req_body_wire"]),
                            ("resp_bytes", server["resp_body_wire"]),
                            ("complete", True)):
        if r.get(field) != expected:
            add(field, expected, r.get(field))
    ttfb, lat = r.get("ttfb_ms"), r.get("latency_ms")
    if lat is None or ttfb is None:
        if lat is None:
            add("latency_ms", "a number", None)
        if ttfb is None:
            add("ttfb_ms", "a number", None)
        return out
    if ttfb > lat:
        add("ttfb_ms <= latency_ms", "<= %.3f" % lat, ttfb)
    injected = server["delay_ms"] + server["dribble_ms"]
    if lat < injected:
        add("latency_ms >= server delay", ">= %d" % injected, lat)
    # The server's clock: the request head arrived after the first byte
    # was written (t_head); the response's first and last bytes cannot be
    # read before the server began writing them (t_first, t_lastw).
    span = (server["t_lastw"] - server["t_head"]) / 1e6
    if lat < span - ROUNDING_MS:
        add("latency_ms >= server's span", ">= %.3f" % span, lat)
    if not server["interim"]:
        first = (server["t_first"] - server["t_head"]) / 1e6
        if ttfb < first - ROUNDING_MS:
            add("ttfb_ms >= server's first write", ">= %.3f" % first, ttfb)
    m = run.results.get(case["case"])
    if m is None or m.get("ms") is None:
        return out
    measured = m["ms"]
    precise = CLIENTS[run.client]["clock"] == "precise"
    if precise and run.client.startswith("curl") and \
            server["framing"] == "close":
        # curl's clock stops after the EOF and closing the connection.
        precise = False
        stats["curl close-delimited: upper bound only"] += 1
    if precise and m.get("concurrent"):
        # Go: another goroutine may run between a Read and the clock.
        precise = False
        stats["go goroutines at once: upper bound only"] += 1
    if precise and m.get("preempted"):
        # Preempted between a clock reading and the I/O it times: the
        # client's interval is stretched, only the upper bound holds.
        precise = False
        stats["client preempted: upper bound only"] += 1
    if precise:
        stats["precise: within 1 ms + 2 %"] += 1
        low = measured - (SLACK_MS + SLACK_FRACTION * measured)
        if not low <= lat <= measured + ABOVE_MS:
            add("latency_ms vs client" if lat > low else BELOW_CLIENT,
                "%.3f..%.3f (client %.3f)" % (
                    low, measured + ABOVE_MS, measured),
                "%s%s" % (lat, gaps(r, m, server)))
    elif lat > measured + ABOVE_MS:
        add("latency_ms vs client", "<= %.3f (client %s)" % (
            measured + ABOVE_MS, CLIENTS[run.client]["clock"]), lat)
    return out


# CLOCK_REALTIME - CLOCK_MONOTONIC, as the tracer's `ts` was made.
WALL_OFFSET_NS = time.time_ns() - time.monotonic_ns()


def gaps(record, measured, server):
    """Where the tracer's interval sits in the client's, for a diagnosis:
    ' (starts +a, ends -b ms; server wrote +c..+d)', relative to the
    client's start and end (the record's ts has microseconds) and, for the
    server's writes of the final response, to the client's start."""
    if "start" not in measured or not record.get("ts"):
        return ""
    import datetime
    wall = datetime.datetime.fromisoformat(
        record["ts"].replace("Z", "+00:00")).timestamp()
    start = wall * 1e9 - WALL_OFFSET_NS
    end = start + record["latency_ms"] * 1e6
    return " (starts %+.3f, ends %+.3f ms; server wrote %+.3f..%+.3f)" % (
        (start - measured["start"]) / 1e6, (end - measured["end"]) / 1e6,
        (server["t_first"] - measured["start"]) / 1e6,
        (server["t_last"] - measured["start"]) / 1e6)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def report(title, seed, bad, harness, runs, records, checked, path,
           rerun="", notes=()):
    """A readable failure message; the full table goes to `path`."""
    case_info = {c["case"]: (r, c) for r in runs for c in r.cases()}
    lines = ["%s: %d tracer mismatches, %d harness problems in %d cases "
             "(seed %s%s)" % (title, len(bad), len(harness), checked, seed,
                              rerun)] + list(notes)
    if harness:
        lines.append("HARNESS problems (the test itself is wrong):")
        lines += table(harness[:40], case_info)
        for m in harness:
            if m.field == "client run":
                lines.append("%s run: %s" % (m.client, m.got[-3000:]))
    if bad:
        groups = collections.OrderedDict()
        for m in sorted(bad, key=lambda m: (m.client, m.field)):
            groups.setdefault((m.client, m.field), []).append(m)
        lines.append("tracer mismatches by client and field "
                     "(sizes: the responses' recipe sizes):")
        lines.append("  %-11s %-28s %6s  %s" % ("client", "field", "count",
                                               "sizes"))
        for (client, field), ms in groups.items():
            sizes = sorted({case_info[m.case][1]["recipe"]["s"]
                            for m in ms if m.case in case_info})
            lines.append("  %-11s %-28s %6d  %s" % (
                client, field, len(ms), size_ranges(sizes)))
        lines.append("first mismatches:")
        lines += table(bad[:60], case_info)
        examples = collections.OrderedDict()
        for m in bad:
            kind = (m.client, m.field)
            if kind not in examples and m.case in case_info:
                run, case = case_info[m.case]
                found = records.get((run.pid, m.case))
                if found:
                    examples[kind] = found[0]
        lines.append("one tracer record per kind of mismatch:")
        for (client, field), record in list(examples.items())[:20]:
            lines.append("  %s %s: %s" % (client, field, json.dumps(record)))
    with open(path, "w") as f:
        f.write("\n".join(lines[:1] + table(harness + bad, case_info)) + "\n")
    lines.append("full table: %s" % path)
    return "\n".join(lines)


def table(mismatches, case_info):
    out = ["  %-8s %-11s %-28s %-24s %-24s %s" % (
        "case", "client", "field", "expected", "got", "request")]
    for m in mismatches:
        request = ""
        if m.case in case_info:
            c = case_info[m.case][1]
            request = "%s %s" % (c["method"], c["target"])
            if c["te"] != "no":
                request += " body=%d/%s%s" % (c["body"], c["te"],
                                              " expect" if c["expect"]
                                              else "")
        out.append("  %-8s %-11s %-28s %-24s %-24s %s" % (
            m.case, m.client, m.field, str(m.expected)[:60],
            str(m.got)[:60], request))
    return out


def size_ranges(sizes):
    """[1, 2, 3, 7] -> '1..3, 7' (at most 12 ranges shown)."""
    if not sizes:
        return "-"
    ranges = []
    start = prev = sizes[0]
    for s in sizes[1:]:
        if s != prev + 1:
            ranges.append((start, prev))
            start = s
        prev = s
    ranges.append((start, prev))
    text = ", ".join(str(a) if a == b else "%d..%d" % (a, b)
                     for a, b in ranges[:12])
    if len(ranges) > 12:
        text += ", ... (%d sizes, %d..%d)" % (len(sizes), sizes[0],
                                               sizes[-1])
    return text


# ---------------------------------------------------------------------------
# Exit tables and metrics
# ---------------------------------------------------------------------------

def expected_counts(log_entries):
    """{(host, 'op'|'method', name): count} from the server's log."""
    counts = collections.Counter()
    for e in log_entries:
        if e["case"] is None:
            continue
        counts[(e["host"], "op", expected_op(e["method"], e["path"]))] += 1
        counts[(e["host"], "method", e["method"])] += 1
    return counts


def exit_table_counts(stderr, hosts):
    """Counts in the tracer's exit tables (after the last 'since start')."""
    text = stderr.rsplit("since start ---", 1)[-1]
    counts = collections.Counter()
    group = kind = None
    for line in text.splitlines():
        if not line.strip():              # a table ends with an empty line
            kind = group = None
            continue
        if line.startswith("=== "):
            title = line.strip("= ")
            kind, group = None, None
            for prefix, k in (("Statistics for ", "method"),
                              ("S3 operations for ", "op")):
                if title.startswith(prefix):
                    kind, group = k, title[len(prefix):]
            continue
        parts = line.split()
        if kind and group in hosts and len(parts) >= 7 and \
                parts[0] not in ("Method", "Operation"):
            counts[(group, kind, parts[0])] += int(parts[1])
    return counts


def metric_counts(text, hosts):
    """s3slower_requests_total summed by (host, 'op'|'method', name)."""
    counts = collections.Counter()
    for line in text.splitlines():
        if not line.startswith("s3slower_requests_total{"):
            continue
        labels, value = line[len("s3slower_requests_total{"):].rsplit("} ", 1)
        fields = dict(part.split("=", 1) for part in
                      labels.replace('",', '"\x00').split("\x00"))
        fields = {k: v.strip('"') for k, v in fields.items()}
        if fields.get("host") in hosts:
            n = int(float(value))
            counts[(fields["host"], "op", fields["op"])] += n
            counts[(fields["host"], "method", fields["method"])] += n
    return counts


# ---------------------------------------------------------------------------
# Server process
# ---------------------------------------------------------------------------

class MatrixServer:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="s3slower-matrix")
        self.log = os.path.join(self.dir, "server.log")
        self.proc = subprocess.Popen(
            [PYTHON, os.path.join(TESTS, "matrixserver.py"), "--log",
             self.log], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, text=True, cwd=self.dir)
        line = self.proc.stdout.readline()
        assert line.startswith("READY"), "matrix server did not start: %r" \
            % line
        self.tls_port, self.plain_port = map(int, line.split()[1:3])
        self.hosts = {"127.0.0.1:%d" % self.tls_port,
                      "127.0.0.1:%d" % self.plain_port}

    def entries(self):
        return read_log(self.log) if os.path.exists(self.log) else []

    def stop(self):
        stop_process(self.proc, signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)
