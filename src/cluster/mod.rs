//! Leader election for kube-vip over Raft (openraft 0.9.25, storage-v2).
//!
//! The cluster replicates no application data; it only decides which node is leader, and
//! hands the agent a ready "may hold the VIP" signal ([`lease`]). Leadership flows one way:
//! cluster → agent → vip/lb.
//!
//! ```text
//! Cluster::start ─┬─ store.rs      vote + log + snapshot files in state_dir (fsync'd off the workers)
//!                 ├─ transport/    peer TCP: codec, handshake, client, server, openraft adapter
//!                 ├─ elections.rs  pre-vote, turn-taking, stand_if (openraft 0.9 has no pre-vote)
//!                 ├─ gate.rs       no vote granted while this node's VIP may be up
//!                 ├─ auth.rs       peerKeyFile: key proofs in the handshake, per-frame tags
//!                 ├─ bounds.rs     terms and log ids refused before openraft sees them
//!                 ├─ counters.rs   peer-channel counters (plain atomics, for the metrics work)
//!                 ├─ lease.rs      Raft metrics → Leadership (the timing argument lives there)
//!                 ├─ membership.rs `kube-vip members`: add/remove through openraft, forwarded to
//!                 │                the leader; votes counted in the current (joint) membership
//!                 └─ openraft      elections, heartbeats, metrics
//! ```
//!
//! # Leadership transfer
//!
//! openraft 0.9.25 has no `transfer_leader` and no TimeoutNow message. It has
//! `raft.trigger().elect()`: start an election now, even while `enable_elect(false)`.
//! [`Cluster::hand_over_and_shutdown`] builds a handover on top of it. The leader asks an
//! up-to-date follower, through our own [`transport::codec::Request::Handover`], to call
//! `trigger().elect()`. The follower lease (see [`lease`]) makes the *other* followers refuse
//! that candidate, but the old leader grants it. A leader stamps its own vote when it wins and
//! never refreshes that stamp, so its lease check has expired once it has led for
//! `election_timeout_max`. In a 3-node cluster the old leader's vote plus the candidate's own
//! make a majority: measured 3–26 ms from SIGTERM to the new leader, mostly vote fsyncs. A
//! leader younger than `election_timeout_max` first waits out its own lease (measured: 305 ms
//! when it had led for 24 ms). With 5 or more voters the candidate also needs followers whose
//! lease has run out, so the handover can take up to `election_timeout_max` longer. Heartbeats
//! are stopped first so that those leases start running out at once.
//!
//! # Restarts
//!
//! * A node restarted with state never re-initializes, even with `start_as_leader`.
//! * openraft restores a node whose saved vote is its own committed vote directly as
//!   `Leader`. We demote that vote to uncommitted on load
//!   ([`store::LogStore::demote_own_leader_vote`]), so the node comes back as a follower.
//! * Elections are off unless a quorum answers our own pre-vote with yes, and candidates
//!   stand on their own fresh random timers and take turns by node id ([`elections`]).
//! * A node refuses every vote for `election_timeout_max` after it starts, and while its VIP
//!   may be up ([`gate`]).

pub mod auth;
pub mod bounds;
pub mod counters;
pub mod elections;
pub mod gate;
pub mod lease;
pub mod lograte;
pub mod membership;
pub mod store;
pub mod transport;
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
pub use self::lease::{Leadership, Role};
pub use self::store::StoreError;
pub use self::types::{node_id, Metrics, Node, NodeId, PeerInfo, Raft};

use self::elections::{guard_elections, probe_pre_votes, LeaderContact};
pub use self::membership::Admin;
use self::store::{LogStore, StateMachineStore};
use self::transport::{Network, PeerMap, Peers};

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
    /// The keys of `peerKeyFile`; `None`: the peer channel is unauthenticated.
    pub keys: Option<Arc<auth::SharedKeys>>,
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
    peers: Arc<Peers>,
    network: Network,
    settings: ClusterSettings,
    server: JoinHandle<()>,
    /// The planned handover (SIGTERM, or `members remove` of the leader).
    handover: Handover,
    /// Membership changes and `members list`.
    admin: Admin,
    /// Logs membership changes, learns members' addresses, finishes half-done changes.
    membership_watch: JoinHandle<()>,
    /// Keeps `leader_since` up to date.
    leader_watch: JoinHandle<()>,
    /// Asks the peers whether they would vote for this node (see [`probe_pre_votes`]).
    prober: JoinHandle<()>,
    /// Switches openraft's elections on only while a pre-vote would win, and restarts
    /// undecided elections (see [`guard_elections`]).
    guard: JoinHandle<()>,
    /// The "may hold the VIP" signal for the agent (see [`lease`]).
    leadership: watch::Receiver<Leadership>,
    /// Feeds `leadership` from the Raft metrics.
    lease_task: JoinHandle<()>,
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
        let configured = s.peer_map()?;
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
        let configured_ids: BTreeSet<NodeId> = configured.keys().copied().collect();
        let peers = Arc::new(Peers::new(configured));

        // Bind before starting Raft: a wrong address must fail start(), and a
        // follower must be reachable as soon as its Raft runs.
        let listener =
            TcpListener::bind(s.local.addr)
                .await
                .map_err(|source| ClusterError::Bind {
                    addr: s.local.addr,
                    source,
                })?;

        match &s.keys {
            Some(k) => log::info!(
                "peer channel authenticated with peerKeyFile ({} key(s) accepted)",
                k.current().len()
            ),
            None => log::warn!(
                "peer channel is NOT authenticated: anyone who can reach {} from a peer's address \
                 can speak Raft. Set peerKeyFile (make a key with `kube-vip sample key`, copy it \
                 to every node) or firewall the Raft port to the peers' addresses",
                s.local.addr
            ),
        }
        let network = Network::new(
            me,
            s.local.addr.ip(),
            peers.clone(),
            Duration::from_millis(s.heartbeat_ms),
            s.keys.clone(),
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
        if !fresh && s.start_as_leader {
            // The stored membership decides, never startAsLeader: a removed node's state must
            // not seed a cluster (see `membership`). openraft publishes the loaded state once
            // its core runs, a moment after `Raft::new`.
            let mut rx = raft.metrics();
            let removed = tokio::time::timeout(
                Duration::from_secs(1),
                rx.wait_for(|m| m.membership_config.membership().nodes().next().is_some()),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map(|m| {
                !m.membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == me)
            });
            if removed == Some(true) {
                log::warn!(
                    "startAsLeader is set, but the state in {} says {} was removed from its \
                     cluster: refusing to bootstrap from it. The node stays out of the cluster \
                     (no votes, no VIP); to start a new cluster here, stop it and delete that \
                     directory",
                    s.state_dir.display(),
                    s.local.id
                );
            }
        }

        let contact = LeaderContact::new();
        let lease = Duration::from_millis(s.election_timeout_max_ms);
        crate::metrics::get().leader_contact(contact.clone(), ready_window(lease));
        let leader_since = Arc::new(Mutex::new(None));
        let leader_watch = tokio::spawn(watch_leadership(raft.metrics(), leader_since.clone()));
        let handover = Handover {
            raft: raft.clone(),
            me,
            peers: peers.clone(),
            network: network.clone(),
            leader_since,
            election_timeout_min_ms: s.election_timeout_min_ms,
            election_timeout_max_ms: s.election_timeout_max_ms,
        };
        let (step_down_tx, step_down) = watch::channel(false);
        let admin = Admin::new(handover.clone(), gate.clone(), Arc::new(step_down_tx));
        let membership_watch = tokio::spawn(membership::watch_membership(admin.clone()));
        let server = tokio::spawn(transport::serve(
            listener,
            Arc::new(transport::Server {
                raft: raft.clone(),
                me,
                peers: peers.clone(),
                admin: admin.clone(),
                configured: configured_ids,
                no_votes_until: tokio::time::Instant::now() + lease,
                gate: gate.clone(),
                contact: contact.clone(),
                lease,
                refusal_log: Default::default(),
                frame_log: Default::default(),
                limit_log: Default::default(),
                auth_log: Default::default(),
                keys: s.keys.clone(),
            }),
        ));
        // Elections stay off until a quorum would grant a pre-vote (see `probe_pre_votes`).
        raft.runtime_config().elect(false);
        let (would_win_tx, would_win) = watch::channel(false);
        let prober = tokio::spawn(probe_pre_votes(
            raft.clone(),
            network.clone(),
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
            lease,
            Duration::from_millis(s.election_timeout_min_ms),
            Duration::from_millis(s.election_timeout_max_ms),
        ));
        let vip_lease = lease::vip_lease(
            Duration::from_millis(s.heartbeat_ms),
            Duration::from_millis(s.election_timeout_max_ms),
        );
        let (role_tx, leadership) = watch::channel(Leadership::now(Role::Follower));
        let named = peers.clone();
        let lease_task = tokio::spawn(lease::follow(
            raft.metrics(),
            vip_lease,
            role_tx,
            step_down,
            move |id| named.get(id).map(|p| p.addr),
        ));

        let cluster = Cluster {
            raft,
            peers,
            network,
            settings: s,
            server,
            handover,
            admin,
            membership_watch,
            leader_watch,
            prober,
            guard,
            leadership,
            lease_task,
            _lock: lock,
        };

        if fresh && cluster.settings.start_as_leader {
            let members: BTreeMap<NodeId, Node> = cluster
                .peers
                .snapshot()
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

    /// What this node may do with the VIP, kept up to date with the lease ([`lease`]): the
    /// one signal the agent follows.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.clone()
    }

    /// Every known peer: the configured ones and the members named by the membership.
    pub fn peers(&self) -> Arc<Peers> {
        self.peers.clone()
    }

    /// Membership changes and `members list` for the status socket.
    pub fn admin(&self) -> Admin {
        self.admin.clone()
    }

    /// Planned handover, called on the leader at SIGTERM: make another node
    /// leader as fast as possible, then stop this node's Raft.
    ///
    /// Picks a voter that has this leader's whole log (the others would
    /// refuse any other), preferring the one that answered most recently,
    /// stops heartbeats, sends it [`transport::codec::Request::Handover`] (falling back
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
        let res = self.handover.run(&m).await;
        self.shutdown().await;
        res.map(|_| ())
    }

    /// Stops Raft, the listener and all peer connections.
    pub async fn shutdown(self) {
        if let Err(e) = self.raft.shutdown().await {
            log::warn!("raft shutdown: {e}");
        }
        self.server.abort();
        self.leader_watch.abort();
        self.membership_watch.abort();
        self.prober.abort();
        self.guard.abort();
        self.lease_task.abort();
        let _ = self.server.await;
        self.network.close();
    }
}

/// The planned leadership handover (see the module doc), shared by SIGTERM and by
/// `members remove` of the leader.
#[derive(Clone)]
pub(crate) struct Handover {
    raft: Raft,
    me: NodeId,
    peers: Arc<Peers>,
    network: Network,
    /// When this node last became leader.
    leader_since: Arc<Mutex<Option<Instant>>>,
    election_timeout_min_ms: u64,
    election_timeout_max_ms: u64,
}

impl Handover {
    /// The followers' leader lease (openraft's, `election_timeout_max`).
    pub(crate) fn lease(&self) -> Duration {
        Duration::from_millis(self.election_timeout_max_ms)
    }

    fn peer_name(&self, id: NodeId) -> String {
        self.peers
            .get(id)
            .map(|p| p.id)
            .unwrap_or_else(|| format!("{id:#x}"))
    }

    fn peer_addr(&self, id: NodeId) -> Option<SocketAddr> {
        self.peers.get(id).map(|p| p.addr)
    }

    /// Hands leadership over (this node must lead); heartbeats stay off afterwards (a node
    /// that goes on running switches them back on). The new leader's id.
    pub(crate) async fn run(&self, m: &Metrics) -> Result<NodeId, ClusterError> {
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
                since + Duration::from_millis(self.election_timeout_max_ms) + LEASE_MARGIN;
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

        let ask_limit = Duration::from_millis(self.election_timeout_min_ms);
        let mut errors = Vec::new();
        for (_, target) in &candidates {
            let name = self.peer_name(*target);
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
        let limit = Duration::from_millis(3 * self.election_timeout_max_ms);
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
}

/// How long a follower may go without an accepted leader append and still report ready
/// (`/readyz`): a healthy leader sends one every `heartbeatMs`, and the followers give it up
/// after `lease`; four leases, at least 1 s, so that a slow heartbeat or a quick election does
/// not flap readiness, while a follower cut off from the leader says so within about a second.
fn ready_window(lease: Duration) -> Duration {
    (lease * 4).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::membership::{Change, ChangeError};
    use super::*;

    fn settings(name: &str, port: u16, start_as_leader: bool) -> ClusterSettings {
        let dir = std::env::temp_dir().join(format!(
            "kube-vip-members-test-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        ClusterSettings {
            local: PeerInfo {
                id: name.into(),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            },
            remotes: vec![],
            start_as_leader,
            heartbeat_ms: 20,
            election_timeout_min_ms: 80,
            election_timeout_max_ms: 120,
            state_dir: dir,
            keys: None,
        }
    }

    /// A real one-node cluster (Raft on loopback): the refusals that need no second node.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusals_of_a_lone_voter_and_of_a_non_member() {
        let s = settings("solo", 0, true);
        let dir = s.state_dir.clone();
        let solo = Cluster::start(s, Arc::default()).await.expect("start");
        let mut rx = solo.raft.metrics();
        tokio::time::timeout(
            Duration::from_secs(5),
            // Leading is not enough: until its membership entry is applied, a change is
            // refused as "in progress" (seen once in CI).
            rx.wait_for(|m| m.state == ServerState::Leader && membership::committed(m)),
        )
        .await
        .expect("a lone voter leads within 5 s")
        .expect("metrics");
        let admin = solo.admin();
        let list = admin.list().expect("list");
        assert_eq!(list.members.len(), 1);
        assert!(list.members[0].leader && list.members[0].role == "voter");
        let e = admin
            .change(Change::Remove { id: "solo".into() })
            .await
            .expect_err("last voter");
        assert!(
            matches!(&e, ChangeError::Refused(t) if t.contains("solo is the last voter")),
            "{e}"
        );
        let e = admin
            .change(Change::Remove {
                id: "server9".into(),
            })
            .await
            .expect_err("unknown");
        assert_eq!(e, ChangeError::Refused("server9 is not a member".into()));
        solo.shutdown().await;
        let _ = fs::remove_dir_all(&dir);

        // A fresh node that was never added: no membership, no say.
        let s = settings("newcomer", 0, false);
        let dir = s.state_dir.clone();
        let fresh = Cluster::start(s, Arc::default()).await.expect("start");
        let admin = fresh.admin();
        assert!(admin
            .list()
            .expect_err("not a member")
            .contains("not a member of any cluster yet"));
        let e = admin
            .change(Change::Remove { id: "solo".into() })
            .await
            .expect_err("non-member");
        assert!(e.to_string().contains("not a voting member"), "{e}");
        fresh.shutdown().await;
        let _ = fs::remove_dir_all(&dir);
    }
}
