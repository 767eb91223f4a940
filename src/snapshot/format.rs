//! The snapshot format: what a snapshot directory holds, its manifest,
//! the chunk checksums, and the parsers every reader runs on its files.
//!
//! ```text
//! DIR/manifest.json   {"format":"smudge-snapshot","version":1,"id":…,"parent":null,
//!                      "kind":"full","mem_size":…,"layout":[…],
//!                      "files":{"memory.img":{"len":…,"chunk":1048576,"crc32":[…]},
//!                               "state.json":{"len":…,"chunk":…,"crc32":[…]}}}
//! DIR/memory.img      guest RAM at backing-file offsets, sparse (holes = zero)
//! DIR/state.json      the machine state (vCPUs, devices: crate::machine_state)
//! ```
//!
//! A diff snapshot holds only the pages dirtied since its parent:
//!
//! ```text
//! DIR/extents.json    [[file_offset, len], …] in order
//! DIR/memory.diff     the extents' bytes, back to back
//! ```
//!
//! and its manifest names the parent's id and directory; a chain is a full
//! snapshot followed by diffs, restored (or merged) oldest first.
//!
//! Every file carries a CRC-32 per 1 MiB chunk, so a corrupt byte is named
//! by file and offset. A chunk's CRC is always that of its bytes as read,
//! a hole reading as zeros; a chunk that is all hole is not read at all —
//! its CRC is that of a chunk of zeros — so checksumming a sparse image
//! costs what it holds, not its size. The manifest is written last
//! ([`super::write`]), so a directory with a manifest holds a complete
//! snapshot.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::file_io::may_hold_data;
use crate::machine_state::MachineState;
use crate::memory::{ram_layout, RamRegion};

/// The `format` field of every manifest.
pub const FORMAT: &str = "smudge-snapshot";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Bytes per checksum chunk.
pub const CHUNK: u64 = 1 << 20;

/// Length and chunk checksums of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSum {
    /// Length in bytes.
    pub len: u64,
    /// Chunk size of the checksums.
    pub chunk: u64,
    /// CRC-32 of each chunk, in order.
    pub crc32: Vec<u32>,
}

/// The snapshot's table of contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Format version.
    pub version: u32,
    /// Unique id of this snapshot.
    pub id: String,
    /// Id of the parent snapshot (diffs; none for a full one).
    pub parent: Option<String>,
    /// Where the parent was written (absolute path), for diffs.
    #[serde(default)]
    pub parent_dir: Option<PathBuf>,
    /// `full`.
    pub kind: String,
    /// Guest RAM size.
    pub mem_size: u64,
    /// Guest RAM layout (guest address, file offset, length).
    pub layout: Vec<RamRegion>,
    /// vCPU count.
    pub vcpus: usize,
    /// Files and their checksums.
    pub files: BTreeMap<String, FileSum>,
    /// CRC-32 of this manifest serialized with this field 0: a flipped bit
    /// anywhere in the manifest (a size, a parent id) is caught too.
    #[serde(default)]
    pub checksum: u32,
}

impl Manifest {
    /// What [`Manifest::checksum`] must hold: the CRC-32 of the manifest
    /// serialized with that field 0.
    pub fn self_checksum(&self) -> u32 {
        let mut m = self.clone();
        m.checksum = 0;
        crc32fast::hash(&serde_json::to_vec(&m).unwrap_or_default())
    }
}

/// Why a snapshot could not be written, checked or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The target directory is in use.
    #[error("{0}: exists and is not empty; refusing to overwrite a snapshot")]
    NotEmpty(PathBuf),
    /// The target directory cannot hold a snapshot.
    #[error("snapshot directory '{path}': {why}")]
    BadDir {
        /// The directory asked for.
        path: PathBuf,
        /// Why it cannot be used.
        why: String,
    },
    /// A file operation failed.
    #[error("{path}: {op} failed")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file's contents do not match the manifest.
    #[error("{path}: corrupt at offset {offset:#x}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// First offset found bad.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// The manifest is not one this code reads.
    #[error("{path}: {what}")]
    Unsupported {
        /// The manifest.
        path: PathBuf,
        /// Why.
        what: String,
    },
    /// The memory file to restore into exists already.
    #[error("{0}: exists; restore makes a new memory file and will not overwrite one")]
    MemExists(PathBuf),
}

/// Maps an OS error of `op` on `path` to a [`SnapshotError::Io`].
pub(super) fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { path: path.to_path_buf(), op, source }
}

/// CRC-32 of `n` zero bytes: the checksum of a chunk that is all hole.
fn zero_crc(n: usize) -> u32 {
    static FULL_CHUNK: OnceLock<u32> = OnceLock::new();
    let calc = || crc32fast::hash(&vec![0u8; n]);
    if n as u64 == CHUNK {
        *FULL_CHUNK.get_or_init(calc)
    } else {
        calc()
    }
}

/// The CRC-32 of the `buf.len()` bytes at `start` of `file` (holes read
/// as zeros), and how many bytes were read for it: none when the range is
/// all hole. Every writer and reader of chunk checksums uses this, so a
/// sparse chunk and a written chunk of zeros agree.
pub fn chunk_crc(file: &File, start: u64, buf: &mut [u8]) -> io::Result<(u32, u64)> {
    if !may_hold_data(file, start, buf.len() as u64)? {
        return Ok((zero_crc(buf.len()), 0));
    }
    file.read_exact_at(buf, start)?;
    Ok((crc32fast::hash(buf), buf.len() as u64))
}

/// Chunk checksums of the file at `path`, and the bytes read for them.
pub(super) fn checksum_file(path: &Path) -> Result<(FileSum, u64), SnapshotError> {
    let f = File::open(path).map_err(io_err(path, "open"))?;
    let len = f.metadata().map_err(io_err(path, "stat"))?.len();
    let mut buf = vec![0u8; len.min(CHUNK) as usize];
    let mut crc32 = Vec::new();
    let (mut at, mut read) = (0u64, 0u64);
    while at < len {
        let n = (len - at).min(CHUNK) as usize;
        let (crc, r) = chunk_crc(&f, at, &mut buf[..n]).map_err(io_err(path, "read"))?;
        crc32.push(crc);
        read += r;
        at += n as u64;
    }
    Ok((FileSum { len, chunk: CHUNK, crc32 }, read))
}

fn new_id() -> String {
    format!(
        "{:x}-{:x}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
        std::process::id()
    )
}

/// A new manifest of `kind` (no files listed yet) for RAM of `mem_size`
/// bytes and `vcpus` vCPUs, on top of `parent` (its manifest and directory)
/// for a diff.
pub(super) fn manifest(kind: &str, mem_size: u64, vcpus: usize, parent: Option<(&Manifest, &Path)>) -> Manifest {
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        id: new_id(),
        parent: parent.map(|(m, _)| m.id.clone()),
        parent_dir: parent.map(|(_, d)| d.to_path_buf()),
        kind: kind.into(),
        mem_size,
        layout: ram_layout(mem_size),
        vcpus,
        files: BTreeMap::new(),
        checksum: 0,
    }
}

/// The data files a snapshot of `kind` (with or without a parent) holds;
/// `None` for a kind this code does not read.
pub(super) fn data_files(kind: &str, has_parent: bool) -> Option<&'static [&'static str]> {
    match (kind, has_parent) {
        ("full", false) => Some(&["memory.img", "state.json"]),
        ("diff", true) => Some(&["extents.json", "memory.diff", "state.json"]),
        _ => None,
    }
}

/// Parses the bytes of a `manifest.json` (`file` names it in errors) and
/// makes every check [`verify`](super::verify) makes before it reads the data files:
/// format, version, the manifest's own checksum, the kind, and a length
/// and well-formed chunk checksums for each data file of that kind.
pub fn parse_manifest(bytes: &[u8], file: &Path) -> Result<Manifest, SnapshotError> {
    let mpath = file.to_path_buf();
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| SnapshotError::Corrupt {
        path: mpath.clone(),
        offset: e.column() as u64,
        what: format!("not a manifest: {e}"),
    })?;
    if m.format != FORMAT {
        return Err(SnapshotError::Unsupported { path: mpath, what: format!("format '{}' is not {FORMAT}", m.format) });
    }
    if m.version != VERSION {
        return Err(SnapshotError::Unsupported {
            path: mpath,
            what: format!("format version {} (this smudge reads {VERSION})", m.version),
        });
    }
    if m.checksum != m.self_checksum() {
        return Err(SnapshotError::Corrupt {
            path: mpath,
            offset: 0,
            what: "manifest checksum mismatch (the manifest itself was altered)".into(),
        });
    }
    let Some(names) = data_files(&m.kind, m.parent.is_some()) else {
        return Err(SnapshotError::Unsupported {
            path: mpath,
            what: format!("snapshot kind '{}' (parent {:?}) not supported", m.kind, m.parent),
        });
    };
    for &name in names {
        let want = m.files.get(name).ok_or_else(|| SnapshotError::Corrupt {
            path: mpath.clone(),
            offset: 0,
            what: format!("manifest lists no {name}"),
        })?;
        // What `checksum_file` writes: anything else would leave chunks
        // unchecked (a short list) or name wrong offsets.
        if want.chunk != CHUNK || want.crc32.len() as u64 != want.len.div_ceil(CHUNK) {
            return Err(SnapshotError::Corrupt {
                path: mpath.clone(),
                offset: 0,
                what: format!(
                    "{name}: {} checksums of {}-byte chunks for {} bytes (expected {}-byte chunks)",
                    want.crc32.len(),
                    want.chunk,
                    want.len,
                    CHUNK
                ),
            });
        }
    }
    Ok(m)
}

/// Parses the bytes of a `state.json` (`file` names it in errors) and
/// checks it holds `vcpus` vCPUs, as the manifest says.
pub fn parse_state(bytes: &[u8], vcpus: usize, file: &Path) -> Result<MachineState, SnapshotError> {
    let s: MachineState = serde_json::from_slice(bytes).map_err(|e| SnapshotError::Corrupt {
        path: file.to_path_buf(),
        offset: 0,
        what: format!("not a machine state: {e}"),
    })?;
    if s.vcpus.len() != vcpus {
        return Err(SnapshotError::Corrupt {
            path: file.to_path_buf(),
            offset: 0,
            what: format!("{} vCPUs, manifest says {vcpus}", s.vcpus.len()),
        });
    }
    Ok(s)
}

/// Parses the bytes of an `extents.json` (`file` names it in errors): the
/// (file offset, length) extents of a diff whose `memory.diff` holds
/// `data_len` bytes, over RAM of `mem_size` bytes. Checks that they are in
/// order, do not overlap, lie within RAM and add up to `data_len`, so
/// applying them writes only inside RAM and reads all of the data.
pub fn parse_extents(
    bytes: &[u8],
    mem_size: u64,
    data_len: u64,
    file: &Path,
) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let corrupt = |offset: u64, what: String| SnapshotError::Corrupt { path: file.to_path_buf(), offset, what };
    let extents: Vec<(u64, u64)> =
        serde_json::from_slice(bytes).map_err(|e| corrupt(e.column() as u64, format!("not an extent table: {e}")))?;
    let (mut end, mut total) = (0u64, 0u64);
    for (i, &(off, len)) in extents.iter().enumerate() {
        let Some(e) = off.checked_add(len).filter(|&e| e <= mem_size) else {
            return Err(corrupt(0, format!("extent {i} ({off:#x}+{len:#x}) is outside the {mem_size:#x}-byte RAM")));
        };
        if off < end {
            return Err(corrupt(0, format!("extent {i} ({off:#x}+{len:#x}) overlaps or precedes the one before it")));
        }
        end = e;
        // Cannot overflow: the extents are disjoint and within mem_size.
        total += len;
    }
    if total != data_len {
        return Err(corrupt(0, format!("extents hold {total} bytes but memory.diff has {data_len}")));
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_tables_are_checked_before_any_write() {
        let p = Path::new("extents.json");
        let ok = |t: &str, mem, data| parse_extents(t.as_bytes(), mem, data, p);
        let err = |t: &str, mem, data| ok(t, mem, data).unwrap_err().to_string();
        assert_eq!(ok("[[0,4096],[4096,8192],[16384,4096]]", 1 << 20, 16384).unwrap().len(), 3);
        assert_eq!(ok("[]", 0, 0).unwrap(), vec![]);
        assert!(err("[[1048576,4096]]", 1 << 20, 4096).contains("outside"));
        assert!(err("[[18446744073709547520,8192]]", u64::MAX, 8192).contains("outside"));
        assert!(err("[[8192,4096],[0,4096]]", 1 << 20, 8192).contains("overlaps or precedes"));
        assert!(err("[[0,8192],[4096,4096]]", 1 << 20, 12288).contains("overlaps or precedes"));
        assert!(err("[[0,4096]]", 1 << 20, 8192).contains("hold 4096 bytes but memory.diff has 8192"));
        assert!(err("[[0,4096]", 1 << 20, 4096).contains("not an extent table"));
    }
}
