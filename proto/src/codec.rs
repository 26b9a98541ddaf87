//! Primitive encoders and bounded decoders: QUIC variable-length integers
//! (RFC 9000 §16), length-prefixed byte strings, and socket addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes};

use crate::error::DecodeError;

/// The largest value a QUIC varint can carry, 2^62 - 1.
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Encodes `v` as a QUIC varint.
///
/// # Panics
/// If `v` exceeds [`VARINT_MAX`]. Callers only pass lengths and values that
/// this crate bounds far below it.
pub fn put_varint(buf: &mut impl BufMut, v: u64) {
    if v < 1 << 6 {
        buf.put_u8(v as u8);
    } else if v < 1 << 14 {
        buf.put_u16(0x4000 | v as u16);
    } else if v < 1 << 30 {
        buf.put_u32(0x8000_0000 | v as u32);
    } else {
        assert!(v <= VARINT_MAX, "varint out of range: {v}");
        buf.put_u64(0xc000_0000_0000_0000 | v);
    }
}

/// The number of bytes [`put_varint`] writes for `v`.
pub fn varint_len(v: u64) -> usize {
    match v {
        0..=63 => 1,
        64..=16_383 => 2,
        16_384..=1_073_741_823 => 4,
        _ => 8,
    }
}

/// The length of a varint, read from its first byte.
pub fn varint_len_from_first(first: u8) -> usize {
    1 << (first >> 6)
}

/// Decodes a QUIC varint.
pub fn get_varint(buf: &mut impl Buf) -> Result<u64, DecodeError> {
    if !buf.has_remaining() {
        return Err(DecodeError::UnexpectedEnd);
    }
    let first = buf.chunk()[0];
    let len = varint_len_from_first(first);
    if buf.remaining() < len {
        return Err(DecodeError::UnexpectedEnd);
    }
    let v = match len {
        1 => u64::from(buf.get_u8()),
        2 => u64::from(buf.get_u16() & 0x3fff),
        4 => u64::from(buf.get_u32() & 0x3fff_ffff),
        _ => buf.get_u64() & 0x3fff_ffff_ffff_ffff,
    };
    Ok(v)
}

/// Decodes a varint that must fit a `u32`.
pub fn get_varint_u32(buf: &mut impl Buf, field: &'static str) -> Result<u32, DecodeError> {
    let v = get_varint(buf)?;
    u32::try_from(v).map_err(|_| DecodeError::ValueOutOfRange { field, value: v })
}

/// Decodes a varint length and checks it against `max` before anything is
/// read or allocated.
pub fn get_len(buf: &mut impl Buf, field: &'static str, max: usize) -> Result<usize, DecodeError> {
    let len = get_varint(buf)?;
    let len_usize = usize::try_from(len).map_err(|_| DecodeError::TooLong {
        field,
        len,
        max: max as u64,
    })?;
    if len_usize > max {
        return Err(DecodeError::TooLong {
            field,
            len,
            max: max as u64,
        });
    }
    if buf.remaining() < len_usize {
        return Err(DecodeError::UnexpectedEnd);
    }
    Ok(len_usize)
}

/// Decodes a varint item count (headers, entries) and checks it against
/// `max` before any item is read or allocated.
pub fn get_count(
    buf: &mut impl Buf,
    field: &'static str,
    max: usize,
) -> Result<usize, DecodeError> {
    let count = get_varint(buf)?;
    match usize::try_from(count) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(DecodeError::TooMany {
            field,
            count,
            max: max as u64,
        }),
    }
}

/// Writes a length-prefixed byte string.
pub fn put_bytes(buf: &mut impl BufMut, bytes: &[u8]) {
    put_varint(buf, bytes.len() as u64);
    buf.put_slice(bytes);
}

/// Reads a length-prefixed byte string of at most `max` bytes.
pub fn get_bytes(
    buf: &mut impl Buf,
    field: &'static str,
    max: usize,
) -> Result<Bytes, DecodeError> {
    let len = get_len(buf, field, max)?;
    Ok(buf.copy_to_bytes(len))
}

/// Reads a length-prefixed UTF-8 string of at most `max` bytes.
pub fn get_string(
    buf: &mut impl Buf,
    field: &'static str,
    max: usize,
) -> Result<String, DecodeError> {
    let bytes = get_bytes(buf, field, max)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8 { field })
}

/// Reads a length-prefixed UTF-8 string of at most `max` bytes, kept as
/// `Bytes`: from a `Bytes` buffer, a slice of it, not a copy.
pub fn get_utf8(buf: &mut impl Buf, field: &'static str, max: usize) -> Result<Bytes, DecodeError> {
    let bytes = get_bytes(buf, field, max)?;
    std::str::from_utf8(&bytes).map_err(|_| DecodeError::InvalidUtf8 { field })?;
    Ok(bytes)
}

/// Writes a socket address: family (4 or 6), address bytes, port (u16).
pub fn put_socket_addr(buf: &mut impl BufMut, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            buf.put_u8(4);
            buf.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            buf.put_u8(6);
            buf.put_slice(&ip.octets());
        }
    }
    buf.put_u16(addr.port());
}

/// Reads a socket address written by [`put_socket_addr`].
pub fn get_socket_addr(buf: &mut impl Buf) -> Result<SocketAddr, DecodeError> {
    need(buf, 1)?;
    let ip = match buf.get_u8() {
        4 => {
            need(buf, 4 + 2)?;
            let mut o = [0u8; 4];
            buf.copy_to_slice(&mut o);
            IpAddr::V4(Ipv4Addr::from(o))
        }
        6 => {
            need(buf, 16 + 2)?;
            let mut o = [0u8; 16];
            buf.copy_to_slice(&mut o);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        family => return Err(DecodeError::InvalidAddressFamily { family }),
    };
    Ok(SocketAddr::new(ip, buf.get_u16()))
}

/// Fails with `UnexpectedEnd` unless `n` bytes remain.
pub fn need(buf: &impl Buf, n: usize) -> Result<(), DecodeError> {
    if buf.remaining() < n {
        Err(DecodeError::UnexpectedEnd)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varint_round_trips(v in 0..=VARINT_MAX) {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            prop_assert_eq!(buf.len(), varint_len(v));
            prop_assert_eq!(varint_len_from_first(buf[0]), buf.len());
            let mut slice = &buf[..];
            prop_assert_eq!(get_varint(&mut slice).unwrap(), v);
            prop_assert!(slice.is_empty());
        }

        #[test]
        fn socket_addr_round_trips(v4: bool, a: u128, port: u16) {
            let addr = if v4 {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a as u32)), port)
            } else {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port)
            };
            let mut buf = Vec::new();
            put_socket_addr(&mut buf, &addr);
            prop_assert_eq!(get_socket_addr(&mut &buf[..]).unwrap(), addr);
        }
    }

    #[test]
    fn rfc9000_examples() {
        // RFC 9000 §A.1 sample varints.
        let cases: [(&[u8], u64); 4] = [
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
        ];
        for (bytes, v) in cases {
            assert_eq!(get_varint(&mut &bytes[..]).unwrap(), v);
        }
    }

    #[test]
    fn lengths_are_bounded_before_reading() {
        let mut buf = Vec::new();
        put_varint(&mut buf, 1 << 40);
        let err = get_bytes(&mut &buf[..], "x", 10).unwrap_err();
        assert!(
            matches!(err, DecodeError::TooLong { field: "x", .. }),
            "{err:?}"
        );
        // A truncated varint is an error, not a panic.
        assert_eq!(
            get_varint(&mut &[0xc0u8, 1][..]),
            Err(DecodeError::UnexpectedEnd)
        );
        assert_eq!(
            get_socket_addr(&mut &[9u8][..]),
            Err(DecodeError::InvalidAddressFamily { family: 9 })
        );
    }
}
