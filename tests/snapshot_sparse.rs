//! A full snapshot of a large guest that wrote little: its checksum pass
//! reads what `memory.img` holds, not its 4 GiB of holes (it read all of
//! them, 11–22 s per snapshot, while the API stayed busy). Counted in bytes
//! read, never timed. A corrupt byte in a data chunk is still caught, and
//! the snapshot restores (eagerly and lazily) to a guest whose verify
//! passes.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use smudge::snapshot::CHUNK;
use smudge_testkit::*;

/// Waits for the serial log `file` to hold a line starting with `prefix`.
fn wait_line(file: &Path, prefix: &str, vm: &mut Child) -> String {
    let t0 = Instant::now();
    loop {
        let log = std::fs::read_to_string(file).unwrap_or_default();
        if let Some(l) = log.lines().find(|l| l.starts_with(prefix)) {
            return l.to_string();
        }
        if let Ok(Some(st)) = vm.try_wait() {
            panic!("smudge ended ({st}) before the guest printed {prefix:?}; serial:\n{log}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the guest never printed {prefix:?}; serial:\n{log}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Bytes a reader of `memory.img` must read to checksum it: every 1 MiB
/// chunk that holds any data, whole.
fn data_chunk_bytes(img: &Path) -> u64 {
    let f = std::fs::File::open(img).unwrap();
    let len = f.metadata().unwrap().len();
    let mut chunks = std::collections::BTreeSet::new();
    for (off, n) in smudge::file_io::data_ranges(&f, len).unwrap() {
        chunks.extend(off / CHUNK..(off + n).div_ceil(CHUNK));
    }
    chunks.iter().map(|&c| (len - c * CHUNK).min(CHUNK)).sum()
}

fn restore(snap: &Path, mem: &Path, lazy: bool) -> Run {
    let mut cmd = smudge();
    cmd.args(["restore", "--snapshot", snap.to_str().unwrap(), "--mem-file", mem.to_str().unwrap()]);
    if lazy {
        cmd.arg("--lazy");
    }
    Run::from(cmd.args(["--timeout", "120"]).output().unwrap())
}

#[test]
fn a_sparse_4g_guest_is_checksummed_by_what_it_holds() {
    require_kvm();
    let dir = tmpdir();
    let (mem, sock, serial, snap) = (path(&dir, "m"), path(&dir, "api.sock"), path(&dir, "serial"), path(&dir, "snap"));
    // 1000 pages (4 MiB) written in a 4 GiB guest.
    let cmdline = "workload=random pages=1000 seed=7 ms=8000 verify=1";
    let out = std::fs::File::create(&serial).unwrap();
    let mut vm = start_with_api(&mem, &sock, "4G", cmdline, Stdio::from(out), false, &[]);
    wait_line(&serial, "layout:", &mut vm);
    // Paused at a point where the workload runs: the snapshot holds it
    // mid-way, and the restored guest carries on and verifies.
    assert_eq!(ctl(&sock, &["pause"])["paused"], true);
    let log = std::fs::read_to_string(&serial).unwrap();
    assert!(!log.contains("workload random done"), "the guest finished before the pause: {log}");
    let s = ctl(&sock, &["snapshot", "create", snap.to_str().unwrap(), "--no-resume"]);
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    assert_eq!(vm.wait().unwrap().code(), Some(0));

    // The checksum pass read the chunks holding data and state.json: a few
    // MiB, not the 4 GiB the image spans.
    let img = snap.join("memory.img");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 4 << 30);
    let state_len = std::fs::metadata(snap.join("state.json")).unwrap().len();
    let want = data_chunk_bytes(&img) + state_len;
    assert_eq!(s["checksum_read_bytes"].as_u64(), Some(want), "{s}");
    assert!(want < 64 << 20, "the guest's data spans {want} bytes of chunks: {s}");
    // Every byte copied lies in a chunk that was read.
    let copied = s["memory_bytes"].as_u64().unwrap();
    assert!(copied > 0 && copied <= want, "{s}");

    let verify = |dir: &Path| Run::from(smudge().args(["snapshot", "verify", dir.to_str().unwrap()]).output().unwrap());
    let v = verify(&snap);
    assert_eq!(v.code, 0, "{v:?}");

    // A flipped byte in the last data range of the image: caught, chunk
    // named.
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let ranges = smudge::file_io::data_ranges(&f, 4 << 30).unwrap();
    let &(off, len) = ranges.last().unwrap_or_else(|| panic!("memory.img holds no data: {s}"));
    let at = off + len / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    let v = verify(&snap);
    assert_eq!(v.code, 100, "{v:?}");
    let chunk = at / CHUNK * CHUNK;
    assert!(v.stderr.contains(&format!("memory.img: corrupt at offset {chunk:#x}")), "{v:?}");
    // The default restore finds it while the guest runs (before any of
    // its bytes is placed) and ends the run; no memory file is left.
    let r = restore(&snap, &path(&dir, "bad.mem"), false);
    assert_eq!(r.code, 107, "{r:?}");
    assert!(r.stderr.contains(&format!("memory.img: corrupt at offset {chunk:#x}")), "{r:?}");
    assert!(!path(&dir, "bad.mem").exists());
    f.write_all_at(&b, at).unwrap();
    assert_eq!(verify(&snap).code, 0);

    // It restores, by default and lazily, and the guest's verify passes.
    // A lazy restore's memory file must be on tmpfs.
    let shm = tempfile::Builder::new().prefix("smudge-test-").tempdir_in("/dev/shm").unwrap();
    for lazy in [false, true] {
        let mem = if lazy { shm.path().join("lazy.mem") } else { path(&dir, "eager.mem") };
        let r = restore(&snap, &mem, lazy);
        assert_eq!(r.code, 0, "lazy={lazy}: {r:?}");
        let line = r.line("verify: pages=1000").unwrap_or_else(|| panic!("lazy={lazy}: {r:?}"));
        assert!(line.ends_with("mismatches=0"), "lazy={lazy}: {line}");
    }
}
