//! Applying a run of epochs to a file — the base image at a checkpoint, a
//! new memory file at a recovery — with each page written once, its
//! newest content in the run, rather than once per epoch that holds it.
//!
//! Pages gather in memory: a whole page replaces what is held; a delta is
//! applied to the page as held, or as the file holds it when the run has
//! not seen the page yet. Past a bound, what is gathered is written out
//! and gathering starts again (a page is then written more than once,
//! each time with content it had at one of the run's epochs — which keeps
//! a checkpoint cut short by a crash replayable, see `delta.rs`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::delta;
use super::format;
use super::image::EpochPages;
use super::recover::PageData;
use super::JournalError;

/// Bytes gathered into one `pwrite` of adjacent pages.
const WRITE_RUN: usize = 4 << 20;

/// A file being brought forward by epochs.
#[derive(Debug)]
pub struct Replay<'a> {
    file: &'a File,
    path: &'a Path,
    pages: EpochPages,
    max_pages: usize,
    written: u64,
}

impl<'a> Replay<'a> {
    /// Replays into `file` (at `path`, for errors) pages of `page_size`,
    /// holding at most `max_bytes` of them before writing.
    pub fn new(file: &'a File, path: &'a Path, page_size: u64, max_bytes: u64) -> Self {
        let max_pages = usize::try_from(max_bytes / page_size.max(1)).unwrap_or(usize::MAX).max(1);
        Replay { file, path, pages: EpochPages::new(page_size), max_pages, written: 0 }
    }

    /// Takes the page at file offset `off` as an epoch's record holds it.
    pub fn page(&mut self, off: u64, data: PageData<'_>) -> Result<(), JournalError> {
        if self.pages.len() >= self.max_pages {
            self.flush()?;
        }
        match data {
            PageData::Whole(d) => self.pages.put(off, d),
            PageData::Delta(d) => {
                let (buf, new) = self.pages.slot(off);
                if new && !format::read_at(self.file, buf, off).map_err(JournalError::io(self.path, "read a page"))? {
                    // Past the file's end: a hole, zero.
                    buf.fill(0);
                }
                delta::apply(d, buf).map_err(|why| JournalError::BadDelta { off, why })?;
            }
        }
        Ok(())
    }

    /// Writes what is gathered, adjacent pages in one `pwrite`.
    fn flush(&mut self) -> Result<(), JournalError> {
        let ps = self.pages.page_size();
        let mut run: Vec<u8> = Vec::with_capacity(WRITE_RUN.min(self.pages.len() * ps as usize));
        let mut run_off = 0;
        let io = |e| JournalError::io(self.path, "write pages")(e);
        for (off, data) in self.pages.iter() {
            if !run.is_empty() && (off != run_off + run.len() as u64 || run.len() >= WRITE_RUN) {
                self.file.write_all_at(&run, run_off).map_err(io)?;
                self.written += run.len() as u64;
                run.clear();
            }
            if run.is_empty() {
                run_off = off;
            }
            run.extend_from_slice(data);
        }
        if !run.is_empty() {
            self.file.write_all_at(&run, run_off).map_err(io)?;
            self.written += run.len() as u64;
        }
        self.pages.clear();
        Ok(())
    }

    /// Writes what is left; returns the page bytes written in all.
    pub fn finish(mut self) -> Result<u64, JournalError> {
        self.flush()?;
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_written_once_with_their_newest_content_and_deltas_start_from_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.write_all_at(&[5u8; 16], 0).unwrap();
        let mut r = Replay::new(&f, &path, 4, 1 << 20);
        r.page(4, PageData::Whole(b"aaaa")).unwrap();
        r.page(4, PageData::Delta(&[1, 1, b'B'])).unwrap(); // byte 1 = 'B'
        r.page(8, PageData::Delta(&[3, 1, b'C'])).unwrap(); // on the file's 5s
        r.page(20, PageData::Delta(&[0, 1, b'D'])).unwrap(); // past the end: zeros
        r.page(0, PageData::Whole(b"zzzz")).unwrap();
        assert!(matches!(r.page(0, PageData::Delta(&[9, 1, 0])), Err(JournalError::BadDelta { off: 0, .. })));
        assert_eq!(r.finish().unwrap(), 16, "four pages, each once");
        let mut got = vec![0u8; 24];
        f.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"zzzzaBaa\x05\x05\x05C\x05\x05\x05\x05\x00\x00\x00\x00D\x00\x00\x00");
    }

    #[test]
    fn past_its_bound_it_writes_what_it_holds_and_goes_on() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let mut r = Replay::new(&f, &path, 4, 8);
        r.page(0, PageData::Whole(b"aaaa")).unwrap();
        r.page(4, PageData::Whole(b"bbbb")).unwrap();
        // Full: 0 and 4 are written, then the delta reads page 0 back.
        r.page(0, PageData::Delta(&[3, 1, b'A'])).unwrap();
        assert_eq!(r.finish().unwrap(), 12);
        let mut got = vec![0u8; 8];
        f.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"aaaAbbbb");
    }
}
