//! The machine state besides memory: every vCPU's registers and the
//! devices' registers, as one value. A snapshot writes it as its
//! `state.json` (`snapshot`), a migration sends it as its `State` frame
//! (`migration::frame`); both take it from here, so neither depends on the
//! other.
//!
//! This module holds the saved form only. Taking a device's registers and
//! putting them back is the device's own code, beside the device in the
//! VMM (its `persist` module), which converts to and from these types.

use serde::{Deserialize, Serialize};

use crate::kvm::vcpu_state::VcpuState;

/// The machine state besides memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    /// One per vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// The devices' registers.
    #[serde(default)]
    pub devices: DeviceState,
}

/// Device state that a snapshot or a migration carries (the exit and sync
/// ports have none).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// COM1's registers (None: a snapshot from before they were saved; the
    /// UART starts at its reset values).
    pub com1: Option<UartState>,
}

/// A 16550's registers, as vm-superio's `SerialState` holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct UartState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}
