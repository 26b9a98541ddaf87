//! The public HTTPS listener: TCP with a deep accept queue, TLS with the
//! swappable public certificate, and HTTP/1.1 or HTTP/2 by ALPN on each
//! connection, handing every request to the shared request path
//! (`request::handle`; HTTP/3 arrives there from `http3.rs`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::header::ALT_SVC;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portico_agent::pki;
use tokio::net::{TcpListener, TcpSocket};

use crate::certs::CertStore;
use crate::error::Error;
use crate::request::{self, Client};
use crate::Shared;

/// How long a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the public TCP listener with a deep accept queue.
pub(crate) fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    let bind_err = |source| Error::Bind {
        what: "public",
        addr,
        source,
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(bind_err)?;
    socket.set_reuseaddr(true).map_err(bind_err)?;
    socket.set_nodelay(true).map_err(bind_err)?;
    socket.bind(addr).map_err(bind_err)?;
    socket.listen(1024).map_err(bind_err)
}

/// The TLS config of the public listener: the swappable public certificate,
/// ALPN `h2` and `http/1.1`.
pub(crate) fn tls_config(cert: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, Error> {
    let mut tls = rustls::ServerConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| Error::Tls {
            what: "public",
            source,
        })?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// Accepts users until shutdown; each connection drains gracefully.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, client) = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "public accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared2 = Arc::clone(&shared);
        shared.conns.spawn(async move {
            let metrics = &shared2.metrics;
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    metrics.tls_failed.inc();
                    tracing::debug!(%client, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics.tls_failed.inc();
                    tracing::debug!(%client, "TLS handshake timed out");
                    return;
                }
            };
            if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                metrics.tls_resumed.inc();
            } else {
                metrics.tls_full.inc();
            }
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            serve_connection(TokioIo::new(tls), h2, client, shared2).await;
        });
    }
}

/// Serves one TLS connection with the protocol its ALPN chose: HTTP/2 for
/// `h2`, HTTP/1.1 (with upgrades) otherwise. HTTP/2 over TLS needs ALPN
/// (RFC 9113 §3.2), so a client that offered none speaks HTTP/1.1, and no
/// read-ahead is needed to guess.
async fn serve_connection<I>(io: I, h2: bool, client: SocketAddr, shared: Arc<Shared>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let shared2 = Arc::clone(&shared);
    let svc = service_fn(move |req: Request<Incoming>| {
        let shared = Arc::clone(&shared2);
        async move {
            let mut resp = request::handle(req, Arc::clone(&shared), Client { addr: client }).await;
            if let Some(alt_svc) = &shared.alt_svc {
                resp.headers_mut().insert(ALT_SVC, alt_svc.clone());
            }
            Ok::<_, Infallible>(resp)
        }
    });
    if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc);
        drive(conn, |c| c.graceful_shutdown(), client, &shared).await;
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .with_upgrades();
        drive(conn, |c| c.graceful_shutdown(), client, &shared).await;
    }
}

/// Runs a connection to its end. On shutdown it is asked to finish
/// gracefully (requests in flight complete), and on the hard stop dropped.
async fn drive<C, E>(
    conn: C,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    client: SocketAddr,
    shared: &Shared,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%client, error = %e, "connection ended with an error");
            }
            return;
        }
        () = shared.shutdown.cancelled() => graceful_shutdown(conn.as_mut()),
    }
    tokio::select! {
        _ = conn.as_mut() => {}
        () = shared.hard_stop.cancelled() => {}
    }
}
