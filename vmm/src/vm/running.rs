//! The last steps of a VM's life (see [`crate::vm`]): **running** — the
//! vCPUs run the guest, the background tasks run beside them, the event
//! loop turns until the guest ends, fails, times out or is stopped — and
//! **shutdown** — the tasks stopped in order, the vCPUs joined, writeback's
//! final sync, the run's report.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smudge::harvest::{HarvestStats, Harvester, Subscription};
use smudge::memory::{host_page_size, BackingFile, GuestRam};
use smudge::sink::{BackingFileSink, ImageFile, Sink};
use smudge::writeback::{HarvesterLog, MonotonicClock, Writeback, WritebackStats};
use vmm_sys_util::eventfd::EventFd;

use crate::control::api::ApiServer;
use crate::control::signals::OnStop;
use crate::migrate::source::MigrationSource;
use crate::observe::heatmap::Heatmap;
use crate::observe::tracking::Tracking;
use crate::persist::flusher::{Flusher, WritebackOptions};
use crate::persist::snapshotter::Snapshotter;
use crate::vm::create::{Created, SocketFile};
use crate::vm::event_loop::{self, LoopEnd, Watch};
use crate::vm::outcome::Outcome;
use crate::vm::ready::Ready;
use crate::vm::seccomp::{Filters, ThreadKind};
use crate::vm::tasks::{LoopPart, LoopTask, Task, TaskError, Tasks, ThreadTask};
use crate::vm::vcpu::Shared;
use crate::vm::vcpu_control::{self, VcpuControl};
use crate::vm::{HeatmapNotWritten, IncomingVm, RunReport, VmConfig, VmError, WritebackSummary};

/// Where the heatmap task leaves its map when it stops.
type HeatmapSlot = Arc<Mutex<Option<Heatmap>>>;

/// Step 4: the guest runs, and the background tasks beside it.
pub(super) struct Running {
    cfg: VmConfig,
    /// KVM, the VM and the memory file: held until the run is over.
    _kvm: (kvm_ioctls::Kvm, Arc<kvm_ioctls::VmFd>),
    /// Guest RAM's mapping: KVM's memory slots point into it, so it lives
    /// until the vCPUs are joined (with dirty logging on the harvester
    /// holds it too; with it off, nothing else does).
    ram: GuestRam,
    backing: BackingFile,
    tsc_khz: Option<u32>,
    shared: Arc<Shared>,
    exit_evt: EventFd,
    tracking: Option<Arc<Mutex<Tracking>>>,
    flusher: Option<Arc<Mutex<Flusher>>>,
    threads: Arc<Vec<JoinHandle<()>>>,
    tasks: Tasks,
    /// Where the heatmap task leaves its map when it stops.
    heatmap: Option<HeatmapSlot>,
    /// When the vCPUs started.
    start: Instant,
    _stop_hook: OnStop,
}

/// What a running VM shares with the tasks it starts.
struct Parts<'a> {
    cfg: &'a VmConfig,
    shared: &'a Arc<Shared>,
    threads: &'a Arc<Vec<JoinHandle<()>>>,
    harvester: &'a Option<Arc<Mutex<Harvester>>>,
    ram: &'a GuestRam,
    backing: &'a BackingFile,
}

impl Ready {
    /// Lets the vCPUs run and starts the background tasks.
    pub fn start(self, incoming: Option<&mut Box<dyn IncomingVm>>) -> Result<Running, VmError> {
        let Ready { created, shared, exit_evt, harvester, tracking, wb_log, stop_hook } = self;
        let Created {
            cfg, kvm, api_listener, socket_file, backing, ram, kvm_side, filters, waiting, t_received, ..
        } = created;
        let start = Instant::now();
        let threads = Arc::new(waiting.start(kvm_side.vcpus, &shared)?);
        if let Some(t0) = cfg.started_at {
            let _ = writeln!(
                std::io::stderr(),
                "smudge: restore: the guest runs {:.1} ms after smudge started",
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        if let Some(inc) = incoming {
            inc.started(Ok(()), &shared.memory_loading);
            tracing::debug!("vCPUs started and the source told {:?} after the memory was in", t_received.elapsed());
        }
        let flusher = match (wb_log, cfg.writeback.clone()) {
            (Some(log), Some(opts)) => Some(new_flusher(&cfg, log, opts, &backing, &ram, &kvm_side.slots)?),
            _ => None,
        };
        let parts = Parts {
            cfg: &cfg,
            shared: &shared,
            threads: &threads,
            harvester: &harvester,
            ram: &ram,
            backing: &backing,
        };
        let (tasks, heatmap) =
            parts.start_tasks(filters, flusher.as_ref(), tracking.as_ref(), api_listener, socket_file)?;
        Ok(Running {
            _kvm: (kvm, kvm_side.vm),
            ram,
            tsc_khz: kvm_side.tsc_khz,
            cfg,
            backing,
            shared,
            exit_evt,
            tracking,
            flusher,
            threads,
            tasks,
            heatmap,
            start,
            _stop_hook: stop_hook,
        })
    }
}

/// The writeback engine over `log`, writing into the backing file (or the
/// image `opts` names), in its flusher.
fn new_flusher(
    cfg: &VmConfig,
    log: HarvesterLog,
    opts: WritebackOptions,
    backing: &BackingFile,
    ram: &GuestRam,
    slots: &[smudge::kvm::Slot],
) -> Result<Arc<Mutex<Flusher>>, VmError> {
    let sink: Box<dyn Sink> = match &opts.image {
        Some(p) => {
            let image = ImageFile::open(p, cfg.mem_size).map_err(|e| VmError::Runtime(e.to_string()))?.dropping_cache();
            Box::new(match &opts.image_ready {
                Some(ready) => image.after(ready.clone()),
                None => image,
            })
        }
        None => {
            let file = backing.file().try_clone().map_err(|e| VmError::Runtime(format!("dup memory file: {e}")))?;
            Box::new(BackingFileSink::new(file, backing.path(), cfg.mem_size))
        }
    };
    let mut engine =
        Writeback::new(Box::new(log), sink, Arc::new(MonotonicClock::new()), ram.clone(), slots, host_page_size());
    if !opts.hot_pages {
        engine.set_hot_policy(None);
    }
    Ok(Arc::new(Mutex::new(Flusher::new(engine, opts))))
}

impl Parts<'_> {
    /// Starts every background task the configuration asks for. They stop
    /// in the reverse order: the control API first, the flusher last.
    fn start_tasks(
        &self,
        filters: Option<Arc<Filters>>,
        flusher: Option<&Arc<Mutex<Flusher>>>,
        tracking: Option<&Arc<Mutex<Tracking>>>,
        api_listener: Option<std::os::unix::net::UnixListener>,
        mut socket_file: SocketFile,
    ) -> Result<(Tasks, Option<HeatmapSlot>), VmError> {
        let (cfg, shared) = (self.cfg, self.shared);
        let mut tasks = Tasks::default();
        if let Some(f) = flusher {
            tasks.add(self.flusher_task(f, filters)?);
        }
        if let (Some(t), true) = (tracking, cfg.dirty.periodic()) {
            let (t, sh) = (t.clone(), shared.clone());
            tasks.add(LoopTask::tick("dirty tracking", move |_| {
                if let Err(e) = t.lock().unwrap_or_else(|p| p.into_inner()).periodic_tick() {
                    sh.finish(Outcome::KvmFailure(format!("dirty tracking: {e}")));
                }
            }));
        }
        if let Some(every) = cfg.dirty.stats_interval {
            tasks.add(stats_task(every, self.harvester.clone(), flusher.cloned(), shared.clone()));
        }
        let control = VcpuControl::new(shared.clone(), self.threads.clone());
        let snapshotter = self.snapshotter(&control);
        if let (Some(sn), Some(every), Some(_)) = (&snapshotter, cfg.snapshot_precopy, self.harvester) {
            tasks.add(precopy_task(sn.clone(), every, shared)?);
        }
        let heatmap = match (self.harvester, &cfg.heatmap) {
            (Some(h), Some((_, period, buckets))) => {
                let slot = Arc::new(Mutex::new(None));
                let map = Heatmap::new(cfg.mem_size, *buckets, *period);
                tasks.add(heatmap_task(h.clone(), map, shared, slot.clone())?);
                Some(slot)
            }
            _ => None,
        };
        if let (Some(sn), Some((at, dir))) = (&snapshotter, cfg.snapshot_at.clone()) {
            tasks.add(timed_snapshot_task(sn.clone(), at, dir, shared.clone()));
        }
        let journal = match &cfg.journal {
            Some(opts) => {
                let (task, stats) = self.epoch_task(opts)?;
                tasks.add(task);
                Some(stats)
            }
            None => None,
        };
        if let Some(listener) = api_listener {
            // The server removes the socket from here on.
            socket_file.0 = None;
            let server = ApiServer::new(
                listener,
                cfg.api_sock.clone().unwrap_or_default(),
                control.clone(),
                self.harvester.clone(),
                flusher.cloned(),
                snapshotter,
                self.migration_source(&control),
            )
            .with_journal(journal);
            tasks.add(ApiTask::new(server));
        }
        Ok((tasks, heatmap))
    }

    /// The flusher on a thread of its own, under its seccomp filter.
    fn flusher_task(&self, f: &Arc<Mutex<Flusher>>, filters: Option<Arc<Filters>>) -> Result<ThreadTask, TaskError> {
        let (f, sh, th) = (f.clone(), self.shared.clone(), self.threads.clone());
        let tick = self
            .cfg
            .writeback
            .as_ref()
            .map_or(self.cfg.tick, |o| o.policy.writeback_interval.min(Duration::from_millis(100)));
        ThreadTask::spawn("flusher", "flusher", self.shared, move |stop| {
            if let Some(Err(e)) = filters.map(|fl| fl.install(ThreadKind::Flusher)) {
                return sh.finish(Outcome::KvmFailure(format!("flusher: {e}")));
            }
            Flusher::run(f, sh, tick, || stop.is_set(), || vcpu_control::kick_all(&th))
        })
    }

    /// The durable mode's epochs into the journal `opts` names.
    fn epoch_task(
        &self,
        opts: &crate::persist::epoch::EpochOptions,
    ) -> Result<(crate::persist::epoch::EpochTask, Arc<crate::persist::epoch::EpochStats>), VmError> {
        use crate::persist::epoch;
        let mem_file =
            self.backing.file().try_clone().map_err(|e| VmError::Runtime(format!("dup memory file: {e}")))?;
        let src = epoch::EpochSource {
            harvester: self.harvester.clone(),
            ram: self.ram.clone(),
            mem_file,
            mem_size: self.cfg.mem_size,
            shared: self.shared.clone(),
            threads: self.threads.clone(),
        };
        epoch::start(src, opts).map_err(|e| VmError::Runtime(e.to_string()))
    }

    /// Snapshots of this VM; none if the memory file cannot be shared.
    fn snapshotter(&self, control: &VcpuControl) -> Option<Arc<Mutex<Snapshotter>>> {
        match self.backing.file().try_clone() {
            Ok(f) => {
                let s = Snapshotter::new(control.clone(), f, self.cfg.mem_size, self.harvester.clone());
                let s = if self.cfg.snapshot_precopy.is_some() { s.with_precopy(self.ram.clone()) } else { s };
                Some(Arc::new(Mutex::new(s)))
            }
            Err(e) => {
                tracing::warn!("snapshots unavailable: cannot dup the memory file: {e}");
                None
            }
        }
    }

    /// What a migration of this VM reads; none without dirty logging.
    fn migration_source(&self, control: &VcpuControl) -> Option<MigrationSource> {
        let file = match self.backing.file().try_clone() {
            Ok(f) => Arc::new(f),
            Err(e) => {
                tracing::warn!("migration unavailable: cannot dup the memory file: {e}");
                return None;
            }
        };
        Some(MigrationSource {
            vcpus: control.clone(),
            harvester: self.harvester.clone()?,
            ram: self.ram.clone(),
            file,
            path: self.backing.path().to_path_buf(),
            mem_size: self.cfg.mem_size,
            recovery: Default::default(),
        })
    }
}

/// Copies the next diff snapshot's pages into its staging image every
/// `every` while the guest runs.
fn precopy_task(sn: Arc<Mutex<Snapshotter>>, every: Duration, shared: &Arc<Shared>) -> Result<ThreadTask, TaskError> {
    ThreadTask::spawn("snapshot pre-copy", "snapshot-precopy", shared, move |stop| {
        while !stop.is_set() {
            std::thread::park_timeout(every);
            if let Err(e) = sn.lock().unwrap_or_else(|p| p.into_inner()).precopy_pass() {
                // The pages stay owed to the next diff.
                tracing::warn!("snapshot {e}");
            }
        }
    })
}

/// Records which pages the guest dirtied in each `period` into `map`, on a
/// dirty-log consumer of its own; leaves the map in `slot` when it stops.
fn heatmap_task(
    h: Arc<Mutex<Harvester>>,
    map: Heatmap,
    shared: &Arc<Shared>,
    slot: HeatmapSlot,
) -> Result<ThreadTask, TaskError> {
    let sub = Subscription::new(&h);
    ThreadTask::spawn("heatmap", "heatmap", shared, move |stop| {
        let map = crate::observe::heatmap::record(sub, map, || stop.is_set());
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(map);
    })
}

/// Prints a stats line every `every` (checked at each event-loop tick).
fn stats_task(
    every: Duration,
    h: Option<Arc<Mutex<Harvester>>>,
    f: Option<Arc<Mutex<Flusher>>>,
    sh: Arc<Shared>,
) -> LoopTask {
    let mut last = (Instant::now(), HarvestStats::default(), WritebackStats::default(), 0u64);
    LoopTask::tick("stats", move |_| {
        if last.0.elapsed() < every {
            return;
        }
        let hs = h.as_ref().map(|h| h.lock().unwrap_or_else(|p| p.into_inner()).stats()).unwrap_or_default();
        let (ws, gap) = match &f {
            Some(f) => {
                let f = f.lock().unwrap_or_else(|p| p.into_inner());
                (Some(f.stats()), f.max_flush_gap)
            }
            None => (None, Duration::ZERO),
        };
        let thr = sh.throttled_ns.load(Ordering::Relaxed);
        print_stats(last.0.elapsed(), (&last.1, &hs), ws.as_ref().map(|w| (&last.2, w, gap)), thr - last.3);
        last = (Instant::now(), hs, ws.unwrap_or_default(), thr);
    })
}

/// Takes one full snapshot into a new directory under `dir` once the run
/// is `at` old (`smudge run --snapshot-at-ms`).
fn timed_snapshot_task(sn: Arc<Mutex<Snapshotter>>, at: Duration, dir: PathBuf, sh: Arc<Shared>) -> LoopTask {
    let mut due = SnapshotDue { at, taken: false };
    LoopTask::tick("timed snapshot", move |t| {
        if due.taken || t < at {
            return;
        }
        due.taken = true;
        let mut s = sn.lock().unwrap_or_else(|p| p.into_inner());
        let target = dir.join(format!("snapshot-{}", std::process::id()));
        match s.take(&target, None, true) {
            Ok(t) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "smudge: snapshot {} in {}: {} MiB of memory, vCPUs paused {:.1} ms",
                    t.manifest.id,
                    t.dir.display(),
                    t.memory_bytes >> 20,
                    t.pause.as_secs_f64() * 1e3
                );
            }
            Err(e) => sh.finish(Outcome::KvmFailure(format!("snapshot: {e}"))),
        }
    })
}

/// Whether the timed snapshot was taken; a run that ends before its time
/// says so when the task goes, rather than leaving the user to find no
/// snapshot.
struct SnapshotDue {
    at: Duration,
    taken: bool,
}

impl Drop for SnapshotDue {
    fn drop(&mut self) {
        if !self.taken {
            let _ = writeln!(
                std::io::stderr(),
                "smudge: the run ended before --snapshot-at-ms {}: no snapshot taken",
                self.at.as_millis()
            );
        }
    }
}

/// The control API: served on the event loop (each connection then on a
/// thread of its own). Stopping it removes the socket and waits for the
/// requests in flight (a snapshot, a migration) to finish.
struct ApiTask {
    server: Arc<Mutex<ApiServer>>,
    watch: Option<Watch>,
}

impl ApiTask {
    fn new(server: ApiServer) -> ApiTask {
        let server = Arc::new(Mutex::new(server));
        let fd = server.lock().unwrap_or_else(|p| p.into_inner()).listener().as_raw_fd();
        let s = server.clone();
        let watch: Watch = (fd, Box::new(move || s.lock().unwrap_or_else(|p| p.into_inner()).on_readable()));
        ApiTask { server, watch: Some(watch) }
    }
}

impl Task for ApiTask {
    fn name(&self) -> &'static str {
        "control API"
    }

    fn take_loop_part(&mut self) -> Option<LoopPart> {
        self.watch.take().map(LoopPart::Watch)
    }

    fn stop(&mut self) {
        // No connection is accepted once the event loop is over; a watch
        // never handed to a loop goes now.
        self.watch = None;
    }

    fn join(self: Box<Self>) -> Result<(), TaskError> {
        // The last hold on the server once the loop is over: dropping it
        // removes the socket and joins the connections.
        drop(self.server);
        Ok(())
    }
}

impl Running {
    /// Turns the event loop until the run ends, then shuts the VM down.
    pub fn run(mut self) -> Result<RunReport, VmError> {
        let (hooks, watches) = self.tasks.loop_parts();
        let end = event_loop::run(&self.exit_evt, self.cfg.tick, self.cfg.timeout, hooks, watches);
        self.shutdown(end)
    }

    /// Step 5: the tasks stopped (the control API first, the flusher
    /// last), the vCPUs stopped and joined, guest RAM still filling in
    /// awaited, writeback's final sync, and what the run did.
    fn shutdown(self, end: std::io::Result<LoopEnd>) -> Result<RunReport, VmError> {
        let Running {
            cfg,
            _kvm,
            ram: _ram,
            backing,
            tsc_khz,
            shared,
            tracking,
            flusher,
            threads,
            tasks,
            heatmap,
            start,
            ..
        } = self;
        tasks.stop_all()?;
        let heatmap = match (heatmap, &cfg.heatmap) {
            (Some(slot), Some((path, _, _))) => {
                let map = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                Some(write_heatmap(map, path, &cfg))
            }
            (None, Some(_)) => Some(Err(HeatmapNotWritten::NoDirtyLog)),
            _ => None,
        };
        let threads = Arc::try_unwrap(threads).map_err(|_| VmError::Runtime("vCPU handles still shared".into()))?;
        vcpu_control::stop_vcpus(&shared, threads);
        // Guest RAM still filling in (a lazy restore's prefetch, post-copy's
        // stream) must all be in the memory file before the run ends, or the
        // file would hold holes for pages the guest had.
        if shared.memory_loading.load(Ordering::Acquire) {
            let _ = writeln!(std::io::stderr(), "smudge: the guest stopped; waiting for its memory to finish loading");
            while shared.memory_loading.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let elapsed = start.elapsed();
        shared.bus.flush();
        let outcome = match end {
            Ok(LoopEnd::Timeout(d)) => Outcome::Timeout(d),
            Ok(LoopEnd::VcpuExit) => shared
                .outcome
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| Outcome::KvmFailure("vCPUs stopped without an outcome".into())),
            Err(e) => return Err(VmError::Runtime(format!("event loop: {e}"))),
        };
        let dirty = match tracking {
            Some(t) => Some(unshare(t, "dirty tracking")?.finish()?),
            None => None,
        };
        let writeback = match flusher {
            Some(f) => Some(final_sync(unshare(f, "flusher")?, &shared)),
            None => None,
        };
        Ok(RunReport { outcome, elapsed, created_mem_file: backing.created(), dirty, writeback, tsc_khz, heatmap })
    }
}

/// The only hold left on `x` once the run is over.
fn unshare<T>(x: Arc<Mutex<T>>, what: &str) -> Result<T, VmError> {
    let x = Arc::try_unwrap(x).map_err(|_| VmError::Runtime(format!("{what} still shared after the run")))?;
    Ok(x.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// Writeback's final WB_SYNC_ALL + fdatasync, and what it did over the run.
fn final_sync(f: Flusher, shared: &Shared) -> WritebackSummary {
    let (max_dirty, slices) = (f.max_dirty, f.throttle_slices);
    let (stats, final_sync, throttled_ns) = f.finish(shared);
    WritebackSummary {
        stats,
        final_sync,
        throttled: Duration::from_nanos(throttled_ns),
        throttle_slices: slices,
        max_dirty,
    }
}

/// Writes the heatmap's SVG at `path` and its data beside it (`.json`).
fn write_heatmap(map: Option<Heatmap>, path: &Path, cfg: &VmConfig) -> Result<(PathBuf, usize), HeatmapNotWritten> {
    let map = map.ok_or(HeatmapNotWritten::Lost)?;
    let title = format!("smudge: {} ({} MiB)", cfg.cmdline, cfg.mem_size >> 20);
    map.render_svg(path, &title, 1200, 800)?;
    let data = path.with_extension("json");
    std::fs::write(&data, map.data_json().to_string()).map_err(|err| HeatmapNotWritten::Data { path: data, err })?;
    Ok((path.to_path_buf(), map.periods()))
}

fn print_stats(
    dt: Duration,
    h: (&HarvestStats, &HarvestStats),
    w: Option<(&WritebackStats, &WritebackStats, Duration)>,
    throttled_ns: u64,
) {
    let secs = dt.as_secs_f64().max(1e-9);
    let (h0, h1) = h;
    let n = (h1.harvests - h0.harvests).max(1);
    let mut line = format!(
        "smudge: stats: dirtied {:.0} pages/s (guest {:.0}, vmm {:.0}); harvests {} at {:.1} us; ring_full {}",
        ((h1.guest_pages + h1.vmm_pages) - (h0.guest_pages + h0.vmm_pages)) as f64 / secs,
        (h1.guest_pages - h0.guest_pages) as f64 / secs,
        (h1.vmm_pages - h0.vmm_pages) as f64 / secs,
        h1.harvests - h0.harvests,
        (h1.harvest_time - h0.harvest_time).as_secs_f64() * 1e6 / n as f64,
        h1.ring_full_exits - h0.ring_full_exits,
    );
    if let Some((w0, w1, gap)) = w {
        line.push_str(&format!(
            "; writeback: nr_dirty={} nr_writeback={} nr_dirtied={} nr_written={} writeout_MBps={:.1} oldest_dirty_ms={} max_pass_ms={} max_flush_gap_ms={} syncs={} write_errors={} throttle_ms={}",
            w1.nr_dirty,
            w1.nr_writeback,
            w1.nr_dirtied,
            w1.nr_written,
            (w1.bytes_written - w0.bytes_written) as f64 / secs / 1e6,
            w1.oldest_dirty_ms,
            w1.max_pass_ms,
            gap.as_millis(),
            w1.syncs,
            w1.write_errors,
            throttled_ns / 1_000_000,
        ));
    }
    let _ = writeln!(std::io::stderr(), "{line}");
}
