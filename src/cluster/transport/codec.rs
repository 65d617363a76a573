//! The wire codec: every frame is a `u32` big-endian payload length followed by that many bytes
//! of JSON. Requests travel as [`Frame<Request>`], answers as [`Frame<Response>`]; the `id` of
//! an answer repeats the id of the request it answers, so a client may send a request before
//! the answer to the previous one has arrived. With `peerKeyFile`, every frame after the
//! handshake ends with a 32-byte tag inside that length ([`FrameMac`], see
//! [`crate::cluster::auth`]); without it the bytes are exactly those of earlier releases.
//!
//! Why not tokio-util's `LengthDelimitedCodec`: it would put the same bytes on the wire; the
//! reader here is 30 lines, keeps the frame's tag check and decoding in one function
//! ([`decode_payload`], which the property tests drive without a socket), and needs no extra
//! crate.
//!
//! A frame that is too long, truncated or not valid JSON closes that connection (with a log
//! line naming the remote address and peer, its length bounded by [`clip`]), never the process.

use std::io;

use openraft::error::{Fatal, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{SnapshotMeta, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[cfg(doc)]
use crate::cluster::auth::KEYED_VERSION;
use crate::cluster::auth::{BadTag, FrameMac};
use crate::cluster::membership::{Change, ChangeError};
use crate::cluster::types::{Node, NodeId, TypeConfig};

/// Largest accepted frame payload, in bytes.
///
/// The largest legitimate message is an AppendEntries carrying
/// `max_payload_entries` (300) membership entries of a few hundred bytes each,
/// i.e. well under 1 MiB; snapshots here hold only the membership. 4 MiB leaves
/// ample room while bounding what a garbage length prefix can make us allocate.
pub const MAX_FRAME_LENGTH: usize = 4 * 1024 * 1024;

/// A frame: a request or a response with the id that pairs them.
#[derive(Debug, Serialize, Deserialize)]
pub struct Frame<T> {
    /// Request id chosen by the dialing side, echoed in the response.
    pub id: u64,
    /// The message.
    pub body: T,
}

/// Messages sent by the dialing side. `Clone` because a hedged call sends one twice.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Request {
    /// First frame of a connection: protocol check and caller identity.
    Hello {
        /// Must be [`super::handshake::PROTOCOL_MAGIC`].
        magic: String,
        /// Must be [`super::handshake::PROTOCOL_VERSION`] (or [`KEYED_VERSION`] with a key).
        version: u32,
        /// Node id of the caller.
        from: NodeId,
        /// Node id the caller expects to reach.
        to: NodeId,
        /// With a key ([`KEYED_VERSION`]): the caller's fresh nonce, hex. Absent in version 1,
        /// whose frames stay byte for byte what they were.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<String>,
    },
    /// With a key: the caller's proof that it holds an accepted key (see [`crate::cluster::auth`]).
    Auth {
        /// HMAC proof, hex.
        proof: String,
    },
    /// Raft AppendEntries: log replication and heartbeat.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft RequestVote.
    Vote(VoteRequest<NodeId>),
    /// A whole snapshot in one frame (ours are a few hundred bytes).
    FullSnapshot {
        /// Vote of the leader sending it.
        vote: Vote<NodeId>,
        /// Snapshot metadata.
        meta: SnapshotMeta<NodeId, Node>,
        /// Snapshot payload.
        data: Vec<u8>,
    },
    /// Planned leadership transfer: the leader `from` asks the receiver to
    /// start an election at once (see `Cluster::hand_over_and_shutdown`).
    Handover {
        /// The leader that is stepping down.
        from: NodeId,
    },
    /// "Would you vote for me now?" — asked before a follower may stand for election, and
    /// changes nothing on the receiver (see `Cluster` pre-vote guard).
    PreVote {
        /// Index of the asker's last log entry.
        last_log_index: Option<u64>,
    },
    /// A membership change forwarded by a voter to the leader (`kube-vip members add/remove`
    /// run on a follower); sent on a connection of its own, never hedged. The receiver checks
    /// the sender is a voter and the change against [`crate::cluster::membership::Change::check`].
    Members(Change),
}

/// Messages sent back by the listening side.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    /// Hello accepted; carries the listener's node id.
    HelloAck {
        /// Node id of the listener.
        node: NodeId,
        /// With a key: the listener's fresh nonce, hex.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<String>,
        /// With a key: the listener's proof that it holds an accepted key, hex.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proof: Option<String>,
    },
    /// With a key: the caller's proof was accepted; the first authenticated frame.
    AuthOk,
    /// Answer to [`Request::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to [`Request::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to [`Request::FullSnapshot`].
    FullSnapshot(Result<SnapshotResponse<NodeId>, Fatal<NodeId>>),
    /// Answer to [`Request::Handover`]: `Err` says why the election was not started.
    Handover(Result<(), String>),
    /// Answer to [`Request::PreVote`]: whether a real vote would be considered now.
    PreVote(bool),
    /// Answer to [`Request::Members`]: what was done, or why not (and whether to retry).
    Members(Result<String, ChangeError>),
    /// The request was refused; the listener closes the connection after this.
    Error(String),
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The length prefix exceeds [`MAX_FRAME_LENGTH`].
    #[error("frame length {0} exceeds MAX_FRAME_LENGTH ({MAX_FRAME_LENGTH})")]
    TooLarge(u64),
    /// The payload is not a valid message; the decoder's complaint, clipped to
    /// [`MAX_LOGGED_CHARS`] (serde quotes what it could not match, e.g. a 4 MiB variant name).
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// The frame's authentication tag is missing or wrong ([`FrameMac`]).
    #[error(transparent)]
    Auth(#[from] BadTag),
    /// Socket error.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Encodes `msg` as one frame (length prefix + JSON, + tag when `mac` has a key).
pub fn encode_frame<T: Serialize>(msg: &T, mac: &mut FrameMac) -> Result<Vec<u8>, FrameError> {
    let mut payload = Vec::new();
    serde_json::to_writer(&mut payload, msg)
        .map_err(|e| FrameError::Decode(clip(&e.to_string())))?;
    if payload.len() + mac.overhead() > MAX_FRAME_LENGTH {
        return Err(FrameError::TooLarge(payload.len() as u64));
    }
    mac.seal(&mut payload);
    let mut buf = vec![0u8; 4];
    buf.extend_from_slice(&payload);
    let len = buf.len() - 4;
    if len > MAX_FRAME_LENGTH {
        return Err(FrameError::TooLarge(len as u64));
    }
    // Fits: len <= MAX_FRAME_LENGTH < u32::MAX.
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
    mac: &mut FrameMac,
) -> Result<(), FrameError> {
    let buf = encode_frame(msg, mac)?;
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads one frame. `Ok(None)` on a clean end of stream between frames.
///
/// Not cancel-safe: a frame interrupted half-way leaves the stream unusable,
/// so callers that time out a read must drop the connection.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    mac: &mut FrameMac,
) -> Result<Option<T>, FrameError> {
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < len_buf.len() {
        let n = r.read(&mut len_buf[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len_buf);
    if len as usize > MAX_FRAME_LENGTH {
        return Err(FrameError::TooLarge(u64::from(len)));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    decode_payload(&payload, mac).map(Some)
}

/// Checks a frame's tag (if `mac` has a key) and decodes it. Split out so the fuzz test can
/// drive it without a socket.
pub fn decode_payload<T: DeserializeOwned>(
    frame: &[u8],
    mac: &mut FrameMac,
) -> Result<T, FrameError> {
    let payload = mac.open(frame)?;
    serde_json::from_slice(payload).map_err(|e| FrameError::Decode(clip(&e.to_string())))
}

/// Longest text from a peer (or about a peer's frame) that goes into one log line.
pub const MAX_LOGGED_CHARS: usize = 200;

/// `text` cut to [`MAX_LOGGED_CHARS`] characters, saying how long it was: anything a peer
/// controls is clipped before it reaches a log line, so one garbage frame cannot write megabytes.
pub fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_LOGGED_CHARS) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes in all)", &text[..cut], text.len()),
    }
}

impl Request {
    /// The message type, for log lines (never the content: it may be megabytes).
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "Hello",
            Request::Auth { .. } => "Auth",
            Request::AppendEntries(_) => "AppendEntries",
            Request::Vote(_) => "Vote",
            Request::FullSnapshot { .. } => "FullSnapshot",
            Request::Handover { .. } => "Handover",
            Request::PreVote { .. } => "PreVote",
            Request::Members(_) => "Members",
        }
    }
}

impl Response {
    /// The message type, for log lines (never the content: it may be megabytes).
    pub fn kind(&self) -> &'static str {
        match self {
            Response::HelloAck { .. } => "HelloAck",
            Response::AuthOk => "AuthOk",
            Response::AppendEntries(_) => "AppendEntries",
            Response::Vote(_) => "Vote",
            Response::FullSnapshot(_) => "FullSnapshot",
            Response::Handover(_) => "Handover",
            Response::PreVote(_) => "PreVote",
            Response::Members(_) => "Members",
            Response::Error(_) => "Error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn decode(bytes: &[u8]) -> Result<Option<Frame<Request>>, FrameError> {
        let mut r = bytes;
        read_frame(&mut r, &mut FrameMac::none()).await
    }

    #[tokio::test]
    async fn frame_roundtrip() {
        let msg = Frame {
            id: 7,
            body: Request::Handover { from: 42 },
        };
        let bytes = encode_frame(&msg, &mut FrameMac::none()).unwrap();
        assert_eq!(
            u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize,
            bytes.len() - 4
        );
        match decode(&bytes).await.unwrap() {
            Some(Frame {
                id: 7,
                body: Request::Handover { from: 42 },
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn empty_stream_is_clean_eof() {
        assert!(matches!(decode(b"").await, Ok(None)));
    }

    #[tokio::test]
    async fn garbage_payload_is_decode_error() {
        let mut bytes = 5u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"hello");
        assert!(matches!(decode(&bytes).await, Err(FrameError::Decode(_))));
        // Valid JSON, wrong shape.
        let mut bytes = 2u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert!(matches!(decode(&bytes).await, Err(FrameError::Decode(_))));
        // Empty payload.
        assert!(matches!(
            decode(&0u32.to_be_bytes()).await,
            Err(FrameError::Decode(_))
        ));
    }

    #[tokio::test]
    async fn oversize_length_is_rejected_before_reading_payload() {
        let bytes = u32::MAX.to_be_bytes();
        assert!(
            matches!(decode(&bytes).await, Err(FrameError::TooLarge(n)) if n == u64::from(u32::MAX))
        );
        let bytes = ((MAX_FRAME_LENGTH + 1) as u32).to_be_bytes();
        assert!(matches!(decode(&bytes).await, Err(FrameError::TooLarge(_))));
    }

    #[tokio::test]
    async fn truncated_frames() {
        // Inside the length prefix.
        assert!(matches!(decode(&[0, 0]).await, Err(FrameError::Truncated)));
        // Inside the payload.
        let full = encode_frame(
            &Frame {
                id: 1,
                body: Request::Handover { from: 1 },
            },
            &mut FrameMac::none(),
        )
        .unwrap();
        assert!(matches!(
            decode(&full[..full.len() - 1]).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn a_huge_garbage_frame_yields_a_short_error() {
        // serde quotes an unknown variant name in its error: 1 MiB of it must not be logged.
        let payload = format!("{{\"id\":1,\"body\":{{\"{}\":0}}}}", "A".repeat(1 << 20));
        let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(payload.as_bytes());
        let err = decode(&bytes).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.len() < 2 * MAX_LOGGED_CHARS + 100,
            "{} bytes",
            text.len()
        );
        assert!(text.contains("bytes in all"), "{text}");
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn encode_rejects_oversize() {
        let big = Frame {
            id: 1,
            body: Request::FullSnapshot {
                vote: Vote::default(),
                meta: SnapshotMeta::default(),
                data: vec![0u8; MAX_FRAME_LENGTH],
            },
        };
        assert!(matches!(
            encode_frame(&big, &mut FrameMac::none()),
            Err(FrameError::TooLarge(_))
        ));
    }
}
