#!/usr/bin/env bash
# `frame` is sans-IO: it may depend on bytes, slab and an error crate, nothing else.
# Fails, naming the crate, if anything else (a runtime, a socket library) creeps in.
set -euo pipefail
cd "$(dirname "$0")/.."
allowed='^(frame|bytes|slab|thiserror|thiserror-impl|proc-macro2|quote|syn|unicode-ident)$'
deps=$(cargo tree -p frame -e normal --prefix none --format '{p}' --locked | awk '{print $1}' | sort -u)
bad=$(echo "$deps" | grep -Ev "$allowed" || true)
if [ -n "$bad" ]; then
  echo "error: frame must stay sans-IO, but it now depends on:" >&2
  echo "$bad" | sed 's/^/  /' >&2
  echo "move that code to the tunnel crate, or extend the allowlist in $0 with a reason" >&2
  exit 1
fi
echo "frame depends only on: $(echo $deps | tr '\n' ' ')"
