"""Shared fixtures: the tool as a module, the local S3 server, the tracer.

End-to-end tests need root and BCC. Where they are missing the tests skip,
unless S3SLOWER_REQUIRE_BPF=1 (set by .ci/run), where they fail instead.

tests/vm runs only inside the VM stage's guest (tests/vm/stage.sh, run by
tests/run.sh, sets S3SLOWER_VM_GUEST=1): a host run does not collect it.
S3SLOWER_TRACER_START_TIMEOUT: seconds a Tracer may take to start (60;
the emulated guest needs more).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
TOOL = os.path.join(ROOT, "s3slower.py")
sys.path.insert(0, ROOT)

# Interpreter for helper processes (server, clients): the distribution's,
# which has boto3 and friends after ./install.sh --tests.
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") \
    else sys.executable

if os.environ.get("S3SLOWER_VM_GUEST") != "1":
    collect_ignore = ["vm"]

TRACER_START_TIMEOUT = float(os.environ.get("S3SLOWER_TRACER_START_TIMEOUT")
                             or 60)


def bpf_unavailable_reason():
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs BCC (python3-bpfcc)"
    return None


def require_bpf():
    reason = bpf_unavailable_reason()
    if reason:
        if os.environ.get("S3SLOWER_REQUIRE_BPF") == "1":
            pytest.fail("end-to-end test cannot run: " + reason)
        pytest.skip(reason)


def require_vm_guest():
    """At the top of a tests/vm module: it runs only inside the VM stage's
    guest (tests/vm/stage.sh boots it); elsewhere it is skipped, or with
    S3SLOWER_REQUIRE_BPF=1 a failure."""
    if os.environ.get("S3SLOWER_VM_GUEST") == "1":
        return
    why = ("tests/vm runs inside the VM stage's guest: tests/vm/stage.sh "
           "(run by tests/run.sh) boots it")
    if os.environ.get("S3SLOWER_REQUIRE_BPF") == "1":
        pytest.fail(why, pytrace=False)
    pytest.skip(why, allow_module_level=True)


def require_tool(name):
    """Path of an installed program the test needs (./install.sh --tests)."""
    import shutil
    path = shutil.which(name)
    if path is None:
        if os.environ.get("S3SLOWER_REQUIRE_BPF") == "1":
            pytest.fail("%s is not installed: run ./install.sh --tests" % name)
        pytest.skip("needs %s (./install.sh --tests)" % name)
    return path


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout, interval=0.05):
    """predicate() until it is truthy or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def stop_process(proc, sig=signal.SIGTERM, timeout=15):
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


class S3Server:
    def __init__(self, plain=False):
        self.workdir = tempfile.mkdtemp(prefix="s3srv")
        cmd = [PYTHON, os.path.join(TESTS, "s3server.py"), "--port", "0"]
        if plain:
            cmd.append("--plain")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True,
                                     cwd=self.workdir)
        line = self.proc.stdout.readline()
        assert line.startswith("READY"), "server did not start: %r" % line
        self.port = int(line.split()[1])
        self.url = "%s://127.0.0.1:%d" % ("http" if plain else "https",
                                          self.port)
        self.host = "127.0.0.1:%d" % self.port

    def stop(self):
        stop_process(self.proc)


def tail_lines(text, path, head=10, tail=40):
    """text, or its first and last lines if long (a kernel verifier log is
    tens of thousands of lines; its verdict is at the end)."""
    lines = text.splitlines()
    if len(lines) <= head + tail + 1:
        return text
    return "\n".join(lines[:head] + ["[... %d lines left out: %s ...]"
                                      % (len(lines) - head - tail, path)]
                     + lines[-tail:])


class Tracer:
    """s3slower.py --json running in the background, output in a file."""

    def __init__(self, *args, python=None):
        self.out = tempfile.NamedTemporaryFile(prefix="s3slower", suffix=".out",
                                               delete=False)
        self.err = tempfile.NamedTemporaryFile(prefix="s3slower", suffix=".err",
                                               delete=False)
        cmd = ([python] if python else []) + [TOOL, "--json"] + list(args)
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=self.err,
                                     stdin=subprocess.DEVNULL)
        ready = wait_until(lambda: "\nTracing" in "\n" + self.stderr() or
                           self.proc.poll() is not None,
                           TRACER_START_TIMEOUT)
        if not ready or self.proc.poll() is not None:
            stop_process(self.proc, signal.SIGKILL)
            raise AssertionError("tracer did not start:\n" +
                                 tail_lines(self.stderr(), self.err.name))
        self.start_seconds = time.monotonic() - started

    def stderr(self):
        with open(self.err.name, errors="replace") as f:
            return f.read()

    def stdout(self):
        with open(self.out.name, errors="replace") as f:
            return f.read()

    def records(self, pid=None, **match):
        found = []
        for line in self.stdout().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if pid is not None and record["pid"] != pid:
                continue
            if all(record.get(k) == v for k, v in match.items()):
                found.append(record)
        return found

    def wait_records(self, count, timeout=15, settle=0.3, **match):
        """At least count matching records; then a moment for strays."""
        wait_until(lambda: len(self.records(**match)) >= count, timeout)
        time.sleep(settle)
        return self.records(**match)

    def stop(self, sig=signal.SIGINT):
        return stop_process(self.proc, sig)


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tracer():
    """One host-wide tracer for the session; tests select by client pid.
    Plain HTTP on, so every TLS test also checks nothing is reported twice."""
    require_bpf()
    t = Tracer("--plain")
    yield t
    t.stop()


def run_client(args, timeout=120, **kw):
    """Run a client to completion: (pid, stdout)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("client timed out: %s\n%s" % (args, err))
    assert proc.returncode == 0, "client failed: %s\n%s" % (args, err)
    return proc.pid, out


def python_client(code, *args, timeout=120):
    """Run Python code (a client) under the distribution's interpreter."""
    return run_client([PYTHON, "-c", code] + [str(a) for a in args],
                      timeout=timeout)


# --- tests/test_matrix.py: the matrix's size and seed (the environment
# variables S3SLOWER_MATRIX_CASES and S3SLOWER_MATRIX_SEED do the same) ---
def pytest_addoption(parser):
    group = parser.getgroup("s3slower matrix (tests/test_matrix.py)")
    group.addoption("--matrix-cases", type=int, default=None, metavar="N",
                    help="cases in the generated matrix (default 600; "
                         "the long run: 20000)")
    group.addoption("--matrix-seed", type=int, default=None, metavar="N",
                    help="seed of the generated matrix (default: random)")
