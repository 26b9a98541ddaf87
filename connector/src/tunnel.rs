//! The tunnel pool: a fixed number of slots, each keeping one QUIC tunnel to
//! an edge (spread round-robin over the edges the router lists), with the
//! control stream (`Hello`/`Welcome`, pings, drain, goodbye), reconnects
//! with jittered exponential backoff, and gradual moves when the edge list
//! changes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portico_agent::{pki, Credentials};
use portico_proto::api::{edge_server_name, ConnectorConfig, EdgeEndpoint, RegionChoice};
use portico_proto::control::{By, Closed, Control, ControlConfig, Event};
use portico_proto::ids::{EdgeId, RegionId};
use portico_proto::io::write_frame;
use portico_proto::{
    capabilities, CloseCode, ConnectorId, GroupId, Hello, TunnelId, Welcome, ALPN, PROTOCOL_VERSION,
};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, TransportConfig};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{FindEdges, RegionSettings};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::stream::{code, serve_stream, StreamCtx};

/// How long dialing, the handshake and `Welcome` may take.
const HANDSHAKE_TIMEOUT: Duration = portico_proto::control::HANDSHAKE_TIMEOUT;
/// The most read from the control stream at once.
const READ_CHUNK: usize = 2048;
/// First reconnect delay, doubled up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A tunnel that stayed up this long resets its slot's backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// The delay between slots when tunnels move to new edges.
const MOVE_STAGGER: Duration = Duration::from_secs(1);
/// How often a slot away from its own edge (it could not be dialled, or
/// it said `Drain` and the router has not said it is back) tries it
/// again, so that tunnels spread over the edges again once a killed or
/// restarted edge is back, with or without the router.
const HOME_CHECK_EVERY: Duration = Duration::from_secs(10);
/// How long a tunnel this connector drains may take to finish its
/// in-flight streams.
const DRAIN_LIMIT: Duration = Duration::from_secs(600);
/// How long a tunnel an edge drains may stay open: the edge closes it once
/// its own drain delay and grace (each at most an hour) are over; this
/// only bounds an edge that never does.
const EDGE_DRAIN_LIMIT: Duration = Duration::from_secs(3 * 3600);
/// How long an edge that said `Drain` is passed over by the slots' picks
/// (unless no other edge is left): until the router's config, which drops
/// a draining edge, arrives, and for a while when the router is down.
const DRAINING_AVOID: Duration = Duration::from_secs(60);

/// What the pool shares with its slots and tunnels.
pub(crate) struct Pool {
    pub id: ConnectorId,
    pub group: GroupId,
    /// The UDP sockets tunnels are dialled from: slot `i` uses socket
    /// `i % len`, driven by the slot's own shard.
    pub endpoints: Vec<Endpoint>,
    pub transport: Arc<TransportConfig>,
    pub creds: watch::Receiver<Arc<Credentials>>,
    pub config: watch::Receiver<Option<Arc<ConnectorConfig>>>,
    pub streams: Arc<StreamCtx>,
    pub metrics: Metrics,
    /// Tunnels up (welcomed, not draining).
    pub up: watch::Sender<usize>,
    /// Cancelled on shutdown or on a fatal error.
    pub stop: CancellationToken,
    pub fatal: Mutex<Option<Error>>,
    pub tracker: TaskTracker,
    next_tunnel: AtomicU64,
    /// Slot `i`'s tunnels ask a sharded edge for its shard `shard_base + i`
    /// (modulo its shards) by their first connection ID
    /// (`portico_agent::quic::initial_connection_id`): a connector's
    /// tunnels spread evenly over an edge's shards, and the first slot of
    /// different connectors starts on different shards.
    shard_base: u8,
    /// The edges the region chooser (`probe::run`) picks: the home
    /// region's, sorted by id.
    pub chosen: watch::Sender<Arc<Vec<EdgeEndpoint>>>,
    /// What the slots dial: the chosen edges with each name replaced by
    /// one target per address of its answer, as `resolve::run` publishes
    /// them.
    pub targets: watch::Sender<Arc<Vec<EdgeEndpoint>>>,
    /// Resolves the names of tunnel endpoints (ARCHITECTURE.md,
    /// "Resolving tunnel endpoints").
    pub resolver: Arc<crate::resolve::Resolver>,
    /// The tunnel each slot holds now (not one that lingers after a move),
    /// for the region chooser: its traffic and RTT.
    pub live: Mutex<HashMap<usize, LiveTunnel>>,
    /// How the home region is chosen and how tunnels move between regions.
    pub region: RegionSettings,
    /// The chooser's state, for the router's report and the handle.
    pub region_status: watch::Sender<Option<Arc<RegionChoice>>>,
    /// Edges that said `Drain`, and when: the slots' picks pass them over
    /// for [`DRAINING_AVOID`].
    pub draining_edges: Mutex<HashMap<EdgeId, Instant>>,
    /// How the slots find a region's edges.
    pub find_edges: FindEdges,
    /// Which edge answered at each address a region's name gave, from the
    /// handshakes (at most [`MAX_LEARNED`]): an address no listed edge
    /// has is dialled as "an edge of the region" until then.
    pub learned: Mutex<HashMap<String, EdgeId>>,
    /// Woken when `learned` gains an edge: the targets are made again.
    pub learned_new: tokio::sync::Notify,
}

/// The most addresses whose edge is remembered.
const MAX_LEARNED: usize = 256;

/// A slot's current tunnel.
#[derive(Debug, Clone)]
pub(crate) struct LiveTunnel {
    pub id: TunnelId,
    pub edge: EdgeEndpoint,
    pub conn: Connection,
}

/// Keeps a slot's tunnel in [`Pool::live`] while the slot holds it.
struct LiveGuard<'a> {
    pool: &'a Pool,
    slot: usize,
    id: TunnelId,
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        let mut live = self.pool.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.get(&self.slot).is_some_and(|t| t.id == self.id) {
            live.remove(&self.slot);
        }
    }
}

impl Pool {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: ConnectorId,
        group: GroupId,
        endpoints: Vec<Endpoint>,
        transport: Arc<TransportConfig>,
        creds: watch::Receiver<Arc<Credentials>>,
        config: watch::Receiver<Option<Arc<ConnectorConfig>>>,
        streams: Arc<StreamCtx>,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) -> Pool {
        let metrics = streams.metrics.clone();
        Pool {
            id,
            group,
            endpoints,
            transport,
            creds,
            config,
            streams,
            metrics,
            up: watch::channel(0).0,
            stop,
            fatal: Mutex::new(None),
            tracker,
            next_tunnel: AtomicU64::new(1),
            shard_base: fastrand::u8(..),
            chosen: watch::channel(Arc::new(Vec::new())).0,
            targets: watch::channel(Arc::new(Vec::new())).0,
            resolver: Arc::new(crate::resolve::Resolver::new(&[], None, None)),
            live: Mutex::new(HashMap::new()),
            region: RegionSettings::default(),
            region_status: watch::channel(None).0,
            draining_edges: Mutex::new(HashMap::new()),
            find_edges: FindEdges::default(),
            learned: Mutex::new(HashMap::new()),
            learned_new: tokio::sync::Notify::new(),
        }
    }

    /// The same pool finding edges this way.
    pub fn with_find_edges(mut self, find_edges: FindEdges) -> Pool {
        self.find_edges = find_edges;
        self
    }

    /// The tunnel names the slots use: the router's, unless edges are
    /// found by its list only.
    pub(crate) fn tunnel_names(
        &self,
        config: Option<&ConnectorConfig>,
    ) -> BTreeMap<RegionId, String> {
        match (self.find_edges, config) {
            (FindEdges::Dns, Some(c)) => c.tunnel_names.clone(),
            _ => BTreeMap::new(),
        }
    }

    /// A handshake at `addr` reached `edge`.
    fn learn(&self, addr: &str, edge: &EdgeId) {
        let mut l = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        if l.get(addr) == Some(edge) {
            return;
        }
        if l.len() >= MAX_LEARNED {
            l.clear();
        }
        l.insert(addr.to_owned(), edge.clone());
        drop(l);
        self.learned_new.notify_one();
    }

    /// `edge` said `Drain`: dial other edges for a while.
    fn edge_draining(&self, edge: &EdgeId) {
        let mut d = self
            .draining_edges
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        d.retain(|_, at| at.elapsed() < DRAINING_AVOID);
        d.insert(edge.clone(), Instant::now());
    }

    /// The edge slot `slot` dials ([`pick`]), passing over edges that are
    /// draining. An edge leaves that list once the targets no longer have
    /// it (the router dropped it): when it is listed again, it has
    /// restarted.
    fn pick(&self, slot: usize, skip: usize, targets: &[EdgeEndpoint]) -> Option<EdgeEndpoint> {
        let draining: Vec<EdgeId> = {
            let mut d = self
                .draining_edges
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            d.retain(|id, at| at.elapsed() < DRAINING_AVOID && targets.iter().any(|t| t.id == *id));
            d.keys().cloned().collect()
        };
        let serving: Vec<EdgeEndpoint> = targets
            .iter()
            .filter(|e| !draining.contains(&e.id))
            .cloned()
            .collect();
        if serving.is_empty() {
            pick(slot, skip, targets)
        } else {
            pick(slot, skip, &serving)
        }
    }

    /// The same pool with these region settings.
    pub fn with_region(mut self, region: RegionSettings) -> Pool {
        self.region = region;
        self
    }

    /// The same pool with this resolver.
    pub fn with_resolver(mut self, resolver: Arc<crate::resolve::Resolver>) -> Pool {
        self.resolver = resolver;
        self
    }

    /// Every slot's current tunnel.
    pub(crate) fn live_tunnels(&self) -> Vec<LiveTunnel> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.values().cloned().collect()
    }

    fn hold_live(&self, slot: usize, tunnel: &Tunnel, edge: &EdgeEndpoint) -> LiveGuard<'_> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.insert(
            slot,
            LiveTunnel {
                id: tunnel.id,
                edge: edge.clone(),
                conn: tunnel.conn.clone(),
            },
        );
        LiveGuard {
            pool: self,
            slot,
            id: tunnel.id,
        }
    }

    /// Stops the connector for good with `error`; the first error wins.
    pub fn fail(&self, error: Error) {
        let mut fatal = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        if fatal.is_none() {
            tracing::error!(error = %error, "connector stopping");
            *fatal = Some(error);
        }
        drop(fatal);
        self.stop.cancel();
    }

    pub fn revoked(&self, detail: String) {
        self.fail(Error::Revoked {
            connector: self.id.clone(),
            detail,
        });
    }

    /// The socket slot `slot` dials from.
    pub(crate) fn endpoint(&self, slot: usize) -> &Endpoint {
        &self.endpoints[slot % self.endpoints.len()]
    }

    /// Starts the region chooser, then the slots, slot `i` on shard
    /// `i % shards`: its tunnel and every stream on it run there.
    pub(crate) fn spawn_slots(self: &Arc<Self>, n: usize, shards: &crate::shard::Shards) {
        self.tracker
            .spawn(crate::probe::run(self.clone()).instrument(tracing::info_span!("region")));
        self.tracker
            .spawn(crate::resolve::run(self.clone()).instrument(tracing::info_span!("resolve")));
        for slot in 0..n {
            let pool = self.clone();
            self.tracker.spawn_on(
                run_slot(pool, slot).instrument(tracing::info_span!("slot", slot)),
                shards.for_slot(slot),
            );
        }
    }
}

/// The transport settings of every tunnel: the edge may open
/// `max_streams` request streams at once.
pub(crate) fn transport_config(max_streams: u32) -> TransportConfig {
    portico_agent::quic::tunnel_transport(max_streams)
}

/// Binds the pool's UDP socket: dual-stack IPv6 where the host allows it,
/// else IPv4. Its release counts as a task of `tracker`.
pub(crate) fn bind_endpoint(tracker: &TaskTracker) -> Result<Endpoint, Error> {
    let v6: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 0).into();
    let v4: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, 0).into();
    portico_agent::quic::bind_endpoint(v6, None, tracker)
        .or_else(|e| {
            tracing::debug!(error = %portico_agent::error_chain(&e), "no dual-stack UDP socket; using IPv4 only");
            portico_agent::quic::bind_endpoint(v4, None, tracker)
        })
        .map_err(|source| Error::Bind {
            what: "tunnel UDP socket",
            addr: v4,
            source,
        })
}

/// The edge a slot dials: round-robin over the targets (the home region's
/// edges, one per address of a name), sorted by id and address, moved on by `skip` (the slot's failed dials since
/// its last tunnel), so a slot whose edge is gone tries the region's other
/// edges instead of waiting for the one it started with. With 4 slots and
/// two edges or more, the tunnels spread over two edges at least.
fn pick(slot: usize, skip: usize, targets: &[EdgeEndpoint]) -> Option<EdgeEndpoint> {
    let mut edges: Vec<&EdgeEndpoint> = targets.iter().collect();
    if edges.is_empty() {
        return None;
    }
    edges.sort_by(|a, b| (&a.id, &a.tunnel_addr).cmp(&(&b.id, &b.tunnel_addr)));
    Some(edges[slot.wrapping_add(skip) % edges.len()].clone())
}

/// Exponential backoff with full jitter.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: BACKOFF_MIN }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// A delay drawn uniformly from `[0, current]`; doubles the current.
    fn delay(&mut self) -> Duration {
        let d = self.next.mul_f64(fastrand::f64());
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }

    /// The delay after an edge refused a tunnel because this connector
    /// holds as many as it allows: that lasts until one of them closes, so
    /// wait long (`[BACKOFF_MAX / 2, BACKOFF_MAX]`), and keep the backoff
    /// at its cap.
    fn refused(&mut self) -> Duration {
        self.next = BACKOFF_MAX;
        BACKOFF_MAX.mul_f64(0.5 + fastrand::f64() / 2.0)
    }
}

/// Why a tunnel no longer counts for its slot.
#[derive(Debug)]
enum Release {
    /// It drains (the edge asked, or it moves); dial a replacement now.
    Draining,
    /// It closed.
    Closed,
    /// Its replacement on the slot's new edge is up; it drains (after the
    /// linger, for a move to another region).
    Moved,
}

/// A replacement tunnel being dialled for a move, with its edge.
type Replacement = (
    EdgeEndpoint,
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Tunnel, DialError>> + Send>>,
);

/// Waits for the replacement dial, if one runs.
async fn replaced(moving: &mut Option<Replacement>) -> Result<Tunnel, DialError> {
    match moving {
        Some((_, dial)) => dial.await,
        None => std::future::pending().await,
    }
}

/// Drains a tunnel whose slot moved on: at once within a region, after the
/// linger when it moved to another region.
fn retire(pool: &Pool, stop: CancellationToken, linger: Duration) {
    if linger.is_zero() {
        stop.cancel();
        return;
    }
    let shutdown = pool.stop.clone();
    pool.tracker.spawn(
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(linger) => {}
            }
            stop.cancel();
        }
        .in_current_span(),
    );
}

async fn run_slot(pool: Arc<Pool>, slot: usize) {
    let mut backoff = Backoff::new();
    let mut targets = pool.targets.subscribe();
    let mut failed_dials = 0usize;
    // A tunnel already up, from a move: the slot runs it without dialing.
    let mut ready: Option<(Tunnel, EdgeEndpoint)> = None;
    loop {
        if pool.stop.is_cancelled() {
            return;
        }
        let (tunnel, edge) = match ready.take() {
            Some(up) => up,
            None => {
                let edge = pool.pick(slot, failed_dials, &targets.borrow_and_update());
                let Some(edge) = edge else {
                    tracing::debug!("no edge to dial yet; waiting for the router's config and the region choice");
                    tokio::select! {
                        _ = pool.stop.cancelled() => return,
                        r = targets.changed() => if r.is_err() { return },
                    }
                    continue;
                };
                let dialed = tokio::select! {
                    _ = pool.stop.cancelled() => return,
                    r = dial(&pool, slot, &edge) => r,
                };
                match dialed {
                    Ok(t) => {
                        let edge = t.reached(edge);
                        (t, edge)
                    }
                    Err(DialError::Revoked { detail }) => {
                        pool.revoked(detail);
                        return;
                    }
                    Err(DialError::Refused {
                        code: CloseCode::TooManyTunnels,
                        reason,
                    }) => {
                        failed_dials = failed_dials.wrapping_add(1);
                        let delay = backoff.refused();
                        tracing::warn!(
                            edge = %edge.id,
                            %reason,
                            retry_in = ?delay,
                            "the edge refused this tunnel: this connector already holds as many tunnels \
                             to it as the edge allows (use fewer --tunnels, or more edges); this slot \
                             tries the next edge after the delay"
                        );
                        tokio::select! {
                            _ = pool.stop.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        continue;
                    }
                    Err(e) => {
                        failed_dials = failed_dials.wrapping_add(1);
                        let delay = backoff.delay();
                        tracing::warn!(edge = %edge.id, addr = %edge.tunnel_addr, error = %portico_agent::error_chain(&e), retry_in = ?delay, "cannot open a tunnel; trying the next edge");
                        tokio::select! {
                            _ = pool.stop.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        continue;
                    }
                }
            }
        };

        let up_since = Instant::now();
        let tunnel_stop = pool.stop.child_token();
        let (released_tx, mut released) = oneshot::channel();
        let _live = pool.hold_live(slot, &tunnel, &edge);
        let span = tracing::info_span!("tunnel", tunnel.id = %tunnel.id, edge = %edge.id);
        pool.tracker.spawn(
            run_tunnel(pool.clone(), tunnel, tunnel_stop.clone(), released_tx).instrument(span),
        );

        // Wait until the tunnel is released; move it when the targets no
        // longer assign this slot to its edge: the replacement is dialled
        // while this tunnel serves, and this one drains only once the
        // replacement is up (after the linger, across regions), so a move
        // never leaves the slot without a tunnel.
        let mut move_at: Option<tokio::time::Instant> = None;
        let mut moving: Option<Replacement> = None;
        // A slot away from its own edge (it could not be dialled, or it
        // drained while no router could say it is back) tries it again now
        // and then.
        let home_every =
            || tokio::time::Instant::now() + HOME_CHECK_EVERY.mul_f64(1.0 + fastrand::f64() / 2.0);
        let away = |edge: &EdgeEndpoint, targets: &[EdgeEndpoint]| {
            pick(slot, 0, targets)
                .is_some_and(|own| own.id != edge.id || own.tunnel_addr != edge.tunnel_addr)
        };
        let mut home_check = (failed_dials != 0 || away(&edge, &targets.borrow())).then(home_every);
        let mut homing = false;
        let release = loop {
            tokio::select! {
                _ = sleep_until(home_check), if moving.is_none() && move_at.is_none() => {
                    home_check = Some(home_every());
                    match pool.pick(slot, 0, &targets.borrow()) {
                        Some(home) if home.id != edge.id || home.tunnel_addr != edge.tunnel_addr => {
                            tracing::debug!(to = %home.id, "trying this slot's own edge again");
                            let (p, to) = (pool.clone(), home.clone());
                            homing = true;
                            moving = Some((home, Box::pin(async move { dial(&p, slot, &to).await })));
                        }
                        Some(_) => {
                            // Home already (the targets changed meanwhile),
                            // or its own edge is passed over while it
                            // drains: keep watching until that is over.
                            failed_dials = 0;
                            if !away(&edge, &targets.borrow()) {
                                home_check = None;
                            }
                        }
                        None => {}
                    }
                }
                r = &mut released => break r.unwrap_or(Release::Closed),
                r = targets.changed(), if move_at.is_none() && moving.is_none() => {
                    if r.is_err() {
                        tunnel_stop.cancel();
                        move_at = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
                        continue;
                    }
                    let next = pool.pick(slot, failed_dials, &targets.borrow_and_update());
                    if next.as_ref().is_none_or(|n| n.id == edge.id && n.tunnel_addr == edge.tunnel_addr) {
                        // Same edge, or nothing to dial: keep this tunnel.
                        continue;
                    }
                    let stagger = MOVE_STAGGER * slot as u32 + MOVE_STAGGER.mul_f64(fastrand::f64() / 2.0);
                    tracing::info!(to = next.as_ref().map(|n| tracing::field::display(&n.id)), in_ = ?stagger, "edge list changed; moving this tunnel");
                    move_at = Some(tokio::time::Instant::now() + stagger);
                }
                _ = sleep_until(move_at), if moving.is_none() => {
                    move_at = None;
                    let next = pool.pick(slot, failed_dials, &targets.borrow_and_update());
                    match next {
                        Some(n) if n.id != edge.id || n.tunnel_addr != edge.tunnel_addr => {
                            let (p, to) = (pool.clone(), n.clone());
                            moving = Some((n, Box::pin(async move { dial(&p, slot, &to).await })));
                        }
                        // The targets came back to this edge, or are empty.
                        _ => {}
                    }
                }
                r = replaced(&mut moving) => {
                    let Some((next, _)) = moving.take() else { continue };
                    match r {
                        Ok(new) => {
                            let linger = if next.region != edge.region {
                                pool.region.move_linger
                            } else {
                                Duration::ZERO
                            };
                            tracing::info!(to = %next.id, region = %next.region, ?linger, "replacement tunnel up; draining this one");
                            retire(&pool, tunnel_stop.clone(), linger);
                            backoff.reset();
                            failed_dials = 0;
                            let next = new.reached(next);
                            ready = Some((new, next));
                            break Release::Moved;
                        }
                        Err(DialError::Revoked { detail }) => {
                            pool.revoked(detail);
                            return;
                        }
                        Err(e) if homing => {
                            homing = false;
                            tracing::debug!(edge = %next.id, error = %portico_agent::error_chain(&e), "this slot's own edge still cannot be dialled; staying");
                        }
                        Err(e) => {
                            let delay = backoff.delay().max(MOVE_STAGGER);
                            tracing::warn!(edge = %next.id, addr = %next.tunnel_addr, error = %portico_agent::error_chain(&e), retry_in = ?delay, "cannot open the replacement tunnel; this one keeps serving");
                            move_at = Some(tokio::time::Instant::now() + delay);
                        }
                    }
                }
            }
        };
        match release {
            Release::Moved => {}
            Release::Draining => {
                backoff.reset();
            }
            Release::Closed => {
                if pool.stop.is_cancelled() {
                    return;
                }
                if up_since.elapsed() > STABLE_AFTER {
                    backoff.reset();
                }
                let delay = backoff.delay();
                tracing::info!(retry_in = ?delay, "tunnel closed; reconnecting");
                tokio::select! {
                    _ = pool.stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why a tunnel (or a probe) could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error("cannot resolve {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("cannot resolve {addr}")]
    Name {
        addr: String,
        #[source]
        source: crate::error::ResolveError,
    },
    #[error("TLS setup: {reason}")]
    Tls { reason: String },
    #[error("connect")]
    Connect(#[from] quinn::ConnectError),
    #[error("handshake: {reason}")]
    Handshake { reason: String },
    #[error("no Welcome within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    #[error("the edge refused the tunnel ({code}): {reason}")]
    Refused { code: CloseCode, reason: String },
    #[error("revoked: {detail}")]
    Revoked { detail: String },
}

/// A welcomed tunnel.
pub(crate) struct Tunnel {
    id: TunnelId,
    /// The edge reached, from its certificate.
    edge: EdgeId,
    conn: Connection,
    ctl_send: SendStream,
    ctl_recv: RecvStream,
    /// The control protocol's machine, past the handshake.
    ctl: Control,
    welcome: Welcome,
}

impl Tunnel {
    /// `target` as this tunnel reached it: with the id of the edge that
    /// answered (a region's name may lead to any of its edges).
    fn reached(&self, target: EdgeEndpoint) -> EdgeEndpoint {
        EdgeEndpoint {
            id: self.edge.clone(),
            ..target
        }
    }
}

/// The TLS and QUIC settings of a dial: the edge is verified as the one
/// named by the server name dialled (`edge_server_name`), or, with
/// `any_edge_of`, as any edge of that region (an address a region's name
/// gave that no listed edge has).
pub(crate) fn client_config(
    creds: &Credentials,
    transport: &Arc<TransportConfig>,
    any_edge_of: Option<&RegionId>,
) -> Result<quinn::ClientConfig, DialError> {
    let tls_err = |e: &dyn std::fmt::Display| DialError::Tls {
        reason: e.to_string(),
    };
    let chain = creds.cert_chain().map_err(|e| tls_err(&e))?;
    let key = creds.private_key().map_err(|e| tls_err(&e))?;
    let builder = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(&e))?;
    let builder = match any_edge_of {
        Some(region) => builder.dangerous().with_custom_certificate_verifier(
            pki::region_edge_verifier(&creds.ca_pem, region).map_err(|e| tls_err(&e))?,
        ),
        None => {
            builder.with_root_certificates(pki::root_store(&creds.ca_pem).map_err(|e| tls_err(&e))?)
        }
    };
    let mut tls = builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls_err(&e))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| tls_err(&e))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport.clone());
    Ok(config)
}

/// Whether a close carries `CloseCode::Revoked`, and its reason.
fn revoked_close(e: &ConnectionError) -> Option<String> {
    match e {
        ConnectionError::ApplicationClosed(c)
            if CloseCode::from_wire(c.error_code.into_inner()) == CloseCode::Revoked =>
        {
            Some(format!(
                "the edge closed the tunnel: {}",
                String::from_utf8_lossy(&c.reason)
            ))
        }
        _ => None,
    }
}

async fn dial(pool: &Pool, slot: usize, edge: &EdgeEndpoint) -> Result<Tunnel, DialError> {
    let endpoint = pool.endpoint(slot);
    let v4_only = endpoint.local_addr().is_ok_and(|a| a.is_ipv4());
    let addr = pool
        .resolver
        .socket_addr(&edge.tunnel_addr, v4_only)
        .await?;
    let creds = pool.creds.borrow().clone();
    // An edge the router lists is verified as itself; an address only a
    // region's name gave, as an edge of that region.
    let listed = pool
        .config
        .borrow()
        .as_ref()
        .is_some_and(|c| c.edges.iter().any(|e| e.id == edge.id));
    let any_edge_of = (!listed).then_some(&edge.region);
    let mut config = client_config(&creds, &pool.transport, any_edge_of)?;
    let shard = pool.shard_base.wrapping_add((slot % 256) as u8);
    config.initial_dst_cid_provider(Arc::new(move || {
        portico_agent::quic::initial_connection_id(shard)
    }));
    let connecting = endpoint.connect_with(config, addr, &edge_server_name(&edge.id))?;
    let handshake = async {
        let conn = connecting.await.map_err(|e| DialError::Handshake {
            reason: format!("{e:#}"),
        })?;
        let welcome = hello(pool, &conn).await;
        match welcome {
            Ok((ctl_send, ctl_recv, ctl, welcome)) => Ok((conn, ctl_send, ctl_recv, ctl, welcome)),
            Err(e) => {
                // A refused client certificate shows up only now (TLS 1.3):
                // the close reason tells a revoked connector apart.
                let reason = conn.close_reason();
                if let Some(detail) = reason.as_ref().and_then(revoked_close) {
                    return Err(DialError::Revoked { detail });
                }
                conn.close(code(CloseCode::ProtocolError), b"handshake failed");
                Err(e)
            }
        }
    };
    let (conn, ctl_send, ctl_recv, ctl, welcome) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| DialError::Timeout)??;
    // Which edge this is, as its certificate (verified above) says.
    let reached = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| certs.first().map(pki::identity_of));
    let Some(Ok(portico_proto::api::Identity::Edge { id: edge_id, .. })) = reached else {
        conn.close(code(CloseCode::ProtocolError), b"not an edge");
        return Err(DialError::Handshake {
            reason: "the peer's certificate names no edge".into(),
        });
    };
    if edge_id != edge.id {
        tracing::info!(addr = %edge.tunnel_addr, edge = %edge_id, "the region's name led to this edge");
    }
    pool.learn(&edge.tunnel_addr, &edge_id);
    let id = TunnelId(pool.next_tunnel.fetch_add(1, Ordering::Relaxed));
    Ok(Tunnel {
        id,
        edge: edge_id,
        conn,
        ctl_send,
        ctl_recv,
        ctl,
        welcome,
    })
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Opens the control stream, says `Hello` and waits for `Welcome`, driving
/// the control machine.
async fn hello(
    pool: &Pool,
    conn: &Connection,
) -> Result<(SendStream, RecvStream, Control, Welcome), DialError> {
    let lost = |e: &dyn std::fmt::Display| DialError::Handshake {
        reason: e.to_string(),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        capabilities: capabilities::ALL,
        connector_id: pool.id.clone(),
        group: pool.group.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let mut ctl = Control::dial_tunnel(ControlConfig::CONNECTOR, hello, now());
    let mut buf = [0u8; READ_CHUNK];
    loop {
        while let Some(frame) = ctl.poll_transmit() {
            write_frame(&mut send, &frame).await.map_err(|e| lost(&e))?;
        }
        while let Some(event) = ctl.poll_event() {
            match event {
                Event::Welcomed(w) => return Ok((send, recv, ctl, w)),
                Event::Closed(closed) => {
                    // This side's Goodbye, if it closed, says why.
                    while let Some(frame) = ctl.poll_transmit() {
                        let _ = write_frame(&mut send, &frame).await;
                    }
                    return Err(refusal(closed));
                }
                _ => {}
            }
        }
        tokio::select! {
            () = sleep_until(ctl.poll_timeout().map(tokio::time::Instant::from_std)) => ctl.handle_timeout(now()),
            r = recv.read(&mut buf) => match r {
                Ok(Some(n)) => ctl.handle_data(&buf[..n], now()),
                Ok(None) => ctl.handle_finish(now()),
                Err(e) => return Err(lost(&e)),
            },
        }
    }
}

/// Why a handshake the control machine closed failed.
fn refusal(closed: Closed) -> DialError {
    match (closed.by, closed.code) {
        (By::Peer, CloseCode::Revoked) => DialError::Revoked {
            detail: closed.reason,
        },
        (By::Peer, code) if code != CloseCode::ProtocolError => DialError::Refused {
            code,
            reason: closed.reason,
        },
        _ => DialError::Handshake {
            reason: closed.reason,
        },
    }
}

/// Counts a tunnel as up while alive.
struct UpGuard {
    up: watch::Sender<usize>,
    gauge: prometheus::IntGauge,
}

impl UpGuard {
    fn new(pool: &Pool) -> Self {
        pool.up.send_modify(|n| *n += 1);
        pool.metrics.tunnels.inc();
        UpGuard {
            up: pool.up.clone(),
            gauge: pool.metrics.tunnels.clone(),
        }
    }
}

impl Drop for UpGuard {
    fn drop(&mut self) {
        self.up.send_modify(|n| *n = n.saturating_sub(1));
        self.gauge.dec();
    }
}

/// Who started a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrainCause {
    /// The edge said `Drain`: it keeps opening streams here while users
    /// still reach it, and closes the tunnel itself at the end of its
    /// drain. The slot has a replacement dialled elsewhere meanwhile.
    Edge,
    /// The control stream ended: the tunnel cannot be judged any more.
    ControlLost,
    Moved,
    Shutdown,
}

impl DrainCause {
    /// Whether this side closes the tunnel once its streams are done
    /// (else the edge closes it).
    fn close_when_idle(self) -> bool {
        self != DrainCause::Edge
    }
}

/// Runs a welcomed tunnel to its end: accepts the edge's streams, answers
/// and sends pings, and drains when the edge or the slot asks.
async fn run_tunnel(
    pool: Arc<Pool>,
    tunnel: Tunnel,
    stop: CancellationToken,
    released: oneshot::Sender<Release>,
) {
    let Tunnel {
        conn,
        mut ctl_send,
        mut ctl_recv,
        mut ctl,
        welcome,
        ..
    } = tunnel;
    tracing::info!(
        region = %welcome.region,
        version = welcome.version,
        remote = %conn.remote_address(),
        "tunnel up"
    );
    let mut released = Some(released);
    let mut up = Some(UpGuard::new(&pool));
    let mut release = |r: Release, up: &mut Option<UpGuard>| {
        up.take();
        if let Some(tx) = released.take() {
            let _ = tx.send(r);
        }
    };

    let streams = TaskTracker::new();
    let mut draining: Option<DrainCause> = None;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut start_drain = |cause: DrainCause,
                           draining: &mut Option<DrainCause>,
                           deadline: &mut Option<tokio::time::Instant>,
                           up: &mut Option<UpGuard>| {
        match *draining {
            None => {
                *draining = Some(cause);
                let limit = if cause.close_when_idle() {
                    DRAIN_LIMIT
                } else {
                    EDGE_DRAIN_LIMIT
                };
                *deadline = Some(tokio::time::Instant::now() + limit);
                streams.close();
                release(Release::Draining, up);
            }
            // Drained by the edge, then told to stop (or the control stream
            // ended): close once the streams are done.
            Some(DrainCause::Edge) if cause.close_when_idle() => {
                *draining = Some(cause);
                *deadline = Some(tokio::time::Instant::now() + DRAIN_LIMIT);
            }
            Some(_) => {}
        }
    };
    // Whether the control stream still works: the machine is driven while
    // it does.
    let mut control_open = true;
    let mut buf = [0u8; READ_CHUNK];

    let closed: ConnectionError = loop {
        if control_open {
            while let Some(frame) = ctl.poll_transmit() {
                if let Err(e) = write_frame(&mut ctl_send, &frame).await {
                    tracing::debug!(error = %portico_agent::error_chain(&e), "cannot write on the control stream");
                    control_open = false;
                    break;
                }
            }
        }
        while let Some(event) = ctl.poll_event() {
            match event {
                Event::Rtt(rtt) => {
                    pool.metrics.tunnel_rtt.observe(rtt.as_secs_f64());
                    tracing::trace!(?rtt, "pong");
                }
                Event::Health(change) => tracing::debug!(?change, "the edge's answers to pings"),
                Event::PeerDraining => {
                    if draining.is_none() {
                        tracing::info!(
                            "the edge asked this tunnel to drain; opening a replacement elsewhere \
                             (this tunnel serves on until the edge closes it)"
                        );
                        pool.edge_draining(&welcome.edge_id);
                    }
                    start_drain(
                        DrainCause::Edge,
                        &mut draining,
                        &mut drain_deadline,
                        &mut up,
                    );
                }
                Event::ConfigChanged(v) => {
                    tracing::debug!(version = v, "the edge reports a config change");
                }
                Event::Closed(closed) => {
                    control_open = false;
                    match closed.by {
                        By::Peer => log_goodbye(closed.code, &closed.reason),
                        By::Local => {
                            tracing::warn!(code = %closed.code, reason = %closed.reason, "closing the tunnel");
                            while let Some(frame) = ctl.poll_transmit() {
                                let _ = write_frame(&mut ctl_send, &frame).await;
                            }
                            conn.close(code(closed.code), closed.reason.as_bytes());
                        }
                    }
                    // Without its control stream the tunnel cannot be
                    // judged or drained: a replacement opens, and what is
                    // in flight here finishes.
                    start_drain(
                        DrainCause::ControlLost,
                        &mut draining,
                        &mut drain_deadline,
                        &mut up,
                    );
                }
                Event::Hello(_) | Event::Welcomed(_) => {}
            }
        }
        tokio::select! {
            biased;
            _ = stop.cancelled(), if draining.is_none_or(|c| !c.close_when_idle()) => {
                let cause = if pool.stop.is_cancelled() { DrainCause::Shutdown } else { DrainCause::Moved };
                tracing::info!(?cause, "draining tunnel");
                if draining.is_none() {
                    ctl.drain();
                }
                start_drain(cause, &mut draining, &mut drain_deadline, &mut up);
            }
            // quinn's read is cancel safe, and the machine keeps a partial
            // frame, so waking for something else loses nothing.
            r = ctl_recv.read(&mut buf), if control_open => match r {
                Ok(Some(n)) => ctl.handle_data(&buf[..n], now()),
                Ok(None) => ctl.handle_finish(now()),
                Err(e) => {
                    tracing::warn!(error = %portico_agent::error_chain(&e), "control stream failed");
                    control_open = false;
                }
            },
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let ctx = pool.streams.clone();
                    // Boxed: the task cell then holds a pointer, and spawning moves 16
                    // bytes instead of the ~3 KiB stream future (several times).
                    pool.tracker.spawn(streams.track_future(Box::pin(serve_stream(ctx, send, recv)).in_current_span()));
                }
                Err(e) => break e,
            },
            () = sleep_until(ctl.poll_timeout().map(tokio::time::Instant::from_std)), if control_open => {
                ctl.handle_timeout(now());
            }
            _ = streams.wait(), if draining.is_some_and(DrainCause::close_when_idle) => {
                let (close, reason) = match draining {
                    Some(DrainCause::Shutdown) => (CloseCode::Shutdown, "connector shutting down"),
                    Some(DrainCause::Moved) => (CloseCode::NoError, "tunnel moved to another edge"),
                    _ => (CloseCode::NoError, "drained"),
                };
                if control_open {
                    ctl.goodbye(close, reason);
                    while let Some(frame) = ctl.poll_transmit() {
                        let _ = write_frame(&mut ctl_send, &frame).await;
                    }
                }
                let _ = ctl_send.finish();
                conn.close(code(close), reason.as_bytes());
                tracing::info!(reason, "tunnel closed");
                break conn.closed().await;
            }
            _ = sleep_until(drain_deadline) => {
                tracing::warn!(cause = ?draining, "the drained tunnel is still open at its deadline; closing it");
                conn.close(code(CloseCode::NoError), b"drain timed out");
                break conn.closed().await;
            }
        }
    };
    drop(up.take());
    if let Some(detail) = revoked_close(&closed) {
        pool.revoked(detail);
    } else if draining.is_none() {
        match &closed {
            ConnectionError::ApplicationClosed(c) => tracing::warn!(
                code = %CloseCode::from_wire(c.error_code.into_inner()),
                reason = %String::from_utf8_lossy(&c.reason),
                "the edge closed the tunnel"
            ),
            ConnectionError::LocallyClosed => tracing::info!("tunnel closed"),
            other => tracing::warn!(error = %portico_agent::error_chain(&other), "tunnel lost"),
        }
    }
    release(Release::Closed, &mut up);
}

fn log_goodbye(code: CloseCode, reason: &str) {
    match code {
        CloseCode::NoError | CloseCode::Shutdown => {
            tracing::info!(%code, %reason, "the edge says goodbye")
        }
        _ => tracing::warn!(%code, %reason, "the edge says goodbye"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_proto::{EdgeId, RegionId};

    fn config(edges: &[&str]) -> ConnectorConfig {
        ConnectorConfig {
            version: 1,
            group: GroupId::default_group(),
            apps: vec![],
            edges: edges
                .iter()
                .map(|e| EdgeEndpoint {
                    id: EdgeId::new(*e).unwrap(),
                    region: RegionId::default_region(),
                    tunnel_addr: format!("{e}:4433"),
                })
                .collect(),
            region: None,
            tunnel_names: Default::default(),
            links: vec![],
            backend_cas: vec![],
        }
    }

    #[test]
    fn slots_spread_round_robin_and_move_on_after_a_failed_dial() {
        let one = config(&["e1"]);
        for slot in 0..4 {
            assert_eq!(pick(slot, 0, &one.edges).unwrap().id.as_str(), "e1");
            assert_eq!(pick(slot, 3, &one.edges).unwrap().id.as_str(), "e1");
        }
        let two = config(&["e2", "e1"]);
        let picked: Vec<String> = (0..4)
            .map(|s| pick(s, 0, &two.edges).unwrap().id.to_string())
            .collect();
        assert_eq!(picked, ["e1", "e2", "e1", "e2"]);
        // Slot 0 failed once on e1: it tries e2, then e1 again.
        assert_eq!(pick(0, 1, &two.edges).unwrap().id.as_str(), "e2");
        assert_eq!(pick(0, 2, &two.edges).unwrap().id.as_str(), "e1");
        assert_eq!(
            pick(usize::MAX, usize::MAX, &two.edges)
                .unwrap()
                .id
                .as_str(),
            "e1"
        );
        assert!(pick(0, 0, &config(&[]).edges).is_none());
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_full_jitter() {
        let mut b = Backoff::new();
        let mut caps = vec![];
        for _ in 0..12 {
            let cap = b.next;
            let d = b.delay();
            assert!(d <= cap);
            caps.push(cap);
        }
        assert_eq!(caps[0], BACKOFF_MIN);
        assert_eq!(caps[1], BACKOFF_MIN * 2);
        assert_eq!(*caps.last().unwrap(), BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next, BACKOFF_MIN);
    }

    /// Refused for too many tunnels: the wait is long from the first
    /// refusal on (never a quick retry), and what follows stays capped.
    #[test]
    fn a_refusal_for_too_many_tunnels_waits_long() {
        let mut b = Backoff::new();
        for _ in 0..100 {
            let d = b.refused();
            assert!((BACKOFF_MAX / 2..=BACKOFF_MAX).contains(&d), "{d:?}");
        }
        assert_eq!(b.next, BACKOFF_MAX);
        assert!(b.delay() <= BACKOFF_MAX);
        assert_eq!(b.next, BACKOFF_MAX);
    }
}
