//! The run: open-loop scheduler or closed-loop workers, request tasks with
//! deadlines, the chaos timeline, the progress bar, and the final report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Semaphore;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::chaos::Chaos;
use crate::client::{Client, Prepared};
use crate::error::{ChaosError, LoadtestError};
use crate::report::{ChaosRecord, Report, RequestReport, REPORT_SCHEMA};
use crate::scenario::{ChaosAction, Mode, Ramp, Scenario};
use crate::schedule::{level_at, OpenSchedule};
use crate::stats::{Outcome, Recorder, TransportErrorKind};

/// How long a chaos action may still take once the load has ended.
const CHAOS_GRACE: Duration = Duration::from_secs(60);

/// Presentation options of a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Draw the live progress bar on stderr (only if it is a terminal).
    pub progress: bool,
}

/// Runs `scenario` to its bounds (or until `shutdown`) and returns what it
/// measured. Chaos actions go to `chaos`; without one they are recorded as
/// unsupported.
pub async fn run_scenario(
    scenario: Scenario,
    chaos: Option<Arc<dyn Chaos>>,
    shutdown: CancellationToken,
) -> Result<Report, LoadtestError> {
    run_scenario_with(scenario, chaos, RunOptions::default(), shutdown).await
}

/// [`run_scenario`] with presentation options.
pub async fn run_scenario_with(
    scenario: Scenario,
    chaos: Option<Arc<dyn Chaos>>,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<Report, LoadtestError> {
    scenario.validate()?;
    let ramps = scenario.ramps()?;
    let conns = TaskTracker::new();
    let conns_stop = CancellationToken::new();
    let result = run_inner(
        &scenario,
        &ramps,
        chaos,
        opts,
        &conns,
        &conns_stop,
        shutdown,
    )
    .await;
    conns_stop.cancel();
    conns.close();
    conns.wait().await;
    result
}

async fn run_inner(
    s: &Scenario,
    ramps: &[Ramp],
    chaos: Option<Arc<dyn Chaos>>,
    opts: RunOptions,
    conns: &TaskTracker,
    conns_stop: &CancellationToken,
    shutdown: CancellationToken,
) -> Result<Report, LoadtestError> {
    let (client, prepared) = Client::new(s, conns.clone(), conns_stop.clone()).await?;
    let client = Arc::new(client);
    let prepared: Arc<[Prepared]> = prepared.into();
    let picker = Arc::new(Picker::new(prepared.iter().map(|p| p.weight)));
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let start = Instant::now();
    let rec = Arc::new(Recorder::with_requests(start, prepared.len()));
    let total = s.total_duration();
    info!(
        mode = ?s.mode, protocol = s.protocol.as_str(), connections = s.connections,
        duration = ?total, count = s.count, "load run starting"
    );

    let aux = TaskTracker::new();
    let load_done = CancellationToken::new();
    let chaos_task = aux.spawn(
        chaos_timeline(s.chaos.clone(), chaos, start, load_done.clone())
            .instrument(tracing::info_span!("chaos")),
    );
    if opts.progress {
        crate::progress::spawn(&aux, rec.clone(), total, s.count, load_done.clone());
    }

    let requests = TaskTracker::new();
    let ctx = Arc::new(Ctx {
        client,
        prepared,
        picker,
        rec: rec.clone(),
        timeout: s.timeout,
        cancel: shutdown.clone(),
    });
    match s.mode {
        Mode::Open => open_loop(s, ramps, &ctx, &requests, start, &shutdown).await,
        Mode::Closed => closed_loop(s, ramps, &ctx, &requests, start, total),
    }
    requests.close();
    requests.wait().await;
    load_done.cancel();
    aux.close();
    let chaos_records = match tokio::time::timeout(CHAOS_GRACE, chaos_task).await {
        Ok(Ok(v)) => v,
        _ => {
            warn!("a chaos action did not finish; its record is lost");
            Vec::new()
        }
    };
    aux.wait().await;

    let mut m = rec.finish();
    (m.counts.retried, m.counts.failovers) = ctx.client.retries();
    let secs = m.elapsed.as_secs_f64();
    let per_sec = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let mut report = Report {
        schema: REPORT_SCHEMA,
        name: s.name.clone(),
        mode: s.mode,
        protocol: s.protocol,
        connections: s.connections,
        new_connection_per_request: s.new_connection_per_request,
        started_unix_ms,
        elapsed_ms: u64::try_from(m.elapsed.as_millis()).unwrap_or(u64::MAX),
        interrupted: shutdown.is_cancelled(),
        requests: m.counts,
        throughput_rps: round3(per_sec(m.counts.completed)),
        ok_rps: round3(per_sec(m.counts.ok)),
        bytes_sent: m.bytes_sent,
        bytes_received: m.bytes_received,
        latency_us: m.latency,
        service_time_us: m.service,
        status: m.status,
        portico_errors: m.portico,
        transport_errors: m.transport,
        timeline: m.timeline,
        chaos: chaos_records,
        by_request: s
            .requests
            .iter()
            .zip(&m.per_request)
            .map(|(spec, (ok, errors, latency))| RequestReport {
                method: spec.method.clone(),
                url: spec.url.clone(),
                weight: spec.weight,
                completed: ok + errors,
                ok: *ok,
                errors: *errors,
                latency_us: *latency,
            })
            .collect(),
        thresholds: Vec::new(),
    };
    report.thresholds = s.thresholds.evaluate(&report);
    Ok(report)
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

struct Ctx {
    client: Arc<Client>,
    prepared: Arc<[Prepared]>,
    picker: Arc<Picker>,
    rec: Arc<Recorder>,
    timeout: Duration,
    cancel: CancellationToken,
}

impl Ctx {
    /// Sends one request due at `intended` and records the outcome.
    async fn one(&self, idx: usize, intended: Instant) {
        let p = &self.prepared[idx];
        let mut sent = Instant::now();
        let deadline = intended + self.timeout;
        let result = {
            let fut = tokio::time::timeout_at(deadline, self.client.send(p, &mut sent));
            tokio::select! {
                r = fut => r.unwrap_or(Err(TransportErrorKind::Timeout)),
                () = self.cancel.cancelled() => {
                    self.rec.cancelled();
                    return;
                }
            }
        };
        self.rec.record(&Outcome {
            request: idx,
            intended,
            sent,
            done: Instant::now(),
            bytes_sent: p.body.len() as u64,
            result,
        });
    }
}

async fn open_loop(
    s: &Scenario,
    ramps: &[Ramp],
    ctx: &Arc<Ctx>,
    requests: &TaskTracker,
    start: Instant,
    shutdown: &CancellationToken,
) {
    let gate = Arc::new(Semaphore::new(s.max_in_flight));
    let mut rng = fastrand::Rng::new();
    for offset in OpenSchedule::new(ramps.to_vec(), s.count, s.total_duration()) {
        let intended = start + offset;
        tokio::select! {
            () = sleep_until(intended) => {}
            () = shutdown.cancelled() => break,
        }
        let permit = tokio::select! {
            p = gate.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = shutdown.cancelled() => break,
        };
        ctx.rec.scheduled();
        let idx = ctx.picker.pick(&mut rng);
        let ctx = ctx.clone();
        requests.spawn(async move {
            let _permit = permit;
            ctx.one(idx, intended).await;
        });
    }
}

fn closed_loop(
    s: &Scenario,
    ramps: &[Ramp],
    ctx: &Arc<Ctx>,
    requests: &TaskTracker,
    start: Instant,
    total: Option<Duration>,
) {
    let max = ramps
        .iter()
        .map(|r| r.from.max(r.to))
        .fold(0.0f64, f64::max)
        .round() as usize;
    let issued = Arc::new(AtomicU64::new(0));
    let ramps: Arc<[Ramp]> = ramps.into();
    let end = total.map(|d| start + d);
    for w in 0..max {
        let (ctx, issued, ramps) = (ctx.clone(), issued.clone(), ramps.clone());
        let count = s.count;
        requests.spawn(async move {
            let mut rng = fastrand::Rng::new();
            loop {
                let now = Instant::now();
                if ctx.cancel.is_cancelled() || end.is_some_and(|e| now >= e) {
                    break;
                }
                let Some(level) = level_at(&ramps, now - start) else {
                    break;
                };
                if (w as f64) >= level.round() {
                    // Idle until the ramp reaches this worker.
                    let wake = now + Duration::from_millis(10);
                    tokio::select! {
                        () = sleep_until(end.map_or(wake, |e| e.min(wake))) => {}
                        () = ctx.cancel.cancelled() => break,
                    }
                    continue;
                }
                if count.is_some_and(|c| issued.fetch_add(1, Ordering::Relaxed) >= c) {
                    break;
                }
                ctx.rec.scheduled();
                let idx = ctx.picker.pick(&mut rng);
                ctx.one(idx, Instant::now()).await;
            }
        });
    }
}

/// Fires the chaos actions on time; returns one record per action, in
/// scenario order (unfired ones with `fired_ms: None`).
async fn chaos_timeline(
    actions: Vec<ChaosAction>,
    chaos: Option<Arc<dyn Chaos>>,
    start: Instant,
    done: CancellationToken,
) -> Vec<ChaosRecord> {
    let mut records: Vec<ChaosRecord> = actions
        .iter()
        .map(|a| ChaosRecord {
            at_ms: u64::try_from(a.at.as_millis()).unwrap_or(u64::MAX),
            fired_ms: None,
            action: a.to_string(),
            spec: a.clone(),
            ok: false,
            error: None,
        })
        .collect();
    let mut order: Vec<usize> = (0..actions.len()).collect();
    order.sort_by_key(|&i| actions[i].at);
    for i in order {
        let a = &actions[i];
        tokio::select! {
            () = sleep_until(start + a.at) => {}
            () = done.cancelled() => break,
        }
        let fired = Instant::now() - start;
        info!(action = %a, at = ?fired, "chaos");
        let result = match &chaos {
            Some(c) => c.act(a).await,
            None => Err(ChaosError::Unsupported {
                action: a.to_string(),
            }),
        };
        let r = &mut records[i];
        r.fired_ms = Some(u64::try_from(fired.as_millis()).unwrap_or(u64::MAX));
        match result {
            Ok(()) => r.ok = true,
            Err(e) => {
                warn!(action = %a, error = %portico_agent::error_chain(&e), "chaos action failed");
                r.error = Some(portico_agent::error_chain(&e).to_string());
            }
        }
    }
    records
}

/// Picks a request of the mix by weight.
struct Picker {
    cumulative: Vec<u64>,
}

impl Picker {
    fn new(weights: impl Iterator<Item = u32>) -> Picker {
        let mut sum = 0u64;
        Picker {
            cumulative: weights
                .map(|w| {
                    sum += u64::from(w);
                    sum
                })
                .collect(),
        }
    }

    fn pick(&self, rng: &mut fastrand::Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0);
        if total == 0 {
            return 0;
        }
        let x = rng.u64(0..total);
        self.cumulative.partition_point(|&c| c <= x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picker_follows_weights() {
        let p = Picker::new([1u32, 0, 3].into_iter());
        let mut rng = fastrand::Rng::with_seed(7);
        let mut n = [0u32; 3];
        for _ in 0..4000 {
            n[p.pick(&mut rng)] += 1;
        }
        assert_eq!(n[1], 0);
        assert!(n[0] > 800 && n[0] < 1200, "{n:?}");
        assert!(n[2] > 2800, "{n:?}");
    }
}
