//! Writing snapshots: a full one (paused, or live while the guest runs)
//! and a diff on top of a parent, each committed atomically.
//!
//! The directory is checked before anything is written (a path, an empty
//! or new directory, a parent that exists, room to write), and a snapshot
//! that fails at any later step removes what it wrote. The manifest is
//! written last — temp file, fsync, rename, fsync of the directory — so a
//! crash at any instant leaves either no snapshot or a complete one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::format::{checksum_file, io_err, manifest, Manifest, SnapshotError};
use crate::file_io::{copy_range, data_ranges};
use crate::machine_state::MachineState;

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
pub(super) struct Made {
    dir: PathBuf,
    created_dir: bool,
    files: Vec<PathBuf>,
    committed: bool,
}

impl Made {
    /// The path of `name` in the directory, removed with the rest unless
    /// the snapshot commits.
    pub(super) fn file(&mut self, name: &str) -> PathBuf {
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
pub(super) fn prepare_dir(dir: &Path) -> Result<Made, SnapshotError> {
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

pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut f = File::create(path).map_err(io_err(path, "create"))?;
    f.write_all(bytes).and_then(|_| f.sync_data()).map_err(io_err(path, "write"))
}

pub(super) fn to_json<T: Serialize>(path: &Path, v: &T) -> Result<Vec<u8>, SnapshotError> {
    serde_json::to_vec_pretty(v).map_err(|e| SnapshotError::Io {
        path: path.to_path_buf(),
        op: "serialize",
        source: io::Error::other(e),
    })
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
pub(super) fn commit(made: &mut Made, mut m: Manifest, names: &[&str]) -> Result<(Manifest, u64), SnapshotError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::ram_file;
    use crate::snapshot::{restore_memory, verify, ChainPages, CHUNK};

    #[test]
    fn write_verify_and_find_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("mem");
        let f = ram_file(&mem, 8 << 20);
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
        let f = ram_file(&dir.path().join("m"), mem_size);
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
        let (mut pages, _) = ChainPages::open(&snap).unwrap();
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
        let (mut pages, _) = ChainPages::open(&snap).unwrap();
        let e = pages.check_all().unwrap_err().to_string();
        assert!(e.contains("memory.img: corrupt at offset 0x7d000000"), "{e}");
    }

    #[test]
    fn a_directory_is_checked_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let f = ram_file(&dir.path().join("m"), 1 << 20);
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
}
