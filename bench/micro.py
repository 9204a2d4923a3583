#!/usr/bin/python3
"""User-space cost per request, without BPF: the tracer's own record
handler (Tracer.on_record: decode, parse, statistics, output) fed kernel
records of the shapes real clients make, written to /dev/null.

Prints µs per record for text output, and for --json with Prometheus
metrics, then (with --profile) the top of a cProfile of each. Needs no
root: it measures the Python side only, which is what the tracer's CPU
per request is made of once the kernel hands over one record per request.

usage: bench/micro.py [--records 50000] [--profile]
"""
import argparse
import cProfile
import ctypes
import io
import os
import pstats
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import s3slower as s  # noqa: E402

CLIENTS = [
    # (method, target, request headers, status, response headers, body)
    ("GET", "/bench-bucket/data/obj-%05d", [
        ("Host", "127.0.0.1:9000"), ("User-Agent", "curl/7.88.1"),
        ("Accept", "*/*")],
     200, [("Server", "nginx/1.22.1"), ("Content-Type", "application/octet-stream"),
           ("Content-Length", "3"), ("Connection", "keep-alive"),
           ("x-amz-request-id", "17F2A3B4C5D6E7F8")], b""),
    ("PUT", "/bench-bucket/uploads/part-%05d?partNumber=3&uploadId=abc", [
        ("Host", "bench-bucket.s3.us-east-1.amazonaws.com"),
        ("User-Agent", "Boto3/1.26.27 md/Botocore#1.29.27 ua/2.0 os/linux"),
        ("Accept-Encoding", "identity"), ("Content-MD5", "1B2M2Y8AsgTpgAmY7PhCfg=="),
        ("X-Amz-Date", "20261201T203000Z"),
        ("X-Amz-Content-SHA256", "UNSIGNED-PAYLOAD"),
        ("Authorization", "AWS4-HMAC-SHA256 Credential=AKIA/20261201/us-east-1/"
                          "s3/aws4_request, SignedHeaders=host, Signature=ab12"),
        ("Content-Length", "1048576"), ("Expect", "100-continue")],
     200, [("x-amz-id-2", "abcdefghijklmnopqrstuvwxyz0123456789"),
           ("x-amz-request-id", "0A1B2C3D4E5F6789"),
           ("Date", "Tue, 01 Dec 2026 20:30:00 GMT"),
           ("ETag", '"d41d8cd98f00b204e9800998ecf8427e"'),
           ("Server", "AmazonS3"), ("Content-Length", "0")], b""),
    ("GET", "/bench-bucket?list-type=2&prefix=data%%2F&max-keys=%d", [
        ("Host", "localhost:9000"), ("User-Agent", "rclone/v1.60.1"),
        ("Authorization", "AWS4-HMAC-SHA256 Credential=x, Signature=y"),
        ("X-Amz-Date", "20261201T203000Z"), ("Accept-Encoding", "gzip")],
     404, [("Content-Type", "application/xml"), ("Content-Length", "120"),
           ("x-amz-request-id", "ABCDEF0123456789")],
     b"<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code>"
     b"<Message>The bucket does not exist</Message></Error>"),
]


def head(first, headers):
    return (first + "\r\n" + "".join("%s: %s\r\n" % h for h in headers) +
            "\r\n").encode("latin-1")


def records(n, seed=1):
    """n raw kernel records, as the ring buffer hands them over."""
    rng = random.Random(seed)
    out = []
    now = 10 ** 12
    for i in range(n):
        method, target, req_h, status, resp_h, body = CLIENTS[i % len(CLIENTS)]
        req = head("%s %s HTTP/1.1" % (method, target % rng.randrange(10 ** 5)),
                   req_h)
        resp = head("HTTP/1.1 %d %s" % (status, "OK" if status < 300
                                        else "Not Found"), resp_h) + body
        start = now + i * 50000
        fields = (start, start + 2000, start + 30000, start + 31000,
                  1048576 if method == "PUT" else 0, len(body) or 3, 0x5000 + i % 7,
                  4242, 4243, 1 + i % 50, len(req), len(resp) - len(body), status,
                  len(req), len(resp), s.REC_REQUEST, s.LIB_OPENSSL,
                  s.RF_COMPLETE | s.RF_SOCKET, b"bench-client",
                  start - 900000 if i % 50 == 0 else 0,
                  start - 800000 if i % 50 == 0 else 0, 0, 0)
        raw = bytearray(s.REQ_DATA_OFFSET + s.REQ_CAP)
        s.RECORD_HEAD.pack_into(raw, 0, *fields)
        raw[s.RECORD_HEAD.size:s.RECORD_HEAD.size + len(resp)] = resp
        raw[s.REQ_DATA_OFFSET:s.REQ_DATA_OFFSET + len(req)] = req
        out.append(bytes(raw))
    return out


def tracer(argv):
    args = s.parse_args(argv)
    t = s.Tracer(args, open(os.devnull, "w"))
    if args.prometheus_port:
        t.prometheus = s.PrometheusOutput(args.max_label_values)
    return t


def run(argv, raws, profile=False):
    t = tracer(argv)
    buffers = [ctypes.create_string_buffer(raw, len(raw)) for raw in raws]
    handler = t.on_record
    prof = cProfile.Profile() if profile else None
    start = time.process_time()
    if prof:
        prof.enable()
    for buf in buffers:
        handler(None, ctypes.addressof(buf), len(buf))
    t.write_lines()
    if prof:
        prof.disable()
    seconds = time.process_time() - start
    t.out.flush()
    assert t.reported == len(raws), (t.reported, t.error)
    return seconds / len(raws) * 1e6, prof


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50000)
    parser.add_argument("--profile", action="store_true")
    opts = parser.parse_args()
    raws = records(opts.records)
    for name, argv in (("text", []),
                       ("json+metrics", ["--json", "--prometheus-port", "1"])):
        best = min(run(argv, raws)[0] for _ in range(3))
        print("%-13s %6.1f µs per request (best of 3, %d records)" %
              (name, best, len(raws)))
        if opts.profile:
            _, prof = run(argv, raws[:20000], profile=True)
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
            print("\n".join(line for line in text.getvalue().splitlines()
                            if line.strip())[:3000])


if __name__ == "__main__":
    main()
