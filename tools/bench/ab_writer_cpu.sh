#!/bin/bash
# Task creates (or transactions) on a fresh SQLite database per run, the builds in turn, ROUNDS
# times: tasks/s, p99, and the CPU time the writer thread (baton-sqlite-writer) and the whole
# server spent per stored Task, read from /proc. The CPU per Task is what an A/B on a shared
# machine can compare (BENCHMARKS.md, "The writer's CPU per Task"). Needs jq and sqlite3.
# PORT (default 18504) and RUN (the scratch directory, default /tmp/ab) move it aside.
#   tools/bench/ab_writer_cpu.sh 2 "old:/tmp/baton-old new:target/release/baton" --mode create
R=$1; SERVERS=$2; shift 2
L=${LOAD:-target/release/baton-load}; PORT=${PORT:-18504}; RUN=${RUN:-/tmp/ab}
ticks() { local t; for t in /proc/$1/task/*; do if grep -q "$2" $t/comm 2>/dev/null; then awk '{print $14+$15}' $t/stat; fi; done | awk '{s+=$1} END {print s+0}'; }
for i in $(seq 1 $R); do for sv in $SERVERS; do name=${sv%%:*}; bin=${sv#*:}
rm -rf $RUN && mkdir -p $RUN; BATON_JWT_SECRET=bench-secret-0123456789abcdef0123456789 BATON_LIMITS__REQUESTS_PER_SECOND_PER_TOKEN=0 BATON_LISTEN=127.0.0.1:$PORT BATON_DATA_DIR=$RUN BATON_DATABASE_URL=sqlite://$RUN/baton.db $bin serve > $RUN/log 2>&1 & S=$!; sleep 1.5
T=$(BATON_JWT_SECRET=bench-secret-0123456789abcdef0123456789 $bin token --role admin 2>/dev/null)
w0=$(ticks $S baton-sqlite-wr); a0=$(ticks $S .)
out=$($L tasks --base http://127.0.0.1:$PORT/fhir --server-pid $S --token "$T" --concurrency 16 --duration 10s "$@" 2>&1 | grep -E '^\{')
w1=$(ticks $S baton-sqlite-wr); a1=$(ticks $S .)
n=$(sqlite3 $RUN/baton.db 'select count(*) from task' 2>/dev/null)
echo "$i $name $(echo $out | jq -c '{tasks:.tasks_per_s,p99:.latency_ms.p99,cpu:.cpu_percent.server,err:.errors}') tasks=$n writer_us_per_task=$(( (w1-w0)*10000/n )) server_us_per_task=$(( (a1-a0)*10000/n )) at=$(date -u +%H:%M:%S) load=$(cut -d' ' -f1 /proc/loadavg)"
kill $S; wait $S 2>/dev/null; done; done
