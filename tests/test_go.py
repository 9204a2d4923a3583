"""Go crypto/tls: a net/http client built here with the distribution's Go."""

import os
import shutil
import subprocess
import tempfile

import pytest

import s3slower as s
from conftest import (TESTS, Tracer, require_bpf, require_tool, run_client,
                      stop_process)

SOURCE = os.path.join(TESTS, "clients", "goclient", "main.go")


@pytest.fixture(scope="module")
def go_clients():
    go = require_tool("go")
    out = tempfile.mkdtemp(prefix="s3slower-go")
    env = dict(os.environ, GOCACHE=os.path.join(out, "cache"),
               GOPATH=os.path.join(out, "gopath"), GO111MODULE="off",
               CGO_ENABLED="0", GOFLAGS="")
    paths = {"plain": os.path.join(out, "goclient"),
             "stripped": os.path.join(out, "goclient-stripped")}
    subprocess.run([go, "build", "-o", paths["plain"], SOURCE], env=env,
                   check=True, capture_output=True)
    subprocess.run([go, "build", "-ldflags=-s -w", "-o", paths["stripped"],
                    SOURCE], env=env, check=True, capture_output=True)
    yield paths
    shutil.rmtree(out, ignore_errors=True)


def plan(bucket):
    return ["PUT", "/%s/obj" % bucket, "GET", "/%s/obj" % bucket, "GET",
            "/%s/missing" % bucket]


def check(records, bucket):
    assert [(r["lib"], r["method"], r["path"], r["status"]) for r in records] \
        == [("go", "PUT", "/%s/obj" % bucket, 200),
            ("go", "GET", "/%s/obj" % bucket, 200),
            ("go", "GET", "/%s/missing" % bucket, 404)]
    assert records[0]["req_bytes"] == 8 and records[1]["resp_bytes"] == 8
    assert records[2]["error_code"] == "NoSuchBucket" or \
        records[2]["error_code"] == "NoSuchKey"
    assert all(r["complete"] and 0 < r["ttfb_ms"] <= r["latency_ms"]
               for r in records)


def test_go_build_info_and_returns(go_clients):
    assert s.go_version(go_clients["plain"]) >= (1, 18)
    symbols = s.elf_symbols(go_clients["plain"], s.GO_SYMBOLS)
    assert set(symbols) == set(s.GO_SYMBOLS)
    entry, returns = s.go_probe_offsets(go_clients["plain"],
                                        *symbols[s.GO_READ])
    assert returns and all(0 < off < symbols[s.GO_READ][1] for off in returns)
    # past the stack check: a goroutine whose stack grows runs the first
    # instructions twice (before and after morestack), this one once
    for name in (s.GO_READ, s.GO_WRITE):
        address, size = symbols[name]
        entry, _ = s.go_probe_offsets(go_clients["plain"], address, size)
        code = s.elf_bytes(go_clients["plain"], address, entry)
        assert 0 < entry < 24 and (code[-2] == 0x76 or
                                   code[-6:-4] == b"\x0f\x86"), \
            (name, entry, code.hex())
    assert s.elf_symbols(go_clients["stripped"], s.GO_SYMBOLS) == {}


def test_go_client_found_by_auto_mode(s3_server, go_clients):
    require_bpf()
    run_client(["curl", "-skf", "-X", "PUT", s3_server.url + "/gobkt"])
    client = subprocess.Popen([go_clients["plain"], s3_server.url] +
                              plan("gobkt"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, GOCLIENT_WAIT="1"))
    t = Tracer("--go", "--rescan-interval", "0")
    try:
        assert "go %s (crypto/tls.(*Conn).Read (+" % go_clients["plain"] in \
            t.stderr(), t.stderr()
        out, err = client.communicate("go\n", timeout=60)
        assert client.returncode == 0, err
        assert out.split("\n")[:2] == ["200 0", "200 8"]
        check(t.wait_records(3, pid=client.pid), "gobkt")
    finally:
        stop_process(client)
        t.stop()


def test_go_binary_forced_and_stripped_reported(s3_server, go_clients):
    require_bpf()
    run_client(["curl", "-skf", "-X", "PUT", s3_server.url + "/gobkt2"])
    t = Tracer("--go-binary", go_clients["plain"], "--go-binary",
               go_clients["stripped"], "--rescan-interval", "0", "--comm",
               "goclient")
    try:
        assert "skipped go %s: no crypto/tls symbols (stripped?)" % \
            go_clients["stripped"] in t.stderr()
        pid, _ = run_client([go_clients["plain"], s3_server.url] +
                            plan("gobkt2"))
        check(t.wait_records(3, pid=pid), "gobkt2")
    finally:
        t.stop()
