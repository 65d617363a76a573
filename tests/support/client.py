#!/usr/bin/env python3
"""Test client: connect, send a payload, half-close, print the backend's answer.

Usage: client.py ADDRESS PORT [PAYLOAD_BYTES] [TIMEOUT_S]
Prints the answer line, or "CLOSED" if the server closed without answering,
or "ERROR <reason>"; prints the elapsed ms on stderr. Exit 0 only on an answer.
"""
import socket
import sys
import time


def main() -> int:
    address, port = sys.argv[1], int(sys.argv[2])
    payload = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
    start = time.monotonic()
    try:
        with socket.create_connection((address, port), timeout=timeout) as s:
            s.sendall(b"x" * payload)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        print(f"ERROR {e}")
        print(f"{(time.monotonic() - start) * 1000:.0f}", file=sys.stderr)
        return 1
    print(f"{(time.monotonic() - start) * 1000:.0f}", file=sys.stderr)
    if not data:
        print("CLOSED")
        return 1
    print(data.decode().strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
