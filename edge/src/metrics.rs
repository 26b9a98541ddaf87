//! The edge's Prometheus metrics (its own registry) and the plain HTTP
//! server for `/metrics`, `/healthz` and `/ready`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Every metric the edge exports.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) requests: IntCounterVec,
    pub(crate) duration: HistogramVec,
    pub(crate) tunnels: IntGauge,
    pub(crate) streams: IntGauge,
    pub(crate) bytes: IntCounterVec,
    pub(crate) config_version: IntGauge,
    pub(crate) tunnel_closes: IntCounterVec,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "portico_edge_requests_total",
                "Requests served, by app, HTTP status and error code",
            ),
            &["app", "status", "code"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "portico_edge_request_duration_seconds",
                "Time from request to response head, by app",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                90.0,
            ]),
            &["app"],
        )
        .expect("valid metric");
        let tunnels =
            IntGauge::new("portico_edge_tunnels", "Tunnels attached").expect("valid metric");
        let streams =
            IntGauge::new("portico_edge_streams", "Active data streams").expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new(
                "portico_edge_bytes_total",
                "Body bytes proxied (in = from users, out = to users)",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let config_version = IntGauge::new(
            "portico_edge_config_version",
            "Version of the loaded config",
        )
        .expect("valid metric");
        let tunnel_closes = IntCounterVec::new(
            Opts::new(
                "portico_edge_tunnel_closes_total",
                "Tunnels closed, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(tunnels.clone()),
            Box::new(streams.clone()),
            Box::new(bytes.clone()),
            Box::new(config_version.clone()),
            Box::new(tunnel_closes.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            duration,
            tunnels,
            streams,
            bytes,
            config_version,
            tunnel_closes,
        }
    }

    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding our own registry into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serves `/metrics`, `/healthz` and `/ready` until `shutdown`.
pub(crate) fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let tracker2 = tracker.clone();
    tracker.spawn(
        async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "metrics accept failed");
                            continue;
                        }
                    },
                };
                let metrics = Arc::clone(&metrics);
                let ready = ready.clone();
                let shutdown = shutdown.clone();
                tracker2.spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let metrics = Arc::clone(&metrics);
                        let ready = *ready.borrow();
                        async move { Ok::<_, Infallible>(answer(req.uri().path(), &metrics, ready)) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = shutdown.cancelled() => {}
                    }
                });
            }
        }
        .instrument(tracing::info_span!("metrics")),
    );
}

fn answer(path: &str, metrics: &Metrics, ready: bool) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/ready" if ready => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "no config loaded yet\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_their_names() {
        let m = Metrics::new();
        m.requests.with_label_values(&["hr", "200", ""]).inc();
        m.bytes.with_label_values(&["in"]).inc_by(5);
        m.duration.with_label_values(&["hr"]).observe(0.01);
        m.tunnel_closes.with_label_values(&["revoked"]).inc();
        let text = m.render();
        for name in [
            "portico_edge_requests_total{app=\"hr\",code=\"\",status=\"200\"} 1",
            "portico_edge_bytes_total{direction=\"in\"} 5",
            "portico_edge_request_duration_seconds_bucket",
            "portico_edge_tunnels 0",
            "portico_edge_streams 0",
            "portico_edge_config_version 0",
            "portico_edge_tunnel_closes_total{reason=\"revoked\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert_eq!(
            answer("/ready", &m, false).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(answer("/ready", &m, true).status(), StatusCode::OK);
        assert_eq!(answer("/healthz", &m, false).status(), StatusCode::OK);
    }
}
