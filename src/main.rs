//! kube-vip: virtual IP and control-plane load balancer. See README.md.

mod agent;
mod cli;
mod config;
mod lb;
mod shutdown;
mod vip;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use log::{error, info};
use tokio::sync::watch;

use agent::Role;
use cli::{Cli, Command, Sample, StartArgs};
use config::Config;

/// `info`, but netlink-proto's own warnings about dropped unsolicited messages are noise: we
/// close event sockets on purpose.
const DEFAULT_LOG_FILTER: &str = "info,netlink_proto=error";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut logger = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(DEFAULT_LOG_FILTER),
    );
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
        Command::Sample(Sample::Manifest(a)) => {
            print!("{}", cli::sample_manifest(&a));
            ExitCode::SUCCESS
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                eprintln!("{}: OK", config.display());
                print_yaml(&c.effective())
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Start(args) => start(args),
    }
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, args.disable_vip)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
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
    if !config.single_node {
        return Err("clustered mode (singleNode: false) needs the Raft cluster, which this build does not have yet; set singleNode: true".into());
    }
    // Alone, this node is always entitled to the VIP; the sender lives as long as the agent.
    let (_role_tx, role_rx) = watch::channel(Role::Leader);
    agent::run(config, disable_vip, role_rx, shutdown).await?;
    Ok(())
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
