//! Fuzzes the control API's request parsing: one line per connection on the
//! API socket, cut as the server reads it (the first line, at most 64 KiB),
//! then `smudge::control::parse_request` — the function the VMM's
//! dispatcher calls before it acts on anything.
//!
//! Checked: no panic; an accepted request, encoded again as a client
//! encodes it (`Request::to_line`), parses to the same request; the typed
//! `Deserialize` agrees with `parse_request`; a key added to an accepted
//! request that its command does not take is refused, naming the key; every
//! error answer encodes as one JSON line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use smudge::control::{parse_request, Request};

/// Longest request the server reads (`MAX_REQUEST` in vmm/src/api.rs).
const MAX_REQUEST: usize = 64 * 1024;

/// A key no command takes.
const STRAY: &str = "parnet";

fuzz_target!(|data: &[u8]| {
    let cut = &data[..data.len().min(MAX_REQUEST)];
    let line = match cut.iter().position(|&b| b == b'\n') {
        Some(n) => &cut[..=n],
        None => cut,
    };
    let Ok(line) = std::str::from_utf8(line) else { return };
    let parsed = parse_request(line);
    assert_eq!(
        serde_json::from_str::<Request>(line.trim()).map_err(drop),
        parsed.clone().map_err(drop),
        "Deserialize and parse_request disagree on {line:?}"
    );
    match parsed {
        Ok(r) => {
            // Paths that are not UTF-8 cannot come from JSON; all others
            // round-trip.
            let encoded = r.to_line().expect("a parsed request encodes");
            let again = parse_request(std::str::from_utf8(&encoded).expect("JSON is UTF-8"));
            assert_eq!(again, Ok(r.clone()));
            let mut with_stray: Value = serde_json::from_slice(&encoded).expect("the encoding is JSON");
            with_stray[STRAY] = json!(1);
            let e = parse_request(&with_stray.to_string()).expect_err("a stray key is refused");
            assert!(e.to_string().contains(STRAY), "{e}");
        }
        Err(e) => {
            let answer = json!({"ok": false, "error": e.to_string()}).to_string();
            assert!(!answer.contains('\n'), "an error answer spans lines: {answer}");
        }
    }
});
