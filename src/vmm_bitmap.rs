//! The VMM's own dirty log: vm-memory's `AtomicBitmap` plus a "written
//! since last look" flag, so a harvest skips the whole-bitmap swap (4096
//! atomic exchanges for 1 GiB, ~30 us here) when the VMM wrote nothing —
//! the common case once the guest runs.
//!
//! Ordering: `mark_dirty` sets the bits, then the flag (release); a harvest
//! clears the flag (acquire) before swapping the words out. A write that
//! races with a harvest is seen by it or by the next one.

use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

/// Per-region VMM dirty bitmap (page granularity, KVM word layout).
#[derive(Debug, Default)]
pub struct VmmBitmap {
    bits: AtomicBitmap,
    written: AtomicBool,
}

impl VmmBitmap {
    /// The words of pages the VMM dirtied since the last call, reset; `None`
    /// when it wrote nothing.
    pub fn take_words(&self) -> Option<Vec<u64>> {
        self.written.swap(false, Ordering::AcqRel).then(|| self.bits.get_and_reset())
    }
}

impl<'a> WithBitmapSlice<'a> for VmmBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for VmmBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len > 0 {
            self.bits.set_addr_range(offset, len);
            self.written.store(true, Ordering::Release);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.bits.is_addr_set(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for VmmBitmap {
    fn with_len(len: usize) -> Self {
        VmmBitmap { bits: AtomicBitmap::with_len(len), written: AtomicBool::new(false) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_skips_clean_bitmaps() {
        let b = VmmBitmap::with_len(64 * 4096);
        assert_eq!(b.take_words(), None);
        b.mark_dirty(0x2000, 0x1001); // pages 2 and 3
        assert!(b.dirty_at(0x3000) && !b.dirty_at(0x4000));
        assert_eq!(b.take_words(), Some(vec![0b1100]));
        assert_eq!(b.take_words(), None);
        b.slice_at(0x1000).mark_dirty(0, 1); // page 1 through a slice
        assert_eq!(b.take_words(), Some(vec![0b10]));
    }
}
