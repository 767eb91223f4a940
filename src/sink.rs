//! Sinks: where copies of dirty pages go. The image-file sink `pwrite`s
//! pages into another file at their guest RAM offsets (the backing file's
//! layout), so the image can be compared with, or stand in for, the memory
//! file. Snapshots and tests use it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use crate::dirty_set::DirtySet;
use crate::memory::{ram_layout, GuestRam, RamRegion};

/// Why a sink write failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Creating or opening the image failed.
    #[error("{path}: cannot create image file")]
    Create {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading guest memory failed.
    #[error("reading guest memory at {gpa:#x}+{len:#x}: {msg}")]
    ReadGuest {
        /// Address.
        gpa: u64,
        /// Length.
        len: u64,
        /// vm-memory's message.
        msg: String,
    },
    /// Writing the image failed (the pages stay dirty for the caller).
    #[error("{path}: writing {len} bytes at offset {offset:#x} failed")]
    Write {
        /// The image.
        path: PathBuf,
        /// File offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A page outside guest RAM.
    #[error("guest address {gpa:#x} is not in RAM")]
    NotInRam {
        /// Address.
        gpa: u64,
    },
}

/// A file holding guest RAM at its backing-file offsets.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    path: PathBuf,
    layout: Vec<RamRegion>,
    buf: Vec<u8>,
}

impl ImageFile {
    /// Opens `path` (created if missing) as an image of `size` bytes of RAM.
    pub fn open(path: &Path, size: u64) -> Result<Self, SinkError> {
        let create = |source| SinkError::Create { path: path.to_path_buf(), source };
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(create)?;
        file.set_len(size).map_err(create)?;
        Ok(ImageFile { file, path: path.to_path_buf(), layout: ram_layout(size), buf: Vec::new() })
    }

    fn file_offset(&self, gpa: u64) -> Result<u64, SinkError> {
        self.layout
            .iter()
            .find(|r| gpa >= r.gpa && gpa < r.gpa + r.len)
            .map(|r| r.file_offset + (gpa - r.gpa))
            .ok_or(SinkError::NotInRam { gpa })
    }

    /// Copies every page of `set` from `ram` into the image, one `pwrite`
    /// per coalesced extent. Returns the bytes written.
    pub fn write_set(&mut self, ram: &GuestRam, set: &DirtySet) -> Result<u64, SinkError> {
        let mut total = 0;
        for e in set.extents() {
            let offset = self.file_offset(e.gpa)?;
            self.buf.resize(e.len as usize, 0);
            ram.read_slice(&mut self.buf, GuestAddress(e.gpa)).map_err(|err| SinkError::ReadGuest {
                gpa: e.gpa,
                len: e.len,
                msg: err.to_string(),
            })?;
            self.file.write_all_at(&self.buf, offset).map_err(|source| SinkError::Write {
                path: self.path.clone(),
                offset,
                len: e.len,
                source,
            })?;
            total += e.len;
        }
        Ok(total)
    }
}
