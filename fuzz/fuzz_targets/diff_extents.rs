//! Fuzzes the diff snapshots' extent-table parser:
//! `smudge::snapshot::parse_extents` is what a restore or a merge runs on a
//! diff's `extents.json` before it copies `memory.diff` into guest RAM.
//!
//! Input: RAM size (u64, little-endian), `memory.diff` length (u64,
//! little-endian), then the `extents.json` bytes. The table is parsed with
//! those two sizes, and again with the length its extents add up to (so
//! mutated tables get past the length check). Every result is checked
//! against a reference: accepted exactly when the extents are in order,
//! disjoint, inside RAM and add up to the data length.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use smudge::snapshot::parse_extents;

const FILE: &str = "snap/extents.json";

/// Whether `extents` are what a restore may apply: in order, disjoint,
/// inside `mem_size` bytes, adding up to `data_len`.
fn valid(extents: &[(u64, u64)], mem_size: u64, data_len: u64) -> bool {
    let mut end = 0u64;
    let mut total = 0u128;
    for &(off, len) in extents {
        let e = off as u128 + len as u128;
        if off < end || e > mem_size as u128 {
            return false;
        }
        end = e as u64;
        total += len as u128;
    }
    total == data_len as u128
}

fn check(json: &[u8], mem_size: u64, data_len: u64) {
    let got = parse_extents(json, mem_size, data_len, Path::new(FILE));
    let raw = serde_json::from_slice::<Vec<(u64, u64)>>(json);
    match (got, raw) {
        (Ok(ext), Ok(raw)) => {
            assert_eq!(ext, raw);
            assert!(valid(&ext, mem_size, data_len), "accepted a bad table for {mem_size:#x}/{data_len:#x}");
        }
        (Err(e), raw) => {
            let msg = e.to_string();
            assert!(msg.starts_with(FILE), "error does not name the file: {msg}");
            if let Ok(raw) = raw {
                assert!(
                    !valid(&raw, mem_size, data_len),
                    "refused a good table for {mem_size:#x}/{data_len:#x}: {msg}"
                );
            }
        }
        (Ok(ext), Err(e)) => panic!("accepted {ext:?}, which is not a JSON extent table: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((sizes, json)) = data.split_first_chunk::<16>() else { return };
    let mem_size = u64::from_le_bytes(sizes[..8].try_into().unwrap());
    let data_len = u64::from_le_bytes(sizes[8..].try_into().unwrap());
    check(json, mem_size, data_len);
    if let Ok(raw) = serde_json::from_slice::<Vec<(u64, u64)>>(json) {
        let sum = raw.iter().try_fold(0u64, |t, &(_, len)| t.checked_add(len));
        if let Some(sum) = sum.filter(|&s| s != data_len) {
            check(json, mem_size, sum);
        }
    }
});
