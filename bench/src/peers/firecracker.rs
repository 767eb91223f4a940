//! Driving Firecracker: one process per microVM, configured and started
//! through three API calls (`boot-source`, `machine-config`, `actions`),
//! paused, snapshotted (full or diff) and resumed, or restored from a
//! snapshot with its File memory backend (the memory file is mapped: pages
//! arrive on first touch).

use std::path::Path;
use std::process::Command;

use serde_json::json;

use super::PeerProcess;

/// A Firecracker process and its API.
#[derive(Debug)]
pub struct Firecracker {
    /// The process.
    pub proc: PeerProcess,
}

impl Firecracker {
    /// Spawns `bin` with its API socket and log in `dir` under `name`, and
    /// waits for the socket (`--enable-pci`: without it Firecracker
    /// appends `pci=off`, which the bundled guest refuses).
    pub fn spawn(bin: &Path, dir: &Path, name: &str) -> anyhow::Result<Firecracker> {
        let (sock, log) = (dir.join(format!("{name}.fc.sock")), dir.join(format!("{name}.fc.log")));
        std::fs::write(&log, b"")?;
        let mut cmd = Command::new(bin);
        cmd.arg("--api-sock").arg(&sock).arg("--enable-pci").arg("--log-path").arg(&log).args(["--level", "Warning"]);
        let proc = PeerProcess::spawn("firecracker", cmd, &sock, &dir.join(format!("{name}.fc.stderr")))?;
        proc.wait_api()?;
        Ok(Firecracker { proc })
    }

    /// Boots `elf` with `cmdline` on one vCPU and `mem_mib` of RAM, dirty
    /// page tracking on (diff snapshots need it).
    pub fn boot(&self, elf: &Path, cmdline: &str, mem_mib: u64) -> anyhow::Result<()> {
        let source = json!({"kernel_image_path": elf, "boot_args": cmdline}).to_string();
        self.proc.api("PUT", "/boot-source", Some(&source))?;
        let machine = json!({"vcpu_count": 1, "mem_size_mib": mem_mib, "track_dirty_pages": true}).to_string();
        self.proc.api("PUT", "/machine-config", Some(&machine))?;
        self.proc.api("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#))?;
        Ok(())
    }

    /// Pauses the vCPUs.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.proc.api("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).map(drop)
    }

    /// Resumes the vCPUs.
    pub fn resume(&self) -> anyhow::Result<()> {
        self.proc.api("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).map(drop)
    }

    /// Writes a snapshot of the paused VM: `diff` (pages dirtied since the
    /// last one) or full, its state to `state` and memory to `mem`.
    pub fn snapshot(&self, diff: bool, state: &Path, mem: &Path) -> anyhow::Result<()> {
        let kind = if diff { "Diff" } else { "Full" };
        let body = json!({"snapshot_type": kind, "snapshot_path": state, "mem_file_path": mem}).to_string();
        self.proc.api("PUT", "/snapshot/create", Some(&body)).map(drop)
    }

    /// Loads the snapshot `state` + `mem` into this (bare) process, its
    /// memory file mapped, and resumes the guest.
    pub fn load(&self, state: &Path, mem: &Path) -> anyhow::Result<()> {
        let body = json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true
        })
        .to_string();
        self.proc.api("PUT", "/snapshot/load", Some(&body)).map(drop)
    }
}
