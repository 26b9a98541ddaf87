//! Recording outcomes: HdrHistograms of corrected latency (from the intended
//! send time) and of service time (from the actual send), counts by status,
//! Portico error code and transport error kind, and a per-second timeline.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::report::{Counts, Percentiles, Second};

/// Highest latency recorded: one hour, in microseconds (larger values are
/// clamped).
const MAX_US: u64 = 3_600_000_000;

/// Why a request got no HTTP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TransportErrorKind {
    /// TCP or UDP connect failed.
    Connect,
    /// TLS handshake failed.
    Tls,
    /// HTTP/1, HTTP/2 or HTTP/3 connection setup failed.
    Handshake,
    /// Sending the request or reading the response head failed.
    Request,
    /// Reading the response body failed.
    Body,
    /// No complete response before the deadline.
    Timeout,
}

impl TransportErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportErrorKind::Connect => "connect",
            TransportErrorKind::Tls => "tls",
            TransportErrorKind::Handshake => "handshake",
            TransportErrorKind::Request => "request",
            TransportErrorKind::Body => "body",
            TransportErrorKind::Timeout => "timeout",
        }
    }
}

/// A received response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// The `x-portico-error` header, if any.
    pub portico_error: Option<String>,
    pub body_bytes: u64,
}

/// What became of one request.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Which entry of the scenario's request mix it was.
    pub request: usize,
    /// When the schedule meant to send it.
    pub intended: Instant,
    /// When it was actually handed to a connection.
    pub sent: Instant,
    pub done: Instant,
    pub bytes_sent: u64,
    pub result: Result<Response, TransportErrorKind>,
}

/// Thread-safe accumulator of outcomes.
pub struct Recorder {
    start: Instant,
    inner: Mutex<Inner>,
}

struct Inner {
    latency: Histogram<u64>,
    service: Histogram<u64>,
    /// Since the last [`Recorder::take_recent`] (the progress bar).
    recent: Histogram<u64>,
    recent_errors: u64,
    seconds: Vec<Tally>,
    /// Per second of intended send time: the requests due then that failed.
    errors_by_start: Vec<u64>,
    counts: Counts,
    bytes_sent: u64,
    bytes_received: u64,
    status: BTreeMap<u16, u64>,
    portico: BTreeMap<String, u64>,
    transport: BTreeMap<String, u64>,
    last_done: Duration,
    /// One per entry of the request mix.
    per_request: Vec<Tally>,
}

/// Counts and corrected latency of a slice of the run: one second of the
/// timeline, or one entry of the request mix.
struct Tally {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
}

impl Tally {
    fn new(hist: Histogram<u64>) -> Tally {
        Tally {
            hist,
            ok: 0,
            errors: 0,
        }
    }

    /// `latency` is `None` for a request that got no response.
    fn add(&mut self, latency: Option<u64>, ok: bool) {
        if let Some(l) = latency {
            let _ = self.hist.record(l);
        }
        if ok {
            self.ok += 1;
        } else {
            self.errors += 1;
        }
    }
}

fn histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, MAX_US, 3).expect("constant bounds within hdrhistogram's limits")
}

/// The per-request histograms keep 2 significant digits (1%): a mix may
/// have many entries, and each histogram is then about 20 KiB, not 180.
fn coarse_histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, MAX_US, 2).expect("constant bounds within hdrhistogram's limits")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(MAX_US)
        .clamp(1, MAX_US)
}

/// A live view for the progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    pub completed: u64,
    pub errors: u64,
    pub recent_count: u64,
    pub recent_errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

impl Recorder {
    /// A recorder for a mix of one request.
    pub fn new(start: Instant) -> Recorder {
        Recorder::with_requests(start, 1)
    }

    /// A recorder for a mix of `requests` entries.
    pub fn with_requests(start: Instant, requests: usize) -> Recorder {
        Recorder {
            start,
            inner: Mutex::new(Inner {
                latency: histogram(),
                service: histogram(),
                recent: histogram(),
                recent_errors: 0,
                seconds: Vec::new(),
                errors_by_start: Vec::new(),
                counts: Counts::default(),
                bytes_sent: 0,
                bytes_received: 0,
                status: BTreeMap::new(),
                portico: BTreeMap::new(),
                transport: BTreeMap::new(),
                last_done: Duration::ZERO,
                per_request: (0..requests)
                    .map(|_| Tally::new(coarse_histogram()))
                    .collect(),
            }),
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counters unusable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn scheduled(&self) {
        self.lock().counts.scheduled += 1;
    }

    pub fn cancelled(&self) {
        self.lock().counts.cancelled += 1;
    }

    pub fn record(&self, o: &Outcome) {
        let latency = micros(o.done.saturating_duration_since(o.intended));
        let service = micros(o.done.saturating_duration_since(o.sent));
        let since = o.done.saturating_duration_since(self.start);
        let sec = usize::try_from(since.as_secs()).unwrap_or(usize::MAX);
        let mut g = self.lock();
        let inner = &mut *g;
        inner.counts.completed += 1;
        inner.bytes_sent += o.bytes_sent;
        inner.last_done = inner.last_done.max(since);
        let ok = match &o.result {
            Ok(r) => {
                inner.bytes_received += r.body_bytes;
                *inner.status.entry(r.status).or_default() += 1;
                if let Some(code) = &r.portico_error {
                    *inner.portico.entry(code.clone()).or_default() += 1;
                }
                let _ = inner.latency.record(latency);
                let _ = inner.service.record(service);
                let _ = inner.recent.record(latency);
                r.status < 400
            }
            Err(kind) => {
                *inner.transport.entry(kind.as_str().to_owned()).or_default() += 1;
                false
            }
        };
        if ok {
            inner.counts.ok += 1;
        } else {
            inner.counts.errors += 1;
            inner.recent_errors += 1;
        }
        let answered = o.result.is_ok().then_some(latency);
        if let Some(p) = inner.per_request.get_mut(o.request) {
            p.add(answered, ok);
        }
        // The timeline grows one bucket per second of the run, bounded by
        // the run's own (bounded) length.
        if sec < 100_000 {
            while inner.seconds.len() <= sec {
                inner.seconds.push(Tally::new(histogram()));
            }
            inner.seconds[sec].add(answered, ok);
        }
        let due = o.intended.saturating_duration_since(self.start).as_secs();
        let due = usize::try_from(due).unwrap_or(usize::MAX);
        if !ok && due < 100_000 {
            if inner.errors_by_start.len() <= due {
                inner.errors_by_start.resize(due + 1, 0);
            }
            inner.errors_by_start[due] += 1;
        }
    }

    /// Totals, and the percentiles since the last call.
    pub fn take_recent(&self) -> Live {
        let mut g = self.lock();
        let live = Live {
            completed: g.counts.completed,
            errors: g.counts.errors,
            recent_count: g.recent.len(),
            recent_errors: g.recent_errors,
            p50_us: if g.recent.is_empty() {
                0
            } else {
                g.recent.value_at_quantile(0.5)
            },
            p99_us: if g.recent.is_empty() {
                0
            } else {
                g.recent.value_at_quantile(0.99)
            },
        };
        g.recent.reset();
        g.recent_errors = 0;
        live
    }

    /// The measurements, for the report.
    pub(crate) fn finish(&self) -> Measured {
        let g = self.lock();
        Measured {
            counts: g.counts,
            elapsed: g.last_done,
            bytes_sent: g.bytes_sent,
            bytes_received: g.bytes_received,
            latency: Percentiles::from_histogram(&g.latency),
            service: Percentiles::from_histogram(&g.service),
            status: g.status.clone(),
            portico: g.portico.clone(),
            transport: g.transport.clone(),
            per_request: g
                .per_request
                .iter()
                .map(|p| (p.ok, p.errors, Percentiles::from_histogram(&p.hist)))
                .collect(),
            timeline: (0..g.seconds.len().max(g.errors_by_start.len()))
                .map(|i| {
                    let errors_by_start = g.errors_by_start.get(i).copied().unwrap_or(0);
                    let Some(b) = g.seconds.get(i) else {
                        return Second {
                            second: i as u64,
                            errors_by_start,
                            ..Second::default()
                        };
                    };
                    let p = Percentiles::from_histogram(&b.hist);
                    Second {
                        second: i as u64,
                        completed: b.ok + b.errors,
                        ok: b.ok,
                        errors: b.errors,
                        errors_by_start,
                        p50_us: p.p50,
                        p90_us: p.p90,
                        p99_us: p.p99,
                        max_us: p.max,
                    }
                })
                .collect(),
        }
    }
}

pub(crate) struct Measured {
    pub counts: Counts,
    pub elapsed: Duration,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub latency: Percentiles,
    pub service: Percentiles,
    pub status: BTreeMap<u16, u64>,
    pub portico: BTreeMap<String, u64>,
    pub transport: BTreeMap<String, u64>,
    /// Per entry of the request mix: ok, errors, corrected latency.
    pub per_request: Vec<(u64, u64, Percentiles)>,
    pub timeline: Vec<Second>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(status: u16) -> Result<Response, TransportErrorKind> {
        Ok(Response {
            status,
            portico_error: None,
            body_bytes: 10,
        })
    }

    /// The wrk2 situation: requests due every 10 ms, the server stalls for
    /// 1 s once. The requests due during the stall were only sent (one
    /// connection, closed loop) after it; their service time is small but
    /// their latency from the intended time is up to the stall.
    #[test]
    fn coordinated_omission_correction_on_synthetic_latencies() {
        let start = Instant::now();
        let rec = Recorder::new(start);
        let ms = Duration::from_millis;
        // 1000 requests over 10 s, 1 ms service time each, but the server
        // stalls from t=2 s to t=3 s (request 200 takes 1 s).
        let mut free_at = Duration::ZERO; // when the single connection is free
        for k in 0..1000u64 {
            let intended = ms(10 * k);
            let sent = intended.max(free_at);
            let service = if k == 200 { ms(1000) } else { ms(1) };
            let done = sent + service;
            free_at = done;
            rec.record(&Outcome {
                request: 0,
                intended: start + intended,
                sent: start + sent,
                done: start + done,
                bytes_sent: 0,
                result: ok(200),
            });
        }
        let m = rec.finish();
        assert_eq!(m.counts.completed, 1000);
        assert_eq!(m.counts.ok, 1000);
        // Service time: only one slow request in 1000: p99 stays at 1 ms.
        assert!(m.service.p99 < 2_000, "{:?}", m.service);
        assert!(m.service.max >= 999_000);
        // Corrected: the 100 requests due during the stall waited 10..1000 ms,
        // so 10% of requests exceed 10 ms and p99 is ≥ 900 ms.
        assert!(m.latency.p99 >= 900_000, "{:?}", m.latency);
        assert!(m.latency.p90 >= 9_000, "{:?}", m.latency);
        assert!(m.latency.p50 < 2_000, "{:?}", m.latency);
        let p = m.latency;
        assert!(
            p.min <= p.p50
                && p.p50 <= p.p90
                && p.p90 <= p.p99
                && p.p99 <= p.p999
                && p.p999 <= p.max
        );
        // Timeline: 10 s of completions (the last at 10.0 s lands in bucket 10).
        assert!(m.timeline.len() >= 10);
        assert!(m.timeline[3].max_us >= 900_000);
        assert!(m.timeline[7].max_us < 2_000);
    }

    #[test]
    fn errors_are_counted_by_status_code_and_kind() {
        let start = Instant::now();
        let rec = Recorder::with_requests(start, 2);
        let mk = |result| Outcome {
            request: 0,
            intended: start,
            sent: start,
            done: start + Duration::from_millis(5),
            bytes_sent: 3,
            result,
        };
        rec.record(&mk(ok(200)));
        rec.record(&mk(Ok(Response {
            status: 502,
            portico_error: Some("ConnectorNotFound".into()),
            body_bytes: 0,
        })));
        rec.record(&mk(Err(TransportErrorKind::Timeout)));
        rec.record(&Outcome {
            request: 1,
            ..mk(ok(404))
        });
        // An index outside the mix is counted in the totals only.
        rec.record(&Outcome {
            request: 7,
            ..mk(ok(200))
        });
        let m = rec.finish();
        assert_eq!(m.per_request.len(), 2);
        let (ok0, err0, lat0) = m.per_request[0];
        assert_eq!(
            (ok0, err0, lat0.count),
            (1, 2, 2),
            "entry 0: a 200, a 502, a timeout"
        );
        let (ok1, err1, lat1) = m.per_request[1];
        assert_eq!((ok1, err1, lat1.count), (0, 1, 1), "entry 1: a 404");
        assert_eq!(
            (m.counts.completed, m.counts.ok, m.counts.errors),
            (5, 2, 3)
        );
        assert_eq!(m.status.get(&502), Some(&1));
        assert_eq!(m.status.get(&404), Some(&1));
        assert_eq!(m.portico.get("ConnectorNotFound"), Some(&1));
        assert_eq!(m.transport.get("timeout"), Some(&1));
        assert_eq!(m.bytes_sent, 15);
        // All were due at second 0; three of them failed.
        assert_eq!(m.timeline[0].errors_by_start, 3);
        assert_eq!(m.latency.count, 4);
        let live = rec.take_recent();
        assert_eq!((live.completed, live.errors, live.recent_errors), (5, 3, 3));
        assert_eq!(rec.take_recent().recent_count, 0);
    }
}
