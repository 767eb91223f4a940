//! Mapping RAM above 4 GiB. `boot.s` maps the low 4 GiB at link time; RAM
//! past the 32-bit hole gets its page directories here, at CPL3 (natively:
//! CPL0 is emulated on this machine's KVM), one per GiB the memory map
//! reports, out of those `boot.s` reserves (`pd_high`, not loaded).

use core::ptr::addr_of_mut;

use guest_abi::{HIGH_PAGE_DIRECTORIES, HIGH_RAM_BASE};

/// A 2 MiB page: present, writable, user, large.
const LARGE_PAGE: u64 = 0x87;
/// A page-directory pointer: present, writable, user.
const TABLE: u64 = 0x7;
const GIB: u64 = 1 << 30;
const ENTRIES: usize = 512;

extern "C" {
    static mut pdpt: [u64; ENTRIES];
    static mut pd_high: [[u64; ENTRIES]; HIGH_PAGE_DIRECTORIES as usize];
}

/// Identity-maps `[4 GiB, end)` (rounded up to whole GiB, at most
/// [`guest_abi::MAPPED_LIMIT`]) with 2 MiB pages.
pub fn map_high(end: u64) {
    let dirs = end.saturating_sub(HIGH_RAM_BASE).div_ceil(GIB).min(HIGH_PAGE_DIRECTORIES);
    let first = (HIGH_RAM_BASE / GIB) as usize;
    for d in 0..dirs as usize {
        let at = HIGH_RAM_BASE + d as u64 * GIB;
        // `pd_high` and `pdpt` are the guest's own page tables in its image,
        // identity-mapped writable at CPL3. This boot's `pdpt` comes fresh
        // from the image with entries 4 and up empty; stores are ordered on
        // x86, and a not-present entry becoming present needs no TLB flush.
        // SAFETY: directory `d` of the guest's own page tables is filled while unlinked (no live mapping changes), then linked.
        unsafe {
            let pd = addr_of_mut!(pd_high).cast::<u64>().add(d * ENTRIES);
            for k in 0..ENTRIES {
                pd.add(k).write_volatile((at + ((k as u64) << 21)) | LARGE_PAGE);
            }
            addr_of_mut!(pdpt).cast::<u64>().add(first + d).write_volatile(pd as u64 | TABLE);
        }
    }
}
