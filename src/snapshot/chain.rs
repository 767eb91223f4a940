//! Snapshot chains: a full snapshot followed by diffs, each naming its
//! parent. Found from the newest link back to the full one, every link
//! checked, and restored (into a new memory file) or merged (into one full
//! snapshot) oldest first.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{io_err, manifest, Manifest, SnapshotError};
use super::pages::ChainPages;
use super::read::{load, verify, verify_lazily};
use super::write::{commit, prepare_dir, to_json, write_synced};

const PAGE: u64 = 4096;

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

/// Writes the RAM of the chain ending at `dir` into the new file `mem`,
/// every memory chunk checked against its manifest as it is read (one
/// pass: see [`build_image`]). The file is not synced: the snapshot stays
/// the durable copy, and whoever runs on `mem` persists it.
pub fn materialize(dir: &Path, mem: &Path) -> Result<Manifest, SnapshotError> {
    materialize_with(dir, mem, &mut |_, _| {})
}

/// [`materialize`], reporting (bytes done, bytes in all) as it copies.
pub fn materialize_with(dir: &Path, mem: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<Manifest, SnapshotError> {
    if mem.exists() {
        return Err(SnapshotError::MemExists(mem.to_path_buf()));
    }
    let (mut pages, last) = ChainPages::open(dir)?;
    let dst = OpenOptions::new().read(true).write(true).create_new(true).open(mem).map_err(io_err(mem, "create"))?;
    let r = dst
        .set_len(pages.mem_size())
        .map_err(io_err(mem, "size"))
        .and_then(|_| build_image(&mut pages, &dst, mem, progress).map(|_| ()));
    if let Err(e) = r {
        let _ = std::fs::remove_file(mem);
        return Err(e);
    }
    Ok(last)
}

/// How long each step of building a memory file took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BuildTimes {
    /// Reading the pages (each chunk checked the first time) and writing
    /// them into the file.
    pub copy: std::time::Duration,
    /// Checking the chunks no page was read from (zeros, pages a later
    /// diff overwrote).
    pub check_rest: std::time::Duration,
    /// Bytes of page data written.
    pub bytes: u64,
}

/// Pages read and written per step of [`build_image`].
const BUILD_BLOCK: u64 = 256;

/// Writes the RAM `pages` holds into `dst` (at `dst_path`, already sized,
/// empty): each page with data read once from the snapshot holding its
/// newest copy, its 1 MiB chunk checked first, and written at its RAM
/// offset (zero pages stay holes); then every chunk no page came from is
/// checked too. A chunk that fails its checksum stops the build with the
/// file and offset named: `dst` then holds only checked bytes.
pub fn build_image(
    pages: &mut ChainPages,
    dst: &File,
    dst_path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<BuildTimes, SnapshotError> {
    let t0 = std::time::Instant::now();
    let runs = pages.data_runs();
    let total: u64 = runs.iter().map(|&(_, n)| u64::from(n) * PAGE).sum();
    let mut buf = vec![0u8; (BUILD_BLOCK * PAGE) as usize];
    let mut done = 0;
    for (off, count) in runs {
        let end = off + u64::from(count) * PAGE;
        let mut o = off;
        while o < end {
            let n = ((end - o) / PAGE).min(BUILD_BLOCK);
            let b = &mut buf[..(n * PAGE) as usize];
            pages.read(o, b)?;
            dst.write_all_at(b, o).map_err(io_err(dst_path, "write"))?;
            o += n * PAGE;
            done += n * PAGE;
            if done % (64 << 20) < n * PAGE || done == total {
                progress(done, total);
            }
        }
    }
    let copy = t0.elapsed();
    pages.check_all()?;
    let times = BuildTimes { copy, check_rest: t0.elapsed() - copy, bytes: total };
    tracing::debug!("memory file {} built: {times:?}", dst_path.display());
    Ok(times)
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
