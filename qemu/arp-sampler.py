#!/usr/bin/env python3
"""Ask "who has the VIP?" over and over and log every answer.

    arp-sampler.py IFACE MY_IP VIP INTERVAL OUT

Run in the client's network namespace (needs CAP_NET_RAW). Every INTERVAL
seconds it broadcasts an ARP request for VIP (sender: MY_IP and IFACE's MAC)
on a raw packet socket and writes to OUT, one line each:

    request MS
    reply MS MAC        (an ARP reply whose sender IP is VIP)

MS is milliseconds since the epoch. Every host that has the VIP on its
interface answers, so two holders show up as two MACs; a host being booted
cannot hide from this. The kernel's own neighbour cache is not touched (raw
socket), so sampling does not change what the client's TCP stack sees.
Stops on SIGTERM/SIGINT.
"""

import select
import signal
import socket
import struct
import sys
import time

ETH_P_ARP = 0x0806


def now_ms():
    return int(time.time() * 1000)


def main():
    iface, my_ip, vip, interval, out_path = sys.argv[1:6]
    interval = float(interval)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    s.bind((iface, ETH_P_ARP))
    my_mac = s.getsockname()[4][:6]
    vip_b, my_ip_b = socket.inet_aton(vip), socket.inet_aton(my_ip)
    # Ethernet broadcast + ARP request (htype 1, ptype IPv4, op 1), padded to
    # the 60-byte minimum frame.
    frame = (b"\xff" * 6 + my_mac + struct.pack("!H", ETH_P_ARP)
             + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
             + my_mac + my_ip_b + b"\x00" * 6 + vip_b)
    frame += b"\x00" * (60 - len(frame))

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    with open(out_path, "a", buffering=1) as out:
        next_send = time.monotonic()
        while not stop:
            t = time.monotonic()
            if t >= next_send:
                s.send(frame)
                out.write("request %d\n" % now_ms())
                next_send += interval
                if next_send < t:  # fell behind (a busy machine): do not burst
                    next_send = t + interval
            try:
                r, _, _ = select.select([s], [], [], max(0.0, next_send - time.monotonic()))
            except InterruptedError:
                continue
            if not r:
                continue
            pkt = s.recv(128)
            if len(pkt) < 42 or struct.unpack("!H", pkt[12:14])[0] != ETH_P_ARP:
                continue
            op = struct.unpack("!H", pkt[20:22])[0]
            sender_mac, sender_ip = pkt[22:28], pkt[28:32]
            if op == 2 and sender_ip == vip_b:
                out.write("reply %d %s\n" % (now_ms(), sender_mac.hex(":")))


if __name__ == "__main__":
    main()
