#!/usr/bin/env bash
# End to end with the ARM edge agent: remoteler-agent cross-built for aarch64 (profile
# release-small, as shipped to boards) runs under qemu-user inside a NAT'd network namespace,
# next to a real sshd; a native x86_64 proxy holds its tunnel; the real OpenSSH client reaches
# the node through it.
#   * `ssh node-arm 'echo $NODE_NAME'` prints node-arm;
#   * 8 MiB go up and come back down byte-exact;
#   * qemu-user has no io_uring, so the agent must run on monoio's epoll fallback
#     (FusionDriver): qemu's own syscall log (-strace, not the strace tool) must show
#     io_uring_setup refused and epoll_create1 taking over, in the agent that carried the session.
# Skips (exit 0, with the reason) when the cross toolchain or qemu-user cannot be installed.
# KEEP_WORK=1 keeps the working directory with every log.
source "$(dirname "$0")/lib.sh"
source "$ROOT/packaging/cross-aarch64.sh"
trap cleanup EXIT

if ! aarch64_toolchain qemu; then
  echo "SKIP: scripts/arm-e2e.sh: no aarch64 cross toolchain or qemu-user here (see above)"
  exit 0
fi
ensure_packages
build
say "cross-building remoteler-agent for $AARCH64_TARGET (profile release-small)"
(cd "$ROOT" && cargo build --locked -q --profile release-small --target "$AARCH64_TARGET" -p agent)
ARM_AGENT="$ROOT/target/$AARCH64_TARGET/release-small/remoteler-agent"
readelf -h "$ARM_AGENT" | grep -q 'Machine:.*AArch64' || fail "$ARM_AGENT is not an aarch64 binary"
echo "ok - $ARM_AGENT is an aarch64 ELF, $(stat -c %s "$ARM_AGENT") bytes"

P="$BIN/remoteler-proxy"; C="$BIN/remoteler"
export REMOTELER_HOME="$WORK/home"
check() { local what=$1; shift; "$@" || fail "$what"; echo "ok - $what"; }

say "cluster, a NAT'd site with sshd, and the native proxy"
"$P" init --cluster arm.test --data-dir "$WORK/proxy" --host 10.79.0.1 >"$WORK/init.txt"
PIN=$(grep -o 'sha256:[0-9a-f]\{64\}' "$WORK/init.txt" | head -1)
[ -n "$PIN" ] || fail "init printed no CA pin"
make_nat_site arm-r1 10.79.0.1 10.79.0.2
start_sshd node-arm 2222 arm-r1
USERS_PORT=$(free_port); TUNNEL_PORT=$(free_port); AUTH_PORT=$(free_port)
bg proxy "$P" start --data-dir "$WORK/proxy" --users "127.0.0.1:$USERS_PORT" \
  --tunnels "10.79.0.1:$TUNNEL_PORT" --auth "127.0.0.1:$AUTH_PORT" --metrics off >/dev/null
wait_for "the proxy to listen" 30 test -f "$WORK/proxy/proxy.ready"

say "the aarch64 agent under qemu-aarch64, inside the site, joins with a token"
TOKEN=$("$P" tokens add --kind node --ttl 15m --data-dir "$WORK/proxy" | grep -o '[0-9a-f]\{64\}' | head -1)
echo "$TOKEN" >"$WORK/join-token"
# -D/-strace: qemu writes every guest syscall of the agent to a file (the driver check below).
AGENT_PID=$(bg agent-arm ip netns exec arm-r1 qemu-aarch64 -L "$AARCH64_SYSROOT" \
  -D "$WORK/qemu-syscalls.log" -strace "$ARM_AGENT" start --proxy "10.79.0.1:$TUNNEL_PORT" \
  --token-file "$WORK/join-token" --ca-pin "$PIN" --node-name node-arm --data-dir "$WORK/agent-arm" \
  --label arch=aarch64 --forward ssh=127.0.0.1:2222 $(host_cert_flags node-arm))
online() { "$P" nodes ls --data-dir "$WORK/proxy" | grep -Eq '^node-arm +tunnel +yes'; }
wait_for "node-arm online via its tunnel" 60 online
sshd_cert_from_agent node-arm
check "the agent process is qemu-aarch64 emulating the aarch64 build" \
  test "$(readlink "/proc/$AGENT_PID/exe")" = "$(readlink -f "$(command -v qemu-aarch64)")"
check "the proxy cannot dial into the site (as behind NAT)" \
  bash -c "! timeout 3 bash -c 'exec 3<>/dev/tcp/10.79.0.2/2222' 2>/dev/null"

say "a user logs in and reaches node-arm with plain ssh"
echo "arm-e2e-password" >"$WORK/alice.pw"
"$P" users add alice --roles access --logins root --password-file "$WORK/alice.pw" --data-dir "$WORK/proxy"
"$C" login --proxy "127.0.0.1:$USERS_PORT" --user alice --password-file "$WORK/alice.pw" --ca-pin "$PIN"
"$C" config >"$WORK/ssh_config"
cat >>"$WORK/ssh_config" <<EOF
Host *
  User root
  IdentityFile $(user_key)
  BatchMode yes
EOF
S() { ssh -F "$WORK/ssh_config" "$@"; }
check "ssh node-arm 'echo \$NODE_NAME' prints node-arm" test "$(S node-arm 'echo $NODE_NAME')" = node-arm

head -c 8M /dev/urandom >"$WORK/blob"
SUM=$(sha256sum <"$WORK/blob" | cut -d' ' -f1)
S node-arm "cat > $WORK/node-arm/blob" <"$WORK/blob"
check "8 MiB up to node-arm arrive intact" \
  test "$(S node-arm "sha256sum < $WORK/node-arm/blob" | cut -d' ' -f1)" = "$SUM"
S node-arm "cat $WORK/node-arm/blob" >"$WORK/back"
check "8 MiB down from node-arm arrive intact" test "$(sha256sum <"$WORK/back" | cut -d' ' -f1)" = "$SUM"

say "the agent ran on epoll: qemu-user refuses io_uring and FusionDriver fell back"
LOG="$WORK/qemu-syscalls.log"
# aarch64 syscall 425 is io_uring_setup; qemu 7.2 names it "Unknown syscall 425" (it has no
# io_uring at all), later versions may name it.
check "io_uring_setup was tried and refused" grep -Eq 'Unknown syscall 425|io_uring_setup\(.*= -1' "$LOG"
check "epoll_create1 succeeded right after it" \
  bash -c "grep -A3 -E 'Unknown syscall 425|io_uring_setup' '$LOG' | grep -Eq 'epoll_create1\\(.*\\) = [0-9]+'"
check "the session went through epoll_pwait" grep -q 'epoll_pwait' "$LOG"
check "no io_uring_enter was ever made" bash -c "! grep -Eq 'Unknown syscall 426|io_uring_enter' '$LOG'"

say "arm end-to-end: all checks passed"
