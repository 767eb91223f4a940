//! The journal against a model: RAM as a byte vector per epoch, and every
//! way a crash or a bad disk can leave the files.

use std::os::unix::fs::FileExt;
use std::path::Path;

use proptest::prelude::*;

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

/// Appends `epochs` (the first holds every page written so far, as a
/// journal's first epoch must), syncing after every `group` epochs; returns
/// the model RAM after each epoch (index 0: before the first).
fn write_journal(j: &mut Journal, epochs: &[Writes], group: usize) -> Vec<Vec<u8>> {
    let mut ram = vec![0u8; RAM as usize];
    let mut models = vec![ram.clone()];
    for (i, w) in epochs.iter().enumerate() {
        let mut p = EpochPages::new(PS);
        for &(page, byte) in w {
            let off = (page % PAGES) * PS;
            let data = vec![byte; PS as usize];
            ram[off as usize..(off + PS) as usize].copy_from_slice(&data);
            p.put(off, &data);
        }
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A crash after K committed epochs and part of one more: the last
    /// segment cut at any offset past the last commit, bits flipped in
    /// what is left of that tail. Recovery lands on epoch K bit-exact, or
    /// on K+1 when its records all survived intact.
    #[test]
    fn a_torn_or_flipped_tail_recovers_the_newest_intact_epoch(
        epochs in writes(),
        tail in (0..1000u64),
        flips in prop::collection::vec(any::<(u64, u8)>(), 0..3),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("j");
        let mut j = Journal::create(&dir, RAM, PS, 7, opts(8192)).unwrap();
        let k = epochs.len() as u64 - 1;
        let models = write_journal(&mut j, &epochs, epochs.len() + 1);
        // Epochs up to K committed; the last one appended, never synced.
        let s = scan(&dir).unwrap();
        let last = s.epochs.last().unwrap().clone();
        let committed_end = s.epochs.iter().rev().nth(1).filter(|e| e.segment == last.segment).map_or(last.start, |e| e.end);
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&last.segment).unwrap();
        let len = f.metadata().unwrap().len();
        let cut = committed_end + tail % (len - committed_end + 1);
        f.set_len(cut).unwrap();
        let mut flipped = false;
        for &(at, bit) in &flips {
            if cut > committed_end {
                flip(&f, committed_end + at % (cut - committed_end), bit);
                flipped = true;
            }
        }
        let want = if cut == len && !flipped { k + 1 } else { k };
        lands_on(&dir, &models, want)?;
    }

    /// One bit flipped anywhere in any segment: recovery lands on the
    /// newest epoch that ends before the flipped byte, bit-exact.
    #[test]
    fn a_flipped_bit_anywhere_ends_the_journal_just_before_it(
        epochs in writes(),
        seg_pick in any::<usize>(),
        at in any::<u64>(),
        bit in 0..8u8,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("j");
        let mut j = Journal::create(&dir, RAM, PS, 7, opts(4096)).unwrap();
        let models = write_journal(&mut j, &epochs, 1);
        let s = scan(&dir).unwrap();
        let seg = &s.segments[seg_pick % s.segments.len()];
        let off = at % seg.file_len;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&seg.path).unwrap();
        flip(&f, off, bit);
        let want = s.epochs.iter().filter(|e| e.segment < seg.path || (e.segment == seg.path && e.end <= off)).map(|e| e.epoch).max().unwrap_or(0);
        lands_on(&dir, &models, want)?;
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
