//! The `boshmux` binary: parses the command line, sets up logging, and hands over to the library.

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use boshmux::config::{Config, Flags};

#[derive(Parser)]
#[command(
    version,
    about = "One XMPP session per user over BOSH, shared by all of the user's pages"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve(Flags),
    /// Run a self-contained demo: the daemon, a development XMPP server and a demo page.
    Demo {
        /// Address to serve the demo on.
        #[arg(long, default_value = "127.0.0.1:5380")]
        listen: std::net::SocketAddr,
        /// Extra accounts user1..userN (password pw-userN) for `boshmux load`.
        #[arg(long, default_value_t = 0)]
        accounts: usize,
        /// Only the development XMPP server (BOSH at http://LISTEN/http-bind), for a
        /// `boshmux serve` in another process.
        #[arg(long)]
        upstream_only: bool,
    },
    /// Load and check the configuration, then print it with secrets hidden.
    CheckConfig(Flags),
    /// Load-test a running daemon (or, with --direct, the XMPP server's BOSH directly).
    Load(boshmux::load::LoadArgs),
}

fn main() -> anyhow::Result<()> {
    // Logs on stderr, as the README says: stdout carries what a command prints (check-config's
    // settings, load's report).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BOSHMUX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Serve(flags) => {
            let cfg = Config::load(&flags, std::env::vars()).context("configuration")?;
            let listen = cfg.listen;
            let state = boshmux::server::build(cfg)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("listen on {listen}"))?;
                tracing::info!(%listen, "serving");
                boshmux::server::run(listener, state, stop_signal()).await?;
                Ok(())
            })
        }
        Command::Demo {
            listen,
            accounts,
            upstream_only,
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            if upstream_only {
                runtime.block_on(boshmux::demo::run_upstream(listen, accounts, stop_signal()))?;
            } else {
                runtime.block_on(boshmux::demo::run(listen, accounts, stop_signal()))?;
            }
            Ok(())
        }
        Command::Load(args) if args.failover_kills > 0 => {
            let runtime = tokio::runtime::Runtime::new()?;
            let report = runtime.block_on(boshmux::load::failover::run(args))?;
            println!("{report}");
            Ok(())
        }
        Command::Load(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            let report = runtime.block_on(boshmux::load::run(args))?;
            println!("{report}");
            Ok(())
        }
        Command::CheckConfig(flags) => {
            let cfg = Config::load(&flags, std::env::vars()).context("configuration")?;
            let mut shown = cfg;
            if shown.api_key.is_some() {
                shown.api_key = Some("<hidden>".into());
            }
            println!("{shown:#?}");
            Ok(())
        }
    }
}

/// Completes on SIGTERM or SIGINT.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stop requested");
}
