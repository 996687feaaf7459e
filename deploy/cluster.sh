#!/usr/bin/env bash
# Runs an N-node Baton cluster on this machine, without Docker, against local services:
# PostgreSQL (required), Redis (signals; nodes fall back to polling without it) and
# RabbitMQ (optional: the AMQP channel is enabled when its port answers).
#
#   deploy/cluster.sh start [-n N] [--base-port P] [--db NAME] [--prefix PREFIX]
#                           [--binary PATH] [--run-dir DIR] [--wait SECONDS]
#   deploy/cluster.sh stop [--run-dir DIR]
#   deploy/cluster.sh status [--run-dir DIR]
#   deploy/cluster.sh stop-node K [--run-dir DIR]
#   deploy/cluster.sh start-node K [--run-dir DIR] [--wait SECONDS]
#   deploy/cluster.sh restart-node K [--run-dir DIR] [--wait SECONDS]
#   deploy/cluster.sh drop-db [--db NAME] [--run-dir DIR]
#
# start refuses while any node of RUN_DIR is alive; the other nodes keep running through
# stop-node, start-node and restart-node (SIGTERM, wait for the drain, start again). A node
# (re)started alone gets the settings `start` recorded in RUN_DIR/cluster.env: binary,
# database, Redis, AMQP, prefix, the BATON_* and RUST_LOG variables passed through then, and
# its own port (base port + K - 1), data dir and node id (node-K), so it takes straight back
# what it held. A K beyond -n adds a node. start-node appends to node-K.log.
#
# Defaults: -n 3, --base-port 8081 (nodes on 8081, 8082, ...), --db baton_cluster,
# --prefix baton-cluster, --binary target/release/baton (else target/debug/baton),
# --run-dir target/cluster (node-K.log, previous run's node-K.log.1, node-K.pid, node-K/
# data dirs), --wait 60.
# Options also take the --option=value form. Works from any directory.
#
# Environment (all optional):
#   BATON_JWT_SECRET   shared token key; otherwise one is generated into RUN_DIR/jwt-secret.
#                      Yours is never written to disk: export the same one for start-node.
#   BATON_REDIS_URL    default redis://127.0.0.1:6379
#   BATON_AMQP_URL     default amqp://guest:guest@127.0.0.1:5672/%2f when that port is open
#   CLUSTER_PG_HOST, CLUSTER_PG_PORT, CLUSTER_PG_USER
#                      default 127.0.0.1, 5432, and `postgres` (or the current user when
#                      `postgres` cannot log in); trust authentication is assumed
# Any other BATON_* variable (RUST_LOG too) is passed through to every node, e.g.
# BATON_ALLOW_HTTP_ENDPOINTS=true BATON_ALLOW_PRIVATE_ENDPOINTS=true for local rest-hooks.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
PROG=$(basename "$0")

NODES=3
BASE_PORT=8081
DB_NAME=baton_cluster
PREFIX=baton-cluster
BINARY=
RUN_DIR=$REPO_ROOT/target/cluster
WAIT_SECONDS=60
# Baton drains for shutdown_grace_seconds (10 by default) after SIGTERM.
STOP_SECONDS=20

PG_HOST=${CLUSTER_PG_HOST:-127.0.0.1}
PG_PORT=${CLUSTER_PG_PORT:-5432}
PG_USER=${CLUSTER_PG_USER:-}

usage() {
    sed -n '2,/^set -euo pipefail$/{/^set /d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

die() {
    echo "$PROG: $*" >&2
    exit 1
}

need_value() {
    [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"
}

is_number() {
    [[ $1 =~ ^[0-9]+$ ]]
}

# Parses the options shared by all commands; the command says which ones it accepts.
parse_options() {
    local allowed=$1
    shift
    while [[ $# -gt 0 ]]; do
        local opt=$1 value=
        if [[ $opt == --*=* ]]; then
            value=${opt#*=}
            opt=${opt%%=*}
            set -- "$opt" "$value" "${@:2}"
        fi
        case $opt in
            -h | --help)
                usage
                exit 0
                ;;
        esac
        [[ " $allowed " == *" $opt "* ]] || die "unknown option for this command: $opt (see $PROG --help)"
        need_value "$@"
        case $opt in
            -n | --nodes) NODES=$2 ;;
            --base-port) BASE_PORT=$2 ;;
            --db) DB_NAME=$2 ;;
            --prefix) PREFIX=$2 ;;
            --binary) BINARY=$2 ;;
            --run-dir) RUN_DIR=$2 ;;
            --wait) WAIT_SECONDS=$2 ;;
        esac
        shift 2
    done
    if ! is_number "$NODES" || ((NODES < 1 || NODES > 100)); then
        die "-n must be a number from 1 to 100, got '$NODES'"
    fi
    if ! is_number "$BASE_PORT" || ((BASE_PORT < 1 || BASE_PORT + NODES - 1 > 65535)); then
        die "--base-port must be a port number leaving room for $NODES nodes, got '$BASE_PORT'"
    fi
    is_number "$WAIT_SECONDS" || die "--wait must be a number of seconds, got '$WAIT_SECONDS'"
    # Used unquoted in SQL and URLs: keep it to a plain identifier.
    [[ $DB_NAME =~ ^[a-z_][a-z0-9_]{0,62}$ ]] ||
        die "--db must be a lower-case identifier (letters, digits, _), got '$DB_NAME'"
    [[ $PREFIX =~ ^[A-Za-z0-9._:-]+$ ]] || die "--prefix may hold letters, digits and . _ : - only, got '$PREFIX'"
    # Absolute, so that pid files and node data dirs do not depend on the caller's cwd.
    [[ $RUN_DIR == /* ]] || RUN_DIR=$PWD/$RUN_DIR
    if [[ -n $BINARY && $BINARY != /* ]]; then BINARY=$PWD/$BINARY; fi
    return 0
}

# ---- PostgreSQL ---------------------------------------------------------------------------

psql_as() {
    psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$1" -d postgres "${@:2}"
}

# Picks the role to connect as: CLUSTER_PG_USER, else postgres, else the current user.
pick_pg_user() {
    command -v psql >/dev/null || die "psql not found (apt install postgresql-client)"
    if [[ -n $PG_USER ]]; then
        psql_as "$PG_USER" -Atc 'SELECT 1' >/dev/null ||
            die "cannot connect to PostgreSQL at $PG_HOST:$PG_PORT as $PG_USER (CLUSTER_PG_USER)"
        return 0
    fi
    local candidate
    for candidate in postgres "$(id -un)"; do
        if psql_as "$candidate" -Atc 'SELECT 1' >/dev/null 2>&1; then
            PG_USER=$candidate
            return 0
        fi
    done
    die "cannot connect to PostgreSQL at $PG_HOST:$PG_PORT as postgres or $(id -un) (trust authentication expected; set CLUSTER_PG_USER)"
}

pg() {
    psql_as "$PG_USER" "$@"
}

database_exists() {
    local found
    found=$(pg -Atc "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'") ||
        die "cannot query PostgreSQL at $PG_HOST:$PG_PORT as $PG_USER"
    [[ $found == 1 ]]
}

create_database() {
    pick_pg_user
    if database_exists; then
        echo "database $DB_NAME exists"
    else
        pg -c "CREATE DATABASE \"$DB_NAME\""
        echo "created database $DB_NAME"
    fi
}

# ---- processes ----------------------------------------------------------------------------

port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# The pid recorded for node K, if that process is alive.
recorded_pid() {
    local file=$RUN_DIR/node-$1.pid pid
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    is_number "$pid" && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

# Prints the pid recorded for node K when that process is alive and is a Baton server; a
# recorded pid that now belongs to something else is ignored, never signalled.
live_pid() {
    local file=$RUN_DIR/node-$1.pid pid
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    is_number "$pid" || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r /proc/$pid/cmdline ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'baton' || return 1
    fi
    echo "$pid"
}

# The node numbers that have a pid file in RUN_DIR, in order.
known_nodes() {
    local file
    for file in "$RUN_DIR"/node-*.pid; do
        [[ -e $file ]] || continue
        file=${file##*/node-}
        echo "${file%.pid}"
    done | sort -n
}

node_port() {
    cat "$RUN_DIR/node-$1.port" 2>/dev/null || echo "?"
}

readyz() {
    curl -sS --max-time 2 -o "$2" -w '%{http_code}' "http://127.0.0.1:$1/readyz" 2>/dev/null || true
}

stop_nodes() {
    local k pid pids=()
    for k in $(known_nodes); do
        if pid=$(live_pid "$k"); then
            echo "node-$k: stopping (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        else
            echo "node-$k: not running"
        fi
    done
    local deadline=$((SECONDS + STOP_SECONDS)) left
    while ((${#pids[@]} > 0)); do
        left=()
        for pid in "${pids[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then left+=("$pid"); fi
        done
        pids=("${left[@]}")
        ((${#pids[@]} > 0)) || break
        if ((SECONDS >= deadline)); then
            echo "still running after ${STOP_SECONDS}s, killing: ${pids[*]}"
            kill -KILL "${pids[@]}" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$RUN_DIR"/node-*.pid "$RUN_DIR"/node-*.port
}

# ---- commands -----------------------------------------------------------------------------

# Settings `start` records for the nodes, and start-node reads back.
CLUSTER_VARS=(BINARY NODES BASE_PORT DB_NAME PREFIX DATABASE_URL REDIS_URL AMQP_URL SECRET_FROM_ENV SECRET_SHA PASS_ENV)

# The variables a node gets from this script; every other BATON_* is passed through.
node_variable() {
    case $1 in
        BATON_LISTEN | BATON_PUBLIC_URL | BATON_DATA_DIR | BATON_DATABASE_URL | BATON_REDIS_URL | \
            BATON_JWT_SECRET | BATON_CLUSTER__NODE_ID | BATON_CLUSTER__REDIS_PREFIX | BATON_AMQP_URL) return 0 ;;
    esac
    return 1
}

secret_sha() {
    printf '%s' "$1" | sha256sum | cut -d' ' -f1
}

write_cluster_env() {
    local name
    PASS_ENV=()
    while IFS= read -r name; do
        node_variable "$name" || PASS_ENV+=("$name=${!name}")
    done < <(compgen -e | grep -E '^(BATON_[A-Z0-9_]+|RUST_LOG)$' || true)
    # Mode 0600: passed-through variables may hold passwords. The token key is not in it.
    # declare -g: read_cluster_env sources it inside a function.
    (umask 077 && declare -p "${CLUSTER_VARS[@]}" | sed 's/^declare /declare -g /' >"$RUN_DIR/cluster.env")
}

read_cluster_env() {
    [[ -f $RUN_DIR/cluster.env ]] ||
        die "no cluster was started from $RUN_DIR (no cluster.env): $PROG start first"
    # shellcheck disable=SC1091 # written by write_cluster_env
    source "$RUN_DIR/cluster.env"
}

# The token key the nodes share, as `start` chose it (SECRET_FROM_ENV, SECRET_SHA).
cluster_secret() {
    if [[ $SECRET_FROM_ENV == 1 ]]; then
        [[ -n ${BATON_JWT_SECRET:-} ]] ||
            die "this cluster was started with your BATON_JWT_SECRET: export the same one"
        [[ $(secret_sha "$BATON_JWT_SECRET") == "$SECRET_SHA" ]] ||
            die "BATON_JWT_SECRET differs from the one this cluster was started with"
        printf '%s' "$BATON_JWT_SECRET"
    else
        [[ -s $RUN_DIR/jwt-secret ]] || die "$RUN_DIR/jwt-secret is missing"
        cat "$RUN_DIR/jwt-secret"
    fi
}

# Starts node K in the background with the cluster's settings and records its pid and port.
launch_node() {
    local k=$1 secret=$2 port=$((BASE_PORT + $1 - 1))
    local data=$RUN_DIR/node-$k log=$RUN_DIR/node-$k.log
    mkdir -p "$data"
    echo "=== $(date '+%F %T') start node-$k on 127.0.0.1:$port" >>"$log"
    # setsid: the nodes outlive this script and ignore a Ctrl-C typed while it waits.
    # Run from the repository root, like `cargo run`, so config/baton.toml applies.
    # env -u: no AMQP unless the cluster has it, whatever this shell exports.
    (
        cd "$REPO_ROOT"
        exec env -u BATON_AMQP_URL "${PASS_ENV[@]}" \
            BATON_LISTEN="127.0.0.1:$port" \
            BATON_PUBLIC_URL="http://127.0.0.1:$port/fhir" \
            BATON_DATA_DIR="$data" \
            BATON_DATABASE_URL="$DATABASE_URL" \
            BATON_REDIS_URL="$REDIS_URL" \
            BATON_JWT_SECRET="$secret" \
            BATON_CLUSTER__NODE_ID="node-$k" \
            BATON_CLUSTER__REDIS_PREFIX="$PREFIX" \
            ${AMQP_URL:+"BATON_AMQP_URL=$AMQP_URL"} \
            setsid "$BINARY" serve </dev/null >>"$log" 2>&1
    ) &
    echo "$!" >"$RUN_DIR/node-$k.pid"
    echo "$port" >"$RUN_DIR/node-$k.port"
}

# Waits until node K's /readyz answers 200 (deadline in SECONDS) and prints its body; fails
# with the end of its log when it exits or the deadline passes.
wait_ready() {
    local k=$1 deadline=$2 port body=$RUN_DIR/.readyz-$1 code
    port=$(node_port "$k")
    while :; do
        code=$(readyz "$port" "$body")
        [[ $code == 200 ]] && break
        if ! recorded_pid "$k" >/dev/null; then
            echo "node-$k exited; the end of $RUN_DIR/node-$k.log:" >&2
            tail -n 20 "$RUN_DIR/node-$k.log" >&2
            rm -f "$body"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "node-$k not ready after ${WAIT_SECONDS}s (last /readyz: ${code:-no answer}); see $RUN_DIR/node-$k.log" >&2
            tail -n 20 "$RUN_DIR/node-$k.log" >&2
            rm -f "$body"
            return 1
        fi
        sleep 0.5
    done
    echo "node-$k ready: http://127.0.0.1:$port/fhir   $(<"$body")"
    rm -f "$body"
}

cmd_start() {
    parse_options "-n --nodes --base-port --db --prefix --binary --run-dir --wait" "$@"

    if [[ -z $BINARY ]]; then
        if [[ -x $REPO_ROOT/target/release/baton ]]; then
            BINARY=$REPO_ROOT/target/release/baton
        else
            BINARY=$REPO_ROOT/target/debug/baton
        fi
    fi
    [[ -x $BINARY ]] || die "no Baton binary at $BINARY (cargo build --release, or --binary PATH)"
    command -v curl >/dev/null || die "curl not found"

    mkdir -p "$RUN_DIR"
    local k
    for k in $(known_nodes); do
        if live_pid "$k" >/dev/null; then
            die "a cluster is already running from $RUN_DIR ($PROG stop first, or $PROG restart-node K for one node)"
        fi
    done
    rm -f "$RUN_DIR"/node-*.pid "$RUN_DIR"/node-*.port
    for ((k = 1; k <= NODES; k++)); do
        if port_open 127.0.0.1 $((BASE_PORT + k - 1)); then
            die "port $((BASE_PORT + k - 1)) is in use (choose --base-port)"
        fi
    done

    create_database
    DATABASE_URL="postgres://$PG_USER@$PG_HOST:$PG_PORT/$DB_NAME"

    REDIS_URL=${BATON_REDIS_URL:-redis://127.0.0.1:6379}
    if [[ -z ${BATON_REDIS_URL:-} ]] && ! port_open 127.0.0.1 6379; then
        echo "warning: Redis does not answer on 127.0.0.1:6379; nodes will fall back to polling" >&2
    fi
    AMQP_URL=${BATON_AMQP_URL:-}
    if [[ -z $AMQP_URL ]] && port_open 127.0.0.1 5672; then
        AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2f'
    fi

    # The shared token key: yours from the environment (never written to disk), else the
    # one generated into RUN_DIR/jwt-secret by an earlier start, else a new one.
    local secret_file=$RUN_DIR/jwt-secret secret token_cmd
    if [[ -n ${BATON_JWT_SECRET:-} ]]; then
        secret=$BATON_JWT_SECRET
        SECRET_FROM_ENV=1
        token_cmd="$BINARY token --role admin    # with the BATON_JWT_SECRET you exported"
    else
        if [[ ! -s $secret_file ]]; then
            (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$secret_file")
        fi
        secret=$(<"$secret_file")
        SECRET_FROM_ENV=0
        token_cmd="BATON_JWT_SECRET=\$(cat $secret_file) $BINARY token --role admin"
    fi
    SECRET_SHA=$(secret_sha "$secret")
    write_cluster_env

    echo "starting $NODES node(s) of $BINARY"
    echo "  database $DATABASE_URL, redis $REDIS_URL (prefix $PREFIX), amqp ${AMQP_URL:-off}"
    local log
    for ((k = 1; k <= NODES; k++)); do
        log=$RUN_DIR/node-$k.log
        if [[ -f $log ]]; then mv -f "$log" "$log.1"; fi
        launch_node "$k" "$secret"
    done

    local deadline=$((SECONDS + WAIT_SECONDS))
    for ((k = 1; k <= NODES; k++)); do
        if ! wait_ready "$k" "$deadline"; then
            stop_nodes >/dev/null
            exit 1
        fi
    done

    cat <<EOF

Cluster of $NODES node(s) running from $RUN_DIR (logs: node-K.log).
An admin token, valid on every node:
  $token_cmd
Status and stop: $0 status|stop --run-dir $RUN_DIR
One node:        $0 restart-node|stop-node|start-node K --run-dir $RUN_DIR
EOF
}

# The node number the node commands take first.
node_number() {
    if ! [[ $# -ge 1 && $1 =~ ^[0-9]{1,3}$ ]] || ((10#$1 < 1 || 10#$1 > 100)); then
        die "$COMMAND needs a node number from 1 to 100 first, e.g. $PROG $COMMAND 2"
    fi
    echo "$((10#$1))"
}

# SIGTERM to node K, then waits for its drain (SIGKILL after STOP_SECONDS). Its pid and
# port files stay, so that status lists it as not running.
stop_one() {
    local k=$1 pid
    if ! pid=$(live_pid "$k"); then
        echo "node-$k: not running"
        return 0
    fi
    echo "node-$k: stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_SECONDS))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "node-$k: still running after ${STOP_SECONDS}s, killing pid $pid"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    echo "node-$k: stopped"
}

# Starts node K alone with the recorded settings (read_cluster_env first) and waits for it.
start_one() {
    local k=$1 port=$((BASE_PORT + $1 - 1)) secret
    if live_pid "$k" >/dev/null; then die "node-$k is already running ($PROG restart-node $k)"; fi
    ((port <= 65535)) || die "node-$k would need port $port"
    if port_open 127.0.0.1 "$port"; then die "port $port of node-$k is in use"; fi
    secret=$(cluster_secret) || exit 1
    launch_node "$k" "$secret"
    if ! wait_ready "$k" $((SECONDS + WAIT_SECONDS)); then
        stop_one "$k" >/dev/null
        exit 1
    fi
}

# What start-node and restart-node check before touching a node.
check_can_start() {
    read_cluster_env
    [[ -x $BINARY ]] || die "no Baton binary at $BINARY (the one this cluster was started with)"
    cluster_secret >/dev/null || exit 1
}

cmd_stop_node() {
    local k
    k=$(node_number "$@") || exit 1
    parse_options "--run-dir" "${@:2}"
    [[ -f $RUN_DIR/node-$k.pid ]] || die "no node-$k in $RUN_DIR"
    stop_one "$k"
}

cmd_start_node() {
    local k
    k=$(node_number "$@") || exit 1
    parse_options "--run-dir --wait" "${@:2}"
    check_can_start
    start_one "$k"
}

cmd_restart_node() {
    local k
    k=$(node_number "$@") || exit 1
    parse_options "--run-dir --wait" "${@:2}"
    [[ -f $RUN_DIR/node-$k.pid ]] || die "no node-$k in $RUN_DIR ($PROG start-node $k adds one)"
    # Checked first, so that a node that could not be started again is left running.
    check_can_start
    stop_one "$k"
    start_one "$k"
}

cmd_stop() {
    parse_options "--run-dir" "$@"
    [[ -d $RUN_DIR ]] || {
        echo "nothing to stop: $RUN_DIR does not exist"
        return 0
    }
    if [[ -z $(known_nodes) ]]; then
        echo "nothing to stop in $RUN_DIR"
        return 0
    fi
    stop_nodes
}

cmd_status() {
    parse_options "--run-dir" "$@"
    local k pid port code body=$RUN_DIR/.status all_ready=1 any=0
    for k in $(known_nodes); do
        any=1
        port=$(node_port "$k")
        if pid=$(live_pid "$k"); then
            code=$(readyz "$port" "$body")
            if [[ $code == 200 ]]; then
                echo "node-$k: running, pid $pid, http://127.0.0.1:$port/fhir, ready $(<"$body")"
            else
                all_ready=0
                echo "node-$k: running, pid $pid, http://127.0.0.1:$port/fhir, NOT ready (/readyz: ${code:-no answer})"
            fi
        else
            all_ready=0
            echo "node-$k: not running (port $port; see $RUN_DIR/node-$k.log)"
        fi
    done
    rm -f "$body"
    if ((any == 0)); then
        echo "no cluster in $RUN_DIR"
        return 1
    fi
    ((all_ready == 1))
}

cmd_drop_db() {
    parse_options "--db --run-dir" "$@"
    local k
    for k in $(known_nodes 2>/dev/null); do
        if live_pid "$k" >/dev/null; then die "nodes are running from $RUN_DIR; $PROG stop first"; fi
    done
    pick_pg_user
    if database_exists; then
        pg -c "DROP DATABASE \"$DB_NAME\""
        echo "dropped database $DB_NAME"
    else
        echo "database $DB_NAME does not exist"
    fi
}

main() {
    [[ $# -ge 1 ]] || {
        usage >&2
        exit 2
    }
    COMMAND=$1
    shift
    case $COMMAND in
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        status) cmd_status "$@" ;;
        stop-node) cmd_stop_node "$@" ;;
        start-node) cmd_start_node "$@" ;;
        restart-node) cmd_restart_node "$@" ;;
        drop-db) cmd_drop_db "$@" ;;
        -h | --help | help) usage ;;
        *)
            echo "$PROG: unknown command '$COMMAND'" >&2
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
