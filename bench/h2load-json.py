#!/usr/bin/env python3
"""Turns one h2load run's output into one JSON line for bench/run.sh.

Usage: h2load-json.py OUTPUT-FILE EXIT-STATUS EXPECTED-PROTOCOL

Reads h2load's own summary (nghttp2 1.52, Debian 12):

    Application protocol: h2
    finished in 3.01s, 32641.00 req/s, 7.00MB/s
    requests: 65282 total, 65282 started, 65282 done, 65282 succeeded, 0 failed, 0 errored, 0 timeout
    status codes: 65283 2xx, 0 3xx, 0 4xx, 0 5xx
    time for request:       45us     21.43ms      3.88ms      3.17ms    79.17%

and prints {"requests": succeeded, "rps": ..., "mean_ms": ..., ...}. With
-D, "finished in" includes the warm-up but req/s does not (h2load divides
the requests done, successful or not, by the main duration). The run is marked "failed": true, with
the reasons in "problem", when h2load exited non-zero, printed no summary,
negotiated another protocol than EXPECTED-PROTOCOL (h2 over TLS, h2c in
clear text), had no success, or had any failed, errored or timed-out
request or any 4xx/5xx response: bench/report.py then keeps it out of the
medians and lists it. Standard library only.
"""

import json
import re
import sys

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
TIME = r"([\d.]+)(us|ms|s)"


def ms(value, unit):
    return round(float(value) * UNITS[unit], 3)


def parse(text, status, expected):
    out, problems = {}, []
    m = re.search(r"^Application protocol: (\S+)", text, re.M)
    out["protocol"] = m.group(1) if m else None
    m = re.search(r"^finished in " + TIME + r", ([\d.]+) req/s", text, re.M)
    if m:
        out["finished_s"] = round(ms(m.group(1), m.group(2)) / 1e3, 3)
        out["rps"] = float(m.group(3))
    m = re.search(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed"
        r"(?:, (\d+) errored)?(?:, (\d+) timeout)?",
        text,
        re.M,
    )
    if m:
        g = [int(x) if x is not None else 0 for x in m.groups()]
        out.update(
            total=g[0], started=g[1], done=g[2], requests=g[3], req_failed=g[4], req_errored=g[5], req_timeout=g[6]
        )
    m = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    if m:
        for k, v in zip(("status_2xx", "status_3xx", "status_4xx", "status_5xx"), m.groups()):
            out[k] = int(v)
    m = re.search(r"^time for request:\s+" + r"\s+".join([TIME] * 4), text, re.M)
    if m:
        g = m.groups()
        out["min_ms"], out["max_ms"] = ms(g[0], g[1]), ms(g[2], g[3])
        out["mean_ms"], out["sd_ms"] = ms(g[4], g[5]), ms(g[6], g[7])

    if status != 0:
        problems.append(f"h2load exited with status {status}")
    if "rps" not in out or "requests" not in out:
        problems.append("no h2load summary in the output")
    if out["protocol"] != expected:
        problems.append(f"negotiated {out['protocol'] or 'no protocol'}, not {expected}")
    if out.get("requests", 0) == 0:
        problems.append("no request succeeded")
    bad = [f"{out[k]} {k[4:]}" for k in ("req_failed", "req_errored", "req_timeout") if out.get(k)]
    bad += [f"{out[k]} {k[7:]} responses" for k in ("status_4xx", "status_5xx") if out.get(k)]
    if bad:
        problems.append("requests: " + ", ".join(bad))
    out.setdefault("requests", 0)
    out.setdefault("rps", 0.0)
    if problems:
        out["failed"] = True
        out["problem"] = "; ".join(problems)
    return out


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: h2load-json.py OUTPUT-FILE EXIT-STATUS EXPECTED-PROTOCOL")
    try:
        text = open(sys.argv[1], errors="replace").read()
    except OSError as e:
        text = ""
        print(f"h2load-json.py: {e}", file=sys.stderr)
    print(json.dumps(parse(text, int(sys.argv[2]), sys.argv[3]), separators=(",", ":")))


if __name__ == "__main__":
    main()
