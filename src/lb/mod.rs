//! Load balancers: one listener per `loadBalancers` entry, forwarding to its backends.

pub mod backends;
pub mod http;
pub mod tcp;

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{LbType, LoadBalancer};
use crate::shutdown::{self, Shutdown, Trigger};
use backends::Backends;

/// Connections the kernel queues for a listener until they are accepted (capped by
/// `net.core.somaxconn`). tokio's `TcpListener::bind` asks for 128, which overflows when a few
/// hundred clients connect at once (every kubelet reconnecting after a failover): the SYNs
/// beyond it are dropped and those clients wait for their retransmit, a full second.
const LISTEN_BACKLOG: u32 = 4096;

/// How long to wait after a failed accept (EMFILE and friends) before the next one: retrying at
/// once would spin on the same error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How often the accept loop drops finished connection tasks while no client arrives (it also
/// does so after every accept): a finished task keeps its memory until it is collected.
const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// A listening load balancer. Stop it with [`RunningLb::stop`]; that closes the listener and
/// every connection it proxies.
#[derive(Debug)]
pub struct RunningLb {
    /// Name from the config, for log lines.
    name: String,
    /// Where it listens.
    addr: SocketAddr,
    /// Stops the accept loop and its connections.
    stop: Trigger,
    /// The accept loop.
    task: JoinHandle<()>,
}

/// A load balancer could not start listening.
#[derive(Debug, thiserror::Error)]
#[error("load balancer {name:?} cannot listen on {addr}: {source}")]
pub struct ListenError {
    /// Its name.
    pub name: String,
    /// Where it tried.
    pub addr: SocketAddr,
    /// Why.
    pub source: io::Error,
}

/// The address a load balancer listens on: the VIP for `bindToVip`, else every address of the
/// VIP's family.
pub fn listen_addr(lb: &LoadBalancer, vip: IpAddr) -> SocketAddr {
    let ip = match (lb.bind_to_vip, vip) {
        (true, vip) => vip,
        (false, IpAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (false, IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, lb.port.0)
}

impl RunningLb {
    /// Binds `addr` and starts serving `lb`.
    pub async fn start(lb: &LoadBalancer, addr: SocketAddr) -> Result<RunningLb, ListenError> {
        let listener = listen(addr).map_err(|source| ListenError {
            name: lb.name.clone(),
            addr,
            source,
        })?;
        let addrs: Vec<SocketAddr> = lb.backends.iter().map(|b| b.socket_addr()).collect();
        info!(
            "load balancer {:?} ({:?}) listening on {addr}, backends {}",
            lb.name,
            lb.kind,
            addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let backends = Arc::new(Backends::new(
            &lb.name,
            addrs,
            Duration::from_millis(lb.connect_timeout_ms()),
            Duration::from_millis(lb.backend_cooldown_ms()),
        ));
        let (stop, signal) = shutdown::channel();
        let task = match lb.kind {
            LbType::Tcp => tokio::spawn(tcp::serve(listener, backends, signal)),
            LbType::Http => tokio::spawn(http::serve(listener, backends, signal)),
        };
        Ok(RunningLb {
            name: lb.name.clone(),
            addr,
            stop,
            task,
        })
    }

    /// Closes the listener and all its connections, and waits until they are gone.
    pub async fn stop(self) {
        self.stop.fire();
        let _ = self.task.await;
        info!("load balancer {:?} on {} stopped", self.name, self.addr);
    }
}

/// A listening socket on `addr` with a backlog of [`LISTEN_BACKLOG`] (and SO_REUSEADDR, as
/// `TcpListener::bind` sets it, so a restart does not wait for old connections' TIME_WAIT).
/// TCP_NODELAY is set on the listener: Linux copies it to every accepted socket, which spares a
/// setsockopt per connection (both proxies want it: a short answer must not wait for an ACK).
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The accept loop of both load balancer kinds: runs `handle` for every client as a task of its
/// own until `shutdown` fires, then aborts all of those tasks and waits until they are gone, so
/// that no connection outlives its listener (which matters when the VIP moves away and these
/// sockets can no longer be answered).
async fn accept_loop<F, Fut>(listener: TcpListener, mut shutdown: Shutdown, mut handle: F)
where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    let stop = shutdown.recv();
    tokio::pin!(stop);
    let mut reap = tokio::time::interval(REAP_INTERVAL);
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    conns.spawn(handle(client, peer));
                    // Collecting finished tasks here rather than waiting on `join_next` spares
                    // this task a wake-up for every connection that ends.
                    while conns.try_join_next().is_some() {}
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            _ = reap.tick() => while conns.try_join_next().is_some() {},
        }
    }
    conns.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `listen` relies on accepted sockets inheriting TCP_NODELAY from the listener.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0))).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(accepted.nodelay().expect("getsockopt"));
        drop(client);
    }
}
