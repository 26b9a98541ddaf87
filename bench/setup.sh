#!/usr/bin/env bash
# Installs what bench/run.sh and bench/tunnel-scale.sh need on a fresh
# Debian 12 machine (run as root): nginx, wrk, h2load (nghttp2-client), curl
# and friends from Debian's packages, rathole from crates.io (with its noise
# transport), and a release build of portico. Idempotent: what is already
# there is kept.
#
# Env:
#   BENCH_TOOLS       where rathole is installed (default /opt/portico-bench)
#   RATHOLE_VERSION   crates.io version of rathole (default 0.5.0)
#   BENCH_SKIP_APT=1  do not run apt-get
#   BENCH_SKIP_RATHOLE=1  do not build rathole (run.sh sets it when no
#                     rathole variant is selected)
#   BENCH_SKIP_BUILD=1  do not run cargo build for portico (use PORTICO_BIN)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
BENCH_TOOLS=${BENCH_TOOLS:-/opt/portico-bench}
RATHOLE_VERSION=${RATHOLE_VERSION:-0.5.0}
RATHOLE_BIN=$BENCH_TOOLS/bin/rathole

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [[ ${BENCH_SKIP_APT:-0} != 1 ]]; then
	[[ $(id -u) == 0 ]] || {
		log "run as root (apt-get), or set BENCH_SKIP_APT=1 with the packages present"
		exit 1
	}
	log "apt-get update + install nginx wrk nghttp2-client curl openssl python3 iproute2 procps build-essential pkg-config"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		nginx wrk nghttp2-client curl openssl python3 iproute2 procps ca-certificates build-essential pkg-config >/dev/null
	# Debian starts a system nginx on :80 where an init system runs; the
	# benchmark uses its own instances and ports, so that one is left alone.
fi

for tool in nginx wrk h2load curl openssl python3 ss pgrep; do
	command -v "$tool" >/dev/null || {
		log "missing $tool"
		exit 1
	}
done
command -v cargo >/dev/null || {
	log "cargo not found: install a Rust toolchain (rustup) as new as the workspace needs"
	exit 1
}

# rathole: default features pull native-tls (OpenSSL headers) and websocket;
# we need only server, client and the noise transport. `--locked` pins
# time 0.3.29, which no longer compiles on Rust >= 1.80 (E0282 in
# time::format_description), so fall back to fresh semver-compatible
# dependencies when the locked build fails.
if [[ ${BENCH_SKIP_RATHOLE:-0} == 1 ]]; then
	log "rathole not needed (BENCH_SKIP_RATHOLE=1)"
elif [[ -x $RATHOLE_BIN ]] && "$RATHOLE_BIN" --genkey >/dev/null 2>&1; then
	log "rathole present: $RATHOLE_BIN"
else
	mkdir -p "$BENCH_TOOLS"
	feats=(--no-default-features --features "server,client,noise")
	log "cargo install rathole $RATHOLE_VERSION --locked ${feats[*]}"
	if ! cargo install rathole --version "$RATHOLE_VERSION" --locked "${feats[@]}" \
		--root "$BENCH_TOOLS" >"$BENCH_TOOLS/rathole-install.log" 2>&1; then
		log "the --locked build failed (see $BENCH_TOOLS/rathole-install.log); retrying without --locked"
		cargo install rathole --version "$RATHOLE_VERSION" "${feats[@]}" \
			--root "$BENCH_TOOLS" >>"$BENCH_TOOLS/rathole-install.log" 2>&1 || {
			log "rathole failed to build; see $BENCH_TOOLS/rathole-install.log"
			exit 1
		}
	fi
fi
# `--genkey` exists only when the noise feature is compiled in.
if [[ ${BENCH_SKIP_RATHOLE:-0} != 1 ]] && ! "$RATHOLE_BIN" --genkey >/dev/null 2>&1; then
	log "$RATHOLE_BIN lacks the noise transport (--genkey failed)"
	exit 1
fi

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
	log "cargo build --release --bin portico"
	(cd "$REPO_DIR" && cargo build --release --bin portico)
fi
log "ready"
