//! The peers' side of `smudge bench snapshot`: Firecracker and Cloud
//! Hypervisor run the same guest ELF and workload on the same RAM size as
//! smudge's case, and are snapshotted and restored the way their users do
//! it (pause, snapshot, resume through their APIs; a new process loading
//! the snapshot). Each figure is taken by this process between the moments
//! its row's `brackets` names; a peer whose binary is absent gets rows that
//! say so and no goals.

use std::path::Path;
use std::time::{Duration, Instant};

use smudge_vmm::vm::guest_image::GUEST_ELF;

use crate::peers::cloud_hypervisor::{CloudHypervisor, Guest, Log, MemoryRestore};
use crate::peers::firecracker::Firecracker;
use crate::peers::{tsc_khz, Peer, NOT_FOUND};
use crate::report::{median, Report};

/// What the peers' snapshot pauses bracket.
const FC_PAUSE: &str = "PATCH /vm Paused sent to PATCH /vm Resumed answered (snapshot/create between)";
const CH_PAUSE: &str = "vm.pause sent to vm.resume answered (vm.snapshot between)";
const FC_RESTORE: &str =
    "process spawn to PUT /snapshot/load (File backend: memory file mapped, resume_vm true) answered";
const CH_RESTORE: &str = "process spawn to vm.restore then vm.resume answered";

/// The case smudge ran, for the peers to run the same.
#[derive(Debug, Clone)]
pub struct Case<'a> {
    /// Where the peers' files go.
    pub dir: &'a Path,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// The guest's command line, as smudge was given it.
    pub cmdline: &'a str,
    /// How long the guest runs before the full snapshot.
    pub warm: Duration,
    /// Diff snapshots after the full one, one a second.
    pub diffs: usize,
    /// Restores to take the median of.
    pub restores: u32,
    /// Row prefix, e.g. "1 GiB".
    pub label: &'a str,
}

/// smudge's figures of the same case, for the goals.
#[derive(Debug, Clone, Copy)]
pub struct Smudge {
    /// Full snapshot pause (ms).
    pub full_pause: f64,
    /// Live full snapshot pause (ms), if one was taken.
    pub live_pause: Option<f64>,
    /// Diff snapshot pause (ms), median.
    pub diff_pause: f64,
    /// Default (eager) restore, until the guest runs (ms).
    pub restore_runs: f64,
}

/// Runs both peers on `case` (those found), adding their rows and the
/// goals against `smudge` to `rep`.
pub fn run(case: &Case, smudge: Smudge, rep: &mut Report) -> anyhow::Result<()> {
    let (fc, ch) = (Peer::Firecracker.find(), Peer::CloudHypervisor.find());
    if fc.is_none() && ch.is_none() {
        for peer in [Peer::Firecracker, Peer::CloudHypervisor] {
            rep.missing(&format!("{}, {}", peer.label(), case.label), "pause_ms, restore_ms", NOT_FOUND);
        }
        return Ok(());
    }
    let elf = case.dir.join("peer-guest.elf");
    std::fs::write(&elf, GUEST_ELF)?;
    let cmdline = format!("{} tsc_khz={}", case.cmdline, tsc_khz()?);
    let case = Case { cmdline: &cmdline, ..case.clone() };
    match fc {
        Some(bin) => firecracker(&bin, &elf, &case, smudge, rep)?,
        None => rep.missing(&format!("Firecracker, {}", case.label), "pause_ms, restore_ms", NOT_FOUND),
    }
    match ch {
        Some(bin) => cloud_hypervisor(&bin, &elf, &case, smudge, rep)?,
        None => rep.missing(&format!("Cloud Hypervisor, {}", case.label), "pause_ms, restore_ms", NOT_FOUND),
    }
    Ok(())
}

/// smudge's live full snapshot pause against `peer`'s full pause `full`
/// (informational: the goal is on the default, paused one).
fn live_ratio(rep: &mut Report, smudge: Smudge, peer: &str, full: f64) {
    if let Some(live) = smudge.live_pause {
        rep.result(&format!("full snapshot pause: smudge live / {peer} (informational)"), "ratio", live / full);
    }
}

fn ms_since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

/// Firecracker: full snapshot, diffs one a second, restores of the full one.
fn firecracker(bin: &Path, elf: &Path, case: &Case, smudge: Smudge, rep: &mut Report) -> anyhow::Result<()> {
    let dir = case.dir;
    let snap = |name: &str| (dir.join(format!("fc-{name}.state")), dir.join(format!("fc-{name}.mem")));
    let (full_state, full_mem) = snap("full");
    let (full, diffs) = {
        let mut vm = Firecracker::spawn(bin, dir, "fc-snap")?;
        vm.boot(elf, case.cmdline, case.mem_mib)?;
        vm.proc.first_byte()?;
        std::thread::sleep(case.warm);
        let paused = |vm: &Firecracker, diff: bool, state: &Path, mem: &Path| -> anyhow::Result<f64> {
            let t0 = Instant::now();
            vm.pause()?;
            vm.snapshot(diff, state, mem)?;
            vm.resume()?;
            Ok(ms_since(t0))
        };
        let full = paused(&vm, false, &full_state, &full_mem)?;
        let mut diffs = Vec::new();
        for i in 0..case.diffs {
            std::thread::sleep(Duration::from_secs(1));
            let (state, mem) = snap(&format!("diff-{i}"));
            diffs.push(paused(&vm, true, &state, &mem)?);
            std::fs::remove_file(&state).ok();
            std::fs::remove_file(&mem).ok();
        }
        (full, median(&diffs))
    };
    let mut restores = Vec::new();
    for _ in 0..case.restores {
        let vm = Firecracker::spawn(bin, dir, "fc-restore")?;
        vm.load(&full_state, &full_mem)?;
        restores.push(ms_since(vm.proc.spawned));
        // Still there, and running: the state it reports.
        let info = vm.proc.api("GET", "/", None)?;
        if !info.body.contains("\"Running\"") {
            return Err(vm.proc.fail(&format!("restored, but not running: {}", info.body)));
        }
    }
    std::fs::remove_file(&full_state).ok();
    std::fs::remove_file(&full_mem).ok();
    let restore = median(&restores);
    let label = format!("Firecracker, {}", case.label);
    rep.bracketed(&format!("{label}: full snapshot"), "pause_ms", full, FC_PAUSE);
    rep.bracketed(&format!("{label}: diff snapshot after 1 s"), "pause_ms", diffs, FC_PAUSE);
    rep.bracketed(&format!("{label}: restore of the full snapshot"), "running_ms", restore, FC_RESTORE);
    rep.goal("full snapshot pause: smudge / Firecracker", smudge.full_pause / full, 0.05, "lower");
    live_ratio(rep, smudge, "Firecracker", full);
    rep.goal("diff snapshot pause: smudge / Firecracker", smudge.diff_pause / diffs, 0.05, "lower");
    rep.goal(
        "restore until the guest runs: smudge (default) / Firecracker",
        smudge.restore_runs / restore,
        1.0,
        "lower",
    );
    Ok(())
}

/// Cloud Hypervisor: a full snapshot, restored with memory copied and on
/// demand.
fn cloud_hypervisor(bin: &Path, elf: &Path, case: &Case, smudge: Smudge, rep: &mut Report) -> anyhow::Result<()> {
    let dir = case.dir;
    let snapshot = dir.join("ch-full");
    std::fs::remove_dir_all(&snapshot).ok();
    std::fs::create_dir_all(&snapshot)?;
    let full = {
        let guest = Guest { elf, cmdline: case.cmdline, mem_mib: case.mem_mib };
        let mut vm = CloudHypervisor::boot(bin, dir, "ch-snap", &guest, Log::Quiet)?;
        vm.proc.first_byte()?;
        std::thread::sleep(case.warm);
        let t0 = Instant::now();
        vm.pause()?;
        vm.snapshot(&snapshot)?;
        vm.resume()?;
        ms_since(t0)
    };
    let label = format!("Cloud Hypervisor, {}", case.label);
    rep.bracketed(&format!("{label}: full snapshot"), "pause_ms", full, CH_PAUSE);
    rep.goal("full snapshot pause: smudge / Cloud Hypervisor", smudge.full_pause / full, 0.05, "lower");
    live_ratio(rep, smudge, "Cloud Hypervisor", full);
    for (mode, name) in [(MemoryRestore::Copy, "memory copied"), (MemoryRestore::OnDemand, "OnDemand")] {
        let mut restores = Vec::new();
        for _ in 0..case.restores {
            let vm = CloudHypervisor::bare(bin, dir, "ch-restore", Log::Quiet)?;
            vm.restore(&snapshot, mode)?;
            vm.resume()?;
            restores.push(ms_since(vm.proc.spawned));
            let info = vm.proc.api("GET", "/api/v1/vm.info", None)?;
            if !info.body.contains("\"Running\"") {
                return Err(vm.proc.fail(&format!("restored, but not running: {}", info.body)));
            }
        }
        let restore = median(&restores);
        rep.bracketed(&format!("{label}: restore, {name}"), "running_ms", restore, CH_RESTORE);
        if mode == MemoryRestore::OnDemand {
            let goal = "restore until the guest runs: smudge (default) / Cloud Hypervisor OnDemand";
            rep.goal(goal, smudge.restore_runs / restore, 1.0, "lower");
        }
    }
    std::fs::remove_dir_all(&snapshot).ok();
    Ok(())
}
