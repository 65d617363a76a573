//! The one place where leadership becomes VIP and load-balancer actions.
//!
//! The agent watches a [`Role`] signal — constant `Leader` in single-node mode, the cluster's
//! lease-based signal ([`crate::cluster::lease`]) otherwise — and converges on it:
//! - `Leader`: add the VIP, announce it, then start the `bindToVip` load balancers;
//! - `Lapsed`: remove the VIP, keep the load balancers and their connections;
//! - `Follower`: remove the VIP, then stop the `bindToVip` load balancers and their connections
//!   (in that order, so clients are never refused while the VIP is still here).
//!
//! Before adding the VIP the agent probes the link for anyone still answering for it
//! ([`claim`]); while a live host does, it waits and probes again every [`claim::PROBE_RETRY`]
//! (after [`claim::PROBE_FAST_SPAN`], every [`claim::PROBE_RETRY_SLOW`]).
//!
//! Load balancers without `bindToVip` listen on every address and run for the agent's whole life.
//! A step that fails (interface missing, port taken) is logged and retried every
//! [`RETRY_INTERVAL`]; giving up would leave a leader without a VIP for good.

pub mod claim;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use log::{error, info, warn};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cluster::transport::Peers;
pub use crate::cluster::{Leadership, Role};
use crate::cluster::{StaleLeadership, VoteGate};
use crate::config::Config;
use crate::lb::{self, ListenError, RunningLb};
use crate::metrics;
use crate::shutdown::Shutdown;
use crate::vip::{self, VipHolder, VipSettings};
use claim::Claim;

/// Pause before retrying a step that failed.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// While the VIP stays in use by another host, how often that is logged again.
const HELD_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// What the agent's loop does after a step towards the wanted role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Everything is in place: wait for the role to change.
    Settled,
    /// Not there yet: try again after this long (or when the role changes).
    RetryIn(Duration),
}

impl Next {
    /// `Settled` if a step left everything in place, else another try after [`RETRY_INTERVAL`].
    fn settled_if(done: bool) -> Next {
        if done {
            Next::Settled
        } else {
            Next::RetryIn(RETRY_INTERVAL)
        }
    }
}

/// The agent's state: what it holds and runs right now.
struct Agent {
    /// The configuration.
    config: Config,
    /// The VIP to hold; `None` with `--disableVIP` (someone else manages the address).
    vip: Option<VipSettings>,
    /// Holder of the VIP while we have it.
    holder: Option<VipHolder>,
    /// Running `bindToVip` load balancers (only while leader).
    vip_lbs: Vec<RunningLb>,
    /// A take or release failed: the address may be on the interface.
    leftover: bool,
    /// Shared with the Raft server in clustered mode: no vote while the VIP may be up.
    gate: Option<Arc<VoteGate>>,
    /// Probe window before taking the VIP; `None` = no probe (`vipProbeMs: 0`).
    probe: Option<Duration>,
    /// The other nodes' Raft addresses, to tell a dead peer's leftover VIP from a live holder:
    /// the configured ones.
    peers: Vec<SocketAddr>,
    /// With a cluster: every known peer, members added since start included.
    members: Option<Arc<Peers>>,
    /// This node's own Raft address (not a peer).
    local: Option<SocketAddr>,
    /// Since when, and when last logged, another host has been answering for the VIP.
    held: Option<(Instant, Instant)>,
    /// A probe failure was logged (it would repeat at every take).
    probe_failure_logged: bool,
    /// Backends and health checks of every load balancer.
    pools: lb::Pools,
}

/// A fatal start-up failure of the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A load balancer that listens on all addresses could not bind.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The leadership signal ended (Raft stopped) while we were not shutting down.
    #[error("the Raft cluster stopped; the VIP was dropped")]
    LeadershipLost,
}

/// Runs the agent until `shutdown`; on return the VIP is released and every listener closed.
pub async fn run(
    config: Config,
    disable_vip: bool,
    mut role: watch::Receiver<Leadership>,
    gate: Option<Arc<VoteGate>>,
    members: Option<Arc<Peers>>,
    mut shutdown: Shutdown,
) -> Result<(), AgentError> {
    let vip = (!disable_vip).then(|| VipSettings {
        interface: config.interface.clone(),
        address: config.vip,
        announce: config.gratuitous_arp,
        burst_count: config.arp_burst_count(),
        refresh: match config.arp_refresh_seconds() {
            0 => None,
            s => Some(Duration::from_secs(s)),
        },
    });
    let config_probe_ms = config.vip_probe_ms();
    let config_local = config.local_peer.as_ref().map(|p| p.socket_addr());
    let peers = config
        .remote_peers
        .iter()
        .map(|p| p.socket_addr())
        .collect();
    // Backends and their health checks live as long as the agent (see `lb::Pools`).
    let pools = lb::Pools::start(&config.load_balancers);
    crate::metrics::get().backends_from(pools.status_source());
    let mut always = Vec::new();
    for lbc in config.load_balancers.iter().filter(|l| !l.bind_to_vip) {
        match pools.start_lb(lbc, lb::listen_addr(lbc, config.vip)).await {
            Ok(r) => always.push(r),
            Err(e) => {
                stop_all(always).await;
                return Err(e.into());
            }
        }
    }
    let mut agent = Agent {
        config,
        vip,
        holder: None,
        vip_lbs: Vec::new(),
        leftover: false,
        gate,
        probe: match config_probe_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        },
        peers,
        members,
        local: config_local,
        held: None,
        probe_failure_logged: false,
        pools,
    };
    let mut result = Ok(());
    let mut tick = tokio::time::interval(metrics::AGENT_TICK);
    // After a long step, one tick, not a burst of catch-up rounds.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let want = *role.borrow_and_update();
        metrics::get().agent_role(want.role);
        let next = agent.converge(want.role, want.as_of, &role).await;
        let retry = match next {
            Next::Settled => None,
            Next::RetryIn(d) => Some(d),
        };
        tokio::select! {
            _ = shutdown.recv() => break,
            changed = role.changed() => if changed.is_err() {
                // The leadership source is gone: we can no longer know we are entitled.
                error!("leadership signal lost; dropping the VIP");
                result = Err(AgentError::LeadershipLost);
                break;
            },
            _ = tokio::time::sleep(retry.unwrap_or(RETRY_INTERVAL)), if retry.is_some() => {}
            // Proof of life for /healthz; converging again when settled changes nothing.
            _ = tick.tick() => {}
            _ = vip_lost(&mut agent.holder) => {
                // Release what is left of it (and open the vote gate); the next round takes it
                // again if the lease still allows, after a probe.
                if !agent.release_vip().await {
                    tokio::time::sleep(RETRY_INTERVAL).await;
                }
            }
        }
    }
    // Retried until done: leaving on an error here would leave the VIP behind.
    while agent.converge(Role::Follower, Instant::now(), &role).await != Next::Settled {
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
    stop_all(always).await;
    result
}

impl Agent {
    /// Moves one step closer to what `role` asks. `current` is the live role signal, checked
    /// again after a step that took time.
    async fn converge(
        &mut self,
        role: Role,
        as_of: Instant,
        current: &watch::Receiver<Leadership>,
    ) -> Next {
        let done = match role {
            Role::Leader => return self.lead(as_of, current).await,
            Role::Lapsed => self.release_vip().await,
            Role::Follower => {
                // VIP first: until it is gone, the listeners keep accepting, so a client that
                // connects during a handover is served instead of refused.
                let released = self.release_vip().await;
                stop_all(std::mem::take(&mut self.vip_lbs)).await;
                released
            }
        };
        Next::settled_if(done)
    }

    /// Probes the link before a take; returns whether the VIP may be taken now.
    async fn vip_is_ours_to_take(&mut self, settings: &VipSettings) -> bool {
        let Some(window) = self.probe else {
            return true;
        };
        let vip = settings.address;
        let started = Instant::now();
        let peers: Vec<SocketAddr> = match &self.members {
            Some(m) => m
                .snapshot()
                .values()
                .map(|p| p.addr)
                .filter(|a| Some(*a) != self.local)
                .collect(),
            None => self.peers.clone(),
        };
        let claim = claim::check(settings, window, &peers).await;
        log::debug!(
            "probed the link for VIP {vip} in {} ms: {claim:?}",
            started.elapsed().as_millis()
        );
        if matches!(claim, Ok(Claim::Held { .. } | Claim::Abandoned { .. })) {
            metrics::get().probe_conflicts.inc();
        }
        match claim {
            Ok(Claim::Free) => {
                if let Some((since, _)) = self.held.take() {
                    info!(
                        "VIP {vip} is free after {} ms; taking it",
                        since.elapsed().as_millis()
                    );
                }
                true
            }
            Ok(Claim::Abandoned { mac, peer }) => {
                self.held = None;
                warn!(
                    "VIP {vip} is still answered by {} (peer {peer}), whose kube-vip is not running \
                     (its Raft port refuses connections): taking over the address it left; \
                     its kernel drops it when its {} s lifetime runs out",
                    vip::fmt_mac(&mac),
                    vip::ADDRESS_LIFETIME_SECS
                );
                true
            }
            Ok(Claim::Held { mac, peer }) => {
                let now = Instant::now();
                let who = match peer {
                    Some(p) => format!("peer {p}, which is still running"),
                    None => "a host that is not one of our peers".to_string(),
                };
                match &mut self.held {
                    None => {
                        warn!(
                            "VIP {vip} is in use by {} ({who}); not taking it while it answers",
                            vip::fmt_mac(&mac)
                        );
                        self.held = Some((now, now));
                    }
                    Some((since, logged)) if now - *logged >= HELD_LOG_INTERVAL => {
                        error!(
                            "VIP {vip} has been in use by {} ({who}) for {} s; still waiting",
                            vip::fmt_mac(&mac),
                            (now - *since).as_secs()
                        );
                        *logged = now;
                    }
                    Some(_) => {}
                }
                false
            }
            Err(e) => {
                // No probe is no evidence of a conflict: take the VIP as Raft says, as without
                // the probe, and say once that this node is unprotected.
                if !self.probe_failure_logged {
                    warn!("{e}; taking VIPs without probing the link first");
                    self.probe_failure_logged = true;
                }
                true
            }
        }
    }

    async fn release_vip(&mut self) -> bool {
        if let Some(holder) = self.holder.take() {
            if let Err(e) = self.gated_release(holder.release()).await {
                error!("cannot remove VIP: {e}; retrying");
                self.leftover = true;
                return false;
            }
            metrics::get().vip_released();
        }
        if self.leftover {
            let s = self.vip.as_ref().map(|s| (s.interface.clone(), s.address));
            if let Some((iface, ip)) = s {
                let remove = async { vip::remove_stale(&iface, ip).await.map(|_| ()) };
                if let Err(e) = self.gated_release(remove).await {
                    error!("cannot remove VIP: {e}; retrying");
                    return false;
                }
            }
            self.leftover = false;
        }
        true
    }

    /// Runs a VIP removal through the vote gate, if there is one.
    async fn gated_release(
        &self,
        release: impl std::future::Future<Output = Result<(), vip::NetlinkError>>,
    ) -> Result<(), vip::NetlinkError> {
        match &self.gate {
            Some(g) => g.release(release).await,
            None => release.await,
        }
    }

    async fn lead(&mut self, as_of: Instant, current: &watch::Receiver<Leadership>) -> Next {
        let mut changed = false;
        // Cloned only for a take (the probe borrows `self` mutably), not on every call.
        let to_take = self.holder.is_none().then(|| self.vip.clone()).flatten();
        if let Some(settings) = to_take {
            if !self.vip_is_ours_to_take(&settings).await {
                let held_for = self
                    .held
                    .map_or(Duration::ZERO, |(since, _)| since.elapsed());
                return Next::RetryIn(claim::retry_after(held_for));
            }
            // The probe took a while: the lease may have lapsed meanwhile (maybe with its timer
            // not run yet, if this process was stalled).
            if !current.borrow().may_hold(Instant::now()) {
                return Next::RetryIn(Duration::ZERO);
            }
            let take_started = Instant::now();
            let take = VipHolder::take(settings.clone());
            let taken = match &self.gate {
                Some(g) => g.take(as_of, take).await,
                None => Ok(take.await),
            };
            match taken {
                Ok(Ok(h)) => {
                    log::debug!(
                        "VIP taken in {} ms (vote gate and netlink)",
                        take_started.elapsed().as_millis()
                    );
                    self.holder = Some(h);
                    metrics::get().vip_taken();
                    self.leftover = false;
                    changed = true;
                }
                Ok(Err(e)) => {
                    error!("cannot take VIP {}: {e}; retrying", settings.address);
                    // It may be half-added; a later release must make sure it is gone.
                    self.leftover = true;
                    return Next::RetryIn(RETRY_INTERVAL);
                }
                Err(StaleLeadership) => {
                    info!("this node voted after that leadership decision; waiting for news");
                    return Next::RetryIn(RETRY_INTERVAL);
                }
            }
        }
        let vip: IpAddr = self.config.vip;
        let mut all = true;
        let wanted = self.config.load_balancers.iter().filter(|l| l.bind_to_vip);
        for (i, lbc) in wanted.enumerate() {
            if i < self.vip_lbs.len() {
                continue;
            }
            match self.pools.start_lb(lbc, lb::listen_addr(lbc, vip)).await {
                Ok(r) => {
                    self.vip_lbs.push(r);
                    changed = true;
                }
                Err(e) => {
                    error!("{e}; retrying");
                    all = false;
                    break;
                }
            }
        }
        if all && changed {
            info!(
                "serving as leader: VIP {vip}, {} load balancer(s) on it",
                self.vip_lbs.len()
            );
        }
        Next::settled_if(all)
    }
}

/// Completes when the held VIP has gone from the interface; never without one.
async fn vip_lost(holder: &mut Option<VipHolder>) {
    match holder {
        Some(h) => h.lost().await,
        None => std::future::pending().await,
    }
}

async fn stop_all(lbs: Vec<RunningLb>) {
    for l in lbs {
        l.stop().await;
    }
}
