//! The router's durable state behind one [`Store`] trait: regions, groups,
//! apps, join tokens, connectors, edges and the config version.
//!
//! The trait is synchronous (admin traffic is small); the API calls it from
//! blocking tasks. [`SqliteStore`] is the embedded implementation, and
//! [`suite::run`] is the test suite every implementation must pass.

use portico_proto::api::{BackendTimeout, SignedOut, SignedOutUser, TokenScope};
use portico_proto::ids::{AppId, ConnectorId, EdgeId, GroupId, RegionId};

use crate::error::StoreError;

mod sqlite;
pub mod suite;

pub use sqlite::SqliteStore;

/// A region: a name edges enroll into (their tokens name it) and groups
/// pin to. `default` always exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionRecord {
    pub id: RegionId,
    pub created_at: u64,
}

/// A connector group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub id: GroupId,
    /// `auto` or a region id.
    pub region: String,
    pub created_at: u64,
}

/// A published app. Its external URL is derived when it is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRecord {
    pub id: AppId,
    /// Lower-case: under the apps domain, or in a custom domain whose
    /// CNAME chain the API checked.
    pub external_host: String,
    pub internal_url: String,
    pub connector_group: GroupId,
    pub backend_timeout: BackendTimeout,
    pub validate_backend_tls: bool,
    /// Translate internal URLs in response headers.
    pub translate_headers: bool,
    /// Translate internal URLs in HTML and CSS response bodies.
    pub translate_body: bool,
    /// Checked by `portico_proto::api::check_required_features`.
    pub required_features: Vec<String>,
    /// Who may use it (when it signs users in).
    pub assignment: portico_proto::api::Assignment,
    /// Header name → claim name, for the backend.
    pub identity_headers: std::collections::BTreeMap<String, String>,
    /// Left out of My Apps.
    pub hidden: bool,
    pub created_at: u64,
    /// Maintenance mode: edges answer 503 `Maintenance`.
    pub maintenance: bool,
    /// The home page under the external root (path, query, fragment;
    /// starts with `/`), as `api::check_home_page` made it; `None`: the
    /// external URL.
    pub home_path: Option<String>,
    /// The backend CA bundle (only `CERTIFICATE` blocks, as
    /// `api::check_backend_ca` wrote them out).
    pub backend_ca_pem: Option<String>,
    /// The session cookie is `HttpOnly` (`preauth = oidc`).
    pub http_only: bool,
    /// The session cookie outlives the browser.
    pub persistent: bool,
    /// The app's own OpenID client, with its secret (both or neither, as
    /// the API checked): kept in the database, which lives in the
    /// router's private data directory (0700), as certificate keys are.
    pub oidc_client_id: Option<String>,
    pub oidc_client_secret: Option<portico_proto::api::ClientSecret>,
}

/// An uploaded certificate for hosts of custom domains, validated by
/// `crate::certificates` before it is stored.
#[derive(Clone, PartialEq, Eq)]
pub struct CertificateRecord {
    /// The first 16 hex digits of the leaf's SHA-256.
    pub id: String,
    /// The DNS names of the leaf's subjectAltName, lower case.
    pub names: Vec<String>,
    pub issuer: String,
    pub not_before: u64,
    pub not_after: u64,
    pub chain_pem: String,
    /// Kept in the database, which lives in the router's private data
    /// directory (0700), as the CA key does.
    pub key_pem: String,
    pub uploaded_at: u64,
}

impl std::fmt::Debug for CertificateRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateRecord")
            .field("id", &self.id)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .field("key_pem", &"***")
            .finish()
    }
}

/// A join token. Only the SHA-256 of its secret is kept.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    /// Lower-case hex SHA-256 of the secret.
    pub secret_sha256: String,
    pub scope: TokenScope,
    pub created_at: u64,
    pub expires_at: u64,
    pub used_at: Option<u64>,
    /// When an admin revoked it; a revoked token enrolls nothing.
    pub revoked_at: Option<u64>,
}

impl std::fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRecord")
            .field("id", &self.id)
            .field("secret_sha256", &"***")
            .field("scope", &self.scope)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("used_at", &self.used_at)
            .field("revoked_at", &self.revoked_at)
            .finish()
    }
}

/// The certificate last issued to a connector or edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Hex serial.
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_after: u64,
}

/// An enrolled connector. A deleted one keeps its row (a tombstone) so that
/// edges keep refusing its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorRecord {
    pub id: ConnectorId,
    pub group: GroupId,
    pub host: String,
    pub version: String,
    pub enrolled_at: u64,
    pub cert: CertInfo,
    pub deleted_at: Option<u64>,
    pub last_seen: Option<u64>,
    pub address_seen: Option<String>,
    pub tunnels: u32,
}

/// An enrolled edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeRecord {
    pub id: EdgeId,
    pub region: RegionId,
    pub host: String,
    pub version: String,
    pub enrolled_at: u64,
    pub cert: CertInfo,
    pub tunnel_addr: Option<String>,
    pub public_addr: Option<String>,
    pub last_seen: Option<u64>,
    pub tunnels: u32,
    pub deleted_at: Option<u64>,
}

/// What an edge report says about one connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorSeen {
    pub id: ConnectorId,
    pub at: u64,
    pub address: String,
    pub version: String,
    pub tunnels: u32,
}

/// A connector's latest region report, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorRegion {
    pub id: ConnectorId,
    pub at: u64,
    /// JSON of `proto::api::RegionChoice`.
    pub report: String,
}

/// What an edge report says about the edge itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeSeen {
    pub id: EdgeId,
    pub at: u64,
    pub tunnel_addr: String,
    pub public_addr: String,
    pub version: String,
    pub tunnels: u32,
    /// Where other edges open mesh links to it, if it takes them.
    pub mesh_addr: Option<String>,
    /// The groups it holds tunnels of, each with its tunnel count.
    pub groups: Vec<(GroupId, u32)>,
    /// It is shutting down.
    pub draining: bool,
    /// The address the report came from as the router saw it (an
    /// IPv4-mapped IPv6 address as IPv4), when known.
    pub reported_from: Option<String>,
}

/// Where an edge's tunnels are, as its latest report said: part of the
/// store, so that every router replica and every edge sees the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceRecord {
    pub edge: EdgeId,
    pub mesh_addr: Option<String>,
    /// The groups it holds tunnels of, by id, each with its tunnel count.
    /// Empty once its report has gone stale ([`Store::expire_presence`]).
    pub groups: Vec<(GroupId, u32)>,
    /// Its latest report said it is shutting down: it is in no DNS
    /// answer, no presence and no connector's edge list.
    pub draining: bool,
    /// Where its latest report came from.
    pub reported_from: Option<std::net::IpAddr>,
}

/// Durable router state. Every change that edges or connectors care about
/// bumps the config version in the same transaction and returns the new
/// version.
pub trait Store: Send + Sync + 'static {
    /// The current config version (0 for an empty store).
    fn config_version(&self) -> Result<u64, StoreError>;
    /// When the config version last changed, in milliseconds since the
    /// Unix epoch (0 before the first change).
    fn config_changed_at_ms(&self) -> Result<u64, StoreError>;

    /// Creates a region; `AlreadyExists` if its id is taken. Regions change
    /// nothing an edge or connector is told, so the version stays.
    fn create_region(&self, region: &RegionRecord) -> Result<(), StoreError>;
    fn get_region(&self, id: &RegionId) -> Result<Option<RegionRecord>, StoreError>;
    /// Every region, by id.
    fn list_regions(&self) -> Result<Vec<RegionRecord>, StoreError>;
    /// Deletes a region other than `default`: `NotFound` if there is none,
    /// `RegionInUse` while a live edge, a group pinned to it, or an edge
    /// token unused and unexpired at `now` names it.
    fn delete_region(&self, id: &RegionId, now: u64) -> Result<(), StoreError>;

    /// Creates the group unless it exists; returns whether it was created.
    fn ensure_group(&self, group: &GroupRecord) -> Result<bool, StoreError>;
    /// Creates a group; `AlreadyExists` if its id is taken, `NotFound`
    /// (kind `region`) if it is pinned to a region that does not exist.
    fn create_group(&self, group: &GroupRecord) -> Result<u64, StoreError>;
    fn get_group(&self, id: &GroupId) -> Result<Option<GroupRecord>, StoreError>;
    /// Every group with the number of (not deleted) connectors in it.
    fn list_groups(&self) -> Result<Vec<(GroupRecord, u32)>, StoreError>;
    /// Deletes an empty group other than `Default`.
    fn delete_group(&self, id: &GroupId) -> Result<u64, StoreError>;

    /// Creates an app; its group must exist, its id and host be free.
    fn create_app(&self, app: &AppRecord) -> Result<u64, StoreError>;
    fn get_app(&self, id: &AppId) -> Result<Option<AppRecord>, StoreError>;
    fn list_apps(&self) -> Result<Vec<AppRecord>, StoreError>;
    /// Replaces the app with `app.id` (its `created_at` is kept): `NotFound`
    /// if there is none, and the same checks as `create_app` for its group
    /// and host.
    fn update_app(&self, app: &AppRecord) -> Result<u64, StoreError>;
    fn delete_app(&self, id: &AppId) -> Result<u64, StoreError>;

    /// Stores an uploaded certificate, replacing one of the same id; bumps
    /// the version. At most `portico_proto::api::MAX_CERTIFICATES`
    /// (`StoreError::Limit` past it).
    fn put_certificate(&self, cert: &CertificateRecord) -> Result<u64, StoreError>;
    /// Every uploaded certificate, by id.
    fn list_certificates(&self) -> Result<Vec<CertificateRecord>, StoreError>;
    /// Removes one; bumps the version.
    fn delete_certificate(&self, id: &str) -> Result<u64, StoreError>;

    /// Stores a new token; an edge token's region must exist (`NotFound`,
    /// kind `region`).
    fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Every token, newest first.
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Marks an unused token revoked: `NotFound`, `TokenUsed` or
    /// `TokenRevoked` otherwise. Enrollment then refuses it.
    fn revoke_token(&self, id: &str, now: u64) -> Result<(), StoreError>;

    /// Marks the token used (`TokenUsed` if it already was, `TokenRevoked`
    /// if it was revoked) and creates the connector, atomically. The connector's group must exist.
    fn enroll_connector(
        &self,
        token_id: &str,
        now: u64,
        connector: &ConnectorRecord,
    ) -> Result<(), StoreError>;
    /// Marks the token used and creates the edge, atomically. The edge's
    /// region must exist (`NotFound`, kind `region`, leaves the token
    /// unused).
    fn enroll_edge(&self, token_id: &str, now: u64, edge: &EdgeRecord) -> Result<(), StoreError>;

    fn get_connector(&self, id: &ConnectorId) -> Result<Option<ConnectorRecord>, StoreError>;
    /// Every connector, deleted ones included.
    fn list_connectors(&self) -> Result<Vec<ConnectorRecord>, StoreError>;
    fn set_connector_cert(&self, id: &ConnectorId, cert: &CertInfo) -> Result<(), StoreError>;
    /// Marks a connector deleted (revoked). `NotFound` if unknown or
    /// already deleted.
    fn delete_connector(&self, id: &ConnectorId, now: u64) -> Result<u64, StoreError>;
    /// Records presence; unknown connectors are ignored.
    fn connector_seen(&self, seen: &ConnectorSeen) -> Result<(), StoreError>;
    /// Keeps a connector's latest region report (JSON of
    /// `proto::api::RegionChoice`, checked by the caller) and when it came.
    /// `NotFound` if unknown or deleted.
    fn connector_region(&self, report: &ConnectorRegion) -> Result<(), StoreError>;
    /// The latest region report of every connector that sent one.
    fn connector_regions(&self) -> Result<Vec<ConnectorRegion>, StoreError>;

    fn get_edge(&self, id: &EdgeId) -> Result<Option<EdgeRecord>, StoreError>;
    fn list_edges(&self) -> Result<Vec<EdgeRecord>, StoreError>;
    fn set_edge_cert(&self, id: &EdgeId, cert: &CertInfo) -> Result<(), StoreError>;
    /// Marks an edge deleted (its certificate revoked). `NotFound` if
    /// unknown or already deleted.
    fn delete_edge(&self, id: &EdgeId, now: u64) -> Result<u64, StoreError>;
    /// Records an edge's report. Returns the new config version when its
    /// tunnel, public or mesh address changed, or the set of groups it
    /// holds tunnels of (not their counts: load travels with the next
    /// change); `NotFound` for an unknown edge.
    fn edge_seen(&self, seen: &EdgeSeen) -> Result<Option<u64>, StoreError>;
    /// Every live edge's presence.
    fn list_presence(&self) -> Result<Vec<PresenceRecord>, StoreError>;
    /// Empties the groups of every edge last seen before `stale_before`
    /// (unix seconds), in one transaction; the new config version if any
    /// had some.
    fn expire_presence(&self, stale_before: u64) -> Result<Option<u64>, StoreError>;
    /// Keeps `sessions` signed out until their `until` (unix seconds),
    /// and forgets those over at `now`. Bumps the version when one is new
    /// (and returns it), so that every edge's watch brings it; at most
    /// `portico_proto::api::MAX_SIGNED_OUT` live ones (`Limit` past it).
    fn sign_out(&self, sessions: &[SignedOut], now: u64) -> Result<Option<u64>, StoreError>;
    /// The sessions signed out at a config version after `after` and not
    /// over at `now`, by version.
    fn signed_out_after(&self, after: u64, now: u64) -> Result<Vec<SignedOut>, StoreError>;
    /// Signs `user` out of every session begun at or before `before`,
    /// until `until` (when the last would have ended); a later call for
    /// the same user moves both forward. Forgets entries over at `now`.
    /// Bumps the version and returns it.
    fn sign_out_user(
        &self,
        user: &str,
        before: u64,
        until: u64,
        now: u64,
    ) -> Result<u64, StoreError>;
    /// The users signed out at a config version after `after` and not
    /// over at `now`, by version.
    fn signed_out_users_after(
        &self,
        after: u64,
        now: u64,
    ) -> Result<Vec<SignedOutUser>, StoreError>;
    /// Marks a one-time handoff code used until `until`: false when it
    /// was already (by any edge). Forgets codes expired at `now`; `Limit`
    /// past `portico_proto::api::MAX_SIGNED_OUT` live ones. The version
    /// stays: no edge needs told.
    fn use_handoff(&self, jti: &str, until: u64, now: u64) -> Result<bool, StoreError>;

    /// The config version, sent after every commit that changes it: the
    /// store's change notification, which every watch (edges' and
    /// connectors' long-polls, the DNS zone) follows. A replicated store
    /// sends what any replica commits.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Releases the store; later calls fail with `Closed`.
    fn close(&self);
}
