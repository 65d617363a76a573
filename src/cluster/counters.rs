//! Counters of the peer channel, as plain atomics in one place so the metrics work can
//! export them as they are. Relaxed ordering: each is a tally, read on its own.

use std::sync::atomic::AtomicU64;

/// Peer connections refused or abandoned because authentication failed (wrong key, missing
/// key on one side, a bad proof), counted on both the dialing and the listening side.
pub static PEER_AUTH_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Peer frames refused before openraft saw them: terms or log ids out of bounds, a vote
/// naming another node ([`super::bounds`]), or a frame whose tag did not verify.
pub static PEER_FRAMES_REFUSED: AtomicU64 = AtomicU64::new(0);

/// Inbound peer connections closed by the connection limits.
pub static PEER_CONNECTIONS_LIMITED: AtomicU64 = AtomicU64::new(0);
