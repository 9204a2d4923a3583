#!/usr/bin/env python3
"""Overhead benchmark: what each tracer adds to HTTPS requests on this host.

Conditions, alternated in every round over the same loads:
  none       no tracer
  floor      bench/floor.py: s3slower's probes with count-only handlers
  s3slower   ./s3slower.py (text to /dev/null)
  s3-json    ./s3slower.py --json --prometheus-port P (to /dev/null)
  sslsniff   BCC's sslsniff, when installed (bpfcc-tools), as a peer
Loads against the distribution's nginx on 127.0.0.1 (TLS, keep-alive):
  curl-small   one curl, N keep-alive GETs of 3 bytes
  py-small     Python http.client, N keep-alive GETs (the SSL_*_ex path)
  curl-1m      one curl, N/20 keep-alive GETs of 1 MiB
  curl-conn    one curl, N/10 GETs each on a new TLS connection
  py-4x8       4 Python processes x 8 keep-alive connections each, N GETs
               as fast as they go: the rate with no lost events is the
               highest loss-free rate this load generator reaches
Prints medians over the rounds: requests/s, µs added per request over no
tracer, that as a ratio to the floor's, the tracer's CPU per request, the
time its BPF programs ran per request (kernel.bpf_stats_enabled: the work
they add to the traced client, a figure without the wall clock's noise),
lost events, and time from launch to "Tracing".

usage: bench/overhead.py [--rounds 3] [--requests 6000] [--json FILE]
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from nginxserver import NginxServer, free_port  # noqa: E402

PYTHON = "/usr/bin/python3"
SSLSNIFF = next((p for p in ("/usr/sbin/sslsniff-bpfcc",
                             "/usr/share/bcc/tools/sslsniff")
                 if os.path.exists(p)), None)
PY_LOAD = r"""
import http.client, ssl, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPSConnection("127.0.0.1", port,
                                context=ssl._create_unverified_context())
for _ in range(n):
    c.request("GET", "/small")
    c.getresponse().read()
"""
# As fast as this machine's load generator goes: PROCS processes, each
# taking CONNS keep-alive connections in turn (N requests in all).
PY_MANY = r"""
import http.client, os, ssl, sys
port, n, procs, conns = (int(a) for a in sys.argv[1:5])
ctx = ssl._create_unverified_context()
children = []
for p in range(procs):
    pid = os.fork()
    if pid == 0:
        cs = [http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
              for _ in range(conns)]
        for i in range(n // procs):
            c = cs[i % conns]
            c.request("GET", "/small")
            c.getresponse().read()
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
"""


def conditions():
    tool = os.path.join(ROOT, "s3slower.py")
    conds = [("none", None), ("floor", [PYTHON, os.path.join(HERE,
                                                             "floor.py")]),
             ("s3slower", [tool]),
             ("s3-json", [tool, "--json", "--prometheus-port",
                          str(free_port())])]
    if SSLSNIFF:
        conds.append(("sslsniff", [SSLSNIFF]))
    return conds


def loads(server, n):
    url = server.url
    return [
        ("curl-small", n, ["curl", "-sk", "-o", "/dev/null",
                           url + "/small?[1-%d]" % n]),
        ("py-small", n, [PYTHON, "-c", PY_LOAD, str(server.port), str(n)]),
        ("curl-1m", n // 20, ["curl", "-sk", "-o", "/dev/null",
                              url + "/1m?[1-%d]" % (n // 20)]),
        ("curl-conn", n // 10, ["curl", "-sk", "-o", "/dev/null", "-H",
                                "Connection: close",
                                url + "/small?[1-%d]" % (n // 10)]),
        ("py-4x8", n // 4 * 4, [PYTHON, "-c", PY_MANY, str(server.port),
                                str(n // 4 * 4), "4", "8"]),
    ]


def cpu_seconds(pid):
    """CPU time of a process and its children that were waited for."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:13]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def bpf_run_ns(pid):
    """Nanoseconds the BPF programs a process holds have run (tail-called
    programs count in their caller's), from their descriptors' fdinfo."""
    total = 0
    try:
        fds = os.listdir("/proc/%d/fdinfo" % pid)
    except OSError:
        return 0
    for fd in fds:
        try:
            with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
                info = f.read()
        except OSError:
            continue
        match = re.search(r"^run_time_ns:\s*(\d+)", info, re.M)
        if match and "prog_type" in info:
            total += int(match.group(1))
    return total


class BpfStats:
    """kernel.bpf_stats_enabled on for the benchmark, as it was after."""

    PATH = "/proc/sys/kernel/bpf_stats_enabled"

    def __enter__(self):
        with open(self.PATH) as f:
            self.was = f.read().strip()
        with open(self.PATH, "w") as f:
            f.write("1")

    def __exit__(self, *exc):
        with open(self.PATH, "w") as f:
            f.write(self.was)


class TracerFailed(Exception):
    pass


def last_error(text):
    errors = [l for l in text.splitlines() if "error" in l.lower()]
    return (errors or text.splitlines() or ["?"])[0].strip()


class Running:
    """A tracer started for one condition, stopped at the end."""

    def __init__(self, argv):
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.NamedTemporaryFile(delete=False)
        started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=self.err,
                                     stdin=subprocess.DEVNULL)
        self.startup = None
        while time.monotonic() - started < 120:
            text = open(self.err.name, errors="replace").read()
            ready = ("Tracing" in text or
                     (argv[0] == SSLSNIFF and self._out_started()))
            if ready:
                self.startup = time.monotonic() - started
                break
            if self.proc.poll() is not None:
                raise TracerFailed("%s did not start: %s" % (
                    os.path.basename(argv[0]), last_error(text)))
            time.sleep(0.05)
        time.sleep(0.5)

    def _out_started(self):
        self.out.seek(0)
        return bool(self.out.read(1))

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        err = open(self.err.name, errors="replace").read()
        os.unlink(self.err.name)
        m = re.search(r"; (\d+) lost events", err)
        return int(m.group(1)) if m else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--json", metavar="FILE",
                        help="also write the raw measurements here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/overhead.py: error: must run as root")
    server = NginxServer()
    results = []      # dicts: round, condition, load, n, seconds, cpu, ...
    broken = set()    # conditions whose tracer cannot run on this host
    with BpfStats():
        run(args, server, results, broken)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    report(results)


def run(args, server, results, broken):
    try:
        for rnd in range(args.rounds):
            conds = [c for c in conditions() if c[0] not in broken]
            # A/B/A/B: the order turns every round so no condition always
            # runs on a warmer (or noisier) machine.
            conds = conds[rnd % len(conds):] + conds[:rnd % len(conds)]
            for name, argv in conds:
                try:
                    tracer = Running(argv) if argv else None
                except TracerFailed as exc:
                    print("%s: left out: %s" % (name, exc), file=sys.stderr)
                    broken.add(name)
                    continue
                for load, n, cmd in loads(server, args.requests):
                    pid = tracer.proc.pid if tracer else None
                    before = cpu_seconds(pid) if tracer else 0
                    bpf_before = bpf_run_ns(pid) if tracer else 0
                    started = time.monotonic()
                    subprocess.run(cmd, check=True)
                    seconds = time.monotonic() - started
                    time.sleep(0.3)    # let the tracer drain its buffer
                    cpu = cpu_seconds(pid) - before if tracer else 0
                    bpf = bpf_run_ns(pid) - bpf_before if tracer else 0
                    results.append(dict(round=rnd, condition=name, load=load,
                                        n=n, seconds=seconds, cpu=cpu, bpf=bpf,
                                        startup=tracer.startup if tracer
                                        else None))
                lost = tracer.stop() if tracer else None
                for r in results:
                    if r["round"] == rnd and r["condition"] == name:
                        r["lost"] = lost
                print("round %d %-9s done" % (rnd + 1, name), file=sys.stderr)
    finally:
        server.stop()


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def report(results):
    names = []
    for r in results:
        if r["condition"] not in names:
            names.append(r["condition"])
    for load in dict.fromkeys(r["load"] for r in results):
        rows = [r for r in results if r["load"] == load]

        def per_request_us(cond):
            """Median over rounds of (time with cond - time with none)/n,
            paired within each round."""
            added = []
            for rnd in {r["round"] for r in rows}:
                base = [r for r in rows if r["round"] == rnd and
                        r["condition"] == "none"]
                this = [r for r in rows if r["round"] == rnd and
                        r["condition"] == cond]
                if base and this:
                    added.append((this[0]["seconds"] - base[0]["seconds"]) /
                                 this[0]["n"] * 1e6)
            return median(added)
        floor = per_request_us("floor")
        print("\n%s (%d requests a run, medians of %d rounds)" % (
            load, rows[0]["n"], len({r["round"] for r in rows})))
        print("%-10s %10s %12s %9s %11s %12s %11s %6s %9s" % (
            "condition", "req/s", "added_us/req", "x_floor", "tracer_cpu_s",
            "cpu_us/req", "bpf_us/req", "lost", "startup_s"))
        for cond in names:
            mine = [r for r in rows if r["condition"] == cond]
            rate = median([r["n"] / r["seconds"] for r in mine])
            added = per_request_us(cond) if cond != "none" else None
            ratio = added / floor if added is not None and floor and \
                cond not in ("none", "floor") else None
            cpu = median([r["cpu"] for r in mine]) if cond != "none" else None
            cpu_us = cpu / mine[0]["n"] * 1e6 if cpu is not None else None
            bpf = median([r.get("bpf") for r in mine]) \
                if cond != "none" else None
            bpf_us = bpf / mine[0]["n"] / 1e3 if bpf else None
            lost = median([r.get("lost") for r in mine])
            startup = median([r["startup"] for r in mine])

            def fmt(v, spec):
                return spec % v if v is not None else "-"
            print("%-10s %10s %12s %9s %11s %12s %11s %6s %9s" % (
                cond, fmt(rate, "%.0f"), fmt(added, "%.1f"),
                fmt(ratio, "%.2f"), fmt(cpu, "%.2f"), fmt(cpu_us, "%.1f"),
                fmt(bpf_us, "%.1f"), fmt(lost, "%d"), fmt(startup, "%.2f")))


if __name__ == "__main__":
    main()
