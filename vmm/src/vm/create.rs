//! The first two steps of a VM's life (see [`crate::vm`]): **planned** —
//! everything checked that can be without touching the memory file — and
//! **created** — memory mapped, the KVM VM made with its slots and vCPUs,
//! the guest's RAM loaded, the sandbox on and the vCPU threads waiting.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use smudge::harvest::{self, DirtyLogMode, Mechanism};
use smudge::kvm::dirty_log::DirtyCaps;
use smudge::kvm::{self, Slot};
use smudge::memory::{host_page_size, BackingFile, GuestRam};
use smudge::snapshot::MachineState;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::control::api;
use crate::vm::boot::{self, BootEntry};
use crate::vm::seccomp::{self, Filters};
use crate::vm::vcpu_threads::Waiting;
use crate::vm::{vcpu, IncomingVm, VmConfig, VmError, MIN_MEM};

/// Step 1: the run is possible. KVM is open and a boot's guest image is
/// loaded into scratch memory shaped like the real RAM (checked before any
/// file is made or touched); nothing is created yet.
pub(super) struct Planned {
    pub cfg: VmConfig,
    pub kvm: kvm_ioctls::Kvm,
    /// A fresh boot's guest, loaded into scratch (None: a restore or an
    /// incoming guest brings its own memory and state).
    boot: Option<(GuestMemoryMmap, BootEntry)>,
}

/// Step 2: the VM exists and its RAM holds the guest; no vCPU runs yet.
pub(super) struct Created {
    pub cfg: VmConfig,
    pub kvm: kvm_ioctls::Kvm,
    /// The API socket, bound (the server takes it when the VM runs).
    pub api_listener: Option<UnixListener>,
    /// Removes the socket if the run ends before the server owns it.
    pub socket_file: SocketFile,
    pub backing: BackingFile,
    pub ram: GuestRam,
    pub kvm_side: KvmSide,
    pub filters: Option<Arc<Filters>>,
    pub waiting: Waiting,
    /// A fresh boot's entry point.
    pub boot: Option<BootEntry>,
    /// The machine state an incoming guest arrived with.
    pub received: Option<MachineState>,
    /// When the guest's memory was in (the clock of the downtime logs).
    pub t_received: Instant,
}

/// The KVM objects of a VM, made on a thread of their own.
pub(super) struct KvmSide {
    pub vm: Arc<kvm_ioctls::VmFd>,
    pub mechanism: Option<Mechanism>,
    pub rings: Vec<smudge::kvm::ring::DirtyRing>,
    pub irqchip: bool,
    pub slots: Vec<Slot>,
    pub vcpus: Vec<kvm_ioctls::VcpuFd>,
    pub tsc_khz: Option<u32>,
}

/// What the KVM side needs to know.
#[derive(Debug, Clone)]
struct KvmPlan {
    vcpus: u8,
    dirty_log: Option<DirtyLogMode>,
    ring_bytes: u32,
    hide_caps: Vec<String>,
}

/// The API socket's path while no server owns it: removed when dropped
/// (the run failed or was stopped before it served the API).
pub(super) struct SocketFile(pub Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What the guest-loading side of [`Planned::create`] produced: the
/// sandbox and the waiting vCPU threads, and an incoming guest's state.
type Loaded = (Result<(Option<Arc<Filters>>, Waiting), VmError>, Result<Option<MachineState>, VmError>);

impl Planned {
    /// Checks what can be checked before any file is touched.
    pub fn check(cfg: VmConfig, incoming: bool) -> Result<Planned, VmError> {
        if cfg.mem_size < MIN_MEM {
            return Err(VmError::MemTooSmall { size: cfg.mem_size, min: MIN_MEM });
        }
        let kvm = kvm::open(&cfg.kvm_dev)?;
        // A fresh boot loads the guest (into scratch first: it is checked before
        // any file is touched); a restore brings its own memory and state.
        let boot = match &cfg.restore {
            None if incoming => None,
            None => Some(load_into_scratch(&cfg.guest_elf, cfg.mem_size)?),
            Some(state) if state.vcpus.len() != usize::from(cfg.vcpus) => {
                return Err(VmError::Runtime(format!(
                    "snapshot has {} vCPUs, asked for {}",
                    state.vcpus.len(),
                    cfg.vcpus
                )))
            }
            Some(_) => None,
        };
        tracing::debug!("dry run done");
        Ok(Planned { cfg, kvm, boot })
    }

    /// Binds the API socket, maps the memory file and sets KVM up while the
    /// guest's RAM is loaded (a boot's image copied in, or an incoming
    /// guest received).
    pub fn create(self, incoming: Option<&mut Box<dyn IncomingVm>>) -> Result<Created, VmError> {
        let Planned { cfg, kvm, boot } = self;
        let api_listener = cfg.api_sock.as_deref().map(api::bind).transpose()?;
        // Removed if the run ends before the API server owns it.
        let socket_file = SocketFile(cfg.api_sock.clone().filter(|_| api_listener.is_some()));
        let backing = open_memory(&cfg, boot.is_some())?;
        let ram = backing.map(cfg.hugepages)?;
        tracing::debug!("mapped");
        // KVM_SET_USER_MEMORY_REGION costs ~6 ms here whatever the size (a
        // fixed cost in the kernel); load the guest meanwhile.
        let (kvm_side, (sandbox, received)) = std::thread::scope(|s| {
            let plan = KvmPlan {
                vcpus: cfg.vcpus,
                dirty_log: cfg.dirty_log,
                ring_bytes: cfg.ring_entries.saturating_mul(16),
                hide_caps: cfg.hide_caps.clone(),
            };
            let (kvm_ref, ram_ref) = (&kvm, &ram);
            let kvm_side = s.spawn(move || setup_kvm(kvm_ref, ram_ref, plan));
            let loaded = load_guest(&cfg, boot.as_ref().map(|(scratch, _)| scratch), &backing, &ram, incoming);
            (kvm_side.join(), loaded)
        });
        let (filters, waiting) = sandbox?;
        let kvm_side = kvm_side.map_err(|_| VmError::Runtime("KVM setup thread panicked".into()))??;
        let received = received?;
        Ok(Created {
            cfg,
            kvm,
            api_listener,
            socket_file,
            backing,
            ram,
            kvm_side,
            filters,
            waiting,
            boot: boot.map(|(_, entry)| entry),
            received,
            t_received: Instant::now(),
        })
    }
}

/// The file guest RAM lives in: the memory file itself, or a memfd
/// (`ram_in_memfd`), which a boot fills from the memory file, if there is
/// one (the RAM the last run left in it).
fn open_memory(cfg: &VmConfig, boots: bool) -> Result<BackingFile, VmError> {
    if !cfg.ram_in_memfd {
        return Ok(BackingFile::open_or_create(&cfg.mem_file, cfg.mem_size)?);
    }
    let memfd = BackingFile::memfd("smudge-guest-ram", cfg.mem_size)?;
    if boots && cfg.mem_file.exists() {
        memfd.load_image(&cfg.mem_file)?;
    }
    Ok(memfd)
}

/// The guest-loading side of [`Planned::create`], beside the KVM setup.
///
/// Seccomp: the VMM filter goes on this thread while KVM is set up (off
/// the boot's critical path; the setup thread, which ends before the guest
/// runs, is the only one without it): after copying a boot's own image,
/// before reading an incoming guest, and before any other thread starts,
/// so they all inherit it. vCPUs and the flusher add their own. The vCPU
/// threads start right after the filter, and wait.
fn load_guest(
    cfg: &VmConfig,
    scratch: Option<&GuestMemoryMmap>,
    backing: &BackingFile,
    ram: &GuestRam,
    incoming: Option<&mut Box<dyn IncomingVm>>,
) -> Loaded {
    let install = || {
        let filters = match cfg.seccomp {
            false => None,
            true => Some(
                Filters::new(&seccomp::Context::current())
                    .and_then(|f| f.install_vmm().map(|_| Arc::new(f)))
                    .map_err(|e| VmError::Runtime(e.to_string()))?,
            ),
        };
        let waiting = Waiting::spawn(cfg.vcpus, filters.clone(), cfg.seccomp_selftest)
            .map_err(|e| VmError::Runtime(format!("spawning vCPU threads: {e}")))?;
        Ok::<_, VmError>((filters, waiting))
    };
    match (scratch, incoming) {
        (Some(scratch), _) => {
            let copied = copy_boot_image(scratch, backing, ram, &cfg.guest_elf);
            (install(), copied.map(|_| None))
        }
        (None, Some(inc)) => match install() {
            Ok(f) => (Ok(f), inc.receive(backing.file(), backing.path(), ram).map(Some).map_err(VmError::from)),
            Err(e) => (Err(e), Ok(None)),
        },
        (None, None) => (install(), Ok(None)),
    }
}

/// Loads the guest into anonymous scratch memory shaped like the real RAM:
/// this checks the image before any file is made or touched, and gives the
/// bytes to copy into the backing file.
fn load_into_scratch(elf: &[u8], size: u64) -> Result<(GuestMemoryMmap, BootEntry), VmError> {
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
