//! Per-page writeback state: the roles of `PG_dirty`, `PG_writeback` and
//! `PG_error`, and when each dirty page was first dirtied (for expiry).
//! "Persisted" is the absence of the other three on a page that was
//! written back at least once (counted, not stored per page).

use crate::dirty_set::DirtySet;
use crate::kvm::Slot;

/// Marker for "not dirty" in the first-dirtied table.
const CLEAN: u32 = u32::MAX;

/// The state of every guest page.
#[derive(Debug, Clone)]
pub struct PageStates {
    dirty: DirtySet,
    /// First-dirtied time (engine ms) per page of each slot; `CLEAN` when
    /// the page is not dirty.
    dirtied_at: Vec<Vec<u32>>,
    writeback: DirtySet,
    /// First-dirtied times of the pages under writeback, to restore on a
    /// failed write-out.
    writeback_times: Vec<(usize, u64, u32)>,
    error: DirtySet,
    nr_dirty: u64,
}

impl PageStates {
    /// All pages clean.
    pub fn new(slots: &[Slot], page_size: u64) -> Self {
        PageStates {
            dirty: DirtySet::new(slots, page_size),
            dirtied_at: slots.iter().map(|s| vec![CLEAN; s.size.div_ceil(page_size) as usize]).collect(),
            writeback: DirtySet::new(slots, page_size),
            writeback_times: Vec::new(),
            error: DirtySet::new(slots, page_size),
            nr_dirty: 0,
        }
    }

    /// Marks every page of `new` dirty at `now_ms`; pages already dirty keep
    /// their first-dirtied time. Returns how many became dirty.
    pub fn mark_dirty(&mut self, new: &DirtySet, now_ms: u64) -> u64 {
        let now = now_ms.min(u64::from(CLEAN - 1)) as u32;
        let mut n = 0;
        for (i, s) in new.slots().iter().enumerate() {
            let times = &mut self.dirtied_at[i];
            for p in s.pages() {
                if let Some(t) = times.get_mut(p as usize) {
                    if *t == CLEAN {
                        *t = now;
                        n += 1;
                        // Cannot fail: p lies inside the slot.
                        let _ = self.dirty.set_page(i, p);
                    }
                }
            }
        }
        self.nr_dirty += n;
        n
    }

    /// `clear_page_dirty_for_io` + `set_page_writeback` for the pages of
    /// `set` (all dirty): clean and under writeback.
    pub fn start_writeback(&mut self, set: &DirtySet) {
        for (i, s) in set.slots().iter().enumerate() {
            for p in s.pages() {
                let t = std::mem::replace(&mut self.dirtied_at[i][p as usize], CLEAN);
                self.writeback_times.push((i, p, t));
                let _ = self.writeback.set_page(i, p);
            }
        }
        self.nr_dirty -= self.dirty.subtract(set);
    }

    /// `end_page_writeback`: on success the pages are persisted (clean, error
    /// cleared); on failure they are dirty again with their original
    /// first-dirtied time and flagged failed (`redirty_page_for_writepage`).
    pub fn end_writeback(&mut self, ok: bool) {
        let wb = std::mem::take(&mut self.writeback_times);
        if ok {
            self.error.subtract(&self.writeback);
        } else {
            for (i, p, t) in wb {
                let _ = self.error.set_page(i, p);
                let cur = &mut self.dirtied_at[i][p as usize];
                if *cur == CLEAN {
                    self.nr_dirty += 1;
                    let _ = self.dirty.set_page(i, p);
                }
                // Dirtied again meanwhile or not, the page is as old as its
                // first dirtying.
                *cur = (*cur).min(t);
            }
        }
        self.writeback.clear();
    }

    /// The dirty pages.
    pub fn dirty(&self) -> &DirtySet {
        &self.dirty
    }

    /// Pages whose last write-out failed.
    pub fn failed(&self) -> &DirtySet {
        &self.error
    }

    /// Pages under writeback now.
    pub fn under_writeback(&self) -> &DirtySet {
        &self.writeback
    }

    /// Number of dirty pages.
    pub fn nr_dirty(&self) -> u64 {
        self.nr_dirty
    }

    /// First-dirtied time of page `page` of slot `slot_index`, if dirty.
    pub fn dirtied_at(&self, slot_index: usize, page: u64) -> Option<u64> {
        let t = *self.dirtied_at.get(slot_index)?.get(page as usize)?;
        (t != CLEAN).then_some(u64::from(t))
    }

    /// Dirty pages whose guest address lies in `[lo, hi)`, with their
    /// first-dirtied times: (slot index, page, time).
    pub fn dirty_with_times(&self, lo: u64, hi: u64) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        let ps = self.dirty.page_size();
        self.dirty.slots().iter().enumerate().flat_map(move |(i, s)| {
            let base = s.slot().gpa;
            s.pages()
                .filter(move |p| {
                    let gpa = base + p * ps;
                    gpa >= lo && gpa < hi
                })
                .map(move |p| (i, p, u64::from(self.dirtied_at[i][p as usize])))
        })
    }

    /// The oldest first-dirtied time among dirty pages.
    pub fn oldest(&self) -> Option<u64> {
        self.dirty_with_times(0, u64::MAX).map(|(_, _, t)| t).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pages: &[u64]) -> DirtySet {
        let mut d = DirtySet::new(&[Slot { slot: 0, gpa: 0, size: 256 * 4096 }], 4096);
        for &p in pages {
            d.set_page(0, p).unwrap();
        }
        d
    }

    #[test]
    fn dirty_writeback_persisted_failed() {
        let slots = [Slot { slot: 0, gpa: 0, size: 256 * 4096 }];
        let mut st = PageStates::new(&slots, 4096);
        assert_eq!(st.mark_dirty(&set(&[1, 2, 3]), 10), 3);
        // re-dirtying keeps the first time
        assert_eq!(st.mark_dirty(&set(&[2, 4]), 50), 1);
        assert_eq!(st.dirtied_at(0, 2), Some(10));
        assert_eq!(st.dirtied_at(0, 4), Some(50));
        assert_eq!(st.nr_dirty(), 4);
        st.start_writeback(&set(&[1, 2]));
        assert_eq!(st.nr_dirty(), 2);
        assert_eq!(st.under_writeback().count(), 2);
        // page 2 is written again during the write-out
        assert_eq!(st.mark_dirty(&set(&[2]), 60), 1);
        // the write-out failed: back to dirty with the first time, flagged
        st.end_writeback(false);
        assert_eq!(st.nr_dirty(), 4);
        assert_eq!(st.dirtied_at(0, 1), Some(10));
        assert_eq!(st.dirtied_at(0, 2), Some(10));
        assert_eq!(st.failed().count(), 2);
        assert!(st.under_writeback().is_empty());
        // retried successfully: persisted, error cleared
        st.start_writeback(&set(&[1, 2]));
        st.end_writeback(true);
        assert_eq!(st.nr_dirty(), 2);
        assert!(st.failed().is_empty());
        assert_eq!(st.dirtied_at(0, 1), None);
        assert_eq!(st.oldest(), Some(10)); // page 3
    }
}
