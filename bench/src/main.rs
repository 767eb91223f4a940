//! `smudge-bench`: smudge's benchmarks, run by `smudge bench NAME [--json]
//! [--quick] [--runs N] [--dir D]` (which becomes this binary, built beside
//! `smudge`). Each prints a table, or with `--json` one object of raw
//! `results` and `goals` (ratios measured side by side in the same run).
//! They start `smudge` processes through the test kit and drive them
//! through the control API; `harvest` and `writeback` run the VMM in this
//! process, to time what it does at a guest's sync points.

#![forbid(unsafe_code)]

mod boot;
mod durable;
mod harvest;
mod migrate;
mod migrate_peers;
mod peers;
mod qemu_migrate;
mod reliability;
mod report;
mod setup;
mod snapshot;
mod snapshot_peers;
mod writeback;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use smudge_vmm::control::cli::BenchArgs;
use smudge_vmm::vm::outcome::EXIT_SETUP;

/// The command line: `smudge bench`'s own.
#[derive(Debug, Parser)]
#[command(name = "smudge bench", about = "Runs one of smudge's benchmarks")]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn main() -> ExitCode {
    // `smudge bench` checked the arguments already.
    let cli = Cli::parse();
    // Quiet, like every `smudge` command but `run` (SMUDGE_LOG overrides).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SMUDGE_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .log_internal_errors(false)
        .init();
    match run(&cli.args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "smudge: error: {e:#}");
            ExitCode::from(EXIT_SETUP)
        }
    }
}

fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let report = match args.name.as_str() {
        "boot" => boot::run(args)?,
        "harvest" => harvest::run(args)?,
        "writeback" => writeback::run(args)?,
        "snapshot" => snapshot::run(args)?,
        "migrate" => migrate::run(args)?,
        "reliability" => reliability::run(args)?,
        "durable" => durable::run(args)?,
        "durable-parts" => durable::run_parts(args)?,
        other => anyhow::bail!(
            "unknown benchmark '{other}' (available: boot, harvest, writeback, snapshot, migrate, reliability, durable, durable-parts)"
        ),
    };
    report.print(args.json)
}
