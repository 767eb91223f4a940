//! A `smudge migrate-recv` run by a test: its listening address, what it
//! printed so far, and waits that fail with all of it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smudge_testkit::{path, smudge, WAIT};

/// A `smudge migrate-recv` and what it printed so far.
pub struct Dest {
    pub child: Child,
    /// Where it listens (as it said).
    pub addr: String,
    pub stderr: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
    pub mem: PathBuf,
    pub serial: PathBuf,
    /// Its control socket (up once a guest arrived).
    pub sock: PathBuf,
}

impl Dest {
    /// A destination listening on `listen` (a port, `unix:PATH`) with its
    /// memory file at `mem`, its serial output and control socket in
    /// `dir`, and `extra` options; returns once it says where it listens.
    pub fn spawn(dir: &tempfile::TempDir, listen: &str, mem: PathBuf, extra: &[&str]) -> Dest {
        let (serial, sock) = (path(dir, "dst.serial"), path(dir, "dst.sock"));
        let mut child = smudge()
            .args(["migrate-recv", "--listen", listen, "--accept-timeout", "60"])
            .args(["--mem-file", mem.to_str().unwrap(), "--serial", serial.to_str().unwrap()])
            .args(["--api-sock", sock.to_str().unwrap()])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (err, sink) = (child.stderr.take().unwrap(), stderr.clone());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("smudge: waiting for a migration on ") {
                    let _ = tx.send(a.to_string());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx.recv_timeout(WAIT).expect("migrate-recv never said where it listens");
        Dest { child, addr, stderr, reader, mem, serial, sock }
    }

    /// What it printed so far: smudge's stderr and the guest's serial output.
    pub fn log(&self) -> String {
        let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
        format!(
            "--- destination stderr ---\n{}\n--- its guest's serial output ---\n{serial}",
            self.stderr.lock().unwrap()
        )
    }

    /// Waits until `ok` gives something (at most [`WAIT`]); fails with
    /// `what` and everything the destination printed if it does not, or if
    /// the destination exits first.
    pub fn wait_until<T>(&mut self, what: &str, ok: impl Fn(&Dest) -> Option<T>) -> T {
        let t0 = Instant::now();
        loop {
            if let Some(v) = ok(self) {
                return v;
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("the destination exited ({s}) while the test waited for {what}\n{}", self.log());
            }
            assert!(t0.elapsed() < WAIT, "timed out waiting for {what}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its exit code, stderr and guest serial output, once it ended.
    pub fn wait(self) -> (i32, String, String) {
        let mut child = self.child;
        let code = child.wait().unwrap().code().unwrap_or(-1);
        // The reader ends with the pipe: all of stderr is in.
        self.reader.join().unwrap();
        let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let err = self.stderr.lock().unwrap().clone();
        (code, err, serial)
    }
}
