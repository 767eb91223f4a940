//! The durable mode's journal: an append-only log of *epochs*, each a
//! consistent point of a running guest — the pages it dirtied since the
//! epoch before, and its vCPU and device state at the boundary — from
//! which a crash at any instant recovers the newest committed epoch,
//! bit-exact, and never a state the guest was never in. The kernel's ext4
//! `data=journal`, one level up: data goes to the journal first, is
//! committed with `fdatasync`, and is checkpointed into its home (the
//! journal's base image) later.
//!
//! ```text
//! DIR/checkpoint.json   the journal's identity, RAM size, and the newest epoch
//!                       the base image holds ("base_epoch", "complete")
//! DIR/base.img          RAM at backing-file offsets as of base_epoch (sparse)
//! DIR/seg-<seq>.smj     segments: records back to back (format.rs)
//!                       segment-header, then epochs: begin, pages*, state, commit
//! ```
//!
//! Rules that make recovery sound:
//! - An epoch is *committed* once a `fdatasync` of its segment, issued
//!   after its commit record was written, has returned ([`Journal::sync`];
//!   several epochs may share one sync — group commit). A segment is
//!   synced before the next one is made, and a new segment's directory
//!   entry is synced before epochs go into it.
//! - Epoch numbers follow each other without gaps across segments. The
//!   first epoch of a journal holds every page with data; each later one
//!   the pages dirtied since its predecessor's boundary. So epoch N's RAM
//!   is the base plus epochs 1..=N applied in order, and nothing else.
//! - Recovery ([`scan`]) reads records in order and stops at the first one
//!   that is torn, fails a CRC or breaks the sequence; later bytes are
//!   never used.
//! - A checkpoint ([`Journal::checkpoint`]) first records in
//!   `checkpoint.json` the newest epoch it is about to write into the base
//!   (not complete), writes and syncs the base, records it complete, and
//!   only then removes the segments, oldest first. Replaying a leftover
//!   segment onto a base that already holds it is harmless: epochs are
//!   page images, applied in order.

pub mod cache;
pub mod delta;
pub mod format;
pub mod image;
pub mod recover;
pub mod replay;
pub mod writer;

use std::path::{Path, PathBuf};

pub use image::EpochPages;
pub use recover::{recover, scan, Checkpoint, EpochInfo, PageData, Recovered, Scan, ScanEnd, Target};
pub use writer::{BaseFailure, CheckpointReport, Journal, JournalOptions};

/// The checkpoint file's name in a journal directory.
pub const CHECKPOINT: &str = "checkpoint.json";
/// The base image's name in a journal directory.
pub const BASE: &str = "base.img";

/// A segment file's name for sequence number `seq`.
pub fn segment_name(seq: u64) -> String {
    format!("seg-{seq:016x}.smj")
}

/// Why a journal could not be written, read or recovered.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An I/O operation on a journal file failed.
    #[error("{}: {op}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The base image failed (EIO on its disk, ENOSPC …): written by a
    /// checkpoint (the segment stays in the journal and the checkpoint is
    /// tried again later), or read by a recovery (the journal is left as
    /// it was).
    #[error("{}: {op} of bytes {offset:#x}..{end:#x}", path.display())]
    Base {
        /// The base image.
        path: PathBuf,
        /// "write", "fdatasync" or "read".
        op: &'static str,
        /// The failed write's or read's offset, or the first byte the
        /// sync covered.
        offset: u64,
        /// Where the failed write or read, or the bytes the sync covered, end.
        end: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The directory holds no journal.
    #[error("{}: not a smudge journal (no {CHECKPOINT})", .0.display())]
    NotAJournal(PathBuf),
    /// A new journal was asked for in a directory that holds one.
    #[error("{}: already holds a journal (recover it with `smudge restore --journal`, or use another directory)", .0.display())]
    Exists(PathBuf),
    /// The checkpoint file does not parse or fails its checksum.
    #[error("{}: {why}", path.display())]
    BadCheckpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The surviving segments do not follow the base image.
    #[error("the journal lost epochs: the base holds epochs up to {base}, the first segment starts at {first}")]
    Gap {
        /// The base's newest epoch.
        base: u64,
        /// The first epoch found in a segment.
        first: u64,
    },
    /// No committed epoch to recover.
    #[error("{}: no committed epoch to recover", .0.display())]
    NoEpoch(PathBuf),
    /// The epoch asked for is not retained.
    #[error("epoch {want} is not retained: the journal holds epochs {oldest}..={newest}")]
    NotRetained {
        /// Asked for.
        want: u64,
        /// Oldest recoverable.
        oldest: u64,
        /// Newest committed.
        newest: u64,
    },
    /// A record that passed its checksum when scanned no longer does.
    #[error("{}: record at offset {offset:#x}: {why}", path.display())]
    Record {
        /// The segment.
        path: PathBuf,
        /// Where the record starts.
        offset: u64,
        /// What is wrong.
        why: format::RecordError,
    },
    /// The machine state of an epoch does not parse.
    #[error("{}: epoch {epoch}: machine state: {source}", path.display())]
    State {
        /// The segment.
        path: PathBuf,
        /// The epoch.
        epoch: u64,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// An epoch's pages do not fit the journal (page size, RAM size).
    #[error("epoch {epoch}: {why}")]
    Shape {
        /// The epoch.
        epoch: u64,
        /// What does not fit.
        why: String,
    },
    /// A delta that does not fit its page (checked when its record was
    /// read: a record changed on disk since).
    #[error("the delta for the page at file offset {off:#x}: {why}")]
    BadDelta {
        /// The page's file offset.
        off: u64,
        /// What is wrong.
        why: delta::DeltaError,
    },
    /// Reading guest memory failed.
    #[error("reading guest memory at {gpa:#x}: {msg}")]
    ReadGuest {
        /// Address.
        gpa: u64,
        /// vm-memory's message.
        msg: String,
    },
}

impl JournalError {
    /// A closure turning an OS error on `path` during `op` into this error.
    pub fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> JournalError {
        let path = path.to_path_buf();
        move |source| JournalError::Io { path, op, source }
    }

    /// Whether the cause is a full disk (ENOSPC or EDQUOT).
    pub fn is_no_space(&self) -> bool {
        matches!(self, JournalError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
    }
}

/// Syncs directory `dir` (a file made, renamed or removed in it is then
/// durable).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(JournalError::io(dir, "fsync directory"))
}

#[cfg(test)]
mod tests;
