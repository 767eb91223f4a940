//! Builds the tiny guest (`../guest`) for the host target with its own flags
//! and linker script, and hands its path to the VMM as `GUEST_ELF`.
//!
//! The guest is a separate cargo workspace: its `.cargo/config.toml` is read
//! from its own directory, it gets its own target dir (else this inner cargo
//! waits on the outer build's lock), and the outer build's flag variables
//! are removed (else the guest's rustflags are silently dropped).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guest_dir = manifest.join("../guest");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = out.join("guest-target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    let status = Command::new(cargo)
        .current_dir(&guest_dir)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_MAKEFLAGS")
        .status()
        .expect("cannot run cargo to build the guest");
    assert!(status.success(), "building the guest in {} failed", guest_dir.display());

    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/smudge-guest");
    println!("cargo:rustc-env=GUEST_ELF={}", elf.display());
    for p in ["src", "Cargo.toml", "Cargo.lock", "build.rs", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(p).display());
    }
    println!("cargo:rerun-if-changed={}", manifest.join("../guest-abi/src").display());
    println!("cargo:rerun-if-changed={}", manifest.join("../resources/guest.ld").display());
}
