//! The control API's requests and its client: one JSON object per line,
//! its command under `"cmd"`. These types are the schema. The VMM reads
//! every request into them ([`parse_request`]); [`Client`] — the one
//! client, used by `smudge ctl`, the test kit and the benchmarks — sends
//! them serialized: a request is written and read in this one place.
//! Parsing is a pure function of the line, so it is fuzzed as it runs.
//!
//! ```text
//! {"cmd":"stats"} {"cmd":"sync"} {"cmd":"pause"} {"cmd":"resume"} {"cmd":"stop"}
//! {"cmd":"snapshot","dir":D,"parent":P?,"resume":true?,"live":false?,"pause_budget_ms":10?}
//! {"cmd":"migrate","to":"HOST:PORT"|"unix:PATH","downtime_ms":N?,"max_rounds":N?,"bandwidth_limit":N?,
//!  "compress":"none"|"lz4"?,"auto_converge":true?,"verify_memory":false?,"local":false?,
//!  "postcopy_after":N?,"connections":1?,"tls_creds":DIR?,"tls_psk":FILE?,"tls_psk_identity":NAME?}
//! {"cmd":"dirty-rate","seconds":1.0?}
//! ```
//!
//! What is refused, and how the answer names it:
//! - a key the command does not take: `snapshot: unknown field `parnet`, expected one of …`;
//! - a value of the wrong type: `snapshot: "resume": invalid type: string "yes", expected a boolean`;
//! - a missing field: `snapshot: missing field `dir``;
//! - a value out of range (checked after the types): `"connections" must be 1..=64, not 0`.
//!
//! Reading a request: serde's derived internally-tagged `Deserialize`
//! buffers the object before it picks the variant, and so loses the key of
//! a wrong-typed value (its error says only "expected a boolean"). So
//! [`Request`] derives `Serialize` with the tag, and its `Deserialize`
//! takes `"cmd"` off the object itself, then deserializes the command's own
//! struct (each `deny_unknown_fields`) directly, through
//! `serde_path_to_error`, which names the key.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// A live snapshot's pause budget when the request names none: the fixed
/// cost of a pause here is ~1 ms (stop the vCPUs, save their state), and
/// 10 ms more copies a few MiB of residue.
pub const DEFAULT_LIVE_PAUSE_MS: u64 = 10;
/// The largest pause budget a live snapshot accepts.
pub const MAX_PAUSE_BUDGET_MS: u64 = 60_000;
/// The most page connections a migration may use.
pub const MAX_CONNECTIONS: u32 = 64;
/// The longest dirty-rate window, in seconds.
pub const MAX_DIRTY_RATE_SECONDS: f64 = 3600.0;

/// A control request.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Harvest and writeback counters, and the long request running now.
    Stats,
    /// WB_SYNC_ALL: every dirty page written back, then fdatasync.
    Sync,
    /// Pause the vCPUs.
    Pause,
    /// Resume them.
    Resume,
    /// Take a snapshot.
    Snapshot(SnapshotRequest),
    /// Migrate away.
    Migrate(MigrateRequest),
    /// Measure the dirty rate.
    DirtyRate(DirtyRateRequest),
    /// End the run.
    Stop,
}

/// Every command, as `"cmd"` spells it.
pub const COMMANDS: [&str; 8] = ["stats", "sync", "pause", "resume", "snapshot", "migrate", "dirty-rate", "stop"];

impl Request {
    /// The command, as `"cmd"` spells it.
    pub fn command(&self) -> &'static str {
        match self {
            Request::Stats => "stats",
            Request::Sync => "sync",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Snapshot(_) => "snapshot",
            Request::Migrate(_) => "migrate",
            Request::DirtyRate(_) => "dirty-rate",
            Request::Stop => "stop",
        }
    }

    /// The request as the one line a client sends (newline included).
    /// Fails only on a path that is not UTF-8 (JSON cannot carry it).
    pub fn to_line(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut line = serde_json::to_vec(self)?;
        line.push(b'\n');
        Ok(line)
    }

    /// Reads a request from its JSON object's fields: `"cmd"` picks the
    /// command, the rest must be that command's fields, each of its type,
    /// in its range.
    pub fn from_fields(mut fields: Map<String, Value>) -> Result<Request, RequestError> {
        let cmd = match fields.remove("cmd") {
            Some(Value::String(c)) => c,
            Some(other) => return Err(RequestError::CommandNotAString(other.to_string())),
            None => return Err(RequestError::NoCommand),
        };
        let rest = Value::Object(fields);
        let req = match cmd.as_str() {
            "stats" => command_fields::<NoFields>(&cmd, rest).map(|_| Request::Stats)?,
            "sync" => command_fields::<NoFields>(&cmd, rest).map(|_| Request::Sync)?,
            "pause" => command_fields::<NoFields>(&cmd, rest).map(|_| Request::Pause)?,
            "resume" => command_fields::<NoFields>(&cmd, rest).map(|_| Request::Resume)?,
            "stop" => command_fields::<NoFields>(&cmd, rest).map(|_| Request::Stop)?,
            "snapshot" => Request::Snapshot(command_fields(&cmd, rest)?),
            "migrate" => Request::Migrate(command_fields(&cmd, rest)?),
            "dirty-rate" => Request::DirtyRate(command_fields(&cmd, rest)?),
            other => return Err(RequestError::UnknownCommand(other.to_string())),
        };
        req.check()?;
        Ok(req)
    }

    /// The checks the types cannot express (ranges, fields that exclude
    /// each other).
    pub fn check(&self) -> Result<(), RequestError> {
        let checked = match self {
            Request::Snapshot(s) => s.check(),
            Request::Migrate(m) => m.check(),
            Request::DirtyRate(d) => d.check(),
            Request::Stats | Request::Sync | Request::Pause | Request::Resume | Request::Stop => Ok(()),
        };
        checked.map_err(RequestError::Invalid)
    }
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let fields = Map::<String, Value>::deserialize(d)?;
        Request::from_fields(fields).map_err(serde::de::Error::custom)
    }
}

/// The fields of a command that takes none.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

/// Deserializes `cmd`'s own struct from the request's other fields; the
/// error names the command and the key.
fn command_fields<T: DeserializeOwned>(cmd: &str, fields: Value) -> Result<T, RequestError> {
    serde_path_to_error::deserialize(fields).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // serde's own message names a missing or unknown key; a value of
        // the wrong type is named by its path.
        let key = (path != "." && !message.starts_with("unknown field")).then_some(path);
        RequestError::Fields { command: cmd.to_string(), key, message }
    })
}

fn yes() -> bool {
    true
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A `snapshot` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Directory to create (must not exist or be empty). Relative paths are
    /// the VMM's: clients send absolute ones.
    pub dir: PathBuf,
    /// The run's last snapshot: this one is a diff on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<PathBuf>,
    /// Resume the vCPUs afterwards (default true).
    #[serde(default = "yes")]
    pub resume: bool,
    /// A live full snapshot: RAM copied in rounds while the guest runs.
    #[serde(default, skip_serializing_if = "is_false")]
    pub live: bool,
    /// With `live`: pause for about this long at most (default
    /// [`DEFAULT_LIVE_PAUSE_MS`], at most [`MAX_PAUSE_BUDGET_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_budget_ms: Option<u64>,
}

impl SnapshotRequest {
    /// A full snapshot into `dir`, the guest resumed afterwards.
    pub fn full(dir: impl Into<PathBuf>) -> Self {
        SnapshotRequest { dir: dir.into(), parent: None, resume: true, live: false, pause_budget_ms: None }
    }

    /// A diff snapshot into `dir` on `parent`, the guest resumed afterwards.
    pub fn diff(dir: impl Into<PathBuf>, parent: impl Into<PathBuf>) -> Self {
        SnapshotRequest { parent: Some(parent.into()), ..Self::full(dir) }
    }

    /// A live full snapshot into `dir` with the default pause budget.
    pub fn live(dir: impl Into<PathBuf>) -> Self {
        SnapshotRequest { live: true, ..Self::full(dir) }
    }

    /// A live snapshot's pause budget (None: paused for the whole copy).
    pub fn live_pause(&self) -> Option<Duration> {
        self.live.then(|| Duration::from_millis(self.pause_budget_ms.unwrap_or(DEFAULT_LIVE_PAUSE_MS)))
    }

    fn check(&self) -> Result<(), String> {
        match (self.live, self.pause_budget_ms) {
            (false, Some(_)) => Err("\"pause_budget_ms\" applies to a live snapshot only".into()),
            (true, _) if self.parent.is_some() => Err("a live snapshot is a full one: it takes no \"parent\"".into()),
            (true, Some(ms)) if ms > MAX_PAUSE_BUDGET_MS => {
                Err(format!("\"pause_budget_ms\" must be at most {MAX_PAUSE_BUDGET_MS}"))
            }
            _ => Ok(()),
        }
    }
}

/// Page data compression on the migration stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Pages as they are.
    #[default]
    None,
    /// LZ4 blocks.
    Lz4,
}

/// A `migrate` request (defaults left to the VMM where absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination, `HOST:PORT` or `unix:PATH`.
    pub to: String,
    /// Downtime budget, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Rounds cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
    /// Bytes per second cap (above 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<u64>,
    /// Page data compression.
    #[serde(default)]
    pub compress: Compression,
    /// Throttle when not converging (default true).
    #[serde(default = "yes")]
    pub auto_converge: bool,
    /// End-to-end memory checksums.
    #[serde(default)]
    pub verify_memory: bool,
    /// Same-host handover of the RAM file.
    #[serde(default)]
    pub local: bool,
    /// Switch to post-copy after this many pre-copy rounds (0: at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_after: Option<u32>,
    /// Page connections, 1..=[`MAX_CONNECTIONS`] (default 1).
    #[serde(default = "one_connection")]
    pub connections: u32,
    /// TLS credentials directory (QEMU's layout; none: plain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<PathBuf>,
    /// A pre-shared key file (QEMU's keys.psk) instead of credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_psk: Option<PathBuf>,
    /// The identity of `tls_psk` to use (none: its first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_psk_identity: Option<String>,
    /// Resume the post-copy migration whose link broke (`to` empty: the
    /// address it went to last); the other fields do not apply.
    #[serde(default, skip_serializing_if = "is_false")]
    pub resume: bool,
}

fn one_connection() -> u32 {
    1
}

impl MigrateRequest {
    /// A migration to `to` with every default.
    pub fn new(to: impl Into<String>) -> Self {
        MigrateRequest {
            to: to.into(),
            downtime_ms: None,
            max_rounds: None,
            bandwidth_limit: None,
            compress: Compression::None,
            auto_converge: true,
            verify_memory: false,
            local: false,
            postcopy_after: None,
            connections: 1,
            tls_creds: None,
            tls_psk: None,
            tls_psk_identity: None,
            resume: false,
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.bandwidth_limit == Some(0) {
            return Err("\"bandwidth_limit\" must be above 0 bytes/s".into());
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(format!("\"connections\" must be 1..={MAX_CONNECTIONS}, not {}", self.connections));
        }
        if self.tls_creds.is_some() && self.tls_psk.is_some() {
            return Err("\"tls_creds\" and \"tls_psk\" exclude each other".into());
        }
        if self.tls_psk_identity.is_some() && self.tls_psk.is_none() {
            return Err("\"tls_psk_identity\" needs \"tls_psk\"".into());
        }
        Ok(())
    }
}

/// A `dirty-rate` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirtyRateRequest {
    /// The window, seconds in (0, 3600] (default 1).
    #[serde(default = "one_second")]
    pub seconds: f64,
}

fn one_second() -> f64 {
    1.0
}

impl DirtyRateRequest {
    fn check(&self) -> Result<(), String> {
        if self.seconds > 0.0 && self.seconds <= MAX_DIRTY_RATE_SECONDS {
            Ok(())
        } else {
            Err("\"seconds\" must be a number in (0, 3600]".into())
        }
    }
}

/// Parses one request line; the error's text is the answer's message.
pub fn parse_request(line: &str) -> Result<Request, RequestError> {
    let req: Value = serde_json::from_str(line.trim()).map_err(|e| RequestError::NotJson(e.to_string()))?;
    match req {
        Value::Object(fields) => Request::from_fields(fields),
        other => Err(RequestError::NotAnObject(other.to_string())),
    }
}

/// Why a request was refused. Its text is the `"error"` of the answer, and
/// names what is wrong: the key, the command, the range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The line is not JSON (serde_json's message).
    #[error("bad request (expected JSON like {{\"cmd\":\"stats\"}}): {0}")]
    NotJson(String),
    /// The line is JSON, but not an object (the value).
    #[error("bad request (expected a JSON object like {{\"cmd\":\"stats\"}}): {0}")]
    NotAnObject(String),
    /// The object has no `"cmd"`.
    #[error("request has no \"cmd\" string")]
    NoCommand,
    /// `"cmd"` is not a string (the value).
    #[error("\"cmd\" must be a string ({commands}), not {0}", commands = COMMANDS.join(", "))]
    CommandNotAString(String),
    /// `"cmd"` names no command.
    #[error("unknown command '{0}' ({commands})", commands = COMMANDS.join(", "))]
    UnknownCommand(String),
    /// The command's fields do not fit its type: a key it does not take,
    /// a missing field, a value of the wrong type (then `key` names it).
    #[error("{command}: {}{message}", key.as_ref().map(|k| format!("\"{k}\": ")).unwrap_or_default())]
    Fields {
        /// The command.
        command: String,
        /// The key of the wrong-typed value.
        key: Option<String>,
        /// serde's message.
        message: String,
    },
    /// A value out of its range, or fields that exclude each other.
    #[error("{0}")]
    Invalid(String),
}

/// How long a [`Client`] waits for an answer unless told otherwise: a
/// snapshot or a migration is answered when it is done.
pub const ANSWER_WAIT: Duration = Duration::from_secs(600);
/// How long a [`Client`] may take to send its request line unless told
/// otherwise.
pub const SEND_WAIT: Duration = Duration::from_secs(5);
/// Longest answer a client reads.
const MAX_ANSWER: u64 = 64 << 20;

/// The client of the control API: one request per connection, the line
/// built from a [`Request`], the answer read back as JSON (`"ok": false`
/// answers included: they are answers). `smudge ctl`, the test kit and the
/// benchmarks all talk to smudge through it.
///
/// ```no_run
/// use smudge::control::{Client, Request};
/// let stats = Client::new("/tmp/vm.sock").call(&Request::Stats)?;
/// println!("{}", stats["dirty_log"]["harvests"]);
/// # Ok::<(), smudge::control::ClientError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    connect_wait: Duration,
    answer_wait: Duration,
    send_wait: Duration,
}

impl Client {
    /// A client of the socket at `path`, which must be there when a request
    /// is sent; it waits [`ANSWER_WAIT`] for an answer.
    pub fn new(path: impl Into<PathBuf>) -> Client {
        Client { path: path.into(), connect_wait: Duration::ZERO, answer_wait: ANSWER_WAIT, send_wait: SEND_WAIT }
    }

    /// Waits up to `wait` for a socket that does not exist yet or refuses
    /// connections (a `smudge run` still starting).
    pub fn connect_wait(mut self, wait: Duration) -> Client {
        self.connect_wait = wait;
        self
    }

    /// Waits at most `answer` for an answer and `send` to send the request.
    pub fn timeouts(mut self, answer: Duration, send: Duration) -> Client {
        self.answer_wait = answer;
        self.send_wait = send;
        self
    }

    /// The socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `request` and returns the answer.
    pub fn call(&self, request: &Request) -> Result<Value, ClientError> {
        self.call_line(&request.to_line().map_err(ClientError::Encode)?)
    }

    /// Sends `line` (one JSON object and a newline; anything, to see how
    /// smudge answers a bad request) and returns the answer.
    pub fn call_line(&self, line: &[u8]) -> Result<Value, ClientError> {
        let conn = self.connect()?;
        let talk = |source| ClientError::Exchange { path: self.path.clone(), source };
        conn.set_read_timeout(Some(self.answer_wait)).map_err(talk)?;
        conn.set_write_timeout(Some(self.send_wait)).map_err(talk)?;
        let answer = exchange(&conn, line).map_err(talk)?;
        serde_json::from_str(answer.trim())
            .map_err(|source| ClientError::BadAnswer { answer: answer.trim().to_string(), source })
    }

    /// Connects, waiting as [`Client::connect_wait`] says.
    pub fn connect(&self) -> Result<UnixStream, ClientError> {
        let t0 = Instant::now();
        loop {
            let e = match UnixStream::connect(&self.path) {
                Ok(s) => return Ok(s),
                Err(e) => e,
            };
            let starting = matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused);
            if starting && t0.elapsed() < self.connect_wait {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let (path, waited) = (self.path.clone(), self.connect_wait);
            return Err(match e.kind() {
                ErrorKind::NotFound => ClientError::NoSocket { path, waited },
                ErrorKind::ConnectionRefused => ClientError::NotServed { path, waited },
                _ => ClientError::Connect { path, source: e },
            });
        }
    }
}

/// Sends one request line on `conn` and reads the answer line. A server
/// that turns a connection away answers and closes without waiting for the
/// request, so a failed write is not the end: the answer, if one came, is
/// read and returned all the same.
pub fn exchange(conn: &UnixStream, line: &[u8]) -> std::io::Result<String> {
    let sent = (&mut &*conn).write_all(line);
    let mut answer = String::new();
    let read = BufReader::new(conn.take(MAX_ANSWER)).read_line(&mut answer);
    match (sent, read) {
        (_, Ok(_)) if !answer.is_empty() => Ok(answer),
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(_)) => Err(std::io::Error::new(ErrorKind::UnexpectedEof, "smudge closed without an answer")),
    }
}

/// " (waited N s)" after a wait, nothing without one.
fn waited_for(wait: &Duration) -> String {
    if wait.is_zero() {
        String::new()
    } else {
        format!(" (waited {:.0} s)", wait.as_secs_f64())
    }
}

/// Why a [`Client`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket at the path (after waiting `waited`).
    #[error("{}: no such socket{}: is `smudge run --api-sock {}` running?", path.display(), waited_for(waited), path.display())]
    NoSocket {
        /// The socket's path.
        path: PathBuf,
        /// How long the client waited for it.
        waited: Duration,
    },
    /// A socket no process listens on (after waiting `waited`).
    #[error("{}: nothing serves this socket{} (left by a smudge that did not end cleanly?)", path.display(), waited_for(waited))]
    NotServed {
        /// The socket's path.
        path: PathBuf,
        /// How long the client waited for a listener.
        waited: Duration,
    },
    /// Connecting failed otherwise.
    #[error("connecting to {}", path.display())]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Sending the request or reading the answer failed (a timeout is
    /// `WouldBlock` or `TimedOut`: see [`ClientError::timed_out`]).
    #[error("talking to {}", path.display())]
    Exchange {
        /// The socket's path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not JSON.
    #[error("bad answer from smudge: '{answer}'")]
    BadAnswer {
        /// The answer line.
        answer: String,
        /// What is wrong with it.
        #[source]
        source: serde_json::Error,
    },
    /// The request cannot be sent as JSON (a path that is not UTF-8).
    #[error(transparent)]
    Encode(serde_json::Error),
}

impl ClientError {
    /// Whether no answer came within the client's time limit.
    pub fn timed_out(&self) -> bool {
        matches!(self, ClientError::Exchange { source, .. }
            if matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(line: &str) -> String {
        match parse_request(line) {
            Ok(r) => panic!("{line} was accepted as {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(parse_request(r#"{"cmd":"stats"}"#), Ok(Request::Stats));
        assert_eq!(
            parse_request(r#"{"cmd":"snapshot","dir":"/s","parent":"/p"}"#),
            Ok(Request::Snapshot(SnapshotRequest::diff("/s", "/p")))
        );
        let Ok(Request::Migrate(m)) = parse_request(r#"{"cmd":"migrate","to":"h:1","compress":"lz4","max_rounds":3}"#)
        else {
            panic!()
        };
        assert_eq!(m, MigrateRequest { compress: Compression::Lz4, max_rounds: Some(3), ..MigrateRequest::new("h:1") });
        // Absent fields take the defaults the builders give; null is absent.
        assert_eq!(parse_request(r#"{"cmd":"migrate","to":"h:1"}"#), Ok(Request::Migrate(MigrateRequest::new("h:1"))));
        assert_eq!(
            parse_request(r#"{"cmd":"migrate","to":"h:1","max_rounds":null}"#),
            Ok(Request::Migrate(MigrateRequest::new("h:1")))
        );
        assert_eq!(
            parse_request(r#"{"cmd":"snapshot","dir":"/s"}"#),
            Ok(Request::Snapshot(SnapshotRequest::full("/s")))
        );
        assert_eq!(parse_request(r#"{"cmd":"dirty-rate"}"#), Ok(Request::DirtyRate(DirtyRateRequest { seconds: 1.0 })));
        for (line, says) in [
            ("{", "bad request"),
            ("[1]", "expected a JSON object"),
            (r#"{"x":1}"#, "no \"cmd\""),
            (r#"{"cmd":7}"#, "\"cmd\" must be a string"),
            (
                r#"{"cmd":"fly"}"#,
                "unknown command 'fly' (stats, sync, pause, resume, snapshot, migrate, dirty-rate, stop)",
            ),
            (r#"{"cmd":"migrate","to":"h:1","bandwidth_limit":0}"#, "\"bandwidth_limit\" must be above 0"),
            (r#"{"cmd":"dirty-rate","seconds":-1}"#, "\"seconds\" must be a number in (0, 3600]"),
            (r#"{"cmd":"dirty-rate","seconds":3600.5}"#, "\"seconds\" must be a number in (0, 3600]"),
            (r#"{"cmd":"migrate","to":"h:1","connections":0}"#, "\"connections\" must be 1..=64, not 0"),
            (r#"{"cmd":"migrate","to":"h:1","connections":65}"#, "\"connections\" must be 1..=64, not 65"),
            (r#"{"cmd":"snapshot","dir":"/s","live":true,"parent":"/p"}"#, "takes no \"parent\""),
            (r#"{"cmd":"snapshot","dir":"/s","pause_budget_ms":5}"#, "live snapshot only"),
            (r#"{"cmd":"snapshot","dir":"/s","live":true,"pause_budget_ms":99999999}"#, "at most 60000"),
        ] {
            let e = refused(line);
            assert!(e.contains(says), "{line}: {e}");
        }
    }

    /// A typo'd key is refused, named, whatever the command: serde's
    /// internally tagged enums are where `deny_unknown_fields` gets lost.
    #[test]
    fn an_unknown_key_is_refused_in_every_command_and_named() {
        let base = [
            r#"{"cmd":"stats""#,
            r#"{"cmd":"sync""#,
            r#"{"cmd":"pause""#,
            r#"{"cmd":"resume""#,
            r#"{"cmd":"snapshot","dir":"D""#,
            r#"{"cmd":"migrate","to":"h:1""#,
            r#"{"cmd":"dirty-rate""#,
            r#"{"cmd":"stop""#,
        ];
        assert_eq!(base.len(), COMMANDS.len());
        for (b, cmd) in base.iter().zip(COMMANDS) {
            assert!(parse_request(&format!("{b}}}")).is_ok(), "{b}");
            let e = refused(&format!(r#"{b},"parnet":"P"}}"#));
            assert!(e.starts_with(&format!("{cmd}: unknown field `parnet`")), "{cmd}: {e}");
        }
        // The case that took a full snapshot when typo'd.
        let e = refused(r#"{"cmd":"snapshot","dir":"D","parnet":"P"}"#);
        assert_eq!(
            e,
            "snapshot: unknown field `parnet`, expected one of `dir`, `parent`, `resume`, `live`, `pause_budget_ms`"
        );
    }

    #[test]
    fn a_wrong_type_or_a_missing_field_is_named() {
        for (line, says) in [
            (
                r#"{"cmd":"snapshot","dir":"/s","resume":"yes"}"#,
                r#"snapshot: "resume": invalid type: string "yes", expected a boolean"#,
            ),
            (r#"{"cmd":"snapshot","dir":7}"#, r#"snapshot: "dir": invalid type: integer `7`"#),
            (
                r#"{"cmd":"migrate","to":"h:1","max_rounds":99999999999}"#,
                r#"migrate: "max_rounds": invalid value: integer `99999999999`"#,
            ),
            (
                r#"{"cmd":"migrate","to":"h:1","connections":-1}"#,
                r#"migrate: "connections": invalid value: integer `-1`"#,
            ),
            (
                r#"{"cmd":"migrate","to":"h:1","compress":"zip"}"#,
                r#"migrate: "compress": unknown variant `zip`, expected `none` or `lz4`"#,
            ),
            (
                r#"{"cmd":"migrate","to":"h:1","local":null}"#,
                r#"migrate: "local": invalid type: null, expected a boolean"#,
            ),
            (
                r#"{"cmd":"dirty-rate","seconds":"1"}"#,
                r#"dirty-rate: "seconds": invalid type: string "1", expected f64"#,
            ),
            (r#"{"cmd":"snapshot"}"#, "snapshot: missing field `dir`"),
            (r#"{"cmd":"snapshot","parent":"/p"}"#, "snapshot: missing field `dir`"),
            (r#"{"cmd":"migrate"}"#, "migrate: missing field `to`"),
        ] {
            let e = refused(line);
            assert!(e.starts_with(says), "{line}:\n got  {e}\n want {says}…");
        }
    }

    /// What a client builds reads back as the same request, and each
    /// command's line carries its `"cmd"`.
    #[test]
    fn built_requests_round_trip() {
        let all = [
            Request::Stats,
            Request::Sync,
            Request::Pause,
            Request::Resume,
            Request::Stop,
            Request::Snapshot(SnapshotRequest::full("/s/1")),
            Request::Snapshot(SnapshotRequest { resume: false, ..SnapshotRequest::diff("/s/2", "/s/1") }),
            Request::Snapshot(SnapshotRequest { pause_budget_ms: Some(25), ..SnapshotRequest::live("/s/3") }),
            Request::Migrate(MigrateRequest::new("[::1]:7700")),
            Request::Migrate(MigrateRequest {
                downtime_ms: Some(300),
                max_rounds: Some(4),
                bandwidth_limit: Some(1 << 20),
                compress: Compression::Lz4,
                auto_converge: false,
                verify_memory: true,
                local: true,
                postcopy_after: Some(2),
                connections: 8,
                ..MigrateRequest::new("10.0.0.2:7700")
            }),
            Request::Migrate(MigrateRequest { resume: true, ..MigrateRequest::new("") }),
            Request::DirtyRate(DirtyRateRequest { seconds: 0.25 }),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for r in all {
            let line = r.to_line().unwrap();
            assert_eq!(line.last(), Some(&b'\n'));
            let text = std::str::from_utf8(&line).unwrap();
            assert_eq!(text.matches('\n').count(), 1, "{text}");
            assert!(text.starts_with(&format!(r#"{{"cmd":"{}""#, r.command())), "{text}");
            assert_eq!(parse_request(text), Ok(r.clone()), "{text}");
            assert_eq!(serde_json::from_str::<Request>(text).unwrap(), r);
            seen.insert(r.command());
        }
        assert_eq!(seen.len(), COMMANDS.len(), "a command is missing from this test");
    }

    /// Found by the api_request fuzz target: with serde_json's default
    /// fast float parser a long decimal was read 1 ulp off, so the number
    /// a client re-sends (serde_json's shortest form) parsed differently.
    #[test]
    fn floats_parse_correctly_rounded() {
        let line = r#"{"cmd":"dirty-rate","seconds":0.245545555555555555555555555555}"#;
        let Ok(Request::DirtyRate(d)) = parse_request(line) else { panic!() };
        let again = String::from_utf8(Request::DirtyRate(d.clone()).to_line().unwrap()).unwrap();
        assert_eq!(parse_request(&again), Ok(Request::DirtyRate(d.clone())));
        assert_eq!(d.seconds, "0.245545555555555555555555555555".parse::<f64>().unwrap());
    }

    /// The old server answered "busy" and closed before reading: the
    /// client's write then failed (EPIPE) and `smudge ctl` printed "Broken
    /// pipe" instead of the answer it had been sent.
    #[test]
    fn the_client_reads_the_answer_even_when_its_write_fails() {
        let (client, server) = UnixStream::pair().unwrap();
        (&server).write_all(b"{\"ok\":false,\"error\":\"busy: try again\"}\n").unwrap();
        drop(server);
        let write = (&client).write_all(b"{}\n");
        assert_eq!(write.map_err(|e| e.kind()), Err(ErrorKind::BrokenPipe), "the write must fail for this test");
        let (client, server) = UnixStream::pair().unwrap();
        (&server).write_all(b"{\"ok\":false,\"error\":\"busy: try again\"}\n").unwrap();
        drop(server);
        let answer = exchange(&client, &Request::Stats.to_line().unwrap()).unwrap();
        assert_eq!(answer, "{\"ok\":false,\"error\":\"busy: try again\"}\n");
        // No answer at all is still an error.
        let (client, server) = UnixStream::pair().unwrap();
        drop(server);
        assert_eq!(exchange(&client, b"{}\n").map_err(|e| e.kind()), Err(ErrorKind::BrokenPipe));
    }

    /// What `smudge ctl` says when there is no smudge to talk to.
    #[test]
    fn a_missing_or_dead_socket_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let e = Client::new(&sock).call(&Request::Stats).unwrap_err();
        let s = sock.display();
        assert_eq!(e.to_string(), format!("{s}: no such socket: is `smudge run --api-sock {s}` running?"));
        let e = Client::new(&sock).connect_wait(Duration::from_millis(30)).call(&Request::Stats).unwrap_err();
        assert_eq!(e.to_string(), format!("{s}: no such socket (waited 0 s): is `smudge run --api-sock {s}` running?"));
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let e = Client::new(&sock).call(&Request::Stats).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{s}: nothing serves this socket (left by a smudge that did not end cleanly?)")
        );
    }

    /// One request per connection: the line the types build goes out, the
    /// answer comes back as JSON, `"ok": false` included; a reply that is
    /// not JSON, or none in time, is an error saying so.
    #[test]
    fn the_client_sends_the_typed_line_and_reads_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for reply in ["{\"ok\":false,\"error\":\"x\"}\n", "not json\n", ""] {
                let (conn, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&conn).read_line(&mut line).unwrap();
                lines.push(line);
                (&conn).write_all(reply.as_bytes()).unwrap();
                if reply.is_empty() {
                    // Hold the connection open without answering.
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            lines
        });
        let client = Client::new(&sock).timeouts(Duration::from_millis(100), SEND_WAIT);
        let req = Request::Snapshot(SnapshotRequest::full("/s"));
        assert_eq!(client.call(&req).unwrap(), serde_json::json!({"ok": false, "error": "x"}));
        let e = client.call(&Request::Stats).unwrap_err();
        assert!(e.to_string().starts_with("bad answer from smudge: 'not json'"), "{e}");
        let e = client.call(&Request::Stop).unwrap_err();
        assert!(e.timed_out(), "{e:?}");
        let lines = server.join().unwrap();
        let sent: Vec<String> = [req, Request::Stats, Request::Stop]
            .iter()
            .map(|r| String::from_utf8(r.to_line().unwrap()).unwrap())
            .collect();
        assert_eq!(lines, sent);
    }

    /// Every field `cmd` takes, read off the types: serde's refusal of an
    /// unknown key lists them.
    fn fields_of(cmd: &str) -> Vec<String> {
        let mut fields = Map::new();
        fields.insert("cmd".into(), cmd.into());
        fields.insert("\u{1}".into(), Value::Null);
        let e = Request::from_fields(fields).unwrap_err().to_string();
        if e.ends_with("there are no fields") {
            return Vec::new();
        }
        let (_, expected) = e.split_once(", expected ").unwrap_or_else(|| panic!("{cmd}: {e}"));
        expected.split('`').skip(1).step_by(2).map(str::to_string).collect()
    }

    /// `example` with every key it can do without left out.
    fn minimal(example: &str) -> String {
        let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(example) else { panic!("{example}") };
        let keys: Vec<String> = fields.keys().filter(|k| *k != "cmd").cloned().collect();
        for k in keys {
            let v = fields.remove(&k).unwrap();
            if parse_request(&Value::Object(fields.clone()).to_string()).is_err() {
                fields.insert(k, v);
            }
        }
        Value::Object(fields).to_string()
    }

    /// The control API table of docs/api.md against the types: one row per
    /// command, its example line accepted by the real parser, its fields
    /// column naming exactly the fields the command's type has, with the
    /// defaults the types fill in.
    #[test]
    fn the_readme_api_table_matches_the_types() {
        let readme = include_str!("../docs/api.md");
        let section = readme.split("\n## Requests\n").nth(1).expect("docs/api.md has a Requests section");
        let section = section.split("\n## ").next().unwrap_or(section);
        let mut rows = std::collections::BTreeMap::new();
        for row in section.lines().filter(|l| l.starts_with("| `{")) {
            let cols: Vec<&str> = row.split(" | ").collect();
            assert!(cols.len() >= 3, "a row needs request | fields | …: {row}");
            let example = cols[0].trim_start_matches("| ").trim_matches('`');
            let req = parse_request(example).unwrap_or_else(|e| panic!("docs/api.md example {example}: {e}"));
            let documented: std::collections::BTreeSet<String> = cols[1]
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|t| t.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                .map(str::to_string)
                .collect();
            let typed: std::collections::BTreeSet<String> = fields_of(req.command()).into_iter().collect();
            assert_eq!(documented, typed, "docs/api.md fields of {}", req.command());
            // A default the table gives as a JSON value, "`key` (value, …",
            // is what the types fill in when the key is left out.
            let defaults = serde_json::to_value(parse_request(&minimal(example)).unwrap()).unwrap();
            for (key, said) in cols[1].split('`').skip(1).step_by(2).zip(cols[1].split('`').skip(2).step_by(2)) {
                let Some(said) = said.strip_prefix(" (") else { continue };
                let said = said.split([',', ';', ')']).next().unwrap_or_default();
                let (Ok(said), Some(typed)) = (serde_json::from_str::<Value>(said), defaults.get(key)) else {
                    continue;
                };
                let same = said == *typed || (said.as_f64().is_some() && said.as_f64() == typed.as_f64());
                assert!(same, "docs/api.md default of {}.{key}: {said}, the types' {typed}", req.command());
            }
            assert!(rows.insert(req.command(), example.to_string()).is_none(), "two rows for {}", req.command());
        }
        let documented: Vec<&str> = rows.keys().copied().collect();
        let mut all = COMMANDS.to_vec();
        all.sort_unstable();
        assert_eq!(documented, all, "commands in the API table of docs/api.md");
    }
}
