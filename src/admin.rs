//! Admin commands: thin calls to the router's API, printed as tables or JSON.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use portico_agent::{RouterClient, RouterTrust};
use portico_proto::api::{
    App, AppPatch, AppSpec, Assignment, BackendTimeout, Certificate, CertificateUpload,
    ClientSecret, Connector, CreateGroup, CreateRegion, CreateToken, Edge, Group, Region,
    RevokeSessions, SessionsRevoked, TokenCreated, TokenInfo, TokenScope,
};
use portico_proto::{AppId, ConnectorId, EdgeId, GroupId, IdError, RegionId};
use serde::Serialize;

use crate::cli::{
    AppAction, AppCmd, CertAction, CertCmd, DeleteArgs, GroupAction, GroupCmd, RegionAction,
    RegionCmd, RouterConn, SessionAction, SessionCmd, TokenAction, TokenCmd,
};
use crate::out;

/// An admin client for the router named by `conn`.
pub fn client(conn: &RouterConn) -> anyhow::Result<RouterClient> {
    let ca_path = conn.router_ca.as_ref().context(
        "--router-ca (or PORTICO_ROUTER_CA) is required: the router's CA certificate, DATA/ca.pem on the router",
    )?;
    let ca = std::fs::read_to_string(ca_path)
        .with_context(|| format!("cannot read the router CA {}", ca_path.display()))?;
    let token = match (&conn.admin_token, &conn.admin_token_file) {
        (Some(t), _) => t.trim().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the admin token file {}", path.display()))?
            .trim()
            .to_owned(),
        (None, None) => anyhow::bail!(
            "an admin token is required: --admin-token-file (or PORTICO_ADMIN_TOKEN_FILE), DATA/admin-token on the router"
        ),
    };
    Ok(RouterClient::new(&conn.router, RouterTrust::CaPem(ca), None)?.with_bearer(token))
}

pub async fn edge_list(conn: &RouterConn) -> anyhow::Result<()> {
    let edges: Vec<Edge> = client(conn)?.get_json("/v1/edges").await?;
    print_list(
        conn.json,
        &edges,
        &[
            "ID",
            "REGION",
            "STATUS",
            "TUNNEL",
            "PUBLIC",
            "TUNNELS",
            "LAST SEEN",
        ],
        |e| {
            vec![
                e.id.to_string(),
                e.region.to_string(),
                edge_health(e.status).to_owned(),
                e.tunnel_addr.clone().unwrap_or_else(|| "-".into()),
                e.public_addr.clone().unwrap_or_else(|| "-".into()),
                e.tunnels.to_string(),
                ago(e.last_seen),
            ]
        },
    )
}

pub async fn edge_delete(args: &DeleteArgs) -> anyhow::Result<()> {
    client(&args.conn)?
        .delete(&format!("/v1/edges/{}", id::<EdgeId>(&args.id)?))
        .await?;
    out(format!(
        "deleted edge {} (its certificate is revoked; connectors stop dialing it)",
        args.id
    ));
    Ok(())
}

pub async fn connector_list(conn: &RouterConn) -> anyhow::Result<()> {
    let connectors: Vec<Connector> = client(conn)?.get_json("/v1/connectors").await?;
    print_list(
        conn.json,
        &connectors,
        &[
            "ID",
            "GROUP",
            "STATUS",
            "VERSION",
            "HOST",
            "ADDRESS",
            "EDGES",
            "LAST SEEN",
            "REGION",
            "RTT",
            "LAST MOVE",
        ],
        |c| {
            let mut row = vec![
                c.id.to_string(),
                c.group.to_string(),
                format!("{:?}", c.status).to_lowercase(),
                c.version.clone(),
                c.host.clone(),
                c.address_seen.clone().unwrap_or_else(|| "-".into()),
                if c.edges.is_empty() {
                    "-".into()
                } else {
                    c.edges
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                },
                ago(c.last_seen),
            ];
            row.extend(region_cells(c.region.as_ref()));
            row
        },
    )
}

/// `REGION` (the home; `pinned:R` for a pinned group, `!` when
/// degraded), `RTT` (`region=12ms` for each, `?` unmeasured) and `LAST
/// MOVE` (`from->to: reason`) of a connector's region report.
fn region_cells(choice: Option<&portico_proto::api::RegionChoice>) -> [String; 3] {
    let Some(c) = choice else {
        return ["-".into(), "-".into(), "-".into()];
    };
    let mut home = match (&c.home, &c.pinned) {
        (Some(h), Some(_)) => format!("pinned:{h}"),
        (Some(h), None) => h.to_string(),
        (None, _) => "-".into(),
    };
    if c.degraded {
        home.push_str("(degraded)");
    }
    let rtt = if c.regions.is_empty() {
        "-".into()
    } else {
        c.regions
            .iter()
            .map(|r| match r.rtt_micros {
                Some(us) => format!("{}={}ms", r.region, (us + 500) / 1000),
                None => format!("{}=?", r.region),
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let last = match &c.last_move {
        Some(m) => format!(
            "{}->{}: {}",
            m.from.as_ref().map_or("-".to_owned(), |f| f.to_string()),
            m.to,
            m.reason
        ),
        None => "-".into(),
    };
    [home, rtt, last]
}

pub async fn connector_delete(args: &DeleteArgs) -> anyhow::Result<()> {
    client(&args.conn)?
        .delete(&format!("/v1/connectors/{}", id::<ConnectorId>(&args.id)?))
        .await?;
    out(format!(
        "deleted connector {} (its certificate is revoked)",
        args.id
    ));
    Ok(())
}

pub async fn app(cmd: AppCmd) -> anyhow::Result<()> {
    match cmd.action {
        AppAction::Create(a) => {
            let spec = AppSpec {
                id: id::<AppId>(&a.id)?,
                external_host: a.external_host,
                internal_url: a.internal_url,
                connector_group: GroupId::new(&a.group).context("--group")?,
                backend_timeout: a
                    .backend_timeout
                    .parse::<BackendTimeout>()
                    .map_err(anyhow::Error::msg)
                    .context("--backend-timeout")?,
                validate_backend_tls: !a.no_validate_backend_tls,
                translate_headers: !a.no_translate_headers,
                translate_body: a.translate_body,
                required_features: a.required_features,
                preauth: a.preauth,
                assignment: assignment(&a.assign)?,
                identity_headers: identity_headers(&a.identity_headers)?,
                hidden: a.hidden,
                maintenance: a.maintenance,
                home_page: a.home_page,
                backend_ca_pem: a.backend_ca_file.as_deref().map(read_ca_file).transpose()?,
                http_only: !a.no_http_only,
                persistent: a.persistent,
                oidc_client_id: a.oidc_client_id,
                oidc_client_secret: a
                    .oidc_client_secret_file
                    .as_deref()
                    .map(read_client_secret)
                    .transpose()?,
            };
            let app: App = client(&a.conn)?.post_json("/v1/apps", &spec).await?;
            print_one(a.conn.json, &app, app_lines)
        }
        AppAction::Update(a) => {
            let patch = AppPatch {
                external_host: a.external_host,
                internal_url: a.internal_url,
                connector_group: a
                    .group
                    .as_deref()
                    .map(GroupId::new)
                    .transpose()
                    .context("--group")?,
                backend_timeout: a
                    .backend_timeout
                    .as_deref()
                    .map(str::parse::<BackendTimeout>)
                    .transpose()
                    .map_err(anyhow::Error::msg)
                    .context("--backend-timeout")?,
                validate_backend_tls: switch(a.validate_backend_tls, a.no_validate_backend_tls),
                translate_headers: switch(a.translate_headers, a.no_translate_headers),
                translate_body: switch(a.translate_body, a.no_translate_body),
                required_features: if a.no_required_features {
                    Some(vec![])
                } else if a.required_features.is_empty() {
                    None
                } else {
                    Some(a.required_features)
                },
                preauth: a.preauth,
                assignment: if a.no_assign {
                    Some(Assignment::default())
                } else if a.assign.is_empty() {
                    None
                } else {
                    Some(assignment(&a.assign)?)
                },
                identity_headers: if a.no_identity_headers {
                    Some(Default::default())
                } else if a.identity_headers.is_empty() {
                    None
                } else {
                    Some(identity_headers(&a.identity_headers)?)
                },
                hidden: switch(a.hidden, a.visible),
                maintenance: switch(a.maintenance, a.no_maintenance),
                home_page: if a.no_home_page {
                    Some(String::new())
                } else {
                    a.home_page
                },
                backend_ca_pem: if a.no_backend_ca {
                    Some(String::new())
                } else {
                    a.backend_ca_file.as_deref().map(read_ca_file).transpose()?
                },
                http_only: switch(a.http_only, a.no_http_only),
                persistent: switch(a.persistent, a.no_persistent),
                oidc_client_id: if a.no_oidc_client {
                    Some(String::new())
                } else {
                    a.oidc_client_id
                },
                oidc_client_secret: a
                    .oidc_client_secret_file
                    .as_deref()
                    .map(read_client_secret)
                    .transpose()?,
            };
            let app: App = client(&a.conn)?
                .patch_json(&format!("/v1/apps/{}", id::<AppId>(&a.id)?), &patch)
                .await?;
            print_one(a.conn.json, &app, app_lines)
        }
        AppAction::List(a) => {
            let apps: Vec<App> = client(&a.conn)?.get_json("/v1/apps").await?;
            print_list(
                a.conn.json,
                &apps,
                &[
                    "ID",
                    "EXTERNAL URL",
                    "INTERNAL URL",
                    "GROUP",
                    "CLIENT",
                    "TIMEOUT",
                    "TRANSLATE",
                    "FEATURES",
                    "CERT",
                ],
                |app| {
                    vec![
                        app.id.to_string(),
                        app.external_url.clone(),
                        app.internal_url.clone(),
                        app.connector_group.to_string(),
                        // An app's own OpenID client (never its secret).
                        app.oidc_client_id.clone().unwrap_or_else(|| "-".into()),
                        app.backend_timeout.to_string(),
                        translated(app),
                        features(&app.required_features),
                        cert_cell(app, now_unix()),
                    ]
                },
            )
        }
        AppAction::Show(a) => {
            let app: App = client(&a.conn)?
                .get_json(&format!("/v1/apps/{}", id::<AppId>(&a.id)?))
                .await?;
            print_one(a.conn.json, &app, app_lines)
        }
        AppAction::Test(a) => crate::app_test::run(a).await,
        AppAction::Delete(a) => {
            client(&a.conn)?
                .delete(&format!("/v1/apps/{}", id::<AppId>(&a.id)?))
                .await?;
            out(format!("deleted app {}", a.id));
            Ok(())
        }
    }
}

fn app_lines(app: &App) -> Vec<(&'static str, String)> {
    vec![
        ("id", app.id.to_string()),
        ("external url", app.external_url.clone()),
        ("home url", app.home_url.clone()),
        (
            "backend ca sha256",
            app.backend_ca_sha256.clone().unwrap_or_else(|| "-".into()),
        ),
        ("internal url", app.internal_url.clone()),
        ("connector group", app.connector_group.to_string()),
        ("backend timeout", app.backend_timeout.to_string()),
        ("validate backend tls", app.validate_backend_tls.to_string()),
        ("preauth", app.preauth.to_string()),
        (
            "oidc client",
            match &app.oidc_client_id {
                Some(id) => format!("{id} (the app's own; secret set)"),
                None if app.preauth == portico_proto::api::Preauth::Oidc => {
                    "the deployment's".into()
                }
                None => "-".into(),
            },
        ),
        ("session cookie http only", app.http_only.to_string()),
        ("session cookie persistent", app.persistent.to_string()),
        ("translate headers", app.translate_headers.to_string()),
        ("translate body", app.translate_body.to_string()),
        ("required features", features(&app.required_features)),
        ("assigned", app.assignment.to_string()),
        (
            "identity headers",
            if app.identity_headers.is_empty() {
                "-".into()
            } else {
                app.identity_headers
                    .iter()
                    .map(|(h, c)| format!("{h}={c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        ("hidden", app.hidden.to_string()),
        ("certificate", cert_cell(app, now_unix())),
        ("maintenance", app.maintenance.to_string()),
    ]
}

/// `--assign` values: `everyone`, `user:NAME`, `group:NAME`.
fn assignment(values: &[String]) -> anyhow::Result<Assignment> {
    let mut a = Assignment::default();
    for v in values {
        match v.split_once(':') {
            _ if v == "everyone" => a.everyone = true,
            Some(("user", name)) => a.users.push(name.to_owned()),
            Some(("group", name)) => a.groups.push(name.to_owned()),
            _ => anyhow::bail!("--assign {v:?}: give user:NAME, group:NAME or everyone"),
        }
    }
    Ok(a)
}

/// `--identity-header` values: `HEADER=CLAIM`.
fn identity_headers(
    values: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut map = std::collections::BTreeMap::new();
    for v in values {
        let Some((header, claim)) = v.split_once('=') else {
            anyhow::bail!("--identity-header {v:?}: give HEADER=CLAIM, e.g. X-Remote-User=email");
        };
        if map
            .insert(header.trim().to_owned(), claim.trim().to_owned())
            .is_some()
        {
            anyhow::bail!("--identity-header: {header} is given twice");
        }
    }
    Ok(map)
}

/// The app's certificate as a table cell: the uploaded one's days left
/// (`42d`, `expired 3d ago`), or `-` when none covers its host (one under
/// the apps domain then gets the edges' router-issued wildcard, renewed
/// by the edges themselves).
fn cert_cell(app: &App, now: u64) -> String {
    match &app.certificate {
        None => "-".into(),
        Some(c) => expiry(c.not_after, now),
    }
}

/// `42d left`, `5h left`, or `expired 3d ago`.
fn expiry(not_after: u64, now: u64) -> String {
    const DAY: u64 = 86_400;
    if not_after <= now {
        let ago = now - not_after;
        return if ago >= DAY {
            format!("expired {}d ago", ago / DAY)
        } else {
            "expired".into()
        };
    }
    let left = not_after - now;
    if left >= DAY {
        format!("{}d left", left / DAY)
    } else {
        format!("{}h left", left / 3600)
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `portico session`.
pub async fn session(cmd: SessionCmd) -> anyhow::Result<()> {
    match cmd.action {
        SessionAction::Revoke(a) => {
            let done: SessionsRevoked = client(&a.conn)?
                .post_json("/v1/sessions/revoke", &RevokeSessions { user: a.user })
                .await?;
            print_one(a.conn.json, &done, |d| {
                vec![
                    ("user", d.user.clone()),
                    ("sessions begun until", rfc3339(d.before)),
                    ("ended", "at every edge, within seconds".into()),
                ]
            })
        }
    }
}

/// `portico cert`.
pub async fn cert(cmd: CertCmd) -> anyhow::Result<()> {
    match cmd.action {
        CertAction::Upload(a) => {
            let read = |p: &std::path::Path, max: usize| -> anyhow::Result<String> {
                let len = std::fs::metadata(p)
                    .with_context(|| format!("cannot read {}", p.display()))?
                    .len();
                anyhow::ensure!(
                    len <= max as u64,
                    "{} is {len} bytes; at most {max} are accepted",
                    p.display()
                );
                std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
            };
            let client = client(&a.conn)?;
            let mut hosts = a.host;
            for app in &a.app {
                let found: App = client
                    .get_json(&format!("/v1/apps/{}", id::<AppId>(app)?))
                    .await
                    .with_context(|| format!("--app {app}"))?;
                hosts.push(found.external_host);
            }
            let upload = CertificateUpload {
                chain_pem: read(&a.chain, portico_proto::api::MAX_CERT_CHAIN_PEM)?,
                key_pem: read(&a.key, portico_proto::api::MAX_CERT_KEY_PEM)?,
                hosts,
            };
            let cert: Certificate = client.post_json("/v1/certificates", &upload).await?;
            print_one(a.conn.json, &cert, cert_lines)
        }
        CertAction::List(a) => {
            let certs: Vec<Certificate> = client(&a.conn)?.get_json("/v1/certificates").await?;
            let now = now_unix();
            print_list(
                a.conn.json,
                &certs,
                &["ID", "NAMES", "ISSUER", "EXPIRES", "LEFT"],
                |c| {
                    vec![
                        c.id.clone(),
                        c.names.join(","),
                        c.issuer.clone(),
                        rfc3339(c.not_after),
                        expiry(c.not_after, now),
                    ]
                },
            )
        }
        CertAction::Delete(a) => {
            anyhow::ensure!(
                !a.id.is_empty() && a.id.len() <= 64 && a.id.bytes().all(|b| b.is_ascii_hexdigit()),
                "{:?} is not a certificate id: the hex digits `cert list` shows",
                a.id
            );
            client(&a.conn)?
                .delete(&format!("/v1/certificates/{}", a.id))
                .await?;
            out(format!("deleted certificate {}", a.id));
            Ok(())
        }
    }
}

fn cert_lines(c: &Certificate) -> Vec<(&'static str, String)> {
    vec![
        ("id", c.id.clone()),
        ("names", c.names.join(", ")),
        ("issuer", c.issuer.clone()),
        ("not before", rfc3339(c.not_before)),
        ("not after", rfc3339(c.not_after)),
        ("left", expiry(c.not_after, now_unix())),
    ]
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// A `--backend-ca-file`, read whole when it is within the router's limit
/// (which the router checks again, with what a bundle may hold).
/// An app's `--oidc-client-secret-file`, as the API takes it.
fn read_client_secret(path: &std::path::Path) -> anyhow::Result<ClientSecret> {
    crate::read_client_secret(path).map(ClientSecret::new)
}

fn read_ca_file(path: &std::path::Path) -> anyhow::Result<String> {
    let max = portico_proto::api::MAX_BACKEND_CA_BYTES;
    let len = std::fs::metadata(path)
        .with_context(|| format!("--backend-ca-file {}", path.display()))?
        .len();
    if len > max as u64 {
        anyhow::bail!(
            "--backend-ca-file {} is {len} bytes; a backend CA bundle may be at most {max}",
            path.display()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("--backend-ca-file {}", path.display()))
}

/// A `--x` / `--no-x` pair of `app update` as a patch field: `None` when
/// neither was given (clap refuses both).
fn switch(on: bool, off: bool) -> Option<bool> {
    match (on, off) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

/// What an app translates, as a table cell: `headers`, `body`,
/// `headers,body` or `-`.
fn translated(app: &App) -> String {
    match (app.translate_headers, app.translate_body) {
        (true, true) => "headers,body".into(),
        (true, false) => "headers".into(),
        (false, true) => "body".into(),
        (false, false) => "-".into(),
    }
}

/// Required features as a table cell: comma-separated, `-` for none.
fn features(names: &[String]) -> String {
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

pub async fn region(cmd: RegionCmd) -> anyhow::Result<()> {
    match cmd.action {
        RegionAction::Create(a) => {
            let body = CreateRegion {
                id: id::<RegionId>(&a.id)?,
            };
            let r: Region = client(&a.conn)?.post_json("/v1/regions", &body).await?;
            if a.conn.json {
                out(serde_json::to_string_pretty(&r)?);
            } else {
                out(format!(
                    "created region {} (enroll edges with `portico token create --edge --region {}`)",
                    r.id, r.id
                ));
            }
            Ok(())
        }
        RegionAction::List(a) => {
            let regions: Vec<Region> = client(&a.conn)?.get_json("/v1/regions").await?;
            print_table(
                a.conn.json,
                &regions,
                &[
                    "REGION",
                    "EDGE",
                    "STATUS",
                    "TUNNELS",
                    "CONNECTORS",
                    "LAST SEEN",
                ],
                region_rows,
            )
        }
        RegionAction::Delete(a) => {
            client(&a.conn)?
                .delete(&format!("/v1/regions/{}", id::<RegionId>(&a.id)?))
                .await?;
            out(format!("deleted region {}", a.id));
            Ok(())
        }
    }
}

/// A row per edge of a region (its connectors are the region's, on every
/// row), or one row of `-` for a region without edges.
fn region_rows(r: &Region) -> Vec<Vec<String>> {
    if r.edges.is_empty() {
        let mut row = vec![r.id.to_string()];
        row.extend(["-", "-", "-"].map(String::from));
        row.push(r.connectors.to_string());
        row.push("-".into());
        return vec![row];
    }
    r.edges
        .iter()
        .map(|e| {
            vec![
                r.id.to_string(),
                e.id.to_string(),
                edge_health(e.status).to_owned(),
                e.tunnels.to_string(),
                r.connectors.to_string(),
                ago(e.last_seen),
            ]
        })
        .collect()
}

pub async fn group(cmd: GroupCmd) -> anyhow::Result<()> {
    match cmd.action {
        GroupAction::Create(a) => {
            let body = CreateGroup {
                id: id::<GroupId>(&a.id)?,
                region: a.region,
            };
            let g: Group = client(&a.conn)?.post_json("/v1/groups", &body).await?;
            print_one(a.conn.json, &g, |g| {
                vec![("id", g.id.to_string()), ("region", g.region.clone())]
            })
        }
        GroupAction::List(a) => {
            let groups: Vec<Group> = client(&a.conn)?.get_json("/v1/groups").await?;
            print_list(a.conn.json, &groups, &["ID", "REGION", "CONNECTORS"], |g| {
                vec![g.id.to_string(), g.region.clone(), g.connectors.to_string()]
            })
        }
        GroupAction::Delete(a) => {
            client(&a.conn)?
                .delete(&format!("/v1/groups/{}", id::<GroupId>(&a.id)?))
                .await?;
            out(format!("deleted group {}", a.id));
            Ok(())
        }
    }
}

pub async fn token(cmd: TokenCmd) -> anyhow::Result<()> {
    let a = match cmd.action {
        TokenAction::Create(a) => a,
        TokenAction::List(a) => {
            let tokens: Vec<TokenInfo> = client(&a.conn)?.get_json("/v1/tokens").await?;
            return print_list(
                a.conn.json,
                &tokens,
                &["ID", "SCOPE", "STATUS", "CREATED", "EXPIRES", "USED"],
                |t| {
                    vec![
                        t.id.clone(),
                        scope_text(&t.scope),
                        t.status.to_string(),
                        utc(t.created_at),
                        utc(t.expires_at),
                        t.used_at.map_or_else(|| "-".into(), utc),
                    ]
                },
            );
        }
        TokenAction::Revoke(a) => {
            client(&a.conn)?
                .delete(&format!("/v1/tokens/{}", token_id(&a.id)?))
                .await?;
            out(format!("revoked join token {}", a.id));
            return Ok(());
        }
    };
    let scope = match (&a.group, a.edge) {
        (Some(g), false) => TokenScope::Connector {
            group: GroupId::new(g).context("--group")?,
        },
        (None, true) => TokenScope::Edge {
            region: RegionId::new(&a.region).context("--region")?,
        },
        _ => anyhow::bail!("give exactly one of --group G or --edge"),
    };
    let body = CreateToken {
        scope,
        ttl_secs: Some(a.ttl.as_secs()),
    };
    let t: TokenCreated = client(&a.conn)?.post_json("/v1/tokens", &body).await?;
    if a.conn.json {
        out(serde_json::to_string_pretty(&t)?);
    } else {
        // The token alone on stdout, so `$(portico token create …)` works;
        // what it is for goes to stderr.
        out(&t.token);
        eprintln!(
            "single-use join token {} for {}, valid until {}",
            t.id,
            match &t.scope {
                TokenScope::Connector { group } => format!("a connector in group {group}"),
                TokenScope::Edge { region } => format!("an edge in region {region}"),
            },
            utc(t.expires_at)
        );
    }
    Ok(())
}

/// A token scope as a table cell.
fn scope_text(scope: &TokenScope) -> String {
    match scope {
        TokenScope::Connector { group } => format!("connector group={group}"),
        TokenScope::Edge { region } => format!("edge region={region}"),
    }
}

/// A join token's id as `token create` and `token list` print it.
fn token_id(s: &str) -> anyhow::Result<&str> {
    anyhow::ensure!(
        s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()),
        "invalid join token id {s:?}: it is the 16 hex digits after `pt1.`, as `portico token list` shows"
    );
    Ok(s)
}

/// Unix seconds as an RFC 3339 UTC time.
fn utc(t: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

/// Parses an id for the API path it goes in. `portico_proto::ids` is the
/// one place ids are checked, so nothing that would change the path (a
/// `/`, `.` or `..`) gets this far.
fn id<T: std::str::FromStr<Err = IdError>>(s: &str) -> anyhow::Result<T> {
    Ok(s.parse()?)
}

fn ago(t: Option<u64>) -> String {
    let Some(t) = t else { return "never".into() };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{}s ago", now.saturating_sub(t))
}

/// A table with a row per item, or the items as JSON.
fn print_list<T: Serialize>(
    json: bool,
    items: &[T],
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    print_table(json, items, header, |item| vec![row(item)])
}

/// A table with any number of rows per item, or the items as JSON.
fn print_table<T: Serialize>(
    json: bool,
    items: &[T],
    header: &[&str],
    rows: impl Fn(&T) -> Vec<Vec<String>>,
) -> anyhow::Result<()> {
    if json {
        out(serde_json::to_string_pretty(items)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| h.to_string()).collect())
        .chain(items.iter().flat_map(rows))
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out(line.join("  ").trim_end());
    }
    Ok(())
}

fn print_one<T: Serialize>(
    json: bool,
    item: &T,
    lines: impl Fn(&T) -> Vec<(&'static str, String)>,
) -> anyhow::Result<()> {
    if json {
        out(serde_json::to_string_pretty(item)?);
        return Ok(());
    }
    for (k, v) in lines(item) {
        out(format!("{k:<22}{v}"));
    }
    Ok(())
}

/// An edge's status as the tables show it: `healthy` while its reports
/// are fresh (within 3 report intervals, 15 s), `unhealthy` once it has
/// been unheard for longer (`status` in JSON says `active`/`inactive`),
/// `draining` while it shuts down (in no DNS answer or presence, and
/// finishing what it serves).
fn edge_health(status: portico_proto::api::Status) -> &'static str {
    match status {
        portico_proto::api::Status::Active => "healthy",
        portico_proto::api::Status::Inactive => "unhealthy",
        portico_proto::api::Status::Draining => "draining",
    }
}
