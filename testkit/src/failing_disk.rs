//! A disk that fails on demand with a real `EIO`, for the tests of what
//! smudge does when a disk breaks: an ext4 filesystem (no journal of its
//! own, `errors=continue`) on a loop device. [`FailingDisk::fail`] shrinks
//! the loop device's size limit (`LOOP_SET_STATUS64`) to the blocks the
//! filesystem's own metadata holds, so every read or write of file data
//! fails in the block layer ("attempt to access beyond end of device") and
//! reaches smudge as `EIO` from `fdatasync` or `read`, the way a disk with
//! bad sectors would; [`FailingDisk::recover`] lifts the limit, and the
//! data is there again. (This machine's kernel has no device-mapper, whose
//! `error` target would be the usual tool.)
//!
//! Needs root, `losetup`, `mkfs.ext4`, `dumpe2fs`, `e2fsck`, `mount`. The
//! mount and the loop device are released on drop, also when a test fails.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `LOOP_SET_STATUS64` and `LOOP_GET_STATUS64` (linux/loop.h).
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// An ext4 filesystem on a loop device whose data can be made to fail.
#[derive(Debug)]
pub struct FailingDisk {
    /// Where the filesystem is mounted.
    pub mount: PathBuf,
    /// The loop device (`/dev/loopN`).
    pub device: PathBuf,
    image: PathBuf,
    /// Bytes of the device that stay readable while it fails: the
    /// filesystem's metadata, up to its first free block at creation.
    keep: u64,
}

fn run(cmd: &mut Command) -> io::Result<String> {
    let out = cmd.output().map_err(|e| io::Error::other(format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The byte where the filesystem's first free block starts.
fn first_free_byte(device: &Path) -> io::Result<u64> {
    let dump = run(Command::new("dumpe2fs").arg(device))?;
    let field = |name: &str| dump.lines().find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()));
    let block: u64 =
        field("Block size:").and_then(|v| v.parse().ok()).ok_or_else(|| io::Error::other("no block size"))?;
    // Group 0's "  Free blocks: 15-32767" (not the superblock's total).
    let first: u64 = dump
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Free blocks: "))
        .find_map(|v| v.split_once('-').and_then(|(n, _)| n.trim().parse().ok()))
        .ok_or_else(|| io::Error::other(format!("no free block range in dumpe2fs {}", device.display())))?;
    Ok(first * block)
}

impl FailingDisk {
    /// A `size`-byte filesystem (a sparse image in `dir`) mounted at
    /// `dir/mnt`.
    pub fn new(dir: &Path, size: u64) -> io::Result<FailingDisk> {
        std::fs::create_dir_all(dir.join("mnt"))?;
        let image = dir.join("disk.img");
        File::create(&image)?.set_len(size)?;
        let device = run(Command::new("losetup").args(["--find", "--show"]).arg(&image))?;
        let mut disk = FailingDisk { mount: dir.join("mnt"), device: PathBuf::from(device.trim()), image, keep: 0 };
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-O", "^has_journal,^resize_inode", "-N", "64"])
            .args(["-E", "lazy_itable_init=0,nodiscard"])
            .arg(&disk.device))?;
        disk.keep = first_free_byte(&disk.device)?;
        disk.mount_it()?;
        Ok(disk)
    }

    fn mount_it(&self) -> io::Result<()> {
        run(Command::new("mount").args(["-t", "ext4", "-o", "errors=continue"]).arg(&self.device).arg(&self.mount))
            .map(drop)
    }

    fn set_limit(&self, bytes: u64) -> io::Result<()> {
        let dev = std::fs::OpenOptions::new().read(true).write(true).open(&self.device)?;
        let mut info = LoopInfo64 {
            device: 0,
            inode: 0,
            rdevice: 0,
            offset: 0,
            sizelimit: 0,
            number: 0,
            encrypt_type: 0,
            encrypt_key_size: 0,
            flags: 0,
            file_name: [0; 64],
            crypt_name: [0; 64],
            encrypt_key: [0; 32],
            init: [0; 2],
        };
        // SAFETY: `dev` is an open loop device and `info` a live, writable
        // `struct loop_info64` of the kernel's layout, which the ioctl fills.
        if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64, &mut info as *mut LoopInfo64) } != 0 {
            return Err(io::Error::last_os_error());
        }
        info.sizelimit = bytes;
        // SAFETY: as above; the kernel only reads `info`.
        if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_STATUS64, &info as *const LoopInfo64) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// From now on every read and write of file data fails with `EIO`
    /// (the filesystem's metadata stays readable and writable).
    pub fn fail(&self) -> io::Result<()> {
        self.set_limit(self.keep)
    }

    /// The data is readable and writable again (the filesystem stays
    /// mounted; what failed to be written was not).
    pub fn recover(&self) -> io::Result<()> {
        self.set_limit(0)
    }

    /// Drops what the page cache holds of `file` (`dd iflag=nocache`),
    /// as a reboot would: a read then goes to the disk. (A failing disk
    /// cannot be mounted again: ext4 refuses a device smaller than itself.)
    pub fn drop_cache(&self, file: &Path) -> io::Result<()> {
        let mut input = std::ffi::OsString::from("if=");
        input.push(file);
        run(Command::new("dd").arg(input).args(["iflag=nocache", "count=0", "status=none"])).map(drop)
    }

    /// Unmounts, checks the filesystem (`e2fsck -fy`, as after any disk
    /// error) and mounts it again. Not while the disk fails.
    pub fn remount(&self) -> io::Result<()> {
        run(Command::new("umount").arg(&self.mount))?;
        // 0: clean, 1: errors fixed; both leave a usable filesystem.
        let st = Command::new("e2fsck").args(["-f", "-y"]).arg(&self.device).output()?;
        if !matches!(st.status.code(), Some(0 | 1)) {
            return Err(io::Error::other(format!(
                "e2fsck {}: {}: {}",
                self.device.display(),
                st.status,
                String::from_utf8_lossy(&st.stdout)
            )));
        }
        self.mount_it()
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = self.recover();
        let unmounted = Command::new("umount").arg(&self.mount).output().is_ok_and(|o| o.status.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).output();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Whether `file` (guest RAM at backing-file offsets, e.g. a journal's
/// base image) has data — no hole — in every page a `workload=rate
/// pages=N` guest writes: its generation table and its working set. A
/// checkpoint into it then overwrites blocks the file has: allocating new
/// blocks of an ext4 file while its disk fails can leave `fdatasync`
/// looping in the kernel (`do_writepages` retrying `ENOMEM`), a process
/// no signal ends until the disk is back.
pub fn holds_guest_pages(file: &Path, pages: u64) -> bool {
    let ws = guest_abi::ws_base_for(pages);
    let wanted = [(guest_abi::gen_table_addr(0), guest_abi::gen_table_addr(pages)), (ws, ws + pages * 4096)];
    let Ok(f) = File::open(file) else { return false };
    let Ok(ranges) = smudge::file_io::data_ranges(&f, ws + pages * 4096) else { return false };
    wanted.iter().all(|&(from, to)| {
        let mut at = from;
        for &(off, len) in &ranges {
            if off <= at && off + len > at {
                at = off + len;
            }
        }
        at >= to
    })
}
