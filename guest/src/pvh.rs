//! Reading the PVH `hvm_start_info` the loader left for us: the command line
//! and the memory map (identity-mapped, so physical addresses are pointers).

use guest_abi::{RamMap, MAPPED_LIMIT, STATE_BASE};

/// `hvm_start_info.magic`.
const START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

/// What the guest takes from the boot information.
pub struct StartInfo {
    /// The kernel command line ("" if none).
    pub cmdline: &'static str,
    /// The RAM the memory map gives, clamped to what the page tables can
    /// map ([`guest_abi::MAPPED_LIMIT`]).
    pub ram: RamMap,
}

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: addresses come from the loader's start_info and lie in RAM,
    // which the page tables identity-map (U/S=1).
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

impl StartInfo {
    /// Parses start_info at physical address `at`.
    pub fn read(at: u64) -> Result<StartInfo, &'static str> {
        if at == 0 || rd::<u32>(at) != START_MAGIC {
            return Err("no PVH start_info (bad magic)");
        }
        let version: u32 = rd(at + 4);
        let cmdline_paddr: u64 = rd(at + 24);
        let cmdline = if cmdline_paddr == 0 {
            ""
        } else {
            let mut n = 0usize;
            while n < 4096 && rd::<u8>(cmdline_paddr + n as u64) != 0 {
                n += 1;
            }
            // SAFETY: n bytes at cmdline_paddr were just read; they stay put.
            let bytes = unsafe { core::slice::from_raw_parts(cmdline_paddr as *const u8, n) };
            core::str::from_utf8(bytes).map_err(|_| "command line is not UTF-8")?
        };
        let mut low_end = 0u64;
        let mut high: Option<(u64, u64)> = None;
        if version >= 1 {
            let map: u64 = rd(at + 40);
            let entries: u32 = rd(at + 48);
            for i in 0..entries as u64 {
                let e = map + i * 24;
                let (addr, size, kind) = (rd::<u64>(e), rd::<u64>(e + 8), rd::<u32>(e + 16));
                let end = addr.saturating_add(size).min(MAPPED_LIMIT);
                if kind != E820_RAM || end <= addr {
                    continue;
                }
                if addr <= STATE_BASE && end > STATE_BASE {
                    low_end = end;
                } else if addr > STATE_BASE && high.is_none_or(|(s, _)| addr < s) {
                    // The lowest region above the one holding the state
                    // area: RAM past the 32-bit hole.
                    high = Some((addr, end));
                }
            }
        }
        if low_end == 0 {
            return Err("memory map has no RAM at 2 MiB (start_info version < 1?)");
        }
        Ok(StartInfo { cmdline, ram: RamMap { low_end, high } })
    }
}
