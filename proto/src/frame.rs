//! The frames of the tunnel protocol. `proto/FORMAT.md` is the byte-level
//! specification; this module is its implementation.
//!
//! Every frame is `type (u8) | length (varint) | payload`. The control stream
//! carries `Hello` (or, between edges, `MeshHello`), `Welcome`, `Ping`,
//! `Pong`, `Drain`, `ConfigChanged` and `Goodbye`; [`crate::control`] is
//! the state machine that says which may come when. A data stream starts with a `StreamHead` from the edge, answered
//! by a `ResponseHead` or an `Error`; raw body bytes follow both ways.

use std::net::SocketAddr;

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use crate::codec::{
    get_bytes, get_count, get_len, get_socket_addr, get_string, get_utf8, get_varint,
    get_varint_u32, need, put_bytes, put_socket_addr, put_varint,
};
use crate::error::{DecodeError, EncodeError};
use crate::extension::{HeadExtensions, HeadExtensionsRef};
use crate::ids::{AppId, ConnectorId, EdgeId, GroupId, RegionId, RequestId};
use crate::limits::*;

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrameType {
    Hello,
    Welcome,
    Ping,
    Pong,
    Drain,
    ConfigChanged,
    Goodbye,
    MeshHello,
    StreamHead,
    ResponseHead,
    Error,
}

impl FrameType {
    pub fn to_byte(self) -> u8 {
        match self {
            FrameType::Hello => 0x01,
            FrameType::Welcome => 0x02,
            FrameType::Ping => 0x03,
            FrameType::Pong => 0x04,
            FrameType::Drain => 0x05,
            FrameType::ConfigChanged => 0x06,
            FrameType::Goodbye => 0x07,
            FrameType::MeshHello => 0x08,
            FrameType::StreamHead => 0x10,
            FrameType::ResponseHead => 0x11,
            FrameType::Error => 0x12,
        }
    }

    pub fn from_byte(b: u8) -> Result<FrameType, DecodeError> {
        Ok(match b {
            0x01 => FrameType::Hello,
            0x02 => FrameType::Welcome,
            0x03 => FrameType::Ping,
            0x04 => FrameType::Pong,
            0x05 => FrameType::Drain,
            0x06 => FrameType::ConfigChanged,
            0x07 => FrameType::Goodbye,
            0x08 => FrameType::MeshHello,
            0x10 => FrameType::StreamHead,
            0x11 => FrameType::ResponseHead,
            0x12 => FrameType::Error,
            ty => return Err(DecodeError::UnknownFrameType { ty }),
        })
    }

    /// The largest payload this type may carry.
    pub fn max_len(self) -> usize {
        match self {
            FrameType::StreamHead | FrameType::ResponseHead => MAX_HEAD_LEN,
            _ => MAX_CONTROL_LEN,
        }
    }

    /// Whether this frame belongs on the control stream.
    pub fn is_control(self) -> bool {
        !matches!(
            self,
            FrameType::StreamHead | FrameType::ResponseHead | FrameType::Error
        )
    }
}

/// A frame's type and payload length, read before its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub ty: FrameType,
    pub len: usize,
}

impl FrameHeader {
    /// Reads a frame header and checks the length against the type's limit,
    /// before the payload is read or allocated.
    pub fn decode(buf: &mut impl Buf) -> Result<FrameHeader, DecodeError> {
        need(buf, 1)?;
        let ty = FrameType::from_byte(buf.get_u8())?;
        let len = get_varint(buf)?;
        let max = ty.max_len();
        match usize::try_from(len) {
            Ok(len) if len <= max => Ok(FrameHeader { ty, len }),
            _ => Err(DecodeError::FrameTooLarge {
                ty,
                len,
                max: max as u64,
            }),
        }
    }
}

/// A tunnel protocol frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[allow(
    clippy::large_enum_variant,
    reason = "frames are decoded and moved one at a time, never stored in bulk; \
              boxing the head would cost an allocation per request"
)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    /// An opaque value the peer echoes in a `Pong`, for RTT.
    Ping(u64),
    Pong(u64),
    /// No new streams, please; finish what is in flight.
    Drain,
    /// The configuration changed; the new version.
    ConfigChanged(u64),
    Goodbye(Goodbye),
    MeshHello(MeshHello),
    StreamHead(StreamHead),
    ResponseHead(ResponseHead),
    Error(StreamError),
}

/// The connector's first frame on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The protocol version the connector speaks.
    pub version: u32,
    /// Capability bits ([`crate::capabilities`]); unknown bits are ignored.
    pub capabilities: u64,
    pub connector_id: ConnectorId,
    pub group: GroupId,
    /// The connector's software version, for `portico connector list`.
    pub agent_version: String,
}

/// An edge's first frame on the control stream of a mesh link to another
/// edge: `Hello` with the dialing edge's identity instead of a connector's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshHello {
    /// The protocol version the dialing edge speaks.
    pub version: u32,
    /// Capability bits ([`crate::capabilities`]); unknown bits are ignored.
    pub capabilities: u64,
    pub edge_id: EdgeId,
    pub region: RegionId,
    /// The edge's software version.
    pub agent_version: String,
}

/// The answer to `Hello` or `MeshHello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The protocol version chosen for this tunnel.
    pub version: u32,
    pub capabilities: u64,
    pub edge_id: EdgeId,
    pub region: RegionId,
    pub config_version: u64,
}

/// The last frame on a control stream before a close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Goodbye {
    /// A [`crate::CloseCode`] wire value.
    pub code: u64,
    pub reason: String,
}

/// What a data stream carries after its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamKind {
    /// One HTTP request; the request body follows, FIN ends it.
    Http,
    /// An HTTP upgrade to WebSocket; after a `101` the stream is a byte pipe.
    WebSocket,
    /// A raw TCP byte pipe.
    Tcp,
}

impl StreamKind {
    fn to_byte(self) -> u8 {
        match self {
            StreamKind::Http => 0,
            StreamKind::WebSocket => 1,
            StreamKind::Tcp => 2,
        }
    }

    fn from_byte(b: u8) -> Result<StreamKind, DecodeError> {
        match b {
            0 => Ok(StreamKind::Http),
            1 => Ok(StreamKind::WebSocket),
            2 => Ok(StreamKind::Tcp),
            other => Err(DecodeError::ValueOutOfRange {
                field: "kind",
                value: u64::from(other),
            }),
        }
    }
}

/// The first frame of a data stream, written by the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHead {
    pub kind: StreamKind,
    pub request_id: RequestId,
    pub app: AppId,
    pub method: Method,
    /// The external authority (host and optional port) the user asked for,
    /// UTF-8 (checked when decoded). `Bytes`, so that a decoded head points
    /// into the frame it came from instead of copying.
    pub authority: Bytes,
    /// Path and query, as the user sent them; UTF-8, like `authority`.
    pub path: Bytes,
    pub headers: HeaderMap,
    /// The user's address, as the edge saw it.
    pub client_addr: SocketAddr,
    /// The authenticated user, when the app pre-authenticates.
    pub identity: Option<String>,
    /// How long the backend may take to answer, in milliseconds.
    pub timeout_ms: u64,
    /// The extension area (hop count, origin edge, identity claims); empty
    /// when the head had none. `Frame::StreamHead` encodes whatever it
    /// holds; a sender encodes a [`StreamHeadRef`] instead, whose area is
    /// written only for a peer that negotiated it.
    pub ext: HeadExtensions,
}

impl StreamHead {
    /// The head as a [`StreamHeadRef`], to encode it. Fails if
    /// `authority` or `path` is not UTF-8: a decoded head always is, but
    /// one built in code might not be.
    ///
    /// Its extension area is `self.ext` with no say about the peer, so
    /// encoding it fails if `self.ext` has entries: set
    /// `ext = self.ext.borrowed(peer_capabilities)` to carry them.
    pub fn borrowed(&self) -> Result<StreamHeadRef<'_>, EncodeError> {
        let text =
            |bytes, field| std::str::from_utf8(bytes).map_err(|_| EncodeError::NotUtf8 { field });
        Ok(StreamHeadRef {
            kind: self.kind,
            request_id: self.request_id,
            app: self.app.as_str(),
            method: &self.method,
            authority: text(&self.authority, "authority")?,
            path: text(&self.path, "path")?,
            headers: &self.headers,
            client_addr: self.client_addr,
            identity: self.identity.as_deref(),
            timeout_ms: self.timeout_ms,
            ext: self.ext.borrowed(0),
        })
    }
}

/// A [`StreamHead`] to encode, borrowing everything it carries. The edge
/// writes one per request straight from the user's request, without first
/// copying the app id, authority and path into owned fields.
#[derive(Debug, Clone, Copy)]
pub struct StreamHeadRef<'a> {
    pub kind: StreamKind,
    pub request_id: RequestId,
    pub app: &'a str,
    pub method: &'a Method,
    pub authority: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub client_addr: SocketAddr,
    pub identity: Option<&'a str>,
    pub timeout_ms: u64,
    /// The extension area: [`HeadExtensionsRef::NONE`] for none, else
    /// built with [`HeadExtensionsRef::for_peer`] and the capabilities of
    /// the tunnel the head goes to.
    pub ext: HeadExtensionsRef<'a>,
}

impl StreamHeadRef<'_> {
    /// The whole `StreamHead` frame, cut from the same per-thread block as
    /// [`Frame::to_bytes`]; the same limits apply. Fails with
    /// [`EncodeError::ExtensionsNotNegotiated`] if `ext` has entries but was
    /// not made for a peer that negotiated them.
    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        pooled(FrameType::StreamHead, |buf| {
            encode_stream_head(self, &[], buf)
        })
    }
}

/// The connector's answer to a `StreamHead`: the backend's response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// The connector's answer when it could not produce a response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError {
    pub code: crate::ErrorCode,
    pub message: String,
}

/// The size of the blocks that [`Frame::to_bytes`] cuts frames from.
const ENCODE_BLOCK: usize = 16 << 10;
/// A scratch payload buffer that grew past this is not kept.
const MAX_KEPT_SCRATCH: usize = 64 << 10;

thread_local! {
    static ENCODER: std::cell::RefCell<Encoder> = std::cell::RefCell::new(Encoder::default());
}

/// Encodes a frame of type `ty` whose payload `payload` writes, with the
/// per-thread [`Encoder`].
fn pooled(
    ty: FrameType,
    payload: impl FnOnce(&mut Vec<u8>) -> Result<(), EncodeError>,
) -> Result<bytes::Bytes, EncodeError> {
    ENCODER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut encoder) => encoder.encode(ty, payload),
        // Only reachable if encoding re-entered itself; never silently
        // share the buffer.
        Err(_) => Encoder::default().encode(ty, payload),
    })
}

/// The per-thread buffers of [`Frame::to_bytes`].
#[derive(Default)]
struct Encoder {
    payload: Vec<u8>,
    block: bytes::BytesMut,
}

impl Encoder {
    fn encode(
        &mut self,
        ty: FrameType,
        payload: impl FnOnce(&mut Vec<u8>) -> Result<(), EncodeError>,
    ) -> Result<bytes::Bytes, EncodeError> {
        self.payload.clear();
        let built = payload(&mut self.payload);
        let result = built.and_then(|()| {
            let len = self.payload.len();
            if len > ty.max_len() {
                return Err(EncodeError::FrameTooLarge {
                    ty,
                    len,
                    max: ty.max_len(),
                });
            }
            let need = 1 + crate::codec::varint_len(len as u64) + len;
            if self.block.capacity() < need {
                // Reclaims the block in place when no frame cut from it is
                // alive any more; allocates a fresh one otherwise.
                self.block.reserve(need.max(ENCODE_BLOCK));
            }
            self.block.put_u8(ty.to_byte());
            put_varint(&mut self.block, len as u64);
            self.block.put_slice(&self.payload);
            Ok(self.block.split().freeze())
        });
        if self.payload.capacity() > MAX_KEPT_SCRATCH {
            self.payload = Vec::new();
        }
        result
    }
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::Welcome(_) => FrameType::Welcome,
            Frame::Ping(_) => FrameType::Ping,
            Frame::Pong(_) => FrameType::Pong,
            Frame::Drain => FrameType::Drain,
            Frame::ConfigChanged(_) => FrameType::ConfigChanged,
            Frame::Goodbye(_) => FrameType::Goodbye,
            Frame::MeshHello(_) => FrameType::MeshHello,
            Frame::StreamHead(_) => FrameType::StreamHead,
            Frame::ResponseHead(_) => FrameType::ResponseHead,
            Frame::Error(_) => FrameType::Error,
        }
    }

    /// Encodes the frame, header and payload. Fails, writing nothing, if the
    /// frame would break a limit the peer enforces.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), EncodeError> {
        let mut payload = Vec::with_capacity(128);
        self.encode_payload(&mut payload)?;
        let ty = self.frame_type();
        if payload.len() > ty.max_len() {
            return Err(EncodeError::FrameTooLarge {
                ty,
                len: payload.len(),
                max: ty.max_len(),
            });
        }
        buf.put_u8(ty.to_byte());
        put_varint(buf, payload.len() as u64);
        buf.put_slice(&payload);
        Ok(())
    }

    /// Encodes the frame into a fresh buffer.
    ///
    /// The bytes are cut from a per-thread block shared by the frames
    /// encoded after each other (a stream head or a response head is a few
    /// hundred bytes): one allocation serves many frames, and a block whose
    /// frames are all dropped is reused in place. The payload is built in a
    /// per-thread scratch buffer, so encoding allocates nothing once warm.
    pub fn to_bytes(&self) -> Result<bytes::Bytes, EncodeError> {
        pooled(self.frame_type(), |buf| self.encode_payload(buf))
    }

    /// Decodes one whole frame. `UnexpectedEnd` means more bytes are needed.
    pub fn decode(buf: &mut impl Buf) -> Result<Frame, DecodeError> {
        let header = FrameHeader::decode(buf)?;
        need(buf, header.len)?;
        let mut payload = buf.copy_to_bytes(header.len);
        Frame::decode_payload(header.ty, &mut payload)
    }

    /// Decodes a payload whose header was already read. The payload must be
    /// consumed exactly.
    pub fn decode_payload(ty: FrameType, payload: &mut impl Buf) -> Result<Frame, DecodeError> {
        let frame = match ty {
            FrameType::Hello => Frame::Hello(Hello {
                version: get_varint_u32(payload, "version")?,
                capabilities: get_varint(payload)?,
                connector_id: get_id(payload, "connector_id")?,
                group: get_id(payload, "group")?,
                agent_version: get_string(payload, "agent_version", MAX_ID_LEN)?,
            }),
            FrameType::Welcome => Frame::Welcome(Welcome {
                version: get_varint_u32(payload, "version")?,
                capabilities: get_varint(payload)?,
                edge_id: get_id(payload, "edge_id")?,
                region: get_id(payload, "region")?,
                config_version: get_varint(payload)?,
            }),
            FrameType::Ping => {
                need(payload, 8)?;
                Frame::Ping(payload.get_u64())
            }
            FrameType::Pong => {
                need(payload, 8)?;
                Frame::Pong(payload.get_u64())
            }
            FrameType::Drain => Frame::Drain,
            FrameType::ConfigChanged => Frame::ConfigChanged(get_varint(payload)?),
            FrameType::Goodbye => Frame::Goodbye(Goodbye {
                code: get_varint(payload)?,
                reason: get_string(payload, "reason", MAX_MESSAGE_LEN)?,
            }),
            FrameType::MeshHello => Frame::MeshHello(MeshHello {
                version: get_varint_u32(payload, "version")?,
                capabilities: get_varint(payload)?,
                edge_id: get_id(payload, "edge_id")?,
                region: get_id(payload, "region")?,
                agent_version: get_string(payload, "agent_version", MAX_ID_LEN)?,
            }),
            FrameType::StreamHead => Frame::StreamHead(decode_stream_head(payload)?),
            FrameType::ResponseHead => {
                let status = get_varint(payload)?;
                let status = u16::try_from(status)
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .ok_or(DecodeError::ValueOutOfRange {
                        field: "status",
                        value: status,
                    })?;
                Frame::ResponseHead(ResponseHead {
                    status,
                    headers: get_headers(payload)?,
                })
            }
            FrameType::Error => Frame::Error(StreamError {
                code: crate::ErrorCode::from_wire(get_varint(payload)?),
                message: get_string(payload, "message", MAX_MESSAGE_LEN)?,
            }),
        };
        if payload.has_remaining() {
            return Err(DecodeError::TrailingBytes {
                ty,
                extra: payload.remaining(),
            });
        }
        Ok(frame)
    }

    fn encode_payload(&self, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Frame::Hello(h) => {
                put_varint(buf, u64::from(h.version));
                put_varint(buf, h.capabilities & crate::codec::VARINT_MAX);
                put_bytes(buf, h.connector_id.as_str().as_bytes());
                put_bytes(buf, h.group.as_str().as_bytes());
                put_str(buf, "agent_version", &h.agent_version, MAX_ID_LEN)?;
            }
            Frame::Welcome(w) => {
                put_varint(buf, u64::from(w.version));
                put_varint(buf, w.capabilities & crate::codec::VARINT_MAX);
                put_bytes(buf, w.edge_id.as_str().as_bytes());
                put_bytes(buf, w.region.as_str().as_bytes());
                put_varint(buf, w.config_version.min(crate::codec::VARINT_MAX));
            }
            Frame::Ping(v) | Frame::Pong(v) => buf.put_u64(*v),
            Frame::Drain => {}
            Frame::ConfigChanged(v) => put_varint(buf, (*v).min(crate::codec::VARINT_MAX)),
            Frame::Goodbye(g) => {
                put_varint(buf, g.code.min(crate::codec::VARINT_MAX));
                put_str(buf, "reason", &g.reason, MAX_MESSAGE_LEN)?;
            }
            Frame::MeshHello(h) => {
                put_varint(buf, u64::from(h.version));
                put_varint(buf, h.capabilities & crate::codec::VARINT_MAX);
                put_bytes(buf, h.edge_id.as_str().as_bytes());
                put_bytes(buf, h.region.as_str().as_bytes());
                put_str(buf, "agent_version", &h.agent_version, MAX_ID_LEN)?;
            }
            Frame::StreamHead(h) => {
                // The owned form writes what it holds, unknown entries too,
                // so that decode ∘ encode is the identity.
                let mut head = h.borrowed()?;
                head.ext = head.ext.assume_negotiated();
                encode_stream_head(&head, &h.ext.unknown, buf)?
            }
            Frame::ResponseHead(r) => {
                put_varint(buf, u64::from(r.status.as_u16()));
                put_headers(buf, &r.headers)?;
            }
            Frame::Error(e) => {
                put_varint(buf, e.code.to_wire());
                put_str(
                    buf,
                    "message",
                    truncate(&e.message, MAX_MESSAGE_LEN),
                    MAX_MESSAGE_LEN,
                )?;
            }
        }
        Ok(())
    }
}

fn encode_stream_head(
    h: &StreamHeadRef<'_>,
    unknown: &[crate::extension::UnknownExtension],
    buf: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    buf.put_u8(h.kind.to_byte());
    buf.put_u128(h.request_id.0);
    put_str(buf, "app", h.app, MAX_ID_LEN)?;
    put_str(buf, "method", h.method.as_str(), MAX_METHOD_LEN)?;
    put_str(buf, "authority", h.authority, MAX_AUTHORITY_LEN)?;
    put_str(buf, "path", h.path, MAX_PATH_LEN)?;
    put_socket_addr(buf, &h.client_addr);
    put_varint(buf, h.timeout_ms.min(crate::codec::VARINT_MAX));
    match h.identity {
        None => buf.put_u8(0),
        Some(id) => {
            buf.put_u8(1);
            put_str(buf, "identity", id, MAX_IDENTITY_LEN)?;
        }
    }
    put_headers(buf, h.headers)?;
    crate::extension::encode(&h.ext, unknown, buf)
}

fn decode_stream_head(buf: &mut impl Buf) -> Result<StreamHead, DecodeError> {
    need(buf, 1 + 16)?;
    let kind = StreamKind::from_byte(buf.get_u8())?;
    let request_id = RequestId(buf.get_u128());
    let app = get_id(buf, "app")?;
    let method = get_bytes(buf, "method", MAX_METHOD_LEN)?;
    let method =
        Method::from_bytes(&method).map_err(|_| DecodeError::InvalidValue { field: "method" })?;
    let authority = get_utf8(buf, "authority", MAX_AUTHORITY_LEN)?;
    let path = get_utf8(buf, "path", MAX_PATH_LEN)?;
    let client_addr = get_socket_addr(buf)?;
    let timeout_ms = get_varint(buf)?;
    need(buf, 1)?;
    let identity = match buf.get_u8() {
        0 => None,
        1 => Some(get_string(buf, "identity", MAX_IDENTITY_LEN)?),
        other => {
            return Err(DecodeError::ValueOutOfRange {
                field: "identity",
                value: u64::from(other),
            })
        }
    };
    let headers = get_headers(buf)?;
    let ext = crate::extension::decode(buf)?;
    Ok(StreamHead {
        kind,
        request_id,
        app,
        method,
        authority,
        path,
        headers,
        client_addr,
        identity,
        timeout_ms,
        ext,
    })
}

fn put_str(buf: &mut Vec<u8>, field: &'static str, s: &str, max: usize) -> Result<(), EncodeError> {
    if s.len() > max {
        return Err(EncodeError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    put_bytes(buf, s.as_bytes());
    Ok(())
}

/// Cuts a free-text message at a character boundary so that it fits.
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

fn put_headers(buf: &mut Vec<u8>, headers: &HeaderMap) -> Result<(), EncodeError> {
    if headers.len() > MAX_HEADERS {
        return Err(EncodeError::TooMany {
            field: "headers",
            count: headers.len(),
            max: MAX_HEADERS,
        });
    }
    put_varint(buf, headers.len() as u64);
    for (name, value) in headers {
        // Names are at most MAX_HEADER_NAME_LEN by construction of the peer's
        // decoder; check ours too so we never send what it would refuse.
        if name.as_str().len() > MAX_HEADER_NAME_LEN {
            return Err(EncodeError::TooLong {
                field: "header name",
                len: name.as_str().len(),
                max: MAX_HEADER_NAME_LEN,
            });
        }
        if value.len() > MAX_HEADER_VALUE_LEN {
            return Err(EncodeError::TooLong {
                field: "header value",
                len: value.len(),
                max: MAX_HEADER_VALUE_LEN,
            });
        }
        put_bytes(buf, name.as_str().as_bytes());
        put_bytes(buf, value.as_bytes());
    }
    Ok(())
}

/// Room left in a decoded header map for the headers a proxy adds.
const HEADER_HEADROOM: usize = 8;

fn get_headers(buf: &mut impl Buf) -> Result<HeaderMap, DecodeError> {
    let count = get_count(buf, "headers", MAX_HEADERS)?;
    // Each header takes at least two bytes, so `count` is also bounded by
    // what is left; never reserve more than that. The headroom lets the
    // receiver add its own headers (X-Forwarded-*, Host, ...) without the
    // map growing and rehashing on every request.
    let capacity = count.min(buf.remaining() / 2) + HEADER_HEADROOM;
    let mut headers = HeaderMap::with_capacity(capacity);
    for _ in 0..count {
        let name = get_bytes(buf, "header name", MAX_HEADER_NAME_LEN)?;
        let name = HeaderName::from_bytes(&name).map_err(|_| DecodeError::InvalidValue {
            field: "header name",
        })?;
        let value = get_bytes(buf, "header value", MAX_HEADER_VALUE_LEN)?;
        let value =
            HeaderValue::from_maybe_shared(value).map_err(|_| DecodeError::InvalidValue {
                field: "header value",
            })?;
        headers.append(name, value);
    }
    Ok(headers)
}

fn get_id<T>(buf: &mut impl Buf, field: &'static str) -> Result<T, DecodeError>
where
    T: TryFrom<String>,
{
    let len = get_len(buf, field, MAX_ID_LEN)?;
    let bytes = buf.copy_to_bytes(len);
    let s = String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8 { field })?;
    T::try_from(s).map_err(|_| DecodeError::InvalidValue { field })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extension::{IdentityClaims, UnknownExtension};
    use crate::ErrorCode;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv6Addr};

    /// Valid ids: no leading '-', and never `.` or `..` (ids.rs).
    fn id_strategy() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_][A-Za-z0-9._-]{0,39}"
    }

    fn headers_strategy() -> impl Strategy<Value = HeaderMap> {
        prop::collection::vec(("[a-z][a-z0-9-]{0,20}", "[ -~]{0,60}"), 0..20).prop_map(|pairs| {
            let mut map = HeaderMap::new();
            for (n, v) in pairs {
                map.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(&v).unwrap(),
                );
            }
            map
        })
    }

    fn method_strategy() -> impl Strategy<Value = Method> {
        prop_oneof![
            Just(Method::GET),
            Just(Method::POST),
            Just(Method::PUT),
            Just(Method::DELETE),
            "[A-Z]{1,12}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
        ]
    }

    /// Extension areas: empty, or any mix of known and unknown entries.
    fn ext_strategy() -> impl Strategy<Value = HeadExtensions> {
        let claims =
            prop::collection::vec(("[!-~]{1,20}", "[ -~]{0,40}"), 0..8).prop_map(|pairs| {
                let mut claims = IdentityClaims::new();
                for (name, value) in pairs {
                    claims.push(name, value).unwrap();
                }
                claims
            });
        let some = (
            proptest::option::of(any::<u8>()),
            proptest::option::of(id_strategy()),
            proptest::option::of(claims),
            proptest::option::of("[!-~]{1,60}"),
            prop::collection::vec(
                (unknown_type(), prop::collection::vec(any::<u8>(), 0..40)),
                0..4,
            ),
        )
            .prop_map(|(hop_count, origin, identity_claims, assertion, unknown)| {
                HeadExtensions {
                    hop_count,
                    origin_edge: origin.map(|e| EdgeId::new(e).unwrap()),
                    identity_claims,
                    assertion,
                    unknown: unknown
                        .into_iter()
                        .map(|(ty, value)| UnknownExtension::new(ty, value.into()))
                        .collect(),
                }
            });
        prop_oneof![1 => Just(HeadExtensions::default()), 3 => some]
    }

    /// Entry types this build does not know.
    fn unknown_type() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0), 5..64u64, 64..crate::codec::VARINT_MAX]
    }

    /// Heads, with and without an extension area.
    fn head_strategy() -> impl Strategy<Value = StreamHead> {
        (
            (
                any::<u128>(),
                id_strategy(),
                method_strategy(),
                "[a-z0-9.:-]{1,60}",
                "/[ -~]{0,100}",
                headers_strategy(),
            ),
            (
                any::<u128>(),
                any::<u16>(),
                proptest::option::of("[ -~]{0,40}"),
                0..crate::codec::VARINT_MAX,
                0u8..3,
                ext_strategy(),
            ),
        )
            .prop_map(
                |(
                    (rid, app, method, authority, path, headers),
                    (ip, port, identity, timeout_ms, kind, ext),
                )| StreamHead {
                    kind: StreamKind::from_byte(kind).unwrap(),
                    request_id: RequestId(rid),
                    app: AppId::new(app).unwrap(),
                    method,
                    authority: authority.into(),
                    path: path.into(),
                    headers,
                    client_addr: SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port),
                    identity,
                    timeout_ms,
                    ext,
                },
            )
    }

    fn frame_strategy() -> impl Strategy<Value = Frame> {
        let hello = (
            any::<u32>(),
            0..crate::codec::VARINT_MAX,
            id_strategy(),
            id_strategy(),
            "[ -~]{0,30}",
        )
            .prop_map(|(version, capabilities, c, g, agent_version)| {
                Frame::Hello(Hello {
                    version,
                    capabilities,
                    connector_id: ConnectorId::new(c).unwrap(),
                    group: GroupId::new(g).unwrap(),
                    agent_version,
                })
            });
        let welcome = (
            any::<u32>(),
            0..crate::codec::VARINT_MAX,
            id_strategy(),
            id_strategy(),
            0..crate::codec::VARINT_MAX,
        )
            .prop_map(|(version, capabilities, e, r, config_version)| {
                Frame::Welcome(Welcome {
                    version,
                    capabilities,
                    edge_id: EdgeId::new(e).unwrap(),
                    region: RegionId::new(r).unwrap(),
                    config_version,
                })
            });
        let mesh_hello = (
            any::<u32>(),
            0..crate::codec::VARINT_MAX,
            id_strategy(),
            id_strategy(),
            "[ -~]{0,30}",
        )
            .prop_map(|(version, capabilities, e, r, agent_version)| {
                Frame::MeshHello(MeshHello {
                    version,
                    capabilities,
                    edge_id: EdgeId::new(e).unwrap(),
                    region: RegionId::new(r).unwrap(),
                    agent_version,
                })
            });
        let head = head_strategy().prop_map(Frame::StreamHead);
        let response = (100u16..1000, headers_strategy()).prop_map(|(s, headers)| {
            Frame::ResponseHead(ResponseHead {
                status: StatusCode::from_u16(s).unwrap(),
                headers,
            })
        });
        let error = (0usize..ErrorCode::ALL.len(), "[ -~]{0,200}").prop_map(|(i, message)| {
            Frame::Error(StreamError {
                code: ErrorCode::ALL[i],
                message,
            })
        });
        prop_oneof![
            hello,
            welcome,
            mesh_hello,
            any::<u64>().prop_map(Frame::Ping),
            any::<u64>().prop_map(Frame::Pong),
            Just(Frame::Drain),
            (0..crate::codec::VARINT_MAX).prop_map(Frame::ConfigChanged),
            (0..crate::codec::VARINT_MAX, "[ -~]{0,100}")
                .prop_map(|(code, reason)| Frame::Goodbye(Goodbye { code, reason })),
            head,
            response,
            error,
        ]
    }

    proptest! {
        /// decode ∘ encode = id, for every frame type.
        #[test]
        fn every_frame_round_trips(frame in frame_strategy()) {
            let bytes = frame.to_bytes().unwrap();
            let mut slice = &bytes[..];
            let decoded = Frame::decode(&mut slice).unwrap();
            prop_assert_eq!(decoded, frame);
            prop_assert!(slice.is_empty());
        }

        /// Every strict prefix of a frame is `UnexpectedEnd`, never a panic
        /// or a wrong frame.
        #[test]
        fn truncated_frames_are_incomplete(frame in frame_strategy(), cut in any::<prop::sample::Index>()) {
            let bytes = frame.to_bytes().unwrap();
            let cut = cut.index(bytes.len());
            prop_assert_eq!(Frame::decode(&mut &bytes[..cut]), Err(DecodeError::UnexpectedEnd));
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Frame::decode(&mut &bytes[..]);
        }

        /// Entries of unknown types, anywhere in the area and with the
        /// known entries in any order, are skipped: the rest of the head
        /// decodes as sent, and the unknown entries are kept in order.
        #[test]
        fn unknown_extension_entries_are_skipped(
            head in head_strategy(),
            unknown in prop::collection::vec(
                (unknown_type(), prop::collection::vec(any::<u8>(), 0..40), any::<prop::sample::Index>()),
                0..6,
            ),
            reverse_known: bool,
        ) {
            let mut head = head;
            head.ext.unknown.clear();
            let (base, _) = payload_split(&head);
            // One area entry per known entry, as this build writes it,
            // then the unknown ones inserted anywhere.
            let mut entries: Vec<(Vec<u8>, Option<UnknownExtension>)> = Vec::new();
            let ext = &head.ext;
            let only = [
                HeadExtensions { hop_count: ext.hop_count, ..HeadExtensions::default() },
                HeadExtensions { origin_edge: ext.origin_edge.clone(), ..HeadExtensions::default() },
                HeadExtensions { identity_claims: ext.identity_claims.clone(), ..HeadExtensions::default() },
                HeadExtensions { assertion: ext.assertion.clone(), ..HeadExtensions::default() },
            ];
            for one in only.iter().filter(|e| !e.is_empty()) {
                let mut area = Vec::new();
                crate::extension::encode(&one.borrowed(crate::capabilities::ALL), &[], &mut area).unwrap();
                prop_assert_eq!(area[0], 1);
                entries.push((area[1..].to_vec(), None));
            }
            if reverse_known {
                entries.reverse();
            }
            for (ty, value, at) in unknown {
                let mut entry = Vec::new();
                put_varint(&mut entry, ty);
                put_bytes(&mut entry, &value);
                let kept = UnknownExtension::new(ty, value.into());
                entries.insert(at.index(entries.len() + 1), (entry, Some(kept)));
            }
            let mut payload = base;
            if !entries.is_empty() {
                put_varint(&mut payload, entries.len() as u64);
                for (entry, _) in &entries {
                    payload.extend_from_slice(entry);
                }
            }
            let mut want = head.clone();
            want.ext.unknown = entries.into_iter().filter_map(|(_, kept)| kept).collect();
            let decoded = Frame::decode_payload(FrameType::StreamHead, &mut Bytes::from(payload)).unwrap();
            prop_assert_eq!(decoded, Frame::StreamHead(want));
        }

        /// A head cut anywhere inside its extension area is refused; cut
        /// right before the area, it is a head without one (what a build
        /// without the area writes).
        #[test]
        fn truncated_extension_areas_are_refused(head in head_strategy(), cut in any::<prop::sample::Index>()) {
            prop_assume!(!head.ext.is_empty());
            let (base, area) = payload_split(&head);
            let full = [&base[..], &area[..]].concat();
            let cut = base.len() + cut.index(area.len());
            let decoded = Frame::decode_payload(FrameType::StreamHead, &mut Bytes::copy_from_slice(&full[..cut]));
            if cut == base.len() {
                let mut bare = head.clone();
                bare.ext = HeadExtensions::default();
                prop_assert_eq!(decoded, Ok(Frame::StreamHead(bare)));
            } else {
                prop_assert_eq!(decoded, Err(DecodeError::UnexpectedEnd));
            }
        }

        /// Random bytes where the area goes never panic the decoder, and
        /// whatever it accepts encodes and decodes back to the same head.
        #[test]
        fn garbage_extension_areas_never_panic(head in head_strategy(), garbage in prop::collection::vec(any::<u8>(), 1..256)) {
            let (base, _) = payload_split(&head);
            let payload = [&base[..], &garbage[..]].concat();
            if let Ok(frame) = Frame::decode_payload(FrameType::StreamHead, &mut Bytes::from(payload)) {
                let again = Frame::decode(&mut frame.to_bytes().unwrap()).unwrap();
                prop_assert_eq!(again, frame);
            }
        }
    }

    /// A head's payload, split where its extension area starts.
    fn payload_split(head: &StreamHead) -> (Vec<u8>, Vec<u8>) {
        let payload = |h: &StreamHead| {
            let mut buf = Vec::new();
            Frame::StreamHead(h.clone())
                .encode_payload(&mut buf)
                .unwrap();
            buf
        };
        let mut bare = head.clone();
        bare.ext = HeadExtensions::default();
        let (full, base) = (payload(head), payload(&bare));
        assert_eq!(&full[..base.len()], &base[..], "the area comes last");
        (base.clone(), full[base.len()..].to_vec())
    }

    /// The bytes of FORMAT.md: a head without extensions is exactly what a
    /// build without the area writes, and the area follows the headers.
    #[test]
    fn stream_head_wire_bytes() {
        let v1: Vec<u8> = [
            &[0x10, 0x3f][..], // StreamHead, 63 bytes
            &[0],              // kind: HTTP
            &1u128.to_be_bytes(),
            b"\x05hello",
            b"\x03GET",
            b"\x14hello.apps.localhost",
            b"\x01/",
            &[4, 127, 0, 0, 1, 0, 1],  // 127.0.0.1:1
            &[0x80, 0x01, 0x4c, 0x08], // 85,000 ms
            &[0],                      // no identity
            &[0],                      // no headers
        ]
        .concat();
        let head = sample_head();
        assert_eq!(
            &Frame::StreamHead(head.clone()).to_bytes().unwrap()[..],
            &v1[..]
        );
        assert_eq!(&head.borrowed().unwrap().to_bytes().unwrap()[..], &v1[..]);

        let edge = EdgeId::new("edge-1").unwrap();
        let mut claims = IdentityClaims::new();
        claims.push("sub", "42").unwrap();
        claims.push("groups", "hr").unwrap();
        let mut with_ext = head.clone();
        with_ext.ext.hop_count = Some(1);
        with_ext.ext.origin_edge = Some(edge.clone());
        with_ext.ext.identity_claims = Some(claims.clone());
        let area: &[u8] = b"\x03\
            \x01\x01\x01\
            \x02\x06edge-1\
            \x03\x12\x02\x03sub\x0242\x06groups\x02hr";
        // 63 + 32 bytes: the length takes two bytes now.
        let want = [&[0x10, 0x40, 95][..], &v1[2..], area].concat();
        assert_eq!(
            &Frame::StreamHead(with_ext.clone()).to_bytes().unwrap()[..],
            &want[..]
        );

        // The edge's path: borrowed, for a tunnel that negotiated the area.
        let mut borrowed = head.borrowed().unwrap();
        borrowed.ext = HeadExtensionsRef::for_peer(crate::capabilities::ALL)
            .with_hop_count(1)
            .with_origin_edge(&edge)
            .with_identity_claims(&claims);
        assert_eq!(&borrowed.to_bytes().unwrap()[..], &want[..]);
        // For a tunnel that did not, the encode fails rather than send a
        // head the peer would refuse (or drop the claims).
        borrowed.ext = HeadExtensionsRef::for_peer(crate::capabilities::WEBSOCKET)
            .with_identity_claims(&claims);
        assert_eq!(
            borrowed.to_bytes(),
            Err(EncodeError::ExtensionsNotNegotiated)
        );
        // An owned head's entries are carried only once the caller names
        // the peer.
        assert_eq!(
            with_ext.borrowed().unwrap().to_bytes(),
            Err(EncodeError::ExtensionsNotNegotiated)
        );
        let mut forwarded = with_ext.borrowed().unwrap();
        forwarded.ext = with_ext.ext.borrowed(crate::capabilities::ALL);
        assert_eq!(&forwarded.to_bytes().unwrap()[..], &want[..]);
        assert_eq!(
            Frame::decode(&mut &want[..]).unwrap(),
            Frame::StreamHead(with_ext)
        );
    }

    fn sample_head() -> StreamHead {
        StreamHead {
            kind: StreamKind::Http,
            request_id: RequestId(1),
            app: AppId::new("hello").unwrap(),
            method: Method::GET,
            authority: "hello.apps.localhost".into(),
            path: "/".into(),
            headers: HeaderMap::new(),
            client_addr: "127.0.0.1:1".parse().unwrap(),
            identity: None,
            timeout_ms: 85_000,
            ext: HeadExtensions::default(),
        }
    }

    /// `to_bytes` cuts frames from one shared block: each frame is intact
    /// and equal to what `encode` writes, a failed encode leaves nothing
    /// behind, and once every frame of a block is dropped the next frames
    /// reuse that block instead of allocating.
    #[test]
    fn pooled_encoding_matches_encode_and_reuses_its_block() {
        let frames = [
            Frame::StreamHead(sample_head()),
            Frame::Ping(7),
            Frame::Drain,
            Frame::StreamHead(sample_head()),
        ];
        let expected: Vec<Vec<u8>> = frames
            .iter()
            .map(|f| {
                let mut v = Vec::new();
                f.encode(&mut v).unwrap();
                v
            })
            .collect();
        // Run on a fresh thread: its encoder starts empty.
        std::thread::spawn(move || {
            let first: Vec<bytes::Bytes> = frames.iter().map(|f| f.to_bytes().unwrap()).collect();
            for (got, want) in first.iter().zip(&expected) {
                assert_eq!(&got[..], &want[..]);
            }
            // The frames are neighbours in one allocation.
            let end = first[0].as_ptr() as usize + first[0].len();
            assert_eq!(
                first[1].as_ptr() as usize,
                end,
                "one block serves many frames"
            );

            let mut too_many = sample_head();
            for i in 0..200 {
                too_many.headers.append(
                    HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                    HeaderValue::from_static("v"),
                );
            }
            assert!(Frame::StreamHead(too_many).to_bytes().is_err());
            let after_error = frames[1].to_bytes().unwrap();
            assert_eq!(
                &after_error[..],
                &expected[1][..],
                "a failed encode left nothing behind"
            );

            let block_start = first[0].as_ptr();
            let after_end = after_error.as_ptr() as usize + after_error.len();
            drop(first);
            drop(after_error);
            // Encode and drop frames until the block is full. At the first
            // frame that does not follow its predecessor, the block must
            // start over in place: a new block would be allocated while the
            // old one is still held, so it could not have the same address.
            let mut next = after_end;
            for n in 0.. {
                let b = frames[0].to_bytes().unwrap();
                assert_eq!(&b[..], &expected[0][..]);
                if b.as_ptr() as usize != next {
                    assert_eq!(
                        b.as_ptr(),
                        block_start,
                        "a full block with no live frames is reused"
                    );
                    break;
                }
                next = b.as_ptr() as usize + b.len();
                assert!(n < 10_000, "the block never filled");
            }
        })
        .join()
        .unwrap();
    }

    /// The edge encodes heads from borrowed parts; the connector decodes
    /// them into slices of the frame, not copies; text that is not UTF-8 is
    /// refused, naming the field.
    #[test]
    fn borrowed_heads_encode_alike_and_decode_without_copies() {
        let mut head = sample_head();
        head.path = Bytes::from_static(b"/a/b?c=d");
        head.identity = Some("alice@example.com".to_owned());
        head.headers.insert("x-one", HeaderValue::from_static("1"));
        let borrowed = head.borrowed().unwrap().to_bytes().unwrap();
        assert_eq!(
            borrowed,
            Frame::StreamHead(head.clone()).to_bytes().unwrap()
        );
        let mut plain = Vec::new();
        Frame::StreamHead(head.clone()).encode(&mut plain).unwrap();
        assert_eq!(&borrowed[..], &plain[..]);

        let frame = Bytes::from(plain);
        let Frame::StreamHead(decoded) = Frame::decode(&mut frame.clone()).unwrap() else {
            panic!("not a StreamHead");
        };
        assert_eq!(decoded, head);
        let inside = |b: &Bytes| frame.as_ptr_range().contains(&b.as_ptr());
        assert!(inside(&decoded.authority) && inside(&decoded.path));

        // Text that is not UTF-8: the encoder refuses it, and a corrupted
        // frame is refused by the decoder; both name the field.
        let mut odd = head.clone();
        odd.path = Bytes::from_static(b"/\xff");
        assert_eq!(
            Frame::StreamHead(odd).to_bytes(),
            Err(EncodeError::NotUtf8 { field: "path" })
        );
        let at = frame.windows(8).position(|w| w == b"/a/b?c=d").unwrap();
        let mut bad = frame.to_vec();
        bad[at] = 0xff;
        assert_eq!(
            Frame::decode(&mut &bad[..]),
            Err(DecodeError::InvalidUtf8 { field: "path" })
        );
    }

    #[test]
    fn oversized_heads_are_refused_both_ways() {
        // Encoder: 200 headers is more than the limit.
        let mut head = sample_head();
        for i in 0..200 {
            head.headers.append(
                HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        assert!(matches!(
            Frame::StreamHead(head).to_bytes(),
            Err(EncodeError::TooMany {
                field: "headers",
                count: 200,
                ..
            })
        ));
        // Decoder: a header that claims 1 MiB is refused before reading.
        let mut buf = vec![FrameType::StreamHead.to_byte()];
        put_varint(&mut buf, (MAX_HEAD_LEN + 1) as u64);
        assert!(matches!(
            Frame::decode(&mut &buf[..]),
            Err(DecodeError::FrameTooLarge { len, .. }) if len == MAX_HEAD_LEN as u64 + 1
        ));
        // A head whose header count lies is refused, not allocated.
        let mut payload = Vec::new();
        put_varint(&mut payload, 200);
        assert_eq!(
            Frame::decode_payload(
                FrameType::ResponseHead,
                &mut &[&[0x40u8, 200][..], &payload].concat()[..]
            ),
            Err(DecodeError::TooMany {
                field: "headers",
                count: 200,
                max: MAX_HEADERS as u64
            })
        );
    }

    #[test]
    fn unknown_types_and_trailing_bytes_are_errors() {
        assert_eq!(
            Frame::decode(&mut &[0x7fu8, 0][..]),
            Err(DecodeError::UnknownFrameType { ty: 0x7f })
        );
        assert_eq!(
            Frame::decode(&mut &[FrameType::Drain.to_byte(), 1, 0][..]),
            Err(DecodeError::TrailingBytes {
                ty: FrameType::Drain,
                extra: 1
            })
        );
    }

    #[test]
    fn header_injection_is_refused() {
        let mut payload = Vec::new();
        put_varint(&mut payload, 200); // status
        put_varint(&mut payload, 1);
        put_bytes(&mut payload, b"x-a");
        put_bytes(&mut payload, b"ok\r\nset-cookie: evil");
        assert_eq!(
            Frame::decode_payload(FrameType::ResponseHead, &mut &payload[..]),
            Err(DecodeError::InvalidValue {
                field: "header value"
            })
        );
    }
}
