//! The scenario: what to send, how fast, for how long, and what to break on
//! the way. Loaded from TOML (`Scenario::load`) or built by the CLI from
//! flags, then checked by [`Scenario::validate`], whose errors name the
//! field at fault.
//!
//! ```toml
//! mode = "open"            # open (constant arrival rate) | closed (N workers)
//! protocol = "h2"          # h1 | h2 | h3
//! connections = 8
//! duration = "30s"         # and/or count = 10000; at least one bound
//! rate = 500               # open loop: requests per second
//! connect_to = "127.0.0.1:8443"   # or a list: ["127.0.0.1:8443", "127.0.0.1:9443"]
//! cacert = "ca.pem"
//!
//! [[stages]]               # optional ramps; replace `rate`/`concurrency`
//! duration = "10s"
//! rate = 1000              # target at the end of the stage (linear ramp)
//!
//! [[requests]]             # the request mix, picked by weight
//! url = "https://hello.apps.localhost:8443/"
//! method = "POST"
//! body_size = 1024
//! weight = 3
//! headers = { "x-test" = "1" }
//!
//! [[chaos]]
//! at = "12s"
//! action = "kill"          # kill | restart | blackhole | unblackhole | delay
//! target = "connector"     # connector | edge | region | router (kill/restart)
//! # instance = 0           # which one; region = "eu" for edges of a region
//! # path = "edge0"         # blackhole, unblackhole, delay: a WAN path
//! # delay = "80ms"         # delay: the new one-way delay (jitter, loss too)
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ScenarioError;
use crate::thresholds::Thresholds;

/// Largest request body a scenario may ask for.
pub const MAX_BODY_SIZE: u64 = 256 << 20;
/// Most connections per origin.
pub const MAX_CONNECTIONS: usize = 65_536;
/// Most closed-loop workers.
pub const MAX_CONCURRENCY: u32 = 100_000;
/// Most entries in a request mix (each keeps a ~26 KiB latency histogram).
pub const MAX_REQUEST_MIX: usize = 1000;
/// Highest open-loop rate (requests per second).
pub const MAX_RATE: f64 = 10_000_000.0;

/// A load test, as written in a scenario file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A label for the report.
    #[serde(default)]
    pub name: Option<String>,
    /// Open loop (constant arrival rate) or closed loop (N workers).
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub protocol: Protocol,
    /// Connections per origin (kept alive and reused).
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Dial a fresh connection (TCP+TLS, or QUIC) for every request.
    #[serde(default)]
    pub new_connection_per_request: bool,
    /// Stop sending after this long (the sum of the stages if there are any).
    #[serde(default, with = "humantime_serde")]
    pub duration: Option<Duration>,
    /// Stop after sending this many requests.
    #[serde(default)]
    pub count: Option<u64>,
    /// Open loop: requests per second (when there are no stages).
    #[serde(default)]
    pub rate: Option<f64>,
    /// Closed loop: concurrent workers (when there are no stages).
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Rate at the start of the first stage (default: the first stage's).
    #[serde(default)]
    pub start_rate: Option<f64>,
    /// Concurrency at the start of the first stage (default: the first stage's).
    #[serde(default)]
    pub start_concurrency: Option<u32>,
    /// Ramp stages: each goes linearly from the previous target to its own.
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// Per-request timeout, from the intended send time.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Open loop: most requests in flight; beyond it the scheduler waits
    /// (latency still counts from the intended time).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Dial these addresses whatever the URL's host (curl's `--connect-to`);
    /// the host still goes into SNI and `Host`. TOML takes one address
    /// (`"127.0.0.1:8443"`) or a list. With several, a pool's connections
    /// are spread round robin over them, and a connection that cannot be
    /// opened at one is opened at the next (see [`crate::client`]).
    #[serde(default, deserialize_with = "one_or_many")]
    pub connect_to: Vec<SocketAddr>,
    /// PEM file of CA certificates to trust (instead of none).
    #[serde(default)]
    pub cacert: Option<PathBuf>,
    /// Accept any server certificate.
    #[serde(default)]
    pub insecure: bool,
    /// The request mix.
    #[serde(default)]
    pub requests: Vec<RequestSpec>,
    /// Fault injection at given times.
    #[serde(default)]
    pub chaos: Vec<ChaosAction>,
    /// Pass/fail criteria checked against the report.
    #[serde(default)]
    pub thresholds: Thresholds,
}

/// Most `connect_to` addresses.
pub const MAX_CONNECT_TO: usize = 64;

/// `connect_to`: one address or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(
        untagged,
        expecting = "an address (\"ip:port\") or a list of addresses"
    )]
    enum OneOrMany {
        One(SocketAddr),
        Many(Vec<SocketAddr>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(a) => vec![a],
        OneOrMany::Many(v) => v,
    })
}

fn default_connections() -> usize {
    1
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_in_flight() -> usize {
    10_000
}

/// Open or closed loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Constant arrival rate; latency from the intended send time.
    #[default]
    Open,
    /// N workers, each sending its next request when the last one ends.
    Closed,
}

/// The HTTP version to speak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (one request at a time per connection).
    #[default]
    H1,
    /// HTTP/2 (multiplexed; prior knowledge over plain http).
    H2,
    /// HTTP/3 over QUIC (https only).
    H3,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::H1 => "h1",
            Protocol::H2 => "h2",
            Protocol::H3 => "h3",
        }
    }
}

/// One ramp stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Open loop: the rate reached at the end of the stage.
    #[serde(default)]
    pub rate: Option<f64>,
    /// Closed loop: the concurrency reached at the end of the stage.
    #[serde(default)]
    pub concurrency: Option<u32>,
}

/// One kind of request in the mix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    pub url: String,
    #[serde(default = "default_method")]
    pub method: String,
    /// Bytes of request body (zeros).
    #[serde(default)]
    pub body_size: u64,
    /// Relative share of the mix.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Dial these addresses for this request instead of the scenario's
    /// `connect_to` (one or a list, the same failover).
    #[serde(
        default,
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub connect_to: Vec<SocketAddr>,
}

fn default_method() -> String {
    "GET".to_owned()
}
fn default_weight() -> u32 {
    1
}

impl RequestSpec {
    /// A GET of `url`.
    pub fn get(url: impl Into<String>) -> RequestSpec {
        RequestSpec {
            url: url.into(),
            method: default_method(),
            body_size: 0,
            weight: 1,
            headers: BTreeMap::new(),
            connect_to: Vec::new(),
        }
    }
}

/// A fault to inject at time `at` after the start of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosAction {
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    pub action: ChaosVerb,
    /// The component to kill or restart.
    #[serde(default)]
    pub target: Option<Component>,
    /// Which instance (0-based) when a deployment has several; all if unset.
    #[serde(default)]
    pub instance: Option<usize>,
    /// The region of the edges to kill or restart (`target = "region"`,
    /// or `"edge"` with `instance` counted within the region).
    #[serde(default)]
    pub region: Option<String>,
    /// The WAN path to (un)blackhole or delay, as the deployment names it.
    #[serde(default)]
    pub path: Option<String>,
    /// `delay`: the path's new one-way delay, both directions.
    #[serde(default, with = "humantime_serde")]
    pub delay: Option<Duration>,
    /// `delay`: the new jitter (unchanged when unset).
    #[serde(default, with = "humantime_serde")]
    pub jitter: Option<Duration>,
    /// `delay`: the new loss probability (unchanged when unset).
    #[serde(default)]
    pub loss: Option<f64>,
}

impl ChaosAction {
    /// `action` at `at`, with no target, instance, region or path.
    pub fn new(at: Duration, action: ChaosVerb) -> ChaosAction {
        ChaosAction {
            at,
            action,
            target: None,
            instance: None,
            region: None,
            path: None,
            delay: None,
            jitter: None,
            loss: None,
        }
    }

    /// Checks that the action has what its verb needs and nothing else;
    /// errors name `chaos[i].field`. Whether the target, region or path
    /// exists is for the deployment to say when it acts.
    pub fn validate(&self, i: usize) -> Result<(), ScenarioError> {
        let field = |f: &str| format!("chaos[{i}].{f}");
        let wrong = |f: &str, why: &str| Err(ScenarioError::invalid(field(f), why.to_owned()));
        let has_delay = self.delay.is_some() || self.jitter.is_some() || self.loss.is_some();
        match self.action {
            ChaosVerb::Kill | ChaosVerb::Restart => {
                let Some(target) = self.target else {
                    return Err(ScenarioError::Missing {
                        field: field("target"),
                        hint: "kill and restart need target = connector, edge, region or router",
                    });
                };
                if self.path.is_some() {
                    return wrong("path", "only blackhole, unblackhole and delay take a path");
                }
                if has_delay {
                    return wrong("delay", "only the delay action takes delay, jitter or loss");
                }
                match target {
                    Component::Region if self.region.as_deref().is_none_or(str::is_empty) => {
                        return Err(ScenarioError::Missing {
                            field: field("region"),
                            hint: "target = \"region\" needs region = the region's name",
                        })
                    }
                    Component::Region if self.instance.is_some() => {
                        return wrong(
                            "instance",
                            "a region target is every edge of it; use target = \"edge\" with region and instance for one",
                        )
                    }
                    Component::Connector | Component::Router if self.region.is_some() => {
                        return wrong("region", "only edge and region targets take a region")
                    }
                    _ => {}
                }
            }
            ChaosVerb::Blackhole | ChaosVerb::Unblackhole | ChaosVerb::Delay => {
                if self.path.as_deref().is_none_or(str::is_empty) {
                    return Err(ScenarioError::Missing {
                        field: field("path"),
                        hint: "blackhole, unblackhole and delay need the WAN path's name",
                    });
                }
                if self.target.is_some() {
                    return wrong("target", "only kill and restart take a target");
                }
                if self.instance.is_some() || self.region.is_some() {
                    return wrong(
                        if self.instance.is_some() {
                            "instance"
                        } else {
                            "region"
                        },
                        "a WAN path is named by `path` alone (e.g. \"edge0\" or \"region:eu\")",
                    );
                }
                if self.action == ChaosVerb::Delay {
                    if !has_delay {
                        return Err(ScenarioError::Missing {
                            field: field("delay"),
                            hint: "the delay action needs delay (and/or jitter, loss)",
                        });
                    }
                    if self.loss.is_some_and(|l| !(0.0..=1.0).contains(&l)) {
                        return wrong("loss", "must be between 0 and 1");
                    }
                } else if has_delay {
                    return wrong("delay", "only the delay action takes delay, jitter or loss");
                }
            }
        }
        Ok(())
    }
}

/// What a chaos action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChaosVerb {
    Kill,
    Restart,
    Blackhole,
    Unblackhole,
    /// Set a WAN path's delay (and jitter, loss) while the load runs.
    Delay,
}

/// A part of a deployment that chaos can kill or restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    Connector,
    Edge,
    /// Every edge of a region.
    Region,
    Router,
}

impl fmt::Display for ChaosAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.action {
            ChaosVerb::Kill => "kill",
            ChaosVerb::Restart => "restart",
            ChaosVerb::Blackhole => "blackhole",
            ChaosVerb::Unblackhole => "unblackhole",
            ChaosVerb::Delay => "delay",
        };
        f.write_str(verb)?;
        if let Some(t) = self.target {
            let t = match t {
                Component::Connector => "connector",
                Component::Edge => "edge",
                Component::Region => "region",
                Component::Router => "router",
            };
            write!(f, " {t}")?;
            if let Some(r) = &self.region {
                write!(f, " {r}")?;
            }
            if let Some(i) = self.instance {
                write!(f, "[{i}]")?;
            }
        }
        if let Some(p) = &self.path {
            write!(f, " {p}")?;
        }
        if let Some(d) = self.delay {
            write!(f, " {}", humantime::format_duration(d))?;
        }
        if let Some(j) = self.jitter {
            write!(f, " ±{}", humantime::format_duration(j))?;
        }
        if let Some(l) = self.loss {
            write!(f, " loss {l}")?;
        }
        Ok(())
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: None,
            mode: Mode::Open,
            protocol: Protocol::H1,
            connections: default_connections(),
            new_connection_per_request: false,
            duration: None,
            count: None,
            rate: None,
            concurrency: None,
            start_rate: None,
            start_concurrency: None,
            stages: Vec::new(),
            timeout: default_timeout(),
            max_in_flight: default_max_in_flight(),
            connect_to: Vec::new(),
            cacert: None,
            insecure: false,
            requests: Vec::new(),
            chaos: Vec::new(),
            thresholds: Thresholds::default(),
        }
    }
}

/// A stage after validation: how long, and the load at its start and end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Ramp {
    /// `None`: until the count bound.
    pub duration: Option<Duration>,
    pub from: f64,
    pub to: f64,
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_owned(),
            source,
        })?;
        Scenario::from_toml(&text)
    }

    /// Parses and validates scenario TOML.
    pub fn from_toml(text: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Toml {
            source: Box::new(e),
        })?;
        s.validate()?;
        Ok(s)
    }

    /// Checks everything the runner relies on.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        self.thresholds.validate()?;
        if self.requests.is_empty() {
            return Err(ScenarioError::Missing {
                field: "requests".into(),
                hint: "give at least one [[requests]] entry with a url",
            });
        }
        if self.requests.len() > MAX_REQUEST_MIX {
            return Err(ScenarioError::invalid(
                "requests",
                format!("{} entries; at most {MAX_REQUEST_MIX}", self.requests.len()),
            ));
        }
        for (i, r) in self.requests.iter().enumerate() {
            let field = |f: &str| format!("requests[{i}].{f}");
            let url = url::Url::parse(&r.url)
                .map_err(|e| ScenarioError::invalid(field("url"), e.to_string()))?;
            match url.scheme() {
                "https" => {}
                "http" if self.protocol != Protocol::H3 => {}
                "http" => {
                    return Err(ScenarioError::invalid(
                        field("url"),
                        "HTTP/3 needs an https URL",
                    ))
                }
                s => {
                    return Err(ScenarioError::invalid(
                        field("url"),
                        format!("scheme `{s}` is not http or https"),
                    ))
                }
            }
            if url.host_str().is_none_or(str::is_empty) {
                return Err(ScenarioError::invalid(field("url"), "the URL has no host"));
            }
            http::Method::from_bytes(r.method.as_bytes()).map_err(|_| {
                ScenarioError::invalid(field("method"), format!("`{}` is not a method", r.method))
            })?;
            if r.body_size > MAX_BODY_SIZE {
                return Err(ScenarioError::invalid(
                    field("body_size"),
                    format!("{} exceeds the maximum of {MAX_BODY_SIZE}", r.body_size),
                ));
            }
            for (k, v) in &r.headers {
                http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                    ScenarioError::invalid(field("headers"), format!("`{k}` is not a header name"))
                })?;
                http::HeaderValue::from_str(v).map_err(|_| {
                    ScenarioError::invalid(
                        field("headers"),
                        format!("the value of `{k}` is not a valid header value"),
                    )
                })?;
            }
        }
        if self.requests.iter().all(|r| r.weight == 0) {
            return Err(ScenarioError::invalid(
                "requests[].weight",
                "at least one weight must be above 0",
            ));
        }
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return Err(ScenarioError::invalid(
                "connections",
                format!("must be between 1 and {MAX_CONNECTIONS}"),
            ));
        }
        if self.connect_to.len() > MAX_CONNECT_TO {
            return Err(ScenarioError::invalid(
                "connect_to",
                format!(
                    "{} addresses; at most {MAX_CONNECT_TO}",
                    self.connect_to.len()
                ),
            ));
        }
        if self.max_in_flight == 0 {
            return Err(ScenarioError::invalid(
                "max_in_flight",
                "must be at least 1",
            ));
        }
        if self.timeout.is_zero() {
            return Err(ScenarioError::invalid("timeout", "must be above 0"));
        }
        if self.count == Some(0) {
            return Err(ScenarioError::invalid("count", "must be at least 1"));
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return Err(ScenarioError::invalid("duration", "must be above 0"));
        }
        if self.insecure && self.cacert.is_some() {
            return Err(ScenarioError::invalid(
                "insecure",
                "give either `insecure` or `cacert`, not both",
            ));
        }
        self.ramps()?;
        if self.duration.is_none() && self.count.is_none() && self.stages.is_empty() {
            return Err(ScenarioError::Missing {
                field: "duration".into(),
                hint: "bound the run with `duration`, `count` or `stages`",
            });
        }
        for (i, r) in self.requests.iter().enumerate() {
            if r.connect_to.len() > MAX_CONNECT_TO {
                return Err(ScenarioError::invalid(
                    format!("requests[{i}].connect_to"),
                    format!("{} addresses; at most {MAX_CONNECT_TO}", r.connect_to.len()),
                ));
            }
        }
        for (i, c) in self.chaos.iter().enumerate() {
            c.validate(i)?;
        }
        Ok(())
    }

    /// The load profile as ramps of rate (open) or concurrency (closed).
    pub(crate) fn ramps(&self) -> Result<Vec<Ramp>, ScenarioError> {
        let (level_name, top, start) = match self.mode {
            Mode::Open => ("rate", self.rate, self.start_rate),
            Mode::Closed => (
                "concurrency",
                self.concurrency.map(f64::from),
                self.start_concurrency.map(f64::from),
            ),
        };
        let other = match self.mode {
            Mode::Open => self.concurrency.is_some() || self.start_concurrency.is_some(),
            Mode::Closed => self.rate.is_some() || self.start_rate.is_some(),
        };
        if other {
            let (f, m) = match self.mode {
                Mode::Open => ("concurrency", "closed"),
                Mode::Closed => ("rate", "open"),
            };
            return Err(ScenarioError::invalid(
                f,
                format!("only applies to mode = \"{m}\""),
            ));
        }
        let check = |field: String, v: f64, allow_zero: bool| -> Result<f64, ScenarioError> {
            let max = match self.mode {
                Mode::Open => MAX_RATE,
                Mode::Closed => f64::from(MAX_CONCURRENCY),
            };
            if !v.is_finite() || v < 0.0 || (!allow_zero && v == 0.0) || v > max {
                return Err(ScenarioError::invalid(
                    field,
                    format!(
                        "{v} is out of range (must be {} and at most {max})",
                        if allow_zero { "≥ 0" } else { "> 0" }
                    ),
                ));
            }
            Ok(v)
        };
        if self.stages.is_empty() {
            let Some(level) = top else {
                return Err(ScenarioError::Missing {
                    field: level_name.into(),
                    hint: "set the load level, or give [[stages]]",
                });
            };
            let level = check(level_name.into(), level, false)?;
            if start.is_some() {
                return Err(ScenarioError::invalid(
                    format!("start_{level_name}"),
                    "only applies with [[stages]]",
                ));
            }
            return Ok(vec![Ramp {
                duration: self.duration,
                from: level,
                to: level,
            }]);
        }
        if top.is_some() {
            return Err(ScenarioError::invalid(
                level_name,
                "give the level in each stage instead when there are [[stages]]",
            ));
        }
        let mut ramps = Vec::with_capacity(self.stages.len());
        let mut prev = None;
        for (i, s) in self.stages.iter().enumerate() {
            let (v, wrong) = match self.mode {
                Mode::Open => (s.rate, s.concurrency.is_some()),
                Mode::Closed => (s.concurrency.map(f64::from), s.rate.is_some()),
            };
            if wrong {
                return Err(ScenarioError::invalid(
                    format!("stages[{i}]"),
                    format!("a {} stage takes `{level_name}`", mode_name(self.mode)),
                ));
            }
            let Some(v) = v else {
                return Err(ScenarioError::Missing {
                    field: format!("stages[{i}].{level_name}"),
                    hint: "each stage gives the level reached at its end",
                });
            };
            let to = check(format!("stages[{i}].{level_name}"), v, true)?;
            if s.duration.is_zero() {
                return Err(ScenarioError::invalid(
                    format!("stages[{i}].duration"),
                    "must be above 0",
                ));
            }
            let from = match prev {
                Some(p) => p,
                None => match start {
                    Some(s) => check(format!("start_{level_name}"), s, true)?,
                    None => to,
                },
            };
            ramps.push(Ramp {
                duration: Some(s.duration),
                from,
                to,
            });
            prev = Some(to);
        }
        if ramps.iter().all(|r| r.from == 0.0 && r.to == 0.0) {
            return Err(ScenarioError::invalid(
                "stages",
                format!("every stage has {level_name} 0"),
            ));
        }
        Ok(ramps)
    }

    /// How long the sending phase lasts at most (`None`: until `count`).
    pub fn total_duration(&self) -> Option<Duration> {
        let staged = if self.stages.is_empty() {
            None
        } else {
            Some(self.stages.iter().map(|s| s.duration).sum::<Duration>())
        };
        match (staged, self.duration) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Open => "open-loop",
        Mode::Closed => "closed-loop",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Scenario {
        Scenario {
            rate: Some(10.0),
            duration: Some(Duration::from_secs(1)),
            requests: vec![RequestSpec::get("https://a.apps.localhost:8443/")],
            ..Scenario::default()
        }
    }

    fn err_field(s: &Scenario) -> String {
        match s.validate().unwrap_err() {
            ScenarioError::Invalid { field, .. } | ScenarioError::Missing { field, .. } => field,
            e => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn a_request_mix_is_bounded() {
        let mut s = base();
        s.requests = vec![RequestSpec::get("https://a.apps.localhost:8443/"); MAX_REQUEST_MIX + 1];
        assert_eq!(err_field(&s), "requests");
        s.requests.truncate(MAX_REQUEST_MIX);
        s.validate().unwrap();
    }

    #[test]
    fn every_example_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 3, "expected example scenarios in {}", dir.display());
    }

    #[test]
    fn full_scenario_parses() {
        let s = Scenario::from_toml(
            r#"
            name = "ramp"
            mode = "open"
            protocol = "h2"
            connections = 4
            start_rate = 10
            connect_to = "127.0.0.1:8443"
            insecure = true
            [[stages]]
            duration = "2s"
            rate = 100
            [[stages]]
            duration = "1s"
            rate = 100
            [[requests]]
            url = "https://hello.apps.localhost:8443/x"
            method = "POST"
            body_size = 10
            weight = 2
            headers = { "x-a" = "b" }
            [[chaos]]
            at = "1500ms"
            action = "kill"
            target = "connector"
            [[chaos]]
            at = "2s"
            action = "blackhole"
            path = "eu"
            [[chaos]]
            at = "2500ms"
            action = "delay"
            path = "region:eu"
            delay = "80ms"
            [[chaos]]
            at = "2600ms"
            action = "kill"
            target = "region"
            region = "us"
            "#,
        )
        .unwrap();
        assert_eq!(s.protocol, Protocol::H2);
        assert_eq!(s.total_duration(), Some(Duration::from_secs(3)));
        let r = s.ramps().unwrap();
        assert_eq!((r[0].from, r[0].to, r[1].from), (10.0, 100.0, 100.0));
        assert_eq!(s.chaos[0].at, Duration::from_millis(1500));
        assert_eq!(s.chaos[0].to_string(), "kill connector");
        assert_eq!(s.chaos[1].to_string(), "blackhole eu");
        assert_eq!(s.chaos[2].delay, Some(Duration::from_millis(80)));
        assert_eq!(s.chaos[2].to_string(), "delay region:eu 80ms");
        assert_eq!(s.chaos[3].to_string(), "kill region us");
        assert_eq!(s.connect_to, ["127.0.0.1:8443".parse().unwrap()]);
    }

    #[test]
    fn connect_to_takes_one_address_or_a_list() {
        let base = "rate = 1\ncount = 1\n[[requests]]\nurl = \"https://a/\"\n";
        let s = Scenario::from_toml(&format!(
            "connect_to = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n{base}"
        ))
        .unwrap();
        assert_eq!(
            s.connect_to,
            [
                "127.0.0.1:1".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:2".parse().unwrap()
            ]
        );
        assert!(Scenario::from_toml(base).unwrap().connect_to.is_empty());
        let e = Scenario::from_toml(&format!("connect_to = \"nowhere\"\n{base}")).unwrap_err();
        let text = portico_agent::error_chain(&e).to_string();
        assert!(text.contains("connect_to"), "{text}");
    }

    #[test]
    fn errors_name_the_field() {
        let mut s = base();
        s.requests[0].url = "ftp://x/".into();
        assert_eq!(err_field(&s), "requests[0].url");

        let mut s = base();
        s.requests.push(RequestSpec::get("https://b/"));
        s.requests[1].method = "GE T".into();
        assert_eq!(err_field(&s), "requests[1].method");

        let mut s = base();
        s.rate = None;
        assert_eq!(err_field(&s), "rate");

        let mut s = base();
        s.rate = Some(-1.0);
        assert_eq!(err_field(&s), "rate");

        let mut s = base();
        s.duration = None;
        assert_eq!(err_field(&s), "duration");

        let mut s = base();
        s.mode = Mode::Closed;
        assert_eq!(err_field(&s), "rate");

        let mut s = base();
        s.rate = None;
        s.stages = vec![Stage {
            duration: Duration::from_secs(1),
            rate: None,
            concurrency: None,
        }];
        assert_eq!(err_field(&s), "stages[0].rate");

        let mut s = base();
        s.chaos
            .push(ChaosAction::new(Duration::ZERO, ChaosVerb::Kill));
        assert_eq!(err_field(&s), "chaos[0].target");

        let mut s = base();
        s.chaos.push(ChaosAction {
            target: Some(Component::Region),
            ..ChaosAction::new(Duration::ZERO, ChaosVerb::Kill)
        });
        assert_eq!(err_field(&s), "chaos[0].region");

        let mut s = base();
        s.chaos.push(ChaosAction {
            path: Some("edge0".into()),
            ..ChaosAction::new(Duration::ZERO, ChaosVerb::Delay)
        });
        assert_eq!(err_field(&s), "chaos[0].delay");

        let mut s = base();
        s.protocol = Protocol::H3;
        s.requests[0].url = "http://a/".into();
        assert_eq!(err_field(&s), "requests[0].url");

        let mut s = base();
        s.connections = 0;
        assert_eq!(err_field(&s), "connections");

        let mut s = base();
        s.requests[0].body_size = MAX_BODY_SIZE + 1;
        assert_eq!(err_field(&s), "requests[0].body_size");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = Scenario::from_toml("rate = 1\nduration = \"1s\"\nrat = 2\n").unwrap_err();
        let text = portico_agent::error_chain(&e).to_string();
        assert!(text.contains("rat"), "{text}");
        let e = Scenario::from_toml(
            "rate = 1\ncount = 3\n[[requests]]\nurl = \"https://a/\"\nbody = 1\n",
        )
        .unwrap_err();
        let text = portico_agent::error_chain(&e).to_string();
        assert!(text.contains("body"), "{text}");
    }
}
