//! Responses whose client stopped reading.
//!
//! A response body that has handed its client a chunk and is not asked
//! for the next one is *parked*: the client (its TCP window, its HTTP/2
//! stream window, its HTTP/3 stream credit) is not taking bytes. While it
//! is parked, its QUIC stream keeps up to one stream window of unread
//! data at the edge, and that counts against the tunnel's connection
//! window, which all the tunnel's other streams share. So:
//!
//! - a response parked for `detect` (1 s) counts as **stalled**, and is
//!   charged to its client (at most `max_stalled_per_client`) and to the
//!   edge (at most `max_stalled`); one over either budget is reset at once;
//! - a response stalled for `timeout` (30 s by default) is reset;
//! - the tunnel's connection window is twice what the edge-wide budget of
//!   stalled streams can hold (`max_stalled` × the stream window), so
//!   stalled streams can never take the window other streams need.
//!
//! Reset means: the QUIC stream is stopped with `CloseCode::Stalled` (its
//! buffered data and window are freed at once), the response ends with an
//! error, and the request is recorded as `ClientStalled`. A response that
//! is slow but moving (it is asked for chunks) is never parked for long,
//! and a response waiting on its backend is not parked at all.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use portico_proto::CloseCode;
use portico_proto::ErrorCode;
use quinn::RecvStream;
use tokio_util::sync::CancellationToken;

use crate::clients::ConnPermit;
use crate::request::relay::Inflight;
use crate::request::{Fault, Record};

/// How long a response is parked before it counts as stalled.
pub(crate) const DETECT: Duration = Duration::from_secs(1);

/// The stall settings, from the edge's config.
#[derive(Debug, Clone)]
pub(crate) struct StallPolicy {
    /// How long a response may be parked before it is reset.
    pub(crate) timeout: Duration,
    /// How long a response is parked before it counts as stalled.
    pub(crate) detect: Duration,
    /// Stalled responses the whole edge holds at once.
    pub(crate) max_stalled: u32,
}

/// The edge-wide count of stalled responses.
#[derive(Debug)]
pub(crate) struct StallBudget {
    pub(crate) policy: StallPolicy,
    stalled: AtomicU32,
}

impl StallBudget {
    pub(crate) fn new(policy: StallPolicy) -> StallBudget {
        StallBudget {
            policy,
            stalled: AtomicU32::new(0),
        }
    }

    fn charge(&self) -> bool {
        let max = self.policy.max_stalled;
        self.stalled
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        let _ = self
            .stalled
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

/// Microseconds since the first call, plus one: 0 stays free to mean
/// "not set" in the atomics below.
pub(crate) fn now_us() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_micros()).unwrap_or(u64::MAX - 1) + 1
}

/// What a stall check did to one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Moving, waiting on its backend, or stalled within its budget.
    Keep,
    /// Reset: parked for the whole stall timeout.
    ResetTimeout,
    /// Reset: newly stalled with its client's or the edge's budget spent.
    ResetOverBudget,
}

impl Verdict {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Verdict::Keep => "keep",
            Verdict::ResetTimeout => "timeout",
            Verdict::ResetOverBudget => "over_budget",
        }
    }
}

/// What a streaming response holds: its QUIC stream, the guards that count
/// it on its tunnel, and its [`Record`]. Behind a lock in [`StreamSlot`] so
/// that a stall reset can end all of it at once, even while the body is not
/// being polled (a zero-window HTTP/2 stream keeps its body alive until the
/// client grants credit again, or leaves).
pub(crate) struct Response {
    pub(crate) recv: RecvStream,
    pub(crate) inflight: Inflight,
    pub(crate) record: Record,
}

/// One response body's state, where both the body and the stall check can
/// reach it.
pub(crate) struct StreamSlot {
    state: Mutex<Option<Response>>,
    /// When the body last handed out a chunk and was not asked again
    /// ([`now_us`]), or 0.
    parked_since: AtomicU64,
    /// Counted in its client's and the edge's stall budgets.
    charged: AtomicBool,
    /// Reset for stalling.
    stalled: AtomicBool,
    /// Ends the HTTP/3 request that streams this body (HTTP/1.1 closes
    /// its connection instead, and HTTP/2 resets the stream when hyper
    /// next polls the body).
    abort: Option<CancellationToken>,
}

impl std::fmt::Debug for StreamSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSlot")
            .field("parked_since", &self.parked_since)
            .field("stalled", &self.stalled)
            .finish_non_exhaustive()
    }
}

impl StreamSlot {
    pub(crate) fn new(response: Response, abort: Option<CancellationToken>) -> StreamSlot {
        StreamSlot {
            state: Mutex::new(Some(response)),
            parked_since: AtomicU64::new(0),
            charged: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            abort,
        }
    }

    /// The response, for the body; `None` once it ended or was reset.
    pub(crate) fn state(&self) -> MutexGuard<'_, Option<Response>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The body was asked for more: not parked, and no longer stalled.
    pub(crate) fn asked(&self, budget: &StallBudget, client: &ConnPermit) {
        if self.parked_since.load(Ordering::Relaxed) != 0 {
            self.parked_since.store(0, Ordering::Relaxed);
        }
        self.uncharge(budget, client);
    }

    /// The body handed out a chunk: parked until asked again.
    pub(crate) fn handed_out(&self, now: u64) {
        self.parked_since.store(now, Ordering::Relaxed);
    }

    /// Judges the slot at `now`, and resets it when the verdict says so.
    pub(crate) fn check(&self, now: u64, budget: &StallBudget, client: &ConnPermit) -> Verdict {
        let since = self.parked_since.load(Ordering::Relaxed);
        if since == 0 || self.stalled.load(Ordering::Relaxed) {
            return Verdict::Keep;
        }
        let parked = Duration::from_micros(now.saturating_sub(since));
        let verdict = if parked >= budget.policy.timeout {
            Verdict::ResetTimeout
        } else if parked < budget.policy.detect || self.charged.load(Ordering::Relaxed) {
            Verdict::Keep
        } else if !client.charge_stall() {
            Verdict::ResetOverBudget
        } else if !budget.charge() {
            client.release_stall();
            Verdict::ResetOverBudget
        } else {
            self.charged.store(true, Ordering::Relaxed);
            Verdict::Keep
        };
        if verdict != Verdict::Keep {
            self.reset(budget, client);
        }
        verdict
    }

    fn reset(&self, budget: &StallBudget, client: &ConnPermit) {
        self.stalled.store(true, Ordering::Relaxed);
        self.uncharge(budget, client);
        let response = self.state().take();
        if let Some(Response {
            mut recv,
            inflight,
            mut record,
        }) = response
        {
            let _ = recv.stop(CloseCode::Stalled.to_wire().into());
            record.failed(ErrorCode::ClientStalled, Fault::Client);
            // Recorded now, and its tunnel stream released.
            drop((record, inflight));
        }
        if let Some(abort) = &self.abort {
            abort.cancel();
        }
    }

    /// Gives back what this response was charged, if it was.
    pub(crate) fn uncharge(&self, budget: &StallBudget, client: &ConnPermit) {
        if self.charged.load(Ordering::Relaxed) && self.charged.swap(false, Ordering::Relaxed) {
            budget.release();
            client.release_stall();
        }
    }
}
