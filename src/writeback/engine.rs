//! The writeback engine proper: absorb harvested pages into the page
//! states, and write pages out in passes shaped like the kernel's
//! `write_cache_pages`, driven by a `writeback_control`.
//!
//! ```text
//! absorb:      log.fetch()               -> mark_dirty (first-dirtied time kept)
//! write_pages: select (range, expiry, nr_to_write, oldest first)
//!              hot pages H of an expiry pass (see `hot`) stay writable
//!              log.clear_dirty_for_io(S-H) re-protect first ...
//!              start_writeback(S)
//!              sink.write_set(S)          ... copy second
//!              end_writeback(ok)          failure: redirty + remember the error
//!              mark_dirty(H, pass start)  hot: written, and dirty again at once
//! sync:        absorb, tag all dirty (TOWRITE), write exactly those, sink.sync,
//!              report a remembered error once (mapping_set_error / fsync)
//! ```

use std::sync::{Arc, Mutex};

use crate::dirty_set::DirtySet;
use crate::harvest::{HarvestError, Harvester, Subscription};
use crate::kvm::Slot;
use crate::memory::GuestRam;
use crate::sink::{Sink, SinkError};
use crate::writeback::clock::Clock;
use crate::writeback::hot::{HotPages, HotPolicy};
use crate::writeback::page_state::PageStates;
use crate::writeback::policy::WritebackPolicy;

/// Where the engine learns which pages were dirtied.
pub trait DirtyLog: Send + std::fmt::Debug {
    /// Pages dirtied since the last call. Not yet re-protected: the engine
    /// calls [`clear_dirty_for_io`](Self::clear_dirty_for_io) on the pages
    /// it is about to copy.
    fn fetch(&mut self) -> Result<DirtySet, HarvestError>;

    /// Re-protects `set` so writes after this call are logged again.
    fn clear_dirty_for_io(&mut self, set: &DirtySet) -> Result<(), HarvestError>;

    /// Hands a fetched set back for reuse.
    fn recycle(&mut self, _set: DirtySet) {}

    /// Whether a page stays writable, and keeps being reported, until
    /// [`clear_dirty_for_io`](Self::clear_dirty_for_io) re-protects it
    /// (manual-protect dirty logging). Only then does leaving a hot page
    /// unprotected save the guest a fault.
    fn reprotects_only_on_clear(&self) -> bool {
        false
    }
}

/// The engine's view of a [`Harvester`]: its own subscription.
#[derive(Debug)]
pub struct HarvesterLog(Subscription);

impl HarvesterLog {
    /// Subscribes to `harvester`.
    pub fn new(harvester: Arc<Mutex<Harvester>>) -> Self {
        HarvesterLog(Subscription::new(&harvester))
    }
}

impl DirtyLog for HarvesterLog {
    fn fetch(&mut self) -> Result<DirtySet, HarvestError> {
        self.0.fetch()
    }

    fn clear_dirty_for_io(&mut self, set: &DirtySet) -> Result<(), HarvestError> {
        self.0.clear_dirty_for_io(set)
    }

    fn recycle(&mut self, set: DirtySet) {
        self.0.recycle(set);
    }

    fn reprotects_only_on_clear(&self) -> bool {
        self.0.lock().mechanism() == crate::harvest::Mechanism::Manual
    }
}

/// `writeback_control.sync_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// WB_SYNC_NONE: write what is selected, up to `nr_to_write`.
    None,
    /// WB_SYNC_ALL: write every page dirty when the pass began.
    All,
}

/// What one pass writes (the kernel's `struct writeback_control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritebackControl {
    /// Sync mode.
    pub sync_mode: SyncMode,
    /// Guest-physical range `[range_start, range_end)`.
    pub range_start: u64,
    /// End of the range.
    pub range_end: u64,
    /// At most this many pages (SyncMode::None only).
    pub nr_to_write: u64,
    /// Only pages first dirtied at or before this engine time (ms): the
    /// kupdate-style "expired" pass.
    pub dirtied_before: Option<u64>,
}

impl WritebackControl {
    /// Every dirty page, whole RAM (WB_SYNC_ALL).
    pub fn sync_all() -> Self {
        WritebackControl {
            sync_mode: SyncMode::All,
            range_start: 0,
            range_end: u64::MAX,
            nr_to_write: u64::MAX,
            dirtied_before: None,
        }
    }

    /// Pages first dirtied at or before `t` (expired), whole RAM.
    pub fn expired(t: u64) -> Self {
        WritebackControl { sync_mode: SyncMode::None, dirtied_before: Some(t), ..Self::sync_all() }
    }

    /// The `n` oldest dirty pages (background writeback).
    pub fn oldest(n: u64) -> Self {
        WritebackControl { sync_mode: SyncMode::None, nr_to_write: n, ..Self::sync_all() }
    }
}

/// Counters in the spirit of `/proc/vmstat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WritebackStats {
    /// Pages dirty now.
    pub nr_dirty: u64,
    /// Pages under writeback in the pass running now (0 between passes).
    pub nr_writeback: u64,
    /// Pages that became dirty, ever.
    pub nr_dirtied: u64,
    /// Pages written back, ever.
    pub nr_written: u64,
    /// Bytes written back, ever.
    pub bytes_written: u64,
    /// Write passes run.
    pub passes: u64,
    /// Syncs completed.
    pub syncs: u64,
    /// Write-outs that failed.
    pub write_errors: u64,
    /// Age of the oldest dirty page, ms (0 when none).
    pub oldest_dirty_ms: u64,
    /// Longest write pass so far, ms (the "+ one pass" of the expiry bound).
    pub max_pass_ms: u64,
    /// Hot pages now: written out at their last expiry without being
    /// re-protected (they count in `nr_dirty` too).
    pub nr_hot: u64,
    /// Page write-outs that left the page writable (hot), ever: each a
    /// dirty-log fault the guest did not take.
    pub hot_written: u64,
}

/// Why a pass or a sync could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum WritebackError {
    /// Reading or re-protecting the dirty log failed.
    #[error(transparent)]
    Harvest(#[from] HarvestError),
    /// A write-out failed since the last sync (reported once); the pages
    /// stayed dirty and will be written again.
    #[error("write-out to {sink} failed; the pages stay dirty")]
    WriteOut {
        /// The sink's name.
        sink: String,
        /// The first error since the last sync.
        #[source]
        source: SinkError,
    },
}

/// What a flusher tick did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Pages newly dirty at this tick.
    pub absorbed: u64,
    /// Pages written by the expiry pass.
    pub expired_written: u64,
    /// Pages written by the background pass.
    pub background_written: u64,
    /// Dirty pages after the tick.
    pub nr_dirty: u64,
}

/// The writeback engine of one VM.
#[derive(Debug)]
pub struct Writeback {
    log: Box<dyn DirtyLog>,
    sink: Box<dyn Sink>,
    clock: Arc<dyn Clock>,
    ram: GuestRam,
    page_size: u64,
    ram_bytes: u64,
    states: PageStates,
    /// Pages written since the last successful `sink.sync()`: dirty again
    /// if that sync fails.
    unsynced: DirtySet,
    pending_error: Option<SinkError>,
    stats: WritebackStats,
    /// Hot-page tracking, where it is sound (see `hot`); None: every
    /// write-out re-protects.
    hot: Option<HotPages>,
    /// How soon after its write-out a page must be dirty again to count as
    /// hot: twice the last flush's expiry plus its period.
    hot_window_ms: u64,
}

impl Writeback {
    /// An engine over `slots` of `ram`, fed by `log`, writing to `sink`.
    /// Hot pages are left writable (the default [`HotPolicy`]) when the
    /// sink's write-outs leave pages writable and the log re-protects only
    /// on request; [`set_hot_policy`](Self::set_hot_policy) changes that.
    pub fn new(
        log: Box<dyn DirtyLog>,
        sink: Box<dyn Sink>,
        clock: Arc<dyn Clock>,
        ram: GuestRam,
        slots: &[Slot],
        page_size: u64,
    ) -> Self {
        let mut wb = Writeback {
            log,
            sink,
            clock,
            ram,
            page_size,
            ram_bytes: slots.iter().map(|s| s.size).sum(),
            states: PageStates::new(slots, page_size),
            unsynced: DirtySet::new(slots, page_size),
            pending_error: None,
            stats: WritebackStats::default(),
            hot: None,
            hot_window_ms: 0,
        };
        wb.set_hot_policy(Some(HotPolicy::default()));
        wb
    }

    /// Leaves hot pages writable under `policy` if that is sound here (the
    /// sink leaves written pages writable and the log re-protects only on
    /// request); `None`, or an unsound pairing, re-protects every page at
    /// every write-out. Returns whether hot pages are now left writable.
    pub fn set_hot_policy(&mut self, policy: Option<HotPolicy>) -> bool {
        let sound = self.sink.leaves_pages_writable() && self.log.reprotects_only_on_clear();
        let slots: Vec<Slot> = self.states.dirty().slots().iter().map(|s| s.slot()).collect();
        // Pages left open so far are dirty in the page states: whatever
        // the new policy, their next write-out handles them.
        self.hot = policy.filter(|_| sound).map(|p| HotPages::new(p, &slots, self.page_size));
        self.hot.is_some()
    }

    /// The hot-page policy in force, if any.
    pub fn hot_policy(&self) -> Option<HotPolicy> {
        self.hot.as_ref().map(HotPages::policy)
    }

    /// The page states.
    pub fn states(&self) -> &PageStates {
        &self.states
    }

    /// Counters now (the oldest dirty age is computed by a scan).
    pub fn stats(&self) -> WritebackStats {
        let now = self.clock.now_ms();
        WritebackStats {
            nr_dirty: self.states.nr_dirty(),
            oldest_dirty_ms: self.states.oldest().map_or(0, |t| now.saturating_sub(t)),
            nr_hot: self.hot.as_ref().map_or(0, |h| h.open().count()),
            ..self.stats
        }
    }

    /// Reads the log and marks what it reports dirty. Returns pages newly dirty.
    pub fn absorb(&mut self) -> Result<u64, WritebackError> {
        let new = self.log.fetch()?;
        let n = self.states.mark_dirty(&new, self.clock.now_ms());
        self.log.recycle(new);
        self.stats.nr_dirtied += n;
        Ok(n)
    }

    fn select(&self, wbc: &WritebackControl) -> DirtySet {
        let slots: Vec<Slot> = self.states.dirty().slots().iter().map(|s| s.slot()).collect();
        let mut set = DirtySet::new(&slots, self.page_size);
        let mut chosen: Vec<(usize, u64, u64)> = self
            .states
            .dirty_with_times(wbc.range_start, wbc.range_end)
            .filter(|&(_, _, t)| wbc.dirtied_before.is_none_or(|b| t <= b))
            .collect();
        if wbc.sync_mode == SyncMode::None && (chosen.len() as u64) > wbc.nr_to_write {
            // Oldest first, like the flusher's dirtied_when ordering.
            let n = wbc.nr_to_write as usize;
            chosen.select_nth_unstable_by_key(n, |&(_, _, t)| t);
            chosen.truncate(n);
        }
        for (i, p, _) in chosen {
            let _ = set.set_page(i, p);
        }
        set
    }

    /// One `write_cache_pages` pass: selects pages by `wbc`, re-protects
    /// them, writes them to the sink. A sink failure re-dirties the pages
    /// and is remembered for the next [`sync`](Self::sync); it is not an
    /// error of the pass. In an expiry pass, hot pages are written without
    /// being re-protected and stay dirty (see `hot`). Returns pages written.
    pub fn write_pages(&mut self, wbc: &WritebackControl) -> Result<u64, WritebackError> {
        let set = self.select(wbc);
        let n = set.count();
        if n == 0 {
            return Ok(0);
        }
        let t0 = self.clock.now_ms();
        let expiry_pass = wbc.sync_mode == SyncMode::None && wbc.dirtied_before.is_some();
        let open = match &mut self.hot {
            Some(h) => Some(h.write_out(&set, &self.states, t0, self.hot_window_ms, expiry_pass)),
            None => None,
        };
        // Re-protect first, copy second (invariant 1); a hot page is not
        // re-protected, and is dirty again from t0 on (below).
        match open.as_ref().filter(|o| !o.is_empty()) {
            Some(o) => {
                let mut protect = set.clone();
                protect.subtract(o);
                if !protect.is_empty() {
                    self.log.clear_dirty_for_io(&protect)?;
                }
            }
            None => self.log.clear_dirty_for_io(&set)?,
        }
        self.states.start_writeback(&set);
        self.stats.nr_writeback = n;
        self.stats.passes += 1;
        let r = self.sink.write_set(&self.ram, &set);
        self.stats.max_pass_ms = self.stats.max_pass_ms.max(self.clock.now_ms().saturating_sub(t0));
        self.stats.nr_writeback = 0;
        match r {
            Ok(bytes) => {
                self.states.end_writeback(true);
                if let Some(o) = open.filter(|o| !o.is_empty()) {
                    // Still writable: whatever the guest writes after the
                    // copy is no older than the pass's start.
                    self.stats.hot_written += self.states.mark_dirty(&o, t0);
                }
                self.unsynced.union_with(&set).map_err(HarvestError::from)?;
                self.stats.nr_written += n;
                self.stats.bytes_written += bytes;
                Ok(n)
            }
            Err(e) => {
                self.states.end_writeback(false);
                self.stats.write_errors += 1;
                tracing::warn!("writeback to {} failed ({} pages stay dirty): {e}", self.sink.name(), n);
                self.pending_error.get_or_insert(e);
                Ok(0)
            }
        }
    }

    /// A flusher tick under `policy`: absorb, write expired pages, then the
    /// oldest pages while above the background threshold.
    pub fn flush(&mut self, policy: &WritebackPolicy) -> Result<FlushReport, WritebackError> {
        let absorbed = self.absorb()?;
        let now = self.clock.now_ms();
        let expire = u64::try_from(policy.dirty_expire.as_millis()).unwrap_or(u64::MAX);
        let period = u64::try_from(policy.writeback_interval.as_millis()).unwrap_or(u64::MAX);
        // Generous: a guest slowed by faults rewrites even its hot pages
        // slowly, and a page wrongly taken for hot costs a few spare
        // writes before its recheck, not a fault.
        self.hot_window_ms = expire.saturating_mul(2).saturating_add(period);
        let expired_written = match now.checked_sub(expire) {
            Some(before) => self.write_pages(&WritebackControl::expired(before))?,
            None => 0,
        };
        let background = policy.background.pages(self.ram_bytes, self.page_size);
        let dirty = self.states.nr_dirty();
        let background_written =
            if dirty > background { self.write_pages(&WritebackControl::oldest(dirty - background))? } else { 0 };
        Ok(FlushReport { absorbed, expired_written, background_written, nr_dirty: self.states.nr_dirty() })
    }

    /// Whether dirty memory is above the hard limit (throttle the vCPUs).
    pub fn over_limit(&self, policy: &WritebackPolicy) -> bool {
        self.states.nr_dirty() > policy.limit.pages(self.ram_bytes, self.page_size)
    }

    /// Above the hard limit: absorb, then write the oldest pages down to
    /// the background threshold or half the limit, whichever is lower
    /// (what `balance_dirty_pages` waits for). Returns pages written.
    pub fn balance(&mut self, policy: &WritebackPolicy) -> Result<u64, WritebackError> {
        self.absorb()?;
        let target = policy
            .background
            .pages(self.ram_bytes, self.page_size)
            .min(policy.limit.pages(self.ram_bytes, self.page_size) / 2);
        let dirty = self.states.nr_dirty();
        if dirty <= target {
            return Ok(0);
        }
        self.write_pages(&WritebackControl::oldest(dirty - target))
    }

    /// WB_SYNC_ALL: writes every page dirty now (tagged first, so it ends
    /// however fast the guest dirties), makes the sink durable, and reports
    /// a write-out error remembered since the last sync, once. Returns pages
    /// written.
    pub fn sync(&mut self) -> Result<u64, WritebackError> {
        self.absorb()?;
        let n = self.write_pages(&WritebackControl::sync_all())?;
        match self.sink.sync() {
            Ok(()) => {
                self.unsynced.clear();
                self.stats.syncs += 1;
            }
            Err(e) => {
                // Not durable: everything written since the last good sync
                // is dirty again.
                let again = self.unsynced.take();
                let k = self.states.mark_dirty(&again, self.clock.now_ms());
                tracing::warn!("{} failed; {k} pages are dirty again: {e}", self.sink.name());
                self.pending_error.get_or_insert(e);
            }
        }
        match self.pending_error.take() {
            Some(source) => Err(WritebackError::WriteOut { sink: self.sink.name(), source }),
            None => Ok(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::writeback::clock::FakeClock;
    use crate::writeback::policy::Threshold;

    const PS: u64 = 4096;
    const PAGES: u64 = 256;

    fn slots() -> Vec<Slot> {
        vec![Slot { slot: 0, gpa: 0, size: PAGES * PS }]
    }

    /// A log that returns what the test queued, and records re-protections.
    #[derive(Debug, Default, Clone)]
    struct FakeLog {
        queued: Arc<Mutex<Vec<u64>>>,
        cleared: Arc<Mutex<Vec<u64>>>,
        /// Every fetch also reports these pages (a guest dirtying forever).
        storm: Arc<Mutex<Vec<u64>>>,
    }

    impl DirtyLog for FakeLog {
        fn fetch(&mut self) -> Result<DirtySet, HarvestError> {
            let mut s = DirtySet::new(&slots(), PS);
            for p in self.queued.lock().unwrap().drain(..).chain(self.storm.lock().unwrap().iter().copied()) {
                s.set_page(0, p).unwrap();
            }
            Ok(s)
        }

        fn clear_dirty_for_io(&mut self, set: &DirtySet) -> Result<(), HarvestError> {
            self.cleared.lock().unwrap().extend(set.slots()[0].pages());
            Ok(())
        }
    }

    /// A sink that records pages and can be told to fail: every write-out
    /// (`fail`), after writing only the first pages of a set (`short`: a
    /// short write), or at the sync (`fail_sync`), with `errno`.
    #[derive(Debug, Default, Clone)]
    struct FakeSink {
        written: Arc<Mutex<Vec<u64>>>,
        fail: Arc<AtomicBool>,
        short: Arc<Mutex<Option<usize>>>,
        fail_sync: Arc<AtomicBool>,
        errno: Arc<Mutex<Option<i32>>>,
        syncs: Arc<Mutex<u64>>,
        /// Its write-outs leave pages writable (an image file).
        writable: bool,
    }

    impl FakeSink {
        fn error(&self) -> std::io::Error {
            std::io::Error::from_raw_os_error(self.errno.lock().unwrap().unwrap_or(libc::ENOSPC))
        }
    }

    impl Sink for FakeSink {
        fn write_set(&mut self, _ram: &GuestRam, set: &DirtySet) -> Result<u64, SinkError> {
            let pages: Vec<u64> = set.slots()[0].pages().collect();
            let fail = |sink: &Self, written: usize| SinkError::Write {
                path: "fake".into(),
                offset: written as u64 * PS,
                len: PS,
                source: sink.error(),
            };
            if self.fail.load(Ordering::SeqCst) {
                return Err(fail(self, 0));
            }
            if let Some(k) = *self.short.lock().unwrap() {
                if k < pages.len() {
                    self.written.lock().unwrap().extend(&pages[..k]);
                    return Err(fail(self, k));
                }
            }
            self.written.lock().unwrap().extend(&pages);
            Ok(set.count() * PS)
        }

        fn sync(&mut self) -> Result<(), SinkError> {
            *self.syncs.lock().unwrap() += 1;
            if self.fail_sync.load(Ordering::SeqCst) {
                return Err(SinkError::Sync { path: "fake".into(), op: "fdatasync", source: self.error() });
            }
            Ok(())
        }

        fn name(&self) -> String {
            "fake".into()
        }

        fn leaves_pages_writable(&self) -> bool {
            self.writable
        }
    }

    /// Manual-protect dirty logging as KVM does it: a write to a protected
    /// page faults and sets its bit; a page keeps being reported at every
    /// fetch until `clear_dirty_for_io` re-protects it. With `once`, a set
    /// bit is reported at one fetch only (the engine must not count on
    /// KVM's re-reporting to keep a hot page dirty).
    #[derive(Debug, Default, Clone)]
    struct ManualLog {
        bits: Arc<Mutex<std::collections::BTreeSet<u64>>>,
        reported: Arc<Mutex<std::collections::BTreeSet<u64>>>,
        once: bool,
        cleared: Arc<Mutex<Vec<u64>>>,
        faults: Arc<Mutex<u64>>,
    }

    impl ManualLog {
        /// The guest writes `page`.
        fn write(&self, page: u64) {
            if self.bits.lock().unwrap().insert(page) {
                *self.faults.lock().unwrap() += 1;
            }
        }
    }

    impl DirtyLog for ManualLog {
        fn fetch(&mut self) -> Result<DirtySet, HarvestError> {
            let mut s = DirtySet::new(&slots(), PS);
            let mut reported = self.reported.lock().unwrap();
            for &p in self.bits.lock().unwrap().iter() {
                if !self.once || reported.insert(p) {
                    s.set_page(0, p).unwrap();
                }
            }
            Ok(s)
        }

        fn clear_dirty_for_io(&mut self, set: &DirtySet) -> Result<(), HarvestError> {
            let mut bits = self.bits.lock().unwrap();
            for p in set.slots()[0].pages() {
                bits.remove(&p);
                self.reported.lock().unwrap().remove(&p);
                self.cleared.lock().unwrap().push(p);
            }
            Ok(())
        }

        fn reprotects_only_on_clear(&self) -> bool {
            true
        }
    }

    /// An engine over a manual-protect log and a sink whose write-outs
    /// leave pages writable (`writable`: an image file) or not (the backing
    /// file).
    fn hot_engine(writable: bool) -> (Writeback, ManualLog, FakeSink, FakeClock) {
        hot_engine_over(writable, ManualLog::default())
    }

    fn hot_engine_over(writable: bool, log: ManualLog) -> (Writeback, ManualLog, FakeSink, FakeClock) {
        let ram: GuestRam = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (PAGES * PS) as usize)]).unwrap();
        let clock = FakeClock::default();
        let sink = FakeSink { writable, ..FakeSink::default() };
        let wb =
            Writeback::new(Box::new(log.clone()), Box::new(sink.clone()), Arc::new(clock.clone()), ram, &slots(), PS);
        (wb, log, sink, clock)
    }

    fn engine() -> (Writeback, FakeLog, FakeSink, FakeClock) {
        let ram: GuestRam = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (PAGES * PS) as usize)]).unwrap();
        ram.write_obj(1u8, GuestAddress(0)).unwrap();
        let (log, sink, clock) = (FakeLog::default(), FakeSink::default(), FakeClock::default());
        let wb =
            Writeback::new(Box::new(log.clone()), Box::new(sink.clone()), Arc::new(clock.clone()), ram, &slots(), PS);
        (wb, log, sink, clock)
    }

    fn policy(expire_ms: u64) -> WritebackPolicy {
        WritebackPolicy {
            writeback_interval: Duration::from_millis(100),
            dirty_expire: Duration::from_millis(expire_ms),
            background: Threshold::Percent(100),
            limit: Threshold::Percent(100),
        }
    }

    #[test]
    fn pages_wait_for_expiry_and_are_reprotected_before_the_copy() {
        let (mut wb, log, sink, clock) = engine();
        log.queued.lock().unwrap().extend([3, 4]);
        let r = wb.flush(&policy(1000)).unwrap();
        assert_eq!((r.absorbed, r.expired_written, r.nr_dirty), (2, 0, 2));
        clock.advance(600);
        log.queued.lock().unwrap().push(9);
        wb.flush(&policy(1000)).unwrap();
        assert!(sink.written.lock().unwrap().is_empty(), "nothing expired yet");
        clock.advance(400);
        let r = wb.flush(&policy(1000)).unwrap();
        assert_eq!(r.expired_written, 2, "pages 3 and 4 are 1000 ms old");
        assert_eq!(*sink.written.lock().unwrap(), vec![3, 4]);
        assert_eq!(*log.cleared.lock().unwrap(), vec![3, 4], "re-protected first");
        assert_eq!(wb.stats().nr_dirty, 1);
        assert_eq!(wb.stats().oldest_dirty_ms, 400);
    }

    #[test]
    fn background_threshold_writes_oldest_first() {
        let (mut wb, log, sink, clock) = engine();
        for (t, p) in [(0, 10u64), (10, 20), (20, 30), (30, 40)] {
            clock.advance(if t == 0 { 0 } else { 10 });
            log.queued.lock().unwrap().push(p);
            wb.absorb().unwrap();
        }
        // background at 2 pages of 256 (1 %): the two oldest go.
        let p = WritebackPolicy { background: Threshold::Bytes(2 * PS), ..policy(60_000) };
        let r = wb.flush(&p).unwrap();
        assert_eq!(r.background_written, 2);
        assert_eq!(*sink.written.lock().unwrap(), vec![10, 20]);
        assert!(!wb.over_limit(&WritebackPolicy { limit: Threshold::Bytes(2 * PS), ..p }));
    }

    #[test]
    fn failed_write_out_keeps_pages_dirty_and_is_reported_once() {
        for errno in [libc::ENOSPC, libc::EIO] {
            let (mut wb, log, sink, _clock) = engine();
            *sink.errno.lock().unwrap() = Some(errno);
            log.queued.lock().unwrap().extend([1, 2, 3]);
            sink.fail.store(true, Ordering::SeqCst);
            let e = wb.sync().unwrap_err();
            assert!(e.to_string().contains("write-out to fake failed"), "{e}");
            assert_eq!(
                std::error::Error::source(&e).and_then(|s| s.source()).map(|s| s.to_string()),
                Some(std::io::Error::from_raw_os_error(errno).to_string())
            );
            assert_eq!(wb.stats().nr_dirty, 3, "nothing lost");
            assert_eq!(wb.states().failed().count(), 3);
            assert_eq!(wb.stats().write_errors, 1);
            // the fault cleared: the next sync writes them and reports nothing old
            sink.fail.store(false, Ordering::SeqCst);
            assert_eq!(wb.sync().unwrap(), 3);
            assert_eq!(wb.stats().nr_dirty, 0);
            assert!(wb.states().failed().is_empty());
            assert_eq!(*sink.syncs.lock().unwrap(), 2);
            assert!(wb.sync().is_ok(), "the error was reported once");
        }
    }

    /// A short write (the first pages of a set reach the file, then EIO)
    /// keeps every page of the set dirty: the engine cannot know which of
    /// them are whole, so all go again on the retry.
    #[test]
    fn short_write_keeps_the_whole_set_dirty() {
        let (mut wb, log, sink, _clock) = engine();
        *sink.errno.lock().unwrap() = Some(libc::EIO);
        *sink.short.lock().unwrap() = Some(2);
        log.queued.lock().unwrap().extend([5, 6, 7, 8]);
        assert!(wb.sync().is_err());
        assert_eq!(*sink.written.lock().unwrap(), vec![5, 6], "two pages landed");
        assert_eq!(wb.stats().nr_dirty, 4, "all four stay dirty");
        *sink.short.lock().unwrap() = None;
        assert_eq!(wb.sync().unwrap(), 4);
        assert_eq!(*sink.written.lock().unwrap(), vec![5, 6, 5, 6, 7, 8]);
        assert_eq!(wb.stats().nr_dirty, 0);
    }

    /// fdatasync failing with EIO (the kernel's writeback error model: the
    /// pages written since the last good sync may not be on disk): they are
    /// dirty again, the error is reported, and the next sync writes them.
    #[test]
    fn failed_fdatasync_redirties_what_it_did_not_make_durable() {
        let (mut wb, log, sink, _clock) = engine();
        log.queued.lock().unwrap().extend([1, 2]);
        assert_eq!(wb.sync().unwrap(), 2);
        *sink.errno.lock().unwrap() = Some(libc::EIO);
        sink.fail_sync.store(true, Ordering::SeqCst);
        log.queued.lock().unwrap().extend([3, 4, 5]);
        let e = wb.sync().unwrap_err();
        assert!(format!("{e:?}").contains("fdatasync"), "{e:?}");
        assert_eq!(wb.stats().nr_dirty, 3, "the three written since the good sync are dirty again");
        sink.fail_sync.store(false, Ordering::SeqCst);
        assert_eq!(wb.sync().unwrap(), 3);
        assert_eq!(wb.stats().nr_dirty, 0);
        assert_eq!(*sink.written.lock().unwrap(), vec![1, 2, 3, 4, 5, 3, 4, 5]);
    }

    #[test]
    fn sync_ends_while_the_guest_keeps_dirtying() {
        let (mut wb, log, sink, _clock) = engine();
        // Every fetch reports 100 pages anew: the dirty set never empties.
        log.storm.lock().unwrap().extend(0..100);
        for _ in 0..3 {
            assert_eq!(wb.sync().unwrap(), 100);
        }
        assert_eq!(sink.written.lock().unwrap().len(), 300);
    }

    /// A real VM's log and an image on a tiny tmpfs that fills up: the
    /// write-out fails with ENOSPC, nothing is lost, and once space is
    /// freed the next sync writes everything and the image equals memory.
    #[test]
    fn full_filesystem_then_space_freed() {
        use crate::harvest::{prepare, DirtyLogMode};
        use crate::kvm::dirty_log::DirtyCaps;
        use crate::memory::BackingFile;
        use crate::sink::ImageFile;

        assert!(std::path::Path::new("/dev/kvm").exists(), "/dev/kvm is missing: this test needs KVM");
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::create_dir(&small).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&small)
            .status()
            .expect("run mount");
        assert!(st.success(), "mounting a 64 KiB tmpfs failed: this test needs root");
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(small.clone());

        let kvm = crate::kvm::open(std::path::Path::new("/dev/kvm")).unwrap();
        let vm = Arc::new(crate::kvm::create_vm(&kvm).unwrap());
        let m = prepare(&vm, DirtyCaps::probe(&vm), DirtyLogMode::Manual, 4096).unwrap();
        let b = BackingFile::open_or_create(&dir.path().join("mem"), 1 << 20).unwrap();
        let ram = b.map(false).unwrap();
        let slots = crate::kvm::register_ram(&vm, &ram, true).unwrap();
        let h = Arc::new(Mutex::new(Harvester::new(vm, m, slots.clone(), ram.clone(), Vec::new(), PS)));
        let img_path = small.join("image");
        let sink = ImageFile::open(&img_path, 1 << 20).unwrap();
        let mut wb = Writeback::new(
            Box::new(HarvesterLog::new(h)),
            Box::new(sink),
            Arc::new(FakeClock::default()),
            ram.clone(),
            &slots,
            PS,
        );
        // Fill the filesystem, then dirty 8 pages through vm-memory.
        let filler = small.join("filler");
        let _ = std::fs::write(&filler, vec![0xffu8; 1 << 20]);
        for i in 0..8u64 {
            ram.write_slice(&[i as u8 + 1; 4096], GuestAddress(0x10000 + i * 2 * PS)).unwrap();
        }
        let e = wb.sync().unwrap_err();
        assert!(format!("{e:?}").contains("StorageFull"), "expected ENOSPC: {e:?}");
        assert_eq!(wb.stats().nr_dirty, 8, "the pages stay dirty");
        assert_eq!(wb.states().failed().count(), 8);
        std::fs::remove_file(&filler).unwrap();
        assert_eq!(wb.sync().unwrap(), 8);
        assert_eq!(wb.stats().nr_dirty, 0);
        let img = std::fs::read(&img_path).unwrap();
        let mut mem = vec![0u8; 1 << 20];
        ram.read_slice(&mut mem, GuestAddress(0)).unwrap();
        assert!(img == mem, "image differs from guest memory after the retry");
    }

    /// A page the guest writes between every two write-outs turns hot at
    /// its second write-out: from then on it is re-protected only at every
    /// 8th (the default policy), so it faults once per 8 expiries; its
    /// content is written at every expiry all the same. A page that cools
    /// is found so at its recheck and is clean from then on.
    #[test]
    fn a_page_rewritten_at_every_expiry_is_reprotected_every_eighth_time() {
        let (mut wb, log, sink, clock) = hot_engine(true);
        assert_eq!(wb.hot_policy(), Some(HotPolicy::default()));
        let pol = policy(1000);
        let mut cleared_at = Vec::new();
        for tick in 0..=200u64 {
            if tick < 150 {
                log.write(7); // dirtied at every tick while hot
            }
            let before = log.cleared.lock().unwrap().len();
            wb.flush(&pol).unwrap();
            if log.cleared.lock().unwrap().len() > before {
                cleared_at.push(tick);
            }
            clock.advance(100);
        }
        // First written (cold, re-protected) at tick 10 and dirtied again
        // at 11, so written at 21: hot from this second write-out on, and
        // dirty from the write-out's start, so written every 10 ticks; the
        // 9th write-out (tick 91) is the recheck, then 102 … 162 open, and
        // the recheck at 172, after the guest stopped at 150, leaves it clean.
        assert_eq!(cleared_at, vec![10, 91, 172]);
        assert_eq!(sink.written.lock().unwrap().len(), 17, "written at every expiry while hot");
        assert_eq!(*log.faults.lock().unwrap(), 3, "a fault after each re-protection only (150 writes)");
        assert_eq!(wb.stats().nr_dirty, 0);
        assert_eq!(wb.stats().nr_hot, 0);
        assert_eq!(wb.stats().hot_written, 14);
    }

    /// The backing-file sink (host writeback write-protects) and logs that
    /// re-protect at every harvest get no hot pages: every write-out
    /// re-protects, as before.
    #[test]
    fn hot_pages_only_where_the_sink_and_the_log_leave_them_writable() {
        let (mut wb, log, _sink, clock) = hot_engine(false);
        assert_eq!(wb.hot_policy(), None);
        assert!(!wb.set_hot_policy(Some(HotPolicy::default())));
        for _ in 0..100 {
            log.write(3);
            wb.flush(&policy(1000)).unwrap();
            clock.advance(100);
        }
        assert_eq!(log.cleared.lock().unwrap().len(), 9, "re-protected at each of its 9 write-outs");
        let (wb, ..) = engine();
        assert_eq!(wb.hot_policy(), None, "FakeLog re-protects at every fetch");
    }

    /// A sync re-protects hot pages: after it nothing is dirty, and the
    /// guest's next write to them is logged (a fault).
    #[test]
    fn sync_reprotects_hot_pages() {
        let (mut wb, log, sink, clock) = hot_engine(true);
        for _ in 0..40 {
            log.write(5);
            wb.flush(&policy(1000)).unwrap();
            clock.advance(100);
        }
        assert_eq!(wb.stats().nr_hot, 1);
        assert_eq!(wb.sync().unwrap(), 1);
        assert_eq!(wb.stats().nr_dirty, 0);
        assert_eq!(wb.stats().nr_hot, 0);
        assert!(log.bits.lock().unwrap().is_empty(), "re-protected");
        assert_eq!(sink.written.lock().unwrap().last(), Some(&5));
    }

    proptest! {
        /// With hot pages on (an image-like sink over a manual-protect log),
        /// whatever the interleaving of guest writes, time, flushes, failures
        /// and syncs: no content the guest wrote stays unwritten longer than
        /// expire + one flusher tick while the sink works, and a sync writes
        /// every page the guest wrote since it was last written. Also when
        /// the log reports a page once only (`once`): the engine keeps a
        /// hot page dirty itself.
        #[test]
        fn hot_pages_keep_the_expiry_bound_and_lose_no_write(
            ops in proptest::collection::vec((0u8..6, 0u64..24), 1..300),
            k in 1u8..4,
            m in 1u8..6,
            once in proptest::bool::ANY,
        ) {
            let (mut wb, log, sink, clock) = hot_engine_over(true, ManualLog { once, ..ManualLog::default() });
            let on = wb.set_hot_policy(Some(HotPolicy { after: k, recheck_every: m }));
            prop_assert!(on);
            let pol = policy(500);
            // Page -> time of its oldest write not yet written out.
            let mut pending: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
            for (op, page) in ops {
                let before = sink.written.lock().unwrap().len();
                match op {
                    0..=2 => { log.write(page); pending.entry(page).or_insert(clock.now_ms()); }
                    3 => clock.advance(100),
                    4 => { sink.fail.store(page % 7 == 0, Ordering::SeqCst); }
                    _ => { let _ = wb.sync(); }
                }
                wb.flush(&pol).unwrap();
                // Nothing is written between the guest's writes and these
                // copies: each copy holds every write so far.
                for p in sink.written.lock().unwrap()[before..].iter() {
                    pending.remove(p);
                }
                if !sink.fail.load(Ordering::SeqCst) {
                    let now = clock.now_ms();
                    for (p, t) in &pending {
                        prop_assert!(now - t < 500 + 100, "page {} written at {} ms unwritten at {} ms", p, t, now);
                    }
                }
                for p in pending.keys() {
                    prop_assert!(wb.states().dirty().slots()[0].contains_page(*p), "page {} lost", p);
                }
            }
            sink.fail.store(false, Ordering::SeqCst);
            let before = sink.written.lock().unwrap().len();
            // It may report a write-out that failed before (once); it
            // writes everything all the same.
            let first = wb.sync();
            for p in sink.written.lock().unwrap()[before..].iter() {
                pending.remove(p);
            }
            prop_assert!(pending.is_empty(), "the final sync left {:?} unwritten", pending);
            prop_assert_eq!(wb.stats().nr_dirty, 0);
            prop_assert!(first.is_ok() || wb.stats().write_errors > 0);
            prop_assert!(wb.sync().is_ok(), "an error is reported once");
        }
    }

    proptest! {
        /// Whatever the interleaving of dirtying, time, flushes, failures and
        /// syncs: every page ever dirtied is either written after its last
        /// dirtying or still dirty (no lost write), and nothing stays dirty
        /// past expiry + one flush while the sink works.
        #[test]
        fn no_lost_write_and_expiry_bound(ops in proptest::collection::vec((0u8..5, 0u64..PAGES), 1..200)) {
            let (mut wb, log, sink, clock) = engine();
            let pol = policy(500);
            let mut last_dirtied = std::collections::HashMap::new();
            let mut written_at = std::collections::HashMap::new();
            let mut step = 0u64;
            for (op, page) in ops {
                step += 1;
                let before = sink.written.lock().unwrap().len();
                match op {
                    0 | 1 => { log.queued.lock().unwrap().push(page); last_dirtied.insert(page, step); }
                    2 => clock.advance(100),
                    3 => { sink.fail.store(page % 7 == 0, Ordering::SeqCst); }
                    _ => { let _ = wb.sync(); }
                }
                wb.flush(&pol).unwrap();
                for p in sink.written.lock().unwrap()[before..].iter() {
                    written_at.insert(*p, step);
                }
                if !sink.fail.load(Ordering::SeqCst) {
                    prop_assert!(wb.stats().oldest_dirty_ms < 500 + 100, "dirty longer than expire + one tick");
                }
            }
            for (p, d) in last_dirtied {
                let persisted = written_at.get(&p).is_some_and(|&w| w >= d);
                let dirty = wb.states().dirty().slots()[0].contains_page(p);
                prop_assert!(persisted || dirty, "page {} lost", p);
            }
        }
    }
}
