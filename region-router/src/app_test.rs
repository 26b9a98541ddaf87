//! `portico app test NAME`: the router's diagnostic report of one app
//! (`POST /v1/apps/{id}/test`), and the probe jobs it hands to connectors.
//!
//! The report's checks, in order:
//!
//! 1. **dns**: the app's host as this router's DNS authority answers it
//!    (the zone is computed from the store, as the server does, so this is
//!    the answer resolvers get), with the CNAME chain;
//! 2. **certificate**: a TLS handshake with an edge of the app's region,
//!    with the app's host as SNI: the certificate it serves, whether it
//!    names the host, its dates, and whether it chains to the router's CA
//!    or a system root;
//! 3. **connectors**: the active connectors of the app's group (from the
//!    edges' presence reports), with the edges that hold their tunnels;
//! 4. **probe**, once per active connector: the connector's own check of
//!    the internal URL (DNS, TCP, TLS, HTTP), run through [`Probes`].
//!
//! **How a probe reaches a connector.** Connectors already hold an
//! authenticated channel to the router (HTTPS with their certificate) and
//! long-poll it for their config; they long-poll `GET /v1/connector/probes`
//! the same way and post each result to `POST /v1/connector/probes/{id}`.
//! A job names only the app: the connector probes that app's internal URL
//! as its own config holds it, so nobody can point it at another host.
//! Only the admin token starts a report; only the connector a job was given
//! to can answer it. A connector of an older build never asks for jobs:
//! when none of its polls is open (and none ended a moment ago), the job
//! waits [`PICK_WAIT`] for one and is then reported as not supported by
//! that connector's version, never a hang. Each job is answered within
//! [`RESULT_WAIT`], so the whole report takes at most about that long.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::rr::{DNSClass, LowerName, Name, RData, RecordType};
use portico_proto::api::{
    self, AppTestReport, CheckKind, CheckStatus, ProbeJob, ProbeResult, TestCheck,
};
use portico_proto::ids::{AppId, ConnectorId, GroupId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::sync::{oneshot, watch};

use crate::config::Config;
use crate::dns;
use crate::snapshot::Snapshot;
use crate::store::{AppRecord, ConnectorRecord};

/// How long a job waits for a connector that has no poll open to open one.
pub(crate) const PICK_WAIT: Duration = Duration::from_secs(3);
/// How long the router waits for a probe's result (the connector's own
/// deadline is 11 s).
pub(crate) const RESULT_WAIT: Duration = Duration::from_secs(13);
/// A poll that ended this recently still counts as open: the connector is
/// between two polls.
const BETWEEN_POLLS: Duration = Duration::from_secs(5);
/// Jobs queued for one connector, at most.
const MAX_QUEUED: usize = 16;
/// TCP connect and TLS handshake with an edge, each.
const EDGE_TIMEOUT: Duration = Duration::from_secs(3);

/// The probe jobs waiting for connectors, and who is polling for them.
#[derive(Debug, Default)]
pub(crate) struct Probes {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    queues: HashMap<ConnectorId, Queue>,
    /// Jobs handed out or queued, by id, until answered or timed out.
    waiting: HashMap<u64, Waiting>,
}

#[derive(Debug)]
struct Queue {
    jobs: VecDeque<ProbeJob>,
    /// Bumped on each new job: wakes the polls.
    wake: watch::Sender<u64>,
    /// Polls open right now.
    polls: usize,
    /// When the last poll ended.
    last_poll: Option<Instant>,
}

impl Default for Queue {
    fn default() -> Queue {
        Queue {
            jobs: VecDeque::new(),
            wake: watch::channel(0).0,
            polls: 0,
            last_poll: None,
        }
    }
}

#[derive(Debug)]
struct Waiting {
    connector: ConnectorId,
    result: oneshot::Sender<ProbeResult>,
    picked: Option<oneshot::Sender<()>>,
}

/// What came of one probe job.
#[derive(Debug)]
pub(crate) enum Outcome {
    Done(ProbeResult),
    /// The connector never took the job: it does not poll for probes.
    NotPolling {
        last_poll: Option<Duration>,
    },
    /// No answer in time; `taken`: a poll of the connector took the job
    /// (else its poll looked open but never took it: a dead connection).
    TimedOut {
        taken: bool,
    },
    /// Too many jobs already wait for it.
    Busy,
}

impl Probes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every change is a few assignments; a poisoned lock holds whole data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks `connector` to probe `app`, and waits for the answer.
    pub(crate) async fn run(&self, connector: &ConnectorId, app: &AppId) -> Outcome {
        let (id, result, picked, polling) = {
            let mut inner = self.lock();
            inner.next_id += 1;
            let id = inner.next_id;
            let queue = inner.queues.entry(connector.clone()).or_default();
            if queue.jobs.len() >= MAX_QUEUED {
                return Outcome::Busy;
            }
            let polling =
                queue.polls > 0 || queue.last_poll.is_some_and(|t| t.elapsed() < BETWEEN_POLLS);
            let last_poll = queue.last_poll.map(|t| t.elapsed());
            queue.jobs.push_back(ProbeJob {
                id,
                app: app.clone(),
            });
            queue.wake.send_modify(|n| *n = n.wrapping_add(1));
            let (tx, result) = oneshot::channel();
            let (picked_tx, picked) = oneshot::channel();
            inner.waiting.insert(
                id,
                Waiting {
                    connector: connector.clone(),
                    result: tx,
                    picked: Some(picked_tx),
                },
            );
            (id, result, picked, polling.then_some(()).ok_or(last_poll))
        };
        let _forget = Forget { probes: self, id };
        let start = tokio::time::Instant::now();
        let mut picked = picked;
        let mut taken = false;
        if let Err(last_poll) = polling {
            if tokio::time::timeout(PICK_WAIT, &mut picked).await.is_err() {
                return Outcome::NotPolling { last_poll };
            }
            taken = true;
        }
        match tokio::time::timeout_at(start + RESULT_WAIT, result).await {
            Ok(Ok(r)) => Outcome::Done(r),
            _ => Outcome::TimedOut {
                taken: taken || picked.try_recv().is_ok(),
            },
        }
    }

    /// A connector's poll: its queued jobs (at most
    /// [`api::MAX_PROBE_JOBS`]) as soon as there are some, or `None`
    /// after `wait` (or when `stop` fires).
    pub(crate) async fn poll(
        &self,
        connector: &ConnectorId,
        wait: Duration,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Option<Vec<ProbeJob>> {
        let mut wake = {
            let mut inner = self.lock();
            let queue = inner.queues.entry(connector.clone()).or_default();
            queue.polls += 1;
            queue.wake.subscribe()
        };
        let _done = PollDone {
            probes: self,
            connector,
        };
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        loop {
            wake.borrow_and_update();
            let jobs = self.take(connector);
            if !jobs.is_empty() {
                return Some(jobs);
            }
            tokio::select! {
                changed = wake.changed() => if changed.is_err() { return None },
                () = &mut deadline => return None,
                () = stop.cancelled() => return None,
            }
        }
    }

    /// Takes the queued jobs of `connector`, telling their waiters.
    fn take(&self, connector: &ConnectorId) -> Vec<ProbeJob> {
        let mut inner = self.lock();
        let Some(queue) = inner.queues.get_mut(connector) else {
            return vec![];
        };
        let n = queue.jobs.len().min(api::MAX_PROBE_JOBS);
        let jobs: Vec<ProbeJob> = queue.jobs.drain(..n).collect();
        for job in &jobs {
            if let Some(picked) = inner.waiting.get_mut(&job.id).and_then(|w| w.picked.take()) {
                let _ = picked.send(());
            }
        }
        jobs
    }

    /// A result from `connector`: false when job `id` is not one it was
    /// given, or is no longer waited for.
    pub(crate) fn answer(&self, connector: &ConnectorId, id: u64, result: ProbeResult) -> bool {
        let mut inner = self.lock();
        match inner.waiting.get(&id) {
            Some(w) if w.connector == *connector => {}
            _ => return false,
        }
        inner
            .waiting
            .remove(&id)
            .is_some_and(|w| w.result.send(result).is_ok())
    }
}

/// Drops a job that is done, answered or not: out of the queue and the
/// waiting list.
struct Forget<'a> {
    probes: &'a Probes,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let mut inner = self.probes.lock();
        if let Some(w) = inner.waiting.remove(&self.id) {
            if let Some(q) = inner.queues.get_mut(&w.connector) {
                q.jobs.retain(|j| j.id != self.id);
            }
        }
    }
}

/// Ends a poll, also when its request is dropped.
struct PollDone<'a> {
    probes: &'a Probes,
    connector: &'a ConnectorId,
}

impl Drop for PollDone<'_> {
    fn drop(&mut self) {
        let mut inner = self.probes.lock();
        if let Some(q) = inner.queues.get_mut(self.connector) {
            q.polls = q.polls.saturating_sub(1);
            q.last_poll = Some(Instant::now());
        }
    }
}

/// Checks a result's bounds before it is kept: `Err` is the message of a
/// 400.
pub(crate) fn check_result(result: &ProbeResult) -> Result<(), String> {
    if result.steps.len() > api::MAX_PROBE_STEPS {
        return Err(format!("at most {} steps", api::MAX_PROBE_STEPS));
    }
    if result.url.len() > 2048 {
        return Err("the url is longer than 2048 bytes".into());
    }
    for s in &result.steps {
        if s.step.len() > 16 || s.detail.len() > api::MAX_PROBE_DETAIL {
            return Err(format!(
                "a step name is at most 16 bytes and a detail at most {} bytes",
                api::MAX_PROBE_DETAIL
            ));
        }
    }
    Ok(())
}

// ---- the checks ----

/// Check 1: the host as the router's DNS authority answers it.
pub(crate) fn dns_check(snapshot: &Snapshot, config: &Config, host: &str) -> TestCheck {
    let Some(listen) = config.dns_listen else {
        return check(
            CheckKind::Dns,
            CheckStatus::Skip,
            "the router serves no DNS (--dns-listen is not set)",
            Some(format!(
                "nothing to check here: make {host} a CNAME to the edges of its region in your own DNS, or run the router with --dns-listen and delegate {} to it",
                config.apps_domain
            )),
        );
    };
    let origin = match dns::Origin::new(&config.apps_domain, Some(listen)) {
        Ok(o) => o,
        Err(e) => {
            return check(
                CheckKind::Dns,
                CheckStatus::Fail,
                format!(
                    "the apps domain is not a DNS name: {}",
                    portico_agent::error_chain(&e)
                ),
                Some("set --apps-domain to a DNS name".into()),
            )
        }
    };
    let zone = dns::zone(snapshot, &origin);
    let Ok(qname) = Name::from_ascii(format!("{host}.")) else {
        return check(
            CheckKind::Dns,
            CheckStatus::Fail,
            format!("{host} is not a DNS name"),
            Some("give the app an external host that is a DNS name".into()),
        );
    };
    let qname = LowerName::from(qname);
    let mut chain = Vec::new();
    let mut addrs = Vec::new();
    let mut rcode = None;
    for qtype in [RecordType::A, RecordType::AAAA] {
        let answer = zone.answer(&qname, qtype, DNSClass::IN);
        rcode.get_or_insert(answer.rcode);
        for r in answer.answers {
            let line = format!("{} {} {} (ttl {})", r.name, r.record_type(), r.data, r.ttl);
            match &r.data {
                RData::A(_) | RData::AAAA(_) => addrs.push(r.data.to_string()),
                _ => {}
            }
            if !chain.contains(&line) {
                chain.push(line);
            }
        }
    }
    let rcode = rcode.unwrap_or(hickory_proto::op::ResponseCode::ServFail);
    let mut c = if rcode == hickory_proto::op::ResponseCode::Refused {
        check(
            CheckKind::Dns,
            CheckStatus::Skip,
            format!(
                "{host} is not in the apps domain {}: the router's DNS does not serve it",
                config.apps_domain
            ),
            Some(format!(
                "check it with --nameserver: it must be a CNAME to the app's default host under {}",
                config.apps_domain
            )),
        )
    } else if rcode == hickory_proto::op::ResponseCode::NXDomain {
        check(
            CheckKind::Dns,
            CheckStatus::Fail,
            format!("the router's DNS answers NXDOMAIN for {host}"),
            Some(
                "the host collides with the zone's own names (the apex, ns, edge.*, tunnel.*) or the router has not seen the app yet: give the app another external host"
                    .into(),
            ),
        )
    } else if addrs.is_empty() {
        let region = snapshot_region_hint(&chain);
        check(
            CheckKind::Dns,
            CheckStatus::Fail,
            format!("{host} has no address in the router's DNS"),
            Some(format!(
                "no edge of {region} has an IP address the router can hand out: start an edge in that region, or give its edges an IP address with --advertise-public"
            )),
        )
    } else {
        check(
            CheckKind::Dns,
            CheckStatus::Ok,
            format!("{host} -> {}", addrs.join(", ")),
            None,
        )
    };
    c.details = chain;
    c.addresses = addrs;
    c
}

/// The last CNAME target of a chain, to name the region in a hint.
fn snapshot_region_hint(chain: &[String]) -> String {
    chain
        .iter()
        .rev()
        .find_map(|l| {
            let mut words = l.split(' ');
            let _owner = words.next()?;
            (words.next()? == "CNAME").then(|| words.next().map(str::to_owned))?
        })
        .map_or_else(
            || "the app's region".to_owned(),
            |t| format!("the region {t}"),
        )
}

/// Check 3: the group's connectors and where they are attached. Returns
/// the active ones too.
pub(crate) fn connectors_check(
    group: &GroupId,
    connectors: &[ConnectorRecord],
    attached: &dyn Fn(&ConnectorId) -> (Vec<String>, u32),
) -> (TestCheck, Vec<ConnectorId>) {
    let mut active = Vec::new();
    let mut details = Vec::new();
    for c in connectors
        .iter()
        .filter(|c| c.group == *group && c.deleted_at.is_none())
    {
        let (edges, tunnels) = attached(&c.id);
        if edges.is_empty() {
            details.push(format!(
                "{}: inactive (no edge reports a tunnel of it; version {}, host {})",
                c.id, c.version, c.host
            ));
        } else {
            details.push(format!(
                "{}: active, {tunnels} tunnel(s) on {} (version {}, host {})",
                c.id,
                edges.join(", "),
                c.version,
                c.host
            ));
            active.push(c.id.clone());
        }
    }
    let mut c = if active.is_empty() {
        let hint = format!(
            "install and start a connector of group {group} inside a network that reaches the internal URL: `portico token create --group {group}`, then `portico connector --router <router URL> --token <token>`{}",
            if details.is_empty() {
                ""
            } else {
                "; or find out why the connectors above have no tunnel (their logs, `portico connector list`)"
            }
        );
        check(
            CheckKind::Connectors,
            CheckStatus::Fail,
            format!("no active connector in group {group}"),
            Some(hint),
        )
    } else {
        check(
            CheckKind::Connectors,
            CheckStatus::Ok,
            format!("{} active connector(s) in group {group}", active.len()),
            None,
        )
    };
    c.details = details;
    (c, active)
}

/// Check 4, one connector: the probe's outcome as a check, with a hint for
/// the step that failed.
pub(crate) fn probe_check(
    connector: &ConnectorId,
    internal_url: &str,
    outcome: Outcome,
) -> TestCheck {
    let mut c = match outcome {
        Outcome::Done(result) => {
            let failed = result
                .steps
                .iter()
                .find(|s| s.status == CheckStatus::Fail)
                .cloned();
            let mut c = match failed {
                Some(step) => check(
                    CheckKind::Probe,
                    CheckStatus::Fail,
                    step.detail.clone(),
                    Some(probe_hint(&step.step, connector, internal_url)),
                ),
                None if result.steps.is_empty() => check(
                    CheckKind::Probe,
                    CheckStatus::Fail,
                    "the connector answered with no steps",
                    Some("upgrade the connector".into()),
                ),
                None => check(
                    CheckKind::Probe,
                    CheckStatus::Ok,
                    format!(
                        "{} reached through {connector} ({} ms)",
                        if result.url.is_empty() { internal_url } else { &result.url },
                        result.steps.iter().map(|s| s.ms).sum::<u64>()
                    ),
                    None,
                ),
            };
            c.steps = result.steps;
            c
        }
        Outcome::NotPolling { last_poll } => check(
            CheckKind::Probe,
            CheckStatus::Fail,
            format!(
                "not supported by this connector version: {connector} does not ask the router for probes ({})",
                match last_poll {
                    Some(ago) => format!("it last asked {} s ago", ago.as_secs()),
                    None => "it has not asked since the router started".to_owned(),
                }
            ),
            Some(format!(
                "upgrade {connector} to a build with `portico app test` probes; if it is up to date, check that it reaches the router (its log says why it cannot)"
            )),
        ),
        Outcome::TimedOut { taken } => check(
            CheckKind::Probe,
            CheckStatus::Fail,
            format!(
                "{connector} {} within {} s",
                if taken {
                    "took the probe and gave no result"
                } else {
                    "has a poll open but did not take the probe"
                },
                RESULT_WAIT.as_secs()
            ),
            Some(format!("see the connector's log (span `probe`, app and job id) on {connector}'s host")),
        ),
        Outcome::Busy => check(
            CheckKind::Probe,
            CheckStatus::Fail,
            format!("{connector} already has {MAX_QUEUED} probes waiting"),
            Some("run `portico app test` again in a few seconds".into()),
        ),
    };
    c.connector = Some(connector.clone());
    c
}

/// How to fix a failed probe step.
fn probe_hint(step: &str, connector: &ConnectorId, internal_url: &str) -> String {
    match step {
        "config" => format!(
            "{connector} does not serve the app yet: wait a second for the config to reach it, and check the internal URL ({internal_url}) with `portico app show`"
        ),
        "dns" => format!(
            "the internal host does not resolve on {connector}'s host: fix the internal URL ({internal_url}) with `portico app update --internal-url`, or the DNS (or /etc/hosts) of the connector's host"
        ),
        "tcp" => format!(
            "nothing accepts connections at the internal URL's address from {connector}: start the backend, check its port ({internal_url}), and any firewall between the connector and it"
        ),
        "tls" => "the backend's certificate fails validation: give the connector its CA with --backend-ca, fix the certificate's names, or (only for a backend you trust on that path) `portico app update --no-validate-backend-tls`".to_owned(),
        "http" => format!(
            "the backend answers, but not well: check the internal URL's path ({internal_url}) and the backend's log"
        ),
        _ => format!("see {connector}'s log"),
    }
}

/// Check 2: the certificate an edge serves for `host`, found by a TLS
/// handshake with `edge_addr` using `host` as SNI.
pub(crate) async fn certificate_check(
    edge: Option<(String, SocketAddr)>,
    host: &str,
    ca_pem: &str,
    now: std::time::SystemTime,
) -> TestCheck {
    let Some((edge_id, addr)) = edge else {
        return check(
            CheckKind::Certificate,
            CheckStatus::Fail,
            "no edge of the app's region has a public address to ask",
            Some("start an edge in the app's region (`portico token create --edge --region R`); it reports its public address".into()),
        );
    };
    let mut c = match served_chain(addr, host).await {
        Err(reason) => check(
            CheckKind::Certificate,
            CheckStatus::Fail,
            format!("edge {edge_id} at {addr}: {reason}"),
            Some(format!(
                "the edge does not answer TLS at {addr} from the router: check that it runs, and that its reported public address (--advertise-public) is one the router can reach"
            )),
        ),
        Ok(chain) => judge_chain(&chain, host, ca_pem, now),
    };
    c.details
        .insert(0, format!("edge {edge_id} at {addr}, SNI {host}"));
    c
}

/// The chain `addr` serves for the SNI `host`.
async fn served_chain(
    addr: SocketAddr,
    host: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let capture = Arc::new(Capture::default());
    let tls = rustls::ClientConfig::builder_with_provider(portico_agent::pki::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host:?}: {e}"))?;
    let tcp = tokio::time::timeout(EDGE_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("no TCP connection within {} s", EDGE_TIMEOUT.as_secs()))?
        .map_err(|e| format!("TCP connect: {e}"))?;
    tokio::time::timeout(
        EDGE_TIMEOUT,
        tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp),
    )
    .await
    .map_err(|_| format!("no TLS handshake within {} s", EDGE_TIMEOUT.as_secs()))?
    .map_err(|e| format!("TLS handshake: {}", portico_agent::error_chain(&e)))?;
    let chain = capture
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if chain.is_empty() {
        return Err("the edge sent no certificate".into());
    }
    Ok(chain)
}

/// The certificate check of a served `chain`: names, dates, trust.
pub(crate) fn judge_chain(
    chain: &[CertificateDer<'static>],
    host: &str,
    ca_pem: &str,
    now: std::time::SystemTime,
) -> TestCheck {
    let leaf = &chain[0];
    let parsed = x509_parser::parse_x509_certificate(leaf.as_ref());
    let Ok((_, cert)) = parsed else {
        return check(
            CheckKind::Certificate,
            CheckStatus::Fail,
            "the edge's certificate is not X.509 DER",
            Some("replace the edge's certificate".into()),
        );
    };
    let names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let (not_before, not_after) = match portico_agent::pki::validity(leaf) {
        Ok(v) => v,
        Err(e) => {
            return check(
                CheckKind::Certificate,
                CheckStatus::Fail,
                format!(
                    "the edge's certificate has no readable dates: {}",
                    portico_agent::error_chain(&e)
                ),
                Some("replace the edge's certificate".into()),
            )
        }
    };
    let left = not_after.duration_since(now).ok();
    let left_text = match left {
        Some(d) if d.as_secs() >= 2 * 86_400 => format!("{} days", d.as_secs() / 86_400),
        Some(d) => format!("{} h", d.as_secs() / 3600),
        None => "none".to_owned(),
    };
    let mut details = vec![
        format!(
            "names: {}",
            if names.is_empty() {
                "(none)".to_owned()
            } else {
                names.join(", ")
            }
        ),
        format!(
            "valid from {} to {}",
            humantime::format_rfc3339_seconds(not_before),
            humantime::format_rfc3339_seconds(not_after)
        ),
        format!("issuer: {}", cert.issuer()),
    ];
    let covers = names.iter().any(|n| name_covers(n, host));
    let trust = verify_trust(chain, host, ca_pem, now);
    if let Err(e) = &trust {
        details.push(format!("trust: {e}"));
    }
    let mut c = if !covers {
        check(
            CheckKind::Certificate,
            CheckStatus::Fail,
            format!("the certificate does not cover {host}"),
            Some(format!(
                "give the edges a certificate that names {host} (a custom domain needs its own certificate), or use a host under the apps domain, which the router's wildcard covers"
            )),
        )
    } else if now < not_before {
        check(
            CheckKind::Certificate,
            CheckStatus::Fail,
            format!(
                "the certificate is not valid yet (from {})",
                humantime::format_rfc3339_seconds(not_before)
            ),
            Some("check the clocks of the edge and of the certificate's issuer".into()),
        )
    } else if left.is_none() {
        check(
            CheckKind::Certificate,
            CheckStatus::Fail,
            format!("the certificate expired at {}", humantime::format_rfc3339_seconds(not_after)),
            Some("renew it: an edge renews the router's certificate by itself while it reaches the router; an operator certificate (--public-cert) must be replaced".into()),
        )
    } else if let Err(e) = trust {
        check(
            CheckKind::Certificate,
            CheckStatus::Fail,
            format!("the certificate does not chain to a trusted root: {e}"),
            Some("serve a chain that ends at a root browsers trust (or, for a private deployment, give users the router's CA)".into()),
        )
    } else {
        check(
            CheckKind::Certificate,
            CheckStatus::Ok,
            format!("covers {host}, {left_text} left"),
            None,
        )
    };
    c.details = details;
    c
}

/// Whether certificate name `pattern` (`*.a.b` wildcards one label)
/// covers `host`.
fn name_covers(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => pattern == host,
    }
}

/// Chains `chain` to the router's CA or a system root, for `host`.
fn verify_trust(
    chain: &[CertificateDer<'static>],
    host: &str,
    ca_pem: &str,
    now: std::time::SystemTime,
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in portico_agent::pki::parse_certs_pem(ca_pem).map_err(|e| e.to_string())? {
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        portico_agent::pki::provider(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &name,
            &[],
            UnixTime::since_unix_epoch(Duration::from_secs(secs)),
        )
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A verifier that accepts any chain (the handshake's signature is still
/// checked) and keeps it, so the check can judge it and say why.
#[derive(Debug, Default)]
struct Capture {
    seen: Mutex<Vec<CertificateDer<'static>>>,
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        *seen = std::iter::once(end_entity)
            .chain(intermediates.iter().take(8))
            .map(|c| c.clone().into_owned())
            .collect();
        portico_agent::pki::insecure_verifier().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        portico_agent::pki::insecure_verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        portico_agent::pki::insecure_verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        portico_agent::pki::insecure_verifier().supported_verify_schemes()
    }
}

/// The edge whose certificate the check asks for: a healthy edge of the
/// app's region with a public address (an unspecified host is replaced by
/// the address its report came from, as the DNS zone does).
pub(crate) fn edge_to_ask(snapshot: &Snapshot, group: &GroupId) -> Option<(String, SocketAddr)> {
    let region = snapshot.group_region(group);
    let mut edges: Vec<_> = snapshot.region_edges(&region).collect();
    // Healthy edges first.
    edges.sort_by_key(|e| !e.healthy);
    edges.into_iter().find_map(|e| {
        let mut addr: SocketAddr = e.edge.public_addr.as_deref()?.parse().ok()?;
        if addr.ip().is_unspecified() {
            addr.set_ip(snapshot.reported_from(&e.edge.id)?);
        }
        Some((e.edge.id.to_string(), addr))
    })
}

/// The report of `app`, all checks done.
pub(crate) async fn report(
    state: &crate::api::AppState,
    app: AppRecord,
    snapshot: Snapshot,
    connectors: Vec<ConnectorRecord>,
) -> AppTestReport {
    let now = Instant::now();
    let attached = |id: &ConnectorId| {
        let a = state.presence().connector(id, now);
        (a.edges.iter().map(ToString::to_string).collect(), a.tunnels)
    };
    let dns = dns_check(&snapshot, &state.config, &app.external_host);
    let (connectors, active) = connectors_check(&app.connector_group, &connectors, &attached);
    let edge = edge_to_ask(&snapshot, &app.connector_group);
    let cert = certificate_check(
        edge,
        &app.external_host,
        state.ca.cert_pem(),
        std::time::SystemTime::now(),
    );
    let probes = futures::future::join_all(active.iter().map(|c| {
        let app_id = app.id.clone();
        let url = app.internal_url.clone();
        async move { probe_check(c, &url, state.probes.run(c, &app_id).await) }
    }));
    let (cert, probes) = tokio::join!(cert, probes);
    let mut checks = vec![dns, cert, connectors];
    if active.is_empty() {
        checks.push(check(
            CheckKind::Probe,
            CheckStatus::Skip,
            "no active connector to probe the internal URL through",
            None,
        ));
    }
    checks.extend(probes);
    AppTestReport {
        app: app.id,
        external_host: app.external_host,
        internal_url: app.internal_url,
        connector_group: app.connector_group,
        at: crate::util::now_unix(),
        checks,
    }
}

fn check(
    kind: CheckKind,
    status: CheckStatus,
    summary: impl Into<String>,
    hint: Option<String>,
) -> TestCheck {
    TestCheck {
        check: kind,
        status,
        summary: summary.into(),
        hint,
        connector: None,
        details: vec![],
        addresses: vec![],
        steps: vec![],
    }
}

#[cfg(test)]
mod tests;
