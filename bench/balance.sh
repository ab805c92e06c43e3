#!/bin/bash
# How two workers share the clients: one listening socket shared by all (the default) or
# one SO_REUSEPORT socket each (MasterService.reusePort). smtp-sink as the MTA on 13526,
# mailproxy on 13525, smtp-source with one message per connection; prints the messages
# each worker accepted (from the stats socket) and the rate. Interleaved rounds:
#
#   bench/balance.sh [ROUNDS [SESSIONS [MESSAGES]]]      # defaults 3, 20, 2000
#
# Needs Postfix's smtp-source and smtp-sink (/usr/sbin) and the checkout's .venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS=${1:-3}; SESSIONS=${2:-20}; MESSAGES=${3:-2000}
WORK=$(mktemp -d /tmp/mailproxy-balance.XXXXXX)
trap 'kill $SINK 2>/dev/null; rm -rf "$WORK"' EXIT
/usr/sbin/smtp-sink -u nobody 127.0.0.1:13526 5000 > /dev/null & SINK=$!

run() {
    local mode=$1
    rm -rf "$WORK/spool" "$WORK/stats.sock"
    cat > "$WORK/mailproxy.toml" <<EOT
[proxy]
listen = "tcp:13525:interface=127.0.0.1:backlog=1024"
upstream = "tcp:host=127.0.0.1:port=13526"
spool_dir = "$WORK/spool"
workers = 2
client_names = "off"
[limits]
connections = 200
connections_per_client = 200
[stats]
socket = "$WORK/stats.sock"
EOT
    PYTHONPATH=. .venv/bin/python -c "
import sys
import mailproxy.workers as w
w.MasterService.reusePort = bool($mode)
from twisted.scripts.twistd import run
sys.argv = ['twistd', '-n', '--pidfile=', 'mailproxy', '--config', '$WORK/mailproxy.toml']
run()" > "$WORK/proxy.log" 2>&1 &
    local pid=$!
    for _ in $(seq 150); do
        [ "$(grep -c '\[worker . .*listening on' "$WORK/proxy.log")" = 2 ] && break
        sleep 0.2
    done
    local start end
    start=$(date +%s.%N)
    /usr/sbin/smtp-source -c -m "$MESSAGES" -s "$SESSIONS" -l 1024 127.0.0.1:13525 > /dev/null
    end=$(date +%s.%N)
    .venv/bin/python - "$mode" "$start" "$end" "$MESSAGES" "$WORK/stats.sock" <<'PY'
import json, socket, sys
mode, start, end, m, path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
s = socket.socket(socket.AF_UNIX); s.connect(path); data = b""
while chunk := s.recv(65536):
    data += chunk
d = json.loads(data)
rows = [r["accepted"] for r in d["workers"]]
name = "reuseport" if mode == "1" else "shared   "
print(f"{name} per worker {rows}  msg/s {m / (end - start):.0f}")
PY
    kill -TERM "$pid"; wait "$pid" || true
}

for round in $(seq "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then run 0; run 1; else run 1; run 0; fi
done
