#!/usr/bin/env bash
# Portico side by side with its peers, in one run, on one machine.
#
# Starts one nginx backend (a 100-byte file and a 100 MiB file) and, in front
# of it: a plain nginx reverse proxy, the same proxy terminating TLS, rathole
# over TCP, rathole over noise, and Portico (router + edge + connector, real
# processes). Then, repetition after repetition, each variant in turn
# (A B C D E F, A B C D E F, ...): wrk at 32 and 256 keepalive connections,
# wrk with a new connection per request, a 100 MiB download with curl, and
# the peak RSS of the variant's tunnel processes. Results go to
# $BENCH_OUT/runs.jsonl (one JSON object per measurement), and report.py
# writes summary.json and summary.md (medians and ratios).
#
# Everything listens on 127.0.0.1 only; every load run is bounded in time.
# See bench/README.md and BENCHMARKS.md.
#
# Env (defaults in brackets):
#   BENCH_DURATION [10]   seconds per wrk run
#   BENCH_REPS [3]        repetitions of the whole interleaved cycle
#   BENCH_THREADS [2]     wrk threads
#   BENCH_CONNS ["32 256"]  keepalive connection counts
#   BENCH_CLOSE_CONNS [32]  connections for the new-connection-per-request run
#   BENCH_DOWNLOADS [1]   100 MiB downloads per variant per repetition
#   BENCH_VARIANTS ["direct nginx nginx-tls rathole-tcp rathole-noise portico portico-mt"]
#   BENCH_PORT_BASE [18100]  ports BASE..BASE+30 on 127.0.0.1 (TCP and UDP)
#   BENCH_OUT [target/bench/DATE]  results directory
#   BENCH_SKIP_SETUP=1    skip bench/setup.sh (apt, rathole, cargo build)
#   BENCH_TOOLS [/opt/portico-bench]  where setup.sh put rathole
#   PORTICO_BIN [target/release/portico], RATHOLE_BIN [$BENCH_TOOLS/bin/rathole]
#   PORTICO_TUNNELS [4]   tunnels the connector keeps
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
DURATION=${BENCH_DURATION:-10}
REPS=${BENCH_REPS:-3}
THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNS:-32 256}
CLOSE_CONNS=${BENCH_CLOSE_CONNS:-32}
DOWNLOADS=${BENCH_DOWNLOADS:-1}
VARIANTS=${BENCH_VARIANTS:-direct nginx nginx-tls rathole-tcp rathole-noise portico portico-mt}
BASE=${BENCH_PORT_BASE:-18100}
BENCH_TOOLS=${BENCH_TOOLS:-/opt/portico-bench}
PORTICO_BIN=${PORTICO_BIN:-$REPO_DIR/target/release/portico}
RATHOLE_BIN=${RATHOLE_BIN:-$BENCH_TOOLS/bin/rathole}
PORTICO_TUNNELS=${PORTICO_TUNNELS:-4}
BENCH_OUT=${BENCH_OUT:-$REPO_DIR/target/bench/$(date +%Y%m%d-%H%M%S)}
BENCH_OUT=$(realpath -m "$BENCH_OUT") # nginx and the tunnels get absolute paths
BENCH_WORK=$BENCH_OUT/work
export BENCH_DIR REPO_DIR BENCH_TOOLS

# shellcheck source=lib.sh
source "$BENCH_DIR/lib.sh"

for n in "$DURATION" "$REPS" "$THREADS" "$CLOSE_CONNS" "$DOWNLOADS" $CONNS; do
	[[ $n =~ ^[0-9]+$ && $n -ge 1 ]] || die "not a positive integer: '$n'"
done
((REPS <= 50 && DURATION <= 600)) || die "BENCH_REPS <= 50 and BENCH_DURATION <= 600, please"

if [[ ${BENCH_SKIP_SETUP:-0} != 1 ]]; then
	BENCH_TOOLS=$BENCH_TOOLS "$BENCH_DIR/setup.sh"
fi
[[ -x $PORTICO_BIN ]] || die "no portico binary at $PORTICO_BIN (run bench/setup.sh or set PORTICO_BIN)"
[[ -x $RATHOLE_BIN ]] || die "no rathole binary at $RATHOLE_BIN (run bench/setup.sh or set RATHOLE_BIN)"

mkdir -p "$BENCH_OUT" "$BENCH_WORK"
# The 100 MiB file is not kept with the results.
trap 'cleanup_pids; rm -f "$BENCH_WORK/www/big"' EXIT
trap 'exit 130' INT TERM
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
unset RUST_LOG

P_BACKEND=$BASE
P_NGINX=$((BASE + 1))
P_NGINX_TLS=$((BASE + 2))
P_RH_TCP_CTL=$((BASE + 10))
P_RH_TCP=$((BASE + 11))
P_RH_NOISE_CTL=$((BASE + 12))
P_RH_NOISE=$((BASE + 13))
require_ports_free "$P_BACKEND" "$P_NGINX" "$P_NGINX_TLS" "$P_RH_TCP_CTL" "$P_RH_TCP" \
	"$P_RH_NOISE_CTL" "$P_RH_NOISE" $(seq $((BASE + 20)) $((BASE + 29)))

APP_HOST=bench.apps.localhost
RUNS=$BENCH_OUT/runs.jsonl
: >"$RUNS"

{
	m=$(machine_json)
	printf '%s\n' "${m%\}},\"duration_s\":$DURATION,\"reps\":$REPS,\"threads\":$THREADS,\"conns\":\"$CONNS\",\"close_conns\":$CLOSE_CONNS,\"portico_tunnels\":$PORTICO_TUNNELS,\"tcp_tw_reuse\":\"$(sysctl -n net.ipv4.tcp_tw_reuse 2>/dev/null)\",\"started\":\"$(date -u +%FT%TZ)\"}"
} >"$BENCH_OUT/machine.json"
log "machine: $(cat "$BENCH_OUT/machine.json")"

# ---------------------------------------------------------------- backend
WWW=$BENCH_WORK/www
mkdir -p "$WWW"
head -c 100 /dev/zero | tr '\0' 'x' >"$WWW/small"
head -c $((100 * 1024 * 1024)) /dev/urandom >"$WWW/big"

PROXY_LOCATION="location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host \$host;
            proxy_buffering off;
        }"

log "starting nginx backend on :$P_BACKEND"
BACKEND_PID=$(start_nginx nginx-backend "    server { listen 127.0.0.1:$P_BACKEND; root $WWW; location / { } }")
wait_http 30 "http://127.0.0.1:$P_BACKEND/small"
BACKEND_PIDS=$(children "$BACKEND_PID")
HZ=$(getconf CLK_TCK)

declare -A TUNNEL_PIDS WRK_URL WRK_HOST CURL_ARGS

WRK_URL[direct]=http://127.0.0.1:$P_BACKEND
TUNNEL_PIDS[direct]=""
CURL_ARGS[direct]="http://127.0.0.1:$P_BACKEND/big"

if [[ " $VARIANTS " == *" nginx "* ]]; then
	log "starting nginx reverse proxy on :$P_NGINX"
	NGX_PROXY_PID=$(start_nginx nginx-proxy "    server { listen 127.0.0.1:$P_NGINX; $PROXY_LOCATION }")
	wait_http 30 "http://127.0.0.1:$P_NGINX/small"
	TUNNEL_PIDS[nginx]=$(children "$NGX_PROXY_PID")
	WRK_URL[nginx]=http://127.0.0.1:$P_NGINX
	CURL_ARGS[nginx]="http://127.0.0.1:$P_NGINX/big"
fi

if [[ " $VARIANTS " == *" nginx-tls "* ]]; then
	log "starting nginx TLS reverse proxy on :$P_NGINX_TLS"
	d=$BENCH_WORK/nginx-tls
	mkdir -p "$d"
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
		-subj "/CN=$APP_HOST" -addext "subjectAltName=DNS:$APP_HOST" \
		-keyout "$d/key.pem" -out "$d/cert.pem" 2>/dev/null
	NGX_TLS_PID=$(start_nginx nginx-tls "    server { listen 127.0.0.1:$P_NGINX_TLS ssl;
        ssl_certificate $d/cert.pem; ssl_certificate_key $d/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m;
        $PROXY_LOCATION }")
	wait_http 30 -k "https://127.0.0.1:$P_NGINX_TLS/small"
	TUNNEL_PIDS[nginx-tls]=$(children "$NGX_TLS_PID")
	WRK_URL[nginx-tls]=https://127.0.0.1:$P_NGINX_TLS
	CURL_ARGS[nginx-tls]="-k https://127.0.0.1:$P_NGINX_TLS/big"
fi

# ---------------------------------------------------------------- rathole
start_rathole() { # NAME CTL-PORT VISIT-PORT TRANSPORT(tcp|noise)
	local name=$1 ctl=$2 visit=$3 transport=$4 d=$BENCH_WORK/$1
	mkdir -p "$d"
	local st="" ct=""
	if [[ $transport == noise ]]; then
		local keys priv pub
		keys=$("$RATHOLE_BIN" --genkey)
		priv=$(awk '/Private Key:/ {getline; print; exit}' <<<"$keys")
		pub=$(awk '/Public Key:/ {getline; print; exit}' <<<"$keys")
		st=$'[server.transport]\ntype = "noise"\n[server.transport.noise]\nlocal_private_key = "'$priv$'"\n'
		ct=$'[client.transport]\ntype = "noise"\n[client.transport.noise]\nremote_public_key = "'$pub$'"\n'
	fi
	cat >"$d/server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$ctl"
default_token = "bench-$RANDOM$RANDOM"
$st
[server.services.web]
bind_addr = "127.0.0.1:$visit"
EOF
	local token
	token=$(awk -F'"' '/default_token/ {print $2}' "$d/server.toml")
	cat >"$d/client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$ctl"
default_token = "$token"
$ct
[client.services.web]
local_addr = "127.0.0.1:$P_BACKEND"
EOF
	local s c
	s=$(spawn "$name-server" env RUST_LOG=warn "$RATHOLE_BIN" --server "$d/server.toml")
	wait_tcp "$ctl" 30
	c=$(spawn "$name-client" env RUST_LOG=warn "$RATHOLE_BIN" --client "$d/client.toml")
	wait_http 30 "http://127.0.0.1:$visit/small"
	TUNNEL_PIDS[$name]="$s $c"
	WRK_URL[$name]=http://127.0.0.1:$visit
	CURL_ARGS[$name]="http://127.0.0.1:$visit/big"
}
if [[ " $VARIANTS " == *" rathole-tcp "* ]]; then
	log "starting rathole (tcp) server :$P_RH_TCP_CTL, service :$P_RH_TCP"
	start_rathole rathole-tcp "$P_RH_TCP_CTL" "$P_RH_TCP" tcp
fi
if [[ " $VARIANTS " == *" rathole-noise "* ]]; then
	log "starting rathole (noise) server :$P_RH_NOISE_CTL, service :$P_RH_NOISE"
	start_rathole rathole-noise "$P_RH_NOISE_CTL" "$P_RH_NOISE" noise
fi

# ---------------------------------------------------------------- portico
# start_portico VARIANT PORT-OFFSET [--threads N]: a router, an edge and a
# connector of their own on ports BASE+OFFSET..+4, the app published.
start_portico() {
	local variant=$1 off=$2 d=$BENCH_WORK/$1 tok edge_pid conn_pid
	shift 2
	local p_router=$((BASE + off)) p_edge=$((BASE + off + 1)) p_tunnel=$((BASE + off + 2))
	local p_edge_metrics=$((BASE + off + 3)) p_conn_metrics=$((BASE + off + 4))
	mkdir -p "$d"
	export PORTICO_ROUTER=https://127.0.0.1:$p_router
	export PORTICO_ROUTER_CA=$d/router/ca.pem
	export PORTICO_ADMIN_TOKEN_FILE=$d/router/admin-token
	log "starting $variant router :$p_router"
	spawn "$variant-router" "$PORTICO_BIN" --log warn router --data "$d/router" \
		--listen "127.0.0.1:$p_router" --apps-domain apps.localhost >/dev/null
	wait_file "$PORTICO_ADMIN_TOKEN_FILE" 30
	wait_file "$PORTICO_ROUTER_CA" 30
	wait_tcp "$p_router" 30
	log "starting $variant edge :$p_edge (tunnels udp :$p_tunnel) $*"
	tok=$("$PORTICO_BIN" token create --edge 2>>"$BENCH_WORK/portico-admin.log")
	edge_pid=$(spawn "$variant-edge" "$PORTICO_BIN" --log warn "$@" edge --state "$d/edge" --token "$tok" \
		--public-listen "127.0.0.1:$p_edge" --tunnel-listen "127.0.0.1:$p_tunnel" \
		--metrics-listen "127.0.0.1:$p_edge_metrics")
	wait_http 60 "http://127.0.0.1:$p_edge_metrics/ready"
	log "starting $variant connector ($PORTICO_TUNNELS tunnels) $*"
	tok=$("$PORTICO_BIN" token create --group Default 2>>"$BENCH_WORK/portico-admin.log")
	conn_pid=$(spawn "$variant-connector" "$PORTICO_BIN" --log warn "$@" connector --state "$d/connector" \
		--token "$tok" --tunnels "$PORTICO_TUNNELS" --metrics-listen "127.0.0.1:$p_conn_metrics")
	wait_http 60 "http://127.0.0.1:$p_conn_metrics/ready"
	"$PORTICO_BIN" app create bench --internal-url "http://127.0.0.1:$P_BACKEND/" \
		--external-host "$APP_HOST" >"$d/app.txt" 2>>"$BENCH_WORK/portico-admin.log"
	# The edge picks its one wildcard certificate whatever the SNI, and routes
	# by the Host header: wrk dials 127.0.0.1 and sends Host; curl resolves
	# the real name to 127.0.0.1 and verifies against the router's CA.
	wait_http 60 --cacert "$PORTICO_ROUTER_CA" --resolve "$APP_HOST:$p_edge:127.0.0.1" \
		"https://$APP_HOST:$p_edge/small"
	TUNNEL_PIDS[$variant]="$edge_pid $conn_pid"
	WRK_URL[$variant]=https://127.0.0.1:$p_edge
	WRK_HOST[$variant]="$APP_HOST:$p_edge"
	CURL_ARGS[$variant]="--cacert $PORTICO_ROUTER_CA --resolve $APP_HOST:$p_edge:127.0.0.1 https://$APP_HOST:$p_edge/big"
}

# `portico`: each process on one thread (`--threads 1`): on a machine this
# small, shared with wrk and nginx, the fastest setting (BENCHMARKS.md).
# `portico-mt`: the default runtime, one worker thread per core.
if [[ " $VARIANTS " == *" portico "* ]]; then
	start_portico portico 20 --threads 1
fi
if [[ " $VARIANTS " == *" portico-mt "* ]]; then
	start_portico portico-mt 25
fi

# ---------------------------------------------------------------- measure
# record JSON-OBJECT-BODY: appends one line to runs.jsonl.
record() {
	printf '{"rep":%d,"variant":"%s",%s}\n' "$REP" "$VARIANT" "$1" >>"$RUNS"
}

run_wrk() { # TEST CONNS [close]
	local test=$1 conns=$2 close=${3:-} args=() out
	args=(-t "$THREADS" -c "$conns" -d "${DURATION}s" --timeout 10s --latency -s "$BENCH_DIR/wrk-json.lua")
	[[ -n ${WRK_HOST[$VARIANT]:-} ]] && args+=(-H "Host: ${WRK_HOST[$VARIANT]}")
	[[ -n $close ]] && args+=(-H "Connection: close")
	out=$BENCH_WORK/wrk-$REP-$VARIANT-$test.txt
	# CPU time spent during the run: the variant's tunnel processes, the
	# backend, and the whole machine (wrk included). Steadier than req/s on
	# a small shared machine; report.py turns it into µs per request.
	local tun0 back0 mach0 tun1 back1 mach1
	# shellcheck disable=SC2086  # lists of pids
	tun0=$(cpu_ticks ${TUNNEL_PIDS[$VARIANT]}) back0=$(cpu_ticks $BACKEND_PIDS) mach0=$(machine_ticks)
	if ! timeout $((DURATION + 60)) wrk "${args[@]}" "${WRK_URL[$VARIANT]}/small" >"$out" 2>&1; then
		log "wrk failed for $VARIANT $test (see $out)"
	fi
	# shellcheck disable=SC2086
	tun1=$(cpu_ticks ${TUNNEL_PIDS[$VARIANT]}) back1=$(cpu_ticks $BACKEND_PIDS) mach1=$(machine_ticks)
	local -a a b
	read -r -a a <<<"$tun0 $back0 $mach0"
	read -r -a b <<<"$tun1 $back1 $mach1"
	local cpu="\"hz\":$HZ,\"tunnel_user_ticks\":$((b[0] - a[0])),\"tunnel_sys_ticks\":$((b[1] - a[1]))"
	cpu+=",\"backend_ticks\":$((b[2] + b[3] - a[2] - a[3])),\"machine_busy_ticks\":$((b[4] - a[4])),\"machine_ticks\":$((b[5] - a[5]))"
	local json
	json=$(grep -m1 '^{"requests"' "$out" || echo '{"requests":0,"failed":true}')
	json=${json#\{}
	record "\"test\":\"$test\",\"conns\":$conns,$cpu,${json%\}}"
	log "  $VARIANT $test: $(grep -oE '"rps":[0-9.]+|"p99_ms":[0-9.]+' <<<"$json" | tr '\n' ' ')"
}

run_download() {
	local i res code speed size
	for ((i = 1; i <= DOWNLOADS; i++)); do
		# shellcheck disable=SC2086  # CURL_ARGS holds several words on purpose
		res=$(curl -s --http1.1 -o /dev/null -m 300 -w '%{http_code} %{speed_download} %{size_download}' \
			${CURL_ARGS[$VARIANT]} 2>/dev/null || echo "000 0 0")
		read -r code speed size <<<"$res"
		code=$((10#${code:-0})) # "000" when curl fails: not valid JSON as is
		record "\"test\":\"download_100MiB\",\"status\":$code,\"bytes_per_s\":${speed%.*},\"size\":${size%.*}"
		log "  $VARIANT download: status $code, $((${speed%.*} / 1048576)) MiB/s"
	done
}

START=$SECONDS
for ((REP = 1; REP <= REPS; REP++)); do
	log "repetition $REP/$REPS"
	for VARIANT in $VARIANTS; do
		[[ -n ${WRK_URL[$VARIANT]:-} ]] || die "unknown variant $VARIANT"
		pids=${TUNNEL_PIDS[$VARIANT]}
		# shellcheck disable=SC2086
		reset_hwm $pids
		for c in $CONNS; do
			run_wrk "small_c$c" "$c"
		done
		run_wrk "small_close_c$CLOSE_CONNS" "$CLOSE_CONNS" close
		run_download
		if [[ -n $pids ]]; then
			# shellcheck disable=SC2086
			record "\"test\":\"peak_rss\",\"rss_kib\":$(hwm_kib $pids),\"pids\":\"$pids\""
		fi
	done
done
log "measured in $((SECONDS - START)) s"

python3 "$BENCH_DIR/report.py" "$BENCH_OUT"
log "results: $BENCH_OUT/runs.jsonl, $BENCH_OUT/summary.json, $BENCH_OUT/summary.md"
cat "$BENCH_OUT/summary.md"
