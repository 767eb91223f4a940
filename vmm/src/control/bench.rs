//! `smudge bench NAME [--json] [--quick] [--runs N] [--dir D]`: the
//! benchmarks are a crate of their own (`bench/`, the `smudge-bench`
//! binary), so the VMM does not carry them. This runs that binary, built
//! beside `smudge` (`cargo build --release` builds both), in place of this
//! process with the same arguments: its output, exit code and signals are
//! the command's.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

use crate::control::cli::BenchArgs;

/// The benchmarks' binary.
pub const BENCH_BINARY: &str = "smudge-bench";

/// Where the benchmarks' binary is: beside the running `smudge`.
pub fn binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the smudge binary")?;
    Ok(exe.with_file_name(BENCH_BINARY))
}

/// The arguments `args` came from, for `smudge-bench`.
pub fn command_line(args: &BenchArgs) -> Vec<std::ffi::OsString> {
    let mut line = vec![args.name.clone().into()];
    line.extend(args.json.then(|| "--json".into()));
    line.extend(args.quick.then(|| "--quick".into()));
    if let Some(n) = args.runs {
        line.extend(["--runs".into(), n.to_string().into()]);
    }
    if let Some(d) = &args.dir {
        line.extend(["--dir".into(), d.clone().into_os_string()]);
    }
    line
}

/// Runs the benchmark: becomes `smudge-bench` (returns only if it cannot).
pub fn run(args: &BenchArgs) -> anyhow::Result<u8> {
    let bench = binary()?;
    if !bench.is_file() {
        anyhow::bail!(
            "{}: missing: `smudge bench` runs the benchmarks' own binary, built beside smudge \
             (`cargo build --release --locked` builds both)",
            bench.display()
        );
    }
    let e = Command::new(&bench).args(command_line(args)).exec();
    Err(anyhow::Error::new(e).context(format!("running {}", bench.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `smudge-bench` gets what `smudge bench` was given, in its own words.
    #[test]
    fn the_arguments_pass_through() {
        let args = |json, quick, runs, dir: Option<&str>| BenchArgs {
            name: "snapshot".into(),
            json,
            quick,
            runs,
            dir: dir.map(PathBuf::from),
        };
        let line = |a: &BenchArgs| command_line(a).into_iter().map(|s| s.into_string().unwrap()).collect::<Vec<_>>();
        assert_eq!(line(&args(false, false, None, None)), ["snapshot"]);
        assert_eq!(
            line(&args(true, true, Some(3), Some("/tmp/b d"))),
            ["snapshot", "--json", "--quick", "--runs", "3", "--dir", "/tmp/b d"]
        );
    }
}
