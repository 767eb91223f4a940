//! Snapshots on disk: a directory per snapshot, committed atomically; a
//! full snapshot, or a diff on top of a parent, and chains of them.
//!
//! - [`format`](mod@format): the files, the manifest, chunk checksums and
//!   the parsers every reader runs;
//! - [`write`](mod@write): writing a full (paused or live) or a diff snapshot;
//! - [`read`](mod@read): checking a snapshot and loading its machine state;
//! - [`chain`](mod@chain): following a chain, restoring its RAM, merging it;
//! - [`pages`](mod@pages): a chain's RAM read page by page (a lazy restore).
//!
//! The machine state a snapshot holds is [`crate::machine_state`]'s, the
//! same value a migration sends.

pub mod chain;
pub mod format;
pub mod pages;
pub mod read;
pub mod write;

pub use chain::{
    build_image, chain, chain_lazily, materialize, materialize_with, merge, merge_with, restore_memory, BuildTimes,
};
pub use format::{
    chunk_crc, parse_extents, parse_manifest, parse_state, FileSum, Manifest, SnapshotError, CHUNK, FORMAT, VERSION,
};
pub use pages::ChainPages;
pub use read::{load, load_lazily, verify, verify_lazily};
pub use write::{begin_diff, begin_full, begin_live_full, check_dir, write_full, Committed, LiveFull, Pending};

/// A snapshot's `state.json` holds a [`MachineState`]; re-exported for the
/// callers of [`load`], [`write_full`] and [`parse_state`].
pub use crate::machine_state::MachineState;

/// A RAM file for the tests: `len` bytes, all hole, at `path`.
#[cfg(test)]
fn ram_file(path: &std::path::Path, len: u64) -> std::fs::File {
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap();
    f.set_len(len).unwrap();
    f
}
