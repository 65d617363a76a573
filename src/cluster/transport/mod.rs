//! TCP transport between cluster peers, one concern per file:
//!
//! | file            | what                                                                 |
//! |-----------------|----------------------------------------------------------------------|
//! | [`codec`]       | frames: length prefix + JSON (+ tag), the message enums, log text    |
//! | [`handshake`]   | Hello / HelloAck (/ Auth / AuthOk with a key): version, identities   |
//! | [`client`]      | per-peer tasks owning the outgoing connections, hedged calls         |
//! | [`server`]      | accept with connection limits, answer requests checked by `bounds`   |
//! | [`adapter`]     | openraft's `RaftNetworkFactory` / `RaftNetwork` on top of the client |

pub mod adapter;
pub mod client;
pub mod codec;
#[cfg(test)]
mod fuzz;
pub mod handshake;
pub mod server;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

pub use adapter::Network;
pub use server::{serve, Server};

use crate::cluster::types::{NodeId, PeerInfo};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// All configured peers (local node included), by node id.
pub type PeerMap = BTreeMap<NodeId, PeerInfo>;

/// How to name a peer in log lines: `server2 (127.0.0.2:10002)`.
struct PeerName<'a>(&'a PeerInfo);

impl fmt::Display for PeerName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0.id, self.0.addr)
    }
}

/// Two peers for the handshake and decoder tests: node 1 "a" at 127.0.0.1:1, node 2 "b" at
/// 127.0.0.2:1.
#[cfg(test)]
fn test_peers() -> PeerMap {
    use crate::cluster::types::PeerInfo;
    let peer = |id: &str, addr: &str| PeerInfo {
        id: id.into(),
        addr: addr.parse().expect("addr"),
    };
    [(1, peer("a", "127.0.0.1:1")), (2, peer("b", "127.0.0.2:1"))].into()
}
