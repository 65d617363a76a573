//! The listening side: accept (with connection limits), handshake, then answer requests in
//! order, each checked against [`bounds`] before openraft sees it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::io::{self, Cursor};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::raft::{AppendEntriesResponse, VoteResponse};
use openraft::{ServerState, Snapshot};
use serde::Serialize;
use tokio::io::AsyncWrite;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{self, AbortHandle, JoinSet};

use super::client::RPC_TIMEOUT;
use super::codec::{read_frame, write_frame, Frame, FrameError, Request, Response};
use super::handshake::{self, Refused};
use super::Peers;
use crate::cluster::auth::{FrameMac, SharedKeys};
use crate::cluster::bounds::{self, Ours, OutOfBounds};
use crate::cluster::counters;
use crate::cluster::elections::LeaderContact;
use crate::cluster::gate::VoteGate;
use crate::cluster::lograte::{self, LogRate, PerSource};
use crate::cluster::membership::{self, Admin};
use crate::cluster::types::{NodeId, Raft};

/// An inbound connection that carries no frame for this long is closed.
///
/// A leader sends heartbeats every `heartbeat_interval`, so only connections
/// used for votes go quiet; dropping them frees tasks held by peers that died
/// without closing their sockets. The dialing side reconnects on next use.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Most inbound Raft connections open at once; a new one beyond is closed at once.
///
/// A peer keeps two (one per hedging lane), so a cluster of any sensible size needs a few
/// dozen; unidentified connections last at most [`super::handshake::HANDSHAKE_TIMEOUT`].
pub const MAX_CONNS: usize = 128;

/// Most inbound Raft connections from one source address; a new one beyond closes the oldest.
///
/// A peer keeps two, and a few more for a moment while a reconnect overlaps the close of the
/// old ones.
pub const MAX_CONNS_PER_SOURCE: usize = 8;

/// Limit for writing one frame to a peer; a peer that stops reading is dropped.
pub const WRITE_TIMEOUT: Duration = RPC_TIMEOUT;

/// Pause after a failed `accept()` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts peer connections until the task is aborted (dropping the
/// `JoinSet` then aborts every connection task too).
///
/// Vote requests are refused until `no_votes_until`: see [`refuse_vote`].
/// Connection limits: at most [`MAX_CONNS`] in all (a new one beyond is closed at once) and
/// [`MAX_CONNS_PER_SOURCE`] per source address (a new one beyond closes the oldest from that
/// address, so a peer reconnecting is never locked out by its own half-dead connections, and
/// one source cannot take more than its share).
pub async fn serve(listener: TcpListener, server: Arc<Server>) {
    let mut conns = JoinSet::new();
    let mut by_source: HashMap<IpAddr, VecDeque<AbortHandle>> = HashMap::new();
    let mut source_of: HashMap<task::Id, IpAddr> = HashMap::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, addr)) => {
                    let ip = addr.ip().to_canonical();
                    if conns.len() >= MAX_CONNS {
                        counters::PEER_CONNECTIONS_LIMITED.fetch_add(1, Ordering::Relaxed);
                        if let Some(held) = server.limit_log.allow() {
                            log::warn!(
                                "closing raft connection from {addr}: {MAX_CONNS} connections open{}",
                                lograte::suppressed(held)
                            );
                        }
                        continue;
                    }
                    let open = by_source.entry(ip).or_default();
                    if open.len() >= MAX_CONNS_PER_SOURCE {
                        counters::PEER_CONNECTIONS_LIMITED.fetch_add(1, Ordering::Relaxed);
                        if let Some(oldest) = open.pop_front() {
                            oldest.abort();
                        }
                        if let Some(held) = server.limit_log.allow() {
                            log::warn!(
                                "{ip} has {MAX_CONNS_PER_SOURCE} raft connections open: closing its oldest{}",
                                lograte::suppressed(held)
                            );
                        }
                    }
                    let handle = conns.spawn(serve_conn(sock, addr, server.clone()));
                    source_of.insert(handle.id(), ip);
                    open.push_back(handle);
                }
                Err(e) => {
                    log::warn!("accept on raft listener failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(done) = conns.join_next_with_id(), if !conns.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                if let Some(ip) = source_of.remove(&id) {
                    if let Some(open) = by_source.get_mut(&ip) {
                        open.retain(|h| h.id() != id);
                        if open.is_empty() {
                            by_source.remove(&ip);
                        }
                    }
                }
            }
        }
    }
}

/// Writes one frame within [`WRITE_TIMEOUT`]: a peer that stops reading is dropped, not waited for.
async fn write_within<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
    mac: &mut FrameMac,
) -> Result<(), FrameError> {
    tokio::time::timeout(WRITE_TIMEOUT, write_frame(w, msg, mac))
        .await
        .map_err(|_| {
            FrameError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("peer did not take a frame within {WRITE_TIMEOUT:?}"),
            ))
        })?
}

/// What the listening side needs to answer requests; one per node, shared by connections.
pub struct Server {
    /// The local Raft.
    pub raft: Raft,
    /// Our node id.
    pub me: NodeId,
    /// Known peers (configured, and named by the membership), to identify who connects.
    pub peers: Arc<Peers>,
    /// Answers membership changes forwarded by other members.
    pub admin: Admin,
    /// The peers of the config file: the voters as long as this node has no membership at
    /// all (a brand-new cluster's first election, before any entry reached this node).
    pub configured: BTreeSet<NodeId>,
    /// Votes are refused before this instant (see [`refuse_vote`]).
    pub no_votes_until: tokio::time::Instant,
    /// Votes are refused while this node's VIP may be up.
    pub gate: Arc<VoteGate>,
    /// When this node last accepted an append from a leader.
    pub contact: LeaderContact,
    /// openraft's follower lease (`election_timeout_max`): how long an accepted append
    /// makes this node deny pre-votes.
    pub lease: Duration,
    /// Rate limit for lines about refused or garbled handshakes (before a peer is identified).
    pub refusal_log: LogRate,
    /// Rate limit for lines about refused frames from identified peers (bounds, bad tags).
    pub frame_log: LogRate,
    /// Rate limit for lines about connection limits.
    pub limit_log: LogRate,
    /// Rate limit for lines about failed authentication, per source address.
    pub auth_log: PerSource,
    /// The keys of `peerKeyFile`; `None`: unauthenticated, peers identified by address.
    pub keys: Option<Arc<SharedKeys>>,
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
    let (me, peers) = (server.me, server.peers.snapshot());
    let mut remote = Remote { addr, peer: None };
    if let Err(e) = sock.set_nodelay(true) {
        log::debug!("set TCP_NODELAY for {remote}: {e}");
    }
    let (mut rd, mut wr) = sock.into_split();

    let ring = server.keys.as_ref().map(|k| k.current());
    let keys = ring.as_deref();
    let (from, mut session) =
        match handshake::server_hello(&mut rd, &mut wr, addr, me, &peers, keys).await {
            Ok(ok) => ok,
            Err(Refused::Auth(why)) => {
                if let Some(held) = server.auth_log.allow(addr.ip()) {
                    log::warn!(
                        "refusing raft connection from {remote}: {why}{}",
                        lograte::suppressed(held)
                    );
                }
                return;
            }
            Err(Refused::Closed) => return,
            Err(Refused::Silent(why)) => {
                if let Some(held) = server.refusal_log.allow() {
                    log::warn!(
                        "closing raft connection from {remote}: {why}{}",
                        lograte::suppressed(held)
                    );
                }
                return;
            }
            Err(Refused::Answered(why)) => {
                if let Some(held) = server.refusal_log.allow() {
                    log::warn!(
                        "refusing raft connection from {remote}: {why}{}",
                        lograte::suppressed(held)
                    );
                }
                return;
            }
        };
    let name = peers.get(&from).map(|p| p.id.clone()).unwrap_or_default();
    remote.peer = Some((from, name));
    log::debug!("accepted raft connection from {remote}");

    loop {
        let frame = match tokio::time::timeout(
            IDLE_TIMEOUT,
            read_frame::<_, Frame<Request>>(&mut rd, &mut session.recv),
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
                if matches!(e, FrameError::Auth(_)) {
                    counters::PEER_FRAMES_REFUSED.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(held) = server.frame_log.allow() {
                    log::warn!(
                        "closing raft connection from {remote}: {e}{}",
                        lograte::suppressed(held)
                    );
                }
                return;
            }
        };
        let body = handle_request(&server, from, frame.body, &remote).await;
        let close = matches!(body, Response::Error(_));
        if let Err(e) =
            write_within(&mut wr, &Frame { id: frame.id, body }, &mut session.send).await
        {
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
    let ours = Ours::of(&raft.metrics().borrow());
    if let Err(e) = check_request(&req, ours, from) {
        counters::PEER_FRAMES_REFUSED.fetch_add(1, Ordering::Relaxed);
        if let Some(held) = server.frame_log.allow() {
            log::warn!(
                "refusing {} from {remote} and closing the connection: {e}{}",
                req.kind(),
                lograte::suppressed(held)
            );
        }
        return Response::Error(format!("refused: {e}"));
    }
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
        Request::PreVote { last_log_index } => Response::PreVote(
            is_voter(server, from, "pre-vote", remote) && pre_vote(server, last_log_index),
        ),
        Request::Vote(_) if !is_voter(server, from, "vote", remote) => {
            Response::Vote(Ok(refuse_vote(raft)))
        }
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
        Request::Members(change) => {
            Response::Members(server.admin.serve_forwarded(from, change).await)
        }
        Request::Handover { from: leader } => {
            Response::Handover(start_handover_election(raft, me, from, leader, remote).await)
        }
        Request::Hello { .. } | Request::Auth { .. } => {
            log::warn!(
                "closing raft connection from {remote}: handshake frame after the handshake"
            );
            Response::Error("handshake already done".into())
        }
    }
}

/// Checks a request's terms, log ids and sender against [`bounds`] before openraft sees it.
fn check_request(req: &Request, ours: Ours, from: NodeId) -> Result<(), OutOfBounds> {
    match req {
        Request::AppendEntries(r) => {
            bounds::sent_by("AppendEntries vote", &r.vote, from)?;
            ours.vote("AppendEntries vote", &r.vote)?;
            ours.log_id("prev_log_id", &r.prev_log_id)?;
            ours.log_id("leader_commit", &r.leader_commit)?;
            for e in &r.entries {
                ours.log_id("entry", &Some(e.log_id))?;
            }
            Ok(())
        }
        Request::Vote(r) => {
            bounds::sent_by("Vote request", &r.vote, from)?;
            if r.vote.committed {
                // A candidate asks with its uncommitted vote; a committed one would install
                // the sender as leader in a single message.
                return Err(OutOfBounds("Vote request carries a committed vote".into()));
            }
            ours.vote("Vote request", &r.vote)?;
            ours.log_id("last_log_id", &r.last_log_id)
        }
        Request::FullSnapshot { vote, meta, .. } => {
            bounds::sent_by("FullSnapshot vote", vote, from)?;
            ours.vote("FullSnapshot vote", vote)?;
            ours.log_id("snapshot last_log_id", &meta.last_log_id)?;
            ours.log_id("snapshot membership", meta.last_membership.log_id())
        }
        Request::Hello { .. }
        | Request::Auth { .. }
        | Request::Handover { .. }
        | Request::PreVote { .. }
        | Request::Members(_) => Ok(()),
    }
}

/// Whether `from` is a voter of this node's current membership (either half of a joint one).
/// Votes and pre-votes from anyone else are refused before openraft sees them: a removed node
/// that missed its removal still believes it votes, and its higher term would otherwise depose
/// a healthy leader; a node that is not a member yet has no say either. A node with no
/// membership at all (fresh state) counts the peers of its config file instead, as the
/// bootstrap node does when it writes the first membership. Logged at most once per
/// [`lograte`] window.
fn is_voter(server: &Server, from: NodeId, what: &str, remote: &Remote) -> bool {
    let m = server.raft.metrics().borrow().clone();
    let voter = if m.membership_config.membership().nodes().next().is_none() {
        server.configured.contains(&from)
    } else {
        membership::voters(&m).contains(&from)
    };
    if voter {
        return true;
    }
    if let Some(held) = server.frame_log.allow() {
        log::warn!(
            "refusing {what} from {remote}: not a voter of the current membership (removed, or \
             not added yet){}",
            lograte::suppressed(held)
        );
    }
    false
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
    use openraft::raft::{AppendEntriesRequest, VoteRequest};
    use openraft::{SnapshotMeta, Vote};

    fn append(vote: Vote<NodeId>, entry_term: u64) -> Request {
        Request::AppendEntries(AppendEntriesRequest {
            vote,
            prev_log_id: None,
            entries: vec![openraft::Entry {
                log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(entry_term, 1), 1),
                payload: openraft::EntryPayload::Blank,
            }],
            leader_commit: None,
        })
    }

    /// The forged frames of issue 10: terms 2^40 and 2^64 - 1, a vote naming another node,
    /// a committed vote in a vote request. All refused before openraft sees them.
    #[test]
    fn forged_terms_and_identities_are_refused() {
        let ours = Ours {
            term: 3,
            last_index: Some(4),
        };
        let from = 2;
        assert!(check_request(&append(Vote::new_committed(3, from), 3), ours, from).is_ok());
        for term in [1 << 40, u64::MAX] {
            assert!(
                check_request(&append(Vote::new_committed(term, from), 3), ours, from).is_err()
            );
            assert!(
                check_request(&append(Vote::new_committed(3, from), term), ours, from).is_err()
            );
            let vote = Request::Vote(VoteRequest::new(Vote::new(term, from), None));
            assert!(check_request(&vote, ours, from).is_err());
            let snap = Request::FullSnapshot {
                vote: Vote::new_committed(term, from),
                meta: SnapshotMeta::default(),
                data: vec![],
            };
            assert!(check_request(&snap, ours, from).is_err());
        }
        // Claiming to speak for another node.
        let e = check_request(&append(Vote::new_committed(4, 3), 4), ours, from).unwrap_err();
        assert!(e.0.contains("connection is from"), "{e}");
        let vote = Request::Vote(VoteRequest::new(Vote::new(4, 3), None));
        assert!(check_request(&vote, ours, from).is_err());
        // A committed vote in a vote request.
        let vote = Request::Vote(VoteRequest::new(Vote::new_committed(4, from), None));
        assert!(check_request(&vote, ours, from).is_err());
        let vote = Request::Vote(VoteRequest::new(Vote::new(4, from), None));
        assert!(check_request(&vote, ours, from).is_ok());
    }
}
