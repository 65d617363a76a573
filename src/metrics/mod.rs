//! What an operator can see: Prometheus metrics, the health endpoints and `kube-vip status`.
//!
//! One [`Metrics`] value per process, reached through [`get`], holds every metric, registered
//! once in its own registry, plus the little state the health endpoints and `status` need. The
//! rest of the program only calls its hook methods (`metrics::get().vip_taken()`), one line per
//! event, so moving a hook is moving a line. [`server`] serves `/metrics`, `/healthz` and
//! `/readyz`; [`status`] answers `kube-vip status` on a unix socket in `stateDir`.
//!
//! Names follow the Prometheus conventions: `kube_vip_` prefix, base units (`_seconds`,
//! `_bytes`), counters end in `_total`.

pub mod server;
pub mod status;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::agent::Role;
use crate::cluster::elections::LeaderContact;
use crate::config::Config;
use crate::shutdown::Shutdown;
use log::warn;

/// How often the agent's loop says it is alive when nothing else wakes it.
pub const AGENT_TICK: Duration = Duration::from_secs(1);
/// `/healthz` fails once the agent's loop has not been seen for this long: ten missed ticks,
/// far beyond any step the loop takes (a probe, a netlink round trip), so only a hung loop
/// trips it.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(10);

/// Labels of the per-peer metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer's `id` from the config.
    pub peer: String,
}

/// Labels of the current-leader metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaderLabels {
    /// The leader's `id` from the config (its Raft address if it is not a configured peer).
    pub peer: String,
    /// The leader's Raft address.
    pub address: String,
}

/// Labels of the announcement counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameLabels {
    /// `arp_request`, `arp_reply` or `unsolicited_na`.
    pub kind: &'static str,
}

/// Labels of the per-backend metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// The load balancer's `name`.
    pub lb: String,
    /// The backend as `address:port` (`[v6]:port`).
    pub backend: String,
}

/// Labels of the build-info metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    /// The crate version.
    version: &'static str,
}

/// A histogram of durations, in seconds.
type Seconds = Histogram;
/// A family of histograms; a plain `fn` makes each new one.
type SecondsFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Buckets for the health-check duration: 1 ms to ~4 s.
fn check_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 13))
}

/// Every metric of the process, and the state behind the health endpoints and `status`.
pub struct Metrics {
    /// Where every metric below is registered, for encoding.
    registry: Registry,
    /// 1 while this node is entitled to the VIP (the role the agent acts on is `Leader`).
    pub is_leader: Gauge,
    /// 1 while the VIP is on this node's interface (taken, not yet released).
    pub vip_bound: Gauge,
    /// The Raft term this node is in.
    pub raft_term: Gauge,
    /// 1 for the leader this node knows of; no series while none is known.
    raft_leader: Family<LeaderLabels, Gauge>,
    /// New (term, leader) pairs this node has seen.
    pub leader_changes: Counter,
    /// Times this node's VIP lease ran out while it was still Raft leader.
    pub lease_lapses: Counter,
    /// VIP additions to the interface.
    pub vip_takes: Counter,
    /// VIP removals from the interface.
    pub vip_releases: Counter,
    /// From this node becoming leader (starting, in single-node mode) to the VIP bound.
    pub election_to_vip_bound: Seconds,
    /// Probes before a take that found another host answering for the VIP.
    pub probe_conflicts: Counter,
    /// Gratuitous ARP and unsolicited NA frames sent, by kind.
    pub announce_frames: Family<FrameLabels, Counter>,
    /// Failed connections or writes to a peer's Raft port, by peer.
    pub peer_connection_errors: Family<PeerLabels, Counter>,
    /// Peer connections refused or abandoned because authentication failed. A plain counter:
    /// refusals come from sources that proved nothing, so no peer label can be trusted. Copied
    /// from `cluster::counters` before each encode (see [`Metrics::encode`]).
    pub peer_auth_refused: Counter,
    /// Peer frames refused before Raft saw them (out-of-bounds terms or log ids, bad tags).
    pub peer_frames_refused: Counter,
    /// Inbound peer connections closed by the connection limits.
    pub peer_connections_limited: Counter,
    /// 1 if the backend passes its health checks, else 0.
    pub backend_up: Family<BackendLabels, Gauge>,
    /// Client connections open to the backend now.
    pub backend_active_connections: Family<BackendLabels, Gauge>,
    /// Client connections forwarded to the backend.
    pub backend_connections: Family<BackendLabels, Counter>,
    /// Connection attempts to the backend that failed.
    pub backend_connect_failures: Family<BackendLabels, Counter>,
    /// Bytes forwarded from clients to the backend.
    pub backend_sent_bytes: Family<BackendLabels, Counter>,
    /// Bytes forwarded from the backend to clients.
    pub backend_received_bytes: Family<BackendLabels, Counter>,
    /// How long one health check of the backend took.
    pub backend_check_duration: SecondsFamily<BackendLabels>,
    /// What `/healthz`, `/readyz` and `status` read.
    state: Mutex<State>,
    /// Where `status` reads backend health from (see [`Metrics::backends_from`]).
    backends: Mutex<Option<BackendSource>>,
}

/// Reads every load balancer's backends for `status` (a closure over the agent's pools, so this
/// module needs no load-balancer types).
pub type BackendSource = Box<dyn Fn() -> Vec<status::BackendStatus> + Send + Sync>;

/// One backend's metric handles (children of the `kube_vip_backend_*` families, sharing their
/// values), made once per backend by [`Metrics::backend`]. Each method is a hook: one line where
/// the event happens, a few relaxed atomic adds, no lock and no allocation.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    /// `kube_vip_backend_up`.
    up: Gauge,
    /// `kube_vip_backend_active_connections`.
    active: Gauge,
    /// `kube_vip_backend_connections_total`.
    connections: Counter,
    /// `kube_vip_backend_connect_failures_total`.
    connect_failures: Counter,
    /// `kube_vip_backend_sent_bytes_total`.
    sent: Counter,
    /// `kube_vip_backend_received_bytes_total`.
    received: Counter,
    /// `kube_vip_backend_health_check_duration_seconds`.
    check_duration: Seconds,
}

impl BackendMetrics {
    /// Hook: the backend's health changed (active checks, or failed proxied connects).
    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    /// Hook: a proxied connection to the backend starts (connecting counts: `leastconn` counts
    /// it too).
    pub fn conn_started(&self) {
        self.active.inc();
    }

    /// Hook: the connect of a proxied connection succeeded.
    pub fn conn_connected(&self) {
        self.connections.inc();
    }

    /// Hook: the connect of a proxied connection failed.
    pub fn connect_failed(&self) {
        self.connect_failures.inc();
    }

    /// Hook: a proxied connection ended (or its connect failed).
    pub fn conn_ended(&self) {
        self.active.dec();
    }

    /// Hook: bytes a proxied connection moved, `sent` to the backend and `received` from it.
    pub fn bytes(&self, sent: u64, received: u64) {
        self.sent.inc_by(sent);
        self.received.inc_by(received);
    }

    /// Hook: one health check took `took`.
    pub fn checked(&self, took: Duration) {
        self.check_duration.observe(took.as_secs_f64());
    }
}

/// The non-metric state: what this node is and has seen.
#[derive(Debug)]
struct State {
    /// Single-node mode (no Raft).
    single_node: bool,
    /// This node's peer id, if clustered.
    local: Option<String>,
    /// Configured peers, id by Raft address.
    peers: BTreeMap<SocketAddr, String>,
    /// What the connection to each remote peer last did: `Some(true)` reachable.
    reachable: BTreeMap<String, bool>,
    /// The role the agent acts on; `None` until its loop first ran.
    role: Option<Role>,
    /// The role `follow` last derived from Raft (sees every change, unlike the agent).
    raft_role: Role,
    /// The known Raft leader.
    leader: Option<SocketAddr>,
    /// Term of the last counted leader change.
    counted: Option<(u64, Option<SocketAddr>)>,
    /// When this node became leader, until the VIP is bound.
    elected_at: Option<Instant>,
    /// When the agent's loop was last seen.
    alive_at: Instant,
    /// When this node last accepted a leader's append, and how long ago that may be for a
    /// follower to count as following (clustered mode only).
    contact: Option<(LeaderContact, Duration)>,
}

/// The process-wide metrics.
static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics, created on first use.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("kube_vip");
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register(
            "build_info",
            "Always 1; the label says which kube-vip runs",
            build,
        );
        let m = Metrics {
            registry: Registry::default(),
            is_leader: Gauge::default(),
            vip_bound: Gauge::default(),
            raft_term: Gauge::default(),
            raft_leader: Family::default(),
            leader_changes: Counter::default(),
            lease_lapses: Counter::default(),
            vip_takes: Counter::default(),
            vip_releases: Counter::default(),
            election_to_vip_bound: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            probe_conflicts: Counter::default(),
            announce_frames: Family::default(),
            peer_connection_errors: Family::default(),
            peer_auth_refused: Counter::default(),
            peer_frames_refused: Counter::default(),
            peer_connections_limited: Counter::default(),
            backend_up: Family::default(),
            backend_active_connections: Family::default(),
            backend_connections: Family::default(),
            backend_connect_failures: Family::default(),
            backend_sent_bytes: Family::default(),
            backend_received_bytes: Family::default(),
            backend_check_duration: Family::new_with_constructor(check_buckets),
            state: Mutex::new(State {
                single_node: false,
                local: None,
                peers: BTreeMap::new(),
                reachable: BTreeMap::new(),
                role: None,
                raft_role: Role::Follower,
                leader: None,
                counted: None,
                elected_at: None,
                alive_at: Instant::now(),
                contact: None,
            }),
            backends: Mutex::new(None),
        };
        r.register("is_leader", "1 while this node is entitled to hold the VIP (Raft leader with a live lease, or single-node mode), else 0", m.is_leader.clone());
        r.register("vip_bound", "1 while the VIP is on this node's interface, else 0; differs from is_leader during a probe or a lease lapse", m.vip_bound.clone());
        r.register(
            "raft_term",
            "The Raft term this node is in",
            m.raft_term.clone(),
        );
        r.register("raft_leader", "1 for the Raft leader this node knows of (labels: its peer id and Raft address); no series while none is known", m.raft_leader.clone());
        r.register(
            "raft_leader_changes",
            "New (term, leader) pairs this node has learnt of",
            m.leader_changes.clone(),
        );
        r.register("lease_lapses", "Times this node's VIP lease ran out while it was still Raft leader (no quorum acknowledgement in time)", m.lease_lapses.clone());
        r.register(
            "vip_takes",
            "Times this node added the VIP to its interface",
            m.vip_takes.clone(),
        );
        r.register(
            "vip_releases",
            "Times this node removed the VIP from its interface",
            m.vip_releases.clone(),
        );
        r.register("election_to_vip_bound_seconds", "From this node becoming Raft leader (process start in single-node mode) to the VIP bound on its interface", m.election_to_vip_bound.clone());
        r.register(
            "vip_probe_conflicts",
            "Probes before taking the VIP that found another host answering for it",
            m.probe_conflicts.clone(),
        );
        r.register("announce_frames_sent", "Gratuitous ARP and unsolicited neighbour advertisement frames sent for the VIP, by kind", m.announce_frames.clone());
        r.register(
            "peer_connection_errors",
            "Failed connections and writes to a peer's Raft port, by peer",
            m.peer_connection_errors.clone(),
        );
        r.register(
            "peer_auth_refused",
            "Peer connections refused or abandoned because authentication failed (wrong or missing key, bad proof), both directions",
            m.peer_auth_refused.clone(),
        );
        r.register(
            "peer_frames_refused",
            "Peer frames refused before Raft saw them: terms or log ids out of bounds, a vote naming another node, a tag that did not verify",
            m.peer_frames_refused.clone(),
        );
        r.register(
            "peer_connections_limited",
            "Inbound peer connections closed by the connection limits",
            m.peer_connections_limited.clone(),
        );
        r.register(
            "backend_up",
            "1 if the backend passes its health checks, else 0",
            m.backend_up.clone(),
        );
        r.register(
            "backend_active_connections",
            "Client connections open to the backend",
            m.backend_active_connections.clone(),
        );
        r.register(
            "backend_connections",
            "Client connections forwarded to the backend",
            m.backend_connections.clone(),
        );
        r.register(
            "backend_connect_failures",
            "Connection attempts to the backend that failed",
            m.backend_connect_failures.clone(),
        );
        r.register(
            "backend_sent_bytes",
            "Bytes forwarded from clients to the backend",
            m.backend_sent_bytes.clone(),
        );
        r.register(
            "backend_received_bytes",
            "Bytes forwarded from the backend to clients",
            m.backend_received_bytes.clone(),
        );
        r.register(
            "backend_health_check_duration_seconds",
            "How long one health check of the backend took",
            m.backend_check_duration.clone(),
        );
        Metrics { registry: r, ..m }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain values behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hook: the node's shape, once at start. `peers` are every configured peer (local one
    /// included) as (id, Raft address); `local` is this node's id.
    pub fn node(&self, single_node: bool, local: Option<&str>, peers: &[(String, SocketAddr)]) {
        let mut s = self.state();
        s.single_node = single_node;
        s.local = local.map(str::to_string);
        s.peers = peers.iter().map(|(id, a)| (*a, id.clone())).collect();
        s.reachable.clear();
        s.alive_at = Instant::now();
        if single_node {
            // Alone, the node "is elected" at start: the histogram then shows start to bound.
            s.elected_at = Some(Instant::now());
        }
    }

    /// Hook: a member the Raft membership named (added with `members add`), so that `status`
    /// names it like a configured peer.
    pub fn peer_learned(&self, id: &str, addr: SocketAddr) {
        self.state()
            .peers
            .entry(addr)
            .or_insert_with(|| id.to_string());
    }

    /// Hook: what one Raft metrics snapshot says, with the role derived from it. Called by
    /// `follow` for every snapshot, so it sees every lapse even when the agent does not.
    pub fn raft(&self, term: u64, leader: Option<SocketAddr>, role: Role) {
        self.raft_term.set(i64::try_from(term).unwrap_or(i64::MAX));
        let mut s = self.state();
        if s.leader != leader {
            self.raft_leader.clear();
            if let Some(a) = leader {
                let peer = s.peers.get(&a).cloned().unwrap_or_else(|| a.to_string());
                self.raft_leader
                    .get_or_create(&LeaderLabels {
                        peer,
                        address: a.to_string(),
                    })
                    .set(1);
            }
            s.leader = leader;
        }
        if leader.is_some() && s.counted.is_none_or(|c| c != (term, leader)) {
            s.counted = Some((term, leader));
            self.leader_changes.inc();
        }
        match (s.raft_role, role) {
            (Role::Leader, Role::Lapsed) => {
                self.lease_lapses.inc();
            }
            (Role::Follower, Role::Leader | Role::Lapsed) => s.elected_at = Some(Instant::now()),
            (_, Role::Follower) => s.elected_at = None,
            _ => {}
        }
        s.raft_role = role;
    }

    /// Hook: the role the agent is about to act on; also proof that its loop runs.
    pub fn agent_role(&self, role: Role) {
        self.is_leader.set(i64::from(role == Role::Leader));
        let mut s = self.state();
        s.role = Some(role);
        s.alive_at = Instant::now();
    }

    /// Hook: the VIP was added to the interface.
    pub fn vip_taken(&self) {
        self.vip_takes.inc();
        self.vip_bound.set(1);
        if let Some(t) = self.state().elected_at.take() {
            self.election_to_vip_bound
                .observe(t.elapsed().as_secs_f64());
        }
    }

    /// Hook: the VIP was removed from the interface.
    pub fn vip_released(&self) {
        self.vip_releases.inc();
        self.vip_bound.set(0);
    }

    /// Hook: one announcement frame went out.
    pub fn frame_sent(&self, kind: &'static str) {
        self.announce_frames
            .get_or_create(&FrameLabels { kind })
            .inc();
    }

    /// Hook: the connection to peer `id` works (`true`) or failed (`false`).
    pub fn peer_reachable(&self, id: &str, reachable: bool) {
        if !reachable {
            self.peer_connection_errors
                .get_or_create(&PeerLabels {
                    peer: id.to_string(),
                })
                .inc();
        }
        self.state().reachable.insert(id.to_string(), reachable);
    }

    /// `/healthz`: `Err` with the reason when the agent's loop has not been seen lately.
    pub fn live(&self) -> Result<(), String> {
        let quiet = self.state().alive_at.elapsed();
        if quiet > LIVENESS_WINDOW {
            return Err(format!(
                "the agent's loop has not run for {} s",
                quiet.as_secs()
            ));
        }
        Ok(())
    }

    /// `/readyz`: `Err` with the reason unless the agent runs and (clustered) a leader is known.
    pub fn ready(&self) -> Result<(), String> {
        self.live()?;
        let s = self.state();
        if s.role.is_none() {
            return Err("the agent has not started yet".into());
        }
        if s.single_node {
            return Ok(());
        }
        if s.leader.is_none() {
            return Err("no Raft leader known".into());
        }
        match s.raft_role {
            Role::Leader => Ok(()),
            Role::Lapsed => Err("leader without a quorum acknowledgement: lease lapsed".into()),
            // Raft keeps the last leader it knew while cut off; a follower only counts as
            // following while that leader's appends still arrive.
            Role::Follower => match &s.contact {
                Some((c, window)) if c.age() > *window => Err(format!(
                    "no message from the leader for {} ms",
                    c.age().as_millis()
                )),
                _ => Ok(()),
            },
        }
    }

    /// Hook: where the cluster records accepted leader appends, and how long a follower may go
    /// without one and still be ready.
    pub fn leader_contact(&self, contact: LeaderContact, window: Duration) {
        self.state().contact = Some((contact, window));
    }

    /// The metrics in the text format `Accept` asks for (see [`server::encode`]), with the peer
    /// channel's tallies copied in first.
    pub fn encode(&self, openmetrics: bool) -> Result<String, std::fmt::Error> {
        self.copy_peer_counters();
        server::encode(&self.registry, openmetrics)
    }

    /// Copies the peer channel's atomics (`cluster::counters`, counted where the refusals
    /// happen) into their counters. Both only grow, so the counters stay monotonic.
    fn copy_peer_counters(&self) {
        use crate::cluster::counters as c;
        for (counter, tally) in [
            (&self.peer_auth_refused, &c::PEER_AUTH_FAILURES),
            (&self.peer_frames_refused, &c::PEER_FRAMES_REFUSED),
            (&self.peer_connections_limited, &c::PEER_CONNECTIONS_LIMITED),
        ] {
            counter
                .inner()
                .store(tally.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// The metric handles of one backend, made once when its load balancer's backends are
    /// made: the proxy then feeds them without a label lookup or an allocation. Its
    /// `backend_up` starts at 1, as the backend's health does.
    pub fn backend(&self, lb: &str, addr: SocketAddr) -> BackendMetrics {
        let l = BackendLabels {
            lb: lb.to_string(),
            backend: addr.to_string(),
        };
        let m = BackendMetrics {
            up: self.backend_up.get_or_create(&l).clone(),
            active: self.backend_active_connections.get_or_create(&l).clone(),
            connections: self.backend_connections.get_or_create(&l).clone(),
            connect_failures: self.backend_connect_failures.get_or_create(&l).clone(),
            sent: self.backend_sent_bytes.get_or_create(&l).clone(),
            received: self.backend_received_bytes.get_or_create(&l).clone(),
            check_duration: self.backend_check_duration.get_or_create(&l).clone(),
        };
        m.up.set(1);
        m
    }

    /// Hook: where `status` reads the load balancers' backends from (set once by the agent).
    pub fn backends_from(&self, source: BackendSource) {
        if let Ok(mut s) = self.backends.lock() {
            *s = Some(source);
        }
    }

    /// Every backend's state for `status`, empty without load balancers.
    fn backend_status(&self) -> Vec<status::BackendStatus> {
        match self.backends.lock() {
            Ok(s) => s.as_ref().map(|f| f()).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }
}

/// Starts what an operator sees: records the node's shape, serves `metricsAddress` (unless
/// `""`) and the status socket, each on its own task until `shutdown`. A metrics port that
/// cannot be bound is an error (kubelet would otherwise restart a healthy agent whose probe
/// finds nothing); a status socket that cannot be made is only logged.
pub async fn start(config: &Config, shutdown: Shutdown) -> Result<(), server::BindError> {
    let peers: Vec<(String, SocketAddr)> = config
        .all_peers()
        .map(|p| (p.id.clone(), p.socket_addr()))
        .collect();
    let local = config.local_peer.as_ref().map(|p| p.id.as_str());
    get().node(config.single_node, local, &peers);
    // Validated when the config was loaded.
    if let Ok(Some(at)) = config.metrics_listen() {
        let listener = server::bind(at).await?;
        tokio::spawn(server::serve(listener, shutdown.clone()));
    }
    let dir = config.state_dir();
    match status::listen(&dir) {
        Ok(l) => {
            tokio::spawn(status::serve(l, config.vip.to_string(), shutdown));
        }
        Err(e) => warn!(
            "cannot open the status socket in {}: {e}; `kube-vip status` will not work",
            dir.display()
        ),
    }
    Ok(())
}

/// Test helper: the value of `kube_vip_<metric>{lb,backend}` in the process-wide metrics.
#[cfg(test)]
pub fn backend_sample(metric: &str, lb: &str, backend: std::net::SocketAddr) -> Option<f64> {
    let text = get().encode(false).ok()?;
    let head = format!("kube_vip_{metric}{{lb=\"{lb}\",backend=\"{backend}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(head.as_str()))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_channel_tallies_are_exported() {
        use crate::cluster::counters as c;
        let m = Metrics::new();
        c::PEER_AUTH_FAILURES.fetch_add(2, Ordering::Relaxed);
        c::PEER_FRAMES_REFUSED.fetch_add(3, Ordering::Relaxed);
        c::PEER_CONNECTIONS_LIMITED.fetch_add(4, Ordering::Relaxed);
        let text = m.encode(false).expect("encode");
        let value = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {text}"))
        };
        // Other tests count refusals too: at least ours.
        assert!(value("kube_vip_peer_auth_refused_total") >= 2);
        assert!(value("kube_vip_peer_frames_refused_total") >= 3);
        assert!(value("kube_vip_peer_connections_limited_total") >= 4);
    }

    #[test]
    fn backend_hooks_feed_their_series() {
        let m = Metrics::new();
        let b = m.backend("api", addr("10.0.0.1:6443"));
        b.conn_started();
        b.conn_connected();
        b.conn_started();
        b.connect_failed();
        b.conn_ended();
        b.bytes(10, 20);
        b.set_up(false);
        b.checked(Duration::from_millis(3));
        let text = m.encode(false).expect("encode");
        let l = "{lb=\"api\",backend=\"10.0.0.1:6443\"}";
        for want in [
            format!("kube_vip_backend_up{l} 0"),
            format!("kube_vip_backend_active_connections{l} 1"),
            format!("kube_vip_backend_connections_total{l} 1"),
            format!("kube_vip_backend_connect_failures_total{l} 1"),
            format!("kube_vip_backend_sent_bytes_total{l} 10"),
            format!("kube_vip_backend_received_bytes_total{l} 20"),
            format!("kube_vip_backend_health_check_duration_seconds_count{l} 1"),
        ] {
            assert!(text.contains(&want), "{want} missing in {text}");
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn raft_hook_counts_changes_and_lapses() {
        // A fresh value, not the process-wide one other tests may touch.
        let m = Metrics::new();
        m.node(
            false,
            Some("a"),
            &[
                ("a".into(), addr("10.0.0.1:1")),
                ("b".into(), addr("10.0.0.2:1")),
            ],
        );
        assert!(m.ready().is_err(), "not ready before the agent ran");
        m.raft(1, None, Role::Follower);
        m.agent_role(Role::Follower);
        assert!(m.ready().unwrap_err().contains("no Raft leader"));
        m.raft(1, Some(addr("10.0.0.2:1")), Role::Follower);
        m.raft(1, Some(addr("10.0.0.2:1")), Role::Follower);
        assert_eq!(m.leader_changes.get(), 1);
        assert!(m.ready().is_ok());
        m.raft(2, Some(addr("10.0.0.1:1")), Role::Lapsed);
        m.raft(2, Some(addr("10.0.0.1:1")), Role::Leader);
        m.raft(2, Some(addr("10.0.0.1:1")), Role::Lapsed);
        assert_eq!((m.leader_changes.get(), m.lease_lapses.get()), (2, 1));
        assert_eq!(m.raft_term.get(), 2);
        m.vip_taken();
        let text = m.encode(false).expect("encode");
        assert!(
            text.contains("kube_vip_raft_leader{peer=\"a\",address=\"10.0.0.1:1\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("peer=\"b\""),
            "old leader's series must go: {text}"
        );
        assert!(
            text.contains("kube_vip_election_to_vip_bound_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("kube_vip_vip_bound 1"), "{text}");
    }

    #[test]
    fn a_follower_cut_off_from_its_leader_is_not_ready() {
        let m = Metrics::new();
        m.node(false, Some("a"), &[("b".into(), addr("10.0.0.2:1"))]);
        m.agent_role(Role::Follower);
        m.raft(3, Some(addr("10.0.0.2:1")), Role::Follower);
        let contact = LeaderContact::new();
        m.leader_contact(contact.clone(), Duration::from_millis(20));
        assert!(m.ready().is_ok(), "just heard from the leader");
        std::thread::sleep(Duration::from_millis(40));
        let e = m.ready().unwrap_err();
        assert!(e.contains("no message from the leader"), "{e}");
        contact.touch();
        assert!(m.ready().is_ok(), "heard again");
        m.raft(4, Some(addr("10.0.0.1:1")), Role::Lapsed);
        assert!(m.ready().unwrap_err().contains("lease lapsed"));
    }

    #[test]
    fn single_node_is_ready_once_the_agent_runs() {
        let m = Metrics::new();
        m.node(true, None, &[]);
        assert!(m.ready().is_err());
        m.agent_role(Role::Leader);
        assert!(m.ready().is_ok() && m.live().is_ok());
        assert_eq!(m.is_leader.get(), 1);
    }
}
