//! Post-copy bookkeeping on the destination: which pages the source still
//! owes after the switchover ([`Owed`]), which of them a vCPU already asked
//! for, and the checks every page frame of the post-copy phase passes
//! before it is placed in guest memory ([`PostcopyReceiver`]).
//!
//! ```text
//! ... -> Postcopy* -> State   (the guest runs here from now on)
//!     -> (Pages | Zero)* -> Done          source -> dest, each owed page once
//!     <- PageRequest*                     dest -> source, faulted pages
//! ```
//!
//! When the link breaks after the switchover the destination keeps what
//! is still owed; the source reconnects (`Resume`), is told it
//! ([`Owed::runs`], as a `Postcopy` frame, then the pages vCPUs wait for
//! as a `PageRequest`) and sends each of those pages once more, then a
//! `Done` whose totals count from the resume ([`PostcopyReceiver::resume`]).
//!
//! A page not owed reads as what the destination's file holds (zero where
//! the file has a hole); an owed page is placed once, atomically, when it
//! arrives — by whoever placing it (the VMM, with `UFFDIO_COPY`) — and is
//! never accepted twice.

use super::frame::{Frame, PAGE};
use super::receiver::{check_totals, ReceiveError};

/// Pages the source still owes, one bit per page of RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owed {
    bits: Vec<u64>,
    pages: u64,
    remaining: u64,
}

impl Owed {
    /// Nothing owed, for `mem_size` bytes of RAM.
    pub fn new(mem_size: u64) -> Self {
        let pages = mem_size / PAGE;
        Owed { bits: vec![0; pages.div_ceil(64) as usize], pages, remaining: 0 }
    }

    fn check(&self, offset: u64, count: u64) -> Result<(u64, u64), ReceiveError> {
        let mem_size = self.pages * PAGE;
        let first = offset / PAGE;
        match first.checked_add(count) {
            Some(end) if offset.is_multiple_of(PAGE) && end <= self.pages => Ok((first, end)),
            _ => Err(ReceiveError::OutOfBounds { offset, len: count.saturating_mul(PAGE), mem_size }),
        }
    }

    /// Adds runs of (offset, page count); a page owed twice is refused.
    pub fn add(&mut self, runs: &[(u64, u32)]) -> Result<(), ReceiveError> {
        for &(offset, count) in runs {
            let (first, end) = self.check(offset, u64::from(count))?;
            if masks(first, end).any(|(w, m)| self.bits[w] & m != 0) {
                return Err(ReceiveError::Protocol(format!(
                    "post-copy: pages at {offset:#x} (+{count}) are owed twice"
                )));
            }
            for (w, m) in masks(first, end) {
                self.bits[w] |= m;
            }
            self.remaining += end - first;
        }
        Ok(())
    }

    fn has(&self, page: u64) -> bool {
        self.bits[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Whether the page at file offset `offset` is still owed.
    pub fn owes(&self, offset: u64) -> bool {
        let p = offset / PAGE;
        p < self.pages && self.has(p)
    }

    /// The pages still owed, as runs of (file offset, page count) in
    /// offset order.
    pub fn runs(&self) -> Vec<(u64, u32)> {
        let mut runs: Vec<(u64, u32)> = Vec::new();
        for (w, &word) in self.bits.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let lo = bits.trailing_zeros() as u64;
                let len = (bits >> lo).trailing_ones() as u64;
                let first = w as u64 * 64 + lo;
                match runs.last_mut() {
                    Some((off, n)) if *off / PAGE + u64::from(*n) == first && *n < u32::MAX - 64 => *n += len as u32,
                    _ => runs.push((first * PAGE, len as u32)),
                }
                bits = if lo + len == 64 { 0 } else { bits & !(((1u64 << len) - 1) << lo) };
            }
        }
        runs
    }

    /// Pages still owed.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Takes `count` pages at `offset` off the debt: each must be owed
    /// (a page outside RAM, never owed or already delivered is refused,
    /// and nothing is taken).
    pub fn deliver(&mut self, offset: u64, count: u64) -> Result<(), ReceiveError> {
        let (first, end) = self.check(offset, count)?;
        if let Some((w, m)) = masks(first, end).find(|&(w, m)| self.bits[w] & m != m) {
            let missing = (m & !self.bits[w]).trailing_zeros() as u64;
            return Err(ReceiveError::Protocol(format!(
                "post-copy: page at {:#x} is not owed (never announced, or delivered before)",
                (w as u64 * 64 + missing) * PAGE
            )));
        }
        for (w, m) in masks(first, end) {
            self.bits[w] &= !m;
        }
        self.remaining -= end - first;
        Ok(())
    }
}

/// The words of a page bitmap that pages `first..end` fall in, each with
/// the mask of those pages' bits (a word at a time: a run of a whole
/// working set is announced and checked in the switchover's pause).
fn masks(first: u64, end: u64) -> impl Iterator<Item = (usize, u64)> {
    let words = if first < end { first / 64..end.div_ceil(64) } else { 0..0 };
    words.map(move |w| {
        let (lo, hi) = (first.max(w * 64) - w * 64, end.min(w * 64 + 64) - w * 64);
        let m = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
        (w as usize, m)
    })
}

/// What the VMM does with a checked post-copy frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Placement {
    /// Place these pages at this file offset (they were owed).
    Pages {
        /// File offset.
        offset: u64,
        /// Whole pages.
        data: Vec<u8>,
    },
    /// Place zero pages in these runs (they were owed).
    Zero(Vec<(u64, u32)>),
    /// Every owed page arrived; the totals match.
    Done,
}

/// Checks the source's frames after a post-copy switchover.
#[derive(Debug)]
pub struct PostcopyReceiver {
    owed: Owed,
    pages: u64,
    zero_pages: u64,
    /// Data and zero pages since the connection `Done` closes opened
    /// (the switchover, or the last resume).
    leg: (u64, u64),
}

impl PostcopyReceiver {
    /// A receiver for the pages in `owed`.
    pub fn new(owed: Owed) -> Self {
        PostcopyReceiver { owed, pages: 0, zero_pages: 0, leg: (0, 0) }
    }

    /// A source resumed the phase on a new connection: its `Done` will
    /// count from here. Returns what it still owes.
    pub fn resume(&mut self) -> Vec<(u64, u32)> {
        self.leg = (0, 0);
        self.owed.runs()
    }

    /// What is still owed.
    pub fn owed(&self) -> &Owed {
        &self.owed
    }

    /// Data pages received after the switchover.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Zero pages received after the switchover.
    pub fn zero_pages(&self) -> u64 {
        self.zero_pages
    }

    /// Checks `f` and says what to place; nothing is placed for a frame
    /// that fails.
    pub fn apply(&mut self, f: Frame) -> Result<Placement, ReceiveError> {
        match f {
            Frame::Pages { offset, data } => {
                let count = data.len() as u64 / PAGE;
                self.owed.deliver(offset, count)?;
                self.pages += count;
                self.leg.0 += count;
                Ok(Placement::Pages { offset, data })
            }
            Frame::Zero(runs) => {
                // All or nothing: check every run on a copy first.
                let mut owed = self.owed.clone();
                for &(offset, count) in &runs {
                    owed.deliver(offset, u64::from(count))?;
                }
                self.owed = owed;
                let n = runs.iter().map(|&(_, n)| u64::from(n)).sum::<u64>();
                self.zero_pages += n;
                self.leg.1 += n;
                Ok(Placement::Zero(runs))
            }
            Frame::Done { pages, zero_pages } => {
                check_totals((pages, zero_pages), self.leg)?;
                if self.owed.remaining() > 0 {
                    return Err(ReceiveError::Protocol(format!(
                        "post-copy: Done with {} pages still owed",
                        self.owed.remaining()
                    )));
                }
                Ok(Placement::Done)
            }
            Frame::Abort(r) => Err(ReceiveError::Aborted(r)),
            other => Err(ReceiveError::Protocol(format!("unexpected {:?} frame during post-copy", other.kind()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_owed_page_is_accepted_once_and_totals_are_checked() {
        let mut owed = Owed::new(64 * PAGE);
        owed.add(&[(0, 4), (10 * PAGE, 2)]).unwrap();
        assert_eq!(owed.remaining(), 6);
        assert!(owed.owes(3 * PAGE) && !owed.owes(4 * PAGE) && owed.owes(11 * PAGE));
        assert!(owed.add(&[(3 * PAGE, 1)]).unwrap_err().to_string().contains("owed twice"));
        assert!(matches!(owed.add(&[(63 * PAGE, 2)]), Err(ReceiveError::OutOfBounds { .. })));

        let mut rx = PostcopyReceiver::new(owed);
        let page = |n: usize| vec![7u8; n * PAGE as usize];
        assert_eq!(
            rx.apply(Frame::Pages { offset: PAGE, data: page(2) }).unwrap(),
            Placement::Pages { offset: PAGE, data: page(2) }
        );
        // Twice: refused, and nothing changes.
        let e = rx.apply(Frame::Pages { offset: 2 * PAGE, data: page(1) }).unwrap_err();
        assert!(e.to_string().contains("not owed"), "{e}");
        // Never owed.
        assert!(rx.apply(Frame::Pages { offset: 5 * PAGE, data: page(1) }).is_err());
        // A zero frame with one bad run places none of its runs.
        assert!(rx.apply(Frame::Zero(vec![(0, 1), (40 * PAGE, 1)])).is_err());
        assert!(rx.owed().owes(0));
        // Done too early.
        assert!(rx.apply(Frame::Done { pages: 2, zero_pages: 0 }).unwrap_err().to_string().contains("still owed"));
        assert_eq!(
            rx.apply(Frame::Zero(vec![(0, 1), (10 * PAGE, 2)])).unwrap(),
            Placement::Zero(vec![(0, 1), (10 * PAGE, 2)])
        );
        rx.apply(Frame::Pages { offset: 3 * PAGE, data: page(1) }).unwrap();
        assert!(matches!(rx.apply(Frame::Done { pages: 2, zero_pages: 3 }), Err(ReceiveError::Totals { .. })));
        assert_eq!(rx.apply(Frame::Done { pages: 3, zero_pages: 3 }).unwrap(), Placement::Done);
        assert!(rx.apply(Frame::State(Box::default())).is_err());
    }

    #[test]
    fn runs_across_words_are_owed_and_delivered_page_by_page() {
        let mut owed = Owed::new(256 * PAGE);
        // 60..200: the tail of word 0, words 1 and 2 whole, the head of word 3.
        owed.add(&[(60 * PAGE, 140)]).unwrap();
        assert_eq!(owed.remaining(), 140);
        assert!(!owed.owes(59 * PAGE) && owed.owes(60 * PAGE) && owed.owes(199 * PAGE) && !owed.owes(200 * PAGE));
        assert!(owed.add(&[(199 * PAGE, 2)]).unwrap_err().to_string().contains("owed twice"));
        owed.add(&[(200 * PAGE, 1), (0, 60)]).unwrap();
        owed.deliver(64 * PAGE, 64).unwrap();
        let e = owed.deliver(100 * PAGE, 40).unwrap_err().to_string();
        assert!(e.contains(&format!("{:#x}", 100 * PAGE)), "{e}");
        assert!(owed.owes(128 * PAGE) && !owed.owes(127 * PAGE));
        owed.deliver(0, 64).unwrap();
        owed.deliver(128 * PAGE, 73).unwrap();
        assert_eq!(owed.remaining(), 0);
        assert!(owed.deliver(0, 0).is_ok());
    }

    #[test]
    fn what_is_still_owed_comes_back_as_runs_and_a_resumed_done_counts_from_the_resume() {
        let mut owed = Owed::new(256 * PAGE);
        owed.add(&[(0, 3), (60 * PAGE, 140), (255 * PAGE, 1)]).unwrap();
        owed.deliver(PAGE, 1).unwrap();
        owed.deliver(100 * PAGE, 2).unwrap();
        let runs = owed.runs();
        assert_eq!(runs, vec![(0, 1), (2 * PAGE, 1), (60 * PAGE, 40), (102 * PAGE, 98), (255 * PAGE, 1)]);
        let mut again = Owed::new(256 * PAGE);
        again.add(&runs).unwrap();
        assert_eq!(again, owed);
        assert_eq!(Owed::new(256 * PAGE).runs(), vec![]);

        let mut rx = PostcopyReceiver::new(owed);
        rx.apply(Frame::Pages { offset: 0, data: vec![1; PAGE as usize] }).unwrap();
        // The link broke; the source comes back and owes the rest.
        let left = rx.resume();
        assert_eq!(left.iter().map(|&(_, n)| u64::from(n)).sum::<u64>(), 140);
        for (offset, count) in left {
            rx.apply(Frame::Zero(vec![(offset, count)])).unwrap();
        }
        // The page before the break is not in the new leg's totals.
        assert!(matches!(rx.apply(Frame::Done { pages: 1, zero_pages: 140 }), Err(ReceiveError::Totals { .. })));
        assert_eq!(rx.apply(Frame::Done { pages: 0, zero_pages: 140 }).unwrap(), Placement::Done);
        assert_eq!((rx.pages(), rx.zero_pages()), (1, 140));
    }
}
