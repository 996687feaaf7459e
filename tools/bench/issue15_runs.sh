#!/bin/bash
# The runs of BENCHMARKS.md "2026-12-07 (fourth sitting): quiet-window figures" (issue 15).
# BIN = the release dir; modes: ratio, tx, audit, sync, beside NICE..., fanout NICE...,
# putfan NICE..., linger MS... (EXTRA='BATON_X=1 …': more settings; FANOPT='--listeners-nice 10': more baton-fanout options), chunk CHUNK... (MODE=--no-listeners for the baseline), hub, pg (one
# PostgreSQL node, without TLS, against one SQLite node: a fresh database per run), pgab (pg
# with the PostgreSQL runs alternating between OLD=<old release dir> and BIN).
# PORT (default 18080) moves every port the runs use (PORT, PORT+1, PORT+10, PORT+15), PGDB
# (default bench_q) names the scratch PostgreSQL database, so that runs can share a machine.
#   BIN=target/release tools/bench/issue15_runs.sh ratio
BIN=${BIN:-target/release}
export BATON_JWT_SECRET=bench-secret-0123456789abcdef0123456789
ulimit -n 20000
Q=${OUT:-/tmp/q}; mkdir -p $Q
P=${PORT:-18080}; P1=$((P + 1)); PB=$((P + 10)); PR=$((P + 15)); DB=${PGDB:-bench_q}
la() { cut -d' ' -f1-3 /proc/loadavg; }
start() { # port dir [env...]
  local port=$1 dir=$2; shift 2; rm -rf $dir; mkdir -p $dir
  env BATON_LIMITS__REQUESTS_PER_SECOND_PER_TOKEN=0 BATON_LIMITS__MAX_CONNECTIONS_PER_CLIENT=0 \
    BATON_WEBSOCKET__OUTBOX_CAPACITY=256 BATON_LISTEN=127.0.0.1:$port BATON_DATA_DIR=$dir \
    BATON_DATABASE_URL=sqlite://$dir/baton.db "$@" ${SERVE_BIN:-$BIN}/baton serve > $dir/log 2>&1 & S=$!
  for i in $(seq 1 50); do curl -sf http://127.0.0.1:$port/readyz >/dev/null && break; sleep 0.2; done; kill -0 $S || { echo "server died"; tail -2 $dir/log; exit 1; }
}
stop() { kill $S; wait $S 2>/dev/null; }
tasks() { $BIN/baton-load tasks --base http://127.0.0.1:$1/fhir --server-pid $S --concurrency ${C:-16} --duration ${D:-10s} "${@:2}" 2>&1 | tail -1; }
bare() { $BIN/baton-load bare-server --listen 127.0.0.1:$PB & B=$!; sleep 0.5
  S=$B; echo "bare $1 $(tasks $PB --token unused --mode $1 | jq -c '{r:.tasks_per_s,p99:.latency_ms.p99}') load=$(la)"; kill $B; wait $B 2>/dev/null; }
# CPU ticks (1/100 s) used so far by the PostgreSQL backends serving database $DB.
pgticks() { for p in $(psql -h 127.0.0.1 -U postgres -Atc "SELECT pid FROM pg_stat_activity WHERE datname = '$DB'"); do
  cut -d' ' -f14,15 /proc/$p/stat 2>/dev/null; done | awk '{s += $1 + $2} END {print s + 0}'; }
# One run; on PostgreSQL also the backends' CPU per write (ms), sampled over 8 s of the
# measured 10 (after 3 s: the 2 s warm-up and 1 s more), and the server's (ms per write).
baton() { start $P $Q/b "${@:2}"; local pg=""
  case "$*" in *postgres://*) (sleep 3; a=$(pgticks); sleep 8; echo $(( $(pgticks) - a )) > $Q/pgticks) & pg=$! ;; esac
  local out=$(tasks $P --mode $1)
  local extra=""; [ -n "$pg" ] && { wait $pg; extra=" pg_ms=$(jq -r --arg t $(cat $Q/pgticks) '($t|tonumber) * 10 / (.tasks_per_s * 8) * 100 | round / 100' <<< "$out")"; }
  echo "baton $1 ${SERVE_BIN:+bin=$SERVE_BIN }${*:2} $(jq -c '{r:.tasks_per_s,p99:.latency_ms.p99,cpu:.cpu_percent.server,ms:((.cpu_percent.server * 10 / .tasks_per_s * 1000 | round) / 1000)}' <<< "$out")$extra load=$(la)"; stop; }
case "$1" in
ratio) for r in 1 2; do bare create; baton create; bare update; baton update; done ;;
tx) for r in 1 2; do baton create; baton "transaction --entries 100"; baton "transaction --entries 10"; done ;;
audit) for r in 1 2; do baton create BATON_AUDIT__ENABLED=false; baton create; done ;;
beside) # nice value
  for n in ${@:2}; do
    start $P $Q/p BATON_DELIVERY__NICE=$n; echo "alone nice=$n $(C=4 D=12s tasks $P --mode update | jq -c '{r:.tasks_per_s,p50:.latency_ms.p50,p99:.latency_ms.p99}') load=$(la)"; stop
    start $P1 $Q/f BATON_DELIVERY__NICE=$n
    out=$Q/fanout-nice$n-$(date +%H%M%S).txt
    $BIN/baton-fanout websocket --base http://127.0.0.1:$P1/fhir --server-pid $S --owners 10000 --catch-all 100 --rate 500 --duration 30s --idle 2s --settle 20s > $out 2>&1 & F=$!
    until grep -q "gauge" $out 2>/dev/null; do sleep 1; done; sleep 4
    echo "beside nice=$n $(C=4 D=12s tasks $P1 --mode update | jq -c '{r:.tasks_per_s,p50:.latency_ms.p50,p99:.latency_ms.p99}') load=$(la)"
    wait $F; grep -E "latency|lost|late|updates" $out | head -12; stop
  done ;;
hub) for r in 1 2; do for a in true false; do start $P $Q/h BATON_AUDIT__ENABLED=$a BATON_ALLOW_HTTP_ENDPOINTS=true BATON_ALLOW_PRIVATE_ENDPOINTS=true
  echo "hub audit=$a $($BIN/baton-load hub --base http://127.0.0.1:$P/fhir --server-pid $S --subscriptions 1000 --rate 2000 --duration 20s --receivers-port $PR 2>&1 | tail -1 | jq -c '{u:.updates_per_s, up:.update_latency_ms, n:.latency_ms, miss:.missing, pass:.passed, cpu:.cpu_percent.server}' ) load=$(la)"; stop; done; done ;;
fanout) for n in ${@:2}; do start $P1 $Q/f BATON_DELIVERY__NICE=$n
  $BIN/baton-fanout websocket --base http://127.0.0.1:$P1/fhir --server-pid $S --owners 10000 --catch-all 100 --rate 500 --duration 30s --idle 2s --settle 5s 2>&1 | grep -E "latency|updates " ; echo "fanout nice=$n load=$(la)"; stop; done ;;
putfan) for n in ${@:2}; do for mode in --no-listeners ""; do start $P1 $Q/f BATON_DELIVERY__NICE=$n
  $BIN/baton-fanout websocket --base http://127.0.0.1:$P1/fhir --server-pid $S --owners 10000 --catch-all 100 --rate 500 --duration 30s --idle 2s --settle 2s $mode > $Q/pf.txt 2>&1
  echo "nice=$n ${mode:-listeners} $(tail -1 $Q/pf.txt | jq -c '{up:.update_latency_ms, cat:.latency_all_catch_alls_ms.p99, own:.latency_owner_ms.p99, pass:.passed, cpu:.cpu_percent.server}') load=$(la)"; stop; done; done ;;
pg) for r in 1 2; do for m in create update; do baton $m
  createdb -h 127.0.0.1 -U postgres $DB
  baton $m BATON_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB?sslmode=disable
  dropdb -h 127.0.0.1 -U postgres $DB; done; done ;;
pgab) for r in 1 2; do for m in create update; do baton $m
  for b in $OLD $BIN; do createdb -h 127.0.0.1 -U postgres $DB
  SERVE_BIN=$b baton $m BATON_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB?sslmode=disable
  dropdb -h 127.0.0.1 -U postgres $DB; done; done; done ;;
sync) for r in 1 2; do baton create BATON_STORE__SYNCHRONOUS=full; baton create BATON_STORE__SYNCHRONOUS=normal; done ;;
linger) for l in ${@:2}; do start $P1 $Q/f BATON_HUB__FANOUT_LINGER_MS=$l $EXTRA
  $BIN/baton-fanout websocket --base http://127.0.0.1:$P1/fhir --server-pid $S --owners 10000 --catch-all 100 --rate 500 --duration 30s --idle 2s --settle 2s $MODE $FANOPT > $Q/pf.txt 2>&1
  commits=$(curl -s http://127.0.0.1:$P1/metrics | awk '/^baton_store_commit_seconds_(sum|count)|^baton_writer_groups_total|^baton_store_write_wait_seconds_(bucket|count)\{lane="request"/ {v[$1]=$2}
    END {printf "%d commits (mean %.2f ms), groups: %d requests only, %d with hub jobs, %d hub only; request waits over 5 ms: %.1f %%, over 10 ms: %.1f %%",
      v["baton_store_commit_seconds_count"], 1000*v["baton_store_commit_seconds_sum"]/v["baton_store_commit_seconds_count"],
      v["baton_writer_groups_total{lanes=\"requests\"}"], v["baton_writer_groups_total{lanes=\"both\"}"], v["baton_writer_groups_total{lanes=\"hub\"}"],
      100*(1-v["baton_store_write_wait_seconds_bucket{lane=\"request\",le=\"0.005\"}"]/v["baton_store_write_wait_seconds_count{lane=\"request\"}"]),
      100*(1-v["baton_store_write_wait_seconds_bucket{lane=\"request\",le=\"0.01\"}"]/v["baton_store_write_wait_seconds_count{lane=\"request\"}"])}')
  echo "linger=$l $EXTRA ${MODE:-listeners} $(tail -1 $Q/pf.txt | jq -c '{up:.update_latency_ms, cat:.latency_all_catch_alls_ms.p99, own:.latency_owner_ms.p99, pass:.passed, cpu:.cpu_percent.server}') $commits rows=$(sqlite3 $Q/f/baton.db 'SELECT count(*) FROM subscription_event') load=$(la)"; stop; done ;;
chunk) for c in ${@:2}; do start $P1 $Q/f BATON_HUB__FANOUT_CHUNK=$c
  $BIN/baton-fanout websocket --base http://127.0.0.1:$P1/fhir --server-pid $S --owners 10000 --catch-all 100 --rate 500 --duration 30s --idle 2s --settle 2s $MODE > $Q/pf.txt 2>&1
  echo "chunk=$c ${MODE:-listeners} $(tail -1 $Q/pf.txt | jq -c '{up:.update_latency_ms, cat:.latency_all_catch_alls_ms.p99, own:.latency_owner_ms.p99, pass:.passed, cpu:.cpu_percent.server}') load=$(la)"; stop; done ;;
esac
