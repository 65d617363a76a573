//! Plausibility bounds on the terms and log indexes that reach openraft from outside (peer
//! frames and state files), checked before openraft sees them.
//!
//! Why: openraft trusts them. It computes `term + 1` when it stands for election
//! (`Engine::elect`, engine_impl.rs:239) and `index + 1` in several places, unchecked; with
//! `panic = "abort"` a vote of term `2^64 - 1` accepted from one frame kills the node at its
//! next election, and, once saved in the vote file, at every restart after that. A term far
//! ahead of ours is no overflow yet, but it is equally no message a real peer sends: it only
//! serves to make every node jump to a term of the sender's choosing.
//!
//! # The bounds, and why they are safe
//!
//! * Absolute: no term or log index above [`MAX_TERM`] / [`MAX_INDEX`] (2^62). openraft adds
//!   small numbers to them (one per election, one per entry); 2^62 leaves 3·2^62 of room, and
//!   reaching 2^62 legitimately would take one election every nanosecond for 146 years.
//! * Relative: no term more than [`MAX_TERM_LEAP`] (2^32) ahead of this node's current term,
//!   and no log index more than [`MAX_INDEX_LEAP`] (2^32) ahead of its last log index. A real
//!   peer gets ahead of us only by elections we missed (one term each, and in this cluster an
//!   election needs a pre-vote quorum and at least `electionTimeoutMinMs` between rounds) and
//!   by entries written meanwhile (one blank entry per term, plus membership changes). Even at
//!   one election every millisecond, 2^32 of them take 50 days of nothing but failed
//!   elections; with the default 40 ms between rounds, 5.4 years. A node refusing such a peer
//!   loses only its own liveness (it logs why on every refused frame), never safety.
//! * Identity: a vote request is for the connected peer itself (a candidate asks for its own
//!   vote), an append or snapshot comes from the connected peer as leader. A frame that names
//!   another node as candidate or leader is forged.

use std::fmt;

use openraft::{LogId, Vote};

use super::types::{Metrics, NodeId};

/// Largest term accepted from a peer or a state file: 2^62 (see the module doc).
pub const MAX_TERM: u64 = 1 << 62;
/// Largest log index accepted from a peer or a state file: 2^62 (see the module doc).
pub const MAX_INDEX: u64 = 1 << 62;
/// How far a peer's term may be ahead of ours: 2^32 (see the module doc).
pub const MAX_TERM_LEAP: u64 = 1 << 32;
/// How far a peer's log index may be ahead of our last one: 2^32 (see the module doc).
pub const MAX_INDEX_LEAP: u64 = 1 << 32;

/// Why a value was refused; names the field it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfBounds(pub String);

impl fmt::Display for OutOfBounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OutOfBounds {}

/// Where this node stands: the reference point of the relative bounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ours {
    /// Our current term.
    pub term: u64,
    /// Our last log index, if any.
    pub last_index: Option<u64>,
}

impl Ours {
    /// Our position as openraft last published it.
    pub fn of(m: &Metrics) -> Ours {
        Ours {
            term: m.current_term,
            last_index: m.last_log_index,
        }
    }

    /// Largest term accepted from a peer now.
    pub fn max_term(&self) -> u64 {
        self.term.saturating_add(MAX_TERM_LEAP).min(MAX_TERM)
    }

    /// Largest log index accepted from a peer now.
    pub fn max_index(&self) -> u64 {
        self.last_index
            .unwrap_or(0)
            .saturating_add(MAX_INDEX_LEAP)
            .min(MAX_INDEX)
    }

    /// Checks a term named `what`.
    pub fn term(&self, what: &str, term: u64) -> Result<(), OutOfBounds> {
        if term > MAX_TERM {
            return Err(OutOfBounds(format!(
                "{what}: term {term} is beyond the largest accepted (2^62)"
            )));
        }
        if term > self.max_term() {
            return Err(OutOfBounds(format!(
                "{what}: term {term} is absurdly ahead of ours ({}; at most {} accepted)",
                self.term,
                self.max_term()
            )));
        }
        Ok(())
    }

    /// Checks a vote named `what`.
    pub fn vote(&self, what: &str, vote: &Vote<NodeId>) -> Result<(), OutOfBounds> {
        self.term(what, vote.leader_id().term)
    }

    /// Checks a log id named `what`.
    pub fn log_id(&self, what: &str, id: &Option<LogId<NodeId>>) -> Result<(), OutOfBounds> {
        let Some(id) = id else { return Ok(()) };
        self.term(what, id.leader_id.term)?;
        if id.index > MAX_INDEX {
            return Err(OutOfBounds(format!(
                "{what}: log index {} is beyond the largest accepted (2^62)",
                id.index
            )));
        }
        if id.index > self.max_index() {
            return Err(OutOfBounds(format!(
                "{what}: log index {} is absurdly ahead of ours ({:?}; at most {} accepted)",
                id.index,
                self.last_index,
                self.max_index()
            )));
        }
        Ok(())
    }
}

/// The absolute bounds alone, for state files (where there is no "ours" to compare with).
pub const ABSOLUTE: Ours = Ours {
    term: MAX_TERM,
    last_index: Some(MAX_INDEX),
};

/// Checks that `vote` names `from` as its candidate or leader.
pub fn sent_by(what: &str, vote: &Vote<NodeId>, from: NodeId) -> Result<(), OutOfBounds> {
    match vote.leader_id().voted_for() {
        Some(n) if n == from => Ok(()),
        other => Err(OutOfBounds(format!(
            "{what}: names node {} but the connection is from node {from:#x}",
            other.map_or_else(|| "none".to_string(), |n| format!("{n:#x}"))
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn lid(term: u64, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(term, 1), index))
    }

    #[test]
    fn terms_far_ahead_or_near_overflow_are_refused() {
        let ours = Ours {
            term: 7,
            last_index: Some(9),
        };
        assert!(ours.term("t", 8).is_ok());
        assert!(ours.term("t", 7 + MAX_TERM_LEAP).is_ok());
        assert!(ours.term("t", 8 + MAX_TERM_LEAP).is_err());
        assert!(ours.term("t", 1 << 40).is_err());
        assert!(ours.term("t", u64::MAX).is_err());
        assert!(ours.vote("v", &Vote::new(u64::MAX, 2)).is_err());
        // Even a node whose own term is huge never accepts anything past MAX_TERM.
        let high = Ours {
            term: MAX_TERM - 1,
            last_index: None,
        };
        assert!(high.term("t", MAX_TERM).is_ok());
        assert!(high.term("t", MAX_TERM + 1).is_err());
        assert!(ABSOLUTE.term("t", MAX_TERM).is_ok());
        let e = ABSOLUTE.term("vote", u64::MAX).unwrap_err();
        assert!(e.0.contains("beyond the largest accepted (2^62)"), "{e}");
    }

    #[test]
    fn log_ids_are_bounded_in_term_and_index() {
        let ours = Ours {
            term: 3,
            last_index: None,
        };
        assert!(ours.log_id("l", &None).is_ok());
        assert!(ours.log_id("l", &lid(3, MAX_INDEX_LEAP)).is_ok());
        assert!(ours.log_id("l", &lid(3, MAX_INDEX_LEAP + 1)).is_err());
        assert!(ours.log_id("l", &lid(u64::MAX, 1)).is_err());
        assert!(ours.log_id("l", &lid(1, u64::MAX)).is_err());
        let err = ours.log_id("prev_log_id", &lid(1, u64::MAX)).unwrap_err();
        assert!(err.0.starts_with("prev_log_id: "), "{err}");
    }

    #[test]
    fn votes_must_name_the_sender() {
        assert!(sent_by("v", &Vote::new(4, 2), 2).is_ok());
        assert!(sent_by("v", &Vote::new_committed(4, 2), 2).is_ok());
        let e = sent_by("v", &Vote::new(4, 2), 1).unwrap_err();
        assert!(e.0.contains("0x1"), "{e}");
    }
}
