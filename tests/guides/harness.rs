//! The README's harness guide, verbatim below this comment: `tests/guides.rs`
//! runs it as a test and checks the README still shows exactly this text.

use std::time::Duration;

use smudge_testkit::{HarnessError, TestVm};

#[test]
fn my_guest_survives_a_migration() -> Result<(), HarnessError> {
    // 20000 page writes at 2000 a second (~10 s), then the guest checks
    // that every page holds what it last wrote there.
    let vm = TestVm::builder()
        .binary(env!("CARGO_BIN_EXE_smudge"))
        .mem(64 << 20)
        .workload("workload=rate pages=2000 writes=20000 rate=2000 seed=5 verify=1")
        .boot()?;
    vm.wait_for_serial("layout:", Duration::from_secs(10))?;
    assert_eq!(vm.stats()?["paused"], false);

    // A `smudge migrate-recv` in another process; the guest moves there.
    let dest = TestVm::builder().binary(env!("CARGO_BIN_EXE_smudge")).incoming()?;
    let report = vm.migrate_to(&dest)?;
    assert!(report["downtime_ms"].as_f64().is_some(), "{report}");

    let exit = dest.wait_exit(Duration::from_secs(60))?;
    assert!(exit.success(), "{exit}");
    assert!(exit.line("verify:").is_some_and(|v| v.ends_with(" mismatches=0")), "{exit}");
    Ok(())
}
