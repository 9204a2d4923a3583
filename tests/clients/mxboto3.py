#!/usr/bin/env python3
"""The boto3 client of tests/test_matrix.py: S3 calls whose keys are recipes.

usage: mxboto3.py ENDPOINT PLANFILE
PLANFILE is JSON: a list of connections, each a list of calls {"case", "op":
GetObject|HeadObject|PutObject|UploadPart|DeleteObject, "key", "body":
bytes, "expect": bool (PutObject/UploadPart: a file-like body, which boto3
sends with `Expect: 100-continue`, waiting for the 100)}. Each connection
is one boto3 client (one pooled keep-alive connection, no retries).
Prints one JSON list, per call: {"case", "status", "start", "end",
"resp_payload"} (time.monotonic_ns around the whole call; GetObject: until
its body is read).
"""
import io
import json
import sys
import time
import warnings

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

warnings.filterwarnings("ignore")


def client(endpoint):
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        verify=False, config=Config(max_pool_connections=1,
                                    s3={"addressing_style": "path"},
                                    signature_version="s3v4",
                                    retries={"total_max_attempts": 1}))


def call(s3, step):
    key = step["key"]
    body = b"b" * step.get("body", 0)
    if step.get("expect"):
        body = io.BytesIO(body)
    op = step["op"]
    if op == "GetObject":
        resp = s3.get_object(Bucket="mx", Key=key)
        return resp, len(resp["Body"].read())
    if op == "HeadObject":
        return s3.head_object(Bucket="mx", Key=key), 0
    if op == "PutObject":
        return s3.put_object(Bucket="mx", Key=key, Body=body), None
    if op == "UploadPart":
        return s3.upload_part(Bucket="mx", Key=key, Body=body, PartNumber=1,
                              UploadId="mx"), None
    if op == "DeleteObject":
        return s3.delete_object(Bucket="mx", Key=key), None
    raise ValueError(op)


def main():
    endpoint = sys.argv[1]
    with open(sys.argv[2]) as f:
        plan = json.load(f)
    out = []
    for steps in plan:
        s3 = client(endpoint)
        for step in steps:
            start = time.monotonic_ns()
            try:
                resp, payload = call(s3, step)
            except ClientError as exc:
                resp, payload = exc.response, None
            end = time.monotonic_ns()
            out.append(dict(case=step["case"], start=start, end=end,
                            status=resp["ResponseMetadata"]["HTTPStatusCode"],
                            resp_payload=payload))
        s3.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
