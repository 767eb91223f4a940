//! Benchmarks (`smudge bench <name>`), reported per ../shared/BENCH.md.

pub mod boot;
pub mod harvest;
pub mod migrate;
pub mod qemu_migrate;
pub mod reliability;
pub mod report;
pub mod snapshot;
pub mod writeback;
