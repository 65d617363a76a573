#!/usr/bin/env python3
"""Fixed-rate client of new TLS requests, and a watch-like long-lived client.

  tls_client.py rate ADDRESS PORT INTERVAL_MS DURATION_S
      Starts a new TLS connection with one `GET /` every INTERVAL_MS (each in its own thread,
      so a hanging one does not slow the rate) for DURATION_S. Prints one line per request:
      "<start epoch ms> <ok|fail> <backend name or reason>". Certificates are not verified.
  tls_client.py watch ADDRESS PORT NAME_FILE
      `GET /watch`, writes the first streamed line (the backend's name) to NAME_FILE, then
      reads until the stream ends and prints "ended <epoch ms>". Exit 0 when it ended.
  tls_client.py watches ADDRESS PORT N DIR
      N watches like kubelets': each reconnects 0.2 s after its stream ends and keeps the name
      of the backend it is on now in DIR/<i>. Runs until killed.
"""
import os
import socket
import ssl
import sys
import threading
import time

CTX = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE


def now_ms() -> int:
    return int(time.time() * 1000)


def get(addr: str, port: int, path: str, timeout: float):
    raw = socket.create_connection((addr, port), timeout=timeout)
    s = CTX.wrap_socket(raw)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
    return s


def one(addr: str, port: int, out: list, lock: threading.Lock) -> None:
    start = now_ms()
    try:
        s = get(addr, port, "/", 2.0)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1].decode() if head else "none"
        line = f"{start} ok {body.decode().strip()}" if status == "200" else f"{start} fail status-{status}"
    except (OSError, IndexError) as e:
        line = f"{start} fail {type(e).__name__}"
    with lock:
        out.append(line)


def rate(addr: str, port: int, interval_ms: int, duration_s: float) -> int:
    out, lock, threads = [], threading.Lock(), []
    end = time.monotonic() + duration_s
    nxt = time.monotonic()
    while nxt < end:
        t = threading.Thread(target=one, args=(addr, port, out, lock), daemon=True)
        t.start()
        threads.append(t)
        nxt += interval_ms / 1000
        time.sleep(max(0.0, nxt - time.monotonic()))
    for t in threads:
        t.join(5)
    for line in sorted(out):
        print(line)
    return 0


def watch(addr: str, port: int, name_file: str) -> int:
    s = get(addr, port, "/watch", 10.0)
    s.settimeout(30)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            return 1
        buf += chunk
    body = buf.split(b"\r\n\r\n", 1)[1]
    while b"\n" not in body:
        chunk = s.recv(4096)
        if not chunk:
            return 1
        body += chunk
    with open(name_file, "w") as f:
        f.write(body.split(b"\n", 1)[0].decode())
    try:
        while s.recv(4096):
            pass
    except OSError:
        pass
    print(f"ended {now_ms()}")
    return 0


def keep_watching(addr: str, port: int, path: str) -> None:
    while True:
        try:
            s = get(addr, port, "/watch", 5.0)
            s.settimeout(30)
            buf = b""
            while b"\r\n\r\n" not in buf or b"\n" not in buf.split(b"\r\n\r\n", 1)[1]:
                chunk = s.recv(4096)
                if not chunk:
                    raise OSError("closed")
                buf += chunk
            name = buf.split(b"\r\n\r\n", 1)[1].split(b"\n", 1)[0].decode()
            with open(path + ".new", "w") as f:
                f.write(name + "\n")
            os.rename(path + ".new", path)
            while s.recv(4096):
                pass
        except OSError:
            pass
        try:
            os.unlink(path)
        except OSError:
            pass
        time.sleep(0.2)


def watches(addr: str, port: int, n: int, out_dir: str) -> int:
    for i in range(n):
        threading.Thread(target=keep_watching, args=(addr, port, f"{out_dir}/{i}"), daemon=True).start()
        time.sleep(0.02)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "watches":
        sys.exit(watches(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
    if mode == "rate":
        sys.exit(rate(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
    sys.exit(watch(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
