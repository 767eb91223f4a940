//! Snapshots of a running guest: taken through the
//! control socket, checked, restored into a new process where the guest
//! continues and its verify passes; corrupt snapshots are refused with the
//! file and offset named, and nothing is overwritten.

use std::path::Path;
use std::process::{Child, Stdio};

use smudge_testkit::*;

fn start(mem: &Path, sock: &Path, cmdline: &str, extra: &[&str]) -> Child {
    start_with_api(mem, sock, "64M", cmdline, Stdio::piped(), true, extra)
}

/// Held at the end of its first pass (`--test-pause-at-sync 1`).
const HOLD: [&str; 2] = ["--test-pause-at-sync", "1"];

#[test]
fn snapshot_a_running_guest_and_continue_it_in_a_new_process() {
    let dir = tmpdir();
    let (mem, sock, snap) = (path(&dir, "m"), path(&dir, "api.sock"), path(&dir, "snap"));
    // Held after pass 1 of 3: every page stamped, two passes to go.
    let mut vm = start(&mem, &sock, "workload=seq pages=8000 passes=3 sync=1 verify=1", &HOLD);
    progress::wait_paused(&mut vm, &sock);
    // Snapshot and stay paused, then stop: the first VM's memory is then
    // exactly the snapshot's point in time.
    let s = ctl(&sock, &["snapshot", "create", snap.to_str().unwrap(), "--no-resume"]);
    assert_eq!(s["ok"], true, "{s}");
    assert!(s["pause_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    let out = vm.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("workload seq done"),
        "the guest finished before the snapshot: the test proves nothing"
    );
    let img = std::fs::read(snap.join("memory.img")).unwrap();
    assert!(img == std::fs::read(&mem).unwrap(), "snapshot memory differs from the guest's at the snapshot");

    let v = smudge().args(["snapshot", "verify", snap.to_str().unwrap()]).output().unwrap();
    assert!(v.status.success(), "{v:?}");
    // The UART's registers travel too (the guest leaves them at their
    // reset values: 8N1, divisor 12 = 9600 baud, transmitter empty).
    let (_, state) = smudge::snapshot::load(&snap).unwrap();
    assert_eq!(state.vcpus.len(), 1);
    let com1 = state.devices.com1.clone().unwrap();
    assert_eq!((com1.line_control, com1.baud_divisor_low, com1.line_status), (3, 12, 0x60), "{com1:?}");

    let mem2 = path(&dir, "m2");
    let out = smudge()
        .args([
            "restore",
            "--snapshot",
            snap.to_str().unwrap(),
            "--mem-file",
            mem2.to_str().unwrap(),
            "--timeout",
            "60",
        ])
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 0, "{r:?}");
    // No banner: the guest did not boot again, it went on with its workload.
    assert!(!r.stdout.contains(guest_abi::BANNER), "{r:?}");
    // From the end of pass 1 on: passes 2 and 3, 8000 writes each.
    assert!(r.line("workload seq done: writes=24000 ").is_some(), "{r:?}");
    assert!(r.line("verify: pages=8000 ok=8000 stamped=8000 mismatches=0").is_some(), "{r:?}");
}

#[test]
fn corrupt_or_conflicting_snapshots_are_refused() {
    let dir = tmpdir();
    let (mem, sock, snap) = (path(&dir, "m"), path(&dir, "api.sock"), path(&dir, "snap"));
    // Every page stamped (the flipped byte below lands in data).
    let mut vm = start(&mem, &sock, "workload=seq pages=2000 passes=2 sync=1", &HOLD);
    progress::wait_paused(&mut vm, &sock);
    assert_eq!(ctl(&sock, &["snapshot", "create", snap.to_str().unwrap()])["ok"], true);
    // Taking another snapshot into the same directory is refused.
    let again = ctl(&sock, &["snapshot", "create", snap.to_str().unwrap()]);
    assert_eq!(again["ok"], false);
    assert!(again["error"].as_str().unwrap().contains("not empty"), "{again}");
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    assert_eq!(vm.wait_with_output().unwrap().status.code(), Some(0));

    // Restoring over an existing memory file is refused; the file is kept.
    std::fs::write(path(&dir, "busy"), b"mine").unwrap();
    let r = Run::from(
        smudge()
            .args(["restore", "--snapshot", snap.to_str().unwrap(), "--mem-file", path(&dir, "busy").to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 100, "{r:?}");
    assert!(r.stderr.contains("will not overwrite"), "{r:?}");
    assert_eq!(std::fs::read(path(&dir, "busy")).unwrap(), b"mine");

    // One flipped byte in memory.img: named by file and offset, and no
    // memory file is left. The default restore finds it while the guest
    // runs (its chunk is checked before any of its bytes is placed) and
    // ends the run (107); copying first (no userfaultfd) refuses it before
    // the guest runs (100).
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(snap.join("memory.img")).unwrap();
    let mut b = [0u8; 1];
    let at = (guest_abi::ws_base_for(2000) + 5 * 4096) as u64;
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    let mem2 = path(&dir, "m2");
    let chunk = at / (1 << 20) * (1 << 20);
    for (extra, code) in [(None, 107), (Some("--test-no-userfaultfd"), 100)] {
        let r = Run::from(
            smudge()
                .args(["restore", "--snapshot", snap.to_str().unwrap(), "--mem-file", mem2.to_str().unwrap()])
                .args(extra)
                .output()
                .unwrap(),
        );
        assert_eq!(r.code, code, "{r:?}");
        assert!(r.stderr.contains(&format!("memory.img: corrupt at offset {chunk:#x}")), "{r:?}");
        assert!(!mem2.exists());
    }
    let v = Run::from(smudge().args(["snapshot", "verify", snap.to_str().unwrap()]).output().unwrap());
    assert_eq!(v.code, 100, "{v:?}");
}

#[test]
fn a_chain_of_diffs_restores_to_its_last_point_and_merges_to_the_same_bytes() {
    chain_restores_and_merges(true);
}

#[test]
fn without_precopy_a_chain_still_restores_to_its_last_point() {
    chain_restores_and_merges(false);
}

/// full -> diff -> diff, with diff pages pre-copied while the guest runs
/// (the default) or all copied in the pause (`--snapshot-precopy-ms 0`).
fn chain_restores_and_merges(precopy: bool) {
    let dir = tmpdir();
    let (mem, sock) = (path(&dir, "m"), path(&dir, "api.sock"));
    let (s1, s2, s3, merged) = (path(&dir, "s1"), path(&dir, "s2"), path(&dir, "s3"), path(&dir, "merged"));
    // A first run stamps all 8000 pages; then a slow writer rewrites
    // random ones until stopped, so a diff holds far fewer pages than the
    // full image.
    let pages = 8000;
    let first = boot(&mem, "64M", "workload=seq pages=8000");
    assert_eq!(first.code, 0, "{first:?}");
    let cmdline = "workload=rate rate=300 pages=8000 seed=6 writes=100m";
    // No writeback: the pre-copy thread is then the only harvester, so a
    // harvest in `stats` after a pause is a pre-copy pass that saw every
    // page written before it.
    let mut extra = vec!["--no-writeback"];
    if !precopy {
        extra.extend(["--snapshot-precopy-ms", "0"]);
    }
    let mut vm = start(&mem, &sock, cmdline, &extra);
    progress::wait_for_writes(&mut vm, &mem, pages, pages + 1);
    let full = ctl(&sock, &["snapshot", "create", s1.to_str().unwrap()]);
    assert_eq!(full["ok"], true, "{full}");
    // A diff: the guest writes 60 pages or more, is paused, and (with
    // pre-copy) a pre-copy pass runs after the pause, so the pause copies
    // nothing.
    let diff = |vm: &mut Child, dir: &Path, parent: &Path| {
        let w = progress::guest_writes(&mem, pages);
        progress::wait_for_writes(vm, &mem, pages, w + 60);
        assert_eq!(ctl(&sock, &["pause"])["ok"], true);
        if precopy {
            let h = progress::harvests(&ctl(&sock, &["stats"]));
            progress::wait_for_stats(vm, &sock, "a pre-copy pass after the pause", |s| progress::harvests(s) > h);
        }
        let d = ctl(&sock, &["snapshot", "create", dir.to_str().unwrap(), "--parent", parent.to_str().unwrap()]);
        assert_eq!((d["ok"].clone(), d["kind"].clone()), (true.into(), "diff".into()), "{d}");
        d
    };
    let d1 = diff(&mut vm, &s2, &s1);
    // A diff must build on the last snapshot, not an older one.
    let bad = ctl(&sock, &["snapshot", "create", path(&dir, "x").to_str().unwrap(), "--parent", s1.to_str().unwrap()]);
    assert!(bad["error"].as_str().unwrap().contains("must build on the last snapshot"), "{bad}");
    assert_eq!(ctl(&sock, &["resume"])["ok"], true);
    let d2 = diff(&mut vm, &s3, &s2);
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    assert_eq!(vm.wait_with_output().unwrap().status.code(), Some(0));
    let full_bytes = full["memory_bytes"].as_u64().unwrap();
    for d in [&d1, &d2] {
        let b = d["memory_bytes"].as_u64().unwrap();
        assert!(b > 0 && b * 10 < full_bytes, "a diff of ~60 page writes holds {b} bytes (full: {full_bytes})");
        let in_pause = d["pause_copied_bytes"].as_u64().unwrap();
        if precopy {
            // Pre-copy took every page before the pause.
            assert_eq!(in_pause, 0, "pre-copy on, yet the pause copied {in_pause} of {b} bytes");
        } else {
            assert_eq!(in_pause, b, "pre-copy off: the pause copies the whole diff");
        }
    }
    let at_last = std::fs::read(&mem).unwrap();

    // The chain, materialized, is exactly memory at the last snapshot.
    let out = smudge().args(["snapshot", "verify", s3.to_str().unwrap()]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("chain of 3 snapshot(s) verified"), "{out:?}");
    let chain_mem = path(&dir, "chain.mem");
    smudge::snapshot::materialize(&s3, &chain_mem).unwrap();
    assert!(std::fs::read(&chain_mem).unwrap() == at_last, "chain does not restore to its last point");
    let out = smudge().args(["snapshot", "merge", s3.to_str().unwrap(), merged.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read(merged.join("memory.img")).unwrap() == at_last, "merge differs from the chain");

    // And the guest goes on from the chain: every page then holds what its
    // generation table says.
    progress::restore_carries_on(&s3, &path(&dir, "m2"), pages);
}
