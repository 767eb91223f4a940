//! The dirty set: which guest pages are dirty, per KVM slot, as bitmaps in
//! KVM's layout (bit `i` of word `i / 64` is page `i` of the slot), with
//! the first and last dirty word tracked like the kernel's
//! `clean_record_shared_mapping_range` bounds, so scans skip clean space.
//!
//! ```text
//! slot 0: words  [0 .. first) clean | [first ..= last] may hold bits | (last ..] clean
//! ```
//!
//! Iteration scans words (`trailing_zeros`), extents coalesce runs of set
//! bits into (gpa, len) — Cloud Hypervisor's `MemoryRangeTable` idea.

use crate::kvm::Slot;

/// A coalesced run of dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest physical address of the first page.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Why bits could not be merged into a set.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirtySetError {
    /// The slot index is not part of this set.
    #[error("slot index {index} out of range ({slots} slots)")]
    NoSuchSlot {
        /// Index given.
        index: usize,
        /// Slots in the set.
        slots: usize,
    },
    /// A bitmap whose length does not match the slot.
    #[error("slot {slot}: dirty bitmap has {got} words, expected {want}")]
    BitmapLength {
        /// KVM slot number.
        slot: u32,
        /// Words given.
        got: usize,
        /// Words the slot needs.
        want: usize,
    },
}

/// One non-zero word of a dirty log: (slot index, word index, bits).
pub type LogWord = (u32, u32, u64);

/// One slot's dirty bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotBitmap {
    slot: Slot,
    words: Vec<u64>,
    /// First word that may hold a set bit (`words.len()` when empty).
    first: usize,
    /// One past the last word that may hold a set bit (0 when empty).
    end: usize,
}

impl SlotBitmap {
    fn new(slot: Slot, page_size: u64) -> Self {
        let pages = slot.size.div_ceil(page_size);
        let words = pages.div_ceil(64) as usize;
        SlotBitmap { slot, words: vec![0; words], first: words, end: 0 }
    }

    fn widen(&mut self, first: usize, end: usize) {
        self.first = self.first.min(first);
        self.end = self.end.max(end);
    }

    fn clear(&mut self) {
        for w in &mut self.words[self.first.min(self.end)..self.end] {
            *w = 0;
        }
        self.first = self.words.len();
        self.end = 0;
    }

    /// The slot.
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// The words, in KVM's layout.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The word range that may hold set bits (`first..end`; empty when clean).
    pub fn bounds(&self) -> std::ops::Range<usize> {
        self.first.min(self.end)..self.end
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words[self.first.min(self.end)..self.end].iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether page `page` (within the slot) is set.
    pub fn contains_page(&self, page: u64) -> bool {
        self.words.get((page / 64) as usize).is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Page indices (within the slot) of set bits, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        let lo = self.first.min(self.end);
        self.words[lo..self.end].iter().enumerate().flat_map(move |(i, &w)| {
            let base = ((lo + i) * 64) as u64;
            SetBits(w).map(move |b| base + u64::from(b))
        })
    }
}

/// Iterator over the set bits of one word, lowest first.
struct SetBits(u64);

impl Iterator for SetBits {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

/// Dirty pages of every slot of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySet {
    page_size: u64,
    slots: Vec<SlotBitmap>,
}

impl DirtySet {
    /// An empty set over `slots` with pages of `page_size` bytes.
    pub fn new(slots: &[Slot], page_size: u64) -> Self {
        DirtySet { page_size, slots: slots.iter().map(|s| SlotBitmap::new(*s, page_size)).collect() }
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Per-slot bitmaps.
    pub fn slots(&self) -> &[SlotBitmap] {
        &self.slots
    }

    fn slot_mut(&mut self, index: usize) -> Result<&mut SlotBitmap, DirtySetError> {
        let slots = self.slots.len();
        self.slots.get_mut(index).ok_or(DirtySetError::NoSuchSlot { index, slots })
    }

    /// ORs a KVM-layout bitmap into slot `index`; its length must match.
    /// Returns the number of bits set in `words`.
    pub fn or_words(&mut self, index: usize, words: &[u64]) -> Result<u64, DirtySetError> {
        let s = self.slot_mut(index)?;
        if words.len() != s.words.len() {
            return Err(DirtySetError::BitmapLength { slot: s.slot.slot, got: words.len(), want: s.words.len() });
        }
        // One pass: OR, count, and find the first and last non-zero word.
        let (mut first, mut last, mut n) = (usize::MAX, 0usize, 0u64);
        for (i, (d, &w)) in s.words.iter_mut().zip(words).enumerate() {
            if w != 0 {
                *d |= w;
                n += u64::from(w.count_ones());
                first = first.min(i);
                last = i;
            }
        }
        if n > 0 {
            s.widen(first, last + 1);
        }
        Ok(n)
    }

    /// ORs the words of `words` listed in `nonzero` (ascending indices of
    /// its non-zero words) into slot `index`, leaving out the bits of
    /// `mask` if given: one pass over the list, not over the slot, for every
    /// consumer a harvest feeds. Returns (bits ORed in, bits that were not
    /// set before).
    pub fn or_sparse(
        &mut self,
        index: usize,
        words: &[u64],
        nonzero: &[u32],
        mask: Option<&[u64]>,
    ) -> Result<(u64, u64), DirtySetError> {
        let s = self.slot_mut(index)?;
        if words.len() != s.words.len() || mask.is_some_and(|m| m.len() != s.words.len()) {
            return Err(DirtySetError::BitmapLength { slot: s.slot.slot, got: words.len(), want: s.words.len() });
        }
        let (mut first, mut last, mut n, mut new) = (usize::MAX, 0usize, 0u64, 0u64);
        for &i in nonzero {
            let i = i as usize;
            let w = words[i] & !mask.map_or(0, |m| m[i]);
            if w != 0 {
                let d = &mut s.words[i];
                new += u64::from((w & !*d).count_ones());
                *d |= w;
                n += u64::from(w.count_ones());
                first = first.min(i);
                last = i;
            }
        }
        if n > 0 {
            s.widen(first, last + 1);
        }
        Ok((n, new))
    }

    /// ORs the words of a dirty log into the set, leaving out the bits of
    /// `mask` (same slots) if given: one pass over the list, touching only
    /// the words it names.
    pub fn or_log(&mut self, log: &[LogWord], mask: Option<&DirtySet>) -> Result<(), DirtySetError> {
        let mut rest = log;
        // A log holds runs of words of one slot: look each slot up once.
        while let Some(&(index, _, _)) = rest.first() {
            let n = rest.iter().position(|e| e.0 != index).unwrap_or(rest.len());
            let (run, tail) = rest.split_at(n);
            rest = tail;
            let index = index as usize;
            let slots = self.slots.len();
            let s = self.slots.get_mut(index).ok_or(DirtySetError::NoSuchSlot { index, slots })?;
            let m = mask.and_then(|m| m.slots.get(index)).map(|m| m.words.as_slice());
            let (mut first, mut end) = (s.first, s.end);
            for &(_, word, bits) in run {
                let w = word as usize;
                let want = s.words.len();
                let d =
                    s.words.get_mut(w).ok_or(DirtySetError::BitmapLength { slot: s.slot.slot, got: w + 1, want })?;
                // A word whose bits are all masked widens the bounds
                // harmlessly: they say where bits *may* be.
                *d |= match m {
                    Some(m) => bits & !m.get(w).copied().unwrap_or(0),
                    None => bits,
                };
                first = first.min(w);
                end = end.max(w + 1);
            }
            (s.first, s.end) = (first, end);
        }
        Ok(())
    }

    /// Replaces the pages of slot `index` with the bits of `words` placed
    /// from word `first` on, the rest of the slot clean: one sequential copy
    /// of a bitmap's non-zero range rather than an OR per word.
    pub fn assign_words(&mut self, index: usize, first: usize, words: &[u64]) -> Result<(), DirtySetError> {
        let s = self.slot_mut(index)?;
        let end = first.saturating_add(words.len());
        if end > s.words.len() {
            return Err(DirtySetError::BitmapLength { slot: s.slot.slot, got: end, want: s.words.len() });
        }
        s.clear();
        s.words[first..end].copy_from_slice(words);
        if !words.is_empty() {
            (s.first, s.end) = (first, end);
        }
        Ok(())
    }

    /// Replaces the pages of slot `index` with the bitmap `words` (all of
    /// the slot's words, its bits within `bounds`), handing back the slot's
    /// old words, cleared: a take of a whole bitmap without copying it.
    pub fn swap_words(
        &mut self,
        index: usize,
        words: &mut Vec<u64>,
        bounds: std::ops::Range<usize>,
    ) -> Result<(), DirtySetError> {
        let s = self.slot_mut(index)?;
        if words.len() != s.words.len() {
            return Err(DirtySetError::BitmapLength { slot: s.slot.slot, got: words.len(), want: s.words.len() });
        }
        s.clear();
        std::mem::swap(&mut s.words, words);
        if !bounds.is_empty() {
            (s.first, s.end) = (bounds.start, bounds.end);
        }
        Ok(())
    }

    /// Marks page `page` of slot `index`; pages past the slot's end are
    /// refused (false), never silently dropped.
    pub fn set_page(&mut self, index: usize, page: u64) -> Result<bool, DirtySetError> {
        let s = self.slot_mut(index)?;
        let w = (page / 64) as usize;
        if w >= s.words.len() {
            return Ok(false);
        }
        s.words[w] |= 1 << (page % 64);
        s.widen(w, w + 1);
        Ok(true)
    }

    /// Marks the page holding guest address `gpa`; false if no slot has it.
    pub fn set_gpa(&mut self, gpa: u64) -> bool {
        let ps = self.page_size;
        let Some(i) = self.slots.iter().position(|s| gpa >= s.slot.gpa && gpa < s.slot.gpa + s.slot.size) else {
            return false;
        };
        let page = (gpa - self.slots[i].slot.gpa) / ps;
        self.set_page(i, page).unwrap_or(false)
    }

    /// Whether the page holding `gpa` is dirty.
    pub fn contains(&self, gpa: u64) -> bool {
        self.slots.iter().any(|s| {
            gpa >= s.slot.gpa && gpa < s.slot.gpa + s.slot.size && {
                let p = (gpa - s.slot.gpa) / self.page_size;
                s.words[(p / 64) as usize] & (1 << (p % 64)) != 0
            }
        })
    }

    /// ORs all of `other` (same slots) into `self`.
    pub fn union_with(&mut self, other: &DirtySet) -> Result<(), DirtySetError> {
        for (i, s) in other.slots.iter().enumerate() {
            if s.end > s.first {
                let d = self.slot_mut(i)?;
                if d.words.len() != s.words.len() {
                    return Err(DirtySetError::BitmapLength {
                        slot: d.slot.slot,
                        got: s.words.len(),
                        want: d.words.len(),
                    });
                }
                for (x, &y) in d.words[s.first..s.end].iter_mut().zip(&s.words[s.first..s.end]) {
                    *x |= y;
                }
                d.widen(s.first, s.end);
            }
        }
        Ok(())
    }

    /// Removes every page of `other` (same slots) from `self`; returns how
    /// many were removed.
    pub fn subtract(&mut self, other: &DirtySet) -> u64 {
        let mut removed = 0;
        for (d, o) in self.slots.iter_mut().zip(&other.slots) {
            let r = o.bounds();
            let lo = r.start.max(d.first.min(d.end));
            let hi = r.end.min(d.end);
            for i in lo..hi.max(lo) {
                let o = o.words[i];
                if o != 0 {
                    removed += u64::from((d.words[i] & o).count_ones());
                    d.words[i] &= !o;
                }
            }
        }
        removed
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.slots.iter().map(SlotBitmap::count).sum()
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(|s| s.words[s.first.min(s.end)..s.end].iter().all(|&w| w == 0))
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(SlotBitmap::clear);
    }

    /// Moves the contents out, leaving `self` empty (same slots).
    pub fn take(&mut self) -> DirtySet {
        let mut out = DirtySet::new(&self.slots.iter().map(|s| s.slot).collect::<Vec<_>>(), self.page_size);
        std::mem::swap(self, &mut out);
        out
    }

    /// Swaps contents with `spare` (which must be empty and of the same
    /// shape): `take` without allocating.
    pub fn take_into(&mut self, spare: &mut DirtySet) {
        debug_assert!(spare.is_empty());
        std::mem::swap(self, spare);
    }

    /// Guest physical addresses of the dirty pages, in slot order.
    pub fn gpas(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.iter().flat_map(move |s| s.pages().map(move |p| s.slot.gpa + p * self.page_size))
    }

    /// Dirty pages coalesced into extents (never across slots).
    pub fn extents(&self) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for s in &self.slots {
            let mut run: Option<Extent> = None;
            for p in s.pages() {
                let gpa = s.slot.gpa + p * self.page_size;
                match run.as_mut() {
                    Some(e) if e.gpa + e.len == gpa => e.len += self.page_size,
                    _ => {
                        out.extend(run.take());
                        run = Some(Extent { gpa, len: self.page_size });
                    }
                }
            }
            out.extend(run);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const PS: u64 = 4096;

    fn slots() -> Vec<Slot> {
        vec![Slot { slot: 0, gpa: 0, size: 200 * PS }, Slot { slot: 1, gpa: 1 << 32, size: 64 * PS }]
    }

    #[test]
    fn extents_coalesce_within_slots_only() {
        let mut d = DirtySet::new(&slots(), PS);
        // slot 0 pages: [63, 64, 65] (across a word), [199]; slot 1: [0]
        for p in [63, 64, 65, 199] {
            assert!(d.set_page(0, p).unwrap());
        }
        assert!(d.set_page(1, 0).unwrap());
        assert!(!d.set_page(1, 64).unwrap(), "page past the slot end is refused");
        assert_eq!(
            d.extents(),
            vec![
                Extent { gpa: 63 * PS, len: 3 * PS },
                Extent { gpa: 199 * PS, len: PS },
                Extent { gpa: 1 << 32, len: PS },
            ]
        );
        assert_eq!(d.count(), 5);
        assert!(d.contains(64 * PS + 17) && !d.contains(66 * PS));
    }

    #[test]
    fn bitmap_length_is_checked() {
        let mut d = DirtySet::new(&slots(), PS);
        let e = d.or_words(0, &[1, 2]).unwrap_err();
        assert_eq!(e, DirtySetError::BitmapLength { slot: 0, got: 2, want: 4 });
        assert_eq!(e.to_string(), "slot 0: dirty bitmap has 2 words, expected 4");
        assert!(matches!(d.or_words(5, &[]), Err(DirtySetError::NoSuchSlot { index: 5, slots: 2 })));
        assert_eq!(d.assign_words(0, 3, &[1, 2]), Err(DirtySetError::BitmapLength { slot: 0, got: 5, want: 4 }));
        assert_eq!(
            d.swap_words(0, &mut vec![0; 3], 0..1),
            Err(DirtySetError::BitmapLength { slot: 0, got: 3, want: 4 })
        );
    }

    #[test]
    fn take_and_clear() {
        let mut d = DirtySet::new(&slots(), PS);
        d.or_words(0, &[0, 0b101, 0, 1 << 7]).unwrap();
        let t = d.take();
        assert!(d.is_empty());
        assert_eq!(t.gpas().collect::<Vec<_>>(), vec![64 * PS, 66 * PS, (192 + 7) * PS]);
        let mut u = t.clone();
        let mut minus = DirtySet::new(&slots(), PS);
        minus.set_page(0, 66).unwrap();
        minus.set_page(0, 70).unwrap();
        assert_eq!(u.subtract(&minus), 1);
        assert_eq!(u.gpas().collect::<Vec<_>>(), vec![64 * PS, (192 + 7) * PS]);
        u.clear();
        assert!(u.is_empty() && u.count() == 0 && u.extents().is_empty());
    }

    proptest! {
        #[test]
        fn set_roundtrips_through_words_pages_and_extents(pages in proptest::collection::btree_set(0u64..200, 0..120)) {
            let mut d = DirtySet::new(&slots(), PS);
            for &p in &pages {
                d.set_page(0, p).unwrap();
            }
            // pages() gives exactly the set, in order
            let got: Vec<u64> = d.slots()[0].pages().collect();
            prop_assert_eq!(&got, &pages.iter().copied().collect::<Vec<_>>());
            // extents cover exactly the set, are sorted, disjoint and maximal
            let ext = d.extents();
            let mut covered = Vec::new();
            for w in ext.windows(2) {
                prop_assert!(w[0].gpa + w[0].len < w[1].gpa);
            }
            for e in &ext {
                covered.extend((e.gpa / PS)..((e.gpa + e.len) / PS));
            }
            prop_assert_eq!(covered, pages.iter().copied().collect::<Vec<_>>());
            // OR-ing the words into a fresh set gives the same set, densely
            // or through the list of non-zero words
            let mut e = DirtySet::new(&slots(), PS);
            e.or_words(0, d.slots()[0].words()).unwrap();
            prop_assert_eq!(e.count(), pages.len() as u64);
            let w = d.slots()[0].words();
            let nz: Vec<u32> = (0..w.len() as u32).filter(|&i| w[i as usize] != 0).collect();
            let mut f = DirtySet::new(&slots(), PS);
            prop_assert_eq!(f.or_sparse(0, w, &nz, None).unwrap(), (pages.len() as u64, pages.len() as u64));
            prop_assert_eq!(f.or_sparse(0, w, &nz, None).unwrap(), (pages.len() as u64, 0));
            prop_assert_eq!(&f, &e);
            // Assigning the non-zero range, or swapping the whole bitmap in,
            // over a set holding other pages gives the same set again, and
            // the swap hands back the old words cleared.
            let (lo, hi) = (nz.first().map_or(0, |&i| i as usize), nz.last().map_or(0, |&i| i as usize + 1));
            let mut g = DirtySet::new(&slots(), PS);
            g.set_page(0, 5).unwrap();
            g.assign_words(0, lo, &w[lo..hi]).unwrap();
            prop_assert_eq!(g.slots()[0].pages().collect::<Vec<_>>(), pages.iter().copied().collect::<Vec<_>>());
            let mut h = DirtySet::new(&slots(), PS);
            h.set_page(0, 199).unwrap();
            let mut words = w.to_vec();
            h.swap_words(0, &mut words, lo..hi).unwrap();
            prop_assert_eq!(&h, &g);
            prop_assert!(words.iter().all(|&x| x == 0));
        }
    }
}
