#!/usr/bin/env bash
# Portico side by side with its peers, in one run, on one machine.
#
# Starts one nginx backend (a 100-byte file and a 100 MiB file) and, in front
# of it: a plain nginx reverse proxy, the same proxy terminating TLS, rathole
# over TCP, rathole over noise, and Portico (router + edge + connector, real
# processes). Then, repetition after repetition, each variant in turn
# (A B C D E F, A B C D E F, ...): wrk at 32 and 256 keepalive connections,
# h2load with many concurrent HTTP/2 streams over a few connections (the
# variants that speak HTTP/2: h2 over TLS for nginx-tls and Portico, h2c
# with prior knowledge for direct and nginx, on listeners of their own; not
# rathole), wrk with a new connection per request, a 100 MiB download with
# curl, and the peak RSS of the variant's tunnel processes. Results go to
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
#   BENCH_H2_CONNS [4]    h2load connections for the HTTP/2 test (0 skips it)
#   BENCH_H2_STREAMS [32] concurrent streams per h2load connection (-m; nginx
#                         and the edge allow 128)
#   BENCH_H2_WARMUP [1]   seconds of h2load warm-up before the measured
#                         BENCH_DURATION (connections and TLS set up in it)
#   BENCH_VARIANTS ["direct nginx nginx-tls rathole-tcp rathole-noise portico portico-mt"]
#   BENCH_PORT_BASE [18100]  ports BASE..BASE+29 on 127.0.0.1 (TCP and UDP)
#   BENCH_OUT [target/bench/DATE]  results directory
#   BENCH_SKIP_SETUP=1    skip bench/setup.sh (apt, rathole, cargo build; rathole
#                         is built only when a rathole variant is selected)
#   BENCH_TOOLS [/opt/portico-bench]  where setup.sh put rathole
#   PORTICO_BASE_BIN []   a second portico binary (an earlier build) run as the
#                         variants portico-base and portico-base-mt, side by
#                         side with the current one: before/after in one run
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
H2_CONNS=${BENCH_H2_CONNS:-4}
H2_STREAMS=${BENCH_H2_STREAMS:-32}
H2_WARMUP=${BENCH_H2_WARMUP:-1}
VARIANTS=${BENCH_VARIANTS:-direct nginx nginx-tls rathole-tcp rathole-noise portico portico-mt}
BASE=${BENCH_PORT_BASE:-18100}
BENCH_TOOLS=${BENCH_TOOLS:-/opt/portico-bench}
PORTICO_BIN=${PORTICO_BIN:-$REPO_DIR/target/release/portico}
PORTICO_BASE_BIN=${PORTICO_BASE_BIN:-}
RATHOLE_BIN=${RATHOLE_BIN:-$BENCH_TOOLS/bin/rathole}
PORTICO_TUNNELS=${PORTICO_TUNNELS:-4}
BENCH_OUT=${BENCH_OUT:-$REPO_DIR/target/bench/$(date +%Y%m%d-%H%M%S)}
BENCH_OUT=$(realpath -m "$BENCH_OUT") # nginx and the tunnels get absolute paths
BENCH_WORK=$BENCH_OUT/work
export BENCH_DIR REPO_DIR BENCH_TOOLS

# shellcheck source=lib.sh
source "$BENCH_DIR/lib.sh"

for n in "$DURATION" "$REPS" "$THREADS" "$CLOSE_CONNS" "$DOWNLOADS" "$H2_STREAMS" $CONNS; do
	[[ $n =~ ^[0-9]+$ && $n -ge 1 ]] || die "not a positive integer: '$n'"
done
for n in "$H2_CONNS" "$H2_WARMUP"; do
	[[ $n =~ ^[0-9]+$ ]] || die "not a number: '$n'"
done
((REPS <= 50 && DURATION <= 600)) || die "BENCH_REPS <= 50 and BENCH_DURATION <= 600, please"
((H2_STREAMS <= 1000 && H2_WARMUP <= 60)) || die "BENCH_H2_STREAMS <= 1000 and BENCH_H2_WARMUP <= 60, please"
WANT_RATHOLE=0
[[ " $VARIANTS " == *" rathole-"* ]] && WANT_RATHOLE=1

if [[ ${BENCH_SKIP_SETUP:-0} != 1 ]]; then
	BENCH_TOOLS=$BENCH_TOOLS BENCH_SKIP_RATHOLE=$((1 - WANT_RATHOLE)) "$BENCH_DIR/setup.sh"
fi
[[ -x $PORTICO_BIN ]] || die "no portico binary at $PORTICO_BIN (run bench/setup.sh or set PORTICO_BIN)"
if [[ " $VARIANTS " == *" portico-base"* ]]; then
	[[ -x $PORTICO_BASE_BIN ]] || die "the portico-base variants need PORTICO_BASE_BIN, an earlier build's binary"
fi
if ((WANT_RATHOLE)); then
	[[ -x $RATHOLE_BIN ]] || die "no rathole binary at $RATHOLE_BIN (run bench/setup.sh or set RATHOLE_BIN)"
fi
if ((H2_CONNS > 0)); then
	command -v h2load >/dev/null || die "h2load is missing (Debian package nghttp2-client; run bench/setup.sh)"
fi

mkdir -p "$BENCH_OUT" "$BENCH_WORK"
# The 100 MiB file is not kept with the results.
LOAD_PID= # a load generator running in the background (run_h2)
trap '[[ -n $LOAD_PID ]] && kill "$LOAD_PID" 2>/dev/null; cleanup_pids; rm -f "$BENCH_WORK/www/big"' EXIT
trap 'exit 130' INT TERM
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
unset RUST_LOG

P_BACKEND=$BASE
P_NGINX=$((BASE + 1))
P_NGINX_TLS=$((BASE + 2))
P_BACKEND_H2C=$((BASE + 3)) # h2c listeners: nginx 1.22 speaks h2c on a listener
P_NGINX_H2C=$((BASE + 4))   # that speaks nothing else (prior knowledge only)
P_RH_TCP_CTL=$((BASE + 10))
P_RH_TCP=$((BASE + 11))
P_RH_NOISE_CTL=$((BASE + 12))
P_RH_NOISE=$((BASE + 13))
require_ports_free "$P_BACKEND" "$P_NGINX" "$P_NGINX_TLS" "$P_BACKEND_H2C" "$P_NGINX_H2C" "$P_RH_TCP_CTL" "$P_RH_TCP" \
	"$P_RH_NOISE_CTL" "$P_RH_NOISE" $(seq $((BASE + 20)) $((BASE + 39)))

APP_HOST=bench.apps.localhost
RUNS=$BENCH_OUT/runs.jsonl
: >"$RUNS"

{
	m=$(machine_json)
	printf '%s\n' "${m%\}},\"duration_s\":$DURATION,\"reps\":$REPS,\"threads\":$THREADS,\"conns\":\"$CONNS\",\"close_conns\":$CLOSE_CONNS,\"h2_conns\":$H2_CONNS,\"h2_streams\":$H2_STREAMS,\"h2_warmup_s\":$H2_WARMUP,\"portico_tunnels\":$PORTICO_TUNNELS,\"tcp_tw_reuse\":\"$(sysctl -n net.ipv4.tcp_tw_reuse 2>/dev/null)\",\"started\":\"$(date -u +%FT%TZ)\"}"
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
BACKEND_PID=$(start_nginx nginx-backend "    server { listen 127.0.0.1:$P_BACKEND; root $WWW; location / { } }
    server { listen 127.0.0.1:$P_BACKEND_H2C http2; root $WWW; location / { } }")
wait_http 30 "http://127.0.0.1:$P_BACKEND/small"
BACKEND_PIDS=$(children "$BACKEND_PID")
HZ=$(getconf CLK_TCK)

# H2_URL: what h2load requests; H2_ARGS: its extra arguments (--connect-to
# for names that only resolve here); H2_PROTO: the protocol it must
# negotiate (h2 over TLS by ALPN, h2c in clear text). Variants without
# H2_URL (rathole) have no h2 test.
declare -A TUNNEL_PIDS WRK_URL WRK_HOST CURL_ARGS H2_URL H2_ARGS H2_PROTO

WRK_URL[direct]=http://127.0.0.1:$P_BACKEND
TUNNEL_PIDS[direct]=""
CURL_ARGS[direct]="http://127.0.0.1:$P_BACKEND/big"
H2_URL[direct]=http://127.0.0.1:$P_BACKEND_H2C/small
H2_PROTO[direct]=h2c

if [[ " $VARIANTS " == *" nginx "* ]]; then
	log "starting nginx reverse proxy on :$P_NGINX"
	NGX_PROXY_PID=$(start_nginx nginx-proxy "    server { listen 127.0.0.1:$P_NGINX; $PROXY_LOCATION }
    server { listen 127.0.0.1:$P_NGINX_H2C http2; $PROXY_LOCATION }")
	wait_http 30 "http://127.0.0.1:$P_NGINX/small"
	TUNNEL_PIDS[nginx]=$(children "$NGX_PROXY_PID")
	WRK_URL[nginx]=http://127.0.0.1:$P_NGINX
	CURL_ARGS[nginx]="http://127.0.0.1:$P_NGINX/big"
	H2_URL[nginx]=http://127.0.0.1:$P_NGINX_H2C/small
	H2_PROTO[nginx]=h2c
fi

if [[ " $VARIANTS " == *" nginx-tls "* ]]; then
	log "starting nginx TLS reverse proxy on :$P_NGINX_TLS"
	d=$BENCH_WORK/nginx-tls
	mkdir -p "$d"
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
		-subj "/CN=$APP_HOST" -addext "subjectAltName=DNS:$APP_HOST" \
		-keyout "$d/key.pem" -out "$d/cert.pem" 2>/dev/null
	# `ssl http2`: nginx 1.22 (Debian 12) has no `http2 on;` (1.25.1); ALPN
	# picks h2 for h2load, HTTP/1.1 for wrk (which offers no h2) and curl --http1.1.
	NGX_TLS_PID=$(start_nginx nginx-tls "    server { listen 127.0.0.1:$P_NGINX_TLS ssl http2;
        ssl_certificate $d/cert.pem; ssl_certificate_key $d/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m;
        $PROXY_LOCATION }")
	wait_http 30 -k "https://127.0.0.1:$P_NGINX_TLS/small"
	TUNNEL_PIDS[nginx-tls]=$(children "$NGX_TLS_PID")
	WRK_URL[nginx-tls]=https://127.0.0.1:$P_NGINX_TLS
	CURL_ARGS[nginx-tls]="-k https://127.0.0.1:$P_NGINX_TLS/big"
	H2_URL[nginx-tls]=https://$APP_HOST:$P_NGINX_TLS/small
	H2_ARGS[nginx-tls]=--connect-to=127.0.0.1:$P_NGINX_TLS
	H2_PROTO[nginx-tls]=h2
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
	local variant=$1 off=$2 d=$BENCH_WORK/$1 tok edge_pid conn_pid bin=$PORTICO_BIN
	shift 2
	[[ $variant == portico-base* ]] && bin=$PORTICO_BASE_BIN
	local p_router=$((BASE + off)) p_edge=$((BASE + off + 1)) p_tunnel=$((BASE + off + 2))
	local p_edge_metrics=$((BASE + off + 3)) p_conn_metrics=$((BASE + off + 4))
	mkdir -p "$d"
	export PORTICO_ROUTER=https://127.0.0.1:$p_router
	export PORTICO_ROUTER_CA=$d/router/ca.pem
	export PORTICO_ADMIN_TOKEN_FILE=$d/router/admin-token
	log "starting $variant router :$p_router"
	spawn "$variant-router" "$bin" --log warn router --data "$d/router" \
		--listen "127.0.0.1:$p_router" --apps-domain apps.localhost >/dev/null
	wait_file "$PORTICO_ADMIN_TOKEN_FILE" 30
	wait_file "$PORTICO_ROUTER_CA" 30
	wait_tcp "$p_router" 30
	log "starting $variant edge :$p_edge (tunnels udp :$p_tunnel) $*"
	tok=$("$bin" token create --edge 2>>"$BENCH_WORK/portico-admin.log")
	edge_pid=$(spawn "$variant-edge" "$bin" --log warn "$@" edge --state "$d/edge" --token "$tok" \
		--public-listen "127.0.0.1:$p_edge" --tunnel-listen "127.0.0.1:$p_tunnel" \
		--metrics-listen "127.0.0.1:$p_edge_metrics")
	wait_http 60 "http://127.0.0.1:$p_edge_metrics/ready"
	log "starting $variant connector ($PORTICO_TUNNELS tunnels) $*"
	tok=$("$bin" token create --group Default 2>>"$BENCH_WORK/portico-admin.log")
	conn_pid=$(spawn "$variant-connector" "$bin" --log warn "$@" connector --state "$d/connector" \
		--token "$tok" --tunnels "$PORTICO_TUNNELS" --metrics-listen "127.0.0.1:$p_conn_metrics")
	wait_http 60 "http://127.0.0.1:$p_conn_metrics/ready"
	"$bin" app create bench --internal-url "http://127.0.0.1:$P_BACKEND/" \
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
	# h2load sends the URL's host as SNI and :authority, and dials
	# --connect-to: the edge routes it like any browser's request.
	H2_URL[$variant]=https://$APP_HOST:$p_edge/small
	H2_ARGS[$variant]=--connect-to=127.0.0.1:$p_edge
	H2_PROTO[$variant]=h2
}

# `portico`: each process on one thread (`--threads 1`).
# `portico-mt`: the default, as operators run it: the edge and the connector
# with one shard (a single-thread runtime) per core; an earlier build
# (portico-base-mt) may instead run tokio's multi-thread runtime.
if [[ " $VARIANTS " == *" portico "* ]]; then
	start_portico portico 20 --threads 1
fi
if [[ " $VARIANTS " == *" portico-mt "* ]]; then
	start_portico portico-mt 25
fi
# The same two on an earlier build (PORTICO_BASE_BIN), for before/after.
if [[ " $VARIANTS " == *" portico-base "* ]]; then
	start_portico portico-base 30 --threads 1
fi
if [[ " $VARIANTS " == *" portico-base-mt "* ]]; then
	start_portico portico-base-mt 35
fi

# The HTTP/2 listeners answer in HTTP/2: one curl each, a check before the
# measurements (h2load-json.py checks each run's protocol too).
if ((H2_CONNS > 0)); then
	for v in $VARIANTS; do
		if [[ -z ${H2_URL[$v]:-} ]]; then
			log "h2: $v has no HTTP/2 front end, no h2 test"
			continue
		fi
		h2curl=(--http2-prior-knowledge)
		[[ ${H2_PROTO[$v]} == h2 ]] && h2curl=(--http2 -k)
		[[ -n ${H2_ARGS[$v]:-} ]] && h2curl+=(--connect-to "::${H2_ARGS[$v]#--connect-to=}")
		got=$(curl -s -o /dev/null -m 10 -w '%{http_code} HTTP/%{http_version}' "${h2curl[@]}" "${H2_URL[$v]}" || true)
		[[ $got == "200 HTTP/2" ]] || log "WARNING: $v over HTTP/2: '$got' from curl ${h2curl[*]} ${H2_URL[$v]}"
	done
fi

# ---------------------------------------------------------------- measure
# record JSON-OBJECT-BODY: appends one line to runs.jsonl.
record() {
	printf '{"rep":%d,"variant":"%s",%s}\n' "$REP" "$VARIANT" "$1" >>"$RUNS"
}

# CPU time spent during a load run: the variant's tunnel processes, the
# backend, and the whole machine (the load generator included). Steadier
# than req/s on a small shared machine; report.py turns it into µs per
# request. cpu_start before the run; cpu_json after it prints the JSON
# fields.
cpu_now() {
	# shellcheck disable=SC2086  # lists of pids
	echo "$(cpu_ticks ${TUNNEL_PIDS[$VARIANT]}) $(cpu_ticks $BACKEND_PIDS) $(machine_ticks)"
}
cpu_start() {
	CPU0=$(cpu_now)
}
cpu_json() {
	local -a a b
	read -r -a a <<<"$CPU0"
	read -r -a b <<<"$(cpu_now)"
	printf '"hz":%d,"tunnel_user_ticks":%d,"tunnel_sys_ticks":%d,"backend_ticks":%d,"machine_busy_ticks":%d,"machine_ticks":%d' \
		"$HZ" $((b[0] - a[0])) $((b[1] - a[1])) $((b[2] + b[3] - a[2] - a[3])) $((b[4] - a[4])) $((b[5] - a[5]))
}

run_wrk() { # TEST CONNS [close]
	local test=$1 conns=$2 close=${3:-} args=() out cpu
	args=(-t "$THREADS" -c "$conns" -d "${DURATION}s" --timeout 10s --latency -s "$BENCH_DIR/wrk-json.lua")
	[[ -n ${WRK_HOST[$VARIANT]:-} ]] && args+=(-H "Host: ${WRK_HOST[$VARIANT]}")
	[[ -n $close ]] && args+=(-H "Connection: close")
	out=$BENCH_WORK/wrk-$REP-$VARIANT-$test.txt
	cpu_start
	if ! timeout $((DURATION + 60)) wrk "${args[@]}" "${WRK_URL[$VARIANT]}/small" >"$out" 2>&1; then
		log "wrk failed for $VARIANT $test (see $out)"
	fi
	cpu=$(cpu_json)
	local json
	json=$(grep -m1 '^{"requests"' "$out" || echo '{"requests":0,"failed":true}')
	json=${json#\{}
	record "\"test\":\"$test\",\"conns\":$conns,$cpu,${json%\}}"
	log "  $VARIANT $test: $(grep -oE '"rps":[0-9.]+|"p99_ms":[0-9.]+' <<<"$json" | tr '\n' ' ')"
}

# run_h2: h2load, H2_CONNS connections with H2_STREAMS concurrent streams
# each, GET /small for BENCH_DURATION after BENCH_H2_WARMUP seconds. h2load
# counts only the requests of the measured part, so the CPU readings start
# when it prints that the main duration started (polled every 20 ms), not
# when it starts. Failed, errored or timed-out requests, 4xx/5xx responses,
# or another protocol than H2_PROTO mark the run failed (h2load-json.py).
run_h2() {
	local out rc=0 cpu json threads=$((THREADS < H2_CONNS ? THREADS : H2_CONNS)) args=()
	args=(-t "$threads" -c "$H2_CONNS" -m "$H2_STREAMS" -D "$DURATION")
	((H2_WARMUP > 0)) && args+=("--warm-up-time=$H2_WARMUP")
	[[ -n ${H2_ARGS[$VARIANT]:-} ]] && args+=("${H2_ARGS[$VARIANT]}")
	out=$BENCH_WORK/h2load-$REP-$VARIANT.txt
	: >"$out"
	timeout $((DURATION + H2_WARMUP + 60)) h2load "${args[@]}" "${H2_URL[$VARIANT]}" >"$out" 2>&1 &
	LOAD_PID=$!
	if ((H2_WARMUP > 0)); then
		while kill -0 "$LOAD_PID" 2>/dev/null && ! grep -q '^Main benchmark duration is started' "$out"; do
			sleep 0.02
		done
	fi
	cpu_start
	wait "$LOAD_PID" || rc=$?
	LOAD_PID=
	cpu=$(cpu_json)
	json=$(python3 "$BENCH_DIR/h2load-json.py" "$out" "$rc" "${H2_PROTO[$VARIANT]}") ||
		json='{"requests":0,"rps":0,"failed":true,"problem":"h2load-json.py failed"}'
	json=${json#\{}
	record "\"test\":\"h2\",\"conns\":$H2_CONNS,\"streams\":$H2_STREAMS,\"duration_s\":$DURATION,\"warmup_s\":$H2_WARMUP,$cpu,${json%\}}"
	if [[ $json == *'"failed":true'* ]]; then
		log "  $VARIANT h2: FLAGGED: $(sed -n 's/.*"problem":"\([^"]*\)".*/\1/p' <<<"$json") (see $out)"
	else
		log "  $VARIANT h2 (${H2_CONNS}x${H2_STREAMS} streams): $(grep -oE '"rps":[0-9.]+|"mean_ms":[0-9.]+' <<<"$json" | tr '\n' ' ')"
	fi
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
		if ((H2_CONNS > 0)) && [[ -n ${H2_URL[$VARIANT]:-} ]]; then
			run_h2
		fi
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
