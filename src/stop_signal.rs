//! SIGTERM and SIGINT as requests to stop, taken by one thread.
//!
//! A service manager stops a VMM with SIGTERM, a person with Ctrl-C
//! (SIGINT). Instead of a handler that runs on whichever thread the kernel
//! picks (a vCPU in `KVM_RUN`, the flusher, under their seccomp filters),
//! the VMM blocks both signals on its main thread before it starts any
//! other ([`block`]): every thread inherits the mask, so the signals stay
//! pending on the process until one thread takes them with [`wait`]
//! (`sigwaitinfo`). That thread runs ordinary code — it takes locks,
//! formats messages — since it is not in a signal handler.
//!
//! [`exit_now`] is `_exit`: the process ends at once, without running
//! exit handlers or flushing stdio buffers (for a second signal, when the
//! clean stop is already under way on other threads).

use std::io;

use libc::c_int;

/// The signals that ask smudge to stop.
pub const STOP_SIGNALS: [c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// The name of a stop signal (`SIGTERM`, `SIGINT`), or `signal N`.
pub fn name(signal: c_int) -> String {
    match signal {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        n => format!("signal {n}"),
    }
}

/// The set of [`STOP_SIGNALS`].
fn stop_set() -> io::Result<libc::sigset_t> {
    // SAFETY: an all-zero sigset_t is a valid value for sigemptyset to
    // initialise; it is a plain bit array owned here.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, owned sigset_t.
    if unsafe { libc::sigemptyset(&mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for s in STOP_SIGNALS {
        // SAFETY: `set` was initialised by sigemptyset; `s` is a valid
        // signal number.
        if unsafe { libc::sigaddset(&mut set, s) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(set)
}

/// Blocks SIGTERM and SIGINT on the calling thread; threads it starts
/// from now on inherit the mask. Call it before any other thread exists,
/// or a thread started earlier may still take the signal (and die of it).
pub fn block() -> io::Result<()> {
    let set = stop_set()?;
    // SAFETY: `set` is an initialised sigset_t; no old mask is asked for.
    // pthread_sigmask only changes this thread's signal mask.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT (blocked with [`block`]) and returns which
/// came. Each call takes one pending signal.
pub fn wait() -> io::Result<c_int> {
    let set = stop_set()?;
    loop {
        // SAFETY: `set` is an initialised sigset_t; a null siginfo pointer
        // asks for no details. sigwaitinfo only reads the set.
        let r = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if r >= 0 {
            return Ok(r);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Ends the process at once with `code` (`_exit`): no exit handlers, no
/// destructors, no flush of stdio buffers; the kernel closes the files.
pub fn exit_now(code: u8) -> ! {
    // SAFETY: _exit ends the process; it touches no memory of this one
    // and is safe to call from any thread at any time.
    unsafe { libc::_exit(c_int::from(code)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_stop_signal_waits_until_taken() {
        // A thread of its own: the mask stays on the thread that sets it.
        let got = std::thread::spawn(|| {
            block().unwrap();
            // Sent to this thread while blocked: it stays pending, and
            // the thread lives on.
            // SAFETY: raise sends a signal to the calling thread only.
            assert_eq!(unsafe { libc::raise(libc::SIGINT) }, 0);
            // SAFETY: as above.
            assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
            // Standard signals are taken lowest number first.
            (wait().unwrap(), wait().unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(got, (libc::SIGINT, libc::SIGTERM));
        assert_eq!((name(got.0), name(got.1)), ("SIGINT".to_string(), "SIGTERM".to_string()));
    }
}
