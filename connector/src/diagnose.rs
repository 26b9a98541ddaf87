//! The probe of `portico app test`: the router names an app, and the
//! connector checks, from where it runs, that it can reach the app's
//! internal URL the way its requests do: DNS (the system resolver, as the
//! backend client uses), a TCP connect, TLS with the app's own validation
//! setting (the same rustls settings as its requests), and the HTTP status
//! of a `GET` of the internal URL.
//!
//! The connector asks for work: it long-polls `GET /v1/connector/probes`
//! with its certificate, runs each job and posts the result to
//! `POST /v1/connector/probes/{id}`. A job names only an app; the URL comes
//! from this connector's own config, so the router (or anyone holding the
//! admin token) cannot make it probe any other host. Each step has its own
//! timeout and a probe ends within [`PROBE_DEADLINE`]; at most
//! [`MAX_AT_ONCE`] run at once and each result is bounded
//! ([`api::MAX_PROBE_STEPS`], [`api::MAX_PROBE_DETAIL`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Scheme;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use portico_proto::api::{self, CheckStatus, ProbeJobs, ProbeResult, ProbeStep};
use portico_proto::AppId;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::headers::InternalUrl;
use crate::stream::StreamCtx;
use crate::tunnel::Pool;
use crate::watch::{pause, Router};

/// The router path of the probe jobs (and, with `/{id}`, of a result).
pub(crate) const PROBES_PATH: &str = "/v1/connector/probes";
/// How long one long-poll for jobs waits on the router.
const POLL_WAIT: Duration = Duration::from_secs(25);
/// A failed poll is retried after this, doubling up to [`RETRY_MAX`]
/// (an older router answers 404 to every poll: it is asked once a minute).
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Per-step timeouts (TCP: for all the addresses together). They add up
/// to [`PROBE_DEADLINE`], so a slow step never costs the steps before it.
const DNS_TIMEOUT: Duration = Duration::from_secs(2);
const TCP_TIMEOUT: Duration = Duration::from_secs(3);
const TLS_TIMEOUT: Duration = Duration::from_secs(2);
const HTTP_TIMEOUT: Duration = Duration::from_secs(4);
/// A whole probe ends within this, whatever its steps do.
pub(crate) const PROBE_DEADLINE: Duration = Duration::from_secs(11);
/// Probes run at once, at most.
const MAX_AT_ONCE: usize = 4;
/// Addresses of the internal host tried, at most.
const MAX_ADDRS: usize = 8;

/// Polls the router for probe jobs until the pool stops.
pub(crate) async fn run(pool: Arc<Pool>, router_url: String) {
    let mut router = Router::new(&pool, router_url);
    let mut retry = RETRY_MIN;
    let running = Arc::new(Semaphore::new(MAX_AT_ONCE));
    loop {
        let c = match router.client() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %portico_agent::error_chain(&e), "cannot build the router client");
                if !pause(&pool, &mut retry, RETRY_MAX).await {
                    return;
                }
                continue;
            }
        };
        let answer = tokio::select! {
            _ = pool.stop.cancelled() => return,
            r = c.watch::<ProbeJobs>(PROBES_PATH, 0, POLL_WAIT) => r,
        };
        match answer {
            Ok(Some(jobs)) => {
                retry = RETRY_MIN;
                for job in jobs.jobs.into_iter().take(api::MAX_PROBE_JOBS) {
                    let Ok(permit) = running.clone().try_acquire_owned() else {
                        // The router times the job out and says so.
                        tracing::warn!(app = %job.app, "too many probes at once; skipping one");
                        continue;
                    };
                    let (c, streams, stop) = (c.clone(), pool.streams.clone(), pool.stop.clone());
                    let span = tracing::info_span!("probe", app = %job.app, job = job.id);
                    pool.tracker.spawn(
                        async move {
                            let _permit = permit;
                            let result = tokio::select! {
                                _ = stop.cancelled() => return,
                                r = probe_app(&streams, &job.app) => r,
                            };
                            let failed = result.steps.iter().find(|s| s.status == CheckStatus::Fail);
                            tracing::info!(url = %result.url, failed = failed.map(|s| tracing::field::display(&s.detail)), "probed the internal URL");
                            let path = format!("{PROBES_PATH}/{}", job.id);
                            let sent = tokio::select! {
                                _ = stop.cancelled() => return,
                                r = tokio::time::timeout(Duration::from_secs(10), c.post_empty(&path, &result)) => r,
                            };
                            match sent {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => tracing::debug!(error = %portico_agent::error_chain(&e), "the router took no probe result"),
                                Err(_) => tracing::debug!("sending the probe result timed out"),
                            }
                        }
                        .instrument(span),
                    );
                }
            }
            Ok(None) => retry = RETRY_MIN,
            Err(e) if e.is_revoked() => return,
            Err(e) => {
                tracing::debug!(error = %portico_agent::error_chain(&e), retry_in = ?retry, "polling for probes failed");
                if !pause(&pool, &mut retry, RETRY_MAX).await {
                    return;
                }
            }
        }
    }
}

/// Probes the internal URL of `app` as this connector's config has it.
pub(crate) async fn probe_app(ctx: &StreamCtx, app: &AppId) -> ProbeResult {
    let table = ctx.apps.load();
    let Some(entry) = table.get(app) else {
        return ProbeResult {
            url: String::new(),
            steps: vec![step(
                "config",
                CheckStatus::Fail,
                Duration::ZERO,
                format!(
                    "config: this connector serves no app {app} (its config lags behind the router, or the app is in another group)"
                ),
            )],
        };
    };
    let url = entry.app.internal_url.clone();
    let internal = match &entry.internal {
        Ok(u) => u,
        Err(reason) => {
            return ProbeResult {
                url,
                steps: vec![step(
                    "config",
                    CheckStatus::Fail,
                    Duration::ZERO,
                    format!("config: {reason}"),
                )],
            }
        }
    };
    let tls = ctx.origin.tls_for(&entry.app);
    let steps = match tokio::time::timeout(
        PROBE_DEADLINE,
        probe(internal, entry.app.validate_backend_tls, tls),
    )
    .await
    {
        Ok(steps) => steps,
        Err(_) => vec![step(
            "probe",
            CheckStatus::Fail,
            PROBE_DEADLINE,
            format!("probe: not done within {} s", PROBE_DEADLINE.as_secs()),
        )],
    };
    ProbeResult { url, steps }
}

/// DNS, TCP, TLS (https only) and HTTP against `url`; a failed step
/// leaves the later ones skipped.
pub(crate) async fn probe(
    url: &InternalUrl,
    validate: bool,
    tls: Arc<rustls::ClientConfig>,
) -> Vec<ProbeStep> {
    let https = url.scheme == Scheme::HTTPS;
    let host = url
        .authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url
        .authority
        .port_u16()
        .unwrap_or(if https { 443 } else { 80 });
    let mut steps = Vec::with_capacity(4);
    let later: &[&str] = if https {
        &["tcp", "tls", "http"]
    } else {
        &["tcp", "http"]
    };

    let started = Instant::now();
    let addrs = match resolve(&host, port).await {
        Ok((addrs, detail)) => {
            steps.push(step("dns", CheckStatus::Ok, started.elapsed(), detail));
            addrs
        }
        Err(detail) => {
            steps.push(step("dns", CheckStatus::Fail, started.elapsed(), detail));
            return skipped(steps, later);
        }
    };

    let started = Instant::now();
    let tcp = match connect(&addrs).await {
        Ok(tcp) => {
            let peer = tcp
                .peer_addr()
                .map_or_else(|_| "the backend".to_owned(), |a| a.to_string());
            steps.push(step(
                "tcp",
                CheckStatus::Ok,
                started.elapsed(),
                format!("tcp: connected to {peer}"),
            ));
            tcp
        }
        Err(detail) => {
            steps.push(step("tcp", CheckStatus::Fail, started.elapsed(), detail));
            return skipped(steps, &later[1..]);
        }
    };

    let head_host = url.host.to_str().unwrap_or(&host).to_owned();
    let path = if url.prefix.is_empty() {
        "/".to_owned()
    } else {
        format!("{}/", url.prefix)
    };
    if !https {
        steps.push(http(tcp, &head_host, &path).await);
        return steps;
    }
    let started = Instant::now();
    let name = match rustls::pki_types::ServerName::try_from(host.clone()) {
        Ok(n) => n,
        Err(e) => {
            steps.push(step(
                "tls",
                CheckStatus::Fail,
                started.elapsed(),
                format!("tls: {host:?} is not a name TLS can check: {e}"),
            ));
            return skipped(steps, &["http"]);
        }
    };
    let connector = tokio_rustls::TlsConnector::from(tls);
    match tokio::time::timeout(TLS_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(stream)) => {
            let detail = if validate {
                format!("tls: the certificate is valid for {host}")
            } else {
                "tls: handshake done; the certificate is not checked (the app sets validate_backend_tls off)".to_owned()
            };
            steps.push(step("tls", CheckStatus::Ok, started.elapsed(), detail));
            steps.push(http(stream, &head_host, &path).await);
        }
        Ok(Err(e)) => {
            steps.push(step(
                "tls",
                CheckStatus::Fail,
                started.elapsed(),
                format!("tls: {}", portico_agent::error_chain(&e)),
            ));
            return skipped(steps, &["http"]);
        }
        Err(_) => {
            steps.push(step(
                "tls",
                CheckStatus::Fail,
                started.elapsed(),
                format!("tls: no handshake within {} s", TLS_TIMEOUT.as_secs()),
            ));
            return skipped(steps, &["http"]);
        }
    }
    steps
}

/// The addresses of `host` (an IP literal is its own), by the system
/// resolver the backend client uses; `Err` is the step's detail.
async fn resolve(host: &str, port: u16) -> Result<(Vec<SocketAddr>, String), String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((
            vec![SocketAddr::new(ip, port)],
            format!("dns: {ip} is an address; nothing to resolve"),
        ));
    }
    match tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(found)) => {
            let addrs: Vec<SocketAddr> = found.take(MAX_ADDRS).collect();
            if addrs.is_empty() {
                return Err(format!("dns: no address for {host}"));
            }
            let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
            Ok((addrs, format!("dns: {host} is {}", list.join(", "))))
        }
        Ok(Err(e)) => Err(format!("dns: no such host {host} ({e})")),
        Err(_) => Err(format!(
            "dns: no answer for {host} within {} s",
            DNS_TIMEOUT.as_secs()
        )),
    }
}

/// The first address that takes a TCP connection; `Err` names what each
/// one did.
async fn connect(addrs: &[SocketAddr]) -> Result<tokio::net::TcpStream, String> {
    let mut failures = Vec::new();
    let end = Instant::now() + TCP_TIMEOUT;
    for addr in addrs {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            failures.push(format!(
                "{addr} not tried: out of the step's {} s",
                TCP_TIMEOUT.as_secs()
            ));
            break;
        }
        match tokio::time::timeout(left, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                failures.push(format!("connection refused {addr}"))
            }
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => failures.push(format!(
                "no answer from {addr} within {} ms",
                left.as_millis()
            )),
        }
    }
    Err(format!("tcp: {}", failures.join("; ")))
}

/// A `GET` of `path` on `io`: the status of the answer, whose body is not
/// read. 1xx to 3xx pass, and 401 and 403 (the backend answers, and wants
/// a user); anything else fails.
async fn http<IO>(io: IO, host: &str, path: &str) -> ProbeStep
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("http: {}", portico_agent::error_chain(&e)))?;
        let req = http::Request::get(path)
            .header(http::header::HOST, host)
            .header(
                http::header::USER_AGENT,
                concat!("portico-app-test/", env!("CARGO_PKG_VERSION")),
            )
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("http: cannot build the request: {e}"))?;
        let send = sender.send_request(req);
        tokio::pin!(conn, send);
        let answer = tokio::select! {
            biased;
            r = &mut send => r,
            r = &mut conn => match r {
                // With `Connection: close` the connection may end in the
                // same poll that hands over the answer.
                Ok(()) => send.await,
                Err(e) => return Err(format!("http: {}", portico_agent::error_chain(&e))),
            },
        };
        answer.map_err(|e| format!("http: {}", portico_agent::error_chain(&e)))
    };
    match tokio::time::timeout(HTTP_TIMEOUT, exchange).await {
        Ok(Ok(resp)) => {
            let status = resp.status();
            let pass = status.as_u16() < 400
                || status == http::StatusCode::UNAUTHORIZED
                || status == http::StatusCode::FORBIDDEN;
            step(
                "http",
                if pass {
                    CheckStatus::Ok
                } else {
                    CheckStatus::Fail
                },
                started.elapsed(),
                format!("http: {status} for GET {path}"),
            )
        }
        Ok(Err(detail)) => step("http", CheckStatus::Fail, started.elapsed(), detail),
        Err(_) => step(
            "http",
            CheckStatus::Fail,
            started.elapsed(),
            format!(
                "http: no answer to GET {path} within {} s",
                HTTP_TIMEOUT.as_secs()
            ),
        ),
    }
}

/// `steps` and a skipped step for each of `later`.
fn skipped(mut steps: Vec<ProbeStep>, later: &[&str]) -> Vec<ProbeStep> {
    for name in later {
        steps.push(step(
            name,
            CheckStatus::Skip,
            Duration::ZERO,
            format!("{name}: not tried (an earlier step failed)"),
        ));
    }
    steps
}

/// One step, its detail cut to [`api::MAX_PROBE_DETAIL`] bytes.
fn step(name: &str, status: CheckStatus, took: Duration, mut detail: String) -> ProbeStep {
    if detail.len() > api::MAX_PROBE_DETAIL {
        let mut cut = api::MAX_PROBE_DETAIL - 3;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push_str("...");
    }
    ProbeStep {
        step: name.to_owned(),
        status,
        ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> InternalUrl {
        InternalUrl::parse(s).unwrap()
    }

    fn tls() -> Arc<rustls::ClientConfig> {
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        )
    }

    fn summary(steps: &[ProbeStep]) -> Vec<(&str, CheckStatus)> {
        steps.iter().map(|s| (s.step.as_str(), s.status)).collect()
    }

    #[tokio::test]
    async fn a_port_nothing_listens_on_is_named_as_refused() {
        // A port that was free a moment ago: bound, then closed.
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let steps = probe(&url(&format!("http://{addr}/")), true, tls()).await;
        assert_eq!(
            summary(&steps),
            [
                ("dns", CheckStatus::Ok),
                ("tcp", CheckStatus::Fail),
                ("http", CheckStatus::Skip)
            ]
        );
        assert_eq!(steps[1].detail, format!("tcp: connection refused {addr}"));
    }

    #[tokio::test]
    async fn an_http_backend_gives_its_status_and_a_5xx_fails() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            for answer in ["200 OK", "502 Bad Gateway"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap();
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                s.write_all(format!("HTTP/1.1 {answer}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                assert!(head.starts_with("GET /app/ HTTP/1.1\r\n"), "{head}");
            }
        });
        let u = url(&format!("http://{addr}/app"));
        let ok = probe(&u, true, tls()).await;
        assert_eq!(ok[2].status, CheckStatus::Ok, "{ok:?}");
        assert_eq!(ok[2].detail, "http: 200 OK for GET /app/");
        let bad = probe(&u, true, tls()).await;
        assert_eq!(bad[2].status, CheckStatus::Fail, "{bad:?}");
        assert_eq!(bad[2].detail, "http: 502 Bad Gateway for GET /app/");
        server.await.unwrap();
    }

    /// A TLS listener on loopback with a self-signed `localhost`
    /// certificate: the listener, its port, and the acceptor.
    async fn self_signed_tls_listener() -> (tokio::net::TcpListener, u16, tokio_rustls::TlsAcceptor)
    {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let server_tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls));
        (listener, port, acceptor)
    }

    #[tokio::test]
    async fn an_https_backend_with_an_untrusted_certificate_fails_tls() {
        let (listener, port, acceptor) = self_signed_tls_listener().await;
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            // The client refuses the certificate: the handshake fails here too.
            assert!(acceptor.accept(s).await.is_err());
        });
        let steps = probe(&url(&format!("https://localhost:{port}/")), true, tls()).await;
        assert_eq!(
            summary(&steps),
            [
                ("dns", CheckStatus::Ok),
                ("tcp", CheckStatus::Ok),
                ("tls", CheckStatus::Fail),
                ("http", CheckStatus::Skip)
            ],
            "{steps:?}"
        );
        assert!(
            steps[2].detail.starts_with("tls: invalid peer certificate"),
            "{}",
            steps[2].detail
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn without_validation_the_same_certificate_passes_and_http_is_asked_over_tls() {
        let (listener, port, acceptor) = self_signed_tls_listener().await;
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (s, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(s).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = tls.read(&mut buf).await.unwrap();
            tls.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
            tls.shutdown().await.unwrap();
        });
        // What `Origin` builds for an app with validate_backend_tls off.
        let insecure = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(portico_agent::pki::insecure_verifier())
            .with_no_client_auth(),
        );
        let steps = probe(&url(&format!("https://localhost:{port}/")), false, insecure).await;
        assert_eq!(
            summary(&steps),
            [
                ("dns", CheckStatus::Ok),
                ("tcp", CheckStatus::Ok),
                ("tls", CheckStatus::Ok),
                ("http", CheckStatus::Ok)
            ],
            "{steps:?}"
        );
        assert!(
            steps[2].detail.contains("not checked"),
            "{}",
            steps[2].detail
        );
        assert_eq!(steps[3].detail, "http: 204 No Content for GET /");
        server.await.unwrap();
    }

    #[test]
    fn details_are_bounded() {
        let s = step("dns", CheckStatus::Fail, Duration::ZERO, "é".repeat(600));
        assert!(s.detail.len() <= api::MAX_PROBE_DETAIL);
        assert!(s.detail.ends_with("..."));
    }
}
