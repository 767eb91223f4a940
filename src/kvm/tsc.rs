//! The guest's time-stamp counter across a restore: which of KVM's TSC
//! controls change the TSC a guest reads.
//!
//! A restored guest continues its clock only if the VMM can set the TSC the
//! guest reads to its value at the snapshot. KVM offers three ways, and
//! [`probe`] tries each on a throwaway one-vCPU VM whose guest is two
//! instructions (`rdtsc; hlt`, looped), comparing what the guest reads
//! before and after:
//!
//! ```text
//! control                                   what restore would do
//! KVM_SET_MSRS  IA32_TSC (0x10)             write the saved TSC (smudge does)
//! KVM_SET_MSRS  IA32_TSC_ADJUST (0x3b)      add (saved - now)
//! KVM_SET_DEVICE_ATTR KVM_VCPU_TSC_CTRL /   set the offset to (saved - host
//!               KVM_VCPU_TSC_OFFSET         TSC now)
//! ```
//!
//! Each is asked to move the guest's TSC back by ten seconds: it is
//! [`Effect::Honoured`] when the guest then reads that, [`Effect::Ignored`]
//! when it still reads the host's TSC.

use std::io;

use kvm_bindings::{kvm_device_attr, kvm_msr_entry, kvm_userspace_memory_region, Msrs, KVM_VCPU_TSC_CTRL};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::ioctl::ioctl_with_ref;

/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_ADJUST`.
pub const MSR_IA32_TSC_ADJUST: u32 = 0x3b;

mod ioctls {
    use kvm_bindings::{kvm_device_attr, KVMIO};
    use vmm_sys_util::ioctl_iow_nr;

    // kvm-ioctls offers the vCPU device-attribute calls on arm64 only.
    ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
    ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
    ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, KVMIO, 0xe3, kvm_device_attr);
}

/// What asking KVM to move the guest's TSC did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The guest reads the TSC asked for.
    Honoured,
    /// The call succeeded, but the guest still reads the host's TSC.
    Ignored,
    /// The guest's TSC moved, but not to where it was asked (by this many
    /// milliseconds off the request).
    Elsewhere(i64),
    /// KVM refused or does not offer the control.
    Unavailable,
}

/// What [`probe`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TscProbe {
    /// The vCPU's TSC frequency (`KVM_GET_TSC_KHZ`).
    pub tsc_khz: u32,
    /// Writing `IA32_TSC` with `KVM_SET_MSRS` (before the vCPU first runs,
    /// as a restore does).
    pub msr_tsc: Effect,
    /// Writing `IA32_TSC_ADJUST`.
    pub tsc_adjust: Effect,
    /// `KVM_VCPU_TSC_OFFSET` through the vCPU device attributes.
    pub offset_attr: Effect,
}

impl TscProbe {
    /// Whether any control lets a restore continue the guest's clock.
    pub fn can_continue_clock(&self) -> bool {
        [self.msr_tsc, self.tsc_adjust, self.offset_attr].contains(&Effect::Honoured)
    }
}

/// Why the probe VM could not be run.
#[derive(Debug, thiserror::Error)]
#[error("TSC probe: {op} failed")]
pub struct TscProbeError {
    /// The step.
    pub op: &'static str,
    /// The error.
    #[source]
    pub source: io::Error,
}

fn fail(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> TscProbeError {
    move |e| TscProbeError { op, source: io::Error::from_raw_os_error(e.errno()) }
}

/// Real-mode code at [`CODE`]: `rdtsc; hlt; jmp back`.
const LOOP: [u8; 5] = [0x0f, 0x31, 0xf4, 0xeb, 0xfb];
const CODE: u64 = 0x1000;
const MEM: usize = 0x1_0000;

/// A one-vCPU VM that reads its TSC each time it is run.
struct ProbeVm {
    vcpu: VcpuFd,
    // Dropped after the VM (declaration order): the slot points into it.
    _vm: VmFd,
    _mem: GuestMemoryMmap,
}

impl ProbeVm {
    fn new(kvm: &Kvm) -> Result<ProbeVm, TscProbeError> {
        let vm = kvm.create_vm().map_err(fail("KVM_CREATE_VM"))?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)])
            .map_err(|e| TscProbeError { op: "mapping probe memory", source: io::Error::other(e.to_string()) })?;
        mem.write_slice(&LOOP, GuestAddress(CODE))
            .map_err(|e| TscProbeError { op: "writing probe code", source: io::Error::other(e.to_string()) })?;
        let host = mem.iter().next().map(|r| r.as_ptr() as u64).unwrap_or(0);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: host,
        };
        // SAFETY: `host..host + MEM` is the anonymous mapping owned by
        // `mem`, which `ProbeVm` keeps and drops only after the VM.
        unsafe { vm.set_user_memory_region(region) }.map_err(fail("KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = vm.create_vcpu(0).map_err(fail("KVM_CREATE_VCPU"))?;
        let mut sregs = vcpu.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).map_err(fail("KVM_SET_SREGS"))?;
        let regs = kvm_bindings::kvm_regs { rip: CODE, rflags: 2, ..Default::default() };
        vcpu.set_regs(&regs).map_err(fail("KVM_SET_REGS"))?;
        Ok(ProbeVm { vcpu, _vm: vm, _mem: mem })
    }

    /// Runs the guest to its `hlt`; returns the TSC it read.
    fn guest_tsc(&mut self) -> Result<u64, TscProbeError> {
        match self.vcpu.run().map_err(fail("KVM_RUN"))? {
            VcpuExit::Hlt => {}
            other => {
                return Err(TscProbeError {
                    op: "KVM_RUN",
                    source: io::Error::other(format!("probe guest exited with {other:?}, not hlt")),
                })
            }
        }
        let r = self.vcpu.get_regs().map_err(fail("KVM_GET_REGS"))?;
        Ok((r.rdx << 32) | (r.rax & 0xffff_ffff))
    }

    fn set_msr(&self, index: u32, data: u64) -> bool {
        Msrs::from_entries(&[kvm_msr_entry { index, data, ..Default::default() }])
            .ok()
            .and_then(|m| self.vcpu.set_msrs(&m).ok())
            == Some(1)
    }

    /// `KVM_VCPU_TSC_OFFSET`, if this KVM has it.
    fn tsc_offset(&self) -> Option<u64> {
        let mut offset = 0u64;
        let attr = offset_attr(&mut offset);
        // SAFETY: both ioctls read `attr`, a valid kvm_device_attr; GET
        // writes one u64 to `attr.addr`, which is `offset`, alive and
        // exclusively borrowed until the call returns.
        let ok = unsafe {
            ioctl_with_ref(&self.vcpu, ioctls::KVM_HAS_DEVICE_ATTR(), &attr) == 0
                && ioctl_with_ref(&self.vcpu, ioctls::KVM_GET_DEVICE_ATTR(), &attr) == 0
        };
        ok.then_some(offset)
    }

    fn set_tsc_offset(&self, mut offset: u64) -> bool {
        let attr = offset_attr(&mut offset);
        // SAFETY: KVM reads one u64 from `attr.addr`, which is `offset`,
        // alive until the call returns.
        unsafe { ioctl_with_ref(&self.vcpu, ioctls::KVM_SET_DEVICE_ATTR(), &attr) == 0 }
    }
}

fn offset_attr(value: &mut u64) -> kvm_device_attr {
    kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: kvm_bindings::KVM_VCPU_TSC_OFFSET as u64,
        addr: value as *mut u64 as u64,
    }
}

/// Tries each TSC control on a throwaway VM (see the module docs).
pub fn probe(kvm: &Kvm) -> Result<TscProbe, TscProbeError> {
    let mut vm = ProbeVm::new(kvm)?;
    let tsc_khz = vm.vcpu.get_tsc_khz().map_err(fail("KVM_GET_TSC_KHZ"))?;
    let khz = u64::from(tsc_khz.max(1));
    let back = 10_000 * khz; // ten seconds of cycles
                             // What moving the guest's TSC from `before` to `want` did, read after.
    let judge = |before: u64, want: u64, after: u64| {
        let ms = |a: u64, b: u64| (a as i64).wrapping_sub(b as i64) / khz as i64;
        if ms(after, want).abs() < 1000 {
            Effect::Honoured
        } else if ms(after, before).abs() < 1000 {
            Effect::Ignored
        } else {
            Effect::Elsewhere(ms(after, want))
        }
    };

    // IA32_TSC on a vCPU that never ran, as a restore writes it.
    let mut fresh = ProbeVm::new(kvm)?;
    let before = vm.guest_tsc()?;
    let want = before.saturating_sub(back);
    let msr_tsc =
        if fresh.set_msr(MSR_IA32_TSC, want) { judge(before, want, fresh.guest_tsc()?) } else { Effect::Unavailable };

    let before = vm.guest_tsc()?;
    let tsc_adjust = if vm.set_msr(MSR_IA32_TSC_ADJUST, back.wrapping_neg()) {
        judge(before, before.wrapping_sub(back), vm.guest_tsc()?)
    } else {
        Effect::Unavailable
    };
    vm.set_msr(MSR_IA32_TSC_ADJUST, 0);

    let before = vm.guest_tsc()?;
    let offset_attr = match vm.tsc_offset() {
        Some(offset) if vm.set_tsc_offset(offset.wrapping_sub(back)) => {
            judge(before, before.wrapping_sub(back), vm.guest_tsc()?)
        }
        _ => Effect::Unavailable,
    };
    Ok(TscProbe { tsc_khz, msr_tsc, tsc_adjust, offset_attr })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs /dev/kvm (fails, never skips, without it).
    #[test]
    fn each_tsc_control_either_moves_the_guests_tsc_or_leaves_it() {
        let kvm = Kvm::new().expect("/dev/kvm: this test runs a probe VM");
        let p = probe(&kvm).expect("probe VM runs");
        eprintln!("{p:?}");
        assert!(p.tsc_khz > 0, "{p:?}");
        // A control that moves the TSC somewhere other than asked would
        // make a restored clock wrong rather than merely not continued.
        for e in [p.msr_tsc, p.tsc_adjust, p.offset_attr] {
            assert!(!matches!(e, Effect::Elsewhere(_)), "{p:?}");
        }
    }
}
