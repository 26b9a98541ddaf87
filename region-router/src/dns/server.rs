//! The DNS authority on the network: hickory-server's UDP and TCP
//! listeners in front of a handler that answers from the current
//! [`Zone`], and the task that keeps that zone current.
//!
//! The zone is rebuilt from a fresh [`Snapshot`] of the store on every
//! config version and every [`REBUILD_TICK`]: each edge report updates the
//! edge's `last_seen` in the store without a new version, and the tick is
//! what notices a report arriving or going stale. Nothing comes from this
//! router's memory, so every replica of a replicated store answers alike.
//! A query reads the latest zone without a lock (`ArcSwap`).
//!
//! hickory-server parses each message before the handler sees it: one
//! shorter than a header is dropped, one that does not parse gets FORMERR,
//! and a TCP connection idle for [`TCP_IDLE`] or sending a broken frame is
//! closed. Messages are at most 64 KiB by the framing itself.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::Record;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use prometheus::IntCounterVec;
use tokio::net::{TcpListener, TcpSocket, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::{zone, Note, Origin, Zone};
use crate::api::SharedState;
use crate::error::Error;
use crate::snapshot::{Snapshot, StoreState};

/// How often the zone is rebuilt when nothing else happens: an edge whose
/// report has just gone stale leaves the answers within this.
pub(crate) const REBUILD_TICK: Duration = Duration::from_secs(1);
/// A TCP connection that sends no query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(5);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 16;
/// Attempts at finding a port free for both UDP and TCP (port 0 only).
const BIND_ATTEMPTS: usize = 16;

/// The bound sockets of the authority, UDP and TCP on one port.
pub(crate) struct Sockets {
    udp: UdpSocket,
    tcp: TcpListener,
    pub addr: SocketAddr,
}

/// Binds UDP and TCP at `addr`. With port 0, one port free for both is
/// picked (the UDP port first; TCP may find it taken, and then another is
/// tried).
pub(crate) async fn bind(addr: SocketAddr) -> Result<Sockets, Error> {
    let mut last = None;
    for _ in 0..BIND_ATTEMPTS {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| Error::DnsBind {
                addr,
                transport: "UDP",
                source,
            })?;
        let bound = udp.local_addr().map_err(|source| Error::DnsBind {
            addr,
            transport: "UDP",
            source,
        })?;
        match bind_tcp(bound) {
            Ok(tcp) => {
                return Ok(Sockets {
                    udp,
                    tcp,
                    addr: bound,
                })
            }
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse => {
                last = Some(e);
            }
            Err(source) => {
                return Err(Error::DnsBind {
                    addr: bound,
                    transport: "TCP",
                    source,
                })
            }
        }
    }
    Err(Error::DnsBind {
        addr,
        transport: "TCP",
        source: last.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()),
    })
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Builds the first zone, starts serving it on `sockets`, and keeps it
/// current until `shutdown`.
pub(crate) async fn start(
    sockets: Sockets,
    state: SharedState,
    origin: Origin,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), Error> {
    let store = read_store(&state).await?;
    let mut maintainer = Maintainer {
        state: state.clone(),
        origin,
        store: Arc::new(store),
        logged: HashSet::new(),
    };
    let zone = Arc::new(ArcSwap::from_pointee(maintainer.build()));
    let handler = Handler {
        zone: zone.clone(),
        queries: state.metrics.dns_queries.clone(),
    };
    let mut server = Server::new(handler);
    server.register_socket(sockets.udp);
    server.register_listener(sockets.tcp, TCP_IDLE, TCP_RESPONSE_BUFFER);
    let span = tracing::info_span!("dns", addr = %sockets.addr);
    let stop = shutdown.clone();
    tracker.spawn(
        async move {
            stop.cancelled().await;
            if let Err(e) = server.shutdown_gracefully().await {
                tracing::warn!(error = %portico_agent::error_chain(&e), "DNS listeners stopped with an error");
            }
        }
        .instrument(span.clone()),
    );
    tracker.spawn(maintainer.run(zone, shutdown).instrument(span));
    Ok(())
}

async fn read_store(state: &SharedState) -> Result<StoreState, Error> {
    let store = state.store.clone();
    state
        .tracker
        .spawn_blocking(move || StoreState::read(store.as_ref()))
        .await
        .map_err(|e| Error::Io {
            action: "read the store for",
            path: "the DNS zone".into(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(Error::from)
}

/// Rebuilds the zone as the router's state changes.
struct Maintainer {
    state: SharedState,
    origin: Origin,
    store: Arc<StoreState>,
    /// The notes of the last zone, each logged once when it appeared.
    logged: HashSet<Note>,
}

impl Maintainer {
    async fn run(mut self, zone: Arc<ArcSwap<Zone>>, shutdown: CancellationToken) {
        let mut version = self.state.store.subscribe();
        let mut tick = tokio::time::interval(REBUILD_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = version.changed() => if changed.is_err() { break },
                // Health is the store's (each report's `last_seen`, which
                // moves no version): read it every tick.
                _ = tick.tick() => {}
            }
            match read_store(&self.state).await {
                Ok(store) => self.store = Arc::new(store),
                Err(e) => {
                    // The last state is judged on (its reports age, and a
                    // region whose edges all go stale fails open); the
                    // store is tried again at the next tick.
                    tracing::warn!(error = %portico_agent::error_chain(&e), "cannot read the store; the DNS zone keeps its last apps and edges");
                }
            }
            zone.store(Arc::new(self.build()));
        }
        tracing::debug!("DNS zone no longer maintained");
    }

    /// The zone of the current state; logs the notes that are new.
    fn build(&mut self) -> Zone {
        let snapshot = Snapshot {
            store: self.store.clone(),
            at: self.state.at(),
        };
        let zone = zone(&snapshot, &self.origin);
        let current: HashSet<Note> = zone.notes.iter().cloned().collect();
        for note in current.difference(&self.logged) {
            tracing::warn!("{note}");
        }
        self.logged = current;
        zone
    }
}

/// Answers queries from the current zone.
struct Handler {
    zone: Arc<ArcSwap<Zone>>,
    queries: IntCounterVec,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        // EDNS as hickory's own catalog does it: version 0, and the
        // client's payload size (at least 512) for UDP truncation.
        let mut edns = None;
        let response_edns;
        if let Some(asked) = request.edns.as_ref() {
            let mut e = Edns::new();
            e.set_max_payload(asked.max_payload().max(512));
            e.set_version(0);
            response_edns = e;
            edns = Some(&response_edns);
            if asked.version() > 0 {
                return self
                    .error(request, ResponseCode::BADVERS, edns, response_handle)
                    .await;
            }
        }
        match request.metadata.op_code {
            OpCode::Query => {}
            // The zone is computed, never written: no dynamic UPDATE.
            OpCode::Update => {
                return self
                    .error(request, ResponseCode::Refused, edns, response_handle)
                    .await
            }
            _ => {
                return self
                    .error(request, ResponseCode::NotImp, edns, response_handle)
                    .await
            }
        }
        let Ok(info) = request.request_info() else {
            // Not exactly one question.
            return self
                .error(request, ResponseCode::FormErr, edns, response_handle)
                .await;
        };
        let zone = self.zone.load();
        let query = info.query;
        let answer = zone.answer(query.name(), query.query_type(), query.query_class());
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = answer.authoritative;
        metadata.response_code = answer.rcode;
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = edns {
            builder.edns(e);
        }
        let response = builder.build(
            metadata,
            answer.answers.iter().map(|r| r.as_ref()),
            answer.authorities.iter().copied(),
            std::iter::empty::<&Record>(),
            std::iter::empty::<&Record>(),
        );
        self.send(response_handle, response, answer.rcode, &request.metadata)
            .await
    }
}

impl Handler {
    async fn error<R: ResponseHandler>(
        &self,
        request: &Request,
        rcode: ResponseCode,
        edns: Option<&Edns>,
        response_handle: R,
    ) -> ResponseInfo {
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = edns {
            builder.edns(e);
        }
        let response = builder.error_msg(&request.metadata, rcode);
        self.send(response_handle, response, rcode, &request.metadata)
            .await
    }

    async fn send<'a, R: ResponseHandler>(
        &self,
        mut response_handle: R,
        response: hickory_server::zone_handler::MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
        rcode: ResponseCode,
        request: &Metadata,
    ) -> ResponseInfo {
        match response_handle.send_response(response).await {
            Ok(info) => {
                self.queries
                    .with_label_values(&[rcode_label(info.response_code)])
                    .inc();
                info
            }
            Err(e) => {
                tracing::debug!(error = %e, rcode = %rcode, "cannot send a DNS response");
                self.queries.with_label_values(&["unsent"]).inc();
                let mut metadata = Metadata::response_from_request(request);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// The `rcode` label of `portico_router_dns_queries_total`.
fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "noerror",
        ResponseCode::NXDomain => "nxdomain",
        ResponseCode::Refused => "refused",
        ResponseCode::FormErr => "formerr",
        ResponseCode::NotImp => "notimp",
        ResponseCode::ServFail => "servfail",
        ResponseCode::BADVERS => "badvers",
        _ => "other",
    }
}
