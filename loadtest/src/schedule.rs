//! Load profiles over time: the open-loop arrival schedule (the intended
//! send time of every request, as wrk2 computes it) and the closed-loop
//! concurrency level. Pure functions of the ramps: no clock, no I/O.

use std::time::Duration;

use crate::scenario::Ramp;

/// The intended send times of an open-loop run, as offsets from its start.
///
/// Within a ramp the rate goes linearly from `from` to `to`, so the expected
/// number of requests by time τ into it is `n(τ) = from·τ + (to−from)·τ²/2D`;
/// request `k` is due when the cumulative count reaches `k` (the first one
/// at 0). The times never depend on when earlier requests finished: that is
/// what makes the loop open and lets latency be measured from these times
/// (no coordinated omission).
#[derive(Debug, Clone)]
pub struct OpenSchedule {
    ramps: Vec<Ramp>,
    /// Index of the current ramp.
    idx: usize,
    /// Start of the current ramp, seconds from the run's start.
    ramp_start: f64,
    /// Requests due before the current ramp.
    before: f64,
    /// Requests yielded so far.
    k: u64,
    count: Option<u64>,
    /// Overall time cap, seconds.
    end: Option<f64>,
}

impl OpenSchedule {
    pub(crate) fn new(ramps: Vec<Ramp>, count: Option<u64>, end: Option<Duration>) -> Self {
        OpenSchedule {
            ramps,
            idx: 0,
            ramp_start: 0.0,
            before: 0.0,
            k: 0,
            count,
            end: end.map(|d| d.as_secs_f64()),
        }
    }

    /// A constant rate, for tests and simple runs.
    pub fn constant(rate: f64, count: Option<u64>, duration: Option<Duration>) -> Self {
        OpenSchedule::new(
            vec![Ramp {
                duration,
                from: rate,
                to: rate,
            }],
            count,
            duration,
        )
    }
}

impl Iterator for OpenSchedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.count.is_some_and(|c| self.k >= c) {
            return None;
        }
        loop {
            let ramp = *self.ramps.get(self.idx)?;
            let m = self.k as f64 - self.before;
            let (r0, r1) = (ramp.from, ramp.to);
            let tau = match ramp.duration {
                None => (r0 > 0.0).then(|| m / r0),
                Some(d) => {
                    let d = d.as_secs_f64();
                    let total = (r0 + r1) / 2.0 * d;
                    if m <= 0.0 && total > 0.0 {
                        Some(0.0)
                    } else if m < total {
                        let a = (r1 - r0) / (2.0 * d);
                        let disc = (r0 * r0 + 4.0 * a * m).max(0.0);
                        let denom = r0 + disc.sqrt();
                        (denom > 0.0).then(|| (2.0 * m / denom).min(d))
                    } else {
                        None
                    }
                }
            };
            match tau {
                Some(tau) => {
                    let t = self.ramp_start + tau;
                    if self.end.is_some_and(|e| t >= e) {
                        self.idx = self.ramps.len();
                        return None;
                    }
                    self.k += 1;
                    return Some(Duration::from_secs_f64(t));
                }
                None => {
                    let d = ramp.duration?.as_secs_f64();
                    self.before += (r0 + r1) / 2.0 * d;
                    self.ramp_start += d;
                    self.idx += 1;
                }
            }
        }
    }
}

/// The load level (rate or concurrency) at `t`, or `None` after the last ramp.
pub(crate) fn level_at(ramps: &[Ramp], t: Duration) -> Option<f64> {
    let mut start = Duration::ZERO;
    for r in ramps {
        match r.duration {
            None => return Some(r.to),
            Some(d) if t < start + d => {
                let f = (t - start).as_secs_f64() / d.as_secs_f64();
                return Some(r.from + (r.to - r.from) * f);
            }
            Some(d) => start += d,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(v: &[Duration]) -> Vec<f64> {
        v.iter()
            .map(|d| (d.as_secs_f64() * 1e6).round() / 1e6)
            .collect()
    }

    #[test]
    fn constant_rate_is_evenly_spaced_and_bounded() {
        let v: Vec<_> = OpenSchedule::constant(200.0, None, Some(Duration::from_secs(1))).collect();
        assert_eq!(v.len(), 200);
        assert_eq!(v[0], Duration::ZERO);
        assert_eq!(secs(&v[1..3]), vec![0.005, 0.01]);
        assert!(v.windows(2).all(|w| w[0] < w[1]));
        let v: Vec<_> = OpenSchedule::constant(1000.0, Some(7), None).collect();
        assert_eq!(v.len(), 7);
        assert_eq!(secs(&v[6..]), vec![0.006]);
    }

    #[test]
    fn linear_ramp_accelerates() {
        // 0 → 100 req/s over 2 s: n(τ) = 25 τ², so 100 requests, k due at √(k/25).
        let ramps = vec![Ramp {
            duration: Some(Duration::from_secs(2)),
            from: 0.0,
            to: 100.0,
        }];
        let v: Vec<_> = OpenSchedule::new(ramps.clone(), None, None).collect();
        assert_eq!(v.len(), 100);
        assert_eq!(secs(&[v[25], v[64]]), vec![1.0, 1.6]);
        // gaps shrink as the rate rises
        assert!(v[2] - v[1] > v[99] - v[98]);
        assert_eq!(level_at(&ramps, Duration::from_millis(500)), Some(25.0));
        assert_eq!(level_at(&ramps, Duration::from_secs(2)), None);
    }

    #[test]
    fn stages_chain_and_zero_stages_pause() {
        let ramps = vec![
            Ramp {
                duration: Some(Duration::from_secs(1)),
                from: 10.0,
                to: 10.0,
            },
            Ramp {
                duration: Some(Duration::from_secs(1)),
                from: 0.0,
                to: 0.0,
            },
            Ramp {
                duration: Some(Duration::from_secs(1)),
                from: 20.0,
                to: 20.0,
            },
        ];
        let v: Vec<_> = OpenSchedule::new(ramps, None, None).collect();
        assert_eq!(v.len(), 30);
        assert_eq!(secs(&v[9..11]), vec![0.9, 2.0]);
        assert_eq!(secs(&v[29..]), vec![2.95]);
    }

    #[test]
    fn duration_cap_cuts_the_schedule() {
        let v: Vec<_> = OpenSchedule::new(
            vec![Ramp {
                duration: None,
                from: 10.0,
                to: 10.0,
            }],
            None,
            Some(Duration::from_millis(350)),
        )
        .collect();
        assert_eq!(v.len(), 4);
    }
}
