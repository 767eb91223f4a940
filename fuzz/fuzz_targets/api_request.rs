//! Fuzzes the control API's request parsing: one JSON line per connection
//! on the API socket (`vmm/src/api.rs`).
//!
//! The dispatcher (`Api::dispatch`, `Api::migrate_options`) lives in the
//! VMM crate and acts on a running VM, so it cannot be called here. This
//! target runs what it runs on the line, `serde_json::from_str::<Value>` of
//! the trimmed line, and then `parse`, a copy of the dispatcher's field
//! extraction (keep it in step with api.rs). Once that extraction is a pure
//! function of the library or of a VMM lib target, call it instead.
//!
//! Checked: no panic; an accepted request re-encoded by the client
//! (`serde_json::to_vec`, as `smudge ctl` sends it) parses to the same
//! request; every error answer encodes as one JSON line.
#![no_main]

use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

/// Longest request the server reads (`MAX_REQUEST` in api.rs).
const MAX_REQUEST: usize = 64 * 1024;

/// A request as `Api::dispatch` understands it; `None` options take the
/// VMM's defaults.
#[derive(Debug, PartialEq)]
enum Request<'a> {
    Stats,
    Sync,
    Pause,
    Resume,
    Stop,
    Snapshot { dir: &'a Path, parent: Option<&'a Path>, resume: bool },
    Migrate(Migrate<'a>),
    DirtyRate(Duration),
}

/// `MigrateOptions` as `Api::migrate_options` fills them.
#[derive(Debug, PartialEq)]
struct Migrate<'a> {
    to: &'a str,
    downtime: Option<Duration>,
    max_rounds: Option<u32>,
    bandwidth: Option<u64>,
    lz4: bool,
    auto_converge: bool,
    verify_memory: bool,
}

/// `Api::dispatch` and `Api::migrate_options`, minus the acting.
fn parse(req: &Value) -> Result<Request<'_>, String> {
    Ok(match req.get("cmd").and_then(Value::as_str) {
        Some("stats") => Request::Stats,
        Some("sync") => Request::Sync,
        Some("pause") => Request::Pause,
        Some("resume") => Request::Resume,
        Some("snapshot") => match req.get("dir").and_then(Value::as_str) {
            Some(dir) => {
                let resume = req.get("resume").and_then(Value::as_bool).unwrap_or(true);
                let parent = req.get("parent").and_then(Value::as_str).map(Path::new);
                Request::Snapshot { dir: Path::new(dir), parent, resume }
            }
            None => return Err("snapshot needs a \"dir\" string".into()),
        },
        Some("migrate") => Request::Migrate(migrate_options(req)?),
        Some("dirty-rate") => match req.get("seconds").map_or(Some(1.0), Value::as_f64) {
            Some(secs) if secs > 0.0 && secs <= 3600.0 => Request::DirtyRate(Duration::from_secs_f64(secs)),
            _ => return Err("\"seconds\" must be a number in (0, 3600]".into()),
        },
        Some("stop") => Request::Stop,
        Some(other) => return Err(format!("unknown command '{other}'")),
        None => return Err("request has no \"cmd\" string".into()),
    })
}

fn migrate_options(req: &Value) -> Result<Migrate<'_>, String> {
    let to = req.get("to").and_then(Value::as_str).ok_or("migrate needs a \"to\" string (host:port)")?;
    let num = |k: &str| -> Result<Option<u64>, String> {
        match req.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| format!("\"{k}\" must be a whole number")),
        }
    };
    let downtime = num("downtime_ms")?.map(Duration::from_millis);
    let max_rounds =
        num("max_rounds")?.map(u32::try_from).transpose().map_err(|_| "\"max_rounds\" is too large".to_string())?;
    let bandwidth = num("bandwidth_limit")?;
    if bandwidth == Some(0) {
        return Err("\"bandwidth_limit\" must be above 0 bytes/s".into());
    }
    let lz4 = match req.get("compress").and_then(Value::as_str) {
        None | Some("none") => false,
        Some("lz4") => true,
        Some(other) => return Err(format!("unknown compression '{other}' (none, lz4)")),
    };
    let auto_converge = req.get("auto_converge").and_then(Value::as_bool).unwrap_or(true);
    let verify_memory = req.get("verify_memory").and_then(Value::as_bool).unwrap_or(false);
    Ok(Migrate { to, downtime, max_rounds, bandwidth, lz4, auto_converge, verify_memory })
}

/// An answer as the server writes it: one line of JSON.
fn answer_line(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).expect("an answer serializes");
    assert!(!out.contains(&b'\n'), "an answer spans lines");
    out.push(b'\n');
    out
}

fuzz_target!(|data: &[u8]| {
    // What `BufReader::read_line` over `take(MAX_REQUEST)` hands dispatch.
    let data = &data[..data.len().min(MAX_REQUEST)];
    let line = match data.iter().position(|&b| b == b'\n') {
        Some(i) => &data[..=i],
        None => data,
    };
    let Ok(line) = std::str::from_utf8(line) else { return };
    let req: Value = match serde_json::from_str(line.trim()) {
        Ok(v) => v,
        Err(e) => {
            answer_line(&json!({"ok": false, "error": format!("bad request: {e}")}));
            return;
        }
    };
    match parse(&req) {
        Ok(r) => {
            // The client's encoding of the same request means the same.
            let sent = serde_json::to_vec(&req).expect("a JSON value serializes");
            let back: Value = serde_json::from_slice(&sent).expect("serde_json reads what it writes");
            match (parse(&back), &r) {
                // Floats may come back one ULP off (serde_json without
                // `float_roundtrip`); the duration must not move more.
                (Ok(Request::DirtyRate(b)), Request::DirtyRate(a)) => {
                    assert!(a.abs_diff(b) <= Duration::from_nanos(1), "{a:?} came back as {b:?}")
                }
                (b, a) => assert_eq!(b.as_ref(), Ok(a), "re-encoded as {}", String::from_utf8_lossy(&sent)),
            }
        }
        Err(e) => {
            answer_line(&json!({"ok": false, "error": e}));
        }
    }
});
