//! Fuzzes the machine-state parser: `smudge::snapshot::parse_state` is what
//! `load` (and so a restore or a merge) runs on a snapshot's `state.json`:
//! vCPU registers, FPU, MSRs, LAPIC, events and the UART. Every byte string
//! must parse to a state or to an error naming the file, never a panic; a
//! state that parses must read back the same once written again.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use smudge::snapshot::{parse_state, MachineState};

const FILE: &str = "snap/state.json";

fn round_trip(s: &MachineState) {
    // The snapshot writer pretty-prints; the migration stream does not.
    for again in [serde_json::to_vec_pretty(s), serde_json::to_vec(s)] {
        let again = again.expect("a machine state serializes");
        let back = parse_state(&again, s.vcpus.len(), Path::new(FILE)).expect("a written state parses");
        assert_eq!(&back, s);
    }
}

fuzz_target!(|data: &[u8]| {
    // Most seeds have one vCPU; the manifest's count is checked against it.
    match parse_state(data, 1, Path::new(FILE)) {
        Ok(s) => {
            assert_eq!(s.vcpus.len(), 1);
            round_trip(&s);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with(FILE), "error does not name the file: {msg}");
            // Refused either as JSON or for its count alone; in the second
            // case it parses with the count it has.
            if let Ok(raw) = serde_json::from_slice::<MachineState>(data) {
                assert_ne!(raw.vcpus.len(), 1, "a 1-vCPU state was refused: {msg}");
                let s = parse_state(data, raw.vcpus.len(), Path::new(FILE)).expect("parses with its own count");
                assert_eq!(s, raw);
                round_trip(&s);
            }
        }
    }
});
