//! Snapshots of a running guest (issue 5, full snapshots): taken through the
//! control socket, checked, restored into a new process where the guest
//! continues and its verify passes; corrupt snapshots are refused with the
//! file and offset named, and nothing is overwritten.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn ctl(sock: &Path, args: &[&str]) -> Value {
    let out = smudge().args(["ctl", "--api-sock", sock.to_str().unwrap()]).args(args).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {out:?}"))
}

fn start(mem: &Path, sock: &Path, cmdline: &str) -> Child {
    let child = smudge()
        .args(["run", "--mem-file", mem.to_str().unwrap(), "--mem-size", "64M", "--timeout", "60"])
        .args(["--api-sock", sock.to_str().unwrap(), "--cmdline", cmdline])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "socket never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

#[test]
fn snapshot_a_running_guest_and_continue_it_in_a_new_process() {
    let dir = tmpdir();
    let (mem, sock, snap) = (path(&dir, "m"), path(&dir, "api.sock"), path(&dir, "snap"));
    let vm = start(&mem, &sock, "workload=random pages=8000 seed=4 ms=4000 verify=1");
    std::thread::sleep(Duration::from_millis(700));
    // Snapshot and stay paused, then stop: the first VM's memory is then
    // exactly the snapshot's point in time.
    let s = ctl(&sock, &["snapshot", snap.to_str().unwrap(), "--no-resume"]);
    assert_eq!(s["ok"], true, "{s}");
    assert!(s["pause_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    let out = vm.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("workload random done"),
        "the guest finished before the snapshot: the test proves nothing"
    );
    let img = std::fs::read(snap.join("memory.img")).unwrap();
    assert!(img == std::fs::read(&mem).unwrap(), "snapshot memory differs from the guest's at the snapshot");

    let v = smudge().args(["snapshot", "verify", snap.to_str().unwrap()]).output().unwrap();
    assert!(v.status.success(), "{v:?}");

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
    assert!(r.line("workload random done:").is_some(), "{r:?}");
    assert!(r.line("verify: pages=8000").unwrap().ends_with("mismatches=0"), "{r:?}");
}

#[test]
fn corrupt_or_conflicting_snapshots_are_refused() {
    let dir = tmpdir();
    let (mem, sock, snap) = (path(&dir, "m"), path(&dir, "api.sock"), path(&dir, "snap"));
    let vm = start(&mem, &sock, "workload=random pages=2000 seed=1 ms=20000");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ctl(&sock, &["snapshot", snap.to_str().unwrap()])["ok"], true);
    // Taking another snapshot into the same directory is refused.
    let again = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
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
    // memory file is made.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(snap.join("memory.img")).unwrap();
    let mut b = [0u8; 1];
    let at = (guest_abi::ws_base_for(2000) + 5 * 4096) as u64;
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    let mem2 = path(&dir, "m2");
    let r = Run::from(
        smudge()
            .args(["restore", "--snapshot", snap.to_str().unwrap(), "--mem-file", mem2.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 100, "{r:?}");
    let chunk = at / (1 << 20) * (1 << 20);
    assert!(r.stderr.contains(&format!("memory.img: corrupt at offset {chunk:#x}")), "{r:?}");
    assert!(!mem2.exists());
    let v = Run::from(smudge().args(["snapshot", "verify", snap.to_str().unwrap()]).output().unwrap());
    assert_eq!(v.code, 100, "{v:?}");
}
