//! Taking snapshots of the running VM: pause the vCPUs, have each vCPU
//! thread hand over its own state, write memory (all of it for a full
//! snapshot; for a diff, the pages the chain's own dirty-log consumer saw
//! since the parent), commit, resume. Used by the control API and by
//! `smudge run --snapshot-at-ms`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smudge::dirty_set::DirtySet;
use smudge::harvest::{ConsumerId, Harvester};
use smudge::memory::GuestRam;
use smudge::migration::frame::PAGE;
use smudge::snapshot::{self, MachineState, Manifest};

use crate::persist::precopy::{file_extents, Staging};
use crate::vm::vcpu_control::VcpuControl;

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

/// The last snapshot of this run and the consumer collecting pages since.
#[derive(Debug)]
struct Chain {
    consumer: ConsumerId,
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
    /// dirty-log consumer (it heads the chain once the commit succeeds).
    Written(snapshot::Pending, Written),
    /// A diff whose pages all sit in a frozen staging image: pack it. With
    /// the residue bytes copied in the pause.
    Staged(Staging, MachineState, u64),
}

/// What a snapshot written in the pause carries to its commit.
enum Written {
    /// A diff, with its pages.
    Diff(DirtySet),
    /// A full snapshot, with the consumer collecting pages since it (None:
    /// no dirty logging).
    Full(Option<ConsumerId>),
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
    /// re-protect) the pages the chain's consumer saw since the last pass
    /// and copy them into the next diff's staging image. Returns the bytes
    /// copied (0 when there is no committed chain to build on). A failed
    /// pass keeps its pages for the next pass or the pause.
    pub fn precopy_pass(&mut self) -> Result<u64, String> {
        let (Some(ram), Some(h), Some(chain)) = (&self.ram, &self.harvester, &self.chain) else {
            return Ok(0);
        };
        let Some((_, last_dir)) = &chain.last else {
            return Ok(0);
        };
        let mut set = {
            let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
            h.collect(chain.consumer).map_err(|e| e.to_string())?
        };
        if let Some(p) = self.pending.take() {
            set.union_with(&p).map_err(|e| e.to_string())?;
        }
        if set.is_empty() {
            return Ok(0);
        }
        if self.staging.is_none() {
            let mut empty = set.clone();
            empty.clear();
            match Staging::create(&Staging::path_after(last_dir), self.mem_size, empty) {
                Ok(s) => self.staging = Some(s),
                Err(e) => {
                    self.pending = Some(set);
                    return Err(format!("pre-copy: {e}"));
                }
            }
        }
        let staging = self.staging.as_mut().ok_or("pre-copy: no staging image")?;
        match staging.copy_in(ram, &set) {
            Ok(n) => Ok(n),
            Err(e) => {
                self.pending = Some(set);
                Err(format!("pre-copy: {e}"))
            }
        }
    }

    /// Takes a snapshot into `dir`: full, or a diff on `parent` (which must
    /// be the last snapshot this run took). Only copying happens with the
    /// vCPUs paused — for a diff after pre-copy, only the residue; they
    /// resume (if `resume` and they were running) before the files are
    /// packed, synced, checksummed and the manifest committed.
    ///
    /// A snapshot that fails, at any step, leaves the chain as it was (a
    /// diff's pages are kept for the next diff) and no files behind.
    pub fn take(&mut self, dir: &Path, parent: Option<&Path>, resume: bool) -> Result<Taken, String> {
        snapshot::check_dir(dir).map_err(|e| with_causes(&e))?;
        let t0 = Instant::now();
        let was_paused = self.vcpus.shared.is_paused();
        self.vcpus.pause()?;
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
                    .ok_or("the chain ended while the snapshot was taken")?;
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
                    Written::Full(consumer) => self.start_chain(consumer, last),
                }
                Ok(Taken::new(c, dir, pause, in_pause))
            }
            Err(e) => {
                match written {
                    // A failed diff keeps its pages for the next one.
                    Written::Diff(set) => self.keep_pending(set),
                    // A failed full snapshot leaves the old chain as it was.
                    Written::Full(consumer) => self.drop_consumer(consumer),
                }
                Err(with_causes(&e))
            }
        }
    }

    /// Takes a full snapshot into `dir` while the guest runs: all RAM is
    /// copied, then the pages written meanwhile, round after round, by a
    /// dirty-log consumer of its own, until what is left is estimated to
    /// copy within `residue` (or `MAX_LIVE_ROUNDS` passed); only that last
    /// residue is copied with the vCPUs paused. The snapshot then heads
    /// this run's chain, its consumer collecting for the next diff.
    pub fn take_live(
        &mut self,
        dir: &Path,
        residue: Duration,
        resume: bool,
        progress: &dyn Fn(&LiveProgress),
    ) -> Result<Taken, String> {
        let h = self.harvester.clone().ok_or("live snapshots need dirty logging")?;
        snapshot::check_dir(dir).map_err(|e| with_causes(&e))?;
        let collect = |c| h.lock().unwrap_or_else(|p| p.into_inner()).collect(c).map_err(|e| e.to_string());
        let consumer = {
            let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
            let c = h.add_consumer();
            h.reprotect_all().map_err(|e| e.to_string())?;
            // What was dirty before now is in the first copy, made after this.
            if let Some(before) = h.take(c) {
                h.recycle(before);
            }
            c
        };
        let mut guard = LiveConsumer { harvester: &h, consumer: Some(consumer) };
        let t0 = Instant::now();
        let mut live = snapshot::begin_live_full(dir, &self.file, self.mem_size).map_err(|e| with_causes(&e))?;
        crate::control::signals::test_hold(crate::control::signals::Hold::LiveSnapshot);
        let mut last = (live.bytes(), t0.elapsed());
        let mut round = 0;
        let set = loop {
            // A stop signal abandons it between rounds (the guest runs).
            if let Some(sig) = crate::control::signals::requested_name() {
                drop(live);
                return Err(abandon_live(dir, &sig));
            }
            let set = collect(consumer)?;
            let dirty = set.count() * PAGE;
            let rate = last.0 as f64 / last.1.as_secs_f64().max(1e-6);
            let estimate = Duration::from_secs_f64(dirty as f64 / rate.max(1.0));
            progress(&LiveProgress { round, remaining_pages: set.count(), rate_mbps: rate / 1e6, bytes: live.bytes() });
            tracing::info!(
                "live snapshot round {round}: {} MiB copied at {:.0} MB/s; {} pages dirty now, estimated pause {:.1} ms",
                last.0 >> 20,
                rate / 1e6,
                set.count(),
                estimate.as_secs_f64() * 1e3
            );
            // Another round only while it shrinks the residue.
            let shrinking = dirty.saturating_mul(2) < last.0;
            if (estimate <= residue && !shrinking) || estimate.is_zero() || round >= MAX_LIVE_ROUNDS {
                break set;
            }
            let t = Instant::now();
            let n = live.copy_extents(&self.file, &file_extents(&set, self.mem_size)).map_err(|e| with_causes(&e))?;
            h.lock().unwrap_or_else(|p| p.into_inner()).recycle(set);
            last = (n, t.elapsed());
            round += 1;
        };
        let was_paused = self.vcpus.shared.is_paused();
        let tp = Instant::now();
        self.vcpus.pause()?;
        let paused = (|| {
            self.vcpus.request_state();
            let mut set = set;
            set.union_with(&collect(consumer)?).map_err(|e| e.to_string())?;
            let n = live.copy_extents(&self.file, &file_extents(&set, self.mem_size)).map_err(|e| with_causes(&e))?;
            Ok::<_, String>((self.vcpus.collect_state()?, n))
        })();
        let pause = tp.elapsed();
        if resume && !was_paused {
            self.vcpus.resume();
        }
        let (state, in_pause) = paused?;
        let c = live.finish(&state).and_then(snapshot::Pending::commit_counted).map_err(|e| with_causes(&e))?;
        // Pages written since the pause are the next diff's: this
        // snapshot's consumer carries on as the chain's.
        guard.consumer = None;
        self.start_chain(Some(consumer), Some((c.manifest.clone(), dir.to_path_buf())));
        Ok(Taken::new(c, dir, pause, in_pause))
    }

    /// A committed full snapshot (`last`) heads a new chain, `consumer`
    /// collecting for its next diff: the old chain's consumer, pages and
    /// staging image go. Without dirty logging there is no chain.
    fn start_chain(&mut self, consumer: Option<ConsumerId>, last: Option<(Manifest, PathBuf)>) {
        let old = self.chain.take();
        if let (Some(old), Some(h)) = (old, &self.harvester) {
            h.lock().unwrap_or_else(|p| p.into_inner()).remove_consumer(old.consumer);
        }
        self.chain = consumer.map(|consumer| Chain { consumer, last });
        self.pending = None;
        self.staging = None;
    }

    /// Drops a failed full snapshot's consumer.
    fn drop_consumer(&mut self, consumer: Option<ConsumerId>) {
        if let (Some(c), Some(h)) = (consumer, &self.harvester) {
            h.lock().unwrap_or_else(|p| p.into_inner()).remove_consumer(c);
        }
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

    fn take_paused(&mut self, dir: &Path, parent: Option<&Path>) -> Result<Paused, String> {
        let state = self.vcpus.machine_state()?;
        match parent {
            None => {
                let pending =
                    snapshot::begin_full(dir, &self.file, self.mem_size, &state).map_err(|e| with_causes(&e))?;
                // The chain's consumer stays until this snapshot commits: a
                // failure at any step leaves the chain as it was.
                let consumer = match &self.harvester {
                    Some(h) => {
                        let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
                        // Pages dirtied from here on are the next diff's;
                        // with manual protect, stale log bits are
                        // re-protected first (every consumer harvested).
                        h.reprotect_all().map_err(|e| e.to_string())?;
                        Some(h.add_consumer())
                    }
                    None => None,
                };
                Ok(Paused::Written(pending, Written::Full(consumer)))
            }
            Some(p) => {
                let chain = self
                    .chain
                    .as_ref()
                    .ok_or("no earlier snapshot in this run to diff against (take a full one first)")?;
                let (last, last_dir) = chain.last.as_ref().ok_or("the last snapshot of this run was not committed")?;
                let same = |a: &Path, b: &Path| std::path::absolute(a).ok() == std::path::absolute(b).ok();
                if !same(p, last_dir) {
                    return Err(format!(
                        "a diff must build on the last snapshot of this run ({}), not {}",
                        last_dir.display(),
                        p.display()
                    ));
                }
                let h = self.harvester.as_ref().ok_or("diff snapshots need dirty logging")?;
                let mut set = {
                    let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
                    h.reprotect_all().map_err(|e| e.to_string())?;
                    h.take(chain.consumer).ok_or("the chain's dirty-log consumer is gone")?
                };
                if let Some(p) = self.pending.take() {
                    set.union_with(&p).map_err(|e| e.to_string())?;
                }
                // Pre-copied: only the residue is copied now, into the
                // staging image, which is packed after the resume.
                if let (Some(mut frozen), Some(ram)) = (self.staging.take(), &self.ram) {
                    match frozen.copy_in(ram, &set) {
                        Ok(n) => return Ok(Paused::Staged(frozen, state, n)),
                        Err(e) => {
                            // RAM is still the point in time: copy every
                            // page of the diff from it instead.
                            tracing::warn!("snapshot: staging the residue failed ({e}); copying the diff from RAM");
                            set.union_with(frozen.staged()).map_err(|e| e.to_string())?;
                        }
                    }
                }
                let extents = file_extents(&set, self.mem_size);
                match snapshot::begin_diff(dir, last, last_dir, &self.file, &extents, &state) {
                    Ok(p) => Ok(Paused::Written(p, Written::Diff(set))),
                    Err(e) => {
                        // Keep the pages for the next diff: nothing is lost.
                        self.pending = Some(set);
                        Err(with_causes(&e))
                    }
                }
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

/// A live snapshot abandoned because smudge is stopping: its directory
/// holds a partial `memory.img` and no manifest (no snapshot); both go.
/// Says a live snapshot was given up; dropping its writer already removed
/// what it wrote (and the directory, if the snapshot made it).
fn abandon_live(dir: &Path, sig: &str) -> String {
    let gone = if dir.exists() { "left as it was before the snapshot" } else { "removed" };
    let msg =
        format!("live snapshot into {} abandoned: smudge is stopping on {sig}; its directory is {gone}", dir.display());
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("smudge: {msg}\n").as_bytes());
    msg
}

/// Removes a failed live snapshot's dirty-log consumer.
struct LiveConsumer<'a> {
    harvester: &'a Mutex<Harvester>,
    consumer: Option<ConsumerId>,
}

impl Drop for LiveConsumer<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.consumer.take() {
            self.harvester.lock().unwrap_or_else(|p| p.into_inner()).remove_consumer(c);
        }
    }
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
