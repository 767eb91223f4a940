//! Fuzzes the snapshot manifest parser: `smudge::snapshot::parse_manifest`
//! is what `verify` (and so `load`, `chain`, restore and merge) runs on a
//! `manifest.json` before it reads any data file. Every byte string must
//! parse to a manifest or to an error naming the file, never a panic.
//!
//! Each input is parsed as it is, and, when it is JSON of a manifest's
//! shape, once more with its self-checksum made right, so mutated fields
//! get past the checksum to the format, version, kind and file-list checks.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use smudge::snapshot::{parse_manifest, Manifest, CHUNK, FORMAT, VERSION};

const FILE: &str = "snap/manifest.json";

fn check(data: &[u8]) {
    match parse_manifest(data, Path::new(FILE)) {
        Ok(m) => {
            assert_eq!(m.format, FORMAT);
            assert_eq!(m.version, VERSION);
            assert_eq!(m.checksum, m.self_checksum());
            assert!(matches!((m.kind.as_str(), m.parent.is_some()), ("full", false) | ("diff", true)));
            let names: &[&str] = if m.kind == "full" {
                &["memory.img", "state.json"]
            } else {
                &["extents.json", "memory.diff", "state.json"]
            };
            for name in names {
                let f = &m.files[*name];
                assert_eq!((f.chunk, f.crc32.len() as u64), (CHUNK, f.len.div_ceil(CHUNK)), "{name}");
            }
            // What is accepted reads back the same once written again (the
            // writer pretty-prints).
            let again = serde_json::to_vec_pretty(&m).expect("a manifest serializes");
            assert_eq!(parse_manifest(&again, Path::new(FILE)).expect("a written manifest parses"), m);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with(FILE), "error does not name the file: {msg}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Ok(mut m) = serde_json::from_slice::<Manifest>(data) {
        let sum = m.self_checksum();
        if m.checksum != sum {
            m.checksum = sum;
            check(&serde_json::to_vec(&m).expect("a manifest serializes"));
        }
    }
});
