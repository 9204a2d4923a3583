#!/usr/bin/env python3
"""The overhead floor: the same uprobes and uretprobes s3slower attaches,
on the same files, and the syscall tracepoints it attaches by default
(sendfile, splice, mmap), with handlers that only count. Whatever a tracer
adds above this is its own cost; this much every uprobe tracer pays.

usage: floor.py [--plain]   (as root; prints "Tracing ..." on stderr,
Ctrl-C ends). --plain adds the syscall tracepoints of s3slower's --plain
(on a kernel without kprobes).
"""
import ctypes
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import s3slower  # noqa: E402

PROGRAM = r"""
BPF_ARRAY(hits, u64, 1);
static __always_inline int hit(void) {
    int zero = 0;
    u64 *v = hits.lookup(&zero);
    if (v)
        __sync_fetch_and_add(v, 1);
    return 0;
}
int count(struct pt_regs *ctx) { return hit(); }
"""
# The syscall tracepoints s3slower always uses, and those of --plain.
ALWAYS = ("sendfile64", "splice")
PLAIN = ("write", "sendto", "writev", "sendmsg", "read", "recvfrom", "readv",
         "recvmsg", "socket")
ONE_SHOT = ("mmap",)
PLAIN_ONE_SHOT = ("connect", "close")


def tracepoints(plain):
    text = ""
    for name in ALWAYS + (PLAIN if plain else ()):
        text += ("TRACEPOINT_PROBE(syscalls, sys_enter_%s) { return hit(); }\n"
                 "TRACEPOINT_PROBE(syscalls, sys_exit_%s) { return hit(); }\n"
                 % (name, name))
    for name in ONE_SHOT + (PLAIN_ONE_SHOT if plain else ()):
        text += ("TRACEPOINT_PROBE(syscalls, sys_enter_%s) { return hit(); }\n"
                 % name)
    return text


def main():
    bcc = s3slower.import_bcc()
    s3slower.ensure_tracefs()
    libraries, _ = s3slower.discover_libraries(list(s3slower.FAMILIES), [])
    bpf = bcc.BPF(text=PROGRAM + tracepoints("--plain" in sys.argv))
    probes = 0
    for lib in libraries:
        for symbol, kind in s3slower.FAMILIES[lib.family]["probes"]:
            try:
                bpf.attach_uprobe(name=lib.path, sym=symbol, fn_name="count")
                probes += 1
                if s3slower.PROBE_HANDLERS[kind][1]:
                    bpf.attach_uretprobe(name=lib.path, sym=symbol,
                                         fn_name="count")
            except Exception:
                pass
    stop = []
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    print("Tracing %d probes in %d libraries (floor)" % (probes, len(libraries)),
          file=sys.stderr, flush=True)
    while not stop:
        signal.pause()
    print("floor: %d probe hits" % bpf["hits"][ctypes.c_int(0)].value,
          file=sys.stderr)


if __name__ == "__main__":
    main()
