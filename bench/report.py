#!/usr/bin/env python3
"""Summarises a bench/run.sh results directory.

Reads OUT/machine.json and OUT/runs.jsonl (one JSON object per measurement),
writes OUT/summary.json (medians per variant and test, Portico's ratios to
each peer, the issue-3 targets with a verdict, the HTTP/2 test next to the
HTTP/1.1 keepalive ones) and OUT/summary.md (the same as Markdown tables).
Runs marked "failed" (a wrk run without a summary; an h2load run with
failed requests, 4xx/5xx responses or the wrong protocol) are kept out of
the medians and counted, and the h2 ones listed with their reasons.
Standard library only.

Usage: report.py OUT
"""

import json
import statistics
import sys
from pathlib import Path

PORTICO = "portico"
PORTICO_MT = "portico-mt"
H2 = "h2"


def load(out):
    machine = json.loads((out / "machine.json").read_text())
    runs = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines() if l.strip()]
    return machine, runs


def errors_of(r):
    """wrk's socket errors and non-2xx/3xx responses; h2load's failed
    requests (errored and timed-out ones are among them) and 4xx/5xx."""
    keys = ("err_connect", "err_read", "err_write", "err_timeout", "err_status", "req_failed", "status_4xx", "status_5xx")
    return sum(r.get(k, 0) for k in keys)


def own_cpu(cpu):
    """The variant's own processes' CPU µs per request (user + system)."""
    return cpu["tunnel_user"] + cpu["tunnel_sys"] if cpu else None


def cpu_per_request(rs):
    """Medians of the CPU µs per request that run.sh measured around each wrk
    run: the variant's tunnel processes (user, system), the backend, and the
    whole machine (wrk included). Empty for runs from before it measured."""
    rs = [r for r in rs if "hz" in r and r.get("requests")]
    if not rs:
        return {}
    us = lambda r, k: r[k] * 1e6 / r["hz"] / r["requests"]
    return {
        "cpu_us": {
            "tunnel_user": statistics.median(us(r, "tunnel_user_ticks") for r in rs),
            "tunnel_sys": statistics.median(us(r, "tunnel_sys_ticks") for r in rs),
            "backend": statistics.median(us(r, "backend_ticks") for r in rs),
            "machine": statistics.median(us(r, "machine_busy_ticks") for r in rs),
            "machine_idle_pct": statistics.median(
                100 * (1 - r["machine_busy_ticks"] / r["machine_ticks"]) for r in rs if r["machine_ticks"]
            ),
        }
    }


def summarise(machine, runs):
    variants = []
    for r in runs:
        if r["variant"] not in variants:
            variants.append(r["variant"])
    conns = [int(c) for c in str(machine.get("conns", "32 256")).split()]
    close = int(machine.get("close_conns", 32))
    wrk_tests = [f"small_c{c}" for c in conns] + [f"small_close_c{close}"]

    med = {}
    per_rep = {}
    for v in variants:
        m = {}
        for t in wrk_tests:
            rs = [r for r in runs if r["variant"] == v and r.get("test") == t and not r.get("failed")]
            if not rs:
                continue
            m[t] = {
                **cpu_per_request(rs),
                "rps": statistics.median(r["rps"] for r in rs),
                "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                "errors": sum(errors_of(r) for r in rs),
                "requests": sum(r["requests"] for r in rs),
                "n": len(rs),
            }
            per_rep.setdefault(v, {})[t] = [round(r["rps"]) for r in rs]
        failed = [r for r in runs if r["variant"] == v and r.get("test") in wrk_tests and r.get("failed")]
        if failed:
            m["failed_wrk_runs"] = len(failed)
        h2 = [r for r in runs if r["variant"] == v and r.get("test") == H2]
        ok = [r for r in h2 if not r.get("failed")]
        if ok:
            m[H2] = {
                **cpu_per_request(ok),
                "rps": statistics.median(r["rps"] for r in ok),
                "mean_ms": statistics.median(r["mean_ms"] for r in ok),
                "max_ms": statistics.median(r["max_ms"] for r in ok),
                "errors": sum(errors_of(r) for r in ok),
                "requests": sum(r["requests"] for r in ok),
                "n": len(ok),
            }
            per_rep.setdefault(v, {})[H2] = [round(r["rps"]) for r in ok]
        if len(ok) < len(h2):
            m["failed_h2_runs"] = len(h2) - len(ok)
        dl = [r for r in runs if r["variant"] == v and r.get("test") == "download_100MiB"]
        ok = [r["bytes_per_s"] for r in dl if r.get("status") == 200 and r.get("size") == 100 * 1024 * 1024]
        if dl:
            m["download_100MiB"] = {
                "mib_per_s": statistics.median(ok) / 1048576 if ok else None,
                "failed": len(dl) - len(ok),
                "n": len(dl),
            }
            per_rep.setdefault(v, {})["download_100MiB"] = [round(b / 1048576) for b in ok]
        rss = [r["rss_kib"] for r in runs if r["variant"] == v and r.get("test") == "peak_rss"]
        if rss:
            m["peak_rss_mib"] = statistics.median(rss) / 1024
        med[v] = m

    def get(v, t, k):
        x = med.get(v, {}).get(t, {})
        return x.get(k) if isinstance(x, dict) else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    ratios = {}
    if PORTICO in med:
        for v in variants:
            if v == PORTICO:
                continue
            r = {}
            for t in wrk_tests:
                r[f"{t}_rps"] = ratio(get(PORTICO, t, "rps"), get(v, t, "rps"))
                r[f"{t}_p99"] = ratio(get(PORTICO, t, "p99_ms"), get(v, t, "p99_ms"))
            r[f"{H2}_rps"] = ratio(get(PORTICO, H2, "rps"), get(v, H2, "rps"))
            r["download_100MiB"] = ratio(get(PORTICO, "download_100MiB", "mib_per_s"), get(v, "download_100MiB", "mib_per_s"))
            r["peak_rss"] = ratio(med[PORTICO].get("peak_rss_mib"), med[v].get("peak_rss_mib"))
            ratios[v] = r

    def tgt(name, value, op, bound):
        if value is None:
            verdict = "not measured"
        else:
            verdict = "met" if (value >= bound if op == ">=" else value <= bound) else "MISSED"
        return {"target": name, "value": value, "op": op, "bound": bound, "verdict": verdict}

    rr = lambda v, k: ratios.get(v, {}).get(k)
    small = f"small_c{conns[0]}"
    big = f"small_c{conns[-1]}"
    close_t = f"small_close_c{close}"
    targets = [
        tgt(f"{small} req/s: Portico / rathole-noise", rr("rathole-noise", f"{small}_rps"), ">=", 1.0),
        tgt(f"{small} req/s: Portico / nginx proxy", rr("nginx", f"{small}_rps"), ">=", 0.7),
        tgt(f"{big} p99: Portico / nginx proxy", rr("nginx", f"{big}_p99"), "<=", 2.0),
        tgt(f"{close_t} req/s: Portico / rathole-noise", rr("rathole-noise", f"{close_t}_rps"), ">=", 2.0),
        tgt("100 MiB download: Portico / rathole-noise", rr("rathole-noise", "download_100MiB"), ">=", 1.0),
    ]
    # HTTP/2 next to HTTP/1.1 keepalive at the first connection count (32):
    # each variant's own CPU per request over both, and Portico's ratios.
    h1 = small
    own = lambda v, t: own_cpu(get(v, t, "cpu_us"))
    h2 = {
        "h1_test": h1,
        "flagged_runs": [
            {k: r.get(k) for k in ("variant", "rep", "rps", "requests", "problem")}
            for r in runs
            if r.get("test") == H2 and r.get("failed")
        ],
        "own_cpu_us": {v: {H2: own(v, H2), h1: own(v, h1)} for v in variants if get(v, H2, "rps") is not None},
        "own_cpu_h2_over_h1": {v: ratio(own(v, H2), own(v, h1)) for v in (PORTICO, PORTICO_MT) if v in med},
        "own_cpu_mt_over_st": {t: ratio(own(PORTICO_MT, t), own(PORTICO, t)) for t in (h1, H2)}
        if PORTICO in med and PORTICO_MT in med
        else {},
    }
    return {
        "machine": machine,
        "variants": variants,
        "wrk_tests": wrk_tests,
        "h2": h2,
        "medians": med,
        "per_rep": per_rep,
        "portico_ratios": ratios,
        "targets": targets,
    }


def fmt(x, nd=0):
    if x is None:
        return "–"
    return f"{x:,.{nd}f}"


def h2_markdown(s):
    """The HTTP/2 table, next to the HTTP/1.1 keepalive figures, and
    Portico's CPU ratios between the two protocols and the two runtimes."""
    m, h2 = s["machine"], s["h2"]
    rows = [v for v in s["variants"] if H2 in s["medians"][v] or s["medians"][v].get("failed_h2_runs")]
    if not rows:
        return []
    keep = [x for x in s["wrk_tests"] if not x.startswith("small_close")]
    h1 = h2["h1_test"]
    get = lambda v, t, k: s["medians"][v].get(t, {}).get(k)
    own = lambda v, t: own_cpu(get(v, t, "cpu_us"))
    div = lambda a, b: a / b if a is not None and b else None
    lines = [
        "",
        f"HTTP/2 (`{H2}`): h2load, {m.get('h2_conns')} connections × {m.get('h2_streams')} concurrent streams, "
        f"GET /small, {m.get('duration_s')} s "
        + (f"after {m['h2_warmup_s']} s of warm-up" if m.get("h2_warmup_s") else "without warm-up")
        + "; h2 over TLS (ALPN) for "
        "nginx-tls and Portico, h2c with prior knowledge for direct and nginx, none for rathole. "
        "Next to HTTP/1.1 keepalive (wrk). Own CPU = the variant's own processes, user + sys, µs per request; "
        "h2load reports mean and max latency, no percentiles:",
        "",
    ]
    head = ["variant", f"{H2} req/s", f"{H2} mean ms", f"{H2} max ms"] + [f"{x} req/s" for x in keep]
    head += [f"{H2} ÷ {h1} req/s", f"own CPU {H2}", f"own CPU {h1}", f"{H2} ÷ {h1} own CPU", "flagged runs"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for v in rows:
        d = s["medians"][v]
        row = [v, fmt(get(v, H2, "rps")), fmt(get(v, H2, "mean_ms"), 2), fmt(get(v, H2, "max_ms"), 2)]
        row += [fmt(get(v, x, "rps")) for x in keep]
        row += [fmt(div(get(v, H2, "rps"), get(v, h1, "rps")), 2)]
        row += [fmt(own(v, H2), 1), fmt(own(v, h1), 1), fmt(div(own(v, H2), own(v, h1)), 2)]
        row += [str(d.get("failed_h2_runs", 0))]
        lines.append("| " + " | ".join(row) + " |")
    r = h2["own_cpu_h2_over_h1"]
    if any(x is not None for x in r.values()):
        parts = [
            f"`{v}` {fmt(x, 2)} ({fmt(own(v, H2), 1)} ÷ {fmt(own(v, h1), 1)} µs)" for v, x in r.items() if x is not None
        ]
        lines += ["", f"Portico's own CPU per request (edge + connector), HTTP/2 ÷ HTTP/1.1 ({h1}): " + "; ".join(parts) + "."]
    r = h2["own_cpu_mt_over_st"]
    if any(x is not None for x in r.values()):
        lines += [
            "",
            f"Portico's own CPU per request, `{PORTICO_MT}` (default runtime) ÷ `{PORTICO}` (`--threads 1`): "
            + "; ".join(f"{'HTTP/2' if t == H2 else f'HTTP/1.1 ({t})'} {fmt(x, 2)}" for t, x in r.items())
            + ".",
        ]
    if h2["flagged_runs"]:
        lines += ["", "**Flagged h2 runs** (kept out of the medians above):", ""]
        for f in h2["flagged_runs"]:
            lines.append(
                f"- {f['variant']}, repetition {f['rep']}: {f.get('problem')} "
                f"({fmt(f.get('rps'))} req/s, {fmt(f.get('requests'))} succeeded)"
            )
    return lines


def markdown(s):
    m = s["machine"]
    t = s["wrk_tests"]
    lines = [
        f"Machine: {m.get('cores')} cores ({m.get('cpu')}), kernel {m.get('kernel')}, "
        f"Debian {m.get('debian')}, load average {m.get('load1_at_start')} at start. "
        f"nginx {m.get('nginx')}, wrk {m.get('wrk')}, h2load {m.get('h2load', '–')}, rathole {m.get('rathole') or '–'}, {m.get('portico')}.",
        "",
        f"Each wrk run: {m.get('duration_s')} s, {m.get('threads')} threads; "
        f"{m.get('reps')} interleaved repetitions; medians below. Started {m.get('started')}.",
        "",
    ]
    head = ["variant"]
    for x in t:
        head += [f"{x} req/s", f"{x} p50 ms", f"{x} p99 ms"]
    head += ["100 MiB MiB/s", "peak RSS MiB", "errors"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for v in s["variants"]:
        d = s["medians"][v]
        row = [v]
        errs = 0
        for x in t:
            row += [fmt(d.get(x, {}).get("rps")), fmt(d.get(x, {}).get("p50_ms"), 2), fmt(d.get(x, {}).get("p99_ms"), 2)]
            errs += d.get(x, {}).get("errors", 0)
        dl = d.get("download_100MiB", {})
        errs += dl.get("failed", 0) + d.get("failed_wrk_runs", 0)
        row += [fmt(dl.get("mib_per_s")), fmt(d.get("peak_rss_mib"), 1), str(errs)]
        lines.append("| " + " | ".join(row) + " |")
    lines += h2_markdown(s)
    th = [H2] if any(H2 in d for d in s["medians"].values()) else []  # h2 columns, when measured
    if s["portico_ratios"]:
        lines += ["", "Portico (`--threads 1`) ÷ peer (req/s and MiB/s: higher is better for Portico; p99 and RSS: lower is better):", ""]
        head = ["peer"] + [f"{x} req/s" for x in t + th] + [f"{x} p99" for x in t] + ["100 MiB", "peak RSS"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for v, r in s["portico_ratios"].items():
            row = [v] + [fmt(r.get(f"{x}_rps"), 2) for x in t + th]
            row += [fmt(r.get(f"{x}_p99"), 2) for x in t]
            row += [fmt(r.get("download_100MiB"), 2), fmt(r.get("peak_rss"), 2)]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Issue-3 targets:", "", "| target | measured | bound | verdict |", "|---|---|---|---|"]
    for g in s["targets"]:
        lines.append(f"| {g['target']} | {fmt(g['value'], 2)} | {g['op']} {g['bound']} | {g['verdict']} |")
    tc = t + th  # the tests with CPU readings
    cpu_rows = [
        (v, x, s["medians"][v][x]["cpu_us"])
        for v in s["variants"]
        for x in tc
        if "cpu_us" in s["medians"][v].get(x, {})
    ]
    if cpu_rows:
        lines += [
            "",
            "CPU per request, µs (medians; tunnel = the variant's own processes, "
            "machine = everything busy on the machine, wrk included; idle = the machine's idle share):",
            "",
            "| variant | test | tunnel user | tunnel sys | backend | machine | idle % |",
            "|---|---|---|---|---|---|---|",
        ]
        for v, x, c in cpu_rows:
            lines.append(
                f"| {v} | {x} | {fmt(c['tunnel_user'], 1)} | {fmt(c['tunnel_sys'], 1)} | "
                f"{fmt(c['backend'], 1)} | {fmt(c['machine'], 1)} | {fmt(c['machine_idle_pct'], 0)} |"
            )
    own = lambda v, x: own_cpu(s["medians"].get(v, {}).get(x, {}).get("cpu_us"))
    if cpu_rows and PORTICO in s["medians"]:
        lines += [
            "",
            "CPU of the variant's own processes per request, Portico ÷ peer (below 1: Portico spends less; "
            "steadier than req/s when the machine is shared):",
            "",
            "| peer | " + " | ".join(tc) + " |",
            "|" + "---|" * (len(tc) + 1),
        ]
        for v in s["variants"]:
            if v in (PORTICO, "direct"):
                continue
            cells = []
            for x in tc:
                a, b = own(PORTICO, x), own(v, x)
                cells.append(fmt(a / b, 2) if a is not None and b else "–")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    cols = t + th + ["download_100MiB"]
    lines += ["", "Every repetition, in order (req/s; download MiB/s):", ""]
    lines.append("| variant | " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * (len(cols) + 1))
    for v, tests in s["per_rep"].items():
        cells = [" / ".join(f"{a:,}" for a in tests.get(x, [])) or "–" for x in cols]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: report.py RESULTS-DIR")
    out = Path(sys.argv[1])
    machine, runs = load(out)
    s = summarise(machine, runs)
    (out / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(s))


if __name__ == "__main__":
    main()
