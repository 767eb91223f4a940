//! A migration's progress shows round 0 while it is sent: over a capped
//! link round 0 takes long, and `stats.progress` stayed null throughout.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use smudge_testkit::*;

#[test]
fn a_capped_round_0_shows_its_progress_as_it_goes() {
    require_kvm();
    let dir = tmpdir();
    let (mem, sock) = (path(&dir, "m"), path(&dir, "api.sock"));
    // A writer that stamps its 4000 pages (nonzero: round 0 sends them;
    // zero pages it skips) and goes on.
    let cmdline = "workload=rate pages=4000 rate=4000 ms=600000 seed=3";
    let mut vm = start_with_api(&mem, &sock, "64M", cmdline, Stdio::null(), false, &[]);
    let t0 = Instant::now();
    loop {
        let bytes = std::fs::read(&mem).unwrap();
        let data = bytes.chunks(4096).filter(|p| p.iter().any(|&b| b != 0)).count();
        if data >= 3000 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the guest stamped only {data} pages");
        std::thread::sleep(Duration::from_millis(20));
    }

    let serial = path(&dir, "dst.serial");
    let mut dest = smudge()
        .args(["migrate-recv", "--listen", "0", "--accept-timeout", "60", "--timeout", "120"])
        .args(["--mem-file", path(&dir, "dst.mem").to_str().unwrap(), "--serial", serial.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let dest_log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let (err, sink) = (dest.stderr.take().unwrap(), dest_log.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("smudge: waiting for a migration on ") {
                let _ = tx.send(a.to_string());
            }
            sink.lock().unwrap_or_else(|p| p.into_inner()).push_str(&(line + "\n"));
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).expect("migrate-recv never said where it listens");

    // 12 MiB and more at 1 MiB/s: round 0 is sent a frame (1 MiB) at a
    // time for seconds.
    let (s2, to) = (sock.clone(), addr.clone());
    let answer = std::thread::spawn(move || ctl(&s2, &["migrate", "--to", &to, "--bandwidth-limit", "1M"]));
    let round0 = |p: &Value| p["round"] == 0 && p["sending"] == true;
    let mut seen: Vec<Value> = Vec::new();
    let t0 = Instant::now();
    loop {
        let st = ctl(&sock, &["stats"]);
        let p = st["progress"].clone();
        if round0(&p) {
            let grew = seen.first().is_some_and(|f| p["bytes_sent"].as_u64() > f["bytes_sent"].as_u64());
            seen.push(p);
            if grew {
                break;
            }
        } else {
            // Progress is null until the first frame goes out; after
            // that, round 0 must not end unseen.
            assert!(
                p.is_null() && seen.is_empty() && !answer.is_finished(),
                "round 0 ended before its progress was seen growing; seen {seen:?}, now {st}\ndestination:\n{}",
                dest_log.lock().unwrap_or_else(|p| p.into_inner())
            );
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no round 0 progress seen growing: {seen:?}, now {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (first, last) = (&seen[0], &seen[seen.len() - 1]);
    assert!(
        last["remaining_pages"].as_u64() < first["remaining_pages"].as_u64(),
        "pages to go did not fall: {first} -> {last}"
    );
    // Round 0 reads the data ranges of 64 MiB of RAM at most.
    assert!(first["remaining_pages"].as_u64().unwrap() <= 16384, "{first}");
    assert!(last["rate_mbps"].as_f64().unwrap() > 0.0, "{last}");

    // Ending the destination ends the migration; the guest runs on here.
    dest.kill().unwrap();
    let r: Value = answer.join().unwrap();
    assert_eq!(r["ok"], false, "{r}");
    let st = ctl(&sock, &["stats"]);
    assert_eq!((st["paused"].clone(), st["progress"].clone()), (false.into(), Value::Null), "{st}");
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    assert_eq!(vm.wait().unwrap().code(), Some(0));
    let _ = dest.wait();
}
