#!/usr/bin/env python3
"""A small in-memory S3 server over HTTPS, for the tests and the demo.

It speaks enough of the S3 REST API for real clients (curl, http.client,
boto3, aws-cli, s3cmd): buckets, objects, ListObjects(V2), HEAD, DELETE,
DeleteObjects, CopyObject, tagging, multipart uploads, 100-continue,
chunked and aws-chunked uploads, and chunked responses. It never checks
signatures.

Fault injection, usable from any client:
  - a key or bucket path segment `delay-<ms>` delays the response head;
  - header `x-test-delay-ms: N` does the same;
  - a key segment `dribble-<ms>` spreads the body over <ms>;
  - a key segment `slowdown` answers 503 SlowDown;
  - a key segment `chunked` sends the GET body with chunked encoding;
  - a key segment `hangup` closes the connection mid-body;
  - a key segment `noanswer` never answers (until the server stops).

Usage: s3server.py --port 8443 [--cert C --key K] [--plain]
Prints "READY <port>" on stdout when it accepts connections.
"""

import argparse
import hashlib
import http.server
import os
import re
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from urllib.parse import unquote, parse_qs, urlsplit
from xml.sax.saxutils import escape

STORE = {}            # bucket -> {key: (bytes, tags dict)}
UPLOADS = {}          # upload id -> (bucket, key, {part: bytes})
LOCK = threading.Lock()
STOP = threading.Event()


def make_certificate(directory):
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    if not os.path.exists(cert):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
             "-keyout", key, "-out", cert, "-days", "30", "-subj",
             "/CN=localhost", "-addext",
             "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True)
    return cert, key


def xml_response(root, body):
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<%s xmlns="http://s3.'
            'amazonaws.com/doc/2006-03-01/">%s</%s>' % (root, body, root)
            ).encode()


def error_xml(code, message, resource=""):
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code>'
            '<Message>%s</Message><Resource>%s</Resource><RequestId>%s'
            '</RequestId></Error>' % (code, message, escape(resource),
                                      uuid.uuid4().hex[:16])).encode()


def fault(segments, name):
    for seg in segments:
        if seg == name:
            return True
        m = re.match(r"^%s-(\d+)$" % name, seg)
        if m:
            return int(m.group(1))
    return None


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "s3test/1.0"
    disable_nagle_algorithm = True   # no 40 ms Nagle/delayed-ACK stalls

    def log_message(self, fmt, *args):
        pass

    # -- request plumbing --------------------------------------------------
    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length else b""
        if "aws-chunked" in self.headers.get("Content-Encoding", "") or \
                self.headers.get("x-amz-content-sha256", "").startswith(
                    "STREAMING-"):
            data = decode_aws_chunked(data)
        return data

    def send(self, status, body=b"", headers=None, chunked=False,
             dribble_ms=0, hangup=False):
        self.send_response(status)
        self.send_header("x-amz-request-id", uuid.uuid4().hex[:16].upper())
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD" or status in (204, 304):
            self.wfile.flush()
            return
        if hangup:
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        pieces = [body[i:i + 16384] for i in range(0, len(body), 16384)] or \
            [b""]
        pause = dribble_ms / 1000.0 / max(len(pieces), 1)
        for piece in pieces:
            if pause:
                self.wfile.flush()
                time.sleep(pause)
            if chunked:
                if piece:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                self.wfile.write(piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (ConnectionError, ssl.SSLError):
            self.close_connection = True

    # -- S3 ----------------------------------------------------------------
    def route(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        host = self.headers.get("Host", "").split(":")[0]
        path = url.path
        if host.count(".") >= 1 and not re.match(r"^[\d.]+$", host) and \
                host not in ("localhost",) and not host.startswith("s3."):
            path = "/" + host.split(".")[0] + path   # virtual-hosted style
        parts = path.lstrip("/").split("/", 1)
        bucket = unquote(parts[0]) or None
        key = unquote(parts[1]) if len(parts) > 1 and parts[1] else None
        segments = (key or "").split("/") + [bucket or ""]
        body = b""
        if self.command in ("PUT", "POST"):
            body = self.read_body()
        delay = fault(segments, "delay") or \
            int(self.headers.get("x-test-delay-ms") or 0)
        if fault(segments, "noanswer"):
            STOP.wait(60)
            self.close_connection = True
            return
        if delay:
            time.sleep(delay / 1000.0)
        if fault(segments, "slowdown"):
            return self.send(503, error_xml("SlowDown", "Please reduce your "
                                            "request rate.", self.path),
                             {"Content-Type": "application/xml"})
        try:
            return self.dispatch(bucket, key, query, body, segments)
        except KeyError:
            return self.send(404, error_xml("NoSuchBucket", "The specified "
                                            "bucket does not exist", bucket),
                             {"Content-Type": "application/xml"})

    def dispatch(self, bucket, key, q, body, segments):
        cmd = self.command
        xml = {"Content-Type": "application/xml"}
        if bucket is None:
            names = "".join("<Bucket><Name>%s</Name><CreationDate>"
                            "2026-01-01T00:00:00.000Z</CreationDate></Bucket>"
                            % escape(b) for b in sorted(STORE))
            return self.send(200, xml_response(
                "ListAllMyBucketsResult", "<Owner><ID>test</ID></Owner>"
                "<Buckets>%s</Buckets>" % names), xml)
        if key is None:
            return self.bucket_op(cmd, bucket, q, body, xml)
        objects = STORE[bucket]
        if "uploads" in q and cmd == "POST":
            upload = uuid.uuid4().hex
            UPLOADS[upload] = (bucket, key, {})
            return self.send(200, xml_response(
                "InitiateMultipartUploadResult",
                "<Bucket>%s</Bucket><Key>%s</Key><UploadId>%s</UploadId>" % (
                    escape(bucket), escape(key), upload)), xml)
        if "uploadId" in q:
            upload = q["uploadId"][0]
            if upload not in UPLOADS:
                return self.send(404, error_xml("NoSuchUpload", "no upload"),
                                 xml)
            if cmd == "PUT":
                UPLOADS[upload][2][int(q["partNumber"][0])] = body
                return self.send(200, b"", {"ETag": '"%s"' %
                                            hashlib.md5(body).hexdigest()})
            if cmd == "POST":
                _b, _k, parts = UPLOADS.pop(upload)
                data = b"".join(parts[n] for n in sorted(parts))
                objects[key] = (data, {})
                return self.send(200, xml_response(
                    "CompleteMultipartUploadResult",
                    "<Key>%s</Key><ETag>\"x\"</ETag>" % escape(key)), xml)
            if cmd == "DELETE":
                UPLOADS.pop(upload, None)
                return self.send(204)
            if cmd == "GET":
                return self.send(200, xml_response("ListPartsResult", ""), xml)
        if "tagging" in q:
            if key not in objects:
                return self.no_such_key(key)
            if cmd == "PUT":
                tags = dict(re.findall(rb"<Key>(.*?)</Key>\s*<Value>(.*?)"
                                       rb"</Value>", body))
                objects[key] = (objects[key][0], tags)
                return self.send(200)
            if cmd == "DELETE":
                objects[key] = (objects[key][0], {})
                return self.send(204)
            tags = "".join("<Tag><Key>%s</Key><Value>%s</Value></Tag>" % (
                k.decode(), v.decode()) for k, v in objects[key][1].items())
            return self.send(200, xml_response(
                "Tagging", "<TagSet>%s</TagSet>" % tags), xml)
        if cmd == "PUT":
            source = self.headers.get("x-amz-copy-source")
            if source:
                src = unquote(source.split("?")[0]).lstrip("/")
                sb, _s, sk = src.partition("/")
                if sk not in STORE.get(sb, {}):
                    return self.no_such_key(sk)
                objects[key] = (STORE[sb][sk][0], {})
                return self.send(200, xml_response(
                    "CopyObjectResult", "<ETag>\"x\"</ETag>"), xml)
            objects[key] = (body, {})
            return self.send(200, b"", {"ETag": '"%s"' %
                                        hashlib.md5(body).hexdigest()})
        if cmd in ("GET", "HEAD"):
            if key not in objects:
                return self.no_such_key(key)
            data = objects[key][0]
            headers = {"ETag": '"%s"' % hashlib.md5(data).hexdigest(),
                       "Content-Type": "application/octet-stream",
                       "Last-Modified": "Thu, 01 Jan 2026 00:00:00 GMT"}
            if cmd == "HEAD":
                headers["Content-Length"] = str(len(data))
            chunked = bool(fault(segments, "chunked"))
            return self.send(200, data, headers, chunked=chunked,
                             dribble_ms=fault(segments, "dribble") or 0,
                             hangup=bool(fault(segments, "hangup")))
        if cmd == "DELETE":
            objects.pop(key, None)
            return self.send(204)
        return self.send(405, error_xml("MethodNotAllowed", "no"), xml)

    def no_such_key(self, key):
        return self.send(404, error_xml("NoSuchKey", "The specified key does"
                                        " not exist.", key),
                         {"Content-Type": "application/xml"})

    def bucket_op(self, cmd, bucket, q, body, xml):
        if cmd == "PUT":
            STORE.setdefault(bucket, {})
            return self.send(200, b"", {"Location": "/" + bucket})
        if cmd == "HEAD":
            return self.send(200 if bucket in STORE else 404)
        if cmd == "DELETE":
            if STORE.get(bucket):
                return self.send(409, error_xml("BucketNotEmpty", "not empty",
                                                bucket), xml)
            STORE.pop(bucket, None)
            return self.send(204)
        objects = STORE[bucket]
        if cmd == "POST" and "delete" in q:
            keys = [unquote(k.decode()) for k in
                    re.findall(rb"<Key>(.*?)</Key>", body)]
            for k in keys:
                objects.pop(k, None)
            done = "".join("<Deleted><Key>%s</Key></Deleted>" % escape(k)
                           for k in keys)
            return self.send(200, xml_response("DeleteResult", done), xml)
        if cmd == "GET" and "location" in q:
            return self.send(200, xml_response("LocationConstraint", ""), xml)
        if cmd == "GET" and "uploads" in q:
            return self.send(200, xml_response(
                "ListMultipartUploadsResult", "<Bucket>%s</Bucket>" %
                escape(bucket)), xml)
        if cmd == "GET" and "versions" in q:
            return self.send(200, xml_response(
                "ListVersionsResult", "<Name>%s</Name>" % escape(bucket)), xml)
        if cmd == "GET":
            return self.list_objects(bucket, objects, q, xml)
        return self.send(405, error_xml("MethodNotAllowed", "no"), xml)

    def list_objects(self, bucket, objects, q, xml):
        prefix = q.get("prefix", [""])[0]
        limit = int(q.get("max-keys", ["1000"])[0])
        after = q.get("continuation-token", q.get("start-after",
                                                  q.get("marker", [""])))[0]
        keys = sorted(k for k in objects if k.startswith(prefix) and k > after)
        page, more = keys[:limit], len(keys) > limit
        items = "".join(
            "<Contents><Key>%s</Key><LastModified>2026-01-01T00:00:00.000Z"
            "</LastModified><ETag>\"x\"</ETag><Size>%d</Size><StorageClass>"
            "STANDARD</StorageClass></Contents>" % (escape(k),
                                                    len(objects[k][0]))
            for k in page)
        extra = ""
        if more:
            extra = "<NextContinuationToken>%s</NextContinuationToken>" \
                "<NextMarker>%s</NextMarker>" % (escape(page[-1]),
                                                 escape(page[-1]))
        body = "<Name>%s</Name><Prefix>%s</Prefix><KeyCount>%d</KeyCount>" \
            "<MaxKeys>%d</MaxKeys><IsTruncated>%s</IsTruncated>%s%s" % (
                escape(bucket), escape(prefix), len(page), limit,
                "true" if more else "false", items, extra)
        return self.send(200, xml_response("ListBucketResult", body), xml)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = route


def decode_aws_chunked(data):
    out, pos = b"", 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            break
        out += data[end + 2:end + 2 + size]
        pos = end + 2 + size + 2
    return out


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--addr", default="127.0.0.1")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--plain", action="store_true",
                        help="serve plain HTTP instead of HTTPS")
    args = parser.parse_args()
    server = Server((args.addr, args.port), Handler)
    if not args.plain:
        cert, key = args.cert, args.key
        if not cert:
            cert, key = make_certificate(tempfile.mkdtemp(prefix="s3test"))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True,
                                             do_handshake_on_connect=False)
    sys.stdout.write("READY %d\n" % server.server_address[1])
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        STOP.set()


if __name__ == "__main__":
    main()
