//! The edge's Prometheus metrics, in a registry of its own, served by
//! `portico_agent::ops` with `/healthz` and `/ready`.

use std::sync::Arc;

use portico_proto::{EdgeId, RegionId};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use tokio::sync::watch;

/// Every metric the edge exports.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) requests: IntCounterVec,
    pub(crate) duration: HistogramVec,
    pub(crate) tunnels: IntGauge,
    pub(crate) streams: IntGauge,
    /// `portico_edge_bytes_total{direction="in"}` and `{direction="out"}`,
    /// resolved once: the request path counts bytes without hashing labels.
    pub(crate) bytes_in: IntCounter,
    pub(crate) bytes_out: IntCounter,
    pub(crate) config_version: IntGauge,
    /// `portico_edge_draining`: 1 from SIGTERM until the edge stops.
    pub(crate) draining: IntGauge,
    /// `portico_edge_tunnel_closes_total{reason}`: every tunnel that
    /// ended, once, refused ones included (`too_many_tunnels`,
    /// `stream_limit`, `unresponsive`, ...).
    pub(crate) tunnel_closes: IntCounterVec,
    /// `portico_edge_tunnel_picks_total{shard="own"}` and `{shard="other"}`:
    /// whether a request's tunnel runs on the shard that serves the
    /// request (with more than one shard).
    pub(crate) picks_own_shard: IntCounter,
    pub(crate) picks_other_shard: IntCounter,
    /// Round trips of the edge's pings on the control streams.
    pub(crate) tunnel_rtt: Histogram,
    /// Tunnels that are suspect right now (left out of the pick set).
    pub(crate) tunnels_suspect: IntGauge,
    /// `portico_edge_tunnel_health_changes_total{to}`: `suspect`,
    /// `healthy` (a suspect tunnel answered again) and `dead` (closed).
    pub(crate) health_changes: IntCounterVec,
    /// `portico_edge_retries_total{reason}`: attempts made again on
    /// another upstream, `not_delivered` (nothing reached a backend) or
    /// `idempotent` (a GET, HEAD or OPTIONS whose tunnel died).
    pub(crate) retries: IntCounterVec,
    /// `portico_edge_connections`: user connections open (all protocols).
    pub(crate) connections: IntGauge,
    /// `portico_edge_connections_refused_total{cap}`: at the cap in total
    /// or for the client.
    pub(crate) conns_refused: IntCounterVec,
    /// `portico_edge_connection_closes_total{reason}`: connections the
    /// edge closed: `header_timeout`, `idle`, `resets`.
    pub(crate) conn_closes: IntCounterVec,
    /// `portico_edge_stalled_responses_total{reason}`: responses reset
    /// because the client stopped reading: `timeout` or `over_budget`.
    pub(crate) stalls: IntCounterVec,
    /// `portico_edge_tls_handshakes_total{result}` on the HTTPS listener:
    /// `full`, `resumed` (a session ticket spared the certificate and its
    /// signature) and `failed` (an error or the handshake timeout).
    /// `portico_edge_config_propagation_seconds`: from the router's store
    /// committing a config version to this edge receiving it.
    pub(crate) config_propagation: Histogram,
    /// `portico_edge_mesh_links`: mesh links this edge dialled, up now.
    pub(crate) mesh_links: IntGauge,
    /// `portico_edge_mesh_refused_total`: mesh handshakes refused (a
    /// certificate that is not an edge's, among others).
    pub(crate) mesh_refused: IntCounter,
    /// `portico_edge_mesh_served_total{result}`: requests other edges
    /// forwarded here, by the status or error code they got (`lost` when
    /// the stream failed before either).
    pub(crate) mesh_served: IntCounterVec,
    /// `portico_edge_mesh_forwarded_total`: requests this edge forwarded to
    /// another edge (attempts).
    pub(crate) mesh_forwarded: IntCounter,
    /// `portico_edge_certificate_expiry_timestamp_seconds{host,certificate}`:
    /// when each uploaded certificate expires (Unix time), per name it
    /// covers; alert on `... - time() < 14 * 86400`.
    pub(crate) certificate_expiry: IntGaugeVec,
    pub(crate) tls_full: IntCounter,
    pub(crate) tls_resumed: IntCounter,
    pub(crate) tls_failed: IntCounter,
}

impl Metrics {
    /// Sets the uploaded certificates' expiry gauges to `installed`, and
    /// removes those of certificates no longer installed.
    pub(crate) fn set_certificate_expiry(&self, installed: &[crate::certs::Uploaded]) {
        self.certificate_expiry.reset();
        for u in installed {
            for name in &u.names {
                self.certificate_expiry
                    .with_label_values(&[name.as_str(), u.id.as_str()])
                    .set(i64::try_from(u.not_after).unwrap_or(i64::MAX));
            }
        }
    }

    /// The metrics of edge `edge` of `region`, which
    /// `portico_edge_info{edge,region,version} 1` names.
    pub(crate) fn new(edge: &EdgeId, region: &RegionId) -> Self {
        let registry = Registry::new();
        let info = IntGaugeVec::new(
            Opts::new(
                "portico_edge_info",
                "This edge: its id, region and version (always 1)",
            ),
            &["edge", "region", "version"],
        )
        .expect("valid metric");
        info.with_label_values(&[edge.as_str(), region.as_str(), env!("CARGO_PKG_VERSION")])
            .set(1);
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
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "portico_edge_certificate_expiry_timestamp_seconds",
                "When each uploaded certificate (custom domains) expires, Unix time, per host name it covers",
            ),
            &["host", "certificate"],
        )
        .expect("valid metric");
        let draining = IntGauge::new(
            "portico_edge_draining",
            "1 while the edge drains (after SIGTERM): out of DNS and presence, refusing \
             new tunnels, still serving users for the drain delay",
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
        let picks = IntCounterVec::new(
            Opts::new(
                "portico_edge_tunnel_picks_total",
                "Tunnels picked for requests on an edge with shards: on the shard (thread) \
                 that serves the request, or on another one (its group has no usable \
                 tunnel on the request's shard)",
            ),
            &["shard"],
        )
        .expect("valid metric");
        let tunnel_rtt = Histogram::with_opts(
            HistogramOpts::new(
                "portico_edge_tunnel_rtt_seconds",
                "Round-trip time of the edge's pings on tunnel control streams",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .expect("valid metric");
        let tunnels_suspect = IntGauge::new(
            "portico_edge_tunnels_suspect",
            "Tunnels whose connector left a ping unanswered past its deadline",
        )
        .expect("valid metric");
        let health_changes = IntCounterVec::new(
            Opts::new(
                "portico_edge_tunnel_health_changes_total",
                "Tunnel health changes, by the state reached (suspect, healthy, dead)",
            ),
            &["to"],
        )
        .expect("valid metric");
        let retries = IntCounterVec::new(
            Opts::new(
                "portico_edge_retries_total",
                "Requests attempted again on another upstream, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let connections = IntGauge::new(
            "portico_edge_connections",
            "User connections open (HTTP/1.1, HTTP/2 and HTTP/3)",
        )
        .expect("valid metric");
        let conns_refused = IntCounterVec::new(
            Opts::new(
                "portico_edge_connections_refused_total",
                "User connections refused at a cap, by cap (total, per_client)",
            ),
            &["cap"],
        )
        .expect("valid metric");
        let conn_closes = IntCounterVec::new(
            Opts::new(
                "portico_edge_connection_closes_total",
                "User connections the edge closed, by reason (header_timeout, idle, resets)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let stalls = IntCounterVec::new(
            Opts::new(
                "portico_edge_stalled_responses_total",
                "Responses reset because their client stopped reading, by reason (timeout, over_budget)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let tls = IntCounterVec::new(
            Opts::new(
                "portico_edge_tls_handshakes_total",
                "TLS handshakes on the HTTPS listener, by result (full, resumed, failed)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let config_propagation = Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "portico_edge_config_propagation_seconds",
                "From the router's store committing a config version to this edge receiving it \
                 (across machines, includes their clock difference)",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("valid metric");
        let mesh_links = IntGauge::new(
            "portico_edge_mesh_links",
            "Mesh links to other edges this edge dialled, up now",
        )
        .expect("valid metric");
        let mesh_refused = IntCounter::new(
            "portico_edge_mesh_refused_total",
            "Mesh handshakes refused (for example a certificate that is not an edge's)",
        )
        .expect("valid metric");
        let mesh_served = IntCounterVec::new(
            Opts::new(
                "portico_edge_mesh_served_total",
                "Requests other edges forwarded to this one, by the status or error code                  they got (lost: the stream failed first)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let mesh_forwarded = IntCounter::new(
            "portico_edge_mesh_forwarded_total",
            "Attempts this edge forwarded to another edge over the mesh",
        )
        .expect("valid metric");
        for c in [
            Box::new(info) as Box<dyn prometheus::core::Collector>,
            Box::new(config_propagation.clone()),
            Box::new(mesh_links.clone()),
            Box::new(mesh_refused.clone()),
            Box::new(mesh_served.clone()),
            Box::new(mesh_forwarded.clone()),
            Box::new(tls.clone()),
            Box::new(requests.clone()),
            Box::new(duration.clone()),
            Box::new(tunnels.clone()),
            Box::new(streams.clone()),
            Box::new(bytes.clone()),
            Box::new(config_version.clone()),
            Box::new(draining.clone()),
            Box::new(certificate_expiry.clone()),
            Box::new(tunnel_closes.clone()),
            Box::new(picks.clone()),
            Box::new(tunnel_rtt.clone()),
            Box::new(tunnels_suspect.clone()),
            Box::new(health_changes.clone()),
            Box::new(retries.clone()),
            Box::new(connections.clone()),
            Box::new(conns_refused.clone()),
            Box::new(conn_closes.clone()),
            Box::new(stalls.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            duration,
            tunnels,
            streams,
            bytes_in: bytes.with_label_values(&["in"]),
            bytes_out: bytes.with_label_values(&["out"]),
            config_version,
            certificate_expiry,
            draining,
            tunnel_closes,
            picks_own_shard: picks.with_label_values(&["own"]),
            picks_other_shard: picks.with_label_values(&["other"]),
            tunnel_rtt,
            tunnels_suspect,
            health_changes,
            retries,
            connections,
            conns_refused,
            conn_closes,
            stalls,
            config_propagation,
            mesh_links,
            mesh_refused,
            mesh_served,
            mesh_forwarded,
            tls_full: tls.with_label_values(&["full"]),
            tls_resumed: tls.with_label_values(&["resumed"]),
            tls_failed: tls.with_label_values(&["failed"]),
        }
    }

    #[cfg(test)]
    pub(crate) fn render(&self) -> String {
        portico_agent::ops::render(&self.registry)
    }
}

/// `/ready` answers 200 while `ready` holds true: a config is loaded and
/// shutdown has not begun.
pub(crate) fn readiness(ready: watch::Receiver<bool>) -> portico_agent::ops::Readiness {
    Arc::new(move || {
        if *ready.borrow() {
            Ok("config loaded".to_owned())
        } else {
            Err("no config loaded yet, or shutting down".to_owned())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_their_names() {
        let m = Metrics::new(
            &EdgeId::new("e-1").unwrap(),
            &RegionId::new("eu-west").unwrap(),
        );
        m.requests.with_label_values(&["hr", "200", ""]).inc();
        m.bytes_in.inc_by(5);
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
            "portico_edge_tunnel_rtt_seconds_bucket",
            "portico_edge_tunnels_suspect 0",
            "portico_edge_tls_handshakes_total{result=\"resumed\"} 0",
            &format!(
                "portico_edge_info{{edge=\"e-1\",region=\"eu-west\",version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        let (tx, rx) = watch::channel(false);
        let ready = readiness(rx);
        let answer = |path| portico_agent::ops::answer(path, &m.registry, &ready).status();
        assert_eq!(answer("/ready"), hyper::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer("/healthz"), hyper::StatusCode::OK);
        tx.send_replace(true);
        assert_eq!(answer("/ready"), hyper::StatusCode::OK);
    }
}
