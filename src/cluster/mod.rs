//! Leader election for kube-vip over Raft (openraft 0.9.25, storage-v2).
//!
//! The cluster replicates no application data; it only decides which node is
//! leader, i.e. which node may hold the virtual IP.
//!
//! ```text
//! Cluster::start ─┬─ store.rs    vote + log + snapshot files in state_dir (fsync'd)
//!                 ├─ network.rs  TCP listener + one outgoing connection per peer
//!                 └─ openraft    elections, heartbeats, metrics
//! ```
//!
//! # What the VIP agent must watch
//!
//! openraft 0.9.25 has **no step-down on lost quorum**: a leader cut off from
//! the majority stays in `ServerState::Leader` until it hears of a higher term,
//! i.e. until the partition heals. `state == Leader` alone is therefore not a
//! licence to hold the VIP. Watch [`Cluster::metrics`] and hold the VIP only while
//!
//! ```text
//! m.state == ServerState::Leader
//!   && m.millis_since_quorum_ack.is_some_and(|ms| ms + since_received_ms < VIP_LEASE_MS)
//! ```
//!
//! where `since_received_ms` is the time since that metrics value arrived on
//! the watch channel. Drop the VIP *before* calling
//! [`Cluster::hand_over_and_shutdown`].
//!
//! Semantics of `RaftMetrics::millis_since_quorum_ack` in 0.9.25 (read from
//! `RaftCore::report_metrics`, `Leader::last_quorum_acked_time` and
//! `ReplicationCore::send_log_entries`, then measured with `check.sh`):
//!
//! * `None` on followers, candidates and learners, and on a new leader until
//!   a quorum has acknowledged one of its AppendEntries (vote replies do not
//!   count). Treat `None` as "no lease".
//! * Otherwise: milliseconds since the *send time* of the most recent
//!   AppendEntries (heartbeat or log) that a quorum has acknowledged, the
//!   leader counting itself.
//! * It is a snapshot taken when openraft publishes metrics, not a live clock.
//!   openraft publishes after every event it handles, so at least on every
//!   timer tick (`heartbeat_interval * 3/2`, 75 ms by default, which is also the
//!   real heartbeat period) and right after each acknowledgement. Measured
//!   with the defaults: healthy values 0–76 ms (usually 0–1: published just
//!   after an ack); with the leader isolated it grows with wall time (228 ms
//!   at +250 ms, ~3000 ms at +3 s) while `state` stays `Leader`. If no metrics
//!   arrive for a few ticks (RaftCore stuck), the last value goes stale; hence
//!   `since_received_ms` above.
//!
//! Choosing `VIP_LEASE_MS`: a follower refuses to vote for anyone for
//! `election_timeout_max` after the last heartbeat it accepted. This is
//! openraft's follower-side *leader lease* (`Engine::handle_vote_req`); its
//! length is the `election_timeout_max` config field. A follower holding a
//! committed vote also waits `election_timeout_max` + its random election
//! timeout before it stands itself. Any majority that elects a new leader
//! includes a node that acknowledged our last quorum-acked heartbeat (or
//! includes us, and then we have already stepped down). So no other node can
//! become leader earlier than `election_timeout_max` after the send time that
//! `millis_since_quorum_ack` counts from. Drop the VIP well before that, e.g.
//! `VIP_LEASE_MS = election_timeout_max - 2 * heartbeat_interval` (200 ms with
//! the defaults). That is above the healthy 76 ms, and leaves 100 ms to remove
//! the address. Longer election timeouts widen both margins.
//!
//! # Leadership transfer
//!
//! openraft 0.9.25 has no `transfer_leader` and no TimeoutNow message. It has
//! `raft.trigger().elect()`: start an election now, even while
//! `enable_elect(false)`. [`Cluster::hand_over_and_shutdown`] builds a
//! handover on top of it. The leader asks an up-to-date follower, through our
//! own [`network::Request::Handover`], to call `trigger().elect()`. The
//! follower lease above makes the *other* followers refuse that candidate,
//! but the old leader grants it. A leader stamps its own vote when it wins and
//! never refreshes that stamp, so its lease check has expired once it has led
//! for `election_timeout_max`. In a 3-node cluster the old leader's vote plus
//! the candidate's own make a majority: measured 3–26 ms from SIGTERM to the
//! new leader, mostly vote fsyncs. A leader younger than
//! `election_timeout_max` first waits out its own lease (measured: 305 ms
//! when it had led for 24 ms). Without that wait the candidate's first round
//! fails and it retries after its election timeout (up to ~465 ms). With 5 or
//! more voters the candidate also needs followers whose lease has run out, so
//! the handover can take up to `election_timeout_max` longer. Heartbeats are
//! stopped first so that those leases start running out at once.
//!
//! # Restarts
//!
//! * A node restarted with state never re-initializes, even with
//!   `start_as_leader`.
//! * openraft restores a node whose saved vote is its own committed vote
//!   directly as `Leader`. We demote that vote to uncommitted on load
//!   ([`store::LogStore::demote_own_leader_vote`]), so the node comes back as a
//!   follower and does not briefly claim leadership.
//! * openraft 0.9 has no pre-vote: a node that times out bumps the term and a
//!   healthy leader steps down when it sees it. Elections are therefore off
//!   unless a quorum answers our own pre-vote with yes ([`probe_pre_votes`]);
//!   a restarted node, a healed old leader or a follower that lost a few
//!   heartbeats cannot depose a leader the others still hear from. The
//!   transport retries unreachable peers every heartbeat interval instead of
//!   openraft's default 500 ms, and hedges each call over two connections.
//! * openraft 0.9 draws each node's random election timeout once, at start,
//!   so two candidates that split a vote tend to split every following one
//!   as well. A candidate therefore does not use openraft's timer: if its
//!   election is undecided after a timeout drawn afresh for each term, it
//!   stands again ([`guard_elections`]).
//! * For the same reason the first candidacy after a leader goes silent does
//!   not wait for openraft's timer (lease + that fixed timeout, up to
//!   `election_timeout_max` after a quorum would already vote): the nodes
//!   that may stand take turns by node id, `election_timeout_min` apart
//!   ([`guard_elections`]).
//! * A node refuses every vote for `election_timeout_max` after it starts, and
//!   while its VIP may be up ([`gate`]).

pub mod bounds;
pub mod gate;
pub mod lograte;
pub mod network;
pub mod store;
pub mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, TryLockError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use openraft::error::{InitializeError, RaftError};
use openraft::{Config, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use self::gate::{StaleLeadership, VoteGate};
pub use self::store::StoreError;
pub use self::types::{node_id, Metrics, Node, NodeId, PeerInfo, Raft};

use self::network::{Network, PeerMap};
use self::store::{LogStore, StateMachineStore};

/// Lock file in the state directory: one process per state directory.
pub const LOCK_FILE: &str = "LOCK";

/// Openraft `cluster_name`; only appears in openraft's own tracing spans.
const CLUSTER_NAME: &str = "kube-vip";

/// Build a snapshot (and later purge the log) after this many applied entries.
/// The log grows by one blank entry per term, so this is rarely reached; it
/// exists so the log cannot grow without bound on a flapping cluster.
const SNAPSHOT_EVERY_ENTRIES: u64 = 1000;

/// Slack added to the end of our own vote lease before a handover (clock
/// reads and the metrics hop are not instantaneous).
const LEASE_MARGIN: Duration = Duration::from_millis(10);

/// Records when this node becomes leader; `None` while it is not.
async fn watch_leadership(mut rx: watch::Receiver<Metrics>, since: Arc<Mutex<Option<Instant>>>) {
    loop {
        let leading = rx.borrow_and_update().state == ServerState::Leader;
        {
            let mut s = since.lock().unwrap_or_else(PoisonError::into_inner);
            match (leading, s.is_some()) {
                (true, false) => *s = Some(Instant::now()),
                (false, true) => *s = None,
                _ => {}
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// openraft 0.9 has no pre-vote: a follower that misses heartbeats bumps the term, and that
/// higher term deposes a healthy leader the moment it is seen (a partition heals, a restarted
/// node reconnects slowly, a few heartbeats are lost). So elections stay switched off, and
/// [`guard_elections`] switches them on only while a quorum (this node included) answers a
/// [`network::Request::PreVote`] with yes — which peers do only when they have not heard from
/// a leader for a whole lease either. This task asks: rounds start once this node has not heard
/// from a leader for half a lease, every `tick`, so by the time openraft's own timer fires
/// (lease + random timeout after the last heartbeat) a real failover has already been cleared
/// to proceed. It publishes the answer on `tx`; a round waits for at most `lease / 2`, which is
/// why it runs apart from [`guard_elections`].
async fn probe_pre_votes(
    raft: Raft,
    network: Network,
    others: Vec<NodeId>,
    contact: network::LeaderContact,
    tick: Duration,
    lease: Duration,
    tx: watch::Sender<bool>,
) {
    let members = others.len() + 1;
    let quorum = members / 2 + 1;
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let (leader, last_log_index) = {
            let m = raft.metrics();
            let m = m.borrow();
            (m.state == ServerState::Leader, m.last_log_index)
        };
        let yes = if leader || contact.age() < lease / 2 {
            false
        } else {
            let asks = others
                .iter()
                .map(|id| network.send_pre_vote(*id, last_log_index, lease / 2));
            let granted = futures::future::join_all(asks)
                .await
                .into_iter()
                .filter(|granted| *granted)
                .count();
            1 + granted >= quorum
        };
        tx.send_if_modified(|v| std::mem::replace(v, yes) != yes);
    }
}

/// A duration drawn uniformly from `[min, max]`, fresh on every call.
///
/// `RandomState` is seeded from the OS once per thread and then stepped for each new value,
/// so each hasher hashes with different keys; the clock is mixed in as well. Plenty for
/// election jitter, and no extra crate.
fn random_between(min: Duration, max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    h.write_u128(now.map(|d| d.as_nanos()).unwrap_or_default());
    let span = max.saturating_sub(min).as_micros() as u64;
    min + Duration::from_micros(h.finish() % (span + 1))
}

/// Owns openraft's `elect` switch, and restarts an undecided election at a fresh random time.
///
/// The switch is on while [`probe_pre_votes`] says a quorum would vote, except while this node
/// is a candidate. Why the exception: openraft 0.9.25 draws its random election timeout once,
/// when the node starts (`EngineConfig::new`), and checks it only on its timer tick
/// (`heartbeat_interval * 3/2`, 30 ms with the defaults), so a node re-stands every 2, 3 or 4
/// ticks after its last candidacy, always the same number. When both survivors of a failover
/// stand in the same term, each has voted for itself and refuses the other; if they also
/// re-stand after the same number of ticks (about one chance in three), they collide again
/// every round until their timers drift apart: measured 100 ms to 4.4 s without a leader,
/// in about one kill -9 failover in eight. So while this node is a candidate openraft's timer
/// is off, and if the election has not ended after `random_between(timeout_min, timeout_max)`,
/// drawn anew for each term, this task starts the next one (`trigger().elect()`), still only
/// while a quorum would vote.
///
/// Safety: this changes only when a candidate stands again, never who may vote or how (vote
/// gate, persisted vote, startup refusal, follower lease all stay). The one vote the lease
/// argument (`agent::leadership`) could be hurt by is the candidate's vote for itself: a node
/// must not stand within `lease` of acknowledging a leader's heartbeat, which openraft's timer
/// ensures by waiting lease + timeout after a committed vote. `trigger().elect()` checks
/// nothing, so the restart checks it here, in an order no message can slip into: under the
/// [`VoteGate`] lock (no vote granted since it stood, so no winner to depose) and
/// [`network::LeaderContact::unless_heard_within`] (no append or snapshot accepted for
/// `lease`, and none accepted until the election command is queued, ahead of any later one),
/// and only if the metrics still show it a candidate in the same term.
///
/// The first candidacy after a leader goes silent is not left to openraft's timer either: it
/// fires lease + that fixed timeout after the last heartbeat, up to `timeout_max` after a
/// quorum would already vote. When elections are switched on, the nodes that may stand (all
/// but the silent leader) take turns by node id, `timeout_min` apart (40 ms by default, well
/// over a vote round trip with its fsync): the first stands at once, the next only if no leader
/// has appeared by then. Both survivors switch on within a pre-vote round (one heartbeat
/// interval, shorter than `timeout_min`) of each other, so their turns do not collide. The same checks
/// as for a restart apply (a follower still, no vote granted since the leader was last heard,
/// no leader's append accepted for a lease); openraft's own timer stays on as the fallback.
#[allow(clippy::too_many_arguments)]
async fn guard_elections(
    raft: Raft,
    gate: Arc<VoteGate>,
    mut would_win: watch::Receiver<bool>,
    contact: network::LeaderContact,
    members: Vec<NodeId>,
    lease: Duration,
    timeout_min: Duration,
    timeout_max: Duration,
) {
    let mut metrics = raft.metrics();
    let mut switch_on = false;
    let mut quorum_would_vote = false;
    // The term this node stands in, since when, and when to stand again (None: done that).
    let mut standing: Option<(u64, Instant, Option<Instant>)> = None;
    // When this follower takes its turn to stand first, and its place in the order.
    let mut first_stand: Option<(Instant, usize)> = None;
    loop {
        let candidate_term = {
            let m = metrics.borrow_and_update();
            (m.state == ServerState::Candidate).then_some(m.current_term)
        };
        let want = *would_win.borrow_and_update();
        if want != quorum_would_vote {
            quorum_would_vote = want;
            first_stand = None;
            if want {
                let m = metrics.borrow();
                if m.state == ServerState::Follower {
                    let turn = first_stand_turn(&members, m.id, m.current_leader);
                    first_stand = Some((Instant::now() + timeout_min * turn as u32, turn));
                }
            }
            if want {
                log::info!(
                    "no leader heard for {} ms and a quorum would vote: elections enabled",
                    contact.age().as_millis()
                );
            } else {
                log::debug!("elections disabled: a leader is known");
            }
        }
        standing = match (candidate_term, standing) {
            (Some(t), Some(s)) if s.0 == t => Some(s),
            (Some(t), _) => {
                let now = Instant::now();
                Some((t, now, Some(now + random_between(timeout_min, timeout_max))))
            }
            (None, _) => None,
        };
        let on = quorum_would_vote && standing.is_none();
        if on != switch_on {
            raft.runtime_config().elect(on);
            switch_on = on;
        }
        let restart_at = standing
            .and_then(|(_, _, at)| at)
            .filter(|_| quorum_would_vote);
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            changed = would_win.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep_until(first_stand.map_or_else(Instant::now, |f| f.0).into()),
                if first_stand.is_some() && standing.is_none() =>
            {
                let turn = first_stand.take().map_or(0, |f| f.1);
                let silent_for = contact.age();
                let since = Instant::now().checked_sub(silent_for).unwrap_or_else(Instant::now);
                // No vote granted since the leader went silent (someone else stands already).
                let stood = stand_if(&raft, &gate, &contact, lease, since, |m| {
                    m.state == ServerState::Follower
                })
                .await;
                match stood {
                    Some(Ok(())) => log::info!(
                        "no leader heard for {} ms: standing (turn {turn})",
                        silent_for.as_millis()
                    ),
                    Some(Err(e)) => log::warn!("cannot start an election: {e}"),
                    // A vote or a leader came first; openraft's timer remains the fallback.
                    None => {}
                }
            }
            _ = tokio::time::sleep_until(restart_at.unwrap_or_else(Instant::now).into()),
                if restart_at.is_some() =>
            {
                if let Some((term, since, at)) = standing.as_mut() {
                    let (term, since) = (*term, *since);
                    // Stand again only as openraft's own timer would, checked and done with
                    // nothing accepted in between (see `VoteGate::unless_granted_since` and
                    // `LeaderContact::unless_heard_within`): still a candidate in that term, no
                    // vote granted since (a grant restarts openraft's timer, and standing now
                    // would depose the winner), no leader's append accepted for a lease (our own
                    // vote must respect the lease a heartbeat we acknowledged gave its leader).
                    let stood = stand_if(&raft, &gate, &contact, lease, since, |m| {
                        m.state == ServerState::Candidate && m.current_term == term
                    })
                    .await;
                    *at = None;
                    match stood {
                        Some(Ok(())) => log::info!(
                            "election for term {term} undecided after {} ms: standing again",
                            since.elapsed().as_millis()
                        ),
                        Some(Err(e)) => log::warn!("cannot restart the election: {e}"),
                        // Not now; if nothing changes, try again after another random wait.
                        None => *at = Some(Instant::now() + random_between(timeout_min, timeout_max)),
                    }
                }
            }
        }
    }
}

/// Starts an election (`trigger().elect()`) if `still` holds for the current metrics, no vote
/// was granted to another node at or after `since`, and no leader's append or snapshot was
/// accepted for `lease`; all checked and done with no grant and no append in between. `None`:
/// not done.
async fn stand_if(
    raft: &Raft,
    gate: &VoteGate,
    contact: &network::LeaderContact,
    lease: Duration,
    since: Instant,
    still: impl Fn(&Metrics) -> bool,
) -> Option<Result<(), openraft::error::Fatal<NodeId>>> {
    gate.unless_granted_since(
        since.into(),
        contact.unless_heard_within(lease, async {
            if still(&raft.metrics().borrow()) {
                Some(raft.trigger().elect().await)
            } else {
                None
            }
        }),
    )
    .await
    .flatten()
    .flatten()
}

/// This node's turn to stand first: its place, by node id, among the members other than the
/// last known leader.
fn first_stand_turn(members: &[NodeId], me: NodeId, last_leader: Option<NodeId>) -> usize {
    members
        .iter()
        .filter(|&&id| id < me && Some(id) != last_leader)
        .count()
}

/// Errors of the cluster module.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The settings are inconsistent (duplicate ids, hash collision, ...).
    #[error("invalid cluster settings: {0}")]
    Settings(String),
    /// The timing settings are rejected by openraft (`Config::validate`).
    #[error("invalid raft timing settings: {0}")]
    Config(String),
    /// The state directory could not be opened or holds corrupt state.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another process holds the state directory.
    #[error("state directory {} is in use by another process", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The Raft listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address from `local.addr`.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// openraft failed to start or to initialize the membership.
    #[error("raft: {0}")]
    Raft(String),
    /// A planned handover did not produce a new leader (this node was stopped anyway).
    #[error("handover failed: {0}")]
    Handover(String),
}

/// Everything [`Cluster::start`] needs.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// This node (`localPeer`).
    pub local: PeerInfo,
    /// The other members (`remotePeers`).
    pub remotes: Vec<PeerInfo>,
    /// Bootstrap the cluster from this node if its state directory is fresh.
    pub start_as_leader: bool,
    /// Leader heartbeat interval (openraft `heartbeat_interval`), ms.
    pub heartbeat_ms: u64,
    /// Lower bound of the random election timeout, ms; must exceed `heartbeat_ms`.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the random election timeout, ms; also the follower leader lease.
    pub election_timeout_max_ms: u64,
    /// Directory for the vote, log and snapshot files (created if missing).
    pub state_dir: PathBuf,
}

impl ClusterSettings {
    /// Checks ids and builds the node-id → peer map (local node included).
    fn peer_map(&self) -> Result<PeerMap, ClusterError> {
        let mut map = PeerMap::new();
        let mut addrs = BTreeSet::new();
        for p in std::iter::once(&self.local).chain(&self.remotes) {
            if p.id.is_empty() {
                return Err(ClusterError::Settings("a peer has an empty id".into()));
            }
            let id = node_id(&p.id);
            if id == 0 {
                return Err(ClusterError::Settings(format!(
                    "peer id {:?} hashes to node id 0, which openraft reserves; rename it",
                    p.id
                )));
            }
            if !addrs.insert(p.addr) {
                return Err(ClusterError::Settings(format!(
                    "address {} is used by more than one peer",
                    p.addr
                )));
            }
            if let Some(other) = map.insert(id, p.clone()) {
                return Err(ClusterError::Settings(if other.id == p.id {
                    format!("peer id {:?} appears more than once", p.id)
                } else {
                    format!(
                        "peer ids {:?} and {:?} hash to the same node id {id:#x}; rename one",
                        other.id, p.id
                    )
                }));
            }
        }
        Ok(map)
    }

    /// The openraft config for these settings, validated.
    fn raft_config(&self) -> Result<Config, ClusterError> {
        let config = Config {
            cluster_name: CLUSTER_NAME.to_string(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY_ENTRIES),
            ..Default::default()
        };
        if self.heartbeat_ms == 0 {
            return Err(ClusterError::Settings("heartbeat_ms must be > 0".into()));
        }
        config
            .validate()
            .map_err(|e| ClusterError::Config(e.to_string()))
    }
}

/// A running cluster member.
pub struct Cluster {
    raft: Raft,
    me: NodeId,
    peers: Arc<PeerMap>,
    network: Network,
    settings: ClusterSettings,
    server: JoinHandle<()>,
    /// When this node last became leader (see [`Cluster::hand_over`]).
    leader_since: Arc<Mutex<Option<Instant>>>,
    /// Keeps `leader_since` up to date.
    leader_watch: JoinHandle<()>,
    /// Asks the peers whether they would vote for this node (see [`probe_pre_votes`]).
    prober: JoinHandle<()>,
    /// Switches openraft's elections on only while a pre-vote would win, and restarts
    /// undecided elections (see [`guard_elections`]).
    guard: JoinHandle<()>,
    /// Held for the life of the node; the OS releases the lock if we die.
    _lock: File,
}

impl Cluster {
    /// Opens/creates persistent state in `state_dir`, binds the TCP listener on
    /// `local.addr`, starts Raft.
    ///
    /// If `start_as_leader` and the store is fresh (never initialized), it
    /// initializes the membership with all peers and stands for election at
    /// once. Other fresh nodes wait to be contacted by the leader. A node
    /// restarted with existing state (including the `start_as_leader` one)
    /// rejoins as a follower.
    ///
    /// `gate` is shared with whatever holds the VIP: votes are refused while it says the VIP
    /// may be up (see [`gate`]).
    pub async fn start(s: ClusterSettings, gate: Arc<VoteGate>) -> Result<Cluster, ClusterError> {
        let peers = Arc::new(s.peer_map()?);
        let me = node_id(&s.local.id);
        let config = s.raft_config()?;

        fs::create_dir_all(&s.state_dir).map_err(|source| StoreError::Io {
            action: "create directory",
            path: s.state_dir.clone(),
            source,
        })?;
        let lock_path = s.state_dir.join(LOCK_FILE);
        let lock = File::create(&lock_path).map_err(|source| StoreError::Io {
            action: "create",
            path: lock_path.clone(),
            source,
        })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(ClusterError::Locked { path: lock_path }),
            Err(TryLockError::Error(source)) => {
                return Err(StoreError::Io {
                    action: "lock",
                    path: lock_path,
                    source,
                }
                .into())
            }
        }

        let log_store = LogStore::open(&s.state_dir)?;
        let state_machine = StateMachineStore::open(&s.state_dir)?;
        let fresh = log_store.is_fresh();
        if log_store.demote_own_leader_vote(me) {
            log::info!("was leader before the restart; rejoining as a follower");
        }

        // Bind before starting Raft: a wrong address must fail start(), and a
        // follower must be reachable as soon as its Raft runs.
        let listener =
            TcpListener::bind(s.local.addr)
                .await
                .map_err(|source| ClusterError::Bind {
                    addr: s.local.addr,
                    source,
                })?;

        let network = Network::new(
            me,
            s.local.addr.ip(),
            peers.clone(),
            Duration::from_millis(s.heartbeat_ms),
        );
        let raft = Raft::new(
            me,
            Arc::new(config),
            network.clone(),
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        network.set_metrics(raft.metrics());

        let contact = network::LeaderContact::new();
        let lease = Duration::from_millis(s.election_timeout_max_ms);
        let server = tokio::spawn(network::serve(
            listener,
            Arc::new(network::Server {
                raft: raft.clone(),
                me,
                peers: peers.clone(),
                no_votes_until: tokio::time::Instant::now() + lease,
                gate: gate.clone(),
                contact: contact.clone(),
                lease,
                refusal_log: Default::default(),
                limit_log: Default::default(),
            }),
        ));
        // Elections stay off until a quorum would grant a pre-vote (see `probe_pre_votes`).
        raft.runtime_config().elect(false);
        let (would_win_tx, would_win) = watch::channel(false);
        let prober = tokio::spawn(probe_pre_votes(
            raft.clone(),
            network.clone(),
            peers.keys().copied().filter(|id| *id != me).collect(),
            contact.clone(),
            Duration::from_millis(s.heartbeat_ms),
            lease,
            would_win_tx,
        ));
        let guard = tokio::spawn(guard_elections(
            raft.clone(),
            gate.clone(),
            would_win,
            contact,
            peers.keys().copied().collect(),
            lease,
            Duration::from_millis(s.election_timeout_min_ms),
            Duration::from_millis(s.election_timeout_max_ms),
        ));
        let leader_since = Arc::new(Mutex::new(None));
        let leader_watch = tokio::spawn(watch_leadership(raft.metrics(), leader_since.clone()));

        let cluster = Cluster {
            raft,
            me,
            peers,
            network,
            settings: s,
            server,
            leader_since,
            leader_watch,
            prober,
            guard,
            _lock: lock,
        };

        if fresh && cluster.settings.start_as_leader {
            let members: BTreeMap<NodeId, Node> = cluster
                .peers
                .iter()
                .map(|(id, p)| {
                    (
                        *id,
                        Node {
                            peer_id: p.id.clone(),
                            addr: p.addr.to_string(),
                        },
                    )
                })
                .collect();
            log::info!(
                "fresh state and start_as_leader: initializing a cluster of {} nodes",
                members.len()
            );
            match cluster.raft.initialize(members).await {
                Ok(()) => {}
                // Someone already wrote state (can only be us); nothing to do.
                Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                    log::info!("cluster already initialized: {e}");
                }
                Err(e) => {
                    let err = ClusterError::Raft(format!("initialize: {e}"));
                    cluster.shutdown().await;
                    return Err(err);
                }
            }
        }
        Ok(cluster)
    }

    /// openraft metrics watch (state, current_leader, millis_since_quorum_ack, vote, ...).
    pub fn metrics(&self) -> watch::Receiver<Metrics> {
        self.raft.metrics()
    }

    /// Address of a node id (for log lines like "The Node [192.168.0.71:10000] is leading").
    pub fn peer_addr(&self, id: NodeId) -> Option<SocketAddr> {
        self.peers.get(&id).map(|p| p.addr)
    }

    /// Configured peer id string of a node id.
    pub fn peer_name(&self, id: NodeId) -> Option<&str> {
        self.peers.get(&id).map(|p| p.id.as_str())
    }

    /// Planned handover, called on the leader at SIGTERM: make another node
    /// leader as fast as possible, then stop this node's Raft.
    ///
    /// Picks a voter that has this leader's whole log (the others would
    /// refuse any other), preferring the one that answered most recently,
    /// stops heartbeats, sends it [`network::Request::Handover`] (falling back
    /// to the next candidate if it cannot be reached), and waits until this
    /// node sees another leader (bounded by `3 * election_timeout_max`). On a
    /// non-leader it just shuts down. The node is shut down in every case; an
    /// `Err` only reports that no new leader was seen in time.
    pub async fn hand_over_and_shutdown(self) -> Result<(), ClusterError> {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            self.shutdown().await;
            return Ok(());
        }
        let res = self.hand_over(&m).await;
        self.shutdown().await;
        res.map(|_| ())
    }

    async fn hand_over(&self, m: &Metrics) -> Result<NodeId, ClusterError> {
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let last = m.last_log_index;
        // Only a follower holding the whole log can win (voters refuse a
        // candidate with a shorter log). Among those, try the one that
        // answered most recently first: the replication metrics still list a
        // follower that died a moment ago as up to date.
        let mut candidates: Vec<(Option<Duration>, NodeId)> = m
            .replication
            .iter()
            .flatten()
            .filter(|(id, matched)| {
                **id != self.me && voters.contains(*id) && matched.map(|l| l.index) == last
            })
            .map(|(id, _)| (self.network.last_answer_age(*id), *id))
            .collect();
        candidates.sort_by_key(|(age, id)| (age.is_none(), *age, *id));
        if candidates.is_empty() {
            return Err(ClusterError::Handover(
                "no follower has the leader's whole log".into(),
            ));
        }
        // Stop feeding the followers' leases: with more than 3 voters the
        // candidate needs some of them, and they refuse until their lease ends.
        self.raft.runtime_config().heartbeat(false);

        // Our own vote is leased too, from the moment we won the election: a
        // leader that has led for less than `election_timeout_max` refuses
        // the candidate, which then retries only after its election timeout
        // (measured: up to ~465 ms instead of ~5 ms). Waiting out the rest of
        // the lease is faster. The stamp is taken when the metrics show us as
        // Leader, just after openraft stamps the vote, so it errs on the late side.
        let since = *self
            .leader_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(since) = since {
            let lease_end =
                since + Duration::from_millis(self.settings.election_timeout_max_ms) + LEASE_MARGIN;
            let now = Instant::now();
            if lease_end > now {
                log::info!(
                    "leader for only {} ms: waiting {} ms for our own vote lease to end",
                    now.duration_since(since).as_millis(),
                    (lease_end - now).as_millis()
                );
                tokio::time::sleep_until(lease_end.into()).await;
            }
        }

        let ask_limit = Duration::from_millis(self.settings.election_timeout_min_ms);
        let mut errors = Vec::new();
        for (_, target) in &candidates {
            let name = self.peer_name(*target).unwrap_or("?");
            log::info!(
                "handing leadership over to {name} ({})",
                self.peer_addr(*target)
                    .map(|a| a.to_string())
                    .unwrap_or_default()
            );
            match self.network.send_handover(*target, ask_limit).await {
                Ok(()) => return self.wait_for_other_leader().await,
                Err(e) => {
                    log::warn!("handover to {name} refused or failed: {e}");
                    errors.push(format!("{name}: {e}"));
                }
            }
        }
        Err(ClusterError::Handover(errors.join("; ")))
    }

    /// Waits until this node sees a leader other than itself.
    async fn wait_for_other_leader(&self) -> Result<NodeId, ClusterError> {
        let mut rx = self.raft.metrics();
        let limit = Duration::from_millis(3 * self.settings.election_timeout_max_ms);
        let me = self.me;
        let wait = async {
            loop {
                if let Some(l) = rx.borrow_and_update().current_leader.filter(|l| *l != me) {
                    return Ok(l);
                }
                if rx.changed().await.is_err() {
                    return Err(ClusterError::Handover("raft stopped".into()));
                }
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(r) => r,
            Err(_) => Err(ClusterError::Handover(format!(
                "no new leader within {limit:?}"
            ))),
        }
    }

    /// Stops Raft, the listener and all peer connections.
    pub async fn shutdown(self) {
        if let Err(e) = self.raft.shutdown().await {
            log::warn!("raft shutdown: {e}");
        }
        self.server.abort();
        self.leader_watch.abort();
        self.prober.abort();
        self.guard.abort();
        let _ = self.server.await;
        self.network.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_stand_turns_skip_the_silent_leader_and_never_tie() {
        let members = [30, 10, 20];
        // Leader 10 went silent: 20 stands first, 30 one stagger later.
        assert_eq!(first_stand_turn(&members, 20, Some(10)), 0);
        assert_eq!(first_stand_turn(&members, 30, Some(10)), 1);
        // Leader 30 went silent: 10, then 20.
        assert_eq!(first_stand_turn(&members, 10, Some(30)), 0);
        assert_eq!(first_stand_turn(&members, 20, Some(30)), 1);
        // No leader known (all restarted): by id among all.
        let turns: Vec<usize> = [10, 20, 30]
            .iter()
            .map(|&me| first_stand_turn(&members, me, None))
            .collect();
        assert_eq!(turns, [0, 1, 2]);
    }

    #[test]
    fn random_between_stays_in_range_and_varies() {
        let (min, max) = (Duration::from_millis(40), Duration::from_millis(120));
        let draws: BTreeSet<Duration> = (0..200).map(|_| random_between(min, max)).collect();
        assert!(draws.iter().all(|d| (min..=max).contains(d)));
        assert!(draws.len() > 150, "only {} distinct draws", draws.len());
        assert_eq!(random_between(max, max), max);
        assert_eq!(
            random_between(max, min),
            max,
            "an empty range gives its lower end"
        );
    }
}
