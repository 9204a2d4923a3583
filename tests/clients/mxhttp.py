#!/usr/bin/env python3
"""The http.client client of tests/test_matrix.py, over TLS or plain HTTP.

usage: mxhttp.py https|http PORT PLANFILE
PLANFILE is JSON: a list of connections, each a list of requests
{"case", "method", "target", "body": bytes, "te": "cl"|"ch"|"no",
"expect": bool, "chunks": [sizes of the request body's chunks]}. The
connections run one after the other, each request on the connection's one
keep-alive socket. `expect` only adds the header: http.client sends the body
at once and skips the 100 Continue it gets back.
Prints one JSON list, per request: {"case", "status", "start", "first",
"end", "resp_payload"} (time.monotonic_ns: CLOCK_MONOTONIC, read at the
socket: start as http.client hands the request's first bytes to the socket,
first once the head is parsed, end as the socket read that returned the
response's last byte returns; a close-delimited body's EOF read is not
counted), and "preempted": the process was preempted (an involuntary
context switch) between the clock reading for start and the return of the
first send, or during the socket read that set end: the interval may be
stretched. (The test runs its clients at real-time priority: then only
the kernel's real-time throttling preempts them.) The garbage
collector is off: no pause lands between a clock reading and the I/O.
"""
import gc
import http.client
import json
import resource
import socket
import ssl
import sys
import time


def nivcsw():
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw


class ReadClock:
    """A socket noting when a read last returned data, and whether the
    process was preempted during that read."""

    last_read = 0
    last_preempted = False

    def recv_into(self, *args):
        before = nivcsw()
        n = super().recv_into(*args)
        if n:
            self.last_read = time.monotonic_ns()
            self.last_preempted = nivcsw() != before
        return n

    def recv(self, *args):
        before = nivcsw()
        data = super().recv(*args)
        if data:
            self.last_read = time.monotonic_ns()
            self.last_preempted = nivcsw() != before
        return data


class TimedSSLSocket(ReadClock, ssl.SSLSocket):
    pass


class TimedSocket(ReadClock, socket.socket):
    pass


class Timed:
    """Notes the time of the first send() of each request."""

    first_send = None
    send_preempted = False

    def send(self, data):
        if self.first_send is not None:
            return super().send(data)
        before = nivcsw()
        self.first_send = time.monotonic_ns()
        super().send(data)
        self.send_preempted = nivcsw() != before


class TimedHTTPS(Timed, http.client.HTTPSConnection):
    pass


class TimedHTTP(Timed, http.client.HTTPConnection):
    def connect(self):
        super().connect()
        sock = self.sock
        self.sock = TimedSocket(sock.family, sock.type, sock.proto,
                                fileno=sock.detach())
        self.sock.settimeout(self.timeout)


def run(scheme, port, steps, out):
    if scheme == "https":
        context = ssl._create_unverified_context()
        context.sslsocket_class = TimedSSLSocket
        conn = TimedHTTPS("127.0.0.1", port, timeout=120, context=context)
    else:
        conn = TimedHTTP("127.0.0.1", port, timeout=120)
    conn.connect()
    sock = conn.sock        # http.client lets go of it at a `close` response
    for step in steps:
        headers = {}
        body = None
        if step["te"] == "cl":
            body = b"p" * step["body"]
        elif step["te"] == "ch":
            body = iter([b"q" * n for n in step["chunks"]])
            headers["Transfer-Encoding"] = "chunked"
        if step.get("expect"):
            headers["Expect"] = "100-continue"
        conn.first_send = None
        conn.request(step["method"], step["target"], body=body,
                     headers=headers, encode_chunked=step["te"] == "ch")
        resp = conn.getresponse()
        first = time.monotonic_ns()
        data = resp.read()
        end = sock.last_read
        out.append(dict(case=step["case"], status=resp.status,
                        start=conn.first_send, first=first, end=end,
                        resp_payload=len(data),
                        preempted=conn.send_preempted or sock.last_preempted))
    conn.close()


def main():
    gc.disable()
    scheme, port = sys.argv[1], int(sys.argv[2])
    with open(sys.argv[3]) as f:
        plan = json.load(f)
    out = []
    for steps in plan:
        run(scheme, port, steps, out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
