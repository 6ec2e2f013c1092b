# Shared by scripts/demo.sh and scripts/e2e.sh: build the binaries, run real OpenSSH servers,
# and make network namespaces that behave like a site behind NAT. Source it; it defines
# functions only. Everything it starts is recorded and stopped by `cleanup`.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="$ROOT/target/${PROFILE_DIR:-debug}"
WORK=${WORK:-$(mktemp -d /tmp/remoteler.XXXXXX)}
mkdir -p "$WORK"
NETNS=()

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local pid ns
  # `bg` often runs in a command substitution (a subshell), so pids go through a file.
  if [ -f "$WORK/pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$WORK/pids"
  fi
  for f in "$WORK"/*/sshd.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  for ns in "${NETNS[@]:-}"; do [ -n "$ns" ] && ip netns del "$ns" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$WORK"; else echo "work directory kept: $WORK"; fi
}

ensure_packages() {
  local need=()
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v ssh >/dev/null || need+=(openssh-client)
  command -v ip >/dev/null || need+=(iproute2)
  command -v iptables >/dev/null || need+=(iptables)
  command -v curl >/dev/null || need+=(curl)
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  mkdir -p /run/sshd
}

build() {
  say "building remoteler-proxy, remoteler-agent, remoteler"
  (cd "$ROOT" && cargo build ${CARGO_PROFILE_FLAG:-} --locked -q -p proxy -p agent -p client)
}

# A free TCP port on 127.0.0.1 (the kernel picks it; a tiny race is acceptable in tests).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_for DESCRIPTION SECONDS COMMAND...: retry COMMAND until it succeeds.
wait_for() {
  local what=$1 secs=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || fail "timed out after ${secs}s waiting for $what"
    sleep 0.2
  done
}

# The key users log in to every sshd with.
user_key() {
  if [ ! -f "$WORK/id_ed25519" ]; then
    ssh-keygen -q -t ed25519 -N '' -f "$WORK/id_ed25519" -C remoteler-test
  fi
  echo "$WORK/id_ed25519"
}

# start_sshd NODE PORT [NETNS]: a real sshd for NODE on 127.0.0.1:PORT (inside NETNS if
# given), its own host key and config; `SetEnv NODE_NAME=NODE` proves which node answered.
start_sshd() {
  local node=$1 port=$2 ns=${3:-}
  local dir="$WORK/$node"
  mkdir -p "$dir"
  ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
  cp "$(user_key).pub" "$dir/authorized_keys"
  cat >"$dir/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_key
HostCertificate $dir/host_key-cert.pub
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
SetEnv NODE_NAME=$node
LogLevel ERROR
EOF
  echo "$port ${ns:-}" >"$dir/listen"
  if [ -n "$ns" ]; then
    ip netns exec "$ns" /usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log"
  else
    /usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log"
  fi
}

# The agent flags that have NODE's sshd host key (from start_sshd) certified by the cluster.
host_cert_flags() {
  echo --ssh-host-key "$WORK/$1/host_key.pub" --ssh-host-cert "$WORK/$1/host_key-cert.pub"
}

# reload_sshd NODE: sshd reads its HostCertificate at start and on SIGHUP; waits until it
# listens again.
reload_sshd() {
  local dir="$WORK/$1" port ns
  read -r port ns <"$dir/listen"
  kill -HUP "$(cat "$dir/sshd.pid")"
  local probe=(bash -c "exec 3<>/dev/tcp/127.0.0.1/$port")
  [ -n "$ns" ] && probe=(ip netns exec "$ns" "${probe[@]}")
  wait_for "sshd of $1 listening again" 10 "${probe[@]}"
}

# sshd_cert_from_agent NODE: waits for NODE's agent to write the host certificate, then has
# sshd load it.
sshd_cert_from_agent() {
  wait_for "the host certificate of $1" 30 test -s "$WORK/$1/host_key-cert.pub"
  reload_sshd "$1"
}

# sshd_cert_static NODE DATA_DIR: a static node (no agent): the operator signs its host key.
sshd_cert_static() {
  "$P" ssh-host-cert sign --node "$1" --host-key "$WORK/$1/host_key.pub" \
    --out "$WORK/$1/host_key-cert.pub" --data-dir "$2" 2>/dev/null
  reload_sshd "$1"
}

# make_nat_site NS HOST_IP SITE_IP: a namespace joined to the host by a veth pair. The site
# can dial out; nothing can dial in (only replies to its own connections are accepted), as
# behind NAT.
make_nat_site() {
  local ns=$1 host_ip=$2 site_ip=$3
  local host_if="v-${ns:0:10}" site_if="eth0"
  ip netns del "$ns" 2>/dev/null || true
  ip link del "$host_if" 2>/dev/null || true
  ip netns add "$ns"
  NETNS+=("$ns")
  ip link add "$host_if" type veth peer name "$site_if" netns "$ns"
  ip addr add "$host_ip/30" dev "$host_if"
  ip link set "$host_if" up
  ip netns exec "$ns" ip addr add "$site_ip/30" dev "$site_if"
  ip netns exec "$ns" ip link set "$site_if" up
  ip netns exec "$ns" ip link set lo up
  ip netns exec "$ns" ip route add default via "$host_ip"
  ip netns exec "$ns" iptables -A INPUT -i "$site_if" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
  ip netns exec "$ns" iptables -A INPUT -i "$site_if" -j DROP
}

# bg NAME COMMAND...: start COMMAND in the background, logging to $WORK/NAME.log.
bg() {
  local name=$1; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  echo $! >>"$WORK/pids"
  echo $!
}
