//! Seccomp filters: one allowlist per kind of thread, on by default for
//! `run`, `restore` and `migrate-recv` (`--no-seccomp` turns them off).
//!
//! - **VMM**: installed on the main thread in [`crate::vm::run`] while KVM
//!   is set up on a thread of its own (the one thread without it: it ends
//!   before the guest runs), before an incoming migration is read and
//!   before any other thread starts, so all of them inherit it (API
//!   connections, snapshots, migration, pre-copy, heatmap, auto-converge).
//!   Files, sockets, epoll, the KVM ioctls smudge issues after setup,
//!   thread spawns, signals to its own threads.
//! - **vCPU**: added by each vCPU thread before its first `KVM_RUN`:
//!   `KVM_RUN`, the state-save and dirty-log ioctls, sleeping and waking,
//!   writes (serial output, logs, eventfds), memory allocation.
//! - **flusher**: added by the writeback thread: positional writes, syncs,
//!   the dirty-log ioctls, kicking the vCPUs, sleeping, allocation, logs.
//! - **signals**: the thread that takes SIGTERM and SIGINT
//!   ([`crate::control::signals`]), started before the VMM filter goes on (it does
//!   not inherit it), so its own list stands alone: waiting for the
//!   signals, writing the message and to the event loop's eventfd, shutting
//!   down a migration's socket, locks, allocation, `exit_group`.
//!
//! Filters stack: a vCPU or flusher thread runs under the VMM filter and
//! its own, so it may only make calls both allow. A vCPU or the flusher
//! that opens a file gets `EACCES` (glibc opens a few files lazily, on
//! whichever thread needs them first, and copes with a refusal). Any other
//! forbidden call is trapped: the kernel does not run it, and the SIGSYS handler
//! ([`smudge::sigsys`]) names the thread and the call on stderr and exits
//! the process with [`EXIT_SECCOMP`]. The lists come from `strace -f` of
//! every kind of run (see the Seccomp section of docs/cli.md).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

pub use smudge::sigsys::EXIT_SECCOMP;

/// The kinds of thread with an allowlist of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread and every thread it spawns (except the two below).
    Vmm,
    /// A vCPU thread.
    Vcpu,
    /// The writeback flusher.
    Flusher,
    /// The thread that takes SIGTERM and SIGINT (not under the VMM filter).
    Signals,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 4] = [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Flusher, ThreadKind::Signals];

    /// Its name in logs.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "VMM",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Flusher => "flusher",
            ThreadKind::Signals => "signals",
        }
    }
}

/// Why filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused a rule or a filter (a bug here).
    #[error("building the {kind} seccomp filter: {source}")]
    Build {
        /// Which filter.
        kind: &'static str,
        /// seccompiler's error.
        #[source]
        source: seccompiler::Error,
    },
    /// The kernel refused the filter (no seccomp?).
    #[error("installing the {kind} seccomp filter: {source} (--no-seccomp runs without filters)")]
    Install {
        /// Which filter.
        kind: &'static str,
        /// seccompiler's error.
        #[source]
        source: seccompiler::Error,
    },
    /// sigaction(SIGSYS) failed.
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
}

/// What the filters depend on at run time.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// This process's id: `tgkill` may only signal its own threads.
    pub pid: u32,
    /// The signal that kicks a vCPU out of `KVM_RUN` (SIGRTMIN).
    pub kick_signal: i32,
}

impl Context {
    /// This process, kicking with `SIGRTMIN`.
    pub fn current() -> Self {
        Context { pid: std::process::id(), kick_signal: vmm_sys_util::signal::SIGRTMIN() }
    }
}

/// ioctl request numbers (the KVM ones kvm-ioctls uses but does not export).
mod nr {
    use kvm_bindings::{
        kvm_clear_dirty_log, kvm_dirty_log, kvm_fpu, kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs,
        kvm_sregs, kvm_vcpu_events, KVMIO,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    // The serial interrupt and the vCPU state (set by the VMM thread,
    // read by the vCPU itself). KVM setup itself (KVM_CREATE_VM,
    // KVM_SET_USER_MEMORY_REGION, KVM_CREATE_VCPU, …) runs on a thread of
    // its own started before the VMM filter goes on: none of it is allowed.
    ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
    // The dirty log.
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

    /// What a harvest issues (any thread that harvests).
    pub fn dirty_log() -> Vec<u64> {
        [KVM_GET_DIRTY_LOG(), KVM_CLEAR_DIRTY_LOG(), KVM_RESET_DIRTY_RINGS()].map(u64::from).to_vec()
    }

    /// What a vCPU thread issues on its own fd: run, the registers for an
    /// exit's report, and a snapshot's or a migration's state save.
    pub fn vcpu() -> Vec<u64> {
        [
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_FPU(),
            KVM_GET_MSRS(),
            KVM_GET_LAPIC(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
        ]
        .map(u64::from)
        .to_vec()
    }

    /// What the VMM thread issues after KVM setup: the serial irqfd, and a
    /// boot's entry state or a restored or received vCPU state.
    pub fn load() -> Vec<u64> {
        [
            KVM_IRQFD(),
            KVM_SET_REGS(),
            KVM_SET_SREGS(),
            KVM_SET_MSRS(),
            KVM_SET_FPU(),
            KVM_SET_LAPIC(),
            KVM_SET_MP_STATE(),
            KVM_SET_VCPU_EVENTS(),
        ]
        .map(u64::from)
        .to_vec()
    }
}

/// One allowed syscall: unconditionally (no rules), or when any rule holds
/// (each rule: all its conditions).
type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// A condition on argument `arg` (compared as 32 bits, as the kernel reads
/// the ints and flags these calls take).
#[derive(Debug, Clone, Copy)]
enum Arg {
    /// arg == value.
    Eq(u8, u64),
    /// arg & mask == 0.
    Clear(u8, u64),
    /// arg & mask == mask.
    Set(u8, u64),
}

struct List {
    kind: &'static str,
    rules: Rules,
}

impl List {
    fn new(kind: ThreadKind) -> Self {
        List { kind: kind.name(), rules: BTreeMap::new() }
    }

    /// Allows each of `nrs` with any arguments.
    fn any(&mut self, nrs: &[i64]) -> &mut Self {
        for &n in nrs {
            self.rules.insert(n, Vec::new());
        }
        self
    }

    /// Allows `nr` when one of `rules` holds.
    fn when(&mut self, nr: i64, rules: &[&[Arg]]) -> Result<&mut Self, SeccompError> {
        let err = |e: seccompiler::BackendError| SeccompError::Build { kind: self.kind, source: e.into() };
        let mut out = Vec::new();
        for conds in rules {
            let mut cs = Vec::new();
            for c in *conds {
                let (arg, op, value) = match *c {
                    Arg::Eq(a, v) => (a, SeccompCmpOp::Eq, v),
                    Arg::Clear(a, m) => (a, SeccompCmpOp::MaskedEq(m), 0),
                    Arg::Set(a, m) => (a, SeccompCmpOp::MaskedEq(m), m),
                };
                cs.push(SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(err)?);
            }
            out.push(SeccompRule::new(cs).map_err(err)?);
        }
        self.rules.insert(nr, out);
        Ok(self)
    }

    /// Allows `nr` when argument `arg` is one of `values`.
    fn one_of(&mut self, nr: i64, arg: u8, values: &[u64]) -> Result<&mut Self, SeccompError> {
        let rules: Vec<[Arg; 1]> = values.iter().map(|&v| [Arg::Eq(arg, v)]).collect();
        let refs: Vec<&[Arg]> = rules.iter().map(|r| r.as_slice()).collect();
        self.when(nr, &refs)
    }
}

/// Calls every filter allows: what the SIGSYS handler makes (the thread's
/// name, the line, the exit), returns from signal handlers, thread exit,
/// locks and sleeps, the clock (for hosts without a vDSO clock), and
/// memory allocation (`mmap`/`mprotect` never executable outside the VMM
/// filter).
fn common(l: &mut List, exec_maps: bool) -> Result<(), SeccompError> {
    use libc::*;
    l.any(&[
        SYS_write,
        SYS_writev,
        SYS_exit,
        SYS_exit_group,
        SYS_rt_sigreturn,
        SYS_rt_sigprocmask,
        SYS_sigaltstack,
        SYS_restart_syscall,
        SYS_futex,
        SYS_nanosleep,
        SYS_clock_nanosleep,
        SYS_clock_gettime,
        SYS_sched_yield,
        SYS_munmap,
        SYS_mremap,
        SYS_madvise,
        SYS_brk,
        // glibc counts CPUs with it where a count is needed
        SYS_sched_getaffinity,
    ]);
    if exec_maps {
        l.any(&[SYS_mmap, SYS_mprotect]);
    } else {
        l.when(SYS_mmap, &[&[Arg::Clear(2, PROT_EXEC as u64)]])?;
        l.when(SYS_mprotect, &[&[Arg::Clear(2, PROT_EXEC as u64)]])?;
    }
    Ok(())
}

/// Calls a vCPU or the flusher may not make but that fail quietly
/// (`EACCES`) instead of stopping smudge: glibc opens files lazily on
/// whichever thread first needs them (malloc reads
/// `/proc/sys/vm/overcommit_memory` the first time it trims a thread
/// arena's heap, which can be a vCPU's or the flusher's) and copes when the
/// open fails.
const DENIED_QUIETLY: &[i64] = &[libc::SYS_openat];

/// `tgkill` to this process's threads only, with the kick or SIGABRT
/// (`abort`); glibc's `pthread_kill` asks `getpid` first.
fn allow_tgkill(l: &mut List, ctx: &Context) -> Result<(), SeccompError> {
    let pid = u64::from(ctx.pid);
    l.when(
        libc::SYS_tgkill,
        &[&[Arg::Eq(0, pid), Arg::Eq(2, ctx.kick_signal as u64)], &[Arg::Eq(0, pid), Arg::Eq(2, libc::SIGABRT as u64)]],
    )?;
    l.any(&[libc::SYS_getpid]);
    Ok(())
}

fn ioctls(l: &mut List, sets: &[Vec<u64>]) -> Result<(), SeccompError> {
    let all: Vec<u64> = sets.iter().flatten().copied().collect();
    l.one_of(libc::SYS_ioctl, 1, &all)?;
    Ok(())
}

/// The VMM threads' allowlist: files, sockets, the event loop, threads,
/// and the ioctls of KVM and userfaultfd.
fn vmm_allowlist(l: &mut List, ctx: &Context) -> Result<(), SeccompError> {
    use libc::*;
    common(l, true)?;
    allow_tgkill(l, ctx)?;
    l.any(&[
        SYS_close,
        // files: memory file, snapshots, images, the heatmap
        SYS_read,
        SYS_pread64,
        SYS_pwrite64,
        SYS_pwritev,
        SYS_openat,
        SYS_lseek,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_fsync,
        SYS_fdatasync,
        SYS_sync_file_range,
        SYS_fadvise64,
        SYS_msync,
        SYS_copy_file_range,
        SYS_getdents64,
        SYS_mkdir,
        SYS_mkdirat,
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
        SYS_unlink,
        SYS_unlinkat,
        // an abandoned live snapshot's directory
        SYS_rmdir,
        SYS_getcwd,
        // sockets: the API's connections, migration over TCP, and
        // name lookups (nscd, /etc/hosts, DNS: FIONREAD, sendmmsg)
        SYS_connect,
        SYS_shutdown,
        SYS_accept4,
        SYS_setsockopt,
        SYS_getsockopt,
        SYS_getsockname,
        SYS_getpeername,
        SYS_sendto,
        SYS_recvfrom,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_sendmmsg,
        SYS_poll,
        SYS_uname,
        // migration's TLS handshakes (key shares, nonces)
        SYS_getrandom,
        // the event loop
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_eventfd2,
        SYS_timerfd_create,
        SYS_timerfd_settime,
        // threads (clone3 is answered ENOSYS: see `no_clone3`)
        SYS_clone3,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_sched_getaffinity,
        SYS_gettid,
        SYS_getrandom,
        SYS_rt_sigaction,
    ]);
    l.one_of(SYS_socket, 0, &[AF_UNIX as u64, AF_INET as u64, AF_INET6 as u64])?;
    // Threads only: no fork, no new namespaces.
    let thread = (CLONE_THREAD | CLONE_VM | CLONE_SIGHAND) as u64;
    l.when(SYS_clone, &[&[Arg::Set(0, thread)]])?;
    l.one_of(SYS_fcntl, 1, &[F_DUPFD_CLOEXEC, F_GETFD, F_SETFD, F_GETFL, F_SETFL].map(|c| c as u64))?;
    // Thread names, the handler's PR_GET_NAME, and the vCPU and
    // flusher threads adding their own filters.
    l.one_of(SYS_prctl, 0, &[PR_SET_NAME, PR_GET_NAME, PR_SET_NO_NEW_PRIVS].map(|c| c as u64))?;
    l.when(SYS_seccomp, &[&[Arg::Eq(0, u64::from(SECCOMP_SET_MODE_FILTER)), Arg::Eq(1, 0)]])?;
    // KVM_RUN first: a vCPU's every entry is checked against this list too.
    // Post-copy's userfaultfd: created, registered and served on
    // VMM threads.
    l.any(&[libc::SYS_userfaultfd]);
    ioctls(
        l,
        &[
            nr::vcpu(),
            nr::dirty_log(),
            nr::load(),
            smudge::uffd::ioctl_numbers(),
            vec![FIONBIO, FIONREAD, FIOCLEX, FIONCLEX],
        ],
    )?;
    Ok(())
}

/// The allowlist of `kind`: syscall numbers, each with the argument rules
/// it must meet (none: any arguments).
fn allowlist(kind: ThreadKind, ctx: &Context) -> Result<Rules, SeccompError> {
    use libc::*;
    let mut l = List::new(kind);
    match kind {
        ThreadKind::Vmm => vmm_allowlist(&mut l, ctx)?,
        ThreadKind::Vcpu => {
            common(&mut l, false)?;
            // Let through here, answered EACCES by the `quiet` filter.
            l.any(DENIED_QUIETLY);
            // `abort` (SIGABRT to itself).
            allow_tgkill(&mut l, ctx)?;
            // The vCPU's fd and kvm_run mapping go when its loop ends.
            l.any(&[SYS_close]);
            l.one_of(SYS_prctl, 0, &[PR_GET_NAME as u64])?;
            ioctls(&mut l, &[nr::vcpu(), nr::dirty_log()])?;
        }
        ThreadKind::Flusher => {
            common(&mut l, false)?;
            l.any(DENIED_QUIETLY);
            allow_tgkill(&mut l, ctx)?;
            l.any(&[
                SYS_pwrite64,
                SYS_pwritev,
                SYS_fdatasync,
                SYS_fsync,
                SYS_sync_file_range,
                SYS_fadvise64,
                SYS_msync,
                SYS_lseek,
            ]);
            l.one_of(SYS_prctl, 0, &[PR_GET_NAME as u64])?;
            ioctls(&mut l, &[nr::dirty_log()])?;
        }
        ThreadKind::Signals => {
            common(&mut l, false)?;
            l.any(DENIED_QUIETLY);
            // sigwaitinfo, and a migration's socket shut down on a stop
            // (and closed, should its hook's clone end here).
            l.any(&[SYS_rt_sigtimedwait, SYS_shutdown, SYS_close]);
            l.one_of(SYS_prctl, 0, &[PR_GET_NAME as u64])?;
        }
    }
    Ok(l.rules)
}

/// The syscalls `kind` may make, by name (or number), sorted: for logs,
/// the docs and tests.
pub fn syscall_names(kind: ThreadKind) -> Vec<String> {
    let rules = allowlist(kind, &Context::current()).unwrap_or_default();
    let quiet = if kind == ThreadKind::Vmm { &[][..] } else { DENIED_QUIETLY };
    let mut v: Vec<String> = rules
        .keys()
        .filter(|n| !quiet.contains(n))
        .map(|&n| smudge::sigsys::syscall_name(n).map_or_else(|| n.to_string(), str::to_string))
        .collect();
    v.sort();
    v
}

fn compile(
    kind: ThreadKind,
    rules: Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let err = |source| SeccompError::Build { kind: kind.name(), source };
    let arch = std::env::consts::ARCH.try_into().map_err(|e: seccompiler::BackendError| err(e.into()))?;
    let filter = SeccompFilter::new(rules, mismatch, matched, arch).map_err(|e| err(e.into()))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| err(e.into()))
}

/// The compiled filters of one run.
#[derive(Debug)]
pub struct Filters {
    vmm: BpfProgram,
    no_clone3: BpfProgram,
    vcpu: BpfProgram,
    flusher: BpfProgram,
    quiet: BpfProgram,
}

impl Filters {
    /// Builds every filter for `ctx` (nothing is installed yet).
    pub fn new(ctx: &Context) -> Result<Self, SeccompError> {
        let trap = |kind| compile(kind, allowlist(kind, ctx)?, SeccompAction::Trap, SeccompAction::Allow);
        // clone3's flags sit in memory a filter cannot read: answer ENOSYS,
        // and glibc falls back to clone, whose flags the VMM filter checks.
        let no_clone3 = compile(
            ThreadKind::Vmm,
            [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
        )?;
        let quiet = compile(
            ThreadKind::Vcpu,
            DENIED_QUIETLY.iter().map(|&n| (n, Vec::new())).collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
        )?;
        Ok(Filters {
            vmm: trap(ThreadKind::Vmm)?,
            no_clone3,
            vcpu: trap(ThreadKind::Vcpu)?,
            flusher: trap(ThreadKind::Flusher)?,
            quiet,
        })
    }

    /// Installs the SIGSYS handler (process-wide) and the VMM filter on
    /// the calling thread: every thread it spawns from now on inherits it.
    pub fn install_vmm(&self) -> Result<(), SeccompError> {
        smudge::sigsys::install_handler().map_err(SeccompError::Handler)?;
        smudge::sigsys::prepare_libc();
        let kind = ThreadKind::Vmm.name();
        seccompiler::apply_filter(&self.vmm).map_err(|source| SeccompError::Install { kind, source })?;
        seccompiler::apply_filter(&self.no_clone3).map_err(|source| SeccompError::Install { kind, source })?;
        tracing::debug!(
            "seccomp: VMM filter on ({} syscalls; vCPU {}, flusher {})",
            syscall_names(ThreadKind::Vmm).len(),
            syscall_names(ThreadKind::Vcpu).len(),
            syscall_names(ThreadKind::Flusher).len()
        );
        Ok(())
    }

    /// Adds the filter of `kind` (vCPU or flusher) to the calling thread,
    /// on top of the VMM filter it inherited (and the one that answers
    /// `DENIED_QUIETLY` calls with `EACCES`).
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let err = |source| SeccompError::Install { kind: kind.name(), source };
        match kind {
            ThreadKind::Vmm => seccompiler::apply_filter(&self.vmm).map_err(err),
            // Its own filter goes on in `SignalsFilter::install`.
            ThreadKind::Signals => Ok(()),
            ThreadKind::Vcpu | ThreadKind::Flusher => {
                // Stacked filters answer with the strictest result: the
                // quiet filter's EACCES wins over the kind's allow. (The
                // kind's own goes on last: it forbids `seccomp` itself.)
                seccompiler::apply_filter(&self.quiet).map_err(err)?;
                let prog = if kind == ThreadKind::Vcpu { &self.vcpu } else { &self.flusher };
                seccompiler::apply_filter(prog).map_err(err)
            }
        }
    }
}

/// The filter of the signal thread ([`ThreadKind::Signals`]), built
/// before any thread starts and installed by that thread on itself.
#[derive(Debug)]
pub struct SignalsFilter {
    quiet: BpfProgram,
    own: BpfProgram,
}

impl SignalsFilter {
    /// Builds it for `ctx`.
    pub fn new(ctx: &Context) -> Result<Self, SeccompError> {
        let kind = ThreadKind::Signals;
        Ok(SignalsFilter {
            quiet: compile(
                kind,
                DENIED_QUIETLY.iter().map(|&n| (n, Vec::new())).collect(),
                SeccompAction::Allow,
                SeccompAction::Errno(libc::EACCES as u32),
            )?,
            own: compile(kind, allowlist(kind, ctx)?, SeccompAction::Trap, SeccompAction::Allow)?,
        })
    }

    /// Installs the SIGSYS handler and the filter on the calling thread.
    pub fn install(&self) -> Result<(), SeccompError> {
        smudge::sigsys::install_handler().map_err(SeccompError::Handler)?;
        // Before any thread makes its ninth malloc arena (see prepare_libc).
        smudge::sigsys::prepare_libc();
        let err = |source| SeccompError::Install { kind: ThreadKind::Signals.name(), source };
        seccompiler::apply_filter(&self.quiet).map_err(err)?;
        seccompiler::apply_filter(&self.own).map_err(err)
    }
}

/// The `--seccomp-selftest` hook: vCPU 0 makes a `socket()` call, which its
/// filter forbids (with `--no-seccomp` the call just runs).
pub fn selftest() {
    tracing::warn!("seccomp self-test: vCPU 0 calls socket(), which its filter forbids");
    match std::net::UdpSocket::bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0))) {
        Ok(_) => tracing::warn!("seccomp self-test: socket() ran (seccomp is off)"),
        Err(e) => tracing::warn!("seccomp self-test: socket() failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_lists_nest() {
        Filters::new(&Context::current()).unwrap();
        let vmm = syscall_names(ThreadKind::Vmm);
        for kind in ThreadKind::ALL {
            let names = syscall_names(kind);
            eprintln!("{}: {} syscalls: {}", kind.name(), names.len(), names.join(" "));
        }
        for kind in [ThreadKind::Vcpu, ThreadKind::Flusher] {
            // Filters stack: what a vCPU or the flusher needs, the VMM
            // filter it inherited must allow too.
            for s in syscall_names(kind) {
                assert!(vmm.contains(&s), "{} allows {s}, the VMM filter does not", kind.name());
            }
        }
        let vcpu = syscall_names(ThreadKind::Vcpu);
        for s in ["socket", "openat", "execve", "clone", "connect", "fork"] {
            assert!(!vcpu.contains(&s.to_string()), "vCPU allows {s}");
        }
        assert!(!vmm.contains(&"execve".to_string()));
        assert!(!vmm.contains(&"bind".to_string()));
        let signals = syscall_names(ThreadKind::Signals);
        for s in ["socket", "openat", "execve", "clone", "connect", "fork", "ioctl", "tgkill", "kill"] {
            assert!(!signals.contains(&s.to_string()), "signals allows {s}");
        }
    }

    #[test]
    fn the_signal_thread_takes_a_signal_and_shuts_a_socket_under_its_filter() {
        use vmm_sys_util::signal::Killable;
        let filter = SignalsFilter::new(&Context::current()).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let (ready, filtered) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            smudge::stop_signal::block().unwrap();
            filter.install().unwrap();
            ready.send(()).unwrap();
            let sig = smudge::stop_signal::wait().unwrap();
            conn.shutdown(std::net::Shutdown::Both).unwrap();
            let opened =
                std::fs::File::open("/proc/sys/vm/overcommit_memory").map(|_| ()).map_err(|e| e.raw_os_error());
            (sig, opened)
        });
        filtered.recv().unwrap();
        // To that thread, which blocks it: pending until it waits.
        t.kill(libc::SIGTERM).unwrap();
        let (sig, opened) = t.join().unwrap();
        assert_eq!(sig, libc::SIGTERM);
        assert_eq!(opened, Err(Some(libc::EACCES)));
        // The peer sees the shutdown as the end of the stream.
        assert_eq!(std::io::Read::read(&mut peer, &mut [0u8; 8]).unwrap(), 0);
    }

    #[test]
    fn a_vcpu_or_the_flusher_cannot_open_files_but_is_not_stopped_for_trying() {
        let filters = std::sync::Arc::new(Filters::new(&Context::current()).unwrap());
        for kind in [ThreadKind::Vcpu, ThreadKind::Flusher] {
            let f = filters.clone();
            // A thread of its own: filters stay on the thread that adds them.
            let opened = std::thread::spawn(move || {
                f.install(kind).unwrap();
                std::fs::File::open("/proc/sys/vm/overcommit_memory").map(|_| ()).map_err(|e| e.raw_os_error())
            })
            .join()
            .unwrap();
            assert_eq!(opened, Err(Some(libc::EACCES)), "{}", kind.name());
        }
    }
}
