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
