//! The public HTTPS listener: TCP with a deep accept queue, TLS with the
//! swappable public certificate, and HTTP/1.1 or HTTP/2 by ALPN on each
//! connection, handing every request to the shared request path
//! (`request::handle`; HTTP/3 arrives there from `http3.rs`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};

use http::header::ALT_SVC;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use portico_agent::pki;
use tokio::net::{TcpListener, TcpSocket};

use crate::certs::SniCerts;
use crate::client_conn::{deadline_at, ClientConn, Expired, Proto, WatchedIo};
use crate::error::Error;
use crate::request;
use crate::stall::now_us;
use crate::Shared;

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
pub(crate) fn tls_config(cert: Arc<SniCerts>) -> Result<Arc<rustls::ServerConfig>, Error> {
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

/// The HTTP/2 settings of user connections, from the edge's config.
#[derive(Debug, Clone)]
pub(crate) struct H2Limits {
    /// Streams a client may have open at once on one connection.
    pub(crate) max_concurrent_streams: u32,
    /// How often a PING checks that the client is still there...
    pub(crate) keepalive_interval: Duration,
    /// ...and how long it has to answer before the connection is closed.
    pub(crate) keepalive_timeout: Duration,
    /// Streams a client may reset before the edge accepted them (hyper's
    /// own rapid-reset guard; resets of accepted streams are charged to
    /// the client's reset budget in `clients.rs`).
    pub(crate) max_pending_accept_resets: usize,
}

/// Accepts users until the drain delay is over (`Shared::closing`), within
/// the connection caps; each connection then drains gracefully.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut backoff = AcceptBackoff::default();
    let mut sweep = tokio::time::interval(crate::clients::SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (tcp, client) = tokio::select! {
            () = shared.closing.cancelled() => break,
            _ = sweep.tick() => {
                shared.clients.sweep(std::time::Instant::now());
                continue;
            }
            r = listener.accept() => match r {
                Ok(x) => {
                    backoff.accepted();
                    x
                }
                Err(e) => {
                    let delay = backoff.failed(&e);
                    tokio::select! {
                        () = shared.closing.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            },
        };
        let Some(permit) = shared.admit_client(client, "tcp") else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared2 = Arc::clone(&shared);
        shared.conns.spawn(async move {
            let metrics = &shared2.metrics;
            let handshake = shared2.timeouts.header_read;
            let tls = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    metrics.tls_failed.inc();
                    tracing::debug!(%client, error = %portico_agent::error_chain(&e), "TLS handshake failed");
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
            let proto = if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                Proto::H2
            } else {
                Proto::H1
            };
            let conn = Arc::new(ClientConn::new(client, proto, permit));
            serve_connection(TokioIo::new(tls), conn, shared2).await;
        });
    }
}

/// How the accept loop backs off when `accept` fails (EMFILE, ENFILE,
/// ENOBUFS: the process or the system is out of something): from 5 ms,
/// doubling to 1 s, with one warning when failures start, one line every
/// 10 s while they go on, and one when accepting works again.
#[derive(Debug, Default)]
struct AcceptBackoff {
    failures: u64,
    delay: Duration,
    last_log: Option<std::time::Instant>,
}

impl AcceptBackoff {
    const MIN: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(10);

    /// One failure: how long to wait before the next accept.
    fn failed(&mut self, e: &std::io::Error) -> Duration {
        self.failed_at(e, std::time::Instant::now())
    }

    fn failed_at(&mut self, e: &std::io::Error, now: std::time::Instant) -> Duration {
        self.failures += 1;
        self.delay = if self.failures == 1 {
            Self::MIN
        } else {
            (self.delay * 2).min(Self::MAX)
        };
        let due = self
            .last_log
            .is_none_or(|t| now.saturating_duration_since(t) >= Self::LOG_EVERY);
        if due {
            self.last_log = Some(now);
            tracing::warn!(error = %portico_agent::error_chain(e), failures = self.failures, retry_in = ?self.delay, "public accept failing; backing off");
        }
        self.delay
    }

    fn accepted(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "public accept works again");
            *self = AcceptBackoff::default();
        }
    }
}

/// Serves one TLS connection with the protocol its ALPN chose: HTTP/2 for
/// `h2`, HTTP/1.1 (with upgrades) otherwise. HTTP/2 over TLS needs ALPN
/// (RFC 9113 §3.2), so a client that offered none speaks HTTP/1.1, and no
/// read-ahead is needed to guess.
async fn serve_connection<I>(io: I, conn: Arc<ClientConn>, shared: Arc<Shared>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let io = WatchedIo::new(io, Arc::clone(&conn));
    let shared2 = Arc::clone(&shared);
    let conn2 = Arc::clone(&conn);
    let svc = service_fn(move |req: Request<Incoming>| {
        let shared = Arc::clone(&shared2);
        let conn = Arc::clone(&conn2);
        async move {
            let mut resp = request::handle(req, Arc::clone(&shared), conn, None).await;
            if let Some(alt_svc) = &shared.alt_svc {
                resp.headers_mut().insert(ALT_SVC, alt_svc.clone());
            }
            Ok::<_, Infallible>(resp)
        }
    });
    if conn.proto == Proto::H2 {
        let h2 = &shared.h2;
        let streams = ConnStreams::default();
        let served = hyper::server::conn::http2::Builder::new(streams.executor())
            .timer(TokioTimer::new())
            .max_concurrent_streams(h2.max_concurrent_streams)
            .keep_alive_interval(h2.keepalive_interval)
            .keep_alive_timeout(h2.keepalive_timeout)
            .max_pending_accept_reset_streams(h2.max_pending_accept_resets)
            .max_header_list_size(MAX_HEADER_LIST)
            .serve_connection(io, svc);
        drive(served, |c| c.graceful_shutdown(), streams, &conn, &shared).await;
    } else {
        let served = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .with_upgrades();
        drive(
            served,
            |c| c.graceful_shutdown(),
            ConnStreams::default(),
            &conn,
            &shared,
        )
        .await;
    }
}

/// A stream future of an HTTP/2 connection (hyper's `H2Stream`: the
/// request path and the response body of one stream).
type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The HTTP/2 streams of one connection, run by the connection's own task
/// ([`drive`]) instead of a task each. hyper hands each new stream to its
/// executor while the connection is polled; here that executor queues it
/// and `drive` polls the queue right after the connection, in the same
/// pass. On the multi-thread runtime, a task per stream let the workers
/// steal a connection's streams from each other, so every stream woke the
/// connection across threads and both contended for h2's shared state:
/// Portico's CPU per HTTP/2 request was 1.4 times that of `--threads 1`.
/// One connection's streams already share its one socket and its h2 lock;
/// different connections still spread over the workers. HTTP/1.1 has no
/// streams to run and leaves it empty.
#[derive(Default)]
struct ConnStreams {
    queued: Arc<Mutex<Vec<StreamFuture>>>,
    running: FuturesUnordered<StreamFuture>,
}

impl ConnStreams {
    fn executor(&self) -> StreamExec {
        StreamExec(Arc::clone(&self.queued))
    }

    /// Starts what was queued and polls what runs. Never ready: the
    /// streams end on their own, and `drive` decides when the connection
    /// is done.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let queued =
                std::mem::take(&mut *self.queued.lock().unwrap_or_else(|e| e.into_inner()));
            self.running.extend(queued);
            match self.running.poll_next_unpin(cx) {
                // One ended: look again (it may have been the last poll
                // that queued nothing).
                Poll::Ready(Some(())) => continue,
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.running.is_empty()
            && self
                .queued
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
    }
}

/// hyper's executor for one connection's streams: queues them for its
/// [`ConnStreams`].
#[derive(Clone)]
struct StreamExec(Arc<Mutex<Vec<StreamFuture>>>);

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::pin(fut));
    }
}

/// The largest HTTP/2 header list accepted: what a stream head can carry.
const MAX_HEADER_LIST: u32 = portico_proto::limits::MAX_HEAD_LEN as u32;

/// Runs a connection to its end, watching its deadlines and its streams
/// ([`ClientConn::tick`]). On shutdown, or when idle too long, it is asked
/// to finish gracefully (requests in flight complete); it is dropped on
/// the hard stop, when a header read times out, or when it is killed.
async fn drive<C, E>(
    served: C,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    mut streams: ConnStreams,
    conn: &ClientConn,
    shared: &Shared,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let client = conn.addr;
    shared.metrics.connections.inc();
    let _gauge = scopeguard(&shared.metrics.connections);
    tokio::pin!(served);
    // Made once and polled in place: the loop goes round about once per
    // `detect` while requests flow, not once per request.
    let shutdown = shared.closing.cancelled();
    let kill = conn.kill.cancelled();
    let look = tokio::time::sleep_until(tokio::time::Instant::now());
    tokio::pin!(shutdown, kill, look);
    // A connection closed for idling gets the drain grace to finish, not
    // until the hard stop: an HTTP/2 stream that was reset for stalling
    // lingers in hyper until its client grants credit, which it may never.
    let mut finish_within = None;
    let h2 = conn.proto == Proto::H2;
    loop {
        tokio::select! {
            // The connection first, then the streams it started in the
            // same pass (their queue wakes nobody).
            biased;
            r = served.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%client, error = %e, "connection ended with an error");
                }
                // Streams still finishing their response end on their own
                // now that the connection is gone.
                finish_streams(&mut streams, conn, shared).await;
                return;
            }
            () = std::future::poll_fn(|cx| streams.poll_run(cx)), if h2 => {}
            () = shutdown.as_mut() => break,
            () = kill.as_mut() => return,
            () = std::future::poll_fn(|cx| conn.poll_woken(cx)) => {
                look.as_mut().reset(tokio::time::Instant::now());
            }
            () = look.as_mut() => {
                match conn.tick(now_us(), &shared.timeouts, &shared.stalls, &shared.metrics) {
                    Ok(at) => look.as_mut().reset(deadline_at(at)),
                    Err(expired) => {
                        tracing::debug!(%client, reason = expired.label(), "closing the connection");
                        shared.metrics.conn_closes.with_label_values(&[expired.label()]).inc();
                        if expired == Expired::HeaderTimeout {
                            return;
                        }
                        finish_within = Some(shared.grace);
                        break;
                    }
                }
            }
        }
    }
    graceful_shutdown(served.as_mut());
    let bounded = async {
        match finish_within {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let finished = async {
        tokio::select! {
            biased;
            _ = served.as_mut() => {}
            () = std::future::poll_fn(|cx| streams.poll_run(cx)) => {}
        }
        finish_streams(&mut streams, conn, shared).await;
    };
    tokio::select! {
        () = finished => {}
        () = conn.kill.cancelled() => {}
        () = shared.hard_stop.cancelled() => {}
        () = bounded => {}
    }
}

/// Polls a connection's remaining streams until they end, the connection
/// is killed or the edge stops hard.
async fn finish_streams(streams: &mut ConnStreams, conn: &ClientConn, shared: &Shared) {
    if streams.is_idle() {
        return;
    }
    let ended = std::future::poll_fn(|cx| {
        let _ = streams.poll_run(cx);
        if streams.is_idle() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    });
    tokio::select! {
        () = ended => {}
        () = conn.kill.cancelled() => {}
        () = shared.hard_stop.cancelled() => {}
    }
}

/// Decrements a gauge when dropped.
fn scopeguard(g: &prometheus::IntGauge) -> impl Drop + '_ {
    struct Dec<'a>(&'a prometheus::IntGauge);
    impl Drop for Dec<'_> {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    Dec(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_back_off_and_log_rarely() {
        let mut b = AcceptBackoff::default();
        let e = std::io::Error::from_raw_os_error(24); // EMFILE
        let t0 = std::time::Instant::now();
        let delays: Vec<Duration> = (0..12)
            .map(|i| b.failed_at(&e, t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(delays[0], AcceptBackoff::MIN);
        assert_eq!(delays[1], AcceptBackoff::MIN * 2);
        assert_eq!(*delays.last().unwrap(), AcceptBackoff::MAX);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        // One log line for the whole burst: the next is due 10 s later.
        assert_eq!(b.last_log, Some(t0));
        b.failed_at(&e, t0 + Duration::from_secs(11));
        assert_eq!(b.last_log, Some(t0 + Duration::from_secs(11)));
        b.accepted();
        assert_eq!(b.failures, 0);
        assert_eq!(
            b.failed_at(&e, t0),
            AcceptBackoff::MIN,
            "a new episode starts small"
        );
    }
}
