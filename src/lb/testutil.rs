//! What the load balancers' unit tests share: a config entry, free ports, backends on
//! 127.0.0.1 that serve each connection with the test's own code, a started load balancer.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::config::{Backend, HealthCheck, HealthCheckType, LbType, LoadBalancer, Port};
use crate::lb::{Pools, RunningLb};

/// A `loadBalancers` entry `name` of type `kind` on `port`, forwarding to `backends`, with
/// health checks off (the test backends accept only the connections the tests make) and every
/// other key at its default. A test sets what it needs with `LoadBalancer { .., ..lb_config(..) }`.
pub fn lb_config(name: &str, kind: LbType, port: u16, backends: &[SocketAddr]) -> LoadBalancer {
    LoadBalancer {
        name: name.into(),
        kind,
        port: Port(port),
        bind_to_vip: false,
        backends: backends
            .iter()
            .map(|a| Backend {
                address: a.ip(),
                port: Port(a.port()),
            })
            .collect(),
        connect_timeout_ms: None,
        backend_cooldown_ms: None,
        health_check: Some(HealthCheck {
            kind: HealthCheckType::None,
            ..HealthCheck::default_for_0_1()
        }),
        on_marked_down: None,
        balance: None,
        max_connections: None,
        first_byte_timeout_ms: None,
    }
}

/// A free port on 127.0.0.1 (bound and released; fine for a test).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// An address on 127.0.0.1 that nobody listens on (a free port): connects to it are refused.
pub fn dead_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A backend listener on 127.0.0.1 with room for every client of a test at once (tokio's
/// `bind` queues only 128, and a SYN beyond that waits a second for its retransmit).
pub fn backend_listener() -> TcpListener {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    s.listen(1024).expect("listen")
}

/// A backend on 127.0.0.1 (see [`backend_listener`]) that runs `serve` on every connection it
/// accepts, each in a task of its own, for the rest of the test. Returns its address.
pub fn spawn_backend<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = backend_listener();
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// Starts `config` as the agent does (its pools, then its listener) on 127.0.0.1 at its port.
pub async fn start(config: &LoadBalancer) -> (RunningLb, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], config.port.0));
    let pools = Pools::start(std::slice::from_ref(config));
    let lb = pools.start_lb(config, addr).await.expect("start");
    (lb, addr)
}
