#!/bin/bash
# The work-list searches (issue 16) on a copy of a seeded database per build, the builds in
# turn, ROUNDS times: per query alone and the mix of six at 16 clients, req/s, the largest
# p99, and the server's CPU per search (utime + stime from /proc over the run ÷ requests),
# which an A/B on a shared machine can compare (BENCHMARKS.md, "the server's CPU per search").
# DB is a database written by examples/seed_work_lists with its outbox_cursor at the last seq;
# N its number of Tasks. READS is audit.reads (true is the shipping default). Needs jq.
#   DB=/work/wl-data/wl200k.db N=200000 tools/bench/ab_search_cpu.sh 3 "old:/tmp/baton-old new:target/release/baton" false
R=$1; SERVERS=$2; READS=${3:-false}; shift 3
QS=${*:-"owner role-queue requested due patient all mix"}
L=${LOAD:-target/release/baton-load}
N=${N:-200000}; RUN=${RUN:-/tmp/ab-search}
export BATON_JWT_SECRET=bench-secret-0123456789abcdef0123456789
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
for i in $(seq 1 $R); do for sv in $SERVERS; do name=${sv%%:*}; bin=${sv#*:}
  rm -rf $RUN && mkdir -p $RUN && cp $DB $RUN/baton.db
  BATON_AUDIT__READS=$READS BATON_LISTEN=127.0.0.1:18611 BATON_DATA_DIR=$RUN \
    BATON_DATABASE_URL=sqlite://$RUN/baton.db $bin serve > $RUN/log 2>&1 & S=$!
  for k in $(seq 1 100); do curl -sf http://127.0.0.1:18611/readyz >/dev/null && break; sleep 0.2; done
  B="$L search --base http://127.0.0.1:18611/fhir --server-pid $S --skip-seed --seed $N --concurrency 16"
  $B --duration 3s --warmup 0s > /dev/null 2>&1   # warm the pages and statements
  for q in $QS; do
    if [ $q = mix ]; then qa=""; else qa="--queries $q"; fi
    c0=$(ticks $S)
    out=$($B --duration 10s --warmup 0s $qa 2>&1 | grep -E '^\{')
    c1=$(ticks $S)
    echo "$i $name reads=$READS $q $(echo "$out" | jq -c --argjson c $(( (c1-c0)*10000 )) '{req:.requests, rps:.requests_per_s, p99:([.queries[].latency_ms.p99]|max), us_per_req:(($c/.requests)|floor), srv:.cpu_percent.server, err:.errors, pass:.passed}') load=$(cut -d' ' -f1-3 /proc/loadavg)"
  done
  kill $S; wait $S 2>/dev/null
done; done
