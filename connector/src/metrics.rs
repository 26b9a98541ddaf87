//! The connector's Prometheus metrics (its own registry) and the plain HTTP
//! listener serving `/metrics`, `/healthz` and `/ready`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::error::Error;

/// Every metric the connector exports.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// Streams answered, by app (empty when unknown), HTTP status and error
    /// code (empty when none), as the edge labels its requests.
    pub requests: IntCounterVec,
    /// Time from sending a request to the backend until its response head.
    pub backend_duration: HistogramVec,
    /// Tunnels up (welcomed and not draining).
    pub tunnels: IntGauge,
    /// Streams in flight.
    pub streams: IntGauge,
    /// Body bytes proxied, `direction` = `in` (request bytes, edge →
    /// backend) or `out` (response bytes, backend → edge), as on the edge.
    pub bytes: IntCounterVec,
    /// Control-stream ping round trips.
    pub tunnel_rtt: Histogram,
}

impl Metrics {
    pub fn new() -> Result<Metrics, Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "portico_connector_requests_total",
                "Streams answered by the connector",
            ),
            &["app", "status", "code"],
        )?;
        let backend_duration = HistogramVec::new(
            HistogramOpts::new(
                "portico_connector_backend_duration_seconds",
                "Time until the backend's response head",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                90.0,
            ]),
            &["app"],
        )?;
        let tunnels = IntGauge::new("portico_connector_tunnels", "Tunnels up")?;
        let streams = IntGauge::new("portico_connector_streams", "Streams in flight")?;
        let bytes = IntCounterVec::new(
            Opts::new("portico_connector_bytes_total", "Body bytes proxied"),
            &["direction"],
        )?;
        let tunnel_rtt = Histogram::with_opts(
            HistogramOpts::new(
                "portico_connector_tunnel_rtt_seconds",
                "Control stream ping round-trip time",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(backend_duration.clone()))?;
        registry.register(Box::new(tunnels.clone()))?;
        registry.register(Box::new(streams.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(tunnel_rtt.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            backend_duration,
            tunnels,
            streams,
            bytes,
            tunnel_rtt,
        })
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Binds the metrics listener and serves it until `shutdown`.
pub(crate) async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind {
            what: "metrics listener",
            addr,
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| Error::Bind {
        what: "metrics listener",
        addr,
        source,
    })?;
    tracing::info!(addr = %bound, "metrics listening");
    let metrics = Arc::new(metrics);
    let conns = tracker.clone();
    tracker.spawn(
        async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "metrics accept failed");
                            tokio::select! {
                                _ = shutdown.cancelled() => break,
                                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                            }
                        }
                    },
                };
                let metrics = metrics.clone();
                let shutdown = shutdown.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let metrics = metrics.clone();
                        async move { Ok::<_, Infallible>(answer(req.uri().path(), &metrics)) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(tcp), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "metrics connection"); },
                        _ = shutdown.cancelled() => {}
                    }
                });
            }
        }
        .instrument(tracing::info_span!("metrics", addr = %bound)),
    );
    Ok(bound)
}

fn answer(path: &str, metrics: &Metrics) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, ctype: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ctype),
        );
        r
    };
    match path {
        "/metrics" => text(
            StatusCode::OK,
            metrics.render(),
            "text/plain; version=0.0.4",
        ),
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/ready" => {
            let up = metrics.tunnels.get();
            if up > 0 {
                text(
                    StatusCode::OK,
                    format!("ready: {up} tunnels up\n"),
                    "text/plain",
                )
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no tunnel up\n".into(),
                    "text/plain",
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}
