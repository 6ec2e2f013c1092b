#!/usr/bin/env bash
# Heap profile of a release proxy holding N idle tunnels (docs/benchmarks.md, "Memory per
# idle tunnel"): runs the proxy under heaptrack through `remoteler-loadtest tunnels`, kills
# it with SIGKILL once the tunnels are up and two keepalive ticks have passed (so everything
# still allocated is in the recording as live), then prints the live allocations per tunnel
# by site (loadtest/heaptrack_live.py). Needs heaptrack and zstd.
# Usage: bash loadtest/heap-profile.sh [N (2000)] [proxy binary (target/release/remoteler-proxy)]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
BIN=$(realpath "${2:-target/release/remoteler-proxy}")
OUT=${OUT:-/tmp/remoteler-heap-profile}
mkdir -p "$OUT"
rm -f "$OUT"/heap*.zst
WRAP="$OUT/proxy-under-heaptrack.sh"
cat > "$WRAP" <<WRAPPER
#!/bin/sh
# Only the long-running \`start\` runs under heaptrack; init, tokens, status run directly.
if [ "\$1" = start ]; then exec heaptrack -o "$OUT/heap" "$BIN" "\$@"; fi
exec "$BIN" "\$@"
WRAPPER
chmod +x "$WRAP"
cargo build --release -p loadtest
target/release/remoteler-loadtest tunnels --count "$N" --keepalive 10s --hold-rounds 6 \
  --proxy-bin "$WRAP" > "$OUT/loadtest.txt" 2> "$OUT/loadtest.err" &
loadtest=$!
until grep -q "holding $N tunnels" "$OUT/loadtest.err" 2>/dev/null; do
  kill -0 "$loadtest" || { cat "$OUT/loadtest.err"; exit 1; }
  sleep 1
done
sleep 25
kill -KILL "$(pgrep -f "^$BIN start")"
wait "$loadtest" || true # it reports the tunnels it lost: expected
sleep 2
python3 loadtest/heaptrack_live.py "$(ls "$OUT"/heap*.zst)" "$N" | tee "$OUT/live.txt"
