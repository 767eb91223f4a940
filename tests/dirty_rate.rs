//! Dirty-rate measurement: what the dirty log measures over a
//! window is what the guest itself did in that window — with the bitmap
//! (manual protect) and with the ring, per vCPU with the ring.
//!
//! The guest's own count is its generation table, read from the memory
//! file while the guest is paused at both ends of the window: the
//! measurement starts with the guest paused, and the guest is paused again
//! before the measurement's last sample. So the comparison holds on a busy
//! machine, where the guest writes fewer pages than its nominal rate.

use std::collections::HashSet;
use std::process::Stdio;

use serde_json::Value;
use smudge_testkit::*;

/// One measurement at a time (two would only load the machine more).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const PAGES: u64 = 12000;
const SEED: u64 = 4;
/// Longer than the test needs: the guest is paused well before it ends.
const WINDOW_S: &str = "8";

/// What a measurement reported and what the guest did in its window.
struct Measured {
    answer: Value,
    /// Page writes the guest made in the window.
    writes: u64,
    /// Distinct working-set pages among them.
    distinct: u64,
    /// How long the guest ran in the window (from before the resume to
    /// after the pause, as the test saw it: an upper bound).
    running: std::time::Duration,
}

fn measure(dirty_log: &str, vcpus: &str) -> Measured {
    require_kvm();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir();
    let (mem, sock) = (path(&dir, "m"), path(&dir, "sock"));
    // Paced writes over 12000 pages until stopped: a 100 ms sample of 200
    // writes sees ~1 % repeats.
    let cmdline = format!("workload=rate pages={PAGES} rate=2000 writes=100m seed={SEED}");
    // No writeback: the measurement is the only harvester, so `harvests`
    // in `stats` counts its samples.
    let extra = ["--dirty-log", dirty_log, "--vcpus", vcpus, "--no-writeback"];
    let mut vm = start_with_api(&mem, &sock, "64M", &cmdline, Stdio::piped(), true, &extra);
    progress::wait_for_writes(&mut vm, &mem, PAGES, 1);
    assert_eq!(ctl(&sock, &["pause"])["ok"], true);
    let before = progress::guest_writes(&mem, PAGES);
    let h0 = progress::harvests(&ctl(&sock, &["stats"]));
    let rate_sock = sock.clone();
    let answer = std::thread::spawn(move || ctl(&rate_sock, &["dirty-rate", "--seconds", WINDOW_S]));
    // The measurement's clean start (a harvest under the harvester's lock,
    // which `stats` takes too) happened while the guest was paused.
    progress::wait_for_stats(&mut vm, &sock, "the dirty-rate measurement to start", |s| {
        !s["job"].is_null() && progress::harvests(s) > h0
    });
    let resumed = std::time::Instant::now();
    assert_eq!(ctl(&sock, &["resume"])["ok"], true);
    progress::wait_for_writes(&mut vm, &mem, PAGES, before + 2000);
    assert_eq!(ctl(&sock, &["pause"])["ok"], true);
    let running = resumed.elapsed();
    let after = progress::guest_writes(&mem, PAGES);
    // A sample after the pause: every write of the window is counted.
    let h1 = progress::harvests(&ctl(&sock, &["stats"]));
    let s = progress::wait_for_stats(&mut vm, &sock, "a dirty-rate sample after the pause", |s| {
        progress::harvests(s) > h1 || s["job"].is_null()
    });
    if progress::harvests(&s) == h1 {
        progress::fail(&mut vm, &format!("the {WINDOW_S} s window closed before the guest was paused: {s}"));
    }
    let answer = answer.join().unwrap();
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    vm.wait().unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    let distinct: HashSet<u64> =
        guest_abi::random_sequence(SEED, PAGES).skip(before as usize).take((after - before) as usize).collect();
    Measured { answer, writes: after - before, distinct: distinct.len() as u64, running }
}

/// The measured pages (rate x window) against the guest's writes: each
/// write dirties its page and its generation-table entry; a page written
/// twice in one 100 ms sample counts once, so at least the distinct pages
/// count; the table (12 pages) and the guest's stack are dirtied again in
/// every sample the guest ran in (one per 100 ms it ran, plus the two at
/// the edges), so at most the writes plus 16 pages per such sample.
fn check(m: &Measured, what: &str, pages_per_s: f64) {
    let r = &m.answer;
    let secs = r["seconds"].as_f64().unwrap();
    let measured = (pages_per_s * secs).round() as u64;
    let samples = (m.running.as_millis() as u64 / 100 + 2).min(r["samples"].as_u64().unwrap());
    let (lo, hi) = (m.distinct, m.writes + 16 * samples);
    eprintln!(
        "{what}: measured {measured} pages; the guest wrote {} ({} distinct) in {:?}, so {lo}..={hi}",
        m.writes, m.distinct, m.running
    );
    assert!(
        (lo..=hi).contains(&measured),
        "{what}: measured {measured} pages in the window; the guest wrote {} pages ({} distinct) there, so \
         {lo}..={hi}: {r}",
        m.writes,
        m.distinct
    );
}

fn check_all(m: &Measured) {
    let r = &m.answer;
    check(m, "all vCPUs", r["pages_per_s"].as_f64().unwrap());
    let mb = r["mb_per_s"].as_f64().unwrap();
    let rate = r["pages_per_s"].as_f64().unwrap();
    assert!((mb - rate * 4096.0 / 1e6).abs() < 1e-6, "{r}");
    // The working set: the distinct pages written, plus the table and the
    // guest's own scratch pages (stack, console buffer).
    let ws = r["working_set_pages"].as_u64().unwrap();
    assert!((m.distinct..=m.distinct + 32).contains(&ws), "working set {ws} for {} distinct pages: {r}", m.distinct);
    assert!(r["samples"].as_u64().unwrap() >= 2, "{r}");
}

#[test]
fn bitmap_measures_the_guests_own_rate() {
    let m = measure("manual", "1");
    check_all(&m);
    assert_eq!(m.answer["per_vcpu"].as_array().unwrap().len(), 0, "a bitmap cannot tell vCPUs apart: {}", m.answer);
}

#[test]
fn ring_measures_the_guests_own_rate_per_vcpu() {
    let m = measure("ring", "2");
    check_all(&m);
    let r = &m.answer;
    let v = r["per_vcpu"].as_array().unwrap();
    assert_eq!(v.len(), 2, "{r}");
    // The guest writes on vCPU 0; vCPU 1 waits for a SIPI.
    check(&m, "vCPU 0", v[0]["pages_per_s"].as_f64().unwrap());
    assert_eq!(v[1]["pages_per_s"].as_f64().unwrap(), 0.0, "{r}");
}
