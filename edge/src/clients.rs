//! The users' connections by client address: caps on how many a whole
//! edge and one client may hold (TCP and QUIC alike), each client's
//! budget of cancelled requests (HTTP/2 rapid reset and its cousins), and
//! its count of stalled responses. One client's behaviour is charged to
//! that client, so it cannot spend what other users need.
//!
//! A client is its IP address; an IPv6 client is its /64, the block one
//! subscriber usually gets, so an attacker cannot multiply its caps by
//! walking the addresses of its own prefix.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The limits on users' connections, from the edge's config.
#[derive(Debug, Clone)]
pub(crate) struct ClientLimits {
    /// Connections the edge holds at once, all clients together.
    pub(crate) max_connections: usize,
    /// Connections one client holds at once.
    pub(crate) max_connections_per_client: usize,
    /// Requests one client may cancel before their response in a burst...
    pub(crate) reset_burst: u32,
    /// ...and per second after it.
    pub(crate) reset_rate: u32,
    /// Stalled responses (a client that stopped reading) one client may
    /// hold at once; the next one is reset at once.
    pub(crate) max_stalled_per_client: u32,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The edge holds `max_connections`.
    Total,
    /// This client holds `max_connections_per_client`.
    PerClient,
}

impl Refused {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refused::Total => "total",
            Refused::PerClient => "per_client",
        }
    }
}

/// Every client with a connection (or a recent history of cancels).
#[derive(Debug)]
pub(crate) struct Clients {
    limits: ClientLimits,
    total: AtomicUsize,
    by_key: Mutex<HashMap<IpAddr, Arc<ClientEntry>>>,
}

/// One client's counters.
#[derive(Debug)]
pub(crate) struct ClientEntry {
    /// Connections held; changed under the table's lock.
    conns: AtomicUsize,
    /// Responses counted as stalled right now.
    stalled: AtomicU32,
    resets: Mutex<Bucket>,
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Clients {
    pub(crate) fn new(limits: ClientLimits) -> Clients {
        Clients {
            limits,
            total: AtomicUsize::new(0),
            by_key: Mutex::new(HashMap::new()),
        }
    }

    /// Connections held right now.
    #[cfg(test)]
    pub(crate) fn connections(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Admits one more connection from `ip`, or says which cap refuses it.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, Refused> {
        let key = client_key(ip);
        let mut by_key = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.limits.max_connections {
            return Err(Refused::Total);
        }
        let entry = by_key.entry(key).or_insert_with(|| {
            Arc::new(ClientEntry {
                conns: AtomicUsize::new(0),
                stalled: AtomicU32::new(0),
                resets: Mutex::new(Bucket {
                    tokens: f64::from(self.limits.reset_burst),
                    at: Instant::now(),
                }),
            })
        });
        if entry.conns.load(Ordering::Relaxed) >= self.limits.max_connections_per_client {
            return Err(Refused::PerClient);
        }
        entry.conns.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnPermit {
            clients: Arc::clone(self),
            entry: Arc::clone(entry),
            key,
        })
    }

    /// Forgets clients with no connection whose reset budget is full
    /// again: the table holds only who is connected or was recently
    /// charged. Called now and then by the accept loop.
    pub(crate) fn sweep(&self, now: Instant) {
        let mut by_key = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        by_key.retain(|_, e| e.conns.load(Ordering::Relaxed) > 0 || !e.refilled(now, &self.limits));
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.by_key.lock().unwrap().len()
    }
}

impl ClientEntry {
    fn refilled(&self, now: Instant, limits: &ClientLimits) -> bool {
        let mut b = self.resets.lock().unwrap_or_else(|e| e.into_inner());
        b.refill(now, limits);
        b.tokens >= f64::from(limits.reset_burst)
    }
}

impl Bucket {
    fn refill(&mut self, now: Instant, limits: &ClientLimits) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(limits.reset_rate))
            .min(f64::from(limits.reset_burst));
        self.at = now;
    }
}

/// One admitted connection; dropping it gives the place back.
#[derive(Debug)]
pub(crate) struct ConnPermit {
    clients: Arc<Clients>,
    entry: Arc<ClientEntry>,
    key: IpAddr,
}

impl ConnPermit {
    /// Charges one request the client cancelled before its response.
    /// `false` once the client's budget is spent: its connection should
    /// be closed.
    pub(crate) fn charge_reset(&self, now: Instant) -> bool {
        let limits = &self.clients.limits;
        let mut b = self.entry.resets.lock().unwrap_or_else(|e| e.into_inner());
        b.refill(now, limits);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Counts one more stalled response for this client; `false` (and
    /// nothing counted) when the client already holds its share.
    pub(crate) fn charge_stall(&self) -> bool {
        let max = self.clients.limits.max_stalled_per_client;
        self.entry
            .stalled
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// A stalled response of this client moved on, or ended.
    pub(crate) fn release_stall(&self) {
        let _ = self
            .entry
            .stalled
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut by_key = self
            .clients
            .by_key
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.clients.total.fetch_sub(1, Ordering::Relaxed);
        let left = self.entry.conns.fetch_sub(1, Ordering::Relaxed) - 1;
        if left == 0 && self.entry.refilled(Instant::now(), &self.clients.limits) {
            by_key.remove(&self.key);
        }
    }
}

/// The key a client is counted under: its IPv4 address (an IPv4-mapped
/// IPv6 address counts as IPv4), or its IPv6 /64.
pub(crate) fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(s.into())
            }
        },
    }
}

/// How often the accept loop sweeps the client table.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ClientLimits {
        ClientLimits {
            max_connections: 5,
            max_connections_per_client: 2,
            reset_burst: 3,
            reset_rate: 1,
            max_stalled_per_client: 2,
        }
    }

    #[test]
    fn caps_hold_per_client_and_in_total_and_free_on_drop() {
        let c = Arc::new(Clients::new(limits()));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let p1 = c.admit(a).unwrap();
        let p2 = c.admit(a).unwrap();
        assert_eq!(c.admit(a).unwrap_err(), Refused::PerClient);
        let others: Vec<_> = (2..5)
            .map(|i| c.admit(format!("10.0.0.{i}").parse().unwrap()).unwrap())
            .collect();
        assert_eq!(c.connections(), 5);
        assert_eq!(
            c.admit("10.0.0.9".parse().unwrap()).unwrap_err(),
            Refused::Total
        );
        drop(p1);
        let p3 = c.admit(a).unwrap();
        drop((p2, p3, others));
        assert_eq!(c.connections(), 0);
        assert_eq!(c.tracked(), 0, "clients with full budgets are forgotten");
    }

    #[test]
    fn ipv6_clients_are_their_64_and_mapped_ipv4_is_ipv4() {
        let k = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2:aaaa::1"), k("2001:db8:1:2:bbbb::2"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:10.0.0.1"), k("10.0.0.1"));
        let c = Arc::new(Clients::new(limits()));
        let _a = c.admit("2001:db8::1".parse().unwrap()).unwrap();
        let _b = c.admit("2001:db8::2".parse().unwrap()).unwrap();
        assert_eq!(
            c.admit("2001:db8::3".parse().unwrap()).unwrap_err(),
            Refused::PerClient
        );
    }

    /// The reset budget is the client's, across its connections, and
    /// survives a reconnect until it has refilled.
    #[test]
    fn the_reset_budget_is_per_client_and_refills() {
        let c = Arc::new(Clients::new(limits()));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        let p1 = c.admit(ip).unwrap();
        let p2 = c.admit(ip).unwrap();
        assert!(p1.charge_reset(t0));
        assert!(p2.charge_reset(t0));
        assert!(p1.charge_reset(t0));
        assert!(!p2.charge_reset(t0), "three in a burst, then none");
        drop((p1, p2));
        assert_eq!(c.tracked(), 1, "a spent budget outlives the connections");
        let p = c.admit(ip).unwrap();
        assert!(!p.charge_reset(t0), "reconnecting does not refill it");
        assert!(p.charge_reset(t0 + Duration::from_millis(1100)));
        drop(p);
        c.sweep(t0 + Duration::from_secs(10));
        assert_eq!(c.tracked(), 0);
    }

    #[test]
    fn stalls_are_capped_per_client() {
        let c = Arc::new(Clients::new(limits()));
        let p = c.admit("10.0.0.1".parse().unwrap()).unwrap();
        let q = c.admit("10.0.0.1".parse().unwrap()).unwrap();
        assert!(p.charge_stall());
        assert!(q.charge_stall());
        assert!(!p.charge_stall());
        q.release_stall();
        assert!(p.charge_stall());
    }
}
