//! Starting a `smudge` process and waiting for it: the binary to run, a
//! wait that ends early when the process exits, and the start of a VM with
//! a control socket. Tests, benchmarks and [`TestVm`](crate::TestVm) all
//! start smudge this way.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::vm::HarnessError;

/// How often a wait looks again.
pub const POLL: Duration = Duration::from_millis(5);

/// The `smudge` binary to run: `SMUDGE_BIN`, else `smudge` beside the
/// running executable or in its parent directory — where cargo puts it for
/// the integration tests of the VMM package (`target/release/deps/…` runs
/// `target/release/smudge`, which cargo builds before those tests: the
/// file `CARGO_BIN_EXE_smudge` names), for examples and for `smudge-bench`.
pub fn find_binary() -> Result<PathBuf, HarnessError> {
    let mut searched = Vec::new();
    if let Some(p) = std::env::var_os("SMUDGE_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        searched.push(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let p = dir.join("smudge");
            // Not ourselves (`smudge` running a test of its own library).
            if p.is_file() && p != exe {
                return Ok(p);
            }
            searched.push(p);
        }
    }
    Err(HarnessError::BinaryNotFound { searched })
}

/// Why a wait for a process ended without what it waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    /// The process exited first.
    #[error("smudge exited ({0})")]
    Exited(ExitStatus),
    /// The time limit passed.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
}

/// Looks at `ready` every [`POLL`] until it gives a value; fails when
/// `exited` says the process has ended (after a last look at `ready`) or
/// after `limit`.
pub fn wait_until<T>(
    limit: Duration,
    mut exited: impl FnMut() -> Option<ExitStatus>,
    mut ready: impl FnMut() -> Option<T>,
) -> Result<T, WaitError> {
    let t0 = Instant::now();
    loop {
        let ended = exited();
        if let Some(v) = ready() {
            return Ok(v);
        }
        if let Some(s) = ended {
            return Err(WaitError::Exited(s));
        }
        if t0.elapsed() >= limit {
            return Err(WaitError::TimedOut(limit));
        }
        std::thread::sleep(POLL);
    }
}

/// Why [`spawn_with_api`] has no VM to give.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The process did not start.
    #[error("cannot start {command}")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// It ended, or did not serve its socket in time (then it was killed).
    #[error("{socket}: no control API socket: {why}{}", stderr_shown(.stderr))]
    NoSocket {
        /// The socket awaited.
        socket: String,
        /// Exited or timed out.
        why: WaitError,
        /// What smudge wrote to stderr, if it was piped.
        stderr: String,
    },
}

fn stderr_shown(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!("\n--- smudge stderr ---\n{stderr}")
    }
}

/// Starts `cmd` — a `smudge run` or `smudge restore` given
/// `--api-sock sock` — and returns it once the socket is there (smudge
/// binds it under another name and renames it into place once it listens,
/// so a path that exists is a socket that answers: `sock` must not exist
/// before). If smudge exits first or `limit` passes, it is killed and the
/// error shows its stderr (when piped).
pub fn spawn_with_api(cmd: &mut Command, sock: &Path, limit: Duration) -> Result<Child, StartError> {
    let mut child = cmd.spawn().map_err(|source| StartError::Spawn { command: format!("{cmd:?}"), source })?;
    let waited = wait_until(limit, || child.try_wait().ok().flatten(), || sock.exists().then_some(()));
    match waited {
        Ok(()) => Ok(child),
        Err(why) => {
            let _ = child.kill();
            let _ = child.wait();
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            Err(StartError::NoSocket { socket: sock.display().to_string(), why, stderr })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]).stdout(Stdio::null()).stderr(Stdio::piped());
        c
    }

    #[test]
    fn a_wait_ends_with_the_value_the_exit_or_the_limit() {
        let mut n = 0;
        let v = wait_until(
            WAIT_FOR_TESTS,
            || None,
            || {
                n += 1;
                (n == 3).then_some(n)
            },
        );
        assert_eq!(v, Ok(3));
        let mut child = sh("exit 7").spawn().unwrap();
        let e = wait_until(WAIT_FOR_TESTS, || child.try_wait().ok().flatten(), || None::<()>).unwrap_err();
        assert!(matches!(e, WaitError::Exited(s) if s.code() == Some(7)), "{e:?}");
        // What is ready when the process has just ended still counts.
        assert_eq!(wait_until(WAIT_FOR_TESTS, || child.try_wait().ok().flatten(), || Some(1)), Ok(1));
        let limit = Duration::from_millis(20);
        assert_eq!(wait_until(limit, || None, || None::<()>), Err(WaitError::TimedOut(limit)));
    }

    #[test]
    fn a_start_waits_for_the_socket_and_shows_why_there_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let script = format!("sleep 0.1; touch '{}'; exec sleep 60", sock.display());
        let mut child = spawn_with_api(&mut sh(&script), &sock, WAIT_FOR_TESTS).unwrap();
        assert!(sock.exists() && child.try_wait().unwrap().is_none());
        child.kill().unwrap();
        child.wait().unwrap();

        let other = dir.path().join("other.sock");
        let e = spawn_with_api(&mut sh("echo cannot start >&2; exit 100"), &other, WAIT_FOR_TESTS).unwrap_err();
        let StartError::NoSocket { why: WaitError::Exited(s), stderr, .. } = &e else { panic!("{e:?}") };
        assert_eq!((s.code(), stderr.as_str()), (Some(100), "cannot start\n"));
        assert!(e.to_string().ends_with("--- smudge stderr ---\ncannot start\n"), "{e}");

        let limit = Duration::from_millis(50);
        let e = spawn_with_api(&mut sh("exec sleep 60"), &other, limit).unwrap_err();
        let StartError::NoSocket { why, stderr, .. } = &e else { panic!("{e:?}") };
        assert_eq!((why, stderr.as_str()), (&WaitError::TimedOut(limit), ""));
    }

    /// Generous: these tests run beside others on a loaded machine.
    const WAIT_FOR_TESTS: Duration = Duration::from_secs(60);
}
