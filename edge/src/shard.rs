//! Shards: the edge's data plane on N single-thread runtimes, one per core,
//! with nothing stolen between them (pingora's `work_stealing: false`).
//!
//! On tokio's multi-thread runtime a request crossed threads at every
//! step: a user connection's task wrote its request into a tunnel stream on
//! one worker, and the tunnel's QUIC driver, woken into the other worker,
//! sent it at once, one datagram per request instead of one per batch of
//! ready requests; the response came back the same way. The edge spent
//! 1.4-1.7 times the CPU per HTTP/1.1 request of `--threads 1`, most of it
//! in futex wake-ups and extra `sendmsg` calls (BENCHMARKS.md).
//!
//! So each shard is a current-thread runtime that runs a whole request:
//!
//! - It accepts user connections from the one public TCP socket (every
//!   shard polls the same listening socket; whichever is free takes the
//!   connection).
//! - It has its own tunnel endpoint: a UDP socket in a `SO_REUSEPORT`
//!   group on the tunnel port, whose program hands each QUIC connection's
//!   datagrams to one shard by its connection ID
//!   (`portico_agent::quic::bind_udp_group`); that shard's runtime drives
//!   the connection. A connector's tunnel slot `i` asks for shard `i`
//!   (modulo the shards) by its Initial's connection ID, so its tunnels
//!   spread evenly.
//! - A request picks a tunnel of its own shard when the group has one
//!   there (`Tunnels::pick`), and any other tunnel when it has not: then it
//!   still works, at the multi-thread cost.
//! - It has its own mesh endpoint and links to other edges
//!   (`Shared::mesh`): a request forwarded to another edge goes out on a
//!   link this shard drives, as its tunnels are.
//!
//! Shard 0 is the runtime `start` runs on: it also serves HTTP/3, metrics
//! and the control loops. The rest of the edge (routing table, tunnel set,
//! client caps, metrics) is shared, behind the same atomics and locks it
//! had on the multi-thread runtime.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;
use tracing::Instrument;

use crate::error::Error;
use crate::{listener, tunnel_acceptor, Shared};

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The shard this thread runs (0 for any thread that is not a shard's).
pub(crate) fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// Runs `f` as if on shard `index` (tests of what a shard picks).
#[cfg(test)]
pub(crate) fn as_shard<T>(index: usize, f: impl FnOnce() -> T) -> T {
    let before = CURRENT.with(|c| c.replace(index));
    let out = f();
    CURRENT.with(|c| c.set(before));
    out
}

/// The sockets of one shard other than shard 0: its share of the public
/// listener and its tunnel socket, bound before the shard starts.
pub(crate) struct Sockets {
    pub(crate) public: std::net::TcpListener,
    pub(crate) tunnel: std::net::UdpSocket,
}

/// What every shard serves with.
pub(crate) struct Serving {
    pub(crate) public_tls: Arc<rustls::ServerConfig>,
    pub(crate) tunnel_server: quinn::ServerConfig,
    pub(crate) tunnel_addr: SocketAddr,
    pub(crate) public_addr: SocketAddr,
    pub(crate) shards: usize,
    pub(crate) span: tracing::Span,
}

/// Starts shard `index` on a thread of its own; resolves once its
/// listeners run (or failed to). The thread ends when every task of the
/// edge has (`Shared::tracker`), and `Handle::wait` joins it.
pub(crate) async fn start(
    index: usize,
    sockets: Sockets,
    serving: &Serving,
    shared: &Arc<Shared>,
) -> Result<(), Error> {
    let (started_tx, started_rx) = oneshot::channel();
    let edge = Arc::clone(shared);
    let tls = Arc::clone(&serving.public_tls);
    let server = serving.tunnel_server.clone();
    let (tunnel_addr, public_addr) = (serving.tunnel_addr, serving.public_addr);
    let shards = serving.shards;
    let span = serving.span.clone();
    let thread = std::thread::Builder::new()
        .name(format!("edge-shard-{index}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(source) => {
                    let _ = started_tx.send(Err(Error::Runtime { source }));
                    return;
                }
            };
            CURRENT.with(|c| c.set(index));
            let shared = edge;
            runtime.block_on(async move {
                // Both sockets join this runtime's reactor here, on its thread.
                let endpoint = match portico_agent::quic::endpoint_on(
                    sockets.tunnel,
                    portico_agent::quic::shard_endpoint_config(index, shards),
                    Some(server),
                    &shared.tracker,
                ) {
                    Ok(ep) => ep,
                    Err(source) => {
                        let _ = started_tx.send(Err(Error::Bind {
                            what: "tunnel",
                            addr: tunnel_addr,
                            source,
                        }));
                        return;
                    }
                };
                let public = match tokio::net::TcpListener::from_std(sockets.public) {
                    Ok(l) => l,
                    Err(source) => {
                        let _ = started_tx.send(Err(Error::Bind {
                            what: "public",
                            addr: public_addr,
                            source,
                        }));
                        return;
                    }
                };
                shared.add_tunnel_endpoint(endpoint.clone());
                // The shard's own mesh endpoint, driven by this runtime.
                if let Err(e) = shared.start_shard_mesh(index) {
                    let _ = started_tx.send(Err(e));
                    return;
                }
                let span = tracing::info_span!(parent: &span, "shard", shard = index);
                shared.tracker.spawn(
                    listener::accept_loop(public, tls, Arc::clone(&shared))
                        .instrument(span.clone()),
                );
                shared.tracker.spawn(
                    tunnel_acceptor::accept_loop(endpoint, Arc::clone(&shared)).instrument(span),
                );
                let _ = started_tx.send(Ok(()));
                // Runs this shard's tasks until the edge is done with all
                // of its own (the tracker is closed by `Handle::wait`).
                shared.tracker.wait().await;
            });
        })
        .map_err(|source| Error::Runtime { source })?;
    shared.add_shard_thread(thread);
    started_rx.await.unwrap_or_else(|_| {
        Err(Error::Runtime {
            source: std::io::Error::other(format!("edge shard {index} stopped while starting")),
        })
    })
}
