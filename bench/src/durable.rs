//! `smudge bench durable`: the durable mode (`run --journal`) against
//! logging off, in one run. The guest runs the mixed workload (12,800
//! random page writes per second over 5 % of its RAM, the time between
//! them in a compute loop whose iterations it reports), so the guest
//! measures its own slowdown. Per epoch length (10, 20, 50 ms): committed
//! epochs per second, compute slowdown, pause p50/p99 (from `stats`), RPO
//! p99 (`committed_age_ms` sampled through the window), bytes the process
//! wrote through system calls beyond logging off's per distinct dirtied
//! byte, and the time `smudge restore --journal` takes to a running guest
//! after a `kill -9` at the end of the window.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use smudge::control::{Client, Request};
use smudge_vmm::control::cli::BenchArgs;

use crate::report::Report;
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
}

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::Off => "logging off (--no-dirty-log)".into(),
            Mode::Default => "default mode (dirty logging, writeback), no journal".into(),
            Mode::Journal(e) => format!("--journal --epoch-ms {e}"),
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
        if out.contains(line) {
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
        Mode::Journal(e) => format!("e{e}"),
    };
    let epoch_ms = match mode {
        Mode::Journal(e) => Some(e),
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
        .arg("--mem-file")
        .arg(&mem_file)
        .arg("--api-sock")
        .arg(&sock);
    match mode {
        Mode::Off => _ = cmd.args(["--no-dirty-log", "--no-writeback"]),
        Mode::Default => {}
        Mode::Journal(e) => _ = cmd.arg("--journal").arg(&journal).args(["--epoch-ms", &e.to_string()]),
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut vm = smudge_testkit::spawn_with_api(&mut cmd, &sock, smudge_testkit::WAIT)?;
    let api = Client::new(&sock);
    let r = measure(&mut vm, &api, &serial, window, epoch_ms.is_some());
    let r = r.and_then(|mut m| {
        if epoch_ms.is_some() {
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
    r
}

/// Samples the run through its window; the figures once the guest
/// reports its compute count and verified its pages.
fn measure(vm: &mut Child, api: &Client, serial: &Path, window: Duration, journal: bool) -> anyhow::Result<Measured> {
    let committed = |s: &serde_json::Value| s["journal"]["newest_committed"].as_u64().unwrap_or(0);
    let mut m = Measured::default();
    wait_line(vm, serial, "workload: working set ready", Duration::ZERO, || Ok(()))?;
    let (t0, c0) = (Instant::now(), committed(&api.call(&Request::Stats)?));
    let mut last = (t0, c0);
    let out = wait_line(vm, serial, "compute: iterations=", window, || {
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

/// Runs the benchmark.
pub fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let scratch = Scratch::new(args.dir.as_deref())?;
    let dir: PathBuf = scratch.path().to_path_buf();
    let mut rep = Report::new("durable");
    let (mem, window, label) = if args.quick {
        (256u64 << 20, Duration::from_secs(2), "256 MiB")
    } else {
        (1u64 << 30, Duration::from_secs(10), "1 GiB")
    };
    let base = format!("mixed guest {label}, {RATE} writes/s over 5 %, {} s", window.as_secs());
    // Logging off first and last: the baseline is their mean, the host's
    // drift over the run shows as the difference between the two.
    let mut runs = Vec::new();
    for mode in [Mode::Off, Mode::Default, Mode::Journal(10), Mode::Journal(20), Mode::Journal(50), Mode::Off] {
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
