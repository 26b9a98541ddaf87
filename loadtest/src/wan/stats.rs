//! Counters of one path, per direction: lock-free atomics while running,
//! a plain snapshot ([`PathStats`]) for callers.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::impair::DropReason;

/// Datagrams dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DropCounts {
    /// Dropped while the path was blackholed.
    pub blackhole: u64,
    /// Larger than the path MTU.
    pub mtu: u64,
    /// Random loss.
    pub loss: u64,
    /// Tail drop at the bandwidth-capped queue.
    pub queue: u64,
    /// The relay's own in-flight bound (packets or bytes) was reached.
    pub overflow: u64,
    /// A new client arrived while the NAT table was full.
    pub nat_full: u64,
    /// The kernel refused the send (buffer full, unreachable peer).
    pub send: u64,
}

impl DropCounts {
    /// All drops together.
    pub fn total(&self) -> u64 {
        self.blackhole
            + self.mtu
            + self.loss
            + self.queue
            + self.overflow
            + self.nat_full
            + self.send
    }
}

/// One direction's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DirStats {
    /// Datagrams received by the relay.
    pub received: u64,
    /// Datagrams sent on (duplicates included).
    pub forwarded: u64,
    /// Bytes sent on (duplicates included).
    pub forwarded_bytes: u64,
    /// Datagrams dropped, by reason.
    pub dropped: DropCounts,
    /// Extra copies scheduled.
    pub duplicated: u64,
    /// Datagrams held back so that later ones overtook them.
    pub reordered: u64,
}

/// A snapshot of a path's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PathStats {
    /// Client → target.
    pub up: DirStats,
    /// Target → client.
    pub down: DirStats,
    /// Client mappings (NAT entries) alive now.
    pub clients: u64,
    /// Client mappings created so far.
    pub clients_created: u64,
}

#[derive(Debug, Default)]
pub(crate) struct DirCounters {
    received: AtomicU64,
    forwarded: AtomicU64,
    forwarded_bytes: AtomicU64,
    blackhole: AtomicU64,
    mtu: AtomicU64,
    loss: AtomicU64,
    queue: AtomicU64,
    overflow: AtomicU64,
    nat_full: AtomicU64,
    send: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
}

impl DirCounters {
    pub(crate) fn received(&self) {
        self.received.fetch_add(1, Relaxed);
    }

    pub(crate) fn forwarded(&self, bytes: usize) {
        self.forwarded.fetch_add(1, Relaxed);
        self.forwarded_bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub(crate) fn duplicated(&self) {
        self.duplicated.fetch_add(1, Relaxed);
    }

    pub(crate) fn reordered(&self) {
        self.reordered.fetch_add(1, Relaxed);
    }

    pub(crate) fn dropped(&self, reason: DropReason) {
        let c = match reason {
            DropReason::Blackhole => &self.blackhole,
            DropReason::Mtu => &self.mtu,
            DropReason::Loss => &self.loss,
            DropReason::Queue => &self.queue,
            DropReason::Overflow => &self.overflow,
            DropReason::NatFull => &self.nat_full,
            DropReason::Send => &self.send,
        };
        c.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> DirStats {
        DirStats {
            received: self.received.load(Relaxed),
            forwarded: self.forwarded.load(Relaxed),
            forwarded_bytes: self.forwarded_bytes.load(Relaxed),
            dropped: DropCounts {
                blackhole: self.blackhole.load(Relaxed),
                mtu: self.mtu.load(Relaxed),
                loss: self.loss.load(Relaxed),
                queue: self.queue.load(Relaxed),
                overflow: self.overflow.load(Relaxed),
                nat_full: self.nat_full.load(Relaxed),
                send: self.send.load(Relaxed),
            },
            duplicated: self.duplicated.load(Relaxed),
            reordered: self.reordered.load(Relaxed),
        }
    }
}
