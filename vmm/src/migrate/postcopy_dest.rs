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
//! When the source or the connection dies before every owed page is here
//! the guest cannot go on: the pages exist nowhere else. The destination
//! says so and exits [`EXIT_MEMORY_LOST`] at once — no vCPU is left hanging.

use std::io::{BufReader, Write};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use smudge::fill::{Answer, Feed, FillBehind, FillError, FillStats, Loaded, PageSource, Placer, TmpfsError, PAGE};
use smudge::memory::{GuestRam, RamRegion};
use smudge::migration::frame::{Ack, Frame, FrameError, FrameReader, FrameWriter};
use smudge::migration::postcopy::{Owed, Placement, PostcopyReceiver};
use smudge::migration::receiver::ReceiveError;
use smudge::uffd::UffdError;

use crate::migrate::transport::Stream as Conn;
use crate::vm::outcome::EXIT_MEMORY_LOST;

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

impl PostcopyDest {
    /// Registers all of guest RAM for missing-page faults; `owed` says
    /// which pages the source still sends.
    pub fn prepare(ram: &GuestRam, layout: &[RamRegion], owed: Owed) -> Result<Self, UffdError> {
        let pages = layout.iter().map(|r| r.file_offset + r.len).max().unwrap_or(0) / PAGE;
        Ok(PostcopyDest { armed: FillBehind::register(ram, layout)?, receiver: PostcopyReceiver::new(owed), pages })
    }

    /// Runs the phase on threads of its own: faults served, pages placed.
    /// When all are in, RAM is unregistered and the source told; if the
    /// stream breaks first, the process exits [`EXIT_MEMORY_LOST`].
    pub fn run(
        self,
        reader: FrameReader<BufReader<Conn>>,
        writer: FrameWriter<Conn>,
        peer: String,
        loading: Arc<AtomicBool>,
    ) {
        let source = StreamSource {
            peer,
            started_at: Instant::now(),
            receiver: self.receiver,
            requested: vec![0u64; self.pages.div_ceil(64) as usize],
            writer,
        };
        self.armed.start(source, Stream(reader), loading);
    }
}

/// The migration stream as the fill-behind engine's page source.
struct StreamSource {
    peer: String,
    started_at: Instant,
    receiver: PostcopyReceiver,
    /// One bit per page of RAM: asked of the source already.
    requested: Vec<u64>,
    writer: FrameWriter<Conn>,
}

/// The receive thread's feed: frames off the main connection.
struct Stream(FrameReader<BufReader<Conn>>);

impl Feed for Stream {
    type Item = Frame;
    type Error = PostcopyError;

    fn next(&mut self) -> Result<Frame, PostcopyError> {
        Ok(self.0.next_frame()?)
    }
}

impl PageSource for StreamSource {
    type Error = PostcopyError;
    type Feed = Stream;
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
        let w = &mut self.writer;
        w.send(&Frame::PageRequest(vec![(offset, 1)]))
            .and_then(|_| w.flush())
            .map_err(|source| FillError::Source(PostcopyError::Request { offset, source }))?;
        Ok(Answer::Requested)
    }

    fn load(&mut self, frame: Frame, place: &Placer<'_>) -> Result<Loaded, FillError<PostcopyError>> {
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
        let peer = &self.peer;
        let w = &mut self.writer;
        if let Err(e) = w.send(&Frame::Ack(Ack::ok())).and_then(|_| w.flush()) {
            tracing::warn!("post-copy from {peer}: cannot acknowledge the end: {e}");
        }
        let _ = writeln!(
            std::io::stderr(),
            "smudge: post-copy from {peer} done in {:.0} ms: {} pages owed, {} data + {} zero pages received, {} \
             asked for by the guest's faults, {} untouched zero pages filled",
            self.started_at.elapsed().as_secs_f64() * 1e3,
            stats.owed_at_start,
            self.receiver.pages(),
            self.receiver.zero_pages(),
            stats.requested,
            stats.zero_filled,
        );
    }
}
