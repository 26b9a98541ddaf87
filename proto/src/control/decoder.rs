//! A frame decoder that is fed bytes as they arrive.
//!
//! Reading a frame with an `async fn` that awaits several reads is not
//! cancel safe: dropped in a `select!` between two reads, it loses the
//! bytes it had. This decoder keeps them instead. The caller reads with a
//! cancel-safe call (quinn's `RecvStream::read`), pushes what it got, and
//! takes the complete frames; a partial frame waits in the buffer for the
//! next push.
//!
//! A frame's length is checked against its type's limit as soon as its
//! header is in, so the buffer never holds more than one frame's header
//! and payload (at most [`crate::limits::MAX_HEAD_LEN`] plus 9 bytes)
//! beyond the last push.

use bytes::{Buf, BytesMut};

use crate::codec::varint_len_from_first;
use crate::frame::{Frame, FrameHeader};
use crate::DecodeError;

/// Buffers the bytes of a stream of frames and cuts them into frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
    /// The header of the frame being received, once it is complete.
    header: Option<FrameHeader>,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Appends bytes that arrived. Call [`FrameDecoder::decode`] until it
    /// returns `Ok(None)` after each push.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. An
    /// error is final: the stream is broken from there on.
    pub fn decode(&mut self) -> Result<Option<Frame>, DecodeError> {
        let header = match self.header {
            Some(h) => h,
            None => {
                // Type byte and at least the first byte of the length.
                if self.buf.len() < 2 {
                    return Ok(None);
                }
                let header_len = 1 + varint_len_from_first(self.buf[1]);
                if self.buf.len() < header_len {
                    return Ok(None);
                }
                let header = FrameHeader::decode(&mut &self.buf[..header_len])?;
                self.buf.advance(header_len);
                self.header = Some(header);
                header
            }
        };
        if self.buf.len() < header.len {
            self.buf.reserve(header.len - self.buf.len());
            return Ok(None);
        }
        self.header = None;
        let mut payload = self.buf.split_to(header.len).freeze();
        Frame::decode_payload(header.ty, &mut payload).map(Some)
    }

    /// Whether bytes of an incomplete frame are waiting: a stream that ends
    /// now ends inside a frame.
    pub fn is_mid_frame(&self) -> bool {
        self.header.is_some() || !self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Goodbye;
    use proptest::prelude::*;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Ping(1),
            Frame::Drain,
            Frame::Goodbye(Goodbye {
                code: 0,
                reason: "x".repeat(300),
            }),
            Frame::Pong(u64::MAX),
            Frame::ConfigChanged(1 << 40),
        ]
    }

    proptest! {
        /// However the bytes are cut, the same frames come out, and a cut
        /// never loses a byte.
        #[test]
        fn any_cut_gives_the_same_frames(cuts in proptest::collection::vec(0usize..400, 0..20)) {
            let want = frames();
            let mut bytes = Vec::new();
            for f in &want {
                bytes.extend_from_slice(&f.to_bytes().unwrap());
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            let mut at = 0;
            for cut in cuts {
                d.push(&bytes[at..cut]);
                at = cut;
                while let Some(f) = d.decode().unwrap() {
                    got.push(f);
                }
            }
            prop_assert_eq!(got, want);
            prop_assert!(!d.is_mid_frame());
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_header() {
        let mut d = FrameDecoder::new();
        // A Ping claiming 1 GiB: refused before a byte of payload arrives.
        d.push(&[0x03, 0xc0, 0, 0, 0, 0x40, 0, 0, 0]);
        assert!(matches!(d.decode(), Err(DecodeError::FrameTooLarge { .. })));
    }

    #[test]
    fn a_partial_frame_is_mid_frame() {
        let mut d = FrameDecoder::new();
        let bytes = Frame::Ping(9).to_bytes().unwrap();
        d.push(&bytes[..3]);
        assert_eq!(d.decode(), Ok(None));
        assert!(d.is_mid_frame());
        d.push(&bytes[3..]);
        assert_eq!(d.decode(), Ok(Some(Frame::Ping(9))));
        assert!(!d.is_mid_frame());
    }

    #[test]
    fn an_unknown_type_is_an_error() {
        let mut d = FrameDecoder::new();
        d.push(&[0x7f, 0]);
        assert_eq!(d.decode(), Err(DecodeError::UnknownFrameType { ty: 0x7f }));
    }
}
