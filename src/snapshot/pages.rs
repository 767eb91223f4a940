//! A snapshot chain's RAM read page by page, for a lazy restore: which
//! snapshot of the chain holds the newest copy of each page (the last diff
//! that has it, else the full image; a hole in the full image that no diff
//! covers is a zero page), and reading it with its 1 MiB chunk checked
//! against the manifest's CRC-32 the first time that chunk is used — so
//! the guest can start before the memory files were read, and still never
//! sees a byte that fails its checksum.
//!
//! The snapshot files are only ever opened read-only.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::chain::chain_lazily;
use super::format::{chunk_crc, parse_extents, Manifest, SnapshotError, CHUNK};
use crate::file_io::data_ranges;
use crate::memory::check_ram_size;

const PAGE: u64 = 4096;

/// One memory file of the chain.
#[derive(Debug)]
struct Layer {
    path: PathBuf,
    file: File,
    len: u64,
    crc32: Vec<u32>,
    verified: Vec<bool>,
    /// Diffs: (RAM file offset, length, position in `memory.diff`), in
    /// order. The full image: None (RAM offset = file offset).
    extents: Option<Vec<(u64, u64, u64)>>,
}

impl Layer {
    fn open(path: PathBuf, m: &Manifest, name: &str) -> Result<Self, SnapshotError> {
        let sum = m.files.get(name).ok_or_else(|| SnapshotError::Corrupt {
            path: path.clone(),
            offset: 0,
            what: format!("the manifest lists no {name}"),
        })?;
        let file = File::open(&path).map_err(|source| SnapshotError::Io { path: path.clone(), op: "open", source })?;
        Ok(Layer {
            file,
            len: sum.len,
            crc32: sum.crc32.clone(),
            verified: vec![false; sum.crc32.len()],
            extents: None,
            path,
        })
    }

    /// Where RAM file offset `off` lies in this file (None: not here).
    fn position(&self, off: u64) -> Option<u64> {
        match &self.extents {
            None => Some(off),
            Some(ext) => {
                let i = ext.partition_point(|&(o, _, _)| o <= off).checked_sub(1)?;
                let (o, len, pos) = ext[i];
                (off < o + len).then(|| pos + (off - o))
            }
        }
    }

    /// Checks the chunk holding file position `pos` (once). Returns
    /// whether `buf` now holds that chunk's bytes (it was read to be
    /// checked, and was no hole).
    fn check_chunk(&mut self, pos: u64, buf: &mut Vec<u8>) -> Result<bool, SnapshotError> {
        let i = (pos / CHUNK) as usize;
        if self.verified.get(i).copied().unwrap_or(false) {
            return Ok(false);
        }
        let corrupt = |what: String| SnapshotError::Corrupt { path: self.path.clone(), offset: i as u64 * CHUNK, what };
        let want = *self.crc32.get(i).ok_or_else(|| corrupt("past the end of the file".into()))?;
        let start = i as u64 * CHUNK;
        let n = (self.len - start).min(CHUNK) as usize;
        buf.resize(n, 0);
        // A chunk that is all hole is not read: its checksum is that of zeros.
        let (crc, read) = chunk_crc(&self.file, start, buf).map_err(|source| SnapshotError::Io {
            path: self.path.clone(),
            op: "read",
            source,
        })?;
        if crc != want {
            return Err(corrupt(format!("checksum mismatch in the {} KiB chunk at this offset", CHUNK >> 10)));
        }
        self.verified[i] = true;
        Ok(read > 0)
    }
}

/// Where each page of a chain's RAM comes from.
#[derive(Debug)]
pub struct ChainPages {
    mem_size: u64,
    layers: Vec<Layer>,
    /// Per page: 0 = zero page, k = `layers[k - 1]`.
    source: Vec<u16>,
    buf: Vec<u8>,
    /// (layer, chunk) whose bytes `buf` holds, from checking it: pages of
    /// that chunk are handed over from there instead of read again.
    cached: Option<(usize, u64)>,
    /// Pages of a chunk checked earlier, read again; zero pages.
    piece: Vec<u8>,
}

impl ChainPages {
    /// Opens the chain ending at `dir`: manifests, state and extent tables
    /// checked in full, memory files by length (their chunks as they are
    /// read). Returns the pages and the last snapshot's manifest.
    pub fn open(dir: &Path) -> Result<(Self, Manifest), SnapshotError> {
        let links = chain_lazily(dir)?;
        let last = links.last().map(|(_, m)| m.clone()).ok_or_else(|| SnapshotError::Corrupt {
            path: dir.to_path_buf(),
            offset: 0,
            what: "an empty chain".into(),
        })?;
        let mem_size = last.mem_size;
        // One entry per page is kept: a forged size must not ask for more
        // than any VM smudge runs.
        check_ram_size(mem_size).map_err(|e| SnapshotError::Corrupt {
            path: dir.join("manifest.json"),
            offset: 0,
            what: e.to_string(),
        })?;
        let pages = mem_size / PAGE;
        if links.len() >= usize::from(u16::MAX) {
            return Err(SnapshotError::Corrupt {
                path: dir.to_path_buf(),
                offset: 0,
                what: format!("a chain of {} snapshots", links.len()),
            });
        }
        let mut source = vec![0u16; pages as usize];
        let mut layers = Vec::new();
        for (k, (d, m)) in links.iter().enumerate() {
            let id = (k + 1) as u16;
            if m.mem_size != mem_size {
                return Err(SnapshotError::Corrupt {
                    path: d.join("manifest.json"),
                    offset: 0,
                    what: format!("{} bytes of RAM, the chain's last snapshot has {mem_size}", m.mem_size),
                });
            }
            if k == 0 {
                let layer = Layer::open(d.join("memory.img"), m, "memory.img")?;
                let data = data_ranges(&layer.file, mem_size).map_err(|source| SnapshotError::Io {
                    path: layer.path.clone(),
                    op: "SEEK_DATA",
                    source,
                })?;
                for (off, len) in data {
                    for p in off / PAGE..(off + len).div_ceil(PAGE).min(pages) {
                        source[p as usize] = id;
                    }
                }
                layers.push(layer);
            } else {
                let mut layer = Layer::open(d.join("memory.diff"), m, "memory.diff")?;
                let ext_path = d.join("extents.json");
                let text = std::fs::read(&ext_path).map_err(|source| SnapshotError::Io {
                    path: ext_path.clone(),
                    op: "read",
                    source,
                })?;
                let mut pos = 0;
                let mut ext = Vec::new();
                for (off, len) in parse_extents(&text, mem_size, layer.len, &ext_path)? {
                    if !off.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
                        return Err(SnapshotError::Corrupt {
                            path: ext_path.clone(),
                            offset: 0,
                            what: format!("extent {off:#x}+{len:#x} is not whole pages"),
                        });
                    }
                    for p in off / PAGE..(off + len) / PAGE {
                        source[p as usize] = id;
                    }
                    ext.push((off, len, pos));
                    pos += len;
                }
                layer.extents = Some(ext);
                layers.push(layer);
            }
        }
        Ok((ChainPages { mem_size, layers, source, buf: Vec::new(), cached: None, piece: Vec::new() }, last))
    }

    /// RAM bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// Runs of (file offset, page count) of the pages with data (every
    /// other page is zero).
    pub fn data_runs(&self) -> Vec<(u64, u32)> {
        let mut runs: Vec<(u64, u32)> = Vec::new();
        for (p, &s) in self.source.iter().enumerate() {
            if s == 0 {
                continue;
            }
            let off = p as u64 * PAGE;
            match runs.last_mut() {
                Some((o, n)) if *o + u64::from(*n) * PAGE == off && *n < u32::MAX => *n += 1,
                _ => runs.push((off, 1)),
            }
        }
        runs
    }

    /// Reads `buf.len() / 4096` pages at RAM file offset `off` from the
    /// snapshots that hold them, each chunk checked the first time.
    pub fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let count = (buf.len() as u64) / PAGE;
        self.read_each(
            off,
            count,
            |e| e,
            |o, bytes| {
                let at = (o - off) as usize;
                buf[at..at + bytes.len()].copy_from_slice(bytes);
                Ok(())
            },
        )
    }

    /// Hands the `count` pages at RAM file offset `off` to `take` as
    /// (RAM file offset, bytes) pieces, in order, each chunk checked
    /// before any of its bytes is handed over. A piece of a chunk checked
    /// just now comes straight from the buffer it was checked in (the
    /// checked bytes are the ones handed over: no second read, no copy);
    /// a piece of a chunk checked earlier is read again; zero pages come
    /// as zeros. `lift` turns the chain's errors into `take`'s.
    pub fn read_each<E>(
        &mut self,
        off: u64,
        count: u64,
        lift: fn(SnapshotError) -> E,
        mut take: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut scratch = std::mem::take(&mut self.buf);
        let mut piece = std::mem::take(&mut self.piece);
        let r = self.each_piece(off, count, &mut scratch, &mut piece, lift, &mut take);
        self.buf = scratch;
        self.piece = piece;
        r
    }

    /// Where the page at RAM file offset `o` is: (layer number, 0 for a
    /// zero page; position in that layer's file).
    fn locate(&self, o: u64) -> Result<(u16, u64), SnapshotError> {
        let s = self.source.get((o / PAGE) as usize).copied().unwrap_or(0);
        if s == 0 {
            return Ok((0, o));
        }
        let layer = &self.layers[usize::from(s) - 1];
        let pos = layer.position(o).ok_or_else(|| SnapshotError::Corrupt {
            path: layer.path.clone(),
            offset: 0,
            what: format!("page {o:#x} is not in this file's extents"),
        })?;
        Ok((s, pos))
    }

    /// Checks the chunk of layer `l` holding file position `pos` (once),
    /// keeping track of which chunk `scratch` holds.
    fn check(&mut self, l: usize, pos: u64, scratch: &mut Vec<u8>) -> Result<(), SnapshotError> {
        let layer = &mut self.layers[l];
        if layer.verified.get((pos / CHUNK) as usize).copied().unwrap_or(false) {
            return Ok(());
        }
        // Whatever happens next, `scratch` no longer holds the chunk it did.
        self.cached = None;
        if layer.check_chunk(pos, scratch)? {
            self.cached = Some((l, pos / CHUNK));
        }
        Ok(())
    }

    fn each_piece<E>(
        &mut self,
        off: u64,
        count: u64,
        scratch: &mut Vec<u8>,
        piece: &mut Vec<u8>,
        lift: fn(SnapshotError) -> E,
        take: &mut impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut i = 0;
        while i < count {
            let o = off + i * PAGE;
            let (s, pos) = self.locate(o).map_err(lift)?;
            // The run of pages from the same file, back to back there and
            // in one chunk of it.
            let mut j = i + 1;
            while j < count
                && !(pos + (j - i) * PAGE).is_multiple_of(CHUNK)
                && self.locate(off + j * PAGE).map_err(lift)? == (s, pos + (j - i) * PAGE)
            {
                j += 1;
            }
            let len = ((j - i) * PAGE) as usize;
            if s == 0 {
                // Holes of the full image: their chunks' checksums say
                // whether they were holes when the snapshot was taken.
                if !self.layers.is_empty() {
                    self.check(0, pos, scratch).map_err(lift)?;
                }
                piece.clear();
                piece.resize(len, 0);
                take(o, piece)?;
            } else {
                let l = usize::from(s) - 1;
                self.check(l, pos, scratch).map_err(lift)?;
                let from = (pos % CHUNK) as usize;
                if self.cached == Some((l, pos / CHUNK)) && from + len <= scratch.len() {
                    take(o, &scratch[from..from + len])?;
                } else {
                    let layer = &self.layers[l];
                    piece.resize(len, 0);
                    layer
                        .file
                        .read_exact_at(piece, pos)
                        .map_err(|source| lift(SnapshotError::Io { path: layer.path.clone(), op: "read", source }))?;
                    take(o, piece)?;
                }
            }
            i = j;
        }
        Ok(())
    }

    /// Whether the page at RAM file offset `off` is a zero page (a hole of
    /// the full image that no diff covers).
    pub fn is_zero(&self, off: u64) -> bool {
        self.source.get((off / PAGE) as usize).is_none_or(|&s| s == 0)
    }

    /// Checks every chunk of every memory file not checked yet (what a
    /// restore that read only some pages still owes its user).
    pub fn check_all(&mut self) -> Result<(), SnapshotError> {
        let mut scratch = std::mem::take(&mut self.buf);
        let r = (|| {
            for l in 0..self.layers.len() {
                for i in 0..self.layers[l].crc32.len() as u64 {
                    self.check(l, i * CHUNK, &mut scratch)?;
                }
            }
            Ok(())
        })();
        self.buf = scratch;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine_state::MachineState;
    use crate::snapshot::ram_file;
    use crate::snapshot::{begin_diff, load, write_full};
    use std::fs::OpenOptions;

    /// A 4 MiB RAM file with data in a few pages.
    fn ram(dir: &Path, name: &str, pages: &[(u64, u8)]) -> (PathBuf, File) {
        let p = dir.join(name);
        let f = ram_file(&p, 4 << 20);
        for &(pg, v) in pages {
            f.write_all_at(&[v; PAGE as usize], pg * PAGE).unwrap();
        }
        (p, f)
    }

    #[test]
    fn pages_come_from_the_newest_snapshot_and_chunks_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let state = MachineState::default();
        let (_, f) = ram(d.path(), "ram", &[(1, 0x11), (2, 0x22), (700, 0x33)]);
        write_full(&d.path().join("full"), &f, 4 << 20, &state).unwrap();
        // A diff rewrites page 2 and adds page 5.
        f.write_all_at(&[0x44; PAGE as usize], 2 * PAGE).unwrap();
        f.write_all_at(&[0x55; PAGE as usize], 5 * PAGE).unwrap();
        let (full_m, _) = load(&d.path().join("full")).unwrap();
        let ext = [(2 * PAGE, PAGE), (5 * PAGE, PAGE)];
        begin_diff(&d.path().join("diff"), &full_m, &d.path().join("full"), &f, &ext, &state)
            .unwrap()
            .commit()
            .unwrap();

        let (mut pages, m) = ChainPages::open(&d.path().join("diff")).unwrap();
        assert_eq!(m.kind, "diff");
        assert_eq!(pages.data_runs(), vec![(PAGE, 2), (5 * PAGE, 1), (700 * PAGE, 1)]);
        assert!(pages.is_zero(3 * PAGE) && !pages.is_zero(5 * PAGE));
        let mut buf = vec![0u8; 6 * PAGE as usize];
        pages.read(0, &mut buf).unwrap();
        let at = |p: usize| buf[p * PAGE as usize];
        assert_eq!([at(0), at(1), at(2), at(3), at(4), at(5)], [0, 0x11, 0x44, 0, 0, 0x55]);
        // Pieces never straddle a chunk and come in order, with the
        // bytes of their pages (254..258: holes across the first 1 MiB
        // boundary, then nothing but zeros).
        let mut pieces = Vec::new();
        pages
            .read_each(
                253 * PAGE,
                4,
                |e| e,
                |o, b: &[u8]| {
                    pieces.push((o / PAGE, b.len() as u64 / PAGE, b.iter().all(|&x| x == 0)));
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(pieces, vec![(253, 3, true), (256, 1, true)]);
        let mut pieces = Vec::new();
        pages
            .read_each(
                0,
                3,
                |e| e,
                |o, b: &[u8]| {
                    pieces.push((o / PAGE, b.to_vec()));
                    Ok(())
                },
            )
            .unwrap();
        let want: Vec<u8> = [0u8, 0x11, 0x44].iter().flat_map(|&v| vec![v; PAGE as usize]).collect();
        // A zero page, one of the full image, one of the diff: three pieces.
        assert_eq!(pieces.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(pieces.into_iter().flat_map(|(_, b)| b).collect::<Vec<_>>(), want);
        pages.check_all().unwrap();

        // A flipped byte in the full image is found when its chunk is used.
        let img = d.path().join("full/memory.img");
        let w = OpenOptions::new().write(true).open(&img).unwrap();
        w.write_all_at(&[0x99], 700 * PAGE + 7).unwrap();
        let (mut pages, _) = ChainPages::open(&d.path().join("diff")).unwrap();
        let mut one = vec![0u8; PAGE as usize];
        pages.read(PAGE, &mut one).unwrap(); // chunk 0: intact
        let e = pages.read(700 * PAGE, &mut one).unwrap_err().to_string();
        assert!(e.contains("memory.img") && e.contains("checksum mismatch"), "{e}");
        assert!(pages.check_all().is_err());
    }
}
