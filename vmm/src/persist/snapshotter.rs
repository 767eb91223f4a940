//! Taking snapshots of the running VM: pause the vCPUs, have each vCPU
//! thread hand over its own state, write memory (all of it for a full
//! snapshot; for a diff, the pages the chain's own dirty-log subscription
//! saw since the parent), commit, resume. A live full snapshot copies RAM
//! while the guest runs, in pre-copy rounds ([`run_rounds`]), and pauses
//! only for the residue. Used by the control API and by
//! `smudge run --snapshot-at-ms`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smudge::dirty_set::{DirtySet, DirtySetError};
use smudge::harvest::{HarvestError, Harvester, Subscription};
use smudge::memory::GuestRam;
use smudge::snapshot::{self, MachineState, Manifest};

use crate::persist::precopy::{file_extents, run_rounds, Budget, Look, Round, RoundHooks, Staging, StagingError};
use crate::vm::vcpu_control::VcpuControl;

/// Why a snapshot failed; the chain stays as it was.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    /// Pausing the vCPUs or collecting their state failed.
    #[error("{0}")]
    Vcpus(String),
    /// Writing, syncing or committing the files failed (with every cause).
    #[error("{0}")]
    Files(String),
    /// The dirty log failed.
    #[error(transparent)]
    DirtyLog(#[from] HarvestError),
    /// A set of pages did not have the VM's slot shape.
    #[error(transparent)]
    Shape(#[from] DirtySetError),
    /// A pre-copy pass failed (its pages are kept for the next).
    #[error("pre-copy: {0}")]
    Precopy(#[from] StagingError),
    /// The request does not fit this run (its dirty logging or its chain).
    #[error("{0}")]
    Refused(String),
    /// A live snapshot given up because smudge is stopping.
    #[error("{0}")]
    Abandoned(String),
}

impl TakeError {
    fn files(e: &dyn std::error::Error) -> TakeError {
        TakeError::Files(with_causes(e))
    }

    fn vcpus(e: impl std::fmt::Display) -> TakeError {
        TakeError::Vcpus(e.to_string())
    }

    fn refused(why: impl Into<String>) -> TakeError {
        TakeError::Refused(why.into())
    }
}

/// What a snapshot produced.
#[derive(Debug, Clone)]
pub struct Taken {
    /// Its manifest.
    pub manifest: Manifest,
    /// Where it was written.
    pub dir: PathBuf,
    /// Memory bytes written.
    pub memory_bytes: u64,
    /// How long the vCPUs were paused for it.
    pub pause: Duration,
    /// Memory bytes copied while the vCPUs were paused (a pre-copied diff:
    /// the residue only).
    pub pause_copied_bytes: u64,
    /// Bytes read to checksum the files (what they hold, holes skipped).
    pub checksum_read_bytes: u64,
}

impl Taken {
    /// What a committed snapshot in `dir` reports, with its pause.
    fn new(c: snapshot::Committed, dir: &Path, pause: Duration, pause_copied_bytes: u64) -> Taken {
        Taken {
            manifest: c.manifest,
            dir: dir.to_path_buf(),
            memory_bytes: c.memory_bytes,
            pause,
            pause_copied_bytes,
            checksum_read_bytes: c.checksum_read_bytes,
        }
    }
}

/// The last snapshot of this run and the subscription collecting pages
/// since.
#[derive(Debug)]
struct Chain {
    sub: Subscription,
    /// Set once that snapshot is committed.
    last: Option<(Manifest, PathBuf)>,
}

/// Snapshots of one VM.
#[derive(Debug)]
pub struct Snapshotter {
    vcpus: VcpuControl,
    file: File,
    mem_size: u64,
    harvester: Option<Arc<Mutex<Harvester>>>,
    /// Guest RAM, for pre-copy (None: no pre-copy).
    ram: Option<GuestRam>,
    chain: Option<Chain>,
    /// Pages the next diff must hold that no staging image has: a failed
    /// diff's, or a failed pre-copy pass's.
    pending: Option<DirtySet>,
    /// The next diff's pages copied so far while the guest ran.
    staging: Option<Staging>,
}

/// What the paused part of a snapshot leaves for after the resume.
enum Paused {
    /// The files are written; sync and commit remain. A diff's pages (kept
    /// for the next diff if the commit fails), or a full snapshot's new
    /// subscription (it heads the chain once the commit succeeds).
    Written(snapshot::Pending, Written),
    /// A diff whose pages all sit in a frozen staging image: pack it. With
    /// the residue bytes copied in the pause.
    Staged(Staging, MachineState, u64),
}

/// What a snapshot written in the pause carries to its commit.
enum Written {
    /// A diff, with its pages.
    Diff(DirtySet),
    /// A full snapshot, with the subscription collecting pages since it
    /// (None: no dirty logging).
    Full(Option<Subscription>),
}

impl Snapshotter {
    /// A snapshotter for the VM whose RAM is `file` (`mem_size` bytes).
    pub fn new(vcpus: VcpuControl, file: File, mem_size: u64, harvester: Option<Arc<Mutex<Harvester>>>) -> Self {
        Snapshotter { vcpus, file, mem_size, harvester, ram: None, chain: None, pending: None, staging: None }
    }

    /// Enables pre-copy of diff pages from `ram` (see [`Self::precopy_pass`]).
    pub fn with_precopy(mut self, ram: GuestRam) -> Self {
        self.ram = Some(ram);
        self
    }

    /// One pre-copy pass, while the guest runs: collect (harvest, take and
    /// re-protect) the pages the chain's subscription saw since the last
    /// pass and copy them into the next diff's staging image. Returns the
    /// bytes copied (0 when there is no committed chain to build on). A
    /// failed pass keeps its pages for the next pass or the pause.
    pub fn precopy_pass(&mut self) -> Result<u64, TakeError> {
        let (Some(ram), Some(chain)) = (&self.ram, &self.chain) else {
            return Ok(0);
        };
        let Some((_, last_dir)) = &chain.last else {
            return Ok(0);
        };
        let mut set = chain.sub.collect()?;
        if let Some(p) = self.pending.take() {
            set.union_with(&p)?;
        }
        if set.is_empty() {
            return Ok(0);
        }
        let staging = match self.staging.take() {
            Some(s) => Ok(s),
            None => {
                let mut empty = set.clone();
                empty.clear();
                Staging::create(&Staging::path_after(last_dir), self.mem_size, empty)
            }
        };
        let copied = staging.map_err(StagingError::from).and_then(|mut staging| {
            let r = staging.copy_in(ram, &set);
            self.staging = Some(staging);
            r
        });
        copied.map_err(|e| {
            self.pending = Some(set);
            TakeError::from(e)
        })
    }

    /// Takes a snapshot into `dir`: full, or a diff on `parent` (which must
    /// be the last snapshot this run took). Only copying happens with the
    /// vCPUs paused — for a diff after pre-copy, only the residue; they
    /// resume (if `resume` and they were running) before the files are
    /// packed, synced, checksummed and the manifest committed.
    ///
    /// A snapshot that fails, at any step, leaves the chain as it was (a
    /// diff's pages are kept for the next diff) and no files behind.
    pub fn take(&mut self, dir: &Path, parent: Option<&Path>, resume: bool) -> Result<Taken, TakeError> {
        snapshot::check_dir(dir).map_err(|e| TakeError::files(&e))?;
        let t0 = Instant::now();
        let was_paused = self.vcpus.shared.is_paused();
        self.vcpus.pause().map_err(TakeError::vcpus)?;
        let r = self.take_paused(dir, parent);
        let pause = t0.elapsed();
        if resume && !was_paused {
            self.vcpus.resume();
        }
        let (pending, written, in_pause) = match r? {
            Paused::Written(p, written) => {
                let n = p.bytes();
                (Ok(p), written, n)
            }
            Paused::Staged(frozen, state, residue) => {
                let (last, last_dir) = self
                    .chain
                    .as_ref()
                    .and_then(|c| c.last.as_ref())
                    .ok_or_else(|| TakeError::refused("the chain ended while the snapshot was taken"))?;
                let extents = frozen.file_extents(self.mem_size);
                let p = snapshot::begin_diff(dir, last, last_dir, frozen.file(), &extents, &state);
                (p, Written::Diff(frozen.staged().clone()), residue)
            }
        };
        tracing::debug!(
            "snapshot {}: paused {pause:?}, written {:?} after the pause",
            dir.display(),
            t0.elapsed() - pause
        );
        match pending.and_then(snapshot::Pending::commit_counted) {
            Ok(c) => {
                let last = Some((c.manifest.clone(), dir.to_path_buf()));
                match written {
                    Written::Diff(_) => {
                        if let Some(chain) = self.chain.as_mut() {
                            chain.last = last;
                        }
                    }
                    // The new full snapshot heads the chain from now on.
                    Written::Full(sub) => self.start_chain(sub, last),
                }
                Ok(Taken::new(c, dir, pause, in_pause))
            }
            Err(e) => {
                // A failed diff keeps its pages for the next one; a failed
                // full snapshot's subscription goes (dropped), leaving the
                // old chain as it was.
                if let Written::Diff(set) = written {
                    self.keep_pending(set);
                }
                Err(TakeError::files(&e))
            }
        }
    }

    /// Takes a full snapshot into `dir` while the guest runs: all RAM is
    /// copied, then the pages written meanwhile, round after round, by a
    /// dirty-log subscription of its own, until what is left is estimated
    /// to copy within `residue` (or `MAX_LIVE_ROUNDS` passed); only that
    /// last residue is copied with the vCPUs paused. The snapshot then
    /// heads this run's chain, its subscription collecting for the next
    /// diff.
    pub fn take_live(
        &mut self,
        dir: &Path,
        residue: Duration,
        resume: bool,
        progress: &dyn Fn(&LiveProgress),
    ) -> Result<Taken, TakeError> {
        let h = self.harvester.clone().ok_or_else(|| TakeError::refused("live snapshots need dirty logging"))?;
        snapshot::check_dir(dir).map_err(|e| TakeError::files(&e))?;
        // What was dirty before now is in the first copy, made after this.
        let sub = Subscription::from_now(&h)?;
        let t0 = Instant::now();
        let mut live = snapshot::begin_live_full(dir, &self.file, self.mem_size).map_err(|e| TakeError::files(&e))?;
        crate::control::signals::test_hold(crate::control::signals::Hold::LiveSnapshot);
        let first = Round { bytes: live.bytes(), time: t0.elapsed() };
        let budget = Budget {
            pause: residue,
            max_rounds: MAX_LIVE_ROUNDS,
            shrink: (1, 2),
            worth_a_round: Duration::ZERO,
            switch_after: None,
        };
        let mut hooks = LiveRounds { live: &mut live, file: &self.file, mem_size: self.mem_size, progress };
        let set = match run_rounds(&sub, &budget, first, &mut hooks) {
            Ok(r) => r.set,
            Err(TakeError::Abandoned(sig)) => {
                drop(live);
                return Err(abandon_live(dir, &sig));
            }
            Err(e) => return Err(e),
        };
        let was_paused = self.vcpus.shared.is_paused();
        let tp = Instant::now();
        self.vcpus.pause().map_err(TakeError::vcpus)?;
        let paused = (|| {
            self.vcpus.request_state();
            let mut set = set;
            set.union_with(&sub.collect()?)?;
            let n =
                live.copy_extents(&self.file, &file_extents(&set, self.mem_size)).map_err(|e| TakeError::files(&e))?;
            Ok::<_, TakeError>((self.vcpus.collect_state().map_err(TakeError::vcpus)?, n))
        })();
        let pause = tp.elapsed();
        if resume && !was_paused {
            self.vcpus.resume();
        }
        let (state, in_pause) = paused?;
        let c = live.finish(&state).and_then(snapshot::Pending::commit_counted).map_err(|e| TakeError::files(&e))?;
        // Pages written since the pause are the next diff's: this
        // snapshot's subscription carries on as the chain's.
        self.start_chain(Some(sub), Some((c.manifest.clone(), dir.to_path_buf())));
        Ok(Taken::new(c, dir, pause, in_pause))
    }

    /// A committed full snapshot (`last`) heads a new chain, `sub`
    /// collecting for its next diff: the old chain's subscription, pages
    /// and staging image go. Without dirty logging there is no chain.
    fn start_chain(&mut self, sub: Option<Subscription>, last: Option<(Manifest, PathBuf)>) {
        self.chain = sub.map(|sub| Chain { sub, last });
        self.pending = None;
        self.staging = None;
    }

    fn keep_pending(&mut self, set: DirtySet) {
        match self.pending.as_mut() {
            Some(p) => {
                if let Err(e) = p.union_with(&set) {
                    tracing::error!("snapshot: cannot keep the pages of a failed diff: {e}");
                }
            }
            None => self.pending = Some(set),
        }
    }

    fn take_paused(&mut self, dir: &Path, parent: Option<&Path>) -> Result<Paused, TakeError> {
        let state = self.vcpus.machine_state().map_err(TakeError::vcpus)?;
        let Some(p) = parent else {
            let pending =
                snapshot::begin_full(dir, &self.file, self.mem_size, &state).map_err(|e| TakeError::files(&e))?;
            // The chain's subscription stays until this snapshot commits: a
            // failure at any step leaves the chain as it was. Pages dirtied
            // from here on are the next diff's; with manual protect, stale
            // log bits are re-protected first (every consumer harvested).
            let sub = self.harvester.as_ref().map(Subscription::from_now).transpose()?;
            return Ok(Paused::Written(pending, Written::Full(sub)));
        };
        let chain = self.chain.as_ref().ok_or_else(|| {
            TakeError::refused("no earlier snapshot in this run to diff against (take a full one first)")
        })?;
        let (last, last_dir) =
            chain.last.as_ref().ok_or_else(|| TakeError::refused("the last snapshot of this run was not committed"))?;
        let same = |a: &Path, b: &Path| std::path::absolute(a).ok() == std::path::absolute(b).ok();
        if !same(p, last_dir) {
            return Err(TakeError::Refused(format!(
                "a diff must build on the last snapshot of this run ({}), not {}",
                last_dir.display(),
                p.display()
            )));
        }
        if self.harvester.is_none() {
            return Err(TakeError::refused("diff snapshots need dirty logging"));
        }
        let mut set = {
            let mut h = chain.sub.lock();
            h.reprotect_all()?;
            h.take(&chain.sub)?
        };
        if let Some(p) = self.pending.take() {
            set.union_with(&p)?;
        }
        // Pre-copied: only the residue is copied now, into the staging
        // image, which is packed after the resume.
        if let (Some(mut frozen), Some(ram)) = (self.staging.take(), &self.ram) {
            match frozen.copy_in(ram, &set) {
                Ok(n) => return Ok(Paused::Staged(frozen, state, n)),
                Err(e) => {
                    // RAM is still the point in time: copy every page of
                    // the diff from it instead.
                    tracing::warn!("snapshot: staging the residue failed ({e}); copying the diff from RAM");
                    set.union_with(frozen.staged())?;
                }
            }
        }
        let extents = file_extents(&set, self.mem_size);
        match snapshot::begin_diff(dir, last, last_dir, &self.file, &extents, &state) {
            Ok(p) => Ok(Paused::Written(p, Written::Diff(set))),
            Err(e) => {
                // Keep the pages for the next diff: nothing is lost.
                self.pending = Some(set);
                Err(TakeError::files(&e))
            }
        }
    }
}

/// Rounds of a live snapshot after the first copy, before the pause is
/// forced.
pub const MAX_LIVE_ROUNDS: u32 = 10;

/// A live snapshot's progress (the control API's `stats` shows it).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveProgress {
    /// Copy rounds done after the first.
    pub round: u32,
    /// Pages written since the last copy.
    pub remaining_pages: u64,
    /// Copy rate of the last round.
    pub rate_mbps: f64,
    /// Bytes copied so far.
    pub bytes: u64,
}

/// A live snapshot's rounds: copies into its memory file while the guest
/// runs.
struct LiveRounds<'a> {
    live: &'a mut snapshot::LiveFull,
    file: &'a File,
    mem_size: u64,
    progress: &'a dyn Fn(&LiveProgress),
}

impl RoundHooks for LiveRounds<'_> {
    type Error = TakeError;

    /// A stop signal abandons it between rounds (the guest runs).
    fn check(&mut self) -> Result<(), TakeError> {
        match crate::control::signals::requested_name() {
            Some(sig) => Err(TakeError::Abandoned(sig)),
            None => Ok(()),
        }
    }

    fn looked(&mut self, look: &Look) {
        let bytes = self.live.bytes();
        (self.progress)(&LiveProgress {
            round: look.round,
            remaining_pages: look.pages,
            rate_mbps: look.rate / 1e6,
            bytes,
        });
        tracing::info!(
            "live snapshot round {}: {} MiB copied at {:.0} MB/s; {} pages dirty now, estimated pause {:.1} ms",
            look.round,
            look.last.bytes >> 20,
            look.rate / 1e6,
            look.pages,
            look.estimate.as_secs_f64() * 1e3
        );
    }

    fn copy(&mut self, _round: u32, set: &DirtySet) -> Result<Round, TakeError> {
        let t = Instant::now();
        let bytes =
            self.live.copy_extents(self.file, &file_extents(set, self.mem_size)).map_err(|e| TakeError::files(&e))?;
        Ok(Round { bytes, time: t.elapsed() })
    }
}

/// A live snapshot abandoned because smudge is stopping on `sig`: its
/// directory holds a partial `memory.img` and no manifest (no snapshot);
/// dropping its writer already removed what it wrote (and the directory,
/// if the snapshot made it). Says so on stderr, and as the error.
fn abandon_live(dir: &Path, sig: &str) -> TakeError {
    let gone = if dir.exists() { "left as it was before the snapshot" } else { "removed" };
    let msg =
        format!("live snapshot into {} abandoned: smudge is stopping on {sig}; its directory is {gone}", dir.display());
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("smudge: {msg}\n").as_bytes());
    TakeError::Abandoned(msg)
}

/// An error and every cause under it, on one line ("…: No space left on
/// device"): the OS error is what a user acts on.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_s = c.to_string();
        if !s.contains(&c_s) {
            s.push_str(": ");
            s.push_str(&c_s);
        }
        cause = c.source();
    }
    s
}
