//! The one place where leadership becomes VIP and load-balancer actions.
//!
//! The agent watches a [`Role`] signal — constant `Leader` in single-node mode, fed from Raft
//! metrics by [`leadership::follow`] otherwise — and converges on it:
//! - `Leader`: add the VIP, announce it, then start the `bindToVip` load balancers;
//! - `Lapsed`: remove the VIP, keep the load balancers and their connections;
//! - `Follower`: remove the VIP, then stop the `bindToVip` load balancers and their connections
//!   (in that order, so clients are never refused while the VIP is still here).
//!
//! Load balancers without `bindToVip` listen on every address and run for the agent's whole life.
//! A step that fails (interface missing, port taken) is logged and retried every
//! [`RETRY_INTERVAL`]; giving up would leave a leader without a VIP for good.

pub mod leadership;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use log::{error, info};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cluster::{StaleLeadership, VoteGate};
use crate::config::Config;
use crate::lb::{self, ListenError, RunningLb};
use crate::shutdown::Shutdown;
use crate::vip::{self, VipHolder, VipSettings};

/// Pause before retrying a step that failed.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// What this node may do with the VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Entitled to hold the VIP: no other node can legitimately hold it now.
    Leader,
    /// Raft leader whose lease lapsed: must not hold the VIP, but keeps its listeners and
    /// their connections, which work again if the lease comes back before leadership goes.
    Lapsed,
    /// Must not hold the VIP: another node may hold it, or we cannot tell.
    Follower,
}

/// A role and when it was decided: the time the Raft metrics it is based on arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    /// What this node may do.
    pub role: Role,
    /// When the decision's evidence arrived; a vote granted later makes it stale.
    pub as_of: Instant,
}

impl Leadership {
    /// A role decided now.
    pub fn now(role: Role) -> Leadership {
        Leadership {
            role,
            as_of: Instant::now(),
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
    let mut always = Vec::new();
    for lbc in config.load_balancers.iter().filter(|l| !l.bind_to_vip) {
        match RunningLb::start(lbc, lb::listen_addr(lbc, config.vip)).await {
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
    };
    let mut result = Ok(());
    loop {
        let want = *role.borrow_and_update();
        let settled = agent.converge(want.role, want.as_of).await;
        tokio::select! {
            _ = shutdown.recv() => break,
            changed = role.changed() => if changed.is_err() {
                // The leadership source is gone: we can no longer know we are entitled.
                error!("leadership signal lost; dropping the VIP");
                result = Err(AgentError::LeadershipLost);
                break;
            },
            _ = tokio::time::sleep(RETRY_INTERVAL), if !settled => {}
        }
    }
    // Retried until done: leaving on an error here would leave the VIP behind.
    while !agent.converge(Role::Follower, Instant::now()).await {
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
    stop_all(always).await;
    result
}

impl Agent {
    /// Moves one step closer to what `role` asks; returns whether everything is in place.
    async fn converge(&mut self, role: Role, as_of: Instant) -> bool {
        match role {
            Role::Leader => self.lead(as_of).await,
            Role::Lapsed => self.release_vip().await,
            Role::Follower => {
                // VIP first: until it is gone, the listeners keep accepting, so a client that
                // connects during a handover is served instead of refused.
                let released = self.release_vip().await;
                stop_all(std::mem::take(&mut self.vip_lbs)).await;
                released
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

    async fn lead(&mut self, as_of: Instant) -> bool {
        let mut changed = false;
        if let (None, Some(settings)) = (&self.holder, &self.vip) {
            let take = VipHolder::take(settings.clone());
            let taken = match &self.gate {
                Some(g) => g.take(as_of, take).await,
                None => Ok(take.await),
            };
            match taken {
                Ok(Ok(h)) => {
                    self.holder = Some(h);
                    self.leftover = false;
                    changed = true;
                }
                Ok(Err(e)) => {
                    error!("cannot take VIP {}: {e}; retrying", settings.address);
                    // It may be half-added; a later release must make sure it is gone.
                    self.leftover = true;
                    return false;
                }
                Err(StaleLeadership) => {
                    info!("this node voted after that leadership decision; waiting for news");
                    return false;
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
            match RunningLb::start(lbc, lb::listen_addr(lbc, vip)).await {
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
        all
    }
}

async fn stop_all(lbs: Vec<RunningLb>) {
    for l in lbs {
        l.stop().await;
    }
}
