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

use portico_proto::api::{HandoffUse, SignedOut, SignedOutUser, MAX_SIGNED_OUT};

use super::oidc::User;
use tokio::sync::{mpsc, oneshot};

/// The most signed-out sessions an edge holds: the router's limit, and as
/// many again signed out here and not yet taken by the router.
const MAX_HELD: usize = 2 * MAX_SIGNED_OUT;

/// The sessions signed out at any edge, until they would have ended, and
/// the users an admin signed out of every session (`portico session
/// revoke`): one lock, taken once per request of a session.
#[derive(Default)]
pub(crate) struct SignedOutSet {
    held: RwLock<Held>,
}

#[derive(Default)]
struct Held {
    /// Signed-out session ids, with when each would have ended.
    sessions: HashMap<String, u64>,
    /// Signed-out users: `(before, until)` by name as given (a `sub`)...
    users: HashMap<String, (u64, u64)>,
    /// ...and by its ASCII lowercase (an email, matched as an assignment
    /// matches it).
    users_folded: HashMap<String, (u64, u64)>,
}

impl SignedOutSet {
    /// Whether the session `sid` of `user`, begun at `iat`, is over at
    /// `now`: signed out itself, or its user signed out of every session
    /// begun at or before a time not before `iat`.
    pub(crate) fn refuses(&self, sid: &str, user: &User, iat: u64, now: u64) -> bool {
        let held = self.held.read().unwrap_or_else(|p| p.into_inner());
        if held.sessions.get(sid).is_some_and(|u| *u > now) {
            return true;
        }
        if held.users.is_empty() {
            return false;
        }
        let cut = |e: Option<&(u64, u64)>| {
            e.is_some_and(|(before, until)| *until > now && iat <= *before)
        };
        cut(held.users.get(&user.sub))
            || user
                .verified_email()
                .is_some_and(|e| cut(held.users_folded.get(&e.to_ascii_lowercase())))
    }

    /// Adds signed-out users, forgetting those over at `now`.
    pub(crate) fn add_users<'a>(
        &self,
        list: impl IntoIterator<Item = &'a SignedOutUser>,
        now: u64,
    ) {
        let mut guard = self.held.write().unwrap_or_else(|p| p.into_inner());
        let held = &mut *guard;
        held.users.retain(|_, (_, until)| *until > now);
        held.users_folded.retain(|_, (_, until)| *until > now);
        for u in list {
            if u.until <= now {
                continue;
            }
            for (map, key) in [
                (&mut held.users, u.user.clone()),
                (&mut held.users_folded, u.user.to_ascii_lowercase()),
            ] {
                let e = map.entry(key).or_insert((0, 0));
                *e = (e.0.max(u.before), e.1.max(u.until));
            }
        }
    }

    /// Every signed-out user live at `now` (for the saved snapshot).
    pub(crate) fn live_users(&self, now: u64) -> Vec<SignedOutUser> {
        let held = self.held.read().unwrap_or_else(|p| p.into_inner());
        let mut live: Vec<SignedOutUser> = held
            .users
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(user, (before, until))| SignedOutUser {
                user: user.clone(),
                before: *before,
                until: *until,
            })
            .collect();
        live.sort_by(|a, b| a.user.cmp(&b.user));
        live
    }

    /// Adds `sessions`, forgetting those over at `now`. Returns how many
    /// were new.
    pub(crate) fn add<'a>(
        &self,
        sessions: impl IntoIterator<Item = &'a SignedOut>,
        now: u64,
    ) -> usize {
        let mut held = self.held.write().unwrap_or_else(|p| p.into_inner());
        let until = &mut held.sessions;
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
        let held = self.held.read().unwrap_or_else(|p| p.into_inner());
        let mut live: Vec<SignedOut> = held
            .sessions
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

    impl SignedOutSet {
        /// Whether session `sid` itself is signed out at `now`.
        fn contains(&self, sid: &str, now: u64) -> bool {
            let held = self.held.read().unwrap_or_else(|p| p.into_inner());
            held.sessions.get(sid).is_some_and(|u| *u > now)
        }
    }

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

    #[test]
    fn a_signed_out_user_loses_the_sessions_begun_until_the_cut_by_sub_or_verified_email() {
        let set = SignedOutSet::default();
        let user = |sub: &str, email: &str, verified: bool| User {
            sub: sub.into(),
            email: Some(email.into()),
            email_verified: verified,
            name: None,
            preferred_username: None,
            groups: vec![],
        };
        let alice = user("alice", "Alice@Example.test", true);
        assert!(!set.refuses("s1", &alice, 100, 150));
        set.add_users(
            &[SignedOutUser {
                user: "alice@example.TEST".into(),
                before: 200,
                until: 1000,
            }],
            150,
        );
        assert!(
            set.refuses("s1", &alice, 100, 150),
            "by verified email, any case"
        );
        assert!(set.refuses("s1", &alice, 200, 150), "at the cut");
        assert!(!set.refuses("s2", &alice, 201, 250), "begun after it");
        assert!(
            !set.refuses("s1", &user("alice", "alice@example.test", false), 100, 150),
            "an unverified email is not the user"
        );
        assert!(
            !set.refuses("s1", &user("ALICE", "x@y", true), 100, 150),
            "sub is exact"
        );
        assert!(!set.refuses("s1", &alice, 100, 1000), "over at its until");
        set.add_users(
            &[SignedOutUser {
                user: "bob".into(),
                before: 300,
                until: 2000,
            }],
            150,
        );
        assert!(
            set.refuses("s3", &user("bob", "b@x", false), 299, 150),
            "by sub"
        );
        assert_eq!(set.live_users(1500).len(), 1);
    }
}
