//! The vote gate: a node grants no Raft vote while its VIP may be up.
//!
//! Why: a vote can elect another node, which takes the VIP as soon as a quorum acknowledges it.
//! An old leader whose own vote lease has run out grants a higher-term candidate at once, and
//! stepping down in Raft comes before its agent has removed the address; without the gate both
//! hold the VIP for that moment. With it, the VIP is down before the vote, and taking the VIP and
//! granting a vote are serialised by one lock, so neither can slip between the other's check and
//! action.

use std::future::Future;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// Shared by the agent (which takes and releases the VIP) and the Raft server (which grants
/// votes).
#[derive(Debug, Default)]
pub struct VoteGate {
    /// What the two sides need to see together; the lock also orders their actions.
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    /// The VIP may be on this node's interface (set before adding it, cleared after removal).
    up: bool,
    /// When this node last granted its vote to another node.
    last_grant: Option<Instant>,
}

/// Why [`VoteGate::take`] did not run its action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleLeadership;

impl VoteGate {
    /// Runs `take` (which puts the VIP up) unless this node granted a vote after `as_of`, the
    /// time of the leadership decision: such a vote may have elected someone else, which the
    /// decision could not know. The VIP counts as up from before `take` runs, even if it fails
    /// (it may have half-succeeded); only [`VoteGate::release`] clears that.
    pub async fn take<F, T>(&self, as_of: Instant, take: F) -> Result<T, StaleLeadership>
    where
        F: Future<Output = T>,
    {
        let mut s = self.state.lock().await;
        if s.last_grant.is_some_and(|g| g >= as_of) {
            return Err(StaleLeadership);
        }
        s.up = true;
        Ok(take.await)
    }

    /// Runs `release` (which removes the VIP); on success the VIP counts as down and votes may be
    /// granted again.
    pub async fn release<F, E>(&self, release: F) -> Result<(), E>
    where
        F: Future<Output = Result<(), E>>,
    {
        let mut s = self.state.lock().await;
        release.await?;
        s.up = false;
        Ok(())
    }

    /// Runs `act` unless this node granted its vote to another node at or after `since`; `None`
    /// if it did. Serialised with [`VoteGate::vote`], so no grant slips between the check and
    /// `act`. Used to stand again in an election that a grant has just decided for someone
    /// else only if there was no such grant (see `cluster::guard_elections`).
    pub async fn unless_granted_since<F, T>(&self, since: Instant, act: F) -> Option<T>
    where
        F: Future<Output = T>,
    {
        let s = self.state.lock().await;
        if s.last_grant.is_some_and(|g| g >= since) {
            return None;
        }
        Some(act.await)
    }

    /// Whether the VIP may be up now (a leader removing itself waits for it to go before it
    /// hands over: the successor's vote request would be refused while it is up).
    pub async fn is_up(&self) -> bool {
        self.state.lock().await.up
    }

    /// Runs `vote` (openraft's decision) unless the VIP may be up, in which case `None` means
    /// "refuse". `granted_to_other` tells from the answer whether another node got our vote.
    pub async fn vote<F, T>(&self, vote: F, granted_to_other: impl Fn(&T) -> bool) -> Option<T>
    where
        F: Future<Output = T>,
    {
        let mut s = self.state.lock().await;
        if s.up {
            return None;
        }
        let answer = vote.await;
        if granted_to_other(&answer) {
            s.last_grant = Some(Instant::now());
        }
        Some(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_vote_while_up_and_no_take_after_a_newer_grant() {
        let g = VoteGate::default();
        let decided = Instant::now();
        assert_eq!(g.take(decided, async { 1 }).await, Ok(1));
        assert_eq!(g.vote(async { true }, |v| *v).await, None, "VIP up: refuse");
        g.release(async { Ok::<(), ()>(()) })
            .await
            .expect("release");
        assert_eq!(g.vote(async { true }, |v| *v).await, Some(true));
        // The grant happened after `decided`: that decision is stale now.
        assert_eq!(g.take(decided, async { 2 }).await, Err(StaleLeadership));
        assert_eq!(g.take(Instant::now(), async { 3 }).await, Ok(3));
    }

    #[tokio::test]
    async fn a_grant_cancels_what_was_planned_before_it() {
        let g = VoteGate::default();
        let planned = Instant::now();
        assert_eq!(g.unless_granted_since(planned, async { 1 }).await, Some(1));
        assert_eq!(g.vote(async { true }, |v| *v).await, Some(true));
        assert_eq!(g.unless_granted_since(planned, async { 2 }).await, None);
        // A refusal is no grant.
        let later = Instant::now();
        assert_eq!(g.vote(async { false }, |v| *v).await, Some(false));
        assert_eq!(g.unless_granted_since(later, async { 3 }).await, Some(3));
    }

    #[tokio::test]
    async fn failed_release_keeps_votes_refused() {
        let g = VoteGate::default();
        let _ = g.take(Instant::now(), async {}).await;
        assert!(g.release(async { Err::<(), _>("netlink") }).await.is_err());
        assert_eq!(g.vote(async { true }, |v| *v).await, None);
    }
}
