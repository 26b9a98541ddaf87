//! The nearest region, sans-IO: a [`Chooser`] takes RTT samples per edge
//! (from probes and from live tunnels), whether the home region's tunnels
//! carry traffic, and the edge list of the config, each with `now`; it
//! keeps a windowed minimum per edge, scores each region by its best two
//! edges, decides the home region with hysteresis, and says which edges
//! the tunnel slots dial. No sockets, no clock: `probe.rs` drives it, and
//! the tests below run it on a virtual clock.
//!
//! The rules (ARCHITECTURE.md, "Regions"):
//!
//! - A region's RTT is the windowed minimum (default 5 min) of its
//!   second-best edge (its best if it has one edge measured): the tunnels
//!   spread over two edges at least, so a region with one near edge and
//!   one far one is not near. The minimum over a window is what jitter and
//!   queueing cannot fake: a sample is never below the path's real RTT.
//! - The first choice waits for every region to answer twice (or for
//!   `startup_wait`), then takes the lowest RTT.
//! - It moves only when another region (measured at least twice in the
//!   window) is at least `min_improvement` (10 ms) *and* `min_ratio` (33%)
//!   nearer than the home, both as windowed minima: a region must stay
//!   better for a whole window before the home's old samples let it win.
//! - The home whose probes are all lost stays home while its tunnels carry
//!   traffic (within `busy_hold`); one that answers nothing and carries
//!   nothing is left at once for the nearest region that answers.
//! - The home that disappears from the config is left at once (not
//!   flapping: it is gone).
//! - A pinned group's home is its region, always.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use portico_proto::api::{EdgeEndpoint, RegionRtt};
use portico_proto::{EdgeId, RegionId};

/// The most samples kept per edge (a sliding-window minimum keeps far
/// fewer: only those not beaten by a later one).
const MAX_SAMPLES: usize = 256;
/// Samples a region needs in the window before it may win.
const MIN_SAMPLES: usize = 2;

/// The chooser's knobs (connector flags `--region-*`).
#[derive(Debug, Clone, PartialEq)]
pub struct RegionPolicy {
    /// The window of the minimum RTT per edge.
    pub window: Duration,
    /// Another region must be at least this much nearer to win...
    pub min_improvement: Duration,
    /// ...and at least this fraction (0..1) of the home's RTT nearer.
    pub min_ratio: f64,
    /// Traffic on a home tunnel keeps the home this long without a probe
    /// answer.
    pub busy_hold: Duration,
    /// How long the first choice waits for every region's answers.
    pub startup_wait: Duration,
    /// Consecutive lost probes after which an edge is given up on (while
    /// it carries no traffic).
    pub lost_after: u32,
}

impl Default for RegionPolicy {
    fn default() -> Self {
        RegionPolicy {
            window: Duration::from_secs(300),
            min_improvement: Duration::from_millis(10),
            min_ratio: 0.33,
            busy_hold: Duration::from_secs(60),
            startup_wait: Duration::from_secs(3),
            lost_after: 3,
        }
    }
}

/// Why the home changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The first choice.
    Initial,
    /// Another region was nearer by both thresholds over the window.
    Nearer,
    /// The home's edges left the config.
    HomeGone,
    /// The home answered no probe and carried no traffic.
    HomeLost,
    /// The group was pinned to another region.
    Pinned,
}

impl Cause {
    /// The `cause` label of `portico_connector_region_moves_total`.
    pub fn label(self) -> &'static str {
        match self {
            Cause::Initial => "initial",
            Cause::Nearer => "nearer",
            Cause::HomeGone => "home_gone",
            Cause::HomeLost => "home_lost",
            Cause::Pinned => "pinned",
        }
    }
}

/// A change of home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub from: Option<RegionId>,
    pub to: RegionId,
    pub cause: Cause,
    /// For people: `us-east 12 ms vs eu-west 85 ms: 73 ms and 86% nearer`.
    pub reason: String,
}

/// Decides the home region. See the module docs for the rules.
#[derive(Debug)]
pub struct Chooser {
    policy: RegionPolicy,
    started: Instant,
    pinned: Option<RegionId>,
    /// The edges of the config, by id (others' samples are ignored).
    edges: BTreeMap<EdgeId, EdgeState>,
    /// The region of each listed edge, in the config's order of first
    /// appearance (the router lists active edges first).
    order: Vec<RegionId>,
    home: Option<RegionId>,
    moves: u64,
    last_move: Option<Move>,
}

#[derive(Debug)]
struct EdgeState {
    endpoint: EdgeEndpoint,
    /// Sliding-window minimum: samples in time order whose RTTs increase
    /// (a sample beaten by a later, smaller one can never be the minimum).
    mins: VecDeque<(Instant, Duration)>,
    /// When each sample in the window was taken.
    seen: VecDeque<Instant>,
    /// Probes lost since the last answer.
    lost: u32,
    /// The last time a tunnel to it carried traffic.
    traffic_at: Option<Instant>,
}

impl EdgeState {
    fn new(endpoint: EdgeEndpoint) -> Self {
        EdgeState {
            endpoint,
            mins: VecDeque::new(),
            seen: VecDeque::new(),
            lost: 0,
            traffic_at: None,
        }
    }

    fn expire(&mut self, now: Instant, window: Duration) {
        let old = |at: &Instant| now.saturating_duration_since(*at) > window;
        while self.mins.front().is_some_and(|(at, _)| old(at)) {
            self.mins.pop_front();
        }
        while self.seen.front().is_some_and(old) {
            self.seen.pop_front();
        }
    }

    fn push(&mut self, now: Instant, rtt: Duration) {
        while self.mins.back().is_some_and(|(_, r)| *r >= rtt) {
            self.mins.pop_back();
        }
        self.mins.push_back((now, rtt));
        self.seen.push_back(now);
        if self.mins.len() > MAX_SAMPLES {
            self.mins.pop_front();
        }
        if self.seen.len() > MAX_SAMPLES {
            self.seen.pop_front();
        }
    }

    fn min(&self) -> Option<Duration> {
        self.mins.front().map(|(_, r)| *r)
    }

    fn busy(&self, now: Instant, hold: Duration) -> bool {
        self.traffic_at
            .is_some_and(|at| now.saturating_duration_since(at) <= hold)
    }
}

/// A region's measurements at one instant.
#[derive(Debug, Clone, Copy)]
struct Score {
    rtt: Option<Duration>,
    /// Samples in the window, over its edges.
    samples: usize,
    /// The fewest samples in the window of any of its edges.
    edge_samples: usize,
    edges: usize,
    usable: usize,
    /// Every edge lost `lost_after` probes in a row.
    all_lost: bool,
    busy: bool,
}

impl Chooser {
    pub fn new(policy: RegionPolicy, now: Instant) -> Chooser {
        Chooser {
            policy,
            started: now,
            pinned: None,
            edges: BTreeMap::new(),
            order: Vec::new(),
            home: None,
            moves: 0,
            last_move: None,
        }
    }

    /// Takes the config's edge list and pinned region. Samples of edges
    /// that stay are kept.
    pub fn set_edges(&mut self, edges: &[EdgeEndpoint], pinned: Option<RegionId>) {
        let mut next = BTreeMap::new();
        let mut order = Vec::new();
        for e in edges {
            if pinned.as_ref().is_some_and(|p| *p != e.region) {
                continue;
            }
            if !order.contains(&e.region) {
                order.push(e.region.clone());
            }
            let state = match self.edges.remove(&e.id) {
                Some(mut s) if s.endpoint.region == e.region => {
                    s.endpoint = e.clone();
                    s
                }
                _ => EdgeState::new(e.clone()),
            };
            next.insert(e.id.clone(), state);
        }
        self.edges = next;
        self.order = order;
        self.pinned = pinned;
    }

    /// Whether probes are worth sending: the group is `auto` and the
    /// config lists more than one region.
    pub fn wants_probes(&self) -> bool {
        self.pinned.is_none() && self.order.len() > 1
    }

    /// The edges to probe, home region first.
    pub fn probe_targets(&self) -> Vec<EdgeEndpoint> {
        let mut v: Vec<&EdgeState> = self.edges.values().collect();
        v.sort_by_key(|e| Some(&e.endpoint.region) != self.home.as_ref());
        v.into_iter().map(|e| e.endpoint.clone()).collect()
    }

    /// A measured round trip to `edge`.
    pub fn sample(&mut self, edge: &EdgeId, rtt: Duration, now: Instant) {
        if let Some(e) = self.edges.get_mut(edge) {
            e.push(now, rtt);
            e.lost = 0;
        }
    }

    /// A probe of `edge` that got no answer.
    pub fn lost(&mut self, edge: &EdgeId) {
        if let Some(e) = self.edges.get_mut(edge) {
            e.lost = e.lost.saturating_add(1);
        }
    }

    /// A tunnel to `edge` carried traffic (anything received) at `now`.
    pub fn traffic(&mut self, edge: &EdgeId, now: Instant) {
        if let Some(e) = self.edges.get_mut(edge) {
            e.traffic_at = Some(now);
        }
    }

    pub fn home(&self) -> Option<&RegionId> {
        self.home.as_ref()
    }

    pub fn pinned(&self) -> Option<&RegionId> {
        self.pinned.as_ref()
    }

    pub fn moves(&self) -> u64 {
        self.moves
    }

    pub fn last_move(&self) -> Option<&Move> {
        self.last_move.as_ref()
    }

    /// The edges the tunnel slots dial, sorted by id: the home region's;
    /// every listed edge while there is no home with edges (the first
    /// choice is still open, or nothing was measured); nothing before the
    /// first choice when probes decide it.
    pub fn targets(&self) -> Vec<EdgeEndpoint> {
        let home: Vec<EdgeEndpoint> = self
            .edges
            .values()
            .filter(|e| Some(&e.endpoint.region) == self.home.as_ref())
            .map(|e| e.endpoint.clone())
            .collect();
        if !home.is_empty() {
            return home;
        }
        if self.home.is_none() && self.wants_probes() {
            return Vec::new();
        }
        self.edges.values().map(|e| e.endpoint.clone()).collect()
    }

    /// Fewer than two usable edges in the home region.
    pub fn degraded(&mut self, now: Instant) -> bool {
        match self.home.clone() {
            Some(h) => self.score(&h, now).usable < 2,
            None => false,
        }
    }

    /// Every known region with its RTT and edges, by id.
    pub fn regions(&mut self, now: Instant) -> Vec<RegionRtt> {
        let mut ids: Vec<RegionId> = self.order.clone();
        ids.sort();
        ids.into_iter()
            .map(|r| {
                let s = self.score(&r, now);
                RegionRtt {
                    region: r,
                    rtt_micros: s
                        .rtt
                        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                    edges: u32::try_from(s.edges).unwrap_or(u32::MAX),
                    usable_edges: u32::try_from(s.usable).unwrap_or(u32::MAX),
                }
            })
            .collect()
    }

    /// Applies the rules at `now`; returns the change of home, if any.
    pub fn decide(&mut self, now: Instant) -> Option<Move> {
        let window = self.policy.window;
        for e in self.edges.values_mut() {
            e.expire(now, window);
        }
        let next = self.next_home(now)?;
        let from = self.home.replace(next.to.clone());
        let m = Move { from, ..next };
        if m.from.is_some() {
            self.moves += 1;
        }
        self.last_move = Some(m.clone());
        Some(m)
    }

    fn next_home(&mut self, now: Instant) -> Option<Move> {
        if let Some(p) = self.pinned.clone() {
            if self.home.as_ref() == Some(&p) {
                return None;
            }
            let cause = if self.home.is_some() {
                Cause::Pinned
            } else {
                Cause::Initial
            };
            return Some(Move {
                from: None,
                to: p.clone(),
                cause,
                reason: format!("the group is pinned to {p}"),
            });
        }
        if self.order.is_empty() {
            // Nothing listed: keep what there was until edges come back.
            return None;
        }
        let scores: Vec<(RegionId, Score)> = self
            .order
            .clone()
            .into_iter()
            .map(|r| {
                let s = self.score(&r, now);
                (r, s)
            })
            .collect();
        let Some(home) = self.home.clone() else {
            return self.first_choice(&scores, now);
        };
        let Some(hs) = scores.iter().find(|(r, _)| *r == home).map(|(_, s)| *s) else {
            let (to, detail) =
                match best(&scores, None, MIN_SAMPLES).or_else(|| best(&scores, None, 1)) {
                    Some((r, rtt)) => (r.clone(), format!("; {r} is nearest at {}", ms(rtt))),
                    None => (self.order[0].clone(), String::new()),
                };
            return Some(Move {
                from: None,
                to,
                cause: Cause::HomeGone,
                reason: format!("{home} has no edges in the config any more{detail}"),
            });
        };
        let candidate = best(&scores, Some(&home), MIN_SAMPLES);
        // A home that answers nothing and carries nothing is left for the
        // nearest region that answers.
        if hs.all_lost && !hs.busy {
            let (to, rtt) = candidate?;
            return Some(Move {
                from: None,
                to: to.clone(),
                cause: Cause::HomeLost,
                reason: format!(
                    "{home} lost {} probes in a row on every edge and carries no traffic; {to} answers in {}",
                    self.policy.lost_after,
                    ms(rtt)
                ),
            });
        }
        // Probes lost (no sample in the window) but tunnels busy, or not
        // yet given up on: the home stays.
        let home_rtt = hs.rtt?;
        let (to, rtt) = candidate?;
        let gain = home_rtt.saturating_sub(rtt);
        let ratio = if home_rtt.is_zero() {
            0.0
        } else {
            gain.as_secs_f64() / home_rtt.as_secs_f64()
        };
        if gain < self.policy.min_improvement || ratio < self.policy.min_ratio {
            return None;
        }
        Some(Move {
            from: None,
            to: to.clone(),
            cause: Cause::Nearer,
            reason: format!(
                "{to} {} vs {home} {}: {} and {:.0}% nearer",
                ms(rtt),
                ms(home_rtt),
                ms(gain),
                ratio * 100.0
            ),
        })
    }

    fn first_choice(&self, scores: &[(RegionId, Score)], now: Instant) -> Option<Move> {
        let single = scores.len() == 1;
        let settled = scores
            .iter()
            .all(|(_, s)| s.edge_samples >= MIN_SAMPLES || s.all_lost);
        let waited = now.saturating_duration_since(self.started) >= self.policy.startup_wait;
        if !(single || settled || waited) {
            return None;
        }
        let others = |to: &RegionId| {
            let v: Vec<String> = scores
                .iter()
                .filter(|(r, _)| r != to)
                .map(|(r, s)| match s.rtt {
                    Some(d) => format!("{r} {}", ms(d)),
                    None => format!("{r} no answer"),
                })
                .collect();
            if v.is_empty() {
                String::new()
            } else {
                format!(" (vs {})", v.join(", "))
            }
        };
        let (to, reason) = if single {
            let r = scores[0].0.clone();
            (r.clone(), format!("{r} is the only region listed"))
        } else {
            match best(scores, None, 1) {
                Some((r, rtt)) => (
                    r.clone(),
                    format!("{r} is nearest at {}{}", ms(rtt), others(r)),
                ),
                None => {
                    let r = scores[0].0.clone();
                    (
                        r.clone(),
                        format!("no region answered a probe; {r} is listed first"),
                    )
                }
            }
        };
        Some(Move {
            from: None,
            to,
            cause: Cause::Initial,
            reason,
        })
    }

    fn score(&mut self, region: &RegionId, now: Instant) -> Score {
        let (window, hold, lost_after) = (
            self.policy.window,
            self.policy.busy_hold,
            self.policy.lost_after,
        );
        let mut mins = Vec::new();
        let mut s = Score {
            rtt: None,
            samples: 0,
            edge_samples: usize::MAX,
            edges: 0,
            usable: 0,
            all_lost: true,
            busy: false,
        };
        for e in self
            .edges
            .values_mut()
            .filter(|e| e.endpoint.region == *region)
        {
            e.expire(now, window);
            s.edges += 1;
            s.samples += e.seen.len();
            s.edge_samples = s.edge_samples.min(e.seen.len());
            let busy = e.busy(now, hold);
            s.busy |= busy;
            let lost = e.lost >= lost_after;
            s.all_lost &= lost;
            if busy || !lost {
                s.usable += 1;
            }
            if let Some(m) = e.min() {
                mins.push(m);
            }
        }
        if s.edges == 0 {
            s.all_lost = false;
        }
        mins.sort();
        s.rtt = mins.get(1).or(mins.first()).copied();
        s
    }
}

/// The region with the lowest RTT among those with `min_samples` in the
/// window, leaving out `except`; ties go to the lower id.
fn best<'a>(
    scores: &'a [(RegionId, Score)],
    except: Option<&RegionId>,
    min_samples: usize,
) -> Option<(&'a RegionId, Duration)> {
    scores
        .iter()
        .filter(|(r, s)| Some(r) != except && s.samples >= min_samples && !s.all_lost)
        .filter_map(|(r, s)| s.rtt.map(|d| (r, d)))
        .min_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(b.0)))
}

/// `12 ms`, or `0.4 ms` below one.
fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 1.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

#[cfg(test)]
mod tests;
