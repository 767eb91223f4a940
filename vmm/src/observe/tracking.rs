//! Dirty logging inside a run: the harvester's consumers the VMM offers —
//! a run-long summary, a shadow image kept in step at every tick (the
//! no-lost-write check), a dump of every page dirtied, periodic stats —
//! and the final harvest once the vCPUs have stopped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smudge::dirty_set::DirtySet;
use smudge::harvest::{HarvestError, HarvestStats, Harvester, Mechanism, Subscription};
use smudge::memory::GuestRam;
use smudge::sink::{ImageFile, Sink, SinkError};

/// What the user asked the run to do with the dirty log.
#[derive(Debug, Clone, Default)]
pub struct DirtyOptions {
    /// Keep this image file equal to guest memory, copying harvested pages
    /// at every tick.
    pub shadow: Option<PathBuf>,
    /// Write every page dirtied during the run (as extents) here at the end.
    pub dump: Option<PathBuf>,
    /// Print dirty-rate and harvest-cost lines this often.
    pub stats_interval: Option<Duration>,
    /// Test hook (`--test-hold-harvests N`): every N ticks the periodic
    /// harvest is held until a vCPU's dirty ring fills (ring mode), so the
    /// ring-full path is taken because the harvester waits, whatever the
    /// guest's speed.
    pub hold_harvests_every: Option<u64>,
}

impl DirtyOptions {
    /// Whether anything needs a harvest at every tick.
    pub fn periodic(&self) -> bool {
        self.shadow.is_some() || self.dump.is_some()
    }
}

/// Why dirty tracking failed during a run.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// Harvesting failed.
    #[error(transparent)]
    Harvest(#[from] HarvestError),
    /// The shadow image could not be written.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The dump file could not be written.
    #[error("{path}: cannot write the dirty-page dump")]
    Dump {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What the run's dirty log amounted to.
#[derive(Debug, Clone)]
pub struct DirtySummary {
    /// The mechanism.
    pub mechanism: Mechanism,
    /// Distinct pages dirtied over the run (guest and VMM).
    pub pages: u64,
    /// Harvest counters.
    pub stats: HarvestStats,
    /// Bytes copied into the shadow image.
    pub shadow_bytes: u64,
}

/// The run's dirty-log consumers.
#[derive(Debug)]
pub struct Tracking {
    ram: GuestRam,
    summary: Subscription,
    run_total: DirtySet,
    shadow: Option<(Subscription, ImageFile)>,
    shadow_bytes: u64,
    dump: Option<PathBuf>,
    hold_every: Option<u64>,
    ticks: u64,
    /// While held: the ring-full count the hold waits to see grow.
    held_at: Option<u64>,
}

impl Tracking {
    /// Registers the consumers `opts` asks for. `shadow_from` is the memory
    /// file the shadow starts as a copy of (`None`: it starts all zero).
    pub fn new(
        harvester: Arc<Mutex<Harvester>>,
        ram: GuestRam,
        mem_size: u64,
        opts: &DirtyOptions,
        shadow_from: Option<&Path>,
    ) -> Result<Self, TrackError> {
        let summary = Subscription::new(&harvester);
        let (ring, run_total) = {
            let h = summary.lock();
            (
                matches!(h.mechanism(), Mechanism::Ring { .. }),
                DirtySet::new(h.slots(), smudge::memory::host_page_size()),
            )
        };
        let shadow = match &opts.shadow {
            Some(p) => {
                start_shadow(p, shadow_from)?;
                Some((Subscription::new(&harvester), ImageFile::open(p, mem_size)?))
            }
            None => None,
        };
        let hold_every = opts.hold_harvests_every.filter(|_| ring);
        Ok(Tracking {
            ram,
            summary,
            run_total,
            shadow,
            shadow_bytes: 0,
            dump: opts.dump.clone(),
            hold_every,
            ticks: 0,
            held_at: None,
        })
    }

    /// One periodic tick: [`Tracking::tick`], unless the test hook holds
    /// harvests until a dirty ring fills.
    pub fn periodic_tick(&mut self) -> Result<(), TrackError> {
        if let Some(every) = self.hold_every {
            let full = self.summary.lock().stats().ring_full_exits;
            match self.held_at {
                Some(at) if full == at => return Ok(()),
                Some(_) => self.held_at = None,
                None => {}
            }
            self.ticks += 1;
            if self.ticks.is_multiple_of(every) {
                self.held_at = Some(full);
                return Ok(());
            }
        }
        self.tick()
    }

    /// One tick: harvest, bring the shadow up to date, print stats if due.
    pub fn tick(&mut self) -> Result<(), TrackError> {
        let mut h = self.summary.lock();
        // collect() harvests for every consumer, so the summary's take
        // below sees the same pages.
        let shadow_set = match &self.shadow {
            Some((sub, _)) => Some(h.collect(sub)?),
            None => {
                h.harvest()?;
                None
            }
        };
        let total = h.take(&self.summary)?;
        drop(h);
        self.run_total.union_with(&total).map_err(HarvestError::from)?;
        if let (Some((_, img)), Some(set)) = (&mut self.shadow, &shadow_set) {
            self.shadow_bytes += img.write_set(&self.ram, set)?;
        }
        let mut h = self.summary.lock();
        std::iter::once(total).chain(shadow_set).for_each(|s| h.recycle(s));
        drop(h);
        Ok(())
    }

    /// After the vCPUs stopped: the final harvest, the shadow's residue,
    /// the dump.
    pub fn finish(mut self) -> Result<DirtySummary, TrackError> {
        self.tick()?;
        if let Some(path) = &self.dump {
            write_dump(path, &self.run_total).map_err(|source| TrackError::Dump { path: path.clone(), source })?;
        }
        let h = self.summary.lock();
        Ok(DirtySummary {
            mechanism: h.mechanism(),
            pages: self.run_total.count(),
            stats: h.stats(),
            shadow_bytes: self.shadow_bytes,
        })
    }
}

/// The shadow starts equal to guest memory: a copy of an existing memory
/// file, or an all-zero sparse file for a new one.
fn start_shadow(path: &Path, from: Option<&Path>) -> Result<(), SinkError> {
    let err = |source| SinkError::Create { path: path.to_path_buf(), source };
    match from {
        Some(src) => std::fs::copy(src, path).map(|_| ()).map_err(err),
        None => std::fs::File::create(path).map(|_| ()).map_err(err),
    }
}

/// The dump: a header, then one extent per line as `gpa_hex pages`.
fn write_dump(path: &Path, set: &DirtySet) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "# smudge dirty pages: guest-physical address (hex), page count; page size {}", set.page_size())?;
    for e in set.extents() {
        writeln!(out, "{:#x} {}", e.gpa, e.len / set.page_size())?;
    }
    out.flush()
}

/// A dump line [`read_dump`] cannot read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DumpError {
    /// Not `address count`.
    #[error("bad dump line '{0}'")]
    Line(String),
    /// The address is not hex.
    #[error("bad address in '{0}'")]
    Address(String),
    /// The count is not a number.
    #[error("bad count in '{0}'")]
    Count(String),
}

/// Parses a dump written by [`write_dump`] into page addresses.
pub fn read_dump(text: &str) -> Result<Vec<u64>, DumpError> {
    let mut pages = Vec::new();
    let mut page_size = 4096;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix('#') {
            if let Some(ps) = rest.rsplit("page size ").next().and_then(|v| v.trim().parse().ok()) {
                page_size = ps;
            }
            continue;
        }
        let mut it = line.split_whitespace();
        let (Some(a), Some(n), None) = (it.next(), it.next(), it.next()) else {
            return Err(DumpError::Line(line.into()));
        };
        let gpa = u64::from_str_radix(a.trim_start_matches("0x"), 16).map_err(|_| DumpError::Address(line.into()))?;
        let n: u64 = n.parse().map_err(|_| DumpError::Count(line.into()))?;
        pages.extend((0..n).map(|i| gpa + i * page_size));
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use smudge::kvm::Slot;

    use super::*;

    #[test]
    fn dump_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let mut set = DirtySet::new(&[Slot { slot: 0, gpa: 0, size: 1 << 20 }], 4096);
        for gpa in [0x1000, 0x2000, 0x9000] {
            assert!(set.set_gpa(gpa));
        }
        write_dump(&p, &set).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(read_dump(&text).unwrap(), vec![0x1000, 0x2000, 0x9000]);
        assert_eq!(read_dump("0x1000"), Err(DumpError::Line("0x1000".into())));
        assert_eq!(read_dump("zz 1"), Err(DumpError::Address("zz 1".into())));
    }
}
