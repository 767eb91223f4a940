//! `smudge bench reliability`: a campaign that abuses smudge the ways a
//! user, a guest or a disk can, and counts what happened — trials, clear
//! errors, lost pages, panics:
//!
//! - `kill -9` of the VMM while writeback runs (the guest paused first),
//!   then every page of the memory file checked against the guest's own
//!   generation table: each must hold the stamp the guest last wrote (one
//!   page may carry the stamp being written when the vCPU stopped);
//! - `kill -9` in the middle of a diff snapshot: the last committed
//!   snapshot must verify and restore to exactly its memory, the torn one
//!   must be refused;
//! - corrupted snapshots (bit flips, truncations, a newer version, a
//!   missing parent): refused with an error, or — never — garbage restored;
//! - bad migration streams (bit flips, truncations, repeated and dropped
//!   frames) fed to the destination's receiver: refused, or the memory
//!   built is exactly the source's;
//! - hostile TLS peers (`hostile_tls`): a peer with the key that sends
//!   garbage, a damaged or cut stream, or nothing, to a real destination;
//! - `kill -9` of a durable guest (`--journal`) at a random instant after a
//!   random number of committed epochs: recovery must land on an epoch no
//!   older than the newest the VMM had reported committed (no lost epoch),
//!   and its RAM must pass the same page check (no wrong recovery);
//! - EIO on a durable guest's base image (a loop device cut under ext4):
//!   the checkpoint fails, the guest runs on, `kill -9`; a restore while
//!   the disk fails must be refused clearly, the journal left as it was,
//!   and once the disk is back recovery passes the same two checks;
//! - a misbehaving guest: an unknown port, a CPU exception, a triple fault
//!   right after writing (every page it wrote must be in the file), a write
//!   storm against a tiny hard dirty limit (it must finish and verify).
//!
//! A child process counts as panicked when its stderr says so.

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use smudge::control::{Client, Request, SnapshotRequest};
use smudge::migration::frame::{Frame, FrameReader, FrameWriter, Hello, PAGE};
use smudge::migration::receiver::{check_hello, Receiver, Step};
use smudge_vmm::control::cli::BenchArgs;

mod hostile_tls;

use crate::report::Report;
use crate::setup::{run_args, smudge, start_vm, Scratch};

/// Counts for one kind of abuse.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    trials: u64,
    /// Bad inputs answered with a clear error (for kinds that are bad input).
    clear_errors: u64,
    /// Bad inputs among the trials (the denominator of the error share).
    bad_inputs: u64,
    lost_pages: u64,
    panics: u64,
    /// Committed epochs a recovery did not reach.
    lost_epochs: u64,
    /// Recoveries whose RAM failed the page check.
    wrong_recoveries: u64,
}

/// A small deterministic PRNG (the campaign is reproducible by seed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

fn panicked(o: &Output) -> bool {
    String::from_utf8_lossy(&o.stderr).contains("panicked")
}

/// `smudge run` of 64 MiB with a control socket, its stderr piped (to see
/// a panic).
fn spawn_with_api(mem: &Path, sock: &Path, cmdline: &str, extra: &[&str]) -> anyhow::Result<(Child, Client)> {
    start_vm(mem, sock, "64M", cmdline, 60, extra, Stdio::piped())
}

/// Kills `child` with SIGKILL and reports whether its stderr shows a panic.
fn kill9(mut child: Child) -> anyhow::Result<bool> {
    child.kill()?;
    let out = child.wait_with_output()?;
    Ok(panicked(&out))
}

/// `mismatches=N` of the guest's verify line.
fn mismatches(stdout: &[u8]) -> Option<u64> {
    String::from_utf8_lossy(stdout).lines().find_map(|l| {
        l.strip_prefix("verify: ")?.split_whitespace().find_map(|w| w.strip_prefix("mismatches=")?.parse().ok())
    })
}

/// Checks every working-set page of the memory file `mem` against the
/// guest's own generation table (which the guest updates just before it
/// stamps the page). Returns (pages holding an older or torn stamp than the
/// table says, of which at most one may be the write in flight when the
/// vCPU stopped).
fn stale_pages(mem: &Path, pages: u64) -> anyhow::Result<(u64, u64)> {
    let bytes = std::fs::read(mem)?;
    let word = |off: u64| -> u64 {
        let o = off as usize;
        bytes.get(o..o + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let base = guest_abi::ws_base_for(pages);
    let (mut stale, mut in_flight, mut stamped) = (0, 0, 0);
    for i in 0..pages {
        let t = guest_abi::gen_table_addr(i) as usize;
        let expected = bytes.get(t..t + 4).map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])));
        stamped += u64::from(expected > 0);
        let off = base + i * PAGE;
        let header = [word(off), word(off + 8), word(off + 16), word(off + 24)];
        match guest_abi::check_page((off >> 12) as u64, u64::from(expected), header, word(off + 4088)) {
            guest_abi::PageCheck::Ok => {}
            // The table is one ahead: the stamp was being written.
            guest_abi::PageCheck::WrongGeneration { found } if found + 1 == u64::from(expected) && in_flight == 0 => {
                in_flight += 1
            }
            guest_abi::PageCheck::Corrupt if in_flight == 0 => in_flight += 1,
            _ => stale += 1,
        }
    }
    if stamped == 0 {
        bail!("{}: the guest had stamped no page: nothing was checked", mem.display());
    }
    Ok((stale, in_flight))
}

fn kill_during_writeback(dir: &Path, n: u64, rng: &mut Rng) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    for i in 0..n {
        let (mem, sock) = (dir.join(format!("wb{i}.mem")), dir.join(format!("wb{i}.sock")));
        let pages = 6000;
        let cmdline = format!("workload=rate pages={pages} rate=20000 ms=60000 seed=17");
        let (vm, api) =
            spawn_with_api(&mem, &sock, &cmdline, &["--dirty-expire-ms", "100", "--dirty-writeback-ms", "20"])?;
        std::thread::sleep(Duration::from_millis(150 + rng.below(500)));
        // The guest stops; the flusher may be mid-pass when the kill lands.
        let paused = api.call(&Request::Pause)?;
        if paused["ok"] != true {
            bail!("pause failed: {paused}");
        }
        std::thread::sleep(Duration::from_micros(rng.below(30_000)));
        t.panics += u64::from(kill9(vm)?);
        // Every page must hold what the guest's table says it last wrote.
        let (stale, _in_flight) = stale_pages(&mem, pages)?;
        t.lost_pages += stale;
        t.trials += 1;
        std::fs::remove_file(&mem).ok();
    }
    Ok(t)
}

fn kill_during_snapshot(dir: &Path, n: u64, rng: &mut Rng) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    for i in 0..n {
        let d = dir.join(format!("snapkill{i}"));
        std::fs::create_dir_all(&d)?;
        let (mem, sock, s0, s1) = (d.join("m"), d.join("sock"), d.join("s0"), d.join("s1"));
        let (vm, api) = spawn_with_api(&mem, &sock, "workload=random pages=2500 seed=3 ms=100000 wipe=1", &[])?;
        let r = api.call(&Request::Snapshot(SnapshotRequest::full(&s0)))?;
        if r["ok"] != true {
            bail!("snapshot failed: {r}");
        }
        let mut client = smudge()?
            .args(["ctl", "--api-sock"])
            .arg(&sock)
            .args(["snapshot", "create"])
            .arg(&s1)
            .arg("--parent")
            .arg(&s0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_micros(rng.below(40_000)));
        t.panics += u64::from(kill9(vm)?);
        let _ = client.wait();
        // The committed one must be whole and restore to its own bytes.
        let restored = d.join("r0");
        match smudge::snapshot::materialize(&s0, &restored) {
            Ok(_) => {}
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "reliability: committed snapshot lost: {e}");
                t.lost_pages += 1;
            }
        }
        // The torn one: whole, or refused.
        if let Ok(links) = smudge::snapshot::chain(&s1) {
            if links.len() != 2 {
                t.lost_pages += 1;
            }
        }
        t.trials += 1;
        std::fs::remove_dir_all(&d).ok();
    }
    Ok(t)
}

/// The page writes the guest's generation table in `mem` counts (0 while
/// the file is still short).
fn guest_writes(mem: &Path, pages: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; pages as usize * 4];
    let read = std::fs::File::open(mem).and_then(|f| f.read_exact_at(&mut buf, guest_abi::gen_table_addr(0)));
    if read.is_err() {
        return 0;
    }
    buf.chunks_exact(4).map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))).sum()
}

/// The newest committed epoch a `stats` answer reports.
fn committed(api: &Client) -> anyhow::Result<u64> {
    let s = api.call(&Request::Stats)?;
    s["journal"]["newest_committed"].as_u64().with_context(|| format!("no journal.newest_committed in {s}"))
}

/// Recovers the newest epoch of journal `j` into `out` and counts, against
/// `seen` (the newest the VMM reported committed), lost epochs, and pages
/// that fail the check (a wrong recovery); one trial more. Then removes
/// the trial's files (`mem`, the guest's memory file).
fn tally_recovery(t: &mut Tally, (j, out, mem): (&Path, &Path, &Path), seen: u64, pages: u64) -> anyhow::Result<()> {
    match smudge::journal::recover(j, smudge::journal::Target::Newest, out) {
        Ok(r) => {
            t.lost_epochs += seen.saturating_sub(r.epoch.epoch);
            let (stale, _in_flight) = stale_pages(out, pages)?;
            t.lost_pages += stale;
            t.wrong_recoveries += u64::from(stale > 0);
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "reliability: journal {} not recovered: {e}", j.display());
            t.lost_epochs += seen;
        }
    }
    t.trials += 1;
    std::fs::remove_file(mem).ok();
    std::fs::remove_file(out).ok();
    std::fs::remove_dir_all(j).ok();
    Ok(())
}

fn kill_durable_guests(dir: &Path, n: u64, rng: &mut Rng) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let pages = 4000;
    for i in 0..n {
        let (mem, sock, j, out) = (
            dir.join(format!("dur{i}.mem")),
            dir.join(format!("dur{i}.sock")),
            dir.join(format!("dur{i}.j")),
            dir.join(format!("dur{i}.rec")),
        );
        let cmdline = format!("workload=rate pages={pages} rate=4000 writes=1000000000 seed={} wipe=1", 40 + i);
        let epoch_ms = ["5", "10", "20"][(i % 3) as usize];
        let (vm, api) =
            spawn_with_api(&mem, &sock, &cmdline, &["--journal", &j.to_string_lossy(), "--epoch-ms", epoch_ms])?;
        // The guest stamps pages; then a random number of committed
        // epochs after that, then a random instant.
        let t0 = std::time::Instant::now();
        while guest_writes(&mem, pages) < 100 {
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = kill9(vm);
                bail!("trial {i}: the guest made no 100 page writes in 60 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let want = committed(&api)? + 1 + rng.below(30);
        let mut seen = committed(&api)?;
        while seen < want {
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = kill9(vm);
                bail!("trial {i}: the journal committed only {seen} epochs in 60 s");
            }
            std::thread::sleep(Duration::from_millis(2));
            seen = committed(&api)?;
        }
        std::thread::sleep(Duration::from_micros(rng.below(30_000)));
        t.panics += u64::from(kill9(vm)?);
        tally_recovery(&mut t, (&j, &out, &mem), seen, pages)?;
    }
    Ok(t)
}

/// The first `stats` answer (polled for up to 60 s) that `ok` accepts.
fn wait_stats(api: &Client, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> anyhow::Result<serde_json::Value> {
    let t0 = std::time::Instant::now();
    loop {
        let s = api.call(&Request::Stats)?;
        if ok(&s) {
            return Ok(s);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("waited 60 s for {what}; the last stats: {s}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The journal's own files (not its base image) and their bytes.
fn journal_files(j: &Path) -> anyhow::Result<Vec<(std::path::PathBuf, Vec<u8>)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(j)? {
        let p = e?.path();
        if p.file_name().is_some_and(|n| n != smudge::journal::BASE) {
            let bytes = std::fs::read(&p)?;
            v.push((p, bytes));
        }
    }
    v.sort();
    Ok(v)
}

/// EIO on a durable guest's base image — a real one: ext4 on a loop device
/// cut under it (testkit's `FailingDisk`) — after a random number of
/// committed epochs, then `kill -9` a random number of epochs after the
/// failure was reported. A restore while the disk fails is a bad input: it
/// must be refused naming the base image, leaving the journal as it was;
/// once the disk is back, recovery must reach the newest epoch reported
/// committed and pass the page check.
fn eio_on_the_base_image(dir: &Path, n: u64, rng: &mut Rng) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let pages = 4000;
    for i in 0..n {
        let disk = smudge_testkit::FailingDisk::new(&dir.join(format!("eio{i}.disk")), 256 << 20)
            .context("a failing disk (needs root, losetup, mkfs.ext4)")?;
        let (mem, sock, j, out) = (
            dir.join(format!("eio{i}.mem")),
            dir.join(format!("eio{i}.sock")),
            dir.join(format!("eio{i}.j")),
            dir.join(format!("eio{i}.rec")),
        );
        std::fs::create_dir(&j)?;
        let base = j.join(smudge::journal::BASE);
        std::os::unix::fs::symlink(disk.mount.join(smudge::journal::BASE), &base)?;
        let cmdline = format!("workload=rate pages={pages} rate=4000 writes=1000000000 seed={} wipe=1", 70 + i);
        let args = ["--journal", &j.to_string_lossy(), "--epoch-ms", "10", "--retain", "100ms"];
        let (vm, api) = spawn_with_api(&mem, &sock, &cmdline, &[&args[..], &["--journal-max-bytes", "64M"]].concat())?;
        let checkpoints = |s: &serde_json::Value| s["journal"]["checkpointed_segments"].as_u64().unwrap_or(0);
        let steps = (|| -> anyhow::Result<u64> {
            // Every page the guest writes already in the base (and synced:
            // one more checkpoint), a few more epochs, then the disk fails.
            let s = wait_stats(&api, "the base to hold the working set", |_| {
                smudge_testkit::holds_guest_pages(&base, pages)
            })?;
            let done = checkpoints(&s);
            wait_stats(&api, "one more checkpoint", |s| checkpoints(s) > done)?;
            let want = committed(&api)? + rng.below(20);
            wait_stats(&api, "committed epochs", |s| s["journal"]["newest_committed"].as_u64() >= Some(want))?;
            disk.fail()?;
            let s = wait_stats(&api, "the checkpoint error", |s| s["journal"]["checkpoint_error"].is_object())?;
            let want = s["journal"]["newest_committed"].as_u64().unwrap_or(0) + 1 + rng.below(30);
            wait_stats(&api, "committed epochs or a full journal", |s| {
                s["journal"]["newest_committed"].as_u64() >= Some(want)
                    || s["journal"]["checkpoint_error"]["journal_full"] == true
            })?;
            std::thread::sleep(Duration::from_micros(rng.below(30_000)));
            committed(&api)
        })();
        t.panics += u64::from(kill9(vm)?);
        let seen = steps.with_context(|| format!("EIO trial {i}"))?;
        disk.drop_cache(&disk.mount.join(smudge::journal::BASE))?;
        let before = journal_files(&j)?;
        let refused = crate::setup::smudge()?
            .args(["restore", "--journal", &j.to_string_lossy(), "--mem-file", &out.to_string_lossy()])
            .output()?;
        t.bad_inputs += 1;
        let said = String::from_utf8_lossy(&refused.stderr);
        t.clear_errors += u64::from(!refused.status.success() && said.contains("base.img") && !out.exists());
        t.panics += u64::from(panicked(&refused));
        if journal_files(&j)? != before {
            let _ = writeln!(std::io::stderr(), "reliability: a refused restore changed journal {}", j.display());
            t.lost_epochs += seen;
        }
        disk.recover()?;
        disk.remount()?;
        std::fs::remove_file(&out).ok();
        tally_recovery(&mut t, (&j, &out, &mem), seen, pages)?;
    }
    Ok(t)
}

fn corrupt_snapshots(dir: &Path, n: u64, rng: &mut Rng) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let d = dir.join("corrupt");
    std::fs::create_dir_all(&d)?;
    let (mem, sock, s0, s1) = (d.join("m"), d.join("sock"), d.join("s0"), d.join("s1"));
    let (vm, api) = spawn_with_api(&mem, &sock, "workload=rate rate=500 pages=2500 seed=9 ms=100000 wipe=1", &[])?;
    std::thread::sleep(Duration::from_millis(200));
    for (dir, parent) in [(&s0, None), (&s1, Some(&s0))] {
        let req = SnapshotRequest { parent: parent.cloned(), ..SnapshotRequest::full(dir) };
        let r = api.call(&Request::Snapshot(req))?;
        if r["ok"] != true {
            bail!("snapshot failed: {r}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    t.panics += u64::from(kill9(vm)?);
    let good_path = d.join("good");
    smudge::snapshot::materialize(&s1, &good_path)?;
    let good = std::fs::read(&good_path)?;
    let scratch = d.join("scratch");
    let mut files = Vec::new();
    for s in [&s0, &s1] {
        for name in ["manifest.json", "state.json", "memory.img", "extents.json", "memory.diff"] {
            if s.join(name).exists() {
                files.push(s.join(name));
            }
        }
    }
    let check = |t: &mut Tally| {
        let _ = std::fs::remove_file(&scratch);
        let r = std::panic::catch_unwind(|| {
            smudge::snapshot::load(&s1).and_then(|_| smudge::snapshot::materialize(&s1, &scratch))
        });
        t.trials += 1;
        t.bad_inputs += 1;
        match r {
            Err(_) => t.panics += 1,
            Ok(Err(_)) => t.clear_errors += 1,
            // Not refused: then it must be exactly the good memory.
            Ok(Ok(_)) => {
                if std::fs::read(&scratch).map(|b| b != good).unwrap_or(true) {
                    t.lost_pages += 1;
                }
            }
        }
    };
    for i in 0..n {
        let f = &files[rng.below(files.len() as u64) as usize];
        let orig = std::fs::read(f)?;
        let mut bytes = orig.clone();
        if i % 4 == 3 {
            bytes.truncate(rng.below(bytes.len() as u64) as usize);
        } else {
            let off = rng.below(bytes.len() as u64) as usize;
            bytes[off] ^= 1 << rng.below(8);
        }
        std::fs::write(f, &bytes)?;
        check(&mut t);
        std::fs::write(f, &orig)?;
    }
    // A newer version, and a missing parent.
    let m = s0.join("manifest.json");
    let orig = std::fs::read_to_string(&m)?;
    std::fs::write(&m, orig.replace("\"version\": 1", "\"version\": 2"))?;
    check(&mut t);
    std::fs::write(&m, &orig)?;
    let moved = d.join("moved");
    std::fs::rename(&s0, &moved)?;
    check(&mut t);
    std::fs::remove_dir_all(&d).ok();
    Ok(t)
}

/// A valid migration stream of a small VM and the memory it builds.
fn good_stream(rng: &mut Rng) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let mem_size = 8u64 << 20;
    let mut memory = vec![0u8; mem_size as usize];
    let mut w = FrameWriter::new(Vec::new(), true);
    w.send(&Frame::Hello(Hello::new(mem_size, 1)))?;
    let mut pages = 0;
    for _ in 0..40 {
        let p = rng.below(mem_size / PAGE);
        let off = (p * PAGE) as usize;
        let fill = (rng.below(255) + 1) as u8;
        memory[off..off + PAGE as usize].fill(fill);
        memory[off] = p as u8;
        w.send_pages(p * PAGE, &memory[off..off + PAGE as usize])?;
        pages += 1;
    }
    w.send(&Frame::RoundEnd { round: 0, pages })?;
    w.send(&Frame::State(Box::default()))?;
    w.send(&Frame::Done { pages, zero_pages: 0 })?;
    Ok((w.get_mut().clone(), memory))
}

/// Runs the destination's checks over `stream` into a new file; Ok(true)
/// when it completed.
fn receive(stream: &[u8], file: &Path) -> anyhow::Result<bool> {
    let _ = std::fs::remove_file(file);
    let mut r = FrameReader::new(stream);
    let hello = match r.next_frame().map_err(Into::into).and_then(check_hello) {
        Ok(h) => h,
        Err(_) => return Ok(false),
    };
    let f = std::fs::File::options().read(true).write(true).create_new(true).open(file)?;
    f.set_len(hello.mem_size)?;
    // A real state has one vCPU; the test stream carries none.
    let mut rx = Receiver::new(f, file, Hello { vcpus: 0, ..hello });
    loop {
        let frame = match r.next_frame() {
            Ok(f) => f,
            Err(_) => return Ok(false),
        };
        match rx.apply(frame) {
            Ok(Step::Done(_)) => return Ok(true),
            Ok(_) => {}
            Err(_) => return Ok(false),
        }
    }
}

fn bad_streams(dir: &Path, n: u64, rng: &mut Rng) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let (good, memory) = good_stream(rng)?;
    let file = dir.join("stream.mem");
    if !receive(&good, &file)? || std::fs::read(&file)? != memory {
        bail!("the good stream does not build its memory");
    }
    // Frame boundaries, to repeat and drop whole frames.
    let mut bounds = vec![0usize];
    while *bounds.last().unwrap_or(&0) < good.len() {
        let at = *bounds.last().unwrap_or(&0);
        let (_, len) = smudge::migration::frame::decode_slice(&good[at..]).context("splitting the good stream")?;
        bounds.push(at + len);
    }
    for i in 0..n {
        let bad: Vec<u8> = match i % 4 {
            0 | 1 => {
                let mut b = good.clone();
                let off = rng.below(b.len() as u64) as usize;
                b[off] ^= 1 << rng.below(8);
                b
            }
            2 => good[..rng.below(good.len() as u64) as usize].to_vec(),
            _ => {
                // Repeat or drop one frame (not the last).
                let k = 1 + rng.below(bounds.len() as u64 - 3) as usize;
                let (a, b) = (bounds[k], bounds[k + 1]);
                if rng.below(2) == 0 {
                    [&good[..b], &good[a..]].concat()
                } else {
                    [&good[..a], &good[b..]].concat()
                }
            }
        };
        t.trials += 1;
        t.bad_inputs += 1;
        match std::panic::catch_unwind(|| receive(&bad, &file)) {
            Err(_) => t.panics += 1,
            Ok(Err(e)) => return Err(e),
            Ok(Ok(false)) => t.clear_errors += 1,
            Ok(Ok(true)) => {
                if std::fs::read(&file)? != memory {
                    t.lost_pages += 1;
                }
            }
        }
    }
    std::fs::remove_file(&file).ok();
    Ok(t)
}

/// How a misbehaving-guest trial must end.
enum Expect {
    /// This exit code, and this text on stderr.
    Error(i32, &'static str),
    /// This exit code, and then every page the guest wrote (`pages` of
    /// them) must be in the memory file.
    ErrorKeepingPages(i32, &'static str, u64),
    /// Success, with the guest's own verify finding no mismatch.
    Verified,
}

fn misbehaving_guests(dir: &Path, n: u64) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let mem = dir.join("guest.mem");
    let cases: [(&str, &[&str], Expect); 4] = [
        ("workload=idle poke=0x80", &[], Expect::Error(101, "unknown I/O port 0x80")),
        ("workload=idle ms=1 fault=1", &[], Expect::Error(0x26, "CPU exception 6")),
        // Writes, then a triple fault: the VMM stops with a clear error and
        // what the guest wrote before it died is all in the file.
        (
            "workload=random pages=2000 writes=20000 seed=7 fault=triple",
            &[],
            Expect::ErrorKeepingPages(102, "triple-faulted", 2000),
        ),
        // A write storm against a 1 % hard limit: throttled, never lost.
        (
            "workload=random pages=12000 writes=60000 seed=5 verify=1",
            &["--dirty-limit", "1%", "--dirty-background", "1%"],
            Expect::Verified,
        ),
    ];
    for i in 0..n {
        let (cmdline, extra, expect) = &cases[(i % cases.len() as u64) as usize];
        std::fs::remove_file(&mem).ok();
        let out = smudge()?.args(run_args(&mem, "64M", cmdline, 60)).args(*extra).output()?;
        t.trials += 1;
        t.panics += u64::from(panicked(&out));
        let code = out.status.code().unwrap_or(-1);
        let stderr = String::from_utf8_lossy(&out.stderr);
        match *expect {
            Expect::Error(want, text) | Expect::ErrorKeepingPages(want, text, _) => {
                t.bad_inputs += 1;
                t.clear_errors += u64::from(code == want && stderr.contains(text));
            }
            Expect::Verified => match mismatches(&out.stdout) {
                Some(m) if code == 0 => t.lost_pages += m,
                _ => bail!("the write storm ended with {code}: {stderr}"),
            },
        }
        if let Expect::ErrorKeepingPages(_, _, pages) = *expect {
            let (stale, in_flight) = stale_pages(&mem, pages)?;
            // The workload had finished before the fault: nothing was in flight.
            t.lost_pages += stale + in_flight;
        }
    }
    std::fs::remove_file(&mem).ok();
    Ok(t)
}

/// Runs the campaign.
pub fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let scratch = Scratch::new(args.dir.as_deref())?;
    let dir = scratch.path();
    let scale = args.runs.unwrap_or(if args.quick { 1 } else { 5 }) as u64;
    let mut rng = Rng(0x5eed);
    let kinds: Vec<(&str, Tally)> = vec![
        ("kill -9 during writeback", kill_during_writeback(dir, 2 * scale, &mut rng)?),
        ("kill -9 during a snapshot", kill_during_snapshot(dir, 10 * scale, &mut rng)?),
        ("kill -9 of a durable guest", kill_durable_guests(dir, 20 * scale, &mut rng)?),
        ("EIO on a durable guest's base image", eio_on_the_base_image(dir, scale, &mut rng)?),
        ("corrupted snapshots", corrupt_snapshots(dir, 40 * scale, &mut rng)?),
        ("bad migration streams", bad_streams(dir, 100 * scale, &mut rng)?),
        ("hostile TLS peers", hostile_tls::hostile_tls_peers(dir, 4 * scale, &mut rng)?),
        ("misbehaving guests", misbehaving_guests(dir, 4 * scale)?),
    ];
    let mut rep = Report::new("reliability");
    let mut total = Tally::default();
    for (name, t) in &kinds {
        rep.result(name, "trials", t.trials as f64);
        rep.result(name, "clear_errors", t.clear_errors as f64);
        rep.result(name, "lost_pages", t.lost_pages as f64);
        rep.result(name, "panics", t.panics as f64);
        total.trials += t.trials;
        total.clear_errors += t.clear_errors;
        total.bad_inputs += t.bad_inputs;
        total.lost_pages += t.lost_pages;
        total.panics += t.panics;
        total.lost_epochs += t.lost_epochs;
        total.wrong_recoveries += t.wrong_recoveries;
    }
    rep.result("kill -9 of a durable guest", "lost_epochs", total.lost_epochs as f64);
    rep.result("kill -9 of a durable guest", "wrong_recoveries", total.wrong_recoveries as f64);
    rep.result("all", "trials", total.trials as f64);
    rep.goal("lost pages", total.lost_pages as f64, 0.0, "lower");
    rep.goal("panics", total.panics as f64, 0.0, "lower");
    rep.goal("committed epochs lost by a kill -9", total.lost_epochs as f64, 0.0, "lower");
    rep.goal("recoveries to a wrong state", total.wrong_recoveries as f64, 0.0, "lower");
    rep.goal(
        "bad inputs answered with a clear error (share)",
        total.clear_errors as f64 / total.bad_inputs.max(1) as f64,
        1.0,
        "higher",
    );
    Ok(rep)
}
