//! Enrollment, revocation, persistence across a restart, malformed frames
//! over a real QUIC connection, and invalid admin API input.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{eventually, Stack};
use portico::dev::{create_token, DevOptions};
use portico_agent::enroll::{obtain, EnrollOptions};
use portico_agent::{ClientError, Credentials, EnrollError, StateDir};
use portico_proto::api::{App, AppSpec, Connector, Group, Status, TokenScope};
use portico_proto::{AppId, CloseCode, GroupId};

fn opts(s: &Stack, token: Option<String>) -> EnrollOptions {
    EnrollOptions {
        router_url: s.d.router.url(),
        token,
        host: "test-host".into(),
        version: "test".into(),
        kind: portico_proto::api::EnrollKind::Connector,
        region: None,
    }
}

async fn connector_token(s: &Stack) -> String {
    create_token(
        &s.d.admin,
        TokenScope::Connector {
            group: GroupId::default_group(),
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_works_once() {
    let s = Stack::start().await;
    let token = connector_token(&s).await;
    let dir = tempfile::tempdir().unwrap();
    let first = StateDir::open(dir.path().join("a")).unwrap();
    let creds = obtain(&first, &opts(&s, Some(token.clone())))
        .await
        .expect("first use enrolls");
    assert!(matches!(
        creds.identity,
        portico_proto::api::Identity::Connector { .. }
    ));
    // Saved credentials are reused without a token.
    let again = obtain(&first, &opts(&s, None)).await.unwrap();
    assert_eq!(again.identity, creds.identity);

    let second = StateDir::open(dir.path().join("b")).unwrap();
    match obtain(&second, &opts(&s, Some(token))).await {
        Err(EnrollError::TokenRefused { message }) => {
            assert!(message.contains("already used"), "{message}")
        }
        other => panic!("a reused token must be refused, got {other:?}"),
    }
    assert!(
        !dir.path().join("b").exists(),
        "a refused enrollment leaves no state directory"
    );
    // No token and no state: a clear error that says what to do.
    let third = StateDir::open(dir.path().join("c")).unwrap();
    let err = obtain(&third, &opts(&s, None)).await.unwrap_err();
    assert!(err.to_string().contains("portico token create"), "{err}");
    s.stop().await;
}

/// A QUIC client of the edge's tunnel listener presenting `chain`/`key`.
async fn dial_edge(
    s: &Stack,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> quinn::Connection {
    let roots = portico_agent::pki::root_store(&s.d.router.ca_pem).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(portico_agent::pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![portico_proto::ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));
    let name = portico_proto::api::edge_server_name(&s.d.edge.id);
    endpoint
        .connect(s.d.edge.tunnel_addr, &name)
        .unwrap()
        .await
        .expect("QUIC handshake completes on the client side")
}

async fn enrolled_credentials(s: &Stack) -> Credentials {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::open(dir.path()).unwrap();
    obtain(&state, &opts(s, Some(connector_token(s).await)))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let s = Stack::start().await;
    // The deployment is up with one tunnel; the check at the end counts both.
    tokio::time::timeout(Duration::from_secs(30), s.d.connector.wait_tunnels(2))
        .await
        .expect("the connector's second tunnel comes up");
    // A rogue CA issues a certificate with a perfectly valid Portico identity.
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let rogue =
        rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
    let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = portico_proto::api::Identity::Connector {
        id: portico_proto::ConnectorId::new("c-rogue").unwrap(),
        group: GroupId::default_group(),
    }
    .to_uris()
    .into_iter()
    .map(|u| rcgen::SanType::URI(u.try_into().unwrap()))
    .collect();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &rogue).unwrap();
    let conn = dial_edge(
        &s,
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .await;
    // TLS 1.3: the client finishes first; the refusal shows on first use.
    let refused = async {
        let (mut send, _recv) = conn.open_bi().await?;
        send.write_all(b"hello?").await?;
        conn.closed().await;
        Ok::<_, anyhow::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), refused).await;
    let reason = conn.close_reason().expect("the edge closed the connection");
    let text = format!("{reason:#}");
    assert!(
        text.contains("UnknownIssuer")
            || text.contains("invalid peer certificate")
            || text.contains("48"),
        "refused at the TLS handshake: {text}"
    );
    assert_eq!(
        s.d.edge.tunnel_count(),
        2,
        "the real connector's tunnels are unaffected"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_the_offending_tunnel() {
    let s = Stack::start().await;
    let creds = enrolled_credentials(&s).await;
    let cases: [(&str, Vec<u8>); 4] = [
        ("garbage", b"\xff\xfe garbage that is no frame".to_vec()),
        ("oversized head", vec![0x10, 0x80, 0x10, 0x00, 0x00]), // StreamHead claiming 1 MiB
        ("unknown type", vec![0x7e, 0x00]),
        ("truncated hello then FIN", vec![0x01, 0x20, 0x01]),
    ];
    for (what, bytes) in cases {
        let conn = dial_edge(
            &s,
            creds.cert_chain().unwrap(),
            creds.private_key().unwrap(),
        )
        .await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        let _ = send.finish();
        let err = tokio::time::timeout(Duration::from_secs(20), conn.closed())
            .await
            .unwrap_or_else(|_| panic!("{what}: the edge must close the tunnel"));
        match err {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(
                    u64::from(c.error_code),
                    u64::from(CloseCode::ProtocolError.to_wire()),
                    "{what}: {c:?}"
                )
            }
            other => panic!("{what}: expected an application close, got {other:?}"),
        }
        // Everything else keeps serving.
        let r = s.curl(&[&s.d.app_url()]).await;
        assert_eq!(r.status, 200, "{what}: the edge still serves");
    }

    // A Hello with an unknown version gets a Goodbye that names both versions.
    let conn = dial_edge(
        &s,
        creds.cert_chain().unwrap(),
        creds.private_key().unwrap(),
    )
    .await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let portico_proto::api::Identity::Connector { id, group } = creds.identity.clone() else {
        unreachable!()
    };
    let hello = portico_proto::Frame::Hello(portico_proto::Hello {
        version: 99,
        capabilities: 0,
        connector_id: id,
        group,
        agent_version: "future".into(),
    });
    portico_proto::io::write_frame(&mut send, &hello)
        .await
        .unwrap();
    match portico_proto::io::read_frame(&mut recv).await {
        Ok(Some(portico_proto::Frame::Goodbye(g))) => {
            assert_eq!(g.code, u64::from(CloseCode::VersionMismatch.to_wire()));
            assert!(
                g.reason.contains("99") && g.reason.contains("portico/1"),
                "{}",
                g.reason
            );
        }
        other => panic!("expected Goodbye, got {other:?}"),
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_connector_closes_its_tunnels_and_refuses_it() {
    let s = Stack::start().await;
    let id = s.d.connector.id.clone();
    assert!(s.d.edge.tunnel_count() > 0);
    s.d.admin
        .delete(&format!("/v1/connectors/{id}"))
        .await
        .unwrap();

    eventually(
        "the edge drops the revoked tunnels",
        Duration::from_secs(10),
        || async { (s.d.edge.tunnel_count() == 0).then_some(()) },
    )
    .await;
    let r = s.curl(&[&s.d.app_url()]).await;
    assert_eq!(
        r.header("x-portico-error").as_deref(),
        Some("ConnectorNotFound")
    );

    // The connector stops and says why.
    let Stack { d, shutdown, dir } = s;
    let connector = d.connector;
    let err = tokio::time::timeout(Duration::from_secs(30), connector.wait())
        .await
        .expect("the revoked connector stops")
        .expect_err("with an error");
    assert!(
        err.to_string().to_lowercase().contains("revoked") || err.to_string().contains("deleted"),
        "{err}"
    );

    // Its credentials no longer work: a restart from the same state is refused.
    let mut config = portico_connector::Config::new(d.router.url(), dir.path().join("connector"));
    config.metrics_listen = None;
    let restarted = portico_connector::start(config, shutdown.clone()).await;
    let refused = match restarted {
        Err(e) => e.to_string(),
        Ok(h) => tokio::time::timeout(Duration::from_secs(30), h.wait())
            .await
            .expect("a revoked connector does not run on")
            .expect_err("it stops with an error")
            .to_string(),
    };
    assert!(
        refused.to_lowercase().contains("revoked") || refused.contains("deleted"),
        "{refused}"
    );
    assert_eq!(d.edge.tunnel_count(), 0);
    shutdown.cancel();
    let _ = d.edge.wait().await;
    d.demo.wait().await;
    let _ = d.router.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_groups_and_connectors_survive_a_router_restart() {
    let s = Stack::start().await;
    let _: Group =
        s.d.admin
            .post_json(
                "/v1/groups",
                &portico_proto::api::CreateGroup {
                    id: GroupId::new("finance").unwrap(),
                    region: None,
                },
            )
            .await
            .unwrap();
    let connector = s.d.connector.id.clone();
    let s = s.restart(DevOptions::default()).await;
    let groups: Vec<Group> = s.d.admin.get_json("/v1/groups").await.unwrap();
    assert!(
        groups.iter().any(|g| g.id.as_str() == "finance"),
        "{groups:?}"
    );
    assert!(groups.iter().any(|g| g.id.as_str() == "Default"));
    let apps: Vec<App> = s.d.admin.get_json("/v1/apps").await.unwrap();
    assert!(apps.iter().any(|a| a.id.as_str() == "hello"));
    let connectors: Vec<Connector> = s.d.admin.get_json("/v1/connectors").await.unwrap();
    let c = connectors
        .iter()
        .find(|c| c.id == connector)
        .expect("connector survives");
    assert_eq!(
        s.d.connector.id, connector,
        "the connector restarted from its state, no new enrollment"
    );
    eventually(
        "the connector is reported active",
        Duration::from_secs(20),
        || async {
            let list: Vec<Connector> = s.d.admin.get_json("/v1/connectors").await.ok()?;
            list.into_iter()
                .find(|c| c.id == connector && c.status == Status::Active && !c.edges.is_empty())
        },
    )
    .await;
    assert!(!c.host.is_empty());
    let r = s.curl(&[&s.d.app_url()]).await;
    assert_eq!(r.status, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_admin_input_gets_precise_errors() {
    let s = Stack::start().await;
    let base = AppSpec::new(AppId::new("x").unwrap(), "http://127.0.0.1:9/");
    let expect = |r: Result<App, ClientError>, status: u16, field: &str| {
        let e = r.expect_err("refused");
        assert_eq!(e.status(), Some(status), "{e}");
        let api = e.api_error().expect("JSON error body");
        assert_eq!(api.field.as_deref(), Some(field), "{api:?}");
        assert!(!api.message.is_empty());
    };
    let mut bad_url = base.clone();
    bad_url.internal_url = "ftp://nope".into();
    expect(
        s.d.admin.post_json("/v1/apps", &bad_url).await,
        400,
        "internal_url",
    );
    let mut outside = base.clone();
    outside.external_host = Some("evil.example.com".into());
    expect(
        s.d.admin.post_json("/v1/apps", &outside).await,
        400,
        "external_host",
    );
    let mut dup = base.clone();
    dup.id = AppId::new("dup").unwrap();
    dup.external_host = Some("hello.apps.localhost".into());
    expect(
        s.d.admin.post_json("/v1/apps", &dup).await,
        409,
        "external_host",
    );
    let mut unknown = base.clone();
    unknown.connector_group = GroupId::new("nosuch").unwrap();
    expect(
        s.d.admin.post_json("/v1/apps", &unknown).await,
        404,
        "connector_group",
    );

    // A wrong admin token.
    let wrong = portico_agent::RouterClient::new(
        &s.d.router.url(),
        portico_agent::RouterTrust::CaPem(s.d.router.ca_pem.clone()),
        None,
    )
    .unwrap()
    .with_bearer("not-the-token");
    let e = wrong.get_json::<Vec<App>>("/v1/apps").await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");

    // The Default group cannot go, nor a group with connectors.
    let e = s.d.admin.delete("/v1/groups/Default").await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    s.stop().await;
}
