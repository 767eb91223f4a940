//! Fill-behind: guest memory that fills in while the guest already runs —
//! the one engine under a lazy restore (pages from a snapshot chain) and
//! a post-copy migration's destination (pages from the source, over the
//! network).
//!
//! Guest RAM (a file on tmpfs: see [`check_tmpfs`]) is registered with
//! userfaultfd before a vCPU runs ([`FillBehind::register`]). Once the
//! guest runs ([`FillBehind::start`]) two threads fill it from a
//! [`PageSource`]:
//! - the **fault thread** takes each first touch of a missing page: an
//!   owed page the source places at once or asks for ([`PageSource::fault`]);
//!   anywhere else nothing is owed and a zero page is placed;
//! - the **loader** takes what the source's [`Feed`] yields — blocks of
//!   pages nobody touched, frames off the wire — without the lock (a
//!   blocking read happens there), then places it under the lock
//!   ([`PageSource::load`]), until the source says every page is in.
//!
//! One lock (around the source) orders the two, so a page is placed once,
//! by whichever comes first, and never zero-filled after it was found
//! owed. Every placement goes through one [`Placer`]: an owed page found
//! present before it was placed is an error, not a silent overwrite.
//!
//! When a page can no longer be had (a chunk fails its checksum, the
//! source or its link dies) the guest cannot go on: vCPUs may wait in a
//! fault nothing will resolve. The engine hands the error to
//! [`PageSource::lost`], which says why and ends the process. When every
//! page is in, RAM is unregistered and [`PageSource::filled`] gets the
//! counts.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::memory::{GuestRam, RamRegion};
use crate::migration::postcopy::Owed;
use crate::uffd::{on_tmpfs, Placed, RamMap, Uffd, UffdError};

/// Bytes per page.
pub const PAGE: u64 = 4096;

/// How long the fault thread waits for a fault before it looks whether
/// the loader is done.
const FAULT_POLL: Duration = Duration::from_millis(50);

/// Why the memory file cannot be filled behind the guest.
#[derive(Debug, thiserror::Error)]
pub enum TmpfsError {
    /// Its directory is not on tmpfs.
    #[error(
        "{needs} on tmpfs (e.g. /dev/shm/guest.mem): {} is not; userfaultfd cannot catch first touches of \
         disk-file pages",
        dir.display()
    )]
    NotTmpfs {
        /// Who needs it, and which file (e.g. "post-copy needs the
        /// destination's memory file").
        needs: &'static str,
        /// The directory checked.
        dir: PathBuf,
    },
    /// statfs failed.
    #[error("{}: statfs: {source}", dir.display())]
    Statfs {
        /// The directory checked.
        dir: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Checks that the memory file `mem_file` (existing or to be created in
/// its directory) is on tmpfs: userfaultfd's missing-page mode does not
/// catch first touches of disk-file pages (the page cache fills them from
/// the file). `needs` names who needs it, for the error.
pub fn check_tmpfs(mem_file: &Path, needs: &'static str) -> Result<(), TmpfsError> {
    let dir = match mem_file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match on_tmpfs(dir) {
        Ok(true) => Ok(()),
        Ok(false) => Err(TmpfsError::NotTmpfs { needs, dir: dir.to_path_buf() }),
        Err(source) => Err(TmpfsError::Statfs { dir: dir.to_path_buf(), source }),
    }
}

/// Why filling failed (`E`: the page source's own errors).
#[derive(Debug, thiserror::Error)]
pub enum FillError<E: std::error::Error + 'static> {
    /// userfaultfd: reading faults, placing pages, unregistering.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// An owed page was there before it was placed: something else wrote
    /// guest RAM behind the engine's back.
    #[error("an owed page at {offset:#x} was present before it was placed")]
    Present {
        /// File offset of the run placed.
        offset: u64,
    },
    /// The source said it was done with pages still owed.
    #[error("{0} pages were never loaded")]
    NeverLoaded(u64),
    /// A thread could not be started.
    #[error("spawning the {thread} thread: {source}")]
    Spawn {
        /// Which thread.
        thread: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The page source failed.
    #[error(transparent)]
    Source(E),
}

/// What the source did about a vCPU's touch of an owed page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Placed it (and took it off its debt) at once.
    Placed,
    /// Asked for it; it comes through the loader.
    Requested,
    /// Asked for it before; it is on its way.
    Pending,
}

/// What the loader placed from one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// This many pages (data or zero) placed.
    Pages(u64),
    /// Nothing more will come: every page is in (the engine checks the
    /// debt is paid).
    Done,
}

/// The counts of a fill, for the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FillStats {
    /// Pages owed when the guest started.
    pub owed_at_start: u64,
    /// Owed pages placed by the fault thread (a vCPU's first touch).
    pub on_fault: u64,
    /// Owed pages a fault asked the source for.
    pub requested: u64,
    /// Pages placed by the loader.
    pub loaded: u64,
    /// Zero pages placed where a vCPU touched a page nothing was owed for.
    pub zero_filled: u64,
}

/// The loader's half of a source: yields the next thing to place, outside
/// the lock (a blocking read belongs here).
pub trait Feed: Send + 'static {
    /// One unit of loading (a block of pages, a frame).
    type Item: Send;
    /// Why the next item cannot be had.
    type Error;
    /// The next item.
    fn next(&mut self) -> Result<Self::Item, Self::Error>;
}

/// Where the pages owed to a guest come from (a snapshot chain, a
/// post-copy source). Its methods run under the engine's lock, one at a
/// time, on the fault thread or the loader.
pub trait PageSource: Send + 'static {
    /// The source's own errors.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The loader's half.
    type Feed: Feed<Error = Self::Error>;
    /// Names of the fault thread and the loader thread.
    const THREADS: (&'static str, &'static str);

    /// The pages still owed (taken off as they are placed).
    fn owed(&self) -> &Owed;

    /// A vCPU touched the owed page at `offset`: place it with `place`
    /// (and take it off the debt) or ask for it.
    fn fault(&mut self, offset: u64, place: &Placer<'_>) -> Result<Answer, FillError<Self::Error>>;

    /// A vCPU touched the page at `offset`, which is not owed; a zero page
    /// is placed there next (or, if the page arrived meanwhile, its waiter
    /// woken). A check the source owes that page goes here.
    fn untouched(&mut self, offset: u64) -> Result<(), FillError<Self::Error>> {
        let _ = offset;
        Ok(())
    }

    /// Places what `item` holds that is still owed, taking it off the debt.
    fn load(&mut self, item: <Self::Feed as Feed>::Item, place: &Placer<'_>) -> Result<Loaded, FillError<Self::Error>>;

    /// The guest's memory cannot be completed: say why and end the
    /// process (vCPUs may be blocked in faults nothing will resolve).
    fn lost(&self, why: &FillError<Self::Error>) -> !;

    /// Every page is in and RAM is unregistered.
    fn filled(&mut self, stats: &FillStats);
}

/// Places pages in registered guest RAM, by backing-file offset.
#[derive(Debug)]
pub struct Placer<'a> {
    uffd: &'a Uffd,
    map: &'a RamMap,
}

impl Placer<'_> {
    /// Places `data` (whole pages) at `offset`, waking its waiters; each
    /// page must still be missing.
    pub fn pages<E: std::error::Error>(&self, offset: u64, data: &[u8]) -> Result<(), FillError<E>> {
        match self.map.place(self.uffd, offset, data)? {
            Placed::Placed => Ok(()),
            Placed::Exists => Err(FillError::Present { offset }),
        }
    }

    /// Leaves `[offset, offset + len)` missing, where the file has a hole
    /// (reads zero): nothing is allocated; whoever waits there is woken,
    /// faults again and — the pages no longer owed — gets a zero page then.
    pub fn holes<E: std::error::Error>(&self, offset: u64, len: u64) -> Result<(), FillError<E>> {
        for (h, n) in self.map.host_runs(offset, len)? {
            self.uffd.wake(h, n)?;
        }
        Ok(())
    }

    /// Places zero pages over `[offset, offset + len)`; each page must
    /// still be missing.
    pub fn zeros<E: std::error::Error>(&self, offset: u64, len: u64) -> Result<(), FillError<E>> {
        match self.map.place_zero(self.uffd, offset, len)? {
            Placed::Placed => Ok(()),
            Placed::Exists => Err(FillError::Present { offset }),
        }
    }
}

/// The counts, as the threads bump them.
#[derive(Debug, Default)]
struct Counters {
    on_fault: AtomicU64,
    requested: AtomicU64,
    loaded: AtomicU64,
    zero_filled: AtomicU64,
}

impl Counters {
    fn stats(&self, owed_at_start: u64) -> FillStats {
        FillStats {
            owed_at_start,
            on_fault: self.on_fault.load(Ordering::Relaxed),
            requested: self.requested.load(Ordering::Relaxed),
            loaded: self.loaded.load(Ordering::Relaxed),
            zero_filled: self.zero_filled.load(Ordering::Relaxed),
        }
    }
}

/// Guest RAM registered for missing-page faults, not yet filling.
/// Dropped unstarted, the registration ends with the userfaultfd.
#[derive(Debug)]
pub struct FillBehind {
    uffd: Uffd,
    map: RamMap,
}

impl FillBehind {
    /// Registers `ram` (laid out in its file as `layout` says) for
    /// missing-page faults: from now on a first touch of a page not
    /// placed waits.
    pub fn register(ram: &GuestRam, layout: &[RamRegion]) -> Result<Self, UffdError> {
        FillBehind::register_map(RamMap::new(ram, layout)?)
    }

    fn register_map(map: RamMap) -> Result<Self, UffdError> {
        let uffd = Uffd::new()?;
        map.register_missing(&uffd)?;
        Ok(FillBehind { uffd, map })
    }

    /// Fills RAM from `source` on a fault thread and a loader thread
    /// taking `feed`; `loading` is held true until every page is in and
    /// RAM is unregistered. Returns at once; a failure from here on goes
    /// to [`PageSource::lost`].
    pub fn start<S: PageSource>(self, source: S, feed: S::Feed, loading: Arc<AtomicBool>) {
        loading.store(true, Ordering::Release);
        let owed_at_start = source.owed().remaining();
        let fill = Arc::new(Running {
            uffd: self.uffd,
            map: self.map,
            source: Mutex::new(source),
            done: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let faults = {
            let fill = fill.clone();
            std::thread::Builder::new().name(S::THREADS.0.into()).spawn(move || {
                if let Err(e) = fill.serve_faults() {
                    fill.lost(&e);
                }
            })
        };
        let faults = match faults {
            Ok(t) => t,
            Err(source) => fill.lost(&FillError::Spawn { thread: "fault", source }),
        };
        let loader = fill.clone();
        let spawned = std::thread::Builder::new().name(S::THREADS.1.into()).spawn(move || {
            let r = loader.load_all(feed);
            loader.done.store(true, Ordering::Release);
            let _ = faults.join();
            if let Err(e) = r {
                loader.lost(&e);
            }
            if let Err(e) = loader.map.unregister(&loader.uffd) {
                tracing::warn!("{}: {e}", S::THREADS.1);
            }
            loading.store(false, Ordering::Release);
            let stats = loader.counters.stats(owed_at_start);
            loader.lock().filled(&stats);
        });
        if let Err(source) = spawned {
            fill.lost(&FillError::Spawn { thread: "loader", source });
        }
    }
}

/// A fill under way: what the two threads share.
struct Running<S> {
    uffd: Uffd,
    map: RamMap,
    source: Mutex<S>,
    /// Set once the loader is through: the fault thread ends.
    done: AtomicBool,
    counters: Counters,
}

impl<S: PageSource> Running<S> {
    fn lock(&self) -> MutexGuard<'_, S> {
        self.source.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn placer(&self) -> Placer<'_> {
        Placer { uffd: &self.uffd, map: &self.map }
    }

    fn lost(&self, why: &FillError<S::Error>) -> ! {
        self.lock().lost(why)
    }

    /// The fault thread: each first touch of a missing page, until the
    /// loader is done.
    fn serve_faults(&self) -> Result<(), FillError<S::Error>> {
        let place = self.placer();
        while !self.done.load(Ordering::Acquire) {
            let Some(off) = self.map.next_fault(&self.uffd, FAULT_POLL)? else { continue };
            let mut source = self.lock();
            if source.owed().owes(off) {
                let counter = match source.fault(off, &place)? {
                    Answer::Placed => &self.counters.on_fault,
                    Answer::Requested => &self.counters.requested,
                    Answer::Pending => continue,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            } else {
                // Nothing owed there: a zero page (or the page came in
                // meanwhile, and this only wakes the waiter).
                source.untouched(off)?;
                if self.map.place_zero(&self.uffd, off, PAGE)? == Placed::Placed {
                    self.counters.zero_filled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// The loader: every item of `feed` placed, until the source is done
    /// and owes nothing.
    fn load_all(&self, mut feed: S::Feed) -> Result<(), FillError<S::Error>> {
        let place = self.placer();
        loop {
            let item = feed.next().map_err(FillError::Source)?;
            let mut source = self.lock();
            match source.load(item, &place)? {
                Loaded::Pages(n) => {
                    self.counters.loaded.fetch_add(n, Ordering::Relaxed);
                }
                Loaded::Done => {
                    return match source.owed().remaining() {
                        0 => Ok(()),
                        n => Err(FillError::NeverLoaded(n)),
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{ram_layout, BackingFile};
    use std::sync::mpsc::{channel, Receiver, Sender};
    use vm_memory::{Bytes, GuestAddress};

    const PAGES: u64 = 256;
    /// Pages 0..OWED are owed; page `p` holds the byte `p + 1`.
    const OWED: u64 = 32;

    #[derive(Debug, thiserror::Error)]
    #[error("test source: block at {0:#x} unreadable")]
    struct Unreadable(u64);

    /// Blocks of four owed pages, each after a go-ahead, then the end.
    struct Blocks {
        next: u64,
        go: Receiver<()>,
    }

    impl Feed for Blocks {
        type Item = Option<u64>;
        type Error = Unreadable;
        fn next(&mut self) -> Result<Option<u64>, Unreadable> {
            if self.go.recv().is_err() || self.next >= OWED * PAGE {
                return Ok(None);
            }
            self.next += 4 * PAGE;
            Ok(Some(self.next - 4 * PAGE))
        }
    }

    /// How a test fill ended.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        Filled(FillStats),
        Lost(String),
    }

    struct Source {
        owed: Owed,
        /// A block the source cannot read.
        bad: Option<u64>,
        outcome: Sender<Outcome>,
    }

    impl Source {
        fn page(p: u64) -> Vec<u8> {
            vec![p as u8 + 1; PAGE as usize]
        }
    }

    impl PageSource for Source {
        type Error = Unreadable;
        type Feed = Blocks;
        const THREADS: (&'static str, &'static str) = ("test-faults", "test-loader");

        fn owed(&self) -> &Owed {
            &self.owed
        }

        fn fault(&mut self, offset: u64, place: &Placer<'_>) -> Result<Answer, FillError<Unreadable>> {
            place.pages(offset, &Self::page(offset / PAGE))?;
            self.owed.deliver(offset, 1).map_err(|_| FillError::Source(Unreadable(offset)))?;
            Ok(Answer::Placed)
        }

        fn load(&mut self, block: Option<u64>, place: &Placer<'_>) -> Result<Loaded, FillError<Unreadable>> {
            let Some(base) = block else { return Ok(Loaded::Done) };
            if self.bad == Some(base) {
                return Err(FillError::Source(Unreadable(base)));
            }
            let mut n = 0;
            for off in (base..base + 4 * PAGE).step_by(PAGE as usize) {
                if !self.owed.owes(off) {
                    continue;
                }
                place.pages(off, &Self::page(off / PAGE))?;
                self.owed.deliver(off, 1).map_err(|_| FillError::Source(Unreadable(off)))?;
                n += 1;
            }
            Ok(Loaded::Pages(n))
        }

        fn lost(&self, why: &FillError<Unreadable>) -> ! {
            let _ = self.outcome.send(Outcome::Lost(why.to_string()));
            // A test cannot end the process: this thread stays parked.
            loop {
                std::thread::park();
            }
        }

        fn filled(&mut self, stats: &FillStats) {
            let _ = self.outcome.send(Outcome::Filled(*stats));
        }
    }

    /// RAM on tmpfs, registered; a source owing pages 0..OWED.
    fn setup(bad: Option<u64>) -> (tempfile::TempDir, GuestRam, FillBehind, Source, Receiver<Outcome>) {
        let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is needed");
        let mem = dir.path().join("ram");
        check_tmpfs(&mem, "the test needs its memory file").unwrap();
        let file = BackingFile::open_or_create(&mem, PAGES * PAGE).unwrap();
        let ram = file.map(false).unwrap();
        let armed = match FillBehind::register(&ram, &ram_layout(PAGES * PAGE)) {
            Ok(a) => a,
            Err(e) => panic!("userfaultfd is needed for fill-behind: {e}"),
        };
        let mut owed = Owed::new(PAGES * PAGE);
        owed.add(&[(0, OWED as u32)]).unwrap();
        let (outcome, done) = channel();
        (dir, ram, armed, Source { owed, bad, outcome }, done)
    }

    fn byte_at(ram: &GuestRam, off: u64) -> u8 {
        ram.read_obj(GuestAddress(off + 100)).unwrap()
    }

    /// A touch of an owed page gets it from the source at once, a touch
    /// elsewhere a zero page; the loader places the rest, each page once.
    #[test]
    fn touched_pages_come_first_and_the_loader_places_the_rest_once() {
        let (_dir, ram, armed, source, outcome) = setup(None);
        let (go, feed) = channel();
        let loading = Arc::new(AtomicBool::new(false));
        armed.start(source, Blocks { next: 0, go: feed }, loading.clone());
        assert!(loading.load(Ordering::Acquire));
        // The loader waits for the go-ahead: these two are faults.
        assert_eq!(byte_at(&ram, 20 * PAGE), 21);
        assert_eq!(byte_at(&ram, 100 * PAGE), 0);
        for _ in 0..=OWED / 4 {
            go.send(()).unwrap();
        }
        let stats = outcome.recv_timeout(Duration::from_secs(60)).expect("the fill never ended");
        assert_eq!(
            stats,
            Outcome::Filled(FillStats {
                owed_at_start: OWED,
                on_fault: 1,
                requested: 0,
                loaded: OWED - 1,
                zero_filled: 1
            })
        );
        assert!(!loading.load(Ordering::Acquire));
        for p in 0..OWED {
            assert_eq!(byte_at(&ram, p * PAGE), p as u8 + 1, "page {p}");
        }
        // Unregistered: an untouched page reads as the file's zeros.
        assert_eq!(byte_at(&ram, 200 * PAGE), 0);
    }

    /// A page the source cannot give ends the fill through `lost`, with
    /// the source's error.
    #[test]
    fn a_source_failure_goes_to_lost() {
        let (_dir, _ram, armed, source, outcome) = setup(Some(8 * PAGE));
        let (go, feed) = channel();
        armed.start(source, Blocks { next: 0, go: feed }, Arc::default());
        for _ in 0..3 {
            go.send(()).unwrap();
        }
        let why = outcome.recv_timeout(Duration::from_secs(60)).expect("lost was never called");
        assert_eq!(why, Outcome::Lost("test source: block at 0x8000 unreadable".to_string()));
    }

    #[test]
    fn a_memory_file_on_disk_is_refused() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        assert!(!on_tmpfs(dir.path()).unwrap(), "the test needs a non-tmpfs directory");
        let e = check_tmpfs(&dir.path().join("ram"), "post-copy needs the destination's memory file").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "post-copy needs the destination's memory file on tmpfs (e.g. /dev/shm/guest.mem): {} is not; \
                 userfaultfd cannot catch first touches of disk-file pages",
                dir.path().display()
            )
        );
    }
}
