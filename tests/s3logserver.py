#!/usr/bin/env python3
"""tests/s3server.py with a request log: what the server itself saw.

Same server, same options, plus --log PATH: one JSON line per answered
request, appended when its response has been written:
  {"method", "path", "status", "request_id", "req_bytes", "resp_bytes",
   "client_port", "end"}
req_bytes and resp_bytes count the body bytes on the wire after each head
(chunk framing included), as s3slower reports them; request_id is the
x-amz-request-id header sent (unique per response); end is time.time().
An interim "100 Continue" is not a request of its own. The tests compare
this log with what the tracer reported.

usage: s3logserver.py --log PATH [s3server.py options]
"""

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import s3server  # noqa: E402

LOG_LOCK = threading.Lock()
LOG = None


class Counting:
    """A file object that counts the bytes read or written through it."""

    def __init__(self, f):
        self.f = f
        self.count = 0

    def read(self, *args):
        data = self.f.read(*args)
        self.count += len(data)
        return data

    def readline(self, *args):
        data = self.f.readline(*args)
        self.count += len(data)
        return data

    def write(self, data):
        self.count += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


class LoggingHandler(s3server.Handler):
    def send_response_only(self, code, message=None):
        self.final_status = code if code >= 200 else None
        super().send_response_only(code, message)

    def send_header(self, keyword, value):
        if keyword.lower() == "x-amz-request-id":
            self.request_id = value
        super().send_header(keyword, value)

    def end_headers(self):
        super().end_headers()
        # The final response's head is out: what follows is its body.
        if getattr(self, "final_status", None) and \
                not isinstance(self.wfile, Counting):
            self.wfile = Counting(self.wfile)

    def route(self):
        rfile, wfile = self.rfile, self.wfile
        self.rfile = Counting(rfile)     # the head is already read
        self.final_status = self.request_id = None
        try:
            return super().route()
        finally:
            entry = {"method": self.command, "path": self.path,
                     "status": self.final_status,
                     "request_id": self.request_id,
                     "req_bytes": self.rfile.count,
                     "resp_bytes": self.wfile.count
                     if isinstance(self.wfile, Counting) else 0,
                     "client_port": self.client_address[1],
                     "end": time.time()}
            self.rfile, self.wfile = rfile, wfile
            with LOG_LOCK:
                LOG.write(json.dumps(entry) + "\n")
                LOG.flush()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = route


def main():
    global LOG
    argv = sys.argv[1:]
    if "--log" not in argv or argv.index("--log") + 1 >= len(argv):
        sys.exit("usage: s3logserver.py --log PATH [s3server.py options]")
    at = argv.index("--log")
    LOG = open(argv[at + 1], "a")
    sys.argv[1:] = argv[:at] + argv[at + 2:]
    s3server.Handler = LoggingHandler    # main() serves s3server.Handler
    s3server.main()


if __name__ == "__main__":
    main()
