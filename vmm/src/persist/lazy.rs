//! `smudge restore --lazy`: the guest starts as soon as KVM is set up and
//! its memory fills in behind it. Guest RAM (a new file on tmpfs) is
//! registered with userfaultfd before a vCPU runs; a vCPU's first touch of
//! a page not loaded yet blocks it until a fault thread places that page,
//! read from the snapshot that holds its newest copy (its 1 MiB chunk
//! checked against the manifest first); meanwhile a prefetch thread loads
//! every page nobody touched, then checks every chunk not used yet, and
//! reports the restore fully loaded. One lock orders the two threads: a
//! page is placed once, by whichever comes first.
//!
//! The snapshot is only read. If a chunk fails its checksum after the
//! guest started, the guest cannot go on with memory it will never get:
//! smudge says which file and offset and exits [`EXIT_MEMORY_LOST`].

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smudge::memory::{ram_layout, GuestRam};
use smudge::migration::postcopy::Owed;
use smudge::snapshot::ChainPages;
use smudge::snapshot::{parse_state, MachineState, Manifest, SnapshotError};
use smudge::uffd::{Placed, RamMap, Uffd};

use crate::vm::outcome::EXIT_MEMORY_LOST;
use crate::vm::IncomingVm;

const PAGE: u64 = 4096;
/// Pages the prefetch loads per turn of the lock.
const PREFETCH_PAGES: u64 = 64;

/// What the fault and prefetch threads share.
struct Loader {
    pages: ChainPages,
    owed: Owed,
    buf: Vec<u8>,
}

/// Counters for the report.
#[derive(Default)]
struct Counters {
    faulted: AtomicU64,
    prefetched: AtomicU64,
    zero_filled: AtomicU64,
}

/// A snapshot chain to restore lazily (see the module doc).
pub struct LazyRestore {
    dir: std::path::PathBuf,
    state: MachineState,
    started_at: Instant,
    loader: Option<Loader>,
    armed: Option<(Arc<Uffd>, RamMap, u64)>,
}

impl std::fmt::Debug for LazyRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRestore").field("dir", &self.dir).finish()
    }
}

impl LazyRestore {
    /// Opens the chain ending at `dir` (manifests, state and extents
    /// checked; memory chunks are checked as they load). `started_at`:
    /// when the command started, for the time to first instruction.
    pub fn open(dir: &Path, started_at: Instant) -> Result<(Self, Manifest), SnapshotError> {
        let (pages, m) = ChainPages::open(dir)?;
        let p = dir.join("state.json");
        let text = std::fs::read(&p).map_err(|source| SnapshotError::Io { path: p.clone(), op: "read", source })?;
        let state = parse_state(&text, m.vcpus, &p)?;
        let mut owed = Owed::new(m.mem_size);
        owed.add(&pages.data_runs()).map_err(|e| SnapshotError::Corrupt { path: p, offset: 0, what: e.to_string() })?;
        let lazy = LazyRestore {
            dir: dir.to_path_buf(),
            state,
            started_at,
            loader: Some(Loader { pages, owed, buf: Vec::new() }),
            armed: None,
        };
        Ok((lazy, m))
    }
}

impl IncomingVm for LazyRestore {
    fn receive(&mut self, _file: &std::fs::File, path: &Path, ram: &GuestRam) -> Result<MachineState, String> {
        let loader = self.loader.as_ref().ok_or("lazy restore: already started")?;
        let map = RamMap::new(ram, &ram_layout(loader.pages.mem_size()))?;
        let uffd = Uffd::new().map_err(|e| format!("lazy restore into {}: {e}", path.display()))?;
        map.register_missing(&uffd).map_err(|e| format!("lazy restore into {}: {e}", path.display()))?;
        self.armed = Some((Arc::new(uffd), map, loader.owed.remaining()));
        Ok(self.state.clone())
    }

    fn started(&mut self, result: Result<(), String>, loading: &Arc<AtomicBool>) {
        let (Ok(()), Some((uffd, map, owed)), Some(loader)) = (result, self.armed.take(), self.loader.take()) else {
            return;
        };
        loading.store(true, Ordering::Release);
        let loading = loading.clone();
        let ttfi = self.started_at.elapsed();
        let _ = writeln!(
            std::io::stderr(),
            "smudge: lazy restore: the guest runs {:.1} ms after smudge started; {owed} pages load on first touch \
             or in the background",
            ttfi.as_secs_f64() * 1e3
        );
        let shared = Arc::new(Mutex::new(loader));
        let done = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let dir = self.dir.clone();
        let faults = {
            let (uffd, map, shared, done, counters, dir) =
                (uffd.clone(), map.clone(), shared.clone(), done.clone(), counters.clone(), dir.clone());
            std::thread::Builder::new().name("lazy-faults".into()).spawn(move || {
                if let Err(e) = serve_faults(&uffd, &map, &shared, &done, &counters) {
                    lost(&dir, &e);
                }
            })
        };
        let faults = match faults {
            Ok(t) => t,
            Err(e) => lost(&self.dir, &format!("spawning the fault thread: {e}")),
        };
        let started_at = self.started_at;
        let spawned = std::thread::Builder::new().name("lazy-prefetch".into()).spawn(move || {
            if let Err(e) = prefetch(&uffd, &map, &shared, &counters) {
                lost(&dir, &e);
            }
            done.store(true, Ordering::Release);
            let _ = faults.join();
            if let Err(e) = map.unregister(&uffd) {
                tracing::warn!("lazy restore: {e}");
            }
            loading.store(false, Ordering::Release);
            let _ = writeln!(
                std::io::stderr(),
                "smudge: lazy restore fully loaded {:.1} ms after smudge started: {} pages on first touch, {} \
                 prefetched, {} zero pages filled on touch; every chunk checked",
                started_at.elapsed().as_secs_f64() * 1e3,
                counters.faulted.load(Ordering::Relaxed),
                counters.prefetched.load(Ordering::Relaxed),
                counters.zero_filled.load(Ordering::Relaxed),
            );
        });
        if let Err(e) = spawned {
            lost(&self.dir, &format!("spawning the prefetch thread: {e}"));
        }
    }
}

/// The guest cannot continue: say why and end the process now (vCPUs may
/// wait in a fault nothing will resolve).
fn lost(dir: &Path, why: &str) -> ! {
    let _ = writeln!(
        std::io::stderr(),
        "smudge: lazy restore of {} failed after the guest started: {why}; the guest cannot continue (the snapshot \
         is untouched)",
        dir.display()
    );
    std::process::exit(i32::from(EXIT_MEMORY_LOST));
}

fn serve_faults(
    uffd: &Uffd,
    map: &RamMap,
    shared: &Mutex<Loader>,
    done: &AtomicBool,
    counters: &Counters,
) -> Result<(), String> {
    while !done.load(Ordering::Acquire) {
        let Some(off) = map.next_fault(uffd, Duration::from_millis(50))? else { continue };
        let mut g = shared.lock().unwrap_or_else(|p| p.into_inner());
        let l = &mut *g;
        if l.owed.owes(off) {
            l.buf.resize(PAGE as usize, 0);
            l.pages.read(off, &mut l.buf).map_err(|e| e.to_string())?;
            if map.place(uffd, off, &l.buf)? == Placed::Exists {
                return Err(format!("page {off:#x} was present before it was loaded"));
            }
            l.owed.deliver(off, 1).map_err(|e| e.to_string())?;
            counters.faulted.fetch_add(1, Ordering::Relaxed);
        } else {
            // A zero page (its chunk checked), or one loaded meanwhile
            // (placing finds it there and only wakes the waiter).
            if l.pages.is_zero(off) {
                l.buf.resize(PAGE as usize, 0);
                l.pages.read(off, &mut l.buf).map_err(|e| e.to_string())?;
            }
            if map.place_zero(uffd, off, PAGE)? == Placed::Placed {
                counters.zero_filled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

fn prefetch(uffd: &Uffd, map: &RamMap, shared: &Mutex<Loader>, counters: &Counters) -> Result<(), String> {
    let runs = shared.lock().unwrap_or_else(|p| p.into_inner()).pages.data_runs();
    for (off, count) in runs {
        let mut at = 0u64;
        while at < u64::from(count) {
            let n = (u64::from(count) - at).min(PREFETCH_PAGES);
            let base = off + at * PAGE;
            let mut g = shared.lock().unwrap_or_else(|p| p.into_inner());
            let l = &mut *g;
            // The still-owed runs of this block (faults took some).
            let mut p = 0;
            while p < n {
                if !l.owed.owes(base + p * PAGE) {
                    p += 1;
                    continue;
                }
                let mut q = p;
                while q < n && l.owed.owes(base + q * PAGE) {
                    q += 1;
                }
                let o = base + p * PAGE;
                l.buf.resize(((q - p) * PAGE) as usize, 0);
                l.pages.read(o, &mut l.buf).map_err(|e| e.to_string())?;
                if map.place(uffd, o, &l.buf)? == Placed::Exists {
                    return Err(format!("page {o:#x} was present before it was loaded"));
                }
                l.owed.deliver(o, q - p).map_err(|e| e.to_string())?;
                counters.prefetched.fetch_add(q - p, Ordering::Relaxed);
                p = q;
            }
            drop(g);
            at += n;
        }
    }
    let mut g = shared.lock().unwrap_or_else(|p| p.into_inner());
    if g.owed.remaining() != 0 {
        return Err(format!("{} pages were never loaded", g.owed.remaining()));
    }
    // Chunks no page was read from (zeros, holes) are checked too.
    g.pages.check_all().map_err(|e| e.to_string())
}
