//! Sealed tokens: what the edge hands the browser (the sign-in flow's
//! cookie, the one-time handoff code, the session cookie) is encrypted and
//! authenticated with a key every edge of every region has from the router
//! (`EdgeConfig.sign_in.keys`), so any edge opens what another sealed.
//!
//! A token is `base64url(key id ‖ nonce ‖ ChaCha20-Poly1305(payload))`.
//! The associated data is the token's purpose and scope (the host it is
//! for), so a session of one app is no session at another, and a handoff
//! code is no session anywhere. Payloads are JSON with their own expiry;
//! [`Keys::open`] refuses what is expired, too long, or sealed with a key
//! this edge does not have, without saying which.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The longest token opened, in characters: a cookie is at most 4 KiB.
pub(crate) const MAX_TOKEN: usize = 4000;

/// What a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// The sign-in flow's state, in a cookie of the auth host.
    Flow,
    /// The one-time code that carries a sign-in from the auth host to the
    /// app's host.
    Handoff,
    /// A session, in a cookie of the app's host.
    Session,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::Flow => b"portico flow v1",
            Purpose::Handoff => b"portico handoff v1",
            Purpose::Session => b"portico session v1",
        }
    }
}

/// A token's payload with its expiry.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    /// Unix seconds.
    exp: u64,
    body: T,
}

/// The sealing keys: the first seals, all of them open.
pub(crate) struct Keys {
    keys: Vec<(u8, LessSafeKey)>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<u8> = self.keys.iter().map(|(id, _)| *id).collect();
        f.debug_struct("Keys").field("ids", &ids).finish()
    }
}

/// Why the router's keys cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("no session key")]
    None,
    #[error("session key {id} is not 32 bytes of base64url")]
    Bad { id: u8 },
}

impl Keys {
    /// From the router's `(id, base64url secret)` pairs, the sealing one
    /// first.
    pub(crate) fn new<'a>(keys: impl IntoIterator<Item = (u8, &'a str)>) -> Result<Keys, KeyError> {
        let mut out = Vec::new();
        for (id, secret) in keys {
            let bytes = URL_SAFE_NO_PAD
                .decode(secret)
                .ok()
                .filter(|b| b.len() == 32)
                .ok_or(KeyError::Bad { id })?;
            let key =
                UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| KeyError::Bad { id })?;
            out.push((id, LessSafeKey::new(key)));
        }
        if out.is_empty() {
            return Err(KeyError::None);
        }
        Ok(Keys { keys: out })
    }

    /// `body` sealed for `purpose` at `scope`, valid for `ttl` from now.
    pub(crate) fn seal<T: Serialize>(
        &self,
        purpose: Purpose,
        scope: &str,
        body: &T,
        ttl: Duration,
    ) -> String {
        let (id, key) = &self.keys[0];
        let envelope = Envelope {
            exp: unix_now().saturating_add(ttl.as_secs()),
            body,
        };
        // Serializing plain structs of strings and numbers cannot fail.
        let mut data = serde_json::to_vec(&envelope).unwrap_or_default();
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce);
        // Sealing fails only past 256 GiB of input.
        let _ = key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            aad(purpose, scope),
            &mut data,
        );
        let mut token = Vec::with_capacity(1 + NONCE_LEN + data.len());
        token.push(*id);
        token.extend_from_slice(&nonce);
        token.extend_from_slice(&data);
        URL_SAFE_NO_PAD.encode(token)
    }

    /// The body of a token sealed for `purpose` at `scope` and not expired;
    /// `None` for anything else.
    pub(crate) fn open<T: DeserializeOwned>(
        &self,
        purpose: Purpose,
        scope: &str,
        token: &str,
    ) -> Option<T> {
        self.open_until(purpose, scope, token).map(|(body, _)| body)
    }

    /// [`Keys::open`], with the token's expiry (unix seconds).
    pub(crate) fn open_until<T: DeserializeOwned>(
        &self,
        purpose: Purpose,
        scope: &str,
        token: &str,
    ) -> Option<(T, u64)> {
        if token.len() > MAX_TOKEN {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
        let (&id, rest) = raw.split_first()?;
        if rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let (_, key) = self.keys.iter().find(|(k, _)| *k == id)?;
        let mut data = sealed.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = key
            .open_in_place(nonce, aad(purpose, scope), &mut data)
            .ok()?;
        let envelope: Envelope<T> = serde_json::from_slice(plain).ok()?;
        (envelope.exp > unix_now()).then_some((envelope.body, envelope.exp))
    }
}

fn aad(purpose: Purpose, scope: &str) -> Aad<Vec<u8>> {
    let mut a = purpose.tag().to_vec();
    a.push(0);
    a.extend_from_slice(scope.as_bytes());
    Aad::from(a)
}

/// `buf` filled from the system's random source.
pub(crate) fn fill_random(buf: &mut [u8]) {
    use ring::rand::SecureRandom as _;
    // The system source does not fail on Linux once booted.
    let _ = ring::rand::SystemRandom::new().fill(buf);
}

/// `n` random bytes as base64url (for state, nonce, ids).
pub(crate) fn random_token(n: usize) -> String {
    let mut buf = vec![0u8; n];
    fill_random(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secrets: &[(u8, [u8; 32])]) -> Keys {
        let enc: Vec<(u8, String)> = secrets
            .iter()
            .map(|(id, k)| (*id, URL_SAFE_NO_PAD.encode(k)))
            .collect();
        Keys::new(enc.iter().map(|(id, s)| (*id, s.as_str()))).unwrap()
    }

    #[test]
    fn a_token_opens_only_for_its_purpose_scope_and_keys_until_it_expires() {
        let k = keys(&[(1, [7; 32])]);
        let t = k.seal(
            Purpose::Session,
            "hr.apps.test",
            &"alice",
            Duration::from_secs(60),
        );
        assert_eq!(
            k.open::<String>(Purpose::Session, "hr.apps.test", &t)
                .as_deref(),
            Some("alice")
        );
        // Another purpose, another host, another key: nothing.
        assert!(k
            .open::<String>(Purpose::Handoff, "hr.apps.test", &t)
            .is_none());
        assert!(k
            .open::<String>(Purpose::Session, "pay.apps.test", &t)
            .is_none());
        assert!(keys(&[(1, [8; 32])])
            .open::<String>(Purpose::Session, "hr.apps.test", &t)
            .is_none());
        // A rotated set still opens it while it holds the old key.
        let rotated = keys(&[(2, [9; 32]), (1, [7; 32])]);
        assert!(rotated
            .open::<String>(Purpose::Session, "hr.apps.test", &t)
            .is_some());
        // Expired (a TTL of 0 expires at once).
        let old = k.seal(Purpose::Session, "hr.apps.test", &"alice", Duration::ZERO);
        assert!(k
            .open::<String>(Purpose::Session, "hr.apps.test", &old)
            .is_none());
        // Any changed byte, a truncation, junk, an empty or a huge value.
        let mut raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        for i in 0..raw.len() {
            raw[i] ^= 1;
            let bad = URL_SAFE_NO_PAD.encode(&raw);
            assert!(k
                .open::<String>(Purpose::Session, "hr.apps.test", &bad)
                .is_none());
            raw[i] ^= 1;
        }
        for bad in [&t[..t.len() - 1], "", "!!", &"A".repeat(MAX_TOKEN + 1)] {
            assert!(k
                .open::<String>(Purpose::Session, "hr.apps.test", bad)
                .is_none());
        }
        // Two seals of one body differ (a fresh nonce each).
        let again = k.seal(
            Purpose::Session,
            "hr.apps.test",
            &"alice",
            Duration::from_secs(60),
        );
        assert_ne!(t, again);
    }

    #[test]
    fn keys_must_be_32_bytes() {
        assert!(matches!(
            Keys::new([(1, "c2hvcnQ")]),
            Err(KeyError::Bad { id: 1 })
        ));
        assert!(matches!(Keys::new([]), Err(KeyError::None)));
    }
}
