"""Hardening, end to end: hostile traffic, secrets, a client killed
mid-request, and a load the tool must keep up with or account for."""

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request

from conftest import (PYTHON, TESTS, TOOL, Tracer, free_port, require_bpf,
                      run_client, stop_process, wait_until)

HOSTILE = os.path.join(TESTS, "clients", "hostile.py")
BOTO3CLIENT = os.path.join(TESTS, "clients", "boto3client.py")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def test_hostile_traffic(tracer, s3_server):
    require_bpf()
    sink = tempfile.TemporaryFile()       # a pipe nobody reads would block
    text = subprocess.Popen([TOOL, "--comm", "python3"], stdout=sink,
                            stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: text.stderr.readline().startswith(
            b"Tracing"), 60, interval=0)
        many = 10000
        pid, out = run_client([PYTHON, HOSTILE, str(s3_server.port),
                               str(many)], timeout=300)
        expect = json.loads(out)
        records = tracer.wait_records(many + len(expect["reported"]),
                                      timeout=60, pid=pid)
    finally:
        text.send_signal(signal.SIGINT)
        _, stderr = text.communicate(timeout=60)
        sink.seek(0)
        stdout = sink.read()
    assert text.returncode == 0 and b"Traceback" not in stderr
    assert b" 0 lost events" in stderr
    assert tracer.proc.poll() is None          # the session tracer lives on
    # Exactly what was sent: nothing invented, nothing lost.
    odd = [r for r in records if not r["path"].startswith("/hostile/many-")]
    assert [(r["method"], r["path"]) for r in odd] == \
        [(m, p) for m, p, _ in expect["reported"]]
    for r, (_m, _p, status) in zip(odd, expect["reported"]):
        if status is None:
            assert r["status"] is None and r["complete"] is False
        elif status == "4xx":
            assert 400 <= r["status"] < 500
        elif status != "any":
            assert r["status"] == status
    assert not any(p in r["path"] for r in records for p in expect["hidden"])
    by_path = {r["path"]: r for r in odd}
    assert by_path["/hostile/enc%1b%5b2J%0d%0afake-line"]["key"] == \
        "enc\x1b[2J\r\nfake-line"
    assert by_path["/hostile/fakereq"]["req_bytes"] == len(
        b"GET /hostile/inner HTTP/1.1\r\nHost: x\r\n\r\n")
    assert by_path["/hostile/fakeresp"]["req_bytes"] == 38
    assert by_path["/hostile/host"]["host"] == "evil\x1b]0;title\x07x"
    many_records = [r for r in records if r["path"].startswith("/hostile/")
                    and r["key"].startswith("many-")]
    assert len(many_records) == many
    assert {r["key"] for r in many_records} == \
        {"many-%d" % i for i in range(many)}
    # Text output: one line per request, no control character anywhere.
    out = stdout.decode("utf-8", "replace")
    lines = [l for l in out.split("\n") if re.match(r"^\S+ +%d " % pid, l)]
    assert len(lines) == len(records)
    assert not CONTROL.search(out)
    assert any("\\x1b[31mred" in l and "\\x00" in l for l in lines)
    assert any("evil\\x1b]0;title\\x07x" in l for l in lines)


def test_secrets_never_in_any_output(s3_server):
    require_bpf()
    port = free_port()
    t = Tracer("--comm", "python3", "--prometheus-port", str(port),
               "--stats-by", "bucket")
    text = subprocess.Popen([TOOL, "--comm", "curl"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: text.stderr.readline().startswith(
            "Tracing"), 60, interval=0)
        _pid, result = run_client([PYTHON, BOTO3CLIENT, s3_server.url,
                                   "presign"])
        url = json.loads(result)["done"][0]["url"]
        # The session token travels too with temporary credentials.
        url += "&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLESESSIONTOKEN"
        run_client(["curl", "-skf", "-o", "/dev/null", url])
        run_client(["curl", "-sk", "-o", "/dev/null", "-H",
                    "Authorization: AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7"
                    "EXAMPLE/20260101/us-east-1/s3/aws4_request, Signature="
                    "deadbeefcafe", "-H", "X-Amz-Security-Token: FwoGZXIvYXd"
                    "zEXAMPLESESSIONTOKEN", s3_server.url + "/sec/k"])
        t.wait_records(2)
        metrics = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port,
                                         timeout=10).read().decode()
    finally:
        text.send_signal(signal.SIGINT)
        text_out, text_err = text.communicate(timeout=30)
        t.stop()
    everything = "\n".join((t.stdout(), t.stderr(), metrics, text_out,
                            text_err))
    assert "REDACTED" in everything       # the presigned paths were seen
    signature = re.search(r"Signature=([0-9a-f]+)", url).group(1)
    for secret in ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI",
                   "FwoGZXIvYXdzEXAMPLESESSIONTOKEN", signature,
                   "deadbeefcafe"):
        assert secret not in everything, secret


def test_client_killed_mid_request(tracer, s3_server):
    proc = subprocess.Popen(["curl", "-sk", "-o", "/dev/null",
                             s3_server.url + "/kill/noanswer/k"])
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    (r,) = tracer.wait_records(1, pid=proc.pid)
    assert (r["path"], r["complete"], r["status"]) == \
        ("/kill/noanswer/k", False, None)
    assert tracer.proc.poll() is None
