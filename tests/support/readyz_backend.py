#!/usr/bin/env python3
"""Stand-in kube-apiserver for health tests: HTTPS on ADDRESS:PORT with CERT/KEY.

Usage: readyz_backend.py NAME ADDRESS PORT CERT KEY STATE_FILE    (ADDRESS: IPv4 or IPv6)

STATE_FILE holds "ready" or "unready" (missing: ready) and is read on every request, so a test
can flip the backend's state without restarting it:
  GET /readyz  ready: 200 "ok"; unready: 500 (what an API server whose etcd is gone answers)
  GET /watch   200, then NAME and a newline every 100 ms until the client goes (a watch)
  GET other    ready: 200 NAME; unready: 503
"""
import socket
import ssl
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def ready(self) -> bool:
        try:
            with open(self.server.state_file) as f:
                return f.read().strip() != "unready"
        except OSError:
            return True

    def answer(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def do_GET(self) -> None:
        name = self.server.name.encode()
        if self.path == "/readyz":
            if self.ready():
                self.answer(200, b"ok")
            else:
                self.answer(500, b"[-]etcd failed: reason withheld\nreadyz check failed")
        elif self.path == "/watch":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                while True:
                    self.wfile.write(name + b"\n")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        elif self.ready():
            self.answer(200, name)
        else:
            self.answer(503, b"etcd unavailable")

    def log_message(self, *args) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, name, addr, cert, key, state_file):
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, Handler)
        self.name = name
        self.state_file = state_file
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        # The handshake happens in the request's thread, not in accept: a slow or silent client
        # must not stall the others.
        self.socket = ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request, client_address) -> None:
        pass  # aborted handshakes and resets are part of the tests


if __name__ == "__main__":
    name, addr, port, cert, key, state = sys.argv[1:7]
    socket.setdefaulttimeout(None)
    Server(name, (addr, int(port)), cert, key, state).serve_forever()
