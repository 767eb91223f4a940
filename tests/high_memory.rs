//! The guest's working-set layout. Guest RAM on both sides of the 32-bit
//! hole: a working set placed across the end of low RAM (3 GiB) continues
//! at 4 GiB, in the second KVM slot and the second part of the memory file.
//! Its pages survive a snapshot chain (full, then diff, restored) and a live
//! migration; every copy's bytes are exactly what replaying the guest's
//! seeded writes predicts, and the guest's own `verify` passes. And a
//! `verify` asked for another layout than memory holds refuses, naming both.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use guest_abi::{gen_table_addr, random_sequence, RamMap, WsLayout, PAGE_SIZE};
use smudge_testkit::{assert_stamps_in, boot, path, random_generations, require_kvm, tmpdir};
use smudge_testkit::{TestVm, TestVmBuilder};

/// Low RAM (3 GiB) and 64 MiB above the hole.
const MEM: u64 = (3 << 30) + (64 << 20);
/// 512 pages below the hole, the rest above it.
const WS_BASE: u64 = 0xbfe0_0000;
const PAGES: u64 = 1024;
/// Paced writes: the guest cannot finish before the test has paused it
/// (20000 writes at 2000 a second take at least 10 s, whatever the load).
const WRITES: u64 = 20_000;
const RATE: u64 = 2000;
/// Writes the test waits to see before each snapshot.
const STEP: u64 = 1500;

fn builder() -> TestVmBuilder {
    require_kvm();
    TestVm::builder()
        .binary(env!("CARGO_BIN_EXE_smudge"))
        .timeout(Duration::from_secs(120))
        .api_timeout(Duration::from_secs(120))
        .boot_timeout(Duration::from_secs(60))
}

fn cmdline(seed: u64) -> String {
    format!("workload=rate rate={RATE} writes={WRITES} pages={PAGES} ws_base={WS_BASE:#x} seed={seed} verify=1")
}

fn layout() -> WsLayout {
    WsLayout::new(&RamMap::for_mem_size(MEM), Some(WS_BASE), PAGES).expect("the working set fits")
}

/// The generation table as `read(gpa, len)` finds it.
fn table(read: &dyn Fn(u64, usize) -> Vec<u8>) -> Vec<u64> {
    read(gen_table_addr(0), PAGES as usize * 4)
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64)
        .collect()
}

/// Reads guest RAM from a memory file (or an image in its layout).
fn file_reader(file: &Path) -> impl Fn(u64, usize) -> Vec<u8> {
    let f = std::fs::File::open(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let regions = smudge::memory::ram_layout(MEM);
    move |gpa, len| {
        let off = smudge::memory::gpa_to_file_offset(&regions, gpa).expect("RAM");
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off).expect("read the memory file");
        buf
    }
}

/// Checks memory that `read` gives as one point in the guest's run: the
/// table holds exactly the generations the first `n` seeded writes give
/// (`n` = the sum of the table), and every page holds its stamp (the
/// page of write `n` may be half stamped when `running`). Returns `n`.
fn assert_replayed(what: &str, seed: u64, read: &dyn Fn(u64, usize) -> Vec<u8>, running: bool) -> u64 {
    let gens = table(read);
    let n: u64 = gens.iter().sum();
    assert_eq!(gens, random_generations(seed, PAGES, n as usize), "{what}: table is not the replay of {n} writes");
    let l = layout();
    let low = l.low_pages() as usize;
    assert_eq!(low, 512, "the working set straddles the hole");
    assert!(
        gens[..low].iter().any(|&g| g > 0) && gens[low..].iter().any(|&g| g > 0),
        "{what}: {n} writes stamped no page on one side of the hole: the test proves nothing"
    );
    let in_flight = (running && n > 0).then(|| random_sequence(seed, PAGES).nth(n as usize - 1).unwrap_or(0) as usize);
    assert_stamps_in(&l, &gens, in_flight, |gpa| read(gpa, PAGE_SIZE as usize));
    n
}

/// Waits until the guest's table records at least `n` writes.
fn wait_for_writes(vm: &TestVm, n: u64) -> u64 {
    let t0 = Instant::now();
    loop {
        let done: u64 = table(&|gpa, len| vm.read_memory(gpa, len).unwrap()).iter().sum();
        if done >= n {
            return done;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "waited 60 s for the guest to make {n} writes; it made {done}\n{}",
            vm.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest finished every write and its own verify passed.
fn assert_finished(vm: &TestVm, seed: u64) {
    let exit = vm.wait_exit(Duration::from_secs(120)).unwrap();
    assert_eq!(exit.code, Some(0), "{exit}");
    let v = exit.line("verify: ").unwrap_or_else(|| panic!("no verify line\n{exit}"));
    assert!(v.starts_with(&format!("verify: pages={PAGES} ok={PAGES} ")) && v.ends_with(" mismatches=0"), "{exit}");
    let n = assert_replayed("memory after the run", seed, &|gpa, len| vm.read_memory(gpa, len).unwrap(), false);
    assert_eq!(n, WRITES, "the guest made every write");
}

#[test]
fn the_layout_line_shows_the_working_set_across_the_hole() {
    let l = layout();
    assert_eq!(l.page_addr(511), 0xbfff_f000);
    assert_eq!(l.page_addr(512), 0x1_0000_0000);
    let vm = builder()
        .mem(MEM)
        .workload(format!("workload=seq pages={PAGES} ws_base={WS_BASE:#x} verify=1"))
        .boot()
        .unwrap();
    let exit = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(exit.code, Some(0), "{exit}");
    let line = exit.line("layout:").unwrap_or_else(|| panic!("no layout line\n{exit}"));
    assert!(line.contains(&format!("ws={WS_BASE:#x}+{PAGES} pages low_pages=512")), "{exit}");
    assert!(line.contains("high_pages=16384"), "{exit}");
    // One sequential pass: generation 1 everywhere, on both sides.
    let gens = vec![1; PAGES as usize];
    assert_stamps_in(&l, &gens, None, |gpa| vm.read_memory(gpa, PAGE_SIZE as usize).unwrap());
    // The high half lies where the file keeps RAM above 4 GiB: right after
    // low RAM.
    let head = file_reader(vm.mem_path())(0x1_0000_0000, 8);
    let mut raw = [0u8; 8];
    std::fs::File::open(vm.mem_path()).unwrap().read_exact_at(&mut raw, 3 << 30).unwrap();
    assert_eq!((u64::from_le_bytes(raw), head), (0x10_0000, 0x10_0000u64.to_le_bytes().to_vec()));
}

#[test]
fn pages_above_the_hole_survive_a_snapshot_chain() {
    const SEED: u64 = 11;
    let snaps = tempfile::tempdir().unwrap();
    let (full, diff, chain) = (snaps.path().join("full"), snaps.path().join("diff"), snaps.path().join("chain.mem"));
    let vm = builder().mem(MEM).workload(cmdline(SEED)).boot().unwrap();

    // Full snapshot, taken paused at a point the guest has reached.
    wait_for_writes(&vm, STEP);
    vm.pause().unwrap();
    let s = vm.snapshot(&full).unwrap();
    assert_eq!(s["kind"], "full", "{s}");
    vm.resume().unwrap();
    let n1 = assert_replayed("full snapshot", SEED, &file_reader(&full.join("memory.img")), true);
    assert!((STEP..WRITES).contains(&n1), "full snapshot after {n1} writes");

    // A diff on top, after as many writes again; the guest stays stopped
    // there.
    wait_for_writes(&vm, n1 + STEP);
    vm.pause().unwrap();
    let d = vm.snapshot_with(&diff, Some(&full), false).unwrap();
    assert_eq!(d["kind"], "diff", "{d}");
    vm.stop().unwrap();
    vm.wait_exit(Duration::from_secs(60)).unwrap();
    smudge::snapshot::materialize(&diff, &chain).unwrap();
    let n2 = assert_replayed("the chain full + diff", SEED, &file_reader(&chain), true);
    assert!(n2 >= n1 + STEP && n2 < WRITES, "diff snapshot after {n2} writes (full: {n1})");
    let stopped = assert_replayed("the stopped guest's memory", SEED, &file_reader(vm.mem_path()), true);
    assert_eq!(stopped, n2, "the guest stopped where the diff was taken");

    // Restored from the chain, the guest makes its remaining writes.
    let restored = builder().restore(&diff).unwrap();
    assert_finished(&restored, SEED);
}

#[test]
fn pages_above_the_hole_survive_a_live_migration() {
    const SEED: u64 = 12;
    let vm = builder().mem(MEM).workload(cmdline(SEED)).boot().unwrap();
    let dest = builder().incoming().unwrap();
    wait_for_writes(&vm, STEP);
    let report = vm.migrate_to(&dest).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_finished(&dest, SEED);
}

#[test]
fn verify_refuses_another_layout_than_memory_holds() {
    let dir = tmpdir();
    let mem = path(&dir, "m");
    let wrote = boot(&mem, "64M", "workload=seq pages=300");
    assert_eq!(wrote.code, 0, "{wrote:?}");
    for (asks, ws) in [("pages=200", "ws=0x400000+200 pages"), ("pages=300 ws_base=0x800000", "ws=0x800000+300 pages")]
    {
        let r = boot(&mem, "64M", &format!("workload=verify {asks}"));
        assert_eq!(r.code, i32::from(guest_abi::status::LAYOUT_MISMATCH), "{r:?}");
        let want = format!(
            "error: verify: memory holds the working set ws=0x400000+300 pages, this run asks for {ws}; \
             verify with the pages= (and ws_base=) that wrote it"
        );
        assert!(r.stdout.lines().any(|l| l == want), "no line {want:?}\n{r:?}");
        assert!(r.line("verify:").is_none(), "nothing was verified: {r:?}");
    }
    // The refusals changed nothing: the layout that wrote memory verifies.
    let r = boot(&mem, "64M", "workload=verify pages=300");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.line("verify:"), Some("verify: pages=300 ok=300 stamped=300 mismatches=0"), "{r:?}");
}

#[test]
fn wipe_clears_the_working_set_on_both_sides_of_the_hole() {
    let dir = tmpdir();
    let mem = path(&dir, "m");
    let size = format!("{}M", MEM >> 20);
    let ws = format!("pages={PAGES} ws_base={WS_BASE:#x}");
    let wrote = boot(&mem, &size, &format!("workload=seq {ws}"));
    assert_eq!(wrote.code, 0, "{wrote:?}");
    let read = file_reader(&mem);
    assert_stamps_in(&layout(), &vec![1; PAGES as usize], None, |gpa| read(gpa, PAGE_SIZE as usize));
    let wiped = boot(&mem, &size, &format!("workload=verify wipe=1 {ws}"));
    assert_eq!(wiped.code, 0, "{wiped:?}");
    assert_eq!(wiped.line("verify:"), Some(&*format!("verify: pages={PAGES} ok={PAGES} stamped=0 mismatches=0")));
    assert_stamps_in(&layout(), &vec![0; PAGES as usize], None, |gpa| read(gpa, PAGE_SIZE as usize));
}
