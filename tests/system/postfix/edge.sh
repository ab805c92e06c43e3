#!/bin/bash
# Start, stop or describe the "edge" Postfix of mailproxy's deployment tests (test_deploy.py):
# a second private instance, next to instance.sh's default one (whose settings other tests
# rely on), set up as the README's "Putting mailproxy in front of Postfix" says
# (front-main.cf): mynetworks = 127.0.0.1/32, XCLIENT and XFORWARD for the proxy, STARTTLS
# with a certificate for mta.test made here, AUTH (only after STARTTLS) through a private
# Dovecot as its SASL server; edge-main.cf adds what only the tests need (TLS logging).
#
#   edge.sh start BASE   make a CA and a certificate for mta.test, start Postfix (instance.sh)
#                        and Dovecot, wait (bounded) until Dovecot authenticates the test user
#                        and Postfix takes AUTH PLAIN after STARTTLS, print `export` lines
#   edge.sh stop BASE    stop both (quietly does nothing if they are not running)
#   edge.sh env BASE     print the export lines again
#   edge.sh log BASE     print Dovecot's log
#
# Inputs (environment): MAILPROXY_EDGE_PORT (default 10036), MAILPROXY_DOVECOT_PORT (Dovecot's
# auth service on 127.0.0.1, for the readiness check only; default 10037). Exports
# MAILPROXY_EDGE_{HOST,PORT,DOMAIN,MAILDIR,MAILLOG,CONFIG} (as instance.sh does for
# MAILPROXY_POSTFIX_*), MAILPROXY_EDGE_TLS_NAME, MAILPROXY_EDGE_TLS_CA (the CA that signed
# Postfix's certificate), MAILPROXY_EDGE_SASL_USER, MAILPROXY_EDGE_SASL_PASSWORD,
# MAILPROXY_DOVECOT_LOG. Needs root, openssl, dovecot (dovecot-core), swaks.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
port=${MAILPROXY_EDGE_PORT:-10036}
dovecot_port=${MAILPROXY_DOVECOT_PORT:-10037}
domain=test.example
tls_name=mta.test
sasl_user=alice@$domain
sasl_password=alice-secret-8
# Readiness wait (seconds) and stop wait (tenths of a second).
START_WAIT=10
STOP_WAIT=50

usage() { echo "usage: $0 start|stop|env|log BASE" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
base=$2
case "$base" in /*) ;; *) base="$PWD/$base" ;; esac
tls="$base/tls"
dovecot="$base/dovecot"
dovecot_log="$dovecot/dovecot.log"

instance() {
    MAILPROXY_POSTFIX_PORT=$port MAILPROXY_POSTFIX_DOMAIN=$domain \
        MAILPROXY_POSTFIX_ENV_PREFIX=MAILPROXY_EDGE \
        MAILPROXY_POSTFIX_MAIN_EXTRA="$base/main-extra.cf" \
        MAILPROXY_POSTFIX_MASTER_EXTRA="$here/edge-master.cf" \
        "$here/instance.sh" "$@" "$base"
}

print_env() {
    instance env
    cat <<EOT
export MAILPROXY_EDGE_TLS_NAME=$tls_name
export MAILPROXY_EDGE_TLS_CA=$tls/ca.pem
export MAILPROXY_EDGE_SASL_USER=$sasl_user
export MAILPROXY_EDGE_SASL_PASSWORD=$sasl_password
export MAILPROXY_DOVECOT_LOG=$dovecot_log
EOT
}

fail() {
    echo "edge.sh: $*" >&2
    echo "--- dovecot log:" >&2
    tail -n 40 "$dovecot_log" >&2 2>/dev/null || true
    echo "--- maillog:" >&2
    tail -n 40 "$base/log/maillog" >&2 2>/dev/null || true
    stop
    exit 1
}

# A CA, and a certificate for mta.test that it signed: what mailproxy's upstream_tls verifies
# (name = "mta.test", ca_file = ca.pem).
make_certificates() {
    mkdir -p "$tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
        -subj "/CN=mailproxy test CA" -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=$tls_name" -keyout "$tls/mta.key" -out "$tls/mta.csr" 2>/dev/null
    printf 'subjectAltName = DNS:%s\nextendedKeyUsage = serverAuth\nbasicConstraints = CA:FALSE\n' \
        "$tls_name" >"$tls/mta.ext"
    openssl x509 -req -in "$tls/mta.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
        -CAcreateserial -days 30 -extfile "$tls/mta.ext" -out "$tls/mta.pem" 2>/dev/null
    chmod 600 "$tls"/*.key
    chmod 644 "$tls"/*.pem
}

# dovecot_auth: one AUTH PLAIN of the test user on Dovecot's auth protocol; succeeds on OK.
dovecot_auth() {
    local line resp
    resp=$(printf '\0%s\0%s' "$sasl_user" "$sasl_password" | base64 -w0)
    exec 3<>"/dev/tcp/127.0.0.1/$dovecot_port" || return 1
    printf 'VERSION\t1\t2\nCPID\t%s\n' "$$" >&3
    while IFS= read -r -t 2 line <&3; do
        [ "$line" = DONE ] && break
    done
    printf 'AUTH\t1\tPLAIN\tservice=smtp\tresp=%s\n' "$resp" >&3
    IFS= read -r -t 2 line <&3 || line=
    exec 3<&-
    case "$line" in "OK	1	"*) return 0 ;; *) return 1 ;; esac
}

start_dovecot() {
    mkdir -p "$dovecot/run" "$dovecot/state"
    printf '%s:{PLAIN}%s\n' "$sasl_user" "$sasl_password" >"$dovecot/users"
    # Read by Dovecot's auth process, which runs as the dovecot user.
    chown root:dovecot "$dovecot/users"
    chmod 640 "$dovecot/users"
    sed -e "s|@DIR@|$dovecot|g" -e "s|@PORT@|$dovecot_port|g" \
        -e "s|@AUTH_SOCKET@|$base/queue/private/auth|g" \
        "$here/dovecot.conf.in" >"$dovecot/dovecot.conf"
    : >"$dovecot_log"
    dovecot -F -c "$dovecot/dovecot.conf" </dev/null >>"$dovecot_log" 2>&1 &
    echo $! >"$dovecot/dovecot.pid"
    local child deadline=$((SECONDS + START_WAIT))
    child=$(cat "$dovecot/dovecot.pid")
    while [ "$SECONDS" -lt "$deadline" ]; do
        dovecot_auth 2>/dev/null && return 0
        kill -0 "$child" 2>/dev/null || fail "dovecot exited while starting"
        sleep 0.1
    done
    fail "dovecot did not authenticate $sasl_user within $START_WAIT s"
}

# What a client of Postfix's own sees: STARTTLS, then AUTH PLAIN answered 235.
check_postfix() {
    local out
    if ! out=$(swaks --server "127.0.0.1:$port" --timeout 10 --quit-after AUTH --tls \
        --auth PLAIN --auth-user "$sasl_user" --auth-password "$sasl_password" 2>&1); then
        fail "STARTTLS + AUTH PLAIN straight to Postfix failed:
$out"
    fi
    grep -q '^<~  235 ' <<<"$out" || fail "no 235 after STARTTLS + AUTH PLAIN:
$out"
}

start() {
    [ -s "$dovecot/dovecot.pid" ] && kill -0 "$(cat "$dovecot/dovecot.pid")" 2>/dev/null &&
        { echo "edge.sh: dovecot already runs for $base" >&2; exit 1; }
    (exec 3<>"/dev/tcp/127.0.0.1/$dovecot_port") 2>/dev/null &&
        { echo "edge.sh: something already listens on 127.0.0.1:$dovecot_port" >&2; exit 1; }
    mkdir -p "$base"
    chmod 755 "$base"
    make_certificates
    sed -e "s|@TLS_DIR@|$tls|g" "$here/front-main.cf" "$here/edge-main.cf" >"$base/main-extra.cf"
    # Postfix first: it makes the queue's private/ directory that Dovecot's socket goes in.
    instance start >/dev/null
    start_dovecot
    check_postfix
    print_env
}

stop() {
    if [ -s "$dovecot/dovecot.pid" ]; then
        local pid i
        pid=$(cat "$dovecot/dovecot.pid")
        if kill -TERM "$pid" 2>/dev/null; then
            for i in $(seq 1 "$STOP_WAIT"); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$dovecot/dovecot.pid"
    fi
    instance stop || true
}

case "$action" in
    start) start ;;
    stop) stop ;;
    env) print_env ;;
    log) cat "$dovecot_log" 2>/dev/null || true ;;
    *) usage ;;
esac
