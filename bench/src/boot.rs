//! `smudge bench boot`: process start to the guest's first serial byte and
//! to its exit, for smudge and for QEMU (`-machine microvm`, its fastest
//! here) and for the peers Firecracker and Cloud Hypervisor when their
//! binaries are found, on the same guest ELF, medians of alternating runs
//! in one invocation; plus the guest's first touch of its RAM with and
//! without host huge pages.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use smudge_vmm::control::cli::BenchArgs;
use smudge_vmm::vm::guest_image::GUEST_ELF;

use crate::peers::cloud_hypervisor::{CloudHypervisor, Guest, Log};
use crate::peers::firecracker::Firecracker;
use crate::peers::{check_exit_ok, tsc_khz, Peer, NOT_FOUND};
use crate::report::{median, Report};
use crate::setup::Scratch;

/// The QEMU binary the comparisons run.
pub const QEMU: &str = "qemu-system-x86_64";
/// A guest workload that exits at once: the boot path is what is timed.
const QUICK_CMDLINE: &str = "workload=seq pages=16";
const MEM: &str = "256M";
const MEM_MIB: u64 = 256;
/// What smudge's and QEMU's boot figure brackets.
const SMUDGE_BRACKETS: &str = "process spawn to the first byte on its stdout (the guest's serial port)";
/// What Firecracker's boot figure brackets.
const FC_BRACKETS: &str = "process spawn to the first serial byte on its stdout, through its API socket's first \
                           accept and the 3 calls boot-source, machine-config, InstanceStart";
/// What Cloud Hypervisor's boot figure brackets.
const CH_BRACKETS: &str =
    "process spawn (guest given on its command line, --serial tty) to the first serial byte on its stdout";

/// Times of one boot.
#[derive(Debug, Clone)]
pub struct BootTiming {
    /// Process start to first byte on the guest's serial output.
    pub first_byte: Duration,
    /// Process start to exit.
    pub exit: Duration,
    /// Exit code.
    pub code: Option<i32>,
    /// All serial output.
    pub output: String,
}

/// Spawns `cmd` with stdout piped and times its first byte and its exit.
pub fn time_boot(mut cmd: Command) -> anyhow::Result<BootTiming> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let mut out = child.stdout.take().context("no stdout pipe")?;
    let mut first = [0u8; 1];
    let n = out.read(&mut first)?;
    let first_byte = t0.elapsed();
    let mut rest = Vec::new();
    out.read_to_end(&mut rest)?;
    let status = child.wait()?;
    let exit = t0.elapsed();
    let mut output = first[..n].to_vec();
    output.extend(rest);
    Ok(BootTiming { first_byte, exit, code: status.code(), output: String::from_utf8_lossy(&output).into_owned() })
}

/// The QEMU command line that boots `elf` at its fastest: microvm, no SeaBIOS, `-cpu host,-arch-capabilities` (plain `host` aborts on MSR 0x10a on this KVM).
pub fn qemu_command(elf: &Path, mem: &str, cmdline: &str, machine: &str) -> Command {
    let mut c = Command::new(QEMU);
    c.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities", "-machine", machine])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-m", mem])
        .arg("-kernel")
        .arg(elf)
        .args(["-append", cmdline, "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    c
}

fn smudge_command(mem_file: &Path, mem: &str, cmdline: &str, extra: &[&str]) -> anyhow::Result<Command> {
    let mut c = crate::setup::smudge()?;
    c.args(["run", "--mem-size", mem, "--cmdline", cmdline, "--mem-file"]).arg(mem_file).args(extra);
    Ok(c)
}

fn guest_elapsed_us(output: &str) -> Option<f64> {
    output.split_whitespace().find_map(|w| w.strip_prefix("elapsed_us=")).and_then(|v| v.parse().ok())
}

/// Runs the benchmark.
pub fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let runs = args.runs.unwrap_or(if args.quick { 2 } else { 7 });
    let scratch = Scratch::new(args.dir.as_deref())?;
    let tmp = scratch.path();
    let elf = tmp.join("guest.elf");
    std::fs::write(&elf, GUEST_ELF)?;
    if which(QEMU).is_none() {
        bail!("{QEMU} not found: install Debian's qemu-system-x86 (the test command does)");
    }

    let mut peers = [Peer::Firecracker, Peer::CloudHypervisor].map(|p| (p, p.find(), Vec::new()));
    let tsc_khz = if peers.iter().any(|p| p.1.is_some()) { tsc_khz()? } else { 0 };

    let mut rep = Report::new("boot");
    let (mut s_first, mut s_exit, mut q_first, mut q_exit) = (vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        // Alternate the two so drift on a shared machine hits both alike.
        let mem_file = tmp.join(format!("boot-{i}.mem"));
        let s = time_boot(smudge_command(&mem_file, MEM, QUICK_CMDLINE, &[])?)?;
        std::fs::remove_file(&mem_file).ok();
        if s.code != Some(0) {
            bail!("smudge run exited with {:?}; output:\n{}", s.code, s.output);
        }
        let q = time_boot(qemu_command(&elf, MEM, QUICK_CMDLINE, "microvm"))?;
        if q.code != Some(1) {
            bail!("qemu exited with {:?} (expected 1: status 0); output:\n{}", q.code, q.output);
        }
        s_first.push(ms(s.first_byte));
        s_exit.push(ms(s.exit));
        q_first.push(ms(q.first_byte));
        q_exit.push(ms(q.exit));
        for (peer, found, acc) in peers.iter_mut() {
            if let Some(bin) = found {
                acc.push(peer_boot(*peer, bin, &elf, tmp, &format!("{QUICK_CMDLINE} tsc_khz={tsc_khz}"))?);
            }
        }
    }
    let (sf, se, qf, qe) = (median(&s_first), median(&s_exit), median(&q_first), median(&q_exit));
    rep.bracketed("smudge, 256 MiB file-backed, dirty logging on", "first_byte_ms", sf, SMUDGE_BRACKETS);
    rep.result("smudge, 256 MiB file-backed, dirty logging on", "exit_ms", se);
    rep.result("qemu -machine microvm, 256 MiB", "first_byte_ms", qf);
    rep.result("qemu -machine microvm, 256 MiB", "exit_ms", qe);
    rep.goal("smudge / qemu microvm: process start to first serial byte", sf / qf, 0.1, "lower");
    rep.goal("smudge / qemu microvm: process start to exit (informational)", se / qe, 1.0, "lower");
    for (peer, found, acc) in &peers {
        let case = format!("{}, 256 MiB", peer.label());
        if found.is_none() {
            rep.missing(&case, "first_byte_ms", NOT_FOUND);
            continue;
        }
        let brackets = if *peer == Peer::Firecracker { FC_BRACKETS } else { CH_BRACKETS };
        let m = median(acc);
        rep.bracketed(&case, "first_byte_ms", m, brackets);
        if *peer == Peer::Firecracker {
            rep.goal("smudge / Firecracker: process start to first serial byte", sf / m, 0.5, "lower");
        } else {
            rep.goal(
                "smudge / Cloud Hypervisor: process start to first serial byte (informational)",
                sf / m,
                1.0,
                "lower",
            );
        }
    }

    // First touch of all RAM: one sequential pass over a fresh file.
    let touch_mem = if args.quick { "64M" } else { "256M" };
    let (mut plain, mut huge) = (vec![], vec![]);
    for i in 0..runs.min(5) {
        for (flag, acc) in [(&[][..], &mut plain), (&["--hugepages"][..], &mut huge)] {
            let mem_file = tmp.join(format!("touch-{i}.mem"));
            let t = time_boot(smudge_command(&mem_file, touch_mem, "workload=seq passes=1", flag)?)?;
            std::fs::remove_file(&mem_file).ok();
            let us = guest_elapsed_us(&t.output).context("guest printed no elapsed_us")?;
            acc.push(us / 1000.0);
        }
    }
    let (p, h) = (median(&plain), median(&huge));
    rep.result(&format!("first touch of {touch_mem} RAM (MAP_SHARED file), 4 KiB host pages"), "guest_ms", p);
    rep.result(&format!("first touch of {touch_mem} RAM (MAP_SHARED file), MADV_HUGEPAGE"), "guest_ms", h);
    rep.result("first touch: MADV_HUGEPAGE / plain (informational)", "ratio", h / p);
    Ok(rep)
}

/// One boot of the bundled guest under `peer` (binary `bin`): process
/// spawn to its first serial byte, in ms; the guest must then end with
/// status 0.
fn peer_boot(peer: Peer, bin: &Path, elf: &Path, dir: &Path, cmdline: &str) -> anyhow::Result<f64> {
    let mut proc = match peer {
        Peer::Firecracker => {
            let fc = Firecracker::spawn(bin, dir, "boot")?;
            fc.boot(elf, cmdline, MEM_MIB)?;
            fc.proc
        }
        Peer::CloudHypervisor => {
            let guest = Guest { elf, cmdline, mem_mib: MEM_MIB };
            CloudHypervisor::boot(bin, dir, "boot", &guest, Log::Quiet)?.proc
        }
    };
    let first = proc.first_byte()?;
    check_exit_ok(&mut proc)?;
    Ok(ms(first - proc.spawned))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Finds `prog` on PATH.
pub fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(prog)).find(|p| p.is_file())
}
