//! The HTTP clients of the generator: HTTP/1.1 and HTTP/2 over hyper's
//! connection API with our own dialer (so `connect_to` and `*.localhost`
//! work whatever the system resolver says) and rustls; HTTP/3 through
//! [`crate::h3`]. Keeps up to `connections` connections per origin, or
//! dials one per request.
//!
//! Failover and retries, as a browser does them:
//! - With several `connect_to` addresses, the connections of a pool are
//!   spread round robin over them. When opening a connection fails at one
//!   (TCP connect, TLS, the HTTP/1.1 or HTTP/2 handshake, the QUIC
//!   handshake), the next one is tried, each at most once per request; the
//!   failed one is then tried last for [`DEAD_FOR`]. An attempt that has
//!   not opened within [`ATTEMPT_TIMEOUT`] counts as failed when another
//!   address is left. No request byte has
//!   been sent at that point, so this is safe for any method. Only when
//!   every address fails is the request a transport error. Each switch is
//!   counted (`failovers` in the report).
//! - A request sent on a reused HTTP/1.1 connection that the server had
//!   closed (hyper: canceled, incomplete message, or reset before any
//!   response byte) is sent once more on a new connection, as browsers and
//!   hyper-util's legacy client do; so is an HTTP/2 request refused by a
//!   GOAWAY (REFUSED_STREAM, or above the GOAWAY's last stream id: never
//!   processed). Each is counted (`retried` in the report).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use http::{Method, Request, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::LoadtestError;
use crate::scenario::{Protocol, Scenario};
use crate::stats::{Response, TransportErrorKind};

/// The response header that carries Portico's error code.
pub const PORTICO_ERROR_HEADER: &str = "x-portico-error";
/// Longest error code kept (the rest of a hostile header is cut).
const MAX_CODE_LEN: usize = 64;
/// The DATA frame size of HTTP/3 request bodies.
const H3_CHUNK: usize = 256 * 1024;
/// How long a `connect_to` address where a connection could not be opened
/// is tried last.
pub const DEAD_FOR: Duration = Duration::from_secs(1);
/// How long opening a connection at one address may take while another
/// address is left to try: an address that drops packets (a blackhole, a
/// QUIC port nobody listens on: no ICMP reaches quinn) would otherwise
/// hold the request until its own timeout. The last address left has
/// only the request's timeout.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// Builds the rustls client config: roots from `cacert` (PEM), or accept
/// anything with `insecure`, or the system roots.
pub fn tls_config(
    cacert: Option<&Path>,
    insecure: bool,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, LoadtestError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| LoadtestError::Tls { source })?;
    let mut cfg = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(portico_agent::pki::insecure_verifier())
            .with_no_client_auth()
    } else {
        builder
            .with_root_certificates(root_store(cacert)?)
            .with_no_client_auth()
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// The roots to trust: the PEM file, or the system's.
pub fn root_store(cacert: Option<&Path>) -> Result<RootCertStore, LoadtestError> {
    let mut roots = RootCertStore::empty();
    match cacert {
        Some(path) => {
            let err = |source: crate::error::BoxError| LoadtestError::CaFile {
                path: path.to_owned(),
                source,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| err(e.into()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err(e.into()))?;
            if certs.is_empty() {
                return Err(LoadtestError::CaFileEmpty {
                    path: path.to_owned(),
                });
            }
            for c in certs {
                roots.add(c).map_err(|e| err(e.into()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    Ok(roots)
}

/// The address to dial for `host:port`: `connect_to` if set, loopback for
/// `localhost` and `*.localhost` (RFC 6761; the system resolver here does
/// not know them), an IP literal as is, else the system resolver.
pub async fn resolve(
    host: &url::Host<&str>,
    port: u16,
    connect_to: Option<SocketAddr>,
) -> Result<SocketAddr, LoadtestError> {
    if let Some(a) = connect_to {
        return Ok(a);
    }
    match host {
        url::Host::Ipv4(ip) => Ok(SocketAddr::new(IpAddr::V4(*ip), port)),
        url::Host::Ipv6(ip) => Ok(SocketAddr::new(IpAddr::V6(*ip), port)),
        url::Host::Domain(d) => {
            let lower = d.trim_end_matches('.').to_ascii_lowercase();
            if lower == "localhost" || lower.ends_with(".localhost") {
                return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
            }
            tokio::net::lookup_host((*d, port))
                .await
                .map_err(|source| LoadtestError::Resolve {
                    host: (*d).to_owned(),
                    source,
                })?
                .next()
                .ok_or_else(|| LoadtestError::NoAddress {
                    host: (*d).to_owned(),
                })
        }
    }
}

/// One request of the mix, ready to send many times.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub origin: usize,
    pub method: Method,
    /// Origin-form (`/path?q`), for HTTP/1.1.
    pub path: Uri,
    /// Absolute form, for HTTP/2 and HTTP/3.
    pub absolute: Uri,
    pub host: HeaderValue,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub weight: u32,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

struct Origin {
    https: bool,
    server_name: ServerName<'static>,
}

/// The addresses a pool dials, round robin, with the ones that recently
/// failed tried last.
struct Addrs {
    list: Vec<SocketAddr>,
    next: AtomicUsize,
    /// Per address: tried last until then.
    dead_until: Mutex<Vec<Option<Instant>>>,
}

impl Addrs {
    fn new(list: Vec<SocketAddr>) -> Addrs {
        let n = list.len();
        Addrs {
            list,
            next: AtomicUsize::new(0),
            dead_until: Mutex::new(vec![None; n]),
        }
    }

    /// The order to try the addresses in for one connection: round robin
    /// from the next one, the live ones first, then the dead ones (the
    /// soonest to revive first). Every address appears once.
    fn order(&self, now: Instant) -> Vec<usize> {
        let n = self.list.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let dead = lock(&self.dead_until);
        let rotated = (0..n).map(|k| (start + k) % n);
        let mut order: Vec<usize> = rotated
            .clone()
            .filter(|&i| dead[i].is_none_or(|t| t <= now))
            .collect();
        let mut down: Vec<usize> = rotated
            .filter(|&i| dead[i].is_some_and(|t| t > now))
            .collect();
        down.sort_by_key(|&i| dead[i]);
        order.extend(down);
        order
    }

    fn failed(&self, i: usize, now: Instant) {
        if let Some(d) = lock(&self.dead_until).get_mut(i) {
            *d = Some(now + DEAD_FOR);
        }
    }

    fn worked(&self, i: usize) {
        if let Some(d) = lock(&self.dead_until).get_mut(i) {
            *d = None;
        }
    }
}

struct Pool {
    origin: Origin,
    addrs: Addrs,
    /// HTTP/1.1: one permit per connection.
    permits: Semaphore,
    idle: Mutex<Vec<http1::SendRequest<Full<Bytes>>>>,
    /// HTTP/2: fixed slots, used round robin.
    h2: Vec<tokio::sync::Mutex<Option<http2::SendRequest<Full<Bytes>>>>>,
    /// HTTP/3: fixed slots, used round robin.
    h3: Vec<tokio::sync::Mutex<Option<crate::h3::H3Client>>>,
    next: AtomicUsize,
}

/// Spawns hyper's HTTP/2 background futures on the run's tracker.
#[derive(Clone)]
struct Tracked(TaskTracker);

impl<F> hyper::rt::Executor<F> for Tracked
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// Connections to every origin of a scenario.
pub(crate) struct Client {
    protocol: Protocol,
    new_connection: bool,
    tls: Arc<rustls::ClientConfig>,
    h3: Option<crate::h3::H3Connector>,
    pools: Vec<Pool>,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// Requests sent again after a reused connection failed them unsent.
    retried: AtomicU64,
    /// Connections opened at another address after one failed.
    failovers: AtomicU64,
}

impl Client {
    /// Resolves every origin of the mix and prepares its requests. Spawns
    /// connection tasks on `tasks`, stopped by `stop`.
    pub async fn new(
        s: &Scenario,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> Result<(Client, Vec<Prepared>), LoadtestError> {
        let alpn: &[&[u8]] = match s.protocol {
            Protocol::H1 => &[b"http/1.1"],
            Protocol::H2 => &[b"h2"],
            Protocol::H3 => &[crate::h3::ALPN],
        };
        let tls = tls_config(s.cacert.as_deref(), s.insecure, alpn)?;
        let h3 = match s.protocol {
            Protocol::H3 => Some(h3_connector(s, &tasks)?),
            _ => None,
        };
        let mut pools: Vec<Pool> = Vec::new();
        let mut keys: Vec<(String, String, u16, Vec<SocketAddr>)> = Vec::new();
        let mut prepared = Vec::with_capacity(s.requests.len());
        let zeros = Bytes::from(vec![
            0u8;
            usize::try_from(
                s.requests.iter().map(|r| r.body_size).max().unwrap_or(0)
            )
            .unwrap_or(0)
        ]);
        for (i, r) in s.requests.iter().enumerate() {
            let invalid = |reason: String| {
                LoadtestError::Scenario(crate::error::ScenarioError::invalid(
                    format!("requests[{i}].url"),
                    reason,
                ))
            };
            let url = url::Url::parse(&r.url).map_err(|e| invalid(e.to_string()))?;
            let host = url.host().ok_or_else(|| invalid("no host".into()))?;
            let port = url
                .port_or_known_default()
                .ok_or_else(|| invalid("no port".into()))?;
            let connect_to = if r.connect_to.is_empty() {
                &s.connect_to
            } else {
                &r.connect_to
            };
            let key = (
                url.scheme().to_owned(),
                host.to_string(),
                port,
                connect_to.clone(),
            );
            let origin = match keys.iter().position(|k| *k == key) {
                Some(o) => o,
                None => {
                    let addrs = if connect_to.is_empty() {
                        vec![resolve(&host, port, None).await?]
                    } else {
                        connect_to.clone()
                    };
                    let name = match host {
                        url::Host::Domain(d) => d.to_owned(),
                        url::Host::Ipv4(ip) => ip.to_string(),
                        url::Host::Ipv6(ip) => ip.to_string(),
                    };
                    let server_name = ServerName::try_from(name)
                        .map_err(|e| invalid(format!("not a TLS server name: {e}")))?;
                    let n = s.connections;
                    pools.push(Pool {
                        origin: Origin {
                            https: url.scheme() == "https",
                            server_name,
                        },
                        addrs: Addrs::new(addrs),
                        permits: Semaphore::new(n),
                        idle: Mutex::new(Vec::new()),
                        h2: (0..n).map(|_| tokio::sync::Mutex::new(None)).collect(),
                        h3: (0..n).map(|_| tokio::sync::Mutex::new(None)).collect(),
                        next: AtomicUsize::new(0),
                    });
                    keys.push(key);
                    pools.len() - 1
                }
            };
            let mut path = url.path().to_owned();
            if let Some(q) = url.query() {
                path.push('?');
                path.push_str(q);
            }
            let path: Uri = path
                .parse()
                .map_err(|e: http::uri::InvalidUri| invalid(e.to_string()))?;
            let absolute: Uri = url
                .as_str()
                .parse()
                .map_err(|e: http::uri::InvalidUri| invalid(e.to_string()))?;
            let host =
                HeaderValue::from_str(&authority(&url)).map_err(|e| invalid(e.to_string()))?;
            let mut headers = HeaderMap::new();
            for (k, v) in &r.headers {
                // Validated by Scenario::validate.
                if let (Ok(k), Ok(v)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(v),
                ) {
                    headers.append(k, v);
                }
            }
            let method =
                Method::from_bytes(r.method.as_bytes()).map_err(|e| invalid(e.to_string()))?;
            let len = usize::try_from(r.body_size).unwrap_or(0);
            prepared.push(Prepared {
                origin,
                method,
                path,
                absolute,
                host,
                headers,
                body: zeros.slice(..len),
                weight: r.weight,
            });
        }
        Ok((
            Client {
                protocol: s.protocol,
                new_connection: s.new_connection_per_request,
                tls: Arc::new(tls),
                h3,
                pools,
                tasks,
                stop,
                retried: AtomicU64::new(0),
                failovers: AtomicU64::new(0),
            },
            prepared,
        ))
    }

    /// Sends one request and reads the whole response, setting `sent` to
    /// when it was handed to a ready connection (the start of its service
    /// time). No timeout here: the caller bounds it.
    pub async fn send(
        &self,
        p: &Prepared,
        sent: &mut Instant,
    ) -> Result<Response, TransportErrorKind> {
        match self.protocol {
            Protocol::H1 => self.send_h1(p, sent).await,
            Protocol::H2 => self.send_h2(p, sent).await,
            Protocol::H3 => self.send_h3(p, sent).await,
        }
    }

    /// Requests retried on a new connection, and connection failovers to
    /// another address, so far.
    pub fn retries(&self) -> (u64, u64) {
        (
            self.retried.load(Ordering::Relaxed),
            self.failovers.load(Ordering::Relaxed),
        )
    }

    async fn send_h1(
        &self,
        p: &Prepared,
        sent: &mut Instant,
    ) -> Result<Response, TransportErrorKind> {
        let pool = &self.pools[p.origin];
        let req = || {
            let mut req = Request::new(Full::new(p.body.clone()));
            *req.method_mut() = p.method.clone();
            *req.uri_mut() = p.path.clone();
            *req.version_mut() = Version::HTTP_11;
            *req.headers_mut() = p.headers.clone();
            if !req.headers().contains_key(HOST) {
                req.headers_mut().insert(HOST, p.host.clone());
            }
            req
        };
        if self.new_connection {
            let mut s = self.connect_h1(pool).await?;
            s.ready().await.map_err(|_| TransportErrorKind::Request)?;
            *sent = Instant::now();
            let resp = s
                .send_request(req())
                .await
                .map_err(|_| TransportErrorKind::Request)?;
            return read_response(resp).await;
        }
        let _permit = pool
            .permits
            .acquire()
            .await
            .map_err(|_| TransportErrorKind::Request)?;
        let reused = loop {
            let popped = lock(&pool.idle).pop();
            match popped {
                Some(s) if s.is_closed() => continue,
                other => break other,
            }
        };
        let (mut s, mut reused) = match reused {
            Some(mut s) => match s.ready().await {
                Ok(()) => (s, true),
                // The server closed a kept-alive connection: dial anew.
                Err(_) => (self.connect_h1(pool).await?, false),
            },
            None => (self.connect_h1(pool).await?, false),
        };
        let mut first = true;
        loop {
            s.ready().await.map_err(|_| TransportErrorKind::Request)?;
            if first {
                // The service time counts a retry's first attempt too.
                *sent = Instant::now();
                first = false;
            }
            match s.send_request(req()).await {
                Ok(resp) => {
                    let r = read_response(resp).await?;
                    if !s.is_closed() {
                        lock(&pool.idle).push(s);
                    }
                    return Ok(r);
                }
                Err(e) if reused && h1_unanswered(&e) => {
                    self.retried.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %portico_agent::error_chain(&e), "kept-alive connection closed under the request; retrying on a new one");
                    s = self.connect_h1(pool).await?;
                    reused = false;
                }
                Err(_) => return Err(TransportErrorKind::Request),
            }
        }
    }

    async fn send_h2(
        &self,
        p: &Prepared,
        sent: &mut Instant,
    ) -> Result<Response, TransportErrorKind> {
        let pool = &self.pools[p.origin];
        let req = || {
            let mut req = Request::new(Full::new(p.body.clone()));
            *req.method_mut() = p.method.clone();
            *req.uri_mut() = p.absolute.clone();
            *req.version_mut() = Version::HTTP_2;
            *req.headers_mut() = p.headers.clone();
            req
        };
        let mut s = self.h2_sender(pool, false).await?;
        let (mut redialed, mut retried, mut first) = (false, false, true);
        loop {
            if s.ready().await.is_err() {
                // A pooled connection that died since: one new one.
                if redialed {
                    return Err(TransportErrorKind::Request);
                }
                redialed = true;
                s = self.h2_sender(pool, true).await?;
                continue;
            }
            if first {
                *sent = Instant::now();
                first = false;
            }
            match s.send_request(req()).await {
                Ok(resp) => return read_response(resp).await,
                Err(e) if !retried && h2_refused(&e) => {
                    retried = true;
                    redialed = true;
                    self.retried.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %portico_agent::error_chain(&e), "request refused by GOAWAY; retrying on a new connection");
                    s = self.h2_sender(pool, true).await?;
                }
                Err(_) => return Err(TransportErrorKind::Request),
            }
        }
    }

    /// An HTTP/2 connection of the pool (round robin over its slots), or a
    /// new one in that slot when `fresh` or the slot's is closed; a new
    /// one for each request with `new_connection_per_request`.
    async fn h2_sender(
        &self,
        pool: &Pool,
        fresh: bool,
    ) -> Result<http2::SendRequest<Full<Bytes>>, TransportErrorKind> {
        if self.new_connection {
            return self.connect_h2(pool).await;
        }
        let i = pool.next.fetch_add(1, Ordering::Relaxed) % pool.h2.len();
        let mut slot = pool.h2[i].lock().await;
        match &*slot {
            Some(s) if !fresh && !s.is_closed() => Ok(s.clone()),
            _ => {
                let s = self.connect_h2(pool).await?;
                *slot = Some(s.clone());
                Ok(s)
            }
        }
    }

    async fn send_h3(
        &self,
        p: &Prepared,
        sent: &mut Instant,
    ) -> Result<Response, TransportErrorKind> {
        let pool = &self.pools[p.origin];
        let connector = self.h3.as_ref().ok_or(TransportErrorKind::Handshake)?;
        let mut req = Request::new(());
        *req.method_mut() = p.method.clone();
        *req.uri_mut() = p.absolute.clone();
        *req.headers_mut() = p.headers.clone();
        let client = if self.new_connection {
            self.connect_h3(connector, pool).await?
        } else {
            let i = pool.next.fetch_add(1, Ordering::Relaxed) % pool.h3.len();
            let mut slot = pool.h3[i].lock().await;
            match &*slot {
                Some(c) if c.quic().close_reason().is_none() => c.clone(),
                _ => {
                    let c = self.connect_h3(connector, pool).await?;
                    *slot = Some(c.clone());
                    c
                }
            }
        };
        *sent = Instant::now();
        let stream = client
            .open(req)
            .await
            .map_err(|_| TransportErrorKind::Request)?;
        let (mut tx, mut rx) = stream.split();
        let mut body = p.body.clone();
        let send = async move {
            while !body.is_empty() {
                let chunk = body.split_to(body.len().min(H3_CHUNK));
                tx.send_data(chunk).await?;
            }
            tx.finish().await
        };
        let recv = async move {
            let head = rx
                .response()
                .await
                .map_err(|_| TransportErrorKind::Request)?;
            let mut n = 0u64;
            while let Some(chunk) = rx.data().await.map_err(|_| TransportErrorKind::Body)? {
                n += chunk.len() as u64;
            }
            Ok::<_, TransportErrorKind>((head, n))
        };
        // A server may answer before reading the whole request body (an
        // error page): that is not a failure of the exchange.
        let (_sent, got) = tokio::join!(send, recv);
        let (head, n) = got?;
        if self.new_connection {
            client.close();
        }
        Ok(Response {
            status: head.status().as_u16(),
            portico_error: portico_error(head.headers()),
            body_bytes: n,
        })
    }

    /// Opens a connection with `attempt` at each address of the pool in
    /// [`Addrs::order`] until one works; the last error if none does.
    async fn failover<T, F, Fut>(
        &self,
        pool: &Pool,
        mut attempt: F,
    ) -> Result<T, TransportErrorKind>
    where
        F: FnMut(SocketAddr) -> Fut,
        Fut: Future<Output = Result<T, TransportErrorKind>>,
    {
        let mut last = TransportErrorKind::Connect;
        let order = pool.addrs.order(Instant::now());
        let count = order.len();
        for (n, i) in order.into_iter().enumerate() {
            if n > 0 {
                self.failovers.fetch_add(1, Ordering::Relaxed);
            }
            let addr = pool.addrs.list[i];
            let opened = if n + 1 < count {
                tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(addr))
                    .await
                    .unwrap_or(Err(TransportErrorKind::Timeout))
            } else {
                attempt(addr).await
            };
            match opened {
                Ok(t) => {
                    pool.addrs.worked(i);
                    return Ok(t);
                }
                Err(e) => {
                    tracing::debug!(%addr, error = e.as_str(), "cannot open a connection");
                    pool.addrs.failed(i, Instant::now());
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn connect_h1(
        &self,
        pool: &Pool,
    ) -> Result<http1::SendRequest<Full<Bytes>>, TransportErrorKind> {
        self.failover(pool, |a| self.dial_h1(&pool.origin, a)).await
    }

    async fn connect_h2(
        &self,
        pool: &Pool,
    ) -> Result<http2::SendRequest<Full<Bytes>>, TransportErrorKind> {
        self.failover(pool, |a| self.dial_h2(&pool.origin, a)).await
    }

    async fn connect_h3(
        &self,
        connector: &crate::h3::H3Connector,
        pool: &Pool,
    ) -> Result<crate::h3::H3Client, TransportErrorKind> {
        self.failover(pool, |a| self.dial_h3(connector, &pool.origin, a))
            .await
    }

    async fn dial(&self, o: &Origin, addr: SocketAddr) -> Result<Box<dyn Io>, TransportErrorKind> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|_| TransportErrorKind::Connect)?;
        let _ = tcp.set_nodelay(true);
        if !o.https {
            return Ok(Box::new(tcp));
        }
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(o.server_name.clone(), tcp)
            .await
            .map_err(|_| TransportErrorKind::Tls)?;
        Ok(Box::new(tls))
    }

    async fn dial_h1(
        &self,
        o: &Origin,
        addr: SocketAddr,
    ) -> Result<http1::SendRequest<Full<Bytes>>, TransportErrorKind> {
        let io = self.dial(o, addr).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(|_| TransportErrorKind::Handshake)?;
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
        Ok(sender)
    }

    async fn dial_h2(
        &self,
        o: &Origin,
        addr: SocketAddr,
    ) -> Result<http2::SendRequest<Full<Bytes>>, TransportErrorKind> {
        let io = self.dial(o, addr).await?;
        let (sender, conn) = http2::Builder::new(Tracked(self.tasks.clone()))
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|_| TransportErrorKind::Handshake)?;
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
        Ok(sender)
    }

    async fn dial_h3(
        &self,
        connector: &crate::h3::H3Connector,
        o: &Origin,
        addr: SocketAddr,
    ) -> Result<crate::h3::H3Client, TransportErrorKind> {
        let name = match &o.server_name {
            ServerName::DnsName(d) => d.as_ref().to_owned(),
            ServerName::IpAddress(ip) => IpAddr::from(*ip).to_string(),
            _ => return Err(TransportErrorKind::Handshake),
        };
        connector
            .connect(addr, &name)
            .await
            .map_err(|_| TransportErrorKind::Handshake)
    }
}

fn h3_connector(
    s: &Scenario,
    tasks: &TaskTracker,
) -> Result<crate::h3::H3Connector, LoadtestError> {
    let trust = if s.insecure {
        crate::h3::Trust::Insecure
    } else {
        crate::h3::Trust::Roots(root_store(s.cacert.as_deref())?)
    };
    let first = s
        .connect_to
        .first()
        .or_else(|| s.requests.iter().find_map(|r| r.connect_to.first()));
    let bind: SocketAddr = match first {
        Some(SocketAddr::V6(_)) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        _ => (Ipv4Addr::UNSPECIFIED, 0).into(),
    };
    crate::h3::H3Connector::new(bind, trust, tasks)
        .map_err(|source| LoadtestError::H3Setup { source })
}

fn authority(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether an HTTP/1.1 request on a reused connection failed before any
/// response byte because the server had closed the connection: hyper
/// never sent it (canceled), or the connection ended (incomplete message)
/// or was reset under it.
fn h1_unanswered(e: &hyper::Error) -> bool {
    e.is_canceled()
        || e.is_incomplete_message()
        || io_kind(e).is_some_and(|k| {
            matches!(
                k,
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            )
        })
}

/// Whether an HTTP/2 request was refused unprocessed: never sent
/// (canceled), REFUSED_STREAM, or cut by the peer's GOAWAY (a stream above
/// its last stream id, which the peer promises it did not process).
fn h2_refused(e: &hyper::Error) -> bool {
    if e.is_canceled() {
        return true;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            return h2e.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2e.is_go_away() && h2e.is_remote());
        }
        src = s.source();
    }
    false
}

fn io_kind(e: &hyper::Error) -> Option<std::io::ErrorKind> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        src = s.source();
    }
    None
}

fn portico_error(h: &HeaderMap) -> Option<String> {
    h.get(PORTICO_ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(MAX_CODE_LEN).collect())
}

async fn read_response(
    resp: http::Response<hyper::body::Incoming>,
) -> Result<Response, TransportErrorKind> {
    let status = resp.status().as_u16();
    let portico_error = portico_error(resp.headers());
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| TransportErrorKind::Body)?;
        if let Some(d) = frame.data_ref() {
            n += d.len() as u64;
        }
    }
    Ok(Response {
        status,
        portico_error,
        body_bytes: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_go_round_robin_with_dead_ones_last() {
        let list: Vec<SocketAddr> = (1..=3)
            .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
            .collect();
        let a = Addrs::new(list);
        let now = Instant::now();
        assert_eq!(a.order(now), [0, 1, 2]);
        assert_eq!(a.order(now), [1, 2, 0]);
        a.failed(2, now);
        assert_eq!(a.order(now), [0, 1, 2], "the dead one last");
        a.failed(0, now + Duration::from_millis(10));
        // Both dead: each is still tried once, the soonest to revive first.
        assert_eq!(a.order(now), [1, 2, 0]);
        // Past DEAD_FOR they are back in the rotation.
        assert_eq!(a.order(now + DEAD_FOR + DEAD_FOR), [1, 2, 0]);
        a.worked(0);
        a.worked(2);
        assert_eq!(a.order(now), [2, 0, 1]);
    }
}
