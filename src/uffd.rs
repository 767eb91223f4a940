//! userfaultfd, for memory that fills in while the guest runs (lazy
//! restore and post-copy migration, through [`crate::fill`]): the guest's
//! first touch of a page that is not there yet blocks its vCPU — KVM
//! faults the page in through the same host page tables — until the VMM
//! places the page (`UFFDIO_COPY`) or a zero page (`UFFDIO_ZEROPAGE`),
//! which wakes it.
//!
//! Missing-page mode works on anonymous memory, shmem/tmpfs (memfd and
//! files under `/dev/shm`) and hugetlbfs — not on ext4 or other disk
//! files, where the page cache fills a page from the file itself. Faults
//! from the kernel on the process's behalf (KVM's) are caught only by a
//! full userfaultfd: root or `CAP_SYS_PTRACE`, or
//! `vm.unprivileged_userfaultfd = 1`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{gpa_to_file_offset, GuestRam, RamRegion};

const PAGE: u64 = 4096;

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` for a page fault (the union's pagefault arm).
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    pad: u32,
}

/// The request numbers (`linux/userfaultfd.h`).
#[allow(missing_docs)]
mod nr {
    use super::{UffdioApi, UffdioCopy, UffdioRange, UffdioRegister, UffdioZeropage, UFFDIO};
    use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

    ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
    ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
    ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
    ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
    ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
    ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
}
use nr::*;

/// The ioctl request numbers this module issues (for seccomp allowlists).
pub fn ioctl_numbers() -> Vec<u64> {
    [UFFDIO_API(), UFFDIO_REGISTER(), UFFDIO_UNREGISTER(), UFFDIO_WAKE(), UFFDIO_COPY(), UFFDIO_ZEROPAGE()]
        .map(u64::from)
        .to_vec()
}

/// Why a userfaultfd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The syscall or an ioctl failed.
    #[error("userfaultfd {op}: {source}{hint}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// A guest RAM region is not in the RAM layout.
    #[error("RAM at {gpa:#x} is not in the layout")]
    NotInLayout {
        /// Guest-physical address of the region.
        gpa: u64,
    },
    /// A guest RAM region has no host mapping.
    #[error("host address of {gpa:#x}: {source}")]
    HostAddress {
        /// Guest-physical address of the region.
        gpa: u64,
        /// What vm-memory said.
        source: vm_memory::GuestMemoryError,
    },
    /// A fault outside guest RAM (nothing else is registered).
    #[error("a fault at host address {addr:#x}, outside RAM")]
    OutsideRam {
        /// The faulting host address.
        addr: u64,
    },
    /// A file offset past the end of guest RAM.
    #[error("file offset {offset:#x} is not RAM")]
    NotRam {
        /// The file offset.
        offset: u64,
    },
}

fn os(op: &'static str) -> UffdError {
    let source = io::Error::last_os_error();
    let hint = match source.raw_os_error() {
        Some(libc::EPERM) => {
            " (catching KVM's faults needs root or CAP_SYS_PTRACE, or sysctl vm.unprivileged_userfaultfd=1)"
        }
        Some(libc::EINVAL) if op == "register" => {
            " (missing-page mode needs anonymous, tmpfs/shmem or hugetlbfs memory: put the memory file on /dev/shm)"
        }
        _ => "",
    };
    UffdError::Os { op, source, hint }
}

/// `TMPFS_MAGIC` from `linux/magic.h`.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether `dir` is on tmpfs (where missing-page mode works for files).
pub fn on_tmpfs(dir: &std::path::Path) -> io::Result<bool> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs reads the NUL-terminated path (`c` outlives the call)
    // and writes one `statfs` into `st`.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type == TMPFS_MAGIC)
}

/// What placing a page found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The page is in place now.
    Placed,
    /// A page was there already (nothing changed; waiters were woken).
    Exists,
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// A new userfaultfd (non-blocking, close-on-exec), API handshake done.
    pub fn new() -> Result<Self, UffdError> {
        // SAFETY: the syscall takes flags only and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(os("create"));
        }
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut api = UffdioApi { api: UFFD_API, ..Default::default() };
        // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which `api` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API() as _, &mut api) } != 0 {
            return Err(os("API handshake"));
        }
        Ok(Uffd { fd })
    }

    /// The fd (to poll).
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Catches first touches of missing pages in `[addr, addr + len)` of
    /// this process's address space (page aligned).
    pub fn register_missing(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut reg =
            UffdioRegister { range: UffdioRange { start: addr, len }, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`;
        // registering a range changes how faults there are handled, not
        // the memory itself.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER() as _, &mut reg) } != 0 {
            return Err(os("register"));
        }
        Ok(())
    }

    /// Stops catching faults in `[addr, addr + len)`.
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let range = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER() as _, &range) } != 0 {
            return Err(os("unregister"));
        }
        Ok(())
    }

    /// Wakes threads waiting on `[addr, addr + len)`.
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let range = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_WAKE reads one `uffdio_range`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE() as _, &range) } != 0 {
            return Err(os("wake"));
        }
        Ok(())
    }

    /// Places `data` (whole pages) at `addr`, atomically per page, and
    /// wakes whoever waits there. A page already present is left alone
    /// ([`Placed::Exists`]).
    pub fn copy(&self, addr: u64, data: &[u8]) -> Result<Placed, UffdError> {
        let mut done = 0u64;
        while done < data.len() as u64 {
            let mut c = UffdioCopy {
                dst: addr + done,
                src: data.as_ptr() as u64 + done,
                len: data.len() as u64 - done,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `len` bytes from `src` (inside
            // `data`, borrowed for the call) and fills pages of a
            // registered range; the kernel checks `dst` is one.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY() as _, &mut c) };
            if r != 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EEXIST) => {
                        self.wake(addr, data.len() as u64)?;
                        return Ok(Placed::Exists);
                    }
                    // Interrupted part way: go on after what was copied.
                    Some(libc::EAGAIN) if c.copy > 0 => {}
                    Some(libc::EAGAIN) => std::thread::yield_now(),
                    _ => return Err(UffdError::Os { op: "copy", source: e, hint: "" }),
                }
            }
            done += c.copy.max(0) as u64;
        }
        Ok(Placed::Placed)
    }

    /// Places zero pages over `[addr, addr + len)` and wakes waiters.
    pub fn zero(&self, addr: u64, len: u64) -> Result<Placed, UffdError> {
        let mut done = 0u64;
        while done < len {
            let mut z =
                UffdioZeropage { range: UffdioRange { start: addr + done, len: len - done }, mode: 0, zeropage: 0 };
            // SAFETY: UFFDIO_ZEROPAGE reads and writes one
            // `uffdio_zeropage` and maps zero pages in a registered range.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE() as _, &mut z) };
            if r != 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EEXIST) => {
                        self.wake(addr, len)?;
                        return Ok(Placed::Exists);
                    }
                    Some(libc::EAGAIN) if z.zeropage > 0 => {}
                    Some(libc::EAGAIN) => std::thread::yield_now(),
                    _ => return Err(UffdError::Os { op: "zeropage", source: e, hint: "" }),
                }
            }
            done += z.zeropage.max(0) as u64;
        }
        Ok(Placed::Placed)
    }

    /// Waits up to `timeout` for the next page fault; returns the faulting
    /// address (None: no fault in time).
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, UffdError> {
        loop {
            let mut msg = UffdMsg::default();
            // SAFETY: read fills at most size_of::<UffdMsg>() bytes of `msg`,
            // a plain struct of the kernel's `uffd_msg` layout.
            let n = unsafe {
                libc::read(self.fd.as_raw_fd(), (&mut msg as *mut UffdMsg).cast(), std::mem::size_of::<UffdMsg>())
            };
            if n == std::mem::size_of::<UffdMsg>() as isize {
                if msg.event == UFFD_EVENT_PAGEFAULT {
                    return Ok(Some(msg.address));
                }
                continue; // Other events are not asked for.
            }
            let e = io::Error::last_os_error();
            if n >= 0 || e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(UffdError::Os { op: "read", source: e, hint: "" });
            }
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: poll reads and writes the one pollfd given.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r == 0 {
                return Ok(None);
            }
            if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return Err(os("poll"));
            }
        }
    }
}

/// Guest RAM as userfaultfd sees it: host addresses by backing-file offset.
#[derive(Debug, Clone)]
pub struct RamMap {
    /// (file offset, host address, length) per region.
    maps: Vec<(u64, u64, u64)>,
}

impl RamMap {
    /// The regions of `ram`, laid out in the file as `layout` says.
    pub fn new(ram: &GuestRam, layout: &[RamRegion]) -> Result<Self, UffdError> {
        let mut maps = Vec::new();
        for r in ram.iter() {
            let gpa = r.start_addr().0;
            let off = gpa_to_file_offset(layout, gpa).ok_or(UffdError::NotInLayout { gpa })?;
            let host = ram
                .get_host_address(GuestAddress(gpa))
                .map_err(|source| UffdError::HostAddress { gpa, source })? as u64;
            maps.push((off, host, r.len()));
        }
        Ok(RamMap { maps })
    }

    /// Registers every region for missing-page faults.
    pub fn register_missing(&self, uffd: &Uffd) -> Result<(), UffdError> {
        self.maps.iter().try_for_each(|&(_, h, len)| uffd.register_missing(h, len))
    }

    /// Unregisters every region.
    pub fn unregister(&self, uffd: &Uffd) -> Result<(), UffdError> {
        self.maps.iter().try_for_each(|&(_, h, len)| uffd.unregister(h, len))
    }

    /// Waits up to `timeout` for the next fault in RAM: the file offset of
    /// the faulting page (None: no fault in time).
    pub fn next_fault(&self, uffd: &Uffd, timeout: Duration) -> Result<Option<u64>, UffdError> {
        let Some(addr) = uffd.next_fault(timeout)? else { return Ok(None) };
        self.offset_of(addr).map(Some).ok_or(UffdError::OutsideRam { addr })
    }

    /// The file offset of the page at host address `addr`.
    pub fn offset_of(&self, addr: u64) -> Option<u64> {
        let page = addr & !(PAGE - 1);
        self.maps.iter().find(|&&(_, h, len)| page >= h && page - h < len).map(|&(off, h, _)| off + (page - h))
    }

    /// `[offset, offset + len)` as (host address, length) runs, split
    /// where regions end.
    pub fn host_runs(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, UffdError> {
        let mut out = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let &(off, h, rlen) =
                self.maps.iter().find(|&&(o, _, l)| at >= o && at - o < l).ok_or(UffdError::NotRam { offset: at })?;
            let n = (off + rlen - at).min(offset + len - at);
            out.push((h + (at - off), n));
            at += n;
        }
        Ok(out)
    }

    /// Places `data` (whole pages) at file offset `offset` and wakes its
    /// waiters; `Exists` if any page was there already.
    pub fn place(&self, uffd: &Uffd, offset: u64, data: &[u8]) -> Result<Placed, UffdError> {
        let mut at = 0usize;
        let mut placed = Placed::Placed;
        for (h, n) in self.host_runs(offset, data.len() as u64)? {
            if uffd.copy(h, &data[at..at + n as usize])? == Placed::Exists {
                placed = Placed::Exists;
            }
            at += n as usize;
        }
        Ok(placed)
    }

    /// Places zero pages over `[offset, offset + len)`; `Exists` if any
    /// page was there already.
    pub fn place_zero(&self, uffd: &Uffd, offset: u64, len: u64) -> Result<Placed, UffdError> {
        let mut placed = Placed::Placed;
        for (h, n) in self.host_runs(offset, len)? {
            if uffd.zero(h, n)? == Placed::Exists {
                placed = Placed::Exists;
            }
        }
        Ok(placed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread touching a missing page of a memfd mapping waits until the
    /// page is placed, and reads what was placed.
    #[test]
    fn a_first_touch_waits_for_the_page_placed() {
        let uffd = match Uffd::new() {
            Ok(u) => u,
            Err(e) => panic!("userfaultfd is needed for post-copy: {e}"),
        };
        let page = 4096usize;
        // SAFETY: memfd_create takes a C string and flags.
        let fd = unsafe { libc::memfd_create(c"smudge-uffd-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sizing our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4 * page as i64) }, 0);
        // SAFETY: a new shared mapping of our memfd; unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let base = addr as u64;
        uffd.register_missing(base, 4 * page as u64).unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: the mapping lives until the thread is joined.
            unsafe { std::ptr::read_volatile((base + page as u64 + 8) as *const u64) }
        });
        let fault = uffd.next_fault(Duration::from_secs(5)).unwrap().expect("no fault");
        assert_eq!(fault & !(page as u64 - 1), base + page as u64);
        let data = vec![0x5au8; page];
        assert_eq!(uffd.copy(base + page as u64, &data).unwrap(), Placed::Placed);
        assert_eq!(reader.join().unwrap(), 0x5a5a_5a5a_5a5a_5a5a);
        // Placing it again finds it there.
        assert_eq!(uffd.copy(base + page as u64, &data).unwrap(), Placed::Exists);
        assert_eq!(uffd.zero(base + 2 * page as u64, page as u64).unwrap(), Placed::Placed);
        uffd.unregister(base, 4 * page as u64).unwrap();
        // SAFETY: unmapping the mapping made above; nothing uses it now.
        unsafe { libc::munmap(addr, 4 * page) };
    }
}
