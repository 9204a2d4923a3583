#!/usr/bin/env python3
"""Hostile HTTP over TLS, for the hardening tests.

usage: hostile.py PORT MANY
Sends, each on its own connection unless said: binary garbage; a head cut
short; a 64 KiB header line; NUL, invalid UTF-8 and ANSI escapes raw in the
path; ANSI and CR/LF percent-encoded in the key; an escape in the Host
header; request bodies holding a fake response and a fake request; a GET
whose body is a fake status line; then MANY GETs of distinct keys on one
keep-alive connection. Prints a JSON object of what it expects reported.
"""
import http.client
import json
import os
import socket
import ssl
import sys
import time

PORT, MANY = int(sys.argv[1]), int(sys.argv[2])
CTX = ssl._create_unverified_context()


def connect():
    return CTX.wrap_socket(socket.create_connection(("127.0.0.1", PORT)))


def exchange(raw, wait=True, *more):
    """Send raw bytes (then more writes); read until the server closes or a
    response ends."""
    sock = connect()
    sock.sendall(raw)
    for piece in more:
        sock.sendall(piece)
    got = b""
    sock.settimeout(5)
    try:
        while wait:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
            if b"\r\n\r\n" in got and (b"Content-Length: 0" in got or
                                       got.endswith(b"</Error>") or
                                       len(got) > 100000):
                break
    except (socket.timeout, ConnectionError, ssl.SSLError):
        pass
    sock.close()
    return got


def request(method, path, body=b"", host=b"127.0.0.1"):
    return b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n" \
           b"Connection: close\r\n\r\n%s" % (method, path, host, len(body),
                                            body)


expect = {"hidden": [], "reported": []}
# 1. Not HTTP at all: the connection is ignored from its first write.
exchange(b"\x16\x03\x01" + os.urandom(2045))
# 2. A head cut short, then the client gives up.
sock = connect()
sock.sendall(b"GET /hostile/trunc HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ab")
time.sleep(0.3)
sock.close()
expect["reported"].append(["GET", "/hostile/trunc", None])
# 3. A 64 KiB header line.
exchange(b"GET /hostile/bighdr HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " +
         b"A" * 65536 + b"\r\n\r\n")
expect["reported"].append(["GET", "/hostile/bighdr", "4xx"])
# 4. Raw NUL, invalid UTF-8 and an ANSI sequence in the path.
exchange(request(b"GET", b"/hostile/raw\x00\xff\xfe\x1b[31mred"))
expect["reported"].append(["GET", "/hostile/raw\x00\xff\xfe\x1b[31mred",
                           "any"])
# 5. ANSI and CR/LF percent-encoded in the key (decoded in "key").
exchange(request(b"GET", b"/hostile/enc%1b%5b2J%0d%0afake-line"))
expect["reported"].append(["GET", "/hostile/enc%1b%5b2J%0d%0afake-line",
                           404])
# 6. An escape sequence in the Host header.
exchange(request(b"GET", b"/hostile/host", host=b"evil\x1b]0;title\x07x"))
expect["reported"].append(["GET", "/hostile/host", "any"])
# 7. Bodies that look like a response and like a request.
exchange(request(b"PUT", b"/hostile/fakeresp",
                 b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
expect["reported"].append(["PUT", "/hostile/fakeresp", "any"])
inner = b"GET /hostile/inner HTTP/1.1\r\nHost: x\r\n\r\n"
head = request(b"PUT", b"/hostile/fakereq", inner)[:-len(inner)]
exchange(head, True, inner)     # the body in its own write, as clients do
expect["reported"].append(["PUT", "/hostile/fakereq", "any"])
expect["hidden"].append("/hostile/inner")
# 8. Many distinct keys on one keep-alive connection.
conn = http.client.HTTPSConnection("127.0.0.1", PORT, context=CTX)
for i in range(MANY):
    conn.request("GET", "/hostile/many-%d" % i)
    conn.getresponse().read()
conn.close()
print(json.dumps(expect))
