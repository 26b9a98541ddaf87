#!/usr/bin/env bash
# Where Portico's time goes, reproducibly: user-space instructions and
# allocations per request of the edge and the connector (callgrind), and a
# flamegraph of each
# under load (perf + inferno). Instruction counts do not depend on what else
# runs on the machine, so they compare builds where req/s is too noisy.
#
# Usage: bench/profile.sh            (as root, from anywhere; ~3-4 min)
#
# Env (defaults in brackets):
#   PROFILE_REQUESTS [2000]   keepalive GET /small counted under callgrind, per protocol
#   PROFILE_CONNS [8]         HTTP/1.1: connections (and workers) of that load
#   PROFILE_PROTOCOLS [h1 h2] the protocols counted, one after the other
#   PROFILE_H2_CONNS [2]      HTTP/2: connections...
#   PROFILE_H2_STREAMS [32]   ...and concurrent streams over them (h2load's -c/-m shape)
#   PROFILE_THREADS [1]       --threads for edge and connector; empty = default runtime
#   PROFILE_PERF_SECONDS [8]  perf sampling time under `wrk -c32`
#   BENCH_PORT_BASE [18300]   ports BASE..BASE+5 on 127.0.0.1
#   BENCH_OUT [target/bench/profile-DATE]
#   BENCH_SKIP_SETUP=1        do not install valgrind, perf, wrk, nginx, inferno
#   BENCH_TOOLS [/opt/portico-bench], PORTICO_BIN [target/release/portico]
#
# Writes to BENCH_OUT: summary.md (instructions and allocations per request
# for each protocol, the allocations counted as calls to
# malloc/calloc/realloc), callgrind.{edge,connector}.PROTOCOL dumps with
# callgrind_annotate listings ({edge,connector}.PROTOCOL.inclusive.txt), the
# allocation sites per request ({edge,connector}.PROTOCOL.allocations.txt),
# callgrind-load-PROTOCOL.json (the loadtest's report), perf.*.data and
# flamegraph-{edge,connector}.svg (HTTP/1.1 only). PROTOCOL is h1 or h2.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
REQUESTS=${PROFILE_REQUESTS:-2000}
CONNS=${PROFILE_CONNS:-8}
PROTOCOLS=${PROFILE_PROTOCOLS:-h1 h2}
H2_CONNS=${PROFILE_H2_CONNS:-2}
H2_STREAMS=${PROFILE_H2_STREAMS:-32}
THREADS=${PROFILE_THREADS-1}
PERF_SECONDS=${PROFILE_PERF_SECONDS:-8}
BASE=${BENCH_PORT_BASE:-18300}
BENCH_TOOLS=${BENCH_TOOLS:-/opt/portico-bench}
PORTICO_BIN=${PORTICO_BIN:-$REPO_DIR/target/release/portico}
BENCH_OUT=${BENCH_OUT:-$REPO_DIR/target/bench/profile-$(date +%Y%m%d-%H%M%S)}
BENCH_OUT=$(realpath -m "$BENCH_OUT")
BENCH_WORK=$BENCH_OUT/work
export BENCH_DIR REPO_DIR BENCH_TOOLS
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

for n in "$REQUESTS" "$CONNS" "$PERF_SECONDS" "$BASE" "$H2_CONNS" "$H2_STREAMS"; do
	[[ $n =~ ^[1-9][0-9]*$ ]] || die "not a positive number: $n"
done
[[ -z $THREADS || $THREADS =~ ^[1-9][0-9]*$ ]] || die "PROFILE_THREADS must be empty or a positive number"

if [[ -z ${BENCH_SKIP_SETUP:-} ]]; then
	need=()
	for tool in valgrind:valgrind perf:linux-perf wrk:wrk nginx:nginx curl:curl; do
		command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
	done
	if ((${#need[@]})); then
		log "installing ${need[*]}"
		apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
	fi
	if [[ ! -x $BENCH_TOOLS/bin/inferno-flamegraph ]]; then
		log "installing inferno (flamegraphs) into $BENCH_TOOLS"
		cargo install --quiet --locked --root "$BENCH_TOOLS" inferno
	fi
	log "building portico (release)"
	(cd "$REPO_DIR" && cargo build --quiet --release --bin portico)
fi
for tool in valgrind callgrind_control callgrind_annotate perf wrk nginx curl; do
	command -v "$tool" >/dev/null || die "$tool is missing (run without BENCH_SKIP_SETUP)"
done
[[ -x $PORTICO_BIN ]] || die "no portico binary at $PORTICO_BIN"

mkdir -p "$BENCH_WORK/www"
trap 'cleanup_pids' EXIT
trap 'exit 130' INT TERM
unset RUST_LOG

P_BACKEND=$BASE P_ROUTER=$((BASE + 1)) P_EDGE=$((BASE + 2)) P_TUNNEL=$((BASE + 3))
P_EDGE_METRICS=$((BASE + 4)) P_CONN_METRICS=$((BASE + 5))
require_ports_free "$P_BACKEND" "$P_ROUTER" "$P_EDGE" "$P_TUNNEL" "$P_EDGE_METRICS" "$P_CONN_METRICS"
APP_HOST=bench.apps.localhost
thread_args=()
[[ -n $THREADS ]] && thread_args=(--threads "$THREADS")

head -c 100 /dev/zero | tr '\0' 'x' >"$BENCH_WORK/www/small"
start_nginx nginx "    server { listen 127.0.0.1:$P_BACKEND; root $BENCH_WORK/www; }" >/dev/null
wait_http 30 "http://127.0.0.1:$P_BACKEND/small"

export PORTICO_ROUTER=https://127.0.0.1:$P_ROUTER
export PORTICO_ROUTER_CA=$BENCH_WORK/router/ca.pem
export PORTICO_ADMIN_TOKEN_FILE=$BENCH_WORK/router/admin-token
spawn router "$PORTICO_BIN" --log warn router --data "$BENCH_WORK/router" \
	--listen "127.0.0.1:$P_ROUTER" --apps-domain apps.localhost >/dev/null
wait_file "$PORTICO_ADMIN_TOKEN_FILE" 30
wait_tcp "$P_ROUTER" 30
"$PORTICO_BIN" app create bench --internal-url "http://127.0.0.1:$P_BACKEND/" \
	--external-host "$APP_HOST" >/dev/null 2>>"$BENCH_WORK/admin.log"

# start_pair TAG PREFIX...: an edge and a connector, each command prefixed
# with PREFIX (a valgrind invocation, or nothing). They enroll on the first
# start and restart from their saved state after that: a second edge on the
# same address would leave the first one registered at the router, and the
# connector dials an edge by its identity. Sets EDGE_PID and CONN_PID.
start_pair() {
	local tag=$1 edge_tok=() conn_tok=()
	shift
	[[ -d $BENCH_WORK/edge ]] ||
		edge_tok=(--token "$("$PORTICO_BIN" token create --edge 2>>"$BENCH_WORK/admin.log")")
	[[ -d $BENCH_WORK/connector ]] ||
		conn_tok=(--token "$("$PORTICO_BIN" token create --group Default 2>>"$BENCH_WORK/admin.log")")
	EDGE_PID=$(spawn "edge-$tag" "$@" "$PORTICO_BIN" --log warn "${thread_args[@]}" edge \
		--state "$BENCH_WORK/edge" "${edge_tok[@]}" --public-listen "127.0.0.1:$P_EDGE" \
		--tunnel-listen "127.0.0.1:$P_TUNNEL" --metrics-listen "127.0.0.1:$P_EDGE_METRICS")
	wait_http 180 "http://127.0.0.1:$P_EDGE_METRICS/ready"
	CONN_PID=$(spawn "connector-$tag" "$@" "$PORTICO_BIN" --log warn "${thread_args[@]}" connector \
		--state "$BENCH_WORK/connector" "${conn_tok[@]}" --tunnels 1 \
		--metrics-listen "127.0.0.1:$P_CONN_METRICS")
	wait_http 180 "http://127.0.0.1:$P_CONN_METRICS/ready"
	wait_http 180 --cacert "$PORTICO_ROUTER_CA" --resolve "$APP_HOST:$P_EDGE:127.0.0.1" \
		"https://$APP_HOST:$P_EDGE/small"
}

stop_pair() {
	kill -INT "$EDGE_PID" "$CONN_PID" 2>/dev/null || true
	local i
	for ((i = 0; i < 300; i++)); do
		kill -0 "$EDGE_PID" 2>/dev/null || kill -0 "$CONN_PID" 2>/dev/null || return 0
		sleep 0.1
	done
	kill -KILL "$EDGE_PID" "$CONN_PID" 2>/dev/null || true
}

# ---------------------------------------------------------------- callgrind
log "callgrind: starting edge and connector under valgrind (slow to start)"
start_pair callgrind valgrind --tool=callgrind --callgrind-out-file="$BENCH_OUT/callgrind.%p"
# alloc_calls DUMP: calls to malloc, calloc and realloc in a callgrind dump
# (every `calls=` line under a `cfn=` naming one of them).
alloc_calls() {
	python3 - "$1" <<'PY'
import re, sys
names, callee, total = {}, None, 0
alloc = {"malloc", "calloc", "realloc"}
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"c?fn=\((\d+)\)(?: (\S+))?", line)
    if m:
        if m.group(2):
            names[m.group(1)] = m.group(2)
        callee = names.get(m.group(1)) if line.startswith("cfn=") else None
    elif line.startswith("calls=") and callee is not None:
        if callee in alloc:
            total += int(line[6:].split()[0])
        callee = None
print(total)
PY
}

# alloc_sites DUMP REQUESTS: who calls the Rust allocator, per request (the
# callers of __rust_alloc, __rust_alloc_zeroed and __rust_realloc at 0.3 per
# request or more). Generic helpers (Vec growth, Bytes copies, boxing, task
# cells, ...) are followed one level further up, to the code that used them.
alloc_sites() {
	callgrind_annotate --tree=caller --inclusive=yes --threshold=100 --auto=no "$1" 2>/dev/null |
		python3 -c '
import re, sys
n_req = int(sys.argv[1])
blocks = sys.stdin.read().split("\n\n")
def callers(fn):
    out = []
    for block in blocks:
        lines = block.splitlines()
        if any(("*  ???:" + fn + " [") in l for l in lines):
            for l in lines:
                m = re.search(r"<\s+\S*?:(.*) \(([\d,]+)x\)", l)
                if m:
                    out.append((int(m.group(2).replace(",", "")) / n_req, m.group(1)))
    return out
helpers = ("finish_grow", "copy_from_slice", "split_to", "reserve_inner", "try_allocate_in",
           "box_new_uninit", "new_task", "Cell<T,S>::new", "From<alloc::vec::Vec", "shallow_clone",
           "reserve_rehash", "BytesMut as core::convert::From", "Extensions::insert")
rows = []
for alloc in ("__rustc::__rust_alloc", "__rustc::__rust_alloc_zeroed", "__rustc::__rust_realloc"):
    for n, site in callers(alloc):
        if n < 0.3:
            continue
        if any(h in site for h in helpers):
            up = [(m, u) for m, u in callers(site) if m >= 0.3]
            site = site[:80] + "  <= " + "; ".join(f"{m:.2f} {u[:90]}" for m, u in up[:4])
        rows.append((n, alloc.rsplit("_", 1)[-1], site[:240]))
print(f"{sum(r[0] for r in rows):.1f} allocator calls per request listed (sites at 0.3 per request or more)")
for n, kind, site in sorted(rows, reverse=True):
    print(f"{n:6.2f}  {kind:7}  {site}")
' "$2"
}

declare -A IR ALLOCS LOAD
for proto in $PROTOCOLS; do
	case $proto in
	h1) load=(--concurrency "$CONNS" --connections "$CONNS") LOAD[$proto]="$CONNS connections" ;;
	h2) load=(--concurrency "$H2_STREAMS" --connections "$H2_CONNS")
		LOAD[$proto]="$H2_STREAMS streams over $H2_CONNS connections" ;;
	*) die "PROFILE_PROTOCOLS takes h1 and h2, not $proto" ;;
	esac
	callgrind_control -z "$EDGE_PID" >/dev/null
	callgrind_control -z "$CONN_PID" >/dev/null
	log "callgrind: $REQUESTS $proto requests, ${LOAD[$proto]}"
	"$PORTICO_BIN" --log warn loadtest "https://$APP_HOST:$P_EDGE/small" --cacert "$PORTICO_ROUTER_CA" \
		--protocol "$proto" --requests "$REQUESTS" "${load[@]}" --quiet \
		--json "$BENCH_OUT/callgrind-load-$proto.json" >/dev/null
	ok=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["requests"]["ok"])' "$BENCH_OUT/callgrind-load-$proto.json")
	[[ $ok == "$REQUESTS" ]] || die "only $ok of $REQUESTS $proto requests succeeded under callgrind"
	callgrind_control -d "$EDGE_PID" >/dev/null
	callgrind_control -d "$CONN_PID" >/dev/null
	sleep 2
	for role in edge connector; do
		pid=$EDGE_PID
		[[ $role == connector ]] && pid=$CONN_PID
		dump=$(ls -t "$BENCH_OUT/callgrind.$pid".* 2>/dev/null | grep -v '\.txt$' | head -1)
		[[ -n $dump ]] || die "no callgrind dump for the $role ($pid)"
		mv "$dump" "$BENCH_OUT/callgrind.$role.$proto"
		dump=$BENCH_OUT/callgrind.$role.$proto
		IR[$role.$proto]=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
		ALLOCS[$role.$proto]=$(alloc_calls "$dump")
		callgrind_annotate --inclusive=yes --threshold=99 --auto=no "$dump" >"$BENCH_OUT/$role.$proto.inclusive.txt" 2>/dev/null || true
		alloc_sites "$dump" "$REQUESTS" >"$BENCH_OUT/$role.$proto.allocations.txt" || true
		log "callgrind: $role $proto ${IR[$role.$proto]} instructions = $((IR[$role.$proto] / REQUESTS)) per request"
	done
done
stop_pair

# ---------------------------------------------------------------- perf
log "perf: edge and connector under wrk -c32 for ${PERF_SECONDS}s"
start_pair perf
timeout $((PERF_SECONDS + 30)) wrk -t2 -c32 -d$((PERF_SECONDS + 2))s -H "Host: $APP_HOST:$P_EDGE" \
	"https://127.0.0.1:$P_EDGE/small" >"$BENCH_OUT/wrk.txt" 2>&1 &
wrk_pid=$!
sleep 1
perf record -F 999 -g -p "$EDGE_PID" -o "$BENCH_OUT/perf.edge.data" -- sleep "$PERF_SECONDS" 2>>"$BENCH_WORK/perf.log" &
perf_pid=$!
perf record -F 999 -g -p "$CONN_PID" -o "$BENCH_OUT/perf.connector.data" -- sleep "$PERF_SECONDS" 2>>"$BENCH_WORK/perf.log"
wait "$perf_pid" "$wrk_pid" || true
stop_pair
flame=$BENCH_TOOLS/bin/inferno-flamegraph
collapse=$BENCH_TOOLS/bin/inferno-collapse-perf
for role in edge connector; do
	if [[ -x $flame && -x $collapse ]]; then
		perf script -i "$BENCH_OUT/perf.$role.data" 2>/dev/null | "$collapse" |
			"$flame" --title "portico $role, wrk -c32 /small" >"$BENCH_OUT/flamegraph-$role.svg"
		log "perf: $BENCH_OUT/flamegraph-$role.svg"
	else
		log "perf: inferno not installed; perf report -i $BENCH_OUT/perf.$role.data"
	fi
done

{
	echo "Instructions and allocations per request (callgrind, user space; $REQUESTS keepalive GET /small per protocol, their TLS handshakes included; threads: ${THREADS:-default}):"
	echo
	echo "| process | protocol | load | instructions | per request | allocations per request |"
	echo "|---|---|---|---|---|---|"
	for proto in $PROTOCOLS; do
		for role in edge connector; do
			echo "| $role | $proto | ${LOAD[$proto]} | ${IR[$role.$proto]} | $((IR[$role.$proto] / REQUESTS)) | $(awk -v a="${ALLOCS[$role.$proto]}" -v n="$REQUESTS" 'BEGIN {printf "%.1f", a / n}') |"
		done
	done
	if [[ -n ${IR[edge.h1]:-} && -n ${IR[edge.h2]:-} ]]; then
		echo
		echo "Edge instructions per request, HTTP/2 over HTTP/1.1: $(awk -v a="${IR[edge.h2]}" -v b="${IR[edge.h1]}" 'BEGIN {printf "%.2f", a / b}')x."
	fi
	echo
	echo "wrk during perf: $(awk '/Requests\/sec/ {print $2}' "$BENCH_OUT/wrk.txt") req/s (not a benchmark: perf was sampling)."
	echo "Listings: {edge,connector}.PROTOCOL.inclusive.txt; allocation sites per request: {edge,connector}.PROTOCOL.allocations.txt; flamegraphs: flamegraph-edge.svg, flamegraph-connector.svg."
} >"$BENCH_OUT/summary.md"
cat "$BENCH_OUT/summary.md"
log "results: $BENCH_OUT"
