//! Load balancers: one listener per `loadBalancers` entry, forwarding to its backends.

pub mod backends;
pub mod health;
pub mod http;
pub mod limits;
pub mod tcp;
#[cfg(test)]
mod testutil;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use log::{info, warn};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{spelling, LbType, LoadBalancer};
use crate::shutdown::{self, Shutdown, Trigger};
use backends::Backends;
use health::Checker;

/// The runtimes proxied connections and health checks run on, if `main` made them apart from
/// the control path's: one single-threaded runtime per proxy thread ("shard"). Without them
/// (tests) the caller's runtime is the only shard.
static PROXY_RUNTIMES: OnceLock<Vec<Handle>> = OnceLock::new();

/// Makes `shards` (at least one) the runtimes of every load balancer and health check started
/// from now on.
pub fn set_proxy_runtimes(shards: Vec<Handle>) {
    if !shards.is_empty() {
        let _ = PROXY_RUNTIMES.set(shards);
    }
}

/// The proxy's first shard (see [`set_proxy_runtimes`]): where health checks run, and where
/// the agent serves its HTTP and status endpoints, which answer outside clients.
pub fn proxy_runtime() -> Handle {
    proxy_shards().swap_remove(0)
}

/// Every proxy shard; each load balancer listens once per shard.
fn proxy_shards() -> Vec<Handle> {
    match PROXY_RUNTIMES.get() {
        Some(s) => s.clone(),
        None => vec![Handle::current()],
    }
}

/// The backends and running health checks of every load balancer, for the agent's whole life:
/// checks run whether or not this node holds the VIP, so a new leader knows backend health the
/// moment it takes it, and a `bindToVip` listener that is stopped and started again keeps it.
#[derive(Debug, Default)]
pub struct Pools {
    /// Backends per load balancer, by port (ports are unique per config).
    by_port: HashMap<u16, Arc<Backends>>,
    /// The checker tasks; aborted on drop.
    checks: Vec<JoinHandle<()>>,
}

impl Pools {
    /// Backends for every entry of `lbs`, with their checks started on the proxy runtime.
    pub fn start(lbs: &[LoadBalancer]) -> Pools {
        let rt = proxy_runtime();
        let _in_rt = rt.enter();
        let mut pools = Pools::default();
        for lb in lbs {
            let hc = lb.health_check();
            let checker = Checker::new(&hc).map(Arc::new);
            let backends = Arc::new(Backends::new(lb, checker.is_some()));
            if let Some(c) = checker {
                info!(
                    "load balancer {:?}: {} health checks{} every {} ms (timeout {} ms, down after {}, up after {} in a row)",
                    lb.name,
                    spelling(&hc.kind),
                    hc.path.as_deref().map(|p| format!(" of {p}")).unwrap_or_default(),
                    hc.interval_ms(),
                    hc.timeout_ms(),
                    hc.fall(),
                    hc.rise()
                );
                pools.checks.extend(backends.start_checks(c));
            }
            pools.by_port.insert(lb.port.0, backends);
        }
        pools
    }

    /// Every load balancer's backends by port: each backend's [`health::HealthState`] is in
    /// [`Backends::health`].
    pub fn backends(&self) -> impl Iterator<Item = (u16, &Arc<Backends>)> {
        self.by_port.iter().map(|(p, b)| (*p, b))
    }

    /// What `kube-vip status` shows of the backends, read afresh on every request: every load
    /// balancer in port order, its backends in configured order.
    pub fn status_source(&self) -> crate::metrics::BackendSource {
        let mut all: Vec<(u16, Arc<Backends>)> =
            self.backends().map(|(p, b)| (p, b.clone())).collect();
        all.sort_by_key(|(p, _)| *p);
        Box::new(move || all.iter().flat_map(|(_, b)| b.status()).collect())
    }

    /// Starts serving `lb` on `addr` with its backends.
    pub async fn start_lb(
        &self,
        lb: &LoadBalancer,
        addr: SocketAddr,
    ) -> Result<RunningLb, ListenError> {
        let backends = match self.by_port.get(&lb.port.0) {
            Some(b) => b.clone(),
            // Not from the config these pools were made from (cannot happen): unchecked backends.
            None => Arc::new(Backends::new(lb, false)),
        };
        RunningLb::start(lb, backends, addr).await
    }
}

impl Drop for Pools {
    fn drop(&mut self) {
        for c in &self.checks {
            c.abort();
        }
    }
}

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

/// A listening load balancer. Stop it with [`RunningLb::stop`]; that closes the listeners and
/// every connection they proxy.
#[derive(Debug)]
pub struct RunningLb {
    /// Name from the config, for log lines.
    name: String,
    /// Where it listens.
    addr: SocketAddr,
    /// Stops the accept loops and their connections.
    stop: Trigger,
    /// The accept loops, one per proxy shard.
    tasks: Vec<JoinHandle<()>>,
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
    /// Binds `addr` and starts serving `lb` with `backends`: one listener and accept loop per
    /// proxy shard, all on the same address (SO_REUSEPORT), so the kernel spreads new
    /// connections over the shards and each connection lives on the thread that accepted it:
    /// no task moves between threads, and its sockets stay in one CPU's cache (HAProxy's and
    /// nginx's model). They share `maxConnections` and the descriptor budget.
    pub async fn start(
        lb: &LoadBalancer,
        backends: Arc<Backends>,
        addr: SocketAddr,
    ) -> Result<RunningLb, ListenError> {
        let shards = proxy_shards();
        let reuse_port = shards.len() > 1;
        let mut listeners = Vec::with_capacity(shards.len());
        for rt in &shards {
            // A listener registers with the runtime it is made in: its shard's.
            let _in_rt = rt.enter();
            let l = listen(addr, reuse_port).map_err(|source| ListenError {
                name: lb.name.clone(),
                addr,
                source,
            })?;
            listeners.push(l);
        }
        let addrs: Vec<String> = lb
            .backends
            .iter()
            .map(|b| b.socket_addr().to_string())
            .collect();
        let first_byte = match (lb.kind, lb.first_byte_timeout_ms()) {
            (LbType::Tcp, 0) => ", no firstByteTimeoutMs".to_string(),
            (LbType::Tcp, ms) => format!(", backends answer within {ms} ms (firstByteTimeoutMs)"),
            (LbType::Http, _) => String::new(),
        };
        info!(
            "load balancer {:?} ({}, {}) listening on {addr}, backends {}, at most {} connections{first_byte}",
            lb.name,
            spelling(&lb.kind),
            spelling(&lb.balance()),
            addrs.join(", "),
            lb.max_connections()
        );
        let limit = Arc::new(Semaphore::new(lb.max_connections() as usize));
        let (stop, signal) = shutdown::channel();
        let tasks = shards
            .iter()
            .zip(listeners)
            .map(|(rt, listener)| {
                let (b, l, s) = (backends.clone(), limit.clone(), signal.clone());
                match lb.kind {
                    LbType::Tcp => rt.spawn(tcp::serve(listener, b, l, s)),
                    LbType::Http => rt.spawn(http::serve(listener, b, l, s)),
                }
            })
            .collect();
        Ok(RunningLb {
            name: lb.name.clone(),
            addr,
            stop,
            tasks,
        })
    }

    /// Closes the listeners and all their connections, and waits until they are gone.
    pub async fn stop(self) {
        self.stop.fire();
        for t in self.tasks {
            let _ = t.await;
        }
        info!("load balancer {:?} on {} stopped", self.name, self.addr);
    }
}

/// A listening socket on `addr` with a backlog of [`LISTEN_BACKLOG`] (and SO_REUSEADDR, as
/// `TcpListener::bind` sets it, so a restart does not wait for old connections' TIME_WAIT;
/// SO_REUSEPORT if `reuse_port`, for one listener per proxy shard).
/// TCP_NODELAY, keepalive and `TCP_USER_TIMEOUT` are set on the listener: Linux copies them to
/// every accepted socket, which spares setsockopts per connection (both proxies want them: a
/// short answer must not wait for an ACK, and a vanished client must not hold a connection).
fn listen(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.set_nodelay(true)?;
    limits::set_tcp_timeouts(&socket)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// What an accepted connection holds while it lives: its place under `maxConnections` and its
/// descriptors in the proxy's budget.
#[derive(Debug)]
pub struct Admission {
    /// One of the load balancer's `maxConnections`.
    _slot: OwnedSemaphorePermit,
    /// Its descriptors (see [`limits`]).
    _fds: OwnedSemaphorePermit,
}

/// The accept loop of both load balancer kinds: runs `handle` for every client as a task of its
/// own until `shutdown` fires, then aborts all of those tasks and waits until they are gone, so
/// that no connection outlives its listener (which matters when the VIP moves away and these
/// sockets can no longer be answered). A client is accepted only with a free slot under
/// `limit` and descriptors in the budget; until then it waits in the listen backlog.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limit: Arc<Semaphore>,
    mut shutdown: Shutdown,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr, Admission) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    let stop = shutdown.recv();
    tokio::pin!(stop);
    let mut reap = tokio::time::interval(REAP_INTERVAL);
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut full_logged = false;
    'accept: loop {
        // Both permits are free in the common case: no await, no extra wake-up.
        let slot = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !full_logged {
                    warn!(
                        "{}: maxConnections reached; new clients wait in the listen backlog",
                        listener.local_addr().map_or("?".into(), |a| a.to_string())
                    );
                    full_logged = true;
                }
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    p = limit.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                }
            }
        };
        let fds = match limits::try_reserve_fds(limits::FDS_PER_CONNECTION) {
            Some(p) => p,
            None => tokio::select! {
                biased;
                _ = &mut stop => break,
                p = limits::reserve_fds(limits::FDS_PER_CONNECTION) => p,
            },
        };
        let mut admission = Some(Admission {
            _slot: slot,
            _fds: fds,
        });
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => break 'accept,
                accepted = listener.accept() => match accepted {
                    Ok((client, peer)) => {
                        if let Some(a) = admission.take() {
                            conns.spawn(handle(client, peer, a));
                        }
                        // Collecting finished tasks here rather than waiting on `join_next`
                        // spares this task a wake-up for every connection that ends.
                        while conns.try_join_next().is_some() {}
                        if limit.available_permits() > 0 {
                            full_logged = false;
                        }
                        continue 'accept;
                    }
                    Err(e) => {
                        warn!("accept failed: {e}");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                },
                _ = reap.tick() => while conns.try_join_next().is_some() {},
            }
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
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0)), false).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(accepted.nodelay().expect("getsockopt"));
        drop(client);
    }

    /// Beyond `maxConnections` a client waits (in the backlog) until a connection ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn max_connections_holds_back_the_next_client() {
        use super::testutil::{free_port, lb_config, spawn_backend, start};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let backend_addr = spawn_backend(|mut s| async move {
            let mut buf = [0u8; 16];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
        let config = LoadBalancer {
            max_connections: Some(1),
            ..lb_config("t", LbType::Tcp, free_port(), &[backend_addr])
        };
        let (lb, addr) = start(&config).await;
        let echo = |mut s: TcpStream| async move {
            s.write_all(b"x").await.expect("write");
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.map(|_| s)
        };
        let first = echo(TcpStream::connect(addr).await.expect("connect"))
            .await
            .expect("first client is served");
        // The second connect completes in the kernel's backlog, but nobody serves it yet.
        let second = TcpStream::connect(addr).await.expect("connect");
        let waiting = tokio::spawn(echo(second));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "second client served beyond maxConnections"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("served once the first left")
            .expect("task")
            .expect("echo");
        lb.stop().await;
    }
}
