#!/usr/bin/env python3
"""Writes the committed seed corpus of the control_lines fuzz target: fuzz/corpus/control_lines/.

Each seed is the target's 7-byte header (filler size, filler position, filler byte, chunk-size
seed; see fuzz/fuzz_targets/control_lines.rs) and then the bytes a peer sends: valid and
near-valid request lines of every type the proxy reads with `read_line` (join, cluster join,
login, register, API).

Usage: python3 fuzz/make_control_corpus.py
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus", "control_lines")

# A canonical ECDSA P-256 SubjectPublicKeyInfo (the generator point as the key): the checks
# accept it, so the seeds reach past key parsing.
P256_SPKI = (
    "3059301306072a8648ce3d020106082a8648ce3d030107034200"
    "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
    "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5"
)
# An Ed25519 SubjectPublicKeyInfo.
ED25519_SPKI = "302a300506032b6570032100" + "11" * 32

CA_PEM = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBcTCCARegAwIBAgIUUH0hGbmWDTJcGaVVaAAwXwqD5kQwCgYIKoZIzj0EAwIw\n"
    "-----END CERTIFICATE-----\n"
)


def line(obj):
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def header(filler_kib=None, at=0, byte=b" ", seed=1):
    first = 0 if filler_kib is None else 128 + filler_kib
    return bytes([first, at, byte[0]]) + seed.to_bytes(4, "little")


SEEDS = {
    "join": line({"token": "a1b2c3d4e5f60718", "node": "node-r1", "public_key": P256_SPKI}),
    "join-ed25519": line({"token": "t", "node": "edge.01_a", "public_key": ED25519_SPKI}),
    "join-bad-name": line({"token": "t", "node": "Node R1!", "public_key": P256_SPKI}),
    "join-dot-name": line({"token": "t", "node": ".hidden", "public_key": P256_SPKI}),
    "join-odd-hex": line({"token": "t", "node": "n", "public_key": "abc"}),
    "join-unknown-field": line({"token": "t", "node": "n", "public_key": "00", "admin": True}),
    "join-missing-key": line({"token": "t", "node": "n"}),
    "cluster-join": line({"token": "t", "cluster": "leaf.example.com", "ca_pem": CA_PEM, "public_key": P256_SPKI}),
    "cluster-join-own-name": line({"token": "t", "cluster": "root.example.com", "ca_pem": CA_PEM, "public_key": P256_SPKI}),
    "cluster-join-no-pem": line({"token": "t", "cluster": "leaf", "ca_pem": "", "public_key": P256_SPKI}),
    "login": line({"user": "alice", "password": "correct horse", "public_key": P256_SPKI, "ttl_secs": 3600}),
    "login-ssh": line({"user": "alice", "password": "p", "public_key": P256_SPKI, "ssh_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBEREREREREREREREREREREREREREREREREREREREREREREREREREREREQ== a@b"}),
    "login-null-ttl": line({"user": "alice", "password": "p", "public_key": "00", "ttl_secs": None}),
    "login-huge-ttl": b'{"user":"a","password":"p","public_key":"00","ttl_secs":18446744073709551616}\n',
    "register": line({"ssh_address": "10.0.0.5:22", "labels": [["env", "prod"], ["role", "db"]], "ttl_secs": 30}),
    "register-host": line({"ssh_address": "node-b.internal:2222", "ttl_secs": 3600}),
    "register-ipv6": line({"ssh_address": "[::1]:22", "labels": [], "ttl_secs": 1}),
    "register-bad-ttl": line({"ssh_address": "10.0.0.5:22", "labels": [["env", "prod"]], "ttl_secs": 0}),
    "register-dup-labels": line({"ssh_address": "10.0.0.5:22", "labels": [["env", "a"], ["env", "b"]], "ttl_secs": 5}),
    "register-bad-label": line({"ssh_address": "10.0.0.5:22", "labels": [["Env Name", "x\u0000y"]], "ttl_secs": 5}),
    "api-list-nodes": line({"list_nodes": {"cluster": None}}),
    "api-list-leaf": line({"list_nodes": {"cluster": "leaf"}}),
    "api-whoami": line("who_am_i"),
    "api-clusters": line("list_clusters"),
    "two-lines": line({"list_nodes": {}}) + line("who_am_i") + b'{"tok',
    "crlf": b'{"token":"t","node":"n","public_key":"00"}\r\n',
    "not-json": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "escapes": b'{"token":"\\u0000\\ud83d\\ude00","node":"n\\u00e9","public_key":"00"}\n',
    "deep": b"[" * 200 + b"]" * 200 + b"\n",
}

# Lines around the cap: spaces are JSON whitespace, so a filled line stays a valid request.
BIG = {
    # 63 KiB of spaces in front of a join: valid, under the cap.
    "join-63k-spaces": (header(63, 0, b" ", 0x9E3779B9), SEEDS["join"]),
    # 64 KiB of spaces: the line is longer than the cap by the request's length.
    "join-64k-spaces": (header(64, 0, b" ", 0x12345677), SEEDS["join"]),
    # 71 KiB without a newline: refused as too long.
    "no-newline-71k": (header(71, 128, b"a", 7), b'{"token":"'),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name in os.listdir(OUT):
        os.remove(os.path.join(OUT, name))
    for i, (name, body) in enumerate(SEEDS.items()):
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(header(seed=2 * i + 1) + body)
    for name, (head, body) in BIG.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(head + body)


if __name__ == "__main__":
    main()
