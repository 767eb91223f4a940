//! Seccomp: filters are on by default, a forbidden syscall is
//! caught with a clear line and exit code 106, `--no-seccomp` turns them
//! off. The rest of the suite runs every feature with the filters on.

use smudge_testkit::*;

/// What `smudge_vmm::vm::seccomp::EXIT_SECCOMP` is (the tests check the
/// number users see).
const EXIT_SECCOMP: i32 = 106;

#[test]
fn exit_code_is_the_documented_one() {
    assert_eq!(i32::from(smudge_vmm::vm::seccomp::EXIT_SECCOMP), EXIT_SECCOMP);
    assert_eq!(i32::from(smudge::sigsys::EXIT_SECCOMP), EXIT_SECCOMP);
}

#[test]
fn a_default_run_has_the_filters_on_and_exits_zero() {
    let dir = tmpdir();
    let mem = path(&dir, "guest.mem");
    let out = smudge()
        .args(["run", "--in-place", "--mem-file", mem.to_str().unwrap(), "--mem-size", "64M", "--timeout", "60"])
        .env("SMUDGE_LOG", "warn,smudge_vmm::vm::seccomp=debug")
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("seccomp: VMM filter on"), "{r:?}");
    assert!(r.stderr.contains("guest exited with status 0"), "{r:?}");
    assert!(r.line("verify: pages=").unwrap().ends_with("mismatches=0"), "{r:?}");
}

#[test]
fn a_forbidden_syscall_on_a_vcpu_thread_stops_smudge_with_a_clear_line() {
    let dir = tmpdir();
    let mem = path(&dir, "guest.mem");
    let r = run_smudge(&["--in-place", "--mem-file", mem.to_str().unwrap(), "--mem-size", "64M", "--seccomp-selftest"]);
    assert_eq!(r.code, EXIT_SECCOMP, "{r:?}");
    let line = if cfg!(target_arch = "x86_64") {
        "smudge: seccomp: thread vcpu0 made forbidden syscall 41 (socket); stopping"
    } else {
        "smudge: seccomp: thread vcpu0 made forbidden syscall "
    };
    assert!(r.stderr.contains(line), "{r:?}");
    // Stopped at once: the guest never ran to its end.
    assert!(!r.stderr.contains("guest exited"), "{r:?}");
    assert!(!r.stdout.contains("exit status="), "{r:?}");
}

#[test]
fn with_no_seccomp_the_same_call_runs_and_the_guest_finishes() {
    let dir = tmpdir();
    let mem = path(&dir, "guest.mem");
    let r = run_smudge(&[
        "--in-place",
        "--mem-file",
        mem.to_str().unwrap(),
        "--mem-size",
        "64M",
        "--seccomp-selftest",
        "--no-seccomp",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("seccomp self-test: socket() ran (seccomp is off)"), "{r:?}");
    assert!(!r.stderr.contains("forbidden syscall"), "{r:?}");
    assert!(r.stderr.contains("guest exited with status 0"), "{r:?}");
}

/// Every thread kind at work under its filter at once: two vCPUs with a
/// small dirty ring (full-ring harvests on the vCPU thread), the flusher
/// throttling and kicking them, periodic syncs, the serial output in a
/// file, the heatmap, stats, and a snapshot from the event loop.
#[test]
fn every_thread_kind_runs_under_its_filter() {
    let dir = tmpdir();
    let mem = path(&dir, "guest.mem");
    let (serial, heat, snaps) = (path(&dir, "serial.txt"), path(&dir, "heat.svg"), path(&dir, "snaps"));
    std::fs::create_dir(&snaps).unwrap();
    let r = run_smudge(&[
        "--in-place",
        "--mem-file",
        mem.to_str().unwrap(),
        "--mem-size",
        "256M",
        "--vcpus",
        "2",
        "--dirty-log",
        "ring",
        "--ring-entries",
        "256",
        "--dirty-expire-ms",
        "60000",
        "--dirty-background",
        "100%",
        // 16 pages: whatever its speed, the guest dirties more than that
        // between two syncs, and the flusher throttles.
        "--dirty-limit",
        "64K",
        "--dirty-writeback-ms",
        "50",
        "--sync-every-ms",
        "400",
        "--stats-interval",
        "0.2",
        "--serial",
        serial.to_str().unwrap(),
        "--heatmap",
        heat.to_str().unwrap(),
        "--snapshot-at-ms",
        "300",
        "--snapshot-dir",
        snaps.to_str().unwrap(),
        "--cmdline",
        // Runs 1.5 s at least (the snapshot comes at 300 ms).
        "workload=seq pages=40000 ms=1500 verify=1",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stderr.contains("seccomp"), "{r:?}");
    assert!(r.stderr.contains("ring-full exits"), "{r:?}");
    // The flusher's own count of throttle slices (each one kicked the
    // vCPUs from the flusher thread). How long the vCPUs then waited depends on
    // when they next left KVM_RUN, which a busy host decides.
    let slices: u64 = r
        .stderr
        .split("throttled ")
        .nth(1)
        .and_then(|s| s.split(" slices").next())
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no throttle figure: {r:?}"));
    assert!(slices > 0, "the flusher never throttled the vCPUs: {r:?}");
    assert!(r.stderr.contains("smudge: snapshot "), "{r:?}");
    assert!(r.stderr.contains("smudge: heatmap of "), "{r:?}");
    let serial = std::fs::read_to_string(&serial).unwrap();
    assert!(serial.lines().any(|l| l.starts_with("verify: ") && l.ends_with("mismatches=0")), "{serial}");
}

#[test]
fn the_flag_is_documented_and_the_test_hook_hidden() {
    let out = smudge().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--no-seccomp"), "{help}");
    assert!(!help.contains("--seccomp-selftest"), "{help}");
}
