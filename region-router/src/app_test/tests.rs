//! The checks of `portico app test` as functions, and the probe jobs on a
//! virtual clock.

use std::time::{Duration, SystemTime};

use portico_proto::api::ProbeStep;

use super::*;
use crate::presence::REPORT_FRESH;
use crate::snapshot::tests::Builder;

fn connector(id: &str) -> ConnectorId {
    ConnectorId::new(id).unwrap()
}

fn app(id: &str) -> AppId {
    AppId::new(id).unwrap()
}

fn result(detail: &str) -> ProbeResult {
    ProbeResult {
        url: "http://intra/".into(),
        steps: vec![ProbeStep {
            step: "tcp".into(),
            status: CheckStatus::Fail,
            ms: 1,
            detail: detail.into(),
        }],
    }
}

#[tokio::test(start_paused = true)]
async fn a_connector_that_never_polls_is_not_supported_and_does_not_hang() {
    let probes = Probes::default();
    let started = tokio::time::Instant::now();
    let outcome = probes.run(&connector("old"), &app("hr")).await;
    assert!(
        matches!(outcome, Outcome::NotPolling { last_poll: None }),
        "{outcome:?}"
    );
    // It waited for a poll, PICK_WAIT (virtual time), and no longer.
    assert_eq!(started.elapsed(), PICK_WAIT);
    // Nothing of the job is left behind.
    let inner = probes.lock();
    assert!(inner.waiting.is_empty());
    assert!(inner.queues.values().all(|q| q.jobs.is_empty()));
    let check = probe_check(&connector("old"), "http://intra/", outcome);
    assert_eq!(check.status, CheckStatus::Fail);
    assert!(
        check
            .summary
            .starts_with("not supported by this connector version"),
        "{}",
        check.summary
    );
}

#[tokio::test(start_paused = true)]
async fn a_polling_connector_gets_the_job_and_only_it_can_answer() {
    let probes = Arc::new(Probes::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let c = connector("c1");
    let poller = {
        let (probes, c, stop) = (probes.clone(), c.clone(), stop.clone());
        tokio::spawn(async move { probes.poll(&c, Duration::from_secs(25), &stop).await })
    };
    tokio::task::yield_now().await;
    let run = {
        let (probes, c) = (probes.clone(), c.clone());
        tokio::spawn(async move { probes.run(&c, &app("hr")).await })
    };
    let jobs = poller.await.unwrap().expect("the poll gets the job");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].app, app("hr"));
    // Another connector cannot answer it, nor can anyone answer a job
    // that does not exist.
    assert!(!probes.answer(&connector("c2"), jobs[0].id, result("x")));
    assert!(!probes.answer(&c, jobs[0].id + 1, result("x")));
    assert!(probes.answer(
        &c,
        jobs[0].id,
        result("tcp: connection refused 10.0.0.5:8080")
    ));
    match run.await.unwrap() {
        Outcome::Done(r) => assert_eq!(r.steps[0].detail, "tcp: connection refused 10.0.0.5:8080"),
        other => panic!("{other:?}"),
    }
    // Answered once: a second answer is refused.
    assert!(!probes.answer(&c, jobs[0].id, result("x")));
}

#[tokio::test(start_paused = true)]
async fn a_job_taken_and_never_answered_times_out() {
    let probes = Arc::new(Probes::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let c = connector("c1");
    let poller = {
        let (probes, c, stop) = (probes.clone(), c.clone(), stop.clone());
        tokio::spawn(async move { probes.poll(&c, Duration::from_secs(25), &stop).await })
    };
    tokio::task::yield_now().await;
    let started = tokio::time::Instant::now();
    let outcome = probes.run(&c, &app("hr")).await;
    assert!(
        matches!(outcome, Outcome::TimedOut { taken: true }),
        "{outcome:?}"
    );
    assert_eq!(started.elapsed(), RESULT_WAIT);
    assert!(poller.await.unwrap().is_some());
    assert!(probes.lock().waiting.is_empty());
}

#[test]
fn results_are_bounded() {
    let mut r = result("ok");
    assert!(check_result(&r).is_ok());
    r.steps[0].detail = "x".repeat(api::MAX_PROBE_DETAIL + 1);
    assert!(check_result(&r).is_err());
    let mut r = result("ok");
    r.steps = vec![r.steps[0].clone(); api::MAX_PROBE_STEPS + 1];
    assert!(check_result(&r).is_err());
}

fn record(id: &str, group: &str) -> ConnectorRecord {
    ConnectorRecord {
        id: connector(id),
        group: GroupId::new(group).unwrap(),
        host: "h".into(),
        version: "0.1.0".into(),
        enrolled_at: 0,
        cert: crate::store::CertInfo {
            serial: "01".into(),
            not_after: 0,
        },
        deleted_at: None,
        last_seen: None,
        address_seen: None,
        tunnels: 0,
    }
}

#[test]
fn a_group_without_an_active_connector_fails_with_the_install_hint() {
    let group = GroupId::new("corp").unwrap();
    let none = |_: &ConnectorId| (vec![], 0);
    let (c, active) = connectors_check(&group, &[], &none);
    assert_eq!(c.status, CheckStatus::Fail);
    assert_eq!(c.summary, "no active connector in group corp");
    assert!(c
        .hint
        .as_deref()
        .unwrap()
        .starts_with("install and start a connector of group corp"));
    assert!(active.is_empty());

    // One inactive connector of the group, one active of another group.
    let attached = |id: &ConnectorId| {
        if id.as_str() == "other" {
            (vec!["e1".to_owned()], 2)
        } else {
            (vec![], 0)
        }
    };
    let list = [record("idle", "corp"), record("other", "Default")];
    let (c, active) = connectors_check(&group, &list, &attached);
    assert_eq!(c.status, CheckStatus::Fail);
    assert_eq!(c.details.len(), 1);
    assert!(
        c.details[0].starts_with("idle: inactive"),
        "{:?}",
        c.details
    );
    assert!(active.is_empty());

    let list = [record("a", "corp")];
    let on = |_: &ConnectorId| (vec!["e1".to_owned(), "e2".to_owned()], 4);
    let (c, active) = connectors_check(&group, &list, &on);
    assert_eq!(c.status, CheckStatus::Ok);
    assert_eq!(
        c.details[0],
        "a: active, 4 tunnel(s) on e1, e2 (version 0.1.0, host h)"
    );
    assert_eq!(active, vec![connector("a")]);
}

fn router_config() -> Config {
    let mut c = Config::new("/nonexistent");
    c.apps_domain = "apps.test".into();
    c.dns_listen = Some("127.0.0.53:53".parse().unwrap());
    c
}

#[test]
fn the_dns_check_shows_the_routers_chain_or_says_what_is_missing() {
    let mut b = Builder::new();
    b.edge(
        "e1",
        "default",
        Some("192.0.2.1:443"),
        Some("192.0.2.1:7844"),
    )
    .report("e1", None, &[], Duration::from_secs(1))
    .app("hr.apps.test", "Default");
    let c = dns_check(&b.snapshot(), &router_config(), "hr.apps.test");
    assert_eq!(c.status, CheckStatus::Ok, "{c:?}");
    assert_eq!(c.summary, "hr.apps.test -> 192.0.2.1");
    assert_eq!(c.addresses, ["192.0.2.1"]);
    assert_eq!(
        c.details,
        [
            "hr.apps.test. CNAME default.edge.apps.test. (ttl 60)",
            "default.edge.apps.test. A 192.0.2.1 (ttl 30)"
        ]
    );

    // No edge with an address in the region: a chain to nothing.
    let mut b = Builder::new();
    b.app("hr.apps.test", "Default");
    let c = dns_check(&b.snapshot(), &router_config(), "hr.apps.test");
    assert_eq!(c.status, CheckStatus::Fail, "{c:?}");
    assert!(
        c.hint
            .as_deref()
            .unwrap()
            .contains("default.edge.apps.test."),
        "{c:?}"
    );

    // A host outside the apps domain is not the router's to answer.
    let c = dns_check(&b.snapshot(), &router_config(), "hr.example.com");
    assert_eq!(c.status, CheckStatus::Skip, "{c:?}");

    // No DNS authority at all.
    let mut config = router_config();
    config.dns_listen = None;
    let c = dns_check(&b.snapshot(), &config, "hr.apps.test");
    assert_eq!(c.status, CheckStatus::Skip);
    let _ = REPORT_FRESH;
}

/// A CA and a leaf for `names` it signs, valid `from`..`to` (unix s).
fn signed(names: &[&str], from: i64, to: i64) -> (String, Vec<CertificateDer<'static>>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    leaf.not_before = time_of(from).into();
    leaf.not_after = time_of(to).into();
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let leaf = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), vec![leaf.der().clone()])
}

fn time_of(unix: i64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap())
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[test]
fn the_certificate_check_names_what_is_wrong() {
    let now = SystemTime::now();
    let day = 86_400;
    let t = unix(now);
    let (ca, chain) = signed(&["*.apps.test"], t - day, t + 30 * day + 100);
    let c = judge_chain(&chain, "hr.apps.test", &ca, now);
    assert_eq!(c.status, CheckStatus::Ok, "{c:?}");
    assert_eq!(c.summary, "covers hr.apps.test, 30 days left");
    assert_eq!(c.details[0], "names: *.apps.test");

    // Not the host: a wildcard covers one label only.
    let c = judge_chain(&chain, "a.b.apps.test", &ca, now);
    assert_eq!(c.status, CheckStatus::Fail);
    assert_eq!(c.summary, "the certificate does not cover a.b.apps.test");

    let (ca, chain) = signed(&["hr.apps.test"], t - 10 * day, t - day);
    let c = judge_chain(&chain, "hr.apps.test", &ca, now);
    assert_eq!(c.status, CheckStatus::Fail);
    assert!(c.summary.starts_with("the certificate expired at"), "{c:?}");

    // Signed by a CA nobody trusts here.
    let (_, chain) = signed(&["hr.apps.test"], t - day, t + day * 2);
    let (other_ca, _) = signed(&["x"], t - day, t + day);
    let c = judge_chain(&chain, "hr.apps.test", &other_ca, now);
    assert_eq!(c.status, CheckStatus::Fail);
    assert!(
        c.summary
            .starts_with("the certificate does not chain to a trusted root"),
        "{c:?}"
    );
}

#[test]
fn wildcards_cover_one_label() {
    assert!(name_covers("*.apps.test", "hr.apps.test"));
    assert!(name_covers("*.APPS.test.", "hr.apps.test"));
    assert!(!name_covers("*.apps.test", "apps.test"));
    assert!(!name_covers("*.apps.test", "a.hr.apps.test"));
    assert!(name_covers("hr.apps.test", "HR.apps.test"));
    assert!(!name_covers("hr.apps.test", "hrx.apps.test"));
}
