#!/usr/bin/env bash
# The edge agent's footprint, as recorded in docs/benchmarks.md ("Edge agent footprint"):
#   * stripped size of remoteler-agent (profile release-small) for x86_64 and, when the cross
#     toolchain is there, aarch64;
#   * resident memory (VmRSS, VmHWM from /proc/PID/status) of the native x86_64 agent, idle
#     with its tunnel up, while carrying an ssh session that copies 64 MiB, and after it;
#   * CPU time of the idle agent over 60 s (utime+stime from /proc/PID/stat, and the
#     nanosecond total from /proc/PID/schedstat), keepalive at its default (10 s).
# Each figure is the median of SAMPLES runs (default 3). The agent runs behind NAT in a network
# namespace, as in scripts/e2e.sh; proxy, agent and client are release builds.
# Takes about 1 + SAMPLES x 75 s. KEEP_WORK=1 keeps the logs.
source "$(dirname "$0")/../scripts/lib.sh"
source "$ROOT/packaging/cross-aarch64.sh"
trap cleanup EXIT
SAMPLES=${SAMPLES:-3}
ensure_packages

say "building: proxy and client (release), agent (release-small, x86_64 and aarch64)"
(cd "$ROOT" && cargo build --locked -q --release -p proxy -p client &&
  cargo build --locked -q --profile release-small -p agent)
ARM_AGENT=""
if aarch64_toolchain; then
  (cd "$ROOT" && cargo build --locked -q --profile release-small --target "$AARCH64_TARGET" -p agent)
  ARM_AGENT="$ROOT/target/$AARCH64_TARGET/release-small/remoteler-agent"
fi
P="$ROOT/target/release/remoteler-proxy"; C="$ROOT/target/release/remoteler"
A="$ROOT/target/release-small/remoteler-agent"
export REMOTELER_HOME="$WORK/home"

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
kib() { awk -v k="$1" '$1 == k":" { print $2 }' "/proc/$2/status"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
cpu_ns() { awk '{ print $1 }' "/proc/$1/schedstat"; }

say "sizes (stripped, release-small)"
SIZE_X86=$(stat -c %s "$A")
echo "x86_64  $A: $SIZE_X86 bytes"
if [ -n "$ARM_AGENT" ]; then
  SIZE_ARM=$(stat -c %s "$ARM_AGENT")
  echo "aarch64 $ARM_AGENT: $SIZE_ARM bytes"
fi
file "$A" ${ARM_AGENT:+"$ARM_AGENT"} 2>/dev/null | sed 's/, BuildID[^,]*//' || true

say "cluster, NAT'd site, proxy, sshd"
"$P" init --cluster footprint.test --data-dir "$WORK/proxy" --host 10.80.0.1 >"$WORK/init.txt"
PIN=$(grep -o 'sha256:[0-9a-f]\{64\}' "$WORK/init.txt" | head -1)
make_nat_site fp-r1 10.80.0.1 10.80.0.2
start_sshd node-fp 2222 fp-r1
USERS_PORT=$(free_port); TUNNEL_PORT=$(free_port)
bg proxy "$P" start --data-dir "$WORK/proxy" --users "127.0.0.1:$USERS_PORT" \
  --tunnels "10.80.0.1:$TUNNEL_PORT" --auth "127.0.0.1:$(free_port)" --metrics off >/dev/null
wait_for "the proxy" 30 test -f "$WORK/proxy/proxy.ready"
echo "fp-password" >"$WORK/pw"
"$P" users add alice --roles access --logins root --password-file "$WORK/pw" --data-dir "$WORK/proxy" >/dev/null
"$C" login --proxy "127.0.0.1:$USERS_PORT" --user alice --password-file "$WORK/pw" --ca-pin "$PIN" >/dev/null
"$C" config >"$WORK/ssh_config"
cat >>"$WORK/ssh_config" <<EOF
Host *
  User root
  IdentityFile $(user_key)
  UserKnownHostsFile $WORK/known_hosts
  StrictHostKeyChecking accept-new
  BatchMode yes
EOF
head -c 64M /dev/urandom >"$WORK/blob"
online() { "$P" nodes ls --data-dir "$WORK/proxy" | grep -Eq '^node-fp +tunnel +yes'; }

IDLE_RSS=(); IDLE_HWM=(); IDLE_ANON=(); IDLE_FILE=(); SESS_RSS=(); SESS_HWM=(); AFTER_RSS=(); TICKS=(); NS=()
for run in $(seq "$SAMPLES"); do
  say "run $run/$SAMPLES: a fresh agent joins, idles, carries a 64 MiB copy each way"
  rm -rf "$WORK/agent"
  TOKEN=$("$P" tokens add --kind node --ttl 15m --data-dir "$WORK/proxy" | grep -o '[0-9a-f]\{64\}' | head -1)
  AGENT=$(bg "agent-$run" ip netns exec fp-r1 "$A" start --proxy "10.80.0.1:$TUNNEL_PORT" \
    --token "$TOKEN" --ca-pin "$PIN" --node-name node-fp --data-dir "$WORK/agent" \
    --forward ssh=127.0.0.1:2222)
  wait_for "node-fp online" 30 online
  sleep 5
  IDLE_RSS+=("$(kib VmRSS "$AGENT")"); IDLE_HWM+=("$(kib VmHWM "$AGENT")")
  IDLE_ANON+=("$(kib RssAnon "$AGENT")"); IDLE_FILE+=("$(kib RssFile "$AGENT")")
  t0=$(cpu_ticks "$AGENT"); n0=$(cpu_ns "$AGENT")
  sleep 60
  TICKS+=("$(($(cpu_ticks "$AGENT") - t0))"); NS+=("$(($(cpu_ns "$AGENT") - n0))")
  # During the session: sample VmRSS every 0.1 s while 64 MiB go up, then come down.
  : >"$WORK/samples"
  ( while kill -0 "$AGENT" 2>/dev/null; do kib VmRSS "$AGENT" >>"$WORK/samples"; sleep 0.1; done ) &
  SAMPLER=$!
  ssh -F "$WORK/ssh_config" node-fp.footprint.test 'cat > /dev/null' <"$WORK/blob"
  ssh -F "$WORK/ssh_config" node-fp.footprint.test 'head -c 64M /dev/urandom' >/dev/null
  kill "$SAMPLER"; wait "$SAMPLER" 2>/dev/null || true
  SESS_RSS+=("$(median <"$WORK/samples")"); SESS_HWM+=("$(kib VmHWM "$AGENT")")
  sleep 3
  AFTER_RSS+=("$(kib VmRSS "$AGENT")")
  echo "idle VmRSS ${IDLE_RSS[-1]} KiB (VmHWM ${IDLE_HWM[-1]}, RssAnon ${IDLE_ANON[-1]}, RssFile ${IDLE_FILE[-1]}); idle 60 s: ${TICKS[-1]} ticks, ${NS[-1]} ns;" \
    "session VmRSS median ${SESS_RSS[-1]} KiB of $(wc -l <"$WORK/samples") samples, VmHWM ${SESS_HWM[-1]} KiB;" \
    "after ${AFTER_RSS[-1]} KiB"
  kill "$AGENT"; while kill -0 "$AGENT" 2>/dev/null; do sleep 0.1; done
done

say "medians of $SAMPLES runs (native x86_64 agent, release-small)"
m() { printf '%s\n' "$@" | median; }
echo "size x86_64 stripped:         $SIZE_X86 bytes"
[ -n "${SIZE_ARM:-}" ] && echo "size aarch64 stripped:        $SIZE_ARM bytes"
echo "idle, tunnel up: VmRSS        $(m "${IDLE_RSS[@]}") KiB   VmHWM $(m "${IDLE_HWM[@]}") KiB"
echo "idle, tunnel up: RssAnon      $(m "${IDLE_ANON[@]}") KiB   RssFile $(m "${IDLE_FILE[@]}") KiB (heap and stacks / binary and libraries)"
echo "during the ssh copies: VmRSS  $(m "${SESS_RSS[@]}") KiB   VmHWM $(m "${SESS_HWM[@]}") KiB"
echo "after the session: VmRSS      $(m "${AFTER_RSS[@]}") KiB"
echo "idle CPU over 60 s:           $(m "${TICKS[@]}") ticks of 1/$(getconf CLK_TCK) s (utime+stime), $(m "${NS[@]}") ns (schedstat)"
