//! Port I/O from CPL3: each `in`/`out` faults (#GP) and `boot.s`'s handler
//! performs it at CPL0; `rep outsb` moves a whole buffer in one trap.

use core::arch::asm;

use guest_abi::{COM1_PORT, EXIT_PORT};

/// Writes `buf` to COM1 with one `rep outsb`.
pub fn serial_write(buf: &[u8]) {
    if buf.is_empty() {
        return;
    }
    // SAFETY: `rep outsb` only reads `buf` (rsi, rcx bytes) and writes the
    // port; the #GP handler emulates it and advances rsi/rcx like the CPU.
    unsafe {
        asm!("rep outsb", inout("rsi") buf.as_ptr() => _, inout("rcx") buf.len() => _,
             in("dx") COM1_PORT, options(nostack, readonly, preserves_flags));
    }
}

/// Writes one byte to `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: an `out`, trapped and performed by the #GP handler.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nostack, nomem, preserves_flags));
    }
}

/// Writes a 32-bit value to `port`.
pub fn outl(port: u16, value: u32) {
    // SAFETY: an `out`, trapped and performed by the #GP handler.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, nomem, preserves_flags));
    }
}

/// Raises #UD (the fault handler exits with status 0x20 + 6).
pub fn ud2() {
    // SAFETY: ud2 faults; the handler never returns here.
    unsafe { asm!("ud2", options(nostack, nomem)) };
}

/// Triple-faults: points the TSS's RSP0 at an address the page tables do
/// not map (they map only the low 4 GiB, all of it user-writable), then
/// raises #UD. Delivering #UD from CPL3 must push on RSP0 and page-faults;
/// delivering that #PF faults the same way (#DF), and delivering #DF faults
/// once more: the CPU shuts down. Never returns.
pub fn triple_fault() -> ! {
    extern "C" {
        static mut tss: u8;
    }
    const UNMAPPED: u64 = 1 << 40;
    // SAFETY: RSP0 lives at byte 4 of the 64-bit TSS (unaligned, hence
    // write_unaligned); nothing after this point needs the kernel stack
    // again, since the CPU shuts down on the next exception.
    unsafe {
        let rsp0 = core::ptr::addr_of_mut!(tss).add(4).cast::<u64>();
        rsp0.write_unaligned(UNMAPPED);
    }
    ud2();
    exit(0xff)
}

/// Leaves the VM with `status` through the exit port; never returns.
pub fn exit(status: u8) -> ! {
    crate::console::get().flush();
    loop {
        outb(EXIT_PORT, status);
        core::hint::spin_loop();
    }
}

/// Reads the time-stamp counter (allowed at CPL3: CR4.TSD is clear).
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}
