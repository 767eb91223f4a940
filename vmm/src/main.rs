//! The `smudge` binary: the command-line edge of the VMM.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use smudge_vmm::bench;
use smudge_vmm::cli::{Cli, Command, RunArgs};
use smudge_vmm::guest_image::{DEFAULT_CMDLINE, GUEST_ELF};
use smudge_vmm::outcome::EXIT_SETUP;
use smudge_vmm::vm::{self, VmConfig};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_SETUP } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SMUDGE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        // A closed stderr must not panic a vCPU thread that logs.
        .log_internal_errors(false)
        .init();
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "smudge: error: {e:#}");
            ExitCode::from(EXIT_SETUP)
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Run(args) => run(args),
        Command::ExportGuest { path } => {
            std::fs::write(&path, GUEST_ELF).with_context(|| format!("writing {}", path.display()))?;
            Ok(0)
        }
        Command::Bench(args) => {
            let report = match args.name.as_str() {
                "boot" => bench::boot::run(&args)?,
                other => anyhow::bail!("unknown benchmark '{other}' (available: boot)"),
            };
            report.print(args.json)?;
            Ok(0)
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<u8> {
    let (guest_elf, cmdline) = match &args.guest {
        Some(p) => (
            std::fs::read(p).with_context(|| format!("reading guest kernel {}", p.display()))?,
            args.cmdline.clone().unwrap_or_default(),
        ),
        None => (GUEST_ELF.to_vec(), args.cmdline.clone().unwrap_or_else(|| DEFAULT_CMDLINE.to_string())),
    };
    let serial: Box<dyn Write + Send> = if args.serial == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(File::create(&args.serial).with_context(|| format!("creating serial output {}", args.serial))?)
    };
    if !(args.timeout >= 0.0 && args.timeout.is_finite()) {
        anyhow::bail!("--timeout must be a number of seconds >= 0");
    }
    let cfg = VmConfig {
        mem_file: args.mem_file.clone(),
        mem_size: args.mem_size,
        guest_elf,
        cmdline,
        vcpus: args.vcpus,
        serial,
        timeout: (args.timeout > 0.0).then(|| Duration::from_secs_f64(args.timeout)),
        tick: Duration::from_millis(args.tick_ms.max(1)),
        hugepages: args.hugepages,
        dirty_log: !args.no_dirty_log,
        kvm_dev: args.kvm_dev.clone(),
    };
    let report = vm::run(cfg)?;
    let dirty = match report.guest_dirty_pages {
        Some(n) => format!("{n} pages dirtied by the guest (KVM log)"),
        None => "dirty logging off".to_string(),
    };
    let _ = writeln!(
        std::io::stderr(),
        "smudge: {} after {:.3} s; RAM {} MiB in {}{}; {dirty}, {} by the VMM",
        report.outcome,
        report.elapsed.as_secs_f64(),
        args.mem_size >> 20,
        args.mem_file.display(),
        if report.created_mem_file { " (created)" } else { "" },
        report.vmm_dirty_pages,
    );
    Ok(report.outcome.exit_code())
}
