#!/usr/bin/env bash
# Debian packages of the three binaries, into target/debian/:
#   remoteler-proxy_<v>_amd64.deb   the appliance: systemd unit, /etc/remoteler/proxy.toml, user remoteler
#   remoteler-agent_<v>_amd64.deb   the edge agent (profile release-small): unit, agent.toml, user remoteler-agent
#   remoteler-agent_<v>_arm64.deb   the same, cross-built for aarch64 boards
#   remoteler_<v>_amd64.deb         the user's command
# plus -dbgsym.ddeb packages holding the proxy's and client's debug line tables.
# The packaging files live in packaging/ and in the [package.metadata.deb] tables of
# proxy/, agent/ and client/Cargo.toml. Installs cargo-deb (crates.io) when missing.
# NO_ARM=1 skips the arm64 package; it is also skipped, with a note, when the cross toolchain
# cannot be installed. scripts/check-packages.sh inspects and installs the result.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source packaging/cross-aarch64.sh
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

if ! command -v cargo-deb >/dev/null; then
  say "installing cargo-deb (cargo install cargo-deb --locked)"
  cargo install cargo-deb --locked -q
fi
command -v dpkg-deb >/dev/null || { echo "dpkg-deb is needed (Debian's dpkg)" >&2; exit 1; }

OUT=target/debian
mkdir -p "$OUT"
say "remoteler-proxy (release)"
cargo deb --locked -p proxy -o "$OUT"
say "remoteler (release)"
cargo deb --locked -p client -o "$OUT"
say "remoteler-agent (release-small)"
cargo deb --locked -p agent -o "$OUT"
if [ "${NO_ARM:-0}" = 1 ]; then
  echo "NO_ARM=1: no arm64 package"
elif aarch64_toolchain; then
  say "remoteler-agent for $AARCH64_TARGET (release-small)"
  cargo deb --locked -p agent --target "$AARCH64_TARGET" --variant arm64 -o "$OUT"
else
  echo "note: no arm64 package: the aarch64 cross toolchain is missing and cannot be installed"
fi

say "packages in $OUT"
ls -l "$OUT"/*.deb "$OUT"/*.ddeb 2>/dev/null
