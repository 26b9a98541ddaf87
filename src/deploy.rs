//! `portico loadtest deploy`: one command that starts a whole Portico
//! deployment on this machine — a router, N edges, M connectors, demo
//! backends published as apps `app0..`, and a WAN emulator path in front of
//! every edge's tunnel port — from a deployment file, runs the load scenario in it
//! (with chaos actions acting on this deployment), writes the report and
//! stops everything.
//!
//! A deployment file is a loadtest scenario (the loadtest crate's [`Scenario`]
//! format, unchanged) with two extra tables:
//!
//! ```toml
//! [deployment]
//! edges = 2                  # edges in the one region
//! connectors = 2             # connectors in group Default
//! tunnels_per_connector = 2
//! backends = 1               # demo backends, published as app0..app{N-1}
//! startup_timeout = "30s"    # everything up and routing within this
//!
//! [wan]                      # each edge's tunnel port gets a relay in front
//! delay = "20ms"             # one-way, both directions
//! jitter = "1ms"
//! loss = 0.001
//!
//! mode = "open"              # ... the scenario, as for `portico loadtest`
//! rate = 200
//! duration = "5s"
//! [[requests]]
//! url = "https://app0/"      # app name; expanded to every edge
//! ```
//!
//! A request URL whose host is `appN` or `appN.apps.localhost` and that has
//! no port is expanded into one request per edge
//! (`https://appN.apps.localhost:<edge port>/...`, same weight), so the load
//! is spread evenly over the edges. Other URLs are left alone. The router's
//! CA is trusted unless the scenario sets `cacert` or `insecure`.
//!
//! Chaos targets: `connector`, `edge` and `router` with `instance` (0-based;
//! all instances when unset) for kill and restart (a restart keeps the
//! state directory and the addresses); WAN paths `edge0`, `edge1`, … (also
//! `wan0`…, a bare index, or `*`/`all`) for blackhole and unblackhole.
//!
//! Each edge's relay port is reserved by binding a UDP socket on port 0 and
//! closing it before the edge starts (the edge must advertise the relay's
//! address, and a relay needs its target up front). Another process could
//! take the port in between; the start is then retried with a new port.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use portico_agent::{RouterClient, RouterTrust};
use portico_loadtest::chaos::{Chaos, ChaosAction, ChaosFuture, ChaosVerb, Component};
use portico_loadtest::wan::{self, Impairment, PathConfig, PathStats};
use portico_loadtest::{ChaosError, Report, RequestSpec, RunOptions, Scenario, ScenarioError};
use portico_proto::api::TokenScope;
use portico_proto::{GroupId, RegionId};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::demo;
use crate::dev::{create_token, publish, DEV_APPS_DOMAIN};

const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
/// Most edges, connectors or backends a deployment may ask for.
pub const MAX_INSTANCES: usize = 32;
/// How long a killed part may take to stop before it is abandoned.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a restart may take to bind its old addresses again.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a restarted part may take to be up again (tunnels, config).
const RECOVER_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts at reserving a relay port that nobody takes in between.
const RELAY_ATTEMPTS: usize = 3;

/// The `[deployment]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// Edges, all in the default region.
    #[serde(default = "two")]
    pub edges: usize,
    /// Connectors, all in group Default.
    #[serde(default = "two")]
    pub connectors: usize,
    /// Tunnels each connector keeps (spread over the edges).
    #[serde(default = "two")]
    pub tunnels_per_connector: usize,
    /// Demo backends, published as apps `app0..app{N-1}`.
    #[serde(default = "one")]
    pub backends: usize,
    /// Everything must be up and routing within this.
    #[serde(default = "default_startup", with = "humantime_serde")]
    pub startup_timeout: Duration,
}

fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn default_startup() -> Duration {
    Duration::from_secs(30)
}

impl Default for DeploymentSpec {
    fn default() -> Self {
        DeploymentSpec {
            edges: 2,
            connectors: 2,
            tunnels_per_connector: 2,
            backends: 1,
            startup_timeout: default_startup(),
        }
    }
}

/// The `[wan]` table: the impairment of every connector↔edge path, the
/// same in both directions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WanSpec {
    /// One-way delay, e.g. "20ms".
    #[serde(default, with = "humantime_serde")]
    pub delay: Duration,
    /// Uniform jitter around the delay.
    #[serde(default, with = "humantime_serde")]
    pub jitter: Duration,
    /// Loss probability (0..=1).
    #[serde(default)]
    pub loss: f64,
    /// Loss burstiness (0..1).
    #[serde(default)]
    pub loss_correlation: f64,
    /// Reordering probability (0..=1).
    #[serde(default)]
    pub reorder: f64,
    /// Duplication probability (0..=1).
    #[serde(default)]
    pub duplicate: f64,
    /// Bandwidth cap, e.g. "100mbit".
    #[serde(default)]
    pub rate: Option<String>,
    /// Largest UDP payload passed (bytes).
    #[serde(default)]
    pub mtu: Option<usize>,
    /// RNG seed (random when unset).
    #[serde(default)]
    pub seed: Option<u64>,
}

impl WanSpec {
    /// The impairment it describes, checked.
    pub fn impairment(&self) -> Result<Impairment, DeployError> {
        let rate_bps = match &self.rate {
            Some(r) => Some(wan::parse_rate(r).map_err(|e| DeployError::invalid("wan.rate", e))?),
            None => None,
        };
        let imp = Impairment {
            delay: self.delay,
            jitter: self.jitter,
            loss: self.loss,
            loss_correlation: self.loss_correlation,
            reorder: self.reorder,
            duplicate: self.duplicate,
            rate_bps,
            mtu: self.mtu,
            ..Impairment::none()
        };
        imp.validate().map_err(|e| DeployError::invalid("wan", e))?;
        Ok(imp)
    }
}

/// A parsed and checked deployment file.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployFile {
    pub deployment: DeploymentSpec,
    pub wan: WanSpec,
    /// The load, with app names not yet expanded to edges.
    pub load: Scenario,
}

/// A deployment file that cannot be used. Every variant names the field or table.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeployError {
    #[error("cannot read deployment file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid deployment file TOML")]
    Toml {
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid [{table}] table")]
    Table {
        table: &'static str,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("`{field}` is invalid: {reason}")]
    Invalid { field: String, reason: String },
    #[error("invalid load scenario")]
    Scenario {
        #[source]
        source: ScenarioError,
    },
    #[error("there is no {component} {instance} (the deployment has {count})")]
    NoSuchInstance {
        component: &'static str,
        instance: usize,
        count: usize,
    },
    #[error("there is no WAN path `{path}` (they are edge0..edge{last}, or `*`)")]
    NoSuchPath { path: String, last: usize },
}

impl DeployError {
    fn invalid(field: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        DeployError::Invalid {
            field: field.into(),
            reason: reason.to_string(),
        }
    }
}

impl DeployFile {
    /// Reads and checks a deployment file.
    pub fn load(path: &Path) -> Result<DeployFile, DeployError> {
        let text = std::fs::read_to_string(path).map_err(|source| DeployError::Read {
            path: path.to_owned(),
            source,
        })?;
        DeployFile::from_toml(&text)
    }

    /// Parses and checks deployment TOML.
    pub fn from_toml(text: &str) -> Result<DeployFile, DeployError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| DeployError::Toml {
            source: Box::new(e),
        })?;
        let deployment: DeploymentSpec = match table.remove("deployment") {
            Some(v) => v.try_into().map_err(|e| DeployError::Table {
                table: "deployment",
                source: Box::new(e),
            })?,
            None => DeploymentSpec::default(),
        };
        let wan: WanSpec = match table.remove("wan") {
            Some(v) => v.try_into().map_err(|e| DeployError::Table {
                table: "wan",
                source: Box::new(e),
            })?,
            None => WanSpec::default(),
        };
        let rest = toml::to_string(&table).map_err(|e| DeployError::invalid("load", e))?;
        let load = Scenario::from_toml(&rest).map_err(|source| DeployError::Scenario { source })?;
        let file = DeployFile {
            deployment,
            wan,
            load,
        };
        file.validate()?;
        Ok(file)
    }

    /// Checks the deployment, the WAN and the app names of the requests.
    pub fn validate(&self) -> Result<(), DeployError> {
        let d = &self.deployment;
        for (field, v, max) in [
            ("deployment.edges", d.edges, MAX_INSTANCES),
            ("deployment.connectors", d.connectors, MAX_INSTANCES),
            ("deployment.backends", d.backends, MAX_INSTANCES),
            (
                "deployment.tunnels_per_connector",
                d.tunnels_per_connector,
                portico_connector::MAX_TUNNELS,
            ),
        ] {
            if v == 0 || v > max {
                return Err(DeployError::invalid(
                    field,
                    format!("{v} is out of range (1..={max})"),
                ));
            }
        }
        if d.startup_timeout.is_zero() {
            return Err(DeployError::invalid(
                "deployment.startup_timeout",
                "must be above 0",
            ));
        }
        self.wan.impairment()?;
        let mut s = self.load.clone();
        expand_requests(&mut s, &[1], d.backends)?;
        Ok(())
    }
}

/// The app a request URL names (`appN` or `appN.apps.localhost`, no port).
fn app_of(url: &url::Url) -> Option<String> {
    if url.port().is_some() {
        return None;
    }
    let host = url.host_str()?;
    let app = match host.strip_suffix(&format!(".{DEV_APPS_DOMAIN}")) {
        Some(a) => a,
        None if !host.contains('.') && host != "localhost" => host,
        None => return None,
    };
    Some(app.to_owned())
}

/// Expands requests that name an app into one request per edge port.
fn expand_requests(s: &mut Scenario, ports: &[u16], backends: usize) -> Result<(), DeployError> {
    let mut out = Vec::with_capacity(s.requests.len() * ports.len());
    for (i, r) in s.requests.iter().enumerate() {
        let field = format!("requests[{i}].url");
        let url = url::Url::parse(&r.url).map_err(|e| DeployError::invalid(&field, e))?;
        let Some(app) = app_of(&url) else {
            out.push(r.clone());
            continue;
        };
        let n = app
            .strip_prefix("app")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n < backends);
        if n.is_none() {
            return Err(DeployError::invalid(
                field,
                format!(
                    "the deployment publishes apps app0..app{} (deployment.backends = {backends}), not `{app}`",
                    backends - 1
                ),
            ));
        }
        for port in ports {
            let mut u = url.clone();
            u.set_host(Some(&format!("{app}.{DEV_APPS_DOMAIN}")))
                .map_err(|e| DeployError::invalid(&field, e))?;
            u.set_port(Some(*port))
                .map_err(|()| DeployError::invalid(&field, "cannot take a port"))?;
            out.push(RequestSpec {
                url: u.to_string(),
                ..r.clone()
            });
        }
    }
    s.requests = out;
    Ok(())
}

/// A part of the deployment that can be stopped and awaited.
trait Stoppable: Send + 'static {
    fn stopped(self) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
}

impl Stoppable for portico_router::Handle {
    fn stopped(self) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> {
        Box::pin(async move { Ok(self.wait().await?) })
    }
}
impl Stoppable for portico_edge::Handle {
    fn stopped(self) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> {
        Box::pin(async move { Ok(self.wait().await?) })
    }
}
impl Stoppable for portico_connector::Handle {
    fn stopped(self) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> {
        Box::pin(async move { Ok(self.wait().await?) })
    }
}

/// One running (or killed) part and the token that stops it.
struct Part<H> {
    handle: Option<H>,
    stop: CancellationToken,
}

impl<H: Stoppable> Part<H> {
    fn new(handle: H, stop: CancellationToken) -> Self {
        Part {
            handle: Some(handle),
            stop,
        }
    }

    /// Stops the part (if running) and waits, bounded, for it to be gone.
    async fn kill(&mut self, what: &str) {
        let Some(h) = self.handle.take() else {
            return;
        };
        self.stop.cancel();
        match tokio::time::timeout(STOP_TIMEOUT, h.stopped()).await {
            Ok(Ok(())) => info!(part = what, "stopped"),
            Ok(Err(e)) => {
                warn!(part = what, error = %portico_agent::error_chain(e.as_ref()), "stopped with an error")
            }
            Err(_) => warn!(
                part = what,
                "did not stop within {STOP_TIMEOUT:?}; abandoned"
            ),
        }
    }
}

/// Where an edge lives; kept across restarts.
#[derive(Debug, Clone, Copy)]
pub struct EdgeAddrs {
    /// HTTPS (TCP) and HTTP/3 (UDP) for users.
    pub public: SocketAddr,
    /// The edge's own QUIC tunnel port (the relay's target).
    pub tunnel: SocketAddr,
    /// The relay in front of it, which the edge advertises to connectors.
    pub relay: SocketAddr,
}

/// A running deployment. Implements [`Chaos`].
pub struct Deploy {
    data: PathBuf,
    spec: DeploymentSpec,
    root: CancellationToken,
    router_addr: SocketAddr,
    router_url: String,
    router: Mutex<Part<portico_router::Handle>>,
    edge_addrs: Vec<EdgeAddrs>,
    edges: Vec<Mutex<Part<portico_edge::Handle>>>,
    connectors: Vec<Mutex<Part<portico_connector::Handle>>>,
    paths: std::sync::Mutex<Vec<wan::Path>>,
    demos: std::sync::Mutex<Vec<demo::Demo>>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn has_credentials(state: &Path) -> bool {
    state.join("credentials.json").exists()
}

impl Deploy {
    /// Starts the whole deployment under `data` (reused if present) and
    /// returns once every connector has its tunnels up and every edge
    /// routes every app, or fails after `deployment.startup_timeout`.
    pub async fn start(data: &Path, file: &DeployFile) -> anyhow::Result<Deploy> {
        let spec = file.deployment.clone();
        let deadline = Instant::now() + spec.startup_timeout;
        let root = CancellationToken::new();
        tokio::time::timeout_at(deadline, Deploy::start_inner(data, file, root.clone()))
            .await
            .map_err(|_| {
                // Whatever had started stops (not awaited: it was abandoned).
                root.cancel();
                anyhow::anyhow!(
                    "the deployment was not up within deployment.startup_timeout = {:?}",
                    spec.startup_timeout
                )
            })?
    }

    async fn start_inner(
        data: &Path,
        file: &DeployFile,
        root: CancellationToken,
    ) -> anyhow::Result<Deploy> {
        let spec = file.deployment.clone();
        let imp = file.wan.impairment()?;
        let router_stop = root.child_token();
        let router = start_router(data, LOOPBACK, router_stop.clone()).await?;
        let router_addr = router.api_addr;
        let router_url = router.url();
        let admin =
            RouterClient::new(&router_url, RouterTrust::CaPem(router.ca_pem.clone()), None)?
                .with_bearer(router.admin_token());
        let mut deploy = Deploy {
            data: data.to_owned(),
            spec: spec.clone(),
            root: root.clone(),
            router_addr,
            router_url,
            router: Mutex::new(Part::new(router, router_stop)),
            edge_addrs: Vec::new(),
            edges: Vec::new(),
            connectors: Vec::new(),
            paths: std::sync::Mutex::new(Vec::new()),
            demos: std::sync::Mutex::new(Vec::new()),
        };
        // From here on, a failure stops what has started.
        match deploy.start_rest(&admin, &imp, file.wan.seed).await {
            Ok(()) => Ok(deploy),
            Err(e) => {
                deploy.stop().await;
                Err(e)
            }
        }
    }

    async fn start_rest(
        &mut self,
        admin: &RouterClient,
        imp: &Impairment,
        seed: Option<u64>,
    ) -> anyhow::Result<()> {
        let spec = self.spec.clone();
        for i in 0..spec.backends {
            let d = demo::start(LOOPBACK, self.root.child_token())
                .await
                .with_context(|| format!("demo backend {i} failed to start"))?;
            publish(
                admin,
                &format!("app{i}"),
                &format!("http://{}/", d.addr),
                GroupId::default_group(),
            )
            .await?;
            lock(&self.demos).push(d);
        }
        for i in 0..spec.edges {
            let state = self.data.join(format!("edge{i}"));
            let mut attempt = 0;
            loop {
                attempt += 1;
                let relay = reserve_udp_port()?;
                let token = if has_credentials(&state) {
                    None
                } else {
                    Some(
                        create_token(
                            admin,
                            TokenScope::Edge {
                                region: RegionId::default_region(),
                            },
                        )
                        .await?,
                    )
                };
                let stop = self.root.child_token();
                let edge = start_edge(
                    &self.router_url,
                    &state,
                    token,
                    LOOPBACK,
                    LOOPBACK,
                    relay,
                    stop.clone(),
                )
                .await
                .with_context(|| format!("edge {i} failed to start"))?;
                let mut pc = PathConfig::new(relay, edge.tunnel_addr).symmetric(imp.clone());
                pc.seed = seed.map(|s| s.wrapping_add(i as u64));
                let addrs = EdgeAddrs {
                    public: edge.public_addr,
                    tunnel: edge.tunnel_addr,
                    relay,
                };
                let mut part = Part::new(edge, stop);
                match wan::start(pc, self.root.child_token()).await {
                    Ok(path) => {
                        info!(edge = i, public = %addrs.public, tunnel = %addrs.tunnel, relay = %addrs.relay, "edge and WAN path up");
                        lock(&self.paths).push(path);
                        self.edge_addrs.push(addrs);
                        self.edges.push(Mutex::new(part));
                        break;
                    }
                    Err(e) if attempt < RELAY_ATTEMPTS => {
                        warn!(edge = i, error = %portico_agent::error_chain(&e), "relay port taken in the meantime; retrying");
                        part.kill(&format!("edge{i}")).await;
                    }
                    Err(e) => {
                        part.kill(&format!("edge{i}")).await;
                        return Err(e).context(format!("WAN path of edge {i}"));
                    }
                }
            }
        }
        for i in 0..spec.connectors {
            let state = self.data.join(format!("connector{i}"));
            let token = if has_credentials(&state) {
                None
            } else {
                Some(
                    create_token(
                        admin,
                        TokenScope::Connector {
                            group: GroupId::default_group(),
                        },
                    )
                    .await?,
                )
            };
            let stop = self.root.child_token();
            let c = start_connector(
                &self.router_url,
                &state,
                token,
                spec.tunnels_per_connector,
                stop.clone(),
            )
            .await
            .with_context(|| format!("connector {i} failed to start"))?;
            self.connectors.push(Mutex::new(Part::new(c, stop)));
        }
        for (i, c) in self.connectors.iter().enumerate() {
            let part = c.lock().await;
            if let Some(h) = &part.handle {
                h.wait_tunnels(spec.tunnels_per_connector).await;
                info!(connector = i, tunnels = h.tunnel_count(), "connector up");
            }
        }
        for e in &self.edges {
            if let Some(h) = &e.lock().await.handle {
                h.ready().await;
            }
        }
        self.wait_routing().await
    }

    /// Polls every app through every edge until each answers 200, with
    /// one-request runs of the load generator.
    async fn wait_routing(&self) -> anyhow::Result<()> {
        let mut all = Scenario::default();
        for app in 0..self.spec.backends {
            all.requests
                .push(RequestSpec::get(format!("https://app{app}/")));
        }
        let ports: Vec<u16> = self.edge_addrs.iter().map(|a| a.public.port()).collect();
        expand_requests(&mut all, &ports, self.spec.backends)?;
        for r in all.requests {
            let probe = Scenario {
                mode: portico_loadtest::Mode::Closed,
                concurrency: Some(1),
                count: Some(1),
                timeout: Duration::from_secs(2),
                cacert: Some(self.ca_path()),
                requests: vec![r.clone()],
                ..Scenario::default()
            };
            loop {
                let report =
                    portico_loadtest::run_scenario(probe.clone(), None, self.root.child_token())
                        .await?;
                if report.requests.ok == 1 {
                    break;
                }
                tracing::debug!(url = %r.url, status = ?report.status, "not routing yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// The router CA (trusted by the load generator).
    pub fn ca_path(&self) -> PathBuf {
        self.data.join("router").join("ca.pem")
    }

    /// The router's API URL.
    pub fn router_url(&self) -> &str {
        &self.router_url
    }

    /// Every edge's addresses, by index.
    pub fn edges(&self) -> &[EdgeAddrs] {
        &self.edge_addrs
    }

    /// Counters of every WAN path, by edge index.
    pub fn path_stats(&self) -> Vec<PathStats> {
        lock(&self.paths).iter().map(wan::Path::stats).collect()
    }

    /// The load scenario made concrete for this deployment: app names expanded to
    /// every edge's public port, the router's CA trusted.
    pub fn scenario(&self, load: &Scenario) -> Result<Scenario, DeployError> {
        let mut s = load.clone();
        let ports: Vec<u16> = self.edge_addrs.iter().map(|a| a.public.port()).collect();
        expand_requests(&mut s, &ports, self.spec.backends)?;
        if !s.insecure && s.cacert.is_none() {
            s.cacert = Some(self.ca_path());
        }
        s.validate()
            .map_err(|source| DeployError::Scenario { source })?;
        Ok(s)
    }

    /// Stops everything, connectors first; bounded.
    pub async fn stop(&self) {
        for (i, c) in self.connectors.iter().enumerate() {
            c.lock().await.kill(&format!("connector{i}")).await;
        }
        for (i, e) in self.edges.iter().enumerate() {
            e.lock().await.kill(&format!("edge{i}")).await;
        }
        self.router.lock().await.kill("router").await;
        self.root.cancel();
        let demos: Vec<demo::Demo> = lock(&self.demos).drain(..).collect();
        for d in demos {
            let _ = tokio::time::timeout(STOP_TIMEOUT, d.wait()).await;
        }
        let paths: Vec<wan::Path> = lock(&self.paths).drain(..).collect();
        for p in paths {
            let _ = tokio::time::timeout(STOP_TIMEOUT, p.shutdown()).await;
        }
    }

    fn instances(
        &self,
        component: &'static str,
        instance: Option<usize>,
        count: usize,
    ) -> Result<Vec<usize>, DeployError> {
        match instance {
            None => Ok((0..count).collect()),
            Some(i) if i < count => Ok(vec![i]),
            Some(i) => Err(DeployError::NoSuchInstance {
                component,
                instance: i,
                count,
            }),
        }
    }

    fn path_indices(&self, name: &str) -> Result<Vec<usize>, DeployError> {
        let n = self.edge_addrs.len();
        if name == "*" || name == "all" {
            return Ok((0..n).collect());
        }
        let idx = name
            .strip_prefix("edge")
            .or_else(|| name.strip_prefix("wan"))
            .unwrap_or(name)
            .parse::<usize>()
            .ok()
            .filter(|i| *i < n);
        idx.map(|i| vec![i]).ok_or_else(|| DeployError::NoSuchPath {
            path: name.to_owned(),
            last: n.saturating_sub(1),
        })
    }

    async fn kill(&self, target: Component, instance: Option<usize>) -> anyhow::Result<()> {
        match target {
            Component::Connector => {
                for i in self.instances("connector", instance, self.connectors.len())? {
                    self.connectors[i]
                        .lock()
                        .await
                        .kill(&format!("connector{i}"))
                        .await;
                }
            }
            Component::Edge => {
                for i in self.instances("edge", instance, self.edges.len())? {
                    self.edges[i].lock().await.kill(&format!("edge{i}")).await;
                }
            }
            Component::Router => {
                self.instances("router", instance, 1)?;
                self.router.lock().await.kill("router").await;
            }
        }
        Ok(())
    }

    async fn restart(&self, target: Component, instance: Option<usize>) -> anyhow::Result<()> {
        match target {
            Component::Connector => {
                for i in self.instances("connector", instance, self.connectors.len())? {
                    let mut part = self.connectors[i].lock().await;
                    part.kill(&format!("connector{i}")).await;
                    let stop = self.root.child_token();
                    let state = self.data.join(format!("connector{i}"));
                    let h = start_connector(
                        &self.router_url,
                        &state,
                        None,
                        self.spec.tunnels_per_connector,
                        stop.clone(),
                    )
                    .await
                    .with_context(|| format!("connector {i} failed to restart"))?;
                    let up = tokio::time::timeout(
                        RECOVER_TIMEOUT,
                        h.wait_tunnels(self.spec.tunnels_per_connector),
                    )
                    .await
                    .is_ok();
                    if !up {
                        warn!(connector = i, "restarted, but not all tunnels are up yet");
                    }
                    *part = Part::new(h, stop);
                }
            }
            Component::Edge => {
                for i in self.instances("edge", instance, self.edges.len())? {
                    let mut part = self.edges[i].lock().await;
                    part.kill(&format!("edge{i}")).await;
                    let a = self.edge_addrs[i];
                    let state = self.data.join(format!("edge{i}"));
                    let deadline = Instant::now() + REBIND_TIMEOUT;
                    let (h, stop) = loop {
                        let stop = self.root.child_token();
                        match start_edge(
                            &self.router_url,
                            &state,
                            None,
                            a.public,
                            a.tunnel,
                            a.relay,
                            stop.clone(),
                        )
                        .await
                        {
                            Ok(h) => break (h, stop),
                            Err(e) if Instant::now() < deadline => {
                                warn!(edge = i, error = %portico_agent::error_chain(e.as_ref()), "cannot restart yet; retrying");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Err(e) => return Err(e.context(format!("edge {i} failed to restart"))),
                        }
                    };
                    if tokio::time::timeout(RECOVER_TIMEOUT, h.ready())
                        .await
                        .is_err()
                    {
                        warn!(edge = i, "restarted, but has no config yet");
                    }
                    *part = Part::new(h, stop);
                }
            }
            Component::Router => {
                self.instances("router", instance, 1)?;
                let mut part = self.router.lock().await;
                part.kill("router").await;
                let deadline = Instant::now() + REBIND_TIMEOUT;
                let (h, stop) = loop {
                    let stop = self.root.child_token();
                    match start_router(&self.data, self.router_addr, stop.clone()).await {
                        Ok(h) => break (h, stop),
                        Err(e) if Instant::now() < deadline => {
                            warn!(error = %portico_agent::error_chain(e.as_ref()), "cannot restart the router yet; retrying");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => return Err(e.context("the router failed to restart")),
                    }
                };
                *part = Part::new(h, stop);
            }
        }
        Ok(())
    }
}

impl Chaos for Deploy {
    fn act<'a>(&'a self, action: &'a ChaosAction) -> ChaosFuture<'a> {
        Box::pin(async move {
            let failed = |e: anyhow::Error| ChaosError::Failed {
                action: action.to_string(),
                source: e.into(),
            };
            match (action.action, action.target, &action.path) {
                (ChaosVerb::Kill, Some(t), _) => {
                    self.kill(t, action.instance).await.map_err(failed)
                }
                (ChaosVerb::Restart, Some(t), _) => {
                    self.restart(t, action.instance).await.map_err(failed)
                }
                (verb @ (ChaosVerb::Blackhole | ChaosVerb::Unblackhole), _, Some(p)) => {
                    let idx = self.path_indices(p).map_err(|e| failed(e.into()))?;
                    let paths = lock(&self.paths);
                    for i in idx {
                        if let Some(path) = paths.get(i) {
                            path.blackhole(verb == ChaosVerb::Blackhole);
                        }
                    }
                    Ok(())
                }
                _ => Err(ChaosError::Unsupported {
                    action: action.to_string(),
                }),
            }
        })
    }
}

/// Binds a UDP socket on a free loopback port and closes it, returning the
/// address (see the module docs for the race this leaves).
fn reserve_udp_port() -> anyhow::Result<SocketAddr> {
    let s = std::net::UdpSocket::bind(LOOPBACK).context("cannot reserve a UDP port")?;
    Ok(s.local_addr()?)
}

async fn start_router(
    data: &Path,
    listen: SocketAddr,
    stop: CancellationToken,
) -> anyhow::Result<portico_router::Handle> {
    let mut rc = portico_router::Config::new(data.join("router"));
    rc.listen = listen;
    rc.metrics_listen = None;
    rc.apps_domain = DEV_APPS_DOMAIN.to_owned();
    // Every edge and connector enrolls from 127.0.0.1, in one go.
    rc.enroll_limit.burst = u32::try_from(2 * MAX_INSTANCES).unwrap_or(u32::MAX);
    portico_router::start(rc, stop)
        .await
        .context("router failed to start")
}

async fn start_edge(
    router_url: &str,
    state: &Path,
    token: Option<String>,
    public: SocketAddr,
    tunnel: SocketAddr,
    relay: SocketAddr,
    stop: CancellationToken,
) -> anyhow::Result<portico_edge::Handle> {
    let mut ec = portico_edge::Config::new(router_url, state);
    ec.token = token;
    ec.public_listen = public;
    ec.tunnel_listen = tunnel;
    ec.metrics_listen = None;
    ec.advertise_tunnel_addr = Some(relay.to_string());
    ec.drain_delay = Duration::ZERO;
    ec.grace = Duration::from_secs(2);
    Ok(portico_edge::start(ec, stop).await?)
}

async fn start_connector(
    router_url: &str,
    state: &Path,
    token: Option<String>,
    tunnels: usize,
    stop: CancellationToken,
) -> anyhow::Result<portico_connector::Handle> {
    let mut cc = portico_connector::Config::new(router_url, state);
    cc.token = token;
    cc.tunnels = tunnels;
    cc.metrics_listen = None;
    Ok(portico_connector::start(cc, stop).await?)
}

/// What a deployment run produced.
#[derive(Debug)]
pub struct DeployOutcome {
    pub report: Report,
    /// Counters of each WAN path (by edge) at the end of the load.
    pub paths: Vec<PathStats>,
    /// Each edge's addresses.
    pub edges: Vec<EdgeAddrs>,
}

/// Starts the deployment under `data`, runs the load with chaos acting on it,
/// stops everything and returns the report. Bounded: the startup by
/// `deployment.startup_timeout`, the load by the scenario's bounds, each
/// stop by a timeout.
pub async fn run_file(
    file: &DeployFile,
    data: &Path,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<DeployOutcome> {
    let deploy = Arc::new(Deploy::start(data, file).await?);
    let result = async {
        let scenario = deploy.scenario(&file.load)?;
        info!(
            edges = deploy.edge_addrs.len(),
            connectors = deploy.connectors.len(),
            requests = scenario.requests.len(),
            "deployment up; load starting"
        );
        let chaos: Arc<dyn Chaos> = deploy.clone();
        let report = portico_loadtest::run_scenario_with(scenario, Some(chaos), opts, shutdown)
            .await
            .context("load test failed")?;
        anyhow::Ok(report)
    }
    .await;
    let paths = deploy.path_stats();
    let edges = deploy.edge_addrs.clone();
    deploy.stop().await;
    Ok(DeployOutcome {
        report: result?,
        paths,
        edges,
    })
}

/// `portico loadtest deploy`: start a whole deployment on this machine from a
/// deployment file, run its load, write the report, stop everything.
///
/// The deployment file is a `portico loadtest` scenario plus a `[deployment]`
/// table (edges, connectors, tunnels_per_connector, backends,
/// startup_timeout) and a `[wan]` table (delay, jitter, loss,
/// loss_correlation, reorder, duplicate, rate, mtu, seed) for the relay in
/// front of every edge's tunnel port. Requests name apps as
/// `https://app0/...` and are spread over every edge. Chaos actions act on
/// the deployment: kill/restart `connector`, `edge`, `router` (with `instance`),
/// blackhole/unblackhole paths `edge0`, `edge1`, … or `*`. See
/// loadtest/examples/deploy/deploy.toml.
#[derive(Debug, Clone, clap::Args)]
pub struct DeployArgs {
    /// The deployment file (TOML): [deployment], [wan] and the load scenario.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Keep all state here instead of a temporary directory (reused across runs).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Write the JSON report to FILE ("-" for stdout, which replaces the
    /// text summary).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report with latency and throughput plots
    /// (chaos actions marked).
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Runs `portico loadtest deploy`.
pub async fn run(args: DeployArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let file = DeployFile::load(&args.file)?;
    let (data, _tmp) = match &args.data {
        Some(d) => (d.clone(), None),
        None => {
            let tmp = tempfile::Builder::new()
                .prefix("portico-deploy-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            (tmp.path().to_owned(), Some(tmp))
        }
    };
    let outcome = run_file(
        &file,
        &data,
        RunOptions {
            progress: !args.quiet,
        },
        shutdown,
    )
    .await?;
    let report = &outcome.report;
    let json_to_stdout = args.json.as_deref() == Some(Path::new("-"));
    if json_to_stdout {
        crate::out(report.to_json());
    } else {
        let d = &file.deployment;
        crate::out(format!(
            "deployment: {} edge(s), {} connector(s) × {} tunnel(s), {} backend(s); WAN one-way delay {:?} ± {:?}, loss {}",
            d.edges, d.connectors, d.tunnels_per_connector, d.backends, file.wan.delay, file.wan.jitter, file.wan.loss
        ));
        crate::out(report.summary().trim_end());
        for (i, (p, a)) in outcome.paths.iter().zip(&outcome.edges).enumerate() {
            crate::out(format!(
                "WAN path edge{i} ({} -> {}): up {} forwarded / {} dropped, down {} forwarded / {} dropped",
                a.relay,
                a.tunnel,
                p.up.forwarded,
                p.up.dropped.total(),
                p.down.forwarded,
                p.down.dropped.total()
            ));
        }
    }
    if let Some(path) = args.json.as_deref().filter(|p| *p != Path::new("-")) {
        std::fs::write(path, report.to_json())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.html {
        std::fs::write(path, portico_loadtest::html::html(report))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    portico_loadtest::ThresholdsFailed::check(&report.thresholds)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        rate = 10
        duration = "1s"
        [[requests]]
        url = "https://app0/x?y=1"
    "#;

    #[test]
    fn defaults_and_expansion() {
        let f = DeployFile::from_toml(BASE).unwrap();
        assert_eq!(f.deployment, DeploymentSpec::default());
        assert_eq!(f.wan, WanSpec::default());
        let mut s = f.load.clone();
        expand_requests(&mut s, &[1000, 2000], 1).unwrap();
        let urls: Vec<&str> = s.requests.iter().map(|r| r.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "https://app0.apps.localhost:1000/x?y=1",
                "https://app0.apps.localhost:2000/x?y=1"
            ]
        );
        // A URL with a port, or another host, is left alone.
        let mut s = f.load.clone();
        s.requests[0].url = "https://example.com/".into();
        s.requests
            .push(RequestSpec::get("https://app0.apps.localhost:9/"));
        expand_requests(&mut s, &[1000, 2000], 1).unwrap();
        assert_eq!(s.requests.len(), 2);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("[deployment]\nedgez = 1\n", "edgez"),
            ("[deployment]\nedges = 0\n", "deployment.edges"),
            ("[deployment]\nbackends = 99\n", "deployment.backends"),
            ("[wan]\nloss = 2.0\n", "loss"),
            ("[wan]\nrate = \"fast\"\n", "wan.rate"),
            ("[wan]\ndelai = \"1ms\"\n", "delai"),
            ("ratee = 3\n", "ratee"),
        ];
        for (extra, needle) in cases {
            let text = format!("{extra}\n{BASE}");
            // Tables must come after the top-level keys in TOML.
            let text = if extra.starts_with('[') {
                format!("{BASE}\n{extra}")
            } else {
                text
            };
            let e = DeployFile::from_toml(&text).unwrap_err();
            let msg = portico_agent::error_chain(&e).to_string();
            assert!(msg.contains(needle), "{needle} not in {msg}");
        }
        let e = DeployFile::from_toml(&BASE.replace("app0", "app1")).unwrap_err();
        assert!(e.to_string().contains("requests[0].url"), "{e}");
    }
}
