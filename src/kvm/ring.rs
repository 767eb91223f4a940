//! One vCPU's dirty ring: the `kvm_dirty_gfn` array KVM shares through the
//! vCPU fd at page offset `KVM_DIRTY_LOG_PAGE_OFFSET`. KVM pushes an entry
//! (flags = DIRTY) per newly dirtied page; we read entries in order, mark
//! each harvested (flags = RESET) and the caller then issues
//! `KVM_RESET_DIRTY_RINGS` before anyone reads the pages.
//!
//! ```text
//! entry i = fetch % entries:  u32 flags | u32 slot (as_id << 16 | id) | u64 offset (page in slot)
//! ```

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::VcpuFd;

const F_DIRTY: u32 = 1;
const F_RESET: u32 = 2;

/// A mapped dirty ring.
#[derive(Debug)]
pub struct DirtyRing {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    fetch: u32,
    bytes: usize,
}

// SAFETY: the ring is plain shared memory owned by this value; access is
// serialised by `&mut self` (the harvester holds it under a lock).
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `vcpu`, `bytes` long (as enabled on the VM).
    pub fn map(vcpu: &VcpuFd, bytes: u32, page_size: u64) -> io::Result<Self> {
        let offset = i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page_size as i64;
        // SAFETY: a fresh shared mapping of the vCPU fd's ring area; the
        // result is checked before use and unmapped only in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        let entries = bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32;
        Ok(DirtyRing { base, entries, fetch: 0, bytes: bytes as usize })
    }

    /// Entries in the ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Calls `f(slot, page_offset)` for each published entry in order and
    /// marks it harvested; returns how many. The caller must then call
    /// `reset_dirty_rings` before reading the pages.
    pub fn harvest(&mut self, mut f: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        loop {
            let i = (self.fetch % self.entries) as usize;
            // SAFETY: i < entries, inside the mapping; `flags` is a u32 KVM
            // updates concurrently, so it is only accessed atomically.
            let e = unsafe { self.base.as_ptr().add(i) };
            // SAFETY: as above; AtomicU32 has the layout of u32.
            let flags = unsafe { &*(std::ptr::addr_of_mut!((*e).flags) as *const AtomicU32) };
            if flags.load(Ordering::Acquire) & F_DIRTY == 0 {
                break;
            }
            // SAFETY: the acquire load above orders these reads after KVM's
            // publication of the entry.
            let (slot, offset) = unsafe {
                (std::ptr::addr_of!((*e).slot).read_volatile(), std::ptr::addr_of!((*e).offset).read_volatile())
            };
            f(slot, offset);
            flags.store(F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, used by nothing else.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
