//! The command line's side of the durable mode: `smudge journal list`
//! and `verify`, the journal options of `smudge run`, and the recovery
//! step of `smudge restore --journal`.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use smudge::journal::{self, Recovered, Scan, ScanEnd, Target};

use crate::control::cli::RunArgs;
use crate::persist::epoch::EpochOptions;

/// The epoch length when `--journal` is given without `--epoch-ms`.
pub const DEFAULT_EPOCH_MS: u64 = 20;

/// The epochs `args` ask for. `after`: None for a boot (a new journal,
/// with `--journal`); Some(None) for a journal restore without
/// `--epoch-ms` (no journal); Some(Some(n)) to journal on after epoch n.
pub fn epoch_options(args: &RunArgs, after: Option<Option<u64>>) -> anyhow::Result<Option<EpochOptions>> {
    let Some(dir) = &args.journal else {
        if args.epoch_ms.is_some() || args.journal_max_bytes.is_some() || args.journal_cache.is_some() {
            anyhow::bail!("--epoch-ms, --journal-max-bytes and --journal-cache need --journal DIR");
        }
        return Ok(None);
    };
    if args.no_dirty_log {
        anyhow::bail!("--journal needs dirty logging: drop --no-dirty-log");
    }
    let after = match after {
        None => {
            // Fail before the guest runs, not once it does.
            if journal::Checkpoint::load(dir).is_ok() {
                return Err(journal::JournalError::Exists(dir.clone()).into());
            }
            None
        }
        Some(None) => return Ok(None),
        Some(Some(n)) => Some(n),
    };
    Ok(Some(EpochOptions {
        dir: dir.clone(),
        every: Duration::from_millis(args.epoch_ms.unwrap_or(DEFAULT_EPOCH_MS)),
        retain: args.retain,
        max_bytes: args.journal_max_bytes,
        cache_bytes: args.journal_cache,
        after,
        write_delay: Duration::from_millis(args.test_journal_write_delay_ms.unwrap_or(0)),
        parts: args.test_epoch_parts,
        passes: args.test_epoch_passes,
    }))
}

/// `--epoch N` / `--at -2s` as a recovery target.
pub fn target(epoch: Option<u64>, at: Option<Duration>) -> Target {
    match (epoch, at) {
        (Some(n), _) => Target::Epoch(n),
        (None, Some(d)) => Target::Before(d),
        (None, None) => Target::Newest,
    }
}

/// Builds the target epoch's RAM in `mem_file` (which must not exist:
/// `smudge restore` checks that first) and says what was recovered.
pub fn recover(dir: &Path, target: Target, mem_file: &Path) -> anyhow::Result<Recovered> {
    let rec = journal::recover(dir, target, mem_file).with_context(|| format!("recovering {}", dir.display()))?;
    eprintln!(
        "smudge: journal {}: epoch {} recovered ({}; {} epochs applied on the base, {} MiB)",
        dir.display(),
        rec.epoch.epoch,
        when(rec.epoch.time_ns),
        rec.epochs_applied,
        rec.bytes_applied >> 20
    );
    Ok(rec)
}

/// How long ago a boundary was (its time is in ns since the Unix epoch).
fn when(time_ns: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(time_ns);
    let ago = std::time::SystemTime::now().duration_since(t).unwrap_or_default();
    format!("{:.3} s ago", ago.as_secs_f64())
}

/// `smudge journal list DIR`.
pub fn list(dir: &Path) -> anyhow::Result<u8> {
    let s = journal::scan(dir).with_context(|| format!("reading {}", dir.display()))?;
    println!("{}", summary(dir, &s));
    let base = s.checkpoint.base_epoch;
    for e in &s.epochs {
        let note = if e.epoch < base { " (already in the base)" } else { "" };
        println!(
            "epoch {:>8}  {:>8} pages ({:>8} as deltas)  {:>10} bytes  {}  {}{note}",
            e.epoch,
            e.pages,
            e.delta_pages,
            e.bytes,
            when(e.time_ns),
            e.segment.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        );
    }
    println!("{}", end_line(&s.end));
    Ok(0)
}

/// `smudge journal verify DIR`: every record read and checked (each
/// delta parsed against the page size).
pub fn verify(dir: &Path) -> anyhow::Result<u8> {
    let s = journal::scan(dir).with_context(|| format!("reading {}", dir.display()))?;
    println!("{}", summary(dir, &s));
    let (pages, deltas) = s.epochs.iter().fold((0, 0), |(p, d), e| (p + e.pages, d + e.delta_pages));
    println!("pages: {} whole, {deltas} as deltas", pages - deltas);
    println!("{}", end_line(&s.end));
    match s.recoverable().last() {
        Some(e) => {
            println!("recoverable: epochs {}..={}", s.recoverable().next().map_or(e.epoch, |f| f.epoch), e.epoch);
            Ok(0)
        }
        None => {
            println!("no committed epoch to recover");
            Ok(1)
        }
    }
}

fn summary(dir: &Path, s: &Scan) -> String {
    format!(
        "{}: journal {} ({} MiB RAM, pages of {} bytes): {} segment(s), {} committed epoch(s); base holds epochs up to {}{}",
        dir.display(),
        s.checkpoint.journal,
        s.checkpoint.ram_size >> 20,
        s.checkpoint.page_size,
        s.segments.len(),
        s.epochs.len(),
        s.checkpoint.base_epoch,
        if s.checkpoint.complete { "" } else { " (a checkpoint was interrupted; its segment replays)" }
    )
}

fn end_line(end: &ScanEnd) -> String {
    match end {
        ScanEnd::Clean => "end: clean (after the last commit)".into(),
        ScanEnd::Stopped { segment, offset, why, ignored_segments } => format!(
            "end: stopped in {} at offset {offset:#x}: {why}{} (an uncommitted tail after a crash looks like this)",
            segment.display(),
            if *ignored_segments > 0 {
                format!("; {ignored_segments} later segment(s) not used")
            } else {
                String::new()
            }
        ),
    }
}
