//! kube-vip: virtual IP and control-plane load balancer. See README.md.

mod agent;
mod cli;
mod cluster;
mod config;
mod lb;
mod metrics;
mod shutdown;
mod vip;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use log::{error, info};
use tokio::sync::watch;

use agent::{Leadership, Role};
use cli::{Cli, Command, Sample, StartArgs};
use config::Config;

/// musl's malloc serialises every thread on one lock and maps and unmaps memory as connections
/// come and go (strace: about 1.5 mmap and 1.5 munmap per proxied connection, each munmap a TLB
/// shootdown across CPUs), and a proxy thread at normal priority holding that lock can stall a
/// control thread at nice -10 (priority inversion). mimalloc keeps per-thread heaps.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `info`, but netlink-proto's own warnings about dropped unsolicited messages are noise: we
/// close event sockets on purpose.
const DEFAULT_LOG_FILTER: &str = "info,netlink_proto=error";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut logger = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(DEFAULT_LOG_FILTER),
    );
    // Failover happens in milliseconds; so must the log.
    logger.format_timestamp_millis();
    if let Some(level) = cli.log {
        logger
            .filter_level(level)
            .filter_module("netlink_proto", log::LevelFilter::Error);
    }
    logger.init();

    match cli.command {
        Command::Version => {
            println!("kube-vip {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Sample(Sample::Config(a)) => print_yaml(&cli::sample_config(&a)),
        Command::Sample(Sample::Key) => {
            println!("{}", cluster::auth::sample_key());
            ExitCode::SUCCESS
        }
        Command::Sample(Sample::Manifest(a)) => {
            print!("{}", cli::sample_manifest(&a));
            ExitCode::SUCCESS
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                eprintln!("{}: OK", config.display());
                if let Some(w) = c.peer_key_warning() {
                    eprintln!("warning: {w}");
                }
                for w in c.lb_warnings() {
                    eprintln!("warning: {w}");
                }
                print_yaml(&c.effective())
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Start(args) => start(args),
        Command::Status { config, output } => status(&config, output),
        Command::Members(m) => members(m),
    }
}

/// `kube-vip members ...`: one request to the local agent's socket.
fn members(cmd: cli::Members) -> ExitCode {
    use metrics::status::{Reply, Request};
    let (path, req, output) = match cmd {
        cli::Members::List { config, output } => (config, Request::Members, output),
        cli::Members::Add {
            config,
            id,
            address,
        } => (
            config,
            Request::Change {
                change: cluster::membership::Change::Add { id, address },
            },
            cli::Output::Table,
        ),
        cli::Members::Remove { config, id } => (
            config,
            Request::Change {
                change: cluster::membership::Change::Remove { id },
            },
            cli::Output::Table,
        ),
    };
    finish(ask_agent(&path, &req).and_then(|reply| match reply {
        Reply::Changed(done) => Ok(done + "\n"),
        Reply::Members(m) => render(output, &m, cluster::membership::table, "members"),
        other => Err(format!("unexpected answer from the agent: {other:?}")),
    }))
}

fn print_yaml(c: &Config) -> ExitCode {
    match serde_yaml::to_string(c) {
        Ok(s) => {
            // A closed stdout (`| head`) is not worth a panic.
            let _ = std::io::stdout().write_all(s.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot print config: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `kube-vip status`: one request to the local agent's socket.
fn status(path: &std::path::Path, output: cli::Output) -> ExitCode {
    use metrics::status::{Reply, Request};
    finish(
        ask_agent(path, &Request::Status).and_then(|reply| match reply {
            Reply::Status(s) => render(output, &*s, metrics::status::table, "status"),
            other => Err(format!("unexpected answer from the agent: {other:?}")),
        }),
    )
}

/// Loads the config at `path` and sends `req` to that node's agent over its status socket.
fn ask_agent(
    path: &std::path::Path,
    req: &metrics::status::Request,
) -> Result<metrics::status::Reply, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    metrics::status::ask(&config.state_dir(), req).map_err(|e| e.to_string())
}

/// `value` as `table` lays it out, or as JSON; `what` names it in an error.
fn render<T: serde::Serialize>(
    output: cli::Output,
    value: &T,
    table: fn(&T) -> String,
    what: &str,
) -> Result<String, String> {
    match output {
        cli::Output::Table => Ok(table(value)),
        cli::Output::Json => serde_json::to_string_pretty(value)
            .map(|j| j + "\n")
            .map_err(|e| format!("cannot print {what}: {e}")),
    }
}

/// A socket command's end: its text on stdout, or its error on stderr and a failing exit.
fn finish(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(text) => {
            // A closed stdout (`| head`) is not worth a panic.
            let _ = std::io::stdout().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn start(args: StartArgs) -> ExitCode {
    let mut config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    config.single_node |= args.single_node;
    config.start_as_leader |= args.start_as_leader;
    info!(
        "kube-vip {} config loaded from {}: VIP {} on {}, {}",
        env!("CARGO_PKG_VERSION"),
        args.config.display(),
        config.vip,
        config.interface,
        if config.single_node {
            "single node"
        } else {
            "clustered"
        }
    );
    // The proxy's runtime first, so that its threads keep the nice value we started with.
    lb::limits::init_fd_budget();
    let proxy = match ProxyShards::start() {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the proxy runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    lb::set_proxy_runtimes(proxy.handles.clone());
    raise_priority(config.control_realtime_priority());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(CONTROL_THREADS)
        .thread_name("kv-control")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(config, args.disable_vip));
    // Every listener was stopped by the agent; what is left (health checks) just ends.
    proxy.stop();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Worker threads of the control runtime (Raft, lease, VIP, probe, announcer): little work, but
/// two so that one busy step (a Raft state write) never delays the lease timer.
const CONTROL_THREADS: usize = 2;

/// The runtimes proxied connections and health checks run on, apart from the control path's
/// and at the priority the process started with: a connection flood then competes with
/// ordinary work, not with the lease timer, and the raised priority does not tax the clients
/// and API servers that share the node's CPUs. One single-threaded runtime per CPU the process
/// may use ("shard"), each on its own thread with its own listener (see
/// `lb::RunningLb::start`): a connection stays on the thread that accepted it, as in HAProxy
/// (nbthread) and nginx. Each thread polls its own epoll whenever it runs out of work; with one
/// work-stealing runtime the two workers shared one, and events waited while the worker
/// holding it ran tasks: the machine sat idle 8-13 µs per connection under load, and the
/// shards made 1.04x its connections/s on a quiet machine (BENCHMARKS.md). The kernel still
/// moves a shard's thread to a free CPU when its own is busy; what is not moved is a
/// connection between shards. Made before [`raise_priority`]; every thread they start later
/// (blocking pool) resets its policy and priority to the process's.
struct ProxyShards {
    /// One handle per shard, for `lb`.
    handles: Vec<tokio::runtime::Handle>,
    /// Ends each shard's thread (its runtime and every task on it).
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    /// The shards' threads.
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ProxyShards {
    fn start() -> std::io::Result<ProxyShards> {
        // SAFETY: getpriority has no memory effects; who = 0 is this thread.
        let base = unsafe { nix::libc::getpriority(nix::libc::PRIO_PROCESS, 0) };
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut shards = ProxyShards {
            handles: Vec::with_capacity(n),
            stops: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
        };
        for _ in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .thread_name("kv-proxy")
                .on_thread_start(move || {
                    normal_policy();
                    // SAFETY: as above; lowering one's own priority (or keeping it) needs no
                    // privilege.
                    unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, base) };
                })
                .enable_all()
                .build()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            shards.handles.push(rt.handle().clone());
            shards.stops.push(stop);
            shards
                .threads
                .push(
                    std::thread::Builder::new()
                        .name("kv-proxy".into())
                        .spawn(move || {
                            rt.block_on(async move {
                                let _ = stopped.await;
                            });
                            // Every listener was stopped by the agent; what is left (health checks,
                            // the metrics server) just ends.
                            rt.shutdown_timeout(Duration::from_secs(1));
                        })?,
                );
        }
        Ok(shards)
    }

    /// Ends every shard and waits for its thread.
    fn stop(self) {
        drop(self.stops);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

async fn run(config: Config, disable_vip: bool) -> Result<(), Box<dyn std::error::Error>> {
    let (trigger, shutdown) = shutdown::channel();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutting down");
        trigger.fire();
    });
    // `/metrics`, `/healthz`, `/readyz` and the status socket answer clients from outside:
    // served on the proxy's runtime at normal priority, so a flood of scrapes competes with
    // proxied connections, never with the lease timer.
    let (c, s) = (config.clone(), shutdown.clone());
    lb::proxy_runtime()
        .spawn(async move { metrics::start(&c, s).await })
        .await??;
    if config.single_node {
        // SIGHUP must not stop the agent (see reload_keys_on_hangup).
        let _hangup = tokio::spawn(reload_keys_on_hangup(None));
        // Alone, this node is always entitled to the VIP; the sender lives as long as the agent.
        let (_role_tx, role_rx) = watch::channel(Leadership::now(Role::Leader));
        agent::run(config, disable_vip, role_rx, None, None, shutdown).await?;
        return Ok(());
    }
    run_clustered(config, disable_vip, shutdown).await
}

/// Clustered mode: Raft decides, the agent acts, and on SIGTERM the VIP goes before leadership
/// is handed over.
async fn run_clustered(
    config: Config,
    disable_vip: bool,
    shutdown: shutdown::Shutdown,
) -> Result<(), Box<dyn std::error::Error>> {
    // Before anything else: a VIP on our interface now was left by a killed earlier run, and
    // this node holds nothing by right until Raft says so.
    if !disable_vip {
        vip::remove_stale(&config.interface, config.vip).await?;
    }
    let local = config
        .local_peer
        .clone()
        .ok_or("localPeer is required unless singleNode is true")?;
    let peer = |p: &config::Peer| cluster::PeerInfo {
        id: p.id.clone(),
        addr: p.socket_addr(),
    };
    let keys = match &config.peer_key_file {
        None => None,
        Some(path) => {
            let (keys, warning) = cluster::auth::KeyRing::load(path)?;
            if let Some(w) = warning {
                log::warn!("{w}");
            }
            Some(cluster::auth::SharedKeys::new(keys))
        }
    };
    let reload = config.peer_key_file.clone().zip(keys.clone());
    let _hangup = tokio::spawn(reload_keys_on_hangup(reload));
    let settings = cluster::ClusterSettings {
        local: peer(&local),
        remotes: config.remote_peers.iter().map(peer).collect(),
        start_as_leader: config.start_as_leader,
        heartbeat_ms: config.heartbeat_ms(),
        election_timeout_min_ms: config.election_timeout_min_ms(),
        election_timeout_max_ms: config.election_timeout_max_ms(),
        state_dir: config.state_dir(),
        keys,
    };
    let gate = Arc::new(cluster::VoteGate::default());
    let cluster = cluster::Cluster::start(settings, gate.clone()).await?;
    info!(
        "joined cluster as {} ({}) with {} peer(s); state in {}",
        local.id,
        local.socket_addr(),
        config.remote_peers.len(),
        config.state_dir().display()
    );
    metrics::status::set_admin(cluster.admin());
    let role_rx = cluster.leadership();
    let result = agent::run(
        config,
        disable_vip,
        role_rx,
        Some(gate),
        Some(cluster.peers()),
        shutdown,
    )
    .await;
    // The agent has removed the VIP by now, so a successor may take it at once.
    if let Err(e) = cluster.hand_over_and_shutdown().await {
        error!("handover: {e}");
    }
    result?;
    Ok(())
}

/// Re-reads `peerKeyFile` on every SIGHUP (`systemctl reload`), so a key rotation step needs
/// no restart; a file that does not load leaves the current keys in place. Without a key file
/// SIGHUP only logs that there is nothing to reload (it must not stop the agent: an operator's
/// `systemctl reload` would drop the VIP). Switching between keyed and unkeyed needs a restart.
async fn reload_keys_on_hangup(
    reload: Option<(std::path::PathBuf, Arc<cluster::auth::SharedKeys>)>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        error!("cannot install a SIGHUP handler: peerKeyFile changes need a restart");
        return;
    };
    while hup.recv().await.is_some() {
        let Some((path, keys)) = &reload else {
            info!(
                "SIGHUP: no peerKeyFile configured, nothing to reload (adding one needs a restart)"
            );
            continue;
        };
        match cluster::auth::KeyRing::load(path) {
            Ok((ring, warning)) => {
                if let Some(w) = warning {
                    log::warn!("{w}");
                }
                info!(
                    "SIGHUP: reloaded peerKeyFile {} ({} key(s) accepted); new connections use it",
                    path.display(),
                    ring.len()
                );
                keys.replace(ring);
            }
            Err(e) => error!("SIGHUP: keeping the current peer keys: {e}"),
        }
    }
}

/// Nice value the agent asks for: ahead of ordinary work in its own cgroup, not real-time.
const NICE: i32 = -10;

/// Puts the calling thread, and with it every thread it starts afterwards (the control
/// runtime's workers and blocking pool), ahead of ordinary work, best effort: nice -10, then
/// `SCHED_RR` at `realtime` unless that is 0. Must run before the control runtime starts:
/// on Linux both are per thread and inherited by threads created later.
///
/// The VIP lease is only safe if the holder gets the CPU within the lease margin (tens of ms)
/// to renew it or remove the address. A nice value only ranks threads within one cgroup (or
/// autogroup, one login session): against other cgroups' threads, such as the API server's
/// pod, the agent competes as an equal. Measured with a second flooded cluster in another
/// session on 2 CPUs: at nice -10 the lease timer woke up to 1 s late and the lease lapsed in
/// 7 of 8 runs; with `SCHED_RR` never more than 8 ms late and no lapse (BENCHMARKS.md).
/// Real-time needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least `realtime`, and on kernels
/// with RT_GROUP_SCHED real-time runtime for the cgroup.
fn raise_priority(realtime: u8) {
    // Already there (a systemd unit's Nice=, say): asking again would only log a denial in a
    // sandbox without CAP_SYS_NICE. getpriority returns the nice value itself on Linux (glibc
    // and musl undo the kernel's 20-offset); errno is not needed since -1 is a valid answer here.
    // SAFETY: getpriority and setpriority have no memory effects; who = 0 is this thread.
    let current = unsafe { nix::libc::getpriority(nix::libc::PRIO_PROCESS, 0) };
    let nice = if current <= NICE {
        current
    } else if unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, NICE) } == 0 {
        NICE
    } else {
        log::warn!(
            "cannot raise scheduling priority to nice {NICE} ({})",
            std::io::Error::last_os_error()
        );
        current
    };
    if realtime == 0 {
        info!("control path at nice {nice} (controlRealtimePriority: 0)");
        return;
    }
    match set_policy(nix::libc::SCHED_RR, i32::from(realtime)) {
        Ok(()) => {
            info!("control path at real-time priority {realtime} (SCHED_RR), proxy at nice {nice}")
        }
        Err(e) => log::warn!(
            "cannot run the control path at real-time priority {realtime} ({e}; it needs \
             CAP_SYS_NICE or RLIMIT_RTPRIO >= {realtime}): running at nice {nice}, which ranks it \
             only within its own cgroup, so on a busy node the VIP lease may lapse"
        ),
    }
}

/// Sets the calling thread's scheduling policy. `pthread_setschedparam`, not
/// `sched_setscheduler`: musl leaves the latter unimplemented (POSIX makes it process-wide).
fn set_policy(policy: i32, priority: i32) -> std::io::Result<()> {
    // SAFETY: sched_param is plain data (musl adds fields for SCHED_SPORADIC: zero is right).
    let mut param: nix::libc::sched_param = unsafe { std::mem::zeroed() };
    param.sched_priority = priority;
    // SAFETY: pthread_self is always valid for the calling thread; param outlives the call.
    match unsafe { nix::libc::pthread_setschedparam(nix::libc::pthread_self(), policy, &param) } {
        0 => Ok(()),
        rc => Err(std::io::Error::from_raw_os_error(rc)),
    }
}

/// Back to the normal policy (a no-op unless created by a real-time thread); lowering one's
/// own policy needs no privilege, so the result is not checked.
fn normal_policy() {
    let _ = set_policy(nix::libc::SCHED_OTHER, 0);
}

/// Returns on SIGTERM or SIGINT. If a handler cannot be installed, returns at once: running on
/// without one would mean a `kill` leaves the VIP behind.
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
