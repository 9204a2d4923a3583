"""s3_torture_aws.sh against its local S3 server, under the tracer: every
operation the script says it did shows up with the right S3 operation."""

import collections
import os
import re
import subprocess

from conftest import TESTS

SCRIPT = os.path.join(os.path.dirname(TESTS), "s3_torture_aws.sh")


def parse_summary(text):
    """(bucket, {operation: ok count}) from the script's stdout."""
    bucket = re.search(r"^s3_torture_aws.sh: summary: .* bucket (\S+)", text,
                       re.M).group(1)
    counts = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+)\s+(\d+)\s+(\d+)$", line)
        if m:
            counts[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return bucket, counts


def test_help_and_bad_option():
    out = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "S3_ENDPOINT" in out.stdout
    bad = subprocess.run([SCRIPT, "-c", "zero"], capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().endswith("not a positive integer: zero")


def test_short_run_fully_traced(tracer):
    proc = subprocess.run([SCRIPT, "--short"], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    bucket, counts = parse_summary(proc.stdout)
    assert all(failed == 0 for _ok, failed in counts.values()), counts
    expected = {"CreateBucket", "PutObject", "CreateMultipartUpload",
                "UploadPart", "CompleteMultipartUpload", "GetObject",
                "HeadObject", "ListObjectsV2", "CopyObject",
                "PutObjectTagging", "GetObjectTagging", "DeleteObject",
                "DeleteObjects", "GetObject(404-expected)"}
    assert set(counts) == expected
    records = tracer.wait_records(sum(ok for ok, _ in counts.values()),
                                  bucket=bucket)
    seen = collections.Counter((r["op"], r["status"]) for r in records)
    for op, (ok, _failed) in counts.items():
        if op == "GetObject(404-expected)":
            assert seen[("GetObject", 404)] >= ok
            continue
        traced = sum(n for (o, status), n in seen.items()
                     if o == op and status < 300)
        assert traced >= ok, (op, ok, seen)
    assert all(r["complete"] for r in records)
    # The presigned GET came through curl, with its signature hidden.
    presigned = [r for r in records if r["comm"] == "curl"]
    assert len(presigned) == 1 and presigned[0]["op"] == "GetObject"
    assert "Signature=REDACTED" in presigned[0]["path"]
    # The script's access key id went in every Authorization header and the
    # presigned URL: it is nowhere in what the tracer printed.
    assert "AKIDLOCALTORTURE" not in tracer.stdout() + tracer.stderr()
    # 16 MiB went as two 8 MiB parts (newer CLIs add aws-chunked framing).
    parts = [r["req_bytes"] for r in records if r["op"] == "UploadPart"]
    assert len(parts) == 2
    assert all(8 << 20 <= n < (8 << 20) + 4096 for n in parts), parts
