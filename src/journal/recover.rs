//! Reading a journal back: [`scan`] finds the committed epochs (stopping
//! at the first record that is torn, fails a checksum or breaks the
//! sequence), and [`recover`] builds the RAM of one of them — the base
//! image plus every committed epoch up to it, in order, each page written
//! once with its newest content — with its machine state.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::format::{self, Begin, Commit, Header, Kind, RecordError, SegmentHead, HEADER};
use super::replay::Replay;
use super::{JournalError, BASE, CHECKPOINT};
use crate::file_io::{copy_range, data_ranges};
use crate::machine_state::MachineState;

/// The `format` field of the checkpoint file.
pub const CHECKPOINT_FORMAT: &str = "smudge-journal";

/// The checkpoint file: the journal's identity and what the base holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Always [`CHECKPOINT_FORMAT`].
    pub format: String,
    /// The journal's identity (hex), named by every segment.
    pub journal: String,
    /// Guest RAM bytes.
    pub ram_size: u64,
    /// Bytes per page.
    pub page_size: u64,
    /// The newest epoch whose pages the base may hold (0: none).
    pub base_epoch: u64,
    /// Whether the base holds every epoch up to `base_epoch` (false while
    /// a checkpoint is being written into it).
    pub complete: bool,
    /// CRC-32 of this file serialized with this field 0.
    pub checksum: u32,
}

impl Checkpoint {
    /// The journal id as a number.
    pub fn journal_id(&self) -> Option<u128> {
        u128::from_str_radix(&self.journal, 16).ok()
    }

    fn sum(&self) -> u32 {
        let zero = Checkpoint { checksum: 0, ..self.clone() };
        crc32fast::hash(&serde_json::to_vec(&zero).unwrap_or_default())
    }

    /// Reads and checks `DIR/checkpoint.json`.
    pub fn load(dir: &Path) -> Result<Checkpoint, JournalError> {
        let path = dir.join(CHECKPOINT);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(JournalError::NotAJournal(dir.into())),
            Err(e) => return Err(JournalError::io(&path, "read")(e)),
        };
        let bad = |why: String| JournalError::BadCheckpoint { path: path.clone(), why };
        let c: Checkpoint = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if c.format != CHECKPOINT_FORMAT || c.journal_id().is_none() {
            return Err(bad("not a smudge journal checkpoint".into()));
        }
        if c.sum() != c.checksum {
            return Err(bad("checksum mismatch".into()));
        }
        Ok(c)
    }

    /// Writes it as `DIR/checkpoint.json`, atomically (temp file, sync,
    /// rename, sync of the directory).
    pub fn store(&self, dir: &Path) -> Result<(), JournalError> {
        let c = Checkpoint { checksum: self.sum(), ..self.clone() };
        let tmp = dir.join(format!(".{CHECKPOINT}.tmp"));
        let bytes = serde_json::to_vec_pretty(&c).unwrap_or_default();
        (|| {
            let mut f = File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()
        })()
        .map_err(JournalError::io(&tmp, "write"))?;
        std::fs::rename(&tmp, dir.join(CHECKPOINT)).map_err(JournalError::io(&tmp, "rename"))?;
        super::sync_dir(dir)
    }
}

/// A committed epoch found by [`scan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EpochInfo {
    /// Its number.
    pub epoch: u64,
    /// The VM it is of.
    pub vm: u128,
    /// Its boundary, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// Pages it holds.
    pub pages: u64,
    /// Of those, pages held as deltas against their previous records.
    pub delta_pages: u64,
    /// Bytes of its records.
    pub bytes: u64,
    /// Its segment.
    pub segment: PathBuf,
    /// Where its first record starts in the segment.
    pub start: u64,
    /// Where its commit record ends.
    pub end: u64,
}

/// Where a scan ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ScanEnd {
    /// At the end of the last segment, after a commit.
    Clean,
    /// At a record that is torn, fails a checksum or breaks the sequence;
    /// nothing after it is used.
    Stopped {
        /// The segment.
        segment: PathBuf,
        /// The record's offset.
        offset: u64,
        /// What is wrong with it.
        why: String,
        /// Later segment files not read.
        ignored_segments: usize,
    },
}

/// A segment found by [`scan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SegmentInfo {
    /// Its file.
    pub path: PathBuf,
    /// Its sequence number.
    pub sequence: u64,
    /// Its format version (1: no deltas).
    pub version: u32,
    /// Its size on disk.
    pub file_len: u64,
    /// Where its last committed epoch ends (the header's end if none).
    pub committed_len: u64,
}

/// What a journal holds.
#[derive(Debug, Clone)]
pub struct Scan {
    /// Its checkpoint file.
    pub checkpoint: Checkpoint,
    /// Its committed epochs, oldest first, numbers consecutive.
    pub epochs: Vec<EpochInfo>,
    /// The segments read.
    pub segments: Vec<SegmentInfo>,
    /// Where reading stopped.
    pub end: ScanEnd,
}

impl Scan {
    /// The newest committed epoch.
    pub fn newest(&self) -> Option<&EpochInfo> {
        self.epochs.last()
    }

    /// The epochs a recovery may land on: those not older than the base.
    pub fn recoverable(&self) -> impl DoubleEndedIterator<Item = &EpochInfo> {
        let base = self.checkpoint.base_epoch;
        self.epochs.iter().filter(move |e| e.epoch >= base)
    }
}

/// The segment files of `dir`, by sequence number.
pub fn segment_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut v = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(JournalError::io(dir, "read directory"))? {
        let entry = entry.map_err(JournalError::io(dir, "read directory"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let seq = name.strip_prefix("seg-").and_then(|s| s.strip_suffix(".smj"));
        if let Some(seq) = seq.and_then(|s| u64::from_str_radix(s, 16).ok()) {
            v.push((seq, entry.path()));
        }
    }
    v.sort();
    Ok(v)
}

/// Reads `dir`'s committed epochs (see the module doc).
pub fn scan(dir: &Path) -> Result<Scan, JournalError> {
    let checkpoint = Checkpoint::load(dir)?;
    let files = segment_files(dir)?;
    let mut r = Reader {
        cp: &checkpoint,
        epochs: Vec::new(),
        segments: Vec::new(),
        next_epoch: None,
        next_seq: None,
        version: format::VERSION,
    };
    let mut end = ScanEnd::Clean;
    for (i, (seq, path)) in files.iter().enumerate() {
        if let Some((offset, why)) = r.segment(*seq, path)? {
            end = ScanEnd::Stopped { segment: path.clone(), offset, why, ignored_segments: files.len() - i - 1 };
            break;
        }
    }
    let (epochs, segments) = (r.epochs, r.segments);
    if let Some(first) = epochs.first() {
        if first.epoch > checkpoint.base_epoch + 1 {
            return Err(JournalError::Gap { base: checkpoint.base_epoch, first: first.epoch });
        }
    }
    Ok(Scan { checkpoint, epochs, segments, end })
}

/// What a scan knows between records.
struct Reader<'a> {
    cp: &'a Checkpoint,
    epochs: Vec<EpochInfo>,
    segments: Vec<SegmentInfo>,
    next_epoch: Option<u64>,
    next_seq: Option<u64>,
    /// The format version of the segment being read.
    version: u32,
}

/// An epoch being read: from its begin record to its commit.
struct Open {
    begin: Begin,
    epoch: u64,
    start: u64,
    pages: u64,
    deltas: u64,
    page_records: u64,
    bytes: u64,
    state: bool,
}

/// One record read at an offset.
fn read_record(file: &File, off: u64, file_len: u64) -> Result<Result<(Header, Vec<u8>), RecordError>, std::io::Error> {
    let mut hb = [0u8; HEADER];
    if !format::read_at(file, &mut hb, off)? {
        return Ok(Err(RecordError::Torn));
    }
    let h = match Header::decode(&hb) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    if h.len > file_len.saturating_sub(off + HEADER as u64) {
        return Ok(Err(RecordError::Torn));
    }
    let mut payload = vec![0u8; h.len as usize];
    if !format::read_at(file, &mut payload, off + HEADER as u64)? {
        return Ok(Err(RecordError::Torn));
    }
    Ok(h.check(&payload).map(|()| (h, payload)))
}

impl Reader<'_> {
    /// Reads one segment; Some((offset, why)) where it stopped early.
    fn segment(&mut self, seq: u64, path: &Path) -> Result<Option<(u64, String)>, JournalError> {
        let file = File::open(path).map_err(JournalError::io(path, "open"))?;
        let file_len = file.metadata().map_err(JournalError::io(path, "stat"))?.len();
        let io = JournalError::io(path, "read");
        let (h, p) = match read_record(&file, 0, file_len).map_err(io)? {
            Ok(r) => r,
            Err(e) => return Ok(Some((0, format!("segment header: {e}")))),
        };
        let head = match (h.kind, SegmentHead::decode(&p)) {
            (Kind::Segment, Ok(s)) => s,
            // Intact, but of a format this smudge does not know: not a
            // torn tail to stop at quietly.
            (Kind::Segment, Err(why @ RecordError::Version(_))) => {
                return Err(JournalError::Record { path: path.into(), offset: 0, why })
            }
            _ => return Ok(Some((0, "not a segment header".into()))),
        };
        if Some(head.journal) != self.cp.journal_id() || head.sequence != seq {
            return Ok(Some((0, "a segment of another journal or out of place".into())));
        }
        if self.next_seq.is_some_and(|n| n != seq) || self.next_epoch.is_some_and(|n| n != h.epoch) {
            return Ok(Some((0, format!("segment {seq} does not follow the one before"))));
        }
        self.next_seq = Some(seq + 1);
        self.next_epoch = Some(h.epoch);
        self.version = head.version;
        let mut off = HEADER as u64 + h.len;
        let mut info =
            SegmentInfo { path: path.into(), sequence: seq, version: head.version, file_len, committed_len: off };
        let mut open: Option<Open> = None;
        let stopped = loop {
            if off == file_len {
                break open.map(|o| (o.start, format!("epoch {} has no commit record", o.epoch)));
            }
            let (h, p) = match read_record(&file, off, file_len).map_err(JournalError::io(path, "read"))? {
                Ok(r) => r,
                Err(e) => break Some((open.map_or(off, |o| o.start), format!("record at {off:#x}: {e}"))),
            };
            let rec_end = off + HEADER as u64 + h.len;
            match self.step(&mut open, h, &p, off, path) {
                Ok(Some(e)) => {
                    info.committed_len = rec_end;
                    self.next_epoch = Some(e.epoch + 1);
                    self.epochs.push(e);
                }
                Ok(None) => {}
                Err(why) => break Some((open.map_or(off, |o| o.start), format!("record at {off:#x}: {why}"))),
            }
            off = rec_end;
        };
        self.segments.push(info);
        Ok(stopped)
    }

    /// Takes one record into the epoch being read; the epoch when it is
    /// committed; why not when the record does not belong there.
    fn step(
        &mut self,
        open: &mut Option<Open>,
        h: Header,
        p: &[u8],
        off: u64,
        path: &Path,
    ) -> Result<Option<EpochInfo>, String> {
        let (ram, ps) = (self.cp.ram_size, self.cp.page_size);
        match (h.kind, open.as_mut()) {
            (Kind::Begin, None) => {
                if self.next_epoch.is_some_and(|n| n != h.epoch) {
                    return Err(format!("epoch {} where {:?} was next", h.epoch, self.next_epoch));
                }
                let begin = Begin::decode(p).map_err(|e| e.to_string())?;
                if begin.ram_size != ram || begin.page_size != ps {
                    return Err(format!("epoch {} is of another RAM shape", h.epoch));
                }
                let bytes = p.len() as u64;
                *open = Some(Open {
                    begin,
                    epoch: h.epoch,
                    start: off,
                    pages: 0,
                    deltas: 0,
                    page_records: 0,
                    bytes,
                    state: false,
                });
                Ok(None)
            }
            (Kind::Pages, Some(o)) if o.epoch == h.epoch && !o.state => {
                let (offsets, _) = format::decode_pages(p, ps, ram).map_err(|e| e.to_string())?;
                o.pages += offsets.len() as u64;
                o.page_records += 1;
                o.bytes += p.len() as u64;
                Ok(None)
            }
            (Kind::Deltas, Some(o)) if o.epoch == h.epoch && !o.state && self.version >= 2 => {
                // Every delta parsed and checked against the page size.
                let n = format::decode_deltas(p, ps, ram).map_err(|e| e.to_string())?.len() as u64;
                o.pages += n;
                o.deltas += n;
                o.page_records += 1;
                o.bytes += p.len() as u64;
                Ok(None)
            }
            (Kind::State, Some(o)) if o.epoch == h.epoch && !o.state => {
                serde_json::from_slice::<MachineState>(p).map_err(|e| format!("machine state: {e}"))?;
                o.state = true;
                o.bytes += p.len() as u64;
                Ok(None)
            }
            (Kind::Commit, Some(o)) if o.epoch == h.epoch && o.state => {
                let c = Commit::decode(p).map_err(|e| e.to_string())?;
                if c != (Commit { pages: o.pages, page_records: o.page_records, bytes: o.bytes }) {
                    return Err(format!("epoch {}: the commit record does not count what precedes it", o.epoch));
                }
                let e = EpochInfo {
                    epoch: o.epoch,
                    vm: o.begin.vm,
                    time_ns: o.begin.time_ns,
                    pages: o.pages,
                    delta_pages: o.deltas,
                    bytes: off + HEADER as u64 + h.len - o.start,
                    segment: path.into(),
                    start: o.start,
                    end: off + HEADER as u64 + h.len,
                };
                *open = None;
                Ok(Some(e))
            }
            (k, _) => Err(format!("a {k:?} record out of place (epoch {})", h.epoch)),
        }
    }
}

/// A page of an epoch as its record holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageData<'a> {
    /// The whole page.
    Whole(&'a [u8]),
    /// Its changes since its previous record (see `delta.rs`): applied to
    /// the page as the records before left it.
    Delta(&'a [u8]),
}

/// Reads committed epoch `e` again (checking every record once more),
/// handing each of its pages to `page` (file offset, data); returns its
/// machine state.
pub fn read_epoch(
    e: &EpochInfo,
    cp: &Checkpoint,
    mut page: impl FnMut(u64, PageData<'_>) -> Result<(), JournalError>,
) -> Result<MachineState, JournalError> {
    let path = &e.segment;
    let file = File::open(path).map_err(JournalError::io(path, "open"))?;
    let mut off = e.start;
    let mut state = None;
    while off < e.end {
        let (h, p) = read_record(&file, off, e.end)
            .map_err(JournalError::io(path, "read"))?
            .map_err(|why| JournalError::Record { path: path.clone(), offset: off, why })?;
        match h.kind {
            Kind::Pages => {
                let (offsets, data) = format::decode_pages(&p, cp.page_size, cp.ram_size)
                    .map_err(|why| JournalError::Record { path: path.clone(), offset: off, why })?;
                let ps = cp.page_size as usize;
                for (i, &o) in offsets.iter().enumerate() {
                    page(o, PageData::Whole(&data[i * ps..(i + 1) * ps]))?;
                }
            }
            Kind::Deltas => {
                let deltas = format::decode_deltas(&p, cp.page_size, cp.ram_size)
                    .map_err(|why| JournalError::Record { path: path.clone(), offset: off, why })?;
                for (o, d) in deltas {
                    page(o, PageData::Delta(d))?;
                }
            }
            Kind::State => {
                state = Some(serde_json::from_slice(&p).map_err(|source| JournalError::State {
                    path: path.clone(),
                    epoch: e.epoch,
                    source,
                })?);
            }
            _ => {}
        }
        off += HEADER as u64 + h.len;
    }
    state.ok_or_else(|| JournalError::Record {
        path: path.clone(),
        offset: e.start,
        why: RecordError::Malformed(Kind::State),
    })
}

/// Which committed epoch to recover.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// The newest.
    Newest,
    /// This one.
    Epoch(u64),
    /// The newest at least this much older than the newest (`--at -2s`).
    Before(Duration),
}

/// A recovered epoch.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The epoch.
    pub epoch: EpochInfo,
    /// Its machine state.
    pub state: MachineState,
    /// Guest RAM bytes.
    pub ram_size: u64,
    /// Epochs applied on the base.
    pub epochs_applied: u64,
    /// Page bytes written over the base (each page once).
    pub bytes_applied: u64,
}

impl Scan {
    /// The epoch `target` names.
    pub fn pick(&self, target: Target, dir: &Path) -> Result<&EpochInfo, JournalError> {
        let newest = self.newest().ok_or_else(|| JournalError::NoEpoch(dir.into()))?;
        let oldest = self.recoverable().next().map_or(newest.epoch, |e| e.epoch);
        let want = match target {
            Target::Newest => newest.epoch,
            Target::Epoch(n) => n,
            Target::Before(d) => {
                let t = newest.time_ns.saturating_sub(d.as_nanos() as u64);
                self.recoverable().rev().find(|e| e.time_ns <= t).map_or(0, |e| e.epoch)
            }
        };
        self.recoverable().find(|e| e.epoch == want).ok_or(JournalError::NotRetained {
            want,
            oldest,
            newest: newest.epoch,
        })
    }
}

/// Builds the RAM of the epoch `target` names in a new file `out` (the
/// base, then each committed epoch up to it, in order) and returns that
/// epoch with its machine state. `out` must not exist.
pub fn recover(dir: &Path, target: Target, out: &Path) -> Result<Recovered, JournalError> {
    let scan = scan(dir)?;
    let cp = &scan.checkpoint;
    let epoch = scan.pick(target, dir)?.clone();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(JournalError::io(out, "create"))?;
    let built = build(dir, &scan, &epoch, &f, out);
    if built.is_err() {
        // A partial memory file is no one's.
        let _ = std::fs::remove_file(out);
    }
    let (applied, bytes, state) = built?;
    Ok(Recovered { epoch, state, ram_size: cp.ram_size, epochs_applied: applied, bytes_applied: bytes })
}

/// Pages a recovery gathers in memory before writing them out (a page
/// written by several epochs is written once per this much).
const RECOVERY_BUFFER: u64 = 256 << 20;

/// Copies `len` bytes at `off` of the base into `f`. An error names the
/// file that failed and where (`copy_file_range` does not say which side
/// did): the range is copied again through a buffer to find out.
fn copy_base_range(
    (base, base_path): (&File, &Path),
    (f, out): (&File, &Path),
    off: u64,
    len: u64,
) -> Result<(), JournalError> {
    if copy_range(base, f, off, len).is_ok() {
        return Ok(());
    }
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut at = off;
    while at < off + len {
        let n = (off + len - at).min(buf.len() as u64);
        let chunk = &mut buf[..n as usize];
        base.read_exact_at(chunk, at).map_err(|source| JournalError::Base {
            path: base_path.into(),
            op: "read",
            offset: at,
            end: at + n,
            source,
        })?;
        f.write_all_at(chunk, at).map_err(JournalError::io(out, "copy the base"))?;
        at += n;
    }
    Ok(())
}

/// Writes the base and the epochs up to `epoch` into `f` (at `out`);
/// returns the epochs applied, the bytes written over the base and the
/// epoch's state.
fn build(
    dir: &Path,
    scan: &Scan,
    epoch: &EpochInfo,
    f: &File,
    out: &Path,
) -> Result<(u64, u64, MachineState), JournalError> {
    let cp = &scan.checkpoint;
    f.set_len(cp.ram_size).map_err(JournalError::io(out, "set length"))?;
    let base_path = dir.join(BASE);
    let base = File::open(&base_path).map_err(JournalError::io(&base_path, "open"))?;
    for (off, len) in data_ranges(&base, cp.ram_size).map_err(JournalError::io(&base_path, "find data"))? {
        copy_base_range((&base, &base_path), (f, out), off, len)?;
    }
    let (mut applied, mut state) = (0, None);
    let mut replay = Replay::new(f, out, cp.page_size, RECOVERY_BUFFER);
    for e in scan.epochs.iter().take_while(|e| e.epoch <= epoch.epoch) {
        let s = read_epoch(e, cp, |off, data| replay.page(off, data))?;
        applied += 1;
        if e.epoch == epoch.epoch {
            state = Some(s);
        }
    }
    let bytes = replay.finish()?;
    f.sync_all().map_err(JournalError::io(out, "fsync"))?;
    let state = state.ok_or_else(|| JournalError::NoEpoch(dir.into()))?;
    Ok((applied, bytes, state))
}
