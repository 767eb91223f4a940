//! Where a running guest is, read from the guest itself, so a test waits
//! for a state instead of sleeping: the generation table the workload
//! keeps in its own memory (the memory file is `MAP_SHARED`, so the file
//! is guest RAM) and the VMM's `stats`. Every wait has a generous limit and
//! its failure shows what it waited for, the guest's serial output and
//! smudge's stderr.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Child;

use guest_abi::gen_table_addr;

use crate::process::{wait_until, WaitError};
pub use crate::WAIT;

/// The generation table of a working set of `pages` pages as the memory
/// file holds it now (one `u32` per page: how often it was written).
pub fn generations(mem: &Path, pages: u64) -> Vec<u32> {
    try_generations(mem, pages).unwrap_or_else(|e| panic!("{}: generation table: {e}", mem.display()))
}

/// [`generations`], or why the file does not hold the table (yet: smudge
/// makes and sizes the memory file while it starts).
fn try_generations(mem: &Path, pages: u64) -> std::io::Result<Vec<u32>> {
    let f = std::fs::File::open(mem)?;
    let mut buf = vec![0u8; pages as usize * 4];
    // Below 3 GiB a guest address is its file offset.
    f.read_exact_at(&mut buf, gen_table_addr(0))?;
    Ok(buf.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// The page writes the guest's workloads made on this memory so far (a
/// write under way when the guest was stopped counts: the table is
/// written first).
pub fn guest_writes(mem: &Path, pages: u64) -> u64 {
    generations(mem, pages).iter().map(|&g| u64::from(g)).sum()
}

/// Working-set pages written at least once.
pub fn stamped_pages(mem: &Path, pages: u64) -> u64 {
    generations(mem, pages).iter().filter(|&&g| g > 0).count() as u64
}

/// Kills `vm` (if it still runs) and panics with `what` and everything it
/// printed (its stdout and stderr, if they were piped).
pub fn fail(vm: &mut Child, what: &str) -> ! {
    let _ = vm.kill();
    let _ = vm.wait();
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = vm.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = vm.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    panic!("{what}\n--- guest serial output ---\n{out}\n--- smudge stderr ---\n{err}");
}

/// Waits until `f` returns something (at most [`WAIT`]); fails with
/// `what` and `vm`'s output otherwise, or if `vm` exits first.
pub fn wait_for<T>(vm: &mut Child, what: &str, f: impl FnMut() -> Option<T>) -> T {
    match wait_until(WAIT, || vm.try_wait().ok().flatten(), f) {
        Ok(v) => v,
        Err(WaitError::Exited(s)) => fail(vm, &format!("smudge exited ({s}) while the test waited for {what}")),
        Err(WaitError::TimedOut(after)) => fail(vm, &format!("timed out after {after:?} waiting for {what}")),
    }
}

/// Waits until the guest has made at least `n` page writes (all boots on
/// this memory file) over its `pages`-page working set; returns the count.
pub fn wait_for_writes(vm: &mut Child, mem: &Path, pages: u64, n: u64) -> u64 {
    wait_for(vm, &format!("the guest to make {n} page writes"), || {
        let w: u64 = try_generations(mem, pages).ok()?.iter().map(|&g| u64::from(g)).sum();
        (w >= n).then_some(w)
    })
}

/// Waits until `stats` answers something `ok` holds for; returns it.
pub fn wait_for_stats(
    vm: &mut Child,
    sock: &Path,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(vm, what, || {
        let s = crate::ctl(sock, &["stats"]);
        ok(&s).then_some(s)
    })
}

/// Waits until the vCPUs are paused (`--test-pause-at-sync N`: the guest
/// reached its sync point N).
pub fn wait_paused(vm: &mut Child, sock: &Path) -> serde_json::Value {
    wait_for_stats(vm, sock, "the guest to be paused at its sync point", |s| s["paused"] == true)
}

/// The harvests the VMM has made so far (`stats`).
pub fn harvests(stats: &serde_json::Value) -> u64 {
    stats["dirty_log"]["harvests"].as_u64().unwrap_or_else(|| panic!("no dirty_log.harvests in {stats}"))
}

/// Whether a page's stamp words (`head`, `tail`) each hold either
/// generation `g`'s word or generation `g - 1`'s (zero for 0): a stamp the
/// guest was cut off in the middle of writing, word by word.
fn torn_between(pfn: u64, g: u64, head: [u64; 4], tail: u64) -> bool {
    let words = |g: u64| {
        if g == 0 {
            return [0; 5];
        }
        let w = guest_abi::stamp_words(pfn, g);
        [w[0], w[1], w[2], w[3], w[2]]
    };
    let (new, old) = (words(g), words(g - 1));
    let got = [head[0], head[1], head[2], head[3], tail];
    got.iter().zip(new.iter().zip(old.iter())).all(|(got, (n, o))| got == n || got == o)
}

/// Checks every working-set page of `mem` against the guest's own
/// generation table (both read from the file): each page holds the stamp
/// of the generation its entry names, or is zero if never written. A guest
/// stopped at an arbitrary instruction may have cut one write in half: it
/// updates the table first, then the page, so at most one page may still
/// hold the generation before, or a mix of its words and the new ones. Returns how many pages are stamped.
pub fn assert_pages_match_table(mem: &Path, pages: u64) -> u64 {
    let gens = generations(mem, pages);
    let f = std::fs::File::open(mem).unwrap();
    let base = guest_abi::ws_base_for(pages);
    let mut page = vec![0u8; guest_abi::PAGE_SIZE as usize];
    let word = |p: &[u8], at: usize| u64::from_le_bytes(p[at..at + 8].try_into().unwrap());
    let mut in_flight = Vec::new();
    for (i, &g) in gens.iter().enumerate() {
        let gpa = base + i as u64 * guest_abi::PAGE_SIZE;
        f.read_exact_at(&mut page, gpa).unwrap();
        let head = [word(&page, 0), word(&page, 8), word(&page, 16), word(&page, 24)];
        let tail = word(&page, 4088);
        match guest_abi::check_page(gpa >> 12, u64::from(g), head, tail) {
            guest_abi::PageCheck::Ok => {}
            other if g > 0 && torn_between(gpa >> 12, u64::from(g), head, tail) => in_flight.push((i, other)),
            other => panic!("page {i} (gpa {gpa:#x}) does not hold generation {g}: {other:?}"),
        }
    }
    assert!(in_flight.len() <= 1, "more than one page lags its generation (lost writes): {in_flight:?}");
    gens.iter().filter(|&&g| g > 0).count() as u64
}

/// Restores `snap` into a new process on `mem`, waits until the restored
/// guest has made 100 page writes more than it had at the snapshot (it
/// carries on from there), stops it, and checks every page of the memory
/// it left against its generation table ([`assert_pages_match_table`]).
/// For guests whose workload does not end by itself. Returns the restored
/// run.
pub fn restore_carries_on(snap: &Path, mem: &Path, pages: u64) -> crate::Run {
    let sock = mem.with_extension("sock");
    let mut cmd = crate::smudge();
    cmd.args(["restore", "--snapshot", snap.to_str().unwrap(), "--mem-file", mem.to_str().unwrap()])
        .args(["--api-sock", sock.to_str().unwrap(), "--timeout", "120"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut vm = crate::spawn_with_api(&mut cmd, &sock, WAIT)
        .unwrap_or_else(|e| panic!("the restored VM: {}", crate::vm::error_chain(&e)));
    // The memory is all in once the socket is up (an eager restore).
    let start = guest_writes(mem, pages);
    wait_for_writes(&mut vm, mem, pages, start + 100);
    let stopped = crate::ctl(&sock, &["stop"]);
    if stopped["ok"] != true {
        fail(&mut vm, &format!("stop: {stopped}"));
    }
    let r = crate::Run::from(vm.wait_with_output().unwrap());
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stdout.contains(guest_abi::BANNER), "the restored guest booted again: {r:?}");
    assert_pages_match_table(mem, pages);
    r
}
