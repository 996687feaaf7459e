#!/bin/bash
# The work-list searches (issue 16) on ONE database file, builds or configurations in turn
# (SERVERS="name:binary[:ENV=V,ENV=V] ..."), ROUNDS times: per query alone or the mix at 16
# clients; req/s, the largest p99, the server's µs of CPU per search (utime + stime from /proc
# ÷ requests) and the load average. No copy per run: with READS=false nothing is written;
# with READS=true only AuditEvents are. Needs jq.
#   DB=/data/wl1m.db tools/bench/ab_search_env.sh 2 "mmap:target/release/baton:BATON_STORE__SEARCH_MMAP_MIB=1048576 cache:target/release/baton" true mix
R=$1; SERVERS=$2; READS=${3:-false}; shift 3
QS=${*:-"mix"}
L=${LOAD:-target/release/baton-load}
N=${N:-1000000}; DB=${DB:?a database written by examples/seed_work_lists}; DUR=${DUR:-10s}
export BATON_JWT_SECRET=bench-secret-0123456789abcdef0123456789
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
for i in $(seq 1 $R); do for sv in $SERVERS; do
  name=${sv%%:*}; rest=${sv#*:}; bin=${rest%%:*}; envs=""; [ "$rest" != "$bin" ] && envs=${rest#*:}
  ( IFS=,; for e in $envs; do export "$e"; done
    exec env BATON_AUDIT__READS=$READS BATON_LISTEN=127.0.0.1:${PORT:-19411} BATON_DATA_DIR=$(dirname $DB) \
    BATON_DATABASE_URL=sqlite://$DB $bin serve ) > ${RUN:-/tmp}/ab-search-env-$name.log 2>&1 & S=$!
  for k in $(seq 1 300); do curl -sf http://127.0.0.1:${PORT:-19411}/readyz >/dev/null && break; sleep 0.2; done
  B="$L search --base http://127.0.0.1:${PORT:-19411}/fhir --server-pid $S --skip-seed --seed $N --concurrency 16"
  $B --duration 3s --warmup 0s > /dev/null 2>&1
  for q in $QS; do
    if [ $q = mix ]; then qa=""; else qa="--queries $q"; fi
    c0=$(ticks $S)
    out=$($B --duration $DUR --warmup 0s $qa 2>&1 | grep -E '^\{')
    c1=$(ticks $S)
    echo "$i $name reads=$READS $q $(echo "$out" | jq -c --argjson c $(( (c1-c0)*10000 )) '{req:.requests, rps:.requests_per_s, each:(.queries|to_entries|map({(.key):(.value.requests_per_s|floor)})|add), p99:([.queries[].latency_ms.p99]|max), us:(($c/.requests)|floor), srv:.cpu_percent.server, err:.errors, pass:.passed}') load=$(cut -d' ' -f1-3 /proc/loadavg) $(date -u +%H:%M:%S)"
  done
  kill $S; wait $S 2>/dev/null
done; done
