//! The devices' saved state: each device's own (COM1's in
//! [`super::serial::persist`]) assembled into the library's
//! [`DeviceState`], part of the machine state a snapshot or a migration
//! carries. The exit and sync ports have no state.

use smudge::machine_state::DeviceState;

use super::serial::persist::UartStateError;
use super::PortBus;

/// Why saved device state could not be put back.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// COM1's registers.
    #[error(transparent)]
    Com1(#[from] UartStateError),
}

impl PortBus {
    /// The devices' state, for a snapshot or a migration.
    pub fn state(&self) -> DeviceState {
        DeviceState { com1: Some(self.serial.lock().unwrap_or_else(|p| p.into_inner()).state()) }
    }

    /// Puts saved device state back (a restore or an incoming migration).
    pub fn set_state(&self, st: &DeviceState) -> Result<(), DeviceStateError> {
        if let Some(u) = &st.com1 {
            self.serial.lock().unwrap_or_else(|p| p.into_inner()).set_state(u)?;
        }
        Ok(())
    }
}
