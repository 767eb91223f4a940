//! Whole-memory checksums for a migration's optional end-to-end check:
//! a CRC-32 per 1 MiB of RAM, in backing-file order, computed by the
//! source over its paused RAM and by the destination over the memory file
//! it built. Both sides compute it with this one function.

use std::io;

use crate::memory::RamRegion;

/// Bytes per checksum.
pub const CHUNK: u64 = 1 << 20;

/// CRC-32 of each [`CHUNK`] of RAM laid out as `layout` (a region's last
/// chunk may be short); `read(file_offset, buf)` fills `buf`.
pub fn memory_crcs(
    layout: &[RamRegion],
    mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<Vec<u32>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; CHUNK as usize];
    for r in layout {
        let mut at = 0;
        while at < r.len {
            let n = (r.len - at).min(CHUNK) as usize;
            read(r.file_offset + at, &mut buf[..n])?;
            out.push(crc32fast::hash(&buf[..n]));
            at += n as u64;
        }
    }
    Ok(out)
}

/// One number for the whole table (what both ends print).
pub fn digest(crcs: &[u32]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for c in crcs {
        h.update(&c.to_le_bytes());
    }
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_follow_the_layout_and_a_changed_byte_shows() {
        let layout = [
            RamRegion { gpa: 0, file_offset: 0, len: CHUNK + 4096 },
            RamRegion { gpa: 1 << 32, file_offset: CHUNK + 4096, len: 4096 },
        ];
        let mut mem = vec![1u8; (CHUNK + 8192) as usize];
        let read = |mem: &Vec<u8>| {
            let mem = mem.clone();
            memory_crcs(&layout, move |o, b| {
                b.copy_from_slice(&mem[o as usize..o as usize + b.len()]);
                Ok(())
            })
            .unwrap()
        };
        let a = read(&mem);
        assert_eq!(a.len(), 3);
        mem[(CHUNK + 5000) as usize] = 2;
        let b = read(&mem);
        assert_eq!((a[0], a[1]), (b[0], b[1]));
        assert_ne!(a[2], b[2]);
        assert_ne!(digest(&a), digest(&b));
    }
}
