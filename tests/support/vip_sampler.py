#!/usr/bin/env python3
"""Samples which namespaces hold an address, every INTERVAL ms, until SIGTERM.

One NETLINK_ROUTE socket per namespace is opened inside it (setns) and kept, so each
sample is one RTM_GETADDR dump per namespace: no process forks, ~0.1 ms a sample.
Usage: vip_sampler.py ADDRESS INTERVAL_MS OUT_FILE NETNS...
OUT_FILE gets one line per sample: "<ms since start> <holder,holder|->".
On exit prints "samples=N max_holders=M double_samples=K" on stdout.
"""
import ctypes
import ipaddress
import os
import signal
import socket
import struct
import sys
import time

RTM_GETADDR, RTM_NEWADDR, NLMSG_DONE, NLMSG_ERROR = 22, 20, 3, 2
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
CLONE_NEWNET = 0x40000000

libc = ctypes.CDLL(None, use_errno=True)


def socket_in(ns: str) -> socket.socket:
    here = os.open("/proc/self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(there, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        s.bind((0, 0))
    finally:
        libc.setns(here, CLONE_NEWNET)
        os.close(here)
        os.close(there)
    return s


def holds(s: socket.socket, want: bytes, family: int, seq: int) -> bool:
    req = struct.pack("=IHHII", 16 + 8, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    req += struct.pack("=BBBBI", family, 0, 0, 0, 0)
    s.send(req)
    found = False
    while True:
        data = s.recv(65536)
        off = 0
        while off + 16 <= len(data):
            length, typ, _, _, _ = struct.unpack_from("=IHHII", data, off)
            if typ == NLMSG_DONE or typ == NLMSG_ERROR:
                return found
            if typ == RTM_NEWADDR:
                a = off + 16 + 8
                end = off + length
                while a + 4 <= end:
                    alen, atyp = struct.unpack_from("=HH", data, a)
                    if alen < 4:
                        break
                    if atyp in (IFA_ADDRESS, IFA_LOCAL) and data[a + 4:a + alen] == want:
                        found = True
                    a += (alen + 3) & ~3
            off += (length + 3) & ~3


def main() -> None:
    addr = ipaddress.ip_address(sys.argv[1])
    interval = int(sys.argv[2]) / 1000
    out = open(sys.argv[3], "w", buffering=1)
    names = sys.argv[4:]
    socks = [socket_in(n) for n in names]
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    want = addr.packed
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    start = time.monotonic()
    samples = max_holders = doubles = 0
    seq = 0
    next_t = start
    while not stop:
        seq += 1
        holders = [n for n, s in zip(names, socks) if holds(s, want, family, seq)]
        t = (time.monotonic() - start) * 1000
        out.write(f"{t:.1f} {','.join(holders) or '-'}\n")
        samples += 1
        max_holders = max(max_holders, len(holders))
        doubles += len(holders) > 1
        next_t += interval
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_t = time.monotonic()
    print(f"samples={samples} max_holders={max_holders} double_samples={doubles}")


if __name__ == "__main__":
    main()
