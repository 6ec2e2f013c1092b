#!/usr/bin/env python3
"""Writes the committed seed corpus: fuzz/corpus/decode/ and fuzz/corpus/session_pair/.

decode seeds are sequences of valid v1 frames as a dialing peer (odd stream ids) would send
them after its HELLO; the layouts are those of docs/protocol.md. session_pair seeds are
operation scripts in the byte form the `arbitrary` derive reads: a `Setup` (six u8), then
`Op`s, each a u32 (little endian) choosing the variant as (x * 15) >> 32, then its fields
(bool and u8: one byte, u16: two bytes little endian). Run `REMOTELER_FUZZ_TRACE=1
cargo fuzz run session_pair corpus/session_pair/<file>` to see a seed's operations.

Usage: python3 fuzz/make_corpus.py   (rewrites the seed files; libFuzzer's own additions
never land in the tree, see .ci/fuzz-smoke.sh)
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# ---- frames ---------------------------------------------------------------------------

HELLO, ANNOUNCE, OPEN, OPEN_OK, OPEN_FAIL, DATA, WINDOW, FIN, RESET, PING, PONG, GOAWAY, RESUME = range(1, 14)


def frame(kind, stream, payload=b"", flags=0):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def str8(s):
    b = s.encode()
    return bytes([len(b)]) + b


def str16(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def hello(resuming=False, role=1):
    payload = struct.pack(">HHBBIIII", 1, 1, role, 0, 0, 4096, 1024, 8) + bytes([0xA0] * 16)
    return frame(HELLO, 0, payload, 1 if resuming else 0)


def open_(stream, node="node-1", credential=b""):
    payload = bytes(range(16)) + str8("") + str8(node) + str8("ssh") + str8("alice")
    payload += str8("root") + str8("192.0.2.1:40000") + struct.pack(">H", len(credential)) + credential
    return frame(OPEN, stream, payload)


def coded(kind, stream, code, reason):
    return frame(kind, stream, struct.pack(">H", code) + str16(reason))


def window(stream, increment):
    return frame(WINDOW, stream, struct.pack(">I", increment))


def announce():
    payload = str8("leaf") + struct.pack(">H", 2)
    payload += str8("web-1") + bytes([3, 1]) + str8("env") + str8("prod") + bytes([1]) + str8("ssh")
    payload += str8("db-1") + bytes([1, 0, 0])
    return frame(ANNOUNCE, 0, payload)


def resume(last_peer_stream, entries):
    payload = struct.pack(">IH", last_peer_stream, len(entries))
    for stream, received, limit, flags in entries:
        payload += struct.pack(">IQQB", stream, received, limit, flags)
    return frame(RESUME, 0, payload)


DECODE = {
    "open-data-fin": open_(1) + frame(DATA, 1, b"hello") + frame(FIN, 1) + window(1, 7),
    "ours-accepted": frame(OPEN_OK, 2) + window(2, 300) + frame(DATA, 2, bytes(100)) + frame(FIN, 2),
    "ours-refused": coded(OPEN_FAIL, 2, 0x0101, "node offline") + open_(3) + coded(RESET, 3, 6, "hung up"),
    "control": frame(PING, 0, struct.pack(">Q", 1)) + frame(PONG, 0, struct.pack(">Q", 1))
    + announce() + coded(GOAWAY, 0, 9, "draining"),
    "many-opens": b"".join(open_(1 + 2 * i, "node-%d" % i) for i in range(12)),
    "credential": open_(1, credential=bytes(range(256)) * 4) + frame(DATA, 1, bytes(1024)),
    "hello-again": hello(resuming=True, role=4),
    "resume": resume(2, [(1, 5, 4101, 1), (2, 0, 4096, 2)]),
    "goaway-error": open_(1) + coded(GOAWAY, 0, 1, "protocol error"),
}

# ---- session_pair operation scripts ----------------------------------------------------

OPS = ["Open", "Accept", "Reject", "Send", "Recv", "Finish", "Reset", "GoAway", "Announce",
       "Close", "Advance", "Deliver", "Flush", "Cut", "Reattach"]


def op(name, *fields):
    k = OPS.index(name)
    x = -(-(k << 32) // len(OPS))  # ceil(k * 2^32 / n): (x * n) >> 32 == k
    out = struct.pack("<I", x)
    for f in fields:
        if isinstance(f, bool):
            out += bytes([1 if f else 0])
        elif isinstance(f, tuple):  # ("u16", value)
            out += struct.pack("<H", f[1])
        else:
            out += bytes([f])
    return out


def setup(window=2, max_frame=2, max_streams=7, pending=3, keepalive=9, grace=10):
    # window 4096, max_frame 4096, 8 streams, 4 pending opens, 1 s keepalive x 1, 10 s grace
    return bytes([window, max_frame, max_streams, pending, keepalive, grace])


A, B = True, False
SEND_1000, SEND_16K, SEND_100K = 4, 6, 7

transfer = [
    op("Flush"), op("Open", A), op("Flush"), op("Accept", B, 0), op("Flush"),
    op("Send", A, 0, SEND_1000), op("Send", B, 0, SEND_16K), op("Flush"),
    op("Recv", B, 0, 15), op("Recv", A, 0, 15), op("Flush"),
    op("Finish", A, 0), op("Finish", B, 0), op("Flush"),
    op("Recv", B, 0, 15), op("Recv", A, 0, 15), op("Flush"),
]

cut_mid_transfer = [
    op("Flush"), op("Open", A), op("Open", B), op("Flush"), op("Accept", B, 0), op("Accept", A, 0),
    op("Flush"), op("Send", A, 0, SEND_100K), op("Send", B, 1, SEND_16K),
    op("Deliver", False, ("u16", 3000)), op("Deliver", True, ("u16", 700)),
    op("Cut"), op("Send", A, 0, SEND_1000), op("Advance", ("u16", 2000)), op("Reattach"),
    op("Flush"), op("Recv", B, 0, 15), op("Recv", A, 0, 15), op("Flush"),
    op("Finish", A, 0), op("Finish", B, 0), op("Flush"), op("Recv", B, 0, 15), op("Recv", A, 0, 15),
    op("Flush"),
]

keepalive_death = [
    op("Flush"), op("Open", A), op("Flush"), op("Accept", B, 0), op("Flush"),
    op("Send", A, 0, SEND_1000), op("Advance", ("u16", 5000)), op("Advance", ("u16", 5000)),
    op("Reattach"), op("Flush"), op("Recv", B, 0, 15), op("Flush"),
]

goaway_and_refusals = [
    op("Flush"), op("Open", A), op("Open", A), op("Flush"), op("Reject", B, 0, 2),
    op("GoAway", B), op("Flush"), op("Open", A), op("Accept", B, 0), op("Flush"),
    op("Reset", A, 0, 1), op("Flush"), op("Announce", A, 3), op("Flush"),
    op("Close", B, 3), op("Flush"), op("Advance", ("u16", 20000)),
]

byte_by_byte = [op("Deliver", bool(i % 2), ("u16", 1 + i % 5)) for i in range(60)] + [
    op("Open", B), op("Flush"), op("Accept", A, 0), op("Send", B, 0, 3),
    op("Deliver", True, ("u16", 11)), op("Deliver", False, ("u16", 5)), op("Cut"), op("Reattach"),
    op("Flush"), op("Recv", A, 0, 3),
]

SESSION_PAIR = {
    "transfer": setup() + b"".join(transfer),
    "cut-mid-transfer": setup(window=3, max_frame=1) + b"".join(cut_mid_transfer),
    "keepalive-death": setup(keepalive=0, grace=25) + b"".join(keepalive_death),
    "goaway-and-refusals": setup(max_streams=1, pending=0) + b"".join(goaway_and_refusals),
    "byte-by-byte": setup(window=1, max_frame=1) + b"".join(byte_by_byte),
    "tiny-window": setup(window=0, max_frame=0) + b"".join(transfer),
}


def write(target, seeds):
    directory = os.path.join(HERE, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(directory, "seed-" + name), "wb") as f:
            f.write(data)


write("decode", DECODE)
write("session_pair", SESSION_PAIR)
