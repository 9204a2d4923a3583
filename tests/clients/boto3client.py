#!/usr/bin/env python3
"""boto3 scenarios for the tests, against the local S3 server.

usage: boto3client.py ENDPOINT SCENARIO [ARG]
Prints a JSON list of the operations done, in order, with what the client
measured: {"op", "key", "ms"}.
"""
import concurrent.futures
import json
import sys
import time

import boto3
from botocore.config import Config


def client(endpoint, pool=10):
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        aws_session_token="FwoGZXIvYXdzEXAMPLESESSIONTOKEN",
        verify=False, config=Config(max_pool_connections=pool,
                                    s3={"addressing_style": "path"},
                                    signature_version="s3v4",
                                    retries={"total_max_attempts": 1}))


def timed(done, op, key, fn, *args, **kw):
    start = time.monotonic()
    result = fn(*args, **kw)
    done.append(dict(op=op, key=key, ms=(time.monotonic() - start) * 1e3))
    return result


def basic(s3, bucket, done):
    timed(done, "CreateBucket", None, s3.create_bucket, Bucket=bucket)
    timed(done, "PutObject", "k1", s3.put_object, Bucket=bucket, Key="k1",
          Body=b"a" * 1000)
    timed(done, "GetObject", "k1", lambda **kw: s3.get_object(**kw)["Body"]
          .read(), Bucket=bucket, Key="k1")
    timed(done, "HeadObject", "k1", s3.head_object, Bucket=bucket, Key="k1")
    timed(done, "ListObjectsV2", None, s3.list_objects_v2, Bucket=bucket,
          Prefix="k")
    timed(done, "CopyObject", "k2", s3.copy_object, Bucket=bucket, Key="k2",
          CopySource={"Bucket": bucket, "Key": "k1"})
    timed(done, "PutObjectTagging", "k2", s3.put_object_tagging, Bucket=bucket,
          Key="k2", Tagging={"TagSet": [{"Key": "a", "Value": "b"}]})
    timed(done, "GetObjectTagging", "k2", s3.get_object_tagging,
          Bucket=bucket, Key="k2")
    timed(done, "DeleteObject", "k2", s3.delete_object, Bucket=bucket,
          Key="k2")
    timed(done, "DeleteObjects", None, s3.delete_objects, Bucket=bucket,
          Delete={"Objects": [{"Key": "k1"}]})
    timed(done, "DeleteBucket", None, s3.delete_bucket, Bucket=bucket)


def multipart(s3, bucket, done):
    s3.create_bucket(Bucket=bucket)
    up = timed(done, "CreateMultipartUpload", "big", s3.create_multipart_upload,
               Bucket=bucket, Key="big")
    parts = []
    for n in (1, 2):
        r = timed(done, "UploadPart", "big", s3.upload_part, Bucket=bucket,
                  Key="big", UploadId=up["UploadId"], PartNumber=n,
                  Body=b"p" * (5 * 1024 * 1024))
        parts.append({"PartNumber": n, "ETag": r["ETag"]})
    timed(done, "CompleteMultipartUpload", "big",
          s3.complete_multipart_upload, Bucket=bucket, Key="big",
          UploadId=up["UploadId"], MultipartUpload={"Parts": parts})


def large(s3, bucket, done, size_mb=16):
    s3.create_bucket(Bucket=bucket)
    body = b"L" * (size_mb * 1024 * 1024)
    timed(done, "PutObject", "large", s3.put_object, Bucket=bucket, Key="large",
          Body=body)
    data = timed(done, "GetObject", "large",
                 lambda **kw: s3.get_object(**kw)["Body"].read(),
                 Bucket=bucket, Key="large")
    assert len(data) == len(body)


def threads(s3, bucket, done, count=16):
    s3.create_bucket(Bucket=bucket)
    def one(i):
        key = "t/%d" % i
        timed(done, "PutObject", key, s3.put_object, Bucket=bucket, Key=key,
              Body=b"t" * 2048)
        timed(done, "GetObject", key, lambda **kw: s3.get_object(**kw)["Body"]
              .read(), Bucket=bucket, Key=key)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        list(pool.map(one, range(count)))


def errors(s3, bucket, done):
    s3.create_bucket(Bucket=bucket)
    for op, key in (("GetObject", "missing"), ("GetObject", "slowdown/x")):
        try:
            timed(done, op, key, s3.get_object, Bucket=bucket, Key=key)
        except s3.exceptions.ClientError as exc:
            done.append(dict(op=op, key=key, error=exc.response["Error"]["Code"]))


def awschunked(s3, bucket, done):
    """Uploads with a trailing checksum: boto3 then frames the body as
    aws-chunked (Content-Encoding) over chunked transfer encoding."""
    s3.create_bucket(Bucket=bucket)
    for key, size in (("small", 1000), ("big", 3 * 1024 * 1024)):
        body = open("/dev/zero", "rb").read(size)
        timed(done, "PutObject", key, s3.put_object, Bucket=bucket, Key=key,
              Body=body, ChecksumAlgorithm="CRC32")
        got = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert got == body, (key, len(got))


def presign(s3, bucket, done):
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="p", Body=b"presigned")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket,
                                                          "Key": "p"})
    done.append(dict(op="presign", url=url))


def main():
    endpoint, scenario = sys.argv[1], sys.argv[2]
    arg = int(sys.argv[3]) if len(sys.argv) > 3 else None
    s3 = client(endpoint, pool=max(arg or 10, 10))
    bucket = "b%s%d" % (scenario, int(time.time() * 1000) % 100000)
    done = []
    fn = globals()[scenario]
    fn(s3, bucket, done, arg) if arg else fn(s3, bucket, done)
    print(json.dumps(dict(bucket=bucket, done=done)))


if __name__ == "__main__":
    import urllib3
    urllib3.disable_warnings()
    main()
