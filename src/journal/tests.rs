//! The journal against a model: RAM as a byte vector per epoch, and every
//! way a crash or a bad disk can leave the files.

use std::os::unix::fs::FileExt;
use std::path::Path;

use proptest::prelude::*;

use super::recover::read_epoch;
use super::*;
use crate::machine_state::{DeviceState, MachineState, UartState};

const PS: u64 = 512;
const PAGES: u64 = 64;
const RAM: u64 = PS * PAGES;

/// The state that marks epoch `n` (so a recovery of the wrong one shows).
fn state(n: u64) -> MachineState {
    let com1 = UartState { scratch: n as u8, in_buffer: n.to_le_bytes().to_vec(), ..Default::default() };
    MachineState { vcpus: Vec::new(), devices: DeviceState { com1: Some(com1) } }
}

/// Epoch writes: (page, byte) pairs; the page filled with the byte.
type Writes = Vec<(u64, u8)>;

/// An edit: bytes `at..at + len` of page `page` (cut at the page's end)
/// set to `byte`.
type Edit = (u64, u64, u64, u8);

/// Appends `epochs` (the first holds every page written so far, as a
/// journal's first epoch must), syncing after every `group` epochs; returns
/// the model RAM after each epoch (index 0: before the first).
fn write_journal(j: &mut Journal, epochs: &[Writes], group: usize) -> Vec<Vec<u8>> {
    write_edits(j, &as_edits(epochs), group)
}

/// Applies edits `w` to the model `ram`; the pages they touched.
fn edit_pages(ram: &mut [u8], w: &[Edit]) -> EpochPages {
    let mut p = EpochPages::new(PS);
    for &(page, at, len, byte) in w {
        let off = (page % PAGES) * PS;
        let (from, to) = (off + at % PS, (off + at % PS + len).min(off + PS));
        ram[from as usize..to as usize].fill(byte);
        p.put(off, &ram[off as usize..(off + PS) as usize]);
    }
    p
}

/// Whole-page writes as edits.
fn as_edits(epochs: &[Writes]) -> Vec<Vec<Edit>> {
    epochs.iter().map(|w| w.iter().map(|&(page, byte)| (page, 0, PS, byte)).collect()).collect()
}

/// As [`write_journal`], for edits: an edited page goes into its epoch
/// whole, as a guest's dirty page would.
fn write_edits(j: &mut Journal, epochs: &[Vec<Edit>], group: usize) -> Vec<Vec<u8>> {
    let mut ram = vec![0u8; RAM as usize];
    let mut models = vec![ram.clone()];
    for (i, w) in epochs.iter().enumerate() {
        let p = edit_pages(&mut ram, w);
        let n = j.append(1_000 + i as u64 * 1_000_000_000, &p, &state(i as u64 + 1)).unwrap();
        assert_eq!(n, i as u64 + 1);
        if (i + 1) % group == 0 {
            j.sync().unwrap();
        }
        models.push(ram.clone());
    }
    models
}

fn recovered(dir: &Path, target: Target) -> Result<(u64, Vec<u8>, MachineState), JournalError> {
    let out = dir.with_extension(format!("out{}", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let r = recover(dir, target, &out);
    let bytes = std::fs::read(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    r.map(|r| (r.epoch.epoch, bytes, r.state))
}

fn opts(segment_bytes: u64) -> JournalOptions {
    JournalOptions { segment_bytes, max_bytes: None, cache_bytes: None }
}

/// A journal in a new directory holding `n` epochs of `per` pages each
/// (epoch i fills page `(i * a + k * b) % PAGES` with `i + 1`), synced
/// every `group` epochs; with the model RAM after each epoch.
fn written(n: u64, per: u64, (a, b): (u64, u64), o: JournalOptions, group: usize) -> Written {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let mut j = Journal::create(&dir, RAM, PS, 7, o).unwrap();
    let epochs: Vec<Writes> =
        (0..n).map(|i| (0..per).map(|k| ((i * a + k * b) % PAGES, (i + 1) as u8)).collect()).collect();
    let models = write_journal(&mut j, &epochs, group);
    (tmp, dir, j, models)
}

/// What [`written`] made: the temporary directory (removed on drop), the
/// journal's directory, the journal, the models.
type Written = (tempfile::TempDir, std::path::PathBuf, Journal, Vec<Vec<u8>>);

fn writes() -> impl Strategy<Value = Vec<Writes>> {
    prop::collection::vec(prop::collection::vec((0..PAGES, 1..=255u8), 0..12), 1..8)
}

/// Epochs of small edits over a quarter of the pages: most pages are
/// written again, mostly as deltas.
fn edits() -> impl Strategy<Value = Vec<Vec<Edit>>> {
    prop::collection::vec(prop::collection::vec((0..PAGES / 4, 0..PS, 1..80u64, any::<u8>()), 0..10), 1..16)
}

#[test]
fn every_committed_epoch_recovers_bit_exact_across_segments() {
    let (_tmp, dir, mut j, models) = written(20, 5, (7, 13), opts(4096), 3);
    assert_eq!(j.sync().unwrap(), 20);
    let s = scan(&dir).unwrap();
    assert!(s.segments.len() > 3, "small segments roll: {}", s.segments.len());
    assert_eq!(s.end, ScanEnd::Clean);
    assert_eq!(s.epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
    for n in 1..=20u64 {
        let (e, ram, st) = recovered(&dir, Target::Epoch(n)).unwrap();
        assert_eq!((e, st), (n, state(n)));
        assert!(ram == models[n as usize], "epoch {n}'s RAM");
    }
    // --at: the newest at least 5 s (5 boundaries) older than the newest.
    assert_eq!(recovered(&dir, Target::Before(std::time::Duration::from_secs(5))).unwrap().0, 15);
    assert_eq!(recovered(&dir, Target::Newest).unwrap().0, 20);
    assert!(matches!(recovered(&dir, Target::Epoch(21)), Err(JournalError::NotRetained { want: 21, .. })));
    assert!(matches!(Journal::create(&dir, RAM, PS, 7, opts(4096)), Err(JournalError::Exists(_))));
}

#[test]
fn checkpoints_move_old_epochs_into_the_base_and_a_crash_mid_checkpoint_is_harmless() {
    let (_tmp, dir, mut j, models) = written(30, 6, (5, 11), opts(4096), 1);
    let before = segment_files(&dir).len();
    // Keep the segments, to put back the last one checkpointed, as if the
    // crash came before its removal (the ones before it were removed).
    let kept: Vec<_> = segment_files(&dir).into_iter().map(|p| (std::fs::read(&p).unwrap(), p)).collect();
    // Epochs began at 1000 + i s: everything before epoch 15's boundary.
    let r = j.checkpoint(1_000 + 14 * 1_000_000_000).unwrap();
    assert!(r.segments > 0 && r.forced == 0, "{r:?}");
    let s = scan(&dir).unwrap();
    assert_eq!(segment_files(&dir).len(), before - r.segments as usize);
    let base = s.checkpoint.base_epoch;
    assert!((1..15).contains(&base) && s.checkpoint.complete, "{:?}", s.checkpoint);
    let oldest = s.recoverable().next().unwrap().epoch;
    assert_eq!(oldest, base + 1, "the base's own epoch went with its segment");
    for n in oldest..=30 {
        let (e, ram, _) = recovered(&dir, Target::Epoch(n)).unwrap();
        assert!(e == n && ram == models[n as usize], "epoch {n} after the checkpoint");
    }
    assert!(matches!(recovered(&dir, Target::Epoch(base)), Err(JournalError::NotRetained { .. })));
    // The crash: the first segment is back and the checkpoint says
    // "not complete"; replaying it again onto the base changes nothing.
    let (bytes, path) = &kept[r.segments as usize - 1];
    std::fs::write(path, bytes).unwrap();
    let mut cp = s.checkpoint.clone();
    cp.complete = false;
    cp.store(&dir).unwrap();
    for n in base..=30 {
        let (e, ram, _) = recovered(&dir, Target::Epoch(n)).unwrap();
        assert!(e == n && ram == models[n as usize], "epoch {n} after an interrupted checkpoint");
    }
}

#[test]
fn the_size_bound_forces_checkpoints_and_keeps_the_newest_epoch() {
    let o = JournalOptions { segment_bytes: 4096, max_bytes: Some(12 << 10), cache_bytes: None };
    let (_tmp, dir, mut j, models) = written(25, 6, (1, 9), o, 1);
    let r = j.checkpoint(0).unwrap();
    assert!(r.forced > 0 && r.forced == r.segments, "{r:?}");
    assert!(j.bytes() <= 12 << 10 || segment_files(&dir).len() == 1, "{} bytes left", j.bytes());
    let (e, ram, _) = recovered(&dir, Target::Newest).unwrap();
    assert!(e == 25 && ram == models[25]);
}

#[test]
fn reopening_cuts_later_epochs_and_goes_on_from_the_kept_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let mut j = Journal::create(&dir, RAM, PS, 7, opts(4096)).unwrap();
    let epochs: Vec<Writes> = (0..12u64).map(|i| vec![(i, (i + 1) as u8), (i + 20, 9)]).collect();
    let models = write_journal(&mut j, &epochs, 1);
    drop(j);
    let mut j = Journal::reopen(&dir, 5, 8, opts(4096)).unwrap();
    assert_eq!((j.committed(), j.next_epoch()), (5, 6));
    let mut p = EpochPages::new(PS);
    p.put(0, &[0xee; PS as usize]);
    assert_eq!(j.append(99, &p, &state(6)).unwrap(), 6);
    j.sync().unwrap();
    let s = scan(&dir).unwrap();
    assert_eq!(s.end, ScanEnd::Clean);
    assert_eq!(s.newest().unwrap().epoch, 6);
    let (_, ram, st) = recovered(&dir, Target::Newest).unwrap();
    let mut want = models[5].clone();
    want[..PS as usize].fill(0xee);
    assert!(ram == want && st == state(6));
}

#[test]
fn an_append_that_fails_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let mut j = Journal::create(&dir, RAM, PS, 7, opts(1 << 20)).unwrap();
    let models = write_journal(&mut j, &[vec![(1, 1)], vec![(2, 2)]], 1);
    // Pages of the wrong size are refused before anything is written.
    let bad = EpochPages::new(PS * 2);
    assert!(matches!(j.append(5, &bad, &state(3)), Err(JournalError::Shape { epoch: 3, .. })));
    assert_eq!(j.next_epoch(), 3);
    let (e, ram, _) = recovered(&dir, Target::Newest).unwrap();
    assert!(e == 2 && ram == models[2]);
}

/// Checks that recovering `dir`'s newest epoch gives epoch `want` (0:
/// none) with its model RAM and state, bit-exact.
fn lands_on(dir: &Path, models: &[Vec<u8>], want: u64) -> Result<(), TestCaseError> {
    match recovered(dir, Target::Newest) {
        Ok((e, ram, st)) => {
            prop_assert_eq!(e, want);
            prop_assert!(ram == models[e as usize]);
            prop_assert_eq!(st, state(e));
        }
        Err(JournalError::NoEpoch(_)) => prop_assert_eq!(want, 0),
        Err(e) => prop_assert!(false, "{}", e),
    }
    Ok(())
}

/// Flips bit `bit` of the byte at `off` of `f`.
fn flip(f: &std::fs::File, off: u64, bit: u8) {
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 1 << (bit % 8);
    f.write_all_at(&b, off).unwrap();
}

/// The journal's segment files, in order.
fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    recover::segment_files(dir).unwrap().into_iter().map(|(_, p)| p).collect()
}

/// A crash after K committed epochs and part of one more: the last
/// segment cut at `tail` past the last commit, `flips` in what is left of
/// that tail. Recovery lands on epoch K bit-exact, or on K+1 when its
/// records all survived intact.
fn torn_tail(epochs: &[Vec<Edit>], tail: u64, flips: &[(u64, u8)]) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let mut j = Journal::create(&dir, RAM, PS, 7, opts(8192)).unwrap();
    let k = epochs.len() as u64 - 1;
    let models = write_edits(&mut j, epochs, epochs.len() + 1);
    // Epochs up to K committed; the last one appended, never synced.
    let s = scan(&dir).unwrap();
    let last = s.epochs.last().unwrap().clone();
    let committed_end =
        s.epochs.iter().rev().nth(1).filter(|e| e.segment == last.segment).map_or(last.start, |e| e.end);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&last.segment).unwrap();
    let len = f.metadata().unwrap().len();
    let cut = committed_end + tail % (len - committed_end + 1);
    f.set_len(cut).unwrap();
    let mut flipped = false;
    for &(at, bit) in flips {
        if cut > committed_end {
            flip(&f, committed_end + at % (cut - committed_end), bit);
            flipped = true;
        }
    }
    let want = if cut == len && !flipped { k + 1 } else { k };
    lands_on(&dir, &models, want)
}

/// One bit flipped anywhere in any segment: recovery lands on the newest
/// epoch that ends before the flipped byte, bit-exact.
fn flipped_anywhere(epochs: &[Vec<Edit>], seg_pick: usize, at: u64, bit: u8) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let mut j = Journal::create(&dir, RAM, PS, 7, opts(4096)).unwrap();
    let models = write_edits(&mut j, epochs, 1);
    let s = scan(&dir).unwrap();
    let seg = &s.segments[seg_pick % s.segments.len()];
    let off = at % seg.file_len;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&seg.path).unwrap();
    flip(&f, off, bit);
    let want = s
        .epochs
        .iter()
        .filter(|e| e.segment < seg.path || (e.segment == seg.path && e.end <= off))
        .map(|e| e.epoch)
        .max()
        .unwrap_or(0);
    lands_on(&dir, &models, want)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// [`torn_tail`], whole pages.
    #[test]
    fn a_torn_or_flipped_tail_recovers_the_newest_intact_epoch(
        epochs in writes(),
        tail in (0..1000u64),
        flips in prop::collection::vec(any::<(u64, u8)>(), 0..3),
    ) {
        torn_tail(&as_edits(&epochs), tail, &flips)?;
    }

    /// [`torn_tail`], pages written again as deltas.
    #[test]
    fn a_torn_or_flipped_tail_of_deltas_recovers_the_newest_intact_epoch(
        epochs in edits(),
        tail in (0..1000u64),
        flips in prop::collection::vec(any::<(u64, u8)>(), 0..3),
    ) {
        torn_tail(&epochs, tail, &flips)?;
    }

    /// [`flipped_anywhere`], whole pages.
    #[test]
    fn a_flipped_bit_anywhere_ends_the_journal_just_before_it(
        epochs in writes(),
        seg_pick in any::<usize>(),
        at in any::<u64>(),
        bit in 0..8u8,
    ) {
        flipped_anywhere(&as_edits(&epochs), seg_pick, at, bit)?;
    }

    /// [`flipped_anywhere`], pages written again as deltas.
    #[test]
    fn a_flipped_bit_anywhere_in_deltas_ends_the_journal_just_before_it(
        epochs in edits(),
        seg_pick in any::<usize>(),
        at in any::<u64>(),
        bit in 0..8u8,
    ) {
        flipped_anywhere(&epochs, seg_pick, at, bit)?;
    }

    /// Random edits over small segments, a cache of `cache` pages (0:
    /// every page whole), checkpointed up to a random boundary: every
    /// retained epoch recovers bit-exact, and the base holds exactly the
    /// newest checkpointed epoch's RAM.
    #[test]
    fn every_retained_epoch_of_deltas_recovers_bit_exact(
        epochs in edits(),
        cache in prop::sample::select(vec![0u64, 2, 8, PAGES]),
        seg in prop::sample::select(vec![1024u64, 4096, 1 << 20]),
        cut in any::<u64>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("j");
        let o = JournalOptions { segment_bytes: seg, max_bytes: None, cache_bytes: Some(cache * PS) };
        let mut j = Journal::create(&dir, RAM, PS, 7, o).unwrap();
        let models = write_edits(&mut j, &epochs, 2);
        let n = j.sync().unwrap();
        let deltas: u64 = scan(&dir).unwrap().epochs.iter().map(|e| e.delta_pages).sum();
        prop_assert!(cache > 0 || deltas == 0, "{} deltas without a cache", deltas);
        j.checkpoint(1_000 + (cut % (n + 1)) * 1_000_000_000).unwrap();
        let s = scan(&dir).unwrap();
        let base = s.checkpoint.base_epoch;
        prop_assert!(s.checkpoint.complete);
        prop_assert!(std::fs::read(dir.join(BASE)).unwrap() == models[base as usize], "the base is not epoch {}", base);
        for e in s.recoverable() {
            let (got, ram, st) = recovered(&dir, Target::Epoch(e.epoch)).unwrap();
            prop_assert_eq!((got, st), (e.epoch, state(e.epoch)));
            prop_assert!(ram == models[e.epoch as usize], "epoch {}'s RAM", e.epoch);
        }
    }

    /// A checkpoint cut short by a crash, after one that completed: the
    /// segments it applied are all still there, "not complete", and the
    /// base holds for each page what that page held at any epoch from the
    /// first checkpoint's to the newest one the second took (some of its
    /// pages written, some not, some written from a flush before the
    /// last). Deltas whose earlier records went with the first checkpoint
    /// replay onto that. Every retained epoch recovers bit-exact.
    #[test]
    fn a_checkpoint_of_deltas_cut_short_anywhere_replays_bit_exact(
        epochs in edits(),
        cuts in any::<(u64, u64)>(),
        base_from in prop::collection::vec(any::<u64>(), PAGES as usize),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("j");
        let mut j = Journal::create(&dir, RAM, PS, 7, opts(1024)).unwrap();
        let models = write_edits(&mut j, &epochs, 1);
        let n = j.committed();
        let (first, second) = (cuts.0 % (n + 1), cuts.1 % (n + 1));
        j.checkpoint(1_000 + first.min(second) * 1_000_000_000).unwrap();
        let b0 = Checkpoint::load(&dir).unwrap().base_epoch;
        let kept: Vec<_> = segment_files(&dir).into_iter().map(|p| (std::fs::read(&p).unwrap(), p)).collect();
        j.checkpoint(1_000 + first.max(second) * 1_000_000_000).unwrap();
        let cp = Checkpoint::load(&dir).unwrap();
        let b1 = cp.base_epoch;
        for (bytes, path) in &kept {
            std::fs::write(path, bytes).unwrap();
        }
        let f = std::fs::OpenOptions::new().write(true).open(dir.join(BASE)).unwrap();
        for (page, from) in base_from.iter().enumerate() {
            let m = &models[(b0 + from % (b1 - b0 + 1)) as usize];
            let off = page * PS as usize;
            f.write_all_at(&m[off..off + PS as usize], off as u64).unwrap();
        }
        Checkpoint { complete: false, ..cp }.store(&dir).unwrap();
        let s = scan(&dir).unwrap();
        prop_assert_eq!(s.recoverable().next().map(|e| e.epoch), Some(b1.max(b0 + 1)));
        for e in s.recoverable() {
            let (got, ram, _) = recovered(&dir, Target::Epoch(e.epoch)).unwrap();
            prop_assert!(got == e.epoch && ram == models[e.epoch as usize], "epoch {} after a cut-short checkpoint", e.epoch);
        }
    }

    /// Rewinds with deltas: the journal reopened at any committed epoch
    /// goes on (whole pages first, an empty cache), and every epoch of
    /// the new line recovers bit-exact.
    #[test]
    fn a_rewound_journal_of_deltas_goes_on_bit_exact(
        epochs in edits(),
        more in edits(),
        keep in any::<u64>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("j");
        let mut j = Journal::create(&dir, RAM, PS, 7, opts(2048)).unwrap();
        let models = write_edits(&mut j, &epochs, 1);
        drop(j);
        let keep = 1 + keep % epochs.len() as u64;
        let mut j = Journal::reopen(&dir, keep, 8, opts(2048)).unwrap();
        // Go on from the kept epoch's RAM: the first epoch after holds
        // every page with data, then `more`'s edits.
        let mut ram = models[keep as usize].clone();
        let mut line = vec![ram.clone()];
        for (i, w) in more.iter().enumerate() {
            let mut p = edit_pages(&mut ram, w);
            if i == 0 {
                for pg in 0..PAGES {
                    p.put(pg * PS, &ram[(pg * PS) as usize..((pg + 1) * PS) as usize]);
                }
            }
            j.append(1_000_000 + i as u64, &p, &state(keep + 1 + i as u64)).unwrap();
            j.sync().unwrap();
            line.push(ram.clone());
        }
        let s = scan(&dir).unwrap();
        prop_assert_eq!(s.newest().map(|e| e.epoch), Some(keep + more.len() as u64));
        prop_assert_eq!(s.epochs.iter().find(|e| e.epoch == keep + 1).map(|e| e.delta_pages), Some(0));
        for n in 1..=keep + more.len() as u64 {
            let (got, ram, st) = recovered(&dir, Target::Epoch(n)).unwrap();
            let want = if n <= keep { &models[n as usize] } else { &line[(n - keep) as usize] };
            prop_assert!(got == n && st == state(n) && &ram == want, "epoch {} of the rewound line", n);
        }
    }
}

#[test]
fn a_recovery_that_fails_leaves_no_memory_file() {
    let (tmp, dir, _j, _) = written(3, 2, (1, 2), opts(4096), 1);
    std::fs::remove_file(dir.join(BASE)).unwrap();
    let out = tmp.path().join("out");
    let e = recover(&dir, Target::Newest, &out).unwrap_err();
    assert!(matches!(&e, JournalError::Io { op: "open", .. }), "{e}");
    assert!(!out.exists(), "a partial memory file was left");
}

/// Epochs that each rewrite a few bytes of the same 16 pages.
fn small_rewrites(n: u64) -> Vec<Vec<Edit>> {
    (0..n).map(|i| (0..16).map(|p| (p, (i * 24) % PS, 8, (i + p + 1) as u8)).collect()).collect()
}

#[test]
fn pages_written_again_go_as_small_deltas() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let mut j = Journal::create(&dir, RAM, PS, 7, opts(1 << 20)).unwrap();
    let models = write_edits(&mut j, &small_rewrites(10), 1);
    let s = scan(&dir).unwrap();
    // Epoch 1 whole, every later page a delta of one 8-byte run.
    let counts: Vec<(u64, u64)> = s.epochs.iter().map(|e| (e.pages, e.delta_pages)).collect();
    assert_eq!(counts[0], (16, 0));
    assert!(counts[1..].iter().all(|&c| c == (16, 16)), "{counts:?}");
    let later = s.epochs[1].bytes;
    assert!(later < s.epochs[0].bytes / 8, "a delta epoch takes {later} bytes, a whole one {}", s.epochs[0].bytes);
    let (e, ram, _) = recovered(&dir, Target::Newest).unwrap();
    assert!(e == 10 && ram == models[10]);
    // Without a cache, every page whole.
    let tmp2 = tempfile::tempdir().unwrap();
    let dir2 = tmp2.path().join("j");
    let o = JournalOptions { cache_bytes: Some(0), ..opts(1 << 20) };
    let mut j2 = Journal::create(&dir2, RAM, PS, 7, o).unwrap();
    write_edits(&mut j2, &small_rewrites(10), 1);
    assert!(scan(&dir2).unwrap().epochs.iter().all(|e| e.delta_pages == 0 && e.pages == 16));
}

#[test]
fn a_coalesced_checkpoint_writes_each_page_once_and_equals_one_epoch_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let mut j = Journal::create(&dir, RAM, PS, 7, opts(2048)).unwrap();
    let models = write_edits(&mut j, &small_rewrites(40), 1);
    // The base the old way: each epoch applied on its own, in order.
    let s = scan(&dir).unwrap();
    let per_epoch = tmp.path().join("per-epoch");
    let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&per_epoch).unwrap();
    f.set_len(RAM).unwrap();
    // (file after epoch n, page bytes written up to it)
    let mut after = vec![(vec![0u8; RAM as usize], 0)];
    for e in &s.epochs {
        let mut one = replay::Replay::new(&f, &per_epoch, PS, 1 << 20);
        read_epoch(e, &s.checkpoint, |off, d| one.page(off, d)).unwrap();
        let bytes = after.last().unwrap().1 + one.finish().unwrap();
        after.push((std::fs::read(&per_epoch).unwrap(), bytes));
    }
    let r = j.checkpoint(1_000 + 30 * 1_000_000_000).unwrap();
    let base = Checkpoint::load(&dir).unwrap().base_epoch as usize;
    assert!(r.segments > 1 && base > 10, "{r:?}, base {base}");
    let got = std::fs::read(dir.join(BASE)).unwrap();
    assert!(got == after[base].0 && got == models[base]);
    assert_eq!(r.bytes, 16 * PS, "each of the 16 pages written once");
    assert_eq!(after[base].1, base as u64 * 16 * PS, "one epoch at a time writes every page per epoch");
}

/// Rewrites the format version of every segment header in `dir`.
fn set_version(dir: &Path, version: u32) {
    for p in segment_files(dir) {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let mut hb = [0u8; format::HEADER];
        f.read_exact_at(&mut hb, 0).unwrap();
        let h = format::Header::decode(&hb).unwrap();
        let mut payload = vec![0u8; h.len as usize];
        f.read_exact_at(&mut payload, format::HEADER as u64).unwrap();
        payload[0..4].copy_from_slice(&version.to_le_bytes());
        f.write_all_at(&format::Header::of(format::Kind::Segment, h.epoch, &payload).encode(), 0).unwrap();
        f.write_all_at(&payload, format::HEADER as u64).unwrap();
    }
}

#[test]
fn a_version_1_journal_is_read_and_journals_on_in_a_new_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    // Version 1 wrote every page whole: a journal without a cache, its
    // segment headers saying 1.
    let o = JournalOptions { cache_bytes: Some(0), ..opts(1 << 20) };
    let mut j = Journal::create(&dir, RAM, PS, 7, o).unwrap();
    let models = write_edits(&mut j, &small_rewrites(5), 1);
    drop(j);
    set_version(&dir, 1);
    let s = scan(&dir).unwrap();
    assert_eq!((s.segments.len(), s.segments[0].version, s.end.clone()), (1, 1, ScanEnd::Clean));
    for n in 1..=5 {
        assert!(recovered(&dir, Target::Epoch(n)).unwrap().1 == models[n as usize]);
    }
    let mut j = Journal::reopen(&dir, 5, 8, opts(1 << 20)).unwrap();
    let mut p = EpochPages::new(PS);
    p.put(0, &[3; PS as usize]);
    j.append(99, &p, &state(6)).unwrap();
    j.sync().unwrap();
    let s = scan(&dir).unwrap();
    let versions: Vec<u32> = s.segments.iter().map(|g| g.version).collect();
    assert_eq!(versions, vec![1, format::VERSION], "epoch 6 went into a new segment");
    let mut want = models[5].clone();
    want[..PS as usize].fill(3);
    assert!(recovered(&dir, Target::Newest).unwrap().1 == want);
}

#[test]
fn a_segment_of_a_newer_format_is_refused_by_its_version() {
    let (_tmp, dir, _j, _) = written(3, 2, (1, 2), opts(1 << 20), 1);
    set_version(&dir, format::VERSION + 1);
    let e = scan(&dir).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, JournalError::Record { offset: 0, why: format::RecordError::Version(v), .. } if *v == format::VERSION + 1),
        "{e:?}"
    );
    assert!(msg.contains(&format!("segment format version {}", format::VERSION + 1)), "{msg}");
}
