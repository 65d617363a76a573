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
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

pub use adapter::Network;
pub use server::{serve, Server};

use crate::cluster::types::{Node, NodeId, PeerInfo};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// All configured peers (local node included), by node id.
pub type PeerMap = BTreeMap<NodeId, PeerInfo>;

/// Whom this node can name, dial and accept: the configured peers (`localPeer`,
/// `remotePeers`) plus every node the Raft membership has named since start (a node added by
/// `kube-vip members add` is in no other node's config file). Configured addresses win over the
/// ones recorded in the membership (see [`Node`]). Whether a known peer may *vote* is a
/// separate question, answered by the current membership (`transport::server`).
#[derive(Debug, Default)]
pub struct Peers {
    map: RwLock<PeerMap>,
}

impl Peers {
    /// The configured peers.
    pub fn new(map: PeerMap) -> Peers {
        Peers {
            map: RwLock::new(map),
        }
    }

    /// One peer, if known.
    pub fn get(&self, id: NodeId) -> Option<PeerInfo> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    /// A copy of every known peer (for the handshake, which checks one caller against it).
    pub fn snapshot(&self) -> PeerMap {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Learns a member named by the membership, unless known already; `false` if its recorded
    /// address is not `ip:port` (then it cannot be dialed, and stays unknown).
    pub fn learn(&self, id: NodeId, node: &Node) -> bool {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if map.contains_key(&id) {
            return true;
        }
        match node.addr.parse::<SocketAddr>() {
            Ok(addr) => {
                log::info!(
                    "learned member {} at {addr} from the membership",
                    node.peer_id
                );
                crate::metrics::get().peer_learned(&node.peer_id, addr);
                map.insert(
                    id,
                    PeerInfo {
                        id: node.peer_id.clone(),
                        addr,
                    },
                );
                true
            }
            Err(_) => false,
        }
    }
}

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
