#!/usr/bin/env python3
"""Stand-in kube-apiserver for load-balancer tests (Python standard library only).

No kube-apiserver binary is available offline, so this answers the few
requests that health checks and `kubectl version` make, over TLS, the way the
apiserver does:

  GET /version            the apiserver's version JSON; gitVersion carries the
                          backend's name as semver build metadata
                          (v1.20.15+backend1)
  GET /healthz /readyz /livez   "ok"
  GET /whoami             the backend's name
  GET /api, /apis         minimal discovery documents
  anything else           404 with a Kubernetes Status object

Every response has an "X-Backend: NAME" header, so a test can tell which
backend the VIP sent it to.

  fake-apiserver.py --name backend1 --address 10.213.0.21 --port 6444 \
      --cert server.crt --key server.key

Prints "listening on ADDRESS:PORT" once ready; logs one line per request.
"""

import argparse
import json
import signal
import socket
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

K8S_VERSION = {
    "major": "1",
    "minor": "20",
    "gitVersion": "v1.20.15",
    "gitCommit": "8f1e5bf0b9729a899b8df86249b56e2c74aebc55",
    "gitTreeState": "clean",
    "buildDate": "2022-01-19T17:23:01Z",
    "goVersion": "go1.15.15",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def make_handler(name, advertise):
    version = dict(K8S_VERSION, gitVersion="%s+%s" % (K8S_VERSION["gitVersion"], name))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the real server

        def version_string(self):
            return "fake-kube-apiserver"

        def _send(self, code, body, ctype):
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-cache, private")
            self.send_header("X-Backend", name)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _json(self, code, obj):
            self._send(code, json.dumps(obj, indent=2) + "\n", "application/json")

        def do_GET(self):
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path == "/version":
                self._json(200, version)
            elif path in ("/healthz", "/readyz", "/livez"):
                self._send(200, "ok", "text/plain; charset=utf-8")
            elif path == "/whoami":
                self._send(200, name + "\n", "text/plain; charset=utf-8")
            elif path == "/api":
                self._json(200, {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": advertise}],
                })
            elif path == "/apis":
                self._json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
            else:
                self._json(404, {
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure",
                    "message": "the server could not find the requested resource",
                    "reason": "NotFound", "details": {}, "code": 404,
                })

        do_HEAD = do_GET

        def log_message(self, fmt, *args):
            sys.stderr.write("%s %s %s\n" % (name, self.client_address[0], fmt % args))
            sys.stderr.flush()

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # Load-balancer health checks connect and close without TLS: one short
        # line instead of a traceback.
        err = sys.exc_info()[1]
        sys.stderr.write("connection from %s: %s\n" % (client_address[0], err))
        sys.stderr.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="backend name (X-Backend header)")
    p.add_argument("--address", default="0.0.0.0")
    p.add_argument("--port", type=int, default=6444)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    a = p.parse_args()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    # kubectl offers h2 first; this server speaks HTTP/1.1 only.
    ctx.set_alpn_protocols(["http/1.1"])

    httpd = Server((a.address, a.port), make_handler(a.name, "%s:%d" % (a.address, a.port)))
    # Handshake in the request thread (on first read), not in accept(): a
    # client that connects and stalls must not block the others.
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True,
                                   do_handshake_on_connect=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("listening on %s:%d as %s" % (a.address, a.port, a.name), flush=True)
    try:
        httpd.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        httpd.server_close()


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    main()
