//! The handshake, the first frames of every connection, all under [`HANDSHAKE_TIMEOUT`].
//!
//! Without a key (protocol version [`PROTOCOL_VERSION`], unchanged from earlier releases): the
//! dialer sends [`Request::Hello`], the listener answers [`Response::HelloAck`]. The listener
//! checks that the caller is a configured peer, calls from that peer's configured address, and
//! meant to reach *this* node (a stale address in a config file must not route votes to the
//! wrong node).
//!
//! With a key (`peerKeyFile`, version [`KEYED_VERSION`]): the same checks except the address,
//! plus a mutual challenge-response over fresh nonces from both sides and per-frame tags from
//! then on ([`crate::cluster::auth`]). A keyed node refuses unkeyed callers and the other way
//! round, each with a clear reason.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::codec::{clip, read_frame, write_frame, Frame, FrameError, Request, Response};
use super::PeerMap;
use crate::cluster::auth::{
    self, FrameMac, KeyRing, Transcript, KEYED_VERSION, NONCE_BYTES, TAG_BYTES,
};
use crate::cluster::counters;
use crate::cluster::types::NodeId;

/// Limit for the whole handshake on a new connection, on both sides.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(500);

/// Protocol name carried in the Hello frame, so a stray client is identified at once.
pub const PROTOCOL_MAGIC: &str = "kube-vip-raft";

/// Version of the unkeyed wire protocol; the keyed one is [`KEYED_VERSION`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Frame authentication of an established connection: what we send, what we receive.
#[derive(Debug)]
pub struct Session {
    /// Seals the frames we send.
    pub send: FrameMac,
    /// Opens the frames we receive.
    pub recv: FrameMac,
}

impl Session {
    fn plain() -> Session {
        Session {
            send: FrameMac::none(),
            recv: FrameMac::none(),
        }
    }
}

/// Why the dialing side gave up on a connection.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// Authentication failed (wrong or missing key on one side): counted.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// Anything else (timeout, refusal, garbage).
    #[error("{0}")]
    Other(String),
}

/// Dialing side: Hello (and with a key, the mutual proof); the frame authentication to use.
pub async fn client_hello<R, W>(
    rd: &mut R,
    wr: &mut W,
    me: NodeId,
    target: NodeId,
    keys: Option<&KeyRing>,
) -> Result<Session, DialError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, client_steps(rd, wr, me, target, keys))
        .await
        .unwrap_or_else(|_| {
            Err(DialError::Other(format!(
                "handshake timed out after {HANDSHAKE_TIMEOUT:?}"
            )))
        })
}

async fn client_steps<R, W>(
    rd: &mut R,
    wr: &mut W,
    me: NodeId,
    target: NodeId,
    keys: Option<&KeyRing>,
) -> Result<Session, DialError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let other = |e: FrameError| DialError::Other(format!("handshake: {e}"));
    let nonce_c = keys.map(|_| auth::nonce());
    let hello = Frame {
        id: 0,
        body: Request::Hello {
            magic: PROTOCOL_MAGIC.to_string(),
            version: if keys.is_some() {
                KEYED_VERSION
            } else {
                PROTOCOL_VERSION
            },
            from: me,
            to: target,
            nonce: nonce_c.map(|n| auth::hex(&n)),
        },
    };
    write_frame(wr, &hello, &mut FrameMac::none())
        .await
        .map_err(other)?;
    let ack = read_frame::<_, Frame<Response>>(rd, &mut FrameMac::none())
        .await
        .map_err(other)?;
    let (nonce_s, proof_s) = match ack.map(|f| f.body) {
        Some(Response::HelloAck { node, nonce, proof }) if node == target => (nonce, proof),
        Some(Response::HelloAck { node, .. }) => {
            return Err(DialError::Other(format!(
                "handshake: address answers as node {node:#x}, expected {target:#x}"
            )))
        }
        Some(Response::Error(e)) => {
            return Err(DialError::Other(format!("handshake refused: {}", clip(&e))))
        }
        Some(other) => {
            return Err(DialError::Other(format!(
                "handshake: unexpected answer {}",
                other.kind()
            )))
        }
        None => return Err(DialError::Other("handshake: connection closed".into())),
    };
    let (Some(keys), Some(nonce_c)) = (keys, nonce_c) else {
        return Ok(Session::plain());
    };
    let auth_failed = |why: &str| {
        counters::PEER_AUTH_FAILURES.fetch_add(1, Ordering::Relaxed);
        DialError::Auth(why.to_string())
    };
    let (Some(nonce_s), Some(proof_s)) = (
        nonce_s.as_deref().and_then(auth::unhex::<NONCE_BYTES>),
        proof_s.as_deref().and_then(auth::unhex::<TAG_BYTES>),
    ) else {
        return Err(auth_failed(
            "the peer sent no key proof (is its peerKeyFile set?)",
        ));
    };
    let t = Transcript {
        nonce_c,
        nonce_s,
        from: me,
        to: target,
    };
    let Some(peer_key) = t.check_server_proof(keys, &proof_s) else {
        return Err(auth_failed("the peer's proof matches none of our keys"));
    };
    let mut session = Session {
        send: t.dialer_frames(keys.own()),
        recv: t.listener_frames(peer_key),
    };
    let proof = Frame {
        id: 0,
        body: Request::Auth {
            proof: auth::hex(&t.client_proof(keys)),
        },
    };
    write_frame(wr, &proof, &mut FrameMac::none())
        .await
        .map_err(other)?;
    // The listener answers AuthOk as its first authenticated frame, or a plain Error.
    let mut peek = session.recv.clone();
    let mut plain = FrameMac::none();
    let mut raw = Vec::new();
    read_raw(rd, &mut raw).await.map_err(other)?;
    if let Ok(Frame {
        body: Response::AuthOk,
        ..
    }) = super::codec::decode_payload::<Frame<Response>>(&raw, &mut peek)
    {
        session.recv = peek;
        return Ok(session);
    }
    match super::codec::decode_payload::<Frame<Response>>(&raw, &mut plain) {
        Ok(Frame {
            body: Response::Error(e),
            ..
        }) => Err(auth_failed(&format!(
            "the peer refused our proof: {}",
            clip(&e)
        ))),
        _ => Err(auth_failed("no authenticated answer to our proof")),
    }
}

/// Reads one frame's bytes (length prefix stripped) into `buf`.
async fn read_raw<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut Vec<u8>) -> Result<(), FrameError> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    rd.read_exact(&mut len)
        .await
        .map_err(|_| FrameError::Truncated)?;
    let len = u32::from_be_bytes(len) as usize;
    // Handshake answers are tiny.
    if len > 4096 {
        return Err(FrameError::TooLarge(len as u64));
    }
    buf.resize(len, 0);
    rd.read_exact(buf)
        .await
        .map_err(|_| FrameError::Truncated)?;
    Ok(())
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
    /// The caller has a wrong key, or none, or we have none: counted, and the reason is sent
    /// back to the caller.
    Auth(String),
}

/// Answers a refused handshake with the reason (plain frame), then returns it.
async fn refuse<W: AsyncWrite + Unpin, T>(wr: &mut W, id: u64, r: Refused) -> Result<T, Refused> {
    let text = match &r {
        Refused::Answered(t) | Refused::Auth(t) => t.clone(),
        Refused::Closed | Refused::Silent(_) => return Err(r),
    };
    let answer = Frame {
        id,
        body: Response::Error(text),
    };
    let _ = write_frame(wr, &answer, &mut FrameMac::none()).await;
    Err(r)
}

/// Listening side: reads and checks the caller's Hello (and with a key, its proof); the
/// caller's node id and the frame authentication to use.
pub async fn server_hello<R, W>(
    rd: &mut R,
    wr: &mut W,
    addr: SocketAddr,
    me: NodeId,
    peers: &PeerMap,
    keys: Option<&KeyRing>,
) -> Result<(NodeId, Session), Refused>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        server_steps(rd, wr, addr, me, peers, keys),
    )
    .await
    .unwrap_or_else(|_| {
        Err(Refused::Silent(format!(
            "no complete handshake within {HANDSHAKE_TIMEOUT:?}"
        )))
    })
}

async fn server_steps<R, W>(
    rd: &mut R,
    wr: &mut W,
    addr: SocketAddr,
    me: NodeId,
    peers: &PeerMap,
    keys: Option<&KeyRing>,
) -> Result<(NodeId, Session), Refused>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hello = read_frame::<_, Frame<Request>>(rd, &mut FrameMac::none()).await;
    let (id, magic, version, from, to, nonce) = match hello {
        Err(e) => return Err(Refused::Silent(e.to_string())),
        Ok(None) => return Err(Refused::Closed),
        Ok(Some(Frame {
            id,
            body:
                Request::Hello {
                    magic,
                    version,
                    from,
                    to,
                    nonce,
                },
        })) => (id, magic, version, from, to, nonce),
        Ok(Some(other)) => {
            return Err(Refused::Silent(format!(
                "first frame is not a hello but {}",
                other.body.kind()
            )))
        }
    };
    let keyed_hello = version == KEYED_VERSION && nonce.is_some();
    let refusal =
        if magic != PROTOCOL_MAGIC || (version != PROTOCOL_VERSION && version != KEYED_VERSION) {
            Some(Refused::Answered(format!(
                "unsupported protocol {:?} v{version}",
                clip(&magic)
            )))
        } else if to != me {
            Some(Refused::Answered(format!(
                "this is node {me:#x}, not {to:#x}"
            )))
        } else if from == me || !peers.contains_key(&from) {
            Some(Refused::Answered(format!(
                "node {from:#x} is not a configured peer"
            )))
        } else if keys.is_some() && !keyed_hello {
            Some(Refused::Auth(format!(
                "peer {from:#x} sent no key proof (this node has a peerKeyFile)"
            )))
        } else if keys.is_none() && keyed_hello {
            Some(Refused::Auth(format!(
                "peer {from:#x} uses a key, this node has no peerKeyFile"
            )))
        } else if keys.is_none() {
            // Without a key, a peer is who its address says (see the README: firewall the
            // Raft port to the peers' addresses).
            peers
                .get(&from)
                .filter(|p| p.addr.ip().to_canonical() != addr.ip().to_canonical())
                .map(|p| {
                    Refused::Answered(format!(
                        "it claims to be peer {} ({from:#x}), which is configured at {}",
                        p.id,
                        p.addr.ip()
                    ))
                })
        } else {
            None
        };
    if let Some(r) = refusal {
        if matches!(r, Refused::Auth(_)) {
            counters::PEER_AUTH_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
        return refuse(wr, id, r).await;
    }
    let Some(keys) = keys else {
        let ack = Frame {
            id,
            body: Response::HelloAck {
                node: me,
                nonce: None,
                proof: None,
            },
        };
        write_frame(wr, &ack, &mut FrameMac::none())
            .await
            .map_err(|e| Refused::Silent(e.to_string()))?;
        return Ok((from, Session::plain()));
    };
    let Some(nonce_c) = nonce.as_deref().and_then(auth::unhex::<NONCE_BYTES>) else {
        return refuse(wr, id, Refused::Answered("malformed nonce".into())).await;
    };
    let t = Transcript {
        nonce_c,
        nonce_s: auth::nonce(),
        from,
        to: me,
    };
    let ack = Frame {
        id,
        body: Response::HelloAck {
            node: me,
            nonce: Some(auth::hex(&t.nonce_s)),
            proof: Some(auth::hex(&t.server_proof(keys))),
        },
    };
    write_frame(wr, &ack, &mut FrameMac::none())
        .await
        .map_err(|e| Refused::Silent(e.to_string()))?;
    let proof = match read_frame::<_, Frame<Request>>(rd, &mut FrameMac::none()).await {
        Ok(Some(Frame {
            body: Request::Auth { proof },
            ..
        })) => proof,
        Ok(Some(other)) => {
            counters::PEER_AUTH_FAILURES.fetch_add(1, Ordering::Relaxed);
            return refuse(
                wr,
                id,
                Refused::Auth(format!(
                    "expected the caller's key proof, got {}",
                    other.body.kind()
                )),
            )
            .await;
        }
        // The caller hung up after our proof: typically it does not accept our key.
        Ok(None) => {
            counters::PEER_AUTH_FAILURES.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Auth(
                "the caller hung up after our proof (it does not accept our key?)".into(),
            ));
        }
        Err(e) => return Err(Refused::Silent(e.to_string())),
    };
    let Some(peer_key) =
        auth::unhex::<TAG_BYTES>(&proof).and_then(|p| t.check_client_proof(keys, &p))
    else {
        counters::PEER_AUTH_FAILURES.fetch_add(1, Ordering::Relaxed);
        return refuse(
            wr,
            id,
            Refused::Auth("wrong key: the caller's proof matches none of ours".into()),
        )
        .await;
    };
    let mut session = Session {
        send: t.listener_frames(keys.own()),
        recv: t.dialer_frames(peer_key),
    };
    let ok = Frame {
        id,
        body: Response::AuthOk,
    };
    write_frame(wr, &ok, &mut session.send)
        .await
        .map_err(|e| Refused::Silent(e.to_string()))?;
    Ok((from, session))
}

#[cfg(test)]
mod tests {
    use super::super::test_peers as peers;
    use super::*;

    const K1: &str = "0101010101010101010101010101010101010101010101010101010101010101";
    const K2: &str = "0202020202020202020202020202020202020202020202020202020202020202";

    fn ring(text: &str) -> KeyRing {
        KeyRing::parse(text, std::path::Path::new("k")).expect("keys")
    }

    /// Runs both sides over an in-memory pipe: dialer 1 from 127.0.0.1, listener 2.
    async fn run(
        client_keys: Option<KeyRing>,
        server_keys: Option<KeyRing>,
    ) -> (
        Result<Session, DialError>,
        Result<(NodeId, Session), Refused>,
    ) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let (mut crd, mut cwr) = tokio::io::split(c);
        let (mut srd, mut swr) = tokio::io::split(s);
        let peers = peers();
        let addr = "127.0.0.1:5555".parse().unwrap();
        tokio::join!(
            client_hello(&mut crd, &mut cwr, 1, 2, client_keys.as_ref()),
            server_hello(&mut srd, &mut swr, addr, 2, &peers, server_keys.as_ref()),
        )
    }

    #[tokio::test]
    async fn same_key_or_rotation_overlap_connects_and_frames_flow() {
        let (k1k2, k2k1) = (format!("{K1}\n{K2}"), format!("{K2}\n{K1}"));
        // The rotation steps: new key second everywhere, then first everywhere, then alone.
        let steps = [
            (K1, K1),
            (K1, &*k1k2),
            (&*k1k2, &*k1k2),
            (&*k2k1, &*k1k2),
            (&*k2k1, &*k2k1),
            (K2, &*k2k1),
        ];
        for (c, s) in steps {
            let (cr, sr) = run(Some(ring(c)), Some(ring(s))).await;
            let mut client = cr.expect("dialer");
            let (from, mut server) = sr.expect("listener");
            assert_eq!(from, 1);
            let mut f = b"frame".to_vec();
            client.send.seal(&mut f);
            assert_eq!(server.recv.open(&f), Ok(&b"frame"[..]));
            let mut g = b"answer".to_vec();
            server.send.seal(&mut g);
            assert_eq!(client.recv.open(&g), Ok(&b"answer"[..]));
        }
    }

    #[tokio::test]
    async fn wrong_or_missing_key_is_refused_on_both_sides() {
        let before = counters::PEER_AUTH_FAILURES.load(Ordering::Relaxed);
        let (cr, sr) = run(Some(ring(K1)), Some(ring(K2))).await;
        assert!(matches!(cr, Err(DialError::Auth(_))), "{cr:?}");
        assert!(sr.is_err());
        let (cr, sr) = run(None, Some(ring(K2))).await;
        assert!(cr.is_err());
        assert!(matches!(sr, Err(Refused::Auth(_))), "{sr:?}");
        let (cr, sr) = run(Some(ring(K1)), None).await;
        assert!(cr.is_err());
        assert!(matches!(sr, Err(Refused::Auth(_))), "{sr:?}");
        assert!(counters::PEER_AUTH_FAILURES.load(Ordering::Relaxed) >= before + 3);
        // Without keys on either side: plain, as before.
        let (cr, sr) = run(None, None).await;
        assert!(cr.is_ok() && sr.is_ok());
    }
}
