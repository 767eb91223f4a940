//! Hostile TLS peers against a real `smudge migrate-recv --tls-psk`: a
//! peer that holds the key, so it gets through the handshake and the key
//! proofs, and then sends garbage, a stream with a flipped bit after its
//! `Hello`, a stream cut short, or nothing at all. The destination must
//! refuse each with a clear error and the exit code of any malformed
//! stream (100) — a stalled one within its 10 s wait for a `Hello` —
//! leaving no memory file (no guest memory was kept) and no process
//! behind, and hang up on the peer.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use smudge_vmm::migrate::tls::TlsClient;
use smudge_vmm::migrate::transport::Dialer;

use super::{good_stream, Rng, Tally};
use crate::setup::smudge;

/// How long a destination may take to give up on a peer (its wait for a
/// `Hello` is 10 s) before the trial counts it as hung.
const GIVE_UP: Duration = Duration::from_secs(90);

/// A destination waiting with the key in `key`; it, where it listens, and
/// its stderr (all of it, once it exits).
fn destination(key: &Path, mem: &Path) -> anyhow::Result<(Child, String, std::thread::JoinHandle<String>)> {
    let mut child = smudge()?
        .args(["migrate-recv", "--listen", "0", "--accept-timeout", "60", "--timeout", "60", "--serial", "-"])
        .arg("--tls-psk")
        .arg(key)
        .arg("--mem-file")
        .arg(mem)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let err = child.stderr.take().context("the destination's stderr")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("smudge: waiting for a migration on ") {
                let _ = tx.send(a.to_string());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(addr) => Ok((child, addr, reader)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("migrate-recv never said where it listens: {}", reader.join().unwrap_or_default())
        }
    }
}

/// Waits for `child` to exit by itself (at most [`GIVE_UP`]); its code,
/// or `None` if it had to be killed.
fn exits(child: &mut Child) -> anyhow::Result<Option<i32>> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s.code().unwrap_or(-1)));
        }
        if t0.elapsed() > GIVE_UP {
            child.kill()?;
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the peer sends after the key proofs, and what the destination's
/// error must say.
fn misbehaviour(i: u64, rng: &mut Rng, good: &[u8], hello_len: usize) -> (Vec<u8>, &'static str) {
    match i % 4 {
        0 => ((0..64 + rng.below(4032)).map(|_| rng.below(256) as u8).collect(), "bad magic"),
        1 => {
            let mut b = good.to_vec();
            let off = hello_len + rng.below((b.len() - hello_len) as u64) as usize;
            b[off] ^= 1 << rng.below(8);
            (b, "smudge: error: ")
        }
        2 => (good[..hello_len + rng.below((good.len() - hello_len) as u64) as usize].to_vec(), "smudge: error: "),
        _ => (Vec::new(), "sent no Hello within 10 s"),
    }
}

/// `n` hostile peers, one destination each.
pub(super) fn hostile_tls_peers(dir: &Path, n: u64, rng: &mut Rng) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let key = dir.join("keys.psk");
    std::fs::write(&key, "qemu:5d41402abc4b2a76b9719d911017c5925d41402abc4b2a76b9719d911017c592\n")?;
    let client = TlsClient::psk(&key, None)?;
    let mem = dir.join("tls-peer.mem");
    let (good, _) = good_stream(rng)?;
    let (_, hello_len) = smudge::migration::frame::decode_slice(&good).context("the good stream's Hello")?;
    for i in 0..n {
        let (bytes, says) = misbehaviour(i, rng, &good, hello_len);
        std::fs::remove_file(&mem).ok();
        let (mut child, addr, reader) = destination(&key, &mem)?;
        let mut peer = Dialer::new(&addr, Some(client.clone()))?.dial(Duration::from_secs(30))?;
        // The destination may hang up before it read everything.
        let _ = peer.write_all(&bytes).and_then(|_| peer.flush());
        if i % 4 != 2 {
            // Hold the connection open until the destination hangs up
            // (a stream cut short is closed at once instead).
            let mut rest = Vec::new();
            let _ = peer.read_to_end(&mut rest);
        }
        drop(peer);
        let code = exits(&mut child)?;
        let err = reader.join().unwrap_or_default();
        t.trials += 1;
        t.bad_inputs += 1;
        t.panics += u64::from(err.contains("panicked"));
        let Some(code) = code else {
            bail!("hostile TLS peer {i}: the destination still ran after {GIVE_UP:?}: {err}")
        };
        t.clear_errors += u64::from(code == 100 && err.contains(says) && err.contains("smudge: error: "));
        if mem.exists() {
            // What it kept is guest memory from a stream it refused.
            t.lost_pages += std::fs::metadata(&mem)?.len().div_ceil(smudge::migration::frame::PAGE);
        }
    }
    std::fs::remove_file(&mem).ok();
    Ok(t)
}
