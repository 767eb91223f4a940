//! `smudge run --backing-file PATH`: guest RAM in shared memory, PATH (on
//! a disk filesystem) written only by smudge's writeback. At the end of a
//! run PATH holds the guest's RAM; the next run starts from it.

use smudge_testkit::*;

fn run_backed(file: &std::path::Path, cmdline: &str) -> Run {
    run_smudge(&["--backing-file", file.to_str().unwrap(), "--mem-size", "64M", "--cmdline", cmdline])
}

#[test]
fn the_backing_file_follows_guest_ram_and_the_next_run_starts_from_it() {
    require_kvm();
    let dir = tmpdir();
    assert!(!smudge::uffd::on_tmpfs(dir.path()).unwrap(), "the test needs a directory on a disk filesystem");
    let file = path(&dir, "ram.img");
    let r = run_backed(&file, "workload=seq pages=3000");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains(&format!("RAM 64 MiB in shared memory, persisted to {}", file.display())), "{r:?}");
    assert_stamps(&std::fs::read(&file).unwrap(), 3000, &[1; 3000]);
    // The second run continues the generations from the file.
    let r = run_backed(&file, "workload=seq pages=3000 verify=1");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.line("verify: pages=3000 ok=3000 stamped=3000 mismatches=0").is_some(), "{r:?}");
    assert_stamps(&std::fs::read(&file).unwrap(), 3000, &[2; 3000]);
    // And an in-place run on the same file sees what the last run left.
    let v = boot(&file, "64M", "workload=verify pages=3000");
    assert!(v.line("verify: pages=3000 ok=3000 stamped=3000 mismatches=0").is_some(), "{v:?}");
}

#[test]
fn a_backing_file_of_another_size_or_without_writeback_is_refused() {
    require_kvm();
    let dir = tmpdir();
    let file = path(&dir, "ram.img");
    std::fs::write(&file, vec![1u8; 8192]).unwrap();
    let r = run_backed(&file, "workload=seq pages=10");
    assert_eq!(r.code, 100, "{r:?}");
    assert!(r.stderr.contains("existing memory file is 8192 bytes, --mem-size asks for 67108864"), "{r:?}");
    assert_eq!(std::fs::read(&file).unwrap(), vec![1u8; 8192], "the file was touched");
    let r = run_smudge(&["--backing-file", file.to_str().unwrap(), "--no-writeback"]);
    assert_eq!(r.code, 100, "{r:?}");
    assert!(r.stderr.contains("'--backing-file <BACKING_FILE>' cannot be used with '--no-writeback'"), "{r:?}");
}
