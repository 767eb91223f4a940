//! SIGTERM and SIGINT stop `run`, `restore` and `migrate-recv` as `ctl
//! stop` does: exit code 108, a line on stderr, the final writeback sync
//! (the memory file holds every page the guest wrote, nothing left dirty
//! in the page cache), no API socket or staging image left; a migration
//! or live snapshot in flight is abandoned (the source keeps its guest, no
//! half snapshot that verifies); a second signal exits at once (109).
//!
//! Each signal lands at its point by construction: the hidden
//! `--test-hold` makes the run wait there for it, and a relay that stops
//! forwarding holds a migration mid-way.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use smudge::control::{MigrateRequest, Request, SnapshotRequest};
use smudge_testkit::{assert_stamps, random_generations, require_kvm, smudge};
use smudge_testkit::{scratch_dir, TestVm};

/// Exit code of a clean stop on a signal (`outcome::EXIT_SIGNALLED`).
const EXIT_SIGNALLED: i32 = 108;
/// Exit code of a second signal (`outcome::EXIT_SECOND_SIGNAL`).
const EXIT_SECOND_SIGNAL: i32 = 109;
/// Every wait's limit.
const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn the_exit_codes_are_the_documented_ones() {
    assert_eq!(i32::from(smudge_vmm::vm::outcome::EXIT_SIGNALLED), EXIT_SIGNALLED);
    assert_eq!(i32::from(smudge_vmm::vm::outcome::EXIT_SECOND_SIGNAL), EXIT_SECOND_SIGNAL);
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/exit-codes.md")).unwrap();
    for code in [EXIT_SIGNALLED, EXIT_SECOND_SIGNAL] {
        assert!(readme.contains(&format!("| {code} |")), "docs/exit-codes.md's table lacks {code}");
    }
}

fn send(vm: &TestVm, sig: i32) {
    // SAFETY: kill sends a signal to the smudge child process, which this
    // test started and has not reaped (the TestVm holds it).
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, sig) }, 0, "kill {sig}");
}

/// Waits until smudge's stderr holds `pattern`; returns that line.
fn wait_for_stderr(vm: &TestVm, pattern: &str) -> String {
    let t0 = Instant::now();
    loop {
        if let Some(l) = vm.stderr().lines().find(|l| l.contains(pattern)) {
            return l.to_string();
        }
        assert!(vm.is_running(), "smudge exited before saying '{pattern}':\n{}", vm.logs());
        assert!(t0.elapsed() < LIMIT, "smudge never said '{pattern}' within {LIMIT:?}:\n{}", vm.logs());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Pages of `path` dirty or under writeback in the page cache (cachestat).
fn unsynced_pages(path: &Path) -> (u64, u64) {
    let f = std::fs::File::open(path).unwrap();
    let (range, mut out) = ([0u64, 0u64], [0u64; 5]);
    // SAFETY: cachestat (syscall 451) reads `range` (whole file) and writes
    // five u64s into `out`; both outlive the call.
    let r = unsafe { libc::syscall(451, std::os::fd::AsRawFd::as_raw_fd(&f), range.as_ptr(), out.as_mut_ptr(), 0) };
    assert_eq!(r, 0, "cachestat: {}", std::io::Error::last_os_error());
    (out[1], out[2])
}

/// `smudge snapshot verify DIR`: its exit code and output.
fn verify_snapshot(dir: &Path) -> (Option<i32>, String) {
    let out = smudge().args(["snapshot", "verify", dir.to_str().unwrap()]).output().unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A 10-minute guest writing 2000 random pages/s over 4000 pages: it is
/// writing whenever a signal lands.
const WRITING: &str = "workload=rate pages=4000 rate=2000 ms=600000 seed=5";

/// A guest that writes 20000 random pages (seed 7) over 4000 pages, then
/// spins without writing for 10 minutes: once it says `lingering`, the
/// memory file must hold exactly the stamps those writes leave.
const WRITES_THEN_LINGERS: &str = "workload=random pages=4000 writes=20000 seed=7 linger=600000";

fn assert_written_and_synced(mem: &Path, what: &str) {
    assert_stamps(&std::fs::read(mem).unwrap(), 4000, &random_generations(7, 4000, 20000));
    assert_eq!(unsynced_pages(mem), (0, 0), "{what}: dirty / writeback pages of the memory file after the stop");
}

/// The stop that once failed: a run that took a snapshot (with pre-copy, so a
/// staging image exists) gets SIGTERM. Then a restore of that snapshot gets
/// SIGINT once its guest runs.
#[test]
fn sigterm_after_a_snapshot_syncs_and_leaves_no_socket_or_staging_image() {
    require_kvm();
    let snaps = scratch_dir("signals-snaps").unwrap();
    let vm = TestVm::builder().workload(WRITING).args(["--snapshot-precopy-ms", "20"]).boot().unwrap();
    vm.wait_for_serial("layout:", LIMIT).unwrap();
    let full = snaps.path().join("full");
    vm.snapshot(&full).unwrap();
    // The next diff's pages go to a staging image beside the snapshot as
    // the guest writes on.
    let staging = snaps.path().join(".full.smudge-staging");
    let t0 = Instant::now();
    while !staging.exists() {
        assert!(t0.elapsed() < LIMIT, "no staging image appeared:\n{}", vm.logs());
        std::thread::sleep(Duration::from_millis(5));
    }
    send(&vm, libc::SIGTERM);
    let exit = vm.wait_exit(LIMIT).unwrap();
    assert_eq!(exit.code, Some(EXIT_SIGNALLED), "{exit}");
    assert!(
        exit.stderr.contains("smudge: SIGTERM: stopping: the guest pauses for good, its memory is written back"),
        "{exit}"
    );
    assert!(exit.stderr.contains("smudge: stopped by SIGTERM after "), "{exit}");
    assert!(exit.stderr.contains("final sync wrote "), "{exit}");
    assert!(!exit.stderr.contains("FINAL SYNC FAILED"), "{exit}");
    assert!(!vm.api_sock().exists(), "the API socket was left behind");
    assert!(!staging.exists(), "the staging image was left behind");
    assert_eq!(unsynced_pages(vm.mem_path()), (0, 0), "dirty / writeback pages of the memory file after the stop");
    let (code, out) = verify_snapshot(&full);
    assert_eq!(code, Some(0), "{out}");

    let restored = TestVm::restore(&full).unwrap();
    wait_for_stderr(&restored, "smudge: restore: the guest runs");
    send(&restored, libc::SIGINT);
    let exit = restored.wait_exit(LIMIT).unwrap();
    assert_eq!(exit.code, Some(EXIT_SIGNALLED), "{exit}");
    assert!(exit.stderr.contains("smudge: SIGINT: stopping: "), "{exit}");
    assert!(exit.stderr.contains("smudge: stopped by SIGINT after "), "{exit}");
    assert!(!restored.api_sock().exists(), "the restore's API socket was left behind");
    assert_eq!(unsynced_pages(restored.mem_path()), (0, 0), "the restore's memory file after the stop");
}

/// Every page the guest wrote before the signal is in the memory file,
/// on disk, and a later boot's `verify` on that file finds them all.
#[test]
fn sigint_after_the_guest_wrote_leaves_every_page_in_the_memory_file() {
    require_kvm();
    // Writeback would otherwise write the pages back before the signal:
    // the final sync must.
    let vm = TestVm::builder()
        .workload(WRITES_THEN_LINGERS)
        .args(["--dirty-expire-ms", "600000", "--dirty-background", "100%"])
        .boot()
        .unwrap();
    vm.wait_for_serial("lingering", LIMIT).unwrap();
    send(&vm, libc::SIGINT);
    let exit = vm.wait_exit(LIMIT).unwrap();
    assert_eq!(exit.code, Some(EXIT_SIGNALLED), "{exit}");
    assert!(exit.stderr.contains("smudge: stopped by SIGINT after "), "{exit}");
    let gens = random_generations(7, 4000, 20000);
    let stamped = gens.iter().filter(|&&g| g > 0).count();
    let synced: usize = exit
        .stderr
        .split("final sync wrote ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no final sync figure:\n{exit}"));
    assert!(synced >= stamped, "the final sync wrote {synced} pages; the guest stamped {stamped}:\n{exit}");
    assert_written_and_synced(vm.mem_path(), "after SIGINT");
    let again = smudge_testkit::boot(vm.mem_path(), "64M", "workload=verify pages=4000");
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(
        again.line("verify: "),
        Some(format!("verify: pages=4000 ok=4000 stamped={stamped} mismatches=0").as_str()),
        "{again:?}"
    );
}

/// A signal before the guest's first instruction: a boot stops without
/// running it; a restore does not start it and removes the memory file it
/// made (the guest stays in its snapshot).
#[test]
fn a_signal_before_the_guest_runs_stops_it_unstarted() {
    require_kvm();
    let vm = TestVm::builder().workload(WRITING).args(["--test-hold", "start"]).boot().unwrap();
    wait_for_stderr(&vm, "smudge: test hold: the vCPUs wait to start");
    send(&vm, libc::SIGINT);
    let exit = vm.wait_exit(LIMIT).unwrap();
    assert_eq!(exit.code, Some(EXIT_SIGNALLED), "{exit}");
    assert!(exit.stderr.contains("smudge: SIGINT: stopping: "), "{exit}");
    assert!(exit.stderr.contains("smudge: stopped by SIGINT after "), "{exit}");
    assert_eq!(exit.serial, "", "the guest ran:\n{exit}");
    assert!(!vm.api_sock().exists(), "the API socket was left behind");
    assert_eq!(unsynced_pages(vm.mem_path()), (0, 0), "the memory file after the stop");

    let snaps = scratch_dir("signals-unstarted").unwrap();
    let src = TestVm::builder().workload(WRITING).boot().unwrap();
    src.wait_for_serial("layout:", LIMIT).unwrap();
    src.snapshot(&snaps.path().join("full")).unwrap();
    src.stop().unwrap();
    assert_eq!(src.wait_exit(LIMIT).unwrap().code, Some(0));
    let restored = TestVm::builder().args(["--test-hold", "start"]).restore(snaps.path().join("full")).unwrap();
    wait_for_stderr(&restored, "smudge: test hold: the vCPUs wait to start");
    assert!(restored.mem_path().exists(), "the restore made no memory file: the test proves nothing");
    send(&restored, libc::SIGTERM);
    let exit = restored.wait_exit(LIMIT).unwrap();
    assert_eq!(exit.code, Some(EXIT_SIGNALLED), "{exit}");
    assert!(
        exit.stderr.contains("smudge: stopped by SIGTERM before the guest ran here; the guest stays in its snapshot"),
        "{exit}"
    );
    assert_eq!(exit.serial, "", "the restored guest ran:\n{exit}");
    assert!(!restored.mem_path().exists(), "the restore left its memory file");
    assert!(!restored.api_sock().exists(), "the restore left its API socket");
}

/// A live snapshot held after its first copy: SIGTERM abandons it (its
/// directory goes; nothing there verifies) and stops the run cleanly.
#[test]
fn sigterm_mid_live_snapshot_abandons_it_and_stops_cleanly() {
    require_kvm();
    let snaps = scratch_dir("signals-live").unwrap();
    let vm = TestVm::builder().workload(WRITING).args(["--test-hold", "live-snapshot"]).boot().unwrap();
    vm.wait_for_serial("layout:", LIMIT).unwrap();
    let live = snaps.path().join("live");
    std::thread::scope(|s| {
        let answer = s.spawn(|| vm.call_raw(&Request::Snapshot(SnapshotRequest::live(&live))).unwrap());
        wait_for_stderr(&vm, "smudge: test hold: the live snapshot waits after its first copy");
        assert!(live.join("memory.img").exists(), "no snapshot under way: the test proves nothing");
        send(&vm, libc::SIGTERM);
        let answer = answer.join().unwrap();
        assert_eq!(answer["ok"], false, "{answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains("abandoned: smudge is stopping on SIGTERM; its directory is removed"), "{answer}");
    });
    let exit = vm.wait_exit(LIMIT).unwrap();
    assert_eq!(exit.code, Some(EXIT_SIGNALLED), "{exit}");
    assert!(exit.stderr.contains(&format!("smudge: live snapshot into {} abandoned", live.display())), "{exit}");
    assert!(exit.stderr.contains("smudge: stopped by SIGTERM after "), "{exit}");
    assert!(!live.exists(), "the abandoned snapshot's directory was left");
    assert_eq!(verify_snapshot(&live).0, Some(100));
    assert!(!vm.api_sock().exists(), "the API socket was left behind");
    assert_eq!(unsynced_pages(vm.mem_path()), (0, 0), "the memory file after the stop");
}

/// With the first signal's stop held, a second one ends smudge at once
/// (109): nothing is cleaned up, and the live snapshot it cut short has no
/// manifest, so it does not verify.
#[test]
fn a_second_signal_exits_at_once_and_a_cut_snapshot_does_not_verify() {
    require_kvm();
    let snaps = scratch_dir("signals-second").unwrap();
    let vm = TestVm::builder()
        .workload(WRITING)
        .args(["--test-hold", "live-snapshot", "--test-hold", "stop"])
        .boot()
        .unwrap();
    vm.wait_for_serial("layout:", LIMIT).unwrap();
    let live = snaps.path().join("live");
    std::thread::scope(|s| {
        let answer = s.spawn(|| vm.call_raw(&Request::Snapshot(SnapshotRequest::live(&live))));
        wait_for_stderr(&vm, "smudge: test hold: the live snapshot waits after its first copy");
        send(&vm, libc::SIGTERM);
        wait_for_stderr(&vm, "smudge: test hold: the stop waits for a second signal");
        // Held: the first signal has not stopped anything.
        let stats = vm.stats().unwrap();
        assert!(stats["job"].as_str().unwrap().contains("a snapshot into"), "{stats}");
        send(&vm, libc::SIGINT);
        // The connection ends without an answer.
        assert!(answer.join().unwrap().is_err());
    });
    let exit = vm.wait_exit(LIMIT).unwrap();
    assert_eq!(exit.code, Some(EXIT_SECOND_SIGNAL), "{exit}");
    assert!(exit.stderr.contains("smudge: SIGINT again: exiting at once (exit code 109): no final sync"), "{exit}");
    assert!(!exit.stderr.contains("final sync wrote"), "{exit}");
    // What a kill leaves: the socket, and a snapshot directory without a
    // manifest, which is no snapshot.
    assert!(vm.api_sock().exists(), "the socket is documented to stay after a second signal");
    assert!(live.join("memory.img").exists() && !live.join("manifest.json").exists(), "{exit}");
    let (code, out) = verify_snapshot(&live);
    assert_eq!(code, Some(100), "{out}");
    assert!(out.contains("manifest.json"), "{out}");
}

/// A relay on loopback that forwards the source's first `forward` bytes to
/// `to`, then stops forwarding (the answers flow back all along) until
/// released, when it closes both connections.
struct HoldingRelay {
    addr: String,
    held: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

impl HoldingRelay {
    fn start(to: String, forward: usize) -> HoldingRelay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (held_tx, held) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            let (mut src, _) = l.accept().unwrap();
            let mut dst = TcpStream::connect(&to).unwrap();
            let (mut back_r, mut back_w) = (dst.try_clone().unwrap(), src.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut back_r, &mut back_w);
            });
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = forward;
            while left > 0 {
                let n = match src.read(&mut buf[..left.min(64 * 1024)]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if dst.write_all(&buf[..n]).is_err() {
                    break;
                }
                left -= n;
            }
            let _ = held_tx.send(());
            let _ = release_rx.recv();
            let _ = src.shutdown(Shutdown::Both);
            let _ = dst.shutdown(Shutdown::Both);
        });
        HoldingRelay { addr, held, release }
    }

    fn wait_held(&self) {
        self.held.recv_timeout(LIMIT).expect("the relay never forwarded its share of the migration");
    }
}

/// The relay forwards this much of the source's stream, then holds it.
const FORWARD: usize = 1 << 20;

/// Waits until the guest of `vm` has stamped at least `n` of its 4000
/// working-set pages (read from its memory file): a migration then has
/// at least that many pages to send.
fn wait_for_stamped_pages(vm: &TestVm, n: usize) {
    let base = guest_abi::ws_base_for(4000);
    let t0 = Instant::now();
    loop {
        let ws = vm.read_memory(base, 4000 * 4096).unwrap();
        let stamped = ws.chunks_exact(4096).filter(|p| p[..8] != [0u8; 8]).count();
        if stamped >= n {
            return;
        }
        assert!(t0.elapsed() < LIMIT, "the guest stamped {stamped} pages, not {n}:\n{}", vm.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A migration from `src` held mid-way by `relay` (the source has more
/// than the relay forwards to send); returns the thread that gets the
/// source's answer.
fn held_migration<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    src: &'s TestVm,
    relay: &'s HoldingRelay,
) -> std::thread::ScopedJoinHandle<'s, Value> {
    let to = relay.addr.clone();
    let answer = s.spawn(move || src.call_raw(&Request::Migrate(MigrateRequest::new(to))).unwrap());
    relay.wait_held();
    let stats = src.stats().unwrap();
    assert!(stats["job"].as_str().unwrap().contains("a migration to"), "{stats}");
    answer
}

/// The destination stopped (Ctrl-C) mid-migration: it removes its half
/// memory file and socket, exits 108; the source's guest runs on.
#[test]
fn sigint_on_migrate_recv_mid_migration_leaves_no_memory_file_and_the_source_runs_on() {
    require_kvm();
    let src = TestVm::builder().workload(WRITING).boot().unwrap();
    // Twice what the relay forwards: round 0 cannot end.
    wait_for_stamped_pages(&src, 2 * FORWARD / 4096);
    let dest = TestVm::incoming().unwrap();
    let relay = HoldingRelay::start(dest.migration_addr().unwrap(), FORWARD);
    std::thread::scope(|s| {
        let answer = held_migration(s, &src, &relay);
        assert!(dest.mem_path().exists(), "the destination made no memory file: the test proves nothing");
        send(&dest, libc::SIGINT);
        let exit = dest.wait_exit(LIMIT).unwrap();
        assert_eq!(exit.code, Some(EXIT_SIGNALLED), "{exit}");
        assert!(exit.stderr.contains("smudge: SIGINT: stopping: the migration from 127.0.0.1:"), "{exit}");
        assert!(exit.stderr.contains("smudge: stopped by SIGINT before the guest ran here ("), "{exit}");
        assert!(exit.stderr.contains("the source keeps its guest; "), "{exit}");
        assert!(!dest.mem_path().exists(), "the destination left its half memory file");
        assert!(!dest.api_sock().exists(), "the destination left its API socket");
        relay.release.send(()).unwrap();
        let answer = answer.join().unwrap();
        assert_eq!(answer["ok"], false, "{answer}");
        assert!(answer["error"].as_str().unwrap().contains("the guest runs on here"), "{answer}");
    });
    // The source's guest goes on writing.
    let before = src.stats().unwrap();
    assert_eq!(before["paused"], false, "{before}");
    let pages = |v: &Value| v["dirty_log"]["guest_pages"].as_u64().unwrap();
    let t0 = Instant::now();
    while pages(&src.stats().unwrap()) <= pages(&before) {
        assert!(t0.elapsed() < LIMIT, "the source's guest stopped writing:\n{}", src.logs());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(src.is_running());
}

/// The source killed mid-migration: it keeps its guest's memory (synced,
/// every page), removes its socket and exits 108; the destination, whose
/// stream ends, removes its half memory file.
#[test]
fn sigterm_on_the_source_mid_migration_keeps_its_guest_and_syncs() {
    require_kvm();
    let src = TestVm::builder().workload(WRITES_THEN_LINGERS).boot().unwrap();
    // ~3970 pages stamped: round 0 cannot end within what the relay forwards.
    src.wait_for_serial("lingering", LIMIT).unwrap();
    let dest = TestVm::incoming().unwrap();
    let relay = HoldingRelay::start(dest.migration_addr().unwrap(), FORWARD);
    std::thread::scope(|s| {
        let answer = held_migration(s, &src, &relay);
        send(&src, libc::SIGTERM);
        let answer = answer.join().unwrap();
        assert_eq!(answer["ok"], false, "{answer}");
        assert!(answer["error"].as_str().unwrap().contains("abandoned: smudge is stopping on SIGTERM"), "{answer}");
        let exit = src.wait_exit(LIMIT).unwrap();
        assert_eq!(exit.code, Some(EXIT_SIGNALLED), "{exit}");
        assert!(
            exit.stderr.contains("smudge: SIGTERM: stopping: the migration to 127.0.0.1:")
                && exit.stderr.contains("is abandoned (the guest stays here and stops)"),
            "{exit}"
        );
        assert!(exit.stderr.contains("smudge: stopped by SIGTERM after "), "{exit}");
        assert!(!src.api_sock().exists(), "the source left its API socket");
        assert_written_and_synced(src.mem_path(), "the source after SIGTERM");
        relay.release.send(()).unwrap();
    });
    let exit = dest.wait_exit(LIMIT).unwrap();
    assert_eq!(exit.code, Some(100), "{exit}");
    assert!(!dest.mem_path().exists(), "the destination left its half memory file");
    assert!(!dest.api_sock().exists(), "the destination left its API socket");
}
