#!/usr/bin/env python3
"""New programs: how soon s3slower traces a program it has never seen, and
what watching every exec costs (issue #15).

(a) exec -> attached: --programs never-seen programs, copies of the Go
    client and of the static OpenSSL client (tests/clients) at fresh /tmp
    paths, alternating, each run once (one PUT to tests/s3server.py), one
    at a time, --pause s apart. The figure is the tracer's own: the "ms
    after exec" of its "s3slower: new: ..." line (kernel exec timestamp to
    probes attached). Median, p90, p99 (with 50 programs, p99 is about the
    maximum), and how many of those first runs were reported anyway.
(b) cost: --idle idle processes (sleep 600) on the host, then an exec storm
    of --rate execs/s of /bin/true for --seconds s from a paced posix_spawn
    launcher (compiled here). Measured: one rescan pass (what
    --rescan-interval runs, s3slower's own code run in this process), CPU
    per pass with and without the idle processes; the tracer's CPU
    (utime+stime, /proc/PID/stat) as % of one core idle and during the
    storm (their difference: the storm's share); with
    kernel.bpf_stats_enabled on during the storm (restored after), the run
    time of the tracer's exec/exit hooks, which run in the exec'ing
    processes and are billed to them; the storm's own CPU (launcher +
    children, getrusage) with the tracer and without it (before and after,
    averaged). "Beyond the storm" = the storm's share in the tracer + the
    hooks; target < 1 % of one core. The tracer traces the whole host:
    other traffic during a window is counted and printed.
(c) start-up to "Tracing" with a warm scan cache (after one warm-up
    start): median of --starts.

CPU figures on a shared or small machine are noisy (other load is billed
to nobody here but moves wall time and cache behaviour): the load average
is printed with them.

usage: bench/new_programs.py [--programs 50] [--idle 2000] [--rate 1000]
           [--seconds 20] [--starts 3] [--plain] [--no-bpf-stats]
           [--json FILE]
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tax import probes_released  # noqa: E402
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")
TOOL = os.path.join(ROOT, "s3slower.py")
PYTHON = "/usr/bin/python3"
TICK = os.sysconf("SC_CLK_TCK")
BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"

STORM_C = r"""
/* storm RATE SECONDS PROGRAM: posix_spawn PROGRAM RATE times a second
 * (absolute deadlines, no drift) for SECONDS s, reaping as it goes.
 * Prints: spawned failed wall_s self_cpu_s children_cpu_s */
#define _GNU_SOURCE
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>

extern char **environ;

static double cpu(int who)
{
    struct rusage ru;
    getrusage(who, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    double rate = atof(argv[1]), seconds = atof(argv[2]);
    char *args[] = {argv[3], NULL};
    long total = (long)(rate * seconds), spawned = 0, failed = 0, running = 0;
    long long period = (long long)(1e9 / rate);
    struct timespec t0, due, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long long start = t0.tv_sec * 1000000000LL + t0.tv_nsec;
    for (long i = 0; i < total; i++) {
        long long at = start + i * period;
        due.tv_sec = at / 1000000000LL;
        due.tv_nsec = at % 1000000000LL;
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &due, NULL);
        pid_t pid;
        if (posix_spawn(&pid, argv[3], NULL, NULL, args, environ) == 0) {
            spawned++;
            running++;
        } else {
            failed++;
        }
        while (running && waitpid(-1, NULL, WNOHANG) > 0)
            running--;
    }
    while (running && waitpid(-1, NULL, 0) > 0)
        running--;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%ld %ld %.3f %.3f %.3f\n", spawned, failed,
           (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9,
           cpu(RUSAGE_SELF), cpu(RUSAGE_CHILDREN));
    return 0;
}
"""


def log(text):
    print("new_programs: " + text, file=sys.stderr, flush=True)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


class Tracer:
    """s3slower --json, output and stderr in files."""

    def __init__(self, args=(), workdir=None):
        # An earlier tracer's probes still being released would slow the
        # start and every attach (uprobe changes take the same kernel lock).
        probes_released()
        self.out = tempfile.NamedTemporaryFile(
            prefix="np-bench", suffix=".out", dir=workdir, delete=False)
        self.err = tempfile.NamedTemporaryFile(
            prefix="np-bench", suffix=".err", dir=workdir, delete=False)
        started = time.monotonic()
        self.proc = subprocess.Popen([PYTHON, TOOL, "--json"] + list(args),
                                     stdout=self.out, stderr=self.err,
                                     stdin=subprocess.DEVNULL)
        while "\nTracing" not in "\n" + self.stderr():
            if self.proc.poll() is not None or \
                    time.monotonic() - started > 120:
                self.stop()
                raise SystemExit("new_programs: the tracer did not start:\n" +
                                 self.stderr()[-2000:])
            time.sleep(0.02)
        self.startup = time.monotonic() - started
        m = re.search(r"looked inside (\d+) files .* in ([\d.]+) s",
                      self.stderr())
        self.scanned = (int(m.group(1)), float(m.group(2))) if m else None

    def stderr(self):
        with open(self.err.name, errors="replace") as f:
            return f.read()

    def records(self):
        found = []
        with open(self.out.name, errors="replace") as f:
            for line in f:
                try:
                    found.append(json.loads(line))
                except ValueError:
                    pass
        return found

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.out, self.err):
            f.close()


def build(work):
    """The static OpenSSL client, the Go client and the storm launcher."""
    paths = {"static": os.path.join(work, "tls-static"),
             "go": os.path.join(work, "goclient"),
             "storm": os.path.join(work, "storm")}
    subprocess.run(["cc", "-O1", os.path.join(TESTS, "clients", "tlsclient.c"),
                    "-o", paths["static"], "-Wl,-Bstatic", "-lssl", "-lcrypto",
                    "-Wl,-Bdynamic"], check=True)
    storm_c = os.path.join(work, "storm.c")
    with open(storm_c, "w") as f:
        f.write(STORM_C)
    subprocess.run(["cc", "-O2", storm_c, "-o", paths["storm"]], check=True)
    env = dict(os.environ, GOPATH=os.path.join(work, "gopath"),
               GO111MODULE="off", CGO_ENABLED="0", GOFLAGS="",
               GOCACHE=os.environ.get("GOCACHE") or
               "/var/tmp/s3slower-test-gocache")
    subprocess.run(["go", "build", "-o", paths["go"],
                    os.path.join(TESTS, "clients", "goclient", "main.go")],
                   env=env, check=True)
    return paths


class Server:
    def __init__(self, workdir):
        self.proc = subprocess.Popen(
            [PYTHON, os.path.join(TESTS, "s3server.py"), "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            cwd=workdir)
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            raise SystemExit("new_programs: s3server did not start: %r" % line)
        self.port = int(line.split()[1])
        self.url = "https://127.0.0.1:%d" % self.port
        subprocess.run(["curl", "-skf", "-X", "PUT", self.url + "/bench"],
                       check=True)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(15)


# --- (c) start-up ------------------------------------------------------------

def startup(args, work):
    log("start-up: one warm-up start, then %d measured" % args.starts)
    runs = []
    for i in range(args.starts + 1):
        tracer = Tracer(args.tracer_args, work)
        tracer.stop()
        if i:
            runs.append((tracer.startup, tracer.scanned))
    return dict(median_s=statistics.median(r[0] for r in runs),
                runs_s=[round(r[0], 2) for r in runs],
                scanned=runs[-1][1])


# --- (a) exec -> attached ---------------------------------------------------

# With ", N ms after exec" when the exec made the tracer look; without when
# a rescan (every --rescan-interval s) found the program running first.
NEW_LINE = re.compile(r"^s3slower: new: (?:go|openssl built into) (\S+) "
                      r"\(.*?(?:, ([\d.]+) ms after (?:exec|mmap))?\)$", re.M)


def exec_to_attached(args, bins, work):
    server = Server(work)
    tracer = Tracer(args.tracer_args, work)
    log("exec -> attached: %d never-seen programs, %.1f s apart" % (
        args.programs, args.pause))
    runs = []      # (kind, path, pid)
    try:
        for i in range(args.programs):
            kind = ("go", "static")[i % 2]
            directory = tempfile.mkdtemp(prefix="np-%d-" % i, dir="/tmp")
            path = os.path.join(directory, os.path.basename(bins[kind]))
            shutil.copy2(bins[kind], path)
            target = server.url if kind == "go" else str(server.port)
            proc = subprocess.run([path, target, "PUT", "/bench/p%d" % i],
                                  capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                log("program %d failed: %s" % (i, proc.stderr.strip()))
            runs.append((kind, path, directory))
            time.sleep(args.pause)
        deadline = time.monotonic() + 10
        while True:
            text = tracer.stderr()
            found = {m.group(1): float(m.group(2)) if m.group(2) else None
                     for m in NEW_LINE.finditer(text)}
            if all(path in found for _k, path, _d in runs) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for _kind, path, _d in runs:
            if path not in found:
                log("never attached: %s; its lines: %s" % (path, [
                    line for line in text.splitlines() if path in line]))
        reported = {r["path"] for r in tracer.records()
                    if (r.get("host") or "").endswith(":%d" % server.port)}
    finally:
        tracer.stop()
        server.stop()
        for _kind, _path, directory in runs:
            shutil.rmtree(directory, ignore_errors=True)
    result = {}
    for kind in ("go", "static", "all"):
        mine = [(i, path) for i, (k, path, _d) in enumerate(runs)
                if kind in ("all", k)]
        ms = [found[path] for _i, path in mine
              if found.get(path) is not None]
        result[kind] = dict(
            programs=len(mine), attached=len(ms),
            by_rescan=sum(path in found and found[path] is None
                          for _i, path in mine),
            median_ms=statistics.median(ms) if ms else None,
            p90_ms=percentile(ms, 90) if ms else None,
            p99_ms=percentile(ms, 99) if ms else None,
            max_ms=max(ms) if ms else None,
            first_run_reported=sum("/bench/p%d" % i in reported
                                   for i, _p in mine))
    return result


# --- (b) cost ----------------------------------------------------------------

def storm(bins, rate, seconds):
    out = subprocess.run([bins["storm"], str(rate), str(seconds), "/bin/true"],
                         capture_output=True, text=True, check=True).stdout
    spawned, failed, wall, own, children = out.split()
    return dict(spawned=int(spawned), failed=int(failed), wall=float(wall),
                cpu=float(own) + float(children))


@contextlib.contextmanager
def bpf_stats(on=True):
    """The kernel's BPF run-time statistics on for the block (as they
    were after it): tracer_bpf_programs() then counts runs."""
    if not on:
        yield
        return
    with open(BPF_STATS) as f:
        was = f.read().strip()
    with open(BPF_STATS, "w") as f:
        f.write("1")
    try:
        yield
    finally:
        with open(BPF_STATS, "w") as f:
            f.write(was)


def tracer_bpf_programs(pid):
    """{prog_id: (run_time_ns, run_cnt)} of the BPF programs process pid
    holds open (/proc/PID/fdinfo; counted while bpf_stats_enabled)."""
    progs = {}
    directory = "/proc/%d/fdinfo" % pid
    for fd in os.listdir(directory):
        try:
            with open(os.path.join(directory, fd)) as f:
                info = dict(line.split(":", 1) for line in f
                            if ":" in line)
        except OSError:
            continue
        if "prog_id" in info:
            progs[int(info["prog_id"])] = (int(info.get("run_time_ns", 0)),
                                           int(info.get("run_cnt", 0)))
    return progs


def bpf_names(ids):
    """{prog_id: name} from bpftool, where it is installed."""
    try:
        progs = json.loads(subprocess.run(
            ["bpftool", "-j", "prog", "show"], capture_output=True,
            text=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return {}
    return {p["id"]: p.get("name", "") for p in progs if p["id"] in ids}


def bpf_delta(before, after, names, match):
    """(run time ns, runs) between two snapshots, for programs whose name
    passes match (all when names is empty and match is None)."""
    ns = runs = 0
    for prog, (t, n) in after.items():
        if match and not match(names.get(prog, "")):
            continue
        t0, n0 = before.get(prog, (0, 0))
        ns, runs = ns + t - t0, runs + n - n0
    return ns, runs


def rescan_cost(passes=3):
    """CPU of one rescan pass (what --rescan-interval runs), measured in
    this process with s3slower's own code, as the tracer calls it: median
    of passes after one that fills the known and examined sets."""
    sys.path.insert(0, ROOT)
    import s3slower
    families = list(s3slower.FAMILIES)
    known, examined = set(), set()

    def rescan():
        s3slower.discover_libraries(families, [], None, known,
                                    loader_cache=False, examined=examined)
    rescan()
    cpu, wall = [], []
    for _ in range(passes):
        c0, w0 = time.process_time(), time.monotonic()
        rescan()
        cpu.append(time.process_time() - c0)
        wall.append(time.monotonic() - w0)
    return dict(processes=sum(1 for d in os.listdir("/proc") if d.isdigit()),
                cpu_s=statistics.median(cpu), wall_s=statistics.median(wall))


def window(tracer, seconds, action=None):
    """The tracer's CPU (% of one core) and records over a window, during
    action() or a sleep."""
    lines0 = len(tracer.records())
    cpu0, t0 = tracer.cpu(), time.monotonic()
    result = action() if action else time.sleep(seconds)
    wall = time.monotonic() - t0
    return (100 * (tracer.cpu() - cpu0) / wall,
            len(tracer.records()) - lines0, result)


def cost(args, bins, work):
    sleepers = []
    result = {}
    try:
        result["rescan_before"] = rescan_cost()
        log("cost: %d idle processes" % args.idle)
        for _ in range(args.idle):
            sleepers.append(subprocess.Popen(
                ["sleep", "600"], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        result["rescan"] = rescan_cost()
        log("storm without the tracer: %d execs/s for %g s" % (
            args.rate, args.seconds))
        before = storm(bins, args.rate, args.seconds)
        tracer = Tracer(args.tracer_args, work)
        try:
            time.sleep(2)
            log("tracer idle for %g s" % args.seconds)
            idle_pct, idle_records, _ = window(tracer, args.seconds)
            log("storm with the tracer")
            counted = args.bpf_stats and os.path.exists(BPF_STATS)
            with bpf_stats(counted):
                progs0 = tracer_bpf_programs(tracer.proc.pid)
                load0 = loadavg()
                storm_pct, storm_records, during = window(
                    tracer, args.seconds,
                    lambda: storm(bins, args.rate, args.seconds))
                progs1 = tracer_bpf_programs(tracer.proc.pid)
            hooks = all_bpf = (None, None)
            if counted:
                names = bpf_names(set(progs1))
                all_bpf = bpf_delta(progs0, progs1, names, None)
                if names:
                    hooks = bpf_delta(progs0, progs1, names, lambda n: (
                        "sched_process_exec" in n or
                        "sched_process_exit" in n))
            new_lines = tracer.stderr().count("s3slower: new:")
        finally:
            tracer.stop()
        log("storm without the tracer, again")
        after = storm(bins, args.rate, args.seconds)
    finally:
        for proc in sleepers:
            proc.kill()
        for proc in sleepers:
            proc.wait()

    def pct(ns):
        return None if ns is None else 100 * ns / 1e9 / during["wall"]

    marginal = storm_pct - idle_pct
    result.update(
        idle_processes=args.idle, rate=args.rate, seconds=args.seconds,
        tracer_idle_pct=idle_pct, idle_records=idle_records,
        tracer_storm_pct=storm_pct, storm_records=storm_records,
        tracer_marginal_pct=marginal,
        hooks_pct=pct(hooks[0]), hooks_runs=hooks[1],
        hooks_ns_per_run=hooks[0] / hooks[1] if hooks[1] else None,
        all_bpf_pct=pct(all_bpf[0]),
        beyond_storm_pct=max(marginal, 0) + (pct(hooks[0]) or 0.0),
        storm_pct_without=100 * (before["cpu"] / before["wall"] +
                                 after["cpu"] / after["wall"]) / 2,
        storm_pct_with=100 * during["cpu"] / during["wall"],
        execs_per_s=during["spawned"] / during["wall"],
        failed=during["failed"] + before["failed"] + after["failed"],
        load_during=load0, new_lines=new_lines)
    return result


def fmt(value, spec="%.1f"):
    return "-" if value is None else spec % value


def report(res, args):
    print()
    print("s3slower: programs started after the tracer "
          "(bench/new_programs.py)")
    print("host: %d CPUs, load average now %s%s" % (
        os.cpu_count(), loadavg(), "; tracer options: " +
        " ".join(args.tracer_args) if args.tracer_args else ""))
    if "exec" in res:
        print()
        print("(a) exec -> probes attached, never-seen programs at new /tmp "
              "paths, each run once")
        print("%-8s %5s %8s %9s %9s %8s %8s %8s %14s" % (
            "program", "runs", "at_exec", "by_rescan", "median_ms", "p90_ms",
            "p99_ms", "max_ms", "run1_reported"))
        for kind in ("go", "static", "all"):
            r = res["exec"][kind]
            print("%-8s %5d %8d %9d %9s %8s %8s %8s %14s" % (
                kind, r["programs"], r["attached"], r["by_rescan"],
                fmt(r["median_ms"]),
                fmt(r["p90_ms"]), fmt(r["p99_ms"]), fmt(r["max_ms"]),
                "%d/%d" % (r["first_run_reported"], r["programs"])))
    if "cost" in res:
        c = res["cost"]
        r0, r1 = c["rescan_before"], c["rescan"]
        print()
        print("(b) cost, %% of one core: %d idle processes; storm of %d "
              "execs/s (%.0f achieved) of /bin/true for %g s; load %s" % (
                  c["idle_processes"], c["rate"], c["execs_per_s"],
                  c["seconds"], c["load_during"]))
        # Rescans every 10 s (default) look at new processes; every
        # FULL_RESCAN_HOOKED-th (the kernel reports mmaps here) looks at
        # all: that full pass is what costs.
        sys.path.insert(0, ROOT)
        import s3slower
        full = 10 * s3slower.FULL_RESCAN_HOOKED
        rows = [
            ("full rescan every %d s, %d processes: %.0f ms CPU" % (
                full, r0["processes"], 1000 * r0["cpu_s"]), "%.2f" % (
                r0["cpu_s"] * 100 / full)),
            ("full rescan every %d s, %d processes: %.0f ms CPU" % (
                full, r1["processes"], 1000 * r1["cpu_s"]), "%.2f" % (
                r1["cpu_s"] * 100 / full)),
            ("  (one pass blocks the event loop for %.0f ms wall)" % (
                1000 * r1["wall_s"]), ""),
            ("tracer process, idle (%d requests of other traffic)" %
             c["idle_records"], fmt(c["tracer_idle_pct"], "%.2f")),
            ("tracer process, during the storm (%d requests)" %
             c["storm_records"], fmt(c["tracer_storm_pct"], "%.2f")),
            ("  storm's share in the tracer process (difference)",
             fmt(c["tracer_marginal_pct"], "%.2f")),
            ("exec/exit BPF hooks, all the host's execs (billed to them)",
             fmt(c["hooks_pct"], "%.2f") +
             ("  (%.0f ns x %d runs)" % (c["hooks_ns_per_run"],
                                         c["hooks_runs"])
              if c["hooks_ns_per_run"] else "")),
            ("all the tracer's BPF programs during the storm",
             fmt(c["all_bpf_pct"], "%.2f")),
            ("beyond the storm: share + hooks (target < 1)",
             fmt(c["beyond_storm_pct"], "%.2f")),
            ("the storm itself, without the tracer (mean of before/after)",
             fmt(c["storm_pct_without"], "%.1f")),
            ("the storm itself, with the tracer",
             fmt(c["storm_pct_with"], "%.1f")),
        ]
        for label, value in rows:
            print("  %-66s %s" % (label, value))
        if c["failed"]:
            print("  spawns failed: %d" % c["failed"])
    if "startup" in res:
        s = res["startup"]
        print()
        print("(c) start-up to 'Tracing', warm scan cache: median %.2f s of "
              "%s%s" % (s["median_s"], s["runs_s"],
                        "; looked inside %d files in %.2f s" % s["scanned"]
                        if s["scanned"] else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--programs", type=int, default=50)
    parser.add_argument("--pause", type=float, default=0.3,
                        help="seconds between never-seen programs (0.3)")
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--plain", action="store_true",
                        help="run the tracer with --plain")
    parser.add_argument("--no-bpf-stats", dest="bpf_stats",
                        action="store_false",
                        help="leave kernel.bpf_stats_enabled alone")
    parser.add_argument("--only", choices=("exec", "cost", "startup"),
                        action="append", help="run only this part "
                        "(repeatable)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/new_programs.py: error: must run as root")
    args.tracer_args = ["--plain"] if args.plain else []
    parts = args.only or ["startup", "exec", "cost"]
    work = tempfile.mkdtemp(prefix="s3slower-np-bench")
    res = {}
    try:
        bins = build(work)
        if "startup" in parts:
            res["startup"] = startup(args, work)
        if "exec" in parts:
            res["exec"] = exec_to_attached(args, bins, work)
        if "cost" in parts:
            res["cost"] = cost(args, bins, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    report(res, args)


if __name__ == "__main__":
    main()
