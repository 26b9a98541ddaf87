//! The tunnels attached to this edge, by connector group, and the choice of
//! a tunnel for each request (power of two choices over outstanding streams,
//! among the healthy tunnels first); and the count of tunnels per connector
//! that the cap at `Hello` time checks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use portico_proto::api::TunnelReport;
use portico_proto::{CloseCode, ConnectorId, GroupId, TunnelId};
use tokio::sync::Notify;

/// One attached tunnel.
#[derive(Debug)]
pub(crate) struct Tunnel {
    pub(crate) id: TunnelId,
    pub(crate) connector: ConnectorId,
    pub(crate) group: GroupId,
    pub(crate) agent_version: String,
    pub(crate) remote: SocketAddr,
    pub(crate) conn: quinn::Connection,
    /// The shard whose runtime drives the tunnel's QUIC connection.
    pub(crate) shard: usize,
    /// The capability bits both ends support (`Welcome`).
    pub(crate) capabilities: u64,
    outstanding: AtomicUsize,
    draining: AtomicBool,
    /// The connector left a ping unanswered past its deadline
    /// (`liveness`): picked only when no healthy tunnel is left.
    suspect: AtomicBool,
    /// The code this edge closed the tunnel with, if it did.
    closed_with: std::sync::OnceLock<CloseCode>,
}

impl Tunnel {
    pub(crate) fn new(
        id: TunnelId,
        connector: ConnectorId,
        group: GroupId,
        agent_version: String,
        conn: quinn::Connection,
        capabilities: u64,
    ) -> Self {
        Tunnel {
            id,
            connector,
            group,
            agent_version,
            remote: conn.remote_address(),
            conn,
            shard: crate::shard::current(),
            capabilities,
            outstanding: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            suspect: AtomicBool::new(false),
            closed_with: std::sync::OnceLock::new(),
        }
    }

    /// The connector said `Drain`: no new streams on this tunnel.
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the tunnel suspect (or healthy again); returns whether that
    /// changed anything.
    pub(crate) fn set_suspect(&self, suspect: bool) -> bool {
        self.suspect.swap(suspect, Ordering::Relaxed) != suspect
    }

    pub(crate) fn is_suspect(&self) -> bool {
        self.suspect.load(Ordering::Relaxed)
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Counts one stream until the guard drops.
    pub(crate) fn stream_guard(self: &Arc<Self>) -> StreamGuard {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            tunnel: Arc::clone(self),
        }
    }

    pub(crate) fn close(&self, code: CloseCode, reason: &str) {
        let _ = self.closed_with.set(code);
        self.conn.close(code.to_wire().into(), reason.as_bytes());
    }

    /// The code this edge closed the tunnel with, if it did so through
    /// [`Tunnel::close`].
    pub(crate) fn closed_with(&self) -> Option<CloseCode> {
        self.closed_with.get().copied()
    }
}

/// One outstanding stream on a tunnel.
#[derive(Debug)]
pub(crate) struct StreamGuard {
    tunnel: Arc<Tunnel>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.tunnel.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

type ByGroup = HashMap<GroupId, Vec<Arc<Tunnel>>>;

/// Every tunnel on this edge. Lookups read a lock-free snapshot; attach and
/// detach (rare) rebuild it under a mutex.
#[derive(Debug, Default)]
pub(crate) struct Tunnels {
    all: Mutex<HashMap<TunnelId, Arc<Tunnel>>>,
    by_group: ArcSwap<ByGroup>,
    next_id: AtomicU64,
    /// Notified after every attach and detach (presence reports).
    pub(crate) changed: Notify,
    /// Tunnels per connector, attached or still in their handshake.
    per_connector: Arc<Mutex<HashMap<ConnectorId, usize>>>,
    /// The edge's shards (`shard.rs`); with more than one, a request
    /// prefers a tunnel of its own shard.
    shards: usize,
}

/// A connector already holds as many tunnels to this edge as it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AtCap {
    pub(crate) cap: usize,
}

/// One of a connector's tunnels, counted until dropped.
#[derive(Debug)]
pub(crate) struct TunnelSlot {
    per_connector: Arc<Mutex<HashMap<ConnectorId, usize>>>,
    connector: ConnectorId,
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        let mut map = self.per_connector.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.connector) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.connector);
            }
        }
    }
}

impl Tunnels {
    pub(crate) fn new(shards: usize) -> Self {
        Tunnels {
            shards,
            ..Tunnels::default()
        }
    }

    /// The edge's shards.
    pub(crate) fn shards(&self) -> usize {
        self.shards
    }

    pub(crate) fn next_id(&self) -> TunnelId {
        TunnelId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Counts one more tunnel of `connector`, unless it holds `cap`
    /// already. Taken before `Welcome`, so that tunnels still in their
    /// handshake count too.
    pub(crate) fn reserve(&self, connector: &ConnectorId, cap: usize) -> Result<TunnelSlot, AtCap> {
        let mut map = self.per_connector.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(connector.clone()).or_insert(0);
        if *n >= cap {
            if *n == 0 {
                map.remove(connector);
            }
            return Err(AtCap { cap });
        }
        *n += 1;
        Ok(TunnelSlot {
            per_connector: Arc::clone(&self.per_connector),
            connector: connector.clone(),
        })
    }

    pub(crate) fn attach(&self, tunnel: Arc<Tunnel>) {
        let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        all.insert(tunnel.id, tunnel);
        self.rebuild(&all);
    }

    pub(crate) fn detach(&self, id: TunnelId) {
        let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        if all.remove(&id).is_some() {
            self.rebuild(&all);
        }
    }

    fn rebuild(&self, all: &HashMap<TunnelId, Arc<Tunnel>>) {
        let mut by_group = ByGroup::new();
        for t in all.values() {
            by_group
                .entry(t.group.clone())
                .or_default()
                .push(Arc::clone(t));
        }
        for list in by_group.values_mut() {
            list.sort_by_key(|t| t.id);
        }
        self.by_group.store(Arc::new(by_group));
        self.changed.notify_one();
    }

    pub(crate) fn count(&self) -> usize {
        self.all.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub(crate) fn snapshot(&self) -> Vec<Arc<Tunnel>> {
        let all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = all.values().cloned().collect();
        v.sort_by_key(|t| t.id);
        v
    }

    /// A tunnel of `group` that `eligible` accepts, by power of two
    /// choices, skipping draining and closed ones, and suspect ones while
    /// any other is left (when every tunnel is suspect, one of them is
    /// better than failing the request). With shards, a healthy tunnel
    /// driven by the caller's own shard comes first: the request then
    /// never leaves its thread.
    pub(crate) fn pick(
        &self,
        group: &GroupId,
        eligible: impl Fn(&Tunnel) -> bool,
    ) -> Option<Arc<Tunnel>> {
        let by_group = self.by_group.load();
        let list = by_group.get(group)?;
        let usable = |t: &Arc<Tunnel>| {
            (!t.is_draining() && t.conn.close_reason().is_none() && eligible(t))
                .then(|| t.outstanding())
        };
        if self.shards > 1 {
            let here = crate::shard::current();
            let local = p2c(list, |t| {
                (t.shard == here && !t.is_suspect())
                    .then(|| usable(t))
                    .flatten()
            });
            if let Some(t) = local {
                return Some(Arc::clone(t));
            }
        }
        p2c_healthy_first(list, usable, |t| !t.is_suspect()).cloned()
    }

    /// Closes every tunnel of these connectors with `CloseCode::Revoked`.
    pub(crate) fn close_revoked(&self, is_revoked: impl Fn(&ConnectorId) -> bool) -> usize {
        let mut n = 0;
        for t in self.snapshot() {
            if is_revoked(&t.connector) {
                tracing::info!(tunnel.id = %t.id, connector = %t.connector, "connector revoked, closing its tunnel");
                t.close(CloseCode::Revoked, "connector revoked");
                n += 1;
            }
        }
        n
    }

    /// The presence report: one entry per connector.
    pub(crate) fn report(&self) -> Vec<TunnelReport> {
        let mut by_connector: HashMap<ConnectorId, TunnelReport> = HashMap::new();
        for t in self.snapshot() {
            by_connector
                .entry(t.connector.clone())
                .and_modify(|r| r.tunnels += 1)
                .or_insert_with(|| TunnelReport {
                    connector_id: t.connector.clone(),
                    group: t.group.clone(),
                    agent_version: t.agent_version.clone(),
                    remote_addr: t.remote.to_string(),
                    tunnels: 1,
                });
        }
        let mut v: Vec<_> = by_connector.into_values().collect();
        v.sort_by(|a, b| a.connector_id.cmp(&b.connector_id));
        v
    }
}

/// [`p2c`] among the eligible items that are `healthy`, or among all
/// eligible ones when none is.
pub(crate) fn p2c_healthy_first<T>(
    items: &[T],
    load: impl Fn(&T) -> Option<usize>,
    healthy: impl Fn(&T) -> bool,
) -> Option<&T> {
    p2c(items, |t| if healthy(t) { load(t) } else { None }).or_else(|| p2c(items, &load))
}

/// Power of two choices: draws two distinct eligible items at random and
/// returns the less loaded. `load` returns `None` for an ineligible item.
pub(crate) fn p2c<T>(items: &[T], load: impl Fn(&T) -> Option<usize>) -> Option<&T> {
    // Two distinct eligible items, uniformly at random, in one pass and
    // without allocating: reservoir sampling with a reservoir of two.
    let mut pair: [Option<(usize, usize)>; 2] = [None, None];
    let mut seen = 0usize;
    for (i, t) in items.iter().enumerate() {
        let Some(l) = load(t) else { continue };
        if seen < 2 {
            pair[seen] = Some((i, l));
        } else {
            let j = fastrand::usize(..=seen);
            if j < 2 {
                pair[j] = Some((i, l));
            }
        }
        seen += 1;
    }
    let chosen = match pair {
        [None, _] => return None,
        [Some(a), None] => a,
        [Some(a), Some(b)] if a.1 == b.1 => {
            if fastrand::bool() {
                a
            } else {
                b
            }
        }
        [Some(a), Some(b)] => {
            if b.1 < a.1 {
                b
            } else {
                a
            }
        }
    };
    items.get(chosen.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p2c_skips_ineligible_and_prefers_the_less_loaded() {
        // (load, eligible)
        let items = [(5usize, true), (0, false), (1, true)];
        for _ in 0..200 {
            // Only two eligible items: P2C always compares both, so the less
            // loaded one wins every time.
            let got = p2c(&items, |&(l, ok)| ok.then_some(l)).unwrap();
            assert_eq!(*got, (1, true));
        }
        assert!(p2c(&[(0usize, false)], |&(l, ok)| ok.then_some(l)).is_none());
        assert!(p2c::<(usize, bool)>(&[], |&(l, ok)| ok.then_some(l)).is_none());
        assert_eq!(
            p2c(&[(9usize, true)], |&(l, ok)| ok.then_some(l)),
            Some(&(9, true))
        );
    }

    /// Equal loads: every tunnel gets its share (the pair is uniform and a
    /// tie is broken at random).
    #[test]
    fn p2c_spreads_equal_loads_evenly() {
        let items = [0usize; 4];
        let mut seen = [0u32; 4];
        for _ in 0..4000 {
            let got = p2c(&items, |&l| Some(l)).unwrap();
            let i = (got as *const usize as usize - items.as_ptr() as usize) / size_of::<usize>();
            seen[i] += 1;
        }
        // Expected 1,000 each; 700 is more than ten standard deviations off.
        assert!(seen.iter().all(|&n| n > 700), "uneven spread: {seen:?}");
    }

    /// Suspect tunnels are left out while a healthy one is eligible, even a
    /// busier one; when every eligible tunnel is suspect they are used.
    #[test]
    fn suspect_tunnels_are_picked_only_when_no_healthy_one_is_left() {
        // (load, eligible, healthy)
        let items = [(9usize, true, true), (0, true, false), (0, false, true)];
        let pick = |items: &[(usize, bool, bool)]| {
            p2c_healthy_first(items, |&(l, ok, _)| ok.then_some(l), |&(_, _, h)| h).copied()
        };
        for _ in 0..100 {
            assert_eq!(pick(&items), Some((9, true, true)));
        }
        let all_suspect = [(3usize, true, false), (1, true, false), (0, false, true)];
        for _ in 0..100 {
            assert_eq!(pick(&all_suspect), Some((1, true, false)));
        }
        assert_eq!(pick(&[(0, false, true), (0, false, false)]), None);
    }

    #[test]
    fn a_connector_holds_at_most_its_cap_of_tunnels() {
        let tunnels = Tunnels::default();
        let a = ConnectorId::new("c-a").unwrap();
        let b = ConnectorId::new("c-b").unwrap();
        let first = tunnels.reserve(&a, 2).unwrap();
        let second = tunnels.reserve(&a, 2).unwrap();
        assert_eq!(tunnels.reserve(&a, 2).unwrap_err(), AtCap { cap: 2 });
        // Another connector has a count of its own.
        let other = tunnels.reserve(&b, 2).unwrap();
        drop(first);
        let third = tunnels.reserve(&a, 2).unwrap();
        drop((second, third, other));
        assert!(
            tunnels.per_connector.lock().unwrap().is_empty(),
            "released counts leave nothing behind"
        );
        assert_eq!(tunnels.reserve(&a, 0).unwrap_err(), AtCap { cap: 0 });
        assert!(tunnels.per_connector.lock().unwrap().is_empty());
    }

    #[test]
    fn p2c_never_picks_the_most_loaded_of_three() {
        let items = [3usize, 1, 7];
        let mut seen = [0u32; 3];
        for _ in 0..600 {
            let got = p2c(&items, |&l| Some(l)).unwrap();
            let i = items.iter().position(|x| x == got).unwrap();
            seen[i] += 1;
        }
        assert_eq!(seen[2], 0, "the most loaded tunnel must never win a pair");
        assert!(
            seen[1] > seen[0],
            "the least loaded wins most often: {seen:?}"
        );
        assert!(
            seen[0] > 0,
            "the middle one wins against the most loaded: {seen:?}"
        );
    }
}
