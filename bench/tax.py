#!/usr/bin/env python3
"""What the tracer costs processes that never make an HTTP request, and how
fast it starts and stops.

  syscall tax   dd if=/dev/zero of=/dev/null bs=1 count=N: ns per read or
                write syscall with no tracer, with ./s3slower.py (default:
                plain HTTP off) and with ./s3slower.py --plain
  start         launch to the "Tracing" line on stderr (default options, no
                earlier tracer still releasing probes): warm (ELF-scan cache
                and compiled BPF image from the last start), and once cold
                (the compiled image removed: BCC compiles the program)
  exit          SIGTERM to exit; and `s3slower.py | head -n 1` while
                requests flow: head's exit to the tracer's

Rounds alternate the conditions; medians are printed. Run as root:
    bench/tax.py [--rounds 5] [--count 1000000]
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(os.path.dirname(HERE), "s3slower.py")
PYTHON = "/usr/bin/python3"


def start_tracer(*args, stdout=subprocess.DEVNULL):
    """(process, seconds to the Tracing line)."""
    started = time.monotonic()
    proc = subprocess.Popen([PYTHON, TOOL] + list(args), stdout=stdout,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    for line in proc.stderr:
        if line.startswith(b"Tracing"):
            break
    else:
        raise SystemExit("tracer did not start: %s" % proc.wait())
    # keep draining stderr so the tracer never blocks on it
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, time.monotonic() - started


def default_image():
    """Where the default options' compiled BPF image is kept."""
    sys.path.insert(0, os.path.dirname(TOOL))
    import bcc
    import s3slower
    args = s3slower.parse_args([])
    return s3slower.IMAGE_CACHE.path(bcc, s3slower.bpf_program(
        args.pid, args.comm, ringbuf_pages=args.ringbuf_pages,
        plain=s3slower.plain_method(args), port=args.port))


def dd_ns_per_syscall(count):
    started = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", "of=/dev/null", "bs=1",
                    "count=%d" % count], check=True, capture_output=True)
    return (time.monotonic() - started) * 1e9 / (2 * count)


def stop_seconds(proc):
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    return time.monotonic() - started


def probes_released(timeout=60):
    """Wait until no s3slower process is left: the child an exit leaves to
    release the probes (RCU grace periods) would slow the next start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", TOOL], capture_output=True
                          ).returncode != 0 and subprocess.run(
                ["pgrep", "-x", "s3slower-exit"],
                capture_output=True).returncode != 0:
            return
        time.sleep(0.1)


def head_exit_seconds():
    """Tracer's exit after `| head -n 1` took its line, requests flowing."""
    head = subprocess.Popen(["head", "-n", "1"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    proc, _ = start_tracer("--plain", stdout=head.stdin)
    head.stdin.close()
    stop = threading.Event()

    def traffic():
        import socket
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        port = server.getsockname()[1]

        def answer():
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                conn.close()
        threading.Thread(target=answer, daemon=True).start()
        while not stop.is_set():
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(b"GET /bench/head HTTP/1.1\r\nHost: x\r\n\r\n")
                c.recv(65536)
            time.sleep(0.01)
        server.close()
    threading.Thread(target=traffic, daemon=True).start()
    head.wait(60)
    gone = time.monotonic()
    proc.wait(60)
    stop.set()
    return time.monotonic() - gone


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=1000000)
    args = parser.parse_args()
    tax = {"none": [], "s3slower": [], "s3slower --plain": []}
    starts, stops, heads = [], [], []
    for _ in range(args.rounds):
        tax["none"].append(dd_ns_per_syscall(args.count))
        for name, extra in (("s3slower", ()), ("s3slower --plain",
                                                ("--plain",))):
            probes_released()
            proc, took = start_tracer(*extra)
            if not extra:
                starts.append(took)     # the default's start-up
            tax[name].append(dd_ns_per_syscall(args.count))
            stops.append(stop_seconds(proc))
        probes_released()
        heads.append(head_exit_seconds())
    probes_released()
    image = default_image()
    if os.path.exists(image):
        os.unlink(image)
    proc, cold = start_tracer()
    stop_seconds(proc)
    none = statistics.median(tax["none"])
    print("syscall tax (dd bs=1, ns per read/write syscall, median of %d):"
          % args.rounds)
    for name, values in tax.items():
        m = statistics.median(values)
        print("  %-18s %7.1f ns  %5.2fx" % (name, m, m / none))
    print("start to Tracing:  median %.2f s (min %.2f, max %.2f) warm; "
          "%.2f s cold (compiling)" % (statistics.median(starts), min(starts),
                                       max(starts), cold))
    print("SIGTERM to exit:   median %.3f s (max %.3f)" % (
        statistics.median(stops), max(stops)))
    print("| head -n 1 exit:  median %.3f s after head (max %.3f)" % (
        statistics.median(heads), max(heads)))


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench/tax.py: run as root")
    main()
