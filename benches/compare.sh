#!/usr/bin/env bash
# Remoteler side by side with rathole 0.5 (TLS transport), on loopback, in ONE run:
#   1. single-stream throughput (iperf3 -J): direct TCP, through Remoteler (iperf3 ->
#      `remoteler forward` -> proxy -> agent tunnel -> iperf3 server: two TLS legs), through
#      rathole (visitor -> server -> TLS data channel -> client -> iperf3 server); Gbit/s and
#      CPU-seconds per GB moved (utime+stime of every process of each system);
#   2. added round-trip latency: `remoteler-loadtest rtt` (paced 64-byte ping-pong, HDR
#      histogram) at 1, 100 and 1000 concurrent connections against an echo server directly,
#      through Remoteler and through rathole;
#   3. interactive round trips while a bulk iperf3 saturates the same tunnel (same agent);
#   4. memory per agent: rathole server RSS with K services connected (control channel + pool
#      of 8 each) vs `remoteler-loadtest tunnels --count K` (proxy RSS per tunnel);
# and the TLS version and cipher each side negotiates (openssl s_client against each
# listener). Prints one side-by-side table and writes it to target/compare-cache/last.md.
#
# Installs what it needs when missing: iperf3 (apt), rathole 0.5.0 (cargo install, without
# --locked: its lockfile pins time 0.3.29, which does not build on recent Rust) into
# target/compare-cache/. Builds ours with --release.
#
# Knobs (environment): REPS (5) iperf3 repetitions per system and direction; IPERF_SECS (5);
# RTT_REPS (3); RTT_SECS (8); RTT_CONNS ("1 100 1000"); RTT_RATE (2000 messages/s over all
# connections); AGENTS ("100 1000"); BULK_LIMITS ("unlimited 1G": iperf3 -b of the bulk session,
# "unlimited" saturates the cores); SKIP ("" or any of: throughput rtt bulk memory);
# HOLD (1: set everything up, print the ports and process ids, and wait, for profiling by hand);
# OURS_OLD (a directory holding another build's remoteler-proxy, remoteler-agent and remoteler,
# e.g. an older commit's target/release: a second Remoteler system "remoteler-old", set up the
# same way, joins the throughput, round-trip and bulk runs, with rows and a ratio in the table).
# Everything it starts is stopped at exit; KEEP_WORK=1 keeps the logs and raw JSON.
set -euo pipefail
# shellcheck disable=SC2034 # read by scripts/lib.sh
PROFILE_DIR=release
# shellcheck source=../scripts/lib.sh
source "$(dirname "$0")/../scripts/lib.sh"
trap cleanup EXIT

REPS=${REPS:-5}
IPERF_SECS=${IPERF_SECS:-5}
RTT_REPS=${RTT_REPS:-3}
RTT_SECS=${RTT_SECS:-8}
RTT_CONNS=${RTT_CONNS:-"1 100 1000"}
RTT_RATE=${RTT_RATE:-2000}
AGENTS=${AGENTS:-"100 1000"}
BULK_LIMITS=${BULK_LIMITS:-"unlimited 1G"}
SKIP=${SKIP:-}
OURS_OLD=${OURS_OLD:-}
CACHE="$ROOT/target/compare-cache"
RATHOLE="$CACHE/rathole/bin/rathole"
LT="$BIN/remoteler-loadtest"
RES="$WORK/results"
mkdir -p "$CACHE" "$RES"
skip() { [[ " $SKIP " == *" $1 "* ]]; }

say "tools"
if ! command -v iperf3 >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null
fi
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl >/dev/null; }
if [ ! -x "$RATHOLE" ]; then
  say "installing rathole 0.5.0 into $CACHE/rathole (a few minutes)"
  cargo install rathole --version 0.5.0 --root "$CACHE/rathole"
fi
say "building ours (release)"
(cd "$ROOT" && cargo build --release --locked -q -p proxy -p agent -p client -p loadtest)
P="$BIN/remoteler-proxy"
HZ=$(getconf CLK_TCK)

# cpu_ticks PID...: utime + stime of the processes, in clock ticks.
cpu_ticks() {
  local t=0 p f
  for p in "$@"; do
    read -r -a f < <(sed 's/^.*) //' "/proc/$p/stat")
    t=$((t + f[11] + f[12]))   # fields 14 and 15 of stat(5); the array starts at field 3
  done
  echo "$t"
}
# free_ports N: N distinct free ports on 127.0.0.1 (held together while chosen).
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# echo_ok PORT: one byte goes through PORT and comes back.
echo_ok() {
  python3 - "$1" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
s.settimeout(3); s.sendall(b"x")
sys.exit(0 if s.recv(1) == b"x" else 1)
PY
}

say "targets: echo server and iperf3 server"
ECHO_PORT=$(free_port); IPERF_PORT=$(free_port)
bg echo "$LT" echo-server --listen "127.0.0.1:$ECHO_PORT" >/dev/null
bg iperf3-server iperf3 -s -p "$IPERF_PORT" >/dev/null
wait_for "the echo server" 10 echo_ok "$ECHO_PORT"

# start_remoteler SYS BINDIR: a proxy, an agent node-r1 (forwards iperf and echo), a user and
# two forwards from the binaries in BINDIR, under $WORK/SYS; records the forwards' ports and
# the processes in FWD_IPERF[SYS], FWD_ECHO[SYS], PIDS[SYS] (proxy agent forward forward-echo).
declare -A FWD_IPERF FWD_ECHO PIDS USERS_PORT_OF TUNNEL_PORT_OF
start_remoteler() {
  local sys=$1 bin=$2 w="$WORK/$1"
  say "$sys: proxy, agent node-r1 (forwards iperf and echo), user, two forwards ($bin)"
  mkdir -p "$w"
  local users tunnels auth pin token proxy_pid agent_pid fwd_iperf fwd_echo iperf_pid echo_pid
  users=$(free_port); tunnels=$(free_port); auth=$(free_port)
  "$bin/remoteler-proxy" init --cluster compare.test --data-dir "$w/proxy" --host 127.0.0.1 >"$w/init.txt"
  pin=$(grep -o 'sha256:[0-9a-f]\{64\}' "$w/init.txt" | head -1)
  cat >"$w/proxy.toml" <<EOF
cluster_name = "compare.test"
data_dir = "$w/proxy"
[listen]
users = "127.0.0.1:$users"
tunnels = "127.0.0.1:$tunnels"
auth = "127.0.0.1:$auth"
metrics = "off"
[log]
level = "warn"
EOF
  "$bin/remoteler-proxy" start --config "$w/proxy.toml" >"$w/proxy.log" 2>&1 &
  proxy_pid=$!; echo "$proxy_pid" >>"$WORK/pids"
  wait_for "the $sys proxy" 30 test -f "$w/proxy/proxy.ready"
  token=$("$bin/remoteler-proxy" tokens add --kind node --ttl 15m --data-dir "$w/proxy" | grep -o '[0-9a-f]\{64\}' | head -1)
  # An agent that knows host certificates would certify this machine's own sshd host key and
  # write beside it in /etc/ssh: not for a benchmark (an older build has no such flag).
  local hostkey=()
  if "$bin/remoteler-agent" start --help 2>&1 | grep -q -- '--ssh-host-key'; then hostkey=(--ssh-host-key ""); fi
  agent_pid=$(bg "$sys-agent" "$bin/remoteler-agent" start --proxy "127.0.0.1:$tunnels" --token "$token" --ca-pin "$pin" \
    --node-name node-r1 --data-dir "$w/agent" "${hostkey[@]}" \
    --forward "iperf=127.0.0.1:$IPERF_PORT" --forward "echo=127.0.0.1:$ECHO_PORT")
  wait_for "$sys node-r1 online" 30 bash -c "'$bin/remoteler-proxy' nodes ls --data-dir '$w/proxy' | grep -Eq '^node-r1 +tunnel +yes'"
  echo "compare-password" >"$w/pw"
  "$bin/remoteler-proxy" users add bench --roles access --logins root --password-file "$w/pw" --data-dir "$w/proxy" >/dev/null
  REMOTELER_HOME="$w/home" "$bin/remoteler" login --proxy "127.0.0.1:$users" --user bench --password-file "$w/pw" --ca-pin "$pin" >/dev/null
  fwd_iperf=$(free_port); fwd_echo=$(free_port)
  iperf_pid=$(bg "$sys-forward-iperf" env REMOTELER_HOME="$w/home" "$bin/remoteler" forward --listen "127.0.0.1:$fwd_iperf" node-r1 iperf)
  echo_pid=$(bg "$sys-forward-echo" env REMOTELER_HOME="$w/home" "$bin/remoteler" forward --listen "127.0.0.1:$fwd_echo" node-r1 echo)
  wait_for "the $sys echo forward" 30 echo_ok "$fwd_echo"
  FWD_IPERF[$sys]=$fwd_iperf; FWD_ECHO[$sys]=$fwd_echo
  PIDS[$sys]="$proxy_pid $agent_pid $iperf_pid $echo_pid"
  USERS_PORT_OF[$sys]=$users; TUNNEL_PORT_OF[$sys]=$tunnels
}
start_remoteler remoteler "$BIN"
OURS=(remoteler)
if [ -n "$OURS_OLD" ]; then
  start_remoteler remoteler-old "$OURS_OLD"
  OURS+=(remoteler-old)
fi
read -r PROXY_PID AGENT_PID FWD_IPERF_PID FWD_ECHO_PID <<<"${PIDS[remoteler]}"
USERS_PORT=${USERS_PORT_OF[remoteler]}; TUNNEL_PORT=${TUNNEL_PORT_OF[remoteler]}
SYSTEMS=(direct "${OURS[@]}" rathole)


say "rathole 0.5: CA, server certificate (pkcs12), server and client"
mkdir -p "$WORK/rh"
(
  cd "$WORK/rh"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=compare CA" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
  printf 'subjectAltName=DNS:localhost\n' >san.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile san.ext 2>/dev/null
  openssl pkcs12 -export -out identity.pfx -inkey server.key -in server.pem -certfile ca.pem -passout pass:1234
)
RH_PORT=$(free_port); RH_IPERF_PORT=$(free_port); RH_ECHO_PORT=$(free_port)
cat >"$WORK/rh/server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$RH_PORT"
default_token = "compare-token"
[server.transport]
type = "tls"
[server.transport.tls]
pkcs12 = "$WORK/rh/identity.pfx"
pkcs12_password = "1234"
[server.services.iperf]
bind_addr = "127.0.0.1:$RH_IPERF_PORT"
[server.services.echo]
bind_addr = "127.0.0.1:$RH_ECHO_PORT"
EOF
cat >"$WORK/rh/client.toml" <<EOF
[client]
remote_addr = "localhost:$RH_PORT"
default_token = "compare-token"
[client.transport]
type = "tls"
[client.transport.tls]
trusted_root = "$WORK/rh/ca.pem"
hostname = "localhost"
[client.services.iperf]
local_addr = "127.0.0.1:$IPERF_PORT"
[client.services.echo]
local_addr = "127.0.0.1:$ECHO_PORT"
EOF
RH_SERVER_PID=$(bg rathole-server env RUST_LOG=warn "$RATHOLE" --server "$WORK/rh/server.toml")
sleep 0.5
RH_CLIENT_PID=$(bg rathole-client env RUST_LOG=warn "$RATHOLE" --client "$WORK/rh/client.toml")
wait_for "rathole's echo service" 30 echo_ok "$RH_ECHO_PORT"
RH_PIDS=("$RH_SERVER_PID" "$RH_CLIENT_PID")

say "TLS each side negotiates (openssl s_client against each listener)"
tls_of() {  # tls_of PORT [s_client options]: "TLSv1.3 TLS_AES_256_GCM_SHA384"
  local port=$1; shift
  timeout 5 openssl s_client -connect "127.0.0.1:$port" "$@" </dev/null 2>/dev/null |
    awk '/^ *Protocol *:/ {p=$3} /^ *Cipher *:/ {c=$3} /^New, / {p2=$2; c2=$5} END {print (p?p:p2), (c?c:c2)}'
}
{
  echo "remoteler users (proxy :$USERS_PORT)|$(tls_of "$USERS_PORT" -alpn remoteler-session)"
  echo "remoteler tunnels (proxy :$TUNNEL_PORT)|$(tls_of "$TUNNEL_PORT")"
  if [ -n "$OURS_OLD" ]; then
    echo "remoteler-old users (proxy :${USERS_PORT_OF[remoteler-old]})|$(tls_of "${USERS_PORT_OF[remoteler-old]}" -alpn remoteler-session)"
    echo "remoteler-old tunnels (proxy :${TUNNEL_PORT_OF[remoteler-old]})|$(tls_of "${TUNNEL_PORT_OF[remoteler-old]}")"
  fi
  echo "rathole server (:$RH_PORT)|$(tls_of "$RH_PORT" -servername localhost)"
} | tee "$RES/tls.txt"

# HOLD=1: keep everything running for profiling by hand (perf, strace) and stop at Ctrl-C.
if [ -n "${HOLD:-}" ]; then
  {
    echo "PROXY_PID=$PROXY_PID AGENT_PID=$AGENT_PID FWD_IPERF_PID=$FWD_IPERF_PID FWD_ECHO_PID=$FWD_ECHO_PID"
    echo "RH_SERVER_PID=$RH_SERVER_PID RH_CLIENT_PID=$RH_CLIENT_PID"
    echo "IPERF_PORT=$IPERF_PORT ECHO_PORT=$ECHO_PORT FWD_IPERF=${FWD_IPERF[remoteler]} FWD_ECHO=${FWD_ECHO[remoteler]}"
    echo "RH_IPERF_PORT=$RH_IPERF_PORT RH_ECHO_PORT=$RH_ECHO_PORT"
  } | tee "$WORK/hold.env"
  say "holding (HOLD=1): the variables above are in $WORK/hold.env; stop with Ctrl-C"
  sleep infinity
fi

# ---- 1. throughput -------------------------------------------------------------------------
port_of() { case $1 in direct) echo "$IPERF_PORT" ;; rathole) echo "$RH_IPERF_PORT" ;; *) echo "${FWD_IPERF[$1]}" ;; esac; }
pids_of() { case $1 in direct) echo "" ;; rathole) echo "${RH_PIDS[*]}" ;; *) echo "${PIDS[$1]}" ;; esac; }
echo_port_of() { case $1 in direct) echo "$ECHO_PORT" ;; rathole) echo "$RH_ECHO_PORT" ;; *) echo "${FWD_ECHO[$1]}" ;; esac; }

if ! skip throughput; then
  say "throughput: iperf3 -t $IPERF_SECS, $REPS repetitions, up (client -> server) and down (-R)"
  for rep in $(seq "$REPS"); do
    for dir in up down; do
      for sys in "${SYSTEMS[@]}"; do
        flag=(); [ "$dir" = down ] && flag=(-R)
        pids=$(pids_of "$sys")
        # shellcheck disable=SC2086
        before=$(cpu_ticks $pids); each_before=(); for p in $pids; do each_before+=("$(cpu_ticks "$p")"); done
        iperf3 -c 127.0.0.1 -p "$(port_of "$sys")" -t "$IPERF_SECS" "${flag[@]}" -J >"$RES/iperf-$sys-$dir-$rep.json" || true
        # shellcheck disable=SC2086
        after=$(cpu_ticks $pids); each=(); i=0
        for p in $pids; do each+=("$(( $(cpu_ticks "$p") - each_before[i] ))"); i=$((i + 1)); done
        echo "$sys $dir $rep $(( after - before )) ${each[*]}" >>"$RES/iperf-cpu.txt"
        python3 - "$RES/iperf-$sys-$dir-$rep.json" "$sys" "$dir" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
r = d.get("end", {}).get("sum_received", {})
print(f"  {sys.argv[2]:>9} {sys.argv[3]:>4}: {r.get('bits_per_second', 0)/1e9:6.2f} Gbit/s" + (f"  ERROR {d['error']}" if "error" in d else ""))
PY
      done
    done
  done
fi

# ---- 2. round trips ------------------------------------------------------------------------
if ! skip rtt; then
  say "round trips: rtt, 64 B, $RTT_RATE messages/s over all connections, ${RTT_SECS}s, $RTT_REPS repetitions"
  for conns in $RTT_CONNS; do
    for rep in $(seq "$RTT_REPS"); do
      for sys in "${SYSTEMS[@]}"; do
        "$LT" rtt --target "127.0.0.1:$(echo_port_of "$sys")" --connections "$conns" \
          --duration "${RTT_SECS}s" --rate "$RTT_RATE" --json "$RES/rtt-$sys-$conns-$rep.json" \
          >"$RES/rtt-$sys-$conns-$rep.txt" 2>&1 || echo "  (rtt $sys $conns reported failures)"
        grep "round trip " "$RES/rtt-$sys-$conns-$rep.txt" | sed "s/^/  $sys x$conns: /"
      done
    done
  done
fi

# ---- 3. interactive under bulk -------------------------------------------------------------
if ! skip bulk; then
  say "interactive round trips (1 connection) with and without a bulk iperf3 through the same tunnel"
  for limit in $BULK_LIMITS; do
    for rep in $(seq "$RTT_REPS"); do
      for sys in "${OURS[@]}" rathole; do
        "$LT" rtt --target "127.0.0.1:$(echo_port_of "$sys")" --connections 1 --duration "${RTT_SECS}s" \
          --rate 500 --json "$RES/quiet-$sys-$limit-$rep.json" >/dev/null 2>&1 || true
        rate=(); [ "$limit" != unlimited ] && rate=(-b "$limit")
        iperf3 -c 127.0.0.1 -p "$(port_of "$sys")" -t $((RTT_SECS + 3)) "${rate[@]}" -J \
          >"$RES/bulk-iperf-$sys-$limit-$rep.json" 2>&1 &
        BULK=$!
        sleep 1
        "$LT" rtt --target "127.0.0.1:$(echo_port_of "$sys")" --connections 1 --duration "${RTT_SECS}s" \
          --rate 500 --json "$RES/bulk-$sys-$limit-$rep.json" >/dev/null 2>&1 || true
        wait "$BULK" || true
        python3 - "$RES" "$sys" "$limit" "$rep" <<'PY'
import json, sys
res, s, l, r = sys.argv[1:5]
q = json.load(open(f"{res}/quiet-{s}-{l}-{r}.json"))["rtt"]
b = json.load(open(f"{res}/bulk-{s}-{l}-{r}.json"))["rtt"]
print(f"  {s:>9} bulk {l}: p99 quiet {q['p99_us']/1000:.3f} ms, under bulk {b['p99_us']/1000:.3f} ms")
PY
      done
    done
  done
fi

# ---- 4. memory per agent -------------------------------------------------------------------
if ! skip memory; then
  for k in $AGENTS; do
    say "memory: rathole server with $k services connected (clients of 50 services each)"
    MPORT=$(free_port)
    dir="$WORK/rh-mem-$k"; mkdir -p "$dir"
    {
      echo "[server]"; echo "bind_addr = \"127.0.0.1:$MPORT\""; echo 'default_token = "compare-token"'
      echo "[server.transport]"; echo 'type = "tls"'
      echo "[server.transport.tls]"; echo "pkcs12 = \"$WORK/rh/identity.pfx\""; echo 'pkcs12_password = "1234"'
      i=0
      for port in $(free_ports "$k"); do
        i=$((i + 1)); echo "[server.services.s$i]"; echo "bind_addr = \"127.0.0.1:$port\""
      done
    } >"$dir/server.toml"
    MSERVER=$(bg "rh-mem-server-$k" env RUST_LOG=error "$RATHOLE" --server "$dir/server.toml")
    wait_for "the rathole server" 30 bash -c "ss -ltn | grep -q ':$MPORT '"
    sleep 1
    base=$(rss_kib "$MSERVER")
    clients=()
    for c in $(seq 0 $(( (k - 1) / 50 ))); do
      {
        echo "[client]"; echo "remote_addr = \"localhost:$MPORT\""; echo 'default_token = "compare-token"'
        echo "[client.transport]"; echo 'type = "tls"'
        echo "[client.transport.tls]"; echo "trusted_root = \"$WORK/rh/ca.pem\""; echo 'hostname = "localhost"'
        for i in $(seq $((c * 50 + 1)) $(( c * 50 + 50 < k ? c * 50 + 50 : k ))); do
          echo "[client.services.s$i]"; echo "local_addr = \"127.0.0.1:$ECHO_PORT\""
        done
      } >"$dir/client-$c.toml"
      clients+=("$(bg "rh-mem-client-$k-$c" env RUST_LOG=error "$RATHOLE" --client "$dir/client-$c.toml")")
    done
    want=$((k * 9)); end=$((SECONDS + 120)); have=0
    while [ $SECONDS -lt $end ]; do
      have=$(ss -tnH state established "( sport = :$MPORT )" | wc -l)
      [ "$have" -ge "$want" ] && break
      sleep 1
    done
    sleep 5   # settle
    have=$(ss -tnH state established "( sport = :$MPORT )" | wc -l)
    up=$(rss_kib "$MSERVER")
    client_rss=0; for c in "${clients[@]}"; do client_rss=$((client_rss + $(rss_kib "$c"))); done
    echo "$k $base $up $have $client_rss ${#clients[@]}" | tee -a "$RES/rathole-memory.txt"
    kill "${clients[@]}" "$MSERVER" 2>/dev/null || true
    wait "${clients[@]}" "$MSERVER" 2>/dev/null || true

    say "memory: remoteler-loadtest tunnels --count $k"
    "$LT" tunnels --count "$k" --hold-rounds 3 --proxy-bin "$P" --json "$RES/tunnels-$k.json" \
      >"$RES/tunnels-$k.txt" 2>&1 || echo "  (tunnels $k reported failures)"
    grep -i "per tunnel" "$RES/tunnels-$k.txt" | head -2 | sed 's/^/  /'
  done
fi

# ---- the table -----------------------------------------------------------------------------
say "side by side"
python3 - "$RES" "$HZ" "$REPS" "$IPERF_SECS" "$RTT_REPS" "$RTT_SECS" "$RTT_RATE" "$RTT_CONNS" "$AGENTS" "$BULK_LIMITS" \
  "$(rss_kib "$PROXY_PID")" "$(rss_kib "$AGENT_PID")" "$(rss_kib "$FWD_IPERF_PID")" "$(rss_kib "$FWD_ECHO_PID")" \
  "$(rss_kib "$RH_SERVER_PID")" "$(rss_kib "$RH_CLIENT_PID")" <<'PY' | tee "$CACHE/last.md"
import glob, json, os, statistics, sys
(res, hz, reps, isecs, rreps, rsecs, rate, conns, agents, limits,
 rss_proxy, rss_agent, rss_fwd, rss_fwd_echo, rss_rhs, rss_rhc) = sys.argv[1:17]
hz = int(hz)
med = statistics.median
out = []
def p(line=""): out.append(line)

p("| TLS | protocol cipher |"); p("|---|---|")
if os.path.exists(f"{res}/tls.txt"):
    for line in open(f"{res}/tls.txt"):
        what, tls = line.rstrip("\n").split("|", 1)
        p(f"| {what} | {tls} |")
p()

cpu = {}
if os.path.exists(f"{res}/iperf-cpu.txt"):
    for line in open(f"{res}/iperf-cpu.txt"):
        s, d, r, t, *each = line.split()
        cpu[(s, d, r)] = int(t) / hz
        cpu[(s, d, r, "each")] = [int(x) / hz for x in each]
split = {}
# A second Remoteler build (OURS_OLD) shows up as "remoteler-old" wherever it ran.
old = bool(glob.glob(f"{res}/*-remoteler-old-*"))
systems = ["direct", "remoteler"] + (["remoteler-old"] if old else []) + ["rathole"]
ours = ["remoteler"] + (["remoteler-old"] if old else [])
if cpu:
    p(f"Throughput, one stream, iperf3 -t {isecs}, median of {reps} (runs interleaved)")
    p()
    p("| system | direction | Gbit/s (median; min-max) | ratio to direct | ratio to rathole |"
      + (" ratio to remoteler-old |" if old else "") + " CPU-s per GB | processes counted |")
    p("|---|---|---|---|---|" + ("---|" if old else "") + "---|---|")
    for d in ("up", "down"):
        g, c = {}, {}
        for s in systems:
            vals, cs = [], []
            for f in sorted(glob.glob(f"{res}/iperf-{s}-{d}-*.json")):
                r = f.rsplit("-", 1)[1][:-5]
                j = json.load(open(f))
                e = j.get("end", {}).get("sum_received", {})
                if not e.get("bytes"):
                    continue
                vals.append(e["bits_per_second"] / 1e9)
                if s != "direct":
                    gb = e["bytes"] / 1e9
                    cs.append(cpu[(s, d, r)] / gb)
                    split.setdefault((s, d), []).append([x / gb for x in cpu[(s, d, r, "each")]])
            g[s] = vals; c[s] = cs
        for s in systems:
            if not g[s]:
                p(f"| {s} | {d} | failed | | | | |" + (" |" if old else "")); continue
            m = med(g[s])
            rd = m / med(g["direct"]) if g["direct"] else float("nan")
            rr = m / med(g["rathole"]) if g["rathole"] else float("nan")
            ro = f" {m / med(g['remoteler-old']):.2f} |" if old and g["remoteler-old"] else (" |" if old else "")
            procs = "server+client" if s == "rathole" else "-" if s == "direct" else "proxy+agent+forward"
            cps = f"{med(c[s]):.2f}" if c[s] else "-"
            p(f"| {s} | {d} | {m:.2f} ({min(g[s]):.2f}-{max(g[s]):.2f}) | {rd:.2f} | {rr:.2f} |{ro} {cps} | {procs} |")
    p()
    names = {"rathole": ["server", "client"]}
    for s in ours:
        names[s] = ["proxy", "agent", "forward", "forward (echo, idle)"]
    p("CPU-seconds per GB by process (median of the runs)")
    p()
    for (s, d), rows_ in sorted(split.items()):
        parts = [f"{n} {med([r[i] for r in rows_]):.2f}" for i, n in enumerate(names[s]) if i < len(rows_[0])]
        p(f"* {s} {d}: " + ", ".join(parts))
    p()

rows = []
for n in conns.split():
    per = {}
    for s in systems:
        xs = [json.load(open(f))["rtt"] for f in sorted(glob.glob(f"{res}/rtt-{s}-{n}-*.json"))]
        if xs:
            per[s] = {k: med([x[k] for x in xs]) for k in ("p50_us", "p99_us", "p999_us")}
            per[s]["errors"] = sum(x["errors"] for x in xs)
    rows.append((n, per))
if any(per for _, per in rows):
    p(f"Round trips, 64 B, {rate} messages/s over all connections, {rsecs} s each, median of {rreps} runs (µs)")
    p()
    p("| connections | system | p50 | p99 | p99.9 | added p99 vs direct | failed conns |")
    p("|---|---|---|---|---|---|---|")
    for n, per in rows:
        for s in systems:
            if s not in per: continue
            x = per[s]
            add = x["p99_us"] - per["direct"]["p99_us"] if "direct" in per else float("nan")
            p(f"| {n} | {s} | {x['p50_us']:.1f} | {x['p99_us']:.1f} | {x['p999_us']:.1f} | {add:+.1f} | {x['errors']} |")
    p()

bulk = []
for l in limits.split():
    for s in ours + ["rathole"]:
        q = [json.load(open(f))["rtt"]["p99_us"] for f in sorted(glob.glob(f"{res}/quiet-{s}-{l}-*.json"))]
        b = [json.load(open(f))["rtt"]["p99_us"] for f in sorted(glob.glob(f"{res}/bulk-{s}-{l}-*.json"))]
        g = []
        for f in sorted(glob.glob(f"{res}/bulk-iperf-{s}-{l}-*.json")):
            try:
                g.append(json.load(open(f))["end"]["sum_received"]["bits_per_second"] / 1e9)
            except Exception:
                pass
        if q and b:
            bulk.append((s, l, med(q), med(b), med(g) if g else float("nan")))
if bulk:
    p(f"Interactive round trips (1 connection, 500/s) while a bulk iperf3 runs through the same tunnel, median of {rreps}")
    p()
    p("| system | bulk (iperf3 -b) | p99 alone (ms) | p99 under bulk (ms) | added (ms) | bulk Gbit/s meanwhile |")
    p("|---|---|---|---|---|---|")
    for s, l, q, b, g in bulk:
        p(f"| {s} | {l} | {q/1000:.3f} | {b/1000:.3f} | {(b-q)/1000:+.3f} | {g:.2f} |")
    p()

mem = []
if os.path.exists(f"{res}/rathole-memory.txt"):
    for line in open(f"{res}/rathole-memory.txt"):
        k, base, up, have, crss, nclients = map(int, line.split())
        ours = None
        f = f"{res}/tunnels-{k}.json"
        if os.path.exists(f):
            j = json.load(open(f))
            ours = j.get("proxy_memory", {}).get("kib_per_tunnel_after_hold")
        mem.append((k, (up - base) / k, have, ours, crss, nclients))
if mem:
    p("Memory per agent (server side)")
    p()
    p("| agents K | rathole server RSS per agent (KiB) | rathole TLS connections at the server | remoteler proxy RSS per tunnel (KiB) | ratio rathole/remoteler |")
    p("|---|---|---|---|---|")
    for k, rh, have, ours, crss, nclients in mem:
        o = f"{ours:.2f}" if isinstance(ours, (int, float)) else "-"
        ratio = f"{rh/ours:.1f}" if isinstance(ours, (int, float)) and ours else "-"
        p(f"| {k} | {rh:.1f} | {have} | {o} | {ratio} |")
    p()
p(f"Resident memory after the run: proxy {rss_proxy} KiB, agent {rss_agent} KiB, forward (iperf) {rss_fwd} KiB, "
  f"forward (echo, carried the round trips) {rss_fwd_echo} KiB; "
  f"rathole server {rss_rhs} KiB, rathole client {rss_rhc} KiB.")
print("\n".join(out))
PY
echo "(table also in $CACHE/last.md; raw results in $RES$([ "${KEEP_WORK:-0}" = 1 ] || echo ', removed at exit: KEEP_WORK=1 keeps them'))"
