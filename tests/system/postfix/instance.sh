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
#
# A second instance with other settings (edge.sh) uses the same script with:
#   MAILPROXY_POSTFIX_ENV_PREFIX   the prefix of the exported names (default MAILPROXY_POSTFIX)
#   MAILPROXY_POSTFIX_MAIN_EXTRA   a file of main.cf settings, one `name = value` a line (# for
#                                  comments), applied with postconf -e after main.cf.in, so they
#                                  replace its values; main.cf.in's @NAME@ placeholders work
#   MAILPROXY_POSTFIX_MASTER_EXTRA a file of master.cf lines appended to master.cf.in's
# Unset, the instance is exactly main.cf.in and master.cf.in.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
port=${MAILPROXY_POSTFIX_PORT:-10025}
domain=${MAILPROXY_POSTFIX_DOMAIN:-test.example}
prefix=${MAILPROXY_POSTFIX_ENV_PREFIX:-MAILPROXY_POSTFIX}
main_extra=${MAILPROXY_POSTFIX_MAIN_EXTRA:-}
master_extra=${MAILPROXY_POSTFIX_MASTER_EXTRA:-}

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
export ${prefix}_HOST=127.0.0.1
export ${prefix}_PORT=$port
export ${prefix}_DOMAIN=$domain
export ${prefix}_MAILDIR=$maildir
export ${prefix}_MAILLOG=$maillog
export ${prefix}_CONFIG=$conf
EOT
}

# fill FILE: FILE with the @NAME@ placeholders filled in.
fill() {
    sed -e "s|@CONFIG_DIR@|$conf|g" -e "s|@QUEUE_DIR@|$base/queue|g" \
        -e "s|@DATA_DIR@|$base/data|g" -e "s|@MAILLOG@|$maillog|g" -e "s|@LOG_DIR@|$base/log|g" \
        -e "s|@MAIL_BASE@|$base/mail|g" -e "s|@DOMAIN@|$domain|g" \
        -e "s|@MESSAGE_SIZE_LIMIT@|${MAILPROXY_POSTFIX_SIZE_LIMIT:-209715200}|g" \
        -e "s|@SMTP_ADDR@|127.0.0.1:$port|g" -e "s|@BASE@|$base|g" "$1"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

start() {
    case "$port" in ''|*[!0-9]*) echo "instance.sh: bad port '$port'" >&2; exit 2 ;; esac
    case "$prefix" in ''|*[!A-Z0-9_]*) echo "instance.sh: bad prefix '$prefix'" >&2; exit 2 ;; esac
    local extra
    for extra in "$main_extra" "$master_extra"; do
        [ -z "$extra" ] || [ -r "$extra" ] || { echo "instance.sh: cannot read $extra" >&2; exit 2; }
    done
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
    fill "$here/main.cf.in" >"$conf/main.cf"
    if [ -n "$main_extra" ]; then
        local setting
        while IFS= read -r setting; do
            postconf -c "$conf" -e "$setting"
        done < <(fill "$main_extra" | grep -Ev '^[[:space:]]*(#|$)')
    fi
    fill "$here/master.cf.in" >"$conf/master.cf"
    if [ -n "$master_extra" ]; then
        fill "$master_extra" >>"$conf/master.cf"
    fi
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
