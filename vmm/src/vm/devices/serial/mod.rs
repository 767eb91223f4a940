//! COM1: a vm-superio 16550 whose output goes to stdout or a file. Output is
//! flushed after each guest `out`/`rep outsb`, not per byte. Its saved
//! registers are [`persist`]'s.

pub mod persist;

use std::io::{self, Write};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// vm-superio's interrupt trigger, as an `EventFd` (wired to an irqfd when
/// the VM has an in-kernel irqchip).
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The serial port and its output.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    failed: bool,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").field("failed", &self.failed).finish()
    }
}

impl SerialConsole {
    /// A UART writing to `out`, raising `irq` on interrupts.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialConsole { uart: Serial::new(IrqTrigger(irq), out), failed: false }
    }

    /// Register write at `offset`; several bytes are several writes.
    pub fn write(&mut self, offset: u8, data: &[u8]) {
        for &b in data {
            if let Err(e) = self.uart.write(offset, b) {
                self.report(e);
            }
        }
        self.flush();
    }

    /// Register read at `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// Flushes the output.
    pub fn flush(&mut self) {
        if let Err(e) = self.uart.writer_mut().flush() {
            self.report(e);
        }
    }

    fn report(&mut self, e: impl std::fmt::Debug) {
        // Losing console output must not stop the guest; say it once.
        if !self.failed {
            tracing::warn!("serial output failed: {e:?}");
            self.failed = true;
        }
    }
}
