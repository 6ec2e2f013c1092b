#!/usr/bin/env bash
# End-to-end: the real binaries, real TLS, Debian's sshd and the real OpenSSH client.
#   node-r1  sshd + agent in a NAT'd namespace; reached only through the agent's tunnel
#   node-a   sshd on the host; its agent registers through the auth listener; dialled directly
#   node-b   sshd on the host; listed only in the proxy's config; dialled directly
# Checks commands and 64 MiB copies each way on all three, the error paths, and recovery
# after killing the agent and the proxy. Every check fails the script when it does not hold.
source "$(dirname "$0")/lib.sh"
trap cleanup EXIT
ensure_packages
build

P="$BIN/remoteler-proxy"; A="$BIN/remoteler-agent"; C="$BIN/remoteler"
export REMOTELER_HOME="$WORK/home"
check() { local what=$1; shift; "$@" || fail "$what"; echo "ok - $what"; }
contains() { grep -q -- "$2" <<<"$1" || { echo "--- got:"; echo "$1"; fail "expected to find: $2"; }; }

say "cluster, sites and nodes"
"$P" init --cluster e2e.test --data-dir "$WORK/proxy" --host 10.78.0.1 >"$WORK/init.txt"
PIN=$(grep -o 'sha256:[0-9a-f]\{64\}' "$WORK/init.txt" | head -1)
[ -n "$PIN" ] || fail "init printed no CA pin"
make_nat_site e2e-r1 10.78.0.1 10.78.0.2
USERS_PORT=$(free_port); TUNNEL_PORT=$(free_port); AUTH_PORT=$(free_port)
SSH_A=$(free_port); SSH_B=$(free_port)
start_sshd node-r1 2222 e2e-r1
start_sshd node-a "$SSH_A"
start_sshd node-b "$SSH_B"
cat >"$WORK/proxy.toml" <<EOF
cluster_name = "e2e.test"
data_dir = "$WORK/proxy"
[listen]
users = "127.0.0.1:$USERS_PORT"
tunnels = "10.78.0.1:$TUNNEL_PORT"
auth = "127.0.0.1:$AUTH_PORT"
metrics = "off"
[auth]
# node-a's agent registers its sshd on 127.0.0.1: loopback is refused unless listed.
register_networks = ["127.0.0.0/8"]
[keepalive]
interval = "1s"
count = 3
[resume]
grace = "30s"
[[nodes]]
name = "node-b"
address = "127.0.0.1:$SSH_B"
labels = { env = "lan" }
EOF
start_proxy() {
  rm -f "$WORK/proxy/proxy.ready"
  PROXY_PID=$(bg proxy "$P" start --config "$WORK/proxy.toml")
  wait_for "the proxy to listen" 30 test -f "$WORK/proxy/proxy.ready"
}
start_proxy

token() { "$P" tokens add --kind node --ttl 15m --data-dir "$WORK/proxy" | grep -o '[0-9a-f]\{64\}' | head -1; }
# start_agent_r1 [TOKEN]: without a token the agent uses the identity it stored at its join.
start_agent_r1() {
  local token=()
  [ -n "${1:-}" ] && token=(--token "$1")
  AGENT_R1_PID=$(bg agent-r1 ip netns exec e2e-r1 "$A" start --proxy "10.78.0.1:$TUNNEL_PORT" \
    "${token[@]}" --ca-pin "$PIN" --node-name node-r1 --data-dir "$WORK/agent-r1" \
    --label env=edge --forward ssh=127.0.0.1:2222 $(host_cert_flags node-r1))
}
start_agent_r1 "$(token)"
bg agent-a "$A" start --auth "127.0.0.1:$AUTH_PORT" --token "$(token)" --ca-pin "$PIN" \
  --node-name node-a --data-dir "$WORK/agent-a" --forward "ssh=127.0.0.1:$SSH_A" \
  $(host_cert_flags node-a) >/dev/null
online() { "$P" nodes ls --data-dir "$WORK/proxy" | grep -Eq "^$1 +$2 +yes"; }
offline() { "$P" nodes ls --data-dir "$WORK/proxy" | grep -Eq "^$1 +$2 +no"; }
gone() { while kill -0 "$1" 2>/dev/null; do sleep 0.1; done; }
wait_for "node-r1 online via tunnel" 30 online node-r1 tunnel
wait_for "node-a online via direct" 30 online node-a direct
# Host certificates: the agents ask for theirs; node-b is static, the operator signs it.
sshd_cert_from_agent node-r1
sshd_cert_from_agent node-a
sshd_cert_static node-b "$WORK/proxy"

say "the proxy cannot dial into the site (as behind NAT)"
check "10.78.0.2:2222 is unreachable from the host" \
  bash -c "! timeout 3 bash -c 'exec 3<>/dev/tcp/10.78.0.2/2222' 2>/dev/null"

say "user login and listing"
echo "s3cret-e2e-password" >"$WORK/alice.pw"
"$P" users add alice --roles access --logins root --password-file "$WORK/alice.pw" --data-dir "$WORK/proxy"
"$C" login --proxy "127.0.0.1:$USERS_PORT" --user alice --password-file "$WORK/alice.pw" --ca-pin "$PIN"
LS=$("$C" ls)
contains "$LS" "node-r1"; contains "$LS" "node-a"; contains "$LS" "node-b"
echo "ok - ls lists node-r1, node-a, node-b"
grep -rq "s3cret-e2e-password" "$WORK"/*.log "$WORK/proxy/audit.log" && fail "a password reached a log"
echo "ok - no password in any log"

"$C" config >"$WORK/ssh_config"
cat >>"$WORK/ssh_config" <<EOF
Host *
  User root
  IdentityFile $(user_key)
  BatchMode yes
EOF
S() { ssh -F "$WORK/ssh_config" "$@"; }
contains "$(cat "$WORK/ssh_config")" "StrictHostKeyChecking yes"
grep -q '^@cert-authority .*\*\.e2e\.test ssh-ed25519 ' "$REMOTELER_HOME/known_hosts" \
  || fail "known_hosts has no @cert-authority line for the cluster's nodes"
echo "ok - remoteler config verifies host keys against the cluster's host CA"

say "commands and 64 MiB each way on every node"
head -c 64M /dev/urandom >"$WORK/blob"
SUM=$(sha256sum <"$WORK/blob" | cut -d' ' -f1)
for node in node-r1 node-a node-b; do
  check "ssh $node runs a command on $node" test "$(S "$node" 'echo $NODE_NAME')" = "$node"
  S "$node" "cat > /tmp/remoteler-e2e-$node" <"$WORK/blob"
  check "64 MiB up to $node arrive intact" test "$(S "$node" "sha256sum < /tmp/remoteler-e2e-$node" | cut -d' ' -f1)" = "$SUM"
  S "$node" "cat /tmp/remoteler-e2e-$node" >"$WORK/back-$node"
  check "64 MiB down from $node arrive intact" test "$(sha256sum <"$WORK/back-$node" | cut -d' ' -f1)" = "$SUM"
  S "$node" "rm -f /tmp/remoteler-e2e-$node"; rm -f "$WORK/back-$node"
done
check "remoteler ssh works too" test "$("$C" ssh -o IdentityFile="$(user_key)" -o BatchMode=yes root@node-r1 'echo $NODE_NAME')" = node-r1

say "a running ssh session survives its tunnel's link dying and coming back (RESUME)"
# 12 MiB sent slowly (1 MiB every 0.5 s) while the site drops every packet for 6 s: both
# sides declare the tunnel dead (keepalive), the agent reconnects, the proxy hands the new
# connection to the detached session, and the copy carries on byte-exact.
head -c 12M "$WORK/blob" >"$WORK/slow"
(for i in $(seq 0 11); do dd if="$WORK/slow" bs=1M skip="$i" count=1 status=none; sleep 0.5; done) \
  | S node-r1 "cat > /tmp/remoteler-resume" &
COPY=$!
sleep 1.5
ip netns exec e2e-r1 iptables -I INPUT -i eth0 -j DROP
ip netns exec e2e-r1 iptables -I OUTPUT -o eth0 -j DROP
sleep 6
ip netns exec e2e-r1 iptables -D INPUT -i eth0 -j DROP
ip netns exec e2e-r1 iptables -D OUTPUT -o eth0 -j DROP
wait "$COPY" || fail "the ssh copy failed across the outage"
check "12 MiB sent across a 6 s outage arrive intact" \
  test "$(S node-r1 "sha256sum < /tmp/remoteler-resume" | cut -d' ' -f1)" = "$(sha256sum <"$WORK/slow" | cut -d' ' -f1)"
check "the proxy resumed the tunnel (audit tunnel.resumed)" grep -q '"tunnel.resumed"' "$WORK/proxy/audit.log"
S node-r1 "rm -f /tmp/remoteler-resume"

say "errors are clear"
OUT=$(S node-zz.e2e.test true 2>&1 || true); contains "$OUT" "node-zz"; contains "$OUT" "unknown"
echo "ok - unknown node named in the error"
OUT=$(timeout 10 "$A" start --proxy "10.78.0.1:$TUNNEL_PORT" --token "$(printf '0%.0s' {1..64})" \
  --ca-pin "$PIN" --node-name node-x --data-dir "$WORK/agent-x" 2>&1 || true)
contains "$OUT" "token"
echo "ok - a wrong token is refused with a message about the token"
USED=$(token)
timeout 20 "$A" start --proxy "10.78.0.1:$TUNNEL_PORT" --token "$USED" --ca-pin "$PIN" --node-name node-u1 --data-dir "$WORK/agent-u1" --ssh-host-key "" >"$WORK/agent-u1.log" 2>&1 &
U1=$!
wait_for "node-u1 joined" 20 test -f "$WORK/agent-u1/node.crt"
kill $U1 2>/dev/null || true
OUT=$(timeout 5 "$A" start --proxy "10.78.0.1:$TUNNEL_PORT" --token "$USED" --ca-pin "$PIN" --node-name node-u2 --data-dir "$WORK/agent-u2" 2>&1 || true)
contains "$OUT" "used"
echo "ok - a used-up token is refused"
OUT=$(timeout 5 "$A" start --proxy "10.78.0.1:$TUNNEL_PORT" --token "$(token)" \
  --ca-pin "sha256:$(printf '0%.0s' {1..64})" --node-name node-p --data-dir "$WORK/agent-p" 2>&1 || true)
contains "$OUT" "pin"
echo "ok - a proxy whose CA does not match the pin is refused"

# A node whose agent forwards only "web": ssh to it is refused by the agent itself.
start_sshd node-w "$(free_port)" >/dev/null
bg agent-w "$A" start --proxy "10.78.0.1:$TUNNEL_PORT" --token "$(token)" --ca-pin "$PIN" \
  --node-name node-w --data-dir "$WORK/agent-w" --forward web=127.0.0.1:9 --ssh-host-key "" >/dev/null
wait_for "node-w online" 30 online node-w tunnel
OUT=$(S node-w.e2e.test true 2>&1 || true); contains "$OUT" "not allowed"
echo "ok - a forward the agent does not allow is refused"

# Another cluster's certificate is refused.
"$P" init --cluster other.test --data-dir "$WORK/other" >/dev/null
cp -r "$REMOTELER_HOME" "$WORK/home-good"
OTHER_PORT=$(free_port)
bg other "$P" start --data-dir "$WORK/other" --users "127.0.0.1:$OTHER_PORT" --tunnels "127.0.0.1:$(free_port)" --auth "127.0.0.1:$(free_port)" --metrics off >/dev/null
wait_for "the other proxy" 30 test -f "$WORK/other/proxy.ready"
"$P" users add mallory --roles access --logins root --password-file "$WORK/alice.pw" --data-dir "$WORK/other"
OTHER_PIN=$(grep -o 'sha256:[0-9a-f]\{64\}' <("$P" status --data-dir "$WORK/other") | head -1)
REMOTELER_HOME="$WORK/home-other" "$C" login --proxy "127.0.0.1:$OTHER_PORT" --user mallory --password-file "$WORK/alice.pw" --ca-pin "$OTHER_PIN"
cp "$WORK/home-other/user.crt" "$WORK/home-other/user.key" "$REMOTELER_HOME/"
OUT=$(S node-r1 true 2>&1 || true)
[ -z "$(S node-r1 'echo reached' 2>/dev/null || true)" ] || fail "a certificate of another CA got through"
echo "ok - a user certificate from another CA is refused"
rm -rf "$REMOTELER_HOME"; cp -r "$WORK/home-good" "$REMOTELER_HOME"

# An expired login.
"$C" login --proxy "127.0.0.1:$USERS_PORT" --user alice --password-file "$WORK/alice.pw" --ca-pin "$PIN" --ttl 1s
sleep 2
OUT=$(S node-r1 true 2>&1 || true); contains "$OUT" "expired"
echo "ok - an expired login is reported before connecting"
# Hide the expiry from the client: the proxy itself must refuse the expired certificate.
python3 - "$REMOTELER_HOME/profile.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1])); p["expires_unix"] = 4102444800
json.dump(p, open(sys.argv[1], "w"))
PY
OUT=$(S node-r1 true 2>&1 || true); contains "$OUT" "log in again"
echo "ok - the proxy refuses an expired user certificate, and the client says what to do"
"$C" login --proxy "127.0.0.1:$USERS_PORT" --user alice --password-file "$WORK/alice.pw" --ca-pin "$PIN"

say "recovery"
kill -9 "$AGENT_R1_PID"; gone "$AGENT_R1_PID"
wait_for "node-r1 listed offline after its agent died" 20 offline node-r1 tunnel
start_agent_r1 ""
wait_for "node-r1 back after agent restart" 30 online node-r1 tunnel
check "ssh node-r1 after agent restart" test "$(S node-r1 'echo $NODE_NAME')" = node-r1
kill "$PROXY_PID"; gone "$PROXY_PID"
start_proxy
wait_for "node-r1 back by itself after proxy restart" 60 online node-r1 tunnel
wait_for "node-a back by itself after proxy restart" 60 online node-a direct
check "ssh node-r1 after proxy restart" test "$(S node-r1 'echo $NODE_NAME')" = node-r1
check "ssh node-a after proxy restart" test "$(S node-a 'echo $NODE_NAME')" = node-a

say "audit"
check "session records in the audit log" grep -q '"session.end"' "$WORK/proxy/audit.log"
check "the audit log names node-r1 sessions" grep -q 'node-r1' "$WORK/proxy/audit.log"

say "end-to-end: all checks passed"
