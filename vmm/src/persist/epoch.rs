//! The durable mode's epochs (`smudge run --journal DIR --epoch-ms N`):
//! every N ms the guest's state becomes one consistent epoch in the
//! journal (`smudge::journal`), from which a crash at any instant resumes.
//!
//! ```text
//! epoch thread                                   writer thread
//!   subscription of its own (from now)
//!   epoch 1: every page with data, copied live
//!   loop:
//!     0-4 pre-copy passes (the pass plan): collect
//!       (re-protect), copy the pages into the
//!       epoch's buffer
//!     boundary: pause vCPUs, last collect, copy
//!       the residue, vCPU + device state, resume
//!     seal -> queue ─────────────────────────────►  append every queued epoch,
//!                                                    one fdatasync (group commit),
//!                                                    committed; checkpoint epochs
//!                                                    older than --retain
//! ```
//!
//! The vCPUs pause only for the last harvest, the residue's copy into
//! memory and the state. When the disk falls behind (the queue is full at
//! a boundary) the epoch goes on instead — *lengthened*, never dropped —
//! and once it has run for [`THROTTLE_AFTER`] epochs' time the vCPUs are
//! throttled until the writer catches up. A failed write ends the run with
//! an error naming the newest committed epoch, which stays intact. A failed
//! checkpoint into the base image does not: its epochs stay in the journal,
//! the checkpoint is retried, and a journal over its bound meanwhile holds
//! the writer (`hold_while_stuck`), which throttles the guest as above.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use smudge::dirty_set::DirtySet;
use smudge::file_io::data_ranges;
use smudge::harvest::{HarvestError, Harvester, Subscription};
use smudge::journal::{CheckpointReport, EpochPages, Journal, JournalError, JournalOptions};
use smudge::machine_state::MachineState;
use smudge::memory::{file_offset_to_gpa, host_page_size, ram_layout, GuestRam};

use crate::persist::precopy::{EpochSeen, PassPlan};
use crate::vm::outcome::Outcome;
use crate::vm::tasks::{LoopPart, Task, TaskError, ThreadTask};
use crate::vm::vcpu::Shared;
use crate::vm::vcpu_control::{self, VcpuControl, VcpuControlError};

/// Sealed epochs waiting for the writer before a boundary is put off.
pub const QUEUE_MAX: usize = 2;
/// An epoch lengthened to this many epoch lengths throttles the vCPUs.
pub const THROTTLE_AFTER: u32 = 8;
/// Pause times kept for the percentiles in the stats.
const PAUSES_KEPT: usize = 8192;
/// The parts of a pause, in order, as the stats name them.
pub const PAUSE_PARTS: [&str; PARTS] = ["stop_vcpus", "harvest", "copy_residue", "state", "resume"];
const PARTS: usize = 5;

/// What `--journal` asks for.
#[derive(Debug, Clone)]
pub struct EpochOptions {
    /// The journal directory.
    pub dir: PathBuf,
    /// The epoch length (`--epoch-ms`).
    pub every: Duration,
    /// Committed epochs stay in the journal this long (`--retain`).
    pub retain: Duration,
    /// The journal's size bound (`--journal-max-bytes`).
    pub max_bytes: Option<u64>,
    /// The writer's delta cache (`--journal-cache`; None: the default).
    pub cache_bytes: Option<u64>,
    /// Go on in an existing journal after this epoch (a recovered guest).
    pub after: Option<u64>,
    /// Test hook: the writer waits this long before each batch (a slow
    /// disk).
    pub write_delay: Duration,
    /// Test hook: which parts of each epoch run.
    pub parts: EpochParts,
    /// Pre-copy passes per epoch (None: as the pass plan decides).
    pub passes: Option<u32>,
}

/// Which parts of each epoch run (`--test-epoch-parts`). Each level adds
/// one part to the level before, so the benchmark measures each part's
/// share of the guest's slowdown against logging off in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, clap::ValueEnum)]
pub enum EpochParts {
    /// Boundaries stop the vCPUs, read their state and resume them;
    /// nothing is harvested.
    Pause,
    /// Also the harvests (the mid-epoch pass's and the boundary's),
    /// which re-protect what was written; nothing is copied.
    Harvest,
    /// Also the copies into the epoch's buffer; the writer drops them.
    Copy,
    /// Also the writer's appends, never synced (nothing commits).
    Write,
    /// Everything: the durable mode.
    #[default]
    Full,
}

/// Why the epochs could not start.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// The journal could not be made or opened.
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    /// Epochs need dirty logging.
    #[error("--journal needs dirty logging (drop --no-dirty-log)")]
    NoDirtyLog,
    /// The dirty log failed.
    #[error(transparent)]
    DirtyLog(#[from] HarvestError),
    /// A thread could not start.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The memory file could not be read.
    #[error("reading the memory file's data ranges: {0}")]
    MemFile(std::io::Error),
}

/// Counters the control API shows (`ctl stats`).
#[derive(Debug, Default)]
pub struct EpochStats {
    inner: Mutex<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    sealed: u64,
    committed: u64,
    /// Boundary time of the newest committed epoch (Unix ns).
    committed_time_ns: u64,
    lengthened: u64,
    throttled: u64,
    /// Boundaries not sealed because the vCPUs ran during them.
    retried: u64,
    groups: u64,
    pages_written: u64,
    journal_bytes: u64,
    checkpointed_segments: u64,
    forced_checkpoints: u64,
    /// The newest boundaries' pauses (µs): the whole, then each part.
    pauses_us: VecDeque<[u32; PARTS + 1]>,
    /// Summed over every boundary: each part of the pause (ns).
    parts_ns: [u64; PARTS],
    /// Mid-epoch pre-copy passes, the pages they copied, their time (ns).
    precopy: [u64; 3],
    /// Pages every harvest found written since the one before: each cost
    /// the guest a write fault.
    harvested: u64,
    /// Why the base image cannot be written (None: it can).
    checkpoint_error: Option<Value>,
    /// Checkpoint tries that failed on the base image.
    checkpoint_failures: u64,
    error: Option<String>,
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl EpochStats {
    fn update(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The newest committed epoch (0: none yet).
    pub fn committed(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).committed
    }

    /// As the control API shows them.
    pub fn json(&self) -> Value {
        // Sorted off the lock: a boundary updates the counters while the
        // vCPUs are held, and must not wait for percentiles.
        let (c, pauses) = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let pauses: Vec<[u32; PARTS + 1]> = g.pauses_us.iter().copied().collect();
            let error = g.error.take();
            let c = Counters {
                pauses_us: VecDeque::new(),
                error: error.clone(),
                checkpoint_error: g.checkpoint_error.clone(),
                ..*g
            };
            g.error = error;
            (c, pauses)
        };
        let column = |i: usize| {
            let mut p: Vec<u32> = pauses.iter().map(|r| r[i]).collect();
            p.sort_unstable();
            p
        };
        let pct = |p: &[u32], q: f64| p.get(((p.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
        let p = column(0);
        let parts = |f: &dyn Fn(usize) -> Value| {
            PAUSE_PARTS.iter().enumerate().map(|(i, name)| (name.to_string(), f(i))).collect::<serde_json::Map<_, _>>()
        };
        let sealed = c.sealed.max(1) as f64;
        let age = (c.committed > 0).then(|| now_ns().saturating_sub(c.committed_time_ns) / 1_000_000);
        json!({
            "newest_committed": c.committed,
            "committed_age_ms": age,
            "sealed": c.sealed,
            "lengthened": c.lengthened,
            "throttled": c.throttled,
            "retried": c.retried,
            "group_commits": c.groups,
            "pages_written": c.pages_written,
            "journal_bytes": c.journal_bytes,
            "checkpointed_segments": c.checkpointed_segments,
            "forced_checkpoints": c.forced_checkpoints,
            "pause_us_p50": pct(&p, 0.5),
            "pause_us_p99": pct(&p, 0.99),
            "pause_us_max": p.last().copied().unwrap_or(0),
            "pause_parts_us_avg": parts(&|i| json!(c.parts_ns[i] as f64 / 1e3 / sealed)),
            "pause_parts_us_p50": parts(&|i| json!(pct(&column(i + 1), 0.5))),
            "pause_parts_us_p99": parts(&|i| json!(pct(&column(i + 1), 0.99))),
            "harvested_pages": c.harvested,
            "precopy_passes": c.precopy[0],
            "precopy_pages": c.precopy[1],
            "precopy_us_avg": c.precopy[2] as f64 / 1e3 / c.precopy[0].max(1) as f64,
            "checkpoint_error": c.checkpoint_error,
            "checkpoint_failures": c.checkpoint_failures,
            "error": c.error,
        })
    }
}

/// An epoch sealed at its boundary, for the writer.
struct Sealed {
    time_ns: u64,
    pages: EpochPages,
    state: MachineState,
}

/// Sealed epochs on their way to the writer, and buffers on their way back.
#[derive(Default)]
struct Queue {
    inner: Mutex<QueueInner>,
    cv: Condvar,
}

#[derive(Default)]
struct QueueInner {
    sealed: VecDeque<Sealed>,
    /// Taken by the writer, not yet committed.
    in_flight: usize,
    spare: Vec<EpochPages>,
    closed: bool,
    failed: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The epoch thread and the writer thread, stopped in that order: the
/// writer commits what was sealed before it ends.
pub struct EpochTask {
    epochs: ThreadTask,
    writer: Option<(ThreadTask, Arc<Queue>)>,
}

impl std::fmt::Debug for EpochTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochTask")
    }
}

impl Task for EpochTask {
    fn name(&self) -> &'static str {
        "journal epochs"
    }

    fn take_loop_part(&mut self) -> Option<LoopPart> {
        None
    }

    fn stop(&mut self) {
        self.epochs.stop();
    }

    fn join(self: Box<Self>) -> Result<(), TaskError> {
        let EpochTask { epochs, writer } = *self;
        let first = Box::new(epochs).join();
        if let Some((mut w, q)) = writer {
            q.lock().closed = true;
            q.cv.notify_all();
            w.stop();
            let second = Box::new(w).join();
            return first.and(second);
        }
        first
    }
}

/// What the epoch thread works on.
#[allow(missing_debug_implementations)]
pub struct EpochSource {
    /// The harvester (dirty logging must be on).
    pub harvester: Option<Arc<Mutex<Harvester>>>,
    /// Guest RAM.
    pub ram: GuestRam,
    /// The memory file (for the first epoch's data ranges).
    pub mem_file: std::fs::File,
    /// RAM bytes.
    pub mem_size: u64,
    /// The vCPUs.
    pub shared: Arc<Shared>,
    /// Their threads.
    pub threads: Arc<Vec<JoinHandle<()>>>,
}

/// Opens the journal and starts the epochs; the stats to show.
pub fn start(src: EpochSource, opts: &EpochOptions) -> Result<(EpochTask, Arc<EpochStats>), EpochError> {
    let h = src.harvester.clone().ok_or(EpochError::NoDirtyLog)?;
    let page = host_page_size();
    let jopts = JournalOptions {
        segment_bytes: segment_bytes(opts.max_bytes),
        max_bytes: opts.max_bytes,
        cache_bytes: opts.cache_bytes,
    };
    let vm = smudge::journal::writer::new_id();
    let journal = match opts.after {
        Some(n) => Journal::reopen(&opts.dir, n, vm, jopts)?,
        None => Journal::create(&opts.dir, src.mem_size, page, vm, jopts)?,
    };
    let stats = Arc::new(EpochStats::default());
    stats.update(|c| c.committed = journal.committed());
    let queue = Arc::new(Queue::default());
    let sub = Subscription::from_now(&h)?;
    let first = first_epoch(&sub, &src)?;
    let writer = {
        let (q, st, sh) = (queue.clone(), stats.clone(), src.shared.clone());
        let (retain, delay, parts) = (opts.retain, opts.write_delay, opts.parts);
        ThreadTask::spawn("journal writer", "journal-writer", &src.shared, move |_| {
            write_epochs(journal, &q, &st, &sh, (retain, delay, parts))
        })?
    };
    let mut ep = Epochs {
        sub,
        vcpus: VcpuControl::new(src.shared.clone(), src.threads.clone()),
        ram: src.ram,
        mem_size: src.mem_size,
        queue: queue.clone(),
        stats: stats.clone(),
        every: opts.every,
        pages: EpochPages::new(page),
        opened: Instant::now(),
        parts: opts.parts,
        plan: PassPlan::new(opts.passes),
        planned: 0,
        seen: EpochSeen::default(),
        pending: None,
        harvested: 0,
    };
    let epochs = ThreadTask::spawn("journal epochs", "journal-epochs", &src.shared, move |stop| {
        if let Err(e) = ep.pages.copy_set(&ep.ram, &first, ep.mem_size) {
            return ep.fail(format!("copying the first epoch: {e}"));
        }
        ep.run(|| stop.is_set());
    })?;
    Ok((EpochTask { epochs, writer: Some((writer, queue)) }, stats))
}

/// Segments of a sixteenth of the bound (between 1 and 64 MiB), so a
/// checkpoint frees space in steps the bound can use.
fn segment_bytes(max: Option<u64>) -> u64 {
    max.map_or(64 << 20, |m| (m / 16).clamp(1 << 20, 64 << 20))
}

/// Every page with data in the memory file: what the first epoch holds.
fn first_epoch(sub: &Subscription, src: &EpochSource) -> Result<DirtySet, EpochError> {
    let (slots, page) = {
        let h = sub.lock();
        (h.slots().to_vec(), host_page_size())
    };
    let mut set = DirtySet::new(&slots, page);
    let layout = ram_layout(src.mem_size);
    for (off, len) in data_ranges(&src.mem_file, src.mem_size).map_err(EpochError::MemFile)? {
        let mut o = off & !(page - 1);
        while o < off + len && o < src.mem_size {
            if let Some(gpa) = file_offset_to_gpa(&layout, o) {
                set.set_gpa(gpa);
            }
            o += page;
        }
    }
    Ok(set)
}

/// The epoch thread's state.
struct Epochs {
    sub: Subscription,
    vcpus: VcpuControl,
    ram: GuestRam,
    mem_size: u64,
    queue: Arc<Queue>,
    stats: Arc<EpochStats>,
    every: Duration,
    /// The open epoch's pages.
    pages: EpochPages,
    /// When it opened.
    opened: Instant,
    /// Which parts run.
    parts: EpochParts,
    /// How many passes each epoch makes.
    plan: PassPlan,
    /// The open epoch's passes.
    planned: u32,
    /// What the open epoch shows the plan so far.
    seen: EpochSeen,
    /// The last boundary's pause, until its vCPUs ran again.
    pending: Option<PendingPause>,
    /// Pages boundaries harvested, not yet in the stats (they are
    /// counted once the vCPUs run again).
    harvested: u64,
}

/// A sealed boundary's pause, its resume not yet seen.
struct PendingPause {
    parts: [Duration; PARTS],
    /// From the first kick to the hold lifted.
    held: Duration,
    /// When the hold was lifted (ns since the vCPUs' time base).
    released_ns: u64,
}

impl Epochs {
    fn run(&mut self, stop: impl Fn() -> bool) {
        let mut next = self.opened + self.every;
        self.planned = self.plan.passes(self.every);
        while !stop() {
            let now = Instant::now();
            if now < next {
                // The passes spread evenly over the epoch.
                let due = (self.seen.passes < self.planned).then(|| {
                    let start = next.checked_sub(self.every).unwrap_or(now);
                    start + self.every * (self.seen.passes + 1) / (self.planned + 1)
                });
                match due {
                    Some(d) if d <= now => {
                        self.seen.passes += 1;
                        if let Err(e) = self.precopy() {
                            return self.fail(format!("pre-copy: {e}"));
                        }
                    }
                    _ => std::thread::park_timeout(due.unwrap_or(next).min(next) - now),
                }
                continue;
            }
            if self.queue.lock().failed {
                return;
            }
            let queued = {
                let q = self.queue.lock();
                q.sealed.len() + q.in_flight
            };
            if queued >= QUEUE_MAX {
                self.lengthen();
            } else if let Err(e) = self.boundary() {
                return self.fail(e);
            }
            next = Instant::now() + self.every;
        }
    }

    /// One pass while the guest runs: collect (harvest, take, re-protect)
    /// and copy.
    fn precopy(&mut self) -> Result<u64, JournalError> {
        if self.parts < EpochParts::Harvest {
            return Ok(0);
        }
        let t0 = Instant::now();
        let set = self.sub.collect().map_err(|e| JournalError::ReadGuest { gpa: 0, msg: e.to_string() })?;
        let found = set.count();
        let n = match self.parts >= EpochParts::Copy {
            true => self.copy(&set)?,
            false => 0,
        };
        self.sub.recycle(set);
        let ns = t0.elapsed().as_nanos() as u64;
        self.stats.update(|c| {
            c.precopy[0] += 1;
            c.precopy[1] += n;
            c.precopy[2] += ns;
            c.harvested += found;
        });
        Ok(n)
    }

    /// Copies `set` into the open epoch, counting for the pass plan the
    /// pages it held already (written again since a pass copied them).
    /// Returns the pages copied.
    fn copy(&mut self, set: &DirtySet) -> Result<u64, JournalError> {
        let (held, t0) = (self.pages.len() as u64, Instant::now());
        self.pages.copy_set(&self.ram, set, self.mem_size)?;
        let found = set.count();
        self.seen.rewritten += found.saturating_sub(self.pages.len() as u64 - held);
        self.seen.copied += found;
        self.seen.copy_time += t0.elapsed();
        Ok(found)
    }

    /// The disk is behind: the epoch goes on; past [`THROTTLE_AFTER`]
    /// epoch lengths the vCPUs are throttled for one epoch length.
    fn lengthen(&mut self) {
        let throttle = self.opened.elapsed() > self.every * THROTTLE_AFTER;
        self.stats.update(|c| {
            c.lengthened += 1;
            c.throttled += u64::from(throttle);
        });
        if throttle {
            self.vcpus.shared.throttle_for(self.every);
            vcpu_control::kick_all(&self.vcpus.threads);
        }
        if let Err(e) = self.precopy() {
            tracing::warn!("journal pre-copy: {e}");
        }
    }

    /// The boundary: vCPUs paused for the last collect, the residue's
    /// copy and the state; then the epoch is sealed for the writer.
    fn boundary(&mut self) -> Result<(), String> {
        self.record_pause();
        let t0 = Instant::now();
        let time_ns = now_ns();
        let held = self.vcpus.hold_for_boundary();
        if let Err(e) = held {
            self.vcpus.release_boundary();
            return Err(format!("pausing the vCPUs: {e}"));
        }
        let mut parts = [Duration::ZERO; PARTS];
        parts[0] = t0.elapsed();
        let paused = self.while_held(&mut parts);
        let released_ns = self.vcpus.shared.epoch.elapsed().as_nanos() as u64;
        let held = t0.elapsed();
        self.vcpus.release_boundary();
        let (state, ran) = paused?;
        if ran {
            self.stats.update(|c| c.retried += 1);
            return Ok(());
        }
        let mut q = self.queue.lock();
        let next = q.spare.pop().unwrap_or_else(|| EpochPages::new(self.pages.page_size()));
        let pages = std::mem::replace(&mut self.pages, next);
        self.seen.len = t0.saturating_duration_since(self.opened);
        self.seen.distinct = pages.len() as u64;
        // The first epoch holds every page with data, not what the guest
        // writes in an epoch's time: the plan learns from the others.
        let first = self.stats.inner.lock().unwrap_or_else(|p| p.into_inner()).sealed == 0;
        q.sealed.push_back(Sealed { time_ns, pages, state });
        drop(q);
        self.queue.cv.notify_all();
        if !first {
            self.plan.seen(&self.seen);
        }
        self.seen = EpochSeen::default();
        self.planned = self.plan.passes(self.every);
        self.opened = t0;
        let harvested = std::mem::take(&mut self.harvested);
        self.stats.update(|c| {
            c.sealed += 1;
            c.harvested += harvested;
        });
        self.pending = Some(PendingPause { parts, held, released_ns });
        Ok(())
    }

    /// Records the last boundary's pause, once its vCPUs ran again (the
    /// next boundary looks): the guest runs again when its vCPUs left the
    /// hold, not when the hold was lifted — that wait (a wake-up, the
    /// host's scheduler) is the pause's last part, and this thread does
    /// not wait to see it (on two cores it would take the CPU the vCPU
    /// wakes on). A vCPU held by a pause of anyone else's adds nothing.
    fn record_pause(&mut self) {
        let Some(PendingPause { mut parts, held, released_ns }) = self.pending.take() else { return };
        let left = self.vcpus.shared.left_hold_ns.load(std::sync::atomic::Ordering::Acquire);
        if left >= released_ns {
            parts[4] = Duration::from_nanos(left - released_ns).min(self.every);
        }
        let pause = held + parts[4];
        let us = |d: Duration| d.as_micros().min(u32::MAX as u128) as u32;
        self.stats.update(|c| {
            if c.pauses_us.len() == PAUSES_KEPT {
                c.pauses_us.pop_front();
            }
            let mut row = [us(pause); PARTS + 1];
            for (i, d) in parts.iter().enumerate() {
                row[i + 1] = us(*d);
                c.parts_ns[i] += d.as_nanos() as u64;
            }
            c.pauses_us.push_back(row);
        });
    }

    /// What the boundary does with the vCPUs held: the last collect, the
    /// residue's copy, the state (timed into `parts`). The state, and
    /// whether the vCPUs ran meanwhile (then the boundary is tried again).
    fn while_held(&mut self, parts: &mut [Duration; PARTS]) -> Result<(MachineState, bool), String> {
        let mut t = Instant::now();
        let mut lap = |i: usize, parts: &mut [Duration; PARTS]| {
            parts[i] += t.elapsed();
            t = Instant::now();
        };
        self.vcpus.request_state();
        if self.parts >= EpochParts::Harvest {
            let set = self.sub.collect().map_err(|e| format!("harvest: {e}"))?;
            self.harvested += set.count();
            lap(1, parts);
            if self.parts >= EpochParts::Copy {
                self.copy(&set).map_err(|e| e.to_string())?;
            }
            self.sub.recycle(set);
            lap(2, parts);
        }
        let state = match self.vcpus.collect_state() {
            Ok(s) => s,
            // A snapshot asked for their state at the same time and
            // took it: try the boundary again.
            Err(VcpuControlError::StateTimeout(_)) => return Ok((MachineState::default(), true)),
            Err(e) => return Err(e.to_string()),
        };
        lap(3, parts);
        if self.parts < EpochParts::Harvest {
            return Ok((state, false));
        }
        // Still held, nothing can have written since the collect. Were
        // anything written, pages could be newer than the state: keep
        // them in the open epoch, unsealed, and try the boundary again.
        let late = self.sub.collect().map_err(|e| format!("harvest: {e}"))?;
        let ran = !late.is_empty();
        if ran && self.parts >= EpochParts::Copy {
            self.copy(&late).map_err(|e| e.to_string())?;
        }
        self.sub.recycle(late);
        lap(1, parts);
        Ok((state, ran))
    }

    fn fail(&self, why: String) {
        let msg = format!("{why}; the newest committed epoch is {}", self.stats.committed());
        self.stats.update(|c| c.error = Some(msg.clone()));
        self.vcpus.shared.finish(Outcome::JournalFailed(msg));
    }
}

/// The writer thread: appends what is sealed, one sync per batch (group
/// commit), then checkpoints what is older than `retain`. Ends once the
/// queue is closed and empty, or at the first error (which ends the run).
fn write_epochs(
    mut j: Journal,
    q: &Queue,
    stats: &EpochStats,
    shared: &Shared,
    (retain, delay, parts): (Duration, Duration, EpochParts),
) {
    loop {
        let batch: Vec<Sealed> = {
            let mut g = q.lock();
            while g.sealed.is_empty() && !g.closed {
                g = q.cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            if g.sealed.is_empty() {
                return;
            }
            // Counted as queued while written: the epoch thread sees the
            // disk is behind.
            g.in_flight = g.sealed.len();
            std::mem::take(&mut g.sealed).into()
        };
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let mut done = commit(&mut j, &batch, stats, retain, parts);
        if done.is_ok() {
            let mut g = q.lock();
            g.in_flight = 0;
            for mut s in batch {
                s.pages.clear();
                g.spare.push(s.pages);
            }
            drop(g);
            done = hold_while_stuck(&mut j, q, stats, retain);
        }
        match done {
            Ok(()) => {}
            Err(e) => {
                q.lock().failed = true;
                let msg = format!(
                    "writing epoch {} into {}: {}; the newest committed epoch is {}",
                    j.next_epoch(),
                    j.dir().display(),
                    crate::persist::snapshotter::with_causes(&e),
                    j.committed()
                );
                stats.update(|c| c.error = Some(msg.clone()));
                let _ =
                    std::io::Write::write_all(&mut std::io::stderr(), format!("smudge: journal: {msg}\n").as_bytes());
                shared.finish(Outcome::JournalFailed(msg));
                return;
            }
        }
    }
}

/// Appends and commits `batch`, then checkpoints.
fn commit(
    j: &mut Journal,
    batch: &[Sealed],
    stats: &EpochStats,
    retain: Duration,
    parts: EpochParts,
) -> Result<(), JournalError> {
    if parts < EpochParts::Write {
        return Ok(());
    }
    let mut pages = 0;
    for s in batch {
        j.append(s.time_ns, &s.pages, &s.state)?;
        pages += s.pages.len() as u64;
    }
    if parts < EpochParts::Full {
        stats.update(|c| c.pages_written += pages);
        return Ok(());
    }
    let n = j.sync()?;
    let t = batch.last().map_or(0, |s| s.time_ns);
    stats.update(|c| {
        c.committed = n;
        c.committed_time_ns = t;
        c.groups += 1;
        c.pages_written += pages;
        c.journal_bytes = j.bytes();
    });
    checkpoint(j, stats, retain)
}

/// Checkpoints what is older than `retain` and shows the result in the
/// stats: segments applied, the journal's size, a failing base image.
fn checkpoint(j: &mut Journal, stats: &EpochStats, retain: Duration) -> Result<(), JournalError> {
    let r = j.checkpoint(now_ns().saturating_sub(retain.as_nanos() as u64))?;
    note_base(j, &r, stats);
    if r.segments > 0 {
        stats.update(|c| {
            c.checkpointed_segments += r.segments;
            c.forced_checkpoints += r.forced;
            c.journal_bytes = j.bytes();
        });
    }
    Ok(())
}

/// While the journal is over its bound and the base image cannot be
/// written, takes no new epoch: the queue fills, boundaries lengthen the
/// open epoch and then throttle the vCPUs, as for a slow disk. Tries the
/// checkpoint again after the journal's back-off; stops holding once the
/// run ends (what is sealed is still committed).
fn hold_while_stuck(j: &mut Journal, q: &Queue, stats: &EpochStats, retain: Duration) -> Result<(), JournalError> {
    while j.is_stuck() {
        let wait = j.base_retry_in().unwrap_or_default().max(Duration::from_millis(1));
        let g = q.lock();
        if g.closed {
            return Ok(());
        }
        let (g, _) = q.cv.wait_timeout(g, wait).unwrap_or_else(|p| p.into_inner());
        if g.closed {
            return Ok(());
        }
        drop(g);
        checkpoint(j, stats, retain)?;
    }
    Ok(())
}

/// Shows a failing base image in the stats (which file, which bytes, the
/// errno), and says so on stderr once when it starts failing and once
/// when it works again.
fn note_base(j: &Journal, r: &CheckpointReport, stats: &EpochStats) {
    let say = |msg: String| {
        let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("smudge: journal: {msg}\n").as_bytes());
    };
    if r.base_recovered {
        say("checkpoints into the base image work again".into());
    }
    let failure = j.base_failure();
    if let Some(f) = failure.filter(|f| r.base_failed && f.attempts == 1) {
        say(format!(
            "checkpoint failed: {}; epochs {}..={} stay in the journal and the checkpoint is tried again",
            f.message, f.epochs.0, f.epochs.1
        ));
    }
    let shown = failure.map(|f| {
        json!({
            "path": f.path,
            "op": f.op,
            "offset": f.offset,
            "end": f.end,
            "errno": f.errno,
            "message": f.message,
            "epochs_held": [f.epochs.0, f.epochs.1],
            "attempts": f.attempts,
            "journal_full": j.is_stuck(),
        })
    });
    stats.update(|c| {
        c.checkpoint_failures += u64::from(r.base_failed);
        c.checkpoint_error = shown;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_show_the_pause_percentiles_and_the_newest_commit() {
        let s = EpochStats::default();
        assert_eq!(s.json()["committed_age_ms"], Value::Null, "no epoch committed yet");
        s.update(|c| {
            c.pauses_us.extend((1..=100).map(|p| [p, 0, 0, 0, p / 2, 1]));
            c.sealed = 100;
            c.committed = 7;
            c.committed_time_ns = now_ns();
            c.parts_ns = [100_000, 200_000, 300_000, 400_000, 500_000];
        });
        let j = s.json();
        assert_eq!((j["pause_us_p50"].as_u64(), j["pause_us_p99"].as_u64()), (Some(51), Some(99)));
        assert_eq!((j["pause_us_max"].as_u64(), j["newest_committed"].as_u64()), (Some(100), Some(7)));
        assert!(j["committed_age_ms"].as_u64().is_some_and(|ms| ms < 60_000), "{j}");
        assert_eq!(j["pause_parts_us_avg"]["state"].as_f64(), Some(4.0));
        assert_eq!(j["pause_parts_us_avg"]["resume"].as_f64(), Some(5.0));
        assert_eq!(j["pause_parts_us_p50"]["state"].as_u64(), Some(25), "{j}");
        assert_eq!(j["pause_parts_us_p99"]["state"].as_u64(), Some(49), "{j}");
        assert_eq!(j["pause_parts_us_p99"]["resume"].as_u64(), Some(1), "{j}");
    }

    #[test]
    fn segments_are_a_sixteenth_of_the_bound_within_1_to_64_mib() {
        assert_eq!(segment_bytes(None), 64 << 20);
        assert_eq!(segment_bytes(Some(32 << 20)), 2 << 20);
        assert_eq!(segment_bytes(Some(1 << 20)), 1 << 20);
        assert_eq!(segment_bytes(Some(1 << 40)), 64 << 20);
    }
}
