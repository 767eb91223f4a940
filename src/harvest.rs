//! Harvesting: turning KVM's dirty log (bitmap, manual-protect bitmap or
//! per-vCPU ring) and the VMM's own vm-memory bitmap into [`DirtySet`]s,
//! one per registered consumer.
//!
//! Several consumers — the flusher, a snapshot chain, a migration — each
//! need "dirty since *my* last look" (QEMU's dirty memory clients); each
//! holds a [`Subscription`], which registers it and unregisters it when
//! dropped. One harvest reads the log once and appends its non-zero words
//! to one shared log; each consumer has a cursor into it and folds the
//! words past its cursor into its own set when it takes them, so a harvest
//! costs the same however many consumers there are, and a consumer that
//! looks rarely pays one pass over a batch. Consumers come and go while
//! the guest runs.
//!
//! ```text
//! harvest:  GET / ring / VMM bitmap -> log: [(slot, word, bits)...]
//! take(c):  c.set |= log[c.cursor..]; c.cursor = end; hand c.set over
//!           (c up to date before this harvest: the GET's bitmaps
//!           themselves, or a copy, then the VMM's words)
//! trim:     drop what every cursor passed; past a limit fold the log
//!           into the consumers behind
//! ```
//!
//! A sparse harvest costs little more than its ioctls only if it touches
//! little memory besides the buffer KVM just wrote: the log grows into
//! memory touched in advance (a page fault per 256 words would cost more
//! than the rest), and a consumer that takes after every harvest gets the
//! GET buffer rather than a set of its own written word by word.
//!
//! No lost write (invariant 1 in docs/architecture.md) needs *re-protect first, copy
//! second*:
//!
//! ```text
//! bitmap  KVM_GET_DIRTY_LOG       fetches and re-protects atomically   (in harvest)
//! manual  KVM_GET_DIRTY_LOG       only reads; KVM_CLEAR_DIRTY_LOG on the
//!                                 pages about to be copied re-protects  (clear_dirty_for_io)
//! ring    read entries, mark them, KVM_RESET_DIRTY_RINGS re-protects    (in harvest)
//! VMM     VmmBitmap::take_words (vm-memory marks after writing)         (in harvest)
//! ```
//!
//! [`Harvester::collect`] does harvest → take → `clear_dirty_for_io`, after
//! which the caller may copy the pages it got. In manual mode a page that a
//! consumer has not cleared stays writable and is reported again at the
//! next harvest — to every consumer: over-reporting, never a loss.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::GuestMemoryBackend;

use crate::dirty_set::{DirtySet, DirtySetError};
use crate::kvm::dirty_log::{self, DirtyCaps};
use crate::kvm::ring::DirtyRing;
use crate::kvm::Slot;
use crate::memory::GuestRam;
use crate::vmm_bitmap::VmmBitmap;

/// The full-region VMM bitmap of a guest RAM region (the trait's
/// `bitmap()` is a slice view).
fn region_bitmap(r: &vm_memory::GuestRegionMmap<VmmBitmap>) -> &VmmBitmap {
    std::ops::Deref::deref(r).bitmap()
}

/// The dirty-log mechanism asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyLogMode {
    /// The best this KVM offers (manual protect, else bitmap).
    #[default]
    Auto,
    /// `KVM_GET_DIRTY_LOG`, fetch-and-re-protect.
    Bitmap,
    /// Manual protect: read, then re-protect only what is copied.
    Manual,
    /// The per-vCPU dirty ring.
    Ring,
}

/// A dirty-log mechanism name that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a dirty-log mechanism (auto, bitmap, manual, ring)")]
pub struct UnknownMode(pub String);

impl FromStr for DirtyLogMode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, UnknownMode> {
        Ok(match s {
            "auto" => DirtyLogMode::Auto,
            "bitmap" => DirtyLogMode::Bitmap,
            "manual" => DirtyLogMode::Manual,
            "ring" => DirtyLogMode::Ring,
            _ => return Err(UnknownMode(s.into())),
        })
    }
}

/// The mechanism in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// `KVM_GET_DIRTY_LOG`.
    Bitmap,
    /// Manual protect.
    Manual,
    /// Dirty ring of this many bytes per vCPU.
    Ring {
        /// Bytes per vCPU ring.
        bytes: u32,
    },
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mechanism::Bitmap => write!(f, "bitmap (KVM_GET_DIRTY_LOG)"),
            Mechanism::Manual => write!(f, "manual (MANUAL_DIRTY_LOG_PROTECT2 + KVM_CLEAR_DIRTY_LOG)"),
            Mechanism::Ring { bytes } => write!(f, "ring ({} entries per vCPU)", bytes / 16),
        }
    }
}

/// Why harvesting could not be set up or failed.
#[derive(Debug, thiserror::Error)]
pub enum HarvestError {
    /// The requested mechanism is not offered by this KVM.
    #[error("dirty-log mechanism '{mechanism}' is not available: {why}")]
    Unsupported {
        /// What was asked for.
        mechanism: &'static str,
        /// Which capability is missing.
        why: String,
    },
    /// Enabling a capability failed.
    #[error("enabling dirty-log mechanism '{mechanism}' failed")]
    Enable {
        /// The mechanism.
        mechanism: &'static str,
        /// The ioctl error.
        #[source]
        source: std::io::Error,
    },
    /// Mapping a vCPU's ring failed.
    #[error("vCPU {vcpu}: mapping the dirty ring failed")]
    MapRing {
        /// vCPU index.
        vcpu: usize,
        /// The mmap error.
        #[source]
        source: std::io::Error,
    },
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("slot {slot}: KVM_GET_DIRTY_LOG failed")]
    GetLog {
        /// KVM slot.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: std::io::Error,
    },
    /// `KVM_CLEAR_DIRTY_LOG` failed.
    #[error("slot {slot}: KVM_CLEAR_DIRTY_LOG of {num_pages} pages from page {first_page} failed")]
    ClearLog {
        /// KVM slot.
        slot: u32,
        /// First page.
        first_page: u64,
        /// Pages.
        num_pages: u32,
        /// The ioctl error.
        #[source]
        source: std::io::Error,
    },
    /// `KVM_RESET_DIRTY_RINGS` failed.
    #[error("KVM_RESET_DIRTY_RINGS failed")]
    ResetRings(#[source] std::io::Error),
    /// A ring entry named a slot we do not have.
    #[error("dirty ring entry for unknown slot {slot:#x}, page {offset}")]
    UnknownRingSlot {
        /// Slot field of the entry.
        slot: u32,
        /// Page offset.
        offset: u64,
    },
    /// Bitmap shape mismatch.
    #[error(transparent)]
    Set(#[from] DirtySetError),
    /// A subscription used with a harvester it is not on.
    #[error("this dirty-log subscription is not on this harvester")]
    NotSubscribed,
}

/// Chooses the mechanism for `mode` given `caps`, and enables it on `vm`.
/// Call before registering slots and before creating vCPUs (the ring must
/// exist before any vCPU does). `ring_bytes` sizes a requested ring.
pub fn prepare(vm: &VmFd, caps: DirtyCaps, mode: DirtyLogMode, ring_bytes: u32) -> Result<Mechanism, HarvestError> {
    let m = choose(caps, mode, ring_bytes)?;
    match m {
        Mechanism::Bitmap => {}
        Mechanism::Manual => dirty_log::enable_manual_protect(vm, false)
            .map_err(|source| HarvestError::Enable { mechanism: "manual", source })?,
        Mechanism::Ring { bytes } => dirty_log::enable_ring(vm, bytes, caps.ring_acq_rel)
            .map_err(|source| HarvestError::Enable { mechanism: "ring", source })?,
    }
    Ok(m)
}

/// The mechanism `mode` resolves to under `caps` (no side effects).
pub fn choose(caps: DirtyCaps, mode: DirtyLogMode, ring_bytes: u32) -> Result<Mechanism, HarvestError> {
    match mode {
        DirtyLogMode::Bitmap => Ok(Mechanism::Bitmap),
        DirtyLogMode::Auto if caps.manual_protect & 1 != 0 => Ok(Mechanism::Manual),
        DirtyLogMode::Auto => Ok(Mechanism::Bitmap),
        DirtyLogMode::Manual if caps.manual_protect & 1 != 0 => Ok(Mechanism::Manual),
        DirtyLogMode::Manual => Err(HarvestError::Unsupported {
            mechanism: "manual",
            why: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is 0 on this host".into(),
        }),
        DirtyLogMode::Ring if caps.ring_max_bytes == 0 => {
            Err(HarvestError::Unsupported { mechanism: "ring", why: "KVM_CAP_DIRTY_LOG_RING is 0 on this host".into() })
        }
        DirtyLogMode::Ring
            if !ring_bytes.is_power_of_two() || ring_bytes < 4096 || ring_bytes > caps.ring_max_bytes =>
        {
            Err(HarvestError::Unsupported {
                mechanism: "ring",
                why: format!(
                    "a ring of {ring_bytes} bytes ({} entries) is not a power of two between 4096 and {} bytes",
                    ring_bytes / 16,
                    caps.ring_max_bytes
                ),
            })
        }
        DirtyLogMode::Ring => Ok(Mechanism::Ring { bytes: ring_bytes }),
    }
}

/// Maps every vCPU's ring (ring mechanism only; else an empty list).
pub fn map_rings(mechanism: Mechanism, vcpus: &[VcpuFd], page_size: u64) -> Result<Vec<DirtyRing>, HarvestError> {
    let Mechanism::Ring { bytes } = mechanism else { return Ok(Vec::new()) };
    vcpus
        .iter()
        .enumerate()
        .map(|(i, v)| DirtyRing::map(v, bytes, page_size).map_err(|source| HarvestError::MapRing { vcpu: i, source }))
        .collect()
}

/// A registered consumer of the dirty log (the key a [`Subscription`]
/// holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConsumerId(u64);

/// One consumer of the dirty log — the flusher, a snapshot chain, a
/// migration, a dirty-rate window, the heatmap: registered on the
/// [`Harvester`] when made, unregistered when dropped, whichever way its
/// user ends. It sees "dirty since my last look": every page a harvest
/// reports after it was made, until it takes them.
///
/// Each call locks the harvester; to do several things under one lock
/// (harvest for every consumer, then take two of them), lock it with
/// [`Subscription::lock`] and pass the subscription to the `Harvester`'s
/// methods. Never drop a subscription while holding that lock: its drop
/// takes it.
#[derive(Debug)]
pub struct Subscription {
    harvester: Arc<Mutex<Harvester>>,
    id: ConsumerId,
}

impl Subscription {
    /// Subscribes to `harvester`: the pages of its next harvest on (the
    /// log may still hold pages written before now).
    pub fn new(harvester: &Arc<Mutex<Harvester>>) -> Self {
        let id = lock(harvester).add_consumer();
        Subscription { harvester: harvester.clone(), id }
    }

    /// Subscribes from a clean start: everything dirty before now is
    /// harvested (for the others) and re-protected first, so this one sees
    /// exactly the pages written from now on — a copy made after this call
    /// holds what was dirty before.
    pub fn from_now(harvester: &Arc<Mutex<Harvester>>) -> Result<Self, HarvestError> {
        let mut h = lock(harvester);
        h.reprotect_all()?;
        let id = h.add_consumer();
        drop(h);
        Ok(Subscription { harvester: harvester.clone(), id })
    }

    /// The harvester, locked (a poisoned lock is taken over: the harvester
    /// holds no invariant a panic elsewhere can break halfway).
    pub fn lock(&self) -> MutexGuard<'_, Harvester> {
        lock(&self.harvester)
    }

    /// The harvester this subscription is on.
    pub fn harvester(&self) -> &Arc<Mutex<Harvester>> {
        &self.harvester
    }

    /// Harvest, take and re-protect ([`Harvester::collect`]): the caller
    /// may copy exactly these pages without losing a concurrent write.
    pub fn collect(&self) -> Result<DirtySet, HarvestError> {
        self.lock().collect(self)
    }

    /// Harvest and take, not re-protected: the caller re-protects what it
    /// copies with [`Subscription::clear_dirty_for_io`].
    pub fn fetch(&self) -> Result<DirtySet, HarvestError> {
        let mut h = self.lock();
        h.harvest()?;
        h.take(self)
    }

    /// Re-protects the pages of `set`, taken from this subscription, before
    /// they are copied ([`Harvester::clear_dirty_for_io`]).
    pub fn clear_dirty_for_io(&self, set: &DirtySet) -> Result<(), HarvestError> {
        self.lock().clear_dirty_for_io(Some(self), set)
    }

    /// Hands a taken set back, so a later take needs no allocation.
    pub fn recycle(&self, set: DirtySet) {
        self.lock().recycle(set);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let id = self.id;
        lock(&self.harvester).remove_consumer(id);
    }
}

fn lock(h: &Mutex<Harvester>) -> MutexGuard<'_, Harvester> {
    h.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counters like `/proc/vmstat`'s, for the harvest side.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HarvestStats {
    /// Harvests done.
    pub harvests: u64,
    /// Pages reported by KVM (guest writes), summed over harvests.
    pub guest_pages: u64,
    /// Pages reported by the VMM bitmap, summed over harvests.
    pub vmm_pages: u64,
    /// Time spent harvesting.
    pub harvest_time: Duration,
    /// Ring-full exits handled.
    pub ring_full_exits: u64,
    /// `KVM_CLEAR_DIRTY_LOG` calls made.
    pub clear_calls: u64,
}

/// One word of the shared log.
type LogWord = crate::dirty_set::LogWord;

/// Words the shared log holds before it is folded into every consumer
/// that has not taken them (1 MiB): a consumer that takes rarely (the run's
/// summary, a snapshot chain) costs one pass over a batch, not a scattered
/// write into its bitmap at every harvest.
const LOG_LIMIT: usize = 1 << 16;

/// One slot's bitmap from the last `KVM_GET_DIRTY_LOG` (see
/// `Harvester::last_get`). Only the words of `first..end` hold bits; the
/// others are stale and never read, so forgetting every bit is O(1).
#[derive(Debug, Default)]
struct LastGet {
    words: Vec<u64>,
    /// First word that may hold a bit.
    first: usize,
    /// One past the last word that may hold a bit (`first >= end`: none).
    end: usize,
}

impl LastGet {
    fn bounds(&self) -> std::ops::Range<usize> {
        self.first.min(self.end)..self.end
    }

    fn forget(&mut self) {
        (self.first, self.end) = (0, 0);
    }
}

/// The log positions of one harvest's KVM words (`start..vmm_start`; the
/// VMM's words follow) while `Harvester::last_get` still holds exactly
/// those words as bitmaps. A consumer whose cursor is at `start` and whose
/// set is empty gets those bitmaps themselves (or a sequential copy)
/// instead of OR-ing the words one by one into a set whose memory nothing
/// has touched since its last take: at 1/512 dirty that is one cache miss
/// per word, about as long as the rest of the harvest.
#[derive(Debug, Clone, Copy)]
struct FreshGet {
    start: u64,
    vmm_start: u64,
}

impl FreshGet {
    /// Whether `c` has taken everything before this harvest and holds
    /// nothing pending.
    fn is_next_for(&self, c: &Consumer) -> bool {
        c.cursor == self.start && c.set.slots().iter().all(|s| s.bounds().is_empty())
    }
}

/// A consumer's place in the log.
#[derive(Debug)]
struct Consumer {
    id: ConsumerId,
    /// What it has not taken yet from log words before `cursor`.
    set: DirtySet,
    /// Absolute log position its `set` is up to.
    cursor: u64,
}

/// The dirty log of one VM and its consumers.
///
/// A harvest appends the non-zero words it read to one shared log; each
/// consumer keeps a cursor into it and folds the words past its cursor into
/// its own set only when it takes them. The log is trimmed to the slowest
/// cursor, and folded into every lagging consumer once it grows past
/// `LOG_LIMIT`.
#[derive(Debug)]
pub struct Harvester {
    vm: Arc<VmFd>,
    mechanism: Mechanism,
    slots: Vec<Slot>,
    ram: GuestRam,
    page_size: u64,
    rings: Vec<DirtyRing>,
    consumers: Vec<Consumer>,
    next_id: u64,
    /// The shared log: harvested words some consumer has not taken.
    log: Vec<LogWord>,
    /// Absolute position of `log[0]`.
    log_base: u64,
    /// Reused buffer for `KVM_GET_DIRTY_LOG`.
    buf: Vec<u64>,
    /// Ring mode: this harvest's entries per slot as words, and which
    /// words they touched.
    ring_words: Vec<Vec<u64>>,
    ring_touched: Vec<Vec<u32>>,
    /// Emptied sets handed back with [`Harvester::recycle`].
    spares: Vec<DirtySet>,
    stats: HarvestStats,
    /// Ring mode: ring entries harvested per vCPU so far (which vCPU
    /// dirtied how much: the dirty log's per-vCPU view).
    vcpu_pages: Vec<u64>,
    /// Each slot's bitmap as the last `KVM_GET_DIRTY_LOG` returned it. In
    /// manual mode less the pages re-protected since — the pages KVM
    /// reported that nobody has re-protected yet. KVM reports them at every
    /// harvest; only the first report counts as newly dirtied in the stats
    /// (consumers still get every report). A clear re-protects only pages
    /// set here, i.e. pages every consumer has been told of (see
    /// `clear_harvested`).
    last_get: Vec<LastGet>,
    /// Where the last harvest's KVM words are in the log, while `last_get`
    /// still holds exactly them.
    fresh: Option<FreshGet>,
    /// Reused buffer for the mask a clear hands to KVM.
    clear_mask: Vec<u64>,
    /// Words of all slots together: the most one source (KVM, the VMM)
    /// can add to the log in one harvest.
    slot_words: usize,
}

impl Harvester {
    /// A harvester over `slots` (registered from `ram`'s regions, in order).
    pub fn new(
        vm: Arc<VmFd>,
        mechanism: Mechanism,
        slots: Vec<Slot>,
        ram: GuestRam,
        rings: Vec<DirtyRing>,
        page_size: u64,
    ) -> Self {
        let vcpu_pages = vec![0; rings.len()];
        let last_get = slots.iter().map(|_| LastGet::default()).collect();
        let words = |s: &Slot| s.size.div_ceil(page_size).div_ceil(64) as usize;
        let ring_words = match mechanism {
            Mechanism::Ring { .. } => slots.iter().map(|s| vec![0; words(s)]).collect(),
            _ => Vec::new(),
        };
        let ring_touched = vec![Vec::new(); ring_words.len()];
        let slot_words = slots.iter().map(words).sum();
        Harvester {
            vm,
            mechanism,
            slots,
            ram,
            page_size,
            rings,
            consumers: Vec::new(),
            next_id: 0,
            log: Vec::new(),
            log_base: 0,
            buf: Vec::new(),
            ring_words,
            ring_touched,
            spares: Vec::new(),
            vcpu_pages,
            last_get,
            fresh: None,
            clear_mask: Vec::new(),
            slot_words,
            stats: HarvestStats::default(),
        }
    }

    /// Ring mode: pages each vCPU dirtied so far (cumulative, as of the
    /// last harvest); empty for the bitmap mechanisms, which cannot tell.
    pub fn vcpu_dirty_pages(&self) -> &[u64] {
        &self.vcpu_pages
    }

    /// The mechanism in use.
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// The slots.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Counters so far.
    pub fn stats(&self) -> HarvestStats {
        self.stats
    }

    fn log_end(&self) -> u64 {
        self.log_base + self.log.len() as u64
    }

    /// Registers a consumer; it sees pages dirtied from its first harvest on.
    fn add_consumer(&mut self) -> ConsumerId {
        let id = ConsumerId(self.next_id);
        self.next_id += 1;
        let cursor = self.log_end();
        self.consumers.push(Consumer { id, set: DirtySet::new(&self.slots, self.page_size), cursor });
        id
    }

    /// Unregisters a consumer (its pending set is dropped).
    fn remove_consumer(&mut self, id: ConsumerId) -> bool {
        let before = self.consumers.len();
        self.consumers.retain(|c| c.id != id);
        // Its share of the log goes at the next trim.
        self.consumers.len() != before
    }

    /// Reads the whole log once and appends it to the shared log for every
    /// consumer. Returns the pages this harvest reported (guest + VMM; a
    /// page both wrote is counted twice).
    pub fn harvest(&mut self) -> Result<u64, HarvestError> {
        self.harvest_with(None)
    }

    /// [`harvest`](Self::harvest), except that `owner`'s consumer does not
    /// get the pages of `mask` (it is about to clear and copy them itself).
    fn harvest_with(&mut self, owner: Option<(ConsumerId, &DirtySet)>) -> Result<u64, HarvestError> {
        let t0 = Instant::now();
        let start = self.log_end();
        self.reserve_log();
        self.fresh = None;
        let guest = match self.mechanism {
            Mechanism::Bitmap | Mechanism::Manual => {
                let guest = self.log_bitmaps()?;
                self.fresh = Some(FreshGet { start, vmm_start: self.log_end() });
                guest
            }
            Mechanism::Ring { .. } => self.log_rings()?,
        };
        let vmm = self.log_vmm();
        if let Some((id, mask)) = owner {
            let base = self.log_base;
            if let Some(c) = self.consumers.iter_mut().find(|c| c.id == id) {
                let (old, new) = self.log[(c.cursor - base) as usize..].split_at((start - c.cursor) as usize);
                c.set.or_log(old, None)?;
                c.set.or_log(new, Some(mask))?;
                c.cursor = start + new.len() as u64;
            }
        }
        self.trim_log()?;
        self.stats.harvests += 1;
        self.stats.guest_pages += guest;
        self.stats.vmm_pages += vmm;
        self.stats.harvest_time += t0.elapsed();
        Ok(guest + vmm)
    }

    /// Makes room in the log for one more harvest's worst case (every word
    /// of every slot, from KVM and again from the VMM) before it starts,
    /// touching the new memory in one go: appending into memory never
    /// touched costs a page fault every 256 words, more than the rest of a
    /// sparse harvest.
    fn reserve_log(&mut self) {
        let need = 2 * self.slot_words;
        let len = self.log.len();
        if self.log.capacity() - len >= need {
            return;
        }
        let cap = (self.log.capacity() * 2).min(LOG_LIMIT + need).max(len + need);
        self.log.reserve_exact(cap - len);
        self.log.resize(self.log.capacity(), (0, 0, 0));
        self.log.truncate(len);
    }

    /// Bitmap and manual mode: `KVM_GET_DIRTY_LOG` of every slot into the
    /// log. Returns the pages newly reported.
    fn log_bitmaps(&mut self) -> Result<u64, HarvestError> {
        let manual = self.mechanism == Mechanism::Manual;
        let mut guest = 0u64;
        for (i, s) in self.slots.iter().enumerate() {
            dirty_log::get_dirty_log_into(&self.vm, s, self.page_size, &mut self.buf)
                .map_err(|source| HarvestError::GetLog { slot: s.slot, source })?;
            let Some(last) = self.last_get.get_mut(i) else { continue };
            // Manual mode reports a page at every GET until it is cleared:
            // only a page not reported before counts as new.
            let (lo, seen) = match manual {
                true => (last.first, &last.words[last.bounds()]),
                false => (0, &[][..]),
            };
            let (mut first, mut end) = (self.buf.len(), 0);
            for (j, &w) in self.buf.iter().enumerate() {
                if w != 0 {
                    self.log.push((i as u32, j as u32, w));
                    let old = j.checked_sub(lo).and_then(|k| seen.get(k)).copied().unwrap_or(0);
                    guest += u64::from((w & !old).count_ones());
                    first = first.min(j);
                    end = j + 1;
                }
            }
            // Keep this GET's bitmap (a swap, not a copy: the next slot's
            // GET resizes the buffer).
            std::mem::swap(&mut last.words, &mut self.buf);
            (last.first, last.end) = (first, end);
        }
        Ok(guest)
    }

    /// Ring mode: every vCPU's ring entries into the log, then re-protect.
    /// Returns the distinct pages reported.
    fn log_rings(&mut self) -> Result<u64, HarvestError> {
        let mut bad = None;
        let (slots, words, touched) = (&self.slots, &mut self.ring_words, &mut self.ring_touched);
        for (v, r) in self.rings.iter_mut().enumerate() {
            let n = r.harvest(|slot, offset| {
                let id = slot & 0xffff;
                let i = if slot >> 16 == 0 { slots.iter().position(|s| s.slot == id) } else { None };
                let w = (offset / 64) as usize;
                match i.and_then(|i| words[i].get_mut(w).map(|x| (i, x))) {
                    Some((i, x)) => {
                        if *x == 0 {
                            touched[i].push(w as u32);
                        }
                        *x |= 1 << (offset % 64);
                    }
                    None => {
                        bad.get_or_insert(HarvestError::UnknownRingSlot { slot, offset });
                    }
                }
            });
            if let Some(c) = self.vcpu_pages.get_mut(v) {
                *c += u64::from(n);
            }
        }
        // Re-protect before anyone reads the harvested pages.
        dirty_log::reset_dirty_rings(&self.vm).map_err(HarvestError::ResetRings)?;
        let mut guest = 0u64;
        for (i, (words, touched)) in self.ring_words.iter_mut().zip(&mut self.ring_touched).enumerate() {
            touched.sort_unstable();
            for &w in touched.iter() {
                let bits = std::mem::take(&mut words[w as usize]);
                guest += u64::from(bits.count_ones());
                self.log.push((i as u32, w, bits));
            }
            touched.clear();
        }
        match bad {
            Some(e) => Err(e),
            None => Ok(guest),
        }
    }

    /// The VMM's own writes into the log. Returns the pages.
    fn log_vmm(&mut self) -> u64 {
        let mut vmm = 0u64;
        for (i, region) in self.ram.iter().enumerate() {
            if let Some(words) = region_bitmap(region).take_words() {
                for (j, &w) in words.iter().enumerate().filter(|(_, &w)| w != 0) {
                    self.log.push((i as u32, j as u32, w));
                    vmm += u64::from(w.count_ones());
                }
            }
        }
        vmm
    }

    /// Drops the log words every consumer has taken (all of them at once,
    /// or a prefix once it is most of the log: amortised); past
    /// `LOG_LIMIT`, first folds the log into the consumers behind.
    fn trim_log(&mut self) -> Result<(), HarvestError> {
        let end = self.log_end();
        if self.log.len() > LOG_LIMIT {
            for c in &mut self.consumers {
                c.set.or_log(&self.log[(c.cursor - self.log_base) as usize..], None)?;
                c.cursor = end;
            }
        }
        let slowest = self.consumers.iter().map(|c| c.cursor).min().unwrap_or(end);
        let done = (slowest - self.log_base) as usize;
        if done == self.log.len() {
            self.log.clear();
            self.log_base = end;
        } else if done > self.log.len() / 2 {
            self.log.drain(..done);
            self.log_base = slowest;
        }
        Ok(())
    }

    /// The pages dirtied since `sub` last took its set (as of the last
    /// harvest); its set starts empty again.
    pub fn take(&mut self, sub: &Subscription) -> Result<DirtySet, HarvestError> {
        // Bitmap mode keeps the last GET only to hand it over.
        self.take_from(sub, self.mechanism == Mechanism::Bitmap)
    }

    /// [`take`](Self::take). With `hand_over`, a consumer up to date
    /// before the last harvest gets the GET's bitmaps themselves rather
    /// than a copy (no page of its set needs touching); `last_get` then
    /// forgets them, so only a caller that needs them no more (bitmap mode,
    /// or manual mode once they are re-protected) may ask.
    fn take_from(&mut self, sub: &Subscription, hand_over: bool) -> Result<DirtySet, HarvestError> {
        let end = self.log_end();
        let Some(c) = self.consumers.iter_mut().find(|c| c.id == sub.id) else {
            return Err(HarvestError::NotSubscribed);
        };
        // Up to date before the last harvest and nothing pending: its set
        // is that GET's bitmaps, copied whole, plus the VMM's words.
        let fresh = self.fresh.filter(|f| f.is_next_for(c));
        let mut out = match (fresh, self.spares.pop()) {
            (Some(_), Some(s)) => s,
            (Some(_), None) => DirtySet::new(&self.slots, self.page_size),
            (None, Some(mut s)) => {
                c.set.take_into(&mut s);
                s
            }
            (None, None) => c.set.take(),
        };
        let from = match fresh {
            Some(f) => {
                for (i, last) in self.last_get.iter_mut().enumerate() {
                    let b = last.bounds();
                    if hand_over {
                        out.swap_words(i, &mut last.words, b)?;
                        last.forget();
                    } else {
                        out.assign_words(i, b.start, &last.words[b])?;
                    }
                }
                if hand_over {
                    self.fresh = None;
                }
                f.vmm_start
            }
            None => c.cursor,
        };
        out.or_log(&self.log[(from - self.log_base) as usize..], None)?;
        c.cursor = end;
        self.trim_log()?;
        Ok(out)
    }

    /// Whether `sub` is up to date before the last harvest, with nothing
    /// pending, while `last_get` holds that harvest's bitmaps.
    fn is_fresh_for(&self, sub: &Subscription) -> bool {
        self.fresh.is_some_and(|f| self.consumers.iter().any(|c| c.id == sub.id && f.is_next_for(c)))
    }

    /// Hands back a set the caller is done with, so the next `take` needs no
    /// allocation.
    pub fn recycle(&mut self, mut set: DirtySet) {
        if set.slots().len() == self.slots.len() && self.spares.len() < 4 {
            set.clear();
            self.spares.push(set);
        }
    }

    /// `clear_page_dirty_for_io` for a set about to be copied: re-protects
    /// exactly its pages (manual mode: `KVM_CLEAR_DIRTY_LOG` over the 64-page
    /// chunks that hold them, with the set's own bits as the mask). In bitmap
    /// and ring mode the harvest already re-protected them.
    ///
    /// In manual mode a page of `set` may have been written since the last
    /// harvest; clearing its log bit would hide that write from every other
    /// consumer. So the log is harvested first, under the same lock, and
    /// only then cleared. `owner` (the consumer the set came from) does not
    /// get the set's own pages back: it copies them after this call.
    pub fn clear_dirty_for_io(&mut self, owner: Option<&Subscription>, set: &DirtySet) -> Result<(), HarvestError> {
        if self.mechanism != Mechanism::Manual {
            return Ok(());
        }
        self.harvest_with(owner.map(|o| (o.id, set)))?;
        self.clear_harvested(set)
    }

    /// KVM_CLEAR_DIRTY_LOG for `set`, which the caller took from a harvest
    /// made under the same `&mut self` borrow (no write can be missed).
    fn clear_harvested(&mut self, set: &DirtySet) -> Result<(), HarvestError> {
        if self.mechanism != Mechanism::Manual {
            return Ok(());
        }
        // Only pages whose bit the last GET (made under this same borrow)
        // saw set and nobody cleared since: every consumer was told of
        // those. A page of `set` whose bit was clear then is already
        // protected (someone cleared it, or it was never written); if the
        // guest writes it between that GET and this CLEAR, the new bit must
        // survive for the others to see — a CLEAR of it here would hide
        // that write from every consumer.
        self.fresh = None;
        for (i, bm) in set.slots().iter().enumerate() {
            let (Some(last), Some(s)) = (self.last_get.get_mut(i), self.slots.get(i)) else { continue };
            let (b, seen) = (bm.bounds(), last.bounds());
            if b.start.max(seen.start) >= b.end.min(seen.end) {
                continue;
            }
            let words = bm.words();
            let (Some(ws), Some(ss)) = (words.get(seen.clone()), last.words.get(seen.clone())) else { continue };
            let made = if b.start <= seen.start
                && seen.end <= b.end
                && ws.iter().zip(ss).fold(0, |acc, (&w, &s)| acc | (s & !w)) == 0
            {
                // Every page still unprotected is in `set` (the usual case:
                // the set is what this very GET reported): the mask is the
                // bitmap itself, and afterwards nothing is left unprotected.
                let made = clear_words(&self.vm, s, self.page_size, seen.start, ss);
                last.forget();
                made?
            } else {
                let r = b.start.max(seen.start)..b.end.min(seen.end);
                let mask = &mut self.clear_mask;
                mask.clear();
                mask.resize(r.len(), 0);
                for ((m, &w), seen) in mask.iter_mut().zip(&words[r.clone()]).zip(&mut last.words[r.clone()]) {
                    *m = w & *seen;
                    *seen &= !w;
                }
                clear_words(&self.vm, s, self.page_size, r.start, mask)?
            };
            self.stats.clear_calls += u64::from(made);
        }
        Ok(())
    }

    /// Harvests, then re-protects every page KVM has reported that nobody
    /// re-protected since (manual mode keeps those writable, so they would
    /// be reported again whether written or not). Afterwards each consumer
    /// learns of exactly the pages written from now on. For a point in time
    /// such as a snapshot, with the vCPUs paused.
    pub fn reprotect_all(&mut self) -> Result<(), HarvestError> {
        self.harvest()?;
        if self.mechanism == Mechanism::Manual {
            self.clear_seen()?;
            // Nothing reported is left unprotected.
            self.last_get.iter_mut().for_each(LastGet::forget);
            self.fresh = None;
        }
        Ok(())
    }

    /// Manual mode: `KVM_CLEAR_DIRTY_LOG` of every page of `last_get`,
    /// which keeps them (for a hand-over); the caller forgets them after.
    /// On failure they are forgotten at once: a page wrongly thought
    /// unprotected could have a later write cleared away, while one
    /// wrongly thought protected is only reported again.
    fn clear_seen(&mut self) -> Result<(), HarvestError> {
        for (last, s) in self.last_get.iter().zip(&self.slots) {
            let b = last.bounds();
            match clear_words(&self.vm, s, self.page_size, b.start, &last.words[b]) {
                Ok(made) => self.stats.clear_calls += u64::from(made),
                Err(e) => {
                    self.last_get.iter_mut().for_each(LastGet::forget);
                    self.fresh = None;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Harvest, take `sub`'s set and re-protect it: afterwards the caller
    /// may copy exactly these pages without losing a concurrent write.
    pub fn collect(&mut self, sub: &Subscription) -> Result<DirtySet, HarvestError> {
        self.harvest()?;
        if self.mechanism == Mechanism::Manual && self.is_fresh_for(sub) {
            // Its set is this GET's bitmaps plus the VMM's words: it holds
            // every page KVM reported and nobody re-protected, so the
            // clear below would re-protect exactly those. Re-protect them
            // first, then hand the bitmaps over whole.
            self.clear_seen()?;
            let set = self.take_from(sub, true)?;
            return Ok(set);
        }
        let set = self.take(sub)?;
        self.clear_harvested(&set)?;
        Ok(set)
    }

    /// Benchmark baseline: the bare KVM ioctls of one harvest — fetch and
    /// re-protect, with no set building, no VMM bitmap, no consumers.
    /// The pages it reads are handed to nobody: every consumer loses them,
    /// so use it only to measure. Returns the pages KVM reported.
    pub fn discard_log_for_benchmark(&mut self) -> Result<u64, HarvestError> {
        let mut n = 0u64;
        match self.mechanism {
            Mechanism::Bitmap | Mechanism::Manual => {
                for s in &self.slots {
                    dirty_log::get_dirty_log_into(&self.vm, s, self.page_size, &mut self.buf)
                        .map_err(|source| HarvestError::GetLog { slot: s.slot, source })?;
                    n += self.buf.iter().map(|x| u64::from(x.count_ones())).sum::<u64>();
                    if self.mechanism == Mechanism::Manual {
                        let pages = (s.size / self.page_size) as u32;
                        dirty_log::clear_dirty_log(&self.vm, s, 0, pages, &self.buf).map_err(|source| {
                            HarvestError::ClearLog { slot: s.slot, first_page: 0, num_pages: pages, source }
                        })?;
                    }
                }
            }
            Mechanism::Ring { .. } => {
                for r in &mut self.rings {
                    n += u64::from(r.harvest(|_, _| {}));
                }
                dirty_log::reset_dirty_rings(&self.vm).map_err(HarvestError::ResetRings)?;
            }
        }
        Ok(n)
    }

    /// A vCPU's ring filled (`KVM_EXIT_DIRTY_RING_FULL`): harvest so it can
    /// go on.
    pub fn on_ring_full(&mut self) -> Result<(), HarvestError> {
        self.stats.ring_full_exits += 1;
        self.harvest().map(|_| ())
    }
}

/// `KVM_CLEAR_DIRTY_LOG` of the bits of `mask` (words of slot `s` from
/// word `first`), over the 64-page chunks from its first to its last
/// non-zero word. Returns whether there was anything to clear.
fn clear_words(vm: &VmFd, s: &Slot, page_size: u64, first: usize, mask: &[u64]) -> Result<bool, HarvestError> {
    let (Some(lo), Some(hi)) = (mask.iter().position(|&w| w != 0), mask.iter().rposition(|&w| w != 0)) else {
        return Ok(false);
    };
    let slot_pages = s.size / page_size;
    let first_page = (first + lo) as u64 * 64;
    let num_pages = (((first + hi) as u64 + 1) * 64).min(slot_pages).saturating_sub(first_page) as u32;
    dirty_log::clear_dirty_log(vm, s, first_page, num_pages, &mask[lo..=hi])
        .map_err(|source| HarvestError::ClearLog { slot: s.slot, first_page, num_pages, source })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::memory::{host_page_size, BackingFile};

    #[test]
    fn unsupported_mechanisms_are_clear_errors() {
        let none = DirtyCaps::default();
        let e = choose(none, DirtyLogMode::Ring, 65536).unwrap_err();
        assert_eq!(
            e.to_string(),
            "dirty-log mechanism 'ring' is not available: KVM_CAP_DIRTY_LOG_RING is 0 on this host"
        );
        let e = choose(none, DirtyLogMode::Manual, 0).unwrap_err();
        assert!(e.to_string().contains("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is 0"), "{e}");
        assert_eq!(choose(none, DirtyLogMode::Auto, 0).unwrap(), Mechanism::Bitmap);
        let caps = DirtyCaps { manual_protect: 3, ring_max_bytes: 1 << 20, ring_acq_rel: true };
        assert_eq!(choose(caps, DirtyLogMode::Auto, 0).unwrap(), Mechanism::Manual);
        assert!(choose(caps, DirtyLogMode::Ring, 3000).is_err());
        assert!(choose(caps, DirtyLogMode::Ring, 2 << 20).is_err());
        assert_eq!(choose(caps, DirtyLogMode::Ring, 4096).unwrap(), Mechanism::Ring { bytes: 4096 });
        assert_eq!("ring".parse::<DirtyLogMode>(), Ok(DirtyLogMode::Ring));
        assert_eq!(
            "rings".parse::<DirtyLogMode>().unwrap_err().to_string(),
            "'rings' is not a dirty-log mechanism (auto, bitmap, manual, ring)"
        );
    }

    /// A VM with 1 MiB of file-backed RAM and dirty logging, no vCPU.
    fn vm_with_ram(mode: DirtyLogMode) -> (tempfile::TempDir, GuestRam, Arc<Mutex<Harvester>>) {
        assert!(std::path::Path::new("/dev/kvm").exists(), "/dev/kvm is missing: this test needs KVM");
        let kvm = crate::kvm::open(std::path::Path::new("/dev/kvm")).unwrap();
        let vm = Arc::new(crate::kvm::create_vm(&kvm).unwrap());
        let m = prepare(&vm, DirtyCaps::probe(&vm), mode, 4096).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let b = BackingFile::open_or_create(&dir.path().join("mem"), 1 << 20).unwrap();
        let ram = b.map(false).unwrap();
        let slots = crate::kvm::register_ram(&vm, &ram, true).unwrap();
        let h = Harvester::new(vm, m, slots, ram.clone(), Vec::new(), host_page_size());
        (dir, ram, Arc::new(Mutex::new(h)))
    }

    #[test]
    fn vmm_writes_reach_every_consumer_though_kvm_never_saw_them() {
        for mode in [DirtyLogMode::Bitmap, DirtyLogMode::Manual] {
            let (_dir, ram, h) = vm_with_ram(mode);
            let a = Subscription::new(&h);
            ram.write_obj(0x1234_u32, GuestAddress(0x3000)).unwrap();
            ram.write_slice(&[1u8; 8192], GuestAddress(0x8000)).unwrap();
            let b = Subscription::new(&h);
            ram.write_obj(7u8, GuestAddress(0x5000)).unwrap();
            let got_a = a.collect().unwrap();
            assert_eq!(got_a.gpas().collect::<Vec<_>>(), vec![0x3000, 0x5000, 0x8000, 0x9000], "{mode:?}");
            // b registered later but the VMM bitmap was only read at the
            // harvest, so it sees the same pages; then both start empty.
            let got_b = h.lock().unwrap().take(&b).unwrap();
            assert_eq!(got_b, got_a);
            assert!(a.collect().unwrap().is_empty());
            assert_eq!(h.lock().unwrap().consumers.len(), 2);
            drop(b);
            assert_eq!(h.lock().unwrap().consumers.len(), 1, "a dropped subscription is unregistered");
            assert_eq!(h.lock().unwrap().stats().guest_pages, 0);
            assert_eq!(h.lock().unwrap().stats().vmm_pages, 4);
            // A clean start sees nothing written before it.
            ram.write_obj(9u8, GuestAddress(0x6000)).unwrap();
            let c = Subscription::from_now(&h).unwrap();
            assert!(c.collect().unwrap().is_empty());
            assert_eq!(a.collect().unwrap().gpas().collect::<Vec<_>>(), vec![0x6000]);
        }
    }

    #[test]
    fn a_lagging_consumer_gets_every_page_once_the_log_is_folded() {
        let (_dir, ram, h) = vm_with_ram(DirtyLogMode::Manual);
        let (fast, slow) = (Subscription::new(&h), Subscription::new(&h));
        // Enough harvests of 4 VMM-written pages (one per log word) that
        // the log passes its limit while `slow` never looks.
        let rounds = LOG_LIMIT / 4 + 100;
        for r in 0..rounds {
            for p in 0..4u64 {
                ram.write_obj(r as u8, GuestAddress((p * 64 + r as u64 % 64) * 0x1000)).unwrap();
            }
            let got = fast.collect().unwrap();
            assert_eq!(got.count(), 4, "round {r}");
            fast.recycle(got);
            assert!(h.lock().unwrap().log.len() <= LOG_LIMIT + 4, "the log is bounded");
        }
        let all = h.lock().unwrap().take(&slow).unwrap();
        assert_eq!(all.count(), 256, "every page written reached the consumer that never looked");
        // A set being cleared for its owner does not come back to it; the
        // other consumer still sees the pages.
        ram.write_obj(1u8, GuestAddress(0x7000)).unwrap();
        let set = fast.fetch().unwrap();
        ram.write_obj(1u8, GuestAddress(0x7000)).unwrap();
        fast.clear_dirty_for_io(&set).unwrap();
        assert!(fast.collect().unwrap().is_empty());
        assert_eq!(slow.collect().unwrap().gpas().collect::<Vec<_>>(), vec![0x7000]);
    }
}
