//! Pre-copy: copying guest memory while the guest runs, so that only a
//! small residue is copied with the vCPUs paused.
//!
//! [`run_rounds`] is the round driver under live snapshots and migration:
//! after a first copy of everything, it collects what the guest dirtied
//! meanwhile (through the caller's own [`Subscription`]) and copies it
//! again, round after round, until the residue is estimated to copy within
//! a [`Budget`] (from the last round's rate) and another round would not
//! shrink it much, or the rounds run out. The caller's [`RoundHooks`] copy
//! each round (to a file, over the network), report progress and throttle
//! the vCPUs (migration's auto-converge).
//!
//! ```text
//! first copy (everything)                         caller, timed -> Round
//! loop: check (a stop signal gives up)            hooks.check
//!       collect = harvest, take, re-protect       subscription
//!       estimate = dirty bytes / last round's rate
//!       looked (progress, throttles)              hooks.looked
//!       within budget and not shrinking -> Converged
//!       switch_after rounds done        -> Switch (post-copy)
//!       max_rounds after the first      -> MaxRounds
//!       copy the set                              hooks.copy -> Round
//! -> Residue: the set the caller copies paused
//! ```
//!
//! Diff-snapshot pre-copy: while the guest runs, the pages the snapshot chain's
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
use std::time::Duration;

use smudge::dirty_set::{DirtySet, DirtySetError};
use smudge::harvest::{HarvestError, Subscription};
use smudge::memory::{ram_layout, GuestRam};
use smudge::migration::frame::PAGE;
use smudge::sink::{ImageFile, Sink, SinkError};

/// One copy round: the bytes it copied and how long that took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Round {
    /// Bytes copied.
    pub bytes: u64,
    /// How long the copy took.
    pub time: Duration,
}

impl Round {
    /// Bytes per second.
    pub fn rate(&self) -> f64 {
        self.bytes as f64 / self.time.as_secs_f64().max(1e-6)
    }
}

/// When the rounds stop and the residue is copied paused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// The paused copy of the residue may take this long (estimated from
    /// the last round's rate).
    pub pause: Duration,
    /// Copy rounds after the first before the pause is forced.
    pub max_rounds: u32,
    /// Within budget, one more round is still worth it while what is dirty
    /// is under this fraction (numerator, denominator) of what the last
    /// round copied — the residue shrinks, so the pause ends up as short as
    /// the guest allows ...
    pub shrink: (u64, u64),
    /// ... and the residue is estimated above this.
    pub worth_a_round: Duration,
    /// Stop once this many rounds (the first included) are done, to hand
    /// the rest over to post-copy.
    pub switch_after: Option<u32>,
}

/// What a look at the log found, after round `round`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Look {
    /// The round just finished (0: the first copy).
    pub round: u32,
    /// That round.
    pub last: Round,
    /// Its rate, bytes per second.
    pub rate: f64,
    /// Pages dirty now (the next round's work).
    pub pages: u64,
    /// How long copying them is estimated to take at that rate.
    pub estimate: Duration,
}

/// Why the rounds ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The residue fits the budget and would not shrink much further.
    Converged,
    /// `switch_after` rounds were done: post-copy takes over.
    Switch,
    /// `max_rounds` rounds after the first were done.
    MaxRounds,
}

/// The rounds' outcome: what is left to copy with the vCPUs paused.
#[derive(Debug)]
pub struct Residue {
    /// Pages dirty since the last round (collected, re-protected).
    pub set: DirtySet,
    /// Why the rounds ended.
    pub end: End,
    /// The last round's rate, bytes per second.
    pub rate: f64,
}

/// What a pre-copy does in each round.
pub trait RoundHooks {
    /// What the copy (or a stop) fails with.
    type Error: From<HarvestError>;

    /// Before each look at the log: an error gives up (a stop signal).
    fn check(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// After each look, before the decision: progress, throttles.
    fn looked(&mut self, _look: &Look) {}

    /// Copies round `round`'s pages.
    fn copy(&mut self, round: u32, set: &DirtySet) -> Result<Round, Self::Error>;
}

/// Runs the rounds after a `first` copy of everything, on `sub` (which
/// must have been subscribed before that copy began); see the module doc.
pub fn run_rounds<H: RoundHooks>(
    sub: &Subscription,
    budget: &Budget,
    first: Round,
    hooks: &mut H,
) -> Result<Residue, H::Error> {
    let (mut last, mut round) = (first, 0u32);
    loop {
        hooks.check()?;
        let set = sub.collect()?;
        let dirty = set.count() * PAGE;
        let rate = last.rate();
        let estimate =
            if last.bytes == 0 { Duration::ZERO } else { Duration::from_secs_f64(dirty as f64 / rate.max(1.0)) };
        hooks.looked(&Look { round, last, rate, pages: set.count(), estimate });
        if let Some(end) = budget.end(round, last.bytes, dirty, estimate) {
            return Ok(Residue { set, end, rate });
        }
        last = hooks.copy(round + 1, &set)?;
        sub.recycle(set);
        round += 1;
    }
}

impl Budget {
    /// Whether the rounds end after round `round`, which copied `copied`
    /// bytes, with `dirty` bytes dirty now that copy in `estimate`.
    fn end(&self, round: u32, copied: u64, dirty: u64, estimate: Duration) -> Option<End> {
        let (num, den) = self.shrink;
        let shrinking = dirty.saturating_mul(den) < copied.saturating_mul(num) && estimate > self.worth_a_round;
        if estimate <= self.pause && !shrinking {
            Some(End::Converged)
        } else if self.switch_after.is_some_and(|n| round + 1 >= n) {
            Some(End::Switch)
        } else if round >= self.max_rounds {
            Some(End::MaxRounds)
        } else {
            None
        }
    }
}

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

/// What a write fault costs the guest, as the durable mode's pass plan
/// prices it: a page a pass re-protects and the guest writes again in the
/// same epoch faults twice. Measured on this host ~25 µs per fault (an
/// upper bound, from the vCPU's lost compute over the faults), ~6 µs in
/// a loop of rewrites: the price sits between.
pub const FAULT_US: f64 = 15.0;
/// The residue's copy the plan aims to keep a boundary's pause under:
/// the pause's other parts (stopping the vCPUs, the harvest, the state)
/// take ~250 µs of the 1 ms the pause may take.
pub const RESIDUE_BUDGET_US: f64 = 300.0;
/// Passes an epoch makes at most.
pub const MAX_PASSES: u32 = 4;
/// An epoch without passes makes one anyway after this many, so the plan
/// keeps seeing what passes cost.
const PROBE_EVERY: u32 = 16;
/// The moving averages' weight of the newest epoch.
const WEIGHT: f64 = 0.25;

/// How many pre-copy passes each epoch of the durable mode makes. A pass
/// takes pages out of the boundary's residue (a shorter pause), but every
/// page it re-protects that the guest writes again before the boundary
/// faults a second time. The plan weighs the two from what the last
/// epochs showed — the guest's rate of new pages, the pages passes found
/// written again, the copy's cost per page — and picks the passes that
/// cost the guest least among those whose residue fits
/// [`RESIDUE_BUDGET_US`] (the most passes when none does).
#[derive(Debug, Clone)]
pub struct PassPlan {
    /// Distinct pages the guest dirties per second.
    rate: f64,
    /// Pages per pass the guest wrote again after the pass copied them.
    rewritten: f64,
    /// Copying one page, µs.
    copy_us: f64,
    /// Epochs in a row planned without a pass.
    without: u32,
    /// A fixed number of passes instead (a test hook).
    fixed: Option<u32>,
}

/// What one epoch showed the plan.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EpochSeen {
    /// How long it ran.
    pub len: Duration,
    /// Its passes.
    pub passes: u32,
    /// Distinct pages it holds.
    pub distinct: u64,
    /// Pages a harvest found that the epoch held already (written again
    /// after a pass copied them).
    pub rewritten: u64,
    /// Pages copied (by passes and at the boundary), and the time it took.
    pub copied: u64,
    /// The copies' time.
    pub copy_time: Duration,
}

impl PassPlan {
    /// A plan; `fixed` makes every epoch take that many passes.
    pub fn new(fixed: Option<u32>) -> Self {
        PassPlan { rate: 0.0, rewritten: 0.0, copy_us: 1.5, without: 0, fixed }
    }

    /// Learns from an epoch just sealed.
    pub fn seen(&mut self, e: &EpochSeen) {
        let avg = |old: f64, new: f64| old + WEIGHT * (new - old);
        if e.len > Duration::ZERO {
            self.rate = avg(self.rate, e.distinct as f64 / e.len.as_secs_f64());
        }
        if e.passes > 0 {
            self.rewritten = avg(self.rewritten, e.rewritten as f64 / f64::from(e.passes));
        }
        if e.copied >= 16 {
            self.copy_us = avg(self.copy_us, e.copy_time.as_secs_f64() * 1e6 / e.copied as f64);
        }
    }

    /// Passes for the next epoch, of `len`.
    pub fn passes(&mut self, len: Duration) -> u32 {
        if let Some(n) = self.fixed {
            return n;
        }
        let dirtied = self.rate * len.as_secs_f64();
        let residue = |k: u32| dirtied * self.copy_us / f64::from(k + 1);
        let cost = |k: u32| f64::from(k) * self.rewritten * FAULT_US + residue(k);
        let fitting = (0..=MAX_PASSES).filter(|&k| residue(k) <= RESIDUE_BUDGET_US);
        let k = fitting.min_by(|&a, &b| cost(a).total_cmp(&cost(b))).unwrap_or(MAX_PASSES);
        if k > 0 {
            self.without = 0;
            return k;
        }
        self.without += 1;
        if self.without >= PROBE_EVERY {
            self.without = 0;
            return 1;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use smudge::kvm::Slot;
    use smudge::memory::BackingFile;

    #[test]
    fn passes_weigh_the_faults_they_add_against_the_pause_they_save() {
        let ms = Duration::from_millis;
        let epoch = |len: u64, passes: u32, distinct: u64, rewritten: u64| EpochSeen {
            len: ms(len),
            passes,
            distinct,
            rewritten,
            copied: distinct,
            copy_time: Duration::from_micros(distinct), // 1 µs a page
        };
        let learn = |plan: &mut PassPlan, e: EpochSeen| (0..40).for_each(|_| plan.seen(&e));
        // 128 new pages per 10 ms epoch, 13 rewritten per pass: the
        // residue (128 µs) fits without a pass, and a pass would add 13
        // faults (195 µs) to save 64 µs of pause: none, but a probe
        // every 16 epochs.
        let mut plan = PassPlan::new(None);
        learn(&mut plan, epoch(10, 1, 128, 13));
        let planned: Vec<u32> = (0..16).map(|_| plan.passes(ms(10))).collect();
        assert_eq!(planned.iter().sum::<u32>(), 1, "{planned:?}");
        assert_eq!(planned[15], 1, "{planned:?}");
        // 50 ms epochs of the same guest: 640 µs of residue does not fit;
        // two passes (213 µs) do and cost less than three.
        learn(&mut plan, epoch(50, 2, 640, 26));
        assert_eq!(plan.passes(ms(50)), 2);
        // Nothing written again: passes are free, the shortest pause wins.
        learn(&mut plan, epoch(50, 2, 640, 0));
        assert_eq!(plan.passes(ms(50)), MAX_PASSES);
        // A residue no number of passes fits: the most passes.
        learn(&mut plan, epoch(50, 4, 64_000, 26));
        assert_eq!(plan.passes(ms(50)), MAX_PASSES);
        // A fixed plan is kept whatever is seen.
        let mut fixed = PassPlan::new(Some(1));
        learn(&mut fixed, epoch(10, 1, 10, 10));
        assert_eq!(fixed.passes(ms(10)), 1);
    }

    #[test]
    fn rounds_end_when_the_residue_fits_and_stops_shrinking() {
        let ms = Duration::from_millis;
        let b = Budget { pause: ms(20), max_rounds: 3, shrink: (3, 4), worth_a_round: ms(1), switch_after: None };
        // Over budget: another round, until the rounds run out.
        assert_eq!(b.end(0, 100, 90, ms(30)), None);
        assert_eq!(b.end(3, 100, 90, ms(30)), Some(End::MaxRounds));
        // Within budget but shrinking (90 -> under 3/4): one more.
        assert_eq!(b.end(1, 100, 70, ms(10)), None);
        // Within budget and not shrinking, or too small to be worth it.
        assert_eq!(b.end(1, 100, 80, ms(10)), Some(End::Converged));
        assert_eq!(b.end(1, 100, 10, ms(0)), Some(End::Converged));
        // Post-copy after two rounds, the first included.
        let p = Budget { switch_after: Some(2), ..b };
        assert_eq!(p.end(0, 100, 90, ms(30)), None);
        assert_eq!(p.end(1, 100, 90, ms(30)), Some(End::Switch));
        assert_eq!(Round { bytes: 2_000_000, time: ms(2) }.rate(), 1e9);
    }

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
