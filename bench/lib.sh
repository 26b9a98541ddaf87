# shellcheck shell=bash
# Helpers shared by bench/run.sh, tunnel-scale.sh and profile.sh: ports, readiness
# polling with deadlines, process bookkeeping (only the pids we started),
# peak-RSS readings from /proc, and self-contained nginx configs.
#
# Source it after setting BENCH_OUT (the results directory) and BENCH_WORK
# (scratch directory for configs, state and logs).

BENCH_DIR=${BENCH_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
REPO_DIR=${REPO_DIR:-$(cd "$BENCH_DIR/.." && pwd)}

# Every pid we start goes here; cleanup kills exactly these.
BENCH_PIDS=()

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

# Fails when something already listens on 127.0.0.1:PORT (TCP) — we never
# take over someone else's port.
port_free_tcp() {
	! ss -Htln "sport = :$1" 2>/dev/null | grep -q .
}
port_free_udp() {
	! ss -Huln "sport = :$1" 2>/dev/null | grep -q .
}
require_ports_free() {
	local p
	for p in "$@"; do
		port_free_tcp "$p" || die "TCP port $p is in use; set BENCH_PORT_BASE to a free range"
		port_free_udp "$p" || die "UDP port $p is in use; set BENCH_PORT_BASE to a free range"
	done
}

# wait_tcp PORT [SECONDS]: polls until 127.0.0.1:PORT accepts, or fails.
wait_tcp() {
	local port=$1 deadline=$((SECONDS + ${2:-30}))
	while ((SECONDS < deadline)); do
		if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
			return 0
		fi
		sleep 0.1
	done
	die "nothing listens on 127.0.0.1:$port after ${2:-30}s"
}

# wait_file PATH [SECONDS]
wait_file() {
	local f=$1 deadline=$((SECONDS + ${2:-30}))
	while ((SECONDS < deadline)); do
		[[ -s $f ]] && return 0
		sleep 0.1
	done
	die "$f did not appear after ${2:-30}s"
}

# wait_http SECONDS CURL-ARGS...: polls until curl gets a 2xx.
wait_http() {
	local secs=$1
	shift
	local deadline=$((SECONDS + secs)) code=
	while ((SECONDS < deadline)); do
		code=$(curl -s -o /dev/null -m 5 -w '%{http_code}' "$@" 2>/dev/null || true)
		[[ $code == 2* ]] && return 0
		sleep 0.2
	done
	die "no 2xx from curl $* after ${secs}s (last status '$code')"
}

# spawn NAME CMD...: starts CMD in the background, logs to BENCH_WORK/NAME.log,
# records its pid, and prints it.
spawn() {
	local name=$1
	shift
	"$@" >"$BENCH_WORK/$name.log" 2>&1 &
	local pid=$!
	BENCH_PIDS+=("$pid")
	echo "$pid" >"$BENCH_WORK/$name.pid"
	echo "$pid"
}

# Kills the processes we started, by pid, and waits (bounded) for them.
# spawn often runs in a $(...) subshell, so the pid files are read too.
cleanup_pids() {
	local pid f
	for f in "$BENCH_WORK"/*.pid; do
		[[ -f $f ]] && BENCH_PIDS+=("$(cat "$f")")
	done
	for pid in "${BENCH_PIDS[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	local deadline=$((SECONDS + 10))
	for pid in "${BENCH_PIDS[@]}"; do
		while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null || true
	done
	BENCH_PIDS=()
}

# children PID: direct children (nginx workers of a master we started).
children() {
	pgrep -P "$1" 2>/dev/null | paste -sd' ' -
}

# reset_hwm PID...: resets VmHWM (peak RSS) so the next reading covers only
# what happens from now on (Linux: write 5 to /proc/PID/clear_refs).
reset_hwm() {
	local pid
	for pid in "$@"; do
		echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true
	done
}

# hwm_kib PID...: the sum of VmHWM over the pids, in KiB.
hwm_kib() {
	local pid total=0 v
	for pid in "$@"; do
		v=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
		total=$((total + ${v:-0}))
	done
	echo "$total"
}

# cpu_ticks PID...: user and system CPU time of the pids so far, in clock
# ticks, as "USER SYS" (fields 14 and 15 of /proc/PID/stat, counted after the
# command name, which may hold spaces).
cpu_ticks() {
	local pid u=0 s=0 rest f
	for pid in "$@"; do
		rest=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
		rest=${rest##*) }
		read -r -a f <<<"$rest"
		u=$((u + f[11])) s=$((s + f[12]))
	done
	echo "$u $s"
}

# machine_ticks: busy and total CPU time of the whole machine so far, in
# clock ticks, as "BUSY TOTAL" (the cpu line of /proc/stat; idle and iowait
# are not busy).
machine_ticks() {
	local _cpu user nice sys idle iowait irq softirq steal rest
	read -r _cpu user nice sys idle iowait irq softirq steal rest </proc/stat
	local busy=$((user + nice + sys + irq + softirq + steal))
	echo "$busy $((busy + idle + iowait))"
}

# rss_kib PID...: the sum of VmRSS over the pids, in KiB.
rss_kib() {
	local pid total=0 v
	for pid in "$@"; do
		v=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
		total=$((total + ${v:-0}))
	done
	echo "$total"
}

# machine_json: cores, kernel, CPU model, memory and tool versions.
machine_json() {
	local cores kernel model mem
	cores=$(nproc)
	kernel=$(uname -r)
	model=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
	mem=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
	printf '{"cores":%s,"kernel":"%s","cpu":"%s","mem_kib":%s,"debian":"%s","nginx":"%s","wrk":"%s","h2load":"%s","rathole":"%s","portico":"%s","load1_at_start":"%s"}\n' \
		"$cores" "$kernel" "${model//\"/}" "$mem" \
		"$(cat /etc/debian_version 2>/dev/null)" \
		"$(nginx -v 2>&1 | sed 's/.*nginx\///')" \
		"$(dpkg-query -W -f='${Version}' wrk 2>/dev/null)" \
		"$(dpkg-query -W -f='${Version}' nghttp2-client 2>/dev/null)" \
		"$("$RATHOLE_BIN" --version 2>/dev/null | awk '/Build Version/ {print $3}')" \
		"$("$PORTICO_BIN" --version 2>/dev/null | head -1)" \
		"$(cut -d' ' -f1 /proc/loadavg)"
}

# nginx_conf NAME SERVER-BLOCK: a self-contained nginx config under
# BENCH_WORK/NAME (no system paths, no access log, long keepalive), with an
# upstream `backend` at 127.0.0.1:$P_BACKEND for proxies.
nginx_conf() {
	local dir=$BENCH_WORK/$1
	mkdir -p "$dir/tmp"
	cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile 65536;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    upstream backend {
        server 127.0.0.1:$P_BACKEND;
        keepalive 512;
    }
$2
}
EOF
	echo "$dir"
}

# start_nginx NAME SERVER-BLOCK: writes the config and starts nginx; prints
# the master pid.
start_nginx() {
	local dir
	dir=$(nginx_conf "$1" "$2")
	spawn "$1" nginx -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf"
}
