//! The smudge VMM: boots a PVH guest on file-backed `MAP_SHARED` RAM with
//! KVM dirty logging on. The `smudge` binary is its command-line edge; tests
//! and benchmarks use this library directly.
//!
//! No `unsafe` here: every ioctl that needs it lives in the `smudge` library.

#![forbid(unsafe_code)]

pub mod control;
pub mod migrate;
pub mod observe;
pub mod persist;
pub mod vm;
