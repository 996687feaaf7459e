#!/usr/bin/env bash
# Runs an N-node Baton cluster on this machine, without Docker, against local services:
# PostgreSQL (required), Redis (signals; nodes fall back to polling without it) and
# RabbitMQ (optional: the AMQP channel is enabled when its port answers).
#
#   deploy/cluster.sh start [-n N] [--base-port P] [--db NAME] [--prefix PREFIX]
#                           [--binary PATH] [--run-dir DIR] [--wait SECONDS]
#   deploy/cluster.sh stop [--run-dir DIR]
#   deploy/cluster.sh status [--run-dir DIR]
#   deploy/cluster.sh drop-db [--db NAME] [--run-dir DIR]
#
# Defaults: -n 3, --base-port 8081 (nodes on 8081, 8082, ...), --db baton_cluster,
# --prefix baton-cluster, --binary target/release/baton (else target/debug/baton),
# --run-dir target/cluster (node-K.log, previous run's node-K.log.1, node-K.pid, node-K/
# data dirs), --wait 60.
# Options also take the --option=value form. Works from any directory.
#
# Environment (all optional):
#   BATON_JWT_SECRET   shared token key; otherwise one is generated into RUN_DIR/jwt-secret
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
        if live_pid "$k" >/dev/null; then die "a cluster is already running from $RUN_DIR ($PROG stop first)"; fi
    done
    rm -f "$RUN_DIR"/node-*.pid "$RUN_DIR"/node-*.port
    for ((k = 1; k <= NODES; k++)); do
        if port_open 127.0.0.1 $((BASE_PORT + k - 1)); then
            die "port $((BASE_PORT + k - 1)) is in use (choose --base-port)"
        fi
    done

    create_database
    local database_url="postgres://$PG_USER@$PG_HOST:$PG_PORT/$DB_NAME"

    local redis_url=${BATON_REDIS_URL:-redis://127.0.0.1:6379}
    if [[ -z ${BATON_REDIS_URL:-} ]] && ! port_open 127.0.0.1 6379; then
        echo "warning: Redis does not answer on 127.0.0.1:6379; nodes will fall back to polling" >&2
    fi
    local amqp_url=${BATON_AMQP_URL:-}
    if [[ -z $amqp_url ]] && port_open 127.0.0.1 5672; then
        amqp_url='amqp://guest:guest@127.0.0.1:5672/%2f'
    fi

    # The shared token key: yours from the environment (never written to disk), else the
    # one generated into RUN_DIR/jwt-secret by an earlier start, else a new one.
    local secret_file=$RUN_DIR/jwt-secret secret token_cmd
    if [[ -n ${BATON_JWT_SECRET:-} ]]; then
        secret=$BATON_JWT_SECRET
        token_cmd="$BINARY token --role admin    # with the BATON_JWT_SECRET you exported"
    else
        if [[ ! -s $secret_file ]]; then
            (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$secret_file")
        fi
        secret=$(<"$secret_file")
        token_cmd="BATON_JWT_SECRET=\$(cat $secret_file) $BINARY token --role admin"
    fi

    echo "starting $NODES node(s) of $BINARY"
    echo "  database $database_url, redis $redis_url (prefix $PREFIX), amqp ${amqp_url:-off}"
    local port log data pid
    for ((k = 1; k <= NODES; k++)); do
        port=$((BASE_PORT + k - 1))
        data=$RUN_DIR/node-$k
        log=$RUN_DIR/node-$k.log
        mkdir -p "$data"
        if [[ -f $log ]]; then mv -f "$log" "$log.1"; fi
        echo "=== $(date '+%F %T') start node-$k on 127.0.0.1:$port" >"$log"
        # setsid: the nodes outlive this script and ignore a Ctrl-C typed while it waits.
        # Run from the repository root, like `cargo run`, so config/baton.toml applies.
        (
            cd "$REPO_ROOT"
            export BATON_LISTEN=127.0.0.1:$port
            export BATON_PUBLIC_URL=http://127.0.0.1:$port/fhir
            export BATON_DATA_DIR=$data
            export BATON_DATABASE_URL=$database_url
            export BATON_REDIS_URL=$redis_url
            export BATON_JWT_SECRET=$secret
            export BATON_CLUSTER__NODE_ID=node-$k
            export BATON_CLUSTER__REDIS_PREFIX=$PREFIX
            if [[ -n $amqp_url ]]; then export BATON_AMQP_URL=$amqp_url; else unset BATON_AMQP_URL; fi
            exec setsid "$BINARY" serve </dev/null >>"$log" 2>&1
        ) &
        pid=$!
        echo "$pid" >"$RUN_DIR/node-$k.pid"
        echo "$port" >"$RUN_DIR/node-$k.port"
    done

    local deadline=$((SECONDS + WAIT_SECONDS)) body=$RUN_DIR/.readyz code
    for ((k = 1; k <= NODES; k++)); do
        port=$((BASE_PORT + k - 1))
        while :; do
            code=$(readyz "$port" "$body")
            [[ $code == 200 ]] && break
            if ! recorded_pid "$k" >/dev/null; then
                echo "node-$k exited; the end of $RUN_DIR/node-$k.log:" >&2
                tail -n 20 "$RUN_DIR/node-$k.log" >&2
                stop_nodes >/dev/null
                exit 1
            fi
            if ((SECONDS >= deadline)); then
                echo "node-$k not ready after ${WAIT_SECONDS}s (last /readyz: ${code:-no answer}); see $RUN_DIR/node-$k.log" >&2
                tail -n 20 "$RUN_DIR/node-$k.log" >&2
                stop_nodes >/dev/null
                exit 1
            fi
            sleep 0.5
        done
        echo "node-$k ready: http://127.0.0.1:$port/fhir   $(<"$body")"
    done
    rm -f "$body"

    cat <<EOF

Cluster of $NODES node(s) running from $RUN_DIR (logs: node-K.log).
An admin token, valid on every node:
  $token_cmd
Status and stop: $0 status|stop --run-dir $RUN_DIR
EOF
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
    local command=$1
    shift
    case $command in
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        status) cmd_status "$@" ;;
        drop-db) cmd_drop_db "$@" ;;
        -h | --help | help) usage ;;
        *)
            echo "$PROG: unknown command '$command'" >&2
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
