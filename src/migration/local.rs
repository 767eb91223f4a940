//! Same-host migration by RAM-file handover (`smudge ctl migrate --local`).
//!
//! Guest RAM is a `MAP_SHARED` file, so a second smudge on the same host
//! can map the very same file: the page cache is the guest's memory, and
//! only vCPU and device state has to travel. The source names the file in
//! its `Hello` ([`LocalRam`]); the destination opens it by that path and
//! checks it is the same inode on the same filesystem of the same running
//! kernel (boot id) before it touches anything — a path alone could name
//! another file on another host.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the running kernel publishes its boot id (a UUID per boot).
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The source's RAM file, as the destination must find it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRam {
    /// Absolute path of the RAM file.
    pub path: PathBuf,
    /// The boot id of the kernel the source runs on.
    pub boot_id: String,
    /// Device of the filesystem holding the file.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
}

/// Why a handover cannot be made or taken.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// Reading the boot id, resolving the path or stat failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Guest RAM is not the file at its path (RAM in shared memory, the
    /// default of `smudge run`): there is nothing to hand over.
    #[error("guest RAM is not a file that can be handed over ({path}): run the source with --in-place for --local")]
    NotOnDisk {
        /// The path RAM was described by.
        path: PathBuf,
    },
    /// The destination runs on another kernel.
    #[error("--local needs both ends on one host: the source runs on boot {source_boot}, this side on {here}")]
    OtherHost {
        /// The source's boot id.
        source_boot: String,
        /// This side's.
        here: String,
    },
    /// The path names another file than the source's.
    #[error("{path}: not the source's RAM file (device/inode {got:?}, the source's is {want:?})")]
    OtherFile {
        /// The path.
        path: PathBuf,
        /// What it is here.
        got: (u64, u64),
        /// What the source has.
        want: (u64, u64),
    },
    /// The file's size is not the announced RAM size.
    #[error("{path}: {len} bytes, the guest has {mem_size} bytes of RAM")]
    Size {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The RAM size announced.
        mem_size: u64,
    },
}

fn boot_id() -> Result<String, LocalError> {
    std::fs::read_to_string(BOOT_ID)
        .map(|s| s.trim().to_string())
        .map_err(|source| LocalError::Io { what: format!("reading {BOOT_ID}"), source })
}

impl LocalRam {
    /// Describes the RAM file `file`, opened from `path`.
    pub fn describe(path: &Path, file: &File) -> Result<Self, LocalError> {
        let path = std::path::absolute(path)
            .map_err(|source| LocalError::Io { what: format!("resolving {}", path.display()), source })?;
        let md =
            file.metadata().map_err(|source| LocalError::Io { what: format!("stat {}", path.display()), source })?;
        match std::fs::metadata(&path) {
            Ok(there) if (there.dev(), there.ino()) == (md.dev(), md.ino()) => {}
            _ => return Err(LocalError::NotOnDisk { path }),
        }
        Ok(LocalRam { path, boot_id: boot_id()?, dev: md.dev(), ino: md.ino() })
    }

    /// Checks that `file` (opened from [`Self::path`] on this side) is the
    /// source's RAM file, of `mem_size` bytes, on this very host.
    pub fn check(&self, file: &File, mem_size: u64) -> Result<(), LocalError> {
        let here = boot_id()?;
        if here != self.boot_id {
            return Err(LocalError::OtherHost { source_boot: self.boot_id.clone(), here });
        }
        let md = file
            .metadata()
            .map_err(|source| LocalError::Io { what: format!("stat {}", self.path.display()), source })?;
        if (md.dev(), md.ino()) != (self.dev, self.ino) {
            return Err(LocalError::OtherFile {
                path: self.path.clone(),
                got: (md.dev(), md.ino()),
                want: (self.dev, self.ino),
            });
        }
        if md.len() != mem_size {
            return Err(LocalError::Size { path: self.path.clone(), len: md.len(), mem_size });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_file_passes_and_another_is_named() {
        let dir = std::env::temp_dir().join(format!("smudge-local-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        for p in [&a, &b] {
            File::create(p).unwrap().set_len(1 << 20).unwrap();
        }
        let desc = LocalRam::describe(&a, &File::open(&a).unwrap()).unwrap();
        assert!(desc.path.is_absolute());
        desc.check(&File::open(&a).unwrap(), 1 << 20).unwrap();
        let e = desc.check(&File::open(&b).unwrap(), 1 << 20).unwrap_err();
        assert!(matches!(e, LocalError::OtherFile { .. }), "{e}");
        let e = desc.check(&File::open(&a).unwrap(), 2 << 20).unwrap_err();
        assert!(e.to_string().contains("1048576 bytes"), "{e}");
        let other = LocalRam { boot_id: "another-boot".into(), ..desc };
        let e = other.check(&File::open(&a).unwrap(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("one host"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Guest RAM in a memfd (`smudge run`'s default) has no file to hand
    /// over: describing it fails and says what to do; so does a path whose
    /// file is not the RAM's.
    #[test]
    fn ram_that_is_not_the_file_at_its_path_is_refused() {
        let ram = crate::memory::BackingFile::memfd("local-test", 1 << 20).unwrap();
        let e = LocalRam::describe(ram.path(), ram.file()).unwrap_err();
        assert!(matches!(e, LocalError::NotOnDisk { .. }), "{e}");
        assert!(e.to_string().contains("run the source with --in-place for --local"), "{e}");
        let other = tempfile::NamedTempFile::new().unwrap();
        let e = LocalRam::describe(other.path(), ram.file()).unwrap_err();
        assert!(matches!(e, LocalError::NotOnDisk { .. }), "{e}");
    }
}
