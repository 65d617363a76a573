//! Backend choice: healthy backends first, by `balance` (round-robin or least connections),
//! with a short cooldown for backends that just failed a connect.
//!
//! Each backend has one [`Health`] state, fed by the active checks (`health`) and by failed
//! connects of proxied clients (passive detection). New connections go to backends that are up
//! and not cooling down; then to those cooling down; then to those marked down. So with every
//! backend down clients are still tried in turn and fail fast as before: a check is a hint,
//! never a reason to refuse a client outright (a wrong `caFile` must not take the API down).
//!
//! A failed connect puts the backend in cooldown, so one dead API server costs one failed
//! connect per cooldown period instead of one per client, and counts as a failed check.
//! When a backend is marked down and `onMarkedDown` is `close`, its open connections are told
//! to close (see [`Lease::marked_down`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info, warn};
use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

use super::health::{Change, Checker, Health, HealthState, Outcome};
use crate::config::{Balance, LoadBalancer, OnMarkedDown};
use crate::metrics::status::BackendStatus;
use crate::metrics::{self, BackendMetrics};

/// A duration in whole milliseconds, for `status`.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Opens backend connections with TCP_NODELAY set, under a connect timeout.
#[derive(Debug, Clone, Copy)]
pub struct Connector {
    /// Limit for one connect attempt.
    pub timeout: Duration,
}

/// Whether a new backend socket gets keepalive and `TCP_USER_TIMEOUT` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeouts {
    /// Set them before connecting (pooled `http` connections: they idle between requests).
    Now,
    /// Leave them to the caller: the `tcp` proxy sets them once a connection has lived a
    /// second (see `tcp::SETTLE`), which spares five syscalls for every short connection;
    /// health checks never need them.
    Later,
}

/// When the last ACK of a backend handshake goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeAck {
    /// At once, in a packet of its own (the kernel's default).
    Alone,
    /// With the first bytes sent (TCP_QUICKACK off before the connect, as HAProxy's
    /// `tcp-smart-connect`): one packet fewer for the backend to take in. Only for a caller
    /// that has the client's first bytes in hand and sends them as soon as the connect is
    /// done: otherwise the backend's accept waits for the delayed-ACK timer (up to 200 ms).
    WithData,
}

impl Connector {
    /// Connects to `addr` within the timeout, without keepalive (health checks).
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        self.connect_with(addr, Timeouts::Later, HandshakeAck::Alone)
            .await
    }

    /// Connects to `addr` within the timeout.
    pub async fn connect_with(
        &self,
        addr: SocketAddr,
        t: Timeouts,
        ack: HandshakeAck,
    ) -> io::Result<TcpStream> {
        match timeout(self.timeout, connect_nodelay(addr, t, ack)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {} ms", self.timeout.as_millis()),
            )),
        }
    }
}

/// One backend: its address, health, cooldown and open connections.
#[derive(Debug)]
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Up or down, and why.
    pub health: Health,
    /// Ms since `Backends::epoch` until which it is in cooldown (0 = not cooling).
    cooldown_until: AtomicU64,
    /// Proxied connections open to it now (also those being connected).
    active: AtomicUsize,
    /// Bumped each time the backend is marked down; connections watch it.
    downs: watch::Sender<u64>,
    /// Mirror of `health`'s up flag, read on every pick without the lock.
    up: AtomicBool,
    /// Its `kube_vip_backend_*` metrics, labelled once here.
    metrics: BackendMetrics,
}

/// The backends of one load balancer.
#[derive(Debug)]
pub struct Backends {
    /// Name of the load balancer, for log lines.
    name: String,
    /// Backends in configured order.
    backends: Vec<Backend>,
    /// Round-robin position: index of the backend the next client starts with.
    next: AtomicUsize,
    /// Origin of the cooldown clock.
    epoch: Instant,
    /// How long a failed backend is passed over.
    cooldown: Duration,
    /// Opens backend connections.
    connector: Connector,
    /// How new connections are spread.
    balance: Balance,
    /// Whether a backend marked down loses its open connections.
    close_on_down: bool,
    /// Whether active checks run: only then do failed connects count towards `fall` (without
    /// checks nothing would ever bring the backend back).
    checked: bool,
    /// Backends up now, to log "all down" and its end once each.
    up_count: AtomicUsize,
    /// `tcp`: how long a backend may stay silent after a client's first bytes (None = no limit).
    first_byte: Option<Duration>,
}

/// Which passive failures of a backend count towards `fall` (see [`Backends::failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counts {
    /// Every one: a refused or timed-out connect is the backend's doing alone.
    Every,
    /// The first of each cooldown period only: a client has a hand in a connection that gets
    /// no answer, so many clients at once must not be able to mark a healthy backend down
    /// (and, with `onMarkedDown: close`, close everyone's connections to it).
    OncePerCooldown,
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

/// A proxied connection's hold on its backend: counts it for `leastconn` until dropped, and
/// tells when the backend is marked down.
#[derive(Debug)]
pub struct Lease {
    /// The backends.
    backends: Arc<Backends>,
    /// Which one.
    i: usize,
    /// Its down counter, subscribed before the connect so no mark is missed.
    downs: watch::Receiver<u64>,
    /// Whether marks close the connection.
    close_on_down: bool,
}

impl Lease {
    /// Completes when the backend is marked down and `onMarkedDown` is `close`; never otherwise.
    pub async fn marked_down(&mut self) {
        if self.close_on_down && self.downs.changed().await.is_ok() {
            return;
        }
        std::future::pending().await
    }

    /// The backend's address.
    pub fn addr(&self) -> SocketAddr {
        self.backends.backends[self.i].addr
    }

    /// The backend's metrics, for a proxy that counts bytes where they move.
    pub fn metrics(&self) -> &BackendMetrics {
        &self.backends.backends[self.i].metrics
    }

    /// The backend's index in its [`Backends`] (see [`Backends::metrics`]).
    pub fn index(&self) -> usize {
        self.i
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let b = &self.backends.backends[self.i];
        b.active.fetch_sub(1, Ordering::Relaxed);
        b.metrics.conn_ended();
    }
}

impl Backends {
    /// Backends of load balancer `lb` (its list must not be empty; config validation sees to it).
    pub fn new(lb: &LoadBalancer, checked: bool) -> Backends {
        let hc = lb.health_check();
        let backends: Vec<Backend> = lb
            .backends
            .iter()
            .map(|b| Backend {
                addr: b.socket_addr(),
                health: Health::new(hc.rise(), hc.fall()),
                cooldown_until: AtomicU64::new(0),
                active: AtomicUsize::new(0),
                downs: watch::Sender::new(0),
                up: AtomicBool::new(true),
                metrics: metrics::get().backend(&lb.name, b.socket_addr()),
            })
            .collect();
        Backends {
            name: lb.name.clone(),
            up_count: AtomicUsize::new(backends.len()),
            backends,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            cooldown: Duration::from_millis(lb.backend_cooldown_ms()),
            connector: Connector {
                timeout: Duration::from_millis(lb.connect_timeout_ms()),
            },
            balance: lb.balance(),
            close_on_down: lb.on_marked_down() == OnMarkedDown::Close,
            checked,
            first_byte: match lb.first_byte_timeout_ms() {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
        }
    }

    /// Starts one checker task per backend on the current runtime; they run until aborted.
    /// Checks of different backends are spread over the interval.
    pub fn start_checks(self: &Arc<Self>, checker: Arc<Checker>) -> Vec<JoinHandle<()>> {
        let n = self.backends.len().max(1) as u32;
        (0..self.backends.len())
            .map(|i| {
                let me = self.clone();
                let checker = checker.clone();
                let offset = checker.interval / n * i as u32;
                tokio::spawn(async move {
                    let mut tick =
                        tokio::time::interval_at(Instant::now() + offset, checker.interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tick.tick().await;
                        let outcome = checker.check(me.backends[i].addr, &me.connector).await;
                        me.backends[i].metrics.checked(outcome.took);
                        debug!(
                            "[{}] check of {}: {} ({} ms)",
                            me.name,
                            me.backends[i].addr,
                            outcome.detail,
                            outcome.took.as_millis()
                        );
                        me.record(i, outcome);
                    }
                })
            })
            .collect()
    }

    /// Every backend as `kube-vip status` shows it, in configured order.
    pub fn status(&self) -> Vec<BackendStatus> {
        let now = Instant::now();
        self.health()
            .into_iter()
            .map(|(addr, h)| BackendStatus {
                lb: self.name.clone(),
                backend: addr.to_string(),
                state: if h.up { "up" } else { "down" }.into(),
                for_ms: ms(now.saturating_duration_since(h.since)),
                last_check_ok: h.last.as_ref().map(|o| o.ok),
                last_check: h
                    .last
                    .as_ref()
                    .map_or_else(|| "none yet".to_string(), |o| o.detail.clone()),
                last_check_ago_ms: h
                    .last
                    .as_ref()
                    .map(|o| ms(now.saturating_duration_since(o.at))),
            })
            .collect()
    }

    /// Health of every backend, in configured order (for `status` and tests).
    pub fn health(&self) -> Vec<(SocketAddr, HealthState)> {
        self.backends
            .iter()
            .map(|b| (b.addr, b.health.snapshot()))
            .collect()
    }

    /// Counts a check result or a failed connect for backend `i`, and acts on a state change:
    /// one log line, and a down mark for its connections.
    fn record(&self, i: usize, outcome: Outcome) {
        let b = &self.backends[i];
        let detail = outcome.detail.clone();
        let Some(Change { up, streak, after }) = b.health.record(outcome) else {
            return;
        };
        b.up.store(up, Ordering::Relaxed);
        b.metrics.set_up(up);
        let total = self.backends.len();
        if up {
            // A cooldown still running is left to run out: checks that pass (a `tcp` connect
            // to a hung process) do not refute a proxied connection that just failed, and
            // clearing it here made such a backend flap DOWN/UP with every burst of clients.
            info!(
                "[{}] backend {} UP: {detail} ({streak} in a row; down for {:.1} s)",
                self.name,
                b.addr,
                after.as_secs_f64()
            );
            if self.up_count.fetch_add(1, Ordering::Relaxed) == 0 {
                info!("[{}] a backend is up again; clients go to it", self.name);
            }
        } else {
            let open = b.active.load(Ordering::Relaxed);
            let closing = if self.close_on_down && open > 0 {
                format!("; closing its {open} connection(s)")
            } else {
                String::new()
            };
            warn!(
                "[{}] backend {} DOWN: {detail} ({streak} in a row){closing}",
                self.name, b.addr
            );
            b.downs.send_modify(|n| *n += 1);
            if self.up_count.fetch_sub(1, Ordering::Relaxed) == 1 {
                warn!(
                    "[{}] all {total} backends are down; clients are still tried against them in turn",
                    self.name
                );
            }
        }
    }

    /// The order in which to try backends for one client: up and not cooling, then cooling,
    /// then down; within each group by `balance` (round-robin from the next start position,
    /// or fewest open connections with ties in round-robin order).
    pub fn order(&self) -> Vec<usize> {
        let n = self.backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let now = self.now_ms();
        let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
        let leastconn = self.balance == Balance::Leastconn;
        // A stable sort keeps the round-robin order among equals; it stays a permutation even
        // if a state changes meanwhile.
        order.sort_by_key(|&i| {
            let b = &self.backends[i];
            let group = if !b.up.load(Ordering::Relaxed) {
                2
            } else if b.cooldown_until.load(Ordering::Relaxed) > now {
                1
            } else {
                0
            };
            let load = if leastconn {
                b.active.load(Ordering::Relaxed)
            } else {
                0
            };
            (group, load)
        });
        order
    }

    /// Connects to the first backend that accepts, in [`Backends::order`]; keepalive and
    /// `TCP_USER_TIMEOUT` are left to the caller (see [`Timeouts::Later`]).
    pub async fn connect(
        self: &Arc<Self>,
        ack: HandshakeAck,
    ) -> Result<(TcpStream, Lease), AllFailed> {
        self.connect_in(self.order(), Timeouts::Later, ack).await
    }

    /// `firstByteTimeoutMs` (None = no limit).
    pub fn first_byte_timeout(&self) -> Option<Duration> {
        self.first_byte
    }

    /// The metrics of backend `i`.
    pub fn metrics(&self, i: usize) -> &BackendMetrics {
        &self.backends[i].metrics
    }

    /// The address of backend `i` (an index from [`Backends::order`]).
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.backends[i].addr
    }

    /// Connects to the first backend that accepts, in `order` (from [`Backends::order`]).
    pub async fn connect_in(
        self: &Arc<Self>,
        order: Vec<usize>,
        timeouts: Timeouts,
        ack: HandshakeAck,
    ) -> Result<(TcpStream, Lease), AllFailed> {
        let mut last = None;
        for &i in &order {
            let b = &self.backends[i];
            let downs = b.downs.subscribe();
            b.active.fetch_add(1, Ordering::Relaxed);
            b.metrics.conn_started();
            let lease = Lease {
                backends: self.clone(),
                i,
                downs,
                close_on_down: self.close_on_down,
            };
            let started = Instant::now();
            match self.connector.connect_with(b.addr, timeouts, ack).await {
                Ok(stream) => {
                    // No cooldown is cleared here: a connect proves little after a client got
                    // no answer (firstByteTimeoutMs), and the cooldown runs out by itself.
                    b.metrics.conn_connected();
                    return Ok((stream, lease));
                }
                Err(e) => {
                    drop(lease);
                    self.failed(
                        i,
                        format_args!("proxied connect: {e}"),
                        "trying the next one",
                        started,
                        Counts::Every,
                    );
                    last = Some((b.addr, e));
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

    /// Passive detection: a proxied connection to backend `i` failed (`what`), `started` at
    /// that instant. The backend cools down, the failure counts in
    /// `kube_vip_backend_connect_failures_total`, and with active checks it counts towards
    /// `fall` as a failed check would. Logged once per cooldown, with `then` saying what
    /// happens to the client.
    pub fn failed(
        &self,
        i: usize,
        what: std::fmt::Arguments<'_>,
        then: &str,
        started: Instant,
        counts: Counts,
    ) {
        let b = &self.backends[i];
        b.metrics.connect_failed();
        let now = self.now_ms();
        let was_cool = b.cooldown_until.load(Ordering::Relaxed) <= now;
        b.cooldown_until
            .store(now + self.cooldown.as_millis() as u64, Ordering::Relaxed);
        if was_cool {
            warn!("[{}] backend {} failed: {what}; {then}", self.name, b.addr);
        } else {
            debug!("[{}] backend {} still failing: {what}", self.name, b.addr);
        }
        if self.checked && (was_cool || counts == Counts::Every) {
            self.record(
                i,
                Outcome {
                    ok: false,
                    detail: what.to_string(),
                    at: Instant::now(),
                    took: started.elapsed(),
                },
            );
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that a stored 0 always means "not cooling", even in the first millisecond.
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

/// Connects to `addr` with TCP_NODELAY set, and keepalive and `TCP_USER_TIMEOUT` if `t` says
/// so. What `TcpSocket::connect` does, less its
/// getsockopt(SO_ERROR) once the handshake is over: the readiness that ends the wait already
/// tells a failed connect (EPOLLERR or EPOLLHUP) from a good one, so the error is fetched only
/// for a failure. One syscall fewer on every proxied connection.
async fn connect_nodelay(
    addr: SocketAddr,
    t: Timeouts,
    ack: HandshakeAck,
) -> io::Result<TcpStream> {
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
    if t == Timeouts::Now {
        super::limits::set_tcp_timeouts(&fd)?;
    }
    if ack == HandshakeAck::WithData {
        quickack_off(&fd)?;
    }
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

/// Turns TCP_QUICKACK off on `fd` (nix has no wrapper for it). Before a connect, this makes
/// the kernel hold the handshake's last ACK for the first data (see [`HandshakeAck`]).
fn quickack_off(fd: &impl AsRawFd) -> io::Result<()> {
    use nix::libc::{c_int, socklen_t, IPPROTO_TCP, TCP_QUICKACK};
    let off: c_int = 0;
    // SAFETY: a descriptor we own, and a pointer to an int that outlives the call, with its size.
    let r = unsafe {
        nix::libc::setsockopt(
            fd.as_raw_fd(),
            IPPROTO_TCP,
            TCP_QUICKACK,
            (&off as *const c_int).cast(),
            std::mem::size_of::<c_int>() as socklen_t,
        )
    };
    Errno::result(r).map(drop).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LbType;
    use crate::lb::testutil::{backend_listener, dead_addr, lb_config};

    fn lb(addrs: &[SocketAddr], balance: Balance) -> LoadBalancer {
        LoadBalancer {
            connect_timeout_ms: Some(1000),
            backend_cooldown_ms: Some(60_000),
            health_check: None,
            balance: Some(balance),
            ..lb_config("t", LbType::Tcp, 1, addrs)
        }
    }

    fn backends(n: u16, balance: Balance) -> Backends {
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 1000 + i)))
            .collect();
        Backends::new(&lb(&addrs, balance), true)
    }

    fn fail(b: &Backends, i: usize) {
        b.record(
            i,
            Outcome {
                ok: false,
                detail: "test".into(),
                at: Instant::now(),
                took: Duration::ZERO,
            },
        );
    }

    #[test]
    fn round_robin_rotates_start() {
        let b = backends(3, Balance::Roundrobin);
        assert_eq!(b.order(), vec![0, 1, 2]);
        assert_eq!(b.order(), vec![1, 2, 0]);
        assert_eq!(b.order(), vec![2, 0, 1]);
        assert_eq!(b.order(), vec![0, 1, 2]);
    }

    #[test]
    fn cooling_backends_go_last() {
        let b = backends(3, Balance::Roundrobin);
        b.backends[0]
            .cooldown_until
            .store(u64::MAX, Ordering::Relaxed);
        assert_eq!(b.order(), vec![1, 2, 0]);
        assert_eq!(b.order(), vec![1, 2, 0]);
        assert_eq!(b.order(), vec![2, 1, 0]);
    }

    #[test]
    fn down_backends_go_after_cooling_ones() {
        let b = backends(3, Balance::Roundrobin);
        fail(&b, 0);
        fail(&b, 0);
        b.backends[1]
            .cooldown_until
            .store(u64::MAX, Ordering::Relaxed);
        assert_eq!(b.order(), vec![2, 1, 0]);
        assert!(!b.health()[0].1.up);
    }

    #[test]
    fn leastconn_prefers_fewest_open() {
        let b = backends(3, Balance::Leastconn);
        b.backends[0].active.store(5, Ordering::Relaxed);
        b.backends[1].active.store(1, Ordering::Relaxed);
        assert_eq!(b.order(), vec![2, 1, 0]);
        b.backends[2].active.store(1, Ordering::Relaxed);
        // Ties in round-robin order (start positions 1, then 2).
        assert_eq!(b.order(), vec![1, 2, 0]);
        assert_eq!(b.order(), vec![2, 1, 0]);
    }

    #[tokio::test]
    async fn refused_backend_is_skipped_and_cooled() {
        let dead_addr = dead_addr();
        let live = backend_listener();
        let live_addr = live.local_addr().expect("addr");
        let b = Arc::new(Backends::new(
            &lb(&[dead_addr, live_addr], Balance::Roundrobin),
            true,
        ));
        let (_, lease) = b.connect(HandshakeAck::Alone).await.expect("connect");
        assert_eq!(lease.addr(), live_addr);
        assert!(b.backends[0].cooldown_until.load(Ordering::Relaxed) > 0);
        assert_eq!(b.backends[1].active.load(Ordering::Relaxed), 1);
        drop(lease);
        assert_eq!(b.backends[1].active.load(Ordering::Relaxed), 0);
        assert_eq!(b.backends[0].active.load(Ordering::Relaxed), 0);
    }

    /// The metric hooks: a failed connect, a forwarded connection while it is open, and a
    /// down mark, each in its backend's series.
    #[tokio::test]
    async fn connects_and_marks_feed_the_metrics() {
        use crate::metrics::backend_sample;
        let dead_addr = dead_addr();
        let live = backend_listener();
        let live_addr = live.local_addr().expect("addr");
        let mut config = lb(&[dead_addr, live_addr], Balance::Roundrobin);
        config.name = "hooks".into();
        let b = Arc::new(Backends::new(&config, true));
        let get = |m: &str, a: SocketAddr| backend_sample(m, "hooks", a).unwrap_or(-1.0);
        assert_eq!(get("backend_up", live_addr), 1.0, "up at start");
        let (_s, lease) = b.connect(HandshakeAck::Alone).await.expect("connect");
        assert_eq!(get("backend_connect_failures_total", dead_addr), 1.0);
        assert_eq!(get("backend_connections_total", dead_addr), 0.0);
        assert_eq!(get("backend_connections_total", live_addr), 1.0);
        assert_eq!(get("backend_active_connections", live_addr), 1.0);
        assert_eq!(get("backend_active_connections", dead_addr), 0.0);
        drop(lease);
        assert_eq!(get("backend_active_connections", live_addr), 0.0);
        fail(&b, 1);
        fail(&b, 1);
        assert_eq!(get("backend_up", live_addr), 0.0, "marked down");
        let st = b.status();
        assert_eq!(
            (st[1].state.as_str(), st[1].last_check_ok),
            ("down", Some(false))
        );
        assert_eq!(st[1].last_check, "test");
    }

    #[tokio::test]
    async fn all_dead_fails_with_count() {
        let dead_addr = dead_addr();
        let b = Arc::new(Backends::new(
            &lb(&[dead_addr, dead_addr], Balance::Roundrobin),
            true,
        ));
        let err = b.connect(HandshakeAck::Alone).await.expect_err("must fail");
        assert_eq!(err.tried, 2);
        assert_eq!(err.last_addr, dead_addr);
    }

    #[tokio::test]
    async fn marking_down_wakes_leases() {
        let live = backend_listener();
        let live_addr = live.local_addr().expect("addr");
        let b = Arc::new(Backends::new(&lb(&[live_addr], Balance::Leastconn), true));
        let (_s, mut lease) = b.connect(HandshakeAck::Alone).await.expect("connect");
        fail(&b, 0);
        fail(&b, 0);
        tokio::time::timeout(Duration::from_secs(1), lease.marked_down())
            .await
            .expect("lease sees the mark");
    }
}
