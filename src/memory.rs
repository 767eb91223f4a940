//! Guest RAM backed by a file: open or create it at an exact size, map it
//! `MAP_SHARED` through vm-memory with an `AtomicBitmap`, so every write the
//! VMM makes through vm-memory is logged (DESIGN.md invariant 2).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Guest memory as the VMM and the library see it: mmap-backed regions with
/// a VMM-side dirty bitmap.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// Why the backing file or its mapping could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size zero or not a multiple of the page size.
    #[error("memory size {size:#x} must be a non-zero multiple of the page size ({page:#x})")]
    BadSize {
        /// Requested size in bytes.
        size: u64,
        /// Host page size.
        page: u64,
    },
    /// An existing file has another size; it is left untouched.
    #[error("{path}: existing memory file is {have} bytes, --mem-size asks for {want}; refusing to resize it")]
    WrongSize {
        /// The file.
        path: PathBuf,
        /// Its size.
        have: u64,
        /// The requested size.
        want: u64,
    },
    /// The path exists but is no regular file.
    #[error("{path}: not a regular file")]
    NotRegular {
        /// The path.
        path: PathBuf,
    },
    /// Opening or creating the file failed.
    #[error("{path}: cannot open or create memory file")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Growing the new file to its size failed (e.g. no space or quota).
    #[error("{path}: cannot size new memory file to {size} bytes")]
    Resize {
        /// The path.
        path: PathBuf,
        /// The size.
        size: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// mmap failed.
    #[error("cannot map {size} bytes of guest memory")]
    Map {
        /// The size.
        size: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory refused the region layout.
    #[error("cannot build guest memory")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
}

/// The host page size (never a literal 4096 scattered around).
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory effects; _SC_PAGESIZE is always valid.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

/// The file that holds guest RAM.
#[derive(Debug)]
pub struct BackingFile {
    file: File,
    path: PathBuf,
    size: u64,
    created: bool,
}

impl BackingFile {
    /// Opens `path` if it exists (it must be exactly `size` bytes: it is
    /// never truncated or grown), else creates it as a sparse file of `size`.
    pub fn open_or_create(path: &Path, size: u64) -> Result<Self, MemoryError> {
        let page = host_page_size();
        if size == 0 || size % page != 0 {
            return Err(MemoryError::BadSize { size, page });
        }
        let open_err = |source| MemoryError::Open {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::metadata(path) {
            Ok(meta) => {
                if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
                    return Err(MemoryError::NotRegular {
                        path: path.to_path_buf(),
                    });
                }
                if meta.len() != size {
                    return Err(MemoryError::WrongSize {
                        path: path.to_path_buf(),
                        have: meta.len(),
                        want: size,
                    });
                }
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(open_err)?;
                Ok(BackingFile {
                    file,
                    path: path.to_path_buf(),
                    size,
                    created: false,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(open_err)?;
                if let Err(source) = file.set_len(size) {
                    // We made it; do not leave a half-made file behind.
                    let _ = std::fs::remove_file(path);
                    return Err(MemoryError::Resize {
                        path: path.to_path_buf(),
                        size,
                        source,
                    });
                }
                Ok(BackingFile {
                    file,
                    path: path.to_path_buf(),
                    size,
                    created: true,
                })
            }
            Err(e) => Err(open_err(e)),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether this call created the file (it was not there before).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Maps the whole file `MAP_SHARED` as guest RAM starting at guest
    /// physical address 0, with a VMM dirty bitmap. `hugepages` asks the
    /// kernel for transparent huge pages on the mapping (`MADV_HUGEPAGE`).
    pub fn map(&self, hugepages: bool) -> Result<GuestRam, MemoryError> {
        let file = self.file.try_clone().map_err(|source| MemoryError::Open {
            path: self.path.clone(),
            source,
        })?;
        let region =
            MmapRegion::<AtomicBitmap>::from_file(FileOffset::new(file, 0), self.size as usize)
                .map_err(|source| MemoryError::Map {
                    size: self.size,
                    source,
                })?;
        if hugepages {
            // SAFETY: the range is exactly the mapping vm-memory just made and
            // owns; MADV_HUGEPAGE only changes how the kernel backs it.
            let r = unsafe {
                libc::madvise(region.as_ptr().cast(), region.size(), libc::MADV_HUGEPAGE)
            };
            if r != 0 {
                tracing::warn!(
                    "madvise(MADV_HUGEPAGE) failed: {}",
                    io::Error::last_os_error()
                );
            }
        }
        let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or(MemoryError::Map {
            size: self.size,
            source: vm_memory::mmap::MmapRegionError::InvalidPointer,
        })?;
        GuestMemoryMmap::from_regions(vec![region]).map_err(MemoryError::Layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_sparse_file_of_exact_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mem");
        let b = BackingFile::open_or_create(&p, 1 << 20).unwrap();
        assert!(b.created());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        let again = BackingFile::open_or_create(&p, 1 << 20).unwrap();
        assert!(!again.created());
    }

    #[test]
    fn wrong_size_is_refused_and_file_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mem");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        let e = BackingFile::open_or_create(&p, 1 << 20).unwrap_err();
        assert!(
            matches!(
                e,
                MemoryError::WrongSize {
                    have: 8192,
                    want: 1048576,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 8192]);
    }

    #[test]
    fn bad_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mem");
        assert!(matches!(
            BackingFile::open_or_create(&p, 0),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(matches!(
            BackingFile::open_or_create(&p, 100),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(!p.exists());
    }

    #[test]
    fn vmm_writes_are_logged() {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
        let dir = tempfile::tempdir().unwrap();
        let b = BackingFile::open_or_create(&dir.path().join("mem"), 1 << 20).unwrap();
        let ram = b.map(false).unwrap();
        ram.write_obj(0xabu8, GuestAddress(0x3000)).unwrap();
        let region = ram.find_region(GuestAddress(0)).unwrap();
        assert!(region.bitmap().dirty_at(0x3000));
        assert!(!region.bitmap().dirty_at(0x2000));
        // and it reached the file through the shared mapping
        let bytes = std::fs::read(b.path()).unwrap();
        assert_eq!(bytes[0x3000], 0xab);
    }
}
