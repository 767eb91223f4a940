//! Writing a journal: epochs appended to the current segment, committed
//! by `fdatasync` (several at once: group commit), segments rolled at a
//! size, and old segments checkpointed into the base image.
//!
//! A page the writer journaled before and still holds in its cache
//! (`--journal-cache`) is written as a delta against that content when the
//! delta is smaller; any other page whole. Checkpoints apply a run of
//! segments at once, each page written into the base once.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::cache::PageCache;
use super::format::{self, Begin, Commit, Header, Kind, SegmentHead, HEADER};
use super::image::EpochPages;
use super::recover::{read_epoch, scan, segment_files, Checkpoint, EpochInfo, CHECKPOINT_FORMAT};
use super::replay::Replay;
use super::{segment_name, sync_dir, JournalError, BASE, CHECKPOINT};
use crate::machine_state::MachineState;

/// Pages per pages record (a record is checked and read whole).
const PAGES_PER_RECORD: usize = 256;
/// Deltas per deltas record (each smaller than a page).
const DELTAS_PER_RECORD: usize = 512;
/// Pages a checkpoint gathers in memory before writing them into the base.
const CHECKPOINT_BUFFER: u64 = 64 << 20;
/// Bytes gathered before one `pwrite`.
const WRITE_BATCH: usize = 4 << 20;
/// The first wait before a failed checkpoint is tried again; it doubles
/// on each failure up to [`BASE_RETRY_MAX`].
const BASE_RETRY_FIRST: Duration = Duration::from_millis(250);
/// The longest wait between two tries of a failing checkpoint.
const BASE_RETRY_MAX: Duration = Duration::from_secs(4);

/// Sizes of a journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalOptions {
    /// A segment is closed (and a new one begun) once it holds this much.
    pub segment_bytes: u64,
    /// Checkpoint the oldest segments, retained or not, while the journal
    /// holds more than this (None: no bound).
    pub max_bytes: Option<u64>,
    /// Bytes of pages the writer keeps as the bases of deltas (None:
    /// [`default_cache_bytes`]; 0: every page whole).
    pub cache_bytes: Option<u64>,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions { segment_bytes: 64 << 20, max_bytes: None, cache_bytes: None }
    }
}

/// The delta cache for a RAM of `ram_size` bytes when none is asked for:
/// an eighth of it, at least 16 MiB and at most 512 MiB (never more than
/// the RAM).
pub fn default_cache_bytes(ram_size: u64) -> u64 {
    (ram_size / 8).clamp(16 << 20, 512 << 20).min(ram_size)
}

/// A closed segment: every epoch in it committed.
#[derive(Debug)]
struct Closed {
    path: PathBuf,
    len: u64,
    epochs: Vec<EpochInfo>,
}

/// The segment epochs go into.
#[derive(Debug)]
struct Current {
    file: File,
    path: PathBuf,
    len: u64,
    epochs: Vec<EpochInfo>,
}

/// What a checkpoint did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointReport {
    /// Segments written into the base and removed.
    pub segments: u64,
    /// Epochs they held.
    pub epochs: u64,
    /// Of those, segments checkpointed before their time because the
    /// journal was over its size bound.
    pub forced: u64,
    /// Page bytes written into the base (each page of a run once).
    pub bytes: u64,
    /// The base image could not be written (a new failure, or a retry
    /// that failed again): see [`Journal::base_failure`].
    pub base_failed: bool,
    /// A checkpoint succeeded after the base image had failed.
    pub base_recovered: bool,
}

/// A checkpoint that could not write the base image: the segments it was
/// to apply stay in the journal (their space is not reused), the base is
/// not trusted where the write failed (recovery replays those segments
/// over it), and the checkpoint is tried again later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseFailure {
    /// The base image.
    pub path: PathBuf,
    /// What failed: "write", "fdatasync", or another operation on it.
    pub op: &'static str,
    /// The failed write's offset, or the first byte the failed sync
    /// covered (0 with `end` 0: not known).
    pub offset: u64,
    /// Where the failed write, or the bytes the sync covered, end.
    pub end: u64,
    /// The OS error number (EIO = 5).
    pub errno: Option<i32>,
    /// The whole error, for people.
    pub message: String,
    /// The oldest and newest epoch of the segment it was applying.
    pub epochs: (u64, u64),
    /// Tries that failed since the last checkpoint that succeeded.
    pub attempts: u64,
}

impl BaseFailure {
    /// The failure of `base` that `e` is — a [`JournalError::Base`], or
    /// any I/O error on that file — while applying `epochs`; or `e` back
    /// if it is about another file (the journal's own: those end the run).
    pub fn of(e: JournalError, base: &Path, epochs: (u64, u64)) -> Result<BaseFailure, JournalError> {
        let (path, op, offset, end, source) = match e {
            JournalError::Base { path, op, offset, end, source } => (path, op, offset, end, source),
            JournalError::Io { path, op, source } if path == base => (path, op, 0, 0, source),
            other => return Err(other),
        };
        let message = if end > offset {
            format!("{}: {op} of bytes {offset:#x}..{end:#x}: {source}", path.display())
        } else {
            format!("{}: {op}: {source}", path.display())
        };
        let errno = source.raw_os_error();
        Ok(BaseFailure { path, op, offset, end, errno, message, epochs, attempts: 1 })
    }
}

/// A failing base image and when to try it again.
#[derive(Debug)]
struct BaseRetry {
    failure: BaseFailure,
    at: Instant,
    wait: Duration,
}

/// A journal open for appending.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    id: u128,
    vm: u128,
    cp: Checkpoint,
    opts: JournalOptions,
    base: File,
    closed: VecDeque<Closed>,
    current: Option<Current>,
    next_seq: u64,
    next_epoch: u64,
    committed: u64,
    /// What was last journaled for recently written pages.
    cache: PageCache,
    base_retry: Option<BaseRetry>,
}

/// A number no other journal or VM has (the std hasher's random keys and
/// the time).
pub fn new_id() -> u128 {
    let word = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        h.write_u32(std::process::id());
        h.finish()
    };
    (u128::from(word()) << 64) | u128::from(word())
}

impl Journal {
    /// A new journal in `dir` (made if missing; it must hold no journal)
    /// for the VM `vm` with `ram_size` bytes of RAM in pages of
    /// `page_size`. Its first epoch must hold every page with data.
    pub fn create(
        dir: &Path,
        ram_size: u64,
        page_size: u64,
        vm: u128,
        opts: JournalOptions,
    ) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(JournalError::io(dir, "create directory"))?;
        if dir.join(CHECKPOINT).exists() || !segment_files(dir)?.is_empty() {
            return Err(JournalError::Exists(dir.into()));
        }
        let base_path = dir.join(BASE);
        let base = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&base_path)
            .map_err(JournalError::io(&base_path, "create"))?;
        base.set_len(ram_size).map_err(JournalError::io(&base_path, "set length"))?;
        base.sync_all().map_err(JournalError::io(&base_path, "fsync"))?;
        let id = new_id();
        let cp = Checkpoint {
            format: CHECKPOINT_FORMAT.into(),
            journal: format!("{id:032x}"),
            ram_size,
            page_size,
            base_epoch: 0,
            complete: true,
            checksum: 0,
        };
        cp.store(dir)?;
        let cache = PageCache::new(page_size, opts.cache_bytes.unwrap_or_else(|| default_cache_bytes(ram_size)));
        Ok(Journal {
            dir: dir.into(),
            id,
            vm,
            cp,
            opts,
            base,
            closed: VecDeque::new(),
            current: None,
            next_seq: 0,
            next_epoch: 1,
            committed: 0,
            cache,
            base_retry: None,
        })
    }

    /// Opens the journal in `dir` to go on after its committed epoch
    /// `keep` (a recovered guest journalling on): every epoch after it —
    /// newer committed ones (a rewind) and an uncommitted tail — is cut
    /// off first. The next epoch must hold every page with data. The
    /// delta cache starts empty (pages are written whole first), and a
    /// segment of an older format version is closed rather than
    /// appended to.
    pub fn reopen(dir: &Path, keep: u64, vm: u128, opts: JournalOptions) -> Result<Journal, JournalError> {
        let s = scan(dir)?;
        let at = s.recoverable().find(|e| e.epoch == keep).cloned().ok_or(JournalError::NotRetained {
            want: keep,
            oldest: s.recoverable().next().map_or(0, |e| e.epoch),
            newest: s.newest().map_or(0, |e| e.epoch),
        })?;
        let id = s.checkpoint.journal_id().ok_or_else(|| JournalError::NotAJournal(dir.into()))?;
        // Later segments go, newest first; the one holding `keep` ends
        // right after it.
        let files = segment_files(dir)?;
        let seq_of = |p: &Path| files.iter().find(|(_, f)| f == p).map(|(s, _)| *s);
        let keep_seq = seq_of(&at.segment).ok_or_else(|| JournalError::NotAJournal(dir.into()))?;
        for (_, p) in files.iter().rev().filter(|(s, _)| *s > keep_seq) {
            std::fs::remove_file(p).map_err(JournalError::io(p, "remove"))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&at.segment)
            .map_err(JournalError::io(&at.segment, "open"))?;
        file.set_len(at.end).map_err(JournalError::io(&at.segment, "truncate"))?;
        file.sync_all().map_err(JournalError::io(&at.segment, "fsync"))?;
        sync_dir(dir)?;
        let mut closed = VecDeque::new();
        let mut current = None;
        for (seq, p) in files.iter().filter(|(s, _)| *s <= keep_seq) {
            let epochs: Vec<EpochInfo> =
                s.epochs.iter().filter(|e| &e.segment == p && e.epoch <= keep).cloned().collect();
            let info = s.segments.iter().find(|g| &g.path == p);
            let len = info.map_or(0, |g| g.committed_len);
            let current_format = info.is_some_and(|g| g.version == format::VERSION);
            if *seq == keep_seq && !current_format {
                closed.push_back(Closed { path: p.clone(), len: at.end, epochs });
            } else if *seq == keep_seq {
                current = Some(Current {
                    file: file.try_clone().map_err(JournalError::io(p, "dup"))?,
                    path: p.clone(),
                    len: at.end,
                    epochs,
                });
            } else {
                closed.push_back(Closed { path: p.clone(), len, epochs });
            }
        }
        let base_path = dir.join(BASE);
        let base =
            OpenOptions::new().read(true).write(true).open(&base_path).map_err(JournalError::io(&base_path, "open"))?;
        let cache_bytes = opts.cache_bytes.unwrap_or_else(|| default_cache_bytes(s.checkpoint.ram_size));
        Ok(Journal {
            dir: dir.into(),
            id,
            vm,
            cp: s.checkpoint.clone(),
            opts,
            base,
            closed,
            current,
            next_seq: keep_seq + 1,
            next_epoch: keep + 1,
            committed: keep,
            cache: PageCache::new(s.checkpoint.page_size, cache_bytes),
            base_retry: None,
        })
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The newest committed epoch (0: none yet).
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// The number the next appended epoch gets.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// Bytes the segments hold.
    pub fn bytes(&self) -> u64 {
        self.closed.iter().map(|c| c.len).sum::<u64>() + self.current.as_ref().map_or(0, |c| c.len)
    }

    /// Appends the next epoch — its boundary at `time_ns`, `pages`, the
    /// machine `state` — without syncing: it is committed by the next
    /// [`Self::sync`]. Returns its number. On error nothing of it stays
    /// in the journal (the segment is cut back), the number is unused and
    /// the delta cache is as it was.
    pub fn append(&mut self, time_ns: u64, pages: &EpochPages, state: &MachineState) -> Result<u64, JournalError> {
        let epoch = self.next_epoch;
        if pages.page_size() != self.cp.page_size {
            return Err(JournalError::Shape { epoch, why: format!("pages of {} bytes", pages.page_size()) });
        }
        self.roll_if_full()?;
        let seg = self.current.as_mut().ok_or_else(|| JournalError::NotAJournal(self.dir.clone()))?;
        let start = seg.len;
        let begin = Begin { vm: self.vm, time_ns, ram_size: self.cp.ram_size, page_size: self.cp.page_size };
        match write_epoch(&seg.file, start, epoch, &begin, pages, &self.cache, state) {
            Ok((end, written)) => {
                seg.len = end;
                // The next deltas start from what this epoch holds.
                for (off, data) in pages.iter() {
                    self.cache.put(off, data);
                }
                seg.epochs.push(EpochInfo {
                    epoch,
                    vm: self.vm,
                    time_ns,
                    pages: written.pages,
                    delta_pages: written.deltas,
                    bytes: end - start,
                    segment: seg.path.clone(),
                    start,
                    end,
                });
                self.next_epoch += 1;
                Ok(epoch)
            }
            Err(e) => {
                // A partial epoch must not stay in front of the next one.
                let _ = seg.file.set_len(start);
                Err(JournalError::io(&seg.path, "append an epoch")(e))
            }
        }
    }

    /// Commits every epoch appended so far: `fdatasync`, then they count.
    /// Returns the newest committed epoch.
    pub fn sync(&mut self) -> Result<u64, JournalError> {
        let appended = self.next_epoch - 1;
        if appended > self.committed {
            if let Some(seg) = &self.current {
                if let Err(e) = seg.file.sync_data() {
                    // What was appended may not be on disk: no delta may
                    // build on it.
                    self.cache.clear();
                    return Err(JournalError::io(&seg.path, "fdatasync")(e));
                }
            }
            self.committed = appended;
        }
        Ok(self.committed)
    }

    /// The boundary time of committed epoch `n`, if the journal holds it.
    pub fn epoch_time_ns(&self, n: u64) -> Option<u64> {
        let cur = self.current.iter().flat_map(|c| c.epochs.iter());
        self.closed.iter().flat_map(|c| c.epochs.iter()).chain(cur).find(|e| e.epoch == n).map(|e| e.time_ns)
    }

    /// Closes the current segment once it is full (syncing it: its epochs
    /// are committed) and begins the next, whose directory entry is
    /// synced before any epoch goes in.
    fn roll_if_full(&mut self) -> Result<(), JournalError> {
        if let Some(seg) = &self.current {
            if seg.len < self.opts.segment_bytes || seg.epochs.is_empty() {
                return Ok(());
            }
            self.sync()?;
        }
        if let Some(seg) = self.current.take() {
            self.closed.push_back(Closed { path: seg.path, len: seg.len, epochs: seg.epochs });
        }
        let path = self.dir.join(segment_name(self.next_seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(JournalError::io(&path, "create a segment"))?;
        let head = SegmentHead { version: format::VERSION, journal: self.id, sequence: self.next_seq }.encode();
        let made = (|| {
            file.write_all_at(&Header::of(Kind::Segment, self.next_epoch, &head).encode(), 0)?;
            file.write_all_at(&head, HEADER as u64)?;
            file.sync_all()
        })();
        if let Err(e) =
            made.map_err(JournalError::io(&path, "write a segment header")).and_then(|()| sync_dir(&self.dir))
        {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        self.next_seq += 1;
        self.current = Some(Current { file, path, len: (HEADER + head.len()) as u64, epochs: Vec::new() });
        Ok(())
    }

    /// Why the base image could not be written, while it cannot (None
    /// once a checkpoint succeeds again).
    pub fn base_failure(&self) -> Option<&BaseFailure> {
        self.base_retry.as_ref().map(|r| &r.failure)
    }

    /// Whether the journal is over its size bound and cannot shrink until
    /// the base image can be written again: the caller should stop
    /// appending (throttle the guest) and retry [`Self::checkpoint`] after
    /// [`Self::base_retry_in`].
    pub fn is_stuck(&self) -> bool {
        self.base_retry.is_some() && self.opts.max_bytes.is_some_and(|m| self.bytes() > m)
    }

    /// How long until a failing checkpoint is tried again (None: none is
    /// failing).
    pub fn base_retry_in(&self) -> Option<Duration> {
        self.base_retry.as_ref().map(|r| r.at.saturating_duration_since(Instant::now()))
    }

    /// Writes into the base image every closed segment whose epochs all
    /// began before `cutoff_ns`, oldest first — and, while the journal
    /// holds more than its bound, older segments still — then removes
    /// them. The newest committed epoch always stays in the journal.
    /// They are applied as one run: each page written once, its newest
    /// content in the run.
    ///
    /// A failure to write the base image is not an error: the segments
    /// stay, [`Self::base_failure`] says why, the report's `base_failed`
    /// is set, and later calls try again (no sooner than a back-off of
    /// 0.25 s doubling to 4 s). Other errors (the journal's own files) are.
    pub fn checkpoint(&mut self, cutoff_ns: u64) -> Result<CheckpointReport, JournalError> {
        let mut r = CheckpointReport::default();
        if self.base_retry.as_ref().is_some_and(|b| Instant::now() < b.at) {
            return Ok(r);
        }
        let mut left = self.bytes();
        let mut first = None;
        let mut last = 0;
        for seg in &self.closed {
            let newest = seg.epochs.last().map_or(0, |e| e.epoch);
            let old = seg.epochs.last().is_none_or(|e| e.time_ns < cutoff_ns);
            let over = self.opts.max_bytes.is_some_and(|m| left > m);
            if newest >= self.committed || !(old || over) {
                break;
            }
            left -= seg.len;
            first = first.or(seg.epochs.first().map(|e| e.epoch));
            last = last.max(newest);
            r.segments += 1;
            r.epochs += seg.epochs.len() as u64;
            r.forced += u64::from(!old);
        }
        if r.segments == 0 {
            return Ok(r);
        }
        match self.checkpoint_run(r.segments as usize) {
            Ok(bytes) => {
                r.bytes = bytes;
                r.base_recovered = self.base_retry.take().is_some();
            }
            Err(e) => {
                self.base_failed(BaseFailure::of(e, &self.dir.join(BASE), (first.unwrap_or(0), last))?);
                r = CheckpointReport { base_failed: true, ..CheckpointReport::default() };
            }
        }
        Ok(r)
    }

    /// Notes a failed checkpoint and when to try it again.
    fn base_failed(&mut self, mut failure: BaseFailure) {
        let wait = match &self.base_retry {
            Some(b) => {
                failure.attempts = b.failure.attempts + 1;
                (b.wait * 2).min(BASE_RETRY_MAX)
            }
            None => BASE_RETRY_FIRST,
        };
        self.base_retry = Some(BaseRetry { failure, at: Instant::now() + wait, wait });
    }

    /// Applies the `n` oldest closed segments to the base, then removes
    /// them oldest first; returns the page bytes written. Every page is
    /// written again on each try: after a failed write-back the kernel may
    /// call the pages clean, so a later sync alone would prove nothing.
    fn checkpoint_run(&mut self, n: usize) -> Result<u64, JournalError> {
        let mut bytes = 0;
        let run = || self.closed.iter().take(n).flat_map(|c| c.epochs.iter());
        if let Some(last) = run().map(|e| e.epoch).max() {
            // The base may hold pages of epochs up to `last` from now on.
            self.cp.base_epoch = self.cp.base_epoch.max(last);
            self.cp.complete = false;
            self.cp.store(&self.dir)?;
            let base_path = self.dir.join(BASE);
            let mut replay = Replay::new(&self.base, &base_path, self.cp.page_size, CHECKPOINT_BUFFER);
            let (mut lo, mut hi, ps) = (u64::MAX, 0, self.cp.page_size);
            for e in run() {
                read_epoch(e, &self.cp, |off, data| {
                    (lo, hi) = (lo.min(off), hi.max(off + ps));
                    replay.page(off, data)
                })?;
            }
            bytes = replay.finish()?;
            self.base.sync_data().map_err(|source| JournalError::Base {
                path: base_path,
                op: "fdatasync",
                offset: lo.min(hi),
                end: hi,
                source,
            })?;
            self.cp.complete = true;
            self.cp.store(&self.dir)?;
        }
        for _ in 0..n {
            self.remove_front()?;
        }
        Ok(bytes)
    }

    fn remove_front(&mut self) -> Result<(), JournalError> {
        if let Some(c) = self.closed.pop_front() {
            std::fs::remove_file(&c.path).map_err(JournalError::io(&c.path, "remove"))?;
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// Gathers records into large positioned writes.
struct Out<'a> {
    file: &'a File,
    off: u64,
    buf: Vec<u8>,
}

impl Out<'_> {
    fn push(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= WRITE_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn record(&mut self, kind: Kind, epoch: u64, pieces: &[&[u8]]) -> std::io::Result<u64> {
        let h = format::header_of(kind, epoch, pieces);
        self.push(&h.encode())?;
        for p in pieces {
            self.push(p)?;
        }
        Ok(h.len)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.write_all_at(&self.buf, self.off)?;
        self.off += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

/// The pages of one epoch as they go into its records.
#[derive(Debug, Default)]
struct Encoded<'a> {
    whole: Vec<(u64, &'a [u8])>,
    /// (file offset, range in `bytes`).
    deltas: Vec<(u64, std::ops::Range<usize>)>,
    bytes: Vec<u8>,
}

/// Sorts `pages` into whole pages and deltas against `cache`: a cached
/// page whose delta is smaller than the page goes as a delta, an
/// unchanged one not at all (its content is its previous record's).
fn encode_pages<'a>(pages: &'a EpochPages, cache: &PageCache) -> Encoded<'a> {
    let ps = pages.page_size() as usize;
    // A delta costs its length field besides; a page, nothing more.
    let limit = ps.saturating_sub(16);
    let mut e = Encoded::default();
    for (off, data) in pages.iter() {
        let Some(old) = cache.get(off) else {
            e.whole.push((off, data));
            continue;
        };
        let at = e.bytes.len();
        if !super::delta::encode(old, data, &mut e.bytes, limit) {
            e.whole.push((off, data));
        } else if e.bytes.len() > at {
            e.deltas.push((off, at..e.bytes.len()));
        }
    }
    e
}

/// What [`write_epoch`] wrote.
#[derive(Debug, Clone, Copy, Default)]
struct Written {
    pages: u64,
    deltas: u64,
}

/// Writes epoch `epoch`'s records at `start` (a page `cache` holds as a
/// delta against it); returns where they end and what they hold.
fn write_epoch(
    file: &File,
    start: u64,
    epoch: u64,
    begin: &Begin,
    pages: &EpochPages,
    cache: &PageCache,
    state: &MachineState,
) -> std::io::Result<(u64, Written)> {
    let mut out = Out { file, off: start, buf: Vec::with_capacity(WRITE_BATCH + (1 << 20)) };
    let mut c = Commit::default();
    c.bytes += out.record(Kind::Begin, epoch, &[&begin.encode()])?;
    let enc = encode_pages(pages, cache);
    for chunk in enc.whole.chunks(PAGES_PER_RECORD) {
        let offsets: Vec<u64> = chunk.iter().map(|(o, _)| *o).collect();
        let head = format::encode_page_offsets(&offsets);
        let mut pieces: Vec<&[u8]> = vec![&head];
        pieces.extend(chunk.iter().map(|(_, d)| *d));
        c.bytes += out.record(Kind::Pages, epoch, &pieces)?;
        c.pages += chunk.len() as u64;
        c.page_records += 1;
    }
    for chunk in enc.deltas.chunks(DELTAS_PER_RECORD) {
        let offsets: Vec<u64> = chunk.iter().map(|(o, _)| *o).collect();
        let lens: Vec<u32> = chunk.iter().map(|(_, r)| r.len() as u32).collect();
        let head = format::encode_delta_heads(&offsets, &lens);
        let mut pieces: Vec<&[u8]> = vec![&head];
        pieces.extend(chunk.iter().map(|(_, r)| &enc.bytes[r.clone()]));
        c.bytes += out.record(Kind::Deltas, epoch, &pieces)?;
        c.pages += chunk.len() as u64;
        c.page_records += 1;
    }
    let json = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    c.bytes += out.record(Kind::State, epoch, &[&json])?;
    out.record(Kind::Commit, epoch, &[&c.encode()])?;
    out.flush()?;
    Ok((out.off, Written { pages: c.pages, deltas: enc.deltas.len() as u64 }))
}

#[cfg(test)]
mod base_failure_tests {
    use super::*;

    #[test]
    fn an_error_on_the_base_is_a_base_failure_and_one_on_a_segment_is_not() {
        let base = Path::new("/j/base.img");
        let eio = || std::io::Error::from_raw_os_error(libc::EIO);
        let e = JournalError::Base { path: base.into(), op: "fdatasync", offset: 0x1000, end: 0x3000, source: eio() };
        let f = BaseFailure::of(e, base, (3, 7)).unwrap();
        assert_eq!(
            (f.errno, f.op, f.offset, f.end, f.epochs, f.attempts),
            (Some(5), "fdatasync", 0x1000, 0x3000, (3, 7), 1)
        );
        assert!(f.message.starts_with("/j/base.img: fdatasync of bytes 0x1000..0x3000: "), "{}", f.message);
        let f = BaseFailure::of(JournalError::Io { path: base.into(), op: "read a page", source: eio() }, base, (1, 1));
        assert!(f.unwrap().message.starts_with("/j/base.img: read a page: "));
        let seg = Path::new("/j/seg-0.smj");
        let other =
            BaseFailure::of(JournalError::Io { path: seg.into(), op: "fdatasync", source: eio() }, base, (1, 1));
        assert!(matches!(other, Err(JournalError::Io { path, .. }) if path == seg));
    }
}
