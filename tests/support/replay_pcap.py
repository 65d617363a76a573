#!/usr/bin/env python3
"""Replays the dialer side of Raft connections captured in a pcap: for every TCP stream from
SRC_IP to PORT that begins with a Hello, connect to its original destination again (run this
in SRC_IP's namespace, so the source address is the real peer's) and send the captured bytes
unchanged, then print what came back (one line per stream: answer variants, or how it ended;
"tagged-frame" means the replay was accepted).

usage: replay_pcap.py PCAP SRC_IP PORT [MAX_STREAMS]
Reads classic pcap (tcpdump -w) with Ethernet framing, IPv4 only. Exit status 2 if no stream
with a Hello was found (the capture missed the handshakes), else 0.
"""
import json
import socket
import struct
import sys

# One reader of length-prefixed frames, shared with the rogue peer.
from rogue_peer import read_raw as read_frame


def streams(path, port):
    data = open(path, "rb").read()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    off, out, order = 24, {}, []
    while off + 16 <= len(data):
        _, _, caplen, _ = struct.unpack(endian + "IIII", data[off:off + 16])
        pkt = data[off + 16:off + 16 + caplen]
        off += 16 + caplen
        if len(pkt) < 14 + 20 or pkt[12:14] != b"\x08\x00":
            continue
        ip = pkt[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6:
            continue
        total = struct.unpack(">H", ip[2:4])[0]
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack(">HHI", tcp[:8])
        doff = (tcp[12] >> 4) * 4
        payload = tcp[doff:]
        if dport != port or not payload:
            continue
        key = (socket.inet_ntoa(ip[12:16]), sport, socket.inet_ntoa(ip[16:20]))
        if key not in out:
            out[key] = {}
            order.append(key)
        out[key].setdefault(seq, payload)  # retransmissions: keep the first copy
    for key in order:
        segs = out[key]
        yield key[0], key[2], b"".join(segs[s] for s in sorted(segs))


def main():
    path, src, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    limit = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    found = 0
    for frm, host, stream in streams(path, port):
        if frm != src or b'"Hello"' not in stream[:200]:
            continue
        found += 1
        if found > limit:
            break
        answers = []
        try:
            s = socket.create_connection((host, port), timeout=2)
            s.sendall(stream)
            while True:
                body = read_frame(s)
                if body is None:
                    break
                try:
                    b = json.loads(body)["body"]
                    answers.append(next(iter(b)) if isinstance(b, dict) else str(b))
                except ValueError:
                    answers.append("tagged-frame")
            s.close()
        except OSError as e:
            answers.append(f"({e})")
        print(f"{frm} -> {host}, {len(stream)} bytes: {' '.join(answers) or 'closed'}")
    if not found:
        print("no captured stream starts with a Hello")
        sys.exit(2)


if __name__ == "__main__":
    main()
