//! The KVM layer: opening the device with errors a user can act on, and
//! registering guest RAM as KVM memory slots with dirty logging. Every
//! `unsafe` KVM call of the project is in this module (and its children).

pub mod dirty_log;
pub mod ring;
pub mod tsc;
pub mod vcpu_state;

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestRam;

/// Why KVM could not be opened or set up.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node is missing.
    #[error("{path} does not exist: KVM is not available on this host (is the kvm module loaded, or is this a VM without nested virtualization?)")]
    Missing {
        /// Device path.
        path: PathBuf,
    },
    /// No permission to open the device.
    #[error("{path}: permission denied (run as root or add the user to the 'kvm' group)")]
    Permission {
        /// Device path.
        path: PathBuf,
    },
    /// The node opened but does not answer KVM ioctls.
    #[error("{path} is not a usable KVM device")]
    Unusable {
        /// Device path.
        path: PathBuf,
        /// The failing ioctl's error.
        #[source]
        source: io::Error,
    },
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] io::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("slot {slot}: registering {size:#x} bytes at guest {gpa:#x} failed")]
    SetRegion {
        /// Slot number.
        slot: u32,
        /// Guest physical address.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
}

/// Opens the KVM device at `path` (normally `/dev/kvm`) and checks that it
/// really is KVM.
pub fn open(path: &Path) -> Result<Kvm, KvmError> {
    let p = path.to_path_buf();
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| KvmError::Unusable { path: p.clone(), source: io::Error::from(io::ErrorKind::InvalidInput) })?;
    let kvm = Kvm::new_with_path(&c).map_err(|e| {
        let e = io::Error::from_raw_os_error(e.errno());
        match e.kind() {
            io::ErrorKind::NotFound => KvmError::Missing { path: p.clone() },
            io::ErrorKind::PermissionDenied => KvmError::Permission { path: p.clone() },
            _ => KvmError::Unusable { path: p.clone(), source: e },
        }
    })?;
    // KVM_GET_API_VERSION answers 12 on every KVM; anything else is not KVM.
    let v = kvm.get_api_version();
    if v != 12 {
        let source =
            if v < 0 { io::Error::from_raw_os_error(-v) } else { io::Error::other(format!("API version {v}")) };
        return Err(KvmError::Unusable {
            path: p,
            source: io::Error::new(source.kind(), format!("KVM_GET_API_VERSION: {source}")),
        });
    }
    Ok(kvm)
}

/// Creates a VM.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, KvmError> {
    kvm.create_vm().map_err(|e| KvmError::CreateVm(io::Error::from_raw_os_error(e.errno())))
}

/// One KVM memory slot backed by a guest RAM region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest physical address of the slot.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Registers every region of `ram` as a KVM slot (slot numbers from 0), with
/// `KVM_MEM_LOG_DIRTY_PAGES` when `log_dirty`.
pub fn register_ram(vm: &VmFd, ram: &GuestRam, log_dirty: bool) -> Result<Vec<Slot>, KvmError> {
    let mut slots = Vec::new();
    for (i, region) in ram.iter().enumerate() {
        let slot = Slot { slot: i as u32, gpa: region.start_addr().0, size: region.len() };
        let host = region.as_ptr() as u64;
        let r = kvm_userspace_memory_region {
            slot: slot.slot,
            flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: slot.gpa,
            memory_size: slot.size,
            userspace_addr: host,
        };
        // SAFETY: `host..host+size` is the mapping owned by `region`, which
        // lives in `ram`; the caller keeps `ram` alive as long as the VM
        // (the VMM drops the VmFd before the memory).
        unsafe { vm.set_user_memory_region(r) }.map_err(|e| KvmError::SetRegion {
            slot: slot.slot,
            gpa: slot.gpa,
            size: slot.size,
            source: io::Error::from_raw_os_error(e.errno()),
        })?;
        slots.push(slot);
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_named() {
        let e = open(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(e, KvmError::Missing { .. }));
        assert!(e.to_string().contains("/nonexistent/kvm does not exist"), "{e}");
    }

    #[test]
    fn non_kvm_device_is_unusable() {
        let e = open(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(e, KvmError::Unusable { .. }), "{e}");
    }
}
