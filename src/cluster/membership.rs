//! Membership changes (`kube-vip members list/add/remove`): the membership is Raft state (log
//! entries and the snapshot, see `store`), so it survives restarts of every node; the peers
//! in a node's config only seed a brand-new cluster and tell a new node whom to contact.
//!
//! ```text
//! CLI ─ unix socket ─▶ Admin::change (any voter) ─ Request::Members ─▶ Admin::execute (leader)
//!                                  ▲  retries while leadership moves (Retry)        │
//!                                  └──────────────── answer ◀───────────────────────┘
//! ```
//!
//! * add: `add_learner` (the new node catches up, bounded by [`CATCH_UP_TIMEOUT`]), then
//!   `change_membership` makes it a voter (joint configuration, then the new one).
//! * remove: a leader removing itself first hands leadership over (the planned handover
//!   SIGTERM uses) and answers [`ChangeError::Retry`]; the originator asks the new leader.
//!   The leader then turns the node into a learner (so it learns, from the log, that it no
//!   longer votes), waits briefly for it to see that, and drops it.
//! * refused: an unknown id, the last voter, a change that would leave fewer reachable voters
//!   than a quorum of the new set needs, a change while another is in progress, a request
//!   from a node that is not a voter.
//! * a leader that finds a committed joint configuration no change of its own is driving
//!   (its predecessor died mid-change) finishes it ([`watch_membership`]).

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::gate::VoteGate;
use super::types::{node_id, Metrics, Node, NodeId, TypeConfig};
use super::Handover;

/// Longest peer id accepted in a change (a DNS name's length; ids are names in logs).
pub const MAX_PEER_ID_LEN: usize = 253;
/// How long a new learner may take to catch up with the leader's log before `add` gives up
/// (it stays a learner: start it, then run `add` again, or `remove` it).
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit for one membership log entry to be committed.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a leader waits for a node it turned into a learner to receive that entry, before
/// dropping it altogether (a dead node never does).
pub const LEARN_REMOVAL_WAIT: Duration = Duration::from_secs(1);
/// A voter that answered the leader within this long counts as up for the quorum check.
pub const UP_WITHIN: Duration = Duration::from_secs(1);
/// How long a member waits for a leader to be known before answering "no leader known".
pub const LEADER_WAIT: Duration = Duration::from_secs(2);
/// How long the member that was asked keeps retrying while leadership moves.
pub const RETRY_FOR: Duration = Duration::from_secs(10);
/// Limit for a forwarded change, answer included (a catch-up and two commits fit).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(25);
/// Limit for a whole change as the CLI sees it (the socket exchange).
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(40);
/// Pause between two tries while leadership moves.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How long a leader removing itself waits for its agent to release the VIP.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// A change asked for by `kube-vip members add/remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Change {
    /// Add a node: learner first, voter once caught up.
    Add {
        /// Its peer id (its `localPeer` id).
        id: String,
        /// Its Raft address (its `localPeer` address and port).
        address: SocketAddr,
    },
    /// Remove a node (after a handover if it leads).
    Remove {
        /// Its peer id.
        id: String,
    },
}

impl Change {
    /// The peer id the change is about.
    pub fn id(&self) -> &str {
        match self {
            Change::Add { id, .. } | Change::Remove { id } => id,
        }
    }

    /// Input bounds, checked wherever a change arrives (socket or peer channel).
    pub fn check(&self) -> Result<(), String> {
        let id = self.id();
        if id.is_empty() {
            return Err("the peer id is empty".into());
        }
        if id.len() > MAX_PEER_ID_LEN {
            return Err(format!(
                "the peer id is {} bytes long; at most {MAX_PEER_ID_LEN}",
                id.len()
            ));
        }
        if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("the peer id contains whitespace or control characters".into());
        }
        if node_id(id) == 0 {
            return Err(format!(
                "peer id {id:?} hashes to node id 0, which openraft reserves; pick another"
            ));
        }
        if let Change::Add { address, .. } = self {
            if address.port() == 0 || address.ip().is_unspecified() {
                return Err(format!(
                    "address {address} cannot be dialed: give the node's Raft ip:port"
                ));
            }
        }
        Ok(())
    }
}

/// Why a change was not made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ChangeError {
    /// Refused for good; the text says why.
    #[error("{0}")]
    Refused(String),
    /// Not done because leadership is moving; the member that was asked tries again.
    #[error("{0}")]
    Retry(String),
}

/// One member as `members list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Peer id.
    pub id: String,
    /// Raft address.
    pub address: String,
    /// `voter` or `learner`.
    pub role: String,
    /// Whether it is the leader this node knows of.
    pub leader: bool,
}

/// The membership as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// The node that answered.
    pub node: String,
    /// Raft term it is in.
    pub term: u64,
    /// Every member, voters first.
    pub members: Vec<Member>,
    /// A change is half done (joint configuration): `old voters -> new voters`.
    pub changing: Option<String>,
}

/// The voters of the effective membership, across a joint configuration.
pub fn voters(m: &Metrics) -> BTreeSet<NodeId> {
    m.membership_config.membership().voter_ids().collect()
}

/// The voter sets a quorum is counted in: one, or two in a joint configuration.
pub fn quorum_sets(m: &Metrics) -> Vec<BTreeSet<NodeId>> {
    m.membership_config.membership().get_joint_config().clone()
}

/// Whether `granted` (voters that said yes) holds a majority of every set of `sets`.
pub fn has_quorum(sets: &[BTreeSet<NodeId>], granted: &BTreeSet<NodeId>) -> bool {
    !sets.is_empty()
        && sets
            .iter()
            .all(|s| s.intersection(granted).count() > s.len() / 2)
}

fn is_joint(m: &Metrics) -> bool {
    m.membership_config.membership().get_joint_config().len() > 1
}

/// The effective membership's entry is applied here (so it is committed).
pub(super) fn committed(m: &Metrics) -> bool {
    match (m.membership_config.log_id(), m.last_applied) {
        (None, _) => true,
        (Some(l), Some(a)) => l.index <= a.index,
        (Some(_), None) => false,
    }
}

/// Where this node stands in the membership, for the one log line per change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// No membership at all: a fresh node that was never added.
    NotYet,
    /// A learner (being added, or removed and not yet dropped).
    Learner,
    /// A voter.
    Voter,
    /// Not in a non-empty membership.
    Out,
}

fn standing(m: &Metrics, me: NodeId) -> Standing {
    let ms = m.membership_config.membership();
    if ms.nodes().next().is_none() {
        Standing::NotYet
    } else if ms.voter_ids().any(|v| v == me) {
        Standing::Voter
    } else if ms.learner_ids().any(|l| l == me) {
        Standing::Learner
    } else {
        Standing::Out
    }
}

/// A membership change's driver and the `members list` source; one per node, cheap to clone.
#[derive(Clone)]
pub struct Admin {
    /// The planned handover; through it also this node's Raft, id, peers and network (one copy).
    handover: Handover,
    gate: Arc<VoteGate>,
    /// Tells the lease to give up the VIP (a leader removing itself hands over first).
    step_down: Arc<watch::Sender<bool>>,
    /// One change at a time on this node.
    busy: Arc<tokio::sync::Mutex<()>>,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Admin({:#x})", self.handover.me)
    }
}

impl Admin {
    /// Everything a change needs; built by `Cluster::start`.
    pub(super) fn new(
        handover: Handover,
        gate: Arc<VoteGate>,
        step_down: Arc<watch::Sender<bool>>,
    ) -> Admin {
        Admin {
            handover,
            gate,
            step_down,
            busy: Arc::default(),
        }
    }

    fn metrics(&self) -> Metrics {
        self.handover.raft.metrics().borrow().clone()
    }

    /// A member's peer id: from the membership, else the known peers, else its node id.
    fn name(&self, m: &Metrics, id: NodeId) -> String {
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.peer_id.clone())
            .or_else(|| self.handover.peers.get(id).map(|p| p.id))
            .unwrap_or_else(|| format!("{id:#x}"))
    }

    fn names(&self, m: &Metrics, ids: &BTreeSet<NodeId>) -> String {
        let mut v: Vec<String> = ids.iter().map(|id| self.name(m, *id)).collect();
        v.sort();
        v.join(", ")
    }

    /// The membership as this node sees it (no forwarding: every member has the log).
    pub fn list(&self) -> Result<Members, String> {
        let m = self.metrics();
        let ms = m.membership_config.membership();
        if ms.nodes().next().is_none() {
            return Err(format!(
                "this node ({}) is not a member of any cluster yet: run `kube-vip members list` \
                 on a member",
                self.name(&m, self.handover.me)
            ));
        }
        let voters = voters(&m);
        let mut members: Vec<Member> = ms
            .nodes()
            .map(|(id, node)| Member {
                id: node.peer_id.clone(),
                address: node.addr.clone(),
                role: if voters.contains(id) {
                    "voter"
                } else {
                    "learner"
                }
                .into(),
                leader: m.current_leader == Some(*id),
            })
            .collect();
        members.sort_by_key(|x| (x.role != "voter", x.id.clone()));
        let sets = quorum_sets(&m);
        let changing = (sets.len() > 1).then(|| {
            format!(
                "{} -> {}",
                self.names(&m, &sets[0]),
                self.names(&m, &sets[sets.len() - 1])
            )
        });
        Ok(Members {
            node: self.name(&m, self.handover.me),
            term: m.current_term,
            members,
            changing,
        })
    }

    /// Makes `change` on behalf of the CLI: at the leader (forwarding it there if this node
    /// follows), trying again while leadership moves, for at most [`RETRY_FOR`] plus one try.
    pub async fn change(&self, change: Change) -> Result<String, ChangeError> {
        change.check().map_err(ChangeError::Refused)?;
        let started = Instant::now();
        loop {
            let m = self.metrics();
            if !voters(&m).contains(&self.handover.me) {
                return Err(ChangeError::Refused(format!(
                    "this node ({}) is not a voting member of the cluster: run the command on a \
                     member",
                    self.name(&m, self.handover.me)
                )));
            }
            let leader = match m.current_leader {
                Some(l) => l,
                None => {
                    let mut rx = self.handover.raft.metrics();
                    let got = matches!(
                        tokio::time::timeout(
                            LEADER_WAIT,
                            rx.wait_for(|m| m.current_leader.is_some()),
                        )
                        .await,
                        Ok(Ok(_))
                    );
                    if got {
                        continue;
                    }
                    return Err(ChangeError::Refused("no leader known: retry".into()));
                }
            };
            let result = if leader == self.handover.me {
                self.execute(change.clone()).await
            } else {
                match self
                    .handover
                    .network
                    .send_members(leader, change.clone(), FORWARD_TIMEOUT)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => Err(ChangeError::Retry(format!(
                        "leader {} did not answer: {e}",
                        self.name(&m, leader)
                    ))),
                }
            };
            match result {
                Err(ChangeError::Retry(why)) if started.elapsed() < RETRY_FOR => {
                    log::info!("membership change {change:?}: {why}; trying again");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(ChangeError::Retry(why)) => {
                    return Err(ChangeError::Refused(format!(
                        "{why}; gave up after {RETRY_FOR:?}: retry"
                    )))
                }
                other => return other,
            }
        }
    }

    /// Answers a change forwarded by `from` over the peer channel.
    pub async fn serve_forwarded(
        &self,
        from: NodeId,
        change: Change,
    ) -> Result<String, ChangeError> {
        change.check().map_err(ChangeError::Refused)?;
        let m = self.metrics();
        if !voters(&m).contains(&from) {
            let name = self.name(&m, from);
            log::warn!("refusing membership change {change:?} from {name}: not a voter");
            return Err(ChangeError::Refused(format!(
                "{name} is not a voting member: only members may change the membership"
            )));
        }
        match tokio::time::timeout(FORWARD_TIMEOUT, self.execute(change)).await {
            Ok(r) => r,
            Err(_) => Err(ChangeError::Refused(format!(
                "the leader did not finish the change within {FORWARD_TIMEOUT:?}: check `members list`"
            ))),
        }
    }

    /// Makes `change` on this node, which must be the leader.
    async fn execute(&self, change: Change) -> Result<String, ChangeError> {
        let Ok(_busy) = self.busy.try_lock() else {
            return Err(ChangeError::Refused(
                "a membership change is already in progress: retry when it completes".into(),
            ));
        };
        let m = self.metrics();
        if m.state != ServerState::Leader {
            return Err(ChangeError::Retry(format!(
                "{} is no longer the leader",
                self.name(&m, self.handover.me)
            )));
        }
        if is_joint(&m) || !committed(&m) {
            return Err(ChangeError::Refused(
                "a membership change is already in progress: retry when it completes".into(),
            ));
        }
        log::info!("membership change asked: {change:?}");
        let result = match &change {
            Change::Add { id, address } => self.add(&m, id, *address).await,
            Change::Remove { id } => self.remove(&m, id).await,
        };
        match &result {
            Ok(done) => log::info!("membership change done: {done}"),
            Err(e) => log::warn!("membership change {change:?} not made: {e}"),
        }
        result
    }

    /// Voters (of `among`) that answered within [`UP_WITHIN`]; this node always counts.
    fn up(&self, among: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
        among
            .iter()
            .copied()
            .filter(|id| {
                *id == self.handover.me
                    || self
                        .handover
                        .network
                        .last_answer_age(*id)
                        .is_some_and(|a| a < UP_WITHIN)
            })
            .collect()
    }

    /// Refuses a change to `new` voters unless enough of them are up for a quorum.
    fn check_quorum(
        &self,
        m: &Metrics,
        what: &str,
        new: &BTreeSet<NodeId>,
        also_up: Option<NodeId>,
    ) -> Result<(), ChangeError> {
        let mut up = self.up(new);
        up.extend(also_up.filter(|id| new.contains(id)));
        let need = new.len() / 2 + 1;
        if up.len() < need {
            let down: BTreeSet<NodeId> = new.difference(&up).copied().collect();
            return Err(ChangeError::Refused(format!(
                "{what} would leave {} of {} voters reachable, fewer than the {need} a quorum \
                 needs (not answering: {}): bring a voter back first",
                up.len(),
                new.len(),
                self.names(m, &down)
            )));
        }
        Ok(())
    }

    async fn add(&self, m: &Metrics, id: &str, address: SocketAddr) -> Result<String, ChangeError> {
        let nid = node_id(id);
        let ms = m.membership_config.membership();
        let voters = voters(m);
        if voters.contains(&nid) {
            return Err(ChangeError::Refused(format!("{id} is already a voter")));
        }
        if let Some((other, _)) = ms
            .nodes()
            .find(|(other, n)| **other != nid && n.addr == address.to_string())
        {
            return Err(ChangeError::Refused(format!(
                "address {address} is already used by member {}",
                self.name(m, *other)
            )));
        }
        if let Some(n) = ms.get_node(&nid) {
            if n.peer_id != id {
                return Err(ChangeError::Refused(format!(
                    "peer id {id:?} hashes to the same node id as member {}; pick another",
                    n.peer_id
                )));
            }
        }
        let mut new = voters.clone();
        new.insert(nid);
        // Checked before anything is written too: a change that cannot commit must not start.
        self.check_quorum(m, &format!("adding {id}"), &new, Some(nid))?;
        let node = Node {
            peer_id: id.to_string(),
            addr: address.to_string(),
        };
        self.handover.peers.learn(nid, &node);
        let learner_at = match ms.get_node(&nid) {
            Some(_) => m.membership_config.log_id().map(|l| l.index),
            None => {
                let r = tokio::time::timeout(
                    COMMIT_TIMEOUT,
                    self.handover.raft.add_learner(nid, node.clone(), false),
                )
                .await
                .map_err(|_| commit_timeout("adding the learner"))?
                .map_err(write_error)?;
                log::info!("{id} ({address}) added as a learner; waiting for it to catch up");
                Some(r.log_id.index)
            }
        };
        // The new node must hold the log before it votes: a voter that lags makes a quorum
        // that cannot commit.
        let mut rx = self.handover.raft.metrics();
        let caught_up = matches!(
            tokio::time::timeout(
                CATCH_UP_TIMEOUT,
                rx.wait_for(|m| matched(m, nid).is_some_and(|i| Some(i) >= learner_at)),
            )
            .await,
            Ok(Ok(_))
        );
        if !caught_up {
            return Err(ChangeError::Refused(format!(
                "{id} at {address} did not catch up within {CATCH_UP_TIMEOUT:?}: is it running, \
                 with a current member in its remotePeers (and this cluster's peerKeyFile)? It \
                 stays a learner (no vote, no VIP): start it and run `members add` again, or \
                 `members remove --id {id}`"
            )));
        }
        let m = self.metrics();
        self.check_quorum(&m, &format!("adding {id}"), &new, Some(nid))?;
        self.commit(
            ChangeMembers::AddVoterIds([nid].into()),
            false,
            COMMIT_TIMEOUT * 2,
            "making it a voter",
        )
        .await?;
        Ok(format!(
            "{id} ({address}) added as a voter; voters now: {}",
            self.voters_now()
        ))
    }

    /// The voters as this node sees them now, by name, for the answer to a change.
    fn voters_now(&self) -> String {
        let m = self.metrics();
        self.names(&m, &self::voters(&m))
    }

    /// One membership change through Raft, committed within `limit` (else `commit_timeout`
    /// names `step`); `retain` keeps removed voters as learners.
    async fn commit(
        &self,
        change: ChangeMembers<NodeId, Node>,
        retain: bool,
        limit: Duration,
        step: &str,
    ) -> Result<ClientWriteResponse<TypeConfig>, ChangeError> {
        tokio::time::timeout(limit, self.handover.raft.change_membership(change, retain))
            .await
            .map_err(|_| commit_timeout(step))?
            .map_err(write_error)
    }

    async fn remove(&self, m: &Metrics, id: &str) -> Result<String, ChangeError> {
        let nid = node_id(id);
        let ms = m.membership_config.membership();
        if ms.get_node(&nid).is_none_or(|n| n.peer_id != id) {
            return Err(ChangeError::Refused(format!("{id} is not a member")));
        }
        let voters = voters(m);
        if !voters.contains(&nid) {
            self.commit(
                ChangeMembers::RemoveNodes([nid].into()),
                false,
                COMMIT_TIMEOUT,
                "removing the learner",
            )
            .await?;
            return Ok(format!("learner {id} removed"));
        }
        if voters.len() == 1 {
            return Err(ChangeError::Refused(format!(
                "{id} is the last voter: a cluster cannot remove its last voter"
            )));
        }
        let remaining: BTreeSet<NodeId> = voters.iter().copied().filter(|v| *v != nid).collect();
        self.check_quorum(m, &format!("removing {id}"), &remaining, None)?;
        if nid == self.handover.me {
            return Err(self.step_down_for_removal(m).await);
        }
        // A learner first: it receives the entry that says it no longer votes (a voter
        // dropped at once would never hear of it), then it goes altogether.
        let r = self
            .commit(
                ChangeMembers::RemoveVoters([nid].into()),
                true,
                COMMIT_TIMEOUT * 2,
                "removing the voter",
            )
            .await?;
        let at = r.log_id.index;
        let mut rx = self.handover.raft.metrics();
        let told = matches!(
            tokio::time::timeout(
                LEARN_REMOVAL_WAIT,
                rx.wait_for(|m| matched(m, nid).is_some_and(|i| i >= at)),
            )
            .await,
            Ok(Ok(_))
        );
        if !told {
            log::info!("{id} did not receive its removal within {LEARN_REMOVAL_WAIT:?} (down?)");
        }
        self.commit(
            ChangeMembers::RemoveNodes([nid].into()),
            false,
            COMMIT_TIMEOUT,
            "dropping the removed node",
        )
        .await?;
        Ok(format!("{id} removed; voters now: {}", self.voters_now()))
    }

    /// This leader is to be removed: give up the VIP, hand leadership over (as at SIGTERM),
    /// and tell the asker to retry at the new leader.
    async fn step_down_for_removal(&self, m: &Metrics) -> ChangeError {
        let me = self.name(m, self.handover.me);
        self.let_leases_lapse(m).await;
        log::info!("{me} leads and is to be removed: releasing the VIP and handing over");
        self.step_down.send_replace(true);
        let released = tokio::time::timeout(RELEASE_WAIT, async {
            while self.gate.is_up().await {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .is_ok();
        let result = if !released {
            Err(format!("the VIP was not released within {RELEASE_WAIT:?}"))
        } else {
            let m = self.metrics();
            self.handover.run(&m).await.map_err(|e| e.to_string())
        };
        self.handover.network.unmute();
        self.handover.raft.runtime_config().heartbeat(true);
        self.step_down.send_replace(false);
        match result {
            Ok(new) => ChangeError::Retry(format!(
                "{me} led: handed leadership over to {}",
                self.name(m, new)
            )),
            // A slow election may still end with another leader; either way the member that
            // was asked tries again (for at most RETRY_FOR), at whoever leads then.
            Err(e) => ChangeError::Retry(format!(
                "{me} leads and could not hand leadership over yet: {e}"
            )),
        }
    }
}

/// The table `kube-vip members list` prints.
pub fn table(m: &Members) -> String {
    let mut out = format!("{:<16} {:<24} {:<8} LEADER\n", "ID", "ADDRESS", "ROLE");
    for x in &m.members {
        out.push_str(&format!(
            "{:<16} {:<24} {:<8} {}\n",
            x.id,
            x.address,
            x.role,
            if x.leader { "yes" } else { "" }
        ));
    }
    if let Some(c) = &m.changing {
        out.push_str(&format!("change in progress: voters {c}\n"));
    }
    out.push_str(&format!("(as seen by {} in term {})\n", m.node, m.term));
    out
}

impl Admin {
    /// Before a handover in a cluster of four or more voters: the successor needs a quorum of
    /// votes, but a follower refuses every vote for a lease after the leader's last append.
    /// The old leader's vote and the successor's own make two; so `quorum - 2` followers other
    /// than the successor are muted for a lease first, while the VIP stays up on the acks of
    /// the others (a quorum with us), and the handover then wins at once instead of waiting a
    /// lease with no VIP anywhere. Skipped when too few followers answer to afford it.
    async fn let_leases_lapse(&self, m: &Metrics) {
        let voters = voters(m);
        let quorum = voters.len() / 2 + 1;
        let mute_n = quorum.saturating_sub(2);
        if mute_n == 0 {
            return;
        }
        let mut up: Vec<(Duration, NodeId)> = voters
            .iter()
            .filter(|id| **id != self.handover.me)
            .filter_map(|id| {
                self.handover
                    .network
                    .last_answer_age(*id)
                    .filter(|a| *a < UP_WITHIN)
                    .map(|a| (a, *id))
            })
            .collect();
        up.sort();
        // Keep quorum - 1 followers (the freshest, the successor among them) feeding our lease.
        if up.len() < (quorum - 1) + mute_n {
            log::info!(
                "only {} followers answer: handing over without muting any first",
                up.len()
            );
            return;
        }
        let muted: BTreeSet<NodeId> = up.iter().rev().take(mute_n).map(|(_, id)| *id).collect();
        let wait = self.handover.lease() + MUTE_MARGIN;
        log::info!(
            "muting {} for {} ms so that their leader lease lapses before the handover",
            self.names(m, &muted),
            wait.as_millis()
        );
        self.handover.network.mute(&muted);
        tokio::time::sleep(wait).await;
    }
}

/// Added to the lease while followers are muted: the last append sent before muting may still
/// be on its way, and their lease counts from its arrival.
const MUTE_MARGIN: Duration = Duration::from_millis(20);

/// How far the leader's log is replicated to `id` (leader only).
fn matched(m: &Metrics, id: NodeId) -> Option<u64> {
    m.replication
        .as_ref()?
        .get(&id)
        .copied()
        .flatten()
        .map(|l| l.index)
}

fn commit_timeout(step: &str) -> ChangeError {
    ChangeError::Refused(format!(
        "{step}: not committed within the limit (a quorum is not answering): check `members list`"
    ))
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> ChangeError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ChangeError::Retry(format!(
            "leadership moved (now {:?})",
            f.leader_node.map(|n| n.peer_id)
        )),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            ChangeError::Refused(format!("raft refused the change: {c}"))
        }
        RaftError::Fatal(f) => ChangeError::Refused(format!("raft stopped: {f}")),
    }
}

/// Logs where this node stands whenever that changes (once per change), keeps [`Peers`] up
/// to date with the members' addresses, and on a leader finishes a joint configuration that
/// no change of its own is driving (its predecessor died in the middle of one).
pub async fn watch_membership(admin: Admin) {
    let mut rx = admin.handover.raft.metrics();
    let mut last: Option<Standing> = None;
    let mut ever_voter = false;
    loop {
        let m = rx.borrow_and_update().clone();
        for (id, node) in m.membership_config.membership().nodes() {
            admin.handover.peers.learn(*id, node);
        }
        let now = standing(&m, admin.handover.me);
        if last != Some(now) {
            let me = admin.name(&m, admin.handover.me);
            match now {
                Standing::NotYet => log::info!(
                    "{me} is not a member of a cluster yet: no votes, no VIP; waiting to be added \
                     (`kube-vip members add --id {me} --address ADDRESS` on a member)"
                ),
                Standing::Learner if ever_voter || last.is_none() => log::warn!(
                    "{me} is a learner, not a voter: removed from the cluster's voters (or not \
                     yet promoted); it will not hold the VIP while it is not a voter"
                ),
                Standing::Learner => {
                    log::info!("{me} joined as a learner: catching up before it becomes a voter")
                }
                Standing::Voter => log::info!("{me} is a voter of the cluster"),
                Standing::Out => log::warn!(
                    "{me} was removed from the cluster: it will never hold the VIP again; stop \
                     this agent (delete its stateDir to use the machine for a new member)"
                ),
            }
            last = Some(now);
        }
        ever_voter |= now == Standing::Voter;
        if m.state == ServerState::Leader && is_joint(&m) && committed(&m) {
            if let Ok(busy) = admin.busy.clone().try_lock_owned() {
                let admin = admin.clone();
                let target = quorum_sets(&m).pop().unwrap_or_default();
                tokio::spawn(async move {
                    let _busy = busy;
                    let m = admin.metrics();
                    if m.state != ServerState::Leader || !is_joint(&m) {
                        return;
                    }
                    log::info!(
                        "finishing a membership change left half done: voters {}",
                        admin.names(&m, &target)
                    );
                    let r = tokio::time::timeout(
                        COMMIT_TIMEOUT,
                        admin
                            .handover
                            .raft
                            .change_membership(ChangeMembers::ReplaceAllVoters(target), true),
                    )
                    .await;
                    match r {
                        Ok(Ok(_)) => log::info!("membership change finished"),
                        Ok(Err(e)) => log::warn!("cannot finish the membership change: {e}"),
                        Err(_) => log::warn!("finishing the membership change timed out"),
                    }
                });
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_bounded() {
        let add = |id: &str, a: &str| Change::Add {
            id: id.into(),
            address: a.parse().expect("addr"),
        };
        assert!(add("server4", "10.0.0.4:10000").check().is_ok());
        assert!(add("", "10.0.0.4:10000").check().is_err());
        assert!(add(&"x".repeat(MAX_PEER_ID_LEN + 1), "10.0.0.4:10000")
            .check()
            .is_err());
        assert!(add("a b", "10.0.0.4:10000").check().is_err());
        assert!(add("server4", "0.0.0.0:10000").check().is_err());
        assert!(add("server4", "10.0.0.4:0").check().is_err());
        assert!(Change::Remove {
            id: "server1".into()
        }
        .check()
        .is_ok());
        // The wire form is stable.
        assert_eq!(
            serde_json::to_string(&Change::Remove { id: "s".into() }).expect("json"),
            r#"{"op":"remove","id":"s"}"#
        );
    }

    #[test]
    fn joint_quorum_needs_both_majorities() {
        let old: BTreeSet<NodeId> = [1, 2, 3].into();
        let new: BTreeSet<NodeId> = [2, 3, 4].into();
        let sets = vec![old.clone(), new.clone()];
        assert!(has_quorum(&sets, &[2, 3].into()));
        assert!(
            !has_quorum(&sets, &[1, 2].into()),
            "no majority of the new set"
        );
        assert!(
            !has_quorum(&sets, &[3, 4].into()),
            "no majority of the old set"
        );
        assert!(has_quorum(&[old], &[1, 2].into()));
        assert!(!has_quorum(&[], &[1].into()), "no membership, no quorum");
    }
}
