//! Type configuration shared by the store, the network and the cluster handle.

use std::fmt;
use std::io::Cursor;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// openraft type configuration of the kube-vip cluster.
    ///
    /// The replicated log carries no application data: the cluster exists only
    /// to elect one leader (the VIP holder), so `D` and `R` are `()`. Log entries
    /// are therefore blank entries (one per new term) and membership changes.
    pub TypeConfig:
        D = (),
        R = (),
        NodeId = u64,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Node id type used by openraft (see [`node_id`]).
pub type NodeId = u64;

/// The running Raft instance.
pub type Raft = openraft::Raft<TypeConfig>;

/// Metrics published by openraft on its watch channel.
pub type Metrics = openraft::RaftMetrics<NodeId, Node>;

/// Node information stored in the membership config (and so in the log).
///
/// The address kept here is informational: the network always dials the
/// address from the local configuration ([`super::ClusterSettings`]) so that a
/// peer whose address changed in the config file is reached at its new address
/// even though the old one is still recorded in the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Peer id string from the configuration (e.g. `server1`).
    pub peer_id: String,
    /// `ip:port` of the peer's Raft listener when the membership was written.
    pub addr: String,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.peer_id, self.addr)
    }
}

/// One member of the cluster as configured (`localPeer` / `remotePeers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Unique peer id string; the Raft node id is derived from it by [`node_id`].
    pub id: String,
    /// Address of the peer's Raft TCP listener.
    pub addr: SocketAddr,
}

/// FNV-1a 64-bit offset basis.
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Stable Raft node id of a peer: FNV-1a 64 of the UTF-8 bytes of its `id`.
///
/// Every node computes the same value for the same string whatever the order
/// of peers in its config file, and the value never changes between releases
/// (it is persisted in votes and log entries, so changing this function would
/// orphan existing state). Collisions between configured peers, and the value
/// 0 (openraft's "nobody" in a default vote), are rejected by
/// [`super::Cluster::start`].
pub fn node_id(peer_id: &str) -> u64 {
    peer_id
        .as_bytes()
        .iter()
        .fold(FNV_OFFSET_BASIS, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(FNV_PRIME)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_matches_fnv1a_reference_values() {
        // Reference values of FNV-1a 64 (from the algorithm's published test vectors).
        assert_eq!(node_id(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(node_id("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(node_id("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn node_id_is_stable_and_distinct() {
        let ids = ["server1", "server2", "server3"];
        let first: Vec<u64> = ids.iter().map(|s| node_id(s)).collect();
        let again: Vec<u64> = ids.iter().rev().map(|s| node_id(s)).rev().collect();
        assert_eq!(first, again);
        assert_ne!(first[0], first[1]);
        assert_ne!(first[1], first[2]);
        assert_ne!(first[0], first[2]);
        // Pinned so that an accidental change of the hash is caught: ids are persisted.
        assert_eq!(node_id("server1"), 0x34c9_0d94_9fad_bbb9);
        assert_eq!(node_id("server2"), 0x34c9_0a94_9fad_b6a0);
        assert_eq!(node_id("server3"), 0x34c9_0b94_9fad_b853);
    }
}
