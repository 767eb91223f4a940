//! The test harness (`smudge_testkit::TestVm`), used the way a test
//! author would: boot a random-writing guest, harvest its dirty pages,
//! snapshot it (full, then a diff), restore the diff in a new process, and
//! live-migrate the original to another one — through the control API
//! alone — and check every copy of the guest verifies its memory.

use std::path::Path;
use std::time::{Duration, Instant};

use guest_abi::{StateHeader, STATE_BASE};
use serde_json::json;
use smudge::control::MigrateRequest;
use smudge_testkit::{HarnessError, TestVm, TestVmBuilder};

/// Fails the test (never skips it) when /dev/kvm is not usable.
fn require_kvm() {
    let p = Path::new("/dev/kvm");
    assert!(p.exists(), "/dev/kvm is missing: these tests boot real guests and need KVM");
    assert!(
        std::fs::OpenOptions::new().read(true).write(true).open(p).is_ok(),
        "/dev/kvm cannot be opened read-write by this user"
    );
}

fn builder() -> TestVmBuilder {
    require_kvm();
    TestVm::builder().binary(env!("CARGO_BIN_EXE_smudge")).timeout(Duration::from_secs(60))
}

const PAGES: u64 = 3000;

/// The verify line of a guest that checked all its pages and found them
/// as it wrote them.
fn assert_verified(exit: &smudge_testkit::Exit) {
    let v = exit.line("verify: ").unwrap_or_else(|| panic!("no verify line\n{exit}"));
    assert!(v.starts_with(&format!("verify: pages={PAGES} ok={PAGES} ")) && v.ends_with(" mismatches=0"), "{exit}");
}

#[test]
fn boot_harvest_snapshot_restore_and_migrate_through_the_api() {
    let t0 = Instant::now();
    let snaps = tempfile::tempdir().unwrap();
    let (full, d1) = (snaps.path().join("full"), snaps.path().join("d1"));

    // 12000 paced writes: the copies below each finish them and verify.
    let vm = builder()
        .mem(64 << 20)
        .workload(format!("workload=rate pages={PAGES} rate=3000 writes=12000 seed=9 verify=1"))
        .dirty_log("manual")
        .boot()
        .unwrap();
    let dest = builder().incoming().unwrap();
    let layout = vm.wait_for_serial("layout:", Duration::from_secs(60)).unwrap();
    assert!(layout.contains(&format!("+{PAGES} pages")), "{layout}");

    // Harvest: the flusher harvests every 250 ms; the guest's page writes
    // show in the counters.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stats = loop {
        let s = vm.stats().unwrap();
        if s["dirty_log"]["guest_pages"].as_u64().unwrap_or(0) > 0 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(stats["dirty_log"]["guest_pages"].as_u64().unwrap() > 0, "no dirty guest pages harvested: {stats}");
    assert!(stats["dirty_log"]["mechanism"].as_str().unwrap().starts_with("manual"), "{stats}");

    // The guest stays paused except while the test wants it to write, so
    // it cannot finish its 12000 writes before it was copied, however slow
    // the machine: a full snapshot of the paused guest (it stays paused),
    // 300 more writes, then a diff on it.
    assert_eq!(vm.pause().unwrap()["paused"], true);
    let s = vm.snapshot(&full).unwrap();
    assert_eq!(s["kind"], "full", "{s}");
    assert_eq!(vm.stats().unwrap()["paused"], true);
    let after_full = guest_writes(&vm);
    assert_eq!(vm.resume().unwrap()["paused"], false);
    // The guest writes on (its generation table, in its memory, counts).
    wait_for_writes(&vm, after_full + 300);
    assert_eq!(vm.pause().unwrap()["paused"], true);
    let d = vm.snapshot_diff(&d1, &full).unwrap();
    assert_eq!(d["kind"], "diff", "{d}");
    assert!(d["memory_bytes"].as_u64().unwrap() > 0, "{d}");

    // The diff continues in a new process.
    let restored = builder().restore(&d1).unwrap();

    // Migration of the original (paused: it goes on at the destination).
    let report = vm.migrate_to_with(&dest, |m| MigrateRequest { verify_memory: true, ..m }).unwrap();
    assert!(report["rounds"].as_array().is_some_and(|r| !r.is_empty()), "{report}");
    let src = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(src.code, Some(0), "{src}");
    assert!(src.stderr.contains("migrated to"), "{src}");
    assert!(src.line("workload rate done").is_none(), "the source finished the workload itself:\n{src}");
    assert!(dest.is_running());
    assert_eq!(dest.stats().unwrap()["ok"], true);

    // Guest RAM, read from the destination's memory file while it runs:
    // the generation table holds how often each page was written so far.
    let table = dest.read_memory(guest_abi::gen_table_addr(0), PAGES as usize * 4).unwrap();
    let written = table.chunks(4).filter(|g| g != &[0; 4]).count();
    assert!(written > 100, "only {written} pages written before the migration finished");

    for (name, v) in [("restored", &restored), ("migrated", &dest)] {
        let exit = v.wait_exit(Duration::from_secs(60)).unwrap();
        assert_eq!(exit.code, Some(0), "{name}: {exit}");
        assert!(exit.line("workload rate done").is_some(), "{name}: {exit}");
        assert!(!exit.serial.contains(guest_abi::BANNER), "{name}: the guest booted again\n{exit}");
        assert_verified(&exit);
    }

    // read_memory returns what the file holds, at the guest's addresses
    // (identical to file offsets below 3 GiB): the state header the
    // workload left, and stamped pages.
    let file = std::fs::read(dest.mem_path()).unwrap();
    let words =
        |b: &[u8]| -> [u64; 5] { std::array::from_fn(|i| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap())) };
    let header = StateHeader::from_words(words(&dest.read_memory(STATE_BASE, 40).unwrap())).unwrap();
    let base = guest_abi::ws_base_for(PAGES);
    assert_eq!((header.pages, header.ws_base), (PAGES, base), "{header:?}");
    let len = 64 * 4096;
    let got = dest.read_memory(base, len).unwrap();
    assert!(got == file[base as usize..base as usize + len], "read_memory differs from the memory file");
    // A page the guest wrote holds the stamp of its last generation.
    let table = dest.read_memory(guest_abi::gen_table_addr(0), PAGES as usize * 4).unwrap();
    let (i, generation) = (0..PAGES)
        .map(|i| (i, u32::from_le_bytes(table[i as usize * 4..i as usize * 4 + 4].try_into().unwrap())))
        .find(|&(_, g)| g > 0)
        .unwrap();
    let gpa = base + i * guest_abi::PAGE_SIZE;
    let page = words(&dest.read_memory(gpa, 40).unwrap());
    assert_eq!(page[..4], guest_abi::stamp_words(gpa >> 12, generation.into()), "page {i}");
    assert!(dest.read_memory(file.len() as u64 - 8, 16).is_err(), "a read past the end of RAM");

    let elapsed = t0.elapsed();
    eprintln!("harness test: {:.1} s", elapsed.as_secs_f64());
}

/// The page writes the guest made so far: the sum of its generation table.
fn guest_writes(vm: &TestVm) -> u64 {
    let table = vm.read_memory(guest_abi::gen_table_addr(0), PAGES as usize * 4).unwrap();
    table.chunks(4).map(|g| u64::from(u32::from_le_bytes(g.try_into().unwrap()))).sum()
}

/// Waits (60 s at most) until the guest has made `n` page writes.
fn wait_for_writes(vm: &TestVm, n: u64) {
    let t0 = Instant::now();
    while guest_writes(vm) < n {
        assert!(t0.elapsed() < Duration::from_secs(60), "the guest never made {n} page writes{}", vm.logs());
        assert!(vm.is_running(), "smudge exited before the guest made {n} page writes{}", vm.logs());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn errors_carry_the_serial_log_and_smudges_stderr() {
    let vm = builder().workload("workload=idle").boot().unwrap();
    // The guest runs (idle until stopped) and smudge has said which dirty
    // log it uses; then a wait for a line that never comes times out.
    vm.wait_for_serial("layout:", Duration::from_secs(60)).unwrap();
    let t0 = Instant::now();
    while !vm.stderr().contains("dirty log") {
        assert!(t0.elapsed() < Duration::from_secs(60), "no dirty log line{}", vm.logs());
        std::thread::sleep(Duration::from_millis(5));
    }
    let e = vm.wait_for_serial("never printed", Duration::from_millis(500)).unwrap_err();
    assert!(matches!(e, HarnessError::Timeout { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("never printed") && msg.contains(guest_abi::BANNER), "{msg}");
    assert!(e.logs().is_some_and(|l| l.stderr_tail.contains("dirty log")), "{msg}");

    // A bad request: the API's own error, with the logs.
    let e = vm.call(&json!({"cmd": "reboot"})).unwrap_err();
    assert!(e.to_string().contains("unknown command 'reboot'"), "{e}");
    assert_eq!(vm.call_raw(&json!({"cmd": "reboot"})).unwrap()["ok"], false);

    // The process ends: waiting for more output says so at once.
    vm.stop().unwrap();
    let exit = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(exit.success() && exit.stderr.contains("stopped by the control API"), "{exit}");
    let e = vm.wait_for_serial("never printed", Duration::from_secs(60)).unwrap_err();
    assert!(matches!(e, HarnessError::Exited { code: Some(0), .. }), "{e}");
    assert!(vm.stats().is_err());

    // smudge refuses to start: the error shows why.
    let e = builder().workload("workload=nonsense").boot();
    let e = match e {
        Ok(vm) => vm.wait_exit(Duration::from_secs(60)).map(|x| format!("{x}")).unwrap(),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("nonsense") || e.contains("status 2"), "{e}");
    let e = builder().arg("--no-such-flag").boot().unwrap_err();
    assert!(matches!(e, HarnessError::Exited { code: Some(100), .. }), "{e}");
    assert!(e.to_string().contains("--no-such-flag"), "{e}");

    // Scratch files go with the VM.
    let dir = vm.scratch_dir().to_path_buf();
    assert!(dir.join("mem").exists());
    drop(vm);
    assert!(!dir.exists(), "scratch directory left behind");
}
