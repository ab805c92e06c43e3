#!/bin/bash
# User-space instructions per message of mailproxy (workers = 1), counted by callgrind:
# smtp-source -> mailproxy (under valgrind) -> smtp-sink on 127.0.0.1. Unlike CPU time the
# count hardly moves with what else the machine runs (two runs of one tree agree within
# 0.1%), so it compares two revisions on a busy machine. Kernel time is not counted:
# use bench/hotpath.py --strace for the syscalls.
#
#   bench/instructions.sh [TREE [SIZE:MESSAGES:SESSIONS]]     # default: . 1024:300:1
#
# Needs valgrind, Postfix's smtp-source and smtp-sink, and the venv at .venv; about 10 s.
set -eu
TREE=$(cd "${1:-.}" && pwd)
IFS=: read -r SIZE COUNT SESSIONS <<<"${2:-1024:300:1}"
VENV=$(cd "$(dirname "$0")/.." && pwd)/.venv
# Ports nothing listens on now, so that two runs (or a test suite) can share the machine.
read -r SINK_PORT PROXY_PORT < <("$VENV/bin/python" -c '
import socket
a, b = socket.socket(), socket.socket()
a.bind(("127.0.0.1", 0)); b.bind(("127.0.0.1", 0))
print(a.getsockname()[1], b.getsockname()[1])')
WORK=$(mktemp -d)
trap 'kill $PROXY $SINK 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
mkdir "$WORK/spool"
cat >"$WORK/mailproxy.toml" <<TOML
[proxy]
listen = "tcp:$PROXY_PORT:interface=127.0.0.1:backlog=1024"
upstream = "tcp:host=127.0.0.1:port=$SINK_PORT"
client_names = "off"
workers = 1
spool_dir = "$WORK/spool"
[limits]
connections = 200
connections_per_client = 200
TOML
smtp-sink -u nobody -c 127.0.0.1:$SINK_PORT 1000 >/dev/null & SINK=$!
cd "$TREE"
PYTHONPATH=. valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$WORK/callgrind.%p" "$VENV/bin/python" "$VENV/bin/twistd" -n \
    --pidfile= -l "$WORK/proxy.log" mailproxy --config "$WORK/mailproxy.toml" \
    2>"$WORK/valgrind.log" & PROXY=$!
for _ in $(seq 600); do
    (echo >/dev/tcp/127.0.0.1/$PROXY_PORT) 2>/dev/null && break
    sleep 0.5
done
smtp-source -s 1 -m 5 -l 1024 127.0.0.1:$PROXY_PORT  # warm up, uncounted
callgrind_control -i on $PROXY >/dev/null 2>&1
smtp-source -s "$SESSIONS" -m "$COUNT" -l "$SIZE" 127.0.0.1:$PROXY_PORT
callgrind_control -d $PROXY >/dev/null 2>&1
sleep 1
total=$(sed -n 's/^totals: //p' "$WORK"/callgrind.*.1)
echo "$TREE $SIZE:$COUNT:$SESSIONS: $((total / COUNT)) instructions a message"
