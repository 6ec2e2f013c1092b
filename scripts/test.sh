#!/usr/bin/env bash
# The test command (README "Quick start"; `.ci/run` calls exactly this).
# Installs what the tests need when it is missing, then runs every check CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

need_pkgs=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need_pkgs+=(openssh-client)
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
command -v iptables >/dev/null 2>&1 || need_pkgs+=(iptables)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  step "installing system packages: ${need_pkgs[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing ${need_pkgs[*]} and not root; install them with apt-get and rerun" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

step "frame pulls in no runtime"
bash scripts/check-frame-deps.sh

step "cargo test"
cargo test --workspace --locked

step "end to end: real proxy, agents, sshd and ssh (scripts/e2e.sh)"
bash scripts/e2e.sh

step "end to end: roles and SSH certificates, sshd with TrustedUserCAKeys only (scripts/e2e-roles.sh)"
bash scripts/e2e-roles.sh

step "end to end: trusted clusters, root and leaf proxies in their own namespaces (scripts/e2e-clusters.sh)"
bash scripts/e2e-clusters.sh

step "end to end on ARM: aarch64 agent under qemu-user behind NAT (scripts/arm-e2e.sh)"
bash scripts/arm-e2e.sh

step "faults: link cuts shorter and longer than resume.grace, agent kill -9, a stalled reader, packet loss, delay and stalls (scripts/faults.sh, docs/faults.md)"
bash scripts/faults.sh

step "Debian packages: contents, systemd units, install into a throwaway root (scripts/check-packages.sh)"
bash scripts/check-packages.sh

step "fuzz smoke run"
REMOTELER_FUZZ_STRICT="${REMOTELER_FUZZ_STRICT:-1}" FUZZ_SECONDS="${FUZZ_SECONDS:-20}" bash .ci/fuzz-smoke.sh

step "all checks passed"
