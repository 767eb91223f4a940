//! One VM run, start to end, built in named steps (the names of Cloud
//! Hypervisor's VM lifecycle where they fit):
//!
//! ```text
//!  planned ──▶ created ──────────────▶ ready ───────────▶ running ──────────▶ shutdown
//!  KVM open,   memory file mapped,     vCPU state set      vCPUs run; tasks    tasks stopped
//!  boot image  KVM VM + slots + vCPUs, (PVH entry or a     start; the event    (last started
//!  checked in  guest RAM loaded (boot  restored guest's),  loop turns until    first), vCPUs
//!  scratch     image, incoming guest), devices, dirty      the guest ends,     joined, final
//!              sandbox on, vCPU        log, stop signals   fails, times out    sync, report
//!              threads waiting                             or is stopped
//! ```
//!
//! - **planned** (`Planned`, in `create.rs`): what can be checked before any file
//!   is touched — RAM size, KVM, the guest image.
//! - **created** (`Created`, `create.rs`): the API socket bound, the memory
//!   file mapped; KVM is set up on a thread of its own while the guest's
//!   RAM is loaded; the VMM seccomp filter goes on and the vCPU threads are
//!   spawned, waiting ([`vcpu_threads`]).
//! - **ready** (`Ready`, `ready.rs`): the vCPUs hold their first state, the
//!   devices and the dirty log are set up, SIGTERM/SIGINT end the run.
//! - **running** (`Running`, `running.rs`): the vCPUs enter the guest; the
//!   background tasks start — flusher, periodic dirty tracking, stats,
//!   snapshot pre-copy, heatmap, timed snapshot, control API (which serves
//!   snapshots and migrations) — each through the one interface of
//!   [`tasks`]; the event loop ([`event_loop`]) turns. While running, the
//!   vCPUs can be paused and their state collected ([`vcpu_control`]).
//! - **shutdown**: the tasks stop in the reverse order of their start (the
//!   control API first, so requests in flight finish while everything they
//!   use is still there; the flusher last), then the vCPUs are stopped and
//!   joined, guest RAM still filling in is awaited, writeback makes its
//!   final sync, and [`run`] returns what the run did ([`RunReport`]).
//!
//! A step that fails ends the run there: what the earlier steps made is
//! dropped (the API socket removed, waiting vCPU threads ended). The other
//! parts: loading the guest ([`boot`], [`guest_image`]), the vCPUs
//! ([`vcpu`]), the devices ([`devices`]), the sandbox of every thread
//! ([`seccomp`]) and how a run ended ([`outcome`]).

pub mod boot;
mod create;
pub mod devices;
pub mod event_loop;
pub mod guest_image;
pub mod outcome;
mod ready;
mod running;
pub mod seccomp;
pub mod tasks;
pub mod vcpu;
pub mod vcpu_control;
pub mod vcpu_threads;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smudge::harvest::{DirtyLogMode, HarvestError};
use smudge::kvm::KvmError;
use smudge::memory::MemoryError;
use smudge::snapshot::MachineState;
use smudge::writeback::{WritebackError, WritebackStats};

use self::boot::BootError;
use self::create::Planned;
use self::outcome::Outcome;
use self::tasks::TaskError;
use self::vcpu::{SyncHook, VcpuError};
use self::vcpu_threads::StartError;
use crate::control::api;
use crate::observe::heatmap::HeatmapError;
use crate::observe::tracking::{DirtyOptions, DirtySummary, TrackError};
use crate::persist::flusher::WritebackOptions;

/// Smallest RAM smudge boots (image at 1 MiB, state area at 2 MiB).
pub const MIN_MEM: u64 = 8 << 20;

/// Everything a run needs.
pub struct VmConfig {
    /// Backing file path: guest RAM itself (mapped in place), or, with
    /// `ram_in_memfd`, the disk file the writeback engine's image sink
    /// keeps equal to RAM.
    pub mem_file: PathBuf,
    /// Guest RAM in shared memory (a memfd), persisted to `mem_file` only
    /// by writeback (which must be on, writing into that image). A boot
    /// starts from `mem_file`'s contents if it exists; an incoming guest
    /// brings its own.
    pub ram_in_memfd: bool,
    /// RAM size in bytes.
    pub mem_size: u64,
    /// The PVH ELF image.
    pub guest_elf: Vec<u8>,
    /// Guest command line (tsc_khz= is appended if absent).
    pub cmdline: String,
    /// vCPU count.
    pub vcpus: u8,
    /// Serial output.
    pub serial: Box<dyn Write + Send>,
    /// Stop after this long.
    pub timeout: Option<Duration>,
    /// Event-loop tick.
    pub tick: Duration,
    /// madvise(MADV_HUGEPAGE) on RAM.
    pub hugepages: bool,
    /// The dirty-log mechanism (`None`: RAM registered without logging).
    pub dirty_log: Option<DirtyLogMode>,
    /// Dirty ring size per vCPU, in entries.
    pub ring_entries: u32,
    /// Capabilities to treat as absent (`manual`, `ring`): to see how smudge
    /// behaves on a KVM without them.
    pub hide_caps: Vec<String>,
    /// Consumers of the dirty log.
    pub dirty: DirtyOptions,
    /// Called at guest sync points (benchmarks).
    pub on_sync: Option<SyncHook>,
    /// Writeback of the backing file (needs dirty logging).
    pub writeback: Option<WritebackOptions>,
    /// Serve the control API on this unix socket.
    pub api_sock: Option<PathBuf>,
    /// Take a full snapshot this long after start, into a new directory
    /// under the given one.
    pub snapshot_at: Option<(Duration, PathBuf)>,
    /// Copy the next diff snapshot's pages into a staging image this often
    /// while the guest runs (None: the pause copies them all).
    pub snapshot_precopy: Option<Duration>,
    /// Durable mode: append an epoch to this journal every so often.
    pub journal: Option<crate::persist::epoch::EpochOptions>,
    /// Continue from a snapshot's machine state instead of booting (the
    /// memory file already holds its RAM).
    pub restore: Option<smudge::snapshot::MachineState>,
    /// When the command started: a restore says how long after it the
    /// guest runs (its time to first instruction).
    pub started_at: Option<Instant>,
    /// Record a dirty-page heatmap: into this SVG, with this period and
    /// this many address buckets.
    pub heatmap: Option<(PathBuf, Duration, usize)>,
    /// Receive the guest from a migration source instead of booting (the
    /// memory file is new; RAM and state arrive while KVM is set up).
    pub incoming: Option<Box<dyn IncomingVm>>,
    /// KVM device node.
    pub kvm_dev: PathBuf,
    /// Seccomp filters per thread kind (see [`crate::vm::seccomp`]). The VMM
    /// filter stays on the calling thread after the run: off for runs
    /// inside another program (benchmarks), on from the command line.
    pub seccomp: bool,
    /// Test hook: vCPU 0 makes one forbidden syscall once its filter is on.
    pub seccomp_selftest: bool,
    /// Test hook: pause the vCPUs when the guest reports this sync point.
    pub pause_at_sync: Option<u32>,
}

/// A guest arriving from elsewhere (a live migration's destination side).
pub trait IncomingVm: Send {
    /// Fills the memory file `file` (at `path`) with the guest's RAM and
    /// returns its machine state. Runs while KVM is being set up.
    fn receive(
        &mut self,
        file: &std::fs::File,
        path: &std::path::Path,
        ram: &smudge::memory::GuestRam,
    ) -> Result<MachineState, crate::migrate::incoming::IncomingError>;
    /// The guest runs (Ok) or could not be started (Err, why); called
    /// once, as soon as that is known. `loading` is to be held true while
    /// guest RAM is still filling in behind the running guest (snapshots
    /// and migrations wait for it).
    fn started(&mut self, result: Result<(), &VmError>, loading: &Arc<std::sync::atomic::AtomicBool>);
}

impl VmConfig {
    /// The bundled guest with `cmdline` on `mem_size` bytes of RAM in
    /// `mem_file`: one vCPU, serial discarded, manual dirty logging, no
    /// writeback, no API — what benchmarks start from.
    pub fn bundled(mem_file: PathBuf, mem_size: u64, cmdline: &str) -> Self {
        VmConfig {
            mem_file,
            ram_in_memfd: false,
            mem_size,
            guest_elf: crate::vm::guest_image::GUEST_ELF.to_vec(),
            cmdline: cmdline.to_string(),
            vcpus: 1,
            serial: Box::new(std::io::sink()),
            timeout: Some(Duration::from_secs(600)),
            tick: Duration::from_millis(100),
            hugepages: false,
            dirty_log: Some(DirtyLogMode::Manual),
            ring_entries: 4096,
            hide_caps: Vec::new(),
            dirty: DirtyOptions::default(),
            on_sync: None,
            writeback: None,
            kvm_dev: "/dev/kvm".into(),
            api_sock: None,
            restore: None,
            started_at: None,
            snapshot_at: None,
            snapshot_precopy: None,
            journal: None,
            heatmap: None,
            incoming: None,
            seccomp: false,
            seccomp_selftest: false,
            pause_at_sync: None,
        }
    }
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("mem_file", &self.mem_file)
            .field("mem_size", &self.mem_size)
            .field("cmdline", &self.cmdline)
            .field("vcpus", &self.vcpus)
            .finish_non_exhaustive()
    }
}

/// Why a VM could not be set up (the run never started).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// RAM size below the minimum.
    #[error("--mem-size {size} is too small: smudge needs at least {min} bytes ({} MiB)", MIN_MEM >> 20)]
    MemTooSmall {
        /// Requested.
        size: u64,
        /// Minimum.
        min: u64,
    },
    /// KVM unavailable or failing.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Backing file or mapping.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Guest image.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// More than one vCPU needs an in-kernel irqchip (APs wait for SIPI).
    #[error("--vcpus {0} needs an in-kernel irqchip, and KVM_CREATE_IRQCHIP failed")]
    NoIrqchip(u8),
    /// Dirty-log setup.
    #[error(transparent)]
    Harvest(#[from] HarvestError),
    /// The control socket.
    #[error(transparent)]
    Api(#[from] api::ApiError),
    /// Dirty tracking during the run.
    #[error(transparent)]
    Track(#[from] TrackError),
    /// Threads, signals, epoll.
    #[error("VMM runtime: {0}")]
    Runtime(String),
    /// The vCPU threads could not be handed their vCPUs.
    #[error(transparent)]
    VcpuStart(#[from] StartError),
    /// A background task could not start or did not end cleanly.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// SIGTERM or SIGINT (the number) came before the restored or
    /// received guest ran here: it was not started.
    #[error("stopped by {} before the guest ran here", smudge::stop_signal::name(*.0))]
    Stopped(i32),
}

/// What a run did.
#[derive(Debug)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Wall time from vCPU start to stop.
    pub elapsed: Duration,
    /// Whether the memory file was created by this run.
    pub created_mem_file: bool,
    /// The dirty log over the run, if logging was on.
    pub dirty: Option<DirtySummary>,
    /// Writeback over the run, if it was on.
    pub writeback: Option<WritebackSummary>,
    /// TSC frequency KVM reports, kHz.
    pub tsc_khz: Option<u32>,
    /// The heatmap written (its path and periods), or why it was not.
    pub heatmap: Option<Result<(PathBuf, usize), HeatmapNotWritten>>,
}

/// Why the heatmap asked for was not written.
#[derive(Debug, thiserror::Error)]
pub enum HeatmapNotWritten {
    /// It is drawn from the dirty log, and that was off.
    #[error("the heatmap needs dirty logging (drop --no-dirty-log)")]
    NoDirtyLog,
    /// The heatmap task ended without leaving its map.
    #[error("the heatmap task left no map")]
    Lost,
    /// The SVG could not be drawn or written.
    #[error(transparent)]
    Render(#[from] HeatmapError),
    /// Its data file could not be written.
    #[error("{}: {err}", path.display())]
    Data {
        /// The data file.
        path: PathBuf,
        /// What the OS said.
        err: std::io::Error,
    },
}

/// Boots and runs the VM described by `cfg` until the guest exits, fails or
/// times out: the steps of the module documentation, one after another.
pub fn run(mut cfg: VmConfig) -> Result<RunReport, VmError> {
    let mut incoming = cfg.incoming.take();
    let r = run_steps(cfg, &mut incoming);
    if let (Err(e), Some(inc)) = (&r, incoming.as_mut()) {
        inc.started(Err(e), &Arc::default());
    }
    r
}

fn run_steps(cfg: VmConfig, incoming: &mut Option<Box<dyn IncomingVm>>) -> Result<RunReport, VmError> {
    let planned = Planned::check(cfg, incoming.is_some())?;
    let created = planned.create(incoming.as_mut())?;
    let ready = created.prepare()?;
    let running = ready.start(incoming.as_mut())?;
    running.run()
}

/// What writeback did over the run.
#[derive(Debug)]
pub struct WritebackSummary {
    /// Engine counters after the final sync.
    pub stats: WritebackStats,
    /// The final WB_SYNC_ALL + fdatasync: pages written, or why it failed.
    pub final_sync: Result<u64, WritebackError>,
    /// Time the vCPUs spent throttled.
    pub throttled: Duration,
    /// Throttle slices imposed.
    pub throttle_slices: u64,
    /// Most pages dirty after any flush.
    pub max_dirty: u64,
}
