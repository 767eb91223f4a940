//! `smudge bench writeback`, two parts measured side by side in one run:
//!
//! 1. Write-out bandwidth of the engine (`Writeback::sync`) for sequential,
//!    1/16 and 1/512 scattered dirty sets, against a raw loop over the same
//!    extents: `pwrite` + `fdatasync` for the image sink, `msync(MS_SYNC)` +
//!    `fdatasync` for the backing file; and RAM in shared memory written to
//!    its `--backing-file` (the image sink from a memfd). Pages are dirtied
//!    by the VMM through vm-memory (logged in its bitmap), so no guest is
//!    needed.
//! 2. A hot/cold guest (10 % of pages take 99 % of the writes) under
//!    continuous writeback with a 100 ms flusher: its write throughput
//!    `--in-place` with logging off, with manual protect and `dirty_expire`
//!    100 ms, 1 s, 5 s, 30 s, and with the bitmap harvested and everything
//!    dirty written at each tick (Firecracker's way); and with
//!    `--backing-file` (RAM in shared memory persisted to the file by the
//!    image sink), logging off and at 1 s and 5 s expiry, with hot pages
//!    left writable (the engine's default) and re-protected at every
//!    write-out (as before the hot-page policy). The goals are on `run`'s
//!    default mode (in place), and the same on `--backing-file`.
//! 3. First touch: a fresh guest's first writes to never-touched pages, in
//!    place on a disk file and in shared memory (`--backing-file`).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use smudge::dirty_set::Extent;
use smudge::harvest::{self, DirtyLogMode, Harvester};
use smudge::kvm::dirty_log::DirtyCaps;
use smudge::memory::{host_page_size, BackingFile, GuestRam};
use smudge::sink::{BackingFileSink, ImageFile, Sink};
use smudge::writeback::{HarvesterLog, MonotonicClock, Threshold, Writeback, WritebackPolicy};
use smudge_vmm::control::cli::BenchArgs;
use smudge_vmm::persist::flusher::WritebackOptions;
use smudge_vmm::vm::outcome::Outcome;
use smudge_vmm::vm::{self, VmConfig};
use vm_memory::{Bytes, GuestAddress};

use crate::report::{median, Report};
use crate::setup::Scratch;

/// Dirties every `stride`-th page of `ram` through vm-memory; returns the
/// extents written (the raw loop's work list).
fn dirty_pattern(ram: &GuestRam, size: u64, stride: u64, round: u8) -> anyhow::Result<Vec<Extent>> {
    let ps = host_page_size();
    let page = vec![round; ps as usize];
    let mut extents: Vec<Extent> = Vec::new();
    let mut gpa = 0;
    while gpa < size {
        ram.write_slice(&page, GuestAddress(gpa))?;
        match extents.last_mut() {
            Some(e) if e.gpa + e.len == gpa => e.len += ps,
            _ => extents.push(Extent { gpa, len: ps }),
        }
        gpa += stride * ps;
    }
    Ok(extents)
}

/// One bandwidth case: engine vs raw on the same extents, alternating.
fn bandwidth(dir: &Path, size: u64, stride: u64, sink_kind: &str, reps: usize) -> anyhow::Result<(f64, f64, u64)> {
    let kvm = smudge::kvm::open(Path::new("/dev/kvm"))?;
    let vm = Arc::new(smudge::kvm::create_vm(&kvm)?);
    let mech = harvest::prepare(&vm, DirtyCaps::probe(&vm), DirtyLogMode::Manual, 4096)?;
    let mem_path = dir.join(format!("wb-{sink_kind}-{stride}.mem"));
    std::fs::remove_file(&mem_path).ok();
    let backing = match sink_kind {
        "backing-file" => BackingFile::memfd("wb-bench", size)?,
        _ => BackingFile::open_or_create(&mem_path, size)?,
    };
    let ram = backing.map(false)?;
    let slots = smudge::kvm::register_ram(&vm, &ram, true)?;
    let h = Arc::new(Mutex::new(Harvester::new(vm, mech, slots.clone(), ram.clone(), Vec::new(), host_page_size())));
    let img_path = dir.join(format!("wb-{sink_kind}-{stride}.img"));
    std::fs::remove_file(&img_path).ok();
    let sink: Box<dyn Sink> = match sink_kind {
        "image" => Box::new(ImageFile::open(&img_path, size)?),
        // As `run` writes it: kept out of the page cache.
        "backing-file" => Box::new(ImageFile::open(&img_path, size)?.dropping_cache()),
        _ => Box::new(BackingFileSink::new(backing.file().try_clone()?, &mem_path, size)),
    };
    let mut engine = Writeback::new(
        Box::new(HarvesterLog::new(h)),
        sink,
        Arc::new(MonotonicClock::new()),
        ram.clone(),
        &slots,
        host_page_size(),
    );
    let raw_img = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&img_path)?;
    let (mut e_t, mut r_t) = (Vec::new(), Vec::new());
    let mut bytes = 0;
    // Warm-up round: allocate the files' blocks once for both paths.
    dirty_pattern(&ram, size, stride, 1)?;
    engine.sync()?;
    for rep in 0..reps {
        let round = 2 + rep as u8 * 2;
        let extents = dirty_pattern(&ram, size, stride, round)?;
        bytes = extents.iter().map(|e| e.len).sum();
        let t0 = Instant::now();
        engine.sync()?;
        e_t.push(t0.elapsed().as_secs_f64());

        let extents = dirty_pattern(&ram, size, stride, round + 1)?;
        let t0 = Instant::now();
        if sink_kind != "backing" {
            let mut buf = Vec::new();
            for e in &extents {
                buf.resize(e.len as usize, 0);
                ram.read_slice(&mut buf, GuestAddress(e.gpa))?;
                raw_img.write_all_at(&buf, e.gpa)?;
            }
            raw_img.sync_data()?;
        } else {
            for e in &extents {
                smudge::memory::msync_range(&ram, e.gpa, e.len)?;
            }
            backing.file().sync_data()?;
        }
        r_t.push(t0.elapsed().as_secs_f64());
        // Keep the engine's view in step: the raw round's pages are dirty
        // in its log too; write them through it untimed.
        engine.sync()?;
    }
    std::fs::remove_file(&mem_path).ok();
    std::fs::remove_file(&img_path).ok();
    Ok((bytes as f64 / median(&e_t) / 1e6, bytes as f64 / median(&r_t) / 1e6, bytes))
}

/// The serial output of a bench guest, kept in memory.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("lock"))?.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where a bench guest's RAM lives and where writeback persists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ram {
    /// The memory file itself (ext4 here), persisted in place.
    InPlace,
    /// The memory file, its pages written into an image file.
    ToImage,
    /// Shared memory, persisted to a disk file (`run --backing-file`).
    Memfd,
}

/// One hot/cold case: the dirty log, the expiry (None: no writeback),
/// where RAM lives, and whether hot pages may stay writable.
type Case = (&'static str, Option<DirtyLogMode>, Option<Duration>, Ram, bool);

/// Runs the hot/cold guest once; returns page writes per second.
fn hotcold(dir: &Path, mem: u64, ms: u64, case: &Case) -> anyhow::Result<f64> {
    let cmdline = format!("workload=hotcold hot_pct=10 hot_share=99 ms={ms}");
    let &(_, mode, expire, ram, hot) = case;
    let (writes, us) = guest_writes(dir, mem, &cmdline, mode, expire, ram, hot)?;
    Ok(writes / (us / 1e6))
}

/// Runs the bundled guest with `cmdline` on `mem` bytes of fresh RAM
/// placed as `ram` says, writeback with a 100 ms flusher and `expire`
/// (None: off), hot pages left writable if `hot`; returns (writes, elapsed
/// µs) as the guest reports them.
fn guest_writes(
    dir: &Path,
    mem: u64,
    cmdline: &str,
    mode: Option<DirtyLogMode>,
    expire: Option<Duration>,
    ram: Ram,
    hot: bool,
) -> anyhow::Result<(f64, f64)> {
    let cap = Capture::default();
    let (mem_file, image) = (dir.join("bench-guest.mem"), dir.join("bench-guest.img"));
    std::fs::remove_file(&mem_file).ok();
    std::fs::remove_file(&image).ok();
    let writeback = expire.map(|e| WritebackOptions {
        policy: WritebackPolicy {
            writeback_interval: Duration::from_millis(100),
            dirty_expire: e,
            background: Threshold::Percent(100),
            limit: Threshold::Percent(100),
        },
        sync_every: None,
        image: (ram != Ram::InPlace).then(|| image.clone()),
        image_ready: None,
        hot_pages: hot,
    });
    let cfg = VmConfig {
        serial: Box::new(cap.clone()),
        timeout: Some(Duration::from_secs(120)),
        dirty_log: mode,
        writeback,
        ram_in_memfd: ram == Ram::Memfd,
        ..VmConfig::bundled(if ram == Ram::Memfd { image.clone() } else { mem_file.clone() }, mem, cmdline)
    };
    let report = vm::run(cfg)?;
    std::fs::remove_file(&mem_file).ok();
    std::fs::remove_file(&image).ok();
    let out = String::from_utf8_lossy(&cap.0.lock().map_err(|_| anyhow::anyhow!("lock"))?).into_owned();
    if report.outcome != Outcome::GuestExit(0) {
        bail!("bench guest ended: {}\n{out}", report.outcome);
    }
    let field = |k: &str| -> anyhow::Result<f64> {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {k} in guest output:\n{out}"))
    };
    Ok((field("writes=")?, field("elapsed_us=")?))
}

/// The guest's first writes to never-touched pages (2000 random pages of
/// the whole RAM, each its first touch), in place on a fresh disk file and
/// in shared memory persisted to one, with writeback on (5 s expiry):
/// microseconds per write as the guest measures them.
fn first_touch(dir: &Path, quick: bool, rep: &mut Report) -> anyhow::Result<()> {
    let (mem, label) = if quick { (64u64 << 20, "64 MiB") } else { (256u64 << 20, "256 MiB") };
    // Half of RAM: the working set and its table fit beside the guest.
    let pages = mem / host_page_size() / 2;
    let cmdline = format!("workload=random pages={pages} writes=2000 seed=5");
    let expire = Some(Duration::from_secs(5));
    for (name, ram) in [("--in-place", Ram::InPlace), ("--backing-file (RAM in shared memory)", Ram::Memfd)] {
        let (writes, us) = guest_writes(dir, mem, &cmdline, Some(DirtyLogMode::Manual), expire, ram, true)
            .with_context(|| format!("first touch, {name}"))?;
        rep.result(&format!("first touch of 2000 pages of a fresh {label} guest, {name}"), "us_per_write", us / writes);
    }
    Ok(())
}

/// Runs the benchmark.
pub fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let scratch = Scratch::new(args.dir.as_deref())?;
    let dir = scratch.path();
    let mut rep = Report::new("writeback");
    let size = if args.quick { 32u64 << 20 } else { 256u64 << 20 };
    for sink in ["image", "backing", "backing-file"] {
        for (name, stride) in [("sequential", 1u64), ("1/16 scattered", 16), ("1/512 scattered", 512)] {
            // Small sets are quick and noisy (fdatasync dominates): more runs.
            let reps = match (args.quick, args.runs, stride) {
                (true, _, _) => 1,
                (false, Some(n), _) => n,
                (false, None, 1) => 3,
                (false, None, _) => 7,
            };
            let (engine, raw, bytes) =
                bandwidth(dir, size, stride, sink, reps).with_context(|| format!("bandwidth, {sink} sink, {name}"))?;
            let raw_name = if sink == "backing" { "msync+fdatasync" } else { "pwrite+fdatasync" };
            let case = format!("{sink} sink, {name}, {} MiB dirty", bytes >> 20);
            rep.result(&case, "engine_MBps", engine);
            rep.result(&case, &format!("raw_{raw_name}_MBps"), raw);
            rep.goal(
                &format!("write-out bandwidth engine / raw {raw_name}, {sink}, {name}"),
                engine / raw,
                0.9,
                "higher",
            );
        }
    }
    let (mem, ms) = if args.quick { (64u64 << 20, 1000) } else { (1u64 << 30, 8000) };
    let label = if args.quick { "64 MiB" } else { "1 GiB" };
    let manual = Some(DirtyLogMode::Manual);
    let (s1, s5) = (Some(Duration::from_secs(1)), Some(Duration::from_secs(5)));
    let cases: [Case; 13] = [
        ("--in-place, logging off", None, None, Ram::InPlace, true),
        ("--in-place, manual, dirty_expire 100 ms", manual, Some(Duration::from_millis(100)), Ram::InPlace, true),
        ("--in-place, manual, dirty_expire 1 s", manual, s1, Ram::InPlace, true),
        ("--in-place, manual, dirty_expire 5 s", manual, s5, Ram::InPlace, true),
        ("--in-place, manual, dirty_expire 30 s", manual, Some(Duration::from_secs(30)), Ram::InPlace, true),
        (
            "--in-place, bitmap, write everything each tick",
            Some(DirtyLogMode::Bitmap),
            Some(Duration::ZERO),
            Ram::InPlace,
            true,
        ),
        // Informational: the same to an image file, where no host writeback
        // write-protects the guest's pages (one fault per cycle, not two).
        ("--in-place, manual, dirty_expire 1 s, to an image file", manual, s1, Ram::ToImage, true),
        ("--in-place, manual, dirty_expire 5 s, to an image file", manual, s5, Ram::ToImage, true),
        // `run --backing-file`: RAM in shared memory persisted to the disk
        // file by the image sink, beside the in-place rows above.
        ("--backing-file, logging off (RAM in shared memory)", None, None, Ram::Memfd, true),
        ("--backing-file, manual, dirty_expire 1 s", manual, s1, Ram::Memfd, true),
        ("--backing-file, manual, dirty_expire 5 s", manual, s5, Ram::Memfd, true),
        // The same with every write-out re-protecting (no hot pages).
        ("--backing-file, manual, dirty_expire 1 s, hot pages re-protected", manual, s1, Ram::Memfd, false),
        ("--backing-file, manual, dirty_expire 5 s, hot pages re-protected", manual, s5, Ram::Memfd, false),
    ];
    let mut rates = Vec::new();
    for case in &cases {
        let name = case.0;
        let r = hotcold(dir, mem, ms, case).with_context(|| format!("hot/cold guest, {name}"))?;
        rep.result(&format!("hot/cold guest {label}, 100 ms flusher, {name}"), "page_writes_per_s", r);
        rates.push(r);
    }
    for (i, expire) in [(9, "1 s"), (10, "5 s")] {
        let case = format!("hot/cold, --backing-file (RAM in shared memory) at dirty_expire {expire}");
        rep.result(&case, "vs_logging_off_in_shared_memory", rates[i] / rates[8]);
        rep.result(&case, "vs_logging_off_in_place", rates[i] / rates[0]);
        rep.result(&case, "vs_in_place_same_expiry", rates[i] / rates[i - 7]);
        rep.result(&case, "vs_hot_pages_reprotected", rates[i] / rates[i + 2]);
    }
    first_touch(dir, args.quick, &mut rep)?;
    // The goals are on `run`'s default mode (in place) against logging
    // off; the same goals on --backing-file (hot pages left writable)
    // against logging off on the same RAM.
    rep.goal("guest throughput, dirty_expire 1 s / logging off", rates[2] / rates[0], 0.75, "higher");
    rep.goal("guest throughput, dirty_expire 5 s / logging off", rates[3] / rates[0], 0.9, "higher");
    rep.goal("guest throughput, dirty_expire 1 s / write everything each tick", rates[2] / rates[5], 3.0, "higher");
    rep.goal("guest throughput, --backing-file, dirty_expire 1 s / logging off", rates[9] / rates[8], 0.75, "higher");
    rep.goal("guest throughput, --backing-file, dirty_expire 5 s / logging off", rates[10] / rates[8], 0.9, "higher");
    for (i, expire) in [(2, "1 s"), (3, "5 s")] {
        rep.result(&format!("hot/cold, --in-place at dirty_expire {expire}"), "vs_logging_off", rates[i] / rates[0]);
    }
    Ok(rep)
}
