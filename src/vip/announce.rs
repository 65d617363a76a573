//! Announcing the VIP: gratuitous ARP (IPv4) and unsolicited Neighbor Advertisements (IPv6),
//! built with `smoltcp::wire` and sent raw on an AF_PACKET socket.
//!
//! Why both a gratuitous request *and* a gratuitous reply: Linux updates an existing neighbour
//! entry from either, but other stacks and some switches only act on one of them. The reply's
//! target MAC is the sender MAC, which is what makes Linux treat it as gratuitous (exempt from
//! the 1 s `locktime`); a reply to the broadcast MAC would not be.

use std::io;
use std::mem::ManuallyDrop;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::libc;
use nix::sys::socket::{self, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType, SockaddrLike};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv6Packet, Ipv6Repr, NdiscNeighborFlags,
    NdiscRepr, RawHardwareAddress,
};

/// Shortest Ethernet frame without FCS; shorter frames are padded with zeros (ARP is 42 bytes).
pub const MIN_FRAME_LEN: usize = 60;
/// Ethernet header length.
const ETHERNET_HEADER_LEN: usize = 14;
/// Neighbor discovery messages must carry hop limit 255 or receivers drop them (RFC 4861 7.1.2).
pub(super) const NDISC_HOP_LIMIT: u8 = 255;

/// One frame that announces the VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    /// ARP request for the VIP from the VIP (sender IP = target IP), to broadcast.
    GratuitousRequest,
    /// ARP reply with sender = target = (our MAC, VIP), to broadcast.
    GratuitousReply,
    /// ICMPv6 Neighbor Advertisement with the override flag, to all nodes.
    UnsolicitedAdvert,
}

impl Announcement {
    /// The `kind` label of the frames-sent metric.
    pub fn metric_label(self) -> &'static str {
        match self {
            Announcement::GratuitousRequest => "arp_request",
            Announcement::GratuitousReply => "arp_reply",
            Announcement::UnsolicitedAdvert => "unsolicited_na",
        }
    }

    /// The frames that announce an address of this family, in sending order.
    pub fn for_address(ip: IpAddr) -> &'static [Announcement] {
        match ip {
            IpAddr::V4(_) => &[
                Announcement::GratuitousRequest,
                Announcement::GratuitousReply,
            ],
            IpAddr::V6(_) => &[Announcement::UnsolicitedAdvert],
        }
    }
}

/// Builds one announcement frame. The family of `ip` must match the announcement's; a
/// mismatched pair is a programming error and yields `None` rather than a malformed frame.
pub fn build_frame(kind: Announcement, mac: [u8; 6], ip: IpAddr) -> Option<Vec<u8>> {
    let mac = EthernetAddress(mac);
    match (kind, ip) {
        (Announcement::GratuitousRequest, IpAddr::V4(v4)) => {
            // Target MAC is zero in a request: it is the field being asked for.
            Some(arp_frame(
                ArpOperation::Request,
                mac,
                v4,
                EthernetAddress([0; 6]),
                v4,
            ))
        }
        (Announcement::GratuitousReply, IpAddr::V4(v4)) => {
            Some(arp_frame(ArpOperation::Reply, mac, v4, mac, v4))
        }
        (Announcement::UnsolicitedAdvert, IpAddr::V6(v6)) => Some(neighbor_advert(mac, v6)),
        _ => None,
    }
}

/// A broadcast ARP frame from `mac`.
pub(super) fn arp_frame(
    op: ArpOperation,
    mac: EthernetAddress,
    sender_ip: Ipv4Addr,
    target_mac: EthernetAddress,
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: op,
        source_hardware_addr: mac,
        source_protocol_addr: sender_ip,
        target_hardware_addr: target_mac,
        target_protocol_addr: target_ip,
    };
    let eth = EthernetRepr {
        src_addr: mac,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut buf = vec![0u8; MIN_FRAME_LEN.max(ETHERNET_HEADER_LEN + arp.buffer_len())];
    let mut frame = EthernetFrame::new_unchecked(&mut buf);
    eth.emit(&mut frame);
    arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    buf
}

fn neighbor_advert(mac: EthernetAddress, ip: Ipv6Addr) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let icmp = NdiscRepr::NeighborAdvert {
        // Override: replace whatever MAC neighbours cached for the VIP. Not solicited: nobody asked.
        flags: NdiscNeighborFlags::OVERRIDE,
        target_addr: ip,
        lladdr: Some(RawHardwareAddress::from(mac)),
    };
    ndisc_frame(mac, ip, all_nodes, icmp)
}

/// A neighbor discovery message from `mac` and `src` to the multicast group `group`.
pub(super) fn ndisc_frame(
    mac: EthernetAddress,
    src: Ipv6Addr,
    group: Ipv6Addr,
    msg: NdiscRepr,
) -> Vec<u8> {
    let icmp = Icmpv6Repr::Ndisc(msg);
    let ipv6 = Ipv6Repr {
        src_addr: src,
        dst_addr: group,
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp.buffer_len(),
        hop_limit: NDISC_HOP_LIMIT,
    };
    let g = group.octets();
    let eth = EthernetRepr {
        src_addr: mac,
        // RFC 2464: 33:33 + the group's low 32 bits.
        dst_addr: EthernetAddress([0x33, 0x33, g[12], g[13], g[14], g[15]]),
        ethertype: EthernetProtocol::Ipv6,
    };
    let len = ETHERNET_HEADER_LEN + ipv6.buffer_len() + icmp.buffer_len();
    let mut buf = vec![0u8; MIN_FRAME_LEN.max(len)];
    let mut frame = EthernetFrame::new_unchecked(&mut buf);
    eth.emit(&mut frame);
    let mut packet = Ipv6Packet::new_unchecked(frame.payload_mut());
    ipv6.emit(&mut packet);
    icmp.emit(
        &src,
        &group,
        &mut Icmpv6Packet::new_unchecked(packet.payload_mut()),
        &ChecksumCapabilities::default(),
    );
    buf
}

/// An AF_PACKET socket on one interface. [`PacketSocket::open`] makes a send-only one (protocol
/// 0: the kernel queues nothing to it, so it never needs reading); [`PacketSocket::open_bound`]
/// one that also receives the frames of one ethertype arriving on that interface.
#[derive(Debug)]
pub struct PacketSocket {
    /// The socket.
    /// Closed off the async threads (see the `Drop` impl), hence `ManuallyDrop`.
    fd: ManuallyDrop<OwnedFd>,
    /// Interface index frames leave on.
    ifindex: u32,
}

impl PacketSocket {
    /// Opens the socket; needs CAP_NET_RAW.
    pub fn open(ifindex: u32) -> io::Result<PacketSocket> {
        let fd = socket::socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        Ok(PacketSocket {
            fd: ManuallyDrop::new(fd),
            ifindex,
        })
    }

    /// Opens a non-blocking socket that also receives frames of `ethertype` arriving on (or
    /// sent from) the interface; needs CAP_NET_RAW.
    pub fn open_bound(ifindex: u32, ethertype: u16) -> io::Result<PacketSocket> {
        // Protocol 0 at creation and the real one at bind: a socket created with the protocol
        // would see that ethertype on every interface until the bind narrows it.
        let fd = socket::socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ethertype.to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a fully initialised sockaddr_ll and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket {
            fd: ManuallyDrop::new(fd),
            ifindex,
        })
    }

    /// Receives one frame into `buf` (truncated to its length); `WouldBlock` when none is queued.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(socket::recv(
            self.fd.as_raw_fd(),
            buf,
            MsgFlags::MSG_DONTWAIT,
        )?)
    }

    /// Sends one complete Ethernet frame (header included) out of the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let ethertype = frame
            .get(12..14)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too short"))?;
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ethertype.to_be();
        sll.sll_ifindex = self.ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `sll` is a fully initialised sockaddr_ll of the length we pass.
        let addr = unsafe {
            LinkAddr::from_raw(
                (&sll as *const libc::sockaddr_ll).cast(),
                Some(std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t),
            )
        }
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad link address"))?;
        socket::sendto(self.fd.as_raw_fd(), frame, &addr, MsgFlags::empty())?;
        Ok(())
    }
}

impl Drop for PacketSocket {
    /// Closing an AF_PACKET socket waits for an RCU grace period in the kernel
    /// (`synchronize_net()` in `packet_release`): about 10 ms on an idle 2-CPU VM, measured as
    /// 10 ms added to every probe before a take and to every release. On a runtime thread that
    /// delays the VIP itself, so the close happens on tokio's blocking pool when there is one.
    fn drop(&mut self) {
        // SAFETY: `fd` is taken exactly once, here, and never used again.
        let fd = unsafe { ManuallyDrop::take(&mut self.fd) };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || drop(fd));
            }
            Err(_) => drop(fd),
        }
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0xaa, 0xbb, 0xcc];
    /// Ethernet multicast MAC of ff02::1 (all nodes), per RFC 2464: 33:33 + low 32 bits.
    const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

    fn parse_arp(frame: &[u8]) -> (EthernetRepr, ArpRepr) {
        let eth = EthernetFrame::new_checked(frame).expect("ethernet");
        let repr = EthernetRepr::parse(&eth).expect("ethernet repr");
        let arp =
            ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).expect("arp")).expect("arp repr");
        (repr, arp)
    }

    #[test]
    fn gratuitous_request_fields() {
        let vip = Ipv4Addr::new(10, 0, 0, 75);
        let f = build_frame(Announcement::GratuitousRequest, MAC, vip.into()).expect("frame");
        assert_eq!(f.len(), MIN_FRAME_LEN);
        let (eth, arp) = parse_arp(&f);
        assert_eq!(eth.dst_addr, EthernetAddress::BROADCAST);
        assert_eq!(eth.src_addr, EthernetAddress(MAC));
        assert_eq!(eth.ethertype, EthernetProtocol::Arp);
        assert_eq!(
            arp,
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Request,
                source_hardware_addr: EthernetAddress(MAC),
                source_protocol_addr: vip,
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: vip,
            }
        );
        assert!(f[42..].iter().all(|&b| b == 0), "padding must be zero");
    }

    #[test]
    fn gratuitous_reply_targets_own_mac() {
        let vip = Ipv4Addr::new(192, 168, 0, 75);
        let f = build_frame(Announcement::GratuitousReply, MAC, vip.into()).expect("frame");
        let (eth, arp) = parse_arp(&f);
        assert_eq!(eth.dst_addr, EthernetAddress::BROADCAST);
        let ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            target_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
        } = arp
        else {
            panic!("not ethernet/ipv4 arp");
        };
        assert_eq!(operation, ArpOperation::Reply);
        assert_eq!(source_hardware_addr, target_hardware_addr);
        assert_eq!((source_protocol_addr, target_protocol_addr), (vip, vip));
    }

    #[test]
    fn neighbor_advert_is_valid_icmpv6() {
        let vip: Ipv6Addr = "fd00::75".parse().expect("ip");
        let f = build_frame(Announcement::UnsolicitedAdvert, MAC, vip.into()).expect("frame");
        let eth = EthernetFrame::new_checked(&f[..]).expect("eth");
        assert_eq!(eth.dst_addr(), EthernetAddress(ALL_NODES_MAC));
        assert_eq!(eth.ethertype(), EthernetProtocol::Ipv6);
        let ip = Ipv6Packet::new_checked(eth.payload()).expect("ipv6");
        let ip_repr = Ipv6Repr::parse(&ip).expect("ipv6 repr");
        assert_eq!(ip_repr.hop_limit, 255);
        assert_eq!(ip_repr.src_addr, vip);
        let icmp = Icmpv6Packet::new_checked(ip.payload()).expect("icmpv6");
        // Parsing verifies the checksum.
        let repr = Icmpv6Repr::parse(
            &ip_repr.src_addr,
            &ip_repr.dst_addr,
            &icmp,
            &ChecksumCapabilities::default(),
        )
        .expect("valid icmpv6 with checksum");
        assert_eq!(
            repr,
            Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
                flags: NdiscNeighborFlags::OVERRIDE,
                target_addr: vip,
                lladdr: Some(RawHardwareAddress::from(EthernetAddress(MAC))),
            })
        );
    }

    #[test]
    fn mismatched_family_builds_nothing() {
        let v6: IpAddr = "fd00::1".parse().expect("ip");
        assert!(build_frame(Announcement::GratuitousRequest, MAC, v6).is_none());
        let v4: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(build_frame(Announcement::UnsolicitedAdvert, MAC, v4).is_none());
    }
}
