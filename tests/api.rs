//! The control API (issue 5, item 1; used by issue 4's `ctl sync`/`stats`):
//! a running smudge answers stats, pause, resume, sync and stop over its
//! unix socket; bad requests get a JSON error, never a dropped connection.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

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

#[test]
fn stats_pause_resume_sync_stop() {
    let dir = tmpdir();
    let (child, mem, sock) = start(&dir, "workload=rate rate=2000 ms=20000");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
    // Wait for the flusher's first harvest (every 250 ms by default).
    let t0 = Instant::now();
    let s = loop {
        let s = ctl(&sock, &["stats"]);
        if s["dirty_log"]["harvests"].as_u64().unwrap_or(0) > 0 || t0.elapsed() > Duration::from_secs(5) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(s["ok"], true, "{s}");
    assert!(s["dirty_log"]["mechanism"].as_str().unwrap().starts_with("manual"), "{s}");
    assert!(s["writeback"]["nr_dirtied"].as_u64().unwrap() > 0, "{s}");

    let p = ctl(&sock, &["pause"]);
    assert_eq!((p["ok"].clone(), p["paused"].clone(), p["vcpus"].clone()), (true.into(), true.into(), 1.into()), "{p}");
    // Writes made just before the pause reach the counters at the next
    // harvest (every 250 ms); after that nothing may change.
    std::thread::sleep(Duration::from_millis(600));
    let a = guest_pages(&ctl(&sock, &["stats"]));
    std::thread::sleep(Duration::from_millis(600));
    let b = guest_pages(&ctl(&sock, &["stats"]));
    assert_eq!(a, b, "the guest wrote while paused");
    // Paused, a sync leaves nothing dirty for the kernel either.
    let y = ctl(&sock, &["sync"]);
    assert_eq!(y["ok"], true, "{y}");
    let f = std::fs::File::open(&mem).unwrap();
    let (range, mut out) = ([0u64, 0u64], [0u64; 5]);
    // SAFETY: cachestat reads `range` and writes five u64s into `out`.
    let r = unsafe { libc::syscall(451, std::os::fd::AsRawFd::as_raw_fd(&f), range.as_ptr(), out.as_mut_ptr(), 0) };
    assert_eq!(r, 0);
    assert_eq!((out[1], out[2]), (0, 0), "dirty / writeback pages after ctl sync");

    assert_eq!(ctl(&sock, &["resume"])["paused"], false);
    std::thread::sleep(Duration::from_millis(400));
    assert!(guest_pages(&ctl(&sock, &["stats"])) > b, "the guest did not resume");

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
    let (child, _mem, sock) = start(&dir, "workload=idle ms=20000");
    let e = raw(&sock, b"{not json\n");
    assert_eq!(e["ok"], false);
    assert!(e["error"].as_str().unwrap().starts_with("bad request"), "{e}");
    let e = raw(&sock, b"{\"cmd\":\"reboot\"}\n");
    assert!(e["error"].as_str().unwrap().contains("unknown command 'reboot'"), "{e}");
    let e = raw(&sock, b"{\"verb\":1}\n");
    assert!(e["error"].as_str().unwrap().contains("no \"cmd\""), "{e}");
    // A second smudge may not take over a live socket.
    let other = run_smudge(&[
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
    // be caught in the act.
    let cmdline = "workload=rate rate=2000 pages=60000 seed=3 ms=8000 wipe=1 verify=1";
    let child = start_with_api(&mem, &sock, "256M", cmdline, Stdio::piped(), true, &[]);
    std::thread::sleep(Duration::from_millis(1500));
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
        assert!(t0.elapsed() < Duration::from_secs(10), "the snapshot never showed up in stats: {s}");
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
    // The VM runs on: no job left, and the guest finishes and verifies.
    assert!(ctl(&sock, &["stats"])["job"].is_null());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("verify: pages=60000") && stdout.contains("mismatches=0"), "{stdout}");
    let v = smudge().args(["snapshot", "verify", s1.to_str().unwrap()]).output().unwrap();
    assert!(v.status.success(), "{v:?}");
}
