#!/usr/bin/env python3
"""What a proxy holds per idle tunnel, by allocation site (docs/benchmarks.md, "Memory per
idle tunnel").

Reads a heaptrack recording of a proxy that was killed with SIGKILL while it held N idle
tunnels, so that every allocation still live at that moment is in it, and prints per site
and request size: allocations per tunnel, bytes requested per tunnel and bytes of glibc
malloc chunks per tunnel (request + 8-byte header, rounded up to 16, at least 32).
Sites under 8 chunk bytes per tunnel are left out of the table, not out of the total.

Usage: heaptrack_live.py RECORDING.zst N
"""
import collections
import re
import subprocess
import sys


def chunk(n):
    return max(32, (n + 8 + 15) // 16 * 16)


def main(path, n_tunnels):
    strings, ips, traces, allocs = [""], [None], [None], []
    live = collections.Counter()
    # heaptrack's interpreted format: s = string, i = instruction pointer with its
    # (function, file, line) frames, t = trace node (ip, parent), a = allocation info
    # (size, trace), +/- = allocation/free of an allocation info; numbers in hex.
    proc = subprocess.Popen(["zstdcat", path], stdout=subprocess.PIPE, text=True, errors="replace")
    for line in proc.stdout:
        kind = line[0]
        if kind == "+":
            live[int(line[2:], 16)] += 1
        elif kind == "-":
            live[int(line[2:], 16)] -= 1
        elif kind == "s":
            parts = line.rstrip("\n").split(" ", 2)
            strings.append(parts[2] if len(parts) > 2 else "")
        elif kind == "i":
            v = [int(x, 16) for x in line.split()[1:]]
            rest, frames = v[2:], []
            while len(rest) >= 3:
                frames.append(tuple(rest[:3]))
                rest = rest[3:]
            ips.append(frames)
        elif kind == "t":
            traces.append(tuple(int(x, 16) for x in line.split()[1:3]))
        elif kind == "a":
            allocs.append(tuple(int(x, 16) for x in line.split()[1:3]))

    ours = re.compile(r"^(proxy|tunnel|frame|config)/src/")

    def site(trace):
        frames = []
        while trace:
            ip, trace = traces[trace]
            frames += [(strings[f], strings[fi], ln) for f, fi, ln in ips[ip] or []]
        our = " < ".join(f"{fi}:{ln}" for _, fi, ln in frames if ours.match(fi))
        dep = next(
            (f"{fi.split('index.crates.io-1949cf8c6b5b557f/')[-1]}:{ln}"
             for _, fi, ln in frames
             if fi and not ours.match(fi) and "/rustc/" not in fi and not fi.startswith("library/")),
            "",
        )
        return " < ".join(our.split(" < ")[:3]), dep

    sites = collections.defaultdict(lambda: [0, 0, 0, collections.Counter()])
    for idx, count in live.items():
        if count <= 0:
            continue
        size, trace = allocs[idx]
        s = sites[site(trace)]
        s[0] += count
        s[1] += count * size
        s[2] += count * chunk(size)
        s[3][size] += count
    n = n_tunnels
    print("allocs/t  req B/t  chunk B/t  sizes x count | our frames | first dependency frame")
    total = [0, 0, 0]
    for (our, dep), (count, req, chunks, sizes) in sorted(sites.items(), key=lambda kv: -kv[1][2]):
        total = [total[0] + count, total[1] + req, total[2] + chunks]
        if chunks / n >= 8:
            top = ",".join(f"{s}x{c}" for s, c in sizes.most_common(3))
            print(f"{count / n:8.2f} {req / n:8.0f} {chunks / n:10.0f}  {top} | {our} | {dep}")
    print(f"total live: {total[0]} allocations, {total[1]} B requested, {total[2]} B in chunks;"
          f" per tunnel {total[0] / n:.1f} allocations, {total[1] / n:.0f} B, {total[2] / n:.0f} B"
          " (includes what the proxy holds without tunnels)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]))
