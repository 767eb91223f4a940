//! QEMU's own live migration of the bundled guest, on this machine, as the
//! baseline smudge's migration is compared against: two local QEMUs
//! (`-machine microvm`, the flags `tests/qemu.rs` boots the guest with), the
//! destination started with `-incoming tcp:127.0.0.1:PORT`, the source told
//! to `migrate` over QMP, and QEMU's own figures read back from
//! `query-migrate` once it reports `completed`. `migrate` is sent once the
//! source's serial output (`-serial file:`) says the guest's working set is
//! ready and the warm-up has passed after that.
//!
//! `-machine microvm` migrates fine with QEMU 7.2 here (no migration
//! blocker; the bundled guest's `verify=1` finds no mismatch on the
//! destination), so there is no fallback to `-machine pc`.
//!
//! QEMU reports its times in whole milliseconds, so a sub-millisecond
//! downtime or setup reads as 0.
//!
//! Both QEMUs are killed and the scratch directory (QMP sockets, serial and
//! stderr captures) removed on every path, errors included.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

use crate::peers::{wait_file_line, READY_WAIT, WORKING_SET_READY};

/// The QEMU binary.
const QEMU: &str = "qemu-system-x86_64";
/// `max-bandwidth` when the caller sets none: 100 GB/s, far above what
/// loopback carries, so the link and not QEMU's 128 MiB/s default limits it.
const UNLIMITED_BANDWIDTH: u64 = 100_000_000_000;
/// How often `query-migrate` is polled.
const POLL: Duration = Duration::from_millis(20);
/// How many bytes of a dead QEMU's stderr (and guest serial output) an
/// error quotes.
const TAIL: usize = 2000;

/// What to migrate and how.
#[derive(Debug, Clone)]
pub struct QemuMigrateConfig {
    /// A PVH ELF to boot with `-kernel`, e.g. the bundled guest written out
    /// by `smudge export-guest /tmp/g.elf`.
    pub elf: PathBuf,
    /// Guest RAM in MiB (`-m {mem_mib}M`), e.g. 1024.
    pub mem_mib: u64,
    /// The guest command line, passed verbatim with `-append`. The bundled
    /// guest's `rate` and `ms=` workloads need `tsc_khz=` in it: smudge
    /// appends that itself, QEMU does not.
    pub cmdline: String,
    /// `migrate-set-parameters` `downtime-limit`, in milliseconds.
    pub downtime_limit_ms: u64,
    /// How long the guest's workload runs on the source before `migrate`
    /// is sent, counted from its serial line saying its working set is
    /// ready (it must print one: the bundled guest does).
    pub warmup: Duration,
    /// `migrate-set-parameters` `max-bandwidth` in bytes/s; `None` raises
    /// QEMU's default (128 MiB/s) to 100 GB/s so the link limits it instead.
    pub max_bandwidth: Option<u64>,
    /// Give up with an error if starting the QEMUs and the migration
    /// together take longer than this. The warmup and the wait for the
    /// working set are not counted. The
    /// destination is then checked to be running, and is killed.
    pub timeout: Duration,
}

/// QEMU's figures from `query-migrate` when its status is `completed`.
#[derive(Debug, Clone)]
pub struct QemuMigration {
    /// `total-time`: from `migrate` to completion, in ms.
    pub total_ms: f64,
    /// `downtime`: how long the guest was stopped, in ms.
    pub downtime_ms: f64,
    /// `ram.dirty-sync-count`: dirty-log syncs, i.e. pre-copy rounds.
    pub rounds: u64,
    /// `ram.transferred`: RAM bytes sent over the link.
    pub bytes: u64,
    /// From the source's `STOP` event to the destination's `RESUME` event
    /// (QMP timestamps, host realtime): the guest-visible downtime, which
    /// QEMU's own `downtime` figure (source side only) leaves out part of.
    pub stop_to_resume_ms: Option<f64>,
}

/// Migrates a guest between two local QEMUs as `cfg` says and returns
/// QEMU's figures.
pub fn migrate(cfg: &QemuMigrateConfig) -> anyhow::Result<QemuMigration> {
    match Command::new(QEMU).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{QEMU} is not installed (apt-get install qemu-system-x86)")
        }
        Err(e) => return Err(e).with_context(|| format!("running {QEMU} --version")),
        Ok(_) => {}
    }
    if !cfg.elf.is_file() {
        bail!("guest ELF {} does not exist", cfg.elf.display());
    }
    // Declared first, so dropped last: after both QEMUs are dead.
    let dir = tempfile::Builder::new().prefix("smudge-qemu-mig-").tempdir().context("a scratch directory")?;
    let port = free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut deadline = Instant::now() + cfg.timeout;

    let mut dest = Qemu::spawn("destination", cfg, dir.path(), Some(&uri))?;
    dest.connect(deadline)?;
    let mut src = Qemu::spawn("source", cfg, dir.path(), None)?;
    src.connect(deadline)?;

    // Let the guest prepare its working set, then run its workload for the
    // warm-up, watching that the source does not die meanwhile.
    let (t0, serial) = (Instant::now(), src.serial.clone());
    wait_file_line(&serial, WORKING_SET_READY, READY_WAIT, || src.check_alive()).context("the source QEMU's guest")?;
    deadline += t0.elapsed();
    let warm_end = Instant::now() + cfg.warmup;
    while Instant::now() < warm_end {
        src.check_alive()?;
        std::thread::sleep(POLL.min(warm_end.saturating_duration_since(Instant::now())));
    }
    deadline += cfg.warmup;

    let bandwidth = cfg.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH);
    src.execute(
        "migrate-set-parameters",
        json!({"downtime-limit": cfg.downtime_limit_ms, "max-bandwidth": bandwidth}),
        deadline,
    )?;
    src.execute("migrate", json!({"uri": uri}), deadline)?;
    let info = loop {
        let info = src.execute("query-migrate", json!({}), deadline)?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => break info,
            "failed" | "cancelled" => bail!(
                "QEMU's migration {}: {}",
                info["status"].as_str().unwrap_or(""),
                info["error-desc"].as_str().unwrap_or("(no error-desc)")
            ),
            _ => {}
        }
        if Instant::now() >= deadline {
            bail!("QEMU's migration did not complete within {:?}; last query-migrate: {info}", cfg.timeout);
        }
        std::thread::sleep(POLL);
    };

    // Running, or the guest's workload ended by itself already.
    dest.wait_running(deadline)?;

    let f64_of = |v: &Value, what: &str| v.as_f64().ok_or_else(|| anyhow!("query-migrate has no {what}: {info}"));
    let u64_of = |v: &Value, what: &str| v.as_u64().ok_or_else(|| anyhow!("query-migrate has no {what}: {info}"));
    let out = QemuMigration {
        total_ms: f64_of(&info["total-time"], "total-time")?,
        downtime_ms: f64_of(&info["downtime"], "downtime")?,
        rounds: u64_of(&info["ram"]["dirty-sync-count"], "ram.dirty-sync-count")?,
        bytes: u64_of(&info["ram"]["transferred"], "ram.transferred")?,
        stop_to_resume_ms: match (src.event_time("STOP"), dest.event_time("RESUME")) {
            (Some(a), Some(b)) => Some((b - a) * 1e3),
            _ => None,
        },
    };
    drop(src);
    drop(dest);
    drop(dir);
    Ok(out)
}

/// A free TCP port on 127.0.0.1 (bound, read, and released again).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The last [`TAIL`] bytes of the file at `path`, or a note that it is empty.
fn tail(path: &Path) -> String {
    crate::peers::tail(path, TAIL)
}

/// One QEMU process and its QMP connection; killed on drop.
#[derive(Debug)]
struct Qemu {
    /// "source" or "destination", for messages.
    name: &'static str,
    child: Child,
    sock: PathBuf,
    serial: PathBuf,
    stderr: PathBuf,
    qmp: Option<(BufReader<UnixStream>, UnixStream)>,
    /// Asynchronous events seen so far (STOP, RESUME, ...).
    events: Vec<Value>,
}

impl Qemu {
    /// Starts QEMU on `cfg`'s guest; `incoming` makes it a destination.
    fn spawn(name: &'static str, cfg: &QemuMigrateConfig, dir: &Path, incoming: Option<&str>) -> anyhow::Result<Qemu> {
        let tag = if incoming.is_some() { "dst" } else { "src" };
        let sock = dir.join(format!("{tag}.qmp"));
        let serial = dir.join(format!("{tag}.serial"));
        let stderr = dir.join(format!("{tag}.stderr"));
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities", "-machine", "microvm"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-m")
            .arg(format!("{}M", cfg.mem_mib))
            .arg("-kernel")
            .arg(&cfg.elf)
            .arg("-append")
            .arg(&cfg.cmdline)
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()));
        if let Some(uri) = incoming {
            cmd.arg("-incoming").arg(uri);
        }
        let err = File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
        let child = cmd.spawn().with_context(|| format!("spawning the {name} QEMU: {cmd:?}"))?;
        Ok(Qemu { name, child, sock, serial, stderr, qmp: None, events: Vec::new() })
    }

    /// The last bytes QEMU wrote to stderr.
    fn stderr_tail(&self) -> String {
        tail(&self.stderr)
    }

    /// An error if QEMU has exited, quoting its stderr.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            let guest = match st.code() {
                Some(c) if c & 1 == 1 => format!(" (the guest exited with status {:#x})", c >> 1),
                _ => String::new(),
            };
            bail!(
                "the {} QEMU exited ({st}){guest}; stderr: {}; guest serial: {}",
                self.name,
                self.stderr_tail(),
                tail(&self.serial)
            );
        }
        Ok(())
    }

    /// `e` with, if QEMU has died, its exit status and stderr.
    fn explain(&mut self, e: anyhow::Error) -> anyhow::Error {
        // Give a dying QEMU a moment to go, so the cause is its stderr.
        for _ in 0..50 {
            if let Err(dead) = self.check_alive() {
                return e.context(dead.to_string());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        e.context(format!("the {} QEMU", self.name))
    }

    /// Waits for the QMP socket, reads the greeting, and leaves capability
    /// negotiation mode.
    fn connect(&mut self, deadline: Instant) -> anyhow::Result<()> {
        let stream = loop {
            self.check_alive()?;
            if let Ok(s) = UnixStream::connect(&self.sock) {
                break s;
            }
            if Instant::now() >= deadline {
                bail!(
                    "the {} QEMU's QMP socket {} never appeared: {}",
                    self.name,
                    self.sock.display(),
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let reader = BufReader::new(stream.try_clone()?);
        self.qmp = Some((reader, stream));
        let greeting = self.read_message(deadline).map_err(|e| self.explain(e))?;
        if greeting.get("QMP").is_none() {
            bail!("the {} QEMU's QMP greeting is not one: {greeting}", self.name);
        }
        self.execute("qmp_capabilities", json!({}), deadline)?;
        Ok(())
    }

    /// Reads the next QMP message that is not an asynchronous event.
    fn read_message(&mut self, deadline: Instant) -> anyhow::Result<Value> {
        let (reader, _) = self.qmp.as_mut().context("QMP not connected")?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            reader.get_ref().set_read_timeout(Some(left))?;
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => bail!("QMP connection closed"),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    bail!("timed out waiting for a QMP reply")
                }
                Err(e) => return Err(e).context("reading QMP"),
            }
            let v: Value = serde_json::from_str(line.trim()).with_context(|| format!("QMP sent {line:?}"))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
            self.events.push(v);
        }
    }

    /// Runs one QMP command and returns its `return` value.
    fn execute(&mut self, cmd: &str, args: Value, deadline: Instant) -> anyhow::Result<Value> {
        let reply = self.execute_raw(cmd, args, deadline).map_err(|e| self.explain(e))?;
        if let Some(err) = reply.get("error") {
            bail!(
                "the {} QEMU refused {cmd}: {}",
                self.name,
                err["desc"].as_str().map_or_else(|| err.to_string(), str::to_string)
            );
        }
        reply.get("return").cloned().with_context(|| format!("{cmd}: QMP replied {reply}"))
    }

    fn execute_raw(&mut self, cmd: &str, args: Value, deadline: Instant) -> anyhow::Result<Value> {
        let (_, writer) = self.qmp.as_mut().context("QMP not connected")?;
        let mut req = serde_json::to_vec(&json!({"execute": cmd, "arguments": args}))?;
        req.push(b'\n');
        writer.write_all(&req).with_context(|| format!("sending {cmd}"))?;
        self.read_message(deadline).with_context(|| format!("reply to {cmd}"))
    }

    /// When the last event `name` happened (host realtime, seconds).
    fn event_time(&self, name: &str) -> Option<f64> {
        self.events.iter().rev().find(|e| e["event"] == name).and_then(|e| {
            let t = &e["timestamp"];
            Some(t["seconds"].as_f64()? + t["microseconds"].as_f64()? / 1e6)
        })
    }

    /// Waits for a migration destination to report `running`; returns
    /// QEMU's exit code instead if it has already exited by itself.
    fn wait_running(&mut self, deadline: Instant) -> anyhow::Result<Option<i32>> {
        loop {
            match self.execute_raw("query-status", json!({}), deadline) {
                Ok(v) if v["return"]["status"] == "running" => return Ok(None),
                Ok(v) if v["return"]["status"] == "inmigrate" => {}
                Ok(v) => bail!("the {} QEMU is not running after the migration: {v}", self.name),
                Err(e) => {
                    // The guest may have finished and QEMU exited with it.
                    std::thread::sleep(Duration::from_millis(50));
                    if let Some(st) = self.child.try_wait()? {
                        if let Some(code) = st.code() {
                            return Ok(Some(code));
                        }
                    }
                    return Err(self.explain(e));
                }
            }
            if Instant::now() >= deadline {
                bail!("the {} QEMU did not start running after the migration", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.qmp = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_dir_is_removed_and_tail_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        assert_eq!(tail(&p), "(empty)");
        std::fs::write(&p, format!("{}end\n", "x".repeat(3 * TAIL))).unwrap();
        let t = tail(&p);
        assert_eq!(t.len(), TAIL - 1);
        assert!(t.ends_with("xend"));
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
        assert_ne!(free_port().unwrap(), 0);
    }
}
