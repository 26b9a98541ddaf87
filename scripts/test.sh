#!/usr/bin/env bash
# Runs Portico's whole test suite: installs the peers the tests talk to
# (curl, and python3 for its http.server as a real file backend), then unit,
# property and end-to-end tests of every crate.
# Extra arguments go to `cargo test` (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
if ((${#need_apt[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing test peers: ${need_apt[*]}; install them (apt-get install ${need_apt[*]}) or run as root" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
curl --version | head -1
curl --version | grep -q HTTP2 || { echo "this curl lacks HTTP/2 support" >&2; exit 1; }
python3 --version

cargo test --workspace --all-targets "$@"
