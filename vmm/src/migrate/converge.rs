//! Auto-converge: when the guest dirties memory faster than pre-copy sends
//! it, slow the vCPUs down in growing steps (QEMU's `cpu-throttle-initial`
//! 20 % and `cpu-throttle-increment` 10 %) until the dirty set shrinks.
//! A throttle of p % makes every vCPU sleep p % of each 10 ms slice.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::snapshotter::VcpuControl;

/// First step.
pub const INITIAL_PCT: u32 = 20;
/// Each further step.
pub const INCREMENT_PCT: u32 = 10;
/// Ceiling.
pub const MAX_PCT: u32 = 99;
/// The slice the percentage applies to.
const SLICE: Duration = Duration::from_millis(10);

/// The decision: throttle harder after two rounds in a row in which the
/// guest dirtied more than half of what the round sent (QEMU's rule).
#[derive(Debug, Default, Clone)]
pub struct ConvergePolicy {
    strikes: u32,
    pct: u32,
}

impl ConvergePolicy {
    /// The throttle after a round that sent `sent` bytes while the guest
    /// dirtied `dirtied` bytes.
    pub fn after_round(&mut self, sent: u64, dirtied: u64) -> u32 {
        if dirtied.saturating_mul(2) > sent {
            self.strikes += 1;
        } else {
            self.strikes = 0;
        }
        if self.strikes >= 2 {
            self.strikes = 0;
            self.pct = if self.pct == 0 { INITIAL_PCT } else { (self.pct + INCREMENT_PCT).min(MAX_PCT) };
        }
        self.pct
    }

    /// The throttle now (percent).
    pub fn pct(&self) -> u32 {
        self.pct
    }
}

/// A thread imposing the throttle on the vCPUs while a migration runs.
#[derive(Debug)]
pub struct Throttle {
    pct: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    vcpus: VcpuControl,
}

impl Throttle {
    /// Starts the (idle) throttle thread.
    pub fn start(vcpus: VcpuControl) -> std::io::Result<Self> {
        let (pct, stop) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, s, v) = (pct.clone(), stop.clone(), vcpus.clone());
        let thread = std::thread::Builder::new().name("auto-converge".into()).spawn(move || {
            while !s.load(Ordering::Acquire) {
                let pct = p.load(Ordering::Acquire);
                if pct > 0 {
                    v.shared.converge_for(SLICE * pct / 100);
                    (v.kick)(&v.threads);
                }
                std::thread::park_timeout(SLICE);
            }
        })?;
        Ok(Throttle { pct, stop, thread: Some(thread), vcpus })
    }

    /// Sets the throttle (percent of each slice the vCPUs sleep).
    pub fn set(&self, pct: u32) {
        self.pct.store(pct.min(MAX_PCT), Ordering::Release);
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        self.vcpus.shared.release_converge();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_grows_after_two_bad_rounds_and_not_otherwise() {
        let mut p = ConvergePolicy::default();
        assert_eq!(p.after_round(100, 60), 0);
        assert_eq!(p.after_round(100, 60), INITIAL_PCT);
        assert_eq!(p.after_round(100, 10), INITIAL_PCT);
        assert_eq!(p.after_round(100, 60), INITIAL_PCT);
        assert_eq!(p.after_round(100, 60), INITIAL_PCT + INCREMENT_PCT);
        for _ in 0..40 {
            p.after_round(100, 100);
        }
        assert_eq!(p.pct(), MAX_PCT);
    }
}
