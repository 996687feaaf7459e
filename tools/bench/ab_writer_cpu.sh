#!/bin/bash
# Task creates (or transactions, or updates with --mode update) on a fresh SQLite database per
# run, the builds in turn, ROUNDS times: tasks/s, p99, and the CPU time the writer thread
# (baton-sqlite-writer) and the whole server spent per stored Task version (a create or an
# update: the rows of task_version), read from /proc, and the load tool's own CPU per Task it
# sent. The CPU per Task is what an A/B on a shared machine can compare (BENCHMARKS.md, "The
# writer's CPU per Task"). Needs jq and sqlite3.
# PORT (default 18504) and RUN (the scratch dir, default /tmp/ab) let runs share a machine.
#   tools/bench/ab_writer_cpu.sh 2 "old:/tmp/baton-old new:target/release/baton" --mode create
R=$1; SERVERS=$2; shift 2
L=${LOAD:-target/release/baton-load}
P=${PORT:-18504}; D=${RUN:-/tmp/ab}
ticks() { local t; for t in /proc/$1/task/*; do if grep -q "$2" $t/comm 2>/dev/null; then awk '{print $14+$15}' $t/stat; fi; done | awk '{s+=$1} END {print s+0}'; }
for i in $(seq 1 $R); do for sv in $SERVERS; do name=${sv%%:*}; bin=${sv#*:}
rm -rf $D && mkdir -p $D; BATON_JWT_SECRET=bench-secret-0123456789abcdef0123456789 BATON_LIMITS__REQUESTS_PER_SECOND_PER_TOKEN=0 BATON_LISTEN=127.0.0.1:$P BATON_DATA_DIR=$D BATON_DATABASE_URL=sqlite://$D/baton.db $bin serve > $D/log 2>&1 & S=$!; sleep 1.5
T=$(BATON_JWT_SECRET=bench-secret-0123456789abcdef0123456789 $bin token --role admin 2>/dev/null)
w0=$(ticks $S baton-sqlite-wr); a0=$(ticks $S .)
out=$($L tasks --base http://127.0.0.1:$P/fhir --server-pid $S --token "$T" --concurrency 16 --duration 10s "$@" 2>&1 | grep -E '^\{')
w1=$(ticks $S baton-sqlite-wr); a1=$(ticks $S .)
n=$(sqlite3 $D/baton.db 'select count(*) from task_version' 2>/dev/null)
echo "$i $name $(echo $out | jq -c '{tasks:.tasks_per_s,p99:.latency_ms.p99,cpu:.cpu_percent.server,load_us_per_task:((.cpu_percent.load*.duration_s*10000/.tasks_written)|floor),err:.errors}') tasks=$n writer_us_per_task=$(( (w1-w0)*10000/n )) server_us_per_task=$(( (a1-a0)*10000/n )) at=$(date -u +%H:%M:%S) load=$(cut -d' ' -f1 /proc/loadavg)"
kill $S; wait $S 2>/dev/null; done; done
