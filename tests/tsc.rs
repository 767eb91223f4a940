//! The guest's clock across a restore. Whether a restored guest's TSC
//! continues from its value at the snapshot depends on whether this KVM
//! honours a VMM's TSC controls (`smudge::kvm::tsc::probe` measures it):
//! where one is honoured, a guest with an `ms=` deadline snapshotted
//! mid-run still runs its remaining time after a long wait; where none is
//! (this machine's `kvm_pvm`), its TSC carries the wall-clock time of the
//! wait and the deadline has passed when it resumes — the behaviour the
//! README's restore guide documents.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use guest_abi::gen_table_addr;
use smudge_testkit::TestVm;

const PAGES: u64 = 2000;
/// The guest's deadline, and how long the test waits between the snapshot
/// and the restore (so without a continued clock the deadline has passed).
const MS: u64 = 4000;

fn table_sum(read: impl Fn(u64, usize) -> Vec<u8>) -> u64 {
    read(gen_table_addr(0), PAGES as usize * 4)
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64)
        .sum()
}

#[test]
fn a_restored_guests_deadline_follows_what_the_tsc_controls_allow() {
    smudge_testkit::require_kvm();
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let probe = smudge::kvm::tsc::probe(&kvm).expect("the TSC probe VM runs");
    let builder = || {
        TestVm::builder()
            .binary(env!("CARGO_BIN_EXE_smudge"))
            .timeout(Duration::from_secs(120))
            .boot_timeout(Duration::from_secs(60))
    };
    let snaps = tempfile::tempdir().unwrap();
    let snap = snaps.path().join("s");
    let vm = builder()
        .mem(64 << 20)
        .workload(format!("workload=rate rate=1000 ms={MS} pages={PAGES} seed=3"))
        .boot()
        .unwrap();

    // Snapshot mid-run: once the guest has written, well before its
    // deadline; it stays stopped there.
    let t0 = Instant::now();
    while table_sum(|gpa, len| vm.read_memory(gpa, len).unwrap()) < 200 {
        assert!(t0.elapsed() < Duration::from_secs(60), "waited 60 s for 200 writes\n{}", vm.logs());
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.pause().unwrap();
    let s = vm.snapshot_with(&snap, None, false).unwrap();
    assert_eq!(s["ok"], true, "{s}");
    vm.stop().unwrap();
    let first = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(first.line("workload rate done").is_none(), "the guest finished before the snapshot\n{first}");
    let img = std::fs::File::open(snap.join("memory.img")).unwrap();
    let at_snapshot = table_sum(|gpa, len| {
        let mut b = vec![0u8; len];
        img.read_exact_at(&mut b, gpa).unwrap();
        b
    });

    // The wait is the subject of the test, not a synchronisation: wall-clock
    // time that passes while no guest runs.
    std::thread::sleep(Duration::from_millis(MS));
    let restored = builder().restore(&snap).unwrap();
    let exit = restored.wait_exit(Duration::from_secs(120)).unwrap();
    assert_eq!(exit.code, Some(0), "{exit}");
    let done = exit.line("workload rate done: ").unwrap_or_else(|| panic!("no done line\n{exit}"));
    let field = |key: &str| -> u64 {
        done.split(' ')
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {done}"))
    };
    let (writes, elapsed_us) = (field("writes="), field("elapsed_us="));
    let after =
        writes.checked_sub(at_snapshot).unwrap_or_else(|| panic!("{writes} writes, {at_snapshot} at the snapshot"));
    eprintln!("{probe:?}: {at_snapshot} writes at the snapshot, {after} after the restore, elapsed {elapsed_us} us");
    if probe.can_continue_clock() {
        // The wait did not count: the guest ran out its remaining time.
        assert!(after > 64, "{probe:?}: only {after} writes after the restore\n{exit}");
        assert!(elapsed_us < 2 * MS * 1000, "{probe:?}: the guest's clock counted the wait ({elapsed_us} us)\n{exit}");
    } else {
        // The TSC carried the wait: the deadline had passed, and the guest
        // stopped at its next check (every 64 writes).
        assert!(after <= 64, "{probe:?}: {after} writes after the restore\n{exit}");
        assert!(elapsed_us >= MS * 1000, "{probe:?}: elapsed {elapsed_us} us\n{exit}");
    }
}
