//! Restores that start the guest at once and load its memory behind it, on
//! first touch and by a background prefetch, each chunk checked: the
//! default `smudge restore` (RAM in shared memory, the new memory file on
//! any filesystem built beside it and kept by writeback) and `smudge
//! restore --lazy` (RAM in a tmpfs file). The guest carries on, every page
//! the guest did not write since is the snapshot's, the snapshot is never
//! written, and a corrupt chunk stops the guest with a clear error. Without
//! userfaultfd the default restore copies the snapshot first and says why.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Instant;

use smudge_testkit::*;

/// A directory on tmpfs for the restored memory file.
fn shm_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("smudge-test-").tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is needed")
}

/// Snapshots into `snap` a guest running `cmdline` (a `sync=1` workload
/// of several passes) held at the end of its first pass: every page that
/// pass writes is stamped and the guest has passes left to run. The
/// source stays paused, then is stopped. `mem` may hold an earlier run's
/// memory (the guest continues its generations).
fn snapshot_held(dir: &tempfile::TempDir, mem: &Path, size: &str, cmdline: &str) -> PathBuf {
    let (sock, snap) = (path(dir, "api.sock"), path(dir, "snap"));
    let mut vm = start_with_api(mem, &sock, size, cmdline, Stdio::piped(), true, &["--test-pause-at-sync", "1"]);
    progress::wait_paused(&mut vm, &sock);
    let s = ctl(&sock, &["snapshot", "create", snap.to_str().unwrap(), "--no-resume"]);
    if s["ok"] != true {
        progress::fail(&mut vm, &format!("snapshot: {s}"));
    }
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    let out = vm.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(" done:"), "the source finished its workload: {out:?}");
    snap
}

/// (path, bytes, mtime) of every file of a snapshot directory.
fn files_of(dir: &Path) -> Vec<(PathBuf, Vec<u8>, i64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let md = std::fs::metadata(&p).unwrap();
            (p.clone(), std::fs::read(&p).unwrap(), md.mtime_nsec() + md.mtime() * 1_000_000_000)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Checks that every page of `mem` the guest did not write after the
/// restore (the pages not in the dirty dump `dump`) holds the bytes of the
/// snapshot chain `snap`. Returns how many pages were written and how many
/// unwritten pages hold data.
fn compare_unwritten(dir: &tempfile::TempDir, snap: &Path, mem: &Path, dump: &Path) -> (usize, usize) {
    let written: std::collections::HashSet<u64> =
        smudge_vmm::observe::tracking::read_dump(&std::fs::read_to_string(dump).unwrap())
            .unwrap()
            .into_iter()
            .collect();
    let want_path = path(dir, "want.mem");
    smudge::snapshot::materialize(snap, &want_path).unwrap();
    let (got, want) = (std::fs::read(mem).unwrap(), std::fs::read(&want_path).unwrap());
    assert_eq!(got.len(), want.len());
    let layout = smudge::memory::ram_layout(want.len() as u64);
    let mut data = 0;
    for (i, (g, w)) in got.chunks(4096).zip(want.chunks(4096)).enumerate() {
        let gpa = smudge::memory::file_offset_to_gpa(&layout, i as u64 * 4096).unwrap();
        if !written.contains(&gpa) {
            let at = g.iter().zip(w).position(|(a, b)| a != b).unwrap_or(0);
            assert!(
                g == w,
                "page {gpa:#x}, not written since the restore, differs from the snapshot at byte {at}: {:02x?} in \
                 the memory file, {:02x?} in the snapshot",
                &g[at..(at + 16).min(4096)],
                &w[at..(at + 16).min(4096)]
            );
            data += usize::from(w.iter().any(|&b| b != 0));
        }
    }
    (written.len(), data)
}

fn lazy(snap: &Path, mem: &Path, extra: &[&str]) -> Child {
    smudge()
        .args(["restore", "--lazy", "--snapshot", snap.to_str().unwrap(), "--mem-file", mem.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The counts of the start line and the "fully loaded" line: (owed,
/// first touch, prefetched).
fn load_counts(r: &Run) -> (u64, u64, u64) {
    let owed: u64 = r
        .stderr
        .lines()
        .find_map(|l| {
            l.split("; ").nth(1)?.strip_suffix(" pages load on first touch or in the background")?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no lazy start line: {r:?}"));
    let full = r.stderr.lines().find(|l| l.contains("lazy restore fully loaded")).unwrap_or_else(|| panic!("{r:?}"));
    let num = |after: &str| -> u64 {
        let i = full.find(after).unwrap();
        full[..i].trim_end().rsplit(' ').next().unwrap().parse().unwrap()
    };
    (owed, num("pages on first touch"), num("prefetched"))
}

/// Flips a byte in the last data range of `snap`'s `memory.img` (RAM of
/// `size` bytes).
fn corrupt_a_data_chunk(snap: &Path, size: u64) {
    let img = snap.join("memory.img");
    let data = smudge::file_io::data_ranges(&std::fs::File::open(&img).unwrap(), size).unwrap();
    let at = data.last().unwrap().0 + 100;
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&img).unwrap(), &mut b, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 0x40], at).unwrap();
}

/// The default `smudge restore` of `snap` onto `mem`, run to its end.
fn restore(snap: &Path, mem: &Path, extra: &[&str]) -> Run {
    let out = smudge()
        .args(["restore", "--snapshot", snap.to_str().unwrap(), "--mem-file", mem.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    Run::from(out)
}

/// The generations the guest keeps in its table in `mem` (a memory file
/// of the bundled guest), for its first `pages` working-set pages.
fn generation_table(mem: &[u8], pages: u64) -> Vec<u32> {
    let file = smudge::memory::ram_layout(mem.len() as u64);
    (0..pages)
        .map(|i| {
            let off = smudge::memory::gpa_to_file_offset(&file, guest_abi::gen_table_addr(i)).unwrap() as usize;
            u32::from_le_bytes(mem[off..off + 4].try_into().unwrap())
        })
        .collect()
}

/// Checks that the memory file `mem` holds the guest a `workload=seq
/// pages=PAGES passes=3` run left, restored after its first pass: every
/// page stamped with generation 3 and the guest's table saying so (the
/// snapshot held generation 1), and a guest booted on it verifies it (the
/// boot writes its own command line and stack into the file).
fn assert_three_passes(mem: &Path, pages: u64) {
    let bytes = std::fs::read(mem).unwrap();
    assert_eq!(generation_table(&bytes, pages), vec![3; pages as usize], "the guest's generation table in the file");
    assert_stamps(&bytes, pages, &vec![3; pages as usize]);
    let v = boot(mem, "64M", &format!("workload=verify pages={pages}"));
    assert_eq!(v.code, 0, "{v:?}");
    assert!(v.line(&format!("verify: pages={pages} ok={pages} stamped={pages} mismatches=0")).is_some(), "{v:?}");
}

#[test]
fn the_default_restore_runs_the_guest_first_on_a_disk_memory_file_that_ends_equal_to_its_ram() {
    require_kvm();
    let dir = tmpdir();
    assert!(!smudge::uffd::on_tmpfs(dir.path()).unwrap(), "the test needs a directory on a disk filesystem");
    // Held after pass 1 of 3: all 8000 pages stamped, two passes to go.
    let snap = snapshot_held(&dir, &path(&dir, "m"), "64M", "workload=seq pages=8000 passes=3 sync=1 verify=1");
    let (mem, dump) = (path(&dir, "new.mem"), path(&dir, "dirty.txt"));
    let r = restore(&snap, &mem, &["--timeout", "60", "--dump-dirty", dump.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stderr.contains("copying the snapshot"), "the restore fell back to copying first: {r:?}");
    assert!(r.line("workload seq done: writes=24000 ").is_some(), "{r:?}");
    assert!(r.line("verify: pages=8000 ok=8000 stamped=8000 mismatches=0").is_some(), "{r:?}");
    // The guest ran before its memory was in; the file was built after.
    let at = |what: &str| r.stderr.find(what).unwrap_or_else(|| panic!("no {what:?}: {r:?}"));
    assert!(at("smudge: restore: the guest runs ") < at("smudge: restore fully loaded "), "{r:?}");
    assert!(at("smudge: restore fully loaded ") < at("holds the snapshot's memory"), "{r:?}");
    assert!(r.stderr.contains("RAM 64 MiB in shared memory, persisted to"), "{r:?}");
    // The file equals the guest's RAM at the end: the pages it wrote at
    // their last generation, every other page the snapshot's.
    let (written, _) = compare_unwritten(&dir, &snap, &mem, &dump);
    assert!(written >= 8000, "{written} pages written");
    assert_three_passes(&mem, 8000);
}

#[test]
fn a_corrupt_chunk_stops_the_default_restore_and_removes_its_memory_file() {
    require_kvm();
    let dir = tmpdir();
    let snap = snapshot_held(&dir, &path(&dir, "m"), "64M", "workload=seq pages=4000 passes=3 sync=1");
    corrupt_a_data_chunk(&snap, 64 << 20);
    let mem = path(&dir, "new.mem");
    let r = restore(&snap, &mem, &["--timeout", "60"]);
    assert_eq!(r.code, 107, "{r:?}");
    assert!(r.stderr.contains("memory.img") && r.stderr.contains("checksum mismatch"), "{r:?}");
    assert!(r.stderr.contains("the guest cannot continue"), "{r:?}");
    assert!(r.stderr.contains(&format!("{} removed", mem.display())), "{r:?}");
    assert!(!mem.exists(), "a memory file with unchecked bytes was left behind");
    // Copying first (no userfaultfd) refuses it before the guest runs.
    let r = restore(&snap, &mem, &["--timeout", "60", "--test-no-userfaultfd"]);
    assert_eq!(r.code, 100, "{r:?}");
    assert!(r.stderr.contains("checksum mismatch") && !r.stderr.contains("restore: the guest runs "), "{r:?}");
    assert!(!mem.exists(), "a failed restore left its memory file");
}

#[test]
fn without_userfaultfd_the_default_restore_copies_the_snapshot_first_and_says_why() {
    require_kvm();
    let dir = tmpdir();
    let snap = snapshot_held(&dir, &path(&dir, "m"), "64M", "workload=seq pages=8000 passes=3 sync=1 verify=1");
    let mem = path(&dir, "new.mem");
    let r = restore(&snap, &mem, &["--timeout", "60", "--test-no-userfaultfd"]);
    assert_eq!(r.code, 0, "{r:?}");
    let why = format!(
        "smudge: restore: no userfaultfd (refused by --test-no-userfaultfd); copying the snapshot into {} before \
         the guest runs\n",
        mem.display()
    );
    assert!(r.stderr.starts_with(&why), "{r:?}");
    assert!(r.stderr.contains("smudge: restore: the guest runs ") && !r.stderr.contains("fully loaded"), "{r:?}");
    assert!(r.line("verify: pages=8000 ok=8000 stamped=8000 mismatches=0").is_some(), "{r:?}");
    assert_three_passes(&mem, 8000);
}

#[test]
fn a_lazy_restore_carries_on_and_its_verify_passes() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    // Held after pass 1 of 3: all 8000 pages stamped, two passes to go.
    let snap = snapshot_held(&dir, &path(&dir, "m"), "64M", "workload=seq pages=8000 passes=3 sync=1 verify=1");
    let out = lazy(&snap, &shm.path().join("lazy.mem"), &["--timeout", "60"]).wait_with_output().unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stdout.contains(guest_abi::BANNER), "{r:?}");
    // It went on from the end of pass 1: passes 2 and 3, 8000 writes each.
    assert!(r.line("workload seq done: writes=24000 ").is_some(), "{r:?}");
    assert!(r.line("verify: pages=8000 ok=8000 stamped=8000 mismatches=0").is_some(), "{r:?}");
    // Every owed page was loaded exactly once: on first touch or prefetched.
    let (owed, touched, prefetched) = load_counts(&r);
    assert!(owed >= 8000, "the 8000 stamped pages hold data: {r:?}");
    assert_eq!(touched + prefetched, owed, "{r:?}");
    assert!(r.stderr.contains("ms after smudge started"), "{r:?}");
}

#[test]
fn pages_the_guest_never_touches_are_loaded_by_the_prefetch() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    // A first run stamps all 8000 pages; the snapshotted one rewrites only
    // every 64th page (125 of them), pass after pass, and so does the
    // restored guest: every other page is left to the prefetch.
    let src = path(&dir, "m");
    let first = boot(&src, "64M", "workload=seq pages=8000");
    assert_eq!(first.code, 0, "{first:?}");
    let snap = snapshot_held(&dir, &src, "64M", "workload=stride pages=8000 stride=64 passes=200 sync=1");
    let (mem, dump) = (shm.path().join("lazy.mem"), path(&dir, "dirty.txt"));
    let child = lazy(&snap, &mem, &["--timeout", "60", "--dump-dirty", dump.to_str().unwrap()]);
    let r = Run::from(child.wait_with_output().unwrap());
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.line("workload stride done: writes=25000 ").is_some(), "{r:?}");
    let (owed, touched, prefetched) = load_counts(&r);
    assert_eq!(touched + prefetched, owed, "{r:?}");

    // Every page the guest did not write after the restore holds the
    // snapshot's bytes.
    let (written, data) = compare_unwritten(&dir, &snap, &mem, &dump);
    assert!(written < 4000, "{written} pages written");
    assert!(data > 4000, "only {data} unwritten pages hold data");
}

#[test]
fn killing_a_lazy_restore_mid_load_leaves_the_snapshot_untouched() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    // 100000 stamped pages (390 MiB) to load.
    let snap = snapshot_held(&dir, &path(&dir, "m"), "512M", "workload=seq pages=100000 passes=2 sync=1");
    let before = files_of(&snap);
    let mem = shm.path().join("lazy.mem");
    let mut child = lazy(&snap, &mem, &["--timeout", "60"]);
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let t0 = Instant::now();
    let mut line = String::new();
    while !line.contains("lazy restore: the guest runs") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "the restore ended before the guest ran");
        assert!(t0.elapsed() < progress::WAIT, "the lazy restore never said the guest runs");
    }
    // At once: the guest runs, its 390 MiB are still loading.
    child.kill().unwrap();
    child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(!rest.contains("fully loaded"), "killed after the load ended; the test proves nothing:\n{rest}");
    assert!(files_of(&snap) == before, "the snapshot changed");
    let v = smudge().args(["snapshot", "verify", snap.to_str().unwrap()]).output().unwrap();
    assert!(v.status.success(), "{v:?}");
}

#[test]
fn a_corrupt_chunk_stops_a_lazy_restore_and_a_disk_file_is_refused() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    let snap = snapshot_held(&dir, &path(&dir, "m"), "64M", "workload=seq pages=4000 passes=3 sync=1");
    // The memory file on disk: refused before anything starts.
    let out = lazy(&snap, &path(&dir, "disk.mem"), &[]).wait_with_output().unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 100, "{r:?}");
    assert!(r.stderr.contains("needs the memory file on tmpfs"), "{r:?}");

    // A flipped byte in a data chunk: the guest started, then stops with
    // the file and offset named.
    corrupt_a_data_chunk(&snap, 64 << 20);
    let out = lazy(&snap, &shm.path().join("lazy.mem"), &["--timeout", "60"]).wait_with_output().unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 107, "{r:?}");
    assert!(r.stderr.contains("memory.img") && r.stderr.contains("checksum mismatch"), "{r:?}");
    assert!(r.stderr.contains("the guest cannot continue"), "{r:?}");
}

#[test]
fn a_run_that_ends_early_still_finishes_loading_the_memory_file() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    // 256 MiB of stamped pages: loading them takes far longer than the
    // run's 1 ms.
    let snap = snapshot_held(&dir, &path(&dir, "m"), "512M", "workload=seq pages=65536 passes=2 sync=1");
    let (mem, dump) = (shm.path().join("lazy.mem"), path(&dir, "dirty.txt"));
    // The guest is stopped (timeout) before its pages could all load.
    let r = Run::from(
        lazy(&snap, &mem, &["--timeout", "0.001", "--dump-dirty", dump.to_str().unwrap()]).wait_with_output().unwrap(),
    );
    assert_eq!(r.code, 103, "{r:?}");
    assert!(r.stderr.contains("lazy restore fully loaded"), "{r:?}");
    assert!(
        r.stderr.contains("waiting for its memory to finish loading"),
        "the load ended first; proves nothing: {r:?}"
    );
    let (owed, touched, prefetched) = load_counts(&r);
    assert_eq!(touched + prefetched, owed, "{r:?}");
    // Every page the guest did not write holds the snapshot's bytes.
    compare_unwritten(&dir, &snap, &mem, &dump);
}
