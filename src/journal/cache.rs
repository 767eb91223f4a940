//! The writer's page cache: what the journal last wrote for a bounded
//! number of pages, the bases of their next records' deltas. Evicts by
//! CLOCK (a page used since the hand last passed it gets another round),
//! which keeps a working set that is rewritten epoch after epoch.

use std::collections::HashMap;

/// Pages by file offset, at most a fixed number of them.
#[derive(Debug, Default)]
pub struct PageCache {
    page_size: usize,
    capacity: usize,
    /// File offset -> slot.
    index: HashMap<u64, usize>,
    /// Per slot: its page's offset and whether it was used since the
    /// hand last passed.
    slots: Vec<(u64, bool)>,
    data: Vec<u8>,
    hand: usize,
}

impl PageCache {
    /// A cache of at most `bytes` of pages of `page_size` bytes (room is
    /// taken as pages come).
    pub fn new(page_size: u64, bytes: u64) -> Self {
        let capacity = usize::try_from(bytes / page_size.max(1)).unwrap_or(usize::MAX);
        PageCache { page_size: page_size as usize, capacity, ..Default::default() }
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether it holds no page.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The content last stored for the page at `off`.
    pub fn get(&self, off: u64) -> Option<&[u8]> {
        let ps = self.page_size;
        self.index.get(&off).map(|&s| &self.data[s * ps..(s + 1) * ps])
    }

    /// Stores `page` as the content of the page at `off`, evicting
    /// another page when full.
    pub fn put(&mut self, off: u64, page: &[u8]) {
        let ps = self.page_size;
        if self.capacity == 0 || page.len() != ps {
            return;
        }
        let slot = match self.index.get(&off) {
            Some(&s) => s,
            None if self.slots.len() < self.capacity => {
                self.slots.push((off, false));
                self.data.resize(self.slots.len() * ps, 0);
                self.slots.len() - 1
            }
            None => self.evict(),
        };
        self.index.insert(off, slot);
        self.slots[slot] = (off, true);
        self.data[slot * ps..(slot + 1) * ps].copy_from_slice(page);
    }

    /// Frees the first slot the hand finds unused since its last pass.
    fn evict(&mut self) -> usize {
        loop {
            let h = self.hand;
            self.hand = (h + 1) % self.slots.len();
            let (off, used) = self.slots[h];
            if used {
                self.slots[h].1 = false;
            } else {
                self.index.remove(&off);
                return h;
            }
        }
    }

    /// Forgets every page (keeping the room).
    pub fn clear(&mut self) {
        self.index.clear();
        self.slots.clear();
        self.hand = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_holds_at_most_its_capacity_and_keeps_pages_in_use() {
        let mut c = PageCache::new(4, 12);
        c.put(0, b"aaaa");
        c.put(4, b"bbbb");
        c.put(8, b"cccc");
        assert_eq!(c.len(), 3);
        c.put(4, b"BBBB");
        assert_eq!((c.len(), c.get(4)), (3, Some(&b"BBBB"[..])));
        // Full, all used: the hand clears every bit, then evicts page 0.
        c.put(12, b"dddd");
        assert_eq!((c.len(), c.get(0)), (3, None));
        // Page 4 used again since the hand passed: page 8 goes next.
        c.put(4, b"bbbb");
        c.put(16, b"eeee");
        assert_eq!(
            (c.get(8), c.get(4), c.get(12), c.get(16)),
            (None, Some(&b"bbbb"[..]), Some(&b"dddd"[..]), Some(&b"eeee"[..]))
        );
        c.clear();
        assert!(c.is_empty() && c.get(4).is_none());
        let mut none = PageCache::new(4, 0);
        none.put(0, b"aaaa");
        assert!(none.is_empty());
    }
}
