#!/usr/bin/env python3
"""Wait for the first successful HTTPS request to a URL; print when it ended.

    wait-https.py URL CA_FILE TIMEOUT [INTERVAL]

Starts a GET every INTERVAL seconds (default 0.05), each in its own thread
with a 0.5 s connect timeout, so that a SYN lost while nobody answers ARP for
the address yet does not hold up the next try. The first response with
status 200 (the certificate verified against CA_FILE) wins: prints its end
time (seconds since the epoch, 3 decimals) and the X-Backend header, and
exits 0. Exits 1 after TIMEOUT seconds.

Used to time appliance boots (QEMU start -> VIP serving): one light process
instead of a curl every few milliseconds, which would take CPU away from the
emulated machines being timed.
"""

import http.client
import ssl
import sys
import threading
import time
import urllib.parse


def main():
    url, ca, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    interval = float(sys.argv[4]) if len(sys.argv) > 4 else 0.05
    u = urllib.parse.urlsplit(url)
    ctx = ssl.create_default_context(cafile=ca)
    done = threading.Event()
    lock = threading.Lock()
    result = []

    def attempt():
        conn = http.client.HTTPSConnection(u.hostname, u.port or 443, context=ctx, timeout=0.5)
        try:
            conn.connect()
            conn.sock.settimeout(5)
            conn.request("GET", u.path or "/")
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                with lock:
                    if not result:
                        result.append((time.time(), r.getheader("X-Backend", "-")))
                        done.set()
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()

    end = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < end:
        threading.Thread(target=attempt, daemon=True).start()
        done.wait(interval)
    if not result:
        sys.exit(1)
    print("%.3f %s" % result[0])


if __name__ == "__main__":
    main()
