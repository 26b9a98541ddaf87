//! The router's DNS handler, in process, with messages dig does not send:
//! other opcodes, several questions, a newer EDNS version, a response, a
//! question under the zone's own names. Then a clean stop. The zone itself
//! is unit-tested in `src/dns/tests.rs`; real clients are in the root
//! package's `tests/dns.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use portico_router::Config;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// A hang guard only.
const GUARD: Duration = Duration::from_secs(30);

/// Sends `message` and waits up to `wait` for the answer.
async fn ask(dns: SocketAddr, message: &Message, wait: Duration) -> Option<Message> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(&message.to_vec().unwrap(), dns)
        .await
        .unwrap();
    let mut buf = vec![0; 65_535];
    let (n, _) = tokio::time::timeout(wait, socket.recv_from(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(Message::from_vec(&buf[..n]).unwrap())
}

fn query(id: u16, op_code: OpCode, names: &[&str]) -> Message {
    let mut m = Message::new(id, MessageType::Query, op_code);
    for n in names {
        m.add_query(Query::query(Name::from_ascii(n).unwrap(), RecordType::A));
    }
    m
}

#[tokio::test]
async fn the_dns_handler_answers_what_dig_does_not_ask_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("router");
    let mut config = Config::new(&data);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.dns_listen = Some("127.0.0.1:0".parse().unwrap());
    let shutdown = CancellationToken::new();
    let handle = portico_router::start(config, shutdown.clone())
        .await
        .unwrap();
    let dns = handle.dns_addr.expect("the DNS authority listens");
    assert_eq!(dns.ip().to_string(), "127.0.0.1");
    assert_ne!(dns.port(), 0);
    // TCP listens on the same port.
    tokio::net::TcpStream::connect(dns).await.unwrap();

    let rcode = |m: Option<Message>| m.expect("an answer").metadata.response_code;
    // A plain query, as a baseline: the empty zone's apex.
    let mut soa = query(1, OpCode::Query, &["apps.localhost."]);
    soa.queries[0] = Query::query(
        Name::from_ascii("apps.localhost.").unwrap(),
        RecordType::SOA,
    );
    let answer = ask(dns, &soa, GUARD).await.unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(answer.metadata.authoritative);
    assert_eq!(answer.answers.len(), 1);
    assert_eq!(answer.metadata.id, 1);

    // NOTIFY and STATUS: not implemented.
    for op in [OpCode::Notify, OpCode::Status] {
        let m = query(2, op, &["apps.localhost."]);
        assert_eq!(
            rcode(ask(dns, &m, GUARD).await),
            ResponseCode::NotImp,
            "{op:?}"
        );
    }
    // UPDATE: refused, whatever it asks.
    let m = query(3, OpCode::Update, &["apps.localhost."]);
    assert_eq!(rcode(ask(dns, &m, GUARD).await), ResponseCode::Refused);
    // Two questions, or none: FORMERR.
    let m = query(
        4,
        OpCode::Query,
        &["a.apps.localhost.", "b.apps.localhost."],
    );
    assert_eq!(rcode(ask(dns, &m, GUARD).await), ResponseCode::FormErr);
    let m = query(5, OpCode::Query, &[]);
    assert_eq!(rcode(ask(dns, &m, GUARD).await), ResponseCode::FormErr);
    // EDNS version 1: BADVERS, with an OPT record of version 0.
    let mut m = query(6, OpCode::Query, &["apps.localhost."]);
    let mut edns = Edns::new();
    edns.set_version(1);
    m.set_edns(edns);
    let answer = ask(dns, &m, GUARD).await.unwrap();
    // Extended rcode 16 (its high bits in the OPT record), which hickory
    // decodes as BADSIG: the two share the number (RFC 6891, RFC 8945).
    assert_eq!(
        u16::from(answer.metadata.response_code),
        u16::from(ResponseCode::BADVERS)
    );
    assert_eq!(answer.edns.as_ref().map(Edns::version), Some(0));
    // A response sent as a query is not answered (no reflection).
    let mut m = query(7, OpCode::Query, &["apps.localhost."]);
    m.metadata.message_type = MessageType::Response;
    assert!(ask(dns, &m, Duration::from_millis(500)).await.is_none());
    // The zone's own empty non-terminal: NODATA, not NXDOMAIN.
    let m = query(8, OpCode::Query, &["edge.apps.localhost."]);
    let answer = ask(dns, &m, GUARD).await.unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(answer.answers.is_empty());
    assert_eq!(answer.authorities.len(), 1);
    // ... and the one region of a fresh router, default, has no edge yet.
    let m = query(9, OpCode::Query, &["default.edge.apps.localhost."]);
    let answer = ask(dns, &m, GUARD).await.unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(answer.answers.is_empty());

    // The listeners stop with the router.
    shutdown.cancel();
    tokio::time::timeout(GUARD, handle.wait())
        .await
        .expect("stops within the guard")
        .expect("a clean stop");
    let m = query(10, OpCode::Query, &["apps.localhost."]);
    assert!(ask(dns, &m, Duration::from_millis(500)).await.is_none());
}
