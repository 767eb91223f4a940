//! Fault injection: a disk that fills up under a full snapshot,
//! under a diff snapshot and under a migration's destination. Each gives a
//! clear error, the guest runs on, the previous snapshot stays intact, no
//! page is lost, and a retry with room succeeds. The full disk is a small
//! tmpfs mounted by the test (the suite runs as root).

use std::path::Path;
use std::process::Stdio;

use smudge_testkit::*;

fn snapshot(sock: &Path, dir: &Path, parent: Option<&Path>) -> serde_json::Value {
    let mut args = vec!["snapshot", "create", dir.to_str().unwrap()];
    if let Some(p) = parent {
        args.extend(["--parent", p.to_str().unwrap()]);
    }
    ctl(sock, &args)
}

#[test]
fn snapshots_onto_a_full_disk_fail_clearly_and_a_retry_with_room_loses_nothing() {
    require_kvm();
    let dir = tmpdir();
    let tiny = Tmpfs::mount(&path(&dir, "tiny"), "size=1m");
    let (mem, sock) = (path(&dir, "m"), path(&dir, "sock"));
    // Up to 16 MiB of stamped pages, written until the test ends the run.
    let cmdline = "workload=rate pages=4000 rate=4000 writes=1000000000 seed=21 wipe=1";
    let mut vm = start_with_api(&mem, &sock, "64M", cmdline, Stdio::null(), true, &[]);
    progress::wait_for_writes(&mut vm, &mem, PAGES, 400);
    let s0 = path(&dir, "s0");
    assert_eq!(snapshot(&sock, &s0, None)["ok"], true);

    // A full snapshot onto the full disk.
    let full = tiny.0.join("full");
    let r = snapshot(&sock, &full, None);
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("No space left") && e.contains("tiny/full"), "{e}");
    assert!(smudge::snapshot::verify(&full).is_err(), "a failed snapshot must never verify");
    assert_eq!(ctl(&sock, &["stats"])["paused"], false, "the guest runs on");
    smudge::snapshot::verify(&s0).unwrap();
    // The same onto another filesystem with room (copy_file_range cannot
    // cross filesystems here: the copy falls back to read/write).
    let big = Tmpfs::mount(&path(&dir, "big"), "size=64m");
    let r = snapshot(&sock, &big.0.join("full"), None);
    assert_eq!(r["ok"], true, "{r}");
    smudge::snapshot::verify(&big.0.join("full")).unwrap();

    // A full snapshot starts a new chain; take one with room, then a diff
    // onto the full disk, then the diff again with room.
    let s1 = path(&dir, "s1");
    assert_eq!(snapshot(&sock, &s1, None)["ok"], true);
    more_writes(&mut vm, &mem);
    let bad = tiny.0.join("d1");
    let r = snapshot(&sock, &bad, Some(&s1));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("No space left"), "{r}");
    more_writes(&mut vm, &mem);
    let d1 = path(&dir, "d1");
    let r = snapshot(&sock, &d1, Some(&s1));
    assert_eq!(r["ok"], true, "the retry with room: {r}");
    vm.kill().unwrap();
    vm.wait().unwrap();

    // The retried diff holds the failed one's pages too: the chain restores
    // a guest that carries on, every page holding what its table says.
    smudge::snapshot::chain(&d1).unwrap();
    progress::restore_carries_on(&d1, &path(&dir, "r"), PAGES);
}

/// Working-set pages of the guests here.
const PAGES: u64 = 4000;

/// Waits until the guest of `vm` on `mem` has made 200 page writes more
/// than it had made now (so a snapshot after it has new pages to hold).
fn more_writes(vm: &mut std::process::Child, mem: &Path) {
    let w = progress::guest_writes(mem, PAGES);
    progress::wait_for_writes(vm, mem, PAGES, w + 200);
}

#[test]
fn a_destination_whose_disk_fills_refuses_and_the_source_runs_on() {
    require_kvm();
    let dir = tmpdir();
    let tiny = Tmpfs::mount(&path(&dir, "tiny"), "size=2m");
    let (mem, sock) = (path(&dir, "m"), path(&dir, "sock"));
    // Written until the test ends the run.
    let cmdline = "workload=rate pages=4000 rate=4000 writes=1000000000 seed=22 wipe=1";
    let out = std::fs::File::create(path(&dir, "serial")).unwrap();
    let mut vm = start_with_api(&mem, &sock, "64M", cmdline, Stdio::from(out), true, &[]);
    let mut dest = smudge()
        .args(["migrate-recv", "--listen", "0", "--accept-timeout", "30", "--serial", "/dev/null", "--mem-file"])
        .arg(tiny.0.join("dst.mem"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(dest.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    let addr =
        line.trim().strip_prefix("smudge: waiting for a migration on ").unwrap_or_else(|| panic!("{line}")).to_string();
    // The guest holds well over the 2 MiB the destination has room for.
    progress::wait_for(&mut vm, "2000 stamped pages (8 MiB)", || {
        (progress::stamped_pages(&mem, PAGES) > 2000).then_some(())
    });
    let r = ctl(&sock, &["migrate", "--to", &addr]);
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("the guest runs on here") && e.contains("No space left"), "{e}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let code = dest.wait().unwrap().code();
    assert_eq!(code, Some(100), "{rest}");
    assert!(rest.contains("No space left") && rest.contains("dst.mem"), "{rest}");
    assert!(!tiny.0.join("dst.mem").exists(), "the partial memory file was left behind");
    // The source's guest carries on; stopped, its memory checks out.
    more_writes(&mut vm, &mem);
    let r = ctl(&sock, &["stop"]);
    if r["ok"] != true {
        progress::fail(&mut vm, &format!("stop: {r}"));
    }
    let out = vm.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    progress::assert_pages_match_table(&mem, PAGES);
}
