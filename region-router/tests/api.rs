//! The router's HTTPS API end to end: a real router on 127.0.0.1:0, real
//! TLS, and the agent's `RouterClient` (plus a raw hyper client where a
//! typed client cannot send what is tested).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portico_agent::pki;
use portico_agent::{ClientError, Credentials, RouterClient, RouterTrust, Secret};
use portico_proto::api::{
    self, ApiError, App, CertResponse, Connector, ConnectorConfig, CsrRequest, Edge, EdgeConfig,
    EdgeReport, EnrollRequest, EnrollResponse, Group, Identity, JoinToken, Status, TokenCreated,
    TokenScope, TunnelReport,
};
use portico_proto::ids::{ConnectorId, EdgeId, GroupId, RegionId};
use portico_router::store::{SqliteStore, Store, TokenRecord};
use portico_router::{Config, Handle};
use rustls::pki_types::{CertificateDer, UnixTime};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A hang guard only: no test asserts how long anything takes.
const GUARD: Duration = Duration::from_secs(30);

async fn start(
    dir: &Path,
    tweak: impl FnOnce(&mut Config),
) -> anyhow::Result<(Handle, CancellationToken)> {
    // A data directory of the operator's own is private, as
    // `install -d -m 700` makes it (a bare tempdir is 0755 under umask 022,
    // which the router refuses).
    if dir.is_dir() {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let mut config = Config::new(dir);
    // Custom domains' CNAME checks ask no one outside loopback: nothing
    // listens on this port, so a check fails (tests/custom_domains.rs
    // serves a zone).
    config.check_nameservers = vec![SocketAddr::from(([127, 0, 0, 1], 9))];
    config.listen = "127.0.0.1:0".parse()?;
    config.metrics_listen = Some("127.0.0.1:0".parse()?);
    tweak(&mut config);
    let shutdown = CancellationToken::new();
    let handle = portico_router::start(config, shutdown.clone()).await?;
    Ok((handle, shutdown))
}

async fn stop(handle: Handle, shutdown: CancellationToken) -> anyhow::Result<()> {
    shutdown.cancel();
    tokio::time::timeout(GUARD, handle.wait()).await??;
    Ok(())
}

fn anon(h: &Handle) -> anyhow::Result<RouterClient> {
    Ok(RouterClient::new(
        &h.url(),
        RouterTrust::CaPem(h.ca_pem.clone()),
        None,
    )?)
}

fn admin(h: &Handle) -> anyhow::Result<RouterClient> {
    Ok(anon(h)?.with_bearer(h.admin_token()))
}

fn agent(h: &Handle, creds: &Credentials) -> anyhow::Result<RouterClient> {
    Ok(RouterClient::new(
        &h.url(),
        RouterTrust::CaPem(h.ca_pem.clone()),
        Some(creds),
    )?)
}

/// The status and body of a refusal.
fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, ApiError) {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => (
            e.status().unwrap_or_else(|| panic!("no status in {e}")),
            e.api_error()
                .unwrap_or_else(|| panic!("no ApiError in {e}"))
                .clone(),
        ),
    }
}

fn assert_refused<T: std::fmt::Debug>(
    r: Result<T, ClientError>,
    status: u16,
    field: Option<&str>,
    message_part: &str,
) {
    let (got, err) = refusal(r);
    assert_eq!(got, status, "status of {err:?}");
    assert_eq!(err.field.as_deref(), field, "field of {err:?}");
    assert!(
        err.message.contains(message_part),
        "message {:?} should mention {message_part:?}",
        err.message
    );
}

async fn create_token(admin: &RouterClient, scope: TokenScope) -> anyhow::Result<TokenCreated> {
    Ok(admin
        .post_json("/v1/tokens", &json!({ "scope": scope, "ttl_secs": 600 }))
        .await?)
}

/// Enrolls with a fresh key, trusting the router by the token's CA pin.
async fn enroll(h: &Handle, token: &str) -> Result<(Credentials, EnrollResponse), ClientError> {
    enroll_with(h, token, None, None).await
}

/// [`enroll`], saying what it enrolls as and in which region, as agents do.
async fn enroll_with(
    h: &Handle,
    token: &str,
    kind: Option<api::EnrollKind>,
    region: Option<RegionId>,
) -> Result<(Credentials, EnrollResponse), ClientError> {
    let key = pki::generate_key()?;
    let parsed: JoinToken = token.parse().expect("token parses");
    let client = RouterClient::new(&h.url(), RouterTrust::CaSha256(parsed.ca_sha256), None)?;
    let answer: EnrollResponse = client
        .post_json(
            "/v1/enroll",
            &EnrollRequest {
                token: token.to_owned(),
                csr_pem: pki::csr_pem(&key)?,
                host: "test-host".into(),
                version: "0.1.0-test".into(),
                kind,
                region,
            },
        )
        .await?;
    let creds = Credentials::new(
        answer.identity.clone(),
        Secret::new(key.serialize_pem()),
        answer.cert.cert_pem.clone(),
        answer.cert.ca_pem.clone(),
    )?;
    Ok((creds, answer))
}

struct CertNames {
    uris: Vec<String>,
    dns: Vec<String>,
    serial: String,
}

fn cert_names(pem: &str) -> anyhow::Result<CertNames> {
    let der = pki::parse_certs_pem(pem)?.remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())?;
    let san = cert.subject_alternative_name()?.context("no SAN")?;
    let mut names = CertNames {
        uris: vec![],
        dns: vec![],
        serial: pki::serial_hex(&der)?,
    };
    for n in &san.value.general_names {
        match n {
            x509_parser::extensions::GeneralName::URI(u) => names.uris.push((*u).to_owned()),
            x509_parser::extensions::GeneralName::DNSName(d) => names.dns.push((*d).to_owned()),
            _ => {}
        }
    }
    Ok(names)
}

/// Checks that the leaf of `pem` chains to the CA as a client certificate.
fn chains_to_ca(pem: &str, ca_pem: &str) -> anyhow::Result<()> {
    let leaf: CertificateDer<'static> = pki::parse_certs_pem(pem)?.remove(0);
    let verifier = pki::client_verifier(ca_pem, false)?;
    verifier.verify_client_cert(&leaf, &[], UnixTime::now())?;
    Ok(())
}

/// A raw HTTPS call, for bodies the typed client cannot send.
async fn raw(
    h: &Handle,
    method: &str,
    path: &str,
    body: &str,
    bearer: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let (status, _, body) = raw_from(h, None, method, path, body, bearer).await?;
    Ok((status, body))
}

/// A raw HTTPS call from a chosen local address; answers the status, the
/// headers and the body.
async fn raw_from(
    h: &Handle,
    source: Option<std::net::IpAddr>,
    method: &str,
    path: &str,
    body: &str,
    bearer: Option<&str>,
) -> anyhow::Result<(u16, http::HeaderMap, String)> {
    let verifier = pki::fixed_name_verifier(&h.ca_pem, api::ROUTER_SERVER_NAME)?;
    let tls = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_local_address(source);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", h.url()))
        .header("content-type", "application/json");
    if let Some(token) = bearer {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body.to_owned())))?)
        .await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

/// A plain-HTTP GET (the metrics listener).
async fn plain_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = client
        .request(http::Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new()))?)
        .await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn app_spec(id: &str, group: &str) -> serde_json::Value {
    json!({ "id": id, "internal_url": "http://10.0.0.5:8080/", "connector_group": group })
}

#[tokio::test]
async fn admin_crud_and_validation_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |_| {}).await?;
    let admin = admin(&h)?;

    // Health needs no credentials.
    let (status, body) = raw(&h, "GET", "/healthz", "", None).await?;
    assert_eq!((status, body.trim()), (200, "ok"));

    // Admin token: missing, wrong.
    assert_refused(
        anon(&h)?.get_json::<Vec<App>>("/v1/apps").await,
        401,
        None,
        "Bearer",
    );
    assert_refused(
        anon(&h)?
            .with_bearer("00".repeat(32))
            .get_json::<Vec<App>>("/v1/apps")
            .await,
        401,
        None,
        "wrong admin token",
    );
    // An agent endpoint without a client certificate.
    assert_refused(
        admin.get_json::<EdgeConfig>("/v1/edge/config").await,
        401,
        None,
        "edge client certificate",
    );

    // Groups.
    let groups: Vec<Group> = admin.get_json("/v1/groups").await?;
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].id, GroupId::default_group());
    let g: Group = admin
        .post_json("/v1/groups", &json!({ "id": "dc1" }))
        .await?;
    assert_eq!(
        (g.id.as_str(), g.region.as_str(), g.connectors),
        ("dc1", "auto", 0)
    );
    assert_refused(
        admin
            .post_json::<_, Group>("/v1/groups", &json!({ "id": "dc1" }))
            .await,
        409,
        Some("id"),
        "already exists",
    );
    assert_refused(
        admin
            .post_json::<_, Group>(
                "/v1/groups",
                &json!({ "id": "x", "region": "not a region" }),
            )
            .await,
        400,
        Some("region"),
        "auto",
    );

    // Apps.
    let app: App = admin.post_json("/v1/apps", &app_spec("hr", "dc1")).await?;
    assert_eq!(app.external_host, "hr.apps.localhost");
    assert_eq!(app.external_url, "https://hr.apps.localhost/");
    assert_eq!(app.connector_group.as_str(), "dc1");
    let custom: App = admin
        .post_json(
            "/v1/apps",
            &json!({ "id": "wiki", "internal_url": "https://wiki.corp:8443/w", "external_host": "Docs.Apps.Localhost" }),
        )
        .await?;
    assert_eq!(
        custom.external_host, "docs.apps.localhost",
        "external hosts are lower-cased"
    );
    assert_eq!(custom.connector_group, GroupId::default_group());
    // Internal URLs are stored in canonical form.
    let canonical: App = admin
        .post_json(
            "/v1/apps",
            &json!({ "id": "canon", "internal_url": "HTTP://Intra.Corp:80" }),
        )
        .await?;
    assert_eq!(canonical.internal_url, "http://intra.corp/");
    let got: App = admin.get_json("/v1/apps/canon").await?;
    assert_eq!(got.internal_url, "http://intra.corp/");
    admin.delete("/v1/apps/canon").await?;
    let got: App = admin.get_json("/v1/apps/hr").await?;
    assert_eq!(got, app);
    let all: Vec<App> = admin.get_json("/v1/apps").await?;
    assert_eq!(all.len(), 2);

    for (url, part) in [
        ("ftp://10.0.0.5/", "scheme"),
        ("http://user:pw@10.0.0.5/", "user name"),
        ("http://10.0.0.5/#top", "fragment"),
        ("nonsense", "not a URL"),
        ("http://10.0.0.5/?tenant=1", "query string"),
        ("http://10.0.0.5/a\tb", "control characters"),
        ("http://10.0.0.5/\r\nX-Evil: 1", "control characters"),
    ] {
        assert_refused(
            admin
                .post_json::<_, App>("/v1/apps", &json!({ "id": "bad", "internal_url": url }))
                .await,
            400,
            Some("internal_url"),
            part,
        );
    }
    for host in [
        "hr.example.com",
        "apps.localhost",
        "bad_host.apps.localhost",
        "evilapps.localhost",
    ] {
        assert_refused(
            admin
                .post_json::<_, App>(
                    "/v1/apps",
                    &json!({ "id": "bad", "internal_url": "http://x/", "external_host": host }),
                )
                .await,
            400,
            Some("external_host"),
            "",
        );
    }
    assert_refused(
        admin
            .post_json::<_, App>(
                "/v1/apps",
                &json!({ "id": "hr2", "internal_url": "http://x/", "external_host": "HR.apps.localhost" }),
            )
            .await,
        409,
        Some("external_host"),
        "hr",
    );
    assert_refused(
        admin
            .post_json::<_, App>("/v1/apps", &app_spec("hr", "dc1"))
            .await,
        409,
        Some("id"),
        "already exists",
    );
    assert_refused(
        admin
            .post_json::<_, App>("/v1/apps", &app_spec("x", "nope"))
            .await,
        404,
        Some("connector_group"),
        "nope",
    );
    // Malformed bodies answer ApiError JSON naming the field.
    assert_refused(
        admin
            .post_json::<_, App>("/v1/apps", &json!({ "id": "x" }))
            .await,
        400,
        Some("internal_url"),
        "missing field",
    );
    assert_refused(
        admin
            .post_json::<_, App>(
                "/v1/apps",
                &json!({ "id": "a b", "internal_url": "http://x/" }),
            )
            .await,
        400,
        Some("id"),
        "app id",
    );
    for (id, part) in [
        (".", "path segment"),
        ("..", "path segment"),
        ("-rf", "'-'"),
    ] {
        assert_refused(
            admin
                .post_json::<_, App>(
                    "/v1/apps",
                    &json!({ "id": id, "internal_url": "http://x/" }),
                )
                .await,
            400,
            Some("id"),
            part,
        );
        assert_refused(
            admin
                .post_json::<_, Group>("/v1/groups", &json!({ "id": id }))
                .await,
            400,
            Some("id"),
            part,
        );
    }
    assert_refused(
        admin
            .post_json::<_, App>(
                "/v1/apps",
                &json!({ "id": "x", "internal_url": "http://x/", "colour": 1 }),
            )
            .await,
        400,
        Some("colour"),
        "unknown field",
    );
    let (status, body) = raw(&h, "POST", "/v1/apps", "{not json", Some(&h.admin_token())).await?;
    assert_eq!(status, 400);
    let err: ApiError = serde_json::from_str(&body).with_context(|| format!("body {body:?}"))?;
    assert_eq!(err.error, "invalid");
    assert!(err.message.contains("malformed JSON"), "{err:?}");
    let (status, body) = raw(&h, "GET", "/v1/nothing-here", "", None).await?;
    assert_eq!(status, 404);
    serde_json::from_str::<ApiError>(&body)?;

    // Deleting groups: Default never, non-empty ones name what is in them.
    assert_refused(
        admin.delete("/v1/groups/Default").await,
        409,
        None,
        "always exists",
    );
    assert_refused(admin.delete("/v1/groups/dc1").await, 409, None, "1 app(s)");
    assert_refused(admin.delete("/v1/groups/nope").await, 404, None, "nope");
    // Unknown ids.
    assert_refused(
        admin.get_json::<App>("/v1/apps/nope").await,
        404,
        None,
        "nope",
    );
    assert_refused(admin.delete("/v1/apps/nope").await, 404, None, "nope");
    assert_refused(
        admin.delete("/v1/connectors/c-nope").await,
        404,
        None,
        "c-nope",
    );

    // Tokens.
    assert_refused(
        admin
            .post_json::<_, TokenCreated>(
                "/v1/tokens",
                &json!({ "scope": { "kind": "connector", "group": "dc1" }, "ttl_secs": 0 }),
            )
            .await,
        400,
        Some("ttl_secs"),
        "between",
    );
    assert_refused(
        admin
            .post_json::<_, TokenCreated>(
                "/v1/tokens",
                &json!({ "scope": { "kind": "connector", "group": "dc1" }, "ttl_secs": 8 * 86400 }),
            )
            .await,
        400,
        Some("ttl_secs"),
        "7 days",
    );
    assert_refused(
        admin
            .post_json::<_, TokenCreated>(
                "/v1/tokens",
                &json!({ "scope": { "kind": "connector", "group": "nope" } }),
            )
            .await,
        404,
        Some("scope.group"),
        "nope",
    );
    let t: TokenCreated = admin
        .post_json(
            "/v1/tokens",
            &json!({ "scope": { "kind": "connector", "group": "dc1" } }),
        )
        .await?;
    let parsed: JoinToken = t.token.parse()?;
    assert_eq!(parsed.id, t.id);
    assert_eq!(parsed.id.len(), 16);
    assert_eq!(parsed.secret.len(), 32);
    assert_eq!(parsed.ca_sha256, h.ca_sha256);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    assert!(
        t.expires_at > now && t.expires_at <= now + 3600 + 5,
        "default ttl is an hour"
    );

    // Emptying a group lets it go.
    admin.delete("/v1/apps/hr").await?;
    assert_refused(admin.get_json::<App>("/v1/apps/hr").await, 404, None, "hr");
    admin.delete("/v1/groups/dc1").await?;
    let groups: Vec<Group> = admin.get_json("/v1/groups").await?;
    assert_eq!(groups.len(), 1);

    // Metrics count the calls.
    let metrics_addr = h.metrics_addr.context("metrics listener")?;
    let (status, text) = plain_get(metrics_addr, "/metrics").await?;
    assert_eq!(status, 200);
    assert!(
        text.contains(r#"portico_router_api_requests_total{route="/v1/apps",status="201"}"#),
        "{text}"
    );
    assert!(text.contains("portico_router_config_version"), "{text}");
    assert!(
        text.contains(r#"portico_router_connectors{status="active"} 0"#),
        "{text}"
    );
    assert_eq!(plain_get(metrics_addr, "/ready").await?.0, 200);

    stop(h, shutdown).await
}

#[tokio::test]
async fn enroll_renew_report_and_revoke() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |_| {}).await?;
    let admin = admin(&h)?;

    // A connector enrolls with a real key and CSR.
    let token = create_token(
        &admin,
        TokenScope::Connector {
            group: GroupId::default_group(),
        },
    )
    .await?;
    let (conn_creds, answer) = enroll(&h, &token.token).await?;
    let Identity::Connector { id: conn_id, group } = answer.identity.clone() else {
        bail!("expected a connector identity, got {:?}", answer.identity);
    };
    assert_eq!(group, GroupId::default_group());
    assert!(
        conn_id.as_str().starts_with("c-") && conn_id.as_str().len() == 18,
        "{conn_id}"
    );
    let names = cert_names(&answer.cert.cert_pem)?;
    assert_eq!(names.uris, answer.identity.to_uris());
    assert!(names.dns.is_empty(), "connector certs carry no DNS names");
    assert_eq!(answer.cert.ca_pem, h.ca_pem);
    chains_to_ca(&answer.cert.cert_pem, &h.ca_pem)?;
    assert_eq!(
        pki::identity_of(&conn_creds.cert_chain()?[0])?,
        answer.identity
    );

    // The token is single use; unknown, foreign and expired tokens fail.
    let (status, err) = refusal(enroll(&h, &token.token).await);
    assert_eq!(
        (status, err.message.as_str()),
        (401, "join token already used")
    );
    let unknown = JoinToken {
        id: "0123456789abcdef".into(),
        secret: "00".repeat(16),
        ca_sha256: h.ca_sha256.clone(),
    };
    assert_refused(
        enroll(&h, &unknown.to_string()).await,
        401,
        None,
        "unknown join token",
    );
    let wrong_secret = JoinToken {
        secret: "11".repeat(16),
        ..token.token.parse()?
    };
    assert_refused(
        enroll(&h, &wrong_secret.to_string()).await,
        401,
        None,
        "unknown join token",
    );
    {
        // Plant an expired token through a second connection to the store.
        let store = SqliteStore::open(dir.path().join("portico.db"))?;
        let secret = "22".repeat(16);
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        store.create_token(&TokenRecord {
            id: "00000000000000ee".into(),
            secret_sha256: pki::sha256_hex(secret.as_bytes()),
            scope: TokenScope::Connector {
                group: GroupId::default_group(),
            },
            created_at: now - 100,
            expires_at: now - 10,
            used_at: None,
            revoked_at: None,
        })?;
        store.close();
        let expired = JoinToken {
            id: "00000000000000ee".into(),
            secret,
            ca_sha256: h.ca_sha256.clone(),
        };
        assert_refused(
            enroll(&h, &expired.to_string()).await,
            401,
            None,
            "join token expired at ",
        );
    }
    let bad_csr = RouterClient::new(&h.url(), RouterTrust::CaPem(h.ca_pem.clone()), None)?
        .post_json::<_, EnrollResponse>(
            "/v1/enroll",
            &EnrollRequest {
                token: create_token(
                    &admin,
                    TokenScope::Connector {
                        group: GroupId::default_group(),
                    },
                )
                .await?
                .token,
                csr_pem:
                    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                        .into(),
                host: "h".into(),
                version: "v".into(),
                kind: None,
                region: None,
            },
        )
        .await;
    assert_refused(bad_csr, 400, Some("csr_pem"), "CSR");

    // Renewal with the connector's certificate and a new key.
    let conn = agent(&h, &conn_creds)?;
    let new_key = pki::generate_key()?;
    let renewed: CertResponse = conn
        .post_json(
            "/v1/renew",
            &CsrRequest {
                csr_pem: pki::csr_pem(&new_key)?,
            },
        )
        .await?;
    let renewed_names = cert_names(&renewed.cert_pem)?;
    assert_eq!(renewed_names.uris, answer.identity.to_uris());
    assert_ne!(renewed_names.serial, names.serial);
    chains_to_ca(&renewed.cert_pem, &h.ca_pem)?;
    let conn_creds2 = Credentials::new(
        answer.identity.clone(),
        Secret::new(new_key.serialize_pem()),
        renewed.cert_pem.clone(),
        renewed.ca_pem.clone(),
    )?;
    let conn2 = agent(&h, &conn_creds2)?;
    let listed: Vec<Connector> = admin.get_json("/v1/connectors").await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].cert_serial, renewed_names.serial,
        "renewal records the serial"
    );
    assert_eq!(listed[0].status, Status::Inactive);
    assert_eq!(listed[0].host, "test-host");

    // An edge enrolls; its cert has the edge DNS name.
    let token = create_token(
        &admin,
        TokenScope::Edge {
            region: RegionId::default_region(),
        },
    )
    .await?;
    let (edge_creds, edge_answer) = enroll(&h, &token.token).await?;
    let Identity::Edge { id: edge_id, .. } = edge_answer.identity.clone() else {
        bail!("expected an edge identity");
    };
    let edge_names = cert_names(&edge_answer.cert.cert_pem)?;
    assert_eq!(edge_names.uris, edge_answer.identity.to_uris());
    assert_eq!(edge_names.dns, vec![api::edge_server_name(&edge_id)]);
    let edge = agent(&h, &edge_creds)?;
    assert_refused(
        admin
            .post_json::<_, TokenCreated>(
                "/v1/tokens",
                &json!({ "scope": { "kind": "edge", "region": "mars" } }),
            )
            .await,
        404,
        Some("scope.region"),
        "create it with `portico region create mars`",
    );

    // The wildcard public certificate.
    let public: CertResponse = edge
        .post_json(
            "/v1/edge/public-cert",
            &CsrRequest {
                csr_pem: pki::csr_pem(&pki::generate_key()?)?,
            },
        )
        .await?;
    let public_names = cert_names(&public.cert_pem)?;
    assert_eq!(
        public_names.dns,
        vec!["*.apps.localhost".to_owned(), "apps.localhost".to_owned()]
    );
    assert!(public_names.uris.is_empty());
    // Connectors may not ask for it, nor read the edge config.
    assert_refused(
        conn2
            .post_json::<_, CertResponse>(
                "/v1/edge/public-cert",
                &CsrRequest {
                    csr_pem: String::new(),
                },
            )
            .await,
        401,
        None,
        "edge",
    );
    assert_refused(
        conn2.get_json::<EdgeConfig>("/v1/edge/config").await,
        401,
        None,
        "edge",
    );

    // Presence: the edge reports the connector.
    edge.post_empty(
        "/v1/edge/report",
        &EdgeReport {
            tunnel_addr: "127.0.0.1:4433".into(),
            public_addr: "127.0.0.1:8443".into(),
            mesh_addr: None,
            version: "0.1.0-edge".into(),
            tunnels: vec![TunnelReport {
                connector_id: conn_id.clone(),
                group: GroupId::default_group(),
                agent_version: "0.1.0-conn".into(),
                remote_addr: "192.0.2.7:50000".into(),
                tunnels: 2,
            }],
            draining: false,
        },
    )
    .await?;
    assert_refused(
        edge.post_empty(
            "/v1/edge/report",
            &json!({ "tunnel_addr": "nope", "public_addr": "127.0.0.1:1", "version": "v", "tunnels": [] }),
        )
        .await
        .map(|()| "ok"),
        400,
        Some("tunnel_addr"),
        "host:port",
    );
    let listed: Vec<Connector> = admin.get_json("/v1/connectors").await?;
    let c = &listed[0];
    assert_eq!(c.status, Status::Active);
    assert_eq!(c.edges, vec![edge_id.clone()]);
    assert_eq!(c.address_seen.as_deref(), Some("192.0.2.7:50000"));
    assert_eq!(c.version, "0.1.0-conn");
    assert_eq!(c.tunnels, 2);
    let edges: Vec<Edge> = admin.get_json("/v1/edges").await?;
    assert_eq!(edges.len(), 1);
    assert_eq!(edges[0].status, Status::Active);
    assert_eq!(edges[0].tunnel_addr.as_deref(), Some("127.0.0.1:4433"));
    assert_eq!(edges[0].tunnels, 2);

    // The app's URL takes the edge's public port; the connector sees the
    // app and the edge.
    let app: App = admin
        .post_json("/v1/apps", &app_spec("hr", "Default"))
        .await?;
    assert_eq!(app.external_url, "https://hr.apps.localhost:8443/");
    let cc: ConnectorConfig = conn2
        .watch("/v1/connector/config", 0, Duration::ZERO)
        .await?
        .context("a first watch answers at once")?;
    assert_eq!(cc.group, GroupId::default_group());
    assert_eq!(cc.apps, vec![app.clone()]);
    assert_eq!(cc.edges.len(), 1);
    assert_eq!(cc.edges[0].id, edge_id);
    assert_eq!(cc.edges[0].tunnel_addr, "127.0.0.1:4433");
    let ec: EdgeConfig = edge
        .watch("/v1/edge/config", 0, Duration::ZERO)
        .await?
        .context("a first watch answers at once")?;
    assert_eq!(ec.apps, vec![app]);
    assert_eq!(ec.apps_domain, "apps.localhost");
    assert!(ec.groups.contains(&GroupId::default_group()));
    assert!(ec.revoked.is_empty());
    assert_eq!(ec.version, cc.version);

    // Deleting the connector revokes it.
    admin.delete(&format!("/v1/connectors/{conn_id}")).await?;
    let r = conn2
        .post_json::<_, CertResponse>(
            "/v1/renew",
            &CsrRequest {
                csr_pem: pki::csr_pem(&pki::generate_key()?)?,
            },
        )
        .await;
    assert!(matches!(&r, Err(e) if e.is_revoked()), "{r:?}");
    let r = conn2
        .watch::<ConnectorConfig>("/v1/connector/config", 0, Duration::ZERO)
        .await;
    assert!(matches!(&r, Err(e) if e.is_revoked()), "{r:?}");
    let ec2: EdgeConfig = edge
        .watch("/v1/edge/config", ec.version, Duration::from_secs(50))
        .await?
        .context("the deletion is a change")?;
    assert!(ec2.version > ec.version);
    assert_eq!(ec2.revoked, vec![conn_id.clone()]);
    let listed: Vec<Connector> = admin.get_json("/v1/connectors").await?;
    assert!(listed.is_empty(), "deleted connectors are not listed");
    assert_refused(
        admin.delete(&format!("/v1/connectors/{conn_id}")).await,
        404,
        None,
        "",
    );

    // Edges renew too.
    let renewed: CertResponse = edge
        .post_json(
            "/v1/renew",
            &CsrRequest {
                csr_pem: pki::csr_pem(&pki::generate_key()?)?,
            },
        )
        .await?;
    assert_eq!(
        cert_names(&renewed.cert_pem)?.dns,
        vec![api::edge_server_name(&edge_id)]
    );

    let (_, text) = plain_get(h.metrics_addr.context("metrics")?, "/metrics").await?;
    assert!(
        text.contains(r#"portico_router_enrollments_total{kind="connector",result="ok"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"portico_router_enrollments_total{kind="connector",result="refused"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"portico_router_edges{status="active"} 1"#),
        "{text}"
    );

    stop(h, shutdown).await
}

#[tokio::test]
async fn long_poll_answers_when_an_app_is_created_and_ends_at_shutdown() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |_| {}).await?;
    let admin = admin(&h)?;
    let token = create_token(
        &admin,
        TokenScope::Edge {
            region: RegionId::default_region(),
        },
    )
    .await?;
    let (edge_creds, _) = enroll(&h, &token.token).await?;
    let edge = agent(&h, &edge_creds)?;
    let first: EdgeConfig = edge
        .watch("/v1/edge/config", 0, Duration::ZERO)
        .await?
        .context("first snapshot")?;

    // Nothing changes: a short wait answers 304.
    let none = edge
        .watch::<EdgeConfig>("/v1/edge/config", first.version, Duration::from_secs(1))
        .await?;
    assert!(none.is_none(), "no change answers 304");

    // A long wait returns with the new version once an app appears.
    let watcher = {
        let edge = edge.clone();
        let after = first.version;
        tokio::spawn(async move {
            edge.watch::<EdgeConfig>("/v1/edge/config", after, Duration::from_secs(60))
                .await
        })
    };
    let app: App = admin
        .post_json("/v1/apps", &app_spec("news", "Default"))
        .await?;
    let changed = tokio::time::timeout(GUARD, watcher)
        .await
        .context("the long-poll hung")???
        .context("expected a new config, not 304")?;
    assert!(changed.version > first.version);
    assert!(changed.apps.contains(&app));

    // Shutdown ends a pending long-poll early with 304.
    let pending = {
        let edge = edge.clone();
        let after = changed.version;
        tokio::spawn(async move {
            edge.watch::<EdgeConfig>("/v1/edge/config", after, Duration::from_secs(60))
                .await
        })
    };
    // Wait (polling, with a deadline) until the router holds the poll.
    let metrics_addr = h.metrics_addr.context("metrics")?;
    tokio::time::timeout(GUARD, async {
        loop {
            let (_, text) = plain_get(metrics_addr, "/metrics").await?;
            if text.contains("portico_router_long_polls 1") {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("the long-poll never reached the router")??;
    shutdown.cancel();
    let ended = tokio::time::timeout(GUARD, pending)
        .await
        .context("long-poll hung at shutdown")??;
    assert!(ended?.is_none(), "a long-poll ends with 304 at shutdown");
    tokio::time::timeout(GUARD, h.wait()).await??;
    Ok(())
}

#[tokio::test]
async fn restart_keeps_apps_groups_connectors_token_and_ca() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |c| c.public_port = Some(443)).await?;
    let admin1 = admin(&h)?;
    let _: Group = admin1
        .post_json("/v1/groups", &json!({ "id": "dc1", "region": "default" }))
        .await?;
    let app: App = admin1.post_json("/v1/apps", &app_spec("hr", "dc1")).await?;
    let token = create_token(
        &admin1,
        TokenScope::Connector {
            group: GroupId::new("dc1")?,
        },
    )
    .await?;
    let (creds, answer) = enroll(&h, &token.token).await?;
    let (token_before, ca_before, sha_before) =
        (h.admin_token(), h.ca_pem.clone(), h.ca_sha256.clone());
    let token_path = h.admin_token_path.clone();
    stop(h, shutdown).await?;

    // Files the router keeps, with private modes.
    use std::os::unix::fs::PermissionsExt as _;
    for name in ["ca.key", "admin-token"] {
        let mode = std::fs::metadata(dir.path().join(name))?
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    assert_eq!(token_path, dir.path().join("admin-token"));
    assert_eq!(std::fs::read_to_string(&token_path)?.trim(), token_before);

    let (h, shutdown) = start(dir.path(), |c| c.public_port = Some(443)).await?;
    assert_eq!(h.admin_token(), token_before);
    assert_eq!(h.ca_pem, ca_before);
    assert_eq!(h.ca_sha256, sha_before);
    let admin2 = admin(&h)?;
    let apps: Vec<App> = admin2.get_json("/v1/apps").await?;
    assert_eq!(apps, vec![app]);
    let groups: Vec<Group> = admin2.get_json("/v1/groups").await?;
    let ids: Vec<(&str, &str, u32)> = groups
        .iter()
        .map(|g| (g.id.as_str(), g.region.as_str(), g.connectors))
        .collect();
    assert_eq!(ids, vec![("Default", "auto", 0), ("dc1", "default", 1)]);
    let connectors: Vec<Connector> = admin2.get_json("/v1/connectors").await?;
    assert_eq!(connectors.len(), 1);
    let Identity::Connector { id, .. } = &answer.identity else {
        bail!("connector identity expected");
    };
    assert_eq!(&connectors[0].id, id);
    // The old certificate still works against the reloaded CA.
    let renewed: CertResponse = agent(&h, &creds)?
        .post_json(
            "/v1/renew",
            &CsrRequest {
                csr_pem: pki::csr_pem(&pki::generate_key()?)?,
            },
        )
        .await?;
    chains_to_ca(&renewed.cert_pem, &ca_before)?;
    // A used token stays used.
    let (status, err) = refusal(enroll(&h, &token.token).await);
    assert_eq!(
        (status, err.message.as_str()),
        (401, "join token already used")
    );
    stop(h, shutdown).await
}

#[tokio::test]
async fn config_validation_and_handle() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = Config::new(dir.path());
    config.apps_domain = "Not Valid".into();
    let err = portico_router::start(config, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("apps_domain"), "{err}");

    let (h, shutdown) = start(dir.path(), |c| c.metrics_listen = None).await?;
    assert!(h.metrics_addr.is_none());
    assert_eq!(h.url(), format!("https://127.0.0.1:{}", h.api_addr.port()));
    let debug = format!("{h:?}");
    assert!(
        !debug.contains(&h.admin_token()),
        "Debug must not print the admin token"
    );
    assert_eq!(h.admin_token().len(), 64);
    // The API speaks HTTP/2 too.
    assert_eq!(raw(&h, "GET", "/ready", "", None).await?.0, 200);
    let unused = ConnectorId::new("c-0")?;
    assert_refused(
        admin(&h)?.delete(&format!("/v1/connectors/{unused}")).await,
        404,
        None,
        "c-0",
    );
    stop(h, shutdown).await
}

#[tokio::test]
async fn apps_carry_required_features_to_edges() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |_| {}).await?;
    let admin = admin(&h)?;
    let app: App = admin
        .post_json(
            "/v1/apps",
            &json!({ "id": "hr", "internal_url": "http://10.0.0.5/", "required_features": ["sign-in", "x2"] }),
        )
        .await?;
    assert_eq!(app.required_features, ["sign-in", "x2"]);
    let plain: App = admin
        .post_json("/v1/apps", &app_spec("wiki", "Default"))
        .await?;
    assert!(plain.required_features.is_empty());
    let listed: Vec<App> = admin.get_json("/v1/apps").await?;
    assert_eq!(listed, vec![app.clone(), plain]);
    for (features, part) in [
        (json!(["Sign-In"]), "lower-case"),
        (json!(["a", "a"]), "twice"),
        (json!([""]), "empty"),
        (json!(["x".repeat(33)]), "limit is 32"),
        (
            json!((0..17).map(|i| format!("f{i}")).collect::<Vec<_>>()),
            "at most 16",
        ),
    ] {
        assert_refused(
            admin
                .post_json::<_, App>(
                    "/v1/apps",
                    &json!({ "id": "bad", "internal_url": "http://x/", "required_features": features }),
                )
                .await,
            400,
            Some("required_features"),
            part,
        );
    }
    let refused: Result<App, _> = admin.get_json("/v1/apps/bad").await;
    assert_refused(refused, 404, None, "bad");

    // Edges get the list with the app.
    let token = create_token(
        &admin,
        TokenScope::Edge {
            region: RegionId::default_region(),
        },
    )
    .await?;
    let (creds, _) = enroll(&h, &token.token).await?;
    let ec: EdgeConfig = agent(&h, &creds)?
        .watch("/v1/edge/config", 0, Duration::ZERO)
        .await?
        .context("first snapshot")?;
    let hr = ec
        .apps
        .iter()
        .find(|a| a.id.as_str() == "hr")
        .context("hr")?;
    assert_eq!(hr.required_features, ["sign-in", "x2"]);
    stop(h, shutdown).await
}

#[tokio::test]
async fn apps_are_updated_field_by_field_with_the_checks_of_create() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |c| c.public_port = Some(443)).await?;
    let admin = admin(&h)?;
    let _: Group = admin
        .post_json("/v1/groups", &json!({ "id": "dc1" }))
        .await?;
    let created: App = admin
        .post_json("/v1/apps", &app_spec("hr", "Default"))
        .await?;
    let _: App = admin
        .post_json("/v1/apps", &app_spec("wiki", "Default"))
        .await?;
    let token = create_token(
        &admin,
        TokenScope::Edge {
            region: RegionId::default_region(),
        },
    )
    .await?;
    let (creds, _) = enroll(&h, &token.token).await?;
    let edge = agent(&h, &creds)?;
    let before: EdgeConfig = edge
        .watch("/v1/edge/config", 0, Duration::ZERO)
        .await?
        .context("first snapshot")?;

    // One field at a time keeps the others.
    let app: App = admin
        .patch_json("/v1/apps/hr", &json!({ "backend_timeout": 5 }))
        .await?;
    assert_eq!(app.backend_timeout, api::BackendTimeout::Seconds(5));
    assert_eq!(app.internal_url, created.internal_url);
    assert!(app.validate_backend_tls);
    assert!(app.translate_headers && !app.translate_body, "the defaults");
    // Every field create takes, at once.
    let app: App = admin
        .patch_json(
            "/v1/apps/hr",
            &json!({
                "internal_url": "HTTPS://Intra.Corp:443",
                "external_host": "People.Apps.Localhost",
                "connector_group": "dc1",
                "backend_timeout": "long",
                "validate_backend_tls": false,
                "translate_headers": false,
                "translate_body": true,
                "required_features": ["sign-in"],
                "maintenance": true,
                "home_page": "https://people.apps.localhost/portal/",
            }),
        )
        .await?;
    let expected = App {
        internal_url: "https://intra.corp/".into(),
        external_host: "people.apps.localhost".into(),
        external_url: "https://people.apps.localhost/".into(),
        home_url: "https://people.apps.localhost/portal/".into(),
        maintenance: true,
        connector_group: GroupId::new("dc1")?,
        backend_timeout: api::BackendTimeout::Long,
        validate_backend_tls: false,
        translate_headers: false,
        translate_body: true,
        // In maintenance, the app requires the feature too, so that an
        // edge without maintenance mode refuses it rather than serve it.
        required_features: vec!["sign-in".into(), "maintenance".into()],
        ..created.clone()
    };
    assert_eq!(app, expected, "created_at and id are kept");
    assert_eq!(admin.get_json::<App>("/v1/apps/hr").await?, expected);
    let cleared: App = admin
        .patch_json("/v1/apps/hr", &json!({ "required_features": [] }))
        .await?;
    assert_eq!(cleared.required_features, ["maintenance"]);
    let out: App = admin
        .patch_json("/v1/apps/hr", &json!({ "maintenance": false }))
        .await?;
    assert!(out.required_features.is_empty() && !out.maintenance);
    // Edges get the change.
    let after: EdgeConfig = edge
        .watch("/v1/edge/config", before.version, Duration::from_secs(50))
        .await?
        .context("an update is a change")?;
    let hr = after
        .apps
        .iter()
        .find(|a| a.id.as_str() == "hr")
        .context("hr")?;
    assert_eq!(hr.external_host, "people.apps.localhost");
    assert_eq!(hr.connector_group.as_str(), "dc1");

    // Refusals name the field and change nothing.
    let current: App = admin.get_json("/v1/apps/hr").await?;
    for (body, status, field, part) in [
        (
            json!({ "internal_url": "http://x/?q=1" }),
            400,
            Some("internal_url"),
            "query",
        ),
        (
            json!({ "internal_url": "gopher://x/" }),
            400,
            Some("internal_url"),
            "scheme",
        ),
        (
            json!({ "external_host": "hr.example.com" }),
            400,
            Some("external_host"),
            "apps domain",
        ),
        (
            json!({ "external_host": "auth.apps.localhost" }),
            400,
            Some("external_host"),
            "Portico uses itself",
        ),
        (
            json!({ "external_host": "eu.edge.apps.localhost" }),
            400,
            Some("external_host"),
            "Portico uses itself",
        ),
        (
            json!({ "external_host": "wiki.apps.localhost" }),
            409,
            Some("external_host"),
            "wiki",
        ),
        (
            json!({ "connector_group": "nope" }),
            404,
            Some("connector_group"),
            "nope",
        ),
        (
            json!({ "backend_timeout": 0 }),
            400,
            Some("backend_timeout"),
            "1 to 3600",
        ),
        (
            json!({ "required_features": ["UPPER"] }),
            400,
            Some("required_features"),
            "lower-case",
        ),
        (
            json!({ "colour": "blue" }),
            400,
            Some("colour"),
            "unknown field",
        ),
        // Sign-in needs the router's OpenID provider (none here), and its
        // feature is set by preauth only.
        (
            json!({ "preauth": "oidc" }),
            400,
            Some("preauth"),
            "--oidc-issuer",
        ),
        (
            json!({ "required_features": ["maintenance"] }),
            400,
            Some("required_features"),
            "--maintenance",
        ),
        (
            json!({ "required_features": ["oidc"] }),
            400,
            Some("required_features"),
            "--preauth oidc",
        ),
        (
            json!({ "preauth": "sometimes" }),
            400,
            Some("preauth"),
            "unknown variant",
        ),
        // Assignment and identity headers need sign-in.
        (
            json!({ "assignment": { "everyone": true } }),
            400,
            Some("assignment"),
            "--preauth oidc",
        ),
        (
            json!({ "identity_headers": { "X-Remote-User": "email" } }),
            400,
            Some("identity_headers"),
            "--preauth oidc",
        ),
        (
            json!({ "identity_headers": { "X-Remote-User": "salary" } }),
            400,
            Some("identity_headers"),
            "not one the edge keeps",
        ),
        (
            json!({ "identity_headers": { "X-Portico-User": "sub" } }),
            400,
            Some("identity_headers"),
            "set by Portico",
        ),
        (
            json!({ "identity_headers": { "X User": "sub" } }),
            400,
            Some("identity_headers"),
            "letters, digits",
        ),
        (
            json!({ "assignment": { "users": ["a", "a"] } }),
            400,
            Some("assignment"),
            "twice",
        ),
        (
            json!({ "assignment": { "everyone": true, "groups": ["g"] } }),
            400,
            Some("assignment"),
            "not both",
        ),
        (json!({ "id": "renamed" }), 400, Some("id"), "unknown field"),
        (json!({}), 400, None, "changes nothing"),
    ] {
        assert_refused(
            admin.patch_json::<_, App>("/v1/apps/hr", &body).await,
            status,
            field,
            part,
        );
    }
    assert_eq!(admin.get_json::<App>("/v1/apps/hr").await?, current);
    assert_refused(
        admin
            .patch_json::<_, App>("/v1/apps/nope", &json!({ "backend_timeout": 5 }))
            .await,
        404,
        None,
        "nope",
    );
    stop(h, shutdown).await
}

/// A router with an OpenID provider (never asked: the router does not
/// call it).
fn with_sign_in(c: &mut Config) {
    c.sign_in = Some(portico_router::SignInConfig {
        issuer: "http://127.0.0.1:9/".into(),
        client_id: "portico".into(),
        client_secret: "s".into(),
        session_lifetime: std::time::Duration::from_secs(3600),
        session_idle_timeout: std::time::Duration::from_secs(3600),
        groups_claim: "groups".into(),
    });
}

#[tokio::test]
async fn an_app_that_signs_users_in_must_assign_someone_and_the_jwks_is_public(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), with_sign_in).await?;
    let admin = admin(&h)?;
    let spec = |extra: serde_json::Value| {
        let mut v = json!({ "id": "hr", "internal_url": "http://10.0.0.5/", "preauth": "oidc" });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    assert_refused(
        admin
            .post_json::<_, App>("/v1/apps", &spec(json!({})))
            .await,
        400,
        Some("assignment"),
        "--assign everyone",
    );
    let app: App = admin
        .post_json(
            "/v1/apps",
            &spec(json!({
                "assignment": { "users": ["alice@example.test"], "groups": ["devs"] },
                "identity_headers": { "X-Remote-User": "email", "X-Remote-Groups": "groups" },
                "hidden": true,
            })),
        )
        .await?;
    assert_eq!(app.assignment.users, ["alice@example.test"]);
    assert_eq!(app.identity_headers["X-Remote-Groups"], "groups");
    assert!(app.hidden);
    // Clearing the assignment of an app that signs users in is refused;
    // turning sign-in off needs the assignment gone too.
    assert_refused(
        admin
            .patch_json::<_, App>("/v1/apps/hr", &json!({ "assignment": {} }))
            .await,
        400,
        Some("assignment"),
        "assigns no one",
    );
    assert_refused(
        admin
            .patch_json::<_, App>("/v1/apps/hr", &json!({ "preauth": "passthrough" }))
            .await,
        400,
        Some("assignment"),
        "--preauth oidc",
    );
    // The JWKS needs no credentials, and lists the P-256 key that
    // survives a restart.
    let jwks: portico_proto::api::Jwks = anon(&h)?.get_json("/.well-known/jwks.json").await?;
    assert_eq!(jwks.keys.len(), 1);
    let key = &jwks.keys[0];
    assert_eq!(
        (key.kty.as_str(), key.crv.as_str(), key.alg.as_str()),
        ("EC", "P-256", "ES256")
    );
    assert_eq!((key.x.len(), key.y.len()), (43, 43), "{key:?}");
    stop(h, shutdown).await?;
    let (h, shutdown) = start(dir.path(), with_sign_in).await?;
    let again: portico_proto::api::Jwks = anon(&h)?.get_json("/.well-known/jwks.json").await?;
    assert_eq!(again, jwks);
    stop(h, shutdown).await
}

/// An app's own OpenID client: set with its secret on an app that signs
/// users in (refused on a passthrough app, or half given), listed by its
/// id alone, its secret only in the edges' config; the secret replaced
/// alone, and the deployment's client back.
#[tokio::test]
async fn an_app_may_have_its_own_oidc_client_whose_secret_only_edges_get() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), with_sign_in).await?;
    let admin = admin(&h)?;
    let secret = "hr-Secret~0123456789";
    let hr = json!({
        "id": "hr", "internal_url": "http://10.0.0.5/", "preauth": "oidc",
        "assignment": { "everyone": true },
        "oidc_client_id": "hr-client", "oidc_client_secret": secret,
    });
    let app: App = admin.post_json("/v1/apps", &hr).await?;
    assert_eq!(app.oidc_client_id.as_deref(), Some("hr-client"));
    assert!(
        app.required_features
            .iter()
            .any(|f| f == api::APP_CLIENT_FEATURE),
        "{:?}",
        app.required_features
    );
    // The listing names the client, never its secret.
    for path in ["/v1/apps", "/v1/apps/hr"] {
        let listed: serde_json::Value = admin.get_json(path).await?;
        let text = listed.to_string();
        assert!(
            text.contains("hr-client") && !text.contains(secret),
            "{text}"
        );
    }
    // The edges get it.
    let (edge, _) = enroll_edge(&h, &admin).await?;
    let clients = |c: EdgeConfig| {
        c.sign_in
            .expect("sign-in settings")
            .clients
            .into_iter()
            .map(|c| {
                (
                    c.app.to_string(),
                    c.client_id,
                    c.client_secret.expose().to_owned(),
                )
            })
            .collect::<Vec<_>>()
    };
    let ec: EdgeConfig = edge.get_json("/v1/edge/config").await?;
    assert_eq!(
        ec.sign_in.as_ref().map(|s| s.client_id.as_str()),
        Some("portico")
    );
    assert_eq!(
        clients(ec),
        [("hr".into(), "hr-client".into(), secret.into())]
    );

    // Refused: on a passthrough app (also when it stops signing users
    // in), half given, malformed, or the feature asked for by hand.
    let open = json!({
        "id": "open", "internal_url": "http://10.0.0.6/",
        "oidc_client_id": "open-client", "oidc_client_secret": "s",
    });
    assert_refused(
        admin.post_json::<_, App>("/v1/apps", &open).await,
        400,
        Some("oidc_client_id"),
        "does not sign users in, so it has no OpenID client: add --preauth oidc",
    );
    assert_refused(
        admin
            .patch_json::<_, App>(
                "/v1/apps/hr",
                &json!({ "preauth": "passthrough", "assignment": {} }),
            )
            .await,
        400,
        Some("oidc_client_id"),
        "--oidc-client-id",
    );
    let mut half = hr.clone();
    half["id"] = json!("half");
    half.as_object_mut().unwrap().remove("oidc_client_secret");
    assert_refused(
        admin.post_json::<_, App>("/v1/apps", &half).await,
        400,
        Some("oidc_client_secret"),
        "needs its secret",
    );
    // Another client id without its secret: the old secret is not its.
    assert_refused(
        admin
            .patch_json::<_, App>("/v1/apps/hr", &json!({ "oidc_client_id": "other" }))
            .await,
        400,
        Some("oidc_client_secret"),
        "needs its secret",
    );
    let mut bad = hr.clone();
    bad["id"] = json!("bad");
    bad["oidc_client_id"] = json!("has space");
    assert_refused(
        admin.post_json::<_, App>("/v1/apps", &bad).await,
        400,
        Some("oidc_client_id"),
        "printable ASCII",
    );
    let long = "x".repeat(api::MAX_OIDC_CLIENT_SECRET + 1);
    bad["oidc_client_id"] = json!("ok-client");
    bad["oidc_client_secret"] = json!(long);
    let (status, err) = refusal(admin.post_json::<_, App>("/v1/apps", &bad).await);
    assert_eq!(
        (status, err.field.as_deref()),
        (400, Some("oidc_client_secret"))
    );
    assert!(!err.message.contains(&long), "{err:?}");
    let mut by_hand = hr.clone();
    by_hand["id"] = json!("byhand");
    by_hand.as_object_mut().unwrap().remove("oidc_client_id");
    by_hand
        .as_object_mut()
        .unwrap()
        .remove("oidc_client_secret");
    by_hand["required_features"] = json!([api::APP_CLIENT_FEATURE]);
    assert_refused(
        admin.post_json::<_, App>("/v1/apps", &by_hand).await,
        400,
        Some("required_features"),
        "--oidc-client-id",
    );
    let ec: EdgeConfig = edge.get_json("/v1/edge/config").await?;
    assert_eq!(ec.apps.len(), 1, "nothing refused was stored");

    // The secret alone: the same client, a new secret.
    let app: App = admin
        .patch_json("/v1/apps/hr", &json!({ "oidc_client_secret": "rotated" }))
        .await?;
    assert_eq!(app.oidc_client_id.as_deref(), Some("hr-client"));
    let ec: EdgeConfig = edge.get_json("/v1/edge/config").await?;
    assert_eq!(
        clients(ec),
        [("hr".into(), "hr-client".into(), "rotated".into())]
    );
    // Back to the deployment's client: the feature and the secret go.
    let app: App = admin
        .patch_json("/v1/apps/hr", &json!({ "oidc_client_id": "" }))
        .await?;
    assert_eq!(app.oidc_client_id, None);
    assert!(!app
        .required_features
        .iter()
        .any(|f| f == api::APP_CLIENT_FEATURE));
    let ec: EdgeConfig = edge.get_json("/v1/edge/config").await?;
    assert!(clients(ec).is_empty());
    assert_refused(
        admin
            .patch_json::<_, App>("/v1/apps/hr", &json!({ "oidc_client_secret": "lonely" }))
            .await,
        400,
        Some("oidc_client_id"),
        "--oidc-client-id too",
    );
    stop(h, shutdown).await
}

#[tokio::test]
async fn tokens_are_listed_without_secrets_and_revoked_unused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |_| {}).await?;
    let admin = admin(&h)?;
    let connector_scope = TokenScope::Connector {
        group: GroupId::default_group(),
    };
    let used = create_token(&admin, connector_scope.clone()).await?;
    let revoked = create_token(&admin, connector_scope.clone()).await?;
    let edge = create_token(
        &admin,
        TokenScope::Edge {
            region: RegionId::default_region(),
        },
    )
    .await?;
    enroll(&h, &used.token).await?;
    admin.delete(&format!("/v1/tokens/{}", revoked.id)).await?;

    let (status, body) = raw(&h, "GET", "/v1/tokens", "", Some(&h.admin_token())).await?;
    assert_eq!(status, 200, "{body}");
    for t in [&used, &revoked, &edge] {
        let secret = t.token.parse::<JoinToken>()?.secret;
        assert!(!body.contains(&secret), "a secret is listed: {body}");
    }
    let list: Vec<api::TokenInfo> = serde_json::from_str(&body)?;
    let find = |id: &str| list.iter().find(|t| t.id == id).cloned();
    let u = find(&used.id).context("used token listed")?;
    assert_eq!(u.status, api::TokenStatus::Used);
    assert!(u.used_at.is_some());
    assert_eq!(u.scope, connector_scope);
    assert_eq!(u.expires_at, used.expires_at);
    let r = find(&revoked.id).context("revoked token listed")?;
    assert_eq!(r.status, api::TokenStatus::Revoked);
    assert!(r.revoked_at.is_some() && r.used_at.is_none());
    let e = find(&edge.id).context("edge token listed")?;
    assert_eq!(e.status, api::TokenStatus::Unused);
    assert!(e.created_at <= e.expires_at);

    // A revoked token enrolls nothing; used and revoked tokens cannot be
    // revoked (again); unknown ones are not found.
    assert_refused(enroll(&h, &revoked.token).await, 401, None, "revoked at ");
    assert_refused(
        admin.delete(&format!("/v1/tokens/{}", used.id)).await,
        409,
        None,
        "already used",
    );
    assert_refused(
        admin.delete(&format!("/v1/tokens/{}", revoked.id)).await,
        409,
        None,
        "already revoked",
    );
    assert_refused(
        admin.delete("/v1/tokens/0123456789abcdef").await,
        404,
        None,
        "0123456789abcdef",
    );
    assert_refused(admin.delete("/v1/tokens/nope").await, 404, None, "16 hex");
    let connectors: Vec<Connector> = admin.get_json("/v1/connectors").await?;
    assert_eq!(connectors.len(), 1, "only the used token enrolled");
    stop(h, shutdown).await
}

/// An edge report naming one connector.
fn report(tunnel_addr: &str, connector: &ConnectorId) -> EdgeReport {
    EdgeReport {
        tunnel_addr: tunnel_addr.into(),
        public_addr: "127.0.0.1:8443".into(),
        mesh_addr: None,
        version: "0.1.0-edge".into(),
        tunnels: vec![TunnelReport {
            connector_id: connector.clone(),
            group: GroupId::default_group(),
            agent_version: "0.1.0-conn".into(),
            remote_addr: "192.0.2.7:50000".into(),
            tunnels: 1,
        }],
        draining: false,
    }
}

async fn enroll_edge(h: &Handle, admin: &RouterClient) -> anyhow::Result<(RouterClient, EdgeId)> {
    let token = create_token(
        admin,
        TokenScope::Edge {
            region: RegionId::default_region(),
        },
    )
    .await?;
    let (creds, answer) = enroll(h, &token.token).await?;
    let Identity::Edge { id, .. } = answer.identity else {
        bail!("expected an edge identity");
    };
    Ok((agent(h, &creds)?, id))
}

async fn enroll_connector(
    h: &Handle,
    admin: &RouterClient,
) -> anyhow::Result<(RouterClient, ConnectorId)> {
    let token = create_token(
        admin,
        TokenScope::Connector {
            group: GroupId::default_group(),
        },
    )
    .await?;
    let (creds, answer) = enroll(h, &token.token).await?;
    let Identity::Connector { id, .. } = answer.identity else {
        bail!("expected a connector identity");
    };
    Ok((agent(h, &creds)?, id))
}

#[tokio::test]
async fn deleting_an_edge_revokes_it_and_connectors_stop_seeing_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |_| {}).await?;
    let admin = admin(&h)?;
    let (a, a_id) = enroll_edge(&h, &admin).await?;
    let (b, b_id) = enroll_edge(&h, &admin).await?;
    let (conn, conn_id) = enroll_connector(&h, &admin).await?;
    a.post_empty("/v1/edge/report", &report("127.0.0.1:4001", &conn_id))
        .await?;
    b.post_empty("/v1/edge/report", &report("127.0.0.1:4002", &conn_id))
        .await?;
    let cc: ConnectorConfig = conn
        .watch("/v1/connector/config", 0, Duration::ZERO)
        .await?
        .context("first snapshot")?;
    let mut ids: Vec<_> = cc.edges.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    let mut both = vec![a_id.clone(), b_id.clone()];
    both.sort();
    assert_eq!(ids, both);
    let listed: Vec<Connector> = admin.get_json("/v1/connectors").await?;
    assert_eq!(listed[0].edges, both);

    admin.delete(&format!("/v1/edges/{a_id}")).await?;

    // Connectors see it gone at their next watch.
    let cc2: ConnectorConfig = conn
        .watch("/v1/connector/config", cc.version, Duration::from_secs(50))
        .await?
        .context("the deletion is a change")?;
    assert_eq!(
        cc2.edges.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        vec![b_id.clone()]
    );
    // The router refuses its certificate everywhere.
    let r = a
        .post_json::<_, CertResponse>(
            "/v1/renew",
            &CsrRequest {
                csr_pem: pki::csr_pem(&pki::generate_key()?)?,
            },
        )
        .await;
    assert!(matches!(&r, Err(e) if e.is_revoked()), "{r:?}");
    let r = a
        .watch::<EdgeConfig>("/v1/edge/config", 0, Duration::ZERO)
        .await;
    assert!(matches!(&r, Err(e) if e.is_revoked()), "{r:?}");
    let r = a
        .post_empty("/v1/edge/report", &report("127.0.0.1:4001", &conn_id))
        .await;
    assert!(matches!(&r, Err(e) if e.is_revoked()), "{r:?}");
    let r = a
        .post_json::<_, CertResponse>(
            "/v1/edge/public-cert",
            &CsrRequest {
                csr_pem: pki::csr_pem(&pki::generate_key()?)?,
            },
        )
        .await;
    assert!(matches!(&r, Err(e) if e.is_revoked()), "{r:?}");
    // Listings forget it: the edge list, and the connector's edges.
    let edges: Vec<Edge> = admin.get_json("/v1/edges").await?;
    assert_eq!(
        edges.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        vec![b_id.clone()]
    );
    let listed: Vec<Connector> = admin.get_json("/v1/connectors").await?;
    assert_eq!(listed[0].edges, vec![b_id]);
    assert_refused(
        admin.delete(&format!("/v1/edges/{a_id}")).await,
        404,
        None,
        a_id.as_str(),
    );
    assert_refused(admin.delete("/v1/edges/..").await, 404, None, "");
    stop(h, shutdown).await
}

/// Enrolls as `kind` with a fresh key.
async fn enroll_as(
    h: &Handle,
    token: &str,
    kind: api::EnrollKind,
) -> Result<EnrollResponse, ClientError> {
    Ok(enroll_with(h, token, Some(kind), None).await?.1)
}

#[tokio::test]
async fn a_token_of_the_wrong_kind_is_refused_before_it_is_used() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |_| {}).await?;
    let admin = admin(&h)?;
    let edge_token = create_token(
        &admin,
        TokenScope::Edge {
            region: RegionId::default_region(),
        },
    )
    .await?;
    let connector_token = create_token(
        &admin,
        TokenScope::Connector {
            group: GroupId::default_group(),
        },
    )
    .await?;

    let (status, err) = refusal(enroll_as(&h, &edge_token.token, api::EnrollKind::Connector).await);
    assert_eq!(status, 400);
    assert_eq!(err.error, "wrong_kind");
    assert_eq!(err.field.as_deref(), Some("token"));
    assert!(
        err.message
            .contains("enrolls an edge (region default), not a connector")
            && err.message.contains("portico edge --token"),
        "{err:?}"
    );
    let (status, err) = refusal(enroll_as(&h, &connector_token.token, api::EnrollKind::Edge).await);
    assert_eq!((status, err.error.as_str()), (400, "wrong_kind"));
    assert!(
        err.message
            .contains("enrolls a connector (group Default), not an edge")
            && err.message.contains("portico connector --token"),
        "{err:?}"
    );

    // Nothing was recorded, and both tokens are still unused...
    assert!(admin
        .get_json::<Vec<Connector>>("/v1/connectors")
        .await?
        .is_empty());
    assert!(admin.get_json::<Vec<Edge>>("/v1/edges").await?.is_empty());
    let tokens: Vec<api::TokenInfo> = admin.get_json("/v1/tokens").await?;
    assert!(
        tokens.iter().all(|t| t.status == api::TokenStatus::Unused),
        "{tokens:?}"
    );
    // ...and good for the kind they were made for.
    let e = enroll_as(&h, &edge_token.token, api::EnrollKind::Edge).await?;
    assert!(matches!(e.identity, Identity::Edge { .. }));
    let c = enroll_as(&h, &connector_token.token, api::EnrollKind::Connector).await?;
    assert!(matches!(c.identity, Identity::Connector { .. }));

    let (_, text) = plain_get(h.metrics_addr.context("metrics")?, "/metrics").await?;
    assert!(
        text.contains(r#"portico_router_enrollments_total{kind="edge",result="invalid"} 1"#),
        "{text}"
    );
    stop(h, shutdown).await
}

#[tokio::test]
async fn a_connector_is_inactive_as_soon_as_no_edge_report_lists_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |_| {}).await?;
    let admin = admin(&h)?;
    let (a, a_id) = enroll_edge(&h, &admin).await?;
    let (b, b_id) = enroll_edge(&h, &admin).await?;
    let (_, conn_id) = enroll_connector(&h, &admin).await?;
    let status = || async {
        let list: Vec<Connector> = admin.get_json("/v1/connectors").await?;
        let c = list.into_iter().next().context("one connector")?;
        anyhow::Ok((c.status, c.edges, c.tunnels))
    };
    assert_eq!(
        status().await?,
        (Status::Inactive, vec![], 0),
        "never reported"
    );
    let edges: Vec<Edge> = admin.get_json("/v1/edges").await?;
    assert!(
        edges.iter().all(|e| e.status == Status::Inactive),
        "{edges:?}"
    );

    a.post_empty("/v1/edge/report", &report("127.0.0.1:4001", &conn_id))
        .await?;
    b.post_empty("/v1/edge/report", &report("127.0.0.1:4002", &conn_id))
        .await?;
    let mut both = vec![a_id.clone(), b_id.clone()];
    both.sort();
    assert_eq!(status().await?, (Status::Active, both, 2));
    let edges: Vec<Edge> = admin.get_json("/v1/edges").await?;
    assert!(
        edges.iter().all(|e| e.status == Status::Active),
        "{edges:?}"
    );

    // Edge a's next report leaves it out: b still lists it.
    let empty = |addr: &str| EdgeReport {
        tunnels: vec![],
        ..report(addr, &conn_id)
    };
    a.post_empty("/v1/edge/report", &empty("127.0.0.1:4001"))
        .await?;
    assert_eq!(status().await?, (Status::Active, vec![b_id.clone()], 1));
    // And b's: inactive at once, with no window to wait out.
    b.post_empty("/v1/edge/report", &empty("127.0.0.1:4002"))
        .await?;
    let (st, edges, tunnels) = status().await?;
    assert_eq!((st, edges, tunnels), (Status::Inactive, vec![], 0));
    let listed: Vec<Connector> = admin.get_json("/v1/connectors").await?;
    assert!(
        listed[0].last_seen.is_some(),
        "when it was last seen is kept"
    );
    let (_, text) = plain_get(h.metrics_addr.context("metrics")?, "/metrics").await?;
    assert!(
        text.contains(r#"portico_router_connectors{status="inactive"} 1"#)
            && text.contains(r#"portico_router_connectors{status="active"} 0"#)
            && text.contains(r#"portico_router_edges{status="active"} 2"#),
        "{text}"
    );

    // Edge a drains: shown so at once, out of the connectors' edge lists
    // and the presence, and counted apart.
    a.post_empty(
        "/v1/edge/report",
        &EdgeReport {
            draining: true,
            ..report("127.0.0.1:4001", &conn_id)
        },
    )
    .await?;
    let edges: Vec<Edge> = admin.get_json("/v1/edges").await?;
    let state = |id: &EdgeId| edges.iter().find(|e| e.id == *id).map(|e| e.status);
    assert_eq!(state(&a_id), Some(Status::Draining), "{edges:?}");
    assert_eq!(state(&b_id), Some(Status::Active), "{edges:?}");
    let (_, text) = plain_get(h.metrics_addr.context("metrics")?, "/metrics").await?;
    assert!(
        text.contains(r#"portico_router_edges{status="draining"} 1"#),
        "{text}"
    );
    stop(h, shutdown).await
}

#[tokio::test]
async fn the_router_refuses_a_data_directory_or_secret_others_can_open() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let (h, shutdown) = start(&data, |_| {}).await?;
    stop(h, shutdown).await?;
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    };
    for (path, loose, fix) in [
        (data.clone(), 0o755, "chmod 700"),
        (data.join("ca.key"), 0o640, "chmod 600"),
        (data.join("admin-token"), 0o604, "chmod 600"),
    ] {
        chmod(&path, loose)?;
        // Not the `start` helper: it makes the directory private first.
        let mut config = Config::new(&data);
        config.listen = "127.0.0.1:0".parse()?;
        let shutdown = CancellationToken::new();
        let err = match portico_router::start(config, shutdown.clone()).await {
            Ok(h) => {
                stop(h, shutdown).await?;
                bail!("the router started with {} at {loose:o}", path.display());
            }
            Err(e) => e,
        };
        match &err {
            portico_router::Error::InsecurePermissions { path: p, mode, .. } => {
                assert_eq!((p, *mode), (&path, loose));
            }
            other => bail!("expected InsecurePermissions, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains(&format!("mode {loose:04o}"))
                && text.contains(&format!("{fix} {}", path.display())),
            "{text}"
        );
        // Nothing was changed behind the operator's back.
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, loose);
        chmod(&path, if path == data { 0o700 } else { 0o600 })?;
    }
    let (h, shutdown) = start(&data, |_| {}).await?;
    stop(h, shutdown).await
}

#[tokio::test]
async fn enrollment_is_rate_limited_per_source_address() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |c| {
        c.enroll_limit.burst = 2;
        c.enroll_limit.per_minute = 1;
    })
    .await?;
    let admin = admin(&h)?;
    let token = create_token(
        &admin,
        TokenScope::Connector {
            group: GroupId::default_group(),
        },
    )
    .await?;
    let bogus =
        json!({ "token": "pt1.bad", "csr_pem": "", "host": "h", "version": "v" }).to_string();
    let from = |ip: &str| Some(ip.parse::<std::net::IpAddr>().expect("ip"));

    // Every attempt counts, refused ones and malformed ones too.
    for _ in 0..2 {
        let (status, _, body) =
            raw_from(&h, from("127.0.0.1"), "POST", "/v1/enroll", &bogus, None).await?;
        assert_eq!(status, 400, "{body}");
    }
    let (status, headers, body) =
        raw_from(&h, from("127.0.0.1"), "POST", "/v1/enroll", &bogus, None).await?;
    assert_eq!(status, 429, "{body}");
    let retry: u64 = headers
        .get("retry-after")
        .context("Retry-After")?
        .to_str()?
        .parse()?;
    assert!((1..=60).contains(&retry), "one token a minute: {retry}");
    let err: ApiError = serde_json::from_str(&body)?;
    assert_eq!(err.error, "rate_limited");
    assert!(err.message.contains("127.0.0.1"), "{err:?}");
    // The limited address is refused even with a good token, which stays
    // unused...
    let (status, _, _) =
        raw_from(&h, from("127.0.0.1"), "POST", "/v1/enroll", &bogus, None).await?;
    assert_eq!(status, 429);
    // ...and another address has its own bucket: it enrolls with it.
    let good = json!({
        "token": token.token,
        "csr_pem": pki::csr_pem(&pki::generate_key()?)?,
        "host": "h",
        "version": "v",
        "kind": "connector",
    })
    .to_string();
    let (status, _, body) =
        raw_from(&h, from("127.0.0.2"), "POST", "/v1/enroll", &good, None).await?;
    assert_eq!(status, 200, "{body}");
    let answer: EnrollResponse = serde_json::from_str(&body)?;
    assert!(matches!(answer.identity, Identity::Connector { .. }));
    // Other endpoints are not limited.
    let (status, _, _) = raw_from(
        &h,
        from("127.0.0.1"),
        "GET",
        "/v1/apps",
        "",
        Some(&h.admin_token()),
    )
    .await?;
    assert_eq!(status, 200);
    let (_, text) = plain_get(h.metrics_addr.context("metrics")?, "/metrics").await?;
    assert!(
        text.contains(
            r#"portico_router_enrollments_total{kind="unknown",result="rate_limited"} 2"#
        ),
        "{text}"
    );
    stop(h, shutdown).await
}

/// Enrolls an edge with a fresh key, saying it runs in `region` (or
/// taking the token's region with `None`).
async fn enroll_edge_in(
    h: &Handle,
    token: &str,
    region: Option<&str>,
) -> Result<(Credentials, EnrollResponse), ClientError> {
    let region = region.map(|r| RegionId::new(r).expect("region id"));
    enroll_with(h, token, Some(api::EnrollKind::Edge), region).await
}

fn edge_scope(region: &str) -> TokenScope {
    TokenScope::Edge {
        region: RegionId::new(region).expect("region id"),
    }
}

/// The ids of the regions listed, each with its edges' ids, sorted (edges
/// that enrolled in the same second are listed by id).
fn region_ids(regions: &[api::Region]) -> Vec<(&str, Vec<&str>)> {
    regions
        .iter()
        .map(|r| {
            let mut edges: Vec<&str> = r.edges.iter().map(|e| e.id.as_str()).collect();
            edges.sort_unstable();
            (r.id.as_str(), edges)
        })
        .collect()
}

#[tokio::test]
async fn regions_are_created_listed_with_their_edges_and_deleted_once_unused() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |_| {}).await?;
    let admin = admin(&h)?;
    let metrics = h.metrics_addr.context("metrics")?;

    // `default` is always there, empty.
    let regions: Vec<api::Region> = admin.get_json("/v1/regions").await?;
    assert_eq!(region_ids(&regions), [("default", vec![])]);
    assert_eq!(regions[0].connectors, 0);
    assert_refused(
        anon(&h)?.get_json::<Vec<api::Region>>("/v1/regions").await,
        401,
        None,
        "Bearer",
    );

    // Create; a duplicate and a bad id are refused.
    let created: api::Region = admin
        .post_json("/v1/regions", &json!({ "id": "eu-west" }))
        .await?;
    assert_eq!(
        (created.id.as_str(), created.edges.len(), created.connectors),
        ("eu-west", 0, 0)
    );
    for (body, status, field, message) in [
        (
            json!({ "id": "eu-west" }),
            409,
            "id",
            "region \"eu-west\" already exists",
        ),
        (
            json!({ "id": "eu west" }),
            400,
            "id",
            "region id may only contain",
        ),
        (
            json!({ "id": "x", "name": "y" }),
            400,
            "name",
            "unknown field",
        ),
        (
            json!({ "id": "auto" }),
            400,
            "id",
            "`auto` cannot be a region id",
        ),
    ] {
        assert_refused(
            admin
                .post_json::<_, api::Region>("/v1/regions", &body)
                .await,
            status,
            Some(field),
            message,
        );
    }

    // What names a region needs it to exist, and says how to make it.
    assert_refused(
        admin
            .post_json::<_, TokenCreated>("/v1/tokens", &json!({ "scope": edge_scope("us-east") }))
            .await,
        404,
        Some("scope.region"),
        "region us-east does not exist; create it with `portico region create us-east`",
    );
    assert_refused(
        admin
            .post_json::<_, Group>("/v1/groups", &json!({ "id": "g", "region": "us-east" }))
            .await,
        404,
        Some("region"),
        "create it with `portico region create us-east`",
    );
    let pinned: Group = admin
        .post_json("/v1/groups", &json!({ "id": "eu", "region": "eu-west" }))
        .await?;
    assert_eq!(pinned.region, "eu-west");
    let token = create_token(&admin, edge_scope("eu-west")).await?;
    assert_eq!(token.scope, edge_scope("eu-west"));

    // Delete: refused while used, for `default`, and for what is not there.
    assert_refused(
        admin.delete("/v1/regions/eu-west").await,
        409,
        None,
        "1 connector group(s) pinned to it (`portico group delete`), 1 unused edge token(s) for it (`portico token revoke`)",
    );
    assert_refused(
        admin.delete("/v1/regions/default").await,
        409,
        None,
        "cannot be deleted: it always exists",
    );
    assert_refused(admin.delete("/v1/regions/nope").await, 404, None, "nope");
    assert_refused(admin.delete("/v1/regions/..").await, 404, None, "");

    // Two edges enroll into eu-west; one connector attached to both, and
    // another to one of them.
    let (creds_a, answer) = enroll_edge_in(&h, &token.token, Some("eu-west")).await?;
    let Identity::Edge { id: a_id, region } = answer.identity.clone() else {
        bail!("expected an edge identity");
    };
    assert_eq!(region.as_str(), "eu-west");
    assert!(
        cert_names(&answer.cert.cert_pem)?
            .uris
            .contains(&"urn:portico:region:eu-west".to_owned()),
        "the certificate names the region"
    );
    let token_b = create_token(&admin, edge_scope("eu-west")).await?;
    let (creds_b, answer) = enroll_edge_in(&h, &token_b.token, None).await?;
    let Identity::Edge { id: b_id, region } = answer.identity.clone() else {
        bail!("expected an edge identity");
    };
    assert_eq!(region.as_str(), "eu-west", "the token's region by default");
    let (_, c1) = enroll_connector(&h, &admin).await?;
    let (_, c2) = enroll_connector(&h, &admin).await?;
    agent(&h, &creds_a)?
        .post_empty("/v1/edge/report", &report("127.0.0.1:4001", &c1))
        .await?;
    let mut two = report("127.0.0.1:4002", &c1);
    two.tunnels.push(TunnelReport {
        connector_id: c2.clone(),
        tunnels: 3,
        ..two.tunnels[0].clone()
    });
    agent(&h, &creds_b)?
        .post_empty("/v1/edge/report", &two)
        .await?;

    let regions: Vec<api::Region> = admin.get_json("/v1/regions").await?;
    assert_eq!(
        region_ids(&regions),
        [
            ("default", vec![]),
            ("eu-west", {
                let mut both = vec![a_id.as_str(), b_id.as_str()];
                both.sort_unstable();
                both
            })
        ]
    );
    let eu = &regions[1];
    assert_eq!(eu.connectors, 2, "c1 counts once: {eu:?}");
    let edge_row = |id: &EdgeId| eu.edges.iter().find(|e| e.id == *id).expect("listed");
    assert_eq!(
        (
            edge_row(&a_id).status,
            edge_row(&a_id).tunnels,
            edge_row(&a_id).connectors
        ),
        (Status::Active, 1, 1)
    );
    assert_eq!(
        (
            edge_row(&b_id).status,
            edge_row(&b_id).tunnels,
            edge_row(&b_id).connectors
        ),
        (Status::Active, 4, 2)
    );
    assert!(edge_row(&b_id).last_seen.is_some());
    assert_eq!(regions[0].connectors, 0);
    // `edge list` agrees on region and status.
    let edges: Vec<Edge> = admin.get_json("/v1/edges").await?;
    assert!(
        edges
            .iter()
            .all(|e| e.region.as_str() == "eu-west" && e.status == Status::Active),
        "{edges:?}"
    );
    let (_, text) = plain_get(metrics, "/metrics").await?;
    for line in [
        r#"portico_router_region_edges{region="eu-west",status="active"} 2"#,
        r#"portico_router_region_edges{region="eu-west",status="inactive"} 0"#,
        r#"portico_router_region_edges{region="default",status="active"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
    }

    // Still used by its edges; allowed once they and the group are gone.
    assert_refused(
        admin.delete("/v1/regions/eu-west").await,
        409,
        None,
        "2 edge(s) enrolled in it (`portico edge delete`)",
    );
    admin.delete(&format!("/v1/edges/{a_id}")).await?;
    admin.delete(&format!("/v1/edges/{b_id}")).await?;
    admin.delete("/v1/groups/eu").await?;
    admin.delete("/v1/regions/eu-west").await?;
    let regions: Vec<api::Region> = admin.get_json("/v1/regions").await?;
    assert_eq!(region_ids(&regions), [("default", vec![])]);
    let (_, text) = plain_get(metrics, "/metrics").await?;
    assert!(
        !text.contains(r#"region="eu-west""#),
        "a deleted region leaves the metrics:\n{text}"
    );
    // A new token for it is refused again.
    assert!(create_token(&admin, edge_scope("eu-west")).await.is_err());
    stop(h, shutdown).await
}

#[tokio::test]
async fn an_edge_token_of_another_region_is_refused_before_it_is_used() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |_| {}).await?;
    let admin = admin(&h)?;
    for r in ["eu-west", "us-east"] {
        let _: api::Region = admin.post_json("/v1/regions", &json!({ "id": r })).await?;
    }
    let token = create_token(&admin, edge_scope("eu-west")).await?;

    let (status, err) = refusal(enroll_edge_in(&h, &token.token, Some("us-east")).await);
    assert_eq!(status, 400);
    assert_eq!(err.error, "wrong_region");
    assert_eq!(err.field.as_deref(), Some("region"));
    assert!(
        err.message.contains(
            "this join token enrolls an edge in region eu-west, but this edge runs with --region us-east"
        ) && err
            .message
            .contains("`portico token create --edge --region us-east`"),
        "{err:?}"
    );
    // Nothing was recorded, and the token is still unused...
    assert!(admin.get_json::<Vec<Edge>>("/v1/edges").await?.is_empty());
    let tokens: Vec<api::TokenInfo> = admin.get_json("/v1/tokens").await?;
    assert_eq!(
        tokens.iter().map(|t| t.status).collect::<Vec<_>>(),
        [api::TokenStatus::Unused]
    );
    // ...so an edge of its region enrolls with it.
    let (_, answer) = enroll_edge_in(&h, &token.token, Some("eu-west")).await?;
    assert!(matches!(
        answer.identity,
        Identity::Edge { ref region, .. } if region.as_str() == "eu-west"
    ));
    let edges: Vec<Edge> = admin.get_json("/v1/edges").await?;
    assert_eq!(
        edges.iter().map(|e| e.region.as_str()).collect::<Vec<_>>(),
        ["eu-west"]
    );
    // A used token is refused as used, whichever region is asked for.
    assert_refused(
        enroll_edge_in(&h, &token.token, Some("eu-west")).await,
        401,
        None,
        "already used",
    );
    stop(h, shutdown).await
}

fn region_choice(regions: usize, reason: &str) -> api::RegionChoice {
    let r = |i: usize| RegionId::new(format!("r{i}")).expect("region id");
    api::RegionChoice {
        pinned: None,
        home: Some(r(0)),
        degraded: false,
        regions: (0..regions)
            .map(|i| api::RegionRtt {
                region: r(i),
                rtt_micros: Some(10_000 * (i as u64 + 1)),
                edges: 2,
                usable_edges: 2,
            })
            .collect(),
        last_move: Some(api::RegionMove {
            at: 1,
            from: Some(r(1)),
            to: r(0),
            reason: reason.to_owned(),
        }),
        moves: 1,
    }
}

/// `POST /v1/connector/report`: a connector's region choice, bounded, kept
/// with its record and listed; an edge or a deleted connector cannot post
/// one.
#[tokio::test]
async fn a_connector_reports_its_region_choice_and_the_list_shows_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |_| {}).await?;
    let admin = admin(&h)?;
    let (conn, conn_id) = enroll_connector(&h, &admin).await?;
    let (edge, _) = enroll_edge(&h, &admin).await?;
    let listed: Vec<Connector> = admin.get_json("/v1/connectors").await?;
    assert_eq!(listed[0].region, None, "nothing reported yet");

    let choice = region_choice(3, "r0 10 ms vs r1 20 ms: 10 ms and 50% nearer");
    conn.post_empty(
        "/v1/connector/report",
        &api::ConnectorReport {
            region: choice.clone(),
        },
    )
    .await?;
    let listed: Vec<Connector> = admin.get_json("/v1/connectors").await?;
    assert_eq!(listed[0].id, conn_id);
    assert_eq!(listed[0].region.as_ref(), Some(&choice));
    assert!(listed[0].region_reported_at.is_some());

    // Bounded: regions, and the reason's length and characters.
    let too_many = region_choice(api::MAX_REPORT_REGIONS + 1, "x");
    assert_refused(
        conn.post_empty(
            "/v1/connector/report",
            &api::ConnectorReport { region: too_many },
        )
        .await,
        400,
        Some("region.regions"),
        "at most",
    );
    for reason in ["x".repeat(api::MAX_MOVE_REASON + 1), "a\nb".to_owned()] {
        assert_refused(
            conn.post_empty(
                "/v1/connector/report",
                &api::ConnectorReport {
                    region: region_choice(1, &reason),
                },
            )
            .await,
            400,
            Some("region.last_move.reason"),
            "bytes",
        );
    }
    // An unknown field is refused (the report is deny_unknown_fields).
    let (status, _) = refusal(
        conn.post_empty(
            "/v1/connector/report",
            &json!({"region": choice, "extra": 1}),
        )
        .await,
    );
    assert_eq!(status, 400);
    // The refusals left the stored report alone.
    let listed: Vec<Connector> = admin.get_json("/v1/connectors").await?;
    assert_eq!(listed[0].region.as_ref(), Some(&choice));

    // Only a connector posts one.
    let r = edge
        .post_empty(
            "/v1/connector/report",
            &api::ConnectorReport {
                region: choice.clone(),
            },
        )
        .await;
    assert!(r.is_err(), "{r:?}");
    admin.delete(&format!("/v1/connectors/{conn_id}")).await?;
    let r = conn
        .post_empty(
            "/v1/connector/report",
            &api::ConnectorReport { region: choice },
        )
        .await;
    assert!(matches!(&r, Err(e) if e.is_revoked()), "{r:?}");
    stop(h, shutdown).await
}

/// A session id as edges make them (16 random bytes, base64url).
fn sid(c: char) -> String {
    std::iter::repeat_n(c, 22).collect()
}

#[tokio::test]
async fn sign_outs_reach_every_edge_as_deltas_and_a_handoff_code_is_used_once() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), with_sign_in).await?;
    let operator = admin(&h)?;
    let (a, _) = enroll_edge(&h, &operator).await?;
    let (b, _) = enroll_edge(&h, &operator).await?;
    let (connector, _) = enroll_connector(&h, &operator).await?;
    let config = |c: &RouterClient, after: u64| {
        let c = c.clone();
        async move {
            c.watch::<EdgeConfig>("/v1/edge/config", after, Duration::ZERO)
                .await
        }
    };
    let first = config(&b, 0).await?.context("a first config")?;
    assert!(first.signed_out.is_empty());
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let out = |c: char, until: u64| api::SignedOut { sid: sid(c), until };

    // Signed out at A: in B's next config, as a delta.
    a.post_empty(
        "/v1/edge/sign-outs",
        &api::SignOuts {
            sessions: vec![out('a', now + 600), out('b', now + 100_000_000)],
        },
    )
    .await?;
    let next = config(&b, first.version).await?.context("a change")?;
    assert_eq!(next.signed_out.len(), 2, "{:?}", next.signed_out);
    assert_eq!(next.signed_out[0], out('a', now + 600));
    assert!(
        next.signed_out[1].until <= now + 3600 + 60 + 5,
        "held no longer than a session lives: {:?}",
        next.signed_out[1]
    );
    // Nothing newer: no change. The same sign-out again changes nothing.
    assert!(config(&b, next.version).await?.is_none());
    a.post_empty(
        "/v1/edge/sign-outs",
        &api::SignOuts {
            sessions: vec![out('a', now + 600)],
        },
    )
    .await?;
    assert!(config(&b, next.version).await?.is_none());
    // A new edge (after 0) gets every live one; a later one only the new.
    b.post_empty(
        "/v1/edge/sign-outs",
        &api::SignOuts {
            sessions: vec![out('c', now + 600)],
        },
    )
    .await?;
    let all = config(&a, 0).await?.context("everything")?;
    assert_eq!(all.signed_out.len(), 3);
    let delta = config(&a, next.version).await?.context("the delta")?;
    assert_eq!(delta.signed_out, [out('c', now + 600)]);

    // Bad input is refused, naming the field.
    for (bad, field) in [
        (
            json!({ "sessions": [{ "sid": "short", "until": now + 60 }] }),
            "sessions.sid",
        ),
        (
            json!({ "sessions": [{ "sid": "a".repeat(65), "until": now + 60 }] }),
            "sessions.sid",
        ),
        (
            json!({ "sessions": [{ "sid": "bad chars!bad chars!bad", "until": now + 60 }] }),
            "sessions.sid",
        ),
        (
            json!({ "sessions": vec![json!({ "sid": sid('d'), "until": now + 60 }); 257] }),
            "sessions",
        ),
        (json!({ "sessions": [{ "sid": sid('d') }] }), "sessions[0]"),
    ] {
        assert_refused(
            a.post_empty("/v1/edge/sign-outs", &bad)
                .await
                .map(|()| "ok"),
            400,
            Some(field),
            "",
        );
    }
    // Only edges.
    for who in [&operator, &connector] {
        assert_refused(
            who.post_empty(
                "/v1/edge/sign-outs",
                &api::SignOuts {
                    sessions: vec![out('e', now + 60)],
                },
            )
            .await
            .map(|()| "ok"),
            401,
            None,
            "edge",
        );
    }

    // An admin signs a user out of every session: in the edges' configs,
    // as a delta; bad names are refused; only admins.
    let cut: api::SessionsRevoked = operator
        .post_json(
            "/v1/sessions/revoke",
            &json!({ "user": " alice@example.test " }),
        )
        .await?;
    assert_eq!(cut.user, "alice@example.test");
    assert!(cut.before >= now);
    let users = config(&b, delta.version).await?.context("the user's cut")?;
    assert_eq!(
        users.signed_out_users,
        [api::SignedOutUser {
            user: "alice@example.test".into(),
            before: cut.before,
            until: cut.before + 3600 + 60,
        }]
    );
    assert!(users.signed_out.is_empty(), "only what is new");
    for bad in [
        json!({ "user": "" }),
        json!({ "user": "a\nb" }),
        json!({ "user": "x".repeat(257) }),
    ] {
        assert_refused(
            operator
                .post_json::<_, api::SessionsRevoked>("/v1/sessions/revoke", &bad)
                .await,
            400,
            Some("user"),
            "verified email",
        );
    }
    assert_refused(
        a.post_json::<_, api::SessionsRevoked>("/v1/sessions/revoke", &json!({ "user": "alice" }))
            .await,
        401,
        None,
        "admin",
    );

    // A handoff code: once, at any edge.
    let used = api::HandoffUse {
        jti: sid('h'),
        until: now + 60,
    };
    a.post_empty("/v1/edge/handoffs", &used).await?;
    assert_refused(
        b.post_empty("/v1/edge/handoffs", &used)
            .await
            .map(|()| "ok"),
        409,
        Some("jti"),
        "used already",
    );
    assert_refused(
        a.post_empty("/v1/edge/handoffs", &json!({ "jti": "x", "until": now }))
            .await
            .map(|()| "ok"),
        400,
        Some("jti"),
        "handoff code",
    );
    // Both survive a restart.
    stop(h, shutdown).await?;
    let (h, shutdown) = start(dir.path(), with_sign_in).await?;
    let (c, _) = enroll_edge(&h, &admin(&h)?).await?;
    let restarted = config(&c, 0).await?.context("after a restart")?;
    assert_eq!(restarted.signed_out.len(), 3);
    assert_eq!(restarted.signed_out_users.len(), 1);
    assert_refused(
        c.post_empty("/v1/edge/handoffs", &used)
            .await
            .map(|()| "ok"),
        409,
        Some("jti"),
        "used already",
    );
    stop(h, shutdown).await?;

    // A router that signs no one in has no sessions to sign out of.
    let dir = tempfile::tempdir()?;
    let (h, shutdown) = start(dir.path(), |_| {}).await?;
    let (e, _) = enroll_edge(&h, &admin(&h)?).await?;
    assert_refused(
        e.post_empty(
            "/v1/edge/sign-outs",
            &api::SignOuts {
                sessions: vec![out('a', now + 60)],
            },
        )
        .await
        .map(|()| "ok"),
        409,
        None,
        "--oidc-issuer",
    );
    assert_refused(
        admin(&h)?
            .post_json::<_, api::SessionsRevoked>(
                "/v1/sessions/revoke",
                &json!({ "user": "alice" }),
            )
            .await,
        409,
        None,
        "--oidc-issuer",
    );
    stop(h, shutdown).await
}
