//! COM1: a vm-superio 16550 whose output goes to stdout or a file. Output is
//! flushed after each guest `out`/`rep outsb`, not per byte.

use std::io::{self, Write};

use smudge::snapshot::UartState;
use vm_superio::serial::SerialState;
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

/// A 16550's receive FIFO (vm-superio's size).
const FIFO_SIZE: usize = 64;

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

    /// The registers, for a snapshot.
    pub fn state(&self) -> UartState {
        let s = self.uart.state();
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Puts the registers back (a restore), keeping the output and the
    /// interrupt line. Fails on a receive buffer larger than a 16550's FIFO
    /// (a corrupt state file).
    pub fn set_state(&mut self, st: &UartState) -> Result<(), String> {
        if st.in_buffer.len() > FIFO_SIZE {
            return Err(format!("COM1 state: {} bytes in a {FIFO_SIZE}-byte receive FIFO", st.in_buffer.len()));
        }
        let state = SerialState {
            baud_divisor_low: st.baud_divisor_low,
            baud_divisor_high: st.baud_divisor_high,
            interrupt_enable: st.interrupt_enable,
            interrupt_identification: st.interrupt_identification,
            line_control: st.line_control,
            line_status: st.line_status,
            modem_control: st.modem_control,
            modem_status: st.modem_status,
            scratch: st.scratch,
            in_buffer: st.in_buffer.clone(),
        };
        let trigger = IrqTrigger(self.uart.interrupt_evt().0.try_clone().map_err(|e| format!("eventfd: {e}"))?);
        let out = std::mem::replace(self.uart.writer_mut(), Box::new(io::sink()));
        match Serial::from_state(&state, trigger, vm_superio::serial::NoEvents, out) {
            Ok(u) => {
                self.uart = u;
                Ok(())
            }
            Err(e) => Err(format!("COM1 state: {e:?}")),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn console() -> SerialConsole {
        SerialConsole::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), Box::new(io::sink()))
    }

    #[test]
    fn registers_survive_a_state_round_trip() {
        let mut a = console();
        a.write(7, &[0x5a]); // scratch
        a.write(3, &[0x83]); // LCR with DLAB
        a.write(0, &[0x0c]); // divisor low: 9600 baud
        a.write(3, &[0x03]); // 8N1
        a.write(1, &[0x01]); // IER: data ready
        let st = a.state();
        let mut b = console();
        b.set_state(&st).unwrap();
        assert_eq!(b.state(), st);
        assert_eq!((b.read(7), b.read(3), b.read(1)), (0x5a, 0x03, 0x01));
        let mut bad = st.clone();
        bad.in_buffer = vec![0; 65];
        assert_eq!(b.set_state(&bad).unwrap_err(), "COM1 state: 65 bytes in a 64-byte receive FIFO");
    }
}
