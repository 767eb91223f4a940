//! Fuzzes the control API's request parsing: one line per connection on the
//! API socket, cut as the server reads it (the first line, at most 64 KiB),
//! then `smudge::control::parse_request` — the function the VMM's
//! dispatcher calls before it acts on anything.
//!
//! Checked: no panic; an accepted request re-encoded as JSON by a client
//! parses to the same request; every error answer encodes as one JSON line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use smudge::control::{parse_request, Request};

/// Longest request the server reads (`MAX_REQUEST` in vmm/src/api.rs).
const MAX_REQUEST: usize = 64 * 1024;

/// The request as a client would send it.
fn encode(r: &Request) -> String {
    let v = match r {
        Request::Stats => json!({"cmd": "stats"}),
        Request::Sync => json!({"cmd": "sync"}),
        Request::Pause => json!({"cmd": "pause"}),
        Request::Resume => json!({"cmd": "resume"}),
        Request::Stop => json!({"cmd": "stop"}),
        Request::Snapshot { dir, parent, resume, live_pause_ms } => {
            let mut v = json!({"cmd": "snapshot", "dir": dir, "parent": parent, "resume": resume});
            if let Some(ms) = live_pause_ms {
                v["live"] = json!(true);
                v["pause_budget_ms"] = json!(ms);
            }
            v
        }
        Request::Migrate(m) => json!({
            "cmd": "migrate", "to": m.to, "downtime_ms": m.downtime_ms, "max_rounds": m.max_rounds,
            "bandwidth_limit": m.bandwidth_limit, "compress": if m.lz4 { "lz4" } else { "none" },
            "auto_converge": m.auto_converge, "verify_memory": m.verify_memory, "local": m.local,
            "postcopy_after": m.postcopy_after, "connections": m.connections,
        }),
        Request::DirtyRate { seconds } => json!({"cmd": "dirty-rate", "seconds": seconds}),
    };
    v.to_string()
}

fuzz_target!(|data: &[u8]| {
    let cut = &data[..data.len().min(MAX_REQUEST)];
    let line = match cut.iter().position(|&b| b == b'\n') {
        Some(n) => &cut[..=n],
        None => cut,
    };
    let Ok(line) = std::str::from_utf8(line) else { return };
    match parse_request(line) {
        Ok(r) => {
            // Paths that are not UTF-8 cannot come from JSON; all others
            // round-trip.
            let again = parse_request(&encode(&r)).expect("a re-encoded request parses");
            assert_eq!(again, r);
        }
        Err(e) => {
            let answer = json!({"ok": false, "error": e}).to_string();
            assert!(!answer.contains('\n'), "an error answer spans lines: {answer}");
        }
    }
});
