//! The openraft adapter: [`Network`] is openraft's network factory, [`PeerConnection`] its view
//! of one peer; answers are checked against [`crate::cluster::bounds`] before openraft sees them.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::FutureExt;
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{Snapshot, Vote};
use tokio::sync::watch;

use super::client::{CallError, HedgedClient, PeerClient, RPC_TIMEOUT};
use super::codec::{clip, Request, Response};
use super::{lock, PeerName, Peers};
use crate::cluster::auth::SharedKeys;
use crate::cluster::bounds::{Ours, OutOfBounds};
use crate::cluster::membership::{Change, ChangeError};
use crate::cluster::types::{Metrics, Node, NodeId, TypeConfig};

struct NetInner {
    me: NodeId,
    /// Source address for outgoing connections (our own Raft listener's IP).
    local_ip: IpAddr,
    peers: Arc<Peers>,
    /// Sleep after an `Unreachable` error before openraft retries that peer.
    backoff: Duration,
    clients: Mutex<HashMap<NodeId, HedgedClient>>,
    /// Our Raft's metrics, once it runs: the reference point for checking answers ([`crate::cluster::bounds`]).
    metrics: OursSource,
    /// The keys of `peerKeyFile`, if set.
    keys: Option<Arc<SharedKeys>>,
    /// Followers this leader sends no appends to for now (see [`Network::mute`]).
    muted: Muted,
}

/// Followers a leader stops sending appends to, shared with every [`PeerConnection`].
type Muted = Arc<Mutex<BTreeSet<NodeId>>>;

/// Where answers find this node's current term and last log index (set once Raft runs).
type OursSource = Arc<OnceLock<watch::Receiver<Metrics>>>;

fn ours(src: &OursSource) -> Ours {
    src.get()
        .map(|rx| Ours::of(&rx.borrow()))
        .unwrap_or_default()
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
    pub fn new(
        me: NodeId,
        local_ip: IpAddr,
        peers: Arc<Peers>,
        backoff: Duration,
        keys: Option<Arc<SharedKeys>>,
    ) -> Network {
        Network {
            inner: Arc::new(NetInner {
                me,
                local_ip,
                peers,
                backoff,
                clients: Mutex::default(),
                metrics: OursSource::default(),
                keys,
                muted: Muted::default(),
            }),
        }
    }

    /// Hands over our Raft's metrics once it runs: answers are checked against them.
    pub fn set_metrics(&self, metrics: watch::Receiver<Metrics>) {
        let _ = self.inner.metrics.set(metrics);
    }

    /// The shared client for `target`, if it is a known peer ([`Peers`]).
    ///
    /// Addresses come from the local configuration where it names the peer, else from the
    /// membership (see [`Node`]).
    pub fn client(&self, target: NodeId) -> Option<HedgedClient> {
        let peer = self.inner.peers.get(target)?;
        let mut clients = lock(&self.inner.clients);
        let c = clients.entry(target).or_insert_with(|| {
            let lane = || {
                PeerClient::spawn(
                    self.inner.me,
                    self.inner.local_ip,
                    target,
                    peer.clone(),
                    self.inner.keys.clone(),
                    RPC_TIMEOUT,
                )
            };
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
            Ok(Ok(Response::Handover(r))) => r.map_err(|e| clip(&e)),
            Ok(Ok(other)) => Err(format!("unexpected answer {}", other.kind())),
        }
    }

    /// Forwards a membership change to `target` (the leader) on a connection of its own (a
    /// change may take seconds, and must neither hold up heartbeats nor be hedged: it is not
    /// idempotent); waits at most `limit`.
    pub async fn send_members(
        &self,
        target: NodeId,
        change: Change,
        limit: Duration,
    ) -> Result<Result<String, ChangeError>, String> {
        let peer = self
            .inner
            .peers
            .get(target)
            .ok_or_else(|| format!("node {target:#x} is not a known peer"))?;
        let client = PeerClient::spawn(
            self.inner.me,
            self.inner.local_ip,
            target,
            peer,
            self.inner.keys.clone(),
            limit,
        );
        match tokio::time::timeout(limit, client.call(Request::Members(change))).await {
            Err(_) => Err(format!("no answer within {limit:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            // The leader's text goes to a terminal and a log: clipped like anything from a peer.
            Ok(Ok(Response::Members(r))) => Ok(r.map(|t| clip(&t)).map_err(|e| match e {
                ChangeError::Refused(t) => ChangeError::Refused(clip(&t)),
                ChangeError::Retry(t) => ChangeError::Retry(clip(&t)),
            })),
            Ok(Ok(Response::Error(e))) => Err(clip(&e)),
            Ok(Ok(other)) => Err(format!("unexpected answer {}", other.kind())),
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

    /// Stops sending appends (heartbeats included) to `ids` until [`Network::unmute`]: their
    /// leader lease then runs out while the others keep ours alive. A leader about to be
    /// removed from a cluster of four or more voters does this so that its successor finds the
    /// votes it needs at once (see `membership`).
    pub fn mute(&self, ids: &BTreeSet<NodeId>) {
        lock(&self.inner.muted).extend(ids);
    }

    /// Sends appends to every follower again.
    pub fn unmute(&self) {
        lock(&self.inner.muted).clear();
    }

    /// Closes every outgoing connection (their tasks end when the clients drop).
    pub fn close(&self) {
        lock(&self.inner.clients).clear();
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerConnection {
        // A member added by `members add` is in no config file: the membership names it.
        self.inner.peers.learn(target, node);
        PeerConnection {
            target,
            name: self
                .inner
                .peers
                .get(target)
                .map(|p| PeerName(&p).to_string())
                .unwrap_or_else(|| format!("{target:#x}")),
            client: self.client(target),
            backoff: self.inner.backoff,
            ours: self.inner.metrics.clone(),
            muted: self.inner.muted.clone(),
        }
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
    /// Reference point for checking answers.
    ours: OursSource,
    /// Followers muted by [`Network::mute`].
    muted: Muted,
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

impl PeerConnection {
    /// Checks an answer's terms and log ids against [`crate::cluster::bounds`] (a forged or broken peer must
    /// not hand openraft a term it would overflow on); logs and describes a violation.
    fn check_answer(
        &self,
        kind: &str,
        check: impl FnOnce(Ours) -> Result<(), OutOfBounds>,
    ) -> Result<(), io::Error> {
        check(ours(&self.ours)).map_err(|e| {
            log::warn!("ignoring {kind} answer from {}: {e}", self.name);
            io::Error::other(format!("{kind} answer refused: {e}"))
        })
    }
}

fn to_rpc_error<E: std::error::Error>(e: CallError) -> RpcErr<E> {
    match e {
        CallError::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&e)),
        CallError::Network(_) => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected<E: std::error::Error>(what: &str, got: &Response) -> RpcErr<E> {
    let e = io::Error::other(format!("expected {what} answer, got {}", got.kind()));
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
                "vote {} to {} failed in {ms:.1} ms: {}",
                self.vote,
                self.peer,
                clip(&e.to_string())
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
        if lock(&self.muted).contains(&self.target) {
            let e = io::Error::other("muted for a planned handover");
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        }
        match self.call(Request::AppendEntries(rpc)).await {
            Ok(Response::AppendEntries(Ok(r))) => {
                self.check_answer("AppendEntries", |o| match &r {
                    AppendEntriesResponse::PartialSuccess(l) => o.log_id("matched log id", l),
                    AppendEntriesResponse::HigherVote(v) => o.vote("higher vote", v),
                    AppendEntriesResponse::Success | AppendEntriesResponse::Conflict => Ok(()),
                })
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                Ok(r)
            }
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
            Ok(Response::Vote(Ok(r))) => self
                .check_answer("Vote", |o| {
                    o.vote("voter's vote", &r.vote)?;
                    o.log_id("voter's last log id", &r.last_log_id)
                })
                .map(|()| r)
                .map_err(|e| RPCError::Network(NetworkError::new(&e))),
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
            Ok(Response::FullSnapshot(Ok(r))) => {
                self.check_answer("FullSnapshot", |o| o.vote("receiver's vote", &r.vote))
                    .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
                Ok(r)
            }
            Ok(Response::FullSnapshot(Err(e))) => Err(StreamingError::RemoteError(
                RemoteError::new(self.target, e),
            )),
            Ok(other) => {
                let e = io::Error::other(format!(
                    "expected FullSnapshot answer, got {}",
                    other.kind()
                ));
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
