#!/usr/bin/env python3
"""Connects to ADDRESS:PORT again and again until SIGTERM or DURATION_S, and logs each try.

Each try: connect (timeout TIMEOUT_MS), send a byte, half-close, read the answer.
Out file lines: "<epoch ms at start of try> <ok|fail> <ms taken> <answer or error>".
Usage: probe.py ADDRESS PORT TIMEOUT_MS GAP_MS DURATION_S OUT_FILE [http]
With "http" the byte sent is an HTTP/1.0 request line instead (for HTTP backends that close a
connection without answering anything else).
"""
import signal
import socket
import sys
import time


def main() -> None:
    addr, port = sys.argv[1], int(sys.argv[2])
    timeout = int(sys.argv[3]) / 1000
    gap = int(sys.argv[4]) / 1000
    deadline = time.monotonic() + float(sys.argv[5])
    try:
        out = open(sys.argv[6], "w", buffering=1)
    except OSError as e:
        # The test's work dir is gone (a test that died and cleaned up): say so, no traceback.
        sys.exit(f"probe: cannot write {sys.argv[6]}: {e.strerror}")
    payload = b"GET / HTTP/1.0\r\n\r\n" if sys.argv[7:] == ["http"] else b"x"
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop and time.monotonic() < deadline:
        t0 = time.time()
        m0 = time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=timeout) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                data = s.recv(256)
            res = ("ok", data.decode(errors="replace").split(" ")[0]) if data else ("fail", "closed")
        except OSError as e:
            res = ("fail", type(e).__name__)
        took = (time.monotonic() - m0) * 1000
        out.write(f"{t0 * 1000:.1f} {res[0]} {took:.1f} {res[1]}\n")
        if res[0] == "fail" or gap > 0:
            time.sleep(gap if gap > 0 else 0.005)


if __name__ == "__main__":
    main()
