#!/usr/bin/env bash
# The README's main command: on one machine, start a proxy, join an agent whose node sits
# behind NAT (a network namespace the proxy cannot dial), log a user in, and reach the node
# with plain `ssh node-r1` through the reverse tunnel. Run as root on Debian (it installs
# openssh-server, iproute2, iptables and curl when missing). Everything is removed at the end;
# KEEP_WORK=1 keeps the working directory with every log.
source "$(dirname "$0")/lib.sh"
trap cleanup EXIT

ensure_packages
build

say "1. creating cluster demo.example.com in $WORK/proxy"
"$BIN/remoteler-proxy" init --cluster demo.example.com --data-dir "$WORK/proxy" --host 10.77.0.1 | tee "$WORK/init.txt"
PIN=$(grep -o 'sha256:[0-9a-f]\{64\}' "$WORK/init.txt" | head -1)

say "2. a NAT'd edge site: namespace demo-r1 (10.77.0.2) can dial out, nothing can dial in"
make_nat_site demo-r1 10.77.0.1 10.77.0.2

USERS_PORT=$(free_port); TUNNEL_PORT=$(free_port); AUTH_PORT=$(free_port); METRICS_PORT=$(free_port)
say "3. starting remoteler-proxy: users 127.0.0.1:$USERS_PORT, tunnels 10.77.0.1:$TUNNEL_PORT, metrics 127.0.0.1:$METRICS_PORT"
bg proxy "$BIN/remoteler-proxy" start --data-dir "$WORK/proxy" \
  --users "127.0.0.1:$USERS_PORT" --tunnels "10.77.0.1:$TUNNEL_PORT" --auth "127.0.0.1:$AUTH_PORT" \
  --metrics "127.0.0.1:$METRICS_PORT" >/dev/null
wait_for "the proxy to listen" 20 test -f "$WORK/proxy/proxy.ready"

say "4. node-r1: a real sshd on 127.0.0.1:2222 inside the site"
start_sshd node-r1 2222 demo-r1

say "5. a join token, and the agent inside the site joining with it"
# The token goes into a file the agent reads (--token-file), never onto a command line.
TOKEN=$("$BIN/remoteler-proxy" tokens add --kind node --node node-r1 --ttl 15m --data-dir "$WORK/proxy" | grep -o '[0-9a-f]\{64\}' | head -1)
(umask 077; echo "$TOKEN" >"$WORK/join-token")
echo "token: ${TOKEN:0:8}... (single use, 15 minutes, only for node-r1)"
bg agent ip netns exec demo-r1 "$BIN/remoteler-agent" start --proxy "10.77.0.1:$TUNNEL_PORT" \
  --token-file "$WORK/join-token" --ca-pin "$PIN" --node-name node-r1 --data-dir "$WORK/agent" \
  --label env=edge --forward ssh=127.0.0.1:2222 $(host_cert_flags node-r1) >/dev/null
export REMOTELER_HOME="$WORK/home"
wait_for "node-r1 to come online" 30 sh -c "'$BIN/remoteler-proxy' nodes ls --data-dir '$WORK/proxy' | grep -q 'node-r1.*tunnel.*yes'"
"$BIN/remoteler-proxy" nodes ls --data-dir "$WORK/proxy"
# The agent had node-r1's sshd host key certified by the cluster; sshd loads it on reload.
sshd_cert_from_agent node-r1

say "6. user alice, and her login"
echo "correct horse battery staple" >"$WORK/alice.password"
"$BIN/remoteler-proxy" users add alice --roles access --logins root --password-file "$WORK/alice.password" --data-dir "$WORK/proxy"
"$BIN/remoteler" login --proxy "127.0.0.1:$USERS_PORT" --user alice --password-file "$WORK/alice.password" --ca-pin "$PIN"
"$BIN/remoteler" ls

say "7. the ssh_config block that makes plain 'ssh node-r1' work"
"$BIN/remoteler" config | tee "$WORK/ssh_config"
cat >>"$WORK/ssh_config" <<EOF
Host *
  User root
  IdentityFile $(user_key)
EOF

say "8. ssh node-r1 'echo hello from \$NODE_NAME; uname -n'  (through the reverse tunnel; its host key verified by the cluster's host CA)"
ssh -F "$WORK/ssh_config" node-r1 'echo "hello from $NODE_NAME"; uname -n'

say "9. the proxy's own view: remoteler-proxy status, and its Prometheus metrics"
"$BIN/remoteler-proxy" status --data-dir "$WORK/proxy"
curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" | grep -E '^remoteler_(tunnels|sessions_total|session_bytes_total)'

say "done: the proxy never dialled the site; the agent's tunnel carried the session"
