//! Liveness, sans-IO: when one side of a control stream pings the other,
//! and whether the other still answers. The edge runs it on every tunnel
//! with a short interval; the connector and a mesh link run it too.
//!
//! QUIC's own idle timeout (10 s) is far too slow to take a vanished
//! connector out of use: every request sent to it meanwhile waits. So the
//! edge pings each tunnel every [`LivenessConfig::interval`] and judges the
//! connector by how long it has left a ping unanswered (its *silence*):
//!
//! - **healthy** while the silence is below the suspect deadline,
//!   `clamp(2 × (srtt + 4 × rttvar), 250 ms, 1 s)`: two retransmission
//!   timeouts (RFC 6298) of the ping's own round trip, so a Ping or Pong
//!   that QUIC lost once and sent again still arrives in time, with a
//!   floor for scheduling noise and a ceiling that keeps detection within
//!   about a second on any path;
//! - **suspect** from then on: the tunnel leaves the pick set (unless every
//!   tunnel of its group is suspect), and comes back with the next Pong;
//! - **dead** once the silence reaches [`LivenessConfig::dead_after`]: the
//!   edge closes the tunnel, so that what is in flight on it fails now and
//!   the request path's retry rules apply. Dead is final.
//!
//! The silence starts when the oldest unanswered ping was sent. A wake-up
//! much later than asked for means this side did not run (a paused
//! process, a starved runtime), and a Pong may be waiting unread: the
//! silence is then counted again from the wake-up, so a stalled edge does
//! not declare every tunnel dead when it resumes.
//!
//! The machine takes `now` and returns what to send ([`Liveness::poll_transmit`]),
//! what happened ([`Liveness::poll_event`]) and when to wake
//! ([`Liveness::poll_timeout`]); [`super::Control`] drives it. It has no
//! clock, no tokio and no sockets.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The shortest suspect deadline, whatever the RTT.
pub const SUSPECT_FLOOR: Duration = Duration::from_millis(250);
/// The longest suspect deadline, whatever the RTT.
pub const SUSPECT_CEILING: Duration = Duration::from_secs(1);
/// A wake-up later than this after its timeout means this side stalled.
pub const LATE_WAKEUP: Duration = SUSPECT_FLOOR;
/// Unanswered pings remembered for RTT samples; older ones are forgotten
/// (the silence is kept apart and is not affected).
const MAX_UNANSWERED: usize = 64;

/// How often to ping and when to give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    /// How often each tunnel is pinged.
    pub interval: Duration,
    /// A tunnel silent this long is closed.
    pub dead_after: Duration,
}

impl LivenessConfig {
    pub const DEFAULT: LivenessConfig = LivenessConfig {
        interval: Duration::from_millis(500),
        dead_after: Duration::from_secs(3),
    };
}

/// What the edge thinks of a tunnel's connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Suspect,
    Dead,
}

/// A change of [`Health`], with the silence that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// No Pong within the suspect deadline.
    Suspect {
        silent: Duration,
        deadline: Duration,
    },
    /// A Pong came back after the tunnel was suspect.
    Recovered { silent: Duration },
    /// No Pong within the dead time.
    Dead { silent: Duration },
}

/// Smoothed RTT and its variation, as RFC 6298 keeps them.
#[derive(Debug, Clone, Copy)]
struct Rtt {
    srtt: Duration,
    rttvar: Duration,
}

impl Rtt {
    fn first(sample: Duration) -> Rtt {
        Rtt {
            srtt: sample,
            rttvar: sample / 2,
        }
    }

    fn update(&mut self, sample: Duration) {
        let diff = self.srtt.abs_diff(sample);
        self.rttvar = (self.rttvar * 3 + diff) / 4;
        self.srtt = (self.srtt * 7 + sample) / 8;
    }
}

/// A ping on its way.
#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: u64,
    /// When it was sent, or when this side resumed after a stall.
    at: Instant,
    /// Whether its Pong measures the RTT (not if this side stalled while
    /// it was out: the Pong may have waited unread).
    timed: bool,
}

/// The liveness of one tunnel.
#[derive(Debug)]
pub struct Liveness {
    config: LivenessConfig,
    next_seq: u64,
    next_ping: Instant,
    /// Pings sent and not answered, oldest first.
    unanswered: VecDeque<Sent>,
    /// Since when the peer has been silent: the send time of the oldest
    /// unanswered ping, moved later by any time this side did not run.
    silent_since: Option<Instant>,
    rtt: Rtt,
    health: Health,
    transmit: VecDeque<u64>,
    events: VecDeque<Event>,
}

impl Liveness {
    /// A tunnel that was just welcomed, whose handshake measured
    /// `initial_rtt` (QUIC's estimate): the first ping goes out now.
    pub fn new(config: LivenessConfig, now: Instant, initial_rtt: Duration) -> Liveness {
        Liveness {
            config,
            next_seq: 1,
            next_ping: now,
            unanswered: VecDeque::new(),
            silent_since: None,
            rtt: Rtt::first(initial_rtt),
            health: Health::Healthy,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// The smoothed RTT of the pings.
    pub fn srtt(&self) -> Duration {
        self.rtt.srtt
    }

    /// How long a ping may go unanswered before the tunnel is suspect.
    pub fn suspect_deadline(&self) -> Duration {
        (2 * (self.rtt.srtt + 4 * self.rtt.rttvar)).clamp(SUSPECT_FLOOR, SUSPECT_CEILING)
    }

    /// When [`Liveness::handle_timeout`] must be called next; `None` once
    /// the tunnel is dead.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.health == Health::Dead {
            return None;
        }
        let mut at = self.next_ping;
        if let Some(since) = self.silent_since {
            at = at.min(since + self.config.dead_after);
            if self.health == Health::Healthy {
                at = at.min(since + self.suspect_deadline());
            }
        }
        Some(at)
    }

    /// Sends what is due at `now` and judges the silence.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(due) = self.poll_timeout() else {
            return;
        };
        // Woken much later than asked: this side stalled, and a Pong may be
        // waiting unread. Judge the peer again from now.
        if now.saturating_duration_since(due) > LATE_WAKEUP && self.silent_since.is_some() {
            self.silent_since = Some(now);
            for sent in &mut self.unanswered {
                sent.at = now;
                sent.timed = false;
            }
        }
        if now >= self.next_ping {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.transmit.push_back(seq);
            if self.unanswered.len() == MAX_UNANSWERED {
                self.unanswered.pop_front();
            }
            self.unanswered.push_back(Sent {
                seq,
                at: now,
                timed: true,
            });
            self.silent_since.get_or_insert(now);
            self.next_ping = now + self.config.interval;
        }
        let Some(since) = self.silent_since else {
            return;
        };
        let silent = now.saturating_duration_since(since);
        if silent >= self.config.dead_after {
            self.health = Health::Dead;
            self.transmit.clear();
            self.events.push_back(Event::Dead { silent });
        } else if self.health == Health::Healthy && silent >= self.suspect_deadline() {
            self.health = Health::Suspect;
            self.events.push_back(Event::Suspect {
                silent,
                deadline: self.suspect_deadline(),
            });
        }
    }

    /// A `Pong(value)` arrived at `now`. When it answers a ping this
    /// machine sent (and every older one: the control stream is ordered),
    /// the silence ends; returns the RTT sample it gave, if any.
    pub fn handle_pong(&mut self, value: u64, now: Instant) -> Option<Duration> {
        if self.health == Health::Dead {
            return None;
        }
        let pos = self.unanswered.iter().position(|s| s.seq == value)?;
        let sent = self.unanswered[pos];
        let silent = self
            .silent_since
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        self.unanswered.drain(..=pos);
        self.silent_since = self.unanswered.front().map(|s| s.at);
        if self.health == Health::Suspect {
            self.health = Health::Healthy;
            self.events.push_back(Event::Recovered { silent });
        }
        let sample = now.saturating_duration_since(sent.at);
        sent.timed.then(|| {
            self.rtt.update(sample);
            sample
        })
    }

    /// A Ping value to send on the control stream.
    pub fn poll_transmit(&mut self) -> Option<u64> {
        self.transmit.pop_front()
    }

    /// The next change of health.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Drives a machine on a virtual clock: a connector that answers each
    /// ping after `rtt` while `answering` says so.
    struct Sim {
        live: Liveness,
        now: Instant,
        start: Instant,
        /// Pings on the wire: (value, when its Pong arrives).
        in_flight: Vec<(u64, Instant)>,
        events: Vec<(Duration, Event)>,
        sent: u64,
    }

    impl Sim {
        fn new(config: LivenessConfig, initial_rtt: Duration) -> Sim {
            let now = Instant::now();
            Sim {
                live: Liveness::new(config, now, initial_rtt),
                now,
                start: now,
                in_flight: Vec::new(),
                events: Vec::new(),
                sent: 0,
            }
        }

        fn elapsed(&self) -> Duration {
            self.now - self.start
        }

        /// Runs until `until` (from the start), the peer answering with
        /// `rtt(sent)` or dropping pings when it returns `None`.
        fn run(&mut self, until: Duration, rtt: impl Fn(Duration) -> Option<Duration>) {
            let end = self.start + until;
            loop {
                let pong_at = self.in_flight.iter().map(|(_, at)| *at).min();
                let wake = [self.live.poll_timeout(), pong_at]
                    .into_iter()
                    .flatten()
                    .min();
                let Some(wake) = wake.filter(|w| *w <= end) else {
                    self.now = end;
                    return;
                };
                self.now = wake;
                if pong_at == Some(wake) {
                    let i = self
                        .in_flight
                        .iter()
                        .position(|(_, at)| *at == wake)
                        .unwrap();
                    let (v, _) = self.in_flight.remove(i);
                    self.live.handle_pong(v, self.now);
                } else {
                    self.live.handle_timeout(self.now);
                }
                while let Some(v) = self.live.poll_transmit() {
                    self.sent += 1;
                    if let Some(r) = rtt(self.elapsed()) {
                        self.in_flight.push((v, self.now + r));
                    }
                }
                while let Some(e) = self.live.poll_event() {
                    self.events.push((self.elapsed(), e));
                }
            }
        }
    }

    #[test]
    fn a_connector_that_answers_stays_healthy_and_is_pinged_every_interval() {
        let mut sim = Sim::new(LivenessConfig::DEFAULT, 20 * MS);
        sim.run(Duration::from_secs(60), |_| Some(20 * MS));
        assert!(sim.events.is_empty(), "{:?}", sim.events);
        assert_eq!(sim.live.health(), Health::Healthy);
        // One ping at the start, then one every 500 ms.
        assert_eq!(sim.sent, 121);
        assert_eq!(sim.live.srtt(), 20 * MS);
        // 2 × (20 + 4 × rttvar) with rttvar decayed towards 0: the floor.
        assert_eq!(sim.live.suspect_deadline(), SUSPECT_FLOOR);
    }

    #[test]
    fn the_suspect_deadline_follows_the_rtt_between_floor_and_ceiling() {
        let deadline = |srtt: Duration| {
            let mut l = Liveness::new(LivenessConfig::DEFAULT, Instant::now(), srtt);
            l.rtt = Rtt {
                srtt,
                rttvar: srtt / 4,
            };
            l.suspect_deadline()
        };
        assert_eq!(deadline(MS), SUSPECT_FLOOR);
        // 2 × (100 + 4 × 25) ms.
        assert_eq!(deadline(100 * MS), 400 * MS);
        assert_eq!(deadline(400 * MS), SUSPECT_CEILING);
    }

    /// The connector vanishes just before 10 s: the tunnel is suspect the
    /// floor after the first ping it does not answer (within a second of
    /// its last answer), and dead 3 s after that ping.
    #[test]
    fn a_vanished_connector_is_suspect_within_a_second_and_dead_after_the_dead_time() {
        let mut sim = Sim::new(LivenessConfig::DEFAULT, MS);
        let gone = Duration::from_secs(10);
        sim.run(Duration::from_secs(20), |sent| (sent < gone).then_some(MS));
        // Pings go out at 0, 0.5, 1, ...: the one at 9.5 s is the last
        // answered, the one at 10 s the first lost.
        let last_answered = gone - 500 * MS;
        let first_lost = gone;
        assert_eq!(
            sim.events,
            vec![
                (
                    first_lost + SUSPECT_FLOOR,
                    Event::Suspect {
                        silent: SUSPECT_FLOOR,
                        deadline: SUSPECT_FLOOR
                    }
                ),
                (
                    first_lost + Duration::from_secs(3),
                    Event::Dead {
                        silent: Duration::from_secs(3)
                    }
                ),
            ]
        );
        // However soon after its last answer the connector vanished.
        assert!(first_lost + SUSPECT_FLOOR - last_answered < Duration::from_secs(1));
        assert_eq!(sim.live.health(), Health::Dead);
        assert_eq!(sim.live.poll_timeout(), None, "a dead tunnel is not pinged");
        assert_eq!(sim.live.handle_pong(99, sim.now), None);
    }

    /// A connector that is slow for a while (pongs take 600 ms) is suspect,
    /// then healthy again when its pongs come back, and never dead.
    #[test]
    fn a_slow_connector_is_suspect_then_recovers() {
        let mut sim = Sim::new(LivenessConfig::DEFAULT, MS);
        let slow = Duration::from_secs(5)..Duration::from_secs(6);
        sim.run(Duration::from_secs(10), |sent| {
            Some(if slow.contains(&sent) { 600 * MS } else { MS })
        });
        let kinds: Vec<_> = sim.events.iter().map(|(_, e)| *e).collect();
        assert!(
            matches!(
                kinds[..],
                [Event::Suspect { .. }, Event::Recovered { .. }, ..]
            ),
            "{:?}",
            sim.events
        );
        assert!(
            !kinds.iter().any(|e| matches!(e, Event::Dead { .. })),
            "{:?}",
            sim.events
        );
        // The first slow ping went out at 5 s: suspect at 5.25, its Pong at 5.6.
        assert_eq!(sim.events[0].0, Duration::from_millis(5250));
        assert_eq!(sim.events[1].0, Duration::from_millis(5600));
        assert_eq!(sim.live.health(), Health::Healthy);
    }

    /// Pongs can arrive out of the expected order or answer a ping the
    /// machine never sent: an unknown value is ignored, a newer one
    /// answers the older pings too.
    #[test]
    fn a_pong_answers_its_ping_and_every_older_one() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::DEFAULT, t0, MS);
        l.handle_timeout(t0);
        assert_eq!(l.poll_transmit(), Some(1));
        l.handle_timeout(t0 + SUSPECT_FLOOR);
        assert!(matches!(l.poll_event(), Some(Event::Suspect { .. })));
        l.handle_timeout(t0 + 500 * MS);
        assert_eq!(l.poll_transmit(), Some(2));
        assert_eq!(l.handle_pong(7, t0 + 501 * MS), None, "never sent");
        assert_eq!(l.health(), Health::Suspect);
        assert_eq!(l.handle_pong(2, t0 + 510 * MS), Some(10 * MS));
        assert_eq!(l.poll_event(), Some(Event::Recovered { silent: 510 * MS }));
        assert_eq!(l.handle_pong(1, t0 + 511 * MS), None, "already answered");
        assert_eq!(l.poll_timeout(), Some(t0 + 1000 * MS), "only the next ping");
    }

    /// The edge itself did not run for 5 s (its timer fired late): that is
    /// not the connector's silence, so the tunnel is neither suspect nor
    /// dead on wake-up. The Pong that was waiting is read next, and the
    /// connector is judged as usual from then on.
    #[test]
    fn time_this_side_did_not_run_is_not_the_peers_silence() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::DEFAULT, t0, MS);
        l.handle_timeout(t0);
        assert_eq!(l.poll_transmit(), Some(1));
        let due = l.poll_timeout().unwrap();
        assert_eq!(due, t0 + SUSPECT_FLOOR);
        let woke = t0 + Duration::from_secs(5);
        l.handle_timeout(woke);
        assert_eq!(l.health(), Health::Healthy);
        assert_eq!(l.poll_event(), None);
        // The ping due at 0.5 s goes out now.
        assert_eq!(l.poll_transmit(), Some(2));
        // Its Pong may have waited unread: no RTT sample from it.
        assert_eq!(l.handle_pong(1, woke + MS), None);
        assert_eq!(l.srtt(), MS);
        assert_eq!(l.poll_event(), None);
        // Still judged from then on: the second ping unanswered for the
        // floor makes it suspect.
        let due = l.poll_timeout().unwrap();
        assert_eq!(due, woke + SUSPECT_FLOOR);
        l.handle_timeout(due);
        assert!(matches!(l.poll_event(), Some(Event::Suspect { .. })));
        // And dead the dead time after that ping, if nothing comes back.
        while let Some(at) = l.poll_timeout() {
            l.handle_timeout(at);
        }
        let dead = Duration::from_secs(3);
        assert_eq!(l.poll_event(), Some(Event::Dead { silent: dead }));
    }

    /// A machine called before its timeout changes nothing.
    #[test]
    fn an_early_call_changes_nothing() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::DEFAULT, t0, MS);
        l.handle_timeout(t0);
        assert_eq!(l.poll_transmit(), Some(1));
        l.handle_timeout(t0 + 100 * MS);
        assert_eq!(l.poll_transmit(), None);
        assert_eq!(l.poll_event(), None);
        assert_eq!(l.poll_timeout(), Some(t0 + SUSPECT_FLOOR));
    }
}
