//! The last check before the agent takes the VIP: does anyone on the link still answer for it?
//!
//! Raft and the lease (see [`crate::cluster::lease`]) decide who is *entitled* to the VIP. This
//! check catches a node that holds it anyway:
//! - an old leader whose process is starved of CPU past the end of its lease: its lease timer
//!   has not run yet, but its kernel answers the probe. We wait until the address is gone.
//! - an old leader killed before it could remove the address (`kill -9`, a crash): its kernel
//!   answers for the VIP until the address lifetime runs out (`vip::ADDRESS_LIFETIME_SECS`).
//!   Waiting would stretch every crash failover to seconds, so when the answering MAC belongs
//!   to a peer whose Raft port refuses connections (no process listening: it is dead, or a new
//!   one is starting, which removes the stale address before anything else) we take the VIP:
//!   the corpse's address serves nobody and our gratuitous ARP moves the clients.
//! - any other host with the VIP configured: a conflict an operator must resolve. We never
//!   take the VIP while it answers, and say so.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::vip::{self, OnLink, ProbeError, VipSettings};

/// Pause before probing again while someone answers for the VIP: short, because every pause
/// may add to a failover.
pub const PROBE_RETRY: Duration = Duration::from_millis(20);
/// How long the VIP may stay in use before the probing slows to [`PROBE_RETRY_SLOW`]. A
/// frozen or killed holder's address expires within its lifetime (`vip::ADDRESS_LIFETIME_SECS`,
/// gone 1.0–1.3 s after its last renewal), so this span catches every expiry at full speed.
pub const PROBE_FAST_SPAN: Duration = Duration::from_secs(3);
/// Pause between probes once the VIP has been in use for [`PROBE_FAST_SPAN`]: by then another
/// host has it configured, which may last until an operator acts. Probing every 20 ms for
/// hours would put 100 broadcasts a second on the LAN; this is 4.
pub const PROBE_RETRY_SLOW: Duration = Duration::from_millis(500);
/// How long to wait for a peer's Raft port to answer. Only a refusal (RST) counts as "no
/// process"; a timeout proves nothing, so it counts as alive.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_millis(100);

/// Pause before the next probe, when the VIP has been in use by another host for `held_for`.
pub fn retry_after(held_for: Duration) -> Duration {
    if held_for < PROBE_FAST_SPAN {
        PROBE_RETRY
    } else {
        PROBE_RETRY_SLOW
    }
}

/// What the agent may do about the VIP, from what the link said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nobody answers: take it.
    Free,
    /// Only a dead peer's leftover address answers: take it.
    Abandoned {
        /// The MAC that answered.
        mac: [u8; 6],
        /// The peer it belongs to, whose Raft port refused our connection.
        peer: SocketAddr,
    },
    /// A host that may be alive answers: do not take it yet.
    Held {
        /// The MAC that answered.
        mac: [u8; 6],
        /// The peer it belongs to, if it is one of ours.
        peer: Option<SocketAddr>,
    },
}

/// Probes the link for `window` and decides. `peers` are the other nodes' Raft addresses.
pub async fn check(
    settings: &VipSettings,
    window: Duration,
    peers: &[SocketAddr],
) -> Result<Claim, ProbeError> {
    let (mac, known_as) = match vip::probe_link(settings, window).await? {
        OnLink::Free => return Ok(Claim::Free),
        OnLink::InUse { mac, known_as } => (mac, known_as),
    };
    let Some(&peer) = peers.iter().find(|p| known_as.contains(&p.ip())) else {
        return Ok(Claim::Held { mac, peer: None });
    };
    Ok(if process_gone(peer).await {
        Claim::Abandoned { mac, peer }
    } else {
        Claim::Held {
            mac,
            peer: Some(peer),
        }
    })
}

/// Whether nothing listens on `raft` any more: the host's kernel refused the connection.
async fn process_gone(raft: SocketAddr) -> bool {
    match tokio::time::timeout(LIVENESS_TIMEOUT, TcpStream::connect(raft)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        // Connected (a starved process's kernel still accepts), timed out, or unreachable.
        _ => false,
    }
}
