//! Sign-out and one-time handoff codes across every edge.
//!
//! A session cookie opens at any edge (the router hands every edge the
//! same keys), so signing out at one edge must reach the others:
//!
//! - `/.portico/sign_out` puts the session's id in this edge's
//!   [`SignedOutSet`] at once, and sends it to the router
//!   (`POST /v1/edge/sign-outs`, through [`RouterLink`] and the control
//!   plane's loop, retried until the router has it). The router stores it
//!   and bumps the config version, so every edge's config watch brings it
//!   back within about a second (`EdgeConfig.signed_out`, a delta since
//!   the version the edge had), and each edge adds it to its set.
//! - A handoff code is asked of the router before it becomes a session
//!   (`POST /v1/edge/handoffs`): a code copied to another edge within its
//!   minute is refused there too. When the router does not answer in
//!   time the edge's own record decides (sign-in keeps working while the
//!   control plane is away), and says so in its log.
//!
//! Every entry is forgotten when the session (or code) would have ended
//! anyway, so the set holds only what still matters.

use std::collections::HashMap;
use std::sync::RwLock;

use portico_proto::api::{HandoffUse, SignedOut, MAX_SIGNED_OUT};
use tokio::sync::{mpsc, oneshot};

/// The most signed-out sessions an edge holds: the router's limit, and as
/// many again signed out here and not yet taken by the router.
const MAX_HELD: usize = 2 * MAX_SIGNED_OUT;

/// The sessions signed out at any edge, until they would have ended.
#[derive(Default)]
pub(crate) struct SignedOutSet {
    until: RwLock<HashMap<String, u64>>,
}

impl SignedOutSet {
    /// Whether session `sid` was signed out (and would still be live at
    /// `now`).
    pub(crate) fn contains(&self, sid: &str, now: u64) -> bool {
        let until = self.until.read().unwrap_or_else(|p| p.into_inner());
        until.get(sid).is_some_and(|u| *u > now)
    }

    /// Adds `sessions`, forgetting those over at `now`. Returns how many
    /// were new.
    pub(crate) fn add<'a>(
        &self,
        sessions: impl IntoIterator<Item = &'a SignedOut>,
        now: u64,
    ) -> usize {
        let mut until = self.until.write().unwrap_or_else(|p| p.into_inner());
        let mut new = 0;
        for s in sessions {
            if s.until <= now {
                continue;
            }
            if until.len() >= MAX_HELD {
                until.retain(|_, u| *u > now);
                if until.len() >= MAX_HELD {
                    tracing::error!(
                        max = MAX_HELD,
                        "too many signed-out sessions to hold; a session signed out elsewhere may still open here until it ends"
                    );
                    return new;
                }
            }
            let end = until.entry(s.sid.clone()).or_insert_with(|| {
                new += 1;
                0
            });
            *end = (*end).max(s.until);
        }
        new
    }

    /// Every entry live at `now` (what a saved config snapshot keeps).
    pub(crate) fn live(&self, now: u64) -> Vec<SignedOut> {
        let until = self.until.read().unwrap_or_else(|p| p.into_inner());
        let mut live: Vec<SignedOut> = until
            .iter()
            .filter(|(_, u)| **u > now)
            .map(|(sid, u)| SignedOut {
                sid: sid.clone(),
                until: *u,
            })
            .collect();
        live.sort_by(|a, b| a.sid.cmp(&b.sid));
        live
    }
}

/// The request path's way to the router, served by the control plane's
/// loops (`control::sign_out_loop`, `control::handoff_loop`).
pub(crate) struct RouterLink {
    /// Sessions signed out here: for every other edge.
    pub sign_outs: mpsc::Sender<SignedOut>,
    /// Handoff codes about to become sessions.
    pub handoffs: mpsc::Sender<HandoffCheck>,
}

/// Was this handoff code used before, at any edge?
pub(crate) struct HandoffCheck {
    pub used: HandoffUse,
    pub answer: oneshot::Sender<HandoffAnswer>,
}

/// The router's word on a handoff code.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HandoffAnswer {
    /// Its first use anywhere.
    First,
    /// Used before (409).
    Used,
    /// The router could not say (why, for the log).
    Unknown(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(sid: &str, until: u64) -> SignedOut {
        SignedOut {
            sid: sid.into(),
            until,
        }
    }

    #[test]
    fn a_signed_out_session_is_held_until_it_would_have_ended() {
        let set = SignedOutSet::default();
        assert_eq!(
            set.add(&[out("a", 100), out("b", 50), out("a", 120)], 60),
            1
        );
        assert!(set.contains("a", 60) && set.contains("a", 119));
        assert!(!set.contains("a", 120), "over at its end (the later one)");
        assert!(!set.contains("b", 60), "one already over is not added");
        assert_eq!(set.add(&[out("a", 90)], 60), 0, "known");
        assert_eq!(set.live(60), [out("a", 120)]);
        assert_eq!(set.live(130), []);
    }
}
