//! Live migration: a guest moves between two smudge processes
//! on loopback and carries on; when the destination dies or the stream is
//! damaged, the source resumes its guest and both ends say why.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use smudge::migration::frame::{Frame, FrameReader, FrameWriter, Hello};

/// A `smudge migrate-recv` and what it printed so far.
struct Dest {
    child: Child,
    addr: String,
    stderr: Arc<Mutex<String>>,
    mem: PathBuf,
    serial: PathBuf,
}

impl Dest {
    fn start(dir: &tempfile::TempDir) -> Dest {
        Dest::start_with(dir, path(dir, "dst.mem"), &[])
    }

    /// A destination on `mem` with extra options (`--local`).
    fn start_with(dir: &tempfile::TempDir, mem: PathBuf, extra: &[&str]) -> Dest {
        let serial = path(dir, "dst.serial");
        let mut child = smudge()
            .args(["migrate-recv", "--listen", "0", "--accept-timeout", "60", "--timeout", "120"])
            .args(["--mem-file", mem.to_str().unwrap(), "--serial", serial.to_str().unwrap()])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (err, sink) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("smudge: waiting for a migration on ") {
                    let _ = tx.send(a.to_string());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(10)).expect("migrate-recv never said where it listens");
        Dest { child, addr, stderr, mem, serial }
    }

    fn wait(mut self) -> (i32, String, String) {
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        std::thread::sleep(Duration::from_millis(50));
        let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let err = self.stderr.lock().unwrap().clone();
        (code, err, serial)
    }
}

/// A source VM with a control socket; its serial output goes to a file.
fn source(dir: &tempfile::TempDir, cmdline: &str) -> (Child, PathBuf, PathBuf) {
    let (mem, sock, serial) = (path(dir, "src.mem"), path(dir, "src.sock"), path(dir, "src.serial"));
    let out = std::fs::File::create(&serial).unwrap();
    let child = start_with_api(&mem, &sock, "64M", cmdline, Stdio::from(out), true, &[]);
    (child, sock, serial)
}

fn finish(mut child: Child, serial: &Path) -> (i32, String, String) {
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let code = child.wait().unwrap().code().unwrap_or(-1);
    (code, err, std::fs::read_to_string(serial).unwrap())
}

fn verify_line(serial: &str) -> &str {
    serial.lines().find(|l| l.starts_with("verify: ")).unwrap_or_else(|| panic!("no verify line in:\n{serial}"))
}

/// Every one of the 4000 pages holds what the guest last wrote there.
fn assert_verified(serial: &str) {
    let v = verify_line(serial);
    assert!(v.starts_with("verify: pages=4000 ok=4000 ") && v.ends_with(" mismatches=0"), "{v}");
}

#[test]
fn a_random_writing_guest_moves_and_carries_on_with_the_same_memory() {
    require_kvm();
    let dir = tmpdir();
    let dest = Dest::start(&dir);
    let (src, sock, src_serial) = source(&dir, "workload=rate pages=4000 rate=20000 ms=4000 seed=11 verify=1");
    std::thread::sleep(Duration::from_millis(800));
    let r = ctl(&sock, &["migrate", "--to", &dest.addr, "--verify-memory", "--compress", "lz4"]);
    assert_eq!(r["ok"], true, "{r}");
    let crc = r["memory_crc32"].as_u64().expect("memory checksum");
    let rounds = r["rounds"].as_array().unwrap();
    assert!(rounds.len() >= 2, "{r}");
    let sum: u64 = rounds.iter().map(|x| x["pages"].as_u64().unwrap()).sum();
    assert_eq!(sum, r["pages_sent"].as_u64().unwrap(), "{r}");
    let downtime = r["downtime_ms"].as_f64().unwrap();
    assert!(downtime > 0.0, "{r}");
    // Same host, one clock: the destination's guest ran after the pause
    // began and before its answer was read here.
    let s2r = r["stop_to_running_ms"].as_f64().expect("stop_to_running_ms on one host");
    assert!(s2r > 0.0 && s2r <= downtime, "{r}");

    let (code, err, serial) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("migrated to {}", dest.addr)), "{err}");
    assert!(err.contains("ms to the destination's guest running"), "{err}");
    assert!(!serial.contains("workload rate done"), "the source finished the workload itself:\n{serial}");

    let (code, err, serial) = dest.wait();
    assert_eq!(code, 0, "{err}\n{serial}");
    // The same checksum both sides computed at switchover.
    assert!(err.contains(&format!("memory checksum {crc:#010x} matches the source's")), "{err}");
    assert!(serial.contains("workload rate done"), "{serial}");
    assert_eq!(verify_line(&serial), "verify: pages=4000 ok=4000 stamped=4000 mismatches=0");
}

/// A guest dirtying 4000 pages/s over 500 pages against a 4 MiB/s link
/// (1024 pages/s), migrated with the source's `extra` run options; returns
/// the migration report once the destination's memory matched.
fn migrate_faster_than_the_link(extra: &[&str]) -> Value {
    require_kvm();
    let dir = tmpdir();
    let dest = Dest::start(&dir);
    let (mem, sock, serial) = (path(&dir, "src.mem"), path(&dir, "src.sock"), path(&dir, "src.serial"));
    let out = std::fs::File::create(&serial).unwrap();
    let cmdline = "workload=rate pages=500 rate=4000 ms=60000 seed=3 verify=1";
    let src = start_with_api(&mem, &sock, "64M", cmdline, Stdio::from(out), true, extra);
    std::thread::sleep(Duration::from_millis(300));
    let r = ctl(
        &sock,
        &["migrate", "--to", &dest.addr, "--bandwidth-limit", "4M", "--downtime-ms", "50", "--verify-memory"],
    );
    assert_eq!(r["ok"], true, "{r}");
    let crc = r["memory_crc32"].as_u64().expect("memory checksum");
    let (code, err, _) = finish(src, &serial);
    assert_eq!(code, 0, "{err}");
    // The guest writes on for a minute there: its memory matched at
    // switchover; let it run a moment, then stop it.
    let mut dest = dest;
    std::thread::sleep(Duration::from_millis(300));
    assert!(dest.child.try_wait().unwrap().is_none(), "the destination stopped early");
    dest.child.kill().unwrap();
    let (_, err, _) = dest.wait();
    assert!(err.contains(&format!("memory checksum {crc:#010x} matches the source's")), "{err}");
    r
}

#[test]
fn a_guest_dirtying_faster_than_the_link_converges_by_throttling() {
    let r = migrate_faster_than_the_link(&["--dirty-log", "manual"]);
    assert!(r["converge"].as_str().unwrap().starts_with("auto-converge"), "{r}");
    assert!(r["rounds"].as_array().unwrap().iter().any(|x| x["throttle_pct"].as_u64().unwrap() >= 20), "{r}");
}

#[test]
fn with_the_ring_only_the_vcpu_that_dirties_is_held_to_a_dirty_limit() {
    // The bundled guest writes on vCPU 0; vCPU 1 waits for a SIPI.
    let r = migrate_faster_than_the_link(&["--dirty-log", "ring", "--vcpus", "2"]);
    assert!(r["converge"].as_str().unwrap().starts_with("dirty-limit"), "{r}");
    let rounds = r["rounds"].as_array().unwrap();
    assert!(rounds.iter().all(|x| x["throttle_pct"] == 0), "no global throttle with the ring: {r}");
    let limited: Vec<&Vec<Value>> = rounds.iter().filter_map(|x| x["vcpu_throttle_pct"].as_array()).collect();
    assert!(limited.iter().any(|v| v[0].as_u64().unwrap() > 0), "{r}");
    assert!(limited.iter().all(|v| v.len() == 2 && v[1] == 0), "{r}");
}

/// What a proxy between source and destination does to the stream.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Flip a byte at this offset of the source's stream.
    Flip(u64),
    /// Cut both connections after this many bytes of the source's stream.
    Cut(u64),
}

/// A relay on loopback that damages the source's stream; returns its port.
fn proxy(to: String, damage: Damage) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (src, _) = l.accept().unwrap();
        let dst = TcpStream::connect(&to).unwrap();
        let (mut src_r, mut dst_w) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let (mut dst_r, mut src_w) = (dst, src);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut dst_r, &mut src_w);
            let _ = src_w.shutdown(std::net::Shutdown::Both);
        });
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0u64;
        loop {
            let n = match src_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            match damage {
                Damage::Flip(o) if o >= at && o < at + n as u64 => buf[(o - at) as usize] ^= 0x40,
                Damage::Cut(o) if at + n as u64 >= o => {
                    let keep = (o - at) as usize;
                    let _ = dst_w.write_all(&buf[..keep]);
                    let _ = dst_w.shutdown(std::net::Shutdown::Both);
                    let _ = src_r.shutdown(std::net::Shutdown::Both);
                    return;
                }
                _ => {}
            }
            if dst_w.write_all(&buf[..n]).is_err() {
                break;
            }
            at += n as u64;
        }
        let _ = dst_w.shutdown(std::net::Shutdown::Both);
    });
    addr
}

fn damaged_stream(damage: Damage, dest_says: &str) {
    require_kvm();
    let dir = tmpdir();
    let dest = Dest::start(&dir);
    let (src, sock, src_serial) = source(&dir, "workload=rate pages=4000 rate=5000 ms=3000 seed=5 verify=1");
    std::thread::sleep(Duration::from_millis(500));
    let via = proxy(dest.addr.clone(), damage);
    let t0 = Instant::now();
    let r = ctl(&sock, &["migrate", "--to", &via]);
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("the guest runs on here"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(30));
    // The source's guest finishes its workload and its memory checks out.
    let (code, err, serial) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}\n{serial}");
    assert!(serial.contains("workload rate done"), "{serial}");
    assert_verified(&serial);
    let mem = dest.mem.clone();
    let (code, err, _) = dest.wait();
    assert_eq!(code, 100, "{err}");
    assert!(err.contains(dest_says), "destination: {err}");
    assert!(!mem.exists(), "the destination left a partial memory file");
}

#[test]
fn a_corrupted_stream_is_refused_and_the_source_resumes() {
    // Well inside round 0's page data.
    damaged_stream(Damage::Flip(300_000), "fails its CRC-32 check");
}

#[test]
fn a_cut_stream_is_refused_and_the_source_resumes() {
    damaged_stream(Damage::Cut(300_000), "the peer closed the migration stream");
}

#[test]
fn killing_the_destination_mid_stream_resumes_the_source() {
    require_kvm();
    let dir = tmpdir();
    let mut dest = Dest::start(&dir);
    let (src, sock, src_serial) = source(&dir, "workload=rate pages=4000 rate=5000 ms=4000 seed=6 verify=1");
    std::thread::sleep(Duration::from_millis(300));
    // 16 MiB of pages at 2 MiB/s: round 0 alone takes seconds.
    let (s2, to) = (sock.clone(), dest.addr.clone());
    let answer = std::thread::spawn(move || ctl(&s2, &["migrate", "--to", &to, "--bandwidth-limit", "2M"]));
    std::thread::sleep(Duration::from_millis(1000));
    dest.child.kill().unwrap();
    let r: Value = answer.join().unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("the guest runs on here"), "{r}");
    let st = ctl(&sock, &["stats"]);
    assert_eq!(st["paused"], false, "{st}");
    let (code, err, serial) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    assert_verified(&serial);
    let _ = dest.wait();
}

/// What a fake source sends after its Hello was accepted.
type SendAfterHello = dyn FnOnce(&mut FrameWriter<TcpStream>);

/// A fake source: Hello, then whatever `after` sends.
fn fake_source(addr: &str, after: impl FnOnce(&mut FrameWriter<TcpStream>)) -> Option<Frame> {
    let s = TcpStream::connect(addr).unwrap();
    let mut r = FrameReader::new(s.try_clone().unwrap());
    let mut w = FrameWriter::new(s, false);
    let mem = 64u64 << 20;
    w.send(&Frame::Hello(Hello::new(mem, 1))).unwrap();
    match r.next_frame().unwrap() {
        Frame::Ack(a) if a.ok => {}
        other => return Some(other),
    }
    after(&mut w);
    r.next_frame().ok()
}

#[test]
fn the_destination_checks_every_frame_before_touching_memory() {
    require_kvm();
    let cases: Vec<(&str, Box<SendAfterHello>)> = vec![
        ("lie outside", Box::new(|w| w.send(&Frame::Pages { offset: 64 << 20, data: vec![1; 4096] }).unwrap())),
        (
            "unexpected Hello",
            Box::new(|w| w.send(&Frame::Hello(Hello { layout: vec![], ..Hello::new(0, 1) })).unwrap()),
        ),
        ("Done before the machine state", Box::new(|w| w.send(&Frame::Done { pages: 0, zero_pages: 0 }).unwrap())),
        ("the source aborted the migration: test", Box::new(|w| w.send(&Frame::Abort("test".into())).unwrap())),
    ];
    for (says, after) in cases {
        let dir = tmpdir();
        let dest = Dest::start(&dir);
        let answer = fake_source(&dest.addr, after);
        let mem = dest.mem.clone();
        let (code, err, _) = dest.wait();
        assert_eq!(code, 100, "{says}: {err}");
        assert!(err.contains(says), "{says}: {err}");
        match answer {
            Some(Frame::Ack(a)) => assert!(!a.ok && a.error.unwrap_or_default().contains(says)),
            other => panic!("{says}: the fake source got {other:?}"),
        }
        assert!(!mem.exists(), "{says}: a memory file was left behind");
    }
}

#[test]
fn a_local_handover_sends_no_pages_and_the_guest_carries_on_in_the_same_file() {
    require_kvm();
    let dir = tmpdir();
    let (src, sock, src_serial) = source(&dir, "workload=rate pages=4000 rate=20000 ms=3000 seed=12 verify=1");
    let dest = Dest::start_with(&dir, path(&dir, "src.mem"), &["--local"]);
    std::thread::sleep(Duration::from_millis(800));
    let r = ctl(&sock, &["migrate", "--to", &dest.addr, "--local", "--verify-memory"]);
    assert_eq!(r["ok"], true, "{r}");
    // Only Hello, the machine state and Done crossed: no page, no zero marker.
    assert_eq!(r["pages_sent"], 0, "{r}");
    assert_eq!(r["zero_pages_sent"], 0, "{r}");
    let bytes = r["bytes_sent"].as_u64().unwrap();
    assert!(bytes < 64 * 1024, "{bytes} bytes sent for a handover: {r}");
    assert_eq!(r["rounds"].as_array().unwrap().len(), 1, "one paused round only: {r}");
    let downtime = r["downtime_ms"].as_f64().unwrap();
    assert!(downtime > 0.0, "{r}");
    let crc = r["memory_crc32"].as_u64().expect("memory checksum");

    let (code, err, serial) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("migrated to {}", dest.addr)), "{err}");
    assert!(!serial.contains("workload rate done"), "the source finished the workload itself:\n{serial}");
    let (code, err, serial) = dest.wait();
    assert_eq!(code, 0, "{err}\n{serial}");
    assert!(err.contains(&format!("memory checksum {crc:#010x} matches the source's")), "{err}");
    assert!(err.contains("received: 0 MiB"), "{err}");
    assert!(serial.contains("workload rate done"), "{serial}");
    assert_eq!(verify_line(&serial), "verify: pages=4000 ok=4000 stamped=4000 mismatches=0");
}

#[test]
fn a_local_handover_to_another_file_is_refused_and_the_source_carries_on() {
    require_kvm();
    let dir = tmpdir();
    let (src, sock, src_serial) = source(&dir, "workload=rate pages=4000 rate=20000 ms=2500 seed=13 verify=1");
    // Same size, another inode: the destination must not run the guest on it.
    let other = path(&dir, "other.mem");
    std::fs::File::create(&other).unwrap().set_len(64 << 20).unwrap();
    let dest = Dest::start_with(&dir, other, &["--local"]);
    std::thread::sleep(Duration::from_millis(500));
    let r = ctl(&sock, &["migrate", "--to", &dest.addr, "--local"]);
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("not the source's RAM file"), "{e}");
    let (code, err, _) = dest.wait();
    assert_ne!(code, 0);
    assert!(err.contains("not the source's RAM file"), "{err}");

    // A destination that expects pages refuses a handover, and says how to take one.
    let dest = Dest::start(&dir);
    let r = ctl(&sock, &["migrate", "--to", &dest.addr, "--local"]);
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("start migrate-recv with --local"), "{r}");
    let (code, _, _) = dest.wait();
    assert_ne!(code, 0);

    let (code, err, serial) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    assert!(serial.contains("workload rate done"), "{serial}");
    assert_verified(&serial);
}

/// A directory on tmpfs for a post-copy destination's memory file.
fn shm_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("smudge-test-").tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is needed")
}

#[test]
fn post_copy_sends_every_owed_page_exactly_once_and_the_guest_carries_on() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    let dest = Dest::start_with(&dir, shm.path().join("dst.mem"), &[]);
    let (src, sock, src_serial) = source(&dir, "workload=random pages=4000 ms=3000 seed=14 verify=1");
    std::thread::sleep(Duration::from_millis(700));
    let r = ctl(&sock, &["migrate", "--to", &dest.addr, "--postcopy"]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["converge"], "post-copy", "{r}");
    let pc = &r["postcopy"];
    let n = |k: &str| pc[k].as_u64().unwrap_or_else(|| panic!("no {k} in {r}"));
    // Every owed page went exactly once: asked for, streamed or zero.
    assert!(n("owed_pages") >= 4000, "{r}");
    assert_eq!(n("pages_on_demand") + n("pages_streamed") + n("zero_pages"), n("owed_pages"), "{r}");
    assert_eq!(n("pages_on_demand") + n("pages_streamed"), r["pages_sent"].as_u64().unwrap(), "{r}");
    // The guest ran on the destination at once and faulted on pages still
    // here (whether a request or the stream delivered the page first is a
    // race; either way it went once).
    assert!(n("requests") >= 1, "{r}");

    let (code, err, serial) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    assert!(!serial.contains("workload random done"), "the source finished the workload itself:\n{serial}");
    let (code, err, serial) = dest.wait();
    assert_eq!(code, 0, "{err}\n{serial}");
    // The destination counted the same pages, each accepted once (it refuses a repeat).
    let line = err.lines().find(|l| l.contains("post-copy from") && l.contains(" done in ")).expect(&err);
    let want = format!(
        "{} pages owed, {} data + {} zero pages received",
        n("owed_pages"),
        n("pages_on_demand") + n("pages_streamed"),
        n("zero_pages")
    );
    assert!(line.contains(&want), "{line}\nwant: {want}");
    assert!(serial.contains("workload random done"), "{serial}");
    assert!(verify_line(&serial).ends_with(" mismatches=0"), "{serial}");
}

#[test]
fn post_copy_after_pre_copy_rounds_carries_a_fast_writer_over_a_slow_link() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    let dest = Dest::start_with(&dir, shm.path().join("dst.mem"), &[]);
    // 4000 pages/s over 500 pages against a 4 MiB/s link: pre-copy alone
    // would need throttling; two rounds, then post-copy.
    let (src, sock, src_serial) = source(&dir, "workload=rate pages=500 rate=4000 ms=4000 seed=15 verify=1");
    std::thread::sleep(Duration::from_millis(500));
    let r = ctl(
        &sock,
        &["migrate", "--to", &dest.addr, "--postcopy-after", "2", "--bandwidth-limit", "4M", "--no-auto-converge"],
    );
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["converge"].as_str().unwrap().contains("post-copy"), "{r}");
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3, "rounds 0 and 1, then the post-copy phase: {r}");
    let pc = &r["postcopy"];
    let owed = pc["owed_pages"].as_u64().unwrap();
    assert!(owed > 0 && owed <= 500 + 64, "only the pages dirtied since the last round are owed: {r}");
    let (code, err, _) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    let (code, err, serial) = dest.wait();
    assert_eq!(code, 0, "{err}\n{serial}");
    assert!(serial.contains("workload rate done"), "{serial}");
    assert!(verify_line(&serial).ends_with(" mismatches=0"), "{serial}");
}

#[test]
fn losing_the_source_during_post_copy_stops_the_destination_with_a_clear_error() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    let dst_sock = path(&dir, "dst.sock");
    let dest = Dest::start_with(&dir, shm.path().join("dst.mem"), &["--api-sock", dst_sock.to_str().unwrap()]);
    let (mut src, sock, _) = source(&dir, "workload=random pages=6000 ms=20000 seed=16 verify=1");
    std::thread::sleep(Duration::from_millis(500));
    // A slow link keeps the post-copy phase going for seconds.
    let ctl_child = smudge()
        .args(["ctl", "--json", "--api-sock", sock.to_str().unwrap(), "migrate", "--to", &dest.addr])
        .args(["--postcopy", "--bandwidth-limit", "2M"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !dest.stderr.lock().unwrap().contains("the guest runs here now") {
        assert!(t0.elapsed() < Duration::from_secs(10), "no switchover: {}", dest.stderr.lock().unwrap());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    // Its memory file is not whole yet: nothing may copy it.
    let r = ctl(&dst_sock, &["snapshot", "create", path(&dir, "snap").to_str().unwrap()]);
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("memory is still loading"), "{r}");
    src.kill().unwrap();
    src.wait().unwrap();
    let t1 = Instant::now();
    let (code, err, _) = dest.wait();
    assert!(t1.elapsed() < Duration::from_secs(10), "the destination hung for {:?}", t1.elapsed());
    assert_eq!(code, 107, "{err}");
    assert!(err.contains("failed after the switchover") && err.contains("the guest cannot continue"), "{err}");
    let mut ctl_child = ctl_child;
    let _ = ctl_child.wait();
}

#[test]
fn losing_the_destination_during_post_copy_keeps_the_guest_paused_at_the_source() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    let dest = Dest::start_with(&dir, shm.path().join("dst.mem"), &[]);
    let mut dest = dest;
    let (src, sock, src_serial) = source(&dir, "workload=random pages=6000 ms=20000 seed=17 verify=1");
    std::thread::sleep(Duration::from_millis(500));
    let (stderr, addr) = (dest.stderr.clone(), dest.addr.clone());
    let killer = std::thread::spawn(move || {
        let t0 = Instant::now();
        while !stderr.lock().unwrap().contains("the guest runs here now") {
            assert!(t0.elapsed() < Duration::from_secs(10), "no switchover");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        dest.child.kill().unwrap();
        dest.child.wait().unwrap();
    });
    let r = ctl(&sock, &["migrate", "--to", &addr, "--postcopy", "--bandwidth-limit", "2M"]);
    killer.join().unwrap();
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("post-copy broke after the switchover") && e.contains("stays paused here"), "{e}");
    assert_eq!(ctl(&sock, &["stats"])["paused"], true);
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    let (code, err, _) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn post_copy_to_a_memory_file_on_disk_is_refused_and_the_source_carries_on() {
    require_kvm();
    let dir = tmpdir();
    // The test's temporary directory is on disk, not tmpfs.
    assert!(!smudge::uffd::on_tmpfs(dir.path()).unwrap(), "the test needs a non-tmpfs temp dir");
    let dest = Dest::start(&dir);
    let (src, sock, src_serial) = source(&dir, "workload=rate pages=4000 rate=20000 ms=2000 seed=18 verify=1");
    std::thread::sleep(Duration::from_millis(300));
    let r = ctl(&sock, &["migrate", "--to", &dest.addr, "--postcopy"]);
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("post-copy needs the destination's memory file on tmpfs"), "{r}");
    let (code, err, _) = dest.wait();
    assert_ne!(code, 0, "{err}");
    let (code, err, serial) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    assert!(serial.contains("workload rate done"), "{serial}");
    assert_verified(&serial);
}

#[test]
fn four_connections_carry_the_pages_and_the_guest_carries_on() {
    require_kvm();
    let dir = tmpdir();
    let dest = Dest::start(&dir);
    let (src, sock, src_serial) = source(&dir, "workload=rate pages=4000 rate=20000 ms=4000 seed=19 verify=1");
    std::thread::sleep(Duration::from_millis(800));
    let r = ctl(&sock, &["migrate", "--to", &dest.addr, "--connections", "4", "--verify-memory", "--compress", "lz4"]);
    assert_eq!(r["ok"], true, "{r}");
    let per: Vec<u64> = r["connection_pages"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(per.len(), 4, "{r}");
    assert_eq!(per.iter().sum::<u64>(), r["pages_sent"].as_u64().unwrap(), "{r}");
    assert!(per.iter().all(|&p| p > 500), "round 0's ~4000 pages are shared out: {per:?}");
    let crc = r["memory_crc32"].as_u64().expect("memory checksum");
    let (code, err, _) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    let (code, err, serial) = dest.wait();
    assert_eq!(code, 0, "{err}\n{serial}");
    assert!(err.contains(&format!("memory checksum {crc:#010x} matches the source's")), "{err}");
    assert!(serial.contains("workload rate done"), "{serial}");
    assert_eq!(verify_line(&serial), "verify: pages=4000 ok=4000 stamped=4000 mismatches=0");
}

/// Forwards every connection to `to`, but cuts the `cut`-th one (0: the
/// first) after `after` bytes from the source.
fn cutting_proxy(to: String, cut: usize, after: usize) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for (i, src) in l.incoming().enumerate() {
            let Ok(src) = src else { return };
            let dst = TcpStream::connect(&to).unwrap();
            let (mut src_r, mut dst_w) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
            let (mut dst_r, mut src_w) = (dst, src);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut dst_r, &mut src_w);
                let _ = src_w.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut at = 0;
                loop {
                    let n = match src_r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if i == cut && at + n >= after {
                        let _ = dst_w.write_all(&buf[..after - at]);
                        break;
                    }
                    if dst_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    at += n;
                }
                let _ = dst_w.shutdown(std::net::Shutdown::Both);
                let _ = src_r.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

#[test]
fn a_page_connection_cut_mid_stream_resumes_the_source() {
    require_kvm();
    let dir = tmpdir();
    let dest = Dest::start(&dir);
    let (src, sock, src_serial) = source(&dir, "workload=rate pages=4000 rate=5000 ms=3000 seed=20 verify=1");
    std::thread::sleep(Duration::from_millis(500));
    // The third connection (the second extra one) dies inside round 0.
    let via = cutting_proxy(dest.addr.clone(), 2, 200_000);
    let r = ctl(&sock, &["migrate", "--to", &via, "--connections", "3"]);
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("the guest runs on here"), "{e}");
    let (code, err, serial) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}\n{serial}");
    assert!(serial.contains("workload rate done"), "{serial}");
    assert_verified(&serial);
    let (code, err, _) = dest.wait();
    assert_eq!(code, 100, "{err}");
    assert!(err.contains("page connection 2"), "destination: {err}");
}
