//! The chain walk against a fake DNS, the cache on a virtual clock, the
//! saved answers' bounds, and the parsers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use portico_agent::dns::parse_resolv_conf;

/// A zone in memory: `CNAME`s and addresses by name; names listed in
/// `failing` give no answer, those in neither map do not exist.
#[derive(Default)]
struct Fake {
    cnames: HashMap<String, (String, u32)>,
    addrs: HashMap<String, Vec<(IpAddr, u32)>>,
    failing: Vec<(String, Rtype)>,
    queries: AtomicUsize,
}

impl Fake {
    fn cname(mut self, from: &str, to: &str, ttl: u32) -> Self {
        self.cnames.insert(from.into(), (to.into(), ttl));
        self
    }
    fn addr(mut self, name: &str, ip: &str, ttl: u32) -> Self {
        self.addrs
            .entry(name.into())
            .or_default()
            .push((ip.parse().unwrap(), ttl));
        self
    }
    fn fail(mut self, name: &str, rtype: Rtype) -> Self {
        self.failing.push((name.into(), rtype));
        self
    }
}

#[derive(Debug, thiserror::Error)]
#[error("SERVFAIL")]
struct ServFail;

impl Lookup for Fake {
    fn query(
        &self,
        name: &str,
        rtype: Rtype,
    ) -> impl Future<Output = Result<Vec<Rr>, QueryError>> + Send {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let r = if self.failing.iter().any(|(n, t)| n == name && *t == rtype) {
            Err(QueryError::Failed(Box::new(ServFail)))
        } else if !self.cnames.contains_key(name) && !self.addrs.contains_key(name) {
            Err(QueryError::NxDomain)
        } else {
            let rrs: Vec<Rr> = match rtype {
                Rtype::Cname => self
                    .cnames
                    .get(name)
                    .map(|(t, ttl)| Rr {
                        name: name.into(),
                        ttl: *ttl,
                        data: Rdata::Cname(t.clone()),
                    })
                    .into_iter()
                    .collect(),
                Rtype::A | Rtype::Aaaa => self
                    .addrs
                    .get(name)
                    .into_iter()
                    .flatten()
                    .filter(|(ip, _)| ip.is_ipv4() == (rtype == Rtype::A))
                    .map(|(ip, ttl)| Rr {
                        name: name.into(),
                        ttl: *ttl,
                        data: Rdata::Addr(*ip),
                    })
                    .collect(),
            };
            if rrs.is_empty() {
                Err(QueryError::NoRecords)
            } else {
                Ok(rrs)
            }
        };
        std::future::ready(r)
    }
}

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn three_hops() -> Fake {
    Fake::default()
        .cname("api.mesh.test", "hop1.mesh.test", 300)
        .cname("hop1.mesh.test", "hop2.mesh.test", 200)
        .cname("hop2.mesh.test", "edge.mesh.test", 100)
        .addr("edge.mesh.test", "10.1.0.8", 30)
        .addr("edge.mesh.test", "fd00::7", 60)
        .addr("edge.mesh.test", "10.1.0.7", 30)
}

#[test]
fn a_three_hop_chain_is_followed_with_the_minimum_ttl() {
    let a = block_on(walk(&three_hops(), "api.mesh.test")).unwrap();
    assert_eq!(
        a.chain,
        [
            "api.mesh.test",
            "hop1.mesh.test",
            "hop2.mesh.test",
            "edge.mesh.test"
        ]
    );
    assert_eq!(a.hops(), 3);
    let addrs: Vec<String> = a.addrs.iter().map(ToString::to_string).collect();
    assert_eq!(
        addrs,
        ["10.1.0.7", "10.1.0.8", "fd00::7"],
        "v4 first, sorted"
    );
    assert_eq!(a.ttl, 30);

    // A hop's TTL lower than the addresses' is the answer's.
    let low = three_hops().cname("hop1.mesh.test", "hop2.mesh.test", 5);
    assert_eq!(block_on(walk(&low, "api.mesh.test")).unwrap().ttl, 5);

    // A name with addresses only: no hop.
    let a = block_on(walk(&three_hops(), "edge.mesh.test")).unwrap();
    assert_eq!(a.chain, ["edge.mesh.test"]);
    assert_eq!(a.hops(), 0);
}

#[test]
fn a_loop_is_an_error_that_shows_the_chain() {
    let fake =
        Fake::default()
            .cname("a.example", "b.example", 60)
            .cname("b.example", "a.example", 60);
    let e = block_on(walk(&fake, "a.example")).unwrap_err();
    assert!(matches!(e, ResolveError::Loop { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "a.example -> b.example -> a.example: CNAME loop"
    );
    assert_eq!(e.label(), "loop");

    let own = Fake::default().cname("self.example", "self.example", 60);
    let e = block_on(walk(&own, "self.example")).unwrap_err();
    assert_eq!(e.to_string(), "self.example -> self.example: CNAME loop");

    // A loop further down the chain.
    let tail = Fake::default()
        .cname("x.example", "y.example", 60)
        .cname("y.example", "z.example", 60)
        .cname("z.example", "y.example", 60);
    let e = block_on(walk(&tail, "x.example")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "x.example -> y.example -> z.example -> y.example: CNAME loop"
    );
}

fn chain_of(hops: usize) -> Fake {
    let mut f = Fake::default();
    for i in 0..hops {
        f = f.cname(&format!("n{i}.example"), &format!("n{}.example", i + 1), 60);
    }
    f.addr(&format!("n{hops}.example"), "192.0.2.1", 60)
}

#[test]
fn the_depth_limit_is_eight_hops() {
    let a = block_on(walk(&chain_of(MAX_CNAME_HOPS), "n0.example")).unwrap();
    assert_eq!(a.hops(), MAX_CNAME_HOPS);
    let e = block_on(walk(&chain_of(MAX_CNAME_HOPS + 1), "n0.example")).unwrap_err();
    assert!(matches!(e, ResolveError::TooDeep { max: 8, .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.starts_with("n0.example -> n1.example -> ")
            && text.contains("n9.example: CNAME chain longer than 8 hops"),
        "{text}"
    );
    // A long chain costs a bounded number of queries.
    let f = chain_of(1000);
    let _ = block_on(walk(&f, "n0.example"));
    assert!(f.queries.load(Ordering::Relaxed) <= MAX_CNAME_HOPS + 2);
}

#[test]
fn failures_name_the_chain_and_the_query() {
    // The chain ends at a name that does not exist.
    let f = Fake::default().cname("api.example", "gone.example", 60);
    let e = block_on(walk(&f, "api.example")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "api.example -> gone.example: gone.example does not exist (NXDOMAIN)"
    );
    // It exists, without addresses (a CNAME-less TXT-only name, say).
    let mut f = Fake::default().cname("api.example", "bare.example", 60);
    f.addrs.insert("bare.example".into(), vec![]);
    let e = block_on(walk(&f, "api.example")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "api.example -> bare.example: no A or AAAA records"
    );
    // A query without an answer keeps its source.
    let f = three_hops().fail("hop2.mesh.test", Rtype::Cname);
    let e = block_on(walk(&f, "api.mesh.test")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "api.mesh.test -> hop1.mesh.test -> hop2.mesh.test: querying hop2.mesh.test CNAME"
    );
    assert_eq!(
        portico_agent::error_chain(&e)
            .to_string()
            .matches("SERVFAIL")
            .count(),
        1
    );
    assert_eq!(e.label(), "failed");
    // AAAA failing after A answered: the v4 addresses are the answer.
    let f = three_hops().fail("edge.mesh.test", Rtype::Aaaa);
    let a = block_on(walk(&f, "api.mesh.test")).unwrap();
    assert_eq!(a.addrs.len(), 2);
    // A failing with AAAA unasked is an error.
    let f = three_hops().fail("edge.mesh.test", Rtype::A);
    assert!(block_on(walk(&f, "api.mesh.test")).is_err());
}

#[test]
fn the_cache_keeps_an_answer_for_its_minimum_ttl_on_a_virtual_clock() {
    let t0 = Instant::now();
    let answer = block_on(walk(&three_hops(), "api.mesh.test")).unwrap();
    let mut cache = Cache::default();
    assert_eq!(
        cache.insert("api.mesh.test", answer.clone(), t0),
        Duration::from_secs(30)
    );
    let (hit, left) = cache
        .fresh("api.mesh.test", t0 + Duration::from_secs(29))
        .unwrap();
    assert_eq!(hit, &answer);
    assert_eq!(left, Duration::from_secs(1));
    assert!(cache
        .fresh("api.mesh.test", t0 + Duration::from_secs(30))
        .is_none());
    assert!(cache
        .fresh("api.mesh.test", t0 + Duration::from_secs(3000))
        .is_none());
    // Expired, it is still the last good answer.
    assert_eq!(cache.last("api.mesh.test"), Some(&answer));
    assert!(cache.fresh("other.example", t0).is_none());
    // Expired early (the router's list of its region changed): asked
    // again, still the last good answer.
    cache.insert("api.mesh.test", answer.clone(), t0);
    cache.expire("api.mesh.test", t0 + Duration::from_secs(5));
    assert!(cache
        .fresh("api.mesh.test", t0 + Duration::from_secs(5))
        .is_none());
    assert_eq!(cache.last("api.mesh.test"), Some(&answer));
    cache.expire("unknown.example", t0);

    // TTL 0 is kept for MIN_TTL, a week for MAX_TTL.
    let mut zero = answer.clone();
    zero.ttl = 0;
    assert_eq!(cache.insert("zero.example", zero, t0), MIN_TTL);
    let mut week = answer.clone();
    week.ttl = 7 * 86400;
    assert_eq!(cache.insert("week.example", week, t0), MAX_TTL);

    // Bounded: the entry expiring first goes.
    let mut cache = Cache::default();
    for i in 0..(MAX_CACHED + 10) {
        let mut a = answer.clone();
        a.ttl = 100 + i as u32;
        cache.insert(&format!("n{i}.example"), a, t0);
    }
    assert_eq!(cache.len(), MAX_CACHED);
    assert!(cache.last("n0.example").is_none());
    assert!(cache
        .last(&format!("n{}.example", MAX_CACHED + 9))
        .is_some());
}

#[test]
fn saved_answers_are_rewritten_on_change_or_age_and_bounded() {
    let answer = block_on(walk(&three_hops(), "api.mesh.test")).unwrap();
    let mut saved = Saved::default();
    assert!(saved.record("api.mesh.test", &answer, 1_000));
    assert!(
        !saved.record("api.mesh.test", &answer, 2_000),
        "same answer, recent"
    );
    let resave = 1_000 + u64::try_from(RESAVE_AFTER.as_millis()).unwrap();
    assert!(saved.record("api.mesh.test", &answer, resave));
    let mut other = answer.clone();
    other.addrs.pop();
    assert!(saved.record("api.mesh.test", &other, resave + 1));
    assert_eq!(saved.names["api.mesh.test"].addrs, other.addrs);

    // A file with too much in it is cut to the bounds.
    let mut big = Saved::default();
    for i in 0..(MAX_CACHED + 5) {
        big.names.insert(
            format!("n{i}.example"),
            SavedAnswer {
                chain: (0..50).map(|h| format!("h{h}")).collect(),
                addrs: (0..100u8)
                    .map(|b| IpAddr::V4(Ipv4Addr::new(10, 0, 0, b)))
                    .collect(),
                saved_at_ms: i as u64,
            },
        );
    }
    big.names.insert(
        "empty.example".into(),
        SavedAnswer {
            chain: vec![],
            addrs: vec![],
            saved_at_ms: u64::MAX,
        },
    );
    let b = big.bounded();
    assert!(b.names.len() <= MAX_CACHED);
    assert!(!b.names.contains_key("n0.example"));
    assert!(!b.names.contains_key("empty.example"));
    assert!(b
        .names
        .values()
        .all(|a| a.addrs.len() == MAX_ADDRS && a.chain.len() == MAX_CNAME_HOPS + 1));
    // Round trip through JSON, unknown fields refused.
    let text = serde_json::to_string(&saved).unwrap();
    assert_eq!(serde_json::from_str::<Saved>(&text).unwrap(), saved);
    assert!(serde_json::from_str::<Saved>(r#"{"names":{},"x":1}"#).is_err());
}

#[test]
fn nameservers_and_addresses_parse() {
    assert_eq!(
        parse_nameserver("10.0.0.53").unwrap(),
        "10.0.0.53:53".parse().unwrap()
    );
    assert_eq!(
        parse_nameserver("127.0.0.1:5353").unwrap(),
        "127.0.0.1:5353".parse().unwrap()
    );
    assert_eq!(
        parse_nameserver("::1").unwrap(),
        "[::1]:53".parse().unwrap()
    );
    assert_eq!(
        parse_nameserver("[::1]:5300").unwrap(),
        "[::1]:5300".parse().unwrap()
    );
    assert!(parse_nameserver("dns.example")
        .unwrap_err()
        .contains("10.0.0.53:5353"));

    let conf = "# comment\nsearch corp.example\nnameserver 10.255.255.53\nnameserver fe80::1%eth0\nnameserver bogus\noptions ndots:2\n";
    let servers = parse_resolv_conf(conf);
    assert_eq!(
        servers,
        vec![
            "10.255.255.53:53".parse::<SocketAddr>().unwrap(),
            "[fe80::1]:53".parse().unwrap()
        ]
    );
    assert!(parse_resolv_conf("").is_empty());
    let many: String = (0..20)
        .map(|i| format!("nameserver 10.0.0.{i}\n"))
        .collect();
    assert_eq!(parse_resolv_conf(&many).len(), MAX_NAMESERVERS);

    assert_eq!(
        split_host_port("edge.example:4433"),
        Some(("edge.example", 4433))
    );
    assert_eq!(split_host_port("[::1]:4433"), None);
    assert_eq!(split_host_port("edge.example"), None);
    assert_eq!(split_host_port("edge.example:99999"), None);
    assert_eq!(normalize("Edge.Example."), "edge.example");
}

#[tokio::test]
async fn names_that_need_no_dns_resolve_without_a_nameserver() {
    let r = Resolver {
        backend: Err("none configured (a test)".into()),
        ..Resolver::new(&["127.0.0.1:9".parse().unwrap()], None, None)
    };
    let ip = r.socket_addr("127.0.0.5:4433", false).await.unwrap();
    assert_eq!(ip, "127.0.0.5:4433".parse().unwrap());
    let local = r.socket_addr("localhost:4433", true).await.unwrap();
    assert_eq!(local, "127.0.0.1:4433".parse().unwrap());
    assert!(r.socket_addr("[::1]:4433", true).await.is_err());
    let e = r.resolve("edge.example").await.unwrap_err();
    assert_eq!(e.label(), "no_nameserver");
    assert!(e.to_string().contains("none configured"), "{e}");
    assert_eq!(
        r.resolve("bad..name").await.unwrap_err().label(),
        "invalid_name"
    );
}

fn endpoint(id: &str, addr: &str) -> EdgeEndpoint {
    EdgeEndpoint {
        id: portico_proto::EdgeId::new(id).unwrap(),
        region: portico_proto::RegionId::default_region(),
        tunnel_addr: addr.into(),
    }
}

/// A resolver that cannot reach DNS, with `cached` in its cache and
/// `saved` as its saved answers.
fn offline(cached: &[(&str, &[&str])], saved: &[(&str, &[&str])]) -> Resolver {
    let r = Resolver {
        backend: Err("offline (a test)".into()),
        ..Resolver::new(&["127.0.0.1:9".parse().unwrap()], None, None)
    };
    let addrs = |ips: &[&str]| -> Vec<IpAddr> { ips.iter().map(|i| i.parse().unwrap()).collect() };
    for (name, ips) in cached {
        // Sorted as the walk sorts them.
        let mut sorted = addrs(ips);
        sorted.sort_by_key(|a| (a.is_ipv6(), *a));
        let answer = Answer {
            chain: vec![(*name).into()],
            addrs: sorted,
            ttl: 300,
        };
        lock(&r.cache).insert(name, answer, clock());
    }
    for (name, ips) in saved {
        lock(&r.saved).names.insert(
            (*name).into(),
            SavedAnswer {
                chain: vec![(*name).into(), "lb.example".into()],
                addrs: addrs(ips),
                saved_at_ms: unix_ms().saturating_sub(90_000),
            },
        );
    }
    r
}

#[tokio::test]
async fn chosen_edges_become_one_target_per_address() {
    let r = offline(
        &[("e1.example", &["10.0.0.2", "10.0.0.1", "fd00::1"])],
        &[("e3.example", &["10.0.0.3"])],
    );
    let edges = [
        endpoint("e2", "192.0.2.7:4433"),
        endpoint("e1", "E1.example.:4433"),
        endpoint("e3", "e3.example:7844"),
        endpoint("e4", "gone.example:4433"),
    ];
    let mut answers = HashMap::new();
    let (none, learned) = (BTreeMap::new(), HashMap::new());
    let find = |v4_only| Find {
        edges: &edges,
        names: &none,
        learned: &learned,
        v4_only,
    };
    let (targets, wake) = expand(&r, &find(false), &[], &mut answers).await;
    let got: Vec<(String, String)> = targets
        .iter()
        .map(|t| (t.id.to_string(), t.tunnel_addr.clone()))
        .collect();
    let want = [
        ("e1", "10.0.0.1:4433"),
        ("e1", "10.0.0.2:4433"),
        ("e1", "[fd00::1]:4433"),
        ("e2", "192.0.2.7:4433"),
        // DNS failed: the saved answer.
        ("e3", "10.0.0.3:7844"),
        // No answer, none saved: left out.
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| ((*a).into(), (*b).into()))
        .collect();
    assert_eq!(got, want);
    // The failures retry soon; the cached name would wait its TTL.
    assert!(wake.is_some_and(|w| w <= RETRY_MAX), "{wake:?}");

    // An IPv4-only socket: no v6 target.
    let (targets, _) = expand(&r, &find(true), &[], &mut answers).await;
    assert!(
        targets.iter().all(|t| !t.tunnel_addr.starts_with('[')),
        "{targets:?}"
    );
    assert_eq!(targets.len(), 4);

    // Before asking DNS, the known answers (this process's, else the
    // saved ones) give targets at once.
    let known = find(false).targets(|n| r.known(n).map(|a| a.addrs));
    assert_eq!(
        known,
        find(false).targets(|n| match n {
            "e1.example" => Some(vec![
                "10.0.0.1".parse().unwrap(),
                "10.0.0.2".parse().unwrap(),
                "fd00::1".parse().unwrap()
            ]),
            "e3.example" => Some(vec!["10.0.0.3".parse().unwrap()]),
            _ => None,
        })
    );
    assert_eq!(known.len(), 5);

    // A dial or a probe of the name uses the known answer, DNS or not.
    assert_eq!(
        r.socket_addr("e1.example:4433", true).await.unwrap(),
        "10.0.0.1:4433".parse().unwrap()
    );
    let e = r.socket_addr("gone.example:4433", false).await.unwrap_err();
    assert!(
        portico_agent::error_chain(&e)
            .to_string()
            .contains("no nameserver to ask: offline (a test)"),
        "{e}"
    );
}

/// An endpoint of `region`.
fn in_region(id: &str, region: &str, addr: &str) -> EdgeEndpoint {
    EdgeEndpoint {
        region: region.parse().unwrap(),
        ..endpoint(id, addr)
    }
}

#[tokio::test]
async fn a_regions_tunnel_name_gives_its_targets_named_after_the_edges_found_there() {
    // eu's name answers with e1's address, one a handshake found to be e9,
    // and one nobody knows yet; us has no name.
    let r = offline(
        &[(
            "eu.tunnel.apps.test",
            &["10.0.0.1", "10.0.0.9", "10.0.0.7", "fd00::7"],
        )],
        &[],
    );
    let edges = [
        in_region("e1", "eu", "10.0.0.1:4433"),
        in_region("e2", "eu", "10.0.0.2:4433"),
        in_region("u1", "us", "10.1.0.1:4433"),
    ];
    let names: BTreeMap<RegionId, String> = [
        ("eu".parse().unwrap(), "eu.tunnel.apps.test:4433".to_owned()),
        ("us".parse().unwrap(), "us.tunnel.apps.test:4433".to_owned()),
    ]
    .into();
    let learned: HashMap<String, EdgeId> =
        [("10.0.0.9:4433".to_owned(), EdgeId::new("e9").unwrap())].into();
    let find = |v4_only| Find {
        edges: &edges,
        names: &names,
        learned: &learned,
        v4_only,
    };
    let mut answers = HashMap::new();
    let (targets, _) = expand(&r, &find(false), &[], &mut answers).await;
    let got: Vec<(String, String, String)> = targets
        .iter()
        .map(|t| {
            (
                t.id.to_string(),
                t.region.to_string(),
                t.tunnel_addr.clone(),
            )
        })
        .collect();
    let want = [
        // e2 is listed, but the name does not give it: not dialled.
        ("e1", "eu", "10.0.0.1:4433"),
        ("e9", "eu", "10.0.0.9:4433"),
        // us's name has no answer (DNS is down, nothing saved): its list.
        ("u1", "us", "10.1.0.1:4433"),
        ("unknown-edge-at--fd00--7--4433", "eu", "[fd00::7]:4433"),
        ("unknown-edge-at-10.0.0.7-4433", "eu", "10.0.0.7:4433"),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| ((*a).into(), (*b).into(), (*c).into()))
        .collect();
    assert_eq!(got, want);
    // An IPv4-only socket: the v6 address goes.
    let (targets, _) = expand(&r, &find(true), &[], &mut answers).await;
    assert_eq!(targets.len(), 4, "{targets:?}");
    // Edges found by the list only: the per-edge targets.
    let none = BTreeMap::new();
    let list = Find {
        edges: &edges,
        names: &none,
        learned: &learned,
        v4_only: false,
    };
    let ids: Vec<String> = list
        .targets(|_| None)
        .iter()
        .map(|t| t.id.to_string())
        .collect();
    assert_eq!(ids, ["e1", "e2", "u1"]);
    // A stand-in id is a valid one.
    assert!(unknown_edge("[2001:db8::1]:4433").is_some());
}
