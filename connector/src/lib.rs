//! The Portico connector: it runs inside a private network, enrolls with the
//! router, keeps a pool of outbound QUIC tunnels to the edges the router
//! lists, and proxies every stream an edge opens to the internal URL of the
//! app it names (HTTP, HTTPS with or without certificate validation, and
//! WebSocket upgrades), streaming bodies both ways with backpressure.
//!
//! It does not listen for users (the edge does), store configuration beyond
//! its last snapshot, or talk to other connectors. It never accepts inbound
//! connections except on the optional plain-HTTP metrics listener.
//!
//! [`start`] enrolls (or reuses saved credentials), loads the last config
//! snapshot so it keeps serving while the router is away, and returns a
//! [`Handle`] once its sockets are bound; [`Handle::wait`] resolves when the
//! connector has drained and stopped.

mod config;
mod diagnose;
mod error;
mod headers;
mod metrics;
mod origin;
mod path;
mod probe;
mod region;
mod resolve;
mod rewrite;
mod shard;
mod stream;
mod translate;
mod tunnel;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use portico_agent::enroll::{self, EnrollOptions};
use portico_agent::StateDir;
use portico_proto::api::{ConnectorConfig, Identity};
use portico_proto::{CloseCode, ConnectorId, GroupId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::{
    Config, FindEdges, RegionSettings, MAX_BACKEND_CONNECTIONS, MAX_BACKEND_CONNECTION_WAIT,
    MAX_MOVE_LINGER, MAX_REGION_WINDOW, MAX_TUNNELS, MIN_PROBE_INTERVAL,
};
pub use error::{Chain, Error, ProxyError, ResolveError};
pub use metrics::Metrics;
pub use origin::Exhausted;
pub use region::RegionPolicy;
pub use resolve::{lookup_chain, parse_nameserver, MAX_CNAME_HOPS, MAX_NAMESERVERS};

/// How long shutdown waits for in-flight streams.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Starts the connector: enrolls (first start) or loads its credentials,
/// loads the saved config, binds the tunnel socket and the metrics
/// listener, and starts the config watch and the tunnel pool. Returns once
/// everything is bound; tunnels come up in the background.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Handle, Error> {
    config.validate()?;
    let state = StateDir::open(&config.state_dir)?;
    let options = EnrollOptions {
        router_url: config.router_url.trim().to_owned(),
        token: config.token.clone(),
        host: config.host.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        kind: portico_proto::api::EnrollKind::Connector,
        region: None,
    };
    let creds = enroll::obtain(&state, &options).await?;
    let (id, group) = match &creds.identity {
        Identity::Connector { id, group } => (id.clone(), group.clone()),
        other => {
            return Err(Error::NotAConnector {
                identity: other.to_string(),
            })
        }
    };
    let span = tracing::info_span!("connector", connector.id = %id, group = %group);

    let metrics = Metrics::new()?;
    // `main` raised the soft limit to the hard one (agent::nofile::raise).
    let fd_limit = portico_agent::nofile::soft_limit();
    let limits = origin::BackendLimits::new(
        config.max_backend_connections_per_app,
        config.backend_connection_wait,
        fd_limit,
    );
    let origin = origin::Origin::new(
        &config.backend_ca,
        limits,
        metrics.clone(),
        config.shards.get(),
    )?;
    let saved: Option<ConnectorConfig> = match state.load_json(watch::CONFIG_FILE) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %portico_agent::error_chain(&e), "ignoring the saved config snapshot");
            None
        }
    };

    let stop = shutdown.child_token();
    let tracker = TaskTracker::new();
    let creds_rx = enroll::spawn_renewal(
        state.clone(),
        options.router_url.clone(),
        creds,
        stop.clone(),
        &tracker,
    );
    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let bind = |source| Error::Bind {
                what: "metrics listener",
                addr,
                source,
            };
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
            let bound = listener.local_addr().map_err(bind)?;
            portico_agent::ops::serve(
                listener,
                metrics.registry.clone(),
                metrics.readiness(),
                stop.clone(),
                &tracker,
            );
            Some(bound)
        }
        None => None,
    };
    // The UDP sockets are tracked apart from the tasks: they are released
    // only after `wait` has closed the endpoints and dropped their handles.
    // One per tunnel: an edge with shards gives each socket's tunnels to
    // one of its threads (by source port), so they spread over its cores.
    let socket = TaskTracker::new();
    let shards = shard::Shards::start(config.shards)?;
    let endpoints = (0..config.tunnels.max(1))
        .map(|slot| {
            // The socket of slot `i` is driven by the slot's own shard.
            let _on = shards.for_slot(slot).enter();
            tunnel::bind_endpoint(&socket)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let streams = Arc::new(stream::StreamCtx {
        group: group.clone(),
        apps: ArcSwap::from_pointee(Default::default()),
        origin,
        shard_streams: stream::shard_streams(&metrics, config.shards.get()),
        metrics: metrics.clone(),
    });
    let (config_tx, config_rx) = tokio::sync::watch::channel(None);
    let pool = Arc::new(
        tunnel::Pool::new(
            id.clone(),
            group.clone(),
            endpoints.clone(),
            Arc::new(tunnel::transport_config(config.max_streams_per_tunnel)),
            creds_rx,
            config_rx,
            streams,
            stop.clone(),
            tracker.clone(),
        )
        .with_region(config.region.clone())
        .with_find_edges(config.find_edges)
        .with_resolver(Arc::new(resolve::Resolver::new(
            &config.nameservers,
            Some(state.clone()),
            Some(metrics.clone()),
        ))),
    );
    if let Some(saved) = saved {
        tracing::info!(parent: &span, version = saved.version, apps = saved.apps.len(), edges = saved.edges.len(), "serving the saved config until the router answers");
        watch::apply(&pool, &config_tx, Arc::new(saved));
    }
    tracker.spawn(
        watch::run(pool.clone(), state, options.router_url.clone(), config_tx)
            .instrument(tracing::info_span!(parent: &span, "config_watch")),
    );
    tracker.spawn(
        diagnose::run(pool.clone(), options.router_url.clone())
            .instrument(tracing::info_span!(parent: &span, "probes")),
    );
    tracker.spawn(
        probe::report(pool.clone(), options.router_url.clone())
            .instrument(tracing::info_span!(parent: &span, "region_report")),
    );
    {
        let _in = span.enter();
        pool.spawn_slots(config.tunnels, &shards);
    }
    tracing::info!(
        parent: &span,
        tunnels = config.tunnels,
        udp = endpoints[0].local_addr().ok().map(tracing::field::display),
        udp_sockets = endpoints.len(),
        shards = shards.len(),
        metrics = metrics_addr.map(tracing::field::display),
        fd_limit,
        backend_connections_per_app = limits.per_app,
        backend_connections = limits.budget,
        backend_connection_wait = ?limits.wait,
        find_edges = ?config.find_edges,
        nameservers = %match pool.resolver.nameservers() {
            Ok(s) => s.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            Err(e) => format!("none ({e})"),
        },
        "connector started"
    );
    Ok(Handle {
        id,
        group,
        metrics_addr,
        metrics,
        pool,
        endpoints,
        tracker,
        socket,
        shards,
        span: span.clone(),
    })
}

/// A running connector.
pub struct Handle {
    /// This connector's id, from its certificate.
    pub id: ConnectorId,
    /// Its group, from its certificate.
    pub group: GroupId,
    /// Where `/metrics`, `/healthz` and `/ready` are served, when asked.
    pub metrics_addr: Option<SocketAddr>,
    metrics: Metrics,
    pool: Arc<tunnel::Pool>,
    endpoints: Vec<quinn::Endpoint>,
    tracker: TaskTracker,
    /// Done once the UDP sockets are closed.
    socket: TaskTracker,
    shards: shard::Shards,
    span: tracing::Span,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("id", &self.id)
            .field("group", &self.group)
            .field("metrics_addr", &self.metrics_addr)
            .field("tunnels", &self.tunnel_count())
            .finish()
    }
}

impl Handle {
    /// Tunnels up right now (welcomed by an edge and not draining).
    pub fn tunnel_count(&self) -> usize {
        *self.pool.up.borrow()
    }

    /// Resolves once at least `n` tunnels are up, or the connector stopped.
    pub async fn wait_tunnels(&self, n: usize) {
        let mut rx = self.pool.up.subscribe();
        tokio::select! {
            _ = rx.wait_for(|up| *up >= n) => {}
            _ = self.pool.stop.cancelled() => {}
        }
    }

    /// The region choice: home, RTTs, last move (`None` until the config
    /// has edges).
    pub fn region(&self) -> Option<portico_proto::api::RegionChoice> {
        self.pool.region_status.borrow().as_deref().cloned()
    }

    /// The edge of each slot's current tunnel (a tunnel that lingers after
    /// a move is left out), by slot.
    pub fn tunnel_edges(&self) -> Vec<portico_proto::api::EdgeEndpoint> {
        let mut live = self.pool.live_tunnels();
        live.sort_by_key(|t| t.id);
        live.into_iter().map(|t| t.edge).collect()
    }

    /// The connector's metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Resolves once the connector has stopped: after the shutdown token is
    /// cancelled (tunnels drain, in-flight streams get up to 10 s), or on a
    /// fatal error such as [`Error::Revoked`], which it returns.
    pub async fn wait(self) -> Result<(), Error> {
        let span = self.span.clone();
        async move {
            self.pool.stop.cancelled().await;
            self.tracker.close();
            if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait()).await.is_err() {
                tracing::warn!("in-flight streams did not finish within {SHUTDOWN_GRACE:?}; closing the tunnels");
            }
            for endpoint in &self.endpoints {
                endpoint.close(stream::code(CloseCode::Shutdown), b"connector shutting down");
            }
            for endpoint in &self.endpoints {
                let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
            }
            let fatal = self
                .pool
                .fatal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            // Drop every endpoint handle, then wait until the socket is
            // really closed, so that the port is free when `wait` returns.
            let Handle {
                pool,
                endpoints,
                socket,
                shards,
                ..
            } = self;
            drop((pool, endpoints));
            socket.close();
            if tokio::time::timeout(Duration::from_secs(2), socket.wait()).await.is_err() {
                tracing::debug!("the UDP socket outlived the shutdown");
            }
            shards.stop().await;
            match fatal {
                Some(e) => Err(e),
                None => {
                    tracing::info!("connector stopped");
                    Ok(())
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// `start` and `wait` run inside `tokio::spawn`.
#[allow(dead_code)]
fn assert_send() {
    fn is_send<T: Send>(_: &T) {}
    let start = start(
        Config::new("https://x", "/nonexistent"),
        CancellationToken::new(),
    );
    is_send(&start);
    fn wait_is_send(h: Handle) {
        is_send(&h.wait());
    }
}

#[cfg(test)]
mod tests;
