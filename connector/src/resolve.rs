//! Tunnel endpoints by name: CNAME-chain-aware resolution of the host of an
//! edge's `tunnel_addr`, with a cache for the minimum TTL along the chain
//! and the last good answer saved in the state directory
//! (ARCHITECTURE.md, "Resolving tunnel endpoints").
//!
//! - [`walk`] follows a chain hop by hop through any [`Lookup`]: a `CNAME`
//!   query per name (so each hop's TTL is the authoritative one, not one
//!   a resolver clamped), then `A` and `AAAA` at the end of the chain. At
//!   most [`MAX_CNAME_HOPS`] hops, a name seen twice is a loop, and every
//!   error prints the chain it saw (`a.example -> b.example -> a.example:
//!   CNAME loop`). No sockets, no clock: the tests drive it with a fake.
//! - [`Cache`] keeps each answer until the minimum TTL of its chain runs
//!   out (clamped to [`MIN_TTL`]..=[`MAX_TTL`]), at most [`MAX_CACHED`]
//!   names, with `now` passed in.
//! - [`Resolver`] is the driver: hickory-resolver pointed at the
//!   configured nameservers (else those of `/etc/resolv.conf`), with its
//!   own cache off; the last good answer per name, in memory and in
//!   [`SAVED_FILE`], answers (with a warning naming the error and the
//!   answer's age) when DNS fails, so a connector that ran once starts and
//!   attaches while DNS is down.
//! - [`run`] sits between the region chooser and the slots: it expands
//!   every chosen edge whose host is a name into one target per address
//!   (`Pool::targets`), re-resolves when the cache runs out, and publishes
//!   the new targets when an answer changes: the slots then move their
//!   tunnels make-before-break, as for any change of targets.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use portico_agent::StateDir;
use portico_proto::api::EdgeEndpoint;
use portico_proto::ids::{EdgeId, RegionId};
use serde::{Deserialize, Serialize};

use crate::error::{Chain, ResolveError};
use crate::metrics::Metrics;
use crate::tunnel::{DialError, Pool};

/// The most CNAME hops followed from the name asked.
pub const MAX_CNAME_HOPS: usize = 8;
/// The shortest an answer is cached (a TTL of 0 would re-resolve in a loop).
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest an answer is cached, whatever its TTL.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// The most names cached, and saved.
pub const MAX_CACHED: usize = 64;
/// The most addresses kept of one answer.
pub const MAX_ADDRS: usize = 16;
/// The most nameservers asked; the `/etc/resolv.conf` reading is
/// shared with the router's checks.
pub use portico_agent::dns::MAX_NAMESERVERS;
/// The last good answer per name, in the state directory.
pub(crate) const SAVED_FILE: &str = "resolved-names.json";
/// How long one resolution (the whole chain) may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one query may take, and how often it is tried.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const QUERY_ATTEMPTS: usize = 2;
/// Names resolved at once.
const CONCURRENCY: usize = 8;
/// Retries after a failure: doubled from the first to the last.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A saved answer older than this is written again when confirmed, so its
/// age says when DNS last gave it.
const RESAVE_AFTER: Duration = Duration::from_secs(600);

/// The record types the walk asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Rtype {
    Cname,
    A,
    Aaaa,
}

impl Rtype {
    fn label(self) -> &'static str {
        match self {
            Rtype::Cname => "CNAME",
            Rtype::A => "A",
            Rtype::Aaaa => "AAAA",
        }
    }
}

/// The data of a record the walk uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rdata {
    Cname(String),
    Addr(IpAddr),
}

/// One record of an answer: owner name (lowercase, no final dot), TTL,
/// data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rr {
    pub name: String,
    pub ttl: u32,
    pub data: Rdata,
}

/// Why one query gave no records.
#[derive(Debug)]
pub(crate) enum QueryError {
    /// The name does not exist.
    NxDomain,
    /// The name exists without records of that type (NODATA).
    NoRecords,
    /// No answer: timeout, refused, SERVFAIL, no nameserver...
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// One query at a time: what the walk needs of DNS.
pub(crate) trait Lookup: Send + Sync {
    fn query(
        &self,
        name: &str,
        rtype: Rtype,
    ) -> impl Future<Output = Result<Vec<Rr>, QueryError>> + Send;
}

/// A resolved name: the chain from the name asked to the one holding the
/// addresses, the addresses (sorted, v4 first), and the minimum TTL along
/// the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub chain: Vec<String>,
    pub addrs: Vec<IpAddr>,
    pub ttl: u32,
}

impl Answer {
    /// CNAME hops followed.
    pub fn hops(&self) -> usize {
        self.chain.len().saturating_sub(1)
    }
}

/// Follows `qname`'s CNAME chain to its addresses. See the module docs.
pub(crate) async fn walk<L: Lookup>(lookup: &L, qname: &str) -> Result<Answer, ResolveError> {
    let mut chain = vec![qname.to_owned()];
    let mut ttl = u32::MAX;
    let chain_of = |c: &Vec<String>| Chain(c.clone());
    // Each round either follows a hop (bounded by MAX_CNAME_HOPS) or ends;
    // an A answer that shows a CNAME makes one more round at most per hop.
    for _ in 0..(2 * MAX_CNAME_HOPS + 2) {
        let cur = chain.last().cloned().unwrap_or_default();
        let next = match lookup.query(&cur, Rtype::Cname).await {
            Ok(rrs) => cname_of(&rrs, &cur),
            Err(QueryError::NoRecords) => None,
            Err(QueryError::NxDomain) => {
                return Err(ResolveError::NxDomain {
                    chain: chain_of(&chain),
                    name: cur,
                })
            }
            Err(QueryError::Failed(source)) => {
                return Err(ResolveError::Query {
                    chain: chain_of(&chain),
                    name: cur,
                    rtype: Rtype::Cname.label(),
                    source,
                })
            }
        };
        if let Some((target, hop_ttl)) = next {
            ttl = ttl.min(hop_ttl);
            let seen = chain.contains(&target);
            chain.push(target);
            if seen {
                return Err(ResolveError::Loop {
                    chain: chain_of(&chain),
                });
            }
            if chain.len() - 1 > MAX_CNAME_HOPS {
                return Err(ResolveError::TooDeep {
                    chain: chain_of(&chain),
                    max: MAX_CNAME_HOPS,
                });
            }
            continue;
        }
        // The end of the chain: its addresses.
        let mut addrs = Vec::new();
        let mut addr_ttl = u32::MAX;
        let mut became_cname = false;
        for rtype in [Rtype::A, Rtype::Aaaa] {
            match lookup.query(&cur, rtype).await {
                Ok(rrs) => {
                    for r in &rrs {
                        match &r.data {
                            Rdata::Addr(ip) if r.name == cur => {
                                let right = match rtype {
                                    Rtype::A => ip.is_ipv4(),
                                    _ => ip.is_ipv6(),
                                };
                                if right {
                                    addrs.push(*ip);
                                    addr_ttl = addr_ttl.min(r.ttl);
                                }
                            }
                            Rdata::Cname(_) if r.name == cur => became_cname = true,
                            _ => {}
                        }
                    }
                }
                Err(QueryError::NoRecords) => {}
                Err(QueryError::NxDomain) => {
                    return Err(ResolveError::NxDomain {
                        chain: chain_of(&chain),
                        name: cur,
                    })
                }
                // An AAAA query that fails after A answered: the v4
                // addresses are the answer (happy eyeballs would dial them).
                Err(QueryError::Failed(_)) if rtype == Rtype::Aaaa && !addrs.is_empty() => {}
                Err(QueryError::Failed(source)) => {
                    return Err(ResolveError::Query {
                        chain: chain_of(&chain),
                        name: cur,
                        rtype: rtype.label(),
                        source,
                    })
                }
            }
        }
        if addrs.is_empty() && became_cname {
            // The name turned into a CNAME between the queries: ask again.
            continue;
        }
        if addrs.is_empty() {
            return Err(ResolveError::NoAddresses {
                chain: chain_of(&chain),
            });
        }
        addrs.sort_by_key(|a| (a.is_ipv6(), *a));
        addrs.dedup();
        addrs.truncate(MAX_ADDRS);
        return Ok(Answer {
            chain,
            addrs,
            ttl: ttl.min(addr_ttl),
        });
    }
    Err(ResolveError::TooDeep {
        chain: chain_of(&chain),
        max: MAX_CNAME_HOPS,
    })
}

/// The target and TTL of `name`'s CNAME in `rrs`.
fn cname_of(rrs: &[Rr], name: &str) -> Option<(String, u32)> {
    rrs.iter().find_map(|r| match &r.data {
        Rdata::Cname(target) if r.name == name => Some((target.clone(), r.ttl)),
        _ => None,
    })
}

/// `Name` → `edge.example` (lowercase, no final dot): how names are kept.
pub(crate) fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Answers by name until their TTL runs out, and the last good answer of
/// each name after that. Sans-IO: `now` comes in.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    entries: HashMap<String, Cached>,
}

#[derive(Debug, Clone)]
struct Cached {
    answer: Answer,
    expires: Instant,
}

impl Cache {
    /// The answer for `name` while its TTL runs, with the time left.
    pub fn fresh(&self, name: &str, now: Instant) -> Option<(&Answer, Duration)> {
        let e = self.entries.get(name)?;
        let left = e.expires.checked_duration_since(now)?;
        (!left.is_zero()).then_some((&e.answer, left))
    }

    /// Ends `name`'s TTL now: the next resolution asks DNS. Its answer
    /// stays the last one.
    pub fn expire(&mut self, name: &str, now: Instant) {
        if let Some(e) = self.entries.get_mut(name) {
            e.expires = e.expires.min(now);
        }
    }

    /// The last answer for `name`, expired or not.
    pub fn last(&self, name: &str) -> Option<&Answer> {
        self.entries.get(name).map(|e| &e.answer)
    }

    /// Keeps `answer` for its TTL (clamped to `MIN_TTL..=MAX_TTL`); returns
    /// how long. Past [`MAX_CACHED`] names, the one expiring first goes.
    pub fn insert(&mut self, name: &str, answer: Answer, now: Instant) -> Duration {
        let ttl = ttl_of(answer.ttl);
        self.entries.insert(
            name.to_owned(),
            Cached {
                answer,
                expires: now + ttl,
            },
        );
        while self.entries.len() > MAX_CACHED {
            let Some(oldest) = self
                .entries
                .iter()
                .filter(|(n, _)| n.as_str() != name)
                .min_by_key(|(_, e)| e.expires)
                .map(|(n, _)| n.clone())
            else {
                break;
            };
            self.entries.remove(&oldest);
        }
        ttl
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// How long an answer with this TTL is kept.
pub(crate) fn ttl_of(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl)).clamp(MIN_TTL, MAX_TTL)
}

/// [`SAVED_FILE`]: the last good answer of each name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Saved {
    pub names: BTreeMap<String, SavedAnswer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedAnswer {
    pub chain: Vec<String>,
    pub addrs: Vec<IpAddr>,
    /// When DNS gave it (milliseconds since the Unix epoch).
    pub saved_at_ms: u64,
}

impl Saved {
    /// Bounds what a damaged or edited file may hold.
    fn bounded(mut self) -> Saved {
        while self.names.len() > MAX_CACHED {
            let Some(oldest) = self
                .names
                .iter()
                .min_by_key(|(_, a)| a.saved_at_ms)
                .map(|(n, _)| n.clone())
            else {
                break;
            };
            self.names.remove(&oldest);
        }
        self.names.retain(|_, a| !a.addrs.is_empty());
        for a in self.names.values_mut() {
            a.addrs.truncate(MAX_ADDRS);
            a.chain.truncate(MAX_CNAME_HOPS + 1);
        }
        self
    }

    /// Records a good answer at `now_ms`; whether the file needs writing.
    fn record(&mut self, name: &str, answer: &Answer, now_ms: u64) -> bool {
        if let Some(old) = self.names.get(name) {
            let same = old.addrs == answer.addrs && old.chain == answer.chain;
            let recent = now_ms.saturating_sub(old.saved_at_ms)
                < u64::try_from(RESAVE_AFTER.as_millis()).unwrap_or(u64::MAX);
            if same && recent {
                return false;
            }
        }
        self.names.insert(
            name.to_owned(),
            SavedAnswer {
                chain: answer.chain.clone(),
                addrs: answer.addrs.clone(),
                saved_at_ms: now_ms,
            },
        );
        let bounded = std::mem::take(self).bounded();
        *self = bounded;
        true
    }
}

/// The addresses of a name, ready to dial.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub answer: Answer,
    /// When to ask again.
    pub refresh_in: Duration,
}

/// Resolves tunnel endpoint names. See the module docs.
pub(crate) struct Resolver {
    backend: Result<HickoryLookup, String>,
    cache: Mutex<Cache>,
    saved: Mutex<Saved>,
    /// When each name's saved answer was last confirmed in this process
    /// (the age of an in-memory answer).
    state: Option<StateDir>,
    metrics: Option<Metrics>,
    /// Consecutive failures per name, for the retry delay.
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("nameservers", &self.backend.as_ref().map(|b| &b.servers))
            .finish()
    }
}

impl Resolver {
    /// A resolver asking `nameservers` (empty: those of
    /// `/etc/resolv.conf`), saving good answers in `state` (and loading
    /// the saved ones from it). Never fails: without a nameserver, each
    /// resolution fails with a clear error (and saved answers still
    /// serve), so a connector whose edges are IP literals needs no DNS.
    pub fn new(
        nameservers: &[SocketAddr],
        state: Option<StateDir>,
        metrics: Option<Metrics>,
    ) -> Self {
        let servers = if nameservers.is_empty() {
            portico_agent::dns::system_nameservers("--nameserver")
        } else {
            Ok(nameservers.to_vec())
        };
        let backend = servers.and_then(HickoryLookup::new);
        let saved = state
            .as_ref()
            .map(|s| match s.load_json::<Saved>(SAVED_FILE) {
                Ok(v) => v.unwrap_or_default().bounded(),
                Err(e) => {
                    tracing::warn!(file = SAVED_FILE, error = %portico_agent::error_chain(&e), "ignoring the saved DNS answers");
                    Saved::default()
                }
            })
            .unwrap_or_default();
        Resolver {
            backend,
            cache: Mutex::new(Cache::default()),
            saved: Mutex::new(saved),
            state,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Asks DNS for `host` at its next resolution, whatever its TTL.
    pub fn expire(&self, host: &str) {
        lock(&self.cache).expire(&normalize(host), clock());
    }

    /// The nameservers asked, or why there are none.
    pub fn nameservers(&self) -> Result<&[SocketAddr], &str> {
        self.backend
            .as_ref()
            .map(|b| b.servers.as_slice())
            .map_err(|e| e.as_str())
    }

    /// The addresses of `host`: from the cache while its TTL runs, else
    /// from DNS, else (DNS failed) the last good answer with a warning.
    pub async fn resolve(&self, host: &str) -> Result<Resolved, ResolveError> {
        let name = normalize(host);
        if name.is_empty()
            || name.len() > 253
            || name.split('.').any(|l| l.is_empty() || l.len() > 63)
        {
            return Err(ResolveError::InvalidName {
                name: host.to_owned(),
            });
        }
        if name == "localhost" || name.ends_with(".localhost") {
            // RFC 6761: always loopback, never asked.
            return Ok(Resolved {
                answer: Answer {
                    chain: vec![name],
                    addrs: vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()],
                    ttl: u32::MAX,
                },
                refresh_in: MAX_TTL,
            });
        }
        let now = clock();
        if let Some((answer, left)) = lock(&self.cache).fresh(&name, now) {
            return Ok(Resolved {
                answer: answer.clone(),
                refresh_in: left,
            });
        }
        let result = match &self.backend {
            Ok(b) => match tokio::time::timeout(RESOLVE_TIMEOUT, walk(b, &name)).await {
                Ok(r) => r,
                Err(_) => Err(ResolveError::Timeout {
                    chain: Chain(vec![name.clone()]),
                    after: RESOLVE_TIMEOUT,
                }),
            },
            Err(reason) => Err(ResolveError::NoNameserver {
                reason: reason.clone(),
            }),
        };
        if let Some(m) = &self.metrics {
            m.dns_resolutions
                .with_label_values(&[result.as_ref().map_or_else(|e| e.label(), |_| "ok")])
                .inc();
        }
        match result {
            Ok(answer) => {
                if let Some(m) = &self.metrics {
                    m.dns_chain_length.observe(answer.hops() as f64);
                }
                lock(&self.failures).remove(&name);
                let refresh_in = lock(&self.cache).insert(&name, answer.clone(), now);
                self.save(&name, &answer);
                tracing::debug!(name = %name, chain = %Chain(answer.chain.clone()), addrs = ?answer.addrs, ttl = answer.ttl, "resolved");
                Ok(Resolved { answer, refresh_in })
            }
            Err(error) => {
                let failures = {
                    let mut f = lock(&self.failures);
                    let n = f.entry(name.clone()).or_insert(0);
                    *n = n.saturating_add(1);
                    *n
                };
                let refresh_in = RETRY_MIN
                    .saturating_mul(1u32 << failures.saturating_sub(1).min(5))
                    .min(RETRY_MAX);
                let (answer, age) = match self.last_good(&name) {
                    Some(v) => v,
                    None => {
                        tracing::warn!(name = %name, error = %portico_agent::error_chain(&error), retry_in = ?refresh_in, "cannot resolve a tunnel endpoint, and there is no saved answer for it");
                        return Err(error);
                    }
                };
                if let Some(m) = &self.metrics {
                    m.dns_saved_answers.inc();
                }
                tracing::warn!(
                    name = %name,
                    error = %portico_agent::error_chain(&error),
                    saved_answer = ?answer.addrs,
                    chain = %Chain(answer.chain.clone()),
                    age = ?age.map_or_else(|| "unknown".to_owned(), |a| humantime::format_duration(Duration::from_secs(a.as_secs())).to_string()),
                    retry_in = ?refresh_in,
                    "DNS failed; using the last good answer"
                );
                Ok(Resolved { answer, refresh_in })
            }
        }
    }

    /// The address to dial for `addr` (`ip:port` or `host:port`): a literal
    /// as is, a name's first address of the socket's family (v4 first)
    /// from its last answer (which [`run`] keeps fresh), else through
    /// [`Resolver::resolve`]: a dial or a probe never waits on DNS for a
    /// name already answered.
    pub async fn socket_addr(&self, addr: &str, v4_only: bool) -> Result<SocketAddr, DialError> {
        if let Ok(a) = addr.parse::<SocketAddr>() {
            if v4_only && a.is_ipv6() {
                return Err(DialError::Resolve {
                    addr: addr.to_owned(),
                    reason: "an IPv6 address, and this host's tunnel socket is IPv4 only".into(),
                });
            }
            return Ok(a);
        }
        let Some((host, port)) = split_host_port(addr) else {
            return Err(DialError::Resolve {
                addr: addr.to_owned(),
                reason: "not host:port".into(),
            });
        };
        let answer = match self.known(&normalize(host)) {
            Some(a) => a,
            None => {
                self.resolve(host)
                    .await
                    .map_err(|source| DialError::Name {
                        addr: addr.to_owned(),
                        source,
                    })?
                    .answer
            }
        };
        answer
            .addrs
            .iter()
            .find(|ip| !v4_only || ip.is_ipv4())
            .map(|ip| SocketAddr::new(*ip, port))
            .ok_or_else(|| DialError::Resolve {
                addr: addr.to_owned(),
                reason: "no IPv4 address, and this host's tunnel socket is IPv4 only".into(),
            })
    }

    /// The last good answer of `name` (normalized), expired or not: this
    /// process's, else the saved one.
    pub fn known(&self, name: &str) -> Option<Answer> {
        self.last_good(name).map(|(a, _)| a)
    }

    /// The last good answer of `name` and its age: this process's, else
    /// the saved one.
    fn last_good(&self, name: &str) -> Option<(Answer, Option<Duration>)> {
        let saved = lock(&self.saved).names.get(name).cloned();
        let age = saved.as_ref().map(|s| {
            let now_ms = unix_ms();
            Duration::from_millis(now_ms.saturating_sub(s.saved_at_ms))
        });
        if let Some(a) = lock(&self.cache).last(name) {
            return Some((a.clone(), age));
        }
        let s = saved?;
        Some((
            Answer {
                chain: s.chain,
                addrs: s.addrs,
                ttl: 0,
            },
            age,
        ))
    }

    fn save(&self, name: &str, answer: &Answer) {
        let snapshot = {
            let mut saved = lock(&self.saved);
            if !saved.record(name, answer, unix_ms()) {
                return;
            }
            saved.clone()
        };
        if let Some(state) = &self.state {
            if let Err(e) = state.save_json(SAVED_FILE, &snapshot) {
                tracing::warn!(file = SAVED_FILE, error = %portico_agent::error_chain(&e), "cannot save the DNS answers");
            }
        }
    }
}

/// Expands the chosen edges into the slots' targets until the pool stops:
/// see the module docs.
pub(crate) async fn run(pool: Arc<Pool>) {
    let mut chosen = pool.chosen.subscribe();
    let mut config = pool.config.clone();
    let v4_only = pool.endpoint(0).local_addr().is_ok_and(|a| a.is_ipv4());
    let mut answers: HashMap<String, Vec<IpAddr>> = HashMap::new();
    let mut listed_before: Vec<EdgeEndpoint> = Vec::new();
    loop {
        let edges = chosen.borrow_and_update().clone();
        // Every listed edge's name is kept resolved, for the probes of
        // other regions (and a quick move there).
        let (listed, names) = {
            let c = config.borrow_and_update();
            (
                c.as_ref().map(|c| c.edges.clone()).unwrap_or_default(),
                pool.tunnel_names(c.as_deref()),
            )
        };
        // The router's list of a region changed (an edge came, went or
        // drained): its name is likely to answer differently now, so it
        // is asked again rather than at the end of its TTL.
        for (region, name) in &names {
            let of = |l: &[EdgeEndpoint]| -> Vec<EdgeEndpoint> {
                l.iter().filter(|e| e.region == *region).cloned().collect()
            };
            if of(&listed) != of(&listed_before) {
                if let Some((host, _)) = split_host_port(name) {
                    pool.resolver.expire(host);
                }
            }
        }
        listed_before.clone_from(&listed);
        let learned = lock(&pool.learned).clone();
        let find = Find {
            edges: &edges,
            names: &names,
            learned: &learned,
            v4_only,
        };
        // First the last good answers (saved ones on the first pass): a
        // start or a new home never waits on DNS for a name answered
        // before. Then what DNS says now.
        publish(
            &pool,
            find.targets(|name| pool.resolver.known(name).map(|a| a.addrs)),
        );
        let (targets, wake) = expand(&pool.resolver, &find, &listed, &mut answers).await;
        publish(&pool, targets);
        let sleep = async {
            match wake {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = pool.stop.cancelled() => return,
            r = chosen.changed() => if r.is_err() { return },
            r = config.changed() => if r.is_err() { return },
            () = pool.learned_new.notified() => {}
            () = sleep => {}
        }
    }
}

/// Makes `targets` what the slots dial, if they differ.
fn publish(pool: &Pool, targets: Vec<EdgeEndpoint>) {
    pool.targets.send_if_modified(|t| {
        if **t == targets {
            return false;
        }
        *t = Arc::new(targets);
        true
    });
}

/// What the targets are made of: the chosen edges, the router's tunnel
/// name of each region (none when edges are found by its list only), and
/// which edge answered at each address so far.
pub(crate) struct Find<'a> {
    pub edges: &'a [EdgeEndpoint],
    pub names: &'a BTreeMap<RegionId, String>,
    pub learned: &'a HashMap<String, EdgeId>,
    pub v4_only: bool,
}

impl Find<'_> {
    /// The names to resolve: the edges' own (those that are not IP
    /// literals) and their regions' tunnel names.
    fn names(&self) -> Vec<String> {
        self.edges
            .iter()
            .map(|e| e.tunnel_addr.as_str())
            .chain(
                self.regions()
                    .into_iter()
                    .filter_map(|r| self.names.get(r).map(String::as_str)),
            )
            .filter(|a| a.parse::<SocketAddr>().is_err())
            .filter_map(|a| split_host_port(a).map(|(h, _)| normalize(h)))
            .collect()
    }

    fn regions(&self) -> Vec<&RegionId> {
        let mut r: Vec<&RegionId> = self.edges.iter().map(|e| &e.region).collect();
        r.sort();
        r.dedup();
        r
    }

    /// The slots' targets, by `addrs_of` a normalized name: for a region
    /// with a tunnel name that has an answer, one target per address of
    /// it, named after the listed edge at that address, else the edge a
    /// handshake found there, else [`unknown_edge`]; for any other region,
    /// one target per address of each edge's own name (an edge whose name
    /// has none is left out), literals (and what is not `host:port`, which
    /// its dial reports) as they are. Sorted by edge and address.
    pub fn targets(&self, addrs_of: impl Fn(&str) -> Option<Vec<IpAddr>>) -> Vec<EdgeEndpoint> {
        let mut targets = Vec::new();
        for region in self.regions() {
            let edges: Vec<&EdgeEndpoint> =
                self.edges.iter().filter(|e| e.region == *region).collect();
            let own = per_edge(&edges, self.v4_only, &addrs_of);
            let by_name = self
                .names
                .get(region)
                .and_then(|n| split_host_port(n))
                .and_then(|(host, port)| {
                    let addrs = match host.parse::<IpAddr>() {
                        Ok(ip) => vec![ip],
                        Err(_) => addrs_of(&normalize(host))?,
                    };
                    Some((addrs, port))
                });
            let Some((addrs, port)) = by_name else {
                targets.extend(own);
                continue;
            };
            let before = targets.len();
            for ip in addrs.iter().filter(|ip| !self.v4_only || ip.is_ipv4()) {
                let addr = SocketAddr::new(*ip, port).to_string();
                let id = own
                    .iter()
                    .find(|t| t.tunnel_addr == addr)
                    .map(|t| t.id.clone())
                    .or_else(|| self.learned.get(&addr).cloned())
                    .or_else(|| unknown_edge(&addr));
                if let Some(id) = id {
                    targets.push(EdgeEndpoint {
                        id,
                        region: region.clone(),
                        tunnel_addr: addr,
                    });
                }
            }
            if targets.len() == before {
                // Nothing this socket can dial: the list, then.
                targets.extend(own);
            }
        }
        targets.sort_by(|a, b| (&a.id, &a.tunnel_addr).cmp(&(&b.id, &b.tunnel_addr)));
        targets.dedup();
        targets
    }
}

/// One target per address of each edge's name (see [`Find::targets`]).
fn per_edge(
    edges: &[&EdgeEndpoint],
    v4_only: bool,
    addrs_of: &impl Fn(&str) -> Option<Vec<IpAddr>>,
) -> Vec<EdgeEndpoint> {
    let mut targets = Vec::new();
    for e in edges {
        if e.tunnel_addr.parse::<SocketAddr>().is_ok() {
            targets.push((*e).clone());
            continue;
        }
        let Some((host, port)) = split_host_port(&e.tunnel_addr) else {
            targets.push((*e).clone());
            continue;
        };
        let Some(addrs) = addrs_of(&normalize(host)) else {
            continue;
        };
        for ip in addrs.iter().filter(|ip| !v4_only || ip.is_ipv4()) {
            let mut t = (*e).clone();
            t.tunnel_addr = SocketAddr::new(*ip, port).to_string();
            targets.push(t);
        }
    }
    targets
}

/// The stand-in id of an address a region's name gave that no listed
/// edge has, until a handshake says which edge answers there: the dial
/// verifies it as any edge of the region (`tunnel::client_config`).
pub(crate) fn unknown_edge(addr: &str) -> Option<EdgeId> {
    let addr: String = addr
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    EdgeId::new(format!("unknown-edge-at-{addr}")).ok()
}

/// The slots' targets ([`Find::targets`]) from what DNS says now, and when
/// to look again. The names of `listed` are resolved too (kept in the
/// cache). `answers` holds the addresses last published per name, to log a
/// change.
async fn expand(
    resolver: &Resolver,
    find: &Find<'_>,
    listed: &[EdgeEndpoint],
    answers: &mut HashMap<String, Vec<IpAddr>>,
) -> (Vec<EdgeEndpoint>, Option<Duration>) {
    let mut names: Vec<String> = find.names();
    names.extend(
        listed
            .iter()
            .filter(|e| e.tunnel_addr.parse::<SocketAddr>().is_err())
            .filter_map(|e| split_host_port(&e.tunnel_addr).map(|(h, _)| normalize(h))),
    );
    names.sort();
    names.dedup();
    let resolved: HashMap<String, Result<Resolved, ResolveError>> =
        futures::stream::iter(names.into_iter().map(|n| async move {
            let r = resolver.resolve(&n).await;
            (n, r)
        }))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut wake: Option<Duration> = None;
    let mut soonest = |d: Duration| wake = Some(wake.map_or(d, |w| w.min(d)));
    for (name, r) in &resolved {
        match r {
            Ok(r) => {
                soonest(r.refresh_in);
                let before = answers.insert(name.clone(), r.answer.addrs.clone());
                if before.as_ref().is_some_and(|b| *b != r.answer.addrs) {
                    tracing::info!(name = %name, chain = %Chain(r.answer.chain.clone()), from = ?before.unwrap_or_default(), to = ?r.answer.addrs, "the answer changed; moving the tunnels to the new addresses");
                }
            }
            Err(_) => soonest(RETRY_MIN.max(lock(&resolver.failures).get(name).map_or(
                RETRY_MIN,
                |n| {
                    RETRY_MIN
                        .saturating_mul(1u32 << n.saturating_sub(1).min(5))
                        .min(RETRY_MAX)
                },
            ))),
        }
    }
    answers.retain(|n, _| resolved.contains_key(n));
    let targets = find.targets(|name| match resolved.get(name) {
        Some(Ok(r)) => Some(r.answer.addrs.clone()),
        _ => None,
    });
    (targets, wake)
}

/// `host:port` → (`host`, port); `[v6]:port` is a literal, not a name.
fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty() && !host.contains(':') && !host.starts_with('[')).then_some((host, port))
}

/// Follows `host`'s CNAME chain hop by hop at `nameservers` (with no
/// cache, saved answers or hosts file, and `localhost` asked like any
/// name), with the walk's limits and errors: what `portico app test
/// --nameserver` shows as a resolver's view of an app's host. Returns the
/// chain, from `host` to the name that holds the addresses, and the
/// addresses.
pub async fn lookup_chain(
    nameservers: &[SocketAddr],
    host: &str,
) -> Result<(Vec<String>, Vec<IpAddr>), ResolveError> {
    let lookup = HickoryLookup::new(nameservers.to_vec())
        .map_err(|reason| ResolveError::NoNameserver { reason })?;
    let answer = walk(&lookup, &normalize(host)).await?;
    Ok((answer.chain, answer.addrs))
}

/// `ADDR[:PORT]` of a nameserver: `10.0.0.53`, `10.0.0.53:5353`, `::1`,
/// `[::1]:5353`; port 53 by default.
pub fn parse_nameserver(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    if let Ok(a) = t.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = t
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(format!(
        "{s:?} is not a nameserver address: an IP with an optional port, such as 10.0.0.53, 10.0.0.53:5353 or [fd00::53]:53"
    ))
}

/// hickory-resolver asking `servers`, one query at a time, its cache off.
struct HickoryLookup {
    servers: Vec<SocketAddr>,
    resolver: hickory_resolver::TokioResolver,
}

impl HickoryLookup {
    fn new(servers: Vec<SocketAddr>) -> Result<HickoryLookup, String> {
        let resolver =
            portico_agent::dns::uncached_resolver(&servers, QUERY_TIMEOUT, QUERY_ATTEMPTS)?;
        Ok(HickoryLookup { servers, resolver })
    }
}

impl Lookup for HickoryLookup {
    fn query(
        &self,
        name: &str,
        rtype: Rtype,
    ) -> impl Future<Output = Result<Vec<Rr>, QueryError>> + Send {
        use hickory_proto::rr::{Name, RData, RecordType};
        let fqdn = format!("{name}.");
        async move {
            let qname = Name::from_ascii(&fqdn).map_err(|e| QueryError::Failed(Box::new(e)))?;
            let rt = match rtype {
                Rtype::Cname => RecordType::CNAME,
                Rtype::A => RecordType::A,
                Rtype::Aaaa => RecordType::AAAA,
            };
            match self.resolver.lookup(qname, rt).await {
                Ok(lookup) => Ok(lookup
                    .answers()
                    .iter()
                    .filter_map(|r| {
                        let data = match &r.data {
                            RData::CNAME(c) => Rdata::Cname(normalize(&c.0.to_ascii())),
                            RData::A(a) => Rdata::Addr(IpAddr::V4(a.0)),
                            RData::AAAA(a) => Rdata::Addr(IpAddr::V6(a.0)),
                            _ => return None,
                        };
                        Some(Rr {
                            name: normalize(&r.name.to_ascii()),
                            ttl: r.ttl,
                            data,
                        })
                    })
                    .collect()),
                Err(e) if e.is_nx_domain() => Err(QueryError::NxDomain),
                Err(e) if e.is_no_records_found() => Err(QueryError::NoRecords),
                Err(e) => Err(QueryError::Failed(Box::new(e))),
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
