//! A thin async adapter: whole frames over any tokio `AsyncRead` or
//! `AsyncWrite`, such as quinn's `RecvStream`/`SendStream`.
//!
//! The reader never reads past the end of a frame, so the raw body bytes that
//! follow a head on a data stream stay in the stream for the caller.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::varint_len_from_first;
use crate::frame::{Frame, FrameHeader};
use crate::{DecodeError, EncodeError};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    #[error("stream error")]
    Io(#[from] std::io::Error),
    #[error("malformed frame")]
    Decode(#[from] DecodeError),
    #[error("stream ended inside a frame")]
    Truncated,
}

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    #[error("stream error")]
    Io(#[from] std::io::Error),
    #[error("frame refused")]
    Encode(#[from] EncodeError),
}

/// Reads one frame. `Ok(None)` is a clean end of stream before any byte of a
/// frame. The length is checked against the frame type's limit before the
/// payload buffer is allocated.
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<Option<Frame>, ReadError> {
    // Every frame starts with its type and at least one byte of its length:
    // asking for two bytes at once never reads past the frame, and saves a
    // read (on a QUIC stream, a lock of the connection) per frame.
    let mut head = [0u8; 9];
    match r.read(&mut head[..2]).await? {
        0 => return Ok(None),
        1 => read_exact(r, &mut head[1..2]).await?,
        _ => {}
    }
    let varint_len = varint_len_from_first(head[1]);
    read_exact(r, &mut head[2..1 + varint_len]).await?;
    let header = FrameHeader::decode(&mut &head[..1 + varint_len])?;
    let mut payload = vec![0u8; header.len];
    read_exact(r, &mut payload).await?;
    // Decoding from `Bytes` lets header values share the payload buffer
    // instead of each being copied into an allocation of its own.
    let mut payload = bytes::Bytes::from(payload);
    Ok(Some(Frame::decode_payload(header.ty, &mut payload)?))
}

/// Writes one frame. Nothing is written if the frame breaks a limit.
pub async fn write_frame<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    frame: &Frame,
) -> Result<(), WriteError> {
    let bytes = frame.to_bytes()?;
    w.write_all(&bytes).await?;
    Ok(())
}

async fn read_exact<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), ReadError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ReadError::Truncated),
        Err(e) => Err(ReadError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_then_raw_bytes() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, &Frame::Ping(7)).await.unwrap();
        a.write_all(b"raw body").await.unwrap();
        drop(a);
        assert_eq!(read_frame(&mut b).await.unwrap(), Some(Frame::Ping(7)));
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"raw body");
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_reading_it() {
        let (mut a, mut b) = tokio::io::duplex(64);
        // Claims a 1 GiB control frame, then sends nothing more.
        a.write_all(&[0x01, 0xc0, 0, 0, 0, 0x40, 0, 0, 0])
            .await
            .unwrap();
        let err = read_frame(&mut b).await.unwrap_err();
        assert!(
            matches!(err, ReadError::Decode(DecodeError::FrameTooLarge { .. })),
            "{err}"
        );
    }

    /// A reader that hands out one byte per read: the frame boundary must
    /// hold however the bytes arrive.
    struct OneByte<'a>(&'a [u8]);

    impl AsyncRead for OneByte<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if let Some((first, rest)) = self.0.split_first() {
                buf.put_slice(&[*first]);
                self.0 = rest;
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_arriving_a_byte_at_a_time_stop_at_the_boundary() {
        let mut wire = Frame::Ping(300).to_bytes().unwrap().to_vec();
        wire.extend_from_slice(b"rest");
        let mut r = OneByte(&wire);
        assert_eq!(read_frame(&mut r).await.unwrap(), Some(Frame::Ping(300)));
        assert_eq!(r.0, b"rest");
        let mut one = OneByte(&[0x03]);
        assert!(matches!(
            read_frame(&mut one).await,
            Err(ReadError::Truncated)
        ));
        assert_eq!(read_frame(&mut OneByte(&[])).await.unwrap(), None);
    }

    #[tokio::test]
    async fn eof_inside_frame_is_truncated() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0x03, 8, 1, 2]).await.unwrap();
        drop(a);
        assert!(matches!(
            read_frame(&mut b).await,
            Err(ReadError::Truncated)
        ));
    }
}
