//! SIGTERM and SIGINT: a clean stop, as `ctl stop` makes one.
//!
//! `run`, `restore` and `migrate-recv` call [`install`] before they start
//! any thread: SIGTERM and SIGINT are blocked in every thread, and one
//! thread of their own ("signals", under a seccomp filter of its own)
//! waits for them (see [`smudge::stop_signal`]).
//!
//! ```text
//! first signal   smudge: SIGTERM: stopping: <what each part of the run does>
//!                every hook registered with `on_stop` runs, newest first:
//!                  the VM run     -> Outcome::Signalled: the event loop ends,
//!                                    the vCPUs pause for good, the final
//!                                    writeback sync runs, the API socket and
//!                                    staging files go; exit 108
//!                  a migration    -> its socket is shut down: the source
//!                                    keeps its guest (as on a broken stream),
//!                                    the destination removes its memory file
//!                  a live snapshot   abandons at its next round and removes
//!                                    its directory (it has no manifest yet)
//! second signal  smudge: SIGTERM again: exiting at once ...; exit 109
//! ```
//!
//! Work that checks [`requested`] (an incoming migration's wait for a
//! source, a live snapshot's rounds, a migration's pages) gives up on its
//! own; blocking socket I/O is ended by the hook that shuts the socket.
//!
//! Test holds ([`Hold`], the hidden `--test-hold` option) make a test's
//! precondition happen by construction: the run waits at a named point
//! until a stop signal comes, so the signal lands exactly there.

use std::io::Write;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libc::c_int;
use smudge::stop_signal;

use crate::vm::outcome::{EXIT_SECOND_SIGNAL, EXIT_SETUP};

/// A point where a test can make the run wait (`--test-hold`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Hold {
    /// The vCPU threads wait to start (the guest has not run an
    /// instruction) until a stop signal comes.
    Start,
    /// A live snapshot waits after its first copy of RAM until a stop
    /// signal comes.
    LiveSnapshot,
    /// The first stop signal is announced but not acted on: the stop
    /// "takes forever", until a second signal ends the process.
    Stop,
}

impl Hold {
    fn bit(self) -> u8 {
        match self {
            Hold::Start => 1,
            Hold::LiveSnapshot => 2,
            Hold::Stop => 4,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Hold::Start => "the vCPUs wait to start",
            Hold::LiveSnapshot => "the live snapshot waits after its first copy",
            Hold::Stop => "the stop waits for a second signal",
        }
    }
}

/// Longest a test hold waits for its signal before the run goes on.
const HOLD_LIMIT: Duration = Duration::from_secs(60);

/// Something to do when the first stop signal comes.
struct Hook {
    id: u64,
    what: String,
    run: Box<dyn Fn(c_int) + Send>,
}

/// The process's stop signals: which came first, what to do then.
struct State {
    /// The first stop signal acted on (0: none yet).
    first: AtomicI32,
    /// The registered hooks, oldest first (run newest first).
    hooks: Mutex<Vec<Hook>>,
    next_id: AtomicU64,
    /// The armed test holds ([`Hold::bit`]).
    holds: AtomicU8,
}

static STATE: State = State {
    first: AtomicI32::new(0),
    hooks: Mutex::new(Vec::new()),
    next_id: AtomicU64::new(1),
    holds: AtomicU8::new(0),
};

fn hooks() -> MutexGuard<'static, Vec<Hook>> {
    STATE.hooks.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why the stop signals could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// Blocking the signals failed.
    #[error("blocking SIGTERM and SIGINT: {0}")]
    Block(#[source] std::io::Error),
    /// The waiting thread could not be started.
    #[error("starting the signal thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Blocks SIGTERM and SIGINT in this thread and every thread started
/// after, and starts the thread that takes them (under its seccomp filter
/// when `seccomp`). Call once, before any other thread is started. `holds`
/// arms test holds.
pub fn install(seccomp: bool, holds: &[Hold]) -> Result<(), SignalError> {
    STATE.holds.store(holds.iter().fold(0, |a, h| a | h.bit()), Ordering::Release);
    stop_signal::block().map_err(SignalError::Block)?;
    let ctx = crate::vm::seccomp::Context::current();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            // Built here, off the main thread's way to the guest; a signal
            // meanwhile stays pending. Without it smudge does not run, as
            // without the VMM filter.
            if seccomp {
                if let Err(e) = crate::vm::seccomp::SignalsFilter::new(&ctx).and_then(|f| f.install()) {
                    let _ = writeln!(std::io::stderr(), "smudge: error: {e}");
                    stop_signal::exit_now(EXIT_SETUP);
                }
            }
            take_signals();
        })
        .map_err(SignalError::Spawn)?;
    Ok(())
}

/// The signal thread's loop: the first signal stops, the second exits.
fn take_signals() {
    let mut taken = 0;
    loop {
        let sig = match stop_signal::wait() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("waiting for SIGTERM/SIGINT failed: {e}; they are ignored from now on");
                return;
            }
        };
        taken += 1;
        let name = stop_signal::name(sig);
        if taken > 1 {
            let _ = writeln!(
                std::io::stderr(),
                "smudge: {name} again: exiting at once (exit code {EXIT_SECOND_SIGNAL}): no final sync; the \
                 memory file holds what the page cache has, and the API socket, staging files and any \
                 snapshot in progress (without a manifest: not a snapshot) are left"
            );
            stop_signal::exit_now(EXIT_SECOND_SIGNAL);
        }
        if held(Hold::Stop) {
            let _ = writeln!(
                std::io::stderr(),
                "smudge: {name}: stopping (a second signal exits at once)\nsmudge: test hold: {}",
                Hold::Stop.what()
            );
            continue;
        }
        let hooks = hooks();
        STATE.first.store(sig, Ordering::Release);
        let what: Vec<&str> = hooks.iter().rev().map(|h| h.what.as_str()).filter(|w| !w.is_empty()).collect();
        let what = if what.is_empty() { String::new() } else { format!(": {}", what.join("; ")) };
        let _ = writeln!(std::io::stderr(), "smudge: {name}: stopping{what} (a second signal exits at once)");
        for h in hooks.iter().rev() {
            (h.run)(sig);
        }
    }
}

/// The stop signal that came, if one did (and is acted on).
pub fn requested() -> Option<c_int> {
    match STATE.first.load(Ordering::Acquire) {
        0 => None,
        s => Some(s),
    }
}

/// The name of the stop signal that came (`SIGTERM`), if one did.
pub fn requested_name() -> Option<String> {
    requested().map(stop_signal::name)
}

/// A registered [`on_stop`] hook; dropping it unregisters it (it does not
/// run after the drop returns).
#[derive(Debug)]
#[must_use = "the hook is removed when this is dropped"]
pub struct OnStop {
    id: u64,
}

impl Drop for OnStop {
    fn drop(&mut self) {
        hooks().retain(|h| h.id != self.id);
    }
}

/// Runs `run` (on the signal thread) when the first stop signal comes —
/// at once, here, if it came already. `what` says what it does, for the
/// message the signal thread prints (empty: nothing to say). `run` must be quick and must not
/// register or drop hooks.
pub fn on_stop(what: impl Into<String>, run: impl Fn(c_int) + Send + 'static) -> OnStop {
    let id = STATE.next_id.fetch_add(1, Ordering::Relaxed);
    let mut hooks = hooks();
    if let Some(sig) = requested() {
        run(sig);
    }
    hooks.push(Hook { id, what: what.into(), run: Box::new(run) });
    OnStop { id }
}

fn held(h: Hold) -> bool {
    STATE.holds.load(Ordering::Acquire) & h.bit() != 0
}

/// A test hold: when `point` is armed, says so on stderr and waits until
/// a stop signal comes (at most a minute).
pub fn test_hold(point: Hold) {
    if !held(point) {
        return;
    }
    let _ = writeln!(std::io::stderr(), "smudge: test hold: {}", point.what());
    let t0 = Instant::now();
    while requested().is_none() {
        if t0.elapsed() > HOLD_LIMIT {
            let _ = writeln!(std::io::stderr(), "smudge: test hold: no stop signal within {HOLD_LIMIT:?}; going on");
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use super::*;

    #[test]
    fn hooks_run_once_registered_and_not_after_their_drop() {
        // Nothing requested in this test process: hooks only register.
        assert_eq!(requested(), None);
        let n = Arc::new(AtomicUsize::new(0));
        let c = n.clone();
        let hook = on_stop("counting", move |_| {
            c.fetch_add(1, Ordering::Relaxed);
        });
        let id = hook.id;
        assert!(hooks().iter().any(|h| h.id == id && h.what == "counting"));
        drop(hook);
        assert!(!hooks().iter().any(|h| h.id == id));
        assert_eq!(n.load(Ordering::Relaxed), 0);
    }
}
