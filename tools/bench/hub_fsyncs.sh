#!/bin/bash
# One hub run (1 000 owner rest-hook subscriptions, RATE updates/s, default 2 000, 20 s) with
# the fsyncs of each SQLite thread (writer, syncer, checkpointer) over 10 s from 8 s in, from
# `perf trace`: how many, their mean and longest, and the time spent in them.
#   RATE=500 LOAD=target/release/baton-load tools/bench/hub_fsyncs.sh on target/release/baton BATON_AUDIT__ENABLED=true
name=$1; bin=$2; shift 2
RUN=${RUN:-/tmp/hub-fsyncs}; PORT=${PORT:-19230}
export BATON_JWT_SECRET=bench-secret-0123456789abcdef0123456789
ulimit -n 20000
rm -rf $RUN && mkdir -p $RUN
env "$@" BATON_LIMITS__REQUESTS_PER_SECOND_PER_TOKEN=0 BATON_LIMITS__MAX_CONNECTIONS_PER_CLIENT=0 \
  BATON_ALLOW_HTTP_ENDPOINTS=true BATON_ALLOW_PRIVATE_ENDPOINTS=true BATON_LISTEN=127.0.0.1:$PORT \
  BATON_DATA_DIR=$RUN BATON_DATABASE_URL=sqlite://$RUN/baton.db $bin serve > $RUN/log 2>&1 & S=$!
for k in $(seq 1 100); do curl -sf http://127.0.0.1:$PORT/readyz >/dev/null && break; sleep 0.2; done
( sleep 8; timeout 10 perf trace -p $S -e fdatasync,fsync -o $RUN/trace >/dev/null 2>&1 ) & P=$!
out=$(${LOAD:-target/release/baton-load} hub --base http://127.0.0.1:$PORT/fhir --server-pid $S --subscriptions 1000 --rate ${RATE:-2000} --duration 20s --receivers-port $((PORT+4)) 2>&1 | tail -1)
wait $P
echo "$name $(echo "$out" | jq -c '{ups:.updates_per_s, up50:.update_latency_ms.p50, up99:.update_latency_ms.p99, n50:.latency_ms.p50, n99:.latency_ms.p99, srv:.cpu_percent.server}') load=$(cut -d' ' -f1-3 /proc/loadavg)"
for t in /proc/$S/task/*; do echo "$(basename $t) $(cat $t/comm)"; done > $RUN/tids
awk 'NR==FNR {c[$1]=$2; next} /(fdatasync|fsync)/ && /\( *[0-9.]+ ms\)/ { match($0, /\( *[0-9.]+ ms\)/); d=substr($0, RSTART+1, RLENGTH-4)+0; match($0, /\/[0-9]+ /); tid=substr($0, RSTART+1, RLENGTH-2); n[c[tid]]++; s[c[tid]]+=d; if (d>m[c[tid]]) m[c[tid]]=d }
  END { for (k in n) printf "  %s: %d syncs/10s, mean %.2f ms, max %.1f ms, total %.0f ms\n", k, n[k], s[k]/n[k], m[k], s[k] }' $RUN/tids $RUN/trace
kill $S; wait $S 2>/dev/null
