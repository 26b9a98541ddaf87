//! The delivery thread: a min-heap of datagrams by due time, drained by one
//! OS thread that sleeps on a condvar until just before the next due time and
//! then spins, so datagrams leave within microseconds of when they are due
//! (tokio's timer would add up to 1 ms per hop). Sends are non-blocking; a
//! full socket buffer counts as a drop.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::impair::DropReason;
use super::stats::DirCounters;

/// Below this much time left, the thread spins instead of sleeping: Linux'
/// default timer slack is 50 µs and a wake-up takes some more.
const SPIN: Duration = Duration::from_micros(250);
/// Bound on datagrams held in the heap of one path (both directions).
pub(crate) const MAX_PENDING_PACKETS: usize = 1 << 16;
/// Bound on bytes held in the heap of one path (both directions).
pub(crate) const MAX_PENDING_BYTES: usize = 64 << 20;

/// Where a datagram goes.
#[derive(Debug, Clone)]
pub(crate) enum Dest {
    /// Upstream, on the client's own connected socket to the target.
    Up(Arc<UdpSocket>),
    /// Downstream, from the listening socket to this client.
    Down(SocketAddr),
}

#[derive(Debug)]
struct Item {
    due: Instant,
    seq: u64,
    dest: Dest,
    data: Box<[u8]>,
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Item {
    // Reversed: BinaryHeap is a max-heap, we want the earliest due first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

#[derive(Debug, Default)]
struct Queue {
    heap: BinaryHeap<Item>,
    bytes: usize,
    seq: u64,
    stopped: bool,
}

/// The heap shared by the receive tasks (producers) and the delivery thread.
#[derive(Debug, Default)]
pub(crate) struct Scheduler {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Scheduler {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock cannot leave the heap inconsistent
        // (push/pop are atomic from our side), so poisoning is ignored.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Schedules `data` for `due`; `false` if the path's bound is reached.
    pub(crate) fn push(&self, due: Instant, dest: Dest, data: Box<[u8]>) -> bool {
        let mut q = self.lock();
        if q.stopped
            || q.heap.len() >= MAX_PENDING_PACKETS
            || q.bytes + data.len() > MAX_PENDING_BYTES
        {
            return false;
        }
        let earliest = q.heap.peek().is_none_or(|top| due < top.due);
        q.seq += 1;
        let seq = q.seq;
        q.bytes += data.len();
        q.heap.push(Item {
            due,
            seq,
            dest,
            data,
        });
        drop(q);
        if earliest {
            self.wake.notify_one();
        }
        true
    }

    /// Stops the delivery thread; what is still queued is discarded.
    pub(crate) fn stop(&self) {
        let mut q = self.lock();
        q.stopped = true;
        q.heap.clear();
        q.bytes = 0;
        drop(q);
        self.wake.notify_all();
    }

    /// Datagrams waiting now.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.lock().heap.len()
    }

    /// The delivery loop; returns once [`Scheduler::stop`] was called.
    pub(crate) fn run(&self, listen: &UdpSocket, up: &DirCounters, down: &DirCounters) {
        let mut due_now = Vec::with_capacity(64);
        loop {
            {
                let mut q = self.lock();
                loop {
                    if q.stopped {
                        return;
                    }
                    let Some(top) = q.heap.peek() else {
                        q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                        continue;
                    };
                    let now = Instant::now();
                    if top.due <= now {
                        break;
                    }
                    let left = top.due - now;
                    if left > SPIN {
                        q = self
                            .wake
                            .wait_timeout(q, left - SPIN)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    } else {
                        let due = top.due;
                        drop(q);
                        while Instant::now() < due {
                            std::hint::spin_loop();
                        }
                        q = self.lock();
                    }
                }
                let now = Instant::now();
                while q.heap.peek().is_some_and(|top| top.due <= now) {
                    if let Some(item) = q.heap.pop() {
                        q.bytes -= item.data.len();
                        due_now.push(item);
                    }
                }
            }
            for item in due_now.drain(..) {
                let (res, counters) = match &item.dest {
                    Dest::Up(sock) => (sock.send(&item.data), up),
                    Dest::Down(client) => (listen.send_to(&item.data, client), down),
                };
                match res {
                    Ok(_) => counters.forwarded(item.data.len()),
                    Err(e) => {
                        tracing::trace!(error = %portico_agent::error_chain(&e), "wan: send failed");
                        counters.dropped(DropReason::Send);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_in_due_order_and_on_time() {
        let sched = Arc::new(Scheduler::default());
        let listen = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let to = sink.local_addr().unwrap();
        let (up, down) = (
            Arc::new(DirCounters::default()),
            Arc::new(DirCounters::default()),
        );
        // Queue everything before the delivery thread starts, so that a
        // stall of this thread under load cannot change the order.
        let start = Instant::now();
        for (i, ms) in [30u64, 10, 20].into_iter().enumerate() {
            let data = vec![u8::try_from(i).unwrap(); 8].into_boxed_slice();
            assert!(sched.push(start + Duration::from_millis(ms), Dest::Down(to), data));
        }
        let t = {
            let (s, l, u, d) = (
                sched.clone(),
                listen.try_clone().unwrap(),
                up.clone(),
                down.clone(),
            );
            std::thread::spawn(move || s.run(&l, &u, &d))
        };
        let mut order = Vec::new();
        let mut buf = [0u8; 16];
        for _ in 0..3 {
            let n = sink.recv(&mut buf).unwrap();
            assert_eq!(n, 8);
            // Never early: the deterministic half of the accuracy promise.
            order.push((buf[0], start.elapsed()));
        }
        assert_eq!(order.iter().map(|o| o.0).collect::<Vec<_>>(), [1, 2, 0]);
        assert!(order[0].1 >= Duration::from_millis(10));
        assert!(order[2].1 >= Duration::from_millis(30));
        // The counter moves right after the send returns: poll for it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while down.snapshot().forwarded < 3 {
            assert!(Instant::now() < deadline, "{:?}", down.snapshot());
            std::thread::yield_now();
        }
        assert_eq!(down.snapshot().forwarded, 3);
        assert_eq!(sched.pending(), 0);
        sched.stop();
        t.join().unwrap();
        assert!(!sched.push(Instant::now(), Dest::Down(to), Box::new([0u8])));
    }
}
