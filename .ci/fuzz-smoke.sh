#!/usr/bin/env bash
# Fuzz smoke run: every cargo-fuzz target in fuzz/ for FUZZ_SECONDS seconds each (default
# 30; scripts/test.sh runs 20), starting from the committed seed corpus, with debug
# assertions on so that the sessions' own invariant checks run. The targets: decode (frame
# codec), session_pair (two multiplexer sessions), config (the TOML parser), control_lines
# (the request lines the proxy reads before authentication: line cap, JSON, the proxy's
# stateless checks; it links the proxy crate, so its first build takes longest). Fails if any target finds a crash, a leak, an
# out-of-memory or a timeout; the input is kept in fuzz/artifacts/<target>/ with the
# command that reproduces it.
#
# libFuzzer adds every new interesting input to the corpus directory it runs on, so each
# target runs on a temporary copy of fuzz/corpus/<target>/: CI runs never dirty the tree.
#
# Environment:
#   FUZZ_SECONDS           seconds per target (default 30)
#   FUZZ_TARGETS           space-separated targets to run (default: all of `cargo fuzz list`)
#   FUZZ_SEED              libFuzzer's random seed (default 1, so that a CI run explores the
#                          same inputs each time and a landing is not blocked by chance; set
#                          FUZZ_SEED=0 for a random seed and fuzz longer when hunting bugs)
#   REMOTELER_FUZZ_STRICT  1: session_pair also fails when two honest sessions accuse each
#                          other of a protocol violation (see fuzz/fuzz_targets/session_pair.rs)
#
# The targets need nightly-only compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain
# accept them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${FUZZ_SECONDS:-30}"
seed="${FUZZ_SEED:-1}"
case "$seconds" in
  '' | *[!0-9]*) echo "error: FUZZ_SECONDS must be a whole number of seconds, got '$seconds'" >&2; exit 2 ;;
esac
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "==> building fuzz targets (release, debug assertions on)"
cargo fuzz build --debug-assertions

targets="${FUZZ_TARGETS:-$(cargo fuzz list | tr "\n" " ")}"
failed=()
for target in $targets; do
  mkdir -p "$work/corpus/$target" "$work/artifacts/$target"
  if [ -d "corpus/$target" ]; then
    cp -R "corpus/$target/." "$work/corpus/$target/"
  fi
  seeds=$(find "$work/corpus/$target" -type f | wc -l)
  echo "==> fuzz $target for ${seconds}s from $seeds seed(s)"
  status=0
  cargo fuzz run --debug-assertions "$target" "$work/corpus/$target" -- \
    -max_total_time="$seconds" \
    -seed="$seed" \
    -timeout=60 \
    -print_final_stats=1 \
    -artifact_prefix="$work/artifacts/$target/" \
    >"$work/$target.log" 2>&1 || status=$?
  grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added)' "$work/$target.log" || true
  # slow-unit-* files are reports, not failures; anything else is a finding.
  findings=$(find "$work/artifacts/$target" -type f ! -name 'slow-unit-*' | wc -l)
  if [ "$status" -ne 0 ] || [ "$findings" -ne 0 ]; then
    mkdir -p "artifacts/$target"
    cp -R "$work/artifacts/$target/." "artifacts/$target/"
    tail -n 60 "$work/$target.log" >&2
    echo "error: fuzz target $target failed (exit $status, $findings finding(s)); inputs copied to fuzz/artifacts/$target/" >&2
    for f in "artifacts/$target"/*; do
      [ -e "$f" ] || continue
      case "$(basename "$f")" in slow-unit-*) continue ;; esac
      echo "  reproduce: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --debug-assertions $target $f)" >&2
    done
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzz smoke run failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz smoke run passed: ${targets% } (${seconds}s each)"
