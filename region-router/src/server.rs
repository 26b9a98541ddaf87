//! Listeners: the HTTPS API (rustls, optional client certificates, HTTP/1.1
//! and HTTP/2) and the plain-HTTP metrics endpoint.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::api::{self, Peer, RemoteAddr, SharedState};
use crate::error::Error;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds a TCP listener with a deep accept queue.
pub(crate) fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    let err = |source| Error::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// Runs hyper's connection tasks (HTTP/2 streams) on the task tracker.
#[derive(Clone)]
struct TrackedExecutor(TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// Accepts API connections until `shutdown`.
pub(crate) async fn serve_api(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: axum::Router,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off a little.
                tracing::warn!(error = %portico_agent::error_chain(&e), "accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let span = tracing::debug_span!("router", remote = %remote);
        tracker.spawn(
            serve_connection(
                tcp,
                remote,
                acceptor.clone(),
                app.clone(),
                shutdown.clone(),
                tracker.clone(),
            )
            .instrument(span),
        );
    }
    tracing::debug!("API listener closed");
}

async fn serve_connection(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    app: axum::Router,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let _ = tcp.set_nodelay(true);
    let tls = tokio::select! {
        () = shutdown.cancelled() => return,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => match r {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(error = %portico_agent::error_chain(&e), "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                return;
            }
        },
    };
    // The verifier has already checked the chain against the CA; the URI
    // SANs say who the caller is.
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| portico_agent::pki::identity_of(cert).ok());
    if let Some(id) = &identity {
        tracing::debug!(peer = %id, "client certificate");
    }
    let peer = Peer(identity);
    let inner = TowerToHyperService::new(app);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        req.extensions_mut().insert(RemoteAddr(remote));
        inner.call(req)
    });
    let builder = auto::Builder::new(TrackedExecutor(tracker));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %portico_agent::error_chain(&*e), "connection ended with an error");
            }
        }
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!(error = %portico_agent::error_chain(&*e), "connection ended with an error while draining");
            }
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/ready` over plain HTTP until `shutdown`.
pub(crate) async fn serve_metrics(
    listener: TcpListener,
    state: SharedState,
    shutdown: CancellationToken,
) {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(api::healthz))
        .route("/ready", get(api::ready))
        .with_state(state);
    let stop = shutdown.clone();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::warn!(error = %portico_agent::error_chain(&e), "metrics listener failed");
    }
}

async fn metrics(State(state): State<SharedState>) -> impl axum::response::IntoResponse {
    let st = Arc::clone(&state);
    let text = state
        .tracker
        .spawn_blocking(move || {
            api::refresh_gauges(&st);
            st.metrics.encode()
        })
        .await
        .unwrap_or_else(|e| format!("# metrics failed: {e}\n"));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}
