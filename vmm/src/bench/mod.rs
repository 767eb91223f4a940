//! Benchmarks (`smudge bench <name>`): a table, or with `--json` one object of raw `results` and `goals` (ratios measured side by side in the same run).

pub mod boot;
pub mod harvest;
pub mod migrate;
pub mod qemu_migrate;
pub mod reliability;
pub mod report;
pub mod snapshot;
pub mod writeback;
