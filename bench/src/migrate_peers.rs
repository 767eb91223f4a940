//! The peer's side of `smudge bench migrate`: Cloud Hypervisor migrating
//! the same guest ELF and workload over loopback TCP or a unix socket
//! (`vm.send-migration` to a second process in `vm.receive-migration`),
//! with the same downtime goal as smudge's, sent once the guest's serial
//! output says its working set is ready and the warm-up has passed after
//! that. Firecracker offers no live migration.
//!
//! Its downtime is taken between the same kind of moments as smudge's
//! `stop_to_running_ms`: the source's `pausing` event to the destination's
//! `resumed` event. Each comes from its process' log as seconds since that
//! process started, placed on this process' clock at the moment it was
//! spawned (both are spawned the same way, so the start-up offset they
//! leave out is alike at either end).

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde_json::json;

use crate::peers::cloud_hypervisor::{CloudHypervisor, Guest, Log};
use crate::peers::{http, WORKING_SET_READY};

/// What the downtime figure brackets.
pub const DOWNTIME_BRACKETS: &str = "the source's 'pausing' event to the destination's 'resumed' event (each from its \
                                     log, seconds since that process started, placed at its spawn on this process' \
                                     clock)";
/// What the total time brackets.
pub const TOTAL_BRACKETS: &str = "vm.send-migration sent to the destination's 'resumed' event";

/// One migration's figures (ms).
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    /// `vm.send-migration` sent to the destination running.
    pub total_ms: f64,
    /// Source pausing to destination running.
    pub downtime_ms: f64,
    /// The downtime the source's log reports (its own measure).
    pub reported_downtime_ms: f64,
}

/// How the two ends of a migration are linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Loopback TCP.
    Tcp,
    /// A unix stream socket in the scratch directory.
    Unix,
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Tcp => "TCP",
            Link::Unix => "unix socket",
        })
    }
}

impl Link {
    /// Where a destination listens over this link (`tcp:`/`unix:` URLs
    /// as Cloud Hypervisor takes them; smudge's `unix:PATH` is the same).
    pub fn url(self, dir: &Path, name: &str) -> anyhow::Result<String> {
        Ok(match self {
            Link::Tcp => format!("tcp:127.0.0.1:{}", free_port()?),
            Link::Unix => {
                let p = dir.join(format!("{name}.sock"));
                std::fs::remove_file(&p).ok();
                format!("unix:{}", p.display())
            }
        })
    }
}

/// The migration's setting.
#[derive(Debug, Clone)]
pub struct Case<'a> {
    /// The peer's binary.
    pub bin: &'a Path,
    /// Where its sockets and logs go.
    pub dir: &'a Path,
    /// The guest ELF.
    pub elf: &'a Path,
    /// The guest's command line, `tsc_khz=` included.
    pub cmdline: &'a str,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// How long the guest's workload runs before the migration, counted
    /// from its serial line saying its working set is ready.
    pub warm: Duration,
    /// The downtime goal given to it (ms).
    pub downtime_ms: u64,
    /// TCP or a unix socket.
    pub link: Link,
}

/// A loopback TCP port free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?.local_addr()?.port())
}

/// One Cloud Hypervisor migration over `case.link`.
pub fn migrate_once(case: &Case) -> anyhow::Result<Figures> {
    let mut dst = CloudHypervisor::bare(case.bin, case.dir, "ch-dst", Log::Events)?;
    let guest = Guest { elf: case.elf, cmdline: case.cmdline, mem_mib: case.mem_mib };
    let mut src = CloudHypervisor::boot(case.bin, case.dir, "ch-src", &guest, Log::Events)?;
    src.proc.wait_serial_line(WORKING_SET_READY)?;
    std::thread::sleep(case.warm);
    let url = case.link.url(case.dir, "ch-migration")?;
    // The receiving call is answered once the guest arrived.
    let (sock, body) = (dst.proc.sock.clone(), json!({"receiver_url": url}).to_string());
    let limit = Duration::from_secs(600);
    let receiver =
        std::thread::spawn(move || http::request(&sock, "PUT", "/api/v1/vm.receive-migration", Some(&body), limit));
    dst.proc.wait_log("migration-receive-ready")?;
    let t0 = Instant::now();
    src.send_migration(&url, case.downtime_ms)?;
    let answer = receiver.join().map_err(|_| anyhow!("the receiving thread panicked"))?;
    let answer = answer.map_err(|e| dst.proc.fail(&format!("vm.receive-migration: {e:#}")))?;
    if !answer.is_success() {
        return Err(dst.proc.fail(&format!("vm.receive-migration answered {} {}", answer.status, answer.body)));
    }
    src.proc.wait_log("Migration completed")?;
    let reported = reported_downtime(&src.proc.log()).ok_or_else(|| src.proc.fail("no downtime in its log"))?;
    let pausing = src.event_secs("pausing").ok_or_else(|| src.proc.fail("no 'pausing' event in its log"))?;
    let resumed = dst.event_secs("resumed").ok_or_else(|| dst.proc.fail("no 'resumed' event in its log"))?;
    // On this process' clock, in seconds after t0.
    let at = |spawned: Instant, secs: f64| secs_between(t0, spawned) + secs;
    let (paused_at, resumed_at) = (at(src.proc.spawned, pausing), at(dst.proc.spawned, resumed));
    Ok(Figures {
        total_ms: resumed_at * 1e3,
        downtime_ms: (resumed_at - paused_at) * 1e3,
        reported_downtime_ms: reported,
    })
}

/// `b` - `a` in seconds, negative when `b` came first.
fn secs_between(a: Instant, b: Instant) -> f64 {
    match b.checked_duration_since(a) {
        Some(d) => d.as_secs_f64(),
        None => -a.duration_since(b).as_secs_f64(),
    }
}

/// The downtime Cloud Hypervisor's source logs: "Migration completed after
/// 1.7s with a downtime of 88ms".
pub fn reported_downtime(log: &str) -> Option<f64> {
    let rest = log.split("with a downtime of ").nth(1)?;
    rest.split("ms").next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reported_downtime_is_read_from_the_log() {
        let log = "cloud-hypervisor:   4.291943s: <migration-worker> INFO:vmm/src/lib.rs:1793 -- Migration completed \
                   after 1.7s with a downtime of 88ms (goal was 300ms)\n";
        assert_eq!(reported_downtime(log), Some(88.0));
        assert_eq!(reported_downtime("Migration completed"), None);
    }
}
