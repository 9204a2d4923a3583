"""TLS libraries wherever they are: NSS/NSPR, OpenSSL linked into an
executable, a bundled libssl copy, late starters, another mount namespace."""

import os
import shutil
import subprocess
import tempfile
import time

import pytest

import s3slower as s
from conftest import (TESTS, Tracer, require_bpf, require_tool, run_client,
                      stop_process, wait_until)

SOURCE = os.path.join(TESTS, "clients", "tlsclient.c")
SYSTEM_LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


@pytest.fixture(scope="module")
def clients():
    """The test client built three ways, in a private directory."""
    cc = require_tool("cc")
    pkg_config = require_tool("pkg-config")
    out = tempfile.mkdtemp(prefix="s3slower-clients")
    nss_flags = subprocess.run([pkg_config, "--cflags", "--libs", "nss"],
                               capture_output=True, text=True,
                               check=True).stdout.split()
    builds = {
        "static": ["-Wl,-Bstatic", "-lssl", "-lcrypto", "-Wl,-Bdynamic"],
        "dynamic": ["-lssl", "-lcrypto"],
        "nss": ["-DUSE_NSS"] + nss_flags,
    }
    paths = {}
    for name, flags in builds.items():
        paths[name] = os.path.join(out, "tls-" + name)
        args = [cc, "-O1", SOURCE, "-o", paths[name]]
        if name == "nss":
            args = [cc, "-O1", "-DUSE_NSS", SOURCE, "-o", paths[name]] + \
                nss_flags
        else:
            args += flags
        subprocess.run(args, check=True, capture_output=True)
    yield paths
    shutil.rmtree(out, ignore_errors=True)


def seed_bucket(s3_server, bucket):
    run_client(["curl", "-skf", "-X", "PUT", "%s/%s" % (s3_server.url,
                                                          bucket)])


def start_waiting(args, **kw):
    """A client that connects only when told: the tracer starts between."""
    env = dict(os.environ, TLSCLIENT_WAIT="1", **kw.pop("env", {}))
    return subprocess.Popen(args, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)


def release(proc):
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, (proc.returncode, err)
    return out


def put_get(bucket):
    return ["PUT", "/%s/obj" % bucket, "GET", "/%s/obj" % bucket]


def assert_put_get(records, bucket, lib):
    assert [(r["method"], r["path"], r["status"], r["lib"]) for r in records] \
        == [("PUT", "/%s/obj" % bucket, 200, lib),
            ("GET", "/%s/obj" % bucket, 200, lib)]
    assert all(r["complete"] and r["latency_ms"] > 0 for r in records)


def test_elf_scan_finds_built_in_openssl(clients):
    assert s.elf_functions(clients["static"], ["SSL_write", "SSL_read"]) == \
        {"SSL_write", "SSL_read"}
    assert s.elf_functions(clients["dynamic"], ["SSL_write"]) == set()
    assert s.elf_functions(SYSTEM_LIBSSL, ["SSL_write"]) == {"SSL_write"}
    assert s.elf_functions("/etc/passwd", ["SSL_write"]) == set()


def test_nss_client_and_no_phantom_from_nspr_file_io(tracer, s3_server,
                                                     clients):
    seed_bucket(s3_server, "nssbkt")
    pid, out = run_client([clients["nss"], str(s3_server.port)] +
                          put_get("nssbkt"))
    assert out.split("\n")[:2] == ["200 0", "200 9"]
    assert_put_get(tracer.wait_records(2, pid=pid), "nssbkt", "nss")
    assert records_with_path(tracer, "/phantom-from-a-file") == []


def records_with_path(tracer, path):
    return [r for r in tracer.records() if r["path"] == path]


def test_static_openssl_found_by_auto_mode(s3_server, clients):
    require_bpf()
    seed_bucket(s3_server, "statbkt")
    client = start_waiting([clients["static"], str(s3_server.port)] +
                           put_get("statbkt"))
    t = Tracer("--openssl", "--rescan-interval", "0")
    try:
        line = [l for l in t.stderr().splitlines()
                if "openssl built into %s (" % clients["static"] in l]
        assert line and "SSL_write" in line[0] and "SSL_read" in line[0], \
            t.stderr()
        release(client)
        assert_put_get(t.wait_records(2, pid=client.pid), "statbkt",
                       "openssl")
    finally:
        stop_process(client)
        t.stop()


def test_static_openssl_forced_with_libssl(s3_server, clients):
    require_bpf()
    seed_bucket(s3_server, "forcebkt")
    t = Tracer("--libssl", clients["static"], "--rescan-interval", "0",
               "--comm", "tls-static")
    try:
        pid, _ = run_client([clients["static"], str(s3_server.port)] +
                            put_get("forcebkt"))
        assert_put_get(t.wait_records(2, pid=pid), "forcebkt", "openssl")
    finally:
        t.stop()


def test_bundled_copy_started_later_found_by_rescan(s3_server, clients):
    require_bpf()
    seed_bucket(s3_server, "bundlebkt")
    bundle = tempfile.mkdtemp(prefix="s3slower-app")
    os.makedirs(os.path.join(bundle, "lib"))
    copy = os.path.join(bundle, "lib", "libssl.so.3")
    shutil.copy(SYSTEM_LIBSSL, copy)
    t = Tracer("--rescan-interval", "0.5", "--comm", "tls-dynamic")
    client = None
    try:
        assert copy not in t.stderr()
        client = start_waiting([clients["dynamic"], str(s3_server.port)] +
                               put_get("bundlebkt"),
                               env={"LD_LIBRARY_PATH": bundle + "/lib"})
        assert wait_until(lambda: "new: openssl %s" % copy in t.stderr(), 15), \
            t.stderr()
        release(client)
        assert_put_get(t.wait_records(2, pid=client.pid), "bundlebkt",
                       "openssl")
    finally:
        if client:
            stop_process(client)
        t.stop()
        shutil.rmtree(bundle, ignore_errors=True)


def test_libssl_only_under_a_private_mount_namespace(s3_server, clients):
    require_bpf()
    unshare = require_tool("unshare")
    seed_bucket(s3_server, "nsbkt")
    private = tempfile.mkdtemp(prefix="s3slower-root")
    copy = os.path.join(private, "libssl.so.3")
    shutil.copy(SYSTEM_LIBSSL, copy)
    # Inside its own mount namespace the process sees the copy at the
    # standard path; on the host that path is still the system's file.
    client = start_waiting(
        [unshare, "-m", "--propagation", "private", "sh", "-c",
         'mount --bind "$0" %s && exec "$@"' % SYSTEM_LIBSSL, copy,
         clients["dynamic"], str(s3_server.port)] + put_get("nsbkt"))
    t = None
    try:
        maps = "/proc/%d/maps" % client.pid
        wait_until(lambda: "libssl" in open(maps).read(), 10)
        if "libssl" not in open(maps).read():
            pytest.fail("client in a private mount namespace did not start: "
                        + client.stderr.read())
        t = Tracer("--rescan-interval", "0", "--comm", "tls-dynamic")
        root_copy = "/proc/%d/root%s" % (client.pid, SYSTEM_LIBSSL)
        assert "openssl %s (" % root_copy in t.stderr(), t.stderr()
        release(client)
        assert_put_get(t.wait_records(2, pid=client.pid), "nsbkt", "openssl")
    finally:
        stop_process(client)
        if t:
            t.stop()
        shutil.rmtree(private, ignore_errors=True)


def test_probes_go_to_the_file_offsets_bcc_would_use(clients):
    """Uprobes are placed by file offset; symbols give virtual addresses.
    They differ in a non-PIE executable (Debian's rclone, the static client
    built -no-pie): for seeded random functions of several files, the plan's
    offset must be BCC's own translation."""
    require_bpf()
    import random
    from bcc import BPF
    seed = int(os.environ.get("S3SLOWER_OFFSET_SEED") or
               random.randrange(1 << 30))
    rng = random.Random(seed)
    nopie = os.path.join(os.path.dirname(clients["static"]), "tls-nopie")
    subprocess.run(["cc", "-O1", "-no-pie", SOURCE, "-o", nopie, "-lssl",
                    "-lcrypto"], check=True, capture_output=True)
    files = [SYSTEM_LIBSSL, clients["static"], nopie]
    if shutil.which("rclone"):
        files.append(os.path.realpath(shutil.which("rclone")))
    for path in files:
        listed = subprocess.run(["nm", "--defined-only", path],
                                capture_output=True, text=True).stdout
        if not listed.strip():
            listed = subprocess.run(["nm", "-D", "--defined-only", path],
                                    capture_output=True, text=True).stdout
        names = sorted({line.split()[2].split("@")[0]
                        for line in listed.splitlines()
                        if len(line.split()) == 3 and
                        line.split()[1] in "Tt"})
        assert names, path
        picked = rng.sample(names, min(25, len(names)))
        symbols = s.elf_symbols(path, picked)
        plan = [["h", name, symbols[name][0], False] for name in picked
                if name in symbols and symbols[name][0]]
        assert plan, (path, picked)
        for (_, name, offset, _), (_, _, address, _) in zip(
                s.in_file(path, plan), plan):
            _, expected = BPF._check_path_symbol(path.encode(), b"", address,
                                                 -1, 0)
            assert offset == expected, (path, name, hex(address), seed)


def test_mapped_files_looked_into_once():
    """A process looked at again (at each of its mmaps, at rescans): only
    the files it mapped since are looked into. Each look used to stat all
    of its files again: 7 000 stat calls for one new curl."""
    import ctypes
    examined, known = set(), set()
    s.discover_libraries(["openssl"], [], pids=[os.getpid()], known=known,
                         loader_cache=False, examined=examined)
    assert examined and list(s.process_files([os.getpid()], examined)) == []
    copy_dir = tempfile.mkdtemp(prefix="s3slower-examined")
    try:
        copy = os.path.join(copy_dir, "libssl.so.3")
        shutil.copy(SYSTEM_LIBSSL, copy)
        ctypes.CDLL(copy)
        assert [path for path, _ in
                s.process_files([os.getpid()], examined)] == [copy]
        found, _ = s.discover_libraries(
            ["openssl"], [], pids=[os.getpid()], known=known,
            loader_cache=False, examined=examined)
        assert [(lib.family, lib.path) for lib in found] == \
            [("openssl", copy)]
        assert list(s.process_files([os.getpid()], examined)) == []
    finally:
        shutil.rmtree(copy_dir, ignore_errors=True)


def test_rescans_look_at_everyone_seldom_or_after_losses(monkeypatch):
    """Rescans look at the processes started since the last one. They look
    at all of them every FULL_RESCAN-th time, or every FULL_RESCAN_HOOKED-th
    time where the kernel reports execs and mmaps, and at once after lost
    records (a lost report of a new file is not sent again)."""
    t = s.Tracer(s.parse_args([]), open(os.devnull, "w"))
    pids = [1, 2, 3]
    lost = [0]
    looked = []
    monkeypatch.setattr(s, "all_pids", lambda: list(pids))
    monkeypatch.setattr(t, "lost_events", lambda: lost[0])
    monkeypatch.setattr(t, "discover", lambda pids: looked.append(pids))
    monkeypatch.setattr(t, "attach_new", lambda new: None)
    monkeypatch.setattr(s.SCAN_CACHE, "save", lambda: None)
    t.seen_pids = set(pids)

    def rescans(n):
        looked.clear()
        for _ in range(n):
            t.rescan()
        return [len(p) for p in looked]
    t.hooked = False
    assert rescans(s.FULL_RESCAN) == [0] * (s.FULL_RESCAN - 1) + [3]
    t.hooked, t.rescans = True, 0
    pids.append(4)                      # started since: looked at once
    assert rescans(s.FULL_RESCAN_HOOKED) == \
        [1] + [0] * (s.FULL_RESCAN_HOOKED - 2) + [4]
    lost[0] = 5
    assert rescans(2) == [4, 0]
