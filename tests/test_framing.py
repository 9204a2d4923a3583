"""The kernel's HTTP framing tables and the records built from them.

The BPF program walks the automaton tables that s3slower.build_dfa() makes;
http_scan() walks the same tables in Python, so the framing decisions are
tested here without root, over generated messages cut at generated places.
The end-to-end tests (test_matrix.py) check the kernel walks them the same.
"""

import random
import struct

import pytest

import s3slower as s

SEED = random.randrange(1 << 30)
D = s.D


def chunked_body(rng, size):
    """A chunked body of size data bytes: odd chunk sizes, extensions,
    sometimes trailers. Returns the wire bytes."""
    out, left = [], size
    while left:
        n = min(left, rng.choice([1, 2, 7, 100, 4095, 4096, 16385,
                                  rng.randrange(1, 70000)]))
        ext = rng.choice([b"", b";x=1", b" ;name", b"\t;a=\"b\""])
        digits = b"%x" % n if rng.random() < 0.5 else b"%X" % n
        out.append(digits + ext + b"\r\n" + b"z" * n + b"\r\n")
        left -= n
    trailer = rng.choice([b"", b"X-Checksum: abc\r\n",
                          b"A: 1\r\nB: 2\r\n"])
    out.append(b"0" + rng.choice([b"", b";end"]) + b"\r\n" + trailer + b"\r\n")
    return b"".join(out)


def header_block(rng, fields):
    lines = []
    filler = [b"Date: Tue, 01 Dec 2026 17:00:00 GMT", b"Server: AmazonS3",
              b"x-amz-request-id: 4442587FB7D0A2F9", b"ETag: \"abc\"",
              b"Content-Type: application/octet-stream",
              b"Connection: keep-alive", b"X-Long: " + b"y" * 3000,
              b"Transfer-Encodingx: chunked", b"Content-Lengthy: 99",
              b"Contents: 5", b"T: chunked", b"C: 12"]
    for field in fields + rng.sample(filler, rng.randrange(0, 6)):
        lines.insert(rng.randrange(len(lines) + 1), field)
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def generated_response(rng):
    """(wire bytes, status, framing, body wire bytes) of one response."""
    status = rng.choice([200, 200, 206, 404, 500, 503, 204, 304])
    size = rng.choice([0, 1, 4095, 4096, 4097, 65535, 65536, 65537,
                       rng.randrange(200000)])
    kind = rng.choice(["length", "chunked"])
    if status in (204, 304):
        kind, size = "none", 0
    name = rng.choice([b"Content-Length", b"content-length",
                       b"CONTENT-LENGTH"])
    if kind == "length":
        fields = [name + b":" + rng.choice([b" ", b"", b"  "]) +
                  b"%d" % size]
        body = b"b" * size
    elif kind == "chunked":
        fields = [rng.choice([b"Transfer-Encoding: chunked",
                              b"transfer-encoding: gzip, CHUNKED"])]
        body = chunked_body(rng, size)
    else:
        fields, body = [], b""
    line = b"HTTP/1.1 %d %s\r\n" % (status, rng.choice([b"OK", b"X Y", b""]))
    return line + header_block(rng, fields), status, kind, body


class KernelModel:
    """The kernel's per-call walk over one response stream: phases around
    http_scan(), fed in the pieces the reads returned."""

    def __init__(self):
        self.state, self.phase, self.left = D["ST_START"], "scan", 0
        self.acc = self.status = self.flags = 0
        self.done = []          # (status, head bytes, body bytes)
        self.head = self.body = 0

    def feed(self, data):
        pos = 0
        while pos < len(data):
            if self.phase == "skip":
                n = min(self.left, len(data) - pos)
                pos, self.left, self.body = pos + n, self.left - n, \
                    self.body + n
                if not self.left:
                    self._done()
                continue
            state, used, self.acc, self.status, self.flags, head = \
                s.http_scan(self.state, data[pos:], self.acc, self.status,
                            self.flags)
            self.head += head
            self.body += used - head
            pos += used
            self.state = state
            if state == D["HEAD_END"]:
                length, self.acc = self.acc, 0
                if self.status in (204, 304):
                    self._done()
                elif self.flags & s.DFA_FLAG_CHUNKED:
                    self.state = D["CHUNK_SIZE"]
                elif length:
                    self.phase, self.left = "skip", length
                else:
                    self._done()
            elif state == D["MESSAGE_END"]:
                self._done()
            assert state != D["BAD"], "automaton rejected the stream"

    def _done(self):
        self.done.append((self.status, self.head, self.body))
        self.state, self.phase = D["ST_START"], "scan"
        self.acc = self.status = self.flags = self.head = self.body = 0


@pytest.mark.parametrize("case", range(300))
def test_generated_responses_cut_anywhere_are_framed_exactly(case):
    rng = random.Random(SEED * 1000 + case)
    messages = [generated_response(rng) for _ in range(rng.randrange(1, 6))]
    stream = b"".join(m[0] + m[3] for m in messages)
    model = KernelModel()
    pos = 0
    while pos < len(stream):
        # reads of any size: 1 byte, odd sizes, TLS records, all at once
        n = rng.choice([1, 3, 7, 512, 16384, rng.randrange(1, 70000)])
        model.feed(stream[pos:pos + n])
        pos += n
    want = [(status, len(head), len(body))
            for head, status, _kind, body in messages]
    assert model.done == want, "seed %d case %d" % (SEED, case)


def test_request_heads_and_bodies():
    req = (b"PUT /b/k HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
           b"Expect: 100-continue\r\n\r\n")
    state, used, acc, _st, flags, head = s.http_scan(D["SKIP"], req + b"hello")
    assert state == D["HEAD_END"] and used == head == len(req)
    assert acc == 5 and flags == s.DFA_FLAG_LENGTH
    chunked = b"POST /b?delete HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert s.http_scan(D["SKIP"], chunked)[4] == s.DFA_FLAG_CHUNKED
    # a header line of 64 KiB is skipped, not misread
    big = b"GET / HTTP/1.1\r\nX-Big: " + b"c" * 65536 + b"\r\n\r\n"
    assert s.http_scan(D["SKIP"], big)[:2] == (D["HEAD_END"], len(big))


def test_not_http_is_rejected():
    for junk in (b"\x16\x03\x01\x02\x00", b"SSH-2.0-OpenSSH", b"HTTQ/1.1"):
        assert s.http_scan(D["ST_START"], junk)[0] == D["BAD"]
    assert s.http_scan(D["CHUNK_SIZE"], b"zz\r\n")[0] == D["BAD"]


def test_tables_fit_the_kernel_layout():
    assert s.DFA_STOP == len(s.DFA_STATES) - 3
    assert len(s.DFA_STATES) <= 1 << s.DFA_BITS
    assert max(s.DFA["byte_class"]) < 1 << s.CLASS_BITS
    assert len(s.DFA["next"]) == 1 << (s.DFA_BITS + s.CLASS_BITS)


def record(**fields):
    """Bytes of a kernel record, as the ring buffer holds them."""
    base = dict(req_start=1_000_000, req_end=1_000_000, resp_start=0,
                resp_end=0, req_bytes=0, resp_bytes=0, handle=7, tgid=42,
                tid=43, seq=1, req_head=0, resp_head=0, status=0,
                type=s.REC_REQUEST, lib=1, flags=0, comm=b"curl",
                connect_start=0, connect_end=0, retrans_start=0,
                retrans_end=0, resp_data=b"", req_data=b"")
    base.update(fields)
    req, resp = base.pop("req_data"), base.pop("resp_data")
    base["req_head"] = base["req_head"] or len(req)
    head = s.RECORD_HEAD.pack(
        base["req_start"], base["req_end"], base["resp_start"],
        base["resp_end"], base["req_bytes"], base["resp_bytes"],
        base["handle"], base["tgid"], base["tid"], base["seq"],
        base["req_head"], base["resp_head"], base["status"], len(req),
        len(resp), base["type"], base["lib"], base["flags"], base["comm"],
        base["connect_start"], base["connect_end"], base["retrans_start"],
        base["retrans_end"])
    return head + resp.ljust(s.RESP_CAP, b"\0") + req


GET = (b"GET /bkt/dir/k.txt?X-Amz-Signature=secret&x-id=GetObject HTTP/1.1"
       b"\r\nHost: 127.0.0.1:9000\r\n\r\n")
NOT_FOUND = (b"HTTP/1.1 404 Not Found\r\nx-amz-request-id: RID1\r\n"
             b"Content-Length: 60\r\n\r\n")
ERROR_BODY = b"<Error><Code>NoSuchKey</Code><Message>m</Message></Error>"


def test_complete_record_to_request():
    raw = record(req_data=GET, resp_start=3_000_000, resp_end=5_500_000,
                 req_end=1_200_000, status=404, resp_head=len(NOT_FOUND),
                 resp_bytes=60, resp_data=NOT_FOUND + ERROR_BODY,
                 flags=s.RF_COMPLETE)
    req = s.build_request(raw)
    assert (req.method, req.bucket, req.key, req.op) == \
        ("GET", "bkt", "dir/k.txt", "GetObject")
    assert "secret" not in req.path and "X-Amz-Signature=REDACTED" in req.path
    assert (req.status, req.resp_bytes, req.req_bytes) == (404, 60, 0)
    assert (req.ttfb_ms, req.latency_ms, req.server_ms) == (2.0, 4.5, 1.8)
    assert req.transfer_ms == pytest.approx(2.7) and req.why == "xfer"
    assert (req.request_id, req.error_code) == ("RID1", "NoSuchKey")
    assert req.complete and not req.truncated and req.comm == "curl"


def test_connection_facts_only_where_the_socket_is_known():
    base = dict(req_data=GET, resp_start=3_000_000, resp_end=5_000_000,
                status=200, flags=s.RF_COMPLETE, connect_start=100_000,
                connect_end=300_000, retrans_start=2, retrans_end=5)
    known = s.build_request(record(
        **dict(base, flags=s.RF_COMPLETE | s.RF_SOCKET)))
    assert (known.new_conn, known.connect_ms, known.tls_handshake_ms,
            known.retrans, known.why) == (True, 0.2, 0.7, 3, "net")
    unknown = s.build_request(record(**base))
    assert (unknown.new_conn, unknown.connect_ms, unknown.retrans) == \
        (None, None, None)
    reused = s.build_request(record(**dict(base, seq=2)))
    assert reused.new_conn is False and reused.retrans is None


def test_incomplete_and_unanswered_records_have_no_made_up_values():
    unanswered = s.build_request(record(req_data=GET))
    assert unanswered.status is None and unanswered.resp_bytes is None
    assert unanswered.ttfb_ms is None and unanswered.latency_ms is None
    assert not unanswered.complete
    cut = s.build_request(record(
        req_data=GET, resp_start=2_000_000, resp_end=3_000_000, status=200,
        resp_bytes=1234, resp_data=b"HTTP/1.1 200 OK\r\nContent-Le"))
    assert (cut.status, cut.resp_bytes, cut.ttfb_ms) == (200, 1234, 1.0)
    assert cut.latency_ms is None and not cut.complete


def test_head_longer_than_kept_is_marked_truncated():
    head = b"PUT /b/k HTTP/1.1\r\nHost: h\r\nX-Big: " + b"x" * 5000
    raw = record(req_data=head[:s.REQ_CAP], req_head=len(head) + 4,
                 req_bytes=11, flags=s.RF_COMPLETE, resp_start=2, resp_end=3,
                 status=200)
    req = s.build_request(raw)
    assert req.truncated and req.method == "PUT" and req.host == "h"
    assert req.req_bytes == 11


@pytest.mark.parametrize("host, endpoints, bucket, key, endpoint", [
    ("mybucket.localhost", (), "mybucket", "photos/cat.jpg", "localhost"),
    ("my.bucket.localhost:9000", (), "my.bucket", "photos/cat.jpg",
     "localhost:9000"),
    ("logs.s3.example.internal", ("s3.example.internal",), "logs",
     "photos/cat.jpg", "s3.example.internal"),
    ("a.b.objects.corp", ("objects.corp",), "a.b", "photos/cat.jpg",
     "objects.corp"),
    ("objects.corp", ("objects.corp",), "photos", "cat.jpg", "objects.corp"),
    ("bkt.s3.dualstack.eu-west-1.amazonaws.com", (), "bkt", "photos/cat.jpg",
     "s3.dualstack.eu-west-1.amazonaws.com"),
    ("bkt.s3-accelerate.amazonaws.com", (), "bkt", "photos/cat.jpg",
     "s3-accelerate.amazonaws.com"),
    ("b--usw2-az1--x-s3.s3express-usw2-az1.us-west-2.amazonaws.com", (),
     "b--usw2-az1--x-s3", "photos/cat.jpg",
     "s3express-usw2-az1.us-west-2.amazonaws.com"),
])
def test_virtual_host_endpoints(host, endpoints, bucket, key, endpoint):
    target = s.s3_target(host, "/photos/cat.jpg", endpoints)
    assert (target.bucket, target.key, target.endpoint) == \
        (bucket, key, endpoint)


def test_operation_does_not_depend_on_signatures():
    for target, op in (("/bucket?list-type=2", "ListObjectsV2"),
                       ("/", "ListBuckets"), ("/bucket/key", "GetObject"),
                       ("/bucket?location", "GetBucketLocation")):
        raw = record(req_data=b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" %
                     target.encode())
        assert s.build_request(raw).op == op, target


def test_record_layout_matches_the_c_struct():
    # offsets the C struct has: the fixed head is 128 bytes, then resp_data
    assert s.RECORD_HEAD.size == 128
    assert s.REQ_DATA_OFFSET == 128 + s.RESP_CAP
    exit_record = s.decode_record(record(type=s.REC_EXIT, tgid=99)[:128])
    assert (exit_record.type, exit_record.tgid) == (s.REC_EXIT, 99)
    assert struct.calcsize("<QQQQQQQ IIIII HHH BBB3x 16s QQII") == 128
