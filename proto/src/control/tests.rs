//! Both ends of the control protocol driven against each other on a
//! virtual clock: the bytes each end writes reach the other after a
//! one-way delay, cut into small pieces, or not at all.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::{ConnectorId, GroupId, PROTOCOL_VERSION};

const MS: Duration = Duration::from_millis(1);

fn hello(version: u32) -> Hello {
    Hello {
        version,
        capabilities: capabilities::ALL | 1 << 40,
        connector_id: ConnectorId::new("c-1".to_owned()).unwrap(),
        group: GroupId::new("hr".to_owned()).unwrap(),
        agent_version: "test".to_owned(),
    }
}

fn mesh_hello() -> MeshHello {
    MeshHello {
        version: PROTOCOL_VERSION,
        capabilities: capabilities::ALL,
        edge_id: EdgeId::new("e-eu-1".to_owned()).unwrap(),
        region: RegionId::new("eu".to_owned()).unwrap(),
        agent_version: "test".to_owned(),
    }
}

/// What the acceptor's driver answers a hello with.
#[derive(Clone, Copy)]
enum Policy {
    Welcome,
    Refuse(CloseCode, &'static str),
}

/// Bytes on their way from one end to the other.
#[derive(Default)]
struct Wire {
    in_flight: VecDeque<(Instant, Vec<u8>)>,
    /// Drops what is written from now on.
    cut: bool,
    /// The writer finished the stream (after its queued bytes).
    finish_at: Option<Instant>,
}

struct Pair {
    dialer: Control,
    acceptor: Control,
    start: Instant,
    now: Instant,
    one_way: Duration,
    /// Bytes are delivered in pieces of at most this many.
    piece: usize,
    policy: Policy,
    to_acceptor: Wire,
    to_dialer: Wire,
    dialer_events: Vec<(Duration, Event)>,
    acceptor_events: Vec<(Duration, Event)>,
    /// Every frame each end wrote.
    dialer_sent: Vec<Frame>,
    acceptor_sent: Vec<Frame>,
}

impl Pair {
    fn tunnel(hello: Hello, one_way: Duration) -> Pair {
        let now = Instant::now();
        Pair::new(
            Control::dial_tunnel(ControlConfig::CONNECTOR, hello, now),
            Control::accept(Link::Tunnel, ControlConfig::EDGE, now, 2 * one_way),
            now,
            one_way,
        )
    }

    fn mesh(one_way: Duration) -> Pair {
        let now = Instant::now();
        Pair::new(
            Control::dial_mesh(ControlConfig::EDGE, mesh_hello(), now),
            Control::accept(Link::Mesh, ControlConfig::EDGE, now, 2 * one_way),
            now,
            one_way,
        )
    }

    fn new(dialer: Control, acceptor: Control, now: Instant, one_way: Duration) -> Pair {
        Pair {
            dialer,
            acceptor,
            start: now,
            now,
            one_way,
            piece: 3,
            policy: Policy::Welcome,
            to_acceptor: Wire::default(),
            to_dialer: Wire::default(),
            dialer_events: Vec::new(),
            acceptor_events: Vec::new(),
            dialer_sent: Vec::new(),
            acceptor_sent: Vec::new(),
        }
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Moves frames, bytes and events until nothing is left to do at `now`.
    fn settle(&mut self) {
        loop {
            let mut progress = false;
            while let Some(f) = self.dialer.poll_transmit() {
                progress = true;
                send(&mut self.to_acceptor, &f, self.now + self.one_way);
                self.dialer_sent.push(f);
            }
            while let Some(f) = self.acceptor.poll_transmit() {
                progress = true;
                send(&mut self.to_dialer, &f, self.now + self.one_way);
                self.acceptor_sent.push(f);
            }
            progress |= deliver(
                &mut self.to_acceptor,
                &mut self.acceptor,
                self.now,
                self.piece,
            );
            progress |= deliver(&mut self.to_dialer, &mut self.dialer, self.now, self.piece);
            let at = self.elapsed();
            while let Some(e) = self.dialer.poll_event() {
                progress = true;
                self.dialer_events.push((at, e));
            }
            while let Some(e) = self.acceptor.poll_event() {
                progress = true;
                if let Event::Hello(_) = e {
                    match self.policy {
                        Policy::Welcome => self.acceptor.welcome(
                            EdgeId::new("e-1".to_owned()).unwrap(),
                            RegionId::new("eu".to_owned()).unwrap(),
                            7,
                            self.now,
                        ),
                        Policy::Refuse(code, reason) => self.acceptor.refuse(code, reason),
                    }
                }
                self.acceptor_events.push((at, e));
            }
            if !progress {
                return;
            }
        }
    }

    /// Runs the clock to `until` (from the start).
    fn run(&mut self, until: Duration) {
        let end = self.start + until;
        loop {
            self.settle();
            let next = [
                self.dialer.poll_timeout(),
                self.acceptor.poll_timeout(),
                self.to_acceptor.in_flight.front().map(|(at, _)| *at),
                self.to_dialer.in_flight.front().map(|(at, _)| *at),
                self.to_acceptor.finish_at,
                self.to_dialer.finish_at,
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(next) = next.filter(|n| *n <= end) else {
                self.now = end;
                self.settle();
                return;
            };
            self.now = self.now.max(next);
            self.dialer.handle_timeout(self.now);
            self.acceptor.handle_timeout(self.now);
        }
    }

    fn acceptor_closed(&self) -> Option<&Closed> {
        closed_in(&self.acceptor_events)
    }

    fn dialer_closed(&self) -> Option<&Closed> {
        closed_in(&self.dialer_events)
    }
}

fn send(wire: &mut Wire, frame: &Frame, at: Instant) {
    if !wire.cut {
        wire.in_flight
            .push_back((at, frame.to_bytes().unwrap().to_vec()));
    }
}

/// Delivers what has arrived by `now`, in pieces of `piece` bytes.
fn deliver(wire: &mut Wire, to: &mut Control, now: Instant, piece: usize) -> bool {
    let mut any = false;
    while wire.in_flight.front().is_some_and(|(at, _)| *at <= now) {
        let (_, bytes) = wire.in_flight.pop_front().unwrap();
        for chunk in bytes.chunks(piece) {
            to.handle_data(chunk, now);
        }
        any = true;
    }
    if wire.in_flight.is_empty() && wire.finish_at.is_some_and(|at| at <= now) {
        wire.finish_at = None;
        to.handle_finish(now);
        any = true;
    }
    any
}

fn closed_in(events: &[(Duration, Event)]) -> Option<&Closed> {
    events.iter().find_map(|(_, e)| match e {
        Event::Closed(c) => Some(c),
        _ => None,
    })
}

fn count(events: &[(Duration, Event)], f: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|(_, e)| f(e)).count()
}

#[test]
fn a_tunnel_opens_and_both_ends_ping_and_answer() {
    let mut p = Pair::tunnel(hello(PROTOCOL_VERSION), 20 * MS);
    p.run(Duration::from_secs(12));
    assert!(p.dialer.is_open() && p.acceptor.is_open());
    assert!(p.acceptor_closed().is_none() && p.dialer_closed().is_none());
    let Some((at, Event::Welcomed(w))) = p.dialer_events.first() else {
        panic!("no Welcome: {:?}", p.dialer_events);
    };
    assert_eq!(*at, 40 * MS);
    assert_eq!((w.version, w.config_version), (PROTOCOL_VERSION, 7));
    // The unknown bit 40 of the hello is not echoed.
    assert_eq!(w.capabilities, capabilities::ALL);
    assert_eq!(p.dialer.capabilities(), capabilities::ALL);
    assert!(matches!(
        p.acceptor_events.first(),
        Some((_, Event::Hello(PeerHello::Connector(h)))) if h.connector_id.as_str() == "c-1"
    ));
    // The edge pings every 500 ms, the connector every 10 s; every ping is
    // answered and measures the 40 ms round trip.
    let edge_rtts: Vec<_> = p
        .acceptor_events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Rtt(r) => Some(*r),
            _ => None,
        })
        .collect();
    assert!(edge_rtts.len() >= 20, "{edge_rtts:?}");
    assert!(edge_rtts.iter().all(|r| *r == 40 * MS), "{edge_rtts:?}");
    assert_eq!(
        count(
            &p.dialer_events,
            |e| matches!(e, Event::Rtt(r) if *r == 40 * MS)
        ),
        2
    );
    assert_eq!(p.acceptor.health(), Some(Health::Healthy));
}

#[test]
fn a_version_mismatch_is_refused_with_both_versions_named() {
    let mut p = Pair::tunnel(hello(9), 5 * MS);
    p.run(Duration::from_secs(1));
    let closed = p.acceptor_closed().expect("acceptor closed");
    assert_eq!(
        (closed.code, closed.by),
        (CloseCode::VersionMismatch, By::Local)
    );
    assert!(
        closed.reason.contains('9') && closed.reason.contains("1..=1"),
        "{}",
        closed.reason
    );
    assert_eq!(
        count(&p.acceptor_events, |e| matches!(e, Event::Hello(_))),
        0
    );
    let seen = p.dialer_closed().expect("dialer closed");
    assert_eq!((seen.code, seen.by), (CloseCode::VersionMismatch, By::Peer));
    assert_eq!(seen.reason, closed.reason);
    assert_eq!(p.dialer.poll_timeout(), None);
}

#[test]
fn a_welcome_in_a_version_the_dialer_does_not_speak_is_refused() {
    let now = Instant::now();
    let mut d = Control::dial_tunnel(ControlConfig::CONNECTOR, hello(PROTOCOL_VERSION), now);
    assert!(matches!(d.poll_transmit(), Some(Frame::Hello(_))));
    let welcome = Frame::Welcome(Welcome {
        version: 5,
        capabilities: 0,
        edge_id: EdgeId::new("e-1".to_owned()).unwrap(),
        region: RegionId::new("eu".to_owned()).unwrap(),
        config_version: 0,
    });
    d.handle_data(&welcome.to_bytes().unwrap(), now);
    let Some(Event::Closed(c)) = d.poll_event() else {
        panic!("not closed");
    };
    assert_eq!((c.code, c.by), (CloseCode::VersionMismatch, By::Local));
    assert!(c.reason.contains('5'), "{}", c.reason);
    assert!(matches!(d.poll_transmit(), Some(Frame::Goodbye(g)) if g.code == 2));
    assert!(!d.is_open());
}

#[test]
fn drain_from_either_side_reaches_the_other_and_the_link_stays_alive() {
    let mut p = Pair::tunnel(hello(PROTOCOL_VERSION), 10 * MS);
    p.run(Duration::from_secs(1));
    p.acceptor.drain();
    p.acceptor.drain();
    p.run(Duration::from_secs(2));
    assert_eq!(count(&p.dialer_events, |e| *e == Event::PeerDraining), 1);
    assert!(p.dialer.is_peer_draining() && p.acceptor.is_draining());
    p.dialer.drain();
    p.run(Duration::from_secs(8));
    assert_eq!(count(&p.acceptor_events, |e| *e == Event::PeerDraining), 1);
    assert_eq!(
        p.acceptor_sent
            .iter()
            .filter(|f| **f == Frame::Drain)
            .count(),
        1
    );
    // Draining closes nothing: pings go on being answered.
    assert!(p.dialer.is_open() && p.acceptor.is_open());
    assert_eq!(p.acceptor.health(), Some(Health::Healthy));
}

#[test]
fn goodbye_from_either_side_ends_the_link_on_both() {
    for dialer_says_it in [true, false] {
        let mut p = Pair::tunnel(hello(PROTOCOL_VERSION), 10 * MS);
        p.run(Duration::from_secs(1));
        if dialer_says_it {
            p.dialer
                .goodbye(CloseCode::Shutdown, "connector shutting down");
        } else {
            p.acceptor
                .goodbye(CloseCode::Shutdown, "connector shutting down");
        }
        p.run(Duration::from_secs(5));
        let (local, peer) = if dialer_says_it {
            (p.dialer_closed(), p.acceptor_closed())
        } else {
            (p.acceptor_closed(), p.dialer_closed())
        };
        let (local, peer) = (local.unwrap(), peer.unwrap());
        assert_eq!((local.code, local.by), (CloseCode::Shutdown, By::Local));
        assert_eq!((peer.code, peer.by), (CloseCode::Shutdown, By::Peer));
        assert_eq!(peer.reason, "connector shutting down");
        // Nothing more happens on a closed link.
        assert_eq!(p.dialer.poll_timeout(), None);
        assert_eq!(p.acceptor.poll_timeout(), None);
        assert_eq!(
            count(&p.acceptor_events, |e| matches!(e, Event::Health(_))),
            0
        );
    }
}

#[test]
fn an_unexpected_frame_is_a_protocol_error_that_names_it() {
    let error = Frame::Error(crate::StreamError {
        code: crate::ErrorCode::ALL[0],
        message: "no".to_owned(),
    });
    let cases: Vec<(Frame, &str)> = vec![
        (Frame::Hello(hello(PROTOCOL_VERSION)), "Hello"),
        (error, "Error"),
        // Only the acceptor sends ConfigChanged.
        (Frame::ConfigChanged(3), "ConfigChanged"),
        (Frame::MeshHello(mesh_hello()), "MeshHello"),
    ];
    for (frame, name) in cases {
        let mut p = Pair::tunnel(hello(PROTOCOL_VERSION), 10 * MS);
        p.run(Duration::from_secs(1));
        p.acceptor.handle_data(&frame.to_bytes().unwrap(), p.now);
        p.run(Duration::from_secs(2));
        let c = p.acceptor_closed().expect("closed");
        assert_eq!((c.code, c.by), (CloseCode::ProtocolError, By::Local));
        assert!(
            c.reason.contains(name) && c.reason.contains("after Hello"),
            "{}",
            c.reason
        );
        let seen = p.dialer_closed().expect("the dialer got the Goodbye");
        assert_eq!((seen.code, seen.by), (CloseCode::ProtocolError, By::Peer));
    }
    // Before the hello, anything but the hello is unexpected.
    let now = Instant::now();
    let mut a = Control::accept(Link::Tunnel, ControlConfig::EDGE, now, MS);
    a.handle_data(&Frame::Ping(1).to_bytes().unwrap(), now);
    let Some(Event::Closed(c)) = a.poll_event() else {
        panic!("not closed");
    };
    assert!(c.reason.contains("expected Hello"), "{}", c.reason);
}

#[test]
fn a_missed_pong_makes_the_peer_suspect_then_dead() {
    let mut p = Pair::tunnel(hello(PROTOCOL_VERSION), 10 * MS);
    p.run(Duration::from_secs(2));
    // The connector vanishes: nothing it writes arrives any more.
    p.to_acceptor.cut = true;
    p.run(Duration::from_secs(10));
    let suspect_at = p
        .acceptor_events
        .iter()
        .find_map(|(at, e)| {
            matches!(e, Event::Health(liveness::Event::Suspect { .. })).then_some(*at)
        })
        .expect("suspect");
    // The last Pong was for the ping sent at 2.0 s at the latest; suspect
    // within the 250 ms floor of the deadline after the next ping.
    assert!(suspect_at <= Duration::from_millis(2_800), "{suspect_at:?}");
    let c = p.acceptor_closed().expect("closed");
    assert_eq!((c.code, c.by), (CloseCode::Unresponsive, By::Local));
    assert!(c.reason.starts_with("no Pong for 3"), "{}", c.reason);
    assert_eq!(
        count(&p.acceptor_events, |e| matches!(
            e,
            Event::Health(liveness::Event::Dead { .. })
        )),
        1
    );
    // The connector hears why.
    let seen = p
        .dialer_closed()
        .expect("the Goodbye reached the connector");
    assert_eq!((seen.code, seen.by), (CloseCode::Unresponsive, By::Peer));
}

#[test]
fn a_pong_that_comes_late_makes_the_peer_healthy_again() {
    let mut p = Pair::tunnel(hello(PROTOCOL_VERSION), 10 * MS);
    p.run(Duration::from_secs(1));
    // The path slows to 600 ms one way: suspect, but never dead.
    p.one_way = 600 * MS;
    p.run(Duration::from_secs(10));
    assert!(
        count(&p.acceptor_events, |e| matches!(
            e,
            Event::Health(liveness::Event::Suspect { .. })
        )) >= 1
    );
    assert!(
        count(&p.acceptor_events, |e| matches!(
            e,
            Event::Health(liveness::Event::Recovered { .. })
        )) >= 1
    );
    assert!(p.acceptor_closed().is_none(), "{:?}", p.acceptor_closed());
}

#[test]
fn no_hello_or_no_welcome_within_the_handshake_timeout_closes() {
    let now = Instant::now();
    let mut a = Control::accept(Link::Tunnel, ControlConfig::EDGE, now, MS);
    assert_eq!(a.poll_timeout(), Some(now + HANDSHAKE_TIMEOUT));
    a.handle_timeout(now + HANDSHAKE_TIMEOUT - MS);
    assert!(a.poll_event().is_none());
    a.handle_timeout(now + HANDSHAKE_TIMEOUT);
    let Some(Event::Closed(c)) = a.poll_event() else {
        panic!("not closed");
    };
    assert_eq!(c.reason, "no Hello within 10 s");

    let mut d = Control::dial_tunnel(ControlConfig::CONNECTOR, hello(PROTOCOL_VERSION), now);
    d.handle_timeout(now + HANDSHAKE_TIMEOUT);
    let Some(Event::Closed(c)) = d.poll_event() else {
        panic!("not closed");
    };
    assert_eq!(
        (c.code, c.reason.as_str()),
        (CloseCode::ProtocolError, "no Welcome within 10 s")
    );
}

#[test]
fn a_refusal_reaches_the_dialer_with_its_code_and_reason() {
    let mut p = Pair::tunnel(hello(PROTOCOL_VERSION), 10 * MS);
    p.policy = Policy::Refuse(CloseCode::TooManyTunnels, "c-1 already holds 16 tunnels");
    p.run(Duration::from_secs(1));
    let seen = p.dialer_closed().expect("refused");
    assert_eq!((seen.code, seen.by), (CloseCode::TooManyTunnels, By::Peer));
    assert_eq!(seen.reason, "c-1 already holds 16 tunnels");
    assert_eq!(
        count(&p.dialer_events, |e| matches!(e, Event::Welcomed(_))),
        0
    );
}

#[test]
fn a_mesh_link_takes_mesh_hello_and_refuses_a_connector_hello() {
    let mut p = Pair::mesh(30 * MS);
    p.run(Duration::from_secs(3));
    assert!(p.dialer.is_open() && p.acceptor.is_open());
    assert!(matches!(
        p.acceptor_events.first(),
        Some((_, Event::Hello(PeerHello::Edge(h)))) if h.edge_id.as_str() == "e-eu-1"
    ));
    // Both ends of a mesh link are edges, and both judge liveness.
    assert!(count(&p.dialer_events, |e| matches!(e, Event::Rtt(_))) >= 4);
    assert!(count(&p.acceptor_events, |e| matches!(e, Event::Rtt(_))) >= 4);

    let now = Instant::now();
    for (link, frame, want) in [
        (
            Link::Mesh,
            Frame::Hello(hello(PROTOCOL_VERSION)),
            "expected MeshHello",
        ),
        (
            Link::Tunnel,
            Frame::MeshHello(mesh_hello()),
            "expected Hello",
        ),
    ] {
        let mut a = Control::accept(link, ControlConfig::EDGE, now, MS);
        a.handle_data(&frame.to_bytes().unwrap(), now);
        let Some(Event::Closed(c)) = a.poll_event() else {
            panic!("not closed");
        };
        assert_eq!(c.code, CloseCode::ProtocolError);
        assert!(c.reason.contains(want), "{}", c.reason);
    }
}

#[test]
fn garbage_and_a_stream_cut_inside_a_frame_are_protocol_errors() {
    let now = Instant::now();
    let mut a = Control::accept(Link::Tunnel, ControlConfig::EDGE, now, MS);
    a.handle_data(&[0x7f, 0x00], now);
    let Some(Event::Closed(c)) = a.poll_event() else {
        panic!("not closed");
    };
    assert!(c.reason.contains("unknown frame type 0x7f"), "{}", c.reason);
    // Bytes after the close change nothing.
    a.handle_data(&Frame::Ping(1).to_bytes().unwrap(), now);
    assert!(a.poll_event().is_none());

    let mut a = Control::accept(Link::Tunnel, ControlConfig::EDGE, now, MS);
    let bytes = Frame::Hello(hello(PROTOCOL_VERSION)).to_bytes().unwrap();
    a.handle_data(&bytes[..5], now);
    a.handle_finish(now);
    let Some(Event::Closed(c)) = a.poll_event() else {
        panic!("not closed");
    };
    assert_eq!(c.reason, "the control stream ended inside a frame");

    // A clean end after the handshake is the peer's close.
    let mut p = Pair::tunnel(hello(PROTOCOL_VERSION), MS);
    p.run(Duration::from_secs(1));
    p.to_acceptor.finish_at = Some(p.now);
    p.run(Duration::from_secs(2));
    let c = p.acceptor_closed().expect("closed");
    assert_eq!((c.code, c.by), (CloseCode::NoError, By::Peer));
}

#[test]
fn config_changed_reaches_the_dialer() {
    let mut p = Pair::tunnel(hello(PROTOCOL_VERSION), 10 * MS);
    p.run(Duration::from_secs(1));
    p.acceptor.config_changed(42);
    p.run(Duration::from_secs(2));
    assert_eq!(
        count(&p.dialer_events, |e| *e == Event::ConfigChanged(42)),
        1
    );
}

#[test]
fn a_long_reason_is_cut_on_a_character_boundary() {
    let now = Instant::now();
    let mut a = Control::accept(Link::Tunnel, ControlConfig::EDGE, now, MS);
    a.refuse(CloseCode::Internal, &"é".repeat(600));
    let Some(Frame::Goodbye(g)) = a.poll_transmit() else {
        panic!("no Goodbye");
    };
    assert!(g.reason.len() <= MAX_MESSAGE_LEN && g.reason.len() >= MAX_MESSAGE_LEN - 1);
    // It encodes: the peer's limit holds.
    assert!(Frame::Goodbye(g).to_bytes().is_ok());
}

proptest! {
    /// However the bytes are cut and whatever the delay, the handshake,
    /// a drain each way and a goodbye end the same.
    #[test]
    fn the_outcome_does_not_depend_on_how_bytes_arrive(piece in 1usize..64, one_way_ms in 0u32..300) {
        let mut p = Pair::tunnel(hello(PROTOCOL_VERSION), one_way_ms * MS);
        p.piece = piece;
        p.run(Duration::from_secs(2));
        prop_assert!(p.dialer.is_open() && p.acceptor.is_open());
        p.acceptor.drain();
        p.dialer.drain();
        p.run(Duration::from_secs(4));
        prop_assert!(p.dialer.is_peer_draining() && p.acceptor.is_peer_draining());
        p.dialer.goodbye(CloseCode::NoError, "done");
        p.run(Duration::from_secs(6));
        let c = p.acceptor_closed().cloned();
        prop_assert_eq!(c, Some(Closed { code: CloseCode::NoError, reason: "done".into(), by: By::Peer }));
    }
}
