//! The router's HTTP API: request and response bodies (JSON via serde), the
//! paths they travel on, and the naming rules for certificates and tokens.
//!
//! Edges, connectors and the CLI speak to the router only through these
//! types, so none of them depends on the router crate.
//!
//! | method | path | auth | body → answer |
//! |---|---|---|---|
//! | GET | `/healthz`, `/ready` | none | text |
//! | POST | `/v1/enroll` | join token in body | [`EnrollRequest`] → [`EnrollResponse`]; 429 with `Retry-After` past the per-address limit |
//! | POST | `/v1/renew` | client cert | [`CsrRequest`] → [`CertResponse`] |
//! | GET | `/v1/edge/config?after=V&wait=S` | edge cert | → [`EdgeConfig`], or 304 when nothing changed within `wait` |
//! | POST | `/v1/edge/report` | edge cert | [`EdgeReport`] → 204 |
//! | POST | `/v1/edge/sign-outs` | edge cert | [`SignOuts`] → 204 (the sessions are revoked at every edge) |
//! | POST | `/v1/edge/handoffs` | edge cert | [`HandoffUse`] → 204 on its first use at any edge, 409 `conflict` after |
//! | POST | `/v1/sessions/revoke` | admin token | [`RevokeSessions`] → [`SessionsRevoked`] (every session of the user, at every edge; 409 without sign-in) |
//! | POST | `/v1/edge/public-cert` | edge cert | [`CsrRequest`] → [`CertResponse`] (wildcard for the apps domain) |
//! | GET | `/v1/connector/config?after=V&wait=S` | connector cert | → [`ConnectorConfig`], or 304 |
//! | GET, POST | `/v1/regions` | admin token | → `[Region]`; [`CreateRegion`] → [`Region`] (409 when it exists) |
//! | DELETE | `/v1/regions/{id}` | admin token | → 204, 404, or 409 while edges, pinned groups or unused edge tokens use it (and for `default`) |
//! | GET, POST | `/v1/groups` | admin token | → `[Group]`; [`CreateGroup`] → [`Group`] (404 for a pinned region that does not exist) |
//! | DELETE | `/v1/groups/{id}` | admin token | → 204, 404, or 409 when not empty |
//! | GET, POST | `/v1/apps` | admin token | → `[App]`; [`AppSpec`] → [`App`] |
//! | GET, DELETE | `/v1/apps/{id}` | admin token | → [`App`]; → 204 |
//! | PATCH | `/v1/apps/{id}` | admin token | [`AppPatch`] → [`App`] |
//! | GET, POST | `/v1/tokens` | admin token | → `[TokenInfo]`; [`CreateToken`] → [`TokenCreated`] (404 for an edge token of a region that does not exist) |
//! | DELETE | `/v1/tokens/{id}` | admin token | → 204 (revokes an unused token), 409 when used |
//! | GET | `/v1/connectors` | admin token | → `[Connector]` |
//! | DELETE | `/v1/connectors/{id}` | admin token | → 204 (revokes it) |
//! | GET | `/v1/edges` | admin token | → `[Edge]` |
//! | DELETE | `/v1/edges/{id}` | admin token | → 204 (revokes it; connectors stop dialing it) |
//! | POST | `/v1/apps/{id}/test` | admin token | → [`AppTestReport`] (`portico app test`), within about 15 s |
//! | GET | `/v1/connector/probes?wait=S` | connector cert | → [`ProbeJobs`], or 304 when none came within `wait` |
//! | POST | `/v1/connector/probes/{id}` | connector cert | [`ProbeResult`] → 204; 404 for a job that is not this connector's (or timed out) |
//! | GET, POST | `/v1/certificates` | admin token | → `[Certificate]`; [`CertificateUpload`] → [`Certificate`] (400 naming what is wrong: expired, not yet valid, self-signed, key mismatch, host not covered, ...) |
//! | DELETE | `/v1/certificates/{id}` | admin token | → 204, 404 |
//!
//! Every error answer is an [`ApiError`] with the HTTP status of its kind:
//! 400 invalid input (and `wrong_kind`: a join token given to the other kind
//! of component; `wrong_region`: an edge token of another region than the
//! one the edge says it runs in), 401 missing or wrong credentials, 403
//! revoked, 404 not found, 409 conflict, 429 `rate_limited` (with
//! `Retry-After`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{AppId, ConnectorId, EdgeId, GroupId, RegionId};

/// The name every router certificate carries, whatever address it is
/// reached at. Clients verify the router against this name and the CA.
pub const ROUTER_SERVER_NAME: &str = "router.portico.internal";

/// The name an edge's tunnel certificate carries; connectors verify the
/// edge they dial against it.
pub fn edge_server_name(edge: &EdgeId) -> String {
    format!("{edge}.edges.portico.internal")
}

/// The longest a long-poll may wait, in seconds.
pub const MAX_WATCH_WAIT_SECS: u64 = 60;

/// Who a certificate belongs to, as its URI SANs say.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Identity {
    Connector { id: ConnectorId, group: GroupId },
    Edge { id: EdgeId, region: RegionId },
}

const URN_CONNECTOR: &str = "urn:portico:connector:";
const URN_GROUP: &str = "urn:portico:group:";
const URN_EDGE: &str = "urn:portico:edge:";
const URN_REGION: &str = "urn:portico:region:";

impl Identity {
    /// The URI SANs that name this identity in a certificate.
    pub fn to_uris(&self) -> Vec<String> {
        match self {
            Identity::Connector { id, group } => {
                vec![
                    format!("{URN_CONNECTOR}{id}"),
                    format!("{URN_GROUP}{group}"),
                ]
            }
            Identity::Edge { id, region } => {
                vec![format!("{URN_EDGE}{id}"), format!("{URN_REGION}{region}")]
            }
        }
    }

    /// Reads an identity back from a certificate's URI SANs. Other SANs are
    /// ignored; a certificate naming two identities is refused.
    pub fn from_uris<'a>(uris: impl IntoIterator<Item = &'a str>) -> Option<Identity> {
        let (mut connector, mut group, mut edge, mut region) = (None, None, None, None);
        for uri in uris {
            if let Some(v) = uri.strip_prefix(URN_CONNECTOR) {
                connector = Some(ConnectorId::new(v).ok()?);
            } else if let Some(v) = uri.strip_prefix(URN_GROUP) {
                group = Some(GroupId::new(v).ok()?);
            } else if let Some(v) = uri.strip_prefix(URN_EDGE) {
                edge = Some(EdgeId::new(v).ok()?);
            } else if let Some(v) = uri.strip_prefix(URN_REGION) {
                region = Some(RegionId::new(v).ok()?);
            }
        }
        match (connector, group, edge, region) {
            (Some(id), Some(group), None, None) => Some(Identity::Connector { id, group }),
            (None, None, Some(id), Some(region)) => Some(Identity::Edge { id, region }),
            _ => None,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Connector { id, group } => write!(f, "connector {id} (group {group})"),
            Identity::Edge { id, region } => write!(f, "edge {id} (region {region})"),
        }
    }
}

/// A join token as the admin hands it out: `pt1.<id>.<secret>.<ca-sha256>`.
///
/// The last part pins the router's CA, so a connector that holds only the
/// token can verify the router on its very first connection.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public part, used to find the token; 16 hex digits.
    pub id: String,
    /// Secret part; the router stores only its SHA-256.
    pub secret: String,
    /// SHA-256 of the router CA certificate (DER), 64 hex digits.
    pub ca_sha256: String,
}

/// Why a join token string cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed join token: expected pt1.<id>.<secret>.<ca-sha256> as printed by `portico token create`")]
pub struct MalformedToken;

impl std::str::FromStr for JoinToken {
    type Err = MalformedToken;
    fn from_str(s: &str) -> Result<Self, MalformedToken> {
        let mut parts = s.trim().split('.');
        let (Some("pt1"), Some(id), Some(secret), Some(pin), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(MalformedToken);
        };
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(id, 16) || !hex(secret, 32) || !hex(pin, 64) {
            return Err(MalformedToken);
        }
        Ok(JoinToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ca_sha256: pin.to_ascii_lowercase(),
        })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pt1.{}.{}.{}", self.id, self.secret, self.ca_sha256)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({}, ***)", self.id)
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// A stable machine-readable kind: `invalid`, `wrong_kind`,
    /// `wrong_region`, `unauthorized`, `revoked`, `not_found`, `conflict`,
    /// `rate_limited`, `internal`.
    pub error: String,
    /// The request field at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What is wrong, for a person.
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{} ({}): {}", self.error, field, self.message),
            None => write!(f, "{}: {}", self.error, self.message),
        }
    }
}

// ---- enrollment and certificates ----

/// `POST /v1/enroll`: trade a join token and a CSR for a certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The join token string (`pt1.…`).
    pub token: String,
    /// A PKCS#10 CSR in PEM. Only its public key is used: the router, not
    /// the CSR, decides every name in the certificate.
    pub csr_pem: String,
    /// The enrolling machine's host name, for listings.
    pub host: String,
    /// The enrolling software's version.
    pub version: String,
    /// What the caller enrolls as. The router refuses a token of another
    /// kind before using it (400 `wrong_kind`), so the token stays good for
    /// the component it was made for. Older agents leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<EnrollKind>,
    /// The region an edge is started in (`portico edge --region`). The
    /// router refuses an edge token of another region before using it (400
    /// `wrong_region`). Left out when the edge takes the token's region, and
    /// by connectors and older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<RegionId>,
}

/// What a join token enrolls, and what an agent enrolls as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollKind {
    Connector,
    Edge,
}

impl fmt::Display for EnrollKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EnrollKind::Connector => "connector",
            EnrollKind::Edge => "edge",
        })
    }
}

/// A signed certificate and the CA that signed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertResponse {
    pub cert_pem: String,
    pub ca_pem: String,
    /// Expiry, in seconds since the Unix epoch.
    pub not_after: u64,
}

/// The answer to `POST /v1/enroll`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub identity: Identity,
    #[serde(flatten)]
    pub cert: CertResponse,
}

/// `POST /v1/renew` and `POST /v1/edge/public-cert`: a CSR, authenticated by
/// the caller's current client certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsrRequest {
    pub csr_pem: String,
}

// ---- admin resources ----

/// A region: a set of edges, as `GET /v1/regions` lists it. `default`
/// always exists; one router serves every region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub id: RegionId,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// Its edges (deleted ones left out), in the order they enrolled.
    pub edges: Vec<RegionEdge>,
    /// How many distinct connectors hold tunnels to its edges, by the
    /// edges' latest fresh reports: a connector attached to two edges of
    /// the region counts once.
    pub connectors: u32,
}

/// One edge of a [`Region`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionEdge {
    pub id: EdgeId,
    /// As `GET /v1/edges` says it.
    pub status: Status,
    /// Tunnels attached to it at its last report: its load.
    pub tunnels: u32,
    /// Distinct connectors its latest fresh report lists (0 when the
    /// report is not fresh).
    pub connectors: u32,
    /// Seconds since the Unix epoch.
    pub last_seen: Option<u64>,
}

/// `POST /v1/regions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRegion {
    pub id: RegionId,
}

/// A connector group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub id: GroupId,
    /// `auto` or a region id.
    pub region: String,
    /// How many connectors are enrolled in it.
    pub connectors: u32,
}

/// `POST /v1/groups`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    pub id: GroupId,
    /// `auto` (the default) or a region id.
    #[serde(default)]
    pub region: Option<String>,
}

/// How long a backend may take to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendTimeout {
    /// 85 seconds.
    #[default]
    Default,
    /// 180 seconds.
    Long,
    /// An explicit number of seconds (1 to 3600).
    Seconds(u32),
}

impl BackendTimeout {
    pub const MAX_SECONDS: u32 = 3600;

    pub fn duration(self) -> Duration {
        match self {
            BackendTimeout::Default => Duration::from_secs(85),
            BackendTimeout::Long => Duration::from_secs(180),
            BackendTimeout::Seconds(s) => Duration::from_secs(u64::from(s)),
        }
    }
}

impl fmt::Display for BackendTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendTimeout::Default => f.write_str("default"),
            BackendTimeout::Long => f.write_str("long"),
            BackendTimeout::Seconds(s) => write!(f, "{s}"),
        }
    }
}

impl std::str::FromStr for BackendTimeout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "default" => Ok(BackendTimeout::Default),
            "long" => Ok(BackendTimeout::Long),
            n => match n.trim_end_matches('s').parse::<u32>() {
                Ok(secs) if (1..=BackendTimeout::MAX_SECONDS).contains(&secs) => {
                    Ok(BackendTimeout::Seconds(secs))
                }
                _ => Err(format!(
                    "backend timeout must be `default` (85 s), `long` (180 s) or 1 to {} seconds, not {s:?}",
                    BackendTimeout::MAX_SECONDS
                )),
            },
        }
    }
}

impl Serialize for BackendTimeout {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BackendTimeout::Seconds(n) => s.serialize_u32(*n),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for BackendTimeout {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Str(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Num(n) => n.to_string(),
            Raw::Str(s) => s,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

fn default_true() -> bool {
    true
}

/// How an app's users are let in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preauth {
    /// Anyone who reaches the edge reaches the app (it signs users in
    /// itself, if at all).
    #[default]
    Passthrough,
    /// The edge signs users in with the deployment's OpenID provider
    /// first; the app requires [`SIGN_IN_FEATURE`].
    Oidc,
}

impl Preauth {
    pub fn as_str(self) -> &'static str {
        match self {
            Preauth::Passthrough => "passthrough",
            Preauth::Oidc => "oidc",
        }
    }

    /// What an app's required features say.
    pub fn of_features<S: AsRef<str>>(features: &[S]) -> Preauth {
        if features.iter().any(|f| f.as_ref() == SIGN_IN_FEATURE) {
            Preauth::Oidc
        } else {
            Preauth::Passthrough
        }
    }
}

impl fmt::Display for Preauth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Preauth {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "passthrough" => Ok(Preauth::Passthrough),
            "oidc" => Ok(Preauth::Oidc),
            _ => Err(format!(
                "{s:?} is not a pre-authentication: oidc or passthrough"
            )),
        }
    }
}

fn is_true(v: &bool) -> bool {
    *v
}

/// Who may use an app that signs users in (Entra's "assignment required"):
/// every signed-in user, or the users and groups listed. Anyone else gets
/// 403 `NotAssigned`. An app that signs users in must assign someone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// Every user the provider signs in.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub everyone: bool,
    /// Users, each matched against the `sub` claim, or the `email` claim
    /// (ignoring case) when the provider has verified it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Groups, matched exactly against the deployment's groups claim.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// The most users plus groups one app may assign.
pub const MAX_ASSIGNED: usize = 1000;
/// The longest user or group name in an assignment, in bytes.
pub const MAX_ASSIGNED_NAME_LEN: usize = 256;

impl Assignment {
    /// Whether it lets no one in.
    pub fn is_nobody(&self) -> bool {
        !self.everyone && self.users.is_empty() && self.groups.is_empty()
    }

    /// Whether the user with these claims may use the app. `email` is
    /// given only when the provider verified it.
    pub fn admits<'a>(
        &self,
        sub: &str,
        email: Option<&str>,
        mut groups: impl Iterator<Item = &'a str>,
    ) -> bool {
        self.everyone
            || self
                .users
                .iter()
                .any(|u| u == sub || email.is_some_and(|e| e.eq_ignore_ascii_case(u)))
            || groups.any(|g| self.groups.iter().any(|a| a == g))
    }

    /// Checks sizes and names; the message says what to change.
    pub fn check(&self) -> Result<(), String> {
        let count = self.users.len() + self.groups.len();
        if count > MAX_ASSIGNED {
            return Err(format!(
                "an app may assign at most {MAX_ASSIGNED} users and groups, not {count}"
            ));
        }
        if self.everyone && count > 0 {
            return Err("assign either everyone or users and groups, not both".into());
        }
        for (kind, list) in [("user", &self.users), ("group", &self.groups)] {
            let mut seen = std::collections::HashSet::new();
            for name in list {
                if name.is_empty() || name.len() > MAX_ASSIGNED_NAME_LEN {
                    return Err(format!(
                        "a {kind} name must be 1 to {MAX_ASSIGNED_NAME_LEN} bytes long"
                    ));
                }
                if name.chars().any(char::is_control) {
                    return Err(format!("{kind} {name:?} has a control character"));
                }
                if !seen.insert(name) {
                    return Err(format!("{kind} {name:?} is assigned twice"));
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for Assignment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.everyone {
            return f.write_str("everyone");
        }
        if self.is_nobody() {
            return f.write_str("nobody");
        }
        let mut first = true;
        for (kind, list) in [("user", &self.users), ("group", &self.groups)] {
            for name in list {
                if !first {
                    f.write_str(", ")?;
                }
                first = false;
                write!(f, "{kind}:{name}")?;
            }
        }
        Ok(())
    }
}

/// The claims an app may map to headers: what the edge keeps of a
/// signed-in user. `groups` is sent comma-separated.
pub const IDENTITY_CLAIM_NAMES: &[&str] = &["sub", "email", "name", "preferred_username", "groups"];
/// The most identity headers one app may map.
pub const MAX_IDENTITY_HEADERS: usize = 16;
/// The header that carries the edge's signed assertion of the user.
pub const ASSERTION_HEADER: &str = "x-portico-jwt-assertion";

/// Checks an identity header mapping: header names are valid and not
/// hop-by-hop or Portico's own, each claim is one the edge keeps.
pub fn check_identity_headers(map: &BTreeMap<String, String>) -> Result<(), String> {
    if map.len() > MAX_IDENTITY_HEADERS {
        return Err(format!(
            "an app may map at most {MAX_IDENTITY_HEADERS} identity headers, not {}",
            map.len()
        ));
    }
    for (header, claim) in map {
        let valid = !header.is_empty()
            && header.len() <= 64
            && header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            return Err(format!(
                "header name {header:?} must be 1 to 64 letters, digits and '-'"
            ));
        }
        let lower = header.to_ascii_lowercase();
        if lower.starts_with("x-portico-")
            || matches!(
                lower.as_str(),
                "host"
                    | "connection"
                    | "content-length"
                    | "transfer-encoding"
                    | "te"
                    | "trailer"
                    | "upgrade"
                    | "keep-alive"
                    | "cookie"
                    | "authorization"
                    | "x-forwarded-for"
                    | "x-forwarded-proto"
                    | "x-forwarded-host"
                    | "x-request-id"
            )
        {
            return Err(format!(
                "header {header:?} is set by Portico or the protocol; pick another name"
            ));
        }
        if !IDENTITY_CLAIM_NAMES.contains(&claim.as_str()) {
            return Err(format!(
                "claim {claim:?} is not one the edge keeps: {}",
                IDENTITY_CLAIM_NAMES.join(", ")
            ));
        }
    }
    let mut lower: Vec<String> = map.keys().map(|h| h.to_ascii_lowercase()).collect();
    lower.sort();
    if let Some(w) = lower.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("header {:?} is mapped twice", w[0]));
    }
    Ok(())
}

/// `POST /v1/apps`: what an admin publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    pub id: AppId,
    /// The external host. Defaults to `<id>.<apps domain>`; under the apps
    /// domain, or in a custom domain when its CNAME chain reaches
    /// `<id>.<apps domain>` (checked by the router when the host is set).
    #[serde(default)]
    pub external_host: Option<String>,
    /// `http://` or `https://` host, optional port and optional path.
    pub internal_url: String,
    #[serde(default = "GroupId::default_group")]
    pub connector_group: GroupId,
    #[serde(default)]
    pub backend_timeout: BackendTimeout,
    /// Verify the backend's TLS certificate (https internal URLs).
    #[serde(default = "default_true")]
    pub validate_backend_tls: bool,
    /// Translate internal URLs to external ones in the backend's response
    /// headers (`Location`, `Content-Location`, `Refresh`, `Set-Cookie`'s
    /// `Domain` and `Path`). Left out of the JSON when on, so that a
    /// request that keeps the default reads on an older router too.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub translate_headers: bool,
    /// Translate internal URLs to external ones in HTML and CSS response
    /// bodies, streamed. Left out of the JSON when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub translate_body: bool,
    /// Features an edge must implement to serve this app (see
    /// [`check_required_features`]); an edge that does not know one of them
    /// refuses the app rather than serve it without.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_features: Vec<String>,
    /// Whether the edge signs users in before they reach the app.
    #[serde(default)]
    pub preauth: Preauth,
    /// Who may use the app (it must sign users in; see [`Assignment`]).
    #[serde(default, skip_serializing_if = "Assignment::is_nobody")]
    pub assignment: Assignment,
    /// The signed-in user's claims the backend gets, header name → claim
    /// name (see [`IDENTITY_CLAIM_NAMES`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub identity_headers: BTreeMap<String, String>,
    /// Left out of the My Apps portal (it still works for its users).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hidden: bool,
    /// Maintenance mode: the edge answers every request with 503
    /// `Maintenance` (the branded page, `Retry-After`), before sign-in and
    /// without opening a connector stream. Left out of the JSON when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub maintenance: bool,
    /// The app's home page, where launchers (My Apps, `portico app list`)
    /// send users, as Entra's "homepage URL": a URL on the app's external
    /// host (`https://hr.apps.example.com/portal/`), a path under its
    /// external root (`/portal/`), or a URL under its internal URL, which
    /// is translated (`http://hr.corp/hr/portal/` for an app published
    /// from `http://hr.corp/hr/`). Anything else is refused. `None`: the
    /// external URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_page: Option<String>,
    /// Root certificates (PEM, at most [`MAX_BACKEND_CA_BYTES`]) the
    /// connector trusts for this app's https backend, in addition to the
    /// system roots and its own `--backend-ca` files: for a backend with a
    /// certificate from a private CA. Only `CERTIFICATE` blocks; a bundle
    /// without one, or with a private key, is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_ca_pem: Option<String>,
    /// The session cookie is `HttpOnly`, out of the page's scripts' reach
    /// (`preauth = oidc`). On by default; left out of the JSON when on.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub http_only: bool,
    /// The session cookie outlives the browser (`Max-Age` = what is left
    /// of the session's lifetime) instead of ending when it closes. Off by
    /// default; left out of the JSON when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub persistent: bool,
    /// The app's own client of the deployment's OpenID provider
    /// (`preauth = oidc`; checked by [`check_oidc_client_id`]), with
    /// [`AppSpec::oidc_client_secret`]: its users sign in through it
    /// instead of the deployment's client. `None`: the deployment's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_client_id: Option<String>,
    /// The secret of [`AppSpec::oidc_client_id`] (given with it, or alone
    /// to replace the secret of the client the app has). Never listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_client_secret: Option<ClientSecret>,
}

impl AppSpec {
    /// App `id` at `internal_url` in the `Default` group, every other
    /// setting at the API's default (what a body naming only these two
    /// gets).
    pub fn new(id: AppId, internal_url: impl Into<String>) -> AppSpec {
        AppSpec {
            id,
            external_host: None,
            internal_url: internal_url.into(),
            connector_group: GroupId::default_group(),
            backend_timeout: BackendTimeout::default(),
            validate_backend_tls: true,
            translate_headers: true,
            translate_body: false,
            required_features: Vec::new(),
            preauth: Preauth::default(),
            assignment: Assignment::default(),
            identity_headers: BTreeMap::new(),
            hidden: false,
            maintenance: false,
            home_page: None,
            backend_ca_pem: None,
            http_only: true,
            persistent: false,
            oidc_client_id: None,
            oidc_client_secret: None,
        }
    }
}

/// The largest [`AppSpec::backend_ca_pem`], in bytes: a root and a few
/// intermediates take a few KiB, and the whole request to the router must
/// stay within its 64 KiB body limit.
pub const MAX_BACKEND_CA_BYTES: usize = 32 * 1024;

/// `PATCH /v1/apps/{id}`: the fields to change, each optional; the others
/// keep their values. The result is checked as `POST /v1/apps` checks a new
/// app, and a field this router does not know is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector_group: Option<GroupId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_timeout: Option<BackendTimeout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validate_backend_tls: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translate_headers: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translate_body: Option<bool>,
    /// Replaces the whole list (`[]` clears it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_features: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preauth: Option<Preauth>,
    /// Replaces the whole assignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment: Option<Assignment>,
    /// Replaces the whole mapping (`{}` clears it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_headers: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<bool>,
    /// A new home page; `""` goes back to the external URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_page: Option<String>,
    /// A new backend CA bundle; `""` removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// A new client id of the app's own OpenID client (with
    /// `oidc_client_secret`); `""` goes back to the deployment's client
    /// (and forgets the secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_client_id: Option<String>,
    /// A new secret of the app's own client: with a new
    /// `oidc_client_id`, or alone to replace the secret of the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_client_secret: Option<ClientSecret>,
}

impl AppPatch {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == AppPatch::default()
    }

    /// `spec` with the patch's fields put in.
    pub fn apply(self, mut spec: AppSpec) -> AppSpec {
        if let Some(v) = self.external_host {
            spec.external_host = Some(v);
        }
        if let Some(v) = self.internal_url {
            spec.internal_url = v;
        }
        if let Some(v) = self.connector_group {
            spec.connector_group = v;
        }
        if let Some(v) = self.backend_timeout {
            spec.backend_timeout = v;
        }
        if let Some(v) = self.validate_backend_tls {
            spec.validate_backend_tls = v;
        }
        if let Some(v) = self.translate_headers {
            spec.translate_headers = v;
        }
        if let Some(v) = self.translate_body {
            spec.translate_body = v;
        }
        if let Some(v) = self.required_features {
            spec.required_features = v;
        }
        if let Some(v) = self.preauth {
            spec.preauth = v;
        }
        if let Some(v) = self.assignment {
            spec.assignment = v;
        }
        if let Some(v) = self.identity_headers {
            spec.identity_headers = v;
        }
        if let Some(v) = self.hidden {
            spec.hidden = v;
        }
        if let Some(v) = self.maintenance {
            spec.maintenance = v;
        }
        if let Some(v) = self.home_page {
            spec.home_page = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = self.backend_ca_pem {
            spec.backend_ca_pem = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = self.http_only {
            spec.http_only = v;
        }
        if let Some(v) = self.persistent {
            spec.persistent = v;
        }
        match self.oidc_client_id {
            Some(id) if id.is_empty() => {
                spec.oidc_client_id = None;
                spec.oidc_client_secret = None;
            }
            Some(id) => {
                // Another client's secret is not this one's.
                if spec.oidc_client_id.as_deref() != Some(id.as_str()) {
                    spec.oidc_client_secret = None;
                }
                spec.oidc_client_id = Some(id);
            }
            None => {}
        }
        if let Some(v) = self.oidc_client_secret {
            spec.oidc_client_secret = Some(v);
        }
        spec
    }
}

/// A published app, as stored and distributed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    pub id: AppId,
    /// Lower-case host name, without port.
    pub external_host: String,
    /// `https://<external_host>/`, plus the edge's port when not 443.
    pub external_url: String,
    pub internal_url: String,
    pub connector_group: GroupId,
    pub backend_timeout: BackendTimeout,
    pub validate_backend_tls: bool,
    /// Translate internal URLs in response headers (on for an app stored
    /// before the setting existed).
    #[serde(default = "default_true")]
    pub translate_headers: bool,
    /// Translate internal URLs in HTML and CSS response bodies.
    #[serde(default)]
    pub translate_body: bool,
    /// Features an edge must implement to serve this app; empty for most.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_features: Vec<String>,
    /// Whether the edge signs users in first (it then requires
    /// [`SIGN_IN_FEATURE`] too).
    #[serde(default)]
    pub preauth: Preauth,
    /// Who may use it, when it signs users in.
    #[serde(default, skip_serializing_if = "Assignment::is_nobody")]
    pub assignment: Assignment,
    /// Header name → claim name, for the backend (the connector sets them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub identity_headers: BTreeMap<String, String>,
    /// Left out of the My Apps portal.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hidden: bool,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// The uploaded certificate edges present for `external_host`
    /// ([`pick_certificate`]); `None` when none covers it (a host under the
    /// apps domain then gets the router-issued wildcard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<AppCertificate>,
    /// Maintenance mode: the edge answers 503 `Maintenance` to every
    /// request (off for an app stored or sent before the setting existed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub maintenance: bool,
    /// Where to send a user who opens the app (My Apps links here): its
    /// home page under the external URL, or the external URL itself.
    /// Empty from a router older than the setting: use `external_url`.
    #[serde(default)]
    pub home_url: String,
    /// SHA-256 (hex) of the app's backend CA bundle as stored, when it has
    /// one; the bundle itself goes only to its group's connectors
    /// ([`ConnectorConfig::backend_cas`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_ca_sha256: Option<String>,
    /// The session cookie is `HttpOnly` (on for an app stored before the
    /// setting existed).
    #[serde(default = "default_true")]
    pub http_only: bool,
    /// The session cookie outlives the browser.
    #[serde(default)]
    pub persistent: bool,
    /// The app's own OpenID client, when it has one (its secret goes only
    /// to edges, in [`SignInSettings::clients`]); `None`: its users sign
    /// in through the deployment's client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_client_id: Option<String>,
}

/// The part of a wildcard app's external host its `*` stands before:
/// `corp.apps.example.com` for `*.corp.apps.example.com`; `None` for an
/// app of one exact host.
pub fn wildcard_suffix(external_host: &str) -> Option<&str> {
    external_host.strip_prefix("*.")
}

/// The label a request's `host` (lower-case, without port) puts in the
/// place of the `*` of the wildcard host `*.<suffix>`: `hr` for
/// `hr.corp.apps.test` under `corp.apps.test`. A wildcard stands for
/// exactly one DNS label, as in a TLS certificate (RFC 6125 §6.4.3), so
/// the edge's `*.<suffix>` certificate covers every host it routes; the
/// label must be one LDH label ([`is_ldh_label`]). `None` otherwise.
pub fn wildcard_label<'a>(host: &'a str, suffix: &str) -> Option<&'a str> {
    let label = host.strip_suffix(suffix)?.strip_suffix('.')?;
    is_ldh_label(label).then_some(label)
}

/// Whether `label` is one DNS label of letters, digits and `-` (not at
/// either end), 1 to 63 bytes: what a wildcard's label may be, and so what
/// an internal host's `*` may be replaced with.
pub fn is_ldh_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Which uploaded certificate serves an app's host, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppCertificate {
    /// The certificate's id ([`Certificate::id`]).
    pub id: String,
    /// Its expiry, in seconds since the Unix epoch.
    pub not_after: u64,
}

/// The most features one app may require.
pub const MAX_REQUIRED_FEATURES: usize = 16;
/// The longest feature name, in bytes.
pub const MAX_FEATURE_NAME_LEN: usize = 32;

/// Why a list of required features is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FeatureError {
    #[error("an app may require at most {max} features, not {count}")]
    TooMany { count: usize, max: usize },
    #[error("a feature name must not be empty")]
    Empty,
    #[error("feature name {name:?} is {len} bytes long, the limit is {max}")]
    TooLong {
        name: String,
        len: usize,
        max: usize,
    },
    #[error("feature name {name:?} may only contain lower-case letters, digits and '-'")]
    InvalidChar { name: String },
    #[error("feature {name:?} is listed twice")]
    Duplicate { name: String },
}

/// Checks one feature name: 1 to [`MAX_FEATURE_NAME_LEN`] bytes of
/// `[a-z0-9-]`.
pub fn check_feature_name(name: &str) -> Result<(), FeatureError> {
    if name.is_empty() {
        return Err(FeatureError::Empty);
    }
    if name.len() > MAX_FEATURE_NAME_LEN {
        return Err(FeatureError::TooLong {
            name: name.to_owned(),
            len: name.len(),
            max: MAX_FEATURE_NAME_LEN,
        });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(FeatureError::InvalidChar {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Checks an app's `required_features`: at most
/// [`MAX_REQUIRED_FEATURES`] valid names, none twice. Whether an edge
/// knows a name is the edge's business, not this check's: an app may
/// require a feature that only newer edges implement.
pub fn check_required_features(features: &[String]) -> Result<(), FeatureError> {
    if features.len() > MAX_REQUIRED_FEATURES {
        return Err(FeatureError::TooMany {
            count: features.len(),
            max: MAX_REQUIRED_FEATURES,
        });
    }
    for (i, name) in features.iter().enumerate() {
        check_feature_name(name)?;
        if features[..i].contains(name) {
            return Err(FeatureError::Duplicate { name: name.clone() });
        }
    }
    Ok(())
}

/// What a join token may enroll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenScope {
    /// A connector in this group.
    Connector { group: GroupId },
    /// An edge in this region.
    Edge { region: RegionId },
}

impl TokenScope {
    /// What a token of this scope enrolls.
    pub fn kind(&self) -> EnrollKind {
        match self {
            TokenScope::Connector { .. } => EnrollKind::Connector,
            TokenScope::Edge { .. } => EnrollKind::Edge,
        }
    }

    /// How to use a token of this scope, and how to make one of the other
    /// kind, for a person who gave it to the wrong command.
    pub fn wrong_kind_hint(&self) -> String {
        match self {
            TokenScope::Connector { group } => format!(
                "this join token enrolls a connector (group {group}), not an edge: \
                 start `portico connector --token …` with it, or create an edge token \
                 with `portico token create --edge`"
            ),
            TokenScope::Edge { region } => format!(
                "this join token enrolls an edge (region {region}), not a connector: \
                 start `portico edge --token …` with it, or create a connector token \
                 with `portico token create --group <group>`"
            ),
        }
    }
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub scope: TokenScope,
    /// Lifetime in seconds; default 3600, at most 7 days.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// The answer to `POST /v1/tokens`. `token` is shown once and never stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    pub id: String,
    pub token: String,
    pub scope: TokenScope,
    pub expires_at: u64,
}

impl fmt::Debug for TokenCreated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCreated")
            .field("id", &self.id)
            .field("token", &"***")
            .field("scope", &self.scope)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Where a join token stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TokenStatus {
    /// It can still enroll.
    Unused,
    /// It enrolled a connector or an edge.
    Used,
    /// It expired unused.
    Expired,
    /// An admin revoked it unused.
    Revoked,
}

impl fmt::Display for TokenStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenStatus::Unused => "unused",
            TokenStatus::Used => "used",
            TokenStatus::Expired => "expired",
            TokenStatus::Revoked => "revoked",
        })
    }
}

/// A join token as `GET /v1/tokens` lists it. The secret is never shown
/// again: the router keeps only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub scope: TokenScope,
    pub status: TokenStatus,
    /// Seconds since the Unix epoch, as every time here.
    pub created_at: u64,
    pub expires_at: u64,
    pub used_at: Option<u64>,
    pub revoked_at: Option<u64>,
}

/// Whether a connector or edge is up, as the edges' reports say: a
/// connector is active while the latest fresh report of at least one edge
/// lists it, an edge while its own latest report is fresh. A report is
/// fresh for [`REPORT_FRESH_INTERVALS`] × [`EDGE_REPORT_INTERVAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Active,
    Inactive,
    /// An edge that is shutting down: it has left the DNS answers, the
    /// presence and the connectors' edge lists, and finishes what it
    /// serves.
    Draining,
}

/// How often an edge posts an [`EdgeReport`] when nothing changes (it also
/// posts one as soon as a tunnel comes or goes).
pub const EDGE_REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// How many report intervals an edge's latest report counts for.
pub const REPORT_FRESH_INTERVALS: u32 = 3;

/// An enrolled connector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connector {
    pub id: ConnectorId,
    pub group: GroupId,
    pub version: String,
    pub host: String,
    /// The address the edges saw it connect from.
    pub address_seen: Option<String>,
    /// The edges it holds tunnels to.
    pub edges: Vec<EdgeId>,
    pub tunnels: u32,
    pub status: Status,
    /// Seconds since the Unix epoch.
    pub last_seen: Option<u64>,
    pub enrolled_at: u64,
    /// Hex serial of its current certificate.
    pub cert_serial: String,
    pub cert_not_after: u64,
    /// Its region choice, as its latest [`ConnectorReport`] said (`None`
    /// before the first, and from connectors that do not report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<RegionChoice>,
    /// When that report arrived (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_reported_at: Option<u64>,
}

/// The most regions a [`ConnectorReport`] may list.
pub const MAX_REPORT_REGIONS: usize = 64;
/// The longest [`RegionMove::reason`], in bytes.
pub const MAX_MOVE_REASON: usize = 512;
/// How often a connector posts a [`ConnectorReport`] when nothing changes
/// (it also posts one as soon as its home region or degraded state changes).
pub const CONNECTOR_REPORT_INTERVAL: Duration = Duration::from_secs(30);

/// `POST /v1/connector/report`: how a connector chose its region, sent by
/// the connector with its certificate. The router keeps the latest with
/// the connector's record, for `portico connector list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorReport {
    pub region: RegionChoice,
}

/// A connector's home region and what it measured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionChoice {
    /// The region the group is pinned to; `None` for `auto`.
    pub pinned: Option<RegionId>,
    /// Where its tunnels go; `None` while it has not chosen yet.
    pub home: Option<RegionId>,
    /// Fewer than two edges of the home region are usable: one edge's
    /// failure takes every tunnel down.
    pub degraded: bool,
    /// Every region it knows of, by id.
    pub regions: Vec<RegionRtt>,
    /// The latest change of home (the first choice included).
    pub last_move: Option<RegionMove>,
    /// Changes of home since the connector started (the first choice not
    /// counted).
    pub moves: u64,
}

/// One region as a connector measures it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionRtt {
    pub region: RegionId,
    /// Its round-trip time in microseconds (the minimum over the window
    /// of its best two edges); `None` when no probe answered within it.
    pub rtt_micros: Option<u64>,
    /// Its edges in the connector's config.
    pub edges: u32,
    /// Those not given up on (answering probes, or carrying traffic).
    pub usable_edges: u32,
}

/// A change of a connector's home region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionMove {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// `None` for the first choice.
    pub from: Option<RegionId>,
    pub to: RegionId,
    /// Why, for people: `us-east 12 ms vs eu-west 85 ms: 73 ms and 86% nearer`.
    pub reason: String,
}

/// An enrolled edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    pub id: EdgeId,
    pub region: RegionId,
    pub host: String,
    pub version: String,
    /// Where connectors dial it (host:port, UDP).
    pub tunnel_addr: Option<String>,
    /// Where users reach it (host:port, TCP).
    pub public_addr: Option<String>,
    pub status: Status,
    pub last_seen: Option<u64>,
    /// Tunnels attached to it at its last report.
    pub tunnels: u32,
    pub enrolled_at: u64,
}

// ---- distribution to edges and connectors ----

/// What every edge needs to route: pushed through a long-poll watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeConfig {
    /// Grows with every change; a watch asks for anything newer.
    pub version: u64,
    /// When the router's store made this version (unix ms; 0 when unknown):
    /// the edge measures how long the change took to reach it.
    #[serde(default)]
    pub changed_at_ms: u64,
    pub region: RegionId,
    /// For example `apps.example.com`; app hosts lie under it.
    pub apps_domain: String,
    pub apps: Vec<App>,
    pub groups: Vec<GroupId>,
    /// Connectors whose certificates must no longer be accepted; their
    /// tunnels are closed at once.
    pub revoked: Vec<ConnectorId>,
    /// Which edges hold tunnels of which group (from the edges' fresh
    /// reports, kept in the router's store): where this edge forwards a
    /// request over the mesh when it holds no tunnel of the app's group.
    #[serde(default)]
    pub presence: Vec<GroupPresence>,
    /// Every other live edge, for the mesh.
    #[serde(default)]
    pub peers: Vec<PeerEdge>,
    /// How apps with `preauth = oidc` sign their users in; `None` when the
    /// router has no OpenID provider (such apps are then refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_in: Option<SignInSettings>,
    /// The uploaded certificates (custom domains), at most
    /// [`MAX_CERTIFICATES`]: the edge presents the one
    /// [`pick_certificate`] chooses for a handshake's SNI, and its own
    /// public certificate otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<EdgeCertificate>,
    /// Sessions signed out (`/.portico/sign_out` at any edge) that are
    /// not over yet: those stored after the version the edge asked
    /// `after` (every one when it asked after 0). A delta: the edge adds
    /// them to the ones it holds, and forgets each at its `until`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signed_out: Vec<SignedOut>,
    /// Users an admin signed out of every session (`portico session
    /// revoke`), as [`EdgeConfig::signed_out`]: a delta since `after`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signed_out_users: Vec<SignedOutUser>,
}

// ---- sign-out and one-time handoff codes, across edges ----

/// The most sessions a router keeps signed out at once; past it (all of
/// them still live) it refuses more with 503 and the edges retry.
pub const MAX_SIGNED_OUT: usize = 200_000;
/// The most sessions in one [`SignOuts`] report.
pub const MAX_SIGN_OUTS_PER_REPORT: usize = 256;

/// A session id: what an edge seals in a session cookie (base64url, 16
/// to 64 characters).
pub fn valid_session_id(sid: &str) -> bool {
    (16..=64).contains(&sid.len())
        && sid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One signed-out session.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedOut {
    /// The session's id ([`valid_session_id`]).
    pub sid: String,
    /// When the session would have ended anyway (unix seconds): after
    /// it, no edge needs to remember it.
    pub until: u64,
}

/// `POST /v1/edge/sign-outs`: sessions an edge's users signed out of, at
/// most [`MAX_SIGN_OUTS_PER_REPORT`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignOuts {
    pub sessions: Vec<SignedOut>,
}

/// A user whose sessions begun up to `before` are over, at every edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedOutUser {
    /// Matched as an assignment's user entry is: the session's `sub`, or
    /// its email when the provider said it is verified.
    pub user: String,
    /// Sessions that began at or before it (unix seconds) are refused.
    pub before: u64,
    /// When the last of them would have ended anyway (unix seconds).
    pub until: u64,
}

/// The longest user name [`RevokeSessions`] takes, in bytes.
pub const MAX_USER_LEN: usize = 256;

/// `POST /v1/sessions/revoke` (`portico session revoke USER`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeSessions {
    /// A `sub`, or a verified email (as in an assignment).
    pub user: String,
}

/// The answer to [`RevokeSessions`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionsRevoked {
    pub user: String,
    /// Sessions of the user begun at or before it (unix seconds) are
    /// refused at every edge, within a config round trip.
    pub before: u64,
}

/// `POST /v1/edge/handoffs`: an edge turned a one-time handoff code into a
/// session; the router answers 409 when any edge did so before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffUse {
    /// The code's id ([`valid_session_id`]).
    pub jti: String,
    /// When the code expires (unix seconds).
    pub until: u64,
}

// ---- uploaded certificates (custom domains) ----

/// The most certificates a router keeps (and an edge reads).
pub const MAX_CERTIFICATES: usize = 256;
/// The longest PEM chain accepted, in bytes.
pub const MAX_CERT_CHAIN_PEM: usize = 32 * 1024;
/// The most certificates in one chain (leaf included).
pub const MAX_CHAIN_CERTS: usize = 8;
/// The longest PEM private key accepted, in bytes.
pub const MAX_CERT_KEY_PEM: usize = 16 * 1024;
/// The most hosts one upload may name.
pub const MAX_UPLOAD_HOSTS: usize = 64;

/// `POST /v1/certificates`: a certificate for hosts of custom domains.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateUpload {
    /// The leaf first, then its intermediates (PEM).
    pub chain_pem: String,
    /// The leaf's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
    /// Hosts the certificate must cover (at least one): an upload that
    /// leaves one out is refused. Once stored, it serves every host it
    /// covers, listed here or not.
    pub hosts: Vec<String>,
}

impl fmt::Debug for CertificateUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateUpload")
            .field("chain_pem", &format_args!("{} bytes", self.chain_pem.len()))
            .field("key_pem", &"***")
            .field("hosts", &self.hosts)
            .finish()
    }
}

/// An uploaded certificate as listed (never its key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// The first 16 hex digits of the leaf's SHA-256: uploading the same
    /// leaf again replaces it.
    pub id: String,
    /// The DNS names of its subjectAltName (`*.corp.example.com` covers
    /// one label).
    pub names: Vec<String>,
    /// The leaf's issuer, as a distinguished name.
    pub issuer: String,
    /// Validity, in seconds since the Unix epoch.
    pub not_before: u64,
    pub not_after: u64,
    pub uploaded_at: u64,
}

/// An uploaded certificate as edges get it (over their mutual TLS).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeCertificate {
    pub id: String,
    /// As [`Certificate::names`], lower case.
    pub names: Vec<String>,
    pub not_after: u64,
    pub chain_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for EdgeCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeCertificate")
            .field("id", &self.id)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .field("key_pem", &"***")
            .finish()
    }
}

/// Whether the certificate name `pattern` covers `host` (both compared
/// case-insensitively, without a final dot): equal, or a wildcard
/// `*.rest` and `host` is one more label in front of `rest` (RFC 6125
/// 6.4.3: `*.corp.example.com` covers `hr.corp.example.com`, not
/// `corp.example.com` nor `a.hr.corp.example.com`).
pub fn name_covers(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_end_matches('.');
    let host = host.trim_end_matches('.');
    if let Some(rest) = pattern.strip_prefix("*.") {
        match host.split_once('.') {
            Some((label, tail)) => {
                !label.is_empty() && !rest.is_empty() && tail.eq_ignore_ascii_case(rest)
            }
            None => false,
        }
    } else {
        !pattern.is_empty() && pattern.eq_ignore_ascii_case(host)
    }
}

/// Which of `certs` (each its names and expiry) serves `host`, by index:
/// among those with a name that covers it, one that names it exactly
/// before a wildcard, then the one that expires last (a renewed
/// certificate takes over from the old one as soon as it is uploaded).
/// Expired ones are chosen too, when nothing else covers the host: a
/// browser then says it expired, which tells more than a wrong name.
pub fn pick_certificate<'a, N>(
    certs: impl IntoIterator<Item = (&'a [N], u64)>,
    host: &str,
) -> Option<usize>
where
    N: AsRef<str> + 'a,
{
    let mut best: Option<(usize, (bool, u64))> = None;
    for (i, (names, not_after)) in certs.into_iter().enumerate() {
        let exact = names
            .iter()
            .any(|n| !n.as_ref().starts_with("*.") && name_covers(n.as_ref(), host));
        let covers = exact || names.iter().any(|n| name_covers(n.as_ref(), host));
        if !covers {
            continue;
        }
        let rank = (exact, not_after);
        if best.is_none_or(|(_, b)| rank > b) {
            best = Some((i, rank));
        }
    }
    best.map(|(i, _)| i)
}

/// The deployment's OpenID provider and session keys, as every edge gets
/// them (over the edge's mutual TLS to the router).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignInSettings {
    /// The provider's issuer URL (discovery is at
    /// `<issuer>/.well-known/openid-configuration`).
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    /// The keys that seal sessions and sign-in state: the first seals,
    /// all open (a rotated key keeps opening what it sealed).
    pub keys: Vec<SessionKey>,
    /// How long a session lasts from its sign-in, in seconds.
    pub session_lifetime_secs: u64,
    /// The claim that lists a user's groups (default `groups`).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// The keys edges sign identity assertions with, the signing one
    /// first; the router's `/.well-known/jwks.json` publishes their public
    /// halves. Empty from an older router: no assertion is made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assertion_keys: Vec<AssertionKey>,
    /// How long a session lasts without a request, in seconds; 0 (a
    /// router from before the setting): no idle limit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub session_idle_secs: u64,
    /// The apps with a client of their own ([`AppSpec::oidc_client_id`]):
    /// their sign-ins use it, every other's the deployment's
    /// `client_id`. Empty from an older router.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<AppClient>,
}

/// An app's own client of the deployment's OpenID provider, as edges get
/// it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppClient {
    pub app: AppId,
    pub client_id: String,
    pub client_secret: ClientSecret,
}

/// An OpenID client secret: `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientSecret(String);

impl ClientSecret {
    pub fn new(secret: impl Into<String>) -> ClientSecret {
        ClientSecret(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The longest OpenID client id an app may have, in bytes.
pub const MAX_OIDC_CLIENT_ID: usize = 255;
/// The longest OpenID client secret an app may have, in bytes.
pub const MAX_OIDC_CLIENT_SECRET: usize = 512;

/// Checks an app's OpenID client id: 1 to [`MAX_OIDC_CLIENT_ID`] bytes of
/// printable ASCII without spaces (RFC 6749's client ids, as providers
/// issue them: Entra's GUIDs, Okta's and Keycloak's names).
pub fn check_oidc_client_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_OIDC_CLIENT_ID {
        return Err(format!(
            "a client id must be 1 to {MAX_OIDC_CLIENT_ID} bytes long, not {}",
            id.len()
        ));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "client id {id:?} may hold only printable ASCII without spaces"
        ));
    }
    Ok(())
}

/// Checks an app's OpenID client secret: 1 to [`MAX_OIDC_CLIENT_SECRET`]
/// bytes of printable ASCII without spaces. The message never shows it.
pub fn check_oidc_client_secret(secret: &ClientSecret) -> Result<(), String> {
    let s = secret.expose();
    if s.is_empty() || s.len() > MAX_OIDC_CLIENT_SECRET {
        return Err(format!(
            "a client secret must be 1 to {MAX_OIDC_CLIENT_SECRET} bytes long, not {}",
            s.len()
        ));
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "the client secret may hold only printable ASCII without spaces (is the file's first line the secret alone?)"
                .into(),
        );
    }
    Ok(())
}

fn default_groups_claim() -> String {
    "groups".to_owned()
}

/// An ES256 (P-256) key for identity assertions.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionKey {
    /// The JWT `kid`.
    pub kid: String,
    /// The private key, PKCS#8 DER in base64url without padding.
    pub pkcs8: String,
    /// The public key's `x` and `y` coordinates, base64url (as in a JWK).
    pub x: String,
    pub y: String,
}

impl AssertionKey {
    /// The public half as a JWK.
    pub fn public_jwk(&self) -> PublicJwk {
        PublicJwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            alg: "ES256".into(),
            use_: "sig".into(),
            kid: self.kid.clone(),
            x: self.x.clone(),
            y: self.y.clone(),
        }
    }
}

/// `GET /.well-known/jwks.json` (router, and the auth host of every edge):
/// the keys identity assertions are signed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<PublicJwk>,
}

/// An EC public key as a JWK (RFC 7517/7518).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicJwk {
    pub kty: String,
    pub crv: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub use_: String,
    pub kid: String,
    pub x: String,
    pub y: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl fmt::Debug for SignInSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignInSettings")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("client_secret", &"***")
            .field("keys", &self.keys.iter().map(|k| k.id).collect::<Vec<_>>())
            .field("session_lifetime_secs", &self.session_lifetime_secs)
            .field("groups_claim", &self.groups_claim)
            .field(
                "assertion_keys",
                &self
                    .assertion_keys
                    .iter()
                    .map(|k| &k.kid)
                    .collect::<Vec<_>>(),
            )
            .field("session_idle_secs", &self.session_idle_secs)
            .field("clients", &self.clients)
            .finish()
    }
}

/// One session key: an id (carried in every token it seals) and 32 random
/// bytes, base64url without padding.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionKey {
    pub id: u8,
    pub secret: String,
}

/// The feature an app with `preauth = oidc` requires: an edge that does not
/// sign users in refuses the app rather than serve it open.
pub const SIGN_IN_FEATURE: &str = "oidc";

/// The feature an app in maintenance mode requires: an edge of a build
/// without maintenance mode refuses the app (503 `FeatureUnsupported`)
/// rather than serve it.
pub const MAINTENANCE_FEATURE: &str = "maintenance";

/// The feature an app with its own OpenID client
/// ([`AppSpec::oidc_client_id`]) requires: an edge of a build that knows
/// only the deployment's client refuses the app (503
/// `FeatureUnsupported`) rather than sign its users in through the wrong
/// client.
pub const APP_CLIENT_FEATURE: &str = "oidc-app-client";

/// The edges that hold tunnels of one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPresence {
    pub group: GroupId,
    /// Sorted by id.
    pub edges: Vec<EdgeId>,
}

/// Another edge, as a mesh peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEdge {
    pub id: EdgeId,
    pub region: RegionId,
    /// Where it accepts mesh links (host:port, UDP); `None` when it runs
    /// without a mesh listener.
    pub mesh_addr: Option<String>,
    /// Whether its latest report is fresh.
    pub healthy: bool,
    /// Whether it is shutting down: forward to it only when no other edge
    /// holds the group.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// Tunnels attached to it at its last report: its load.
    pub tunnels: u32,
}

/// Where a connector can dial an edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeEndpoint {
    pub id: EdgeId,
    pub region: RegionId,
    /// host:port (UDP).
    pub tunnel_addr: String,
}

/// What a connector needs: the apps of its group and the edges to dial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectorConfig {
    pub version: u64,
    pub group: GroupId,
    pub apps: Vec<App>,
    pub edges: Vec<EdgeEndpoint>,
    /// The region the group is pinned to (`edges` then lists only its
    /// edges); `None` for `auto`: `edges` lists every region's, and the
    /// connector picks the nearest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<RegionId>,
    /// Per region of `edges`, the name that finds its tunnel endpoints,
    /// `<region>.tunnel.<apps domain>:<port>`: given when the router
    /// serves DNS for the apps domain and every edge of the region listed
    /// here has an IP address the zone holds, all on one port. Connectors
    /// resolve it (following its CNAME chain) and dial every address it
    /// gives, each verified as an edge of that region.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tunnel_names: std::collections::BTreeMap<RegionId, String>,
    /// Every published app's internal and external URL (of every group, at
    /// most [`MAX_APP_LINKS`]), for link translation: a link to the
    /// internal URL of any app becomes that app's external URL. Empty from
    /// an older router; the connector then knows only its group's apps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<AppLink>,
    /// The backend CA bundles of the group's apps that have one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_cas: Vec<BackendCa>,
}

/// One app's backend CA bundle, for its connectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendCa {
    pub app: AppId,
    /// `CERTIFICATE` blocks, at most [`MAX_BACKEND_CA_BYTES`].
    pub pem: String,
}

/// The most [`AppLink`]s a connector config carries; a connector reads no
/// more than this many either.
pub const MAX_APP_LINKS: usize = 10_000;

/// One published app's URLs, for link translation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppLink {
    /// As the app's `internal_url`: scheme, host, port and path prefix.
    pub internal_url: String,
    /// As the app's `external_url`: `https://<host>[:port]/`.
    pub external_url: String,
}

/// `POST /v1/edge/report`, every few seconds and on every tunnel change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeReport {
    /// Where connectors dial this edge (host:port).
    pub tunnel_addr: String,
    /// Where users reach it (host:port).
    pub public_addr: String,
    /// Where other edges open mesh links to it (host:port, UDP), when it
    /// listens for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_addr: Option<String>,
    pub version: String,
    pub tunnels: Vec<TunnelReport>,
    /// The edge is shutting down (SIGTERM): the router drops it from the
    /// DNS answers, the presence and the connectors' edge lists at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// One connector attached to the reporting edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelReport {
    pub connector_id: ConnectorId,
    pub group: GroupId,
    pub agent_version: String,
    /// The connector's address as the edge sees it.
    pub remote_addr: String,
    /// How many tunnels this connector holds to the edge.
    pub tunnels: u32,
}

// ---- `portico app test` ----

/// `POST /v1/apps/{id}/test`: the router's diagnostic report of one app,
/// a list of checks in a fixed order (DNS, certificate, connectors, then one
/// probe per active connector). The CLI may append checks of its own (a
/// resolver's view of the DNS chain) before it prints the report.
///
/// This is the stable shape `portico app test --json` prints; fields are
/// only ever added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppTestReport {
    pub app: AppId,
    pub external_host: String,
    pub internal_url: String,
    pub connector_group: GroupId,
    /// Unix seconds when the router made the report.
    pub at: u64,
    pub checks: Vec<TestCheck>,
}

impl AppTestReport {
    /// True when no check failed (skipped checks do not count).
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status != CheckStatus::Fail)
    }
}

/// What one check looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CheckKind {
    /// The external host as the router's DNS authority answers it.
    Dns,
    /// The external host as a resolver the operator named sees it.
    Resolver,
    /// The certificate an edge serves for the external host.
    Certificate,
    /// The active connectors of the app's group.
    Connectors,
    /// The internal URL, probed through one connector.
    Probe,
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckKind::Dns => "dns",
            CheckKind::Resolver => "resolver",
            CheckKind::Certificate => "certificate",
            CheckKind::Connectors => "connectors",
            CheckKind::Probe => "probe",
        })
    }
}

/// The outcome of a check or of one step of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Ok,
    Fail,
    /// Not run: nothing to check, or an earlier step failed.
    Skip,
}

impl fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckStatus::Ok => "ok",
            CheckStatus::Fail => "FAIL",
            CheckStatus::Skip => "skip",
        })
    }
}

/// One check of an [`AppTestReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestCheck {
    pub check: CheckKind,
    pub status: CheckStatus,
    /// One line: what was found, or what failed (`tcp: connection refused
    /// 127.0.0.1:9`).
    pub summary: String,
    /// How to fix a failure; `None` when the check passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The connector a probe ran through (probes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector: Option<ConnectorId>,
    /// Facts behind the summary, one per line: the CNAME chain, the
    /// certificate's names and dates, each connector and its edges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    /// The addresses a DNS check found at the end of the chain (`dns`,
    /// `resolver` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// A probe's steps, in order (probes only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<ProbeStep>,
}

/// One step of a probe: `dns`, `tcp`, `tls` or `http`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeStep {
    pub step: String,
    pub status: CheckStatus,
    /// How long the step took, in milliseconds.
    pub ms: u64,
    /// What it found (`127.0.0.1:8080`, `200 OK`) or why it failed,
    /// starting with the step's name (`dns: no address for backend.internal`).
    pub detail: String,
}

/// The most probe jobs a connector is given in one answer.
pub const MAX_PROBE_JOBS: usize = 8;
/// The most steps a probe result may carry.
pub const MAX_PROBE_STEPS: usize = 8;
/// The longest step detail a probe result may carry, in bytes.
pub const MAX_PROBE_DETAIL: usize = 512;

/// `GET /v1/connector/probes?wait=S` (connector certificate): the probes
/// the router wants this connector to run, or 304 when none came within
/// `wait`. A connector probes the internal URL of the app it is named, as
/// its own config has it: the router cannot make it probe anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeJobs {
    pub jobs: Vec<ProbeJob>,
}

/// One probe to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeJob {
    /// The job's id, for `POST /v1/connector/probes/{id}`.
    pub id: u64,
    pub app: AppId,
}

/// `POST /v1/connector/probes/{id}` (connector certificate): what the probe
/// found, answered 204. At most [`MAX_PROBE_STEPS`] steps of
/// [`MAX_PROBE_DETAIL`] bytes each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeResult {
    /// The internal URL probed, as the connector's config has it.
    pub url: String,
    pub steps: Vec<ProbeStep>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_app_spec_has_the_defaults_of_a_body_that_names_only_id_and_url() {
        let parsed: AppSpec =
            serde_json::from_str(r#"{"id": "hr", "internal_url": "http://10.0.0.5/"}"#).unwrap();
        assert_eq!(
            AppSpec::new("hr".parse().unwrap(), "http://10.0.0.5/"),
            parsed
        );
    }

    #[test]
    fn identity_uris_round_trip() {
        let c = Identity::Connector {
            id: ConnectorId::new("c-1").unwrap(),
            group: GroupId::default_group(),
        };
        let uris = c.to_uris();
        assert_eq!(
            Identity::from_uris(uris.iter().map(String::as_str)),
            Some(c)
        );
        let e = Identity::Edge {
            id: EdgeId::new("e-1").unwrap(),
            region: RegionId::default_region(),
        };
        let mut uris = e.to_uris();
        assert_eq!(
            Identity::from_uris(uris.iter().map(String::as_str)),
            Some(e)
        );
        uris.push("urn:portico:connector:c-2".into());
        assert_eq!(Identity::from_uris(uris.iter().map(String::as_str)), None);
        assert_eq!(Identity::from_uris(["urn:portico:connector:bad id"]), None);
    }

    #[test]
    fn join_token_parses_and_hides_its_secret() {
        let t = JoinToken {
            id: "0123456789abcdef".into(),
            secret: "00112233445566778899aabbccddeeff".into(),
            ca_sha256: "ab".repeat(32),
        };
        let s = t.to_string();
        assert_eq!(s.parse::<JoinToken>(), Ok(t.clone()));
        assert!(!format!("{t:?}").contains(&t.secret));
        assert_eq!("pt1.x.y.z".parse::<JoinToken>(), Err(MalformedToken));
        assert_eq!(
            format!("{s}.extra").parse::<JoinToken>(),
            Err(MalformedToken)
        );
    }

    #[test]
    fn backend_timeout_forms() {
        let t: BackendTimeout = serde_json::from_str("\"long\"").unwrap();
        assert_eq!(t.duration(), Duration::from_secs(180));
        let t: BackendTimeout = serde_json::from_str("5").unwrap();
        assert_eq!(t, BackendTimeout::Seconds(5));
        assert_eq!(serde_json::to_string(&t).unwrap(), "5");
        assert_eq!(
            serde_json::to_string(&BackendTimeout::Default).unwrap(),
            "\"default\""
        );
        assert!(serde_json::from_str::<BackendTimeout>("0").is_err());
        assert!(serde_json::from_str::<BackendTimeout>("\"forever\"").is_err());
        let spec: AppSpec =
            serde_json::from_str(r#"{"id":"hr","internal_url":"http://10.0.0.5:8080/"}"#).unwrap();
        assert_eq!(spec.connector_group, GroupId::default_group());
        assert!(spec.validate_backend_tls);
        assert!(spec.translate_headers);
        assert!(!spec.translate_body);
        assert!(
            spec.http_only && !spec.persistent,
            "the session cookie's defaults"
        );
        assert_eq!(spec.backend_timeout, BackendTimeout::Default);
        assert!(spec.required_features.is_empty());
    }

    #[test]
    fn translation_settings_default_and_stay_off_the_wire_at_their_defaults() {
        // An app stored or sent before the settings existed reads back with
        // headers translated and bodies not.
        let app: App = serde_json::from_str(
            r#"{"id":"hr","external_host":"hr.apps.test","external_url":"https://hr.apps.test/",
                "internal_url":"http://hr.corp/","connector_group":"Default",
                "backend_timeout":"default","validate_backend_tls":true,"created_at":1}"#,
        )
        .unwrap();
        assert!(app.translate_headers);
        assert!(!app.translate_body);
        assert!(app.http_only && !app.persistent);
        // A spec at the defaults names neither, so an older router (which
        // refuses unknown fields) still takes it; a changed one names it.
        let mut spec: AppSpec =
            serde_json::from_str(r#"{"id":"hr","internal_url":"http://x/"}"#).unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        assert!(!json.contains("translate"), "{json}");
        assert!(
            !json.contains("http_only") && !json.contains("persistent"),
            "{json}"
        );
        spec.translate_headers = false;
        spec.translate_body = true;
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains(r#""translate_headers":false"#), "{json}");
        assert!(json.contains(r#""translate_body":true"#), "{json}");
        assert_eq!(serde_json::from_str::<AppSpec>(&json).unwrap(), spec);
        let patch: AppPatch = serde_json::from_str(r#"{"translate_body":true}"#).unwrap();
        let patched =
            patch.apply(serde_json::from_str(r#"{"id":"hr","internal_url":"http://x/"}"#).unwrap());
        assert!(patched.translate_body && patched.translate_headers);
        // A connector config without links (an older router) reads, and
        // one without links writes none.
        let c: ConnectorConfig =
            serde_json::from_str(r#"{"version":1,"group":"Default","apps":[],"edges":[]}"#)
                .unwrap();
        assert!(c.links.is_empty());
        assert!(!serde_json::to_string(&c).unwrap().contains("links"));
    }

    #[test]
    fn maintenance_defaults_off_and_stays_off_the_wire_when_off() {
        let mut spec: AppSpec =
            serde_json::from_str(r#"{"id":"hr","internal_url":"http://x/"}"#).unwrap();
        assert!(!spec.maintenance);
        assert!(!serde_json::to_string(&spec)
            .unwrap()
            .contains("maintenance"));
        spec.maintenance = true;
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains(r#""maintenance":true"#), "{json}");
        let off: AppPatch = serde_json::from_str(r#"{"maintenance":false}"#).unwrap();
        assert!(!off.is_empty());
        assert!(!off.apply(spec.clone()).maintenance);
        // A home page is kept, replaced, or cleared with "".
        assert!(!json.contains("home_page"), "{json}");
        let set: AppPatch = serde_json::from_str(r#"{"home_page":"/portal/"}"#).unwrap();
        let spec = set.apply(spec);
        assert_eq!(spec.home_page.as_deref(), Some("/portal/"));
        let clear: AppPatch = serde_json::from_str(r#"{"home_page":""}"#).unwrap();
        assert_eq!(clear.apply(spec).home_page, None);
    }

    #[test]
    fn wildcard_labels_are_one_ldh_label() {
        assert_eq!(wildcard_suffix("*.corp.apps.test"), Some("corp.apps.test"));
        assert_eq!(wildcard_suffix("hr.apps.test"), None);
        let label = |host| wildcard_label(host, "corp.apps.test");
        assert_eq!(label("hr.corp.apps.test"), Some("hr"));
        assert_eq!(label("a-1.corp.apps.test"), Some("a-1"));
        let long = format!("{}.corp.apps.test", "a".repeat(63));
        assert_eq!(label(&long).map(str::len), Some(63));
        for host in [
            "corp.apps.test",
            ".corp.apps.test",
            "a.b.corp.apps.test",
            "hrcorp.apps.test",
            "a_b.corp.apps.test",
            "-a.corp.apps.test",
            "a-.corp.apps.test",
            "*.corp.apps.test",
            "hr.corp.apps.test.evil",
        ] {
            assert_eq!(label(host), None, "{host}");
        }
        assert_eq!(label(&format!("{}.corp.apps.test", "a".repeat(64))), None);
    }

    #[test]
    fn required_features_are_optional_on_the_wire_and_validated() {
        let spec: AppSpec = serde_json::from_str(
            r#"{"id":"hr","internal_url":"http://x/","required_features":["sign-in","mesh2"]}"#,
        )
        .unwrap();
        assert_eq!(spec.required_features, ["sign-in", "mesh2"]);
        // Skipped when empty, so older edges and routers read it as before.
        let mut plain = spec.clone();
        plain.required_features.clear();
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("required_features"), "{json}");
        assert!(serde_json::to_string(&spec)
            .unwrap()
            .contains(r#""required_features":["sign-in","mesh2"]"#));

        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(check_required_features(&names(&["a", "b-2", "0"])), Ok(()));
        assert_eq!(check_required_features(&[]), Ok(()));
        assert_eq!(
            check_required_features(&names(&["ok", ""])),
            Err(FeatureError::Empty)
        );
        assert!(matches!(
            check_required_features(&names(&["Sign-In"])),
            Err(FeatureError::InvalidChar { .. })
        ));
        assert!(matches!(
            check_required_features(&names(&["a_b"])),
            Err(FeatureError::InvalidChar { .. })
        ));
        assert_eq!(check_feature_name(&"x".repeat(32)), Ok(()));
        assert!(matches!(
            check_feature_name(&"x".repeat(33)),
            Err(FeatureError::TooLong {
                len: 33,
                max: 32,
                ..
            })
        ));
        let sixteen: Vec<String> = (0..16).map(|i| format!("f{i}")).collect();
        assert_eq!(check_required_features(&sixteen), Ok(()));
        let seventeen: Vec<String> = (0..17).map(|i| format!("f{i}")).collect();
        assert_eq!(
            check_required_features(&seventeen),
            Err(FeatureError::TooMany { count: 17, max: 16 })
        );
        assert_eq!(
            check_required_features(&names(&["a", "b", "a"])),
            Err(FeatureError::Duplicate { name: "a".into() })
        );
    }

    #[test]
    fn certificate_names_cover_hosts_as_rfc_6125_says() {
        assert!(name_covers("hr.corp.example.com", "HR.corp.example.com."));
        assert!(name_covers("*.corp.example.com", "hr.corp.example.com"));
        assert!(!name_covers("*.corp.example.com", "corp.example.com"));
        assert!(!name_covers("*.corp.example.com", "a.hr.corp.example.com"));
        assert!(!name_covers("*.corp.example.com", ".corp.example.com"));
        assert!(!name_covers("hr.corp.example.com", "hr.corp.example.co"));
        assert!(!name_covers("", ""));
        assert!(!name_covers("*.", "a."));
    }

    #[test]
    fn the_exact_name_wins_then_the_latest_expiry() {
        let wild = ["*.corp.example.com"];
        let exact = ["hr.corp.example.com", "www.corp.example.com"];
        let other = ["intra.example.net"];
        let certs: Vec<(&[&str], u64)> =
            vec![(&other, 900), (&wild, 500), (&exact, 100), (&wild, 700)];
        assert_eq!(
            pick_certificate(certs.clone(), "hr.corp.example.com"),
            Some(2)
        );
        assert_eq!(
            pick_certificate(certs.clone(), "pay.corp.example.com"),
            Some(3)
        );
        assert_eq!(
            pick_certificate(certs.clone(), "intra.example.net"),
            Some(0)
        );
        assert_eq!(pick_certificate(certs, "corp.example.com"), None);
    }
    #[test]
    fn an_apps_own_client_is_patched_as_a_pair_and_its_secret_never_debug_printed() {
        let spec: AppSpec = serde_json::from_str(
            r#"{"id":"hr","internal_url":"http://10.0.0.5/","preauth":"oidc",
                "oidc_client_id":"hr-client","oidc_client_secret":"s3cret"}"#,
        )
        .unwrap();
        assert_eq!(spec.oidc_client_id.as_deref(), Some("hr-client"));
        assert_eq!(
            spec.oidc_client_secret.as_ref().map(ClientSecret::expose),
            Some("s3cret")
        );
        assert!(!format!("{spec:?}").contains("s3cret"), "{spec:?}");
        let patch = |json: &str| serde_json::from_str::<AppPatch>(json).unwrap();
        // The secret alone: the same client, a new secret.
        let rotated = patch(r#"{"oidc_client_secret":"n3w"}"#).apply(spec.clone());
        assert_eq!(rotated.oidc_client_id.as_deref(), Some("hr-client"));
        assert_eq!(rotated.oidc_client_secret, Some(ClientSecret::new("n3w")));
        // Another id without a secret drops the old one (the router then
        // asks for it); with one, both change.
        let other = patch(r#"{"oidc_client_id":"other"}"#).apply(spec.clone());
        assert_eq!(
            (other.oidc_client_id.as_deref(), other.oidc_client_secret),
            (Some("other"), None)
        );
        let same = patch(r#"{"oidc_client_id":"hr-client"}"#).apply(spec.clone());
        assert_eq!(same.oidc_client_secret, spec.oidc_client_secret);
        // "" goes back to the deployment's client.
        let back = patch(r#"{"oidc_client_id":""}"#).apply(spec.clone());
        assert_eq!((back.oidc_client_id, back.oidc_client_secret), (None, None));
        // Left out of the JSON when unset.
        let plain: AppSpec =
            serde_json::from_str(r#"{"id":"hr","internal_url":"http://10.0.0.5/"}"#).unwrap();
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("oidc_client"), "{json}");
        let settings = SignInSettings {
            issuer: "https://idp".into(),
            client_id: "portico".into(),
            client_secret: "deployment-secret".into(),
            keys: vec![],
            session_lifetime_secs: 1,
            groups_claim: "groups".into(),
            assertion_keys: vec![],
            session_idle_secs: 0,
            clients: vec![AppClient {
                app: AppId::new("hr").unwrap(),
                client_id: "hr-client".into(),
                client_secret: ClientSecret::new("s3cret"),
            }],
        };
        let debug = format!("{settings:?}");
        assert!(
            debug.contains("hr-client") && !debug.contains("s3cret"),
            "{debug}"
        );
    }

    #[test]
    fn an_apps_client_id_and_secret_are_bounded_printable_ascii() {
        assert!(check_oidc_client_id("0f3c1d2e-aaaa-bbbb-cccc-1234567890ab").is_ok());
        assert!(check_oidc_client_id(&"a".repeat(MAX_OIDC_CLIENT_ID)).is_ok());
        for bad in ["", "has space", "tab\t", "é", "nul\0"] {
            assert!(check_oidc_client_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_oidc_client_id(&"a".repeat(MAX_OIDC_CLIENT_ID + 1)).is_err());
        let ok = ClientSecret::new("Ab~.-_9xYz");
        assert!(check_oidc_client_secret(&ok).is_ok());
        for bad in ["", "two words", "line\n", "ü"] {
            let err = check_oidc_client_secret(&ClientSecret::new(bad)).unwrap_err();
            assert!(bad.is_empty() || !err.contains(bad), "{err}");
        }
        let long = ClientSecret::new("x".repeat(MAX_OIDC_CLIENT_SECRET + 1));
        assert!(check_oidc_client_secret(&long).is_err());
    }
}
