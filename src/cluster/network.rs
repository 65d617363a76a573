//! TCP transport between cluster peers.
//!
//! ## Wire format
//!
//! Every frame is a `u32` big-endian payload length followed by that many bytes
//! of JSON. Requests travel as [`Frame<Request>`], answers as [`Frame<Response>`];
//! the `id` of an answer repeats the id of the request it answers, so a client
//! may send a request before the answer to the previous one has arrived.
//!
//! The first frame on a connection is [`Request::Hello`] (sent by the dialing
//! side, answered with [`Response::HelloAck`]), exchanged under
//! [`HANDSHAKE_TIMEOUT`]. The listener checks that the caller is a configured
//! peer and that the caller meant to reach *this* node (a stale address in a
//! config file must not route votes to the wrong node). After that, log lines
//! about the connection name the peer.
//!
//! A frame that is too long, truncated or not valid JSON closes that
//! connection (with a log line naming the remote address and peer), never the
//! process.
//!
//! ## Connections
//!
//! There is one outgoing connection per peer, owned by a per-peer task
//! ([`PeerClient`]). openraft cancels RPC futures on its own timeouts (an
//! AppendEntries is abandoned after one `heartbeat_interval`); because the
//! socket is owned by the task and not by the future, a cancelled RPC never
//! leaves half a frame on the wire, and its late answer is simply dropped.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, Cursor};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::{Future, FutureExt};
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{ServerState, Snapshot, SnapshotMeta, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use super::gate::VoteGate;
use super::types::{Node, NodeId, PeerInfo, Raft, TypeConfig};

/// Largest accepted frame payload, in bytes.
///
/// The largest legitimate message is an AppendEntries carrying
/// `max_payload_entries` (300) membership entries of a few hundred bytes each,
/// i.e. well under 1 MiB; snapshots here hold only the membership. 4 MiB leaves
/// ample room while bounding what a garbage length prefix can make us allocate.
pub const MAX_FRAME_LENGTH: usize = 4 * 1024 * 1024;

/// Limit for establishing a TCP connection to a peer.
///
/// Peers of a VIP cluster share a layer-2 segment, so a connect that has not
/// completed in 500 ms is to a host that is down or partitioned: give up and
/// let openraft retry after the backoff rather than stall the queue.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Limit for the Hello / HelloAck exchange on a new connection, on both sides.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(500);

/// A connection on which a request has waited this long for its answer is
/// considered dead and is closed; the next RPC dials again.
///
/// Without it, a peer whose host vanished without a RST would keep the
/// connection "established" for minutes of TCP retransmissions, and the
/// restarted peer would not be reached until the kernel gave up. It is much
/// longer than any healthy answer (sub-millisecond on a LAN plus an fsync).
pub const RPC_TIMEOUT: Duration = Duration::from_millis(1000);

/// An inbound connection that carries no frame for this long is closed.
///
/// A leader sends heartbeats every `heartbeat_interval`, so only connections
/// used for votes go quiet; dropping them frees tasks held by peers that died
/// without closing their sockets. The dialing side reconnects on next use.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Protocol name carried in the Hello frame, so a stray client is identified at once.
pub const PROTOCOL_MAGIC: &str = "kube-vip-raft";

/// Version of this wire protocol; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// How often the per-peer task checks whether outstanding requests exceed [`RPC_TIMEOUT`].
const LIVENESS_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Pause after a failed `accept()` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

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
        /// Must be [`PROTOCOL_MAGIC`].
        magic: String,
        /// Must be [`PROTOCOL_VERSION`].
        version: u32,
        /// Node id of the caller.
        from: NodeId,
        /// Node id the caller expects to reach.
        to: NodeId,
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
}

/// Messages sent back by the listening side.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    /// Hello accepted; carries the listener's node id.
    HelloAck {
        /// Node id of the listener.
        node: NodeId,
    },
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
    /// The payload is not a valid message.
    #[error("undecodable frame: {0}")]
    Decode(#[source] serde_json::Error),
    /// Socket error.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Encodes `msg` as one frame (length prefix + JSON).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    serde_json::to_writer(&mut buf, msg).map_err(FrameError::Decode)?;
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
) -> Result<(), FrameError> {
    let buf = encode_frame(msg)?;
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads one frame. `Ok(None)` on a clean end of stream between frames.
///
/// Not cancel-safe: a frame interrupted half-way leaves the stream unusable,
/// so callers that time out a read must drop the connection.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
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
    serde_json::from_slice(&payload)
        .map(Some)
        .map_err(FrameError::Decode)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// All configured peers (local node included), by node id.
pub type PeerMap = BTreeMap<NodeId, PeerInfo>;

/// How to name a peer in log lines: `server2 (127.0.0.2:10002)`.
struct PeerName<'a>(&'a PeerInfo);

impl fmt::Display for PeerName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0.id, self.0.addr)
    }
}

// ---------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------

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
    fn spawn(me: NodeId, local_ip: IpAddr, target: NodeId, peer: PeerInfo) -> PeerClient {
        let (tx, rx) = mpsc::unbounded_channel();
        let last_answer = LastAnswer::default();
        tokio::spawn(peer_task(
            me,
            local_ip,
            target,
            peer,
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

async fn connect(
    me: NodeId,
    local_ip: IpAddr,
    target: NodeId,
    peer: &PeerInfo,
    last_answer: &LastAnswer,
) -> Result<Conn, String> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, dial(local_ip, peer.addr))
        .await
        .map_err(|_| format!("connect timed out after {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("connect: {e}"))?;
    // Heartbeats are tiny; Nagle would hold them back behind unacknowledged data.
    stream
        .set_nodelay(true)
        .map_err(|e| format!("set TCP_NODELAY: {e}"))?;
    let (mut rd, mut wr) = stream.into_split();
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
        write_frame(&mut wr, &hello).await?;
        read_frame::<_, Frame<Response>>(&mut rd).await
    })
    .await
    .map_err(|_| format!("handshake timed out after {HANDSHAKE_TIMEOUT:?}"))?
    .map_err(|e| format!("handshake: {e}"))?;
    match ack.map(|f| f.body) {
        Some(Response::HelloAck { node }) if node == target => {}
        Some(Response::HelloAck { node }) => {
            return Err(format!(
                "handshake: address answers as node {node:#x}, expected {target:#x}"
            ))
        }
        Some(Response::Error(e)) => return Err(format!("handshake refused: {e}")),
        Some(other) => return Err(format!("handshake: unexpected answer {other:?}")),
        None => return Err("handshake: connection closed".into()),
    }
    let pending: PendingMap = Arc::default();
    let reader = tokio::spawn(read_responses(
        rd,
        pending.clone(),
        peer.clone(),
        last_answer.clone(),
    ));
    Ok(Conn {
        writer: wr,
        pending,
        reader,
    })
}

/// Delivers answers to their waiting callers until the connection ends.
async fn read_responses(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    pending: PendingMap,
    peer: PeerInfo,
    last_answer: LastAnswer,
) {
    loop {
        match read_frame::<_, Frame<Response>>(&mut rd).await {
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
async fn peer_task(
    me: NodeId,
    local_ip: IpAddr,
    target: NodeId,
    peer: PeerInfo,
    mut rx: mpsc::UnboundedReceiver<Call>,
    last_answer: LastAnswer,
) {
    let mut conn: Option<Conn> = None;
    let mut next_id: u64 = 1;
    // Log reachability changes once, not once per heartbeat.
    let mut reachable: Option<bool> = None;
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
                    if c.oldest_pending().is_some_and(|age| age > RPC_TIMEOUT) {
                        log::warn!(
                            "no answer from peer {} for {RPC_TIMEOUT:?}; dropping the connection",
                            PeerName(&peer)
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
            None => match connect(me, local_ip, target, &peer, &last_answer).await {
                Ok(c) => {
                    if reachable != Some(true) {
                        log::info!("connected to peer {}", PeerName(&peer));
                    }
                    reachable = Some(true);
                    crate::metrics::get().peer_reachable(&peer.id, true);
                    conn.insert(c)
                }
                Err(e) => {
                    if reachable != Some(false) {
                        log::warn!("peer {} unreachable: {e}", PeerName(&peer));
                    }
                    reachable = Some(false);
                    crate::metrics::get().peer_reachable(&peer.id, false);
                    let _ = call.reply.send(Err(CallError::Unreachable(e)));
                    continue;
                }
            },
        };
        let id = next_id;
        next_id += 1;
        let frame = match encode_frame(&Frame { id, body: call.req }) {
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
                log::warn!("write to peer {} failed: {e}", PeerName(&peer));
                conn = None;
            }
            Err(_) => {
                log::warn!("write to peer {} timed out", PeerName(&peer));
                conn = None;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// openraft network
// ---------------------------------------------------------------------------

struct NetInner {
    me: NodeId,
    /// Source address for outgoing connections (our own Raft listener's IP).
    local_ip: IpAddr,
    peers: Arc<PeerMap>,
    /// Sleep after an `Unreachable` error before openraft retries that peer.
    backoff: Duration,
    clients: Mutex<HashMap<NodeId, HedgedClient>>,
}

/// openraft network factory; also sends our own [`Request::Handover`].
#[derive(Clone)]
pub struct Network {
    inner: Arc<NetInner>,
}

impl Network {
    /// `backoff` is how long openraft waits after an unreachable peer before
    /// trying it again; keep it at about one heartbeat interval (see
    /// [`RaftNetwork::backoff`] below for why).
    pub fn new(me: NodeId, local_ip: IpAddr, peers: Arc<PeerMap>, backoff: Duration) -> Network {
        Network {
            inner: Arc::new(NetInner {
                me,
                local_ip,
                peers,
                backoff,
                clients: Mutex::default(),
            }),
        }
    }

    /// The shared client for `target`, if it is a configured peer.
    ///
    /// Addresses come from the local configuration, not from the membership
    /// stored in the log (see [`Node`]).
    pub fn client(&self, target: NodeId) -> Option<HedgedClient> {
        let peer = self.inner.peers.get(&target)?;
        let mut clients = lock(&self.inner.clients);
        let c = clients.entry(target).or_insert_with(|| {
            let lane =
                || PeerClient::spawn(self.inner.me, self.inner.local_ip, target, peer.clone());
            HedgedClient {
                lanes: [lane(), lane()],
                // One heartbeat: an answer later than that is a stall, not a slow peer.
                hedge_after: self.inner.backoff,
            }
        });
        Some(c.clone())
    }

    /// How long ago `target` last answered one of our requests, if ever.
    pub fn last_answer_age(&self, target: NodeId) -> Option<Duration> {
        lock(&self.inner.clients)
            .get(&target)
            .and_then(HedgedClient::last_answer_age)
    }

    /// Asks `target` to start an election now (planned handover); waits at
    /// most `limit` for its answer.
    pub async fn send_handover(&self, target: NodeId, limit: Duration) -> Result<(), String> {
        let client = self
            .client(target)
            .ok_or_else(|| format!("node {target:#x} is not a configured peer"))?;
        let req = Request::Handover {
            from: self.inner.me,
        };
        match tokio::time::timeout(limit, client.call(req)).await {
            Err(_) => Err(format!("no answer within {limit:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(Response::Handover(r))) => r,
            Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// Asks `target` whether it would vote for us now ([`Request::PreVote`]); no answer
    /// within `limit`, or any error, counts as no.
    pub async fn send_pre_vote(
        &self,
        target: NodeId,
        last_log_index: Option<u64>,
        limit: Duration,
    ) -> bool {
        let Some(client) = self.client(target) else {
            return false;
        };
        let req = Request::PreVote { last_log_index };
        matches!(
            tokio::time::timeout(limit, client.call(req)).await,
            Ok(Ok(Response::PreVote(true)))
        )
    }

    /// Closes every outgoing connection (their tasks end when the clients drop).
    pub fn close(&self) {
        lock(&self.inner.clients).clear();
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, _node: &Node) -> PeerConnection {
        PeerConnection {
            target,
            name: self
                .inner
                .peers
                .get(&target)
                .map(|p| PeerName(p).to_string())
                .unwrap_or_else(|| format!("{target:#x}")),
            client: self.client(target),
            backoff: self.inner.backoff,
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
    lanes: [PeerClient; 2],
    /// How long the first connection may take before the call is repeated on the second.
    hedge_after: Duration,
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

/// openraft's view of the connection to one peer.
pub struct PeerConnection {
    target: NodeId,
    /// The peer as log lines name it.
    name: String,
    /// `None` if the membership names a node that is not in our configuration.
    client: Option<HedgedClient>,
    backoff: Duration,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, Node, RaftError<NodeId, E>>;

impl PeerConnection {
    async fn call(&self, req: Request) -> Result<Response, CallError> {
        match &self.client {
            Some(c) => c.call(req).await,
            None => Err(CallError::Unreachable(format!(
                "node {:#x} is not in the local peer configuration",
                self.target
            ))),
        }
    }
}

fn to_rpc_error<E: std::error::Error>(e: CallError) -> RpcErr<E> {
    match e {
        CallError::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&e)),
        CallError::Network(_) => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected<E: std::error::Error>(what: &str, got: &Response) -> RpcErr<E> {
    let e = io::Error::other(format!("expected {what} answer, got {got:?}"));
    RPCError::Network(NetworkError::new(&e))
}

/// Logs what became of one vote request sent by this node: granted, refused (with the
/// voter's vote), failed, or abandoned by openraft before an answer came.
struct VoteOutcome<'a> {
    peer: &'a str,
    vote: Vote<NodeId>,
    sent: Instant,
    logged: bool,
}

impl<'a> VoteOutcome<'a> {
    fn new(peer: &'a str, vote: Vote<NodeId>) -> Self {
        VoteOutcome {
            peer,
            vote,
            sent: Instant::now(),
            logged: false,
        }
    }

    fn done<E: fmt::Display>(&mut self, res: &Result<VoteResponse<NodeId>, E>) {
        self.logged = true;
        let ms = self.sent.elapsed().as_secs_f64() * 1000.0;
        match res {
            Ok(r) if r.vote_granted => {
                log::info!("vote {} granted by {} in {ms:.1} ms", self.vote, self.peer)
            }
            Ok(r) => log::info!(
                "vote {} refused by {} in {ms:.1} ms (its vote {})",
                self.vote,
                self.peer,
                r.vote
            ),
            Err(e) => log::info!(
                "vote {} to {} failed in {ms:.1} ms: {e}",
                self.vote,
                self.peer
            ),
        }
    }
}

impl Drop for VoteOutcome<'_> {
    fn drop(&mut self) {
        if !self.logged {
            log::info!(
                "vote {} to {}: no answer within {:.1} ms, abandoned",
                self.vote,
                self.peer,
                self.sent.elapsed().as_secs_f64() * 1000.0
            );
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        match self.call(Request::AppendEntries(rpc)).await {
            Ok(Response::AppendEntries(Ok(r))) => Ok(r),
            Ok(Response::AppendEntries(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(other) => Err(unexpected("AppendEntries", &other)),
            Err(e) => Err(to_rpc_error(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        // One line per peer and election round, so a slow failover can be read from the log.
        // openraft drops this future after `election_timeout_min`; `VoteOutcome` logs that too.
        let mut outcome = VoteOutcome::new(&self.name, rpc.vote);
        let res = match self.call(Request::Vote(rpc)).await {
            Ok(Response::Vote(Ok(r))) => Ok(r),
            Ok(Response::Vote(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(other) => Err(unexpected("Vote", &other)),
            Err(e) => Err(to_rpc_error(e)),
        };
        outcome.done(&res);
        res
    }

    /// Never called: [`Self::full_snapshot`] is overridden and sends the
    /// snapshot in one frame instead of chunks.
    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let e = io::Error::other("chunked InstallSnapshot is not used by this transport");
        Err(RPCError::Network(NetworkError::new(&e)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl futures::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let req = Request::FullSnapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot.into_inner(),
        };
        let res = futures::select! {
            r = self.call(req).fuse() => r,
            closed = cancel.fuse() => return Err(StreamingError::Closed(closed)),
        };
        match res {
            Ok(Response::FullSnapshot(Ok(r))) => Ok(r),
            Ok(Response::FullSnapshot(Err(e))) => Err(StreamingError::RemoteError(
                RemoteError::new(self.target, e),
            )),
            Ok(other) => {
                let e = io::Error::other(format!("expected FullSnapshot answer, got {other:?}"));
                Err(StreamingError::Network(NetworkError::new(&e)))
            }
            Err(e @ CallError::Unreachable(_)) => {
                Err(StreamingError::Unreachable(Unreachable::new(&e)))
            }
            Err(e @ CallError::Network(_)) => Err(StreamingError::Network(NetworkError::new(&e))),
        }
    }

    /// Constant backoff of about one heartbeat interval after `Unreachable`.
    ///
    /// openraft's default is a constant 500 ms. That is too long here: a
    /// restarted follower loads a committed vote and waits
    /// `election_timeout_max + random(election_timeout)` (450–600 ms with the
    /// defaults) before standing for election; if the leader's first heartbeat
    /// after the restart came only 500 ms after the refused connect, the
    /// follower could start an election, bump the term and depose a healthy
    /// leader. Connecting to a down peer on a LAN costs one refused SYN.
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(self.backoff))
    }
}

// ---------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------

/// Accepts peer connections until the task is aborted (dropping the
/// `JoinSet` then aborts every connection task too).
///
/// Vote requests are refused until `no_votes_until`: see [`refuse_vote`].
pub async fn serve(listener: TcpListener, server: Arc<Server>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, addr)) => {
                    conns.spawn(serve_conn(sock, addr, server.clone()));
                }
                Err(e) => {
                    log::warn!("accept on raft listener failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// What the listening side needs to answer requests; one per node, shared by connections.
pub struct Server {
    /// The local Raft.
    pub raft: Raft,
    /// Our node id.
    pub me: NodeId,
    /// Configured peers, to identify who connects.
    pub peers: Arc<PeerMap>,
    /// Votes are refused before this instant (see [`refuse_vote`]).
    pub no_votes_until: tokio::time::Instant,
    /// Votes are refused while this node's VIP may be up.
    pub gate: Arc<VoteGate>,
    /// When this node last accepted an append from a leader.
    pub contact: LeaderContact,
    /// openraft's follower lease (`election_timeout_max`): how long an accepted append
    /// makes this node deny pre-votes.
    pub lease: Duration,
}

/// When this node last accepted an AppendEntries (or a snapshot) from a legitimate leader.
///
/// Also orders those acceptances against [`LeaderContact::unless_heard_within`]: the server
/// hands each append and snapshot to Raft inside [`LeaderContact::accepting`], so an action run
/// by `unless_heard_within` never overlaps one, and Raft sees anything sent by the action before
/// any append accepted after the check (one FIFO queue feeds openraft's core).
#[derive(Debug, Clone)]
pub struct LeaderContact(Arc<ContactInner>);

#[derive(Debug)]
struct ContactInner {
    last: Mutex<Instant>,
    accepting: tokio::sync::RwLock<()>,
}

impl LeaderContact {
    /// Starts as "just now": a node that (re)starts assumes a leader may exist.
    pub fn new() -> LeaderContact {
        LeaderContact(Arc::new(ContactInner {
            last: Mutex::new(Instant::now()),
            accepting: tokio::sync::RwLock::new(()),
        }))
    }
    /// Records a contact now.
    pub fn touch(&self) {
        *lock(&self.0.last) = Instant::now();
    }
    /// Time since the last contact.
    pub fn age(&self) -> Duration {
        lock(&self.0.last).elapsed()
    }
    /// Runs `f`, which hands a leader's message to Raft and calls [`LeaderContact::touch`] if
    /// Raft accepted it. Any number may run at once; none while `unless_heard_within` acts.
    pub async fn accepting<F: Future>(&self, f: F) -> F::Output {
        let _accepting = self.0.accepting.read().await;
        f.await
    }
    /// Runs `act` only if no leader's message has been accepted for `window`, with no message
    /// being accepted meanwhile; `None` if one was accepted within `window`.
    pub async fn unless_heard_within<F: Future>(
        &self,
        window: Duration,
        act: F,
    ) -> Option<F::Output> {
        let _quiet = self.0.accepting.write().await;
        if self.age() < window {
            return None;
        }
        Some(act.await)
    }
}

impl Default for LeaderContact {
    fn default() -> Self {
        LeaderContact::new()
    }
}

/// Who is on the other end of an inbound connection, for log lines.
struct Remote {
    addr: SocketAddr,
    peer: Option<(NodeId, String)>,
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.peer {
            Some((id, name)) => write!(f, "{} (peer {name}, id {id:#x})", self.addr),
            None => write!(f, "{} (unidentified)", self.addr),
        }
    }
}

async fn serve_conn(sock: TcpStream, addr: SocketAddr, server: Arc<Server>) {
    let (me, peers) = (server.me, &server.peers);
    let mut remote = Remote { addr, peer: None };
    if let Err(e) = sock.set_nodelay(true) {
        log::debug!("set TCP_NODELAY for {remote}: {e}");
    }
    let (mut rd, mut wr) = sock.into_split();

    let hello =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame::<_, Frame<Request>>(&mut rd)).await;
    let (id, from) = match hello {
        Err(_) => {
            log::warn!(
                "closing raft connection from {remote}: no hello within {HANDSHAKE_TIMEOUT:?}"
            );
            return;
        }
        Ok(Err(e)) => {
            log::warn!("closing raft connection from {remote}: {e}");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(Frame {
            id,
            body:
                Request::Hello {
                    magic,
                    version,
                    from,
                    to,
                },
        }))) => {
            let refusal = if magic != PROTOCOL_MAGIC || version != PROTOCOL_VERSION {
                Some(format!("unsupported protocol {magic:?} v{version}"))
            } else if to != me {
                Some(format!("this is node {me:#x}, not {to:#x}"))
            } else if from == me || !peers.contains_key(&from) {
                Some(format!("node {from:#x} is not a configured peer"))
            } else {
                None
            };
            if let Some(r) = refusal {
                log::warn!("refusing raft connection from {remote}: {r}");
                let _ = tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    write_frame(
                        &mut wr,
                        &Frame {
                            id,
                            body: Response::Error(r),
                        },
                    ),
                )
                .await;
                return;
            }
            (id, from)
        }
        Ok(Ok(Some(other))) => {
            log::warn!(
                "closing raft connection from {remote}: first frame is not a hello: {:?}",
                other.body
            );
            return;
        }
    };
    let name = peers.get(&from).map(|p| p.id.clone()).unwrap_or_default();
    remote.peer = Some((from, name));
    let ack = Frame {
        id,
        body: Response::HelloAck { node: me },
    };
    if let Err(e) = write_frame(&mut wr, &ack).await {
        log::warn!("closing raft connection from {remote}: {e}");
        return;
    }
    log::debug!("accepted raft connection from {remote}");

    loop {
        let frame = match tokio::time::timeout(
            IDLE_TIMEOUT,
            read_frame::<_, Frame<Request>>(&mut rd),
        )
        .await
        {
            Err(_) => {
                log::debug!("closing idle raft connection from {remote}");
                return;
            }
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                log::warn!("closing raft connection from {remote}: {e}");
                return;
            }
        };
        let body = handle_request(&server, from, frame.body, &remote).await;
        let close = matches!(body, Response::Error(_));
        if let Err(e) = write_frame(&mut wr, &Frame { id: frame.id, body }).await {
            log::warn!("closing raft connection from {remote}: {e}");
            return;
        }
        if close {
            return;
        }
    }
}

async fn handle_request(server: &Server, from: NodeId, req: Request, remote: &Remote) -> Response {
    let (raft, me, gate) = (&server.raft, server.me, &server.gate);
    match req {
        Request::AppendEntries(r) => {
            let contact = &server.contact;
            contact
                .accepting(async {
                    let answer = raft.append_entries(r).await;
                    // A conflict still comes from the legitimate leader; a higher vote means the
                    // sender is a deposed one, which is no leader contact.
                    if matches!(&answer, Ok(a) if !matches!(a, AppendEntriesResponse::HigherVote(_)))
                    {
                        contact.touch();
                    }
                    Response::AppendEntries(answer)
                })
                .await
        }
        Request::PreVote { last_log_index } => Response::PreVote(pre_vote(server, last_log_index)),
        Request::Vote(r) if tokio::time::Instant::now() < server.no_votes_until => {
            log::info!("refusing vote for {} from {remote}: just started", r.vote);
            Response::Vote(Ok(refuse_vote(raft)))
        }
        Request::Vote(r) => {
            let candidate = r.vote;
            let started = Instant::now();
            let granted =
                |res: &Result<VoteResponse<NodeId>, _>| matches!(res, Ok(v) if v.vote_granted);
            match gate.vote(raft.vote(r), granted).await {
                Some(answer) => {
                    let ms = started.elapsed().as_secs_f64() * 1000.0;
                    match &answer {
                        Ok(v) if v.vote_granted => {
                            log::info!("granted vote {candidate} to {remote} in {ms:.1} ms")
                        }
                        Ok(v) => log::info!(
                            "refused vote {candidate} from {remote} in {ms:.1} ms (our vote {})",
                            v.vote
                        ),
                        Err(e) => log::warn!("vote {candidate} from {remote}: {e}"),
                    }
                    Response::Vote(answer)
                }
                None => {
                    log::info!(
                        "refusing vote for {candidate} from {remote}: this node's VIP may be up"
                    );
                    Response::Vote(Ok(refuse_vote(raft)))
                }
            }
        }
        Request::FullSnapshot { vote, meta, data } => {
            let snapshot = Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            };
            let contact = &server.contact;
            contact
                .accepting(async {
                    let answer = raft.install_full_snapshot(vote, snapshot).await;
                    // Accepted: our vote is now the sender's. Otherwise it is a deposed leader.
                    if matches!(&answer, Ok(a) if a.vote == vote) {
                        contact.touch();
                    }
                    Response::FullSnapshot(answer)
                })
                .await
        }
        Request::Handover { from: leader } => {
            Response::Handover(start_handover_election(raft, me, from, leader, remote).await)
        }
        Request::Hello { .. } => {
            log::warn!("closing raft connection from {remote}: second hello");
            Response::Error("hello already received".into())
        }
    }
}

/// Answers a pre-vote: yes only if this node would consider a real vote now — it is not the
/// leader, has heard from none within its lease, and the asker's log is at least as long.
fn pre_vote(server: &Server, asker_last: Option<u64>) -> bool {
    let m = server.raft.metrics().borrow().clone();
    m.state != ServerState::Leader
        && server.contact.age() >= server.lease
        && asker_last >= m.last_log_index
}

/// A vote refusal carrying our current vote, as openraft's own refusals do (a candidate that
/// sees a higher vote steps back), and no log id, so the candidate learns nothing else.
///
/// Why a node refuses every vote for `election_timeout_max` after it starts: before a crash
/// it may have acknowledged a leader's heartbeats, and that leader holds the VIP on the lease
/// those acknowledgements give it. A follower keeps that promise in memory (openraft's leader
/// lease), so a restart forgets it. Refusing votes for one lease length after start keeps the
/// promise across a restart of any speed, and equally when the state directory was lost.
fn refuse_vote(raft: &Raft) -> VoteResponse<NodeId> {
    let vote = raft.metrics().borrow().vote;
    VoteResponse::new(vote, None, false)
}

/// Receiving side of a planned handover: stand for election now, but only if
/// the request comes from the leader we follow and we can win.
async fn start_handover_election(
    raft: &Raft,
    me: NodeId,
    conn_peer: NodeId,
    leader: NodeId,
    remote: &Remote,
) -> Result<(), String> {
    let m = raft.metrics().borrow().clone();
    if leader != conn_peer {
        return Err(format!("handover for {leader:#x} sent by {conn_peer:#x}"));
    }
    if m.current_leader != Some(leader) {
        return Err(format!(
            "sender {leader:#x} is not the leader I follow ({:?})",
            m.current_leader
        ));
    }
    if m.state != ServerState::Follower
        || !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == me)
    {
        return Err(format!("not a voting follower (state {:?})", m.state));
    }
    log::info!("handover requested by leader {remote}: starting an election now");
    raft.trigger().elect().await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn decode(bytes: &[u8]) -> Result<Option<Frame<Request>>, FrameError> {
        let mut r = bytes;
        read_frame(&mut r).await
    }

    #[tokio::test]
    async fn frame_roundtrip() {
        let msg = Frame {
            id: 7,
            body: Request::Handover { from: 42 },
        };
        let bytes = encode_frame(&msg).unwrap();
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
        let full = encode_frame(&Frame {
            id: 1,
            body: Request::Handover { from: 1 },
        })
        .unwrap();
        assert!(matches!(
            decode(&full[..full.len() - 1]).await,
            Err(FrameError::Truncated)
        ));
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
        assert!(matches!(encode_frame(&big), Err(FrameError::TooLarge(_))));
    }
}
