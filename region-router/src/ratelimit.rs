//! A token bucket per source address, for `POST /v1/enroll`.
//!
//! Each address (an IPv6 address counts by its /64, the block one user
//! usually holds) gets a bucket of `burst` tokens that refills at
//! `per_minute`; an attempt takes one token, and an empty bucket answers
//! with how long until the next token. The bucket is kept as the time it
//! will be full again (the GCRA form of a token bucket), so that the
//! arithmetic is exact durations, not floating point. The table is bounded: when it holds
//! `max_addresses`, buckets that have refilled completely are dropped (they
//! behave exactly as an absent one), at most once a second; if it is still
//! full, new addresses share one overflow bucket. An attacker spraying
//! addresses thus limits only the newcomers that arrive while the table is
//! full, never the addresses already in it, and memory stays bounded.
//!
//! The clock is an argument, so the refill is tested without waiting.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a full table may be swept for idle buckets.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The limit's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnrollLimit {
    /// Attempts one address may make in a row.
    pub burst: u32,
    /// Attempts per minute it regains, one at a time.
    pub per_minute: u32,
    /// Addresses tracked at once.
    pub max_addresses: usize,
}

impl Default for EnrollLimit {
    /// 30 in a row, then one every 2 s, for up to 10,000 addresses (about
    /// 1 MiB): enough for a fleet enrolling from behind one NAT address, far
    /// too little to make the router sign for a flood.
    fn default() -> Self {
        EnrollLimit {
            burst: 30,
            per_minute: 30,
            max_addresses: 10_000,
        }
    }
}

pub(crate) struct RateLimiter {
    /// The time one token takes to come back.
    interval: Duration,
    /// How far ahead of now a bucket may be booked: `burst - 1` intervals.
    tolerance: Duration,
    max_addresses: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    buckets: HashMap<IpAddr, Bucket>,
    overflow: Bucket,
    last_sweep: Option<Instant>,
}

/// When the bucket is full again; at or before now, it is full.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    full_at: Instant,
}

impl RateLimiter {
    /// `burst` and `per_minute` must be at least 1 (the router's config
    /// checks them).
    pub(crate) fn new(limit: EnrollLimit, now: Instant) -> RateLimiter {
        let interval = Duration::from_secs(60) / limit.per_minute.max(1);
        RateLimiter {
            interval,
            tolerance: interval * limit.burst.max(1).saturating_sub(1),
            max_addresses: limit.max_addresses,
            inner: Mutex::new(Inner {
                buckets: HashMap::new(),
                overflow: Bucket { full_at: now },
                last_sweep: None,
            }),
        }
    }

    /// Takes a token for `addr`, or says how long until one is there.
    pub(crate) fn check(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = key(addr);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *inner;
        if !inner.buckets.contains_key(&key) && inner.buckets.len() >= self.max_addresses {
            sweep(inner, now);
        }
        let bucket = if inner.buckets.len() < self.max_addresses {
            inner.buckets.entry(key).or_insert(Bucket { full_at: now })
        } else {
            inner.buckets.get_mut(&key).unwrap_or(&mut inner.overflow)
        };
        let booked = bucket.full_at.max(now);
        let ahead = booked - now;
        if ahead > self.tolerance {
            return Err(ahead - self.tolerance);
        }
        bucket.full_at = booked + self.interval;
        Ok(())
    }

    /// How many addresses have a bucket.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .buckets
            .len()
    }
}

/// Drops the buckets that are full again (they behave as absent ones), at
/// most once per [`SWEEP_EVERY`].
fn sweep(inner: &mut Inner, now: Instant) {
    if inner
        .last_sweep
        .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
    {
        return;
    }
    inner.last_sweep = Some(now);
    inner.buckets.retain(|_, b| b.full_at > now);
}

/// The address a bucket is kept for: IPv4 as it is (also when mapped into
/// IPv6), IPv6 by its /64.
fn key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limiter(burst: u32, per_minute: u32, max_addresses: usize, now: Instant) -> RateLimiter {
        RateLimiter::new(
            EnrollLimit {
                burst,
                per_minute,
                max_addresses,
            },
            now,
        )
    }

    #[test]
    fn a_burst_then_one_per_interval() {
        let t0 = Instant::now();
        let l = limiter(3, 6, 100, t0); // one token every 10 s
        for _ in 0..3 {
            assert_eq!(l.check(ip("192.0.2.1"), t0), Ok(()));
        }
        let wait = l.check(ip("192.0.2.1"), t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10));
        // Another address has its own bucket.
        assert_eq!(l.check(ip("192.0.2.2"), t0), Ok(()));
        // Half way, still empty, and it says how long is left.
        let wait = l
            .check(ip("192.0.2.1"), t0 + Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(5));
        assert_eq!(
            l.check(ip("192.0.2.1"), t0 + Duration::from_secs(10)),
            Ok(())
        );
        assert!(l
            .check(ip("192.0.2.1"), t0 + Duration::from_secs(10))
            .is_err());
        // Refilled, but never beyond the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(l.check(ip("192.0.2.1"), later), Ok(()));
        }
        assert!(l.check(ip("192.0.2.1"), later).is_err());
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        let t0 = Instant::now();
        let l = limiter(1, 1, 100, t0);
        assert_eq!(l.check(ip("2001:db8:1:2::1"), t0), Ok(()));
        assert!(
            l.check(ip("2001:db8:1:2:ffff::9"), t0).is_err(),
            "the same /64"
        );
        assert_eq!(l.check(ip("2001:db8:1:3::1"), t0), Ok(()), "another /64");
        assert_eq!(l.check(ip("::ffff:192.0.2.9"), t0), Ok(()));
        assert!(
            l.check(ip("192.0.2.9"), t0).is_err(),
            "the same IPv4 address"
        );
    }

    #[test]
    fn the_table_is_bounded_and_newcomers_share_an_overflow_bucket() {
        let t0 = Instant::now();
        let l = limiter(2, 60, 3, t0); // one token a second
        for i in 1..=3 {
            assert_eq!(l.check(ip(&format!("192.0.2.{i}")), t0), Ok(()));
        }
        // Full of active buckets: newcomers share one bucket of 2.
        assert_eq!(l.check(ip("198.51.100.1"), t0), Ok(()));
        assert_eq!(l.check(ip("198.51.100.2"), t0), Ok(()));
        assert!(l.check(ip("198.51.100.3"), t0).is_err());
        assert_eq!(l.tracked(), 3, "memory stays bounded");
        // The tracked addresses keep their own buckets meanwhile.
        assert_eq!(l.check(ip("192.0.2.1"), t0), Ok(()));
        assert!(l.check(ip("192.0.2.1"), t0).is_err());

        // Once the tracked buckets have refilled they are swept, and a
        // newcomer gets a bucket of its own.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(l.check(ip("198.51.100.3"), later), Ok(()));
        assert_eq!(l.tracked(), 1);
        assert_eq!(l.check(ip("198.51.100.3"), later), Ok(()));
        assert!(
            l.check(ip("198.51.100.3"), later).is_err(),
            "its own burst of 2"
        );
    }
}
