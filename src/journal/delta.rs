//! Page deltas: a page the journal wrote before is written again as the
//! runs of bytes that changed since, each with its *new* content (QEMU's
//! XBZRLE layout), instead of whole.
//!
//! ```text
//! delta := run*
//! run   := skip uleb128   bytes left as they are since the previous run's end
//!          len  uleb128   bytes that follow, 1 or more
//!          len bytes      their new content
//! ```
//!
//! Runs hold new bytes, not an XOR, so applying a delta is idempotent in
//! the way a checkpoint needs: applying the deltas of a page from its
//! record `a` on, in order, to *any* content the page had at a record
//! between `a`'s predecessor and the last one applied, gives the page as
//! that last record left it — a byte a run does not cover did not change
//! over that span. So a base image a checkpoint wrote part of, or all of,
//! replays to the same pages as one it never touched.

/// Why bytes are not a delta for a page.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// A length field runs past the delta's end or is too long.
    #[error("a run's header is cut off or too long")]
    Header,
    /// A run of no bytes.
    #[error("a run of no bytes")]
    Empty,
    /// A run ends past the page, or its bytes past the delta's end.
    #[error("a run ends past the page or past the delta")]
    Overrun,
}

/// Equal bytes between two changed ones that a run takes in rather than
/// ending (a new run costs at least two bytes of header).
const MERGE_GAP: usize = 2;

fn put_uleb(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn get_uleb(p: &[u8], at: &mut usize) -> Result<usize, DeltaError> {
    let mut v: usize = 0;
    for shift in (0..usize::BITS).step_by(7).take(5) {
        let b = *p.get(*at).ok_or(DeltaError::Header)?;
        *at += 1;
        v |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DeltaError::Header)
}

/// The first index from `i` on where `old` and `new` differ (their length
/// if none), comparing eight bytes at a time where it can.
fn next_diff(old: &[u8], new: &[u8], mut i: usize) -> usize {
    let n = new.len();
    while i < n && !i.is_multiple_of(8) && old[i] == new[i] {
        i += 1;
    }
    while i + 8 <= n && old[i..i + 8] == new[i..i + 8] {
        i += 8;
    }
    while i < n && old[i] == new[i] {
        i += 1;
    }
    i
}

/// Appends to `out` the delta that turns `old` into `new` (pages of one
/// size) and returns true — or returns false, with `out` as it was, once
/// the delta would be longer than `limit` bytes (then write the page
/// whole). Identical pages give an empty delta.
pub fn encode(old: &[u8], new: &[u8], out: &mut Vec<u8>, limit: usize) -> bool {
    debug_assert_eq!(old.len(), new.len());
    let (n, start_len) = (new.len().min(old.len()), out.len());
    let (mut i, mut last_end) = (0, 0);
    loop {
        i = next_diff(old, new, i);
        if i >= n {
            return true;
        }
        let start = i;
        // Extend over changed bytes, and over short gaps of equal ones.
        loop {
            while i < n && old[i] != new[i] {
                i += 1;
            }
            let j = next_diff(old, new, i);
            if j >= n || j - i > MERGE_GAP {
                break;
            }
            i = j;
        }
        put_uleb(out, start - last_end);
        put_uleb(out, i - start);
        out.extend_from_slice(&new[start..i]);
        last_end = i;
        if out.len() - start_len > limit {
            out.truncate(start_len);
            return false;
        }
    }
}

/// The runs of `delta` for a page of `page_size` bytes: (offset in the
/// page, new bytes).
pub fn runs(delta: &[u8], page_size: usize) -> impl Iterator<Item = Result<(usize, &[u8]), DeltaError>> + '_ {
    let (mut at, mut pos, mut failed) = (0usize, 0usize, false);
    std::iter::from_fn(move || {
        if failed || at == delta.len() {
            return None;
        }
        let run = (|| {
            let skip = get_uleb(delta, &mut at)?;
            let len = get_uleb(delta, &mut at)?;
            if len == 0 {
                return Err(DeltaError::Empty);
            }
            let start = pos.checked_add(skip).ok_or(DeltaError::Overrun)?;
            let end = start.checked_add(len).filter(|&e| e <= page_size).ok_or(DeltaError::Overrun)?;
            let bytes = delta.get(at..at + len).ok_or(DeltaError::Overrun)?;
            at += len;
            pos = end;
            Ok((start, bytes))
        })();
        failed = run.is_err();
        Some(run)
    })
}

/// Checks that `delta` is well formed for a page of `page_size` bytes;
/// returns its runs.
pub fn check(delta: &[u8], page_size: usize) -> Result<usize, DeltaError> {
    runs(delta, page_size).try_fold(0, |n, r| r.map(|_| n + 1))
}

/// Applies `delta` to `page` (its new bytes over the old); a malformed
/// delta changes nothing.
pub fn apply(delta: &[u8], page: &mut [u8]) -> Result<(), DeltaError> {
    let ps = page.len();
    check(delta, ps)?;
    for run in runs(delta, ps) {
        let (at, bytes) = run?;
        page[at..at + bytes.len()].copy_from_slice(bytes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_small_change_is_a_small_delta_and_round_trips() {
        let old = vec![7u8; 4096];
        let mut new = old.clone();
        new[0..40].fill(9);
        new[4088..4096].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut d = Vec::new();
        assert!(encode(&old, &new, &mut d, 4096));
        // Two runs: header 1+1 and 2+1 bytes (skip 4048 needs two).
        assert_eq!(d.len(), 40 + 8 + 5);
        assert_eq!(check(&d, 4096), Ok(2));
        let mut page = old.clone();
        apply(&d, &mut page).unwrap();
        assert_eq!(page, new);
        // Identical pages: nothing to write.
        let mut e = Vec::new();
        assert!(encode(&old, &old, &mut e, 4096) && e.is_empty());
    }

    #[test]
    fn a_delta_over_its_limit_leaves_the_output_as_it_was() {
        let old = vec![0u8; 4096];
        let new: Vec<u8> = (0..4096).map(|i| (i % 251 + 1) as u8).collect();
        let mut d = vec![0xaa];
        assert!(!encode(&old, &new, &mut d, 4000));
        assert_eq!(d, vec![0xaa]);
    }

    #[test]
    fn short_equal_gaps_are_taken_into_a_run() {
        let old = vec![0u8; 64];
        let mut new = old.clone();
        new[10] = 1;
        new[13] = 1; // a gap of 2: one run 10..14
        new[30] = 1; // a gap of 16: a second run
        let mut d = Vec::new();
        assert!(encode(&old, &new, &mut d, 64));
        let runs: Vec<(usize, Vec<u8>)> = runs(&d, 64).map(|r| r.map(|(a, b)| (a, b.to_vec())).unwrap()).collect();
        assert_eq!(runs, vec![(10, vec![1, 0, 0, 1]), (30, vec![1])]);
    }

    #[test]
    fn malformed_deltas_are_refused() {
        let ps = 4096;
        assert_eq!(check(&[0x80], ps), Err(DeltaError::Header), "a cut-off length");
        assert_eq!(check(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01], ps), Err(DeltaError::Header), "too long");
        assert_eq!(check(&[0, 0], ps), Err(DeltaError::Empty));
        assert_eq!(check(&[0, 3, 1, 2], ps), Err(DeltaError::Overrun), "bytes past the delta's end");
        // skip 4095, len 2: past the page.
        assert_eq!(check(&[0xff, 0x1f, 2, 1, 1], ps), Err(DeltaError::Overrun));
        let mut page = vec![0u8; ps];
        assert_eq!(apply(&[0xff, 0x1f, 2, 1, 1], &mut page), Err(DeltaError::Overrun));
        assert!(page.iter().all(|&b| b == 0));
    }

    /// A page and a changed copy: `edits` (offset, length, byte) ranges
    /// written over it.
    fn pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (prop::collection::vec(any::<u8>(), 512), prop::collection::vec((0..512usize, 0..80usize, any::<u8>()), 0..12))
            .prop_map(|(old, edits)| {
                let mut new = old.clone();
                for (at, len, b) in edits {
                    let end = (at + len).min(new.len());
                    new[at..end].fill(b);
                }
                (old, new)
            })
    }

    proptest! {
        #[test]
        fn encode_then_apply_gives_the_new_page((old, new) in pair()) {
            let mut d = Vec::new();
            prop_assert!(encode(&old, &new, &mut d, usize::MAX));
            prop_assert!(check(&d, 512).is_ok());
            let mut page = old.clone();
            apply(&d, &mut page).unwrap();
            prop_assert_eq!(&page, &new);
            // Idempotent: applied to the new page, nothing changes.
            apply(&d, &mut page).unwrap();
            prop_assert_eq!(&page, &new);
            // Every byte outside the runs is equal in old and new; every
            // byte inside is new's: so only the runs depend on the base.
            let mut covered = vec![false; 512];
            for r in runs(&d, 512) {
                let (at, bytes) = r.unwrap();
                covered[at..at + bytes.len()].fill(true);
            }
            for i in 0..512 {
                prop_assert!(covered[i] || old[i] == new[i], "byte {} changed outside the runs", i);
            }
            // A limit below its size refuses it.
            if !d.is_empty() {
                let mut e = Vec::new();
                prop_assert!(!encode(&old, &new, &mut e, d.len() - 1) && e.is_empty());
            }
        }

        #[test]
        fn any_bytes_either_check_or_are_refused_without_panicking(d in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut page = vec![0u8; 512];
            prop_assert_eq!(check(&d, 512).is_ok(), apply(&d, &mut page).is_ok());
        }
    }
}
