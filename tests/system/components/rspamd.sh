#!/bin/bash
# Start, stop or describe Debian's rspamd for mailproxy's system tests: its default rules
# (/etc/rspamd), its normal worker alone on 127.0.0.1, everything it writes under BASE/rspamd,
# and nothing fetched from the network.
#
#   rspamd.sh start BASE   configure and start it in the background, wait (bounded) until
#                          GET /ping answers "pong", print `export NAME=value` lines
#   rspamd.sh stop BASE    stop it (quietly does nothing if it is not running)
#   rspamd.sh env BASE     print the export lines again
#   rspamd.sh log BASE     print its log
#
# Inputs (environment): MAILPROXY_RSPAMD_PORT (default 11333, rspamd's own), and
# MAILPROXY_RSPAMD_DNS_PORT (default 10353): rspamd asks only 127.0.0.1 on that port, where
# the system tests serve their own zone (with nothing there its lookups time out, fast).
#
# Offline: the modules that fetch maps or rules over HTTPS at start (maps.rspamd.com,
# updates.rspamd.com, openphish.com), or ask public DNS lists, are disabled in local.d;
# rspamd's own rules (GTUBE among them), SPF, DKIM, DMARC, ARC, hfilter stay. No Redis: the
# modules that need it (bayes, greylist, ratelimit, ...) log "cannot init redis" and are off.
# The compiled rules (BASE/rspamd/db) are kept across stop and start: a restart takes 0.5 s,
# the first start 8 s or more. Needs root (rspamd drops to _rspamd, which must be able to reach
# BASE/rspamd: every directory above it searchable by others, as .ci/run's work directory is).
set -euo pipefail

port=${MAILPROXY_RSPAMD_PORT:-11333}
dns_port=${MAILPROXY_RSPAMD_DNS_PORT:-10353}
# Readiness and stop waits: tenths of a second. A first start compiles the rules (hyperscan):
# about 8 s on an idle machine, 33 s seen on a loaded one.
START_WAIT=${MAILPROXY_RSPAMD_START_WAIT:-1200}
STOP_WAIT=100

usage() { echo "usage: $0 start|stop|env|log BASE" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
base=$2
case "$base" in /*) ;; *) base="$PWD/$base" ;; esac
dir="$base/rspamd"
log="$dir/rspamd.log"
pidfile="$dir/rspamd.pid"

# What fetches from the network at start or per message, in Debian 12's rspamd 3.4 defaults.
OFFLINE_MODULES=(fuzzy_check rbl surbl rspamd_update asn multimap whitelist phishing
    mime_types mid url_redirector emails)

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running() { [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

ping_rspamd() {
    local reply
    reply=$(exec 2>/dev/null 3<>"/dev/tcp/127.0.0.1/$port" &&
        printf 'GET /ping HTTP/1.0\r\n\r\n' >&3 && timeout 5 cat <&3) || return 1
    case "$reply" in *pong*) return 0 ;; *) return 1 ;; esac
}

fail() {
    echo "rspamd.sh: $*; its log:" >&2
    tail -n 40 "$log" >&2 2>/dev/null || true
    stop_it
    exit 1
}

print_env() {
    cat <<EOT
export MAILPROXY_RSPAMD=tcp:host=127.0.0.1:port=$port
export MAILPROXY_RSPAMD_PORT=$port
export MAILPROXY_RSPAMD_DNS_PORT=$dns_port
export MAILPROXY_RSPAMD_BASE=$base
export MAILPROXY_RSPAMD_LOG=$log
EOT
}

configure() {
    mkdir -p "$dir/local.d" "$dir/run" "$dir/db"
    cat >"$dir/rspamd.conf" <<EOT
# Debian's rules and modules (\$CONFDIR = /etc/rspamd); the workers and logging are ours.
.include "\$CONFDIR/common.conf"
options {
    .include "\$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "\$LOCAL_CONFDIR/local.d/options.inc"
}
logging {
    type = "console";
    level = "notice";
}
worker "normal" {
    bind_socket = "127.0.0.1:$port";
    .include "\$CONFDIR/worker-normal.inc"
    count = 1;
}
EOT
    cat >"$dir/local.d/options.inc" <<EOT
# Only the tests' own DNS server, on loopback; no public resolver.
dns {
    nameserver = ["127.0.0.1:$dns_port"];
    timeout = 0.5s;
    retransmits = 1;
}
EOT
    local module
    for module in "${OFFLINE_MODULES[@]}"; do
        echo "enabled = false;" >"$dir/local.d/$module.conf"
    done
    # The headers rspamd asks its MTA to add (milter.add_headers in /checkv2's answer), for
    # the tests' clients too (127.0.0.1: by default it adds nothing for local ones).
    # Not "authentication-results": mailproxy writes that one.
    cat >"$dir/local.d/milter_headers.conf" <<EOT
use = ["x-spamd-result", "x-rspamd-server"];
skip_local = false;
skip_authenticated = false;
EOT
    chown -R _rspamd:_rspamd "$dir/db" "$dir/run"
    chmod -R a+rX "$dir"
}

start() {
    running && { echo "rspamd.sh: rspamd already runs (pid $(cat "$pidfile"))" >&2; exit 1; }
    port_open "$port" && { echo "rspamd.sh: 127.0.0.1:$port is taken" >&2; exit 1; }
    mkdir -p "$dir"
    : >"$log"
    configure
    # -f: in the foreground, our child (it writes no pid file then: we keep its pid).
    rspamd -f -u _rspamd -g _rspamd -c "$dir/rspamd.conf" --var=LOCAL_CONFDIR="$dir" \
        --var=DBDIR="$dir/db" --var=RUNDIR="$dir/run" --var=LOGDIR="$dir" \
        </dev/null >>"$log" 2>&1 &
    child=$!
    echo "$child" >"$pidfile"
    local i
    for i in $(seq 1 "$START_WAIT"); do
        ping_rspamd && { print_env; return 0; }
        kill -0 "$child" 2>/dev/null || fail "exited while starting"
        sleep 0.1
    done
    fail "not ready within $((START_WAIT / 10)) s"
}

stop_it() {
    [ -s "$pidfile" ] || return 0
    local pid i
    pid=$(cat "$pidfile")
    # SIGTERM to the main process: it stops its workers and exits.
    kill -TERM "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    for i in $(seq 1 "$STOP_WAIT"); do
        if ! kill -0 "$pid" 2>/dev/null && ! port_open "$port"; then
            rm -f "$pidfile"
            return 0
        fi
        sleep 0.1
    done
    # Its workers first (children of that pid only), then the main process.
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

case "$action" in
    start) start ;;
    stop) stop_it ;;
    env) print_env ;;
    log) cat "$log" 2>/dev/null || true ;;
    *) usage ;;
esac
