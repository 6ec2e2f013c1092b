#!/usr/bin/env bash
# Checks the Debian packages of scripts/package.sh (built first unless NO_BUILD=1):
#   1. contents: control fields, files, owners and modes, conffiles, maintainer scripts,
#      architecture and stripping of the binaries, no token in the shipped agent config;
#   2. the systemd units: `systemd-analyze verify` (the check is shown to fail on a broken
#      unit first) and `systemd-analyze security --offline` under a threshold;
#   3. installation into a throwaway Debian bookworm root (debootstrap, cached under
#      target/check-packages/): dpkg -i runs the real maintainer scripts, then the documented
#      first steps run as the service users with the units' own commands, in a network
#      namespace: init, start, a token, the agent joining, backup, SIGTERM draining, restore;
#      an upgrade keeps a locally edited conffile and the data; purging the agent keeps its
#      data directory.
# Without a reachable Debian mirror step 3 falls back to `dpkg -x` (files only, no maintainer
# scripts), and says so. Needs root. KEEP_WORK=1 keeps the working directory.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DEBS="$ROOT/target/debian"
CACHE="$ROOT/target/check-packages"
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
W=$(mktemp -d /tmp/remoteler-pkg.XXXXXX)
NS=rpkg-$$
PIDS=()

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
ok() { echo "ok - $*"; }
check() { local what=$1; shift; "$@" || fail "$what"; ok "$what"; }
# fails COMMAND...: COMMAND fails (its complaints are not shown).
fails() { ! "$@" 2>/dev/null; }
quiet() { "$@" >/dev/null 2>&1; }
cleanup() {
  local pid
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work directory kept: $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
[ "$(id -u)" -eq 0 ] || fail "run as root (dpkg into a throwaway root, network namespaces)"

need=()
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v readelf >/dev/null || need+=(binutils)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ "${NO_BUILD:-0}" != 1 ]; then
  say "building the packages (scripts/package.sh)"
  bash scripts/package.sh >"$W/package.log" 2>&1 || { tail -30 "$W/package.log"; fail "scripts/package.sh failed"; }
fi
VERSION=$(cargo metadata --no-deps --format-version 1 --locked |
  python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="proxy"))')
PROXY_DEB="$DEBS/remoteler-proxy_${VERSION}-1_amd64.deb"
AGENT_DEB="$DEBS/remoteler-agent_${VERSION}-1_amd64.deb"
AGENT_ARM_DEB="$DEBS/remoteler-agent_${VERSION}-1_arm64.deb"
CLIENT_DEB="$DEBS/remoteler_${VERSION}-1_amd64.deb"
for deb in "$PROXY_DEB" "$AGENT_DEB" "$CLIENT_DEB"; do [ -f "$deb" ] || fail "missing $deb"; done
ALL_DEBS=("$PROXY_DEB" "$AGENT_DEB" "$CLIENT_DEB")
if [ -f "$AGENT_ARM_DEB" ]; then ALL_DEBS+=("$AGENT_ARM_DEB"); else echo "note: no arm64 package ($AGENT_ARM_DEB), its checks are skipped"; fi

# ---- 1. contents ----------------------------------------------------------------------------

# has_entry DEB MODE PATH: the data archive holds PATH (./ relative), owned by root, with MODE
# as `ls -l` prints it.
has_entry() { dpkg-deb -c "$1" | awk -v m="$2" -v p="./$3" '$1 == m && $2 == "0/0" && $6 == p { f = 1 } END { exit !f }'; }
field() { dpkg-deb -f "$1" "$2"; }
# creates_user SCRIPT USER: SCRIPT (continuation lines joined) runs adduser --system for USER.
creates_user() { sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$1" | grep -Eq "adduser --quiet --system --group .* $2\$"; }

# check_binary DEB PATH ARCH: the binary is for ARCH and carries no debug sections.
check_binary() {
  local deb=$1 path=$2 arch=$3 x machine
  x="$W/x-$(basename "$deb")"; rm -rf "$x"; dpkg-deb -x "$deb" "$x"
  machine=$(readelf -h "$x/$path" | sed -n 's/^ *Machine: *//p')
  case $arch in amd64) [[ $machine == *X86-64* ]] ;; arm64) [[ $machine == *AArch64* ]] ;; esac ||
    fail "$(basename "$deb"): $path is built for $machine, the package says $arch"
  ! readelf -S "$x/$path" | grep -q '\.debug_info' || fail "$(basename "$deb"): $path is not stripped"
  ok "$(basename "$deb"): /$path is a stripped $arch binary ($(stat -c %s "$x/$path") bytes)"
}

# check_service_pkg DEB PACKAGE USER DATA_DIR CONFIG ARCH BIN: what proxy and agent share.
check_service_pkg() {
  local deb=$1 pkg=$2 user=$3 data=$4 conf=$5 arch=$6 bin=$7 name ctl
  name=$(basename "$deb")
  check "$name: Package $pkg, Architecture $arch" test "$(field "$deb" Package) $(field "$deb" Architecture)" = "$pkg $arch"
  check "$name: depends on adduser and libc6" bash -c "grep -q 'adduser' <<<'$(field "$deb" Depends)' && grep -q 'libc6' <<<'$(field "$deb" Depends)'"
  check "$name: /usr/bin/$bin, 0755 root" has_entry "$deb" -rwxr-xr-x "usr/bin/$bin"
  check "$name: /usr/lib/systemd/system/$pkg.service, 0644 root" has_entry "$deb" -rw-r--r-- "usr/lib/systemd/system/$pkg.service"
  check "$name: /etc/remoteler/$conf, 0644 root" has_entry "$deb" -rw-r--r-- "etc/remoteler/$conf"
  check "$name: no setuid/setgid file, everything owned by root" \
    bash -c "! dpkg-deb -c '$deb' | awk '\$1 ~ /[sS]/ || \$2 != \"0/0\"' | grep -q ."
  ctl="$W/ctl-$name"; rm -rf "$ctl"; dpkg-deb -e "$deb" "$ctl"
  check "$name: conffiles is exactly /etc/remoteler/$conf" test "$(cat "$ctl/conffiles")" = "/etc/remoteler/$conf"
  for s in postinst postrm prerm; do
    check "$name: $s is an executable sh script with valid syntax" bash -c "test -x '$ctl/$s' && head -1 '$ctl/$s' | grep -q '^#!/bin/sh' && sh -n '$ctl/$s'"
  done
  check "$name: postinst creates the system user $user" creates_user "$ctl/postinst" "$user"
  check "$name: postinst creates $data, 0700, owned by $user" grep -q "install -d -m 0700 -o $user -g $user $data" "$ctl/postinst"
  # debhelper's "dont-enable" snippet only re-enables a unit the administrator had enabled.
  check "$name: the unit is neither enabled nor started on install" \
    bash -c "grep -q 'deb-systemd-helper debian-installed $pkg.service' '$ctl/postinst' && ! grep -Eq '_dh_action=start|deb-systemd-invoke (start|restart) ' '$ctl/postinst'"
  check "$name: an upgrade restarts a running service (try-restart)" grep -q "deb-systemd-invoke try-restart $pkg.service" "$ctl/postinst"
  check "$name: removal stops the service" grep -q "deb-systemd-invoke stop $pkg.service" "$ctl/prerm"
  check_binary "$deb" "usr/bin/$bin" "$arch"
}

# check_unit_text UNIT_FILE PACKAGE USER DATA_DIR CONFIG: the directives the issue asks for.
check_unit_text() {
  local unit=$1 pkg=$2 user=$3 data=$4 conf=$5 d
  for d in "User=$user" "Group=$user" "ExecStart=/usr/bin/$pkg start --config /etc/remoteler/$conf" \
    "Restart=on-failure" "StateDirectory=${data#/var/lib/}" "StateDirectoryMode=0700" \
    NoNewPrivileges=yes ProtectSystem=strict "ReadWritePaths=$data" ProtectHome=yes PrivateTmp=yes \
    PrivateDevices=yes ProtectKernelTunables=yes ProtectKernelModules=yes ProtectControlGroups=yes \
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX" RestrictNamespaces=yes LockPersonality=yes \
    MemoryDenyWriteExecute=yes SystemCallArchitectures=native CapabilityBoundingSet= \
    WantedBy=multi-user.target; do
    grep -qxF "$d" "$unit" || fail "$pkg.service: no line '$d'"
  done
  grep -Eq '^RestartSec=[1-9][0-9]*s$' "$unit" || fail "$pkg.service: no RestartSec= of some seconds"
  ok "$pkg.service: service user, ExecStart, Restart, state directory and every hardening directive"
}

say "1. package contents"
check_service_pkg "$PROXY_DEB" remoteler-proxy remoteler /var/lib/remoteler proxy.toml amd64 remoteler-proxy
check_service_pkg "$AGENT_DEB" remoteler-agent remoteler-agent /var/lib/remoteler-agent agent.toml amd64 remoteler-agent
if [ -f "$AGENT_ARM_DEB" ]; then
  check_service_pkg "$AGENT_ARM_DEB" remoteler-agent remoteler-agent /var/lib/remoteler-agent agent.toml arm64 remoteler-agent
  # The arm64 Depends is written by hand (Cargo.toml variant arm64): it must cover the binary.
  need_glibc=$(readelf --dyn-syms -W "$W/x-$(basename "$AGENT_ARM_DEB")/usr/bin/remoteler-agent" |
    grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
  dep_glibc=$(field "$AGENT_ARM_DEB" Depends | grep -o 'libc6 (>= [0-9.]*)' | grep -o '[0-9.]*)' | tr -d ')')
  check "arm64 agent: Depends libc6 (>= $dep_glibc) covers the newest symbol it uses (GLIBC_$need_glibc)" \
    test "$(printf '%s\n%s\n' "$need_glibc" "$dep_glibc" | sort -V | tail -1)" = "$dep_glibc"
fi
check "remoteler: Package remoteler, amd64, 0755 /usr/bin/remoteler" \
  bash -c "test '$(field "$CLIENT_DEB" Package) $(field "$CLIENT_DEB" Architecture)' = 'remoteler amd64' && $(declare -f has_entry); has_entry '$CLIENT_DEB' -rwxr-xr-x usr/bin/remoteler"
check_binary "$CLIENT_DEB" usr/bin/remoteler amd64
check "remoteler: no maintainer scripts, no conffiles (nothing to configure)" \
  bash -c "dpkg-deb -e '$CLIENT_DEB' '$W/ctl-client' && ! ls '$W/ctl-client' | grep -Eq 'inst|rm|conffiles'"

XP="$W/x-$(basename "$PROXY_DEB")"; XA="$W/x-$(basename "$AGENT_DEB")"
check_unit_text "$XP/usr/lib/systemd/system/remoteler-proxy.service" remoteler-proxy remoteler /var/lib/remoteler proxy.toml
check_unit_text "$XA/usr/lib/systemd/system/remoteler-agent.service" remoteler-agent remoteler-agent /var/lib/remoteler-agent agent.toml
check "remoteler-proxy.service: LimitNOFILE=1048576" grep -qx 'LimitNOFILE=1048576' "$XP/usr/lib/systemd/system/remoteler-proxy.service"
check "remoteler-proxy.service: stops within TimeoutStopSec above the 30 s drain" \
  bash -c "s=\$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s$/\1/p' '$XP/usr/lib/systemd/system/remoteler-proxy.service'); [ \"\${s:-0}\" -gt 30 ]"
check "remoteler-proxy.service: ExecStartPre refuses, with the init command, when there is no cluster" \
  grep -q '^ExecStartPre=.*runuser -u remoteler -- remoteler-proxy init' "$XP/usr/lib/systemd/system/remoteler-proxy.service"
# Real join tokens are 64 hex digits (`tokens add`); the examples may show an obvious dummy.
for conf in "$XA/etc/remoteler/agent.toml" "$XA/usr/share/doc/remoteler-agent/examples/"*.toml; do
  check "$(basename "$conf") (agent package) holds no real join token" \
    bash -c "! grep -Eq '[0-9a-f]{64}' '$conf' || ! grep -Eq '^[[:space:]]*token[[:space:]]*=.*[0-9a-f]{64}' '$conf'"
done
check "agent.toml (installed default) uses token_file, not an inline token" \
  bash -c "grep -q '^token_file = ' '$XA/etc/remoteler/agent.toml' && ! grep -Eq '^token *=' '$XA/etc/remoteler/agent.toml'"

# ---- 2. the systemd units -------------------------------------------------------------------

# verify_units ROOT UNIT...: systemd-analyze verify against ROOT; any complaint fails.
verify_units() {
  local root=$1 out rc=0; shift
  out=$(systemd-analyze verify --root="$root" "$@" 2>&1) || rc=$?
  if [ $rc -ne 0 ] || [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    return 1
  fi
}
# A root for the verifier from files only: the package trees, the host's targets, /bin/sh.
unit_tree() {
  local tree=$1; shift
  mkdir -p "$tree/usr/lib/systemd/system" "$tree/bin"
  for deb in "$@"; do dpkg-deb -x "$deb" "$tree"; done
  cp -a /usr/lib/systemd/system/*.target "$tree/usr/lib/systemd/system/"
  cp "$(readlink -f /bin/sh)" "$tree/bin/sh"
}

say "2. systemd units"
unit_tree "$W/broken" "$PROXY_DEB"
sed -i 's|^ExecStart=/usr/bin/remoteler-proxy |ExecStart=/usr/bin/remoteler-proxy-missing |' "$W/broken/usr/lib/systemd/system/remoteler-proxy.service"
check "the verifier catches a unit whose ExecStart does not exist" fails verify_units "$W/broken" remoteler-proxy.service
unit_tree "$W/broken2" "$PROXY_DEB"
sed -i 's|^NoNewPrivileges=yes|NoNewPrivilege=yes|' "$W/broken2/usr/lib/systemd/system/remoteler-proxy.service"
check "the verifier catches a misspelt directive" fails verify_units "$W/broken2" remoteler-proxy.service
unit_tree "$W/units-amd64" "$PROXY_DEB" "$AGENT_DEB"
check "systemd-analyze verify: remoteler-proxy.service, remoteler-agent.service (amd64)" \
  verify_units "$W/units-amd64" remoteler-proxy.service remoteler-agent.service
if [ -f "$AGENT_ARM_DEB" ]; then
  unit_tree "$W/units-arm64" "$AGENT_ARM_DEB"
  check "systemd-analyze verify: remoteler-agent.service (arm64)" verify_units "$W/units-arm64" remoteler-agent.service
fi
for unit in remoteler-proxy remoteler-agent; do
  score=$(systemd-analyze security --offline=true --root="$W/units-amd64" "$unit.service" 2>&1 | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
  check "$unit.service: systemd-analyze security exposure $score (at most 3.5)" \
    quiet systemd-analyze security --offline=true --threshold=35 --root="$W/units-amd64" "$unit.service"
done

# ---- 3. installation ------------------------------------------------------------------------

say "3. installation into a throwaway Debian $SUITE root"
BASE="$CACHE/$SUITE-minbase-v1"
mirror_reachable() { timeout 15 python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=10)" "$MIRROR/dists/$SUITE/Release" 2>/dev/null; }
if [ ! -f "$BASE/.complete" ]; then
  if mirror_reachable && { command -v debootstrap >/dev/null || { apt-get install -y -qq debootstrap >/dev/null 2>&1; }; }; then
    say "debootstrap $SUITE (minbase, adduser, systemd) into $BASE, once (about a minute)"
    rm -rf "$BASE"; mkdir -p "$CACHE"
    debootstrap --variant=minbase --include=adduser,systemd "$SUITE" "$BASE" "$MIRROR" >"$W/debootstrap.log" 2>&1 ||
      { tail -20 "$W/debootstrap.log"; rm -rf "$BASE"; fail "debootstrap failed"; }
    touch "$BASE/.complete"
  fi
fi

if [ ! -f "$BASE/.complete" ]; then
  echo "NOTE: no Debian mirror reachable ($MIRROR) and no cached root: installing with dpkg -x"
  echo "NOTE: only the files are checked; maintainer scripts, users and the service run are NOT"
  unit_tree "$W/root" "$PROXY_DEB" "$AGENT_DEB" "$CLIENT_DEB"
  check "dpkg -x: every packaged file is in place" test -x "$W/root/usr/bin/remoteler-proxy" -a -x "$W/root/usr/bin/remoteler-agent" -a -x "$W/root/usr/bin/remoteler" -a -f "$W/root/etc/remoteler/proxy.toml" -a -f "$W/root/etc/remoteler/agent.toml"
  say "packages: checks passed (without the installation run: see the NOTE above)"
  exit 0
fi

R="$W/root"
cp -a "$BASE" "$R"
mkdir -p "$R/tmp/debs"; cp "$PROXY_DEB" "$AGENT_DEB" "$CLIENT_DEB" "$R/tmp/debs/"
in_root() { chroot "$R" "$@"; }
as() { local user=$1; shift; chroot --userspec="$user:$user" "$R" "$@"; }
in_root dpkg -i /tmp/debs/"$(basename "$PROXY_DEB")" /tmp/debs/"$(basename "$AGENT_DEB")" /tmp/debs/"$(basename "$CLIENT_DEB")" \
  </dev/null >"$W/dpkg-install.log" 2>&1 || { cat "$W/dpkg-install.log"; fail "dpkg -i failed in the throwaway root"; }
ok "dpkg -i remoteler-proxy remoteler-agent remoteler: installed, maintainer scripts ran"
for spec in remoteler:/var/lib/remoteler remoteler-agent:/var/lib/remoteler-agent; do
  user=${spec%%:*}; data=${spec#*:}
  check "user $user: a system user (uid < 1000) with no login shell, home $data" \
    bash -c "IFS=: read -r _ _ uid _ _ home shell <<<\"\$(chroot '$R' getent passwd $user)\"; [ \"\$uid\" -lt 1000 ] && [ \"\$home\" = $data ] && [ \"\$shell\" = /usr/sbin/nologin ]"
  check "$data: owned by $user, mode 0700" test "$(in_root stat -c '%U:%G %a' "$data")" = "$user:$user 700"
done
conffiles() { in_root dpkg-query -W -f='${Conffiles}\n' remoteler-proxy remoteler-agent | awk 'NF { print $1 }' | sort | xargs; }
check "dpkg registered the conffiles /etc/remoteler/agent.toml and proxy.toml" \
  test "$(conffiles)" = "/etc/remoteler/agent.toml /etc/remoteler/proxy.toml"
check "systemd-analyze verify in the installed root" verify_units "$R" remoteler-proxy.service remoteler-agent.service
check "the units are installed but not enabled" bash -c "! ls '$R'/etc/systemd/system/multi-user.target.wants/ 2>/dev/null | grep -q remoteler"

say "3b. the documented first steps, with the units' own commands, as the service users"
UNIT_P="$R/usr/lib/systemd/system/remoteler-proxy.service"; UNIT_A="$R/usr/lib/systemd/system/remoteler-agent.service"
PRE=$(sed -n "s/^ExecStartPre=\/bin\/sh -c '\(.*\)'$/\1/p" "$UNIT_P")
read -r -a PROXY_CMD <<<"$(sed -n 's/^ExecStart=//p' "$UNIT_P")"
read -r -a AGENT_CMD <<<"$(sed -n 's/^ExecStart=//p' "$UNIT_A")"
ip netns add "$NS"; ip -n "$NS" link set lo up
OUT=$(as remoteler /bin/sh -c "$PRE" 2>&1) && fail "ExecStartPre passed without a cluster"
check "before init, ExecStartPre refuses and prints the init command" grep -q 'runuser -u remoteler -- remoteler-proxy init' <<<"$OUT"
in_root runuser -u remoteler -- remoteler-proxy init --cluster example.com --data-dir /var/lib/remoteler --host 127.0.0.1 >"$W/init.txt"
PIN=$(grep -o 'sha256:[0-9a-f]\{64\}' "$W/init.txt" | head -1)
check "init as the service user (runuser -u remoteler) creates the cluster it owns" \
  test "$(in_root stat -c %U /var/lib/remoteler/ca.key) $(in_root stat -c %a /var/lib/remoteler/ca.key)" = "remoteler 600"
check "after init, ExecStartPre passes" as remoteler /bin/sh -c "$PRE"
# start_proxy / stop_proxy: the unit's ExecStart as its user; SIGTERM as `systemctl stop` sends.
start_proxy() {
  ip netns exec "$NS" chroot --userspec=remoteler:remoteler "$R" "${PROXY_CMD[@]}" >>"$W/proxy.log" 2>&1 &
  PROXY_PID=$!; PIDS+=("$PROXY_PID")
  for _ in $(seq 150); do [ -f "$R/var/lib/remoteler/proxy.ready" ] && break; kill -0 "$PROXY_PID" 2>/dev/null || break; sleep 0.2; done
  [ -f "$R/var/lib/remoteler/proxy.ready" ] || { cat "$W/proxy.log"; fail "the packaged proxy did not start"; }
}
stop_proxy() {
  kill -TERM "$PROXY_PID"
  for _ in $(seq 225); do kill -0 "$PROXY_PID" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$PROXY_PID" 2>/dev/null && fail "the proxy did not stop within 45 s (TimeoutStopSec) of SIGTERM"
  wait "$PROXY_PID"
}
start_agent() {
  ip netns exec "$NS" chroot --userspec=remoteler-agent:remoteler-agent "$R" "${AGENT_CMD[@]}" >>"$W/agent.log" 2>&1 &
  AGENT_PID=$!; PIDS+=("$AGENT_PID")
  for _ in $(seq 150); do online && break; kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.2; done
  online || { cat "$W/agent.log"; fail "the packaged agent did not come online"; }
}
online() { ip netns exec "$NS" chroot --userspec=remoteler:remoteler "$R" remoteler-proxy nodes ls --config /etc/remoteler/proxy.toml 2>/dev/null | grep -Eq '^node-pkg +tunnel +yes'; }
start_proxy
ok "ExecStart as remoteler with the packaged /etc/remoteler/proxy.toml: $(cat "$R/var/lib/remoteler/proxy.ready")"

OUT=$(ip netns exec "$NS" chroot --userspec=remoteler-agent:remoteler-agent "$R" "${AGENT_CMD[@]}" 2>&1) && rc=0 || rc=$?
check "the shipped agent.toml refuses to start (exit 2, names node_name) until it is edited" \
  bash -c "[ $rc -eq 2 ] && grep -q 'agent.toml: key .node_name.' <<<'$OUT'"
TOKEN=$(in_root runuser -u remoteler -- remoteler-proxy tokens add --kind node --ttl 15m | grep -o '[0-9a-f]\{64\}' | head -1)
[ -n "$TOKEN" ] || fail "tokens add (as remoteler) printed no token"
sed -i -e 's/^node_name = .*/node_name = "node-pkg"/' -e 's/^proxy = .*/proxy = "127.0.0.1:3024"/' \
  -e "s/^ca_pin = .*/ca_pin = \"$PIN\"/" "$R/etc/remoteler/agent.toml"
in_root install -m 0640 -o root -g remoteler-agent /dev/null /etc/remoteler/join-token
echo "$TOKEN" >"$R/etc/remoteler/join-token"
start_agent
ok "the packaged agent (remoteler-agent, token file 0640 root:remoteler-agent) joined: node-pkg online"
check "the agent's identity is in /var/lib/remoteler-agent, owned by remoteler-agent" \
  test "$(in_root stat -c '%U %a' /var/lib/remoteler-agent/node.key)" = "remoteler-agent 600"
# docs/operations.md, "Back up and restore", word for word.
in_root sh -c 'runuser -u remoteler -- flock /var/lib/remoteler/state.lock \
  tar -C /var/lib --exclude=admin.sock --exclude=proxy.ready -czf - remoteler \
  > /root/remoteler-backup-$(date +%F).tar.gz
chmod 0600 /root/remoteler-backup-*.tar.gz' || fail "the documented backup failed"
check "backup while the proxy runs: the archive holds ca.key and state.json, not the socket" \
  bash -c "tar -tzf '$R'/root/remoteler-backup-*.tar.gz | sort | tr '\n' ' ' | grep -q 'remoteler/ca.key .*remoteler/state.json' && ! tar -tzf '$R'/root/remoteler-backup-*.tar.gz | grep -q admin.sock"
stop_proxy && rc=0 || rc=$?
check "SIGTERM (systemctl stop) drains the proxy and it exits 0" test "$rc" -eq 0
kill -TERM "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true
in_root sh -c 'mv /var/lib/remoteler /var/lib/remoteler.before-restore
tar -C /var/lib -xzpf /root/remoteler-backup-*.tar.gz
chown -R remoteler:remoteler /var/lib/remoteler && chmod 0700 /var/lib/remoteler' || fail "the documented restore failed"
start_proxy
start_agent
ok "restore: the proxy starts on the restored directory and the agent comes back with nothing changed"
stop_proxy || fail "the proxy did not exit 0 after SIGTERM"
kill -TERM "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true

say "3c. upgrade, remove, purge"
echo "# local edit kept across upgrades" >>"$R/etc/remoteler/proxy.toml"
CA_SUM=$(sha256sum <"$R/var/lib/remoteler/ca.key")
# The next revision: the same package with its version raised (cargo deb would delete the
# other versions from target/debian).
dpkg-deb -R "$PROXY_DEB" "$W/rev2"
sed -i "s/^Version: .*/Version: ${VERSION}-2/" "$W/rev2/DEBIAN/control"
dpkg-deb --root-owner-group -b "$W/rev2" "$R/tmp/debs/remoteler-proxy_${VERSION}-2_amd64.deb" >/dev/null
in_root dpkg -i "/tmp/debs/remoteler-proxy_${VERSION}-2_amd64.deb" </dev/null >"$W/dpkg-upgrade.log" 2>&1 ||
  { cat "$W/dpkg-upgrade.log"; fail "dpkg -i of the new revision failed"; }
check "upgrade to ${VERSION}-2: installed" test "$(in_root dpkg-query -W -f='${Version}' remoteler-proxy)" = "${VERSION}-2"
check "upgrade keeps the locally edited /etc/remoteler/proxy.toml, without asking" grep -q '^# local edit kept across upgrades' "$R/etc/remoteler/proxy.toml"
check "upgrade keeps the cluster (ca.key unchanged) and its owner" \
  bash -c "[ '$(sha256sum <"$R/var/lib/remoteler/ca.key")' = '$CA_SUM' ] && [ \"\$(chroot '$R' stat -c '%U %a' /var/lib/remoteler)\" = 'remoteler 700' ]"
in_root dpkg --purge remoteler-agent </dev/null >"$W/dpkg-purge.log" 2>&1 || { cat "$W/dpkg-purge.log"; fail "dpkg --purge remoteler-agent failed"; }
check "purge removes /etc/remoteler/agent.toml and the binary" test ! -e "$R/etc/remoteler/agent.toml" -a ! -e "$R/usr/bin/remoteler-agent"
check "purge keeps /var/lib/remoteler-agent (the node identity) and says so" \
  bash -c "test -f '$R/var/lib/remoteler-agent/node.key' && grep -q 'kept /var/lib/remoteler-agent' '$W/dpkg-purge.log'"
in_root dpkg --remove remoteler-proxy </dev/null >"$W/dpkg-remove.log" 2>&1 || { cat "$W/dpkg-remove.log"; fail "dpkg --remove remoteler-proxy failed"; }
check "remove (not purge) keeps /etc/remoteler/proxy.toml and the cluster" test -f "$R/etc/remoteler/proxy.toml" -a -f "$R/var/lib/remoteler/ca.key"

say "packages: all checks passed"
