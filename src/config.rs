//! The configuration file: kube-vip 0.1's `config.yaml` schema, plus optional keys of our own.
//!
//! Every key of 0.1 keeps its name and meaning, so a file written for 0.1 (the guide's example is
//! kept in `shared/reference/seed-config.yaml`) loads unchanged. Keys we added are all optional;
//! their defaults are the `DEFAULT_*` constants below and are listed in README.md.
//!
//! Errors name the field and, where it can be found, the line: serde_yaml reports the position of
//! type errors (bad IP, port out of range, unknown key), and [`Config::validate`] finds the line of
//! a value for the checks that span several fields (duplicate peers, VIP equal to a peer, ...).

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::cluster::lease;

/// Gratuitous ARP / unsolicited NA rounds sent when a node takes the VIP.
pub const DEFAULT_ARP_BURST_COUNT: u32 = 5;
/// Seconds between refresh announcements while holding the VIP (0 turns refreshing off).
pub const DEFAULT_ARP_REFRESH_SECONDS: u64 = 10;
/// How long a node that is about to take the VIP asks the link whether anyone still answers
/// for it (ARP probe / IPv6 duplicate address detection); 0 turns the probe off. A LAN
/// answers within a millisecond; the rest is room for a busy host.
pub const DEFAULT_VIP_PROBE_MS: u64 = 10;
/// Longest probe window accepted: every take-over waits this long.
pub const MAX_VIP_PROBE_MS: u64 = 1000;
/// Real-time (`SCHED_RR`) priority of the control path's threads (Raft, lease, VIP keeper,
/// probe, announcer). Nice values only order threads within one cgroup or autogroup (a
/// session): against the API server's pod, another service or another login's processes the
/// agent competes as an equal, and under a flood in another session its lease timer woke up
/// to 1 s late (lease 80 ms; BENCHMARKS.md). Any real-time priority runs ahead of every
/// ordinary thread in every group; 10 stays below the kernel's own real-time threads (threaded
/// interrupts at 50, watchdogs at 99). The control path sleeps almost all the time, so it takes
/// no CPU from anyone, and the proxy stays at normal priority.
pub const DEFAULT_CONTROL_REALTIME_PRIORITY: u8 = 10;
/// Highest `SCHED_RR` priority Linux accepts.
pub const MAX_REALTIME_PRIORITY: u8 = 99;
/// Where a clustered node keeps its Raft vote and log.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kube-vip";
/// Raft heartbeat interval. With the election timeouts below: unplanned failover ~150 ms
/// (p50, measured), no leader change in 10 minutes of 5 % packet loss with every core busy.
pub const DEFAULT_HEARTBEAT_MS: u64 = 20;
/// Lower bound of the randomised Raft election timeout. Wide apart from the upper bound so
/// that two followers rarely stand at the same moment (split votes cost a whole round).
pub const DEFAULT_ELECTION_TIMEOUT_MIN_MS: u64 = 40;
/// Upper bound of the randomised Raft election timeout; also the followers' leader lease, so
/// the VIP lease is this minus a margin (see `cluster::lease`).
pub const DEFAULT_ELECTION_TIMEOUT_MAX_MS: u64 = 120;
/// How long the load balancer waits for one backend to accept a connection.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1000;
/// How long a backend that refused or timed out is passed over before it is tried again.
pub const DEFAULT_BACKEND_COOLDOWN_MS: u64 = 2000;
/// Health check: time between the starts of two checks of one backend. With
/// [`DEFAULT_HEALTH_FALL`] an unready backend is marked down within fall × interval + timeout
/// (≤ 0.6 s), inside the 1 s the control plane allows; 5 checks/s per backend and node cost an
/// API server a few TLS handshakes per second.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 200;
/// Health check: limit for one whole check (connect, TLS, request, answer). A healthy
/// kube-apiserver answers `/readyz` in a few ms; one slower than this is as good as hung.
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 200;
/// Health check: failures in a row that mark a backend down. Two, so that one lost packet or one
/// slow answer on a busy node does not move traffic.
pub const DEFAULT_HEALTH_FALL: u32 = 2;
/// Health check: successes in a row that bring a down backend back. Three at 200 ms: a backend
/// must stay good for 0.6 s, so one that flaps (up and down every 300 ms) never comes back while
/// it flaps.
pub const DEFAULT_HEALTH_RISE: u32 = 3;
/// Health check path for `http`/`https` checks: what kube-apiserver offers without credentials.
pub const DEFAULT_HEALTH_PATH: &str = "/readyz";
/// `tcp` load balancers: how long a backend may stay silent after a client's TLS ClientHello
/// before the connection counts as failed (passive detection of a backend that accepts but never
/// answers: a TLS server sends its ServerHello within milliseconds; connections that do not
/// start with a TLS handshake record are exempt). Longer than the active
/// checks' timeout, so a backend that is only slow is caught by those first; shorter than
/// client-go's 10 s TLS handshake timeout, so a client closed here retries within its own.
pub const DEFAULT_FIRST_BYTE_TIMEOUT_MS: u64 = 2000;
/// Most proxied connections per load balancer at once. A control plane of 5000 nodes holds about
/// two connections per node; beyond the limit new clients wait in the listen backlog.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Longest accepted health check interval or timeout, ms.
const MAX_HEALTH_MS: u64 = 60_000;
/// Where `/metrics`, `/healthz` and `/readyz` are served: every address, port 2112, the port
/// kube-vip (Go) uses, so existing scrape configs keep working. `""` turns the endpoint off.
pub const DEFAULT_METRICS_ADDRESS: &str = ":2112";
/// Linux interface names are at most 15 bytes (IFNAMSIZ less the NUL).
const MAX_INTERFACE_NAME: usize = 15;

/// A TCP port, 1 to 65535. Its own type so that 0 and 70000 fail where they are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Accepts integers only; errors from a visitor carry the scalar's own position.
        struct PortVisitor;
        impl serde::de::Visitor<'_> for PortVisitor {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number between 1 and 65535")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Port, E> {
                match u16::try_from(n) {
                    Ok(p) if p != 0 => Ok(Port(p)),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Unsigned(n), &self)),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Port, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(n), &self)),
                }
            }
        }
        d.deserialize_u64(PortVisitor)
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One member of the Raft cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Unique name of the node; Raft node ids are derived from it.
    pub id: String,
    /// Address the node's Raft listener is reachable on.
    pub address: IpAddr,
    /// Raft port (10000 in the guide).
    pub port: Port,
}

impl Peer {
    /// The peer's Raft endpoint.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port.0)
    }
}

/// How a config value of an enum (`tcp`, `leastconn`, ...) is spelled in the file, for log
/// lines: the operator greps for what they wrote, not for Rust's `Tcp`.
pub fn spelling<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|j| j.as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Ports kube-apiserver listens on in the guides (6443; 6444 behind a load balancer on the same
/// node), for `check`'s warning about `tcp` checks.
const API_SERVER_PORTS: [u16; 2] = [6443, 6444];

/// Kind of proxy a load balancer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LbType {
    /// Plain TCP forwarding (what kube-apiserver needs: it speaks TLS end to end).
    Tcp,
    /// HTTP/1.1 reverse proxy that adds X-Forwarded-For and X-Forwarded-Host.
    Http,
}

/// How a load balancer checks its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckType {
    /// A TCP connect succeeds.
    Tcp,
    /// `GET path` over plain HTTP/1.1 answers 2xx.
    Http,
    /// `GET path` over TLS answers 2xx (kube-apiserver's `/readyz`).
    Https,
    /// No active checks; only failed connects (passive detection) count.
    None,
}

/// `healthCheck` of a `loadBalancers` entry. Every key but `type` has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheck {
    /// `tcp`, `http`, `https` or `none`.
    #[serde(rename = "type")]
    pub kind: HealthCheckType,
    /// Path to GET for `http`/`https` (default [`DEFAULT_HEALTH_PATH`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Time between checks of one backend, ms (default [`DEFAULT_HEALTH_INTERVAL_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// Limit for one check, ms (default [`DEFAULT_HEALTH_TIMEOUT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Successes in a row that bring a backend back (default [`DEFAULT_HEALTH_RISE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    /// Failures in a row that mark a backend down (default [`DEFAULT_HEALTH_FALL`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
    /// PEM file of the CA(s) that must have signed the backend's certificate (`https` only);
    /// without it the certificate is not verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl HealthCheck {
    /// What a 0.1 config without `healthCheck` gets: connect checks, safe for any backend.
    pub fn default_for_0_1() -> HealthCheck {
        HealthCheck {
            kind: HealthCheckType::Tcp,
            path: None,
            interval_ms: None,
            timeout_ms: None,
            rise: None,
            fall: None,
            ca_file: None,
        }
    }
    /// Path with its default applied.
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or(DEFAULT_HEALTH_PATH)
    }
    /// Interval with its default applied.
    pub fn interval_ms(&self) -> u64 {
        self.interval_ms.unwrap_or(DEFAULT_HEALTH_INTERVAL_MS)
    }
    /// Timeout with its default applied.
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms.unwrap_or(DEFAULT_HEALTH_TIMEOUT_MS)
    }
    /// Rise with its default applied.
    pub fn rise(&self) -> u32 {
        self.rise.unwrap_or(DEFAULT_HEALTH_RISE)
    }
    /// Fall with its default applied.
    pub fn fall(&self) -> u32 {
        self.fall.unwrap_or(DEFAULT_HEALTH_FALL)
    }
    /// The same check with every default written out (for `check`).
    pub fn effective(&self) -> HealthCheck {
        let http = matches!(self.kind, HealthCheckType::Http | HealthCheckType::Https);
        HealthCheck {
            kind: self.kind,
            path: http.then(|| self.path().to_string()),
            interval_ms: Some(self.interval_ms()),
            timeout_ms: Some(self.timeout_ms()),
            rise: Some(self.rise()),
            fall: Some(self.fall()),
            ca_file: self.ca_file.clone(),
        }
    }
}

/// What happens to a backend's open connections when it is marked down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMarkedDown {
    /// Close them, so long-lived watches reconnect to a healthy backend.
    #[default]
    Close,
    /// Leave them alone; only new connections avoid the backend.
    Keep,
}

/// How a load balancer spreads new connections over healthy backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// In turn.
    Roundrobin,
    /// To the backend with the fewest open connections (ties in turn): long-lived watches that
    /// piled up on the survivors of a restart are evened out by the next connections.
    #[default]
    Leastconn,
}

/// One backend server of a load balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// IP address of the backend (an API server).
    pub address: IpAddr,
    /// Port the backend listens on (6444 in the guide).
    pub port: Port,
}

impl Backend {
    /// The backend's endpoint.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port.0)
    }
}

/// One `loadBalancers` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// Name used in log lines.
    pub name: String,
    /// `tcp` or `http`.
    #[serde(rename = "type")]
    pub kind: LbType,
    /// Port to listen on.
    pub port: Port,
    /// Listen on VIP:port, only while this node holds the VIP; otherwise on every address, always.
    #[serde(default)]
    pub bind_to_vip: bool,
    /// Servers to forward to, in round-robin order.
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// Connect timeout per backend attempt, ms (default [`DEFAULT_CONNECT_TIMEOUT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// How long a failed backend is passed over, ms (default [`DEFAULT_BACKEND_COOLDOWN_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_cooldown_ms: Option<u64>,
    /// Active health checks (default: `tcp` connect checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// What happens to a down backend's connections (default `close`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_marked_down: Option<OnMarkedDown>,
    /// `roundrobin` or `leastconn` (default `leastconn`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
    /// Most proxied connections at once (default [`DEFAULT_MAX_CONNECTIONS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// `tcp`: ms a backend may stay silent after the client's TLS ClientHello, 0 = no limit
    /// (default [`DEFAULT_FIRST_BYTE_TIMEOUT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte_timeout_ms: Option<u64>,
}

impl LoadBalancer {
    /// Connect timeout with its default applied.
    pub fn connect_timeout_ms(&self) -> u64 {
        self.connect_timeout_ms
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS)
    }
    /// Backend cooldown with its default applied.
    pub fn backend_cooldown_ms(&self) -> u64 {
        self.backend_cooldown_ms
            .unwrap_or(DEFAULT_BACKEND_COOLDOWN_MS)
    }
    /// Health check with its defaults applied.
    pub fn health_check(&self) -> HealthCheck {
        self.health_check
            .clone()
            .unwrap_or_else(HealthCheck::default_for_0_1)
            .effective()
    }
    /// `onMarkedDown` with its default applied.
    pub fn on_marked_down(&self) -> OnMarkedDown {
        self.on_marked_down.unwrap_or_default()
    }
    /// `balance` with its default applied.
    pub fn balance(&self) -> Balance {
        self.balance.unwrap_or_default()
    }
    /// `maxConnections` with its default applied.
    pub fn max_connections(&self) -> u32 {
        self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS)
    }
    /// `firstByteTimeoutMs` with its default applied (0 = off).
    pub fn first_byte_timeout_ms(&self) -> u64 {
        self.first_byte_timeout_ms
            .unwrap_or(DEFAULT_FIRST_BYTE_TIMEOUT_MS)
    }
}

/// The whole configuration file. Field order is 0.1's, so `sample config` reads like 0.1's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Other members of the Raft cluster.
    #[serde(default)]
    pub remote_peers: Vec<Peer>,
    /// This node. Required unless `singleNode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_peer: Option<Peer>,
    /// The virtual IP.
    pub vip: IpAddr,
    /// Announce the VIP with gratuitous ARP (unsolicited NA for IPv6) when taking it.
    #[serde(rename = "gratuitousARP", default)]
    pub gratuitous_arp: bool,
    /// No Raft: this node takes the VIP at once.
    #[serde(default)]
    pub single_node: bool,
    /// This node initialises the cluster's membership on its first start.
    #[serde(default)]
    pub start_as_leader: bool,
    /// Interface the VIP is added to and announced on.
    pub interface: String,
    /// Load balancers to run.
    #[serde(default)]
    pub load_balancers: Vec<LoadBalancer>,

    /// Announcement rounds when taking the VIP (default [`DEFAULT_ARP_BURST_COUNT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arp_burst_count: Option<u32>,
    /// Seconds between refresh announcements; 0 = off (default [`DEFAULT_ARP_REFRESH_SECONDS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arp_refresh_seconds: Option<u64>,
    /// Probe window before taking the VIP, ms; 0 = off (default [`DEFAULT_VIP_PROBE_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip_probe_ms: Option<u64>,
    /// `SCHED_RR` priority of the control path's threads, 1-99; 0 = none, nice -10 only
    /// (default [`DEFAULT_CONTROL_REALTIME_PRIORITY`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_realtime_priority: Option<u8>,
    /// Directory for Raft state (default [`DEFAULT_STATE_DIR`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Raft heartbeat interval, ms (default [`DEFAULT_HEARTBEAT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
    /// Raft election timeout lower bound, ms (default [`DEFAULT_ELECTION_TIMEOUT_MIN_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub election_timeout_min_ms: Option<u64>,
    /// Raft election timeout upper bound, ms (default [`DEFAULT_ELECTION_TIMEOUT_MAX_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub election_timeout_max_ms: Option<u64>,
    /// File with the shared key(s) authenticating the peer channel (one per line, hex or
    /// base64, at least 32 bytes; the first signs, all are accepted). Unset: the peer channel
    /// is unauthenticated and peers are identified by address only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_key_file: Option<PathBuf>,
    /// `[address]:port` of the metrics and health endpoint; `""` = off (default
    /// [`DEFAULT_METRICS_ADDRESS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<String>,
}

/// A configuration that could not be loaded; the message names the file, field and line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML did not match the schema (serde_yaml's message carries field and line).
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What serde_yaml said.
        message: String,
    },
    /// The file parsed but its values do not fit together.
    #[error("invalid config {path}:\n  - {}", .problems.join("\n  - "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// One line per problem.
        problems: Vec<String>,
    },
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_yaml(&text, path)
    }

    /// Parses and validates YAML text; `path` is only used in messages.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let problems = config.validate(text);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Arp burst count with its default applied.
    pub fn arp_burst_count(&self) -> u32 {
        self.arp_burst_count.unwrap_or(DEFAULT_ARP_BURST_COUNT)
    }
    /// Refresh interval with its default applied.
    pub fn arp_refresh_seconds(&self) -> u64 {
        self.arp_refresh_seconds
            .unwrap_or(DEFAULT_ARP_REFRESH_SECONDS)
    }
    /// Probe window with its default applied.
    pub fn vip_probe_ms(&self) -> u64 {
        self.vip_probe_ms.unwrap_or(DEFAULT_VIP_PROBE_MS)
    }

    /// `SCHED_RR` priority of the control path's threads; 0 = none.
    pub fn control_realtime_priority(&self) -> u8 {
        self.control_realtime_priority
            .unwrap_or(DEFAULT_CONTROL_REALTIME_PRIORITY)
    }
    /// State directory with its default applied.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
    }
    /// Heartbeat with its default applied.
    pub fn heartbeat_ms(&self) -> u64 {
        self.heartbeat_ms.unwrap_or(DEFAULT_HEARTBEAT_MS)
    }
    /// Election timeout lower bound with its default applied.
    pub fn election_timeout_min_ms(&self) -> u64 {
        self.election_timeout_min_ms
            .unwrap_or(DEFAULT_ELECTION_TIMEOUT_MIN_MS)
    }
    /// Election timeout upper bound with its default applied.
    pub fn election_timeout_max_ms(&self) -> u64 {
        self.election_timeout_max_ms
            .unwrap_or(DEFAULT_ELECTION_TIMEOUT_MAX_MS)
    }

    /// Metrics address with its default applied; `""` means off.
    pub fn metrics_address(&self) -> &str {
        self.metrics_address
            .as_deref()
            .unwrap_or(DEFAULT_METRICS_ADDRESS)
    }

    /// Where to serve metrics: `None` when turned off. Validated at load, so an error here
    /// cannot happen for a loaded config.
    pub fn metrics_listen(&self) -> Result<Option<MetricsListen>, String> {
        MetricsListen::parse(self.metrics_address())
    }

    /// The same configuration with every optional key written out at its effective value,
    /// for `kube-vip check`.
    pub fn effective(&self) -> Config {
        let mut c = self.clone();
        c.arp_burst_count = Some(self.arp_burst_count());
        c.arp_refresh_seconds = Some(self.arp_refresh_seconds());
        c.vip_probe_ms = Some(self.vip_probe_ms());
        c.control_realtime_priority = Some(self.control_realtime_priority());
        c.state_dir = Some(self.state_dir());
        c.heartbeat_ms = Some(self.heartbeat_ms());
        c.election_timeout_min_ms = Some(self.election_timeout_min_ms());
        c.election_timeout_max_ms = Some(self.election_timeout_max_ms());
        c.metrics_address = Some(self.metrics_address().to_string());
        for lb in &mut c.load_balancers {
            lb.connect_timeout_ms = Some(lb.connect_timeout_ms());
            lb.backend_cooldown_ms = Some(lb.backend_cooldown_ms());
            lb.health_check = Some(lb.health_check());
            lb.on_marked_down = Some(lb.on_marked_down());
            lb.balance = Some(lb.balance());
            lb.max_connections = Some(lb.max_connections());
            if lb.kind == LbType::Tcp {
                lb.first_byte_timeout_ms = Some(lb.first_byte_timeout_ms());
            }
        }
        c
    }

    /// Warnings about load balancers, for `check`: `tcp` checks of a backend on an API server
    /// port (6443, 6444), which kube-apiserver logs as a TLS handshake error each time.
    pub fn lb_warnings(&self) -> Vec<String> {
        let nodes = 1 + self.remote_peers.len() as u64;
        self.load_balancers
            .iter()
            .enumerate()
            .filter_map(|(i, lb)| {
                let hc = lb.health_check();
                let port = lb
                    .backends
                    .iter()
                    .map(|b| b.port.0)
                    .find(|p| API_SERVER_PORTS.contains(p))?;
                (hc.kind == HealthCheckType::Tcp).then(|| {
                    let per_s = nodes as f64 * 1000.0 / hc.interval_ms().max(1) as f64;
                    format!(
                        "loadBalancers[{i}] ({:?}): tcp health checks of port {port} (an API server's?) connect without TLS; kube-apiserver logs each as \"TLS handshake error ... EOF\", about {per_s:.0} lines/s per API server from {nodes} node(s). Use healthCheck: {{type: https, path: /readyz}}",
                        lb.name
                    )
                })
            })
            .collect()
    }

    /// A warning about `peerKeyFile` (e.g. readable by others), for `check`.
    pub fn peer_key_warning(&self) -> Option<String> {
        let path = self.peer_key_file.as_ref()?;
        crate::cluster::auth::KeyRing::load(path).ok()?.1
    }

    /// All peers, the local one first.
    pub fn all_peers(&self) -> impl Iterator<Item = &Peer> {
        self.local_peer.iter().chain(self.remote_peers.iter())
    }

    /// Checks that need more than one field. `text` is the YAML source, used to find lines.
    /// Returns one message per problem; empty means valid.
    pub fn validate(&self, text: &str) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(path) = &self.peer_key_file {
            if let Err(e) = crate::cluster::auth::KeyRing::load(path) {
                p.push(format!("{e}{}", at_in_top(text, "peerKeyFile")));
            }
        }
        // " (line N)" for the nth `key: value` inside top-level `section` ("" = whole file).
        let at_in = |section: &str, key: &str, value: &str, nth: usize| -> String {
            match find_line_in(text, section, key, value, nth) {
                Some(n) => format!(" (line {n})"),
                None => String::new(),
            }
        };
        let at = |key: &str, value: &str, nth: usize| at_in("", key, value, nth);

        if self.interface.is_empty() {
            p.push(format!(
                "interface: must not be empty{}",
                at("interface", "", 0)
            ));
        } else if self.interface.len() > MAX_INTERFACE_NAME
            || self.interface.contains(['/', ' ', ':'])
        {
            p.push(format!(
                "interface: {:?} is not a valid Linux interface name (at most {MAX_INTERFACE_NAME} characters, no '/', ':' or spaces){}",
                self.interface,
                at("interface", &self.interface, 0)
            ));
        }
        let vip = self.vip.to_string();
        if self.vip.is_unspecified() || self.vip.is_loopback() || self.vip.is_multicast() {
            p.push(format!(
                "vip: {vip} is not a unicast address a host can hold{}",
                at("vip", &vip, 0)
            ));
        }
        if let IpAddr::V4(v4) = self.vip {
            if v4.is_broadcast() {
                p.push(format!(
                    "vip: {vip} is the broadcast address{}",
                    at("vip", &vip, 0)
                ));
            }
        }

        if !self.single_node && self.local_peer.is_none() {
            p.push("localPeer: required unless singleNode is true".to_string());
        }
        let mut ids = HashSet::new();
        let mut addrs = HashSet::new();
        let peers = self
            .local_peer
            .iter()
            .map(|p| ("localPeer".to_string(), "localPeer", 0, p));
        let remotes = self
            .remote_peers
            .iter()
            .enumerate()
            .map(|(k, p)| (format!("remotePeers[{k}]"), "remotePeers", k, p));
        for (field, section, k, peer) in peers.chain(remotes) {
            // Which occurrence of this value inside its own section the entry is.
            let earlier = &self.remote_peers[..if section == "remotePeers" { k } else { 0 }];
            let nth_id = earlier.iter().filter(|q| q.id == peer.id).count();
            let nth_addr = earlier.iter().filter(|q| q.address == peer.address).count();
            let addr = peer.address.to_string();
            let addr_line = at_in(section, "address", &addr, nth_addr);
            if peer.id.is_empty() {
                p.push(format!("{field}.id: must not be empty"));
            } else if !ids.insert(peer.id.clone()) {
                p.push(format!(
                    "{field}.id: duplicate peer id {:?}{}; every peer needs its own id",
                    peer.id,
                    at_in(section, "id", &peer.id, nth_id)
                ));
            }
            if !addrs.insert(peer.address) {
                p.push(format!(
                    "{field}.address: duplicate peer address {addr}{addr_line}; each peer is a different node"
                ));
            }
            if peer.address == self.vip {
                p.push(format!(
                    "{field}.address: {addr} is the VIP{addr_line}; the VIP must be an address no node owns"
                ));
            }
            if peer.address.is_unspecified() || peer.address.is_multicast() {
                p.push(format!(
                    "{field}.address: {addr} is not an address a peer can be reached at{addr_line}"
                ));
            }
        }
        let families: HashSet<bool> = self.all_peers().map(|p| p.address.is_ipv4()).collect();
        if families.len() > 1 {
            p.push(
                "localPeer/remotePeers: peers mix IPv4 and IPv6 addresses; a node's Raft socket is bound to one family, so all peers must use the same one"
                    .to_string(),
            );
        }

        let mut ports = HashSet::new();
        for (i, lb) in self.load_balancers.iter().enumerate() {
            let field = format!("loadBalancers[{i}]");
            let port = lb.port.to_string();
            if lb.backends.is_empty() {
                p.push(format!(
                    "{field}.backends: load balancer {:?} has no backends{}",
                    lb.name,
                    at_in("loadBalancers", "name", &lb.name, 0)
                ));
            }
            if !ports.insert(lb.port) {
                p.push(format!(
                    "{field}.port: port {port} is used by another load balancer{}",
                    at_in("loadBalancers", "port", &port, 1)
                ));
            }
            if let Some(local) = &self.local_peer {
                if lb.port == local.port {
                    p.push(format!(
                        "{field}.port: port {port} is the Raft port of localPeer{}",
                        at_in("loadBalancers", "port", &port, 0)
                    ));
                }
            }
            if lb.connect_timeout_ms == Some(0) {
                p.push(format!("{field}.connectTimeoutMs: must be greater than 0"));
            }
            if lb.max_connections == Some(0) {
                p.push(format!("{field}.maxConnections: must be greater than 0"));
            }
            if lb.kind != LbType::Tcp && lb.first_byte_timeout_ms.is_some() {
                p.push(format!(
                    "{field}.firstByteTimeoutMs: only for type tcp (the http proxy has its own request timeout)"
                ));
            }
            if let Some(hc) = &lb.health_check {
                health_check_problems(&mut p, &field, hc);
            }
            for (j, b) in lb.backends.iter().enumerate() {
                if b.address == self.vip {
                    let a = b.address.to_string();
                    p.push(format!(
                        "{field}.backends[{j}].address: {a} is the VIP{}; backends are the servers' own addresses",
                        at_in("loadBalancers", "address", &a, 0)
                    ));
                }
                if b.address.is_unspecified() || b.address.is_multicast() {
                    p.push(format!(
                        "{field}.backends[{j}].address: {} cannot be connected to",
                        b.address
                    ));
                }
            }
        }

        if let Err(e) = self.metrics_listen() {
            p.push(format!(
                "metricsAddress: {e}{}",
                at("metricsAddress", self.metrics_address(), 0)
            ));
        }
        if let (Ok(Some(m)), Some(local)) = (self.metrics_listen(), &self.local_peer) {
            if m.port() == local.port.0 {
                p.push(format!(
                    "metricsAddress: port {} is the Raft port of localPeer",
                    m.port()
                ));
            }
        }
        if let Ok(Some(m)) = self.metrics_listen() {
            if self.load_balancers.iter().any(|lb| lb.port.0 == m.port()) {
                p.push(format!(
                    "metricsAddress: port {} is used by a load balancer",
                    m.port()
                ));
            }
        }

        if self.vip_probe_ms() > MAX_VIP_PROBE_MS {
            p.push(format!(
                "vipProbeMs ({}) must be at most {MAX_VIP_PROBE_MS}: every take-over of the VIP waits this long{}",
                self.vip_probe_ms(),
                at_in("", "vipProbeMs", &self.vip_probe_ms().to_string(), 0)
            ));
        }
        if self.control_realtime_priority() > MAX_REALTIME_PRIORITY {
            p.push(format!(
                "controlRealtimePriority ({}) must be 0 (none) to {MAX_REALTIME_PRIORITY}{}",
                self.control_realtime_priority(),
                at_in_top(text, "controlRealtimePriority")
            ));
        }
        let (hb, min, max) = (
            self.heartbeat_ms(),
            self.election_timeout_min_ms(),
            self.election_timeout_max_ms(),
        );
        if hb == 0 {
            p.push("heartbeatMs: must be greater than 0".to_string());
        }
        if min >= max {
            p.push(format!(
                "electionTimeoutMinMs ({min}) must be less than electionTimeoutMaxMs ({max})"
            ));
        }
        if hb >= min {
            p.push(format!(
                "heartbeatMs ({hb}) must be less than electionTimeoutMinMs ({min}), or followers time out between heartbeats"
            ));
        }
        // openraft heartbeats every 1.5·hb: a VIP lease (cluster::lease) shorter than two of
        // those would drop the VIP whenever one heartbeat is late.
        let ms = |d: Duration| d.as_millis() as u64;
        let lease = ms(lease::vip_lease(
            Duration::from_millis(hb),
            Duration::from_millis(max),
        ));
        if hb > 0 && lease < 3 * hb {
            p.push(format!(
                "electionTimeoutMaxMs ({max}) is too short for heartbeatMs ({hb}): the VIP lease would be {lease} ms, less than two heartbeats ({} ms); use at least {}",
                3 * hb,
                3 * hb + ms(lease::lease_margin(Duration::from_millis(hb)))
            ));
        }
        p
    }
}

/// " (line N)" of top-level key `key`, or nothing.
fn at_in_top(text: &str, key: &str) -> String {
    text.lines()
        .position(|l| {
            l.strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with(':'))
        })
        .map(|n| format!(" (line {})", n + 1))
        .unwrap_or_default()
}

/// Problems of one `healthCheck`; `field` names its load balancer.
fn health_check_problems(p: &mut Vec<String>, field: &str, hc: &HealthCheck) {
    let http = matches!(hc.kind, HealthCheckType::Http | HealthCheckType::Https);
    for (key, v) in [("intervalMs", hc.interval_ms), ("timeoutMs", hc.timeout_ms)] {
        match v {
            Some(0) => p.push(format!("{field}.healthCheck.{key}: must be greater than 0")),
            Some(ms) if ms > MAX_HEALTH_MS => p.push(format!(
                "{field}.healthCheck.{key}: {ms} is more than {MAX_HEALTH_MS} ms"
            )),
            _ => {}
        }
    }
    for (key, v) in [("rise", hc.rise), ("fall", hc.fall)] {
        if v == Some(0) {
            p.push(format!("{field}.healthCheck.{key}: must be at least 1"));
        }
    }
    if let Some(path) = &hc.path {
        if !http {
            p.push(format!(
                "{field}.healthCheck.path: only http and https checks send a request"
            ));
        } else if !path.starts_with('/') || path.parse::<hyper::Uri>().is_err() {
            p.push(format!(
                "{field}.healthCheck.path: {path:?} is not an absolute path such as /readyz"
            ));
        }
    }
    if let Some(ca) = &hc.ca_file {
        if hc.kind != HealthCheckType::Https {
            p.push(format!(
                "{field}.healthCheck.caFile: only https checks use a CA"
            ));
        } else if !ca.is_absolute() && ca.as_os_str().is_empty() {
            p.push(format!("{field}.healthCheck.caFile: must not be empty"));
        }
    }
}

/// Where the metrics endpoint listens, from `metricsAddress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// `:port`: every address, IPv6 and IPv4 (IPv4 alone if the host has no IPv6).
    Any(u16),
    /// `address:port` (IPv6 as `[address]:port`).
    At(SocketAddr),
}

impl MetricsListen {
    /// Parses `metricsAddress`; `Ok(None)` for `""` (off).
    pub fn parse(s: &str) -> Result<Option<MetricsListen>, String> {
        if s.is_empty() {
            return Ok(None);
        }
        let bad_port = |p: &str| format!("{p:?} is not a port (1-65535) in {s:?}");
        if let Some(port) = s.strip_prefix(':') {
            return match port.parse::<u16>() {
                Ok(p) if p != 0 => Ok(Some(MetricsListen::Any(p))),
                _ => Err(bad_port(port)),
            };
        }
        let addr: SocketAddr = s.parse().map_err(|_| {
            format!(
                "{s:?} is not :port, address:port or [IPv6 address]:port (\"\" turns metrics off)"
            )
        })?;
        if addr.port() == 0 {
            return Err(bad_port("0"));
        }
        Ok(Some(MetricsListen::At(addr)))
    }

    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            MetricsListen::Any(p) => *p,
            MetricsListen::At(a) => a.port(),
        }
    }
}

/// Like [`find_line`], but only inside the block of top-level key `section` (from its line to
/// the next top-level key); `""` searches the whole text.
fn find_line_in(text: &str, section: &str, key: &str, value: &str, nth: usize) -> Option<usize> {
    if section.is_empty() {
        return find_line(text, key, value, nth);
    }
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| {
        l.strip_prefix(section)
            .is_some_and(|r| r.trim_start().starts_with(':'))
    })?;
    let len = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with(|c: char| c.is_alphanumeric()))
        .map_or(lines.len() - start, |n| n + 1);
    let block = lines[start..start + len].join("\n");
    find_line(&block, key, value, nth).map(|n| n + start)
}

/// Finds the 1-based line of the `nth` (0-based) occurrence of `key: value` in YAML text.
/// Handles block (`- key: value`) and flow (`{key: value, ...}`) styles, quoted or not.
/// A best effort for messages only: a miss just leaves the line out.
fn find_line(text: &str, key: &str, value: &str, nth: usize) -> Option<usize> {
    let mut seen = 0;
    for (i, line) in text.lines().enumerate() {
        let line = line.split(" #").next().unwrap_or(line);
        let mut rest = line;
        while let Some(pos) = rest.find(key) {
            let before = rest[..pos].chars().last();
            let after = rest[pos + key.len()..].trim_start();
            rest = &rest[pos + key.len()..];
            if matches!(before, Some(c) if c.is_alphanumeric()) {
                continue;
            }
            let Some(after) = after.strip_prefix(':') else {
                continue;
            };
            let v = after
                .trim_start()
                .split([',', '}'])
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches(['"', '\'']);
            if v == value {
                if seen == nth {
                    return Some(i + 1);
                }
                seen += 1;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = include_str!("../tests/data/seed-config.yaml");

    fn parse(text: &str) -> Result<Config, String> {
        Config::from_yaml(text, Path::new("test.yaml")).map_err(|e| e.to_string())
    }

    #[test]
    fn seed_config_loads_as_written() {
        let c = parse(SEED).expect("seed config must load");
        assert_eq!(c.vip.to_string(), "192.168.0.75");
        assert_eq!(c.remote_peers.len(), 2);
        assert!(c.start_as_leader && c.gratuitous_arp && !c.single_node);
        assert_eq!(c.load_balancers[0].backends.len(), 3);
        assert_eq!(c.load_balancers[0].kind, LbType::Tcp);
        assert_eq!(c.heartbeat_ms(), DEFAULT_HEARTBEAT_MS);
    }

    #[test]
    fn control_realtime_priority_defaults_and_bounds() {
        let c = parse(SEED).expect("seed");
        assert_eq!(
            c.control_realtime_priority(),
            DEFAULT_CONTROL_REALTIME_PRIORITY
        );
        assert_eq!(
            c.effective().control_realtime_priority,
            Some(DEFAULT_CONTROL_REALTIME_PRIORITY)
        );
        for ok in [0, 1, 99] {
            let c = parse(&format!("{SEED}controlRealtimePriority: {ok}\n")).expect("in range");
            assert_eq!(c.control_realtime_priority(), ok);
        }
        let e = parse(&format!("{SEED}controlRealtimePriority: 100\n")).unwrap_err();
        assert!(
            e.contains("controlRealtimePriority (100) must be 0 (none) to 99 (line "),
            "{e}"
        );
    }

    #[test]
    fn peer_key_file_errors_name_the_field_and_line() {
        let dir = std::env::temp_dir().join(format!("kv-config-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let with = |path: &Path| format!("{SEED}peerKeyFile: {}\n", path.display());
        let missing = dir.join("missing.key");
        let e = parse(&with(&missing)).unwrap_err();
        assert!(
            e.contains("peerKeyFile") && e.contains("cannot read"),
            "{e}"
        );
        assert!(e.contains("(line "), "{e}");
        let short = dir.join("short.key");
        std::fs::write(&short, "abcd\n").unwrap();
        let e = parse(&with(&short)).unwrap_err();
        assert!(e.contains("at least 32"), "{e}");
        let empty = dir.join("empty.key");
        std::fs::write(&empty, "# no key yet\n").unwrap();
        assert!(parse(&with(&empty)).unwrap_err().contains("no key"));
        let good = dir.join("good.key");
        std::fs::write(&good, format!("{}\n", "5a".repeat(32))).unwrap();
        let c = parse(&with(&good)).expect("a good key file loads");
        // `check` prints the effective config: the path, never the key.
        let shown = serde_yaml::to_string(&c.effective()).unwrap();
        assert!(
            shown.contains("peerKeyFile:") && !shown.contains("5a5a"),
            "{shown}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn find_line_block_and_flow() {
        assert_eq!(find_line(SEED, "address", "192.168.0.71", 0), Some(3));
        assert_eq!(find_line(SEED, "address", "192.168.0.71", 1), Some(26));
        assert_eq!(
            find_line("a: {id: x, address: 1.2.3.4}", "address", "1.2.3.4", 0),
            Some(1)
        );
        assert_eq!(find_line("vip: \"1.2.3.4\"", "vip", "1.2.3.4", 0), Some(1));
        assert_eq!(find_line("xvip: 1", "vip", "1", 0), None);
        assert_eq!(
            find_line_in(SEED, "localPeer", "address", "192.168.0.70", 0),
            Some(10)
        );
        assert_eq!(
            find_line_in(SEED, "loadBalancers", "address", "192.168.0.70", 0),
            Some(24)
        );
    }

    #[test]
    fn metrics_address_forms() {
        let l = |s: &str| MetricsListen::parse(s);
        assert_eq!(l(""), Ok(None));
        assert_eq!(l(":2112"), Ok(Some(MetricsListen::Any(2112))));
        assert_eq!(
            l("127.0.0.1:9100").map(|m| m.map(|m| m.port())),
            Ok(Some(9100))
        );
        assert!(matches!(l("[::1]:2112"), Ok(Some(MetricsListen::At(_)))));
        for bad in [":0", ":70000", "2112", "localhost:2112", "1.2.3.4:0", ":"] {
            assert!(l(bad).is_err(), "{bad} must be refused");
        }
        let c = parse(SEED).expect("seed");
        assert_eq!(c.metrics_address(), DEFAULT_METRICS_ADDRESS);
        let c = parse(&format!("{SEED}metricsAddress: \"\"\n")).expect("off");
        assert_eq!(c.metrics_listen(), Ok(None));
        let e = parse(&format!("{SEED}metricsAddress: \":6443\"\n")).expect_err("lb port");
        assert!(e.contains("used by a load balancer"), "{e}");
    }

    #[test]
    fn effective_config_round_trips() {
        let c = parse(SEED).expect("seed");
        let text = serde_yaml::to_string(&c.effective()).expect("serialize");
        let again = parse(&text).expect("effective config must load");
        assert_eq!(again, c.effective());
    }

    fn with_lb(extra: &str) -> String {
        format!(
            "vip: 10.0.0.75\ninterface: eth0\nsingleNode: true\nloadBalancers:\n- name: api\n  type: tcp\n  port: 6443\n  backends:\n  - {{address: 10.0.0.70, port: 6444}}\n{extra}"
        )
    }

    #[test]
    fn tcp_checks_of_an_api_server_port_are_warned_about() {
        let w = parse(&with_lb("")).expect("parse").lb_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("port 6444") && w[0].contains("about 5 lines/s"),
            "{w:?}"
        );
        let https = parse(&with_lb("  healthCheck: {type: https, path: /readyz}\n"));
        assert!(https.expect("parse").lb_warnings().is_empty());
        let other = with_lb("").replace("port: 6444", "port: 8080");
        assert!(parse(&other).expect("parse").lb_warnings().is_empty());
    }

    #[test]
    fn first_byte_timeout_is_for_tcp_only() {
        let c = parse(&with_lb("  firstByteTimeoutMs: 0\n")).expect("parse");
        assert_eq!(c.load_balancers[0].first_byte_timeout_ms(), 0);
        let c = parse(&with_lb("")).expect("parse");
        assert_eq!(
            c.effective().load_balancers[0].first_byte_timeout_ms,
            Some(DEFAULT_FIRST_BYTE_TIMEOUT_MS)
        );
        let http = with_lb("  firstByteTimeoutMs: 500\n").replace("type: tcp", "type: http");
        let e = parse(&http).expect_err("http with firstByteTimeoutMs");
        assert!(e.contains("firstByteTimeoutMs: only for type tcp"), "{e}");
    }

    #[test]
    fn health_check_defaults_and_0_1_configs() {
        let c = parse(SEED).expect("seed");
        let hc = c.load_balancers[0].health_check();
        assert_eq!(hc.kind, HealthCheckType::Tcp);
        assert_eq!(hc.interval_ms, Some(DEFAULT_HEALTH_INTERVAL_MS));
        assert_eq!(hc.path, None);
        let c = parse(&with_lb(
            "  healthCheck: {type: https}\n  balance: roundrobin\n",
        ))
        .expect("parse");
        let lb = &c.load_balancers[0];
        assert_eq!(lb.health_check().path(), "/readyz");
        assert_eq!(lb.balance(), Balance::Roundrobin);
        assert_eq!(lb.on_marked_down(), OnMarkedDown::Close);
    }

    #[test]
    fn health_check_errors_name_the_field() {
        let e = parse(&with_lb(
            "  healthCheck: {type: https, fall: 0, intervalMs: 0}\n",
        ))
        .expect_err("invalid");
        assert!(e.contains("loadBalancers[0].healthCheck.fall"), "{e}");
        assert!(e.contains("loadBalancers[0].healthCheck.intervalMs"), "{e}");
        let e =
            parse(&with_lb("  healthCheck: {type: tcp, caFile: /x.pem}\n")).expect_err("invalid");
        assert!(e.contains("healthCheck.caFile: only https"), "{e}");
        let e =
            parse(&with_lb("  healthCheck: {type: http, path: readyz}\n")).expect_err("invalid");
        assert!(e.contains("healthCheck.path"), "{e}");
        let e = parse(&with_lb("  healthCheck: {type: grpc}\n")).expect_err("invalid");
        assert!(e.contains("grpc"), "{e}");
        let e = parse(&with_lb("  healthCheck: {type: tcp, intervall: 5}\n")).expect_err("invalid");
        assert!(e.contains("intervall"), "{e}");
        let e = parse(&with_lb("  maxConnections: 0\n")).expect_err("invalid");
        assert!(e.contains("loadBalancers[0].maxConnections"), "{e}");
        let e = parse(&with_lb("  onMarkedDown: drop\n")).expect_err("invalid");
        assert!(e.contains("drop"), "{e}");
    }
}
