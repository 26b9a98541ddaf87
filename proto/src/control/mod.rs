//! The control protocol, sans-IO: one state machine for both ends of a
//! control stream, on a connector's tunnel to an edge and on an edge's mesh
//! link to another edge.
//!
//! ```text
//!   dialer                                acceptor
//!   Hello | MeshHello   ───────────────▶  (Event::Hello; the driver checks
//!                                          the peer and calls welcome or
//!   (Event::Welcomed)   ◀───────────────   refuse)   Welcome | Goodbye
//!   Ping/Pong, Drain, Goodbye either way; ConfigChanged acceptor → dialer
//! ```
//!
//! The machine takes bytes as they arrive ([`Control::handle_data`], through
//! a [`FrameDecoder`], so the driver may read with a cancel-safe call inside
//! a `select!`), the end of the stream ([`Control::handle_finish`]) and
//! `now` ([`Control::handle_timeout`]); it returns frames to write
//! ([`Control::poll_transmit`]), what happened ([`Control::poll_event`]) and
//! when to wake it ([`Control::poll_timeout`]). It has no clock, no tokio and
//! no sockets: the tests drive both ends against each other on a virtual
//! clock.
//!
//! What it decides:
//! - the handshake: which hello a link expects, version negotiation (a
//!   mismatch is refused with a `Goodbye` that names both versions), the
//!   capabilities both sides share, and a deadline for the hello and the
//!   welcome;
//! - which frame may come when: anything else is a protocol error;
//! - liveness ([`liveness`]): it pings the peer, answers the peer's pings,
//!   and closes a link whose peer stopped answering;
//! - drain from either side, and `Goodbye`.
//!
//! Every close is an [`Event::Closed`], the last event, saying who closed,
//! with which [`CloseCode`] and why. A close by this side queues a
//! `Goodbye` with the same code and reason; the driver writes what is
//! queued, finishes the stream and closes the QUIC connection with that
//! code. What the driver checks itself: the peer's certificate against its
//! hello, and its own limits (tunnels per connector), answered with
//! [`Control::refuse`].

mod decoder;
pub mod liveness;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use decoder::FrameDecoder;
pub use liveness::{Health, LivenessConfig};

use crate::frame::{Frame, FrameType, Goodbye, Hello, MeshHello, Welcome};
use crate::limits::MAX_MESSAGE_LEN;
use crate::{capabilities, negotiate_version, CloseCode, DecodeError, EdgeId, RegionId};

/// How long the acceptor waits for the peer's hello, and the dialer for
/// the welcome.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a control stream connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// A connector's tunnel: the connector dials and says `Hello`, the edge
    /// accepts.
    Tunnel,
    /// An edge's link to another edge: the forwarding edge dials and says
    /// `MeshHello`.
    Mesh,
}

/// Which end of the control stream this machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Opened the stream and says hello first.
    Dialer,
    /// Answers the hello.
    Acceptor,
}

/// Timing of one end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlConfig {
    pub liveness: LivenessConfig,
    pub handshake_timeout: Duration,
}

impl ControlConfig {
    /// An edge's end, of a tunnel or a mesh link: it pings often and takes
    /// a silent peer out of use within about a second
    /// ([`LivenessConfig::DEFAULT`]).
    pub const EDGE: ControlConfig = ControlConfig {
        liveness: LivenessConfig::DEFAULT,
        handshake_timeout: HANDSHAKE_TIMEOUT,
    };

    /// A connector's end: a ping every 10 s for its RTT; the edge judges
    /// liveness, and a link silent for 30 s is closed from this side too.
    pub const CONNECTOR: ControlConfig = ControlConfig {
        liveness: LivenessConfig {
            interval: Duration::from_secs(10),
            dead_after: Duration::from_secs(30),
        },
        handshake_timeout: HANDSHAKE_TIMEOUT,
    };
}

/// The hello an acceptor received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerHello {
    /// From a connector, on a tunnel.
    Connector(Hello),
    /// From an edge, on a mesh link.
    Edge(MeshHello),
}

/// What happened on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// (Acceptor.) The peer said hello in a version this side speaks.
    /// Answer with [`Control::welcome`] or [`Control::refuse`].
    Hello(PeerHello),
    /// (Dialer.) The acceptor welcomed this side; the link is open.
    Welcomed(Welcome),
    /// The peer asks for no new streams on this link; what is in flight
    /// finishes.
    PeerDraining,
    /// (Dialer.) The acceptor's configuration changed to this version.
    ConfigChanged(u64),
    /// A Pong gave this round-trip sample.
    Rtt(Duration),
    /// The peer's health changed (a `Dead` is followed by `Closed`).
    Health(liveness::Event),
    /// The control stream is over; nothing follows.
    Closed(Closed),
}

/// How a control stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub code: CloseCode,
    pub reason: String,
    pub by: By,
}

/// Who ended a control stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    /// This side: a refusal, a protocol error of the peer, a silent peer,
    /// or [`Control::goodbye`].
    Local,
    /// The peer: its `Goodbye`, or the end of its stream.
    Peer,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Dialer: the hello went out at `sent`.
    AwaitWelcome {
        sent: Instant,
        deadline: Instant,
    },
    /// Acceptor: nothing from the peer yet.
    AwaitHello {
        deadline: Instant,
    },
    /// Acceptor: the hello is with the driver.
    Deciding {
        version: u32,
        capabilities: u64,
    },
    Open,
    Closed,
}

/// One end of a control stream.
#[derive(Debug)]
pub struct Control {
    link: Link,
    side: Side,
    config: ControlConfig,
    state: State,
    decoder: FrameDecoder,
    /// Acceptor: the handshake RTT the transport measured, to seed
    /// liveness.
    initial_rtt: Duration,
    liveness: Option<liveness::Liveness>,
    version: u32,
    capabilities: u64,
    draining: bool,
    peer_draining: bool,
    closed: Option<Closed>,
    transmit: VecDeque<Frame>,
    events: VecDeque<Event>,
}

impl Control {
    /// A connector's end of a new tunnel: `hello` goes out first.
    pub fn dial_tunnel(config: ControlConfig, hello: Hello, now: Instant) -> Control {
        Control::dial(Link::Tunnel, config, Frame::Hello(hello), now)
    }

    /// A forwarding edge's end of a new mesh link: `hello` goes out first.
    pub fn dial_mesh(config: ControlConfig, hello: MeshHello, now: Instant) -> Control {
        Control::dial(Link::Mesh, config, Frame::MeshHello(hello), now)
    }

    fn dial(link: Link, config: ControlConfig, hello: Frame, now: Instant) -> Control {
        let mut c = Control::new(
            link,
            Side::Dialer,
            config,
            State::AwaitWelcome {
                sent: now,
                deadline: now + config.handshake_timeout,
            },
            Duration::ZERO,
        );
        c.transmit.push_back(hello);
        c
    }

    /// The accepting end of a new `link`, whose transport handshake
    /// measured `initial_rtt`.
    pub fn accept(
        link: Link,
        config: ControlConfig,
        now: Instant,
        initial_rtt: Duration,
    ) -> Control {
        Control::new(
            link,
            Side::Acceptor,
            config,
            State::AwaitHello {
                deadline: now + config.handshake_timeout,
            },
            initial_rtt,
        )
    }

    fn new(
        link: Link,
        side: Side,
        config: ControlConfig,
        state: State,
        initial_rtt: Duration,
    ) -> Control {
        Control {
            link,
            side,
            config,
            state,
            decoder: FrameDecoder::new(),
            initial_rtt,
            liveness: None,
            version: 0,
            capabilities: 0,
            draining: false,
            peer_draining: false,
            closed: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn link(&self) -> Link {
        self.link
    }

    pub fn side(&self) -> Side {
        self.side
    }

    /// Whether the handshake is done and the link not closed.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open)
    }

    /// How the control stream ended, once it has.
    pub fn closed(&self) -> Option<&Closed> {
        self.closed.as_ref()
    }

    /// The protocol version both sides speak (0 before the handshake).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The capability bits both sides support (0 before the handshake).
    pub fn capabilities(&self) -> u64 {
        self.capabilities
    }

    /// Whether this side asked for a drain.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Whether the peer asked for a drain.
    pub fn is_peer_draining(&self) -> bool {
        self.peer_draining
    }

    /// The peer's health, once the link is open.
    pub fn health(&self) -> Option<Health> {
        self.liveness.as_ref().map(liveness::Liveness::health)
    }

    /// The smoothed RTT of the pings, once the link is open.
    pub fn srtt(&self) -> Option<Duration> {
        self.liveness.as_ref().map(liveness::Liveness::srtt)
    }

    /// Bytes of the control stream arrived.
    pub fn handle_data(&mut self, data: &[u8], now: Instant) {
        if self.closed.is_some() {
            return;
        }
        self.decoder.push(data);
        while self.closed.is_none() {
            match self.decoder.decode() {
                Ok(Some(frame)) => self.handle_frame(frame, now),
                Ok(None) => break,
                Err(e) => self.protocol_error(&e.to_string()),
            }
        }
    }

    /// The peer finished its side of the control stream.
    pub fn handle_finish(&mut self, _now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if self.decoder.is_mid_frame() {
            return self.protocol_error("the control stream ended inside a frame");
        }
        match self.state {
            State::AwaitHello { .. } => self.protocol_error(match self.link {
                Link::Tunnel => "the control stream ended before Hello",
                Link::Mesh => "the control stream ended before MeshHello",
            }),
            State::AwaitWelcome { .. } => self.close_by_peer(
                CloseCode::ProtocolError,
                "the control stream ended before Welcome",
            ),
            State::Deciding { .. } | State::Open => self.close_by_peer(
                CloseCode::NoError,
                "the control stream ended without Goodbye",
            ),
            State::Closed => {}
        }
    }

    /// Does what is due at `now`: pings, and the deadlines of the handshake
    /// and of liveness.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::AwaitHello { deadline } if now >= deadline => {
                let what = match self.link {
                    Link::Tunnel => "Hello",
                    Link::Mesh => "MeshHello",
                };
                let reason = format!(
                    "no {what} within {} s",
                    self.config.handshake_timeout.as_secs()
                );
                self.close_local(CloseCode::ProtocolError, &reason);
            }
            State::AwaitWelcome { deadline, .. } if now >= deadline => {
                let reason = format!(
                    "no Welcome within {} s",
                    self.config.handshake_timeout.as_secs()
                );
                self.close_local(CloseCode::ProtocolError, &reason);
            }
            State::Open => {
                if let Some(live) = &mut self.liveness {
                    live.handle_timeout(now);
                }
                self.pump_liveness();
            }
            _ => {}
        }
    }

    /// When [`Control::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::AwaitHello { deadline } | State::AwaitWelcome { deadline, .. } => Some(deadline),
            State::Open => self
                .liveness
                .as_ref()
                .and_then(liveness::Liveness::poll_timeout),
            State::Deciding { .. } | State::Closed => None,
        }
    }

    /// The next frame to write on the control stream.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    /// The next thing that happened.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// (Acceptor, after [`Event::Hello`].) Welcomes the peer: the link is
    /// open, and the first ping goes out with the `Welcome`.
    pub fn welcome(
        &mut self,
        edge_id: EdgeId,
        region: RegionId,
        config_version: u64,
        now: Instant,
    ) {
        let State::Deciding {
            version,
            capabilities,
        } = self.state
        else {
            return;
        };
        self.transmit.push_back(Frame::Welcome(Welcome {
            version,
            capabilities,
            edge_id,
            region,
            config_version,
        }));
        self.open(version, capabilities, self.initial_rtt, now);
    }

    /// Refuses the peer (typically after [`Event::Hello`]): a `Goodbye`
    /// with `code` and `reason`, and the link is closed.
    pub fn refuse(&mut self, code: CloseCode, reason: &str) {
        self.close_local(code, reason);
    }

    /// Asks the peer to open no new streams on this link. Once only; before
    /// the handshake is done, nothing is sent.
    pub fn drain(&mut self) {
        if self.is_open() && !self.draining {
            self.draining = true;
            self.transmit.push_back(Frame::Drain);
        }
    }

    /// (Acceptor.) Tells the dialer the configuration changed.
    pub fn config_changed(&mut self, version: u64) {
        if self.is_open() && self.side == Side::Acceptor {
            self.transmit.push_back(Frame::ConfigChanged(version));
        }
    }

    /// Ends the link from this side: a `Goodbye` with `code` and `reason`.
    pub fn goodbye(&mut self, code: CloseCode, reason: &str) {
        self.close_local(code, reason);
    }

    fn handle_frame(&mut self, frame: Frame, now: Instant) {
        match (self.state, frame) {
            (State::AwaitHello { .. }, Frame::Hello(h)) if self.link == Link::Tunnel => {
                self.hello(h.version, h.capabilities, PeerHello::Connector(h))
            }
            (State::AwaitHello { .. }, Frame::MeshHello(h)) if self.link == Link::Mesh => {
                self.hello(h.version, h.capabilities, PeerHello::Edge(h))
            }
            (State::AwaitHello { .. }, other) => self.unexpected(
                other.frame_type(),
                match self.link {
                    Link::Tunnel => "control (expected Hello)",
                    Link::Mesh => "control (expected MeshHello)",
                },
            ),
            (State::AwaitWelcome { sent, .. }, Frame::Welcome(w)) => {
                match negotiate_version(w.version) {
                    Err(e) => self.close_local(CloseCode::VersionMismatch, &e.to_string()),
                    Ok(version) => {
                        let caps = w.capabilities & capabilities::ALL;
                        self.events.push_back(Event::Welcomed(w));
                        self.open(version, caps, now.saturating_duration_since(sent), now);
                    }
                }
            }
            (
                State::AwaitWelcome { .. } | State::Deciding { .. } | State::Open,
                Frame::Goodbye(g),
            ) => self.close_by_peer(CloseCode::from_wire(g.code), &g.reason),
            (State::AwaitWelcome { .. }, other) => {
                self.unexpected(other.frame_type(), "control (expected Welcome)")
            }
            (State::Deciding { .. }, other) => {
                self.unexpected(other.frame_type(), "control (before Welcome)")
            }
            (State::Open, Frame::Ping(v)) => self.transmit.push_back(Frame::Pong(v)),
            (State::Open, Frame::Pong(v)) => {
                let rtt = self.liveness.as_mut().and_then(|l| l.handle_pong(v, now));
                if let Some(rtt) = rtt {
                    self.events.push_back(Event::Rtt(rtt));
                }
                self.pump_liveness();
            }
            (State::Open, Frame::Drain) => {
                if !self.peer_draining {
                    self.peer_draining = true;
                    self.events.push_back(Event::PeerDraining);
                }
            }
            (State::Open, Frame::ConfigChanged(v)) if self.side == Side::Dialer => {
                self.events.push_back(Event::ConfigChanged(v))
            }
            (State::Open, other) => self.unexpected(
                other.frame_type(),
                match self.side {
                    Side::Acceptor => "control (after Hello)",
                    Side::Dialer => "control (after Welcome)",
                },
            ),
            (State::Closed, _) => {}
        }
    }

    fn hello(&mut self, version: u32, caps: u64, hello: PeerHello) {
        match negotiate_version(version) {
            Err(e) => self.close_local(CloseCode::VersionMismatch, &e.to_string()),
            Ok(version) => {
                self.state = State::Deciding {
                    version,
                    capabilities: capabilities::ALL & caps,
                };
                self.events.push_back(Event::Hello(hello));
            }
        }
    }

    fn open(&mut self, version: u32, caps: u64, initial_rtt: Duration, now: Instant) {
        self.version = version;
        self.capabilities = caps;
        self.state = State::Open;
        self.liveness = Some(liveness::Liveness::new(
            self.config.liveness,
            now,
            initial_rtt,
        ));
        self.handle_timeout(now);
    }

    /// Moves what liveness wants sent and what it saw into this machine's
    /// queues; a dead peer closes the link.
    fn pump_liveness(&mut self) {
        let Some(live) = &mut self.liveness else {
            return;
        };
        while let Some(v) = live.poll_transmit() {
            self.transmit.push_back(Frame::Ping(v));
        }
        let mut dead = None;
        while let Some(event) = live.poll_event() {
            if let liveness::Event::Dead { silent } = event {
                dead = Some(silent);
            }
            self.events.push_back(Event::Health(event));
        }
        if let Some(silent) = dead {
            let reason = format!("no Pong for {} ms", silent.as_millis());
            self.close_local(CloseCode::Unresponsive, &reason);
        }
    }

    fn unexpected(&mut self, ty: FrameType, context: &'static str) {
        let e = DecodeError::UnexpectedFrame { ty, context };
        self.protocol_error(&e.to_string());
    }

    fn protocol_error(&mut self, reason: &str) {
        self.close_local(CloseCode::ProtocolError, reason);
    }

    fn close_local(&mut self, code: CloseCode, reason: &str) {
        if self.closed.is_some() {
            return;
        }
        let reason = truncate(reason, MAX_MESSAGE_LEN);
        self.transmit.push_back(Frame::Goodbye(Goodbye {
            code: u64::from(code.to_wire()),
            reason: reason.to_owned(),
        }));
        self.finish(Closed {
            code,
            reason: reason.to_owned(),
            by: By::Local,
        });
    }

    fn close_by_peer(&mut self, code: CloseCode, reason: &str) {
        if self.closed.is_some() {
            return;
        }
        self.finish(Closed {
            code,
            reason: reason.to_owned(),
            by: By::Peer,
        });
    }

    fn finish(&mut self, closed: Closed) {
        self.state = State::Closed;
        self.events.push_back(Event::Closed(closed.clone()));
        self.closed = Some(closed);
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests;
