//! One VM run, start to end: KVM, file-backed RAM with dirty logging, the
//! guest loaded PVH, vCPU threads, the event loop, and an orderly stop.
//! Its parts: loading the guest ([`boot`], [`guest_image`]), the vCPUs
//! ([`vcpu`], [`vcpu_threads`]), the devices ([`devices`]), the event loop
//! ([`event_loop`]), the sandbox of every thread ([`seccomp`]) and how a run
//! ended ([`outcome`]).

pub mod boot;
pub mod devices;
pub mod event_loop;
pub mod guest_image;
pub mod outcome;
pub mod seccomp;
pub mod vcpu;
pub mod vcpu_threads;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smudge::harvest::{self, DirtyLogMode, HarvestError, HarvestStats, Harvester, Mechanism};
use smudge::kvm::dirty_log::DirtyCaps;
use smudge::kvm::vcpu_state;
use smudge::kvm::{self, KvmError, Slot};
use smudge::memory::{host_page_size, BackingFile, GuestRam, MemoryError};
use smudge::sink::{BackingFileSink, ImageFile, Sink};
use smudge::snapshot::MachineState;
use smudge::writeback::{HarvesterLog, MonotonicClock, Writeback, WritebackStats};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use self::boot::BootError;
use self::devices::{PortBus, SerialConsole};
use self::event_loop::{LoopEnd, TickHook, Watch};
use self::outcome::Outcome;
use self::seccomp::{Filters, ThreadKind};
use self::vcpu::{Shared, SyncHook, VcpuError};
use crate::control::api::{self, ApiServer};
use crate::control::signals::{self, Hold};
use crate::migrate::source::MigrationSource;
use crate::observe::heatmap::Heatmap;
use crate::observe::tracking::{DirtyOptions, DirtySummary, TrackError, Tracking};
use crate::persist::flusher::{Flusher, WritebackOptions};
use crate::persist::snapshotter::{Snapshotter, VcpuControl};

/// Smallest RAM smudge boots (image at 1 MiB, state area at 2 MiB).
pub const MIN_MEM: u64 = 8 << 20;

/// Everything a run needs.
pub struct VmConfig {
    /// Backing file path.
    pub mem_file: PathBuf,
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
    ) -> Result<MachineState, String>;
    /// The guest runs (Ok) or could not be started (Err, why); called
    /// once, as soon as that is known. `loading` is to be held true while
    /// guest RAM is still filling in behind the running guest (snapshots
    /// and migrations wait for it).
    fn started(&mut self, result: Result<(), String>, loading: &Arc<std::sync::atomic::AtomicBool>);
}

impl VmConfig {
    /// The bundled guest with `cmdline` on `mem_size` bytes of RAM in
    /// `mem_file`: one vCPU, serial discarded, manual dirty logging, no
    /// writeback, no API — what benchmarks start from.
    pub fn bundled(mem_file: PathBuf, mem_size: u64, cmdline: &str) -> Self {
        VmConfig {
            mem_file,
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
    pub heatmap: Option<Result<(PathBuf, usize), String>>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Loads the guest into anonymous scratch memory shaped like the real RAM:
/// this checks the image before any file is made or touched, and gives the
/// bytes to copy into the backing file.
fn load_into_scratch(elf: &[u8], size: u64) -> Result<(GuestMemoryMmap, boot::BootEntry), VmError> {
    let ranges: Vec<(GuestAddress, usize)> =
        smudge::memory::ram_layout(size).iter().map(|r| (GuestAddress(r.gpa), r.len as usize)).collect();
    let scratch: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Runtime(format!("scratch memory: {e}")))?;
    let entry = boot::load_pvh(&scratch, elf)?;
    Ok((scratch, entry))
}

/// Copies what the loader wrote (image segments, boot information) from
/// scratch into guest RAM, through the file and logged in the VMM bitmap.
fn copy_boot_image(
    scratch: &GuestMemoryMmap,
    backing: &BackingFile,
    ram: &GuestRam,
    elf: &[u8],
) -> Result<(), VmError> {
    let mut ranges = boot::load_ranges(elf);
    ranges.push(boot::BOOT_INFO_RANGE);
    for (gpa, len) in ranges {
        let mut buf = vec![0u8; len as usize];
        scratch.read_slice(&mut buf, GuestAddress(gpa)).map_err(|e| VmError::Runtime(format!("scratch read: {e}")))?;
        backing.write_at_gpa(ram, gpa, &buf)?;
    }
    Ok(())
}

/// The KVM objects of a VM, made on a thread of their own.
struct KvmSide {
    vm: Arc<kvm_ioctls::VmFd>,
    mechanism: Option<Mechanism>,
    rings: Vec<smudge::kvm::ring::DirtyRing>,
    irqchip: bool,
    slots: Vec<Slot>,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    tsc_khz: Option<u32>,
}

/// What the KVM side needs to know.
#[derive(Debug, Clone)]
struct KvmPlan {
    vcpus: u8,
    dirty_log: Option<DirtyLogMode>,
    ring_bytes: u32,
    hide_caps: Vec<String>,
}

fn setup_kvm(kvm_fd: &kvm_ioctls::Kvm, ram: &GuestRam, plan: KvmPlan) -> Result<KvmSide, VmError> {
    let nr_vcpus = plan.vcpus;
    let vm = kvm::create_vm(kvm_fd)?;
    let mut caps = DirtyCaps::probe(&vm);
    if plan.hide_caps.iter().any(|c| c == "manual") {
        caps.manual_protect = 0;
    }
    if plan.hide_caps.iter().any(|c| c == "ring") {
        caps.ring_max_bytes = 0;
    }
    // Manual protect and the ring are enabled before slots and vCPUs exist.
    let mechanism = plan.dirty_log.map(|m| harvest::prepare(&vm, caps, m, plan.ring_bytes)).transpose()?;
    let dirty_log = mechanism.is_some();
    if let Err(e) = vm.set_tss_address(0xfffb_d000) {
        tracing::debug!("KVM_SET_TSS_ADDR: {e}");
    }
    // RAM before the irqchip: with an irqchip in place, registering a slot
    // costs ~6 ms here (measured), against ~0.2 ms without.
    let slots = kvm::register_ram(&vm, ram, dirty_log)?;
    let irqchip = vm.create_irq_chip().is_ok();
    if !irqchip && nr_vcpus > 1 {
        return Err(VmError::NoIrqchip(nr_vcpus));
    }
    let mut vcpus = Vec::new();
    for id in 0..nr_vcpus {
        vcpus.push(vcpu::create(kvm_fd, &vm, id)?);
    }
    let rings = match mechanism {
        Some(m) => harvest::map_rings(m, &vcpus, host_page_size())?,
        None => Vec::new(),
    };
    let tsc_khz = vcpus[0].get_tsc_khz().ok();
    tracing::debug!("KVM side ready");
    Ok(KvmSide { vm: Arc::new(vm), mechanism, rings, irqchip, slots, vcpus, tsc_khz })
}

/// Boots and runs the VM described by `cfg` until the guest exits, fails or
/// times out.
pub fn run(mut cfg: VmConfig) -> Result<RunReport, VmError> {
    let mut incoming = cfg.incoming.take();
    let r = run_vm(cfg, &mut incoming);
    if let (Err(e), Some(inc)) = (&r, incoming.as_mut()) {
        inc.started(Err(format!("the destination could not start the guest: {e}")), &Arc::default());
    }
    r
}

fn run_vm(cfg: VmConfig, incoming: &mut Option<Box<dyn IncomingVm>>) -> Result<RunReport, VmError> {
    if cfg.mem_size < MIN_MEM {
        return Err(VmError::MemTooSmall { size: cfg.mem_size, min: MIN_MEM });
    }
    // Everything that can be checked without touching the memory file first.
    let kvm_fd = kvm::open(&cfg.kvm_dev)?;
    // A fresh boot loads the guest (into scratch first: it is checked before
    // any file is touched); a restore brings its own memory and state.
    let boot = match &cfg.restore {
        None if incoming.is_some() => None,
        None => Some(load_into_scratch(&cfg.guest_elf, cfg.mem_size)?),
        Some(state) if state.vcpus.len() != usize::from(cfg.vcpus) => {
            return Err(VmError::Runtime(format!("snapshot has {} vCPUs, asked for {}", state.vcpus.len(), cfg.vcpus)))
        }
        Some(_) => None,
    };
    tracing::debug!("dry run done");

    let api_listener = cfg.api_sock.as_deref().map(api::bind).transpose()?;
    // Removed if the run ends before the API server owns it.
    let mut socket_file = SocketFile(cfg.api_sock.clone().filter(|_| api_listener.is_some()));
    let backing = BackingFile::open_or_create(&cfg.mem_file, cfg.mem_size)?;
    let ram = backing.map(cfg.hugepages)?;
    tracing::debug!("mapped");
    // KVM_SET_USER_MEMORY_REGION costs ~6 ms here whatever the size (a
    // fixed cost in the kernel); load the guest meanwhile.
    let (kvm_side, loaded, filters) = std::thread::scope(|s| {
        let plan = KvmPlan {
            vcpus: cfg.vcpus,
            dirty_log: cfg.dirty_log,
            ring_bytes: cfg.ring_entries.saturating_mul(16),
            hide_caps: cfg.hide_caps.clone(),
        };
        let (kvm_ref, ram_ref) = (&kvm_fd, &ram);
        let kvm_side = s.spawn(move || setup_kvm(kvm_ref, ram_ref, plan));
        // Seccomp: the VMM filter goes on this thread while KVM is set up
        // (off the boot's critical path; the setup thread, which ends before
        // the guest runs, is the only one without it): after copying a
        // boot's own image, before reading an incoming guest, and before
        // any other thread starts, so they all inherit it. vCPUs and the
        // flusher add their own.
        // The vCPU threads start right after the filter, and wait.
        let install = || {
            let filters = match cfg.seccomp {
                false => None,
                true => Some(
                    Filters::new(&seccomp::Context::current())
                        .and_then(|f| f.install_vmm().map(|_| Arc::new(f)))
                        .map_err(|e| VmError::Runtime(e.to_string()))?,
                ),
            };
            let waiting = vcpu_threads::Waiting::spawn(cfg.vcpus, filters.clone(), cfg.seccomp_selftest)
                .map_err(|e| VmError::Runtime(format!("spawning vCPU threads: {e}")))?;
            Ok::<_, VmError>((filters, waiting))
        };
        let (loaded, filters) = match (&boot, incoming.as_mut()) {
            (Some((scratch, _)), _) => {
                (copy_boot_image(scratch, &backing, &ram, &cfg.guest_elf).map(|_| None), install())
            }
            (None, Some(inc)) => match install() {
                Ok(f) => (inc.receive(backing.file(), backing.path(), &ram).map(Some).map_err(VmError::Runtime), Ok(f)),
                Err(e) => (Ok(None), Err(e)),
            },
            (None, None) => (Ok(None), install()),
        };
        (kvm_side.join(), loaded, filters)
    });
    let (filters, waiting) = filters?;
    let KvmSide { vm, mechanism, rings, irqchip, slots, vcpus, tsc_khz } =
        kvm_side.map_err(|_| VmError::Runtime("KVM setup thread panicked".into()))??;
    let received = loaded?;
    let t_received = Instant::now();
    if let Some(state) = &received {
        if state.vcpus.len() != usize::from(cfg.vcpus) {
            return Err(VmError::Runtime(format!(
                "the source sent {} vCPUs, asked for {}",
                state.vcpus.len(),
                cfg.vcpus
            )));
        }
    }
    let restore = received.or_else(|| cfg.restore.clone());
    match (boot, &restore) {
        (Some((scratch, entry)), _) => {
            drop(scratch);
            let mut cmdline = cfg.cmdline.clone();
            if let (Some(khz), false) = (tsc_khz, cmdline.split(' ').any(|w| w.starts_with("tsc_khz="))) {
                if !cmdline.is_empty() {
                    cmdline.push(' ');
                }
                cmdline.push_str(&format!("tsc_khz={khz}"));
            }
            backing.write_at_gpa(&ram, boot::CMDLINE_ADDR, &boot::cmdline_bytes(&cmdline)?)?;
            vcpu::set_pvh_entry(&vcpus[0], 0, &entry)?;
            tracing::info!(
                "booting {} vCPU(s), {} MiB RAM in {}{}, entry {:#x}, cmdline '{cmdline}'",
                cfg.vcpus,
                cfg.mem_size >> 20,
                backing.path().display(),
                if backing.created() { " (new)" } else { "" },
                entry.entry
            );
        }
        (None, Some(state)) => {
            for (v, st) in vcpus.iter().zip(&state.vcpus) {
                vcpu_state::restore(v, st).map_err(|e| VmError::Runtime(e.to_string()))?;
            }
            tracing::info!(
                "restored {} vCPU(s), {} MiB RAM in {}; the guest continues where it was",
                cfg.vcpus,
                cfg.mem_size >> 20,
                backing.path().display()
            );
        }
        (None, None) => return Err(VmError::Runtime("neither a guest to boot nor a state to restore".into())),
    }

    tracing::debug!("vCPU state set {:?} after the memory was in", t_received.elapsed());
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Runtime(format!("eventfd: {e}")))?;
    if irqchip {
        if let Err(e) = vm.register_irqfd(&serial_irq, 4) {
            tracing::debug!("serial irqfd: {e}");
        }
    }
    let harvester = mechanism.map(|m| {
        tracing::info!("dirty log: {m}");
        Arc::new(Mutex::new(Harvester::new(vm.clone(), m, slots.clone(), ram.clone(), rings, host_page_size())))
    });
    let tracking = match &harvester {
        Some(h) => Some(Arc::new(Mutex::new(Tracking::new(
            h.clone(),
            ram.clone(),
            cfg.mem_size,
            &cfg.dirty,
            (!backing.created()).then_some(backing.path()),
        )?))),
        None => None,
    };
    let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Runtime(format!("eventfd: {e}")))?;
    let mut shared = Shared::new(
        exit_evt.try_clone().map_err(|e| VmError::Runtime(format!("eventfd: {e}")))?,
        PortBus::new(SerialConsole::new(serial_irq, cfg.serial)),
        harvester.clone(),
        cfg.on_sync.clone(),
        irqchip,
    );
    shared.pause_at_sync = cfg.pause_at_sync;
    let shared = Arc::new(shared);
    if let Some(state) = &restore {
        shared.bus.set_state(&state.devices).map_err(VmError::Runtime)?;
    }
    // Writeback's dirty-log consumer exists before a vCPU runs (no page
    // dirtied from here on escapes it); the engine, whose page tables take
    // a while for large RAM, is built after the vCPUs started (less
    // downtime for an incoming migration).
    let wb_log = match (&harvester, &cfg.writeback) {
        (Some(h), Some(_)) => Some(HarvesterLog::new(h.clone())),
        _ => None,
    };
    tracing::debug!("devices, dirty log and writeback ready {:?} after the memory was in", t_received.elapsed());
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(|e| VmError::Runtime(format!("signal handler: {e}")))?;
    // SIGTERM/SIGINT end the run as `ctl stop` does (at once if one came
    // already: the vCPUs then never enter the guest).
    let _stop_hook = {
        let sh = shared.clone();
        signals::on_stop(
            "the guest pauses for good, its memory is written back, the API socket and staging files are removed",
            move |sig| sh.finish(Outcome::Signalled(sig)),
        )
    };
    signals::test_hold(Hold::Start);
    // A restored or received guest still lives in its snapshot or on its
    // source: not started here, it stays there.
    if let (Some(sig), Some(_)) = (signals::requested(), &restore) {
        return Err(VmError::Stopped(sig));
    }

    let start = Instant::now();
    let threads = waiting.start(vcpus, &shared).map_err(VmError::Runtime)?;
    let threads = Arc::new(threads);
    if let Some(t0) = cfg.started_at {
        let _ = writeln!(
            std::io::stderr(),
            "smudge: restore: the guest runs {:.1} ms after smudge started",
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    if let Some(inc) = incoming.as_mut() {
        inc.started(Ok(()), &shared.memory_loading);
        tracing::debug!("vCPUs started and the source told {:?} after the memory was in", t_received.elapsed());
    }
    let flusher = match (wb_log, cfg.writeback.clone()) {
        (Some(log), Some(opts)) => {
            let sink: Box<dyn Sink> = match &opts.image {
                Some(p) => Box::new(ImageFile::open(p, cfg.mem_size).map_err(|e| VmError::Runtime(e.to_string()))?),
                None => {
                    let file =
                        backing.file().try_clone().map_err(|e| VmError::Runtime(format!("dup memory file: {e}")))?;
                    Box::new(BackingFileSink::new(file, backing.path(), cfg.mem_size))
                }
            };
            let engine = Writeback::new(
                Box::new(log),
                sink,
                Arc::new(MonotonicClock::new()),
                ram.clone(),
                &slots,
                host_page_size(),
            );
            Some(Arc::new(Mutex::new(Flusher::new(engine, opts))))
        }
        _ => None,
    };
    let flusher_thread = match &flusher {
        Some(f) => {
            let (f, filters) = (f.clone(), filters.clone());
            let (sh, th, tick) = (
                shared.clone(),
                threads.clone(),
                cfg.writeback
                    .as_ref()
                    .map_or(cfg.tick, |o| o.policy.writeback_interval.min(Duration::from_millis(100))),
            );
            Some(
                std::thread::Builder::new()
                    .name("flusher".into())
                    .spawn(move || {
                        if let Some(Err(e)) = filters.map(|fl| fl.install(ThreadKind::Flusher)) {
                            return sh.finish(Outcome::KvmFailure(format!("flusher: {e}")));
                        }
                        Flusher::run(f, sh, tick, || kick_all(&th))
                    })
                    .map_err(|e| VmError::Runtime(format!("spawning the flusher: {e}")))?,
            )
        }
        None => None,
    };
    let mut hooks: Vec<TickHook> = Vec::new();
    if let (Some(t), true) = (&tracking, cfg.dirty.periodic()) {
        let (t, sh) = (t.clone(), shared.clone());
        hooks.push(Box::new(move |_| {
            if let Err(e) = t.lock().unwrap_or_else(|p| p.into_inner()).periodic_tick() {
                sh.finish(Outcome::KvmFailure(format!("dirty tracking: {e}")));
            }
        }));
    }
    if let Some(every) = cfg.dirty.stats_interval {
        let (h, f, sh) = (harvester.clone(), flusher.clone(), shared.clone());
        let mut last = (Instant::now(), HarvestStats::default(), WritebackStats::default(), 0u64);
        hooks.push(Box::new(move |_| {
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
        }));
    }
    let control = VcpuControl { shared: shared.clone(), threads: threads.clone(), kick: kick_all };
    let snapshotter = match backing.file().try_clone() {
        Ok(f) => {
            let s = Snapshotter::new(control.clone(), f, cfg.mem_size, harvester.clone());
            let s = if cfg.snapshot_precopy.is_some() { s.with_precopy(ram.clone()) } else { s };
            Some(Arc::new(Mutex::new(s)))
        }
        Err(e) => {
            tracing::warn!("snapshots unavailable: cannot dup the memory file: {e}");
            None
        }
    };
    let precopy_thread = match (&snapshotter, cfg.snapshot_precopy) {
        (Some(sn), Some(every)) if harvester.is_some() => {
            let (sn, sh) = (sn.clone(), shared.clone());
            Some(
                std::thread::Builder::new()
                    .name("snapshot-precopy".into())
                    .spawn(move || {
                        while !sh.stop.load(Ordering::Acquire) {
                            std::thread::park_timeout(every);
                            if let Err(e) = sn.lock().unwrap_or_else(|p| p.into_inner()).precopy_pass() {
                                // The pages stay owed to the next diff.
                                tracing::warn!("snapshot {e}");
                            }
                        }
                    })
                    .map_err(|e| VmError::Runtime(format!("spawning the pre-copy thread: {e}")))?,
            )
        }
        _ => None,
    };
    let heatmap_thread = match (&harvester, &cfg.heatmap) {
        (Some(h), Some((_, period, buckets))) => {
            let (sub, sh) = (smudge::harvest::Subscription::new(h), shared.clone());
            let map = Heatmap::new(cfg.mem_size, *buckets, *period);
            Some(
                std::thread::Builder::new()
                    .name("heatmap".into())
                    .spawn(move || crate::observe::heatmap::record(sub, map, || sh.stop.load(Ordering::Acquire)))
                    .map_err(|e| VmError::Runtime(format!("spawning the heatmap thread: {e}")))?,
            )
        }
        _ => None,
    };
    if let (Some(sn), Some((at, dir))) = (&snapshotter, cfg.snapshot_at.clone()) {
        let (sn, sh) = (sn.clone(), shared.clone());
        let mut done = false;
        hooks.push(Box::new(move |t| {
            if done || t < at {
                return;
            }
            done = true;
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
        }));
    }
    let mut watches: Vec<Watch> = Vec::new();
    if let Some(listener) = api_listener {
        // The server removes the socket from here on.
        socket_file.0 = None;
        let server = ApiServer::new(
            listener,
            cfg.api_sock.clone().unwrap_or_default(),
            control.clone(),
            harvester.clone(),
            flusher.clone(),
            snapshotter.clone(),
            migration_source(&control, &harvester, &ram, &backing, cfg.mem_size),
        );
        let server = Arc::new(Mutex::new(server));
        let fd = server.lock().unwrap_or_else(|p| p.into_inner()).listener().as_raw_fd();
        watches.push((fd, Box::new(move || server.lock().unwrap_or_else(|p| p.into_inner()).on_readable())));
    }
    let end = event_loop::run(&exit_evt, cfg.tick, cfg.timeout, hooks, watches);
    // The snapshotter and the control share the vCPU handles; both are done
    // once the loop is.
    drop(snapshotter);
    drop(control);
    // The flusher holds a handle list too; stop it before joining vCPUs.
    shared.stop.store(true, Ordering::Release);
    if let Some(t) = flusher_thread {
        t.thread().unpark();
        t.join().map_err(|_| VmError::Runtime("the flusher thread panicked".into()))?;
    }
    if let Some(t) = precopy_thread {
        t.thread().unpark();
        t.join().map_err(|_| VmError::Runtime("the snapshot pre-copy thread panicked".into()))?;
    }
    let heatmap = match (heatmap_thread, &cfg.heatmap) {
        (Some(t), Some((path, _, _))) => {
            t.thread().unpark();
            let map = t.join().map_err(|_| VmError::Runtime("the heatmap thread panicked".into()))?;
            let title = format!("smudge: {} ({} MiB)", cfg.cmdline, cfg.mem_size >> 20);
            let data = path.with_extension("json");
            let written = map.render_svg(path, &title, 1200, 800).map_err(|e| e.to_string()).and_then(|_| {
                std::fs::write(&data, map.data_json().to_string()).map_err(|e| format!("{}: {e}", data.display()))
            });
            Some(written.map(|_| (path.clone(), map.periods())))
        }
        (None, Some(_)) => Some(Err("the heatmap needs dirty logging (drop --no-dirty-log)".to_string())),
        _ => None,
    };
    let threads = Arc::try_unwrap(threads).map_err(|_| VmError::Runtime("vCPU handles still shared".into()))?;
    stop_vcpus(&shared, threads);
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
        Some(t) => {
            let t = Arc::try_unwrap(t)
                .map_err(|_| VmError::Runtime("dirty tracking still shared after the run".into()))?
                .into_inner()
                .unwrap_or_else(|p| p.into_inner());
            Some(t.finish()?)
        }
        None => None,
    };
    let writeback = match flusher {
        Some(f) => {
            let f = Arc::try_unwrap(f)
                .map_err(|_| VmError::Runtime("flusher still shared after the run".into()))?
                .into_inner()
                .unwrap_or_else(|p| p.into_inner());
            let (max_dirty, slices) = (f.max_dirty, f.throttle_slices);
            let (stats, final_sync, throttled_ns) = f.finish(&shared);
            Some(WritebackSummary {
                stats,
                final_sync: final_sync.map_err(|e| format!("{e:#}")),
                throttled: Duration::from_nanos(throttled_ns),
                throttle_slices: slices,
                max_dirty,
            })
        }
        None => None,
    };
    Ok(RunReport { outcome, elapsed, created_mem_file: backing.created(), dirty, writeback, tsc_khz, heatmap })
}

/// The API socket's path while no server owns it: removed when dropped
/// (the run failed or was stopped before it served the API).
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What a migration of this VM reads; none without dirty logging.
fn migration_source(
    control: &VcpuControl,
    harvester: &Option<Arc<Mutex<Harvester>>>,
    ram: &GuestRam,
    backing: &BackingFile,
    mem_size: u64,
) -> Option<MigrationSource> {
    let file = match backing.file().try_clone() {
        Ok(f) => Arc::new(f),
        Err(e) => {
            tracing::warn!("migration unavailable: cannot dup the memory file: {e}");
            return None;
        }
    };
    Some(MigrationSource {
        vcpus: control.clone(),
        harvester: harvester.clone()?,
        ram: ram.clone(),
        file,
        path: backing.path().to_path_buf(),
        mem_size,
    })
}

/// What writeback did over the run.
#[derive(Debug, Clone)]
pub struct WritebackSummary {
    /// Engine counters after the final sync.
    pub stats: WritebackStats,
    /// The final WB_SYNC_ALL + fdatasync: pages written, or why it failed.
    pub final_sync: Result<u64, String>,
    /// Time the vCPUs spent throttled.
    pub throttled: Duration,
    /// Throttle slices imposed.
    pub throttle_slices: u64,
    /// Most pages dirty after any flush.
    pub max_dirty: u64,
}

/// Kicks every vCPU out of KVM_RUN (they then honour a throttle).
fn kick_all(threads: &[JoinHandle<()>]) {
    for t in threads {
        if !t.is_finished() {
            let _ = t.kill(SIGRTMIN());
        }
    }
}

fn print_stats(
    dt: Duration,
    h: (&HarvestStats, &HarvestStats),
    w: Option<(&WritebackStats, &WritebackStats, Duration)>,
    throttled_ns: u64,
) {
    use std::io::Write as _;
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

/// Sets `stop` and kicks every vCPU thread out of KVM_RUN until it returns.
fn stop_vcpus(shared: &Shared, threads: Vec<JoinHandle<()>>) {
    shared.stop.store(true, Ordering::Release);
    for t in threads {
        // A signal that lands just before KVM_RUN is missed; keep kicking.
        while !t.is_finished() {
            if let Err(e) = t.kill(SIGRTMIN()) {
                tracing::warn!("kicking a vCPU thread: {e}");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if t.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}
