#!/usr/bin/env python3
"""matrixserver.py - a raw HTTP/1.1 server for tests/test_matrix.py.

Every response is driven by a recipe written in the request path, so any
client (curl, wget, boto3, http.client, Go, C) can ask for any response:

    /mx/<case>/<recipe>[?uploads | ?uploadId=...]

bucket `mx`, key `<case>/<recipe>`. The recipe is `name-value` pairs joined
by `_`, only characters no client percent-encodes:

    s-<n>      response body size (HEAD: the Content-Length it announces)
    p-<pat>    how the response is written to the socket:
               one      head and body in one sendall
               small    head and body in many writes of 1..997 bytes
               split    head in one write, body in another
               chunked  Transfer-Encoding: chunked, odd chunk sizes, the
                        chunks cut across writes at random places
               continue an unsolicited `HTTP/1.1 100 Continue` before the
                        request body is read, then as `one`
               close    no Content-Length, no chunked, `Connection: close`:
                        the body ends when the server closes
    st-<code>  status: 200, 204, 304 (no body), 403/404/500/503 (an S3 XML
               error body, padded to s bytes when s is larger)
    d-<ms>     delay before the response head
    b-<ms>     the body dribbled over <ms> (8 pauses, or at 8 places)
    z-<n>      seed of this response's write sizes, chunk sizes, extensions
    ce-1       chunk extensions (on the last chunk too)
    tr-1       a trailer field after the last chunk
    a-1        adversarial body bytes: fake response heads and chunked
               terminators; with `chunked`, writes end right after fake
               terminators inside chunk data (then a 2 ms pause)
    h-0        304: no Content-Length (h-1, the default: the object's)

Whatever the recipe, a request with `Expect: 100-continue` gets
`HTTP/1.1 100 Continue` before its body is read. Request bodies are read
exactly by their framing (Content-Length or chunked, chunk framing and
trailers counted).

One JSON line per request is appended to the --log file: conn (connection
number), tls, case, method, path, req_head_bytes, req_body_wire (body bytes
on the wire after the request head, chunk framing included),
req_body_payload, req_chunked, expect, interim (a 100 Continue was sent),
status (the final one), resp_head_bytes (the final head), resp_body_wire
(bytes sent after the final head, chunk framing included, 0 for
HEAD/204/304), resp_payload, framing, writes, error_code, delay_ms,
dribble_ms, and CLOCK_MONOTONIC ns: t_head (request head received),
t_body (request body read), t_first (just before the final response's
first write), t_lastw (just before its last write), t_last (last byte
sent). No client can read the response's first byte before t_first, nor
its last before t_lastw.

usage: matrixserver.py --log PATH [--cert C --key K]
Prints "READY <tls_port> <plain_port>" (both on 127.0.0.1) when listening.
Standard library only (and the openssl command for the certificate).
"""

import argparse
import json
import os
import random
import socket
import ssl
import sys
import tempfile
import threading
import time

from s3server import make_certificate

PATTERNS = ("one", "small", "split", "chunked", "continue", "close")
ERROR_CODES = {400: "BadRequest", 403: "AccessDenied", 404: "NoSuchKey",
               500: "InternalError", 503: "SlowDown"}
REASONS = {100: "Continue", 200: "OK", 204: "No Content",
           304: "Not Modified", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 500: "Internal Server Error",
           503: "Service Unavailable"}
RECIPE_ORDER = ("s", "p", "st", "d", "b", "z", "ce", "tr", "a", "h")
RECIPE_DEFAULTS = dict(s=0, p="one", st=200, d=0, b=0, z=0, ce=0, tr=0, a=0,
                       h=1)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
MAX_BODY = 2 * 1024 * 1024 + 64 * 1024

# Body bytes: one deterministic buffer, sliced (bodies stay in memory).
BASE = random.Random(20261201).randbytes(MAX_BODY)
_FAKE = (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n\r\n0\r\n\r\n"
         b"GET /mx/x HTTP/1.1\r\n\r\n0\r\n\r\n")
ADVERSARIAL = (_FAKE * (MAX_BODY // len(_FAKE) + 1))[:MAX_BODY]
FAKE_END = b"\r\n0\r\n\r\n"


def encode_recipe(**values):
    """The path segment for a recipe (defaults left out, s/p/st kept)."""
    parts = []
    for name in RECIPE_ORDER:
        value = values.get(name, RECIPE_DEFAULTS[name])
        if name in ("s", "p", "st") or value != RECIPE_DEFAULTS[name]:
            parts.append("%s-%s" % (name, value))
    unknown = set(values) - set(RECIPE_ORDER)
    if unknown:
        raise ValueError("unknown recipe fields %s" % sorted(unknown))
    return "_".join(parts)


def decode_recipe(segment):
    recipe = dict(RECIPE_DEFAULTS)
    for part in segment.split("_"):
        name, _sep, value = part.partition("-")
        if name not in RECIPE_DEFAULTS:
            raise ValueError("unknown recipe field %r" % name)
        recipe[name] = value if name == "p" else int(value)
    if recipe["p"] not in PATTERNS:
        raise ValueError("unknown pattern %r" % recipe["p"])
    if not 0 <= recipe["s"] <= MAX_BODY:
        raise ValueError("size out of range")
    return recipe


def parse_target(target):
    """(case, recipe dict) of /mx/<case>/<recipe>[?query]."""
    path = target.partition("?")[0]
    parts = path.split("/")
    if len(parts) != 4 or parts[1] != "mx" or not parts[2]:
        raise ValueError("not a matrix path: %r" % target)
    return parts[2], decode_recipe(parts[3])


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------

def error_body(code, case, size):
    """An S3 XML error, padded in <Message> to size bytes when larger."""
    start = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code>'
             '<Message>' % code).encode()
    end = ('</Message><Resource>/mx/%s</Resource><RequestId>%s</RequestId>'
           '</Error>' % (case, case)).encode()
    pad = max(0, size - len(start) - len(end))
    return start + b"m" * pad + end


def chunk_sizes(rng, total):
    """Odd chunk sizes (the last one whatever is left) summing to total."""
    sizes = []
    left = total
    while left > 0:
        kind = rng.random()
        if kind < 0.3:
            n = rng.randrange(1, 998, 2)
        elif kind < 0.5:
            n = rng.choice((4095, 4097, 8191, 16383, 16385, 49151, 65535,
                            65537))
        else:
            n = rng.randrange(1, 70000, 2)
        n = min(n, left)
        sizes.append(n)
        left -= n
    return sizes


def chunk_line(rng, size, extensions):
    digits = ("%x" if rng.random() < 0.5 else "%X") % size
    ext = b""
    if extensions and rng.random() < 0.6:
        ext = rng.choice((b";mx=1", b";name=\"a;b\"", b";x", b";y=2"))
    return digits.encode() + ext + b"\r\n"


def cuts(rng, start, end, low, high):
    """Positions cutting [start, end) into pieces of low..high bytes."""
    out = []
    pos = start
    while True:
        pos += rng.randint(low, high)
        if pos >= end:
            return out
        out.append(pos)


class Response:
    """What is sent for one request: the final head, the body wire bytes,
    and the writes (offsets into head + body, each with a pause before)."""

    def __init__(self, head, body, payload, framing, close, writes,
                 error_code):
        self.head = head
        self.body = body
        self.payload = payload
        self.framing = framing
        self.close = close
        self.writes = writes
        self.error_code = error_code

    def wire(self):
        return self.head + self.body

    def segments(self):
        """[(bytes, pause seconds before writing them)]."""
        wire = self.wire()
        bounds = [w[0] for w in self.writes] + [len(wire)]
        return [(wire[bounds[i]:bounds[i + 1]], self.writes[i][1])
                for i in range(len(self.writes))]


def build_response(method, case, recipe, request_close=False):
    """The response a recipe asks for, fully determined by (method, case,
    recipe): the same request always gets the same bytes and writes."""
    rng = random.Random("%s/%s/%s" % (recipe["z"], case, method))
    status, size, pattern = recipe["st"], recipe["s"], recipe["p"]
    error_code = ERROR_CODES.get(status) if status >= 400 else None
    if error_code:
        content = error_body(error_code, case, size)
        ctype = "application/xml"
    else:
        source = ADVERSARIAL if recipe["a"] else BASE
        content = bytes(source[:size])
        ctype = "application/octet-stream"
    no_body = method == "HEAD" or status in (204, 304)
    close = pattern == "close" or request_close
    lines = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Status")),
             "x-amz-request-id: %s" % case, "Server: matrixserver"]
    if status != 204:
        lines.append("Content-Type: %s" % ctype)
    framing = "none" if no_body else "length"
    if pattern == "chunked" and status not in (204, 304):
        lines.append("Transfer-Encoding: chunked")
        framing = "none" if no_body else "chunked"
    elif pattern == "close" and not no_body:
        framing = "close"
    elif status == 204 or (status == 304 and not recipe["h"]):
        pass
    else:
        lines.append("Content-Length: %d" % len(content))
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()

    body = b""
    fake_ends = []          # offsets (in body) right after a fake terminator
    if framing == "chunked":
        parts = []
        offset = length = 0             # into content, into the body
        for n in chunk_sizes(rng, len(content)):
            line = chunk_line(rng, n, recipe["ce"])
            data = content[offset:offset + n]
            base = length + len(line)
            length = base + n + 2
            if recipe["a"]:
                at = data.find(FAKE_END)
                while at >= 0 and len(fake_ends) < 4:
                    fake_ends.append(base + at + len(FAKE_END))
                    at = data.find(FAKE_END, at + 1 + len(data) // 3)
            parts += [line, data, b"\r\n"]
            offset += n
        last = b"0" + (b";end=1" if recipe["ce"] and rng.random() < 0.7
                       else b"") + b"\r\n"
        trailer = b"x-mx-trailer: done\r\n" if recipe["tr"] else b""
        parts += [last, trailer, b"\r\n"]
        body = b"".join(parts)
    elif not no_body:
        body = content
    payload = 0 if no_body else len(content)

    # Writes: offsets into head + body.
    total = len(head) + len(body)
    starts = {0}
    if pattern == "small":
        starts.update(cuts(rng, 0, total, 1, 997))
    elif pattern == "split":
        starts.add(len(head))
    elif pattern == "chunked":
        if rng.random() < 0.5:
            starts.add(len(head))
        if rng.random() < 0.3:
            starts.update(cuts(rng, 0, total, 1, 997))
        else:
            starts.update(cuts(rng, 0, total, 1, 40000))
    pauses = {}
    for end in fake_ends:                 # a read ends on a fake terminator
        starts.add(len(head) + end)
        pauses[len(head) + end] = 0.002
    if recipe["b"] and body:
        if len([s for s in starts if s >= len(head)]) < 8:
            starts.add(len(head))
            starts.update(len(head) + len(body) * i // 8 for i in range(1, 8))
        body_starts = sorted(s for s in starts if len(head) <= s < total)
        step = max(1, len(body_starts) // 8)
        chosen = body_starts[::step][:8]
        for s in chosen:
            pauses[s] = pauses.get(s, 0) + recipe["b"] / 1000.0 / len(chosen)
    starts = sorted(s for s in starts if s < total) or [0]
    writes = [(s, pauses.get(s, 0.0)) for s in starts]
    return Response(head, body, payload, framing, close, writes,
                    error_code if not no_body else None)


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

class Closed(Exception):
    pass


class Reader:
    """Exact reads from a socket, counting every byte."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def fill(self):
        data = self.sock.recv(262144)
        if not data:
            raise Closed()
        self.buf += data

    def head(self):
        """The request head up to and including the empty line; None at a
        clean end of the connection."""
        while True:
            at = self.buf.find(b"\r\n\r\n")
            if at >= 0:
                out = bytes(self.buf[:at + 4])
                del self.buf[:at + 4]
                return out
            if len(self.buf) > 1 << 20:
                raise ValueError("request head too long")
            try:
                self.fill()
            except Closed:
                if self.buf:
                    raise
                return None

    def line(self):
        while True:
            at = self.buf.find(b"\n")
            if at >= 0:
                out = bytes(self.buf[:at + 1])
                del self.buf[:at + 1]
                return out
            self.fill()

    def skip(self, n):
        while len(self.buf) < n:
            n -= len(self.buf)
            self.buf.clear()
            self.fill()
        del self.buf[:n]

    def body(self, headers):
        """(wire bytes, payload bytes, chunked) of the request body."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            wire = payload = 0
            while True:
                line = self.line()
                wire += len(line)
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while True:
                        trailer = self.line()
                        wire += len(trailer)
                        if trailer in (b"\r\n", b"\n"):
                            return wire, payload, True
                self.skip(size)
                crlf = self.line()
                if crlf not in (b"\r\n", b"\n"):
                    raise ValueError("bad chunk end %r" % crlf)
                wire += size + len(crlf)
                payload += size
        length = int(headers.get("content-length") or 0)
        self.skip(length)
        return length, length, False


def parse_request(head):
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, _sep, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


class Log:
    def __init__(self, path):
        self.lock = threading.Lock()
        self.file = open(path, "a")

    def write(self, record):
        line = json.dumps(record, separators=(",", ":"))
        with self.lock:
            self.file.write(line + "\n")
            self.file.flush()


def serve_connection(sock, tls, conn_id, log):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if tls:
            sock.do_handshake()
        reader = Reader(sock)
        while True:
            head = reader.head()
            if head is None:
                return
            t_head = time.monotonic_ns()
            method, target, headers = parse_request(head)
            try:
                case, recipe = parse_target(target)
            except ValueError:
                case, recipe = None, dict(RECIPE_DEFAULTS, st=400, s=0)
            expect = "100-continue" in headers.get("expect", "").lower()
            interim = expect or recipe["p"] == "continue"
            if interim:
                sock.sendall(CONTINUE)
            wire, payload, chunked = reader.body(headers)
            t_body = time.monotonic_ns()
            resp = build_response(
                method, case or "bad", recipe,
                "close" in headers.get("connection", "").lower())
            if recipe["d"]:
                time.sleep(recipe["d"] / 1000.0)
            t_first = t_lastw = time.monotonic_ns()
            for data, pause in resp.segments():
                if pause:
                    time.sleep(pause)
                t_lastw = time.monotonic_ns()
                sock.sendall(data)
            t_last = time.monotonic_ns()
            log.write(dict(
                conn=conn_id, tls=tls, case=case, method=method, path=target,
                host=headers.get("host"), req_head_bytes=len(head),
                req_body_wire=wire, req_body_payload=payload,
                req_chunked=chunked, expect=expect, interim=interim,
                status=recipe["st"], resp_head_bytes=len(resp.head),
                resp_body_wire=len(resp.body), resp_payload=resp.payload,
                framing=resp.framing, writes=len(resp.writes),
                error_code=resp.error_code, delay_ms=recipe["d"],
                dribble_ms=recipe["b"] if resp.body else 0,
                t_head=t_head, t_body=t_body, t_first=t_first,
                t_lastw=t_lastw, t_last=t_last))
            if resp.close:
                finish(sock, tls)
                return
    except (Closed, OSError, ValueError):
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass


def finish(sock, tls):
    """End a close-delimited response: close_notify (TLS), then FIN."""
    try:
        sock.settimeout(5)
        if tls:
            sock = sock.unwrap()
        sock.shutdown(socket.SHUT_WR)
    except (OSError, ValueError):
        pass


def accept_loop(listener, context, log, counter):
    while True:
        try:
            sock, _addr = listener.accept()
        except OSError:
            return
        with counter["lock"]:
            counter["n"] += 1
            conn_id = counter["n"]
        tls = context is not None
        if tls:
            sock = context.wrap_socket(sock, server_side=True,
                                       do_handshake_on_connect=False)
        threading.Thread(target=serve_connection,
                         args=(sock, tls, conn_id, log), daemon=True).start()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    if args.cert and args.key:
        cert, key = args.cert, args.key
    else:
        cert, key = make_certificate(tempfile.mkdtemp(prefix="mxcert"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    log = Log(args.log)
    counter = {"n": 0, "lock": threading.Lock()}
    ports = []
    for ctx in (context, None):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        ports.append(listener.getsockname()[1])
        threading.Thread(target=accept_loop,
                         args=(listener, ctx, log, counter),
                         daemon=True).start()
    sys.stdout.write("READY %d %d\n" % tuple(ports))
    sys.stdout.flush()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
