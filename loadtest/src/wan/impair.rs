//! One direction's impairments and the shaper that turns them into a verdict
//! per datagram: dropped (and why), or due at an instant (plus an optional
//! duplicate). Pure: it takes `now` as an argument and owns a seeded RNG, so
//! it is unit-tested without sockets or clocks.

use std::time::{Duration, Instant};

use super::WanError;

/// Default bottleneck queue when a rate cap is set: 256 KiB (about 170
/// full-size datagrams, 20 ms at 100 Mbit/s).
pub const DEFAULT_QUEUE_BYTES: usize = 256 * 1024;

/// The impairments of one direction of one path.
///
/// Applied in this order: MTU clamp, loss, bandwidth cap (serialization delay
/// behind a tail-drop queue of `queue_bytes`), delay ± jitter, reordering,
/// duplication. Without reordering, delivery order is FIFO: jitter never lets
/// a later datagram overtake an earlier one.
#[derive(Debug, Clone, PartialEq)]
pub struct Impairment {
    /// One-way delay.
    pub delay: Duration,
    /// Uniform jitter: each datagram's delay is `delay ± jitter` (never below 0).
    pub jitter: Duration,
    /// Probability (0..=1) that a datagram is dropped (long-run average).
    pub loss: f64,
    /// Burstiness of loss in 0..1: 0 drops independently; towards 1 losses
    /// come in bursts (a two-state Gilbert model: after a loss the next
    /// datagram is lost with `loss + corr × (1 − loss)`), with the same
    /// average `loss`. Mean burst length is `1 / (1 − that)`.
    pub loss_correlation: f64,
    /// Probability (0..=1) that a datagram is held back by
    /// [`Impairment::reorder_hold`] so that the ones behind it overtake it.
    pub reorder: f64,
    /// Probability (0..=1) that a datagram is delivered twice.
    pub duplicate: f64,
    /// Bandwidth cap in bits per second.
    pub rate_bps: Option<u64>,
    /// Bytes the bottleneck queue holds before tail drop (with `rate_bps`).
    pub queue_bytes: usize,
    /// Datagrams larger than this (UDP payload bytes) are dropped.
    pub mtu: Option<usize>,
}

impl Default for Impairment {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            loss_correlation: 0.0,
            reorder: 0.0,
            duplicate: 0.0,
            rate_bps: None,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            mtu: None,
        }
    }
}

impl Impairment {
    /// A transparent direction.
    pub fn none() -> Self {
        Self::default()
    }

    /// Only a one-way delay.
    pub fn delay(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    /// How long a reordered datagram is held back: `max(1 ms, 2 × jitter)`.
    pub fn reorder_hold(&self) -> Duration {
        (self.jitter * 2).max(Duration::from_millis(1))
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), WanError> {
        for (field, p) in [
            ("loss", self.loss),
            ("reorder", self.reorder),
            ("duplicate", self.duplicate),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(WanError::InvalidImpairment {
                    field,
                    reason: "must be a probability in 0..=1",
                });
            }
        }
        if !(0.0..1.0).contains(&self.loss_correlation) {
            return Err(WanError::InvalidImpairment {
                field: "loss_correlation",
                reason: "must be in 0..1",
            });
        }
        if self.rate_bps == Some(0) {
            return Err(WanError::InvalidImpairment {
                field: "rate_bps",
                reason: "must be > 0 (use None for no cap)",
            });
        }
        if self.queue_bytes == 0 {
            return Err(WanError::InvalidImpairment {
                field: "queue_bytes",
                reason: "must be > 0",
            });
        }
        if self.mtu == Some(0) {
            return Err(WanError::InvalidImpairment {
                field: "mtu",
                reason: "must be > 0",
            });
        }
        if self.delay > Duration::from_secs(60) || self.jitter > Duration::from_secs(60) {
            return Err(WanError::InvalidImpairment {
                field: "delay",
                reason: "delay and jitter must be at most 60 s",
            });
        }
        Ok(())
    }
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    Blackhole,
    Mtu,
    Loss,
    Queue,
    Overflow,
    NatFull,
    Send,
}

/// What the shaper decided for one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Drop(DropReason),
    Deliver {
        due: Instant,
        duplicate: bool,
        reordered: bool,
    },
}

/// The state of one direction: its impairment, the bottleneck link, the FIFO
/// horizon and the RNG.
#[derive(Debug)]
pub(crate) struct Shaper {
    imp: Impairment,
    /// When the bottleneck link finishes serializing what it has accepted.
    link_free_at: Option<Instant>,
    /// The latest due time handed out in FIFO order.
    last_due: Option<Instant>,
    /// Whether the previous datagram was lost (for correlated loss).
    last_lost: bool,
    rng: fastrand::Rng,
}

impl Shaper {
    pub(crate) fn new(imp: Impairment, seed: u64) -> Self {
        Self {
            imp,
            link_free_at: None,
            last_due: None,
            last_lost: false,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    pub(crate) fn impairment(&self) -> &Impairment {
        &self.imp
    }

    /// Replaces the impairment; the link and FIFO state carry over so that
    /// already scheduled datagrams keep their order.
    pub(crate) fn set(&mut self, imp: Impairment) {
        self.imp = imp;
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.f64() < p
    }

    /// This datagram's loss probability under the Gilbert model.
    fn loss_probability(&self) -> f64 {
        let (p, c) = (self.imp.loss, self.imp.loss_correlation);
        if c <= 0.0 || p <= 0.0 || p >= 1.0 {
            return p;
        }
        let after_loss = p + c * (1.0 - p);
        if self.last_lost {
            after_loss
        } else {
            // Keeps the stationary loss rate at p.
            p * (1.0 - after_loss) / (1.0 - p)
        }
    }

    pub(crate) fn admit(&mut self, now: Instant, len: usize) -> Verdict {
        if self.imp.mtu.is_some_and(|mtu| len > mtu) {
            return Verdict::Drop(DropReason::Mtu);
        }
        let lost = self.chance(self.loss_probability());
        self.last_lost = lost;
        if lost {
            return Verdict::Drop(DropReason::Loss);
        }
        let depart = match self.imp.rate_bps {
            None => now,
            Some(rate) => {
                let start = self.link_free_at.map_or(now, |t| t.max(now));
                let backlog = bytes_in(start - now, rate);
                if backlog.saturating_add(len as u64) > self.imp.queue_bytes as u64 {
                    return Verdict::Drop(DropReason::Queue);
                }
                let done = start + serialization(len, rate);
                self.link_free_at = Some(done);
                done
            }
        };
        let mut due = depart + self.imp.delay;
        if !self.imp.jitter.is_zero() {
            let j = self.imp.jitter.as_secs_f64() * (self.rng.f64() * 2.0 - 1.0);
            due = if j >= 0.0 {
                due + Duration::from_secs_f64(j)
            } else {
                due.checked_sub(Duration::from_secs_f64(-j))
                    .unwrap_or(depart)
                    .max(depart)
            };
        }
        let reordered = self.chance(self.imp.reorder);
        if reordered {
            // Held back, outside the FIFO horizon: later datagrams overtake it.
            due += self.imp.reorder_hold();
        } else {
            if let Some(last) = self.last_due {
                due = due.max(last);
            }
            self.last_due = Some(due);
        }
        let duplicate = self.chance(self.imp.duplicate);
        Verdict::Deliver {
            due,
            duplicate,
            reordered,
        }
    }
}

/// Time to serialize `len` bytes at `rate` bits per second.
pub(crate) fn serialization(len: usize, rate: u64) -> Duration {
    let nanos = (len as u128 * 8 * 1_000_000_000).div_ceil(u128::from(rate));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Bytes a link at `rate` bits per second carries in `d`.
fn bytes_in(d: Duration, rate: u64) -> u64 {
    let bytes = d.as_nanos() * u128::from(rate) / 8 / 1_000_000_000;
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(v: Verdict) -> Instant {
        match v {
            Verdict::Deliver { due, .. } => due,
            Verdict::Drop(r) => panic!("dropped: {r:?}"),
        }
    }

    #[test]
    fn delay_only_is_exact() {
        let now = Instant::now();
        let mut s = Shaper::new(Impairment::delay(Duration::from_millis(20)), 1);
        assert_eq!(due(s.admit(now, 1200)), now + Duration::from_millis(20));
    }

    #[test]
    fn jitter_stays_in_bounds_and_keeps_fifo() {
        let now = Instant::now();
        let imp = Impairment {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(5),
            ..Impairment::default()
        };
        let mut s = Shaper::new(imp, 7);
        let mut last = now;
        let mut distinct = std::collections::HashSet::new();
        for i in 0..1000u32 {
            let t = now + Duration::from_micros(u64::from(i) * 100);
            let d = due(s.admit(t, 100));
            assert!(d >= last, "FIFO broken at {i}");
            assert!(d >= t + Duration::from_millis(15));
            assert!(d <= t.max(last) + Duration::from_millis(25));
            distinct.insert(d);
            last = d;
        }
        assert!(distinct.len() > 100, "jitter had no effect");
    }

    #[test]
    fn reorder_holds_back_outside_fifo() {
        let now = Instant::now();
        let imp = Impairment {
            reorder: 1.0,
            ..Impairment::default()
        };
        let mut s = Shaper::new(imp, 3);
        match s.admit(now, 100) {
            Verdict::Deliver { due, reordered, .. } => {
                assert!(reordered);
                assert_eq!(due, now + Duration::from_millis(1));
            }
            v => panic!("{v:?}"),
        }
        s.set(Impairment::default());
        // The next datagram is not held behind the reordered one.
        assert_eq!(due(s.admit(now, 100)), now);
    }

    #[test]
    fn rate_serializes_and_tail_drops() {
        let now = Instant::now();
        let imp = Impairment {
            rate_bps: Some(8_000_000), // 1 byte per µs
            queue_bytes: 3000,
            ..Impairment::default()
        };
        let mut s = Shaper::new(imp, 1);
        assert_eq!(due(s.admit(now, 1000)), now + Duration::from_micros(1000));
        assert_eq!(due(s.admit(now, 1000)), now + Duration::from_micros(2000));
        assert_eq!(due(s.admit(now, 1000)), now + Duration::from_micros(3000));
        assert_eq!(s.admit(now, 1000), Verdict::Drop(DropReason::Queue));
        // Once the link drained, it accepts again.
        let later = now + Duration::from_micros(3000);
        assert_eq!(due(s.admit(later, 500)), later + Duration::from_micros(500));
    }

    #[test]
    fn mtu_and_loss_drop() {
        let now = Instant::now();
        let mut s = Shaper::new(
            Impairment {
                mtu: Some(1280),
                ..Impairment::default()
            },
            1,
        );
        assert_eq!(s.admit(now, 1281), Verdict::Drop(DropReason::Mtu));
        assert_eq!(due(s.admit(now, 1280)), now);

        let mut s = Shaper::new(
            Impairment {
                loss: 0.1,
                ..Impairment::default()
            },
            42,
        );
        let lost = (0..10_000)
            .filter(|_| s.admit(now, 100) == Verdict::Drop(DropReason::Loss))
            .count();
        assert!((800..1200).contains(&lost), "lost {lost} of 10000 at 10%");
    }

    #[test]
    fn correlated_loss_keeps_the_average_and_makes_bursts() {
        let now = Instant::now();
        let mut s = Shaper::new(
            Impairment {
                loss: 0.1,
                loss_correlation: 0.5,
                ..Impairment::default()
            },
            9,
        );
        let lost: Vec<bool> = (0..100_000)
            .map(|_| s.admit(now, 100) == Verdict::Drop(DropReason::Loss))
            .collect();
        let total = lost.iter().filter(|l| **l).count();
        let bursts = lost.windows(2).filter(|w| !w[0] && w[1]).count();
        assert!((9_000..11_000).contains(&total), "lost {total} at 10%");
        // Mean burst length 1 / (1 - 0.55) = 2.2 (independent loss: 1.1).
        let mean = total as f64 / bursts as f64;
        assert!((1.9..2.5).contains(&mean), "mean burst {mean}");
    }

    #[test]
    fn validate_rejects_out_of_range() {
        assert!(Impairment::default().validate().is_ok());
        for bad in [
            Impairment {
                loss: 1.5,
                ..Impairment::default()
            },
            Impairment {
                duplicate: -0.1,
                ..Impairment::default()
            },
            Impairment {
                reorder: f64::NAN,
                ..Impairment::default()
            },
            Impairment {
                loss_correlation: 1.0,
                ..Impairment::default()
            },
            Impairment {
                rate_bps: Some(0),
                ..Impairment::default()
            },
            Impairment {
                mtu: Some(0),
                ..Impairment::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
