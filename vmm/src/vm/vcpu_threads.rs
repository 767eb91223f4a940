//! vCPU threads made ahead of time. Creating a thread and loading its
//! seccomp filter cost ~50-130 µs here; an incoming migration pays that
//! inside the guest's downtime unless the threads already wait when the
//! state arrives. So they are spawned (and filtered) while the memory is
//! still coming in or the boot image is loaded, then each is handed its
//! vCPU and the shared run state and enters `KVM_RUN` — as QEMU's vCPU
//! threads wait for `vm_start`.

use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::VcpuFd;

use crate::vm::outcome::Outcome;
use crate::vm::seccomp::{self, Filters, ThreadKind};
use crate::vm::vcpu::{self, Shared};

/// What a waiting thread needs to run its vCPU.
type Go = (VcpuFd, Arc<Shared>);

/// Why the waiting threads could not be handed their vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Not one vCPU per thread.
    #[error("{vcpus} vCPUs for {threads} vCPU threads")]
    Count {
        /// vCPUs given.
        vcpus: usize,
        /// Threads waiting.
        threads: usize,
    },
    /// A thread was gone when its vCPU came.
    #[error("a vCPU thread ended before its vCPU was ready")]
    ThreadEnded,
}

/// Threads waiting for their vCPU. Dropped without [`Waiting::start`], they
/// end without running anything.
#[derive(Debug)]
pub struct Waiting {
    go: Vec<Sender<Go>>,
    threads: Vec<JoinHandle<()>>,
}

impl Waiting {
    /// Spawns `n` threads that load the vCPU seccomp filter (when given)
    /// and wait. `selftest`: vCPU 0 tries a forbidden syscall once it runs.
    pub fn spawn(n: u8, filters: Option<Arc<Filters>>, selftest: bool) -> std::io::Result<Waiting> {
        let mut w = Waiting { go: Vec::new(), threads: Vec::new() };
        for id in 0..n {
            let (tx, rx) = mpsc::channel::<Go>();
            let filters = filters.clone();
            let selftest = selftest && id == 0;
            let t = std::thread::Builder::new().name(format!("vcpu{id}")).spawn(move || {
                let filtered = filters.map(|f| f.install(ThreadKind::Vcpu));
                // No vCPU: the run ended before the guest started.
                let Ok((v, sh)) = rx.recv() else { return };
                if let Some(Err(e)) = filtered {
                    return sh.finish(Outcome::KvmFailure(format!("vCPU {id}: {e}")));
                }
                if selftest {
                    seccomp::selftest();
                }
                let guard = sh.clone();
                // A vCPU thread that dies must end the run, never hang it.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu::run_loop(v, id, sh))).is_err() {
                    guard.finish(Outcome::KvmFailure(format!("vCPU {id} thread panicked")));
                }
            })?;
            w.go.push(tx);
            w.threads.push(t);
        }
        Ok(w)
    }

    /// Hands each thread its vCPU (in order) and `shared`; they run now.
    /// Returns the threads' handles.
    pub fn start(mut self, vcpus: Vec<VcpuFd>, shared: &Arc<Shared>) -> Result<Vec<JoinHandle<()>>, StartError> {
        if vcpus.len() != self.threads.len() {
            return Err(StartError::Count { vcpus: vcpus.len(), threads: self.threads.len() });
        }
        // Out of `self` first: if a send fails, `drop` must not wait for
        // the threads already running a vCPU; they are told to stop.
        let threads = std::mem::take(&mut self.threads);
        for (tx, v) in self.go.drain(..).zip(vcpus) {
            if tx.send((v, shared.clone())).is_err() {
                shared.stop.store(true, std::sync::atomic::Ordering::Release);
                return Err(StartError::ThreadEnded);
            }
        }
        Ok(threads)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // Not started: each thread sees its channel closed and returns.
        self.go.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_never_started_end_when_dropped() {
        let w = Waiting::spawn(3, None, false).unwrap();
        assert_eq!(w.threads.len(), 3);
        drop(w); // joins: a hang here would be the bug
    }
}
