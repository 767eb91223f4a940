//! Snapshot pre-copy: while the guest runs, the pages the snapshot chain's
//! own dirty-log consumer collects are copied into a staging image (a
//! sparse file holding RAM at its backing-file offsets), so the next diff
//! snapshot only copies the residue — the pages dirtied since the last
//! pre-copy pass — with the vCPUs paused. The snapshot's `memory.diff` is
//! then packed from the frozen staging image after the guest resumed.
//!
//! Correctness rests on the harvester's `collect`: a page is re-protected
//! before it is copied, so a write after the copy is logged again and
//! copied again (by a later pass or in the pause). A pass that fails to
//! copy hands its pages back; the pause copies them from RAM.

use std::fs::File;
use std::path::{Path, PathBuf};

use smudge::dirty_set::{DirtySet, DirtySetError};
use smudge::memory::{ram_layout, GuestRam};
use smudge::sink::{ImageFile, Sink, SinkError};

/// Why a pre-copy pass failed (its pages stay with the caller).
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// Creating or writing the staging image failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The set does not have the VM's slot shape.
    #[error(transparent)]
    Shape(#[from] DirtySetError),
}

/// The staging image of the next diff and the pages it holds.
#[derive(Debug)]
pub struct Staging {
    image: ImageFile,
    staged: DirtySet,
    bytes: u64,
}

impl Staging {
    /// A new, empty staging image at `path` for `mem_size` bytes of RAM.
    /// `empty` gives the slot shape of the sets it records.
    pub fn create(path: &Path, mem_size: u64, empty: DirtySet) -> Result<Self, SinkError> {
        // A leftover from a crashed run holds pages of another point in time.
        let _ = std::fs::remove_file(path);
        Ok(Staging { image: ImageFile::open(path, mem_size)?, staged: empty, bytes: 0 })
    }

    /// The name of the staging image for the diff after the snapshot in
    /// `last_dir`: a hidden file beside it (same filesystem as the chain).
    pub fn path_after(last_dir: &Path) -> PathBuf {
        let name = last_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        last_dir.with_file_name(format!(".{name}.smudge-staging"))
    }

    /// Copies the pages of `set` from `ram` into the image and records them.
    /// Returns the bytes copied. On error nothing is recorded: the caller
    /// still owns those pages.
    pub fn copy_in(&mut self, ram: &GuestRam, set: &DirtySet) -> Result<u64, StagingError> {
        let n = self.image.write_set(ram, set)?;
        self.staged.union_with(set)?;
        self.bytes += n;
        Ok(n)
    }

    /// Pages staged so far.
    pub fn staged(&self) -> &DirtySet {
        &self.staged
    }

    /// Bytes copied in so far (a page copied twice counts twice).
    pub fn bytes_copied(&self) -> u64 {
        self.bytes
    }

    /// The image, to pack the diff from.
    pub fn file(&self) -> &File {
        self.image.file()
    }

    /// The staged pages as (backing-file offset, length) extents.
    pub fn file_extents(&self, mem_size: u64) -> Vec<(u64, u64)> {
        file_extents(&self.staged, mem_size)
    }
}

/// The pages of `set` as (backing-file offset, length) extents of a RAM of
/// `mem_size` bytes.
pub fn file_extents(set: &DirtySet, mem_size: u64) -> Vec<(u64, u64)> {
    let layout = ram_layout(mem_size);
    set.extents()
        .iter()
        .filter_map(|e| smudge::memory::gpa_to_file_offset(&layout, e.gpa).map(|off| (off, e.len)))
        .collect()
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.image.path());
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use smudge::kvm::Slot;
    use smudge::memory::BackingFile;

    #[test]
    fn staged_pages_land_at_their_file_offsets_and_the_image_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let b = BackingFile::open_or_create(&dir.path().join("mem"), 1 << 20).unwrap();
        let ram = b.map(false).unwrap();
        ram.write_slice(&[7u8; 4096], GuestAddress(0x3000)).unwrap();
        ram.write_slice(&[9u8; 4096], GuestAddress(0x4000)).unwrap();
        let slots = [Slot { slot: 0, gpa: 0, size: 1 << 20 }];
        let mut set = DirtySet::new(&slots, 4096);
        set.set_gpa(0x3000);
        set.set_gpa(0x4000);
        let path = Staging::path_after(&dir.path().join("full"));
        assert_eq!(path, dir.path().join(".full.smudge-staging"));
        let mut s = Staging::create(&path, 1 << 20, DirtySet::new(&slots, 4096)).unwrap();
        assert_eq!(s.copy_in(&ram, &set).unwrap(), 8192);
        assert_eq!(s.file_extents(1 << 20), vec![(0x3000, 8192)]);
        let mut buf = vec![0u8; 8192];
        std::os::unix::fs::FileExt::read_exact_at(s.file(), &mut buf, 0x3000).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 7) && buf[4096..].iter().all(|&x| x == 9));
        drop(s);
        assert!(!path.exists());
    }
}
