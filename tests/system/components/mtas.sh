#!/bin/bash
# Exim 4.96 and OpenSMTPD 6.8 for mailproxy's system tests, unpacked next to Postfix (their
# packages conflict with it, so they are never installed: `apt-get download` and `dpkg -x`).
# Each runs in its own mount namespace (unshare -m) where copies of /etc/passwd and /etc/group
# that know their users are bind-mounted; the machine's /etc is left alone. Loopback only.
#
#   mtas.sh unpack BASE              download the .debs (once, into BASE/debs) and unpack them
#                                    into BASE/root/{exim,opensmtpd}; write the user copies
#   mtas.sh start COMPONENT BASE     configure and start it in the background, wait (bounded)
#                                    until it greets, print `export NAME=value` lines
#   mtas.sh stop COMPONENT BASE      stop it (quietly does nothing if it is not running)
#   mtas.sh env COMPONENT BASE       print the export lines again
#   mtas.sh log COMPONENT BASE       print its logs
#   mtas.sh send BASE PORT FROM TO   Exim as an SMTP client: read a message on stdin and
#                                    deliver it at once (-odi) to 127.0.0.1:PORT; prints
#                                    Exim's SMTP dialogue (-v) on stderr, then its mainlog
#                                    on stdout
#
# COMPONENT is exim (an MTA with Exim's defaults, PIPELINING, smtp_accept_max_nonmail = 10),
# exim-prdr (the same with prdr_enable = true) or opensmtpd (no PIPELINING).
# Inputs (environment): MAILPROXY_EXIM_PORT (default 10026), MAILPROXY_EXIM_PRDR_PORT (10027),
# MAILPROXY_OPENSMTPD_PORT (10028). Needs root (mount namespaces, chown). BASE must be
# reachable by the MTAs' users (so not under /root).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Readiness and stop waits: tenths of a second.
START_WAIT=${MAILPROXY_MTA_START_WAIT:-200}
STOP_WAIT=50
EXIM_DEBS=(exim4-daemon-light)
OPENSMTPD_DEBS=(opensmtpd)
EXIM_DOMAIN=exim.test
OPENSMTPD_DOMAIN=smtpd.test

usage() {
    echo "usage: $0 unpack BASE | start|stop|env|log exim|exim-prdr|opensmtpd BASE" \
        "| send BASE PORT FROM TO [chunking]" >&2
    exit 2
}

absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# greets PORT: the server on 127.0.0.1:PORT sends a 220 banner.
greets() {
    local line=
    exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
    IFS= read -r -t 5 line <&3 || true
    printf 'QUIT\r\n' >&3 2>/dev/null || true
    exec 3<&-
    case "$line" in 220*) return 0 ;; *) return 1 ;; esac
}

# -- unpacking --------------------------------------------------------------------------------

# free_id FILE FROM: the first numeric id from FROM up that FILE (passwd or group) does not use.
free_id() {
    local id=$2
    while cut -d: -f3 "$1" | grep -qx "$id"; do id=$((id + 1)); done
    echo "$id"
}

# add_user NAME FROM: NAME in BASE/etc/{passwd,group} (with its own group), unless it is there.
add_user() {
    local name=$1 uid gid
    grep -q "^$name:" "$etc/passwd" && return 0
    gid=$(grep "^$name:" "$etc/group" | cut -d: -f3 || true)
    if [ -z "$gid" ]; then
        gid=$(free_id "$etc/group" "$2")
        echo "$name:x:$gid:" >>"$etc/group"
    fi
    uid=$(free_id "$etc/passwd" "$2")
    echo "$name:x:$uid:$gid::/nonexistent:/usr/sbin/nologin" >>"$etc/passwd"
}

unpack_debs() {
    local root=$1 pkg deb
    shift
    [ -d "$root/usr/sbin" ] && return 0
    mkdir -p "$base/debs" "$root.new"
    # apt downloads as _apt: let it write there (else it warns, and downloads as root).
    chmod 755 "$base"
    id _apt >/dev/null 2>&1 && chown _apt "$base/debs"
    for pkg in "$@"; do
        if ! compgen -G "$base/debs/${pkg}_*.deb" >/dev/null; then
            (cd "$base/debs" && timeout 300 apt-get download -q "$pkg") || {
                echo "mtas.sh: apt-get download $pkg failed (run apt-get update?)" >&2
                return 1
            }
        fi
        for deb in "$base/debs/${pkg}"_*.deb; do dpkg -x "$deb" "$root.new"; done
    done
    mv "$root.new" "$root"
}

unpack() {
    mkdir -p "$base/root" "$etc"
    unpack_debs "$base/root/exim" "${EXIM_DEBS[@]}"
    unpack_debs "$base/root/opensmtpd" "${OPENSMTPD_DEBS[@]}"
    # The libraries the binaries link against must be installed (.ci/run installs them).
    local missing
    missing=$(ldd "$base/root/exim/usr/sbin/exim4" "$base/root/opensmtpd/usr/sbin/smtpd" |
        grep 'not found' || true)
    if [ -n "$missing" ]; then
        echo "mtas.sh: missing libraries (apt-get install them):" >&2
        echo "$missing" >&2
        return 1
    fi
    # Exim's built-in user and OpenSMTPD's two, in copies of the machine's files.
    cp /etc/passwd "$etc/passwd"
    cp /etc/group "$etc/group"
    add_user Debian-exim 190
    add_user opensmtpd 191
    add_user opensmtpq 191
    chmod 644 "$etc/passwd" "$etc/group"
    chmod 755 "$base/root" "$etc"
}

# in_namespace CMD...: exec CMD in a new mount namespace with the user copies in /etc (and,
# for OpenSMTPD, its unpacked /usr/libexec and /var/lib, and empty /var/spool and /run).
in_namespace() {
    local mounts="mount --bind '$etc/passwd' /etc/passwd && mount --bind '$etc/group' /etc/group"
    if [ "$component" = opensmtpd ]; then
        local r=$base/root/opensmtpd
        mounts="$mounts && mount --bind '$r/usr/libexec' /usr/libexec"
        mounts="$mounts && mount --bind '$r/var/lib' /var/lib"
        mounts="$mounts && mount --bind '$dir/var-spool' /var/spool && mount --bind '$dir/run' /run"
    fi
    # No fork: the daemon keeps the pid of this process, so that it can be signalled.
    exec unshare -m --propagation private sh -c "$mounts && exec \"\$0\" \"\$@\"" "$@"
}

# owner NAME: NAME's uid:gid in the user copies (chown knows only the machine's names).
owner() { grep "^$1:" "$etc/passwd" | cut -d: -f3,4; }

# reachable NAME PATH: NAME (a user of the copies) can write PATH, a directory.
reachable() {
    local ids
    ids=$(owner "$1")
    if ! setpriv --reuid="${ids%:*}" --regid="${ids#*:}" --clear-groups test -w "$2" 2>/dev/null; then
        echo "mtas.sh: $1 cannot reach $2: use a BASE whose parents let others in (under /tmp)" >&2
        return 1
    fi
}

# -- Exim -------------------------------------------------------------------------------------

exim_binary() { echo "$base/root/exim/usr/sbin/exim4"; }

# exim_config TEMPLATE OUT: fill in the placeholders of an Exim configuration template.
exim_config() {
    sed -e "s|@EXIM@|$(exim_binary)|g" -e "s|@DIR@|$dir|g" -e "s|@PORT@|${port:-0}|g" \
        -e "s|@DOMAIN@|$EXIM_DOMAIN|g" -e "s|@PRDR@|${prdr:-false}|g" "$1" >"$2"
}

start_exim() {
    local prdr=false
    [ "$component" = exim-prdr ] && prdr=true
    mkdir -p "$dir/spool" "$dir/log" "$dir/Maildir"/{new,cur,tmp}
    exim_config "$here/exim.conf.in" "$dir/exim.conf"
    chown -R "$(owner Debian-exim)" "$dir/spool" "$dir/log" "$dir/Maildir"
    reachable Debian-exim "$dir/Maildir" || fail "BASE not reachable"
    # Validate first: a bad configuration says why on stderr, not in a log.
    (in_namespace "$(exim_binary)" -C "$dir/exim.conf" -bV) >>"$log" 2>&1 ||
        fail "exim -bV failed"
    # -bdf: the daemon in the foreground (our child); -q1m: a queue runner now and then.
    (in_namespace "$(exim_binary)" -C "$dir/exim.conf" -bdf -q1m) </dev/null >>"$log" 2>&1 &
    child=$!
    echo "$child" >"$pidfile"
    wait_until greets "$port"
}

# send PORT FROM TO: Exim as the client, delivering the message on stdin to 127.0.0.1:PORT.
# Each run has a spool of its own, so that no retry hint of an earlier run holds it back.
send() {
    [ -x "$(exim_binary)" ] || { echo "mtas.sh: run '$0 unpack $base' first" >&2; exit 1; }
    mkdir -p "$base/exim-client"
    chmod 755 "$base/exim-client"
    dir=$(mktemp -d "$base/exim-client/$port.XXXXXX")
    chmod 755 "$dir"
    mkdir -p "$dir/spool" "$dir/log"
    chown -R "$(owner Debian-exim)" "$dir/spool" "$dir/log"
    reachable Debian-exim "$dir/spool" || exit 1
    exim_config "$here/exim-client.conf.in" "$dir/exim.conf"
    if [ "$chunking" = chunking ]; then  # BDAT, when the server offers CHUNKING
        sed -i 's/^  hosts_try_chunking =$/  hosts_try_chunking = */' "$dir/exim.conf"
    fi
    # -odi: deliver before returning (the exit status is 0 even when the delivery is deferred:
    # the mainlog tells); -v: the SMTP dialogue on stderr; -f: the envelope sender.
    local status=0
    (in_namespace "$(exim_binary)" -C "$dir/exim.conf" -odi -v -f "$from" -- "$to") || status=$?
    cat "$dir/log/mainlog" 2>/dev/null || true
    return "$status"
}

# -- OpenSMTPD --------------------------------------------------------------------------------

start_opensmtpd() {
    local smtpd=$base/root/opensmtpd/usr/sbin/smtpd
    mkdir -p "$dir/Maildir"/{new,cur,tmp} "$dir/var-spool" "$dir/run"
    echo "alice@$OPENSMTPD_DOMAIN nobody" >"$dir/vusers"
    echo "alice@$OPENSMTPD_DOMAIN" >"$dir/rcpts"
    sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@DOMAIN@|$OPENSMTPD_DOMAIN|g" \
        "$here/smtpd.conf.in" >"$dir/smtpd.conf"
    chown -R nobody: "$dir/Maildir"
    chmod 755 "$dir"
    reachable nobody "$dir/Maildir" || fail "BASE not reachable"
    (in_namespace "$smtpd" -n -f "$dir/smtpd.conf") >>"$log" 2>&1 || fail "smtpd -n failed"
    # -d: in the foreground, logging to stderr.
    (in_namespace "$smtpd" -d -f "$dir/smtpd.conf") </dev/null >>"$log" 2>&1 &
    child=$!
    echo "$child" >"$pidfile"
    wait_until greets "$port"
}

# -- the daemons' life ------------------------------------------------------------------------

running() { [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

fail() {
    echo "mtas.sh: $component: $*; its log:" >&2
    tail -n 40 "$log" >&2 2>/dev/null || true
    [ -f "$dir/log/paniclog" ] && tail -n 20 "$dir/log/paniclog" >&2
    stop_it
    exit 1
}

# wait_until CMD...: run CMD every 0.1 s until it succeeds, at most START_WAIT times, while
# the daemon (our background child, pid in $child) is alive.
wait_until() {
    local i
    for i in $(seq 1 "$START_WAIT"); do
        "$@" >/dev/null 2>&1 && return 0
        kill -0 "$child" 2>/dev/null || fail "exited while starting"
        sleep 0.1
    done
    fail "not ready within $((START_WAIT / 10)) s"
}

print_env() {
    case "$component" in
        exim)
            cat <<EOT
export MAILPROXY_EXIM_PORT=$port
export MAILPROXY_EXIM_DOMAIN=$EXIM_DOMAIN
export MAILPROXY_EXIM_MAILDIR=$dir/Maildir
export MAILPROXY_EXIM_LOG=$dir/log/mainlog
export MAILPROXY_MTAS=$here/mtas.sh
export MAILPROXY_MTAS_BASE=$base
EOT
            ;;
        exim-prdr)
            cat <<EOT
export MAILPROXY_EXIM_PRDR_PORT=$port
export MAILPROXY_EXIM_PRDR_DOMAIN=$EXIM_DOMAIN
export MAILPROXY_EXIM_PRDR_MAILDIR=$dir/Maildir
export MAILPROXY_EXIM_PRDR_LOG=$dir/log/mainlog
EOT
            ;;
        opensmtpd)
            cat <<EOT
export MAILPROXY_OPENSMTPD_PORT=$port
export MAILPROXY_OPENSMTPD_DOMAIN=$OPENSMTPD_DOMAIN
export MAILPROXY_OPENSMTPD_MAILDIR=$dir/Maildir
export MAILPROXY_OPENSMTPD_LOG=$log
EOT
            ;;
    esac
}

start() {
    case "$port" in '' | *[!0-9]*) echo "mtas.sh: bad port '$port'" >&2; exit 2 ;; esac
    running && { echo "mtas.sh: $component already runs (pid $(cat "$pidfile"))" >&2; exit 1; }
    port_open "$port" && { echo "mtas.sh: 127.0.0.1:$port is taken" >&2; exit 1; }
    [ -s "$etc/passwd" ] || { echo "mtas.sh: run '$0 unpack $base' first" >&2; exit 1; }
    rm -rf "$dir"
    mkdir -p "$dir"
    chmod 755 "$base" "$dir"
    : >"$log"
    case "$component" in
        exim | exim-prdr) start_exim ;;
        opensmtpd) start_opensmtpd ;;
    esac
    print_env
}

stop_it() {
    [ -s "$pidfile" ] || return 0
    local pid i
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    for i in $(seq 1 "$STOP_WAIT"); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

show_log() {
    local f
    for f in "$log" "$dir"/log/mainlog "$dir"/log/rejectlog "$dir"/log/paniclog; do
        [ -s "$f" ] || continue
        echo "--- $f"
        cat "$f"
    done
}

[ $# -ge 2 ] || usage
action=$1
case "$action" in
    unpack)
        [ $# -eq 2 ] || usage
        base=$(absolute "$2")
        etc=$base/etc
        component=
        unpack
        exit 0
        ;;
    send)
        [ $# -eq 5 ] || [ $# -eq 6 ] || usage
        base=$(absolute "$2")
        etc=$base/etc
        component=exim-client
        port=$3
        from=$4
        to=$5
        chunking=${6:-}
        send
        exit 0
        ;;
esac
[ $# -eq 3 ] || usage
component=$2
base=$(absolute "$3")
etc=$base/etc
dir=$base/$component
log=$dir/$component.log
pidfile=$base/$component.pid
case "$component" in
    exim) port=${MAILPROXY_EXIM_PORT:-10026} ;;
    exim-prdr) port=${MAILPROXY_EXIM_PRDR_PORT:-10027} ;;
    opensmtpd) port=${MAILPROXY_OPENSMTPD_PORT:-10028} ;;
    *) usage ;;
esac
case "$action" in
    start) start ;;
    stop) stop_it ;;
    env) print_env ;;
    log) show_log ;;
    *) usage ;;
esac
