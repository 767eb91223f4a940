//! A benchmark's setting: where it keeps its files, and the `smudge`
//! processes it starts (through the test kit, as the tests do).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use smudge::control::Client;

/// A benchmark's scratch directory: `--dir` if given (created if missing,
/// left as it is), else a new temporary directory removed when this is
/// dropped.
#[derive(Debug)]
pub enum Scratch {
    /// `--dir`.
    Given(PathBuf),
    /// A temporary directory of its own.
    Temporary(tempfile::TempDir),
}

impl Scratch {
    /// `dir`, or a new temporary directory.
    pub fn new(dir: Option<&Path>) -> anyhow::Result<Scratch> {
        match dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                Ok(Scratch::Given(d.to_path_buf()))
            }
            None => Ok(Scratch::Temporary(
                tempfile::Builder::new().prefix("smudge-bench-").tempdir().context("creating a temporary directory")?,
            )),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        match self {
            Scratch::Given(p) => p,
            Scratch::Temporary(t) => t.path(),
        }
    }
}

/// A command running the `smudge` binary beside this one (or `SMUDGE_BIN`).
pub fn smudge() -> anyhow::Result<Command> {
    Ok(Command::new(smudge_testkit::find_binary()?))
}

/// The arguments of `smudge run` of the bundled guest on `mem_file`
/// (`size` of RAM, guest command line `cmdline`), ending after `timeout`
/// seconds, its serial output on stdout.
pub fn run_args(mem_file: &Path, size: &str, cmdline: &str, timeout: u32) -> Vec<std::ffi::OsString> {
    let timeout = timeout.to_string();
    let args = ["run", "--mem-size", size, "--timeout", &timeout, "--serial", "-", "--cmdline", cmdline, "--mem-file"];
    args.iter().map(Into::into).chain([mem_file.as_os_str().to_owned()]).collect()
}

/// Starts `smudge run` ([`run_args`] and `extra`) with its control socket
/// at `sock`, and returns it once the socket is up, with a client of it.
/// Its serial output is dropped; its stderr goes to `stderr`.
pub fn start_vm(
    mem_file: &Path,
    sock: &Path,
    size: &str,
    cmdline: &str,
    timeout: u32,
    extra: &[&str],
    stderr: Stdio,
) -> anyhow::Result<(Child, Client)> {
    std::fs::remove_file(sock).ok();
    let mut cmd = smudge()?;
    cmd.args(run_args(mem_file, size, cmdline, timeout)).arg("--api-sock").arg(sock).args(extra);
    cmd.stdout(Stdio::null()).stderr(stderr);
    let child = smudge_testkit::spawn_with_api(&mut cmd, sock, smudge_testkit::WAIT)?;
    Ok((child, Client::new(sock)))
}
