//! Live migration: a guest moves between two smudge processes
//! on loopback and carries on; when the destination dies or the stream is
//! damaged, the source resumes its guest and both ends say why.
//!
//! Nothing here waits a set time: a source guest writes until the test
//! stops it, and each test waits for what it needs — the guest's writes
//! (its generation table, read from the memory file), round 0 under way,
//! the switchover line — then checks memory page by page against the
//! guest's table and the table against a replay of the guest's PRNG.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use smudge::migration::frame::{Frame, FrameReader, FrameWriter, Hello};
use smudge_testkit::*;

#[path = "common/test_ca.rs"]
mod test_ca;
use test_ca::Ca;

#[path = "common/dest.rs"]
mod dest;
use dest::Dest;

/// Working-set pages of the source guests that use [`endless`].
const PAGES: u64 = 4000;

/// A random-writing guest over `pages` pages (`rate` page writes per
/// second, `0`: as fast as it can) whose workload never ends by itself: a
/// test stops it (`ctl stop`, a kill) once it has seen what it needs, so
/// no guest deadline races a slow migration on a busy machine.
fn endless(pages: u64, rate: u64, seed: u64) -> String {
    let workload = if rate == 0 { "workload=random".to_string() } else { format!("workload=rate rate={rate}") };
    format!("{workload} pages={pages} writes=1000000000 seed={seed}")
}

impl Dest {
    fn start(dir: &tempfile::TempDir) -> Dest {
        Dest::start_with(dir, path(dir, "dst.mem"), &[])
    }

    /// A destination on `mem` with extra options (`--local`).
    fn start_with(dir: &tempfile::TempDir, mem: PathBuf, extra: &[&str]) -> Dest {
        Dest::listening(dir, "0", mem, extra)
    }

    /// A destination listening on `listen` (a port, `unix:PATH`).
    fn listening(dir: &tempfile::TempDir, listen: &str, mem: PathBuf, extra: &[&str]) -> Dest {
        Dest::spawn(dir, listen, mem, &[&["--timeout", "120"][..], extra].concat())
    }

    /// Waits until `ok` holds (see [`Dest::wait_until`]).
    fn wait_for(&mut self, what: &str, ok: impl Fn(&Dest) -> bool) {
        self.wait_until(what, |d| ok(d).then_some(()));
    }

    /// Whether its stderr holds `text` so far.
    fn said(&self, text: &str) -> bool {
        self.stderr.lock().unwrap().contains(text)
    }

    /// Its guest (over `pages` pages) carries on: it makes 100 page writes
    /// more than it had made now; then `ctl stop` ends the run.
    fn carries_on_then_stops(&mut self, pages: u64) {
        self.wait_for("its API socket", |d| d.sock.exists());
        let start = progress::guest_writes(&self.mem, pages);
        self.wait_for("its guest to make 100 more page writes", |d| {
            progress::guest_writes(&d.mem, pages) >= start + 100
        });
        let r = ctl(&self.sock, &["stop"]);
        assert_eq!(r["ok"], true, "stop: {r}\n{}", self.log());
    }
}

/// A source VM with a control socket; its serial output goes to a file.
fn source(dir: &tempfile::TempDir, cmdline: &str) -> (Child, PathBuf, PathBuf) {
    let (mem, sock, serial) = (src_mem(dir), path(dir, "src.sock"), path(dir, "src.serial"));
    let out = std::fs::File::create(&serial).unwrap();
    let child = start_with_api(&mem, &sock, "64M", cmdline, Stdio::from(out), true, &[]);
    (child, sock, serial)
}

/// The source's memory file.
fn src_mem(dir: &tempfile::TempDir) -> PathBuf {
    path(dir, "src.mem")
}

/// The guest of `vm` (on `mem`, `pages` pages, API at `sock`) carries on:
/// it makes 100 page writes more than it had made now; then `ctl stop`
/// ends the run.
fn carries_on_then_stops(vm: &mut Child, sock: &Path, mem: &Path, pages: u64) {
    let start = progress::guest_writes(mem, pages);
    progress::wait_for_writes(vm, mem, pages, start + 100);
    let r = ctl(sock, &["stop"]);
    if r["ok"] != true {
        progress::fail(vm, &format!("stop: {r}"));
    }
}

/// The memory a stopped [`endless`] guest left in `mem` (`pages` pages,
/// `seed`): its generation table is exactly the replay of as many writes
/// of its PRNG as it counts (no write lost, none repeated), and every page
/// holds the stamp its entry names (the one write cut short by the stop
/// aside).
fn assert_replayed(mem: &Path, pages: u64, seed: u64) {
    let stamped = progress::assert_pages_match_table(mem, pages);
    let gens = progress::generations(mem, pages);
    let total: u64 = gens.iter().map(|&g| u64::from(g)).sum();
    let want = random_generations(seed, pages, total as usize);
    let differ = gens.iter().zip(&want).filter(|(&g, &w)| u64::from(g) != w).count();
    assert_eq!(differ, 0, "{differ} table entries are not the replay of {total} writes of seed {seed}");
    assert_eq!(stamped, want.iter().filter(|&&g| g > 0).count() as u64);
}

fn finish(mut child: Child, serial: &Path) -> (i32, String, String) {
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let code = child.wait().unwrap().code().unwrap_or(-1);
    (code, err, std::fs::read_to_string(serial).unwrap())
}

#[test]
fn a_random_writing_guest_moves_and_carries_on_with_the_same_memory() {
    require_kvm();
    let dir = tmpdir();
    let dest = Dest::start(&dir);
    moves_with_the_same_memory(&dir, dest, &[], 11);
}

#[test]
fn over_a_unix_socket_with_two_connections_the_guest_moves_with_the_same_memory() {
    require_kvm();
    let dir = tmpdir();
    let at = path(&dir, "migrate.sock");
    let dest = Dest::listening(&dir, &format!("unix:{}", at.display()), path(&dir, "dst.mem"), &[]);
    assert_eq!(dest.addr, format!("unix:{}", at.display()));
    let r = moves_with_the_same_memory(&dir, dest, &["--connections", "2"], 21);
    let per: Vec<u64> = r["connection_pages"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(per.len() == 2 && per.iter().all(|&p| p > 0), "both connections carried pages: {r}");
    // The destination removed its socket once the source was in.
    assert!(!at.exists(), "{} outlived the migration", at.display());
}

/// Migrates a random-writing guest (seed `seed`) to `dest` with `extra`
/// `ctl migrate` options; checks the report, that both ends say the same
/// memory checksum, and the destination's memory against the guest's
/// PRNG. Returns the report.
fn moves_with_the_same_memory(dir: &tempfile::TempDir, mut dest: Dest, extra: &[&str], seed: u64) -> Value {
    let (mut src, sock, src_serial) = source(dir, &endless(PAGES, 20000, seed));
    // Round 0 has stamped pages to send, and the guest dirties more meanwhile.
    progress::wait_for_writes(&mut src, &src_mem(dir), PAGES, 2000);
    let mut args = vec!["migrate", "--to", &dest.addr, "--verify-memory", "--compress", "lz4"];
    args.extend(extra);
    let r = ctl(&sock, &args);
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

    dest.carries_on_then_stops(PAGES);
    let mem = dest.mem.clone();
    let (code, err, serial) = dest.wait();
    assert_eq!(code, 0, "{err}\n{serial}");
    // The same checksum both sides computed at switchover.
    assert!(err.contains(&format!("memory checksum {crc:#010x} matches the source's")), "{err}");
    assert_replayed(&mem, PAGES, seed);
    r
}

/// A guest dirtying 4000 pages/s over 500 pages against a 4 MiB/s link
/// (1024 pages/s), migrated with the source's `extra` run options; returns
/// the migration report once the destination's memory matched.
fn migrate_faster_than_the_link(extra: &[&str]) -> Value {
    require_kvm();
    let dir = tmpdir();
    let mut dest = Dest::start(&dir);
    let (mem, sock, serial) = (src_mem(&dir), path(&dir, "src.sock"), path(&dir, "src.serial"));
    let out = std::fs::File::create(&serial).unwrap();
    let mut src = start_with_api(&mem, &sock, "64M", &endless(500, 4000, 3), Stdio::from(out), true, extra);
    progress::wait_for_writes(&mut src, &mem, 500, 500);
    let r = ctl(
        &sock,
        &["migrate", "--to", &dest.addr, "--bandwidth-limit", "4M", "--downtime-ms", "50", "--verify-memory"],
    );
    assert_eq!(r["ok"], true, "{r}");
    let crc = r["memory_crc32"].as_u64().expect("memory checksum");
    let (code, err, _) = finish(src, &serial);
    assert_eq!(code, 0, "{err}");
    // Its memory matched at switchover; the guest writes on there.
    dest.carries_on_then_stops(500);
    let mem = dest.mem.clone();
    let (code, err, _) = dest.wait();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("memory checksum {crc:#010x} matches the source's")), "{err}");
    assert_replayed(&mem, 500, 3);
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
    let (mut src, sock, src_serial) = source(&dir, &endless(PAGES, 5000, 5));
    // Over 1500 stamped pages: round 0 carries megabytes of page data.
    progress::wait_for_writes(&mut src, &src_mem(&dir), PAGES, 2000);
    let via = proxy(dest.addr.clone(), damage);
    let t0 = Instant::now();
    let r = ctl(&sock, &["migrate", "--to", &via]);
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("the guest runs on here"), "{e}");
    assert!(t0.elapsed() < progress::WAIT, "the failed migration took {:?}", t0.elapsed());
    // The source's guest carries on and its memory checks out.
    carries_on_then_stops(&mut src, &sock, &src_mem(&dir), PAGES);
    let (code, err, serial) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}\n{serial}");
    assert_replayed(&src_mem(&dir), PAGES, 5);
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
    let (mut src, sock, src_serial) = source(&dir, &endless(PAGES, 5000, 6));
    // Over 1500 stamped pages, 6 MiB at 2 MiB/s: round 0 alone takes seconds.
    progress::wait_for_writes(&mut src, &src_mem(&dir), PAGES, 2000);
    let (s2, to) = (sock.clone(), dest.addr.clone());
    let answer = std::thread::spawn(move || ctl(&s2, &["migrate", "--to", &to, "--bandwidth-limit", "2M"]));
    progress::wait_for_stats(&mut src, &sock, "round 0 to send pages", |s| {
        s["progress"]["bytes_sent"].as_u64().is_some_and(|b| b > 0)
    });
    dest.child.kill().unwrap();
    let r: Value = answer.join().unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("the guest runs on here"), "{r}");
    let st = ctl(&sock, &["stats"]);
    assert_eq!(st["paused"], false, "{st}");
    carries_on_then_stops(&mut src, &sock, &src_mem(&dir), PAGES);
    let (code, err, _) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    assert_replayed(&src_mem(&dir), PAGES, 6);
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
    let (mut src, sock, src_serial) = source(&dir, &endless(PAGES, 20000, 12));
    let mut dest = Dest::start_with(&dir, src_mem(&dir), &["--local"]);
    progress::wait_for_writes(&mut src, &src_mem(&dir), PAGES, 2000);
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
    dest.carries_on_then_stops(PAGES);
    let (code, err, serial) = dest.wait();
    assert_eq!(code, 0, "{err}\n{serial}");
    assert!(err.contains(&format!("memory checksum {crc:#010x} matches the source's")), "{err}");
    assert!(err.contains("received: 0 MiB"), "{err}");
    assert_replayed(&src_mem(&dir), PAGES, 12);
}

#[test]
fn a_local_handover_to_another_file_is_refused_and_the_source_carries_on() {
    require_kvm();
    let dir = tmpdir();
    let (mut src, sock, src_serial) = source(&dir, &endless(PAGES, 20000, 13));
    // Same size, another inode: the destination must not run the guest on it.
    let other = path(&dir, "other.mem");
    std::fs::File::create(&other).unwrap().set_len(64 << 20).unwrap();
    let dest = Dest::start_with(&dir, other, &["--local"]);
    progress::wait_for_writes(&mut src, &src_mem(&dir), PAGES, 500);
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

    carries_on_then_stops(&mut src, &sock, &src_mem(&dir), PAGES);
    let (code, err, _) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    assert_replayed(&src_mem(&dir), PAGES, 13);
}

/// A directory on tmpfs for a post-copy destination's memory file.
fn shm_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("smudge-test-").tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is needed")
}

#[test]
fn post_copy_sends_every_owed_page_exactly_once_and_the_guest_carries_on() {
    post_copy_moves_every_owed_page_once("0", 14, None);
}

#[test]
fn post_copy_over_a_unix_socket_sends_every_owed_page_exactly_once() {
    let dir = tmpdir();
    let at = path(&dir, "migrate.sock");
    post_copy_moves_every_owed_page_once(&format!("unix:{}", at.display()), 22, None);
    assert!(!at.exists(), "{} outlived the migration", at.display());
}

/// Pure post-copy of a random-writing guest (seed `seed`) to a destination
/// listening on `listen`, both ends with `--tls-creds` if `tls` names a
/// directory: every owed page goes exactly once, both ends count the same,
/// and the destination's memory is the guest's PRNG's.
fn post_copy_moves_every_owed_page_once(listen: &str, seed: u64, tls: Option<&str>) {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    let creds: Vec<&str> = tls.iter().flat_map(|c| ["--tls-creds", *c]).collect();
    let mut dest = Dest::listening(&dir, listen, shm.path().join("dst.mem"), &creds);
    let (mut src, sock, src_serial) = source(&dir, &endless(PAGES, 0, seed));
    let mem = src_mem(&dir);
    progress::wait_for(&mut src, "every working-set page stamped", || {
        (progress::stamped_pages(&mem, PAGES) == PAGES).then_some(())
    });
    // 16 MiB at 8 MiB/s: the guest runs there long before its pages are all in.
    let mut args = vec!["migrate", "--to", &dest.addr, "--postcopy", "--bandwidth-limit", "8M"];
    args.extend(&creds);
    let r = ctl(&sock, &args);
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

    let (code, err, _) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    dest.wait_for("the post-copy phase to end", |d| d.said("post-copy from"));
    dest.carries_on_then_stops(PAGES);
    let dst_mem = dest.mem.clone();
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
    assert_replayed(&dst_mem, PAGES, seed);
}

/// After a post-copy migration of an [`endless`]-style guest (`pages`,
/// `seed`): the source exited 0, the destination's post-copy phase ended
/// and its guest carries on until stopped; its memory replays the guest's
/// writes. Returns the destination's memory file and stderr.
fn post_copy_landed(src: Child, src_serial: &Path, mut dest: Dest, pages: u64, seed: u64) -> (PathBuf, String) {
    let (code, err, _) = finish(src, src_serial);
    assert_eq!(code, 0, "{err}");
    dest.wait_for("the post-copy phase to end", |d| d.said("post-copy from"));
    dest.carries_on_then_stops(pages);
    let dst_mem = dest.mem.clone();
    let (code, err, serial) = dest.wait();
    assert_eq!(code, 0, "{err}\n{serial}");
    assert_replayed(&dst_mem, pages, seed);
    (dst_mem, err)
}

#[test]
fn post_copy_after_pre_copy_rounds_carries_a_fast_writer_over_a_slow_link() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    let dest = Dest::start_with(&dir, shm.path().join("dst.mem"), &[]);
    // 4000 pages/s over 500 pages against a 4 MiB/s link: pre-copy alone
    // would need throttling; two rounds, then post-copy.
    let (mut src, sock, src_serial) = source(&dir, &endless(500, 4000, 15));
    progress::wait_for_writes(&mut src, &src_mem(&dir), 500, 500);
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
    post_copy_landed(src, &src_serial, dest, 500, 15);
}

#[test]
fn post_copy_moves_a_guest_dirtying_faster_than_the_link_without_throttling_it() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    let dest = Dest::start_with(&dir, shm.path().join("dst.mem"), &[]);
    // 4000 pages/s over 500 pages against a 2 MiB/s link (512 pages/s):
    // pre-copy alone converges only by throttling the guest (see
    // `a_guest_dirtying_faster_than_the_link_converges_by_throttling`).
    // With post-copy asked for, auto-converge (on by default) stays off:
    // three rounds, the third unthrottled, then the switch.
    let (mut src, sock, src_serial) = source(&dir, &endless(500, 4000, 21));
    progress::wait_for_writes(&mut src, &src_mem(&dir), 500, 500);
    let r = ctl(&sock, &["migrate", "--to", &dest.addr, "--postcopy-after", "3", "--bandwidth-limit", "2M"]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["converge"], "post-copy", "no auto-converge, no dirty limit: {r}");
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 4, "rounds 0, 1 and 2, then the post-copy phase: {r}");
    for round in rounds {
        assert_eq!(round["throttle_pct"], 0, "round {round}: {r}");
        assert!(round.get("vcpu_throttle_pct").is_none(), "round {round}: {r}");
    }
    let pc = &r["postcopy"];
    let n = |k: &str| pc[k].as_u64().unwrap_or_else(|| panic!("no {k} in {r}"));
    assert_eq!(n("pages_on_demand") + n("pages_streamed") + n("zero_pages"), n("owed_pages"), "{r}");
    assert!(n("owed_pages") > 0 && n("owed_pages") <= 500 + 64, "only what was dirtied since round 2 is owed: {r}");
    post_copy_landed(src, &src_serial, dest, 500, 21);
}

#[test]
fn post_copy_leaves_owed_zero_pages_as_holes_that_read_zero() {
    use std::os::unix::fs::MetadataExt;
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    let dest = Dest::start_with(&dir, shm.path().join("dst.mem"), &[]);
    // The working set zeroed first (`wipe=1`: 6000 pages of data that are
    // zero), then a few hundred stamped before the switch: thousands of
    // owed pages are zero.
    let cmdline = "workload=rate rate=1000 pages=6000 writes=1000000000 seed=22 wipe=1";
    let (mut src, sock, src_serial) = source(&dir, cmdline);
    progress::wait_for_writes(&mut src, &src_mem(&dir), 6000, 300);
    let r = ctl(&sock, &["migrate", "--to", &dest.addr, "--postcopy"]);
    assert_eq!(r["ok"], true, "{r}");
    let zero = r["postcopy"]["zero_pages"].as_u64().unwrap_or_else(|| panic!("no zero_pages in {r}"));
    assert!(zero >= 3000, "most of the wiped working set is owed as zero pages: {r}");
    // Every page the guest never wrote reads zero, every stamp matches.
    let (dst_mem, err) = post_copy_landed(src, &src_serial, dest, 6000, 22);
    // Zero pages the guest did not touch here took no memory: the file
    // holds little beyond the stamped pages.
    let stamped = progress::stamped_pages(&dst_mem, 6000);
    let allocated = std::fs::metadata(&dst_mem).unwrap().blocks() * 512 / 4096;
    assert!(allocated < stamped + 1024, "{allocated} pages allocated for {stamped} stamped ({zero} owed zero): {err}");
}

#[test]
fn losing_the_source_during_post_copy_stops_the_destination_with_a_clear_error() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    let mut dest = Dest::start_with(&dir, shm.path().join("dst.mem"), &[]);
    let (mut src, sock, _) = source(&dir, &endless(6000, 0, 16));
    // Over 5000 stamped pages (20 MiB) to send at 2 MiB/s: the post-copy
    // phase lasts at least ten seconds.
    progress::wait_for_writes(&mut src, &src_mem(&dir), 6000, 20000);
    let ctl_child = smudge()
        .args(["ctl", "--json", "--api-sock", sock.to_str().unwrap(), "migrate", "--to", &dest.addr])
        .args(["--postcopy", "--bandwidth-limit", "2M"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    dest.wait_for("the post-copy switchover", |d| d.said("the guest runs here now"));
    dest.wait_for("its API socket", |d| d.sock.exists());
    // Its memory file is not whole yet: nothing may copy it.
    let r = ctl(&dest.sock, &["snapshot", "create", path(&dir, "snap").to_str().unwrap()]);
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("memory is still loading"), "{r}");
    src.kill().unwrap();
    src.wait().unwrap();
    let t1 = Instant::now();
    let (code, err, _) = dest.wait();
    assert!(t1.elapsed() < progress::WAIT, "the destination hung for {:?}", t1.elapsed());
    assert_eq!(code, 107, "{err}");
    assert!(err.contains("failed after the switchover") && err.contains("the guest cannot continue"), "{err}");
    let mut ctl_child = ctl_child;
    let _ = ctl_child.wait();
}

#[test]
fn losing_the_destination_during_post_copy_keeps_the_guest_paused_at_the_source() {
    require_kvm();
    let (dir, shm) = (tmpdir(), shm_dir());
    let mut dest = Dest::start_with(&dir, shm.path().join("dst.mem"), &[]);
    // Its migration log on: the switchover line below.
    let (mem, sock) = (src_mem(&dir), path(&dir, "src.sock"));
    let mut cmd = smudge();
    cmd.env("SMUDGE_LOG", "warn,smudge_vmm::migrate=info")
        .args(["run", "--in-place", "--mem-file", mem.to_str().unwrap(), "--mem-size", "64M", "--timeout", "120"])
        .args(["--api-sock", sock.to_str().unwrap(), "--cmdline", &endless(6000, 0, 17)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut src = spawn_with_api(&mut cmd, &sock, WAIT).unwrap_or_else(|e| panic!("the source: {}", error_chain(&e)));
    // Over 5000 stamped pages at 2 MiB/s: the post-copy phase lasts at
    // least ten seconds.
    progress::wait_for_writes(&mut src, &src_mem(&dir), 6000, 20000);
    // The source logs the switchover once the destination's answer is in.
    let src_err = Arc::new(Mutex::new(String::new()));
    let (pipe, sink) = (src.stderr.take().unwrap(), src_err.clone());
    let src_reader = std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            sink.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let (seen, addr) = (src_err.clone(), dest.addr.clone());
    let killer = std::thread::spawn(move || {
        dest.wait_for("the source to log the post-copy switchover", |_| {
            seen.lock().unwrap().contains("post-copy switchover in")
        });
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
    let code = src.wait().unwrap().code();
    src_reader.join().unwrap();
    assert_eq!(code, Some(0), "{}", src_err.lock().unwrap());
}

#[test]
fn post_copy_to_a_memory_file_on_disk_is_refused_and_the_source_carries_on() {
    require_kvm();
    let dir = tmpdir();
    // The test's temporary directory is on disk, not tmpfs.
    assert!(!smudge::uffd::on_tmpfs(dir.path()).unwrap(), "the test needs a non-tmpfs temp dir");
    let dest = Dest::start(&dir);
    let (mut src, sock, src_serial) = source(&dir, &endless(PAGES, 20000, 18));
    progress::wait_for_writes(&mut src, &src_mem(&dir), PAGES, 500);
    let r = ctl(&sock, &["migrate", "--to", &dest.addr, "--postcopy"]);
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("post-copy needs the destination's memory file on tmpfs"), "{r}");
    let (code, err, _) = dest.wait();
    assert_ne!(code, 0, "{err}");
    carries_on_then_stops(&mut src, &sock, &src_mem(&dir), PAGES);
    let (code, err, _) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    assert_replayed(&src_mem(&dir), PAGES, 18);
}

#[test]
fn four_connections_carry_the_pages_and_the_guest_carries_on() {
    require_kvm();
    let dir = tmpdir();
    let mut dest = Dest::start(&dir);
    let (mut src, sock, src_serial) = source(&dir, &endless(PAGES, 20000, 19));
    let mem = src_mem(&dir);
    progress::wait_for(&mut src, "every working-set page stamped", || {
        (progress::stamped_pages(&mem, PAGES) == PAGES).then_some(())
    });
    let r = ctl(&sock, &["migrate", "--to", &dest.addr, "--connections", "4", "--verify-memory", "--compress", "lz4"]);
    assert_eq!(r["ok"], true, "{r}");
    let per: Vec<u64> = r["connection_pages"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(per.len(), 4, "{r}");
    assert_eq!(per.iter().sum::<u64>(), r["pages_sent"].as_u64().unwrap(), "{r}");
    assert!(per.iter().all(|&p| p > 500), "round 0's ~4000 pages are shared out: {per:?}");
    let crc = r["memory_crc32"].as_u64().expect("memory checksum");
    let (code, err, _) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    dest.carries_on_then_stops(PAGES);
    let dst_mem = dest.mem.clone();
    let (code, err, serial) = dest.wait();
    assert_eq!(code, 0, "{err}\n{serial}");
    assert!(err.contains(&format!("memory checksum {crc:#010x} matches the source's")), "{err}");
    assert_replayed(&dst_mem, PAGES, 19);
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
    let (mut src, sock, src_serial) = source(&dir, &endless(PAGES, 5000, 20));
    // Over 1500 stamped pages: each connection's share of round 0 is
    // megabytes.
    progress::wait_for_writes(&mut src, &src_mem(&dir), PAGES, 2000);
    // The third connection (the second extra one) dies inside round 0.
    let via = cutting_proxy(dest.addr.clone(), 2, 200_000);
    let r = ctl(&sock, &["migrate", "--to", &via, "--connections", "3"]);
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("the guest runs on here"), "{e}");
    carries_on_then_stops(&mut src, &sock, &src_mem(&dir), PAGES);
    let (code, err, serial) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}\n{serial}");
    assert_replayed(&src_mem(&dir), PAGES, 20);
    let (code, err, _) = dest.wait();
    assert_eq!(code, 100, "{err}");
    assert!(err.contains("page connection 2"), "destination: {err}");
}

#[test]
fn a_destination_refuses_to_listen_where_a_unix_socket_cannot_go() {
    let dir = tmpdir();
    let listen = |at: &str| {
        let mem = path(&dir, "dst.mem");
        let out = smudge()
            .args(["migrate-recv", "--listen", at, "--accept-timeout", "30", "--mem-file", mem.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!mem.exists(), "a memory file was made for {at}");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // A regular file in the way is refused and left as it was.
    let file = path(&dir, "not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let (code, err) = listen(&format!("unix:{}", file.display()));
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains(&format!("{}: exists and is not a socket; refusing to replace it", file.display())), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // No path, or neither form.
    let (code, err) = listen("unix:");
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("\"unix:\" needs the socket's path after it (unix:PATH)"), "{err}");
    let (code, err) = listen("m.sock");
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("\"m.sock\" is not a migration address: expected HOST:PORT, PORT or unix:PATH"), "{err}");
}

#[test]
fn a_source_told_an_unusable_unix_address_keeps_its_guest_and_says_why() {
    require_kvm();
    let dir = tmpdir();
    let (mut src, sock, src_serial) = source(&dir, &endless(PAGES, 20000, 23));
    progress::wait_for_writes(&mut src, &src_mem(&dir), PAGES, 500);
    // A socket left behind by a listener that is gone, and a regular file.
    let stale = path(&dir, "stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let file = path(&dir, "plain-file");
    std::fs::write(&file, b"x").unwrap();
    let missing = path(&dir, "nobody.sock");
    let unix = |p: &Path| format!("unix:{}", p.display());
    let cases = [
        ("m.sock".to_string(), "\"m.sock\" is not a migration address: expected HOST:PORT or unix:PATH".to_string()),
        ("unix:".into(), "\"unix:\" needs the socket's path after it (unix:PATH)".into()),
        (unix(&missing), format!("cannot connect to {}: No such file or directory", unix(&missing))),
        (unix(&stale), format!("cannot connect to {}: Connection refused", unix(&stale))),
        (unix(&file), format!("cannot connect to {}: Connection refused", unix(&file))),
    ];
    for (to, want) in &cases {
        let r = ctl(&sock, &["migrate", "--to", to, "--connections", "2"]);
        assert_eq!(r["ok"], false, "{to}: {r}");
        let e = r["error"].as_str().unwrap();
        assert!(e.contains(want.as_str()), "{to}: {e}\nwant: {want}");
        assert_eq!(ctl(&sock, &["stats"])["paused"], false, "after {to}");
    }
    carries_on_then_stops(&mut src, &sock, &src_mem(&dir), PAGES);
    let (code, err, _) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    assert_replayed(&src_mem(&dir), PAGES, 23);
}

#[test]
fn with_tls_both_ends_verify_each_other_and_the_guest_moves_over_two_connections() {
    require_kvm();
    let dir = tmpdir();
    let ca = Ca::new("smudge test CA");
    let creds = ca.creds(&path(&dir, "creds"), &["127.0.0.1"]);
    let dest = Dest::listening(&dir, "0", path(&dir, "dst.mem"), &["--tls-creds", &creds]);
    let r = moves_with_the_same_memory(&dir, dest, &["--connections", "2", "--tls-creds", &creds], 24);
    let per: Vec<u64> = r["connection_pages"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(per.len() == 2 && per.iter().all(|&p| p > 0), "both connections carried pages: {r}");
}

#[test]
fn post_copy_over_tls_sends_every_owed_page_exactly_once() {
    let dir = tmpdir();
    let ca = Ca::new("smudge test CA");
    let creds = ca.creds(&path(&dir, "creds"), &["127.0.0.1"]);
    post_copy_moves_every_owed_page_once("0", 26, Some(&creds));
}

#[test]
fn a_peer_tls_does_not_vouch_for_is_refused_before_memory_and_the_source_keeps_its_guest() {
    require_kvm();
    let dir = tmpdir();
    let (ca, rogue) = (Ca::new("smudge test CA"), Ca::new("rogue CA"));
    let good = ca.creds(&path(&dir, "good"), &["127.0.0.1"]);
    let other_ca = ca.creds_signed_by(&path(&dir, "rogue"), &["127.0.0.1"], &rogue);
    let wrong_name = ca.creds(&path(&dir, "wrong-name"), &["elsewhere.example"]);
    let (mut src, sock, src_serial) = source(&dir, &endless(PAGES, 20000, 25));
    progress::wait_for_writes(&mut src, &src_mem(&dir), PAGES, 500);
    let requires = "this destination requires TLS: migrate with --tls-creds";
    let refused = "refused before anything was read: TLS handshake:";
    let opts = |flag: &'static str, c: &Option<&str>| -> Vec<String> {
        c.iter().flat_map(|c| [flag.to_string(), c.to_string()]).collect()
    };
    // (destination's credentials, source's, what the source says, what the destination says)
    let cases: [(Option<&str>, Option<&str>, String, String); 4] = [
        (
            Some(&good),
            None,
            format!("the destination refused after Hello: {requires}"),
            format!("{refused} the source sent a plain migration stream: {requires}"),
        ),
        (
            Some(&good),
            Some(&other_ca),
            "received fatal alert: UnknownCA".into(),
            format!("{refused} invalid peer certificate: UnknownIssuer"),
        ),
        (
            Some(&wrong_name),
            Some(&good),
            "TLS handshake: invalid peer certificate: certificate not valid for name \"127.0.0.1\"".into(),
            format!("{refused} received fatal alert: BadCertificate"),
        ),
        (
            None,
            Some(&good),
            "TLS handshake: the destination sent a plain migration stream: it was started without --tls-creds".into(),
            "bad magic [16, 03".into(),
        ),
    ];
    let cases = cases.map(|(d, s, src_says, dest_says)| Refusal {
        dest: opts("--tls-creds", &d),
        src: opts("--tls-creds", &s),
        src_says,
        dest_says,
    });
    each_refused_before_memory(&dir, &mut src, &sock, &cases);
    let (code, err, _) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    assert_replayed(&src_mem(&dir), PAGES, 25);
}

/// A migration that must be refused: the destination's and the source's
/// options, and what each says of it.
struct Refusal {
    dest: Vec<String>,
    src: Vec<String>,
    src_says: String,
    dest_says: String,
}

/// Runs each case against a fresh destination: the source (API at
/// `sock`) is refused and says why, the destination exits saying why
/// without making a memory file, and the source's guest runs on; then
/// the source's guest carries on and is stopped.
fn each_refused_before_memory(dir: &tempfile::TempDir, src: &mut Child, sock: &Path, cases: &[Refusal]) {
    for Refusal { dest, src: src_opts, src_says, dest_says } in cases {
        let opts: Vec<&str> = dest.iter().map(String::as_str).collect();
        let dest = Dest::listening(dir, "0", path(dir, "dst.mem"), &opts);
        let mut args = vec!["migrate", "--to", &dest.addr];
        args.extend(src_opts.iter().map(String::as_str));
        let r = ctl(sock, &args);
        assert_eq!(r["ok"], false, "{src_opts:?}: {r}");
        assert!(r["error"].as_str().unwrap().contains(src_says.as_str()), "{src_opts:?}: {r}\nwant: {src_says}");
        let mem = dest.mem.clone();
        let (code, err, _) = dest.wait();
        assert_ne!(code, 0, "{err}");
        assert!(err.contains(dest_says.as_str()), "{err}\nwant: {dest_says}");
        assert!(!mem.exists(), "the refused destination made a memory file");
        assert_eq!(ctl(sock, &["stats"])["paused"], false);
    }
    carries_on_then_stops(src, sock, &src_mem(dir), PAGES);
}

/// Writes a keys.psk file of `lines` into `dir`; its path.
fn key_file(dir: &tempfile::TempDir, name: &str, lines: &[&str]) -> String {
    let p = path(dir, name);
    std::fs::write(&p, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    p.to_str().unwrap().to_string()
}

/// A 32-byte key, as QEMU's keys.psk writes it.
const PSK: &str = "qemu:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

#[test]
fn with_a_pre_shared_key_the_guest_moves_over_two_connections_with_the_same_memory() {
    require_kvm();
    let dir = tmpdir();
    let key = key_file(&dir, "keys.psk", &[PSK]);
    let dest = Dest::listening(&dir, "0", path(&dir, "dst.mem"), &["--tls-psk", &key]);
    let r = moves_with_the_same_memory(&dir, dest, &["--connections", "2", "--tls-psk", &key], 27);
    let per: Vec<u64> = r["connection_pages"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(per.len() == 2 && per.iter().all(|&p| p > 0), "both connections carried pages: {r}");
}

#[test]
fn a_peer_without_the_pre_shared_key_is_refused_before_memory_and_the_source_keeps_its_guest() {
    require_kvm();
    let dir = tmpdir();
    let ca = Ca::new("smudge test CA");
    let creds = ca.creds(&path(&dir, "creds"), &["127.0.0.1"]);
    let key = key_file(&dir, "keys.psk", &[PSK, "lab:000102030405060708090a0b0c0d0e0f"]);
    let other = key_file(&dir, "other.psk", &["qemu:ffeeddccbbaa99887766554433221100"]);
    let stranger = key_file(&dir, "stranger.psk", &["stranger:ffeeddccbbaa99887766554433221100"]);
    let short = key_file(&dir, "short.psk", &["qemu:0011223344556677"]);
    let (mut src, sock, src_serial) = source(&dir, &endless(PAGES, 20000, 28));
    progress::wait_for_writes(&mut src, &src_mem(&dir), PAGES, 500);

    // A short key is refused before anything connects, by either end.
    let too_short =
        format!("{short}: the key of \"qemu\" is 8 bytes; a pre-shared key needs at least 16 (32 hex digits)");
    let r = ctl(&sock, &["migrate", "--to", "127.0.0.1:1", "--tls-psk", &short]);
    assert_eq!(r["error"], format!("\"tls_psk\": {too_short}"), "{r}");
    let out = smudge()
        .args(["migrate-recv", "--listen", "0", "--mem-file", path(&dir, "dst.mem").to_str().unwrap()])
        .args(["--tls-psk", &short])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("--tls-psk: {too_short}")), "{err}");

    let refused = "refused before anything was read:";
    let flags = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
    let cases = [
        Refusal {
            dest: flags(&["--tls-psk", &key]),
            src: flags(&["--tls-psk", &other]),
            src_says: "TLS pre-shared key: the destination holds another key for identity \"qemu\"".into(),
            dest_says: format!(
                "{refused} TLS pre-shared key: the source's proof for identity \"qemu\" is wrong: it holds another key"
            ),
        },
        Refusal {
            dest: flags(&["--tls-psk", &key]),
            src: flags(&["--tls-psk", &stranger]),
            src_says: "TLS pre-shared key: the destination holds no key for identity \"stranger\"".into(),
            dest_says: format!("{refused} TLS pre-shared key: the source's identity \"stranger\" has no key here"),
        },
        Refusal {
            dest: flags(&["--tls-psk", &key]),
            src: vec![],
            src_says: "the destination refused after Hello: this destination requires TLS: migrate with --tls-psk"
                .into(),
            dest_says: format!(
                "{refused} TLS handshake: the source sent a plain migration stream: \
                 this destination requires TLS: migrate with --tls-psk"
            ),
        },
        Refusal {
            dest: vec![],
            src: flags(&["--tls-psk", &key]),
            src_says: "TLS handshake: the destination sent a plain migration stream: it was started without --tls-psk"
                .into(),
            dest_says: "bad magic [16, 03".into(),
        },
        Refusal {
            dest: flags(&["--tls-psk", &key]),
            src: flags(&["--tls-creds", &creds]),
            src_says: "TLS handshake: the destination uses a pre-shared key (--tls-psk), this source certificates \
                       (--tls-creds)"
                .into(),
            dest_says: format!(
                "{refused} TLS handshake: the source uses certificates (--tls-creds), this destination a pre-shared \
                 key (--tls-psk)"
            ),
        },
        Refusal {
            dest: flags(&["--tls-creds", &creds]),
            src: flags(&["--tls-psk", &key]),
            src_says: "TLS handshake: the destination uses certificates (--tls-creds), this source a pre-shared key \
                       (--tls-psk)"
                .into(),
            dest_says: format!(
                "{refused} TLS handshake: the source uses a pre-shared key (--tls-psk), this destination \
                 certificates (--tls-creds)"
            ),
        },
    ];
    each_refused_before_memory(&dir, &mut src, &sock, &cases);
    let (code, err, _) = finish(src, &src_serial);
    assert_eq!(code, 0, "{err}");
    assert_replayed(&src_mem(&dir), PAGES, 28);
}

#[test]
fn a_plain_listener_other_hosts_can_reach_warns_and_a_loopback_or_tls_one_does_not() {
    let dir = tmpdir();
    let ca = Ca::new("smudge test CA");
    let creds = ca.creds(&path(&dir, "creds"), &["127.0.0.1"]);
    let warning = "is reachable from other hosts and the stream is neither authenticated nor encrypted";
    for (listen, tls, warns) in [("0.0.0.0:0", None, true), ("0", None, false), ("0.0.0.0:0", Some(&creds), false)] {
        let mem = path(&dir, "dst.mem");
        let out = smudge()
            .args(["migrate-recv", "--listen", listen, "--accept-timeout", "1", "--mem-file", mem.to_str().unwrap()])
            .args(tls.iter().flat_map(|c| ["--tls-creds", c.as_str()]))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // Nobody connects: it gives up after its second.
        assert!(err.contains("no source connected to"), "{listen} {tls:?}: {err}");
        assert_eq!(err.contains(warning), warns, "{listen} {tls:?}: {err}");
    }
}

/// The bytes of `frames` as a source sends them.
fn encoded(frames: &[Frame]) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new(), false);
    for f in frames {
        w.send(f).unwrap();
    }
    w.flush().unwrap();
    std::mem::take(w.get_mut())
}

/// Waits (at most two minutes) for the destination to exit by itself;
/// its exit code and stderr.
fn gives_up(mut dest: Dest, what: &str) -> (i32, String) {
    let t0 = Instant::now();
    while dest.child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = dest.child.kill();
            panic!("the destination still waited on {what} after two minutes\n{}", dest.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, err, _) = dest.wait();
    (code, err)
}

/// A peer that connects and stalls: the destination's options, what the
/// peer sends (and, once its Hello is answered, sends next), and what the
/// destination says as it gives up.
struct Stall<'a> {
    case: &'static str,
    opts: Vec<&'a str>,
    first: Vec<u8>,
    after_ack: Option<Vec<u8>>,
    says: &'static str,
}

#[test]
fn a_peer_that_connects_and_stalls_is_given_up_on_and_the_destination_exits() {
    require_kvm();
    let dir = tmpdir();
    let ca = Ca::new("smudge test CA");
    let creds = ca.creds(&path(&dir, "creds"), &["127.0.0.1"]);
    let hello = encoded(&[Frame::Hello(Hello::new(64 << 20, 1))]);
    let pages = encoded(&[Frame::Pages { offset: 0, data: vec![7; 4096] }]);
    let no_hello = "the source connected but sent no Hello within 10 s; giving up on it";
    let cases = [
        Stall { case: "nothing", opts: vec![], first: vec![], after_ack: None, says: no_hello },
        Stall {
            case: "half a Hello",
            opts: vec![],
            first: hello[..hello.len() / 2].to_vec(),
            after_ack: None,
            says: no_hello,
        },
        Stall {
            case: "nothing, TLS required",
            opts: vec!["--tls-creds", &creds],
            first: vec![],
            after_ack: None,
            says: "refused before anything was read: TLS handshake: the peer sent nothing for 10 s; giving up on it",
        },
        Stall {
            case: "a Hello, then half a frame",
            opts: vec![],
            first: hello.clone(),
            after_ack: Some(pages[..pages.len() / 2].to_vec()),
            says: "the source sent nothing for 60 s after 0 MiB; giving up on it",
        },
    ];
    // All at once: the stalls overlap, the test lasts the longest one.
    let runs: Vec<_> = cases
        .into_iter()
        .enumerate()
        .map(|(i, Stall { case, opts, first, after_ack, says })| {
            let sub = path(&dir, &format!("case{i}"));
            std::fs::create_dir_all(&sub).unwrap();
            let sub = tempfile::TempDir::new_in(sub).unwrap();
            let dest = Dest::listening(&sub, "0", path(&sub, "dst.mem"), &opts);
            let mut peer = TcpStream::connect(&dest.addr).unwrap();
            peer.write_all(&first).unwrap();
            if let Some(rest) = after_ack {
                peer.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                match FrameReader::new(peer.try_clone().unwrap()).next_frame() {
                    Ok(Frame::Ack(a)) if a.ok => {}
                    other => panic!("{case}: the Hello was answered {other:?}\n{}", dest.log()),
                }
                peer.write_all(&rest).unwrap();
            }
            std::thread::spawn(move || {
                let (_dir, mem) = (sub, dest.mem.clone());
                let (code, err) = gives_up(dest, case);
                // It hung up on the peer, which still held its end open.
                peer.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut rest = Vec::new();
                let end = peer.read_to_end(&mut rest);
                (case, says, code, err, end.map_err(|e| e.kind()), mem.exists())
            })
        })
        .collect();
    for run in runs {
        let (case, says, code, err, end, mem_left) = run.join().unwrap();
        assert!(err.contains(says), "{case}: {err}\nwant: {says}");
        assert_eq!(code, 100, "{case}: {err}");
        assert!(
            matches!(end, Ok(_) | Err(std::io::ErrorKind::ConnectionReset)),
            "{case}: the peer's connection was not closed: {end:?}"
        );
        assert!(!mem_left, "{case}: a memory file was left behind");
    }
}
