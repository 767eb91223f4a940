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

/// The guest a process boots.
#[derive(Debug, Clone, Copy)]
pub struct Guest<'a> {
    /// The kernel: the bundled guest ELF.
    pub elf: &'a Path,
    /// Its command line, `tsc_khz=` included.
    pub cmdline: &'a str,
    /// RAM in MiB.
    pub mem_mib: u64,
}

/// What its log holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    /// Warnings and errors.
    Quiet,
    /// Also `info`: its events, with the seconds since it started.
    Events,
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
    /// Spawns `bin` booting `guest`, serial on stdout, API socket in
    /// `dir` under `name` (`--seccomp log`: its migration thread's filter
    /// lacks a call it makes).
    pub fn boot(bin: &Path, dir: &Path, name: &str, guest: &Guest, log: Log) -> anyhow::Result<Self> {
        let mut cmd = Self::command(bin, dir, name, log);
        cmd.arg("--kernel").arg(guest.elf).args(["--cmdline", guest.cmdline, "--cpus", "boot=1"]);
        cmd.args(["--memory", &format!("size={}M", guest.mem_mib), "--serial", "tty", "--console", "off"]);
        Self::spawn(cmd, dir, name)
    }

    /// Spawns `bin` with no VM, to restore or receive one into.
    pub fn bare(bin: &Path, dir: &Path, name: &str, log: Log) -> anyhow::Result<Self> {
        Self::spawn(Self::command(bin, dir, name, log), dir, name)
    }

    fn command(bin: &Path, dir: &Path, name: &str, log: Log) -> Command {
        let mut cmd = Command::new(bin);
        if log == Log::Events {
            cmd.arg("-v");
        }
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

    /// Sends the guest to the destination listening at `url`
    /// (`tcp:HOST:PORT` or `unix:PATH`), with its downtime goal
    /// `downtime_ms`; answered at once (the migration runs behind).
    pub fn send_migration(&self, url: &str, downtime_ms: u64) -> anyhow::Result<()> {
        let body = json!({"destination_url": url, "downtime_ms": downtime_ms});
        self.call("vm.send-migration", Some(&body.to_string()))
    }

    /// The seconds since it started at which its log first says `event`
    /// (e.g. `pausing`, `resumed`); `None` if it has not.
    pub fn event_secs(&self, event: &str) -> Option<f64> {
        event_secs(&self.proc.log(), event)
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

/// The seconds (since the process started) of the first log line of
/// `log` announcing `event`: "cloud-hypervisor:   4.203916s: <t> INFO:… --
/// Event: source = vm event = pausing ".
pub fn event_secs(log: &str, event: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.trim_end().ends_with(&format!("-- Event: source = vm event = {event}")))?;
    let secs = line.strip_prefix("cloud-hypervisor:")?.trim_start().split_once("s:")?.0;
    secs.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_from_its_log() {
        let log = "cloud-hypervisor:   4.203916s: <migration-worker> INFO:event_monitor/src/lib.rs:113 -- Event: \
                   source = vm event = pausing \n\
                   cloud-hypervisor:   4.205099s: <migration-worker> INFO:event_monitor/src/lib.rs:113 -- Event: \
                   source = vm event = paused \n";
        assert_eq!(event_secs(log, "pausing"), Some(4.203916));
        assert_eq!(event_secs(log, "paused"), Some(4.205099));
        assert_eq!(event_secs(log, "resumed"), None);
    }
}
