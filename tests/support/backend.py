#!/usr/bin/env python3
"""Stand-in TCP backend for the namespace tests.

Each connection: read until the client half-closes (EOF), then answer
"<name> <bytes received>\n" and close. Reading to EOF before answering is what
proves the proxy forwards a half-close instead of tearing the connection down.
Usage: backend.py NAME ADDRESS PORT
"""
import socket
import sys
import threading


def handle(conn: socket.socket, name: str) -> None:
    with conn:
        conn.settimeout(10)
        total = 0
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                total += len(chunk)
            conn.sendall(f"{name} {total}\n".encode())
        except OSError:
            pass


def main() -> None:
    name, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((address, port))
    srv.listen(128)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn, name), daemon=True).start()


if __name__ == "__main__":
    main()
