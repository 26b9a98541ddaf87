//! `portico app test NAME`: asks the router for the app's diagnostic
//! report (`POST /v1/apps/{id}/test`, see `region-router/src/app_test.rs`),
//! adds a resolver's view of the DNS chain when `--nameserver` is given,
//! and prints it as text or JSON. Exits non-zero when a check failed.

use std::net::SocketAddr;

use anyhow::Context as _;
use portico_proto::api::{AppTestReport, CheckKind, CheckStatus, TestCheck};
use portico_proto::AppId;

use crate::cli::AppTestArgs;
use crate::out;

/// The longest the resolver check walks a chain.
const RESOLVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Some checks failed; the report says which.
#[derive(Debug, thiserror::Error)]
#[error("{failed} of {total} checks failed")]
pub struct ChecksFailed {
    pub failed: usize,
    pub total: usize,
}

/// Runs `portico app test`.
pub async fn run(args: AppTestArgs) -> anyhow::Result<()> {
    let id = AppId::new(&args.id).context("app id")?;
    let nameserver = args
        .nameserver
        .as_deref()
        .map(portico_connector::parse_nameserver)
        .transpose()
        .map_err(anyhow::Error::msg)
        .context("--nameserver")?;
    let client = crate::admin::client(&args.conn)?;
    let mut report: AppTestReport = client
        .post_json(&format!("/v1/apps/{id}/test"), &serde_json::json!({}))
        .await?;
    if let Some(ns) = nameserver {
        let authority = report.checks.iter().find(|c| c.check == CheckKind::Dns);
        let check = resolver_check(ns, &report.external_host, authority).await;
        // After the router's own DNS check.
        let at = report
            .checks
            .iter()
            .position(|c| c.check == CheckKind::Dns)
            .map_or(0, |i| i + 1);
        report.checks.insert(at, check);
    }
    if args.conn.json {
        out(serde_json::to_string_pretty(&report)?);
    } else {
        out(render(&report));
    }
    let failed = report
        .checks
        .iter()
        .filter(|c| c.status == CheckStatus::Fail)
        .count();
    if failed > 0 {
        return Err(ChecksFailed {
            failed,
            total: report.checks.len(),
        }
        .into());
    }
    Ok(())
}

/// The host as the resolver at `ns` sees it: its CNAME chain walked hop by
/// hop, compared with the router's own answer when that has addresses.
pub async fn resolver_check(
    ns: SocketAddr,
    host: &str,
    authority: Option<&TestCheck>,
) -> TestCheck {
    let mut check = TestCheck {
        check: CheckKind::Resolver,
        status: CheckStatus::Ok,
        summary: String::new(),
        hint: None,
        connector: None,
        details: vec![format!("nameserver {ns}")],
        addresses: vec![],
        steps: vec![],
    };
    let lower = host.trim_end_matches('.').to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") {
        check.status = CheckStatus::Skip;
        check.summary = format!(
            "{host} is under localhost, which resolvers answer with loopback themselves (RFC 6761): {ns} is never asked"
        );
        return check;
    }
    let walked = tokio::time::timeout(
        RESOLVER_TIMEOUT,
        portico_connector::lookup_chain(&[ns], host),
    )
    .await;
    let Ok(walked) = walked else {
        check.status = CheckStatus::Fail;
        check.summary = format!(
            "resolver {ns}: no whole chain for {host} within {} s",
            RESOLVER_TIMEOUT.as_secs()
        );
        check.hint = Some(format!("check that {ns} answers for {host}"));
        return check;
    };
    match walked {
        Err(e) => {
            check.status = CheckStatus::Fail;
            check.summary = format!("resolver {ns}: {}", portico_agent::error_chain(&e));
            check.hint = Some(match e {
                portico_connector::ResolveError::NxDomain { .. } => format!(
                    "{ns} does not know {host}: delegate the apps domain to the router's DNS (NS records at its parent), or make {host} a CNAME to the app's region's edges in your DNS"
                ),
                _ => format!("check that {ns} answers for {host} (dig @{} -p {} {host})", ns.ip(), ns.port()),
            });
        }
        Ok((chain, addrs)) => {
            check.details.push(format!("chain: {}", chain.join(" -> ")));
            check.addresses = addrs.iter().map(ToString::to_string).collect();
            let expected: Vec<&String> = authority
                .filter(|a| a.status == CheckStatus::Ok)
                .map(|a| a.addresses.iter().collect())
                .unwrap_or_default();
            let mut seen = check.addresses.clone();
            seen.sort();
            let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
            want.sort();
            if !want.is_empty() && seen != want {
                check.status = CheckStatus::Fail;
                check.summary = format!(
                    "{ns} answers {} for {host}, the router's DNS {}",
                    seen.join(", "),
                    want.join(", ")
                );
                check.hint = Some(format!(
                    "{host} points elsewhere at this resolver: make it a CNAME to the name the router's chain shows, and wait for the old records' TTL to run out"
                ));
            } else {
                check.summary = format!("{} -> {}", chain.join(" -> "), seen.join(", "));
            }
        }
    }
    check
}

/// The report as text: one block per check, its status first, then its
/// details, the steps of a probe, and the hint of a failure.
pub fn render(report: &AppTestReport) -> String {
    let mut lines = vec![format!(
        "app {}: {} -> {} (group {})",
        report.app, report.external_host, report.internal_url, report.connector_group
    )];
    for c in &report.checks {
        let name = match &c.connector {
            Some(id) => format!("{} {id}", c.check),
            None => c.check.to_string(),
        };
        lines.push(format!(
            "{:<5} {:<24} {}",
            c.status.to_string(),
            name,
            c.summary
        ));
        const INDENT: &str = "                               ";
        for d in &c.details {
            lines.push(format!("{INDENT}{d}"));
        }
        for s in &c.steps {
            let took = if s.status == CheckStatus::Skip {
                String::new()
            } else {
                format!("{} ms", s.ms)
            };
            lines.push(format!(
                "{INDENT}{:<5} {:<5} {:>7}  {}",
                s.step,
                s.status.to_string(),
                took,
                s.detail
            ));
        }
        if let Some(h) = &c.hint {
            lines.push(format!("{INDENT}hint: {h}"));
        }
    }
    let failed = report
        .checks
        .iter()
        .filter(|c| c.status == CheckStatus::Fail)
        .count();
    lines.push(if failed == 0 {
        format!("all {} checks passed", report.checks.len())
    } else {
        format!("{failed} of {} checks failed", report.checks.len())
    });
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_proto::api::ProbeStep;
    use portico_proto::{ConnectorId, GroupId};

    fn check(kind: CheckKind, status: CheckStatus, summary: &str) -> TestCheck {
        TestCheck {
            check: kind,
            status,
            summary: summary.into(),
            hint: None,
            connector: None,
            details: vec![],
            addresses: vec![],
            steps: vec![],
        }
    }

    fn report(checks: Vec<TestCheck>) -> AppTestReport {
        AppTestReport {
            app: AppId::new("hr").unwrap(),
            external_host: "hr.apps.example.com".into(),
            internal_url: "http://10.0.0.5:8080/".into(),
            connector_group: GroupId::new("corp").unwrap(),
            at: 1_700_000_000,
            checks,
        }
    }

    #[test]
    fn a_failed_probe_shows_its_steps_and_hint() {
        let mut probe = check(
            CheckKind::Probe,
            CheckStatus::Fail,
            "tcp: connection refused 10.0.0.5:8080",
        );
        probe.connector = Some(ConnectorId::new("c1").unwrap());
        probe.hint = Some("start the backend".into());
        probe.steps = vec![
            ProbeStep {
                step: "dns".into(),
                status: CheckStatus::Ok,
                ms: 0,
                detail: "dns: 10.0.0.5 is an address; nothing to resolve".into(),
            },
            ProbeStep {
                step: "tcp".into(),
                status: CheckStatus::Fail,
                ms: 3,
                detail: "tcp: connection refused 10.0.0.5:8080".into(),
            },
            ProbeStep {
                step: "http".into(),
                status: CheckStatus::Skip,
                ms: 0,
                detail: "http: not tried (an earlier step failed)".into(),
            },
        ];
        let mut dns = check(
            CheckKind::Dns,
            CheckStatus::Ok,
            "hr.apps.example.com -> 10.1.0.7",
        );
        dns.details = vec!["hr.apps.example.com. CNAME eu.edge.apps.example.com. (ttl 60)".into()];
        let text = render(&report(vec![dns, probe]));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "app hr: hr.apps.example.com -> http://10.0.0.5:8080/ (group corp)"
        );
        assert_eq!(
            lines[1],
            "ok    dns                      hr.apps.example.com -> 10.1.0.7"
        );
        assert_eq!(
            lines[2].trim(),
            "hr.apps.example.com. CNAME eu.edge.apps.example.com. (ttl 60)"
        );
        assert_eq!(
            lines[3],
            "FAIL  probe c1                 tcp: connection refused 10.0.0.5:8080"
        );
        assert_eq!(
            lines[5].trim(),
            "tcp   FAIL     3 ms  tcp: connection refused 10.0.0.5:8080"
        );
        // A skipped step shows no time.
        assert_eq!(
            lines[6].trim(),
            "http  skip           http: not tried (an earlier step failed)"
        );
        assert_eq!(lines[7].trim(), "hint: start the backend");
        assert_eq!(lines[8], "1 of 2 checks failed");
    }

    #[test]
    fn a_passing_report_says_so_and_skips_do_not_fail_it() {
        let r = report(vec![
            check(
                CheckKind::Dns,
                CheckStatus::Skip,
                "the router serves no DNS",
            ),
            check(
                CheckKind::Certificate,
                CheckStatus::Ok,
                "covers hr.apps.example.com, 60 days left",
            ),
        ]);
        assert!(r.passed());
        assert_eq!(render(&r).lines().last(), Some("all 2 checks passed"));
    }

    #[test]
    fn the_json_shape_is_stable() {
        let mut c = check(
            CheckKind::Connectors,
            CheckStatus::Fail,
            "no active connector in group corp",
        );
        c.hint = Some("install and start a connector of group corp".into());
        let v = serde_json::to_value(report(vec![c])).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "app": "hr",
                "external_host": "hr.apps.example.com",
                "internal_url": "http://10.0.0.5:8080/",
                "connector_group": "corp",
                "at": 1_700_000_000u64,
                "checks": [{
                    "check": "connectors",
                    "status": "fail",
                    "summary": "no active connector in group corp",
                    "hint": "install and start a connector of group corp",
                }],
            })
        );
    }
}
