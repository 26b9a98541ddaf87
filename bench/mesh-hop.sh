#!/usr/bin/env bash
# What a mesh hop costs (issue 10, point 10): the same app reached at the
# edge that holds its tunnels (no hop) and at an edge of another region
# that forwards it over the mesh (one hop), side by side in one run.
#
# Processes (release build, the default runtime: one shard per core):
# a router; edge A in region a, which holds the tunnels of a connector
# pinned to a; edge B in region b, with no tunnel, which forwards to A over
# its mesh link; a WAN relay (`portico loadtest wan`) in front of A's mesh
# port, which A advertises, so B's link to A crosses the emulated delay;
# an nginx backend (a 100-byte file). Then, per protocol (HTTP/1.1 and
# HTTP/2) and repetition, `portico loadtest` at a fixed open-loop rate
# against A (direct) and then B (hop), reading each edge's CPU time
# (/proc/PID/stat) before and after each run.
#
# Reported (summary.md): latency p50/p99 of each path; the hop's added
# latency over the emulated mesh RTT (2 x MESH_DELAY); and CPU per request
# of each edge: A alone for direct, A (the tunnel edge) and B (the
# forwarding edge) for the hop.
#
# Usage: bench/mesh-hop.sh   (as root for apt; ~8 min)
# Env (defaults in brackets):
#   MESH_DELAY [1ms]     one-way delay of the B->A mesh path (RTT = 2x)
#   MESH_RATE [500]      requests per second of each run
#   MESH_DURATION [20s]  each run
#   MESH_REPS [5]        repetitions of (direct, hop) per protocol
#   MESH_PROTOCOLS [h1 h2]
#   MESH_CONNECTIONS [8]
#   MESH_THREADS []      --threads for both edges; empty: the default (one
#                        shard per core)
#   MESH_PERF []         set: also `perf stat` each edge per run (task clock,
#                        context switches, UDP and epoll syscalls) into
#                        work/perf-PROTOCOL-PATH-REP-{a,b}.csv; perf's own
#                        overhead then inflates the CPU columns
#   BENCH_PORT_BASE [18400]  ports BASE..BASE+11 on 127.0.0.1
#   BENCH_OUT [target/bench/mesh-hop-DATE]
#   PORTICO_BIN [target/release/portico]
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
DELAY=${MESH_DELAY:-1ms}
RATE=${MESH_RATE:-500}
DURATION=${MESH_DURATION:-20s}
REPS=${MESH_REPS:-5}
PROTOCOLS=${MESH_PROTOCOLS:-h1 h2}
CONNECTIONS=${MESH_CONNECTIONS:-8}
THREADS=${MESH_THREADS:-}
EDGE_THREADS=()
[[ -n $THREADS ]] && EDGE_THREADS=(--threads "$THREADS")
BASE=${BENCH_PORT_BASE:-18400}
PORTICO_BIN=${PORTICO_BIN:-$REPO_DIR/target/release/portico}
BENCH_OUT=${BENCH_OUT:-$REPO_DIR/target/bench/mesh-hop-$(date +%Y%m%d-%H%M%S)}
BENCH_OUT=$(realpath -m "$BENCH_OUT")
BENCH_WORK=$BENCH_OUT/work
RATHOLE_BIN=/nonexistent
export BENCH_DIR REPO_DIR
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

for n in "$RATE" "$REPS" "$CONNECTIONS" "$BASE"; do
	[[ $n =~ ^[1-9][0-9]*$ ]] || die "not a positive number: $n"
done
if ! command -v nginx >/dev/null; then
	log "installing nginx (the backend)"
	apt-get update -qq >/dev/null && apt-get install -y -qq nginx-light >/dev/null ||
		apt-get install -y -qq nginx >/dev/null
fi
if [[ ! -x $PORTICO_BIN ]]; then
	log "building $PORTICO_BIN"
	(cd "$REPO_DIR" && cargo build --release --bin portico)
fi

P_ROUTER=$BASE
P_A=$((BASE + 1)) P_A_TUN=$((BASE + 2)) P_A_MESH=$((BASE + 3)) P_A_MET=$((BASE + 4))
P_B=$((BASE + 5)) P_B_TUN=$((BASE + 6)) P_B_MESH=$((BASE + 7)) P_B_MET=$((BASE + 8))
P_RELAY=$((BASE + 9)) P_CONN_MET=$((BASE + 10)) P_BACKEND=$((BASE + 11))
require_ports_free $(seq "$BASE" $((BASE + 11)))
mkdir -p "$BENCH_WORK"
trap cleanup_pids EXIT
APP_HOST=bench.apps.localhost
WWW=$BENCH_WORK/www
mkdir -p "$WWW"
head -c 100 /dev/zero | tr '\0' 'x' >"$WWW/small"

log "nginx backend :$P_BACKEND"
start_nginx nginx-backend "    server { listen 127.0.0.1:$P_BACKEND; root $WWW; location / { } }" >/dev/null
wait_http 30 "http://127.0.0.1:$P_BACKEND/small"

d=$BENCH_WORK/portico
export PORTICO_ROUTER=https://127.0.0.1:$P_ROUTER
export PORTICO_ROUTER_CA=$d/router/ca.pem
export PORTICO_ADMIN_TOKEN_FILE=$d/router/admin-token
admin() { "$PORTICO_BIN" "$@" 2>>"$BENCH_WORK/admin.log"; }
spawn router "$PORTICO_BIN" --log warn router --data "$d/router" \
	--listen "127.0.0.1:$P_ROUTER" --apps-domain apps.localhost >/dev/null
wait_file "$PORTICO_ADMIN_TOKEN_FILE" 30
wait_tcp "$P_ROUTER" 30
admin region create a >/dev/null
admin region create b >/dev/null
admin group create Near --region a >/dev/null
tok=$(admin token create --edge --region a)
A_PID=$(spawn edge-a "$PORTICO_BIN" --log warn "${EDGE_THREADS[@]}" edge --state "$d/edge-a" --token "$tok" \
	--public-listen "127.0.0.1:$P_A" --tunnel-listen "127.0.0.1:$P_A_TUN" \
	--mesh-listen "127.0.0.1:$P_A_MESH" --advertise-mesh "127.0.0.1:$P_RELAY" \
	--metrics-listen "127.0.0.1:$P_A_MET" --no-access-log --drain-delay 0s)
tok=$(admin token create --edge --region b)
B_PID=$(spawn edge-b "$PORTICO_BIN" --log warn "${EDGE_THREADS[@]}" edge --state "$d/edge-b" --token "$tok" \
	--public-listen "127.0.0.1:$P_B" --tunnel-listen "127.0.0.1:$P_B_TUN" \
	--mesh-listen "127.0.0.1:$P_B_MESH" \
	--metrics-listen "127.0.0.1:$P_B_MET" --no-access-log --drain-delay 0s)
spawn relay "$PORTICO_BIN" --log warn loadtest wan --listen "127.0.0.1:$P_RELAY" \
	--target "127.0.0.1:$P_A_MESH" --delay "$DELAY" >/dev/null
wait_http 60 "http://127.0.0.1:$P_A_MET/ready"
wait_http 60 "http://127.0.0.1:$P_B_MET/ready"
tok=$(admin token create --group Near)
spawn connector "$PORTICO_BIN" --log warn connector --state "$d/connector" --token "$tok" \
	--metrics-listen "127.0.0.1:$P_CONN_MET" >/dev/null
wait_http 60 "http://127.0.0.1:$P_CONN_MET/ready"
admin app create bench --internal-url "http://127.0.0.1:$P_BACKEND/" --group Near \
	--external-host "$APP_HOST" >/dev/null
for p in "$P_A" "$P_B"; do
	wait_http 60 --cacert "$PORTICO_ROUTER_CA" --resolve "$APP_HOST:$p:127.0.0.1" \
		"https://$APP_HOST:$p/small"
done
route=$(curl -s -o /dev/null -D - --cacert "$PORTICO_ROUTER_CA" --resolve "$APP_HOST:$P_B:127.0.0.1" \
	"https://$APP_HOST:$P_B/small" | awk -F': ' 'tolower($1)=="portico-route" {print $2}' | tr -d '\r')
[[ $route == *,* ]] || die "edge B did not forward over the mesh (Portico-Route: '$route')"
log "B forwards to A: Portico-Route: $route; mesh delay $DELAY one-way"

RUNS=$BENCH_OUT/runs.jsonl
: >"$RUNS"
run() { # run PROTOCOL PATH PORT REP
	local proto=$1 path=$2 port=$3 rep=$4 out=$BENCH_WORK/$1-$2-$4.json a0 b0 a1 b1
	a0=$(cpu_ticks "$A_PID")
	b0=$(cpu_ticks "$B_PID")
	local perf_pids=()
	if [[ -n ${MESH_PERF:-} && $path != warmup* ]]; then
		for who in a b; do
			local pid=$A_PID
			[[ $who == b ]] && pid=$B_PID
			perf stat -x, -e task-clock,context-switches,syscalls:sys_enter_sendmsg,syscalls:sys_enter_sendmmsg,syscalls:sys_enter_recvmsg,syscalls:sys_enter_recvmmsg,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_write,syscalls:sys_enter_read \
				-p "$pid" -o "$BENCH_WORK/perf-$proto-$path-$rep-$who.csv" &
			perf_pids+=($!)
		done
	fi
	"$PORTICO_BIN" --log warn loadtest "https://$APP_HOST/small" --connect-to "127.0.0.1:$port" \
		--cacert "$PORTICO_ROUTER_CA" --protocol "$proto" --rate "$RATE" --duration "$DURATION" \
		--connections "$CONNECTIONS" --json "$out" --quiet
	a1=$(cpu_ticks "$A_PID")
	b1=$(cpu_ticks "$B_PID")
	for p in "${perf_pids[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
	python3 - "$out" "$proto" "$path" "$rep" "$a0" "$a1" "$b0" "$b1" "$(getconf CLK_TCK)" >>"$RUNS" <<'EOF'
import json, sys
out, proto, path, rep = sys.argv[1:5]
a0, a1, b0, b1 = (tuple(map(int, x.split())) for x in sys.argv[5:9])
tck = int(sys.argv[9])
r = json.load(open(out))
n = r["requests"]["ok"]
us = lambda t0, t1: (sum(t1) - sum(t0)) * 1e6 / tck / max(n, 1)
print(json.dumps({
    "protocol": proto, "path": path, "rep": int(rep), "ok": n,
    "errors": r["requests"]["errors"], "rps": r["ok_rps"],
    "p50_us": r["latency_us"]["p50"], "p99_us": r["latency_us"]["p99"],
    "edge_a_cpu_us_per_req": us(a0, a1), "edge_b_cpu_us_per_req": us(b0, b1),
}))
EOF
	log "$proto $path rep $rep: $(tail -1 "$RUNS")"
}
for proto in $PROTOCOLS; do
	# Warm-up: connections, TLS tickets and the mesh link.
	DURATION=3s run "$proto" warmup-direct "$P_A" 0 2>/dev/null
	DURATION=3s run "$proto" warmup-hop "$P_B" 0 2>/dev/null
	for rep in $(seq 1 "$REPS"); do
		run "$proto" direct "$P_A" "$rep"
		run "$proto" hop "$P_B" "$rep"
	done
done

python3 - "$RUNS" "$DELAY" "$RATE" "$DURATION" >"$BENCH_OUT/summary.md" <<'EOF'
import json, statistics, sys, re
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
runs = [r for r in runs if not r["path"].startswith("warmup")]
delay = sys.argv[2]
m = re.fullmatch(r"([\d.]+)(us|ms|s)", delay)
one_way_us = float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]
rtt_us = 2 * one_way_us
med = lambda xs: statistics.median(xs) if xs else float("nan")
print(f"Mesh hop vs no hop: {sys.argv[3]} req/s open loop for {sys.argv[4]} per run, "
      f"mesh path delay {delay} one-way (RTT {rtt_us/1000:.1f} ms); medians of "
      f"{max(r['rep'] for r in runs)} runs each, run side by side.\n")
print("| protocol | path | req/s | errors | p50 ms | p99 ms | added p50 over RTT, ms | added p99 over RTT, ms | edge A CPU µs/req | edge B CPU µs/req |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for proto in sorted({r["protocol"] for r in runs}):
    by = {p: [r for r in runs if r["protocol"] == proto and r["path"] == p] for p in ("direct", "hop")}
    d50 = med([r["p50_us"] for r in by["direct"]]); d99 = med([r["p99_us"] for r in by["direct"]])
    for p, rs in by.items():
        p50 = med([r["p50_us"] for r in rs]); p99 = med([r["p99_us"] for r in rs])
        added50 = added99 = "—"
        if p == "hop":
            added50 = f"{(p50 - d50 - rtt_us)/1000:+.2f}"
            added99 = f"{(p99 - d99 - rtt_us)/1000:+.2f}"
        b = med([r["edge_b_cpu_us_per_req"] for r in rs])
        print(f"| {proto} | {p} | {med([r['rps'] for r in rs]):.0f} | {sum(r['errors'] for r in rs)} | "
              f"{p50/1000:.2f} | {p99/1000:.2f} | {added50} | {added99} | "
              f"{med([r['edge_a_cpu_us_per_req'] for r in rs]):.0f} | "
              f"{'—' if p == 'direct' else f'{b:.0f}'} |")
EOF
cat "$BENCH_OUT/summary.md"
log "results in $BENCH_OUT"
