//! Bearer JWTs of API clients (`Authorization: Bearer <JWT>`), from the
//! deployment's OpenID provider, checked with `jsonwebtoken`:
//!
//! - the signature, by a key of the provider's JWKS (its `jwks_uri` from
//!   discovery) chosen by `kid`, with only an asymmetric algorithm that key
//!   says it signs with (its `alg`, else its type's: RS*/PS* for RSA,
//!   ES256 for P-256, ES384 for P-384, EdDSA for Ed25519). HS* and `none`
//!   never pass, and a header's own `jwk`, `jku` or `x5u` is never used;
//! - `iss` (the provider), `aud` (the app: its external URL, with or
//!   without the trailing slash), `exp` and `nbf` with [`LEEWAY`] of clock
//!   skew; `exp`, `iss`, `aud` and `sub` must be there.
//!
//! The keys are cached for [`KEYS_TTL`]. A `kid` the cached set lacks
//! fetches the set again, at most once per [`REFRESH_MIN`] and one fetch at
//! a time (requests that arrive meanwhile wait for it), then refuses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::oidc::{OidcError, Provider, User};

/// The clock skew allowed on `exp` and `nbf`.
pub(crate) const LEEWAY: Duration = Duration::from_secs(60);
/// How long a fetched key set is used before it is fetched again.
pub(crate) const KEYS_TTL: Duration = Duration::from_secs(3600);
/// The least time between two fetches for an unknown `kid`.
pub(crate) const REFRESH_MIN: Duration = Duration::from_secs(30);
/// The longest token looked at, in bytes.
pub(crate) const MAX_TOKEN: usize = 8192;
/// The most keys kept of a provider's set.
const MAX_KEYS: usize = 32;

/// Why a bearer token was refused, as the client reads it in
/// `WWW-Authenticate: Bearer error="invalid_token", error_description=`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BearerError {
    #[error("the token is not a JWT")]
    Malformed,
    #[error("the token is longer than {MAX_TOKEN} bytes")]
    TooLong,
    #[error("the token has critical header parameters, which are not supported")]
    Critical,
    #[error(
        "the token's algorithm is symmetric; only the provider's asymmetric keys are accepted"
    )]
    Symmetric,
    #[error("the token names no key (kid) and the provider has more than one")]
    NoKid,
    #[error("the token's key (kid) is not one of the provider's")]
    UnknownKey,
    #[error("the provider's key does not sign with the token's algorithm")]
    WrongAlgorithm,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token is from another issuer")]
    Issuer,
    #[error("the token is for another audience")]
    Audience,
    #[error("the token lacks the {0} claim")]
    Missing(String),
    #[error("the token's claims are malformed")]
    Claims,
    /// Not the token's fault: the keys could not be had.
    #[error("the provider's signing keys could not be fetched: {0}")]
    Keys(String),
}

/// One key of the provider, with the algorithms it may verify.
struct Key {
    kid: Option<String>,
    algs: Vec<Algorithm>,
    key: DecodingKey,
}

/// The provider's keys as last fetched.
struct KeySet {
    keys: Vec<Key>,
    fetched: Instant,
}

enum Found<'a> {
    Key(&'a Key),
    Unknown,
}

impl KeySet {
    fn find(&self, kid: Option<&str>) -> Result<Found<'_>, BearerError> {
        match kid {
            Some(kid) => Ok(self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .map_or(Found::Unknown, Found::Key)),
            // Without a kid, only a provider of one key is unambiguous.
            None => match self.keys.as_slice() {
                [only] => Ok(Found::Key(only)),
                [] => Ok(Found::Unknown),
                _ => Err(BearerError::NoKid),
            },
        }
    }
}

/// Refresh bookkeeping, under the lock that makes one fetch at a time.
#[derive(Default)]
struct Refresh {
    /// The last fetch for an unknown `kid`.
    last_forced: Option<Instant>,
    /// The last fetch that failed.
    last_failed: Option<Instant>,
}

/// The verifier of one deployment's bearer tokens.
#[derive(Default)]
pub(crate) struct Verifier {
    keys: ArcSwapOption<KeySet>,
    refresh: Mutex<Refresh>,
}

/// The claims read from an access token.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    name: Option<String>,
    /// The rest, for the deployment's groups claim.
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// Why a fetch is made.
#[derive(Debug, Clone, Copy)]
enum Why {
    /// No keys yet, or they are older than [`KEYS_TTL`].
    Stale,
    /// A `kid` the set lacks.
    UnknownKid,
}

impl Verifier {
    /// The user `token` names, if it is a valid access token of `provider`
    /// (issuer `issuer`) for one of `audiences`.
    pub(crate) async fn verify(
        &self,
        provider: &Provider,
        issuer: &str,
        audiences: &[String],
        token: &str,
    ) -> Result<User, BearerError> {
        if token.len() > MAX_TOKEN {
            return Err(BearerError::TooLong);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| BearerError::Malformed)?;
        if header.crit.is_some() {
            return Err(BearerError::Critical);
        }
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(BearerError::Symmetric);
        }
        let kid = header.kid.as_deref();
        let set = self.key_set(provider, kid).await?;
        let key = match set.find(kid)? {
            Found::Key(k) => k,
            Found::Unknown => return Err(BearerError::UnknownKey),
        };
        if !key.algs.contains(&header.alg) {
            return Err(BearerError::WrongAlgorithm);
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[issuer]);
        validation.set_audience(audiences);
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(refused)?;
        let c = data.claims;
        if c.sub.is_empty() {
            return Err(BearerError::Missing("sub".into()));
        }
        let mut user = User::bounded(&c.sub, c.email.as_deref(), c.name.as_deref(), &[]);
        user.groups = super::oidc::groups_of(c.rest.get(provider.groups_claim()));
        Ok(user)
    }

    /// A key set that has `kid` if the provider has it: the cached one, or
    /// one fetched now (see the module's rules).
    async fn key_set(
        &self,
        provider: &Provider,
        kid: Option<&str>,
    ) -> Result<Arc<KeySet>, BearerError> {
        let seen = self.keys.load_full();
        if let Some(set) = &seen {
            if set.fetched.elapsed() < KEYS_TTL && matches!(set.find(kid)?, Found::Key(_)) {
                return Ok(Arc::clone(set));
            }
        }
        // One fetch at a time; whoever waited may find it done.
        let mut refresh = self.refresh.lock().await;
        let current = self.keys.load_full();
        let why = match &current {
            Some(set) if set.fetched.elapsed() < KEYS_TTL => {
                if matches!(set.find(kid)?, Found::Key(_)) {
                    return Ok(Arc::clone(set));
                }
                let recently = refresh
                    .last_forced
                    .is_some_and(|t| t.elapsed() < REFRESH_MIN);
                if recently {
                    return Ok(Arc::clone(set));
                }
                refresh.last_forced = Some(Instant::now());
                Why::UnknownKid
            }
            _ => {
                if refresh
                    .last_failed
                    .is_some_and(|t| t.elapsed() < REFRESH_MIN)
                {
                    // The provider failed a moment ago: do not ask at
                    // every request; stale keys still serve.
                    return current.ok_or_else(|| {
                        BearerError::Keys("the last attempt failed; retrying shortly".into())
                    });
                }
                Why::Stale
            }
        };
        match fetch(provider).await {
            Ok(set) => {
                tracing::info!(reason = ?why, keys = set.keys.len(), "fetched the provider's signing keys");
                refresh.last_failed = None;
                let set = Arc::new(set);
                self.keys.store(Some(Arc::clone(&set)));
                Ok(set)
            }
            Err(e) => {
                tracing::warn!(reason = ?why, error = %e, "the provider's signing keys could not be fetched");
                refresh.last_failed = Some(Instant::now());
                current.ok_or_else(|| BearerError::Keys(e.to_string()))
            }
        }
    }
}

/// The provider's key set, fetched now; the keys Portico cannot use (for
/// encryption, symmetric, of unknown types or curves) are left out.
async fn fetch(provider: &Provider) -> Result<KeySet, OidcError> {
    let body = provider.fetch_jwks().await?;
    #[derive(Deserialize)]
    struct Raw {
        keys: Vec<serde_json::Value>,
    }
    let raw: Raw = serde_json::from_slice(&body)
        .map_err(|e| OidcError::Discovery(format!("the JWKS is not a key set: {e}")))?;
    let keys = raw
        .keys
        .into_iter()
        .filter_map(|v| serde_json::from_value::<Jwk>(v).ok())
        .filter_map(|jwk| key_of(&jwk))
        .take(MAX_KEYS)
        .collect();
    Ok(KeySet {
        keys,
        fetched: Instant::now(),
    })
}

/// The verifying key of one JWK, and the algorithms it may check; `None`
/// for a key Portico does not verify with.
fn key_of(jwk: &Jwk) -> Option<Key> {
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let by_type: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        // Symmetric keys and anything else.
        _ => return None,
    };
    let algs = match jwk.common.key_algorithm {
        None => by_type,
        Some(KeyAlgorithm::UNKNOWN_ALGORITHM) => return None,
        Some(a) => {
            let alg = Algorithm::try_from(a).ok()?;
            // A key's `alg` must fit its type (an RSA key that says ES256
            // verifies nothing).
            by_type.contains(&alg).then(|| vec![alg])?
        }
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key {
        kid: jwk.common.key_id.clone(),
        algs,
        key,
    })
}

fn refused(e: jsonwebtoken::errors::Error) -> BearerError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => BearerError::Signature,
        K::ExpiredSignature => BearerError::Expired,
        K::ImmatureSignature => BearerError::NotYetValid,
        K::InvalidIssuer => BearerError::Issuer,
        K::InvalidAudience => BearerError::Audience,
        K::MissingRequiredClaim(c) => BearerError::Missing(c.clone()),
        K::InvalidAlgorithm => BearerError::WrongAlgorithm,
        K::Json(_) | K::InvalidClaimFormat(_) | K::Utf8(_) => BearerError::Claims,
        _ => BearerError::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwk(v: serde_json::Value) -> Jwk {
        serde_json::from_value(v).unwrap()
    }

    // A real RSA modulus is not needed to check the rules; a short one
    // still makes a key (`jsonwebtoken` checks sizes when it verifies).
    const N: &str = "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw";

    #[test]
    fn a_key_verifies_only_the_asymmetric_algorithms_it_says_or_its_type_allows() {
        let k = key_of(&jwk(
            serde_json::json!({"kty":"RSA","n":N,"e":"AQAB","kid":"a","alg":"RS256","use":"sig"}),
        ))
        .unwrap();
        assert_eq!(k.algs, [Algorithm::RS256]);
        assert_eq!(k.kid.as_deref(), Some("a"));
        let k = key_of(&jwk(serde_json::json!({"kty":"RSA","n":N,"e":"AQAB"}))).unwrap();
        assert!(k.algs.contains(&Algorithm::PS256) && !k.algs.contains(&Algorithm::HS256));
        // An RSA key that claims an EC or HMAC algorithm, an encryption
        // key, a symmetric key: none verifies anything.
        for v in [
            serde_json::json!({"kty":"RSA","n":N,"e":"AQAB","alg":"ES256"}),
            serde_json::json!({"kty":"RSA","n":N,"e":"AQAB","alg":"HS256"}),
            serde_json::json!({"kty":"RSA","n":N,"e":"AQAB","use":"enc"}),
            serde_json::json!({"kty":"oct","k":"c2VjcmV0"}),
            serde_json::json!({"kty":"oct","k":"c2VjcmV0","alg":"HS256"}),
        ] {
            assert!(key_of(&jwk(v.clone())).is_none(), "{v}");
        }
    }

    #[test]
    fn without_a_kid_only_a_single_key_is_used() {
        let key = |kid: &str| {
            key_of(&jwk(
                serde_json::json!({"kty":"RSA","n":N,"e":"AQAB","kid":kid}),
            ))
            .unwrap()
        };
        let one = KeySet {
            keys: vec![key("a")],
            fetched: Instant::now(),
        };
        assert!(matches!(one.find(None), Ok(Found::Key(_))));
        assert!(matches!(one.find(Some("a")), Ok(Found::Key(_))));
        assert!(matches!(one.find(Some("b")), Ok(Found::Unknown)));
        let two = KeySet {
            keys: vec![key("a"), key("b")],
            fetched: Instant::now(),
        };
        assert!(matches!(two.find(None), Err(BearerError::NoKid)));
        assert!(matches!(two.find(Some("b")), Ok(Found::Key(_))));
    }
}
