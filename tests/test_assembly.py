"""Request assembly from synthetic kernel events: matching and timing."""

import json

import s3slower as s

MS = 1_000_000


class Conn:
    """Produces events for one connection the way the kernel would."""

    def __init__(self, handle=0x1000, tgid=42, tid=43):
        self.handle, self.tgid, self.tid = handle, tgid, tid
        self.seq = self.rphase = 0
        self.phase = None
        self.state = dict(req_start=0, req_end=0, req_bytes=0, resp_start=0,
                          resp_end=0, resp_bytes=0)

    def _event(self, kind, ts, data=b"", length=None, flags=0):
        length = len(data) if length is None else length
        return s.Event(ts=ts, handle=self.handle, tgid=self.tgid, tid=self.tid,
                       len=length, cap=len(data), seq=self.seq,
                       rphase=self.rphase, type=kind, lib=s.LIB_OPENSSL,
                       flags=flags, comm="client", data=data, **self.state)

    def write(self, start, end, data, length=None):
        length = len(data) if length is None else length
        is_req = data[:4] in (b"GET ", b"PUT ", b"POST", b"HEAD", b"DELE")
        if is_req and self.phase == "req" or self.phase == "pipelined":
            self.phase = "pipelined"
            self.state["req_end"] = start
            self.state["req_bytes"] += length
            return self._event(s.EV_WRITE, end, data[:s.MAX_DATA], length,
                               s.FLAG_PIPELINED)
        if is_req:
            self.seq += 1
            self.phase = "req"
            self.state.update(req_start=start, req_bytes=0, resp_start=0,
                              resp_end=0, resp_bytes=0)
        elif self.phase == "resp":
            self.phase = "req"
            self.state.update(resp_start=0, resp_end=0, resp_bytes=0)
        self.state["req_end"] = start       # entry of the last write
        self.state["req_bytes"] += length
        return self._event(s.EV_WRITE, end, data[:s.MAX_DATA], length)

    def read(self, ts, data, length=None, kind=s.EV_READ):
        length = len(data) if length is None else length
        if self.phase == "pipelined":
            self.state["resp_start"] = self.state["resp_start"] or ts
            self.state["resp_bytes"] += length
            self.state["resp_end"] = ts
            return self._event(kind, ts, data[:s.MAX_DATA], length,
                               s.FLAG_PIPELINED)
        if self.phase == "req":
            self.phase = "resp"
            self.rphase += 1
            self.state.update(resp_start=ts, resp_bytes=0)
        self.state["resp_bytes"] += length
        self.state["resp_end"] = ts
        flags = int(data.endswith(b"\r\n0\r\n\r\n") or data == b"0\r\n\r\n")
        return self._event(kind, ts, data[:s.MAX_DATA], length, flags)

    def close(self, ts):
        flags = s.FLAG_PIPELINED if self.phase == "pipelined" else 0
        return self._event(s.EV_CLOSE, ts, flags=flags)


def collect(**kw):
    out = []
    return out, s.Assembler(out.append, **kw)


GET = b"GET /bkt/key HTTP/1.1\r\nHost: s3.example.com\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nx-amz-request-id: R1\r\n\r\n"
PUT_EXPECT = (b"PUT /b/k HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
              b"Content-Length: 4\r\n\r\n")


def test_keepalive_requests_reported_once_each_with_times():
    out, asm = collect()
    c = Conn()
    for i in range(3):
        base = i * 100 * MS
        asm.feed(c.write(base, base + 1 * MS, GET))
        asm.feed(c.read(base + 10 * MS, OK))
        asm.feed(c.read(base + 12 * MS, b"hello"))
    assert len(out) == 3
    r = out[0]
    assert (r.method, r.op, r.bucket, r.key, r.status) == \
        ("GET", "GetObject", "bkt", "key", 200)
    assert (r.ttfb_ms, r.latency_ms, r.turnaround_ms) == (10.0, 12.0, 10.0)
    assert (r.req_bytes, r.resp_bytes, r.request_id, r.complete) == \
        (0, 5, "R1", True)


def test_headers_split_over_writes_and_host_after_authorization():
    out, asm = collect()
    c = Conn()
    auth = b"Authorization: AWS4-HMAC-SHA256 " + b"x" * 1500 + b"\r\n"
    asm.feed(c.write(0, 1, b"PUT /b/k HTTP/1.1\r\n" + auth))
    asm.feed(c.write(2, 3, b"Host: h.example\r\nContent-Length: 3\r\n\r\nabc"))
    asm.feed(c.read(5 * MS, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    (r,) = out
    assert (r.host, r.op, r.req_bytes) == ("h.example", "PutObject", 3)
    assert "AWS4" not in json.dumps(r._asdict())


def test_100_continue_is_not_the_response():
    out, asm = collect()
    c = Conn()
    asm.feed(c.write(0, 1 * MS, PUT_EXPECT))
    asm.feed(c.read(2 * MS, b"HTTP/1.1 100 Continue\r\n\r\n"))
    assert out == []
    asm.feed(c.write(3 * MS, 4 * MS, b"data"))
    asm.feed(c.read(20 * MS, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    (r,) = out
    assert r.status == 200 and r.req_bytes == 4
    assert r.ttfb_ms == 20.0 and r.turnaround_ms == 17.0


def test_100_continue_then_body_response_counts_from_its_own_phase():
    calls = []
    out, asm = collect(control=lambda *a: calls.append(a[1:]))
    c = Conn()
    asm.feed(c.write(0, 1 * MS, PUT_EXPECT))
    asm.feed(c.read(2 * MS, b"HTTP/1.1 100 Continue\r\n\r\n"))
    asm.feed(c.write(3 * MS, 4 * MS, b"data"))
    head = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 9\r\n\r\n"
    asm.feed(c.read(20 * MS, head + b"<Err"))
    assert calls[-1][:2] == (s.MODE_LENGTH, len(head) + 9)
    asm.feed(c.read(21 * MS, b"or/>!"))
    (r,) = out
    assert (r.status, r.resp_bytes, r.latency_ms) == (400, 9, 21.0)


def test_interim_response_before_final_in_later_read_of_same_phase():
    out, asm = collect()
    c = Conn()
    # The server answered 100 Continue only after the whole body arrived.
    asm.feed(c.write(0, 1 * MS, PUT_EXPECT))
    asm.feed(c.write(2 * MS, 3 * MS, b"data"))
    asm.feed(c.read(4 * MS, b"HTTP/1.1 100 Continue\r\n\r\n"))
    asm.feed(c.read(15 * MS, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    (r,) = out
    assert (r.ttfb_ms, r.latency_ms, r.turnaround_ms) == (15.0, 15.0, 13.0)


def test_interim_and_final_response_in_one_read():
    out, asm = collect()
    c = Conn()
    asm.feed(c.write(0, 1, b"PUT /b/k HTTP/1.1\r\nHost: h\r\n\r\n"))
    asm.feed(c.read(5 * MS, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 "
                    b"Forbidden\r\nContent-Length: 40\r\n\r\n<Error><Code>"
                    b"AccessDenied</Code></Error>"))
    asm.feed(c.read(6 * MS, b"xxxxxxxxxxxx"))
    (r,) = out
    assert (r.status, r.error_code, r.resp_bytes) == (403, "AccessDenied", 40)


def test_large_body_finished_by_kernel_done_event():
    calls = []
    out, asm = collect(control=lambda *a: calls.append(a[1:]))
    c = Conn()
    size = 16 * 1024 * 1024
    asm.feed(c.write(0, 1, GET))
    asm.feed(c.read(1 * MS, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                    % size + b"x" * 100))
    head_len = len(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    assert calls == [(s.MODE_LENGTH, head_len + size, False)]
    for i in range(3):     # reads the kernel still sent before the control
        asm.feed(c.read((2 + i) * MS, b"x" * 16384))
    assert out == []
    c.state["resp_bytes"] = head_len + size     # counted in the kernel
    asm.feed(c.read(900 * MS, b"", length=0, kind=s.EV_DONE))
    (r,) = out
    assert r.resp_bytes == size and r.latency_ms == 900.0 and r.complete


def test_race_body_done_before_control_completes_from_map():
    out, asm = collect(control=lambda *a: None,
                       peek=lambda e: (10**6 + 60, 50 * MS, 0, e.rphase, 99))
    c = Conn()
    asm.feed(c.write(0, 1, GET))
    asm.feed(c.read(1 * MS, b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n"
                    b"\r\n"))
    (r,) = out
    assert r.latency_ms == 50.0 and r.complete


def test_chunked_response_ends_on_terminator():
    out, asm = collect()
    c = Conn()
    asm.feed(c.write(0, 1, GET))
    asm.feed(c.read(1 * MS, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"
                    b"\r\n\r\n5\r\nhello\r\n"))
    assert out == []
    asm.feed(c.read(3 * MS, b"0\r\n\r\n"))
    (r,) = out
    assert r.latency_ms == 3.0 and r.complete


def test_connections_are_separate_even_on_one_thread():
    out, asm = collect()
    a, b = Conn(handle=1), Conn(handle=2)
    asm.feed(a.write(0, 1, GET))
    asm.feed(b.write(0, 1, GET.replace(b"key", b"other")))
    asm.feed(b.read(5 * MS, OK + b"hello"))
    asm.feed(a.read(9 * MS, OK + b"hello"))
    assert [(r.key, r.latency_ms) for r in out] == [("other", 5.0),
                                                    ("key", 9.0)]


def test_close_mid_response_is_incomplete_and_reported_once():
    out, asm = collect()
    c = Conn()
    asm.feed(c.write(0, 1, GET))
    asm.feed(c.read(1 * MS, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"))
    asm.feed(c.close(5 * MS))
    asm.flush()
    (r,) = out
    assert r.complete is False and r.status == 200 and r.resp_bytes == 0


def test_unanswered_request_flushed_at_exit_with_unknown_times():
    out, asm = collect()
    c = Conn()
    asm.feed(c.write(0, 1, GET))
    asm.flush()
    (r,) = out
    assert (r.status, r.ttfb_ms, r.latency_ms, r.complete) == \
        (None, None, None, False)


def test_process_exit_flushes_its_connections_only():
    out, asm = collect()
    mine, other = Conn(tgid=1), Conn(tgid=2)
    asm.feed(mine.write(0, 1, GET))
    asm.feed(other.write(0, 1, GET))
    asm.feed(s.Event(*([0] * 2), 1, 1, 0, 0, 0, 0, s.EV_EXIT, 0, 0,
                     *([0] * 6), "x", b""))
    assert [r.pid for r in out] == [1]


def test_pipelined_requests_matched_in_order_with_their_own_times():
    out, asm = collect()
    c = Conn()
    put = (b"PUT /bkt/up HTTP/1.1\r\nHost: s3.example.com\r\n"
           b"Content-Length: 8\r\n\r\nGET body")    # a body that looks like GET
    head = b"HEAD /bkt/h HTTP/1.1\r\nHost: s3.example.com\r\n\r\n"
    asm.feed(c.write(0, 1, GET))
    asm.feed(c.write(2 * MS, 3 * MS, put))        # pipelined from here on
    asm.feed(c.write(4 * MS, 5 * MS, head + GET))   # two heads in one write
    assert out == []
    nf = (b"HTTP/1.1 404 Not Found\r\nContent-Length: 42\r\n\r\n"
          b"<Error><Code>NoSuchKey</Code></Error>     ")
    hd = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"
    asm.feed(c.read(10 * MS, OK + b"hel"))
    asm.feed(c.read(11 * MS, b"lo" + b"HTTP/1.1 100 Continue\r\n\r\n"))
    asm.feed(c.read(12 * MS, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                     + hd + nf[:30]))
    assert [r.method for r in out] == ["GET", "PUT", "HEAD"]
    asm.feed(c.read(15 * MS, nf[30:]))
    get, put_r, head_r, last = out
    assert (get.ttfb_ms, get.latency_ms, get.resp_bytes, get.req_bytes) == \
        (10.0, 11.0, 5, 0)
    assert (put_r.op, put_r.status, put_r.req_bytes, put_r.ttfb_ms,
            put_r.latency_ms) == ("PutObject", 200, 8, 10.0, 10.0)
    assert (head_r.status, head_r.resp_bytes, head_r.ttfb_ms) == \
        (200, 0, 8.0)
    assert (last.status, last.error_code, last.resp_bytes, last.latency_ms,
            last.complete) == (404, "NoSuchKey", 42, 11.0, True)
    assert [len(p.pending) for p in asm.conns.values()] == [0]


def test_pipelined_requests_unanswered_at_close_are_incomplete():
    out, asm = collect()
    c = Conn()
    asm.feed(c.write(0, 1, GET))
    asm.feed(c.write(5, 6, GET))
    asm.feed(c.read(9 * MS, OK + b"hello"))
    asm.feed(c.close(10 * MS))
    assert [r.complete for r in out] == [True, False]
    assert asm.incomplete == 1 and asm.conns == {}


def test_connection_table_is_bounded():
    out, asm = collect(max_conns=10)
    for h in range(100):
        asm.feed(Conn(handle=h).write(0, 1, GET))
    assert len(asm.conns) == 10
    assert len(out) == 90 and not any(r.complete for r in out)


def test_unparsed_exchange_hidden_unless_include_unknown():
    for include, expected in ((False, 0), (True, 1)):
        out, asm = collect(include_unknown=include)
        c = Conn()
        asm.feed(c.write(0, 1, b"GET /x HT"))     # not even a request line
        asm.feed(c.read(2 * MS, OK + b"hello"))
        asm.flush()
        assert len(out) == expected


def test_head_cut_short_reported_from_its_complete_lines():
    out, asm = collect()
    c = Conn()
    # A 64 KiB header: the kernel copies the first 4 KiB of the write.
    asm.feed(c.write(0, 1, b"GET /bkt/k HTTP/1.1\r\nHost: h\r\nX-Big: " +
                     b"A" * 70000))
    asm.feed(c.read(2 * MS, b"HTTP/1.1 431 Too Large\r\nContent-Length: 0"
                    b"\r\n\r\n"))
    (r,) = out
    assert (r.method, r.path, r.host, r.key, r.status, r.req_bytes) == \
        ("GET", "/bkt/k", "h", "k", 431, None)


def test_json_contract_fields_and_nulls():
    out, asm = collect()
    c = Conn()
    asm.feed(c.write(0, 1, GET))
    asm.flush()
    record = json.loads(s.format_json(out[0], s.Clock()))
    for field in ("ts", "pid", "tid", "comm", "lib", "host", "method", "path",
                  "bucket", "key", "op", "status", "req_bytes", "resp_bytes",
                  "ttfb_ms", "latency_ms", "request_id", "error_code"):
        assert field in record
    assert record["status"] is None and record["latency_ms"] is None
    assert record["ts"].endswith("Z")


def test_close_before_head_parsed_still_completes_chunked():
    """User space lagging: the close arrives right after the head event."""
    out, asm = collect()
    c = Conn()
    asm.feed(c.write(0, 1, GET))
    head = c.read(1 * MS, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                  b"\r\n5\r\nhello\r\n")
    c.read(2 * MS, b"0\r\n\r\n")               # counted, not sent
    close = c.close(3 * MS)._replace(flags=1)    # kernel: chunk_end set
    asm.feed(head)
    asm.feed(close)
    (r,) = out
    assert r.complete and r.latency_ms == 2.0
