//! The chooser on a virtual clock: every rule of the module docs, with
//! samples fed as a prober would feed them, and no sleeps.

use super::*;

fn ep(id: &str, region: &str) -> EdgeEndpoint {
    EdgeEndpoint {
        id: EdgeId::new(id).unwrap(),
        region: RegionId::new(region).unwrap(),
        tunnel_addr: format!("{id}.example:443"),
    }
}

fn rid(r: &str) -> RegionId {
    RegionId::new(r).unwrap()
}

fn eid(e: &str) -> EdgeId {
    EdgeId::new(e).unwrap()
}

fn millis(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Three regions of two edges each: `near`, `mid`, `far`.
fn three() -> Vec<EdgeEndpoint> {
    vec![
        ep("far-1", "far"),
        ep("far-2", "far"),
        ep("mid-1", "mid"),
        ep("mid-2", "mid"),
        ep("near-1", "near"),
        ep("near-2", "near"),
    ]
}

/// A chooser and its virtual clock.
struct Sim {
    c: Chooser,
    now: Instant,
    moves: Vec<(Duration, Move)>,
    t0: Instant,
}

impl Sim {
    fn new(policy: RegionPolicy, edges: &[EdgeEndpoint]) -> Sim {
        let t0 = Instant::now();
        let mut c = Chooser::new(policy, t0);
        c.set_edges(edges, None);
        Sim {
            c,
            now: t0,
            moves: Vec::new(),
            t0,
        }
    }

    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    /// One probe round: `rtt(edge)` for every listed edge (`None`: lost),
    /// then a decision.
    fn round(&mut self, mut rtt: impl FnMut(&EdgeEndpoint) -> Option<Duration>) -> Option<Move> {
        for e in self.c.probe_targets() {
            match rtt(&e) {
                Some(d) => self.c.sample(&e.id, d, self.now),
                None => self.c.lost(&e.id),
            }
        }
        let m = self.c.decide(self.now);
        if let Some(m) = &m {
            self.moves.push((self.elapsed(), m.clone()));
        }
        m
    }

    /// Rounds every `every` for `total`, RTTs by region.
    fn run(
        &mut self,
        total: Duration,
        every: Duration,
        mut rtt: impl FnMut(&str) -> Option<Duration>,
    ) -> Vec<Move> {
        let end = self.now + total;
        let mut out = Vec::new();
        while self.now < end {
            self.advance(every);
            if let Some(m) = self.round(|e| rtt(e.endpoint_region())) {
                out.push(m);
            }
        }
        out
    }
}

trait Region {
    fn endpoint_region(&self) -> &str;
}

impl Region for EdgeEndpoint {
    fn endpoint_region(&self) -> &str {
        self.region.as_str()
    }
}

fn rtts(near: u64, mid: u64, far: u64) -> impl FnMut(&str) -> Option<Duration> {
    move |r| match r {
        "near" => Some(millis(near)),
        "mid" => Some(millis(mid)),
        _ => Some(millis(far)),
    }
}

fn target_ids(c: &Chooser) -> Vec<String> {
    c.targets().iter().map(|e| e.id.to_string()).collect()
}

#[test]
fn the_first_choice_waits_for_two_answers_from_every_region_and_takes_the_nearest() {
    let mut s = Sim::new(RegionPolicy::default(), &three());
    assert!(s.c.wants_probes());
    assert_eq!(s.c.home(), None);
    assert!(s.c.targets().is_empty(), "no dial before the first choice");
    // One answer each is not enough.
    assert_eq!(s.round(|e| Some(millis(rtt_of(e)))), None);
    let m = s.round(|e| Some(millis(rtt_of(e)))).expect("chosen");
    assert_eq!(m.to, rid("near"));
    assert_eq!(m.from, None);
    assert_eq!(m.cause, Cause::Initial);
    assert_eq!(
        m.reason, "near is nearest at 10 ms (vs far 200 ms, mid 80 ms)",
        "{m:?}"
    );
    assert_eq!(s.c.moves(), 0, "the first choice is not a move");
    assert_eq!(target_ids(&s.c), ["near-1", "near-2"], "both edges of near");
    assert!(!s.c.degraded(s.now));
    let regions = s.c.regions(s.now);
    let by: Vec<(String, Option<u64>)> = regions
        .iter()
        .map(|r| (r.region.to_string(), r.rtt_micros))
        .collect();
    assert_eq!(
        by,
        [
            ("far".into(), Some(200_000)),
            ("mid".into(), Some(80_000)),
            ("near".into(), Some(10_000))
        ]
    );
    // Home probes go first.
    assert_eq!(s.c.probe_targets()[0].region, rid("near"));
}

fn rtt_of(e: &EdgeEndpoint) -> u64 {
    match e.region.as_str() {
        "near" => 10,
        "mid" => 80,
        _ => 200,
    }
}

#[test]
fn the_first_choice_does_not_wait_past_startup_wait() {
    let policy = RegionPolicy::default();
    let wait = policy.startup_wait;
    let mut s = Sim::new(policy, &three());
    // Only `mid` answers, once.
    let only_mid = |e: &EdgeEndpoint| (e.region.as_str() == "mid").then(|| millis(80));
    assert_eq!(s.round(only_mid), None);
    s.advance(wait);
    let m = s.round(|_| None).expect("chosen after the wait");
    assert_eq!(m.to, rid("mid"));
    // Nothing answers at all: the first region the config lists.
    let mut s = Sim::new(RegionPolicy::default(), &three());
    s.advance(wait);
    let m = s.round(|_| None).expect("chosen");
    assert_eq!(m.to, rid("far"), "listed first");
    assert!(m.reason.contains("no region answered"), "{}", m.reason);
}

#[test]
fn a_single_region_is_chosen_at_once_and_never_probed() {
    let edges = [ep("a", "eu"), ep("b", "eu")];
    let mut s = Sim::new(RegionPolicy::default(), &edges);
    assert!(!s.c.wants_probes());
    let m = s.c.decide(s.now).expect("chosen at once");
    assert_eq!(m.to, rid("eu"));
    assert_eq!(target_ids(&s.c), ["a", "b"]);
}

#[test]
fn a_region_is_as_near_as_its_second_best_edge() {
    // `split` has one edge at 5 ms and one at 100 ms; `pair` two at 30 ms.
    let edges = [
        ep("p1", "pair"),
        ep("p2", "pair"),
        ep("s1", "split"),
        ep("s2", "split"),
    ];
    let mut s = Sim::new(RegionPolicy::default(), &edges);
    let rtt = |e: &EdgeEndpoint| {
        Some(millis(match e.id.as_str() {
            "s1" => 5,
            "s2" => 100,
            _ => 30,
        }))
    };
    s.round(rtt);
    let m = s.round(rtt).expect("chosen");
    assert_eq!(m.to, rid("pair"));
}

/// Two regions 4 ms apart with ±5 ms of jitter on every sample, for 30
/// simulated minutes at a probe every 30 s, from either start: no move.
#[test]
fn jitter_around_two_close_regions_never_moves() {
    for seed in 0..20 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let edges = [ep("a1", "a"), ep("a2", "a"), ep("b1", "b"), ep("b2", "b")];
        let mut s = Sim::new(RegionPolicy::default(), &edges);
        let mut jittered =
            |base: u64| millis(base).saturating_sub(millis(5)) + millis(rng.u64(0..=10));
        let mut first = None;
        let end = s.now + Duration::from_secs(1800);
        while s.now < end {
            s.advance(Duration::from_secs(30));
            let m = s.round(|e| Some(jittered(if e.region.as_str() == "a" { 20 } else { 24 })));
            if let Some(m) = m {
                assert!(first.is_none(), "seed {seed}: moved: {m:?}");
                first = Some(m);
            }
        }
        assert!(first.is_some(), "seed {seed}: chose");
        assert_eq!(s.c.moves(), 0, "seed {seed}");
    }
}

#[test]
fn it_moves_only_after_the_window_shows_the_new_region_better() {
    let policy = RegionPolicy::default();
    let window = policy.window;
    let every = Duration::from_secs(30);
    let mut s = Sim::new(policy, &three());
    s.run(every * 2, every, rtts(10, 80, 200));
    assert_eq!(s.c.home(), Some(&rid("near")));
    // `near` becomes far and `mid` near.
    let changed = s.elapsed();
    let moved = s.run(window * 2, every, rtts(200, 10, 200));
    assert_eq!(moved.len(), 1, "{moved:?}");
    let (at, m) = s.moves.last().unwrap().clone();
    assert_eq!(m.from, Some(rid("near")));
    assert_eq!(m.to, rid("mid"));
    assert_eq!(m.cause, Cause::Nearer);
    assert_eq!(m.reason, "mid 10 ms vs near 200 ms: 190 ms and 95% nearer");
    // Not before the old samples of `near` left the window, and within a
    // round after.
    let after = at - changed;
    assert!(after > window - every, "moved {after:?} after the change");
    assert!(after <= window + every, "moved {after:?} after the change");
    assert_eq!(s.c.moves(), 1);
    assert_eq!(s.c.last_move(), Some(&m));
    assert_eq!(target_ids(&s.c), ["mid-1", "mid-2"]);
}

/// A spike of the home (bad samples for less than a window, which never
/// beat its good ones) does nothing; a region measured once does not win.
#[test]
fn spikes_and_a_single_sample_move_nothing() {
    let every = Duration::from_secs(30);
    let mut s = Sim::new(RegionPolicy::default(), &three());
    s.run(every * 4, every, rtts(40, 80, 200));
    assert_eq!(s.c.home(), Some(&rid("near")));
    // The home spikes to 500 ms for 4 minutes: its minimum still holds.
    s.run(Duration::from_secs(240), every, rtts(500, 80, 200));
    s.run(every * 20, every, rtts(40, 80, 200));
    assert_eq!(s.c.moves(), 0, "{:?}", s.moves);
    // A new region answers once at 1 ms: not enough alone...
    let mut more = three();
    more.push(ep("new-1", "new"));
    s.c.set_edges(&more, None);
    s.advance(every);
    s.c.sample(&eid("new-1"), millis(1), s.now);
    assert_eq!(s.c.decide(s.now), None);
    // ...twice is.
    s.advance(every);
    s.c.sample(&eid("new-1"), millis(1), s.now);
    let m = s.c.decide(s.now).expect("moved");
    assert_eq!(m.to, rid("new"));
}

#[test]
fn both_thresholds_must_hold() {
    let every = Duration::from_secs(1);
    let cases = [
        // (home, other, moves): 9 ms and 30% is too little...
        (30, 21, false),
        // ...so is 15 ms at 15%...
        (100, 85, false),
        // ...11 ms at 37% is enough, as 50 ms at 50%.
        (30, 19, true),
        (100, 50, true),
        // Exactly at both thresholds (10 ms, 33.3%): a move.
        (30, 20, true),
    ];
    for (home, other, moves) in cases {
        let policy = RegionPolicy {
            window: Duration::from_secs(10),
            ..RegionPolicy::default()
        };
        let edges = [
            ep("h1", "home"),
            ep("h2", "home"),
            ep("o1", "other"),
            ep("o2", "other"),
        ];
        let mut s = Sim::new(policy, &edges);
        s.run(every * 3, every, |r| {
            Some(millis(if r == "home" { 1 } else { 500 }))
        });
        assert_eq!(s.c.home(), Some(&rid("home")));
        s.run(Duration::from_secs(60), every, |r| {
            Some(millis(if r == "home" { home } else { other }))
        });
        assert_eq!(
            s.c.moves() == 1,
            moves,
            "home {home} ms, other {other} ms: {:?}",
            s.moves
        );
    }
    // The thresholds are knobs: 5 ms and 10% moves 30 -> 21.
    let policy = RegionPolicy {
        window: Duration::from_secs(10),
        min_improvement: millis(5),
        min_ratio: 0.10,
        ..RegionPolicy::default()
    };
    let edges = [ep("h1", "home"), ep("o1", "other")];
    let mut s = Sim::new(policy, &edges);
    s.run(every * 3, every, |r| {
        Some(millis(if r == "home" { 1 } else { 500 }))
    });
    s.run(Duration::from_secs(60), every, |r| {
        Some(millis(if r == "home" { 30 } else { 21 }))
    });
    assert_eq!(s.c.moves(), 1);
}

#[test]
fn a_busy_home_stays_while_its_probes_are_lost() {
    let policy = RegionPolicy::default();
    let (window, hold) = (policy.window, policy.busy_hold);
    let every = Duration::from_secs(30);
    let mut s = Sim::new(policy, &three());
    s.run(every * 2, every, rtts(10, 80, 200));
    assert_eq!(s.c.home(), Some(&rid("near")));
    // Every probe of `near` is lost for two windows, but its tunnels carry
    // traffic all along.
    let end = s.now + window * 2;
    while s.now < end {
        s.advance(every);
        s.c.traffic(&eid("near-1"), s.now);
        s.c.traffic(&eid("near-2"), s.now);
        s.round(|e| (e.region.as_str() != "near").then(|| millis(rtt_of(e))));
    }
    assert_eq!(s.c.moves(), 0, "{:?}", s.moves);
    assert_eq!(s.c.home(), Some(&rid("near")));
    assert!(!s.c.degraded(s.now), "busy edges are usable");
    // The traffic stops too: left once the traffic is older than the hold.
    let quiet = s.elapsed();
    let m = loop {
        s.advance(every);
        if let Some(m) = s.round(|e| (e.region.as_str() != "near").then(|| millis(rtt_of(e)))) {
            break m;
        }
        assert!(s.elapsed() - quiet <= hold + every, "not left");
    };
    assert!(s.elapsed() - quiet > hold, "left only after the hold");
    assert_eq!(m.cause, Cause::HomeLost);
    assert_eq!(m.to, rid("mid"));
    assert!(
        m.reason.starts_with("near lost 3 probes in a row"),
        "{}",
        m.reason
    );
}

#[test]
fn a_home_that_stops_answering_and_carries_nothing_is_left_at_once() {
    let every = Duration::from_secs(30);
    let mut s = Sim::new(RegionPolicy::default(), &three());
    s.run(every * 2, every, rtts(10, 80, 200));
    // Its samples are still in the window, but 3 lost probes in a row on
    // both edges with no traffic is a dead home.
    let lost = |e: &EdgeEndpoint| (e.region.as_str() != "near").then(|| millis(rtt_of(e)));
    assert_eq!(s.round(lost), None);
    assert_eq!(s.round(lost), None);
    let m = s.round(lost).expect("left");
    assert_eq!((m.cause, m.to), (Cause::HomeLost, rid("mid")));
    // Two lost probes then an answer: the count starts again.
    let mut s = Sim::new(RegionPolicy::default(), &three());
    s.run(every * 2, every, rtts(10, 80, 200));
    s.round(lost);
    s.round(lost);
    s.round(|e| Some(millis(rtt_of(e))));
    s.round(lost);
    s.round(lost);
    assert_eq!(s.c.moves(), 0);
}

#[test]
fn a_home_that_leaves_the_config_is_left_at_once() {
    let every = Duration::from_secs(30);
    let mut s = Sim::new(RegionPolicy::default(), &three());
    s.run(every * 2, every, rtts(10, 80, 200));
    assert_eq!(s.c.home(), Some(&rid("near")));
    let without: Vec<EdgeEndpoint> = three()
        .into_iter()
        .filter(|e| e.region.as_str() != "near")
        .collect();
    s.c.set_edges(&without, None);
    let m = s.c.decide(s.now).expect("left at once");
    assert_eq!((m.cause, m.to.clone()), (Cause::HomeGone, rid("mid")));
    assert_eq!(
        m.reason,
        "near has no edges in the config any more; mid is nearest at 80 ms"
    );
    assert_eq!(target_ids(&s.c), ["mid-1", "mid-2"]);
    // One edge of the home goes: degraded, and the slots all dial the other.
    s.c.set_edges(&[ep("mid-1", "mid"), ep("far-1", "far")], None);
    assert_eq!(s.c.decide(s.now), None);
    assert!(s.c.degraded(s.now));
    assert_eq!(target_ids(&s.c), ["mid-1"]);
    // An empty list keeps the home.
    s.c.set_edges(&[], None);
    assert_eq!(s.c.decide(s.now), None);
    assert_eq!(s.c.home(), Some(&rid("mid")));
}

#[test]
fn an_edge_that_loses_its_probes_makes_the_home_degraded() {
    let every = Duration::from_secs(30);
    let mut s = Sim::new(RegionPolicy::default(), &three());
    s.run(every * 2, every, rtts(10, 80, 200));
    assert!(!s.c.degraded(s.now));
    for _ in 0..3 {
        s.advance(every);
        s.round(|e| (e.id.as_str() != "near-2").then(|| millis(rtt_of(e))));
    }
    assert!(s.c.degraded(s.now));
    assert_eq!(s.c.moves(), 0, "one edge left is still home");
    let near =
        s.c.regions(s.now)
            .into_iter()
            .find(|r| r.region == rid("near"))
            .unwrap();
    assert_eq!((near.edges, near.usable_edges), (2, 1));
}

#[test]
fn a_pinned_group_never_moves() {
    let every = Duration::from_secs(30);
    let t0 = Instant::now();
    let mut c = Chooser::new(RegionPolicy::default(), t0);
    // The router lists only the pinned region's edges; even if it listed
    // more, only the pinned region's count.
    c.set_edges(&three(), Some(rid("far")));
    assert!(!c.wants_probes());
    let m = c.decide(t0).expect("home at once");
    assert_eq!(m.to, rid("far"));
    assert_eq!(m.reason, "the group is pinned to far");
    assert_eq!(target_ids(&c), ["far-1", "far-2"]);
    let mut now = t0;
    for _ in 0..100 {
        now += every;
        for e in three() {
            c.sample(&e.id, millis(rtt_of(&e)), now);
        }
        assert_eq!(c.decide(now), None);
    }
    assert_eq!(c.moves(), 0);
    // Re-pinned elsewhere: that is the one move.
    c.set_edges(&three(), Some(rid("near")));
    let m = c.decide(now).expect("re-pinned");
    assert_eq!((m.cause, m.to), (Cause::Pinned, rid("near")));
}

#[test]
fn edges_keep_their_samples_across_config_changes() {
    let every = Duration::from_secs(30);
    let mut s = Sim::new(RegionPolicy::default(), &three());
    s.run(every * 2, every, rtts(10, 80, 200));
    let mut more = three();
    more.push(ep("new-1", "new"));
    s.c.set_edges(&more, None);
    let near =
        s.c.regions(s.now)
            .into_iter()
            .find(|r| r.region == rid("near"))
            .unwrap();
    assert_eq!(near.rtt_micros, Some(10_000));
    let new =
        s.c.regions(s.now)
            .into_iter()
            .find(|r| r.region == rid("new"))
            .unwrap();
    assert_eq!(new.rtt_micros, None);
    // Samples of edges not listed are ignored.
    s.c.sample(&eid("ghost"), millis(1), s.now);
    assert_eq!(s.c.decide(s.now), None);
}

#[test]
fn samples_per_edge_stay_bounded() {
    let mut e = EdgeState::new(ep("a", "r"));
    let t0 = Instant::now();
    for i in 0..10_000u64 {
        // Rising RTTs: the worst case for the window's minimum.
        e.push(t0 + millis(i), millis(i));
    }
    assert!(e.mins.len() <= MAX_SAMPLES && e.seen.len() <= MAX_SAMPLES);
    let mut e = EdgeState::new(ep("a", "r"));
    e.push(t0, millis(50));
    e.push(t0 + millis(1), millis(30));
    e.push(t0 + millis(2), millis(40));
    assert_eq!(e.min(), Some(millis(30)));
    e.expire(
        t0 + millis(1) + Duration::from_secs(10),
        Duration::from_secs(10),
    );
    assert_eq!(e.min(), Some(millis(30)), "still in the window");
    e.expire(
        t0 + millis(2) + Duration::from_secs(10),
        Duration::from_secs(10),
    );
    assert_eq!(e.min(), Some(millis(40)));
}
