//! Parallel page streams (`ctl migrate --connections N`, QEMU's multifd):
//! each round's pages are dealt out in 1 MiB pieces over the main
//! connection and `N - 1` extra ones, each with a thread of its own that
//! reads guest RAM, compresses and sends — and on the destination a thread
//! per connection that checks and writes its pages (disjoint, so the
//! writes need no lock).
//!
//! The main connection keeps the control frames. An extra connection
//! opens with `Channel {session, index}` (the session id from the main
//! `Hello`, so a stray connection is refused), then carries `Pages`/`Zero`
//! and a `RoundEnd` after its part of every round, and `Done` with its own
//! totals before the machine state goes out. The destination acknowledges
//! round n only once every connection delivered its n-th `RoundEnd`, and
//! adds every connection's totals to the main stream's before checking
//! `Done`.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smudge::memory::GuestRam;
use smudge::migration::frame::{Frame, FrameReader, Hello, MAX_FRAME_PAGES, PAGE};
use smudge::migration::receiver::{Receiver, Step};

use super::source::{MigrateError, Sender};
use super::transport::{Dialer, Listener, Stream};

/// Longest wait for the extra connections and for a round on all of them.
const CHANNEL_WAIT: Duration = Duration::from_secs(30);

/// Deals `pieces` (guest address, length) out to `n` groups in 1 MiB
/// pieces, round robin, so each connection gets about the same share.
pub fn split(pieces: &[(u64, u64)], n: usize) -> Vec<Vec<(u64, u64)>> {
    let chunk = u64::from(MAX_FRAME_PAGES) * PAGE;
    let mut groups = vec![Vec::new(); n.max(1)];
    let mut next = 0;
    for &(gpa, len) in pieces {
        let mut at = gpa;
        while at < gpa + len {
            let l = (gpa + len - at).min(chunk);
            groups[next].push((at, l));
            next = (next + 1) % groups.len();
            at += l;
        }
    }
    groups
}

/// A session id for the extra connections of one migration.
pub fn new_session() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (t as u64 ^ (u64::from(std::process::id()) << 32)) | 1
}

/// What a worker did for one job.
type Done = Result<(u64, u64, u64), MigrateError>;

enum Job {
    /// Send these pieces, then a `RoundEnd`.
    Round { pieces: Vec<(u64, u64)>, skip_zero: bool, round: u32 },
    /// Send `Done` with this connection's totals and end.
    Finish,
}

struct Worker {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Done>,
    handle: Option<JoinHandle<()>>,
}

/// The source's extra connections.
pub struct Workers {
    workers: Vec<Worker>,
    /// Data pages each extra connection sent.
    pub pages: Vec<u64>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").field("connections", &self.workers.len()).finish()
    }
}

impl Workers {
    /// Opens `extra` more connections through `dialer` for the migration of
    /// `session`, each with a sending thread reading `ram`.
    pub fn connect(
        dialer: &Dialer,
        session: u64,
        extra: u32,
        lz4: bool,
        limit: Option<u64>,
        ram: &GuestRam,
        mem_size: u64,
    ) -> Result<Workers, MigrateError> {
        let mut workers = Vec::new();
        for index in 1..=extra {
            let conn = dialer
                .dial(Duration::from_secs(30))
                .map_err(|e| MigrateError::Stream(format!("opening page connection {index}: {e}")))?;
            let mut s = Sender::new(conn, lz4, mem_size, limit);
            s.w.send(&Frame::Channel { session, index })
                .and_then(|_| s.w.flush())
                .map_err(|e| MigrateError::Stream(format!("page connection {index}: {e}")))?;
            let (jobs, job_rx) = mpsc::channel::<Job>();
            let (done_tx, done) = mpsc::channel::<Done>();
            let ram = ram.clone();
            let handle = std::thread::Builder::new()
                .name(format!("migrate-conn{index}"))
                .spawn(move || {
                    for job in job_rx {
                        let r = run_job(&mut s, &ram, job, index);
                        let finished = matches!(r, Ok(None)) || r.is_err();
                        let _ = done_tx.send(r.map(|d| d.unwrap_or((s.pages, s.zero_pages, s.w.bytes()))));
                        if finished {
                            break;
                        }
                    }
                })
                .map_err(|e| MigrateError::Stream(format!("spawning page connection {index}: {e}")))?;
            workers.push(Worker { jobs, done, handle: Some(handle) });
        }
        Ok(Workers { pages: vec![0; workers.len()], workers })
    }

    /// How many extra connections.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Hands `groups[i]` to extra connection `i` for `round`.
    pub fn start_round(&self, groups: Vec<Vec<(u64, u64)>>, skip_zero: bool, round: u32) -> Result<(), MigrateError> {
        for (w, pieces) in self.workers.iter().zip(groups) {
            w.jobs
                .send(Job::Round { pieces, skip_zero, round })
                .map_err(|_| MigrateError::Stream("a page connection's thread ended".into()))?;
        }
        Ok(())
    }

    /// Waits for every connection's part of the round: (data pages, zero
    /// pages, bytes) they sent in it, summed.
    pub fn wait_round(&mut self) -> Result<(u64, u64, u64), MigrateError> {
        let mut sum = (0, 0, 0);
        let mut first_err = None;
        for (i, w) in self.workers.iter().enumerate() {
            match w.done.recv() {
                Ok(Ok((p, z, b))) => {
                    sum = (sum.0 + p, sum.1 + z, sum.2 + b);
                    self.pages[i] += p;
                }
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(_) => {
                    first_err = first_err.or(Some(MigrateError::Stream("a page connection's thread ended".into())))
                }
            }
        }
        first_err.map_or(Ok(sum), Err)
    }

    /// Ends every extra connection with its totals (`Done`).
    pub fn finish(&mut self) -> Result<(), MigrateError> {
        for w in &self.workers {
            w.jobs.send(Job::Finish).map_err(|_| MigrateError::Stream("a page connection's thread ended".into()))?;
        }
        let mut first_err = None;
        for w in &mut self.workers {
            if let Ok(Err(e)) = w.done.recv() {
                first_err = first_err.or(Some(e));
            }
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Dropping the job senders ends the threads' loops.
        for w in self.workers.drain(..) {
            drop(w.jobs);
            if let Some(h) = w.handle {
                let _ = h.join();
            }
        }
    }
}

/// One job on one extra connection: the pages sent in it (a round), or
/// None once it ended (`Finish`).
fn run_job(s: &mut Sender, ram: &GuestRam, job: Job, index: u32) -> Result<Option<(u64, u64, u64)>, MigrateError> {
    let err = |e: std::io::Error| MigrateError::Stream(format!("page connection {index}: {e}"));
    match job {
        Job::Round { pieces, skip_zero, round } => {
            let (p, z, b) = (s.pages, s.zero_pages, s.w.bytes());
            let named = |e: MigrateError| match e {
                MigrateError::Stream(m) => MigrateError::Stream(format!("page connection {index}: {m}")),
                other => other,
            };
            for (gpa, len) in pieces {
                s.send_range(ram, gpa, len, skip_zero).map_err(named)?;
            }
            s.flush_zero().map_err(named)?;
            s.w.send(&Frame::RoundEnd { round, pages: s.pages - p }).map_err(err)?;
            s.w.flush().map_err(err)?;
            Ok(Some((s.pages - p, s.zero_pages - z, s.w.bytes() - b)))
        }
        Job::Finish => {
            s.w.send(&Frame::Done { pages: s.pages, zero_pages: s.zero_pages }).map_err(err)?;
            s.w.flush().map_err(err)?;
            Ok(None)
        }
    }
}

/// Why the destination's extra page connections failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Accepting a connection failed.
    #[error("accepting a page connection: {0}")]
    Accept(#[source] std::io::Error),
    /// Not every connection arrived in time.
    #[error("only {arrived} of {want} extra page connections arrived within {secs} s")]
    Missing {
        /// Connections that arrived.
        arrived: usize,
        /// Connections the `Hello` announced.
        want: usize,
        /// Seconds waited.
        secs: u64,
    },
    /// The memory file could not be opened for a connection.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A receiving thread could not be started.
    #[error("spawning a page connection's thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// A connection's stream failed (the first failure, with its index).
    #[error("{0}")]
    Failed(String),
    /// A round did not end on every connection in time.
    #[error("a round never ended on every page connection")]
    RoundTimeout,
    /// A receiving thread panicked.
    #[error("a page connection's thread panicked")]
    Panicked,
}

/// Accepts the `connections - 1` extra connections of the migration whose
/// `Hello` is `hello`, on `listener`: each must open with a `Channel`
/// frame naming its session and a fresh index; anything else is closed.
pub fn accept_channels(
    listener: &Listener,
    hello: &Hello,
) -> Result<Vec<FrameReader<BufReader<Stream>>>, ChannelError> {
    let want = hello.connections.saturating_sub(1) as usize;
    let mut got: Vec<Option<FrameReader<BufReader<Stream>>>> = (0..want).map(|_| None).collect();
    let t0 = Instant::now();
    while got.iter().any(Option::is_none) {
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && t0.elapsed() < CHANNEL_WAIT => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(ChannelError::Missing {
                    arrived: got.iter().filter(|g| g.is_some()).count(),
                    want,
                    secs: CHANNEL_WAIT.as_secs(),
                })
            }
            Err(e) => return Err(ChannelError::Accept(e)),
        };
        let conn = match listener.admit(conn, Duration::from_secs(60)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("a page connection was refused: {e}");
                continue;
            }
        };
        let mut r = FrameReader::new(BufReader::with_capacity(1 << 20, conn));
        match r.next_frame() {
            Ok(Frame::Channel { session, index })
                if session == hello.session
                    && (1..=want as u32).contains(&index)
                    && got[index as usize - 1].is_none() =>
            {
                got[index as usize - 1] = Some(r);
            }
            Ok(other) => tracing::warn!("a connection that is not this migration's ({:?}) was closed", other.kind()),
            Err(e) => tracing::warn!("a connection that is not this migration's was closed: {e}"),
        }
    }
    Ok(got.into_iter().flatten().collect())
}

/// Where the extra connections are, as the main stream waits for them.
#[derive(Default)]
struct Progress {
    /// `RoundEnd`s seen per connection.
    rounds: Vec<u64>,
    failed: Option<String>,
}

/// The destination's extra connections, each received by a thread.
pub struct Channels {
    shared: Arc<(Mutex<Progress>, Condvar)>,
    handles: Vec<JoinHandle<Result<(u64, u64), String>>>,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels").field("connections", &self.handles.len()).finish()
    }
}

impl Channels {
    /// Starts a receiving thread per connection, writing into `file`.
    pub fn start(
        readers: Vec<FrameReader<BufReader<Stream>>>,
        file: &File,
        path: &Path,
        hello: &Hello,
    ) -> Result<Channels, ChannelError> {
        let shared = Arc::new((Mutex::new(Progress { rounds: vec![0; readers.len()], failed: None }), Condvar::new()));
        let mut handles = Vec::new();
        for (i, mut reader) in readers.into_iter().enumerate() {
            let f = file.try_clone().map_err(|source| ChannelError::File { path: path.to_path_buf(), source })?;
            let mut rx = Receiver::channel(f, path, hello.clone());
            let shared = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("recv-conn{}", i + 1))
                .spawn(move || {
                    let r = (|| loop {
                        let f = reader.next_frame().map_err(|e| e.to_string())?;
                        match rx.apply(f).map_err(|e| e.to_string())? {
                            Step::Round { .. } => {
                                let (m, cv) = &*shared;
                                m.lock().unwrap_or_else(|p| p.into_inner()).rounds[i] += 1;
                                cv.notify_all();
                            }
                            Step::ChannelDone { pages, zero_pages } => return Ok((pages, zero_pages)),
                            _ => {}
                        }
                    })();
                    if let Err(e) = &r {
                        let (m, cv) = &*shared;
                        m.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .failed
                            .get_or_insert(format!("page connection {}: {e}", i + 1));
                        cv.notify_all();
                    }
                    r
                })
                .map_err(ChannelError::Spawn)?;
            handles.push(h);
        }
        Ok(Channels { shared, handles })
    }

    /// Waits until every connection delivered its `n`-th `RoundEnd`.
    pub fn wait_round(&self, n: u64) -> Result<(), ChannelError> {
        let (m, cv) = &*self.shared;
        let t0 = Instant::now();
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(e) = &g.failed {
                return Err(ChannelError::Failed(e.clone()));
            }
            if g.rounds.iter().all(|&r| r >= n) {
                return Ok(());
            }
            let left = CHANNEL_WAIT.checked_sub(t0.elapsed()).ok_or(ChannelError::RoundTimeout)?;
            g = cv.wait_timeout(g, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Waits for every connection's `Done`: their summed (data pages,
    /// zero pages).
    pub fn finish(self) -> Result<(u64, u64), ChannelError> {
        let mut sum = (0, 0);
        for h in self.handles {
            let (p, z) = h.join().map_err(|_| ChannelError::Panicked)?.map_err(ChannelError::Failed)?;
            sum = (sum.0 + p, sum.1 + z);
        }
        Ok(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_dealt_out_in_mib_chunks_round_robin() {
        let mib = 1 << 20;
        let groups = split(&[(0, 3 * mib + 4096), (16 * mib, 4096)], 3);
        assert_eq!(groups[0], vec![(0, mib), (3 * mib, 4096)]);
        assert_eq!(groups[1], vec![(mib, mib), (16 * mib, 4096)]);
        assert_eq!(groups[2], vec![(2 * mib, mib)]);
        let total: u64 = groups.iter().flatten().map(|p| p.1).sum();
        assert_eq!(total, 3 * mib + 2 * 4096);
        assert_eq!(split(&[(0, 4096)], 1), vec![vec![(0, 4096)]]);
    }
}
