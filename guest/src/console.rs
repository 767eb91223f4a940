//! Buffered serial console: text collects in a line buffer and leaves in one
//! `rep outsb` per line (a trap costs ~50 us here; never print per page).

use core::cell::UnsafeCell;
use core::fmt;

const CAP: usize = 1024;

/// The guest's only console.
pub struct Console {
    buf: [u8; CAP],
    len: usize,
}

impl Console {
    /// Sends what is buffered.
    pub fn flush(&mut self) {
        crate::io::serial_write(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == CAP {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
            if b == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}

struct Single(UnsafeCell<Console>);
// SAFETY: the guest runs one thread on one vCPU and takes no interrupts at CPL3.
unsafe impl Sync for Single {}

static CONSOLE: Single = Single(UnsafeCell::new(Console { buf: [0; CAP], len: 0 }));

/// The console. Single-threaded guest: callers never hold two at once
/// across a call that takes another (main and the panic handler only).
pub fn get() -> &'static mut Console {
    // SAFETY: one thread, no interrupts; see `Single`.
    unsafe { &mut *CONSOLE.0.get() }
}
