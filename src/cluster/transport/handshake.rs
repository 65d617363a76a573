//! The handshake: the first frame on a connection is [`Request::Hello`] (sent by the dialing
//! side, answered with [`Response::HelloAck`]), exchanged under [`HANDSHAKE_TIMEOUT`]. The
//! listener checks that the caller is a configured peer, calls from that peer's configured
//! address, and meant to reach *this* node (a stale address in a config file must not route
//! votes to the wrong node).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::codec::{clip, read_frame, write_frame, Frame, FrameError, Request, Response};
use super::PeerMap;
use crate::cluster::types::NodeId;

/// Limit for the Hello / HelloAck exchange on a new connection, on both sides.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(500);

/// Protocol name carried in the Hello frame, so a stray client is identified at once.
pub const PROTOCOL_MAGIC: &str = "kube-vip-raft";

/// Version of this wire protocol; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// Dialing side: sends our Hello and checks the answer comes from `target`.
pub async fn client_hello<R, W>(
    rd: &mut R,
    wr: &mut W,
    me: NodeId,
    target: NodeId,
) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hello = Frame {
        id: 0,
        body: Request::Hello {
            magic: PROTOCOL_MAGIC.to_string(),
            version: PROTOCOL_VERSION,
            from: me,
            to: target,
        },
    };
    let ack = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        write_frame(wr, &hello).await?;
        read_frame::<_, Frame<Response>>(rd).await
    })
    .await
    .map_err(|_| format!("handshake timed out after {HANDSHAKE_TIMEOUT:?}"))?
    .map_err(|e| format!("handshake: {e}"))?;
    match ack.map(|f| f.body) {
        Some(Response::HelloAck { node }) if node == target => Ok(()),
        Some(Response::HelloAck { node }) => Err(format!(
            "handshake: address answers as node {node:#x}, expected {target:#x}"
        )),
        Some(Response::Error(e)) => Err(format!("handshake refused: {}", clip(&e))),
        Some(other) => Err(format!("handshake: unexpected answer {}", other.kind())),
        None => Err("handshake: connection closed".into()),
    }
}

/// Why the listening side did not accept a connection.
#[derive(Debug)]
pub enum Refused {
    /// The caller closed the connection before saying anything.
    Closed,
    /// No hello within [`HANDSHAKE_TIMEOUT`], or an unreadable one: nothing is answered.
    Silent(String),
    /// A hello we refuse; the reason is sent back to the caller.
    Answered(String),
}

/// Listening side: reads the caller's Hello, checks it, and answers it; the caller's node id.
pub async fn server_hello<R, W>(
    rd: &mut R,
    wr: &mut W,
    addr: SocketAddr,
    me: NodeId,
    peers: &PeerMap,
) -> Result<NodeId, Refused>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame::<_, Frame<Request>>(rd)).await;
    let (id, magic, version, from, to) = match hello {
        Err(_) => {
            return Err(Refused::Silent(format!(
                "no hello within {HANDSHAKE_TIMEOUT:?}"
            )))
        }
        Ok(Err(e)) => return Err(Refused::Silent(e.to_string())),
        Ok(Ok(None)) => return Err(Refused::Closed),
        Ok(Ok(Some(Frame {
            id,
            body:
                Request::Hello {
                    magic,
                    version,
                    from,
                    to,
                },
        }))) => (id, magic, version, from, to),
        Ok(Ok(Some(other))) => {
            return Err(Refused::Silent(format!(
                "first frame is not a hello but {}",
                other.body.kind()
            )))
        }
    };
    let refusal = if magic != PROTOCOL_MAGIC || version != PROTOCOL_VERSION {
        Some(format!(
            "unsupported protocol {:?} v{version}",
            clip(&magic)
        ))
    } else if to != me {
        Some(format!("this is node {me:#x}, not {to:#x}"))
    } else if from == me || !peers.contains_key(&from) {
        Some(format!("node {from:#x} is not a configured peer"))
    } else {
        // Without a key, a peer is who its address says (see the README: firewall the
        // Raft port to the peers' addresses).
        peers
            .get(&from)
            .filter(|p| p.addr.ip().to_canonical() != addr.ip().to_canonical())
            .map(|p| {
                format!(
                    "it claims to be peer {} ({from:#x}), which is configured at {}",
                    p.id,
                    p.addr.ip()
                )
            })
    };
    if let Some(r) = refusal {
        let _ = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            write_frame(
                wr,
                &Frame {
                    id,
                    body: Response::Error(r.clone()),
                },
            ),
        )
        .await;
        return Err(Refused::Answered(r));
    }
    let ack = Frame {
        id,
        body: Response::HelloAck { node: me },
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, write_frame(wr, &ack)).await {
        Ok(Ok(())) => Ok(from),
        Ok(Err(e)) => Err(Refused::Silent(e.to_string())),
        Err(_) => Err(Refused::Silent(
            FrameError::Io(std::io::ErrorKind::TimedOut.into()).to_string(),
        )),
    }
}
