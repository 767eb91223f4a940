//! The peers: Firecracker and Cloud Hypervisor, the VMMs smudge's users
//! would otherwise pick, run by the benchmarks on the same guest ELF and
//! workload side by side with smudge. Their binaries come from
//! `SMUDGE_FIRECRACKER` / `SMUDGE_CLOUD_HYPERVISOR`, else `PATH`; without
//! them a bench prints their rows as [`NOT_FOUND`] and leaves their goals
//! out. This module finds them and runs one as a child process that is
//! killed and waited for when dropped, its serial output (stdout) read as
//! it comes.

pub mod cloud_hypervisor;
pub mod firecracker;
pub mod http;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// What a peer's row says when its binary is absent.
pub const NOT_FOUND: &str = "not found";

/// How long any wait on a peer may take: generous, for a loaded host.
pub const WAIT: Duration = Duration::from_secs(60);

/// The start of the line the bundled guest prints once its working set
/// is laid out (and zeroed, with `wipe=1`), right before its workload's
/// clock starts.
pub const WORKING_SET_READY: &str = "workload: working set ready";

/// How long a guest may take to prepare its working set: generous, as
/// first touches of a file-backed RAM on a loaded host are slow.
pub const READY_WAIT: Duration = Duration::from_secs(180);

/// The rest of the first whole line of `text` that starts with `prefix`
/// (its newline already written), trimmed.
fn complete_line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let start = text.match_indices(prefix).map(|(i, _)| i).find(|&i| i == 0 || text[..i].ends_with('\n'))?;
    let line = text[start + prefix.len()..].split_inclusive('\n').next().filter(|l| l.ends_with('\n'))?;
    Some(line.trim())
}

/// The last `bytes` bytes of the file at `path`, trimmed, or "(empty)".
pub fn tail(path: &Path, bytes: usize) -> String {
    let s = std::fs::read(path).unwrap_or_default();
    let s = String::from_utf8_lossy(&s[s.len().saturating_sub(bytes)..]).trim().to_string();
    if s.is_empty() {
        "(empty)".into()
    } else {
        s
    }
}

/// Waits (at most `limit`) until the serial log file `serial` holds a
/// whole line starting with `prefix`, calling `alive` between looks (its
/// error, say that the VMM exited, ends the wait); a failure quotes the
/// log's tail.
pub fn wait_file_line(
    serial: &Path,
    prefix: &str,
    limit: Duration,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read(serial).unwrap_or_default();
        if complete_line(&String::from_utf8_lossy(&text), prefix).is_some() {
            return Ok(());
        }
        let fail = |what: String| {
            format!("{what} before a line {prefix:?}… on the serial output; its tail:\n{}", tail(serial, 2000))
        };
        if let Err(e) = alive() {
            bail!("{}", fail(format!("{e:#}")));
        }
        if t0.elapsed() > limit {
            bail!("{}", fail(format!("{limit:?} passed")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A peer VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Firecracker.
    Firecracker,
    /// Cloud Hypervisor.
    CloudHypervisor,
}

impl Peer {
    /// The environment variable naming its binary.
    pub fn env_var(self) -> &'static str {
        match self {
            Peer::Firecracker => "SMUDGE_FIRECRACKER",
            Peer::CloudHypervisor => "SMUDGE_CLOUD_HYPERVISOR",
        }
    }

    /// Its binary's name on `PATH`.
    pub fn program(self) -> &'static str {
        match self {
            Peer::Firecracker => "firecracker",
            Peer::CloudHypervisor => "cloud-hypervisor",
        }
    }

    /// Its name in a report's rows.
    pub fn label(self) -> &'static str {
        match self {
            Peer::Firecracker => "Firecracker",
            Peer::CloudHypervisor => "Cloud Hypervisor",
        }
    }

    /// Its binary: the environment variable's path if set and a file, else
    /// the program on `PATH`; `None` if neither.
    pub fn find(self) -> Option<PathBuf> {
        find_in(std::env::var_os(self.env_var()), std::env::var_os("PATH"), self.program())
    }
}

/// [`Peer::find`] on given values of the variable and of `PATH`.
fn find_in(var: Option<std::ffi::OsString>, path: Option<std::ffi::OsString>, program: &str) -> Option<PathBuf> {
    if let Some(p) = var.filter(|v| !v.is_empty()).map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    std::env::split_paths(&path?).map(|d| d.join(program)).find(|p| p.is_file())
}

/// The host's TSC frequency as KVM gives it to a guest: the peers need it
/// on the guest's command line (`tsc_khz=`), as smudge appends it.
pub fn tsc_khz() -> anyhow::Result<u32> {
    let kvm = kvm_ioctls::Kvm::new().context("opening /dev/kvm")?;
    let vm = kvm.create_vm().context("creating a VM to read the TSC frequency")?;
    let vcpu = vm.create_vcpu(0).context("creating a vCPU to read the TSC frequency")?;
    vcpu.get_tsc_khz().context("KVM_GET_TSC_KHZ")
}

/// A serial stream read as it comes: its bytes and when the first came.
#[derive(Debug, Default)]
struct Serial {
    bytes: Mutex<Vec<u8>>,
    first: OnceLock<Instant>,
}

/// A peer's process: killed and waited for when dropped.
#[derive(Debug)]
pub struct PeerProcess {
    name: String,
    child: Child,
    /// When it was spawned.
    pub spawned: Instant,
    serial: Arc<Serial>,
    log: PathBuf,
    /// Its API socket.
    pub sock: PathBuf,
}

impl PeerProcess {
    /// Spawns `cmd` (named `name` in errors), its stdout read as serial
    /// output, its stderr into `log`; its API socket is `sock`.
    pub fn spawn(name: &str, mut cmd: Command, sock: &Path, log: &Path) -> anyhow::Result<PeerProcess> {
        std::fs::remove_file(sock).ok();
        let stderr = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
        let spawned = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("{name}: spawning {cmd:?}"))?;
        let serial = Arc::new(Serial::default());
        if let Some(mut out) = child.stdout.take() {
            let s = Arc::clone(&serial);
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = out.read(&mut chunk) {
                    let _ = s.first.set(Instant::now());
                    if let Ok(mut b) = s.bytes.lock() {
                        b.extend_from_slice(&chunk[..n]);
                    }
                }
            });
        }
        Ok(PeerProcess { name: name.into(), child, spawned, serial, log: log.to_path_buf(), sock: sock.to_path_buf() })
    }

    /// Its serial output so far.
    pub fn serial(&self) -> String {
        self.serial.bytes.lock().map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Its stderr (and log) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An error about this peer, with its serial output and stderr.
    pub fn fail(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!("{}: {what}\n--- serial:\n{}\n--- stderr:\n{}", self.name, self.serial(), self.log())
    }

    /// Waits for the API socket to accept.
    pub fn wait_api(&self) -> anyhow::Result<()> {
        http::wait_for_socket(&self.sock, WAIT).map_err(|e| self.fail(&format!("{e:#}")))
    }

    /// One API call; an error (with its stderr) unless the answer is 2xx.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<http::Response> {
        let r = http::request(&self.sock, method, path, body, WAIT).map_err(|e| self.fail(&format!("{e:#}")))?;
        if !r.is_success() {
            return Err(self.fail(&format!(
                "{method} {path} {}: answered {} {}",
                body.unwrap_or(""),
                r.status,
                r.body
            )));
        }
        Ok(r)
    }

    /// When the first serial byte came, waiting for it.
    pub fn first_byte(&mut self) -> anyhow::Result<Instant> {
        let serial = Arc::clone(&self.serial);
        self.wait_until(|| serial.first.get().copied(), "its first serial byte")
    }

    /// Waits until its serial output holds a whole line starting with
    /// `prefix` (the guest writes a byte at a time); returns the rest of it.
    pub fn wait_serial_line(&mut self, prefix: &str) -> anyhow::Result<String> {
        let serial = Arc::clone(&self.serial);
        let mut rest = String::new();
        let seen = |rest: &mut String| {
            let b = serial.bytes.lock().ok()?;
            *rest = complete_line(&String::from_utf8_lossy(&b), prefix)?.to_string();
            Some(Instant::now())
        };
        self.wait_until(|| seen(&mut rest), &format!("a line {prefix:?}… on its serial output"))?;
        Ok(rest)
    }

    /// Waits until its log (stderr) holds `text`.
    pub fn wait_log(&mut self, text: &str) -> anyhow::Result<()> {
        let log = self.log.clone();
        let seen = || std::fs::read_to_string(&log).ok()?.contains(text).then(Instant::now);
        self.wait_until(seen, &format!("{text:?} in its log")).map(drop)
    }

    fn wait_until(&mut self, mut got: impl FnMut() -> Option<Instant>, what: &str) -> anyhow::Result<Instant> {
        let t0 = Instant::now();
        loop {
            if let Some(t) = got() {
                return Ok(t);
            }
            if t0.elapsed() > WAIT {
                return Err(self.fail(&format!("no {what} within {WAIT:?}")));
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(self.fail(&format!("exited ({st}) before {what}")));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::remove_file(&self.sock).ok();
    }
}

/// Checks that a peer's guest ended with status 0 (its serial output says
/// `exit status=0`).
pub fn check_exit_ok(p: &mut PeerProcess) -> anyhow::Result<()> {
    let status = p.wait_serial_line("exit status=")?;
    if status.trim() != "0" {
        bail!(p.fail(&format!("the guest ended with exit status={status}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serial_line_counts_once_whole_and_only_at_a_line_start() {
        let ready = "layout: x\nworkload: working set ready pages=65536\n";
        assert_eq!(complete_line(ready, WORKING_SET_READY), Some("pages=65536"));
        assert_eq!(complete_line("layout: x\nworkload: working set ready pa", WORKING_SET_READY), None);
        assert_eq!(complete_line("x workload: working set ready pages=1\n", WORKING_SET_READY), None);
    }

    #[test]
    fn waiting_for_a_file_line_ends_when_the_vmm_ends_and_quotes_the_log() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let log = dir.path().join("serial");
        std::fs::write(&log, "workload: working set ready pages=4\n").expect("writing the log");
        assert!(wait_file_line(&log, WORKING_SET_READY, READY_WAIT, || Ok(())).is_ok());
        std::fs::write(&log, "layout: half a line").expect("writing the log");
        let e = wait_file_line(&log, WORKING_SET_READY, READY_WAIT, || bail!("the VMM ended")).expect_err("it ended");
        let e = format!("{e:#}");
        assert!(e.starts_with("the VMM ended before a line \"workload: working set ready\""), "{e}");
        assert!(e.ends_with("its tail:\nlayout: half a line"), "{e}");
    }

    #[test]
    fn a_peer_is_found_from_its_variable_else_on_path_else_not() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("firecracker");
        std::fs::write(&bin, b"").unwrap();
        let path = Some(dir.path().as_os_str().to_owned());
        assert_eq!(find_in(Some(bin.clone().into()), None, "firecracker"), Some(bin.clone()));
        assert_eq!(find_in(None, path.clone(), "firecracker"), Some(bin.clone()));
        assert_eq!(find_in(Some("".into()), path.clone(), "firecracker"), Some(bin));
        // A variable naming nothing is not silently replaced by PATH.
        assert_eq!(find_in(Some(dir.path().join("nope").into()), path.clone(), "firecracker"), None);
        assert_eq!(find_in(None, path, "cloud-hypervisor"), None);
        assert_eq!(find_in(None, None, "firecracker"), None);
    }
}
