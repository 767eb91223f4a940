//! The control API: one JSON request per connection on a unix socket
//! (`smudge run --api-sock PATH`, created 0600), answered by the event loop.
//! `smudge ctl` is its client.
//!
//! ```text
//! client -> {"cmd": "stats"}\n
//! server <- {"ok": true, ...}\n            or  {"ok": false, "error": "..."}\n
//! ```
//!
//! Commands: `stats` (harvest and writeback counters), `sync` (every dirty
//! page written back, then fdatasync), `pause` / `resume` (the vCPUs),
//! `snapshot`, `stop` (end the run; exit code 0). A malformed request gets
//! an error answer, never a dropped connection.
//!
//! Each connection is served on a thread of its own, so a long request (a
//! snapshot) never holds up the event loop or a `stats`. Long requests run
//! one at a time: a second one while another runs gets a "busy" error.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use smudge::control::{parse_request, Request};
use smudge::harvest::Harvester;

use crate::flusher::Flusher;
use crate::migrate::source::{MigrateOptions, MigrationSource, DEFAULT_DOWNTIME, DEFAULT_MAX_ROUNDS};
use crate::outcome::Outcome;
use crate::snapshotter::{Snapshotter, VcpuControl};

/// Longest request accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Something that is not a socket is in the way.
    #[error("{0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Another smudge is listening there.
    #[error("{0}: another process is listening on this socket")]
    InUse(PathBuf),
    /// bind/chmod failed.
    #[error("{path}: cannot create the API socket")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Binds `path` (a stale socket left by a dead smudge is replaced).
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let err = |source| ApiError::Bind { path: path.to_path_buf(), source };
    // Bind and listen under a temporary name, then rename: the socket
    // appears only once it accepts connections, already mode 0600.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// Connections served at once; more get a "busy" answer at once.
const MAX_CONNECTIONS: usize = 16;

/// The listening socket and the connections being served.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    api: Arc<Api>,
    conns: Vec<std::thread::JoinHandle<()>>,
}

/// What the API acts on.
#[derive(Debug)]
pub struct Api {
    vcpus: VcpuControl,
    harvester: Option<Arc<Mutex<Harvester>>>,
    flusher: Option<Arc<Mutex<Flusher>>>,
    snapshotter: Option<Arc<Mutex<Snapshotter>>>,
    migration: Option<MigrationSource>,
    /// The long request running now (held while it runs).
    job: Mutex<()>,
    /// What it is, for `stats` and "busy" answers.
    job_name: Mutex<Option<String>>,
    /// How far it got (a migration's rounds), for `stats`.
    progress: Mutex<Option<Value>>,
}

impl ApiServer {
    /// A server on `listener` (bound at `path`).
    pub fn new(
        listener: UnixListener,
        path: PathBuf,
        vcpus: VcpuControl,
        harvester: Option<Arc<Mutex<Harvester>>>,
        flusher: Option<Arc<Mutex<Flusher>>>,
        snapshotter: Option<Arc<Mutex<Snapshotter>>>,
        migration: Option<MigrationSource>,
    ) -> Self {
        let api = Api {
            vcpus,
            harvester,
            flusher,
            snapshotter,
            migration,
            job: Mutex::new(()),
            job_name: Mutex::new(None),
            progress: Mutex::new(None),
        };
        ApiServer { listener, path, api: Arc::new(api), conns: Vec::new() }
    }

    /// The listening socket (for the event loop).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Accepts every pending connection and serves each on its own thread.
    pub fn on_readable(&mut self) {
        self.conns.retain(|t| !t.is_finished());
        while let Ok((conn, _)) = self.listener.accept() {
            if self.conns.len() >= MAX_CONNECTIONS {
                let busy = error(format!("busy: {MAX_CONNECTIONS} requests are being served; try again"));
                if let Err(e) = answer(&conn, &busy) {
                    tracing::warn!("control API connection: {e}");
                }
                continue;
            }
            let api = self.api.clone();
            let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
                if let Err(e) = api.serve(conn) {
                    tracing::warn!("control API connection: {e}");
                }
            });
            match spawned {
                Ok(t) => self.conns.push(t),
                Err(e) => tracing::warn!("control API: cannot spawn a connection thread: {e}"),
            }
        }
    }
}

fn answer(conn: &UnixStream, v: &Value) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut out = serde_json::to_vec(v).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    (&mut &*conn).write_all(&out)
}

impl Api {
    fn serve(&self, conn: UnixStream) -> std::io::Result<()> {
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut line = String::new();
        let mut reader = BufReader::new((&conn).take(MAX_REQUEST));
        let v = match reader.read_line(&mut line) {
            Ok(_) => self.dispatch(&line),
            Err(e) => error(format!("cannot read the request: {e}")),
        };
        answer(&conn, &v)
    }

    /// Runs `f` as the one long request of the moment, or answers "busy".
    fn job(&self, name: String, f: impl FnOnce() -> Value) -> Value {
        let _running = match self.job.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                let now = self.job_name.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default();
                return error(format!("busy: {now} is in progress; try again when it is done"));
            }
        };
        *self.job_name.lock().unwrap_or_else(|p| p.into_inner()) = Some(name);
        let v = f();
        *self.job_name.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = None;
        v
    }

    /// Answers one request line.
    pub fn dispatch(&self, line: &str) -> Value {
        let req = match parse_request(line) {
            Ok(r) => r,
            Err(e) => return error(e),
        };
        match req {
            Request::Stats => self.stats(),
            Request::Sync => self.sync(),
            Request::Pause => self.pause(),
            Request::Resume => {
                self.vcpus.resume();
                json!({"ok": true, "paused": false})
            }
            Request::Snapshot { dir, parent, resume, live_pause_ms } => self
                .job(format!("a snapshot into {}", dir.display()), || {
                    self.snapshot(&dir, parent.as_deref(), resume, live_pause_ms.map(Duration::from_millis))
                }),
            Request::Migrate(m) => {
                let opts = MigrateOptions {
                    to: m.to,
                    downtime: m.downtime_ms.map_or(DEFAULT_DOWNTIME, Duration::from_millis),
                    max_rounds: m.max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS),
                    bandwidth: m.bandwidth_limit,
                    lz4: m.lz4,
                    auto_converge: m.auto_converge,
                    verify_memory: m.verify_memory,
                    local: m.local,
                    postcopy_after: m.postcopy_after,
                    connections: m.connections,
                };
                self.job(format!("a migration to {}", opts.to), || self.migrate(&opts))
            }
            Request::DirtyRate { seconds } => {
                self.job(format!("a {seconds} s dirty-rate measurement"), || self.dirty_rate(seconds))
            }
            Request::Stop => {
                self.vcpus.shared.finish(Outcome::Stopped);
                json!({"ok": true, "stopping": true})
            }
        }
    }

    fn stats(&self) -> Value {
        let job = self.job_name.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let progress = self.progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut v = json!({"ok": true, "paused": self.vcpus.shared.is_paused(), "job": job, "progress": progress});
        if let Some(h) = &self.harvester {
            let h = h.lock().unwrap_or_else(|p| p.into_inner());
            let s = h.stats();
            v["dirty_log"] = json!({
                "mechanism": h.mechanism().to_string(),
                "harvests": s.harvests,
                "guest_pages": s.guest_pages,
                "vmm_pages": s.vmm_pages,
                "harvest_us_avg": s.harvest_time.as_secs_f64() * 1e6 / s.harvests.max(1) as f64,
                "ring_full_exits": s.ring_full_exits,
            });
        }
        if let Some(f) = &self.flusher {
            let w = f.lock().unwrap_or_else(|p| p.into_inner()).stats();
            v["writeback"] = json!({
                "nr_dirty": w.nr_dirty,
                "nr_writeback": w.nr_writeback,
                "nr_dirtied": w.nr_dirtied,
                "nr_written": w.nr_written,
                "bytes_written": w.bytes_written,
                "oldest_dirty_ms": w.oldest_dirty_ms,
                "syncs": w.syncs,
                "write_errors": w.write_errors,
                "throttle_ms": self.vcpus.shared.throttled_ns.load(Ordering::Relaxed) / 1_000_000,
            });
        }
        v
    }

    fn sync(&self) -> Value {
        let Some(f) = &self.flusher else {
            return error("writeback is off (--no-writeback or --no-dirty-log)".into());
        };
        let t0 = Instant::now();
        match f.lock().unwrap_or_else(|p| p.into_inner()).sync_now() {
            Ok(pages) => json!({"ok": true, "pages_written": pages, "ms": t0.elapsed().as_secs_f64() * 1e3}),
            Err(e) => error(format!("{e:#}")),
        }
    }

    fn snapshot(&self, dir: &Path, parent: Option<&Path>, resume: bool, live: Option<Duration>) -> Value {
        let Some(snap) = &self.snapshotter else {
            return error("this VM cannot be snapshotted (no memory file)".into());
        };
        if let Some(busy) = self.memory_loading() {
            return busy;
        }
        let progress = |p: &crate::snapshotter::LiveProgress| {
            *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = serde_json::to_value(p).ok();
        };
        let mut snap = snap.lock().unwrap_or_else(|p| p.into_inner());
        let taken = match live {
            Some(budget) => snap.take_live(dir, budget, resume, &progress),
            None => snap.take(dir, parent, resume),
        };
        match taken {
            Ok(t) => json!({
                "ok": true,
                "id": t.manifest.id,
                "kind": t.manifest.kind,
                "dir": t.dir,
                "memory_bytes": t.memory_bytes,
                "pause_ms": t.pause.as_secs_f64() * 1e3,
                "pause_copied_bytes": t.pause_copied_bytes,
                "checksum_read_bytes": t.checksum_read_bytes,
                "live": live.is_some(),
                "resumed": resume,
            }),
            Err(e) => error(e),
        }
    }

    /// A refusal while guest RAM is still filling in behind the guest.
    fn memory_loading(&self) -> Option<Value> {
        self.vcpus.shared.memory_loading.load(std::sync::atomic::Ordering::Acquire).then(|| {
            error(
                "busy: the guest's memory is still loading (post-copy or lazy restore); its memory file is not \
                 complete yet — try again when it is done"
                    .into(),
            )
        })
    }

    fn migrate(&self, opts: &MigrateOptions) -> Value {
        let Some(m) = &self.migration else {
            return error("this VM cannot be migrated: it needs dirty logging and a memory file".into());
        };
        if let Some(busy) = self.memory_loading() {
            return busy;
        }
        let progress = |p: &crate::migrate::source::Progress| {
            *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = serde_json::to_value(p).ok();
        };
        match m.migrate(opts, &progress) {
            Ok(r) => {
                let mut v = serde_json::to_value(&r).unwrap_or_default();
                v["ok"] = json!(true);
                let mut err = std::io::stderr().lock();
                for line in crate::ctl_view::migration_report(&v).lines() {
                    let _ = writeln!(err, "smudge: {line}");
                }
                drop(err);
                self.vcpus.shared.finish(Outcome::Migrated(r.to.clone()));
                v
            }
            Err(e @ crate::migrate::source::MigrateError::Postcopy(_)) => {
                let m = format!(
                    "migration to {} failed: {e}; the guest ran on the destination since the switchover and \
                     cannot continue there. It stays paused here at the switchover point: `ctl resume` continues \
                     it from there (what ran on the destination is lost), `ctl snapshot create` saves it",
                    opts.to
                );
                tracing::error!("{m}");
                error(m)
            }
            Err(e) => {
                tracing::warn!("migration to {} failed; the guest runs on here: {e}", opts.to);
                error(format!("migration to {} failed; the guest runs on here: {e}", opts.to))
            }
        }
    }

    fn dirty_rate(&self, secs: f64) -> Value {
        let Some(h) = &self.harvester else {
            return error("dirty logging is off (--no-dirty-log): nothing to measure with".into());
        };
        match crate::dirty_rate::measure(h, Duration::from_secs_f64(secs), smudge::memory::host_page_size()) {
            Ok(r) => {
                let mut v = serde_json::to_value(&r).unwrap_or_default();
                v["ok"] = json!(true);
                v
            }
            Err(e) => error(format!("dirty-rate: {e}")),
        }
    }

    fn pause(&self) -> Value {
        let t0 = Instant::now();
        match self.vcpus.pause() {
            Ok(n) => json!({"ok": true, "paused": true, "vcpus": n, "ms": t0.elapsed().as_secs_f64() * 1e3}),
            Err(e) => error(e),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // Requests in flight finish (each has its own time limits) before
        // the VM they act on is torn down.
        for t in self.conns.drain(..) {
            if t.join().is_err() {
                tracing::error!("a control API connection thread panicked");
            }
        }
    }
}

fn error(msg: String) -> Value {
    json!({"ok": false, "error": msg})
}

/// The client: sends `request` to the socket at `path`, returns the answer.
pub fn call(path: &Path, request: &Value) -> anyhow::Result<Value> {
    use anyhow::Context;
    let mut s = UnixStream::connect(path).with_context(|| format!("connecting to {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    serde_json::from_str(answer.trim()).with_context(|| format!("bad answer from smudge: '{}'", answer.trim()))
}
