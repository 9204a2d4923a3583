"""Statistics and Prometheus metrics: bounded, valid, scraped for real."""

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import s3slower as s
from conftest import (Tracer, TOOL, free_port, require_bpf, require_tool,
                      run_client, stop_process, wait_until)


def request(i=0, host="s3.example.com", bucket="b", op="GetObject",
            latency=12.0, status=200):
    return s.Request(0, 1, 1, "c", "openssl", host, host, "GET", "/b/k",
                     bucket, "k", op, status, 0, 5, latency / 2, latency,
                     1.0, "R%d" % i, None, True, transfer_ms=latency - 1.0,
                     retrans=i % 3)


def metrics_text(prometheus):
    from prometheus_client import generate_latest
    return generate_latest(prometheus.registry).decode()


def series(text):
    return [line for line in text.splitlines()
            if line.startswith("s3slower_")]


def test_label_cardinality_stays_under_the_cap():
    from prometheus_client import CollectorRegistry
    prometheus = s.PrometheusOutput(50, registry=CollectorRegistry())
    for i in range(10000):
        prometheus.add(request(i, bucket="bucket-%d" % i))
        prometheus.add(request(i, host="h%d.example.com" % i))
    lines = series(metrics_text(prometheus))
    buckets = {m for line in lines
               for m in re.findall(r'bucket="([^"]*)"', line)}
    hosts = {m for line in lines for m in re.findall(r'host="([^"]*)"', line)}
    assert len(hosts) == 51 and "other" in hosts
    assert len(buckets) <= 51 and "other" in buckets
    # Per label set: 4 histograms of 16+3 lines, requests, response bytes;
    # retransmits per host.
    assert len(lines) < 101 * (4 * 19 + 2) + 51 + 10


def test_bucket_table_is_capped_and_sorted():
    stats = s.Statistics("bucket", max_buckets=20)
    for i in range(5000):
        stats.add(request(i, bucket="bk%d" % (i % 1000)))
    for _ in range(30):
        stats.add(request(bucket="hot"))
    text = stats.render()
    rows = [line.split() for line in text.splitlines()[2:] if line.strip()]
    assert text.startswith("=== Buckets for s3.example.com ===")
    assert len(rows) == 21
    # The first 20 buckets keep their rows; later ones, "hot" too, fold.
    assert rows[0][0] == "other" and int(rows[0][1]) == 5000 - 20 * 5 + 30
    assert [r[0] for r in rows[1:]] == sorted(
        ("bk%d" % i for i in range(20)), key=lambda b: (-5, b))


def test_exposition_passes_promtool():
    promtool = require_tool("promtool")
    from prometheus_client import CollectorRegistry
    prometheus = s.PrometheusOutput(10, registry=CollectorRegistry())
    for i, (op, status) in enumerate((("GetObject", 200), ("PutObject", 503),
                                      (None, None))):
        prometheus.add(request(i, op=op, status=status,
                               bucket='we"ird\nbucket'))
    prometheus.probes.labels("openssl").set(6)
    proc = subprocess.run([promtool, "check", "metrics"],
                          input=metrics_text(prometheus), text=True,
                          capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_exposition_counts_generated_requests_exactly():
    """Generated requests (times on bucket bounds and between, unknown
    times, incomplete ones, bytes, retransmissions) against counts worked
    out here from the requests themselves."""
    import random
    from collections import Counter, defaultdict
    from prometheus_client import CollectorRegistry
    from prometheus_client.parser import text_string_to_metric_families
    seed = int(os.environ.get("S3SLOWER_METRICS_SEED") or
               random.randrange(1 << 30))
    rng = random.Random(seed)
    # Label values under the cap: test_label_cardinality_stays_under_the_cap
    # covers what is folded into "other".
    prometheus = s.PrometheusOutput(100, registry=CollectorRegistry())

    def a_time():
        bound = rng.choice(s.LATENCY_BUCKETS) * 1e3
        return rng.choice([None, bound, bound * (1 + 1e-9), bound * 0.999,
                           rng.uniform(0.01, 200000.0)])
    expected = defaultdict(Counter)
    for i in range(rng.randrange(200, 2000)):
        complete = rng.random() > 0.1
        status = rng.choice([200, 206, 404, 503, None])
        req = s.Request(
            0, 1, 1, "c", "openssl", "h%d" % rng.randrange(3), None,
            rng.choice(["GET", "PUT", None]), "/b/k",
            rng.choice(["b1", "b2", None]), "k",
            rng.choice(["GetObject", "PutObject", None]), status,
            rng.choice([0, None, rng.randrange(1 << 30)]),
            rng.choice([0, None, rng.randrange(1 << 30)]), a_time(),
            a_time() if complete else None, a_time(), None, None, complete,
            transfer_ms=a_time(), retrans=rng.choice([0, 0, 3]))
        prometheus.add(req)
        labels = (("bucket", req.bucket or "none"), ("host", req.host),
                  ("method", req.method or "none"), ("op", req.op or "none"))
        state = "incomplete" if not complete else \
            str(status) if status else "none"
        expected["s3slower_requests_total"][labels + (("status", state),)] \
            += 1
        for name, value in (("s3slower_request_bytes_total", req.req_bytes),
                            ("s3slower_response_bytes_total",
                             req.resp_bytes)):
            if value:
                expected[name][labels] += value
        for name, value in (
                ("s3slower_request_duration_seconds", req.latency_ms),
                ("s3slower_time_to_first_byte_seconds", req.ttfb_ms),
                ("s3slower_server_seconds", req.server_ms),
                ("s3slower_transfer_seconds", req.transfer_ms)):
            if value is None:
                continue
            expected[name + "_count"][labels] += 1
            for bound in s.LATENCY_BUCKETS + (float("inf"),):
                if value / 1e3 <= bound:
                    expected[name + "_bucket"][tuple(sorted(labels + (
                        ("le", "+Inf" if bound == float("inf") else
                         str(bound)),)))] += 1
            expected[name + "_sum"][labels] += value / 1e3
        if req.retrans:
            expected["s3slower_retransmits_total"][(("host", req.host),)] \
                += req.retrans
    got = defaultdict(Counter)
    for family in text_string_to_metric_families(metrics_text(prometheus)):
        for sample in family.samples:
            if sample.name.startswith("s3slower_") and \
                    not sample.name.endswith("_created"):
                got[sample.name][tuple(sorted(sample.labels.items()))] = \
                    sample.value
    for name in expected:
        if name.endswith("_sum"):
            for key, value in expected[name].items():
                assert abs(got[name][key] - value) <= 1e-9 * value + 1e-9, \
                    (name, key, seed)
        else:
            assert got[name] == expected[name], (name, seed)
    assert set(got) - set(expected) <= {"s3slower_lost_events_total"}, seed


def prometheus_query(port, query):
    url = "http://127.0.0.1:%d/api/v1/query?query=%s" % (
        port, urllib.parse.quote(query))
    reply = json.load(urllib.request.urlopen(url, timeout=10))
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def test_real_prometheus_scrapes_counts_and_p99(s3_server):
    require_bpf()
    binary = require_tool("prometheus")
    promtool = require_tool("promtool")
    metrics_port, web_port = free_port(), free_port()
    work = tempfile.mkdtemp(prefix="s3slower-prom")
    config = os.path.join(work, "prometheus.yml")
    with open(config, "w") as f:
        f.write("global:\n  scrape_interval: 1s\nscrape_configs:\n"
                "  - job_name: s3slower\n    static_configs:\n"
                "      - targets: ['127.0.0.1:%d']\n" % metrics_port)
    t = Tracer("--comm", "curl", "--prometheus-port", str(metrics_port))
    prom = subprocess.Popen(
        [binary, "--config.file", config, "--storage.tsdb.path", work,
         "--web.listen-address", "127.0.0.1:%d" % web_port],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = s3_server.url + "/promreal"
        run_client(["curl", "-skf", "-X", "PUT", url])
        run_client(["curl", "-skf", "-X", "PUT", "--data-binary", "x" * 100,
                    url + "/obj"])
        gets = []
        for i in range(5):
            gets += ["--next", "-sk", "-o", "/dev/null",
                     url + "/delay-200/k%d" % i]
        run_client(["curl"] + gets[1:])
        t.wait_records(7, bucket="promreal")
        # The exposition the tool serves passes promtool too.
        text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" %
                                      metrics_port, timeout=10).read()
        check = subprocess.run([promtool, "check", "metrics"], input=text,
                               capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr
        counts = 'sum by (op) (s3slower_requests_total{bucket="promreal"})'

        def scraped():
            try:
                result = prometheus_query(web_port, counts)
            except OSError:
                return False
            return {r["metric"]["op"]: float(r["value"][1])
                    for r in result} == {"CreateBucket": 1.0,
                                         "PutObject": 1.0, "GetObject": 5.0}
        assert wait_until(scraped, 30, interval=0.5), \
            prometheus_query(web_port, counts)
        (p99,) = prometheus_query(
            web_port, 'histogram_quantile(0.99, sum by (le, op) ('
            's3slower_request_duration_seconds_bucket{bucket="promreal",'
            'op="GetObject"}))')
        # Every GET waited 200 ms: its bucket is (0.1, 0.25].
        assert 0.2 <= float(p99["value"][1]) <= 0.25, p99
        (ttfb,) = prometheus_query(
            web_port, 'sum(s3slower_time_to_first_byte_seconds_count{'
            'bucket="promreal"})')
        assert float(ttfb["value"][1]) == 7
    finally:
        stop_process(prom)
        t.stop()


def test_interval_tables_only_with_no_requests(s3_server):
    require_bpf()
    proc = subprocess.Popen([TOOL, "-q", "--interval", "1", "--stats-by", "op",
                             "--comm", "curl"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: proc.stderr.readline().startswith(
            "Tracing"), 60)
        url = s3_server.url + "/intv"
        run_client(["curl", "-skf", "-X", "PUT", url, "--next", "-sk", "-o",
                    "/dev/null", url + "/a"])
        time.sleep(2.5)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    periods = re.findall(r"^--- \d\d:\d\d:\d\d, (.*) ---$", out, re.M)
    assert periods[-1] == "since start" and len(periods) >= 3
    assert set(periods[:-1]) == {"last 1s"}
    assert "TIME" not in out and "/intv/a" not in out    # no request lines
    final = out.split("since start ---")[1]
    assert re.search(r"^CreateBucket +1 ", final, re.M)
    assert re.search(r"^GetObject +1 ", final, re.M)
    assert "Statistics for" not in out                   # only the op table
    interval_rows = re.findall(r"^GetObject +1 ", out.split("since start")[0],
                               re.M)
    assert len(interval_rows) == 1     # counted in one interval only
