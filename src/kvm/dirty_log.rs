//! KVM's dirty-log controls the crates lack: capability probing, manual
//! protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` + `KVM_CLEAR_DIRTY_LOG`),
//! enabling the dirty ring and `KVM_RESET_DIRTY_RINGS`.

use std::io;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};

use self::nr::{KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};
use super::Slot;

/// The ioctl numbers kvm-ioctls does not define.
#[allow(missing_docs)]
mod nr {
    use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log, KVMIO};
    use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}

/// What this KVM offers for dirty logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirtyCaps {
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` flags (0: unsupported).
    pub manual_protect: u32,
    /// Largest dirty ring per vCPU in bytes (0: unsupported).
    pub ring_max_bytes: u32,
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (ring with acquire/release ordering).
    pub ring_acq_rel: bool,
}

impl DirtyCaps {
    /// Asks the VM.
    pub fn probe(vm: &VmFd) -> Self {
        let int = |cap: u32| vm.check_extension_raw(u64::from(cap)).max(0) as u32;
        let acq_rel = int(KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
        DirtyCaps {
            manual_protect: int(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
            ring_max_bytes: if acq_rel > 0 { acq_rel } else { int(KVM_CAP_DIRTY_LOG_RING) },
            ring_acq_rel: acq_rel > 0,
        }
    }
}

fn errno(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// Turns on manual protect: `KVM_GET_DIRTY_LOG` then only reads, and pages
/// are re-protected by [`clear_dirty_log`]. `initially_set` starts with
/// every page dirty and writable (`KVM_DIRTY_LOG_INITIALLY_SET`).
pub fn enable_manual_protect(vm: &VmFd, initially_set: bool) -> io::Result<()> {
    let mut cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
    cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        | if initially_set { u64::from(KVM_DIRTY_LOG_INITIALLY_SET) } else { 0 };
    vm.enable_cap(&cap).map_err(errno)
}

/// Turns on the dirty ring, `bytes` per vCPU; must precede vCPU creation.
pub fn enable_ring(vm: &VmFd, bytes: u32, acq_rel: bool) -> io::Result<()> {
    let mut cap = kvm_enable_cap {
        cap: if acq_rel { KVM_CAP_DIRTY_LOG_RING_ACQ_REL } else { KVM_CAP_DIRTY_LOG_RING },
        ..Default::default()
    };
    cap.args[0] = u64::from(bytes);
    vm.enable_cap(&cap).map_err(errno)
}

/// `KVM_GET_DIRTY_LOG` for `slot` into `buf` (resized to the slot's
/// words, reused across calls: no allocation per harvest). With manual
/// protect it only reads.
pub fn get_dirty_log_into(vm: &VmFd, slot: &Slot, page_size: u64, buf: &mut Vec<u64>) -> io::Result<()> {
    let words = (slot.size.div_ceil(page_size)).div_ceil(64) as usize;
    buf.resize(words, 0);
    let arg = kvm_dirty_log {
        slot: slot.slot,
        padding1: 0,
        __bindgen_anon_1: kvm_bindings::kvm_dirty_log__bindgen_ty_1 { dirty_bitmap: buf.as_mut_ptr().cast() },
    };
    // SAFETY: `buf` holds one bit per page of the slot (KVM writes exactly
    // that many, rounded up to 64-bit words) and outlives the call.
    let r = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `KVM_CLEAR_DIRTY_LOG`: clears and write-protects the pages of `slot`
/// whose bits are set in `bitmap`, starting at page `first_page` (a
/// multiple of 64) for `num_pages` pages (a multiple of 64, or up to the
/// slot's end).
pub fn clear_dirty_log(vm: &VmFd, slot: &Slot, first_page: u64, num_pages: u32, bitmap: &[u64]) -> io::Result<()> {
    if !first_page.is_multiple_of(64) || bitmap.len() < (num_pages as usize).div_ceil(64) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let arg = kvm_clear_dirty_log {
        slot: slot.slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_ptr() as *mut std::ffi::c_void,
        },
    };
    // SAFETY: `arg` points at `bitmap`, which holds at least num_pages bits
    // (checked above) and outlives the call; KVM only reads it.
    let r = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `KVM_RESET_DIRTY_RINGS`: re-protects the pages of every ring entry
/// marked harvested and recycles those entries.
pub fn reset_dirty_rings(vm: &VmFd) -> io::Result<u32> {
    // SAFETY: an argument-less ioctl on the VM fd.
    let r = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u32)
    }
}
