//! The same guest ELF under QEMU: it must boot under
//! `-machine microvm` and `-machine pc` and print what it prints under smudge.

use std::process::Command;

use smudge_testkit::*;

fn qemu(elf: &std::path::Path, machine: &str, cmdline: &str) -> Run {
    let qemu = "qemu-system-x86_64";
    assert!(
        Command::new(qemu).arg("--version").output().is_ok(),
        "{qemu} is not installed: the test command (README) installs Debian's qemu-system-x86"
    );
    let out = Command::new("timeout")
        .args(["120", qemu, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-machine", machine])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-m", "64M", "-kernel"])
        .arg(elf)
        .args(["-append", cmdline, "-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .output()
        .expect("spawn qemu");
    Run::from(out)
}

#[test]
fn same_elf_boots_under_qemu_with_same_output() {
    let dir = tmpdir();
    let elf = path(&dir, "guest.elf");
    assert_eq!(Run::from(smudge().arg("export-guest").arg(&elf).output().unwrap()).code, 0);
    let cmdline = "workload=random pages=2000 writes=3000 seed=5 verify=1";
    let ours = boot(&path(&dir, "m"), "64M", cmdline);
    assert_eq!(ours.code, 0, "{ours:?}");
    for machine in ["microvm", "pc"] {
        let theirs = qemu(&elf, machine, cmdline);
        // isa-debug-exit exits with (status << 1) | 1.
        assert_eq!(theirs.code, 1, "qemu -machine {machine}: {theirs:?}");
        assert_eq!(theirs.stdout.lines().next(), Some(guest_abi::BANNER), "{machine}");
        for prefix in ["verify: ", "exit status="] {
            assert_eq!(theirs.line(prefix), ours.line(prefix), "qemu -machine {machine}, line '{prefix}'");
        }
    }
}
