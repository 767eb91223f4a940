//! The control API's requests: one JSON object per line, parsed and checked
//! here — a pure function of the line, so it is fuzzed as it runs — before
//! the VMM acts on it.
//!
//! ```text
//! {"cmd":"stats"} {"cmd":"sync"} {"cmd":"pause"} {"cmd":"resume"} {"cmd":"stop"}
//! {"cmd":"snapshot","dir":D,"parent":P?,"resume":true?,"live":false?,"pause_budget_ms":10?}
//! {"cmd":"migrate","to":"HOST:PORT","downtime_ms":N?,"max_rounds":N?,"bandwidth_limit":N?,
//!  "compress":"none"|"lz4"?,"auto_converge":true?,"verify_memory":false?,"local":false?,
//!  "postcopy_after":N?,"connections":1?}
//! {"cmd":"dirty-rate","seconds":S?}
//! ```

use std::path::PathBuf;

use serde_json::Value;

/// A live snapshot's pause budget when the request names none: the fixed
/// cost of a pause here is ~1 ms (stop the vCPUs, save their state), and
/// 10 ms more copies a few MiB of residue.
pub const DEFAULT_LIVE_PAUSE_MS: u64 = 10;
/// The largest pause budget a live snapshot accepts.
pub const MAX_PAUSE_BUDGET_MS: u64 = 60_000;

/// A `migrate` request's fields (defaults left to the VMM where absent).
#[derive(Debug, Clone, PartialEq)]
pub struct MigrateRequest {
    /// Destination `host:port`.
    pub to: String,
    /// Downtime budget, ms.
    pub downtime_ms: Option<u64>,
    /// Rounds cap.
    pub max_rounds: Option<u32>,
    /// Bytes per second cap (above 0).
    pub bandwidth_limit: Option<u64>,
    /// LZ4 page data.
    pub lz4: bool,
    /// Throttle when not converging.
    pub auto_converge: bool,
    /// End-to-end memory checksums.
    pub verify_memory: bool,
    /// Same-host handover of the RAM file.
    pub local: bool,
    /// Switch to post-copy after this many pre-copy rounds (0: at once).
    pub postcopy_after: Option<u32>,
    /// Page connections, 1..=64.
    pub connections: u32,
}

/// A checked request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Counters.
    Stats,
    /// WB_SYNC_ALL.
    Sync,
    /// Pause the vCPUs.
    Pause,
    /// Resume them.
    Resume,
    /// Take a snapshot.
    Snapshot {
        /// Directory to create.
        dir: PathBuf,
        /// Parent (a diff).
        parent: Option<PathBuf>,
        /// Resume afterwards.
        resume: bool,
        /// A live full snapshot, pausing for at most about this many ms
        /// (None: paused for the whole copy).
        live_pause_ms: Option<u64>,
    },
    /// Migrate away.
    Migrate(MigrateRequest),
    /// Measure the dirty rate for this many seconds, in (0, 3600].
    DirtyRate {
        /// Window.
        seconds: f64,
    },
    /// End the run.
    Stop,
}

/// The commands, for "unknown command" answers.
pub const COMMANDS: &str = "stats, sync, pause, resume, snapshot, migrate, dirty-rate, stop";

/// Parses one request line; the error is the answer's message.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let req: Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("bad request (expected JSON like {{\"cmd\":\"stats\"}}): {e}"))?;
    let cmd = req.get("cmd").and_then(Value::as_str).ok_or("request has no \"cmd\" string")?;
    Ok(match cmd {
        "stats" => Request::Stats,
        "sync" => Request::Sync,
        "pause" => Request::Pause,
        "resume" => Request::Resume,
        "stop" => Request::Stop,
        "snapshot" => {
            let parent = opt_str(&req, "parent")?.map(PathBuf::from);
            let live_pause_ms = match (opt_bool(&req, "live")?.unwrap_or(false), opt_u64(&req, "pause_budget_ms")?) {
                (false, None) => None,
                (false, Some(_)) => return Err("\"pause_budget_ms\" applies to a live snapshot only".into()),
                (true, _) if parent.is_some() => {
                    return Err("a live snapshot is a full one: it takes no \"parent\"".into());
                }
                (true, Some(ms)) if ms > MAX_PAUSE_BUDGET_MS => {
                    return Err(format!("\"pause_budget_ms\" must be at most {MAX_PAUSE_BUDGET_MS}"));
                }
                (true, ms) => Some(ms.unwrap_or(DEFAULT_LIVE_PAUSE_MS)),
            };
            Request::Snapshot {
                dir: req.get("dir").and_then(Value::as_str).ok_or("snapshot needs a \"dir\" string")?.into(),
                parent,
                resume: opt_bool(&req, "resume")?.unwrap_or(true),
                live_pause_ms,
            }
        }
        "migrate" => {
            let to = req.get("to").and_then(Value::as_str).ok_or("migrate needs a \"to\" string (host:port)")?;
            let max_rounds = opt_u64(&req, "max_rounds")?
                .map(|n| u32::try_from(n).map_err(|_| "\"max_rounds\" is too large".to_string()))
                .transpose()?;
            let bandwidth_limit = opt_u64(&req, "bandwidth_limit")?;
            if bandwidth_limit == Some(0) {
                return Err("\"bandwidth_limit\" must be above 0 bytes/s".into());
            }
            let lz4 = match opt_str(&req, "compress")? {
                None | Some("none") => false,
                Some("lz4") => true,
                Some(other) => return Err(format!("unknown compression '{other}' (none, lz4)")),
            };
            Request::Migrate(MigrateRequest {
                to: to.to_string(),
                downtime_ms: opt_u64(&req, "downtime_ms")?,
                max_rounds,
                bandwidth_limit,
                lz4,
                auto_converge: opt_bool(&req, "auto_converge")?.unwrap_or(true),
                verify_memory: opt_bool(&req, "verify_memory")?.unwrap_or(false),
                local: opt_bool(&req, "local")?.unwrap_or(false),
                connections: match opt_u64(&req, "connections")? {
                    None => 1,
                    Some(n @ 1..=64) => n as u32,
                    Some(n) => return Err(format!("\"connections\" must be 1..=64, not {n}")),
                },
                postcopy_after: opt_u64(&req, "postcopy_after")?
                    .map(|n| u32::try_from(n).map_err(|_| "\"postcopy_after\" is too large".to_string()))
                    .transpose()?,
            })
        }
        "dirty-rate" => match req.get("seconds").map_or(Some(1.0), Value::as_f64) {
            Some(seconds) if seconds > 0.0 && seconds <= 3600.0 => Request::DirtyRate { seconds },
            _ => return Err("\"seconds\" must be a number in (0, 3600]".into()),
        },
        other => return Err(format!("unknown command '{other}' ({COMMANDS})")),
    })
}

fn opt_u64(req: &Value, k: &str) -> Result<Option<u64>, String> {
    match req.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| format!("\"{k}\" must be a whole number")),
    }
}

fn opt_bool(req: &Value, k: &str) -> Result<Option<bool>, String> {
    match req.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| format!("\"{k}\" must be true or false")),
    }
}

fn opt_str<'a>(req: &'a Value, k: &str) -> Result<Option<&'a str>, String> {
    match req.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| format!("\"{k}\" must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(parse_request(r#"{"cmd":"stats"}"#), Ok(Request::Stats));
        assert_eq!(
            parse_request(r#"{"cmd":"snapshot","dir":"/s","parent":"/p"}"#),
            Ok(Request::Snapshot { dir: "/s".into(), parent: Some("/p".into()), resume: true, live_pause_ms: None })
        );
        let Ok(Request::Migrate(m)) = parse_request(r#"{"cmd":"migrate","to":"h:1","compress":"lz4","max_rounds":3}"#)
        else {
            panic!()
        };
        assert!(m.lz4 && m.auto_converge && !m.verify_memory && m.max_rounds == Some(3));
        for (line, says) in [
            ("{", "bad request"),
            (r#"{"x":1}"#, "no \"cmd\""),
            (r#"{"cmd":"fly"}"#, "unknown command 'fly'"),
            (r#"{"cmd":"snapshot"}"#, "\"dir\""),
            (r#"{"cmd":"snapshot","dir":"/s","resume":"yes"}"#, "true or false"),
            (r#"{"cmd":"migrate","to":"h:1","bandwidth_limit":0}"#, "above 0"),
            (r#"{"cmd":"migrate","to":"h:1","max_rounds":99999999999}"#, "too large"),
            (r#"{"cmd":"migrate","to":"h:1","compress":"zip"}"#, "unknown compression"),
            (r#"{"cmd":"dirty-rate","seconds":-1}"#, "(0, 3600]"),
            (r#"{"cmd":"migrate","to":"h:1","connections":0}"#, "1..=64"),
            (r#"{"cmd":"migrate","to":"h:1","connections":65}"#, "1..=64"),
            (r#"{"cmd":"snapshot","dir":"/s","live":true,"parent":"/p"}"#, "takes no \"parent\""),
            (r#"{"cmd":"snapshot","dir":"/s","pause_budget_ms":5}"#, "live snapshot only"),
            (r#"{"cmd":"snapshot","dir":"/s","live":true,"pause_budget_ms":99999999}"#, "at most 60000"),
        ] {
            let e = parse_request(line).unwrap_err();
            assert!(e.contains(says), "{line}: {e}");
        }
    }

    /// Found by the api_request fuzz target: with serde_json's default
    /// fast float parser a long decimal was read 1 ulp off, so the number
    /// a client re-sends (serde_json's shortest form) parsed differently.
    #[test]
    fn floats_parse_correctly_rounded() {
        let line = r#"{"cmd":"dirty-rate","seconds":0.245545555555555555555555555555}"#;
        let Ok(Request::DirtyRate { seconds }) = parse_request(line) else { panic!() };
        let again = format!(r#"{{"cmd":"dirty-rate","seconds":{}}}"#, serde_json::json!(seconds));
        assert_eq!(parse_request(&again), Ok(Request::DirtyRate { seconds }));
        assert_eq!(seconds, "0.245545555555555555555555555555".parse::<f64>().unwrap());
    }
}
