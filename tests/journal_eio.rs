//! The durable mode when the disk under the journal's base image returns
//! `EIO` (a real one: ext4 on a loop device whose data blocks are cut off,
//! testkit's `FailingDisk`), on the real guest: the checkpoint that fails
//! keeps its epochs in the journal, is reported once (stderr, and `stats`
//! with the file, the bytes and the errno) and tried again; the guest runs
//! on until the journal is full, then is throttled; after `kill -9` a
//! restore refuses the unreadable base clearly and leaves the journal as it
//! was, and once the disk is back it lands on the newest committed epoch,
//! bit-exact. A disk that comes back while the guest runs lets the held
//! checkpoints through.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use smudge::journal::{self, Target};
use smudge_testkit::*;

/// Working-set pages of the guest here.
const PAGES: u64 = 4000;
/// Written until the test ends the run (16 MiB of stamped pages).
const CMDLINE: &str = "workload=rate pages=4000 rate=4000 writes=1000000000 seed=37 wipe=1";
/// The journal's bound: room for about 4 s of the guest's writes.
const MAX_BYTES: u64 = 64 << 20;

/// A journal directory `dir/journal` whose base image lives on a disk
/// that can be made to fail; the disk is released on drop.
fn journal_on_failing_disk(dir: &tempfile::TempDir) -> (FailingDisk, PathBuf) {
    let disk = FailingDisk::new(&path(dir, "disk"), 256 << 20)
        .unwrap_or_else(|e| panic!("a loop device with ext4 (these tests need root, losetup, mkfs.ext4): {e}"));
    let j = path(dir, "journal");
    std::fs::create_dir(&j).unwrap();
    std::os::unix::fs::symlink(disk.mount.join("base.img"), j.join(journal::BASE)).unwrap();
    (disk, j)
}

/// Starts the guest journalling into `j`, checkpointing what is older than
/// 100 ms, and waits for two checkpoints into the (healthy) base image.
fn start(dir: &tempfile::TempDir, j: &Path) -> (Child, PathBuf, PathBuf) {
    let (mem, sock) = (path(dir, "m"), path(dir, "s"));
    let max = MAX_BYTES.to_string();
    // Whole pages (no delta cache): the journal reaches its bound in
    // seconds, so the full-journal throttle is reached by the guest's
    // writes, not by waiting.
    let args = [
        "--journal",
        j.to_str().unwrap(),
        "--epoch-ms",
        "10",
        "--retain",
        "100ms",
        "--journal-max-bytes",
        &max,
        "--journal-cache",
        "0",
    ];
    let mut vm = start_with_api(&mem, &sock, "64M", CMDLINE, Stdio::null(), true, &args);
    progress::wait_for_writes(&mut vm, &mem, PAGES, 400);
    progress::wait_for_stats(&mut vm, &sock, "two checkpoints into the base image", |s| {
        s["journal"]["checkpointed_segments"].as_u64().is_some_and(|n| n >= 2)
    });
    // The base must already hold every page the guest writes from now on
    // (its generation table and its working set, wiped at boot): a
    // checkpoint on the failing disk then overwrites blocks the file has
    // (see `holds_guest_pages`).
    let base = j.join(journal::BASE);
    let s = progress::wait_for_stats(&mut vm, &sock, "the base image to hold the guest's working set", |_| {
        holds_guest_pages(&base, PAGES)
    });
    // The checkpoint that wrote the last of it may not have synced yet
    // (its blocks not yet allocated): one more checkpoint, and it has.
    let done = num(&s, "checkpointed_segments");
    progress::wait_for_stats(&mut vm, &sock, "one more checkpoint", |s| num(s, "checkpointed_segments") > done);
    (vm, mem, sock)
}

/// A guest journalling into `dir/journal` whose base image's disk has
/// failed, and the stats that reported it.
fn failed_under_a_running_guest(dir: &tempfile::TempDir) -> (FailingDisk, PathBuf, Child, PathBuf, serde_json::Value) {
    let (disk, j) = journal_on_failing_disk(dir);
    let (mut vm, _mem, sock) = start(dir, &j);
    disk.fail().unwrap();
    let s = wait_for_checkpoint_error(&mut vm, &sock);
    (disk, j, vm, sock, s)
}

fn num(s: &serde_json::Value, key: &str) -> u64 {
    s["journal"][key].as_u64().unwrap_or_else(|| panic!("no journal.{key} in {s}"))
}

/// Waits until the stats report the failing checkpoint; checks what they
/// say about it.
fn wait_for_checkpoint_error(vm: &mut Child, sock: &Path) -> serde_json::Value {
    let s = progress::wait_for_stats(vm, sock, "the checkpoint error in the stats", |s| {
        s["journal"]["checkpoint_error"].is_object()
    });
    let e = &s["journal"]["checkpoint_error"];
    assert_eq!(e["errno"], 5, "not EIO: {s}");
    assert_eq!(e["op"], "fdatasync", "{s}");
    assert!(e["path"].as_str().is_some_and(|p| p.ends_with("journal/base.img")), "{s}");
    assert!(e["end"].as_u64() > e["offset"].as_u64(), "no byte range: {s}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("Input/output error")), "{s}");
    assert_eq!(s["journal"]["error"], serde_json::Value::Null, "the run must go on: {s}");
    s
}

/// Waits until the journal has committed epoch `n`.
fn wait_committed(vm: &mut Child, sock: &Path, n: u64) -> serde_json::Value {
    progress::wait_for_stats(vm, sock, &format!("the journal to commit epoch {n}"), |s| {
        s["journal"]["newest_committed"].as_u64().is_some_and(|c| c >= n)
    })
}

/// `kill -9`, as a crash would; smudge's stderr.
fn crash(mut vm: Child) -> String {
    vm.kill().unwrap();
    let out = vm.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Builds the newest committed epoch's RAM with the library and checks
/// it: at least epoch `at_least`, every page as the guest's generation
/// table says. Returns the epoch.
fn recovered_epoch(j: &Path, out: &Path, at_least: u64) -> u64 {
    let r = journal::recover(j, Target::Newest, out).unwrap_or_else(|e| panic!("recovering {}: {e}", j.display()));
    assert!(r.epoch.epoch >= at_least, "recovered epoch {} but {at_least} was committed", r.epoch.epoch);
    progress::assert_pages_match_table(out, PAGES);
    std::fs::remove_file(out).unwrap();
    r.epoch.epoch
}

/// The journal's own files (not the base image) and their bytes.
fn journal_files(j: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(j)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().is_some_and(|n| n != journal::BASE))
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn eio_on_the_base_image_keeps_every_epoch_throttles_when_full_and_recovers_after_kill_9() {
    require_kvm();
    let dir = tmpdir();
    let (disk, j, mut vm, sock, s) = failed_under_a_running_guest(&dir);
    let (held, throttled) =
        (s["journal"]["checkpoint_error"]["epochs_held"][0].as_u64().unwrap(), num(&s, "throttled"));
    // The journal has room: epochs go on committing.
    wait_committed(&mut vm, &sock, num(&s, "newest_committed") + 20);
    // Then it is full and cannot shrink: the guest is throttled, as for a
    // slow disk, and the journal stays near its bound.
    let s = progress::wait_for_stats(&mut vm, &sock, "a full journal and a throttled guest", |s| {
        s["journal"]["checkpoint_error"]["journal_full"] == true && num(s, "throttled") > throttled
    });
    assert!(num(&s, "journal_bytes") <= MAX_BYTES + (16 << 20), "the journal outgrew its bound: {s}");
    assert!(num(&s, "checkpoint_failures") >= 2, "the checkpoint was not tried again: {s}");
    assert!(vm.try_wait().unwrap().is_none(), "the guest ended");
    let seen = num(&s, "newest_committed");
    let err = crash(vm);
    assert_eq!(err.matches("checkpoint failed").count(), 1, "reported once: {err}");
    assert!(err.contains("base.img: fdatasync of bytes") && err.contains("Input/output error"), "{err}");
    let scan = journal::scan(&j).unwrap();
    let first = scan.epochs.first().map_or(u64::MAX, |e| e.epoch);
    assert!(first <= held, "epoch {held}, held back by the failed checkpoint, left the journal (first: {first})");

    // As after a reboot with the disk still failing (nothing cached): the
    // restore says which file failed, makes no memory file, and leaves
    // the journal as it was.
    disk.drop_cache(&disk.mount.join("base.img")).unwrap();
    let before = journal_files(&j);
    let mem = path(&dir, "restored");
    let out = smudge()
        .args(["restore", "--journal", j.to_str().unwrap(), "--mem-file", mem.to_str().unwrap()])
        .output()
        .unwrap();
    let r = Run::from(out);
    assert!(r.code != 0 && r.stderr.contains("base.img") && r.stderr.contains("Input/output error"), "{r:?}");
    assert!(!mem.exists(), "a failed restore left {}", mem.display());
    assert!(journal_files(&j) == before, "the failed restore changed the journal");

    // The disk back (checked by e2fsck): the newest committed epoch,
    // bit-exact — the base is not trusted where its writes failed, the
    // held epochs are replayed over it.
    disk.recover().unwrap();
    disk.remount().unwrap();
    let epoch = recovered_epoch(&j, &path(&dir, "check"), seen);
    // And the guest runs on from it.
    let sock = path(&dir, "rs");
    let mut cmd = smudge();
    cmd.args(["restore", "--journal", j.to_str().unwrap(), "--mem-file", mem.to_str().unwrap()])
        .args(["--api-sock", sock.to_str().unwrap(), "--timeout", "120"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut vm =
        spawn_with_api(&mut cmd, &sock, WAIT).unwrap_or_else(|e| panic!("the restored VM: {}", error_chain(&e)));
    let w = progress::guest_writes(&mem, PAGES);
    progress::wait_for_writes(&mut vm, &mem, PAGES, w + 100);
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    let r = Run::from(vm.wait_with_output().unwrap());
    assert!(r.code == 0 && r.stderr.contains(&format!("epoch {epoch} recovered")), "{r:?}");
    progress::assert_pages_match_table(&mem, PAGES);
}

#[test]
fn a_base_image_that_comes_back_lets_the_held_checkpoints_through() {
    require_kvm();
    let dir = tmpdir();
    let (disk, j, mut vm, sock, s) = failed_under_a_running_guest(&dir);
    let (done, held) = (num(&s, "checkpointed_segments"), s["journal"]["checkpoint_error"]["epochs_held"][1].as_u64());
    disk.recover().unwrap();
    let s = progress::wait_for_stats(&mut vm, &sock, "a checkpoint after the disk came back", |s| {
        s["journal"]["checkpoint_error"].is_null() && num(s, "checkpointed_segments") > done
    });
    let s = wait_committed(&mut vm, &sock, num(&s, "newest_committed") + 10);
    let seen = num(&s, "newest_committed");
    let err = crash(vm);
    assert_eq!(err.matches("checkpoint failed").count(), 1, "{err}");
    assert_eq!(err.matches("checkpoints into the base image work again").count(), 1, "{err}");
    // The base holds the epochs the failed checkpoint held back: complete,
    // or a later checkpoint was under way when the kill came.
    let cp = journal::scan(&j).unwrap().checkpoint;
    let through = |h: u64| cp.base_epoch > h || (cp.complete && cp.base_epoch == h);
    assert!(held.is_some_and(through), "{cp:?}, held back {held:?}");
    recovered_epoch(&j, &path(&dir, "check"), seen);
}
