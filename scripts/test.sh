#!/usr/bin/env bash
# Runs Portico's whole test suite: installs the peers the tests talk to
# (curl, python3 for its http.server as a real file backend, dnsutils for
# dig and nsupdate against the router's DNS authority, Node.js with npm
# `oidc-provider` as the real OpenID provider of the sign-in tests, from
# tests/idp/package-lock.json, and Debian's headless Chromium with
# chromedriver for tests/browser.rs), then unit, property and end-to-end
# tests of every crate.
# Extra arguments go to `cargo test` (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
{ command -v dig && command -v nsupdate; } >/dev/null 2>&1 || need_apt+=(dnsutils)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || need_apt+=(chromium chromium-driver)
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
echo "node $(node --version)"
/usr/bin/chromium --version
/usr/bin/chromedriver --version
# The test IdP, exactly as locked.
npm ci --prefix tests/idp --no-audit --no-fund --loglevel=error

cargo test --workspace --all-targets "$@"
