//! Where `smudge run` keeps guest RAM. With `--backing-file PATH` RAM
//! lives in shared memory and PATH (on a disk filesystem) is written only
//! by smudge's writeback: at the end of a run PATH holds the guest's RAM,
//! and the next run starts from it. By default (`--mem-file PATH`, or
//! `--in-place` said explicitly) RAM is PATH itself.

use smudge_testkit::*;

fn run_backed(flag: &str, file: &std::path::Path, cmdline: &str) -> Run {
    run_smudge(&[flag, file.to_str().unwrap(), "--mem-size", "64M", "--cmdline", cmdline])
}

fn in_shared_memory(file: &std::path::Path) -> String {
    format!("RAM 64 MiB in shared memory, persisted to {}", file.display())
}

#[test]
fn the_backing_file_follows_guest_ram_and_the_next_run_starts_from_it() {
    require_kvm();
    let dir = tmpdir();
    assert!(!smudge::uffd::on_tmpfs(dir.path()).unwrap(), "the test needs a directory on a disk filesystem");
    let file = path(&dir, "ram.img");
    let r = run_backed("--backing-file", &file, "workload=seq pages=3000");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains(&in_shared_memory(&file)), "{r:?}");
    assert_stamps(&std::fs::read(&file).unwrap(), 3000, &[1; 3000]);
    // A second run continues the generations from the file.
    let r = run_backed("--backing-file", &file, "workload=seq pages=3000 verify=1");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains(&in_shared_memory(&file)), "{r:?}");
    assert!(r.line("verify: pages=3000 ok=3000 stamped=3000 mismatches=0").is_some(), "{r:?}");
    assert_stamps(&std::fs::read(&file).unwrap(), 3000, &[2; 3000]);
    // And an in-place run on the same file sees what the last run left.
    let v = boot(&file, "64M", "workload=verify pages=3000");
    assert!(v.stderr.contains(&format!("RAM 64 MiB in {};", file.display())), "in place: {v:?}");
    assert!(v.line("verify: pages=3000 ok=3000 stamped=3000 mismatches=0").is_some(), "{v:?}");
}

#[test]
fn a_backing_file_of_another_size_or_without_writeback_is_refused() {
    require_kvm();
    let dir = tmpdir();
    let file = path(&dir, "ram.img");
    std::fs::write(&file, vec![1u8; 8192]).unwrap();
    for flag in ["--backing-file", "--mem-file"] {
        let r = run_backed(flag, &file, "workload=seq pages=10");
        assert_eq!(r.code, 100, "{r:?}");
        assert!(r.stderr.contains("existing memory file is 8192 bytes, --mem-size asks for 67108864"), "{r:?}");
        assert_eq!(std::fs::read(&file).unwrap(), vec![1u8; 8192], "the file was touched");
    }
    let r = run_smudge(&["--backing-file", file.to_str().unwrap(), "--no-writeback"]);
    assert_eq!(r.code, 100, "{r:?}");
    assert!(r.stderr.contains("'--backing-file <BACKING_FILE>' cannot be used with '--no-writeback'"), "{r:?}");
    let r = run_smudge(&["--backing-file", file.to_str().unwrap(), "--in-place"]);
    assert_eq!(r.code, 100, "{r:?}");
    assert!(r.stderr.contains("'--backing-file <BACKING_FILE>' cannot be used with '--in-place'"), "{r:?}");
}

/// `--backing-file` refuses the options that need RAM to be the file (a
/// plain --mem-file takes them, in place); restore refuses --in-place.
#[test]
fn options_that_need_the_file_as_ram_are_refused_with_a_backing_file() {
    require_kvm();
    let dir = tmpdir();
    let (file, img) = (path(&dir, "ram.mem"), path(&dir, "ram.img"));
    for extra in [&["--no-dirty-log"][..], &["--writeback-image", img.to_str().unwrap()]] {
        let mut args = vec!["--backing-file", file.to_str().unwrap(), "--mem-size", "64M"];
        args.extend_from_slice(extra);
        let r = run_smudge(&args);
        assert_eq!(r.code, 100, "{extra:?}: {r:?}");
        assert!(r.stderr.contains(&format!("cannot be used with '{}", extra[0])), "{extra:?}: {r:?}");
        assert!(!file.exists(), "{extra:?}: the refused run made {}", file.display());
        let mut args = vec!["--mem-file", file.to_str().unwrap(), "--mem-size", "64M"];
        args.extend_from_slice(&["--cmdline", "workload=seq pages=100"]);
        args.extend_from_slice(extra);
        let r = run_smudge(&args);
        assert_eq!(r.code, 0, "{extra:?}: {r:?}");
        assert!(r.stderr.contains(&format!("RAM 64 MiB in {} (created)", file.display())), "{extra:?}: {r:?}");
        std::fs::remove_file(&file).unwrap();
    }
    let out = smudge()
        .args(["restore", "--snapshot", "nowhere", "--mem-file", "new.mem", "--in-place"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(100), "{err}");
    assert!(err.contains("--in-place is for run"), "{err}");
}
