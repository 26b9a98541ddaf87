//! The connector's Prometheus metrics, in a registry of its own, served by
//! `portico_agent::ops` with `/healthz` and `/ready`.

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

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
    /// `bytes{direction="in"}` and `{direction="out"}`, resolved once: the
    /// request path counts bytes without hashing labels.
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    /// Control-stream ping round trips.
    pub tunnel_rtt: Histogram,
    /// Backend connections open, idle ones included, by app.
    pub backend_connections: IntGaugeVec,
    /// Dials that found the app's cap or the connector's budget full and
    /// waited, by app and `outcome`: `connected` (a permit came free) or
    /// `busy` (none did within the wait; the request got `BackendBusy`
    /// unless an idle connection reached it first).
    pub backend_waits: IntCounterVec,
    /// Streams served, by shard (the thread whose runtime served them).
    pub shard_streams: IntCounterVec,
    /// Each region's RTT as the region chooser scores it (the windowed
    /// minimum of its best two edges); absent while unmeasured.
    pub region_rtt: GaugeVec,
    /// 1 for the home region (info style: one series).
    pub home_region: IntGaugeVec,
    /// Changes of home region, by `cause` (`nearer`, `home_gone`,
    /// `home_lost`, `pinned`).
    pub region_moves: IntCounterVec,
    /// 1 while fewer than two edges of the home region are usable.
    pub region_degraded: IntGauge,
    /// RTT probes sent, by `result` (`ok`, `lost`).
    pub region_probes: IntCounterVec,
    /// Resolutions of tunnel endpoint names (cache hits left out), by
    /// `result`: `ok`, `loop`, `too_deep`, `nxdomain`, `no_addresses`,
    /// `failed` (no answer), `invalid_name`, `no_nameserver`.
    pub dns_resolutions: IntCounterVec,
    /// CNAME hops of each successful resolution.
    pub dns_chain_length: Histogram,
    /// Resolutions that failed and were answered with the last good answer
    /// (this process's, or the one saved in the state directory).
    pub dns_saved_answers: IntCounter,
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
        let backend_connections = IntGaugeVec::new(
            Opts::new(
                "portico_connector_backend_connections",
                "Backend connections open, idle ones included",
            ),
            &["app"],
        )?;
        let backend_waits = IntCounterVec::new(
            Opts::new(
                "portico_connector_backend_connection_waits_total",
                "Backend dials that waited for a free connection at a cap",
            ),
            &["app", "outcome"],
        )?;
        let shard_streams = IntCounterVec::new(
            Opts::new(
                "portico_connector_shard_streams_total",
                "Streams served, by shard (single-thread runtime)",
            ),
            &["shard"],
        )?;
        let region_rtt = GaugeVec::new(
            Opts::new(
                "portico_connector_region_rtt_seconds",
                "Round-trip time to each region: the minimum over the window of its best two edges",
            ),
            &["region"],
        )?;
        let home_region = IntGaugeVec::new(
            Opts::new(
                "portico_connector_home_region",
                "The region this connector's tunnels go to (1)",
            ),
            &["region"],
        )?;
        let region_moves = IntCounterVec::new(
            Opts::new(
                "portico_connector_region_moves_total",
                "Changes of home region, by cause",
            ),
            &["cause"],
        )?;
        let region_degraded = IntGauge::new(
            "portico_connector_region_degraded",
            "1 while fewer than two edges of the home region are usable",
        )?;
        let region_probes = IntCounterVec::new(
            Opts::new(
                "portico_connector_region_probes_total",
                "RTT probes of edges, by result",
            ),
            &["result"],
        )?;
        let dns_resolutions = IntCounterVec::new(
            Opts::new(
                "portico_connector_dns_resolutions_total",
                "Resolutions of tunnel endpoint names, by result",
            ),
            &["result"],
        )?;
        let dns_chain_length = Histogram::with_opts(
            HistogramOpts::new(
                "portico_connector_dns_chain_length",
                "CNAME hops followed by each successful resolution",
            )
            .buckets(vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]),
        )?;
        let dns_saved_answers = IntCounter::new(
            "portico_connector_dns_saved_answers_total",
            "Failed resolutions answered with the last good answer",
        )?;
        registry.register(Box::new(dns_resolutions.clone()))?;
        registry.register(Box::new(dns_chain_length.clone()))?;
        registry.register(Box::new(dns_saved_answers.clone()))?;
        for cause in ["nearer", "home_gone", "home_lost", "pinned"] {
            region_moves.with_label_values(&[cause]);
        }
        registry.register(Box::new(region_rtt.clone()))?;
        registry.register(Box::new(home_region.clone()))?;
        registry.register(Box::new(region_moves.clone()))?;
        registry.register(Box::new(region_degraded.clone()))?;
        registry.register(Box::new(region_probes.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(shard_streams.clone()))?;
        registry.register(Box::new(backend_connections.clone()))?;
        registry.register(Box::new(backend_waits.clone()))?;
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
            bytes_in: bytes.with_label_values(&["in"]),
            bytes_out: bytes.with_label_values(&["out"]),
            bytes,
            tunnel_rtt,
            backend_connections,
            backend_waits,
            shard_streams,
            region_rtt,
            home_region,
            region_moves,
            region_degraded,
            region_probes,
            dns_resolutions,
            dns_chain_length,
            dns_saved_answers,
        })
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        portico_agent::ops::render(&self.registry)
    }

    /// Ready once at least one tunnel is up.
    pub(crate) fn readiness(&self) -> portico_agent::ops::Readiness {
        let tunnels = self.tunnels.clone();
        std::sync::Arc::new(move || match tunnels.get() {
            0 => Err("no tunnel up".to_owned()),
            up => Ok(format!("{up} tunnels up")),
        })
    }
}
