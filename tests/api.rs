//! The control API: a running smudge answers stats, pause, resume, sync and
//! stop over its unix socket; bad requests get a JSON error naming what was
//! wrong, never a dropped connection and never a half-understood action;
//! idle connections cannot hold the API, and `smudge ctl` waits for a
//! socket that is still to come.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use smudge_testkit::*;

fn raw(sock: &Path, line: &[u8]) -> Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(line).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

fn start(dir: &tempfile::TempDir, cmdline: &str) -> (Child, std::path::PathBuf, std::path::PathBuf) {
    let (mem, sock) = (path(dir, "m"), path(dir, "api.sock"));
    let child = start_with_api(&mem, &sock, "64M", cmdline, Stdio::null(), true, &[]);
    (child, mem, sock)
}

fn guest_pages(v: &Value) -> u64 {
    v["dirty_log"]["guest_pages"].as_u64().unwrap()
}

/// Polls `stats` until `done` holds of it (at most 60 s) and returns it.
fn wait_for_stats(sock: &Path, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let s = ctl(sock, &["stats"]);
        assert_eq!(s["ok"], true, "{s}");
        if done(&s) {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "waited 60 s for {what}; stats now: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn stats_pause_resume_sync_stop() {
    let dir = tmpdir();
    let (child, mem, sock) = start(&dir, "workload=rate rate=2000 writes=1000000000");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
    // The flusher harvests every 250 ms: wait for its first guest pages.
    let s = wait_for_stats(&sock, "the flusher's first harvest of guest writes", |s| {
        s["writeback"]["nr_dirtied"].as_u64().unwrap_or(0) > 0
    });
    assert!(s["dirty_log"]["mechanism"].as_str().unwrap().starts_with("manual"), "{s}");
    assert!(s["dirty_log"]["harvests"].as_u64().unwrap() > 0, "{s}");

    let p = ctl(&sock, &["pause"]);
    assert_eq!((p["ok"].clone(), p["paused"].clone(), p["vcpus"].clone()), (true.into(), true.into(), 1.into()), "{p}");
    // Paused, a sync harvests what the guest wrote before the pause and
    // writes it back; after it nothing may change, and nothing is left
    // dirty for the kernel either.
    assert_eq!(ctl(&sock, &["sync"])["ok"], true);
    let a = guest_pages(&ctl(&sock, &["stats"]));
    let y = ctl(&sock, &["sync"]);
    assert_eq!(y["ok"], true, "{y}");
    let b = guest_pages(&ctl(&sock, &["stats"]));
    assert_eq!(a, b, "the guest wrote while paused");
    let f = std::fs::File::open(&mem).unwrap();
    let (range, mut out) = ([0u64, 0u64], [0u64; 5]);
    // SAFETY: cachestat reads `range` and writes five u64s into `out`.
    let r = unsafe { libc::syscall(451, std::os::fd::AsRawFd::as_raw_fd(&f), range.as_ptr(), out.as_mut_ptr(), 0) };
    assert_eq!(r, 0);
    assert_eq!((out[1], out[2]), (0, 0), "dirty / writeback pages after ctl sync");

    assert_eq!(ctl(&sock, &["resume"])["paused"], false);
    wait_for_stats(&sock, "the resumed guest's writes", |s| guest_pages(s) > b);

    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("stopped by the control API"), "{stderr}");
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn bad_requests_get_json_errors() {
    let dir = tmpdir();
    let (child, _mem, sock) = start(&dir, "workload=idle");
    let e = raw(&sock, b"{not json\n");
    assert_eq!(e["ok"], false);
    assert!(e["error"].as_str().unwrap().starts_with("bad request"), "{e}");
    let e = raw(&sock, b"{\"cmd\":\"reboot\"}\n");
    assert!(e["error"].as_str().unwrap().contains("unknown command 'reboot'"), "{e}");
    let e = raw(&sock, b"{\"verb\":1}\n");
    assert!(e["error"].as_str().unwrap().contains("no \"cmd\""), "{e}");
    // A second smudge may not take over a live socket.
    let other = run_smudge(&[
        "--in-place",
        "--mem-file",
        path(&dir, "m2").to_str().unwrap(),
        "--mem-size",
        "16M",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    assert_eq!(other.code, 100, "{other:?}");
    assert!(other.stderr.contains("another process is listening"), "{other:?}");
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(0));
    // Something that is not a socket at the path is left alone.
    let file = path(&dir, "not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let r = run_smudge(&[
        "--in-place",
        "--mem-file",
        path(&dir, "m3").to_str().unwrap(),
        "--mem-size",
        "16M",
        "--api-sock",
        file.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 100, "{r:?}");
    assert!(r.stderr.contains("is not a socket"), "{r:?}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn a_second_client_during_a_snapshot_is_told_busy_and_the_vm_runs_on() {
    let dir = tmpdir();
    let (mem, sock) = (path(&dir, "m"), path(&dir, "api.sock"));
    // 240 MiB of written pages make the full snapshot last long enough to
    // be caught in the act: the guest zeroes its 60000 pages first (wipe=1),
    // and they are all in the memory file once harvested. It writes until
    // the test stops it.
    let cmdline = "workload=rate rate=2000 pages=60000 seed=3 writes=1000000000 wipe=1";
    let mut child = start_with_api(&mem, &sock, "256M", cmdline, Stdio::piped(), true, &[]);
    wait_for_stats(&sock, "the guest to zero its 60000 pages", |s| {
        s["dirty_log"]["guest_pages"].as_u64().unwrap_or(0) >= 60000
    });
    let (s1, s2) = (path(&dir, "s1"), path(&dir, "s2"));
    let first = {
        let (sock, s1) = (sock.clone(), s1.clone());
        std::thread::spawn(move || ctl(&sock, &["snapshot", "create", s1.to_str().unwrap()]))
    };
    // Wait until the snapshot is seen running: stats answers meanwhile.
    let t0 = Instant::now();
    let running = loop {
        let s = ctl(&sock, &["stats"]);
        assert_eq!(s["ok"], true, "{s}");
        if s["job"].is_string() {
            break s;
        }
        assert!(!first.is_finished(), "the snapshot ended before stats saw it running: {s}");
        assert!(t0.elapsed() < Duration::from_secs(60), "the snapshot never showed up in stats: {s}");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(running["job"].as_str().unwrap().contains("a snapshot into"), "{running}");
    let second = ctl(&sock, &["snapshot", "create", s2.to_str().unwrap()]);
    assert_eq!(second["ok"], false, "{second}");
    let msg = second["error"].as_str().unwrap();
    assert!(msg.starts_with("busy: a snapshot into") && msg.contains("is in progress"), "{second}");
    assert!(!s2.exists(), "the refused snapshot left a directory");
    let first = first.join().unwrap();
    assert_eq!(first["ok"], true, "{first}");
    // The VM runs on: no job left, the guest carries on, and stopped, its
    // memory checks out.
    assert!(ctl(&sock, &["stats"])["job"].is_null());
    let w = progress::guest_writes(&mem, 60000);
    progress::wait_for_writes(&mut child, &mem, 60000, w + 100);
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    progress::assert_pages_match_table(&mem, 60000);
    let v = smudge().args(["snapshot", "verify", s1.to_str().unwrap()]).output().unwrap();
    assert!(v.status.success(), "{v:?}");
}

/// Sends `line` and returns all smudge sent back, exactly as it came, up
/// to its closing the connection.
fn raw_text(sock: &Path, line: &str) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap_or_else(|e| panic!("reading to the end of the answer to {line}: {e}"));
    answer
}

/// Checks that `answer` is one JSON line refusing with exactly `error`.
fn assert_refused(answer: &str, error: &str) {
    assert!(answer.ends_with('\n') && answer.matches('\n').count() == 1, "not one line: {answer:?}");
    let v: Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
    assert_eq!(v, serde_json::json!({"ok": false, "error": error}), "{answer}");
}

/// `smudge ctl` with `args` (after `--api-sock SOCK`): its exit code,
/// stdout and stderr.
fn ctl_run(sock: &Path, args: &[&str]) -> Run {
    Run::from(smudge().args(["ctl", "--api-sock", sock.to_str().unwrap()]).args(args).output().unwrap())
}

#[test]
fn a_typoed_key_a_wrong_type_or_a_missing_field_is_refused_by_name_and_nothing_is_done() {
    let dir = tmpdir();
    let (child, _mem, sock) = start(&dir, "workload=idle");
    let snap = path(&dir, "s");
    let d = snap.to_str().unwrap();
    // The typo of "parent" that used to take a full snapshot.
    let typo = format!(r#"{{"cmd":"snapshot","dir":"{d}","parnet":"P"}}"#);
    assert_refused(
        &raw_text(&sock, &format!("{typo}\n")),
        "snapshot: unknown field `parnet`, expected one of `dir`, `parent`, `resume`, `live`, `pause_budget_ms`",
    );
    assert!(!snap.exists(), "the refused snapshot made {d}");
    let wrong_type = format!(r#"{{"cmd":"snapshot","dir":"{d}","resume":"no"}}"#);
    assert_refused(
        &raw_text(&sock, &format!("{wrong_type}\n")),
        r#"snapshot: "resume": invalid type: string "no", expected a boolean"#,
    );
    assert!(!snap.exists(), "the refused snapshot made {d}");
    assert_refused(&raw_text(&sock, "{\"cmd\":\"snapshot\",\"parent\":\"/p\"}\n"), "snapshot: missing field `dir`");
    // A command without fields takes none; a stop with a stray key does
    // not stop.
    assert_refused(
        &raw_text(&sock, "{\"cmd\":\"stop\",\"now\":true}\n"),
        "stop: unknown field `now`, there are no fields",
    );
    assert_refused(
        &raw_text(&sock, "{\"cmd\":\"migrate\",\"to\":\"127.0.0.1:1\",\"conections\":4}\n"),
        "migrate: unknown field `conections`, expected one of `to`, `downtime_ms`, `max_rounds`, \
         `bandwidth_limit`, `compress`, `auto_converge`, `verify_memory`, `local`, `postcopy_after`, `connections`, `tls_creds`, `tls_psk`, `tls_psk_identity`, `resume`",
    );
    // The VM runs on, and the request spelled right works.
    let ok = ctl(&sock, &["snapshot", "create", d]);
    assert_eq!((ok["ok"].clone(), ok["kind"].clone()), (true.into(), "full".into()), "{ok}");
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(0));
}

#[test]
fn idle_connections_do_not_hold_the_api_and_past_the_limit_ctl_is_told_busy() {
    let dir = tmpdir();
    let (child, _mem, sock) = start(&dir, "workload=idle");
    let connect = || {
        let s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    };
    // Sixteen connections that send nothing: `ctl stats` is served at once
    // (it used to get "Broken pipe" and exit 100, then "busy" for 5 s).
    let mut idle: Vec<UnixStream> = (0..16).map(|_| connect()).collect();
    let served = ctl_run(&sock, &["--json", "stats"]);
    assert_eq!(served.code, 0, "{served:?}");
    assert!(served.stdout.contains("\"ok\": true"), "{served:?}");
    // Fill the places for connections still to send their request; one
    // more is turned away at once, with its answer.
    idle.extend((16..smudge_vmm::control::api::MAX_WAITING).map(|_| connect()));
    let one_more = connect();
    let mut answer = String::new();
    BufReader::new(&one_more).read_line(&mut answer).unwrap();
    let busy = "busy: 64 connections are waiting to send their request; try again";
    assert_refused(&answer, busy);
    // The server took connections in order, so all 64 idle ones hold their
    // places now: `ctl` is told busy, prints it and exits 1.
    let refused = ctl_run(&sock, &["stats"]);
    assert_eq!((refused.code, refused.stdout.as_str()), (1, format!("error: {busy}\n").as_str()), "{refused:?}");
    let refused = ctl_run(&sock, &["--json", "stats"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    let v: Value = serde_json::from_str(&refused.stdout).unwrap();
    assert_eq!(v["error"], busy, "{refused:?}");
    // Each idle connection is answered once its time to send a request is
    // up; its place is free by then, so `ctl` is served again.
    for s in &idle {
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        assert_refused(&answer, "no request line within 10s of connecting");
    }
    let served = ctl_run(&sock, &["--json", "stats"]);
    assert_eq!(served.code, 0, "{served:?}");
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(0));
}

#[test]
fn ctl_waits_for_a_socket_that_is_not_there_yet_then_says_so() {
    let dir = tmpdir();
    let (mem, sock) = (path(&dir, "m"), path(&dir, "api.sock"));
    // `ctl` first, the VM after: what `smudge run … & smudge ctl …` does.
    let client = smudge()
        .args(["ctl", "--json", "--api-sock", sock.to_str().unwrap(), "--wait-secs", "120", "stats"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let vm = start_with_api(&mem, &sock, "64M", "workload=idle", Stdio::null(), true, &[]);
    let served = Run::from(client.wait_with_output().unwrap());
    assert_eq!(served.code, 0, "{served:?}");
    assert!(served.stdout.contains("\"ok\": true"), "{served:?}");
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    assert_eq!(vm.wait_with_output().unwrap().status.code(), Some(0));

    // Nothing ever comes: it waits as long as told, then says what is wrong.
    let missing = path(&dir, "nobody.sock");
    let t0 = Instant::now();
    let r = ctl_run(&missing, &["--wait-secs", "1", "stats"]);
    assert!(t0.elapsed() >= Duration::from_secs(1), "ctl did not wait: {r:?}");
    assert_eq!(r.code, 100, "{r:?}");
    let m = missing.display();
    assert_eq!(
        r.stderr,
        format!("smudge: error: {m}: no such socket (waited 1 s): is `smudge run --api-sock {m}` running?\n")
    );
    // A socket file nobody listens on (a smudge killed with -9 leaves one).
    let stale = path(&dir, "stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let r = ctl_run(&stale, &["--wait-secs", "1", "stats"]);
    assert_eq!(r.code, 100, "{r:?}");
    assert_eq!(
        r.stderr,
        format!(
            "smudge: error: {}: nothing serves this socket (waited 1 s) (left by a smudge that did not end cleanly?)\n",
            stale.display()
        )
    );
}
