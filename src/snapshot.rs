//! Snapshots on disk: a directory per snapshot, committed atomically.
//!
//! ```text
//! DIR/manifest.json   {"format":"smudge-snapshot","version":1,"id":…,"parent":null,
//!                      "kind":"full","mem_size":…,"layout":[…],
//!                      "files":{"memory.img":{"len":…,"chunk":1048576,"crc32":[…]},
//!                               "state.json":{"len":…,"chunk":…,"crc32":[…]}}}
//! DIR/memory.img      guest RAM at backing-file offsets, sparse (holes = zero)
//! DIR/state.json      vCPU state (registers, FPU, MSRs, LAPIC, events)
//! ```
//!
//! A diff snapshot holds only the pages dirtied since its parent:
//!
//! ```text
//! DIR/extents.json    [[file_offset, len], …] in order
//! DIR/memory.diff     the extents' bytes, back to back
//! ```
//!
//! and its manifest names the parent's id and directory; a chain is a full
//! snapshot followed by diffs, restored (or merged) oldest first.
//!
//! Every file carries a CRC-32 per 1 MiB chunk, so a corrupt byte is named
//! by file and offset. A chunk's CRC is always that of its bytes as read,
//! a hole reading as zeros; a chunk that is all hole is not read at all —
//! its CRC is that of a chunk of zeros — so checksumming a sparse image
//! costs what it holds, not its size. The manifest is written last — temp
//! file, fsync, rename, fsync of the directory — so a crash at any instant
//! leaves either no snapshot or a complete one.
//!
//! The directory is checked before anything is written (a path, an empty
//! or new directory, a parent that exists, room to write), and a snapshot
//! that fails at any later step removes what it wrote.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::kvm::vcpu_state::VcpuState;
use crate::memory::{ram_layout, RamRegion};

/// The `format` field of every manifest.
pub const FORMAT: &str = "smudge-snapshot";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Bytes per checksum chunk.
pub const CHUNK: u64 = 1 << 20;

/// Length and chunk checksums of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSum {
    /// Length in bytes.
    pub len: u64,
    /// Chunk size of the checksums.
    pub chunk: u64,
    /// CRC-32 of each chunk, in order.
    pub crc32: Vec<u32>,
}

/// The snapshot's table of contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Format version.
    pub version: u32,
    /// Unique id of this snapshot.
    pub id: String,
    /// Id of the parent snapshot (diffs; none for a full one).
    pub parent: Option<String>,
    /// Where the parent was written (absolute path), for diffs.
    #[serde(default)]
    pub parent_dir: Option<PathBuf>,
    /// `full`.
    pub kind: String,
    /// Guest RAM size.
    pub mem_size: u64,
    /// Guest RAM layout (guest address, file offset, length).
    pub layout: Vec<RamRegion>,
    /// vCPU count.
    pub vcpus: usize,
    /// Files and their checksums.
    pub files: BTreeMap<String, FileSum>,
    /// CRC-32 of this manifest serialized with this field 0: a flipped bit
    /// anywhere in the manifest (a size, a parent id) is caught too.
    #[serde(default)]
    pub checksum: u32,
}

impl Manifest {
    /// What [`Manifest::checksum`] must hold: the CRC-32 of the manifest
    /// serialized with that field 0.
    pub fn self_checksum(&self) -> u32 {
        let mut m = self.clone();
        m.checksum = 0;
        crc32fast::hash(&serde_json::to_vec(&m).unwrap_or_default())
    }
}

/// The machine state besides memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    /// One per vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// The devices' registers.
    #[serde(default)]
    pub devices: DeviceState,
}

/// Device state that a snapshot carries (the exit and sync ports have none).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// COM1's registers (None: a snapshot from before they were saved; the
    /// UART starts at its reset values).
    pub com1: Option<UartState>,
}

/// A 16550's registers, as vm-superio's `SerialState` holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct UartState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// Why a snapshot could not be written, checked or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The target directory is in use.
    #[error("{0}: exists and is not empty; refusing to overwrite a snapshot")]
    NotEmpty(PathBuf),
    /// The target directory cannot hold a snapshot.
    #[error("snapshot directory '{path}': {why}")]
    BadDir {
        /// The directory asked for.
        path: PathBuf,
        /// Why it cannot be used.
        why: String,
    },
    /// A file operation failed.
    #[error("{path}: {op} failed")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file's contents do not match the manifest.
    #[error("{path}: corrupt at offset {offset:#x}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// First offset found bad.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// The manifest is not one this code reads.
    #[error("{path}: {what}")]
    Unsupported {
        /// The manifest.
        path: PathBuf,
        /// Why.
        what: String,
    },
    /// The memory file to restore into exists already.
    #[error("{0}: exists; restore makes a new memory file and will not overwrite one")]
    MemExists(PathBuf),
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { path: path.to_path_buf(), op, source }
}

/// The data ranges of a sparse file (`SEEK_DATA` / `SEEK_HOLE`).
pub fn data_ranges(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a file we own; it only moves our offset.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        out.push((data as u64, (hole.min(len as i64) - data) as u64));
        pos = hole;
    }
    Ok(out)
}

/// Copies `[off, off + len)` of `src` to the same offset of `dst` in the
/// kernel (`copy_file_range`).
pub fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let (mut a, mut b) = ((off + done) as i64, (off + done) as i64);
        // SAFETY: both fds are open files we own; the offsets are plain
        // integers the kernel reads and advances.
        let n = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut a, dst.as_raw_fd(), &mut b, (len - done) as usize, 0)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            // Another filesystem (EXDEV), or one without the call: copy
            // through a buffer instead.
            return match e.raw_os_error() {
                Some(libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                    copy_range_buffered(src, dst, off + done, len - done)
                }
                _ => Err(e),
            };
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "source ended early"));
        }
        done += n as u64;
    }
    Ok(())
}

/// [`copy_range`] through a 1 MiB buffer (`pread`/`pwrite`).
fn copy_range_buffered(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(CHUNK) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        src.read_exact_at(&mut buf[..n], off + done)?;
        dst.write_all_at(&buf[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

/// CRC-32 of `n` zero bytes: the checksum of a chunk that is all hole.
fn zero_crc(n: usize) -> u32 {
    static FULL_CHUNK: OnceLock<u32> = OnceLock::new();
    let calc = || crc32fast::hash(&vec![0u8; n]);
    if n as u64 == CHUNK {
        *FULL_CHUNK.get_or_init(calc)
    } else {
        calc()
    }
}

/// Whether `[start, start + n)` of `file` may hold data: false only when
/// `SEEK_DATA` says it is all hole. A filesystem without `SEEK_DATA` says
/// every byte is data.
fn may_hold_data(file: &File, start: u64, n: u64) -> io::Result<bool> {
    let at = i64::try_from(start).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a file we hold open; it only moves the file's
    // offset, which nothing here relies on (reads are positioned).
    let data = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
    if data < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(false), // no data from `start` to the end
            Some(libc::EINVAL | libc::EOPNOTSUPP) => Ok(true),
            _ => Err(e),
        };
    }
    Ok((data as u64) < start.saturating_add(n))
}

/// The CRC-32 of the `buf.len()` bytes at `start` of `file` (holes read
/// as zeros), and how many bytes were read for it: none when the range is
/// all hole. Every writer and reader of chunk checksums uses this, so a
/// sparse chunk and a written chunk of zeros agree.
pub fn chunk_crc(file: &File, start: u64, buf: &mut [u8]) -> io::Result<(u32, u64)> {
    if !may_hold_data(file, start, buf.len() as u64)? {
        return Ok((zero_crc(buf.len()), 0));
    }
    file.read_exact_at(buf, start)?;
    Ok((crc32fast::hash(buf), buf.len() as u64))
}

/// Chunk checksums of the file at `path`, and the bytes read for them.
fn checksum_file(path: &Path) -> Result<(FileSum, u64), SnapshotError> {
    let f = File::open(path).map_err(io_err(path, "open"))?;
    let len = f.metadata().map_err(io_err(path, "stat"))?.len();
    let mut buf = vec![0u8; len.min(CHUNK) as usize];
    let mut crc32 = Vec::new();
    let (mut at, mut read) = (0u64, 0u64);
    while at < len {
        let n = (len - at).min(CHUNK) as usize;
        let (crc, r) = chunk_crc(&f, at, &mut buf[..n]).map_err(io_err(path, "read"))?;
        crc32.push(crc);
        read += r;
        at += n as u64;
    }
    Ok((FileSum { len, chunk: CHUNK, crc32 }, read))
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir, "fsync directory"))
}

/// Checks that `dir` can take a new snapshot, before anything is written:
/// a non-empty path; an empty directory, or a new one whose parent
/// directory exists. Errors name the path and the rule. (Whether it is
/// writable shows at the first write, whose failure removes what was made:
/// the VMM's system-call filter allows no `access`.)
pub fn check_dir(dir: &Path) -> Result<(), SnapshotError> {
    let bad = |why: String| SnapshotError::BadDir { path: dir.to_path_buf(), why };
    if dir.as_os_str().is_empty() {
        return Err(bad("an empty path (name the directory to write the snapshot into)".into()));
    }
    match std::fs::metadata(dir) {
        Ok(md) if !md.is_dir() => return Err(bad("exists and is not a directory".into())),
        Ok(_) => {
            if std::fs::read_dir(dir).map_err(io_err(dir, "read directory"))?.next().is_some() {
                return Err(SnapshotError::NotEmpty(dir.to_path_buf()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            match std::fs::metadata(&parent) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => return Err(bad(format!("its parent {} is not a directory", parent.display()))),
                Err(e) => return Err(bad(format!("its parent directory {} cannot be used: {e}", parent.display()))),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            return Err(bad("a part of the path before it is not a directory".into()))
        }
        Err(e) => return Err(bad(format!("cannot be examined: {e}"))),
    }
    Ok(())
}

/// What a snapshot in progress has made in its directory, removed again
/// unless the snapshot commits: a failed snapshot leaves the directory as
/// it found it.
#[derive(Debug)]
struct Made {
    dir: PathBuf,
    created_dir: bool,
    files: Vec<PathBuf>,
    committed: bool,
}

impl Made {
    fn file(&mut self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        self.files.push(p.clone());
        p
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for p in self.files.iter().rev() {
            let _ = std::fs::remove_file(p);
        }
        if self.created_dir {
            remove_empty_dir(&self.dir);
        }
    }
}

/// Removes the empty directory `dir`, by `unlinkat` (the VMM's
/// system-call filter allows it; `rmdir` is not).
fn remove_empty_dir(dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return };
    // SAFETY: unlinkat reads the NUL-terminated path `c` owns.
    unsafe { libc::unlinkat(libc::AT_FDCWD, c.as_ptr(), libc::AT_REMOVEDIR) };
}

/// Checks `dir` ([`check_dir`]) and makes it if new.
fn prepare_dir(dir: &Path) -> Result<Made, SnapshotError> {
    check_dir(dir)?;
    let created_dir = !dir.exists();
    if created_dir {
        std::fs::create_dir(dir).map_err(|e| SnapshotError::BadDir {
            path: dir.to_path_buf(),
            why: format!("cannot be created (not writable?): {e}"),
        })?;
    }
    Ok(Made { dir: dir.to_path_buf(), created_dir, files: Vec::new(), committed: false })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut f = File::create(path).map_err(io_err(path, "create"))?;
    f.write_all(bytes).and_then(|_| f.sync_data()).map_err(io_err(path, "write"))
}

fn to_json<T: Serialize>(path: &Path, v: &T) -> Result<Vec<u8>, SnapshotError> {
    serde_json::to_vec_pretty(v).map_err(|e| SnapshotError::Io {
        path: path.to_path_buf(),
        op: "serialize",
        source: io::Error::other(e),
    })
}

fn new_id() -> String {
    format!(
        "{:x}-{:x}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
        std::process::id()
    )
}

/// A snapshot whose data is written but not yet durable or committed: the
/// vCPUs may run again while [`Pending::commit`] syncs and checksums.
/// Dropped uncommitted (or failing to commit), it removes what it wrote.
#[derive(Debug)]
pub struct Pending {
    made: Made,
    manifest: Manifest,
    names: &'static [&'static str],
    bytes: u64,
}

/// A committed snapshot.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Its manifest.
    pub manifest: Manifest,
    /// Memory bytes written.
    pub memory_bytes: u64,
    /// Bytes read to checksum its files (chunks that are all hole are not
    /// read).
    pub checksum_read_bytes: u64,
}

impl Pending {
    /// Memory bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Syncs the files, checksums them and commits the manifest atomically.
    /// Returns the manifest and the bytes of memory written.
    pub fn commit(self) -> Result<(Manifest, u64), SnapshotError> {
        self.commit_counted().map(|c| (c.manifest, c.memory_bytes))
    }

    /// [`Pending::commit`], saying also how much the checksums read.
    pub fn commit_counted(mut self) -> Result<Committed, SnapshotError> {
        let t0 = std::time::Instant::now();
        let dir = self.made.dir.clone();
        for name in self.names {
            let p = dir.join(name);
            File::open(&p).and_then(|f| f.sync_data()).map_err(io_err(&p, "fdatasync"))?;
        }
        let synced = t0.elapsed();
        let (m, read) = commit(&mut self.made, self.manifest, self.names)?;
        tracing::debug!(
            "snapshot {}: {} MiB synced in {synced:?}, checksummed ({} MiB read) and committed in {:?}",
            dir.display(),
            self.bytes >> 20,
            read >> 20,
            t0.elapsed() - synced
        );
        Ok(Committed { manifest: m, memory_bytes: self.bytes, checksum_read_bytes: read })
    }
}

/// Checksums `names` in `made`'s directory, writes the manifest to a temp
/// file, syncs it, renames it into place and syncs the directory; then
/// `made` is kept. Returns the manifest and the bytes read to checksum.
fn commit(made: &mut Made, mut m: Manifest, names: &[&str]) -> Result<(Manifest, u64), SnapshotError> {
    let dir = made.dir.clone();
    let mut read = 0;
    for name in names {
        let (sum, r) = checksum_file(&dir.join(name))?;
        m.files.insert((*name).to_string(), sum);
        read += r;
    }
    m.checksum = m.self_checksum();
    let tmp = made.file("manifest.json.tmp");
    write_synced(&tmp, &to_json(&tmp, &m)?)?;
    let fin = made.file("manifest.json");
    std::fs::rename(&tmp, &fin).map_err(io_err(&fin, "rename"))?;
    sync_dir(&dir)?;
    made.committed = true;
    Ok((m, read))
}

fn manifest(kind: &str, mem_size: u64, vcpus: usize, parent: Option<(&Manifest, &Path)>) -> Manifest {
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        id: new_id(),
        parent: parent.map(|(m, _)| m.id.clone()),
        parent_dir: parent.map(|(_, d)| d.to_path_buf()),
        kind: kind.into(),
        mem_size,
        layout: ram_layout(mem_size),
        vcpus,
        files: BTreeMap::new(),
        checksum: 0,
    }
}

/// Writes a full snapshot of guest RAM (`backing`, `mem_size` bytes, data
/// ranges only) and `state` into `dir` (created; must be empty), and
/// commits the manifest atomically. The caller has paused the vCPUs.
/// Returns the manifest and the bytes of memory copied.
pub fn write_full(
    dir: &Path,
    backing: &File,
    mem_size: u64,
    state: &MachineState,
) -> Result<(Manifest, u64), SnapshotError> {
    begin_full(dir, backing, mem_size, state)?.commit()
}

/// The part of [`write_full`] that needs the vCPUs paused: copies the data
/// and writes the state. Commit the result once they run again.
pub fn begin_full(dir: &Path, backing: &File, mem_size: u64, state: &MachineState) -> Result<Pending, SnapshotError> {
    begin_live_full(dir, backing, mem_size)?.finish(state)
}

/// A full snapshot whose `memory.img` is written while the guest may still
/// run (a live snapshot): the pages written since the first copy are
/// copied again ([`LiveFull::copy_extents`]) until, with the vCPUs paused,
/// the last of them and the state make it one point in time.
#[derive(Debug)]
pub struct LiveFull {
    made: Made,
    img: File,
    mem_path: PathBuf,
    mem_size: u64,
    bytes: u64,
}

/// Starts a full snapshot in `dir` (created; must be empty): copies every
/// data range of guest RAM (`backing`, `mem_size` bytes) into
/// `memory.img`. Pages the guest writes meanwhile are the caller's to copy
/// again.
pub fn begin_live_full(dir: &Path, backing: &File, mem_size: u64) -> Result<LiveFull, SnapshotError> {
    let mut made = prepare_dir(dir)?;
    let mem_path = made.file("memory.img");
    let img = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&mem_path)
        .map_err(io_err(&mem_path, "create"))?;
    img.set_len(mem_size).map_err(io_err(&mem_path, "size"))?;
    let mut live = LiveFull { made, img, mem_path, mem_size, bytes: 0 };
    let data = data_ranges(backing, mem_size).map_err(io_err(&live.mem_path, "SEEK_DATA on the memory file"))?;
    live.copy_extents(backing, &data)?;
    Ok(live)
}

impl LiveFull {
    /// Copies `extents` (backing-file offset, length) of `backing` into the
    /// image again. Returns the bytes copied.
    pub fn copy_extents(&mut self, backing: &File, extents: &[(u64, u64)]) -> Result<u64, SnapshotError> {
        let mut n = 0;
        for &(off, len) in extents {
            match off.checked_add(len) {
                Some(end) if end <= self.mem_size => {}
                _ => {
                    return Err(SnapshotError::Io {
                        path: self.mem_path.clone(),
                        op: "copy an extent",
                        source: io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("{off:#x}+{len:#x} is outside {:#x} bytes of RAM", self.mem_size),
                        ),
                    })
                }
            }
            copy_range(backing, &self.img, off, len).map_err(io_err(&self.mem_path, "copy_file_range"))?;
            n += len;
        }
        self.bytes += n;
        Ok(n)
    }

    /// Memory bytes copied so far (a page copied twice counts twice).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes `state` (the point in time the image now holds); commit the
    /// result with [`Pending::commit`].
    pub fn finish(mut self, state: &MachineState) -> Result<Pending, SnapshotError> {
        let state_path = self.made.file("state.json");
        let mut f = File::create(&state_path).map_err(io_err(&state_path, "create"))?;
        f.write_all(&to_json(&state_path, state)?).map_err(io_err(&state_path, "write"))?;
        Ok(Pending {
            made: self.made,
            manifest: manifest("full", self.mem_size, state.vcpus.len(), None),
            names: &["memory.img", "state.json"],
            bytes: self.bytes,
        })
    }
}

/// Bytes a diff gathers from its extents before one write.
const PACK_BATCH: usize = 4 << 20;

/// Starts a diff snapshot: the bytes of `extents` (backing-file offset,
/// length) read from `backing`, on top of `parent` (written in
/// `parent_dir`), with the vCPUs paused; [`Pending::commit`] finishes it.
pub fn begin_diff(
    dir: &Path,
    parent: &Manifest,
    parent_dir: &Path,
    backing: &File,
    extents: &[(u64, u64)],
    state: &MachineState,
) -> Result<Pending, SnapshotError> {
    let mut made = prepare_dir(dir)?;
    let ext_path = made.file("extents.json");
    let mut f = File::create(&ext_path).map_err(io_err(&ext_path, "create"))?;
    f.write_all(&to_json(&ext_path, &extents)?).map_err(io_err(&ext_path, "write"))?;
    let data_path = made.file("memory.diff");
    let data = File::create(&data_path).map_err(io_err(&data_path, "create"))?;
    // Extents are packed back to back: read each into a batch buffer and
    // write the batch at once (a diff of scattered pages is mostly
    // one-page extents; a write per extent doubled the system calls).
    let mut pos = 0u64;
    let mut buf = Vec::with_capacity(PACK_BATCH);
    let flush = |buf: &mut Vec<u8>, pos: &mut u64| -> Result<(), SnapshotError> {
        data.write_all_at(buf, *pos).map_err(io_err(&data_path, "write"))?;
        *pos += buf.len() as u64;
        buf.clear();
        Ok(())
    };
    for &(off, len) in extents {
        let (mut off, mut len) = (off, len as usize);
        while len > 0 {
            let n = len.min(PACK_BATCH - buf.len());
            let at = buf.len();
            buf.resize(at + n, 0);
            backing.read_exact_at(&mut buf[at..], off).map_err(io_err(&data_path, "read the memory file"))?;
            (off, len) = (off + n as u64, len - n);
            if buf.len() == PACK_BATCH {
                flush(&mut buf, &mut pos)?;
            }
        }
    }
    if !buf.is_empty() {
        flush(&mut buf, &mut pos)?;
    }
    let state_path = made.file("state.json");
    let mut f = File::create(&state_path).map_err(io_err(&state_path, "create"))?;
    f.write_all(&to_json(&state_path, state)?).map_err(io_err(&state_path, "write"))?;
    let parent_dir = std::path::absolute(parent_dir).map_err(io_err(parent_dir, "resolve"))?;
    Ok(Pending {
        made,
        manifest: manifest("diff", parent.mem_size, state.vcpus.len(), Some((parent, &parent_dir))),
        names: &["extents.json", "memory.diff", "state.json"],
        bytes: pos,
    })
}

/// The data files a snapshot of `kind` (with or without a parent) holds;
/// `None` for a kind this code does not read.
fn data_files(kind: &str, has_parent: bool) -> Option<&'static [&'static str]> {
    match (kind, has_parent) {
        ("full", false) => Some(&["memory.img", "state.json"]),
        ("diff", true) => Some(&["extents.json", "memory.diff", "state.json"]),
        _ => None,
    }
}

/// Parses the bytes of a `manifest.json` (`file` names it in errors) and
/// makes every check [`verify`] makes before it reads the data files:
/// format, version, the manifest's own checksum, the kind, and a length
/// and well-formed chunk checksums for each data file of that kind.
pub fn parse_manifest(bytes: &[u8], file: &Path) -> Result<Manifest, SnapshotError> {
    let mpath = file.to_path_buf();
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| SnapshotError::Corrupt {
        path: mpath.clone(),
        offset: e.column() as u64,
        what: format!("not a manifest: {e}"),
    })?;
    if m.format != FORMAT {
        return Err(SnapshotError::Unsupported { path: mpath, what: format!("format '{}' is not {FORMAT}", m.format) });
    }
    if m.version != VERSION {
        return Err(SnapshotError::Unsupported {
            path: mpath,
            what: format!("format version {} (this smudge reads {VERSION})", m.version),
        });
    }
    if m.checksum != m.self_checksum() {
        return Err(SnapshotError::Corrupt {
            path: mpath,
            offset: 0,
            what: "manifest checksum mismatch (the manifest itself was altered)".into(),
        });
    }
    let Some(names) = data_files(&m.kind, m.parent.is_some()) else {
        return Err(SnapshotError::Unsupported {
            path: mpath,
            what: format!("snapshot kind '{}' (parent {:?}) not supported", m.kind, m.parent),
        });
    };
    for &name in names {
        let want = m.files.get(name).ok_or_else(|| SnapshotError::Corrupt {
            path: mpath.clone(),
            offset: 0,
            what: format!("manifest lists no {name}"),
        })?;
        // What `checksum_file` writes: anything else would leave chunks
        // unchecked (a short list) or name wrong offsets.
        if want.chunk != CHUNK || want.crc32.len() as u64 != want.len.div_ceil(CHUNK) {
            return Err(SnapshotError::Corrupt {
                path: mpath.clone(),
                offset: 0,
                what: format!(
                    "{name}: {} checksums of {}-byte chunks for {} bytes (expected {}-byte chunks)",
                    want.crc32.len(),
                    want.chunk,
                    want.len,
                    CHUNK
                ),
            });
        }
    }
    Ok(m)
}

/// Reads and checks `dir`: format, version, every file's length and chunk
/// checksums. Errors name the file and the first bad offset.
pub fn verify(dir: &Path) -> Result<Manifest, SnapshotError> {
    verify_files(dir, |_| true)
}

/// [`verify`] without reading the memory files (`memory.img`,
/// `memory.diff`): only their lengths are checked, their chunks are left
/// to a reader that checks each before it uses it (a lazy restore). The
/// small files (state, extents) are checked in full.
pub fn verify_lazily(dir: &Path) -> Result<Manifest, SnapshotError> {
    verify_files(dir, |name| !name.starts_with("memory."))
}

fn verify_files(dir: &Path, read_in_full: impl Fn(&str) -> bool) -> Result<Manifest, SnapshotError> {
    let mpath = dir.join("manifest.json");
    let text = std::fs::read(&mpath).map_err(io_err(&mpath, "read"))?;
    let m = parse_manifest(&text, &mpath)?;
    // parse_manifest found every one of them listed.
    let names = data_files(&m.kind, m.parent.is_some()).unwrap_or_default();
    for (&name, want) in names.iter().filter_map(|n| Some((n, m.files.get(*n)?))) {
        let p = dir.join(name);
        if !read_in_full(name) {
            let len = std::fs::metadata(&p).map_err(io_err(&p, "stat"))?.len();
            if len != want.len {
                return Err(SnapshotError::Corrupt {
                    path: p,
                    offset: len.min(want.len),
                    what: format!("length {len} but the manifest says {}", want.len),
                });
            }
            continue;
        }
        let (got, _) = checksum_file(&p)?;
        if got.len != want.len {
            return Err(SnapshotError::Corrupt {
                path: p,
                offset: got.len.min(want.len),
                what: format!("length {} but the manifest says {}", got.len, want.len),
            });
        }
        if let Some(i) = got.crc32.iter().zip(&want.crc32).position(|(a, b)| a != b) {
            return Err(SnapshotError::Corrupt {
                path: p,
                offset: i as u64 * want.chunk,
                what: format!("checksum mismatch in the {} KiB chunk at this offset", want.chunk >> 10),
            });
        }
    }
    Ok(m)
}

/// Parses the bytes of a `state.json` (`file` names it in errors) and
/// checks it holds `vcpus` vCPUs, as the manifest says.
pub fn parse_state(bytes: &[u8], vcpus: usize, file: &Path) -> Result<MachineState, SnapshotError> {
    let s: MachineState = serde_json::from_slice(bytes).map_err(|e| SnapshotError::Corrupt {
        path: file.to_path_buf(),
        offset: 0,
        what: format!("not a machine state: {e}"),
    })?;
    if s.vcpus.len() != vcpus {
        return Err(SnapshotError::Corrupt {
            path: file.to_path_buf(),
            offset: 0,
            what: format!("{} vCPUs, manifest says {vcpus}", s.vcpus.len()),
        });
    }
    Ok(s)
}

/// Parses the bytes of an `extents.json` (`file` names it in errors): the
/// (file offset, length) extents of a diff whose `memory.diff` holds
/// `data_len` bytes, over RAM of `mem_size` bytes. Checks that they are in
/// order, do not overlap, lie within RAM and add up to `data_len`, so
/// applying them writes only inside RAM and reads all of the data.
pub fn parse_extents(
    bytes: &[u8],
    mem_size: u64,
    data_len: u64,
    file: &Path,
) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let corrupt = |offset: u64, what: String| SnapshotError::Corrupt { path: file.to_path_buf(), offset, what };
    let extents: Vec<(u64, u64)> =
        serde_json::from_slice(bytes).map_err(|e| corrupt(e.column() as u64, format!("not an extent table: {e}")))?;
    let (mut end, mut total) = (0u64, 0u64);
    for (i, &(off, len)) in extents.iter().enumerate() {
        let Some(e) = off.checked_add(len).filter(|&e| e <= mem_size) else {
            return Err(corrupt(0, format!("extent {i} ({off:#x}+{len:#x}) is outside the {mem_size:#x}-byte RAM")));
        };
        if off < end {
            return Err(corrupt(0, format!("extent {i} ({off:#x}+{len:#x}) overlaps or precedes the one before it")));
        }
        end = e;
        // Cannot overflow: the extents are disjoint and within mem_size.
        total += len;
    }
    if total != data_len {
        return Err(corrupt(0, format!("extents hold {total} bytes but memory.diff has {data_len}")));
    }
    Ok(extents)
}

/// Checks `dir` and reads its machine state.
pub fn load(dir: &Path) -> Result<(Manifest, MachineState), SnapshotError> {
    let m = verify(dir)?;
    let p = dir.join("state.json");
    let text = std::fs::read(&p).map_err(io_err(&p, "read"))?;
    let s = parse_state(&text, m.vcpus, &p)?;
    Ok((m, s))
}

/// The chain ending at `dir`, oldest (the full snapshot) first, every link
/// checked.
pub fn chain(dir: &Path) -> Result<Vec<(PathBuf, Manifest)>, SnapshotError> {
    chain_checked(dir, verify)
}

/// [`chain`], each link checked by [`verify_lazily`]: its memory files'
/// chunks are the reader's to check.
pub fn chain_lazily(dir: &Path) -> Result<Vec<(PathBuf, Manifest)>, SnapshotError> {
    chain_checked(dir, verify_lazily)
}

fn chain_checked(
    dir: &Path,
    verify: fn(&Path) -> Result<Manifest, SnapshotError>,
) -> Result<Vec<(PathBuf, Manifest)>, SnapshotError> {
    let mut out = Vec::new();
    let mut cur = dir.to_path_buf();
    loop {
        let m = verify(&cur)?;
        let next = m.parent_dir.clone();
        let parent_id = m.parent.clone();
        out.push((cur.clone(), m));
        match (next, parent_id) {
            (None, _) => break,
            (Some(p), Some(id)) => {
                let pm = verify(&p)?;
                if pm.id != id {
                    return Err(SnapshotError::Corrupt {
                        path: cur.join("manifest.json"),
                        offset: 0,
                        what: format!("parent {} holds snapshot {}, not {id}", p.display(), pm.id),
                    });
                }
                if out.len() > 10_000 {
                    return Err(SnapshotError::Corrupt { path: p, offset: 0, what: "snapshot chain loops".into() });
                }
                cur = p;
            }
            (Some(p), None) => {
                return Err(SnapshotError::Corrupt {
                    path: p,
                    offset: 0,
                    what: "parent directory without a parent id".into(),
                })
            }
        }
    }
    out.reverse();
    Ok(out)
}

/// Writes the diff in `dir` (`data_len` bytes of `memory.diff`, as its
/// verified manifest says) into `dst`, RAM of `mem_size` bytes.
fn apply_diff(dir: &Path, mem_size: u64, data_len: u64, dst: &File, dst_path: &Path) -> Result<(), SnapshotError> {
    let ext_path = dir.join("extents.json");
    let text = std::fs::read(&ext_path).map_err(io_err(&ext_path, "read"))?;
    let extents = parse_extents(&text, mem_size, data_len, &ext_path)?;
    let data_path = dir.join("memory.diff");
    let data = File::open(&data_path).map_err(io_err(&data_path, "open"))?;
    let mut pos = 0u64;
    // At most a chunk at a time, whatever an extent's length.
    let mut buf = vec![0u8; CHUNK as usize];
    for (off, len) in extents {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            data.read_exact_at(&mut buf[..n], pos + done).map_err(io_err(&data_path, "read"))?;
            dst.write_all_at(&buf[..n], off + done).map_err(io_err(dst_path, "write"))?;
            done += n as u64;
        }
        pos += len;
    }
    Ok(())
}

/// Writes the RAM of the chain ending at `dir` into the new file `mem`:
/// the full snapshot's data ranges (holes stay holes), then every diff in
/// order.
pub fn materialize(dir: &Path, mem: &Path) -> Result<Manifest, SnapshotError> {
    materialize_with(dir, mem, &mut |_, _| {})
}

/// [`materialize`], reporting (bytes done, bytes in all) as it copies.
pub fn materialize_with(dir: &Path, mem: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<Manifest, SnapshotError> {
    if mem.exists() {
        return Err(SnapshotError::MemExists(mem.to_path_buf()));
    }
    let links = chain(dir)?;
    let (full_dir, full) = &links[0];
    let src_path = full_dir.join("memory.img");
    let src = File::open(&src_path).map_err(io_err(&src_path, "open"))?;
    let dst = OpenOptions::new().read(true).write(true).create_new(true).open(mem).map_err(io_err(mem, "create"))?;
    let r = (|| {
        dst.set_len(full.mem_size).map_err(io_err(mem, "size"))?;
        let ranges = data_ranges(&src, full.mem_size).map_err(io_err(&src_path, "SEEK_DATA"))?;
        let diffs: u64 = links[1..].iter().filter_map(|(_, m)| m.files.get("memory.diff").map(|f| f.len)).sum();
        let total = ranges.iter().map(|r| r.1).sum::<u64>() + diffs;
        let mut done = 0;
        for (off, len) in ranges {
            // Copy in 64 MiB steps so progress moves on big images.
            let mut o = off;
            while o < off + len {
                let n = (off + len - o).min(64 << 20);
                copy_range(&src, &dst, o, n).map_err(io_err(mem, "copy_file_range"))?;
                o += n;
                done += n;
                progress(done, total);
            }
        }
        for (d, m) in &links[1..] {
            let data_len = m.files.get("memory.diff").map_or(0, |f| f.len);
            apply_diff(d, full.mem_size, data_len, &dst, mem)?;
            done += data_len;
            progress(done, total);
        }
        dst.sync_data().map_err(io_err(mem, "fdatasync"))
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(mem);
        return Err(e);
    }
    Ok(links.last().map(|(_, m)| m.clone()).unwrap_or_else(|| full.clone()))
}

/// Makes a new memory file at `mem` holding the snapshot's RAM.
pub fn restore_memory(dir: &Path, _m: &Manifest, mem: &Path) -> Result<(), SnapshotError> {
    materialize(dir, mem).map(|_| ())
}

/// Folds the chain ending at `dir` into one full snapshot at `out` (same
/// memory bytes, the last link's machine state).
pub fn merge(dir: &Path, out: &Path) -> Result<Manifest, SnapshotError> {
    merge_with(dir, out, &mut |_, _| {})
}

/// [`merge`], reporting progress like [`materialize_with`].
pub fn merge_with(dir: &Path, out: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<Manifest, SnapshotError> {
    let links = chain(dir)?;
    let last = links.last().map(|(d, _)| d.clone()).unwrap_or_else(|| dir.to_path_buf());
    let (_, state) = load(&last)?;
    let mut made = prepare_dir(out)?;
    let mem_path = made.file("memory.img");
    let m = materialize_with(dir, &mem_path, progress)?;
    let state_path = made.file("state.json");
    write_synced(&state_path, &to_json(&state_path, &state)?)?;
    commit(&mut made, manifest("full", m.mem_size, state.vcpus.len(), None), &["memory.img", "state.json"])
        .map(|(m, _)| m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_verify_and_find_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("mem");
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&mem).unwrap();
        f.set_len(8 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[7u8; 4096], 3 << 20).unwrap();
        let snap = dir.path().join("snap");
        let (m, copied) =
            write_full(&snap, &f, 8 << 20, &MachineState { vcpus: vec![], devices: Default::default() }).unwrap();
        assert!((4096..8 << 20).contains(&copied), "only data ranges are copied: {copied}");
        assert_eq!(verify(&snap).unwrap(), m);
        // a full directory is refused
        assert!(matches!(
            write_full(&snap, &f, 8 << 20, &MachineState { vcpus: vec![], devices: Default::default() }),
            Err(SnapshotError::NotEmpty(_))
        ));
        // restore gives the same bytes
        let back = dir.path().join("back");
        restore_memory(&snap, &m, &back).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&mem).unwrap());
        assert!(matches!(restore_memory(&snap, &m, &back), Err(SnapshotError::MemExists(_))));
        // flip a byte in chunk 3: named by file and offset
        let img = OpenOptions::new().write(true).open(snap.join("memory.img")).unwrap();
        img.write_all_at(&[8u8], (3 << 20) + 5).unwrap();
        let e = verify(&snap).unwrap_err().to_string();
        assert!(e.contains("memory.img: corrupt at offset 0x300000"), "{e}");
        // a manifest from the future is refused
        let mp = snap.join("manifest.json");
        let text = std::fs::read_to_string(&mp).unwrap().replace("\"version\": 1", "\"version\": 9");
        std::fs::write(&mp, text).unwrap();
        assert!(verify(&snap).unwrap_err().to_string().contains("format version 9"));
    }

    #[test]
    fn a_sparse_image_is_checksummed_by_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mem_size = 4u64 << 30;
        let f =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path().join("m")).unwrap();
        f.set_len(mem_size).unwrap();
        // 4 MiB of data: a page at the start of a chunk, a page straddling
        // two chunks, one 1 MiB chunk whole, and a page in the last chunk.
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.write_all_at(&[2u8; 8192], (7 << 20) - 4096).unwrap();
        f.write_all_at(&vec![3u8; 1 << 20], 100 << 20).unwrap();
        f.write_all_at(&[4u8; 4096], mem_size - 4096).unwrap();
        let snap = dir.path().join("snap");
        let c = begin_full(&snap, &f, mem_size, &MachineState::default()).unwrap().commit_counted().unwrap();
        // Only the chunks with data are read (5 of 4096), and state.json.
        let state_len = std::fs::metadata(snap.join("state.json")).unwrap().len();
        assert_eq!(c.checksum_read_bytes, 5 * CHUNK + state_len);
        // A hole chunk's CRC is that of a chunk of zeros: the format and
        // every snapshot written before hole-skipping agree.
        let sums = &c.manifest.files["memory.img"].crc32;
        assert_eq!(sums.len(), 4096);
        assert_eq!(sums[1], crc32fast::hash(&vec![0u8; CHUNK as usize]));
        assert_eq!(sums[6], crc32fast::hash(&[vec![0u8; (1 << 20) - 4096], vec![2u8; 4096]].concat()));
        assert_eq!(verify(&snap).unwrap(), c.manifest);
        // The lazy reader agrees chunk by chunk.
        let (mut pages, _) = crate::snapshot_pages::ChainPages::open(&snap).unwrap();
        pages.check_all().unwrap();
        let mut page = vec![0u8; 4096];
        pages.read(100 << 20, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 3));
        // A corrupt byte in a data chunk is caught, and one written into a
        // hole chunk (it is data now) too.
        let img = OpenOptions::new().read(true).write(true).open(snap.join("memory.img")).unwrap();
        img.write_all_at(&[9u8], (100 << 20) + 77).unwrap();
        let e = verify(&snap).unwrap_err().to_string();
        assert!(e.contains("memory.img: corrupt at offset 0x6400000"), "{e}");
        img.write_all_at(&[3u8], (100 << 20) + 77).unwrap();
        verify(&snap).unwrap();
        img.write_all_at(&[9u8], (2000 << 20) + 5).unwrap();
        let e = verify(&snap).unwrap_err().to_string();
        assert!(e.contains("memory.img: corrupt at offset 0x7d000000"), "{e}");
        let (mut pages, _) = crate::snapshot_pages::ChainPages::open(&snap).unwrap();
        let e = pages.check_all().unwrap_err().to_string();
        assert!(e.contains("memory.img: corrupt at offset 0x7d000000"), "{e}");
    }

    #[test]
    fn a_directory_is_checked_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let f =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path().join("m")).unwrap();
        f.set_len(1 << 20).unwrap();
        let state = MachineState::default();
        let err = |d: &Path| write_full(d, &f, 1 << 20, &state).unwrap_err().to_string();
        assert_eq!(
            err(Path::new("")),
            "snapshot directory '': an empty path (name the directory to write the snapshot into)"
        );
        let deep = dir.path().join("no/such/snap");
        assert!(err(&deep).contains("its parent directory") && err(&deep).contains("no/such"), "{}", err(&deep));
        assert!(!dir.path().join("no").exists(), "nothing is created for a refused directory");
        let file = dir.path().join("m");
        assert!(err(&file).ends_with("/m': exists and is not a directory"), "{}", err(&file));
        let under_file = file.join("snap");
        assert!(err(&under_file).contains("is not a directory"), "{}", err(&under_file));
        // An empty directory is used and kept; a new one is made.
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        write_full(&empty, &f, 1 << 20, &state).unwrap();
        verify(&empty).unwrap();
        assert!(err(&empty).contains("exists and is not empty"));
    }

    #[test]
    fn a_diff_packs_extents_across_batches_in_order() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let mem_size = 16u64 << 20;
        let f =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path().join("mem")).unwrap();
        let bytes: Vec<u8> = (0..mem_size).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&bytes, 0).unwrap();
        let state = MachineState { vcpus: vec![], devices: Default::default() };
        let full = dir.path().join("full");
        let (parent, _) = write_full(&full, &f, mem_size, &state).unwrap();
        // One page, an extent longer than a batch that starts mid-batch,
        // and pages after it: the packed data is their bytes back to back.
        let extents = [(0x1000, 0x1000), (0x3000, (PACK_BATCH as u64) + 0x5000), (0xc0_0000, 0x2000)];
        let diff = dir.path().join("diff");
        let (m, n) = begin_diff(&diff, &parent, &full, &f, &extents, &state).unwrap().commit().unwrap();
        let want: Vec<u8> =
            extents.iter().flat_map(|&(o, l)| bytes[o as usize..(o + l) as usize].iter().copied()).collect();
        assert_eq!(n, want.len() as u64);
        assert_eq!(std::fs::read(diff.join("memory.diff")).unwrap(), want);
        assert_eq!(verify(&diff).unwrap(), m);
    }

    /// Rewrites `dir`'s `name` to `bytes` and reseals the manifest (its
    /// checksum of `name` and its own), as a forger or a buggy writer would.
    fn forge(dir: &Path, name: &str, bytes: &[u8]) {
        std::fs::write(dir.join(name), bytes).unwrap();
        let mp = dir.join("manifest.json");
        let mut m: Manifest = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
        m.files.insert(name.into(), checksum_file(&dir.join(name)).unwrap().0);
        m.checksum = m.self_checksum();
        std::fs::write(&mp, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    }

    #[test]
    fn extent_tables_are_checked_before_any_write() {
        let p = Path::new("extents.json");
        let ok = |t: &str, mem, data| parse_extents(t.as_bytes(), mem, data, p);
        let err = |t: &str, mem, data| ok(t, mem, data).unwrap_err().to_string();
        assert_eq!(ok("[[0,4096],[4096,8192],[16384,4096]]", 1 << 20, 16384).unwrap().len(), 3);
        assert_eq!(ok("[]", 0, 0).unwrap(), vec![]);
        assert!(err("[[1048576,4096]]", 1 << 20, 4096).contains("outside"));
        assert!(err("[[18446744073709547520,8192]]", u64::MAX, 8192).contains("outside"));
        assert!(err("[[8192,4096],[0,4096]]", 1 << 20, 8192).contains("overlaps or precedes"));
        assert!(err("[[0,8192],[4096,4096]]", 1 << 20, 12288).contains("overlaps or precedes"));
        assert!(err("[[0,4096]]", 1 << 20, 8192).contains("hold 4096 bytes but memory.diff has 8192"));
        assert!(err("[[0,4096]", 1 << 20, 4096).contains("not an extent table"));
    }

    #[test]
    fn manifests_with_short_checksum_lists_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("mem");
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&mem).unwrap();
        f.set_len(3 << 20).unwrap();
        let snap = dir.path().join("snap");
        let (m, _) = write_full(&snap, &f, 3 << 20, &MachineState::default()).unwrap();
        let mp = snap.join("manifest.json");
        assert_eq!(parse_manifest(&std::fs::read(&mp).unwrap(), &mp).unwrap(), m);
        // No chunk checksums at all for memory.img: its data went unchecked.
        let mut short = m.clone();
        short.files.get_mut("memory.img").unwrap().crc32.clear();
        short.checksum = short.self_checksum();
        std::fs::write(&mp, serde_json::to_vec(&short).unwrap()).unwrap();
        let e = verify(&snap).unwrap_err().to_string();
        assert!(e.contains("memory.img: 0 checksums of 1048576-byte chunks for 3145728 bytes"), "{e}");
        // A chunk size of 2^63: the offset of a bad chunk overflowed.
        let mut huge = m;
        huge.files.get_mut("memory.img").unwrap().chunk = 1 << 63;
        huge.checksum = huge.self_checksum();
        let e = parse_manifest(&serde_json::to_vec(&huge).unwrap(), &mp).unwrap_err().to_string();
        assert!(e.contains("9223372036854775808-byte chunks"), "{e}");
    }

    #[test]
    fn a_forged_extent_table_cannot_write_outside_ram() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("mem");
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&mem).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        let full = dir.path().join("full");
        let (fm, _) = write_full(&full, &f, 1 << 20, &MachineState::default()).unwrap();
        f.write_all_at(&[2u8; 4096], 8192).unwrap();
        let diff = dir.path().join("diff");
        let state = MachineState::default();
        begin_diff(&diff, &fm, &full, &f, &[(8192, 4096)], &state).unwrap().commit().unwrap();
        let back = dir.path().join("back");
        materialize(&diff, &back).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&mem).unwrap());
        std::fs::remove_file(&back).unwrap();
        // The same 4096 bytes, sent 1 GiB past the end of a 1 MiB RAM: the
        // restore used to grow the memory file to 1 GiB + 4 KiB.
        forge(&diff, "extents.json", b"[[1073741824,4096]]");
        assert!(chain(&diff).is_ok(), "the forged snapshot is self-consistent");
        let e = materialize(&diff, &back).unwrap_err().to_string();
        assert!(e.contains("extents.json: corrupt") && e.contains("outside the 0x100000-byte RAM"), "{e}");
        assert!(!back.exists(), "a failed restore leaves no memory file");
        // An extent of 2^64 - 4096 bytes: the restore used to panic
        // ("capacity overflow") sizing its buffer to the extent.
        forge(&diff, "extents.json", b"[[4096,18446744073709547520]]");
        let e = materialize(&diff, &back).unwrap_err().to_string();
        assert!(e.contains("outside the 0x100000-byte RAM"), "{e}");
    }
}
