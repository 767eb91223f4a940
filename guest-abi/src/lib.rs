//! What the tiny guest and the host agree on.
//!
//! The guest (`guest/`, `#![no_std]`) and the host side (the `smudge`
//! library, the VMM and the tests) both build this crate, so the memory
//! layout, the page stamp, the seeded PRNG, the command-line keys and the exit
//! statuses have exactly one definition.
//!
//! # Guest physical layout
//!
//! ```text
//! 0x0000_0000 ┬ low memory: start_info, memory map, command line (VMM writes)
//! 0x0010_0000 ┼ guest image: code, GDT/IDT/TSS, page tables, stacks  ┐ scratch
//! 0x0020_0000 ┼ state area: one header page, then the generation     │ (the guest
//!             │ table (one u32 per working-set page)                 ┘ writes these)
//! ws_base     ┼ working set: `pages` pages, each stamped on write
//!             ┴ end of low RAM (3 GiB under smudge)
//!               the 32-bit hole (LAPIC, IOAPIC): no RAM
//! 0x1_0000_0000 ┬ high RAM: the working set continues here
//!             ┴ end of RAM
//! ```
//!
//! `ws_base` is the end of the state area rounded up to 2 MiB, or the
//! `ws_base=` the command line asks for. Working-set page `i` lives at
//! `ws_base + i * PAGE_SIZE`, skipping the hole: a working set that reaches
//! the end of low RAM continues at the start of high RAM ([`WsLayout`]).
//!
//! # Page stamp
//!
//! Every write of the workload stamps a whole page header and its last word:
//!
//! ```text
//! offset 0     u64 pfn         (guest physical address >> 12)
//! offset 8     u64 generation  (1, 2, … per page; 0 = never written)
//! offset 16    u64 checksum    (stamp_checksum(pfn, generation))
//! offset 24    u64 STAMP_MAGIC
//! offset 4088  u64 checksum    (again: a torn copy shows)
//! ```
//!
//! The generation table in the state area holds the generation each page
//! must carry, so `verify` catches a stale page (a lost write), not only a
//! torn or foreign one.

#![no_std]
#![warn(missing_docs)]

/// Guest page size used by the workload and the stamps.
pub const PAGE_SIZE: u64 = 4096;
/// Where the guest image is linked and loaded.
pub const IMAGE_BASE: u64 = 0x10_0000;
/// Start of the state area (header page + generation table).
pub const STATE_BASE: u64 = 0x20_0000;
/// The working set starts on a 2 MiB boundary.
pub const WS_ALIGN: u64 = 0x20_0000;
/// The guest's page tables identity-map at most this much (2 MiB pages).
/// The low 4 GiB are mapped at link time; the guest maps RAM above 4 GiB
/// at boot (at CPL3, one page directory per GiB the memory map reports, out
/// of [`HIGH_PAGE_DIRECTORIES`] reserved in its image), so the loader
/// writes no page-table page the guest does not need.
pub const MAPPED_LIMIT: u64 = HIGH_RAM_BASE + HIGH_PAGE_DIRECTORIES * (1 << 30);
/// Page directories (one per GiB) the guest image reserves for RAM above
/// 4 GiB.
pub const HIGH_PAGE_DIRECTORIES: u64 = 124;
/// The VMM's low RAM region ends here; RAM beyond continues at 4 GiB.
pub const LOW_RAM_LIMIT: u64 = 3 << 30;
/// Where RAM continues past the 32-bit hole.
pub const HIGH_RAM_BASE: u64 = 4 << 30;
/// I/O port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// I/O port of the exit device (QEMU's isa-debug-exit convention).
pub const EXIT_PORT: u16 = 0xf4;
/// I/O port the guest writes its pass number to after each pass when
/// `sync=1` (smudge's benchmarks time passes and harvest there; a VMM that
/// does not know it must ignore it, not stop the guest).
pub const SYNC_PORT: u16 = 0x7f0;
/// Magic in every stamped page (offset 24).
pub const STAMP_MAGIC: u64 = 0x736d_7564_6765_7067; // "smudgepg"
/// Magic of the state header page.
pub const STATE_MAGIC: u64 = 0x736d_7564_6765_7374; // "smudgest"
/// The first line the guest prints, identical under every VMM.
pub const BANNER: &str = "smudge-guest 1: booted via PVH, running at CPL3";

/// Exit statuses the guest writes to [`EXIT_PORT`].
pub mod status {
    /// The workload (and verify, if asked) succeeded.
    pub const OK: u8 = 0;
    /// `verify` found pages whose stamp does not match the generation table.
    pub const VERIFY_FAILED: u8 = 1;
    /// The command line could not be parsed.
    pub const BAD_CMDLINE: u8 = 2;
    /// The guest's Rust code panicked.
    pub const PANIC: u8 = 3;
    /// The memory map gives too little RAM for the requested working set.
    pub const NO_MEMORY: u8 = 4;
    /// `workload=verify` asked for another working-set layout than the one
    /// the state area records: its generation table does not describe the
    /// pages asked for, so nothing is verified.
    pub const LAYOUT_MISMATCH: u8 = 5;
    /// `0x20 + vector`: an unexpected CPU exception.
    pub const EXCEPTION_BASE: u8 = 0x20;
}

/// Checksum stored twice in a page stamp.
pub fn stamp_checksum(pfn: u64, generation: u64) -> u64 {
    splitmix64(pfn ^ generation.rotate_left(32) ^ STAMP_MAGIC)
}

/// The four header words of a stamp for page `pfn` at `generation`.
pub fn stamp_words(pfn: u64, generation: u64) -> [u64; 4] {
    [pfn, generation, stamp_checksum(pfn, generation), STAMP_MAGIC]
}

/// What a page holds, judged against the generation it should carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCheck {
    /// Stamp matches the expected generation (or page is zero and expected 0).
    Ok,
    /// The page carries a valid stamp of another generation (stale or ahead).
    WrongGeneration {
        /// Generation found in the page.
        found: u64,
    },
    /// The header or tail does not form a valid stamp for this page.
    Corrupt,
}

/// Checks one page (`page` is the whole page, `words` its u64s in
/// little-endian order) against `expected` generation.
pub fn check_page(pfn: u64, expected: u64, header: [u64; 4], tail: u64) -> PageCheck {
    if expected == 0 && header == [0; 4] && tail == 0 {
        return PageCheck::Ok;
    }
    let [p, generation, sum, magic] = header;
    if p != pfn || magic != STAMP_MAGIC || sum != stamp_checksum(pfn, generation) || tail != sum {
        return PageCheck::Corrupt;
    }
    if generation == expected {
        PageCheck::Ok
    } else {
        PageCheck::WrongGeneration { found: generation }
    }
}

/// SplitMix64 finaliser: a good 64-bit mix for checksums and seeds.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The workload's seeded PRNG (xorshift64*), reproducible on the host.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        let s = splitmix64(seed);
        Rng(if s == 0 { 0x1234_5678 } else { s })
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-enough value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// The state header page at [`STATE_BASE`]: which layout the generation table
/// describes, so a later boot on the same memory file can continue or verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateHeader {
    /// First page of the working set (guest physical address).
    pub ws_base: u64,
    /// Number of pages in the working set.
    pub pages: u64,
    /// Total page writes the workload has made on this memory, all boots.
    pub writes: u64,
}

impl StateHeader {
    /// The header as the words stored at [`STATE_BASE`].
    pub fn to_words(&self) -> [u64; 5] {
        let sum = splitmix64(STATE_MAGIC ^ self.ws_base ^ self.pages.rotate_left(17));
        [STATE_MAGIC, self.ws_base, self.pages, sum, self.writes]
    }

    /// Parses the stored words; `None` if they are not a valid header.
    pub fn from_words(w: [u64; 5]) -> Option<Self> {
        let h = StateHeader { ws_base: w[1], pages: w[2], writes: w[4] };
        (w[0] == STATE_MAGIC && h.to_words()[3] == w[3]).then_some(h)
    }
}

/// Address of the generation table entry of working-set page `index`.
/// Saturates for an index no RAM could hold (a command line may ask for
/// any count; the layout then refuses it as not fitting).
pub fn gen_table_addr(index: u64) -> u64 {
    (STATE_BASE + PAGE_SIZE).saturating_add(index.saturating_mul(4))
}

/// Working-set base for a working set of `pages` pages.
pub fn ws_base_for(pages: u64) -> u64 {
    align_up(gen_table_addr(pages), WS_ALIGN)
}

/// Rounds `v` up to a multiple of `align` (a power of two).
/// Saturates (to the highest multiple of `align`) instead of overflowing.
pub fn align_up(v: u64, align: u64) -> u64 {
    v.saturating_add(align - 1) & !(align - 1)
}

/// Guest RAM as the guest's memory map gives it: the low region that holds
/// the state area and, past the 32-bit hole, at most one high region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamMap {
    /// End of the RAM region that holds [`STATE_BASE`].
    pub low_end: u64,
    /// `[start, end)` of the RAM above `low_end`, if any.
    pub high: Option<(u64, u64)>,
}

impl RamMap {
    /// The map smudge gives a guest of `mem_size` bytes (the host side's
    /// mirror of the VMM's RAM layout: low RAM up to [`LOW_RAM_LIMIT`], the
    /// rest from [`HIGH_RAM_BASE`]).
    pub fn for_mem_size(mem_size: u64) -> RamMap {
        let low_end = mem_size.min(LOW_RAM_LIMIT);
        let high = (mem_size > low_end).then(|| (HIGH_RAM_BASE, HIGH_RAM_BASE + (mem_size - low_end)));
        RamMap { low_end, high }
    }

    /// Pages of RAM from `base` (in low or high RAM) to the end of RAM,
    /// skipping the hole; 0 if `base` is not RAM.
    pub fn pages_from(&self, base: u64) -> u64 {
        let high = self.high.map_or(0, |(s, e)| (e.saturating_sub(s)) / PAGE_SIZE);
        if base < self.low_end {
            (self.low_end - base) / PAGE_SIZE + high
        } else {
            match self.high {
                Some((s, e)) if base >= s && base < e => (e - base) / PAGE_SIZE,
                _ => 0,
            }
        }
    }

    /// The largest working set at its default base ([`ws_base_for`]) that
    /// fits in RAM with its table.
    pub fn max_pages(&self) -> u64 {
        let fits = |p: u64| ws_base_for(p) < self.low_end && p <= self.pages_from(ws_base_for(p));
        largest(fits, self.low_end / PAGE_SIZE + self.high.map_or(0, |(s, e)| (e - s) / PAGE_SIZE) + 1)
    }
}

/// Why a working set cannot be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutError {
    /// `ws_base=` is not 2 MiB-aligned or overlaps the generation table.
    BadBase {
        /// The base asked for.
        base: u64,
        /// The lowest base the table leaves free.
        lowest: u64,
    },
    /// The working set does not fit between its base and the end of RAM.
    DoesNotFit {
        /// Pages asked for.
        pages: u64,
        /// Pages of RAM from the base to the end of RAM.
        room: u64,
    },
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            LayoutError::BadBase { base, lowest } => write!(
                f,
                "ws_base={base:#x} must be a multiple of {WS_ALIGN:#x} at or above {lowest:#x} (the end of the generation table)"
            ),
            LayoutError::DoesNotFit { pages, room } => {
                write!(f, "pages={pages} does not fit: room for {room} pages from the working set's base")
            }
        }
    }
}

/// Where each page of a working set lives: `pages` pages from `base`,
/// continuing past the 32-bit hole at the start of high RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsLayout {
    /// Guest physical address of page 0.
    pub base: u64,
    /// Number of pages.
    pub pages: u64,
    /// Pages `0..low` lie below the hole, at `base + i * PAGE_SIZE`.
    low: u64,
    /// What the pages from `low` on are shifted up by (the hole; 0 when the
    /// working set lies on one side of it).
    gap: u64,
}

impl WsLayout {
    /// Places `pages` pages at `base` (`None`: [`ws_base_for`]`(pages)`) in
    /// `map`.
    pub fn new(map: &RamMap, base: Option<u64>, pages: u64) -> Result<WsLayout, LayoutError> {
        let lowest = ws_base_for(pages);
        let base = base.unwrap_or(lowest);
        if base < lowest || !base.is_multiple_of(WS_ALIGN) {
            return Err(LayoutError::BadBase { base, lowest });
        }
        let room = map.pages_from(base);
        if pages == 0 || pages > room {
            return Err(LayoutError::DoesNotFit { pages, room });
        }
        if base >= map.low_end {
            return Ok(WsLayout { base, pages, low: 0, gap: 0 });
        }
        // The whole pages below the end of low RAM come first; the next page
        // is the first of high RAM (`room` says there is one if needed).
        let low = ((map.low_end - base) / PAGE_SIZE).min(pages);
        let gap = map.high.map_or(0, |(start, _)| start - (base + low * PAGE_SIZE));
        Ok(WsLayout { base, pages, low, gap })
    }

    /// Guest physical address of working-set page `i` (`i < pages`).
    #[inline(always)]
    pub fn page_addr(&self, i: u64) -> u64 {
        let a = self.base + i * PAGE_SIZE;
        if i < self.low {
            a
        } else {
            a + self.gap
        }
    }

    /// How many of the pages lie below the hole (the rest lie above it).
    pub fn low_pages(&self) -> u64 {
        self.low
    }
}

/// The largest `p` in `0..hi` for which `fits(p)` (monotone) holds.
fn largest(fits: impl Fn(u64) -> bool, hi: u64) -> u64 {
    let (mut lo, mut hi) = (0u64, hi);
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The largest working set that fits below `ram_end` with its table (low
/// RAM only; [`RamMap::max_pages`] counts high RAM too).
pub fn max_pages(ram_end: u64) -> u64 {
    // Binary search for the largest count that fits with its aligned table.
    largest(|p| ws_base_for(p) + p * PAGE_SIZE <= ram_end, ram_end / PAGE_SIZE + 1)
}

/// The workloads the guest can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Stamp pages 0, 1, 2, … in order, `passes` times.
    Seq,
    /// Stamp seeded random pages.
    Random,
    /// `hot_pct` % of the pages take `hot_share` % of the writes.
    HotCold,
    /// Seeded random pages at a target `rate` (pages per second).
    Rate,
    /// As `Rate`, the time between writes spent in a compute loop whose
    /// iterations the guest counts and reports (its own slowdown meter).
    Mixed,
    /// Every `stride`-th page from `offset`, `run` consecutive pages each
    /// time (chunk-boundary patterns), `passes` times.
    Stride,
    /// Write nothing; spin for `ms` (0: until stopped).
    Idle,
    /// Check every working-set page against the generation table.
    Verify,
}

impl Workload {
    /// Parses a workload name as used on the command line.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "seq" => Workload::Seq,
            "random" => Workload::Random,
            "hotcold" => Workload::HotCold,
            "rate" => Workload::Rate,
            "mixed" => Workload::Mixed,
            "stride" => Workload::Stride,
            "idle" => Workload::Idle,
            "verify" => Workload::Verify,
            _ => return None,
        })
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Seq => "seq",
            Workload::Random => "random",
            Workload::HotCold => "hotcold",
            Workload::Rate => "rate",
            Workload::Mixed => "mixed",
            Workload::Stride => "stride",
            Workload::Idle => "idle",
            Workload::Verify => "verify",
        }
    }
}

/// Everything the guest command line can say (see `guest/README.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Which workload to run.
    pub workload: Workload,
    /// Working-set size in pages; `None`: all RAM above the state area.
    pub pages: Option<u64>,
    /// Where the working set starts (`None`: right after the generation
    /// table, [`ws_base_for`]); 2 MiB-aligned, in low or high RAM.
    pub ws_base: Option<u64>,
    /// PRNG seed.
    pub seed: u64,
    /// Page writes for random/hotcold/rate (`None`: one per working-set page,
    /// or unbounded when `ms` is set).
    pub writes: Option<u64>,
    /// Sequential passes for `seq`.
    pub passes: u64,
    /// Stop after this many milliseconds (0: no time limit).
    pub ms: u64,
    /// Percentage of pages that are hot (hotcold).
    pub hot_pct: u64,
    /// Percentage of writes that go to the hot pages (hotcold).
    pub hot_share: u64,
    /// Target page writes per second (rate).
    pub rate: u64,
    /// `stride`: distance between runs, in pages.
    pub stride: u64,
    /// `stride`: first page of the first run.
    pub offset: u64,
    /// `stride`: consecutive pages per run.
    pub run: u64,
    /// After each pass of `seq`/`stride`, write the pass number to
    /// [`SYNC_PORT`] (the VMM may measure or harvest while the vCPU waits).
    pub sync: bool,
    /// Run `verify` after the workload.
    pub verify: bool,
    /// Spin this many milliseconds (writing nothing) before exiting.
    pub linger: u64,
    /// TSC frequency in kHz (the VMM passes it; needed for `ms` and `rate`).
    pub tsc_khz: u64,
    /// Start from a blank state: zero the generation table and every
    /// working-set page first.
    pub wipe: bool,
    /// Test hook: write one byte to this I/O port before the workload (a
    /// VMM must stop a guest that pokes a port no device owns).
    pub poke: Option<u16>,
    /// Test hook: raise an exception after the workload (exception and
    /// shutdown reporting; what the workload wrote must still reach the file).
    pub fault: Fault,
}

/// What `fault=` makes the guest do before its workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing (`fault=0`, the default).
    None,
    /// `ud2` (`fault=1` or `fault=ud`): the guest's handler reports #UD.
    Ud,
    /// `fault=triple`: break the kernel stack first, so delivering #UD faults
    /// again, and again: a triple fault (`KVM_EXIT_SHUTDOWN`).
    Triple,
}

impl Fault {
    /// The `fault=` value that selects this.
    pub fn name(self) -> &'static str {
        match self {
            Fault::None => "0",
            Fault::Ud => "ud",
            Fault::Triple => "triple",
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workload: Workload::Seq,
            pages: None,
            ws_base: None,
            seed: 1,
            writes: None,
            passes: 1,
            ms: 0,
            hot_pct: 10,
            hot_share: 90,
            rate: 10_000,
            stride: 64,
            offset: 0,
            run: 1,
            sync: false,
            verify: false,
            linger: 0,
            tsc_khz: 0,
            wipe: false,
            poke: None,
            fault: Fault::None,
        }
    }
}

/// Why a command line was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// A key the guest does not know.
    UnknownKey(&'a str),
    /// A value that does not parse for its key.
    BadValue(&'a str),
}

impl core::fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CmdlineError::UnknownKey(k) => write!(f, "unknown key '{k}'"),
            CmdlineError::BadValue(kv) => write!(f, "bad value in '{kv}'"),
        }
    }
}

fn parse_num(s: &str) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1_000),
        b'm' | b'M' => (&s[..s.len() - 1], 1_000_000),
        _ => (s, 1),
    };
    let v = if let Some(hex) = digits.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()?
    } else {
        digits.parse::<u64>().ok()?
    };
    v.checked_mul(mult)
}

impl Config {
    /// Parses `key=value` words separated by spaces. Words the guest does not
    /// own (`console=…`, a bare word) are refused so typos do not pass silently.
    pub fn parse(cmdline: &str) -> Result<Config, CmdlineError<'_>> {
        let mut c = Config::default();
        for word in cmdline.split(' ').filter(|w| !w.is_empty()) {
            let (key, value) = word.split_once('=').unwrap_or((word, "1"));
            let num = || parse_num(value).ok_or(CmdlineError::BadValue(word));
            let flag = || match value {
                "1" | "yes" | "true" => Ok(true),
                "0" | "no" | "false" => Ok(false),
                _ => Err(CmdlineError::BadValue(word)),
            };
            match key {
                "workload" => c.workload = Workload::parse(value).ok_or(CmdlineError::BadValue(word))?,
                "pages" => c.pages = Some(num()?),
                "ws_base" => c.ws_base = Some(num()?),
                "seed" => c.seed = num()?,
                "writes" => c.writes = Some(num()?),
                "passes" => c.passes = num()?,
                "ms" => c.ms = num()?,
                "hot_pct" => c.hot_pct = num()?.clamp(1, 100),
                "hot_share" => c.hot_share = num()?.min(100),
                "rate" => c.rate = num()?,
                "stride" => c.stride = num()?.max(1),
                "offset" => c.offset = num()?,
                "run" => c.run = num()?.max(1),
                "verify" => c.verify = flag()?,
                "sync" => c.sync = flag()?,
                "linger" => c.linger = num()?,
                "tsc_khz" => c.tsc_khz = num()?,
                "wipe" => c.wipe = flag()?,
                "poke" => c.poke = Some(u16::try_from(num()?).map_err(|_| CmdlineError::BadValue(word))?),
                "fault" => {
                    c.fault = match value {
                        "triple" => Fault::Triple,
                        "ud" => Fault::Ud,
                        _ if flag()? => Fault::Ud,
                        _ => Fault::None,
                    }
                }
                _ => return Err(CmdlineError::UnknownKey(key)),
            }
        }
        Ok(c)
    }
}

/// The working-set indices `stride` writes in one pass over `pages` pages.
pub fn stride_pages(pages: u64, stride: u64, offset: u64, run: u64) -> impl Iterator<Item = u64> {
    let stride = stride.max(1);
    // Checked: `stride`, `offset` and `run` come from the command line, and
    // a start past u64::MAX must end the pass, not wrap to the beginning.
    (0u64..)
        .map_while(move |k| k.checked_mul(stride).and_then(|d| offset.checked_add(d)))
        .take_while(move |&start| start < pages)
        .flat_map(move |start| start..start.saturating_add(run.max(1)).min(pages))
}

/// The pages (working-set indices) that `random` with `seed` writes in its
/// first `writes` writes, in order: the host replays this to know the
/// written set exactly.
pub fn random_sequence(seed: u64, pages: u64) -> impl Iterator<Item = u64> {
    let mut rng = Rng::new(seed);
    core::iter::repeat_with(move || rng.below(pages))
}

#[cfg(test)]
extern crate std;

#[cfg(test)]
mod tests {
    use std::vec;
    use std::vec::Vec;

    use super::*;

    /// Found by the guest_cmdline fuzz target: `pages=12000…0` overflowed
    /// the generation table's address before the layout could refuse it.
    #[test]
    fn a_working_set_no_ram_could_hold_is_refused_not_overflowed() {
        let map = RamMap::for_mem_size(64 << 20);
        for pages in [u64::MAX, u64::MAX / 4, 1 << 62] {
            assert!(matches!(WsLayout::new(&map, None, pages), Err(LayoutError::DoesNotFit { room: 0, .. })));
        }
        assert_eq!(align_up(u64::MAX, WS_ALIGN), !(WS_ALIGN - 1));
    }

    #[test]
    fn cmdline_round_trip() {
        let c = Config::parse("workload=random pages=100 seed=7 writes=2k verify tsc_khz=0x10").unwrap();
        assert_eq!(c.workload, Workload::Random);
        assert_eq!(c.pages, Some(100));
        assert_eq!(c.seed, 7);
        assert_eq!(c.writes, Some(2000));
        assert!(c.verify);
        assert_eq!(c.tsc_khz, 16);
        assert_eq!(Config::parse("bogus=1"), Err(CmdlineError::UnknownKey("bogus")));
        assert_eq!(Config::parse("pages=x"), Err(CmdlineError::BadValue("pages=x")));
        assert_eq!(Config::parse("workload=fly"), Err(CmdlineError::BadValue("workload=fly")));
    }

    #[test]
    fn every_workload_name_parses_back() {
        use Workload::*;
        for w in [Seq, Random, HotCold, Rate, Mixed, Stride, Idle, Verify] {
            assert_eq!(Workload::parse(w.name()), Some(w));
        }
        let c = Config::parse("workload=mixed rate=12800 pages=13107").unwrap();
        assert_eq!((c.workload, c.rate, c.pages), (Mixed, 12800, Some(13107)));
    }

    #[test]
    fn fault_kinds() {
        assert_eq!(Config::parse("").unwrap().fault, Fault::None);
        assert_eq!(Config::parse("fault=0").unwrap().fault, Fault::None);
        assert_eq!(Config::parse("fault").unwrap().fault, Fault::Ud);
        assert_eq!(Config::parse("fault=1").unwrap().fault, Fault::Ud);
        assert_eq!(Config::parse("fault=ud").unwrap().fault, Fault::Ud);
        assert_eq!(Config::parse("fault=triple").unwrap().fault, Fault::Triple);
        for f in [Fault::None, Fault::Ud, Fault::Triple] {
            assert_eq!(Config::parse(&std::format!("fault={}", f.name())).unwrap().fault, f);
        }
        assert_eq!(Config::parse("fault=twice"), Err(CmdlineError::BadValue("fault=twice")));
    }

    #[test]
    fn layout_fits() {
        for ram in [8u64 << 20, 64 << 20, 256 << 20, 1 << 30, 3 << 30] {
            let p = max_pages(ram);
            assert!(p > 0);
            assert!(ws_base_for(p) + p * PAGE_SIZE <= ram, "ram {ram:#x}");
            // one more page would not fit
            assert!(ws_base_for(p + 1) + (p + 1) * PAGE_SIZE > ram, "ram {ram:#x}");
        }
        assert_eq!(max_pages(STATE_BASE), 0);
    }

    #[test]
    fn a_working_set_continues_past_the_hole() {
        // smudge's layout: 3 GiB low, the rest from 4 GiB.
        let map = RamMap::for_mem_size((3 << 30) + (8 << 20));
        assert_eq!(map, RamMap { low_end: 3 << 30, high: Some((4 << 30, (4 << 30) + (8 << 20))) });
        let l = WsLayout::new(&map, Some(0xbfe0_0000), 1024).unwrap();
        assert_eq!((l.page_addr(0), l.page_addr(511), l.page_addr(512)), (0xbfe0_0000, 0xbfff_f000, 4 << 30));
        assert_eq!(l.page_addr(1023), (4 << 30) + 511 * PAGE_SIZE);
        assert_eq!(l.low_pages(), 512);
        // Room: 512 pages below the hole, 2048 above.
        assert_eq!(map.pages_from(0xbfe0_0000), 2560);
        assert_eq!(
            WsLayout::new(&map, Some(0xbfe0_0000), 2561),
            Err(LayoutError::DoesNotFit { pages: 2561, room: 2560 })
        );
        // A base in high RAM stays there; one in the hole is no RAM.
        let h = WsLayout::new(&map, Some(4 << 30), 2048).unwrap();
        assert_eq!((h.page_addr(0), h.page_addr(2047), h.low_pages()), (4 << 30, (4 << 30) + 2047 * PAGE_SIZE, 0));
        assert_eq!(map.pages_from(3 << 30), 0);
        // Bases below the table or off 2 MiB are refused.
        assert_eq!(
            WsLayout::new(&map, Some(0x20_0000), 10),
            Err(LayoutError::BadBase { base: 0x20_0000, lowest: 0x40_0000 })
        );
        assert!(matches!(WsLayout::new(&map, Some(0xbfe0_1000), 10), Err(LayoutError::BadBase { .. })));
        // The default working set takes all RAM, both sides.
        let all = map.max_pages();
        let d = WsLayout::new(&map, None, all).unwrap();
        assert_eq!(d.page_addr(all - 1), (4 << 30) + (8 << 20) - PAGE_SIZE);
        assert!(WsLayout::new(&map, None, all + 1).is_err());
        // A low end off a page boundary: no page straddles it.
        let odd = RamMap { low_end: (3 << 30) - 100, high: Some((4 << 30, (4 << 30) + (8 << 20))) };
        let o = WsLayout::new(&odd, Some(0xbfe0_0000), 1024).unwrap();
        assert_eq!((o.low_pages(), o.page_addr(510), o.page_addr(511)), (511, 0xbfff_e000, 4 << 30));
        // Without high RAM nothing moves.
        let small = RamMap::for_mem_size(64 << 20);
        assert_eq!(small.high, None);
        assert_eq!(small.max_pages(), max_pages(64 << 20));
        let s = WsLayout::new(&small, None, 100).unwrap();
        assert_eq!(s.page_addr(99), ws_base_for(100) + 99 * PAGE_SIZE);
    }

    #[test]
    fn stride_pattern() {
        let v: Vec<u64> = stride_pages(200, 64, 63, 2).collect();
        assert_eq!(v, vec![63, 64, 127, 128, 191, 192]);
        let v: Vec<u64> = stride_pages(10, 4, 0, 1).collect();
        assert_eq!(v, vec![0, 4, 8]);
        let v: Vec<u64> = stride_pages(5, 1, 3, 5).collect();
        assert_eq!(v, vec![3, 4, 4]);
    }

    #[test]
    fn stamps_check() {
        let h = stamp_words(0x400, 3);
        assert_eq!(check_page(0x400, 3, h, h[2]), PageCheck::Ok);
        assert_eq!(check_page(0x400, 4, h, h[2]), PageCheck::WrongGeneration { found: 3 });
        assert_eq!(check_page(0x401, 3, h, h[2]), PageCheck::Corrupt);
        assert_eq!(check_page(0x400, 3, h, 0), PageCheck::Corrupt);
        assert_eq!(check_page(0x400, 0, [0; 4], 0), PageCheck::Ok);
        let hdr = StateHeader { ws_base: 0x400000, pages: 10, writes: 5 };
        assert_eq!(StateHeader::from_words(hdr.to_words()), Some(hdr));
        let mut w = hdr.to_words();
        w[2] = 11;
        assert_eq!(StateHeader::from_words(w), None);
    }

    #[test]
    fn stride_near_u64_max_ends_the_pass() {
        assert_eq!(stride_pages(10, u64::MAX, 3, 1).collect::<Vec<_>>(), vec![3]);
        assert_eq!(stride_pages(10, 4, 8, u64::MAX).collect::<Vec<_>>(), vec![8, 9]);
        assert_eq!(stride_pages(10, u64::MAX / 2, u64::MAX / 2, 1).count(), 0);
    }
}
