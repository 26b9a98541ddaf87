//! The extension area of a `StreamHead`: typed, length-prefixed entries
//! after the headers, so that the mesh (hop count, origin edge) and sign-in
//! (identity claims) can add to the head without a protocol version bump.
//! `proto/FORMAT.md` ("The extension area") is the byte-level specification.
//!
//! The area is written only to a peer that negotiated
//! [`capabilities::HEAD_EXTENSIONS`](crate::capabilities::HEAD_EXTENSIONS):
//! a decoder without it refuses the head (`TrailingBytes`). The sender says
//! so by building its [`HeadExtensionsRef`] with
//! [`HeadExtensionsRef::for_peer`]; entries set on [`HeadExtensionsRef::NONE`]
//! fail the encode with [`EncodeError::ExtensionsNotNegotiated`] instead of
//! being dropped. A head without entries is byte for byte the head of a
//! build that has no extension area, so every peer accepts it.
//!
//! Decoders skip entry types they do not know and keep their bytes
//! ([`HeadExtensions::unknown`]) for logs; a known entry that appears twice
//! is refused, so that no two readers of one head can disagree on its value.

use bytes::{Buf, Bytes};

use crate::codec::{
    get_bytes, get_count, get_string, get_varint, put_bytes, put_varint, varint_len,
};
use crate::error::{ClaimError, DecodeError, EncodeError};
use crate::ids::EdgeId;
use crate::limits::{
    MAX_ASSERTION_LEN, MAX_CLAIMS, MAX_CLAIM_NAME_LEN, MAX_CLAIM_VALUE_LEN, MAX_EXTENSION_LEN,
    MAX_HEAD_EXTENSIONS,
};

/// Entry type: the number of edge-to-edge (mesh) hops the head has made.
pub const HOP_COUNT: u64 = 0x01;
/// Entry type: the edge that first received the request from the user.
pub const ORIGIN_EDGE: u64 = 0x02;
/// Entry type: the signed-in user's identity claims.
pub const IDENTITY_CLAIMS: u64 = 0x03;
/// Entry type: the edge's signed assertion of the user (a compact JWS),
/// which the connector passes to the backend as `X-Portico-Jwt-Assertion`.
pub const ASSERTION: u64 = 0x04;

/// The extension area of a decoded `StreamHead`. Empty (the default) when
/// the head had no area.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeadExtensions {
    /// The number of mesh hops the head has made: an edge that forwards a
    /// head to another edge sets 1. Absent means 0 (straight from the edge
    /// the user reached).
    pub hop_count: Option<u8>,
    /// The edge the user's request first reached, on a forwarded head.
    pub origin_edge: Option<EdgeId>,
    /// The signed-in user's claims, when the app signs users in.
    pub identity_claims: Option<IdentityClaims>,
    /// The edge's signed assertion of the user: visible ASCII, at most
    /// [`MAX_ASSERTION_LEN`] bytes.
    pub assertion: Option<String>,
    /// Entries of types this build does not know, in the order they came.
    /// They are skipped, not interpreted; [`HeadExtensions::borrowed`]
    /// leaves them out, so an edge passes on only entries it knows.
    pub unknown: Vec<UnknownExtension>,
}

impl HeadExtensions {
    /// Whether the area holds no entry at all.
    pub fn is_empty(&self) -> bool {
        self.hop_count.is_none()
            && self.origin_edge.is_none()
            && self.identity_claims.is_none()
            && self.assertion.is_none()
            && self.unknown.is_empty()
    }

    /// The known entries, to encode them again for a peer that announced
    /// `peer_capabilities` (see [`HeadExtensionsRef::for_peer`]).
    pub fn borrowed(&self, peer_capabilities: u64) -> HeadExtensionsRef<'_> {
        HeadExtensionsRef {
            hop_count: self.hop_count,
            origin_edge: self.origin_edge.as_ref(),
            identity_claims: self.identity_claims.as_ref(),
            assertion: self.assertion.as_deref(),
            ..HeadExtensionsRef::for_peer(peer_capabilities)
        }
    }
}

/// An entry of a type this build does not know: its type and value bytes,
/// as they came (a slice of the frame, not a copy). Only the decoder makes
/// them, so `ty` is never a type this build knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownExtension {
    ty: u64,
    value: Bytes,
}

impl UnknownExtension {
    /// An entry as the decoder would keep it, for tests.
    #[cfg(test)]
    pub(crate) fn new(ty: u64, value: Bytes) -> UnknownExtension {
        assert!(!matches!(
            ty,
            HOP_COUNT | ORIGIN_EDGE | IDENTITY_CLAIMS | ASSERTION
        ));
        UnknownExtension { ty, value }
    }

    /// The entry's type.
    pub fn ty(&self) -> u64 {
        self.ty
    }

    /// The entry's value bytes.
    pub fn value(&self) -> &Bytes {
        &self.value
    }
}

/// The extension area of a `StreamHeadRef` to encode, borrowing what it
/// carries. Made with [`HeadExtensionsRef::NONE`] (nothing to write, for any
/// peer) or [`HeadExtensionsRef::for_peer`].
#[derive(Debug, Clone, Copy)]
pub struct HeadExtensionsRef<'a> {
    /// See [`HeadExtensions::hop_count`].
    pub hop_count: Option<u8>,
    /// See [`HeadExtensions::origin_edge`].
    pub origin_edge: Option<&'a EdgeId>,
    /// See [`HeadExtensions::identity_claims`].
    pub identity_claims: Option<&'a IdentityClaims>,
    /// See [`HeadExtensions::assertion`].
    pub assertion: Option<&'a str>,
    /// Whether the peer negotiated the area; entries are written only then.
    negotiated: bool,
}

impl<'a> HeadExtensionsRef<'a> {
    /// No entries, and no say about the peer: the head goes out without an
    /// area, which every peer accepts. Setting an entry on it makes the
    /// encode fail with [`EncodeError::ExtensionsNotNegotiated`].
    pub const NONE: HeadExtensionsRef<'static> = HeadExtensionsRef {
        hop_count: None,
        origin_edge: None,
        identity_claims: None,
        assertion: None,
        negotiated: false,
    };

    /// No entries yet, for a peer that announced `peer_capabilities` (its
    /// `Hello` or `Welcome`). Entries set on it are written if the peer has
    /// [`HEAD_EXTENSIONS`](crate::capabilities::HEAD_EXTENSIONS); if it
    /// has not, the encode fails with
    /// [`EncodeError::ExtensionsNotNegotiated`] rather than send a head the
    /// peer would refuse, or silently drop, say, the user's claims.
    pub fn for_peer(peer_capabilities: u64) -> HeadExtensionsRef<'a> {
        HeadExtensionsRef {
            negotiated: peer_capabilities & crate::capabilities::HEAD_EXTENSIONS != 0,
            ..HeadExtensionsRef::NONE
        }
    }

    /// Sets the hop count.
    pub fn with_hop_count(self, hops: u8) -> Self {
        HeadExtensionsRef {
            hop_count: Some(hops),
            ..self
        }
    }

    /// Sets the origin edge.
    pub fn with_origin_edge(self, edge: &'a EdgeId) -> Self {
        HeadExtensionsRef {
            origin_edge: Some(edge),
            ..self
        }
    }

    /// Sets the identity claims.
    pub fn with_identity_claims(self, claims: &'a IdentityClaims) -> Self {
        HeadExtensionsRef {
            identity_claims: Some(claims),
            ..self
        }
    }

    /// Sets the assertion; [`is_valid_assertion`] says whether the encode
    /// will take it.
    pub fn with_assertion(self, assertion: &'a str) -> Self {
        HeadExtensionsRef {
            assertion: Some(assertion),
            ..self
        }
    }

    /// Whether no entry is set.
    pub fn is_empty(&self) -> bool {
        self.hop_count.is_none()
            && self.origin_edge.is_none()
            && self.identity_claims.is_none()
            && self.assertion.is_none()
    }

    /// Whether the peer negotiated the area, so entries may be written.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// The same entries, written whatever the peer: for encoding an owned
    /// `Frame::StreamHead`, which writes what it holds.
    pub(crate) fn assume_negotiated(self) -> Self {
        HeadExtensionsRef {
            negotiated: true,
            ..self
        }
    }
}

impl Default for HeadExtensionsRef<'_> {
    fn default() -> Self {
        HeadExtensionsRef::NONE
    }
}

/// A signed-in user's identity claims: name and value pairs in order, as
/// an OpenID Connect ID token or userinfo answer carries them (`sub`,
/// `email`, `name`, ...). A claim with several values (`groups`) is
/// repeated, one pair per value. Claim names are not interpreted here: the
/// sign-in code picks them, and the connector maps them onto headers for
/// header-based SSO, so new claims need no change to the format.
///
/// Always within the limits the decoder enforces: [`IdentityClaims::push`]
/// refuses a claim that would break one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityClaims {
    claims: Vec<(String, String)>,
    /// The encoded size of the entry value, kept within `MAX_EXTENSION_LEN`.
    encoded_len: usize,
}

impl Default for IdentityClaims {
    fn default() -> Self {
        IdentityClaims::new()
    }
}

impl IdentityClaims {
    /// No claims.
    pub fn new() -> Self {
        IdentityClaims {
            claims: Vec::new(),
            encoded_len: varint_len(0),
        }
    }

    /// Appends a claim. A name is 1 to 128 bytes of visible ASCII; a value
    /// is at most 1,024 bytes of UTF-8 without control characters (the
    /// connector may put it in a header); all the claims together encode
    /// to at most 16 KiB.
    pub fn push(
        &mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<(), ClaimError> {
        let (name, value) = (name.into(), value.into());
        check_claim_name(&name)?;
        check_claim_value(&value)?;
        if self.claims.len() >= MAX_CLAIMS {
            return Err(ClaimError::TooMany { max: MAX_CLAIMS });
        }
        let count_len = varint_len(self.claims.len() as u64 + 1);
        let len = self.encoded_len - varint_len(self.claims.len() as u64)
            + count_len
            + string_len(&name)
            + string_len(&value);
        if len > MAX_EXTENSION_LEN {
            return Err(ClaimError::TooLarge {
                len,
                max: MAX_EXTENSION_LEN,
            });
        }
        self.claims.push((name, value));
        self.encoded_len = len;
        Ok(())
    }

    /// Every claim, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.claims.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The first value of the claim `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.claims
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of the claim `name`, in order.
    pub fn get_all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.claims
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The number of claims (pairs).
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// Whether there are no claims.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }
}

/// Writes the area after a head's headers: nothing if there is no entry,
/// else the entries (known ones in type order, then `unknown`).
pub(crate) fn encode(
    ext: &HeadExtensionsRef<'_>,
    unknown: &[UnknownExtension],
    buf: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    if ext.is_empty() && unknown.is_empty() {
        return Ok(());
    }
    if !ext.negotiated {
        return Err(EncodeError::ExtensionsNotNegotiated);
    }
    let known = usize::from(ext.hop_count.is_some())
        + usize::from(ext.origin_edge.is_some())
        + usize::from(ext.identity_claims.is_some())
        + usize::from(ext.assertion.is_some());
    let count = known + unknown.len();
    if count > MAX_HEAD_EXTENSIONS {
        return Err(EncodeError::TooMany {
            field: "extensions",
            count,
            max: MAX_HEAD_EXTENSIONS,
        });
    }
    put_varint(buf, count as u64);
    if let Some(hops) = ext.hop_count {
        put_varint(buf, HOP_COUNT);
        put_varint(buf, varint_len(u64::from(hops)) as u64);
        put_varint(buf, u64::from(hops));
    }
    if let Some(edge) = ext.origin_edge {
        put_varint(buf, ORIGIN_EDGE);
        put_bytes(buf, edge.as_str().as_bytes());
    }
    if let Some(claims) = ext.identity_claims {
        put_varint(buf, IDENTITY_CLAIMS);
        put_varint(buf, claims.encoded_len as u64);
        put_varint(buf, claims.claims.len() as u64);
        for (name, value) in &claims.claims {
            put_bytes(buf, name.as_bytes());
            put_bytes(buf, value.as_bytes());
        }
    }
    if let Some(assertion) = ext.assertion {
        if !is_valid_assertion(assertion) {
            return Err(EncodeError::TooLong {
                field: "assertion",
                len: assertion.len(),
                max: MAX_ASSERTION_LEN,
            });
        }
        put_varint(buf, ASSERTION);
        put_bytes(buf, assertion.as_bytes());
    }
    for entry in unknown {
        put_varint(buf, entry.ty);
        put_bytes(buf, &entry.value);
    }
    Ok(())
}

/// Reads the area: whatever follows a head's headers. No bytes left means
/// no area. The entry count is bounded before the first entry is read, and
/// every value's length before it is read.
pub(crate) fn decode(buf: &mut impl Buf) -> Result<HeadExtensions, DecodeError> {
    let mut ext = HeadExtensions::default();
    if !buf.has_remaining() {
        return Ok(ext);
    }
    let count = get_count(buf, "extensions", MAX_HEAD_EXTENSIONS)?;
    for _ in 0..count {
        let ty = get_varint(buf)?;
        let mut value = get_bytes(buf, "extension", MAX_EXTENSION_LEN)?;
        match ty {
            HOP_COUNT => {
                let hops = get_varint(&mut value)?;
                let hops = u8::try_from(hops).map_err(|_| DecodeError::ValueOutOfRange {
                    field: "hop_count",
                    value: hops,
                })?;
                set_once(&mut ext.hop_count, hops, "hop_count")?;
            }
            ORIGIN_EDGE => {
                let edge = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|s| EdgeId::new(s).ok())
                    .ok_or(DecodeError::InvalidValue {
                        field: "origin_edge",
                    })?;
                value.advance(value.len());
                set_once(&mut ext.origin_edge, edge, "origin_edge")?;
            }
            IDENTITY_CLAIMS => {
                let claims = decode_claims(&mut value)?;
                set_once(&mut ext.identity_claims, claims, "identity_claims")?;
            }
            ASSERTION => {
                let text = std::str::from_utf8(&value)
                    .ok()
                    .filter(|t| is_valid_assertion(t))
                    .ok_or(DecodeError::InvalidValue { field: "assertion" })?
                    .to_owned();
                value.advance(value.len());
                set_once(&mut ext.assertion, text, "assertion")?;
            }
            _ => {
                ext.unknown.push(UnknownExtension { ty, value });
                continue;
            }
        }
        if value.has_remaining() {
            return Err(DecodeError::TrailingExtensionBytes {
                ty,
                extra: value.remaining(),
            });
        }
    }
    Ok(ext)
}

fn decode_claims(buf: &mut Bytes) -> Result<IdentityClaims, DecodeError> {
    let count = get_count(buf, "identity_claims", MAX_CLAIMS)?;
    // Each claim takes at least two bytes: never reserve more than what is
    // left could hold.
    let mut claims = Vec::with_capacity(count.min(buf.remaining() / 2));
    for _ in 0..count {
        let name = get_string(buf, "claim name", MAX_CLAIM_NAME_LEN)?;
        check_claim_name(&name).map_err(|_| DecodeError::InvalidValue {
            field: "claim name",
        })?;
        let value = get_string(buf, "claim value", MAX_CLAIM_VALUE_LEN)?;
        check_claim_value(&value).map_err(|_| DecodeError::InvalidValue {
            field: "claim value",
        })?;
        claims.push((name, value));
    }
    let encoded_len = varint_len(count as u64)
        + claims
            .iter()
            .map(|(n, v)| string_len(n) + string_len(v))
            .sum::<usize>();
    Ok(IdentityClaims {
        claims,
        encoded_len,
    })
}

/// Whether `assertion` may travel in the area: 1 to [`MAX_ASSERTION_LEN`]
/// bytes of visible ASCII (a compact JWS is base64url and dots).
pub fn is_valid_assertion(assertion: &str) -> bool {
    !assertion.is_empty()
        && assertion.len() <= MAX_ASSERTION_LEN
        && assertion.bytes().all(|b| b.is_ascii_graphic())
}

fn set_once<T>(slot: &mut Option<T>, value: T, field: &'static str) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateExtension { field });
    }
    *slot = Some(value);
    Ok(())
}

fn check_claim_name(name: &str) -> Result<(), ClaimError> {
    if name.is_empty() || name.len() > MAX_CLAIM_NAME_LEN {
        return Err(ClaimError::NameLength {
            len: name.len(),
            max: MAX_CLAIM_NAME_LEN,
        });
    }
    if let Some(found) = name.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(ClaimError::NameChar { found });
    }
    Ok(())
}

fn check_claim_value(value: &str) -> Result<(), ClaimError> {
    if value.len() > MAX_CLAIM_VALUE_LEN {
        return Err(ClaimError::ValueTooLong {
            len: value.len(),
            max: MAX_CLAIM_VALUE_LEN,
        });
    }
    if let Some(found) = value.chars().find(|c| c.is_control()) {
        return Err(ClaimError::ValueChar { found });
    }
    Ok(())
}

/// The encoded size of a length-prefixed string.
fn string_len(s: &str) -> usize {
    varint_len(s.len() as u64) + s.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(pairs: &[(&str, &str)]) -> IdentityClaims {
        let mut c = IdentityClaims::new();
        for (n, v) in pairs {
            c.push(*n, *v).unwrap();
        }
        c
    }

    fn encoded(ext: &HeadExtensionsRef<'_>) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(ext, &[], &mut buf).unwrap();
        buf
    }

    fn entry(ty: u64, value: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        put_varint(&mut buf, ty);
        put_bytes(&mut buf, value);
        buf
    }

    fn area(entries: &[Vec<u8>]) -> Bytes {
        let mut buf = Vec::new();
        put_varint(&mut buf, entries.len() as u64);
        for e in entries {
            buf.extend_from_slice(e);
        }
        buf.into()
    }

    #[test]
    fn claims_keep_order_and_repeated_names() {
        let c = claims(&[
            ("sub", "248289761001"),
            ("email", "alice@example.com"),
            ("groups", "hr"),
            ("groups", "staff"),
        ]);
        assert_eq!(c.get("sub"), Some("248289761001"));
        assert_eq!(c.get_all("groups").collect::<Vec<_>>(), ["hr", "staff"]);
        assert_eq!(c.get("name"), None);
        assert_eq!(c.len(), 4);
        let ext = HeadExtensionsRef::for_peer(crate::capabilities::ALL).with_identity_claims(&c);
        let decoded = decode(&mut Bytes::from(encoded(&ext))).unwrap();
        assert_eq!(decoded.identity_claims.as_ref(), Some(&c));
        assert_eq!(
            decoded.identity_claims.unwrap().iter().collect::<Vec<_>>(),
            c.iter().collect::<Vec<_>>()
        );
    }

    /// `push` refuses what the decoder would refuse, and its size
    /// bookkeeping matches what the encoder writes.
    #[test]
    fn claims_are_bounded_when_built() {
        let none = IdentityClaims::default();
        let ext = HeadExtensionsRef::for_peer(crate::capabilities::ALL).with_identity_claims(&none);
        assert_eq!(encoded(&ext), [1, IDENTITY_CLAIMS as u8, 1, 0]);
        assert_eq!(
            decode(&mut Bytes::from(encoded(&ext)))
                .unwrap()
                .identity_claims,
            Some(none)
        );

        let mut c = IdentityClaims::new();
        assert_eq!(
            c.push("", "x"),
            Err(ClaimError::NameLength {
                len: 0,
                max: MAX_CLAIM_NAME_LEN
            })
        );
        assert_eq!(c.push("a b", "x"), Err(ClaimError::NameChar { found: ' ' }));
        assert_eq!(
            c.push("name", "Alice\r\nX-Evil: 1"),
            Err(ClaimError::ValueChar { found: '\r' })
        );
        assert!(matches!(
            c.push("name", "x".repeat(MAX_CLAIM_VALUE_LEN + 1)),
            Err(ClaimError::ValueTooLong { .. })
        ));
        assert!(c.is_empty(), "nothing refused was kept");
        // Values of 1,000 bytes: the 16 KiB total is reached before the
        // claim count is.
        let value = "v".repeat(1000);
        let mut pushed = 0;
        let err = loop {
            match c.push("groups", value.as_str()) {
                Ok(()) => pushed += 1,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, ClaimError::TooLarge { len, max: MAX_EXTENSION_LEN } if len > MAX_EXTENSION_LEN),
            "{err:?}"
        );
        assert_eq!(pushed, c.len());
        let ext = HeadExtensionsRef::for_peer(crate::capabilities::ALL).with_identity_claims(&c);
        let bytes = encoded(&ext);
        // count, type, length, then exactly `encoded_len` bytes of value.
        assert_eq!(
            bytes.len(),
            1 + 1 + varint_len(c.encoded_len as u64) + c.encoded_len
        );
        assert!(c.encoded_len <= MAX_EXTENSION_LEN);
        assert_eq!(
            decode(&mut Bytes::from(bytes)).unwrap().identity_claims,
            Some(c)
        );

        // Many short claims stop at the count limit.
        let mut many = IdentityClaims::new();
        for i in 0..MAX_CLAIMS {
            many.push("g", i.to_string()).unwrap();
        }
        assert_eq!(
            many.push("g", "one more"),
            Err(ClaimError::TooMany { max: MAX_CLAIMS })
        );
    }

    #[test]
    fn an_assertion_round_trips_and_a_bad_one_is_not_encoded() {
        let ext = HeadExtensionsRef::for_peer(crate::capabilities::ALL).with_assertion("e.p.s");
        let bytes = encoded(&ext);
        assert_eq!(bytes, [1, ASSERTION as u8, 5, b'e', b'.', b'p', b'.', b's']);
        let got = decode(&mut &bytes[..]).unwrap();
        assert_eq!(got.assertion.as_deref(), Some("e.p.s"));
        for bad in ["", "a\r\nb", &"x".repeat(MAX_ASSERTION_LEN + 1)] {
            let ext = HeadExtensionsRef::for_peer(crate::capabilities::ALL).with_assertion(bad);
            let mut buf = Vec::new();
            assert!(encode(&ext, &[], &mut buf).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unknown_entries_are_skipped_and_kept() {
        let edge = EdgeId::new("edge-eu-1").unwrap();
        let mut buf = area(&[
            entry(0x7f, b"from the future"),
            entry(HOP_COUNT, &[1]),
            entry(0, b""),
            entry(ORIGIN_EDGE, b"edge-eu-1"),
            entry(crate::codec::VARINT_MAX, &[0xff; 40]),
        ]);
        let ext = decode(&mut buf).unwrap();
        assert!(!buf.has_remaining());
        assert_eq!(ext.hop_count, Some(1));
        assert_eq!(ext.origin_edge.as_ref(), Some(&edge));
        let unknown: Vec<(u64, &[u8])> = ext
            .unknown
            .iter()
            .map(|e| (e.ty(), &e.value()[..]))
            .collect();
        assert_eq!(
            unknown,
            [
                (0x7f, &b"from the future"[..]),
                (0, &b""[..]),
                (crate::codec::VARINT_MAX, &[0xff; 40][..])
            ]
        );
        // Passed on, only the known entries go.
        let again = encoded(&ext.borrowed(crate::capabilities::ALL));
        assert_eq!(
            &again[..],
            &area(&[entry(HOP_COUNT, &[1]), entry(ORIGIN_EDGE, b"edge-eu-1")])[..]
        );
    }

    #[test]
    fn malformed_entries_are_refused() {
        let cases: Vec<(&str, Bytes, DecodeError)> = vec![
            (
                "a count over the limit, before any entry is read",
                {
                    let mut b = Vec::new();
                    put_varint(&mut b, 1 << 40);
                    b.into()
                },
                DecodeError::TooMany {
                    field: "extensions",
                    count: 1 << 40,
                    max: MAX_HEAD_EXTENSIONS as u64,
                },
            ),
            (
                "a value over the limit, before it is read",
                {
                    let mut b = vec![1, 0x3f];
                    put_varint(&mut b, MAX_EXTENSION_LEN as u64 + 1);
                    b.into()
                },
                DecodeError::TooLong {
                    field: "extension",
                    len: MAX_EXTENSION_LEN as u64 + 1,
                    max: MAX_EXTENSION_LEN as u64,
                },
            ),
            (
                "fewer entries than counted",
                {
                    let mut b = area(&[entry(HOP_COUNT, &[1])]).to_vec();
                    b[0] = 2;
                    b.into()
                },
                DecodeError::UnexpectedEnd,
            ),
            (
                "a duplicated known entry",
                area(&[entry(HOP_COUNT, &[1]), entry(HOP_COUNT, &[0])]),
                DecodeError::DuplicateExtension { field: "hop_count" },
            ),
            (
                "a hop count past u8",
                area(&[entry(HOP_COUNT, &[0x41, 0x00])]),
                DecodeError::ValueOutOfRange {
                    field: "hop_count",
                    value: 256,
                },
            ),
            (
                "a known entry with bytes after its value",
                area(&[entry(HOP_COUNT, &[1, 0])]),
                DecodeError::TrailingExtensionBytes {
                    ty: HOP_COUNT,
                    extra: 1,
                },
            ),
            (
                "an empty hop count",
                area(&[entry(HOP_COUNT, &[])]),
                DecodeError::UnexpectedEnd,
            ),
            (
                "an origin edge that is not an id",
                area(&[entry(ORIGIN_EDGE, b"edge/../1")]),
                DecodeError::InvalidValue {
                    field: "origin_edge",
                },
            ),
            (
                "an empty origin edge",
                area(&[entry(ORIGIN_EDGE, b"")]),
                DecodeError::InvalidValue {
                    field: "origin_edge",
                },
            ),
            (
                "a claim count over the limit",
                area(&[entry(IDENTITY_CLAIMS, &[0x41, 0x01])]),
                DecodeError::TooMany {
                    field: "identity_claims",
                    count: 257,
                    max: MAX_CLAIMS as u64,
                },
            ),
            (
                "a claim value with CR LF",
                area(&[entry(IDENTITY_CLAIMS, b"\x01\x04name\x07a\r\nb: c")]),
                DecodeError::InvalidValue {
                    field: "claim value",
                },
            ),
            (
                "a claim value that is not UTF-8",
                area(&[entry(IDENTITY_CLAIMS, b"\x01\x04name\x01\xff")]),
                DecodeError::InvalidUtf8 {
                    field: "claim value",
                },
            ),
            (
                "an empty claim name",
                area(&[entry(IDENTITY_CLAIMS, b"\x01\x00\x01x")]),
                DecodeError::InvalidValue {
                    field: "claim name",
                },
            ),
            (
                "a claim list shorter than counted",
                area(&[entry(IDENTITY_CLAIMS, b"\x02\x03sub\x01x")]),
                DecodeError::UnexpectedEnd,
            ),
            (
                "an assertion with a space",
                area(&[entry(ASSERTION, b"a.b c")]),
                DecodeError::InvalidValue { field: "assertion" },
            ),
            (
                "an empty assertion",
                area(&[entry(ASSERTION, b"")]),
                DecodeError::InvalidValue { field: "assertion" },
            ),
            (
                "two assertions",
                area(&[entry(ASSERTION, b"a.b.c"), entry(ASSERTION, b"a.b.c")]),
                DecodeError::DuplicateExtension { field: "assertion" },
            ),
            (
                "a claim list with bytes after it",
                area(&[entry(IDENTITY_CLAIMS, b"\x01\x03sub\x01xZ")]),
                DecodeError::TrailingExtensionBytes {
                    ty: IDENTITY_CLAIMS,
                    extra: 1,
                },
            ),
        ];
        for (what, mut bytes, want) in cases {
            assert_eq!(decode(&mut bytes), Err(want), "{what}");
        }
    }

    #[test]
    fn entries_need_a_peer_that_negotiated_them() {
        let edge = EdgeId::new("edge-1").unwrap();
        let mut buf = Vec::new();
        // Nothing set: nothing written, whatever the peer.
        encode(&HeadExtensionsRef::NONE, &[], &mut buf).unwrap();
        encode(&HeadExtensionsRef::for_peer(0), &[], &mut buf).unwrap();
        assert!(buf.is_empty());
        // Entries without the peer's say-so are an error, not dropped.
        for ext in [
            HeadExtensionsRef::NONE.with_hop_count(1),
            HeadExtensionsRef::for_peer(crate::capabilities::WEBSOCKET).with_origin_edge(&edge),
        ] {
            assert_eq!(
                encode(&ext, &[], &mut buf),
                Err(EncodeError::ExtensionsNotNegotiated)
            );
            assert!(buf.is_empty(), "a refused area writes nothing");
        }
        let ext = HeadExtensionsRef::for_peer(crate::capabilities::HEAD_EXTENSIONS)
            .with_hop_count(1)
            .with_origin_edge(&edge);
        assert!(ext.negotiated());
        encode(&ext, &[], &mut buf).unwrap();
        assert_eq!(
            &buf[..],
            &area(&[entry(HOP_COUNT, &[1]), entry(ORIGIN_EDGE, b"edge-1")])[..]
        );
    }

    #[test]
    fn too_many_entries_are_not_encoded() {
        let unknown: Vec<UnknownExtension> = (0..MAX_HEAD_EXTENSIONS as u64)
            .map(|i| UnknownExtension::new(0x100 + i, Bytes::new()))
            .collect();
        let mut buf = Vec::new();
        let full = HeadExtensionsRef::NONE.assume_negotiated();
        encode(&full, &unknown, &mut buf).unwrap();
        let decoded = decode(&mut Bytes::from(buf)).unwrap();
        assert_eq!(decoded.unknown, unknown);
        let mut buf = Vec::new();
        assert_eq!(
            encode(&full.with_hop_count(1), &unknown, &mut buf),
            Err(EncodeError::TooMany {
                field: "extensions",
                count: MAX_HEAD_EXTENSIONS + 1,
                max: MAX_HEAD_EXTENSIONS
            })
        );
    }
}
