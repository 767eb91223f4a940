//! `smudge bench durable`: the durable mode (`run --journal`) against
//! logging off, in one run. The guest runs the mixed workload (12,800
//! random page writes per second over 5 % of its RAM, the time between
//! them in a compute loop whose iterations it reports), so the guest
//! measures its own slowdown. Per epoch length (10, 20, 50 ms): committed
//! epochs per second, compute slowdown, pause p50/p99 (from `stats`), RPO
//! p99 (`committed_age_ms` sampled through the window), bytes the process
//! wrote through system calls beyond logging off's per distinct dirtied
//! byte, and the time `smudge restore --journal` takes to a running guest
//! after a `kill -9` at the end of the window; and, in the same run, diff
//! snapshots taken back to back through the API in the default mode (the
//! consistent points there were before the journal): snapshots per
//! second, their pause p50/p99 and the guest's slowdown.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use smudge::control::{Client, Request, SnapshotRequest};
use smudge_vmm::control::cli::BenchArgs;

use crate::report::{self, Report};
use crate::setup::{smudge, Scratch};

/// Page writes per second (50 MB/s of 4 KiB pages).
const RATE: u64 = 12_800;

/// How a case runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `--no-dirty-log`: the baseline.
    Off,
    /// `smudge run`'s default: dirty logging and writeback, no journal.
    Default,
    /// `--journal --epoch-ms N`.
    Journal(u64),
    /// The default mode, diff snapshots taken back to back through the
    /// API over the window (the consistent points smudge had before the
    /// journal).
    Diffs,
    /// One step of the breakdown: `--journal --epoch-ms 10` with only
    /// some parts of each epoch on.
    Part(Part),
}

/// A step of `bench durable-parts`: each adds one part of an epoch to the
/// step before, or replaces the step before (`instead`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    /// What the step adds (or changes).
    name: &'static str,
    /// `--test-epoch-parts`.
    parts: &'static str,
    /// The epoch length, ms.
    epoch_ms: u64,
    /// More `smudge run` arguments.
    args: &'static [&'static str],
    /// RAM in shared memory (`--backing-file`) instead of in place.
    memfd: bool,
    /// The step changes the full in-place step rather than adding to the
    /// step before.
    instead: bool,
}

/// The breakdown's epoch length: the most boundaries per second.
const PARTS_EPOCH_MS: u64 = 10;

const NO_WB: &[&str] = &["--no-writeback"];

/// The breakdown, in the order the parts are switched on.
const PARTS: [Part; 12] = [
    Part {
        name: "epochs that only stop, read state, resume",
        epoch_ms: PARTS_EPOCH_MS,
        parts: "pause",
        args: NO_WB,
        memfd: false,
        instead: false,
    },
    // No copies: the pass plan would see no pages; the steps from the copy
    // on make ~0.1 passes per 10 ms epoch (see the pass steps below).
    Part {
        name: "+ harvest (re-protect)",
        epoch_ms: PARTS_EPOCH_MS,
        parts: "harvest",
        args: &["--no-writeback", "--test-epoch-passes", "0"],
        memfd: false,
        instead: false,
    },
    Part {
        name: "+ copy into memory",
        epoch_ms: PARTS_EPOCH_MS,
        parts: "copy",
        args: NO_WB,
        memfd: false,
        instead: false,
    },
    Part {
        name: "+ journal writes, no fdatasync",
        epoch_ms: PARTS_EPOCH_MS,
        parts: "write",
        args: NO_WB,
        memfd: false,
        instead: false,
    },
    Part {
        name: "+ fdatasync (commit)",
        epoch_ms: PARTS_EPOCH_MS,
        parts: "full",
        args: NO_WB,
        memfd: false,
        instead: false,
    },
    Part {
        name: "+ writeback of the in-place file",
        epoch_ms: PARTS_EPOCH_MS,
        parts: "full",
        args: &[],
        memfd: false,
        instead: false,
    },
    Part {
        name: "RAM in memfd (--backing-file) instead",
        epoch_ms: PARTS_EPOCH_MS,
        parts: "full",
        args: &[],
        memfd: true,
        instead: true,
    },
    Part {
        name: "one pre-copy pass per epoch (before the pass plan) instead",
        epoch_ms: PARTS_EPOCH_MS,
        parts: "full",
        args: &["--test-epoch-passes", "1"],
        memfd: false,
        instead: true,
    },
    Part {
        name: "no pre-copy pass instead",
        epoch_ms: PARTS_EPOCH_MS,
        parts: "full",
        args: &["--test-epoch-passes", "0"],
        memfd: false,
        instead: true,
    },
    Part {
        name: "dirty ring instead of manual protect",
        epoch_ms: PARTS_EPOCH_MS,
        parts: "full",
        args: &["--dirty-log", "ring"],
        memfd: false,
        instead: true,
    },
    // The pause at 50 ms epochs, where the residue is 5 times larger.
    Part {
        name: "50 ms epochs, one pass per epoch",
        epoch_ms: 50,
        parts: "full",
        args: &["--test-epoch-passes", "1"],
        memfd: false,
        instead: true,
    },
    Part { name: "50 ms epochs, the pass plan", epoch_ms: 50, parts: "full", args: &[], memfd: false, instead: true },
];

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::Off => "logging off (--no-dirty-log)".into(),
            Mode::Default => "default mode (dirty logging, writeback), no journal".into(),
            Mode::Journal(e) => format!("--journal --epoch-ms {e}"),
            Mode::Diffs => "diff snapshots back to back (default mode), no journal".into(),
            Mode::Part(p) => format!("epoch {} ms: {}", p.epoch_ms, p.name),
        }
    }
}

/// What one case measured.
#[derive(Debug, Default)]
struct Measured {
    /// Compute iterations per second of the guest's own clock.
    iterations_per_s: f64,
    /// Distinct pages the workload stamped.
    stamped: u64,
    /// Page writes the workload made.
    writes: f64,
    /// Bytes the process wrote through system calls (`wchar`).
    wchar: u64,
    /// Committed epochs per second over the window.
    epochs_per_s: f64,
    /// `committed_age_ms` samples taken through the window.
    ages_ms: Vec<f64>,
    /// The final `stats` answer's `journal` object.
    journal: serde_json::Value,
    /// Spawn of `restore --journal` to its API answering a running guest.
    restore_ms: f64,
    /// Over the window: the vCPU thread's time on a CPU and waiting for
    /// one, and every other smudge thread's time on a CPU (s), and the
    /// window (s).
    sched: Sched,
    /// `harvested_pages` when the window opened.
    harvested0: f64,
    /// Diff snapshots taken in the window, and each one's pause (ms).
    diff_pauses_ms: Vec<f64>,
    /// Diff snapshots per second over the window.
    diffs_per_s: f64,
}

/// Where the vCPU thread's time went over the window (from
/// `/proc/PID/task/TID/schedstat`), so the host's other load can be told
/// from what smudge costs the guest.
#[derive(Debug, Default, Clone, Copy)]
struct Sched {
    vcpu_run: f64,
    vcpu_wait: f64,
    others_run: f64,
    wall: f64,
}

impl Sched {
    /// Now, for `pid`: (vCPU run, vCPU wait, other threads' run) in s.
    fn sample(pid: u32) -> anyhow::Result<[f64; 3]> {
        let mut r = [0.0; 3];
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).context("listing smudge's threads")? {
            let t = t?.path();
            let (Ok(comm), Ok(st)) =
                (std::fs::read_to_string(t.join("comm")), std::fs::read_to_string(t.join("schedstat")))
            else {
                continue; // a thread that ended meanwhile
            };
            let mut v = st.split_whitespace().map(|x| x.parse::<f64>().unwrap_or(0.0) / 1e9);
            let (run, wait) = (v.next().unwrap_or(0.0), v.next().unwrap_or(0.0));
            if comm.trim() == "vcpu0" {
                r[0] += run;
                r[1] += wait;
            } else {
                r[2] += run;
            }
        }
        Ok(r)
    }

    fn between(a: [f64; 3], b: [f64; 3], wall: Duration) -> Sched {
        Sched { vcpu_run: b[0] - a[0], vcpu_wait: b[1] - a[1], others_run: b[2] - a[2], wall: wall.as_secs_f64() }
    }
}

/// The value of `key=` in the serial output, once it holds it.
fn field(out: &str, key: &str) -> Option<f64> {
    out.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok())
}

/// Waits up to 60 s past `extra` for `line` in the serial file `serial`
/// of `vm`, calling `tick` between looks; returns the serial output.
fn wait_line(
    vm: &mut Child,
    serial: &Path,
    line: &str,
    extra: Duration,
    mut tick: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let t0 = Instant::now();
    loop {
        let out = std::fs::read_to_string(serial).unwrap_or_default();
        // The whole line: the guest may be half-way through printing it.
        if out.find(line).is_some_and(|at| out[at..].contains('\n')) {
            return Ok(out);
        }
        if let Some(st) = vm.try_wait()? {
            bail!("smudge ended ({st}) before the guest printed '{line}'; serial:\n{out}");
        }
        if t0.elapsed() > extra + smudge_testkit::WAIT {
            bail!("no '{line}' from the guest in {:?}; serial:\n{out}", t0.elapsed());
        }
        tick()?;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bytes `pid` wrote through system calls so far.
fn wchar(pid: u32) -> anyhow::Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).context("reading /proc/PID/io")?;
    io.lines().find_map(|l| l.strip_prefix("wchar: ")).and_then(|v| v.trim().parse().ok()).context("no wchar")
}

/// Runs the mixed guest on `mem` RAM for `window`, journalling at
/// as `mode` says, in `dir`.
fn case(dir: &Path, mem: u64, window: Duration, mode: Mode) -> anyhow::Result<Measured> {
    let name = match mode {
        Mode::Off => "off".to_string(),
        Mode::Default => "default".to_string(),
        Mode::Diffs => "diffs".to_string(),
        Mode::Journal(e) => format!("e{e}"),
        Mode::Part(p) => format!("p{}", PARTS.iter().position(|q| *q == p).unwrap_or(0)),
    };
    let epoch_ms = match mode {
        Mode::Journal(e) => Some(e),
        Mode::Part(p) => Some(p.epoch_ms),
        _ => None,
    };
    let p = |s: &str| dir.join(format!("durable-{name}.{s}"));
    let (mem_file, sock, serial, journal) = (p("mem"), p("sock"), p("serial"), p("journal"));
    for f in [&mem_file, &sock, &serial] {
        std::fs::remove_file(f).ok();
    }
    std::fs::remove_dir_all(&journal).ok();
    let pages = mem / 4096 / 20;
    let cmdline =
        format!("workload=mixed rate={RATE} pages={pages} ms={} seed=7 verify=1 linger=600000", window.as_millis());
    let mut cmd = smudge()?;
    cmd.args(["run", "--mem-size", &mem.to_string(), "--timeout", "900", "--cmdline", &cmdline])
        .arg("--serial")
        .arg(&serial)
        .arg(if matches!(mode, Mode::Part(Part { memfd: true, .. })) { "--backing-file" } else { "--mem-file" })
        .arg(&mem_file)
        .arg("--api-sock")
        .arg(&sock);
    if let Some(e) = epoch_ms {
        cmd.arg("--journal").arg(&journal).args(["--epoch-ms", &e.to_string()]);
    }
    match mode {
        Mode::Off => _ = cmd.args(["--no-dirty-log", "--no-writeback"]),
        Mode::Default | Mode::Journal(_) | Mode::Diffs => {}
        Mode::Part(p) => {
            cmd.args(["--test-epoch-parts", p.parts]).args(p.args);
        }
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut vm = smudge_testkit::spawn_with_api(&mut cmd, &sock, smudge_testkit::WAIT)?;
    let api = Client::new(&sock);
    let diffs = (mode == Mode::Diffs).then(|| p("snaps"));
    let r = measure(&mut vm, &api, &serial, window, epoch_ms.is_some(), diffs.as_deref());
    let r = r.and_then(|mut m| {
        if matches!(mode, Mode::Journal(_)) {
            // A crash at the window's end: the newest committed epoch back.
            vm.kill()?;
            vm.wait()?;
            m.restore_ms = restore(&journal, &p("rec.mem"), &p("rec.sock"), &p("rec.serial"))?;
        }
        Ok(m)
    });
    let _ = vm.kill();
    let _ = vm.wait();
    for f in [&mem_file, &sock, &serial, &p("rec.mem"), &p("rec.sock"), &p("rec.serial")] {
        std::fs::remove_file(f).ok();
    }
    std::fs::remove_dir_all(&journal).ok();
    std::fs::remove_dir_all(p("snaps")).ok();
    r
}

/// Samples the run through its window; the figures once the guest
/// reports its compute count and verified its pages.
/// With `diffs`, diff snapshots go back to back into it through the
/// window, on a full one taken before it opens.
fn measure(
    vm: &mut Child,
    api: &Client,
    serial: &Path,
    window: Duration,
    journal: bool,
    diffs: Option<&Path>,
) -> anyhow::Result<Measured> {
    let committed = |s: &serde_json::Value| s["journal"]["newest_committed"].as_u64().unwrap_or(0);
    let mut m = Measured::default();
    wait_line(vm, serial, "workload: working set ready", Duration::ZERO, || Ok(()))?;
    let mut parent = None;
    if let Some(d) = diffs {
        std::fs::create_dir_all(d)?;
        let full = d.join("full");
        snapshot(api, SnapshotRequest::full(&full))?;
        parent = Some(full);
    }
    let s = api.call(&Request::Stats)?;
    let (t0, c0) = (Instant::now(), committed(&s));
    m.harvested0 = s["journal"]["harvested_pages"].as_f64().unwrap_or(0.0);
    let s0 = Sched::sample(vm.id())?;
    let mut last = (t0, c0);
    let pid = vm.id();
    let mut s1 = (s0, t0);
    let out = wait_line(vm, serial, "compute: iterations=", window, || {
        // The last sample inside the window (the guest's clock decides
        // when it ends; a sample after that would count its idle end).
        if t0.elapsed() <= window {
            s1 = (Sched::sample(pid)?, Instant::now());
        }
        if let (Some(d), Some(p)) = (diffs, &parent) {
            if t0.elapsed() <= window {
                let next = d.join(format!("diff-{}", m.diff_pauses_ms.len()));
                m.diff_pauses_ms.push(snapshot(api, SnapshotRequest::diff(&next, p))?);
                parent = Some(next);
                m.diffs_per_s = m.diff_pauses_ms.len() as f64 / t0.elapsed().as_secs_f64();
            }
        }
        if journal {
            let s = api.call(&Request::Stats)?;
            if let Some(age) = s["journal"]["committed_age_ms"].as_u64() {
                m.ages_ms.push(age as f64);
            }
            last = (Instant::now(), committed(&s));
        }
        Ok(())
    })?;
    if journal {
        m.epochs_per_s = (last.1 - c0) as f64 / (last.0 - t0).as_secs_f64();
    }
    let (iterations, us) = (field(&out, "iterations="), field(&out, "elapsed_us="));
    let (Some(iterations), Some(us)) = (iterations, us) else { bail!("no compute count in:\n{out}") };
    m.iterations_per_s = iterations / (us / 1e6);
    m.sched = Sched::between(s0, s1.0, s1.1 - t0);
    m.writes = field(&out, "writes=").context("no writes= count")?;
    let out = wait_line(vm, serial, "mismatches=", Duration::ZERO, || Ok(()))?;
    if field(&out, "mismatches=") != Some(0.0) {
        bail!("the guest's pages do not match its table:\n{out}");
    }
    m.stamped = field(&out, "stamped=").context("no stamped= count")? as u64;
    m.journal = api.call(&Request::Stats)?["journal"].clone();
    m.wchar = wchar(vm.id())?;
    Ok(m)
}

/// Takes the snapshot `req` asks for; its pause (ms).
fn snapshot(api: &Client, req: SnapshotRequest) -> anyhow::Result<f64> {
    let r = api.call(&Request::Snapshot(req))?;
    r["pause_ms"].as_f64().with_context(|| format!("a snapshot failed: {r}"))
}

/// `smudge restore --journal J`: ms from its spawn to its control API
/// answering with the vCPUs running.
fn restore(journal: &Path, mem: &Path, sock: &Path, serial: &Path) -> anyhow::Result<f64> {
    let mut cmd = smudge()?;
    cmd.arg("restore").arg("--journal").arg(journal).arg("--mem-file").arg(mem);
    cmd.arg("--api-sock").arg(sock).arg("--serial").arg(serial).args(["--timeout", "120"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut vm = smudge_testkit::spawn_with_api(&mut cmd, sock, smudge_testkit::WAIT)?;
    let api = Client::new(sock);
    let running = loop {
        let s = api.call(&Request::Stats);
        if let Ok(s) = &s {
            if s["paused"] == false {
                break Ok(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        if t0.elapsed() > smudge_testkit::WAIT {
            break Err(anyhow::anyhow!("the restored guest did not run within 60 s: {s:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = vm.kill();
    let out = vm.wait_with_output()?;
    running.with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The `q` quantile of `v` (0 for none).
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s.get(((s.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0)
}

/// The scratch directory, the guest's RAM and window (`--quick`: 256 MiB
/// for 2 s, else 1 GiB for `window`), and the start of every case's name.
fn setup(args: &BenchArgs, window: Duration) -> anyhow::Result<(Scratch, u64, Duration, String)> {
    let scratch = Scratch::new(args.dir.as_deref())?;
    let (mem, window, label) =
        if args.quick { (256u64 << 20, Duration::from_secs(2), "256 MiB") } else { (1u64 << 30, window, "1 GiB") };
    let base = format!("mixed guest {label}, {RATE} writes/s over 5 %, {} s", window.as_secs());
    Ok((scratch, mem, window, base))
}

/// Runs the benchmark.
pub fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let (scratch, mem, window, base) = setup(args, Duration::from_secs(10))?;
    let dir: PathBuf = scratch.path().to_path_buf();
    let mut rep = Report::new("durable");
    // Logging off first and last: the baseline is their mean, the host's
    // drift over the run shows as the difference between the two.
    let mut runs = Vec::new();
    let modes =
        [Mode::Off, Mode::Default, Mode::Journal(10), Mode::Journal(20), Mode::Journal(50), Mode::Diffs, Mode::Off];
    for mode in modes {
        runs.push((mode, case(&dir, mem, window, mode).with_context(|| mode.name())?));
    }
    let offs: Vec<&Measured> = runs.iter().filter(|(e, _)| *e == Mode::Off).map(|(_, m)| m).collect();
    for (i, o) in offs.iter().enumerate() {
        let when = if i == 0 { "first" } else { "last" };
        rep.result(&format!("{base}, {} ({when})", Mode::Off.name()), "compute_iter_per_s", o.iterations_per_s);
    }
    let off_rate = offs.iter().map(|o| o.iterations_per_s).sum::<f64>() / offs.len() as f64;
    let off_wchar = offs.iter().map(|o| o.wchar).min().unwrap_or(0);
    if let Some((mode, m)) = runs.iter().find(|(e, _)| *e == Mode::Default) {
        // Where the slowdown goes: the dirty log's write faults alone.
        let c = format!("{base}, {}", mode.name());
        rep.result(&c, "compute_iter_per_s", m.iterations_per_s);
        rep.result(&c, "slowdown", 1.0 - m.iterations_per_s / off_rate);
    }
    if let Some((mode, m)) = runs.iter().find(|(e, _)| *e == Mode::Diffs) {
        // Today's consistent points before the journal, in the same run.
        let c = format!("{base}, {}", mode.name());
        rep.result(&c, "compute_iter_per_s", m.iterations_per_s);
        rep.result(&c, "slowdown", 1.0 - m.iterations_per_s / off_rate);
        rep.result(&c, "diff_snapshots_per_s", m.diffs_per_s);
        rep.result(&c, "pause_ms_p50", quantile(&m.diff_pauses_ms, 0.5));
        rep.result(&c, "pause_ms_p99", quantile(&m.diff_pauses_ms, 0.99));
        let paused_s = m.diff_pauses_ms.iter().sum::<f64>() / 1e3;
        rep.result(&c, "share_of_window_paused", paused_s / window.as_secs_f64());
    }
    let journals = runs.iter().filter_map(|(e, m)| match e {
        Mode::Journal(ms) => Some((*ms, m)),
        _ => None,
    });
    for (epoch_ms, m) in journals {
        let c = format!("{base}, --journal --epoch-ms {epoch_ms}");
        let slowdown = 1.0 - m.iterations_per_s / off_rate;
        let j = &m.journal;
        let num = |k: &str| j[k].as_f64().unwrap_or(f64::NAN);
        let rpo_p99 = quantile(&m.ages_ms, 0.99);
        let extra = m.wchar.saturating_sub(off_wchar) as f64;
        let per_dirtied = extra / (m.stamped * 4096) as f64;
        rep.result(&c, "compute_iter_per_s", m.iterations_per_s);
        rep.result(&c, "slowdown", slowdown);
        rep.result(&c, "committed_epochs_per_s", m.epochs_per_s);
        rep.result(&c, "pause_us_p50", num("pause_us_p50"));
        rep.result(&c, "pause_us_p99", num("pause_us_p99"));
        for part in ["stop_vcpus", "harvest", "copy_residue", "state"] {
            let v = j["pause_parts_us_avg"][part].as_f64().unwrap_or(f64::NAN);
            rep.result(&c, &format!("pause_{part}_us_avg"), v);
        }
        rep.result(&c, "rpo_ms_p99", rpo_p99);
        rep.result(&c, "lengthened", num("lengthened"));
        rep.result(&c, "distinct_dirtied_MiB", (m.stamped * 4096) as f64 / (1u64 << 20) as f64);
        rep.bracketed(
            &c,
            "written_per_dirtied_byte",
            per_dirtied,
            "bytes smudge wrote through system calls (/proc/PID/io wchar: journal, checkpoints, serial, API) \
             beyond logging off's, over the distinct pages the guest stamped",
        );
        rep.bracketed(
            &c,
            "guest_written_per_dirtied_byte",
            m.writes / m.stamped as f64,
            "the guest's page writes over the distinct pages among them: what a journal holding every epoch's \
             pages writes at most",
        );
        rep.bracketed(
            &c,
            "restore_ms",
            m.restore_ms,
            "spawn of `smudge restore --journal` after kill -9 at the window's end, to its API reporting vCPUs \
             running",
        );
        if epoch_ms == 10 {
            rep.goal("committed epochs/s, epoch 10 ms", m.epochs_per_s, 50.0, "higher");
        }
        rep.result(&c, "committed_per_boundary", m.epochs_per_s * epoch_ms as f64 / 1e3);
        rep.goal(&format!("guest slowdown, epoch {epoch_ms} ms"), slowdown, 0.10, "lower");
        rep.goal(&format!("pause p99 ms, epoch {epoch_ms} ms"), num("pause_us_p99") / 1e3, 1.0, "lower");
        rep.goal(&format!("RPO p99 / epoch, epoch {epoch_ms} ms"), rpo_p99 / epoch_ms as f64, 3.0, "lower");
        rep.goal(&format!("disk bytes / distinct dirtied bytes, epoch {epoch_ms} ms"), per_dirtied, 1.5, "lower");
        rep.goal(&format!("recovery to a running guest, s, epoch {epoch_ms} ms"), m.restore_ms / 1e3, 1.0, "lower");
    }
    Ok(rep)
}

/// `smudge bench durable-parts`: where the slowdown and the pause of
/// `--journal --epoch-ms 10` (and 50) go. The parts of an epoch are switched on
/// one at a time (`--test-epoch-parts`), each step against logging off in
/// the same run, rounds interleaved (`--runs`, default 2) so the host's
/// drift spreads over every step; each step's share is its slowdown less
/// the step's before it.
pub fn run_parts(args: &BenchArgs) -> anyhow::Result<Report> {
    let (scratch, mem, window, base) = setup(args, Duration::from_secs(4))?;
    let dir: PathBuf = scratch.path().to_path_buf();
    let mut rep = Report::new("durable-parts");
    let mut modes = vec![Mode::Off, Mode::Default];
    modes.extend(PARTS.iter().map(|p| Mode::Part(*p)));
    let mut runs: Vec<(Mode, Measured)> = Vec::new();
    for _ in 0..args.runs.unwrap_or(2).max(1) {
        for &mode in &modes {
            runs.push((mode, case(&dir, mem, window, mode).with_context(|| mode.name())?));
        }
    }
    runs.push((Mode::Off, case(&dir, mem, window, Mode::Off).context("logging off, last")?));
    let rates =
        |mode: Mode| -> Vec<f64> { runs.iter().filter(|(m, _)| *m == mode).map(|(_, r)| r.iterations_per_s).collect() };
    let off = rates(Mode::Off);
    let off_rate = off.iter().sum::<f64>() / off.len() as f64;
    let spread = off.iter().copied().fold(0.0, f64::max) / off.iter().copied().fold(f64::MAX, f64::min) - 1.0;
    let of = |mode: Mode| -> Vec<&Measured> { runs.iter().filter(|(m, _)| *m == mode).map(|(_, r)| r).collect() };
    let off_per_cpu = report::median(&of(Mode::Off).iter().map(|m| per_cpu_s(m)).collect::<Vec<_>>());
    rep.result(&format!("{base}, {}", Mode::Off.name()), "compute_iter_per_s", off_rate);
    sched_rows(&mut rep, &format!("{base}, {}", Mode::Off.name()), &of(Mode::Off), off_per_cpu);
    rep.bracketed(
        &format!("{base}, {}", Mode::Off.name()),
        "spread",
        spread,
        "fastest over slowest logging-off run, less 1: the host's noise over the run",
    );
    // The steps start from logging off (the default mode is beside them,
    // not one of them).
    let mut before = 0.0;
    for &mode in &modes[1..] {
        let c = format!("{base}, {}", mode.name());
        let slowdown = 1.0 - report::median(&rates(mode)) / off_rate;
        rep.result(&c, "slowdown", slowdown);
        let runs = of(mode);
        sched_rows(&mut rep, &c, &runs, off_per_cpu);
        if let Mode::Part(p) = mode {
            let prev = if p.instead { before } else { slowdown };
            rep.result(&c, "share_of_slowdown", slowdown - before);
            before = prev;
            part_rows(&mut rep, &c, &runs, off_per_cpu);
        }
    }
    Ok(rep)
}

/// Compute iterations per second the vCPU thread spent on a CPU.
fn per_cpu_s(m: &Measured) -> f64 {
    m.iterations_per_s * m.sched.wall / m.sched.vcpu_run.max(1e-9)
}

/// Where the vCPU thread's time went (medians over the runs): on a CPU,
/// runnable but waiting for one (the host's load, smudge's other threads),
/// neither (held at a boundary, parked); the slowdown per second on a CPU
/// (what faults and exits cost); the CPU every other smudge thread used.
fn sched_rows(rep: &mut Report, c: &str, runs: &[&Measured], off_per_cpu: f64) {
    let med = |f: &dyn Fn(&Measured) -> f64| report::median(&runs.iter().map(|m| f(m)).collect::<Vec<_>>());
    let s = |m: &Measured| m.sched;
    rep.result(c, "vcpu_on_cpu", med(&|m| s(m).vcpu_run / s(m).wall));
    rep.result(c, "vcpu_waiting_for_cpu", med(&|m| s(m).vcpu_wait / s(m).wall));
    rep.result(c, "vcpu_off_cpu", med(&|m| 1.0 - (s(m).vcpu_run + s(m).vcpu_wait) / s(m).wall));
    rep.result(c, "slowdown_per_vcpu_cpu_s", 1.0 - med(&per_cpu_s) / off_per_cpu);
    rep.result(c, "other_threads_cpus", med(&|m| s(m).others_run / s(m).wall));
}

/// The pause and its parts (medians over the runs), and the mid-epoch
/// passes, of one breakdown step.
fn part_rows(rep: &mut Report, c: &str, runs: &[&Measured], off_per_cpu: f64) {
    let med = |f: &dyn Fn(&Measured) -> f64| report::median(&runs.iter().map(|m| f(m)).collect::<Vec<_>>());
    rep.result(c, "pause_us_p50", med(&|m| m.journal["pause_us_p50"].as_f64().unwrap_or(f64::NAN)));
    rep.result(c, "pause_us_p99", med(&|m| m.journal["pause_us_p99"].as_f64().unwrap_or(f64::NAN)));
    for part in smudge_vmm::persist::epoch::PAUSE_PARTS {
        for q in ["p50", "p99"] {
            let v = med(&|m| m.journal[format!("pause_parts_us_{q}")][part].as_f64().unwrap_or(f64::NAN));
            rep.result(c, &format!("pause_{part}_us_{q}"), v);
        }
    }
    let secs = |m: &Measured| m.journal["sealed"].as_f64().unwrap_or(0.0).max(1.0);
    rep.result(c, "precopy_passes_per_epoch", med(&|m| m.journal["precopy_passes"].as_f64().unwrap_or(0.0) / secs(m)));
    rep.result(c, "precopy_us_avg", med(&|m| m.journal["precopy_us_avg"].as_f64().unwrap_or(f64::NAN)));
    rep.result(c, "lengthened", med(&|m| m.journal["lengthened"].as_f64().unwrap_or(f64::NAN)));
    // Every harvested page cost the guest one write fault: what each
    // cost, from the CPU time the vCPU lost against logging off.
    let faults = |m: &Measured| m.journal["harvested_pages"].as_f64().unwrap_or(f64::NAN) - m.harvested0;
    rep.result(c, "write_faults_per_s", med(&|m| faults(m) / m.sched.wall));
    rep.bracketed(
        c,
        "us_per_write_fault",
        med(&|m| (1.0 - per_cpu_s(m) / off_per_cpu) * m.sched.vcpu_run / faults(m) * 1e6),
        "the vCPU's compute lost per second on a CPU, against logging off, over the write faults: an upper \
         bound (exits of every kind count)",
    );
}
