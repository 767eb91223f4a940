//! `smudge restore` (the default): the guest runs first, its memory and
//! its new memory file follow.
//!
//! ```text
//!  snapshot chain ──(fault thread, prefetch: fill-behind)──▶ guest RAM (memfd, MAP_SHARED)
//!                                                                │ dirty log on from the
//!                                                                │ guest's first instruction
//!  NEW ◀──(every page in: RAM copied, synced; then writeback of the guest's pages)──┘
//! ```
//!
//! - Guest RAM is a memfd registered with userfaultfd
//!   ([`crate::persist::lazy`]): the guest starts as soon as KVM is set
//!   up and its pages load behind it, on first touch or by the prefetch,
//!   each 1 MiB chunk checked before any of its bytes is placed.
//! - NEW, on any filesystem, becomes the run's backing file: once the fill
//!   is done, guest RAM is copied into it and synced ([`NewMemoryFile`];
//!   the chain is read once, by the fill); only then does the writeback
//!   engine write the guest's pages into it ([`smudge::sink::ImageReady`]). The
//!   dirty log runs from the guest's first instruction and nothing else
//!   clears the engine's pages, so every page the guest wrote reaches NEW
//!   after the copy, never before it: older data can never overwrite a
//!   newer page.
//!
//! Userfaultfd must catch KVM's faults: root or `CAP_SYS_PTRACE`, or
//! `sysctl vm.unprivileged_userfaultfd=1`. Without it (or without the
//! writeback that keeps NEW up to date) the restore copies the chain into
//! NEW first and runs the guest on it in place ([`why_not_behind`] says
//! why, in one line).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use smudge::sink::ImageReady;
use smudge::snapshot::SnapshotError;

use crate::control::cli::RestoreArgs;

/// Why this restore cannot run the guest before its memory is in (None:
/// it can): the fallback's one line of explanation.
pub fn why_not_behind(r: &RestoreArgs) -> Option<String> {
    let run = &r.run;
    if run.no_dirty_log || run.no_writeback || run.writeback_image.is_some() {
        return Some(
            "--no-dirty-log, --no-writeback or --writeback-image: the memory file could not follow the guest's \
             writes"
                .into(),
        );
    }
    if r.test_no_userfaultfd {
        return Some("no userfaultfd (refused by --test-no-userfaultfd)".into());
    }
    match smudge::uffd::Uffd::new() {
        Ok(_) => None,
        Err(e) => Some(format!("no userfaultfd: {e}")),
    }
}

/// The new memory file of a default restore: once the fill has placed
/// every page, built from guest RAM (each chunk was checked before it was
/// placed; the guest's writes since are in the dirty log too), then
/// synced; until then the run's image sink waits ([`ImageReady`]).
#[derive(Debug)]
pub struct NewMemoryFile {
    file: File,
    path: PathBuf,
    size: u64,
    /// Guest RAM's file (the memfd), to copy from.
    ram: Option<File>,
    ready: ImageReady,
    started_at: Instant,
}

impl NewMemoryFile {
    /// Creates `path` (which must not exist) as a sparse file of `size`
    /// bytes. `started_at`: when the command started.
    pub fn create(path: &Path, size: u64, started_at: Instant) -> Result<Self, SnapshotError> {
        let io = |op| move |source| SnapshotError::Io { path: path.to_path_buf(), op, source };
        let file = match OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SnapshotError::MemExists(path.to_path_buf()))
            }
            Err(e) => return Err(io("create")(e)),
        };
        if let Err(e) = file.set_len(size) {
            let _ = std::fs::remove_file(path);
            return Err(io("size")(e));
        }
        Ok(NewMemoryFile { file, path: path.to_path_buf(), size, ram: None, ready: ImageReady::new(), started_at })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens when the file holds the snapshot's memory, synced (or could
    /// not be made to): the run's image sink waits for it.
    pub fn ready(&self) -> ImageReady {
        self.ready.clone()
    }

    /// The file guest RAM lives in, to build this one from.
    pub fn copy_from(&mut self, ram: &File) -> std::io::Result<()> {
        self.ram = Some(ram.try_clone()?);
        Ok(())
    }

    /// Every page is in: copies guest RAM's data ranges into the file,
    /// syncs it and lets writeback in. A page the guest writes meanwhile
    /// may be copied torn; it is dirty in the log, and writeback writes it
    /// again once the file is ready.
    pub fn finish(&mut self) {
        let r = self.build();
        let line = match r {
            Ok(bytes) => {
                self.ready.built();
                format!(
                    "smudge: restore: {} holds the snapshot's memory ({} MiB written, synced) {:.1} ms after \
                     smudge started; the guest's writes reach it through writeback from now on",
                    self.path.display(),
                    bytes >> 20,
                    self.started_at.elapsed().as_secs_f64() * 1e3
                )
            }
            Err(why) => {
                self.ready.failed(&why);
                format!("smudge: restore: building {} failed: {why}", self.path.display())
            }
        };
        let _ = writeln!(std::io::stderr(), "{line}");
    }

    /// Copies and syncs; returns the bytes copied.
    fn build(&self) -> Result<u64, String> {
        let ram = self.ram.as_ref().ok_or("guest RAM's file was never given")?;
        let ranges =
            smudge::file_io::data_ranges(ram, self.size).map_err(|e| format!("SEEK_DATA in guest RAM: {e}"))?;
        let mut bytes = 0;
        for (off, len) in ranges {
            smudge::file_io::copy_range(ram, &self.file, off, len).map_err(|e| format!("copy: {e}"))?;
            bytes += len;
        }
        self.file.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
        Ok(bytes)
    }
}
