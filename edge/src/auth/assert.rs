//! The identity assertion: a short-lived JWT (ES256) that the edge signs
//! for every request of a signed-in user, and that the connector passes to
//! the backend as `X-Portico-Jwt-Assertion`. The key comes from the router
//! (`SignInSettings.assertion_keys`); its public half is at the router's
//! and the auth host's `/.well-known/jwks.json`. The claims: `iss`
//! (`https://auth.<apps domain>`), `aud` (the app's id), `sub`, `email`,
//! `email_verified`, `name`, `preferred_username`, `groups`, `iat`, `nbf`,
//! `exp` ([`LIFETIME`] after `iat`).
//!
//! Signing costs tens of microseconds, so an assertion is kept per app and
//! user and used again until [`REUSE_MARGIN`] before it expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use portico_proto::api::{AssertionKey, Jwks};
use portico_proto::AppId;
use serde::Serialize;

use super::oidc::User;

/// How long an assertion is valid.
pub(crate) const LIFETIME: u64 = 300;
/// An assertion is made anew when less than this is left of it.
const REUSE_MARGIN: u64 = 120;
/// The most assertions kept for reuse.
const MAX_CACHED: usize = 10_000;

/// The edge's signer of assertions.
pub(crate) struct Asserter {
    kid: String,
    key: EncodingKey,
    issuer: String,
    /// The published keys, as the auth host serves them.
    jwks: Vec<u8>,
    /// By app, then by `sub`: looked up without allocating.
    cache: Mutex<HashMap<AppId, HashMap<String, Cached>>>,
}

struct Cached {
    user: User,
    exp: u64,
    token: Arc<str>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    email_verified: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    preferred_username: Option<&'a str>,
    groups: &'a [String],
    iat: u64,
    nbf: u64,
    exp: u64,
}

impl Asserter {
    /// The signer for `keys` (the first signs), or why there is none.
    pub(crate) fn new(keys: &[AssertionKey], apps_domain: &str) -> Result<Asserter, String> {
        let first = keys
            .first()
            .ok_or("the router sent no assertion key (an older router)")?;
        let der = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&first.pkcs8)
            .map_err(|e| format!("assertion key {}: {e}", first.kid))?;
        let jwks = serde_json::to_vec(&Jwks {
            keys: keys.iter().map(AssertionKey::public_jwk).collect(),
        })
        .map_err(|e| e.to_string())?;
        let asserter = Asserter {
            kid: first.kid.clone(),
            key: EncodingKey::from_ec_der(&der),
            issuer: format!("https://{}", super::auth_host(apps_domain)),
            jwks,
            cache: Mutex::new(HashMap::new()),
        };
        // A key the signer cannot use is found now, not at a request.
        let probe = User {
            sub: "probe".into(),
            email: None,
            email_verified: false,
            name: None,
            preferred_username: None,
            groups: vec![],
        };
        asserter.sign(&AppId::new("probe").map_err(|e| e.to_string())?, &probe, 0)?;
        Ok(asserter)
    }

    /// The JWKS document (JSON).
    pub(crate) fn jwks(&self) -> &[u8] {
        &self.jwks
    }

    /// An assertion of `user` for `app`, made now or kept from before.
    pub(crate) fn assertion(&self, app: &AppId, user: &User) -> Result<Arc<str>, String> {
        let now = super::seal::unix_now();
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.get(app).and_then(|by_sub| by_sub.get(&user.sub)) {
                if c.exp > now + REUSE_MARGIN && c.user == *user {
                    return Ok(Arc::clone(&c.token));
                }
            }
        }
        let token: Arc<str> = self.sign(app, user, now)?.into();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.values().map(HashMap::len).sum::<usize>() >= MAX_CACHED {
            for by_sub in cache.values_mut() {
                by_sub.retain(|_, c| c.exp > now + REUSE_MARGIN);
            }
            cache.retain(|_, by_sub| !by_sub.is_empty());
            if cache.values().map(HashMap::len).sum::<usize>() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.entry(app.clone()).or_default().insert(
            user.sub.clone(),
            Cached {
                user: user.clone(),
                exp: now + LIFETIME,
                token: Arc::clone(&token),
            },
        );
        Ok(token)
    }

    fn sign(&self, app: &AppId, user: &User, now: u64) -> Result<String, String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let claims = Claims {
            iss: &self.issuer,
            aud: app.as_str(),
            sub: &user.sub,
            email: user.email.as_deref(),
            email_verified: user.email_verified,
            name: user.name.as_deref(),
            preferred_username: user.preferred_username.as_deref(),
            groups: &user.groups,
            iat: now,
            nbf: now.saturating_sub(5),
            exp: now + LIFETIME,
        };
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AssertionKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        AssertionKey {
            kid: "k1".into(),
            pkcs8: b64.encode(pair.serialize_der()),
            x: b64.encode(&raw[1..33]),
            y: b64.encode(&raw[33..]),
        }
    }

    fn alice() -> User {
        User {
            sub: "alice".into(),
            email: Some("alice@example.test".into()),
            email_verified: true,
            name: Some("Alice".into()),
            preferred_username: None,
            groups: vec!["devs".into()],
        }
    }

    #[test]
    fn an_assertion_verifies_with_the_published_key_for_its_app_only() {
        let a = Asserter::new(&[key()], "apps.test").unwrap();
        let hr = AppId::new("hr").unwrap();
        let token = a.assertion(&hr, &alice()).unwrap();
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(a.jwks()).unwrap();
        let header = jsonwebtoken::decode_header(&*token).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        let jwk = jwks.find(header.kid.as_deref().unwrap()).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::ES256);
        v.set_issuer(&["https://auth.apps.test"]);
        v.set_audience(&["hr"]);
        let got = jsonwebtoken::decode::<serde_json::Value>(token.as_bytes(), &key, &v).unwrap();
        assert_eq!(got.claims["sub"], "alice");
        assert_eq!(got.claims["groups"][0], "devs");
        assert_eq!(
            got.claims["exp"].as_u64().unwrap() - got.claims["iat"].as_u64().unwrap(),
            LIFETIME
        );
        v.set_audience(&["wiki"]);
        assert!(jsonwebtoken::decode::<serde_json::Value>(token.as_bytes(), &key, &v).is_err());
        // Kept for the same user, made anew when the user's claims change.
        assert_eq!(a.assertion(&hr, &alice()).unwrap(), token);
        let mut other = alice();
        other.groups.clear();
        assert_ne!(a.assertion(&hr, &other).unwrap(), token);
    }

    #[test]
    fn a_bad_key_is_refused_at_once() {
        let mut k = key();
        k.pkcs8 = "AAAA".into();
        assert!(Asserter::new(&[k], "apps.test").is_err());
        assert!(Asserter::new(&[], "apps.test").is_err());
    }
}
