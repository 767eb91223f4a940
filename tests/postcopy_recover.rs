//! Post-copy recovery: the link between source and destination is cut
//! after the post-copy switchover (by a proxy, at a seeded random byte of
//! the phase), the destination's guest goes on and waits for its pages,
//! the source keeps its paused copy, and `ctl migrate --resume` sends each
//! page still owed exactly once; the guest's memory then replays its
//! writes. Without a resume the destination gives up after its recovery
//! timeout.
//!
//! The cut point is counted in bytes the proxy forwarded after the
//! machine state (or from the start of a resumed connection), never in
//! time; every wait is for a line, a file's content or an answer.

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use serde_json::Value;
use smudge::migration::frame::{Frame, FrameReader, FrameWriter, HEADER_LEN};
use smudge_testkit::*;

#[path = "common/test_ca.rs"]
mod test_ca;

#[path = "common/dest.rs"]
mod dest;
use dest::Dest;

/// Working-set pages of the source guest: 6000 stamped pages (24 MiB)
/// owed at the switchover, sent at 8 MiB/s — every cut below lands in the
/// phase, megabytes before its end.
const PAGES: u64 = 6000;
/// The seeds each test runs (the cut points derive from them).
const SEEDS: [u64; 3] = [31, 32, 33];

/// A random-writing guest over [`PAGES`] pages that never ends by itself.
fn endless(seed: u64) -> String {
    format!("workload=random pages={PAGES} writes=1000000000 seed={seed}")
}

/// A byte count in `lo..hi` drawn from `seed` (splitmix64).
fn cut_point(seed: u64, lo: u64, hi: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    lo + (z ^ (z >> 31)) % (hi - lo)
}

impl Dest {
    /// A destination on loopback, its memory file on tmpfs in `shm`,
    /// waiting `recover` seconds for a source whose link broke; `extra`
    /// options (`--tls-creds`).
    fn start(dir: &tempfile::TempDir, shm: &tempfile::TempDir, recover: u64, extra: &[&str]) -> Dest {
        let recover = recover.to_string();
        let opts = [&["--timeout", "300", "--postcopy-recover-timeout", &recover][..], extra].concat();
        Dest::spawn(dir, "0", shm.path().join("dst.mem"), &opts)
    }

    /// The pages owed at the `n`-th break (1: the first), once it said so.
    fn owed_at_break(&mut self, n: usize) -> u64 {
        self.wait_until(&format!("break {n}'s \"waiting for recovery\" line"), |d| {
            let err = d.stderr.lock().unwrap();
            let line = err.lines().filter(|l| l.contains("waiting for recovery: ")).nth(n - 1)?;
            let rest = line.split("waiting for recovery: ").nth(1)?;
            rest.split(' ').next()?.parse().ok()
        })
    }
}

/// Where a [`cutting_proxy`] starts counting the bytes before its cut.
#[derive(Clone, Copy, PartialEq)]
enum CountFrom {
    /// The end of the machine state (the stream's frames are read).
    State,
    /// The first byte (the stream's frames are read).
    Start,
    /// The first byte of a stream that cannot be read (TLS).
    Sealed,
}

/// A TCP forwarder for one connection to `to` that cuts it (both ways,
/// mid-frame) after `cut` bytes from the source, counted `from`. Returns
/// its address and a channel that says, once it cut, how many frames it
/// had forwarded from the source (0 for a sealed stream).
fn cutting_proxy(to: &str, from: CountFrom, cut: u64) -> (String, mpsc::Receiver<u64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (tx, rx) = mpsc::channel();
    let to = to.to_string();
    std::thread::spawn(move || {
        let Ok((src, _)) = l.accept() else { return };
        let dst = TcpStream::connect(&to).unwrap();
        let (mut dst_r, mut src_w) = (dst.try_clone().unwrap(), src.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut dst_r, &mut src_w);
        });
        let frames = match from {
            CountFrom::Sealed => forward_raw_until_cut(&src, &dst, cut),
            _ => forward_until_cut(&src, &dst, from == CountFrom::State, cut),
        };
        let _ = src.shutdown(Shutdown::Both);
        let _ = dst.shutdown(Shutdown::Both);
        let _ = tx.send(frames);
    });
    (addr, rx)
}

/// Forwards frames from `src` to `dst` until `cut` bytes were counted;
/// returns the frames forwarded whole.
fn forward_until_cut(mut src: &TcpStream, mut dst: &TcpStream, after_state: bool, cut: u64) -> u64 {
    let (mut counting, mut counted, mut frames) = (!after_state, 0u64, 0u64);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut head = [0u8; HEADER_LEN];
        if src.read_exact(&mut head).is_err() {
            return frames;
        }
        let kind = head[6];
        let len = u32::from_le_bytes(head[12..16].try_into().unwrap()) as usize;
        let mut left = HEADER_LEN + len;
        let mut first = Some(head);
        while left > 0 {
            let n = match first.take() {
                Some(h) => {
                    buf[..HEADER_LEN].copy_from_slice(&h);
                    HEADER_LEN
                }
                None => match src.read(&mut buf[..left.min(64 * 1024)]) {
                    Ok(0) | Err(_) => return frames,
                    Ok(n) => n,
                },
            };
            if counting && counted + n as u64 >= cut {
                let _ = dst.write_all(&buf[..(cut - counted) as usize]);
                return frames;
            }
            if dst.write_all(&buf[..n]).is_err() {
                return frames;
            }
            counted += if counting { n as u64 } else { 0 };
            left -= n;
        }
        frames += 1;
        // Kind 5: the machine state; the post-copy phase follows.
        counting |= kind == 5;
    }
}

/// Forwards bytes from `src` to `dst` until `cut` of them went.
fn forward_raw_until_cut(mut src: &TcpStream, mut dst: &TcpStream, cut: u64) -> u64 {
    let (mut buf, mut counted) = (vec![0u8; 64 * 1024], 0u64);
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => return 0,
            Ok(n) => n,
        };
        let n = n.min((cut - counted) as usize);
        if dst.write_all(&buf[..n]).is_err() {
            return 0;
        }
        counted += n as u64;
        if counted == cut {
            return 0;
        }
    }
}

/// A source VM running [`endless`]`(seed)` with a control socket, once
/// every working-set page is stamped.
fn source(dir: &tempfile::TempDir, seed: u64) -> (Child, PathBuf, PathBuf) {
    let (mem, sock) = (path(dir, "src.mem"), path(dir, "src.sock"));
    let out = std::fs::File::create(path(dir, "src.serial")).unwrap();
    let mut src = start_with_api(&mem, &sock, "64M", &endless(seed), Stdio::from(out), false, &[]);
    progress::wait_for(&mut src, "every working-set page stamped", || {
        (progress::stamped_pages(&mem, PAGES) == PAGES).then_some(())
    });
    (src, sock, mem)
}

fn shm_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("smudge-test-").tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is needed")
}

/// Post-copy through `via` (which cuts the link): the source answers that
/// the migration is paused, and says so in `stats` too.
fn migrate_and_break(sock: &Path, via: &str, extra: &[&str], what: &str) {
    let mut args = vec!["migrate", "--to", via, "--postcopy", "--bandwidth-limit", "8M"];
    args.extend(extra);
    let r = ctl(sock, &args);
    assert_eq!(r["ok"], false, "{what}: {r}");
    assert_eq!(r["state"], "postcopy-paused", "{what}: {r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("post-copy broke after the switchover") && e.contains("--resume"), "{what}: {e}");
    assert_paused(sock, 1, what);
}

/// The source's `stats` say a post-copy migration is paused after `breaks` breaks.
fn assert_paused(sock: &Path, breaks: u64, what: &str) {
    let s = ctl(sock, &["stats"]);
    assert_eq!(s["paused"], true, "{what}: {s}");
    assert_eq!(s["migration"]["state"], "postcopy-paused", "{what}: {s}");
    assert_eq!(s["migration"]["breaks"], breaks, "{what}: {s}");
}

/// The destination's `stats` while it waits: paused, `owed` pages owed.
fn assert_dest_waits(dest: &mut Dest, owed: u64, what: &str) {
    dest.wait_until("its API socket", |d| d.sock.exists().then_some(()));
    let s = ctl(&dest.sock, &["stats"]);
    assert_eq!(s["postcopy"]["state"], "postcopy-paused", "{what}: {s}");
    assert_eq!(s["postcopy"]["owed_pages"], owed, "{what}: {s}");
}

/// A resume that completes: exactly the `owed` pages went, each once.
fn resume_completes(sock: &Path, to: &str, owed: u64, resumes: u64, what: &str) -> Value {
    let r = ctl(sock, &["migrate", "--resume", "--to", to]);
    assert_eq!(r["ok"], true, "{what}: {r}");
    let pc = &r["postcopy"];
    let n = |k: &str| pc[k].as_u64().unwrap_or_else(|| panic!("{what}: no {k} in {r}"));
    assert_eq!(n("owed_pages"), owed, "{what}: the source was owed what the destination said: {r}");
    assert_eq!(n("pages_on_demand") + n("pages_streamed") + n("zero_pages"), owed, "{what}: {r}");
    assert_eq!(n("resumes"), resumes, "{what}: {r}");
    r
}

/// After the last resume: the source exited 0, the destination's guest
/// carries on (100 writes more), stops, and its memory passes the guest's
/// `verify` check, done from the host (an endless workload never reaches
/// its own: every page holds the stamp its generation-table entry names)
/// and the table is the replay of the guest's PRNG.
fn lands(src: Child, mut dest: Dest, seed: u64, resumes: u64, what: &str) {
    let out = src.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{what}: the source: {out:?}");
    let said = format!("the source resumed {resumes} time(s)");
    dest.wait_until("the post-copy phase to end", |d| d.stderr.lock().unwrap().contains(&said).then_some(()));
    let start = progress::guest_writes(&dest.mem, PAGES);
    dest.wait_until("its guest to make 100 more page writes", |d| {
        (progress::guest_writes(&d.mem, PAGES) >= start + 100).then_some(())
    });
    assert_eq!(ctl(&dest.sock, &["stop"])["ok"], true, "{what}\n{}", dest.log());
    let mem = dest.mem.clone();
    let (code, err, serial) = dest.wait();
    assert_eq!(code, 0, "{what}: {err}\n{serial}");
    let stamped = progress::assert_pages_match_table(&mem, PAGES);
    let gens = progress::generations(&mem, PAGES);
    let total: u64 = gens.iter().map(|&g| u64::from(g)).sum();
    let want = random_generations(seed, PAGES, total as usize);
    let differ = gens.iter().zip(&want).filter(|(&g, &w)| u64::from(g) != w).count();
    assert_eq!(differ, 0, "{what}: {differ} table entries are not the replay of {total} writes");
    assert_eq!(stamped, PAGES, "{what}");
}

/// A plain connection to `addr` that resumes migration 0x1234: the
/// destination's refusal (it must refuse).
fn refusal_of_a_plain_resume(addr: &str) -> String {
    let conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    let mut w = FrameWriter::new(conn.try_clone().unwrap(), false);
    w.send(&Frame::Resume { migration: 0x1234 }).unwrap();
    w.flush().unwrap();
    match FrameReader::new(BufReader::new(conn)).next_frame() {
        Ok(Frame::Ack(a)) if !a.ok => a.error.unwrap_or_default(),
        other => panic!("a resume of migration 0x1234 was answered with {other:?}"),
    }
}

#[test]
fn a_link_cut_during_post_copy_is_resumed_and_every_owed_page_goes_exactly_once() {
    for seed in SEEDS {
        let cut = cut_point(seed, 64 << 10, 4 << 20);
        let what = format!("seed {seed}, cut {cut} bytes after the state");
        let (dir, shm) = (tmpdir(), shm_dir());
        let mut dest = Dest::start(&dir, &shm, 120, &[]);
        let (src, sock, _) = source(&dir, seed);
        let (via, cut_done) = cutting_proxy(&dest.addr, CountFrom::State, cut);
        migrate_and_break(&sock, &via, &[], &what);
        let frames = cut_done.recv_timeout(WAIT).expect("the proxy never cut");
        let owed = dest.owed_at_break(1);
        assert!(owed > 0, "{what}: nothing was owed at the cut ({frames} frames forwarded)");
        assert_dest_waits(&mut dest, owed, &what);
        // A source naming another migration is refused, told why.
        let e = refusal_of_a_plain_resume(&dest.addr);
        assert!(e.contains("it resumes migration 0x1234; this destination waits for"), "{what}: {e}");
        resume_completes(&sock, &dest.addr, owed, 1, &format!("{what}, {frames} frames before it"));
        lands(src, dest, seed, 1, &what);
    }
}

#[test]
fn a_second_cut_pauses_the_migration_again_and_a_second_resume_finishes_it() {
    for seed in SEEDS {
        let (first, second) = (cut_point(seed, 64 << 10, 4 << 20), cut_point(seed ^ 0xff, 64 << 10, 2 << 20));
        let what = format!("seed {seed}, cuts {first} bytes after the state and {second} into the resume");
        let (dir, shm) = (tmpdir(), shm_dir());
        let mut dest = Dest::start(&dir, &shm, 120, &[]);
        let (src, sock, _) = source(&dir, seed);
        let (via, _cut) = cutting_proxy(&dest.addr, CountFrom::State, first);
        migrate_and_break(&sock, &via, &[], &what);
        let owed1 = dest.owed_at_break(1);
        // The resume goes through a proxy that cuts it too.
        let (via, _cut) = cutting_proxy(&dest.addr, CountFrom::Start, second);
        let r = ctl(&sock, &["migrate", "--resume", "--to", &via]);
        assert_eq!(r["ok"], false, "{what}: {r}");
        assert_eq!(r["state"], "postcopy-paused", "{what}: {r}");
        assert_paused(&sock, 2, &what);
        let owed2 = dest.owed_at_break(2);
        assert!(owed2 > 0 && owed2 < owed1, "{what}: owed {owed1} then {owed2}");
        assert_dest_waits(&mut dest, owed2, &what);
        // No --to: where it went last is a proxy that is gone; name the destination.
        resume_completes(&sock, &dest.addr, owed2, 2, &what);
        lands(src, dest, seed, 2, &what);
    }
}

#[test]
fn without_a_resume_the_destination_gives_up_after_its_recovery_timeout() {
    let (dir, shm) = (tmpdir(), shm_dir());
    let dest = Dest::start(&dir, &shm, 3, &[]);
    let (mut src, sock, _) = source(&dir, 34);
    // Nothing to resume yet.
    for args in [&["migrate", "--resume"][..], &["migrate", "--resume", "--to", &dest.addr]] {
        let r = ctl(&sock, args);
        assert_eq!(r["ok"], false, "{r}");
        assert!(
            r["error"].as_str().unwrap().contains("no post-copy migration is paused here: nothing to resume"),
            "{r}"
        );
        assert_eq!(ctl(&sock, &["stats"])["paused"], false);
    }
    let (via, _cut) = cutting_proxy(&dest.addr, CountFrom::State, cut_point(34, 64 << 10, 4 << 20));
    migrate_and_break(&sock, &via, &[], "seed 34");
    // A new migration would fork the guest: refused while one is paused.
    let r = ctl(&sock, &["migrate", "--to", &dest.addr]);
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("is paused: the guest runs there"), "{r}");
    let (t0, addr) = (Instant::now(), dest.addr.clone());
    let (code, err, _) = dest.wait();
    assert!(t0.elapsed() < WAIT, "the destination waited {:?}: {err}", t0.elapsed());
    assert_eq!(code, 107, "{err}");
    assert!(err.contains("waiting for recovery: "), "{err}");
    let line = err.lines().find(|l| l.contains("failed after the switchover")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("no source resumed the migration on ") && line.contains(" within 3 s"), "{line}");
    assert!(line.contains("the guest cannot continue"), "{line}");
    // The source still holds its paused copy; a resume now finds nobody.
    let r = ctl(&sock, &["migrate", "--resume", "--to", &addr]);
    assert_eq!(r["ok"], false, "{r}");
    assert_paused(&sock, 1, "after the destination gave up");
    // Continuing the guest here gives the migration up.
    assert_eq!(ctl(&sock, &["resume"])["ok"], true);
    let s = ctl(&sock, &["stats"]);
    assert!(s.get("migration").is_none(), "{s}");
    let r = ctl(&sock, &["migrate", "--resume"]);
    assert!(r["error"].as_str().unwrap().contains("nothing to resume"), "{r}");
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    assert_eq!(src.wait().unwrap().code(), Some(0));
}

#[test]
fn over_tls_the_resumed_connection_uses_the_credentials_the_migration_started_with() {
    let seed = 35;
    // The stream is sealed: the cut is counted from its first byte, past
    // the handshake, the Hello and the machine state (tens of KiB).
    let cut = cut_point(seed, 512 << 10, 4 << 20);
    let what = format!("seed {seed}, cut {cut} bytes into the TLS stream");
    let (dir, shm) = (tmpdir(), shm_dir());
    let creds = test_ca::Ca::new("smudge test CA").creds(&path(&dir, "creds"), &["127.0.0.1"]);
    let mut dest = Dest::start(&dir, &shm, 120, &["--tls-creds", &creds]);
    let (src, sock, _) = source(&dir, seed);
    let (via, _cut) = cutting_proxy(&dest.addr, CountFrom::Sealed, cut);
    migrate_and_break(&sock, &via, &["--tls-creds", &creds], &what);
    let owed = dest.owed_at_break(1);
    // A plain connection gets no further than the handshake, told why.
    let e = refusal_of_a_plain_resume(&dest.addr);
    assert_eq!(e, "this destination requires TLS: migrate with --tls-creds", "{what}");
    dest.wait_until("the plain connection's refusal", |d| {
        d.stderr.lock().unwrap().contains("post-copy recovery: refused").then_some(())
    });
    // No --tls-creds: the resume uses the migration's own.
    resume_completes(&sock, &dest.addr, owed, 1, &what);
    lands(src, dest, seed, 1, &what);
}
