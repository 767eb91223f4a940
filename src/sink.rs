//! Sinks: where written-back pages go. The writeback engine writes through
//! the [`Sink`] trait, into the backing file itself or into an image file
//! (the VMM's `--writeback-image`). The snapshot pre-copy's staging image
//! and the tracking view's shadow image are [`ImageFile`]s too, written
//! with [`Sink::write_set`] directly.
//!
//! Snapshots and migration do not go through a sink: a snapshot copies
//! extents of the backing file (or of its staging image) into its own
//! files, checksummed per chunk ([`crate::snapshot`]), and a migration
//! frames pages onto a stream ([`crate::migration::frame`]).
//!
//! - [`BackingFileSink`]: the pages already live in the `MAP_SHARED` file's
//!   page cache; writing them back is `sync_file_range(WAIT_BEFORE | WRITE
//!   | WAIT_AFTER)` per coalesced extent, and `sync` is `fdatasync`.
//! - [`ImageFile`]: `pwrite`s pages into another file at their guest RAM
//!   offsets (the backing file's layout); `sync` is `fdatasync`. With RAM
//!   in shared memory (`smudge run --backing-file`, a restore), the image
//!   is the only copy on disk. An image still being built in the
//!   background (a restore copying the restored RAM into it) takes
//!   no page before its [`ImageReady`] says it is built: the build would
//!   otherwise overwrite the guest's newer pages with older ones.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use vm_memory::{Bytes, GuestAddress};

use crate::dirty_set::DirtySet;
use crate::memory::{ram_layout, GuestRam, RamRegion};

/// Why a sink write failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Creating or opening the image failed.
    #[error("{path}: cannot create image file")]
    Create {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading guest memory failed.
    #[error("reading guest memory at {gpa:#x}+{len:#x}: {msg}")]
    ReadGuest {
        /// Address.
        gpa: u64,
        /// Length.
        len: u64,
        /// vm-memory's message.
        msg: String,
    },
    /// Writing the image failed (the pages stay dirty for the caller).
    #[error("{path}: writing {len} bytes at offset {offset:#x} failed")]
    Write {
        /// The image.
        path: PathBuf,
        /// File offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Flushing the file failed.
    #[error("{path}: {op} failed")]
    Sync {
        /// The file.
        path: PathBuf,
        /// `fdatasync` or `sync_file_range`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The image was to be built first, and its build failed.
    #[error("{path}: not built: {why}")]
    NotBuilt {
        /// The image.
        path: PathBuf,
        /// Why the build failed.
        why: String,
    },
    /// A page outside guest RAM.
    #[error("guest address {gpa:#x} is not in RAM")]
    NotInRam {
        /// Address.
        gpa: u64,
    },
}

/// Where the writeback engine sends pages.
pub trait Sink: Send + std::fmt::Debug {
    /// Writes the pages of `set` (coalesced into extents). On error, some
    /// extents may have been written; the caller keeps the whole set dirty.
    /// Returns the bytes written.
    fn write_set(&mut self, ram: &GuestRam, set: &DirtySet) -> Result<u64, SinkError>;

    /// Makes everything written so far durable (data and the metadata
    /// needed to read it back).
    fn sync(&mut self) -> Result<(), SinkError>;

    /// A name for logs and stats.
    fn name(&self) -> String;

    /// Whether writing a page out leaves it writable for the guest (a
    /// copy out of RAM), so the engine may skip re-protecting a hot page.
    /// Not the backing file: its host writeback write-protects the page
    /// (`page_mkclean`) whatever the engine does.
    fn leaves_pages_writable(&self) -> bool {
        false
    }
}

fn file_offset(layout: &[RamRegion], gpa: u64) -> Result<u64, SinkError> {
    crate::memory::gpa_to_file_offset(layout, gpa).ok_or(SinkError::NotInRam { gpa })
}

fn fdatasync(file: &File, path: &Path) -> Result<(), SinkError> {
    file.sync_data().map_err(|source| SinkError::Sync { path: path.to_path_buf(), op: "fdatasync", source })
}

/// Persists pages of the `MAP_SHARED` backing file itself.
#[derive(Debug)]
pub struct BackingFileSink {
    file: File,
    path: PathBuf,
    layout: Vec<RamRegion>,
}

impl BackingFileSink {
    /// A sink for the backing file `file` (at `path`) of `size` bytes of RAM.
    pub fn new(file: File, path: &Path, size: u64) -> Self {
        BackingFileSink { file, path: path.to_path_buf(), layout: ram_layout(size) }
    }
}

impl Sink for BackingFileSink {
    /// Two rounds, like `filemap_fdatawrite` then `filemap_fdatawait`:
    /// start write-out of every extent, then wait for each, so the disk
    /// sees all of them at once instead of one at a time.
    fn write_set(&mut self, _ram: &GuestRam, set: &DirtySet) -> Result<u64, SinkError> {
        use std::os::fd::AsRawFd;
        let extents = set.extents();
        let mut total = 0;
        let rounds = [
            libc::SYNC_FILE_RANGE_WRITE,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        ];
        for (round, flags) in rounds.into_iter().enumerate() {
            for e in &extents {
                let offset = file_offset(&self.layout, e.gpa)?;
                // SAFETY: sync_file_range only reads the fd and the range; it
                // touches no memory of ours.
                let r = unsafe { libc::sync_file_range(self.file.as_raw_fd(), offset as i64, e.len as i64, flags) };
                if r != 0 {
                    return Err(SinkError::Sync {
                        path: self.path.clone(),
                        op: "sync_file_range",
                        source: io::Error::last_os_error(),
                    });
                }
                if round == 1 {
                    total += e.len;
                }
            }
        }
        Ok(total)
    }

    fn sync(&mut self) -> Result<(), SinkError> {
        fdatasync(&self.file, &self.path)
    }

    fn name(&self) -> String {
        format!("backing file {}", self.path.display())
    }
}

/// Whether an image being built in the background is done: shared by
/// the builder, which says so once ([`ImageReady::built`] or
/// [`ImageReady::failed`]), and the [`ImageFile`] sink, which waits for it
/// before its first write.
#[derive(Debug, Clone, Default)]
pub struct ImageReady {
    state: Arc<(Mutex<BuildState>, Condvar)>,
}

/// None while the build runs; then built, or why it failed.
type BuildState = Option<Result<(), String>>;

impl ImageReady {
    /// Not built yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The image holds what it was built from: writes may go in.
    pub fn built(&self) {
        self.set(Ok(()));
    }

    /// The build failed: every write fails with `why`.
    pub fn failed(&self, why: &dyn std::fmt::Display) {
        self.set(Err(why.to_string()));
    }

    fn set(&self, r: Result<(), String>) {
        let (m, cv) = &*self.state;
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
        if s.is_none() {
            *s = Some(r);
        }
        cv.notify_all();
    }

    /// Whether the build is over (built or failed).
    pub fn is_over(&self) -> bool {
        self.state.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Waits until the build is over; its error names `path`.
    pub fn wait(&self, path: &Path) -> Result<(), SinkError> {
        let (m, cv) = &*self.state;
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match &*s {
                Some(Ok(())) => return Ok(()),
                Some(Err(why)) => return Err(SinkError::NotBuilt { path: path.to_path_buf(), why: why.clone() }),
                None => s = cv.wait(s).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// A file holding guest RAM at its backing-file offsets.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    path: PathBuf,
    layout: Vec<RamRegion>,
    buf: Vec<u8>,
    /// A build to wait for before the first write.
    ready: Option<ImageReady>,
    /// Keep the image out of the page cache ([`ImageFile::dropping_cache`]).
    drop_cache: bool,
    /// File ranges the last two write-outs wrote, newest first: at each
    /// write-out the last one's are hinted away (which starts their
    /// writeback: the kernel drops only clean pages), and the one's before
    /// again (written back by now, so they go).
    last_written: [Vec<(u64, u64)>; 2],
}

impl ImageFile {
    /// Opens `path` (created if missing) as an image of `size` bytes of RAM.
    pub fn open(path: &Path, size: u64) -> Result<Self, SinkError> {
        let create = |source| SinkError::Create { path: path.to_path_buf(), source };
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(create)?;
        file.set_len(size).map_err(create)?;
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            layout: ram_layout(size),
            buf: Vec::new(),
            ready: None,
            drop_cache: false,
            last_written: [Vec::new(), Vec::new()],
        })
    }

    /// This image, kept out of the host's page cache: each write-out drops
    /// the ranges the one before wrote, each sync the whole file. For the
    /// writeback engine's image of RAM in shared memory, where the cached
    /// image would be a second copy of guest RAM; not for an image read
    /// back soon (a snapshot's staging image).
    pub fn dropping_cache(mut self) -> Self {
        self.drop_cache = true;
        self
    }

    /// This image, taking no page before `ready` says its build is over
    /// (a failed build fails every write and sync).
    pub fn after(mut self, ready: ImageReady) -> Self {
        self.ready = Some(ready);
        self
    }

    /// Waits for the build this image was made [`after`](Self::after).
    fn wait_built(&mut self) -> Result<(), SinkError> {
        if let Some(r) = &self.ready {
            r.wait(&self.path)?;
            self.ready = None;
        }
        Ok(())
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open image file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// `POSIX_FADV_DONTNEED` over `[offset, offset + len)` (`len` 0: to the
    /// end): the clean cached pages go, dirty ones start writeback. With
    /// RAM in shared memory the image's page cache would be a second copy
    /// of guest RAM on the host; a hint, so its failure changes nothing.
    fn drop_cached(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fadvise only reads the fd and the range; it touches
        // no memory of ours.
        let r =
            unsafe { libc::posix_fadvise(self.file.as_raw_fd(), offset as i64, len as i64, libc::POSIX_FADV_DONTNEED) };
        if r != 0 {
            tracing::debug!(
                "{}: posix_fadvise(DONTNEED) failed: {}",
                self.path.display(),
                io::Error::from_raw_os_error(r)
            );
        }
    }
}

impl Sink for ImageFile {
    /// Copies every page of `set` from `ram` into the image, one `pwrite`
    /// per coalesced extent.
    fn write_set(&mut self, ram: &GuestRam, set: &DirtySet) -> Result<u64, SinkError> {
        self.wait_built()?;
        let [last, before] = std::mem::take(&mut self.last_written);
        for &(offset, len) in last.iter().chain(&before) {
            self.drop_cached(offset, len);
        }
        self.last_written = [Vec::new(), last];
        let mut total = 0;
        for e in set.extents() {
            let offset = file_offset(&self.layout, e.gpa)?;
            self.buf.resize(e.len as usize, 0);
            ram.read_slice(&mut self.buf, GuestAddress(e.gpa)).map_err(|err| SinkError::ReadGuest {
                gpa: e.gpa,
                len: e.len,
                msg: err.to_string(),
            })?;
            self.file.write_all_at(&self.buf, offset).map_err(|source| SinkError::Write {
                path: self.path.clone(),
                offset,
                len: e.len,
                source,
            })?;
            if self.drop_cache {
                self.last_written[0].push((offset, e.len));
            }
            total += e.len;
        }
        Ok(total)
    }

    /// `fdatasync`, then the whole image leaves the page cache (all of it
    /// clean now): the host keeps about one copy of guest RAM.
    fn sync(&mut self) -> Result<(), SinkError> {
        self.wait_built()?;
        fdatasync(&self.file, &self.path)?;
        self.last_written = [Vec::new(), Vec::new()];
        if self.drop_cache {
            self.drop_cached(0, 0);
        }
        Ok(())
    }

    fn name(&self) -> String {
        format!("image {}", self.path.display())
    }

    fn leaves_pages_writable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::BackingFile;

    /// An image made `after` a build takes no page until the build is
    /// over; a failed build fails every write with its reason.
    #[test]
    fn an_image_waits_for_its_build() {
        let dir = tempfile::tempdir().unwrap();
        let backing = BackingFile::memfd("sink-test", 1 << 20).unwrap();
        let ram = backing.map(false).unwrap();
        ram.write_slice(&[7u8; 4096], GuestAddress(0x3000)).unwrap();
        let mut set = DirtySet::new(&[crate::kvm::Slot { slot: 0, gpa: 0, size: 1 << 20 }], 4096);
        assert!(set.set_gpa(0x3000));
        let ready = ImageReady::new();
        let mut image = ImageFile::open(&dir.path().join("img"), 1 << 20).unwrap().after(ready.clone());
        let writer = std::thread::spawn(move || image.write_set(&ram, &set).map(|n| (n, image)));
        // The build "runs": nothing reached the image.
        assert!(!ready.is_over());
        assert_eq!(std::fs::read(dir.path().join("img")).unwrap()[0x3000], 0);
        ready.built();
        let (n, _) = writer.join().unwrap().unwrap();
        assert_eq!(n, 4096);
        assert_eq!(std::fs::read(dir.path().join("img")).unwrap()[0x3000..0x4000], [7u8; 4096]);

        let failed = ImageReady::new();
        failed.failed(&"disk full");
        let mut image = ImageFile::open(&dir.path().join("img2"), 1 << 20).unwrap().after(failed);
        let e = image.sync().unwrap_err().to_string();
        assert_eq!(e, format!("{}: not built: disk full", dir.path().join("img2").display()));
    }
}
