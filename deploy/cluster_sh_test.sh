#!/usr/bin/env bash
# Exercises deploy/cluster.sh for real: a 2-node cluster, restart-node, stop-node, status,
# start-node (settings kept), and the refusals. Needs PostgreSQL (127.0.0.1:5432, trust) and
# a built binary (default target/debug/baton; BINARY=... to choose). Redis is optional.
# Under CI=true a missing PostgreSQL fails; otherwise the test is skipped with the reason.
#
#   deploy/cluster_sh_test.sh
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
CLUSTER=$SCRIPT_DIR/cluster.sh
BINARY=${BINARY:-$REPO_ROOT/target/debug/baton}
RUN_DIR=$(mktemp -d)
DB=baton_cluster_sh_test
BASE_PORT=18381
OPTS=(--run-dir "$RUN_DIR")

fail() {
    echo "cluster_sh_test: FAIL: $*" >&2
    for log in "$RUN_DIR"/node-*.log; do
        [[ -f $log ]] && { echo "--- $log" >&2; tail -n 15 "$log" >&2; }
    done
    exit 1
}

if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
    if [[ ${CI:-} == true ]]; then fail "PostgreSQL does not answer on 127.0.0.1:5432"; fi
    echo "cluster_sh_test: skipped: PostgreSQL does not answer on 127.0.0.1:5432"
    exit 0
fi
[[ -x $BINARY ]] || fail "no binary at $BINARY (cargo build --bin baton)"

cleanup() {
    "$CLUSTER" stop "${OPTS[@]}" >/dev/null 2>&1 || true
    "$CLUSTER" drop-db --db "$DB" "${OPTS[@]}" >/dev/null 2>&1 || true
    rm -rf "$RUN_DIR"
}
trap cleanup EXIT

pid_of() { cat "$RUN_DIR/node-$1.pid"; }
ready() { [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$((BASE_PORT + $1 - 1))/readyz") == 200 ]]; }

echo "== start -n 2"
"$CLUSTER" drop-db --db "$DB" "${OPTS[@]}" >/dev/null
BATON_LOG_FORMAT=json "$CLUSTER" start -n 2 --base-port "$BASE_PORT" --db "$DB" \
    --prefix cluster-sh-test --binary "$BINARY" "${OPTS[@]}" >/dev/null || fail "start"
{ ready 1 && ready 2; } || fail "nodes not ready after start"

echo "== start again is refused while nodes run"
if "$CLUSTER" start -n 2 --base-port "$BASE_PORT" --db "$DB" --binary "$BINARY" "${OPTS[@]}" 2>/dev/null; then
    fail "a second start was accepted"
fi

echo "== restart-node 2"
one=$(pid_of 1) two=$(pid_of 2)
"$CLUSTER" restart-node 2 "${OPTS[@]}" >/dev/null || fail "restart-node 2"
[[ $(pid_of 2) != "$two" ]] || fail "node-2 has the same pid after restart-node"
kill -0 "$two" 2>/dev/null && fail "the old node-2 ($two) still runs"
{ [[ $(pid_of 1) == "$one" ]] && kill -0 "$one"; } || fail "node-1 did not keep running"
{ ready 1 && ready 2; } || fail "nodes not ready after restart-node"
tr '\0' '\n' <"/proc/$(pid_of 2)/environ" | grep -qx 'BATON_LOG_FORMAT=json' ||
    fail "the restarted node lost a variable passed through at start"
tr '\0' '\n' <"/proc/$(pid_of 2)/environ" | grep -qx 'BATON_CLUSTER__NODE_ID=node-2' ||
    fail "the restarted node has another node id"

echo "== stop-node 2, status, start-node 2"
"$CLUSTER" stop-node 2 "${OPTS[@]}" >/dev/null || fail "stop-node 2"
ready 1 || fail "node-1 not ready while node-2 is stopped"
if status=$("$CLUSTER" status "${OPTS[@]}"); then fail "status exit 0 with node-2 stopped"; fi
grep -q '^node-2: not running' <<<"$status" || fail "status does not show node-2 stopped: $status"
"$CLUSTER" start-node 2 "${OPTS[@]}" >/dev/null || fail "start-node 2"
ready 2 || fail "node-2 not ready after start-node"
"$CLUSTER" status "${OPTS[@]}" >/dev/null || fail "status not 0 with every node ready"
if "$CLUSTER" start-node 2 "${OPTS[@]}" 2>/dev/null; then fail "start-node of a running node"; fi
if "$CLUSTER" restart-node 3 "${OPTS[@]}" 2>/dev/null; then fail "restart-node of an unknown node"; fi
if "$CLUSTER" stop-node x "${OPTS[@]}" 2>/dev/null; then fail "stop-node x accepted"; fi

echo "== stop"
"$CLUSTER" stop "${OPTS[@]}" >/dev/null || fail "stop"
kill -0 "$one" 2>/dev/null && fail "node-1 still runs after stop"
echo "cluster_sh_test: ok"
