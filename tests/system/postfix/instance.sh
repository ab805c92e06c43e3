#!/bin/bash
# Start, stop or describe a private Postfix instance for mailproxy's system tests.
#
#   instance.sh start BASE   create BASE/{etc,queue,data,mail,log}, start Postfix, wait for
#                            its SMTP port, and print `export NAME=value` lines for the tests
#   instance.sh stop BASE    stop it (quietly does nothing if it is not running)
#   instance.sh env BASE     print the export lines again
#
# Inputs (environment): MAILPROXY_POSTFIX_PORT (default 10025), MAILPROXY_POSTFIX_DOMAIN
# (default test.example). BASE must be reachable by uid 65534 (so not under /root): the
# virtual delivery agent writes the Maildir as nobody:nogroup. Needs root.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
port=${MAILPROXY_POSTFIX_PORT:-10025}
domain=${MAILPROXY_POSTFIX_DOMAIN:-test.example}

usage() { echo "usage: $0 start|stop|env BASE" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
base=$2
case "$base" in /*) ;; *) base="$PWD/$base" ;; esac
conf="$base/etc"
maildir="$base/mail/$domain/inbox"
maillog="$base/log/maillog"

print_env() {
    cat <<EOT
export MAILPROXY_POSTFIX_HOST=127.0.0.1
export MAILPROXY_POSTFIX_PORT=$port
export MAILPROXY_POSTFIX_DOMAIN=$domain
export MAILPROXY_POSTFIX_MAILDIR=$maildir
export MAILPROXY_POSTFIX_MAILLOG=$maillog
export MAILPROXY_POSTFIX_CONFIG=$conf
EOT
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

start() {
    case "$port" in ''|*[!0-9]*) echo "instance.sh: bad port '$port'" >&2; exit 2 ;; esac
    if port_open; then
        echo "instance.sh: something already listens on 127.0.0.1:$port" >&2
        exit 1
    fi
    mkdir -p "$conf" "$base/queue" "$base/data" "$base/log" "$maildir"/{new,cur,tmp}
    # nobody must be able to walk down to the Maildir: check every parent of BASE.
    chmod 755 "$base" "$base/mail"
    if ! setpriv --reuid=65534 --regid=65534 --clear-groups test -x "$base/mail" 2>/dev/null; then
        echo "instance.sh: $base is not reachable by uid 65534; use a base under /tmp" >&2
        exit 1
    fi
    chown -R 65534:65534 "$base/mail"
    chown postfix "$base/data"
    sed -e "s|@CONFIG_DIR@|$conf|g" -e "s|@QUEUE_DIR@|$base/queue|g" \
        -e "s|@DATA_DIR@|$base/data|g" -e "s|@MAILLOG@|$maillog|g" -e "s|@LOG_DIR@|$base/log|g" \
        -e "s|@MAIL_BASE@|$base/mail|g" -e "s|@DOMAIN@|$domain|g" \
        -e "s|@MESSAGE_SIZE_LIMIT@|${MAILPROXY_POSTFIX_SIZE_LIMIT:-209715200}|g" \
        "$here/main.cf.in" >"$conf/main.cf"
    sed -e "s|@SMTP_ADDR@|127.0.0.1:$port|g" "$here/master.cf.in" >"$conf/master.cf"
    # Every address in the domain is delivered to the one Maildir (trailing slash = Maildir).
    printf '@%s %s/inbox/\n' "$domain" "$domain" >"$conf/vmailbox"
    : >"$maillog"
    # Before postlogd runs, Postfix reports only to syslog (absent here) or to a terminal:
    # on failure, run it again under script(1) so that its fatal message is seen.
    if ! postfix -c "$conf" start >&2; then
        echo "instance.sh: postfix start failed:" >&2
        script -qc "postfix -c '$conf' check" /dev/null >&2 || true
        cat "$maillog" >&2 || true
        exit 1
    fi
    local i
    for i in $(seq 1 100); do
        if port_open; then
            print_env
            return 0
        fi
        sleep 0.1
    done
    echo "instance.sh: Postfix did not listen on 127.0.0.1:$port within 10 s; maillog:" >&2
    cat "$maillog" >&2 || true
    exit 1
}

stop() {
    [ -f "$conf/main.cf" ] || return 0
    if postfix -c "$conf" status >/dev/null 2>&1; then
        postfix -c "$conf" stop >&2
        local i
        for i in $(seq 1 50); do
            postfix -c "$conf" status >/dev/null 2>&1 || return 0
            sleep 0.1
        done
        postfix -c "$conf" abort >&2 || true
    fi
}

case "$action" in
    start) start ;;
    stop) stop ;;
    env) print_env ;;
    *) usage ;;
esac
