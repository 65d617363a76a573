//! Asking the link whether anyone answers for the VIP before taking it: an ARP probe for IPv4
//! (RFC 5227: who-has VIP, sender address 0.0.0.0) and a duplicate-address-detection Neighbor
//! Solicitation for IPv6 (RFC 4862: from `::` to the VIP's solicited-node group).
//!
//! Why, when Raft already says the VIP is ours: the lease argument (`cluster::lease`) proves
//! that no other node is *entitled* to the VIP, not that none still has it. An old leader whose
//! process is starved of CPU past the end of its lease, or killed before it could remove the
//! address, has a kernel that still answers for the VIP. Kernels answer probes in softirq
//! context, whatever their user space is doing, so the probe sees such a holder within a round
//! trip. Probes carry no sender address, so they change no neighbour cache on the link.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv6Packet, Ipv6Repr, NdiscRepr,
};
use tokio::io::unix::AsyncFd;
use tokio::time::{sleep_until, Instant};

use super::announce::{arp_frame, ndisc_frame, PacketSocket, NDISC_HOP_LIMIT};

/// Probes sent per check, spread over its window, so one lost frame does not make a held VIP
/// look free.
pub const PROBES_PER_CHECK: u32 = 2;
/// Largest frame read; longer ones are truncated, which no ARP or NDP answer is.
const RECV_BUF: usize = 1600;

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Nobody answered for the VIP within the window.
    Clear,
    /// A host with this MAC answers for the VIP.
    InUse {
        /// Its hardware address.
        mac: [u8; 6],
    },
}

/// Probes for `vip` on interface `ifindex` (whose MAC is `mac`) for `window`. Returns as soon as
/// another host answers. Needs CAP_NET_RAW; an error means the probe could not be made (not
/// that the VIP is in use).
pub async fn probe(ifindex: u32, mac: [u8; 6], vip: IpAddr, window: Duration) -> io::Result<Probe> {
    let ethertype = match vip {
        IpAddr::V4(_) => EthernetProtocol::Arp,
        IpAddr::V6(_) => EthernetProtocol::Ipv6,
    };
    let sock = PacketSocket::open_bound(ifindex, ethertype.into())?;
    // SAFETY: the socket owns its descriptor and is moved into the AsyncFd, so the descriptor
    // stays open, and is not reused, for as long as it is registered.
    let sock = unsafe { AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE) }?;
    let frame = probe_frame(mac, vip);
    let start = Instant::now();
    let deadline = start + window;
    let mut sent = 0;
    let mut next_send = start;
    let mut buf = [0u8; RECV_BUF];
    loop {
        if sent < PROBES_PER_CHECK && Instant::now() >= next_send {
            sock.get_ref().send(&frame)?;
            sent += 1;
            next_send = start + window * sent / PROBES_PER_CHECK;
        }
        let wake = if sent < PROBES_PER_CHECK {
            next_send
        } else {
            deadline
        };
        tokio::select! {
            _ = sleep_until(wake) => {
                if sent >= PROBES_PER_CHECK {
                    return Ok(Probe::Clear);
                }
            }
            ready = sock.readable() => {
                let mut guard = ready?;
                loop {
                    match guard.try_io(|s| s.get_ref().recv(&mut buf)) {
                        Ok(Ok(n)) => {
                            if let Some(holder) = answer_for(&buf[..n], mac, vip) {
                                return Ok(Probe::InUse { mac: holder });
                            }
                        }
                        Ok(Err(e)) => return Err(e),
                        // Drained; wait for the next frame or the timer.
                        Err(_would_block) => break,
                    }
                }
            }
        }
    }
}

/// The probe frame for `vip`: an ARP probe or a DAD Neighbor Solicitation.
pub fn probe_frame(mac: [u8; 6], vip: IpAddr) -> Vec<u8> {
    match vip {
        IpAddr::V4(v4) => arp_probe(EthernetAddress(mac), v4),
        IpAddr::V6(v6) => dad_solicitation(EthernetAddress(mac), v6),
    }
}

fn arp_probe(mac: EthernetAddress, vip: Ipv4Addr) -> Vec<u8> {
    // Sender 0.0.0.0: "I do not have an address yet" — receivers answer but learn nothing.
    arp_frame(
        ArpOperation::Request,
        mac,
        Ipv4Addr::UNSPECIFIED,
        EthernetAddress([0; 6]),
        vip,
    )
}

/// The solicited-node multicast group of `ip` (RFC 4291 2.7.1): ff02::1:ff + its low 24 bits.
pub fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

fn dad_solicitation(mac: EthernetAddress, vip: Ipv6Addr) -> Vec<u8> {
    // From `::` a solicitation must carry no link-layer option (RFC 4861 7.1.1), and Linux
    // answers it only when sent to the solicited-node group: then with an advertisement to all
    // nodes, which is what we read.
    let ns = NdiscRepr::NeighborSolicit {
        target_addr: vip,
        lladdr: None,
    };
    ndisc_frame(mac, Ipv6Addr::UNSPECIFIED, solicited_node(vip), ns)
}

/// If `frame` shows another host answering for (or announcing) `vip`, that host's MAC. Our own
/// frames (the socket also sees what we send) and anything malformed are ignored.
pub fn answer_for(frame: &[u8], own_mac: [u8; 6], vip: IpAddr) -> Option<[u8; 6]> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.src_addr() == EthernetAddress(own_mac) {
        return None;
    }
    match (eth.ethertype(), vip) {
        (EthernetProtocol::Arp, IpAddr::V4(vip)) => {
            let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()?;
            let ArpRepr::EthernetIpv4 {
                source_hardware_addr,
                source_protocol_addr,
                ..
            } = arp
            else {
                return None;
            };
            // A reply from the holder, or any frame it sends as the VIP (a gratuitous ARP, an
            // ordinary request). Another prober's request has sender 0.0.0.0 and is no answer.
            (source_protocol_addr == vip && source_hardware_addr != EthernetAddress(own_mac))
                .then_some(source_hardware_addr.0)
        }
        (EthernetProtocol::Ipv6, IpAddr::V6(vip)) => {
            let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
            let ip_repr = Ipv6Repr::parse(&ip).ok()?;
            if ip_repr.next_header != IpProtocol::Icmpv6 || ip_repr.hop_limit != NDISC_HOP_LIMIT {
                return None;
            }
            // Checksums are not verified: frames between namespaces (veth) may still carry a
            // partial checksum left for offload, and a forged answer only delays a take-over.
            let icmp = Icmpv6Repr::parse(
                &ip_repr.src_addr,
                &ip_repr.dst_addr,
                &Icmpv6Packet::new_checked(ip.payload()).ok()?,
                &ChecksumCapabilities::ignored(),
            )
            .ok()?;
            match icmp {
                Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
                    target_addr,
                    lladdr,
                    ..
                }) if target_addr == vip => {
                    let mac = lladdr
                        .and_then(|l| <[u8; 6]>::try_from(l.as_bytes()).ok())
                        .unwrap_or(eth.src_addr().0);
                    Some(mac)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vip::announce::{build_frame, Announcement};

    const OURS: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    const THEIRS: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

    #[test]
    fn arp_probe_has_no_sender_address() {
        let vip = Ipv4Addr::new(10, 0, 0, 75);
        let f = probe_frame(OURS, vip.into());
        assert_eq!(f.len(), crate::vip::announce::MIN_FRAME_LEN);
        let eth = EthernetFrame::new_checked(&f[..]).expect("eth");
        assert_eq!(eth.dst_addr(), EthernetAddress::BROADCAST);
        let arp =
            ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).expect("arp")).expect("arp");
        assert_eq!(
            arp,
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Request,
                source_hardware_addr: EthernetAddress(OURS),
                source_protocol_addr: Ipv4Addr::UNSPECIFIED,
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: vip,
            }
        );
    }

    #[test]
    fn dad_solicitation_goes_to_solicited_node_group() {
        let vip: Ipv6Addr = "fd00::12:3456".parse().expect("ip");
        assert_eq!(
            solicited_node(vip),
            "ff02::1:ff12:3456".parse::<Ipv6Addr>().expect("ip")
        );
        let f = probe_frame(OURS, vip.into());
        let eth = EthernetFrame::new_checked(&f[..]).expect("eth");
        assert_eq!(eth.dst_addr().0, [0x33, 0x33, 0xff, 0x12, 0x34, 0x56]);
        let ip = Ipv6Packet::new_checked(eth.payload()).expect("ipv6");
        let r = Ipv6Repr::parse(&ip).expect("ipv6");
        assert_eq!(r.src_addr, Ipv6Addr::UNSPECIFIED);
        assert_eq!(r.hop_limit, 255);
        let icmp = Icmpv6Repr::parse(
            &r.src_addr,
            &r.dst_addr,
            &Icmpv6Packet::new_checked(ip.payload()).expect("icmp"),
            &ChecksumCapabilities::default(),
        )
        .expect("valid checksum");
        assert_eq!(
            icmp,
            Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
                target_addr: vip,
                lladdr: None
            })
        );
    }

    #[test]
    fn another_hosts_gratuitous_arp_is_an_answer() {
        let vip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 75));
        for kind in Announcement::for_address(vip) {
            let f = build_frame(*kind, THEIRS, vip).expect("frame");
            assert_eq!(answer_for(&f, OURS, vip), Some(THEIRS));
            // Our own announcement, seen by our own socket, is not.
            let f = build_frame(*kind, OURS, vip).expect("frame");
            assert_eq!(answer_for(&f, OURS, vip), None);
        }
        // Nor is someone else's probe for it, or an announcement of another address.
        assert_eq!(answer_for(&probe_frame(THEIRS, vip), OURS, vip), None);
        let other = build_frame(
            Announcement::GratuitousReply,
            THEIRS,
            Ipv4Addr::new(10, 0, 0, 76).into(),
        )
        .expect("frame");
        assert_eq!(answer_for(&other, OURS, vip), None);
    }

    #[test]
    fn another_hosts_advertisement_is_an_answer() {
        let vip: IpAddr = "fd00::75".parse().expect("ip");
        let f = build_frame(Announcement::UnsolicitedAdvert, THEIRS, vip).expect("frame");
        assert_eq!(answer_for(&f, OURS, vip), Some(THEIRS));
        assert_eq!(answer_for(&probe_frame(THEIRS, vip), OURS, vip), None);
        let other: IpAddr = "fd00::76".parse().expect("ip");
        assert_eq!(answer_for(&f, OURS, other), None);
    }

    #[test]
    fn garbage_is_no_answer() {
        let vip: IpAddr = "10.0.0.75".parse().expect("ip");
        assert_eq!(answer_for(&[], OURS, vip), None);
        assert_eq!(answer_for(&[0xff; 20], OURS, vip), None);
        let mut f = build_frame(Announcement::GratuitousReply, THEIRS, vip).expect("frame");
        f.truncate(20);
        assert_eq!(answer_for(&f, OURS, vip), None);
    }
}
