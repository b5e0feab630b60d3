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
    /// Load and check the configuration, then print it with secrets hidden.
    CheckConfig(Flags),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BOSHMUX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
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
