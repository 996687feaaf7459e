#!/bin/bash
# WAL bytes per Task write (BENCHMARKS.md, issue 15, tenth sitting): a fresh database, DUR of
# 16-client creates (or updates) after the 2 s warm-up, then the WAL's size over the versions
# written (the WAL restarts only at 100 000 pages: keep DUR short, ckpt_seq must stay 0), and
# the payload per table (dbstat). BIN = a release dir with baton and baton-load; PORT, RUN.
#   tools/bench/wal_bytes.sh target/release create 1s
BIN=$1; MODE=${2:-create}; DUR=${3:-3s}; P=${PORT:-18506}; D=${RUN:-/tmp/wal}-$MODE
export BATON_JWT_SECRET=bench-secret-0123456789abcdef0123456789
rm -rf $D; mkdir -p $D
BATON_LIMITS__REQUESTS_PER_SECOND_PER_TOKEN=0 BATON_LIMITS__MAX_CONNECTIONS_PER_CLIENT=0 BATON_LISTEN=127.0.0.1:$P BATON_DATA_DIR=$D BATON_DATABASE_URL=sqlite://$D/baton.db $BIN/baton serve > $D/log 2>&1 & S=$!
sleep 1.5
T=$($BIN/baton token --role admin 2>/dev/null)
size0=$(stat -c %s $D/baton.db-wal); v0=$(sqlite3 $D/baton.db 'select count(*) from task_version')
$BIN/baton-load tasks --base http://127.0.0.1:$P/fhir --server-pid $S --token "$T" --concurrency 16 --duration $DUR --mode $MODE 2>&1 | tail -1 | jq -c '{r:.tasks_per_s,w:.tasks_written}'
sleep 0.3
ckseq=$(od -An -tu1 -j12 -N4 $D/baton.db-wal | awk '{print $1*16777216+$2*65536+$3*256+$4}')
size1=$(stat -c %s $D/baton.db-wal); v1=$(sqlite3 $D/baton.db 'select count(*) from task_version')
kill $S; wait $S 2>/dev/null
n=$((v1-v0))
echo "writes=$n wal_bytes0=$size0 wal_bytes=$size1 ckpt_seq=$ckseq bytes_per_write=$(( (size1-size0)/n )) frames_per_write=$(echo "scale=2; ($size1-$size0)/4120/$n" | bc)"
sqlite3 $D/baton.db "select name, sum(payload) as payload, sum(pgsize) as bytes, count(*) as pages from dbstat group by name order by bytes desc limit 30" 
