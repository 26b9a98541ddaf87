//! One user connection (HTTP/1.1 or HTTP/2 over TLS, or HTTP/3 over QUIC)
//! as the edge keeps track of it: its place under the client caps, its
//! requests in flight, the header-read and idle deadlines, the response
//! streams the stall check watches, and the token that closes it.
//!
//! The connection's own task (`listener::drive`, the HTTP/3 accept loop)
//! asks [`ClientConn::tick`] what expired and when to look again: every
//! `detect` interval while responses stream, else at the next deadline.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use tokio_util::sync::CancellationToken;

use crate::clients::ConnPermit;
use crate::metrics::Metrics;
use crate::stall::{now_us, StallBudget, StreamSlot, Verdict};

/// The protocol of a user connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    H1,
    H2,
    H3,
}

/// The deadlines of user connections, from the edge's config.
#[derive(Debug, Clone)]
pub(crate) struct ConnTimeouts {
    /// From the first byte of a request head (or, on HTTP/1.1, from the
    /// connection's start) to the whole head.
    pub(crate) header_read: Duration,
    /// HTTP/1.1: how long a keep-alive connection may wait for its next
    /// request.
    pub(crate) keepalive_idle: Duration,
    /// HTTP/2: how long a connection with no open stream is kept.
    pub(crate) h2_idle: Duration,
}

/// What ended a connection, besides its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// A request head did not arrive whole in time: closed at once.
    HeaderTimeout,
    /// No request for the idle time: closed gracefully.
    Idle,
}

impl Expired {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Expired::HeaderTimeout => "header_timeout",
            Expired::Idle => "idle",
        }
    }
}

/// One user connection.
#[derive(Debug)]
pub(crate) struct ClientConn {
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) proto: Proto,
    pub(crate) permit: ConnPermit,
    /// Cancelled to close the connection at once (its client broke a
    /// limit, or an HTTP/1.1 response stalled).
    pub(crate) kill: CancellationToken,
    started: u64,
    in_flight: AtomicU32,
    /// Requests started on this connection.
    served: AtomicU64,
    /// When the last request ended ([`now_us`]), or 0.
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived, or 0.
    head_since: AtomicU64,
    slots: Mutex<Slots>,
    /// Set to wake the connection's task when work starts, so its next
    /// look comes within `detect`, not at the idle deadline
    /// ([`ClientConn::poll_woken`]). A flag and a waker rather than a
    /// `Notify`: the task polls it each time its connection is polled,
    /// several times a request, and a `Notified` takes a lock on each poll.
    woken: AtomicBool,
    waker: AtomicWaker,
    /// The task already looks every `detect` (requests were in flight at
    /// its last look): a new request need not wake it. Without this, every
    /// request of a keep-alive connection would wake its task once.
    watching: AtomicBool,
}

#[derive(Debug, Default)]
struct Slots {
    slots: Vec<Option<Arc<StreamSlot>>>,
    free: Vec<usize>,
    live: usize,
}

impl ClientConn {
    pub(crate) fn new(addr: std::net::SocketAddr, proto: Proto, permit: ConnPermit) -> ClientConn {
        ClientConn {
            addr,
            proto,
            permit,
            kill: CancellationToken::new(),
            started: now_us(),
            in_flight: AtomicU32::new(0),
            served: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            slots: Mutex::new(Slots::default()),
            woken: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            watching: AtomicBool::new(false),
        }
    }

    /// A request reached the request path; the guard ends it.
    pub(crate) fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.head_since.store(0, Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
        // SeqCst with `tick`'s store and load of the same two: either the
        // task sees this request in flight, or this sees it not watching.
        if self.in_flight.fetch_add(1, Ordering::SeqCst) == 0
            && !self.watching.load(Ordering::SeqCst)
        {
            self.woken.store(true, Ordering::Release);
            self.waker.wake();
        }
        RequestGuard {
            conn: Arc::clone(self),
        }
    }

    /// Ready once after a request started on a connection whose task was
    /// not watching; the task then looks at once.
    pub(crate) fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.woken.load(Ordering::Acquire) {
            self.woken.store(false, Ordering::Relaxed);
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Bytes arrived from the client: on HTTP/1.1 with no request in
    /// flight, they start a request head and its deadline. (On HTTP/2,
    /// bytes between requests are frames of the connection itself, PING
    /// answers and settings, so there the idle deadline applies instead.)
    fn read_some(&self) {
        if self.proto == Proto::H1
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            self.head_since.store(now_us(), Ordering::Relaxed);
        }
    }

    /// Watches a response stream until [`ClientConn::unwatch`].
    pub(crate) fn watch(&self, slot: Arc<StreamSlot>) -> usize {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.live += 1;
        match s.free.pop() {
            Some(i) => {
                s.slots[i] = Some(slot);
                i
            }
            None => {
                s.slots.push(Some(slot));
                s.slots.len() - 1
            }
        }
    }

    /// Stops watching `slot` (if `key` still holds it: a stall reset
    /// unwatches it first, and the key may have been reused since).
    pub(crate) fn unwatch(&self, key: usize, slot: &Arc<StreamSlot>) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = s.slots.get_mut(key) {
            if held.as_ref().is_some_and(|h| Arc::ptr_eq(h, slot)) {
                *held = None;
                s.live -= 1;
                s.free.push(key);
            }
        }
    }

    /// The client cancelled a request before its response: charged to its
    /// reset budget. Once that is spent, the connection is closed.
    pub(crate) fn cancelled_early(&self, metrics: &Metrics) {
        if !self.permit.charge_reset(Instant::now()) && !self.kill.is_cancelled() {
            tracing::warn!(client = %self.addr, "closing the connection: too many requests cancelled before their response");
            metrics.conn_closes.with_label_values(&["resets"]).inc();
            self.kill.cancel();
        }
    }

    /// Checks the deadlines and the streams at `now`. `Err` when a
    /// deadline expired; else when to look again.
    pub(crate) fn tick(
        &self,
        now: u64,
        timeouts: &ConnTimeouts,
        budget: &StallBudget,
        metrics: &Metrics,
    ) -> Result<u64, Expired> {
        let detect = as_us(budget.policy.detect);
        self.watching.store(false, Ordering::SeqCst);
        if self.in_flight.load(Ordering::SeqCst) > 0 || self.has_streams() {
            self.watching.store(true, Ordering::Relaxed);
            self.check_streams(now, budget, metrics);
            return Ok(now + detect);
        }
        let header_read = as_us(timeouts.header_read);
        let head = self.head_since.load(Ordering::Relaxed);
        let never_served = self.served.load(Ordering::Relaxed) == 0;
        // A head under way, or (HTTP/1.1) a connection that never sent
        // one: the header deadline.
        let head_start = if head != 0 {
            Some(head)
        } else if never_served && self.proto == Proto::H1 {
            Some(self.started)
        } else {
            None
        };
        if let Some(start) = head_start {
            let deadline = start + header_read;
            return if now >= deadline {
                Err(Expired::HeaderTimeout)
            } else {
                Ok(deadline)
            };
        }
        let idle = match self.proto {
            Proto::H1 => timeouts.keepalive_idle,
            Proto::H2 => timeouts.h2_idle,
            // QUIC's own idle timeout closes HTTP/3 connections.
            Proto::H3 => return Ok(now + header_read),
        };
        let since = match self.idle_since.load(Ordering::Relaxed) {
            0 => self.started,
            t => t,
        };
        let deadline = since + as_us(idle);
        if now >= deadline {
            return Err(Expired::Idle);
        }
        // Look again by then, or sooner: a head may start meanwhile.
        Ok(deadline.min(now + header_read))
    }

    fn has_streams(&self) -> bool {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).live > 0
    }

    fn check_streams(&self, now: u64, budget: &StallBudget, metrics: &Metrics) {
        let slots: Vec<(usize, Arc<StreamSlot>)> = {
            let s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            if s.live == 0 {
                return;
            }
            s.slots
                .iter()
                .enumerate()
                .filter_map(|(i, slot)| Some((i, Arc::clone(slot.as_ref()?))))
                .collect()
        };
        for (key, slot) in slots {
            let verdict = slot.check(now, budget, &self.permit);
            if verdict == Verdict::Keep {
                continue;
            }
            // Done with: an HTTP/2 body may linger until its client grants
            // credit, but nothing is left to watch.
            self.unwatch(key, &slot);
            tracing::info!(client = %self.addr, reason = verdict.label(), "resetting a response its client stopped reading");
            metrics.stalls.with_label_values(&[verdict.label()]).inc();
            if self.proto == Proto::H1 {
                // The connection is stuck writing that response.
                self.kill.cancel();
            }
        }
    }
}

fn as_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 4)
}

/// The instant `t` ([`now_us`]) as a tokio deadline.
pub(crate) fn deadline_at(t: u64) -> tokio::time::Instant {
    let now = now_us();
    tokio::time::Instant::now() + Duration::from_micros(t.saturating_sub(now))
}

/// One request in flight on a connection.
#[derive(Debug)]
pub(crate) struct RequestGuard {
    pub(crate) conn: Arc<ClientConn>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.conn.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.conn.idle_since.store(now_us(), Ordering::Relaxed);
        }
    }
}

/// A connection's IO that tells its [`ClientConn`] when bytes arrive.
pub(crate) struct WatchedIo<I> {
    inner: I,
    conn: Arc<ClientConn>,
}

impl<I> WatchedIo<I> {
    pub(crate) fn new(inner: I, conn: Arc<ClientConn>) -> Self {
        WatchedIo { inner, conn }
    }
}

impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for WatchedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        // A ready read brought bytes (or the end, which ends the
        // connection anyway).
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            this.conn.read_some();
        }
        r
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for WatchedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}
