//! The dialing side: one task per peer owns each outgoing connection ([`PeerClient`]), and
//! calls are hedged over two of them ([`HedgedClient`]).
//!
//! openraft cancels RPC futures on its own timeouts (an AppendEntries is abandoned after one
//! `heartbeat_interval`); because the socket is owned by the task and not by the future, a
//! cancelled RPC never leaves half a frame on the wire, and its late answer is simply dropped.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::codec::{encode_frame, read_frame, Frame, FrameError, Request, Response};
use super::handshake::DialError;
use super::{handshake, lock, PeerName};
use crate::cluster::auth::{FrameMac, SharedKeys};
use crate::cluster::counters;
use crate::cluster::types::{NodeId, PeerInfo};

/// Limit for establishing a TCP connection to a peer.
///
/// Peers of a VIP cluster share a layer-2 segment, so a connect that has not
/// completed in 500 ms is to a host that is down or partitioned: give up and
/// let openraft retry after the backoff rather than stall the queue.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A connection on which a request has waited this long for its answer is
/// considered dead and is closed; the next RPC dials again.
///
/// Without it, a peer whose host vanished without a RST would keep the
/// connection "established" for minutes of TCP retransmissions, and the
/// restarted peer would not be reached until the kernel gave up. It is much
/// longer than any healthy answer (sub-millisecond on a LAN plus an fsync).
pub const RPC_TIMEOUT: Duration = Duration::from_millis(1000);

/// How often the per-peer task checks whether outstanding requests exceed [`RPC_TIMEOUT`].
const LIVENESS_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Failure of one RPC at the transport level.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// Could not connect or handshake: openraft backs off before retrying.
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// The connection broke, or the answer was malformed: retry at will.
    #[error("network error: {0}")]
    Network(String),
}

type Reply = oneshot::Sender<Result<Response, CallError>>;

struct Call {
    req: Request,
    reply: Reply,
}

struct Pending {
    sent: Instant,
    reply: Reply,
}

type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;

/// An established outgoing connection.
struct Conn {
    writer: OwnedWriteHalf,
    /// Seals what we send on this connection.
    seal: FrameMac,
    pending: PendingMap,
    reader: JoinHandle<()>,
}

impl Conn {
    fn is_dead(&self) -> bool {
        self.reader.is_finished()
    }

    fn oldest_pending(&self) -> Option<Duration> {
        let mut p = lock(&self.pending);
        // Forget requests nobody waits for any more; their answers will be dropped.
        p.retain(|_, v| !v.reply.is_closed());
        p.values().map(|v| v.sent.elapsed()).max()
    }

    fn fail_all(&self, why: &str) {
        for (_, p) in lock(&self.pending).drain() {
            let _ = p.reply.send(Err(CallError::Network(why.to_string())));
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        self.fail_all("connection closed");
    }
}

/// Handle to the task that owns the connection to one peer.
///
/// Cloning is cheap; all clones share the one connection.
#[derive(Clone)]
pub struct PeerClient {
    tx: mpsc::UnboundedSender<Call>,
    /// When the peer last answered anything on this connection.
    last_answer: LastAnswer,
}

/// Shared "when did the peer last answer" stamp.
type LastAnswer = Arc<Mutex<Option<Instant>>>;

impl PeerClient {
    pub(super) fn spawn(
        me: NodeId,
        local_ip: IpAddr,
        target: NodeId,
        peer: PeerInfo,
        keys: Option<Arc<SharedKeys>>,
        rpc_timeout: Duration,
    ) -> PeerClient {
        let (tx, rx) = mpsc::unbounded_channel();
        let last_answer = LastAnswer::default();
        tokio::spawn(peer_task(
            Dialer {
                me,
                local_ip,
                target,
                peer,
                keys,
                rpc_timeout,
            },
            rx,
            last_answer.clone(),
        ));
        PeerClient { tx, last_answer }
    }

    /// How long ago the peer last answered a request, if ever.
    pub fn last_answer_age(&self) -> Option<Duration> {
        lock(&self.last_answer).map(|t| t.elapsed())
    }

    /// Sends one request and waits for its answer.
    ///
    /// Cancel-safe: dropping the future abandons the answer, not the connection.
    pub async fn call(&self, req: Request) -> Result<Response, CallError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Call { req, reply })
            .map_err(|_| CallError::Network("transport is shut down".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(CallError::Network("transport is shut down".into())))
    }
}

/// Dials `addr` from `local_ip` (port chosen by the OS).
///
/// Binding the source address to our own Raft address makes the peer see (and
/// log) the address it knows us by, and lets a firewall or a test tell the
/// nodes of one host apart; without it the kernel would pick the primary
/// address of the outgoing interface (127.0.0.1 for every node on loopback).
async fn dial(local_ip: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if !local_ip.is_unspecified() && local_ip.is_ipv4() == addr.is_ipv4() {
        socket.bind(SocketAddr::new(local_ip, 0))?;
    }
    socket.connect(addr).await
}

/// Who dials whom, and with which keys.
struct Dialer {
    me: NodeId,
    /// Source address for the connection (our own Raft listener's IP).
    local_ip: IpAddr,
    target: NodeId,
    peer: PeerInfo,
    keys: Option<Arc<SharedKeys>>,
    /// An answer later than this means the connection is dead ([`RPC_TIMEOUT`] for Raft
    /// traffic; longer for a forwarded membership change, which has a connection of its own).
    rpc_timeout: Duration,
}

async fn connect(d: &Dialer, last_answer: &LastAnswer) -> Result<Conn, DialError> {
    let other = DialError::Other;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, dial(d.local_ip, d.peer.addr))
        .await
        .map_err(|_| other(format!("connect timed out after {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| other(format!("connect: {e}")))?;
    // Heartbeats are tiny; Nagle would hold them back behind unacknowledged data.
    stream
        .set_nodelay(true)
        .map_err(|e| other(format!("set TCP_NODELAY: {e}")))?;
    let (mut rd, mut wr) = stream.into_split();
    let ring = d.keys.as_ref().map(|k| k.current());
    let session =
        handshake::client_hello(&mut rd, &mut wr, d.me, d.target, ring.as_deref()).await?;
    let pending: PendingMap = Arc::default();
    let reader = tokio::spawn(read_responses(
        rd,
        session.recv,
        pending.clone(),
        d.peer.clone(),
        last_answer.clone(),
    ));
    Ok(Conn {
        writer: wr,
        seal: session.send,
        pending,
        reader,
    })
}

/// Delivers answers to their waiting callers until the connection ends.
async fn read_responses(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut open: FrameMac,
    pending: PendingMap,
    peer: PeerInfo,
    last_answer: LastAnswer,
) {
    loop {
        match read_frame::<_, Frame<Response>>(&mut rd, &mut open).await {
            Ok(Some(frame)) => {
                *lock(&last_answer) = Some(Instant::now());
                // Absent id: the caller gave up and was pruned; the answer is dropped.
                if let Some(p) = lock(&pending).remove(&frame.id) {
                    let _ = p.reply.send(Ok(frame.body));
                }
            }
            Ok(None) => {
                log::debug!("connection to peer {} closed by peer", PeerName(&peer));
                break;
            }
            Err(e) => {
                if matches!(e, FrameError::Auth(_)) {
                    counters::PEER_FRAMES_REFUSED.fetch_add(1, Ordering::Relaxed);
                }
                log::warn!("closing connection to peer {}: {e}", PeerName(&peer));
                break;
            }
        }
    }
    for (_, p) in lock(&pending).drain() {
        let _ = p
            .reply
            .send(Err(CallError::Network("connection closed".into())));
    }
}

/// Owns the connection to one peer; serves calls until every [`PeerClient`] is dropped.
async fn peer_task(d: Dialer, mut rx: mpsc::UnboundedReceiver<Call>, last_answer: LastAnswer) {
    let mut conn: Option<Conn> = None;
    let mut next_id: u64 = 1;
    // Log reachability changes once, not once per heartbeat.
    let mut reachable: Option<bool> = None;
    let mut auth_failed = false;
    let peer = &d.peer;
    let mut liveness = tokio::time::interval(LIVENESS_CHECK_INTERVAL);
    liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let call = tokio::select! {
            c = rx.recv() => match c {
                Some(c) => c,
                None => break,
            },
            _ = liveness.tick() => {
                if let Some(c) = &conn {
                    if c.oldest_pending().is_some_and(|age| age > d.rpc_timeout) {
                        log::warn!(
                            "no answer from peer {} for {:?}; dropping the connection",
                            PeerName(peer),
                            d.rpc_timeout
                        );
                        conn = None;
                    }
                }
                continue;
            }
        };
        if call.reply.is_closed() {
            continue; // openraft already gave up on it
        }
        if conn.as_ref().is_some_and(Conn::is_dead) {
            conn = None;
        }
        let c = match &mut conn {
            Some(c) => c,
            None => match connect(&d, &last_answer).await {
                Ok(c) => {
                    if reachable != Some(true) {
                        log::info!("connected to peer {}", PeerName(peer));
                    }
                    reachable = Some(true);
                    crate::metrics::get().peer_reachable(&peer.id, true);
                    conn.insert(c)
                }
                Err(e) => {
                    // Once per change: unreachable, or refused for its key.
                    let auth = matches!(e, DialError::Auth(_));
                    if reachable != Some(false) || auth != auth_failed {
                        log::warn!("peer {} unreachable: {e}", PeerName(peer));
                    }
                    reachable = Some(false);
                    crate::metrics::get().peer_reachable(&peer.id, false);
                    auth_failed = auth;
                    let _ = call.reply.send(Err(CallError::Unreachable(e.to_string())));
                    continue;
                }
            },
        };
        let id = next_id;
        next_id += 1;
        let frame = match encode_frame(&Frame { id, body: call.req }, &mut c.seal) {
            Ok(f) => f,
            Err(e) => {
                let _ = call.reply.send(Err(CallError::Network(format!(
                    "cannot encode request: {e}"
                ))));
                continue;
            }
        };
        lock(&c.pending).insert(
            id,
            Pending {
                sent: Instant::now(),
                reply: call.reply,
            },
        );
        // A write that cannot complete means the peer stopped reading; a
        // half-written frame also makes the stream unusable. Either way: drop it.
        match tokio::time::timeout(RPC_TIMEOUT, c.writer.write_all(&frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                log::warn!("write to peer {} failed: {e}", PeerName(peer));
                conn = None;
            }
            Err(_) => {
                log::warn!("write to peer {} timed out", PeerName(peer));
                conn = None;
            }
        }
    }
}

/// Two independent connections to one peer, and calls hedged across them.
///
/// Why: Raft traffic is one small request at a time per peer. When such a segment (or its
/// answer) is lost, Linux retransmits it only after its loss probe, `srtt/4 + TCP_RTO_MIN` =
/// 200 ms or more, and everything behind it on that connection waits too. That is longer
/// than a fast election timeout, so at a few percent of packet loss followers would time out
/// and depose a healthy leader. A call not answered within `hedge_after` is sent again on the
/// second connection; the first answer wins. Raft's RPCs are idempotent (a repeated append or
/// vote changes nothing), so a duplicate is harmless.
#[derive(Clone)]
pub struct HedgedClient {
    /// The connections; the first carries every call, the second the hedges.
    pub(super) lanes: [PeerClient; 2],
    /// How long the first connection may take before the call is repeated on the second.
    pub(super) hedge_after: Duration,
}

impl HedgedClient {
    /// Sends one request and returns the first answer from either connection.
    pub async fn call(&self, req: Request) -> Result<Response, CallError> {
        let [first, second] = &self.lanes;
        let a = first.call(req.clone());
        tokio::pin!(a);
        tokio::select! {
            r = &mut a => return match r {
                // Failed fast (connection down): the other connection may be fine.
                Err(_) => second.call(req).await,
                ok => ok,
            },
            _ = tokio::time::sleep(self.hedge_after) => {}
        }
        let b = second.call(req);
        tokio::pin!(b);
        tokio::select! {
            r = &mut a => match r { Ok(x) => Ok(x), Err(_) => b.await },
            r = &mut b => match r { Ok(x) => Ok(x), Err(_) => a.await },
        }
    }

    /// How long ago the peer last answered on either connection.
    pub fn last_answer_age(&self) -> Option<Duration> {
        self.lanes
            .iter()
            .filter_map(PeerClient::last_answer_age)
            .min()
    }
}
