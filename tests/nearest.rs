//! The nearest region, end to end on loopback: a router, three regions of
//! two edges each, a WAN emulator path in front of every edge's tunnel
//! port (the loadtest crate's `wan`, in process) whose delays give the
//! connectors 10, 80 and 200 ms of RTT, a demo backend, and connectors
//! with short windows (6 s, probes every 500 ms).
//!
//! - An `auto` connector lands in the 10 ms region with tunnels on both of
//!   its edges; a connector of a group pinned to the 80 ms region dials
//!   only there.
//! - The delays change so that another region is nearest by far more than
//!   the hysteresis: the connector moves (after the window), and bounded
//!   load through the edges that hold its tunnels (as DNS would send
//!   users) sees no failed request during the move.
//! - Jitter of ±5 ms around two regions 4 ms apart, the home being the
//!   farther one: no move over three windows.
//! - The pinned connector never moves; `portico connector list` and the
//!   metrics show the home, the RTTs and the last move's reason.
//!
//! No timing assertion: every wait polls with a generous deadline.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{admin_cli, eventually, https_status, metric_value};
use portico_agent::{RouterClient, RouterTrust};
use portico_loadtest::wan::{self, Impairment, PathConfig};
use portico_proto::api::{CreateGroup, CreateRegion, EdgeEndpoint, RegionChoice, TokenScope};
use portico_proto::{EdgeId, GroupId, RegionId};
use tokio_util::sync::CancellationToken;

const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
/// A hang guard for each wait (never a timing assertion).
const LIMIT: Duration = Duration::from_secs(60);
/// The chooser's window in this test.
const WINDOW: Duration = Duration::from_secs(6);
const REGIONS: [&str; 3] = ["near", "mid", "far"];

struct EdgeUnderTest {
    id: EdgeId,
    region: RegionId,
    public: SocketAddr,
    metrics: SocketAddr,
    path: wan::Path,
    _handle: portico_edge::Handle,
}

struct World {
    dir: tempfile::TempDir,
    root: CancellationToken,
    router: portico_router::Handle,
    admin: RouterClient,
    edges: Vec<EdgeUnderTest>,
    ca_pem: String,
}

/// Sets every edge of `region` to a round trip of `rtt` (half each way),
/// with `jitter` on each direction.
fn set_rtt(w: &World, region: &str, rtt: Duration, jitter: Duration) {
    for e in w.edges.iter().filter(|e| e.region.as_str() == region) {
        let one_way = Impairment {
            delay: rtt / 2,
            jitter,
            ..Impairment::none()
        };
        e.path.set(one_way.clone(), one_way).unwrap();
    }
}

async fn start_world() -> World {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let root = CancellationToken::new();
    let mut rc = portico_router::Config::new(dir.path().join("router"));
    rc.listen = LOOPBACK;
    rc.metrics_listen = None;
    rc.apps_domain = portico::dev::DEV_APPS_DOMAIN.to_owned();
    rc.enroll_limit.burst = 64;
    let router = portico_router::start(rc, root.child_token()).await.unwrap();
    let admin = RouterClient::new(
        &router.url(),
        RouterTrust::CaPem(router.ca_pem.clone()),
        None,
    )
    .unwrap()
    .with_bearer(router.admin_token());
    let mut edges = Vec::new();
    for region in REGIONS {
        let rid = RegionId::new(region).unwrap();
        let _: serde_json::Value = admin
            .post_json("/v1/regions", &CreateRegion { id: rid.clone() })
            .await
            .unwrap();
        for i in 0..2 {
            let token = portico::dev::create_token(
                &admin,
                TokenScope::Edge {
                    region: rid.clone(),
                },
            )
            .await
            .unwrap();
            // The relay's port, reserved: the edge advertises it.
            let relay = std::net::UdpSocket::bind(LOOPBACK)
                .unwrap()
                .local_addr()
                .unwrap();
            let mut ec = portico_edge::Config::new(
                router.url(),
                dir.path().join(format!("edge-{region}-{i}")),
            );
            ec.token = Some(token);
            ec.public_listen = LOOPBACK;
            ec.tunnel_listen = LOOPBACK;
            ec.metrics_listen = Some(LOOPBACK);
            ec.advertise_tunnel_addr = Some(relay.to_string());
            ec.drain_delay = Duration::ZERO;
            ec.grace = Duration::from_secs(1);
            let handle = portico_edge::start(ec, root.child_token()).await.unwrap();
            let path = wan::start(
                PathConfig::new(relay, handle.tunnel_addr),
                root.child_token(),
            )
            .await
            .unwrap();
            edges.push(EdgeUnderTest {
                id: handle.id.clone(),
                region: rid.clone(),
                public: handle.public_addr,
                metrics: handle.metrics_addr.unwrap(),
                path,
                _handle: handle,
            });
        }
    }
    for e in &edges {
        e._handle.ready().await;
    }
    let ca_pem = router.ca_pem.clone();
    let w = World {
        dir,
        root,
        router,
        admin,
        edges,
        ca_pem,
    };
    set_rtt(&w, "near", Duration::from_millis(10), Duration::ZERO);
    set_rtt(&w, "mid", Duration::from_millis(80), Duration::ZERO);
    set_rtt(&w, "far", Duration::from_millis(200), Duration::ZERO);
    w
}

/// A group (`auto` or pinned), the demo backend published in it as `app`,
/// and a connector of it with the test's short windows.
async fn connector_of(
    w: &World,
    group: &str,
    region: Option<&str>,
    app: &str,
    backend: SocketAddr,
) -> portico_connector::Handle {
    let gid = GroupId::new(group).unwrap();
    let _: serde_json::Value = w
        .admin
        .post_json(
            "/v1/groups",
            &CreateGroup {
                id: gid.clone(),
                region: region.map(str::to_owned),
            },
        )
        .await
        .unwrap();
    portico::dev::publish(&w.admin, app, &format!("http://{backend}/"), gid.clone())
        .await
        .unwrap();
    let token = portico::dev::create_token(&w.admin, TokenScope::Connector { group: gid })
        .await
        .unwrap();
    let mut cc =
        portico_connector::Config::new(w.router.url(), w.dir.path().join(format!("c-{group}")));
    cc.token = Some(token);
    cc.tunnels = 4;
    cc.region.policy.window = WINDOW;
    cc.region.probe_interval = Duration::from_millis(500);
    cc.region.move_linger = Duration::from_secs(2);
    portico_connector::start(cc, w.root.child_token())
        .await
        .unwrap()
}

/// The distinct edges of a connector's current tunnels, with their region.
fn tunnel_spread(c: &portico_connector::Handle) -> (Vec<String>, Vec<String>) {
    let edges = c.tunnel_edges();
    let mut ids: Vec<String> = edges.iter().map(|e| e.id.to_string()).collect();
    ids.sort();
    ids.dedup();
    let mut regions: Vec<String> = edges.iter().map(|e| e.region.to_string()).collect();
    regions.sort();
    regions.dedup();
    (ids, regions)
}

/// Waits until `c` is at home in `region` with all 4 tunnels there, on
/// both of its edges.
async fn settled_in(c: &portico_connector::Handle, region: &str) -> RegionChoice {
    eventually(
        &format!("home {region}, 4 tunnels on both edges"),
        LIMIT,
        || async {
            let choice = c.region()?;
            let (ids, regions) = tunnel_spread(c);
            (choice.home.as_ref().map(|h| h.as_str()) == Some(region)
                && c.tunnel_edges().len() == 4
                && regions == [region]
                && ids.len() == 2)
                .then_some(choice)
        },
    )
    .await
}

/// Load at about 20 requests/s to `host`, each sent to an edge that holds
/// one of `c`'s current tunnels in its home region (any edge holding one
/// while the home has none yet), as DNS would send users; stops on
/// `stop`. Returns (ok, failures).
struct Load {
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

fn load(
    w: &World,
    c: Arc<portico_connector::Handle>,
    host: &'static str,
    stop: CancellationToken,
) -> Load {
    let public: HashMap<EdgeId, SocketAddr> =
        w.edges.iter().map(|e| (e.id.clone(), e.public)).collect();
    let ca = w.ca_pem.clone();
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let (ok2, failures2) = (ok.clone(), failures.clone());
    let task = tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        while !stop.is_cancelled() {
            tick.tick().await;
            let home = c.region().and_then(|r| r.home);
            let edges = c.tunnel_edges();
            let in_home: Vec<&EdgeEndpoint> = edges
                .iter()
                .filter(|e| Some(&e.region) == home.as_ref())
                .collect();
            let pool: Vec<&EdgeEndpoint> = if in_home.is_empty() {
                edges.iter().collect()
            } else {
                in_home
            };
            if pool.is_empty() {
                failures2.lock().unwrap().push("no tunnel anywhere".into());
                continue;
            }
            let e = pool[fastrand::usize(..pool.len())];
            let addr = public[&e.id];
            let (ca, ok, failures, id) = (ca.clone(), ok2.clone(), failures2.clone(), e.id.clone());
            // Bounded: at most 64 requests in flight.
            while set.len() >= 64 {
                set.join_next().await;
            }
            set.spawn(async move {
                match tokio::time::timeout(Duration::from_secs(20), https_status(&ca, addr, host))
                    .await
                {
                    Ok(Ok(200)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(s)) => failures.lock().unwrap().push(format!("{id}: status {s}")),
                    Ok(Err(e)) => failures.lock().unwrap().push(format!("{id}: {e}")),
                    Err(_) => failures.lock().unwrap().push(format!("{id}: timed out")),
                }
            });
        }
        while set.join_next().await.is_some() {}
    });
    Load { ok, failures, task }
}

/// The row of `connector` in `portico connector list`: REGION, RTT and
/// LAST MOVE (the rest of the line).
async fn listed(api: &str, router: &Path, connector: &str) -> (String, String, String) {
    let out = admin_cli(api, router, &["connector", "list"]).await;
    let line = out
        .lines()
        .find(|l| l.starts_with(connector))
        .unwrap_or_else(|| panic!("{connector} not listed:\n{out}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    // ID GROUP STATUS VERSION HOST ADDRESS EDGES LAST-SEEN (`never` or
    // `3s ago`) REGION RTT LAST-MOVE...
    let at = if cells[7] == "never" { 8 } else { 9 };
    (
        cells[at].to_owned(),
        cells[at + 1].to_owned(),
        cells[at + 2..].join(" "),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_pick_the_nearest_region_move_without_failures_and_do_not_flap() {
    let w = start_world().await;
    let demo = portico::demo::start(LOOPBACK, w.root.child_token())
        .await
        .unwrap();
    let auto = Arc::new(connector_of(&w, "roaming", None, "roam", demo.addr).await);
    let pinned = connector_of(&w, "anchored", Some("mid"), "anchor", demo.addr).await;

    // Start-up: the 10 ms region, tunnels on both of its edges.
    let choice = settled_in(&auto, "near").await;
    assert_eq!(choice.pinned, None);
    assert_eq!(choice.moves, 0, "{choice:?}");
    let first = choice.last_move.expect("the first choice is recorded");
    assert!(first.reason.starts_with("near is nearest at"), "{first:?}");
    assert!(!choice.degraded);
    let pinned_choice = settled_in(&pinned, "mid").await;
    assert_eq!(
        pinned_choice.pinned.as_ref().map(|r| r.as_str()),
        Some("mid")
    );
    assert_eq!(
        pinned
            .metrics()
            .region_probes
            .with_label_values(&["ok"])
            .get()
            + pinned
                .metrics()
                .region_probes
                .with_label_values(&["lost"])
                .get(),
        0,
        "a pinned group probes nothing"
    );
    // The RTTs reflect the emulated paths (at least the configured RTT).
    let rtt = |c: &RegionChoice, r: &str| {
        c.regions
            .iter()
            .find(|x| x.region.as_str() == r)
            .and_then(|x| x.rtt_micros)
    };
    let choice = eventually("RTTs of every region", LIMIT, || async {
        let c = auto.region()?;
        REGIONS.iter().all(|r| rtt(&c, r).is_some()).then_some(c)
    })
    .await;
    assert!(rtt(&choice, "near").unwrap() >= 10_000, "{choice:?}");
    assert!(rtt(&choice, "mid").unwrap() >= 80_000, "{choice:?}");
    assert!(rtt(&choice, "far").unwrap() >= 200_000, "{choice:?}");
    // The edges of `far` saw only probes: closed with the probe code, never
    // attached as tunnels.
    for e in w.edges.iter().filter(|e| e.region.as_str() == "far") {
        let m = common::curl_plain(&format!("http://{}/metrics", e.metrics))
            .await
            .text();
        assert!(
            metric_value(&m, r#"portico_edge_tunnel_closes_total{reason="probe"}"#) >= 1.0,
            "{m}"
        );
        assert_eq!(metric_value(&m, "portico_edge_tunnels"), 0.0, "{m}");
    }
    eventually("a request through a near edge", LIMIT, || async {
        let e = w.edges.iter().find(|e| e.region.as_str() == "near")?;
        (https_status(&w.ca_pem, e.public, "roam.apps.localhost").await == Ok(200)).then_some(())
    })
    .await;

    // The delays change: `far` is now 10 ms away and `near` 200. Under
    // load, the connector moves after the window, new tunnels first.
    let stop_load = CancellationToken::new();
    let running = load(&w, auto.clone(), "roam.apps.localhost", stop_load.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    set_rtt(&w, "near", Duration::from_millis(200), Duration::ZERO);
    set_rtt(&w, "far", Duration::from_millis(10), Duration::ZERO);
    let moved = settled_in(&auto, "far").await;
    // Past the linger, so that the old tunnels drained under load too.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop_load.cancel();
    running.task.await.unwrap();
    let failures = running.failures.lock().unwrap().clone();
    let ok = running.ok.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} failed, {ok} ok: {failures:?}",
        failures.len()
    );
    assert!(ok >= 40, "the load ran: {ok} requests");
    eprintln!("load during the move: {ok} requests, none failed");
    assert_eq!(moved.moves, 1, "{moved:?}");
    let m = moved.last_move.clone().expect("a move");
    assert_eq!(m.from.as_ref().map(|r| r.as_str()), Some("near"));
    assert_eq!(m.to.as_str(), "far");
    assert!(
        m.reason.starts_with("far ")
            && m.reason.contains(" vs near ")
            && m.reason.ends_with("nearer"),
        "{m:?}"
    );
    let metrics = auto.metrics().render();
    assert_eq!(
        metric_value(
            &metrics,
            r#"portico_connector_region_moves_total{cause="nearer"}"#
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, r#"portico_connector_home_region{region="far"}"#),
        1.0
    );
    assert!(!metrics.contains(r#"portico_connector_home_region{region="near"}"#));
    assert!(
        metric_value(
            &metrics,
            r#"portico_connector_region_rtt_seconds{region="far"}"#
        ) >= 0.01
    );
    assert_eq!(
        metric_value(&metrics, "portico_connector_region_degraded"),
        0.0
    );

    // `portico connector list` shows the home, the RTTs and the reason.
    let api = w.router.url();
    let router_dir = w.dir.path().join("router");
    let (region, rtts, last) = eventually("the move reported to the router", LIMIT, || async {
        let row = listed(&api, &router_dir, auto.id.as_str()).await;
        (row.0 == "far").then_some(row)
    })
    .await;
    assert_eq!(region, "far");
    for r in REGIONS {
        assert!(rtts.contains(&format!("{r}=")), "{rtts}");
    }
    assert!(last.starts_with("near->far: far "), "{last}");
    assert!(last.ends_with("nearer"), "{last}");
    let (region, _, last) = listed(&api, &router_dir, pinned.id.as_str()).await;
    assert_eq!(region, "pinned:mid");
    assert_eq!(last, "-->mid: the group is pinned to mid");

    // Jitter: `far` (home) and `mid` 4 ms apart, the home being the farther
    // one, ±5 ms on each direction: no move over three windows.
    set_rtt(
        &w,
        "far",
        Duration::from_millis(34),
        Duration::from_millis(5),
    );
    set_rtt(
        &w,
        "mid",
        Duration::from_millis(30),
        Duration::from_millis(5),
    );
    let until = tokio::time::Instant::now() + WINDOW * 3;
    while tokio::time::Instant::now() < until {
        let c = auto.region().unwrap();
        assert_eq!(c.home.as_ref().map(|h| h.as_str()), Some("far"), "{c:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let c = auto.region().unwrap();
    assert_eq!(c.moves, 1, "{c:?}");
    // The measurement did see both regions through the jitter.
    let (far, mid) = (rtt(&c, "far").unwrap(), rtt(&c, "mid").unwrap());
    assert!(far < 60_000 && mid < 60_000, "{c:?}");

    // The pinned group never moved, whatever the delays did.
    let p = pinned.region().unwrap();
    assert_eq!(
        (p.home.as_ref().map(|h| h.as_str()), p.moves),
        (Some("mid"), 0)
    );
    let (_, regions) = tunnel_spread(&pinned);
    assert_eq!(regions, ["mid"]);

    w.root.cancel();
}
