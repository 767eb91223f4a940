//! Live full snapshots: RAM is copied in rounds while the guest
//! runs and the vCPUs pause only for the residue; the snapshot is one
//! point in time, restores to a guest whose `verify` passes, and heads the
//! run's chain like a paused full snapshot.

use std::process::Stdio;

use smudge_testkit::*;

#[test]
fn a_live_full_snapshot_is_one_point_in_time_and_heads_a_chain() {
    require_kvm();
    let dir = tmpdir();
    let (mem, sock) = (path(&dir, "m"), path(&dir, "api.sock"));
    let (s1, s2) = (path(&dir, "s1"), path(&dir, "s2"));
    let pages = 8000;
    // A first run stamps all 8000 pages; the second rewrites random ones
    // at a steady pace until stopped, through the live snapshot's rounds.
    let first = boot(&mem, "64M", "workload=seq pages=8000");
    assert_eq!(first.code, 0, "{first:?}");
    let cmdline = "workload=rate rate=500 pages=8000 seed=21 writes=100m";
    let mut vm = start_with_api(&mem, &sock, "64M", cmdline, Stdio::piped(), true, &[]);
    progress::wait_for_writes(&mut vm, &mem, pages, pages + 1);
    let live = ctl(&sock, &["snapshot", "create", s1.to_str().unwrap(), "--live", "--pause-budget-ms", "5"]);
    assert_eq!(live["ok"], true, "{live}");
    assert_eq!((live["kind"].as_str(), live["live"].as_bool()), (Some("full"), Some(true)), "{live}");
    assert!(live["pause_ms"].as_f64().unwrap() > 0.0, "{live}");
    // The pause copied the residue only, not the guest's RAM.
    let (copied, in_pause) = (live["memory_bytes"].as_u64().unwrap(), live["pause_copied_bytes"].as_u64().unwrap());
    assert!(copied > 8000 * 4096, "{live}");
    assert!(in_pause < copied / 4, "the pause copied {in_pause} of {copied} bytes: {live}");

    // A diff builds on the live snapshot: its consumer carries on.
    let w = progress::guest_writes(&mem, pages);
    progress::wait_for_writes(&mut vm, &mem, pages, w + 50);
    let diff =
        ctl(&sock, &["snapshot", "create", s2.to_str().unwrap(), "--parent", s1.to_str().unwrap(), "--no-resume"]);
    assert_eq!(diff["ok"], true, "{diff}");
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    let out = vm.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let chain_mem = path(&dir, "chain.mem");
    smudge::snapshot::materialize(&s2, &chain_mem).unwrap();
    assert!(std::fs::read(&chain_mem).unwrap() == std::fs::read(&mem).unwrap(), "live + diff != RAM at the diff");

    // The live snapshot alone holds one point in time (every page as its
    // generation table says) and restores to a guest that carries on.
    let v = smudge().args(["snapshot", "verify", s1.to_str().unwrap()]).output().unwrap();
    assert!(v.status.success(), "{v:?}");
    let s1_mem = path(&dir, "s1.mem");
    smudge::snapshot::materialize(&s1, &s1_mem).unwrap();
    assert_eq!(progress::assert_pages_match_table(&s1_mem, pages), pages);
    progress::restore_carries_on(&s1, &path(&dir, "m2"), pages);
}

#[test]
fn a_live_snapshot_takes_no_parent_and_needs_dirty_logging() {
    require_kvm();
    let dir = tmpdir();
    let (mem, sock) = (path(&dir, "m"), path(&dir, "api.sock"));
    let vm = start_with_api(&mem, &sock, "64M", "workload=idle", Stdio::piped(), true, &["--no-dirty-log"]);
    let r = ctl(&sock, &["snapshot", "create", path(&dir, "s").to_str().unwrap(), "--live"]);
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("live snapshots need dirty logging"), "{r}");
    let raw = smudge::control::parse_request(r#"{"cmd":"snapshot","dir":"/s","live":true,"parent":"/p"}"#);
    assert!(raw.unwrap_err().to_string().contains("takes no \"parent\""));
    // The VM is unharmed.
    assert_eq!(ctl(&sock, &["stats"])["ok"], true);
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    assert_eq!(vm.wait_with_output().unwrap().status.code(), Some(0));
}
