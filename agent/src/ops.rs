//! The operations endpoints of an edge or a connector, on their own plain
//! HTTP listener: `/metrics` (Prometheus text of the process's registry),
//! `/healthz` (the process runs) and `/ready` (it can do its job).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Says whether the process is ready: `Ok(why)` or `Err(why not)`.
pub type Readiness = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// The registry in Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::warn!(error = %crate::error::chain(&e), "cannot encode metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Serves the endpoints on `listener` until `shutdown`; every task is
/// tracked by `tracker`.
pub fn serve(
    listener: TcpListener,
    registry: Registry,
    ready: Readiness,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let conns = tracker.clone();
    let span = tracing::info_span!(
        "ops",
        addr = listener.local_addr().ok().map(tracing::field::display)
    );
    tracker.spawn(
        async move {
            loop {
                let (tcp, _) = tokio::select! {
                    () = shutdown.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(error = %crate::error::chain(&e), "metrics accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let (registry, ready, shutdown) = (registry.clone(), ready.clone(), shutdown.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let resp = answer(req.uri().path(), &registry, &ready);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder
                        .http1()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10));
                    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %crate::error::chain(&*e), "metrics connection"); },
                        () = shutdown.cancelled() => {}
                    }
                });
            }
        }
        .instrument(span),
    );
}

/// The answer for one path.
pub fn answer(path: &str, registry: &Registry, ready: &Readiness) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            render(registry),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/ready" => match ready() {
            Ok(why) => (StatusCode::OK, "text/plain", format!("ready: {why}\n")),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_readiness() {
        let registry = Registry::new();
        let c = prometheus::IntCounter::new("portico_test_total", "a test counter").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        c.inc();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = up.clone();
        let ready: Readiness = Arc::new(move || {
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                Ok("up".into())
            } else {
                Err("no tunnel".into())
            }
        });
        assert!(render(&registry).contains("portico_test_total 1"));
        assert_eq!(
            answer("/metrics", &registry, &ready).status(),
            StatusCode::OK
        );
        assert_eq!(
            answer("/healthz", &registry, &ready).status(),
            StatusCode::OK
        );
        assert_eq!(
            answer("/ready", &registry, &ready).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        up.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(answer("/ready", &registry, &ready).status(), StatusCode::OK);
        assert_eq!(
            answer("/nope", &registry, &ready).status(),
            StatusCode::NOT_FOUND
        );
    }
}
