#!/usr/bin/env python3
#
# s3slower  Trace S3 (and any HTTP/1.x) requests made over TLS, host-wide.
#           For Linux, uses BCC, eBPF.
#
# USAGE: s3slower.py [-h] [-p PID] [--json] [filters...]
#
# Uprobes on the TLS libraries' read and write entry points (OpenSSL, GnuTLS,
# NSS/NSPR, OpenSSL built into programs, Go's crypto/tls) see the plaintext
# HTTP before it is encrypted and after it is decrypted; syscall tracepoints
# see plain HTTP. The kernel side keeps one small state record per connection
# (an SSL *, a gnutls session, a PRFileDesc *, a *tls.Conn, a (pid, fd)),
# stamps the first and last byte
# of each request and response, and sends user space only the first few reads
# and writes of each exchange; byte counting and end-of-body detection for
# large transfers stay in the kernel. User space parses the HTTP heads, names
# the S3 operation, bucket and key, matches each response to its request and
# prints one line (or one JSON object) per completed request, then p50/p90/p99
# tables at exit.
#
# The tool never prints credentials: Authorization and token headers are never
# output, and signature/credential query parameters are replaced by REDACTED.
#
# Copyright (c) 2026 The s3slower authors. Licensed under the MIT License.

import argparse
import ctypes
import datetime
import glob
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections import OrderedDict, defaultdict, deque, namedtuple
from urllib.parse import unquote

VERSION = "0.2.0"

examples = """examples:
    ./s3slower.py                        # trace every HTTPS request on the host
    ./s3slower.py --json | jq .          # JSON Lines, one object per request
    ./s3slower.py -p 1234                # only process 1234
    ./s3slower.py --comm aws             # only processes named aws
    ./s3slower.py --host-substr amazonaws.com --min-lat-ms 100
    ./s3slower.py --method PUT --op PutObject --bucket logs
    ./s3slower.py --libssl /opt/app/lib/libssl.so.3   # add a bundled copy
    ./s3slower.py --openssl              # only OpenSSL-family libraries
    ./s3slower.py --prometheus-port 9464 # also serve metrics on 127.0.0.1:9464
    ./s3slower.py -q --interval 10       # only tables, every 10 s (to stdout)
    ./s3slower.py --stats-by bucket      # latency tables per bucket
"""

# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------

HTTP_METHODS = ("GET", "PUT", "POST", "HEAD", "DELETE", "OPTIONS", "PATCH")
# The four bytes the kernel checks to see a request start (is_request_start).
HTTP_METHOD_PREFIXES = frozenset(m[:4].encode().rstrip() for m in HTTP_METHODS)


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("%r must be a number >= 0" % text)
    return value


def interval_seconds(text):
    value = positive_float(text)
    if value < 0.1:
        raise argparse.ArgumentTypeError("%r: the interval must be at least "
                                         "0.1 s" % text)
    return value


def power_of_two(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not an integer" % text)
    if value < 1 or value > 65536 or value & (value - 1):
        raise argparse.ArgumentTypeError("%r must be a power of two within "
                                         "1..65536" % text)
    return value


def label_limit(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not an integer" % text)
    if not 1 <= value <= 100000:
        raise argparse.ArgumentTypeError("%r must be within 1..100000" % text)
    return value


def port_number(text):
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a port number" % text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("port %d is not in 1..65535" % value)
    return value


def pid_number(text):
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a process id" % text)
    if value <= 0:
        raise argparse.ArgumentTypeError("%r is not a process id" % text)
    return value


def method_name(text):
    value = text.upper()
    if value not in HTTP_METHODS:
        raise argparse.ArgumentTypeError(
            "unknown method %r (one of %s)" % (text, ", ".join(HTTP_METHODS)))
    return value


def comm_name(text):
    if not text or len(text.encode()) > 15:
        raise argparse.ArgumentTypeError(
            "%r: a process name (comm) is 1 to 15 bytes" % text)
    return text


def build_parser():
    parser = argparse.ArgumentParser(
        prog="s3slower.py",
        description="Trace S3/HTTP requests made over TLS, with their latency.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples)
    parser.add_argument("-p", "--pid", type=pid_number,
                        help="trace this process only")
    parser.add_argument("--comm", type=comm_name,
                        help="trace processes with this exact name only")
    libs = parser.add_argument_group(
        "TLS libraries (default: every family found on the host)")
    libs.add_argument("--openssl", action="store_true",
                      help="attach to OpenSSL-family libraries")
    libs.add_argument("--gnutls", action="store_true",
                      help="attach to GnuTLS")
    libs.add_argument("--nss", action="store_true",
                      help="attach to NSS/NSPR")
    libs.add_argument("--go", action="store_true",
                      help="attach to Go programs' crypto/tls")
    libs.add_argument("--libssl", action="append", default=[], metavar="PATH",
                      help="also attach to this libssl (or binary with "
                           "OpenSSL linked in); repeatable")
    libs.add_argument("--libgnutls", action="append", default=[],
                      metavar="PATH", help="also attach to this libgnutls")
    libs.add_argument("--libnss", action="append", default=[], metavar="PATH",
                      help="also attach to this libnspr4")
    libs.add_argument("--go-binary", action="append", default=[],
                      metavar="PATH",
                      help="also attach to this Go program; repeatable")
    libs.add_argument("--rescan-interval", type=positive_float, default=10.0,
                      metavar="SECONDS",
                      help="look for new TLS library files (new containers, "
                           "newly started static binaries) every SECONDS; "
                           "0: never (default 10)")
    parser.add_argument("--no-plain", action="store_true",
                        help="do not trace plain-HTTP (unencrypted) "
                             "connections from syscall tracepoints")
    filters = parser.add_argument_group("filters")
    filters.add_argument("--port", type=port_number,
                         help="plain HTTP: only connections to this remote "
                              "port")
    filters.add_argument("--host-substr", metavar="TEXT",
                         help="only requests whose Host contains TEXT")
    filters.add_argument("--method", type=method_name,
                         help="only requests with this HTTP method")
    filters.add_argument("--op", metavar="OP",
                         help="only this S3 operation (e.g. GetObject)")
    filters.add_argument("--bucket", metavar="NAME",
                         help="only requests to this bucket")
    filters.add_argument("--min-lat-ms", type=positive_float, default=0.0,
                         metavar="MS", help="only requests at least this slow")
    filters.add_argument("--include-unknown", action="store_true",
                         help="also report exchanges whose request was not "
                              "seen or not parsed (method shown as '-')")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help="print JSON Lines, one object per request")
    out.add_argument("--prometheus-port", type=port_number, metavar="PORT",
                     help="serve Prometheus metrics on this port")
    out.add_argument("--prometheus-addr", default="127.0.0.1", metavar="ADDR",
                     help="address for --prometheus-port (default 127.0.0.1)")
    out.add_argument("--max-label-values", type=label_limit, default=100,
                     metavar="N",
                     help="distinct hosts, and host+bucket pairs, in metric "
                          "labels and bucket tables before folding into "
                          "'other' (default 100)")
    out.add_argument("-q", "--no-requests", action="store_true",
                     help="no per-request lines: only the tables (on stdout)")
    out.add_argument("--interval", type=interval_seconds, metavar="SECONDS",
                     help="also print the tables of the last SECONDS every "
                          "SECONDS (on stderr unless -q)")
    out.add_argument("--stats-by", choices=("method", "op", "bucket"),
                     help="one table kind: per host and method, per "
                          "endpoint and S3 operation, or per endpoint and "
                          "bucket (default: method and op)")
    out.add_argument("--no-stats", action="store_true",
                     help="do not print the statistics tables at exit")
    out.add_argument("--ringbuf-pages", type=power_of_two, default=1024,
                     metavar="N",
                     help="kernel-to-user ring buffer size in pages, a power "
                          "of two (default 1024: 4 MiB)")
    parser.add_argument("--version", action="version",
                        version="s3slower " + VERSION)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_label_values < 1:
        parser.error("--max-label-values must be at least 1")
    if args.op is not None and args.op not in S3_OPERATIONS:
        parser.error("unknown --op %r (see README for the list)" % args.op)
    return args


# ---------------------------------------------------------------------------
# Library discovery
# ---------------------------------------------------------------------------

# Each family: the sonames that carry its I/O entry points, and the probes.
# A probe is (symbol, kind) where kind says which C handlers take it.
LIB_OPENSSL, LIB_GNUTLS, LIB_NSS, LIB_PLAIN, LIB_GO = 1, 2, 3, 4, 5
LIB_NAMES = {LIB_OPENSSL: "openssl", LIB_GNUTLS: "gnutls", LIB_NSS: "nss",
             LIB_PLAIN: "plain", LIB_GO: "go"}

FAMILIES = OrderedDict([
    ("openssl", dict(lib=LIB_OPENSSL, pattern=re.compile(r"libssl\.so(\.|$)"),
                     probes=[("SSL_write", "write"), ("SSL_write_ex", "write_ex"),
                             ("SSL_read", "read"), ("SSL_read_ex", "read_ex"),
                             ("SSL_shutdown", "close"), ("SSL_free", "close"),
                             # ties a socket to its SSL * (sendfile, kTLS)
                             ("SSL_set_fd", "set_fd")])),
    ("gnutls", dict(lib=LIB_GNUTLS, pattern=re.compile(r"libgnutls\.so(\.|$)"),
                    # send tail-calls send2: the stack-pointer check in
                    # the kernel keeps one report per call.
                    probes=[("gnutls_record_send", "write"),
                            ("gnutls_record_send2", "write"),
                            ("gnutls_record_recv", "read"),
                            ("gnutls_record_recv_seq", "read"),
                            ("gnutls_bye", "close"), ("gnutls_deinit", "close")])),
    ("nss", dict(lib=LIB_NSS, pattern=re.compile(r"libnspr4\.so(\.|$)"),
                 probes=[("PR_Write", "write"), ("PR_Send", "write"),
                         ("PR_Read", "read"), ("PR_Recv", "read"),
                         ("PR_Close", "close")])),
    # Found by symbol, attached by attach_go (no return probes).
    ("go", dict(lib=LIB_GO, pattern=None, probes=[])),
])

LibraryFile = namedtuple("LibraryFile", "family path static")


def loader_cache_paths():
    """Library paths from the dynamic loader's cache (ldconfig -p)."""
    for ldconfig in ("/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"):
        try:
            out = subprocess.run([ldconfig, "-p"], capture_output=True,
                                 text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in out.splitlines():
            if "=>" in line:
                yield line.split("=>", 1)[1].strip()
        return


def process_files(pids):
    """Files processes execute: their executables and executable mappings,
    as paths the tracer can open (a container's copy through its root)."""
    for pid in pids:
        paths = set()
        try:
            paths.add(os.readlink("/proc/%d/exe" % pid))
            with open("/proc/%d/maps" % pid) as maps:
                lines = maps.read().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(None, 5)
            if len(parts) == 6 and "x" in parts[1] and \
                    parts[5].startswith("/"):
                paths.add(parts[5])
        for path in paths:
            if path.endswith(" (deleted)"):
                continue
            # Seen through the process's root: a container's copy differs
            # from the host file of the same name.
            in_root = "/proc/%d/root%s" % (pid, path)
            try:
                same = os.path.samefile(in_root, path)
            except OSError:
                same = not os.path.exists(in_root)
            yield path if same else in_root


def all_pids():
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


ELF_HEADER = struct.Struct("<4sB11x HHIQQQIHHHHHH")
ELF_SECTION = struct.Struct("<IIQQQQIIQQ")
ELF_SYMBOL = struct.Struct("<IBBHQQ")
SHT_SYMTAB, SHT_DYNSYM, SHN_UNDEF, STT_FUNC = 2, 11, 0, 2
MAX_SCAN_BYTES = 256 << 20     # symbol tables larger than this are not read


ElfSection = namedtuple("ElfSection", "name type addr offset size link")


def elf_sections(f):
    """The sections of an open ELF64 file, or [] if it is not one."""
    f.seek(0)
    head = f.read(ELF_HEADER.size)
    if len(head) < ELF_HEADER.size:
        return []
    (magic, klass, _type, _machine, _version, _entry, _phoff, shoff, _flags,
     _ehsize, _phsize, _phnum, shentsize, shnum,
     shstrndx) = ELF_HEADER.unpack(head)
    if magic != b"\x7fELF" or klass != 2 or \
            shentsize != ELF_SECTION.size or not 0 < shnum < 65536:
        return []
    f.seek(shoff)
    table = f.read(shnum * shentsize)
    raw = [ELF_SECTION.unpack_from(table, i * shentsize)
           for i in range(len(table) // shentsize)]
    names = b""
    if shstrndx < len(raw) and raw[shstrndx][5] < (1 << 20):
        f.seek(raw[shstrndx][4])
        names = f.read(raw[shstrndx][5])
    sections = []
    for sec in raw:
        end = names.find(b"\0", sec[0])
        sections.append(ElfSection(names[sec[0]:end].decode("latin-1"),
                                   sec[1], sec[3], sec[4], sec[5], sec[6]))
    return sections


def elf_symbols(path, names):
    """{name: (address, size)} for the functions among names that path (an
    ELF64 file) defines in .dynsym or .symtab: how a statically linked TLS
    library or a Go program's crypto/tls is found."""
    found = {}
    try:
        with open(path, "rb") as f:
            sections = elf_sections(f)
            wanted = {n.encode() for n in names}
            for sec in sections:
                if sec.type not in (SHT_SYMTAB, SHT_DYNSYM) or \
                        sec.link >= len(sections) or sec.size > MAX_SCAN_BYTES:
                    continue
                strtab = sections[sec.link]
                if strtab.size > MAX_SCAN_BYTES:
                    continue
                f.seek(strtab.offset)
                strings = f.read(strtab.size)
                # Cheap test first: most files name none of the symbols.
                if not any(b"\0" + n + b"\0" in strings for n in wanted):
                    continue
                f.seek(sec.offset)
                symbols = f.read(sec.size)
                for i in range(len(symbols) // ELF_SYMBOL.size):
                    name_at, info, _other, shndx, value, size = \
                        ELF_SYMBOL.unpack_from(symbols, i * ELF_SYMBOL.size)
                    if shndx == SHN_UNDEF or info & 0xf != STT_FUNC:
                        continue
                    end = strings.find(b"\0", name_at)
                    name = strings[name_at:end]
                    if name in wanted:
                        found[name.decode()] = (value, size)
    except (OSError, struct.error, ValueError):
        pass
    return found


def elf_functions(path, names):
    """The subset of names that path defines as functions."""
    return set(elf_symbols(path, names))


def elf_bytes(path, address, size):
    """size bytes of path at a virtual address (of a function), or b""."""
    try:
        with open(path, "rb") as f:
            for sec in elf_sections(f):
                if sec.addr <= address < sec.addr + sec.size and \
                        sec.type != 8:          # SHT_NOBITS has no bytes
                    f.seek(sec.offset + address - sec.addr)
                    return f.read(min(size, sec.addr + sec.size - address))
    except (OSError, struct.error, ValueError):
        pass
    return b""


# OpenSSL/BoringSSL built into an executable or another library.
STATIC_OPENSSL = ("SSL_write", "SSL_read")

# Go programs carry their own TLS (crypto/tls). Supported: amd64 with the
# register ABI (Go >= 1.17), version read from the build info that Go >= 1.18
# writes inline; symbols needed, so a stripped binary (-ldflags=-s) is not.
GO_WRITE = "crypto/tls.(*Conn).Write"
GO_READ = "crypto/tls.(*Conn).Read"
GO_CLOSE = "crypto/tls.(*Conn).Close"
GO_SYMBOLS = (GO_WRITE, GO_READ, GO_CLOSE)
GO_MIN_VERSION = (1, 18)
_BUILDINFO = re.compile(rb"go(1)\.(\d+)")


def go_version(path):
    """(major, minor) of the Go toolchain that built path, or None."""
    try:
        with open(path, "rb") as f:
            for sec in elf_sections(f):
                if sec.name == ".go.buildinfo":
                    f.seek(sec.offset)
                    head = f.read(min(sec.size, 4096))
                    # Go >= 1.18: flag bit 2 at byte 15, then the version as
                    # a length-prefixed string at byte 32.
                    if len(head) > 33 and head[15] & 2:
                        m = _BUILDINFO.match(head, 33)
                        if m:
                            return int(m.group(1)), int(m.group(2))
                    return None
    except (OSError, ValueError):
        pass
    return None


def go_return_offsets(path, address, size):
    """Offsets of the RET instructions in a function, from its machine code:
    where a Go function's return is caught (uretprobes break Go's moving
    stacks). None when the disassembler (python3-capstone) is missing."""
    try:
        import capstone
    except ImportError:
        return None
    code = elf_bytes(path, address, size)
    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return [insn.address - address for insn in disassembler.disasm(code, address)
            if insn.mnemonic == "ret"]


_scanned = {}      # (dev, ino, size, mtime) -> families: rescans stay cheap


def built_in_tls(path, st):
    """Families whose TLS is compiled into path: "openssl" and/or "go"."""
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if ident not in _scanned:
        if len(_scanned) > 100000:
            _scanned.clear()
        found = elf_functions(path, STATIC_OPENSSL + (GO_READ,))
        _scanned[ident] = {family for family, needed in (
            ("openssl", STATIC_OPENSSL), ("go", (GO_READ,)))
            if found.issuperset(needed)}
    return _scanned[ident]


def discover_libraries(families, extra, pid=None, known=None):
    """Distinct files to attach to, one per (family, device, inode).

    families: names from FAMILIES to auto-discover; extra: (family, path)
    pairs the user forced; pid: only what that process maps. Files whose
    identity is in known (a set, updated) are left out: what a rescan
    finds is only what is new. Returns (files, number of files scanned).
    """
    found = []
    known = set() if known is None else known

    def add(family, path, st, static=False):
        ident = (family, st.st_dev, st.st_ino)
        if ident not in known:
            known.add(ident)
            found.append(LibraryFile(family, path, static))

    def stat(path):
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st if os.path.isfile(path) else None

    for family, path in extra:
        st = stat(path)
        if st:
            pattern = FAMILIES[family]["pattern"]
            add(family, path, st, static=not pattern or
                not pattern.search(os.path.basename(path)))
    scanned = set()
    # Files processes run, then the loader's cache (with --pid too: the
    # process may load a TLS library later).
    for path, from_process in [(p, True) for p in process_files(
            [pid] if pid else all_pids())] + \
            [(p, False) for p in loader_cache_paths()]:
        name = os.path.basename(path)
        matched = [f for f in families if FAMILIES[f]["pattern"] and
                   FAMILIES[f]["pattern"].search(name)]
        scan = from_process and ("openssl" in families or "go" in families)
        if not matched and not scan:
            continue
        st = stat(path)
        if st is None:
            continue
        for family in matched:
            add(family, path, st)
        if not matched and (st.st_dev, st.st_ino) not in scanned:
            scanned.add((st.st_dev, st.st_ino))
            built_in = built_in_tls(path, st)
            for family in families:
                if family in built_in:
                    add(family, path, st, static=True)
    return found, len(scanned)


# ---------------------------------------------------------------------------
# BPF program
# ---------------------------------------------------------------------------

MAX_DATA = 4096           # bytes of one read or write copied to user space
MAX_WRITE_EVENTS = 4      # writes of a request sent with data
MAX_READ_EVENTS = 4       # reads of a response sent before user space decides
WAKE_EVERY = 32           # events per CPU between reader wake-ups
POLL_MS = 50              # ... and the reader's timer: the output delay
HEAD_WINDOW = 8192        # ... and any read starting in its first bytes, so
                          # a head read in tiny pieces still arrives whole

EV_WRITE, EV_READ, EV_DONE, EV_CLOSE, EV_EXIT = 1, 2, 3, 4, 5
MODE_LENGTH, MODE_CHUNKED, MODE_CLOSE, MODE_PIPELINED = 1, 2, 3, 4
FLAG_CHUNK_END, FLAG_PIPELINED = 1, 2

BPF_TEXT = r"""
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

#define MAX_DATA __MAX_DATA__
#define MAX_WRITE_EVENTS __MAX_WRITE_EVENTS__
#define MAX_READ_EVENTS __MAX_READ_EVENTS__
#define HEAD_WINDOW __HEAD_WINDOW__
#define WAKE_EVERY __WAKE_EVERY__
#define PLAIN_HTTP __PLAIN_HTTP__

enum { EV_WRITE = 1, EV_READ, EV_DONE, EV_CLOSE, EV_EXIT };
enum { PHASE_NEW = 0, PHASE_REQ, PHASE_RESP, PHASE_IGNORED };
enum { MODE_LENGTH = 1, MODE_CHUNKED, MODE_CLOSE, MODE_PIPELINED };
enum { STAT_LOST = 0, STAT_CALL_COLLISION = 1 };
enum { FLAG_CHUNK_END = 1, FLAG_PIPELINED = 2 };

/* A connection is whatever handle the library hands its callers: SSL *,
 * gnutls_session_t, PRFileDesc *; later a Go *Conn or a (pid, fd). */
struct conn_key {
    u64 handle;
    u32 tgid;
    u32 lib;
};

struct conn_state {
    u64 req_start;      /* entry of the request's first write */
    u64 req_end;        /* entry of its last write: the server cannot have
                         * the last byte earlier, so turnaround is never
                         * below the server's own time */
    u64 req_bytes;
    u64 resp_start;     /* return of the response's first read */
    u64 resp_end;       /* return of its last read */
    u64 resp_bytes;
    u32 seq;            /* requests started on this connection */
    u32 rphase;         /* read phases started: ties user control to one */
    u16 wr_events;
    u16 rd_events;
    u8 phase;
    u8 chunk_end;       /* last read ended with a chunked terminator */
    u8 pipelined;       /* a request was sent before the previous response:
                         * every call goes to user space from then on */
    u8 pad;
    char tail[8];       /* last bytes read (7 used): chunked-body end */
};

/* Set by user space once it has parsed a response head: how the kernel
 * decides alone that the body is complete. */
struct conn_ctl {
    u64 expect;         /* MODE_LENGTH: resp_bytes when the body is done */
    u32 rphase;
    u8 mode;
    u8 stream;          /* keep sending read data (error bodies) */
    u8 pad[2];
};

struct call_args {
    u64 handle;
    u64 buf;
    u64 sizep;          /* *_ex variants: where the byte count is stored */
    u64 start;
    u64 sp;             /* stack pointer at entry: tells nested calls apart */
    u32 lib;
    u32 copy_max;       /* bytes readable at buf (first iovec); 0: all */
};

struct event {
    u64 ts;
    u64 handle;
    u32 tgid;
    u32 tid;
    u32 len;            /* bytes this call moved */
    u32 cap;            /* bytes of data[] filled */
    u32 seq;
    u32 rphase;
    u8 type;
    u8 lib;
    u8 flags;
    u8 pad[5];
    u64 req_start;
    u64 req_end;
    u64 req_bytes;
    u64 resp_start;
    u64 resp_end;
    u64 resp_bytes;
    char comm[TASK_COMM_LEN];
    char data[MAX_DATA];
};

/* LRU everywhere: a thread killed inside SSL_read, a connection never
 * freed, a process that exits uncleanly must not fill a map for good. */
BPF_TABLE("lru_hash", u32, struct call_args, calls, 16384);
BPF_TABLE("lru_hash", struct conn_key, struct conn_state, conns, __MAX_CONNS__);
BPF_TABLE("lru_hash", struct conn_key, struct conn_ctl, ctls, __MAX_CONNS__);
BPF_TABLE("lru_hash", u32, u8, procs, 16384);
BPF_PERCPU_ARRAY(scratch, struct event, 1);
BPF_PERCPU_ARRAY(wakeups, u32, 1);
BPF_ARRAY(stats, u64, 4);
BPF_RINGBUF_OUTPUT(events, __RINGBUF_PAGES__);

static __always_inline int pass_filters(u32 tgid)
{
    __PID_FILTER__
    __COMM_FILTER__
    return 1;
}

/* Clamp v to [0, max] in a way the verifier sees: the empty asm stops the
 * compiler from folding the clamp into the arithmetic before it. */
#define bound_value(v, max) do {                \
        asm volatile("" : "+r"(v));             \
        if ((v) > (max))                        \
            (v) = (max);                        \
    } while (0)

static __always_inline void count_stat(int idx)
{
    u64 *v = stats.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
}

/* First bytes of an HTTP/1.x request line. */
static __always_inline int is_request_start(const char *p)
{
    switch (p[0]) {
    case 'G': return p[1] == 'E' && p[2] == 'T' && p[3] == ' ';
    case 'P': return (p[1] == 'U' && p[2] == 'T' && p[3] == ' ') ||
                     (p[1] == 'O' && p[2] == 'S' && p[3] == 'T') ||
                     (p[1] == 'A' && p[2] == 'T' && p[3] == 'C');
    case 'H': return p[1] == 'E' && p[2] == 'A' && p[3] == 'D';
    case 'D': return p[1] == 'E' && p[2] == 'L' && p[3] == 'E';
    case 'O': return p[1] == 'P' && p[2] == 'T' && p[3] == 'I';
    }
    return 0;
}

static __always_inline void send_event(u8 type, struct conn_key *k,
                                       struct conn_state *s, u64 now,
                                       u32 len, u64 copy, u64 buf, u8 flags)
{
    u32 zero = 0;
    struct event *e = scratch.lookup(&zero);
    if (!e)
        return;
    u64 id = bpf_get_current_pid_tgid();
    e->ts = now;
    e->handle = k->handle;
    e->tgid = k->tgid;
    e->tid = (u32)id;
    e->len = len;
    e->seq = s->seq;
    e->rphase = s->rphase;
    e->type = type;
    e->lib = k->lib;
    e->flags = flags;
    e->req_start = s->req_start;
    e->req_end = s->req_end;
    e->req_bytes = s->req_bytes;
    e->resp_start = s->resp_start;
    e->resp_end = s->resp_end;
    e->resp_bytes = s->resp_bytes;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    u64 cap = 0;
    if (buf) {
        cap = copy;
        bound_value(cap, MAX_DATA);
        if (bpf_probe_read_user(&e->data, cap, (void *)buf) != 0)
            cap = 0;
    }
    e->cap = cap;
    u64 size = offsetof(struct event, data) + cap;
    bound_value(size, sizeof(*e));
    /* Wake the reader once per WAKE_EVERY events on this CPU; it also polls
     * on a timer. A wake-up per event costs more than handling the event. */
    u64 wake = BPF_RB_NO_WAKEUP;
    u32 *pending = wakeups.lookup(&zero);
    if (pending && ++*pending >= WAKE_EVERY) {
        *pending = 0;
        wake = BPF_RB_FORCE_WAKEUP;
    }
    if (events.ringbuf_output(e, size, wake) != 0)
        count_stat(STAT_LOST);
}

/* NSPR does all I/O through PR_Write/PR_Read, files and pipes included.
 * A TLS connection is a layered PRFileDesc (the SSL layer over TCP): a
 * descriptor with nothing below it (PRFileDesc.lower, offset 16) is not. */
static __always_inline int nspr_layered(u64 fd)
{
    u64 lower = 0;
    bpf_probe_read_user(&lower, sizeof(lower), (void *)(fd + 16));
    return lower != 0;
}

static __always_inline int enter_io(struct pt_regs *ctx, u32 lib, u64 handle,
                                    u64 buf, u64 sizep, int is_read)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (!handle || !pass_filters(tgid))
        return 0;
    if (lib == 3 && !nspr_layered(handle))
        return 0;
    if (is_read) {
        /* Reads only matter on connections that already sent HTTP. */
        struct conn_key k = {.handle = handle, .tgid = tgid, .lib = lib};
        struct conn_state *s = conns.lookup(&k);
        if (!s || s->phase == PHASE_IGNORED || s->phase == PHASE_NEW)
            return 0;
    }
    struct call_args a = {.handle = handle, .buf = buf, .sizep = sizep,
                          .start = bpf_ktime_get_ns(),
                          .sp = PT_REGS_SP(ctx), .lib = lib};
    /* An outer call of the same thread is in progress (a library entry
     * point calling another one): the outer call is the one we report. */
    if (calls.insert(&tid, &a) != 0)
        count_stat(STAT_CALL_COLLISION);
    return 0;
}

/* Bytes moved by the call that is returning, or 0. */
static __always_inline u64 returned_bytes(struct pt_regs *ctx,
                                          struct call_args *a)
{
    /* OpenSSL and NSPR return int; only GnuTLS returns ssize_t. */
    long ret = a->lib == 2 ? (long)PT_REGS_RC(ctx) : (long)(int)PT_REGS_RC(ctx);
    if (a->sizep) {
        if (ret != 1)
            return 0;
        u64 n = 0;
        bpf_probe_read_user(&n, sizeof(n), (void *)a->sizep);
        return n;
    }
    return ret > 0 ? (u64)ret : 0;
}

static __always_inline int take_call(struct pt_regs *ctx, struct call_args *out)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct call_args *a = calls.lookup(&tid);
    if (!a)
        return 0;
    /* A uretprobe sees the stack pointer just above the return address:
     * only the call that stored these arguments may take them. */
    if (PT_REGS_SP(ctx) != a->sp + 8)
        return 0;
    *out = *a;
    calls.delete(&tid);
    return 1;
}

/* n more request bytes, from a call that started at start. */
static __always_inline void count_request_bytes(struct conn_state *s,
                                                u64 start, u64 n)
{
    if (s->phase == PHASE_RESP) {
        /* More request body after an interim response (100 Continue):
         * the final response starts a new read phase. */
        s->phase = PHASE_REQ;
        s->resp_start = 0;
        s->resp_end = 0;
        s->resp_bytes = 0;
        s->rd_events = 0;
        s->chunk_end = 0;
    }
    s->req_end = start;
    s->req_bytes += n;
}

static __always_inline int handle_write(struct call_args *ap, u64 n)
{
    struct call_args a = *ap;
    if (n == 0)
        return 0;
    u64 copy = n;
    if (a.copy_max && copy > a.copy_max)
        copy = a.copy_max;
    u64 now = bpf_ktime_get_ns();
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct conn_key k = {.handle = a.handle, .tgid = tgid, .lib = a.lib};
    char head[4] = {};
    if (copy >= 4)
        bpf_probe_read_user(head, sizeof(head), (void *)a.buf);
    int is_req = is_request_start(head);

    struct conn_state *s = conns.lookup(&k);
    if (!s) {
        struct conn_state fresh = {};
        /* A connection that does not open with an HTTP request is not
         * HTTP/1.x (HTTP/2, another protocol): ignored from now on. */
        fresh.phase = is_req ? PHASE_NEW : PHASE_IGNORED;
        conns.update(&k, &fresh);
        /* A handle reused for a new connection must not inherit the
         * control user space set for the old one. */
        ctls.delete(&k);
        if (!is_req)
            return 0;
        u8 one = 1;
        procs.update(&tgid, &one);
        s = conns.lookup(&k);
        if (!s)
            return 0;
    }
    if (s->phase == PHASE_IGNORED)
        return 0;
    /* A request while the previous one has no response yet, or after user
     * space found several requests in one write: HTTP pipelining. Stream
     * offsets replace per-request counters from then on. */
    if (is_req && !s->pipelined) {
        struct conn_ctl *c = ctls.lookup(&k);
        if (s->phase == PHASE_REQ || (c && c->mode == MODE_PIPELINED))
            s->pipelined = 1;
    }
    if (s->pipelined) {
        s->req_end = a.start;
        s->req_bytes += n;
        send_event(EV_WRITE, &k, s, now, n, copy, a.buf, FLAG_PIPELINED);
        return 0;
    }
    if (is_req) {
        s->seq++;
        s->phase = PHASE_REQ;
        s->req_start = a.start;
        s->req_bytes = 0;
        s->wr_events = 0;
        s->resp_start = 0;
        s->resp_end = 0;
        s->resp_bytes = 0;
        s->rd_events = 0;
        s->chunk_end = 0;
    }
    count_request_bytes(s, a.start, n);
    if (s->wr_events < MAX_WRITE_EVENTS || is_req) {
        s->wr_events++;
        send_event(EV_WRITE, &k, s, now, n, copy, a.buf, 0);
    }
    return 0;
}

static __always_inline int exit_write(struct pt_regs *ctx)
{
    struct call_args a;
    if (!take_call(ctx, &a))
        return 0;
    return handle_write(&a, returned_bytes(ctx, &a));
}

/* Keep the last 7 bytes the connection read, across reads, and tell
 * whether they end a chunked body: "\r\n0\r\n\r\n" (the head's own
 * CRLF counts for an empty body). Trailers are not supported. */
static __always_inline u8 ends_chunked(struct conn_state *s, u64 buf, u64 n)
{
    char t[7] = {};
    u64 take = n < 7 ? n : 7;
    bound_value(take, 7);
    if (take && bpf_probe_read_user(t, take, (void *)(buf + n - take)) != 0)
        take = 0;
#pragma unroll
    for (int i = 0; i < 7; i++) {
        if (i < take) {
#pragma unroll
            for (int j = 0; j < 6; j++)
                s->tail[j] = s->tail[j + 1];
            s->tail[6] = t[i];
        }
    }
    return s->tail[0] == '\r' && s->tail[1] == '\n' && s->tail[2] == '0' &&
           s->tail[3] == '\r' && s->tail[4] == '\n' && s->tail[5] == '\r' &&
           s->tail[6] == '\n';
}

static __always_inline int handle_read(struct call_args *ap, u64 n)
{
    struct call_args a = *ap;
    if (n == 0)
        return 0;
    u64 copy = n;
    if (a.copy_max && copy > a.copy_max)
        copy = a.copy_max;
    u64 now = bpf_ktime_get_ns();
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct conn_key k = {.handle = a.handle, .tgid = tgid, .lib = a.lib};
    struct conn_state *s = conns.lookup(&k);
    if (!s || s->phase == PHASE_IGNORED || s->phase == PHASE_NEW)
        return 0;
    struct conn_ctl *c = ctls.lookup(&k);
    if (c && c->mode == MODE_PIPELINED)
        s->pipelined = 1;   /* user space saw several requests in one write */
    if (s->pipelined) {
        if (!s->resp_start)
            s->resp_start = now;
        s->resp_bytes += n;
        s->resp_end = now;
        send_event(EV_READ, &k, s, now, n, copy, a.buf, FLAG_PIPELINED);
        return 0;
    }
    if (s->phase == PHASE_REQ) {
        s->phase = PHASE_RESP;
        s->rphase++;
        s->resp_start = now;
        s->resp_bytes = 0;
        s->rd_events = 0;
    }
    u64 before = s->resp_bytes;
    s->resp_bytes += n;
    s->resp_end = now;
    s->chunk_end = ends_chunked(s, a.buf, copy);

    u8 type = EV_READ;
    int emit = s->rd_events < MAX_READ_EVENTS || before < HEAD_WINDOW;
    if (c && c->rphase == s->rphase) {
        emit = c->stream;
        if ((c->mode == MODE_LENGTH && before < c->expect &&
             s->resp_bytes >= c->expect) ||
            (c->mode == MODE_CHUNKED && s->chunk_end)) {
            type = EV_DONE;
            emit = 1;
        }
    }
    if (s->rd_events < 0xffff)
        s->rd_events++;
    if (emit)
        send_event(type, &k, s, now, n, copy, a.buf,
                   s->chunk_end ? FLAG_CHUNK_END : 0);
    return 0;
}

static __always_inline int exit_read(struct pt_regs *ctx)
{
    struct call_args a;
    if (!take_call(ctx, &a))
        return 0;
    return handle_read(&a, returned_bytes(ctx, &a));
}

static __always_inline int close_conn(struct pt_regs *ctx, u32 lib, u64 handle)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct conn_key k = {.handle = handle, .tgid = tgid, .lib = lib};
    struct conn_state *s = conns.lookup(&k);
    if (!s)
        return 0;
    /* The close carries the final counters and the chunked-end flag: user
     * space may not have parsed the response head yet. */
    if (s->phase == PHASE_REQ || s->phase == PHASE_RESP)
        send_event(EV_CLOSE, &k, s, bpf_ktime_get_ns(), 0, 0, 0,
                   (s->chunk_end ? FLAG_CHUNK_END : 0) |
                   (s->pipelined ? FLAG_PIPELINED : 0));
    conns.delete(&k);
    ctls.delete(&k);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (tgid != (u32)id || !procs.lookup(&tgid))
        return 0;
    procs.delete(&tgid);
    struct conn_key k = {.tgid = tgid};
    struct conn_state s = {};
    send_event(EV_EXIT, &k, &s, bpf_ktime_get_ns(), 0, 0, 0, 0);
    return 0;
}

#if PLAIN_HTTP
/* Plain HTTP from syscall tracepoints (no kprobes needed). A TCP socket is
 * one this process created with socket(AF_INET/AF_INET6, SOCK_STREAM) while
 * we watched; the connection key is (tgid, fd) with lib 4. A TLS socket's
 * first write is a ClientHello, not HTTP: it is ignored like any non-HTTP
 * connection, so a TLS request is never reported twice. */
#define LIB_PLAIN 4
struct fd_key {
    u32 tgid;
    u32 fd;
};
BPF_TABLE("lru_hash", struct fd_key, u16, tcp_fds, __MAX_CONNS__);
BPF_TABLE("lru_hash", u32, struct call_args, sys_calls, 16384);
BPF_TABLE("lru_hash", u32, u8, new_sockets, 4096);

static __always_inline int tcp_fd(u32 fd)
{
    struct fd_key fk = {.tgid = bpf_get_current_pid_tgid() >> 32, .fd = fd};
    return tcp_fds.lookup(&fk) != 0;
}

static __always_inline int sys_enter_io(u32 fd, u64 buf, u64 copy_max,
                                        int is_read)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (!tcp_fd(fd) || !pass_filters(tgid))
        return 0;
    /* Inside SSL_write/SSL_read (kernel TLS: the plaintext reaches the
     * socket): the TLS probes report this request, not us. */
    if (calls.lookup(&tid))
        return 0;
    if (is_read) {
        struct conn_key k = {.handle = fd, .tgid = tgid, .lib = LIB_PLAIN};
        struct conn_state *s = conns.lookup(&k);
        if (!s || s->phase == PHASE_IGNORED || s->phase == PHASE_NEW)
            return 0;
    }
    bound_value(copy_max, 0xffffffff);
    struct call_args a = {.handle = fd, .buf = buf, .start = bpf_ktime_get_ns(),
                          .lib = LIB_PLAIN, .copy_max = copy_max};
    sys_calls.update(&tid, &a);
    return 0;
}

static __always_inline int sys_exit_io(long ret, int is_read)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct call_args *ap = sys_calls.lookup(&tid);
    if (!ap)
        return 0;
    struct call_args a = *ap;
    sys_calls.delete(&tid);
    u64 n = ret > 0 ? (u64)ret : 0;
    if (is_read)
        return handle_read(&a, n);
    handle_write(&a, n);
    /* Not HTTP (a TLS socket, another protocol): forget the fd, so its
     * next syscalls cost one failed lookup. */
    struct conn_key k = {.handle = a.handle, .tgid = id >> 32,
                         .lib = LIB_PLAIN};
    struct conn_state *s = conns.lookup(&k);
    if (s && s->phase == PHASE_IGNORED) {
        struct fd_key fk = {.tgid = id >> 32, .fd = a.handle};
        tcp_fds.delete(&fk);
        conns.delete(&k);
    }
    return 0;
}

/* The first iovec: where the data a tracer can copy starts. */
static __always_inline int iov_enter(u32 fd, u64 iov, int is_read)
{
    if (!tcp_fd(fd))
        return 0;
    u64 first[2] = {};
    bpf_probe_read_user(first, sizeof(first), (void *)iov);
    return sys_enter_io(fd, first[0], first[1] ? first[1] : 1, is_read);
}

static __always_inline int msg_enter(u32 fd, u64 msg, int is_read)
{
    if (!tcp_fd(fd))
        return 0;
    u64 iov = 0;     /* struct user_msghdr: msg_iov at offset 16 */
    bpf_probe_read_user(&iov, sizeof(iov), (void *)(msg + 16));
    return iov_enter(fd, iov, is_read);
}

TRACEPOINT_PROBE(syscalls, sys_enter_write) { return sys_enter_io(args->fd, (u64)args->buf, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return sys_exit_io(args->ret, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { return sys_enter_io(args->fd, (u64)args->buff, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return sys_exit_io(args->ret, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return iov_enter(args->fd, (u64)args->vec, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return sys_exit_io(args->ret, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return msg_enter(args->fd, (u64)args->msg, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return sys_exit_io(args->ret, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_read) { return sys_enter_io(args->fd, (u64)args->buf, 0, 1); }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return sys_exit_io(args->ret, 1); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { return sys_enter_io(args->fd, (u64)args->ubuf, 0, 1); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return sys_exit_io(args->ret, 1); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return iov_enter(args->fd, (u64)args->vec, 1); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return sys_exit_io(args->ret, 1); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { return msg_enter(args->fd, (u64)args->msg, 1); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return sys_exit_io(args->ret, 1); }

/* A request body sent with sendfile (kernel TLS does this too, after the
 * head went through SSL_write): counted, never copied, on the plain
 * connection of the fd or the TLS connection the fd was given to. */
BPF_TABLE("lru_hash", struct fd_key, u64, fd_owners, __MAX_CONNS__);

int openssl_set_fd_enter(struct pt_regs *ctx)
{
    struct fd_key fk = {.tgid = bpf_get_current_pid_tgid() >> 32,
                        .fd = PT_REGS_PARM2(ctx)};
    u64 ssl = PT_REGS_PARM1(ctx);
    fd_owners.update(&fk, &ssl);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct fd_key fk = {.tgid = id >> 32, .fd = args->out_fd};
    if (!tcp_fds.lookup(&fk) && !fd_owners.lookup(&fk))
        return 0;
    struct call_args a = {.handle = args->out_fd, .start = bpf_ktime_get_ns(),
                          .lib = LIB_PLAIN};
    sys_calls.update(&tid, &a);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_sendfile64)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct call_args *ap = sys_calls.lookup(&tid);
    if (!ap)
        return 0;
    struct conn_key k = {.handle = ap->handle, .tgid = id >> 32,
                         .lib = LIB_PLAIN};
    u64 start = ap->start;
    sys_calls.delete(&tid);
    if (args->ret <= 0)
        return 0;
    struct conn_state *s = conns.lookup(&k);
    if (!s || s->phase == PHASE_IGNORED) {
        struct fd_key fk = {.tgid = id >> 32, .fd = k.handle};
        u64 *ssl = fd_owners.lookup(&fk);
        if (!ssl)
            return 0;
        k.handle = *ssl;
        k.lib = 1;
        s = conns.lookup(&k);
    }
    if (!s || s->phase == PHASE_IGNORED || s->phase == PHASE_NEW)
        return 0;
    count_request_bytes(s, start, args->ret);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_socket)
{
    int type = args->type & 0xf;
    if ((args->family == 2 || args->family == 10) && type == 1) {
        u32 tid = (u32)bpf_get_current_pid_tgid();
        u8 one = 1;
        new_sockets.update(&tid, &one);
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_socket)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    if (!new_sockets.lookup(&tid))
        return 0;
    new_sockets.delete(&tid);
    if (args->ret < 0 || !pass_filters(id >> 32))
        return 0;
    struct fd_key fk = {.tgid = id >> 32, .fd = args->ret};
    u16 port = 0;
    tcp_fds.update(&fk, &port);
    /* A new socket on a reused fd number is a new connection. */
    struct conn_key k = {.handle = args->ret, .tgid = id >> 32,
                         .lib = LIB_PLAIN};
    conns.delete(&k);
    ctls.delete(&k);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    struct fd_key fk = {.tgid = bpf_get_current_pid_tgid() >> 32,
                        .fd = args->fd};
    u16 *port = tcp_fds.lookup(&fk);
    if (!port)
        return 0;
    u16 sa[2] = {};   /* sa_family, then the port in network order */
    bpf_probe_read_user(sa, sizeof(sa), (void *)args->uservaddr);
    u16 remote = (sa[1] >> 8) | ((sa[1] & 0xff) << 8);
    __PORT_FILTER__
    *port = remote;
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    struct fd_key fk = {.tgid = bpf_get_current_pid_tgid() >> 32,
                        .fd = args->fd};
    if (!tcp_fds.lookup(&fk))
        return 0;
    tcp_fds.delete(&fk);
    return close_conn((struct pt_regs *)args, LIB_PLAIN, args->fd);
}
#endif

/* Go crypto/tls, register ABI on amd64: receiver in RAX, the []byte in
 * RBX (pointer) and RCX (length); results in RAX. The current goroutine is
 * in R14: a Read is matched to its return by goroutine, since goroutines
 * move between threads while they wait. */
BPF_TABLE("lru_hash", u64, struct call_args, go_calls, 16384);

int go_write_enter(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!ctx->ax || !pass_filters(tgid))
        return 0;
    struct call_args a = {.handle = ctx->ax, .buf = ctx->bx,
                          .start = bpf_ktime_get_ns(), .lib = 5};
    /* Write returns only when all is written or the connection failed. */
    return handle_write(&a, ctx->cx);
}

int go_read_enter(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!ctx->ax || !pass_filters(tgid))
        return 0;
    /* No check of the connection here: net/http's reader goroutine enters
     * Read before the request is written; the return decides. */
    u64 g = ctx->r14;
    u64 cap = ctx->cx;
    bound_value(cap, 0xffffffff);
    struct call_args a = {.handle = ctx->ax, .buf = ctx->bx,
                          .start = bpf_ktime_get_ns(), .lib = 5,
                          .copy_max = cap};
    go_calls.update(&g, &a);
    return 0;
}

int go_read_return(struct pt_regs *ctx)
{
    u64 g = ctx->r14;
    struct call_args *ap = go_calls.lookup(&g);
    if (!ap)
        return 0;
    struct call_args a = *ap;
    go_calls.delete(&g);
    long n = (long)ctx->ax;
    return handle_read(&a, n > 0 ? (u64)n : 0);
}

int go_close_enter(struct pt_regs *ctx)
{
    return close_conn(ctx, 5, ctx->ax);
}

/* Entry points, one set per library family. */
#define IO_PROBES(fam, lib)                                                  \
int fam##_write_enter(struct pt_regs *ctx) {                                 \
    return enter_io(ctx, lib, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, 0); \
}                                                                            \
int fam##_read_enter(struct pt_regs *ctx) {                                  \
    return enter_io(ctx, lib, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, 1); \
}                                                                            \
int fam##_write_exit(struct pt_regs *ctx) { return exit_write(ctx); }        \
int fam##_read_exit(struct pt_regs *ctx) { return exit_read(ctx); }          \
int fam##_close_enter(struct pt_regs *ctx) {                                 \
    return close_conn(ctx, lib, PT_REGS_PARM1(ctx));                         \
}

IO_PROBES(openssl, 1)
IO_PROBES(gnutls, 2)
IO_PROBES(nss, 3)

/* SSL_write_ex/SSL_read_ex(ssl, buf, num, size_t *done): return 1 or 0. */
int openssl_write_ex_enter(struct pt_regs *ctx) {
    return enter_io(ctx, 1, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx),
                    PT_REGS_PARM4(ctx), 0);
}
int openssl_read_ex_enter(struct pt_regs *ctx) {
    return enter_io(ctx, 1, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx),
                    PT_REGS_PARM4(ctx), 1);
}
"""


def bpf_program(pid=None, comm=None, max_conns=65536, ringbuf_pages=1024,
                plain=True, port=None):
    """The C text with filters and sizes compiled in."""
    port_filter = ""
    if port:
        port_filter = ("if (remote != %d) { tcp_fds.delete(&fk); return 0; }"
                       % port)
    pid_filter = "if (tgid != %d) return 0;" % pid if pid else ""
    comm_filter = ""
    if comm:
        want = comm.encode()[:15]
        checks = " || ".join("c[%d] != %d" % (i, b) for i, b in enumerate(want))
        checks += " || c[%d] != 0" % len(want)
        comm_filter = ("char c[TASK_COMM_LEN] = {}; "
                       "bpf_get_current_comm(&c, sizeof(c)); "
                       "if (%s) return 0;" % checks)
    text = BPF_TEXT
    for name, value in (("__MAX_DATA__", MAX_DATA),
                        ("__MAX_WRITE_EVENTS__", MAX_WRITE_EVENTS),
                        ("__MAX_READ_EVENTS__", MAX_READ_EVENTS),
                        ("__HEAD_WINDOW__", HEAD_WINDOW),
                        ("__WAKE_EVERY__", WAKE_EVERY),
                        ("__PLAIN_HTTP__", int(plain)),
                        ("__PORT_FILTER__", port_filter),
                        ("__MAX_CONNS__", max_conns),
                        ("__RINGBUF_PAGES__", ringbuf_pages),
                        ("__PID_FILTER__", pid_filter),
                        ("__COMM_FILTER__", comm_filter)):
        text = text.replace(name, str(value))
    return text


# ---------------------------------------------------------------------------
# Event decoding
# ---------------------------------------------------------------------------

# struct event up to data[]: must match the C layout above.
EVENT_HEAD = struct.Struct("<QQIIIIII BBB5x QQQQQQ 16s")
Event = namedtuple("Event", "ts handle tgid tid len cap seq rphase type lib "
                            "flags req_start req_end req_bytes resp_start "
                            "resp_end resp_bytes comm data")


def decode_event(raw):
    """Event from the bytes of one ring buffer record."""
    fields = EVENT_HEAD.unpack_from(raw)
    cap = fields[5]
    data = bytes(raw[EVENT_HEAD.size:EVENT_HEAD.size + cap])
    comm = fields[-1].split(b"\0", 1)[0].decode("utf-8", "replace")
    return Event(*fields[:-1], comm, data)


# ---------------------------------------------------------------------------
# HTTP/S3 parsing (pure functions)
# ---------------------------------------------------------------------------

HEAD_END = b"\r\n\r\n"
MAX_HEAD = 64 * 1024      # a head larger than this is not buffered further

RequestHead = namedtuple("RequestHead", "method target version headers length")
ResponseHead = namedtuple("ResponseHead", "version status reason headers length")


def _split_head(data):
    """(lines, length) of a complete HTTP head in data, or None."""
    end = data.find(HEAD_END)
    if end < 0:
        return None
    text = data[:end].decode("latin-1")
    return text.split("\r\n"), end + 4


def _parse_headers(lines):
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def parse_request_head(data, partial=False):
    """RequestHead from bytes starting with a request line, else None.

    partial: also from a head cut short (a huge header, a lost write): the
    complete lines only, with length None."""
    split = _split_head(data)
    if split is None:
        cut = data.rfind(b"\r\n") if partial else -1
        if cut < 0:
            return None
        split = data[:cut].decode("latin-1").split("\r\n"), None
    lines, length = split
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] not in HTTP_METHODS or \
            not parts[2].startswith("HTTP/"):
        return None
    return RequestHead(parts[0], parts[1], parts[2], _parse_headers(lines[1:]),
                       length)


def parse_response_head(data):
    """ResponseHead from bytes starting with a status line, else None."""
    split = _split_head(data)
    if split is None:
        return None
    lines, length = split
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or \
            not parts[1].isdigit() or len(parts[1]) != 3:
        return None
    return ResponseHead(parts[0], int(parts[1]),
                        parts[2] if len(parts) > 2 else "",
                        _parse_headers(lines[1:]), length)


def content_length(headers):
    value = headers.get("content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)


def response_framing(method, response):
    """How the response body ends: ('none'|'length'|'chunked'|'close', n)."""
    status = response.status
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return "none", 0
    if "chunked" in response.headers.get("transfer-encoding", "").lower():
        return "chunked", None
    length = content_length(response.headers)
    if length is not None:
        return ("length", length) if length else ("none", 0)
    return "close", None


# Query parameters whose values are secrets (compared lowercased).
SECRET_PARAMS = frozenset((
    "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    "signature", "awsaccesskeyid", "x-amz-s3session-token", "sig",
    "x-goog-signature", "x-goog-credential", "access_token", "token"))


def redact_target(target):
    """The request target with secret query values replaced by REDACTED."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    params = []
    for param in query.split("&"):
        name, eq, _value = param.partition("=")
        if eq and unquote(name).lower() in SECRET_PARAMS:
            param = name + "=REDACTED"
        params.append(param)
    return path + "?" + "&".join(params)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def escape_text(text):
    """Control characters and backslashes as \\xNN: one request, one line."""
    if text is None:
        return None
    return _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()), text)


S3Target = namedtuple("S3Target", "endpoint bucket key query")

_AWS_VHOST = re.compile(
    r"^(?P<bucket>.+)\.(?P<endpoint>s3[.-](?:[a-z0-9-]+\.)*amazonaws\.com(?:\.cn)?)$")
_IP_HOST = re.compile(r"^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:.]+\])$")


def split_host_port(host):
    """('host', 'port' or None) for Host header values incl. IPv6 literals."""
    if host.startswith("["):
        end = host.find("]")
        if end > 0:
            port = host[end + 2:] if host[end + 1:end + 2] == ":" else None
            return host[:end + 1], port or None
        return host, None
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        return name, port
    return host, None


def parse_query(query):
    params = {}
    if query:
        for part in query.split("&"):
            name, _eq, value = part.partition("=")
            params[unquote(name).lower()] = unquote(value)
    return params


def s3_target(host, target, bucket_hosts=()):
    """Endpoint, bucket, key and query of an S3 request.

    Virtual-hosted style when the Host has a bucket label in front of an
    AWS S3 endpoint, or of a `s3.` / known custom endpoint; path style
    otherwise.
    """
    host = (host or "").strip().lower()
    name, port = split_host_port(host)
    path, _sep, query = target.partition("?")
    if path.startswith("http://") or path.startswith("https://"):
        path = "/" + path.split("/", 3)[-1] if path.count("/") >= 3 else "/"
    bucket = None
    endpoint = name
    match = _AWS_VHOST.match(name)
    if match and not match.group("bucket").startswith("s3"):
        bucket, endpoint = match.group("bucket"), match.group("endpoint")
    elif not _IP_HOST.match(name):
        label, dot, rest = name.partition(".")
        if dot and (rest.startswith("s3.") or rest.startswith("s3-") or
                    rest in bucket_hosts) and label not in ("s3", "www"):
            bucket, endpoint = label, rest
    if port:
        endpoint = "%s:%s" % (endpoint, port)
    segments = path.lstrip("/")
    if bucket is None:
        first, slash, rest = segments.partition("/")
        bucket = unquote(first) or None
        key = unquote(rest) if slash and rest else None
    else:
        key = unquote(segments) or None
    return S3Target(endpoint or None, bucket, key, parse_query(query))


def s3_operation(method, target, headers):
    """S3 API operation name, or None when the request is not S3-shaped."""
    bucket, key, q = target.bucket, target.key, target.query
    if method == "GET":
        if bucket is None:
            return "ListBuckets"
        if key is None:
            for param, op in (("uploads", "ListMultipartUploads"),
                              ("versions", "ListObjectVersions"),
                              ("location", "GetBucketLocation"),
                              ("policy", "GetBucketPolicy"),
                              ("acl", "GetBucketAcl"),
                              ("tagging", "GetBucketTagging"),
                              ("versioning", "GetBucketVersioning"),
                              ("lifecycle", "GetBucketLifecycleConfiguration"),
                              ("cors", "GetBucketCors")):
                if param in q:
                    return op
            return "ListObjectsV2" if q.get("list-type") == "2" \
                else "ListObjects"
        if "uploadid" in q:
            return "ListParts"
        for param, op in (("tagging", "GetObjectTagging"),
                          ("acl", "GetObjectAcl"),
                          ("attributes", "GetObjectAttributes"),
                          ("retention", "GetObjectRetention"),
                          ("legal-hold", "GetObjectLegalHold")):
            if param in q:
                return op
        return "GetObject"
    if method == "HEAD":
        if bucket is None:
            return None
        return "HeadObject" if key else "HeadBucket"
    if method == "PUT":
        if bucket is None:
            return None
        if key is None:
            for param, op in (("policy", "PutBucketPolicy"),
                              ("acl", "PutBucketAcl"),
                              ("tagging", "PutBucketTagging"),
                              ("versioning", "PutBucketVersioning"),
                              ("lifecycle", "PutBucketLifecycleConfiguration"),
                              ("cors", "PutBucketCors")):
                if param in q:
                    return op
            return "CreateBucket"
        if "partnumber" in q and "uploadid" in q:
            return "UploadPartCopy" if "x-amz-copy-source" in headers \
                else "UploadPart"
        for param, op in (("tagging", "PutObjectTagging"),
                          ("acl", "PutObjectAcl"),
                          ("retention", "PutObjectRetention"),
                          ("legal-hold", "PutObjectLegalHold")):
            if param in q:
                return op
        if "x-amz-copy-source" in headers:
            return "CopyObject"
        return "PutObject"
    if method == "DELETE":
        if bucket is None:
            return None
        if key is None:
            for param, op in (("policy", "DeleteBucketPolicy"),
                              ("tagging", "DeleteBucketTagging"),
                              ("lifecycle", "DeleteBucketLifecycle"),
                              ("cors", "DeleteBucketCors")):
                if param in q:
                    return op
            return "DeleteBucket"
        if "uploadid" in q:
            return "AbortMultipartUpload"
        if "tagging" in q:
            return "DeleteObjectTagging"
        return "DeleteObject"
    if method == "POST":
        if bucket is None:
            return None
        if key is None:
            if "delete" in q:
                return "DeleteObjects"
            if "multipart/form-data" in headers.get("content-type", ""):
                return "PostObject"
            return None
        if "uploads" in q:
            return "CreateMultipartUpload"
        if "uploadid" in q:
            return "CompleteMultipartUpload"
        if "restore" in q:
            return "RestoreObject"
        if "select" in q:
            return "SelectObjectContent"
        return None
    return None


S3_OPERATIONS = frozenset("""
GetObject PutObject HeadObject DeleteObject DeleteObjects CopyObject
ListObjectsV2 ListObjects ListObjectVersions ListBuckets HeadBucket
CreateBucket DeleteBucket GetBucketLocation CreateMultipartUpload UploadPart
UploadPartCopy CompleteMultipartUpload AbortMultipartUpload ListParts
ListMultipartUploads GetObjectTagging PutObjectTagging DeleteObjectTagging
GetObjectAcl PutObjectAcl GetBucketPolicy PutBucketPolicy DeleteBucketPolicy
PostObject RestoreObject SelectObjectContent GetBucketAcl PutBucketAcl
GetBucketTagging PutBucketTagging DeleteBucketTagging GetBucketVersioning
PutBucketVersioning GetBucketLifecycleConfiguration
PutBucketLifecycleConfiguration DeleteBucketLifecycle GetBucketCors
PutBucketCors DeleteBucketCors GetObjectAttributes GetObjectRetention
PutObjectRetention GetObjectLegalHold PutObjectLegalHold
""".split())

_ERROR_CODE = re.compile(rb"<Code>([A-Za-z0-9.\-_]{1,64})</Code>")


def s3_error_code(body):
    match = _ERROR_CODE.search(body)
    return match.group(1).decode("ascii") if match else None


def is_s3_request(headers, target):
    """Whether the request carries S3 signing or S3 headers."""
    auth = headers.get("authorization", "")
    if auth.startswith("AWS4-HMAC-SHA256") or auth.startswith("AWS "):
        return True
    if any(name.startswith("x-amz-") for name in headers):
        return True
    return any(p in target.query for p in ("x-amz-signature", "signature"))


# ---------------------------------------------------------------------------
# Request assembly
# ---------------------------------------------------------------------------

# One completed (or abandoned) request: what every output prints.
Request = namedtuple("Request", """start_ns pid tid comm lib host endpoint method
    path bucket key op status req_bytes resp_bytes ttfb_ms latency_ms
    turnaround_ms request_id error_code complete""")

NS_PER_MS = 1e6


def time_at(calls, offset):
    """Time of the call that moved the byte at offset, from (end offset,
    time) pairs in stream order."""
    for end, ts in calls:
        if end > offset:
            return ts
    return calls[-1][1] if calls else None


class Exchange:
    """One request on one connection, from its first write to its end."""

    __slots__ = ("seq", "tid", "comm", "start_ns", "req_end", "req_buf",
                 "req", "req_rest", "rphase", "resp_buf", "resp",
                 "resp_offset", "resp_first", "head_reads", "framing",
                 "expect", "body", "decided", "last")

    def __init__(self, event):
        self.seq = event.seq
        self.tid = event.tid
        self.comm = event.comm
        self.start_ns = event.req_start
        self.req_end = event.req_end
        self.req_buf = event.data
        self.req = None
        self.req_rest = b""      # bytes after the request: pipelined ones
        self.rphase = None
        self.resp_buf = b""
        self.resp = None
        self.resp_offset = 0     # start of the final response's head
        self.resp_first = None   # its first read, when not the phase's first
        self.head_reads = []     # (end offset, time) of reads before the head
        self.framing = None
        self.expect = None
        self.body = b""
        self.decided = False
        self.last = event


class PipelinedRequest:
    """One request of a pipelining connection, in the shape build_request
    takes from an Exchange."""

    __slots__ = ("req", "tid", "comm", "start_ns", "end_ns", "offset",
                 "resp", "resp_start", "resp_begin", "resp_offset", "body",
                 "body_offset", "framing", "resp_end_offset", "resp_first")

    def __init__(self, req, tid, comm, start_ns, end_ns, offset):
        self.req, self.tid, self.comm = req, tid, comm
        self.start_ns, self.end_ns, self.offset = start_ns, end_ns, offset
        self.resp = self.resp_start = self.framing = None
        self.resp_begin = self.resp_end_offset = self.body_offset = None
        self.resp_first = None    # resp_start is already the final response's
        self.resp_offset = 0
        self.body = b""


class Pipeline:
    """A connection whose client sent a request before reading the previous
    response (HTTP pipelining).

    The kernel then sends every write and read with stream offsets in its
    counters; requests are split by their framing and answered in order
    (RFC 9112 9.3.2). feed() and abandon() return the finished requests as
    (PipelinedRequest, event, complete) triples.
    """

    def __init__(self, ex, event):
        self.seq = event.seq
        self.last = event
        self.pending = deque()
        self.next_request = None     # offset of the next request head
        self.wbuf, self.wbuf_offset = b"", 0
        self.writes = deque()        # (end offset, entry time) of writes
        self.rbuf, self.rbuf_offset = b"", 0
        self.reads = deque()         # (end offset, return time) of reads
        self.next_response = 0
        if ex is None:
            return
        self.pending.append(PipelinedRequest(ex.req, ex.tid, ex.comm,
                                             ex.start_ns, ex.req_end, 0))
        self.next_request = self._request_end(ex.req, 0)
        if ex.req_rest:
            # The rest of the first write: more requests behind the first.
            self.wbuf_offset = self.next_request
            self.wbuf = ex.req_rest
            end = self.next_request + len(ex.req_rest)
            self.writes.append((end, ex.req_end))
            self._parse_requests(ex.last, end)

    @staticmethod
    def _request_end(head, offset):
        """Offset after head and its body, None if the body has no length."""
        if head is None or "transfer-encoding" in head.headers:
            return None
        return offset + head.length + (content_length(head.headers) or 0)

    def feed(self, event):
        self.last = event
        if event.type == EV_WRITE:
            self._write(event)
            return []
        if event.type in (EV_READ, EV_DONE):
            return self._read(event)
        if event.type == EV_CLOSE:
            return self._close(event)
        return []

    def _write(self, event):
        start = event.req_bytes - event.len
        end = event.req_bytes
        self.writes.append((end, event.req_end))
        if self.next_request is None and (
                parse_request_head(event.data) or
                event.data[:4].rstrip() in HTTP_METHOD_PREFIXES):
            self.next_request = start   # a request at a write boundary
        if start != self.wbuf_offset + len(self.wbuf):
            self.wbuf, self.wbuf_offset = b"", start
        self.wbuf += event.data
        self._parse_requests(event, end, truncated=event.cap < event.len)
        for item in self.pending:
            if item.offset < end and item.resp is None:
                item.end_ns = event.req_end
        while len(self.writes) > 1 and self.writes[0][0] <= \
                (self.pending[0].offset if self.pending else end):
            self.writes.popleft()

    def _parse_requests(self, event, end, truncated=False):
        """Queue the request heads that start in the write buffer."""
        while self.next_request is not None and \
                self.wbuf_offset <= self.next_request < end:
            rel = self.next_request - self.wbuf_offset
            head = parse_request_head(self.wbuf[rel:])
            if head is None:
                if len(self.wbuf) - rel > MAX_HEAD or truncated:
                    self.next_request = None
                break
            offset = self.next_request
            self.pending.append(PipelinedRequest(
                head, event.tid, event.comm,
                time_at(self.writes, offset), event.req_end, offset))
            self.next_request = self._request_end(head, offset)
        # Keep only what a later head may still need.
        keep = self.next_request if self.next_request is not None else end
        if truncated or keep >= end:
            self.wbuf, self.wbuf_offset = b"", end
        elif keep > self.wbuf_offset:
            self.wbuf = self.wbuf[keep - self.wbuf_offset:]
            self.wbuf_offset = keep

    def _read(self, event):
        start = event.resp_bytes - event.len
        end = event.resp_bytes
        self.reads.append((end, event.ts))
        if start != self.rbuf_offset + len(self.rbuf):
            self.rbuf, self.rbuf_offset = b"", start
        self.rbuf += event.data
        done = []
        while self.pending:
            item = self.pending[0]
            if item.resp is None and not self._response_head(item, end):
                break
            if item.resp_end_offset is None and item.framing == "chunked":
                rel = max(item.resp_begin + item.resp_offset +
                          item.resp.length - 2 - self.rbuf_offset, 0)
                found = self.rbuf.find(b"\r\n0\r\n\r\n", rel)
                if found >= 0:
                    item.resp_end_offset = self.rbuf_offset + found + 7
            if item.resp_end_offset is None or item.resp_end_offset > end:
                break
            self.pending.popleft()
            self.next_response = item.resp_end_offset
            body = item.body_offset - self.rbuf_offset
            if body >= 0:   # error bodies are short: whole in the buffer
                item.body = self.rbuf[body:body + MAX_DATA]
            done.append(self._finished(item, event, True))
        if event.cap < event.len:
            self.rbuf, self.rbuf_offset = b"", end   # the rest is body
        elif self.next_response > self.rbuf_offset:
            cut = min(self.next_response - self.rbuf_offset, len(self.rbuf))
            self.rbuf = self.rbuf[cut:]
            self.rbuf_offset += cut
        if len(self.rbuf) > MAX_HEAD:
            self.rbuf, self.rbuf_offset = b"", end
        while len(self.reads) > 1 and self.reads[0][0] <= self.next_response:
            self.reads.popleft()
        return done

    def _response_head(self, item, end):
        """Parse the head of item's response if its bytes are here."""
        while True:
            at = self.next_response + item.resp_offset
            rel = at - self.rbuf_offset
            if at >= end or rel < 0 or rel > len(self.rbuf):
                return False
            head = parse_response_head(self.rbuf[rel:])
            if head is None:
                return False
            item.resp_begin = self.next_response
            if 100 <= head.status < 200:
                item.resp_offset += head.length
                continue
            item.resp = head
            item.resp_start = time_at(self.reads, at)
            item.body_offset = at + head.length
            method = item.req.method if item.req else None
            item.framing, length = response_framing(method, head)
            if item.framing in ("none", "length"):
                item.resp_end_offset = at + head.length + (length or 0)
            return True

    def _finished(self, item, event, complete, end_offset=None):
        if end_offset is None:
            end_offset = item.resp_end_offset
        resp_end = None
        if item.resp is not None and end_offset:
            resp_end = time_at(self.reads, end_offset - 1)
        following = self.pending[0].offset if self.pending else \
            event.req_bytes
        begin = item.resp_begin if item.resp_begin is not None else 0
        return item, event._replace(
            req_start=item.start_ns, req_end=item.end_ns,
            req_bytes=max(following - item.offset, 0),
            resp_start=item.resp_start or 0, resp_end=resp_end or 0,
            resp_bytes=max((end_offset or begin) - begin, 0)), complete

    def _close(self, event):
        done = []
        while self.pending:
            item = self.pending.popleft()
            until_close = item.framing == "close"
            end = event.resp_bytes if until_close else item.resp_end_offset
            done.append(self._finished(item, event, until_close, end))
        return done

    def abandon(self):
        """Every request still waiting, as incomplete."""
        done = []
        while self.pending:
            item = self.pending.popleft()
            done.append(self._finished(item, self.last, False))
        return done


class Assembler:
    """Turns decoded events into completed Requests.

    control(event, mode, expect, stream) asks the kernel to finish the body
    alone; peek(event) returns the kernel's current (resp_bytes, resp_end,
    chunk_end, rphase, reads) for the event's connection or None. Both default to
    no-ops so tests can drive it with synthetic events.
    """

    def __init__(self, emit, control=None, peek=None, include_unknown=False,
                 max_conns=65536):
        self.emit = emit
        self.control = control or (lambda *a: None)
        self.peek = peek or (lambda e: None)
        self.include_unknown = include_unknown
        self.max_conns = max_conns
        self.conns = OrderedDict()   # (tgid, lib, handle) -> Exchange
        self.incomplete = 0

    def feed(self, event):
        kind = event.type
        if kind == EV_EXIT:
            self._process_exit(event.tgid)
            return
        key = (event.tgid, event.lib, event.handle)
        ex = self.conns.get(key)
        if event.flags & FLAG_PIPELINED and not isinstance(ex, Pipeline):
            ex = Pipeline(ex, event)
            self._remember(key, ex)
        if isinstance(ex, Pipeline):
            for item, ended, complete in ex.feed(event):
                self._report(item, ended, complete)
            if kind == EV_CLOSE:
                self.conns.pop(key, None)
            return
        if kind == EV_WRITE:
            if ex is not None and event.seq != ex.seq:
                # A new request on a connection whose previous one did not
                # finish (pipelining, a lost event, a reset connection).
                self._finish(key, ex, ex.last, complete=False)
                ex = None
            if ex is None:
                ex = Exchange(event)
                self._remember(key, ex)
            else:
                if ex.req is None and len(ex.req_buf) < MAX_HEAD:
                    ex.req_buf += event.data
            ex.last = event
            ex.req_end = event.req_end
            if ex.req is None:
                ex.req = parse_request_head(ex.req_buf)
                if ex.req is not None:
                    end = Pipeline._request_end(ex.req, 0)
                    if end is not None and \
                            ex.req_buf[end:end + 4].rstrip() in \
                            HTTP_METHOD_PREFIXES:
                        # Several requests in one write: pipelining the
                        # kernel cannot see. Make it stream this connection.
                        ex.req_rest = ex.req_buf[end:]
                        self.control(event, MODE_PIPELINED, 0, True)
                        self._remember(key, Pipeline(ex, event))
                    ex.req_buf = b""
            return
        if ex is None or event.seq != ex.seq:
            return   # the rest of an exchange already reported
        ex.last = event
        if kind == EV_CLOSE:
            self._finish(key, ex, event, complete=self._body_done(ex, event))
            return
        if event.rphase != ex.rphase:
            # A new read phase: a final response after 100 Continue.
            ex.rphase = event.rphase
            ex.resp_buf, ex.resp = b"", None
            ex.body, ex.decided, ex.resp_offset = b"", False, 0
            ex.head_reads, ex.resp_first = [], None
        if ex.resp is None:
            ex.head_reads.append((event.resp_bytes, event.ts))
            self._read_head(ex, event)
            if ex.resp is None:
                return
        elif len(ex.body) < MAX_DATA:
            ex.body += event.data[:MAX_DATA - len(ex.body)]
        if kind == EV_DONE or self._body_done(ex, event):
            self._finish(key, ex, event, complete=True)
        elif not ex.decided:
            self._decide(key, ex, event)

    def _read_head(self, ex, event):
        if len(ex.resp_buf) < MAX_HEAD:
            ex.resp_buf += event.data
        while True:
            head = parse_response_head(ex.resp_buf)
            if head is None:
                return
            if 100 <= head.status < 200:
                # Interim response: the final one follows in the buffer.
                ex.resp_offset += head.length
                ex.resp_buf = ex.resp_buf[head.length:]
                continue
            ex.resp = head
            if ex.resp_offset:
                # After an interim response in the same read phase: the
                # final response starts later than the phase's first read.
                ex.resp_first = time_at(ex.head_reads, ex.resp_offset)
            ex.head_reads = None
            ex.body = ex.resp_buf[head.length:head.length + MAX_DATA]
            ex.resp_buf = b""
            method = ex.req.method if ex.req else None
            ex.framing, length = response_framing(method, head)
            ex.expect = ex.resp_offset + head.length + (length or 0)
            return

    def _body_done(self, ex, event):
        """Whether the kernel counters in event show the body complete."""
        if ex.resp is None:
            return False
        if ex.framing == "none":
            return True
        if ex.framing == "length":
            return event.resp_bytes >= ex.expect
        if ex.framing == "chunked":
            return bool(event.flags & FLAG_CHUNK_END)
        return event.type == EV_CLOSE     # body ends with the connection

    def _decide(self, key, ex, event):
        """Hand the rest of the body to the kernel, closing the race."""
        ex.decided = True
        mode = {"length": MODE_LENGTH, "chunked": MODE_CHUNKED}.get(
            ex.framing, MODE_CLOSE)
        stream = ex.resp.status >= 300
        self.control(event, mode, ex.expect or 0, stream)
        now = self.peek(event)
        if now is None:
            return
        resp_bytes, resp_end, chunk_end, rphase, reads = now
        if rphase != event.rphase or reads <= MAX_READ_EVENTS or \
                resp_bytes <= HEAD_WINDOW:
            return   # every read so far was sent: its event will finish it
        done = (mode == MODE_LENGTH and resp_bytes >= ex.expect) or \
               (mode == MODE_CHUNKED and chunk_end)
        if done:
            self._finish(key, ex, event._replace(resp_bytes=resp_bytes,
                                                 resp_end=resp_end),
                         complete=True)

    def _remember(self, key, ex):
        self.conns[key] = ex
        self.conns.move_to_end(key)
        while len(self.conns) > self.max_conns:
            old_key, old = self.conns.popitem(last=False)
            self._finish(old_key, old, old.last, complete=False, pop=False)

    def _process_exit(self, tgid):
        for key in [k for k in self.conns if k[0] == tgid]:
            ex = self.conns[key]
            self._finish(key, ex, ex.last, complete=False)

    def flush(self):
        """Report every unfinished request as incomplete (at exit)."""
        for key, ex in list(self.conns.items()):
            self._finish(key, ex, ex.last, complete=False)

    def _finish(self, key, ex, event, complete, pop=True):
        if pop:
            self.conns.pop(key, None)
        if isinstance(ex, Pipeline):
            for item, ended, complete in ex.abandon():
                self._report(item, ended, complete)
        else:
            if ex.req is None and ex.req_buf:
                ex.req = parse_request_head(ex.req_buf, partial=True)
            self._report(ex, event, complete)

    def _report(self, ex, event, complete):
        if not complete:
            self.incomplete += 1
        request = build_request(ex, event, complete)
        if request is not None and (request.method or self.include_unknown):
            self.emit(request)


def build_request(ex, event, complete):
    """The Request for an exchange, from its parsed heads and kernel times."""
    req, resp = ex.req, ex.resp
    method = host = path = op = target = None
    headers = {}
    if req is not None:
        method, headers = req.method, req.headers
        host = headers.get("host")
        path = redact_target(req.target)
        target = s3_target(host, req.target)
        op = s3_operation(method, target, headers)
        if op is not None and not is_s3_request(headers, target) and \
                target.key is None and method == "GET":
            op = None   # a plain GET / of a web server is not ListBuckets
    req_bytes = None
    if req is not None and req.length is not None:
        req_bytes = max(event.req_bytes - req.length, 0)
    status = resp.status if resp else None
    resp_bytes = None
    if resp is not None and event.resp_bytes:
        resp_bytes = max(event.resp_bytes - ex.resp_offset - resp.length, 0)
    start = ex.start_ns
    first = ex.resp_first or event.resp_start
    ttfb = turnaround = latency = None
    if first and first >= start:
        ttfb = (first - start) / NS_PER_MS
        if first >= event.req_end:
            turnaround = (first - event.req_end) / NS_PER_MS
        # An unfinished response has no end time: its last byte is unknown.
        if resp is not None and event.resp_end and complete:
            latency = (event.resp_end - start) / NS_PER_MS
    error_code = None
    request_id = None
    if resp is not None:
        request_id = resp.headers.get("x-amz-request-id")
        if status >= 300:
            error_code = s3_error_code(ex.body) or \
                resp.headers.get("x-amz-error-code")
    return Request(
        start_ns=start, pid=event.tgid, tid=ex.tid, comm=ex.comm,
        lib=LIB_NAMES.get(event.lib, "unknown"), host=host,
        endpoint=target.endpoint if target else None, method=method,
        path=path, bucket=target.bucket if target else None,
        key=target.key if target else None, op=op, status=status,
        req_bytes=req_bytes, resp_bytes=resp_bytes, ttfb_ms=ttfb,
        latency_ms=latency, turnaround_ms=turnaround, request_id=request_id,
        error_code=error_code, complete=complete)


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------

class LatencyHistogram:
    """Log-bucketed histogram: quantiles within RELATIVE_ERROR, bounded size.

    Bucket i holds values in (gamma^(i-1), gamma^i]; reporting the bucket's
    midpoint (in the relative sense) keeps every quantile within alpha of a
    true sample value. Values below MIN_VALUE share one bucket.
    """

    RELATIVE_ERROR = 0.01
    MIN_VALUE = 1e-3      # ms: 1 µs

    def __init__(self, alpha=RELATIVE_ERROR):
        self.alpha = alpha
        self.gamma = (1 + alpha) / (1 - alpha)
        self.log_gamma = math.log(self.gamma)
        self.buckets = defaultdict(int)
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.min = math.inf

    def add(self, value):
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value
        if value < self.min:
            self.min = value
        if value <= self.MIN_VALUE:
            index = 0
        else:
            index = max(1, math.ceil(math.log(value / self.MIN_VALUE) /
                                     self.log_gamma))
        self.buckets[index] += 1

    def merge(self, other):
        for index, n in other.buckets.items():
            self.buckets[index] += n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        self.min = min(self.min, other.min)

    def quantile(self, q):
        """Value at quantile q (0..1) by nearest rank, or None when empty."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                if index == 0:
                    value = self.MIN_VALUE
                else:
                    value = self.MIN_VALUE * 2 * self.gamma ** index / \
                        (self.gamma + 1)
                return min(max(value, self.min), self.max)
        return self.max


class StatsTable:
    """Latency histograms and error counts per (group, row) key."""

    def __init__(self):
        self.rows = defaultdict(LatencyHistogram)
        self.errors = defaultdict(int)

    def add(self, group, row, latency_ms, is_error):
        self.rows[(group, row)].add(latency_ms)
        if is_error:
            self.errors[(group, row)] += 1

    def render(self, title, row_label):
        """Tables as text: one per group, rows sorted by count."""
        groups = defaultdict(list)
        for (group, row), hist in self.rows.items():
            groups[group].append((row, hist))
        out = []
        for group in sorted(groups, key=lambda g: (-sum(h.count for _, h in
                                                        groups[g]), g)):
            rows = sorted(groups[group], key=lambda r: (-r[1].count, r[0]))
            out.append("=== %s %s ===" % (title, escape_text(group)))
            width = max([len(row_label)] + [len(escape_text(r)) for r, _ in rows])
            # The seed's columns first (scripts read them), then ours.
            out.append("%-*s %7s %9s %9s %9s %9s %7s" % (
                width, row_label, "Count", "p50(ms)", "p90(ms)", "p99(ms)",
                "max(ms)", "Errors"))
            for row, hist in rows:
                out.append("%-*s %7d %9.2f %9.2f %9.2f %9.2f %7d" % (
                    width, escape_text(row), hist.count, hist.quantile(0.5),
                    hist.quantile(0.9), hist.quantile(0.99), hist.max,
                    self.errors[(group, row)]))
            out.append("")
        return "\n".join(out)


class LabelCap:
    """Bounded label values: at most N hosts, and N host+bucket pairs; the
    rest become 'other', so a scan over millions of buckets stays small."""

    def __init__(self, limit):
        self.limit = limit
        self.hosts = set()
        self.pairs = set()

    @staticmethod
    def _admit(seen, value, limit):
        if value in seen:
            return True
        if len(seen) < limit:
            seen.add(value)
            return True
        return False

    def host(self, host):
        host = escape_text(host) if host else "none"
        return host if self._admit(self.hosts, host, self.limit) else "other"

    def pair(self, host, bucket):
        """(host, bucket) label values."""
        host = self.host(host)
        bucket = escape_text(bucket) if bucket else "none"
        if self._admit(self.pairs, (host, bucket), self.limit):
            return host, bucket
        return host, "other"


class Statistics:
    """The tables: per host × method, per endpoint × S3 operation and, when
    asked, per endpoint × bucket (buckets capped like metric labels)."""

    TABLES = {"method": ("Statistics for", "Method"),
              "op": ("S3 operations for", "Operation"),
              "bucket": ("Buckets for", "Bucket")}

    def __init__(self, by=None, max_buckets=100):
        self.kinds = (by,) if by else ("method", "op")
        self.tables = {kind: StatsTable() for kind in self.kinds}
        self.cap = LabelCap(max_buckets)

    def add(self, request):
        if request.latency_ms is None:
            return
        is_error = request.status is None or request.status >= 400 or \
            not request.complete
        endpoint = request.endpoint or request.host or "-"
        for kind, table in self.tables.items():
            if kind == "method":
                table.add(request.host or "-", request.method or "-",
                          request.latency_ms, is_error)
            elif kind == "op" and request.op:
                table.add(endpoint, request.op, request.latency_ms, is_error)
            elif kind == "bucket" and request.bucket:
                host, bucket = self.cap.pair(endpoint, request.bucket)
                table.add(host, bucket, request.latency_ms, is_error)

    def render(self):
        parts = [self.tables[kind].render(*self.TABLES[kind])
                 for kind in self.kinds if self.tables[kind].rows]
        return "\n".join(parts) if parts else "(no requests)\n"


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------

def request_matches(request, args):
    """User-space filters that need the parsed request."""
    if args.method and request.method != args.method:
        return False
    if args.host_substr and args.host_substr not in (request.host or ""):
        return False
    if args.op and request.op != args.op:
        return False
    if args.bucket and request.bucket != args.bucket:
        return False
    if args.min_lat_ms and (request.latency_ms is None or
                            request.latency_ms < args.min_lat_ms):
        return False
    return True


class Clock:
    """Kernel monotonic nanoseconds to wall-clock time."""

    def __init__(self):
        self.offset = time.time() - time.monotonic()

    def wall(self, ns):
        return ns / 1e9 + self.offset


def _fmt_ms(value):
    return "-" if value is None else "%.2f" % value


def _fmt_int(value):
    return "-" if value is None else str(value)


# OP fits the longest operation name (CompleteMultipartUpload).
TEXT_FORMAT = "%-12s %-7s %9s %9s %-15s %-24s %-7s %-23s %6s %10s %10s %s"
TEXT_HEADER = TEXT_FORMAT % (
    "TIME", "PID", "LAT(ms)", "TTFB(ms)", "COMM", "HOST", "METHOD", "OP",
    "STATUS", "REQ_B", "RESP_B", "PATH")


def format_text(request, clock):
    when = datetime.datetime.fromtimestamp(clock.wall(request.start_ns))
    status = _fmt_int(request.status) + ("" if request.complete else "!")
    return TEXT_FORMAT % (
        when.strftime("%H:%M:%S.%f")[:12], request.pid,
        _fmt_ms(request.latency_ms), _fmt_ms(request.ttfb_ms),
        escape_text(request.comm), escape_text(request.host or "-"),
        request.method or "-", request.op or "-", status,
        _fmt_int(request.req_bytes), _fmt_int(request.resp_bytes),
        escape_text(request.path or "-"))


def _round(value):
    return None if value is None else round(value, 3)


def format_json(request, clock):
    ts = datetime.datetime.fromtimestamp(clock.wall(request.start_ns),
                                         datetime.timezone.utc)
    record = OrderedDict([
        ("ts", ts.isoformat(timespec="microseconds").replace("+00:00", "Z")),
        ("pid", request.pid), ("tid", request.tid), ("comm", request.comm),
        ("lib", request.lib), ("host", request.host),
        ("endpoint", request.endpoint), ("method", request.method),
        ("path", request.path), ("bucket", request.bucket),
        ("key", request.key), ("op", request.op), ("status", request.status),
        ("req_bytes", request.req_bytes), ("resp_bytes", request.resp_bytes),
        ("ttfb_ms", _round(request.ttfb_ms)),
        ("latency_ms", _round(request.latency_ms)),
        ("turnaround_ms", _round(request.turnaround_ms)),
        ("request_id", request.request_id),
        ("error_code", request.error_code), ("complete", request.complete),
    ])
    # ensure_ascii escapes every control character: one object, one line.
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


# Buckets in seconds: 1 ms to 2 min.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class PrometheusOutput:
    """Metrics for one registry, served by prometheus_client."""

    def __init__(self, max_label_values, registry=None):
        from prometheus_client import (CollectorRegistry, Counter, Gauge,
                                       Histogram)
        from prometheus_client import ProcessCollector, PlatformCollector
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        self.cap = LabelCap(max_label_values)
        labels = ("host", "method", "op", "bucket")
        self.duration = Histogram(
            "s3slower_request_duration_seconds",
            "Request latency: first byte written to last byte read.",
            labels, buckets=LATENCY_BUCKETS, registry=registry)
        self.ttfb = Histogram(
            "s3slower_time_to_first_byte_seconds",
            "First byte of the request written to first byte of the response.",
            labels, buckets=LATENCY_BUCKETS, registry=registry)
        self.requests = Counter(
            "s3slower_requests", "Requests seen.", labels + ("status",),
            registry=registry)
        self.req_bytes = Counter(
            "s3slower_request_bytes", "Request body bytes sent.", labels,
            registry=registry)
        self.resp_bytes = Counter(
            "s3slower_response_bytes", "Response body bytes received.",
            labels, registry=registry)
        self.lost = Counter(
            "s3slower_lost_events", "Kernel events lost (ring buffer full).",
            registry=registry)
        self.probes = Gauge(
            "s3slower_attached_probes", "Uprobes attached, per family.",
            ("lib",), registry=registry)

    def add(self, request):
        host, bucket = self.cap.pair(request.endpoint or request.host,
                                     request.bucket)
        values = (host, request.method or "none", request.op or "none",
                  bucket)
        status = str(request.status) if request.status else "none"
        self.requests.labels(*values, status).inc()
        if request.latency_ms is not None:
            self.duration.labels(*values).observe(request.latency_ms / 1e3)
        if request.ttfb_ms is not None:
            self.ttfb.labels(*values).observe(request.ttfb_ms / 1e3)
        if request.req_bytes:
            self.req_bytes.labels(*values).inc(request.req_bytes)
        if request.resp_bytes:
            self.resp_bytes.labels(*values).inc(request.resp_bytes)

    def serve(self, port, addr):
        from prometheus_client import start_http_server
        start_http_server(port, addr=addr, registry=self.registry)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

class Fatal(Exception):
    """An error the user must fix: printed as one line, exit 2."""


def log(message):
    sys.stderr.write("s3slower: %s\n" % message)
    sys.stderr.flush()


def progress(message):
    """Start-up progress on stderr, unprefixed ("Tracing ..." starts a line)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


BCC_HINT = "install it with ./install.sh (Debian/Ubuntu: apt-get install python3-bpfcc)"


def find_bcc_python():
    """Another interpreter on this host that can import bcc, or None."""
    me = os.path.realpath(sys.executable)
    candidates = ["/usr/bin/python3"] + sorted(
        glob.glob("/usr/bin/python3.[0-9]*"), reverse=True) + \
        ["/usr/local/bin/python3", "/usr/libexec/platform-python"]
    for cand in candidates:
        if not os.access(cand, os.X_OK) or os.path.realpath(cand) == me \
                or cand.endswith("-config"):
            continue
        try:
            ok = subprocess.run([cand, "-c", "import bcc"], timeout=20,
                                capture_output=True).returncode == 0
        except (OSError, subprocess.SubprocessError):
            continue
        if ok:
            return cand
    return None


def import_bcc():
    """The bcc module, re-executing under an interpreter that has it."""
    try:
        import bcc
        return bcc
    except ImportError:
        pass
    if not os.environ.get("S3SLOWER_REEXEC"):
        python = find_bcc_python()
        if python:
            os.environ["S3SLOWER_REEXEC"] = "1"
            os.execv(python, [python, os.path.abspath(__file__)] + sys.argv[1:])
    raise Fatal("BCC's Python module (bcc) is not installed for %s; %s" % (
        sys.executable, BCC_HINT))


def ensure_tracefs():
    """BCC reads tracefs for tracepoints; mount it when nothing has."""
    for path in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.exists(os.path.join(path, "events")):
            return
    try:
        subprocess.run(["mount", "-t", "tracefs", "tracefs",
                        "/sys/kernel/tracing"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        pass


def check_kernel_headers():
    release = os.uname().release
    build = "/lib/modules/%s/build" % release
    if os.path.exists(os.path.join(build, "include")) or \
            os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return
    raise Fatal("kernel headers for %s are missing (no %s); run ./install.sh, "
                "or apt-get install linux-headers-%s" % (release, build, release))


def selected_families(args):
    chosen = [name for name in FAMILIES if getattr(args, name)]
    return chosen or list(FAMILIES)


def forced_libraries(args):
    extra = []
    for family, option, paths in (
            ("openssl", "--libssl", args.libssl),
            ("gnutls", "--libgnutls", args.libgnutls),
            ("nss", "--libnss", args.libnss),
            ("go", "--go-binary", args.go_binary)):
        for path in paths:
            if not os.path.isfile(path):
                raise Fatal("%s: no such file (given with %s)" % (path,
                                                                   option))
            extra.append((family, path))
    return extra


# Probe kind -> (entry handler, return handler) suffixes of the C functions.
PROBE_HANDLERS = {"write": ("write_enter", "write_exit"),
                  "write_ex": ("write_ex_enter", "write_exit"),
                  "read": ("read_enter", "read_exit"),
                  "read_ex": ("read_ex_enter", "read_exit"),
                  "close": ("close_enter", None),
                  "set_fd": ("set_fd_enter", None)}
# The handlers every family's C code defines (the _ex ones are OpenSSL's).
PROBE_HANDLERS_ALL = ("write_enter", "write_exit", "read_enter", "read_exit",
                      "close_enter")
GO_HANDLERS = ("write_enter", "read_enter", "read_return", "close_enter")


def attach_go(bpf, lib):
    """Probes on a Go program's crypto/tls: entries, and every RET of Read
    (never a uretprobe: Go moves goroutine stacks). Returns the symbols
    attached, or raises Fatal-free ValueError saying why not."""
    version = go_version(lib.path)
    if version is None or version < GO_MIN_VERSION:
        raise ValueError("Go %s; Go >= %d.%d is supported" % (
            "%d.%d" % version if version else "version unknown",
            *GO_MIN_VERSION))
    symbols = elf_symbols(lib.path, GO_SYMBOLS)
    if GO_READ not in symbols or GO_WRITE not in symbols:
        raise ValueError("no crypto/tls symbols (stripped?)")
    returns = go_return_offsets(lib.path, *symbols[GO_READ])
    if returns is None:
        raise ValueError("needs python3-capstone to find Read's returns")
    if not returns:
        raise ValueError("no return instruction found in %s" % GO_READ)
    bpf.attach_uprobe(name=lib.path, sym=GO_WRITE, fn_name="go_write_enter")
    bpf.attach_uprobe(name=lib.path, sym=GO_READ, fn_name="go_read_enter")
    for offset in returns:
        bpf.attach_uprobe(name=lib.path, sym=GO_READ, sym_off=offset,
                          fn_name="go_read_return")
    names = [GO_WRITE, "%s (+%d returns)" % (GO_READ, len(returns))]
    if GO_CLOSE in symbols:
        bpf.attach_uprobe(name=lib.path, sym=GO_CLOSE,
                          fn_name="go_close_enter")
        names.append(GO_CLOSE)
    return names


def attach_probes(bpf, libraries, prefix="  "):
    """Attach every probe of each library; returns {family: count}."""
    attached = defaultdict(int)
    skipped = []
    for lib in libraries:
        if lib.family == "go":
            try:
                names = attach_go(bpf, lib)
            except Exception as exc:
                progress("%sskipped Go program %s: %s" % (prefix, lib.path,
                                                        exc))
                continue
            attached["go"] += len(names)
            progress("%sgo %s (%s)" % (prefix, lib.path, ", ".join(names)))
            continue
        names = []
        for symbol, kind in FAMILIES[lib.family]["probes"]:
            enter, leave = PROBE_HANDLERS[kind]
            try:
                bpf.attach_uprobe(name=lib.path, sym=symbol,
                                  fn_name="%s_%s" % (lib.family, enter))
                if leave:
                    bpf.attach_uretprobe(name=lib.path, sym=symbol,
                                         fn_name="%s_%s" % (lib.family, leave))
            except Exception:
                continue
            names.append(symbol)
        if names:
            attached[lib.family] += len(names)
            progress("%s%s%s %s (%s)" % (
                prefix, lib.family, " built into" if lib.static else "",
                lib.path, ", ".join(names)))
        else:
            skipped.append(lib.path)
    if skipped:
        # One line however many: a busy host must not scroll.
        progress("%sskipped %d file(s) without TLS entry points: %s" % (
            prefix, len(skipped), ", ".join(skipped[:5]) +
            (", ..." if len(skipped) > 5 else "")))
    return attached


class Tracer:
    """Owns the BPF object, the event loop and the outputs."""

    def __init__(self, args, bcc, out, known=None):
        self.args = args
        self.known = known if known is not None else set()
        self.attached = defaultdict(int)
        self.out = out
        self.clock = Clock()
        self.stats = Statistics(args.stats_by, args.max_label_values)
        self.interval_stats = None
        if args.interval:
            self.interval_stats = Statistics(args.stats_by,
                                             args.max_label_values)
        # Tables are data unless per-request JSON owns stdout.
        self.tables_out = out if args.no_requests or not args.json \
            else sys.stderr
        self.prometheus = None
        self.stop = False
        self.lost_reported = 0
        self.json = args.json
        self.bcc = bcc
        self.bpf = None
        self.error = None
        self.events = 0
        self.reported = 0

    def load(self, libraries):
        try:
            self.bpf = self.bcc.BPF(text=bpf_program(
                self.args.pid, self.args.comm,
                ringbuf_pages=self.args.ringbuf_pages,
                plain=not self.args.no_plain, port=self.args.port))
        except Exception as exc:
            raise Fatal("the BPF program did not compile or load (%s); "
                        "are the kernel headers right? run ./install.sh" %
                        str(exc).splitlines()[0])
        # Load every handler now, so a verifier rejection is one clear error
        # rather than a probe that silently fails to attach.
        try:
            for name in sorted({"%s_%s" % (lib.family, suffix)
                                for lib in libraries for suffix in
                                (GO_HANDLERS if lib.family == "go"
                                 else PROBE_HANDLERS_ALL)}):
                self.bpf.load_func(name, self.bcc.BPF.KPROBE)
        except Exception as exc:
            raise Fatal("the kernel rejected the BPF program: %s" %
                        str(exc).splitlines()[0])
        attached = attach_probes(self.bpf, libraries)
        if not attached:
            raise Fatal("no TLS library entry point could be attached")
        if not self.args.no_plain:
            progress("  plain HTTP: syscall tracepoints, TCP sockets created "
                     "from now on%s" % (" to port %d" % self.args.port
                                        if self.args.port else ""))
        for family, count in attached.items():
            self.attached[family] += count
        self.conns = self.bpf["conns"]
        self.ctls = self.bpf["ctls"]
        self.stats_map = self.bpf["stats"]
        self.assembler = Assembler(self.report, control=self.control,
                                   peek=self.peek,
                                   include_unknown=self.args.include_unknown)
        self.bpf["events"].open_ring_buffer(self.on_event)
        return attached

    def _key(self, event):
        key = self.conns.Key()
        key.handle, key.tgid, key.lib = event.handle, event.tgid, event.lib
        return key

    def control(self, event, mode, expect, stream):
        value = self.ctls.Leaf()
        value.expect, value.rphase, value.mode, value.stream = \
            expect, event.rphase, mode, int(stream)
        try:
            self.ctls[self._key(event)] = value
        except Exception:
            pass

    def peek(self, event):
        try:
            s = self.conns[self._key(event)]
        except KeyError:
            return None
        return s.resp_bytes, s.resp_end, s.chunk_end, s.rphase, s.rd_events

    def on_event(self, ctx, data, size):
        # ctypes would print and swallow an exception raised here: keep it
        # for run() to re-raise once the poll returns.
        self.events += 1
        try:
            self.assembler.feed(decode_event(ctypes.string_at(data, size)))
        except BaseException as exc:
            self.error = self.error or exc
            self.stop = True
            return -1    # stop consuming this batch
        return 0

    def report(self, request):
        if not request_matches(request, self.args):
            return
        self.reported += 1
        self.stats.add(request)
        if self.interval_stats:
            self.interval_stats.add(request)
        if self.prometheus:
            self.prometheus.add(request)
        if self.args.no_requests:
            return
        if self.json:
            line = format_json(request, self.clock)
        else:
            line = format_text(request, self.clock)
        self.out.write(line + "\n")

    def lost_events(self):
        return int(self.stats_map[ctypes.c_int(0)].value)

    def run(self):
        if not self.json and not self.args.no_requests:
            self.out.write(TEXT_HEADER + "\n")
            self.out.flush()
        interval = self.args.interval
        next_tables = time.monotonic() + interval if interval else None
        rescan = self.args.rescan_interval
        next_rescan = time.monotonic() + rescan if rescan else None
        while not self.stop:
            if next_rescan and time.monotonic() >= next_rescan:
                self.rescan()
                next_rescan = time.monotonic() + rescan
            self.bpf.ring_buffer_poll(POLL_MS)
            self.bpf.ring_buffer_consume()
            if self.error:
                raise self.error
            if next_tables and time.monotonic() >= next_tables:
                next_tables += interval
                self.print_tables(self.interval_stats, "last %gs" % interval)
                self.interval_stats = Statistics(self.args.stats_by,
                                                 self.args.max_label_values)
            lost = self.lost_events()
            if lost != self.lost_reported:
                log("%d events lost (ring buffer full)" % (
                    lost - self.lost_reported))
                if self.prometheus:
                    self.prometheus.lost.inc(lost - self.lost_reported)
                self.lost_reported = lost

    def rescan(self):
        """Attach to TLS library files that appeared since the last look."""
        new, _ = discover_libraries(selected_families(self.args), [],
                                    self.args.pid, self.known)
        if not new:
            return
        attached = attach_probes(self.bpf, new, prefix="s3slower: new: ")
        for family, count in attached.items():
            self.attached[family] += count
            if self.prometheus:
                self.prometheus.probes.labels(family).set(
                    self.attached[family])

    def print_tables(self, stats, period):
        header = ""
        if period:
            header = "--- %s, %s ---\n" % (
                datetime.datetime.now().strftime("%H:%M:%S"), period)
        self.tables_out.write("\n" + header + stats.render() + "\n")
        self.tables_out.flush()

    def finish(self, print_stats=True):
        if print_stats:
            self.bpf.ring_buffer_consume()
            self.assembler.flush()
        try:
            self.out.flush()
        except BrokenPipeError:
            print_stats = False
        if print_stats and not self.args.no_stats:
            self.print_tables(self.stats, "since start" if self.args.interval
                              else None)
        log("%d requests reported from %d kernel events; %d lost events, "
            "%d incomplete requests" % (self.reported, self.events,
                                        self.lost_reported,
                                        self.assembler.incomplete))
        if self.lost_reported:
            log("requests whose events were lost were reported incomplete "
                "or not at all")


def main(argv=None):
    args = parse_args(argv)
    out = sys.stdout
    try:
        if os.geteuid() != 0:
            raise Fatal("must run as root (BPF needs CAP_SYS_ADMIN): "
                        "try sudo %s" % sys.argv[0])
        # First of all: this interpreter may not be the one with BCC (and
        # the Python packages that go with it).
        bcc = import_bcc()
        if args.pid and not os.path.exists("/proc/%d" % args.pid):
            raise Fatal("no process with pid %d" % args.pid)
        if args.prometheus_port:
            try:
                import prometheus_client  # noqa: F401
            except ImportError:
                raise Fatal("--prometheus-port needs prometheus_client for %s:"
                            " run ./install.sh or pip install prometheus_client"
                            % sys.executable)
        ensure_tracefs()
        check_kernel_headers()
        progress("Attaching to TLS libraries...")
        known = set()
        started = time.monotonic()
        libraries, scanned = discover_libraries(
            selected_families(args), forced_libraries(args), args.pid, known)
        progress("  looked for built-in OpenSSL and Go crypto/tls in %d "
                 "other files in use (%.2f s)" % (
                     scanned, time.monotonic() - started))
        if not libraries:
            raise Fatal("no TLS library found (looked for %s); give one with "
                        "--libssl/--libgnutls/--libnss" %
                        ", ".join(selected_families(args)))
        tracer = Tracer(args, bcc, out, known)
        if args.prometheus_port:
            tracer.prometheus = PrometheusOutput(args.max_label_values)
            try:
                tracer.prometheus.serve(args.prometheus_port,
                                        args.prometheus_addr)
            except OSError as exc:
                raise Fatal("cannot serve metrics on %s:%d: %s" % (
                    args.prometheus_addr, args.prometheus_port,
                    exc.strerror or exc))
        attached = tracer.load(libraries)
        if tracer.prometheus:
            for family, count in attached.items():
                tracer.prometheus.probes.labels(family).set(count)
    except Fatal as exc:
        log("error: %s" % exc)
        return 2

    def request_stop(signum, frame):
        tracer.stop = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGHUP, request_stop)
    progress("Tracing %d probes in %d libraries%s... Hit Ctrl-C to end." % (
        sum(attached.values()), len(libraries),
        " for pid %d" % args.pid if args.pid else ""))
    try:
        tracer.run()
        tracer.finish()
    except BrokenPipeError:
        # The reader went away (| head): end quietly, as a pipeline expects.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        tracer.finish(print_stats=False)
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    sys.exit(main())
