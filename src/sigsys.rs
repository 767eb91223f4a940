//! SIGSYS: how a seccomp filter's trap ends the process.
//!
//! The VMM's seccomp filters (in `smudge-vmm`) trap a forbidden syscall:
//! the kernel does not run it and sends the thread `SIGSYS`. The handler
//! here writes one line naming the thread and the syscall to stderr, e.g.
//!
//! ```text
//! smudge: seccomp: thread vcpu0 made forbidden syscall 41 (socket); stopping
//! ```
//!
//! and exits the process with [`EXIT_SECCOMP`]. It runs on the thread that
//! made the call, with that thread's filters in force, so it uses only
//! what every filter allows: `prctl(PR_GET_NAME)` for the thread's name,
//! `write(2)` of a buffer on its stack, and `_exit` (`exit_group`). It
//! takes no lock and allocates nothing (async-signal-safe).
//!
//! [`prepare_libc`] settles beforehand what glibc would otherwise work out
//! lazily, with a syscall a filter may forbid, on whichever thread needs it.

use std::io;

use libc::{c_int, c_uint, c_void, siginfo_t};

/// Exit code of a process stopped because a thread made a syscall its
/// seccomp filter forbids (the codes 100-105 are the VMM's own).
pub const EXIT_SECCOMP: u8 = 106;

/// `si_code` of a SIGSYS raised by a seccomp filter (`SYS_SECCOMP`).
const SYS_SECCOMP: c_int = 1;

/// The head of a `siginfo_t` for SIGSYS, as the kernel lays it out
/// (`struct { void *_call_addr; int _syscall; unsigned int _arch; }
/// _sigsys` in the union after three ints, pointer-aligned). `libc` does
/// not expose these fields.
#[repr(C)]
struct SigsysInfo {
    _signo: c_int,
    _errno: c_int,
    code: c_int,
    #[cfg(target_pointer_width = "64")]
    _pad: c_int,
    _call_addr: *mut c_void,
    syscall: c_int,
    _arch: c_uint,
}

// The layout above must fit inside the kernel's 128-byte siginfo_t.
const _: () = assert!(std::mem::size_of::<SigsysInfo>() <= std::mem::size_of::<siginfo_t>());

/// Installs the SIGSYS handler for the whole process (once, before any
/// filter that traps).
pub fn install_handler() -> io::Result<()> {
    // SAFETY: an all-zero `sigaction` is a valid value (no handler, no
    // flags, empty mask); the fields that matter are set below.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(c_int, *mut siginfo_t, *mut c_void) = on_sigsys;
    act.sa_sigaction = handler as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act.sa_mask` is a valid, owned sigset_t. Every signal is
    // blocked while the handler runs (a vCPU kick must not interrupt it).
    if unsafe { libc::sigfillset(&mut act.sa_mask) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `act` is fully initialised and points at a handler that only
    // makes async-signal-safe calls; no old action is asked for.
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Settles, before any filter is on, what glibc would otherwise work out
/// later with a syscall a vCPU's or the flusher's filter forbids: malloc's
/// arena limit. glibc counts the online CPUs (by reading
/// `/sys/devices/system/cpu/online`) the first time the process makes its
/// ninth arena, on whichever thread that happens to be; this sets the limit
/// to the number glibc would compute (8 arenas per CPU on 64-bit targets,
/// 2 on 32-bit), unless the user chose one (`MALLOC_ARENA_MAX` or the
/// `glibc.malloc.arena_max` tunable). Nothing to do with other C libraries.
pub fn prepare_libc() {
    #[cfg(target_env = "gnu")]
    {
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() || tunables.contains("glibc.malloc.arena_max") {
            return;
        }
        // SAFETY: sysconf only reads a system parameter (here glibc's own
        // count of online CPUs, the one malloc would use).
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let per_cpu = if cfg!(target_pointer_width = "64") { 8 } else { 2 };
        let arenas = c_int::try_from(cpus.max(1).saturating_mul(per_cpu)).unwrap_or(c_int::MAX);
        // SAFETY: mallopt sets one of malloc's parameters; M_ARENA_MAX takes
        // any positive int and only bounds how many arenas malloc creates.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
    }
}

extern "C" fn on_sigsys(_sig: c_int, info: *mut siginfo_t, _ctx: *mut c_void) {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into
    // `name`, which has 16; every seccomp filter of smudge allows it.
    let named = unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) } == 0;
    let len = if named { name.iter().position(|&b| b == 0).unwrap_or(name.len()) } else { 0 };
    let thread = if len > 0 { &name[..len] } else { b"?".as_slice() };
    let syscall = if info.is_null() {
        None
    } else {
        // SAFETY: the kernel passes a valid siginfo_t (SA_SIGINFO), which
        // `SigsysInfo` fits in (checked at compile time); for SIGSYS with
        // si_code SYS_SECCOMP the `_sigsys` member is the one filled in.
        let i = unsafe { &*(info as *const SigsysInfo) };
        (i.code == SYS_SECCOMP).then_some(i64::from(i.syscall))
    };
    let mut buf = [0u8; 192];
    let n = report(&mut buf, thread, syscall);
    let mut done = 0;
    while done < n {
        // SAFETY: writes bytes of `buf` that `report` filled, to fd 2; write
        // is async-signal-safe and allowed by every filter.
        let w = unsafe { libc::write(2, buf[done..n].as_ptr().cast(), n - done) };
        if w > 0 {
            done += w as usize;
        } else if w < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            break;
        }
    }
    // SAFETY: _exit ends the process at once (exit_group) without running
    // atexit handlers or destructors: async-signal-safe.
    unsafe { libc::_exit(c_int::from(EXIT_SECCOMP)) }
}

/// A fixed buffer filled without allocating.
struct Line<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Line<'_> {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_num(&mut self, v: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut u = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (u % 10) as u8;
            u /= 10;
            if u == 0 {
                break;
            }
        }
        if v < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

/// Writes the line the handler prints into `buf` (truncated to fit) and
/// returns its length: `thread` is the thread's name, `syscall` the
/// forbidden call's number (None: a SIGSYS that did not come from seccomp).
pub fn report(buf: &mut [u8], thread: &[u8], syscall: Option<i64>) -> usize {
    let mut l = Line { buf, len: 0 };
    l.push(b"smudge: seccomp: thread ");
    l.push(thread);
    match syscall {
        Some(nr) => {
            l.push(b" made forbidden syscall ");
            l.push_num(nr);
            if let Some(name) = syscall_name(nr) {
                l.push(b" (");
                l.push(name.as_bytes());
                l.push(b")");
            }
        }
        None => l.push(b" got a SIGSYS that no seccomp filter sent"),
    }
    l.push(b"; stopping\n");
    l.len
}

/// The name of syscall `nr` on this architecture (x86_64; None elsewhere
/// or for numbers without one).
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let (table, first) = if nr >= 424 { (NAMES_424, 424) } else { (NAMES_0, 0) };
        let i = usize::try_from(nr - first).ok()?;
        table.split(' ').nth(i).filter(|s| *s != "-")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = nr;
        None
    }
}

/// x86_64 syscall names 0..=335, space-separated, in number order.
#[cfg(target_arch = "x86_64")]
const NAMES_0: &str = concat!(
    "read write open close stat fstat lstat poll lseek mmap mprotect munmap brk rt_sigaction ",
    "rt_sigprocmask rt_sigreturn ioctl pread64 pwrite64 readv writev access pipe select sched_yield ",
    "mremap msync mincore madvise shmget shmat shmctl dup dup2 pause nanosleep getitimer alarm setitimer ",
    "getpid sendfile socket connect accept sendto recvfrom sendmsg recvmsg shutdown bind listen ",
    "getsockname getpeername socketpair setsockopt getsockopt clone fork vfork execve exit wait4 kill ",
    "uname semget semop semctl shmdt msgget msgsnd msgrcv msgctl fcntl flock fsync fdatasync truncate ",
    "ftruncate getdents getcwd chdir fchdir rename mkdir rmdir creat link unlink symlink readlink chmod ",
    "fchmod chown fchown lchown umask gettimeofday getrlimit getrusage sysinfo times ptrace getuid ",
    "syslog getgid setuid setgid geteuid getegid setpgid getppid getpgrp setsid setreuid setregid ",
    "getgroups setgroups setresuid getresuid setresgid getresgid getpgid setfsuid setfsgid getsid capget ",
    "capset rt_sigpending rt_sigtimedwait rt_sigqueueinfo rt_sigsuspend sigaltstack utime mknod uselib ",
    "personality ustat statfs fstatfs sysfs getpriority setpriority sched_setparam sched_getparam ",
    "sched_setscheduler sched_getscheduler sched_get_priority_max sched_get_priority_min ",
    "sched_rr_get_interval mlock munlock mlockall munlockall vhangup modify_ldt pivot_root _sysctl prctl ",
    "arch_prctl adjtimex setrlimit chroot sync acct settimeofday mount umount2 swapon swapoff reboot ",
    "sethostname setdomainname iopl ioperm create_module init_module delete_module get_kernel_syms ",
    "query_module quotactl nfsservctl getpmsg putpmsg afs_syscall tuxcall security gettid readahead ",
    "setxattr lsetxattr fsetxattr getxattr lgetxattr fgetxattr listxattr llistxattr flistxattr ",
    "removexattr lremovexattr fremovexattr tkill time futex sched_setaffinity sched_getaffinity ",
    "set_thread_area io_setup io_destroy io_getevents io_submit io_cancel get_thread_area lookup_dcookie ",
    "epoll_create epoll_ctl_old epoll_wait_old remap_file_pages getdents64 set_tid_address ",
    "restart_syscall semtimedop fadvise64 timer_create timer_settime timer_gettime timer_getoverrun ",
    "timer_delete clock_settime clock_gettime clock_getres clock_nanosleep exit_group epoll_wait ",
    "epoll_ctl tgkill utimes vserver mbind set_mempolicy get_mempolicy mq_open mq_unlink mq_timedsend ",
    "mq_timedreceive mq_notify mq_getsetattr kexec_load waitid add_key request_key keyctl ioprio_set ",
    "ioprio_get inotify_init inotify_add_watch inotify_rm_watch migrate_pages openat mkdirat mknodat ",
    "fchownat futimesat newfstatat unlinkat renameat linkat symlinkat readlinkat fchmodat faccessat ",
    "pselect6 ppoll unshare set_robust_list get_robust_list splice tee sync_file_range vmsplice ",
    "move_pages utimensat epoll_pwait signalfd timerfd_create eventfd fallocate timerfd_settime ",
    "timerfd_gettime accept4 signalfd4 eventfd2 epoll_create1 dup3 pipe2 inotify_init1 preadv pwritev ",
    "rt_tgsigqueueinfo perf_event_open recvmmsg fanotify_init fanotify_mark prlimit64 name_to_handle_at ",
    "open_by_handle_at clock_adjtime syncfs sendmmsg setns getcpu process_vm_readv process_vm_writev ",
    "kcmp finit_module sched_setattr sched_getattr renameat2 seccomp getrandom memfd_create ",
    "kexec_file_load bpf execveat userfaultfd membarrier mlock2 copy_file_range preadv2 pwritev2 ",
    "pkey_mprotect pkey_alloc pkey_free statx io_pgetevents rseq uretprobe",
);

/// x86_64 syscall names from 424 on.
#[cfg(target_arch = "x86_64")]
const NAMES_424: &str = concat!(
    "pidfd_send_signal io_uring_setup io_uring_enter io_uring_register open_tree move_mount fsopen ",
    "fsconfig fsmount fspick pidfd_open clone3 close_range openat2 pidfd_getfd faccessat2 ",
    "process_madvise epoll_pwait2 mount_setattr quotactl_fd landlock_create_ruleset landlock_add_rule ",
    "landlock_restrict_self memfd_secret process_mrelease futex_waitv set_mempolicy_home_node cachestat ",
    "fchmodat2 map_shadow_stack futex_wake futex_wait futex_requeue statmount listmount ",
    "lsm_get_self_attr lsm_set_self_attr lsm_list_modules mseal",
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn names_match_libc_numbers() {
        for (nr, name) in [
            (libc::SYS_read, "read"),
            (libc::SYS_socket, "socket"),
            (libc::SYS_ioctl, "ioctl"),
            (libc::SYS_execve, "execve"),
            (libc::SYS_openat, "openat"),
            (libc::SYS_rseq, "rseq"),
            (335, "uretprobe"),
            (libc::SYS_pidfd_send_signal, "pidfd_send_signal"),
            (libc::SYS_clone3, "clone3"),
            (libc::SYS_mseal, "mseal"),
        ] {
            assert_eq!(syscall_name(nr), Some(name), "{nr}");
        }
        assert_eq!(syscall_name(-1), None);
        assert_eq!(syscall_name(400), None);
        assert_eq!(syscall_name(100_000), None);
    }

    #[test]
    fn report_line() {
        let mut buf = [0u8; 192];
        let n = report(&mut buf, b"vcpu0", Some(41));
        let expect = if cfg!(target_arch = "x86_64") {
            "smudge: seccomp: thread vcpu0 made forbidden syscall 41 (socket); stopping\n"
        } else {
            "smudge: seccomp: thread vcpu0 made forbidden syscall 41; stopping\n"
        };
        assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), expect);
        let n = report(&mut buf, b"flusher", Some(999));
        assert_eq!(&buf[..n], b"smudge: seccomp: thread flusher made forbidden syscall 999; stopping\n");
        let n = report(&mut buf, b"?", None);
        assert_eq!(&buf[..n], b"smudge: seccomp: thread ? got a SIGSYS that no seccomp filter sent; stopping\n");
        let mut small = [0u8; 10];
        assert_eq!(report(&mut small, b"vcpu0", Some(41)), 10);
    }
}
