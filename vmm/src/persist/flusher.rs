//! The flusher thread: drives the writeback engine — expiry and background
//! passes every `dirty_writeback` period, optional periodic syncs, and
//! `balance_dirty_pages`-style throttling of the vCPUs while dirty memory is
//! above the hard limit. A thread of its own (the kernel's flusher is one
//! too), so waiting on disk never stalls the event loop. One of a running
//! VM's tasks (see `crate::vm::tasks`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smudge::writeback::{Writeback, WritebackError, WritebackPolicy, WritebackStats};

use crate::vm::vcpu::Shared;

/// Writeback settings of a run.
#[derive(Debug, Clone)]
pub struct WritebackOptions {
    /// The policy.
    pub policy: WritebackPolicy,
    /// Run a WB_SYNC_ALL + fdatasync this often (None: only at the end).
    pub sync_every: Option<Duration>,
    /// Write pages into this image file instead of persisting the backing
    /// file itself.
    pub image: Option<std::path::PathBuf>,
    /// The image is being built in the background: no page goes into it
    /// before this says the build is over.
    pub image_ready: Option<smudge::sink::ImageReady>,
    /// Leave hot pages writable at their expiry write-outs where that is
    /// sound (the engine's default; false only to compare).
    pub hot_pages: bool,
}

/// Longest a single throttle may hold the vCPUs (the flusher releases them
/// as soon as dirty memory is back under the limit).
pub const MAX_THROTTLE: Duration = Duration::from_secs(1);

/// The flusher state.
#[derive(Debug)]
pub struct Flusher {
    engine: Writeback,
    opts: WritebackOptions,
    last_flush: Instant,
    last_sync: Instant,
    /// Sync errors seen by periodic syncs (reported, never fatal: the pages
    /// stay dirty).
    pub sync_errors: u64,
    /// Slices the vCPUs were throttled for.
    pub throttle_slices: u64,
    /// Largest dirty page count seen after a flush.
    pub max_dirty: u64,
    /// Longest time between two flush passes (the period, plus however
    /// late a busy host ran the flusher thread): how long past its expiry
    /// a page can wait for the pass that writes it.
    pub max_flush_gap: Duration,
}

impl Flusher {
    /// A flusher over `engine`.
    pub fn new(engine: Writeback, opts: WritebackOptions) -> Self {
        let now = Instant::now();
        Flusher {
            engine,
            opts,
            last_flush: now,
            last_sync: now,
            sync_errors: 0,
            throttle_slices: 0,
            max_dirty: 0,
            max_flush_gap: Duration::ZERO,
        }
    }

    /// The engine's counters.
    pub fn stats(&self) -> WritebackStats {
        self.engine.stats()
    }

    /// One event-loop tick. Returns whether the vCPUs must be throttled.
    pub fn tick(&mut self, shared: &Shared, kick: &dyn Fn()) -> Result<bool, WritebackError> {
        let now = Instant::now();
        let since = now.duration_since(self.last_flush);
        if since >= self.opts.policy.writeback_interval {
            self.max_flush_gap = self.max_flush_gap.max(since);
            self.last_flush = now;
            let r = self.engine.flush(&self.opts.policy)?;
            self.max_dirty = self.max_dirty.max(r.nr_dirty);
        }
        if let Some(every) = self.opts.sync_every {
            if now.duration_since(self.last_sync) >= every {
                self.last_sync = now;
                if let Err(e) = self.engine.sync() {
                    self.sync_errors += 1;
                    match e {
                        WritebackError::WriteOut { .. } => tracing::warn!("sync: {e}"),
                        other => return Err(other),
                    }
                }
            }
        }
        let throttle = self.engine.over_limit(&self.opts.policy);
        if throttle {
            // balance_dirty_pages: hold the vCPUs (kicked out of KVM_RUN now)
            // while the oldest pages are written down below the limit, then
            // let them go.
            self.throttle_slices += 1;
            shared.throttle_for(MAX_THROTTLE);
            kick();
            let r = self.engine.balance(&self.opts.policy);
            shared.release_throttle();
            r?;
        }
        Ok(throttle)
    }

    /// A sync on request (the control API): WB_SYNC_ALL + fdatasync.
    pub fn sync_now(&mut self) -> Result<u64, WritebackError> {
        self.engine.sync()
    }

    /// Runs on its own thread until `stopped` says so, waking every tick;
    /// `kick` pushes the vCPUs out of KVM_RUN when they must be throttled.
    /// The flusher is shared so the control API can sync and read stats.
    pub fn run(
        this: Arc<Mutex<Flusher>>,
        shared: Arc<Shared>,
        tick: Duration,
        stopped: impl Fn() -> bool,
        kick: impl Fn(),
    ) {
        while !stopped() {
            std::thread::park_timeout(tick);
            if stopped() {
                break;
            }
            let mut f = this.lock().unwrap_or_else(|p| p.into_inner());
            let r = f.tick(&shared, &kick);
            drop(f);
            match r {
                Ok(_) => {}
                Err(e) => {
                    shared.finish(crate::vm::outcome::Outcome::KvmFailure(format!("writeback: {e}")));
                    break;
                }
            }
        }
    }

    /// The final WB_SYNC_ALL + fdatasync, once the vCPUs have stopped.
    pub fn finish(mut self, shared: &Shared) -> (WritebackStats, Result<u64, WritebackError>, u64) {
        let r = self.engine.sync();
        (self.engine.stats(), r, shared.throttled_ns.load(Ordering::Relaxed))
    }
}
