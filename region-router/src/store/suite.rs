//! The behaviour every [`Store`] implementation must have, as one test
//! suite. `open` must return a store over the same (initially empty) data
//! each time it is called: the suite closes and reopens it to check that
//! everything survives.
//!
//! It panics on the first failed check, like `assert!`.

use portico_proto::api::{BackendTimeout, SignedOut, SignedOutUser, TokenScope};
use portico_proto::ids::{AppId, ConnectorId, EdgeId, GroupId, RegionId};

use super::{
    AppRecord, CertInfo, CertificateRecord, ConnectorRecord, ConnectorRegion, ConnectorSeen,
    EdgeRecord, EdgeSeen, GroupRecord, RegionRecord, Store, TokenRecord,
};
use crate::error::StoreError;

fn group(id: &str) -> GroupRecord {
    GroupRecord {
        id: GroupId::new(id).expect("group id"),
        region: "auto".into(),
        created_at: 100,
    }
}

fn app(id: &str, host: &str, group: &str) -> AppRecord {
    AppRecord {
        id: AppId::new(id).expect("app id"),
        external_host: host.into(),
        internal_url: "http://10.0.0.5:8080/".into(),
        connector_group: GroupId::new(group).expect("group id"),
        backend_timeout: BackendTimeout::Seconds(5),
        validate_backend_tls: false,
        translate_headers: false,
        translate_body: true,
        required_features: vec!["sign-in".into(), "mesh".into()],
        assignment: portico_proto::api::Assignment {
            everyone: false,
            users: vec!["alice".into()],
            groups: vec!["devs".into()],
        },
        identity_headers: [("X-Remote-User".to_owned(), "email".to_owned())].into(),
        hidden: true,
        created_at: 200,
        maintenance: true,
        home_path: Some("/portal/".into()),
        backend_ca_pem: Some("pem".into()),
        // Both unlike their defaults, so that storing them is seen.
        http_only: false,
        persistent: true,
        oidc_client_id: Some("hr-client".into()),
        oidc_client_secret: Some(portico_proto::api::ClientSecret::new("hr-secret")),
    }
}

fn region(id: &str) -> RegionRecord {
    RegionRecord {
        id: RegionId::new(id).expect("region id"),
        created_at: 150,
    }
}

fn rid(id: &str) -> RegionId {
    RegionId::new(id).expect("region id")
}

fn edge_token(id: &str, region: &str) -> TokenRecord {
    token(
        id,
        TokenScope::Edge {
            region: rid(region),
        },
    )
}

fn token(id: &str, scope: TokenScope) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        secret_sha256: "ab".repeat(32),
        scope,
        created_at: 300,
        expires_at: 4000,
        used_at: None,
        revoked_at: None,
    }
}

fn connector(id: &str, group: &str) -> ConnectorRecord {
    ConnectorRecord {
        id: ConnectorId::new(id).expect("connector id"),
        group: GroupId::new(group).expect("group id"),
        host: "host-a".into(),
        version: "0.1.0".into(),
        enrolled_at: 400,
        cert: CertInfo {
            serial: "01ab".into(),
            not_after: 5000,
        },
        deleted_at: None,
        last_seen: None,
        address_seen: None,
        tunnels: 0,
    }
}

fn edge(id: &str) -> EdgeRecord {
    EdgeRecord {
        id: EdgeId::new(id).expect("edge id"),
        region: RegionId::default_region(),
        host: "edge-host".into(),
        version: "0.1.0".into(),
        enrolled_at: 500,
        cert: CertInfo {
            serial: "02cd".into(),
            not_after: 6000,
        },
        tunnel_addr: None,
        public_addr: None,
        last_seen: None,
        tunnels: 0,
        deleted_at: None,
    }
}

/// Runs the whole suite.
pub fn run(open: &dyn Fn() -> Box<dyn Store>) {
    let store = open();
    populate(store.as_ref());
    check_populated(store.as_ref());
    let version = store.config_version().expect("version");
    store.close();
    assert!(
        matches!(store.config_version(), Err(StoreError::Closed)),
        "a closed store refuses calls"
    );
    drop(store);
    let store = open();
    check_populated(store.as_ref());
    assert_eq!(
        store.config_version().expect("version"),
        version,
        "the config version survives a reopen"
    );
    certificates(store.as_ref());
    sign_outs(store.as_ref());
    store.close();
    drop(store);
    let store = open();
    let kept = store.signed_out_after(0, 1000).expect("signed out");
    assert_eq!(
        kept.iter().map(|s| s.sid.as_str()).collect::<Vec<_>>(),
        [SID_B, SID_C],
        "signed-out sessions survive a reopen"
    );
    assert!(
        !store.use_handoff(SID_A, 2000, 1000).expect("handoff"),
        "used handoff codes survive a reopen"
    );
    assert_eq!(
        store.signed_out_users_after(0, 1000).expect("users").len(),
        1,
        "signed-out users survive a reopen"
    );
    let kept = store.list_certificates().expect("list certificates");
    assert_eq!(
        kept.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["c2"],
        "certificates survive a reopen"
    );
    assert_eq!(kept[0].key_pem, "key of c2", "with their key");
    store.close();
}

fn certificate(id: &str, names: &[&str], not_after: u64) -> CertificateRecord {
    CertificateRecord {
        id: id.to_owned(),
        names: names.iter().map(|n| n.to_string()).collect(),
        issuer: "CN=test CA".into(),
        not_before: 1,
        not_after,
        chain_pem: format!("chain of {id}"),
        key_pem: format!("key of {id}"),
        uploaded_at: 5,
    }
}

/// Certificates: stored, replaced by id, bounded, deleted; each change
/// moves the version.
fn certificates(s: &dyn Store) {
    let v0 = s.config_version().expect("version");
    let v1 = s
        .put_certificate(&certificate("c1", &["*.corp.test"], 100))
        .expect("put c1");
    assert!(v1 > v0, "a new certificate bumps the version");
    s.put_certificate(&certificate("c2", &["hr.corp.test"], 200))
        .expect("put c2");
    let v3 = s
        .put_certificate(&certificate("c1", &["*.corp.test", "corp.test"], 300))
        .expect("replace c1");
    let all = s.list_certificates().expect("list");
    assert_eq!(all.len(), 2, "the same id replaces");
    assert_eq!(
        all[0],
        certificate("c1", &["*.corp.test", "corp.test"], 300)
    );
    assert_eq!(all[1].names, ["hr.corp.test"]);
    let v4 = s.delete_certificate("c1").expect("delete c1");
    assert!(v4 > v3, "a deletion bumps the version");
    assert!(matches!(
        s.delete_certificate("c1"),
        Err(StoreError::NotFound {
            kind: "certificate",
            ..
        })
    ));
    let max = portico_proto::api::MAX_CERTIFICATES;
    for i in 1..max {
        s.put_certificate(&certificate(&format!("f{i:03}"), &["x.test"], 1))
            .expect("fill");
    }
    assert!(
        matches!(
            s.put_certificate(&certificate("over", &["x.test"], 1)),
            Err(StoreError::Limit { max: m, .. }) if m == max
        ),
        "one more than the limit is refused"
    );
    s.put_certificate(&certificate("c2", &["hr.corp.test"], 200))
        .expect("replacing at the limit is fine");
    for i in 1..max {
        s.delete_certificate(&format!("f{i:03}")).expect("empty");
    }
}

const SID_A: &str = "aaaaaaaaaaaaaaaaaaaaaa";
const SID_B: &str = "bbbbbbbbbbbbbbbbbbbbbb";
const SID_C: &str = "cccccccccccccccccccccc";

fn out(sid: &str, until: u64) -> SignedOut {
    SignedOut {
        sid: sid.into(),
        until,
    }
}

/// Signed-out sessions: each new one bumps the version and is read back
/// after the version before it; a known or ended one changes nothing; an
/// ended one is forgotten. Handoff codes: used once.
fn sign_outs(s: &dyn Store) {
    let v0 = s.config_version().expect("version");
    assert_eq!(s.signed_out_after(0, 10).expect("none yet"), []);
    let v1 = s
        .sign_out(&[out(SID_A, 500), out(SID_A, 500)], 10)
        .expect("sign out")
        .expect("a new one bumps the version");
    assert!(v1 > v0);
    assert_eq!(s.config_version().expect("version"), v1);
    let v2 = s
        .sign_out(&[out(SID_A, 500), out(SID_B, 2000), out(SID_C, 3000)], 20)
        .expect("sign out")
        .expect("two new ones");
    assert_eq!(
        s.sign_out(&[out(SID_B, 2000), out("dddddddddddddddddddddd", 20)], 20)
            .expect("known and ended"),
        None,
        "known and ended sessions change nothing"
    );
    assert_eq!(s.config_version().expect("version"), v2);
    assert_eq!(
        s.signed_out_after(v0, 20).expect("after v0"),
        [out(SID_A, 500), out(SID_B, 2000), out(SID_C, 3000)]
    );
    assert_eq!(
        s.signed_out_after(v1, 20).expect("after v1"),
        [out(SID_B, 2000), out(SID_C, 3000)],
        "only what came after the version asked"
    );
    assert_eq!(s.signed_out_after(v2, 20).expect("after v2"), []);
    assert_eq!(
        s.signed_out_after(0, 600).expect("later"),
        [out(SID_B, 2000), out(SID_C, 3000)],
        "a session over is left out"
    );

    // Users: a later revocation moves the cut forward, never back.
    let u1 = s.sign_out_user("alice", 100, 3700, 100).expect("alice");
    assert!(u1 > v2);
    assert_eq!(
        s.signed_out_users_after(v2, 100).expect("after v2"),
        [SignedOutUser {
            user: "alice".into(),
            before: 100,
            until: 3700
        }]
    );
    let u2 = s.sign_out_user("alice", 50, 60, 100).expect("an older one");
    assert_eq!(
        s.signed_out_users_after(u1, 100).expect("after u1"),
        [SignedOutUser {
            user: "alice".into(),
            before: 100,
            until: 3700
        }],
        "kept at the later cut, brought again at the new version"
    );
    assert_eq!(s.signed_out_users_after(u2, 100).expect("after u2"), []);
    assert_eq!(
        s.signed_out_users_after(0, 3700).expect("over"),
        [],
        "over when the last session would have ended"
    );

    assert!(s.use_handoff(SID_A, 2000, 1000).expect("first use"));
    assert!(!s.use_handoff(SID_A, 2000, 1000).expect("second use"));
    assert!(s.use_handoff(SID_B, 1100, 1000).expect("another code"));
    assert!(
        s.use_handoff(SID_B, 1300, 1200)
            .expect("expired, forgotten"),
        "an expired code is forgotten (it is refused by its own expiry)"
    );
    let v3 = s.config_version().expect("version");
    assert_eq!(v3, u2, "handoff codes do not move the version");
}

fn populate(s: &dyn Store) {
    let v0 = s.config_version().expect("version");
    assert_eq!(v0, 0, "an empty store starts at version 0");

    // groups
    assert!(s.ensure_group(&group("Default")).expect("ensure"));
    assert!(!s.ensure_group(&group("Default")).expect("ensure again"));
    let v1 = s.config_version().expect("version");
    assert!(v1 > v0, "creating a group bumps the version");
    let v2 = s.create_group(&group("dc1")).expect("create dc1");
    assert!(v2 > v1);
    assert!(matches!(
        s.create_group(&group("dc1")),
        Err(StoreError::AlreadyExists { kind: "group", .. })
    ));
    s.create_group(&group("empty")).expect("create empty");
    s.create_group(&group("gone")).expect("create gone");
    let v = s
        .delete_group(&GroupId::new("gone").expect("id"))
        .expect("delete gone");
    assert_eq!(s.config_version().expect("version"), v);
    assert!(s
        .get_group(&GroupId::new("gone").expect("id"))
        .expect("get")
        .is_none());
    assert!(matches!(
        s.delete_group(&GroupId::new("gone").expect("id")),
        Err(StoreError::NotFound { kind: "group", .. })
    ));
    assert!(matches!(
        s.delete_group(&GroupId::default_group()),
        Err(StoreError::DefaultGroup { .. })
    ));

    // apps
    let before = s.config_version().expect("version");
    let v = s
        .create_app(&app("hr", "hr.apps.test", "dc1"))
        .expect("create hr");
    assert!(v > before);
    assert!(matches!(
        s.create_app(&app("hr", "other.apps.test", "dc1")),
        Err(StoreError::AlreadyExists { kind: "app", .. })
    ));
    assert!(matches!(
        s.create_app(&app("hr2", "hr.apps.test", "dc1")),
        Err(StoreError::HostTaken { ref app, .. }) if app == "hr"
    ));
    assert!(matches!(
        s.create_app(&app("x", "x.apps.test", "nope")),
        Err(StoreError::NotFound { kind: "group", .. })
    ));
    s.create_app(&app("tmp", "tmp.apps.test", "Default"))
        .expect("create tmp");
    s.delete_app(&AppId::new("tmp").expect("id"))
        .expect("delete tmp");
    assert!(matches!(
        s.delete_app(&AppId::new("tmp").expect("id")),
        Err(StoreError::NotFound { kind: "app", .. })
    ));
    // Updating an app: every field but the id and creation time.
    s.create_app(&app("upd", "upd.apps.test", "Default"))
        .expect("create upd");
    let before = s.config_version().expect("version");
    let changed = AppRecord {
        external_host: "upd2.apps.test".into(),
        internal_url: "https://10.0.0.9/x/".into(),
        connector_group: GroupId::new("empty").expect("id"),
        backend_timeout: BackendTimeout::Long,
        validate_backend_tls: true,
        translate_headers: true,
        translate_body: false,
        required_features: vec![],
        maintenance: false,
        home_path: None,
        backend_ca_pem: None,
        http_only: true,
        persistent: false,
        oidc_client_id: None,
        oidc_client_secret: None,
        ..app("upd", "upd.apps.test", "Default")
    };
    let v = s.update_app(&changed).expect("update");
    assert!(v > before, "an update bumps the version");
    assert_eq!(
        s.get_app(&AppId::new("upd").expect("id")).expect("get"),
        Some(changed.clone())
    );
    // Its own host is not "taken"; another app's is.
    s.update_app(&changed).expect("same host again");
    assert!(matches!(
        s.update_app(&AppRecord {
            external_host: "hr.apps.test".into(),
            ..changed.clone()
        }),
        Err(StoreError::HostTaken { ref app, .. }) if app == "hr"
    ));
    assert!(matches!(
        s.update_app(&AppRecord {
            connector_group: GroupId::new("nope").expect("id"),
            ..changed.clone()
        }),
        Err(StoreError::NotFound { kind: "group", .. })
    ));
    assert!(matches!(
        s.update_app(&app("absent", "absent.apps.test", "Default")),
        Err(StoreError::NotFound { kind: "app", .. })
    ));
    assert_eq!(
        s.get_app(&AppId::new("upd").expect("id")).expect("get"),
        Some(changed),
        "refused updates change nothing"
    );
    s.delete_app(&AppId::new("upd").expect("id"))
        .expect("delete upd");

    match s.delete_group(&GroupId::new("dc1").expect("id")) {
        Err(StoreError::GroupNotEmpty {
            apps: 1,
            connectors: 0,
            ..
        }) => {}
        other => panic!("deleting a group with an app: {other:?}"),
    }

    // tokens and enrollment
    let scope = TokenScope::Connector {
        group: GroupId::new("dc1").expect("id"),
    };
    s.create_token(&token("00000000000000c1", scope.clone()))
        .expect("token");
    assert!(matches!(
        s.create_token(&token("00000000000000c1", scope.clone())),
        Err(StoreError::AlreadyExists { .. })
    ));
    s.create_token(&token("00000000000000c2", scope))
        .expect("token 2");
    s.create_token(&token(
        "00000000000000e1",
        TokenScope::Edge {
            region: RegionId::default_region(),
        },
    ))
    .expect("edge token");
    s.enroll_connector("00000000000000c1", 350, &connector("c-1", "dc1"))
        .expect("enroll c-1");
    assert!(matches!(
        s.enroll_connector("00000000000000c1", 351, &connector("c-other", "dc1")),
        Err(StoreError::TokenUsed)
    ));
    assert!(
        s.get_connector(&ConnectorId::new("c-other").expect("id"))
            .expect("get")
            .is_none(),
        "a refused enrollment creates nothing"
    );
    assert!(matches!(
        s.enroll_connector("00000000000000ff", 351, &connector("c-x", "dc1")),
        Err(StoreError::NotFound {
            kind: "join token",
            ..
        })
    ));
    // A failed enrollment (unknown group) leaves the token unused.
    assert!(matches!(
        s.enroll_connector("00000000000000c2", 352, &connector("c-2", "nope")),
        Err(StoreError::NotFound { kind: "group", .. })
    ));
    assert_eq!(
        s.get_token("00000000000000c2")
            .expect("get")
            .expect("some")
            .used_at,
        None
    );
    s.enroll_connector("00000000000000c2", 353, &connector("c-2", "dc1"))
        .expect("enroll c-2");
    assert_eq!(
        s.get_token("00000000000000c1")
            .expect("get")
            .expect("some")
            .used_at,
        Some(350)
    );
    s.enroll_edge("00000000000000e1", 360, &edge("e-1"))
        .expect("enroll e-1");

    // Revoking tokens: only unused ones; a revoked one enrolls nothing.
    s.create_token(&token(
        "00000000000000c3",
        TokenScope::Connector {
            group: GroupId::new("dc1").expect("id"),
        },
    ))
    .expect("token 3");
    s.revoke_token("00000000000000c3", 355).expect("revoke");
    assert!(matches!(
        s.revoke_token("00000000000000c3", 356),
        Err(StoreError::TokenRevoked)
    ));
    assert!(matches!(
        s.revoke_token("00000000000000c1", 356),
        Err(StoreError::TokenUsed)
    ));
    assert!(matches!(
        s.revoke_token("00000000000000ff", 356),
        Err(StoreError::NotFound {
            kind: "join token",
            ..
        })
    ));
    assert!(matches!(
        s.enroll_connector("00000000000000c3", 357, &connector("c-3", "dc1")),
        Err(StoreError::TokenRevoked)
    ));
    assert!(s
        .get_connector(&ConnectorId::new("c-3").expect("id"))
        .expect("get")
        .is_none());

    // A deleted edge stays as a tombstone.
    s.create_token(&token(
        "00000000000000e2",
        TokenScope::Edge {
            region: RegionId::default_region(),
        },
    ))
    .expect("edge token 2");
    s.enroll_edge("00000000000000e2", 361, &edge("e-2"))
        .expect("enroll e-2");
    let before = s.config_version().expect("version");
    let v = s
        .delete_edge(&EdgeId::new("e-2").expect("id"), 362)
        .expect("delete e-2");
    assert!(v > before, "deleting an edge bumps the version");
    assert!(matches!(
        s.delete_edge(&EdgeId::new("e-2").expect("id"), 363),
        Err(StoreError::NotFound { kind: "edge", .. })
    ));
    assert!(matches!(
        s.delete_edge(&EdgeId::new("e-404").expect("id"), 363),
        Err(StoreError::NotFound { kind: "edge", .. })
    ));

    // connectors
    let c1 = ConnectorId::new("c-1").expect("id");
    s.set_connector_cert(
        &c1,
        &CertInfo {
            serial: "ffee".into(),
            not_after: 9000,
        },
    )
    .expect("cert");
    s.connector_seen(&ConnectorSeen {
        id: c1.clone(),
        at: 700,
        address: "192.0.2.1:5000".into(),
        version: "0.2.0".into(),
        tunnels: 2,
    })
    .expect("seen");
    s.connector_seen(&ConnectorSeen {
        id: ConnectorId::new("c-unknown").expect("id"),
        at: 700,
        address: "x".into(),
        version: "x".into(),
        tunnels: 1,
    })
    .expect("unknown connectors are ignored");
    let report = ConnectorRegion {
        id: c1.clone(),
        at: 710,
        report: r#"{"home":"eu"}"#.into(),
    };
    s.connector_region(&ConnectorRegion {
        report: "{}".into(),
        at: 705,
        ..report.clone()
    })
    .expect("region report");
    s.connector_region(&report)
        .expect("a later one replaces it");
    assert!(matches!(
        s.connector_region(&ConnectorRegion {
            id: ConnectorId::new("c-unknown").expect("id"),
            ..report.clone()
        }),
        Err(StoreError::NotFound {
            kind: "connector",
            ..
        })
    ));
    let before = s.config_version().expect("version");
    let v = s
        .delete_connector(&ConnectorId::new("c-2").expect("id"), 800)
        .expect("delete c-2");
    assert!(v > before, "deleting a connector bumps the version");
    assert!(matches!(
        s.delete_connector(&ConnectorId::new("c-2").expect("id"), 801),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.set_connector_cert(
            &ConnectorId::new("c-404").expect("id"),
            &CertInfo {
                serial: "1".into(),
                not_after: 1
            }
        ),
        Err(StoreError::NotFound { .. })
    ));

    // edges
    let e1 = EdgeId::new("e-1").expect("id");
    let seen = EdgeSeen {
        id: e1.clone(),
        at: 900,
        tunnel_addr: "127.0.0.1:4433".into(),
        public_addr: "127.0.0.1:8443".into(),
        version: "0.3.0".into(),
        tunnels: 3,
        mesh_addr: None,
        groups: Vec::new(),
        draining: false,
        reported_from: None,
    };
    let before = s.config_version().expect("version");
    let v = s
        .edge_seen(&seen)
        .expect("seen")
        .expect("a new tunnel address bumps");
    assert!(v > before);
    assert_eq!(
        s.edge_seen(&seen).expect("seen again"),
        None,
        "no change, no bump"
    );
    assert!(matches!(
        s.edge_seen(&EdgeSeen {
            id: EdgeId::new("e-404").expect("id"),
            ..seen.clone()
        }),
        Err(StoreError::NotFound { kind: "edge", .. })
    ));
    s.set_edge_cert(
        &e1,
        &CertInfo {
            serial: "abcd".into(),
            not_after: 7000,
        },
    )
    .expect("edge cert");

    populate_presence(s, &seen);
    populate_regions(s);
}

/// Presence lives in the store: a report's groups and mesh address bump
/// the version when they change (not when only a count does), a stale
/// edge's groups are emptied in one step, a deleted edge leaves, and every
/// bump reaches `subscribe`.
fn populate_presence(s: &dyn Store, seen: &EdgeSeen) {
    let mut watch = s.subscribe();
    let g = GroupId::default_group();
    let e2 = edge("e-pres");
    s.create_token(&edge_token("00000000000000ea", "default"))
        .expect("token");
    s.enroll_edge("00000000000000ea", 380, &e2)
        .expect("enroll e-pres");
    let report = EdgeSeen {
        id: e2.id.clone(),
        at: 1000,
        groups: vec![(g.clone(), 2)],
        mesh_addr: Some("127.0.0.1:7845".into()),
        ..seen.clone()
    };
    let v1 = s
        .edge_seen(&report)
        .expect("seen")
        .expect("new presence bumps");
    assert!(watch.has_changed().expect("open"));
    assert_eq!(*watch.borrow_and_update(), v1);
    let mine = |s: &dyn Store| {
        s.list_presence()
            .expect("presence")
            .into_iter()
            .find(|p| p.edge == e2.id)
    };
    let p = mine(s).expect("listed");
    assert_eq!(p.groups, vec![(g.clone(), 2)]);
    assert_eq!(p.mesh_addr.as_deref(), Some("127.0.0.1:7845"));
    assert_eq!(p.reported_from, None);
    // Only the count changes: stored, no bump.
    let counted = EdgeSeen {
        groups: vec![(g.clone(), 5)],
        at: 1001,
        ..report.clone()
    };
    assert_eq!(s.edge_seen(&counted).expect("seen"), None);
    assert!(!watch.has_changed().expect("open"));
    assert_eq!(mine(s).expect("listed").groups, vec![(g.clone(), 5)]);
    // A new mesh address bumps; so does a new source address (the DNS
    // answers of an edge that advertises 0.0.0.0 follow it).
    let moved = EdgeSeen {
        mesh_addr: Some("127.0.0.1:7846".into()),
        ..counted.clone()
    };
    assert!(s.edge_seen(&moved).expect("seen").is_some());
    let moved = EdgeSeen {
        reported_from: Some("192.0.2.8".into()),
        ..moved
    };
    assert!(s.edge_seen(&moved).expect("seen").is_some());
    assert_eq!(
        mine(s).expect("listed").reported_from,
        Some("192.0.2.8".parse().unwrap())
    );
    // Stale before 1002: emptied once, with a bump; then nothing to do.
    let v = s.expire_presence(1002).expect("expire").expect("bumps");
    assert_eq!(*watch.borrow_and_update(), v);
    assert!(mine(s).expect("listed").groups.is_empty());
    assert_eq!(s.expire_presence(1002).expect("expire"), None);
    // Reported again: back, with a bump.
    assert!(s
        .edge_seen(&EdgeSeen {
            at: 2000,
            ..moved.clone()
        })
        .expect("seen")
        .is_some());
    assert_eq!(mine(s).expect("listed").groups, vec![(g.clone(), 5)]);
    // Draining is stored and bumps, once; back to serving bumps again.
    let draining = EdgeSeen {
        at: 2000,
        draining: true,
        ..moved.clone()
    };
    let v = s
        .edge_seen(&draining)
        .expect("seen")
        .expect("draining bumps");
    assert_eq!(*watch.borrow_and_update(), v);
    assert!(mine(s).expect("listed").draining);
    assert_eq!(s.edge_seen(&draining).expect("seen"), None);
    assert!(s
        .edge_seen(&EdgeSeen { at: 2000, ..moved })
        .expect("seen")
        .is_some());
    assert!(!mine(s).expect("listed").draining);
    s.delete_edge(&e2.id, 2001).expect("delete");
    assert!(mine(s).is_none(), "a deleted edge leaves the presence");
}

/// Regions: `default` is there from the start; a region can be deleted
/// once nothing uses it.
fn populate_regions(s: &dyn Store) {
    let ids = |s: &dyn Store| {
        s.list_regions()
            .expect("regions")
            .into_iter()
            .map(|r| r.id.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(s), ["default"], "`default` always exists");
    let version = s.config_version().expect("version");
    for r in ["us-east", "eu-west", "gone", "later", "rev"] {
        s.create_region(&region(r)).expect("create region");
    }
    assert_eq!(
        s.config_version().expect("version"),
        version,
        "regions alone change nothing edges or connectors are told"
    );
    assert!(matches!(
        s.create_region(&region("eu-west")),
        Err(StoreError::AlreadyExists { kind: "region", ref id }) if id == "eu-west"
    ));
    assert!(matches!(
        s.create_region(&region("default")),
        Err(StoreError::AlreadyExists { kind: "region", .. })
    ));
    assert_eq!(
        s.get_region(&rid("eu-west")).expect("get"),
        Some(region("eu-west"))
    );
    assert_eq!(s.get_region(&rid("nowhere")).expect("get"), None);
    assert_eq!(
        ids(s),
        ["default", "eu-west", "gone", "later", "rev", "us-east"],
        "listed by id"
    );

    // What names a region needs it to exist, and nothing is written
    // otherwise.
    let pinned = |region: &str| GroupRecord {
        region: region.into(),
        ..group("pinned")
    };
    assert!(matches!(
        s.create_group(&pinned("nowhere")),
        Err(StoreError::NotFound { kind: "region", ref id }) if id == "nowhere"
    ));
    assert_eq!(
        s.get_group(&GroupId::new("pinned").expect("id"))
            .expect("get"),
        None
    );
    s.create_group(&pinned("us-east")).expect("pinned group");
    assert!(matches!(
        s.create_token(&edge_token("00000000000000e9", "nowhere")),
        Err(StoreError::NotFound { kind: "region", .. })
    ));
    assert_eq!(s.get_token("00000000000000e9").expect("get"), None);
    s.create_token(&edge_token("00000000000000e3", "eu-west"))
        .expect("eu-west token");
    // The edge record's region is checked too; the token stays unused.
    let e3 = |region: &str| EdgeRecord {
        region: rid(region),
        ..edge("e-3")
    };
    assert!(matches!(
        s.enroll_edge("00000000000000e3", 370, &e3("nowhere")),
        Err(StoreError::NotFound { kind: "region", .. })
    ));
    assert_eq!(
        s.get_token("00000000000000e3")
            .expect("get")
            .expect("e3")
            .used_at,
        None
    );
    assert_eq!(
        s.get_edge(&EdgeId::new("e-3").expect("id")).expect("get"),
        None
    );

    // Refused while used: by a pinned group, an unused token, a live edge.
    let now = 1000;
    assert!(matches!(
        s.delete_region(&RegionId::default_region(), now),
        Err(StoreError::DefaultRegion { .. })
    ));
    assert!(matches!(
        s.delete_region(&rid("nowhere"), now),
        Err(StoreError::NotFound { kind: "region", .. })
    ));
    match s.delete_region(&rid("us-east"), now) {
        Err(StoreError::RegionInUse {
            edges: 0,
            groups: 1,
            tokens: 0,
            ..
        }) => {}
        other => panic!("a pinned group's region: {other:?}"),
    }
    match s.delete_region(&rid("eu-west"), now) {
        Err(StoreError::RegionInUse {
            edges: 0,
            groups: 0,
            tokens: 1,
            ..
        }) => {}
        other => panic!("an unused token's region: {other:?}"),
    }
    s.enroll_edge("00000000000000e3", 371, &e3("eu-west"))
        .expect("enroll e-3 in eu-west");
    match s.delete_region(&rid("eu-west"), now) {
        Err(StoreError::RegionInUse {
            edges: 1,
            groups: 0,
            tokens: 0,
            ..
        }) => {}
        other => panic!("a live edge's region: {other:?}"),
    }

    // Allowed once the edge is deleted (its tombstone does not count)...
    s.create_token(&edge_token("00000000000000e4", "gone"))
        .expect("gone token");
    s.enroll_edge(
        "00000000000000e4",
        372,
        &EdgeRecord {
            region: rid("gone"),
            ..edge("e-4")
        },
    )
    .expect("enroll e-4 in gone");
    assert!(matches!(
        s.delete_region(&rid("gone"), now),
        Err(StoreError::RegionInUse { edges: 1, .. })
    ));
    s.delete_edge(&EdgeId::new("e-4").expect("id"), 373)
        .expect("delete e-4");
    let version = s.config_version().expect("version");
    s.delete_region(&rid("gone"), now).expect("delete gone");
    assert_eq!(s.config_version().expect("version"), version);
    assert_eq!(s.get_region(&rid("gone")).expect("get"), None);
    assert!(matches!(
        s.delete_region(&rid("gone"), now),
        Err(StoreError::NotFound { kind: "region", .. })
    ));
    // ...once its token has expired (the suite's tokens expire at 4000)...
    s.create_token(&edge_token("00000000000000e5", "later"))
        .expect("later token");
    assert!(matches!(
        s.delete_region(&rid("later"), 3999),
        Err(StoreError::RegionInUse { tokens: 1, .. })
    ));
    s.delete_region(&rid("later"), 4000)
        .expect("an expired token does not hold its region");
    // ...or been revoked.
    s.create_token(&edge_token("00000000000000e6", "rev"))
        .expect("rev token");
    s.revoke_token("00000000000000e6", 380).expect("revoke");
    s.delete_region(&rid("rev"), now)
        .expect("a revoked token does not hold its region");
}

fn check_populated(s: &dyn Store) {
    assert_eq!(
        s.connector_regions().expect("regions"),
        [ConnectorRegion {
            id: ConnectorId::new("c-1").expect("id"),
            at: 710,
            report: r#"{"home":"eu"}"#.into(),
        }],
        "the latest region report of each live connector"
    );
    assert!(
        matches!(
            s.connector_region(&ConnectorRegion {
                id: ConnectorId::new("c-2").expect("id"),
                at: 1,
                report: "{}".into(),
            }),
            Err(StoreError::NotFound { .. })
        ),
        "a deleted connector reports nothing"
    );
    let groups = s.list_groups().expect("groups");
    let ids: Vec<(&str, u32)> = groups.iter().map(|(g, n)| (g.id.as_str(), *n)).collect();
    assert_eq!(
        ids,
        vec![("Default", 0), ("dc1", 1), ("empty", 0), ("pinned", 0)]
    );
    assert_eq!(
        s.get_group(&GroupId::new("pinned").expect("id"))
            .expect("get")
            .map(|g| g.region),
        Some("us-east".to_owned())
    );
    let regions = s.list_regions().expect("regions");
    assert_eq!(
        regions.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["default", "eu-west", "us-east"]
    );
    assert_eq!(regions[1], region("eu-west"));
    assert_eq!(
        s.get_group(&GroupId::new("dc1").expect("id")).expect("get"),
        Some(group("dc1"))
    );

    let apps = s.list_apps().expect("apps");
    assert_eq!(apps, vec![app("hr", "hr.apps.test", "dc1")]);
    assert_eq!(
        s.get_app(&AppId::new("hr").expect("id")).expect("get"),
        Some(app("hr", "hr.apps.test", "dc1"))
    );
    assert_eq!(
        s.get_app(&AppId::new("tmp").expect("id")).expect("get"),
        None
    );

    let t = s
        .get_token("00000000000000c1")
        .expect("get")
        .expect("token");
    assert_eq!(t.used_at, Some(350));
    assert_eq!(t.secret_sha256, "ab".repeat(32));
    assert_eq!(
        s.get_token("00000000000000e1")
            .expect("get")
            .expect("token")
            .scope,
        TokenScope::Edge {
            region: RegionId::default_region()
        }
    );
    assert_eq!(s.get_token("0000000000000000").expect("get"), None);
    let tokens = s.list_tokens().expect("tokens");
    let mut ids: Vec<&str> = tokens.iter().map(|t| t.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        [
            "00000000000000c1",
            "00000000000000c2",
            "00000000000000c3",
            "00000000000000e1",
            "00000000000000e2",
            "00000000000000e3",
            "00000000000000e4",
            "00000000000000e5",
            "00000000000000e6",
            "00000000000000ea"
        ]
    );
    let c3 = tokens
        .iter()
        .find(|t| t.id == "00000000000000c3")
        .expect("c3");
    assert_eq!((c3.used_at, c3.revoked_at), (None, Some(355)));

    let connectors = s.list_connectors().expect("connectors");
    assert_eq!(connectors.len(), 2);
    let c1 = s
        .get_connector(&ConnectorId::new("c-1").expect("id"))
        .expect("get")
        .expect("c-1");
    assert_eq!(c1.cert.serial, "ffee");
    assert_eq!(c1.cert.not_after, 9000);
    assert_eq!(c1.last_seen, Some(700));
    assert_eq!(c1.address_seen.as_deref(), Some("192.0.2.1:5000"));
    assert_eq!(c1.version, "0.2.0");
    assert_eq!(c1.tunnels, 2);
    assert_eq!(c1.deleted_at, None);
    let c2 = s
        .get_connector(&ConnectorId::new("c-2").expect("id"))
        .expect("get")
        .expect("c-2 is kept as a tombstone");
    assert_eq!(c2.deleted_at, Some(800));

    let edges = s.list_edges().expect("edges");
    assert_eq!(edges.len(), 5, "deleted edges are kept as tombstones");
    let gone = edges.iter().find(|e| e.id.as_str() == "e-2").expect("e-2");
    assert_eq!(gone.deleted_at, Some(362));
    let e3 = edges.iter().find(|e| e.id.as_str() == "e-3").expect("e-3");
    assert_eq!((e3.region.as_str(), e3.deleted_at), ("eu-west", None));
    let e4 = edges.iter().find(|e| e.id.as_str() == "e-4").expect("e-4");
    assert_eq!(
        (e4.region.as_str(), e4.deleted_at),
        ("gone", Some(373)),
        "a tombstone keeps the region it had"
    );
    let e = edges.iter().find(|e| e.id.as_str() == "e-1").expect("e-1");
    assert_eq!(e.deleted_at, None);
    assert_eq!(e.tunnel_addr.as_deref(), Some("127.0.0.1:4433"));
    assert_eq!(e.public_addr.as_deref(), Some("127.0.0.1:8443"));
    assert_eq!(e.last_seen, Some(900));
    assert_eq!(e.tunnels, 3);
    assert_eq!(e.version, "0.3.0");
    assert_eq!(e.cert.serial, "abcd");
    assert_eq!(
        s.get_edge(&EdgeId::new("e-1").expect("id"))
            .expect("get")
            .as_ref(),
        Some(e)
    );

    assert!(s.config_version().expect("version") >= 8);
}
