//! ZMQ multipart framing of vLLM's and SGLang's KV-event publisher: pure parsing and building.
//!
//! - live (PUB): `[topic, seq (8 bytes big-endian), payload]`;
//! - replay request (DEALER to the engine's ROUTER): `[b"", start seq (8 bytes BE)]`;
//! - replay replies: `[b"", topic, seq, payload]` since vLLM 0.26 (and SGLang), `[b"", seq, payload]`
//!   before; the end marker has seq `0xFFFF_FFFF_FFFF_FFFF` and an empty payload, in both forms.

use bytes::Bytes;

/// Sequence number of the replay end marker (-1 as a signed 64-bit number).
pub const END_SEQ: u64 = u64::MAX;

/// Why a multipart message was not what the protocol says.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The message does not have the expected number of frames.
    #[error("expected {expected} frames, got {got}")]
    FrameCount {
        /// What the protocol says.
        expected: &'static str,
        /// What arrived.
        got: usize,
    },
    /// The sequence frame is not 8 bytes.
    #[error("sequence frame has {0} bytes, not 8")]
    SeqLength(usize),
}

/// One live message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveMessage {
    /// The publisher's sequence number of this batch.
    pub seq: u64,
    /// msgpack `KVEventBatch`.
    pub payload: Bytes,
}

/// Reads a live message: exactly 3 frames with an 8-byte sequence number.
pub fn parse_live(frames: &[Bytes]) -> Result<LiveMessage, FrameError> {
    match frames {
        [_topic, seq, payload] => Ok(LiveMessage { seq: parse_seq(seq)?, payload: payload.clone() }),
        _ => Err(FrameError::FrameCount { expected: "3", got: frames.len() }),
    }
}

/// One reply of a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayReply {
    /// A buffered batch, byte for byte as it was published live.
    Batch(LiveMessage),
    /// The end marker: nothing more follows.
    End,
}

/// Reads a replay reply, with or without the DEALER's empty delimiter frame, with or without the
/// topic frame (pre-0.26): the sequence and payload are always the last two frames.
pub fn parse_replay_reply(frames: &[Bytes]) -> Result<ReplayReply, FrameError> {
    if !(2..=4).contains(&frames.len()) {
        return Err(FrameError::FrameCount { expected: "2 to 4", got: frames.len() });
    }
    let seq = parse_seq(&frames[frames.len() - 2])?;
    let payload = &frames[frames.len() - 1];
    if seq == END_SEQ {
        return Ok(ReplayReply::End);
    }
    Ok(ReplayReply::Batch(LiveMessage { seq, payload: payload.clone() }))
}

/// The replay request a DEALER sends: the empty delimiter, then the first sequence number wanted.
pub fn replay_request(start: u64) -> Vec<Bytes> {
    vec![Bytes::new(), Bytes::copy_from_slice(&start.to_be_bytes())]
}

fn parse_seq(frame: &[u8]) -> Result<u64, FrameError> {
    let bytes: [u8; 8] = frame.try_into().map_err(|_| FrameError::SeqLength(frame.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(bytes: &[u8]) -> Bytes {
        Bytes::copy_from_slice(bytes)
    }

    #[test]
    fn live_message_needs_three_frames_and_an_8_byte_seq() {
        let seq = 9u64.to_be_bytes();
        let msg = parse_live(&[b(b"kv-events"), b(&seq), b(b"\x90")]).expect("valid live message");
        assert_eq!((msg.seq, &msg.payload[..]), (9, &b"\x90"[..]));
        assert_eq!(parse_live(&[b(&seq), b(b"")]), Err(FrameError::FrameCount { expected: "3", got: 2 }));
        assert_eq!(parse_live(&[b(b""), b(&[0; 4]), b(b"")]), Err(FrameError::SeqLength(4)));
    }

    #[test]
    fn replay_replies_in_every_form() {
        let seq = 3u64.to_be_bytes();
        let end = END_SEQ.to_be_bytes();
        let batch = ReplayReply::Batch(LiveMessage { seq: 3, payload: b(b"p") });
        // As a DEALER receives them (delimiter first), then as the fixtures record them (stripped).
        assert_eq!(parse_replay_reply(&[b(b""), b(b"t"), b(&seq), b(b"p")]), Ok(batch.clone()));
        assert_eq!(parse_replay_reply(&[b(b""), b(&seq), b(b"p")]), Ok(batch.clone()));
        assert_eq!(parse_replay_reply(&[b(&seq), b(b"p")]), Ok(batch));
        assert_eq!(parse_replay_reply(&[b(b""), b(b""), b(&end), b(b"")]), Ok(ReplayReply::End));
        assert_eq!(parse_replay_reply(&[b(b""), b(&end), b(b"")]), Ok(ReplayReply::End));
        assert_eq!(parse_replay_reply(&[b(&end), b(b"")]), Ok(ReplayReply::End));
        assert!(parse_replay_reply(&[b(&seq)]).is_err());
        assert!(parse_replay_reply(&[b(b""), b(b"x"), b(b"p")]).is_err());
    }

    #[test]
    fn replay_request_is_delimiter_then_seq() {
        assert_eq!(replay_request(258), vec![Bytes::new(), b(&[0, 0, 0, 0, 0, 0, 1, 2])]);
    }
}
