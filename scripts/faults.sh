#!/usr/bin/env bash
# Fault suite: real binaries, real TLS, Debian's sshd and the OpenSSH client, with the link of
# a NAT'd site cut, agents killed and readers stopped while ssh sessions move data.
#   node-f1  sshd + agent in namespace flt-f1 (10.84.0.2), reached only through the agent's tunnel
#   node-s   sshd on the host, listed in the proxy's config ([[nodes]]), dialled directly
#   flt-u    a user's laptop (10.84.1.2): ssh + `remoteler proxy ssh` in their own namespace
# Scenarios (docs/faults.md): a link cut shorter than resume.grace (sessions resume byte-exact),
# a stalled reader beside a bulk copy on the same tunnel (bounded proxy memory), an agent
# killed with -9 mid-transfer, a link cut longer than the grace, random packet loss; then,
# with the agent's tunnel through a userspace relay: 100 ms of round trip, a stall shorter
# than the keepalive's detection, a stall longer than it (the agent resumes over a new
# connection while the old one stays frozen); the user's own link cut (the client reconnects
# and resumes); a proxy restart (sessions in flight finish during the drain).
# Environment: FAULTS_GRACE (s, default 20), FAULTS_MIB (copy size, default 64),
# FAULTS_LOSS (drop probability, default 0.05; 0 skips the loss scenario), FAULTS_CUT (the
# short cut, s, default 10; keep it under the grace minus about 9 s), FAULTS_NS and FAULTS_NET
# (the site's namespace and the first three octets of its /30, default flt-f1 and 10.84.0),
# FAULTS_STALL (the long stall, s, default 8; more than 6, less than the grace) and
# FAULTS_STALL_AGENT_COUNT (the agent's keepalive count during it, default 3 as the proxy's).
# Files the nodes write go to the work directory (the namespaces share the host's filesystem).
source "$(dirname "$0")/lib.sh"
trap cleanup EXIT
ensure_packages
build

P="$BIN/remoteler-proxy"; A="$BIN/remoteler-agent"; C="$BIN/remoteler"
export REMOTELER_HOME="$WORK/home"
GRACE=${FAULTS_GRACE:-20}
MIB=${FAULTS_MIB:-64}
LOSS=${FAULTS_LOSS:-0.05}
# The agent's [resume] grace is set to the proxy's: a stream survives an outage shorter than
# the smaller of the two.
CUT=${FAULTS_CUT:-10}
# The proxy's drain.timeout (scenario 10).
DRAIN=8
# Scenario 8: the stall (more than the keepalive's 3-4 s and the agent's reconnect, less than
# the grace) and the agent's keepalive count during it (the proxy's is 3: with 3 the agent
# may notice first, and the proxy must give the old connection up for the new one).
STALL=${FAULTS_STALL:-8}
STALL_AGENT_COUNT=${FAULTS_STALL_AGENT_COUNT:-3}
TICKS_N=$((CUT + 30))
# The site's namespace and its /30 (FAULTS_NS, FAULTS_NET): two runs on one machine need
# different ones. The user's laptop (scenario 9) gets the next /24 and its own namespace.
NS=${FAULTS_NS:-flt-f1}; NET=${FAULTS_NET:-10.84.0}; HOST_IP=$NET.1; SITE_IP=$NET.2
USER_NS=${NS%-*}-u; USER_NET=${NET%.*}.$((${NET##*.} + 1))
USER_HOST_IP=$USER_NET.1; USER_IP=$USER_NET.2
ok() { echo "ok - $*"; }
check() { local what=$1; shift; "$@" || fail "$what"; ok "$what"; }
sum() { sha256sum | cut -d' ' -f1; }
# Prints the elapsed seconds of the suite, so a slow scenario shows in the log.
t() { echo "[${SECONDS}s] $*"; }

say "cluster, site and nodes"
"$P" init --cluster faults.test --data-dir "$WORK/proxy" --host "$HOST_IP" >"$WORK/init.txt"
PIN=$(grep -o 'sha256:[0-9a-f]\{64\}' "$WORK/init.txt" | head -1)
[ -n "$PIN" ] || fail "init printed no CA pin"
make_nat_site "$NS" "$HOST_IP" "$SITE_IP"
make_nat_site "$USER_NS" "$USER_HOST_IP" "$USER_IP"
USERS_PORT=$(free_port); TUNNEL_PORT=$(free_port); AUTH_PORT=$(free_port); SSH_S=$(free_port)
start_sshd node-f1 2222 "$NS"
start_sshd node-s "$SSH_S"
cat >"$WORK/proxy.toml" <<EOF
cluster_name = "faults.test"
data_dir = "$WORK/proxy"
[listen]
users = "$HOST_IP:$USERS_PORT"
tunnels = "$HOST_IP:$TUNNEL_PORT"
auth = "127.0.0.1:$AUTH_PORT"
metrics = "off"
[keepalive]
interval = "1s"
count = 3
[resume]
grace = "${GRACE}s"
[drain]
timeout = "${DRAIN}s"
[[nodes]]
name = "node-s"
address = "127.0.0.1:$SSH_S"
EOF
PROXY_PID=$(bg proxy "$P" start --config "$WORK/proxy.toml")
wait_for "the proxy to listen" 30 test -f "$WORK/proxy/proxy.ready"
AUDIT="$WORK/proxy/audit.log"

"$P" tokens add --kind node --ttl 15m --data-dir "$WORK/proxy" | grep -o '[0-9a-f]\{64\}' | head -1 >"$WORK/join-token"
# The agent's keepalive matches the proxy's (1 s x 3); short backoff so it is back soon
# after the link returns.
cat >"$WORK/agent.toml" <<EOF
node_name = "node-f1"
proxy = "$HOST_IP:$TUNNEL_PORT"
data_dir = "$WORK/agent-f1"
ssh_host_key = "$WORK/node-f1/host_key.pub"
ssh_host_cert = "$WORK/node-f1/host_key-cert.pub"
[join]
token_file = "$WORK/join-token"
ca_pin = "$PIN"
[[forwards]]
name = "ssh"
target = "127.0.0.1:2222"
[[forwards]]
name = "zero"
target = "127.0.0.1:2223"
[keepalive]
interval = "1s"
count = 3
[backoff]
min = "200ms"
max = "1s"
[resume]
grace = "${GRACE}s"
EOF
AGENT_LOGS=0
start_agent() {
  AGENT_LOGS=$((AGENT_LOGS + 1))
  AGENT_PID=$(bg "agent-$AGENT_LOGS" ip netns exec "$NS" "$A" start --config "$WORK/agent.toml")
}
start_agent
# The listing is read whole before grep looks at it: `nodes ls | grep -q` would let grep
# exit early, and the listing's write fail (EPIPE), which pipefail counts as a failure.
nodes() { "$P" nodes ls --data-dir "$WORK/proxy"; }
online() { local l; l=$(nodes) && grep -Eq "^$1 +$2 +yes" <<<"$l"; }
offline() { local l; l=$(nodes) && grep -Eq "^$1 +$2 +no" <<<"$l"; }
gone() { while kill -0 "$1" 2>/dev/null; do sleep 0.1; done; }
wait_for "node-f1 online via tunnel" 30 online node-f1 tunnel
# Host certificates: the agent asks for node-f1's; node-s is static, the operator signs it.
sshd_cert_from_agent node-f1
sshd_cert_static node-s "$WORK/proxy"

echo "s3cret-faults-password" >"$WORK/alice.pw"
"$P" users add alice --roles access --logins root --password-file "$WORK/alice.pw" --data-dir "$WORK/proxy" >/dev/null
"$C" login --proxy "$HOST_IP:$USERS_PORT" --user alice --password-file "$WORK/alice.pw" --ca-pin "$PIN" >/dev/null
"$C" config >"$WORK/ssh_config"
cat >>"$WORK/ssh_config" <<EOF
Host *
  User root
  IdentityFile $(user_key)
  BatchMode yes
  ServerAliveInterval 0
EOF
S() { ssh -F "$WORK/ssh_config" "$@"; }
# The same user on a laptop of its own (namespace flt-u, which reaches the proxy's users
# listener on $HOST_IP through its own link).
U() { ip netns exec "$USER_NS" ssh -F "$WORK/ssh_config" "$@"; }
check "ssh node-f1 answers" test "$(S node-f1 'echo $NODE_NAME')" = node-f1
check "ssh node-s answers" test "$(S node-s 'echo $NODE_NAME')" = node-s

head -c "${MIB}M" /dev/urandom >"$WORK/blob"
SUM=$(sum <"$WORK/blob")

# link_down / link_up [NS]: every packet in and out of the namespace's veth (default: the
# site's) is dropped, without FIN or RST; both ends only notice through their keepalives.
link_down() {
  ip netns exec "${1:-$NS}" iptables -I INPUT -i eth0 -j DROP
  ip netns exec "${1:-$NS}" iptables -I OUTPUT -o eth0 -j DROP
}
link_up() {
  ip netns exec "${1:-$NS}" iptables -D INPUT -i eth0 -j DROP
  ip netns exec "${1:-$NS}" iptables -D OUTPUT -o eth0 -j DROP
}
# The blob (its first $1 MiB, default all) at about 4 MiB/s, so that a copy is still running
# when a link goes.
slow_blob() { local i; for ((i = 0; i < ${1:-$MIB}; i++)); do dd if="$WORK/blob" bs=1M skip="$i" count=1 status=none; sleep 0.25; done; }
audit_count() { grep -c "\"$1\"" "$AUDIT" || true; }
# cut_during_copy RUN NS TAG WHAT: a throttled copy of the blob and a session ticking once a
# second, both through RUN (S, or U from the user's namespace), while the link of namespace
# NS is down for CUT s; both must come through whole and in order. ssh's stderr of the copy
# is kept in $WORK/TAG-copy.err.
cut_during_copy() {
  local run=$1 ns=$2 tag=$3 what=$4 copy ticking
  slow_blob | $run node-f1 "cat > $WORK/flt-$tag" 2>"$WORK/$tag-copy.err" &
  copy=$!
  $run node-f1 "for i in \$(seq 1 $TICKS_N); do echo tick \$i; sleep 1; done" >"$WORK/$tag-ticks" 2>"$WORK/$tag-ticks.err" &
  ticking=$!
  sleep 3
  t "$what down for $CUT s"
  link_down "$ns"
  sleep "$CUT"
  link_up "$ns"
  t "$what up"
  wait "$copy" || { cat "$WORK/$tag-copy.err"; fail "the ssh copy failed across a $CUT s outage of $what"; }
  t "copy done"
  check "${MIB} MiB copied across a $CUT s outage of $what arrive byte-exact" test "$(S node-f1 "sha256sum < $WORK/flt-$tag" | cut -d' ' -f1)" = "$SUM"
  S node-f1 "rm -f $WORK/flt-$tag"
  wait "$ticking" || { cat "$WORK/$tag-ticks.err"; fail "the ticking session failed across the outage of $what"; }
  check "the ticking session printed all $TICKS_N lines in order" \
    test "$(cat "$WORK/$tag-ticks")" = "$(for i in $(seq 1 "$TICKS_N"); do echo "tick $i"; done)"
}

###############################################################################
say "1. link cut (${CUT} s) shorter than resume.grace (${GRACE} s) during a ${MIB} MiB copy and a ticking session"
# Throttled to about 4 MiB/s so the copy is still running when the link goes.
DETACHED0=$(audit_count tunnel.detached); RESUMED0=$(audit_count tunnel.resumed)
cut_during_copy S "$NS" s1 "the site's link"
check "the proxy noticed the dead tunnel (audit tunnel.detached)" test "$(audit_count tunnel.detached)" -gt "$DETACHED0"
check "the agent came back and the sessions resumed (audit tunnel.resumed)" test "$(audit_count tunnel.resumed)" -gt "$RESUMED0"
check "no session ended with an error during the outage" bash -c "! grep '\"session.end\"' '$AUDIT' | grep -qi 'resume'"

###############################################################################
# Copies the blob to node-f1:$1 while sampling the proxy's RSS; sets RSS0 (before), MAXRSS
# (the most seen) and TOOK (seconds). $2 says what runs beside it, for the failure message.
copy_watching_rss() {
  local dest=$1 beside=$2 start copy r
  RSS0=$(awk '/VmRSS/ {print $2}' "/proc/$PROXY_PID/status")
  start=$SECONDS
  S node-f1 "cat > $dest" <"$WORK/blob" &
  copy=$!
  MAXRSS=$RSS0
  while kill -0 "$copy" 2>/dev/null; do
    r=$(awk '/VmRSS/ {print $2}' "/proc/$PROXY_PID/status")
    [ "$r" -gt "$MAXRSS" ] && MAXRSS=$r
    [ $((SECONDS - start)) -lt 120 ] || fail "the copy beside $beside took over 120 s"
    sleep 0.2
  done
  wait "$copy" || fail "the copy beside $beside failed"
  TOOK=$((SECONDS - start))
}

say "2. a stalled reader beside a ${MIB} MiB copy on the same tunnel"
# ssh is stopped while the node streams zeros at it: its window fills and that stream
# stalls; the copy on the same tunnel must not.
# ssh itself in the background, not the function S: `$!` must be ssh's own pid for the STOP
# to stall the reader (a backgrounded function is a subshell, and stopping that stops nothing).
ssh -F "$WORK/ssh_config" node-f1 'cat /dev/zero' >/dev/null 2>"$WORK/s2-stalled.err" &
STALLED=$!
sleep 2
kill -STOP "$STALLED"
sleep 2
copy_watching_rss "$WORK/flt-up2" "a stalled reader"
t "copy took $TOOK s; proxy RSS ${RSS0} KiB before, ${MAXRSS} KiB at most"
check "${MIB} MiB beside a stalled reader arrive byte-exact" test "$(S node-f1 "sha256sum < $WORK/flt-up2" | cut -d' ' -f1)" = "$SUM"
S node-f1 "rm -f $WORK/flt-up2"
check "the proxy's RSS stayed under 200 MiB (${MAXRSS} KiB)" test "$MAXRSS" -lt $((200 * 1024))
check "the stalled session is still there" kill -0 "$STALLED"
kill -CONT "$STALLED"; kill "$STALLED" 2>/dev/null || true; wait "$STALLED" 2>/dev/null || true

say "2b. a raw stream that is never read (no ssh window to hold it back) beside a ${MIB} MiB copy"
# ssh's own channel window (2 MiB) bounds what a stopped ssh leaves in flight; a plain TCP
# service through `remoteler forward` has only the tunnel's flow control: a server in the
# site writes zeros as fast as it can, the local client never reads. What the server got
# rid of must stop growing (the stream's window is full) and stay within the window plus
# socket buffers, and the copy beside it must not slow down.
cat >"$WORK/zero.py" <<'PY'
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 2223)); srv.listen()
def serve(c):
    n, buf = 0, bytes(65536)
    try:
        while True:
            n += c.send(buf)
            with open(sys.argv[1], "w") as f: f.write(str(n))
    except OSError:
        pass
while True:
    c, _ = srv.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
PY
bg zero ip netns exec "$NS" python3 "$WORK/zero.py" "$WORK/zero.sent" >/dev/null
FWD_PORT=$(free_port)
bg forward "$C" forward --listen "127.0.0.1:$FWD_PORT" node-f1 zero >/dev/null
wait_for "the forward to listen" 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$FWD_PORT"
# Baseline: the same copy with no stalled stream.
START=$SECONDS
S node-f1 "cat > $WORK/flt-up2b" <"$WORK/blob" || fail "the baseline copy failed"
BASE=$((SECONDS - START))
python3 -c 'import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
time.sleep(600)' "$FWD_PORT" &
NOREAD=$!
wait_for "the zero server to start sending" 10 test -s "$WORK/zero.sent"
sleep 3
copy_watching_rss "$WORK/flt-up2b" "an unread stream"
SENT1=$(cat "$WORK/zero.sent"); sleep 2; SENT2=$(cat "$WORK/zero.sent")
t "copy took ${TOOK} s (${BASE} s alone); the unread stream took ${SENT2} bytes from its server; proxy RSS ${RSS0} KiB before, ${MAXRSS} KiB at most"
check "${MIB} MiB beside an unread stream arrive byte-exact" test "$(S node-f1 "sha256sum < $WORK/flt-up2b" | cut -d' ' -f1)" = "$SUM"
S node-f1 "rm -f $WORK/flt-up2b"
check "the copy beside the unread stream kept its pace (${TOOK} s against ${BASE} s alone)" test "$TOOK" -le $((BASE * 3 + 5))
check "the unread stream is stalled (its server sent nothing more in 2 s)" test "$SENT1" = "$SENT2"
check "the unread stream holds at most window + socket buffers (${SENT2} bytes < 48 MiB)" test "$SENT2" -lt $((48 * 1024 * 1024))
check "the proxy's RSS stayed under 200 MiB (${MAXRSS} KiB)" test "$MAXRSS" -lt $((200 * 1024))
kill "$NOREAD" 2>/dev/null || true; wait "$NOREAD" 2>/dev/null || true

###############################################################################
say "3. agent killed with -9 during a ${MIB} MiB copy, another session goes on"
(for ((i = 0; i < MIB; i++)); do dd if="$WORK/blob" bs=1M skip="$i" count=1 status=none; sleep 0.2; done) \
  | S node-s "cat > $WORK/flt-s" 2>"$WORK/s3-other.err" &
OTHER=$!
# Both copies throttled (node-s to 5 MiB/s, node-f1 to 10 MiB/s), so both are mid-transfer
# at the kill and node-s's long after it.
(for ((i = 0; i < MIB; i++)); do dd if="$WORK/blob" bs=1M skip="$i" count=1 status=none; sleep 0.1; done) \
  | S node-f1 "cat > $WORK/flt-up3" 2>"$WORK/s3-victim.err" &
VICTIM=$!
sleep 2
t "kill -9 the agent"
kill -9 "$AGENT_PID"; gone "$AGENT_PID"
KILLED=$SECONDS
# keepalive 1 s x 3: the proxy must list the node offline within interval x (count + 1),
# and never online in between. Polled until offline; a margin for the listing itself.
while online node-f1 tunnel; do
  [ $((SECONDS - KILLED)) -le 6 ] || fail "node-f1 still listed online $((SECONDS - KILLED)) s after its agent died"
  sleep 0.2
done
t "node-f1 offline after $((SECONDS - KILLED)) s"
ok "node-f1 listed offline within keepalive interval x count after its agent died"
check "the other session (node-s) is still running" kill -0 "$OTHER"
sleep 2
check "node-f1 is still offline while its agent is dead" offline node-f1 tunnel
check "the victim session is still waiting within the grace" kill -0 "$VICTIM"
# The agent comes back well within the grace, as a new process: it cannot resume (it lost
# its session), so its tunnel replaces the stale, detached one, and the sessions that
# waited on the stale one end then, not at the end of the grace.
t "restart the agent"
start_agent
RESTARTED=$SECONDS
wait_for "node-f1 back after the agent restarted" 30 online node-f1 tunnel
t "node-f1 online again"
check "ssh node-f1 works through the restarted agent's tunnel" test "$(S node-f1 'echo $NODE_NAME')" = node-f1
while kill -0 "$VICTIM" 2>/dev/null; do
  [ $((SECONDS - RESTARTED)) -lt $((GRACE - 4)) ] || break
  sleep 0.2
done
VICTIM_END=$((SECONDS - RESTARTED))
if wait "$VICTIM"; then fail "the copy to the killed agent's node claimed success"; fi
t "the victim session ended ${VICTIM_END} s after the restart: $(tr '\n' ' ' <"$WORK/s3-victim.err")"
ok "the session through the killed agent ended with an error"
# Correct behaviour: the replacement ends the stale tunnel's sessions at once.
check "the victim ended when the new tunnel replaced the stale one, not at the end of the grace" \
  test "$VICTIM_END" -lt $((GRACE - 4))
check "ssh's stderr says why the session ended" grep -Eqi 'resume|replaced|restarted' "$WORK/s3-victim.err"
wait "$OTHER" || { cat "$WORK/s3-other.err"; fail "the copy to node-s failed while node-f1's agent died"; }
check "the other session (node-s) kept going: ${MIB} MiB byte-exact" test "$(S node-s "sha256sum < $WORK/flt-s" | cut -d' ' -f1)" = "$SUM"
S node-s "rm -f $WORK/flt-s"
S node-f1 "rm -f $WORK/flt-up3"
# The stale tunnel's record says what happened to it: replaced, not timed out.
stale_record() { grep '"tunnel.disconnect"' "$AUDIT" | grep -q '"replaced":true' && grep '"tunnel.disconnect"' "$AUDIT" | grep '"replaced":true' | tail -1 >"$WORK/s3-disconnect"; }
wait_for "the stale tunnel's tunnel.disconnect in the audit log" 5 stale_record
check "the stale tunnel's tunnel.disconnect names its replacement ($(grep -o '"reason":"[^"]*"' "$WORK/s3-disconnect"))" \
  grep -q 'replaced by a new session of node node-f1' "$WORK/s3-disconnect"
check "... and does not blame the grace period" bash -c "! grep -q 'resume.grace' '$WORK/s3-disconnect'"

###############################################################################
say "4. link cut longer than resume.grace (${GRACE} s)"
EXPIRED0=$(grep -c '"session.end".*resume.grace' "$AUDIT" || true)
S node-f1 'for i in $(seq 1 600); do echo tick $i; sleep 1; done' >"$WORK/s4-ticks" 2>"$WORK/s4.err" &
LONG=$!
sleep 2
t "link down for $((GRACE + 8)) s"
link_down
CUT_AT=$SECONDS
wait_for "node-f1 listed offline while its link is down" 10 offline node-f1 tunnel
ok "node-f1 listed offline $((SECONDS - CUT_AT)) s after the link went down"
sleep $((GRACE + 8 - (SECONDS - CUT_AT)))
check "node-f1 is still offline at the end of the outage" offline node-f1 tunnel
# Detection (at most 4 s) + the grace < the outage: the user learns while the link is down.
check "the ssh session ended at the end of the grace, before the link returned" bash -c "! kill -0 $LONG 2>/dev/null"
link_up
t "link up"
END=$SECONDS
while kill -0 "$LONG" 2>/dev/null; do
  [ $((SECONDS - END)) -lt 30 ] || fail "the session outlived the grace period by 30 s"
  sleep 0.2
done
wait "$LONG" && fail "a session past the grace claimed success"
t "ssh said: $(tr '\n' ' ' <"$WORK/s4.err")"
check "ssh's stderr says the tunnel was not back within resume.grace" grep -q 'resume.grace' "$WORK/s4.err"
expired() { test "$(grep -c '"session.end".*resume.grace' "$AUDIT")" -gt "$EXPIRED0"; }
wait_for "a session.end naming resume.grace in the audit log" 5 expired
ok "the proxy's session.end names the grace ($(grep '"session.end".*resume.grace' "$AUDIT" | tail -1 | grep -o '"reason":"[^"]*"'))"
expired_record() { grep '"tunnel.disconnect".*not resumed within resume.grace' "$AUDIT" | tail -1 | grep -q .; }
wait_for "a tunnel.disconnect naming resume.grace in the audit log" 5 expired_record
grep '"tunnel.disconnect".*not resumed within resume.grace' "$AUDIT" | tail -1 >"$WORK/s4-disconnect"
check "the expired tunnel's tunnel.disconnect says it was not replaced" grep -q '"replaced":false' "$WORK/s4-disconnect"
wait_for "node-f1 back after the link returned" 30 online node-f1 tunnel
check "a new ssh to node-f1 works after the long outage" test "$(S node-f1 'echo $NODE_NAME')" = node-f1

###############################################################################
if [ "$LOSS" != 0 ]; then
  say "5. random packet loss (${LOSS}) during a 16 MiB copy"
  head -c 16M "$WORK/blob" >"$WORK/blob16"
  ip netns exec "$NS" iptables -I INPUT -i eth0 -m statistic --mode random --probability "$LOSS" -j DROP
  ip netns exec "$NS" iptables -I OUTPUT -o eth0 -m statistic --mode random --probability "$LOSS" -j DROP
  START=$SECONDS
  timeout 180 bash -c "ssh -F '$WORK/ssh_config' node-f1 'cat > $WORK/flt-loss' <'$WORK/blob16'" \
    || fail "the copy under ${LOSS} loss failed"
  DROPPED=$(ip netns exec "$NS" iptables -L INPUT -v -n -x | awk '/statistic/ {print $1}')
  ip netns exec "$NS" iptables -D INPUT -i eth0 -m statistic --mode random --probability "$LOSS" -j DROP
  ip netns exec "$NS" iptables -D OUTPUT -o eth0 -m statistic --mode random --probability "$LOSS" -j DROP
  t "16 MiB under loss took $((SECONDS - START)) s; ${DROPPED} packets dropped on the way in"
  check "the loss rule really dropped packets" test "${DROPPED:-0}" -gt 0
  check "16 MiB under ${LOSS} packet loss arrive byte-exact" \
    test "$(S node-f1 "sha256sum < $WORK/flt-loss" | cut -d' ' -f1)" = "$(sum <"$WORK/blob16")"
  S node-f1 "rm -f $WORK/flt-loss"
fi

###############################################################################
# Scenarios 6-8 put a userspace relay (`remoteler-loadtest relay`, loadtest/src/relay.rs) in
# the agent's path: the agent dials the relay on the host's side of the site's link, the
# relay dials the proxy. It adds delay and jitter (no netem on this kernel) and stalls on
# SIGUSR1: the connections open at that moment freeze both ways, nothing is closed, new
# connections pass (a middlebox whose old flows went dead); SIGUSR2 releases them.
RELAY_BIN="$BIN/remoteler-loadtest"
(cd "$ROOT" && cargo build ${CARGO_PROFILE_FLAG:-} --locked -q -p loadtest)
# The tunnel's TCP connection goes to port $1 (the relay's or the proxy's).
tunnel_to() { [ -n "$(ip netns exec "$NS" ss -Htn state established "( dport = :$1 )")" ]; }
# agent_config FILE: a new agent process with this config; its tunnel replaces the old one.
agent_config() {
  kill "$AGENT_PID"; gone "$AGENT_PID"
  AGENT_LOGS=$((AGENT_LOGS + 1))
  AGENT_PID=$(bg "agent-$AGENT_LOGS" ip netns exec "$NS" "$A" start --config "$1")
}
# relay_up NAME OPTIONS...: a relay with these options in front of the proxy's tunnel
# listener, and the agent moved onto it (with keepalive count RELAY_AGENT_COUNT, default 3
# as the proxy). Sets RELAY_PID and RELAY_OUT (its stdout: `listening ADDR`, then
# `stalled N` / `resumed N`).
relay_up() {
  local name=$1 addr; shift
  OPEN0=$(open_sessions)
  RELAY_OUT="$WORK/$name.log"
  RELAY_PID=$(bg "$name" "$RELAY_BIN" relay --listen "$HOST_IP:0" --to "$HOST_IP:$TUNNEL_PORT" "$@")
  wait_for "the relay to listen" 10 grep -q '^listening ' "$RELAY_OUT"
  addr=$(sed -n 's/^listening //p' "$RELAY_OUT")
  sed "s|^proxy = .*|proxy = \"$addr\"|; s|^count = 3$|count = ${RELAY_AGENT_COUNT:-3}|" \
    "$WORK/agent.toml" >"$WORK/agent-$name.toml"
  agent_config "$WORK/agent-$name.toml"
  RELAY_PORT=${addr##*:}
  wait_for "node-f1's tunnel through the relay" 30 tunnel_through "$RELAY_PORT"
}
tunnel_through() { online node-f1 tunnel && tunnel_to "$1"; }
# Sessions to node-f1 the proxy has not ended (audit session.start minus session.end).
open_sessions() {
  echo $(($(grep -c '"session.start".*"node":"node-f1"' "$AUDIT" || true) - $(grep -c '"session.end".*"node":"node-f1"' "$AUDIT" || true)))
}
sessions_closed() { [ "$(open_sessions)" -le "$OPEN0" ]; }
# relay_down: once the sessions through the relay have closed (an ssh exits before its
# stream's close has crossed the delayed link), the agent back on its own config (straight
# to the proxy), the relay stopped.
relay_down() {
  wait_for "the sessions through the relay to close" 10 sessions_closed
  agent_config "$WORK/agent.toml"
  wait_for "node-f1's tunnel straight to the proxy" 30 tunnel_through "$TUNNEL_PORT"
  kill "$RELAY_PID"; gone "$RELAY_PID"
}
# ticks N OUT: a session printing N lines a second apart; each line is stamped with the
# time it arrived (for the longest gap).
ticks() {
  S node-f1 "for i in \$(seq 1 $1); do echo tick \$i; sleep 1; done" \
    | while read -r line; do echo "$EPOCHREALTIME $line"; done >"$2"
}
ticks_in_order() { test "$(cut -d' ' -f2- "$2")" = "$(for i in $(seq 1 "$1"); do echo "tick $i"; done)"; }
max_gap() { awk 'NR > 1 && $1 - p > m { m = $1 - p } { p = $1 } END { printf "%.1f", m }' "$1"; }
since() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN { printf "%.1f", b - a }'; }
# The time (Unix seconds) of the first EVENT record after the first $2 of them.
audit_time() { date -d "$(grep "\"$1\"" "$AUDIT" | sed -n "$(($2 + 1))p" | grep -o '"time":"[^"]*"' | cut -d'"' -f4)" +%s.%N; }
# The blob to node-f1 at about 13 MiB/s, so a copy spans a stall; the node's sha256 of what
# it received goes to $1.
paced_copy() { (for ((i = 0; i < MIB; i++)); do dd if="$WORK/blob" bs=1M skip="$i" count=1 status=none; sleep 0.06; done) | S node-f1 sha256sum >"$1"; }

scenario_delay() {
  say "6. 50 ms ± 10 ms each way (a 100 ms round trip) on the agent's link: a ${MIB} MiB copy and a ticking session"
  relay_up s6-relay --delay 50ms --jitter 10ms
  local start setup took mibs ticking copied
  start=$EPOCHREALTIME
  ticks 8 "$WORK/s6-ticks" 2>"$WORK/s6-ticks.err" &
  ticking=$!
  # The node hashes what it received: the check needs no second session.
  copied=$(S node-f1 sha256sum <"$WORK/blob" 2>"$WORK/s6-copy.err") \
    || { cat "$WORK/s6-copy.err"; fail "the copy through the delaying relay failed"; }
  took=$(since "$start")
  wait "$ticking" || { cat "$WORK/s6-ticks.err"; fail "the ticking session through the delaying relay failed"; }
  setup=$(since "$start" "$(head -1 "$WORK/s6-ticks" | cut -d' ' -f1)")
  mibs=$(awk -v m="$MIB" -v s="$took" 'BEGIN { printf "%.1f", m / s }')
  t "${MIB} MiB in ${took} s (${mibs} MiB/s) at a 100 ms round trip; the ticking session's first line after ${setup} s; longest gap between ticks $(max_gap "$WORK/s6-ticks") s"
  check "ssh's set-up took its round trips through the relay's delay (first line after ${setup} s >= 0.7 s)" \
    awk -v s="$setup" 'BEGIN { exit !(s >= 0.7) }'
  check "${MIB} MiB through 100 ms of round trip arrive byte-exact" test "${copied%% *}" = "$SUM"
  check "the ticking session beside it printed all 8 lines in order" ticks_in_order 8 "$WORK/s6-ticks"
  check "no tick waited over 2.5 s ($(max_gap "$WORK/s6-ticks") s at most)" \
    awk -v g="$(max_gap "$WORK/s6-ticks")" 'BEGIN { exit !(g < 2.5) }'
  relay_down
}
scenario_delay

scenario_short_stall() {
  say "7. a 2 s stall of the agent's link (less than keepalive 1 s x 3) during a copy and a ticking session"
  relay_up s7-relay --delay 10ms --jitter 2ms
  local detached0 connects0 copy ticking
  detached0=$(audit_count tunnel.detached); connects0=$(audit_count tunnel.connect)
  paced_copy "$WORK/s7-copied" 2>"$WORK/s7-copy.err" &
  copy=$!
  ticks 6 "$WORK/s7-ticks" 2>"$WORK/s7-ticks.err" &
  ticking=$!
  sleep 2
  t "stall for 2 s"
  kill -USR1 "$RELAY_PID"
  wait_for "the relay to stall the tunnel" 5 grep -qx 'stalled 1' "$RELAY_OUT"
  sleep 2
  kill -USR2 "$RELAY_PID"
  wait_for "the relay to resume" 5 grep -qx 'resumed 1' "$RELAY_OUT"
  t "resumed"
  wait "$copy" || { cat "$WORK/s7-copy.err"; fail "the copy across a 2 s stall failed"; }
  wait "$ticking" || { cat "$WORK/s7-ticks.err"; fail "the ticking session across a 2 s stall failed"; }
  t "copy and ticks done; longest gap between ticks $(max_gap "$WORK/s7-ticks") s"
  check "the stall held the session up (longest gap between ticks $(max_gap "$WORK/s7-ticks") s >= 1.5 s)" \
    awk -v g="$(max_gap "$WORK/s7-ticks")" 'BEGIN { exit !(g >= 1.5) }'
  check "nothing detached during a stall shorter than keepalive x count (no new tunnel.detached)" \
    test "$(audit_count tunnel.detached)" = "$detached0"
  check "${MIB} MiB across the stall arrive byte-exact" test "$(cut -d' ' -f1 "$WORK/s7-copied")" = "$SUM"
  check "the ticking session printed all 6 lines in order" ticks_in_order 6 "$WORK/s7-ticks"
  check "the stalled connection still carries node-f1's tunnel (no new tunnel.connect)" \
    test "$(audit_count tunnel.connect)" = "$connects0"
  relay_down
}
scenario_short_stall

scenario_long_stall() {
  local stall=$STALL
  say "8. the agent's connection stalled for ${stall} s (more than keepalive 1 s x 3, less than resume.grace): the agent reconnects through the relay and resumes"
  # Equal keepalive counts: either side may notice first. An agent that reconnects before
  # the proxy noticed makes it give up the old connection (take-over); 2 forces that case.
  RELAY_AGENT_COUNT=$STALL_AGENT_COUNT relay_up s8-relay --delay 10ms --jitter 2ms
  local detached0 resumed0 copy ticking at detect resume
  detached0=$(audit_count tunnel.detached); resumed0=$(audit_count tunnel.resumed)
  paced_copy "$WORK/s8-copied" 2>"$WORK/s8-copy.err" &
  copy=$!
  ticks $((STALL + 4)) "$WORK/s8-ticks" 2>"$WORK/s8-ticks.err" &
  ticking=$!
  sleep 2
  t "stall the tunnel's connection for $stall s (new connections pass)"
  at=$EPOCHREALTIME
  kill -USR1 "$RELAY_PID"
  wait_for "the relay to stall the tunnel" 5 grep -qx 'stalled 1' "$RELAY_OUT"
  detached() { test "$(audit_count tunnel.detached)" -gt "$detached0"; }
  resumed() { test "$(audit_count tunnel.resumed)" -gt "$resumed0"; }
  wait_for "the proxy to detach the stalled tunnel" 6 detached
  detect=$(since "$at" "$(audit_time tunnel.detached "$detached0")")
  t "tunnel.detached ${detect} s after the stall began"
  wait_for "the agent to resume through a new connection" "$stall" resumed
  resume=$(since "$at" "$(audit_time tunnel.resumed "$resumed0")")
  t "tunnel.resumed ${resume} s after the stall began"
  # The proxy sees the relay's side of each connection: both from HOST_IP, the ports differ.
  local old_peer new_peer
  old_peer=$(grep '"tunnel.detached"' "$AUDIT" | sed -n "$((detached0 + 1))p" | grep -o '"peer":"[^"]*"')
  new_peer=$(grep '"tunnel.resumed"' "$AUDIT" | sed -n "$((resumed0 + 1))p" | grep -o '"peer":"[^"]*"')
  check "the tunnel resumed over a new connection through the relay (${old_peer#*:} then ${new_peer#*:})" \
    test "$old_peer" != "$new_peer" -a "${new_peer%:*}" = "\"peer\":\"$HOST_IP"
  sleep "$(awk -v s="$stall" -v a="$at" -v n="$EPOCHREALTIME" 'BEGIN { d = s - (n - a); print (d > 0 ? d : 0) }')"
  kill -USR2 "$RELAY_PID"
  wait_for "the relay to release the stalled connection" 5 grep -qx 'resumed 1' "$RELAY_OUT"
  t "the old connection released: what it held goes on to the old sockets at both ends"
  wait "$copy" || { cat "$WORK/s8-copy.err"; fail "the copy across a ${stall} s stall failed"; }
  wait "$ticking" || { cat "$WORK/s8-ticks.err"; fail "the ticking session across a ${stall} s stall failed"; }
  t "copy and ticks done; longest gap between ticks $(max_gap "$WORK/s8-ticks") s"
  check "the proxy detected the dead tunnel within keepalive x (count + 1) + 1 s (${detect} s)" \
    awk -v d="$detect" 'BEGIN { exit !(d <= 5) }'
  check "the agent resumed through the relay before the stall ended (${resume} s)" \
    awk -v d="$resume" -v s="$stall" 'BEGIN { exit !(d < s) }'
  check "${MIB} MiB across the stall and the resume arrive byte-exact" test "$(cut -d' ' -f1 "$WORK/s8-copied")" = "$SUM"
  check "the ticking session printed all $((STALL + 4)) lines in order" ticks_in_order $((STALL + 4)) "$WORK/s8-ticks"
  check "the released stale connection detached nothing" test "$(audit_count tunnel.detached)" = $((detached0 + 1))
  check "ssh node-f1 works after the stale connection came back" test "$(S node-f1 'echo $NODE_NAME')" = node-f1
  relay_down
}
scenario_long_stall

###############################################################################
say "9. the user's own link cut (${CUT} s) during a ${MIB} MiB copy and a ticking session"
# A laptop on Wi-Fi: the user's connection to the proxy dies without FIN. The proxy's
# keepalive (1 s x 3) detaches the user's session; `remoteler proxy ssh` notices through its
# own (3 s x 3), dials again until the link is back, and resumes: ssh sees only a pause.
check "ssh from the user's namespace answers" test "$(U node-f1 'echo $NODE_NAME')" = node-f1
UD0=$(audit_count user.detached); UR0=$(audit_count user.resumed)
failed_ends() { grep '"session.end"' "$AUDIT" | grep -vc '"reason":"closed"' || true; }
FAILED0=$(failed_ends)
cut_during_copy U "$USER_NS" s9 "the user's link"
check "the proxy kept the user's sessions (audit user.detached)" test "$(audit_count user.detached)" -gt "$UD0"
check "the client came back and resumed them (audit user.resumed)" test "$(audit_count user.resumed)" -gt "$UR0"
check "the client told the user it was reconnecting, then that it was back" \
  bash -c "grep -q 'reconnecting' '$WORK/s9-copy.err' && grep -q 'reconnected after' '$WORK/s9-copy.err'"
check "no session ended with an error across the user's outage" test "$(failed_ends)" = "$FAILED0"

###############################################################################
say "10. proxy restart: a copy in flight finishes during the drain (${DRAIN} s), the rest end then"
# SIGTERM: the proxy sends GOAWAY everywhere and stops accepting; sessions in flight carry on
# up to drain.timeout; then it closes what is left and exits. The agent comes back to the
# restarted proxy by itself.
head -c 16M "$WORK/blob" >"$WORK/blob16"
slow_blob 16 | S node-f1 "cat > $WORK/flt-drain" 2>"$WORK/s10-copy.err" &
COPY=$!
S node-f1 "for i in \$(seq 1 $TICKS_N); do echo tick \$i; sleep 1; done" >"$WORK/s10-ticks" 2>"$WORK/s10-ticks.err" &
TICKS=$!
sleep 1
kill -TERM "$PROXY_PID"
STOP=$SECONDS
t "SIGTERM to the proxy"
wait "$COPY" || { cat "$WORK/s10-copy.err"; fail "the copy in flight did not finish during the drain"; }
t "the copy in flight finished during the drain"
wait_for "the ticking session to end at the drain timeout" $((DRAIN + 10)) bash -c "! kill -0 $TICKS 2>/dev/null"
wait "$TICKS" && fail "the ticking session ended with status 0; it was cut by the drain"
t "the ticking session ended after $((SECONDS - STOP)) s: $(tr '\n' ' ' <"$WORK/s10-ticks.err")"
check "the ticking session lasted until the drain timeout" test $((SECONDS - STOP)) -ge $((DRAIN - 1))
check "ssh's stderr says the proxy stopped at its drain timeout" grep -q "the proxy stopped: .*drain.timeout" "$WORK/s10-ticks.err"
wait_for "the proxy to exit" 10 bash -c "! kill -0 $PROXY_PID 2>/dev/null"
PROXY_PID=$(bg proxy-restarted "$P" start --config "$WORK/proxy.toml")
wait_for "the restarted proxy to listen" 30 test -f "$WORK/proxy/proxy.ready"
wait_for "node-f1 back through the restarted proxy" 30 online node-f1 tunnel
t "node-f1 back $((SECONDS - STOP)) s after the SIGTERM"
check "the 16 MiB copied during the drain arrived byte-exact" \
  test "$(S node-f1 "sha256sum < $WORK/flt-drain" | cut -d' ' -f1)" = "$(sum <"$WORK/blob16")"
S node-f1 "rm -f $WORK/flt-drain"

kill "$PROXY_PID"; gone "$PROXY_PID"
say "faults: all checks passed in ${SECONDS} s"
