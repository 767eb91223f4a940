//! One epoch's pages in memory: copied out of guest RAM while the guest
//! runs (pre-copy passes) and at the boundary (the residue), a page copied
//! again overwriting its earlier copy, until the epoch is sealed and its
//! writer appends it to the journal.

use std::collections::BTreeMap;

use vm_memory::{Bytes, GuestAddress};

use super::JournalError;
use crate::dirty_set::DirtySet;
use crate::memory::{gpa_to_file_offset, ram_layout, GuestRam, RamRegion};

/// Pages by backing-file offset, each held once.
#[derive(Debug, Clone, Default)]
pub struct EpochPages {
    page_size: u64,
    /// File offset -> index of its page in `data`.
    index: BTreeMap<u64, usize>,
    data: Vec<u8>,
}

impl EpochPages {
    /// No pages yet; pages of `page_size` bytes.
    pub fn new(page_size: u64) -> Self {
        EpochPages { page_size, index: BTreeMap::new(), data: Vec::new() }
    }

    /// Bytes per page.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether it holds no page.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes of page data held.
    pub fn bytes(&self) -> u64 {
        self.index.len() as u64 * self.page_size
    }

    /// The buffer of the page at file offset `off` (made if new).
    pub fn page_mut(&mut self, off: u64) -> &mut [u8] {
        self.slot(off).0
    }

    /// The buffer of the page at file offset `off`, and whether it was
    /// made now (zeroed) rather than held already.
    pub fn slot(&mut self, off: u64) -> (&mut [u8], bool) {
        let ps = self.page_size as usize;
        let next = self.index.len();
        let i = *self.index.entry(off).or_insert(next);
        if i == next {
            self.data.resize((next + 1) * ps, 0);
        }
        (&mut self.data[i * ps..(i + 1) * ps], i == next)
    }

    /// Stores `page` (one page of bytes) at file offset `off`.
    pub fn put(&mut self, off: u64, page: &[u8]) {
        self.page_mut(off).copy_from_slice(page);
    }

    /// Copies the pages of `set` out of `ram` (a RAM of `ram_size` bytes).
    /// Returns the bytes copied. The caller must have re-protected them
    /// first (the harvester's `collect`), so a later write is seen again.
    pub fn copy_set(&mut self, ram: &GuestRam, set: &DirtySet, ram_size: u64) -> Result<u64, JournalError> {
        let layout: Vec<RamRegion> = ram_layout(ram_size);
        let mut n = 0;
        for e in set.extents() {
            let mut gpa = e.gpa;
            while gpa < e.gpa + e.len {
                let off = gpa_to_file_offset(&layout, gpa)
                    .ok_or_else(|| JournalError::ReadGuest { gpa, msg: "not in RAM".into() })?;
                let buf = self.page_mut(off);
                ram.read_slice(buf, GuestAddress(gpa))
                    .map_err(|err| JournalError::ReadGuest { gpa, msg: err.to_string() })?;
                n += self.page_size;
                gpa += self.page_size;
            }
        }
        Ok(n)
    }

    /// The pages in file-offset order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        let ps = self.page_size as usize;
        self.index.iter().map(move |(&off, &i)| (off, &self.data[i * ps..(i + 1) * ps]))
    }

    /// Empties it, keeping its buffers.
    pub fn clear(&mut self) {
        self.index.clear();
        self.data.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_copied_again_replaces_its_earlier_copy() {
        let mut p = EpochPages::new(4);
        p.put(8, b"aaaa");
        p.put(0, b"bbbb");
        p.put(8, b"cccc");
        assert_eq!(p.len(), 2);
        assert_eq!(p.bytes(), 8);
        let got: Vec<(u64, Vec<u8>)> = p.iter().map(|(o, d)| (o, d.to_vec())).collect();
        assert_eq!(got, vec![(0, b"bbbb".to_vec()), (8, b"cccc".to_vec())]);
        p.clear();
        assert!(p.is_empty());
    }
}
