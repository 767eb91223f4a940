//! The workloads: stamp pages of the working set (each write records a new
//! generation in the table), or verify every page against the table.

use core::fmt::Write;

use guest_abi::{
    check_page, gen_table_addr, stamp_words, status, Config, LayoutError, PageCheck, RamMap, Rng, StateHeader,
    Workload, WsLayout, IMAGE_BASE, PAGE_SIZE, STATE_BASE,
};

use crate::console::Console;
use crate::io::rdtsc;

/// The working set and its generation table.
struct Ws {
    layout: WsLayout,
    pages: u64,
}

impl Ws {
    fn table(&self, i: u64) -> *mut u32 {
        gen_table_addr(i) as *mut u32
    }

    fn page(&self, i: u64) -> *mut u64 {
        self.layout.page_addr(i) as *mut u64
    }

    /// Writes the next generation's stamp into page `i`.
    #[inline(always)]
    fn stamp(&self, i: u64) {
        let t = self.table(i);
        let p = self.page(i);
        // SAFETY: i < pages; table and page lie in RAM (`WsLayout::new`
        // checked the memory map), identity-mapped (`paging::map_high` for
        // RAM above 4 GiB) and owned by the workload.
        unsafe {
            let generation = t.read_volatile() as u64 + 1;
            t.write_volatile(generation as u32);
            let w = stamp_words((p as u64) >> 12, generation);
            for (k, v) in w.iter().enumerate() {
                p.add(k).write_volatile(*v);
            }
            p.add(511).write_volatile(w[2]);
        }
    }

    fn check(&self, i: u64) -> PageCheck {
        let p = self.page(i);
        // SAFETY: as in `stamp`; reads only.
        unsafe {
            let expected = self.table(i).read_volatile() as u64;
            let h = [p.read_volatile(), p.add(1).read_volatile(), p.add(2).read_volatile(), p.add(3).read_volatile()];
            check_page((p as u64) >> 12, expected, h, p.add(511).read_volatile())
        }
    }
}

fn write_header(h: &StateHeader) {
    let at = STATE_BASE as *mut u64;
    for (k, v) in h.to_words().iter().enumerate() {
        // SAFETY: the header page at STATE_BASE is the state area's first page.
        unsafe { at.add(k).write_volatile(*v) };
    }
}

fn read_header() -> Option<StateHeader> {
    let at = STATE_BASE as *const u64;
    let mut w = [0u64; 5];
    for (k, v) in w.iter_mut().enumerate() {
        // SAFETY: as in write_header; reads only.
        *v = unsafe { at.add(k).read_volatile() };
    }
    StateHeader::from_words(w)
}

/// A deadline in TSC cycles, or none.
struct Clock {
    khz: u64,
    start: u64,
    deadline: Option<u64>,
}

impl Clock {
    fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| rdtsc() >= d)
    }

    fn elapsed_us(&self) -> u64 {
        if self.khz == 0 {
            return 0;
        }
        (rdtsc() - self.start) * 1000 / self.khz
    }
}

/// Runs the configured workload over the RAM `ram` describes; returns the
/// exit status.
pub fn run(c: &Config, ram: &RamMap, con: &mut Console) -> u8 {
    let pages = c.pages.unwrap_or_else(|| match c.ws_base {
        Some(base) => ram.pages_from(base),
        None => ram.max_pages(),
    });
    let layout = match WsLayout::new(ram, c.ws_base, pages) {
        Ok(l) => l,
        Err(e) => {
            let (low_end, (high_start, high_end)) = (ram.low_end, ram.high.unwrap_or((0, 0)));
            let _ = writeln!(con, "error: {e} (RAM: {IMAGE_BASE:#x}-{low_end:#x}, {high_start:#x}-{high_end:#x})");
            return match e {
                LayoutError::BadBase { .. } => status::BAD_CMDLINE,
                LayoutError::DoesNotFit { .. } => status::NO_MEMORY,
            };
        }
    };
    let ws = Ws { layout, pages };
    let high = ram.high.map_or(0, |(s, e)| (e - s) / PAGE_SIZE);
    let _ = writeln!(
        con,
        "layout: ram_end={:#x} high_pages={high} scratch={IMAGE_BASE:#x}-{:#x} ws={:#x}+{} pages low_pages={}",
        ram.low_end,
        guest_abi::ws_base_for(pages),
        layout.base,
        ws.pages,
        layout.low_pages()
    );
    let paced = matches!(c.workload, Workload::Rate | Workload::Mixed);
    if (c.ms > 0 || paced) && c.tsc_khz == 0 {
        let _ = writeln!(con, "error: ms=, workload=rate and workload=mixed need tsc_khz= (the VMM adds it)");
        return status::BAD_CMDLINE;
    }
    let mut header = match read_header() {
        Some(h) if h.ws_base == layout.base && h.pages == ws.pages && !c.wipe => h,
        Some(h) if c.workload == Workload::Verify && !c.wipe => {
            // The table describes another working set: verifying this one
            // against it (or against a fresh, all-zero table) would report
            // every page the earlier run wrote as wrong.
            let _ = writeln!(
                con,
                "error: verify: memory holds the working set ws={:#x}+{} pages, this run asks for ws={:#x}+{} pages; \
                 verify with the pages= (and ws_base=) that wrote it",
                h.ws_base, h.pages, layout.base, ws.pages
            );
            return status::LAYOUT_MISMATCH;
        }
        _ => {
            // New layout: the table starts at zero; the pages are assumed zero
            // (a fresh file) unless wipe=1 asks to zero them.
            for i in 0..ws.pages {
                // SAFETY: i < pages, table entries within the state area.
                unsafe { ws.table(i).write_volatile(0) };
            }
            if c.wipe {
                let low = layout.low_pages();
                // SAFETY: `WsLayout::new` placed the working set in RAM: its
                // first `low` pages run contiguously from the base, the rest
                // from the start of high RAM.
                unsafe {
                    core::ptr::write_bytes(ws.page(0).cast::<u8>(), 0, (low * PAGE_SIZE) as usize);
                    if low < ws.pages {
                        core::ptr::write_bytes(ws.page(low).cast::<u8>(), 0, ((ws.pages - low) * PAGE_SIZE) as usize);
                    }
                }
            }
            StateHeader { ws_base: layout.base, pages: ws.pages, writes: 0 }
        }
    };
    // Hosts that time the workload (the migration benchmark) wait for this
    // line: the working set is laid out (and wiped) and the clock starts now.
    let _ = writeln!(con, "workload: working set ready pages={}", ws.pages);
    let start = rdtsc();
    let clock = Clock { khz: c.tsc_khz, start, deadline: (c.ms > 0).then(|| start + c.ms * c.tsc_khz) };
    let mut iterations = 0;
    let written = match c.workload {
        Workload::Verify => 0,
        Workload::Idle => {
            while c.ms == 0 || !clock.expired() {
                core::hint::spin_loop();
            }
            0
        }
        Workload::Seq => seq(&ws, c, &clock),
        Workload::Stride => stride(&ws, c, &clock),
        Workload::Random | Workload::HotCold | Workload::Rate | Workload::Mixed => {
            random(&ws, c, &clock, &mut iterations)
        }
    };
    header.writes += written;
    write_header(&header);
    let us = clock.elapsed_us();
    let _ = writeln!(
        con,
        "workload {} done: writes={} elapsed_us={} ns_per_write={} total_writes={}",
        c.workload.name(),
        written,
        us,
        (us * 1000).checked_div(written).unwrap_or(0),
        header.writes
    );
    if c.workload == Workload::Mixed {
        // Hosts compare this count per second of the guest's own clock
        // across runs: the guest's compute slowdown.
        let _ = writeln!(con, "compute: iterations={iterations} elapsed_us={us}");
    }
    let st = if c.workload == Workload::Verify || c.verify { verify(&ws, con) } else { status::OK };
    if c.linger > 0 {
        let _ = writeln!(con, "lingering {} ms", c.linger);
        let end = rdtsc() + c.linger * c.tsc_khz.max(1);
        while rdtsc() < end {
            core::hint::spin_loop();
        }
    }
    st
}

fn seq(ws: &Ws, c: &Config, clock: &Clock) -> u64 {
    let mut n = 0;
    let mut pass = 0;
    while (c.ms > 0 || pass < c.passes) && !clock.expired() {
        for i in 0..ws.pages {
            ws.stamp(i);
            if i % 256 == 255 && clock.expired() {
                return n + i + 1;
            }
        }
        n += ws.pages;
        pass += 1;
        if c.sync {
            crate::io::outl(guest_abi::SYNC_PORT, pass as u32);
        }
    }
    n
}

fn stride(ws: &Ws, c: &Config, clock: &Clock) -> u64 {
    let mut n = 0;
    let mut pass = 0;
    while (c.ms > 0 || pass < c.passes) && !clock.expired() {
        for i in guest_abi::stride_pages(ws.pages, c.stride, c.offset, c.run) {
            ws.stamp(i);
            n += 1;
        }
        pass += 1;
        if c.sync {
            crate::io::outl(guest_abi::SYNC_PORT, pass as u32);
        }
    }
    n
}

/// One step of the mixed workload's compute loop (a few dozen dependent
/// multiplies the compiler cannot fold away).
#[inline(never)]
fn compute_step(x: u64) -> u64 {
    let mut x = core::hint::black_box(x);
    for _ in 0..32 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    }
    x
}

/// Random writes (seeded; at `rate` per second for the paced workloads);
/// for `mixed`, the time between writes goes to [`compute_step`], counted
/// in `iterations`.
fn random(ws: &Ws, c: &Config, clock: &Clock, iterations: &mut u64) -> u64 {
    let mut rng = Rng::new(c.seed);
    let limit = c.writes.unwrap_or(if c.ms > 0 { u64::MAX } else { ws.pages });
    let hot = (ws.pages * c.hot_pct / 100).clamp(1, ws.pages);
    let paced = matches!(c.workload, Workload::Rate | Workload::Mixed);
    let interval = if paced && c.rate > 0 { c.tsc_khz * 1000 / c.rate } else { 0 };
    let mut x = c.seed;
    let mut due = rdtsc();
    let mut n = 0;
    while n < limit {
        if n % 64 == 0 && clock.expired() {
            break;
        }
        if interval > 0 {
            let mut now = rdtsc();
            while now < due {
                if c.workload == Workload::Mixed {
                    x = compute_step(x);
                    *iterations += 1;
                } else {
                    core::hint::spin_loop();
                }
                now = rdtsc();
            }
            // A steady rate: writes missed while paused (a snapshot, a
            // throttle) are dropped, not caught up in a burst.
            due = (due + interval).max(now.saturating_sub(interval.saturating_mul(16)));
        }
        let i = match c.workload {
            Workload::HotCold if hot < ws.pages && rng.below(100) >= c.hot_share => hot + rng.below(ws.pages - hot),
            Workload::HotCold => rng.below(hot),
            _ => rng.below(ws.pages),
        };
        ws.stamp(i);
        n += 1;
    }
    n
}

fn verify(ws: &Ws, con: &mut Console) -> u8 {
    let (mut ok, mut stamped, mut bad) = (0u64, 0u64, 0u64);
    for i in 0..ws.pages {
        match ws.check(i) {
            PageCheck::Ok => {
                ok += 1;
                // SAFETY: i < pages.
                if unsafe { ws.table(i).read_volatile() } != 0 {
                    stamped += 1;
                }
            }
            other => {
                bad += 1;
                if bad <= 8 {
                    let _ = writeln!(con, "verify: page {i} (gpa {:#x}): {other:?}", ws.layout.page_addr(i));
                }
            }
        }
    }
    let _ = writeln!(con, "verify: pages={} ok={ok} stamped={stamped} mismatches={bad}", ws.pages);
    if bad == 0 {
        status::OK
    } else {
        status::VERIFY_FAILED
    }
}
