//! Reading snapshots: checking a snapshot directory against its manifest
//! (in full, or all but the memory files' chunks for a lazy reader) and
//! loading its machine state.

use std::path::Path;

use super::format::{checksum_file, data_files, io_err, parse_manifest, parse_state, Manifest, SnapshotError};
use crate::machine_state::MachineState;

/// Reads and checks `dir`: format, version, every file's length and chunk
/// checksums. Errors name the file and the first bad offset.
pub fn verify(dir: &Path) -> Result<Manifest, SnapshotError> {
    verify_files(dir, |_| true)
}

/// [`verify`] without reading the memory files (`memory.img`,
/// `memory.diff`): only their lengths are checked, their chunks are left
/// to a reader that checks each before it uses it (a lazy restore). The
/// small files (state, extents) are checked in full.
pub fn verify_lazily(dir: &Path) -> Result<Manifest, SnapshotError> {
    verify_files(dir, |name| !name.starts_with("memory."))
}

fn verify_files(dir: &Path, read_in_full: impl Fn(&str) -> bool) -> Result<Manifest, SnapshotError> {
    let mpath = dir.join("manifest.json");
    let text = std::fs::read(&mpath).map_err(io_err(&mpath, "read"))?;
    let m = parse_manifest(&text, &mpath)?;
    // parse_manifest found every one of them listed.
    let names = data_files(&m.kind, m.parent.is_some()).unwrap_or_default();
    for (&name, want) in names.iter().filter_map(|n| Some((n, m.files.get(*n)?))) {
        let p = dir.join(name);
        if !read_in_full(name) {
            let len = std::fs::metadata(&p).map_err(io_err(&p, "stat"))?.len();
            if len != want.len {
                return Err(SnapshotError::Corrupt {
                    path: p,
                    offset: len.min(want.len),
                    what: format!("length {len} but the manifest says {}", want.len),
                });
            }
            continue;
        }
        let (got, _) = checksum_file(&p)?;
        if got.len != want.len {
            return Err(SnapshotError::Corrupt {
                path: p,
                offset: got.len.min(want.len),
                what: format!("length {} but the manifest says {}", got.len, want.len),
            });
        }
        if let Some(i) = got.crc32.iter().zip(&want.crc32).position(|(a, b)| a != b) {
            return Err(SnapshotError::Corrupt {
                path: p,
                offset: i as u64 * want.chunk,
                what: format!("checksum mismatch in the {} KiB chunk at this offset", want.chunk >> 10),
            });
        }
    }
    Ok(m)
}

/// Checks `dir` and reads its machine state.
pub fn load(dir: &Path) -> Result<(Manifest, MachineState), SnapshotError> {
    load_checked(dir, verify)
}

/// [`load`], the memory files' chunks left to a reader that checks each
/// before it uses it ([`verify_lazily`]): a restore that reads them anyway.
pub fn load_lazily(dir: &Path) -> Result<(Manifest, MachineState), SnapshotError> {
    load_checked(dir, verify_lazily)
}

fn load_checked(
    dir: &Path,
    verify: fn(&Path) -> Result<Manifest, SnapshotError>,
) -> Result<(Manifest, MachineState), SnapshotError> {
    let m = verify(dir)?;
    let p = dir.join("state.json");
    let text = std::fs::read(&p).map_err(io_err(&p, "read"))?;
    let s = parse_state(&text, m.vcpus, &p)?;
    Ok((m, s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::ram_file;
    use crate::snapshot::write_full;

    #[test]
    fn manifests_with_short_checksum_lists_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("mem");
        let f = ram_file(&mem, 3 << 20);
        let snap = dir.path().join("snap");
        let (m, _) = write_full(&snap, &f, 3 << 20, &MachineState::default()).unwrap();
        let mp = snap.join("manifest.json");
        assert_eq!(parse_manifest(&std::fs::read(&mp).unwrap(), &mp).unwrap(), m);
        // No chunk checksums at all for memory.img: its data went unchecked.
        let mut short = m.clone();
        short.files.get_mut("memory.img").unwrap().crc32.clear();
        short.checksum = short.self_checksum();
        std::fs::write(&mp, serde_json::to_vec(&short).unwrap()).unwrap();
        let e = verify(&snap).unwrap_err().to_string();
        assert!(e.contains("memory.img: 0 checksums of 1048576-byte chunks for 3145728 bytes"), "{e}");
        // A chunk size of 2^63: the offset of a bad chunk overflowed.
        let mut huge = m;
        huge.files.get_mut("memory.img").unwrap().chunk = 1 << 63;
        huge.checksum = huge.self_checksum();
        let e = parse_manifest(&serde_json::to_vec(&huge).unwrap(), &mp).unwrap_err().to_string();
        assert!(e.contains("9223372036854775808-byte chunks"), "{e}");
    }
}
