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
         reliability)\n"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
}
