//! The self-contained HTML report: a summary table and two hand-written SVG
//! plots over time (latency percentiles; throughput and errors), with every
//! fired chaos action drawn as a labelled vertical marker. No scripts, no
//! external assets.

use std::fmt::Write as _;

use crate::report::Report;

const W: f64 = 900.0;
const H: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;

/// One line of a plot.
struct Series<'a> {
    label: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
}

/// The latency plot: p50, p90, p99 and max per second, in milliseconds.
pub fn latency_svg(r: &Report) -> String {
    let pick = |f: fn(&crate::report::Second) -> u64| -> Vec<(f64, f64)> {
        r.timeline
            .iter()
            .filter(|s| s.completed > 0)
            .map(|s| (s.second as f64 + 0.5, f(s) as f64 / 1000.0))
            .collect()
    };
    plot(
        r,
        "Latency from intended send time (ms)",
        "latency-plot",
        &[
            Series {
                label: "p50",
                color: "#1f77b4",
                points: pick(|s| s.p50_us),
            },
            Series {
                label: "p90",
                color: "#2ca02c",
                points: pick(|s| s.p90_us),
            },
            Series {
                label: "p99",
                color: "#ff7f0e",
                points: pick(|s| s.p99_us),
            },
            Series {
                label: "max",
                color: "#d62728",
                points: pick(|s| s.max_us),
            },
        ],
    )
}

/// The throughput plot: completed, ok and errors per second.
pub fn throughput_svg(r: &Report) -> String {
    let pick = |f: fn(&crate::report::Second) -> u64| -> Vec<(f64, f64)> {
        r.timeline
            .iter()
            .map(|s| (s.second as f64 + 0.5, f(s) as f64))
            .collect()
    };
    plot(
        r,
        "Throughput (requests per second)",
        "throughput-plot",
        &[
            Series {
                label: "ok/s",
                color: "#2ca02c",
                points: pick(|s| s.ok),
            },
            Series {
                label: "errors/s",
                color: "#d62728",
                points: pick(|s| s.errors),
            },
        ],
    )
}

/// The whole HTML page.
pub fn html(r: &Report) -> String {
    let mut h = String::new();
    let title = esc(r.name.as_deref().unwrap_or("Portico load test"));
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\n\
         <style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}\
         td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}th{{background:#f4f4f4}}\
         td:first-child,th:first-child{{text-align:left}}svg{{display:block;margin:1em 0}}</style></head><body>\n\
         <h1>{title}</h1>\n"
    );
    let _ = writeln!(
        h,
        "<p>{:?} loop, {}, {} connection(s){}; {} requests in {:.2} s: {:.1} req/s ({} ok, {} errors{}).</p>",
        r.mode,
        r.protocol.as_str(),
        r.connections,
        if r.new_connection_per_request { ", new connection per request" } else { "" },
        r.requests.completed,
        r.elapsed_ms as f64 / 1000.0,
        r.throughput_rps,
        r.requests.ok,
        r.requests.errors,
        if r.interrupted { ", interrupted" } else { "" },
    );
    h.push_str("<table><tr><th>latency (ms)</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th><th>mean</th></tr>\n");
    for (label, p) in [
        ("corrected (from intended send)", &r.latency_us),
        ("service time (uncorrected)", &r.service_time_us),
    ] {
        let ms = |v: u64| format!("{:.2}", v as f64 / 1000.0);
        let _ = writeln!(
            h,
            "<tr><td>{label}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td></tr>",
            ms(p.p50),
            ms(p.p90),
            ms(p.p99),
            ms(p.p999),
            ms(p.max),
            p.mean / 1000.0
        );
    }
    h.push_str("</table>\n");
    let table = |h: &mut String, title: &str, rows: Vec<(String, u64)>| {
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(h, "<table><tr><th>{}</th><th>count</th></tr>", esc(title));
        for (k, v) in rows {
            let _ = writeln!(h, "<tr><td>{}</td><td>{v}</td></tr>", esc(&k));
        }
        h.push_str("</table>\n");
    };
    table(
        &mut h,
        "HTTP status",
        r.status.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    );
    table(
        &mut h,
        "Portico error code",
        r.portico_errors
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
    );
    table(
        &mut h,
        "transport error",
        r.transport_errors
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
    );
    if !r.chaos.is_empty() {
        h.push_str("<table><tr><th>chaos action</th><th>scheduled (ms)</th><th>fired (ms)</th><th>result</th></tr>\n");
        for c in &r.chaos {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&c.action),
                c.at_ms,
                c.fired_ms.map_or("-".to_owned(), |f| f.to_string()),
                esc(match (&c.error, c.fired_ms) {
                    (_, None) => "not fired",
                    (None, _) => "ok",
                    (Some(e), _) => e,
                })
            );
        }
        h.push_str("</table>\n");
    }
    if r.by_request.len() > 1 {
        h.push_str("<table><tr><th>request</th><th>weight</th><th>ok</th><th>errors</th><th>p50 (ms)</th><th>p99 (ms)</th></tr>\n");
        for q in &r.by_request {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td></tr>",
                esc(&format!("{} {}", q.method, q.url)),
                q.weight,
                q.ok,
                q.errors,
                q.latency_us.p50 as f64 / 1000.0,
                q.latency_us.p99 as f64 / 1000.0
            );
        }
        h.push_str("</table>\n");
    }
    if !r.thresholds.is_empty() {
        h.push_str(
            "<table><tr><th>threshold</th><th>limit</th><th>measured</th><th>result</th></tr>\n",
        );
        for t in &r.thresholds {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&t.name),
                esc(&t.limit),
                esc(&t.measured),
                if t.passed { "ok" } else { "<b>FAILED</b>" }
            );
        }
        h.push_str("</table>\n");
    }
    h.push_str(&latency_svg(r));
    h.push_str(&throughput_svg(r));
    h.push_str("</body></html>\n");
    h
}

fn plot(r: &Report, title: &str, id: &str, series: &[Series<'_>]) -> String {
    let x_max = (r.timeline.len() as f64)
        .max(r.elapsed_ms as f64 / 1000.0)
        .max(
            r.chaos
                .iter()
                .filter_map(|c| c.fired_ms)
                .map(|f| f as f64 / 1000.0)
                .fold(0.0, f64::max),
        )
        .max(1.0);
    let y_raw = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    let y_max = nice_ceiling(y_raw);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |v: f64| LEFT + v / x_max * pw;
    let y = |v: f64| TOP + ph - v / y_max * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg id=\"{id}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let _ = writeln!(
        s,
        "<text x=\"{LEFT}\" y=\"18\" font-size=\"14\">{}</text>",
        esc(title)
    );
    // Axes and grid.
    let _ = writeln!(
        s,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>"
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let yy = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#eee\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + pw,
            LEFT - 6.0,
            yy + 4.0,
            fmt_num(v)
        );
    }
    let step = (x_max / 10.0).ceil().max(1.0);
    let mut t = 0.0;
    while t <= x_max + 1e-9 {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}s</text>",
            x(t),
            TOP + ph + 16.0,
            fmt_num(t)
        );
        t += step;
    }
    // Series.
    for (i, ser) in series.iter().enumerate() {
        if !ser.points.is_empty() {
            let pts: Vec<String> = ser
                .points
                .iter()
                .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py)))
                .collect();
            let _ = writeln!(
                s,
                "<polyline class=\"series\" data-series=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>",
                esc(ser.label),
                ser.color,
                pts.join(" ")
            );
        }
        let lx = LEFT + 10.0 + 80.0 * i as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            H - 14.0,
            ser.color,
            lx + 14.0,
            H - 5.0,
            esc(ser.label)
        );
    }
    // Chaos markers.
    for c in &r.chaos {
        let Some(f) = c.fired_ms else { continue };
        let xx = x(f as f64 / 1000.0);
        let _ = writeln!(
            s,
            "<g class=\"chaos-marker\"><line x1=\"{xx:.1}\" x2=\"{xx:.1}\" y1=\"{TOP}\" y2=\"{:.1}\" stroke=\"#9467bd\" stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#9467bd\">{}</text></g>",
            TOP + ph,
            xx + 3.0,
            TOP + 12.0,
            esc(&c.action)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The next round number strictly above `v` (5% headroom), so a series at
/// its maximum never merges with the plot's top edge.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let v = v * 1.05;
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn fmt_num(v: f64) -> String {
    if v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Escapes text for HTML and SVG.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{ChaosRecord, Counts, Percentiles, Second, REPORT_SCHEMA};
    use crate::scenario::{ChaosAction, ChaosVerb, Component, Mode, Protocol};
    use std::collections::BTreeMap;
    use std::time::Duration;

    pub(crate) fn sample() -> Report {
        let timeline = (0..5)
            .map(|i| Second {
                second: i,
                completed: 100,
                ok: 98,
                errors: 2,
                errors_by_start: 2,
                p50_us: 1_000 + i * 10,
                p90_us: 2_000,
                p99_us: 5_000 + i * 1000,
                max_us: 9_000,
            })
            .collect();
        Report {
            schema: REPORT_SCHEMA,
            name: Some("sample <run>".into()),
            mode: Mode::Open,
            protocol: Protocol::H2,
            connections: 4,
            new_connection_per_request: false,
            started_unix_ms: 1_700_000_000_000,
            elapsed_ms: 5_000,
            interrupted: false,
            requests: Counts {
                scheduled: 500,
                completed: 500,
                ok: 490,
                errors: 10,
                cancelled: 0,
                ..Counts::default()
            },
            throughput_rps: 100.0,
            ok_rps: 98.0,
            bytes_sent: 0,
            bytes_received: 5000,
            latency_us: Percentiles {
                count: 495,
                min: 500,
                mean: 1234.5,
                p50: 1000,
                p90: 2000,
                p99: 5000,
                p999: 9000,
                max: 9000,
            },
            service_time_us: Percentiles::default(),
            status: BTreeMap::from([(200, 490), (502, 5)]),
            portico_errors: BTreeMap::from([("ConnectorNotFound".to_owned(), 5)]),
            transport_errors: BTreeMap::from([("timeout".to_owned(), 5)]),
            timeline,
            chaos: vec![
                ChaosRecord {
                    at_ms: 2000,
                    fired_ms: Some(2001),
                    action: "kill connector".into(),
                    spec: ChaosAction {
                        at: Duration::from_secs(2),
                        action: ChaosVerb::Kill,
                        target: Some(Component::Connector),
                        instance: None,
                        path: None,
                        ..ChaosAction::new(Duration::ZERO, ChaosVerb::Kill)
                    },
                    ok: true,
                    error: None,
                },
                ChaosRecord {
                    at_ms: 9000,
                    fired_ms: None,
                    action: "blackhole eu".into(),
                    spec: ChaosAction {
                        at: Duration::from_secs(9),
                        action: ChaosVerb::Blackhole,
                        target: None,
                        instance: None,
                        path: Some("eu".into()),
                        ..ChaosAction::new(Duration::ZERO, ChaosVerb::Kill)
                    },
                    ok: false,
                    error: None,
                },
            ],
            by_request: vec![
                crate::report::RequestReport {
                    method: "GET".into(),
                    url: "https://a.apps.localhost/<x>".into(),
                    weight: 3,
                    completed: 480,
                    ok: 480,
                    errors: 0,
                    latency_us: Percentiles {
                        count: 480,
                        p50: 1000,
                        p99: 4000,
                        ..Percentiles::default()
                    },
                },
                crate::report::RequestReport {
                    method: "POST".into(),
                    url: "https://b.apps.localhost/".into(),
                    weight: 1,
                    completed: 15,
                    ok: 0,
                    errors: 15,
                    latency_us: Percentiles::default(),
                },
            ],
            thresholds: vec![
                crate::ThresholdResult {
                    name: "p99".into(),
                    limit: "<= 5.00ms".into(),
                    measured: "9.00ms".into(),
                    passed: false,
                },
                crate::ThresholdResult {
                    name: "error_rate".into(),
                    limit: "<= 0.1".into(),
                    measured: "0.0100".into(),
                    passed: true,
                },
            ],
        }
    }

    #[test]
    fn json_round_trips() {
        let r = sample();
        let json = r.to_json();
        let back = Report::from_json(&json).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.to_json(), json);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        for key in [
            "schema",
            "latency_us",
            "service_time_us",
            "status",
            "portico_errors",
            "transport_errors",
            "timeline",
            "chaos",
            "thresholds",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["thresholds"][0]["passed"], false);
        assert!(r
            .summary()
            .contains("threshold: p99 <= 5.00ms: 9.00ms FAILED"));
        assert!(r
            .summary()
            .contains("threshold: error_rate <= 0.1: 0.0100 ok"));
        assert!(r.summary().contains(
            "request: GET https://a.apps.localhost/<x> (weight 3): 480 ok, 0 errors, p50 1.00ms p99 4.00ms"
        ));
        assert_eq!(v["by_request"][1]["errors"], 15);
        assert_eq!(v["status"]["502"], 5);
        assert_eq!(v["chaos"][0]["spec"]["at"], "2s");
        assert_eq!(v["timeline"][4]["p99_us"], 9000);
    }

    #[test]
    fn html_has_both_plots_and_chaos_markers() {
        let r = sample();
        let page = html(&r);
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains("id=\"latency-plot\""));
        assert!(page.contains("id=\"throughput-plot\""));
        assert_eq!(page.matches("<svg").count(), 2);
        // One marker per plot for the fired action; none for the unfired one.
        assert_eq!(page.matches("class=\"chaos-marker\"").count(), 2);
        assert!(page.contains(">kill connector</text>"));
        assert!(!page.contains(">blackhole eu</text>"));
        // Four latency series and two throughput series.
        assert_eq!(page.matches("class=\"series\"").count(), 6);
        assert!(page.contains("data-series=\"p99\""));
        assert!(
            page.contains("<td>p99</td><td>&lt;= 5.00ms</td><td>9.00ms</td><td><b>FAILED</b></td>")
        );
        assert!(page.contains(
            "<td>GET https://a.apps.localhost/&lt;x&gt;</td><td>3</td><td>480</td><td>0</td><td>1.00</td><td>4.00</td>"
        ));
        // Text is escaped; no scripts or external assets.
        assert!(page.contains("sample &lt;run&gt;"));
        assert!(!page.contains("<script"));
        assert!(!page.contains("src=\"http"));
        // The chaos marker sits at 2.001 s of a 5 s axis.
        let x = LEFT + 2.001 / 5.0 * (W - LEFT - RIGHT);
        assert!(page.contains(&format!("x1=\"{x:.1}\"")), "marker at {x:.1}");
    }
}
