#!/usr/bin/env bash
# Link translation on a 1 MiB HTML body (issue 11, point 10): the
# connector's body rewriter (lol_html and the CSS url() scanner) against
# passing the same 16 KiB chunks on untouched, in one release-build run on
# this machine. It measures the rewriter alone, in process: no network, no
# tunnel. Prints one line; BENCHMARKS.md ("Link translation") keeps it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo test --release -p portico-connector --lib -- \
	--ignored --exact rewrite::tests::bench_translate_1mib_html --nocapture 2>&1 |
	grep '^translate '
