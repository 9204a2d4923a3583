"""Plain HTTP (no TLS): from syscall tracepoints here, from kprobes in the
TCP layer where the kernel has them (the VM stage); sendfile uploads."""

import os
import subprocess
import tempfile

import pytest

import s3slower as s

from conftest import (PYTHON, S3Server, Tracer, python_client, require_bpf,
                      run_client)


@pytest.fixture(scope="module")
def plain_server():
    server = S3Server(plain=True)
    yield server
    server.stop()


SENDFILE_CLIENT = r"""
import os, socket, sys
port, path, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with open("/tmp/s3slower-sendfile", "wb") as f:
    f.write(b"s" * size)
sock = socket.create_connection(("127.0.0.1", port))
sock.sendall(b"PUT %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: %d\r\n"
             b"\r\n" % (path.encode(), port, size))      # head with write()
with open("/tmp/s3slower-sendfile", "rb") as f:
    sent = 0
    while sent < size:                                # body with sendfile()
        sent += os.sendfile(sock.fileno(), f.fileno(), sent, size - sent)
os.unlink("/tmp/s3slower-sendfile")
reply = b""
while b"\r\n\r\n" not in reply:
    reply += sock.recv(65536)
print(reply.split(b" ")[1].decode())
"""


def test_plain_http_curl_and_python(tracer, plain_server):
    base = "http://127.0.0.1:%d/plainbkt" % plain_server.port
    pid, _ = run_client(["curl", "-sf", "-X", "PUT", base, "--next", "-sf",
                         "-X", "PUT", "--data-binary", "plain body",
                         base + "/k", "--next", "-sf", "-o", "/dev/null",
                         base + "/k", "--next", "-sfI", base + "/k"])
    records = tracer.wait_records(4, pid=pid)
    assert [(r["lib"], r["op"], r["status"]) for r in records] == [
        ("plain", "CreateBucket", 200), ("plain", "PutObject", 200),
        ("plain", "GetObject", 200), ("plain", "HeadObject", 200)]
    assert records[1]["req_bytes"] == 10 and records[2]["resp_bytes"] == 10
    assert all(r["complete"] and r["latency_ms"] > 0 for r in records)
    # Python's http.client reads with recv_into on a buffered socket file.
    pid, _ = python_client(
        "import http.client,sys\n"
        "c=http.client.HTTPConnection('127.0.0.1',int(sys.argv[1]))\n"
        "for i in range(3):\n"
        "    c.request('GET','/plainbkt/delay-50/k'); c.getresponse().read()\n",
        plain_server.port)
    records = tracer.wait_records(3, pid=pid)
    assert [(r["lib"], r["status"], r["error_code"]) for r in records] == \
        [("plain", 404, "NoSuchKey")] * 3
    assert all(r["latency_ms"] >= 50 for r in records)


def test_sendfile_body_counted(tracer, plain_server):
    run_client(["curl", "-sf", "-X", "PUT",
                "http://127.0.0.1:%d/sfbkt" % plain_server.port])
    size = 3 * 1024 * 1024
    pid, out = python_client(SENDFILE_CLIENT, plain_server.port,
                             "/sfbkt/obj", size)
    assert out.strip() == "200"
    (r,) = tracer.wait_records(1, pid=pid)
    assert (r["op"], r["req_bytes"], r["status"], r["complete"]) == \
        ("PutObject", size, 200, True)
    assert 0 <= r["server_ms"] <= r["ttfb_ms"] <= r["latency_ms"]


def test_plain_off_by_default_plain_and_port_filter(plain_server, s3_server):
    require_bpf()
    url = "http://127.0.0.1:%d/filtbkt" % plain_server.port
    # On by default only where the kernel has kprobes (the TCP layer).
    default = 1 if s.have_kprobes() else 0
    for args, expect in (([], default), (["--no-plain"], 0), (["--plain"], 1),
                         (["--port", str(plain_server.port + 1)], 0),
                         (["--port", str(plain_server.port)], 1)):
        t = Tracer("--comm", "curl", *args)
        try:
            pid, _ = run_client(["curl", "-s", "-X", "PUT", url])
            tls, _ = run_client(["curl", "-sk", "-o", "/dev/null",
                                 s3_server.url + "/filtbkt"])
            assert len(t.wait_records(1, pid=tls)) == 1   # TLS unaffected
            assert len(t.records(pid=pid)) == expect, args
        finally:
            t.stop()


def kernel_tls_missing():
    """Why kernel TLS cannot be used here, or None."""
    try:
        subprocess.run(["modprobe", "-q", "tls"], capture_output=True)
    except OSError:
        pass        # no modprobe: modules cannot be loaded anyway
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            ulps = f.read().split()
    except OSError as exc:
        return "no /proc/sys/net/ipv4/tcp_available_ulp (%s)" % exc
    if "tls" not in ulps:
        return ("the kernel offers no TLS upper-layer protocol "
                "(tcp_available_ulp: %s): no kernel TLS on this machine"
                % (" ".join(ulps) or "empty"))
    return None


def test_ktls_sendfile_upload_reported_once(tracer, s3_server):
    """Head through SSL_write, body through SSL_sendfile on a kernel-TLS
    socket: one report, on the TLS connection, with the body counted."""
    reason = kernel_tls_missing()
    if reason:
        pytest.skip(reason)
    client = os.path.join(tempfile.mkdtemp(prefix="s3slower-ktls"), "tls-ktls")
    subprocess.run(["cc", "-O1", os.path.join(os.path.dirname(__file__),
                                              "clients", "tlsclient.c"),
                    "-o", client, "-lssl", "-lcrypto"], check=True)
    run_client(["curl", "-skf", "-X", "PUT", s3_server.url + "/ktlsbkt"])
    pid, out = run_client([client, str(s3_server.port), "PUT",
                           "/ktlsbkt/obj", "GET", "/ktlsbkt/obj"],
                          env=dict(os.environ, TLSCLIENT_KTLS="1"))
    records = tracer.wait_records(2, pid=pid)
    assert [(r["lib"], r["method"], r["status"]) for r in records] == [
        ("openssl", "PUT", 200), ("openssl", "GET", 200)]
    assert records[0]["req_bytes"] == len("hello static")


def test_own_metrics_endpoint_is_not_traffic(plain_server):
    """Scrapes of the tool's /metrics over plain HTTP are never requests."""
    require_bpf()
    from conftest import free_port
    port = free_port()
    t = Tracer("--plain", "--comm", "curl", "--prometheus-port", str(port))
    try:
        metrics = "http://127.0.0.1:%d/metrics" % port
        scrape, _ = run_client(["curl", "-sf", "-o", "/dev/null", metrics,
                                "--next", "-sf", "-o", "/dev/null", metrics])
        put, _ = run_client(["curl", "-s", "-X", "PUT", "http://127.0.0.1:%d"
                             "/ownmetrics" % plain_server.port])
        assert len(t.wait_records(1, pid=put)) == 1
        assert t.records(pid=scrape) == []
        _, page = run_client(["curl", "-sf", metrics])
        assert 'bucket="metrics"' not in page
        assert 'bucket="ownmetrics"' in page
    finally:
        t.stop()
