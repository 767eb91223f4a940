//! Exact dirty harvesting under a real guest, for every mechanism:
//! the harvested set is the written set plus only declared scratch and the
//! VMM's own boot writes; a shadow kept by thousands of harvests during
//! continuous writes equals guest memory byte for byte.

use std::collections::BTreeSet;
use std::process::Stdio;

use guest_abi::{random_sequence, stride_pages, ws_base_for, IMAGE_BASE, PAGE_SIZE};
use smudge_testkit::*;

const MECHANISMS: [&str; 3] = ["bitmap", "manual", "ring"];
/// Pages the VMM writes at boot (start_info, memory map, command line).
const VMM_BOOT_PAGES: [u64; 3] = [0x6000, 0x7000, 0x20000];

fn dump_pages(path: &std::path::Path) -> BTreeSet<u64> {
    let text = std::fs::read_to_string(path).expect("dump file");
    smudge_vmm::observe::tracking::read_dump(&text).expect("parse dump").into_iter().collect()
}

/// Boots with `mechanism`, harvesting every millisecond, and checks that the
/// pages dirtied are exactly `written` (working-set indices) plus scratch
/// and the VMM's boot pages, which must be there too.
fn assert_exact(mechanism: &str, pages: u64, cmdline: &str, written: &BTreeSet<u64>) {
    let dir = tmpdir();
    let (mem, dump) = (path(&dir, "m"), path(&dir, "dump"));
    let r = run_smudge(&[
        "--in-place",
        "--mem-file",
        mem.to_str().unwrap(),
        "--mem-size",
        "64M",
        "--dirty-log",
        mechanism,
        "--ring-entries",
        "256",
        "--tick-ms",
        "1",
        "--dump-dirty",
        dump.to_str().unwrap(),
        "--cmdline",
        &format!("pages={pages} {cmdline}"),
    ]);
    assert_eq!(r.code, 0, "{mechanism} {cmdline}: {r:?}");
    let got = dump_pages(&dump);
    let base = ws_base_for(pages);
    let want: BTreeSet<u64> = written.iter().map(|i| base + i * PAGE_SIZE).collect();
    let missing: Vec<_> = want.difference(&got).take(5).collect();
    assert!(missing.is_empty(), "{mechanism} {cmdline}: written pages not harvested: {missing:x?}");
    for p in VMM_BOOT_PAGES {
        assert!(got.contains(&p), "{mechanism}: VMM-written page {p:#x} not harvested (KVM never sees it)");
    }
    let extra: Vec<_> = got
        .difference(&want)
        .filter(|&&p| !(IMAGE_BASE..base).contains(&p) && !VMM_BOOT_PAGES.contains(&p))
        .take(5)
        .collect();
    assert!(extra.is_empty(), "{mechanism} {cmdline}: pages harvested that nobody wrote: {extra:x?}");
}

#[test]
fn harvest_is_exact_for_sparse_dense_and_chunk_boundaries() {
    let pages = 4096u64;
    // sparse: seeded random pages
    let sparse: BTreeSet<u64> = random_sequence(11, pages).take(300).collect();
    // dense: every page
    let dense: BTreeSet<u64> = (0..pages).collect();
    // 64-page chunk boundaries (the working set starts 2 MiB-aligned, so
    // index 0 is the first page of a chunk): first pages, last pages, pairs
    // straddling a boundary, and whole interiors without their edges.
    let patterns = [(64, 0, 1), (64, 63, 1), (64, 63, 2), (128, 1, 62)];
    for m in MECHANISMS {
        assert_exact(m, pages, "workload=random seed=11 writes=300", &sparse);
        assert_exact(m, pages, "workload=seq", &dense);
        for (stride, offset, run) in patterns {
            let set: BTreeSet<u64> = stride_pages(pages, stride, offset, run).collect();
            let cmd = format!("workload=stride stride={stride} offset={offset} run={run}");
            assert_exact(m, pages, &cmd, &set);
        }
    }
}

fn summary_number(stderr: &str, suffix: &str) -> u64 {
    let at = stderr.find(suffix).unwrap_or_else(|| panic!("no '{suffix}' in {stderr}"));
    stderr[..at].rsplit(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

/// The guest writes random pages while smudge harvests every millisecond
/// and copies each harvest into a shadow image, until smudge has made at
/// least 250 harvests (and, with `ring_fills`, its rings filled a few
/// times) during at least 24000 guest writes; then it is stopped and, the
/// vCPUs stopped and a final harvest made, the shadow must equal guest
/// memory. Returns the run's harvests and ring-full exits.
fn race(mechanism: &str, vcpus: &str, ring_entries: &str, ring_fills: bool) -> (u64, u64) {
    let dir = tmpdir();
    let (mem, shadow, sock) = (path(&dir, "m"), path(&dir, "shadow"), path(&dir, "api.sock"));
    let pages = 12000;
    let mut extra = vec![
        "--vcpus",
        vcpus,
        "--dirty-log",
        mechanism,
        "--ring-entries",
        ring_entries,
        "--tick-ms",
        "1",
        "--shadow",
        shadow.to_str().unwrap(),
        // The writeback engine is a third consumer clearing pages in manual
        // mode; it runs on its own thread, so harvests stay frequent.
        "--dirty-expire-ms",
        "200",
    ];
    if ring_fills {
        // Every 10th tick the harvest waits for a ring to fill.
        extra.extend(["--test-hold-harvests", "10"]);
    }
    // Writes until stopped (10^8 writes take minutes).
    let cmdline = format!("workload=random pages={pages} seed=5 writes=100m");
    let mut vm = start_with_api(&mem, &sock, "64M", &cmdline, Stdio::piped(), true, &extra);
    progress::wait_for_writes(&mut vm, &mem, pages, 12000);
    let at_start = progress::harvests(&ctl(&sock, &["stats"]));
    let fills = if ring_fills { 3 } else { 0 };
    progress::wait_for_stats(&mut vm, &sock, &format!("250 harvests and {fills} ring-full exits"), |s| {
        progress::harvests(s) >= at_start + 250 && s["dirty_log"]["ring_full_exits"].as_u64().unwrap_or(0) >= fills
    });
    // The guest still writes: the harvests raced its writes.
    let w = progress::guest_writes(&mem, pages);
    progress::wait_for_writes(&mut vm, &mem, pages, w + 12000);
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    let r = Run::from(vm.wait_with_output().unwrap());
    assert_eq!(r.code, 0, "{mechanism}: {r:?}");
    let (a, b) = (std::fs::read(&mem).unwrap(), std::fs::read(&shadow).unwrap());
    assert_eq!(a.len(), b.len());
    if let Some(i) = (0..a.len()).step_by(PAGE_SIZE as usize).find(|&i| a[i..i + 4096] != b[i..i + 4096]) {
        panic!("{mechanism}: shadow differs from guest memory at page {i:#x}: a write was lost");
    }
    (summary_number(&r.stderr, " harvests"), summary_number(&r.stderr, " ring-full exits"))
}

#[test]
fn no_lost_write_under_a_race_bitmap() {
    let (harvests, _) = race("bitmap", "1", "4096", false);
    assert!(harvests >= 250, "only {harvests} harvests: the race was not exercised");
}

#[test]
fn no_lost_write_under_a_race_manual() {
    let (harvests, _) = race("manual", "1", "4096", false);
    assert!(harvests >= 250, "only {harvests} harvests: the race was not exercised");
}

#[test]
fn no_lost_write_under_a_race_ring_that_fills() {
    // 256 entries per vCPU (the smallest KVM allows), and the periodic
    // harvest held every 10th tick until one fills; two vCPUs, each with
    // its own ring (the guest writes on the first).
    let (harvests, ring_full) = race("ring", "2", "256", true);
    assert!(harvests >= 250, "only {harvests} harvests: the race was not exercised");
    assert!(ring_full >= 3, "the ring filled only {ring_full} times");
}

#[test]
fn unsupported_mechanism_is_a_clear_error() {
    let dir = tmpdir();
    let mem = path(&dir, "m");
    let m = mem.to_str().unwrap();
    for (mech, cap, msg) in [
        ("ring", "ring", "dirty-log mechanism 'ring' is not available: KVM_CAP_DIRTY_LOG_RING is 0"),
        ("manual", "manual", "dirty-log mechanism 'manual' is not available: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is 0"),
    ] {
        let r =
            run_smudge(&["--in-place", "--mem-file", m, "--mem-size", "16M", "--dirty-log", mech, "--hide-cap", cap]);
        assert_eq!(r.code, 100, "{r:?}");
        assert!(r.stderr.contains(msg), "{r:?}");
        assert!(!r.stderr.contains("panicked"), "{r:?}");
    }
    let r = run_smudge(&[
        "--in-place",
        "--mem-file",
        m,
        "--mem-size",
        "16M",
        "--dirty-log",
        "ring",
        "--ring-entries",
        "100",
    ]);
    assert_eq!(r.code, 100, "{r:?}");
    assert!(r.stderr.contains("is not a power of two"), "{r:?}");
    // auto falls back to the bitmap when manual protect is missing, and says so
    let r = run_smudge(&[
        "--in-place",
        "--mem-file",
        m,
        "--mem-size",
        "16M",
        "--hide-cap",
        "manual",
        "--cmdline",
        "workload=seq pages=8",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("dirty log: bitmap (KVM_GET_DIRTY_LOG)"), "{r:?}");
    let r = run_smudge(&["--in-place", "--mem-file", m, "--mem-size", "16M", "--cmdline", "workload=seq pages=8"]);
    assert!(r.stderr.contains("dirty log: manual"), "auto picks manual protect here: {r:?}");
}
