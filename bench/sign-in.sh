#!/usr/bin/env bash
# What checking a session costs (issue 11, point 10): one app published
# twice in front of the same backend, `open` (passthrough) and `signed`
# (`--preauth oidc --assign everyone`), measured side by side in one run.
# Every request to `signed` carries a real session cookie, which the edge
# opens (ChaCha20-Poly1305), checks against the app's assignment, and turns
# into identity claims and a signed assertion (ES256, reused per user and
# app) that the connector sends to the backend.
#
# Processes (release build, the default runtime: one shard per core): the
# test IdP (npm oidc-provider, tests/idp) on loopback, a router with it as
# the OpenID provider, one edge, one connector, an nginx backend (100
# bytes). The session comes from a real sign-in, with curl, through the
# provider's login form. Then per protocol (HTTP/1.1, HTTP/2) and
# repetition, `portico loadtest` closed loop (maximum throughput) against
# `open` and then `signed`, reading the edge's and the connector's CPU time
# (/proc/PID/stat) around each run.
#
# Reported (summary.md): req/s, p50/p99, and CPU per request of the edge,
# the connector and both, per app; then signed/open ratios.
#
# Usage: bench/sign-in.sh   (as root for apt; ~4 min)
# Env (defaults in brackets):
#   SIGNIN_DURATION [10s]  each run
#   SIGNIN_REPS [5]        repetitions of (open, signed) per protocol
#   SIGNIN_PROTOCOLS [h1 h2]
#   SIGNIN_CONNECTIONS [16]
#   BENCH_PORT_BASE [18500]  ports BASE..BASE+6 on 127.0.0.1
#   BENCH_OUT [target/bench/sign-in-DATE]
#   PORTICO_BIN [target/release/portico]
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
DURATION=${SIGNIN_DURATION:-10s}
REPS=${SIGNIN_REPS:-5}
PROTOCOLS=${SIGNIN_PROTOCOLS:-h1 h2}
CONNECTIONS=${SIGNIN_CONNECTIONS:-16}
BASE=${BENCH_PORT_BASE:-18500}
PORTICO_BIN=${PORTICO_BIN:-$REPO_DIR/target/release/portico}
BENCH_OUT=${BENCH_OUT:-$REPO_DIR/target/bench/sign-in-$(date +%Y%m%d-%H%M%S)}
BENCH_OUT=$(realpath -m "$BENCH_OUT")
BENCH_WORK=$BENCH_OUT/work
RATHOLE_BIN=/nonexistent
export BENCH_DIR REPO_DIR
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

for n in "$REPS" "$CONNECTIONS" "$BASE"; do
	[[ $n =~ ^[1-9][0-9]*$ ]] || die "not a positive number: $n"
done
if ! command -v nginx >/dev/null; then
	log "installing nginx (the backend)"
	apt-get update -qq >/dev/null && apt-get install -y -qq nginx-light >/dev/null ||
		apt-get install -y -qq nginx >/dev/null
fi
command -v node >/dev/null || die "the test IdP needs Node.js: apt-get install nodejs npm"
[[ -d $REPO_DIR/tests/idp/node_modules/oidc-provider ]] ||
	npm ci --prefix "$REPO_DIR/tests/idp" --no-audit --no-fund --loglevel=error
if [[ ! -x $PORTICO_BIN ]]; then
	log "building $PORTICO_BIN"
	(cd "$REPO_DIR" && cargo build --release --bin portico)
fi

P_ROUTER=$BASE P_EDGE=$((BASE + 1)) P_TUN=$((BASE + 2)) P_EDGE_MET=$((BASE + 3))
P_CONN_MET=$((BASE + 4)) P_BACKEND=$((BASE + 5)) P_IDP=$((BASE + 6))
require_ports_free $(seq "$BASE" $((BASE + 6)))
mkdir -p "$BENCH_WORK"
trap cleanup_pids EXIT
WWW=$BENCH_WORK/www
mkdir -p "$WWW"
head -c 100 /dev/zero | tr '\0' 'x' >"$WWW/small"

log "nginx backend :$P_BACKEND"
start_nginx nginx-backend "    server { listen 127.0.0.1:$P_BACKEND; root $WWW; location / { } }" >/dev/null
wait_http 30 "http://127.0.0.1:$P_BACKEND/small"

log "test IdP :$P_IDP"
(cd "$REPO_DIR/tests/idp" && spawn idp env OP_PORT="$P_IDP" \
	OP_REDIRECT_URIS="https://auth.apps.localhost:$P_EDGE/.portico/callback" \
	node provider.mjs >/dev/null)
wait_http 30 "http://127.0.0.1:$P_IDP/.well-known/openid-configuration"

d=$BENCH_WORK/portico
mkdir -p "$d"
printf 'portico-secret\n' >"$d/oidc-secret"
export PORTICO_ROUTER=https://127.0.0.1:$P_ROUTER
export PORTICO_ROUTER_CA=$d/router/ca.pem
export PORTICO_ADMIN_TOKEN_FILE=$d/router/admin-token
admin() { "$PORTICO_BIN" "$@" 2>>"$BENCH_WORK/admin.log"; }
spawn router "$PORTICO_BIN" --log warn router --data "$d/router" \
	--listen "127.0.0.1:$P_ROUTER" --apps-domain apps.localhost \
	--oidc-issuer "http://127.0.0.1:$P_IDP" --oidc-client-id portico \
	--oidc-client-secret-file "$d/oidc-secret" >/dev/null
wait_file "$PORTICO_ADMIN_TOKEN_FILE" 30
wait_tcp "$P_ROUTER" 30
tok=$(admin token create --edge)
EDGE_PID=$(spawn edge "$PORTICO_BIN" --log warn edge --state "$d/edge" --token "$tok" \
	--public-listen "127.0.0.1:$P_EDGE" --tunnel-listen "127.0.0.1:$P_TUN" \
	--metrics-listen "127.0.0.1:$P_EDGE_MET" --no-access-log --drain-delay 0s)
wait_http 60 "http://127.0.0.1:$P_EDGE_MET/ready"
tok=$(admin token create --group Default)
CONN_PID=$(spawn connector "$PORTICO_BIN" --log warn connector --state "$d/connector" --token "$tok" \
	--metrics-listen "127.0.0.1:$P_CONN_MET")
wait_http 60 "http://127.0.0.1:$P_CONN_MET/ready"
admin app create open --internal-url "http://127.0.0.1:$P_BACKEND/" >/dev/null
admin app create signed --internal-url "http://127.0.0.1:$P_BACKEND/" \
	--preauth oidc --assign everyone >/dev/null
wait_http 60 --cacert "$PORTICO_ROUTER_CA" "https://open.apps.localhost:$P_EDGE/small"

# A real sign-in: the app, the auth host, the provider's login form, the
# callback, the handoff; the jar ends with the session cookie.
jar=$BENCH_WORK/jar
step() {
	curl -s -o /dev/null -w '%{http_code} %{redirect_url}' -b "$jar" -c "$jar" \
		--cacert "$PORTICO_ROUTER_CA" -H 'Accept: text/html' "$@"
}
url="https://signed.apps.localhost:$P_EDGE/small"
for _ in $(seq 1 15); do
	out=$(step "$url")
	next=${out#* }
	if [[ $next == *"/interaction/"* ]]; then
		out=$(step -d prompt=login -d login=alice -d password=x "$next")
		next=${out#* }
	fi
	[[ -z $next ]] && break
	url=$next
done
[[ ${out%% *} == 200 ]] || die "the sign-in did not end at the app: $out"
cookie=$(awk '$6 == "__Host-portico-session" { print $7 }' "$jar")
[[ -n $cookie ]] || die "no session cookie after the sign-in"
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$PORTICO_ROUTER_CA" \
	-H "Cookie: __Host-portico-session=$cookie" "https://signed.apps.localhost:$P_EDGE/small")
[[ $code == 200 ]] || die "the session cookie does not open the app: $code"
log "signed in as alice; the session opens the app"

RUNS=$BENCH_OUT/runs.jsonl
: >"$RUNS"
run() { # run PROTOCOL APP REP
	local proto=$1 app=$2 rep=$3 out=$BENCH_WORK/$1-$2-$3.json e0 c0 e1 c1
	local extra=()
	[[ $app == signed ]] && extra=(-H "Cookie: __Host-portico-session=$cookie")
	e0=$(cpu_ticks "$EDGE_PID")
	c0=$(cpu_ticks "$CONN_PID")
	"$PORTICO_BIN" --log warn loadtest "https://$app.apps.localhost/small" \
		--connect-to "127.0.0.1:$P_EDGE" --cacert "$PORTICO_ROUTER_CA" --protocol "$proto" \
		--duration "$DURATION" --connections "$CONNECTIONS" "${extra[@]}" --json "$out" --quiet
	e1=$(cpu_ticks "$EDGE_PID")
	c1=$(cpu_ticks "$CONN_PID")
	python3 - "$out" "$proto" "$app" "$rep" "$e0" "$e1" "$c0" "$c1" "$(getconf CLK_TCK)" >>"$RUNS" <<'EOF'
import json, sys
out, proto, app, rep = sys.argv[1:5]
e0, e1, c0, c1 = (tuple(map(int, x.split())) for x in sys.argv[5:9])
tck = int(sys.argv[9])
r = json.load(open(out))
n = r["requests"]["ok"]
us = lambda t0, t1: (sum(t1) - sum(t0)) * 1e6 / tck / max(n, 1)
print(json.dumps({
    "protocol": proto, "app": app, "rep": int(rep), "ok": n,
    "errors": r["requests"]["errors"], "rps": r["ok_rps"],
    "p50_us": r["latency_us"]["p50"], "p99_us": r["latency_us"]["p99"],
    "edge_cpu_us_per_req": us(e0, e1), "connector_cpu_us_per_req": us(c0, c1),
}))
EOF
	log "$proto $app rep $rep: $(tail -1 "$RUNS")"
}
for proto in $PROTOCOLS; do
	DURATION=3s run "$proto" open 0 2>/dev/null
	DURATION=3s run "$proto" signed 0 2>/dev/null
	for rep in $(seq 1 "$REPS"); do
		run "$proto" open "$rep"
		run "$proto" signed "$rep"
	done
done

python3 - "$RUNS" "$DURATION" "$CONNECTIONS" >"$BENCH_OUT/summary.md" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
runs = [r for r in runs if r["rep"] > 0]
med = lambda xs: statistics.median(xs) if xs else float("nan")
reps = max(r["rep"] for r in runs)
print(f"Session check vs passthrough: closed loop, {sys.argv[3]} connections, {sys.argv[2]} per run; "
      f"medians of {reps} runs each, alternating, in one run.\n")
print("| protocol | app | req/s | errors | p50 ms | p99 ms | edge CPU µs/req | connector CPU µs/req | Portico CPU µs/req |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
ratios = []
for proto in sorted({r["protocol"] for r in runs}):
    row = {}
    for app in ("open", "signed"):
        rs = [r for r in runs if r["protocol"] == proto and r["app"] == app]
        e = med([r["edge_cpu_us_per_req"] for r in rs])
        c = med([r["connector_cpu_us_per_req"] for r in rs])
        t = med([r["edge_cpu_us_per_req"] + r["connector_cpu_us_per_req"] for r in rs])
        rps = med([r["rps"] for r in rs])
        row[app] = (rps, e, t)
        print(f"| {proto} | {app} | {rps:.0f} | {sum(r['errors'] for r in rs)} | "
              f"{med([r['p50_us'] for r in rs])/1000:.2f} | {med([r['p99_us'] for r in rs])/1000:.2f} | "
              f"{e:.0f} | {c:.0f} | {t:.0f} |")
    ratios.append((proto, row["signed"][2] / row["open"][2], row["signed"][1] / row["open"][1],
                   row["open"][0] / row["signed"][0]))
print("\n| protocol | Portico CPU/req, signed ÷ open | edge CPU/req, signed ÷ open | req/s, open ÷ signed |")
print("|---|---:|---:|---:|")
for proto, t, e, rps in ratios:
    print(f"| {proto} | {t:.3f}× | {e:.3f}× | {rps:.3f}× |")
EOF
cat "$BENCH_OUT/summary.md"
log "results in $BENCH_OUT"
