//! Driving Cloud Hypervisor: a process that boots its guest from its
//! command line (or starts bare, to restore one), paused, snapshotted and
//! resumed through its `/api/v1/` calls, or restored with its memory
//! copied or loaded on demand.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use super::PeerProcess;

/// A Cloud Hypervisor process and its API.
#[derive(Debug)]
pub struct CloudHypervisor {
    /// The process.
    pub proc: PeerProcess,
}

/// How `vm.restore` brings the memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryRestore {
    /// Copied in before the guest runs (its default).
    Copy,
    /// Faulted in on demand (userfaultfd).
    OnDemand,
}

impl CloudHypervisor {
    /// Spawns `bin` booting `elf` with `cmdline` on one vCPU and `mem_mib`
    /// of RAM, serial on stdout, API socket in `dir` under `name`
    /// (`--seccomp log`: its migration thread's filter lacks a call it
    /// makes).
    pub fn boot(bin: &Path, dir: &Path, name: &str, elf: &Path, cmdline: &str, mem_mib: u64) -> anyhow::Result<Self> {
        let mut cmd = Self::command(bin, dir, name);
        cmd.arg("--kernel").arg(elf).args(["--cmdline", cmdline, "--cpus", "boot=1"]);
        cmd.args(["--memory", &format!("size={mem_mib}M"), "--serial", "tty", "--console", "off"]);
        Self::spawn(cmd, dir, name)
    }

    /// Spawns `bin` with no VM, to restore one into.
    pub fn bare(bin: &Path, dir: &Path, name: &str) -> anyhow::Result<Self> {
        Self::spawn(Self::command(bin, dir, name), dir, name)
    }

    fn command(bin: &Path, dir: &Path, name: &str) -> Command {
        let mut cmd = Command::new(bin);
        let sock = dir.join(format!("{name}.ch.sock"));
        cmd.arg("--api-socket").arg(format!("path={}", sock.display())).args(["--seccomp", "log"]);
        cmd
    }

    fn spawn(cmd: Command, dir: &Path, name: &str) -> anyhow::Result<Self> {
        let (sock, log) = (dir.join(format!("{name}.ch.sock")), dir.join(format!("{name}.ch.log")));
        let proc = PeerProcess::spawn("cloud-hypervisor", cmd, &sock, &log)?;
        proc.wait_api()?;
        Ok(CloudHypervisor { proc })
    }

    fn call(&self, action: &str, body: Option<&str>) -> anyhow::Result<()> {
        self.proc.api("PUT", &format!("/api/v1/{action}"), body).map(drop)
    }

    /// Pauses the guest.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.call("vm.pause", None)
    }

    /// Resumes the guest.
    pub fn resume(&self) -> anyhow::Result<()> {
        self.call("vm.resume", None)
    }

    /// Snapshots the paused guest into the directory `dir`.
    pub fn snapshot(&self, dir: &Path) -> anyhow::Result<()> {
        let body = json!({"destination_url": format!("file://{}", dir.display())}).to_string();
        self.call("vm.snapshot", Some(&body))
    }

    /// Restores the snapshot in `dir` into this bare process (paused).
    pub fn restore(&self, dir: &Path, mode: MemoryRestore) -> anyhow::Result<()> {
        let url = format!("file://{}", dir.display());
        let body = match mode {
            MemoryRestore::Copy => json!({"source_url": url}),
            MemoryRestore::OnDemand => json!({"source_url": url, "memory_restore_mode": "OnDemand"}),
        };
        self.call("vm.restore", Some(&body.to_string()))
    }
}
