#!/bin/bash
# Task creates with a local HS256 token against provider tokens (RS256, ES256) of the test
# OpenID provider (tests/support/oidc), 16 clients, 10 s, a fresh SQLite database per run,
# the three in turn, ROUNDS times (BENCHMARKS.md, "Tokens from an identity provider").
# Run from the repository root after `npm ci --prefix tests/support/oidc` and a release build
# of baton and baton-load; needs jq. SERVERS="name:/path/to/baton ..." compares builds.
#   tools/bench/ab_tokens.sh 2
set -e
R=${1:-2}; BIN=${BIN:-target/release}
BIN=$(cd "$BIN" && pwd); mkdir -p /tmp/tok; cd tests/support/oidc
node provider.mjs https://baton.test/fhir 9090 > /tmp/tok/provider.log 2>&1 & PROV=$!
sleep 2
cat > /tmp/tok/idp.toml <<'TOML'
[[auth.issuers]]
issuer = "http://127.0.0.1:9090"
audience = "https://baton.test/fhir"
algorithms = ["RS256", "ES256", "PS256"]
role_claim = "realm_access.roles"
fhir_user_template = "Practitioner/{sub}"
TOML
token() { curl -s -X POST http://127.0.0.1:9090/token -d grant_type=client_credentials \
  -d client_id=$1 -d client_secret=$1-secret -d resource=https://baton.test/fhir -d "scope=$2" | jq -r .access_token; }
export BATON_JWT_SECRET=bench-secret-0123456789abcdef0123456789 BATON_LIMITS__REQUESTS_PER_SECOND_PER_TOKEN=0
HS=$($BIN/baton token --role admin 2>/dev/null || true)
SERVERS=${SERVERS:-"new:$BIN/baton"}
for i in $(seq 1 $R); do
 for sv in $SERVERS; do
  name=${sv%%:*}; server=${sv#*:}
  for alg in HS256 RS256 ES256; do
    rm -rf /tmp/tok/db; mkdir -p /tmp/tok/db
    BATON_LISTEN=127.0.0.1:18501 BATON_DATABASE_URL=sqlite:///tmp/tok/db/baton.db BATON_DATA_DIR=/tmp/tok/db \
      $server serve --config /tmp/tok/idp.toml > /tmp/tok/server.log 2>&1 & S=$!
    sleep 1.5
    case $alg in HS256) T=$HS;; RS256) T=$(token admin-app 'system/Task.cruds');; ES256) T=$(token es-app 'system/Task.cruds');; esac
    echo "== round $i $name $alg $(uptime | sed 's/.*load/load/')"
    $BIN/baton-load tasks --base http://127.0.0.1:18501/fhir --server-pid $S --token "$T" --concurrency 16 --duration 10s --mode create 2>&1 | grep -E "^\{" | jq -c '{rps:.requests_per_s,p50:.latency_ms.p50,p99:.latency_ms.p99,err:.errors,cpu:.cpu_percent.server,machine:.cpu_percent.machine}'
    kill $S; wait $S 2>/dev/null || true
  done
 done
done
kill $PROV
