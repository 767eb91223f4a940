//! `smudge bench migrate`: the same guest ELF and workload migrated over
//! loopback TCP by smudge (`ctl migrate` to a `migrate-recv`) and by QEMU
//! (`migrate` to a second QEMU started with `-incoming`), with the same
//! downtime budget, at a few dirty rates, in one run.
//!
//! The guest: 1 GiB of RAM (64 MiB with --quick), a 256 MiB working set
//! zeroed first, then random page writes at 10 pages/s ("idle"), 5000/s
//! (~20 MB/s) and 50000/s (~200 MB/s). Every migration, smudge's and the
//! peers', starts the same warm-up (3 s; 0.8 s with --quick) after the
//! guest's serial output says its working set is ready (zeroed): never
//! while a guest whose first touches are slow is still zeroing it.
//!
//! Downtime, the same for both: from the source's guest stopping to the
//! destination's guest running, each end's moment on its own (here: the
//! same) realtime clock — smudge's pause start to the time its destination
//! put in the final answer (`stop_to_running_ms`), QEMU's `STOP` event on
//! the source to `RESUME` on the destination (QMP timestamps). Printed
//! beside them: smudge's pause to the answer read back at the source
//! (`downtime_to_ack_ms`: adds the answer's trip and the source thread's
//! wake-up, which on 2 busy cores is 0-2 ms), and QEMU's own `downtime`
//! (source side only, whole milliseconds, leaving out the destination's
//! load and start) as `qemu_reported_downtime_ms`.
//!
//! Over a unix socket (`--listen unix:PATH`), smudge's pre-copy against
//! Cloud Hypervisor's (`unix:PATH` receiver and destination URLs), same
//! guest and goals as over TCP, at every rate.
//!
//! At the fastest rate smudge also migrates with post-copy (switch over at
//! once, destination RAM on /dev/shm) against its own pre-copy; and at the
//! slowest, a same-host `--local` handover (only vCPU/device state
//! crosses) against QEMU's downtime. At the slowest and fastest rates, 2
//! and 4 parallel page connections against one (informational: where it
//! stops helping on this machine).
//!
//! Faster than the link: a guest dirtying ~4x what `--bandwidth-limit`
//! lets through, moved by pre-copy (auto-converge throttles it until the
//! rounds converge) and by post-copy (never throttled); the guest's own
//! write rate, read from its generation table (the memory file is guest
//! RAM) over a second before the migration and over the migration (the
//! request to the destination's table read back after it), gives its
//! slowdown in each.
//!
//! At the slowest and fastest rates, pre-copy with TLS 1.3 (`--tls-creds`,
//! both ends verified, credentials made for the run in its scratch
//! directory) against plain TCP, runs alternating: total time, downtime
//! and the handshake (`handshake_ms`, before the first round: it is in the
//! total time, none of it in the downtime).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use smudge::control::{Client, MigrateRequest, Request};
use smudge_vmm::control::cli::BenchArgs;
use smudge_vmm::migrate::source::DEFAULT_DOWNTIME;

use crate::migrate_peers::{self, Link};
use crate::peers::{tsc_khz, wait_file_line, Peer, NOT_FOUND, READY_WAIT, WORKING_SET_READY};
use crate::qemu_migrate::{self, QemuMigrateConfig};
use crate::report::{median, Report};
use crate::setup::{run_args, smudge, Scratch};

/// One migration's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    total_ms: f64,
    downtime_ms: f64,
    reported_downtime_ms: f64,
    rounds: f64,
    mib: f64,
    /// Post-copy: pages sent because the destination's guest faulted.
    on_demand: f64,
    /// Round 0's throughput (all data pages), MB/s.
    round0_mbps: f64,
    /// smudge's downtime phases: pause, residue, state, destination.
    parts: [f64; 4],
    /// Post-copy, ms after the destination's guest ran: the first page
    /// request, every page sent, every page placed.
    postcopy_steps: [f64; 3],
    /// The guest's own page writes per second before the migration and
    /// during it (capped-link cases only).
    guest_rate: [f64; 2],
    /// The highest auto-converge throttle of any round (percent).
    max_throttle_pct: f64,
    /// Connecting the main connection (and its TLS handshake).
    handshake_ms: f64,
}

/// Kills a child process however the run ends.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How smudge migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Pre-copy rounds, then the paused residue.
    Precopy,
    /// Pre-copy over this many page connections.
    Connections(u32),
    /// Once the guest wrote as often as its working set has `pages`
    /// pages (its wipe done, most pages stamped: the dirty rate is the
    /// workload's, not its first touches'): pre-copy, or post-copy (switch
    /// over at once; pages follow, destination RAM on /dev/shm).
    Settled { postcopy: bool, pages: u64 },
    /// Pre-copy over a unix socket.
    Unix,
    /// Pre-copy over TCP with TLS, both ends using the credentials in
    /// the scratch directory's [`TLS_CREDS`].
    Tls,
    /// Same-host handover of the RAM file.
    Local,
    /// A link capped at `limit` bytes/s; post-copy (at once) or pre-copy
    /// with auto-converge; the guest's own write rate (over its
    /// `pages`-page working set) is measured before and during; settled
    /// first as [`Mode::Settled`].
    Capped { postcopy: bool, limit: u64, pages: u64 },
}

impl Mode {
    /// Whether the destination's RAM is on /dev/shm: post-copy needs it,
    /// and the pre-copy it is set against gets the same.
    fn dest_on_tmpfs(self) -> bool {
        matches!(self, Mode::Settled { .. } | Mode::Capped { .. })
    }

    /// The working set to wait for the guest to have written through.
    fn settle_pages(self) -> Option<u64> {
        match self {
            Mode::Settled { pages, .. } | Mode::Capped { pages, .. } => Some(pages),
            _ => None,
        }
    }
}

/// Waits (at most two minutes) until the guest on `mem` has made `pages`
/// page writes over its `pages`-page working set.
fn settle(mem: &Path, pages: u64, src: &mut Reap) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    while guest_writes(mem, pages)? < pages {
        if let Some(status) = src.0.try_wait()? {
            bail!("the source ended ({status}) before its guest wrote {pages} pages");
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("the guest did not write {pages} pages within two minutes");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Page writes the bundled guest made so far over its `pages`-page
/// working set: the sum of its generation table in the memory file.
fn guest_writes(mem: &Path, pages: u64) -> anyhow::Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(mem).with_context(|| format!("opening {}", mem.display()))?;
    let mut buf = vec![0u8; pages as usize * 4];
    // Below 3 GiB a guest address is its file offset.
    f.read_exact_at(&mut buf, guest_abi::gen_table_addr(0))
        .with_context(|| format!("the guest's generation table in {}", mem.display()))?;
    Ok(buf.chunks_exact(4).map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))).sum())
}

/// Starts `migrate-recv` on `dst_mem` listening on `listen`; returns it
/// and where it listens.
fn start_dest(dst_mem: &Path, local: bool, listen: &str, tls: Option<&Path>) -> anyhow::Result<(Reap, String)> {
    let mut dest = smudge()?
        .args(["migrate-recv", "--listen", listen, "--accept-timeout", "120", "--serial", "/dev/null", "--mem-file"])
        .arg(dst_mem)
        .args(if local { &["--local"][..] } else { &[] })
        .args(tls.map(|d| [std::ffi::OsStr::new("--tls-creds"), d.as_os_str()]).into_iter().flatten())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let err = dest.stderr.take().context("destination stderr")?;
    let dest = Reap(dest);
    let mut lines = BufReader::new(err).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(a) = l.strip_prefix("smudge: waiting for a migration on ") {
                    break a.to_string();
                }
            }
            _ => bail!("migrate-recv ended before it listened"),
        }
    };
    // Drain the destination's stderr so it never blocks on it.
    std::thread::spawn(move || lines.for_each(drop));
    Ok((dest, addr))
}

/// Starts the source: `smudge run` of `cmdline` on `mem_file`, its serial
/// output in `serial`, its control socket at `sock`.
fn start_source(
    mem_file: &Path,
    sock: &Path,
    serial: &Path,
    size: &str,
    cmdline: &str,
) -> anyhow::Result<(Reap, Client)> {
    std::fs::remove_file(sock).ok();
    let mut args = run_args(mem_file, size, cmdline, 600);
    if let Some(i) = args.iter().position(|a| a == "--serial") {
        args[i + 1] = serial.as_os_str().to_owned();
    }
    let mut cmd = smudge()?;
    cmd.args(args).arg("--api-sock").arg(sock).stdout(Stdio::null()).stderr(Stdio::null());
    let child = smudge_testkit::spawn_with_api(&mut cmd, sock, smudge_testkit::WAIT).context("the source")?;
    Ok((Reap(child), Client::new(sock)))
}

fn smudge_once(
    dir: &Path,
    mem: &str,
    cmdline: &str,
    warm: Duration,
    budget_ms: u64,
    mode: Mode,
) -> anyhow::Result<Figures> {
    let (src_mem, sock) = (dir.join("src.mem"), dir.join("src.sock"));
    let dst_mem = match mode {
        Mode::Local => src_mem.clone(),
        // userfaultfd needs shmem on the destination.
        m if m.dest_on_tmpfs() => PathBuf::from(format!("/dev/shm/smudge-bench-{}-dst.mem", std::process::id())),
        _ => dir.join("dst.mem"),
    };
    for f in [&src_mem, &dst_mem, &sock, &dir.join("src.serial")] {
        std::fs::remove_file(f).ok();
    }
    let listen = match mode {
        Mode::Unix => Link::Unix.url(dir, "smudge-migration")?,
        _ => "0".to_string(),
    };
    let tls = (mode == Mode::Tls).then(|| dir.join(TLS_CREDS));
    let mut dest = None;
    if mode != Mode::Local {
        dest = Some(start_dest(&dst_mem, false, &listen, tls.as_deref())?);
    }
    let serial = dir.join("src.serial");
    let (mut src, api) = start_source(&src_mem, &sock, &serial, mem, cmdline)?;
    wait_file_line(&serial, WORKING_SET_READY, READY_WAIT, || match src.0.try_wait()? {
        Some(status) => bail!("the source ended ({status})"),
        None => Ok(()),
    })
    .context("the source's guest")?;
    std::thread::sleep(warm);
    if let Some(pages) = mode.settle_pages() {
        settle(&src_mem, pages, &mut src)?;
    }
    let (dest, addr) = match dest {
        Some(d) => d,
        // The handover's destination opens the source's file: start it now.
        None => start_dest(&dst_mem, true, &listen, None)?,
    };
    let mut req = MigrateRequest { downtime_ms: Some(budget_ms), tls_creds: tls, ..MigrateRequest::new(addr) };
    match mode {
        Mode::Precopy | Mode::Unix | Mode::Tls => {}
        Mode::Connections(n) => req.connections = n,
        Mode::Settled { postcopy, .. } => req.postcopy_after = postcopy.then_some(0),
        Mode::Local => req.local = true,
        Mode::Capped { postcopy, limit, .. } => {
            req.bandwidth_limit = Some(limit);
            req.postcopy_after = postcopy.then_some(0);
        }
    }
    // The guest's own rate over a second before the migration.
    let pages = match mode {
        Mode::Capped { pages, .. } => Some(pages),
        _ => None,
    };
    let before = match pages {
        Some(p) => {
            let (t0, w0) = (std::time::Instant::now(), guest_writes(&src_mem, p)?);
            std::thread::sleep(Duration::from_secs(1));
            let (t1, w1) = (std::time::Instant::now(), guest_writes(&src_mem, p)?);
            Some(((w1 - w0) as f64 / (t1 - t0).as_secs_f64(), t1, w1))
        }
        None => None,
    };
    let v: Value = api.call(&Request::Migrate(req))?;
    // ... and over the migration, to its table on the destination.
    let guest_rate = match (before, pages, v["ok"] == true) {
        (Some((rate, t1, w1)), Some(p), true) => {
            let w2 = guest_writes(&dst_mem, p)?;
            [rate, w2.saturating_sub(w1) as f64 / t1.elapsed().as_secs_f64()]
        }
        _ => [f64::NAN; 2],
    };
    if v["ok"] != true {
        bail!("smudge migration failed: {v}");
    }
    let status = src.0.wait()?;
    if status.code() != Some(0) {
        bail!("the source ended with {status} after migrating");
    }
    drop(dest);
    for f in [&src_mem, &dst_mem, &serial] {
        std::fs::remove_file(f).ok();
    }
    let n = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(Figures {
        total_ms: n("total_ms"),
        downtime_ms: v["stop_to_running_ms"]
            .as_f64()
            .context("smudge's destination did not say when its guest ran (stop_to_running_ms)")?,
        reported_downtime_ms: n("downtime_ms"),
        rounds: v["rounds"].as_array().map_or(f64::NAN, |r| r.len() as f64),
        mib: n("bytes_sent") / (1u64 << 20) as f64,
        parts: ["pause_ms", "residue_ms", "state_ms", "destination_ms"]
            .map(|k| v["downtime_parts"][k].as_f64().unwrap_or(f64::NAN)),
        postcopy_steps: ["first_request_ms", "sent_ms", "acked_ms"]
            .map(|k| v["postcopy"][k].as_f64().unwrap_or(f64::NAN)),
        guest_rate,
        max_throttle_pct: v["rounds"]
            .as_array()
            .map_or(f64::NAN, |r| r.iter().filter_map(|x| x["throttle_pct"].as_f64()).fold(0.0, f64::max)),
        handshake_ms: n("handshake_ms"),
        on_demand: v["postcopy"]["pages_on_demand"].as_f64().unwrap_or(0.0),
        round0_mbps: match (v["rounds"][0]["bytes"].as_f64(), v["rounds"][0]["ms"].as_f64()) {
            (Some(b), Some(ms)) if ms > 0.0 => b / ms / 1e3,
            _ => f64::NAN,
        },
    })
}

/// What every migration of one run of the benchmark shares.
struct Setup<'a> {
    dir: &'a Path,
    /// Guest RAM (`--mem-size`), and in MiB for QEMU.
    mem: &'static str,
    mib: u64,
    warm: Duration,
    budget_ms: u64,
    runs: usize,
    label: &'static str,
    /// The guest ELF, for QEMU.
    elf: PathBuf,
    /// The TSC frequency, for QEMU's guest.
    khz: u32,
}

impl Setup<'_> {
    /// `runs` smudge migrations of a guest running `cmdline`, in `mode`.
    fn smudge_runs(&self, cmdline: &str, mode: Mode) -> anyhow::Result<Vec<Figures>> {
        (0..self.runs).map(|_| smudge_once(self.dir, self.mem, cmdline, self.warm, self.budget_ms, mode)).collect()
    }

    /// One QEMU migration of a guest running `cmdline`.
    fn qemu_once(&self, cmdline: &str) -> anyhow::Result<Figures> {
        let q = qemu_migrate::migrate(&QemuMigrateConfig {
            elf: self.elf.clone(),
            mem_mib: self.mib,
            cmdline: format!("{cmdline} tsc_khz={}", self.khz),
            downtime_limit_ms: self.budget_ms,
            warmup: self.warm,
            max_bandwidth: None,
            timeout: Duration::from_secs(300),
        })?;
        Ok(Figures {
            total_ms: q.total_ms,
            downtime_ms: q.stop_to_resume_ms.context("QEMU's STOP/RESUME events were not seen")?,
            reported_downtime_ms: q.downtime_ms,
            rounds: q.rounds as f64,
            mib: q.bytes as f64 / (1u64 << 20) as f64,
            parts: [f64::NAN; 4],
            on_demand: 0.0,
            round0_mbps: f64::NAN,
            postcopy_steps: [f64::NAN; 3],
            guest_rate: [f64::NAN; 2],
            max_throttle_pct: f64::NAN,
            handshake_ms: f64::NAN,
        })
    }
}

/// The median of one figure.
fn med(v: &[Figures], f: fn(&Figures) -> f64) -> f64 {
    median(&v.iter().map(f).collect::<Vec<_>>())
}

/// Runs the benchmark.
pub fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let scratch = Scratch::new(args.dir.as_deref())?;
    let dir = scratch.path();
    let (mem, mib, pages, warm, label) = if args.quick {
        ("64M", 64u64, 4000u64, Duration::from_millis(800), "64 MiB")
    } else {
        ("1G", 1024, 65536, Duration::from_secs(3), "1 GiB")
    };
    let cases: &[(&str, u64)] =
        if args.quick { &[("~20 MB/s", 5000)] } else { &[("idle", 10), ("~20 MB/s", 5000), ("~200 MB/s", 50000)] };
    let elf: PathBuf = dir.join("guest.elf");
    std::fs::write(&elf, smudge_vmm::vm::guest_image::GUEST_ELF)
        .with_context(|| format!("writing {}", elf.display()))?;
    let setup = Setup {
        dir,
        mem,
        mib,
        warm,
        budget_ms: DEFAULT_DOWNTIME.as_millis() as u64,
        runs: args.runs.unwrap_or(if args.quick { 1 } else { 2 }),
        label,
        elf,
        khz: tsc_khz()?,
    };
    let mut rep = Report::new("migrate");
    rep.bracketed(
        &format!("{label}, every migration (smudge, QEMU, Cloud Hypervisor)"),
        "warm_up_ms",
        warm.as_secs_f64() * 1e3,
        "the guest's serial line 'workload: working set ready' (its working set laid out and zeroed) to the \
         migration request: each migration starts this long after its guest reported its working set ready",
    );
    let fastest = cases.iter().map(|c| c.1).max().unwrap_or(0);
    let cmdline = |rate: u64| format!("workload=rate rate={rate} pages={pages} seed=7 ms=600000 wipe=1");
    // Hidden: `SMUDGE_BENCH_MIGRATE=tls` runs only the TLS-beside-plain rows.
    if std::env::var_os("SMUDGE_BENCH_MIGRATE").is_some_and(|v| v == "tls") {
        for &(case, rate) in cases.iter().filter(|c| c.1 == fastest || c.1 == cases[0].1) {
            tls_beside_plain(&setup, &mut rep, case, &cmdline(rate))?;
        }
        return Ok(rep);
    }
    let mut qemu_downtime = Vec::new();
    for &(case, rate) in cases {
        let ours = against_qemu(&setup, &mut rep, case, &cmdline(rate), &mut qemu_downtime)?;
        against_cloud_hypervisor(&setup, &mut rep, case, &cmdline(rate), &ours, Link::Tcp)?;
        over_unix_sockets(&setup, &mut rep, case, &cmdline(rate))?;
        if rate == fastest || rate == cases[0].1 {
            connections(&setup, &mut rep, case, &cmdline(rate), &ours)?;
            tls_beside_plain(&setup, &mut rep, case, &cmdline(rate))?;
        }
        if rate == fastest {
            postcopy(&setup, &mut rep, case, &cmdline(rate), pages)?;
        }
    }
    local_handover(&setup, &mut rep, cases[0].0, &cmdline(cases[0].1), qemu_downtime[0])?;
    faster_than_the_link(&setup, &mut rep, args.quick)?;
    Ok(rep)
}

/// smudge's pre-copy against QEMU on a guest running `cmdline`, runs
/// alternating (drift on a shared machine hits both alike): their figures
/// and goals. Returns smudge's figures; QEMU's median downtime goes to
/// `qemu_downtime`.
fn against_qemu(
    s: &Setup,
    rep: &mut Report,
    case: &str,
    cmdline: &str,
    qemu_downtime: &mut Vec<f64>,
) -> anyhow::Result<Vec<Figures>> {
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..s.runs {
        ours.push(smudge_once(s.dir, s.mem, cmdline, s.warm, s.budget_ms, Mode::Precopy)?);
        theirs.push(s.qemu_once(cmdline)?);
    }
    smudge_rows(rep, &format!("{}, {case}, budget {} ms: smudge", s.label, s.budget_ms), &ours);
    let c = format!("{}, {case}, budget {} ms: qemu", s.label, s.budget_ms);
    rep.result(&c, "total_ms", med(&theirs, |f| f.total_ms));
    let brackets = "the source's STOP event to the destination's RESUME event (QMP timestamps)";
    rep.bracketed(&c, "downtime_ms", med(&theirs, |f| f.downtime_ms), brackets);
    rep.result(&c, "qemu_reported_downtime_ms", med(&theirs, |f| f.reported_downtime_ms));
    rep.result(&c, "rounds", med(&theirs, |f| f.rounds));
    rep.result(&c, "sent_mib", med(&theirs, |f| f.mib));
    rep.goal(
        &format!("{case}: downtime (stop to running) smudge / QEMU"),
        med(&ours, |f| f.downtime_ms) / med(&theirs, |f| f.downtime_ms),
        1.0 / 3.0,
        "lower",
    );
    rep.goal(
        &format!("{case}: total time smudge / QEMU"),
        med(&ours, |f| f.total_ms) / med(&theirs, |f| f.total_ms),
        1.0,
        "lower",
    );
    qemu_downtime.push(med(&theirs, |f| f.downtime_ms));
    Ok(ours)
}

/// smudge's pre-copy figures (`v`) under case `c`: times, the downtime's
/// parts, rounds and data sent.
fn smudge_rows(rep: &mut Report, c: &str, v: &[Figures]) {
    rep.result(c, "total_ms", med(v, |f| f.total_ms));
    let brackets = "the source's pause start to its destination's running_at (stop_to_running_ms, realtime clock)";
    rep.bracketed(c, "downtime_ms", med(v, |f| f.downtime_ms), brackets);
    rep.result(c, "downtime_to_ack_ms", med(v, |f| f.reported_downtime_ms));
    for (i, k) in ["pause_ms", "residue_ms", "state_ms", "destination_ms"].iter().enumerate() {
        let part = median(&v.iter().map(|f| f.parts[i]).collect::<Vec<_>>());
        rep.result(c, &format!("downtime_{k}"), part);
    }
    rep.result(c, "rounds", med(v, |f| f.rounds));
    rep.result(c, "sent_mib", med(v, |f| f.mib));
}

/// smudge's pre-copy over a unix socket: its figures, then against Cloud
/// Hypervisor's over one.
fn over_unix_sockets(s: &Setup, rep: &mut Report, case: &str, cmdline: &str) -> anyhow::Result<()> {
    let ours = s.smudge_runs(cmdline, Mode::Unix)?;
    smudge_rows(rep, &format!("{}, {case}, budget {} ms: smudge, unix socket", s.label, s.budget_ms), &ours);
    against_cloud_hypervisor(s, rep, case, cmdline, &ours, Link::Unix)
}

/// smudge's pre-copy (`ours`) against Cloud Hypervisor's over `link`,
/// same guest and downtime goal, same run: its figures and the goals, or
/// a row saying it is not found.
fn against_cloud_hypervisor(
    s: &Setup,
    rep: &mut Report,
    case: &str,
    cmdline: &str,
    ours: &[Figures],
    link: Link,
) -> anyhow::Result<()> {
    let c = format!("{}, {case}, budget {} ms: Cloud Hypervisor, {link}", s.label, s.budget_ms);
    let Some(bin) = Peer::CloudHypervisor.find() else {
        rep.missing(&c, "downtime_ms, total_ms", NOT_FOUND);
        return Ok(());
    };
    let cmdline = format!("{cmdline} tsc_khz={}", s.khz);
    let peer = migrate_peers::Case {
        bin: &bin,
        dir: s.dir,
        elf: &s.elf,
        cmdline: &cmdline,
        mem_mib: s.mib,
        warm: s.warm,
        downtime_ms: s.budget_ms,
        link,
    };
    let theirs = (0..s.runs).map(|_| migrate_peers::migrate_once(&peer)).collect::<anyhow::Result<Vec<_>>>()?;
    let m = |f: fn(&migrate_peers::Figures) -> f64| median(&theirs.iter().map(f).collect::<Vec<_>>());
    let (total, downtime) = (m(|f| f.total_ms), m(|f| f.downtime_ms));
    rep.bracketed(&c, "total_ms", total, migrate_peers::TOTAL_BRACKETS);
    rep.bracketed(&c, "downtime_ms", downtime, migrate_peers::DOWNTIME_BRACKETS);
    rep.result(&c, "reported_downtime_ms", m(|f| f.reported_downtime_ms));
    let ours_down = med(ours, |f| f.downtime_ms);
    rep.goal(&format!("{case}: {link} downtime smudge / Cloud Hypervisor"), ours_down / downtime, 0.1, "lower");
    rep.goal(
        &format!("{case}: {link} total time smudge / Cloud Hypervisor"),
        med(ours, |f| f.total_ms) / total,
        0.5,
        "lower",
    );
    Ok(())
}

/// Parallel page streams against one (`ours`), same guest, same run.
fn connections(s: &Setup, rep: &mut Report, case: &str, cmdline: &str, ours: &[Figures]) -> anyhow::Result<()> {
    for n in [2u32, 4] {
        let multi = s.smudge_runs(cmdline, Mode::Connections(n))?;
        let c = format!("{}, {case}: smudge --connections {n}", s.label);
        rep.result(&c, "total_ms", med(&multi, |f| f.total_ms));
        rep.result(&c, "downtime_ms", med(&multi, |f| f.downtime_ms));
        rep.result(&c, "round0_mb_per_s", med(&multi, |f| f.round0_mbps));
        rep.result(&c, "total_vs_1_connection", med(&multi, |f| f.total_ms) / med(ours, |f| f.total_ms));
    }
    rep.result(
        &format!("{}, {case}: smudge --connections 1", s.label),
        "round0_mb_per_s",
        med(ours, |f| f.round0_mbps),
    );
    Ok(())
}

/// Post-copy against pre-copy, runs alternating, each once the guest
/// wrote through its `pages`-page working set (both move the same data:
/// the stamped working set, not a guest still zeroing it), both into a
/// destination memory file on /dev/shm.
fn postcopy(s: &Setup, rep: &mut Report, case: &str, cmdline: &str, pages: u64) -> anyhow::Result<()> {
    let (mut ours, mut post) = (Vec::new(), Vec::new());
    for _ in 0..s.runs {
        let once =
            |postcopy| smudge_once(s.dir, s.mem, cmdline, s.warm, s.budget_ms, Mode::Settled { postcopy, pages });
        ours.push(once(false)?);
        post.push(once(true)?);
    }
    let c = format!("{}, {case}, working set written through: smudge pre-copy", s.label);
    rep.result(&c, "total_ms", med(&ours, |f| f.total_ms));
    rep.result(&c, "downtime_ms", med(&ours, |f| f.downtime_ms));
    rep.result(&c, "rounds", med(&ours, |f| f.rounds));
    rep.result(&c, "sent_mib", med(&ours, |f| f.mib));
    let c = format!("{}, {case}, working set written through: smudge post-copy", s.label);
    rep.result(&c, "total_ms", med(&post, |f| f.total_ms));
    rep.result(&c, "downtime_ms", med(&post, |f| f.downtime_ms));
    rep.result(&c, "downtime_to_ack_ms", med(&post, |f| f.reported_downtime_ms));
    rep.result(&c, "pages_on_demand", med(&post, |f| f.on_demand));
    rep.result(&c, "sent_mib", med(&post, |f| f.mib));
    // Where its time goes: the switchover's parts, then the phase.
    for (i, k) in ["pause_ms", "residue_ms", "state_ms", "destination_ms"].iter().enumerate() {
        rep.result(&c, &format!("downtime_{k}"), median(&post.iter().map(|f| f.parts[i]).collect::<Vec<_>>()));
    }
    for (i, k) in ["first_request_ms", "all_sent_ms", "all_placed_ms"].iter().enumerate() {
        let step = median(&post.iter().map(|f| f.postcopy_steps[i]).collect::<Vec<_>>());
        rep.bracketed(&c, &format!("after_running_{k}"), step, "from the destination's guest running");
    }
    // What post-copy is for: done sooner than pre-copy on a guest that
    // dirties fast, its switch-over as short. (Its downtime against
    // pre-copy's is no goal: pre-copy's residue is already ~1 ms.)
    rep.goal(
        &format!("{case}: post-copy total time / pre-copy total time"),
        med(&post, |f| f.total_ms) / med(&ours, |f| f.total_ms),
        0.6,
        "lower",
    );
    rep.goal(&format!("{case}: post-copy downtime / 1 ms"), med(&post, |f| f.downtime_ms) / 1.0, 1.0, "lower");
    rep.result(
        &format!("{}, {case}: post-copy downtime / pre-copy downtime (informational)", s.label),
        "ratio",
        med(&post, |f| f.downtime_ms) / med(&ours, |f| f.downtime_ms),
    );
    Ok(())
}

/// Same-host handover, where only vCPU/device state crosses, against
/// QEMU's downtime on the same guest.
fn local_handover(s: &Setup, rep: &mut Report, case: &str, cmdline: &str, qemu_downtime: f64) -> anyhow::Result<()> {
    let local = s.smudge_runs(cmdline, Mode::Local)?;
    let c = format!("{}, {case}: smudge --local handover", s.label);
    rep.result(&c, "downtime_ms", med(&local, |f| f.downtime_ms));
    rep.result(&c, "downtime_to_ack_ms", med(&local, |f| f.reported_downtime_ms));
    rep.result(&c, "total_ms", med(&local, |f| f.total_ms));
    rep.result(&c, "sent_kib", med(&local, |f| f.mib) * 1024.0);
    rep.goal(
        &format!("{case}: --local downtime / QEMU downtime"),
        med(&local, |f| f.downtime_ms) / qemu_downtime,
        1.0 / 3.0,
        "lower",
    );
    Ok(())
}

/// A guest dirtying ~4x what `--bandwidth-limit` lets through, moved by
/// pre-copy with auto-converge and by post-copy, same run: each one's
/// time, downtime, throttle and the guest's own slowdown.
fn faster_than_the_link(s: &Setup, rep: &mut Report, quick: bool) -> anyhow::Result<()> {
    // Random writes over a working set the link carries in about a second.
    let (pages, rate, limit) = if quick { (2048u64, 10_000u64, 10u64 << 20) } else { (4096, 20_000, 20 << 20) };
    let cmdline = format!("workload=rate rate={rate} pages={pages} seed=9 ms=600000 wipe=1");
    let case = format!(
        "{}, guest dirtying {rate} pages/s (~{:.0} MB/s) over {} MiB, --bandwidth-limit {} MiB/s",
        s.label,
        rate as f64 * 4096.0 / 1e6,
        (pages * 4096) >> 20,
        limit >> 20
    );
    for postcopy in [false, true] {
        let runs = s.smudge_runs(&cmdline, Mode::Capped { postcopy, limit, pages })?;
        let how = if postcopy { "smudge post-copy" } else { "smudge pre-copy with auto-converge" };
        let c = format!("{case}: {how}");
        rep.result(&c, "total_ms", med(&runs, |f| f.total_ms));
        rep.result(&c, "downtime_ms", med(&runs, |f| f.downtime_ms));
        rep.result(&c, "rounds", med(&runs, |f| f.rounds));
        rep.result(&c, "max_throttle_pct", med(&runs, |f| f.max_throttle_pct));
        let brackets = "the guest's own writes (its generation table): a second before the request, and from \
                        the request to the destination's table read after the answer";
        rep.bracketed(&c, "guest_writes_per_s_before", med(&runs, |f| f.guest_rate[0]), brackets);
        rep.bracketed(&c, "guest_writes_per_s_during", med(&runs, |f| f.guest_rate[1]), brackets);
        rep.result(&c, "guest_slowdown_pct", med(&runs, |f| (1.0 - f.guest_rate[1] / f.guest_rate[0]) * 100.0));
    }
    Ok(())
}

/// Where a run's throwaway TLS credentials are, in its scratch directory.
const TLS_CREDS: &str = "tls-creds";

/// Writes throwaway credentials laid out as `--tls-creds` wants them into
/// `dir`: a CA, the destination's certificate for loopback (`localhost`,
/// `127.0.0.1`), the source's, both signed by the CA.
fn throwaway_creds(dir: &Path) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use smudge_vmm::migrate::tls::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::write(&p, pem).with_context(|| format!("writing {}", p.display()))
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "smudge bench CA");
    let ca = ca.self_signed(&ca_key)?;
    write(CA_CERT, ca.pem())?;
    for (cert, key, names) in [
        (SERVER_CERT, SERVER_KEY, vec!["localhost".to_string(), "127.0.0.1".to_string()]),
        (CLIENT_CERT, CLIENT_KEY, vec!["source".to_string()]),
    ] {
        let k = KeyPair::generate()?;
        write(cert, CertificateParams::new(names)?.signed_by(&k, &ca, &ca_key)?.pem())?;
        write(key, k.serialize_pem())?;
    }
    Ok(())
}

/// Pre-copy with TLS against plain TCP, runs alternating, same guest:
/// each one's figures, the goals (TLS total time within 1.25x plain's,
/// TLS downtime within plain's + 0.5 ms) and the handshake's time.
fn tls_beside_plain(s: &Setup, rep: &mut Report, case: &str, cmdline: &str) -> anyhow::Result<()> {
    let creds = s.dir.join(TLS_CREDS);
    if !creds.join(smudge_vmm::migrate::tls::CA_CERT).exists() {
        throwaway_creds(&creds)?;
    }
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for _ in 0..s.runs {
        plain.push(smudge_once(s.dir, s.mem, cmdline, s.warm, s.budget_ms, Mode::Precopy)?);
        tls.push(smudge_once(s.dir, s.mem, cmdline, s.warm, s.budget_ms, Mode::Tls)?);
    }
    for (how, v) in [("plain TCP", &plain), ("TLS 1.3", &tls)] {
        let c = format!("{}, {case}, budget {} ms: smudge, {how}", s.label, s.budget_ms);
        smudge_rows(rep, &c, v);
        let brackets = "connect (and TLS handshake), before round 0: in the total time, not in the downtime";
        rep.bracketed(&c, "handshake_ms", med(v, |f| f.handshake_ms), brackets);
        rep.result(&c, "handshake_share_of_total", med(v, |f| f.handshake_ms / f.total_ms));
    }
    let (plain_down, tls_down) = (med(&plain, |f| f.downtime_ms), med(&tls, |f| f.downtime_ms));
    rep.result(&format!("{}, {case}: TLS 1.3 - plain TCP", s.label), "downtime_ms", tls_down - plain_down);
    rep.goal(
        &format!("{case}: TLS total time / plain TCP total time"),
        med(&tls, |f| f.total_ms) / med(&plain, |f| f.total_ms),
        1.25,
        "lower",
    );
    rep.goal(
        &format!("{case}: TLS downtime / (plain TCP downtime + 0.5 ms)"),
        tls_down / (plain_down + 0.5),
        1.0,
        "lower",
    );
    Ok(())
}
