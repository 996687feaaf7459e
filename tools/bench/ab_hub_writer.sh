#!/bin/bash
# The subscription hub, as ab_audit_hub.sh, with what the SQLite writer did in 10 s of each run
# (from 8 s in): its threads' CPU (writer, syncer, checkpointer), commits and their mean time,
# the syncer's syncs, the mean wait of a request and of hub work, the groups by lanes and their
# mean size, and (builds that have it) a confirmed attempt's mean wait for its result to commit,
# `baton_delivery_record_wait_seconds` (from /metrics). A variant is NAME:BINARY[:VAR=VALUE,...]; PORT (default 19200).
#   LOAD=target/release/baton-load tools/bench/ab_hub_writer.sh 2 500 "on:target/release/baton off:target/release/baton:BATON_AUDIT__ENABLED=false"
R=$1; RATE=$2; VARIANTS=$3
L=${LOAD:-target/release/baton-load}; RUN=${RUN:-/tmp/ab-hub-writer}; PORT=${PORT:-19200}
export BATON_JWT_SECRET=bench-secret-0123456789abcdef0123456789
ulimit -n 20000
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
tticks() { for t in /proc/$1/task/*; do n=$(cat $t/comm); case "$n" in baton-sqlite-*) echo "$n $(awk '{print $14+$15}' $t/stat)";; esac; done | sort; }
for i in $(seq 1 $R); do for v in $VARIANTS; do
  name=${v%%:*}; rest=${v#*:}; bin=${rest%%:*}; vars=""; [ "$rest" != "$bin" ] && vars=${rest#*:}
  rm -rf $RUN && mkdir -p $RUN
  env ${vars//,/ } BATON_LIMITS__REQUESTS_PER_SECOND_PER_TOKEN=0 BATON_LIMITS__MAX_CONNECTIONS_PER_CLIENT=0 \
    BATON_ALLOW_HTTP_ENDPOINTS=true BATON_ALLOW_PRIVATE_ENDPOINTS=true BATON_LISTEN=127.0.0.1:$PORT \
    BATON_DATA_DIR=$RUN BATON_DATABASE_URL=sqlite://$RUN/baton.db $bin serve > $RUN/log 2>&1 & S=$!
  for k in $(seq 1 100); do curl -sf http://127.0.0.1:$PORT/readyz >/dev/null && break; sleep 0.2; done
  c0=$(ticks $S)
  ( sleep ${SETTLE:-8}; tticks $S > $RUN/t0; curl -s http://127.0.0.1:$PORT/metrics > $RUN/m0; sleep 10; tticks $S > $RUN/t1; curl -s http://127.0.0.1:$PORT/metrics > $RUN/m1 ) &
  P=$!
  out=$($L hub --base http://127.0.0.1:$PORT/fhir --server-pid $S --subscriptions 1000 --rate $RATE \
    --duration 20s --receivers-port $((PORT+4)) 2>&1 | tail -1)
  wait $P
  c1=$(ticks $S)
  thr=$(join $RUN/t0 $RUN/t1 | awk '{printf "%s=%d%% ", substr($1,14), ($3-$2)/10}')
  m=$(for f in m0 m1; do awk '/^baton_store_commit_seconds_(sum|count)|^baton_store_wal_sync_seconds_(sum|count)|^baton_writer_groups_total|^baton_store_write_wait_seconds_(sum|count)|^baton_store_commit_batch_size_(sum|count)|^baton_delivery_record_wait_seconds_(sum|count)/ {print $1, $2}' $RUN/$f; done | awk '{if ($1 in a) d[$1]=$2-a[$1]; else a[$1]=$2} END {
    c=d["baton_store_commit_seconds_count"]; printf "commits/s=%d commit_ms=%.2f sync_ms=%.2f syncs/s=%d req_wait_ms=%.2f hub_wait_ms=%.2f groups/s req=%d both=%d hub=%d batch=%.1f rec_wait_ms=%s",
      c/10, 1000*d["baton_store_commit_seconds_sum"]/c, 1000*d["baton_store_wal_sync_seconds_sum"]/d["baton_store_wal_sync_seconds_count"], d["baton_store_wal_sync_seconds_count"]/10,
      1000*d["baton_store_write_wait_seconds_sum{lane=\"request\"}"]/d["baton_store_write_wait_seconds_count{lane=\"request\"}"],
      1000*d["baton_store_write_wait_seconds_sum{lane=\"hub\"}"]/d["baton_store_write_wait_seconds_count{lane=\"hub\"}"],
      d["baton_writer_groups_total{lanes=\"requests\"}"]/10, d["baton_writer_groups_total{lanes=\"both\"}"]/10, d["baton_writer_groups_total{lanes=\"hub\"}"]/10,
      d["baton_store_commit_batch_size_sum"]/d["baton_store_commit_batch_size_count"],
      d["baton_delivery_record_wait_seconds_count"] ? sprintf("%.2f", 1000*d["baton_delivery_record_wait_seconds_sum"]/d["baton_delivery_record_wait_seconds_count"]) : "-"}')
  echo "$i $name $(echo "$out" | jq -c --argjson c $(( (c1-c0)*10000 )) '{ups:.updates_per_s, up50:.update_latency_ms.p50, up99:.update_latency_ms.p99, n50:.latency_ms.p50, n99:.latency_ms.p99, lost:.missing, srv:.cpu_percent.server, mach:.cpu_percent.machine, us:(($c/.updates_ok)|floor), pass:.passed}') thr: $thr $m at=$(date -u +%H:%M:%S) load=$(cut -d' ' -f1-3 /proc/loadavg)"
  kill $S; wait $S 2>/dev/null
done; done
