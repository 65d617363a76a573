//! Backend choice: round-robin, with a short cooldown for backends that just failed.
//!
//! A failed connect (refused, unreachable, timed out) puts the backend in cooldown: later picks
//! try it only after every healthy backend, so one dead API server costs one failed connect per
//! cooldown period instead of one per client. When every backend is cooling down they are all
//! still tried in order: a cooldown is a hint, never a reason to refuse a client.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use log::{debug, warn};
use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// The backends of one load balancer and their recent failures.
#[derive(Debug)]
pub struct Backends {
    /// Name of the load balancer, for log lines.
    name: String,
    /// Backend endpoints in configured order.
    addrs: Vec<SocketAddr>,
    /// Round-robin position: index of the backend the next client starts with.
    next: AtomicUsize,
    /// Per backend: ms since `epoch` until which it is in cooldown (0 = healthy).
    cooldown_until: Vec<AtomicU64>,
    /// Origin of the cooldown clock.
    epoch: Instant,
    /// How long a failed backend is passed over.
    cooldown: Duration,
    /// Limit for one connect attempt.
    connect_timeout: Duration,
}

/// No backend accepted the connection.
#[derive(Debug, thiserror::Error)]
#[error("all {tried} backends failed (last: {last_addr}: {last_error})")]
pub struct AllFailed {
    /// How many were tried.
    pub tried: usize,
    /// The last one tried.
    pub last_addr: SocketAddr,
    /// Why it failed.
    pub last_error: io::Error,
}

impl Backends {
    /// Backends for a load balancer named `name`. `addrs` must not be empty (config validation
    /// guarantees it).
    pub fn new(
        name: &str,
        addrs: Vec<SocketAddr>,
        connect_timeout: Duration,
        cooldown: Duration,
    ) -> Backends {
        Backends {
            name: name.to_string(),
            cooldown_until: addrs.iter().map(|_| AtomicU64::new(0)).collect(),
            addrs,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            cooldown,
            connect_timeout,
        }
    }

    /// The order in which to try backends for one client: round-robin from the next start
    /// position, backends in cooldown moved to the end (keeping their relative order).
    pub fn order(&self) -> Vec<usize> {
        let n = self.addrs.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let now = self.now_ms();
        let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
        // A stable sort keeps the round-robin order within each group; it stays a permutation
        // even if a cooldown changes meanwhile. One allocation per client instead of three.
        order.sort_by_key(|&i| self.cooldown_until[i].load(Ordering::Relaxed) > now);
        order
    }

    /// Connects to the first backend that accepts, in [`Backends::order`].
    pub async fn connect(&self) -> Result<(TcpStream, SocketAddr), AllFailed> {
        let mut last = None;
        let order = self.order();
        for &i in &order {
            let addr = self.addrs[i];
            match self.connect_one(addr).await {
                Ok(stream) => {
                    self.cooldown_until[i].store(0, Ordering::Relaxed);
                    return Ok((stream, addr));
                }
                Err(e) => {
                    let was_healthy =
                        self.cooldown_until[i].load(Ordering::Relaxed) <= self.now_ms();
                    self.cooldown_until[i].store(
                        self.now_ms() + self.cooldown.as_millis() as u64,
                        Ordering::Relaxed,
                    );
                    if was_healthy {
                        warn!(
                            "[{}] backend {addr} failed: {e}; trying the next one",
                            self.name
                        );
                    } else {
                        debug!("[{}] backend {addr} still failing: {e}", self.name);
                    }
                    last = Some((addr, e));
                }
            }
        }
        let (last_addr, last_error) = last.unwrap_or_else(|| {
            (
                SocketAddr::from(([0, 0, 0, 0], 0)),
                io::Error::new(io::ErrorKind::NotFound, "no backends configured"),
            )
        });
        Err(AllFailed {
            tried: order.len(),
            last_addr,
            last_error,
        })
    }

    async fn connect_one(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        match timeout(self.connect_timeout, connect_nodelay(addr)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", self.connect_timeout),
            )),
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that a stored 0 always means "healthy", even in the first millisecond.
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

/// Connects to `addr` with TCP_NODELAY set. What `TcpSocket::connect` does, less its
/// getsockopt(SO_ERROR) once the handshake is over: the readiness that ends the wait already
/// tells a failed connect (EPOLLERR or EPOLLHUP) from a good one, so the error is fetched only
/// for a failure. One syscall fewer on every proxied connection.
async fn connect_nodelay(addr: SocketAddr) -> io::Result<TcpStream> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    match socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(fd))?;
    let ready = stream.ready(Interest::WRITABLE).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::NotConnected.into()));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u16) -> Backends {
        let addrs = (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 1000 + i)))
            .collect();
        Backends::new(
            "t",
            addrs,
            Duration::from_millis(100),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn round_robin_rotates_start() {
        let b = backends(3);
        assert_eq!(b.order(), vec![0, 1, 2]);
        assert_eq!(b.order(), vec![1, 2, 0]);
        assert_eq!(b.order(), vec![2, 0, 1]);
        assert_eq!(b.order(), vec![0, 1, 2]);
    }

    #[test]
    fn cooling_backends_go_last() {
        let b = backends(3);
        b.cooldown_until[0].store(u64::MAX, Ordering::Relaxed);
        assert_eq!(b.order(), vec![1, 2, 0]);
        assert_eq!(b.order(), vec![1, 2, 0]);
        assert_eq!(b.order(), vec![2, 1, 0]);
    }

    #[tokio::test]
    async fn refused_backend_is_skipped_and_cooled() {
        // Bind then drop to find a port nobody listens on.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead_addr = dead.local_addr().expect("addr");
        drop(dead);
        let live = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let live_addr = live.local_addr().expect("addr");
        let b = Backends::new(
            "t",
            vec![dead_addr, live_addr],
            Duration::from_secs(1),
            Duration::from_secs(60),
        );
        let (_, got) = b.connect().await.expect("connect");
        assert_eq!(got, live_addr);
        assert!(b.cooldown_until[0].load(Ordering::Relaxed) > 0);
    }

    #[tokio::test]
    async fn all_dead_fails_with_count() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead_addr = dead.local_addr().expect("addr");
        drop(dead);
        let b = Backends::new(
            "t",
            vec![dead_addr, dead_addr],
            Duration::from_secs(1),
            Duration::from_secs(60),
        );
        let err = b.connect().await.expect_err("must fail");
        assert_eq!(err.tried, 2);
        assert_eq!(err.last_addr, dead_addr);
    }
}
