//! COM1's save and restore: its registers to and from the library's
//! [`UartState`], the form a snapshot's `state.json` and a migration's
//! `State` frame carry.

use std::io;

use smudge::machine_state::UartState;
use vm_superio::serial::SerialState;
use vm_superio::Serial;

use super::{IrqTrigger, SerialConsole};

/// A 16550's receive FIFO (vm-superio's size).
const FIFO_SIZE: usize = 64;

/// Why saved COM1 registers could not be put back (the UART keeps its
/// registers as they were).
#[derive(Debug, thiserror::Error)]
pub enum UartStateError {
    /// More received bytes than the FIFO holds: a corrupt state file.
    #[error("COM1 state: {0} bytes in a {FIFO_SIZE}-byte receive FIFO")]
    FifoOverflow(usize),
    /// The interrupt line could not be handed to the restored UART.
    #[error("COM1 state: cloning the interrupt eventfd failed")]
    Eventfd(#[source] io::Error),
    /// vm-superio refused the registers.
    #[error("COM1 state: vm-superio refused it: {0}")]
    Refused(String),
}

impl SerialConsole {
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
    pub fn set_state(&mut self, st: &UartState) -> Result<(), UartStateError> {
        if st.in_buffer.len() > FIFO_SIZE {
            return Err(UartStateError::FifoOverflow(st.in_buffer.len()));
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
        let trigger = IrqTrigger(self.uart.interrupt_evt().0.try_clone().map_err(UartStateError::Eventfd)?);
        let out = std::mem::replace(self.uart.writer_mut(), Box::new(io::sink()));
        match Serial::from_state(&state, trigger, vm_superio::serial::NoEvents, out) {
            Ok(u) => {
                self.uart = u;
                Ok(())
            }
            Err(e) => Err(UartStateError::Refused(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

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
        let e = b.set_state(&bad).unwrap_err();
        assert!(matches!(e, UartStateError::FifoOverflow(65)), "{e:?}");
        assert_eq!(e.to_string(), "COM1 state: 65 bytes in a 64-byte receive FIFO");
        assert_eq!(b.state(), st, "a refused state leaves the registers as they were");
    }
}
