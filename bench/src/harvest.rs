//! `smudge bench harvest`: the cost of one harvest for each mechanism
//! (bitmap, manual, ring) at none / 1/512 / 1/16 / all pages of 1 GiB
//! dirty, against the bare KVM ioctls of that mechanism measured in the
//! same run on the same guest; and the guest's per-page write cost with
//! dirty logging off and on.
//!
//! The guest rewrites a stride pattern pass after pass and stops at a sync
//! port after each; there, with the vCPU waiting, passes alternate between
//! the bare ioctls (`discard_log_for_benchmark`) and the full pipeline
//! (`Harvester::collect`: harvest, OR into consumers, take, re-protect).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use smudge::harvest::{DirtyLogMode, Subscription};
use smudge_vmm::control::cli::BenchArgs;
use smudge_vmm::vm::outcome::Outcome;
use smudge_vmm::vm::vcpu::SyncHook;
use smudge_vmm::vm::{self, VmConfig};

use crate::report::{median, Report};
use crate::setup::Scratch;

/// One timed sync point.
#[derive(Debug, Clone, Copy)]
struct Sample {
    pass: u32,
    ms: f64,
    pages: u64,
    /// Wall time of the guest pass that led here.
    pass_ms: f64,
}

/// Boots the guest with `cmdline` on `mem_size` RAM and `mode`, calling
/// `measure` at every sync point after the first (the warm-up pass that
/// faults pages in). `measure(pass, harvester)` returns (ms, pages).
fn run_with_syncs(
    dir: &std::path::Path,
    mem_size: u64,
    mode: Option<DirtyLogMode>,
    cmdline: &str,
    measure: Measure,
) -> anyhow::Result<Vec<Sample>> {
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let consumer: Arc<Mutex<Option<Subscription>>> = Arc::default();
    let failure: Arc<Mutex<Option<String>>> = Arc::default();
    let last = Arc::new(Mutex::new(Instant::now()));
    let (s2, c2, f2, l2) = (samples.clone(), consumer.clone(), failure.clone(), last.clone());
    let hook: SyncHook = Arc::new(move |pass, h| {
        let pass_ms = l2.lock().map(|t| t.elapsed().as_secs_f64() * 1e3).unwrap_or(0.0);
        let r = (|| -> anyhow::Result<()> {
            let Some(h) = h else {
                // Dirty logging off: only the pass time matters.
                s2.lock().map_err(|_| anyhow::anyhow!("lock"))?.push(Sample { pass, ms: 0.0, pages: 0, pass_ms });
                return Ok(());
            };
            let mut c = c2.lock().map_err(|_| anyhow::anyhow!("lock"))?;
            let id = c.get_or_insert_with(|| Subscription::new(h));
            let mut h = h.lock().map_err(|_| anyhow::anyhow!("harvester lock poisoned"))?;
            if pass == 1 {
                // Warm-up: start every later pass from a clean, protected log.
                h.collect(id)?;
                return Ok(());
            }
            let (pages, ms) = measure(pass, &mut h, id)?;
            s2.lock().map_err(|_| anyhow::anyhow!("lock"))?.push(Sample { pass, ms, pages, pass_ms });
            Ok(())
        })();
        if let Err(e) = r {
            if let Ok(mut f) = f2.lock() {
                f.get_or_insert(format!("{e:#}"));
            }
        }
        if let Ok(mut t) = l2.lock() {
            *t = Instant::now();
        }
    });
    let mem_file = dir.join("harvest-bench.mem");
    std::fs::remove_file(&mem_file).ok();
    let cfg = VmConfig {
        dirty_log: mode,
        ring_entries: 65536,
        on_sync: Some(hook),
        ..VmConfig::bundled(mem_file.clone(), mem_size, cmdline)
    };
    let report = vm::run(cfg)?;
    std::fs::remove_file(&mem_file).ok();
    if let Some(f) = failure.lock().ok().and_then(|f| f.clone()) {
        bail!("measuring at a sync point failed: {f}");
    }
    if report.outcome != Outcome::GuestExit(0) {
        bail!("bench guest ended: {}", report.outcome);
    }
    let v = samples.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
    Ok(v)
}

/// One measurement at a sync point: (pages, milliseconds).
type Measure = fn(u32, &mut smudge::harvest::Harvester, &Subscription) -> anyhow::Result<(u64, f64)>;

fn bare(_: u32, h: &mut smudge::harvest::Harvester, _: &Subscription) -> anyhow::Result<(u64, f64)> {
    let t0 = Instant::now();
    let n = h.discard_log_for_benchmark()?;
    Ok((n, t0.elapsed().as_secs_f64() * 1e3))
}

/// Times `collect` (harvest, OR into consumers, take, re-protect) only;
/// counting and recycling the set happen after the clock stops.
fn pipeline(_: u32, h: &mut smudge::harvest::Harvester, id: &Subscription) -> anyhow::Result<(u64, f64)> {
    let t0 = Instant::now();
    let set = h.collect(id)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let n = set.count();
    h.recycle(set);
    Ok((n, ms))
}

fn alternate(pass: u32, h: &mut smudge::harvest::Harvester, id: &Subscription) -> anyhow::Result<(u64, f64)> {
    if pass.is_multiple_of(2) {
        bare(pass, h, id)
    } else {
        pipeline(pass, h, id)
    }
}

/// Runs the benchmark.
pub fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let scratch = Scratch::new(args.dir.as_deref())?;
    let dir = scratch.path();
    let (mem_size, label) = if args.quick { (64u64 << 20, "64MiB") } else { (1u64 << 30, "1GiB") };
    // Sparse passes are cheap, so they get more samples (the harvest itself
    // is ~0.1 ms there, where a shared machine's noise is largest).
    let pairs_for = |dname: &str| match (args.runs, args.quick, dname) {
        (Some(n), _, _) => n,
        (None, true, _) => 1,
        (None, false, "all") => 2,
        (None, false, "1/16") => 8,
        (None, false, _) => 15,
    };
    let mut rep = Report::new("harvest");
    let mechanisms = [("bitmap", DirtyLogMode::Bitmap), ("manual", DirtyLogMode::Manual), ("ring", DirtyLogMode::Ring)];
    // (name, stride, offset): offset past the end writes nothing.
    let densities = [("none", 1u64, 1u64 << 40), ("1/512", 512, 0), ("1/16", 16, 0), ("all", 1, 0)];
    for (mname, mode) in mechanisms {
        for (dname, stride, offset) in densities {
            let n = pairs_for(dname);
            let cmd = format!("workload=stride stride={stride} offset={offset} passes={} sync=1", 1 + 2 * n);
            let s = run_with_syncs(dir, mem_size, Some(mode), &cmd, alternate)
                .with_context(|| format!("{mname}, {dname} dirty"))?;
            let b: Vec<f64> = s.iter().filter(|x| x.pass % 2 == 0).map(|x| x.ms).collect();
            let p: Vec<f64> = s.iter().filter(|x| x.pass % 2 == 1).map(|x| x.ms).collect();
            let pages = s.iter().filter(|x| x.pass % 2 == 1).map(|x| x.pages).max().unwrap_or(0);
            let case = format!("{mname} {label} {dname} dirty");
            rep.result(&case, "bare_ioctl_ms", median(&b));
            rep.result(&case, "pipeline_ms", median(&p));
            rep.result(&case, "pages_per_harvest", pages as f64);
            if dname != "none" {
                rep.goal(
                    &format!("harvest pipeline / bare ioctl, {mname}, {dname} dirty"),
                    median(&p) / median(&b).max(1e-6),
                    1.25,
                    "lower",
                );
            }
        }
    }
    // The guest's cost per page write: rewrite passes over 64 MiB, with
    // logging off, and on with every page re-protected between passes.
    let pages = 16384u64;
    let passes = if args.quick { 3 } else { 6 };
    let cmd = format!("workload=seq pages={pages} passes={passes} sync=1");
    for (case, mode) in
        [("logging off", None), ("logging on (manual), re-protected each pass", Some(DirtyLogMode::Manual))]
    {
        let s = run_with_syncs(dir, 256 << 20, mode, &cmd, pipeline)?;
        let per_page: Vec<f64> = s.iter().filter(|x| x.pass > 1).map(|x| x.pass_ms * 1e3 / pages as f64).collect();
        rep.result(&format!("guest rewrite of 64 MiB, {case}"), "us_per_page_write", median(&per_page));
    }
    Ok(rep)
}
