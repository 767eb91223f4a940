//! Pausing the running vCPUs and collecting their state — what a snapshot,
//! a migration's switchover and `ctl pause` do to a running VM (Cloud
//! Hypervisor's `Pausable`). A paused vCPU parks on its own thread; each
//! vCPU's state is read by that thread (only it may touch its fd) and handed
//! over through [`Shared::state_request`]. Also how the vCPU threads are
//! kicked out of `KVM_RUN` and, at the end of a run, stopped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smudge::snapshot::MachineState;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::vm::vcpu::Shared;

/// How long a pause waits for every vCPU to park. A parked vCPU only has
/// to leave KVM_RUN (it is kicked every millisecond), so on a quiet host
/// this takes microseconds; the limit is for a host so loaded that the
/// vCPU threads are not scheduled for seconds, which must not fail a
/// snapshot, a migration or a stop.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(30);

/// The running vCPUs, as the control API, snapshots and migrations see them.
#[derive(Clone)]
pub struct VcpuControl {
    /// What the vCPU threads share.
    pub shared: Arc<Shared>,
    /// The vCPU threads.
    pub threads: Arc<Vec<JoinHandle<()>>>,
    /// Kicks them out of KVM_RUN.
    pub kick: fn(&[JoinHandle<()>]),
}

impl std::fmt::Debug for VcpuControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuControl").field("vcpus", &self.threads.len()).finish()
    }
}

/// How long paused vCPU threads have to hand over their state.
pub const STATE_LIMIT: Duration = Duration::from_secs(5);

/// Why the vCPUs could not be paused or their state collected.
#[derive(Debug, thiserror::Error)]
pub enum VcpuControlError {
    /// Some vCPUs did not park within [`PAUSE_LIMIT`].
    #[error("only {paused} of {live} vCPUs paused within {} s", PAUSE_LIMIT.as_secs())]
    NotPaused {
        /// vCPUs parked.
        paused: usize,
        /// vCPUs that were running.
        live: usize,
    },
    /// A vCPU thread could not read its state from KVM.
    #[error("saving vCPU state: {0}")]
    SaveState(std::sync::Arc<smudge::kvm::vcpu_state::VcpuStateError>),
    /// The paused vCPU threads did not answer in time.
    #[error("vCPUs did not hand over their state within {} s", .0.as_secs())]
    StateTimeout(Duration),
}

impl VcpuControl {
    /// Control of the vCPUs running on `threads`, kicked with [`kick_all`].
    pub fn new(shared: Arc<Shared>, threads: Arc<Vec<JoinHandle<()>>>) -> Self {
        VcpuControl { shared, threads, kick: kick_all }
    }

    /// Asks every live vCPU to pause and kicks it out of KVM_RUN until all
    /// are parked ([`PAUSE_LIMIT`] at most: an error then, never a hang).
    /// Returns how many were paused.
    pub fn pause(&self) -> Result<usize, VcpuControlError> {
        let live = self.threads.iter().filter(|t| !t.is_finished()).count();
        self.shared.request_pause();
        self.wait_parked(live)
    }

    /// Holds the vCPUs for an epoch boundary as [`Self::pause`] does, on a
    /// flag of its own: a `ctl pause`, `resume` or snapshot meanwhile
    /// neither ends the hold nor is ended by [`Self::release_boundary`].
    pub fn hold_for_boundary(&self) -> Result<usize, VcpuControlError> {
        let live = self.threads.iter().filter(|t| !t.is_finished()).count();
        self.shared.request_boundary();
        self.wait_parked(live)
    }

    /// Ends an epoch boundary's hold.
    pub fn release_boundary(&self) {
        self.shared.end_boundary();
        self.wake();
    }

    /// Kicks the vCPUs until `live` of them are parked.
    fn wait_parked(&self, live: usize) -> Result<usize, VcpuControlError> {
        // Out of KVM_RUN (a signal) and out of a throttle's wait (unpark).
        (self.kick)(&self.threads);
        self.wake();
        let t0 = Instant::now();
        let mut kicked = t0;
        while self.shared.paused_vcpus() < live {
            if t0.elapsed() > PAUSE_LIMIT {
                return Err(VcpuControlError::NotPaused { paused: self.shared.paused_vcpus(), live });
            }
            // A kick that lands just before KVM_RUN is lost: kick again.
            if kicked.elapsed() > Duration::from_millis(1) {
                (self.kick)(&self.threads);
                kicked = Instant::now();
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(live)
    }

    /// Wakes paused vCPU threads (to answer a state request or resume).
    pub fn wake(&self) {
        for t in self.threads.iter() {
            t.thread().unpark();
        }
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.shared.resume();
        self.wake();
    }

    /// The state of every vCPU (each paused vCPU's own thread reads it)
    /// and of the devices. The vCPUs must be paused.
    pub fn machine_state(&self) -> Result<MachineState, VcpuControlError> {
        self.request_state();
        self.collect_state()
    }

    /// Asks the paused vCPU threads for their state without waiting: they
    /// read it while the caller does other work (sends the residue).
    pub fn request_state(&self) {
        let n = self.threads.len();
        *self.shared.state_request.lock().unwrap_or_else(|e| e.into_inner()) = Some(vec![None; n]);
        self.wake();
    }

    /// Waits for the state asked for with [`Self::request_state`].
    pub fn collect_state(&self) -> Result<MachineState, VcpuControlError> {
        let t0 = Instant::now();
        loop {
            {
                let mut req = self.shared.state_request.lock().unwrap_or_else(|e| e.into_inner());
                if req.as_ref().is_some_and(|v| v.iter().all(Option::is_some)) {
                    let v = req.take().unwrap_or_default();
                    // Every slot is filled (checked above).
                    let vcpus =
                        v.into_iter().flatten().collect::<Result<Vec<_>, _>>().map_err(VcpuControlError::SaveState)?;
                    return Ok(MachineState { vcpus, devices: self.shared.bus.state() });
                }
            }
            if t0.elapsed() > STATE_LIMIT {
                *self.shared.state_request.lock().unwrap_or_else(|e| e.into_inner()) = None;
                return Err(VcpuControlError::StateTimeout(STATE_LIMIT));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the handler of the kick signal (`SIGRTMIN`): it does nothing
/// but interrupt `KVM_RUN`. Before any vCPU runs.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(SIGRTMIN(), kick_handler)
}

/// Kicks every vCPU out of KVM_RUN (they then honour a throttle or a pause).
pub fn kick_all(threads: &[JoinHandle<()>]) {
    for t in threads {
        if !t.is_finished() {
            let _ = t.kill(SIGRTMIN());
        }
    }
}

/// Sets `stop` and kicks every vCPU thread out of KVM_RUN until it returns.
pub fn stop_vcpus(shared: &Shared, threads: Vec<JoinHandle<()>>) {
    shared.stop.store(true, Ordering::Release);
    for t in threads {
        // A signal that lands just before KVM_RUN is missed; keep kicking.
        while !t.is_finished() {
            if let Err(e) = t.kill(SIGRTMIN()) {
                tracing::warn!("kicking a vCPU thread: {e}");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if t.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}
