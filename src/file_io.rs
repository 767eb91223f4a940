//! File I/O that snapshots and migration share: where a sparse file's data
//! lies (`SEEK_DATA` / `SEEK_HOLE`) and copying a byte range from one file
//! to another in the kernel (`copy_file_range`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Bytes per step of a copy through a buffer.
const COPY_BUF: u64 = 1 << 20;

/// The data ranges of a sparse file (`SEEK_DATA` / `SEEK_HOLE`).
pub fn data_ranges(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a file we own; it only moves our offset.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        out.push((data as u64, (hole.min(len as i64) - data) as u64));
        pos = hole;
    }
    Ok(out)
}

/// Copies `[off, off + len)` of `src` to the same offset of `dst` in the
/// kernel (`copy_file_range`).
pub fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let (mut a, mut b) = ((off + done) as i64, (off + done) as i64);
        // SAFETY: both fds are open files we own; the offsets are plain
        // integers the kernel reads and advances.
        let n = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut a, dst.as_raw_fd(), &mut b, (len - done) as usize, 0)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            // Another filesystem (EXDEV), or one without the call: copy
            // through a buffer instead.
            return match e.raw_os_error() {
                Some(libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                    copy_range_buffered(src, dst, off + done, len - done)
                }
                _ => Err(e),
            };
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "source ended early"));
        }
        done += n as u64;
    }
    Ok(())
}

/// [`copy_range`] through a 1 MiB buffer (`pread`/`pwrite`).
fn copy_range_buffered(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(COPY_BUF) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(COPY_BUF) as usize;
        src.read_exact_at(&mut buf[..n], off + done)?;
        dst.write_all_at(&buf[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Whether `[start, start + n)` of `file` may hold data: false only when
/// `SEEK_DATA` says it is all hole. A filesystem without `SEEK_DATA` says
/// every byte is data.
pub fn may_hold_data(file: &File, start: u64, n: u64) -> io::Result<bool> {
    let at = i64::try_from(start).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a file we hold open; it only moves the file's
    // offset, which nothing here relies on (reads are positioned).
    let data = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
    if data < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(false), // no data from `start` to the end
            Some(libc::EINVAL | libc::EOPNOTSUPP) => Ok(true),
            _ => Err(e),
        };
    }
    Ok((data as u64) < start.saturating_add(n))
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::*;

    fn file(dir: &std::path::Path, name: &str, len: u64) -> File {
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.join(name)).unwrap();
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn data_ranges_and_copies_keep_holes_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let len = 8u64 << 20;
        let src = file(dir.path(), "src", len);
        src.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        src.write_all_at(&[2u8; 8192], 5 << 20).unwrap();
        let ranges = data_ranges(&src, len).unwrap();
        // A filesystem may round data up to its blocks; every byte written
        // lies in a range, and most of the file is hole.
        assert!(ranges.iter().any(|&(o, n)| o <= 1 << 20 && (1 << 20) + 4096 <= o + n), "{ranges:?}");
        assert!(ranges.iter().any(|&(o, n)| o <= 5 << 20 && (5 << 20) + 8192 <= o + n), "{ranges:?}");
        assert!(ranges.iter().map(|r| r.1).sum::<u64>() < len / 2, "{ranges:?}");
        assert!(!may_hold_data(&src, 2 << 20, 1 << 20).unwrap());
        assert!(may_hold_data(&src, 5 << 20, 4096).unwrap());

        // The kernel copy and the buffered one give the same bytes.
        let (a, b) = (file(dir.path(), "a", len), file(dir.path(), "b", len));
        for &(o, n) in &ranges {
            copy_range(&src, &a, o, n).unwrap();
            copy_range_buffered(&src, &b, o, n).unwrap();
        }
        let want = std::fs::read(dir.path().join("src")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), want);
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), want);
        // A source shorter than the range asked for is an error, not a
        // silent short copy.
        let short = file(dir.path(), "short", 4096);
        assert!(copy_range(&short, &a, 0, 8192).is_err());
    }
}
