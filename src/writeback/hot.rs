//! Hot pages: pages the guest dirties again as soon as they are written
//! out. Re-protecting such a page at every write-out costs the guest a
//! dirty-log fault per page per expiry, for nothing: it is dirty again at
//! once. So a page found dirty at [`HotPolicy::after`] consecutive
//! write-outs is *hot*: the expiry pass writes it out without re-protecting
//! it, and it stays dirty, as if dirtied when that pass began (nothing the
//! guest writes after the copy can be older than that), so the next expiry
//! writes it again. Every [`HotPolicy::recheck_every`]-th write-out of a hot
//! page re-protects it once, to see whether it cooled.
//!
//! ```text
//! write-out of page p at t:  dirtied again within the window (the engine:
//!                            two expiries) of its last write-out?
//!                            streak + 1 : streak = 1
//!   streak >= after, expiry pass, not the recheck:  copy, keep p dirty at t
//!   otherwise:                                      re-protect, copy, p clean
//! ```
//!
//! Sound only where the write-out itself leaves the page writable (an
//! image file: a `pwrite` from guest RAM; not the backing file, whose host
//! writeback write-protects the page whatever the engine does) and where
//! a page stays writable until the engine re-protects it (manual-protect
//! dirty logging; bitmap and ring harvests re-protect every page they
//! report, so there is nothing to save). Background, throttling and sync
//! passes re-protect what they write: after them those pages are clean.

use crate::dirty_set::DirtySet;
use crate::kvm::Slot;
use crate::writeback::page_state::PageStates;

/// No write-out yet.
const NEVER: u32 = u32::MAX;

/// When a page counts as hot and how often a hot page is re-checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotPolicy {
    /// A page dirty again at this many consecutive write-outs is hot (K).
    pub after: u8,
    /// Every this-many-th write-out of a hot page re-protects it (M).
    pub recheck_every: u8,
}

impl Default for HotPolicy {
    /// K = 2, M = 8: one dirty-log fault per hot page per 8 expiries
    /// instead of one per expiry; a page that cooled is written at most
    /// 7 times more than needed (a few µs of writer time each).
    fn default() -> Self {
        HotPolicy { after: 2, recheck_every: 8 }
    }
}

/// One page's heat.
#[derive(Debug, Clone, Copy)]
struct Heat {
    /// Engine time of its last write-out (`NEVER`).
    written_at: u32,
    /// Consecutive write-outs it was found dirty at (saturates).
    streak: u8,
    /// Write-outs since it was last re-protected.
    open_writes: u8,
}

const COLD: Heat = Heat { written_at: NEVER, streak: 0, open_writes: 0 };

/// The heat of every page, and which pages the engine leaves writable.
#[derive(Debug, Clone)]
pub struct HotPages {
    policy: HotPolicy,
    heat: Vec<Vec<Heat>>,
    /// Pages left writable (not re-protected) at their last write-out.
    open: DirtySet,
}

impl HotPages {
    /// Every page cold.
    pub fn new(policy: HotPolicy, slots: &[Slot], page_size: u64) -> Self {
        HotPages {
            policy,
            heat: slots.iter().map(|s| vec![COLD; s.size.div_ceil(page_size) as usize]).collect(),
            open: DirtySet::new(slots, page_size),
        }
    }

    /// The policy.
    pub fn policy(&self) -> HotPolicy {
        self.policy
    }

    /// Pages left writable at their last write-out (hot now).
    pub fn open(&self) -> &DirtySet {
        &self.open
    }

    /// Accounts a write-out at `now` of `set` (every page dirty in
    /// `states`, not yet under writeback); `window` is how soon after its
    /// last write-out a page must be dirty again to count as consecutive
    /// (the expiry). With `may_leave_open` (an expiry pass), returns the
    /// hot pages to write without re-protecting; otherwise none.
    pub fn write_out(
        &mut self,
        set: &DirtySet,
        states: &PageStates,
        now: u64,
        window: u64,
        may_leave_open: bool,
    ) -> DirtySet {
        let now32 = now.min(u64::from(NEVER - 1)) as u32;
        let mut leave = DirtySet::new(&set.slots().iter().map(|s| s.slot()).collect::<Vec<_>>(), set.page_size());
        for (i, s) in set.slots().iter().enumerate() {
            let Some(heat) = self.heat.get_mut(i) else { continue };
            for p in s.pages() {
                let Some(h) = heat.get_mut(p as usize) else { continue };
                let dirtied = states.dirtied_at(i, p).unwrap_or(now);
                let again = h.written_at != NEVER && dirtied <= u64::from(h.written_at).saturating_add(window);
                h.streak = if again { h.streak.saturating_add(1) } else { 1 };
                h.written_at = now32;
                let hot = h.streak >= self.policy.after;
                if may_leave_open && hot && h.open_writes.saturating_add(1) < self.policy.recheck_every {
                    h.open_writes += 1;
                    let _ = leave.set_page(i, p);
                } else {
                    h.open_writes = 0;
                }
            }
        }
        // The open set after this pass: what was open and is not written
        // now (still unprotected, untouched), plus what is left open now.
        self.open.subtract(set);
        let _ = self.open.union_with(&leave);
        leave
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: u64 = 4096;

    fn slots() -> Vec<Slot> {
        vec![Slot { slot: 0, gpa: 0, size: 64 * PS }]
    }

    fn set(pages: &[u64]) -> DirtySet {
        let mut d = DirtySet::new(&slots(), PS);
        for &p in pages {
            d.set_page(0, p).unwrap();
        }
        d
    }

    fn pages(d: &DirtySet) -> Vec<u64> {
        d.slots()[0].pages().collect()
    }

    /// A page dirty again within the window at every write-out turns hot
    /// at the K-th, is left open M-1 times in M, and a page dirtied only
    /// after the window is never hot.
    #[test]
    fn streaks_make_pages_hot_and_rechecks_close_them() {
        let pol = HotPolicy { after: 2, recheck_every: 3 };
        let mut hot = HotPages::new(pol, &slots(), PS);
        let mut st = PageStates::new(&slots(), PS);
        let mut left = Vec::new();
        for k in 0..8u64 {
            let now = k * 1000;
            // page 1 dirtied right after each write-out, page 2 only long after
            st.mark_dirty(&set(&[1]), now.saturating_sub(900));
            if k % 2 == 0 {
                st.mark_dirty(&set(&[2]), now.saturating_sub(900));
            }
            let s = if k % 2 == 0 { set(&[1, 2]) } else { set(&[1]) };
            let open = hot.write_out(&s, &st, now, 1000, true);
            left.push(pages(&open));
            st.start_writeback(&s);
            st.end_writeback(true);
        }
        // k=0: first write-out (streak 1); k=1: streak 2, hot: open;
        // k=2 open; k=3 the recheck re-protects it; k=4, 5 open; k=6 ...
        assert_eq!(left, vec![vec![], vec![1], vec![1], vec![], vec![1], vec![1], vec![], vec![1]]);
        // page 2, dirtied 900 ms into a 2000 ms gap, is 1100 ms after its write-out: never consecutive
        assert_eq!(pages(hot.open()), vec![1]);
        // a pass that may not leave pages open (sync, background) closes them
        let none = hot.write_out(&set(&[1]), &st, 9000, 1000, false);
        assert!(none.is_empty());
        assert!(hot.open().is_empty());
    }
}
