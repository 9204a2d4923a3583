"""The distribution's nginx as a fast local HTTPS server (loads, benchmarks).

Serves /small (3 bytes) and /1m (1 MiB) on 127.0.0.1 with keep-alive and a
self-signed certificate, from a private prefix; stop() removes it.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

CONFIG = """worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {prefix}/cert.pem;
        ssl_certificate_key {prefix}/key.pem;
        root {prefix}/www;
        location = /small {{ return 200 "ok\\n"; }}
    }}
}}
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NginxServer:
    def __init__(self, binary="nginx"):
        self.prefix = tempfile.mkdtemp(prefix="s3slower-nginx")
        self.port = free_port()
        os.makedirs(os.path.join(self.prefix, "www"))
        with open(os.path.join(self.prefix, "www", "1m"), "wb") as f:
            f.write(os.urandom(1 << 20))
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
             "-keyout", os.path.join(self.prefix, "key.pem"), "-out",
             os.path.join(self.prefix, "cert.pem"), "-days", "2", "-subj",
             "/CN=localhost"], check=True, capture_output=True)
        self.config = os.path.join(self.prefix, "nginx.conf")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(prefix=self.prefix, port=self.port))
        self.binary = binary
        subprocess.run([binary, "-c", self.config, "-p", self.prefix],
                       check=True, capture_output=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                time.sleep(0.05)
        self.url = "https://127.0.0.1:%d" % self.port

    def stop(self):
        subprocess.run([self.binary, "-c", self.config, "-p", self.prefix,
                        "-s", "stop"], capture_output=True)
        time.sleep(0.2)
        shutil.rmtree(self.prefix, ignore_errors=True)
