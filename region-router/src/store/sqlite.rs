//! [`Store`] on an embedded SQLite file (WAL), schema versioned with
//! `PRAGMA user_version`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use portico_proto::api::{BackendTimeout, SignedOut, SignedOutUser, TokenScope};
use portico_proto::ids::{AppId, ConnectorId, EdgeId, GroupId, RegionId};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use super::{
    AppRecord, CertInfo, CertificateRecord, ConnectorRecord, ConnectorRegion, ConnectorSeen,
    EdgeRecord, EdgeSeen, GroupRecord, PresenceRecord, RegionRecord, Store, TokenRecord,
};
use crate::error::StoreError;

const SCHEMA_VERSION: i64 = 15;

const SCHEMA_V1: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta (key, value) VALUES ('config_version', 0);
CREATE TABLE groups (
    id TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE apps (
    id TEXT PRIMARY KEY,
    external_host TEXT NOT NULL UNIQUE,
    internal_url TEXT NOT NULL,
    connector_group TEXT NOT NULL,
    backend_timeout TEXT NOT NULL,
    validate_backend_tls INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    scope TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE TABLE connectors (
    id TEXT PRIMARY KEY,
    grp TEXT NOT NULL,
    host TEXT NOT NULL,
    version TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,
    cert_serial TEXT NOT NULL,
    cert_not_after INTEGER NOT NULL,
    deleted_at INTEGER,
    last_seen INTEGER,
    address_seen TEXT,
    tunnels INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX connectors_grp ON connectors (grp);
CREATE TABLE edges (
    id TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    host TEXT NOT NULL,
    version TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,
    cert_serial TEXT NOT NULL,
    cert_not_after INTEGER NOT NULL,
    tunnel_addr TEXT,
    public_addr TEXT,
    last_seen INTEGER,
    tunnels INTEGER NOT NULL DEFAULT 0,
    deleted_at INTEGER
);
";

/// Version 2: apps may require edge features (a JSON array of names;
/// existing apps require none).
const SCHEMA_V2: &str = "
ALTER TABLE apps ADD COLUMN required_features TEXT NOT NULL DEFAULT '[]';
";

/// Version 3: join tokens can be revoked.
const SCHEMA_V3: &str = "
ALTER TABLE tokens ADD COLUMN revoked_at INTEGER;
";

/// Version 4: regions are rows of their own. `default` always exists, and
/// every region a database already names (an edge's, a pinned group's, an
/// edge token's) is created, so that nothing of an older router points at a
/// region that does not exist. Each gets the time of its first use
/// (`default`, when nothing used it: now).
const SCHEMA_V4: &str = "
CREATE TABLE regions (
    id TEXT PRIMARY KEY NOT NULL,
    created_at INTEGER NOT NULL
);
INSERT INTO regions (id, created_at)
    SELECT id, MIN(at) FROM (
        SELECT region AS id, enrolled_at AS at FROM edges
        UNION ALL
        SELECT region, created_at FROM groups WHERE region != 'auto'
        UNION ALL
        SELECT json_extract(scope, '$.region'), created_at FROM tokens
            WHERE json_extract(scope, '$.kind') = 'edge'
    )
    WHERE id IS NOT NULL
    GROUP BY id;
INSERT OR IGNORE INTO regions (id, created_at)
    VALUES ('default', CAST(strftime('%s', 'now') AS INTEGER));
";

/// Version 5: each connector's latest region report (its home region,
/// RTTs and last move), for `connector list`.
const SCHEMA_V5: &str = "
ALTER TABLE connectors ADD COLUMN region_report TEXT;
ALTER TABLE connectors ADD COLUMN region_reported_at INTEGER;
";

/// Version 6: presence (which groups each edge holds tunnels of, and its
/// mesh address), kept in the store instead of one router's memory.
const SCHEMA_V6: &str = "
CREATE TABLE presence (
    edge_id TEXT PRIMARY KEY REFERENCES edges(id),
    mesh_addr TEXT,
    groups TEXT NOT NULL DEFAULT '[]'
);
INSERT INTO meta (key, value) VALUES ('changed_at_ms', 0);
";

/// Version 7: whether an edge is draining (shutting down), from its report.
const SCHEMA_V7: &str = "
ALTER TABLE presence ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
";

/// Version 8: the address an edge's latest report came from, for the DNS
/// answers of an edge that advertises an unspecified address.
const SCHEMA_V8: &str = "
ALTER TABLE presence ADD COLUMN reported_from TEXT;
";

/// Version 9: link translation, per app: in response headers (on, as for
/// every app stored before) and in HTML/CSS bodies (off).
const SCHEMA_V9: &str = "
ALTER TABLE apps ADD COLUMN translate_headers INTEGER NOT NULL DEFAULT 1;
ALTER TABLE apps ADD COLUMN translate_body INTEGER NOT NULL DEFAULT 0;
";

/// Version 10: app settings from Entra, per app: maintenance mode (off,
/// as for every app stored before), the home page (none: the external
/// URL) and the backend CA bundle (none).
const SCHEMA_V10: &str = "
ALTER TABLE apps ADD COLUMN maintenance INTEGER NOT NULL DEFAULT 0;
ALTER TABLE apps ADD COLUMN home_path TEXT;
ALTER TABLE apps ADD COLUMN backend_ca_pem TEXT;
";

/// Version 11: uploaded certificates for hosts of custom domains.
const SCHEMA_V11: &str = "
CREATE TABLE certificates (
    id TEXT PRIMARY KEY,
    names TEXT NOT NULL,
    issuer TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    chain_pem TEXT NOT NULL,
    key_pem TEXT NOT NULL,
    uploaded_at INTEGER NOT NULL
);
";

/// Version 12: who may use an app that signs users in (an app stored
/// before, which could sign users in without an assignment, lets every
/// signed-in user in, as it did), the identity headers its backend gets,
/// and whether My Apps lists it.
const SCHEMA_V12: &str = r#"
ALTER TABLE apps ADD COLUMN assignment TEXT NOT NULL DEFAULT '{}';
ALTER TABLE apps ADD COLUMN identity_headers TEXT NOT NULL DEFAULT '{}';
ALTER TABLE apps ADD COLUMN hidden INTEGER NOT NULL DEFAULT 0;
UPDATE apps SET assignment = '{"everyone":true}' WHERE required_features LIKE '%"oidc"%';
"#;

/// Version 13: the session cookie's settings, per app: `HttpOnly` (on, as
/// for every app stored before) and persistent (off). (Versions 10 to 12
/// are other changes of issue 11; each step runs only when the database
/// is older than it.)
const SCHEMA_V13: &str = "
ALTER TABLE apps ADD COLUMN http_only INTEGER NOT NULL DEFAULT 1;
ALTER TABLE apps ADD COLUMN persistent INTEGER NOT NULL DEFAULT 0;
";

/// Version 14: sessions signed out (each with the config version that
/// brought it, for the edges' deltas), users an admin signed out of every
/// session, and the one-time handoff codes used.
const SCHEMA_V14: &str = "
CREATE TABLE signed_out (
    sid TEXT PRIMARY KEY,
    until INTEGER NOT NULL,
    version INTEGER NOT NULL
);
CREATE INDEX signed_out_by_version ON signed_out (version);
CREATE TABLE used_handoffs (
    jti TEXT PRIMARY KEY,
    until INTEGER NOT NULL
);
CREATE TABLE signed_out_users (
    user TEXT PRIMARY KEY,
    before INTEGER NOT NULL,
    until INTEGER NOT NULL,
    version INTEGER NOT NULL
);
";

/// Version 15: an app's own OpenID client, id and secret (none: the
/// deployment's client, as for every app stored before).
const SCHEMA_V15: &str = "
ALTER TABLE apps ADD COLUMN oidc_client_id TEXT;
ALTER TABLE apps ADD COLUMN oidc_client_secret TEXT;
";

/// The SQLite store: one connection behind a mutex.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Option<Connection>>,
    /// The config version after the last commit ([`Store::subscribe`]).
    version: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// The schema version this build writes (`PRAGMA user_version`).
    pub const SCHEMA_VERSION: i64 = SCHEMA_VERSION;

    /// Opens (creating if needed) the database file and migrates its schema.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        migrate(&mut conn)?;
        let version = current_version(&conn)?;
        Ok(SqliteStore {
            path,
            conn: Mutex::new(Some(conn)),
            version: tokio::sync::watch::channel(version).0,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Option<Connection>> {
        // A panic while holding the lock cannot leave a transaction half
        // applied (it rolls back on drop), so the poison is not a concern.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let guard = self.lock();
        let conn = guard.as_ref().ok_or(StoreError::Closed)?;
        f(conn)
    }

    fn tx<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.lock();
        let conn = guard.as_mut().ok_or(StoreError::Closed)?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        // Notify after the commit, so that a watcher reads what changed.
        let version = current_version(conn)?;
        self.version.send_if_modified(|seen| {
            let newer = version > *seen;
            if newer {
                *seen = version;
            }
            newer
        });
        Ok(out)
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    // Each step runs in its own transaction, so a database is always at
    // one whole schema version.
    for (version, sql) in [
        (1, SCHEMA_V1),
        (2, SCHEMA_V2),
        (3, SCHEMA_V3),
        (4, SCHEMA_V4),
        (5, SCHEMA_V5),
        (6, SCHEMA_V6),
        (7, SCHEMA_V7),
        (8, SCHEMA_V8),
        (9, SCHEMA_V9),
        (10, SCHEMA_V10),
        (11, SCHEMA_V11),
        (12, SCHEMA_V12),
        (13, SCHEMA_V13),
        (14, SCHEMA_V14),
        (15, SCHEMA_V15),
    ] {
        if found < version {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()?;
        }
    }
    Ok(())
}

/// Presence groups as stored: a JSON array of `[group, tunnels]`.
fn groups_to_json(groups: &[(GroupId, u32)]) -> String {
    let pairs: Vec<(&str, u32)> = groups.iter().map(|(g, n)| (g.as_str(), *n)).collect();
    serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned())
}

fn groups_from_json(text: &str) -> Result<Vec<(GroupId, u32)>, StoreError> {
    let pairs: Vec<(String, u32)> =
        serde_json::from_str(text).map_err(|e| corrupt("presence groups", e))?;
    pairs
        .into_iter()
        .map(|(g, n)| Ok((GroupId::new(g).map_err(|e| corrupt("group id", e))?, n)))
        .collect()
}

fn current_version(conn: &Connection) -> Result<u64, StoreError> {
    Ok(conn.query_row(
        "SELECT value FROM meta WHERE key = 'config_version'",
        [],
        |r| r.get(0),
    )?)
}

fn bump(tx: &Transaction<'_>) -> Result<u64, StoreError> {
    tx.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'config_version'",
        [],
    )?;
    // When it changed, so that an edge can tell how long the change took
    // to reach it (`EdgeConfig.changed_at_ms`).
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'changed_at_ms'",
        [now_ms],
    )?;
    Ok(tx.query_row(
        "SELECT value FROM meta WHERE key = 'config_version'",
        [],
        |r| r.get(0),
    )?)
}

fn corrupt(
    what: &'static str,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> StoreError {
    StoreError::Corrupt {
        what,
        source: source.into(),
    }
}

fn group_id(s: String) -> Result<GroupId, StoreError> {
    GroupId::new(s).map_err(|e| corrupt("group id", e))
}

fn row_group(r: &Row<'_>) -> rusqlite::Result<(String, String, u64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

fn to_group((id, region, created_at): (String, String, u64)) -> Result<GroupRecord, StoreError> {
    Ok(GroupRecord {
        id: group_id(id)?,
        region,
        created_at,
    })
}

type AppRow = (
    String,
    String,
    String,
    String,
    String,
    bool,
    u64,
    String,
    bool,
    bool,
    String,
    String,
    bool,
    bool,
    Option<String>,
    Option<String>,
    bool,
    bool,
    Option<String>,
    Option<String>,
);

fn row_app(r: &Row<'_>) -> rusqlite::Result<AppRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
        r.get(13)?,
        r.get(14)?,
        r.get(15)?,
        r.get(16)?,
        r.get(17)?,
        r.get(18)?,
        r.get(19)?,
    ))
}

fn to_app(row: AppRow) -> Result<AppRecord, StoreError> {
    let (
        id,
        external_host,
        internal_url,
        group,
        timeout,
        validate_backend_tls,
        created_at,
        features,
        translate_headers,
        translate_body,
        assignment,
        identity_headers,
        hidden,
        maintenance,
        home_path,
        backend_ca_pem,
        http_only,
        persistent,
        oidc_client_id,
        oidc_client_secret,
    ) = row;
    Ok(AppRecord {
        id: AppId::new(id).map_err(|e| corrupt("app id", e))?,
        external_host,
        internal_url,
        connector_group: group_id(group)?,
        backend_timeout: timeout
            .parse::<BackendTimeout>()
            .map_err(|e| corrupt("backend timeout", e))?,
        validate_backend_tls,
        translate_headers,
        translate_body,
        required_features: serde_json::from_str(&features)
            .map_err(|e| corrupt("required features", e))?,
        assignment: serde_json::from_str(&assignment).map_err(|e| corrupt("assignment", e))?,
        identity_headers: serde_json::from_str(&identity_headers)
            .map_err(|e| corrupt("identity headers", e))?,
        hidden,
        created_at,
        maintenance,
        home_path,
        backend_ca_pem,
        http_only,
        persistent,
        oidc_client_id,
        oidc_client_secret: oidc_client_secret.map(portico_proto::api::ClientSecret::new),
    })
}

/// An app's JSON columns: required features, assignment, identity headers.
fn app_json(app: &AppRecord) -> Result<(String, String, String), StoreError> {
    Ok((
        serde_json::to_string(&app.required_features)
            .map_err(|e| corrupt("required features", e))?,
        serde_json::to_string(&app.assignment).map_err(|e| corrupt("assignment", e))?,
        serde_json::to_string(&app.identity_headers).map_err(|e| corrupt("identity headers", e))?,
    ))
}

const APP_COLS: &str = "id, external_host, internal_url, connector_group, backend_timeout, validate_backend_tls, created_at, required_features, translate_headers, translate_body, assignment, identity_headers, hidden, maintenance, home_path, backend_ca_pem, http_only, persistent, oidc_client_id, oidc_client_secret";

type TokenRow = (String, String, String, u64, u64, Option<u64>, Option<u64>);

const TOKEN_COLS: &str = "id, secret_sha256, scope, created_at, expires_at, used_at, revoked_at";

fn row_token(r: &Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
    ))
}

fn to_token(row: TokenRow) -> Result<TokenRecord, StoreError> {
    let (id, secret_sha256, scope, created_at, expires_at, used_at, revoked_at) = row;
    Ok(TokenRecord {
        id,
        secret_sha256,
        scope: serde_json::from_str::<TokenScope>(&scope).map_err(|e| corrupt("token scope", e))?,
        created_at,
        expires_at,
        used_at,
        revoked_at,
    })
}

const CONNECTOR_COLS: &str = "id, grp, host, version, enrolled_at, cert_serial, cert_not_after, deleted_at, last_seen, address_seen, tunnels";

type ConnectorRow = (
    String,
    String,
    String,
    String,
    u64,
    String,
    u64,
    Option<u64>,
    Option<u64>,
    Option<String>,
    u32,
);

fn row_connector(r: &Row<'_>) -> rusqlite::Result<ConnectorRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
    ))
}

fn to_connector(row: ConnectorRow) -> Result<ConnectorRecord, StoreError> {
    let (
        id,
        group,
        host,
        version,
        enrolled_at,
        serial,
        not_after,
        deleted_at,
        last_seen,
        address_seen,
        tunnels,
    ) = row;
    Ok(ConnectorRecord {
        id: ConnectorId::new(id).map_err(|e| corrupt("connector id", e))?,
        group: group_id(group)?,
        host,
        version,
        enrolled_at,
        cert: CertInfo { serial, not_after },
        deleted_at,
        last_seen,
        address_seen,
        tunnels,
    })
}

const EDGE_COLS: &str = "id, region, host, version, enrolled_at, cert_serial, cert_not_after, tunnel_addr, public_addr, last_seen, tunnels, deleted_at";

type EdgeRow = (
    String,
    String,
    String,
    String,
    u64,
    String,
    u64,
    Option<String>,
    Option<String>,
    Option<u64>,
    u32,
    Option<u64>,
);

fn row_edge(r: &Row<'_>) -> rusqlite::Result<EdgeRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
    ))
}

fn to_edge(row: EdgeRow) -> Result<EdgeRecord, StoreError> {
    let (
        id,
        region,
        host,
        version,
        enrolled_at,
        serial,
        not_after,
        tunnel_addr,
        public_addr,
        last_seen,
        tunnels,
        deleted_at,
    ) = row;
    Ok(EdgeRecord {
        id: EdgeId::new(id).map_err(|e| corrupt("edge id", e))?,
        region: region.parse().map_err(|e| corrupt("region id", e))?,
        host,
        version,
        enrolled_at,
        cert: CertInfo { serial, not_after },
        tunnel_addr,
        public_addr,
        last_seen,
        tunnels,
        deleted_at,
    })
}

/// Why an existing token cannot be used or revoked, if it cannot.
fn token_spent(tx: &Transaction<'_>, token_id: &str) -> Result<(), StoreError> {
    let found: Option<(Option<u64>, Option<u64>)> = tx
        .query_row(
            "SELECT used_at, revoked_at FROM tokens WHERE id = ?1",
            [token_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match found {
        None => Err(StoreError::NotFound {
            kind: "join token",
            id: token_id.to_owned(),
        }),
        Some((Some(_), _)) => Err(StoreError::TokenUsed),
        Some((None, Some(_))) => Err(StoreError::TokenRevoked),
        Some((None, None)) => Ok(()),
    }
}

fn use_token(tx: &Transaction<'_>, token_id: &str, now: u64) -> Result<(), StoreError> {
    match token_spent(tx, token_id) {
        Err(e) => Err(e),
        Ok(()) => {
            let n = tx.execute(
                "UPDATE tokens SET used_at = ?1 WHERE id = ?2 AND used_at IS NULL AND revoked_at IS NULL",
                params![now, token_id],
            )?;
            if n == 1 {
                Ok(())
            } else {
                Err(StoreError::TokenUsed)
            }
        }
    }
}

/// Marks a live connector or edge row deleted (the row stays, so that its
/// certificate keeps being refused) and bumps the version.
fn tombstone(
    tx: &Transaction<'_>,
    table: &'static str,
    kind: &'static str,
    id: &str,
    now: u64,
) -> Result<u64, StoreError> {
    let n = tx.execute(
        &format!("UPDATE {table} SET deleted_at = ?1 WHERE id = ?2 AND deleted_at IS NULL"),
        params![now, id],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound {
            kind,
            id: id.to_owned(),
        });
    }
    bump(tx)
}

/// `NotFound` (kind `region`) unless region `id` exists.
fn region_exists(tx: &Transaction<'_>, id: &str) -> Result<(), StoreError> {
    let found = tx
        .query_row("SELECT 1 FROM regions WHERE id = ?1", [id], |_| Ok(()))
        .optional()?;
    match found {
        Some(()) => Ok(()),
        None => Err(StoreError::NotFound {
            kind: "region",
            id: id.to_owned(),
        }),
    }
}

fn to_region((id, created_at): (String, u64)) -> Result<RegionRecord, StoreError> {
    Ok(RegionRecord {
        id: id.parse().map_err(|e| corrupt("region id", e))?,
        created_at,
    })
}

fn app_exists(tx: &Transaction<'_>, id: &AppId) -> Result<bool, StoreError> {
    Ok(tx
        .query_row(
            "SELECT 1 FROM apps WHERE id = ?1",
            [id.as_str()],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// What an app's row must satisfy besides its id: its group exists and no
/// other app has its external host.
fn check_app_refs(tx: &Transaction<'_>, app: &AppRecord) -> Result<(), StoreError> {
    let group: Option<String> = tx
        .query_row(
            "SELECT id FROM groups WHERE id = ?1",
            [app.connector_group.as_str()],
            |r| r.get(0),
        )
        .optional()?;
    if group.is_none() {
        return Err(StoreError::NotFound {
            kind: "group",
            id: app.connector_group.to_string(),
        });
    }
    let same_host: Option<String> = tx
        .query_row(
            "SELECT id FROM apps WHERE external_host = ?1 AND id != ?2",
            [app.external_host.as_str(), app.id.as_str()],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(other) = same_host {
        return Err(StoreError::HostTaken {
            host: app.external_host.clone(),
            app: other,
        });
    }
    Ok(())
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation
    )
}

impl Store for SqliteStore {
    fn config_version(&self) -> Result<u64, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT value FROM meta WHERE key = 'config_version'",
                [],
                |r| r.get(0),
            )?)
        })
    }

    fn config_changed_at_ms(&self) -> Result<u64, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT value FROM meta WHERE key = 'changed_at_ms'",
                [],
                |r| r.get(0),
            )?)
        })
    }

    fn create_region(&self, region: &RegionRecord) -> Result<(), StoreError> {
        self.tx(|tx| {
            let n = tx.execute(
                "INSERT OR IGNORE INTO regions (id, created_at) VALUES (?1, ?2)",
                params![region.id.as_str(), region.created_at],
            )?;
            if n == 0 {
                return Err(StoreError::AlreadyExists {
                    kind: "region",
                    id: region.id.to_string(),
                });
            }
            Ok(())
        })
    }

    fn get_region(&self, id: &RegionId) -> Result<Option<RegionRecord>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT id, created_at FROM regions WHERE id = ?1",
                [id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .map(to_region)
            .transpose()
        })
    }

    fn list_regions(&self) -> Result<Vec<RegionRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT id, created_at FROM regions ORDER BY id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.map(|r| to_region(r?)).collect()
        })
    }

    fn delete_region(&self, id: &RegionId, now: u64) -> Result<(), StoreError> {
        if *id == RegionId::default_region() {
            return Err(StoreError::DefaultRegion {
                region: id.to_string(),
            });
        }
        self.tx(|tx| {
            region_exists(tx, id.as_str())?;
            let edges: u64 = tx.query_row(
                "SELECT COUNT(*) FROM edges WHERE region = ?1 AND deleted_at IS NULL",
                [id.as_str()],
                |r| r.get(0),
            )?;
            let groups: u64 = tx.query_row(
                "SELECT COUNT(*) FROM groups WHERE region = ?1",
                [id.as_str()],
                |r| r.get(0),
            )?;
            // Scopes are JSON: read them as the rest of the store does.
            let mut stmt = tx.prepare(
                "SELECT scope FROM tokens
                 WHERE used_at IS NULL AND revoked_at IS NULL AND expires_at > ?1",
            )?;
            let scopes = stmt.query_map([now], |r| r.get::<_, String>(0))?;
            let mut tokens = 0u64;
            for scope in scopes {
                let scope: TokenScope =
                    serde_json::from_str(&scope?).map_err(|e| corrupt("token scope", e))?;
                if matches!(&scope, TokenScope::Edge { region } if region == id) {
                    tokens += 1;
                }
            }
            drop(stmt);
            if edges > 0 || groups > 0 || tokens > 0 {
                return Err(StoreError::RegionInUse {
                    region: id.to_string(),
                    edges,
                    groups,
                    tokens,
                });
            }
            tx.execute("DELETE FROM regions WHERE id = ?1", [id.as_str()])?;
            Ok(())
        })
    }

    fn ensure_group(&self, group: &GroupRecord) -> Result<bool, StoreError> {
        self.tx(|tx| {
            let n = tx.execute(
                "INSERT OR IGNORE INTO groups (id, region, created_at) VALUES (?1, ?2, ?3)",
                params![group.id.as_str(), group.region, group.created_at],
            )?;
            if n == 1 {
                bump(tx)?;
            }
            Ok(n == 1)
        })
    }

    fn create_group(&self, group: &GroupRecord) -> Result<u64, StoreError> {
        self.tx(|tx| {
            if group.region != "auto" {
                region_exists(tx, &group.region)?;
            }
            let n = tx.execute(
                "INSERT OR IGNORE INTO groups (id, region, created_at) VALUES (?1, ?2, ?3)",
                params![group.id.as_str(), group.region, group.created_at],
            )?;
            if n == 0 {
                return Err(StoreError::AlreadyExists {
                    kind: "group",
                    id: group.id.to_string(),
                });
            }
            bump(tx)
        })
    }

    fn get_group(&self, id: &GroupId) -> Result<Option<GroupRecord>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT id, region, created_at FROM groups WHERE id = ?1",
                [id.as_str()],
                row_group,
            )
            .optional()?
            .map(to_group)
            .transpose()
        })
    }

    fn list_groups(&self) -> Result<Vec<(GroupRecord, u32)>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT g.id, g.region, g.created_at,
                    (SELECT COUNT(*) FROM connectors c WHERE c.grp = g.id AND c.deleted_at IS NULL)
                 FROM groups g ORDER BY g.id",
            )?;
            let rows = stmt.query_map([], |r| Ok((row_group(r)?, r.get::<_, u32>(3)?)))?;
            rows.map(|r| {
                let (g, n) = r?;
                Ok((to_group(g)?, n))
            })
            .collect()
        })
    }

    fn delete_group(&self, id: &GroupId) -> Result<u64, StoreError> {
        if *id == GroupId::default_group() {
            return Err(StoreError::DefaultGroup {
                group: id.to_string(),
            });
        }
        self.tx(|tx| {
            let exists: Option<String> = tx
                .query_row("SELECT id FROM groups WHERE id = ?1", [id.as_str()], |r| {
                    r.get(0)
                })
                .optional()?;
            if exists.is_none() {
                return Err(StoreError::NotFound {
                    kind: "group",
                    id: id.to_string(),
                });
            }
            let connectors: u64 = tx.query_row(
                "SELECT COUNT(*) FROM connectors WHERE grp = ?1 AND deleted_at IS NULL",
                [id.as_str()],
                |r| r.get(0),
            )?;
            let apps: u64 = tx.query_row(
                "SELECT COUNT(*) FROM apps WHERE connector_group = ?1",
                [id.as_str()],
                |r| r.get(0),
            )?;
            if connectors > 0 || apps > 0 {
                return Err(StoreError::GroupNotEmpty {
                    group: id.to_string(),
                    connectors,
                    apps,
                });
            }
            tx.execute("DELETE FROM groups WHERE id = ?1", [id.as_str()])?;
            bump(tx)
        })
    }

    fn create_app(&self, app: &AppRecord) -> Result<u64, StoreError> {
        let (features, assignment, identity_headers) = app_json(app)?;
        self.tx(|tx| {
            if app_exists(tx, &app.id)? {
                return Err(StoreError::AlreadyExists {
                    kind: "app",
                    id: app.id.to_string(),
                });
            }
            check_app_refs(tx, app)?;
            tx.execute(
                &format!("INSERT INTO apps ({APP_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)"),
                params![
                    app.id.as_str(),
                    app.external_host,
                    app.internal_url,
                    app.connector_group.as_str(),
                    app.backend_timeout.to_string(),
                    app.validate_backend_tls,
                    app.created_at,
                    features,
                    app.translate_headers,
                    app.translate_body,
                    assignment,
                    identity_headers,
                    app.hidden,
                    app.maintenance,
                    app.home_path,
                    app.backend_ca_pem,
                    app.http_only,
                    app.persistent,
                    app.oidc_client_id,
                    app.oidc_client_secret.as_ref().map(|s| s.expose())
                ],
            )?;
            bump(tx)
        })
    }

    fn update_app(&self, app: &AppRecord) -> Result<u64, StoreError> {
        let (features, assignment, identity_headers) = app_json(app)?;
        self.tx(|tx| {
            if !app_exists(tx, &app.id)? {
                return Err(StoreError::NotFound {
                    kind: "app",
                    id: app.id.to_string(),
                });
            }
            check_app_refs(tx, app)?;
            tx.execute(
                "UPDATE apps SET external_host = ?2, internal_url = ?3, connector_group = ?4,
                    backend_timeout = ?5, validate_backend_tls = ?6, required_features = ?7,
                    translate_headers = ?8, translate_body = ?9, assignment = ?10,
                    identity_headers = ?11, hidden = ?12, maintenance = ?13,
                    home_path = ?14, backend_ca_pem = ?15, http_only = ?16,
                    persistent = ?17, oidc_client_id = ?18, oidc_client_secret = ?19
                 WHERE id = ?1",
                params![
                    app.id.as_str(),
                    app.external_host,
                    app.internal_url,
                    app.connector_group.as_str(),
                    app.backend_timeout.to_string(),
                    app.validate_backend_tls,
                    features,
                    app.translate_headers,
                    app.translate_body,
                    assignment,
                    identity_headers,
                    app.hidden,
                    app.maintenance,
                    app.home_path,
                    app.backend_ca_pem,
                    app.http_only,
                    app.persistent,
                    app.oidc_client_id,
                    app.oidc_client_secret.as_ref().map(|s| s.expose())
                ],
            )?;
            bump(tx)
        })
    }

    fn get_app(&self, id: &AppId) -> Result<Option<AppRecord>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {APP_COLS} FROM apps WHERE id = ?1"),
                [id.as_str()],
                row_app,
            )
            .optional()?
            .map(to_app)
            .transpose()
        })
    }

    fn list_apps(&self) -> Result<Vec<AppRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!("SELECT {APP_COLS} FROM apps ORDER BY id"))?;
            let rows = stmt.query_map([], row_app)?;
            rows.map(|r| to_app(r?)).collect()
        })
    }

    fn delete_app(&self, id: &AppId) -> Result<u64, StoreError> {
        self.tx(|tx| {
            let n = tx.execute("DELETE FROM apps WHERE id = ?1", [id.as_str()])?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    kind: "app",
                    id: id.to_string(),
                });
            }
            bump(tx)
        })
    }

    fn put_certificate(&self, cert: &CertificateRecord) -> Result<u64, StoreError> {
        let names =
            serde_json::to_string(&cert.names).map_err(|e| corrupt("certificate names", e))?;
        self.tx(|tx| {
            let exists: bool = tx
                .query_row(
                    "SELECT 1 FROM certificates WHERE id = ?1",
                    [&cert.id],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            let count: u64 = tx.query_row("SELECT COUNT(*) FROM certificates", [], |r| r.get(0))?;
            let max = portico_proto::api::MAX_CERTIFICATES;
            if !exists && count >= max as u64 {
                return Err(StoreError::Limit {
                    kind: "certificate",
                    max,
                });
            }
            tx.execute(
                "INSERT OR REPLACE INTO certificates
                    (id, names, issuer, not_before, not_after, chain_pem, key_pem, uploaded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    cert.id,
                    names,
                    cert.issuer,
                    cert.not_before,
                    cert.not_after,
                    cert.chain_pem,
                    cert.key_pem,
                    cert.uploaded_at
                ],
            )?;
            bump(tx)
        })
    }

    fn list_certificates(&self) -> Result<Vec<CertificateRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, names, issuer, not_before, not_after, chain_pem, key_pem, uploaded_at
                 FROM certificates ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u64>(3)?,
                    r.get::<_, u64>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, u64>(7)?,
                ))
            })?;
            rows.map(|row| {
                let (id, names, issuer, not_before, not_after, chain_pem, key_pem, uploaded_at) =
                    row?;
                Ok(CertificateRecord {
                    id,
                    names: serde_json::from_str(&names)
                        .map_err(|e| corrupt("certificate names", e))?,
                    issuer,
                    not_before,
                    not_after,
                    chain_pem,
                    key_pem,
                    uploaded_at,
                })
            })
            .collect()
        })
    }

    fn delete_certificate(&self, id: &str) -> Result<u64, StoreError> {
        self.tx(|tx| {
            let n = tx.execute("DELETE FROM certificates WHERE id = ?1", [id])?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    kind: "certificate",
                    id: id.to_owned(),
                });
            }
            bump(tx)
        })
    }

    fn sign_out(&self, sessions: &[SignedOut], now: u64) -> Result<Option<u64>, StoreError> {
        self.tx(|tx| {
            tx.execute("DELETE FROM signed_out WHERE until <= ?1", [now])?;
            let mut new = Vec::new();
            for s in sessions.iter().filter(|s| s.until > now) {
                let known = tx
                    .query_row("SELECT 1 FROM signed_out WHERE sid = ?1", [&s.sid], |_| {
                        Ok(())
                    })
                    .optional()?
                    .is_some();
                if !known && !new.iter().any(|n: &&SignedOut| n.sid == s.sid) {
                    new.push(s);
                }
            }
            if new.is_empty() {
                return Ok(None);
            }
            let count: u64 = tx.query_row("SELECT COUNT(*) FROM signed_out", [], |r| r.get(0))?;
            let max = portico_proto::api::MAX_SIGNED_OUT;
            if count + new.len() as u64 > max as u64 {
                return Err(StoreError::Limit {
                    kind: "signed-out session",
                    max,
                });
            }
            let version = bump(tx)?;
            for s in new {
                tx.execute(
                    "INSERT INTO signed_out (sid, until, version) VALUES (?1, ?2, ?3)",
                    params![s.sid, s.until, version],
                )?;
            }
            Ok(Some(version))
        })
    }

    fn signed_out_after(&self, after: u64, now: u64) -> Result<Vec<SignedOut>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT sid, until FROM signed_out WHERE version > ?1 AND until > ?2
                 ORDER BY version, sid",
            )?;
            let rows = stmt.query_map([after, now], |r| {
                Ok(SignedOut {
                    sid: r.get(0)?,
                    until: r.get(1)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn sign_out_user(
        &self,
        user: &str,
        before: u64,
        until: u64,
        now: u64,
    ) -> Result<u64, StoreError> {
        self.tx(|tx| {
            tx.execute("DELETE FROM signed_out_users WHERE until <= ?1", [now])?;
            let version = bump(tx)?;
            tx.execute(
                "INSERT INTO signed_out_users (user, before, until, version)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user) DO UPDATE SET
                    before = max(before, excluded.before),
                    until = max(until, excluded.until),
                    version = excluded.version",
                params![user, before, until, version],
            )?;
            Ok(version)
        })
    }

    fn signed_out_users_after(
        &self,
        after: u64,
        now: u64,
    ) -> Result<Vec<SignedOutUser>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT user, before, until FROM signed_out_users
                 WHERE version > ?1 AND until > ?2 ORDER BY version, user",
            )?;
            let rows = stmt.query_map([after, now], |r| {
                Ok(SignedOutUser {
                    user: r.get(0)?,
                    before: r.get(1)?,
                    until: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn use_handoff(&self, jti: &str, until: u64, now: u64) -> Result<bool, StoreError> {
        self.tx(|tx| {
            tx.execute("DELETE FROM used_handoffs WHERE until <= ?1", [now])?;
            let count: u64 =
                tx.query_row("SELECT COUNT(*) FROM used_handoffs", [], |r| r.get(0))?;
            let max = portico_proto::api::MAX_SIGNED_OUT;
            if count >= max as u64 {
                return Err(StoreError::Limit {
                    kind: "used handoff code",
                    max,
                });
            }
            let n = tx.execute(
                "INSERT OR IGNORE INTO used_handoffs (jti, until) VALUES (?1, ?2)",
                params![jti, until],
            )?;
            Ok(n == 1)
        })
    }

    fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let scope = serde_json::to_string(&token.scope).map_err(|e| corrupt("token scope", e))?;
        self.tx(|tx| {
            if let TokenScope::Edge { region } = &token.scope {
                region_exists(tx, region.as_str())?;
            }
            tx.execute(
                &format!("INSERT INTO tokens ({TOKEN_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
                params![
                    token.id,
                    token.secret_sha256,
                    scope,
                    token.created_at,
                    token.expires_at,
                    token.used_at,
                    token.revoked_at
                ],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::AlreadyExists {
                        kind: "join token",
                        id: token.id.clone(),
                    }
                } else {
                    e.into()
                }
            })?;
            Ok(())
        })
    }

    fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {TOKEN_COLS} FROM tokens WHERE id = ?1"),
                [id],
                row_token,
            )
            .optional()?
            .map(to_token)
            .transpose()
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {TOKEN_COLS} FROM tokens ORDER BY created_at DESC, id"
            ))?;
            let rows = stmt.query_map([], row_token)?;
            rows.map(|r| to_token(r?)).collect()
        })
    }

    fn revoke_token(&self, id: &str, now: u64) -> Result<(), StoreError> {
        self.tx(|tx| {
            token_spent(tx, id)?;
            tx.execute(
                "UPDATE tokens SET revoked_at = ?1 WHERE id = ?2",
                params![now, id],
            )?;
            Ok(())
        })
    }

    fn enroll_connector(
        &self,
        token_id: &str,
        now: u64,
        connector: &ConnectorRecord,
    ) -> Result<(), StoreError> {
        self.tx(|tx| {
            use_token(tx, token_id, now)?;
            let group: Option<String> = tx
                .query_row(
                    "SELECT id FROM groups WHERE id = ?1",
                    [connector.group.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            if group.is_none() {
                return Err(StoreError::NotFound {
                    kind: "group",
                    id: connector.group.to_string(),
                });
            }
            tx.execute(
                &format!(
                    "INSERT INTO connectors ({CONNECTOR_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
                ),
                params![
                    connector.id.as_str(),
                    connector.group.as_str(),
                    connector.host,
                    connector.version,
                    connector.enrolled_at,
                    connector.cert.serial,
                    connector.cert.not_after,
                    connector.deleted_at,
                    connector.last_seen,
                    connector.address_seen,
                    connector.tunnels
                ],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::AlreadyExists {
                        kind: "connector",
                        id: connector.id.to_string(),
                    }
                } else {
                    e.into()
                }
            })?;
            Ok(())
        })
    }

    fn enroll_edge(&self, token_id: &str, now: u64, edge: &EdgeRecord) -> Result<(), StoreError> {
        self.tx(|tx| {
            use_token(tx, token_id, now)?;
            region_exists(tx, edge.region.as_str())?;
            tx.execute(
                &format!(
                    "INSERT INTO edges ({EDGE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
                ),
                params![
                    edge.id.as_str(),
                    edge.region.as_str(),
                    edge.host,
                    edge.version,
                    edge.enrolled_at,
                    edge.cert.serial,
                    edge.cert.not_after,
                    edge.tunnel_addr,
                    edge.public_addr,
                    edge.last_seen,
                    edge.tunnels,
                    edge.deleted_at
                ],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::AlreadyExists {
                        kind: "edge",
                        id: edge.id.to_string(),
                    }
                } else {
                    e.into()
                }
            })?;
            if edge.tunnel_addr.is_some() {
                bump(tx)?;
            }
            Ok(())
        })
    }

    fn get_connector(&self, id: &ConnectorId) -> Result<Option<ConnectorRecord>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {CONNECTOR_COLS} FROM connectors WHERE id = ?1"),
                [id.as_str()],
                row_connector,
            )
            .optional()?
            .map(to_connector)
            .transpose()
        })
    }

    fn list_connectors(&self) -> Result<Vec<ConnectorRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {CONNECTOR_COLS} FROM connectors ORDER BY id"
            ))?;
            let rows = stmt.query_map([], row_connector)?;
            rows.map(|r| to_connector(r?)).collect()
        })
    }

    fn set_connector_cert(&self, id: &ConnectorId, cert: &CertInfo) -> Result<(), StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE connectors SET cert_serial = ?1, cert_not_after = ?2 WHERE id = ?3",
                params![cert.serial, cert.not_after, id.as_str()],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    kind: "connector",
                    id: id.to_string(),
                });
            }
            Ok(())
        })
    }

    fn delete_connector(&self, id: &ConnectorId, now: u64) -> Result<u64, StoreError> {
        self.tx(|tx| tombstone(tx, "connectors", "connector", id.as_str(), now))
    }

    fn connector_seen(&self, seen: &ConnectorSeen) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE connectors SET last_seen = ?1, address_seen = ?2, version = ?3, tunnels = ?4
                 WHERE id = ?5",
                params![
                    seen.at,
                    seen.address,
                    seen.version,
                    seen.tunnels,
                    seen.id.as_str()
                ],
            )?;
            Ok(())
        })
    }

    fn connector_region(&self, report: &ConnectorRegion) -> Result<(), StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE connectors SET region_report = ?1, region_reported_at = ?2
                 WHERE id = ?3 AND deleted_at IS NULL",
                params![report.report, report.at, report.id.as_str()],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    kind: "connector",
                    id: report.id.to_string(),
                });
            }
            Ok(())
        })
    }

    fn connector_regions(&self) -> Result<Vec<ConnectorRegion>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, region_reported_at, region_report FROM connectors
                 WHERE region_report IS NOT NULL AND deleted_at IS NULL ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<u64>>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, at, report) = row?;
                out.push(ConnectorRegion {
                    id: ConnectorId::new(id).map_err(|e| corrupt("connector id", e))?,
                    at: at.unwrap_or(0),
                    report,
                });
            }
            Ok(out)
        })
    }

    fn get_edge(&self, id: &EdgeId) -> Result<Option<EdgeRecord>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {EDGE_COLS} FROM edges WHERE id = ?1"),
                [id.as_str()],
                row_edge,
            )
            .optional()?
            .map(to_edge)
            .transpose()
        })
    }

    fn list_edges(&self) -> Result<Vec<EdgeRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {EDGE_COLS} FROM edges ORDER BY enrolled_at, id"
            ))?;
            let rows = stmt.query_map([], row_edge)?;
            rows.map(|r| to_edge(r?)).collect()
        })
    }

    fn set_edge_cert(&self, id: &EdgeId, cert: &CertInfo) -> Result<(), StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE edges SET cert_serial = ?1, cert_not_after = ?2 WHERE id = ?3",
                params![cert.serial, cert.not_after, id.as_str()],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    kind: "edge",
                    id: id.to_string(),
                });
            }
            Ok(())
        })
    }

    fn delete_edge(&self, id: &EdgeId, now: u64) -> Result<u64, StoreError> {
        self.tx(|tx| {
            let version = tombstone(tx, "edges", "edge", id.as_str(), now)?;
            tx.execute("DELETE FROM presence WHERE edge_id = ?1", [id.as_str()])?;
            Ok(version)
        })
    }

    fn edge_seen(&self, seen: &EdgeSeen) -> Result<Option<u64>, StoreError> {
        self.tx(|tx| {
            let before: Option<(Option<String>, Option<String>)> = tx
                .query_row(
                    "SELECT tunnel_addr, public_addr FROM edges WHERE id = ?1 AND deleted_at IS NULL",
                    [seen.id.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((tunnel_addr, public_addr)) = before else {
                return Err(StoreError::NotFound {
                    kind: "edge",
                    id: seen.id.to_string(),
                });
            };
            tx.execute(
                "UPDATE edges SET tunnel_addr = ?1, public_addr = ?2, version = ?3, last_seen = ?4, tunnels = ?5
                 WHERE id = ?6",
                params![
                    seen.tunnel_addr,
                    seen.public_addr,
                    seen.version,
                    seen.at,
                    seen.tunnels,
                    seen.id.as_str()
                ],
            )?;
            let mut groups = seen.groups.clone();
            groups.sort();
            groups.dedup_by(|a, b| a.0 == b.0);
            let groups_json = groups_to_json(&groups);
            type Before = (Option<String>, String, bool, Option<String>);
            let presence_before: Option<Before> = tx
                .query_row(
                    "SELECT mesh_addr, groups, draining, reported_from FROM presence WHERE edge_id = ?1",
                    [seen.id.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            tx.execute(
                "INSERT INTO presence (edge_id, mesh_addr, groups, draining, reported_from)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (edge_id) DO UPDATE SET mesh_addr = ?2, groups = ?3, draining = ?4,
                 reported_from = ?5",
                params![
                    seen.id.as_str(),
                    seen.mesh_addr,
                    groups_json,
                    seen.draining,
                    seen.reported_from
                ],
            )?;
            let presence_changed = match presence_before {
                None => seen.mesh_addr.is_some() || !groups.is_empty() || seen.draining,
                Some((mesh_addr, before, draining, from)) => {
                    let before: Vec<(GroupId, u32)> = groups_from_json(&before)?;
                    mesh_addr != seen.mesh_addr
                        || draining != seen.draining
                        || from != seen.reported_from
                        || before.iter().map(|g| &g.0).ne(groups.iter().map(|g| &g.0))
                }
            };
            let changed = tunnel_addr.as_deref() != Some(seen.tunnel_addr.as_str())
                || public_addr.as_deref() != Some(seen.public_addr.as_str())
                || presence_changed;
            if changed {
                Ok(Some(bump(tx)?))
            } else {
                Ok(None)
            }
        })
    }

    fn list_presence(&self) -> Result<Vec<PresenceRecord>, StoreError> {
        let guard = self.lock();
        let conn = guard.as_ref().ok_or(StoreError::Closed)?;
        let mut stmt = conn.prepare(
            "SELECT p.edge_id, p.mesh_addr, p.groups, p.draining, p.reported_from FROM presence p
             JOIN edges e ON e.id = p.edge_id WHERE e.deleted_at IS NULL ORDER BY p.edge_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (edge, mesh_addr, groups, draining, from) = row?;
            out.push(PresenceRecord {
                edge: EdgeId::new(edge).map_err(|e| corrupt("edge id", e))?,
                mesh_addr,
                groups: groups_from_json(&groups)?,
                draining,
                reported_from: match from {
                    Some(ip) => Some(ip.parse().map_err(|e| corrupt("reported_from", e))?),
                    None => None,
                },
            });
        }
        Ok(out)
    }

    fn expire_presence(&self, stale_before: u64) -> Result<Option<u64>, StoreError> {
        self.tx(|tx| {
            let n = tx.execute(
                "UPDATE presence SET groups = '[]' WHERE groups != '[]' AND edge_id IN
                 (SELECT id FROM edges WHERE last_seen IS NULL OR last_seen < ?1)",
                [stale_before],
            )?;
            if n > 0 {
                Ok(Some(bump(tx)?))
            } else {
                Ok(None)
            }
        })
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn close(&self) {
        let conn = self.lock().take();
        if let Some(conn) = conn {
            if let Err((_, e)) = conn.close() {
                tracing::warn!(error = %portico_agent::error_chain(&e), path = %self.path.display(), "closing the store failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database written by a router of schema version 1 opens, keeps its
    /// apps (which require no features) and tokens (not revoked), and moves
    /// to the current version.
    #[test]
    fn an_app_that_signed_users_in_before_assignments_lets_everyone_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("portico.db");
        {
            let mut conn = Connection::open(&path).expect("raw open");
            let tx = conn.transaction().expect("tx");
            for sql in [
                SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6, SCHEMA_V7,
                SCHEMA_V8, SCHEMA_V9,
            ] {
                tx.execute_batch(sql).expect("old schema");
            }
            tx.pragma_update(None, "user_version", 9).expect("v9");
            tx.execute(
                "INSERT INTO groups (id, region, created_at) VALUES ('Default', 'auto', 1)",
                [],
            )
            .expect("group");
            for (id, features) in [("open", "[]"), ("signed", "[\"oidc\"]")] {
                tx.execute(
                    "INSERT INTO apps (id, external_host, internal_url, connector_group, backend_timeout, validate_backend_tls, created_at, required_features)
                     VALUES (?1, ?1 || '.apps.test', 'http://10.0.0.1/', 'Default', 'default', 1, 7, ?2)",
                    params![id, features],
                )
                .expect("v9 app");
            }
            tx.commit().expect("commit");
        }
        let store = SqliteStore::open(&path).expect("open migrates");
        let apps = store.list_apps().expect("apps");
        let by_id = |id: &str| apps.iter().find(|a| a.id.as_str() == id).expect("app");
        assert!(by_id("open").assignment.is_nobody());
        assert!(by_id("signed").assignment.everyone);
        assert!(by_id("signed").identity_headers.is_empty() && !by_id("signed").hidden);
    }

    #[test]
    fn a_version_1_database_migrates_and_keeps_its_apps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("portico.db");
        {
            let conn = Connection::open(&path).expect("raw open");
            conn.execute_batch(SCHEMA_V1).expect("v1 schema");
            conn.pragma_update(None, "user_version", 1).expect("v1");
            conn.execute(
                "INSERT INTO groups (id, region, created_at) VALUES ('Default', 'auto', 1)",
                [],
            )
            .expect("group");
            conn.execute(
                "INSERT INTO apps (id, external_host, internal_url, connector_group, backend_timeout, validate_backend_tls, created_at)
                 VALUES ('old', 'old.apps.test', 'http://10.0.0.1/', 'Default', 'long', 1, 7)",
                [],
            )
            .expect("v1 app");
            conn.execute(
                "INSERT INTO tokens (id, secret_sha256, scope, created_at, expires_at, used_at)
                 VALUES ('00000000000000aa', 'x', '{\"kind\":\"edge\",\"region\":\"default\"}', 1, 2, NULL)",
                [],
            )
            .expect("v1 token");
        }
        let store = SqliteStore::open(&path).expect("open migrates");
        let app = store
            .get_app(&AppId::new("old").expect("id"))
            .expect("get")
            .expect("the app survives");
        assert_eq!(app.internal_url, "http://10.0.0.1/");
        assert_eq!(app.backend_timeout, BackendTimeout::Long);
        assert!(app.required_features.is_empty());
        assert!(app.translate_headers, "an old app keeps header translation");
        assert!(!app.translate_body);
        assert!(app.http_only && !app.persistent, "an old app: the defaults");
        assert_eq!(
            (app.oidc_client_id, app.oidc_client_secret),
            (None, None),
            "an old app signs in through the deployment's client"
        );
        let token = store
            .get_token("00000000000000aa")
            .expect("get")
            .expect("the token survives");
        assert_eq!((token.used_at, token.revoked_at), (None, None));
        store
            .create_app(&AppRecord {
                id: AppId::new("new").expect("id"),
                external_host: "new.apps.test".into(),
                internal_url: "http://10.0.0.2/".into(),
                connector_group: GroupId::default_group(),
                backend_timeout: BackendTimeout::Default,
                validate_backend_tls: true,
                translate_headers: false,
                translate_body: true,
                required_features: vec!["sign-in".into()],
                assignment: Default::default(),
                identity_headers: Default::default(),
                hidden: false,
                created_at: 8,
                maintenance: true,
                home_path: Some("/portal/?x=1".into()),
                backend_ca_pem: Some("-----BEGIN CERTIFICATE-----".into()),
                http_only: false,
                persistent: true,
                oidc_client_id: Some("new-client".into()),
                oidc_client_secret: Some(portico_proto::api::ClientSecret::new("new-secret")),
            })
            .expect("a new app with features");
        store.close();
        let conn = Connection::open(&path).expect("raw open");
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("user_version");
        assert_eq!(v, SCHEMA_VERSION);
        drop(conn);
        // Opening an up-to-date database again changes nothing.
        let store = SqliteStore::open(&path).expect("reopen");
        let apps = store.list_apps().expect("apps");
        assert_eq!(apps.len(), 2);
        assert_eq!(apps[0].required_features, ["sign-in"]);
        assert!(!apps[0].translate_headers && apps[0].translate_body);
        assert!(apps[1].required_features.is_empty());
        // Apps stored before maintenance mode existed are not in it.
        assert!(apps[0].maintenance && !apps[1].maintenance);
        assert_eq!(apps[0].home_path.as_deref(), Some("/portal/?x=1"));
        assert_eq!(apps[1].home_path, None);
        assert!(apps[0].backend_ca_pem.is_some() && apps[1].backend_ca_pem.is_none());
        assert_eq!(apps[0].oidc_client_id.as_deref(), Some("new-client"));
        assert_eq!(
            apps[0].oidc_client_secret.as_ref().map(|s| s.expose()),
            Some("new-secret")
        );
        assert_eq!(apps[1].oidc_client_id, None);
        // Its edge token's region is there, with `default`.
        let regions: Vec<String> = store
            .list_regions()
            .expect("regions")
            .into_iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(regions, ["default"]);
    }

    /// A version 3 database (before regions had rows) gets a region for
    /// every region it names: its edges' (deleted ones too), its pinned
    /// groups' and its edge tokens' (used or not), each dated by its first
    /// use, and `default`. What it holds keeps working: a token of such a
    /// region enrolls, and the region cannot be deleted while it is used.
    #[test]
    fn a_version_3_database_gets_a_region_for_every_region_it_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("portico.db");
        {
            let conn = Connection::open(&path).expect("raw open");
            for sql in [SCHEMA_V1, SCHEMA_V2, SCHEMA_V3] {
                conn.execute_batch(sql).expect("old schema");
            }
            conn.pragma_update(None, "user_version", 3).expect("v3");
            conn.execute_batch(
                "INSERT INTO groups (id, region, created_at) VALUES
                    ('Default', 'auto', 1), ('eu', 'eu-west', 40), ('eu2', 'eu-west', 30);
                 INSERT INTO edges (id, region, host, version, enrolled_at, cert_serial, cert_not_after, deleted_at)
                    VALUES ('e-1', 'us-east', 'h', 'v', 20, '01', 9, NULL),
                           ('e-2', 'us-east', 'h', 'v', 10, '02', 9, NULL),
                           ('e-3', 'old', 'h', 'v', 5, '03', 9, 6);
                 INSERT INTO tokens (id, secret_sha256, scope, created_at, expires_at, used_at, revoked_at)
                    VALUES ('00000000000000a1', 'x', '{\"kind\":\"edge\",\"region\":\"ap-south\"}', 50, 99999999999, NULL, NULL),
                           ('00000000000000a2', 'x', '{\"kind\":\"edge\",\"region\":\"us-east\"}', 1, 2, 1, NULL),
                           ('00000000000000a3', 'x', '{\"kind\":\"connector\",\"group\":\"eu\"}', 3, 4, NULL, NULL);",
            )
            .expect("v3 rows");
        }
        let store = SqliteStore::open(&path).expect("open migrates");
        let regions: Vec<(String, u64)> = store
            .list_regions()
            .expect("regions")
            .into_iter()
            .map(|r| (r.id.to_string(), r.created_at))
            .collect();
        let names: Vec<&str> = regions.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(names, ["ap-south", "default", "eu-west", "old", "us-east"]);
        let created = |id: &str| regions.iter().find(|(r, _)| r == id).expect(id).1;
        assert_eq!(created("us-east"), 1, "its used token came first");
        assert_eq!(created("eu-west"), 30);
        assert_eq!(created("old"), 5);
        assert_eq!(created("ap-south"), 50);
        assert!(created("default") > 1_700_000_000, "default: now");

        // The unused ap-south token holds its region, and still enrolls.
        match store.delete_region(&"ap-south".parse().expect("id"), 100) {
            Err(StoreError::RegionInUse { tokens: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
        store
            .enroll_edge(
                "00000000000000a1",
                100,
                &EdgeRecord {
                    id: EdgeId::new("e-new").expect("id"),
                    region: "ap-south".parse().expect("id"),
                    host: "h".into(),
                    version: "v".into(),
                    enrolled_at: 100,
                    cert: CertInfo {
                        serial: "04".into(),
                        not_after: 9,
                    },
                    tunnel_addr: None,
                    public_addr: None,
                    last_seen: None,
                    tunnels: 0,
                    deleted_at: None,
                },
            )
            .expect("an old token of a seeded region enrolls");
        // A region only a tombstone named is free to go.
        store
            .delete_region(&"old".parse().expect("id"), 100)
            .expect("delete old");
        match store.delete_region(&"eu-west".parse().expect("id"), 100) {
            Err(StoreError::RegionInUse { groups: 2, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
