//! smudge's test kit: one way to start a `smudge` process and talk to it,
//! for the integration tests (`tests/`), the benchmarks (`bench/`) and the
//! examples.
//!
//! - [`TestVm`] ([`vm`]): a guest in a `smudge` process of its own, driven
//!   through its control API, every wait bounded, every error showing the
//!   guest's serial output and smudge's stderr;
//! - [`process`]: the `smudge` binary ([`find_binary`]), a wait that ends
//!   when the process does, and [`spawn_with_api`] (start a VM, wait for
//!   its control socket);
//! - [`progress`]: where a running guest is, read from the guest itself
//!   (its generation table in the memory file, `stats`), so a test waits
//!   for a state instead of sleeping;
//! - [`failing_disk`]: a disk whose file data fails with a real `EIO` on
//!   demand (ext4 on a loop device whose size is cut), released on drop;
//! - the helpers below: run `smudge` and `smudge ctl`, check the stamps
//!   the guest leaves in its memory, mount a small tmpfs, check that KVM
//!   is there (loudly, never a silent skip).

pub mod failing_disk;
pub mod process;
pub mod progress;
pub mod vm;

pub use failing_disk::{holds_guest_pages, FailingDisk};
pub use process::{find_binary, spawn_with_api, StartError, WaitError};
pub use vm::{error_chain, scratch_dir, Exit, HarnessError, Logs, TestVm, TestVmBuilder};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use guest_abi::{stamp_words, RamMap, WsLayout, PAGE_SIZE};

/// How long a test waits for smudge to start (its control socket) or for
/// anything else: long enough for a host whose load is well above its
/// core count.
pub const WAIT: Duration = Duration::from_secs(60);

/// A command running the `smudge` binary ([`find_binary`]; for the VMM's
/// integration tests the one cargo built for them). Fails the test if
/// there is none, or no KVM.
pub fn smudge() -> Command {
    require_kvm();
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    Command::new(BINARY.get_or_init(|| find_binary().unwrap_or_else(|e| panic!("{e}"))))
}

/// Fails the test (never skips it) when /dev/kvm is not usable.
pub fn require_kvm() {
    let p = Path::new("/dev/kvm");
    assert!(p.exists(), "/dev/kvm is missing: these tests boot real guests and need KVM");
    assert!(
        std::fs::OpenOptions::new().read(true).write(true).open(p).is_ok(),
        "/dev/kvm cannot be opened read-write by this user"
    );
}

/// A finished `smudge` run.
#[derive(Debug)]
pub struct Run {
    /// Exit code.
    pub code: i32,
    /// Guest serial output (stdout).
    pub stdout: String,
    /// smudge's own messages.
    pub stderr: String,
}

impl Run {
    /// The run `out` tells of.
    pub fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The first stdout line starting with `prefix`.
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.stdout.lines().find(|l| l.starts_with(prefix))
    }
}

/// Runs `smudge run` with `args` (plus a 60 s timeout).
pub fn run_smudge(args: &[&str]) -> Run {
    let out = smudge().arg("run").args(args).args(["--timeout", "60"]).output().expect("spawn smudge");
    Run::from(out)
}

/// Boots the bundled guest on `mem` (`size` e.g. "64M") with `cmdline`.
pub fn boot(mem: &Path, size: &str, cmdline: &str) -> Run {
    run_smudge(&["--in-place", "--mem-file", mem.to_str().unwrap(), "--mem-size", size, "--cmdline", cmdline])
}

/// A fresh temporary directory.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Path of a file in `dir`.
pub fn path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Reads little-endian u64 at `off` of `bytes`.
pub fn word(bytes: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
}

/// The expected generation of every working-set page after `writes` random
/// writes with `seed` over `pages` pages (the guest's own PRNG, replayed).
pub fn random_generations(seed: u64, pages: u64, writes: usize) -> Vec<u64> {
    let mut gens = vec![0u64; pages as usize];
    for i in guest_abi::random_sequence(seed, pages).take(writes) {
        gens[i as usize] += 1;
    }
    gens
}

/// Checks that the memory image `mem` holds exactly the stamps `gens`
/// describes: written pages carry (pfn, generation, checksum) at the head
/// and the checksum at the tail, and nothing else; unwritten pages are zero.
/// The working set is `pages` pages at its default base; the image is a
/// whole memory file (its length gives the RAM layout, hole included).
pub fn assert_stamps(mem: &[u8], pages: u64, gens: &[u64]) {
    let map = RamMap::for_mem_size(mem.len() as u64);
    let layout = WsLayout::new(&map, None, pages).expect("working set fits the image");
    let file = smudge::memory::ram_layout(mem.len() as u64);
    assert_stamps_in(&layout, gens, None, |gpa| {
        let off = smudge::memory::gpa_to_file_offset(&file, gpa).expect("page is RAM") as usize;
        mem[off..off + PAGE_SIZE as usize].to_vec()
    });
}

/// Checks the working set `layout` of a memory file against `gens` like
/// [`assert_stamps`], reading each page with `page(gpa)` (so the pages above
/// the 32-bit hole come from where the file keeps them). `in_flight` names
/// the one page the guest may have been stamping when it was stopped (a
/// snapshot of a running guest): each of its words may hold either its new
/// stamp or its previous one.
pub fn assert_stamps_in(layout: &WsLayout, gens: &[u64], in_flight: Option<usize>, page: impl Fn(u64) -> Vec<u8>) {
    assert_eq!(gens.len() as u64, layout.pages, "one generation per working-set page");
    for (i, &g) in gens.iter().enumerate() {
        let gpa = layout.page_addr(i as u64);
        let page = page(gpa);
        let pfn = gpa >> 12;
        let expect = |generation: u64| -> Vec<(usize, u64)> {
            if generation == 0 {
                return (0..5).map(|k| (if k == 4 { 4088 } else { k * 8 }, 0)).collect();
            }
            let w = stamp_words(pfn, generation);
            vec![(0, w[0]), (8, w[1]), (16, w[2]), (24, w[3]), (4088, w[2])]
        };
        let (new, old) = (expect(g), expect(g.saturating_sub(1)));
        for (k, &(off, want)) in new.iter().enumerate() {
            let got = word(&page, off);
            let torn_ok = in_flight == Some(i) && g > 0 && got == old[k].1;
            assert!(
                got == want || torn_ok,
                "page {i} (gpa {gpa:#x}) word at {off}: {got:#x}, generation {g} wants {want:#x}"
            );
        }
        assert!(page[32..4088].iter().all(|&b| b == 0), "page {i} (gpa {gpa:#x}): bytes between stamp head and tail");
    }
}

/// Sends `args` (`stats`, `snapshot DIR --parent P`, …) with `smudge ctl`
/// to the VMM at `sock`; returns its JSON answer.
pub fn ctl(sock: &Path, args: &[&str]) -> serde_json::Value {
    let out = smudge().args(["ctl", "--json", "--api-sock", sock.to_str().unwrap()]).args(args).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {out:?}"))
}

/// Starts `smudge run` of the bundled guest with a control socket and waits
/// for the socket ([`spawn_with_api`]). `stdout` takes the guest's serial
/// output; smudge's own messages are piped only when `stderr` (read them,
/// or the VMM may block).
pub fn start_with_api(
    mem: &Path,
    sock: &Path,
    mem_size: &str,
    cmdline: &str,
    stdout: std::process::Stdio,
    stderr: bool,
    extra: &[&str],
) -> std::process::Child {
    let mut cmd = smudge();
    cmd.args(["run", "--in-place", "--mem-file", mem.to_str().unwrap(), "--mem-size", mem_size, "--timeout", "120"])
        .args(["--api-sock", sock.to_str().unwrap(), "--cmdline", cmdline])
        .args(extra)
        .stdout(stdout)
        .stderr(if stderr { std::process::Stdio::piped() } else { std::process::Stdio::null() });
    spawn_with_api(&mut cmd, sock, WAIT).unwrap_or_else(|e| panic!("{}", vm::error_chain(&e)))
}

/// A tmpfs mounted at `dir` with mount options `opts` (`size=1m`,
/// `ro,size=64m`, `nr_inodes=4`…), unmounted on drop: a small or full or
/// read-only filesystem, made by the test (the suite runs as root).
#[derive(Debug)]
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts it; fails the test (never skips it) if it cannot.
    pub fn mount(dir: &Path, opts: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", opts, "tmpfs"]).arg(dir).status();
        assert!(
            st.as_ref().is_ok_and(|s| s.success()),
            "mounting a tmpfs ({opts}) at {} failed ({st:?}): these tests need root",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
