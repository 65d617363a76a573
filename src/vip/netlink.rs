//! The VIP as a kernel address: add, remove and look up with rtnetlink.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, CacheInfo};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
use rtnetlink::Handle;

/// What the keeper needs to know about the VIP's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// Kernel interface index (changes if the interface is re-created).
    pub index: u32,
    /// Hardware address the VIP is announced with.
    pub mac: [u8; 6],
    /// Administratively up and with carrier: frames sent now can leave.
    pub running: bool,
}

/// A netlink failure, with the operation and interface it concerned.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The interface is not there.
    #[error("interface {0:?} not found")]
    NoSuchInterface(String),
    /// The interface has no 6-byte hardware address, so ARP cannot be sent on it.
    #[error("interface {0:?} has no Ethernet address")]
    NotEthernet(String),
    /// The kernel refused or failed a request.
    #[error("{op} on {iface:?}: {source}")]
    Request {
        /// What we asked for.
        op: &'static str,
        /// The interface.
        iface: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// Opening the netlink socket failed.
    #[error("cannot open netlink socket: {0}")]
    Socket(#[from] std::io::Error),
}

impl NetlinkError {
    /// For `map_err`: the kernel failed request `op` about interface `iface`.
    fn request(op: &'static str, iface: &str) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        let iface = iface.to_string();
        move |source| NetlinkError::Request { op, iface, source }
    }
}

/// Opens a netlink connection whose I/O runs on its own task.
pub fn connect() -> Result<Handle, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Looks up an interface by name.
pub async fn link(handle: &Handle, name: &str) -> Result<Link, NetlinkError> {
    let msg = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await;
    let msg = match msg {
        Ok(Some(m)) => m,
        // ENODEV comes back as an error, not as an empty answer.
        Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => {
            return Err(NetlinkError::NoSuchInterface(name.to_string()))
        }
        Err(source) => return Err(NetlinkError::request("get link", name)(source)),
    };
    link_from_message(&msg).ok_or_else(|| NetlinkError::NotEthernet(name.to_string()))
}

/// Reads index, MAC and running state out of a link message.
pub fn link_from_message(msg: &LinkMessage) -> Option<Link> {
    let mac = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
        _ => None,
    })?;
    let flags = msg.header.flags;
    Some(Link {
        index: msg.header.index,
        mac,
        running: flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp),
    })
}

/// The kernel's record of `ip` on interface `index`, if it is there.
pub async fn find_address(
    handle: &Handle,
    index: u32,
    ip: IpAddr,
    iface: &str,
) -> Result<Option<AddressMessage>, NetlinkError> {
    let mut stream = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .set_address_filter(ip)
        .execute();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(NetlinkError::request("list addresses", iface))?
    {
        if address_of(&msg) == Some(ip) {
            return Ok(Some(msg));
        }
    }
    Ok(None)
}

/// The address an address message is about (IFA_LOCAL for IPv4 point-to-point, else IFA_ADDRESS).
pub fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    let mut addr = None;
    for a in &msg.attributes {
        match a {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => addr = Some(*ip),
            _ => {}
        }
    }
    addr
}

/// Host prefix length for an address: /32 or /128.
pub fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// Adds `ip` as a host address that the kernel deletes by itself `lifetime_secs` after the last
/// call; adding one that is already there succeeds and restarts its lifetime (NLM_F_REPLACE).
pub async fn add_address(
    handle: &Handle,
    index: u32,
    ip: IpAddr,
    iface: &str,
    lifetime_secs: u32,
) -> Result<(), NetlinkError> {
    let mut req = handle.address().add(index, ip, host_prefix(ip)).replace();
    let mut lifetime = CacheInfo::default();
    lifetime.ifa_preferred = lifetime_secs;
    lifetime.ifa_valid = lifetime_secs;
    req.message_mut()
        .attributes
        .push(AddressAttribute::CacheInfo(lifetime));
    if ip.is_ipv6() {
        // Without NODAD the address stays tentative for a second or more and cannot be used
        // (nor announced) while duplicate address detection runs; the VIP is ours by election.
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    req.execute()
        .await
        .map_err(NetlinkError::request("add address", iface))
}

/// Removes `ip` from interface `index`. Returns whether it was there.
pub async fn remove_address(
    handle: &Handle,
    index: u32,
    ip: IpAddr,
    iface: &str,
) -> Result<bool, NetlinkError> {
    let Some(msg) = find_address(handle, index, ip, iface).await? else {
        return Ok(false);
    };
    match handle.address().del(msg).execute().await {
        Ok(()) => Ok(true),
        // EADDRNOTAVAIL: someone removed it between our look-up and our delete.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -nix::libc::EADDRNOTAVAIL => {
            Ok(false)
        }
        Err(source) => Err(NetlinkError::request("remove address", iface)(source)),
    }
}

/// The IP addresses that the neighbour tables of interface `index` map to hardware address
/// `mac`: who a MAC seen on the link is, as far as this host has talked to it.
pub async fn neighbours_with_mac(
    handle: &Handle,
    index: u32,
    mac: [u8; 6],
    iface: &str,
) -> Result<Vec<IpAddr>, NetlinkError> {
    let mut stream = handle.neighbours().get().execute();
    let mut found = Vec::new();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(NetlinkError::request("list neighbours", iface))?
    {
        if msg.header.ifindex != index {
            continue;
        }
        let mut ip = None;
        let mut matches = false;
        for a in &msg.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    ip = Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    ip = Some(IpAddr::V6(*v6))
                }
                NeighbourAttribute::LinkLayerAddress(ll) => matches = ll[..] == mac[..],
                _ => {}
            }
        }
        if let (Some(ip), true) = (ip, matches) {
            found.push(ip);
        }
    }
    Ok(found)
}
