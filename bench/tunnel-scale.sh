#!/usr/bin/env bash
# Portico at scale on one edge, for two issue-3 targets:
#   1. N idle tunnels on one edge (default 1,000): edge RSS before and after,
#      per tunnel (target: <= 64 KiB of edge memory per tunnel);
#   2. M concurrent streams on one tunnel (default 10,000): wrk holds M
#      connections to the edge, each request is a slow response from nginx
#      (a 64 KiB file at 16 KiB/s, about 3 s), so about M streams are open
#      at once on the one tunnel; reports errors, the most active streams
#      the edge saw, and edge and connector peak RSS.
# A connector keeps at most 64 tunnels, so phase 1 starts ceil(N/64)
# connector processes. Only 127.0.0.1; every wait has a deadline.
#
# Env (defaults in brackets):
#   SCALE_TUNNELS [1000]  idle tunnels in phase 1 (0 skips it)
#   SCALE_STREAMS [10000] concurrent streams in phase 2 (0 skips it)
#   SCALE_DURATION [20]   seconds of phase-2 load
#   BENCH_PORT_BASE [18200], BENCH_OUT [target/bench/scale-DATE]
#   BENCH_SKIP_SETUP=1, BENCH_TOOLS, PORTICO_BIN as in run.sh
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
TUNNELS=${SCALE_TUNNELS:-1000}
STREAMS=${SCALE_STREAMS:-10000}
DURATION=${SCALE_DURATION:-20}
BASE=${BENCH_PORT_BASE:-18200}
BENCH_TOOLS=${BENCH_TOOLS:-/opt/portico-bench}
PORTICO_BIN=${PORTICO_BIN:-$REPO_DIR/target/release/portico}
RATHOLE_BIN=${RATHOLE_BIN:-$BENCH_TOOLS/bin/rathole}
BENCH_OUT=${BENCH_OUT:-$REPO_DIR/target/bench/scale-$(date +%Y%m%d-%H%M%S)}
BENCH_OUT=$(realpath -m "$BENCH_OUT") # nginx and the tunnels get absolute paths
BENCH_WORK=$BENCH_OUT/work
export BENCH_DIR REPO_DIR BENCH_TOOLS

# shellcheck source=lib.sh
source "$BENCH_DIR/lib.sh"

[[ $TUNNELS =~ ^[0-9]+$ && $STREAMS =~ ^[0-9]+$ && $DURATION =~ ^[0-9]+$ ]] || die "bad SCALE_* value"
((TUNNELS <= 5000 && STREAMS <= 30000 && DURATION >= 1 && DURATION <= 600)) ||
	die "SCALE_TUNNELS <= 5000, SCALE_STREAMS <= 30000, 1 <= SCALE_DURATION <= 600"
if [[ ${BENCH_SKIP_SETUP:-0} != 1 ]]; then
	BENCH_TOOLS=$BENCH_TOOLS "$BENCH_DIR/setup.sh"
fi
[[ -x $PORTICO_BIN ]] || die "no portico binary at $PORTICO_BIN"

mkdir -p "$BENCH_OUT" "$BENCH_WORK"
trap cleanup_pids EXIT
trap 'exit 130' INT TERM
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
log "open files limit: $(ulimit -n)"
unset RUST_LOG

P_BACKEND=$BASE
P_ROUTER=$((BASE + 1))
P_EDGE=$((BASE + 2))
P_TUNNEL=$((BASE + 3))
P_EDGE_METRICS=$((BASE + 4))
P_CONN_METRICS=$((BASE + 5))
require_ports_free "$P_BACKEND" "$P_ROUTER" "$P_EDGE" "$P_TUNNEL" "$P_EDGE_METRICS" "$P_CONN_METRICS"
APP_HOST=scale.apps.localhost
RESULT=$BENCH_OUT/scale.json
m=$(machine_json)
echo "${m%\}},\"tunnels\":$TUNNELS,\"streams\":$STREAMS,\"duration_s\":$DURATION}" >"$BENCH_OUT/machine.json"

# Backend: /small (100 bytes) and /slow (64 KiB sent at 16 KiB/s).
WWW=$BENCH_WORK/www
mkdir -p "$WWW"
head -c 100 /dev/zero | tr '\0' 'x' >"$WWW/small"
head -c 65536 /dev/zero | tr '\0' 'y' >"$WWW/slow"
start_nginx nginx "    server {
        listen 127.0.0.1:$P_BACKEND backlog=4096;
        root $WWW;
        location /slow { limit_rate 16k; }
    }" >/dev/null
wait_http 30 "http://127.0.0.1:$P_BACKEND/small"

d=$BENCH_WORK/portico
mkdir -p "$d"
export PORTICO_ROUTER=https://127.0.0.1:$P_ROUTER
export PORTICO_ROUTER_CA=$d/router/ca.pem
export PORTICO_ADMIN_TOKEN_FILE=$d/router/admin-token
admin() { "$PORTICO_BIN" "$@" 2>>"$BENCH_WORK/portico-admin.log"; }

spawn router "$PORTICO_BIN" --log warn router --data "$d/router" --listen "127.0.0.1:$P_ROUTER" >/dev/null
wait_file "$PORTICO_ADMIN_TOKEN_FILE" 30
wait_file "$PORTICO_ROUTER_CA" 30
wait_tcp "$P_ROUTER" 30
tok=$(admin token create --edge)
EDGE_PID=$(spawn edge "$PORTICO_BIN" --log warn edge --state "$d/edge" --token "$tok" \
	--public-listen "127.0.0.1:$P_EDGE" --tunnel-listen "127.0.0.1:$P_TUNNEL" \
	--metrics-listen "127.0.0.1:$P_EDGE_METRICS")
wait_http 60 "http://127.0.0.1:$P_EDGE_METRICS/ready"

edge_metric() { # NAME -> value (0 if absent)
	curl -s -m 5 "http://127.0.0.1:$P_EDGE_METRICS/metrics" 2>/dev/null |
		awk -v n="$1" '$1 == n {v = $2} END {print (v == "" ? 0 : v)}'
}

: >"$RESULT"

# ------------------------------------------------------- phase 1: idle tunnels
if ((TUNNELS > 0)); then
	admin group create idle >/dev/null
	rss0=$(rss_kib "$EDGE_PID")
	log "phase 1: $TUNNELS idle tunnels; edge RSS before: $rss0 KiB"
	IDLE_PIDS=()
	left=$TUNNELS i=0
	while ((left > 0)); do
		n=$((left > 64 ? 64 : left))
		tok=$(admin token create --group idle)
		IDLE_PIDS+=("$(spawn "idle-$i" "$PORTICO_BIN" --log warn connector --state "$d/idle-$i" \
			--token "$tok" --tunnels "$n")")
		left=$((left - n)) i=$((i + 1))
	done
	t0=$SECONDS deadline=$((SECONDS + 180)) up=0
	while ((SECONDS < deadline)); do
		up=$(edge_metric portico_edge_tunnels)
		((${up%.*} >= TUNNELS)) && break
		sleep 1
	done
	took=$((SECONDS - t0))
	log "phase 1: $up tunnels attached after ${took}s ($i connector processes)"
	sleep 3 # a fixed settle time before the reading, not a readiness wait
	rss1=$(rss_kib "$EDGE_PID")
	hwm1=$(hwm_kib "$EDGE_PID")
	conn_rss=$(rss_kib "${IDLE_PIDS[@]}")
	per=$(((rss1 - rss0) * 1024 / (${up%.*} > 0 ? ${up%.*} : 1)))
	printf '{"phase":"idle_tunnels","target_tunnels":%d,"attached":%s,"connectors":%d,"attach_s":%d,"edge_rss_before_kib":%d,"edge_rss_after_kib":%d,"edge_hwm_kib":%d,"edge_bytes_per_tunnel":%d,"connectors_rss_kib":%d}\n' \
		"$TUNNELS" "${up%.*}" "$i" "$took" "$rss0" "$rss1" "$hwm1" "$per" "$conn_rss" >>"$RESULT"
	log "phase 1: edge RSS $rss0 -> $rss1 KiB = $((per / 1024)) KiB per tunnel (target <= 64 KiB)"
	for pid in "${IDLE_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
	deadline=$((SECONDS + 60))
	while ((SECONDS < deadline)) && (($(edge_metric portico_edge_tunnels | cut -d. -f1) > 0)); do
		sleep 0.5
	done
fi

# --------------------------------------------------- phase 2: streams on one tunnel
if ((STREAMS > 0)); then
	tok=$(admin token create --group Default)
	CONN_PID=$(spawn connector "$PORTICO_BIN" --log warn connector --state "$d/connector" \
		--token "$tok" --tunnels 1 --max-streams-per-tunnel "$((STREAMS > 1024 ? STREAMS : 1024))" \
		--metrics-listen "127.0.0.1:$P_CONN_METRICS")
	wait_http 60 "http://127.0.0.1:$P_CONN_METRICS/ready"
	admin app create scale --internal-url "http://127.0.0.1:$P_BACKEND/" --external-host "$APP_HOST" >/dev/null
	wait_http 60 --cacert "$PORTICO_ROUTER_CA" --resolve "$APP_HOST:$P_EDGE:127.0.0.1" "https://$APP_HOST:$P_EDGE/small"
	reset_hwm "$EDGE_PID" "$CONN_PID"
	e0=$(rss_kib "$EDGE_PID") c0=$(rss_kib "$CONN_PID")
	log "phase 2: $STREAMS connections for ${DURATION}s on one tunnel (edge RSS $e0 KiB, connector $c0 KiB)"
	out=$BENCH_WORK/wrk-streams.txt
	timeout $((DURATION + 90)) wrk -t 2 -c "$STREAMS" -d "${DURATION}s" --timeout 30s --latency \
		-s "$BENCH_DIR/wrk-json.lua" -H "Host: $APP_HOST:$P_EDGE" "https://127.0.0.1:$P_EDGE/slow" >"$out" 2>&1 &
	WRK_PID=$!
	peak=0 deadline=$((SECONDS + DURATION + 90))
	while kill -0 "$WRK_PID" 2>/dev/null && ((SECONDS < deadline)); do
		s=$(edge_metric portico_edge_streams)
		((${s%.*} > peak)) && peak=${s%.*}
		sleep 0.5
	done
	wait "$WRK_PID" || log "wrk exited non-zero (see $out)"
	json=$(grep -m1 '^{"requests"' "$out" || echo '{"requests":0,"failed":true}')
	json=${json#\{}
	printf '{"phase":"streams_one_tunnel","connections":%d,"peak_edge_streams":%d,"edge_rss_before_kib":%d,"edge_hwm_kib":%d,"connector_rss_before_kib":%d,"connector_hwm_kib":%d,%s\n' \
		"$STREAMS" "$peak" "$e0" "$(hwm_kib "$EDGE_PID")" "$c0" "$(hwm_kib "$CONN_PID")" "$json" >>"$RESULT"
	log "phase 2: peak active streams $peak; $(tail -1 "$RESULT")"
fi

log "results: $RESULT"
cat "$RESULT"
