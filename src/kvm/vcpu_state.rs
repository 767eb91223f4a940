//! A vCPU's architectural state, saved and restored as plain serde data:
//! registers, segment and control registers, FPU/SSE, the MSRs a guest may
//! rely on (the TSC first, so time continues where KVM honours that: see
//! [`super::tsc`]), the local APIC, the MP state and pending events. (This
//! KVM offers no XSAVE, so FPU state is the legacy `KVM_GET_FPU` area.)

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, Msrs};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// MSRs saved, in this order (KVM_GET_MSRS stops at the first it cannot
/// read; the TSC comes first).
pub const SAVED_MSRS: [u32; 12] = [
    0x10,        // IA32_TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x1a0,       // MISC_ENABLE
];

/// `kvm_fpu` as serde data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    fpr: Vec<[u8; 16]>,
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: Vec<[u8; 16]>,
    mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu { fcw: self.fcw, fsw: self.fsw, ftwx: self.ftwx, ..Default::default() };
        for (d, s) in f.fpr.iter_mut().zip(&self.fpr) {
            *d = *s;
        }
        for (d, s) in f.xmm.iter_mut().zip(&self.xmm) {
            *d = *s;
        }
        f.last_opcode = self.last_opcode;
        f.last_ip = self.last_ip;
        f.last_dp = self.last_dp;
        f.mxcsr = self.mxcsr;
        f
    }
}

/// Everything needed to continue a vCPU exactly where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u8,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU and SSE.
    pub fpu: FpuState,
    /// (index, value) of the MSRs in [`SAVED_MSRS`] KVM could read.
    pub msrs: Vec<(u32, u64)>,
    /// Local APIC registers.
    pub lapic: Option<kvm_lapic_state>,
    /// Runnable, halted, waiting for SIPI…
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
}

/// Why a vCPU's state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("vCPU {id}: {op} failed: {source}")]
pub struct VcpuStateError {
    /// vCPU index.
    pub id: u8,
    /// The ioctl.
    pub op: &'static str,
    /// The error.
    pub source: std::io::Error,
}

fn err(id: u8, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |e| VcpuStateError { id, op, source: std::io::Error::from_raw_os_error(e.errno()) }
}

/// Reads the state of a vCPU that is out of `KVM_RUN`.
pub fn save(vcpu: &VcpuFd, id: u8, irqchip: bool) -> Result<VcpuState, VcpuStateError> {
    let entries: Vec<kvm_msr_entry> =
        SAVED_MSRS.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError {
        id,
        op: "building the MSR list",
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let n = vcpu.get_msrs(&mut msrs).map_err(err(id, "KVM_GET_MSRS"))?;
    Ok(VcpuState {
        id,
        regs: vcpu.get_regs().map_err(err(id, "KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(err(id, "KVM_GET_SREGS"))?,
        fpu: FpuState::from(&vcpu.get_fpu().map_err(err(id, "KVM_GET_FPU"))?),
        msrs: msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)).collect(),
        lapic: if irqchip { Some(vcpu.get_lapic().map_err(err(id, "KVM_GET_LAPIC"))?) } else { None },
        mp_state: vcpu.get_mp_state().map_err(err(id, "KVM_GET_MP_STATE"))?,
        events: vcpu.get_vcpu_events().map_err(err(id, "KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Puts `state` into a freshly created vCPU (before it first runs).
pub fn restore(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    let id = state.id;
    vcpu.set_sregs(&state.sregs).map_err(err(id, "KVM_SET_SREGS"))?;
    vcpu.set_regs(&state.regs).map_err(err(id, "KVM_SET_REGS"))?;
    vcpu.set_fpu(&state.fpu.to_kvm()).map_err(err(id, "KVM_SET_FPU"))?;
    let entries: Vec<kvm_msr_entry> =
        state.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    if !entries.is_empty() {
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError {
            id,
            op: "building the MSR list",
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        let n = vcpu.set_msrs(&msrs).map_err(err(id, "KVM_SET_MSRS"))?;
        if n != entries.len() {
            return Err(VcpuStateError {
                id,
                op: "KVM_SET_MSRS",
                source: std::io::Error::other(format!("set {n} of {} MSRs", entries.len())),
            });
        }
    }
    if let Some(l) = &state.lapic {
        vcpu.set_lapic(l).map_err(err(id, "KVM_SET_LAPIC"))?;
    }
    vcpu.set_mp_state(state.mp_state).map_err(err(id, "KVM_SET_MP_STATE"))?;
    vcpu.set_vcpu_events(&state.events).map_err(err(id, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}
