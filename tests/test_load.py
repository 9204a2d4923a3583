"""Load and loss: the tool keeps up with several keep-alive clients at the
highest rate this machine drives, or counts every lost event and says so."""

import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import (PYTHON, TESTS, Tracer, free_port, require_bpf,
                      require_tool)

sys.path.insert(0, TESTS)
from nginxserver import NginxServer  # noqa: E402

SECONDS = float(os.environ.get("S3SLOWER_LOAD_SECONDS", "60"))
PY_LOOP = r"""
import http.client, ssl, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
conn = http.client.HTTPSConnection("127.0.0.1", port,
                                   context=ssl._create_unverified_context())
deadline, n = time.monotonic() + seconds, 0
while time.monotonic() < deadline:
    conn.request("GET", "/small")
    conn.getresponse().read()
    n += 1
print(n)
"""
CURL_BATCH = 2000


@pytest.fixture(scope="module")
def nginx():
    require_tool("nginx")
    server = NginxServer()
    yield server
    server.stop()


def drive(nginx, seconds, pythons=2, curls=2):
    """Several clients at once until the deadline: requests sent, by comm."""
    procs = [subprocess.Popen([PYTHON, "-c", PY_LOOP, str(nginx.port),
                               str(seconds)], stdout=subprocess.PIPE,
                              text=True) for _ in range(pythons)]
    deadline = time.monotonic() + seconds
    curl_sent = 0
    url = nginx.url + "/small?[1-%d]" % CURL_BATCH

    def batch():
        return subprocess.Popen(["curl", "-sk", "-o", "/dev/null", url])
    running = [batch() for _ in range(curls)]
    while running:
        for i, proc in enumerate(running):
            if proc.poll() is None:
                continue
            assert proc.returncode == 0
            curl_sent += CURL_BATCH
            running[i] = batch() if time.monotonic() < deadline else None
        running = [p for p in running if p is not None]
        time.sleep(0.02)
    python_sent = sum(int(p.communicate(timeout=seconds + 60)[0])
                      for p in procs)
    return {"python3": python_sent, "curl": curl_sent}


def summary(stderr):
    m = re.search(r"s3slower: (\d+) requests reported from (\d+) kernel "
                  r"records \(and \d+ new files seen at exec or mmap\); "
                  r"(\d+) lost events, (\d+) incomplete", stderr)
    return tuple(int(x) for x in m.groups())


def check_times(records):
    for r in records:
        if r["complete"]:
            assert 0 <= r["ttfb_ms"] <= r["latency_ms"] < 10000, r
        else:
            assert r["latency_ms"] is None, r


class LoadRun:
    """The load driven under a tracer, and what the tracer made of it."""

    def __init__(self, nginx, seconds, *tracer_args, metrics_port=None,
                 **clients):
        self.tracer = Tracer(*tracer_args)
        try:
            started = time.monotonic()
            self.sent = drive(nginx, seconds, **clients)
            self.elapsed = time.monotonic() - started
            time.sleep(2)
            self.metrics = None
            if metrics_port:
                self.metrics = urllib.request.urlopen(
                    "http://127.0.0.1:%d/metrics" % metrics_port,
                    timeout=10).read().decode()
        finally:
            assert self.tracer.stop() == 0
        _reported, _events, self.lost, self.incomplete = \
            summary(self.tracer.stderr())
        self.records = [r for r in self.tracer.records() if r["path"] and
                        r["path"].startswith("/small")]
        total = sum(self.sent.values())
        print("\nload: %d requests in %.1f s (%.0f/s): %s; reported %d, lost "
              "events %d, incomplete %d" % (
                  total, self.elapsed, total / self.elapsed, self.sent,
                  len(self.records), self.lost, self.incomplete))

    def check_accounting(self):
        """Every request reported when nothing was lost; otherwise the loss
        is counted and said, and nothing is reported twice or with wrong
        times."""
        check_times(self.records)
        by_comm = {c: sum(1 for r in self.records if r["comm"] == c)
                   for c in self.sent}
        if self.lost == 0:
            assert by_comm == self.sent and self.incomplete == 0
        else:
            assert "events lost (ring buffer full)" in self.tracer.stderr()
            assert all(by_comm[c] <= self.sent[c] for c in self.sent)


def test_one_curl_one_python(nginx):
    """The benchmark's target load (zero loss is the goal, not yet met on
    this VM when it is busy: see the README)."""
    require_bpf()
    LoadRun(nginx, min(SECONDS, 20), pythons=1, curls=1).check_accounting()


def test_several_clients_at_full_rate(nginx):
    """More clients than cores: the tool may fall behind; if it does, it
    counts the loss, says so, and what it reports is still right."""
    require_bpf()
    port = free_port()
    run = LoadRun(nginx, SECONDS, "--prometheus-port", str(port),
                  metrics_port=port)
    lost_metric = float(re.search(r"^s3slower_lost_events_total (\S+)$",
                                  run.metrics, re.M).group(1))
    assert lost_metric <= run.lost
    run.check_accounting()


def test_losses_counted_never_wrong_times(nginx):
    """A one-page ring buffer under the same load: events are lost; the
    tool says how many, and what it reports still has right times."""
    require_bpf()
    run = LoadRun(nginx, min(SECONDS, 10), "--ringbuf-pages", "1")
    assert run.lost > 0
    run.check_accounting()


def test_reader_woken_before_a_small_ring_fills(nginx):
    """A 256 KiB ring holds about 150 records, fewer than two clients make
    between two of the reader's timer ticks (50 ms): with the timer alone,
    15 % of the records were lost (7600 of 49 000). The kernel wakes the
    reader early once 1/8 of the ring waits: 0-0.2 % were (a reader starved
    of the CPU for 30 ms still loses some)."""
    require_bpf()
    run = LoadRun(nginx, min(SECONDS, 10), "--ringbuf-pages", "64",
                  pythons=1, curls=1)
    assert run.lost < sum(run.sent.values()) / 50
    run.check_accounting()
