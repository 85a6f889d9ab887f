//! The `lipstream` command line.
#![forbid(unsafe_code)]

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use lipstream::config::ServeArgs;

/// lipstream: real-time streaming lip-sync over WebRTC.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the page, WHIP/WHEP signalling and WebRTC media.
    Serve(ServeArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Cmd::Serve(args) => {
            let sub = matches.subcommand_matches("serve").unwrap_or(&matches);
            let config = args.resolve(sub)?;
            tokio::runtime::Runtime::new()?.block_on(lipstream::server::serve(config))
        }
    }
}
