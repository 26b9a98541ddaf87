//! The Portico edge: it serves users at the apps' external hostnames over
//! HTTPS (HTTP/1.1 and HTTP/2 on TCP, HTTP/3 on UDP at the same port,
//! advertised with `Alt-Svc`), accepts QUIC tunnels from connectors (mutual
//! TLS, ALPN `portico/1`), and carries each request over its own stream of a
//! tunnel of the app's connector group. It enrolls with the router, renews
//! its certificates, follows the router's config by long-poll (and keeps
//! serving from the last saved snapshot while the router is away), reports
//! the tunnels it holds, and exports Prometheus metrics. A request for a
//! group with no tunnel here goes over the edge mesh (`mesh.rs`) to an
//! edge that has one, at most one hop; on SIGTERM it drains (`Handle`,
//! ARCHITECTURE.md "Draining an edge").
//!
//! It does not talk to backends (the connector does), store configuration
//! (the router does), pre-authenticate users or carry WebSockets over
//! HTTP/3; sign-in is the next issue's work.

mod auth;
mod certs;
mod client_conn;
mod clients;
mod config;
mod control;
pub mod error;
mod http3;
mod listener;
mod mesh;
mod metrics;
mod pages;
mod request;
mod routing;
mod shard;
mod stall;
mod tunnel_acceptor;
mod tunnels;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use portico_proto::api::{EdgeConfig, Identity};
use portico_proto::{CloseCode, EdgeId, RegionId};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::{Config, MeshDialOverrides};
pub use error::Error;

use certs::CertStore;
use metrics::Metrics;
use routing::RoutingTable;
use tunnels::Tunnels;

/// Starts an edge: enrolls (or loads saved credentials), loads the last
/// config snapshot, binds every listener and returns once they listen.
/// Everything stops when `shutdown` is cancelled; [`Handle::wait`] returns
/// after the drain.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Handle, Error> {
    config.validate()?;
    control::start(config, shutdown).await
}

/// A running edge.
#[derive(Debug)]
pub struct Handle {
    /// This edge's id, from its certificate.
    pub id: EdgeId,
    /// The region it serves, from its certificate.
    pub region: RegionId,
    /// The bound public (HTTPS) address.
    pub public_addr: SocketAddr,
    /// The bound HTTP/3 (UDP) address: the public port, unless HTTP/3 is off.
    pub h3_addr: Option<SocketAddr>,
    /// The bound tunnel (QUIC, UDP) address.
    pub tunnel_addr: SocketAddr,
    /// The bound mesh (QUIC, UDP) address, if this edge takes mesh links.
    pub mesh_addr: Option<SocketAddr>,
    /// The bound metrics address, if any.
    pub metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    ready: watch::Receiver<bool>,
}

impl Handle {
    /// Whether a config (fresh from the router, or the saved snapshot) is
    /// loaded and the edge is not shutting down.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Resolves once a config is loaded (or the edge shuts down).
    pub async fn ready(&self) {
        let mut rx = self.ready.clone();
        tokio::select! {
            _ = rx.wait_for(|r| *r) => {}
            () = self.shared.shutdown.cancelled() => {}
        }
    }

    /// The tunnels attached right now.
    pub fn tunnel_count(&self) -> usize {
        self.shared.tunnels.count()
    }

    /// The version of the loaded config (0 when none is).
    pub fn config_version(&self) -> u64 {
        self.shared.table.load().version()
    }

    /// A token that stops the edge without a drain when cancelled (a
    /// second signal): what is in flight is cut, and the edge stops as if
    /// the grace were over.
    pub fn hard_stop(&self) -> CancellationToken {
        self.shared.hard_stop.clone()
    }

    /// Waits for shutdown (the token given to `start`) and the drain.
    pub async fn wait(self) -> Result<(), Error> {
        self.shared.shutdown.cancelled().await;
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
        // The shards' runtimes end with their last task; join their
        // threads, so that nothing of the edge outlives `wait`.
        let threads = std::mem::take(&mut *lock(&self.shared.shard_threads));
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        Ok(())
    }
}

/// What the listeners, the tunnels and the control loops share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) edge_id: EdgeId,
    pub(crate) region: RegionId,
    pub(crate) table: ArcSwap<RoutingTable>,
    pub(crate) tunnels: Tunnels,
    pub(crate) metrics: Arc<Metrics>,
    /// The `Alt-Svc` value HTTP/1.1 and HTTP/2 answers carry (with HTTP/3).
    pub(crate) alt_svc: Option<http::HeaderValue>,
    pub(crate) ready: watch::Sender<bool>,
    pub(crate) connector_timeout_grace: Duration,
    pub(crate) drain_delay: Duration,
    pub(crate) grace: Duration,
    /// Whether every request gets an access-log line.
    pub(crate) access_log: request::AccessLog,
    /// Users' connections by client: the caps and budgets.
    pub(crate) clients: Arc<clients::Clients>,
    pub(crate) timeouts: client_conn::ConnTimeouts,
    pub(crate) h2: listener::H2Limits,
    /// The edge-wide count of stalled responses.
    pub(crate) stalls: Arc<stall::StallBudget>,
    /// The cap on tunnels per connector and the liveness periods.
    pub(crate) tunnel_policy: tunnel_acceptor::TunnelPolicy,
    /// The mesh links this edge dials to other edges: one endpoint and
    /// set of links per shard, made on the shard's own runtime, so that a
    /// forwarded request stays on the thread that serves it (the tunnels'
    /// rule; `shard.rs`).
    meshes: Box<[std::sync::OnceLock<mesh::Mesh>]>,
    /// What a shard's mesh endpoint is made of.
    mesh_params: mesh::Params,
    /// The `Portico-Route` of a response served here: this edge's id.
    pub(crate) route: http::HeaderValue,
    /// Whether the last config watch got an answer from the router (false
    /// until the first): without one the presence may be out of date.
    pub(crate) router_reachable: std::sync::atomic::AtomicBool,
    /// Sign-in for apps with `preauth = oidc`, from the router's settings.
    pub(crate) auth: auth::Auth,
    /// What the public listeners present: uploaded certificates by SNI,
    /// then the edge's own.
    pub(crate) public_certs: Arc<certs::SniCerts>,
    /// Cancelled to start the shutdown: the edge is draining. It tells the
    /// router (which takes it out of the DNS answers, the presence and the
    /// connectors' edge lists), refuses new tunnels and mesh links, asks
    /// its connectors and mesh peers to go elsewhere, and keeps serving
    /// users for the drain delay.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the drain delay is over: no new users; connections
    /// finish their requests within the grace.
    pub(crate) closing: CancellationToken,
    /// Cancelled when the grace is over: in-flight work is cut.
    pub(crate) hard_stop: CancellationToken,
    /// Every task of the edge (listeners, tunnels, control loops).
    pub(crate) tracker: TaskTracker,
    /// Public connections, request-body pumps and WebSocket pipes: the
    /// work the drain waits for.
    pub(crate) conns: TaskTracker,
    /// Every shard's tunnel endpoint, for the drain to close.
    tunnel_endpoints: std::sync::Mutex<Vec<quinn::Endpoint>>,
    /// The threads of shards 1.., joined by `Handle::wait`.
    shard_threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Shared {
    /// This shard's mesh links (shard 0's on a thread that is no shard's).
    pub(crate) fn mesh(&self) -> &mesh::Mesh {
        self.meshes
            .get(shard::current())
            .and_then(std::sync::OnceLock::get)
            .or_else(|| self.meshes[0].get())
            .expect("shard 0's mesh is made before anything serves")
    }

    /// Makes the calling shard's mesh endpoint, on its runtime; its drain
    /// closes it with the tunnel endpoints.
    pub(crate) fn start_shard_mesh(&self, index: usize) -> Result<(), Error> {
        let mesh = mesh::Mesh::new(&self.mesh_params)?;
        self.add_tunnel_endpoint(mesh.endpoint());
        if let Some(slot) = self.meshes.get(index) {
            let _ = slot.set(mesh);
        }
        Ok(())
    }

    pub(crate) fn add_tunnel_endpoint(&self, endpoint: quinn::Endpoint) {
        lock(&self.tunnel_endpoints).push(endpoint);
    }

    pub(crate) fn add_shard_thread(&self, thread: std::thread::JoinHandle<()>) {
        lock(&self.shard_threads).push(thread);
    }

    /// Admits a user connection under the client caps (`what` names its
    /// kind in the log), or counts and logs its refusal.
    pub(crate) fn admit_client(
        &self,
        client: std::net::SocketAddr,
        what: &'static str,
    ) -> Option<clients::ConnPermit> {
        match self.clients.admit(client.ip()) {
            Ok(p) => Some(p),
            Err(refused) => {
                self.metrics
                    .conns_refused
                    .with_label_values(&[refused.label()])
                    .inc();
                tracing::debug!(%client, cap = refused.label(), what, "connection refused: at the connection cap");
                None
            }
        }
    }

    /// Installs a new config: swaps the routing table in one step, closes
    /// the tunnels of revoked connectors and marks the edge ready.
    pub(crate) fn apply_config(&self, mut config: EdgeConfig) {
        let version = config.version;
        self.auth
            .update(config.sign_in.as_ref(), &config.apps_domain);
        // Deltas, held by `auth` (not by the routing table).
        self.auth.add_signed_out(
            &std::mem::take(&mut config.signed_out),
            &std::mem::take(&mut config.signed_out_users),
        );
        let uploaded = self.public_certs.set_uploaded(&config.certificates);
        self.metrics.set_certificate_expiry(&uploaded);
        let table = Arc::new(RoutingTable::new(config));
        self.table.store(Arc::clone(&table));
        self.metrics
            .config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        let closed = self.tunnels.close_revoked(|c| table.is_revoked(c));
        tracing::info!(
            version,
            apps = table.config.apps.len(),
            revoked_tunnels_closed = closed,
            "config loaded"
        );
        // Not ready again once draining: `/ready` stays 503.
        if !self.shutdown.is_cancelled() {
            self.ready.send_replace(true);
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Everything `serve` needs, whether it came from the router or a test.
pub(crate) struct Parts {
    pub(crate) edge_id: EdgeId,
    pub(crate) region: RegionId,
    /// The certificate the tunnel listener presents (the edge identity).
    pub(crate) tunnel_cert: Arc<CertStore>,
    /// The CA that signs connector certificates.
    pub(crate) ca_pem: String,
    pub(crate) public_cert: Arc<CertStore>,
    pub(crate) initial_config: Option<EdgeConfig>,
    pub(crate) public_listen: SocketAddr,
    /// Serve HTTP/3 on UDP at the public port.
    pub(crate) http3: bool,
    pub(crate) tunnel_listen: SocketAddr,
    /// Where other edges open mesh links to this one (UDP); `None`: this
    /// edge forwards to others but takes no forwarded requests.
    pub(crate) mesh_listen: Option<SocketAddr>,
    /// Where to dial some peers' mesh links instead of their advertised
    /// address.
    pub(crate) mesh_dial_overrides: MeshDialOverrides,
    pub(crate) metrics_listen: Option<SocketAddr>,
    pub(crate) drain_delay: Duration,
    pub(crate) grace: Duration,
    pub(crate) connector_timeout_grace: Duration,
    pub(crate) access_log: bool,
    pub(crate) limits: UserLimits,
    pub(crate) tunnels: tunnel_acceptor::TunnelPolicy,
    /// Runtimes of the data plane: this one and `shards - 1` threads of
    /// their own (`shard.rs`).
    pub(crate) shards: std::num::NonZeroUsize,
}

/// The limits on users' connections and what they may hold.
#[derive(Debug, Clone)]
pub(crate) struct UserLimits {
    pub(crate) clients: clients::ClientLimits,
    pub(crate) timeouts: client_conn::ConnTimeouts,
    pub(crate) h2: listener::H2Limits,
    pub(crate) stall: stall::StallPolicy,
}

impl UserLimits {
    /// The receive window of each tunnel: twice what the edge's stalled
    /// responses may hold together, so that they can never take the
    /// window the tunnel's other streams need (see `stall.rs`), and never
    /// less than the connector side's.
    pub(crate) fn tunnel_receive_window(&self) -> u64 {
        let stalled = u64::from(self.stall.max_stalled)
            * u64::from(portico_agent::quic::TUNNEL_STREAM_WINDOW);
        (2 * stalled).max(u64::from(portico_agent::quic::TUNNEL_WINDOW))
    }
}

/// Binds the listeners and runs the data plane, without any router: the
/// control loops (or a test) feed configs through `Shared::apply_config`.
pub(crate) async fn serve(parts: Parts, shutdown: CancellationToken) -> Result<Handle, Error> {
    let metrics = Arc::new(Metrics::new(&parts.edge_id, &parts.region));
    let (ready_tx, ready_rx) = watch::channel(false);
    let tracker = TaskTracker::new();
    // Uploaded certificates by SNI first, then the edge's own.
    let public_certs = certs::SniCerts::new(Arc::clone(&parts.public_cert));
    let (public_listener, h3_endpoint) = http3::bind_public(
        parts.public_listen,
        parts.http3.then(|| Arc::clone(&public_certs)),
        parts.limits.h2.max_concurrent_streams,
        &tracker,
    )?;
    let public_addr = public_listener.local_addr().map_err(|source| Error::Bind {
        what: "public",
        addr: parts.public_listen,
        source,
    })?;
    let h3_addr = match &h3_endpoint {
        Some(ep) => Some(ep.local_addr().map_err(|source| Error::Bind {
            what: "http3",
            addr: parts.public_listen,
            source,
        })?),
        None => None,
    };
    let mesh_params = mesh::Params {
        cert: Arc::clone(&parts.tunnel_cert),
        ca_pem: parts.ca_pem.clone(),
        family: parts.tunnel_listen,
        receive_window: parts.limits.tunnel_receive_window(),
        dial_overrides: parts.mesh_dial_overrides.clone(),
    };
    let meshes: Box<[std::sync::OnceLock<mesh::Mesh>]> = (0..parts.shards.get())
        .map(|_| std::sync::OnceLock::new())
        .collect();
    let _ = meshes[0].set(mesh::Mesh::new(&mesh_params)?);
    let route = http::HeaderValue::try_from(parts.edge_id.as_str())
        .unwrap_or_else(|_| http::HeaderValue::from_static("edge"));
    let shared = Arc::new(Shared {
        edge_id: parts.edge_id.clone(),
        region: parts.region.clone(),
        table: ArcSwap::from_pointee(RoutingTable::empty(parts.region.clone())),
        tunnels: Tunnels::new(parts.shards.get()),
        metrics: Arc::clone(&metrics),
        alt_svc: h3_addr.map(|a| http3::alt_svc(a.port())),
        ready: ready_tx,
        connector_timeout_grace: parts.connector_timeout_grace,
        drain_delay: parts.drain_delay,
        grace: parts.grace,
        access_log: request::AccessLog(parts.access_log),
        clients: Arc::new(clients::Clients::new(parts.limits.clients.clone())),
        timeouts: parts.limits.timeouts.clone(),
        h2: parts.limits.h2.clone(),
        stalls: Arc::new(stall::StallBudget::new(parts.limits.stall.clone())),
        tunnel_policy: parts.tunnels,
        meshes,
        mesh_params,
        route,
        router_reachable: std::sync::atomic::AtomicBool::new(false),
        auth: auth::Auth::default(),
        public_certs: Arc::clone(&public_certs),
        shutdown: shutdown.clone(),
        closing: CancellationToken::new(),
        hard_stop: CancellationToken::new(),
        tracker,
        conns: TaskTracker::new(),
        tunnel_endpoints: std::sync::Mutex::new(Vec::new()),
        shard_threads: std::sync::Mutex::new(Vec::new()),
    });
    if let Some(cfg) = parts.initial_config {
        shared.apply_config(cfg);
    }
    shared.add_tunnel_endpoint(shared.mesh().endpoint());

    let mesh_server = match parts.mesh_listen {
        Some(_) => Some(mesh::server_config(
            Arc::clone(&parts.tunnel_cert),
            &parts.ca_pem,
            parts.limits.tunnel_receive_window(),
        )?),
        None => None,
    };
    let public_tls = listener::tls_config(Arc::clone(&public_certs))?;
    let tunnel_server = tunnel_acceptor::server_config(
        parts.tunnel_cert,
        &parts.ca_pem,
        parts.limits.tunnel_receive_window(),
    )?;
    let shards = parts.shards.get();
    let bind_err = |what, addr| move |source| Error::Bind { what, addr, source };
    // Shards share the tunnel port: a SO_REUSEPORT group that hands each
    // connection's datagrams to its shard by connection ID.
    let mut tunnel_sockets = portico_agent::quic::bind_udp_group(parts.tunnel_listen, shards)
        .map_err(bind_err("tunnel", parts.tunnel_listen))?
        .into_iter();
    let tunnel_socket = tunnel_sockets.next().expect("one socket per shard");
    let tunnel_addr = tunnel_socket
        .local_addr()
        .map_err(bind_err("tunnel", parts.tunnel_listen))?;
    let mut shard_sockets = Vec::with_capacity(shards - 1);
    let public_listener = if shards > 1 {
        let public = public_listener
            .into_std()
            .map_err(bind_err("public", public_addr))?;
        for tunnel in tunnel_sockets {
            shard_sockets.push(shard::Sockets {
                public: public
                    .try_clone()
                    .map_err(bind_err("public", public_addr))?,
                tunnel,
            });
        }
        tokio::net::TcpListener::from_std(public).map_err(bind_err("public", public_addr))?
    } else {
        public_listener
    };
    let endpoint = portico_agent::quic::endpoint_on(
        tunnel_socket,
        portico_agent::quic::shard_endpoint_config(0, shards),
        Some(tunnel_server.clone()),
        &shared.tracker,
    )
    .map_err(bind_err("tunnel", tunnel_addr))?;
    shared.add_tunnel_endpoint(endpoint.clone());
    let metrics_addr = match parts.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind {
                    what: "metrics",
                    addr,
                    source,
                })?;
            let bound = l.local_addr().map_err(|source| Error::Bind {
                what: "metrics",
                addr,
                source,
            })?;
            // Metrics stay up through the drain, until the hard stop.
            portico_agent::ops::serve(
                l,
                metrics.registry.clone(),
                metrics::readiness(ready_rx.clone()),
                shared.hard_stop.clone(),
                &shared.tracker,
            );
            Some(bound)
        }
        None => None,
    };

    let span = tracing::info_span!("edge", edge.id = %parts.edge_id);
    let serving = shard::Serving {
        public_tls: Arc::clone(&public_tls),
        tunnel_server,
        tunnel_addr,
        public_addr,
        shards,
        span: span.clone(),
    };
    for (i, sockets) in shard_sockets.into_iter().enumerate() {
        if let Err(e) = shard::start(i + 1, sockets, &serving, &shared).await {
            // Stop what started: the accept loops see the token, and the
            // shards that run end with their last task.
            shutdown.cancel();
            shared.tracker.close();
            return Err(e);
        }
    }
    shared.tracker.spawn(
        listener::accept_loop(public_listener, public_tls, Arc::clone(&shared))
            .instrument(span.clone()),
    );
    shared.tracker.spawn(
        tunnel_acceptor::accept_loop(endpoint.clone(), Arc::clone(&shared))
            .instrument(span.clone()),
    );
    if let Some(ep) = h3_endpoint.clone() {
        shared
            .tracker
            .spawn(http3::accept_loop(ep, Arc::clone(&shared)).instrument(span.clone()));
    }
    let mesh_addr = match parts.mesh_listen.zip(mesh_server) {
        Some((addr, mesh_server)) => {
            let socket = std::net::UdpSocket::bind(addr).map_err(bind_err("mesh", addr))?;
            let bound = socket.local_addr().map_err(bind_err("mesh", addr))?;
            let ep = portico_agent::quic::endpoint_on(
                socket,
                quinn::EndpointConfig::default(),
                Some(mesh_server),
                &shared.tracker,
            )
            .map_err(bind_err("mesh", bound))?;
            shared.add_tunnel_endpoint(ep.clone());
            shared
                .tracker
                .spawn(mesh::accept_loop(ep, Arc::clone(&shared)).instrument(span.clone()));
            Some(bound)
        }
        None => None,
    };
    shared
        .tracker
        .spawn(drain_on_shutdown(h3_endpoint, Arc::clone(&shared)).instrument(span.clone()));
    // Display, and no field for what is off (not `Some(..)`/`None`).
    tracing::info!(
        parent: &span,
        %public_addr,
        h3_addr = h3_addr.map(tracing::field::display),
        %tunnel_addr,
        mesh_addr = mesh_addr.map(tracing::field::display),
        metrics_addr = metrics_addr.map(tracing::field::display),
        region = %parts.region,
        shards,
        "edge listening"
    );

    Ok(Handle {
        id: parts.edge_id,
        region: parts.region,
        public_addr,
        h3_addr,
        tunnel_addr,
        mesh_addr,
        metrics_addr,
        shared,
        ready: ready_rx,
    })
}

/// Shutdown, in three steps:
///
/// 1. **Draining** (the `shutdown` token): `/ready` says 503; the report
///    loop tells the router at once, which drops this edge from the DNS
///    answers, the presence and the connectors' edge lists; new tunnels
///    and mesh links are refused; every connector gets `Drain` (it opens a
///    replacement elsewhere, and keeps this tunnel until the edge closes
///    it) and every mesh peer gets `Drain` (it forwards elsewhere). Users
///    are still accepted and served, for the drain delay: resolvers may
///    hold the old answer that long.
/// 2. **Closing**, after the drain delay: no new users; HTTP/1.1
///    connections close after their request, HTTP/2 and HTTP/3 get
///    GOAWAY; what is in flight (and forwarded requests from peers) may
///    finish within the grace.
/// 3. **Stop**, once that is done or the grace is over: every QUIC
///    endpoint closes with `CloseCode::Shutdown`, which ends the tunnels
///    (their connectors already serve from elsewhere) and the mesh links.
async fn drain_on_shutdown(h3_endpoint: Option<quinn::Endpoint>, shared: Arc<Shared>) {
    tokio::select! {
        () = shared.shutdown.cancelled() => {}
        () = shared.hard_stop.cancelled() => shared.shutdown.cancel(),
    }
    tracing::info!(
        drain_delay = ?shared.drain_delay,
        grace = ?shared.grace,
        "shutting down: draining (out of DNS and presence; connectors asked to move); still serving users for the drain delay"
    );
    // `/ready` answers 503 from now on, so load balancers move away.
    shared.ready.send_replace(false);
    shared.metrics.draining.set(1);
    // Users keep being served for the drain delay; a second signal (the
    // hard stop) cuts it short.
    tokio::select! {
        () = tokio::time::sleep(shared.drain_delay) => {}
        () = shared.hard_stop.cancelled() => {}
    }
    tracing::info!(
        in_flight = shared.conns.len(),
        "drain delay over: no new users; finishing what is in flight"
    );
    shared.closing.cancel();
    shared.conns.close();
    // Users' connections and forwarded requests finish; the tunnels they
    // use stay open until then.
    tokio::select! {
        r = tokio::time::timeout(shared.grace, shared.conns.wait()) => if r.is_err() {
            tracing::info!(
                in_flight = shared.conns.len(),
                "grace period over, closing what is left"
            );
        },
        () = shared.hard_stop.cancelled() => {}
    }
    shared.hard_stop.cancel();
    // Every shard's endpoint at once: while one of a SO_REUSEPORT group
    // closes, the kernel may hand the others' datagrams to another socket.
    let endpoints = std::mem::take(&mut *lock(&shared.tunnel_endpoints));
    for endpoint in &endpoints {
        endpoint.close(CloseCode::Shutdown.to_wire().into(), b"edge shutting down");
    }
    if let Some(h3) = &h3_endpoint {
        h3.close(http3::NO_ERROR, b"edge shutting down");
    }
    for endpoint in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
    drop(endpoints);
    if let Some(h3) = h3_endpoint {
        let _ = tokio::time::timeout(Duration::from_secs(2), h3.wait_idle()).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), shared.conns.wait()).await;
    tracing::info!("edge stopped");
}

/// The edge identity in a set of credentials.
pub(crate) fn edge_identity(identity: &Identity) -> Result<(EdgeId, RegionId), Error> {
    match identity {
        Identity::Edge { id, region } => Ok((id.clone(), region.clone())),
        other => Err(Error::NotAnEdge {
            identity: other.to_string(),
        }),
    }
}
