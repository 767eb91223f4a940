//! The destination's post-copy phase: the guest runs here while the pages
//! the source still owes arrive, through the library's fill-behind engine
//! ([`smudge::fill`]) with the migration stream as its page source. Guest
//! RAM is registered with userfaultfd before a vCPU runs, so a first touch
//! of a page that is not here blocks that vCPU; the fault thread asks the
//! source for an owed page (`PageRequest`, once per page) or places a zero
//! page where nothing is owed (the source has zeros there), and the
//! receive thread places each arriving page with `UFFDIO_COPY`, which
//! wakes whoever waits for it. An owed page that turns out zero is only
//! taken off the debt (its waiters woken): its slot in the file is a hole.
//!
//! RAM must be shmem for this (userfaultfd's missing-page mode does not
//! work on disk files): the destination's memory file lives on tmpfs
//! (`/dev/shm`, see [`check_tmpfs`]) — its backing file is where the pages
//! land, nothing moves afterwards.
//!
//! When the link breaks after the switchover the guest goes on: vCPUs
//! that touch no missing page keep running, the ones that do wait in
//! their fault. The destination keeps what is still owed, listens again
//! where it listened (the same unix socket path) and waits for the source
//! to reconnect ([`Rejoin`]; `ctl migrate --resume` there): a source
//! naming another migration is refused. The one that comes back is told
//! what is still owed and which pages vCPUs wait for, and sends each of
//! them once. If none comes back within the recovery timeout — or the
//! migration cannot be recovered (no id, timeout 0) — the pages exist
//! nowhere else: the destination says so and exits [`EXIT_MEMORY_LOST`].

use std::io::{BufReader, Write};
use std::net::Shutdown;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use smudge::fill::{Answer, Feed, FillBehind, FillError, FillStats, Loaded, PageSource, Placer, TmpfsError, PAGE};
use smudge::memory::{GuestRam, RamRegion};
use smudge::migration::frame::{Ack, Frame, FrameError, FrameReader, FrameWriter};
use smudge::migration::postcopy::{Owed, Placement, PostcopyReceiver};
use smudge::migration::receiver::ReceiveError;
use smudge::uffd::UffdError;

use crate::control::signals;
use crate::migrate::transport::{Address, Listener, Stream as Conn};
use crate::vm::outcome::EXIT_MEMORY_LOST;

/// How long the destination waits for its source to resume a post-copy
/// migration whose link broke, unless told (`--postcopy-recover-timeout`).
pub const DEFAULT_RECOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Checks that the memory file at `path` (existing or to be created in its
/// directory) is on tmpfs, as post-copy needs.
pub fn check_tmpfs(path: &Path) -> Result<(), TmpfsError> {
    smudge::fill::check_tmpfs(path, "post-copy needs the destination's memory file")
}

/// Why the post-copy phase failed.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// The stream broke or a frame failed its checks.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A good frame that is not what post-copy expects.
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    /// A vCPU's page could not be asked for.
    #[error("asking the source for page {offset:#x}: {source}")]
    Request {
        /// File offset of the page.
        offset: u64,
        /// The connection's error.
        source: std::io::Error,
    },
    /// The link broke and no source resumed the migration in time.
    #[error("the link broke ({broke}) and no source resumed the migration on {listen} within {secs} s")]
    NotResumed {
        /// Why the link broke.
        broke: String,
        /// Where the destination waited.
        listen: Address,
        /// The recovery timeout.
        secs: u64,
    },
    /// A stop signal came while waiting for the source.
    #[error("the link broke ({broke}) and smudge was stopped by {signal} while waiting for the source to resume")]
    Stopped {
        /// Why the link broke.
        broke: String,
        /// The signal's name.
        signal: String,
    },
}

/// How a broken post-copy link is waited out: the listener the source
/// first came in on (its TLS with it), for which migration, how long.
#[derive(Debug)]
pub struct Rejoin {
    /// The destination's listener, kept open (port 0 resolved; the same
    /// unix socket path).
    pub listener: Listener,
    /// The migration's id from its `Hello`.
    pub migration: u64,
    /// The recovery timeout.
    pub within: Duration,
}

/// A post-copy phase set up before the vCPUs run.
pub struct PostcopyDest {
    armed: FillBehind,
    receiver: PostcopyReceiver,
    /// Pages of RAM (one "asked for" bit each).
    pages: u64,
}

impl std::fmt::Debug for PostcopyDest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyDest").field("owed", &self.receiver.owed().remaining()).finish()
    }
}

/// The phase as the control API's `stats` shows it (`postcopy`).
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryStatus {
    /// `postcopy-active` (pages arriving) or `postcopy-paused` (the link
    /// broke; waiting for the source to resume).
    pub state: &'static str,
    /// Pages still owed when the link broke (while paused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owed_pages: Option<u64>,
    /// Where it waits for the source (while paused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Times the source resumed the phase.
    pub resumes: u32,
}

/// This process's post-copy phase (a destination receives one guest).
static STATUS: Mutex<Option<RecoveryStatus>> = Mutex::new(None);

/// The post-copy phase's state while it lasts, for the control API.
pub fn recovery_status() -> Option<RecoveryStatus> {
    STATUS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn set_status(s: Option<RecoveryStatus>) {
    *STATUS.lock().unwrap_or_else(|p| p.into_inner()) = s;
}

impl PostcopyDest {
    /// Registers all of guest RAM for missing-page faults; `owed` says
    /// which pages the source still sends.
    pub fn prepare(ram: &GuestRam, layout: &[RamRegion], owed: Owed) -> Result<Self, UffdError> {
        let pages = layout.iter().map(|r| r.file_offset + r.len).max().unwrap_or(0) / PAGE;
        Ok(PostcopyDest { armed: FillBehind::register(ram, layout)?, receiver: PostcopyReceiver::new(owed), pages })
    }

    /// Runs the phase on threads of its own: faults served, pages placed.
    /// When all are in, RAM is unregistered and the source told. If the
    /// stream breaks first, the source is waited for as `rejoin` says;
    /// without it (or when none comes back) the process exits
    /// [`EXIT_MEMORY_LOST`].
    pub fn run(
        self,
        reader: FrameReader<BufReader<Conn>>,
        writer: FrameWriter<Conn>,
        peer: String,
        rejoin: Option<Rejoin>,
        loading: Arc<AtomicBool>,
    ) {
        set_status(Some(RecoveryStatus { state: "postcopy-active", owed_pages: None, listen: None, resumes: 0 }));
        let source = StreamSource {
            peer: peer.clone(),
            started_at: Instant::now(),
            receiver: self.receiver,
            requested: vec![0u64; self.pages.div_ceil(64) as usize],
            writer: Some(writer),
            recovers: rejoin.as_ref().map(|r| (r.listener.local().to_string(), r.within.as_secs())),
            resumes: 0,
        };
        self.armed.start(source, Link { reader: Some(reader), rejoin, broke: String::new(), peer }, loading);
    }
}

/// The migration stream as the fill-behind engine's page source.
struct StreamSource {
    peer: String,
    started_at: Instant,
    receiver: PostcopyReceiver,
    /// One bit per page of RAM: asked of the source already.
    requested: Vec<u64>,
    /// None while the link is broken.
    writer: Option<FrameWriter<Conn>>,
    /// Where and how long a broken link is waited out (None: it is not).
    recovers: Option<(String, u64)>,
    /// Times the source resumed.
    resumes: u32,
}

/// What the loader takes off the link.
enum Item {
    /// A frame off the connection.
    Frame(Frame),
    /// The connection broke (why).
    Broken(String),
    /// The source came back: the new connection's writing half, and who.
    Rejoined(FrameWriter<Conn>, String),
}

/// The receive thread's feed: frames off the connection; when it breaks,
/// the wait for the source to come back on a new one.
struct Link {
    /// None while broken.
    reader: Option<FrameReader<BufReader<Conn>>>,
    rejoin: Option<Rejoin>,
    /// Why the link broke last.
    broke: String,
    peer: String,
}

impl Feed for Link {
    type Item = Item;
    type Error = PostcopyError;

    fn next(&mut self) -> Result<Item, PostcopyError> {
        let Some(reader) = &mut self.reader else {
            let (reader, writer, peer) = self.wait_for_source()?;
            self.reader = Some(reader);
            self.peer = peer.clone();
            return Ok(Item::Rejoined(writer, peer));
        };
        match reader.next_frame() {
            Ok(f) => Ok(Item::Frame(f)),
            Err(e) if self.rejoin.is_none() => Err(e.into()),
            Err(e) => {
                self.broke = e.to_string();
                self.reader = None;
                Ok(Item::Broken(self.broke.clone()))
            }
        }
    }
}

impl Link {
    /// Listens where the first connection came in and takes the first
    /// source that names this migration, within the recovery timeout.
    #[allow(clippy::type_complexity)]
    fn wait_for_source(&mut self) -> Result<(FrameReader<BufReader<Conn>>, FrameWriter<Conn>, String), PostcopyError> {
        let broke = self.broke.clone();
        let Some(rejoin) = &self.rejoin else {
            return Err(PostcopyError::Frame(FrameError::Closed));
        };
        // (A source quick to come back may be queued already.)
        let listener = &rejoin.listener;
        let t0 = Instant::now();
        loop {
            if let Some(signal) = signals::requested_name() {
                return Err(PostcopyError::Stopped { broke, signal });
            }
            if t0.elapsed() >= rejoin.within {
                let (listen, secs) = (listener.local().clone(), rejoin.within.as_secs());
                return Err(PostcopyError::NotResumed { broke, listen, secs });
            }
            let (conn, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => {
                    tracing::warn!("post-copy recovery: accepting on {}: {e}", listener.local());
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            match admit(listener, conn, rejoin.migration) {
                Ok((r, w)) => return Ok((r, w, peer)),
                Err(why) => {
                    let _ = writeln!(std::io::stderr(), "smudge: post-copy recovery: refused {peer}: {why}");
                }
            }
        }
    }
}

/// A connection that says it resumes migration `migration`: TLS as the
/// listener requires, then its `Resume` frame; anything else is refused
/// (and told why, when it can be).
fn admit(
    listener: &Listener,
    conn: Conn,
    migration: u64,
) -> Result<(FrameReader<BufReader<Conn>>, FrameWriter<Conn>), String> {
    let conn = listener.admit(conn, super::incoming::HELLO_LIMIT).map_err(|e| e.to_string())?;
    let rd = conn.try_clone().map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(BufReader::with_capacity(1 << 20, rd));
    let mut writer = FrameWriter::new(conn, false);
    let why = match reader.next_frame() {
        Ok(Frame::Resume { migration: m }) if m == migration => {
            writer
                .get_mut()
                .set_timeouts(Some(super::incoming::IDLE_LIMIT), Some(super::incoming::HELLO_LIMIT))
                .map_err(|e| e.to_string())?;
            return Ok((reader, writer));
        }
        Ok(Frame::Resume { migration: m }) => {
            format!("it resumes migration {m:#x}; this destination waits for {migration:#x}")
        }
        Ok(other) => format!("it sent {:?}; a source resuming a post-copy migration sends Resume", other.kind()),
        Err(e) => return Err(e.to_string()),
    };
    let _ = writer.send(&Frame::Ack(Ack::refused(why.clone()))).and_then(|_| writer.flush());
    Err(why)
}

impl StreamSource {
    /// The link broke: nothing more can be asked until the source is back.
    fn broken(&mut self, why: &str) {
        self.writer = None;
        let owed = self.receiver.owed().remaining();
        let (listen, secs) = self.recovers.clone().unwrap_or_default();
        let _ = writeln!(
            std::io::stderr(),
            "smudge: post-copy from {}: the link broke ({why}); waiting for recovery: {owed} pages owed; vCPUs \
             touching them wait; the source may resume (`ctl migrate --resume`) on {listen} within {secs} s",
            self.peer
        );
        set_status(Some(RecoveryStatus {
            state: "postcopy-paused",
            owed_pages: Some(owed),
            listen: Some(listen),
            resumes: self.resumes,
        }));
    }

    /// The source came back on `writer`: tell it what is still owed
    /// (`Postcopy` frames, then an `Ack`), then which pages vCPUs wait for.
    fn rejoined(&mut self, mut writer: FrameWriter<Conn>, peer: String) {
        self.resumes += 1;
        self.peer = peer;
        let owed = self.receiver.resume();
        let waiting: Vec<(u64, u32)> = owed
            .iter()
            .flat_map(|&(off, n)| (0..u64::from(n)).map(move |p| off + p * PAGE))
            .filter(|&o| self.requested[(o / PAGE / 64) as usize] & (1 << ((o / PAGE) % 64)) != 0)
            .map(|o| (o, 1))
            .collect();
        let sent = writer
            .send(&Frame::Postcopy(owed))
            .and_then(|_| writer.send(&Frame::Ack(Ack::ok())))
            .and_then(|_| writer.send(&Frame::PageRequest(waiting.clone())))
            .and_then(|_| writer.flush());
        let _ = writeln!(
            std::io::stderr(),
            "smudge: post-copy resumed by {} (resume {}): {} pages owed, {} of them waited for by vCPUs",
            self.peer,
            self.resumes,
            self.receiver.owed().remaining(),
            waiting.len()
        );
        match sent {
            Ok(()) => self.writer = Some(writer),
            // The reader sees the break too, and the wait starts again.
            Err(e) => tracing::warn!("post-copy from {}: telling it what is owed: {e}", self.peer),
        }
        set_status(Some(RecoveryStatus {
            state: "postcopy-active",
            owed_pages: None,
            listen: None,
            resumes: self.resumes,
        }));
    }
}

impl PageSource for StreamSource {
    type Error = PostcopyError;
    type Feed = Link;
    const THREADS: (&'static str, &'static str) = ("postcopy-faults", "postcopy-recv");

    fn owed(&self) -> &Owed {
        self.receiver.owed()
    }

    fn fault(&mut self, offset: u64, _place: &Placer<'_>) -> Result<Answer, FillError<PostcopyError>> {
        let (word, bit) = ((offset / PAGE / 64) as usize, (offset / PAGE) % 64);
        if self.requested[word] & (1 << bit) != 0 {
            return Ok(Answer::Pending);
        }
        self.requested[word] |= 1 << bit;
        // While the link is broken the page is asked for when the source
        // is back.
        let Some(w) = &mut self.writer else { return Ok(Answer::Requested) };
        if let Err(source) = w.send(&Frame::PageRequest(vec![(offset, 1)])).and_then(|_| w.flush()) {
            if self.recovers.is_none() {
                return Err(FillError::Source(PostcopyError::Request { offset, source }));
            }
            // The reader is told by the same break.
            let _ = w.get_mut().shutdown(Shutdown::Both);
            self.writer = None;
        }
        Ok(Answer::Requested)
    }

    fn load(&mut self, item: Item, place: &Placer<'_>) -> Result<Loaded, FillError<PostcopyError>> {
        let frame = match item {
            Item::Frame(f) => f,
            Item::Broken(why) => {
                self.broken(&why);
                return Ok(Loaded::Pages(0));
            }
            Item::Rejoined(writer, peer) => {
                self.rejoined(writer, peer);
                return Ok(Loaded::Pages(0));
            }
        };
        match self.receiver.apply(frame).map_err(|e| FillError::Source(e.into()))? {
            Placement::Pages { offset, data } => {
                place.pages(offset, &data)?;
                Ok(Loaded::Pages(data.len() as u64 / PAGE))
            }
            Placement::Zero(runs) => {
                // An owed page's slot in the file is a hole (a new file, or
                // punched at the switchover): it reads zero already. Nothing
                // is placed — the guest's first touch gets a zero page from
                // the fault thread, and an untouched one costs nothing.
                for &(offset, count) in &runs {
                    place.holes(offset, u64::from(count) * PAGE)?;
                }
                Ok(Loaded::Pages(runs.iter().map(|&(_, n)| u64::from(n)).sum()))
            }
            Placement::Done => Ok(Loaded::Done),
        }
    }

    fn lost(&self, why: &FillError<PostcopyError>) -> ! {
        let _ = writeln!(
            std::io::stderr(),
            "smudge: post-copy from {} failed after the switchover: {why}; {} pages of the guest's memory were \
             still on the source and exist nowhere else: the guest cannot continue (the source keeps it paused \
             at the switchover point)",
            self.peer,
            self.receiver.owed().remaining()
        );
        std::process::exit(i32::from(EXIT_MEMORY_LOST));
    }

    fn filled(&mut self, stats: &FillStats) {
        set_status(None);
        let peer = &self.peer;
        if let Some(w) = &mut self.writer {
            if let Err(e) = w.send(&Frame::Ack(Ack::ok())).and_then(|_| w.flush()) {
                tracing::warn!("post-copy from {peer}: cannot acknowledge the end: {e}");
            }
        }
        let resumed = match self.resumes {
            0 => String::new(),
            n => format!("; the source resumed {n} time(s) after the link broke"),
        };
        let _ = writeln!(
            std::io::stderr(),
            "smudge: post-copy from {peer} done in {:.0} ms: {} pages owed, {} data + {} zero pages received, {} \
             asked for by the guest's faults, {} untouched zero pages filled{resumed}",
            self.started_at.elapsed().as_secs_f64() * 1e3,
            stats.owed_at_start,
            self.receiver.pages(),
            self.receiver.zero_pages(),
            stats.requested,
            stats.zero_filled,
        );
    }
}
