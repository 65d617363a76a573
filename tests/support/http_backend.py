#!/usr/bin/env python3
"""Stand-in HTTP backend: answers every GET with JSON naming itself and echoing the
X-Forwarded-* headers it received. Usage: http_backend.py NAME ADDRESS PORT"""
import json
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({
            "backend": self.server.name,
            "path": self.path,
            "xff": self.headers.get("X-Forwarded-For"),
            "xfh": self.headers.get("X-Forwarded-Host"),
            "xfp": self.headers.get("X-Forwarded-Proto"),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class Server(ThreadingHTTPServer):
    def __init__(self, name, addr):
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, Handler)
        self.name = name


if __name__ == "__main__":
    Server(sys.argv[1], (sys.argv[2], int(sys.argv[3]))).serve_forever()
