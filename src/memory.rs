//! Guest RAM backed by a file: open or create it at an exact size, map it
//! `MAP_SHARED` through vm-memory with an `VmmBitmap`, so every write the
//! VMM makes through vm-memory is logged (invariant 2 in docs/architecture.md).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::vmm_bitmap::VmmBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Guest memory as the VMM and the library see it: mmap-backed regions with
/// a VMM-side dirty bitmap.
pub type GuestRam = GuestMemoryMmap<VmmBitmap>;

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
    /// A write outside guest RAM.
    #[error("guest range {gpa:#x}+{len:#x} is not inside one RAM region")]
    OutOfRange {
        /// Guest physical address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Writing guest memory through the file failed.
    #[error("{path}: writing guest memory at {gpa:#x} failed")]
    Write {
        /// The file.
        path: PathBuf,
        /// Guest physical address.
        gpa: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Copying a RAM image into guest memory failed.
    #[error("{path}: loading it into guest memory failed")]
    Load {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
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

/// Largest guest RAM smudge takes from a file or a peer (a snapshot's
/// manifest, a migration's `Hello`): their readers size tables by it, so a
/// forged size must not ask for more than any VM smudge runs.
pub const MAX_MEM: u64 = 1 << 40;

/// A RAM size read from a snapshot or a migration stream that no VM of
/// smudge has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("RAM size {0:#x} is not a page multiple in 1 page ..= 1 TiB")]
pub struct BadRamSize(pub u64);

/// Checks a RAM size read from a snapshot or a migration stream: a
/// non-zero multiple of the guest page size, at most [`MAX_MEM`].
pub fn check_ram_size(size: u64) -> Result<(), BadRamSize> {
    if size == 0 || !size.is_multiple_of(guest_abi::PAGE_SIZE) || size > MAX_MEM {
        return Err(BadRamSize(size));
    }
    Ok(())
}

/// One contiguous piece of guest RAM and where it lives in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RamRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Offset in the backing file.
    pub file_offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The backing-file offset of guest address `gpa` (None: not RAM).
pub fn gpa_to_file_offset(layout: &[RamRegion], gpa: u64) -> Option<u64> {
    layout.iter().find(|r| gpa >= r.gpa && gpa - r.gpa < r.len).map(|r| r.file_offset + (gpa - r.gpa))
}

/// The guest address of backing-file offset `off` (None: past RAM).
pub fn file_offset_to_gpa(layout: &[RamRegion], off: u64) -> Option<u64> {
    layout.iter().find(|r| off >= r.file_offset && off - r.file_offset < r.len).map(|r| r.gpa + (off - r.file_offset))
}

/// Where `size` bytes of RAM go: below [`guest_abi::LOW_RAM_LIMIT`], and
/// the rest from 4 GiB up, leaving the hole for the LAPIC and IOAPIC. The
/// file holds the regions back to back.
pub fn ram_layout(size: u64) -> Vec<RamRegion> {
    let low = size.min(guest_abi::LOW_RAM_LIMIT);
    let mut v = vec![RamRegion { gpa: 0, file_offset: 0, len: low }];
    if size > low {
        v.push(RamRegion { gpa: 4 << 30, file_offset: low, len: size - low });
    }
    v
}

/// `msync(MS_SYNC)` of guest RAM `[gpa, gpa + len)`, which must lie in one
/// region: writes the shared file's pages back and waits.
pub fn msync_range(ram: &GuestRam, gpa: u64, len: u64) -> io::Result<()> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let r = ram.find_region(GuestAddress(gpa)).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let off = gpa - r.start_addr().0;
    if off.checked_add(len).is_none_or(|end| end > r.len()) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let page = host_page_size();
    let start = off & !(page - 1);
    // SAFETY: [start, off + len) lies inside the region's mapping (checked
    // above), which `ram` keeps mapped; msync only asks the kernel to write
    // those pages back.
    let rc = unsafe { libc::msync(r.as_ptr().add(start as usize).cast(), (off + len - start) as usize, libc::MS_SYNC) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
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
        if size == 0 || !size.is_multiple_of(page) {
            return Err(MemoryError::BadSize { size, page });
        }
        let open_err = |source| MemoryError::Open { path: path.to_path_buf(), source };
        match std::fs::metadata(path) {
            Ok(meta) => {
                if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
                    return Err(MemoryError::NotRegular { path: path.to_path_buf() });
                }
                if meta.len() != size {
                    return Err(MemoryError::WrongSize { path: path.to_path_buf(), have: meta.len(), want: size });
                }
                let file = OpenOptions::new().read(true).write(true).open(path).map_err(open_err)?;
                Ok(BackingFile { file, path: path.to_path_buf(), size, created: false })
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
                    return Err(MemoryError::Resize { path: path.to_path_buf(), size, source });
                }
                Ok(BackingFile { file, path: path.to_path_buf(), size, created: true })
            }
            Err(e) => Err(open_err(e)),
        }
    }

    /// Guest RAM in shared memory: a new memfd of `size` bytes (sparse,
    /// reads as zeros), mapped `MAP_SHARED` like any backing file, so the
    /// dirty log, snapshots and userfaultfd's missing-page mode work on it
    /// unchanged. `name` shows in `/proc/PID/maps` and stands for the file
    /// in messages. Nothing persists it by itself: the writeback engine's
    /// image sink writes it to a disk file (`smudge run --backing-file`).
    pub fn memfd(name: &str, size: u64) -> Result<Self, MemoryError> {
        let page = host_page_size();
        if size == 0 || !size.is_multiple_of(page) {
            return Err(MemoryError::BadSize { size, page });
        }
        let path = PathBuf::from(format!("memfd:{name}"));
        let open_err = |source| MemoryError::Open { path: path.clone(), source };
        let c = std::ffi::CString::new(name).map_err(|_| open_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: memfd_create reads the NUL-terminated name (`c` outlives
        // the call) and returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(open_err(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(size).map_err(|source| MemoryError::Resize { path: path.clone(), size, source })?;
        Ok(BackingFile { file, path, size, created: true })
    }

    /// Copies the data ranges of the RAM image at `image` (exactly this
    /// RAM's size; holes stay holes) into this file: a `--backing-file`
    /// run starting where the last one left its RAM.
    pub fn load_image(&self, image: &Path) -> Result<(), MemoryError> {
        let src = File::open(image).map_err(|source| MemoryError::Open { path: image.to_path_buf(), source })?;
        let have = src.metadata().map_err(|source| MemoryError::Open { path: image.to_path_buf(), source })?.len();
        if have != self.size {
            return Err(MemoryError::WrongSize { path: image.to_path_buf(), have, want: self.size });
        }
        let write = |source| MemoryError::Load { path: image.to_path_buf(), source };
        for (off, len) in crate::file_io::data_ranges(&src, self.size).map_err(write)? {
            crate::file_io::copy_range(&src, &self.file, off, len).map_err(write)?;
        }
        Ok(())
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

    /// Maps the whole file `MAP_SHARED` as guest RAM with a VMM dirty
    /// bitmap, laid out by [`ram_layout`]. `hugepages` asks the kernel for
    /// transparent huge pages on the mapping (`MADV_HUGEPAGE`).
    pub fn map(&self, hugepages: bool) -> Result<GuestRam, MemoryError> {
        let mut regions = Vec::new();
        for r in ram_layout(self.size) {
            regions.push(self.map_region(r, hugepages)?);
        }
        GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Layout)
    }

    /// Writes `data` at guest address `gpa` through the file (`pwrite`)
    /// instead of the mapping, and marks the pages in the VMM dirty bitmap
    /// exactly as a vm-memory write would (invariant 2 holds). Used for bulk
    /// boot-time writes: on this machine a first write fault on a new
    /// `MAP_SHARED` ext4 page costs ~180 us, a `pwrite` of it ~20 us.
    pub fn write_at_gpa(&self, ram: &GuestRam, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        use std::os::unix::fs::FileExt;
        use vm_memory::bitmap::Bitmap;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let len = data.len() as u64;
        let (region, r) = ram
            .iter()
            .zip(ram_layout(self.size))
            .find(|(_, r)| gpa >= r.gpa && gpa + len <= r.gpa + r.len)
            .ok_or(MemoryError::OutOfRange { gpa, len })?;
        let off = gpa - r.gpa;
        self.file.write_all_at(data, r.file_offset + off).map_err(|source| MemoryError::Write {
            path: self.path.clone(),
            gpa,
            source,
        })?;
        debug_assert_eq!(region.start_addr().0, r.gpa);
        region.bitmap().mark_dirty(off as usize, data.len());
        Ok(())
    }

    fn map_region(&self, r: RamRegion, hugepages: bool) -> Result<GuestRegionMmap<VmmBitmap>, MemoryError> {
        let file = self.file.try_clone().map_err(|source| MemoryError::Open { path: self.path.clone(), source })?;
        let region = MmapRegion::<VmmBitmap>::from_file(FileOffset::new(file, r.file_offset), r.len as usize)
            .map_err(|source| MemoryError::Map { size: r.len, source })?;
        if hugepages {
            // SAFETY: the range is exactly the mapping vm-memory just made and
            // owns; MADV_HUGEPAGE only changes how the kernel backs it.
            let r = unsafe { libc::madvise(region.as_ptr().cast(), region.size(), libc::MADV_HUGEPAGE) };
            if r != 0 {
                tracing::warn!("madvise(MADV_HUGEPAGE) failed: {}", io::Error::last_os_error());
            }
        }
        GuestRegionMmap::new(region, GuestAddress(r.gpa))
            .ok_or(MemoryError::Map { size: r.len, source: vm_memory::mmap::MmapRegionError::InvalidPointer })
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
        assert!(matches!(e, MemoryError::WrongSize { have: 8192, want: 1048576, .. }), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 8192]);
    }

    #[test]
    fn bad_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mem");
        assert!(matches!(BackingFile::open_or_create(&p, 0), Err(MemoryError::BadSize { .. })));
        assert!(matches!(BackingFile::open_or_create(&p, 100), Err(MemoryError::BadSize { .. })));
        assert!(!p.exists());
    }

    #[test]
    fn layout_skips_the_hole_below_4g() {
        assert_eq!(ram_layout(1 << 30), vec![RamRegion { gpa: 0, file_offset: 0, len: 1 << 30 }]);
        assert_eq!(
            ram_layout(5 << 30),
            vec![
                RamRegion { gpa: 0, file_offset: 0, len: 3 << 30 },
                RamRegion { gpa: 4 << 30, file_offset: 3 << 30, len: 2 << 30 },
            ]
        );
    }

    #[test]
    fn writes_through_the_file_are_logged_and_visible() {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
        let dir = tempfile::tempdir().unwrap();
        let b = BackingFile::open_or_create(&dir.path().join("mem"), 1 << 20).unwrap();
        let ram = b.map(false).unwrap();
        b.write_at_gpa(&ram, 0x5ffe, &[1, 2, 3, 4]).unwrap();
        let mut got = [0u8; 4];
        ram.read_slice(&mut got, GuestAddress(0x5ffe)).unwrap();
        assert_eq!(got, [1, 2, 3, 4]);
        let bm = ram.find_region(GuestAddress(0)).unwrap().bitmap();
        // pages: [0x5000 dirty, 0x6000 dirty], neighbours clean
        assert!(bm.dirty_at(0x5000) && bm.dirty_at(0x6000));
        assert!(!bm.dirty_at(0x4000) && !bm.dirty_at(0x7000));
        assert!(matches!(b.write_at_gpa(&ram, (1 << 20) - 2, &[0; 4]), Err(MemoryError::OutOfRange { .. })));
    }

    /// RAM in a memfd: mapped shared like a file (writes through the
    /// mapping are in the file), loaded from an image of its size, an
    /// image of another size refused.
    #[test]
    fn memfd_ram_is_shared_and_loads_an_image() {
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let f = File::create(&img).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[5u8; 4096], 0x7000).unwrap();
        let b = BackingFile::memfd("memory-test", 1 << 20).unwrap();
        assert_eq!(b.path(), Path::new("memfd:memory-test"));
        b.load_image(&img).unwrap();
        let ram = b.map(false).unwrap();
        let mut got = [0u8; 4096];
        ram.read_slice(&mut got, GuestAddress(0x7000)).unwrap();
        assert_eq!(got, [5u8; 4096]);
        ram.write_obj(0xabu8, GuestAddress(0x3000)).unwrap();
        let mut byte = [0u8; 1];
        b.file().read_exact_at(&mut byte, 0x3000).unwrap();
        assert_eq!(byte, [0xab]);
        f.set_len(1 << 21).unwrap();
        let e = b.load_image(&img).unwrap_err();
        assert!(matches!(e, MemoryError::WrongSize { have: 2097152, want: 1048576, .. }), "{e}");
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
