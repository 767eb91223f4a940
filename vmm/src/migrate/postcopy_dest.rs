//! The destination's post-copy phase: the guest runs here while the pages
//! the source still owes arrive. Guest RAM is registered with userfaultfd
//! before a vCPU runs, so a first touch of a page that is not here blocks
//! that vCPU; a fault thread asks the source for an owed page
//! (`PageRequest`) or places a zero page where nothing is owed (the source
//! has zeros there), and a receive thread places each arriving page with
//! `UFFDIO_COPY`, which wakes whoever waits for it. One lock orders the
//! two, so a page is never zero-filled after it was found owed.
//!
//! RAM must be shmem for this (userfaultfd's missing-page mode does not
//! work on disk files): the destination's memory file lives on tmpfs
//! (`/dev/shm`) — its backing file is where the pages land, nothing moves
//! afterwards.
//!
//! When the source or the connection dies before every owed page is here
//! the guest cannot go on: the pages exist nowhere else. The destination
//! says so and exits [`EXIT_MEMORY_LOST`] at once — no vCPU is left hanging.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smudge::memory::{GuestRam, RamRegion};
use smudge::migration::frame::{Ack, Frame, FrameReader, FrameWriter, PAGE};
use smudge::migration::postcopy::{Owed, Placement, PostcopyReceiver};
use smudge::uffd::{Placed, RamMap, Uffd};

use crate::vm::outcome::EXIT_MEMORY_LOST;

/// Checks that the memory file at `path` (existing or to be created in its
/// directory) is on tmpfs, as post-copy needs.
pub fn check_tmpfs(path: &std::path::Path) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    match smudge::uffd::on_tmpfs(dir) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "post-copy needs the destination's memory file on tmpfs (e.g. /dev/shm/guest.mem): {} is not; \
             userfaultfd cannot catch first touches of disk-file pages",
            dir.display()
        )),
        Err(e) => Err(format!("{}: statfs: {e}", dir.display())),
    }
}

/// Counters of the post-copy phase.
#[derive(Debug, Default)]
struct Counters {
    requested: AtomicU64,
    zero_faults: AtomicU64,
}

/// A post-copy phase set up before the vCPUs run.
pub struct PostcopyDest {
    uffd: Arc<Uffd>,
    host: RamMap,
    rx: Arc<Mutex<(PostcopyReceiver, Vec<u64>)>>,
    owed_at_start: u64,
}

impl std::fmt::Debug for PostcopyDest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyDest").field("owed", &self.owed_at_start).finish()
    }
}

impl PostcopyDest {
    /// Registers all of guest RAM for missing-page faults; `owed` says
    /// which pages the source still sends.
    pub fn prepare(ram: &GuestRam, layout: &[RamRegion], owed: Owed) -> Result<Self, String> {
        let host = RamMap::new(ram, layout)?;
        let uffd = Uffd::new().map_err(|e| format!("post-copy: {e}"))?;
        host.register_missing(&uffd).map_err(|e| format!("post-copy: {e}"))?;
        let owed_at_start = owed.remaining();
        let requested = vec![0u64; (owed_bits(layout)).div_ceil(64) as usize];
        Ok(PostcopyDest {
            uffd: Arc::new(uffd),
            host,
            rx: Arc::new(Mutex::new((PostcopyReceiver::new(owed), requested))),
            owed_at_start,
        })
    }

    /// Runs the phase on threads of its own: faults served, pages placed.
    /// When all are in, RAM is unregistered and the source told; if the
    /// stream breaks first, the process exits [`EXIT_MEMORY_LOST`].
    pub fn run(
        self,
        mut reader: FrameReader<BufReader<TcpStream>>,
        writer: FrameWriter<TcpStream>,
        peer: SocketAddr,
        loading: Arc<AtomicBool>,
    ) -> Result<(), String> {
        loading.store(true, Ordering::Release);
        let writer = Arc::new(Mutex::new(writer));
        let done = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let faults = {
            let (uffd, host, rx, writer, done, counters) =
                (self.uffd.clone(), self.host.clone(), self.rx.clone(), writer.clone(), done.clone(), counters.clone());
            std::thread::Builder::new()
                .name("postcopy-faults".into())
                .spawn(move || {
                    if let Err(e) = serve_faults(&uffd, &host, &rx, &writer, &done, &counters) {
                        lost(peer, &rx, &e);
                    }
                })
                .map_err(|e| format!("post-copy: spawning the fault thread: {e}"))?
        };
        let t0 = Instant::now();
        let owed_at_start = self.owed_at_start;
        std::thread::Builder::new()
            .name("postcopy-recv".into())
            .spawn(move || {
                let r = receive(&mut reader, &self.uffd, &self.host, &self.rx);
                done.store(true, Ordering::Release);
                let _ = faults.join();
                if let Err(e) = r {
                    lost(peer, &self.rx, &e);
                }
                if let Err(e) = self.host.unregister(&self.uffd) {
                    tracing::warn!("post-copy: {e}");
                }
                loading.store(false, Ordering::Release);
                let (pages, zero) = {
                    let g = self.rx.lock().unwrap_or_else(|p| p.into_inner());
                    (g.0.pages(), g.0.zero_pages())
                };
                let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = w.send(&Frame::Ack(Ack::ok())).and_then(|_| w.flush()) {
                    tracing::warn!("post-copy from {peer}: cannot acknowledge the end: {e}");
                }
                let _ = writeln!(
                    std::io::stderr(),
                    "smudge: post-copy from {peer} done in {:.0} ms: {owed_at_start} pages owed, {pages} data + \
                     {zero} zero pages received, {} asked for by the guest's faults, {} untouched zero pages filled",
                    t0.elapsed().as_secs_f64() * 1e3,
                    counters.requested.load(Ordering::Relaxed),
                    counters.zero_faults.load(Ordering::Relaxed),
                );
            })
            .map_err(|e| format!("post-copy: spawning the receive thread: {e}"))?;
        Ok(())
    }
}

/// Bits of the per-page "asked for" map: one per page of RAM.
fn owed_bits(layout: &[RamRegion]) -> u64 {
    layout.iter().map(|r| r.file_offset + r.len).max().unwrap_or(0) / PAGE
}

/// The guest cannot continue: say so and end the process now (vCPUs may
/// be blocked in a fault that nothing will ever resolve).
fn lost(peer: SocketAddr, rx: &Mutex<(PostcopyReceiver, Vec<u64>)>, why: &str) -> ! {
    let owed = rx.lock().map(|g| g.0.owed().remaining()).unwrap_or(0);
    let _ = writeln!(
        std::io::stderr(),
        "smudge: post-copy from {peer} failed after the switchover: {why}; {owed} pages of the guest's memory \
         were still on the source and exist nowhere else: the guest cannot continue (the source keeps it paused \
         at the switchover point)"
    );
    std::process::exit(i32::from(EXIT_MEMORY_LOST));
}

fn serve_faults(
    uffd: &Uffd,
    host: &RamMap,
    rx: &Mutex<(PostcopyReceiver, Vec<u64>)>,
    writer: &Mutex<FrameWriter<TcpStream>>,
    done: &AtomicBool,
    counters: &Counters,
) -> Result<(), String> {
    while !done.load(Ordering::Acquire) {
        let Some(off) = host.next_fault(uffd, Duration::from_millis(50))? else { continue };
        let mut g = rx.lock().unwrap_or_else(|p| p.into_inner());
        let (receiver, requested) = &mut *g;
        if receiver.owed().owes(off) {
            let (word, bit) = ((off / PAGE / 64) as usize, (off / PAGE) % 64);
            if requested[word] & (1 << bit) == 0 {
                requested[word] |= 1 << bit;
                counters.requested.fetch_add(1, Ordering::Relaxed);
                let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                w.send(&Frame::PageRequest(vec![(off, 1)]))
                    .and_then(|_| w.flush())
                    .map_err(|e| format!("asking the source for page {off:#x}: {e}"))?;
            }
        } else {
            // Nothing owed there: the source has zeros (or the page came
            // in meanwhile, and this only wakes the waiter).
            if host.place_zero(uffd, off, PAGE)? == Placed::Placed {
                counters.zero_faults.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

fn receive(
    reader: &mut FrameReader<BufReader<TcpStream>>,
    uffd: &Uffd,
    host: &RamMap,
    rx: &Mutex<(PostcopyReceiver, Vec<u64>)>,
) -> Result<(), String> {
    loop {
        let f = reader.next_frame().map_err(|e| e.to_string())?;
        let mut g = rx.lock().unwrap_or_else(|p| p.into_inner());
        match g.0.apply(f).map_err(|e| e.to_string())? {
            Placement::Pages { offset, data } => {
                if host.place(uffd, offset, &data)? == Placed::Exists {
                    return Err(format!("an owed page at {offset:#x} was present before it arrived"));
                }
            }
            Placement::Zero(runs) => {
                for (offset, count) in runs {
                    if host.place_zero(uffd, offset, u64::from(count) * PAGE)? == Placed::Exists {
                        return Err(format!("an owed page at {offset:#x} was present before it arrived"));
                    }
                }
            }
            Placement::Done => return Ok(()),
        }
    }
}
