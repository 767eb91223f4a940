//! Snapshot chains: a full snapshot followed by diffs, each naming its
//! parent. Found from the newest link back to the full one, every link
//! checked, and restored (into a new memory file) or merged (into one full
//! snapshot) oldest first.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{io_err, manifest, parse_extents, Manifest, SnapshotError, CHUNK};
use super::read::{load, verify, verify_lazily};
use super::write::{commit, prepare_dir, to_json, write_synced};
use crate::file_io::{copy_range, data_ranges};

/// The chain ending at `dir`, oldest (the full snapshot) first, every link
/// checked.
pub fn chain(dir: &Path) -> Result<Vec<(PathBuf, Manifest)>, SnapshotError> {
    chain_checked(dir, verify)
}

/// [`chain`], each link checked by [`verify_lazily`]: its memory files'
/// chunks are the reader's to check.
pub fn chain_lazily(dir: &Path) -> Result<Vec<(PathBuf, Manifest)>, SnapshotError> {
    chain_checked(dir, verify_lazily)
}

fn chain_checked(
    dir: &Path,
    verify: fn(&Path) -> Result<Manifest, SnapshotError>,
) -> Result<Vec<(PathBuf, Manifest)>, SnapshotError> {
    let mut out = Vec::new();
    let mut cur = dir.to_path_buf();
    loop {
        let m = verify(&cur)?;
        let next = m.parent_dir.clone();
        let parent_id = m.parent.clone();
        out.push((cur.clone(), m));
        match (next, parent_id) {
            (None, _) => break,
            (Some(p), Some(id)) => {
                let pm = verify(&p)?;
                if pm.id != id {
                    return Err(SnapshotError::Corrupt {
                        path: cur.join("manifest.json"),
                        offset: 0,
                        what: format!("parent {} holds snapshot {}, not {id}", p.display(), pm.id),
                    });
                }
                if out.len() > 10_000 {
                    return Err(SnapshotError::Corrupt { path: p, offset: 0, what: "snapshot chain loops".into() });
                }
                cur = p;
            }
            (Some(p), None) => {
                return Err(SnapshotError::Corrupt {
                    path: p,
                    offset: 0,
                    what: "parent directory without a parent id".into(),
                })
            }
        }
    }
    out.reverse();
    Ok(out)
}

/// Writes the diff in `dir` (`data_len` bytes of `memory.diff`, as its
/// verified manifest says) into `dst`, RAM of `mem_size` bytes.
fn apply_diff(dir: &Path, mem_size: u64, data_len: u64, dst: &File, dst_path: &Path) -> Result<(), SnapshotError> {
    let ext_path = dir.join("extents.json");
    let text = std::fs::read(&ext_path).map_err(io_err(&ext_path, "read"))?;
    let extents = parse_extents(&text, mem_size, data_len, &ext_path)?;
    let data_path = dir.join("memory.diff");
    let data = File::open(&data_path).map_err(io_err(&data_path, "open"))?;
    let mut pos = 0u64;
    // At most a chunk at a time, whatever an extent's length.
    let mut buf = vec![0u8; CHUNK as usize];
    for (off, len) in extents {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            data.read_exact_at(&mut buf[..n], pos + done).map_err(io_err(&data_path, "read"))?;
            dst.write_all_at(&buf[..n], off + done).map_err(io_err(dst_path, "write"))?;
            done += n as u64;
        }
        pos += len;
    }
    Ok(())
}

/// Writes the RAM of the chain ending at `dir` into the new file `mem`:
/// the full snapshot's data ranges (holes stay holes), then every diff in
/// order.
pub fn materialize(dir: &Path, mem: &Path) -> Result<Manifest, SnapshotError> {
    materialize_with(dir, mem, &mut |_, _| {})
}

/// [`materialize`], reporting (bytes done, bytes in all) as it copies.
pub fn materialize_with(dir: &Path, mem: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<Manifest, SnapshotError> {
    if mem.exists() {
        return Err(SnapshotError::MemExists(mem.to_path_buf()));
    }
    let links = chain(dir)?;
    let (full_dir, full) = &links[0];
    let src_path = full_dir.join("memory.img");
    let src = File::open(&src_path).map_err(io_err(&src_path, "open"))?;
    let dst = OpenOptions::new().read(true).write(true).create_new(true).open(mem).map_err(io_err(mem, "create"))?;
    let r = (|| {
        dst.set_len(full.mem_size).map_err(io_err(mem, "size"))?;
        let ranges = data_ranges(&src, full.mem_size).map_err(io_err(&src_path, "SEEK_DATA"))?;
        let diffs: u64 = links[1..].iter().filter_map(|(_, m)| m.files.get("memory.diff").map(|f| f.len)).sum();
        let total = ranges.iter().map(|r| r.1).sum::<u64>() + diffs;
        let mut done = 0;
        for (off, len) in ranges {
            // Copy in 64 MiB steps so progress moves on big images.
            let mut o = off;
            while o < off + len {
                let n = (off + len - o).min(64 << 20);
                copy_range(&src, &dst, o, n).map_err(io_err(mem, "copy_file_range"))?;
                o += n;
                done += n;
                progress(done, total);
            }
        }
        for (d, m) in &links[1..] {
            let data_len = m.files.get("memory.diff").map_or(0, |f| f.len);
            apply_diff(d, full.mem_size, data_len, &dst, mem)?;
            done += data_len;
            progress(done, total);
        }
        dst.sync_data().map_err(io_err(mem, "fdatasync"))
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(mem);
        return Err(e);
    }
    Ok(links.last().map(|(_, m)| m.clone()).unwrap_or_else(|| full.clone()))
}

/// Makes a new memory file at `mem` holding the snapshot's RAM.
pub fn restore_memory(dir: &Path, _m: &Manifest, mem: &Path) -> Result<(), SnapshotError> {
    materialize(dir, mem).map(|_| ())
}

/// Folds the chain ending at `dir` into one full snapshot at `out` (same
/// memory bytes, the last link's machine state).
pub fn merge(dir: &Path, out: &Path) -> Result<Manifest, SnapshotError> {
    merge_with(dir, out, &mut |_, _| {})
}

/// [`merge`], reporting progress like [`materialize_with`].
pub fn merge_with(dir: &Path, out: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<Manifest, SnapshotError> {
    let links = chain(dir)?;
    let last = links.last().map(|(d, _)| d.clone()).unwrap_or_else(|| dir.to_path_buf());
    let (_, state) = load(&last)?;
    let mut made = prepare_dir(out)?;
    let mem_path = made.file("memory.img");
    let m = materialize_with(dir, &mem_path, progress)?;
    let state_path = made.file("state.json");
    write_synced(&state_path, &to_json(&state_path, &state)?)?;
    commit(&mut made, manifest("full", m.mem_size, state.vcpus.len(), None), &["memory.img", "state.json"])
        .map(|(m, _)| m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine_state::MachineState;
    use crate::snapshot::format::checksum_file;
    use crate::snapshot::ram_file;
    use crate::snapshot::{begin_diff, write_full};

    /// Rewrites `dir`'s `name` to `bytes` and reseals the manifest (its
    /// checksum of `name` and its own), as a forger or a buggy writer would.
    fn forge(dir: &Path, name: &str, bytes: &[u8]) {
        std::fs::write(dir.join(name), bytes).unwrap();
        let mp = dir.join("manifest.json");
        let mut m: Manifest = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
        m.files.insert(name.into(), checksum_file(&dir.join(name)).unwrap().0);
        m.checksum = m.self_checksum();
        std::fs::write(&mp, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    }

    #[test]
    fn a_forged_extent_table_cannot_write_outside_ram() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("mem");
        let f = ram_file(&mem, 1 << 20);
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        let full = dir.path().join("full");
        let (fm, _) = write_full(&full, &f, 1 << 20, &MachineState::default()).unwrap();
        f.write_all_at(&[2u8; 4096], 8192).unwrap();
        let diff = dir.path().join("diff");
        let state = MachineState::default();
        begin_diff(&diff, &fm, &full, &f, &[(8192, 4096)], &state).unwrap().commit().unwrap();
        let back = dir.path().join("back");
        materialize(&diff, &back).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&mem).unwrap());
        std::fs::remove_file(&back).unwrap();
        // The same 4096 bytes, sent 1 GiB past the end of a 1 MiB RAM: the
        // restore used to grow the memory file to 1 GiB + 4 KiB.
        forge(&diff, "extents.json", b"[[1073741824,4096]]");
        assert!(chain(&diff).is_ok(), "the forged snapshot is self-consistent");
        let e = materialize(&diff, &back).unwrap_err().to_string();
        assert!(e.contains("extents.json: corrupt") && e.contains("outside the 0x100000-byte RAM"), "{e}");
        assert!(!back.exists(), "a failed restore leaves no memory file");
        // An extent of 2^64 - 4096 bytes: the restore used to panic
        // ("capacity overflow") sizing its buffer to the extent.
        forge(&diff, "extents.json", b"[[4096,18446744073709547520]]");
        let e = materialize(&diff, &back).unwrap_err().to_string();
        assert!(e.contains("outside the 0x100000-byte RAM"), "{e}");
    }
}
