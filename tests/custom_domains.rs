//! Custom domains end to end: a router in this process whose
//! `check_nameservers` is a test zone `corp.test` served here by
//! hickory-server on 127.0.0.1, an edge, a connector and the demo backend.
//!
//! - `hr.corp.test -> lb.corp.test -> hr.apps.test` reaches app hr's
//!   default host: accepted. `wrong.corp.test -> other.corp.test` does not
//!   reach `wiki.apps.test`: refused, with the chain and what was expected;
//!   a name that does not exist, too. An update that keeps the host is not
//!   checked again; one that changes it is.
//! - Certificate uploads (rcgen, a test CA): expired, not yet valid,
//!   self-signed, key mismatch and host not covered are each refused with
//!   their own message; a good `*.corp.test` one is stored.
//! - curl with `--resolve hr.corp.test:PORT:127.0.0.1 --cacert` the test CA
//!   reaches the app through the edge, which presents the uploaded
//!   certificate by SNI (curl checks its chain and name); its expiry shows
//!   in `portico app list` and in the edge's metrics.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{admin_cli, admin_cli_result, curl_plain, metric_value};
use hickory_proto::rr::rdata::{A, CNAME, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use hickory_server::Server;
use portico_agent::ClientError;
use portico_proto::api::{App, AppSpec, Certificate, CertificateUpload};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

const LIMIT: Duration = Duration::from_secs(60);
const DOMAIN: &str = "apps.test";

type Zone = InMemoryZoneHandler<hickory_server::net::runtime::TokioRuntimeProvider>;

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn cname(from: &str, to: &str) -> Record {
    Record::from_rdata(name(from), 60, RData::CNAME(CNAME(name(to))))
}

/// `corp.test.` with an SOA and `records`, on UDP at 127.0.0.1.
async fn serve_zone(records: Vec<Record>) -> (Server<Catalog>, SocketAddr) {
    let origin = name("corp.test.");
    let mut zone = Zone::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = Record::from_rdata(
        origin.clone(),
        3600,
        RData::SOA(SOA::new(
            origin.prepend_label("ns").unwrap(),
            origin.prepend_label("admin").unwrap(),
            1,
            60,
            60,
            600,
            5,
        )),
    );
    for r in std::iter::once(soa).chain(records) {
        assert!(zone.upsert_mut(r, 1));
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::from(origin), vec![Arc::new(zone)]);
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let mut server = Server::new(catalog);
    server.register_socket(udp);
    (server, addr)
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn test_ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.distinguished_name
        .push(DnType::CommonName, "Corp Test CA");
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(names: &[&str], from: u64, until: u64) -> CertificateParams {
    let mut p =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, names[0]);
    p.not_before = at(from).into();
    p.not_after = at(until).into();
    p
}

fn upload(chain: String, key: &KeyPair, hosts: &[&str]) -> CertificateUpload {
    CertificateUpload {
        chain_pem: chain,
        key_pem: key.serialize_pem(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
    }
}

/// The API's refusal: status, field, message.
fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String, String) {
    match r {
        Err(ClientError::Api { status, error, .. }) => {
            (status, error.field.unwrap_or_default(), error.message)
        }
        other => panic!("expected an API refusal, got {other:?}"),
    }
}

/// curl through the edge at `resolve` trusting only `ca`: its exit code
/// (60: the certificate did not verify), the HTTP status and the body.
async fn fetch(ca: &std::path::Path, resolve: &str, url: &str) -> (i32, u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "30", "--cacert"])
        .arg(ca)
        .args(["--resolve", resolve, "-w", "\n%{http_code}", url])
        .output()
        .await
        .expect("curl is installed (scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        out.status.code().unwrap_or(-1),
        code.trim().parse().unwrap_or(0),
        body.to_owned(),
    )
}

fn spec(id: &str, host: &str, internal: &str) -> AppSpec {
    AppSpec {
        external_host: Some(host.into()),
        ..AppSpec::new(id.parse().unwrap(), internal)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_domain_is_checked_by_its_cname_chain_and_served_with_its_uploaded_certificate() {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let root = tokio_util::sync::CancellationToken::new();
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (_dns, dns_addr) = serve_zone(vec![
        cname("hr.corp.test.", "lb.corp.test."),
        cname("lb.corp.test.", "hr.apps.test."),
        cname("wrong.corp.test.", "other.corp.test."),
        Record::from_rdata(
            name("other.corp.test."),
            60,
            RData::A(A("192.0.2.7".parse().unwrap())),
        ),
        cname("moved.corp.test.", "gone.corp.test."),
    ])
    .await;

    let port = free_tcp_port();
    let mut rc = portico_router::Config::new(d.join("router"));
    rc.listen = loopback;
    rc.apps_domain = DOMAIN.into();
    rc.public_port = Some(port);
    rc.check_nameservers = vec![dns_addr];
    let router = portico_router::start(rc, root.child_token()).await.unwrap();
    let router_dir = d.join("router");
    let admin = common::router_admin(&router);
    let edge = common::start_edge(&router, &admin, &d.join("edge"), root.child_token(), |ec| {
        ec.public_listen = SocketAddr::from(([127, 0, 0, 1], port));
        ec.metrics_listen = Some(loopback);
        ec.http3 = false;
    })
    .await;
    let demo = portico::demo::start(loopback, root.child_token())
        .await
        .unwrap();
    let internal = format!("http://{}/", demo.addr);

    // 1. The CNAME chain decides.
    let hr: App = admin
        .post_json("/v1/apps", &spec("hr", "HR.corp.test", &internal))
        .await
        .expect("hr.corp.test reaches hr.apps.test");
    assert_eq!(hr.external_host, "hr.corp.test");
    assert_eq!(hr.certificate, None, "no certificate uploaded yet");
    let (status, field, message) = refusal(
        admin
            .post_json::<_, App>("/v1/apps", &spec("wiki", "wrong.corp.test", &internal))
            .await,
    );
    assert_eq!(
        (status, field.as_str()),
        (400, "external_host"),
        "{message}"
    );
    assert!(
        message.contains(
            "the CNAME chain wrong.corp.test -> other.corp.test ends at \"other.corp.test\", not at the app's default host \"wiki.apps.test\""
        ),
        "{message}"
    );
    let (status, _, message) = refusal(
        admin
            .post_json::<_, App>("/v1/apps", &spec("wiki", "moved.corp.test", &internal))
            .await,
    );
    assert_eq!(status, 400);
    assert!(
        message.contains("moved.corp.test -> gone.corp.test reaches \"gone.corp.test\", which does not exist (NXDOMAIN)"),
        "{message}"
    );
    // An update that keeps the host is not checked again; a new host is.
    let patched: App = admin
        .patch_json(
            "/v1/apps/hr",
            &serde_json::json!({ "translate_body": true }),
        )
        .await
        .unwrap();
    assert!(patched.translate_body);
    let (status, _, message) = refusal(
        admin
            .patch_json::<_, App>(
                "/v1/apps/hr",
                &serde_json::json!({ "external_host": "wrong.corp.test" }),
            )
            .await,
    );
    assert_eq!(status, 400);
    assert!(
        message.contains("wrong.corp.test -> other.corp.test"),
        "{message}"
    );

    // 2. Certificate uploads: each fault its own error.
    let ca = test_ca();
    let t = now();
    let key = KeyPair::generate().unwrap();
    let post = |u: CertificateUpload| {
        let admin = admin.clone();
        async move {
            admin
                .post_json::<_, Certificate>("/v1/certificates", &u)
                .await
        }
    };
    let expired = leaf(&["hr.corp.test"], t - 90 * 86400, t - 86400)
        .signed_by(&key, &ca)
        .unwrap();
    let future = leaf(&["hr.corp.test"], t + 86400, t + 90 * 86400)
        .signed_by(&key, &ca)
        .unwrap();
    let own = leaf(&["hr.corp.test"], t - 86400, t + 86400)
        .self_signed(&key)
        .unwrap();
    let good_key = KeyPair::generate().unwrap();
    let good = leaf(&["*.corp.test"], t - 86400, t + 30 * 86400 + 600)
        .signed_by(&good_key, &ca)
        .unwrap();
    let good_chain = format!("{}{}", good.pem(), ca.pem());
    for (what, u, field, starts) in [
        (
            "expired",
            upload(expired.pem(), &key, &["hr.corp.test"]),
            "chain_pem",
            "expired: ",
        ),
        (
            "not yet valid",
            upload(future.pem(), &key, &["hr.corp.test"]),
            "chain_pem",
            "not yet valid: ",
        ),
        (
            "self-signed",
            upload(own.pem(), &key, &["hr.corp.test"]),
            "chain_pem",
            "self-signed: ",
        ),
        (
            "key mismatch",
            upload(good_chain.clone(), &key, &["hr.corp.test"]),
            "key_pem",
            "key mismatch: ",
        ),
        (
            "host not covered",
            upload(good_chain.clone(), &good_key, &["hr.corp.test", "a.b.corp.test"]),
            "hosts",
            "host not covered: the certificate names *.corp.test, none of which covers \"a.b.corp.test\"",
        ),
    ] {
        let (status, f, message) = refusal(post(u).await);
        assert_eq!((status, f.as_str()), (400, field), "{what}: {message}");
        assert!(message.starts_with(starts), "{what}: {message}");
    }
    let listed: Vec<Certificate> = admin.get_json("/v1/certificates").await.unwrap();
    assert!(listed.is_empty(), "refused uploads store nothing");

    // A good one, through the CLI.
    let chain_file = d.join("chain.pem");
    let key_file = d.join("key.pem");
    std::fs::write(&chain_file, &good_chain).unwrap();
    std::fs::write(&key_file, good_key.serialize_pem()).unwrap();
    let api = router.url();
    let (ok, _, err) = admin_cli_result(
        &api,
        &router_dir,
        &[
            "cert",
            "upload",
            "--chain",
            chain_file.to_str().unwrap(),
            "--key",
            key_file.to_str().unwrap(),
            "--host",
            "nope.example.net",
        ],
    )
    .await;
    assert!(!ok && err.contains("host not covered"), "{err}");
    let shown = admin_cli(
        &api,
        &router_dir,
        &[
            "cert",
            "upload",
            "--chain",
            chain_file.to_str().unwrap(),
            "--key",
            key_file.to_str().unwrap(),
            "--app",
            "hr",
        ],
    )
    .await;
    assert!(shown.contains("*.corp.test"), "{shown}");
    let listed: Vec<Certificate> = admin.get_json("/v1/certificates").await.unwrap();
    assert_eq!(listed.len(), 1);
    let cert = &listed[0];
    assert_eq!(cert.names, ["*.corp.test"]);

    // 3. The connector, and the app through the edge by SNI.
    let connector = common::start_connector(
        &router,
        &admin,
        &d.join("connector"),
        portico_proto::GroupId::default_group(),
        1,
        root.child_token(),
    )
    .await;
    let ca_file = d.join("corp-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let resolve = format!("hr.corp.test:{port}:127.0.0.1");
    let url = format!("https://hr.corp.test:{port}/");
    let body = common::eventually(
        "the edge to serve hr.corp.test with the upload",
        LIMIT,
        || async {
            let (code, status, body) = fetch(&ca_file, &resolve, &url).await;
            (code == 0 && status == 200).then_some(body)
        },
    )
    .await;
    assert!(!body.is_empty());
    // The router's own CA does not vouch for what the edge presents there:
    // it is the uploaded certificate, not the edge's wildcard.
    let router_ca = router_dir.join("ca.pem");
    let (code, _, _) = fetch(&router_ca, &resolve, &url).await;
    assert_eq!(
        code, 60,
        "the router CA must not verify the uploaded certificate"
    );
    // A host of the apps domain still gets the edge's own certificate.
    let apps_resolve = format!("x.{DOMAIN}:{port}:127.0.0.1");
    let (code, status, _) = fetch(
        &router_ca,
        &apps_resolve,
        &format!("https://x.{DOMAIN}:{port}/"),
    )
    .await;
    assert_eq!(
        (code, status),
        (0, 404),
        "the edge's own certificate, then AppNotFound"
    );

    // 4. Expiry in `app list` and the metrics.
    let listed = admin_cli(&api, &router_dir, &["app", "list"]).await;
    let header = listed.lines().next().unwrap();
    assert!(header.trim_end().ends_with("CERT"), "{listed}");
    let row = listed
        .lines()
        .find(|l| l.starts_with("hr "))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(row.trim_end().ends_with("30d left"), "{row}");
    let app: App = admin.get_json("/v1/apps/hr").await.unwrap();
    assert_eq!(
        app.certificate
            .as_ref()
            .map(|c| (c.id.as_str(), c.not_after)),
        Some((cert.id.as_str(), cert.not_after))
    );
    let metrics_url = format!("http://{}/metrics", edge.metrics_addr.unwrap());
    let series = format!(
        "portico_edge_certificate_expiry_timestamp_seconds{{certificate=\"{}\",host=\"*.corp.test\"}}",
        cert.id
    );
    let text = curl_plain(&metrics_url).await.text();
    assert_eq!(
        metric_value(&text, &series),
        cert.not_after as f64,
        "{text}"
    );

    // Deleting it: the gauge goes, the host falls back to the edge's own.
    admin_cli(&api, &router_dir, &["cert", "delete", &cert.id]).await;
    common::eventually("the gauge to go", LIMIT, || async {
        let text = curl_plain(&metrics_url).await.text();
        (!text.contains(&series)).then_some(())
    })
    .await;
    let (code, _, _) = fetch(&ca_file, &resolve, &url).await;
    assert_eq!(
        code, 60,
        "the test CA no longer verifies what the edge presents"
    );
    drop(connector);
    root.cancel();
}
