//! The writeback engine under a real guest: durability after a
//! sync checked with the kernel's own `cachestat(2)`, the expiry bound, a
//! sync that ends while the guest dirties faster than the disk, and
//! throttling above the hard limit.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use smudge_testkit::*;

/// `cachestat(2)` of a whole file: (pages cached, dirty, under writeback).
fn cachestat(path: &std::path::Path) -> (u64, u64, u64) {
    let f = std::fs::File::open(path).unwrap();
    let range = [0u64, 0u64]; // offset 0, length 0: the whole file
    let mut out = [0u64; 5];
    // SAFETY: syscall 451 (cachestat) reads `range` and writes five u64s
    // into `out`; both outlive the call.
    let r = unsafe { libc::syscall(451, f.as_raw_fd(), range.as_ptr(), out.as_mut_ptr(), 0) };
    assert_eq!(r, 0, "cachestat failed: {} (Linux >= 6.5 needed)", std::io::Error::last_os_error());
    (out[0], out[1], out[2])
}

/// Every `key=NUMBER` value in the stats lines of `stderr`.
fn stat_values(stderr: &str, key: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter(|l| l.starts_with("smudge: stats:"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(key)))
        .filter_map(|v| v.trim_end_matches(';').parse().ok())
        .collect()
}

#[test]
fn after_sync_the_kernel_reports_nothing_dirty_and_the_file_holds_memory() {
    let dir = tmpdir();
    let (pages, seed, writes) = (8000u64, 2u64, 8000usize);
    let cmd = format!("workload=random pages={pages} seed={seed} writes={writes}");
    // Without smudge's writeback the host leaves the file dirty for ~30 s
    // (dirty_expire_centisecs): the check below means something.
    let lazy = path(&dir, "lazy");
    let r =
        run_smudge(&["--mem-file", lazy.to_str().unwrap(), "--mem-size", "64M", "--no-writeback", "--cmdline", &cmd]);
    assert_eq!(r.code, 0, "{r:?}");
    let (_, dirty, _) = cachestat(&lazy);
    assert!(dirty > 1000, "expected the host to hold dirty pages, cachestat says {dirty}");

    let mem = path(&dir, "m");
    let r = run_smudge(&["--in-place", "--mem-file", mem.to_str().unwrap(), "--mem-size", "64M", "--cmdline", &cmd]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("final sync wrote"), "{r:?}");
    let (cached, dirty, writeback) = cachestat(&mem);
    assert_eq!((dirty, writeback), (0, 0), "after the final sync ({cached} pages cached)");
    assert_stamps(&std::fs::read(&mem).unwrap(), pages, &random_generations(seed, pages, writes));
}

#[test]
fn no_page_stays_dirty_past_expiry_plus_period() {
    let dir = tmpdir();
    let (mem, sock) = (path(&dir, "m"), path(&dir, "api.sock"));
    let (expire, period) = (300u64, 100u64);
    // The guest writes for 2 s, then idles until stopped.
    let mut child = smudge()
        .args(["run", "--in-place", "--mem-file", mem.to_str().unwrap(), "--mem-size", "128M", "--timeout", "120"])
        .args(["--api-sock", sock.to_str().unwrap()])
        .args(["--dirty-expire-ms", &expire.to_string(), "--dirty-writeback-ms", &period.to_string()])
        .args(["--dirty-background", "100%", "--dirty-limit", "100%", "--stats-interval", "0.1"])
        .args(["--cmdline", "workload=rate rate=4000 ms=2000 pages=20000 linger=600000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut samples = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        if line.starts_with("lingering") {
            // The guest stopped writing: from then on the kernel must see
            // every page of the file clean within expire + the flusher's
            // gap between passes + a pass (read from smudge's stats below).
            let t0 = Instant::now();
            loop {
                let c = cachestat(&mem);
                samples.push((t0.elapsed(), c));
                if (c.1, c.2) == (0, 0) || t0.elapsed() > Duration::from_secs(30) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            break;
        }
    }
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let (clean_after, (_, dirty, wb)) = samples.last().copied().expect("guest never lingered");
    assert_eq!((dirty, wb), (0, 0), "pages still dirty 30 s after the guest stopped writing: {samples:?}");
    // The engine's own view: pages were dirty (and aged), and the oldest
    // dirty page is never older than expire + the longest gap between two
    // flush passes + the longest pass (+ a stats tick of slack).
    assert!(stat_values(&stderr, "nr_dirty=").iter().any(|&d| d > 0), "nothing was ever dirty: {stderr}");
    let ages = stat_values(&stderr, "oldest_dirty_ms=");
    assert!(ages.len() >= 10, "too few stats samples: {stderr}");
    let worst = *ages.iter().max().unwrap();
    let pass = *stat_values(&stderr, "max_pass_ms=").iter().max().unwrap();
    let gap = *stat_values(&stderr, "max_flush_gap_ms=").iter().max().unwrap();
    assert!(gap >= period, "flush passes {gap} ms apart, the period is {period} ms");
    assert!(
        worst <= expire + gap + pass + 50,
        "a page stayed dirty {worst} ms (passes {gap} ms apart, longest {pass} ms): {ages:?}"
    );
    assert!(worst >= expire / 2, "pages never aged ({ages:?}): expiry not exercised");
    let bound = Duration::from_millis(expire + gap + pass + 400);
    assert!(clean_after <= bound, "the file was clean only {clean_after:?} after the writes ({bound:?}): {samples:?}");
}

#[test]
fn sync_ends_while_the_guest_dirties_faster_than_the_disk() {
    let dir = tmpdir();
    let (mem, sock) = (path(&dir, "m"), path(&dir, "api.sock"));
    let pages = 40000;
    // A first run stamps every page.
    let first = boot(&mem, "256M", "workload=seq pages=40000");
    assert_eq!(first.code, 0, "{first:?}");
    // Then sequential sweeps, until stopped, rewrite pages far faster than
    // they can be written out; every 200 ms a full sync must still finish.
    let cmdline = "workload=seq pages=40000 passes=100m";
    let mut vm = start_with_api(&mem, &sock, "256M", cmdline, Stdio::piped(), true, &["--sync-every-ms", "200"]);
    progress::wait_for_writes(&mut vm, &mem, pages, pages + 1);
    progress::wait_for_stats(&mut vm, &sock, "five completed syncs", |s| {
        s["writeback"]["syncs"].as_u64().unwrap_or(0) >= 5
    });
    // The guest was sweeping all along: it still is.
    let w = progress::guest_writes(&mem, pages);
    progress::wait_for_writes(&mut vm, &mem, pages, w + pages);
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    let out = vm.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // Every page as the guest last wrote it.
    assert_eq!(progress::assert_pages_match_table(&mem, pages), pages);
}

#[test]
fn above_the_hard_limit_the_vcpus_are_throttled_and_dirty_memory_stays_bounded() {
    let dir = tmpdir();
    // Three sweeps of 40000 pages (160 MiB each): nothing is written back
    // before the end (no expiry, no background writeback) unless the
    // hard limit makes it.
    let run = |limit: &str, name: &str| {
        run_smudge(&[
            "--in-place",
            "--mem-file",
            path(&dir, name).to_str().unwrap(),
            "--mem-size",
            "256M",
            "--dirty-expire-ms",
            "60000",
            "--dirty-background",
            "100%",
            "--dirty-limit",
            limit,
            "--dirty-writeback-ms",
            "50",
            "--stats-interval",
            "0.05",
            "--cmdline",
            "workload=seq pages=40000 passes=3",
        ])
    };
    let free = run("100%", "free");
    assert_eq!(free.code, 0, "{free:?}");
    // Unthrottled, every page the guest dirtied waits for the final sync.
    let final_sync = summary_number(&free.stderr, "final sync wrote ");
    assert!(final_sync >= 40000, "unthrottled, the final sync should write all 40000 pages: {final_sync}: {free:?}");
    assert_eq!(summary_number(&free.stderr, " ms in "), 0, "{free:?}");

    let held = run("16M", "held");
    assert_eq!(held.code, 0, "{held:?}");
    let samples = stat_values(&held.stderr, "nr_dirty=");
    let held_max = samples.iter().copied().max().unwrap_or(0);
    // The flusher's own count of throttle slices: how long the vCPUs then
    // waited depends on when they next left KVM_RUN.
    let slices = summary_number(&held.stderr, " ms in ");
    assert!(slices > 0, "never throttled: {}", held.stderr);
    // 16 MiB = 4096 pages, plus what the guest dirties between two
    // flusher ticks: far from the 40000 it dirties unthrottled.
    assert!(held_max < 20000, "dirty memory not bounded: max {held_max} pages ({samples:?})");
    let final_sync = summary_number(&held.stderr, "final sync wrote ");
    assert!(final_sync < 20000, "held, the final sync wrote {final_sync} pages: {}", held.stderr);
}

/// The number right after `key` in the last line of `stderr` holding it
/// (smudge's summary line).
fn summary_number(stderr: &str, key: &str) -> u64 {
    let line = stderr.lines().rfind(|l| l.contains(key)).unwrap_or_else(|| panic!("no '{key}' in {stderr}"));
    let rest = &line[line.rfind(key).unwrap() + key.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|e| panic!("no number after '{key}' in {line}: {e}"))
}
