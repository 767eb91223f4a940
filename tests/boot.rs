//! Booting the bundled guest for real: exit statuses, the backing
//! file's contents, QEMU parity, and every bad input a user can give.

use smudge_testkit::*;

#[test]
fn default_boot_runs_workload_and_exits_zero() {
    let dir = tmpdir();
    let mem = path(&dir, "guest.mem");
    let r = run_smudge(&["--in-place", "--mem-file", mem.to_str().unwrap(), "--mem-size", "64M"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout.lines().next(), Some(guest_abi::BANNER));
    assert!(r.line("workload random done: writes=20000").is_some(), "{r:?}");
    assert!(r.line("verify: pages=").unwrap().ends_with("mismatches=0"), "{r:?}");
    assert!(r.stderr.contains("guest exited with status 0"), "{r:?}");
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 64 << 20);
}

#[test]
fn backing_file_holds_exactly_the_guest_stamps() {
    let dir = tmpdir();
    let mem = path(&dir, "guest.mem");
    let (pages, seed, writes) = (4096u64, 9u64, 3000usize);
    let r = boot(&mem, "64M", &format!("workload=random pages={pages} seed={seed} writes={writes}"));
    assert_eq!(r.code, 0, "{r:?}");
    let bytes = std::fs::read(&mem).unwrap();
    assert_stamps(&bytes, pages, &random_generations(seed, pages, writes));
    // A second boot continues the generations on the same file.
    let r = boot(&mem, "64M", &format!("workload=random pages={pages} seed={seed} writes={writes} verify=1"));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("total_writes=6000"), "{r:?}");
    let mut gens = random_generations(seed, pages, writes);
    for (g, h) in gens.iter_mut().zip(random_generations(seed, pages, writes)) {
        *g += h;
    }
    assert_stamps(&std::fs::read(&mem).unwrap(), pages, &gens);
}

#[test]
fn with_dirty_logging_off_the_guest_runs_and_its_memory_stays_mapped() {
    // Nothing holds guest RAM for a harvester then: the VM itself must keep
    // the mapping KVM's slots point into until its vCPUs are gone.
    let dir = tmpdir();
    let mem = path(&dir, "guest.mem");
    let (pages, seed, writes) = (4096u64, 3u64, 3000usize);
    let r = run_smudge(&[
        "--in-place",
        "--mem-file",
        mem.to_str().unwrap(),
        "--mem-size",
        "64M",
        "--no-dirty-log",
        "--cmdline",
        &format!("workload=random pages={pages} seed={seed} writes={writes} verify=1"),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.line("verify: pages=").unwrap().ends_with("mismatches=0"), "{r:?}");
    assert!(r.stderr.contains("dirty logging off"), "{r:?}");
    assert_stamps(&std::fs::read(&mem).unwrap(), pages, &random_generations(seed, pages, writes));
}

#[test]
fn failing_verify_gives_nonzero_status_and_names_the_page() {
    let dir = tmpdir();
    let mem = path(&dir, "guest.mem");
    let pages = 512u64;
    let r = boot(&mem, "16M", &format!("workload=seq pages={pages}"));
    assert_eq!(r.code, 0, "{r:?}");
    // Corrupt page 7's generation in the file: a stale page.
    let mut bytes = std::fs::read(&mem).unwrap();
    let off = (guest_abi::ws_base_for(pages) + 7 * guest_abi::PAGE_SIZE) as usize + 8;
    bytes[off] ^= 0x01;
    std::fs::write(&mem, &bytes).unwrap();
    let r = boot(&mem, "16M", &format!("workload=verify pages={pages}"));
    assert_eq!(r.code, i32::from(guest_abi::status::VERIFY_FAILED), "{r:?}");
    assert!(r.stdout.contains("verify: page 7 "), "{r:?}");
    assert!(r.line("verify: pages=512").unwrap().ends_with("mismatches=1"), "{r:?}");
}

#[test]
fn guest_poking_unknown_port_is_stopped_with_distinct_code() {
    let dir = tmpdir();
    let r = boot(&path(&dir, "m"), "16M", "poke=0x80");
    assert_eq!(r.code, 101, "{r:?}");
    assert!(r.stderr.contains("unknown I/O port 0x80"), "{r:?}");
}

#[test]
fn guest_exception_is_reported() {
    let dir = tmpdir();
    let r = boot(&path(&dir, "m"), "16M", "fault=1");
    assert_eq!(r.code, 0x26, "{r:?}");
    assert!(r.stderr.contains("CPU exception 6"), "{r:?}");
}

#[test]
fn triple_fault_is_reported_and_what_the_guest_wrote_is_kept() {
    let dir = tmpdir();
    let mem = path(&dir, "m");
    let r = boot(&mem, "16M", "workload=random pages=512 writes=4000 seed=3 fault=triple");
    assert_eq!(r.code, 102, "{r:?}");
    assert!(r.stderr.contains("guest triple-faulted (KVM_EXIT_SHUTDOWN)"), "{r:?}");
    // Every page the guest stamped before it died reached the file.
    let r = boot(&mem, "16M", "workload=verify pages=512");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.line("verify: pages=512").unwrap().ends_with("mismatches=0"), "{r:?}");
}

#[test]
fn hung_guest_times_out_and_file_stays_intact() {
    let dir = tmpdir();
    let mem = path(&dir, "m");
    let pages = 256u64;
    assert_eq!(boot(&mem, "16M", &format!("workload=seq pages={pages}")).code, 0);
    let before = std::fs::read(&mem).unwrap();
    let out = smudge()
        .args(["run", "--in-place", "--mem-file", mem.to_str().unwrap(), "--mem-size", "16M", "--timeout", "0.5"])
        .args(["--cmdline", &format!("workload=idle pages={pages}")])
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 103, "{r:?}");
    assert!(r.stderr.contains("timeout"), "{r:?}");
    let after = std::fs::read(&mem).unwrap();
    let base = guest_abi::ws_base_for(pages) as usize;
    assert_eq!(after.len(), before.len());
    assert!(after[base..] == before[base..], "working set changed by a timed-out idle run");
    assert_eq!(boot(&mem, "16M", &format!("workload=verify pages={pages}")).code, 0);
}

#[test]
fn two_vcpus_boot() {
    let dir = tmpdir();
    let r = run_smudge(&[
        "--in-place",
        "--mem-file",
        path(&dir, "m").to_str().unwrap(),
        "--mem-size",
        "16M",
        "--vcpus",
        "2",
        "--cmdline",
        "workload=seq pages=64 verify=1",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
}

fn assert_setup_error(r: &Run, needle: &str) {
    assert_eq!(r.code, 100, "{r:?}");
    assert!(r.stderr.contains(needle), "expected '{needle}' in stderr: {r:?}");
    assert!(!r.stderr.contains("panicked"), "{r:?}");
}

#[test]
fn bad_inputs_are_clear_errors_and_damage_nothing() {
    let dir = tmpdir();
    let mem = path(&dir, "m");
    let m = mem.to_str().unwrap();

    let r = run_smudge(&["--in-place", "--mem-file", m, "--mem-size", "16M", "--guest", "/nonexistent/guest.elf"]);
    assert_setup_error(&r, "/nonexistent/guest.elf");
    assert!(!mem.exists());

    let text = path(&dir, "notelf");
    std::fs::write(&text, b"#!/bin/sh\necho hi\n").unwrap();
    let r = run_smudge(&["--in-place", "--mem-file", m, "--mem-size", "16M", "--guest", text.to_str().unwrap()]);
    assert_setup_error(&r, "not a loadable x86-64 ELF");
    assert!(!mem.exists());

    // The bundled guest with its PVH note's type changed: an ELF without PVH.
    let elf = path(&dir, "guest.elf");
    assert_eq!(Run::from(smudge().arg("export-guest").arg(&elf).output().unwrap()).code, 0);
    let mut bytes = std::fs::read(&elf).unwrap();
    let note = [4u8, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
    let at = bytes.windows(note.len()).position(|w| w == note).expect("PVH note in guest ELF");
    bytes[at + 8] = 17;
    let nopvh = path(&dir, "nopvh.elf");
    std::fs::write(&nopvh, &bytes).unwrap();
    let r = run_smudge(&["--in-place", "--mem-file", m, "--mem-size", "16M", "--guest", nopvh.to_str().unwrap()]);
    assert_setup_error(&r, "no PVH entry note");
    assert!(!mem.exists());

    let r = run_smudge(&["--in-place", "--mem-file", m, "--mem-size", "0"]);
    assert_setup_error(&r, "--mem-size 0 is too small");
    assert!(!mem.exists());

    std::fs::write(&mem, vec![0x5au8; 1 << 20]).unwrap();
    let r = run_smudge(&["--in-place", "--mem-file", m, "--mem-size", "16M"]);
    assert_setup_error(&r, "existing memory file is 1048576 bytes, --mem-size asks for 16777216");
    assert_eq!(std::fs::read(&mem).unwrap(), vec![0x5au8; 1 << 20], "wrong-size file was modified");

    let r = run_smudge(&["--in-place", "--mem-file", "/proc/smudge-cannot-be-here.mem", "--mem-size", "16M"]);
    assert_setup_error(&r, "/proc/smudge-cannot-be-here.mem: cannot open or create memory file");

    let r = run_smudge(&["--in-place", "--mem-file", dir.path().to_str().unwrap(), "--mem-size", "16M"]);
    assert_setup_error(&r, "not a regular file");

    let r = run_smudge(&["--in-place", "--mem-file", m, "--mem-size", "12Q"]);
    assert_setup_error(&r, "is not a size");
}

#[test]
fn missing_or_unusable_kvm_is_a_clear_message() {
    let dir = tmpdir();
    let mem = path(&dir, "m");
    let m = mem.to_str().unwrap();
    let r = run_smudge(&["--in-place", "--mem-file", m, "--mem-size", "16M", "--kvm-dev", "/nonexistent/kvm"]);
    assert_setup_error(&r, "/nonexistent/kvm does not exist: KVM is not available");
    let r = run_smudge(&["--in-place", "--mem-file", m, "--mem-size", "16M", "--kvm-dev", "/dev/null"]);
    assert_setup_error(&r, "/dev/null is not a usable KVM device");
    assert!(!mem.exists(), "no memory file may be created when KVM is unusable");
}
