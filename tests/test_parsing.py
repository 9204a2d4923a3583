"""HTTP and S3 parsing: pure functions, no root needed."""

import random
from urllib.parse import unquote

import pytest
from hypothesis import given, settings, strategies as st

import s3slower as s


def reference_headers(head):
    """Every complete header line of a head, parsed the slow, obvious way,
    reduced to the ones the tool reads (the last of a repeated name wins)."""
    lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    if not head.split(b"\r\n\r\n", 1)[1:]:
        lines = lines[:-1]          # cut short: the last line is not whole
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.decode("latin-1").partition(":")
        if sep and name.rstrip(" \t").lower() in s.WANTED_HEADERS and \
                name == name.lstrip():
            headers[name.rstrip(" \t").lower()] = value.strip(" \t")
    return headers


def found(fields):
    """{name: value} of the wanted headers a head's fields give, each
    asked for both ways."""
    values = {name: fields.get(name) for name in s.WANTED_HEADERS}
    assert all((values[name] is not None) == (name in fields)
               for name in s.WANTED_HEADERS)
    return {name: value for name, value in values.items()
            if value is not None}


@pytest.mark.parametrize("seed", range(40))
def test_heads_generated(seed):
    """Heads of random header sets, names in any case, odd spacing, cut
    anywhere: the headers read are those a full parse finds, and nothing
    from the body."""
    rng = random.Random(seed)
    names = list(s.WANTED_HEADERS) + ["content-length", "x-amz-date",
                                      "hostile", "x-host", "etag", "date"]
    for _ in range(50):
        lines = []
        for _ in range(rng.randrange(12)):
            name = "".join(c.upper() if rng.random() < 0.3 else c
                           for c in rng.choice(names))
            value = "".join(rng.choice("ab9/:;.- \t") for _ in
                            range(rng.randrange(20))).strip(" \t")
            lines.append("%s%s:%s%s" % (name, rng.choice(["", " ", "\t"]),
                                        rng.choice(["", " ", "  "]), value))
        method = rng.choice(s.HTTP_METHODS)
        body = b"\r\nhost: from-the-body\r\n\r\n"
        request = ("%s /b/k?x=1 HTTP/1.1\r\n" % method +
                   "".join(line + "\r\n" for line in lines) +
                   "\r\n").encode("latin-1")
        response = b"HTTP/1.1 200 OK" + request[request.index(b"\r\n"):]
        # What the kernel keeps: a whole head and what follows it, or a
        # head cut short at the capture's end.
        for cut in {len(request), rng.randrange(len(request) + 1)}:
            tail = body if cut == len(request) else b""
            head = s.parse_request_head(request[:cut] + tail)
            if cut < request.index(b"\r\n") + 2:
                assert head is None     # no whole request line
                continue
            assert (head.method, head.target) == (method, "/b/k?x=1")
            assert found(head.headers) == \
                reference_headers(request[:cut] + tail), request[:cut]
            cut += len(response) - len(request)
            assert found(s.response_headers(response[:cut] + tail)) == \
                reference_headers(response[:cut] + tail)


def test_heads_refused():
    assert s.parse_request_head(b"PUT /b/k HTTP/1.1") is None
    assert s.parse_request_head(b"\x16\x03\x01garbage\r\n\r\n") is None
    assert s.parse_request_head(b"FETCH /b HTTP/1.1\r\n\r\n") is None
    assert s.response_headers(b"ICY 200 OK\r\n\r\n") is None


@pytest.mark.parametrize("target, expected", [
    ("/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2026"
     "&X-Amz-Signature=abcdef&X-Amz-Security-Token=tok&x-id=GetObject",
     "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=REDACTED"
     "&X-Amz-Signature=REDACTED&X-Amz-Security-Token=REDACTED&x-id=GetObject"),
    ("/b/k?AWSAccessKeyId=AKIA&Signature=sig%2B&Expires=1",
     "/b/k?AWSAccessKeyId=REDACTED&Signature=REDACTED&Expires=1"),
    ("/b/k?x-amz-signature=lower", "/b/k?x-amz-signature=REDACTED"),
    ("/b/k", "/b/k"),
    ("/b/k?uploads", "/b/k?uploads"),
])
def test_redact_target(target, expected):
    assert s.redact_target(target) == expected


def reference_redact(target):
    """Every query taken apart, no shortcut."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    return path + "?" + "&".join(
        name + "=REDACTED" if eq and unquote(name).lower() in
        s.SECRET_PARAMS else name + eq + value
        for name, eq, value in (p.partition("=") for p in query.split("&")))


@pytest.mark.parametrize("seed", range(20))
def test_redact_generated(seed):
    """Queries of secret and other names, in any case, any of their bytes
    percent-encoded, values with escapes ('%26', '%3D' too): what the
    shortcut lets through is what a full parse gives."""
    rng = random.Random(seed)
    names = sorted(s.SECRET_PARAMS) + ["prefix", "x-id", "uploads",
                                       "tokens", "xsig", "list-type"]

    def spell(text):
        return "".join("%%%02X" % ord(c) if rng.random() < 0.15 else
                       c.upper() if rng.random() < 0.3 else c for c in text)
    for _ in range(300):
        params = []
        for _ in range(rng.randrange(1, 6)):
            name = spell(rng.choice(names))
            value = "".join(rng.choice(["a", "9", "%2F", "%26", "%3D", "=",
                                        "%"]) for _ in range(rng.randrange(5)))
            params.append(name + rng.choice(["=", "=", ""]) + value
                          if rng.random() < 0.9 else name)
        target = "/b/k?" + "&".join(params)
        assert s.redact_target(target) == reference_redact(target), target


def test_escape_text_keeps_one_line():
    assert s.escape_text("a\x1b[31m\r\nb\\") == "a\\x1b[31m\\x0d\\x0ab\\x5c"
    assert s.escape_text("ok/path é") == "ok/path é"


@pytest.mark.parametrize("host, target, endpoint, bucket, key", [
    ("s3.amazonaws.com", "/mybucket/a/b.txt", "s3.amazonaws.com",
     "mybucket", "a/b.txt"),
    ("mybucket.s3.amazonaws.com", "/a/b.txt", "s3.amazonaws.com",
     "mybucket", "a/b.txt"),
    ("my.dotted.bucket.s3.us-west-2.amazonaws.com", "/k",
     "s3.us-west-2.amazonaws.com", "my.dotted.bucket", "k"),
    ("bkt.s3-us-west-2.amazonaws.com", "/k", "s3-us-west-2.amazonaws.com",
     "bkt", "k"),
    ("s3.us-west-2.amazonaws.com", "/", "s3.us-west-2.amazonaws.com",
     None, None),
    ("bkt.s3.minio.example.com:9000", "/x%20y", "s3.minio.example.com:9000",
     "bkt", "x y"),
    ("minio.example.com:9000", "/bkt/dir/obj%2Bplus", "minio.example.com:9000",
     "bkt", "dir/obj+plus"),
    ("127.0.0.1:8443", "/bkt/k?uploads", "127.0.0.1:8443", "bkt", "k"),
    ("[::1]:8443", "/bkt", "[::1]:8443", "bkt", None),
    ("[2001:db8::1]", "/bkt/k", "[2001:db8::1]", "bkt", "k"),
    ("10.0.0.5", "/", "10.0.0.5", None, None),
])
def test_s3_target_styles(host, target, endpoint, bucket, key):
    t = s.s3_target(host, target)
    assert (t.endpoint, t.bucket, t.key) == (endpoint, bucket, key)


OPS = [
    ("GET", "/b/k", {}, "GetObject"),
    ("PUT", "/b/k", {}, "PutObject"),
    ("HEAD", "/b/k", {}, "HeadObject"),
    ("DELETE", "/b/k", {}, "DeleteObject"),
    ("POST", "/b?delete", {}, "DeleteObjects"),
    ("PUT", "/b/k", {"x-amz-copy-source": "/a/b"}, "CopyObject"),
    ("GET", "/b?list-type=2&prefix=a", {}, "ListObjectsV2"),
    ("GET", "/b?prefix=a", {}, "ListObjects"),
    ("GET", "/b?versions", {}, "ListObjectVersions"),
    ("GET", "/", {"authorization": "AWS4-HMAC-SHA256 x"}, "ListBuckets"),
    ("HEAD", "/b", {}, "HeadBucket"),
    ("PUT", "/b", {}, "CreateBucket"),
    ("DELETE", "/b", {}, "DeleteBucket"),
    ("GET", "/b?location", {}, "GetBucketLocation"),
    ("POST", "/b/k?uploads", {}, "CreateMultipartUpload"),
    ("PUT", "/b/k?partNumber=1&uploadId=u", {}, "UploadPart"),
    ("PUT", "/b/k?partNumber=1&uploadId=u", {"x-amz-copy-source": "/a/b"},
     "UploadPartCopy"),
    ("POST", "/b/k?uploadId=u", {}, "CompleteMultipartUpload"),
    ("DELETE", "/b/k?uploadId=u", {}, "AbortMultipartUpload"),
    ("GET", "/b/k?uploadId=u", {}, "ListParts"),
    ("GET", "/b?uploads", {}, "ListMultipartUploads"),
    ("GET", "/b/k?tagging", {}, "GetObjectTagging"),
    ("PUT", "/b/k?tagging", {}, "PutObjectTagging"),
    ("DELETE", "/b/k?tagging", {}, "DeleteObjectTagging"),
    ("GET", "/b/k?acl", {}, "GetObjectAcl"),
    ("PUT", "/b/k?acl", {}, "PutObjectAcl"),
    ("GET", "/b?policy", {}, "GetBucketPolicy"),
    ("PUT", "/b?policy", {}, "PutBucketPolicy"),
    ("POST", "/b", {"content-type": "multipart/form-data; boundary=x"},
     "PostObject"),
    ("POST", "/b/k?restore", {}, "RestoreObject"),
    ("POST", "/b/k?select&select-type=2", {}, "SelectObjectContent"),
    ("POST", "/b/k", {}, None),
    ("OPTIONS", "/b/k", {}, None),
]


@pytest.mark.parametrize("method, target, headers, op", OPS)
def test_s3_operation_table(method, target, headers, op):
    t = s.s3_target("s3.example.com", target)
    assert s.s3_operation(method, t, headers) == op
    assert op is None or op in s.S3_OPERATIONS


def test_s3_error_code():
    body = b"<?xml version='1.0'?><Error><Code>SlowDown</Code></Error>"
    assert s.s3_error_code(body) == "SlowDown"
    assert s.s3_error_code(b"<Code>bad code with spaces</Code>") is None
    assert s.s3_error_code(b"") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_parsers_never_raise(data):
    s.parse_request_head(data)
    s.response_headers(data)
    s.s3_error_code(data)
    text = data.decode("latin-1")
    s.redact_target(text)
    s.escape_text(text)
    t = s.s3_target(text[:40], text)
    s.s3_operation("GET", t, {})


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_escaped_text_has_no_control_characters(text):
    out = s.escape_text(text)
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f for c in out)
