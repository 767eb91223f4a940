//! `smudge bench snapshot`: a guest writing ~5 % of its pages per second on
//! 1 GiB (64 MiB with --quick), snapshotted through the control API of a
//! real `smudge run`, in one invocation: the full-snapshot pause; the
//! diff-snapshot pause with background writeback off and on; a live full
//! snapshot's pause against the paused one's; restore (time to first
//! instruction, time to fully loaded against a sequential read of the
//! chain's data, time until the new memory file is complete; copying first
//! as without userfaultfd; `--lazy`);
//! and how many diff snapshots per second can be sustained, with the share
//! of time the guest spends paused (its slowdown bound). Then the peers
//! (Firecracker, Cloud Hypervisor) on the same guest, workload and RAM,
//! when their binaries are found ([`crate::snapshot_peers`]).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use smudge::control::{Client, Request, SnapshotRequest};
use smudge_vmm::control::cli::BenchArgs;

use crate::report::{median, Report};
use crate::setup::{smudge, start_vm, Scratch};
use crate::snapshot_peers;

/// What smudge's pause figures bracket.
const SMUDGE_PAUSE: &str = "smudge's own pause_ms: its vCPUs stopped to its vCPUs running again";
/// What smudge's restore figure brackets.
const SMUDGE_RESTORE: &str = "smudge restore's process start to its vCPU entering the guest (its stderr line \
                              \"the guest runs N ms after smudge started\")";

/// A `smudge run` of the benchmark's guest, and its control API.
struct Vm {
    child: Child,
    api: Client,
}

impl Vm {
    fn start(dir: &Path, name: &str, mem: &str, cmdline: &str, extra: &[&str]) -> anyhow::Result<Vm> {
        let (sock, mem_file) = (dir.join(format!("{name}.sock")), dir.join(format!("{name}.mem")));
        std::fs::remove_file(&mem_file).ok();
        let (child, api) = start_vm(&mem_file, &sock, mem, cmdline, 600, extra, Stdio::null())
            .with_context(|| format!("{name}: starting smudge"))?;
        Ok(Vm { child, api })
    }

    fn call(&self, req: Request) -> anyhow::Result<Value> {
        let v = self.api.call(&req)?;
        if v["ok"] != true {
            bail!("{req:?}: {v}");
        }
        Ok(v)
    }

    /// Takes a snapshot; returns its pause (ms) and memory bytes written.
    fn snapshot(&self, dir: &Path, parent: Option<&Path>) -> anyhow::Result<(f64, f64)> {
        let req = SnapshotRequest { parent: parent.map(Path::to_path_buf), ..SnapshotRequest::full(dir) };
        let v = self.call(Request::Snapshot(req))?;
        Ok((v["pause_ms"].as_f64().context("no pause_ms")?, v["memory_bytes"].as_f64().context("no memory_bytes")?))
    }

    fn stop(mut self) {
        let _ = self.call(Request::Stop);
        let _ = self.child.wait();
    }
}

/// Runs the benchmark.
pub fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let scratch = Scratch::new(args.dir.as_deref())?;
    let dir = scratch.path();
    let (mem, mem_mib, pages, warm, label) =
        if args.quick { ("64M", 64, 15000u64, 1500u64, "64 MiB") } else { ("1G", 1024, 260000, 6000, "1 GiB") };
    // ~5 % of the pages per second, over a working set written once first.
    let rate = pages / 20;
    let cmdline = format!("workload=rate rate={rate} pages={pages} seed=11 ms=600000 wipe=1");
    let diffs = args.runs.unwrap_or(if args.quick { 2 } else { 4 });
    let mut rep = Report::new("snapshot");

    let mut pauses = Vec::new();
    let (mut full_paused, mut live_pause) = (Vec::new(), None);
    let mut last = None;
    for (case, extra) in [
        ("background writeback off", &["--no-writeback", "--snapshot-precopy-ms", "0"][..]),
        ("background writeback on", &[][..]),
    ] {
        let vm = Vm::start(dir, "snap", mem, &cmdline, extra)?;
        std::thread::sleep(Duration::from_millis(warm));
        let full = dir.join(format!("full-{}", pauses.len()));
        std::fs::remove_dir_all(&full).ok();
        let (full_ms, _) = vm.snapshot(&full, None)?;
        let mut parent = full.clone();
        let (mut d, mut bytes) = (Vec::new(), Vec::new());
        for i in 0..diffs {
            std::thread::sleep(Duration::from_secs(1));
            let next = dir.join(format!("diff-{}-{i}", pauses.len()));
            std::fs::remove_dir_all(&next).ok();
            let (ms, b) = vm.snapshot(&next, Some(&parent))?;
            d.push(ms);
            bytes.push(b / (1 << 20) as f64);
            parent = next;
        }
        rep.bracketed(&format!("{label}, {case}: full snapshot"), "pause_ms", full_ms, SMUDGE_PAUSE);
        if !extra.is_empty() {
            full_paused.push(full_ms);
        } else {
            full_paused.push(full_ms);
            live_pause = Some(live_full(&vm, dir, &mut rep, &format!("{label}, {case}: live full snapshot"))?);
        }
        rep.bracketed(&format!("{label}, {case}: diff snapshot after 1 s"), "pause_ms", median(&d), SMUDGE_PAUSE);
        rep.result(&format!("{label}, {case}: diff snapshot after 1 s"), "diff_mib", median(&bytes));
        pauses.push((full_ms, median(&d)));
        last = Some(parent);
        vm.stop();
    }
    let (full_off, diff_off) = pauses[0];
    let (_, diff_on) = pauses[1];
    rep.goal("diff pause (background writeback on) / full pause", diff_on / full_off, 0.05, "lower");
    rep.goal("diff pause (background on) / diff pause (background off)", diff_on / diff_off, 0.2, "lower");
    if let Some(live) = live_pause {
        // Against the shorter of the two paused full snapshots of this run
        // (how much of the file the page cache holds varies between them).
        let full = full_paused.iter().copied().fold(f64::INFINITY, f64::min);
        rep.goal("live full snapshot pause / paused full snapshot pause", live / full, 0.05, "lower");
    }

    // Restore: the chain of the second run into a new process, eager
    // (memory first) and lazy (guest first, memory behind it).
    let chain = last.context("no snapshot chain")?;
    let restores = if args.quick { 1 } else { 3 };
    let case = format!("{label}: restore of a full + {diffs} diffs chain");
    let restore_runs = restore(dir, &mut rep, &case, &chain, restores)?;

    // The peers, on the same guest, workload and RAM.
    let (full_pause, diff_pause) = pauses[1];
    let case = snapshot_peers::Case {
        dir,
        mem_mib,
        cmdline: &cmdline,
        warm: Duration::from_millis(warm),
        diffs,
        restores,
        label,
    };
    snapshot_peers::run(&case, snapshot_peers::Smudge { full_pause, live_pause, diff_pause, restore_runs }, &mut rep)?;

    // Moonshot: diff snapshots back to back; the guest runs between them,
    // so the share of time it spends paused bounds its slowdown. The disk
    // first writes back what the cases above left dirty (GiBs of images):
    // an fsync would wait for it otherwise, and that is not this case's cost.
    // With background writeback on, the disk takes the guest's writes twice
    // (memory file and diffs); off, the chain is the only copy (Remus's and
    // Firecracker's way).
    let window = Duration::from_secs(if args.quick { 1 } else { 5 });
    for (case, extra) in [("background writeback on", &[][..]), ("background writeback off", &["--no-writeback"][..])] {
        drain_disk()?;
        let (per_s, paused) = back_to_back(dir, mem, &cmdline, warm, window, extra)?;
        rep.result(&format!("{label}, {case}: diff snapshots back to back"), "snapshots_per_s", per_s);
        rep.result(&format!("{label}, {case}: share of time the guest was paused meanwhile"), "ratio", paused);
    }
    Ok(rep)
}

/// A live full snapshot of `vm` into `dir`: its figures go to `rep` as
/// `case`; returns its pause (ms).
fn live_full(vm: &Vm, dir: &Path, rep: &mut Report, case: &str) -> anyhow::Result<f64> {
    let live = dir.join("live-full");
    std::fs::remove_dir_all(&live).ok();
    let t0 = Instant::now();
    let v = vm.call(Request::Snapshot(SnapshotRequest::live(&live)))?;
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let ms = v["pause_ms"].as_f64().context("no pause_ms")?;
    rep.result(case, "pause_ms", ms);
    rep.result(case, "total_ms", total_ms);
    rep.result(case, "pause_copied_mib", v["pause_copied_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64);
    std::fs::remove_dir_all(&live).ok();
    Ok(ms)
}

/// Restores `chain` into a new process `runs` times by default (the guest
/// first, RAM filled behind it, the new memory file on disk built beside
/// it), against a sequential read of the chain's data in the same run;
/// then once copying first (what smudge does without userfaultfd) and
/// once `--lazy` (tmpfs). Figures go to `rep` as `case`. Returns the
/// default restore's median time to first instruction (ms).
fn restore(dir: &Path, rep: &mut Report, case: &str, chain: &Path, runs: u32) -> anyhow::Result<f64> {
    drain_disk()?;
    let read_ms = sequential_read(chain)?;
    rep.bracketed(
        &format!("{case}: sequential read of the snapshot's data"),
        "read_ms",
        read_ms,
        "1 MiB preads of the full image's data ranges and every diff's memory.diff",
    );
    let (mut ttfi, mut loaded, mut complete) = (Vec::new(), Vec::new(), Vec::new());
    let mem_file = dir.join("restored.mem");
    for _ in 0..runs {
        std::fs::remove_file(&mem_file).ok();
        let err = restore_until(chain, &mem_file, &["--timeout", "60"], "holds the snapshot's memory")?;
        let ms = |marker: &str| ms_before(&err, marker).with_context(|| format!("no {marker:?} in: {err}"));
        ttfi.push(ms("restore: the guest runs ")?);
        loaded.push(ms("restore fully loaded ")?);
        complete.push(ms("synced) ")?);
    }
    std::fs::remove_file(&mem_file).ok();
    let (ttfi, loaded) = (median(&ttfi), median(&loaded));
    rep.bracketed(&format!("{case}, default"), "first_instruction_ms", ttfi, SMUDGE_RESTORE);
    rep.result(&format!("{case}, default"), "fully_loaded_ms", loaded);
    rep.result(&format!("{case}, default"), "memory_file_complete_ms", median(&complete));
    rep.goal("restore: fully loaded / sequential read of the snapshot's data", loaded / read_ms, 2.0, "lower");

    // Copying first (no userfaultfd): the guest runs once the memory file
    // holds the chain.
    let out = restore_command(chain, &mem_file, &["--test-no-userfaultfd", "--timeout", "0.2"])?.output()?;
    // Exit 103: the restored guest was still running at the timeout.
    if out.status.code() != Some(103) {
        bail!("restore ended with {:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let copied = ms_before(&err, "restore: the guest runs ").context("no copy-first time to first instruction")?;
    rep.bracketed(&format!("{case}, copy first (no userfaultfd)"), "first_instruction_ms", copied, SMUDGE_RESTORE);
    std::fs::remove_file(&mem_file).ok();
    rep.goal("restore: time to first instruction, default / copy first", ttfi / copied, 0.1, "lower");

    let (lazy_ttfi, lazy_loaded) = lazy_restore(chain)?;
    rep.result(&format!("{case}, --lazy (tmpfs)"), "first_instruction_ms", lazy_ttfi);
    rep.result(&format!("{case}, --lazy (tmpfs)"), "fully_loaded_ms", lazy_loaded);
    Ok(ttfi)
}

/// Reads the data of the chain ending at `chain` once, as a restore must:
/// the full image's data ranges and every diff's pages. Returns ms.
fn sequential_read(chain: &Path) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt;
    let links = smudge::snapshot::chain_lazily(chain)?;
    let t0 = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    for (i, (d, m)) in links.iter().enumerate() {
        let name = if i == 0 { "memory.img" } else { "memory.diff" };
        let f = std::fs::File::open(d.join(name)).with_context(|| format!("{}", d.join(name).display()))?;
        let len = f.metadata()?.len();
        let ranges = if i == 0 { smudge::file_io::data_ranges(&f, m.mem_size)? } else { vec![(0, len)] };
        for (off, len) in ranges {
            let mut o = off;
            while o < off + len {
                let n = (off + len - o).min(1 << 20) as usize;
                f.read_exact_at(&mut buf[..n], o)?;
                o += n as u64;
            }
        }
    }
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// Diffs taken after the full snapshot before the back-to-back window.
const SETTLING_DIFFS: u32 = 2;

/// Diff snapshots back to back for `window` after a full one, on a new VM
/// running `cmdline`: (snapshots per second, share of the time the guest
/// spent paused).
fn back_to_back(
    dir: &Path,
    mem: &str,
    cmdline: &str,
    warm: u64,
    window: Duration,
    extra: &[&str],
) -> anyhow::Result<(f64, f64)> {
    let vm = Vm::start(dir, "moon", mem, cmdline, extra)?;
    std::thread::sleep(Duration::from_millis(warm));
    let base = dir.join("moon-full");
    std::fs::remove_dir_all(&base).ok();
    vm.snapshot(&base, None)?;
    let mut parent = base;
    // The first diffs hold what was written during the full snapshot: the
    // window starts once they are done.
    for n in 0..SETTLING_DIFFS {
        let next = dir.join(format!("moon-settle-{n}"));
        std::fs::remove_dir_all(&next).ok();
        vm.snapshot(&next, Some(&parent))?;
        parent = next;
    }
    let t0 = Instant::now();
    let (mut n, mut paused_ms) = (0u32, 0.0);
    while t0.elapsed() < window {
        let next = dir.join(format!("moon-{n}"));
        std::fs::remove_dir_all(&next).ok();
        paused_ms += vm.snapshot(&next, Some(&parent))?.0;
        parent = next;
        n += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    vm.stop();
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("moon-") {
            std::fs::remove_dir_all(entry.path()).ok();
        }
    }
    Ok((f64::from(n) / secs, paused_ms / 1e3 / secs))
}

/// The number of ms in the stderr line holding `marker`, as in "…marker
/// 12.3 ms after smudge started".
fn ms_before(err: &str, marker: &str) -> Option<f64> {
    let line = err.lines().find(|l| l.contains(marker))?;
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split(" ms").next()?.trim().parse().ok()
}

/// `smudge restore` of `chain` onto `mem_file` with `options`, its stderr
/// piped (where it says when the guest runs).
fn restore_command(chain: &Path, mem_file: &Path, options: &[&str]) -> anyhow::Result<Command> {
    let mut c = smudge()?;
    c.arg("restore").args(options).arg("--snapshot").arg(chain).arg("--mem-file").arg(mem_file);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    Ok(c)
}

/// Runs `smudge restore` of `chain` onto `mem_file` with `options` until
/// its stderr has a line holding `until` (or a failure), then ends it;
/// returns its stderr so far.
fn restore_until(chain: &Path, mem_file: &Path, options: &[&str], until: &str) -> anyhow::Result<String> {
    use std::io::{BufRead, BufReader};
    let mut child = restore_command(chain, mem_file, options)?.spawn()?;
    let mut err = String::new();
    let stderr = child.stderr.take().context("restore's stderr")?;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        err.push_str(&line);
        err.push('\n');
        if line.contains(until) || line.contains("failed") || line.contains("error") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(err)
}

/// A lazy restore of `chain` into tmpfs: (time to first instruction, time
/// to fully loaded), in ms after the command started.
fn lazy_restore(chain: &Path) -> anyhow::Result<(f64, f64)> {
    let mem_file = std::path::PathBuf::from(format!("/dev/shm/smudge-bench-{}-lazy.mem", std::process::id()));
    std::fs::remove_file(&mem_file).ok();
    let err = restore_until(chain, &mem_file, &["--lazy", "--timeout", "60"], "fully loaded");
    std::fs::remove_file(&mem_file).ok();
    let err = err?;
    let ttfi = ms_before(&err, "lazy restore: the guest runs ").with_context(|| format!("lazy restore: {err}"))?;
    let loaded = ms_before(&err, "fully loaded ").with_context(|| format!("lazy restore: {err}"))?;
    Ok((ttfi, loaded))
}

/// Waits until the kernel has written every dirty page to disk (`sync`).
fn drain_disk() -> anyhow::Result<()> {
    let st = Command::new("sync").status().context("running sync")?;
    if !st.success() {
        bail!("sync failed: {st}");
    }
    Ok(())
}
