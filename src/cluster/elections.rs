//! Elections on top of openraft 0.9, which has no pre-vote and draws its random election
//! timeout once per process: [`probe_pre_votes`] asks the peers whether they would vote,
//! [`guard_elections`] owns openraft's `elect` switch (on only while a quorum would vote), lets
//! the survivors of a silent leader take turns by node id, and restarts an undecided election
//! at a fresh random time; [`stand_if`] is the one guarded way to stand. [`LeaderContact`]
//! records when a leader was last heard.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::Future;
use openraft::ServerState;
use rand::Rng;
use tokio::sync::watch;

use super::gate::VoteGate;
use super::membership;
use super::transport::Network;
use super::types::{Metrics, NodeId, Raft};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// openraft 0.9 has no pre-vote: a follower that misses heartbeats bumps the term, and that
/// higher term deposes a healthy leader the moment it is seen (a partition heals, a restarted
/// node reconnects slowly, a few heartbeats are lost). So elections stay switched off, and
/// [`guard_elections`] switches them on only while a quorum (this node included) answers a
/// [`crate::cluster::transport::codec::Request::PreVote`] with yes — which peers do only when they have not heard from
/// a leader for a whole lease either. This task asks: rounds start once this node has not heard
/// from a leader for half a lease, every `tick`, so by the time openraft's own timer fires
/// (lease + random timeout after the last heartbeat) a real failover has already been cleared
/// to proceed. It publishes the answer on `tx`; a round waits for at most `lease / 2`, which is
/// why it runs apart from [`guard_elections`].
///
/// Who is asked and what counts as a quorum come from the current membership (both halves of
/// a joint configuration must each grant a majority); a node that is not a voter never asks,
/// so it never stands.
pub async fn probe_pre_votes(
    raft: Raft,
    network: Network,
    contact: LeaderContact,
    tick: Duration,
    lease: Duration,
    tx: watch::Sender<bool>,
) {
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let (leader, last_log_index, me, sets) = {
            let m = raft.metrics();
            let m = m.borrow();
            (
                m.state == ServerState::Leader,
                m.last_log_index,
                m.id,
                membership::quorum_sets(&m),
            )
        };
        let voter = sets.iter().any(|s| s.contains(&me));
        let yes = if leader || !voter || contact.age() < lease / 2 {
            false
        } else {
            let others: BTreeSet<NodeId> = sets
                .iter()
                .flatten()
                .copied()
                .filter(|id| *id != me)
                .collect();
            let asks = others.iter().map(|id| async {
                (
                    *id,
                    network.send_pre_vote(*id, last_log_index, lease / 2).await,
                )
            });
            let mut granted: BTreeSet<NodeId> = futures::future::join_all(asks)
                .await
                .into_iter()
                .filter_map(|(id, yes)| yes.then_some(id))
                .collect();
            granted.insert(me);
            membership::has_quorum(&sets, &granted)
        };
        tx.send_if_modified(|v| std::mem::replace(v, yes) != yes);
    }
}

/// A duration drawn uniformly from `[min, max]` (just `min` if the range is empty), fresh on
/// every call, from a thread-local generator seeded by the OS.
fn random_between(min: Duration, max: Duration) -> Duration {
    if max <= min {
        return min;
    }
    rand::thread_rng().gen_range(min..=max)
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
/// argument (`cluster::lease`) could be hurt by is the candidate's vote for itself: a node
/// must not stand within `lease` of acknowledging a leader's heartbeat, which openraft's timer
/// ensures by waiting lease + timeout after a committed vote. `trigger().elect()` checks
/// nothing, so the restart checks it here, in an order no message can slip into: under the
/// [`VoteGate`] lock (no vote granted since it stood, so no winner to depose) and
/// [`LeaderContact::unless_heard_within`] (no append or snapshot accepted for
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
pub async fn guard_elections(
    raft: Raft,
    gate: Arc<VoteGate>,
    mut would_win: watch::Receiver<bool>,
    contact: LeaderContact,
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
                // Only voters stand, and turns are counted among the current voters.
                let voters: Vec<NodeId> = membership::voters(&m).into_iter().collect();
                if m.state == ServerState::Follower && voters.contains(&m.id) {
                    let turn = first_stand_turn(&voters, m.id, m.current_leader);
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
    contact: &LeaderContact,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

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
