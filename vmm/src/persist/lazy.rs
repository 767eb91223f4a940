//! A restore whose guest starts as soon as KVM is set up while its memory
//! fills in behind it (`smudge restore`, RAM in shared memory, see
//! [`crate::persist::restore`]; `smudge restore --lazy`, RAM in a tmpfs
//! file), through the library's fill-behind
//! engine ([`smudge::fill`]) with the snapshot chain as its page source.
//! Guest RAM (a new file on tmpfs) is registered with userfaultfd before a
//! vCPU runs; a vCPU's first touch of a page not loaded yet blocks it
//! until the fault thread places that page, read from the snapshot that
//! holds its newest copy (its 1 MiB chunk checked against the manifest
//! first); meanwhile the prefetch thread loads every page nobody touched,
//! then checks every chunk not used yet, and reports the restore fully
//! loaded.
//!
//! The snapshot is only read. If a chunk fails its checksum after the
//! guest started, the guest cannot go on with memory it will never get:
//! smudge says which file and offset and exits [`EXIT_MEMORY_LOST`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use smudge::fill::{Answer, Feed, FillBehind, FillError, FillStats, Loaded, PageSource, Placer, TmpfsError, PAGE};
use smudge::memory::{ram_layout, GuestRam};
use smudge::migration::postcopy::Owed;
use smudge::migration::receiver::ReceiveError;
use smudge::snapshot::{parse_state, ChainPages, MachineState, Manifest, SnapshotError};
use smudge::uffd::UffdError;

use crate::migrate::incoming::IncomingError;
use crate::persist::restore::NewMemoryFile;
use crate::vm::outcome::EXIT_MEMORY_LOST;
use crate::vm::{IncomingVm, VmError};

/// Pages the prefetch loads per turn of the lock.
const PREFETCH_PAGES: u64 = 256;

/// Checks that the memory file at `path` (to be created in its directory)
/// is on tmpfs, as a lazy restore needs.
pub fn check_tmpfs(path: &Path) -> Result<(), TmpfsError> {
    smudge::fill::check_tmpfs(path, "restore --lazy needs the memory file")
}

/// Why a lazy restore cannot start, or cannot finish loading.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The snapshot chain: a chunk failed its checksum, a read failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The bookkeeping of pages still to load.
    #[error(transparent)]
    Owed(#[from] ReceiveError),
    /// Guest RAM cannot be registered with userfaultfd.
    #[error("lazy restore into {}: {source}", path.display())]
    Register {
        /// The memory file.
        path: PathBuf,
        /// What userfaultfd said.
        source: UffdError,
    },
    /// Guest RAM's file could not be shared with the new memory file's
    /// build.
    #[error("{}: dup: {source}", path.display())]
    Dup {
        /// Guest RAM's file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// [`IncomingVm::receive`] was called twice.
    #[error("lazy restore: already started")]
    AlreadyStarted,
}

/// The snapshot chain as the fill-behind engine's page source.
struct ChainSource {
    /// What the messages call this restore ("lazy restore", "restore").
    label: &'static str,
    /// The new memory file built from guest RAM once every page is in
    /// (the default restore), removed if the guest's memory is lost.
    made: Option<NewMemoryFile>,
    dir: PathBuf,
    started_at: Instant,
    pages: ChainPages,
    owed: Owed,
    buf: Vec<u8>,
}

/// A snapshot chain to restore lazily (see the module doc).
pub struct LazyRestore {
    state: MachineState,
    source: Option<ChainSource>,
    armed: Option<FillBehind>,
}

impl std::fmt::Debug for LazyRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRestore").field("dir", &self.source.as_ref().map(|s| &s.dir)).finish()
    }
}

impl LazyRestore {
    /// Opens the chain ending at `dir` (manifests, state and extents
    /// checked; memory chunks are checked as they load). `started_at`:
    /// when the command started, for the time to first instruction.
    pub fn open(dir: &Path, started_at: Instant) -> Result<(Self, Manifest), SnapshotError> {
        let (pages, m) = ChainPages::open(dir)?;
        let p = dir.join("state.json");
        let text = std::fs::read(&p).map_err(|source| SnapshotError::Io { path: p.clone(), op: "read", source })?;
        let state = parse_state(&text, m.vcpus, &p)?;
        let mut owed = Owed::new(m.mem_size);
        owed.add(&pages.data_runs()).map_err(|e| SnapshotError::Corrupt { path: p, offset: 0, what: e.to_string() })?;
        let source = ChainSource {
            label: "lazy restore",
            made: None,
            dir: dir.to_path_buf(),
            started_at,
            pages,
            owed,
            buf: Vec::new(),
        };
        Ok((LazyRestore { state, source: Some(source), armed: None }, m))
    }

    /// The default restore's fill: its messages say "restore"; once every
    /// page is in, `made` (the new memory file) is built from guest RAM,
    /// synced and let to writeback; it is removed if a chunk fails its
    /// checksum after the guest started.
    pub fn behind(mut self, made: NewMemoryFile) -> Self {
        if let Some(s) = self.source.as_mut() {
            s.label = "restore";
            s.made = Some(made);
        }
        self
    }
}

impl IncomingVm for LazyRestore {
    fn receive(&mut self, file: &std::fs::File, path: &Path, ram: &GuestRam) -> Result<MachineState, IncomingError> {
        let source = self.source.as_mut().ok_or(LazyError::AlreadyStarted)?;
        if let Some(made) = source.made.as_mut() {
            made.copy_from(file).map_err(|source| LazyError::Dup { path: path.to_path_buf(), source })?;
        }
        let armed = FillBehind::register(ram, &ram_layout(source.pages.mem_size()))
            .map_err(|source| LazyError::Register { path: path.to_path_buf(), source })?;
        self.armed = Some(armed);
        Ok(self.state.clone())
    }

    fn started(&mut self, result: Result<(), &VmError>, loading: &Arc<AtomicBool>) {
        let (Ok(()), Some(armed), Some(source)) = (result, self.armed.take(), self.source.take()) else {
            return;
        };
        let _ = writeln!(
            std::io::stderr(),
            "smudge: {}: the guest runs {:.1} ms after smudge started; {} pages load on first touch or in the \
             background",
            source.label,
            source.started_at.elapsed().as_secs_f64() * 1e3,
            source.owed.remaining()
        );
        let blocks = Blocks { runs: source.pages.data_runs().into_iter(), run: None };
        armed.start(source, blocks, loading.clone());
    }
}

impl ChainSource {
    /// Reads the `count` pages at `offset` into the buffer.
    fn read(&mut self, offset: u64, count: u64) -> Result<&[u8], LazyError> {
        self.buf.resize((count * PAGE) as usize, 0);
        self.pages.read(offset, &mut self.buf)?;
        Ok(&self.buf)
    }

    /// Reads and places the `count` pages at `offset`, taking them off
    /// the debt: each piece is placed from the buffer its chunk was
    /// checked in, once the check passed.
    fn place(&mut self, offset: u64, count: u64, place: &Placer<'_>) -> Result<(), FillError<LazyError>> {
        let lift = |e: SnapshotError| FillError::Source(LazyError::Snapshot(e));
        self.pages.read_each(offset, count, lift, |o, bytes| place.pages(o, bytes))?;
        self.owed.deliver(offset, count).map_err(|e| FillError::Source(e.into()))
    }
}

impl PageSource for ChainSource {
    type Error = LazyError;
    type Feed = Blocks;
    const THREADS: (&'static str, &'static str) = ("lazy-faults", "lazy-prefetch");

    fn owed(&self) -> &Owed {
        &self.owed
    }

    fn fault(&mut self, offset: u64, place: &Placer<'_>) -> Result<Answer, FillError<LazyError>> {
        self.place(offset, 1, place)?;
        Ok(Answer::Placed)
    }

    fn untouched(&mut self, offset: u64) -> Result<(), FillError<LazyError>> {
        // A zero page of a data chunk: the chunk is checked first.
        if self.pages.is_zero(offset) {
            self.read(offset, 1).map_err(FillError::Source)?;
        }
        Ok(())
    }

    fn load(&mut self, block: Option<(u64, u64)>, place: &Placer<'_>) -> Result<Loaded, FillError<LazyError>> {
        let Some((base, n)) = block else {
            // Chunks no page was read from (zeros, holes) are checked too.
            self.pages.check_all().map_err(|e| FillError::Source(e.into()))?;
            return Ok(Loaded::Done);
        };
        // The still-owed runs of this block (faults took some).
        let (mut p, mut placed) = (0, 0);
        while p < n {
            if !self.owed.owes(base + p * PAGE) {
                p += 1;
                continue;
            }
            let mut q = p;
            while q < n && self.owed.owes(base + q * PAGE) {
                q += 1;
            }
            self.place(base + p * PAGE, q - p, place)?;
            placed += q - p;
            p = q;
        }
        Ok(Loaded::Pages(placed))
    }

    fn lost(&self, why: &FillError<LazyError>) -> ! {
        if let Some(made) = &self.made {
            let _ = std::fs::remove_file(made.path());
        }
        let _ = writeln!(
            std::io::stderr(),
            "smudge: {} of {} failed after the guest started: {why}; the guest cannot continue (the snapshot is \
             untouched{})",
            self.label,
            self.dir.display(),
            self.made.as_ref().map(|m| format!("; {} removed", m.path().display())).unwrap_or_default()
        );
        std::process::exit(i32::from(EXIT_MEMORY_LOST));
    }

    fn filled(&mut self, stats: &FillStats) {
        let _ = writeln!(
            std::io::stderr(),
            "smudge: {} fully loaded {:.1} ms after smudge started: {} pages on first touch, {} prefetched, {} \
             zero pages filled on touch; every chunk checked",
            self.label,
            self.started_at.elapsed().as_secs_f64() * 1e3,
            stats.on_fault,
            stats.loaded,
            stats.zero_filled,
        );
        if let Some(made) = self.made.as_mut() {
            made.finish();
        }
    }
}

/// The prefetch's feed: the chain's data runs in blocks of at most
/// [`PREFETCH_PAGES`], then `None` (the end).
struct Blocks {
    runs: std::vec::IntoIter<(u64, u32)>,
    /// The run being cut: (next offset, pages left).
    run: Option<(u64, u64)>,
}

impl Feed for Blocks {
    type Item = Option<(u64, u64)>;
    type Error = LazyError;

    fn next(&mut self) -> Result<Option<(u64, u64)>, LazyError> {
        let (off, left) = match self.run.take() {
            Some(r) => r,
            None => match self.runs.next() {
                Some((off, count)) => (off, u64::from(count)),
                None => return Ok(None),
            },
        };
        let n = left.min(PREFETCH_PAGES);
        if left > n {
            self.run = Some((off + n * PAGE, left - n));
        }
        Ok(Some((off, n)))
    }
}
