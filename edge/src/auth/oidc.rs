//! The OpenID provider as the edge's relying party sees it, through the
//! `openidconnect` crate: discovery (cached, fetched again after
//! [`METADATA_TTL`] or when an ID token names a key the cached set lacks,
//! at most once per [`REFRESH_MIN`]), the authorization URL (code flow,
//! PKCE S256, `state` and `nonce`), and the code exchange with the ID
//! token's checks (signature through the provider's JWKS, `iss`, `aud`,
//! `exp`, `nonce`; the crate refuses `alg: none`). The HTTP client follows
//! no redirects and every call is bounded in time and size.

use std::time::{Duration, Instant};

use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreGenderClaim, CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm, CoreProviderMetadata,
};
use openidconnect::{
    AdditionalClaims, AuthorizationCode, ClaimsVerificationError, ClientId, ClientSecret,
    CsrfToken, IdToken, IssuerUrl, Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    TokenResponse as _,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// How long discovery's answer (endpoints and keys) is used.
const METADATA_TTL: Duration = Duration::from_secs(3600);
/// The least time between two fetches of the metadata.
const REFRESH_MIN: Duration = Duration::from_secs(30);
/// How long one call to the provider may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest key set read from the provider.
const MAX_JWKS: usize = 64 * 1024;
/// The most groups kept of a user, and the longest claim kept.
pub(crate) const MAX_GROUPS: usize = 64;
pub(crate) const MAX_CLAIM: usize = 256;

/// Who signed in, as the ID token says (bounded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct User {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Whether the provider says it verified `email` (only a verified
    /// email matches an assignment).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub email_verified: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_username: Option<String>,
    /// From the deployment's groups claim; a group name longer than
    /// [`MAX_CLAIM`] is left out rather than cut (a cut name could match
    /// another group).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

impl User {
    /// The claim an identity header maps (see
    /// `portico_proto::api::IDENTITY_CLAIM_NAMES`); `groups` joined by
    /// commas.
    pub(crate) fn claim(&self, name: &str) -> Option<String> {
        match name {
            "sub" => Some(self.sub.clone()),
            "email" => self.email.clone(),
            "name" => self.name.clone(),
            "preferred_username" => self.preferred_username.clone(),
            "groups" => Some(self.groups.join(",")),
            _ => None,
        }
    }

    /// The verified email, for assignment.
    pub(crate) fn verified_email(&self) -> Option<&str> {
        self.email.as_deref().filter(|_| self.email_verified)
    }

    /// A user from a token's claims, each kept to [`MAX_CLAIM`] bytes and
    /// at most [`MAX_GROUPS`] groups (the ID token's and a bearer token's
    /// alike).
    pub(crate) fn bounded(
        sub: &str,
        email: Option<&str>,
        name: Option<&str>,
        groups: &[String],
    ) -> User {
        User {
            sub: bounded(sub),
            email: email.map(bounded),
            // A bearer token's email is not taken as verified: assignment
            // by email needs the ID token's `email_verified`.
            email_verified: false,
            name: name.map(bounded),
            preferred_username: None,
            groups: groups_of(Some(&serde_json::json!(groups))),
        }
    }
}

/// The claims beyond the standard ones that the edge reads: the groups,
/// under the claim the deployment names.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Extra {
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

impl AdditionalClaims for Extra {}

type GroupsIdToken =
    IdToken<Extra, CoreGenderClaim, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm>;

/// Why a sign-in could not go on. The user sees the kind; the log has the
/// detail.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OidcError {
    #[error("the OpenID provider's discovery failed: {0}")]
    Discovery(String),
    #[error("the provider's configuration is not usable: {0}")]
    Config(String),
    #[error("the code exchange failed: {0}")]
    Exchange(String),
    #[error("the ID token was refused: {0}")]
    IdToken(String),
}

/// The deployment's OpenID provider: one discovery (and key set) shared by
/// every [`Client`] of it the edge signs users in through.
pub(crate) struct Provider {
    issuer: IssuerUrl,
    /// The claim that lists a user's groups.
    groups_claim: String,
    http: openidconnect::reqwest::Client,
    metadata: Mutex<Option<(CoreProviderMetadata, Instant)>>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("issuer", &self.issuer.as_str())
            .finish_non_exhaustive()
    }
}

/// A client registered with the provider: the deployment's, or an app's
/// own. Its id is the audience its ID tokens must name.
#[derive(Clone)]
pub(crate) struct Client {
    id: ClientId,
    secret: ClientSecret,
}

impl PartialEq for Client {
    fn eq(&self, other: &Client) -> bool {
        self.id == other.id && self.secret.secret() == other.secret.secret()
    }
}

impl Client {
    pub(crate) fn new(id: &str, secret: &str) -> Client {
        Client {
            id: ClientId::new(id.to_owned()),
            secret: ClientSecret::new(secret.to_owned()),
        }
    }

    pub(crate) fn id(&self) -> &str {
        self.id.as_str()
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id.as_str())
            .field("secret", &"***")
            .finish()
    }
}

/// The values one sign-in carries from the authorization request to the
/// callback.
pub(crate) struct Started {
    pub url: String,
    pub state: String,
    pub nonce: String,
    pub verifier: String,
}

impl Provider {
    pub(crate) fn new(issuer: &str, groups_claim: &str) -> Result<Provider, OidcError> {
        let issuer =
            IssuerUrl::new(issuer.to_owned()).map_err(|e| OidcError::Config(e.to_string()))?;
        let http = openidconnect::reqwest::ClientBuilder::new()
            // Following redirects would let a provider's answer point the
            // edge anywhere.
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| OidcError::Config(e.to_string()))?;
        Ok(Provider {
            issuer,
            groups_claim: groups_claim.to_owned(),
            http,
            metadata: Mutex::new(None),
        })
    }

    /// The provider's metadata: cached, else discovered. `fresh` asks again
    /// (an unknown signing key) unless that was done within
    /// [`REFRESH_MIN`].
    async fn metadata(&self, fresh: bool) -> Result<CoreProviderMetadata, OidcError> {
        let mut cached = self.metadata.lock().await;
        if let Some((m, at)) = cached.as_ref() {
            let age = at.elapsed();
            if age < METADATA_TTL && (!fresh || age < REFRESH_MIN) {
                return Ok(m.clone());
            }
        }
        let discovered = tokio::time::timeout(
            CALL_TIMEOUT * 2,
            CoreProviderMetadata::discover_async(self.issuer.clone(), &self.http),
        )
        .await
        .map_err(|_| OidcError::Discovery(format!("no answer within {:?}", CALL_TIMEOUT * 2)))?
        .map_err(|e| OidcError::Discovery(portico_agent::error_chain(&e).to_string()))?;
        *cached = Some((discovered.clone(), Instant::now()));
        Ok(discovered)
    }

    /// The claim that lists a user's groups.
    pub(crate) fn groups_claim(&self) -> &str {
        &self.groups_claim
    }

    /// `client` as `openidconnect` takes it: the provider's endpoints and
    /// keys, the client's id and secret, the redirect URI.
    fn client(
        &self,
        client: &Client,
        metadata: CoreProviderMetadata,
        redirect: &str,
    ) -> Result<
        CoreClient<
            openidconnect::EndpointSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointMaybeSet,
            openidconnect::EndpointMaybeSet,
        >,
        OidcError,
    > {
        let redirect =
            RedirectUrl::new(redirect.to_owned()).map_err(|e| OidcError::Config(e.to_string()))?;
        Ok(CoreClient::from_provider_metadata(
            metadata,
            client.id.clone(),
            Some(client.secret.clone()),
        )
        .set_redirect_uri(redirect))
    }

    /// The provider's key set (its discovery's `jwks_uri`), fetched now:
    /// the raw JSON, at most [`MAX_JWKS`] bytes within [`CALL_TIMEOUT`].
    pub(crate) async fn fetch_jwks(&self) -> Result<Vec<u8>, OidcError> {
        let url = self.metadata(false).await?.jwks_uri().url().clone();
        let fetch = async {
            let mut resp = self
                .http
                .get(url.clone())
                .header(http::header::ACCEPT, "application/json")
                .send()
                .await
                .map_err(|e| portico_agent::error_chain(&e).to_string())?;
            if !resp.status().is_success() {
                return Err(format!("{url} answered {}", resp.status()));
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| portico_agent::error_chain(&e).to_string())?
            {
                if body.len() + chunk.len() > MAX_JWKS {
                    return Err(format!("{url} sent more than {MAX_JWKS} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        };
        tokio::time::timeout(CALL_TIMEOUT, fetch)
            .await
            .map_err(|_| {
                OidcError::Discovery(format!("the JWKS: no answer within {CALL_TIMEOUT:?}"))
            })?
            .map_err(|e| OidcError::Discovery(format!("the JWKS: {e}")))
    }

    /// Where to send the browser, as `client`: the code flow with PKCE
    /// S256, fresh `state` and `nonce` (256 bits each), scopes `openid
    /// email profile`.
    pub(crate) async fn start(
        &self,
        client: &Client,
        redirect: &str,
    ) -> Result<Started, OidcError> {
        let client = self.client(client, self.metadata(false).await?, redirect)?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state, nonce) = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                || CsrfToken::new(super::seal::random_token(32)),
                || Nonce::new(super::seal::random_token(32)),
            )
            .add_scope(Scope::new("email".into()))
            .add_scope(Scope::new("profile".into()))
            .set_pkce_challenge(challenge)
            .url();
        Ok(Started {
            url: url.to_string(),
            state: state.secret().clone(),
            nonce: nonce.secret().clone(),
            verifier: verifier.secret().clone(),
        })
    }

    /// Exchanges `code` (with the PKCE verifier) as `as_client`, the one
    /// the sign-in started with, and checks the ID token against `nonce`
    /// and that client's id (`aud`): the user it names.
    pub(crate) async fn finish(
        &self,
        as_client: &Client,
        redirect: &str,
        code: &str,
        verifier: &str,
        nonce: &str,
    ) -> Result<User, OidcError> {
        let client = self.client(as_client, self.metadata(false).await?, redirect)?;
        let exchange = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| OidcError::Config(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.to_owned()));
        let response = tokio::time::timeout(CALL_TIMEOUT * 2, exchange.request_async(&self.http))
            .await
            .map_err(|_| OidcError::Exchange(format!("no answer within {:?}", CALL_TIMEOUT * 2)))?
            .map_err(|e| OidcError::Exchange(portico_agent::error_chain(&e).to_string()))?;
        let raw = response
            .id_token()
            .ok_or_else(|| OidcError::IdToken("the token response has no ID token".into()))?
            .to_string();
        let token: GroupsIdToken = raw
            .parse()
            .map_err(|e: serde_json::Error| OidcError::IdToken(e.to_string()))?;
        let nonce = Nonce::new(nonce.to_owned());
        let chain = |e: &ClaimsVerificationError| portico_agent::error_chain(e).to_string();
        let verified = {
            let verifier = client.id_token_verifier();
            token
                .claims(&verifier, &nonce)
                .map(|c| user_of(c, &self.groups_claim))
        };
        match verified {
            Ok(user) => Ok(user),
            // The provider may have rotated its keys since discovery:
            // once, with fresh ones. A claim that is off stays off.
            Err(first @ ClaimsVerificationError::SignatureVerification(_)) => {
                let fresh = self.metadata(true).await?;
                let client = self.client(as_client, fresh, redirect)?;
                let verifier = client.id_token_verifier();
                token
                    .claims(&verifier, &nonce)
                    .map(|c| user_of(c, &self.groups_claim))
                    .map_err(|e| {
                        OidcError::IdToken(format!(
                            "{}; again with fresh keys: {}",
                            chain(&first),
                            chain(&e)
                        ))
                    })
            }
            Err(e) => Err(OidcError::IdToken(chain(&e))),
        }
    }
}

fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_CLAIM);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn user_of(c: &openidconnect::IdTokenClaims<Extra, CoreGenderClaim>, groups_claim: &str) -> User {
    User {
        sub: bounded(c.subject().as_str()),
        email: c.email().map(|e| bounded(e.as_str())),
        email_verified: c.email_verified() == Some(true),
        name: c
            .name()
            .and_then(|n| n.get(None))
            .map(|n| bounded(n.as_str())),
        preferred_username: c.preferred_username().map(|u| bounded(u.as_str())),
        groups: groups_of(c.additional_claims().rest.get(groups_claim)),
    }
}

/// A groups claim: an array of strings (a single string is one group).
/// Over-long names and entries past [`MAX_GROUPS`] are left out.
pub(crate) fn groups_of(claim: Option<&serde_json::Value>) -> Vec<String> {
    let one = |v: &serde_json::Value| {
        v.as_str()
            .filter(|g| !g.is_empty() && g.len() <= MAX_CLAIM && !g.chars().any(char::is_control))
            .map(str::to_owned)
    };
    match claim {
        Some(serde_json::Value::Array(list)) => {
            list.iter().filter_map(one).take(MAX_GROUPS).collect()
        }
        Some(v) => one(v).into_iter().collect(),
        None => Vec::new(),
    }
}
