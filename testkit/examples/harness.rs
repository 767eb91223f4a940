//! The test kit's `TestVm` at work: boots the bundled
//! guest in a `smudge run` child process, reads its dirty-log counters,
//! snapshots it (full, then a diff), continues the diff in a new process,
//! live-migrates the original to a third one, and waits for both copies of
//! the guest to verify their memory.
//!
//! ```sh
//! cargo run --release -p smudge-testkit --example harness
//! ```
//!
//! It runs the `smudge` binary found beside it (`target/release/smudge`),
//! or `SMUDGE_BIN`; under `cargo run` it builds the binary first when it is
//! missing (cargo builds a package's binaries for its tests, not for its
//! examples).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use smudge::control::MigrateRequest;
use smudge_testkit::{find_binary, scratch_dir, HarnessError, TestVm};

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("harness example failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The `smudge` binary: found by the harness, or built with the cargo
/// that runs this example (same profile).
fn smudge_binary() -> Result<PathBuf, HarnessError> {
    match find_binary() {
        Ok(p) => return Ok(p),
        Err(e) if std::env::var_os("CARGO").is_none() => return Err(e),
        Err(_) => {}
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "-p", "smudge-vmm", "--bin", "smudge"]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    eprintln!("building the smudge binary: {build:?}");
    let status = build.status().map_err(|source| HarnessError::Spawn { what: format!("{build:?}"), source })?;
    if !status.success() {
        eprintln!("{build:?} failed: {status}");
    }
    find_binary()
}

/// Runs the demonstration; `Ok(false)` if a guest did not verify.
fn run() -> Result<bool, HarnessError> {
    let t0 = Instant::now();
    let bin = smudge_binary()?;
    let builder = TestVm::builder().binary(&bin).timeout(Duration::from_secs(60));
    let snaps = scratch_dir("example-snapshots")?;

    // A guest stamping 30000 random pages of 3000, 3000 a second (about
    // 10 s of running: it counts writes, so time spent paused is not
    // lost), then checking every page holds what it last wrote there.
    let vm = builder
        .clone()
        .mem(64 << 20)
        .vcpus(1)
        .workload("workload=rate pages=3000 writes=30000 rate=3000 seed=9 verify=1")
        .dirty_log("manual")
        .boot()?;
    println!("booted {} (pid {}), memory in {}", bin.display(), vm.pid(), vm.mem_path().display());
    println!("guest: {}", vm.wait_for_serial("layout:", Duration::from_secs(60))?);

    // Held while the harness looks and snapshots, the guest cannot reach
    // its end before the migration below.
    let p = vm.pause()?;
    println!("paused {} vCPU(s) in {:.2} ms", p["vcpus"], p["ms"].as_f64().unwrap_or(0.0));
    let s = vm.stats()?;
    println!(
        "stats: mechanism {}, {} harvests, {} guest pages dirtied, {} pages written back",
        s["dirty_log"]["mechanism"].as_str().unwrap_or("?"),
        s["dirty_log"]["harvests"],
        s["dirty_log"]["guest_pages"],
        s["writeback"]["nr_written"]
    );
    let full = vm.snapshot_with(&snaps.path().join("full"), None, false)?;
    println!(
        "full snapshot: {} bytes, guest paused {:.2} ms",
        full["memory_bytes"],
        full["pause_ms"].as_f64().unwrap_or(0.0)
    );

    // Running again until the dirty log has seen its next writes, which the
    // diff then holds.
    let seen = |s: &serde_json::Value| s["dirty_log"]["guest_pages"].as_u64().unwrap_or(0);
    let before = seen(&vm.stats()?);
    vm.resume()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen(&vm.stats()?) == before {
        if Instant::now() > deadline {
            eprintln!("the guest dirtied no page in 60 s after the resume\n{}", vm.logs());
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let diff = vm.snapshot_with(&snaps.path().join("d1"), Some(&snaps.path().join("full")), false)?;
    println!(
        "diff snapshot: {} bytes, guest paused {:.2} ms",
        diff["memory_bytes"],
        diff["pause_ms"].as_f64().unwrap_or(0.0)
    );

    // The diff continues in a new process on a new memory file.
    let restored = builder.clone().restore(snaps.path().join("d1"))?;
    println!("restored the diff in pid {}", restored.pid());

    // The original moves to a migrate-recv in another process, running.
    let dest = builder.clone().incoming()?;
    vm.resume()?;
    let report = vm.migrate_to_with(&dest, |m| MigrateRequest { verify_memory: true, ..m })?;
    println!(
        "migrated to {} in {:.1} ms, downtime {:.2} ms, {} rounds",
        dest.migration_addr().unwrap_or_default(),
        report["total_ms"].as_f64().unwrap_or(0.0),
        report["downtime_ms"].as_f64().unwrap_or(0.0),
        report["rounds"].as_array().map_or(0, Vec::len)
    );
    let src = vm.wait_exit(Duration::from_secs(60))?;
    println!("source exited with {:?}", src.code);

    let mut ok = true;
    for (name, v) in [("restored", &restored), ("migrated", &dest)] {
        let exit = v.wait_exit(Duration::from_secs(60))?;
        let verify = exit.line("verify:").unwrap_or("(no verify line)");
        println!("{name}: exit code {:?}, {verify}", exit.code);
        ok &= exit.success() && verify.ends_with("mismatches=0");
    }
    // Guest RAM of the migrated guest, straight from its memory file: the
    // state header the workload leaves at STATE_BASE.
    let b = dest.read_memory(guest_abi::STATE_BASE, 40)?;
    let w: [u64; 5] = std::array::from_fn(|i| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or_default()));
    match guest_abi::StateHeader::from_words(w) {
        Some(h) => println!("destination RAM: {} pages at {:#x}, {} writes in all", h.pages, h.ws_base, h.writes),
        None => {
            println!("destination RAM: no valid state header");
            ok = false;
        }
    }
    println!("done in {:.1} s: {}", t0.elapsed().as_secs_f64(), if ok { "all verified" } else { "FAILED" });
    Ok(ok)
}
