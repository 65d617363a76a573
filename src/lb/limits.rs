//! Proxy limits: TCP keepalive and `TCP_USER_TIMEOUT` on both sides of every proxied
//! connection, and a budget of file descriptors the proxy may use, so that a connection flood
//! can never take the descriptors the Raft store needs (a failed `vote.json` write stops a node).

use std::io;
use std::os::fd::AsFd;
use std::sync::{Arc, OnceLock};

use log::{info, warn};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Idle seconds before the first keepalive probe: a vanished client or backend of an idle
/// connection (a watch with no events) is found in about a minute instead of never.
pub const KEEPALIVE_IDLE_SECS: u32 = 30;
/// Seconds between keepalive probes.
pub const KEEPALIVE_INTERVAL_SECS: u32 = 10;
/// Unanswered probes before the connection is dropped.
pub const KEEPALIVE_COUNT: u32 = 3;
/// Longest time sent data may stay unacknowledged before the kernel drops the connection (and,
/// with keepalive on, the longest silence after the probes start): a backend that vanished in
/// mid-transfer frees its client within this instead of after ~15 minutes of retransmits.
pub const USER_TIMEOUT_MS: u32 = 30_000;

/// Descriptors kept back for the control path (Raft store and transport, netlink, the VIP's
/// raw sockets, health checks, log files): the proxy never takes these.
pub const FD_RESERVE: usize = 256;
/// Descriptors one proxied connection takes: client and backend socket.
pub const FDS_PER_CONNECTION: u32 = 2;

/// Sets keepalive and `TCP_USER_TIMEOUT` on a socket. On a listener they are inherited by every
/// accepted socket (Linux copies them at accept), so clients cost no extra syscalls.
pub fn set_tcp_timeouts<F: AsFd>(fd: &F) -> io::Result<()> {
    setsockopt(fd, sockopt::KeepAlive, &true)?;
    setsockopt(fd, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE_SECS)?;
    setsockopt(fd, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL_SECS)?;
    setsockopt(fd, sockopt::TcpKeepCount, &KEEPALIVE_COUNT)?;
    setsockopt(fd, sockopt::TcpUserTimeout, &USER_TIMEOUT_MS)?;
    Ok(())
}

/// The proxy's share of the process's descriptors, in permits of one descriptor.
static FD_BUDGET: OnceLock<Arc<Semaphore>> = OnceLock::new();

/// Raises the soft descriptor limit to the hard one and sets the proxy's budget to what is left
/// after [`FD_RESERVE`] and the descriptors open now. Call once at start, before any load
/// balancer runs; without it (tests) the budget is unlimited in practice.
pub fn init_fd_budget() {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            warn!(
                "cannot read the descriptor limit: {e}; the proxy's descriptor budget is unknown"
            );
            return;
        }
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let open = std::fs::read_dir("/proc/self/fd").map_or(16, |d| d.count());
    let budget = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(FD_RESERVE + open)
        .min(Semaphore::MAX_PERMITS);
    info!(
        "descriptor limit {limit}: up to {budget} for proxied connections ({} at once), {FD_RESERVE} kept for Raft, the VIP and health checks",
        budget / FDS_PER_CONNECTION as usize
    );
    let _ = FD_BUDGET.set(Arc::new(Semaphore::new(budget)));
}

fn budget() -> &'static Arc<Semaphore> {
    FD_BUDGET.get_or_init(|| Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)))
}

/// Waits until the proxy may open `n` more descriptors; they are counted until the permit drops.
pub async fn reserve_fds(n: u32) -> OwnedSemaphorePermit {
    match budget().clone().acquire_many_owned(n).await {
        Ok(p) => p,
        // The semaphore is never closed; if it were, waiting for ever would be worse.
        Err(_) => std::future::pending().await,
    }
}

/// `n` more descriptors if the budget has them now.
pub fn try_reserve_fds(n: u32) -> Option<OwnedSemaphorePermit> {
    budget().clone().try_acquire_many_owned(n).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::getsockopt;

    /// The listener's settings reach accepted sockets, which `lb::listen` relies on.
    #[tokio::test]
    async fn accepted_sockets_inherit_timeouts() {
        let l = tokio::net::TcpSocket::new_v4().expect("socket");
        set_tcp_timeouts(&l).expect("setsockopt");
        l.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let l = l.listen(8).expect("listen");
        let addr = l.local_addr().expect("addr");
        let _c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (a, _) = l.accept().await.expect("accept");
        assert!(getsockopt(&a, sockopt::KeepAlive).expect("get"));
        assert_eq!(
            getsockopt(&a, sockopt::TcpKeepIdle).expect("get"),
            KEEPALIVE_IDLE_SECS
        );
        assert_eq!(
            getsockopt(&a, sockopt::TcpUserTimeout).expect("get"),
            USER_TIMEOUT_MS
        );
    }
}
