//! The router's Prometheus metrics, in a registry of its own.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::error::Error;

/// Every metric the router exports.
#[derive(Clone)]
pub(crate) struct Metrics {
    pub registry: Registry,
    pub api_requests: IntCounterVec,
    pub config_version: IntGauge,
    pub connectors: IntGaugeVec,
    pub edges: IntGaugeVec,
    /// `portico_router_region_edges{region,status}`: every region, with
    /// its (not deleted) edges by status.
    pub region_edges: IntGaugeVec,
    /// The regions `region_edges` has series for, so that a deleted
    /// region's are removed.
    pub regions_shown: Arc<Mutex<BTreeSet<String>>>,
    pub enrollments: IntCounterVec,
    pub long_polls: IntGauge,
    /// `portico_router_dns_queries_total{rcode}`: queries the DNS
    /// authority answered, by response code.
    pub dns_queries: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, Error> {
        let registry = Registry::new();
        let api_requests = IntCounterVec::new(
            Opts::new(
                "portico_router_api_requests_total",
                "Router API requests, by route and HTTP status",
            ),
            &["route", "status"],
        )?;
        let config_version = IntGauge::new(
            "portico_router_config_version",
            "The current config version",
        )?;
        let connectors = IntGaugeVec::new(
            Opts::new(
                "portico_router_connectors",
                "Enrolled connectors, by status",
            ),
            &["status"],
        )?;
        let edges = IntGaugeVec::new(
            Opts::new("portico_router_edges", "Enrolled edges, by status"),
            &["status"],
        )?;
        let region_edges = IntGaugeVec::new(
            Opts::new(
                "portico_router_region_edges",
                "Enrolled edges of each region, by status (active, inactive)",
            ),
            &["region", "status"],
        )?;
        let enrollments = IntCounterVec::new(
            Opts::new(
                "portico_router_enrollments_total",
                "Enrollment attempts, by kind (connector, edge, unknown) and result",
            ),
            &["kind", "result"],
        )?;
        let long_polls = IntGauge::new(
            "portico_router_long_polls",
            "Config long-polls waiting for a change",
        )?;
        let dns_queries = IntCounterVec::new(
            Opts::new(
                "portico_router_dns_queries_total",
                "DNS queries answered, by response code (noerror, nxdomain, refused, formerr, \
                 notimp, servfail, badvers, other; unsent: the answer could not be sent)",
            ),
            &["rcode"],
        )?;
        registry.register(Box::new(api_requests.clone()))?;
        registry.register(Box::new(dns_queries.clone()))?;
        registry.register(Box::new(long_polls.clone()))?;
        registry.register(Box::new(config_version.clone()))?;
        registry.register(Box::new(connectors.clone()))?;
        registry.register(Box::new(edges.clone()))?;
        registry.register(Box::new(region_edges.clone()))?;
        registry.register(Box::new(enrollments.clone()))?;
        Ok(Metrics {
            registry,
            api_requests,
            config_version,
            connectors,
            edges,
            region_edges,
            regions_shown: Arc::default(),
            enrollments,
            long_polls,
            dns_queries,
        })
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}
