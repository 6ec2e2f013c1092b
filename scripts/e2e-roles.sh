#!/usr/bin/env bash
# End-to-end for roles and SSH certificates: the real binaries, Debian's sshd and the real
# OpenSSH client, all on loopback (no namespaces).
#   node-a  sshd + agent (tunnel), label env=dev
#   node-b  sshd listed in the proxy's config (dialled directly), label env=prod
# Both sshds trust only the cluster's SSH user CA (TrustedUserCAKeys) and have NO
# authorized_keys: a user gets in only with the certificate `remoteler login` obtained.
#   role dev: every node but env=prod, logins {{user.logins}}       -> alice (--logins root)
#   role ops: nodes with an env label but not node-a, login root, certificates of 1h at most
#                                                                    -> bob
# Checks: alice reaches node-a as root with `remoteler ssh` and with plain ssh through
# `remoteler config`; another login is refused by sshd itself; node-b is refused by the proxy
# with a reason naming the deny rule; bob the other way round; `ls` lists only what a user
# may reach; a role the config does not define is refused by `users add --config`; the audit
# log has the records and `remoteler-proxy audit` reads them.
source "$(dirname "$0")/lib.sh"
trap cleanup EXIT
ensure_packages
build

P="$BIN/remoteler-proxy"; A="$BIN/remoteler-agent"; C="$BIN/remoteler"
check() { local what=$1; shift; "$@" || fail "$what"; echo "ok - $what"; }
contains() { grep -q -- "$2" <<<"$1" || { echo "--- got:"; echo "$1"; fail "expected to find: $2"; }; }
lacks() { ! grep -q -- "$2" <<<"$1" || { echo "--- got:"; echo "$1"; fail "expected NOT to find: $2"; }; }

# start_ca_sshd NODE PORT: a real sshd that trusts the cluster's SSH user CA and nothing else.
start_ca_sshd() {
  local node=$1 port=$2
  local dir="$WORK/$node"
  mkdir -p "$dir"
  ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
  cat >"$dir/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_key
HostCertificate $dir/host_key-cert.pub
PidFile $dir/sshd.pid
TrustedUserCAKeys $WORK/user_ca.pub
AuthorizedKeysFile none
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
SetEnv NODE_NAME=$node
LogLevel VERBOSE
EOF
  echo "$port" >"$dir/listen"
  /usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log"
}

say "cluster with roles; sshds that trust only the SSH user CA"
"$P" init --cluster roles.test --data-dir "$WORK/proxy" --host 127.0.0.1 >"$WORK/init.txt"
PIN=$(grep -o 'sha256:[0-9a-f]\{64\}' "$WORK/init.txt" | head -1)
[ -n "$PIN" ] || fail "init printed no CA pin"
check "init created the SSH user CA with mode 0600" \
  test "$(stat -c %a "$WORK/proxy/ssh_user_ca.key")" = 600
"$P" export ssh-user-ca --data-dir "$WORK/proxy" >"$WORK/user_ca.pub"
check "export ssh-user-ca prints an ssh-ed25519 line" \
  grep -Eq '^ssh-ed25519 AAAA[^ ]+ remoteler-user-ca@roles.test$' "$WORK/user_ca.pub"
USERS_PORT=$(free_port); TUNNEL_PORT=$(free_port); AUTH_PORT=$(free_port)
SSH_A=$(free_port); SSH_B=$(free_port)
start_ca_sshd node-a "$SSH_A"
start_ca_sshd node-b "$SSH_B"
cat >"$WORK/proxy.toml" <<EOF
cluster_name = "roles.test"
data_dir = "$WORK/proxy"
[listen]
users = "127.0.0.1:$USERS_PORT"
tunnels = "127.0.0.1:$TUNNEL_PORT"
auth = "127.0.0.1:$AUTH_PORT"
metrics = "off"
[[nodes]]
name = "node-b"
address = "127.0.0.1:$SSH_B"
labels = { env = "prod" }
[[roles]]
name = "dev"
logins = ["{{user.logins}}"]
allow = { nodes = ["*"] }
deny = { labels = { env = "prod" } }
[[roles]]
name = "ops"
logins = ["root"]
max_cert_ttl = "1h"
allow = { labels = { env = "*" } }
deny = { nodes = ["node-a"] }
EOF
bg proxy "$P" start --config "$WORK/proxy.toml" >/dev/null
wait_for "the proxy to listen" 30 test -f "$WORK/proxy/proxy.ready"
TOKEN=$("$P" tokens add --kind node --ttl 15m --data-dir "$WORK/proxy" | grep -o '[0-9a-f]\{64\}' | head -1)
bg agent-a "$A" start --proxy "127.0.0.1:$TUNNEL_PORT" --token "$TOKEN" --ca-pin "$PIN" \
  --node-name node-a --data-dir "$WORK/agent-a" --label env=dev --forward "ssh=127.0.0.1:$SSH_A" \
  $(host_cert_flags node-a) >/dev/null
wait_for "node-a online via tunnel" 30 bash -c "'$P' nodes ls --data-dir '$WORK/proxy' | grep -Eq '^node-a +tunnel +yes'"
# Host certificates: node-a's agent asks for its own; node-b is static, the operator signs it.
sshd_cert_from_agent node-a
sshd_cert_static node-b "$WORK/proxy"

say "users: roles are checked against the configuration"
echo "roles-e2e-password" >"$WORK/pw"
OUT=$("$P" users add carol --roles intern --password-file "$WORK/pw" --config "$WORK/proxy.toml" 2>&1 || true)
contains "$OUT" "intern not defined in"
contains "$OUT" "access, dev, ops"
echo "ok - users add --config refuses a role the configuration does not define"
"$P" users add alice --roles dev --logins root --password-file "$WORK/pw" --config "$WORK/proxy.toml"
"$P" users add bob --roles ops --password-file "$WORK/pw" --config "$WORK/proxy.toml"
OUT=$("$P" users add carol --roles intern --password-file "$WORK/pw" --data-dir "$WORK/proxy" 2>&1)
contains "$OUT" "warning: role \"intern\""
echo "ok - without --config an unknown role is accepted with a warning"

# as USER COMMAND...: run the client with USER's own home directory.
as() { local user=$1; shift; REMOTELER_HOME="$WORK/home-$user" "$@"; }
login() {
  as "$1" "$C" login --proxy "127.0.0.1:$USERS_PORT" --user "$1" --password-file "$WORK/pw" --ca-pin "$PIN" "${@:2}"
}
# Host keys are verified against the cluster's host CA: the known_hosts that `remoteler login`
# wrote (`remoteler ssh` and the generated ssh_config name it themselves).
SSHOPTS=(-o BatchMode=yes)

say "alice (role dev, login root): the SSH certificate"
login alice
CERT="$WORK/home-alice/ssh_key-cert.pub"
check "login stored the SSH key with mode 0600" test "$(stat -c %a "$WORK/home-alice/ssh_key")" = 600
L=$(ssh-keygen -L -f "$CERT")
contains "$L" "Type: ssh-ed25519-cert-v01@openssh.com user certificate"
contains "$L" 'Key ID: "alice"'
contains "$L" "Signing CA: ED25519 $(ssh-keygen -lf "$WORK/user_ca.pub" | cut -d' ' -f2)"
PRINCIPALS=$(sed -n '/Principals:/,/Critical Options:/p' <<<"$L" | sed '1d;$d' | tr -d ' ')
check "the certificate's only principal is root (ssh-keygen -L)" test "$PRINCIPALS" = root
contains "$L" "permit-pty"
echo "ok - ssh-keygen -L reads a user certificate for alice, signed by the cluster's SSH user CA"
STATUS=$(as alice "$C" status)
contains "$STATUS" "ssh:     certificate for root"
FIRST_KEY=$(cat "$WORK/home-alice/ssh_key.pub")
login alice >/dev/null
check "the SSH key pair is made once and reused at the next login" \
  test "$(cat "$WORK/home-alice/ssh_key.pub")" = "$FIRST_KEY"

say "alice: in with plain ssh, as root only, never on node-b"
LS=$(as alice "$C" ls)
contains "$LS" "node-a"; lacks "$LS" "node-b"
echo "ok - alice's ls lists node-a and not node-b (denied by label env=prod)"
check "remoteler ssh root@node-a (certificate, no authorized_keys)" \
  test "$(as alice "$C" ssh "${SSHOPTS[@]}" root@node-a 'echo $NODE_NAME')" = node-a
as alice "$C" config >"$WORK/ssh_config-alice"
contains "$(cat "$WORK/ssh_config-alice")" "CertificateFile \"$CERT\""
contains "$(cat "$WORK/ssh_config-alice")" "IdentitiesOnly yes"
check "plain ssh node-a through the ssh_config of remoteler config" \
  test "$(ssh -F "$WORK/ssh_config-alice" "${SSHOPTS[@]}" -l root node-a 'echo $NODE_NAME')" = node-a
# A ProxyCommand that does not tell the proxy the login (no %r) is refused before any sshd.
OUT=$(ssh "${SSHOPTS[@]}" -o IdentitiesOnly=yes -i "$WORK/home-alice/ssh_key" \
  -o CertificateFile="$CERT" -o HostKeyAlias=node-a.roles.test \
  -o UserKnownHostsFile="$WORK/home-alice/known_hosts" -o StrictHostKeyChecking=yes \
  -o ProxyCommand="env REMOTELER_HOME=$WORK/home-alice $C proxy ssh %h:%p" daemon@node-a true 2>&1 || true)
contains "$OUT" "ssh user@node-a"
echo "ok - a ProxyCommand without the login (%r) is refused, naming ssh user@node-a"
# One that tells the proxy another login than ssh uses: sshd refuses the certificate itself.
OUT=$(ssh "${SSHOPTS[@]}" -o IdentitiesOnly=yes -i "$WORK/home-alice/ssh_key" \
  -o CertificateFile="$CERT" -o HostKeyAlias=node-a.roles.test \
  -o UserKnownHostsFile="$WORK/home-alice/known_hosts" -o StrictHostKeyChecking=yes \
  -o ProxyCommand="env REMOTELER_HOME=$WORK/home-alice $C proxy ssh root@%h:%p" daemon@node-a true 2>&1 || true)
contains "$OUT" "Permission denied"
check "sshd itself says the login is not a principal of the certificate" \
  grep -q "name is not a listed principal" "$WORK/node-a/sshd.log"
OUT=$(as alice "$C" ssh "${SSHOPTS[@]}" daemon@node-a true 2>&1 || true)
contains "$OUT" "may reach node node-a but not as login \"daemon\""
echo "ok - told the login, the proxy refuses daemon@node-a before sshd sees it"
OUT=$(as alice "$C" ssh "${SSHOPTS[@]}" root@node-b true 2>&1 || true)
contains "$OUT" "access denied: role dev of user alice denies node node-b (labels match env=prod)"
echo "ok - the proxy refuses node-b to alice, naming the role and the deny rule"

say "bob (role ops): node-b as root, never node-a; certificates of 1h at most"
login bob --ttl 12h
EXP=$(python3 -c 'import json,sys,time; print(json.load(open(sys.argv[1]))["expires_unix"] - int(time.time()))' "$WORK/home-bob/profile.json")
check "max_cert_ttl = 1h caps the 12h asked for (${EXP}s left)" test "$EXP" -le 3600
TO=$(TZ=UTC ssh-keygen -L -f "$WORK/home-bob/ssh_key-cert.pub" | sed -n 's/.*Valid: from .* to \(.*\)$/\1/p')
LEFT=$(( $(date -u -d "$TO" +%s) - $(date +%s) ))
check "the SSH certificate has the same 1h cap (${LEFT}s left)" test "$LEFT" -le 3600 -a "$LEFT" -gt 3000
LS=$(as bob "$C" ls)
contains "$LS" "node-b"; lacks "$LS" "node-a"
echo "ok - bob's ls lists node-b and not node-a"
check "remoteler ssh root@node-b (direct node, certificate)" \
  test "$(as bob "$C" ssh "${SSHOPTS[@]}" root@node-b 'echo $NODE_NAME')" = node-b
OUT=$(as bob "$C" ssh "${SSHOPTS[@]}" root@node-a true 2>&1 || true)
contains "$OUT" "role ops of user bob denies node node-a (node name matches \"node-a\")"
echo "ok - the proxy refuses node-a to bob, naming the deny rule on the node name"

say "carol (an undefined role): nothing"
OUT=$(login carol 2>&1)
contains "$OUT" "no SSH certificate"
check "carol got no SSH certificate" test ! -e "$WORK/home-carol/ssh_key-cert.pub"
check "carol's ls lists nothing" test "$(as carol "$C" ls | wc -l)" -le 1
OUT=$(as carol "$C" ssh "${SSHOPTS[@]}" root@node-a true 2>&1 || true)
contains "$OUT" "user carol may not reach node node-a: the user's roles (intern) are not defined"
echo "ok - carol is refused with the reason"

say "audit"
LOG="$WORK/proxy/audit.log"
check "session.start records carry the roles" grep -q '"event":"session.start".*"roles":\["dev"\]' "$LOG"
check "access.denied records carry the roles and the reason" \
  grep -q '"event":"access.denied".*"reason":"access denied: role ops of user bob denies node node-a' "$LOG"
grep '"event":"access.denied"' "$LOG" | grep -q '"roles":\["ops"\]' || fail "access.denied without roles"
check "login records carry the SSH logins" grep -q '"event":"login".*"ssh_logins":\["root"\]' "$LOG"
OUT=$("$P" audit --config "$WORK/proxy.toml" --event access.denied --user bob)
contains "$OUT" "access.denied"; contains "$OUT" "node-a"; lacks "$OUT" "alice"
echo "ok - remoteler-proxy audit --event --user shows bob's denial only"
OUT=$("$P" audit --config "$WORK/proxy.toml" --since 1h --event session.start --json)
python3 -c 'import json,sys
lines=[json.loads(l) for l in sys.stdin if l.strip()]
assert lines and all(r["event"]=="session.start" for r in lines), lines' <<<"$OUT" || fail "--json lines"
echo "ok - --json prints the raw records, one JSON object per line"
OUT=$("$P" audit --config "$WORK/proxy.toml" --since 2000-01-01T00:00:00Z --user nobody)
check "--since RFC 3339 and an unknown user give an empty table" test "$(wc -l <<<"$OUT")" -eq 1
echo 'not json {' >>"$LOG"
N=$(wc -l <"$LOG")
OUT=$("$P" audit --config "$WORK/proxy.toml" 2>&1 >/dev/null)
contains "$OUT" "warning: $LOG:$N: skipped"
check "a corrupt line is skipped with a warning, the rest still read" \
  bash -c "'$P' audit --config '$WORK/proxy.toml' 2>/dev/null | grep -q session.start"

say "end-to-end roles and SSH certificates: all checks passed"
