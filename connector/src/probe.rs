//! The region chooser's driver: it feeds [`Chooser`] the config's edges,
//! RTT probes of every edge of every region, the RTT and traffic of the
//! slots' live tunnels, and publishes what it decides: the edges the slots
//! dial (`Pool::targets`), the metrics, and the state the router is told
//! about (`report`).
//!
//! A probe is a QUIC handshake to the edge's tunnel port with the
//! connector's certificate, from the pool's first socket; its RTT is
//! quinn's estimate right after the handshake (`Connection::rtt`, from the
//! ACKs of the Initial and Handshake packets), and the connection is closed
//! at once with `CloseCode::Probe`, before any stream: the edge never takes
//! it for a tunnel (it counts it as `tunnel_closes_total{reason="probe"}`
//! and logs it at debug level). Probes run only for an `auto` group whose
//! config lists several regions, one round every `probe_interval` (±20%),
//! at most [`MAX_PROBED_EDGES`] edges a round, [`PROBE_CONCURRENCY`] at
//! once, each bounded by [`PROBE_TIMEOUT`]; the first round takes two
//! samples of each edge.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use portico_agent::{RouterClient, RouterTrust};
use portico_proto::api::{
    edge_server_name, ConnectorConfig, ConnectorReport, EdgeEndpoint, RegionChoice, RegionMove,
    CONNECTOR_REPORT_INTERVAL,
};
use portico_proto::{CloseCode, EdgeId, TunnelId};

use crate::region::{Cause, Chooser, Move};
use crate::stream::code;
use crate::tunnel::{self, DialError, Pool};

/// The router path of the connector's region report.
pub(crate) const REPORT_PATH: &str = "/v1/connector/report";
/// How long one probe may take, handshake included.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Probes in flight at once.
pub(crate) const PROBE_CONCURRENCY: usize = 4;
/// The most edges probed in one round (the home region's first).
pub(crate) const MAX_PROBED_EDGES: usize = 64;
/// How often the live tunnels' traffic is looked at.
const TRAFFIC_TICK: Duration = Duration::from_secs(1);

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

type Round = Pin<Box<dyn Future<Output = Vec<(EdgeId, Option<Duration>)>> + Send>>;

/// Runs the chooser until the pool stops.
pub(crate) async fn run(pool: Arc<Pool>) {
    let settings = pool.region.clone();
    let mut chooser = Chooser::new(settings.policy.clone(), now());
    let mut config = pool.config.clone();
    apply_config(&mut chooser, config.borrow_and_update().as_deref());
    let mut rx_seen: HashMap<TunnelId, u64> = HashMap::new();
    let mut tick = tokio::time::interval(TRAFFIC_TICK.min(settings.probe_interval));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_round = tokio::time::Instant::now();
    let mut round: Option<Round> = None;
    let mut first_round = true;
    let mut was_degraded = false;
    loop {
        step(&pool, &mut chooser, &mut was_degraded);
        tokio::select! {
            _ = pool.stop.cancelled() => return,
            r = config.changed() => {
                if r.is_err() {
                    return;
                }
                apply_config(&mut chooser, config.borrow_and_update().as_deref());
            }
            _ = tokio::time::sleep_until(next_round), if round.is_none() && chooser.wants_probes() => {
                let samples = if first_round { 2 } else { 1 };
                let mut edges = chooser.probe_targets();
                edges.truncate(MAX_PROBED_EDGES);
                round = Some(Box::pin(probe_round(pool.clone(), edges, samples)));
            }
            results = run_round(&mut round) => {
                round = None;
                first_round = false;
                let at = now();
                for (edge, rtt) in results {
                    match rtt {
                        Some(rtt) => chooser.sample(&edge, rtt, at),
                        None => chooser.lost(&edge),
                    }
                }
                // The live tunnels' own estimates count as samples too:
                // they can only make the home (where they are) look nearer.
                for t in pool.live_tunnels() {
                    chooser.sample(&t.edge.id, t.conn.rtt(), at);
                }
                let jitter = 0.8 + fastrand::f64() * 0.4;
                next_round = tokio::time::Instant::now() + settings.probe_interval.mul_f64(jitter);
            }
            _ = tick.tick() => {
                let at = now();
                let live = pool.live_tunnels();
                rx_seen.retain(|id, _| live.iter().any(|t| t.id == *id));
                for t in live {
                    let rx = t.conn.stats().udp_rx.datagrams;
                    let before = rx_seen.insert(t.id, rx);
                    if before.is_none_or(|b| rx > b) {
                        chooser.traffic(&t.edge.id, at);
                    }
                }
            }
        }
    }
}

async fn run_round(round: &mut Option<Round>) -> Vec<(EdgeId, Option<Duration>)> {
    match round {
        Some(r) => r.await,
        None => std::future::pending().await,
    }
}

fn apply_config(chooser: &mut Chooser, config: Option<&ConnectorConfig>) {
    if let Some(c) = config {
        chooser.set_edges(&c.edges, c.region.clone());
    }
}

/// Decides, then publishes the targets, the metrics and the status.
fn step(pool: &Pool, chooser: &mut Chooser, was_degraded: &mut bool) {
    let at = now();
    if let Some(m) = chooser.decide(at) {
        log_move(pool, &m);
    }
    let targets = chooser.targets();
    pool.chosen.send_if_modified(|t| {
        if **t == targets {
            return false;
        }
        *t = Arc::new(targets);
        true
    });
    let regions = chooser.regions(at);
    let degraded = chooser.degraded(at);
    let m = &pool.metrics;
    for r in &regions {
        match r.rtt_micros {
            Some(us) => m
                .region_rtt
                .with_label_values(&[r.region.as_str()])
                .set(us as f64 / 1e6),
            None => {
                let _ = m.region_rtt.remove_label_values(&[r.region.as_str()]);
            }
        }
    }
    let home = chooser.home().cloned();
    if let Some(h) = &home {
        m.home_region.with_label_values(&[h.as_str()]).set(1);
    }
    m.region_degraded.set(i64::from(degraded));
    if degraded != *was_degraded {
        *was_degraded = degraded;
        let home = home.as_ref().map(tracing::field::display);
        if degraded {
            tracing::warn!(home, "degraded: fewer than two edges of the home region are usable, so one edge's failure takes every tunnel down");
        } else {
            tracing::info!(
                home,
                "no longer degraded: two edges of the home region or more are usable"
            );
        }
    }
    let status = RegionChoice {
        pinned: chooser.pinned().cloned(),
        home,
        degraded,
        regions,
        last_move: chooser.last_move().map(|m| RegionMove {
            at: pool_move_time(pool, m),
            from: m.from.clone(),
            to: m.to.clone(),
            reason: m.reason.clone(),
        }),
        moves: chooser.moves(),
    };
    pool.region_status.send_if_modified(|s| {
        if s.as_deref() == Some(&status) {
            return false;
        }
        *s = Some(Arc::new(status));
        true
    });
}

/// The Unix time of the latest move: kept from the status, so it stays the
/// time of the move.
fn pool_move_time(pool: &Pool, m: &Move) -> u64 {
    let status = pool.region_status.borrow();
    match status.as_deref().and_then(|s| s.last_move.as_ref()) {
        Some(old) if old.to == m.to && old.from == m.from && old.reason == m.reason => old.at,
        _ => unix_now(),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn log_move(pool: &Pool, m: &Move) {
    let from = m.from.as_ref().map(tracing::field::display);
    let metrics = &pool.metrics;
    if let Some(old) = &m.from {
        let _ = metrics.home_region.remove_label_values(&[old.as_str()]);
    }
    if m.cause == Cause::Initial {
        tracing::info!(home = %m.to, reason = %m.reason, "home region chosen");
    } else {
        metrics
            .region_moves
            .with_label_values(&[m.cause.label()])
            .inc();
        tracing::info!(from, to = %m.to, cause = m.cause.label(), reason = %m.reason, "moving to another region: new tunnels first, then the old ones drain");
    }
}

/// Probes `edges`, `samples` times each (one after the other per edge),
/// a few edges at once.
async fn probe_round(
    pool: Arc<Pool>,
    edges: Vec<EdgeEndpoint>,
    samples: usize,
) -> Vec<(EdgeId, Option<Duration>)> {
    let pool = &pool;
    futures::stream::iter(edges)
        .map(|edge| async move {
            let mut out = Vec::with_capacity(samples);
            for _ in 0..samples {
                if pool.stop.is_cancelled() {
                    break;
                }
                let r = probe(pool, &edge).await;
                let result = match &r {
                    Ok(_) => "ok",
                    Err(_) => "lost",
                };
                pool.metrics
                    .region_probes
                    .with_label_values(&[result])
                    .inc();
                match r {
                    Ok(rtt) => {
                        tracing::trace!(edge = %edge.id, region = %edge.region, ?rtt, "probe");
                        out.push((edge.id.clone(), Some(rtt)));
                    }
                    Err(e) => {
                        tracing::debug!(edge = %edge.id, region = %edge.region, error = %portico_agent::error_chain(&e), "probe lost");
                        out.push((edge.id.clone(), None));
                    }
                }
            }
            out
        })
        .buffer_unordered(PROBE_CONCURRENCY)
        .flat_map(futures::stream::iter)
        .collect()
        .await
}

/// One probe: a QUIC handshake's RTT, closed at once.
async fn probe(pool: &Pool, edge: &EdgeEndpoint) -> Result<Duration, DialError> {
    let attempt = async {
        let endpoint = pool.endpoint(0);
        let v4_only = endpoint.local_addr().is_ok_and(|a| a.is_ipv4());
        let addr = pool
            .resolver
            .socket_addr(&edge.tunnel_addr, v4_only)
            .await?;
        let creds = pool.creds.borrow().clone();
        let config = tunnel::client_config(&creds, &probe_transport(), None)?;
        let conn = endpoint
            .connect_with(config, addr, &edge_server_name(&edge.id))?
            .await
            .map_err(|e| DialError::Handshake {
                reason: format!("{e:#}"),
            })?;
        let rtt = conn.rtt();
        conn.close(code(CloseCode::Probe), b"rtt probe");
        Ok(rtt)
    };
    tokio::time::timeout(PROBE_TIMEOUT, attempt)
        .await
        .map_err(|_| DialError::Timeout)?
}

/// A probe connection's transport: no streams, short-lived.
fn probe_transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(0u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    if let Ok(idle) = quinn::IdleTimeout::try_from(PROBE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// Tells the router the chooser's state: at once when the home, the last
/// move or the degraded state changes, else at most every report interval
/// (`probe_interval` × 4, between 1 s and 30 s).
pub(crate) async fn report(pool: Arc<Pool>, router_url: String) {
    let interval =
        (pool.region.probe_interval * 4).clamp(Duration::from_secs(1), CONNECTOR_REPORT_INTERVAL);
    let mut status = pool.region_status.subscribe();
    let mut creds_rx = pool.creds.clone();
    let mut client: Option<RouterClient> = None;
    let mut sent: Option<Arc<RegionChoice>> = None;
    let mut last_sent = tokio::time::Instant::now();
    loop {
        let current = status.borrow_and_update().clone();
        if let Some(current) = current {
            let significant = sent.as_deref().is_none_or(|s| {
                s.home != current.home
                    || s.last_move != current.last_move
                    || s.degraded != current.degraded
                    || s.pinned != current.pinned
            });
            let due = last_sent.elapsed() >= interval && sent.as_ref() != Some(&current);
            if significant || due {
                if client.is_none() || creds_rx.has_changed().unwrap_or(false) {
                    let creds = creds_rx.borrow_and_update().clone();
                    client = RouterClient::new(
                        &router_url,
                        RouterTrust::CaPem(creds.ca_pem.clone()),
                        Some(&creds),
                    )
                    .map_err(|e| tracing::warn!(error = %portico_agent::error_chain(&e), "cannot build the router client"))
                    .ok();
                }
                if let Some(c) = &client {
                    let body = ConnectorReport {
                        region: (*current).clone(),
                    };
                    let r = tokio::select! {
                        _ = pool.stop.cancelled() => return,
                        r = tokio::time::timeout(Duration::from_secs(10), c.post_empty(REPORT_PATH, &body)) => r,
                    };
                    match r {
                        Ok(Ok(())) => {
                            sent = Some(current);
                            last_sent = tokio::time::Instant::now();
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %portico_agent::error_chain(&e), "region report failed")
                        }
                        Err(_) => tracing::debug!("region report timed out"),
                    }
                }
            }
        }
        tokio::select! {
            _ = pool.stop.cancelled() => return,
            r = status.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
