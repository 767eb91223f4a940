//! The guest's port I/O devices: COM1 (16550, vm-superio) and the exit port
//! (QEMU's isa-debug-exit convention). Anything else is an unknown port.
//! Each device saves and restores its own registers (its `persist`
//! module); [`persist`] assembles them into the machine state's devices.

pub mod persist;
pub mod serial;

use std::sync::Mutex;

use guest_abi::{COM1_PORT, EXIT_PORT, SYNC_PORT};

pub use serial::SerialConsole;

/// What a port access asks of the run loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAction {
    /// Handled; keep running.
    Continue,
    /// The guest wrote its exit status.
    GuestExit(u8),
    /// The guest reached a sync point (`sync=1`), with its pass number.
    Sync(u32),
    /// The port belongs to no device.
    Unknown,
}

/// Port-mapped devices shared by all vCPUs.
#[derive(Debug)]
pub struct PortBus {
    serial: Mutex<SerialConsole>,
}

impl PortBus {
    /// A bus with COM1 writing to `serial` and the exit port.
    pub fn new(serial: SerialConsole) -> Self {
        PortBus { serial: Mutex::new(serial) }
    }

    fn com1(port: u16) -> Option<u8> {
        (COM1_PORT..COM1_PORT + 8).contains(&port).then(|| (port - COM1_PORT) as u8)
    }

    /// An `out` (or `rep outs`: `data` may hold several elements).
    pub fn write(&self, port: u16, data: &[u8]) -> PortAction {
        if let Some(off) = Self::com1(port) {
            let mut s = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            s.write(off, data);
            PortAction::Continue
        } else if port == EXIT_PORT {
            PortAction::GuestExit(data.first().copied().unwrap_or(0))
        } else if port == SYNC_PORT {
            let mut v = [0u8; 4];
            let n = data.len().min(4);
            v[..n].copy_from_slice(&data[..n]);
            PortAction::Sync(u32::from_le_bytes(v))
        } else {
            PortAction::Unknown
        }
    }

    /// An `in`; fills `data`.
    pub fn read(&self, port: u16, data: &mut [u8]) -> PortAction {
        if let Some(off) = Self::com1(port) {
            let mut s = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            for b in data.iter_mut() {
                *b = s.read(off);
            }
            PortAction::Continue
        } else {
            PortAction::Unknown
        }
    }

    /// Flushes buffered serial output (at the end of a run).
    pub fn flush(&self) {
        self.serial.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}
