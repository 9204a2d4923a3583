#!/usr/bin/python3
#
# s3slower  Trace S3 (and any HTTP/1.x) requests made over TLS, host-wide.
#           For Linux, uses BCC, eBPF.
#
# USAGE: s3slower.py [-h] [-p PID] [--json] [filters...]
#
# Uprobes on the TLS libraries' read and write entry points (OpenSSL, GnuTLS,
# NSS/NSPR, OpenSSL built into programs, Go's crypto/tls) see the plaintext
# HTTP before it is encrypted and after it is decrypted; kprobes on
# tcp_sendmsg/tcp_recvmsg (or, without kprobes, syscall tracepoints with
# --plain) see plain HTTP, and kprobes on the kernel's TLS sends see bodies
# sent past the library (sendfile, io_uring). The kernel follows HTTP/1.x
# framing on every connection (an SSL *, a gnutls session, a PRFileDesc *, a
# *tls.Conn, a socket) with a table-driven automaton, times each request and
# response, counts their bytes and hands user space one record per request:
# both heads, status, bytes, times, and the TCP facts that say why it was
# slow. User space names the S3 operation, bucket and key and prints one
# line (or one JSON object) per request, p50/p90/p99 tables and Prometheus
# metrics.
# Programs and libraries that appear later are found at their exec and at
# their executable mmap, by file identity.
#
# The tool never prints credentials: Authorization and token headers are never
# output, and signature/credential query parameters are replaced by REDACTED.
#
# Copyright (c) 2026 The s3slower authors. Licensed under the MIT License.

import argparse
import bisect
import ctypes
import datetime
import functools
import glob
import hashlib
import itertools
import json
import math
import operator
import os
import re
import select
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict, defaultdict, deque, namedtuple
from urllib.parse import unquote

VERSION = "0.2.0"

examples = """examples:
    ./s3slower.py                        # trace every HTTPS request on the host
    ./s3slower.py --json | jq .          # JSON Lines, one object per request
    ./s3slower.py -p 1234                # only process 1234
    ./s3slower.py --plain                # plain HTTP (no TLS) as well
    ./s3slower.py --no-plain             # TLS only (plain HTTP is on by
                                         # default where there are kprobes)
    ./s3slower.py --comm aws             # only processes named aws
    ./s3slower.py --host-substr amazonaws.com --min-lat-ms 100
    ./s3slower.py --method PUT --op PutObject --bucket logs
    ./s3slower.py --endpoint s3.example.internal   # BUCKET.s3.example.internal
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
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="also trace plain-HTTP (unencrypted) "
                             "connections. Where the kernel has kprobes: in "
                             "the TCP layer, on by default (--no-plain turns "
                             "it off). Elsewhere: from syscall tracepoints, "
                             "off by default, as every read and write on the "
                             "host then pays a map lookup (--port implies "
                             "it)")
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
    filters.add_argument("--endpoint", action="append", default=[],
                         metavar="DOMAIN",
                         help="an S3 endpoint whose subdomains are buckets "
                              "(BUCKET.DOMAIN, virtual-host style), e.g. "
                              "s3.example.internal; repeatable")
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
    # Found by symbol, probed where go_plan says (no return probes).
    ("go", dict(lib=LIB_GO, pattern=None, probes=[])),
])

LibraryFile = namedtuple("LibraryFile", "family path static")


def kernel_dev(st_dev):
    """A stat() device number as the kernel keeps it (super_block.s_dev)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


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


def process_files(pids, examined=()):
    """Files processes execute: their executables and executable mappings,
    as (path the tracer can open, a container's copy through its root;
    the file as the maps name it: path, device, inode, or None).

    Files named in examined are left out: a tracer that looks at processes
    again and again (at each exec and mmap, at rescans) looks into each
    file once. A new program mapping 30 libraries was looked at 30 times,
    all of its files each time: 7 000 stat calls."""
    for pid in pids:
        files = {}
        try:
            exe = os.readlink("/proc/%d/exe" % pid)
            with open("/proc/%d/maps" % pid) as maps:
                lines = maps.read().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(None, 5)
            if len(parts) == 6 and "x" in parts[1] and \
                    parts[5].startswith("/"):
                files[parts[5]] = (parts[5], parts[3], parts[4])
        if exe not in files:
            files[exe] = None
        for path, file in files.items():
            if path.endswith(" (deleted)") or file in examined:
                continue
            # Seen through the process's root: a container's copy differs
            # from the host file of the same name.
            in_root = "/proc/%d/root%s" % (pid, path)
            try:
                same = os.path.samefile(in_root, path)
            except OSError:
                same = not os.path.exists(in_root)
            yield path if same else in_root, file


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


def elf_file_offset(sections, address):
    """(file offset, bytes to the section's end) of a virtual address, or
    (None, 0) where the file holds no bytes for it."""
    for sec in sections:
        if sec.addr <= address < sec.addr + sec.size and \
                sec.type != 8:          # SHT_NOBITS has no bytes
            return sec.offset + address - sec.addr, \
                sec.addr + sec.size - address
    return None, 0


def elf_bytes(path, address, size):
    """size bytes of path at a virtual address (of a function), or b""."""
    try:
        with open(path, "rb") as f:
            offset, available = elf_file_offset(elf_sections(f), address)
            if offset is not None:
                f.seek(offset)
                return f.read(min(size, available))
    except (OSError, struct.error, ValueError):
        pass
    return b""


def in_file(path, plan):
    """A plan whose virtual addresses are now file offsets, where uprobes
    are placed (they differ in a non-PIE executable: Go's start at
    0x400000); probes at addresses the file has no bytes for are left out."""
    with open(path, "rb") as f:
        sections = elf_sections(f)
    placed = []
    for handler, symbol, address, is_return in plan:
        offset, _ = elf_file_offset(sections, address)
        if offset is not None:
            placed.append([handler, symbol, offset, is_return])
    return placed


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


def go_probe_offsets(path, address, size):
    """(entry, returns) offsets in a Go function, from its machine code, or
    None when the disassembler (python3-capstone) is missing. entry is the
    instruction after the stack check (`cmp ...,[r14+0x10]; jbe`): a
    goroutine whose stack must grow runs the function's first instructions
    twice, once before morestack and once after, but gets past the check
    once. returns are its RET instructions, where a return is caught
    (uretprobes break Go's moving stacks)."""
    try:
        import capstone
    except ImportError:
        return None
    code = elf_bytes(path, address, size)
    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    insns = list(disassembler.disasm(code, address))
    entry = 0
    for first, nxt in zip(insns[:8], insns[1:9]):
        if first.mnemonic in ("jbe", "jna"):
            entry = nxt.address - address
            break
    return entry, [insn.address - address for insn in insns
                   if insn.mnemonic == "ret"]


class ScanCache:
    """What a file holds, worked out once per version of the file (device,
    inode, size, mtime) and kept on disk across starts: which TLS families
    are built in, and where each probe goes."""

    PATH = "/var/cache/s3slower/elf-scan.json"
    VERSION = 3
    LIMIT = 200000

    def __init__(self, path=PATH):
        self.path = path
        self.entries = {}
        self.dirty = False
        try:
            with open(path) as f:
                saved = json.load(f)
            if saved.get("version") == self.VERSION:
                self.entries = dict(saved["entries"])
        except (OSError, ValueError, AttributeError, TypeError, KeyError):
            pass

    def answer(self, question, path, work_out, st=None):
        """work_out(path), a JSON value, once per version of the file."""
        if st is None:
            st = os.stat(path)
        key = "%s %d:%d:%d:%d" % (question, st.st_dev, st.st_ino,
                                  st.st_size, st.st_mtime_ns)
        found = self.entries.get(key)
        if found is None:
            if len(self.entries) >= self.LIMIT:
                self.entries.clear()
            found = self.entries[key] = work_out(path)
            self.dirty = True
        return found

    def families(self, path, st):
        """Families whose TLS is compiled into path: "openssl", "go"."""
        def work_out(path):
            symbols = elf_functions(path, STATIC_OPENSSL + (GO_READ,))
            return [family for family, needed in (
                ("openssl", STATIC_OPENSSL), ("go", (GO_READ,)))
                if symbols.issuperset(needed)]
        return set(self.answer("families", path, work_out, st))

    def save(self):
        if not self.dirty:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"version": self.VERSION, "entries": self.entries},
                          f)
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:
            pass


SCAN_CACHE = ScanCache()

# Where programs a user may run later live: PATH and the install places.
INSTALL_DIRS = ("/usr/local", "/opt", "/snap/bin")
INSTALL_DEPTH = 5            # directory levels looked into below them
MAX_CANDIDATES = 50000
SCAN_SECONDS = 10            # at start; a warm cache needs a fraction


def program_dirs():
    """Directories of PATH (and the usual ones) as a shell names them."""
    dirs = os.environ.get("PATH", "").split(":") + [
        "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin",
        "/sbin", "/bin"]
    return list(OrderedDict.fromkeys(d for d in dirs if d.startswith("/")))


def candidate_files():
    """Executables and shared libraries a user may run later: on PATH, and
    below /usr/local, /opt and /snap/bin. Yields paths (symlinks resolved
    by the scan's stat)."""
    count = 0
    for directory in program_dirs():
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            count += 1
            if count > MAX_CANDIDATES:
                return
            yield os.path.join(directory, name)
    for top in INSTALL_DIRS:
        base = top.count("/")
        for root, dirs, names in os.walk(top):
            if root.count("/") - base >= INSTALL_DEPTH:
                dirs[:] = []
            for name in names:
                if ".so" in name or "." not in name:
                    count += 1
                    if count > MAX_CANDIDATES:
                        return
                    yield os.path.join(root, name)


def discover_libraries(families, extra, pid=None, known=None,
                       candidates=(), loader_cache=True, pids=None,
                       looked_at=None, examined=None):
    """Distinct files to attach to, one per (family, device, inode).

    families: names from FAMILIES to auto-discover; extra: (family, path)
    pairs the user forced; pid: only what that process maps (pids: those
    processes' instead of every process's); candidates:
    more files to look into (programs not running yet). Files whose
    identity is in known (a set, updated) are left out: what a rescan
    finds is only what is new. looked_at (a set) gets the kernel identity
    (device, inode) of every file looked at. examined (a set, updated): the
    mapped files looked into, as process_files names them; they are left
    out. Returns (files, number of files scanned).
    """
    found = []
    known = set() if known is None else known

    def add(family, path, st, static=False):
        ident = (family, st.st_dev, st.st_ino)
        if ident not in known:
            known.add(ident)
            found.append(LibraryFile(family, path, static))

    def regular_file(path):
        """Its os.stat, or None (gone, not a regular file)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st if os.path.isfile(path) else None

    for family, path in extra:
        st = regular_file(path)
        if st:
            pattern = FAMILIES[family]["pattern"]
            add(family, path, st, static=not pattern or
                not pattern.search(os.path.basename(path)))
    scanned = set()
    look_inside = "openssl" in families or "go" in families

    def look_into(path, st, matched):
        if looked_at is not None:
            looked_at.add((kernel_dev(st.st_dev), st.st_ino))
        for family in matched:
            add(family, path, st)
        if not matched and (st.st_dev, st.st_ino) not in scanned:
            scanned.add((st.st_dev, st.st_ino))
            built_in = SCAN_CACHE.families(path, st)
            for family in families:
                if family in built_in:
                    add(family, path, st, static=True)

    # Files processes run, files they may run, then the loader's cache (with
    # --pid too: the process may load a TLS library later).
    if pids is None:
        pids = [pid] if pid else all_pids()
    sources = [(p, True, file) for p, file in
               process_files(pids, examined or ())]
    sources += [(p, True, None) for p in candidates]
    if loader_cache:
        sources += [(p, False, None) for p in loader_cache_paths()]
    for path, scan, file in sources:
        name = os.path.basename(path)
        matched = [f for f in families if FAMILIES[f]["pattern"] and
                   FAMILIES[f]["pattern"].search(name)]
        if matched or scan and look_inside:
            st = regular_file(path)
            if st is None:
                continue        # gone: looked into when seen again
            look_into(path, st, matched)
        if file and examined is not None:
            examined.add(file)
    return found, len(scanned)


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


def go_plan(path):
    """Where a Go program's crypto/tls probes go, as library_plan says: the
    entries, and every RET of Read (never a uretprobe: Go moves goroutine
    stacks). A string says why there are none."""
    version = go_version(path)
    if version is None or version < GO_MIN_VERSION:
        return "Go %s; Go >= %d.%d is supported" % (
            "%d.%d" % version if version else "version unknown",
            *GO_MIN_VERSION)
    symbols = elf_symbols(path, GO_SYMBOLS)
    if GO_READ not in symbols or GO_WRITE not in symbols:
        return "no crypto/tls symbols (stripped?)"
    read = go_probe_offsets(path, *symbols[GO_READ])
    write = go_probe_offsets(path, *symbols[GO_WRITE])
    if read is None or write is None:
        # Not an answer to keep: installing capstone changes it.
        raise ValueError("needs python3-capstone to find Read's returns")
    (read_entry, returns), (write_entry, _) = read, write
    if not returns:
        return "no return instruction found in %s" % GO_READ
    read_at, write_at = symbols[GO_READ][0], symbols[GO_WRITE][0]
    # Read's returns first: a Read in flight when Write's probe lands must
    # not leave its request waiting for a response it cannot see.
    plan = [["go_read_return", GO_READ, read_at + offset, False]
            for offset in returns]
    plan.append(["go_read_enter", GO_READ, read_at + read_entry, False])
    plan.append(["go_write_enter", GO_WRITE, write_at + write_entry, False])
    if GO_CLOSE in symbols:
        plan.append(["go_close_enter", GO_CLOSE, symbols[GO_CLOSE][0], False])
    return in_file(path, plan)


def library_plan(path, family):
    """Where a TLS library's probes go: [handler, symbol, file offset,
    is_return] in the order they are attached. Reads before writes, so a
    request written while the probes land does not wait for a response the
    tracer cannot see; a return before its entry, so no call is seen
    entering without being seen to return."""
    probes = FAMILIES[family]["probes"]
    symbols = elf_symbols(path, [symbol for symbol, _ in probes])
    plan = []
    for symbol, kind in sorted(probes,
                               key=lambda probe: probe[1].startswith("write")):
        if symbol in symbols:
            enter, leave = PROBE_HANDLERS[kind]
            address = symbols[symbol][0]
            if leave:
                plan.append(["%s_%s" % (family, leave), symbol, address, True])
            plan.append(["%s_%s" % (family, enter), symbol, address, False])
    return in_file(path, plan)


def probe_plan(lib):
    """library_plan or go_plan for a file, worked out once per version."""
    if lib.family == "go":
        return SCAN_CACHE.answer("go-probes", lib.path, go_plan)
    return SCAN_CACHE.answer("%s-probes" % lib.family, lib.path,
                             lambda path: library_plan(path, lib.family))


# ---------------------------------------------------------------------------
# BPF program
# ---------------------------------------------------------------------------

REQ_CAP = 4096            # bytes of a request head kept for user space
RESP_CAP = 1024           # bytes of a response head (and error body) kept
WIN = 512                 # bytes of user memory the parser looks at at once
STEPS = 64                # automaton steps between two actions ...
ACTIONS = 4               # ... actions (message start, end) per run ...
SKIP_WORDS = 128          # words of a skipped header line per action ...
MAX_RUNS = 32             # ... and runs (tail calls) per read or write
MAX_INFLIGHT = 2048       # requests sent and not yet answered, host-wide
WAKE_FILL = 8             # wake the reader once 1/8 of the ring waits ...
POLL_MS = 50              # ... else its timer reads it: the output delay
SECOND_LOOK = 0.2         # s after a new program's exec: look again
FULL_RESCAN = 6           # every 6th rescan looks at every process ...
FULL_RESCAN_HOOKED = 30   # ... every 30th where the kernel reports mmaps
MAX_EXAMINED = 100000     # mapped files remembered as looked into

# HTTP/1.x framing as a table-driven automaton. The kernel walks the same
# tables a byte at a time with no branches but the loop's (the verifier's
# cost per byte stays small); http_scan() below walks them in Python, so
# the tables are tested without root.

DFA_STATES = [
    # Header section. A line either starts a name we need or is skipped.
    "LINE", "LINE_CR", "SKIP",
    # Responses start here: "HTTP/" version, then the 3-digit status.
    "ST_START", "ST_H", "ST_T1", "ST_T2", "ST_P", "ST_SLASH", "ST_VERSION", "ST_SPACE",
    "ST_D1", "ST_D2", "ST_D3",
    # "content-length:" value digits; "transfer-encoding:" with "chunked".
    "CL_VALUE", "CL_DIGIT", "TE_VALUE",
] + ["CL_NAME%d" % i for i in range(1, 15)] + \
    ["TE_NAME%d" % i for i in range(1, 18)] + \
    ["TE_CHUNKED%d" % i for i in range(1, 8)] + [
    # Chunked body: size line (hex), extensions, CRLF after data, trailers.
    "CHUNK_SIZE", "CHUNK_DIGIT", "CHUNK_EXT", "CHUNK_LF", "CHUNK_CR",
    "CHUNK_CRLF", "TRAILER", "TRAILER_CR", "TRAILER_SKIP",
    # Chunk data: `acc` bytes skipped, not read.
    "CHUNK_DATA",
    # Stops: the program acts, then goes on.
    "HEAD_END", "MESSAGE_END", "BAD",
]
D = {name: i for i, name in enumerate(DFA_STATES)}
DFA_STOP = D["HEAD_END"]          # states from here on stop the scan
DFA_BITS = 7                      # states fit in 2**DFA_BITS
CLASS_BITS = 5                    # byte classes fit in 2**CLASS_BITS
DFA_FLAG_LENGTH, DFA_FLAG_CHUNKED = 1, 2


def _dfa_rules():
    """{state: {byte: next state}} with each state's default under None."""
    rules = {}

    def rule(state, default, **edges):
        row = {None: default}
        for chars, target in edges.values():
            for ch in chars:
                row[ord(ch)] = target
        rules[state] = row

    letters = lambda text: text + text.upper()
    rule("LINE", "SKIP", nl=("\n", "HEAD_END"), cr=("\r", "LINE_CR"),
         c=(letters("c"), "CL_NAME1"), t=(letters("t"), "TE_NAME1"))
    rule("LINE_CR", "SKIP", nl=("\n", "HEAD_END"))
    rule("SKIP", "SKIP", nl=("\n", "LINE"))
    for i, name in enumerate(("content-length:", "transfer-encoding:")):
        prefix = ("CL_NAME", "TE_NAME")[i]
        value = ("CL_VALUE", "TE_VALUE")[i]
        for k in range(1, len(name)):
            ch = name[k]
            target = value if k == len(name) - 1 else "%s%d" % (prefix, k + 1)
            rule("%s%d" % (prefix, k), "SKIP", nl=("\n", "LINE"),
                 m=(letters(ch) if ch.isalpha() else ch, target))
    digits = "0123456789"
    for state in ("CL_VALUE", "CL_DIGIT"):
        rule(state, "SKIP", nl=("\n", "LINE"), sp=(" \t\r", "CL_VALUE"),
             d=(digits, "CL_DIGIT"))
    word = "chunked"
    for k in range(0, 8):
        state = "TE_VALUE" if k == 0 else "TE_CHUNKED%d" % k
        edges = dict(nl=("\n", "LINE"), c=(letters("c"), "TE_CHUNKED1"))
        if k < 7:
            edges["m"] = (letters(word[k]), "TE_CHUNKED%d" % (k + 1))
        rule(state, "TE_VALUE", **edges)
    states = ("ST_START", "ST_H", "ST_T1", "ST_T2", "ST_P", "ST_SLASH")
    for k, ch in enumerate("HTTP/"):
        rule(states[k], "BAD", m=(ch, states[k + 1]))
    rule("ST_SLASH", "ST_VERSION", nl=("\n", "LINE"), sp=(" ", "ST_SPACE"))
    rule("ST_VERSION", "ST_VERSION", nl=("\n", "LINE"), sp=(" ", "ST_SPACE"))
    rule("ST_SPACE", "SKIP", nl=("\n", "LINE"), sp=(" ", "ST_SPACE"),
         d=(digits, "ST_D1"))
    rule("ST_D1", "SKIP", nl=("\n", "LINE"), d=(digits, "ST_D2"))
    rule("ST_D2", "SKIP", nl=("\n", "LINE"), d=(digits, "ST_D3"))
    rule("ST_D3", "SKIP", nl=("\n", "LINE"))
    hexdigits = "0123456789abcdefABCDEF"
    rule("CHUNK_SIZE", "BAD", d=(hexdigits, "CHUNK_DIGIT"))
    rule("CHUNK_DIGIT", "BAD", d=(hexdigits, "CHUNK_DIGIT"),
         ext=("; \t", "CHUNK_EXT"), cr=("\r", "CHUNK_LF"),
         nl=("\n", "CHUNK_DATA"))
    rule("CHUNK_EXT", "CHUNK_EXT", nl=("\n", "CHUNK_DATA"))
    rule("CHUNK_LF", "BAD", nl=("\n", "CHUNK_DATA"))
    rule("CHUNK_CRLF", "BAD", cr=("\r", "CHUNK_CR"), nl=("\n", "CHUNK_SIZE"))
    rule("CHUNK_CR", "BAD", nl=("\n", "CHUNK_SIZE"))
    rule("TRAILER", "TRAILER_SKIP", nl=("\n", "MESSAGE_END"),
         cr=("\r", "TRAILER_CR"))
    rule("TRAILER_CR", "TRAILER_SKIP", nl=("\n", "MESSAGE_END"))
    rule("TRAILER_SKIP", "TRAILER_SKIP", nl=("\n", "TRAILER"))
    for state in ["CHUNK_DATA"] + DFA_STATES[DFA_STOP:]:
        rule(state, state)      # never walked: skipped, or acted on
    return rules


def build_dfa():
    """The tables the kernel walks, as a dict of byte strings."""
    rules = _dfa_rules()
    n = len(DFA_STATES)
    assert n <= 1 << DFA_BITS
    full = [[D[rules[s].get(b, rules[s][None])] for s in DFA_STATES]
            for b in range(256)]
    # Bytes every state treats alike share a class.
    classes, byte_class = {}, []
    for b in range(256):
        byte_class.append(classes.setdefault(tuple(full[b]), len(classes)))
    assert len(classes) <= 1 << CLASS_BITS, len(classes)
    nxt = bytearray(1 << (DFA_BITS + CLASS_BITS))
    for column, cls in classes.items():
        for s, target in enumerate(column):
            nxt[(s << CLASS_BITS) | cls] = target
    # Entering a state may fold the byte into a number: acc = acc * mul +
    # add * value(byte) for Content-Length and chunk sizes, and the same
    # for the status code.
    size = 1 << DFA_BITS
    acc_mul, acc_add = bytearray([1] * size), bytearray(size)
    status_mul, status_add = bytearray([1] * size), bytearray(size)
    flags, in_head = bytearray(size), bytearray(size)
    acc_mul[D["CL_DIGIT"]], acc_add[D["CL_DIGIT"]] = 10, 1
    acc_mul[D["CHUNK_DIGIT"]], acc_add[D["CHUNK_DIGIT"]] = 16, 1
    for state in ("ST_D1", "ST_D2", "ST_D3"):
        status_mul[D[state]], status_add[D[state]] = 10, 1
    flags[D["CL_DIGIT"]] = DFA_FLAG_LENGTH
    flags[D["TE_CHUNKED7"]] = DFA_FLAG_CHUNKED
    for name in DFA_STATES:
        # A byte read in a state counts as head or as body (chunk framing).
        in_head[D[name]] = not name.startswith(("CHUNK", "TRAILER"))
    value = bytearray(256)
    for i, ch in enumerate("0123456789abcdef"):
        value[ord(ch)] = value[ord(ch.upper())] = i
    return dict(byte_class=bytes(byte_class), next=bytes(nxt),
                acc_mul=bytes(acc_mul), acc_add=bytes(acc_add),
                status_mul=bytes(status_mul), status_add=bytes(status_add),
                flags=bytes(flags), in_head=bytes(in_head),
                value=bytes(value))


DFA = build_dfa()


def http_scan(state, data, acc=0, status=0, flags=0):
    """Walk the tables over data from state as the kernel's scan() does,
    to a stop state or the end of data. Returns (state, bytes used, acc,
    status, flags, head bytes)."""
    t, pos, head = DFA, 0, 0
    while state < DFA_STOP:
        if state == D["CHUNK_DATA"]:
            if acc == 0:
                state = D["TRAILER"]
                continue
            n = min(len(data) - pos, acc)
            pos, acc = pos + n, acc - n
            if acc:
                break
            state = D["CHUNK_CRLF"]
            continue
        if pos >= len(data):
            break
        c = data[pos]
        head += t["in_head"][state]
        state = t["next"][(state << CLASS_BITS) | t["byte_class"][c]]
        acc = acc * t["acc_mul"][state] + t["acc_add"][state] * t["value"][c]
        status = status * t["status_mul"][state] + \
            t["status_add"][state] * t["value"][c]
        flags |= t["flags"][state]
        pos += 1
    return state, pos, acc, status, flags, head


REC_REQUEST, REC_EXIT, REC_EXEC, REC_MAP = 1, 2, 3, 4
RF_COMPLETE, RF_HEAD_METHOD, RF_CLOSE_DELIMITED, RF_SOCKET = 1, 2, 4, 8
STAT_LOST, STAT_COLLISION, STAT_EVICTED, STAT_UNPARSED = 0, 1, 2, 3

BPF_TEXT = r"""
#include <uapi/linux/ptrace.h>
#define TASK_COMM_LEN 16     /* linux/sched.h would cost a second of compile */

/* Tracepoint handlers under a name BCC does not attach by itself: the
 * program is loaded from its compiled image (BpfObject), which attaches
 * them. BCC still generates the args struct from the tracepoint's format. */
#undef TRACEPOINT_PROBE
#define TRACEPOINT_PROBE(category, event) \
int tp__##category##__##event(struct tracepoint__##category##__##event *args)

/* The helpers that read memory, under names of our own: BCC looks every
 * bpf_probe_read* call up in /proc/kallsyms while it compiles (0.1 s
 * apiece here). */
static long (*read_user)(void *dst, u32 size, const void *src) =
    (void *)BPF_FUNC_probe_read_user;
static long (*read_kernel)(void *dst, u32 size, const void *src) =
    (void *)BPF_FUNC_probe_read_kernel;
static long (*read_kernel_str)(void *dst, u32 size, const void *src) =
    (void *)BPF_FUNC_probe_read_kernel_str;

/* One struct iovec {base, len}: user memory for syscalls, the kernel's
 * copy for a msghdr seen inside the kernel. */
static __always_inline long read_iovec(u64 seg[2], u64 addr, u32 in_kernel)
{
    if (in_kernel)
        return read_kernel(seg, 2 * sizeof(u64), (void *)addr);
    return read_user(seg, 2 * sizeof(u64), (void *)addr);
}

#define REQ_CAP __REQ_CAP__
#define RESP_CAP __RESP_CAP__
#define WIN __WIN__
#define STEPS __STEPS__
#define ACTIONS __ACTIONS__
#define SKIP_WORDS __SKIP_WORDS__
#define MAX_RUNS __MAX_RUNS__
#define WAKE_BYTES __WAKE_BYTES__    /* 1/WAKE_FILL of the ring */
/* The ring as a map for bpf_ringbuf_query (BCC 0.26's table has no method
 * for it): compile_image points this stand-in descriptor at the ring. */
#define RECORDS_MAP ((void *)bpf_pseudo_fd(1, __RECORDS_FD__))
#define PLAIN_HTTP __PLAIN_HTTP__      /* from syscall tracepoints */
#define TCP_PROBES __TCP_PROBES__      /* from kprobes in the TCP layer */
#define FILTER_PORT __FILTER_PORT__
#define RECV_FLAGS(ctx) __RECV_FLAGS__

enum { REC_REQUEST = 1, REC_EXIT = 2, REC_EXEC = 3, REC_MAP = 4 };
enum { RF_COMPLETE = 1, RF_HEAD_METHOD = 2, RF_CLOSE_DELIMITED = 4,
       RF_SOCKET = 8 };
enum { STAT_LOST = 0, STAT_COLLISION, STAT_EVICTED, STAT_UNPARSED };
enum { LIB_OPENSSL = 1, LIB_GNUTLS, LIB_NSS, LIB_PLAIN, LIB_GO };

/* HTTP/1.x message framing (RFC 9112), one parser per direction of a
 * connection. Heads, chunk-size lines and trailers go through an automaton
 * whose tables user space fills (dfa_tables); bodies and chunk data are
 * skipped by their length, never read. */
enum { P_IDLE = 0, P_SCAN, P_SKIP, P_CLOSE };
enum { __DFA_ENUM__ };
#define DFA_STOP __DFA_STOP__
#define DFA_BITS __DFA_BITS__
#define CLASS_BITS __CLASS_BITS__
#define DFA_FLAG_LENGTH 1
#define DFA_FLAG_CHUNKED 2

struct dfa_tables {
    u8 byte_class[256];
    u8 next[1 << (DFA_BITS + CLASS_BITS)];
    u8 acc_mul[1 << DFA_BITS];
    u8 acc_add[1 << DFA_BITS];
    u8 status_mul[1 << DFA_BITS];
    u8 status_add[1 << DFA_BITS];
    u8 flags[1 << DFA_BITS];
    u8 in_head[1 << DFA_BITS];
    u8 value[256];
};

struct parser {
    u64 left;           /* P_SKIP: Content-Length body bytes to go */
    u64 acc;            /* the number being read: Content-Length, a chunk
                         * size, then the chunk data to go */
    u64 body;           /* body bytes of this message (chunk framing too) */
    u32 head;           /* head bytes of this message */
    u16 status;
    u8 phase;           /* P_* */
    u8 dfa;             /* automaton state in P_SCAN */
    u8 flags;           /* DFA_FLAG_* seen in the head */
    u8 head_done;
    u8 pad[2];
};

/* A connection is whatever handle the library hands its callers: SSL *,
 * gnutls_session_t, PRFileDesc *, a Go *tls.Conn, a plain socket's fd. */
struct conn_key {
    u64 handle;
    u32 tgid;
    u32 lib;
};

struct conn_state {
    struct parser req;
    struct parser resp;
    u32 sent;           /* requests started on this connection */
    u32 answered;       /* responses finished: request answered+1 is next */
    u8 ignored;         /* not HTTP/1.x: never looked at again */
    u8 adopted;         /* a socket we did not see created, followed from a
                         * write that looked like a request: until a real
                         * response comes back, nothing of it is reported */
    u8 pad[6];
    u64 sk;             /* its TCP socket, when its connect was seen */
};

/* One request in flight, and the record user space gets for it: the
 * request head is kept here until its response ends. */
struct req_key {
    struct conn_key conn;
    u64 seq;
};

struct record {
    u64 req_start;      /* entry of the request's first write */
    u64 req_end;        /* entry of its last write: the server cannot have
                         * the last byte earlier */
    u64 resp_start;     /* return of the read with the final response's
                         * first byte (after any 1xx) */
    u64 resp_end;       /* return of the read with its last byte */
    u64 req_bytes;      /* request body bytes */
    u64 resp_bytes;     /* response body bytes, chunk framing included */
    u64 handle;
    u32 tgid;
    u32 tid;
    u32 seq;
    u32 req_head;       /* request head bytes (may exceed req_cap) */
    u32 resp_head;
    u16 status;
    u16 req_cap;        /* bytes of req_data filled */
    u16 resp_cap;
    u8 type;
    u8 lib;
    u8 flags;           /* RF_* */
    u8 pad[3];
    char comm[TASK_COMM_LEN];
    /* Its TCP connection: the connect (first request on it only) and
     * the connection's retransmissions when the request started and at
     * its last read. */
    u64 connect_start;
    u64 connect_end;
    u32 retrans_start;
    u32 retrans_end;
    char resp_data[RESP_CAP];
    char req_data[REQ_CAP];
};

/* One read or write being parsed, carried across the parser's runs. */
struct work {
    struct conn_key key;
    u64 buf;            /* current segment */
    u64 len;
    u64 pos;
    u64 iov;            /* next iovec, for readv/writev/msghdr calls */
    u64 rest;           /* bytes of the call after this segment */
    u64 start;          /* entry of the call */
    u64 now;            /* its return */
    u64 win_start;      /* segment offset of win[0] */
    u32 win_len;
    u32 iov_left;
    u32 runs;
    u8 is_read;
    u8 captured;        /* this segment was copied into the record */
    u8 eof;
    u8 iov_in_kernel;   /* the iovec array is the kernel's copy (kprobes) */
    char win[WIN + 8];
};

struct call_args {
    u64 handle;
    u64 buf;
    u64 sizep;          /* *_ex variants: where the byte count is stored */
    u64 start;
    u64 sp;             /* stack pointer at entry: tells nested calls apart */
    u64 iov;            /* syscalls with an iovec array: the array */
    u32 iovcnt;
    u32 lib;
    u32 adopt;          /* plain socket first seen at this write */
    u64 sk;             /* TCP socket the call sent on */
    u32 iov_in_kernel;  /* iov is the kernel's copy of the array */
    u32 not_user;       /* tcp_sendmsg of pages (sendfile, splice): only
                         * the count is known */
};

/* LRU everywhere: a thread killed inside SSL_read, a connection never
 * freed, a process that exits uncleanly must not fill a map for good. */
BPF_TABLE("lru_hash", u32, struct call_args, calls, 16384);
BPF_TABLE("lru_hash", struct conn_key, struct conn_state, conns, __MAX_CONNS__);
BPF_TABLE("lru_hash", struct req_key, struct record, inflight, __MAX_INFLIGHT__);
BPF_TABLE("lru_hash", u32, u8, procs, 16384);
/* TCP connections, for why a request was slow: when the connect started
 * (SYN sent) and ended (established), and how many segments were
 * retransmitted, by socket. A connection learns its socket from the first
 * send in the thread that writes its request (sock:sock_send_length, Linux
 * 6.3+); older kernels have the thread's last connect claimed by the first
 * request it writes on a new connection. */
struct tcp_conn {
    u64 start;
    u64 end;
    u32 retrans;
    u8 claimed;
    u8 pad[3];
};
BPF_TABLE("lru_hash", u64, struct tcp_conn, tcp_conns, __MAX_CONNS__);
#if HAVE_SEND_LENGTH
BPF_TABLE("lru_hash", u32, struct conn_key, unbound, 16384);
#else
BPF_TABLE("lru_hash", u32, u64, connecting, 16384);
#endif

BPF_PERCPU_ARRAY(works, struct work, 1);
BPF_ARRAY(dfa, struct dfa_tables, 1);
BPF_PERCPU_ARRAY(blank, struct record, 1);
BPF_ARRAY(stats, u64, 4);
BPF_RINGBUF_OUTPUT(records, __RINGBUF_PAGES__);
BPF_PROG_ARRAY(uprobe_parser, 1);
BPF_PROG_ARRAY(tracepoint_parser, 1);

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

/* The compiler must load loop state from memory again: the verifier then
 * knows as little about it at every loop head, and one walk of a loop step
 * stands for all the paths that reach it (linear verification cost). */
#define forget_registers() asm volatile("" ::: "memory")

static __always_inline void count_stat(int idx)
{
    u64 *v = stats.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline u64 wake_flag(void)
{
    /* The reader reads on a timer, and is woken early only when 1/WAKE_FILL
     * of the ring waits. Its work per record halves when it reads hundreds
     * at once (its caches stay warm) instead of a few per wake-up. */
    if (bpf_ringbuf_query(RECORDS_MAP, BPF_RB_AVAIL_DATA) >= WAKE_BYTES)
        return BPF_RB_FORCE_WAKEUP;
    return BPF_RB_NO_WAKEUP;
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

static __always_inline struct record *find_record(struct conn_key *k, u32 seq)
{
    struct req_key rk = {.conn = *k, .seq = seq};
    return inflight.lookup(&rk);
}

/* Hand a record to user space and forget it. */
static __always_inline void emit(struct conn_key *k, struct record *r, u8 flags)
{
    r->type = REC_REQUEST;
    r->flags |= flags;
    u64 size = offsetof(struct record, req_data) + r->req_cap;
    bound_value(size, sizeof(*r));
    if (records.ringbuf_output(r, size, wake_flag()) != 0)
        count_stat(STAT_LOST);
    struct req_key rk = {.conn = *k, .seq = r->seq};
    inflight.delete(&rk);
}

/* Every request of a connection still waiting for its response: the
 * connection ended. A close-delimited body ends here, complete. */
static __always_inline void end_conn(struct conn_key *k, struct conn_state *s)
{
    for (int i = 0; i < 8; i++) {
        u32 seq = s->answered + 1 + i;
        if (seq > s->sent)
            break;
        struct record *r = find_record(k, seq);
        if (!r)
            continue;
        if (s->adopted) {
            struct req_key rk = {.conn = *k, .seq = seq};
            inflight.delete(&rk);
            continue;
        }
        emit(k, r, i == 0 && s->resp.phase == P_CLOSE ? RF_COMPLETE : 0);
    }
    conns.delete(k);
}

static __always_inline void reset_parser(struct parser *p, u8 phase, u8 state)
{
    p->left = 0;
    p->acc = 0;
    p->body = 0;
    p->head = 0;
    p->status = 0;
    p->phase = phase;
    p->dfa = state;
    p->flags = 0;
    p->head_done = 0;
}

/* Copy what the segment holds from pos on into the record, once. */
static __always_inline void capture(struct work *w, struct record *r)
{
    if (w->captured)
        return;
    w->captured = 1;
    u64 avail = w->len - w->pos;
    if (w->is_read) {
        u64 off = r->resp_cap;
        if (off >= RESP_CAP)
            return;
        if (avail > RESP_CAP - off)
            avail = RESP_CAP - off;
        bound_value(off, RESP_CAP - 1);
        bound_value(avail, RESP_CAP);
        if (read_user(&r->resp_data[off], avail,
                                (void *)(w->buf + w->pos)) == 0)
            r->resp_cap = off + avail;
    } else {
        /* A head written in pieces is appended up to half the buffer per
         * write: bounds the verifier can see stay inside the record. */
        u64 off = r->req_cap;
        if (off == 0) {
            bound_value(avail, REQ_CAP);
            if (read_user(r->req_data, avail,
                                    (void *)(w->buf + w->pos)) == 0)
                r->req_cap = avail;
        } else if (off < REQ_CAP / 2) {
            bound_value(off, REQ_CAP / 2 - 1);
            bound_value(avail, REQ_CAP / 2);
            if (read_user(&r->req_data[off], avail,
                                    (void *)(w->buf + w->pos)) == 0)
                r->req_cap = off + avail;
        }
    }
}

/* Counters of the message being parsed, into its record. */
static __always_inline void commit(struct work *w, struct conn_state *s)
{
    if (w->is_read) {
        if (s->resp.phase == P_IDLE || s->answered >= s->sent)
            return;
        struct record *r = find_record(&w->key, s->answered + 1);
        if (!r)
            return;
        r->resp_bytes = s->resp.body;
        r->resp_head = s->resp.head;
        r->status = s->resp.status;
        r->resp_end = w->now;
        struct tcp_conn *c = s->sk ? tcp_conns.lookup(&s->sk) : 0;
        if (c)
            r->retrans_end = c->retrans;
    } else {
        if (s->sent == 0 || s->answered >= s->sent)
            return;
        struct record *r = find_record(&w->key, s->sent);
        if (!r)
            return;
        r->req_bytes = s->req.body;
        r->req_head = s->req.head;
        r->req_end = w->start;
    }
}

static __always_inline void request_done(struct work *w, struct conn_state *s)
{
    commit(w, s);
    s->req.phase = P_IDLE;
}

static __always_inline void response_done(struct work *w, struct conn_state *s)
{
    commit(w, s);
    struct record *r = find_record(&w->key, s->answered + 1);
    if (r)
        emit(&w->key, r, RF_COMPLETE);
    else
        count_stat(STAT_EVICTED);
    s->answered++;
    s->adopted = 0;       /* a response: HTTP it is */
    if (s->resp.status == 101)
        s->ignored = 1;   /* switched protocols: no more HTTP/1.x */
    s->resp.phase = P_IDLE;
    /* Answered before its body was all sent (an error instead of
     * 100 Continue): the rest of that body will not come. */
    if (s->answered == s->sent)
        s->req.phase = P_IDLE;
}

static __always_inline void message_done(struct work *w, struct conn_state *s)
{
    if (w->is_read)
        response_done(w, s);
    else
        request_done(w, s);
}

/* Give up on a connection whose bytes the parser cannot follow. */
static __always_inline void unparsed(struct work *w, struct conn_state *s)
{
    count_stat(STAT_UNPARSED);
    commit(w, s);
    end_conn(&w->key, s);
    struct conn_state ignored = {.ignored = 1};
    conns.update(&w->key, &ignored);
}

/* The empty line after a head: how the body is framed. */
static __always_inline void head_done(struct work *w, struct conn_state *s,
                                      struct parser *p)
{
    p->head_done = 1;
    u64 length = p->acc;
    p->acc = 0;
    if (!w->is_read) {
        if (p->flags & DFA_FLAG_CHUNKED) {
            p->dfa = CHUNK_SIZE;
        } else if ((p->flags & DFA_FLAG_LENGTH) && length) {
            p->phase = P_SKIP;
            p->left = length;
        } else {
            request_done(w, s);
        }
        return;
    }
    u16 status = p->status;
    struct record *r = find_record(&w->key, s->answered + 1);
    if (status >= 100 && status < 200 && status != 101) {
        /* An interim response (100 Continue): the final one follows, and
         * its first byte is the one that counts. */
        reset_parser(p, P_IDLE, 0);
        if (r)
            r->resp_cap = 0;
        w->captured = 0;
    } else if ((r && (r->flags & RF_HEAD_METHOD)) || status == 204 ||
               status == 304 || status == 101 || status < 100) {
        response_done(w, s);
    } else if (p->flags & DFA_FLAG_CHUNKED) {
        p->dfa = CHUNK_SIZE;
    } else if (p->flags & DFA_FLAG_LENGTH) {
        if (length) {
            p->phase = P_SKIP;
            p->left = length;
        } else {
            response_done(w, s);
        }
    } else {
        p->phase = P_CLOSE;
        if (r)
            r->flags |= RF_CLOSE_DELIMITED;
    }
}

/* A message starts at pos: a request line, or the response to the oldest
 * request not yet answered. 0 when the bytes cannot be read. */
static __always_inline int start_message(struct work *w, struct conn_state *s,
                                         struct parser *p)
{
    u64 avail = w->len - w->pos;
    if (!w->is_read) {
        char m[4] = {};
        if (avail >= 4)
            read_user(m, sizeof(m), (void *)(w->buf + w->pos));
        if (!is_request_start(m)) {
            /* Not a request line: more body of the last request (a body
             * without framing), or nothing we follow. */
            if (s->sent > s->answered) {
                p->body += avail;
                commit(w, s);
            }
            w->pos = w->len;
            return 1;
        }
        u32 zero = 0;
        struct record *b = blank.lookup(&zero);
        if (!b)
            return 0;
        s->sent++;
        b->req_start = w->start;
        b->req_end = w->start;
        b->resp_start = 0;
        b->resp_end = 0;
        b->req_bytes = 0;
        b->resp_bytes = 0;
        b->handle = w->key.handle;
        b->tgid = w->key.tgid;
        b->tid = (u32)bpf_get_current_pid_tgid();
        b->seq = s->sent;
        b->req_head = 0;
        b->resp_head = 0;
        b->status = 0;
        b->req_cap = 0;
        b->resp_cap = 0;
        b->lib = w->key.lib;
        b->flags = m[0] == 'H' ? RF_HEAD_METHOD : 0;
        b->connect_start = 0;
        b->connect_end = 0;
        b->retrans_start = 0;
        struct tcp_conn *c = s->sk ? tcp_conns.lookup(&s->sk) : 0;
        if (c) {
            b->flags |= RF_SOCKET;
            b->retrans_start = c->retrans;
            if (s->sent == 1) {
                b->connect_start = c->start;
                b->connect_end = c->end;
            }
        }
        b->retrans_end = b->retrans_start;
        bpf_get_current_comm(&b->comm, sizeof(b->comm));
        struct req_key rk = {.conn = w->key, .seq = s->sent};
        inflight.update(&rk, b);
        reset_parser(p, P_SCAN, SKIP);   /* past the request line */
    } else {
        if (s->answered >= s->sent) {
            w->pos = w->len;          /* nothing asked: not a response */
            return 1;
        }
        reset_parser(p, P_SCAN, ST_START);
        struct record *r = find_record(&w->key, s->answered + 1);
        if (r) {
            r->resp_start = w->now;
            r->resp_cap = 0;
        }
    }
    w->captured = 0;
    return 1;
}

/* Up to STEPS bytes through the automaton; chunk data is skipped. Every
 * value the loop carries lives in the map values, not in registers: the
 * verifier then sees the same state at the top of each step, whatever
 * path the step took, and its work grows with STEPS only linearly. */
static __always_inline void scan(struct work *w, struct parser *p,
                                 struct dfa_tables *t)
{
    for (int i = 0; i < STEPS; i++) {
        forget_registers();
        u32 st = p->dfa;
        u64 pos = w->pos;
        if (st >= DFA_STOP)
            break;
        if (st == CHUNK_DATA) {
            u64 acc = p->acc;
            if (acc == 0) {
                p->dfa = TRAILER;       /* the last chunk */
                continue;
            }
            u64 n = w->len - pos < acc ? w->len - pos : acc;
            w->pos = pos + n;
            p->acc = acc - n;
            p->body += n;
            if (acc - n)
                break;                  /* the chunk goes on in a later read */
            p->dfa = CHUNK_CRLF;
            continue;
        }
        if (pos >= w->len)
            break;
        if (pos >= w->win_start + w->win_len) {
            u64 n = w->len - pos;
            bound_value(n, WIN);
            if (read_user(w->win, n, (void *)(w->buf + pos)) != 0) {
                p->dfa = BAD;
                break;
            }
            w->win_start = pos;
            w->win_len = n;
        }
        u8 c = w->win[(pos - w->win_start) & (WIN - 1)];
        u32 in_head = t->in_head[st & ((1 << DFA_BITS) - 1)] & 1;
        p->head += in_head;
        p->body += 1 - in_head;
        u64 cell = (st << CLASS_BITS) | t->byte_class[c];
        /* The mask must reach the verifier: the compiler would drop it
         * (both halves look bounded to it), and 6.1's verifier then sees
         * an unbounded index. */
        asm volatile("" : "+r"(cell));
        cell &= (1 << (DFA_BITS + CLASS_BITS)) - 1;
        u32 k = t->next[cell] & ((1 << DFA_BITS) - 1);
        p->dfa = k;
        p->acc = p->acc * t->acc_mul[k] + t->acc_add[k] * t->value[c];
        p->status = p->status * t->status_mul[k] +
                    t->status_add[k] * t->value[c];
        p->flags |= t->flags[k];
        w->pos = pos + 1;
    }
}

/* A header line nobody needs, eight bytes at a time, up to the word that
 * holds its newline (the automaton takes it from there). */
static __always_inline void skip_line(struct work *w, struct parser *p)
{
    for (int i = 0; i < SKIP_WORDS; i++) {
        forget_registers();
        u64 pos = w->pos;
        if (pos + 8 > w->win_start + w->win_len) {
            if (pos + 8 > w->len)
                return;
            u64 n = w->len - pos;
            bound_value(n, WIN);
            if (read_user(w->win, n, (void *)(w->buf + pos)) != 0)
                return;
            w->win_start = pos;
            w->win_len = n;
        }
        u64 v = *(u64 *)&w->win[(pos - w->win_start) & (WIN - 1)];
        v ^= 0x0a0a0a0a0a0a0a0aULL;
        if ((v - 0x0101010101010101ULL) & ~v & 0x8080808080808080ULL)
            return;
        w->pos = pos + 8;
        p->head += 8;
    }
}

/* The next iovec of a vectored call; 0 when the call's bytes are done. */
static __always_inline int next_segment(struct work *w)
{
    if (!w->iov_left || !w->rest)
        return 0;
    u64 seg[2] = {};
    if (read_iovec(seg, w->iov, w->iov_in_kernel) != 0)
        return 0;
    w->iov += sizeof(seg);
    w->iov_left--;
    w->buf = seg[0];
    w->len = seg[1] < w->rest ? seg[1] : w->rest;
    w->rest -= w->len;
    w->pos = 0;
    w->win_start = 0;
    w->win_len = 0;
    w->captured = 0;
    return 1;
}

/* One run of the parser; 1 when the call has more to parse. */
static __always_inline int parse_run(void)
{
    u32 zero = 0;
    struct work *w = works.lookup(&zero);
    struct dfa_tables *t = dfa.lookup(&zero);
    if (!w || !t)
        return 0;
    struct conn_state *s = conns.lookup(&w->key);
    if (!s || s->ignored)
        return 0;
    for (int i = 0; i < ACTIONS; i++) {
        struct parser *p = w->is_read ? &s->resp : &s->req;
        if (w->pos >= w->len && !next_segment(w)) {
            commit(w, s);
            if (w->eof)
                end_conn(&w->key, s);
            return 0;
        }
        if (!w->captured && p->phase != P_IDLE &&
            (!p->head_done || (w->is_read && p->status >= 300))) {
            /* A head that goes on in this segment, or an error body. */
            struct record *r = find_record(&w->key, w->is_read ?
                                           s->answered + 1 : s->sent);
            if (r)
                capture(w, r);
        }
        if (p->phase == P_IDLE) {
            if (!start_message(w, s, p)) {
                unparsed(w, s);
                return 0;
            }
        } else if (p->phase == P_SKIP) {
            u64 avail = w->len - w->pos;
            u64 n = p->left < avail ? p->left : avail;
            w->pos += n;
            p->left -= n;
            p->body += n;
            if (!p->left)
                message_done(w, s);
        } else if (p->phase == P_CLOSE) {
            p->body += w->len - w->pos;
            w->pos = w->len;
        } else {
            if (p->dfa == SKIP)
                skip_line(w, p);
            scan(w, p, t);
            if (p->dfa == HEAD_END)
                head_done(w, s, p);
            else if (p->dfa == MESSAGE_END)
                message_done(w, s);
            else if (p->dfa == BAD) {
                unparsed(w, s);
                return 0;
            }
        }
        if (s->ignored)
            return 0;
    }
    if (++w->runs < MAX_RUNS)
        return 1;
    unparsed(w, s);
    return 0;
}

/* The parser program runs again by tail call, up to MAX_RUNS times, so a
 * read of many small chunks is followed whole. A failed tail call (none
 * left) gives up on the connection. */
static __always_inline void parse_more_failed(void)
{
    u32 zero = 0;
    struct work *w = works.lookup(&zero);
    if (!w)
        return;
    struct conn_state *s = conns.lookup(&w->key);
    if (s)
        unparsed(w, s);
}

int parse_uprobe(struct pt_regs *ctx)
{
    if (parse_run()) {
        uprobe_parser.call(ctx, 0);
        parse_more_failed();
    }
    return 0;
}

#if PLAIN_HTTP
int parse_tracepoint(void *ctx)
{
    if (parse_run()) {
        tracepoint_parser.call(ctx, 0);
        parse_more_failed();
    }
    return 0;
}
#endif

/* The TCP socket of a new connection, or 0 (see tcp_conns). */
static __always_inline u64 bind_socket(struct call_args *a)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    if (a->lib == LIB_PLAIN && a->sk) {
        struct tcp_conn fresh = {};     /* seen in the TCP layer itself */
        tcp_conns.insert(&a->sk, &fresh);
        return a->sk;
    }
#if HAVE_SEND_LENGTH
    if (!a->sk) {
        /* Go's Write is seen at its entry: the send comes later. */
        struct conn_key k = {.handle = a->handle,
                             .tgid = bpf_get_current_pid_tgid() >> 32,
                             .lib = a->lib};
        unbound.update(&tid, &k);
        return 0;
    }
    struct tcp_conn fresh = {};
    tcp_conns.insert(&a->sk, &fresh);   /* retransmissions of any socket */
    return a->sk;
#else
    u64 *sk = connecting.lookup(&tid);
    if (!sk)
        return 0;
    u64 found = *sk;
    connecting.delete(&tid);
    struct tcp_conn *c = tcp_conns.lookup(&found);
    if (!c || c->claimed)
        return 0;       /* closed meanwhile, or another connection's */
    c->claimed = 1;
    return found;
#endif
}

/* A read or write of n bytes returned: hand it to the parser. Writes
 * decide whether a new connection is HTTP/1.x at all. */
static __always_inline struct work *begin_io(struct call_args *a, u64 n,
                                             int is_read, int eof)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    struct conn_key k = {.handle = a->handle, .tgid = tgid, .lib = a->lib};
    struct conn_state *s = conns.lookup(&k);
    if (is_read) {
        if (!s || s->ignored || s->answered >= s->sent)
            return 0;
        if (n == 0) {
            if (eof)
                end_conn(&k, s);
            return 0;
        }
    } else {
        if (n == 0)
            return 0;
        if (!s) {
            /* A connection that does not open with an HTTP request is not
             * HTTP/1.x (HTTP/2, another protocol): ignored from now on. */
            char head[4] = {};
            u64 first[2] = {a->buf, n};
            if (a->iov)
                read_iovec(first, a->iov, a->iov_in_kernel);
            if (n >= 4 && first[1] >= 4)
                read_user(head, sizeof(head), (void *)first[0]);
            struct conn_state fresh = {};
            fresh.ignored = !is_request_start(head);
            fresh.adopted = a->adopt;
            if (!fresh.ignored)
                fresh.sk = bind_socket(a);
            conns.update(&k, &fresh);
            if (fresh.ignored)
                return 0;
            u8 one = 1;
            procs.update(&tgid, &one);
            s = conns.lookup(&k);
            if (!s)
                return 0;
        }
        if (s->ignored)
            return 0;
        if (!s->sk && a->sk && s->sent == 0)
            s->sk = bind_socket(a);
    }
    u32 zero = 0;
    struct work *w = works.lookup(&zero);
    if (!w)
        return 0;
    w->key = k;
    w->start = a->start;
    w->now = bpf_ktime_get_ns();
    w->is_read = is_read;
    w->eof = 0;
    w->runs = 0;
    w->pos = 0;
    w->win_start = 0;
    w->win_len = 0;
    w->captured = 0;
    if (a->iov) {
        /* The call moved n bytes over its iovecs: walk them up to n. */
        u64 seg[2] = {};
        read_iovec(seg, a->iov, a->iov_in_kernel);
        w->buf = seg[0];
        w->len = seg[1] < n ? seg[1] : n;
        w->rest = n - w->len;
        w->iov = a->iov + sizeof(seg);
        w->iov_left = a->iovcnt > 1 ? a->iovcnt - 1 : 0;
        w->iov_in_kernel = a->iov_in_kernel;
    } else {
        w->buf = a->buf;
        w->len = n;
        w->iov = 0;
        w->rest = 0;
        w->iov_left = 0;
    }
    return w;
}

/* NSPR does all I/O through PR_Write/PR_Read, files and pipes included.
 * A TLS connection is a layered PRFileDesc (the SSL layer over TCP): a
 * descriptor with nothing below it (PRFileDesc.lower, offset 16) is not. */
static __always_inline int nspr_layered(u64 fd)
{
    u64 lower = 0;
    read_user(&lower, sizeof(lower), (void *)(fd + 16));
    return lower != 0;
}

static __always_inline int enter_io(struct pt_regs *ctx, u32 lib, u64 handle,
                                    u64 buf, u64 sizep, int is_read)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (!handle || !pass_filters(tgid))
        return 0;
    if (lib == LIB_NSS && !nspr_layered(handle))
        return 0;
    /* Reads only matter on connections waiting for a response; writes on
     * all but those known not to be HTTP/1.x clients (a server's, HTTP/2,
     * other protocols): they pay this lookup, not the call's bookkeeping. */
    struct conn_key k = {.handle = handle, .tgid = tgid, .lib = lib};
    struct conn_state *s = conns.lookup(&k);
    if (is_read ? !s || s->ignored || s->answered >= s->sent
                : s && s->ignored)
        return 0;
    struct call_args a = {.handle = handle, .buf = buf, .sizep = sizep,
                          .start = bpf_ktime_get_ns(),
                          .sp = PT_REGS_SP(ctx), .lib = lib};
    /* An outer call of the same thread is in progress (a library entry
     * point calling another one): the outer call is the one we report. */
    if (calls.insert(&tid, &a) != 0)
        count_stat(STAT_COLLISION);
    return 0;
}

static __always_inline int exit_io(struct pt_regs *ctx, int is_read)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct call_args *ap = calls.lookup(&tid);
    if (!ap)
        return 0;
    /* A uretprobe sees the stack pointer just above the return address:
     * only the call that stored these arguments may take them. */
    if (PT_REGS_SP(ctx) != ap->sp + 8)
        return 0;
    struct call_args a = *ap;
    calls.delete(&tid);
    /* OpenSSL and NSPR return int; only GnuTLS returns ssize_t. 0 is the
     * end of the connection, except for the _ex calls (1 or 0). */
    long ret = a.lib == LIB_GNUTLS ? (long)PT_REGS_RC(ctx)
                                   : (long)(int)PT_REGS_RC(ctx);
    u64 n = ret > 0 ? (u64)ret : 0;
    int eof = ret == 0 && !a.sizep;
    if (a.sizep) {
        n = 0;
        if (ret == 1)
            read_user(&n, sizeof(n), (void *)a.sizep);
    }
    if (begin_io(&a, n, is_read, eof))
        uprobe_parser.call(ctx, 0);
    return 0;
}

static __always_inline int close_conn(u32 lib, u64 handle)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct conn_key k = {.handle = handle, .tgid = tgid, .lib = lib};
    struct conn_state *s = conns.lookup(&k);
    if (s)
        end_conn(&k, s);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (tgid != (u32)id || !procs.lookup(&tgid))
        return 0;
    procs.delete(&tgid);
    /* User space reports what the process left unanswered. */
    u32 zero = 0;
    struct record *r = blank.lookup(&zero);
    if (!r)
        return 0;
    r->type = REC_EXIT;
    r->tgid = tgid;
    if (records.ringbuf_output(r, offsetof(struct record, resp_data),
                               wake_flag()) != 0)
        count_stat(STAT_LOST);
    return 0;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != 6)              /* IPPROTO_TCP */
        return 0;
    u64 sk = (u64)args->skaddr;
    if (args->newstate == 2) {            /* TCP_SYN_SENT: connect() */
        u64 id = bpf_get_current_pid_tgid();
        if (!pass_filters(id >> 32))
            return 0;
        struct tcp_conn c = {.start = bpf_ktime_get_ns()};
        tcp_conns.update(&sk, &c);
#if !HAVE_SEND_LENGTH
        u32 tid = (u32)id;
        connecting.update(&tid, &sk);
#endif
    } else if (args->newstate == 1) {     /* TCP_ESTABLISHED */
        struct tcp_conn *c = tcp_conns.lookup(&sk);
        if (c && !c->end)
            c->end = bpf_ktime_get_ns();
    } else if (args->newstate == 7) {     /* TCP_CLOSE */
        tcp_conns.delete(&sk);
    }
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
#if HAVE_RETRANSMIT_ERR
    if (args->err)
        return 0;       /* an attempt that did not go out (Linux 6.13+) */
#endif
    u64 sk = (u64)args->skaddr;
    struct tcp_conn *c = tcp_conns.lookup(&sk);
    if (c)
        __sync_fetch_and_add(&c->retrans, 1);
    return 0;
}

/* Programs started from now on, and shared objects mapped from now on: a
 * file user space has not looked at yet is reported at once, so its probes
 * can be in place before it talks TLS. Files are known by identity (inode
 * and device), not path: a package upgrade or a container image puts a new
 * file where an old one was. Known files (filled by user space and here)
 * cost a few reads and one lookup per exec or executable mapping. Where
 * the kernel keeps them comes from its BTF, through kernel_offsets, which
 * user space fills once the program is loaded. */
struct kernel_offsets {
    u32 ready;          /* the file offsets below are known */
    u32 task_mm, task_files, mm_exe_file, files_fdt, fdt_fd, fdt_max_fds,
        file_inode, inode_ino, inode_sb, sb_dev;
    u32 tcp_ready;      /* the TCP-layer ones are (plain HTTP, kprobes) */
    u32 msg_iter, iter_type, iter_offset, iter_count, iter_ptr, iter_segs,
        sk_dport;
    u32 iter_ubuf, iter_iovec;  /* enum iter_type values */
};
BPF_ARRAY(kernel_offsets, struct kernel_offsets, 1);

struct file_id {
    u64 ino;
    u32 dev;            /* super_block.s_dev */
    u32 pad;
};
BPF_TABLE("lru_hash", struct file_id, u8, known_files, 65536);

static __always_inline u64 kernel_word(u64 addr)
{
    u64 value = 0;
    read_kernel(&value, sizeof(value), (void *)addr);
    return value;
}

/* 1 when a struct file * is a file user space has not looked at; it is
 * known from now on. */
static __always_inline int new_file(struct kernel_offsets *o, u64 file,
                                    struct file_id *id)
{
    u64 inode = file ? kernel_word(file + o->file_inode) : 0;
    if (!inode)
        return 0;
    id->ino = kernel_word(inode + o->inode_ino);
    id->dev = (u32)kernel_word(kernel_word(inode + o->inode_sb) + o->sb_dev);
    id->pad = 0;
    u8 one = 1;
    if (known_files.lookup(id))
        return 0;
    return known_files.insert(id, &one) == 0;
}

static __always_inline void report_file(u8 type, u32 tgid, struct record *r,
                                        int path_len)
{
    r->type = type;
    r->tgid = tgid;
    r->req_start = bpf_ktime_get_ns();
    r->req_cap = path_len;
    u64 size = offsetof(struct record, req_data) + 256;
    if (records.ringbuf_output(r, size, BPF_RB_FORCE_WAKEUP) != 0)
        count_stat(STAT_LOST);
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 zero = 0;
    struct kernel_offsets *o = kernel_offsets.lookup(&zero);
    if (!o || !o->ready || !pass_filters(tgid))
        return 0;
    u64 task = bpf_get_current_task();
    u64 exe = kernel_word(kernel_word(task + o->task_mm) + o->mm_exe_file);
    struct file_id id;
    if (!new_file(o, exe, &id))
        return 0;
    struct record *r = blank.lookup(&zero);
    if (!r)
        return 0;
    int len = read_kernel_str(r->req_data, 256,
        (void *)args + (args->data_loc_filename & 0xffff));
    report_file(REC_EXEC, tgid, r, len > 1 ? len - 1 : 0);
    return 0;
}

/* A file mapped executable (the loader mapping a shared object's code,
 * at start or at dlopen): ld.so maps it from a descriptor. */
TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
    if (!(args->prot & 4) || (int)args->fd < 0)     /* PROT_EXEC, a file */
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 zero = 0;
    struct kernel_offsets *o = kernel_offsets.lookup(&zero);
    if (!o || !o->ready || !pass_filters(tgid))
        return 0;
    u64 task = bpf_get_current_task();
    u64 fdt = kernel_word(kernel_word(task + o->task_files) + o->files_fdt);
    u32 max_fds = (u32)kernel_word(fdt + o->fdt_max_fds);
    u32 fd = args->fd;
    if (fd >= max_fds)
        return 0;
    u64 file = kernel_word(kernel_word(fdt + o->fdt_fd) + 8 * (u64)fd);
    struct file_id id;
    if (!new_file(o, file, &id))
        return 0;
    struct record *r = blank.lookup(&zero);
    if (r)
        report_file(REC_MAP, tgid, r, 0);
    return 0;
}

/* A request body the kernel sends from a file: sendfile(2), splice(2),
 * and SSL_sendfile with kernel TLS (the head went through SSL_write, the
 * body never passes the library). Counted, never copied, on the plain
 * connection of the fd or the TLS connection the fd was given to
 * (SSL_set_fd). Always on: these calls are few. */
struct fd_key {
    u32 tgid;
    u32 fd;
};
BPF_TABLE("lru_hash", struct fd_key, u64, fd_owners, __MAX_CONNS__);
BPF_TABLE("lru_hash", u32, struct call_args, file_sends, 16384);

int openssl_set_fd_enter(struct pt_regs *ctx)
{
    struct fd_key fk = {.tgid = bpf_get_current_pid_tgid() >> 32,
                        .fd = PT_REGS_PARM2(ctx)};
    u64 ssl = PT_REGS_PARM1(ctx);
    fd_owners.update(&fk, &ssl);
    return 0;
}

#if PLAIN_HTTP
/* Plain HTTP from syscall tracepoints (no kprobes needed). A TCP socket is
 * one this process created with socket(AF_INET/AF_INET6, SOCK_STREAM) while
 * we watched; the connection key is (tgid, fd). A TLS socket's first write
 * is a ClientHello, not HTTP: it is dropped like any non-HTTP connection,
 * so a TLS request is never reported twice. */
BPF_TABLE("lru_hash", struct fd_key, u16, tcp_fds, __MAX_CONNS__);
BPF_TABLE("lru_hash", u32, struct call_args, sys_calls, 16384);
BPF_TABLE("lru_hash", u32, u8, new_sockets, 4096);

static __always_inline int tcp_fd(u32 fd)
{
    struct fd_key fk = {.tgid = bpf_get_current_pid_tgid() >> 32, .fd = fd};
    return tcp_fds.lookup(&fk) != 0;
}

/* A socket connected before we started: adopted at a write that begins
 * like an HTTP request (the first bytes only: cheap for every other
 * write on the host). Not with --port, which needs the connect. */
static __always_inline int looks_like_request(u64 buf, u64 iov, u64 count)
{
    if (HAVE_PORT_FILTER)
        return 0;
    if (iov) {
        u64 first[2] = {};
        read_user(first, sizeof(first), (void *)iov);
        buf = first[0];
        count = first[1];
    }
    char m[4] = {};
    if (count < 4 || read_user(m, sizeof(m), (void *)buf) != 0)
        return 0;
    return is_request_start(m);
}

static __always_inline int sys_enter_io(u32 fd, u64 buf, u64 iov, u32 iovcnt,
                                        int is_read, u64 count)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    u32 adopt = 0;
    if (!tcp_fd(fd)) {
        if (is_read || !looks_like_request(buf, iov, count) ||
            !pass_filters(tgid) || calls.lookup(&tid))
            return 0;
        struct fd_key fk = {.tgid = tgid, .fd = fd};
        u16 port = 0;
        tcp_fds.update(&fk, &port);
        adopt = 1;
    } else if (!pass_filters(tgid)) {
        return 0;
    }
    /* Inside SSL_write/SSL_read (kernel TLS: the plaintext reaches the
     * socket): the TLS probes report this request, not us. */
    if (calls.lookup(&tid))
        return 0;
    if (is_read) {
        struct conn_key k = {.handle = fd, .tgid = tgid, .lib = LIB_PLAIN};
        struct conn_state *s = conns.lookup(&k);
        if (!s || s->ignored || s->answered >= s->sent)
            return 0;
    }
    struct call_args a = {.handle = fd, .buf = buf, .iov = iov,
                          .iovcnt = iovcnt, .start = bpf_ktime_get_ns(),
                          .lib = LIB_PLAIN, .adopt = adopt};
    sys_calls.update(&tid, &a);
    return 0;
}

static __always_inline int sys_exit_io(void *ctx, long ret, int is_read)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct call_args *ap = sys_calls.lookup(&tid);
    if (!ap)
        return 0;
    struct call_args a = *ap;
    sys_calls.delete(&tid);
    struct work *w = begin_io(&a, ret > 0 ? (u64)ret : 0, is_read, ret == 0);
    if (w) {
        tracepoint_parser.call(ctx, 0);
        return 0;
    }
    if (!is_read) {
        /* Not HTTP (a TLS socket, another protocol): forget the fd, so
         * its next syscalls cost one failed lookup. */
        struct conn_key k = {.handle = a.handle, .tgid = id >> 32,
                             .lib = LIB_PLAIN};
        struct conn_state *s = conns.lookup(&k);
        if (s && s->ignored) {
            struct fd_key fk = {.tgid = id >> 32, .fd = a.handle};
            tcp_fds.delete(&fk);
            conns.delete(&k);
        }
    }
    return 0;
}

static __always_inline int msg_enter(u32 fd, u64 msg, int is_read)
{
    if (is_read && !tcp_fd(fd))
        return 0;
    u64 hdr[4] = {};  /* struct user_msghdr: name, namelen, iov, iovlen */
    read_user(hdr, sizeof(hdr), (void *)msg);
    return sys_enter_io(fd, 0, hdr[2], hdr[3], is_read, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_write) { return sys_enter_io(args->fd, (u64)args->buf, 0, 0, 0, args->count); }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return sys_exit_io(args, args->ret, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { return sys_enter_io(args->fd, (u64)args->buff, 0, 0, 0, args->len); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return sys_exit_io(args, args->ret, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return sys_enter_io(args->fd, 0, (u64)args->vec, args->vlen, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return sys_exit_io(args, args->ret, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return msg_enter(args->fd, (u64)args->msg, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return sys_exit_io(args, args->ret, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_read) { return sys_enter_io(args->fd, (u64)args->buf, 0, 0, 1, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return sys_exit_io(args, args->ret, 1); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { return sys_enter_io(args->fd, (u64)args->ubuf, 0, 0, 1, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return sys_exit_io(args, args->ret, 1); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return sys_enter_io(args->fd, 0, (u64)args->vec, args->vlen, 1, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return sys_exit_io(args, args->ret, 1); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { return msg_enter(args->fd, (u64)args->msg, 1); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return sys_exit_io(args, args->ret, 1); }

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
    read_user(sa, sizeof(sa), (void *)args->uservaddr);
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
    return close_conn(LIB_PLAIN, args->fd);
}
#endif

/* n bytes the kernel sent from elsewhere (a file, a pipe) after the
 * request head: they are body, they count, and they end a body of known
 * length. */
static __always_inline void add_body(struct conn_key *k, struct conn_state *s,
                                     u64 n, u64 start)
{
    if (!s || s->ignored || s->answered >= s->sent)
        return;
    struct parser *p = &s->req;
    p->body += n;
    if (p->phase == P_SKIP) {
        p->left = p->left > n ? p->left - n : 0;
        if (!p->left)
            p->phase = P_IDLE;
    }
    struct record *r = find_record(k, s->sent);
    if (r) {
        r->req_bytes = p->body;
        r->req_end = start;
    }
}

static __always_inline int file_send_enter(u32 out_fd)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct fd_key fk = {.tgid = id >> 32, .fd = out_fd};
    if (!fd_owners.lookup(&fk)
#if PLAIN_HTTP
        && !tcp_fds.lookup(&fk)
#endif
        )
        return 0;
    struct call_args a = {.handle = out_fd, .start = bpf_ktime_get_ns(),
                          .lib = LIB_PLAIN};
    file_sends.update(&tid, &a);
    return 0;
}

static __always_inline int file_send_exit(long ret)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct call_args *ap = file_sends.lookup(&tid);
    if (!ap)
        return 0;
    struct conn_key k = {.handle = ap->handle, .tgid = id >> 32,
                         .lib = LIB_PLAIN};
    u64 start = ap->start;
    file_sends.delete(&tid);
    if (ret <= 0)
        return 0;
    struct conn_state *s = conns.lookup(&k);
    if (!s || s->ignored) {
        struct fd_key fk = {.tgid = id >> 32, .fd = k.handle};
        u64 *ssl = fd_owners.lookup(&fk);
        if (!ssl)
            return 0;
        k.handle = *ssl;
        k.lib = LIB_OPENSSL;
        s = conns.lookup(&k);
    }
    add_body(&k, s, ret, start);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64) { return file_send_enter(args->out_fd); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendfile64) { return file_send_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_splice) { return file_send_enter(args->fd_out); }
TRACEPOINT_PROBE(syscalls, sys_exit_splice) { return file_send_exit(args->ret); }

/* Kernel TLS, where the kernel has kprobes: every send on a kTLS socket
 * reaches tls_sw_sendmsg (before Linux 6.5, tls_sw_sendpage for sendfile
 * and splice; tls_device_* with NIC offload) with the plaintext, whoever
 * sends: write(2), a sendfile the syscall probes did not claim, io_uring
 * SEND, WRITE and SPLICE (run by a kernel worker, with no syscall to see).
 * The socket is tied to its TLS connection at the library's own first
 * send through it (SSL_write of the request head); what is sent outside
 * the library after that is the request's body. */
BPF_TABLE("lru_hash", u64, struct conn_key, ktls_sockets, __MAX_CONNS__);
struct ktls_send {
    u64 sk;
    u64 start;
};
BPF_TABLE("lru_hash", u32, struct ktls_send, ktls_sends, 16384);

int ktls_send_enter(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u64 sk = PT_REGS_PARM1(ctx);
    struct call_args *a = calls.lookup(&tid);
    if (a) {
        struct conn_key k = {.handle = a->handle, .tgid = id >> 32,
                             .lib = a->lib};
        ktls_sockets.update(&sk, &k);
        return 0;               /* the library's own send: counted there */
    }
    if (file_sends.lookup(&tid) || !ktls_sockets.lookup(&sk))
        return 0;               /* a sendfile the syscall probes count */
    struct ktls_send send = {.sk = sk, .start = bpf_ktime_get_ns()};
    ktls_sends.update(&tid, &send);
    return 0;
}

int ktls_send_return(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ktls_send *send = ktls_sends.lookup(&tid);
    if (!send)
        return 0;
    u64 sk = send->sk, start = send->start;
    ktls_sends.delete(&tid);
    int ret = PT_REGS_RC(ctx);
    struct conn_key *k = ktls_sockets.lookup(&sk);
    if (ret <= 0 || !k)
        return 0;
    struct conn_key key = *k;
    add_body(&key, conns.lookup(&key), ret, start);
    return 0;
}

#if TCP_PROBES
/* Plain HTTP in the TCP layer, where the kernel has kprobes: tcp_sendmsg
 * and tcp_recvmsg see every TCP socket's bytes (connected before us or
 * not), and nothing else on the host pays. The connection key is
 * (tgid, socket). A socket whose first bytes are not an HTTP request (TLS,
 * a database protocol) is marked ignored at once: from then on its sends
 * and receives cost one lookup. */
BPF_TABLE("lru_hash", u32, struct call_args, tcp_calls, 16384);

static __always_inline int tcp_enter(struct pt_regs *ctx, int is_read)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    u64 sk = PT_REGS_PARM1(ctx), msg = PT_REGS_PARM2(ctx);
    struct conn_key k = {.handle = sk, .tgid = tgid, .lib = LIB_PLAIN};
    struct conn_state *s = conns.lookup(&k);
    if (s ? s->ignored || (is_read && s->answered >= s->sent) : is_read)
        return 0;
    /* Inside a TLS library call the bytes are ciphertext (or kTLS's). */
    if (calls.lookup(&tid) || !pass_filters(tgid))
        return 0;
    if (is_read && (RECV_FLAGS(ctx) & 2))
        return 0;               /* MSG_PEEK: read again later */
    u32 zero = 0;
    struct kernel_offsets *o = kernel_offsets.lookup(&zero);
    if (!o || !o->tcp_ready)
        return 0;
#if HAVE_PORT_FILTER
    u16 dport = 0;
    read_kernel(&dport, sizeof(dport), (void *)(sk + o->sk_dport));
    if (((dport >> 8) | ((dport & 0xff) << 8)) != FILTER_PORT)
        return 0;
#endif
    u64 iter = msg + o->msg_iter;
    u8 type = 0;
    read_kernel(&type, sizeof(type), (void *)(iter + o->iter_type));
    u64 ptr = kernel_word(iter + o->iter_ptr);
    u64 offset = kernel_word(iter + o->iter_offset);
    struct call_args a = {.handle = sk, .start = bpf_ktime_get_ns(),
                          .lib = LIB_PLAIN, .sk = sk, .adopt = 1};
    if (type == o->iter_ubuf) {
        a.buf = ptr + offset;
    } else if (type == o->iter_iovec && offset == 0) {
        a.iov = ptr;
        a.iovcnt = kernel_word(iter + o->iter_segs);
        a.iov_in_kernel = 1;
    } else if (!is_read && s) {
        a.not_user = 1;         /* pages: sendfile, splice */
    } else {
        return 0;
    }
    tcp_calls.update(&tid, &a);
    return 0;
}

static __always_inline int tcp_return(struct pt_regs *ctx, int is_read)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct call_args *ap = tcp_calls.lookup(&tid);
    if (!ap)
        return 0;
    struct call_args a = *ap;
    tcp_calls.delete(&tid);
    int ret = PT_REGS_RC(ctx);
    if (a.not_user) {
        struct conn_key k = {.handle = a.handle, .tgid = id >> 32,
                             .lib = LIB_PLAIN};
        if (ret > 0)
            add_body(&k, conns.lookup(&k), ret, a.start);
        return 0;
    }
    if (begin_io(&a, ret > 0 ? (u64)ret : 0, is_read, ret == 0))
        uprobe_parser.call(ctx, 0);
    return 0;
}

int tcp_send_enter(struct pt_regs *ctx) { return tcp_enter(ctx, 0); }
int tcp_send_return(struct pt_regs *ctx) { return tcp_return(ctx, 0); }
int tcp_recv_enter(struct pt_regs *ctx) { return tcp_enter(ctx, 1); }
int tcp_recv_return(struct pt_regs *ctx) { return tcp_return(ctx, 1); }

/* Before Linux 6.5 sendfile and splice reach TCP here, not tcp_sendmsg. */
int tcp_sendpage_enter(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u64 sk = PT_REGS_PARM1(ctx);
    struct conn_key k = {.handle = sk, .tgid = id >> 32, .lib = LIB_PLAIN};
    struct conn_state *s = conns.lookup(&k);
    if (!s || s->ignored || calls.lookup(&tid))
        return 0;
    struct call_args a = {.handle = sk, .start = bpf_ktime_get_ns(),
                          .lib = LIB_PLAIN, .sk = sk, .not_user = 1};
    tcp_calls.update(&tid, &a);
    return 0;
}
#endif

#if HAVE_SEND_LENGTH
/* A send on a TCP socket, in the sending thread: the TLS or syscall call
 * in progress (or Go's new connection) learns its socket. */
TRACEPOINT_PROBE(sock, sock_send_length)
{
    if (args->protocol != 6)
        return 0;
    u64 sk = (u64)args->sk;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct call_args *a = calls.lookup(&tid);
    if (a) {
        a->sk = sk;
        return 0;
    }
#if PLAIN_HTTP
    a = sys_calls.lookup(&tid);
    if (a) {
        a->sk = sk;
        return 0;
    }
#endif
    struct conn_key *k = unbound.lookup(&tid);
    if (!k)
        return 0;
    struct conn_state *s = conns.lookup(k);
    if (s && !s->sk) {
        struct tcp_conn fresh = {};
        tcp_conns.insert(&sk, &fresh);
        s->sk = sk;
    }
    unbound.delete(&tid);
    return 0;
}
#endif


/* Go crypto/tls, register ABI on amd64: receiver in RAX, the []byte in
 * RBX (pointer) and RCX (length); results in RAX. The current goroutine is
 * in R14: a Read is matched to its return by goroutine, since goroutines
 * move between threads while they wait. */
struct goroutine {
    u64 g;              /* R14: the same addresses in every process of a
                         * program, so the process is part of the key */
    u32 tgid;
    u32 pad;
};
BPF_TABLE("lru_hash", struct goroutine, struct call_args, go_calls, 16384);

int go_write_enter(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!ctx->ax || !pass_filters(tgid))
        return 0;
    struct call_args a = {.handle = ctx->ax, .buf = ctx->bx,
                          .start = bpf_ktime_get_ns(), .lib = LIB_GO};
    /* Write returns only when all is written or the connection failed. */
    if (begin_io(&a, ctx->cx, 0, 0))
        uprobe_parser.call(ctx, 0);
    return 0;
}

int go_read_enter(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!ctx->ax || !pass_filters(tgid))
        return 0;
    /* No check of the connection here: net/http's reader goroutine enters
     * Read before the request is written; the return decides. */
    struct goroutine g = {.g = ctx->r14, .tgid = tgid};
    struct call_args a = {.handle = ctx->ax, .buf = ctx->bx,
                          .start = bpf_ktime_get_ns(), .lib = LIB_GO};
    go_calls.update(&g, &a);
    return 0;
}

int go_read_return(struct pt_regs *ctx)
{
    struct goroutine g = {.g = ctx->r14,
                          .tgid = bpf_get_current_pid_tgid() >> 32};
    struct call_args *ap = go_calls.lookup(&g);
    if (!ap)
        return 0;
    struct call_args a = *ap;
    go_calls.delete(&g);
    long n = (long)ctx->ax;
    /* Read returns 0 bytes only with an error: the connection ended. */
    if (begin_io(&a, n > 0 ? (u64)n : 0, 1, n == 0))
        uprobe_parser.call(ctx, 0);
    return 0;
}

int go_close_enter(struct pt_regs *ctx)
{
    return close_conn(LIB_GO, ctx->ax);
}

/* Entry points, one set per library family. */
#define IO_PROBES(fam, lib)                                                  \
int fam##_write_enter(struct pt_regs *ctx) {                                 \
    return enter_io(ctx, lib, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, 0); \
}                                                                            \
int fam##_read_enter(struct pt_regs *ctx) {                                  \
    return enter_io(ctx, lib, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, 1); \
}                                                                            \
int fam##_write_exit(struct pt_regs *ctx) { return exit_io(ctx, 0); }        \
int fam##_read_exit(struct pt_regs *ctx) { return exit_io(ctx, 1); }         \
int fam##_close_enter(struct pt_regs *ctx) {                                 \
    return close_conn(lib, PT_REGS_PARM1(ctx));                              \
}

IO_PROBES(openssl, LIB_OPENSSL)
IO_PROBES(gnutls, LIB_GNUTLS)
IO_PROBES(nss, LIB_NSS)

/* SSL_write_ex/SSL_read_ex(ssl, buf, num, size_t *done): return 1 or 0. */
int openssl_write_ex_enter(struct pt_regs *ctx) {
    return enter_io(ctx, LIB_OPENSSL, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx),
                    PT_REGS_PARM4(ctx), 0);
}
int openssl_read_ex_enter(struct pt_regs *ctx) {
    return enter_io(ctx, LIB_OPENSSL, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx),
                    PT_REGS_PARM4(ctx), 1);
}
"""


def tracepoint_field(category, event, field):
    """Whether this kernel's tracepoint exists and has the field."""
    for base in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        try:
            with open("%s/events/%s/%s/format" % (base, category, event)) as f:
                return re.search(r"[ *]%s;" % field, f.read()) is not None
        except OSError:
            continue
    return False


# Kernel layouts read from its BTF at start: (struct, member names tried
# in turn) -> byte offset, and (enum, name) -> value.
FILE_OFFSETS = (("task_struct", "mm"), ("task_struct", "files"),
                ("mm_struct", "exe_file"), ("files_struct", "fdt"),
                ("fdtable", "fd"), ("fdtable", "max_fds"),
                ("file", "f_inode"), ("inode", "i_ino"), ("inode", "i_sb"),
                ("super_block", "s_dev"))
TCP_OFFSETS = (("msghdr", "msg_iter"), ("iov_iter", "iter_type"),
               ("iov_iter", "iov_offset"), ("iov_iter", "count"),
               ("iov_iter", "ubuf", "iov", "__iov"), ("iov_iter", "nr_segs"),
               ("sock_common", "skc_dport"))
TCP_ENUMS = (("iter_type", "ITER_UBUF"), ("iter_type", "ITER_IOVEC"))
BTF_HEADER = struct.Struct("<HBBIIIII")
BTF_TYPE = struct.Struct("<III")
BTF_STRUCT, BTF_UNION, BTF_ENUM = 4, 5, 6
BTF_MODIFIERS = (8, 9, 10, 11, 18)      # typedef, volatile, const, ...
# Bytes after a type's header, by kind: fixed, and per vlen item.
BTF_EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8),
             13: (0, 8), 14: (4, 0), 15: (0, 12), 17: (4, 0), 19: (0, 12)}


def btf_layout(members=FILE_OFFSETS + TCP_OFFSETS, enums=TCP_ENUMS,
               path="/sys/kernel/btf/vmlinux"):
    """{(struct, member): byte offset} and {(enum, name): value} from a BTF
    file, looking into the anonymous structs and unions a member may sit
    in; what is not found is left out. None without BTF."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, \
            _str_len = BTF_HEADER.unpack_from(data)
    except (OSError, struct.error):
        return None
    if magic != 0xeb9f:
        return None
    strings = hdr_len + str_off

    def name(offset):
        return data[strings + offset:data.index(b"\0", strings + offset)]

    # One pass over the types, unpacking only their headers: a struct's
    # members are read when one is looked into.
    types = [None]              # id -> (kind, name offset, type, pos, info)
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    unpack, extra = BTF_TYPE.unpack_from, BTF_EXTRA
    while pos < end:
        name_off, info, size_or_type = unpack(data, pos)
        kind = (info >> 24) & 0x1f
        types.append((kind, name_off, size_or_type, pos, info))
        fixed, per_item = extra.get(kind, (0, 0))
        pos += 12 + fixed + per_item * (info & 0xffff)

    def member_offset(type_id, member):
        kind, _, inner, pos, info = types[type_id]
        while kind in BTF_MODIFIERS:
            kind, _, inner, pos, info = types[inner]
        if kind not in (BTF_STRUCT, BTF_UNION):
            return None
        for i in range(info & 0xffff):
            m_name, m_type, m_offset = unpack(data, pos + 12 + 12 * i)
            if info >> 31:
                m_offset &= 0xffffff            # bitfield size above
            if m_name and name(m_name) == member:
                return m_offset // 8
            if not m_name:
                below = member_offset(m_type, member)
                if below is not None:
                    return m_offset // 8 + below
        return None

    wanted = {item[0] for item in members} | {item[0] for item in enums}
    names = {}                  # string offset -> a wanted type's name
    for type_name in wanted:
        at = data.find(b"\0%s\0" % type_name.encode(), strings - 1)
        if at >= 0:
            names[at + 1 - strings] = type_name
    found_types = {}
    for type_id, (kind, name_off, _, pos, info) in enumerate(types[1:], 1):
        if kind in (BTF_STRUCT, BTF_ENUM) and name_off in names and \
                info & 0xffff:
            found_types.setdefault(names[name_off], (type_id, pos, info))
    layout = {}
    for struct_name, *alternatives in members:
        if struct_name in found_types:
            for member in alternatives:
                offset = member_offset(found_types[struct_name][0],
                                       member.encode())
                if offset is not None:
                    layout[(struct_name, alternatives[0])] = offset
                    break
    for enum_name, value_name in enums:
        if enum_name in found_types:
            _, pos, info = found_types[enum_name]
            for i in range(info & 0xffff):
                v_name, value = struct.unpack_from("<Ii", data, pos + 12 + 8 * i)
                if name(v_name) == value_name.encode():
                    layout[(enum_name, value_name)] = value
    return layout


def bpf_program(pid=None, comm=None, max_conns=65536, ringbuf_pages=1024,
                plain="syscalls", port=None):
    """The C text with filters and sizes compiled in. plain: how plain HTTP
    is followed, "tcp" (kprobes), "syscalls" (tracepoints) or None."""
    port_filter = ""
    if port:
        port_filter = ("if (remote != %d) { tcp_fds.delete(&fk); return 0; }"
                       % port)
    pid_filter = "if (tgid != %d) return 0;" % pid if pid else ""
    text = BPF_TEXT.replace("HAVE_PORT_FILTER", "1" if port else "0")
    for name, present in (
            ("HAVE_SEND_LENGTH", tracepoint_field("sock", "sock_send_length",
                                                  "sk")),
            ("HAVE_RETRANSMIT_ERR", tracepoint_field(
                "tcp", "tcp_retransmit_skb", "err"))):
        text = text.replace(name, "1" if present else "0")
    comm_filter = ""
    if comm:
        # The name as two 64-bit words, NUL-padded as the kernel keeps it.
        words = struct.unpack("<QQ", comm.encode()[:15].ljust(16, b"\0"))
        comm_filter = ("u64 c[2] = {};\n    "
                       "bpf_get_current_comm(&c, sizeof(c));\n    "
                       "if (c[0] != 0x%xULL || c[1] != 0x%xULL)\n"
                       "        return 0;" % words)
    for name, value in (("__REQ_CAP__", REQ_CAP),
                        ("__RESP_CAP__", RESP_CAP),
                        ("__WIN__", WIN),
                        ("__STEPS__", STEPS),
                        ("__ACTIONS__", ACTIONS),
                        ("__SKIP_WORDS__", SKIP_WORDS),
                        ("__MAX_RUNS__", MAX_RUNS),
                        ("__MAX_INFLIGHT__", MAX_INFLIGHT),
                        ("__WAKE_BYTES__",
                         ringbuf_pages * os.sysconf("SC_PAGE_SIZE") //
                         WAKE_FILL),
                        ("__RECORDS_FD__", RECORDS_FD),
                        ("__PLAIN_HTTP__", int(plain == "syscalls")),
                        ("__TCP_PROBES__", int(plain == "tcp")),
                        ("__FILTER_PORT__", port or 0),
                        # tcp_recvmsg lost its nonblock argument in 5.19
                        ("__RECV_FLAGS__", "PT_REGS_PARM4(ctx)"
                         if kernel_version() >= (5, 19)
                         else "PT_REGS_PARM5(ctx)"),
                        ("__PORT_FILTER__", port_filter),
                        ("__MAX_CONNS__", max_conns),
                        ("__RINGBUF_PAGES__", ringbuf_pages),
                        ("__PID_FILTER__", pid_filter),
                        ("__COMM_FILTER__", comm_filter),
                        ("__DFA_ENUM__", ", ".join(DFA_STATES)),
                        ("__DFA_STOP__", DFA_STOP),
                        ("__DFA_BITS__", DFA_BITS),
                        ("__CLASS_BITS__", CLASS_BITS)):
        text = text.replace(name, str(value))
    return text


# The compiled program as an image: each function's instructions with the
# places where it names a map, and each map's definition. BCC compiles the
# C text into one once per text, kernel and BCC version (LLVM takes 2 s
# here); later starts load the image kept in /var/cache/s3slower.
BPF_PROG_TYPE_KPROBE, BPF_PROG_TYPE_TRACEPOINT = 2, 5
BPF_LD_IMM64, BPF_PSEUDO_MAP_FD = 0x18, 1
RECORDS_FD = -0x7ead        # the ring in the program: no real fd is negative
IMAGE_VERSION = 1


def compile_image(bcc, text):
    """(image, BCC's BPF object, which owns the maps it created)."""
    try:
        bpf = bcc.BPF(text=text.encode())
    except Exception as exc:
        raise Fatal("the BPF program did not compile (%s); are the kernel "
                    "headers right? run ./install.sh" %
                    str(exc).splitlines()[0])
    lib, module = bcc.libbcc.lib, bpf.module
    # What BCC's Python binding leaves undeclared (a pointer would be cut
    # to an int).
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_num_tables.restype = ctypes.c_size_t
    for name, restype in (("bpf_table_name", ctypes.c_char_p),
                          ("bpf_table_fd_id", ctypes.c_int),
                          ("bpf_table_key_size_id", ctypes.c_size_t),
                          ("bpf_table_leaf_size_id", ctypes.c_size_t),
                          ("bpf_table_key_desc_id", ctypes.c_char_p),
                          ("bpf_table_leaf_desc_id", ctypes.c_char_p)):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        getattr(lib, name).restype = restype
    maps, by_fd = [], {}
    for i in range(lib.bpf_num_tables(module)):
        name = lib.bpf_table_name(module, i).decode()
        by_fd[lib.bpf_table_fd_id(module, i)] = len(maps)
        if name == "records":
            by_fd[RECORDS_FD] = len(maps)
        maps.append(dict(
            name=name,
            type=lib.bpf_table_type_id(module, i),
            key_size=lib.bpf_table_key_size_id(module, i),
            leaf_size=lib.bpf_table_leaf_size_id(module, i),
            max_entries=lib.bpf_table_max_entries_id(module, i),
            flags=lib.bpf_table_flags_id(module, i),
            key=(lib.bpf_table_key_desc_id(module, i) or b"").decode(),
            leaf=(lib.bpf_table_leaf_desc_id(module, i) or b"").decode()))
    functions = {}
    for i in range(lib.bpf_num_functions(module)):
        name = lib.bpf_function_name(module, i)
        code = bpf.dump_func(name)
        references = []
        for at in range(0, len(code) - 8, 8):
            if code[at] == BPF_LD_IMM64 and code[at + 1] >> 4 == \
                    BPF_PSEUDO_MAP_FD:
                fd = struct.unpack_from("<i", code, at + 4)[0]
                references.append([at + 4, by_fd[fd]])
        functions[name.decode()] = dict(code=code.hex(), maps=references)
    image = dict(version=IMAGE_VERSION, functions=functions, maps=maps,
                 license=lib.bpf_module_license(module).decode(),
                 kern_version=lib.bpf_module_kern_version(module))
    return image, bpf


class ImageCache:
    """Compiled images on disk, one file per (program text, kernel, BCC),
    the most recent few kept."""

    DIRECTORY = "/var/cache/s3slower"
    KEEP = 8

    def __init__(self, directory=DIRECTORY):
        self.directory = directory

    def path(self, bcc, text):
        uname = os.uname()
        key = hashlib.sha256("\0".join((
            text, str(IMAGE_VERSION), getattr(bcc, "__version__", "?"),
            uname.release, uname.version, uname.machine)).encode())
        return os.path.join(self.directory,
                            "bpf-%s.json" % key.hexdigest()[:32])

    def get(self, bcc, text):
        """The image, if one was kept and only root (or we) could have
        written it: it becomes kernel code."""
        try:
            with open(self.path(bcc, text)) as f:
                st = os.fstat(f.fileno())
                if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
                    return None
                image = json.load(f)
            return image if image.get("version") == IMAGE_VERSION else None
        except (OSError, ValueError, AttributeError):
            return None

    def put(self, bcc, text, image):
        path = self.path(bcc, text)
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
            with open(os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT |
                              os.O_TRUNC, 0o644), "w") as f:
                json.dump(image, f)
            os.replace(path + ".tmp", path)
            images = sorted(glob.glob(os.path.join(self.directory,
                                                   "bpf-*.json")),
                            key=os.path.getmtime, reverse=True)
            for old in images[self.KEEP:]:
                os.unlink(old)
        except OSError:
            pass


IMAGE_CACHE = ImageCache()


class MapTable:
    """One BPF map by its descriptor, with BCC's ctypes Key and Leaf."""

    def __init__(self, lib, fd, key_type, leaf_type):
        self.lib, self.fd, self.Key, self.Leaf = lib, fd, key_type, leaf_type

    def __getitem__(self, key):
        leaf = self.Leaf()
        if self.lib.bpf_lookup_elem(self.fd, ctypes.byref(key),
                                    ctypes.byref(leaf)) < 0:
            raise KeyError(key)
        return leaf

    def __setitem__(self, key, leaf):
        if self.lib.bpf_update_elem(self.fd, ctypes.byref(key),
                                    ctypes.byref(leaf), 0) < 0:
            raise OSError(ctypes.get_errno(), "BPF map update failed")

    def __delitem__(self, key):
        if self.lib.bpf_delete_elem(self.fd, ctypes.byref(key)) < 0:
            raise KeyError(key)

    def items(self):
        """(key, leaf) pairs of a hash map, as they are while it is read."""
        pairs = []
        key, following = None, self.Key()
        while self.lib.bpf_get_next_key(
                self.fd, ctypes.byref(key) if key is not None else None,
                ctypes.byref(following)) == 0:
            key, following = following, self.Key()
            try:
                pairs.append((key, self[key]))
            except KeyError:
                pass
        return pairs


class BpfObject:
    """The program as the kernel holds it, from an image: maps created
    (or BCC's, just compiled), functions loaded on first use with their map
    references filled in, probes attached, the ring buffer read."""

    def __init__(self, bcc, image, compiler=None, origin="compiled"):
        self.lib = lib = bcc.libbcc.lib
        lib.bcc_create_map.argtypes = [ctypes.c_int, ctypes.c_char_p] + \
            [ctypes.c_int] * 4
        lib.bcc_prog_load.argtypes = [
            ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
            ctypes.c_char_p, ctypes.c_uint, ctypes.c_int, ctypes.c_char_p,
            ctypes.c_uint]
        self.image = image
        self.compiler = compiler    # BCC's object owns its maps: keep it
        self.origin = origin        # how it came to be, for the start-up
        self.decode_type = bcc.BPF._decode_table_type
        self.ring_callback_type = bcc.libbcc._RINGBUF_CB_TYPE
        if compiler:
            self.map_fds = [lib.bpf_table_fd(compiler.module,
                                             definition["name"].encode())
                            for definition in image["maps"]]
        else:
            self.map_fds = [self.create_map(definition)
                            for definition in image["maps"]]
        self.map_index = {definition["name"]: i
                          for i, definition in enumerate(image["maps"])}
        self.functions = {}
        self.tables = {}
        self.links = []             # the perf events of attached probes
        self.ring = self.ring_callback = None

    def create_map(self, definition):
        fd = self.lib.bcc_create_map(
            definition["type"], definition["name"][:15].encode(),
            definition["key_size"], definition["leaf_size"],
            definition["max_entries"], definition["flags"])
        if fd < 0:
            raise Fatal("cannot create BPF map %s: %s" % (
                definition["name"], os.strerror(ctypes.get_errno())))
        return fd

    def load(self, name, kind=BPF_PROG_TYPE_KPROBE):
        """The descriptor of function name, verified and loaded once as a
        program of type kind."""
        fd = self.functions.get(name)
        if fd is not None:
            return fd
        function = self.image["functions"][name]
        code = bytearray.fromhex(function["code"])
        for at, index in function["maps"]:
            struct.pack_into("<i", code, at, self.map_fds[index])
        load = self.lib.bcc_prog_load
        args = [kind, name[:15].encode(), bytes(code), len(code),
                self.image["license"].encode(), self.image["kern_version"]]
        fd = load(*args, 0, None, 0)
        if fd < 0:
            # Again with the verifier's log, for its last words.
            error = os.strerror(ctypes.get_errno())
            log = ctypes.create_string_buffer(1 << 22)
            load(*args, 1, log, len(log))
            words = [line for line in log.value.decode(
                "utf-8", "replace").splitlines() if line.strip()]
            raise Fatal("the kernel rejected BPF function %s: %s" % (
                name, words[-1] if words else error))
        self.functions[name] = fd
        return fd

    def __getitem__(self, name):
        table = self.tables.get(name)
        if table is None:
            definition = self.image["maps"][self.map_index[name]]
            table = self.tables[name] = MapTable(
                self.lib, self.map_fds[self.map_index[name]],
                *(self.decode_type(json.loads(definition[part]))
                  if definition[part] else None
                  for part in ("key", "leaf")))
        return table

    def attach_uprobe(self, path, offset, function, is_return=False):
        """function at a file offset of path (not a virtual address)."""
        extra = [0] * (len(self.lib.bpf_attach_uprobe.argtypes) - 6)
        self.linked(self.lib.bpf_attach_uprobe(
            self.load(function), int(is_return), self.event_name(),
            path.encode(), offset, -1, *extra), function, path)

    def attach_kprobe(self, event, function, is_return=False):
        self.linked(self.lib.bpf_attach_kprobe(
            self.load(function), int(is_return), self.event_name(),
            event.encode(), 0, 0), function, event)

    def attach_tracepoints(self):
        """Every tp__CATEGORY__EVENT function to its tracepoint."""
        for function in self.image["functions"]:
            if function.startswith("tp__"):
                category, event = function[4:].split("__", 1)
                self.linked(self.lib.bpf_attach_tracepoint(
                    self.load(function, BPF_PROG_TYPE_TRACEPOINT),
                    category.encode(), event.encode()),
                    function, "%s:%s" % (category, event))

    def event_name(self):
        # Only used where the kernel has no perf PMU for probes (< 4.17).
        return b"s3slower_%d_%d" % (os.getpid(), len(self.links))

    def linked(self, fd, function, target):
        if fd < 0:
            raise OSError(ctypes.get_errno(), "cannot attach %s to %s" % (
                function, target))
        self.links.append(fd)

    def open_ring_buffer(self, name, callback):
        """callback(ctx, data, size) for each record; returns 0 to go on."""
        self.ring_callback = self.ring_callback_type(callback)
        self.ring = self.lib.bpf_new_ringbuf(
            self.map_fds[self.map_index[name]], self.ring_callback, None)
        if not self.ring:
            raise Fatal("cannot open the BPF ring buffer")

    def ring_buffer_poll(self, timeout_ms):
        self.lib.bpf_poll_ringbuf(self.ring, timeout_ms)

    def ring_buffer_consume(self):
        self.lib.bpf_consume_ringbuf(self.ring)


# ---------------------------------------------------------------------------
# Record decoding
# ---------------------------------------------------------------------------

# struct record up to resp_data[]: must match the C layout above.
_BEFORE_TYPE = "<QQQQQQQ IIIII HHH"
RECORD_HEAD = struct.Struct(_BEFORE_TYPE + " BBB3x 16s QQII")
RECORD_TYPE_AT = struct.calcsize(_BEFORE_TYPE)     # the type's byte
REQ_DATA_OFFSET = RECORD_HEAD.size + RESP_CAP
Record = namedtuple("Record", "req_start req_end resp_start resp_end "
                              "req_bytes resp_bytes handle tgid tid seq "
                              "req_head resp_head status req_cap resp_cap "
                              "type lib flags comm connect_start connect_end "
                              "retrans_start retrans_end resp_data req_data")


@functools.lru_cache(maxsize=1024)
def comm_text(comm):
    """A task's name from its NUL-padded bytes (few, and seen again)."""
    return comm.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode_record(raw):
    """Record from the bytes of one ring buffer record (or map value)."""
    fields = RECORD_HEAD.unpack_from(raw)
    return Record._make(
        fields[:18] + (comm_text(fields[18]),) + fields[19:] +
        (bytes(raw[RECORD_HEAD.size:RECORD_HEAD.size + fields[14]]),
         bytes(raw[REQ_DATA_OFFSET:REQ_DATA_OFFSET + fields[13]])))


# ---------------------------------------------------------------------------
# HTTP/S3 parsing (pure functions)
# ---------------------------------------------------------------------------

RequestHead = namedtuple("RequestHead", "method target headers")

# What naming a request and its answer may need from their heads: the rest
# of a head is never decoded.
WANTED_HEADERS = ("host", "x-amz-copy-source", "content-type",
                  "x-amz-request-id", "x-amz-error-code")
_REQUEST_LINE = re.compile(rb"(%s) ([^ \r\n]+) HTTP/[0-9.]+\r\n" %
                           "|".join(HTTP_METHODS).encode())
# A whole header line, the name in any case: the name, then the value.
_HEADER_LINE = {name: re.compile(rb"\n%s[ \t]*:[ \t]*([^\r\n]*)\r(?=\n)" %
                                 re.escape(name.encode()), re.IGNORECASE)
                for name in WANTED_HEADERS}


class HeadFields:
    """The WANTED_HEADERS of one head, each looked for when asked for (an
    output that prints no request id never pays for finding it). Whole
    lines only, so a head cut short gives what it has, and nothing past
    the head's end; of a repeated name, the last line wins."""

    __slots__ = ("data", "start", "end")

    def __init__(self, data, start):
        """The header lines start at data[start], just past a CRLF."""
        end = data.find(b"\r\n\r\n", start - 2)
        self.data = data
        self.start = start - 1          # a line starts past a LF
        self.end = end + 2 if end >= 0 else len(data)

    def get(self, name, default=None):
        values = _HEADER_LINE[name].findall(self.data, self.start, self.end)
        if not values:
            return default
        return values[-1].decode("latin-1").rstrip(" \t")

    def __contains__(self, name):
        return _HEADER_LINE[name].search(self.data, self.start,
                                         self.end) is not None


def parse_request_head(data):
    """RequestHead from bytes starting with a request line, else None."""
    line = _REQUEST_LINE.match(data)
    if line is None:
        return None
    return RequestHead(line.group(1).decode(), line.group(2).decode("latin-1"),
                       HeadFields(data, line.end()))


def response_headers(data):
    """HeadFields of bytes starting with a status line, else None."""
    if not data.startswith(b"HTTP/"):
        return None
    line_end = data.find(b"\r\n")
    return HeadFields(data, line_end + 2) if line_end > 0 else None


# Query parameters whose values are secrets (compared lowercased).
SECRET_PARAMS = frozenset((
    "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    "signature", "awsaccesskeyid", "x-amz-s3session-token", "sig",
    "x-goog-signature", "x-goog-credential", "access_token", "token"))


# A query that may name one of them: only such a query is taken apart.
_MAY_NAME_SECRET = re.compile("(?:^|&)(?:%s)=" % "|".join(
    re.escape(name) for name in SECRET_PARAMS))


def redact_target(target):
    """The request target with secret query values replaced by REDACTED."""
    path, sep, query = target.partition("?")
    if not sep or "%" not in query and \
            not _MAY_NAME_SECRET.search(query.lower()):
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
    if text.isprintable() and "\\" not in text:
        return text             # the common case, checked in C
    return _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()), text)


S3Target = namedtuple("S3Target", "endpoint bucket key query")

# BUCKET.s3.amazonaws.com, BUCKET.s3.REGION.amazonaws.com(.cn),
# BUCKET.s3-REGION..., s3-accelerate, dualstack, s3-website, s3express.
_AWS_VHOST = re.compile(
    r"^(?P<bucket>.+)\.(?P<endpoint>s3[a-z0-9-]*(?:\.[a-z0-9-]+)*"
    r"\.amazonaws\.com(?:\.cn)?)$")
# Endpoints whose subdomains are buckets, besides AWS's and --endpoint's.
VHOST_DOMAINS = ("localhost",)
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
    """{name: value} of a query string: names unquoted and lowercased, as
    S3 operations are named by them; values as sent."""
    params = {}
    for part in query.split("&"):
        name, _eq, value = part.partition("=")
        params[unquote(name).lower()] = value
    return params


@functools.lru_cache(maxsize=1024)
def host_style(host, endpoints):
    """(endpoint, bucket or None) of a Host header: BUCKET.ENDPOINT for an
    AWS S3 endpoint, localhost, an endpoint given with --endpoint, or one
    whose name starts with `s3.`/`s3-`. A host is worked out once."""
    host = host.strip().lower()
    name, port = split_host_port(host)
    bucket = None
    endpoint = name
    match = _AWS_VHOST.match(name)
    domain = next((d for d in endpoints + VHOST_DOMAINS
                   if name.endswith("." + d)), None)
    if match and not match.group("bucket").startswith("s3"):
        bucket, endpoint = match.group("bucket"), match.group("endpoint")
    elif domain:
        bucket, endpoint = name[:-len(domain) - 1], domain
    elif not _IP_HOST.match(name):
        label, dot, rest = name.partition(".")
        if dot and (rest.startswith("s3.") or rest.startswith("s3-")) and \
                label not in ("s3", "www"):
            bucket, endpoint = label, rest
    if port:
        endpoint = "%s:%s" % (endpoint, port)
    return endpoint or None, bucket


def s3_target(host, target, endpoints=()):
    """Endpoint, bucket, key and query of an S3 request: virtual-hosted
    style when host_style finds a bucket in the Host, path style otherwise.
    """
    endpoint, bucket = host_style(host or "", tuple(endpoints))
    path, _sep, query = target.partition("?")
    if path.startswith(("http://", "https://")):
        path = "/" + path.split("/", 3)[-1] if path.count("/") >= 3 else "/"
    path = path.lstrip("/")
    if bucket is None:
        # Split first: an encoded slash belongs to its segment.
        first, slash, rest = path.partition("/")
        bucket = unquote(first) or None
        key = unquote(rest) or None
    else:
        key = unquote(path) or None
    return S3Target(endpoint, bucket, key, parse_query(query) if query else {})


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


# ---------------------------------------------------------------------------
# Request assembly
# ---------------------------------------------------------------------------

# One completed (or abandoned) request: what every output prints.
Request = namedtuple("Request", """start_ns pid tid comm lib host endpoint method
    path bucket key op status req_bytes resp_bytes ttfb_ms latency_ms
    server_ms request_id error_code complete truncated transfer_ms
    connect_ms tls_handshake_ms new_conn retrans why""",
    defaults=(False,) + (None,) * 6)


def slow_part(connect, tls, server, transfer, retrans):
    """Which part of a request's time dominated: 'net' when its connection
    retransmitted, else the largest of the connect, the TLS handshake, the
    server's turnaround and the bytes' transfer. None when nothing is known."""
    if retrans:
        return "net"
    largest, part = -math.inf, None
    # In the names' order, so a tie goes to the last name, as max() would.
    if connect is not None:
        largest, part = connect, "conn"
    if server is not None and server >= largest:
        largest, part = server, "server"
    if tls is not None and tls >= largest:
        largest, part = tls, "tls"
    if transfer is not None and transfer >= largest:
        part = "xfer"
    return part


NS_PER_MS = 1e6


def build_request(raw, endpoints=(), ids=True):
    """The Request for the bytes of one kernel record (decoded here, not by
    decode_record: this runs once per request): its heads parsed, its times.
    Without ids, the response head is not read: request_id and error_code
    stay None (only JSON lines print them)."""
    (req_start, req_end, resp_start, resp_end, req_bytes, resp_bytes, _handle,
     tgid, tid, seq, req_head, resp_head, status, req_cap, resp_cap, _type,
     lib, flags, comm, connect_start, connect_end, retrans_start,
     retrans_end) = RECORD_HEAD.unpack_from(raw)
    req_data = raw[REQ_DATA_OFFSET:REQ_DATA_OFFSET + req_cap]
    complete = flags & RF_COMPLETE != 0
    req = parse_request_head(req_data)
    if req is not None:
        method, target, headers = req
        host = headers.get("host")
        endpoint, bucket, key, _query = parsed = s3_target(host, target,
                                                           endpoints)
        path, op = redact_target(target), s3_operation(method, parsed, headers)
    else:
        method = host = path = op = endpoint = bucket = key = None
    if not 100 <= status <= 999:
        status = None
    request_id = error_code = None
    ttfb = server = latency = transfer = None
    if resp_start:
        if ids:
            resp_data = raw[RECORD_HEAD.size:RECORD_HEAD.size + resp_cap]
            resp = response_headers(resp_data)
            if resp is not None:
                request_id = resp.get("x-amz-request-id")
                if status and status >= 300:
                    error_code = s3_error_code(resp_data[resp_head:]) or \
                        resp.get("x-amz-error-code")
        ttfb = (resp_start - req_start) / NS_PER_MS
        if resp_start >= req_end:
            server = (resp_start - req_end) / NS_PER_MS
        # An unfinished response has no end: its last byte is unknown.
        if complete:
            latency = (resp_end - req_start) / NS_PER_MS
            if server is not None:
                # the rest is moving bytes: request body, response body
                transfer = latency - server
    else:
        resp_bytes = None
    connect = tls = retrans = None
    if flags & RF_SOCKET:
        if connect_start and connect_end >= connect_start:
            connect = (connect_end - connect_start) / NS_PER_MS
            if lib != LIB_PLAIN and req_start >= connect_end:
                tls = (req_start - connect_end) / NS_PER_MS
        if retrans_end >= retrans_start:
            retrans = retrans_end - retrans_start
    # A first request opened its connection if we saw the connect; a later
    # one reused it; a first one on a connection older than us: unknown.
    new_conn = True if connect is not None else False if seq > 1 else None
    return Request(
        req_start, tgid, tid, comm_text(comm), LIB_NAMES.get(lib, "unknown"),
        host, endpoint, method, path, bucket, key, op, status, req_bytes,
        resp_bytes, ttfb, latency, server, request_id, error_code, complete,
        req_head > len(req_data), transfer, connect, tls, new_conn, retrans,
        slow_part(connect, tls, server, transfer, retrans))


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
        self.max = 0.0
        self.min = math.inf

    def add(self, value):
        self.count += 1
        if value > self.max:
            self.max = value
        if value < self.min:
            self.min = value
        if value > self.MIN_VALUE:
            index = math.ceil(math.log(value / self.MIN_VALUE) /
                              self.log_gamma)
            self.buckets[index if index > 1 else 1] += 1
        else:
            self.buckets[0] += 1

    def merge(self, other):
        for index, n in other.buckets.items():
            self.buckets[index] += n
        self.count += other.count
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


class RowStats:
    """One table row: latencies of complete requests (and their server and
    transfer parts), errors, incomplete ones, new connections."""

    __slots__ = ("latency", "server", "transfer", "count", "errors",
                 "incomplete", "new_conns")

    def __init__(self):
        self.latency = LatencyHistogram()
        self.server = LatencyHistogram()
        self.transfer = LatencyHistogram()
        self.count = self.errors = self.incomplete = self.new_conns = 0

    def add(self, request):
        self.count += 1
        if request.new_conn:
            self.new_conns += 1
        if request.latency_ms is not None:
            self.latency.add(request.latency_ms)
        if request.server_ms is not None:
            self.server.add(request.server_ms)
        if request.transfer_ms is not None:
            self.transfer.add(request.transfer_ms)
        if not request.complete:
            self.incomplete += 1
        elif request.status is None or request.status >= 400:
            self.errors += 1

    def merge(self, other):
        self.latency.merge(other.latency)
        self.server.merge(other.server)
        self.transfer.merge(other.transfer)
        self.count += other.count
        self.errors += other.errors
        self.incomplete += other.incomplete
        self.new_conns += other.new_conns


def _fmt_quantile(hist, q):
    value = hist.quantile(q)
    return "-" if value is None else "%.2f" % value


def render_table(rows, title, row_label):
    """Tables as text from {(group, row): RowStats}: one per group, groups
    and rows sorted by count."""
    groups = defaultdict(list)
    for (group, row), stats in rows.items():
        groups[group].append((row, stats))
    out = []
    for group in sorted(groups, key=lambda g: (-sum(r.count for _, r in
                                                    groups[g]), g)):
        rows = sorted(groups[group], key=lambda r: (-r[1].count, r[0]))
        out.append("=== %s %s ===" % (title, escape_text(group)))
        width = max([len(row_label)] + [len(escape_text(r)) for r, _ in rows])
        # The seed's columns first (scripts read them), then ours.
        line = "%-*s %7s %9s %9s %9s %9s %7s %8s %9s %9s %9s %9s %5s"
        out.append(line % (width, row_label, "Count", "p50(ms)", "p90(ms)",
                           "p99(ms)", "max(ms)", "Errors", "Incompl",
                           "srv_p50", "srv_p99", "xfer_p50", "xfer_p99",
                           "New%"))
        for row, r in rows:
            hist = r.latency
            out.append(line % (
                width, escape_text(row), r.count,
                _fmt_quantile(hist, 0.5), _fmt_quantile(hist, 0.9),
                _fmt_quantile(hist, 0.99),
                "%.2f" % hist.max if hist.count else "-", r.errors,
                r.incomplete, _fmt_quantile(r.server, 0.5),
                _fmt_quantile(r.server, 0.99),
                _fmt_quantile(r.transfer, 0.5),
                _fmt_quantile(r.transfer, 0.99),
                "%d" % round(100.0 * r.new_conns / r.count)))
        out.append("")
    return "\n".join(out)


class LabelCap:
    """Bounded label values: at most N hosts, and N host+bucket pairs; the
    rest become 'other', so a scan over millions of buckets stays small."""

    def __init__(self, limit):
        self.limit = limit
        self.hosts = set()
        self.pairs = set()
        # (host, bucket) as sent: their labels, once admitted. Bounded like
        # the pairs (a pair has a few spellings: None and "" are "none").
        self.known = {}

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
        labels = self.known.get((host, bucket))
        if labels is not None:
            return labels
        label = self.host(host)
        labels = (label, escape_text(bucket) if bucket else "none")
        if not self._admit(self.pairs, labels, self.limit):
            return label, "other"
        if len(self.known) < 4 * self.limit:
            self.known[(host, bucket)] = labels
        return labels


class Statistics:
    """The tables: per host × method, per endpoint × S3 operation and, when
    asked, per endpoint × bucket (buckets capped like metric labels). A
    request is counted once, in the row of all it is; the tables add those
    rows up when they are printed."""

    TABLES = {"method": ("Statistics for", "Method"),
              "op": ("S3 operations for", "Operation"),
              "bucket": ("Buckets for", "Bucket")}

    def __init__(self, by=None, max_buckets=100):
        self.kinds = (by,) if by else ("method", "op")
        self.rows = {}      # (host, method, endpoint, op, bucket): RowStats
        self.cap = LabelCap(max_buckets) if "bucket" in self.kinds else None

    def add(self, request):
        endpoint = request.endpoint or request.host or "-"
        bucket = self.cap.pair(endpoint, request.bucket) \
            if self.cap and request.bucket else None
        key = (request.host or "-", request.method or "-", endpoint,
               request.op, bucket)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = RowStats()
        row.add(request)

    def table(self, kind):
        """{(group, row): RowStats} of one kind of table."""
        rows = defaultdict(RowStats)
        for (host, method, endpoint, op, bucket), stats in self.rows.items():
            if kind == "method":
                rows[(host, method)].merge(stats)
            elif kind == "op" and op:
                rows[(endpoint, op)].merge(stats)
            elif kind == "bucket" and bucket:
                rows[bucket].merge(stats)
        return rows

    def render(self):
        parts = []
        for kind in self.kinds:
            rows = self.table(kind)
            if rows:
                parts.append(render_table(rows, *self.TABLES[kind]))
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
    """Kernel monotonic nanoseconds to wall-clock time, and the two ways
    it is printed (formatting a date is costly: once per second)."""

    def __init__(self):
        self.offset = time.time() - time.monotonic()
        # 2026-12-01T17:53:26.384254Z
        self.iso_utc = self._printer("%Y-%m-%dT%H:%M:%S", time.gmtime,
                                     "%s.%06dZ", 1e6)
        # 17:53:26.384 (local time, milliseconds)
        self.local_time = self._printer("%H:%M:%S", time.localtime,
                                        "%s.%03d", 1e3)

    def wall(self, ns):
        return ns / 1e9 + self.offset

    def _printer(self, date_format, convert, line_format, fraction):
        """ns -> text: the date part formatted once a second."""
        last = [None, None]

        def print_time(ns):
            wall = ns / 1e9 + self.offset
            second = int(wall)
            if second != last[0]:
                last[:] = second, time.strftime(date_format, convert(second))
            return line_format % (last[1], (wall - second) * fraction)
        return print_time


# OP fits the longest operation name (CompleteMultipartUpload).
TEXT_FORMAT = "%-12s %-7s %9s %9s %-6s %-15s %-24s %-7s %-23s %6s %10s %10s %s"
TEXT_HEADER = TEXT_FORMAT % (
    "TIME", "PID", "LAT(ms)", "TTFB(ms)", "WHY", "COMM", "HOST", "METHOD",
    "OP", "STATUS", "REQ_B", "RESP_B", "PATH")


def format_text(request, clock):
    status = "-" if request.status is None else request.status
    return TEXT_FORMAT % (
        clock.local_time(request.start_ns), request.pid,
        "-" if request.latency_ms is None else "%.2f" % request.latency_ms,
        "-" if request.ttfb_ms is None else "%.2f" % request.ttfb_ms,
        request.why or "-", escape_text(request.comm),
        escape_text(request.host) if request.host else "-",
        request.method or "-", request.op or "-",
        status if request.complete else "%s!" % status,
        "-" if request.req_bytes is None else request.req_bytes,
        "-" if request.resp_bytes is None else request.resp_bytes,
        escape_text(request.path) if request.path else "-")


JSON_FIELDS = (
    "ts", "pid", "tid", "comm", "lib", "host", "endpoint", "method", "path",
    "bucket", "key", "op", "status", "req_bytes", "resp_bytes", "ttfb_ms",
    "latency_ms", "server_ms", "transfer_ms", "connect_ms",
    "tls_handshake_ms", "new_conn", "retrans", "why", "request_id",
    "error_code", "complete", "truncated")
# One object per request, written by hand: json.dumps of a dict costs more
# than the rest of a request's handling.
JSON_FORMAT = "{%s}" % ",".join('"%s":%%s' % name for name in JSON_FIELDS)
JSON_LITERALS = {None: "null", True: "true", False: "false"}


def format_json(request, clock):
    """One line, what json.dumps writes but for the times: in ms with three
    decimals (the microsecond; json.dumps(round(t, 3)) costs twice as
    much). Strings are ASCII only, every control character escaped. The
    fields are unpacked in Request's order: a new field must be added
    here."""
    (start_ns, pid, tid, comm, lib, host, endpoint, method, path, bucket, key,
     op, status, req_bytes, resp_bytes, ttfb, latency, server, request_id,
     error_code, complete, truncated, transfer, connect, tls, new_conn,
     retrans, why) = request
    text = json.encoder.encode_basestring_ascii
    return JSON_FORMAT % (
        '"%s"' % clock.iso_utc(start_ns), pid, tid,
        "null" if comm is None else text(comm),
        "null" if lib is None else text(lib),
        "null" if host is None else text(host),
        "null" if endpoint is None else text(endpoint),
        "null" if method is None else text(method),
        "null" if path is None else text(path),
        "null" if bucket is None else text(bucket),
        "null" if key is None else text(key),
        "null" if op is None else text(op),
        "null" if status is None else status,
        "null" if req_bytes is None else req_bytes,
        "null" if resp_bytes is None else resp_bytes,
        "null" if ttfb is None else "%.3f" % ttfb,
        "null" if latency is None else "%.3f" % latency,
        "null" if server is None else "%.3f" % server,
        "null" if transfer is None else "%.3f" % transfer,
        "null" if connect is None else "%.3f" % connect,
        "null" if tls is None else "%.3f" % tls,
        JSON_LITERALS[new_conn], "null" if retrans is None else retrans,
        "null" if why is None else text(why),
        "null" if request_id is None else text(request_id),
        "null" if error_code is None else text(error_code),
        JSON_LITERALS[complete], JSON_LITERALS[truncated])


# Buckets in seconds: 1 ms to 2 min.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class MetricSeries:
    """One series' sums: body bytes both ways, and per histogram a count
    per bucket (+Inf last) followed by the sum of the times in ms."""

    __slots__ = ("req_bytes", "resp_bytes", "histograms")

    def __init__(self, histograms):
        self.req_bytes = self.resp_bytes = 0
        self.histograms = [[0] * (len(LATENCY_BUCKETS) + 2)
                           for _ in range(histograms)]

    def copy(self):
        """A copy a scrape can read while requests are added."""
        other = MetricSeries(0)
        other.req_bytes, other.resp_bytes = self.req_bytes, self.resp_bytes
        other.histograms = [list(h) for h in self.histograms]
        return other


class PrometheusOutput:
    """Metrics for one registry, served by prometheus_client. Requests are
    summed here, per series, and become metric families when the registry
    is scraped: prometheus_client's own metrics take a lock and search the
    buckets at every observation, which cost more than the rest of a
    request."""

    LABELS = ("host", "method", "op", "bucket")
    # (name, help, Request field in ms): one histogram each.
    HISTOGRAMS = (
        ("s3slower_request_duration_seconds",
         "Request latency: first byte written to last byte read.",
         "latency_ms"),
        ("s3slower_time_to_first_byte_seconds",
         "First byte of the request written to first byte of the response.",
         "ttfb_ms"),
        ("s3slower_server_seconds",
         "Last byte of the request written to first byte of the response: "
         "the server's share.", "server_ms"),
        ("s3slower_transfer_seconds",
         "Time moving the request and response bodies: latency less the "
         "server's share.", "transfer_ms"))

    def __init__(self, max_label_values, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge
        from prometheus_client import ProcessCollector, PlatformCollector
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        self.cap = LabelCap(max_label_values)
        self.requests = defaultdict(int)    # label values + (status,)
        self.series = {}                    # label values: MetricSeries
        self.times = operator.attrgetter(
            *(field for _, _, field in self.HISTOGRAMS))
        self.retransmits = defaultdict(int)     # by host
        self.lost = Counter(
            "s3slower_lost_events", "Kernel events lost (ring buffer full).",
            registry=registry)
        self.probes = Gauge(
            "s3slower_attached_probes", "Uprobes attached, per family.",
            ("lib",), registry=registry)
        registry.register(self)

    def add(self, request):
        host, bucket = self.cap.pair(request.endpoint or request.host,
                                     request.bucket)
        # An unfinished request has its own status: its time is unknown.
        status = "incomplete" if not request.complete else \
            str(request.status) if request.status else "none"
        values = (host, request.method or "none", request.op or "none",
                  bucket)
        self.requests[values + (status,)] += 1
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = MetricSeries(len(self.HISTOGRAMS))
        series.req_bytes += request.req_bytes or 0
        series.resp_bytes += request.resp_bytes or 0
        for histogram, value in zip(series.histograms, self.times(request)):
            if value is not None:
                histogram[bisect.bisect_left(LATENCY_BUCKETS,
                                             value / 1e3)] += 1
                histogram[-1] += value
        if request.retrans:
            self.retransmits[host] += request.retrans

    def collect(self):
        """The registry's scrape (in the server's thread): copies taken
        under the GIL, a count derived from its buckets."""
        from prometheus_client.core import (CounterMetricFamily,
                                            HistogramMetricFamily)
        from prometheus_client.utils import floatToGoString
        family = CounterMetricFamily("s3slower_requests", "Requests seen.",
                                     labels=self.LABELS + ("status",))
        for values, count in list(self.requests.items()):
            family.add_metric(values, count)
        yield family
        series = [(values, one.copy())
                  for values, one in list(self.series.items())]
        for name, text, field in (
                ("s3slower_request_bytes", "Request body bytes sent.",
                 "req_bytes"),
                ("s3slower_response_bytes", "Response body bytes received.",
                 "resp_bytes")):
            family = CounterMetricFamily(name, text, labels=self.LABELS)
            for values, one in series:
                if getattr(one, field):
                    family.add_metric(values, getattr(one, field))
            yield family
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for index, (name, text, _field) in enumerate(self.HISTOGRAMS):
            family = HistogramMetricFamily(name, text, labels=self.LABELS)
            for values, one in series:
                histogram = one.histograms[index]
                counts = list(itertools.accumulate(histogram[:-1]))
                if counts[-1]:
                    family.add_metric(values, list(zip(bounds, counts)),
                                      histogram[-1] / 1e3)
            yield family
        family = CounterMetricFamily(
            "s3slower_retransmits",
            "TCP segments retransmitted during requests.", labels=("host",))
        for host, count in list(self.retransmits.items()):
            family.add_metric((host,), count)
        yield family

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


def kernel_version():
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def have_kprobes():
    return any(os.path.exists(path) for path in (
        "/sys/bus/event_source/devices/kprobe",
        "/sys/kernel/tracing/kprobe_events",
        "/sys/kernel/debug/tracing/kprobe_events"))


def plain_method(args):
    """How plain HTTP is followed: "tcp" where the kernel has kprobes (on
    unless --no-plain: only TCP sends and receives pay), "syscalls" with
    --plain or --port where it has not (every read and write on the host
    pays), else None."""
    if args.plain is False:
        return None
    if have_kprobes():
        return "tcp"
    return "syscalls" if args.plain or args.port else None


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


def attach_probes(bpf, libraries, prefix="  ", cause=None):
    """Attach every probe of each library; returns {family: count}. With
    cause, (kernel ns, "exec" or "mmap") of the event that made us look,
    each line says how long after it the file's probes were in place."""

    def since_exec():
        if cause is None:
            return ""
        return ", %.1f ms after %s" % (
            (time.monotonic_ns() - cause[0]) / NS_PER_MS, cause[1])

    attached = defaultdict(int)
    skipped = []
    for lib in libraries:
        try:
            plan = probe_plan(lib)
        except (OSError, ValueError) as exc:
            plan = str(exc)
        if isinstance(plan, str):
            progress("%sskipped %s %s: %s" % (prefix, lib.family, lib.path,
                                              plan))
            continue
        names, returns = [], 0
        for handler, symbol, offset, is_return in plan:
            try:
                bpf.attach_uprobe(lib.path, offset, handler, is_return)
            except OSError:
                continue
            returns += handler == "go_read_return"
            if symbol not in names:
                names.append(symbol)
        if names:
            attached[lib.family] += len(names)
            if returns:
                names[names.index(GO_READ)] += " (+%d returns)" % returns
            progress("%s%s%s %s (%s%s)" % (
                prefix, lib.family, " built into" if lib.static and lib.family != "go"
                else "",
                lib.path, ", ".join(names), since_exec()))
        else:
            skipped.append(lib.path)
    if skipped:
        # One line however many: a busy host must not scroll.
        progress("%sskipped %d file(s) without TLS entry points: %s" % (
            prefix, len(skipped), ", ".join(skipped[:5]) +
            (", ..." if len(skipped) > 5 else "")))
    return attached


def compile_program(bcc, args):
    """The BPF object, every handler loaded: a verifier rejection is one
    clear error at start, not a probe that silently fails to attach later.
    Runs while discovery reads files (BCC compiles, and the kernel
    verifies, outside the GIL)."""
    text = bpf_program(args.pid, args.comm, ringbuf_pages=args.ringbuf_pages,
                       plain=plain_method(args), port=args.port)
    image, compiler = IMAGE_CACHE.get(bcc, text), None
    origin = "compiled image loaded from %s" % IMAGE_CACHE.path(bcc, text)
    if image is None:
        started = time.monotonic()
        image, compiler = compile_image(bcc, text)
        IMAGE_CACHE.put(bcc, text, image)
        origin = "compiled in %.1f s (kept for the next start)" % (
            time.monotonic() - started)
    bpf = BpfObject(bcc, image, compiler, origin)
    tables = bpf["dfa"]
    tables[ctypes.c_int(0)] = tables.Leaf.from_buffer_copy(b"".join(
        DFA[name] for name in ("byte_class", "next", "acc_mul", "acc_add",
                               "status_mul", "status_add", "flags",
                               "in_head", "value")))
    # The parser takes the verifier longest: it is loaded while the probes
    # are attached, and hooked in before tracing is announced.
    parsers = in_background(load_program, bpf, [
        (name, kind, table) for name, kind, table in (
            ("parse_uprobe", BPF_PROG_TYPE_KPROBE, "uprobe_parser"),
            ("parse_tracepoint", BPF_PROG_TYPE_TRACEPOINT,
             "tracepoint_parser"))
        if table == "uprobe_parser" or plain_method(args) == "syscalls"])
    load_program(bpf, [
        ("%s_%s" % (family, suffix), BPF_PROG_TYPE_KPROBE, None)
        for family in selected_families(args)
        for suffix in (GO_HANDLERS if family == "go" else PROBE_HANDLERS_ALL)])
    try:
        bpf.attach_tracepoints()
    except OSError as exc:
        raise Fatal("cannot attach to a tracepoint: %s" % exc.strerror)
    return bpf, parsers


def load_program(bpf, functions):
    """Loads (name, type, tail-call table) functions; a function with a
    table becomes what that table's tail call runs."""
    for name, kind, table in functions:
        fd = bpf.load(name, kind)
        if table:
            bpf[table][ctypes.c_int(0)] = ctypes.c_int(fd)


def in_background(work, *args):
    """Starts work(*args) in a thread; returns a function that waits for
    its result (or raises what it raised)."""
    outcome = {}

    def run():
        try:
            outcome["result"] = work(*args)
        except BaseException as exc:
            outcome["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result():
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]
    return result


class Tracer:
    """Owns the BPF object, the event loop and the outputs."""

    def __init__(self, args, out, known=None, looked_at=()):
        self.args = args
        self.looked_at = looked_at
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
        self.endpoints = tuple(args.endpoint or ())
        self.filtered = any((args.method, args.host_substr, args.op,
                             args.bucket, args.min_lat_ms))
        self.bpf = None
        self.error = None
        self.lines = []         # of the records read, written together
        self.plain = plain_method(args)
        self.second_looks = deque()     # (when, pid) after an exec
        self.examined = set()   # files mapped, looked into: process_files
        self.seen_pids = set(all_pids())
        self.hooked = False     # the kernel reports execs and mmaps
        self.lost_at_full_rescan = 0
        self.rescans = 0
        self.records = 0        # of requests and exits
        self.new_files = 0      # reported at their exec or mmap
        self.reported = 0
        self.incomplete = 0
        # Our own metrics endpoint, scraped over plain HTTP: not traffic.
        self.own_hosts = set()
        if args.prometheus_port:
            self.own_hosts = {"%s:%d" % (host, args.prometheus_port) for host in
                              (args.prometheus_addr, "127.0.0.1", "localhost",
                               "[::1]", "0.0.0.0")}

    def load(self, libraries, compiled, layout):
        self.bpf, parsers = compiled
        progress("  BPF program: %s" % self.bpf.origin)
        attached = attach_probes(self.bpf, libraries)
        parsers()
        if not attached:
            raise Fatal("no TLS library entry point could be attached")
        to_port = " to port %d" % self.args.port if self.args.port else ""
        if self.plain == "tcp":
            self.attach_tcp_probes(to_port)
        elif self.plain == "syscalls":
            progress("  plain HTTP: syscall tracepoints, TCP sockets created "
                     "from now on%s; every read/write syscall on the host "
                     "pays a map lookup (no kprobes here)" % to_port)
        else:
            progress("  plain HTTP: off (%s traces it)" % (
                "--plain" if not have_kprobes() else "without --no-plain,"
                " kprobes in the TCP layer"))
        self.attach_kernel_tls()
        for family, count in attached.items():
            self.attached[family] += count
        self.inflight = self.bpf["inflight"]
        self.conns = self.bpf["conns"]
        self.stats_map = self.bpf["stats"]
        self.arm_file_filter(layout)
        self.bpf.open_ring_buffer("records", self.on_record)
        return attached

    def attach_tcp_probes(self, to_port):
        """Plain HTTP in the TCP layer: kprobes on tcp_sendmsg and
        tcp_recvmsg (and tcp_sendpage before Linux 6.5). Returns first, so
        no call is seen starting without its end."""
        probed = []
        for function, enter, leave in (
                ("tcp_recvmsg", "tcp_recv_enter", "tcp_recv_return"),
                ("tcp_sendmsg", "tcp_send_enter", "tcp_send_return"),
                ("tcp_sendpage", "tcp_sendpage_enter", "tcp_send_return")):
            try:
                self.bpf.attach_kprobe(function, leave, is_return=True)
                self.bpf.attach_kprobe(function, enter)
                probed.append(function)
            except OSError:
                continue
        if "tcp_sendmsg" not in probed or "tcp_recvmsg" not in probed:
            raise Fatal("plain HTTP: cannot attach kprobes to tcp_sendmsg "
                        "and tcp_recvmsg; --no-plain leaves plain HTTP out")
        progress("  plain HTTP: kprobes on %s, every TCP connection%s; "
                 "other syscalls pay nothing" % (", ".join(probed), to_port))

    def attach_kernel_tls(self):
        """kprobes on the kernel's TLS send paths, where the kernel has
        kprobes. The tls module is loaded first if it is not (a program's
        first kTLS socket would load it, too late for the probes to see
        that program's first upload)."""
        if not have_kprobes():
            progress("  kernel TLS: bodies sent by sendfile/splice counted "
                     "(no kprobes here for write(2) or io_uring sends)")
            return
        if not os.path.exists("/sys/module/tls"):
            try:
                subprocess.run(["modprobe", "-q", "tls"], timeout=10,
                               capture_output=True)
            except (OSError, subprocess.SubprocessError):
                pass
        probed = []
        for function in ("tls_sw_sendmsg", "tls_sw_sendpage",
                         "tls_device_sendmsg", "tls_device_sendpage"):
            # The return first: no send is seen starting without its end.
            try:
                self.bpf.attach_kprobe(function, "ktls_send_return",
                                       is_return=True)
                self.bpf.attach_kprobe(function, "ktls_send_enter")
                probed.append(function)
            except OSError:
                continue
        progress("  kernel TLS: %s" % (
            "every send past the library counted (kprobes on %s)" %
            ", ".join(probed) if probed else
            "bodies sent by sendfile/splice counted (no tls module)"))

    def arm_file_filter(self, layout):
        """Where the kernel keeps what its probes read (from its BTF), and
        the files already looked at: their execs and mappings need not
        reach user space. Without BTF, programs started later are found by
        rescans only."""
        layout = layout or {}
        files = all(key in layout for key in FILE_OFFSETS)
        tcp = all((item[0], item[1]) in layout for item in TCP_OFFSETS) and \
            all(key in layout for key in TCP_ENUMS)
        if self.plain == "tcp" and not tcp:
            raise Fatal("plain HTTP in the TCP layer needs the kernel's BTF "
                        "(/sys/kernel/btf/vmlinux); --no-plain leaves it out")
        table = self.bpf["kernel_offsets"]
        table[ctypes.c_int(0)] = table.Leaf(
            files, *(layout.get(key, 0) for key in FILE_OFFSETS), tcp,
            *(layout.get((item[0], item[1]), 0) for item in TCP_OFFSETS),
            *(layout.get(key, 0) for key in TCP_ENUMS))
        if not files:
            progress("  programs started later: found by rescans only (no "
                     "kernel BTF at /sys/kernel/btf/vmlinux)")
            return
        self.hooked = True
        table = self.bpf["known_files"]
        one = table.Leaf(1)
        for dev, ino in self.looked_at:
            table[table.Key(ino, dev)] = one
        progress("  programs started later: found at their exec and when they "
                 "map a new file executable")

    def on_record(self, ctx, data, size):
        # ctypes would print and swallow an exception raised here: keep it
        # for run() to re-raise once the poll returns.
        try:
            raw = ctypes.string_at(data, size)
            if raw[RECORD_TYPE_AT] == REC_REQUEST:
                self.records += 1
                self.report(build_request(raw, self.endpoints,
                                          ids=self.json))
                return 0
            rec = decode_record(raw)
            if rec.type == REC_EXIT:
                self.records += 1
                self.sweep(rec.tgid)
            elif rec.type == REC_EXEC:
                self.new_files += 1
                path = rec.req_data.decode("utf-8", "surrogateescape")
                self.look_at(rec.tgid, (rec.req_start, "exec"),
                             [path] if path.startswith("/") else [])
            elif rec.type == REC_MAP:
                self.new_files += 1
                self.look_at(rec.tgid, (rec.req_start, "mmap"))
        except BaseException as exc:
            self.error = self.error or exc
            self.stop = True
            return -1    # stop consuming this batch
        return 0

    def sweep(self, tgid=None):
        """Report the requests a process (or, at exit, every process) left
        unanswered, and forget its connections."""
        for table, unanswered in ((self.inflight, True), (self.conns, False)):
            for key, value in list(table.items()):
                if tgid is not None and \
                        getattr(key, "conn", key).tgid != tgid:
                    continue
                if unanswered:
                    self.report(build_request(
                        ctypes.string_at(ctypes.addressof(value),
                                         ctypes.sizeof(value)),
                        self.endpoints))
                try:
                    del table[key]
                except KeyError:
                    pass

    def report(self, request):
        if not request.complete:
            self.incomplete += 1
        if self.filtered and not request_matches(request, self.args) or \
                (request.method is None and not self.args.include_unknown) \
                or self.own_hosts and \
                (request.host or "").lower() in self.own_hosts:
            return
        self.reported += 1
        self.stats.add(request)
        if self.interval_stats:
            self.interval_stats.add(request)
        if self.prometheus:
            self.prometheus.add(request)
        if self.args.no_requests:
            return
        self.lines.append(format_json(request, self.clock) if self.json
                          else format_text(request, self.clock))

    def write_lines(self):
        """The lines of the records read, in one write: a reader gets them
        whole, at most POLL_MS after their requests ended."""
        if self.lines:
            self.lines.append("")
            self.out.write("\n".join(self.lines))
            self.lines.clear()

    def disable(self):
        """Unhook the parser: probes that still fire record nothing."""
        for table in ("uprobe_parser", "tracepoint_parser"):
            try:
                del self.bpf[table][ctypes.c_int(0)]
            except Exception:
                pass

    def lost_events(self):
        return self.kernel_stat(STAT_LOST)

    def kernel_stat(self, index):
        return int(self.stats_map[ctypes.c_int(index)].value)

    def run(self):
        if not self.json and not self.args.no_requests:
            self.out.write(TEXT_HEADER + "\n")
            self.out.flush()
        interval = self.args.interval
        next_tables = time.monotonic() + interval if interval else None
        rescan = self.args.rescan_interval
        next_rescan = time.monotonic() + rescan if rescan else None
        # A pipe reader that went away (| head) ends us at once, not at the
        # next line we would write: no requests may come for a long time.
        reader_gone = select.poll()
        reader_gone.register(self.out.fileno(), select.POLLERR)
        while not self.stop:
            if reader_gone.poll(0):
                raise BrokenPipeError
            if next_rescan and time.monotonic() >= next_rescan:
                self.rescan()
                next_rescan = time.monotonic() + rescan
            while self.second_looks and \
                    self.second_looks[0][0] <= time.monotonic():
                _, pid = self.second_looks.popleft()
                self.attach_new(self.discover(pids=[pid]))
            self.bpf.ring_buffer_poll(POLL_MS)
            self.bpf.ring_buffer_consume()
            if self.error:
                raise self.error
            self.write_lines()
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
        """Attach to TLS library files that appeared since the last look:
        in processes started since then, and now and then in all of them
        (libraries loaded late). Where the kernel reports the mmap of a new
        file, that is a safety net: every FULL_RESCAN_HOOKED-th time, and
        after lost records (a lost report is not sent again). Reading every
        process's maps costs 120 µs a process: 240 ms on a host with
        2 000, 0.4 % of a core if done every minute."""
        self.rescans += 1
        pids = all_pids()
        lost = self.lost_events()
        full = self.rescans % (FULL_RESCAN_HOOKED if self.hooked
                               else FULL_RESCAN) == 0 or \
            lost != self.lost_at_full_rescan
        self.lost_at_full_rescan = lost
        look = pids if full else \
            [pid for pid in pids if pid not in self.seen_pids]
        self.seen_pids = set(pids)
        if self.args.pid:
            look = [self.args.pid]
        self.attach_new(self.discover(pids=look))
        SCAN_CACHE.save()

    def discover(self, pids, candidates=()):
        """Library files new to us in what these processes map (and in
        candidates): each file is looked into once."""
        if len(self.examined) > MAX_EXAMINED:
            self.examined.clear()       # look into them all again, once
        new, _ = discover_libraries(selected_families(self.args), [], None,
                                    self.known, candidates,
                                    loader_cache=False, pids=pids,
                                    examined=self.examined)
        return new

    def look_at(self, pid, cause, candidates=()):
        """A process ran or mapped a file user space has not looked at:
        look at what it maps now, and once more a little later (a mapping
        being made is not in its maps yet, nor what the loader maps next).
        candidates: its exec path, for a process gone already."""
        if os.path.exists("/proc/%d" % pid):
            candidates = []     # its own view: /proc/PID/exe, its root
        self.attach_new(self.discover([pid], candidates), cause)
        self.second_looks.append((time.monotonic() + SECOND_LOOK, pid))

    def attach_new(self, new, cause=None):
        if not new:
            return
        attached = attach_probes(self.bpf, new, prefix="s3slower: new: ",
                                 cause=cause)
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
        SCAN_CACHE.save()
        if print_stats:
            self.bpf.ring_buffer_consume()
            self.sweep()
            self.write_lines()
        try:
            self.out.flush()
        except BrokenPipeError:
            print_stats = False
        if print_stats and not self.args.no_stats:
            self.print_tables(self.stats, "since start" if self.args.interval
                              else None)
        log("%d requests reported from %d kernel records (and %d new files "
            "seen at exec or mmap); %d lost events, %d incomplete requests"
            % (self.reported, self.records, self.new_files,
               self.lost_reported, self.incomplete))
        if self.lost_reported:
            log("requests whose events were lost were reported incomplete "
                "or not at all")
        evicted, unparsed = (self.kernel_stat(STAT_EVICTED),
                             self.kernel_stat(STAT_UNPARSED))
        if evicted or unparsed:
            log("%d requests dropped from the kernel's full in-flight table; "
                "%d connections given up as not HTTP/1.x mid-stream" % (
                    evicted, unparsed))


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
        compiled = in_background(compile_program, bcc, args)
        progress("Attaching to TLS libraries...")
        known = set()
        started = time.monotonic()
        deadline = started + SCAN_SECONDS
        cut = []
        looked_at = set()

        def programs():
            """Files users may run later, for as long as the scan may take."""
            for path in candidate_files():
                if time.monotonic() > deadline:
                    cut.append(path)
                    return
                yield path

        libraries, scanned = discover_libraries(
            selected_families(args), forced_libraries(args), args.pid, known,
            () if args.pid else programs(), looked_at=looked_at)
        layout = btf_layout()
        SCAN_CACHE.save()
        progress("  looked inside %d files (running, on PATH, under %s) for "
                 "built-in OpenSSL and Go crypto/tls in %.2f s%s" % (
                     scanned, ", ".join(INSTALL_DIRS),
                     time.monotonic() - started,
                     "; stopped after %d s, the rest is looked at when it "
                     "runs" % SCAN_SECONDS if cut else ""))
        if not libraries:
            raise Fatal("no TLS library found (looked for %s); give one with "
                        "--libssl/--libgnutls/--libnss" %
                        ", ".join(selected_families(args)))
        tracer = Tracer(args, out, known, looked_at)
        if args.prometheus_port:
            tracer.prometheus = PrometheusOutput(args.max_label_values)
            try:
                tracer.prometheus.serve(args.prometheus_port,
                                        args.prometheus_addr)
            except OSError as exc:
                raise Fatal("cannot serve metrics on %s:%d: %s" % (
                    args.prometheus_addr, args.prometheus_port,
                    exc.strerror or exc))
        attached = tracer.load(libraries, compiled(), layout)
        SCAN_CACHE.save()
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
    leave_probes_behind(tracer.disable)
    return 0


def leave_probes_behind(first=None):
    """Let a child own the probes' teardown, so this process ends now.

    Releasing a uprobe waits for an RCU grace period or two in the kernel,
    about 100 ms each here: tens of probes took seconds, whether BCC detached
    them one by one or the kernel closed them at exit. A forked child holds
    the same descriptors; once this process is gone it exits, and the last
    references (and the waiting) are its. The child first runs first()
    (Tracer.disable: the probes stop parsing, which takes the kernel tens
    of milliseconds this process need not wait for)."""
    sys.stderr.flush()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    parent_gone, parent_alive = os.pipe()
    if os.fork() == 0:
        os.close(parent_alive)
        os.setsid()
        # What ps shows while the kernel releases the probes: a new tracer
        # started meanwhile attaches more slowly (the same kernel lock).
        try:
            ctypes.CDLL(None).prctl(15, b"s3slower-exit")   # PR_SET_NAME
        except (OSError, AttributeError):
            pass
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):         # a pipe reader must not wait for us
            os.dup2(null, fd)
        # Nor a tracer started next for the metrics port.
        for name in os.listdir("/proc/self/fd"):
            try:
                if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                    os.close(int(name))
            except OSError:
                pass
        if first:
            try:
                first()
            except Exception:
                pass
        os.read(parent_gone, 1)      # returns when the parent has exited
        os._exit(0)
    os.close(parent_gone)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    status = main()
    sys.stderr.flush()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    # No interpreter teardown: BCC would detach every probe one by one.
    os._exit(status)
