#!/usr/bin/env bash
# Runs Portico's whole test suite: installs the peers the tests talk to
# (curl, python3 for its http.server as a real file backend, and dnsutils
# for dig and nsupdate against the router's DNS authority), then unit,
# property and end-to-end tests of every crate.
# Extra arguments go to `cargo test` (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
{ command -v dig && command -v nsupdate; } >/dev/null 2>&1 || need_apt+=(dnsutils)
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
dig -v 2>&1

cargo test --workspace --all-targets "$@"
