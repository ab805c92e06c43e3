#!/bin/bash
# Start, stop or describe the content-filter daemons of mailproxy's system tests: SpamAssassin's
# spamd, ClamAV's clamd and p0f, each private to BASE/COMPONENT and on loopback only.
#
#   daemons.sh start COMPONENT BASE   configure and start it in the background, wait (bounded)
#                                     until it answers, print `export NAME=value` lines
#   daemons.sh stop COMPONENT BASE    stop it (quietly does nothing if it is not running)
#   daemons.sh env COMPONENT BASE     print the export lines again
#   daemons.sh log COMPONENT BASE     print its log
#
# COMPONENT is spamd, clamd or p0f. Inputs (environment): MAILPROXY_SPAMD_PORT (default 7830),
# MAILPROXY_CLAMD_PORT (default 3310), MAILPROXY_P0F_INTERFACE (default lo). Needs root (spamd
# drops to nobody; p0f captures packets). Nothing here uses DNS or the network.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
spamd_port=${MAILPROXY_SPAMD_PORT:-7830}
clamd_port=${MAILPROXY_CLAMD_PORT:-3310}
p0f_interface=${MAILPROXY_P0F_INTERFACE:-lo}
# Readiness and stop waits: tenths of a second.
START_WAIT=${MAILPROXY_DAEMON_START_WAIT:-300}
STOP_WAIT=50

usage() { echo "usage: $0 start|stop|env|log spamd|clamd|p0f BASE" >&2; exit 2; }
[ $# -eq 3 ] || usage
action=$1
component=$2
base=$3
case "$base" in /*) ;; *) base="$PWD/$base" ;; esac
dir="$base/$component"
log="$dir/$component.log"
pidfile="$dir/$component.pid"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running() { [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

fail() {
    echo "daemons.sh: $component: $*; its log:" >&2
    tail -n 40 "$log" >&2 2>/dev/null || true
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
        spamd)
            cat <<EOT
export MAILPROXY_SPAMD=tcp:host=127.0.0.1:port=$spamd_port
export MAILPROXY_SPAMD_SOCKET=$dir/spamd.sock
export MAILPROXY_SPAMD_LOG=$log
EOT
            ;;
        clamd)
            cat <<EOT
export MAILPROXY_CLAMD=unix:$dir/clamd.sock
export MAILPROXY_CLAMD_TCP=tcp:host=127.0.0.1:port=$clamd_port
export MAILPROXY_CLAMD_LOG=$log
EOT
            ;;
        p0f)
            cat <<EOT
export MAILPROXY_P0F_SOCKET=$dir/p0f.sock
export MAILPROXY_P0F_LOG=$log
EOT
            ;;
    esac
}

spamd_ping() {
    # What spamc -K sends; spamd answers "SPAMD/1.5 0 PONG".
    local reply=
    exec 3<>"/dev/tcp/127.0.0.1/$spamd_port" || return 1
    printf 'PING SPAMC/1.5\r\n\r\n' >&3
    IFS= read -r -t 5 reply <&3 || true
    exec 3<&-
    [ "${reply%$'\r'}" = "SPAMD/1.5 0 PONG" ]
}

clamd_ping() {
    # zPING over TCP answers "PONG\0"; the UNIX socket is created before the TCP one.
    local reply=
    [ -S "$dir/clamd.sock" ] || return 1
    exec 3<>"/dev/tcp/127.0.0.1/$clamd_port" || return 1
    printf 'zPING\0' >&3
    IFS= read -r -d '' -t 5 reply <&3 || true
    exec 3<&-
    [ "$reply" = PONG ]
}

start_spamd() {
    port_open "$spamd_port" && { echo "daemons.sh: 127.0.0.1:$spamd_port is taken" >&2; exit 1; }
    local site="$dir/site"
    mkdir -p "$site"
    # The .pre files load the plugins (without them every scan fails: "no loaded plugin
    # implements 'check_main'"); the rules themselves come from /usr/share/spamassassin.
    cp /etc/spamassassin/*.pre /etc/spamassassin/65_debian.cf "$site/"
    cp "$here/spamd-local.cf" "$site/local.cf"
    chmod -R a+rX "$dir"
    # -L local tests only, -x no per-user configuration, children run as nobody.
    spamd -L -x -u nobody -s stderr -m 2 --listen="127.0.0.1:$spamd_port" \
        --listen="$dir/spamd.sock" --socketmode=0666 --allowed-ips=127.0.0.1 \
        --siteconfigpath="$site" </dev/null >>"$log" 2>&1 &
    child=$!
    echo "$child" >"$pidfile"
    wait_until spamd_ping
}

start_clamd() {
    port_open "$clamd_port" && { echo "daemons.sh: 127.0.0.1:$clamd_port is taken" >&2; exit 1; }
    mkdir -p "$dir/db"
    cp "$here/eicar.ndb" "$dir/db/"
    sed -e "s|@DB_DIR@|$dir/db|g" -e "s|@SOCKET@|$dir/clamd.sock|g" -e "s|@PORT@|$clamd_port|g" \
        "$here/clamd.conf.in" >"$dir/clamd.conf"
    clamd -c "$dir/clamd.conf" </dev/null >>"$log" 2>&1 &
    child=$!
    echo "$child" >"$pidfile"
    wait_until clamd_ping
}

start_p0f() {
    # No -d: it stays our child, so that a failure to capture is seen at once.
    p0f -i "$p0f_interface" -s "$dir/p0f.sock" -o "$dir/p0f-signatures.log" \
        </dev/null >>"$log" 2>&1 &
    child=$!
    echo "$child" >"$pidfile"
    wait_until test -S "$dir/p0f.sock"
}

start() {
    running && { echo "daemons.sh: $component already runs (pid $(cat "$pidfile"))" >&2; exit 1; }
    rm -rf "$dir"
    mkdir -p "$dir"
    : >"$log"
    "start_$component"
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

case "$component" in spamd | clamd | p0f) ;; *) usage ;; esac
case "$action" in
    start) start ;;
    stop) stop_it ;;
    env) print_env ;;
    log) cat "$log" 2>/dev/null || true ;;
    *) usage ;;
esac
