//! Dirty-rate measurement (QEMU's `calc-dirty-rate`): how fast the guest
//! dirties memory and how much it touches, from a dirty-log consumer of
//! its own sampled every 100 ms for a window. With the ring, also per vCPU.
//!
//! Sampling in short periods matters: a page written twice within one
//! period counts once, so one long period undercounts a guest that
//! rewrites its pages; the sum over short periods tracks its write rate.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use smudge::dirty_set::DirtySet;
use smudge::harvest::{HarvestError, Harvester, Subscription};

/// How often the window is sampled.
pub const SAMPLE: Duration = Duration::from_millis(100);

/// One vCPU's share (ring only).
#[derive(Debug, Clone, Serialize)]
pub struct VcpuRate {
    /// vCPU index.
    pub vcpu: usize,
    /// Pages it dirtied per second.
    pub pages_per_s: f64,
    /// The same in MB/s.
    pub mb_per_s: f64,
}

/// What a measurement found.
#[derive(Debug, Clone, Serialize)]
pub struct DirtyRate {
    /// The dirty-log mechanism measured with.
    pub mechanism: String,
    /// Window length, seconds.
    pub seconds: f64,
    /// Samples taken.
    pub samples: u32,
    /// Pages dirtied per second (summed over samples).
    pub pages_per_s: f64,
    /// The same in MB/s.
    pub mb_per_s: f64,
    /// Distinct pages dirtied in the window: the working set.
    pub working_set_pages: u64,
    /// The same in MiB.
    pub working_set_mib: f64,
    /// Per vCPU, with the ring (empty otherwise: a bitmap cannot tell).
    pub per_vcpu: Vec<VcpuRate>,
}

/// Measures for `window` (at least one sample).
pub fn measure(h: &Arc<Mutex<Harvester>>, window: Duration, page_size: u64) -> Result<DirtyRate, HarvestError> {
    // From a clean start: pages dirtied before now do not count.
    let sub = Subscription::from_now(h)?;
    let (counts0, mut union, mechanism) = {
        let g = sub.lock();
        (g.vcpu_dirty_pages().to_vec(), DirtySet::new(g.slots(), page_size), g.mechanism().to_string())
    };
    let t0 = Instant::now();
    let (mut total, mut samples) = (0u64, 0u32);
    loop {
        let left = window.saturating_sub(t0.elapsed());
        std::thread::sleep(left.min(SAMPLE));
        let set = sub.collect()?;
        total += set.count();
        union.union_with(&set)?;
        sub.recycle(set);
        samples += 1;
        if t0.elapsed() >= window {
            break;
        }
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    let counts1 = sub.lock().vcpu_dirty_pages().to_vec();
    drop(sub);
    let mb = |pages: f64| pages * page_size as f64 / 1e6;
    let per_vcpu = counts1
        .iter()
        .zip(&counts0)
        .enumerate()
        .map(|(vcpu, (b, a))| {
            let p = b.saturating_sub(*a) as f64 / secs;
            VcpuRate { vcpu, pages_per_s: p, mb_per_s: mb(p) }
        })
        .collect();
    let ws = union.count();
    Ok(DirtyRate {
        mechanism,
        seconds: secs,
        samples,
        pages_per_s: total as f64 / secs,
        mb_per_s: mb(total as f64 / secs),
        working_set_pages: ws,
        working_set_mib: (ws * page_size) as f64 / (1 << 20) as f64,
        per_vcpu,
    })
}
