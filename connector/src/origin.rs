//! The origin side: one HTTP client per app, with its own keepalive pool
//! and a cap on its backend connections, that reaches the app's internal
//! URL (http or https); and the mapping of their failures to stable error
//! codes.
//!
//! **Connection limits.** hyper-util's pooled client has no cap on
//! connections, so the cap lives in its connector: every connection holds
//! a permit of its app's cap and one of the connector's budget, taken when
//! it is dialed and released when its IO is dropped. Its IO is dropped
//! when the connection closes (an idle one after [`POOL_IDLE`], a
//! WebSocket when the pipe ends), so idle pooled connections count too.
//! A request that finds no idle connection races the pool's checkout (a
//! connection another request returns) against a dial, and the dial waits
//! for permits, at most the configured wait and never longer than the
//! app's timeout: the request gets whichever comes first, or
//! [`Exhausted`] → `BackendBusy`. Each app has its own client, so a
//! connection made under one app's permit is never handed to another app
//! (two apps on one backend would otherwise share a pool), and a stuck app
//! holds only its own permits. The budget keeps the process's open-file
//! limit for everything else: tunnels, DNS, files and the metrics
//! listener.

use std::error::Error as StdError;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use portico_proto::api::App;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, ProxyError};
use crate::metrics::Metrics;

/// A boxed error, as request bodies report them.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;
/// The body of every backend request: streamed from the tunnel.
pub(crate) type ReqBody = UnsyncBoxBody<Bytes, BoxError>;
/// The TLS-or-plain connector every app's client wraps.
type Dialer = HttpsConnector<HttpConnector>;
/// An app's HTTP/1.1 client for http and https backends.
pub(crate) type HttpClient = Client<Limited<Dialer>, ReqBody>;

/// How long a TCP connect to a backend may take before it is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The read buffer of each backend connection. hyper's default grows it
/// (to 32 KiB and more under a trickling response), and it is held for the
/// life of the connection: at 10,000 concurrent streams that was most of
/// the connector's memory. Response chunks are passed on as they are read,
/// so a bigger buffer only saves read calls on bulk downloads.
const BACKEND_READ_BUFFER: usize = 16 << 10;
/// How long an idle keepalive connection to a backend is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// An open-file soft limit above this is treated as this (`RLIM_INFINITY`
/// and friends): the budget must stay a sane number.
const FD_LIMIT_CEILING: u64 = 1 << 24;
/// Open files kept out of the backend budget: at least this many.
const FD_RESERVE_MIN: usize = 256;

/// The backend connection limits of a connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BackendLimits {
    /// Connections of one app, idle ones included.
    pub per_app: usize,
    /// Connections of all apps together.
    pub budget: usize,
    /// How long a request waits for a connection at a cap.
    pub wait: Duration,
}

impl BackendLimits {
    /// The limits for a process whose open-file soft limit is `fd_limit`:
    /// the budget is that limit less a reserve (an eighth, at least 256, at
    /// most half) for tunnels, DNS, files and the metrics listener; an
    /// app may take a quarter of the budget unless `per_app` says otherwise.
    pub fn new(per_app: Option<usize>, wait: Duration, fd_limit: u64) -> BackendLimits {
        let limit = usize::try_from(fd_limit.min(FD_LIMIT_CEILING)).unwrap_or(usize::MAX);
        let reserve = (limit / 8).max(FD_RESERVE_MIN).min(limit / 2);
        let budget = limit.saturating_sub(reserve).max(1);
        BackendLimits {
            per_app: per_app.unwrap_or(budget / 4).max(1),
            budget,
            wait,
        }
    }
}

/// Builds each app's backend: the TLS settings (one validating against the
/// system roots plus the configured extra roots, one accepting any
/// certificate for apps with `validate_backend_tls = false`), the limits
/// and the budget they share.
pub struct Origin {
    validating: Dialer,
    insecure: Dialer,
    /// The TLS settings of `validating` and `insecure`, for the probes of
    /// `portico app test` (`crate::diagnose`), which must judge a backend's
    /// certificate exactly as its requests do.
    validating_tls: Arc<rustls::ClientConfig>,
    insecure_tls: Arc<rustls::ClientConfig>,
    /// The roots `validating` trusts (system and `--backend-ca`), which an
    /// app's own CA bundle is added to.
    roots: RootCertStore,
    provider: Arc<rustls::crypto::CryptoProvider>,
    limits: BackendLimits,
    budget: Arc<Semaphore>,
    metrics: Metrics,
    /// The connector's shards: each app gets a client (a pool of backend
    /// connections) per shard, under the app's one cap.
    shards: usize,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("limits", &self.limits)
            .field("budget_free", &self.budget.available_permits())
            .finish()
    }
}

impl Origin {
    /// Builds both TLS settings. `backend_ca` are PEM files of extra roots.
    pub(crate) fn new(
        backend_ca: &[PathBuf],
        limits: BackendLimits,
        metrics: Metrics,
        shards: usize,
    ) -> Result<Origin, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!(error = %portico_agent::error_chain(&e), "skipping an unreadable system root");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "system roots loaded for backend TLS");
        for path in backend_ca {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| Error::BackendCa {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::BackendCa {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(Error::BackendCa {
                    path: path.clone(),
                    reason: "no CERTIFICATE block found".into(),
                });
            }
            for cert in certs {
                roots.add(cert).map_err(|e| Error::BackendCa {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
        }

        let tls_err = |e: rustls::Error| Error::Tls {
            reason: e.to_string(),
        };
        let validating = validating_config(&provider, roots.clone()).map_err(tls_err)?;
        let insecure = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(portico_agent::pki::insecure_verifier())
            .with_no_client_auth();
        Ok(Origin {
            validating_tls: Arc::new(validating.clone()),
            insecure_tls: Arc::new(insecure.clone()),
            validating: dialer(validating),
            insecure: dialer(insecure),
            roots,
            provider,
            budget: Arc::new(Semaphore::new(limits.budget)),
            limits,
            metrics,
            shards: shards.max(1),
        })
    }

    /// The TLS settings `app`'s requests use: validating the backend's
    /// certificate (system roots and `--backend-ca`) or not, as the app says.
    pub(crate) fn tls_for(&self, app: &App) -> Arc<rustls::ClientConfig> {
        if app.validate_backend_tls {
            self.validating_tls.clone()
        } else {
            self.insecure_tls.clone()
        }
    }

    /// A backend for `app`: a client of its own, whose connections count
    /// against the app's cap and the connector's budget. With
    /// `validate_backend_tls`, its backend's certificate is checked against
    /// the connector's roots plus `ca_pem`, the app's own CA bundle (from
    /// `ConnectorConfig::backend_cas`); a bundle that does not load (the
    /// router checked it) is logged and left out, so validation fails
    /// closed (`BackendCertInvalid`), never open.
    pub(crate) fn backend(&self, app: &App, ca_pem: Option<&str>) -> Backend {
        let id = app.id.as_str();
        let limit = Arc::new(Limit {
            app: Arc::new(Semaphore::new(self.limits.per_app)),
            budget: self.budget.clone(),
            cap: self.limits.per_app,
            budget_size: self.limits.budget,
            // A wait never outlasts the request it is for.
            wait: self.limits.wait.min(app.backend_timeout.duration()),
            open: self.metrics.backend_connections.with_label_values(&[id]),
            waited: self
                .metrics
                .backend_waits
                .with_label_values(&[id, "connected"]),
            busy: self.metrics.backend_waits.with_label_values(&[id, "busy"]),
        });
        let own;
        let dialer = match (app.validate_backend_tls, ca_pem) {
            (false, _) => &self.insecure,
            (true, None) => &self.validating,
            (true, Some(pem)) => match self.with_app_roots(pem) {
                Ok(tls) => {
                    own = dialer(tls);
                    &own
                }
                Err(reason) => {
                    tracing::warn!(app = %app.id, %reason, "the app's backend CA bundle does not load; validating against the connector's roots only");
                    &self.validating
                }
            },
        };
        let clients = (0..self.shards)
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(POOL_IDLE)
                    .pool_max_idle_per_host(self.limits.per_app.min(256))
                    .http1_read_buf_exact_size(BACKEND_READ_BUFFER)
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .build(Limited {
                        inner: dialer.clone(),
                        limit: limit.clone(),
                    })
            })
            .collect();
        Backend { clients, limit }
    }
}

impl Origin {
    /// A validating TLS config trusting the connector's roots and the
    /// certificates of `pem`.
    fn with_app_roots(&self, pem: &str) -> Result<rustls::ClientConfig, String> {
        let mut roots = self.roots.clone();
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| e.to_string())?;
            roots.add(cert).map_err(|e| e.to_string())?;
            added += 1;
        }
        if added == 0 {
            return Err("no CERTIFICATE block".into());
        }
        validating_config(&self.provider, roots).map_err(|e| e.to_string())
    }
}

fn validating_config(
    provider: &Arc<rustls::crypto::CryptoProvider>,
    roots: RootCertStore,
) -> Result<rustls::ClientConfig, rustls::Error> {
    Ok(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn dialer(tls: rustls::ClientConfig) -> Dialer {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    // HTTP/1.1 to backends, as most reverse proxies do: upgrades
    // (WebSocket) need it, and every backend speaks it.
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// One app's way to its backend.
pub(crate) struct Backend {
    /// One client per shard: a connection's task runs on the shard that
    /// opened it, and only that shard's requests reuse it.
    clients: Vec<HttpClient>,
    limit: Arc<Limit>,
}

impl Backend {
    /// The client of the caller's shard.
    pub(crate) fn client(&self) -> &HttpClient {
        &self.clients[crate::shard::current() % self.clients.len()]
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("cap", &self.limit.cap)
            .field(
                "open",
                &(self.limit.cap - self.limit.app.available_permits()),
            )
            .finish()
    }
}

/// An app's cap, the shared budget, and the app's metrics.
struct Limit {
    app: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    cap: usize,
    budget_size: usize,
    wait: Duration,
    open: prometheus::IntGauge,
    waited: prometheus::IntCounter,
    busy: prometheus::IntCounter,
}

impl Limit {
    /// A permit of the app's cap, then one of the budget, waiting at most
    /// `wait` for both together.
    async fn acquire(&self) -> Result<Permits, Exhausted> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.wait;
        let mut waited = false;
        let Some(app) = take(&self.app, deadline, &mut waited).await else {
            self.busy.inc();
            return Err(Exhausted::App {
                cap: self.cap,
                waited_ms: millis(started.elapsed()),
            });
        };
        let Some(budget) = take(&self.budget, deadline, &mut waited).await else {
            self.busy.inc();
            return Err(Exhausted::Budget {
                budget: self.budget_size,
                waited_ms: millis(started.elapsed()),
            });
        };
        if waited {
            self.waited.inc();
        }
        self.open.inc();
        Ok(Permits {
            _app: app,
            _budget: budget,
            open: self.open.clone(),
        })
    }
}

/// A permit of `semaphore` now, or by `deadline` (then `waited` is set);
/// `None` if none came free. The semaphores are never closed.
async fn take(
    semaphore: &Arc<Semaphore>,
    deadline: tokio::time::Instant,
    waited: &mut bool,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = semaphore.clone().try_acquire_owned() {
        return Some(p);
    }
    *waited = true;
    tokio::time::timeout_at(deadline, semaphore.clone().acquire_owned())
        .await
        .ok()?
        .ok()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Why a backend connection could not be had in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Exhausted {
    /// The app's connections stayed at its cap.
    #[error(
        "all {cap} connections allowed to this app's backend stayed in use for {waited_ms} ms"
    )]
    App { cap: usize, waited_ms: u64 },
    /// All apps' connections together stayed at the connector's budget.
    #[error(
        "all {budget} backend connections this connector allows (its open-file limit less a reserve) stayed in use for {waited_ms} ms"
    )]
    Budget { budget: usize, waited_ms: u64 },
}

/// What a connection holds while it is open.
struct Permits {
    _app: OwnedSemaphorePermit,
    _budget: OwnedSemaphorePermit,
    open: prometheus::IntGauge,
}

impl Drop for Permits {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A connector whose connections each hold [`Permits`].
#[derive(Clone)]
pub(crate) struct Limited<C> {
    inner: C,
    limit: Arc<Limit>,
}

impl<C> tower_service::Service<Uri> for Limited<C>
where
    C: tower_service::Service<Uri> + Clone + Send + 'static,
    C::Future: Send,
    C::Error: Into<BoxError>,
{
    type Response = Counted<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // The service polled ready is the one called; a clone stays.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limit = self.limit.clone();
        Box::pin(async move {
            let permits = limit.acquire().await?;
            let io = inner.call(uri).await.map_err(Into::into)?;
            Ok(Counted {
                io,
                _permits: permits,
            })
        })
    }
}

/// A backend connection's IO, holding its permits until it is dropped.
pub(crate) struct Counted<T> {
    io: T,
    _permits: Permits,
}

impl<T: Read + Unpin> Read for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl<T: Connection> Connection for Counted<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

/// Maps a failed backend request to its stable error: no connection in
/// time is `BackendBusy`, certificate errors anywhere in the cause chain
/// are `BackendCertInvalid`, everything else that kept a response head
/// from arriving is `BackendUnreachable`.
pub(crate) fn classify(err: &hyper_util::client::legacy::Error, target: &str) -> ProxyError {
    if let Some(exhausted) = find::<Exhausted>(err) {
        return ProxyError::Busy {
            target: target.to_owned(),
            source: *exhausted,
        };
    }
    if let Some(reason) = cert_error(err) {
        return ProxyError::CertInvalid {
            target: target.to_owned(),
            reason,
        };
    }
    ProxyError::Unreachable {
        target: target.to_owned(),
        reason: portico_agent::error_chain(err).to_string(),
    }
}

/// The first error of type `E` in `err`'s `source()` chain.
fn find<'a, E: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut next: Option<&'a (dyn StdError + 'static)> = Some(err);
    for _ in 0..32 {
        let e = next?;
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// Walks the `source()` chain, looking inside `io::Error`s too (their
/// `source()` skips the wrapped error), for a rustls certificate error.
fn cert_error(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut next: Option<&(dyn StdError + 'static)> = Some(err);
    let mut depth = 0;
    while let Some(e) = next {
        depth += 1;
        if depth > 32 {
            break;
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            if is_cert_error(tls) {
                return Some(tls.to_string());
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(found) = cert_error(inner) {
                    return Some(found);
                }
            }
        }
        next = e.source();
    }
    None
}

fn is_cert_error(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::InvalidCertRevocationList(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_sized_to_the_open_file_limit() {
        let at = |fds| BackendLimits::new(None, Duration::from_secs(5), fds);
        assert_eq!(at(1024).budget, 768);
        assert_eq!(at(1024).per_app, 192);
        assert_eq!(at(20_000).budget, 17_500);
        assert_eq!(at(20_000).per_app, 4_375);
        assert_eq!(at(1 << 20).budget, (1 << 20) - (1 << 17));
        // A tiny limit keeps half for the rest; nothing is ever zero.
        assert_eq!(at(256).budget, 128);
        assert_eq!(at(0).budget, 1);
        assert_eq!(at(0).per_app, 1);
        // RLIM_INFINITY does not overflow anything.
        assert_eq!(at(u64::MAX).budget, at(FD_LIMIT_CEILING).budget);
        let set = BackendLimits::new(Some(8), Duration::from_secs(1), 1024);
        assert_eq!((set.per_app, set.budget), (8, 768));
    }

    fn limit(cap: usize, budget: &Arc<Semaphore>, wait: Duration) -> Limit {
        let metrics = Metrics::new().unwrap();
        Limit {
            app: Arc::new(Semaphore::new(cap)),
            budget: budget.clone(),
            cap,
            budget_size: budget.available_permits(),
            wait,
            open: metrics.backend_connections.with_label_values(&["a"]),
            waited: metrics.backend_waits.with_label_values(&["a", "connected"]),
            busy: metrics.backend_waits.with_label_values(&["a", "busy"]),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn permits_cap_each_app_and_the_budget_with_a_bounded_wait() {
        let wait = Duration::from_secs(3);
        let budget = Arc::new(Semaphore::new(3));
        let a = limit(2, &budget, wait);
        let b = limit(2, &budget, wait);

        let a1 = a.acquire().await.unwrap();
        let a2 = a.acquire().await.unwrap();
        assert_eq!(a.open.get(), 2);
        // App a is at its cap: a third waits the whole wait, then gives up.
        let started = tokio::time::Instant::now();
        assert_eq!(
            a.acquire().await.err(),
            Some(Exhausted::App {
                cap: 2,
                waited_ms: 3000
            })
        );
        assert_eq!(started.elapsed(), wait);
        assert_eq!(a.busy.get(), 1);
        // App b still connects: a's cap is a's alone.
        let b1 = b.acquire().await.unwrap();
        // Now the budget (3) is used up: b, below its own cap, waits on it.
        let b_waits = tokio::spawn(async move { b.acquire().await.map(|p| (p, b)) });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!b_waits.is_finished());
        // A connection of a closes: its permits come back, b gets them.
        drop(a1);
        let (b2, b) = b_waits.await.unwrap().unwrap();
        assert_eq!(a.open.get(), 1);
        assert_eq!(b.waited.get(), 1);
        // And a waiter for the budget also gives up after the wait.
        assert!(matches!(
            a.acquire().await.err(),
            Some(Exhausted::Budget { budget: 3, .. })
        ));
        drop((a2, b1, b2));
        assert_eq!(budget.available_permits(), 3);
        assert_eq!((a.open.get(), b.open.get()), (0, 0));
    }
}
