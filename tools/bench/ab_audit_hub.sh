#!/bin/bash
# The subscription hub with and without parts of the audit trail (issue 19, "auditing delivery
# attempts at most 10 % of the hub figures"): per variant a fresh SQLite database and a server,
# `baton-load hub --subscriptions 1000 --rate RATE --duration 20s`, the variants in turn, ROUNDS
# times. Prints updates/s, update and notification p50/p99 (ms), lost/duplicated, the server's
# CPU % and its CPU per update (utime + stime from /proc ÷ updates), the AuditEvents stored, and
# the load average. A variant is NAME:BINARY[:VAR=VALUE,...]. PORT (default 18621) and PORT+4
# are the server's and the receivers' ports.
#   tools/bench/ab_audit_hub.sh 2 2000 "on:target/release/baton off:target/release/baton:BATON_AUDIT__DELIVERY_ATTEMPTS=false"
R=$1; RATE=$2; VARIANTS=$3
L=${LOAD:-target/release/baton-load}; RUN=${RUN:-/tmp/ab-hub}; PORT=${PORT:-18621}
export BATON_JWT_SECRET=bench-secret-0123456789abcdef0123456789
ulimit -n 20000
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
for i in $(seq 1 $R); do for v in $VARIANTS; do
  name=${v%%:*}; rest=${v#*:}; bin=${rest%%:*}; vars=""; [ "$rest" != "$bin" ] && vars=${rest#*:}
  rm -rf $RUN && mkdir -p $RUN
  env ${vars//,/ } BATON_LIMITS__REQUESTS_PER_SECOND_PER_TOKEN=0 BATON_LIMITS__MAX_CONNECTIONS_PER_CLIENT=0 \
    BATON_ALLOW_HTTP_ENDPOINTS=true BATON_ALLOW_PRIVATE_ENDPOINTS=true BATON_LISTEN=127.0.0.1:$PORT \
    BATON_DATA_DIR=$RUN BATON_DATABASE_URL=sqlite://$RUN/baton.db $bin serve > $RUN/log 2>&1 & S=$!
  for k in $(seq 1 100); do curl -sf http://127.0.0.1:$PORT/readyz >/dev/null && break; sleep 0.2; done
  c0=$(ticks $S)
  out=$($L hub --base http://127.0.0.1:$PORT/fhir --server-pid $S --subscriptions 1000 --rate $RATE \
    --duration 20s --receivers-port $((PORT+4)) 2>&1 | tail -1)
  c1=$(ticks $S)
  audits=$(sqlite3 $RUN/baton.db 'select count(*) from audit_event' 2>/dev/null)
  echo "$i $name rate=$RATE $(echo "$out" | jq -c --argjson c $(( (c1-c0)*10000 )) '{ups:.updates_per_s, up50:.update_latency_ms.p50, up99:.update_latency_ms.p99, n50:.latency_ms.p50, n99:.latency_ms.p99, lost:.missing, dup:.duplicates, srv:.cpu_percent.server, us_per_update:(($c/.updates_ok)|floor), pass:.passed}') audits=$audits at=$(date -u +%H:%M:%S) load=$(cut -d' ' -f1-3 /proc/loadavg)"
  kill $S; wait $S 2>/dev/null
done; done
