//! Command line: kube-vip 0.1's commands and flags, plus `check`.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::config::{Backend, Config, LbType, LoadBalancer, Peer, Port};

/// Image the sample manifest runs: the container `scripts/container` builds, tagged with this
/// crate's version so a manifest and a binary of the same release always match.
pub const DEFAULT_IMAGE: &str = concat!("kube-vip/kube-vip:", env!("CARGO_PKG_VERSION"));
/// Port of the liveness probe in the sample manifest: the port of the default `metricsAddress`.
pub const DEFAULT_METRICS_PORT: u16 = 2112;
/// Where the config file lives on a node and inside the container.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kube-vip/config.yaml";

/// kube-vip: a virtual IP and load balancer for a highly available Kubernetes control plane.
///
/// One node at a time (the Raft leader, or the only node with singleNode) holds the VIP,
/// announces it with gratuitous ARP and load-balances VIP:6443 to the API servers.
///
/// Typical use: `kube-vip sample config > /etc/kube-vip/config.yaml`, edit it,
/// `kube-vip check -c /etc/kube-vip/config.yaml`, then run `kube-vip start -c ...` on every node
/// (or `kube-vip sample manifest` for a static pod).
#[derive(Debug, Parser)]
#[command(name = "kube-vip", version, propagate_version = true)]
pub struct Cli {
    /// Log level: error, warn, info, debug or trace. Overrides RUST_LOG, which also takes
    /// per-module filters (e.g. RUST_LOG=kube_vip::vip=debug).
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log: Option<log::LevelFilter>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a sample config file or static pod manifest.
    #[command(subcommand)]
    Sample(Sample),
    /// Run the agent: join the cluster (or act alone with singleNode), hold the VIP while leader,
    /// and run the load balancers.
    Start(StartArgs),
    /// Validate a config file, print it with every default filled in; exit 0 if valid, 1 if not.
    Check {
        /// Config file to check.
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: PathBuf,
    },
    /// Ask the agent running with this config how it stands: role, term, leader, who holds the
    /// VIP, peers, backends. Exit 1 with a clear message when no agent answers.
    Status {
        /// Config file of the running agent (its stateDir holds the agent's socket).
        #[arg(short = 'c', long = "config", value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Output: a table for people, or json for scripts.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show or change the cluster's members, like `etcdctl member`: run as root on a member;
    /// the agent forwards a change to the leader. One change at a time; a change that would
    /// cost the cluster its quorum is refused.
    #[command(subcommand)]
    Members(Members),
    /// Print the version.
    Version,
}

/// `kube-vip members ...`
#[derive(Debug, Subcommand)]
pub enum Members {
    /// Every member: id, Raft address, voter or learner, and which one leads.
    List {
        /// Config file of the running agent (its stateDir holds the agent's socket).
        #[arg(short = 'c', long = "config", value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Output: a table for people, or json for scripts.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Add a node (already started with startAsLeader: false and current members in
    /// remotePeers): it joins as a learner, catches up, then becomes a voter.
    Add {
        /// Config file of the running agent (its stateDir holds the agent's socket).
        #[arg(short = 'c', long = "config", value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The new node's id (its localPeer id).
        #[arg(long, value_name = "ID")]
        id: String,
        /// The new node's Raft address (its localPeer address and port).
        #[arg(long, value_name = "IP:PORT")]
        address: std::net::SocketAddr,
    },
    /// Remove a node; if it leads, leadership is handed over first.
    Remove {
        /// Config file of the running agent (its stateDir holds the agent's socket).
        #[arg(short = 'c', long = "config", value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The node's id.
        #[arg(long, value_name = "ID")]
        id: String,
    },
}

/// Output format of `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A short table.
    Table,
    /// One JSON object.
    Json,
}

/// `kube-vip sample ...`
#[derive(Debug, Subcommand)]
pub enum Sample {
    /// Print a config file built from the flags; with no flags, the guide's example.
    Config(SampleConfigArgs),
    /// Print a static pod manifest for /etc/kubernetes/manifests.
    Manifest(SampleManifestArgs),
    /// Print a fresh peer key (32 bytes from the OS's random source, hex) for `peerKeyFile`.
    Key,
}

/// Flags of `sample config`, named as in kube-vip 0.1.
#[derive(Debug, Args)]
pub struct SampleConfigArgs {
    /// Interface the VIP is added to.
    #[arg(long, default_value = "ens192")]
    pub interface: String,
    /// The virtual IP.
    #[arg(long, default_value = "192.168.0.75")]
    pub vip: IpAddr,
    /// Run without Raft: this node takes the VIP at once.
    #[arg(long = "singleNode", action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
    pub single_node: bool,
    /// This node initialises the cluster (set on the first node only).
    #[arg(long = "startAsLeader", action = ArgAction::Set, num_args = 0..=1, default_value_t = true, default_missing_value = "true", value_name = "BOOL")]
    pub start_as_leader: bool,
    /// Announce the VIP with gratuitous ARP.
    #[arg(long = "arp", action = ArgAction::Set, num_args = 0..=1, default_value_t = true, default_missing_value = "true", value_name = "BOOL")]
    pub arp: bool,
    /// This node, as id:address:port.
    #[arg(long = "localPeer", value_parser = parse_peer, default_value = "server1:192.168.0.70:10000", value_name = "ID:ADDR:PORT")]
    pub local_peer: Peer,
    /// The other nodes, as id:address:port,id:address:port,...
    #[arg(long = "remotePeers", value_parser = parse_peer, value_delimiter = ',', default_value = "server2:192.168.0.71:10000,server3:192.168.0.72:10000", value_name = "ID:ADDR:PORT,...")]
    pub remote_peers: Vec<Peer>,
    /// Load balancer listens on the VIP only (while this node holds it).
    #[arg(long = "lbBindToVip", action = ArgAction::Set, num_args = 0..=1, default_value_t = true, default_missing_value = "true", value_name = "BOOL")]
    pub lb_bind_to_vip: bool,
    /// Load balancer type: tcp or http.
    #[arg(long = "lbType", value_parser = parse_lb_type, default_value = "tcp")]
    pub lb_type: LbType,
    /// Load balancer name.
    #[arg(long = "lbName", default_value = "Kubernetes Control Plane")]
    pub lb_name: String,
    /// Load balancer port.
    #[arg(long = "lbPort", default_value_t = 6443, value_parser = clap::value_parser!(u16).range(1..))]
    pub lb_port: u16,
    /// Backends, as address:port,address:port,... (IPv6 as [addr]:port).
    #[arg(long = "lbBackends", value_parser = parse_backend, value_delimiter = ',', default_value = "192.168.0.70:6444,192.168.0.71:6444,192.168.0.72:6444", value_name = "ADDR:PORT,...")]
    pub lb_backends: Vec<Backend>,
}

/// Flags of `sample manifest`.
#[derive(Debug, Args)]
pub struct SampleManifestArgs {
    /// Container image, pinned to this release by default.
    #[arg(long, default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// Path of the config file on the node (mounted at /etc/kube-vip/config.yaml in the pod).
    #[arg(long, default_value = DEFAULT_CONFIG_PATH, value_name = "PATH")]
    pub config: PathBuf,
    /// Run the pod with `start --singleNode`, whatever the config says: the bootstrap step on
    /// the first control-plane node, before the other nodes have joined.
    #[arg(long = "singleNode")]
    pub single_node: bool,
    /// The node's peer key file (`peerKeyFile` in the config, e.g. /etc/kube-vip/peer.key):
    /// mounted read-only at the same path in the pod.
    #[arg(long = "peerKeyFile", value_name = "PATH")]
    pub peer_key_file: Option<PathBuf>,
}

/// Flags of `start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// Config file.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: PathBuf,
    /// Do not touch the VIP (someone else manages the address); load balancers still run.
    #[arg(long = "disableVIP")]
    pub disable_vip: bool,
    /// Override the file's singleNode: run without Raft.
    #[arg(long = "singleNode")]
    pub single_node: bool,
    /// Override the file's startAsLeader.
    #[arg(long = "startAsLeader")]
    pub start_as_leader: bool,
}

/// Parses `id:address:port`; the address may be IPv6, bare or in brackets.
pub fn parse_peer(s: &str) -> Result<Peer, String> {
    let (id, rest) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected id:address:port"))?;
    let b = parse_backend(rest).map_err(|e| format!("{s:?}: {e}"))?;
    if id.is_empty() {
        return Err(format!("{s:?}: peer id is empty"));
    }
    Ok(Peer {
        id: id.to_string(),
        address: b.address,
        port: b.port,
    })
}

/// Parses `address:port`; IPv6 as `[addr]:port` or `addr:port` (last colon splits).
pub fn parse_backend(s: &str) -> Result<Backend, String> {
    let (addr, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected address:port"))?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    let address: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?;
    Ok(Backend {
        address,
        port: Port(port),
    })
}

fn parse_lb_type(s: &str) -> Result<LbType, String> {
    match s {
        "tcp" => Ok(LbType::Tcp),
        "http" => Ok(LbType::Http),
        _ => Err(format!("{s:?}: load balancer type must be tcp or http")),
    }
}

/// The config `sample config` prints.
pub fn sample_config(a: &SampleConfigArgs) -> Config {
    Config {
        remote_peers: a.remote_peers.clone(),
        local_peer: Some(a.local_peer.clone()),
        vip: a.vip,
        gratuitous_arp: a.arp,
        single_node: a.single_node,
        start_as_leader: a.start_as_leader,
        interface: a.interface.clone(),
        load_balancers: vec![LoadBalancer {
            name: a.lb_name.clone(),
            kind: a.lb_type,
            port: Port(a.lb_port),
            bind_to_vip: a.lb_bind_to_vip,
            backends: a.lb_backends.clone(),
            connect_timeout_ms: None,
            backend_cooldown_ms: None,
            // The guide's backends are kube-apiservers: their readiness, not just their port.
            health_check: Some(crate::config::HealthCheck {
                kind: crate::config::HealthCheckType::Https,
                path: Some(crate::config::DEFAULT_HEALTH_PATH.to_string()),
                ..crate::config::HealthCheck::default_for_0_1()
            }),
            on_marked_down: None,
            balance: None,
            max_connections: None,
            first_byte_timeout_ms: None,
        }],
        arp_burst_count: None,
        arp_refresh_seconds: None,
        vip_probe_ms: None,
        control_realtime_priority: None,
        state_dir: None,
        heartbeat_ms: None,
        election_timeout_min_ms: None,
        election_timeout_max_ms: None,
        peer_key_file: None,
        metrics_address: None,
    }
}

/// The static pod manifest `sample manifest` prints.
pub fn sample_manifest(a: &SampleManifestArgs) -> String {
    let host_config = a.config.display();
    let image = &a.image;
    let state = crate::config::DEFAULT_STATE_DIR;
    let single_node = if a.single_node {
        "\n    - --singleNode"
    } else {
        ""
    };
    // The peer key, if any: the same path inside the pod as on the host, read-only.
    let (key_mount, key_volume) = match &a.peer_key_file {
        None => (String::new(), String::new()),
        Some(k) => (
            format!("\n    - name: peer-key\n      mountPath: {}\n      readOnly: true", k.display()),
            format!(
                "\n  # The peer channel's shared key (peerKeyFile), mode 0600 on the host.\n  - name: peer-key\n    hostPath:\n      path: {}\n      type: File",
                k.display()
            ),
        ),
    };
    format!(
        r#"# kube-vip static pod. Put it in /etc/kubernetes/manifests/ on each control-plane node
# (on joining nodes only after `kubeadm join` has finished).
apiVersion: v1
kind: Pod
metadata:
  name: kube-vip
  namespace: kube-system
  labels:
    app.kubernetes.io/name: kube-vip
    app.kubernetes.io/version: "{version}"
spec:
  hostNetwork: true
  priorityClassName: system-node-critical
  containers:
  - name: kube-vip
    image: {image}
    imagePullPolicy: IfNotPresent
    command:
    - /kube-vip
    - start
    - -c
    - {DEFAULT_CONFIG_PATH}{single_node}
    # kubeadm's numbers for its own static pods. /healthz says the agent's loop runs; it never
    # depends on leadership, so a healthy follower is never restarted. Port: metricsAddress.
    livenessProbe:
      httpGet:
        host: 127.0.0.1
        path: /healthz
        port: {metrics_port}
        scheme: HTTP
      initialDelaySeconds: 10
      periodSeconds: 10
      timeoutSeconds: 15
      failureThreshold: 8
    securityContext:
      capabilities:
        drop:
        - ALL
        add:
        - NET_ADMIN
        - NET_RAW
        # Real-time priority for the control path (controlRealtimePriority): a nice value only
        # ranks threads within the pod's own cgroup, so beside a busy API server the lease could
        # lapse. Without it the agent warns and runs at nice -10.
        - SYS_NICE
    volumeMounts:
    - name: config
      mountPath: {DEFAULT_CONFIG_PATH}
      readOnly: true
    - name: state
      mountPath: {state}{key_mount}
  volumes:
  - name: config
    hostPath:
      path: {host_config}
      type: File
  # Raft vote and log: must survive pod restarts, or a restarted node could vote twice in a term.
  - name: state
    hostPath:
      path: {state}
      type: DirectoryOrCreate{key_volume}
"#,
        version = env!("CARGO_PKG_VERSION"),
        metrics_port = DEFAULT_METRICS_PORT,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_mounts_the_peer_key_only_when_asked() {
        let mut a = SampleManifestArgs {
            image: "img".into(),
            config: DEFAULT_CONFIG_PATH.into(),
            single_node: false,
            peer_key_file: None,
        };
        assert!(!sample_manifest(&a).contains("peer-key"));
        a.peer_key_file = Some("/etc/kube-vip/peer.key".into());
        let m = sample_manifest(&a);
        assert!(
            m.contains("mountPath: /etc/kube-vip/peer.key\n      readOnly: true"),
            "{m}"
        );
        assert!(
            m.contains("path: /etc/kube-vip/peer.key\n      type: File"),
            "{m}"
        );
    }

    #[test]
    fn manifest_probe_port_is_the_default_metrics_port() {
        assert_eq!(
            crate::config::DEFAULT_METRICS_ADDRESS,
            format!(":{DEFAULT_METRICS_PORT}")
        );
    }

    #[test]
    fn peers_and_backends_parse() {
        let p = parse_peer("server1:10.0.0.1:10000").expect("v4");
        assert_eq!(
            (p.id.as_str(), p.address.to_string(), p.port.0),
            ("server1", "10.0.0.1".into(), 10000)
        );
        let p = parse_peer("s2:[fd00::2]:10000").expect("v6 bracketed");
        assert_eq!(p.address.to_string(), "fd00::2");
        let b = parse_backend("fd00::3:6444").expect("v6 bare");
        assert_eq!((b.address.to_string(), b.port.0), ("fd00::3".into(), 6444));
        assert!(parse_peer("noport").is_err());
        assert!(parse_backend("10.0.0.1:0").is_err());
        assert!(parse_backend("10.0.0.1:70000").is_err());
        assert!(parse_backend("host:80").is_err());
        assert!(parse_peer(":10.0.0.1:1").is_err());
    }
}
