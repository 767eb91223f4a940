//! Loading a PVH ELF into guest memory (linux-loader) and writing what the
//! PVH boot protocol hands the guest: `hvm_start_info`, the memory map and
//! the command line. All writes go through vm-memory, so they are logged.

use std::io::Cursor;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Where start_info goes (Firecracker uses the same low pages).
pub const START_INFO_ADDR: u64 = 0x6000;
const MEMMAP_ADDR: u64 = 0x7000;
/// Where the command line goes, and its room.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
const CMDLINE_MAX: usize = 4096;
/// Guests load at or above 1 MiB.
const HIMEM_START: u64 = 0x10_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Low RAM ends where the legacy VGA/BIOS hole begins.
const LOW_RAM_END: u64 = 0xa_0000;

/// Why a guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Not an ELF, or a malformed one.
    #[error("not a loadable x86-64 ELF kernel: {0}")]
    Elf(String),
    /// An ELF without `XEN_ELFNOTE_PHYS32_ENTRY`.
    #[error("ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); smudge boots PVH kernels only")]
    NoPvhNote,
    /// Command line too long or containing NUL.
    #[error("guest command line is invalid: {0}")]
    Cmdline(String),
    /// Writing boot structures failed.
    #[error("writing PVH boot information failed: {0}")]
    Configure(String),
    /// The guest does not fit the memory.
    #[error("guest memory of {size:#x} bytes is too small: the kernel ends at {end:#x}")]
    TooSmall {
        /// RAM size.
        size: u64,
        /// End of the loaded kernel.
        end: u64,
    },
}

/// Where the loaded guest starts.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    /// 32-bit PVH entry point.
    pub entry: u64,
    /// Address of `hvm_start_info` (passed in `ebx`).
    pub start_info: u64,
    /// End of the loaded image (its last byte + 1, .bss included).
    pub kernel_end: u64,
}

/// The command line as the guest reads it (NUL-terminated), checked.
pub fn cmdline_bytes(cmdline: &str) -> Result<Vec<u8>, BootError> {
    if cmdline.len() >= CMDLINE_MAX || cmdline.contains('\0') {
        return Err(BootError::Cmdline(format!("{} bytes; at most {} and no NUL", cmdline.len(), CMDLINE_MAX - 1)));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    Ok(bytes)
}

/// The range [`load_pvh`] writes besides the image: start_info and the
/// memory map.
pub const BOOT_INFO_RANGE: (u64, u64) = (START_INFO_ADDR, 0x2000);

/// Loads `elf` (the image bytes) and writes the PVH boot information into
/// `ram` (any guest memory: the VMM loads into anonymous scratch memory,
/// then copies the touched ranges into the backing file).
pub fn load_pvh<M: GuestMemoryBackend>(ram: &M, elf: &[u8]) -> Result<BootEntry, BootError> {
    let (entry, kernel_end) = load_pvh_plain(ram, elf)?;

    let mut memmap = vec![
        hvm_memmap_table_entry { addr: 0, size: LOW_RAM_END, type_: E820_RAM, reserved: 0 },
        hvm_memmap_table_entry {
            addr: LOW_RAM_END,
            size: HIMEM_START - LOW_RAM_END,
            type_: E820_RESERVED,
            reserved: 0,
        },
    ];
    for r in ram.iter() {
        let start = r.start_addr().raw_value().max(HIMEM_START);
        let end = r.start_addr().raw_value() + r.len();
        if end > start {
            memmap.push(hvm_memmap_table_entry { addr: start, size: end - start, type_: E820_RAM, reserved: 0 });
        }
    }
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<M>(&params, ram).map_err(|e| BootError::Configure(e.to_string()))?;
    Ok(BootEntry { entry, start_info: START_INFO_ADDR, kernel_end })
}

/// Loads the ELF's segments into any guest memory; returns (PVH entry,
/// image end). Used for real and for a dry run before any file is made.
pub fn load_pvh_plain<M: GuestMemoryBackend>(mem: &M, elf: &[u8]) -> Result<(u64, u64), BootError> {
    let end = mem.iter().map(|r| r.start_addr().raw_value() + r.len()).max().unwrap_or(0);
    let loaded = Elf::load(mem, None, &mut Cursor::new(elf), Some(GuestAddress(HIMEM_START)))
        .map_err(|e| BootError::Elf(e.to_string()))?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => a.raw_value(),
        _ => return Err(BootError::NoPvhNote),
    };
    if loaded.kernel_end > end {
        return Err(BootError::TooSmall { size: end, end: loaded.kernel_end });
    }
    Ok((entry, loaded.kernel_end))
}

/// The guest-physical ranges the ELF's `PT_LOAD` segments occupy (memsz),
/// read straight from the program headers; malformed headers give an empty
/// list (the loader itself reports them).
pub fn load_ranges(elf: &[u8]) -> Vec<(u64, u64)> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| elf.get(o..o + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
    let u64_at = |o: usize| elf.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return Vec::new();
    };
    let mut v = Vec::new();
    for i in 0..usize::from(phnum) {
        let Some(h) = usize::try_from(phoff).ok().and_then(|o| o.checked_add(i * usize::from(phentsize))) else {
            break;
        };
        if let (Some(1), Some(paddr), Some(memsz)) = (u32_at(h), u64_at(h + 0x18), u64_at(h + 0x28)) {
            v.push((paddr, memsz));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_guest_load_ranges() {
        let r = load_ranges(crate::vm::guest_image::GUEST_ELF);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, guest_abi::IMAGE_BASE);
        assert!(r[0].1 > 0 && r[0].0 + r[0].1 <= guest_abi::STATE_BASE);
        assert!(load_ranges(b"not an elf").is_empty());
    }
}
