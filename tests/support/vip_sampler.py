#!/usr/bin/env python3
"""Samples which namespaces hold an address, every INTERVAL ms, until SIGTERM.

One NETLINK_ROUTE socket per namespace is opened inside it (setns) and kept, so each
sample is one RTM_GETADDR dump per namespace: no process forks, ~0.1 ms a sample.
Usage: vip_sampler.py ADDRESS INTERVAL_MS OUT_FILE NETNS...
OUT_FILE gets one line per sample: "<ms since start> <holder,holder|->".
On exit prints "samples=N max_holders=M double_samples=K" on stdout.
A lost output file or namespace (the test's work dir or namespaces removed under it, e.g. by
the cleanup of a test that died) is reported in one line on stderr, exit status 2, never a
traceback; then the summary is not printed, so a check reading it fails.
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


class Lost(Exception):
    """Something the sampler needs went away; the message says what."""


def open_out(path: str):
    try:
        return open(path, "w", buffering=1)
    except OSError as e:
        raise Lost(f"cannot write {path}: {e.strerror}") from None


def open_sockets(names: list) -> list:
    socks = []
    for n in names:
        try:
            socks.append(socket_in(n))
        except OSError as e:
            raise Lost(f"cannot open a netlink socket in namespace {n}: {e.strerror or e}") from None
    return socks


def check_out(out, path: str) -> None:
    """The output file must still have a name: a test that removed it is gone or broken."""
    try:
        gone = os.fstat(out.fileno()).st_nlink == 0
    except OSError:
        gone = True
    if gone:
        raise Lost(f"output file {path} was removed while sampling (the test's work dir is gone)")


def main() -> None:
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    try:
        run()
    except Lost as e:
        print(f"vip_sampler: {e}; stopping", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    addr = ipaddress.ip_address(sys.argv[1])
    interval = int(sys.argv[2]) / 1000
    path = sys.argv[3]
    out = open_out(path)
    names = sys.argv[4:]
    socks = open_sockets(names)
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
        try:
            holders = [n for n, s in zip(names, socks) if holds(s, want, family, seq)]
        except OSError as e:
            raise Lost(f"netlink dump failed: {e.strerror or e}") from None
        t = (time.monotonic() - start) * 1000
        try:
            out.write(f"{t:.1f} {','.join(holders) or '-'}\n")
        except OSError as e:
            raise Lost(f"cannot write {path}: {e.strerror}") from None
        samples += 1
        if samples % 50 == 0:
            check_out(out, path)
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
