//! `portico loadtest deploy`: one command that starts a whole Portico
//! deployment on this machine — a router, regions of edges (with the edge
//! mesh on), connectors, demo backends published as apps `app0..`, and a
//! WAN emulator path in front of every edge's tunnel port and, from every
//! region, its mesh port — from a deployment file, runs the load scenario
//! in it (with chaos actions acting on this deployment), writes the report
//! and stops everything.
//!
//! A deployment file is a loadtest scenario (the loadtest crate's [`Scenario`]
//! format, unchanged) with two extra tables:
//!
//! ```toml
//! [deployment]
//! regions = ["eu", "us"]     # default: the one region `default`
//! edges = 2                  # edges per region
//! connectors = 2             # connectors in one group
//! connector_region = "eu"    # the group pinned to a region, or "auto" (default)
//! tunnels_per_connector = 2
//! backends = 1               # demo backends, published as app0..app{N-1}
//! startup_timeout = "30s"    # everything up and routing within this
//!
//! [wan]                      # every edge's tunnel port gets a relay in front
//! delay = "20ms"             # one-way, both directions
//! jitter = "1ms"
//! loss = 0.001
//! [wan.tunnel.us]            # connector→edge paths into us's edges (instead of [wan])
//! delay = "60ms"
//! [wan.mesh.eu]              # edge→edge (mesh) paths into eu's edges (none by default)
//! delay = "40ms"
//! [wan.mesh.us.eu]           # ... except those from us's edges into eu's
//! delay = "70ms"
//!
//! mode = "open"              # ... the scenario, as for `portico loadtest`
//! rate = 200
//! duration = "5s"
//! [[requests]]
//! url = "https://app0/"      # app name; expanded to every edge
//! ```
//!
//! The WAN matrix. Connector→edge: one relay in front of each edge's tunnel
//! port, which the edge advertises to connectors; its impairment is
//! `[wan.tunnel.<region>]` for the edge's region, else `[wan]`.
//!
//! Edge→edge, a (from region, to region) matrix: in front of each edge's
//! mesh port, one relay per region, the path from that region's edges.
//! An edge advertises one mesh address to every peer, so a relay behind
//! it could not tell its dialers apart; instead, the edges of each other
//! region are told (`portico_edge::Config::mesh_dial_overrides`, peer id →
//! address; the certificate check still pins the peer) to dial their
//! region's relay for it. The relay of the edge's own region is the one it
//! advertises, which its region's peers dial as they would without
//! overrides. The impairment of the path from `<from>`'s edges into an
//! edge of `<to>` is `[wan.mesh.<from>.<to>]`, else `[wan.mesh.<to>]`,
//! else none; `[wan.mesh.eu.eu]` is the path between eu's own edges. So a
//! file with only `[wan.mesh.<to>]` tables means what it always did: the
//! delay into a region, the same from everywhere. Which relay a link
//! crosses is set by the edge that dials it (the one forwarding
//! requests): a link eu→us crosses the relay from eu into the us edge,
//! both ways. Both directions of a relay get the same impairment, so a
//! link's RTT is twice its delay. That is edges × regions mesh relays
//! (each with its own delivery thread): at most 32 × 32.
//!
//! A request URL whose host is `appN` or `appN.apps.localhost` and that has
//! no port is expanded into one request per edge
//! (`https://appN.apps.localhost:<edge port>/...`, same weight), so the load
//! is spread evenly over the edges, and each such request has `connect_to`
//! = its edge, then the other edges of its region: when its edge is killed,
//! the load generator fails over to another edge of the region, as a
//! browser would to another address of the region's name. Other URLs are
//! left alone. The router's CA is trusted unless the scenario sets
//! `cacert` or `insecure`.
//!
//! Chaos targets: `connector`, `edge` and `router` with `instance` (0-based;
//! all instances when unset; edges are numbered across regions in the
//! order of `regions`) for kill and restart (a restart keeps the state
//! directory and the addresses); `edge` with `region` counts `instance`
//! within that region; `region` with `region = "eu"` is every edge of it.
//! WAN paths for blackhole, unblackhole and `delay` (which sets `delay`,
//! and `jitter`, `loss` if given, both directions): `edge0`, `edge1`, …
//! (also `wan0`…, or a bare index), `region:eu` (every tunnel relay of the
//! region), `*`/`all` (every tunnel relay); prefixed with `mesh:` the same
//! names pick the mesh relays *into* those edges, from every region
//! (`mesh:edge0`, `mesh:region:eu`, `mesh:*`), and `mesh:us>eu` picks those
//! from us's edges into eu's (`mesh:eu>eu`: between eu's own edges).
//!
//! The port of each relay an edge advertises is reserved by binding a UDP
//! socket on port 0 and closing it before the edge starts (the edge must
//! advertise the relay's address, and a relay needs its target up front).
//! Another process could take the port in between; the start is then
//! retried with new ports. The relays from other regions bind port 0
//! after the edge is up (their addresses reach the other edges through
//! the dial overrides, filled in before any request is sent), so they
//! need no reservation.

use std::collections::BTreeMap;
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
use portico_proto::api::{CreateGroup, CreateRegion, Group, Region, TokenScope};
use portico_proto::{GroupId, RegionId};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::demo;
use crate::dev::{create_token, publish, DEV_APPS_DOMAIN};

const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
/// Most edges (over all regions), connectors or backends a deployment may
/// ask for.
pub const MAX_INSTANCES: usize = 32;
/// The `connector_region` of a group that is not pinned.
pub const AUTO: &str = "auto";
/// The group the connectors join when `connector_region` names a region.
const PINNED_GROUP: &str = "pinned";
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
    /// The regions, each with `edges` edges, in this order (edges are
    /// numbered region by region). Empty: the one region `default`.
    #[serde(default)]
    pub regions: Vec<String>,
    /// Edges per region.
    #[serde(default = "two")]
    pub edges: usize,
    /// Connectors, all in one group: `Default` (auto), or `pinned` when
    /// `connector_region` names a region.
    #[serde(default = "two")]
    pub connectors: usize,
    /// `auto` (the connectors attach to the nearest region) or a region of
    /// `regions` that their group is pinned to.
    #[serde(default = "auto")]
    pub connector_region: String,
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
fn auto() -> String {
    AUTO.to_owned()
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
            regions: Vec::new(),
            edges: 2,
            connectors: 2,
            connector_region: auto(),
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

impl DeploymentSpec {
    /// The regions, checked: `regions`, or the default region alone.
    pub fn region_ids(&self) -> Result<Vec<RegionId>, DeployError> {
        if self.regions.is_empty() {
            return Ok(vec![RegionId::default_region()]);
        }
        let mut out: Vec<RegionId> = Vec::with_capacity(self.regions.len());
        for (i, r) in self.regions.iter().enumerate() {
            let id = RegionId::new(r.as_str())
                .map_err(|e| DeployError::invalid(format!("deployment.regions[{i}]"), e))?;
            if out.contains(&id) {
                return Err(DeployError::invalid(
                    format!("deployment.regions[{i}]"),
                    format!("`{r}` is listed twice"),
                ));
            }
            out.push(id);
        }
        Ok(out)
    }

    /// The region the connectors' group is pinned to (`None`: auto).
    pub fn pinned_region(&self) -> Result<Option<RegionId>, DeployError> {
        if self.connector_region == AUTO {
            return Ok(None);
        }
        let regions = self.region_ids()?;
        regions
            .iter()
            .find(|r| r.as_str() == self.connector_region)
            .cloned()
            .map(Some)
            .ok_or_else(|| DeployError::NoSuchRegion {
                field: "deployment.connector_region".into(),
                region: self.connector_region.clone(),
                valid: region_list(&regions),
            })
    }
}

/// "eu, us", for error messages.
fn region_list(regions: &[RegionId]) -> String {
    regions
        .iter()
        .map(RegionId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

impl WanSpec {
    /// The impairment it describes, checked.
    pub fn impairment(&self) -> Result<Impairment, DeployError> {
        self.impairment_of("wan")
    }

    /// [`WanSpec::impairment`], errors naming `table` (e.g. `wan.mesh.eu`).
    fn impairment_of(&self, table: &str) -> Result<Impairment, DeployError> {
        let rate_bps = match &self.rate {
            Some(r) => Some(
                wan::parse_rate(r).map_err(|e| DeployError::invalid(format!("{table}.rate"), e))?,
            ),
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
        imp.validate().map_err(|e| DeployError::invalid(table, e))?;
        Ok(imp)
    }
}

/// A parsed and checked deployment file.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployFile {
    pub deployment: DeploymentSpec,
    /// `[wan]`: the connector→edge paths of every region without its own.
    pub wan: WanSpec,
    /// `[wan.tunnel.<region>]`: the connector→edge paths of that region.
    pub tunnel_wan: BTreeMap<String, WanSpec>,
    /// `[wan.mesh.<region>]`: the edge→edge paths into that region (from
    /// every region without a pair of its own).
    pub mesh_wan: BTreeMap<String, WanSpec>,
    /// `[wan.mesh.<from>.<to>]`: the edge→edge paths from `from`'s edges
    /// into `to`'s, by (from, to).
    pub mesh_pair_wan: BTreeMap<(String, String), WanSpec>,
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
        table: String,
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
    #[error("there is no WAN path `{path}` (they are edge0..edge{last}, region:<region>, or `*`, each also with a `mesh:` prefix, and mesh:<from>><to> for two regions)")]
    NoSuchPath { path: String, last: usize },
    #[error("`{field}`: there is no region `{region}` (the regions are {valid})")]
    NoSuchRegion {
        field: String,
        region: String,
        valid: String,
    },
    #[error("chaos[{index}]")]
    Chaos {
        index: usize,
        #[source]
        source: Box<DeployError>,
    },
    #[error("there is no edge {instance} in region {region} (it has {count})")]
    NoSuchEdgeInRegion {
        region: String,
        instance: usize,
        count: usize,
    },
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
                table: "deployment".into(),
                source: Box::new(e),
            })?,
            None => DeploymentSpec::default(),
        };
        let (wan, tunnel_wan, (mesh_wan, mesh_pair_wan)) = match table.remove("wan") {
            Some(toml::Value::Table(mut t)) => {
                let tunnel_wan = per_region(t.remove("tunnel"), "wan.tunnel")?;
                let mesh = mesh_matrix(t.remove("mesh"))?;
                let wan = wan_spec(toml::Value::Table(t), "wan")?;
                (wan, tunnel_wan, mesh)
            }
            Some(_) => return Err(DeployError::invalid("wan", "must be a table")),
            None => Default::default(),
        };
        let rest = toml::to_string(&table).map_err(|e| DeployError::invalid("load", e))?;
        let load = Scenario::from_toml(&rest).map_err(|source| DeployError::Scenario { source })?;
        let file = DeployFile {
            deployment,
            wan,
            tunnel_wan,
            mesh_wan,
            mesh_pair_wan,
            load,
        };
        file.validate()?;
        Ok(file)
    }

    /// Checks the deployment, the WAN and the app names of the requests.
    pub fn validate(&self) -> Result<(), DeployError> {
        let d = &self.deployment;
        let regions = d.region_ids()?;
        for (field, v, max) in [
            ("deployment.regions", regions.len(), MAX_INSTANCES),
            ("deployment.edges", d.edges, MAX_INSTANCES / regions.len()),
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
        d.pinned_region()?;
        self.wan.impairment()?;
        let per_region = [
            ("wan.tunnel", &self.tunnel_wan),
            ("wan.mesh", &self.mesh_wan),
        ]
        .into_iter()
        .flat_map(|(table, map)| {
            map.iter()
                .map(move |(region, spec)| (format!("{table}.{region}"), vec![region], spec))
        });
        let pairs = self
            .mesh_pair_wan
            .iter()
            .map(|((from, to), spec)| (format!("wan.mesh.{from}.{to}"), vec![from, to], spec));
        for (name, named, spec) in per_region.chain(pairs) {
            for region in named {
                if !regions.iter().any(|r| r.as_str() == region) {
                    return Err(DeployError::NoSuchRegion {
                        field: name,
                        region: region.clone(),
                        valid: region_list(&regions),
                    });
                }
            }
            if spec.seed.is_some() {
                return Err(DeployError::invalid(
                    format!("{name}.seed"),
                    "give the seed once, in [wan]",
                ));
            }
            spec.impairment_of(&name)?;
        }
        let layout = self.layout()?;
        for (index, a) in self.load.chaos.iter().enumerate() {
            layout.check(a).map_err(|e| DeployError::Chaos {
                index,
                source: Box::new(e),
            })?;
        }
        let mut s = self.load.clone();
        let one = Target {
            port: 1,
            connect_to: Vec::new(),
        };
        expand_requests(&mut s, &[one], d.backends)?;
        Ok(())
    }

    /// The regions, the region of each edge, the connector count.
    fn layout(&self) -> Result<Layout, DeployError> {
        let regions = self.deployment.region_ids()?;
        let edges = regions
            .iter()
            .flat_map(|r| std::iter::repeat_n(r.clone(), self.deployment.edges))
            .collect();
        Ok(Layout {
            regions,
            edges,
            connectors: self.deployment.connectors,
        })
    }

    /// The impairment of the connector→edge paths into `region`.
    pub fn tunnel_impairment(&self, region: &RegionId) -> Result<Impairment, DeployError> {
        match self.tunnel_wan.get(region.as_str()) {
            Some(w) => w.impairment_of(&format!("wan.tunnel.{region}")),
            None => self.wan.impairment(),
        }
    }

    /// The impairment of the edge→edge (mesh) paths into `region` from
    /// every region without a pair of its own: `[wan.mesh.<region>]`, else
    /// none.
    pub fn mesh_impairment(&self, region: &RegionId) -> Result<Impairment, DeployError> {
        match self.mesh_wan.get(region.as_str()) {
            Some(w) => w.impairment_of(&format!("wan.mesh.{region}")),
            None => Ok(Impairment::none()),
        }
    }

    /// The impairment of the mesh paths from `from`'s edges into `to`'s:
    /// `[wan.mesh.<from>.<to>]`, else [`DeployFile::mesh_impairment`] of
    /// `to`.
    pub fn mesh_pair_impairment(
        &self,
        from: &RegionId,
        to: &RegionId,
    ) -> Result<Impairment, DeployError> {
        let pair = (from.as_str().to_owned(), to.as_str().to_owned());
        match self.mesh_pair_wan.get(&pair) {
            Some(w) => w.impairment_of(&format!("wan.mesh.{from}.{to}")),
            None => self.mesh_impairment(to),
        }
    }
}

/// One `[wan...]` table as a [`WanSpec`], errors naming `table`.
fn wan_spec(v: toml::Value, table: &str) -> Result<WanSpec, DeployError> {
    v.try_into().map_err(|e| DeployError::Table {
        table: table.to_owned(),
        source: Box::new(e),
    })
}

/// The `[wan.mesh]` table: `[wan.mesh.<to>]` and `[wan.mesh.<from>.<to>]`.
/// In `[wan.mesh.<x>]`, a key whose value is a table is a region `<to>`
/// (no field of a [`WanSpec`] is a table); the other keys are the fields
/// of `[wan.mesh.<x>]` itself, which exists only if it has fields or no
/// pair (an empty `[wan.mesh.eu]` still means "none into eu").
#[allow(clippy::type_complexity)]
fn mesh_matrix(
    v: Option<toml::Value>,
) -> Result<
    (
        BTreeMap<String, WanSpec>,
        BTreeMap<(String, String), WanSpec>,
    ),
    DeployError,
> {
    let (mut into, mut pairs) = (BTreeMap::new(), BTreeMap::new());
    let Some(v) = v else {
        return Ok((into, pairs));
    };
    let toml::Value::Table(t) = v else {
        return Err(DeployError::invalid(
            "wan.mesh",
            "must be a table of regions, e.g. [wan.mesh.eu] or [wan.mesh.us.eu]",
        ));
    };
    for (region, v) in t {
        let name = format!("wan.mesh.{region}");
        let toml::Value::Table(mut fields) = v else {
            // Not a table: let serde say what it expected.
            into.insert(region, wan_spec(v, &name)?);
            continue;
        };
        let to: Vec<String> = fields
            .iter()
            .filter(|(_, v)| v.is_table())
            .map(|(k, _)| k.clone())
            .collect();
        for to in &to {
            if let Some(v) = fields.remove(to) {
                let spec = wan_spec(v, &format!("{name}.{to}"))?;
                pairs.insert((region.clone(), to.clone()), spec);
            }
        }
        if !fields.is_empty() || to.is_empty() {
            into.insert(region, wan_spec(toml::Value::Table(fields), &name)?);
        }
    }
    Ok((into, pairs))
}

/// `[wan.tunnel]`: a table of per-region [`WanSpec`]s.
fn per_region(
    v: Option<toml::Value>,
    table: &str,
) -> Result<BTreeMap<String, WanSpec>, DeployError> {
    let Some(v) = v else {
        return Ok(BTreeMap::new());
    };
    let toml::Value::Table(t) = v else {
        return Err(DeployError::invalid(
            table,
            "must be a table of regions, e.g. [wan.tunnel.eu]",
        ));
    };
    t.into_iter()
        .map(|(region, v)| {
            let spec = wan_spec(v, &format!("{table}.{region}"))?;
            Ok((region, spec))
        })
        .collect()
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

/// Where an expanded request goes: an edge's public port, and the
/// addresses to dial (that edge first, then the others of its region; empty:
/// the port on loopback).
#[derive(Debug, Clone)]
struct Target {
    port: u16,
    connect_to: Vec<SocketAddr>,
}

/// Expands requests that name an app into one request per target.
fn expand_requests(
    s: &mut Scenario,
    targets: &[Target],
    backends: usize,
) -> Result<(), DeployError> {
    let mut out = Vec::with_capacity(s.requests.len() * targets.len());
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
        for t in targets {
            let mut u = url.clone();
            u.set_host(Some(&format!("{app}.{DEV_APPS_DOMAIN}")))
                .map_err(|e| DeployError::invalid(&field, e))?;
            u.set_port(Some(t.port))
                .map_err(|()| DeployError::invalid(&field, "cannot take a port"))?;
            out.push(RequestSpec {
                url: u.to_string(),
                connect_to: t.connect_to.clone(),
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
#[derive(Debug, Clone)]
pub struct EdgeAddrs {
    /// Its region.
    pub region: RegionId,
    /// HTTPS (TCP) and HTTP/3 (UDP) for users.
    pub public: SocketAddr,
    /// The edge's own QUIC tunnel port (the relay's target).
    pub tunnel: SocketAddr,
    /// The relay in front of it, which the edge advertises to connectors.
    pub relay: SocketAddr,
    /// The edge's own mesh port (the mesh relays' target).
    pub mesh: SocketAddr,
    /// The mesh relay the edge advertises, which the edges of its own
    /// region dial (those of another region dial a relay of their region's,
    /// through their dial overrides; see [`MeshPathOutcome`]).
    pub mesh_relay: SocketAddr,
}

/// One mesh relay: the path from the edges of region `from` into edge `to`.
struct MeshPath {
    from: RegionId,
    to: usize,
    path: wan::Path,
}

/// One mesh relay, as it was at the end of the load.
#[derive(Debug, Clone)]
pub struct MeshPathOutcome {
    /// The region whose edges dial through it.
    pub from: RegionId,
    /// The edge it leads to, by index.
    pub to: usize,
    /// Its address: `to`'s advertised mesh address when `from` is `to`'s
    /// region, else what `from`'s edges dial for `to` instead.
    pub relay: SocketAddr,
    /// Its counters.
    pub stats: PathStats,
    /// The impairment it applies (the up direction; both are set alike;
    /// chaos `delay` may have changed it).
    pub impairment: Impairment,
}

/// A running deployment. Implements [`Chaos`].
pub struct Deploy {
    data: PathBuf,
    spec: DeploymentSpec,
    regions: Vec<RegionId>,
    /// What chaos actions name: filled in as the edges start.
    layout: Layout,
    group: GroupId,
    root: CancellationToken,
    router_addr: SocketAddr,
    router_url: String,
    router: Mutex<Part<portico_router::Handle>>,
    edge_addrs: Vec<EdgeAddrs>,
    edges: Vec<Mutex<Part<portico_edge::Handle>>>,
    connectors: Vec<Mutex<Part<portico_connector::Handle>>>,
    /// The tunnel relays, by edge.
    paths: std::sync::Mutex<Vec<wan::Path>>,
    /// The mesh relays, by target edge, then source region (in the order
    /// of `regions`).
    mesh_paths: std::sync::Mutex<Vec<MeshPath>>,
    /// Each region's mesh dial overrides (by the order of `regions`),
    /// shared by its edges: every edge of another region → the relay from
    /// this region into it.
    mesh_dial: Vec<portico_edge::MeshDialOverrides>,
    demos: std::sync::Mutex<Vec<demo::Demo>>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn has_credentials(state: &Path) -> bool {
    state.join("credentials.json").exists()
}

/// The shape of a deployment that chaos actions name things in: its
/// regions, the region of each edge (by index), the connector count.
#[derive(Debug, Clone)]
struct Layout {
    regions: Vec<RegionId>,
    edges: Vec<RegionId>,
    connectors: usize,
}

impl Layout {
    /// Checks that what `a` names exists.
    fn check(&self, a: &ChaosAction) -> Result<(), DeployError> {
        match (a.action, a.target, &a.path) {
            (ChaosVerb::Kill | ChaosVerb::Restart, Some(t), _) => {
                self.targets(t, a.instance, a.region.as_deref())?;
            }
            (_, _, Some(p)) => {
                self.path_pick(p)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The instances a kill or restart of `target` acts on.
    fn targets(
        &self,
        target: Component,
        instance: Option<usize>,
        region: Option<&str>,
    ) -> Result<Vec<usize>, DeployError> {
        match target {
            Component::Connector => self.instances("connector", instance, self.connectors),
            Component::Router => self.instances("router", instance, 1),
            Component::Edge | Component::Region => self.edge_targets(target, instance, region),
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

    /// The edges of `region`, by index; an error naming the valid ones.
    fn region_edges(&self, field: &str, region: &str) -> Result<Vec<usize>, DeployError> {
        if !self.regions.iter().any(|r| r.as_str() == region) {
            return Err(DeployError::NoSuchRegion {
                field: field.to_owned(),
                region: region.to_owned(),
                valid: region_list(&self.regions),
            });
        }
        Ok((0..self.edges.len())
            .filter(|&i| self.edges[i].as_str() == region)
            .collect())
    }

    /// The edges a kill or restart of `edge` or `region` acts on.
    fn edge_targets(
        &self,
        target: Component,
        instance: Option<usize>,
        region: Option<&str>,
    ) -> Result<Vec<usize>, DeployError> {
        let Some(region) = region else {
            return self.instances("edge", instance, self.edges.len());
        };
        let members = self.region_edges("region", region)?;
        match (target, instance) {
            (Component::Edge, Some(k)) => {
                members
                    .get(k)
                    .map(|&i| vec![i])
                    .ok_or_else(|| DeployError::NoSuchEdgeInRegion {
                        region: region.to_owned(),
                        instance: k,
                        count: members.len(),
                    })
            }
            _ => Ok(members),
        }
    }

    /// The relays a WAN path name picks (see the module docs).
    fn path_pick(&self, name: &str) -> Result<PathPick, DeployError> {
        let n = self.edges.len();
        let (kind, rest) = match name.strip_prefix("mesh:") {
            Some(rest) => (PathKind::Mesh, rest),
            None => (PathKind::Tunnel, name),
        };
        let pick = |edges| PathPick {
            kind,
            edges,
            from: None,
        };
        if rest == "*" || rest == "all" {
            return Ok(pick((0..n).collect()));
        }
        if let Some(region) = rest.strip_prefix("region:") {
            return Ok(pick(self.region_edges("path", region)?));
        }
        if let (PathKind::Mesh, Some((from, to))) = (kind, rest.split_once('>')) {
            let edges = self.region_edges("path", to)?;
            self.region_edges("path", from)?;
            return Ok(PathPick {
                from: self.regions.iter().find(|r| r.as_str() == from).cloned(),
                ..pick(edges)
            });
        }
        let idx = rest
            .strip_prefix("edge")
            .or_else(|| rest.strip_prefix("wan"))
            .unwrap_or(rest)
            .parse::<usize>()
            .ok()
            .filter(|i| *i < n);
        idx.map(|i| pick(vec![i]))
            .ok_or_else(|| DeployError::NoSuchPath {
                path: name.to_owned(),
                last: n.saturating_sub(1),
            })
    }
}

/// Which relays a WAN path name picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathKind {
    Tunnel,
    Mesh,
}

/// What a WAN path name picks: the tunnel relays of `edges`, or the mesh
/// relays into `edges` (only those from `from`, when given).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PathPick {
    kind: PathKind,
    edges: Vec<usize>,
    from: Option<RegionId>,
}

impl PathPick {
    /// Whether the mesh relay from `from`'s edges into edge `to` is picked.
    fn picks_mesh(&self, from: &RegionId, to: usize) -> bool {
        self.kind == PathKind::Mesh
            && self.edges.contains(&to)
            && self.from.as_ref().is_none_or(|f| f == from)
    }
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
        let regions = spec.region_ids()?;
        let group = match spec.pinned_region()? {
            Some(_) => GroupId::new(PINNED_GROUP)?,
            None => GroupId::default_group(),
        };
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
            layout: Layout {
                regions: regions.clone(),
                edges: Vec::new(),
                connectors: 0,
            },
            group,
            root: root.clone(),
            router_addr,
            router_url,
            router: Mutex::new(Part::new(router, router_stop)),
            edge_addrs: Vec::new(),
            edges: Vec::new(),
            connectors: Vec::new(),
            paths: std::sync::Mutex::new(Vec::new()),
            mesh_paths: std::sync::Mutex::new(Vec::new()),
            // One map each (`vec![x; n]` would clone one shared map).
            mesh_dial: (0..regions.len()).map(|_| Default::default()).collect(),
            demos: std::sync::Mutex::new(Vec::new()),
            regions,
        };
        // From here on, a failure stops what has started.
        match deploy.start_rest(&admin, file).await {
            Ok(()) => Ok(deploy),
            Err(e) => {
                deploy.stop().await;
                Err(e)
            }
        }
    }

    /// Creates the regions and the pinned group that do not exist yet
    /// (a reused data directory has them).
    async fn create_regions_and_group(&self, admin: &RouterClient) -> anyhow::Result<()> {
        let have: Vec<Region> = admin.get_json("/v1/regions").await?;
        for r in &self.regions {
            if !have.iter().any(|h| &h.id == r) {
                let _: Region = admin
                    .post_json("/v1/regions", &CreateRegion { id: r.clone() })
                    .await
                    .with_context(|| format!("creating region {r}"))?;
            }
        }
        if let Some(region) = self.spec.pinned_region()? {
            let have: Vec<Group> = admin.get_json("/v1/groups").await?;
            if !have.iter().any(|g| g.id == self.group) {
                let _: Group = admin
                    .post_json(
                        "/v1/groups",
                        &CreateGroup {
                            id: self.group.clone(),
                            region: Some(region.to_string()),
                        },
                    )
                    .await
                    .with_context(|| format!("creating group {} in {region}", self.group))?;
            }
        }
        Ok(())
    }

    async fn start_rest(&mut self, admin: &RouterClient, file: &DeployFile) -> anyhow::Result<()> {
        let spec = self.spec.clone();
        self.create_regions_and_group(admin).await?;
        for i in 0..spec.backends {
            let d = demo::start(LOOPBACK, self.root.child_token())
                .await
                .with_context(|| format!("demo backend {i} failed to start"))?;
            publish(
                admin,
                &format!("app{i}"),
                &format!("http://{}/", d.addr),
                self.group.clone(),
            )
            .await?;
            lock(&self.demos).push(d);
        }
        for region in self.regions.clone() {
            for k in 0..spec.edges {
                let i = self.edge_addrs.len();
                let state = self.edge_state(i, &region, k);
                self.start_first_edge(admin, file, i, &region, &state)
                    .await?;
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
                            group: self.group.clone(),
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
            self.layout.connectors = self.connectors.len();
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

    /// Starts edge `i` of `region` for the first time, with the two relays
    /// it advertises (tunnel and mesh) on ports reserved beforehand
    /// (retried with new ports when one was taken in between), then a mesh
    /// relay into it from every other region, which that region's edges
    /// are told to dial for it.
    async fn start_first_edge(
        &mut self,
        admin: &RouterClient,
        file: &DeployFile,
        i: usize,
        region: &RegionId,
        state: &Path,
    ) -> anyhow::Result<()> {
        let tunnel_imp = file.tunnel_impairment(region)?;
        let seed = file.wan.seed;
        let seeded = |offset: u64| seed.map(|s| s.wrapping_add(offset + i as u64));
        let own = self.region_index(region);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let token = if has_credentials(state) {
                None
            } else {
                Some(
                    create_token(
                        admin,
                        TokenScope::Edge {
                            region: region.clone(),
                        },
                    )
                    .await?,
                )
            };
            let plan = EdgeAddrs {
                region: region.clone(),
                public: LOOPBACK,
                tunnel: LOOPBACK,
                relay: reserve_udp_port()?,
                mesh: LOOPBACK,
                mesh_relay: reserve_udp_port()?,
            };
            let stop = self.root.child_token();
            let edge = start_edge(
                &self.router_url,
                state,
                token,
                &plan,
                &self.mesh_dial[own],
                stop.clone(),
            )
            .await
            .with_context(|| format!("edge {i} ({region}) failed to start"))?;
            let id = edge.id.clone();
            let addrs = EdgeAddrs {
                public: edge.public_addr,
                tunnel: edge.tunnel_addr,
                mesh: edge.mesh_addr.unwrap_or(LOOPBACK),
                ..plan
            };
            let mut part = Part::new(edge, stop);
            let mut tunnel_pc =
                PathConfig::new(addrs.relay, addrs.tunnel).symmetric(tunnel_imp.clone());
            tunnel_pc.seed = seeded(0);
            let mut mesh_pc = PathConfig::new(addrs.mesh_relay, addrs.mesh)
                .symmetric(file.mesh_pair_impairment(region, region)?);
            mesh_pc.seed = seeded(1000);
            let started = match wan::start(tunnel_pc, self.root.child_token()).await {
                Ok(t) => match wan::start(mesh_pc, self.root.child_token()).await {
                    Ok(m) => Ok((t, m)),
                    Err(e) => {
                        t.shutdown().await;
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            };
            match started {
                Ok((tunnel_path, mesh_path)) => {
                    info!(edge = i, %region, public = %addrs.public, tunnel = %addrs.tunnel, relay = %addrs.relay,
                        mesh = %addrs.mesh, mesh_relay = %addrs.mesh_relay, "edge and WAN paths up");
                    lock(&self.paths).push(tunnel_path);
                    let mesh_target = addrs.mesh;
                    self.layout.edges.push(addrs.region.clone());
                    self.edge_addrs.push(addrs);
                    self.edges.push(Mutex::new(part));
                    // From here on a failure is the deployment's: it stops
                    // this edge with the rest.
                    let mut own_path = Some(mesh_path);
                    for (s, from) in self.regions.clone().iter().enumerate() {
                        let path = match own_path.take_if(|_| s == own) {
                            Some(p) => p,
                            None => {
                                let mut pc = PathConfig::new(LOOPBACK, mesh_target)
                                    .symmetric(file.mesh_pair_impairment(from, region)?);
                                pc.seed = seeded(2000 + (s * MAX_INSTANCES) as u64);
                                let p = wan::start(pc, self.root.child_token())
                                    .await
                                    .with_context(|| format!("the mesh path {from} > edge {i}"))?;
                                self.mesh_dial[s].set(id.clone(), p.local_addr());
                                info!(edge = i, %from, relay = %p.local_addr(), "mesh path from another region up");
                                p
                            }
                        };
                        lock(&self.mesh_paths).push(MeshPath {
                            from: from.clone(),
                            to: i,
                            path,
                        });
                    }
                    return Ok(());
                }
                Err(e) if attempt < RELAY_ATTEMPTS => {
                    warn!(edge = i, error = %portico_agent::error_chain(&e), "relay port taken in the meantime; retrying");
                    part.kill(&format!("edge{i}")).await;
                }
                Err(e) => {
                    part.kill(&format!("edge{i}")).await;
                    return Err(e).context(format!("WAN paths of edge {i}"));
                }
            }
        }
    }

    /// The index of `region` in `regions`.
    fn region_index(&self, region: &RegionId) -> usize {
        self.regions
            .iter()
            .position(|r| r == region)
            .expect("the edges' regions are the deployment's")
    }

    /// The state directory of edge `i`, the `k`th of `region`: `edge{i}`
    /// in the single-region layout (as before regions), else
    /// `edge-{region}-{k}`.
    fn edge_state(&self, i: usize, region: &RegionId, k: usize) -> PathBuf {
        if self.regions == [RegionId::default_region()] {
            self.data.join(format!("edge{i}"))
        } else {
            self.data.join(format!("edge-{region}-{k}"))
        }
    }

    /// Where the requests of edge `i` go: its port, and (with `failover`)
    /// its address first, then the other edges of its region; without,
    /// its address alone.
    fn target(&self, i: usize, failover: bool) -> Target {
        let me = &self.edge_addrs[i];
        let mut connect_to = vec![me.public];
        if failover {
            let n = self.edge_addrs.len();
            connect_to.extend(
                (1..n)
                    .map(|k| &self.edge_addrs[(i + k) % n])
                    .filter(|a| a.region == me.region)
                    .map(|a| a.public),
            );
        }
        Target {
            port: me.public.port(),
            connect_to,
        }
    }

    fn targets(&self, failover: bool) -> Vec<Target> {
        (0..self.edge_addrs.len())
            .map(|i| self.target(i, failover))
            .collect()
    }

    /// Polls every app through every edge until each answers 200, with
    /// one-request runs of the load generator (each at its edge alone).
    async fn wait_routing(&self) -> anyhow::Result<()> {
        let mut all = Scenario::default();
        for app in 0..self.spec.backends {
            all.requests
                .push(RequestSpec::get(format!("https://app{app}/")));
        }
        expand_requests(&mut all, &self.targets(false), self.spec.backends)?;
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

    /// The regions, in order.
    pub fn regions(&self) -> &[RegionId] {
        &self.regions
    }

    /// Counters of every tunnel relay, by edge index.
    pub fn path_stats(&self) -> Vec<PathStats> {
        lock(&self.paths).iter().map(wan::Path::stats).collect()
    }

    /// Every mesh relay now: by target edge, then source region.
    pub fn mesh_paths(&self) -> Vec<MeshPathOutcome> {
        lock(&self.mesh_paths)
            .iter()
            .map(|m| MeshPathOutcome {
                from: m.from.clone(),
                to: m.to,
                relay: m.path.local_addr(),
                stats: m.path.stats(),
                impairment: m.path.impairments().0,
            })
            .collect()
    }

    /// The impairment each tunnel relay applies now (the up direction;
    /// both are set alike), by edge index.
    pub fn impairments(&self) -> Vec<Impairment> {
        lock(&self.paths)
            .iter()
            .map(|p| p.impairments().0)
            .collect()
    }

    /// Each edge's `portico_edge_mesh_forwarded_total` (requests it
    /// forwarded to another edge since it last started), from its metrics
    /// listener; `None` for an edge that is down or did not answer.
    pub async fn mesh_forwarded(&self) -> Vec<Option<u64>> {
        let mut out = Vec::with_capacity(self.edges.len());
        for e in &self.edges {
            let addr = e.lock().await.handle.as_ref().and_then(|h| h.metrics_addr);
            out.push(match addr {
                Some(a) => scrape_counter(a, "portico_edge_mesh_forwarded_total").await,
                None => None,
            });
        }
        out
    }

    /// The load scenario made concrete for this deployment: app names
    /// expanded to every edge's public port (failing over to the other
    /// edges of its region), the router's CA trusted.
    pub fn scenario(&self, load: &Scenario) -> Result<Scenario, DeployError> {
        let mut s = load.clone();
        expand_requests(&mut s, &self.targets(true), self.spec.backends)?;
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
        let mut paths: Vec<wan::Path> = lock(&self.paths).drain(..).collect();
        paths.extend(lock(&self.mesh_paths).drain(..).map(|m| m.path));
        for p in paths {
            let _ = tokio::time::timeout(STOP_TIMEOUT, p.shutdown()).await;
        }
    }

    /// Runs `f` on each relay that the path name picks.
    fn with_paths(
        &self,
        name: &str,
        mut f: impl FnMut(&wan::Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let pick = self.layout.path_pick(name)?;
        match pick.kind {
            PathKind::Tunnel => {
                let paths = lock(&self.paths);
                for &i in &pick.edges {
                    if let Some(p) = paths.get(i) {
                        f(p)?;
                    }
                }
            }
            PathKind::Mesh => {
                let paths = lock(&self.mesh_paths);
                for m in paths.iter().filter(|m| pick.picks_mesh(&m.from, m.to)) {
                    f(&m.path)?;
                }
            }
        }
        Ok(())
    }

    async fn kill(&self, a: &ChaosAction) -> anyhow::Result<()> {
        let target = a.target.context("no target")?;
        let which = self
            .layout
            .targets(target, a.instance, a.region.as_deref())?;
        match target {
            Component::Connector => {
                for i in which {
                    self.connectors[i]
                        .lock()
                        .await
                        .kill(&format!("connector{i}"))
                        .await;
                }
            }
            Component::Edge | Component::Region => {
                for i in which {
                    self.edges[i].lock().await.kill(&format!("edge{i}")).await;
                }
            }
            Component::Router => {
                self.router.lock().await.kill("router").await;
            }
        }
        Ok(())
    }

    async fn restart(&self, a: &ChaosAction) -> anyhow::Result<()> {
        let target = a.target.context("no target")?;
        let which = self
            .layout
            .targets(target, a.instance, a.region.as_deref())?;
        match target {
            Component::Connector => {
                for i in which {
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
            Component::Edge | Component::Region => {
                for i in which {
                    self.restart_edge(i).await?;
                }
            }
            Component::Router => {
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

    /// Stops edge `i` if running and starts it again on its old addresses.
    async fn restart_edge(&self, i: usize) -> anyhow::Result<()> {
        let mut part = self.edges[i].lock().await;
        part.kill(&format!("edge{i}")).await;
        let a = &self.edge_addrs[i];
        let dial = &self.mesh_dial[self.region_index(&a.region)];
        let k = self.edge_addrs[..i]
            .iter()
            .filter(|e| e.region == a.region)
            .count();
        let state = self.edge_state(i, &a.region, k);
        let deadline = Instant::now() + REBIND_TIMEOUT;
        let (h, stop) = loop {
            let stop = self.root.child_token();
            match start_edge(&self.router_url, &state, None, a, dial, stop.clone()).await {
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
        Ok(())
    }

    /// Sets the delay (and jitter, loss if given) of every relay the
    /// action's path picks, both directions, keeping the rest.
    fn delay(&self, a: &ChaosAction) -> anyhow::Result<()> {
        let name = a.path.as_deref().context("no path")?;
        self.with_paths(name, |p| {
            let (mut up, mut down) = p.impairments();
            for imp in [&mut up, &mut down] {
                if let Some(d) = a.delay {
                    imp.delay = d;
                }
                if let Some(j) = a.jitter {
                    imp.jitter = j;
                }
                if let Some(l) = a.loss {
                    imp.loss = l;
                }
            }
            p.set(up, down)
                .with_context(|| format!("setting the impairment of {}", p.local_addr()))
        })
    }
}

impl Chaos for Deploy {
    fn act<'a>(&'a self, action: &'a ChaosAction) -> ChaosFuture<'a> {
        Box::pin(async move {
            let failed = |e: anyhow::Error| ChaosError::Failed {
                action: action.to_string(),
                source: e.into(),
            };
            match (action.action, &action.path) {
                (ChaosVerb::Kill, _) => self.kill(action).await.map_err(failed),
                (ChaosVerb::Restart, _) => self.restart(action).await.map_err(failed),
                (verb @ (ChaosVerb::Blackhole | ChaosVerb::Unblackhole), Some(p)) => self
                    .with_paths(p, |path| {
                        path.blackhole(verb == ChaosVerb::Blackhole);
                        Ok(())
                    })
                    .map_err(failed),
                (ChaosVerb::Delay, Some(_)) => self.delay(action).map_err(failed),
                _ => Err(ChaosError::Unsupported {
                    action: action.to_string(),
                }),
            }
        })
    }
}

/// Reads one unlabelled counter from a metrics listener (plain HTTP/1.0);
/// `None` when it cannot, bounded by 2 s.
async fn scrape_counter(addr: SocketAddr, name: &str) -> Option<u64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fetch = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        tcp.take(8 << 20).read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    };
    tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .ok()
        .flatten()
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

/// Starts an edge listening on `a`'s public, tunnel and mesh addresses
/// (port 0 for new ones), advertising its relays, dialling peers' mesh
/// links as `mesh_dial` says, with metrics on loopback.
async fn start_edge(
    router_url: &str,
    state: &Path,
    token: Option<String>,
    a: &EdgeAddrs,
    mesh_dial: &portico_edge::MeshDialOverrides,
    stop: CancellationToken,
) -> anyhow::Result<portico_edge::Handle> {
    let mut ec = portico_edge::Config::new(router_url, state);
    ec.token = token;
    ec.public_listen = a.public;
    ec.tunnel_listen = a.tunnel;
    ec.mesh_listen = Some(a.mesh);
    ec.metrics_listen = Some(LOOPBACK);
    ec.advertise_tunnel_addr = Some(a.relay.to_string());
    ec.advertise_mesh_addr = Some(a.mesh_relay.to_string());
    ec.mesh_dial_overrides = mesh_dial.clone();
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
    /// Counters of each tunnel relay (by edge) at the end of the load.
    pub paths: Vec<PathStats>,
    /// Every mesh relay at the end of the load (by target edge, then
    /// source region).
    pub mesh_paths: Vec<MeshPathOutcome>,
    /// The impairment of each tunnel relay at the end (chaos `delay` may
    /// have changed it), by edge.
    pub impairments: Vec<Impairment>,
    /// Requests each edge forwarded over the mesh since it last started
    /// (`None`: down at the end).
    pub mesh_forwarded: Vec<Option<u64>>,
    /// Each edge's addresses (and region).
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
            regions = deploy.regions.len(),
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
    let outcome = |report| DeployOutcome {
        report,
        paths: deploy.path_stats(),
        mesh_paths: deploy.mesh_paths(),
        impairments: deploy.impairments(),
        mesh_forwarded: Vec::new(),
        edges: deploy.edge_addrs.clone(),
    };
    let result = match result {
        Ok(report) => {
            let mut o = outcome(report);
            o.mesh_forwarded = deploy.mesh_forwarded().await;
            Ok(o)
        }
        Err(e) => Err(e),
    };
    deploy.stop().await;
    result
}

/// `portico loadtest deploy`: start a whole deployment on this machine from a
/// deployment file, run its load, write the report, stop everything.
///
/// The deployment file is a `portico loadtest` scenario plus a `[deployment]`
/// table (regions, edges per region, connectors, connector_region = auto or
/// a region, tunnels_per_connector, backends, startup_timeout) and a
/// `[wan]` table (delay, jitter, loss, loss_correlation, reorder,
/// duplicate, rate, mtu, seed) for the relay in front of every edge's
/// tunnel port, with `[wan.tunnel.<region>]` and `[wan.mesh.<region>]` for
/// the connector→edge and edge→edge paths into a region, and
/// `[wan.mesh.<from>.<to>]` for the edge→edge paths from one region into
/// another (else `[wan.mesh.<to>]`). Requests name apps
/// as `https://app0/...` and are spread over every edge, each failing over
/// to the other edges of its region. Chaos actions act on the deployment:
/// kill/restart `connector`, `edge`, `region` (with `region`), `router`
/// (with `instance`); blackhole/unblackhole/delay paths `edge0`,
/// `region:eu`, `*`, `mesh:…` (mesh paths into those edges), `mesh:us>eu`.
/// See loadtest/examples/deploy/deploy.toml.
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
        let regions = d.region_ids()?;
        crate::out(format!(
            "deployment: {} region(s) ({}) × {} edge(s), {} connector(s) (group {}) × {} tunnel(s), {} backend(s)",
            regions.len(),
            region_list(&regions),
            d.edges,
            d.connectors,
            match d.pinned_region()? {
                Some(r) => format!("pinned to {r}"),
                None => AUTO.to_owned(),
            },
            d.tunnels_per_connector,
            d.backends,
        ));
        crate::out(report.summary().trim_end());
        let line = |p: &PathStats| {
            format!(
                "up {} forwarded / {} dropped, down {} forwarded / {} dropped",
                p.up.forwarded,
                p.up.dropped.total(),
                p.down.forwarded,
                p.down.dropped.total()
            )
        };
        for (i, a) in outcome.edges.iter().enumerate() {
            let delay = |v: &[Impairment]| v.get(i).map(|imp| imp.delay).unwrap_or_default();
            if let Some(p) = outcome.paths.get(i) {
                crate::out(format!(
                    "WAN path edge{i} [{}] ({} -> {}, delay {:?} at the end): {}",
                    a.region,
                    a.relay,
                    a.tunnel,
                    delay(&outcome.impairments),
                    line(p)
                ));
            }
            for m in outcome.mesh_paths.iter().filter(|m| m.to == i) {
                crate::out(format!(
                    "mesh path {}>edge{i} [{}] ({} -> {}, delay {:?} at the end): {}",
                    m.from,
                    a.region,
                    m.relay,
                    a.mesh,
                    m.impairment.delay,
                    line(&m.stats),
                ));
            }
            crate::out(format!(
                "edge{i} [{}] forwarded {} request(s) over the mesh",
                a.region,
                match outcome.mesh_forwarded.get(i).copied().flatten() {
                    Some(n) => n.to_string(),
                    None => "?".into(),
                }
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
        let t = |port: u16| Target {
            port,
            connect_to: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))],
        };
        let mut s = f.load.clone();
        expand_requests(&mut s, &[t(1000), t(2000)], 1).unwrap();
        assert_eq!(s.requests[1].connect_to, t(2000).connect_to);
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
        expand_requests(&mut s, &[t(1000), t(2000)], 1).unwrap();
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
            (
                "[deployment]\nregions = [\"eu\", \"eu\"]\n",
                "deployment.regions[1]",
            ),
            (
                "[deployment]\nregions = [\"a b\"]\n",
                "deployment.regions[0]",
            ),
            (
                "[deployment]\nregions = [\"eu\"]\nconnector_region = \"us\"\n",
                "deployment.connector_region",
            ),
            (
                "[deployment]\nregions = [\"eu\"]\n[wan.tunnel.us]\ndelay = \"1ms\"\n",
                "wan.tunnel.us",
            ),
            (
                "[deployment]\nregions = [\"eu\"]\n[wan.mesh.eu]\nloss = 3.0\n",
                "wan.mesh.eu",
            ),
            (
                "[deployment]\nregions = [\"eu\"]\n[wan.mesh.eu]\ndelai = \"1ms\"\n",
                "delai",
            ),
            (
                "[deployment]\nregions = [\"eu\"]\n[wan.mesh.eu]\nseed = 1\n",
                "wan.mesh.eu.seed",
            ),
            // The (from, to) pairs: both regions must exist, and the table
            // is named in every error.
            (
                "[deployment]\nregions = [\"eu\"]\n[wan.mesh.eu.us]\ndelay = \"1ms\"\n",
                "`wan.mesh.eu.us`: there is no region `us` (the regions are eu)",
            ),
            (
                "[deployment]\nregions = [\"eu\"]\n[wan.mesh.asia.eu]\ndelay = \"1ms\"\n",
                "`wan.mesh.asia.eu`: there is no region `asia` (the regions are eu)",
            ),
            (
                "[deployment]\nregions = [\"eu\"]\n[wan.mesh.eu.eu]\ndelai = \"1ms\"\n",
                "invalid [wan.mesh.eu.eu] table: unknown field `delai`",
            ),
            (
                "[deployment]\nregions = [\"eu\"]\n[wan.mesh.eu.eu]\nloss = 3.0\n",
                "`wan.mesh.eu.eu` is invalid",
            ),
            (
                "[deployment]\nregions = [\"eu\"]\n[wan.mesh.eu.eu]\nrate = \"fast\"\n",
                "`wan.mesh.eu.eu.rate` is invalid",
            ),
            (
                "[deployment]\nregions = [\"eu\"]\n[wan.mesh.eu.eu]\nseed = 1\n",
                "wan.mesh.eu.eu.seed",
            ),
            (
                "[deployment]\nregions = [\"eu\"]\n[wan.mesh.eu.eu.eu]\ndelay = \"1ms\"\n",
                "invalid [wan.mesh.eu.eu] table: unknown field `eu`",
            ),
            (
                "[deployment]\nregions = [\"eu\"]\n[wan.mesh.eu]\neu = 3\n",
                "invalid [wan.mesh.eu] table: unknown field `eu`",
            ),
            (
                "[deployment]\nregions = [\"eu\"]\n[wan]\nmesh = 3\n",
                "`wan.mesh` is invalid: must be a table of regions",
            ),
            // Pairs are the mesh's only: the tunnel paths are per region.
            (
                "[deployment]\nregions = [\"eu\"]\n[wan.tunnel.eu.eu]\ndelay = \"1ms\"\n",
                "invalid [wan.tunnel.eu] table: unknown field `eu`",
            ),
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
        // What chaos actions name must exist; errors say which action.
        for (chaos, needle) in [
            (
                "action = \"kill\"\ntarget = \"region\"\nregion = \"asia\"",
                "the regions are eu, us",
            ),
            (
                "action = \"kill\"\ntarget = \"edge\"\nregion = \"us\"\ninstance = 2",
                "no edge 2 in region us",
            ),
            (
                "action = \"kill\"\ntarget = \"edge\"\ninstance = 4",
                "no edge 4",
            ),
            (
                "action = \"restart\"\ntarget = \"connector\"\ninstance = 2",
                "no connector 2",
            ),
            (
                "action = \"delay\"\npath = \"mesh:region:asia\"\ndelay = \"1ms\"",
                "the regions are eu, us",
            ),
            ("action = \"blackhole\"\npath = \"edge9\"", "edge0..edge3"),
            (
                "action = \"blackhole\"\npath = \"mesh:eu>asia\"",
                "there is no region `asia` (the regions are eu, us)",
            ),
            (
                "action = \"blackhole\"\npath = \"mesh:asia>eu\"",
                "there is no region `asia` (the regions are eu, us)",
            ),
            (
                "action = \"blackhole\"\npath = \"eu>us\"",
                "there is no WAN path `eu>us`",
            ),
        ] {
            let text = format!(
                "{BASE}\n[[chaos]]\nat = \"1s\"\n{chaos}\n[deployment]\nregions = [\"eu\", \"us\"]\n"
            );
            let e = DeployFile::from_toml(&text).unwrap_err();
            let msg = portico_agent::error_chain(&e).to_string();
            assert!(
                msg.contains("chaos[0]") && msg.contains(needle),
                "{needle} not in {msg}"
            );
        }
        // The unknown region's error names the valid ones.
        let e = DeployFile::from_toml(&format!(
            "{BASE}\n[deployment]\nregions = [\"eu\", \"us\"]\nconnector_region = \"asia\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("eu, us"), "{e}");
    }

    #[test]
    fn regions_and_the_wan_matrix() {
        let f = DeployFile::from_toml(&format!(
            r#"{BASE}
            [deployment]
            regions = ["eu", "us"]
            edges = 3
            connector_region = "eu"
            [wan]
            delay = "5ms"
            seed = 7
            [wan.tunnel.us]
            delay = "60ms"
            [wan.mesh.eu]
            delay = "40ms"
            jitter = "1ms"
            [wan.mesh.us.eu]
            delay = "70ms"
            "#
        ))
        .unwrap();
        let (eu, us) = (RegionId::new("eu").unwrap(), RegionId::new("us").unwrap());
        assert_eq!(f.deployment.region_ids().unwrap(), [eu.clone(), us.clone()]);
        assert_eq!(f.deployment.pinned_region().unwrap(), Some(eu.clone()));
        let ms = Duration::from_millis;
        assert_eq!(f.tunnel_impairment(&eu).unwrap().delay, ms(5));
        assert_eq!(f.tunnel_impairment(&us).unwrap().delay, ms(60));
        assert_eq!(f.mesh_impairment(&eu).unwrap().delay, ms(40));
        assert_eq!(f.mesh_impairment(&eu).unwrap().jitter, ms(1));
        assert_eq!(f.mesh_impairment(&us).unwrap(), Impairment::none());
        // A pair of its own for us→eu; the rest from the table of their
        // target region, or none.
        let pair = |from: &RegionId, to: &RegionId| f.mesh_pair_impairment(from, to).unwrap();
        assert_eq!(pair(&us, &eu), Impairment::delay(ms(70)));
        assert_eq!(pair(&eu, &eu), f.mesh_impairment(&eu).unwrap());
        assert_eq!(pair(&eu, &us), Impairment::none());
        assert_eq!(pair(&us, &us), Impairment::none());
        assert!(!f.mesh_wan.contains_key("us"), "{:?}", f.mesh_wan);
        // A region's table may hold its own fields and its pairs.
        let f = DeployFile::from_toml(&format!(
            r#"{BASE}
            [deployment]
            regions = ["eu", "us"]
            [wan.mesh.us]
            delay = "9ms"
            [wan.mesh.us.eu]
            delay = "70ms"
            [wan.mesh.eu.eu]
            delay = "1ms"
            "#
        ))
        .unwrap();
        let pair = |from: &RegionId, to: &RegionId| f.mesh_pair_impairment(from, to).unwrap();
        assert_eq!(pair(&us, &eu).delay, ms(70));
        assert_eq!(pair(&eu, &us).delay, ms(9));
        assert_eq!(pair(&us, &us).delay, ms(9));
        assert_eq!(pair(&eu, &eu).delay, ms(1));
        assert!(!f.mesh_wan.contains_key("eu"), "{:?}", f.mesh_wan);
        // Without regions: the default one, connectors auto.
        let f = DeployFile::from_toml(BASE).unwrap();
        assert_eq!(
            f.deployment.region_ids().unwrap(),
            [RegionId::default_region()]
        );
        assert_eq!(f.deployment.pinned_region().unwrap(), None);
        // More edges than MAX_INSTANCES over all regions.
        let e = DeployFile::from_toml(&format!(
            "{BASE}\n[deployment]\nregions = [\"a\", \"b\", \"c\"]\nedges = 11\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("deployment.edges"), "{e}");
    }

    #[test]
    fn chaos_path_names_pick_mesh_relays_by_target_and_source() {
        let (eu, us) = (RegionId::new("eu").unwrap(), RegionId::new("us").unwrap());
        let layout = Layout {
            regions: vec![eu.clone(), us.clone()],
            edges: vec![eu.clone(), eu.clone(), us.clone(), us.clone()],
            connectors: 1,
        };
        // Every mesh relay: into each of the four edges, from each region.
        let all: Vec<(RegionId, usize)> = (0..4)
            .flat_map(|to| [(eu.clone(), to), (us.clone(), to)])
            .collect();
        let picked = |name: &str| -> Vec<(RegionId, usize)> {
            let pick = layout.path_pick(name).unwrap();
            all.iter()
                .filter(|(from, to)| pick.picks_mesh(from, *to))
                .cloned()
                .collect()
        };
        assert_eq!(picked("mesh:*"), all);
        assert_eq!(picked("mesh:edge1"), [(eu.clone(), 1), (us.clone(), 1)]);
        assert_eq!(
            picked("mesh:region:us"),
            [
                (eu.clone(), 2),
                (us.clone(), 2),
                (eu.clone(), 3),
                (us.clone(), 3)
            ]
        );
        assert_eq!(picked("mesh:us>eu"), [(us.clone(), 0), (us.clone(), 1)]);
        assert_eq!(picked("mesh:eu>eu"), [(eu.clone(), 0), (eu.clone(), 1)]);
        // A tunnel path name picks no mesh relay.
        assert_eq!(picked("region:eu"), []);
        let tunnel = layout.path_pick("region:eu").unwrap();
        assert_eq!((tunnel.kind, tunnel.edges), (PathKind::Tunnel, vec![0, 1]));
    }
}
