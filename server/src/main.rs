//! The `lipstream` command line.
#![forbid(unsafe_code)]

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use std::path::PathBuf;

use lipstream::config::ServeArgs;
use lipstream_engines::presets::{self, Preset};

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
    /// Model checkpoints: make random-weight ones for tests and benchmarks.
    #[command(subcommand)]
    Models(ModelsCmd),
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// Write random-weight checkpoints in the upstream layout and formats (MuseTalk's models/).
    Synth {
        /// musetalk-1.5 (real sizes, ~4 GB) or tiny (same shapes in and out, few channels).
        #[arg(long)]
        preset: Preset,
        /// Output folder (created).
        #[arg(long)]
        out: PathBuf,
        /// Seed: the same seed writes the same weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
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
        Cmd::Models(ModelsCmd::Synth { preset, out, seed }) => {
            let started = std::time::Instant::now();
            presets::synth(preset, seed, &out, |path| {
                let mb = std::fs::metadata(path)
                    .map(|m| m.len() as f64 / 1e6)
                    .unwrap_or(0.0);
                eprintln!("wrote {} ({mb:.1} MB)", path.display());
            })?;
            eprintln!(
                "synthesised {preset:?} (seed {seed}) in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}
