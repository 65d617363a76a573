//! Load balancers: one listener per `loadBalancers` entry, forwarding to its backends.

pub mod backends;
pub mod http;
pub mod tcp;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use log::info;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{LbType, LoadBalancer};
use crate::shutdown::{self, Trigger};
use backends::Backends;

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
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ListenError {
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
