#!/usr/bin/env python3
"""Long-run benchmark: memory and BPF maps stay flat.

Runs ./s3slower.py --json (to /dev/null) while driving, in phases, keep-alive
GETs against a local nginx plus many short-lived curl processes (one request
each, a new process and connection every time). After each phase it samples
the tracer's RSS and the number of entries in each of its BPF maps (with
bpftool), and prints one line per phase.

usage: bench/longrun.py [--requests 1000000] [--phases 10] [--processes 2000]
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from nginxserver import NginxServer  # noqa: E402

MAPS = ("calls", "conns", "ctls", "procs")


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def map_entries(pid):
    """Entries per BPF map the process holds, by map name."""
    ids = {}
    out = subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True,
                         text=True).stdout
    for m in json.loads(out or "[]"):
        if m.get("name") in MAPS and pid in m.get("pids", [{}])[0].values() \
                if m.get("pids") else m.get("name") in MAPS:
            ids[m["name"]] = m["id"]
    counts = {}
    for name, map_id in ids.items():
        dump = subprocess.run(["bpftool", "-j", "map", "dump", "id",
                               str(map_id)], capture_output=True, text=True)
        try:
            counts[name] = len(json.loads(dump.stdout or "[]"))
        except ValueError:
            counts[name] = None
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000000)
    parser.add_argument("--phases", type=int, default=10)
    parser.add_argument("--processes", type=int, default=2000)
    args = parser.parse_args()
    server = NginxServer()
    err = tempfile.NamedTemporaryFile(delete=False)
    tracer = subprocess.Popen([os.path.join(ROOT, "s3slower.py"), "--json"],
                              stdout=subprocess.DEVNULL, stderr=err)
    try:
        while "Tracing" not in open(err.name).read():
            time.sleep(0.1)
        print("%-6s %10s %9s %8s %s" % ("phase", "requests", "seconds",
                                        "rss_kib", "map entries"))
        print("%-6s %10d %9s %8d %s" % ("start", 0, "-", rss_kib(tracer.pid),
                                        map_entries(tracer.pid)))
        per_phase = args.requests // args.phases
        procs_per_phase = args.processes // args.phases
        done, started = 0, time.monotonic()
        for phase in range(1, args.phases + 1):
            half = per_phase // 2
            # Two keep-alive curls at once, then short-lived processes.
            loads = [subprocess.Popen(["curl", "-sk", "-o", "/dev/null",
                                       server.url + "/small?[1-%d]" % half])
                     for _ in range(2)]
            for proc in loads:
                proc.wait()
            for _ in range(procs_per_phase):
                subprocess.run(["curl", "-sk", "-o", "/dev/null",
                                server.url + "/small"])
            done += 2 * half + procs_per_phase
            time.sleep(1)
            print("%-6d %10d %9.0f %8d %s" % (
                phase, done, time.monotonic() - started, rss_kib(tracer.pid),
                map_entries(tracer.pid)), flush=True)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(60)
        server.stop()
        summary = [l for l in open(err.name) if l.startswith("s3slower:")]
        print("".join(summary[-2:]), end="")
        os.unlink(err.name)


if __name__ == "__main__":
    main()
