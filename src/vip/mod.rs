//! The virtual IP: putting it on the interface, keeping it there, announcing it, taking it off.
//!
//! [`VipHolder::take`] adds the address and starts a keeper task; [`VipHolder::release`] stops the
//! keeper and removes the address. Between the two the keeper
//! - listens to netlink link and address events (and re-checks every [`RECONCILE_INTERVAL`] in
//!   case an event was lost); if the address is gone it stops and says so
//!   ([`VipHolder::lost`]). It never puts the address back itself: the address may have gone
//!   because this process stalled past its lifetime, when the VIP may be another node's by now,
//!   so only the agent, which checks the lease and probes the link first, adds it again.
//! - announces the VIP in a burst when taken, again whenever it had to be put back or the link
//!   comes back up, and then every `arpRefreshSeconds`;
//! - renews the address's lifetime every [`RECONCILE_INTERVAL`]. The address is added with a
//!   valid lifetime of [`ADDRESS_LIFETIME_SECS`], so if this process dies without removing it
//!   (`kill -9`) or freezes, the kernel deletes the VIP by itself instead of answering ARP for
//!   it forever. A restart removes a leftover VIP sooner ([`remove_stale`]).

pub mod announce;
pub mod netlink;
pub mod probe;

use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use log::{debug, error, info, warn};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

use announce::{Announcement, PacketSocket};
pub use netlink::NetlinkError;
use netlink::{add_address, address_of, find_address, link, remove_address, Link};

/// Check of the address and link even when no netlink event arrives (netlink multicast may
/// overflow and drop one), and renewal of the address's lifetime. The kernel deletes the
/// address about 980 ms after a renewal, so it outlives two missed ones (a stall of ~700 ms).
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(250);
/// Valid (and preferred) lifetime of the VIP address, renewed every [`RECONCILE_INTERVAL`]:
/// how long a `kill -9`ed holder's kernel keeps answering for the VIP. One second, the
/// shortest the kernel offers (it counts in whole seconds), measured at 1.0–1.3 s: a stalled
/// holder lost its 80 ms lease long before, so a longer lifetime would protect nothing and
/// would only keep a corpse address on the link, answering ARP beside the new holder.
pub const ADDRESS_LIFETIME_SECS: u32 = 1;
/// Gap between the first and second announcement of a burst; each later gap doubles
/// (0, 0.25, 0.75, 1.75, 3.75 s for five rounds), so a lost first frame costs 250 ms, and the
/// later rounds are spaced past Linux's 1 s neighbour `locktime`.
pub const BURST_FIRST_GAP: Duration = Duration::from_millis(250);

/// What the holder needs from the configuration.
#[derive(Debug, Clone)]
pub struct VipSettings {
    /// Interface the VIP lives on.
    pub interface: String,
    /// The VIP.
    pub address: IpAddr,
    /// Send gratuitous ARP / unsolicited NA (`gratuitousARP`).
    pub announce: bool,
    /// Rounds in the burst sent on taking the VIP.
    pub burst_count: u32,
    /// Interval of refresh rounds after the burst; `None` = no refresh.
    pub refresh: Option<Duration>,
}

/// Holds the VIP while it exists. Dropping it without [`VipHolder::release`] stops the keeper
/// but leaves the address on the interface, so always release.
#[derive(Debug)]
pub struct VipHolder {
    /// Tells the keeper to stop; a oneshot because it is only ever said once.
    stop: oneshot::Sender<()>,
    /// Completes when the keeper found the address gone (and stopped).
    lost: oneshot::Receiver<()>,
    /// The keeper task.
    task: JoinHandle<()>,
    /// Netlink handle used to remove the address.
    handle: Handle,
    /// What we hold.
    settings: VipSettings,
}

impl VipHolder {
    /// Adds the VIP to the interface and starts keeping and announcing it.
    pub async fn take(settings: VipSettings) -> Result<VipHolder, NetlinkError> {
        let handle = netlink::connect()?;
        let l = link(&handle, &settings.interface).await?;
        add_address(
            &handle,
            l.index,
            settings.address,
            &settings.interface,
            ADDRESS_LIFETIME_SECS,
        )
        .await?;
        info!(
            "VIP {} bound to {} (MAC {})",
            settings.address,
            settings.interface,
            fmt_mac(&l.mac)
        );
        let (stop, stop_rx) = oneshot::channel();
        let (lost_tx, lost) = oneshot::channel();
        let task = tokio::spawn(keep(handle.clone(), settings.clone(), l, stop_rx, lost_tx));
        Ok(VipHolder {
            stop,
            lost,
            task,
            handle,
            settings,
        })
    }

    /// Completes when the address has gone from the interface (removed from outside, expired,
    /// or its interface deleted). Cancel-safe. The holder must then be released and the VIP
    /// taken anew.
    pub async fn lost(&mut self) {
        if (&mut self.lost).await.is_err() {
            // The keeper ended without reporting a loss (it only does that when stopped, which
            // takes `self`): never complete.
            std::future::pending::<()>().await;
        }
    }

    /// Stops keeping the VIP and removes it from the interface.
    pub async fn release(self) -> Result<(), NetlinkError> {
        // The keeper may be mid re-add; stop it first so it cannot put the address back.
        let _ = self.stop.send(());
        let _ = self.task.await;
        let s = &self.settings;
        let l = link(&self.handle, &s.interface).await?;
        if remove_address(&self.handle, l.index, s.address, &s.interface).await? {
            info!("VIP {} released from {}", s.address, s.interface);
        } else {
            warn!(
                "VIP {} was already gone from {} when released",
                s.address, s.interface
            );
        }
        Ok(())
    }
}

/// Removes the VIP if it is on the interface although this process does not hold it — left by
/// a crashed or killed instance, whose kernel would otherwise keep answering ARP for it.
/// Returns whether something was removed. A missing interface is not an error here.
pub async fn remove_stale(interface: &str, address: IpAddr) -> Result<bool, NetlinkError> {
    let handle = netlink::connect()?;
    let l = match link(&handle, interface).await {
        Ok(l) => l,
        Err(NetlinkError::NoSuchInterface(_)) => return Ok(false),
        Err(e) => return Err(e),
    };
    let removed = remove_address(&handle, l.index, address, interface).await?;
    if removed {
        warn!("removed VIP {address} from {interface}: it was left there by an earlier run and this node does not hold it");
    }
    Ok(removed)
}

/// Who answers for the VIP on its link, found by [`probe_link`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnLink {
    /// Nobody answered within the probe window.
    Free,
    /// A host answers for the VIP.
    InUse {
        /// Its hardware address.
        mac: [u8; 6],
        /// Its addresses, as far as this host's neighbour table knows the MAC.
        known_as: Vec<IpAddr>,
    },
}

/// Why the link could not be probed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Finding the interface or reading the neighbour table failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The packet socket could not be opened or used.
    #[error("cannot probe for VIP {address} on {iface} (needs CAP_NET_RAW): {source}")]
    Socket {
        /// The VIP.
        address: IpAddr,
        /// The interface.
        iface: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Probes the VIP's link for `window` (see [`probe`]); when someone answers, looks up who the
/// answering MAC is in the neighbour table.
pub async fn probe_link(s: &VipSettings, window: Duration) -> Result<OnLink, ProbeError> {
    let handle = netlink::connect()?;
    let l = link(&handle, &s.interface).await?;
    let found = probe::probe(l.index, l.mac, s.address, window)
        .await
        .map_err(|source| ProbeError::Socket {
            address: s.address,
            iface: s.interface.clone(),
            source,
        })?;
    match found {
        probe::Probe::Clear => Ok(OnLink::Free),
        probe::Probe::InUse { mac } => Ok(OnLink::InUse {
            mac,
            known_as: netlink::neighbours_with_mac(&handle, l.index, mac, &s.interface).await?,
        }),
    }
}

/// Announcement timing: a burst with doubling gaps, then optional refreshes.
#[derive(Debug)]
struct Schedule {
    /// Rounds left in the current burst.
    burst_left: u32,
    /// Gap before the next burst round.
    gap: Duration,
    /// Configured burst length, to restart it.
    burst_count: u32,
    /// Refresh interval once the burst is over.
    refresh: Option<Duration>,
}

impl Schedule {
    fn new(burst_count: u32, refresh: Option<Duration>) -> Schedule {
        Schedule {
            burst_left: burst_count,
            gap: Duration::ZERO,
            burst_count,
            refresh,
        }
    }

    /// Starts a new burst now.
    fn restart(&mut self) -> Option<Instant> {
        *self = Schedule::new(self.burst_count, self.refresh);
        self.next(Instant::now())
    }

    /// When the next round is due, counted from `now`; `None` means never.
    fn next(&mut self, now: Instant) -> Option<Instant> {
        if self.burst_left > 0 {
            self.burst_left -= 1;
            let at = now + self.gap;
            self.gap = if self.gap.is_zero() {
                BURST_FIRST_GAP
            } else {
                self.gap * 2
            };
            Some(at)
        } else {
            self.refresh.map(|r| now + r)
        }
    }
}

/// Keeps the VIP on the interface and announces it until told to stop.
async fn keep(
    handle: Handle,
    s: VipSettings,
    mut l: Link,
    mut stop: oneshot::Receiver<()>,
    lost: oneshot::Sender<()>,
) {
    let events = match rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ]) {
        Ok((conn, _, events)) => Some((AbortOnDrop(tokio::spawn(conn)), events)),
        Err(e) => {
            warn!(
                "cannot watch netlink events ({e}); checking the VIP every {:?} instead",
                RECONCILE_INTERVAL
            );
            None
        }
    };
    // The connection task must end with the keeper, not linger until the next event finds
    // its receiver gone.
    let (_conn, mut events) = match events {
        Some((conn, rx)) => (Some(conn), Some(rx)),
        None => (None, None),
    };
    let mut socket = open_socket(&s, &l);
    let mut schedule = Schedule::new(
        if s.announce { s.burst_count } else { 0 },
        s.refresh.filter(|_| s.announce),
    );
    let mut next = schedule.next(Instant::now());
    let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let due = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let recheck = tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => true,
            _ = sleep_until(due), if next.is_some() => {
                if let Some(sock) = &socket {
                    announce(sock, &s, &l);
                }
                next = schedule.next(Instant::now());
                false
            }
            ev = next_event(&mut events) => match ev {
                Some(msg) => concerns_us(&msg, &s, &l),
                // The event socket closed: fall back to the periodic check only.
                None => { events = None; false }
            },
        };
        if !recheck {
            continue;
        }
        match reconcile(&handle, &s, &mut l).await {
            Ok(Reconciled::Unchanged) => {}
            Ok(Reconciled::Lost) => {
                warn!(
                    "VIP {} was removed from {} from outside (or its lifetime ran out); putting it back after checking the lease and the link",
                    s.address, s.interface
                );
                let _ = lost.send(());
                return;
            }
            Ok(Reconciled::Reannounce { reopen }) => {
                if reopen {
                    socket = open_socket(&s, &l);
                }
                if s.announce {
                    next = schedule.restart();
                }
            }
            Err(e) => error!("cannot check VIP {} on {}: {e}", s.address, s.interface),
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Outcome of one check of the link and address.
enum Reconciled {
    /// Address present, link as before.
    Unchanged,
    /// The address is gone.
    Lost,
    /// The address was put back, the link came up, or the interface was re-created.
    Reannounce {
        /// The interface index changed, so the packet socket must be reopened.
        reopen: bool,
    },
}

async fn reconcile(
    handle: &Handle,
    s: &VipSettings,
    l: &mut Link,
) -> Result<Reconciled, NetlinkError> {
    let now = link(handle, &s.interface).await?;
    let reopen = now.index != l.index;
    let came_up = now.running && (!l.running || reopen);
    *l = now;
    let present = find_address(handle, l.index, s.address, &s.interface)
        .await?
        .is_some();
    if !present {
        return Ok(Reconciled::Lost);
    }
    // Renews the lifetime.
    add_address(
        handle,
        l.index,
        s.address,
        &s.interface,
        ADDRESS_LIFETIME_SECS,
    )
    .await?;
    if came_up {
        info!(
            "link {} is up; announcing VIP {} again",
            s.interface, s.address
        );
    }
    Ok(if came_up || reopen {
        Reconciled::Reannounce { reopen }
    } else {
        Reconciled::Unchanged
    })
}

/// Waits for the next netlink event, or forever if there is no event socket.
async fn next_event(
    events: &mut Option<
        futures::channel::mpsc::UnboundedReceiver<(
            rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
            rtnetlink::sys::SocketAddr,
        )>,
    >,
) -> Option<RouteNetlinkMessage> {
    let Some(rx) = events else {
        return std::future::pending().await;
    };
    loop {
        let (msg, _) = rx.next().await?;
        if let rtnetlink::packet_core::NetlinkPayload::InnerMessage(inner) = msg.payload {
            return Some(inner);
        }
    }
}

/// Whether an event may mean the VIP or its link changed.
fn concerns_us(msg: &RouteNetlinkMessage, s: &VipSettings, l: &Link) -> bool {
    match msg {
        RouteNetlinkMessage::DelAddress(a) => address_of(a) == Some(s.address),
        RouteNetlinkMessage::NewLink(m) | RouteNetlinkMessage::DelLink(m) => {
            m.header.index == l.index || netlink::link_from_message(m).is_none()
        }
        _ => false,
    }
}

fn open_socket(s: &VipSettings, l: &Link) -> Option<PacketSocket> {
    if !s.announce {
        return None;
    }
    match PacketSocket::open(l.index) {
        Ok(sock) => Some(sock),
        Err(e) => {
            error!(
                "cannot open packet socket on {} to announce VIP {} (needs CAP_NET_RAW): {e}",
                s.interface, s.address
            );
            None
        }
    }
}

fn announce(sock: &PacketSocket, s: &VipSettings, l: &Link) {
    for &kind in Announcement::for_address(s.address) {
        let Some(frame) = announce::build_frame(kind, l.mac, s.address) else {
            continue;
        };
        match sock.send(&frame) {
            Ok(()) => {
                debug!("sent {kind:?} for {} on {}", s.address, s.interface);
                crate::metrics::get().frame_sent(kind.metric_label());
            }
            Err(e) => warn!(
                "cannot send {kind:?} for {} on {}: {e}",
                s.address, s.interface
            ),
        }
    }
}

/// Formats a MAC the way `ip link` does.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_gaps_double_then_refresh() {
        let mut s = Schedule::new(5, Some(Duration::from_secs(10)));
        let t = Instant::now();
        let gaps: Vec<_> = (0..6).map(|_| s.next(t).map(|i| i - t)).collect();
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(
            gaps,
            vec![ms(0), ms(250), ms(500), ms(1000), ms(2000), ms(10_000)]
        );
    }

    #[test]
    fn no_refresh_means_silence_after_burst() {
        let mut s = Schedule::new(1, None);
        let t = Instant::now();
        assert_eq!(s.next(t), Some(t));
        assert_eq!(s.next(t), None);
    }
}
