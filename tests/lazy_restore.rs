//! Lazy restore (issue 9): `smudge restore --lazy` starts the guest at
//! once on tmpfs RAM and loads its memory behind it, on first touch and by
//! a background prefetch, each chunk checked; the guest carries on, every
//! page the guest did not write since is the snapshot's, the snapshot is
//! never written, and a corrupt chunk stops the guest with a clear error.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A directory on tmpfs for the restored memory file.
fn shm_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("smudge-test-").tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is needed")
}

/// Snapshots a guest running `cmdline` on `size` of RAM into `snap`
/// (left paused, then stopped).
fn snapshot_of(dir: &tempfile::TempDir, size: &str, cmdline: &str, warm: Duration) -> PathBuf {
    let (mem, sock, snap) = (path(dir, "m"), path(dir, "api.sock"), path(dir, "snap"));
    let vm = start_with_api(&mem, &sock, size, cmdline, Stdio::null(), true, &[]);
    std::thread::sleep(warm);
    let s = ctl(&sock, &["snapshot", "create", snap.to_str().unwrap(), "--no-resume"]);
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    assert_eq!(vm.wait_with_output().unwrap().status.code(), Some(0));
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
        smudge_vmm::dirty::read_dump(&std::fs::read_to_string(dump).unwrap()).unwrap().into_iter().collect();
    let want_path = path(dir, "want.mem");
    smudge::snapshot::materialize(snap, &want_path).unwrap();
    let (got, want) = (std::fs::read(mem).unwrap(), std::fs::read(&want_path).unwrap());
    assert_eq!(got.len(), want.len());
    let layout = smudge::memory::ram_layout(want.len() as u64);
    let mut data = 0;
    for (i, (g, w)) in got.chunks(4096).zip(want.chunks(4096)).enumerate() {
        let gpa = smudge::memory::file_offset_to_gpa(&layout, i as u64 * 4096).unwrap();
        if !written.contains(&gpa) {
            assert!(g == w, "page {gpa:#x}, not written since the restore, differs from the snapshot");
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

#[test]
fn a_lazy_restore_carries_on_and_its_verify_passes() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    let snap =
        snapshot_of(&dir, "64M", "workload=random pages=8000 seed=31 ms=3000 verify=1", Duration::from_millis(600));
    let out = lazy(&snap, &shm.path().join("lazy.mem"), &["--timeout", "60"]).wait_with_output().unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stdout.contains(guest_abi::BANNER), "{r:?}");
    assert!(r.line("workload random done:").is_some(), "{r:?}");
    assert!(r.line("verify: pages=8000").unwrap().ends_with("mismatches=0"), "{r:?}");
    // Every owed page was loaded exactly once: on first touch or prefetched.
    let (owed, touched, prefetched) = load_counts(&r);
    assert!(owed >= 8000, "{r:?}");
    assert_eq!(touched + prefetched, owed, "{r:?}");
    assert!(r.stderr.contains("ms after smudge started"), "{r:?}");
}

#[test]
fn pages_the_guest_never_touches_are_loaded_by_the_prefetch() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    // A fast writer stamps most of its 8000 pages before the snapshot.
    let snap =
        snapshot_of(&dir, "64M", "workload=rate rate=20000 pages=8000 seed=32 ms=60000", Duration::from_millis(800));
    let (mem, dump, sock) = (shm.path().join("lazy.mem"), path(&dir, "dirty.txt"), path(&dir, "lazy.sock"));
    let child = lazy(
        &snap,
        &mem,
        &["--timeout", "60", "--dump-dirty", dump.to_str().unwrap(), "--api-sock", sock.to_str().unwrap()],
    );
    // Pause the restored guest as soon as it can be asked: from then on it
    // touches nothing, and the prefetch alone loads the rest.
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no API socket");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(ctl(&sock, &["pause"])["ok"], true);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    let r = Run::from(child.wait_with_output().unwrap());
    assert_eq!(r.code, 0, "{r:?}");
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
    let snap = snapshot_of(
        &dir,
        "512M",
        "workload=rate rate=100 pages=100000 seed=32 ms=60000 wipe=1",
        Duration::from_millis(2500),
    );
    let before = files_of(&snap);
    let mem = shm.path().join("lazy.mem");
    let mut child = lazy(&snap, &mem, &["--timeout", "60"]);
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let t0 = Instant::now();
    let mut line = String::new();
    while !line.contains("lazy restore: the guest runs") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "the restore ended before the guest ran");
        assert!(t0.elapsed() < Duration::from_secs(20));
    }
    std::thread::sleep(Duration::from_millis(20));
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
    let snap = snapshot_of(
        &dir,
        "64M",
        "workload=rate rate=200 pages=4000 seed=33 ms=3000 wipe=1",
        Duration::from_millis(500),
    );
    // The memory file on disk: refused before anything starts.
    let out = lazy(&snap, &path(&dir, "disk.mem"), &[]).wait_with_output().unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 100, "{r:?}");
    assert!(r.stderr.contains("needs the memory file on tmpfs"), "{r:?}");

    // A flipped byte in a data chunk: the guest started, then stops with
    // the file and offset named.
    let img = snap.join("memory.img");
    let data = smudge::snapshot::data_ranges(&std::fs::File::open(&img).unwrap(), 64 << 20).unwrap();
    let at = data.last().unwrap().0 + 100;
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&img).unwrap(), &mut b, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 0x40], at).unwrap();
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
    // 256 MiB of data: loading takes far longer than the run.
    let snap = snapshot_of(
        &dir,
        "512M",
        "workload=rate rate=100 pages=65536 seed=34 ms=60000 wipe=1",
        Duration::from_millis(1500),
    );
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
