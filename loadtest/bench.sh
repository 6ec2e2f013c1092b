#!/usr/bin/env bash
# Runs the load tests recorded in docs/benchmarks.md ("## Load test") and leaves the JSON
# reports and tables in $OUT (default /tmp/remoteler-loadtest-results).
# Usage: bash loadtest/bench.sh [quick]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/remoteler-loadtest-results}
mkdir -p "$OUT"
cargo build --release -p proxy -p loadtest
LT=target/release/remoteler-loadtest
run() { # name, args...
  local name=$1; shift
  echo "== $name: $LT $*" | tee -a "$OUT/commands.txt"
  "$LT" "$@" --json "$OUT/$name.json" > "$OUT/$name.txt" 2> "$OUT/$name.err" || echo "   (exit $?)"
  tail -n +1 "$OUT/$name.txt"
}
for i in 1 2 3; do run tunnels-1000-$i tunnels --count 1000 --baseline; done
for i in 1 2 3; do run tunnels-10000-$i tunnels --count 10000; done
run tunnels-19000-1 tunnels --count 19000
for i in 1 2 3; do run sessions-100x1000-$i sessions --tunnels 100 --sessions 1000; done
run sessions-1000x10000-1 sessions --tunnels 1000 --sessions 10000 --rounds 20 --bulk-bytes 256KiB
for i in 1 2 3; do run storm-restart-1000-$i storm --count 1000 --event restart; done
for i in 1 2 3; do run storm-cut-1000-$i storm --count 1000 --event cut; done
for i in 1 2 3; do run rtt0-1x1-$i sessions --tunnels 1 --sessions 1 --rounds 1000 --bulk-bytes 0 --single-bytes 256MiB; done
for i in 1 2 3; do run rtt20-1x1-$i sessions --tunnels 1 --sessions 1 --rounds 100 --bulk-bytes 0 --single-bytes 64MiB --relay-delay 10ms --relay-jitter 2ms; done
echo "results in $OUT"
