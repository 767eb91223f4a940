//! vCPUs: CPUID, the PVH entry state (32-bit protected mode, paging off,
//! `ebx` = start_info), and the run loop each vCPU thread executes.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_segment, KVM_EXIT_DIRTY_RING_FULL, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use smudge::harvest::Harvester;
use smudge::kvm::vcpu_state::{self, VcpuState, VcpuStateError};
use vmm_sys_util::eventfd::EventFd;

use crate::vm::boot::BootEntry;
use crate::vm::devices::{PortAction, PortBus};
use crate::vm::outcome::Outcome;

/// Why a vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed during setup.
    #[error("vCPU {id}: {op} failed")]
    Setup {
        /// vCPU index.
        id: u8,
        /// The ioctl.
        op: &'static str,
        /// Its error.
        #[source]
        source: std::io::Error,
    },
}

fn setup_err(id: u8, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |e| VcpuError::Setup { id, op, source: std::io::Error::from_raw_os_error(e.errno()) }
}

/// Creates vCPU `id` with the host's supported CPUID (APIC id patched in).
pub fn create(kvm: &Kvm, vm: &VmFd, id: u8) -> Result<VcpuFd, VcpuError> {
    let vcpu = vm.create_vcpu(u64::from(id)).map_err(setup_err(id, "KVM_CREATE_VCPU"))?;
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(setup_err(id, "KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(setup_err(id, "KVM_SET_CPUID2"))?;
    Ok(vcpu)
}

/// Puts the boot vCPU in the PVH entry state.
pub fn set_pvh_entry(vcpu: &VcpuFd, id: u8, boot: &BootEntry) -> Result<(), VcpuError> {
    let mut sregs = vcpu.get_sregs().map_err(setup_err(id, "KVM_GET_SREGS"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment { selector: 0x10, type_: 0x3, ..code };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(setup_err(id, "KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs { rip: boot.entry, rbx: boot.start_info, rflags: 0x2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(setup_err(id, "KVM_SET_REGS"))?;
    Ok(())
}

/// Most vCPUs a VM has (`--vcpus`).
pub const MAX_VCPUS: usize = 64;

/// What the vCPU threads and the main loop share.
pub struct Shared {
    /// Set when every vCPU must leave its loop.
    pub stop: AtomicBool,
    /// How the run ended (first writer wins).
    pub outcome: Mutex<Option<Outcome>>,
    /// Signalled when `outcome` is set.
    pub exit_evt: EventFd,
    /// Port devices.
    pub bus: PortBus,
    /// The dirty log, when on (a full dirty ring is harvested from the vCPU
    /// thread that hit it).
    pub harvester: Option<Arc<Mutex<Harvester>>>,
    /// Called on the vCPU thread at each guest sync point (benchmarks).
    pub on_sync: Option<SyncHook>,
    /// Time base for `throttle_until_ns`.
    pub epoch: Instant,
    /// vCPUs pause until this time (ns since `epoch`) when they next leave
    /// KVM_RUN: dirty memory is over the hard limit.
    pub throttle_until_ns: AtomicU64,
    /// vCPUs pause until this time (ns since `epoch`): a migration's
    /// auto-converge slows the guest so pre-copy can catch up. Apart from
    /// `throttle_until_ns`, which writeback releases when dirty memory falls.
    pub converge_until_ns: AtomicU64,
    /// Per vCPU: sleep until this time (ns since `epoch`) — a migration's
    /// dirty limit, for the vCPUs that dirty more than their share.
    pub vcpu_limit_until_ns: Vec<AtomicU64>,
    /// Total time vCPU threads spent throttled.
    pub throttled_ns: AtomicU64,
    /// The control API asked the vCPUs to pause.
    pause_requested: AtomicBool,
    /// An epoch boundary of the durable mode holds them: a flag of its
    /// own, so that neither it nor a pause by anyone else ends the other.
    boundary_requested: AtomicBool,
    /// vCPU threads waiting in the pause now.
    paused: AtomicUsize,
    /// When a vCPU thread last left a pause or a boundary's hold (ns since
    /// `epoch`): how long the guest took to run again.
    pub left_hold_ns: AtomicU64,
    /// A snapshot asks each paused vCPU for its state: slot `i` is filled
    /// by vCPU `i`'s own thread (only it may touch its fd).
    pub state_request: Mutex<Option<Vec<StateSlot>>>,
    /// Whether the VM has an in-kernel irqchip (LAPIC state to save).
    pub irqchip: bool,
    /// Guest RAM is still filling in (post-copy, lazy restore): the memory
    /// file does not hold all of it yet, so nothing may copy it from there.
    pub memory_loading: Arc<AtomicBool>,
    /// Test hook: the vCPU that reports this guest sync point asks for a
    /// pause there, as `ctl pause` would (`resume` lets the guest go on).
    pub pause_at_sync: Option<u32>,
}

/// One vCPU's answer to a state request: nothing yet, or its state (or why
/// it could not be read; shared, as the slots are cloned).
pub type StateSlot = Option<Result<VcpuState, Arc<VcpuStateError>>>;

/// A callback for guest sync points: the pass number and the harvester.
/// The vCPU that reached the sync point waits until it returns.
pub type SyncHook = Arc<dyn Fn(u32, Option<&Arc<Mutex<Harvester>>>) + Send + Sync>;

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("stop", &self.stop)
            .field("outcome", &self.outcome)
            .field("on_sync", &self.on_sync.is_some())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// New shared state.
    pub fn new(
        exit_evt: EventFd,
        bus: PortBus,
        harvester: Option<Arc<Mutex<Harvester>>>,
        on_sync: Option<SyncHook>,
        irqchip: bool,
    ) -> Self {
        Shared {
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            exit_evt,
            bus,
            harvester,
            on_sync,
            epoch: Instant::now(),
            throttle_until_ns: AtomicU64::new(0),
            converge_until_ns: AtomicU64::new(0),
            vcpu_limit_until_ns: (0..MAX_VCPUS).map(|_| AtomicU64::new(0)).collect(),
            throttled_ns: AtomicU64::new(0),
            pause_requested: AtomicBool::new(false),
            boundary_requested: AtomicBool::new(false),
            paused: AtomicUsize::new(0),
            left_hold_ns: AtomicU64::new(0),
            state_request: Mutex::new(None),
            irqchip,
            memory_loading: Arc::new(AtomicBool::new(false)),
            pause_at_sync: None,
        }
    }

    /// Asks the vCPUs to pause at their next exit (the caller kicks them).
    pub fn request_pause(&self) {
        self.pause_requested.store(true, Ordering::Release);
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.pause_requested.store(false, Ordering::Release);
    }

    /// Whether a pause is requested.
    pub fn is_paused(&self) -> bool {
        self.pause_requested.load(Ordering::Acquire)
    }

    /// vCPU threads parked in the pause now.
    pub fn paused_vcpus(&self) -> usize {
        self.paused.load(Ordering::Acquire)
    }

    /// Holds the vCPUs for an epoch boundary at their next exit (the
    /// caller kicks them), whoever else pauses or resumes them meanwhile.
    pub fn request_boundary(&self) {
        self.boundary_requested.store(true, Ordering::Release);
    }

    /// Ends the boundary's hold (a pause asked for by anyone else stays).
    pub fn end_boundary(&self) {
        self.boundary_requested.store(false, Ordering::Release);
    }

    /// Whether the vCPUs must stay parked: a pause or a boundary.
    fn held(&self) -> bool {
        self.pause_requested.load(Ordering::Acquire) || self.boundary_requested.load(Ordering::Acquire)
    }

    fn wait_while_paused(&self, id: u8, vcpu: &VcpuFd) {
        if !self.held() {
            return;
        }
        self.paused.fetch_add(1, Ordering::AcqRel);
        while self.held() && !self.stop.load(Ordering::Acquire) {
            {
                let mut req = self.state_request.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(slot) = req.as_mut().and_then(|v| v.get_mut(usize::from(id))) {
                    if slot.is_none() {
                        *slot = Some(vcpu_state::save(vcpu, id, self.irqchip).map_err(Arc::new));
                    }
                }
            }
            // Unparked at once by a resume or a state request; the timeout
            // covers a wake-up that came before the park.
            std::thread::park_timeout(Duration::from_millis(1));
        }
        self.left_hold_ns.fetch_max(self.epoch.elapsed().as_nanos() as u64, Ordering::AcqRel);
        self.paused.fetch_sub(1, Ordering::AcqRel);
    }

    /// Asks every vCPU to pause for `d` from now (the caller kicks them).
    pub fn throttle_for(&self, d: Duration) {
        let until = (self.epoch.elapsed() + d).as_nanos() as u64;
        self.throttle_until_ns.fetch_max(until, Ordering::AcqRel);
    }

    /// Asks every vCPU to sleep for `d` from now for a migration's
    /// auto-converge (the caller kicks them).
    pub fn converge_for(&self, d: Duration) {
        let until = (self.epoch.elapsed() + d).as_nanos() as u64;
        self.converge_until_ns.fetch_max(until, Ordering::AcqRel);
    }

    /// Asks vCPU `id` to sleep for `d` from now (a per-vCPU dirty limit;
    /// the caller kicks it).
    pub fn limit_vcpu_for(&self, id: usize, d: Duration) {
        if let Some(a) = self.vcpu_limit_until_ns.get(id) {
            a.fetch_max((self.epoch.elapsed() + d).as_nanos() as u64, Ordering::AcqRel);
        }
    }

    /// Ends an auto-converge throttle and every per-vCPU dirty limit.
    pub fn release_converge(&self) {
        self.converge_until_ns.store(0, Ordering::Release);
        for a in &self.vcpu_limit_until_ns {
            a.store(0, Ordering::Release);
        }
    }

    fn throttled_until(&self, id: u8) -> u64 {
        let own = self.vcpu_limit_until_ns.get(usize::from(id)).map_or(0, |a| a.load(Ordering::Acquire));
        self.throttle_until_ns.load(Ordering::Acquire).max(self.converge_until_ns.load(Ordering::Acquire)).max(own)
    }

    /// Ends a throttle early.
    pub fn release_throttle(&self) {
        self.throttle_until_ns.store(0, Ordering::Release);
    }

    /// Waits while a throttle is in force (called by vCPU threads between
    /// KVM_RUNs), in short steps so a release is seen at once.
    fn balance_dirty_pages(&self, id: u8) {
        // The common case, on every exit: no throttle, no clock read.
        if self.throttled_until(id) == 0 {
            return;
        }
        let t0 = self.epoch.elapsed();
        loop {
            let now = self.epoch.elapsed();
            let until = self.throttled_until(id);
            // A pause (a snapshot's or a migration's switchover) does not
            // wait for the throttle: the vCPU parks now, and throttles
            // again, if still asked to, once it resumes.
            if until <= now.as_nanos() as u64 || self.stop.load(Ordering::Acquire) || self.held() {
                break;
            }
            // Parked, not slept: `VcpuControl::pause` (`vcpu_control`) unparks at once.
            std::thread::park_timeout(
                Duration::from_nanos(until - now.as_nanos() as u64).min(Duration::from_millis(2)),
            );
        }
        let waited = self.epoch.elapsed() - t0;
        if waited > Duration::from_micros(100) {
            self.throttled_ns.fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// Records `o` as the run's ending (if none yet) and wakes the main loop.
    pub fn finish(&self, o: Outcome) {
        let mut g = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(o);
        }
        drop(g);
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.exit_evt.write(1) {
            tracing::error!("cannot signal the main loop: {e}");
        }
    }
}

enum Step {
    Continue,
    RingFull,
    Sync(u32),
    Stop(Outcome),
    UnknownPort(u16, bool),
    NeedRip(fn(u64) -> Outcome),
}

/// The vCPU thread body: runs until `shared.stop`, an exit or an error.
pub fn run_loop(mut vcpu: VcpuFd, id: u8, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::Acquire) {
        // The throttle first: it gives way to a pause, which then parks.
        shared.balance_dirty_pages(id);
        shared.wait_while_paused(id, &vcpu);
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let step = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => match shared.bus.write(port, data) {
                PortAction::Continue => Step::Continue,
                PortAction::GuestExit(s) => Step::Stop(Outcome::GuestExit(s)),
                PortAction::Sync(pass) => Step::Sync(pass),
                PortAction::Unknown => Step::UnknownPort(port, true),
            },
            Ok(VcpuExit::IoIn(port, data)) => match shared.bus.read(port, data) {
                PortAction::Unknown => Step::UnknownPort(port, false),
                _ => Step::Continue,
            },
            Ok(VcpuExit::MmioRead(addr, _)) => Step::Stop(Outcome::UnknownMmio { addr, write: false }),
            Ok(VcpuExit::MmioWrite(addr, _)) => Step::Stop(Outcome::UnknownMmio { addr, write: true }),
            Ok(VcpuExit::Shutdown) => Step::NeedRip(|rip| Outcome::TripleFault { rip }),
            Ok(VcpuExit::Hlt) => Step::NeedRip(|rip| Outcome::Halted { rip }),
            Ok(VcpuExit::Intr) => Step::Continue,
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => Step::RingFull,
            Ok(VcpuExit::FailEntry(reason, cpu)) => Step::Stop(Outcome::KvmFailure(format!(
                "vCPU {id}: KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on host cpu {cpu}"
            ))),
            Ok(VcpuExit::InternalError) => {
                Step::Stop(Outcome::KvmFailure(format!("vCPU {id}: KVM_EXIT_INTERNAL_ERROR (emulation failed?)")))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                Step::Stop(Outcome::KvmFailure(format!("vCPU {id}: guest system event {kind} (reset or shutdown)")))
            }
            Ok(other) => Step::Stop(Outcome::KvmFailure(format!("vCPU {id}: unhandled exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR => {
                vcpu.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) if e.errno() == libc::EAGAIN => Step::Continue,
            Err(e) => Step::Stop(Outcome::KvmFailure(format!("vCPU {id}: KVM_RUN: {e}"))),
        };
        let rip = || vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
        match step {
            Step::Continue => {}
            Step::Sync(pass) => {
                if let Some(f) = &shared.on_sync {
                    f(pass, shared.harvester.as_ref());
                }
                if shared.pause_at_sync == Some(pass) {
                    // Every write of the pass is done: the guest is held
                    // right after them (the next loop turn parks here).
                    shared.request_pause();
                    tracing::info!("test hook: the guest reached sync point {pass}; vCPUs paused");
                }
            }
            Step::RingFull => {
                let r = match &shared.harvester {
                    Some(h) => h.lock().unwrap_or_else(|p| p.into_inner()).on_ring_full().map_err(|e| e.to_string()),
                    None => Err("dirty ring full but no harvester".to_string()),
                };
                if let Err(e) = r {
                    return shared.finish(Outcome::KvmFailure(format!("vCPU {id}: dirty ring full: {e}")));
                }
            }
            Step::Stop(o) => return shared.finish(o),
            Step::UnknownPort(port, write) => return shared.finish(Outcome::UnknownPort { port, write, rip: rip() }),
            Step::NeedRip(f) => return shared.finish(f(rip())),
        }
    }
}
