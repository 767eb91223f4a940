//! How a run ended, and the process exit code for each ending.

use std::fmt;
use std::time::Duration;

/// Exit code for a setup or usage error (bad flags, missing files, no KVM).
pub const EXIT_SETUP: u8 = 100;
/// The guest touched a port or MMIO address no device owns.
pub const EXIT_UNKNOWN_IO: u8 = 101;
/// The guest triple-faulted, shut down or halted for good.
pub const EXIT_GUEST_CRASH: u8 = 102;
/// The guest did not exit before `--timeout`.
pub const EXIT_TIMEOUT: u8 = 103;
/// KVM reported an internal error or failed to enter the guest.
pub const EXIT_KVM: u8 = 104;
/// The guest ran, but the final writeback of its memory failed (the data
/// is still in the page cache; see the message).
pub const EXIT_WRITEBACK: u8 = 105;

/// Memory the running guest still needed could not be had: a post-copy
/// source or its link was lost, or a lazy restore found a corrupt chunk.
/// The guest cannot continue.
pub const EXIT_MEMORY_LOST: u8 = 107;

/// SIGTERM or SIGINT stopped the run cleanly, as `ctl stop` does: the
/// guest paused for good, the final writeback sync ran (a failed one
/// gives [`EXIT_WRITEBACK`] instead), the API socket and staging files
/// are gone; a migration or live snapshot in flight was abandoned (the
/// source keeps its guest). Also when the signal came before the guest
/// ran: `restore` and `migrate-recv` then remove the memory file they
/// made. Not 0, so a script can tell a stop from a guest that finished;
/// not 128+15, so a service manager can tell it from a kill.
pub const EXIT_SIGNALLED: u8 = 108;

/// A second SIGTERM or SIGINT came while the first one's stop was under
/// way: smudge exited at once, as a kill would, without the final sync
/// (the memory file holds what the page cache had; a snapshot in
/// progress is left without its manifest, so it is no snapshot).
pub const EXIT_SECOND_SIGNAL: u8 = 109;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote its status to the exit port.
    GuestExit(u8),
    /// A port no device owns.
    UnknownPort {
        /// The port.
        port: u16,
        /// `out` (true) or `in`.
        write: bool,
        /// Guest rip.
        rip: u64,
    },
    /// An MMIO address no device owns.
    UnknownMmio {
        /// Guest physical address.
        addr: u64,
        /// Write (true) or read.
        write: bool,
    },
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    TripleFault {
        /// Guest rip.
        rip: u64,
    },
    /// HLT with no way to wake (no in-kernel irqchip).
    Halted {
        /// Guest rip.
        rip: u64,
    },
    /// The timeout passed.
    Timeout(Duration),
    /// KVM failed.
    KvmFailure(String),
    /// The control API asked the run to stop.
    Stopped,
    /// The guest was migrated to another smudge and runs there now.
    Migrated(String),
    /// SIGTERM or SIGINT (the signal number) stopped the run.
    Signalled(i32),
    /// The journal could not be written (`--journal`); its committed
    /// epochs are intact.
    JournalFailed(String),
}

impl Outcome {
    /// The process exit code: the guest's own status, or one of the
    /// `EXIT_*` codes above.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::GuestExit(s) => *s,
            Outcome::UnknownPort { .. } | Outcome::UnknownMmio { .. } => EXIT_UNKNOWN_IO,
            Outcome::TripleFault { .. } | Outcome::Halted { .. } => EXIT_GUEST_CRASH,
            Outcome::Timeout(_) => EXIT_TIMEOUT,
            Outcome::KvmFailure(_) => EXIT_KVM,
            Outcome::Stopped | Outcome::Migrated(_) => 0,
            Outcome::Signalled(_) => EXIT_SIGNALLED,
            Outcome::JournalFailed(_) => EXIT_WRITEBACK,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::GuestExit(0) => write!(f, "guest exited with status 0"),
            Outcome::GuestExit(s) => write!(f, "guest exited with status {s}{}", guest_status_meaning(*s)),
            Outcome::UnknownPort { port, write, rip } => write!(
                f,
                "guest {} unknown I/O port {port:#x} at rip {rip:#x}; stopped",
                if *write { "wrote to" } else { "read from" }
            ),
            Outcome::UnknownMmio { addr, write } => write!(
                f,
                "guest {} unmapped MMIO address {addr:#x}; stopped",
                if *write { "wrote to" } else { "read from" }
            ),
            Outcome::TripleFault { rip } => write!(f, "guest triple-faulted (KVM_EXIT_SHUTDOWN) at rip {rip:#x}"),
            Outcome::Halted { rip } => {
                write!(f, "guest halted with nothing to wake it at rip {rip:#x}")
            }
            Outcome::Timeout(d) => write!(f, "guest still running after the {:.1} s timeout; stopped", d.as_secs_f64()),
            Outcome::KvmFailure(m) => write!(f, "KVM failure: {m}"),
            Outcome::Stopped => write!(f, "stopped by the control API"),
            Outcome::Migrated(to) => write!(f, "guest migrated to {to}; it runs there now"),
            Outcome::Signalled(s) => write!(f, "stopped by {}", smudge::stop_signal::name(*s)),
            Outcome::JournalFailed(m) => write!(f, "journal failed: {m}; stopped"),
        }
    }
}

fn guest_status_meaning(s: u8) -> String {
    use guest_abi::status::*;
    match s {
        VERIFY_FAILED => " (bundled guest: verify found mismatching pages)".into(),
        BAD_CMDLINE => " (bundled guest: bad command line)".into(),
        PANIC => " (bundled guest: panic)".into(),
        NO_MEMORY => " (bundled guest: working set does not fit in RAM)".into(),
        LAYOUT_MISMATCH => " (bundled guest: verify asked for another working-set layout than memory holds)".into(),
        s if (EXCEPTION_BASE..EXCEPTION_BASE + 32).contains(&s) => {
            format!(" (bundled guest: CPU exception {})", s - EXCEPTION_BASE)
        }
        _ => String::new(),
    }
}
