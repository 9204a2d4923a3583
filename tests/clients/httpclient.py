#!/usr/bin/env python3
"""HTTPS client for the tests: http.client (SSL_read_ex/SSL_write_ex).

usage: httpclient.py PORT PLAN_JSON [THREADS]
PLAN_JSON is a list of {"method", "path", "body": size, "headers": {}}.
Each thread runs the whole plan on one keep-alive connection. Prints one
JSON list of what the client itself measured, per request:
{"method", "path", "status", "start", "first", "end"} (monotonic ns).
"""
import http.client
import json
import ssl
import sys
import threading
import time


def run(port, plan, results):
    ctx = ssl._create_unverified_context()
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx,
                                       timeout=60)
    conn.connect()
    for step in plan:
        body = b"x" * step.get("body", 0) if step.get("body") else None
        start = time.monotonic_ns()
        conn.request(step["method"], step["path"], body=body,
                     headers=step.get("headers", {}))
        resp = conn.getresponse()
        first = time.monotonic_ns()
        resp.read()
        end = time.monotonic_ns()
        results.append(dict(method=step["method"], path=step["path"],
                            status=resp.status, start=start, first=first,
                            end=end))
    conn.close()


def main():
    port, plan = int(sys.argv[1]), json.loads(sys.argv[2])
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    results = []
    workers = [threading.Thread(target=run, args=(port, plan, results))
               for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
