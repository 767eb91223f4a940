//! The durable mode, on the real guest: `kill -9` at instants chosen by
//! the journal's own commits, recovery of the newest committed epoch
//! (bit-exact: every page holds what the guest's generation table says,
//! and the restored guest carries on from that table), a journal restore
//! journalling on, a damaged tail, and a journal whose disk fills.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use smudge::journal::{self, Target};
use smudge_testkit::*;

/// Working-set pages of the guest here.
const PAGES: u64 = 4000;
/// Written until the test ends the run (16 MiB of stamped pages).
const CMDLINE: &str = "workload=rate pages=4000 rate=4000 writes=1000000000 seed=31 wipe=1";

fn newest_committed(s: &serde_json::Value) -> u64 {
    s["journal"]["newest_committed"].as_u64().unwrap_or_else(|| panic!("no journal.newest_committed in {s}"))
}

/// Waits until the journal has committed epoch `n`; returns the newest.
fn wait_committed(vm: &mut Child, sock: &Path, n: u64) -> u64 {
    let s = progress::wait_for_stats(vm, sock, &format!("the journal to commit epoch {n}"), |s| {
        s["journal"]["newest_committed"].as_u64().is_some_and(|c| c >= n)
    });
    newest_committed(&s)
}

/// `kill -9`, as a crash would.
fn crash(mut vm: Child) -> String {
    vm.kill().unwrap();
    let out = vm.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Builds the newest committed epoch's RAM into `out` with the library
/// and checks it: at least epoch `at_least`, every page as its table says.
/// Returns the epoch and its generation table.
fn recovered_epoch(j: &Path, out: &Path, at_least: u64) -> (u64, Vec<u32>) {
    let r = journal::recover(j, Target::Newest, out).unwrap_or_else(|e| panic!("recovering {}: {e}", j.display()));
    assert!(r.epoch.epoch >= at_least, "recovered epoch {} but {at_least} was committed", r.epoch.epoch);
    progress::assert_pages_match_table(out, PAGES);
    let gens = progress::generations(out, PAGES);
    std::fs::remove_file(out).unwrap();
    (r.epoch.epoch, gens)
}

/// `smudge restore --journal J` on `mem` (with `extra` arguments).
fn restore(j: &Path, mem: &Path, sock: &Path, extra: &[&str]) -> Child {
    let mut cmd = smudge();
    cmd.args(["restore", "--journal", j.to_str().unwrap(), "--mem-file", mem.to_str().unwrap()])
        .args(["--api-sock", sock.to_str().unwrap(), "--timeout", "120", "--serial", "-"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn_with_api(&mut cmd, sock, WAIT).unwrap_or_else(|e| panic!("the restored VM: {}", vm::error_chain(&e)))
}

/// Checks that a restored guest went on from `gens` (no page went back a
/// generation, and it wrote more) without booting again.
fn carried_on(mem: &Path, gens: &[u32], stdout: &str) {
    let now = progress::generations(mem, PAGES);
    let back: Vec<usize> = (0..gens.len()).filter(|&i| now[i] < gens[i]).collect();
    assert!(back.is_empty(), "pages went back a generation after the restore: {back:?}");
    let (a, b): (u64, u64) = (gens.iter().map(|&g| u64::from(g)).sum(), now.iter().map(|&g| u64::from(g)).sum());
    assert!(b > a, "the restored guest wrote nothing ({a} -> {b})");
    assert!(!stdout.contains(guest_abi::BANNER), "the restored guest booted again: {stdout}");
}

#[test]
fn kill_9_at_committed_epochs_recovers_the_newest_and_the_guest_carries_on() {
    require_kvm();
    let dir = tmpdir();
    let j = path(&dir, "journal");
    let js = j.to_str().unwrap();
    let (mem, sock) = (path(&dir, "m0"), path(&dir, "s0"));
    let mut vm =
        start_with_api(&mem, &sock, "64M", CMDLINE, Stdio::null(), true, &["--journal", js, "--epoch-ms", "20"]);
    progress::wait_for_writes(&mut vm, &mem, PAGES, 400);
    let seen = wait_committed(&mut vm, &sock, 10);
    crash(vm);
    let (mut epoch, mut gens) = recovered_epoch(&j, &path(&dir, "check"), seen);

    // Twice more: the recovered guest journals on into the same journal
    // (cut back to the recovered epoch), crashes again, recovers again.
    for round in 1..=2 {
        let (mem, sock) = (path(&dir, &format!("m{round}")), path(&dir, &format!("s{round}")));
        let mut vm = restore(&j, &mem, &sock, &["--epoch-ms", "20"]);
        let seen = wait_committed(&mut vm, &sock, epoch + 10);
        let w = progress::guest_writes(&mem, PAGES);
        progress::wait_for_writes(&mut vm, &mem, PAGES, w + 50);
        let err = crash(vm);
        assert!(err.contains(&format!("epoch {epoch} recovered")), "{err}");
        let (e, g) = recovered_epoch(&j, &path(&dir, "check"), seen);
        let back: Vec<usize> = (0..g.len()).filter(|&i| g[i] < gens[i]).collect();
        assert!(e > epoch && back.is_empty(), "round {round}: epoch {epoch} -> {e}, pages back: {back:?}");
        (epoch, gens) = (e, g);
    }
    let v = journal_cmd(&["verify", js]);
    assert_eq!(v.code, 0, "{v:?}");
    assert!(v.stdout.contains(&format!("..={epoch}")), "{v:?}");

    // The last recovery runs without a journal and carries on.
    let (mem, sock) = (path(&dir, "last"), path(&dir, "last-sock"));
    let mut vm = restore(&j, &mem, &sock, &[]);
    let w = progress::guest_writes(&mem, PAGES);
    progress::wait_for_writes(&mut vm, &mem, PAGES, w + 100);
    let stopped = ctl(&sock, &["stop"]);
    if stopped["ok"] != true {
        progress::fail(&mut vm, &format!("stop: {stopped}"));
    }
    let r = Run::from(vm.wait_with_output().unwrap());
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains(&format!("epoch {epoch} recovered")), "{r:?}");
    progress::assert_pages_match_table(&mem, PAGES);
    carried_on(&mem, &gens, &r.stdout);
}

/// `smudge journal ARGS`.
fn journal_cmd(args: &[&str]) -> Run {
    Run::from(smudge().arg("journal").args(args).output().unwrap())
}

/// The newest epoch's last record of `j`, for damaging.
fn newest_epoch(j: &Path) -> journal::EpochInfo {
    journal::scan(j).unwrap().newest().cloned().unwrap()
}

#[test]
fn a_torn_or_flipped_tail_recovers_the_newest_intact_epoch_and_rewinds_work() {
    require_kvm();
    let dir = tmpdir();
    let j = path(&dir, "journal");
    let js = j.to_str().unwrap();
    let (mem, sock) = (path(&dir, "m"), path(&dir, "s"));
    let mut vm =
        start_with_api(&mem, &sock, "64M", CMDLINE, Stdio::null(), true, &["--journal", js, "--epoch-ms", "10"]);
    progress::wait_for_writes(&mut vm, &mem, PAGES, 400);
    wait_committed(&mut vm, &sock, 30);
    crash(vm);
    let all = journal::scan(&j).unwrap();
    let n = all.newest().unwrap().epoch;

    // A flipped bit inside the newest epoch: recovery lands on the one before.
    let e = newest_epoch(&j);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&e.segment).unwrap();
    let at = e.start + (e.end - e.start) / 2;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    let (got, _) = recovered_epoch(&j, &path(&dir, "check"), n - 1);
    assert_eq!(got, n - 1, "a damaged newest epoch must not be used");
    let v = journal_cmd(&["verify", js]);
    assert!(v.code == 0 && v.stdout.contains("stopped in") && v.stdout.contains(&format!("..={}", n - 1)), "{v:?}");

    // Torn: the segment cut in the middle of epoch n-1's records.
    let e = newest_epoch(&j);
    f.set_len(e.end - 7).unwrap();
    let (got, _) = recovered_epoch(&j, &path(&dir, "check"), n - 2);
    assert_eq!(got, n - 2);

    // Rewind: epoch n-12 and "--at -50ms" (10 ms epochs), each a
    // consistent guest whose pages match its table.
    let r = journal::recover(&j, Target::Epoch(n - 12), &path(&dir, "old")).unwrap();
    assert_eq!(r.epoch.epoch, n - 12);
    progress::assert_pages_match_table(&path(&dir, "old"), PAGES);
    let newest_t = newest_epoch(&j).time_ns;
    let r = journal::recover(&j, Target::Before(std::time::Duration::from_millis(50)), &path(&dir, "ago")).unwrap();
    assert!(r.epoch.time_ns + 50_000_000 <= newest_t, "{} vs {newest_t}", r.epoch.time_ns);
    progress::assert_pages_match_table(&path(&dir, "ago"), PAGES);
    let (mem, sock) = (path(&dir, "rewound"), path(&dir, "rs"));
    let mut vm = restore(&j, &mem, &sock, &["--epoch", &(n - 12).to_string()]);
    let w = progress::guest_writes(&mem, PAGES);
    progress::wait_for_writes(&mut vm, &mem, PAGES, w + 100);
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    let out = Run::from(vm.wait_with_output().unwrap());
    assert!(out.code == 0 && out.stderr.contains(&format!("epoch {} recovered", n - 12)), "{out:?}");
    progress::assert_pages_match_table(&mem, PAGES);
}

#[test]
fn a_full_journal_disk_ends_the_run_clearly_and_loses_no_committed_epoch() {
    require_kvm();
    let dir = tmpdir();
    // Room for the first epoch (the 16 MiB working set) and some more.
    let tiny = Tmpfs::mount(&path(&dir, "tiny"), "size=24m");
    let j: PathBuf = tiny.0.join("journal");
    let (mem, sock) = (path(&dir, "m"), path(&dir, "s"));
    let args = ["--journal", j.to_str().unwrap(), "--epoch-ms", "10"];
    let mut vm = start_with_api(&mem, &sock, "64M", CMDLINE, Stdio::null(), true, &args);
    let seen = wait_committed(&mut vm, &sock, 3);
    // The guest keeps dirtying; the journal fills. The run's own
    // --timeout (120 s) bounds this wait.
    let r = Run::from(vm.wait_with_output().unwrap());
    assert_eq!(r.code, 105, "the run must end on the full disk: {r:?}");
    assert!(r.stderr.contains("No space left on device") && r.stderr.contains("journal failed"), "{r:?}");
    let said: u64 = r
        .stderr
        .split("the newest committed epoch is ")
        .nth(1)
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no newest committed epoch named: {r:?}"));
    assert!(said >= seen, "{said} < {seen}");
    let v = journal_cmd(&["verify", j.to_str().unwrap()]);
    assert_eq!(v.code, 0, "{v:?}");
    // At least the epoch the error named: a later one only if all its
    // records reached the disk (a failed sync, not a failed write).
    recovered_epoch(&j, &path(&dir, "check"), said);
}

#[test]
fn epochs_stay_consistent_while_the_vcpus_are_paused_and_resumed_by_hand() {
    require_kvm();
    let dir = tmpdir();
    let j = path(&dir, "journal");
    let (mem, sock) = (path(&dir, "m"), path(&dir, "s"));
    // Small segments, checkpointed once 300 ms old: recovery then starts
    // from the base image.
    let args = ["--journal", j.to_str().unwrap(), "--epoch-ms", "5", "--retain", "300ms", "--journal-max-bytes", "32M"];
    let mut vm = start_with_api(&mem, &sock, "64M", CMDLINE, Stdio::null(), true, &args);
    progress::wait_for_writes(&mut vm, &mem, PAGES, 400);
    // Held by hand, the guest is still cut into epochs (boundaries on a
    // paused guest leave it paused).
    assert_eq!(ctl(&sock, &["pause"])["ok"], true);
    let held = wait_committed(&mut vm, &sock, 1);
    wait_committed(&mut vm, &sock, held + 3);
    assert_eq!(ctl(&sock, &["stats"])["paused"], true, "a boundary resumed a guest paused by hand");
    // Pause and resume against the boundaries, 40 times.
    for _ in 0..40 {
        assert_eq!(ctl(&sock, &["resume"])["ok"], true);
        assert_eq!(ctl(&sock, &["pause"])["ok"], true);
    }
    assert_eq!(ctl(&sock, &["resume"])["ok"], true);
    let w = progress::guest_writes(&mem, PAGES);
    progress::wait_for_writes(&mut vm, &mem, PAGES, w + 100);
    let seen = wait_committed(&mut vm, &sock, held + 10);
    let s = progress::wait_for_stats(&mut vm, &sock, "a checkpoint into the base image", |s| {
        s["journal"]["checkpointed_segments"].as_u64().is_some_and(|n| n > 0)
    });
    crash(vm);
    let base = journal::scan(&j).unwrap().checkpoint.base_epoch;
    assert!(base > 0, "the base holds no epoch after a checkpoint: {s}");
    assert_eq!(s["journal"]["error"], serde_json::Value::Null, "{s}");
    // Every retained epoch, not just the newest, is a state the guest was in.
    let scan = journal::scan(&j).unwrap();
    assert!(scan.newest().unwrap().epoch >= seen);
    for e in scan.recoverable().filter(|e| e.epoch % 7 == 0 || e.epoch >= seen) {
        let out = path(&dir, &format!("e{}", e.epoch));
        journal::recover(&j, Target::Epoch(e.epoch), &out).unwrap();
        progress::assert_pages_match_table(&out, PAGES);
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn a_run_refuses_a_directory_that_holds_a_journal_and_restore_checks_its_inputs() {
    require_kvm();
    let dir = tmpdir();
    let j = path(&dir, "journal");
    let opts = journal::JournalOptions::default();
    drop(journal::Journal::create(&j, 64 << 20, 4096, 1, opts).unwrap());
    let before = std::fs::read(j.join(journal::CHECKPOINT)).unwrap();
    let mem = path(&dir, "m");
    let r = run_smudge(&["--mem-file", mem.to_str().unwrap(), "--mem-size", "64M", "--journal", j.to_str().unwrap()]);
    assert_eq!(r.code, 100, "{r:?}");
    assert!(r.stderr.contains("already holds a journal"), "{r:?}");
    assert_eq!(std::fs::read(j.join(journal::CHECKPOINT)).unwrap(), before, "the journal was touched");
    // Nothing committed yet: a restore says so and makes no memory file.
    let out = smudge()
        .args(["restore", "--journal", j.to_str().unwrap(), "--mem-file", mem.to_str().unwrap()])
        .output()
        .unwrap();
    let r = Run::from(out);
    assert!(r.code == 100 && r.stderr.contains("no committed epoch to recover"), "{r:?}");
    assert!(!mem.exists(), "a failed recovery left {}", mem.display());
    let v = journal_cmd(&["verify", j.to_str().unwrap()]);
    assert!(v.code == 1 && v.stdout.contains("no committed epoch to recover"), "{v:?}");
}

#[test]
fn a_disk_that_falls_behind_lengthens_epochs_then_throttles_and_drops_none() {
    require_kvm();
    let dir = tmpdir();
    let j = path(&dir, "journal");
    let (mem, sock) = (path(&dir, "m"), path(&dir, "s"));
    // 5 ms epochs; the writer takes 60 ms per batch: boundaries find the
    // queue full, the open epoch runs past 8 epoch lengths.
    let args = ["--journal", j.to_str().unwrap(), "--epoch-ms", "5", "--test-journal-write-delay-ms", "60"];
    let mut vm = start_with_api(&mem, &sock, "64M", CMDLINE, Stdio::null(), true, &args);
    progress::wait_for_writes(&mut vm, &mem, PAGES, 400);
    let s = progress::wait_for_stats(&mut vm, &sock, "a lengthened epoch and a throttle", |s| {
        s["journal"]["lengthened"].as_u64().is_some_and(|n| n > 0)
            && s["journal"]["throttled"].as_u64().is_some_and(|n| n > 0)
    });
    let seen = wait_committed(&mut vm, &sock, newest_committed(&s) + 5);
    crash(vm);
    // Nothing dropped: the epochs are numbered without a gap from 1, and
    // the newest is a state the guest was in.
    let scan = journal::scan(&j).unwrap();
    let numbers: Vec<u64> = scan.epochs.iter().map(|e| e.epoch).collect();
    assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>());
    recovered_epoch(&j, &path(&dir, "check"), seen);
}

/// Sums over the committed epochs of `j` after epoch `after`: (pages,
/// pages as deltas, record bytes of the epochs all of whose pages are
/// deltas, their pages).
fn delta_counts(j: &Path, after: u64) -> (u64, u64, u64, u64) {
    let scan = journal::scan(j).unwrap();
    let later = scan.epochs.iter().filter(|e| e.epoch > after);
    later.fold((0, 0, 0, 0), |(p, d, b, n), e| {
        let all = e.pages > 0 && e.delta_pages == e.pages;
        (p + e.pages, d + e.delta_pages, b + if all { e.bytes } else { 0 }, n + if all { e.pages } else { 0 })
    })
}

#[test]
fn pages_written_again_go_to_the_journal_as_deltas_and_recover_bit_exact() {
    require_kvm();
    let dir = tmpdir();
    let j = path(&dir, "journal");
    let js = j.to_str().unwrap();
    let (mem, sock) = (path(&dir, "m"), path(&dir, "s"));
    // The wipe writes every working-set page; each stamp after it
    // rewrites 48 bytes of a page the journal already holds.
    let args = ["--journal", js, "--epoch-ms", "20", "--journal-cache", "32M"];
    let mut vm = start_with_api(&mem, &sock, "64M", CMDLINE, Stdio::null(), true, &args);
    progress::wait_for_writes(&mut vm, &mem, PAGES, 3000);
    let now = newest_committed(&ctl(&sock, &["stats"]));
    let seen = wait_committed(&mut vm, &sock, now + 5);
    crash(vm);
    let (pages, deltas, bytes, in_delta_epochs) = delta_counts(&j, 0);
    assert!(deltas >= 1000, "{deltas} of {pages} pages went as deltas after 3000 stamps");
    assert!(
        bytes < in_delta_epochs * 4096 / 8,
        "epochs of deltas only take {bytes} bytes for {in_delta_epochs} pages: not much less than whole pages"
    );
    let v = journal_cmd(&["verify", js]);
    assert!(v.code == 0 && v.stdout.contains(&format!("pages: {} whole, {deltas} as deltas", pages - deltas)), "{v:?}");
    // Bit-exact: every page as the recovered generation table says.
    let (epoch, gens) = recovered_epoch(&j, &path(&dir, "check"), seen);

    // The recovered guest journals on: its first epoch whole (the cache
    // starts empty), deltas after, and a second crash recovers bit-exact.
    let (mem, sock) = (path(&dir, "m1"), path(&dir, "s1"));
    let mut vm = restore(&j, &mem, &sock, &["--epoch-ms", "20", "--journal-cache", "32M"]);
    let w = progress::guest_writes(&mem, PAGES);
    progress::wait_for_writes(&mut vm, &mem, PAGES, w + 1500);
    let now = newest_committed(&ctl(&sock, &["stats"]));
    let seen = wait_committed(&mut vm, &sock, now + 5);
    let err = crash(vm);
    assert!(err.contains(&format!("epoch {epoch} recovered")), "{err}");
    let first = journal::scan(&j).unwrap().epochs.into_iter().find(|e| e.epoch == epoch + 1);
    assert!(first.as_ref().is_some_and(|e| e.delta_pages == 0 && e.pages >= PAGES), "{first:?}");
    let (_, deltas, _, _) = delta_counts(&j, epoch + 1);
    assert!(deltas >= 500, "{deltas} deltas after the recovered guest's 1500 stamps");
    let (e, g) = recovered_epoch(&j, &path(&dir, "check"), seen);
    let back: Vec<usize> = (0..g.len()).filter(|&i| g[i] < gens[i]).collect();
    assert!(e > epoch && back.is_empty(), "epoch {epoch} -> {e}, pages back a generation: {back:?}");
}
