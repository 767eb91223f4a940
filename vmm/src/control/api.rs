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
//! Requests are the types of `smudge::control`: a key a command does not
//! take, a wrong type or a missing field is refused, naming the key, before
//! anything is done.
//!
//! Each connection is served on a thread of its own, so a long request (a
//! snapshot) never holds up the event loop or a `stats`. Long requests run
//! one at a time: a second one while another runs gets a "busy" error.
//!
//! Connections are counted in two pools, so idle ones cannot hold the API:
//!
//! ```text
//! accept ──▶ waiting for its request line ──▶ serving (its line read)
//!            at most MAX_WAITING (more: busy,    at most MAX_SERVING
//!            answered at accept); each for at    (more: busy)
//!            most REQUEST_DEADLINE (then: "no
//!            request line within …")
//! ```
//!
//! A connection that sends nothing holds only a waiting place, for at most
//! [`REQUEST_DEADLINE`], and never a serving one. A "busy" answer is given
//! after reading what the client sent (at accept: what is there already),
//! and the client (`smudge::control::Client`) reads the answer even when
//! its own write failed because the server had closed first.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use smudge::control::{parse_request, Request, SnapshotRequest};
use smudge::harvest::Harvester;

use crate::migrate::source::{MigrateOptions, MigrationSource, DEFAULT_DOWNTIME, DEFAULT_MAX_ROUNDS};
use crate::migrate::tls::TlsClient;
use crate::persist::flusher::Flusher;
use crate::persist::snapshotter::Snapshotter;
use crate::vm::outcome::Outcome;
use crate::vm::vcpu_control::VcpuControl;

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

/// Requests served at once (their line read); more get a "busy" answer.
pub const MAX_SERVING: usize = 16;
/// Connections waiting for their request line; more get a "busy" answer
/// at accept.
pub const MAX_WAITING: usize = 64;
/// How long a client has from connecting to send its whole request line: a
/// client writes it at once; this only ends connections that send nothing.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// The listening socket and the connections being served.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    api: Arc<Api>,
    /// Each connection's thread, with the connection (to end a wait for a
    /// request line when the server goes).
    conns: Vec<(std::thread::JoinHandle<()>, Option<UnixStream>)>,
}

/// One place in a pool of connections, given back when dropped.
#[derive(Debug)]
struct Place(Arc<AtomicUsize>);

impl Place {
    /// A place in `pool` if fewer than `max` are taken.
    fn take(pool: &Arc<AtomicUsize>, max: usize) -> Option<Place> {
        pool.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Place(pool.clone()))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the API acts on.
#[derive(Debug)]
pub struct Api {
    vcpus: VcpuControl,
    harvester: Option<Arc<Mutex<Harvester>>>,
    flusher: Option<Arc<Mutex<Flusher>>>,
    snapshotter: Option<Arc<Mutex<Snapshotter>>>,
    migration: Option<MigrationSource>,
    /// The durable mode's epoch counters (`--journal`).
    journal: Option<Arc<crate::persist::epoch::EpochStats>>,
    /// The long request running now (held while it runs).
    job: Mutex<()>,
    /// What it is, for `stats` and "busy" answers.
    job_name: Mutex<Option<String>>,
    /// How far it got (a migration's rounds), for `stats`.
    progress: Mutex<Option<Value>>,
    /// Connections waiting for their request line.
    waiting: Arc<AtomicUsize>,
    /// Requests being served.
    serving: Arc<AtomicUsize>,
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
            journal: None,
            job: Mutex::new(()),
            job_name: Mutex::new(None),
            progress: Mutex::new(None),
            waiting: Arc::new(AtomicUsize::new(0)),
            serving: Arc::new(AtomicUsize::new(0)),
        };
        ApiServer { listener, path, api: Arc::new(api), conns: Vec::new() }
    }

    /// Shows the durable mode's epoch counters in `stats` (before the
    /// first connection).
    pub fn with_journal(mut self, stats: Option<Arc<crate::persist::epoch::EpochStats>>) -> Self {
        if let Some(api) = Arc::get_mut(&mut self.api) {
            api.journal = stats;
        }
        self
    }

    /// The listening socket (for the event loop).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Accepts every pending connection and serves each on its own thread.
    pub fn on_readable(&mut self) {
        self.conns.retain(|(t, _)| !t.is_finished());
        while let Ok((conn, _)) = self.listener.accept() {
            let Some(waiting) = Place::take(&self.api.waiting, MAX_WAITING) else {
                turn_away(&conn, &busy(&format!("{MAX_WAITING} connections are waiting to send their request")));
                continue;
            };
            let api = self.api.clone();
            let held = conn.try_clone().ok();
            let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
                if let Err(e) = api.serve(conn, waiting) {
                    tracing::warn!("control API connection: {e}");
                }
            });
            match spawned {
                Ok(t) => self.conns.push((t, held)),
                Err(e) => tracing::warn!("control API: cannot spawn a connection thread: {e}"),
            }
        }
    }
}

fn busy(why: &str) -> Value {
    error(format!("busy: {why}; try again"))
}

/// Answers `v` on the event loop without waiting on the client: reads what
/// it already sent (so closing does not reset the connection under it),
/// answers, closes. A client that writes after this gets EPIPE and reads
/// the answer all the same (`smudge::control::exchange`).
fn turn_away(conn: &UnixStream, v: &Value) {
    if conn.set_nonblocking(true).is_err() {
        return;
    }
    let mut sent = [0u8; 4096];
    let mut drained = 0u64;
    while drained < MAX_REQUEST {
        match (&mut &*conn).read(&mut sent) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n as u64,
        }
    }
    let mut out = serde_json::to_vec(v).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    // A few hundred bytes into an empty socket buffer: never short.
    if let Err(e) = (&mut &*conn).write_all(&out) {
        tracing::debug!("control API: a busy answer was not taken: {e}");
    }
    let _ = conn.shutdown(Shutdown::Both);
}

fn answer(conn: &UnixStream, v: &Value) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut out = serde_json::to_vec(v).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    match (&mut &*conn).write_all(&out) {
        // The client went without waiting for its answer.
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// Why no request line was read (the answer's message).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// Nothing, or no whole line, within the deadline.
    #[error("no request line within {0:?} of connecting")]
    Late(Duration),
    /// The client closed (or the server went) before sending anything.
    #[error("no request: the connection was closed (or smudge stopped) before one came")]
    Closed,
    /// The socket failed.
    #[error("cannot read the request: {0}")]
    Read(std::io::Error),
    /// The line is not text.
    #[error("cannot read the request: it is not UTF-8")]
    NotUtf8,
}

/// Reads one request line: up to its newline, the end of the stream or
/// [`MAX_REQUEST`] bytes, whichever comes first, all within `deadline` of
/// the call.
fn read_request(conn: &UnixStream, deadline: Duration) -> Result<String, RequestError> {
    let end = Instant::now() + deadline;
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    while !line.contains(&b'\n') && (line.len() as u64) < MAX_REQUEST {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RequestError::Late(deadline));
        }
        conn.set_read_timeout(Some(left)).map_err(RequestError::Read)?;
        match (&mut &*conn).read(&mut chunk) {
            Ok(0) if line.is_empty() => return Err(RequestError::Closed),
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(RequestError::Late(deadline))
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(RequestError::Read(e)),
        }
    }
    line.truncate(MAX_REQUEST as usize);
    if let Some(n) = line.iter().position(|&b| b == b'\n') {
        line.truncate(n + 1);
    }
    String::from_utf8(line).map_err(|_| RequestError::NotUtf8)
}

impl Api {
    fn serve(&self, conn: UnixStream, waiting: Place) -> std::io::Result<()> {
        conn.set_nonblocking(false)?;
        let line = read_request(&conn, REQUEST_DEADLINE);
        drop(waiting);
        let v = match line {
            Err(e) => error(e.to_string()),
            Ok(line) => match Place::take(&self.serving, MAX_SERVING) {
                None => busy(&format!("{MAX_SERVING} requests are being served")),
                // The place is given back before the answer goes out: a
                // client that has its answer holds none.
                Some(_serving) => self.dispatch(&line),
            },
        };
        let answered = answer(&conn, &v);
        // The server keeps a clone of the connection (see `Drop`): close it
        // for both ends now, so a client reading to the end sees it.
        let _ = conn.shutdown(Shutdown::Both);
        answered
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
            Err(e) => return error(e.to_string()),
        };
        match req {
            Request::Stats => self.stats(),
            Request::Sync => self.sync(),
            Request::Pause => self.pause(),
            Request::Resume => {
                self.vcpus.resume();
                json!({"ok": true, "paused": false})
            }
            Request::Snapshot(s) => self.job(format!("a snapshot into {}", s.dir.display()), || self.snapshot(&s)),
            Request::Migrate(m) => {
                let tls = match (m.tls_creds.as_deref(), m.tls_psk.as_deref()) {
                    (Some(dir), _) => TlsClient::load(dir).map(Some).map_err(|e| format!("\"tls_creds\": {e}")),
                    (_, Some(file)) => TlsClient::psk(file, m.tls_psk_identity.as_deref())
                        .map(Some)
                        .map_err(|e| format!("\"tls_psk\": {e}")),
                    (None, None) => Ok(None),
                };
                let tls = match tls {
                    Ok(t) => t,
                    Err(e) => return error(e),
                };
                let opts = MigrateOptions {
                    to: m.to,
                    downtime: m.downtime_ms.map_or(DEFAULT_DOWNTIME, Duration::from_millis),
                    max_rounds: m.max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS),
                    bandwidth: m.bandwidth_limit,
                    lz4: m.compress == smudge::control::Compression::Lz4,
                    auto_converge: m.auto_converge,
                    verify_memory: m.verify_memory,
                    local: m.local,
                    postcopy_after: m.postcopy_after,
                    connections: m.connections,
                    tls,
                    resume: m.resume,
                };
                self.job(format!("a migration to {}", opts.to), || self.migrate(&opts))
            }
            Request::DirtyRate(d) => {
                self.job(format!("a {} s dirty-rate measurement", d.seconds), || self.dirty_rate(d.seconds))
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
                "nr_hot": w.nr_hot,
                "hot_written": w.hot_written,
                "throttle_ms": self.vcpus.shared.throttled_ns.load(Ordering::Relaxed) / 1_000_000,
            });
        }
        if let Some(j) = &self.journal {
            v["journal"] = j.json();
        }
        if let Some(p) = self.migration.as_ref().and_then(|m| m.paused_postcopy()) {
            v["migration"] = p;
        }
        if let Some(p) = crate::migrate::postcopy_dest::recovery_status() {
            v["postcopy"] = serde_json::to_value(p).unwrap_or_default();
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

    fn snapshot(&self, req: &SnapshotRequest) -> Value {
        let (dir, parent, resume, live) = (&req.dir, req.parent.as_deref(), req.resume, req.live_pause());
        let Some(snap) = &self.snapshotter else {
            return error("this VM cannot be snapshotted (no memory file)".into());
        };
        if let Some(busy) = self.memory_loading() {
            return busy;
        }
        let progress = |p: &crate::persist::snapshotter::LiveProgress| {
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
            Err(e) => error(e.to_string()),
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
                for line in crate::control::ctl_view::migration_report(&v).lines() {
                    let _ = writeln!(err, "smudge: {line}");
                }
                drop(err);
                self.vcpus.shared.finish(Outcome::Migrated(r.to.clone()));
                v
            }
            Err(e @ crate::migrate::source::MigrateError::Postcopy(_)) => {
                let to = m.recovery.paused_to().unwrap_or_else(|| opts.to.clone());
                let msg = format!(
                    "migration to {to} failed: {e}; the guest runs on the destination since the switchover and \
                     waits there for its pages. It stays paused here at the switchover point (postcopy-paused): \
                     `ctl migrate --resume [--to ADDR]` reconnects and sends what is still owed; `ctl resume` \
                     continues it here instead (what ran on the destination is lost)"
                );
                tracing::error!("{msg}");
                let mut v = error(msg);
                v["state"] = json!("postcopy-paused");
                v
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
        match crate::observe::dirty_rate::measure(h, Duration::from_secs_f64(secs), smudge::memory::host_page_size()) {
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
            Err(e) => error(e.to_string()),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // A connection still waiting for its request line is ended (it
        // reads the end of the stream and is answered so); requests in
        // flight finish (each has its own time limits) before the VM they
        // act on is torn down.
        for (t, conn) in self.conns.drain(..) {
            if let Some(c) = conn.filter(|_| !t.is_finished()) {
                let _ = c.shutdown(Shutdown::Read);
            }
            if t.join().is_err() {
                tracing::error!("a control API connection thread panicked");
            }
        }
    }
}

fn error(msg: String) -> Value {
    json!({"ok": false, "error": msg})
}

/// How long `smudge ctl` waits, in seconds, for a socket that does not
/// exist yet or refuses connections (a `smudge run` still starting). The
/// client is `smudge::control::Client`.
pub const CTL_WAIT_SECS: u64 = 5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_line_is_read_within_its_deadline() {
        let (client, server) = UnixStream::pair().unwrap();
        (&client).write_all(b"{\"cmd\":\"stats\"}\nmore").unwrap();
        assert_eq!(read_request(&server, Duration::from_secs(30)).unwrap(), "{\"cmd\":\"stats\"}\n");
        // Nothing sent: refused once the deadline passes, saying so.
        let (_client, server) = UnixStream::pair().unwrap();
        assert_eq!(
            read_request(&server, Duration::from_millis(50)).unwrap_err().to_string(),
            "no request line within 50ms of connecting"
        );
        // Closed without a request.
        let (client, server) = UnixStream::pair().unwrap();
        drop(client);
        assert!(matches!(read_request(&server, Duration::from_secs(30)), Err(RequestError::Closed)));
    }

    #[test]
    fn places_are_counted_and_given_back() {
        let pool = Arc::new(AtomicUsize::new(0));
        let a = Place::take(&pool, 2).unwrap();
        let _b = Place::take(&pool, 2).unwrap();
        assert!(Place::take(&pool, 2).is_none());
        drop(a);
        assert!(Place::take(&pool, 2).is_some());
        assert_eq!(pool.load(Ordering::Acquire), 1);
    }
}
