//! [`TestVm`]: a guest in a `smudge` process of its own, for tests that
//! boot a tiny guest.
//!
//! [`TestVm`] runs the `smudge` binary as a child process — `smudge run`,
//! `smudge restore` or `smudge migrate-recv` — and drives it through its
//! control API socket only, so every VM of a test lives in a process of its
//! own and a crash, hang or `kill -9` of one cannot take the test or the
//! other VMs down. Each VM gets a scratch directory (a [`tempfile::TempDir`]:
//! memory file, serial log, API socket) that is removed, with the process
//! killed if it still runs, when the `TestVm` is dropped. Requests go
//! through the control API's one client, [`smudge::control::Client`].
//!
//! Everything waits with a time limit, and every error that concerns a VM
//! ([`HarnessError`]) carries what the guest printed on its serial console
//! so far and the tail of smudge's stderr, so a failing test shows why.
//!
//! ```no_run
//! use std::time::Duration;
//! use smudge_testkit::{scratch_dir, HarnessError, TestVm};
//!
//! fn main() -> Result<(), HarnessError> {
//!     let vm = TestVm::builder()
//!         .mem(64 << 20)
//!         .workload("workload=rate pages=2000 rate=2000 ms=3000 seed=5 verify=1")
//!         .boot()?;
//!     vm.wait_for_serial("layout:", Duration::from_secs(60))?;
//!     let stats = vm.stats()?;
//!     println!("dirty log: {}", stats["dirty_log"]);
//!
//!     let snaps = scratch_dir("snapshots")?;
//!     vm.snapshot(&snaps.path().join("full"))?;
//!     let restored = TestVm::restore(snaps.path().join("full"))?;
//!
//!     let dest = TestVm::incoming()?;
//!     let report = vm.migrate_to(&dest)?;
//!     println!("downtime {} ms", report["downtime_ms"]);
//!
//!     for v in [&restored, &dest] {
//!         let exit = v.wait_exit(Duration::from_secs(60))?;
//!         assert_eq!(exit.code, Some(0), "{exit}");
//!         assert!(exit.line("verify:").is_some_and(|l| l.ends_with("mismatches=0")), "{exit}");
//!     }
//!     Ok(())
//! }
//! ```
//!
//! A runnable version of this is `testkit/examples/harness.rs`
//! (`cargo run --release -p smudge-testkit --example harness`), and
//! `tests/harness.rs` is an integration test built on it.
//!
//! Finding the binary: [`TestVmBuilder::binary`], else
//! [`find_binary`](crate::find_binary) (`SMUDGE_BIN`, else a `smudge`
//! beside the running executable or in its parent directory, where cargo
//! puts it). Integration tests of the VMM package may pass
//! `env!("CARGO_BIN_EXE_smudge")`: the same file, which cargo builds
//! before them.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use smudge::control::{Client, ClientError, MigrateRequest, Request, SnapshotRequest};

use crate::process::{find_binary, wait_until, WaitError};

/// The default of every wait for smudge (socket, listening address,
/// control answer, guest run): long enough for a host whose load average
/// is well above its core count, where a process may not run for seconds.
const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// How long, once smudge has exited, the harness waits for the thread that
/// reads its stderr to see the end of the pipe (so an error or an [`Exit`]
/// shows all of it).
const STDERR_DRAIN: Duration = Duration::from_secs(10);
/// Lines of smudge's stderr an error shows.
const STDERR_TAIL_LINES: usize = 40;
/// Bytes of serial output an error shows (the end of it).
const SERIAL_TAIL_BYTES: usize = 16 * 1024;
/// The line `smudge migrate-recv` prints once it listens.
const LISTENING: &str = "smudge: waiting for a migration on ";

/// What the guest printed and smudge said, attached to every error about
/// a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Logs {
    /// The guest's serial output so far (its end, if it is long).
    pub serial: String,
    /// The last lines smudge wrote to stderr.
    pub stderr_tail: String,
}

impl fmt::Display for Logs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |s: &str| if s.trim().is_empty() { "(nothing)\n".to_string() } else { with_newline(s) };
        write!(f, "\n--- guest serial output so far ---\n{}", show(&self.serial))?;
        write!(f, "--- smudge stderr (last {STDERR_TAIL_LINES} lines) ---\n{}", show(&self.stderr_tail))
    }
}

fn with_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

/// Why a harness call failed. Every variant about a running (or exited)
/// VM carries its [`Logs`]; `Display` (and `Debug`, so `unwrap` and a test
/// returning `Err` show the same) prints them after the message.
#[derive(thiserror::Error)]
pub enum HarnessError {
    /// No `smudge` binary was found.
    #[error(
        "cannot find the smudge binary (looked at: {}); build it (`cargo build --release -p smudge-vmm`), \
         set SMUDGE_BIN, or pass TestVm::builder().binary(PATH)",
        .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    BinaryNotFound {
        /// The places tried.
        searched: Vec<PathBuf>,
    },
    /// The child process could not be started, or its scratch directory
    /// could not be made.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// What was being started.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A wait ran out of time.
    #[error("{vm}: timed out after {after:?} waiting for {what}{logs}")]
    Timeout {
        /// Which VM.
        vm: String,
        /// What was awaited.
        what: String,
        /// The time limit.
        after: Duration,
        /// What the guest and smudge printed.
        logs: Box<Logs>,
    },
    /// The process ended while the harness waited for something else.
    #[error("{vm}: smudge exited ({}) while waiting for {what}{logs}", describe_code(*.code))]
    Exited {
        /// Which VM.
        vm: String,
        /// What was awaited.
        what: String,
        /// Its exit code (`None`: killed by a signal).
        code: Option<i32>,
        /// What the guest and smudge printed.
        logs: Box<Logs>,
    },
    /// The control API answered `"ok": false`, or not in JSON.
    #[error("{vm}: control request {request} failed: {error}{logs}")]
    Api {
        /// Which VM.
        vm: String,
        /// The request sent.
        request: String,
        /// The error smudge gave (or what was wrong with its answer).
        error: String,
        /// The whole answer (`Value::Null` if there was none).
        answer: Value,
        /// What the guest and smudge printed.
        logs: Box<Logs>,
    },
    /// The control API could not be reached, or did not answer.
    #[error("{vm}: control request {request}: {}{logs}", error_chain(.error))]
    Client {
        /// Which VM.
        vm: String,
        /// The request sent.
        request: String,
        /// What the client met (shown whole in the message, its causes
        /// included).
        error: ClientError,
        /// What the guest and smudge printed.
        logs: Box<Logs>,
    },
    /// An I/O error reading the VM's files.
    #[error("{vm}: {what}: {source}{logs}")]
    Io {
        /// Which VM.
        vm: String,
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
        /// What the guest and smudge printed.
        logs: Box<Logs>,
    },
    /// The call does not apply to this VM (a memory range outside its RAM,
    /// a migration to a VM that does not listen for one, …).
    #[error("{vm}: {what}{logs}")]
    Usage {
        /// Which VM.
        vm: String,
        /// What is wrong.
        what: String,
        /// What the guest and smudge printed.
        logs: Box<Logs>,
    },
}

impl fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl HarnessError {
    /// The guest's serial output and smudge's stderr at the time of the
    /// error (`None` for errors before a VM existed).
    pub fn logs(&self) -> Option<&Logs> {
        match self {
            HarnessError::BinaryNotFound { .. } | HarnessError::Spawn { .. } => None,
            HarnessError::Timeout { logs, .. }
            | HarnessError::Exited { logs, .. }
            | HarnessError::Api { logs, .. }
            | HarnessError::Io { logs, .. }
            | HarnessError::Client { logs, .. }
            | HarnessError::Usage { logs, .. } => Some(logs),
        }
    }
}

/// An error and its sources, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        s.push_str(&format!(": {cause}"));
        next = cause.source();
    }
    s
}

fn describe_code(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("code {c}"),
        None => "killed by a signal".to_string(),
    }
}

/// A result of the harness.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// A new scratch directory `smudge-harness-{label}-…` in the temporary
/// directory (mode 0700), removed with everything in it when dropped.
pub fn scratch_dir(label: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("smudge-harness-{label}-"))
        .tempdir()
        .map_err(|source| HarnessError::Spawn { what: "a scratch directory".into(), source })
}

/// How a VM's process starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    Boot,
    Restore,
    Incoming,
}

/// Options for a [`TestVm`]; from [`TestVm::builder`].
#[derive(Debug, Clone)]
pub struct TestVmBuilder {
    binary: Option<PathBuf>,
    mem: u64,
    vcpus: u8,
    workload: Option<String>,
    dirty_log: Option<String>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    timeout: Duration,
    boot_timeout: Duration,
    api_timeout: Duration,
    keep_scratch: bool,
}

impl Default for TestVmBuilder {
    fn default() -> Self {
        TestVmBuilder {
            binary: None,
            mem: 64 << 20,
            vcpus: 1,
            workload: None,
            dirty_log: None,
            args: Vec::new(),
            env: Vec::new(),
            timeout: DEFAULT_WAIT,
            boot_timeout: DEFAULT_WAIT,
            api_timeout: DEFAULT_WAIT,
            keep_scratch: false,
        }
    }
}

impl TestVmBuilder {
    /// The `smudge` binary (default: [`find_binary`]).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Guest RAM in bytes (default 64 MiB; `--mem-size`). Not used by a
    /// restore or an incoming migration: the snapshot or source decides.
    pub fn mem(mut self, bytes: u64) -> Self {
        self.mem = bytes;
        self
    }

    /// Number of vCPUs (default 1; `--vcpus`). Not used by a restore or an
    /// incoming migration.
    pub fn vcpus(mut self, n: u8) -> Self {
        self.vcpus = n;
        self
    }

    /// The guest's command line (`--cmdline`; keys in `guest/README.md`),
    /// e.g. `"workload=rate pages=2000 rate=2000 ms=3000 verify=1"`.
    /// Default: smudge's own short workload. Not used by a restore or an
    /// incoming migration (the guest continues where it was).
    pub fn workload(mut self, cmdline: impl Into<String>) -> Self {
        self.workload = Some(cmdline.into());
        self
    }

    /// The dirty-log mechanism: `auto`, `bitmap`, `manual` or `ring`
    /// (`--dirty-log`; default: smudge's, `auto`).
    pub fn dirty_log(mut self, mechanism: impl Into<String>) -> Self {
        self.dirty_log = Some(mechanism.into());
        self
    }

    /// One more command-line argument for smudge (any `smudge run` option:
    /// `--no-writeback`, `--snapshot-precopy-ms`, `0`, …). The harness
    /// itself passes `--mem-file`, `--serial`, `--api-sock` and `--timeout`
    /// (and `--mem-size`, `--vcpus`, `--cmdline`, `--dirty-log` when set):
    /// do not repeat those.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Several more arguments; see [`TestVmBuilder::arg`].
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable for the smudge process (e.g.
    /// `SMUDGE_LOG=debug`). The harness sets `NO_COLOR=1` (smudge's log
    /// lines carry colour codes even into a pipe otherwise); this can
    /// override it.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// How long the guest may run: smudge's `--timeout` (it then ends the
    /// run with exit code 103), and for an incoming VM also how long it
    /// waits for a source (`--accept-timeout`). Default 60 s, at least
    /// 1 ms. It also bounds a child left behind if the test process itself
    /// is killed (no `Drop` then).
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    /// How long [`TestVmBuilder::boot`] and [`TestVmBuilder::restore`]
    /// wait for the API socket, and [`TestVmBuilder::incoming`] for the
    /// listening address (default 60 s).
    pub fn boot_timeout(mut self, limit: Duration) -> Self {
        self.boot_timeout = limit;
        self
    }

    /// How long one control request may take, a migration included
    /// (default 60 s).
    pub fn api_timeout(mut self, limit: Duration) -> Self {
        self.api_timeout = limit;
        self
    }

    /// Leave the scratch directory (memory file, serial log) on disk when
    /// the VM is dropped.
    pub fn keep_scratch(mut self, keep: bool) -> Self {
        self.keep_scratch = keep;
        self
    }

    /// Starts `smudge run` and returns once its API socket is up.
    pub fn boot(self) -> Result<TestVm> {
        self.start(Start::Boot, None)
    }

    /// Starts `smudge restore --snapshot DIR` on a new memory file and
    /// returns once its API socket is up (after the memory was restored).
    pub fn restore(self, snapshot: impl AsRef<Path>) -> Result<TestVm> {
        self.start(Start::Restore, Some(snapshot.as_ref()))
    }

    /// Starts `smudge migrate-recv --listen 0` (loopback, a free port) and
    /// returns once it listens; pass it to [`TestVm::migrate_to`]. Its API
    /// socket comes up once a guest has arrived.
    pub fn incoming(self) -> Result<TestVm> {
        self.start(Start::Incoming, None)
    }

    fn start(self, start: Start, snapshot: Option<&Path>) -> Result<TestVm> {
        let binary = match self.binary.clone() {
            Some(b) => b,
            None => find_binary()?,
        };
        let label = match start {
            Start::Boot => "run",
            Start::Restore => "restore",
            Start::Incoming => "incoming",
        };
        let mut scratch = scratch_dir(label)?;
        scratch.disable_cleanup(self.keep_scratch);
        let dir = scratch.path();
        let (mem, serial, sock) = (dir.join("mem"), dir.join("serial.log"), dir.join("api.sock"));
        let secs = |d: Duration| format!("{:.3}", d.as_secs_f64().max(0.001));
        let mut cmd = Command::new(&binary);
        match start {
            Start::Boot => {
                cmd.arg("run")
                    .arg("--in-place")
                    .arg("--mem-size")
                    .arg(self.mem.to_string())
                    .arg("--vcpus")
                    .arg(self.vcpus.to_string());
                if let Some(w) = &self.workload {
                    cmd.arg("--cmdline").arg(w);
                }
            }
            Start::Restore => {
                let snap = snapshot.map(|s| std::path::absolute(s).unwrap_or_else(|_| s.to_path_buf()));
                cmd.arg("restore").arg("--snapshot").args(snap);
            }
            Start::Incoming => {
                cmd.args(["migrate-recv", "--listen", "0", "--accept-timeout"]).arg(secs(self.timeout));
            }
        }
        cmd.arg("--mem-file").arg(&mem).arg("--serial").arg(&serial).arg("--api-sock").arg(&sock);
        cmd.arg("--timeout").arg(secs(self.timeout));
        if let Some(d) = &self.dirty_log {
            cmd.arg("--dirty-log").arg(d);
        }
        // smudge's log lines carry colour codes even into a pipe otherwise.
        cmd.env("NO_COLOR", "1");
        cmd.args(&self.args).envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let name = format!("smudge {label}");
        let mut child = cmd
            .spawn()
            .map_err(|source| HarnessError::Spawn { what: format!("{name} ({})", binary.display()), source })?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let reader = child.stderr.take().map(|pipe| spawn_reader(pipe, stderr.clone()));
        let vm = TestVm {
            name: format!("{name} (pid {})", child.id()),
            child: Mutex::new(child),
            status: Mutex::new(None),
            stderr,
            reader: Mutex::new(reader),
            mem,
            serial,
            sock,
            addr: Mutex::new(None),
            api_timeout: self.api_timeout,
            boot_timeout: self.boot_timeout,
            scratch,
        };
        match start {
            Start::Boot | Start::Restore => vm.wait_for_socket(self.boot_timeout)?,
            Start::Incoming => {
                let addr = vm.wait_until(self.boot_timeout, "the migration listening address", || {
                    let err = lock(&vm.stderr);
                    err.lines().find_map(|l| l.strip_prefix(LISTENING)).map(|a| a.trim().to_string())
                })?;
                *lock(&vm.addr) = Some(addr);
            }
        }
        Ok(vm)
    }
}

fn spawn_reader(pipe: ChildStderr, sink: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => lock(&sink).push_str(&String::from_utf8_lossy(&line)),
            }
        }
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a VM's process ended; from [`TestVm::wait_exit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The exit code: the guest's status, or smudge's own (100–109; see
    /// docs/exit-codes.md); `None` if the process was killed by a signal.
    pub code: Option<i32>,
    /// Everything the guest printed on its serial console (in this
    /// process: a restored or migrated guest's output starts there).
    pub serial: String,
    /// Everything smudge wrote to stderr.
    pub stderr: String,
}

impl Exit {
    /// Whether the process exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The first serial line containing `pattern`.
    pub fn line(&self, pattern: &str) -> Option<&str> {
        self.serial.lines().find(|l| l.contains(pattern))
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "smudge exited ({})", describe_code(self.code))?;
        write!(f, "\n--- guest serial output ---\n{}", with_newline(&self.serial))?;
        write!(f, "--- smudge stderr ---\n{}", with_newline(&self.stderr))
    }
}

/// A guest running in a `smudge` child process, driven through its control
/// API socket. See the [module documentation](self) for an example.
///
/// Every method takes `&self`, so one thread may ask for `stats` while
/// another waits for a snapshot or a migration. Dropping it kills the
/// process if it still runs and removes its scratch directory (the memory
/// file included).
#[derive(Debug)]
pub struct TestVm {
    name: String,
    child: Mutex<Child>,
    status: Mutex<Option<ExitStatus>>,
    stderr: Arc<Mutex<String>>,
    reader: Mutex<Option<JoinHandle<()>>>,
    mem: PathBuf,
    serial: PathBuf,
    sock: PathBuf,
    addr: Mutex<Option<String>>,
    api_timeout: Duration,
    boot_timeout: Duration,
    scratch: tempfile::TempDir,
}

impl TestVm {
    /// Options for a new VM: [`TestVmBuilder::boot`] starts it.
    pub fn builder() -> TestVmBuilder {
        TestVmBuilder::default()
    }

    /// Continues the snapshot in `dir` in a new process on a new memory
    /// file, with default options ([`TestVmBuilder::restore`] takes
    /// others).
    pub fn restore(snapshot: impl AsRef<Path>) -> Result<TestVm> {
        TestVm::builder().restore(snapshot)
    }

    /// A `smudge migrate-recv` waiting for a guest, with default options
    /// ([`TestVmBuilder::incoming`] takes others).
    pub fn incoming() -> Result<TestVm> {
        TestVm::builder().incoming()
    }

    /// The guest's memory file (`MAP_SHARED`: it is guest RAM). It exists
    /// while this `TestVm` does; an incoming VM makes it when a guest
    /// arrives.
    pub fn mem_path(&self) -> &Path {
        &self.mem
    }

    /// The file the guest's serial output goes to.
    pub fn serial_path(&self) -> &Path {
        &self.serial
    }

    /// The control API socket.
    pub fn api_sock(&self) -> &Path {
        &self.sock
    }

    /// The VM's scratch directory (removed on drop).
    pub fn scratch_dir(&self) -> &Path {
        self.scratch.path()
    }

    /// The smudge process id.
    pub fn pid(&self) -> u32 {
        lock(&self.child).id()
    }

    /// Where an incoming VM listens (`127.0.0.1:PORT`); `None` for others.
    pub fn migration_addr(&self) -> Option<String> {
        lock(&self.addr).clone()
    }

    /// What the guest printed on its serial console so far.
    pub fn serial(&self) -> String {
        match std::fs::read(&self.serial) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => String::new(),
        }
    }

    /// What smudge wrote to stderr so far.
    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// The serial output so far and the tail of smudge's stderr.
    pub fn logs(&self) -> Logs {
        let serial = self.serial();
        let serial = match serial.len().checked_sub(SERIAL_TAIL_BYTES) {
            Some(cut) if cut > 0 => {
                let at = (cut..serial.len()).find(|&i| serial.is_char_boundary(i)).unwrap_or(serial.len());
                format!("[… {at} bytes before]\n{}", &serial[at..])
            }
            _ => serial,
        };
        let err = lock(&self.stderr);
        let mut tail: VecDeque<&str> = VecDeque::with_capacity(STDERR_TAIL_LINES + 1);
        for l in err.lines() {
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(l);
        }
        let stderr_tail = tail.into_iter().collect::<Vec<_>>().join("\n");
        Logs { serial, stderr_tail }
    }

    fn boxed_logs(&self) -> Box<Logs> {
        Box::new(self.logs())
    }

    /// The exit status if the process has ended (it is reaped then).
    fn exit_status(&self) -> Option<ExitStatus> {
        let mut status = lock(&self.status);
        if status.is_none() {
            if let Ok(Some(s)) = lock(&self.child).try_wait() {
                *status = Some(s);
            }
        }
        *status
    }

    /// Whether the smudge process still runs.
    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// Waits for `f` to return something, at most `limit`; fails early if
    /// the process exits first (after a last look).
    fn wait_until<T>(&self, limit: Duration, what: &str, f: impl FnMut() -> Option<T>) -> Result<T> {
        let exited = || {
            let s = self.exit_status();
            if s.is_some() {
                // Let the stderr reader catch up before the last look.
                self.join_reader(STDERR_DRAIN);
            }
            s
        };
        wait_until(limit, exited, f).map_err(|e| match e {
            WaitError::Exited(s) => self.exited_error(what, s),
            WaitError::TimedOut(after) => {
                HarnessError::Timeout { vm: self.name.clone(), what: what.to_string(), after, logs: self.boxed_logs() }
            }
        })
    }

    fn exited_error(&self, what: &str, s: ExitStatus) -> HarnessError {
        HarnessError::Exited { vm: self.name.clone(), what: what.to_string(), code: s.code(), logs: self.boxed_logs() }
    }

    fn wait_for_socket(&self, limit: Duration) -> Result<()> {
        // smudge binds the socket under a temporary name and renames it into
        // place once it listens, and the scratch directory is new: the path
        // existing means the API is up (no probe connection, which smudge
        // would log as a broken one).
        self.wait_until(limit, "the control API socket", || self.sock.exists().then_some(()))
    }

    fn join_reader(&self, limit: Duration) {
        let mut reader = lock(&self.reader);
        let t0 = Instant::now();
        while reader.as_ref().is_some_and(|r| !r.is_finished()) && t0.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(1));
        }
        if reader.as_ref().is_some_and(|r| r.is_finished()) {
            if let Some(r) = reader.take() {
                let _ = r.join();
            }
        }
    }

    /// Waits until a complete line of the guest's serial output contains
    /// `pattern` and returns the first such line (searching all the output
    /// of this process, from its start). Fails on timeout or if smudge
    /// exits without printing it.
    pub fn wait_for_serial(&self, pattern: &str, limit: Duration) -> Result<String> {
        let what = format!("'{pattern}' on the serial console");
        self.wait_until(limit, &what, || {
            // Once the process has ended the last line counts even without
            // its newline; before that it may be half written. (Looked at
            // before the read, so a line cut short is never taken whole.)
            let done = !self.is_running();
            let text = self.serial();
            let complete = if done { text.as_str() } else { text.rsplit_once('\n').map_or("", |(head, _)| head) };
            complete.lines().find(|l| l.contains(pattern)).map(str::to_string)
        })
    }

    /// Sends one control request and returns the answer as it came,
    /// `"ok": false` included. `request` is a [`Request`] — or, to test how
    /// smudge answers a bad one, any JSON (`json!({"cmd": "reboot"})`).
    pub fn call_raw(&self, request: &(impl Serialize + ?Sized)) -> Result<Value> {
        let shown = serde_json::to_string(request).unwrap_or_else(|e| format!("(unencodable request: {e})"));
        let mut line = shown.clone().into_bytes();
        line.push(b'\n');
        let client = Client::new(&self.sock).timeouts(self.api_timeout, self.api_timeout);
        client.call_line(&line).map_err(|e| self.client_error(&shown, e))
    }

    /// A client error as the harness reports it: the process's exit if it
    /// has ended, a timeout, or what went wrong, with the VM's logs.
    fn client_error(&self, shown: &str, e: ClientError) -> HarnessError {
        if e.timed_out() {
            return HarnessError::Timeout {
                vm: self.name.clone(),
                what: format!("the answer to {shown}"),
                after: self.api_timeout,
                logs: self.boxed_logs(),
            };
        }
        if let ClientError::BadAnswer { answer, source } = &e {
            return HarnessError::Api {
                vm: self.name.clone(),
                request: shown.to_string(),
                error: format!("the answer is not JSON ({source}): '{answer}'"),
                answer: Value::Null,
                logs: self.boxed_logs(),
            };
        }
        if let Some(s) = self.exit_status() {
            return self.exited_error(&format!("the answer to {shown}"), s);
        }
        HarnessError::Client { vm: self.name.clone(), request: shown.to_string(), error: e, logs: self.boxed_logs() }
    }

    /// Sends one control request; an answer without `"ok": true` is an
    /// error ([`HarnessError::Api`]).
    pub fn call(&self, request: &(impl Serialize + ?Sized)) -> Result<Value> {
        let answer = self.call_raw(request)?;
        if answer.get("ok").and_then(Value::as_bool) == Some(true) {
            return Ok(answer);
        }
        let error = answer.get("error").and_then(Value::as_str).unwrap_or("no \"ok\": true in the answer").to_string();
        Err(HarnessError::Api {
            vm: self.name.clone(),
            request: serde_json::to_string(request).unwrap_or_default(),
            error,
            answer,
            logs: self.boxed_logs(),
        })
    }

    /// `stats`: the dirty-log and writeback counters (`dirty_log.guest_pages`,
    /// `writeback.nr_dirtied`, …; see docs/api.md).
    pub fn stats(&self) -> Result<Value> {
        self.call(&Request::Stats)
    }

    /// `pause`: holds the vCPUs.
    pub fn pause(&self) -> Result<Value> {
        self.call(&Request::Pause)
    }

    /// `resume`: lets the vCPUs run.
    pub fn resume(&self) -> Result<Value> {
        self.call(&Request::Resume)
    }

    /// `sync`: every dirty page written back, then `fdatasync`.
    pub fn sync(&self) -> Result<Value> {
        self.call(&Request::Sync)
    }

    /// `stop`: ends the run (exit code 0). Use [`TestVm::wait_exit`] to
    /// wait for the process.
    pub fn stop(&self) -> Result<Value> {
        self.call(&Request::Stop)
    }

    /// A full snapshot into `dir` (which must not exist or be empty); the
    /// guest runs on. Returns the answer (`id`, `kind`, `memory_bytes`,
    /// `pause_ms`, …).
    pub fn snapshot(&self, dir: &Path) -> Result<Value> {
        self.snapshot_with(dir, None, true)
    }

    /// A diff snapshot into `dir` on `parent`, the last snapshot this VM
    /// took; the guest runs on.
    pub fn snapshot_diff(&self, dir: &Path, parent: &Path) -> Result<Value> {
        self.snapshot_with(dir, Some(parent), true)
    }

    /// A snapshot, full or (with `parent`) diff; `resume: false` leaves the
    /// guest paused afterwards. Relative paths are made absolute here
    /// (smudge resolves them from its own working directory).
    pub fn snapshot_with(&self, dir: &Path, parent: Option<&Path>, resume: bool) -> Result<Value> {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        self.call(&Request::Snapshot(SnapshotRequest {
            parent: parent.map(abs),
            resume,
            ..SnapshotRequest::full(abs(dir))
        }))
    }

    /// Live-migrates the guest to `dest` (from [`TestVm::incoming`]) with
    /// smudge's defaults and returns the migration report. On success this
    /// VM's process has exited (code 0) and `dest` runs the guest with its
    /// API socket up.
    pub fn migrate_to(&self, dest: &TestVm) -> Result<Value> {
        self.migrate_to_with(dest, |m| m)
    }

    /// [`TestVm::migrate_to`] with the `migrate` request's other fields set
    /// by `options` (it gets the request with `to` filled in and every
    /// default), e.g. `|m| MigrateRequest { verify_memory: true, ..m }`.
    pub fn migrate_to_with(
        &self,
        dest: &TestVm,
        options: impl FnOnce(MigrateRequest) -> MigrateRequest,
    ) -> Result<Value> {
        let Some(to) = dest.migration_addr() else {
            return Err(HarnessError::Usage {
                vm: self.name.clone(),
                what: format!(
                    "cannot migrate to {}: it does not wait for a migration (use TestVm::incoming)",
                    dest.name
                ),
                logs: self.boxed_logs(),
            });
        };
        let report = self.call(&Request::Migrate(options(MigrateRequest::new(to))))?;
        // The source ends its run right after the destination said the guest
        // runs; the destination serves its API once it does.
        self.wait_until(self.boot_timeout, "the source to exit after the migration", || self.exit_status().map(drop))?;
        dest.wait_for_socket(dest.boot_timeout)?;
        Ok(report)
    }

    /// Reads `len` bytes of guest RAM at guest physical address `gpa` from
    /// the memory file (`MAP_SHARED`, so what the guest sees now). Below 3
    /// GiB the guest address is the file offset; RAM above continues at
    /// 4 GiB. The range must lie in one RAM region.
    pub fn read_memory(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let io =
            |what: String, source| HarnessError::Io { vm: self.name.clone(), what, source, logs: self.boxed_logs() };
        let f = std::fs::File::open(&self.mem).map_err(|e| io(format!("opening {}", self.mem.display()), e))?;
        let size = f.metadata().map_err(|e| io(format!("reading the size of {}", self.mem.display()), e))?.len();
        let end = gpa.checked_add(len as u64);
        let region = smudge::memory::ram_layout(size)
            .into_iter()
            .find(|r| gpa >= r.gpa && end.is_some_and(|e| e <= r.gpa + r.len));
        let Some(r) = region else {
            return Err(HarnessError::Usage {
                vm: self.name.clone(),
                what: format!("{len} bytes at guest address {gpa:#x} are not inside one RAM region of {size:#x} bytes"),
                logs: self.boxed_logs(),
            });
        };
        let mut buf = vec![0u8; len];
        let at = r.file_offset + (gpa - r.gpa);
        f.read_exact_at(&mut buf, at).map_err(|e| io(format!("reading {len} bytes at offset {at:#x}"), e))?;
        Ok(buf)
    }

    /// Waits for the process to end, at most `limit`, and returns its exit
    /// code, the whole serial output and smudge's stderr. The memory file
    /// stays until this `TestVm` is dropped.
    pub fn wait_exit(&self, limit: Duration) -> Result<Exit> {
        let s = self.wait_until(limit, "smudge to exit", || self.exit_status())?;
        self.join_reader(STDERR_DRAIN);
        Ok(Exit { code: s.code(), serial: self.serial(), stderr: self.stderr() })
    }

    /// Kills the process (SIGKILL) if it still runs and reaps it.
    pub fn kill(&self) {
        if self.exit_status().is_none() {
            let waited = {
                let mut child = lock(&self.child);
                let _ = child.kill();
                child.wait()
            };
            if let Ok(s) = waited {
                *lock(&self.status) = Some(s);
            }
        }
        self.join_reader(STDERR_DRAIN);
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.kill();
        // `scratch` is dropped after this: the directory goes once the
        // process no longer uses it.
    }
}
