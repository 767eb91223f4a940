//! Making pre-copy converge when the guest dirties memory faster than the
//! link carries it (decided by [`ConvergePolicy`]):
//!
//! - auto-converge (any dirty log): slow every vCPU down in growing steps
//!   (QEMU's `cpu-throttle-initial` 20 % and `cpu-throttle-increment` 10 %);
//! - dirty limit (the ring, which says which vCPU dirtied what; QEMU's
//!   `dirty-limit`): hold each vCPU to a share of the link, throttling only
//!   those that dirty more ([`DirtyLimit`]).
//!
//! A throttle of p % makes a vCPU sleep p % of each 10 ms slice.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use smudge::migration::frame::PAGE;

use crate::vm::vcpu_control::VcpuControl;

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

/// Per-vCPU throttles that hold each vCPU's dirty rate to `limit` pages/s.
#[derive(Debug, Clone)]
pub struct DirtyLimit {
    /// Pages per second each vCPU may dirty.
    pub limit: f64,
    pct: Vec<u32>,
    last: Vec<u64>,
}

impl DirtyLimit {
    /// A limit of `limit` pages/s per vCPU; `counts` are the per-vCPU dirty
    /// page counters now.
    pub fn new(limit: f64, counts: &[u64]) -> Self {
        DirtyLimit { limit, pct: vec![0; counts.len()], last: counts.to_vec() }
    }

    /// New throttles from the counters after `secs` seconds: each vCPU's
    /// unthrottled rate is estimated from what it dirtied under its current
    /// throttle, and the throttle set so that rate comes down to the limit.
    pub fn update(&mut self, counts: &[u64], secs: f64) -> &[u32] {
        for (i, &c) in counts.iter().enumerate().take(self.pct.len()) {
            let rate = c.saturating_sub(self.last[i]) as f64 / secs.max(1e-3);
            let running = 1.0 - f64::from(self.pct[i]) / 100.0;
            let unthrottled = rate / running.max(0.01);
            self.pct[i] = if unthrottled > self.limit {
                ((1.0 - self.limit / unthrottled) * 100.0).ceil().clamp(0.0, f64::from(MAX_PCT)) as u32
            } else {
                0
            };
            self.last[i] = c;
        }
        &self.pct
    }

    /// The throttles now (percent per vCPU).
    pub fn pct(&self) -> &[u32] {
        &self.pct
    }
}

/// One migration's convergence help, round after round: the throttle
/// thread (None: auto-converge off) and what sets it — [`ConvergePolicy`],
/// and with the ring a [`DirtyLimit`] in its place.
#[derive(Debug)]
pub struct Converger {
    throttle: Option<Throttle>,
    policy: ConvergePolicy,
    dirty_limit: Option<DirtyLimit>,
    pct: u32,
    vcpu_pct: Vec<u32>,
    max_pct: u32,
    max_vcpu_pct: u32,
    limit_used: Option<f64>,
}

impl Converger {
    /// Helps with `throttle`; `counts` are the per-vCPU dirty page counters
    /// now (empty without the ring: no dirty limit then).
    pub fn new(throttle: Option<Throttle>, counts: &[u64]) -> Self {
        let dirty_limit = match &throttle {
            Some(_) if !counts.is_empty() => Some(DirtyLimit::new(f64::INFINITY, counts)),
            _ => None,
        };
        Converger {
            throttle,
            policy: ConvergePolicy::default(),
            dirty_limit,
            pct: 0,
            vcpu_pct: Vec::new(),
            max_pct: 0,
            max_vcpu_pct: 0,
            limit_used: None,
        }
    }

    /// Sets the throttles for the next round after one that sent `sent`
    /// bytes at `rate` bytes/s in `secs` while the guest dirtied `dirtied`
    /// bytes; `counts` are the per-vCPU dirty counters now, `vcpus` how
    /// many vCPUs share the link.
    pub fn after_round(&mut self, sent: u64, dirtied: u64, rate: f64, secs: f64, vcpus: usize, counts: &[u64]) {
        let Some(t) = &self.throttle else { return };
        self.pct = self.policy.after_round(sent, dirtied);
        self.vcpu_pct = Vec::new();
        if let Some(dl) = self.dirty_limit.as_mut() {
            // Each vCPU may dirty a quarter of the link, shared out.
            dl.limit = rate / PAGE as f64 / 4.0 / vcpus.max(1) as f64;
            let per_vcpu = dl.update(counts, secs).to_vec();
            if self.pct > 0 {
                // Converging needs help: the dirty limit, not a global throttle.
                self.pct = 0;
                self.limit_used = Some(dl.limit);
                self.max_vcpu_pct = self.max_vcpu_pct.max(per_vcpu.iter().copied().max().unwrap_or(0));
                self.vcpu_pct = per_vcpu;
            }
        }
        t.set(self.pct);
        t.set_vcpus(&self.vcpu_pct);
        self.max_pct = self.max_pct.max(self.pct);
    }

    /// Whether a dirty limit is in use (per-vCPU counters are needed).
    pub fn limits_vcpus(&self) -> bool {
        self.dirty_limit.is_some()
    }

    /// The throttle now (percent).
    pub fn pct(&self) -> u32 {
        self.pct
    }

    /// The per-vCPU throttles now (percent; empty unless a dirty limit is
    /// needed).
    pub fn vcpu_pct(&self) -> &[u32] {
        &self.vcpu_pct
    }

    /// Ends the throttle; says what helped (`auto-converge N%`, the dirty
    /// limit), if anything did.
    pub fn finish(self) -> Vec<String> {
        drop(self.throttle);
        let mut how = Vec::new();
        if self.max_pct > 0 {
            how.push(format!("auto-converge {}%", self.max_pct));
        }
        if let Some(l) = self.limit_used {
            how.push(format!(
                "dirty-limit {:.1} MB/s per vCPU (throttle up to {}%)",
                l * PAGE as f64 / 1e6,
                self.max_vcpu_pct
            ));
        }
        how
    }
}

/// A thread imposing the throttle on the vCPUs while a migration runs.
#[derive(Debug)]
pub struct Throttle {
    pct: Arc<AtomicU32>,
    vcpu_pct: Arc<Vec<AtomicU32>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    vcpus: VcpuControl,
}

impl Throttle {
    /// Starts the (idle) throttle thread.
    pub fn start(vcpus: VcpuControl) -> std::io::Result<Self> {
        let (pct, stop) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicBool::new(false)));
        let vcpu_pct: Arc<Vec<AtomicU32>> = Arc::new(vcpus.threads.iter().map(|_| AtomicU32::new(0)).collect());
        let (p, vp, s, v) = (pct.clone(), vcpu_pct.clone(), stop.clone(), vcpus.clone());
        let thread = std::thread::Builder::new().name("auto-converge".into()).spawn(move || {
            while !s.load(Ordering::Acquire) {
                let pct = p.load(Ordering::Acquire);
                if pct > 0 {
                    v.shared.converge_for(SLICE * pct / 100);
                    (v.kick)(&v.threads);
                }
                for (i, vcpu_pct) in vp.iter().enumerate() {
                    let pct = vcpu_pct.load(Ordering::Acquire);
                    if pct > 0 {
                        v.shared.limit_vcpu_for(i, SLICE * pct / 100);
                        (v.kick)(&v.threads[i..=i]);
                    }
                }
                std::thread::park_timeout(SLICE);
            }
        })?;
        Ok(Throttle { pct, vcpu_pct, stop, thread: Some(thread), vcpus })
    }

    /// Sets the throttle (percent of each slice the vCPUs sleep).
    pub fn set(&self, pct: u32) {
        self.pct.store(pct.min(MAX_PCT), Ordering::Release);
    }

    /// Sets per-vCPU throttles (a dirty limit).
    pub fn set_vcpus(&self, pct: &[u32]) {
        for (a, &p) in self.vcpu_pct.iter().zip(pct) {
            a.store(p.min(MAX_PCT), Ordering::Release);
        }
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

    #[test]
    fn dirty_limit_throttles_only_the_vcpus_over_it() {
        let mut d = DirtyLimit::new(1000.0, &[0, 0]);
        // vCPU 0 dirtied 4000 pages/s, vCPU 1 500: only vCPU 0 is held, to
        // a quarter of its time.
        assert_eq!(d.update(&[4000, 500], 1.0), &[75, 0]);
        // Held at 75 %, it dirtied 1000/s: its unthrottled rate is still
        // 4000/s, so the throttle stays.
        assert_eq!(d.update(&[5000, 1000], 1.0), &[75, 0]);
        // It calms down to 200/s unthrottled: released.
        assert_eq!(d.update(&[5050, 1100], 1.0), &[0, 0]);
    }
}
