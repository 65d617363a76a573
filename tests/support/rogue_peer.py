#!/usr/bin/env python3
"""A rogue host on the Raft port: speaks kube-vip's peer wire format (u32 big-endian length +
JSON frame) and forges messages claiming to be a configured peer.

usage: rogue_peer.py [--key HEX | --keyed] HOST PORT FROM_ID TO_ID TERM [KIND...]
  FROM_ID / TO_ID  peer id strings (server1, ...); node ids are FNV-1a 64 of them
  TERM             the term to forge (e.g. 1099511627776 = 2^40, 18446744073709551615 = 2^64-1)
  KIND             any of AppendEntries Vote FullSnapshot Handover PreVote (default: all)

  --key HEX        speak the keyed handshake (protocol v2) and prove with this (wrong) key
  --keyed          speak the keyed handshake with no key at all (garbage proof)

For each kind: connect, send Hello claiming FROM_ID, then the forged frame; prints one line per
kind with what came back (the answer's variant, or how the connection ended). Exit 0 always:
the test judges the cluster, not this tool.
"""
import hashlib
import hmac
import os
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


def read_raw(sock):
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
    return exact(struct.unpack(">I", head)[0])


def read_frame(sock):
    """The next frame as JSON; a frame carrying a 32-byte tag (an authenticated answer: the
    node accepted us) decodes with "tagged" set."""
    body = read_raw(sock)
    if body is None:
        return None
    try:
        return json.loads(body)
    except ValueError:
        f = json.loads(body[:-32])
        f["body"] = {"tagged " + (next(iter(f["body"])) if isinstance(f["body"], dict) else f["body"]): 0}
        return f


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


CLIENT_PROOF = b"kube-vip peer auth v2: dialer proof"


def keyed_handshake(s, key, frm_id, to_id, answers):
    """Hello v2 + Auth with `key` (bytes, or None for a garbage proof); True if accepted."""
    nonce_c = os.urandom(32)
    hello = {"Hello": {"magic": "kube-vip-raft", "version": 2, "from": frm_id, "to": to_id,
                       "nonce": nonce_c.hex()}}
    s.sendall(frame({"id": 0, "body": hello}))
    f = read_frame(s)
    if f is None:
        answers.append("closed")
        return False
    body = f["body"]
    answers.append(next(iter(body)) if isinstance(body, dict) else body)
    if not (isinstance(body, dict) and "HelloAck" in body and body["HelloAck"].get("nonce")):
        return False
    nonce_s = bytes.fromhex(body["HelloAck"]["nonce"])
    msg = CLIENT_PROOF + nonce_c + nonce_s + frm_id.to_bytes(8, "big") + to_id.to_bytes(8, "big")
    proof = hmac.new(key, msg, hashlib.sha256).hexdigest() if key else os.urandom(32).hex()
    s.sendall(frame({"id": 0, "body": {"Auth": {"proof": proof}}}))
    f = read_frame(s)
    if f is None:
        answers.append("closed")
        return False
    body = f["body"]
    answers.append(next(iter(body)) if isinstance(body, dict) else body)
    return "AuthOk" in str(body)


def main():
    args = sys.argv[1:]
    key, keyed = None, False
    if args[0] == "--key":
        key, keyed, args = bytes.fromhex(args[1]), True, args[2:]
    elif args[0] == "--keyed":
        keyed, args = True, args[1:]
    host, port, frm, to, term = args[:5]
    kinds = args[5:] or ["AppendEntries", "Vote", "FullSnapshot", "Handover", "PreVote"]
    frm_id, to_id, term = node_id(frm), node_id(to), int(term)
    for kind in kinds:
        try:
            s = socket.create_connection((host, int(port)), timeout=2)
        except OSError as e:
            print(f"{kind}: connect failed: {e}")
            continue
        answers = []
        try:
            if keyed:
                # A rogue with a wrong key cannot tag frames; send the forgery untagged anyway.
                keyed_handshake(s, key, frm_id, to_id, answers)
            else:
                hello = {"Hello": {"magic": "kube-vip-raft", "version": 1, "from": frm_id, "to": to_id}}
                s.sendall(frame({"id": 0, "body": hello}))
            s.sendall(frame({"id": 1, "body": forged(kind, frm_id, term)}))
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
            print(f"{kind}: {' '.join(map(str, answers))} ({e})")
        finally:
            s.close()


if __name__ == "__main__":
    main()
