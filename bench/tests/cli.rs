//! The `smudge-bench` command line (what `smudge bench` runs): a benchmark
//! it does not know is refused, naming the ones it does, with smudge's
//! setup-error exit code. (Being an integration test of this package, it
//! also has cargo build the `smudge-bench` binary with the others.)

use std::process::Command;

#[test]
fn an_unknown_benchmark_is_refused_naming_the_known_ones() {
    let out = Command::new(env!("CARGO_BIN_EXE_smudge-bench")).args(["nonsense", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(100), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "smudge: error: unknown benchmark 'nonsense' (available: boot, harvest, writeback, snapshot, migrate, \
         reliability, durable, durable-parts)\n"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
}

/// Without the peers' binaries (neither variable set, neither program on
/// `PATH`), `boot` still succeeds: their rows say "not found", with no
/// value, and no goal names them.
#[test]
fn without_the_peers_boot_says_not_found_and_succeeds() {
    smudge_testkit::require_kvm();
    let bench = std::path::Path::new(env!("CARGO_BIN_EXE_smudge-bench"));
    let smudge = bench.with_file_name("smudge");
    assert!(smudge.is_file(), "{} is missing: build it first (cargo build --release --all-targets)", smudge.display());
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        std::env::split_paths(&path)
            .filter(|d| !d.join("firecracker").is_file() && !d.join("cloud-hypervisor").is_file()),
    )
    .unwrap();
    let out = Command::new(bench)
        .args(["boot", "--quick", "--json", "--runs", "1"])
        .env_remove("SMUDGE_FIRECRACKER")
        .env_remove("SMUDGE_CLOUD_HYPERVISOR")
        .env("PATH", path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for peer in ["Firecracker", "Cloud Hypervisor"] {
        let rows: Vec<_> =
            v["results"].as_array().unwrap().iter().filter(|r| r["case"].as_str().unwrap().starts_with(peer)).collect();
        assert_eq!(rows.len(), 1, "{peer}: {v}");
        assert_eq!(rows[0]["value"], serde_json::Value::Null, "{peer}: {v}");
        assert_eq!(rows[0]["note"], "not found", "{peer}: {v}");
        assert!(
            !v["goals"].as_array().unwrap().iter().any(|g| g["name"].as_str().unwrap().contains(peer)),
            "{peer}: {v}"
        );
    }
}
