#!/bin/bash
# The PostgreSQL backends' CPU per Task update, split by what each backend last ran (BENCHMARKS.md,
# "(ninth sitting): a PostgreSQL update without its read"): "read" = the serving pool's Task reads,
# "group" / "one" = the group writers (PUT_TASKS / PUT_TASK), "other" = everything else; with the
# server's CPU per write and the transactions per write. A fresh database, C clients, 16 s
# (counted over 8 s after 5). PERF=1 also records the backends (perf.data in the scratch dir).
#   tools/bench/pg_backends.sh <release dir> [clients]   (env PORT, PGDB, OUT, PERF, EXTRA)
B=$1; C=${2:-64}; DB=${PGDB:-bench_backends}; P=${PORT:-18350}
export BATON_JWT_SECRET=bench-secret-0123456789abcdef0123456789
ulimit -n 20000
dropdb -h 127.0.0.1 -U postgres --if-exists $DB; createdb -h 127.0.0.1 -U postgres $DB
D=${OUT:-/tmp/pg_backends}; rm -rf $D; mkdir -p $D
env BATON_LIMITS__REQUESTS_PER_SECOND_PER_TOKEN=0 BATON_LIMITS__MAX_CONNECTIONS_PER_CLIENT=0 BATON_LISTEN=127.0.0.1:$P BATON_DATA_DIR=$D \
  BATON_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB?sslmode=disable" $EXTRA $B/baton serve > $D/log 2>&1 & S=$!
for i in $(seq 1 50); do curl -sf http://127.0.0.1:$P/readyz >/dev/null && break; sleep 0.2; done
$B/baton-load tasks --base http://127.0.0.1:$P/fhir --server-pid $S --concurrency $C --duration 16s --mode update > $D/load.txt 2>&1 & L=$!
sleep 5
snap() { psql -h 127.0.0.1 -U postgres -AtF' ' -c "SELECT pid, CASE WHEN query LIKE 'WITH input%' THEN 'group' WHEN query LIKE 'SELECT t.id%' THEN 'read' WHEN query LIKE 'WITH task_row%' THEN 'one' ELSE 'other' END FROM pg_stat_activity WHERE datname='$DB'" | while read pid k; do echo "$pid $k $(cut -d' ' -f14,15 /proc/$pid/stat 2>/dev/null)"; done; }
x0=$(psql -h 127.0.0.1 -U postgres -Atc "select xact_commit from pg_stat_database where datname='$DB'")
s0=$(cut -d' ' -f14,15 /proc/$S/stat)
snap > $D/a
if [ -n "$PERF" ]; then pids=$(psql -h 127.0.0.1 -U postgres -Atc "SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE datname='$DB'"); perf record -F 999 -g -o $D/perf.data -p $pids -- sleep 8 2>/dev/null >/dev/null; else sleep 8; fi
snap > $D/b
x1=$(psql -h 127.0.0.1 -U postgres -Atc "select xact_commit from pg_stat_database where datname='$DB'")
s1=$(cut -d' ' -f14,15 /proc/$S/stat)
wait $L; kill $S; wait $S 2>/dev/null
r=$(tail -1 $D/load.txt | jq .tasks_per_s)
echo "rate=$r load=$(cut -d' ' -f1-3 /proc/loadavg) xacts_per_write=$(echo "($x1-$x0)/($r*8)" | bc -l | cut -c1-5) server_ms=$(echo $s0 $s1 | awk -v r=$r '{print (($3+$4)-($1+$2))*10/(r*8)}')"
join <(sort $D/a) <(sort $D/b) | awk -v r=$r '{k=$5; t[k]+=($6+$7)-($3+$4)} END {for (k in t) printf "  %s backends: %.3f ms/write\n", k, t[k]*10/(r*8)}'
dropdb -h 127.0.0.1 -U postgres $DB
