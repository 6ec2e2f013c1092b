#!/usr/bin/env bash
# End-to-end for trusted clusters: the real binaries, Debian's sshd and the real OpenSSH client.
#
#   host ── 10.81.1.1/.2 ── cl-root ── 10.81.0.1/.2 ── cl-leaf
#
#   cl-root  the ROOT proxy (cluster root.test): users on 10.81.1.2:3023 (the host's ssh
#            reaches it), tunnels on 10.81.0.1:3024; its own node-a (sshd, static [[nodes]])
#   cl-leaf  the LEAF proxy (cluster leaf): outbound only (the conntrack rule of DESIGN.md),
#            so the root cannot dial it; its node-a (sshd, static [[nodes]]) and node-r (sshd
#            behind a leaf agent's tunnel)
#
# The leaf joins the root once with a trusted-cluster token and keeps tunnels to it. Root users
# reach both leaf nodes with plain `ssh NODE.leaf` (and `remoteler ssh --cluster leaf`), while
# `ssh node-a` is the root's own node-a; role_map allows and denies as configured; the leaf's
# audit log records the sessions (user, home cluster, mapped roles) and the root's has no
# session record of them; `enabled = false` plus a leaf restart cuts access with a clear
# message. Every check fails the script when it does not hold.
source "$(dirname "$0")/lib.sh"
trap cleanup EXIT
ensure_packages
build

P="$BIN/remoteler-proxy"; A="$BIN/remoteler-agent"; C="$BIN/remoteler"
export REMOTELER_HOME="$WORK/home"
check() { local what=$1; shift; "$@" || fail "$what"; echo "ok - $what"; }
contains() { grep -q -- "$2" <<<"$1" || { echo "--- got:"; echo "$1"; fail "expected to find: $2"; }; }
lacks() { ! grep -q -- "$2" <<<"$1" || { echo "--- got:"; echo "$1"; fail "expected NOT to find: $2"; }; }
in_root() { ip netns exec cl-root "$@"; }
in_leaf() { ip netns exec cl-leaf "$@"; }

# cl_sshd DIR NODE_NAME PORT NS: a real sshd on 127.0.0.1:PORT inside NS; `SetEnv NODE_NAME`
# tells which one answered (the root and the leaf both have a node-a).
cl_sshd() {
  local dir="$WORK/$1" name=$2 port=$3 ns=$4
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
SetEnv NODE_NAME=$name
LogLevel ERROR
EOF
  echo "$port $ns" >"$dir/listen"
  ip netns exec "$ns" /usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log"
}

say "network: host - cl-root - cl-leaf (the leaf behind NAT)"
for ns in cl-root cl-leaf; do ip netns del "$ns" 2>/dev/null || true; done
ip link del v-cl-root 2>/dev/null || true
ip netns add cl-root; NETNS+=(cl-root)
ip netns add cl-leaf; NETNS+=(cl-leaf)
ip link add v-cl-root type veth peer name eth0 netns cl-root
ip addr add 10.81.1.1/30 dev v-cl-root; ip link set v-cl-root up
in_root ip addr add 10.81.1.2/30 dev eth0; in_root ip link set eth0 up; in_root ip link set lo up
in_root ip link add cl-leaf0 type veth peer name eth0 netns cl-leaf
in_root ip addr add 10.81.0.1/30 dev cl-leaf0; in_root ip link set cl-leaf0 up
in_leaf ip addr add 10.81.0.2/30 dev eth0; in_leaf ip link set eth0 up; in_leaf ip link set lo up
in_leaf ip route add default via 10.81.0.1
in_leaf iptables -A INPUT -i eth0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
in_leaf iptables -A INPUT -i eth0 -j DROP

say "two clusters, three sshds"
"$P" init --cluster root.test --data-dir "$WORK/root" --host 10.81.0.1 --host 10.81.1.2 >"$WORK/root-init.txt"
ROOT_PIN=$(grep -o 'sha256:[0-9a-f]\{64\}' "$WORK/root-init.txt" | head -1)
"$P" init --cluster leaf --data-dir "$WORK/leaf" --host 127.0.0.1 >"$WORK/leaf-init.txt"
LEAF_PIN=$(grep -o 'sha256:[0-9a-f]\{64\}' "$WORK/leaf-init.txt" | head -1)
[ -n "$ROOT_PIN" ] && [ -n "$LEAF_PIN" ] || fail "init printed no CA pin"
cl_sshd root-node-a root-node-a 2201 cl-root
cl_sshd leaf-node-a leaf-node-a 2202 cl-leaf
cl_sshd leaf-node-r leaf-node-r 2203 cl-leaf

cat >"$WORK/root.toml" <<EOF
cluster_name = "root.test"
data_dir = "$WORK/root"
workers = 2
[listen]
users = "10.81.1.2:3023"
tunnels = "10.81.0.1:3024"
auth = "127.0.0.1:3025"
metrics = "off"
[keepalive]
interval = "1s"
count = 3
[[nodes]]
name = "node-a"
address = "127.0.0.1:2201"
[[roles]]
name = "dev"
logins = ["{{user.logins}}"]
allow = { nodes = ["*"], clusters = ["leaf"] }
[[roles]]
name = "team-blue"
logins = ["root"]
allow = { clusters = ["leaf"] }
[[roles]]
name = "intern"
logins = ["root"]
allow = { nodes = ["*"], clusters = ["*"] }
[[roles]]
name = "local"
logins = ["root"]
allow = { nodes = ["*"] }
EOF
start_root() {
  rm -f "$WORK/root/proxy.ready"
  ROOT_PID=$(bg root ip netns exec cl-root "$P" start --config "$WORK/root.toml")
  wait_for "the root proxy to listen" 30 test -f "$WORK/root/proxy.ready"
}
start_root

TOKEN=$("$P" tokens add --kind trusted-cluster --ttl 15m --data-dir "$WORK/root" --proxy 10.81.0.1:3024 | tee "$WORK/token.txt" | grep -o '[0-9a-f]\{64\}' | head -1)
contains "$(cat "$WORK/token.txt")" "kind: trusted-cluster"
contains "$(cat "$WORK/token.txt")" "[[trusted_clusters]]"
echo "$TOKEN" >"$WORK/leaf-token"
echo "ok - tokens add --kind trusted-cluster prints the leaf's [[trusted_clusters]] entry"

write_leaf_config() {
  cat >"$WORK/leaf.toml" <<EOF
cluster_name = "leaf"
data_dir = "$WORK/leaf"
workers = 2
[listen]
users = "0.0.0.0:3023"
tunnels = "127.0.0.1:3024"
auth = "127.0.0.1:3025"
metrics = "off"
[keepalive]
interval = "1s"
count = 3
[[nodes]]
name = "node-a"
address = "127.0.0.1:2202"
labels = { env = "lab" }
[[roles]]
name = "leaf-dev"
logins = ["root"]
allow = { nodes = ["*"] }
[[roles]]
name = "blue"
logins = ["root"]
allow = { nodes = ["node-r"] }
[[trusted_clusters]]
name = "root.test"
proxy = "10.81.0.1:3024"
token_file = "$WORK/leaf-token"
ca_pin = "$ROOT_PIN"
enabled = $1
role_map = [
  { remote = "dev", local = ["leaf-dev"] },
  { remote = "^team-(.+)\$", local = ["\$1"] },
]
EOF
}
write_leaf_config true
start_leaf() {
  rm -f "$WORK/leaf/proxy.ready"
  LEAF_PID=$(bg "leaf-$1" ip netns exec cl-leaf "$P" start --config "$WORK/leaf.toml")
  wait_for "the leaf proxy to listen" 30 test -f "$WORK/leaf/proxy.ready"
}
start_leaf 1
LEAF_NODE_TOKEN=$("$P" tokens add --kind node --ttl 15m --data-dir "$WORK/leaf" | grep -o '[0-9a-f]\{64\}' | head -1)
bg agent-r ip netns exec cl-leaf "$A" start --proxy 127.0.0.1:3024 --token "$LEAF_NODE_TOKEN" --ca-pin "$LEAF_PIN" \
  --node-name node-r --data-dir "$WORK/agent-r" --forward ssh=127.0.0.1:2203 \
  --ssh-host-key "$WORK/leaf-node-r/host_key.pub" --ssh-host-cert "$WORK/leaf-node-r/host_key-cert.pub" >/dev/null

clusters() { "$P" clusters ls --data-dir "$WORK/root"; }
leaf_up_with() { clusters | grep -Eq "^leaf +yes +$1 "; }
wait_for "leaf online at the root with its 2 nodes" 40 leaf_up_with 2
check "the leaf stored its cluster certificate and key (0600) and the root CA" \
  test "$(stat -c %a "$WORK/leaf/trusted/root.test/cluster.key")" = 600 -a -f "$WORK/leaf/trusted/root.test/ca.crt"
check "the root recorded the trusted leaf" grep -q '"name": "leaf"' "$WORK/root/state.json"
check "the token is used up (a second join would fail)" \
  bash -c "\"$P\" tokens ls --data-dir \"$WORK/root\" | grep trusted-cluster | grep -q 'used up'"
echo "--- clusters ls:"; clusters

say "host certificates: each cluster's host CA certifies its own nodes"
# Static nodes are signed by their own cluster's operator; node-r's agent asks the leaf.
"$P" ssh-host-cert sign --node node-a --host-key "$WORK/root-node-a/host_key.pub" \
  --out "$WORK/root-node-a/host_key-cert.pub" --data-dir "$WORK/root" 2>/dev/null
reload_sshd root-node-a
"$P" ssh-host-cert sign --node node-a --host-key "$WORK/leaf-node-a/host_key.pub" \
  --out "$WORK/leaf-node-a/host_key-cert.pub" --data-dir "$WORK/leaf" 2>/dev/null
reload_sshd leaf-node-a
sshd_cert_from_agent leaf-node-r
check "the root recorded the leaf's SSH host CA at the join" grep -q '"ssh_host_ca": "ssh-ed25519 ' "$WORK/root/state.json"

say "the root cannot dial into the leaf (outbound only)"
check "10.81.0.2:3023 is unreachable from cl-root" \
  bash -c "! ip netns exec cl-root timeout 3 bash -c 'exec 3<>/dev/tcp/10.81.0.2/3023' 2>/dev/null"

say "root users"
echo "pw-for-clusters-e2e" >"$WORK/pw"
add_user() { "$P" users add "$1" --roles "$2" --logins root --password-file "$WORK/pw" --config "$WORK/root.toml" >/dev/null; }
add_user alice dev; add_user bob team-blue; add_user carol intern; add_user dave local
login_as() { "$C" login --proxy 10.81.1.2:3023 --user "$1" --password-file "$WORK/pw" --ca-pin "$ROOT_PIN" >/dev/null; }
login_as alice
OUT=$("$C" clusters); contains "$OUT" "leaf"; contains "$OUT" "yes"
echo "ok - remoteler clusters lists leaf online"
OUT=$("$C" ls --cluster leaf); contains "$OUT" "node-a"; contains "$OUT" "node-r"; contains "$OUT" "env=lab"
echo "ok - remoteler ls --cluster leaf lists node-a and node-r"
"$C" config >"$WORK/ssh_config"
contains "$(cat "$WORK/ssh_config")" "Host node-a.leaf node-r.leaf \*.leaf"
contains "$(cat "$WORK/ssh_config")" "proxy ssh --cluster leaf"
echo "ok - remoteler config emits node-a.leaf and node-r.leaf with --cluster leaf"
KH=$(cat "$REMOTELER_HOME/known_hosts")
contains "$KH" '^@cert-authority node-a,\*\.root\.test,!\*\.leaf ssh-ed25519 .* remoteler-host-ca@root.test$'
contains "$KH" '^@cert-authority \*\.leaf ssh-ed25519 .* remoteler-host-ca@leaf$'
echo "ok - known_hosts trusts the root's host CA for its nodes and the leaf's for node names under leaf only"
cat >>"$WORK/ssh_config" <<EOF
Host *
  User root
  IdentityFile $(user_key)
  BatchMode yes
EOF
S() { ssh -F "$WORK/ssh_config" "$@"; }

say "same names, different clusters"
check "ssh node-a reaches the root's node-a" test "$(S node-a 'echo $NODE_NAME')" = root-node-a
check "ssh node-a.leaf reaches the leaf's node-a (direct)" test "$(S node-a.leaf 'echo $NODE_NAME')" = leaf-node-a
check "ssh node-r.leaf reaches the leaf's node-r (leaf agent tunnel)" test "$(S node-r.leaf 'echo $NODE_NAME')" = leaf-node-r
check "remoteler ssh --cluster leaf works too" \
  test "$("$C" ssh --cluster leaf -o IdentityFile="$(user_key)" -o BatchMode=yes root@node-r 'echo $NODE_NAME')" = leaf-node-r

say "byte-exact transfers through both clusters"
head -c 6M /dev/urandom >"$WORK/blob"
SUM=$(sha256sum <"$WORK/blob" | cut -d' ' -f1)
for node in node-a.leaf node-r.leaf; do
  S "$node" "cat > /tmp/remoteler-cl-$node" <"$WORK/blob"
  check "6 MiB up to $node arrive intact" test "$(S "$node" "sha256sum < /tmp/remoteler-cl-$node" | cut -d' ' -f1)" = "$SUM"
  S "$node" "cat /tmp/remoteler-cl-$node" >"$WORK/back"
  check "6 MiB down from $node arrive intact" test "$(sha256sum <"$WORK/back" | cut -d' ' -f1)" = "$SUM"
  S "$node" "rm -f /tmp/remoteler-cl-$node"
done

say "the leaf's link cut for 5 s during a copy: the cluster tunnel resumes"
# Every packet of the leaf's namespace dropped, no FIN: both proxies notice through their
# keepalives (1 s x 3), the leaf reconnects when the link is back and RESUMEs; the copy
# through the cluster tunnel only pauses.
cut_leaf() { in_leaf iptables -I INPUT -i eth0 -j DROP; in_leaf iptables -I OUTPUT -o eth0 -j DROP; }
mend_leaf() { in_leaf iptables -D INPUT -i eth0 -j DROP; in_leaf iptables -D OUTPUT -o eth0 -j DROP; }
(for i in 0 1 2 3 4 5; do dd if="$WORK/blob" bs=1M skip="$i" count=1 status=none; sleep 0.5; done) \
  | S node-r.leaf "cat > /tmp/remoteler-cl-cut" &
COPY=$!
sleep 1; cut_leaf; sleep 5; mend_leaf
wait "$COPY" || fail "the copy to node-r.leaf failed across the leaf's 5 s outage"
check "6 MiB to node-r.leaf across the leaf's outage arrive intact" \
  test "$(S node-r.leaf "sha256sum < /tmp/remoteler-cl-cut" | cut -d' ' -f1)" = "$SUM"
S node-r.leaf "rm -f /tmp/remoteler-cl-cut"
check "the root kept the leaf's tunnel (audit cluster.detached)" grep -q '"cluster.detached"' "$WORK/root/audit.log"
check "the leaf came back and resumed it (audit cluster.resumed)" grep -q '"cluster.resumed"' "$WORK/root/audit.log"
check "no session on the leaf ended with an error" bash -c "! grep '\"session.end\"' '$WORK/leaf/audit.log' | grep -v '\"reason\":\"closed\"' | grep -q ."

say "role mapping"
login_as bob   # team-blue -> blue: node-r only
check "bob (team-blue -> blue) reaches node-r.leaf" test "$(S node-r.leaf 'echo $NODE_NAME')" = leaf-node-r
OUT=$(S node-a.leaf true 2>&1 || true); contains "$OUT" "access denied"; contains "$OUT" "blue"
echo "ok - bob is refused node-a.leaf by the leaf's role blue"
login_as carol # intern: allowed by the root, mapped to nothing by the leaf
OUT=$(S node-r.leaf true 2>&1 || true); contains "$OUT" "maps to a role of cluster leaf"
echo "ok - carol (intern, no role_map rule) gets nothing on the leaf"
login_as dave  # local: the root does not let it reach any leaf
OUT=$(S node-r.leaf true 2>&1 || true); contains "$OUT" "allows trusted cluster leaf"
echo "ok - dave is refused by the root (no allow.clusters)"
OUT=$("$C" ls --cluster leaf 2>&1 || true); contains "$OUT" "access denied"
echo "ok - dave cannot list the leaf's nodes"
login_as alice

say "audit: the leaf records its sessions, the root does not"
LEAF_AUDIT="$WORK/leaf/audit.log"; ROOT_AUDIT="$WORK/root/audit.log"
sleep 1 # the audit writer's group commit
START=$(grep '"session.start"' "$LEAF_AUDIT" | grep '"user":"alice"' | grep '"node":"node-r"' | head -1)
[ -n "$START" ] || { cat "$LEAF_AUDIT"; fail "no session.start of alice on node-r in the leaf's audit log"; }
contains "$START" '"user_cluster":"root.test"'; contains "$START" '"roles":\["leaf-dev"\]'; contains "$START" '"client_addr":"10.81.1.1:'
echo "ok - leaf session.start: user alice, home cluster root.test, mapped roles [leaf-dev], client address"
END=$(grep '"session.end"' "$LEAF_AUDIT" | grep '"user":"alice"' | grep '"node":"node-r"' | tail -1)
contains "$END" '"bytes_from_user":'; contains "$END" '"duration_ms":'; contains "$END" '"reason":'
echo "ok - leaf session.end with bytes, duration and reason"
check "the leaf's log has bob's mapped role blue" grep -q '"roles":\["blue"\].*"user":"bob"' "$LEAF_AUDIT"
check "the leaf's log has the refusals (access.denied)" grep -q '"access.denied".*"user":"carol"' "$LEAF_AUDIT"
check "the root's log has no session record of leaf nodes" \
  bash -c "! grep '\"session\\.' '$ROOT_AUDIT' | grep -q -e 'node-r' -e 'leaf'"
check "the root's log has its own node-a session" grep -q '"session.start".*"node":"node-a"' "$ROOT_AUDIT"
N=$(grep -c '"session.start"' "$ROOT_AUDIT")
check "the root's log has exactly its own sessions ($N = 1)" test "$N" = 1
check "both logs have cluster.connect" bash -c "grep -q cluster.connect '$ROOT_AUDIT' && grep -q cluster.connect '$LEAF_AUDIT'"
check "both logs have the join" bash -c "grep -q '\"cluster.join\".*\"success\":true' '$ROOT_AUDIT' && grep -q '\"cluster.join\".*\"success\":true' '$LEAF_AUDIT'"
check "the root's log has dave's refusal" grep -q '"access.denied".*"user":"dave"' "$ROOT_AUDIT"

say "the leaf's cluster certificate gives nothing on the root but the tunnel"
mkdir -p "$WORK/home-leafcert"
cp "$REMOTELER_HOME"/* "$WORK/home-leafcert/" 2>/dev/null || true
cp "$WORK/leaf/trusted/root.test/cluster.crt" "$WORK/home-leafcert/user.crt"
cp "$WORK/leaf/trusted/root.test/cluster.key" "$WORK/home-leafcert/user.key"
OUT=$(REMOTELER_HOME="$WORK/home-leafcert" "$C" ssh -o BatchMode=yes -o UserKnownHostsFile="$WORK/known_hosts" node-a true 2>&1 || true)
contains "$OUT" "user certificate is required"
echo "ok - a cluster certificate is refused on the users' listener"

say "a restart of the root: the leaf comes back by itself"
kill "$ROOT_PID"; while kill -0 "$ROOT_PID" 2>/dev/null; do sleep 0.1; done
start_root
wait_for "leaf back at the restarted root" 60 leaf_up_with 2
check "ssh node-a.leaf after the root's restart" test "$(S node-a.leaf 'echo $NODE_NAME')" = leaf-node-a

say "disabling trust cuts access"
write_leaf_config false
kill "$LEAF_PID"; while kill -0 "$LEAF_PID" 2>/dev/null; do sleep 0.1; done
start_leaf 2
wait_for "the root to list leaf offline" 20 bash -c "\"$P\" clusters ls --data-dir \"$WORK/root\" | grep -Eq '^leaf +no '"
OUT=$(S node-a.leaf true 2>&1 || true); contains "$OUT" "trusted cluster leaf is not connected"
echo "ok - with enabled = false the root's users get a clear refusal"
check "the leaf logged that the trust is disabled" grep -q "trusted cluster disabled" "$WORK/leaf-2.log"
check "the root recorded cluster.disconnect" grep -q '"cluster.disconnect"' "$ROOT_AUDIT"
check "the root's own node-a still works" test "$(S node-a 'echo $NODE_NAME')" = root-node-a

say "re-enabling needs no new token; the root can revoke the leaf itself"
write_leaf_config true
rm -f "$WORK/leaf-token" # the stored certificate is enough now
kill "$LEAF_PID"; while kill -0 "$LEAF_PID" 2>/dev/null; do sleep 0.1; done
start_leaf 3
wait_for "leaf back online after re-enabling, without a token" 40 leaf_up_with 2
check "ssh node-r.leaf after re-enabling" test "$(S node-r.leaf 'echo $NODE_NAME')" = leaf-node-r
"$P" clusters rm leaf --data-dir "$WORK/root"
wait_for "the root to close the revoked leaf's tunnels" 20 bash -c "\"$P\" clusters ls --data-dir \"$WORK/root\" | grep -Eq '^leaf +no '"
OUT=$(S node-r.leaf true 2>&1 || true); contains "$OUT" "trusted cluster leaf is not connected"
echo "ok - after clusters rm on the root, its users are refused"
wait_for "the leaf's reconnects to be refused as untrusted" 30 grep -q '"cluster.refused".*not a trusted leaf' "$ROOT_AUDIT"
echo "ok - the revoked leaf cannot connect again"

say "end-to-end (trusted clusters): all checks passed"
