//! The lease: from Raft metrics to a ready "may hold the VIP" signal ([`Leadership`]), the one
//! thing the agent needs from the cluster. The timing argument, and the lease formula
//! ([`vip_lease`]), live here and nowhere else.
//!
//! openraft 0.9 keeps a leader that is cut off from the majority in `Leader` state until the
//! partition heals, so "I am leader" is not enough to hold the VIP. What is enough is a *lease*
//! earned from the followers.
//!
//! # The timing argument
//!
//! Let `t_q` be the send time of the newest heartbeat (or append) that a quorum acknowledged.
//! openraft reports `millis_since_quorum_ack = now − t_q` on the leader. Write `E_max` for
//! `electionTimeoutMaxMs` and `H` for `heartbeatMs`.
//!
//! 1. A follower that accepted a heartbeat refuses every vote request for `E_max` after it,
//!    by openraft's follower-side leader lease (`Engine::handle_vote_req`).
//! 2. A node that (re)starts refuses every vote request for `E_max` after it starts
//!    (`transport::server`, `refuse_vote`), so a restart cannot erase the promise in 1.
//! 3. Any majority that elects a new leader without us contains a node that acknowledged the
//!    heartbeat sent at `t_q` (two majorities always share a node), received at or after
//!    `t_q`. By 1 and 2 that node grants no vote before `t_q + E_max`; so no other node can
//!    be leader before `t_q + E_max`.
//! 4. We hold the VIP only while `now − t_q < E_max − M`, with the margin
//!    `M = max(2·H, 25 ms)`: the lease ends `M` before anyone else can be elected, and `M`
//!    covers what happens between the lease's end and the address being gone (timer wake-up,
//!    stopping nothing but the address, one netlink round trip: about 1 ms on an idle host).
//!    With the defaults (`H` = 20 ms, `E_max` = 120 ms) the lease is 80 ms.
//! 5. The metrics value is a snapshot published by openraft after each event it handles (at
//!    least every heartbeat tick, 1.5·H). We date it when it reaches us, which is at or after
//!    it was taken, so `received − millis_since_quorum_ack` is at or before the real `t_q`:
//!    the error is on the safe side. If the snapshots stop coming (Raft stuck), a timer still
//!    ends the lease on time.
//!
//! A healthy leader sees `millis_since_quorum_ack` between 0 and one tick (30 ms with the
//! defaults) plus a round trip, well inside the lease. A new leader gets no lease until a
//! quorum acknowledged one of its appends (`millis_since_quorum_ack` is `None` until then).
//!
//! When the lease lapses but Raft still says leader, the role is [`Role::Lapsed`]: the VIP goes,
//! listeners and their connections stay, so a short lapse (lost heartbeats) costs new
//! connections a moment instead of cutting every open one. Losing leadership is
//! [`Role::Follower`] and stops everything.

use std::net::SocketAddr;
use std::time::Duration;

use log::{info, warn};
use openraft::ServerState;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use super::types::{Metrics, NodeId};

/// What this node may do with the VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Entitled to hold the VIP: no other node can legitimately hold it now.
    Leader,
    /// Raft leader whose lease lapsed: must not hold the VIP, but keeps its listeners and
    /// their connections, which work again if the lease comes back before leadership goes.
    Lapsed,
    /// Must not hold the VIP: another node may hold it, or we cannot tell.
    Follower,
}

/// A role and when it was decided: the time the Raft metrics it is based on arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    /// What this node may do.
    pub role: Role,
    /// When the decision's evidence arrived; a vote granted later makes it stale.
    pub as_of: Instant,
    /// When a `Leader` role ends unless renewed (the end of the lease); `None`: never (single
    /// node). Updated with every renewal without waking the agent, so the agent can check it
    /// just before taking the VIP, whether or not the lease timer has run yet.
    pub until: Option<Instant>,
}

impl Leadership {
    /// A role decided now.
    pub fn now(role: Role) -> Leadership {
        Leadership {
            role,
            as_of: Instant::now(),
            until: None,
        }
    }

    /// Whether this allows holding the VIP at `now`.
    pub fn may_hold(&self, now: Instant) -> bool {
        self.role == Role::Leader && self.until.is_none_or(|u| u > now)
    }
}

/// Smallest margin between the end of the VIP lease and the earliest possible new leader.
pub const MIN_LEASE_MARGIN: Duration = Duration::from_millis(25);

/// The margin `M = max(2·H, 25 ms)` between the end of the VIP lease and the earliest
/// possible new leader (point 4 of the module doc).
pub fn lease_margin(heartbeat: Duration) -> Duration {
    (heartbeat * 2).max(MIN_LEASE_MARGIN)
}

/// How long a quorum acknowledgement entitles the leader to hold the VIP: `E_max − M`.
pub fn vip_lease(heartbeat: Duration, election_timeout_max: Duration) -> Duration {
    election_timeout_max.saturating_sub(lease_margin(heartbeat))
}

/// The role one metrics snapshot allows, and until when it allows [`Role::Leader`].
///
/// `received` is when the snapshot reached us; `now` is the time of the decision.
pub fn evaluate(
    m: &Metrics,
    received: Instant,
    now: Instant,
    lease: Duration,
) -> (Role, Option<Instant>) {
    if m.state != ServerState::Leader || m.current_leader != Some(m.id) {
        return (Role::Follower, None);
    }
    let Some(ms) = m.millis_since_quorum_ack else {
        return (Role::Lapsed, None);
    };
    // checked_sub: a value older than the process's clock origin cannot earn a lease anyway.
    let until = received
        .checked_sub(Duration::from_millis(ms))
        .map(|acked| acked + lease);
    match until {
        Some(until) if until > now => (Role::Leader, Some(until)),
        _ => (Role::Lapsed, None),
    }
}

/// Feeds `role` from Raft metrics until the metrics channel closes (Raft shut down), then
/// sets [`Role::Follower`]. Logs leader changes the way kube-vip 0.1 did. While `step_down`
/// says so (a leader about to hand over because it is being removed), the role is
/// [`Role::Follower`] whatever Raft says.
pub async fn follow(
    mut metrics: watch::Receiver<Metrics>,
    lease: Duration,
    role: watch::Sender<Leadership>,
    mut step_down: watch::Receiver<bool>,
    addr_of: impl Fn(NodeId) -> Option<SocketAddr>,
) {
    let mut leader: Option<NodeId> = None;
    let mut snapshot = metrics.borrow_and_update().clone();
    let mut received = Instant::now();
    let mut first = true;
    loop {
        if snapshot.current_leader != leader || first {
            leader = snapshot.current_leader;
            match leader.map(|id| (id, addr_of(id))) {
                Some((_, Some(addr))) => info!("The Node [{addr}] is leading"),
                Some((id, None)) => info!("The Node [id {id:#x}] is leading"),
                None => info!("no leader known (term {})", snapshot.vote.leader_id().term),
            }
        }
        first = false;
        let (now_role, until) = if *step_down.borrow_and_update() {
            (Role::Follower, None)
        } else {
            evaluate(&snapshot, received, Instant::now(), lease)
        };
        crate::metrics::get().raft(snapshot.current_term, leader.and_then(&addr_of), now_role);
        let before = role.borrow().role;
        // The lease's end is updated with every snapshot, but only a change of role wakes the
        // agent.
        role.send_if_modified(|l| {
            let changed = l.role != now_role;
            if changed {
                l.as_of = received;
            }
            l.role = now_role;
            l.until = until;
            changed
        });
        if before != now_role {
            match now_role {
                Role::Leader => info!(
                    "leader with a quorum acknowledgement {} ms old: may hold the VIP",
                    snapshot.millis_since_quorum_ack.unwrap_or_default()
                ),
                Role::Lapsed => warn!(
                    "leader, but no quorum acknowledgement within the {} ms lease: must not hold the VIP",
                    lease.as_millis()
                ),
                Role::Follower => info!("not the leader: must not hold the VIP"),
            }
        }
        tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    role.send_replace(Leadership::now(Role::Follower));
                    return;
                }
                snapshot = metrics.borrow_and_update().clone();
                received = Instant::now();
            }
            // The same snapshot, re-evaluated at the lease's end: it will say Lapsed.
            _ = sleep_until(until.unwrap_or_else(Instant::now)), if until.is_some() => {}
            // A step-down takes effect at once; its end waits for the next snapshot's evidence.
            changed = step_down.changed() => {
                if changed.is_err() {
                    // The sender lives as long as the cluster; gone means shutting down.
                    role.send_replace(Leadership::now(Role::Follower));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{RaftMetrics, Vote};

    fn leader_metrics(id: NodeId, ack_ms: Option<u64>) -> Metrics {
        let mut m = RaftMetrics::new_initial(id);
        m.state = ServerState::Leader;
        m.current_leader = Some(id);
        m.vote = Vote::new_committed(3, id);
        m.millis_since_quorum_ack = ack_ms;
        m
    }

    #[test]
    fn lease_has_margin_before_election_timeout() {
        assert_eq!(
            vip_lease(Duration::from_millis(20), Duration::from_millis(120)),
            Duration::from_millis(80)
        );
        // The margin never drops below MIN_LEASE_MARGIN, even with tiny heartbeats.
        assert_eq!(
            vip_lease(Duration::from_millis(5), Duration::from_millis(100)),
            Duration::from_millis(75)
        );
    }

    #[test]
    fn fresh_ack_gives_lease_until_ack_plus_lease() {
        let now = Instant::now();
        let lease = Duration::from_millis(80);
        let (role, until) = evaluate(&leader_metrics(1, Some(30)), now, now, lease);
        assert_eq!(role, Role::Leader);
        assert_eq!(until, Some(now + Duration::from_millis(50)));
    }

    #[test]
    fn stale_ack_or_none_is_lapsed() {
        let now = Instant::now();
        let lease = Duration::from_millis(80);
        assert_eq!(
            evaluate(&leader_metrics(1, Some(80)), now, now, lease).0,
            Role::Lapsed
        );
        assert_eq!(
            evaluate(&leader_metrics(1, None), now, now, lease).0,
            Role::Lapsed
        );
        // A snapshot that was fresh when received goes stale as time passes without news.
        let later = now + Duration::from_millis(60);
        assert_eq!(
            evaluate(&leader_metrics(1, Some(30)), now, later, lease).0,
            Role::Lapsed
        );
    }

    #[test]
    fn followers_and_candidates_never_hold() {
        let now = Instant::now();
        let lease = Duration::from_millis(80);
        let mut m = leader_metrics(1, Some(0));
        m.state = ServerState::Candidate;
        assert_eq!(evaluate(&m, now, now, lease).0, Role::Follower);
        let mut m = leader_metrics(1, Some(0));
        m.current_leader = Some(2);
        m.state = ServerState::Follower;
        assert_eq!(evaluate(&m, now, now, lease).0, Role::Follower);
    }

    #[tokio::test(start_paused = true)]
    async fn lease_ends_by_timer_when_metrics_stop() {
        let (mtx, mrx) = watch::channel(leader_metrics(1, Some(0)));
        let (rtx, mut rrx) = watch::channel(Leadership::now(Role::Follower));
        let (stx, srx) = watch::channel(false);
        let task = tokio::spawn(follow(mrx, Duration::from_millis(80), rtx, srx, |_| None));
        rrx.wait_for(|r| r.role == Role::Leader)
            .await
            .expect("leader");
        let t0 = Instant::now();
        rrx.wait_for(|r| r.role == Role::Lapsed)
            .await
            .expect("lapsed");
        assert_eq!(Instant::now() - t0, Duration::from_millis(80));
        // A new acknowledgement restores the lease.
        mtx.send_replace(leader_metrics(1, Some(5)));
        rrx.wait_for(|r| r.role == Role::Leader)
            .await
            .expect("leader again");
        // Stepping down (removal of the leader) drops the VIP at once, and ends with it.
        stx.send_replace(true);
        rrx.wait_for(|r| r.role == Role::Follower)
            .await
            .expect("stepped down");
        stx.send_replace(false);
        mtx.send_replace(leader_metrics(1, Some(1)));
        rrx.wait_for(|r| r.role == Role::Leader)
            .await
            .expect("leader after the step-down");
        drop(mtx);
        rrx.wait_for(|r| r.role == Role::Follower)
            .await
            .expect("follower when raft is gone");
        task.await.expect("task");
    }
}
