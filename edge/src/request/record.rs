//! Every request is recorded exactly once: one access-log line and one
//! sample of each request metric, written from [`Record`]'s `Drop`. The
//! record travels with the request: the handler holds it until a response
//! exists, then the response body holds it until the last byte is sent.
//! A request the client cancels (HTTP/2 reset, closed connection, an
//! abandoned HTTP/3 stream) drops its record wherever it is, and is
//! recorded then, as `499 ClientClosed`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, StatusCode, Uri, Version};
use portico_proto::api::App;
use portico_proto::{ErrorCode, RequestId};

use crate::client_conn::{ClientConn, RequestGuard};
use crate::metrics::Metrics;
use crate::request::error::Fault;
use crate::request::upstream::Via;

/// Whether the access log is written (metrics always are).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AccessLog(pub(crate) bool);

/// What the access log and the metrics say about one request.
pub(crate) struct Record {
    metrics: Arc<Metrics>,
    log: AccessLog,
    pub(crate) id: RequestId,
    client: SocketAddr,
    started: Instant,
    method: Method,
    version: Version,
    uri: Uri,
    host: Option<HeaderValue>,
    pub(crate) app: Option<Arc<App>>,
    /// The status sent to the client, once a response head exists.
    status: Option<StatusCode>,
    code: Option<ErrorCode>,
    fault: Option<Fault>,
    /// Request body bytes, counted by the pump task that streams them.
    bytes_in: Option<Arc<AtomicU64>>,
    bytes_out: u64,
    /// The last upstream tried (a reference, not a copy of its ids: the
    /// request path allocates nothing for the log it may not write).
    upstream: Option<Via>,
    attempts: u8,
    /// The response body ran to its end.
    complete: bool,
    /// The request in flight on its connection.
    conn: RequestGuard,
}

impl Record {
    pub(crate) fn new<B>(
        req: &http::Request<B>,
        id: RequestId,
        conn: &Arc<ClientConn>,
        metrics: Arc<Metrics>,
        log: AccessLog,
    ) -> Record {
        let client = conn.addr;
        Record {
            metrics,
            log,
            id,
            client,
            started: Instant::now(),
            method: req.method().clone(),
            version: req.version(),
            uri: req.uri().clone(),
            host: req.headers().get(http::header::HOST).cloned(),
            app: None,
            status: None,
            code: None,
            fault: None,
            bytes_in: None,
            bytes_out: 0,
            upstream: None,
            attempts: 0,
            complete: false,
            conn: conn.request_started(),
        }
    }

    /// The response head that went (or goes) to the client; `code` when it
    /// is an error answer.
    pub(crate) fn responded(
        &mut self,
        status: StatusCode,
        code: Option<ErrorCode>,
        fault: Option<Fault>,
    ) {
        self.status = Some(status);
        self.code = code;
        self.fault = fault;
    }

    /// A failure after the response head, or one that has no response
    /// (the client left, the stream stalled): the code is logged with the
    /// status already sent.
    pub(crate) fn failed(&mut self, code: ErrorCode, fault: Fault) {
        self.code = Some(code);
        self.fault = Some(fault);
    }

    /// The request body's byte counter, shared with the task that pumps it.
    pub(crate) fn bytes_in_counter(&mut self) -> Arc<AtomicU64> {
        Arc::clone(self.bytes_in.get_or_insert_with(Default::default))
    }

    pub(crate) fn add_bytes_out(&mut self, n: u64) {
        self.bytes_out += n;
    }

    /// One more attempt, on this upstream.
    pub(crate) fn attempt(&mut self, via: &Via) {
        self.attempts = self.attempts.saturating_add(1);
        self.upstream = Some(via.clone());
    }

    pub(crate) fn attempts(&self) -> u8 {
        self.attempts
    }

    /// The response body ran to its end: nothing more can go wrong.
    pub(crate) fn complete(&mut self) {
        self.complete = true;
    }

    fn host(&self) -> &str {
        if let Some(a) = self.uri.authority() {
            return a.as_str();
        }
        self.host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        // No response head: the client left before there was one. A head
        // but no end: the client cut the body short (a stall or a failure
        // in the middle records its own code first).
        if self.status.is_none() || (!self.complete && self.code.is_none()) {
            self.code = Some(ErrorCode::ClientClosed);
            self.fault = Some(Fault::Client);
        }
        if self.status.is_none() {
            // Cancelled before its response: charged to the client's
            // budget of such cancels (HTTP/2 rapid reset).
            self.conn.conn.cancelled_early(&self.metrics);
        }
        let status = self.status.unwrap_or(portico_proto::error::CLIENT_CLOSED);
        let code = self.code.map_or("", ErrorCode::as_str);
        let app = self.app.as_ref().map_or("", |a| a.id.as_str());
        let elapsed = self.started.elapsed();
        self.metrics
            .requests
            .with_label_values(&[app, status.as_str(), code])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[app])
            .observe(elapsed.as_secs_f64());
        if !self.log.0 {
            return;
        }
        let bytes_in = self
            .bytes_in
            .as_ref()
            .map_or(0, |b| b.load(Ordering::Relaxed));
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let (tunnel, connector, peer) = match &self.upstream {
            Some(Via::Tunnel(t)) => (Some(t.id.0), Some(t.connector.as_str()), None),
            Some(Via::Mesh(l)) => (None, None, Some(l.peer.as_str())),
            None => (None, None, None),
        };
        tracing::event!(
            target: "portico::access",
            tracing::Level::INFO,
            request.id = %self.id,
            client = %self.client,
            method = %self.method,
            version = ?self.version,
            host = self.host(),
            path,
            app,
            status = status.as_u16(),
            code,
            fault = self.fault.map_or("", Fault::as_str),
            bytes_in,
            bytes_out = self.bytes_out,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            attempts = self.attempts,
            replayed = self.attempts > 1,
            tunnel = tunnel,
            connector = connector,
            peer = peer,
            "request"
        );
    }
}
