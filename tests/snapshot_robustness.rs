//! Snapshots under abuse: the VMM killed at random instants while
//! it writes a snapshot, and hundreds of corruptions of a good chain. The
//! last committed snapshot must always verify and restore; a damaged one
//! must be refused with the file named, never restored as garbage.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use guest_abi::Rng;
use smudge_testkit::*;

fn start(mem: &Path, sock: &Path, cmdline: &str) -> Child {
    start_with_api(mem, sock, "16M", cmdline, Stdio::null(), false, &[])
}

#[test]
fn killing_the_vmm_mid_snapshot_never_breaks_the_last_good_one() {
    let mut rng = Rng::new(2026);
    let (mut complete, mut torn) = (0, 0);
    for trial in 0..50 {
        let dir = tmpdir();
        let (mem, sock, s0, s1) = (path(&dir, "m"), path(&dir, "sock"), path(&dir, "s0"), path(&dir, "s1"));
        let mut vm = start(&mem, &sock, "workload=random pages=2500 seed=3 ms=100000 wipe=1");
        assert_eq!(ctl(&sock, &["snapshot", "create", s0.to_str().unwrap()])["ok"], true, "trial {trial}");
        let mut client = smudge()
            .args(["ctl", "--api-sock", sock.to_str().unwrap(), "snapshot", "create", s1.to_str().unwrap(), "--parent"])
            .arg(&s0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(40_000)));
        vm.kill().unwrap(); // SIGKILL, at a random instant of the snapshot
        vm.wait().unwrap();
        let _ = client.wait();
        // The committed snapshot is intact and restorable.
        smudge::snapshot::verify(&s0).unwrap_or_else(|e| panic!("trial {trial}: s0 broken: {e}"));
        smudge::snapshot::materialize(&s0, &path(&dir, "r0")).unwrap();
        // The interrupted one is either whole or refused — never half-taken.
        match smudge::snapshot::chain(&s1) {
            Ok(links) => {
                assert_eq!(links.len(), 2, "trial {trial}");
                smudge::snapshot::materialize(&s1, &path(&dir, "r1")).unwrap();
                complete += 1;
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("s1"), "trial {trial}: error does not name the snapshot: {msg}");
                torn += 1;
            }
        }
        if trial % 10 == 0 {
            // Really run the guest from the last good snapshot.
            let r = Run::from(
                smudge()
                    .args([
                        "restore",
                        "--snapshot",
                        s0.to_str().unwrap(),
                        "--mem-file",
                        path(&dir, "run").to_str().unwrap(),
                    ])
                    .args(["--timeout", "0.3"])
                    .output()
                    .unwrap(),
            );
            assert_eq!(r.code, 103, "trial {trial}: the restored guest should still be running at the timeout: {r:?}");
        }
    }
    eprintln!("50 kills: {complete} snapshots had completed, {torn} were refused as incomplete");
    assert!(torn > 0, "no kill landed inside a snapshot: the test did not test anything");
}

/// Every file of a chain, with its bytes.
fn files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in dirs {
        for name in ["manifest.json", "state.json", "memory.img", "extents.json", "memory.diff"] {
            if d.join(name).exists() {
                v.push(d.join(name));
            }
        }
    }
    v
}

fn check_refused_or_identical(last: &Path, good: &[u8], scratch: &Path, what: &str) {
    let _ = std::fs::remove_file(scratch);
    let r = smudge::snapshot::load(last).and_then(|_| smudge::snapshot::materialize(last, scratch));
    match r {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                ["manifest.json", "state.json", "memory.img", "extents.json", "memory.diff", "/s0", "/s1"]
                    .iter()
                    .any(|n| msg.contains(n)),
                "{what}: error names no file: {msg}"
            );
            assert!(!scratch.exists(), "{what}: a refused restore left a memory file");
        }
        Ok(_) => {
            assert!(std::fs::read(scratch).unwrap() == good, "{what}: restored garbage");
        }
    }
}

#[test]
fn hundreds_of_corruptions_are_refused_with_the_file_named() {
    let dir = tmpdir();
    let (mem, sock, s0, s1) = (path(&dir, "m"), path(&dir, "sock"), path(&dir, "s0"), path(&dir, "s1"));
    let mut vm = start(&mem, &sock, "workload=rate rate=500 pages=2500 seed=9 ms=100000 wipe=1");
    // Pages in the full snapshot, and new ones for the diff to hold.
    progress::wait_for_writes(&mut vm, &mem, 2500, 50);
    assert_eq!(ctl(&sock, &["snapshot", "create", s0.to_str().unwrap()])["ok"], true);
    let w = progress::guest_writes(&mem, 2500);
    progress::wait_for_writes(&mut vm, &mem, 2500, w + 50);
    assert_eq!(ctl(&sock, &["snapshot", "create", s1.to_str().unwrap(), "--parent", s0.to_str().unwrap()])["ok"], true);
    vm.kill().unwrap();
    vm.wait().unwrap();
    let good_path = path(&dir, "good");
    smudge::snapshot::materialize(&s1, &good_path).unwrap();
    let good = std::fs::read(&good_path).unwrap();
    let scratch = path(&dir, "scratch");
    let all = files(&[s0.clone(), s1.clone()]);

    let mut rng = Rng::new(7);
    let mut n = 0;
    // Bit flips at random offsets of random files, undone after each check.
    for _ in 0..220 {
        let f = &all[rng.below(all.len() as u64) as usize];
        let mut bytes = std::fs::read(f).unwrap();
        let off = rng.below(bytes.len() as u64) as usize;
        let bit = 1u8 << rng.below(8);
        bytes[off] ^= bit;
        std::fs::write(f, &bytes).unwrap();
        check_refused_or_identical(&s1, &good, &scratch, &format!("flip bit {bit:#x} at {off:#x} of {}", f.display()));
        bytes[off] ^= bit;
        std::fs::write(f, &bytes).unwrap();
        n += 1;
    }
    // Truncations of every file.
    for f in &all {
        let bytes = std::fs::read(f).unwrap();
        for cut in [0, bytes.len() / 2, bytes.len().saturating_sub(1)] {
            std::fs::write(f, &bytes[..cut]).unwrap();
            check_refused_or_identical(&s1, &good, &scratch, &format!("truncate {} to {cut}", f.display()));
            n += 1;
        }
        std::fs::write(f, &bytes).unwrap();
    }
    // A manifest from a newer smudge.
    let mpath = s0.join("manifest.json");
    let orig = std::fs::read_to_string(&mpath).unwrap();
    std::fs::write(&mpath, orig.replace("\"version\": 1", "\"version\": 2")).unwrap();
    let e = smudge::snapshot::chain(&s1).unwrap_err().to_string();
    assert!(e.contains("s0/manifest.json") && e.contains("format version 2"), "{e}");
    std::fs::write(&mpath, &orig).unwrap();
    // A missing parent.
    let moved = path(&dir, "moved");
    std::fs::rename(&s0, &moved).unwrap();
    let e = smudge::snapshot::chain(&s1).unwrap_err().to_string();
    assert!(e.contains("s0"), "{e}");
    // A parent from another VM in its place.
    let (mem2, sock2) = (path(&dir, "m2"), path(&dir, "sock2"));
    let mut other = start(&mem2, &sock2, "workload=idle ms=100000");
    assert_eq!(ctl(&sock2, &["snapshot", "create", s0.to_str().unwrap()])["ok"], true);
    other.kill().unwrap();
    other.wait().unwrap();
    let e = smudge::snapshot::chain(&s1).unwrap_err().to_string();
    assert!(e.contains("holds snapshot") && e.contains("s1/manifest.json"), "{e}");
    n += 3;
    // The binary says the same, without panicking.
    let r = Run::from(
        smudge()
            .args(["restore", "--snapshot", s1.to_str().unwrap(), "--mem-file", scratch.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 100, "{r:?}");
    assert!(r.stderr.contains("holds snapshot") && !r.stderr.contains("panicked"), "{r:?}");
    assert!(n >= 200, "{n} corruptions");
}
