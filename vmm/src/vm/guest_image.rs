//! The bundled tiny guest, built from `guest/` by the build script.

/// The guest ELF bytes.
pub static GUEST_ELF: &[u8] = include_bytes!(env!("GUEST_ELF"));

/// The command line the bundled guest runs when none is given: a short
/// random-write workload followed by a verify pass (well under a second).
pub const DEFAULT_CMDLINE: &str = "workload=random writes=20000 seed=42 verify=1";
