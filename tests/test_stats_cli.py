"""Statistics accuracy and the command line's error handling."""

import glob
import json
import math
import os
import random
import shutil
import subprocess

import pytest

import s3slower as s
from conftest import PYTHON, TOOL, Tracer, require_bpf


def exact_quantile(values, q):
    """Nearest rank: the smallest value with at least q of them at or below."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@pytest.mark.parametrize("dist", ["uniform", "lognormal", "bimodal",
                                  "constant", "heavy"])
def test_histogram_quantiles_within_relative_error(dist):
    rng = random.Random(7)
    gen = {
        "uniform": lambda: rng.uniform(0.05, 500),
        "lognormal": lambda: rng.lognormvariate(2, 1.5),
        "bimodal": lambda: rng.choice((rng.uniform(1, 2),
                                       rng.uniform(900, 1000))),
        "constant": lambda: 42.0,
        "heavy": lambda: rng.paretovariate(1.2),
    }[dist]
    values = [gen() for _ in range(20000)]
    hist = s.LatencyHistogram()
    for v in values:
        hist.add(v)
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = exact_quantile(values, q)
        assert abs(hist.quantile(q) - exact) <= 0.0101 * exact, (q, exact)
    assert hist.count == len(values) and hist.max == max(values)


def test_histogram_merge_and_bounded_size():
    a, b, both = s.LatencyHistogram(), s.LatencyHistogram(), \
        s.LatencyHistogram()
    rng = random.Random(1)
    for i in range(100000):
        v = rng.uniform(0.001, 120000)
        (a if i % 2 else b).add(v)
        both.add(v)
    a.merge(b)
    assert a.buckets == both.buckets and a.count == both.count
    # 1 µs .. 2 min at 1 % needs about 900 buckets, whatever the count.
    assert len(a.buckets) < 1000


def test_stats_tables_render_sorted_and_aligned():
    st = s.Statistics()
    req = s.Request(0, 1, 1, "c", "openssl", "h1", "h1", "GET", "/b/k", "b",
                    "k", "GetObject", 200, 0, 10, 1.0, 2.0, 0.5, None, None,
                    True)
    for i in range(3):
        st.add(req._replace(latency_ms=float(i + 1)))
    st.add(req._replace(method="PUT", op="PutObject", status=503))
    st.add(req._replace(method="DELETE", op="DeleteObject", status=None,
                        latency_ms=None, complete=False))
    text = st.render()
    assert "=== Statistics for h1 ===" in text
    lines = text.splitlines()
    header = lines[1].split()
    assert header == ["Method", "Count", "p50(ms)", "p90(ms)", "p99(ms)",
                      "max(ms)", "Errors", "Incompl", "srv_p50", "srv_p99",
                      "xfer_p50", "xfer_p99", "New%"]
    get = lines[2].split()
    assert get[:2] == ["GET", "3"] and get[6:8] == ["0", "0"]
    assert get[8:10] == ["0.50", "0.50"] and get[-1] == "0"
    for shown, exact in zip(get[2:6], (2.0, 3.0, 3.0, 3.0)):   # nearest rank
        assert abs(float(shown) - exact) <= 0.01 * exact + 0.005
    rows = {line.split()[0]: line.split() for line in lines[3:5]}
    assert rows["PUT"][1] == "1" and rows["PUT"][6:8] == ["1", "0"]
    # an incomplete request counts, under its own column, with no time
    # (its server time is known: the response began)
    assert rows["DELETE"] == ["DELETE", "1", "-", "-", "-", "-", "0", "1",
                              "0.50", "0.50", "-", "-", "0"]
    assert "=== S3 operations for h1 ===" in text


def run_tool(*args, user=None):
    cmd = [PYTHON, TOOL] + list(args)
    if user:
        cmd = ["setpriv", "--reuid=%d" % user, "--regid=%d" % user,
               "--clear-groups"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args, words", [
    (["--pid", "abc"], "not a process id"),
    (["--pid", "-5"], "not a process id"),
    (["--min-lat-ms", "-1"], "must be a number"),
    (["--min-lat-ms", "nan"], "must be a number"),
    (["--method", "FETCH"], "unknown method"),
    (["--prometheus-port", "70000"], "not in 1..65535"),
    (["--op", "Nonsense"], "unknown --op"),
    (["--comm", "x" * 16], "1 to 15 bytes"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_options_one_clear_line(args, words):
    proc = run_tool(*args)
    assert proc.returncode == 2
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_help_has_examples():
    proc = run_tool("--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout


def test_not_root_is_a_clear_error():
    proc = run_tool(user=65534)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "must run as root" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="checks that run as root")
@pytest.mark.parametrize("args, words", [
    (["--pid", "999999999"], "no process with pid 999999999"),
    (["--libssl", "/nonexistent/libssl.so"], "no such file"),
])
def test_runtime_errors_as_root(args, words):
    proc = run_tool(*args)
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr


def interpreter_without_bcc():
    """A python3 here that cannot import bcc (pyenv, venv), or None."""
    candidates = [shutil.which("python3") or ""] + \
        sorted(glob.glob("/root/.pyenv/versions/*/bin/python3"))
    for cand in candidates:
        if cand and os.path.exists(cand) and subprocess.run(
                [cand, "-c", "import bcc"], capture_output=True).returncode:
            return cand
    return None


def test_starts_under_an_interpreter_without_bcc():
    """`python3 s3slower.py` with a pyenv/venv python3 re-executes itself."""
    require_bpf()
    python = interpreter_without_bcc()
    if python is None:
        pytest.skip("no python3 without BCC on this host")
    tracer = Tracer(python=python)
    assert tracer.stop() == 0
    assert "Tracing" in tracer.stderr()


def test_request_filters():
    req = s.Request(0, 1, 1, "c", "openssl", "b.s3.amazonaws.com",
                    "s3.amazonaws.com", "PUT", "/k", "b", "k", "PutObject",
                    200, 5, 0, 1.0, 20.0, 0.5, None, None, True)
    args = s.parse_args([])
    assert s.request_matches(req, args)
    for argv, ok in ((["--method", "PUT"], True), (["--method", "GET"], False),
                     (["--op", "PutObject"], True),
                     (["--op", "GetObject"], False),
                     (["--bucket", "b"], True), (["--bucket", "c"], False),
                     (["--host-substr", "amazonaws"], True),
                     (["--host-substr", "minio"], False),
                     (["--min-lat-ms", "20"], True),
                     (["--min-lat-ms", "20.5"], False)):
        assert s.request_matches(req, s.parse_args(argv)) is ok, argv
    assert not s.request_matches(req._replace(latency_ms=None),
                                 s.parse_args(["--min-lat-ms", "1"]))


@pytest.mark.parametrize("seed", range(5))
def test_json_lines_are_what_json_dumps_writes(seed):
    """format_json writes its objects by hand: over generated requests
    (control characters, quotes, non-ASCII, None, floats of every scale),
    each line is byte for byte what json.dumps of the same object gives,
    but for times written with three decimals (the same numbers)."""
    rng = random.Random(seed)
    clock = s.Clock()
    alphabet = "\x00\t\n\x1b\"\\\x7f\x85\xe9\u2028\U0001F600aZ0/ "

    def value(kind):
        if rng.random() < 0.2:
            return None
        if kind is str:
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))
        if kind is int:
            return rng.randrange(10 ** 12)
        if kind is bool:
            return rng.random() < 0.5
        return rng.random() * 10 ** rng.randrange(-6, 7)

    kinds = {name: (str if name in ("comm", "lib", "host", "endpoint",
                                    "method", "path", "bucket", "key", "op",
                                    "why", "request_id", "error_code")
                    else bool if name in ("new_conn",)
                    else int if name in ("status", "req_bytes", "resp_bytes",
                                         "retrans")
                    else float) for name in s.JSON_FIELDS[3:]}
    for _ in range(2000):
        fields = {name: value(kind) for name, kind in kinds.items()}
        fields["complete"] = rng.random() < 0.5
        fields["truncated"] = rng.random() < 0.5
        request = s.Request(start_ns=rng.randrange(10 ** 15),
                            pid=rng.randrange(1 << 22),
                            tid=rng.randrange(1 << 22), **fields)
        expected = {"ts": clock.iso_utc(request.start_ns)}
        for name in s.JSON_FIELDS[1:]:
            v = getattr(request, name)
            expected[name] = round(v, 3) if name.endswith("_ms") and \
                v is not None else v
        line = json.dumps(expected, ensure_ascii=True, separators=(",", ":"))
        # Times with three decimals ("name": can only be a key: a quote in
        # a string is escaped).
        for name, v in expected.items():
            if name.endswith("_ms") and v is not None:
                line = line.replace('"%s":%s' % (name, json.dumps(v)),
                                    '"%s":%.3f' % (name, v))
        assert s.format_json(request, clock) == line
        assert json.loads(line) == expected
