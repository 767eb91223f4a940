//! The destination of a live migration (`smudge migrate-recv`): listen,
//! accept one source, check its `Hello`, then — while KVM is set up —
//! receive pages into the new memory file through the library's
//! [`Receiver`], which checks every frame first. Once the machine state
//! is in and the vCPUs run, acknowledge; on any failure tell the source
//! why, so it resumes its guest.
//!
//! SIGTERM or SIGINT before the guest runs here abandons the migration:
//! the wait for a source ends, or the connections are shut down (a read
//! that blocks ends at once); `migrate-recv` then removes the memory file
//! it made and exits 108, and the source, whose stream broke, keeps its
//! guest. Once the guest runs here the connections are the guest's
//! (post-copy pages), and a signal stops the run like any other.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smudge::machine_state::MachineState;
use smudge::memory::GuestRam;
use smudge::migration::frame::{Ack, Frame, FrameReader, FrameWriter, Hello};
use smudge::migration::receiver::{check_hello, ReceiveError, Receiver, Step};
use smudge::uffd::UffdError;

use crate::control::signals::{self, OnStop};
use crate::migrate::multifd::Channels;
use crate::migrate::postcopy_dest::{PostcopyDest, Rejoin, DEFAULT_RECOVER_TIMEOUT};
use crate::migrate::tls::TlsServer;
use crate::migrate::transport::{Address, Listener, Stream};
use crate::persist::lazy::LazyError;
use crate::vm::outcome::EXIT_MEMORY_LOST;
use crate::vm::{IncomingVm, VmError};

/// Longest silence from the source between or inside frames before the
/// destination gives up on it.
pub(super) const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// How long a source that connected has for its TLS handshake and its
/// `Hello`: a peer that connects and stalls is dropped after this.
pub(super) const HELLO_LIMIT: Duration = Duration::from_secs(10);

/// Why a guest arriving here (a migration, a lazy restore) could not be
/// received.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// A lazy restore's snapshot chain or its registration.
    #[error(transparent)]
    Lazy(#[from] LazyError),
    /// The new memory file.
    #[error("{}: {source}", path.display())]
    File {
        /// The memory file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A connection could not be watched for a stop signal.
    #[error("{peer}: {source}")]
    Watch {
        /// The source.
        peer: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The source stayed connected but sent nothing for `secs` seconds.
    #[error("migration from {peer}: the source sent nothing for {secs} s after {mib} MiB; giving up on it")]
    Stalled {
        /// The source.
        peer: String,
        /// The read timeout it ran into.
        secs: u64,
        /// MiB received before.
        mib: u64,
    },
    /// A frame failed its checks, or the stream broke.
    #[error("migration from {peer}: {source}")]
    Stream {
        /// The source.
        peer: String,
        /// What was wrong.
        source: ReceiveError,
    },
    /// The extra page connections failed.
    #[error("migration from {peer}: {why}")]
    Channels {
        /// The source.
        peer: String,
        /// What failed.
        why: crate::migrate::multifd::ChannelError,
    },
    /// A round could not be acknowledged.
    #[error("migration from {peer}: acknowledging round {round}: {source}")]
    Ack {
        /// The source.
        peer: String,
        /// The round.
        round: u32,
        /// The connection's error.
        source: std::io::Error,
    },
    /// Guest RAM cannot be registered for post-copy.
    #[error("post-copy: {0}")]
    Postcopy(#[source] UffdError),
    /// A stop signal came while the guest was being received.
    #[error("the migration from {peer} was abandoned on {signal} after {mib} MiB ({source})")]
    Abandoned {
        /// The source.
        peer: String,
        /// The signal's name.
        signal: String,
        /// MiB received.
        mib: u64,
        /// How the receiving ended.
        source: Box<IncomingError>,
    },
}

impl From<IncomingError> for VmError {
    /// The run reports a guest that could not be received as a runtime
    /// failure, as it always has.
    fn from(e: IncomingError) -> Self {
        VmError::Runtime(e.to_string())
    }
}

/// An accepted source whose `Hello` was checked and acknowledged.
#[derive(Debug)]
pub struct Incoming {
    reader: FrameReader<BufReader<Stream>>,
    writer: FrameWriter<Stream>,
    hello: Hello,
    peer: String,
    answered: bool,
    /// Post-copy: set up at the switchover, run once the guest runs.
    postcopy: Option<PostcopyDest>,
    /// The extra page connections (`Hello.connections - 1`), accepted.
    channels: Vec<FrameReader<BufReader<Stream>>>,
    /// What to say on stderr once the guest runs (not before: a write to
    /// stderr costs 20-40 µs of downtime).
    received: Option<String>,
    /// Shut the connections down on a stop signal, until the guest runs.
    interrupt: Vec<OnStop>,
    /// Where it listens, kept for a post-copy migration: a source whose
    /// link breaks after the switchover comes back there. (Bound now: the
    /// running VMM's seccomp filter allows no `bind`.)
    listener: Option<Listener>,
    /// How long a broken post-copy link is waited out (0: not at all).
    recover_within: Duration,
}

impl Incoming {
    /// Listens on `addr` (`HOST:PORT`, `PORT`, `unix:PATH`), says where
    /// on stderr, accepts one source and checks its `Hello` (a refusal is
    /// sent back to the source too). The listener is closed (a unix
    /// socket's file removed) once the source's connections are in — or,
    /// for a post-copy migration, once its phase ends (a source whose link
    /// broke comes back there).
    /// With `tls` every connection must pass its TLS handshake (each end
    /// verifying the other) before a byte of it is read.
    pub fn accept(addr: &str, accept_timeout: Option<Duration>, tls: Option<TlsServer>) -> anyhow::Result<Incoming> {
        use anyhow::Context;
        let addr = Address::listen_on(addr).context("--listen")?;
        let listener = Listener::bind(&addr).context("--listen")?.with_tls(tls);
        let local = listener.local().clone();
        if listener.open_to_others() {
            let _ = writeln!(
                std::io::stderr(),
                "smudge: warning: {local} is reachable from other hosts and the stream is neither authenticated nor \
                 encrypted: whoever connects first sends the guest that runs here (--tls-creds DIR requires TLS)"
            );
        }
        let _ = writeln!(std::io::stderr(), "smudge: waiting for a migration on {local}");
        let waiting = signals::on_stop("the wait for a migration ends; nothing was received", |_| {});
        // Polled: a stop signal ends the wait.
        let t0 = Instant::now();
        let (conn, peer) = loop {
            if let Some(sig) = signals::requested_name() {
                anyhow::bail!("stopped by {sig} while waiting for a migration on {local}: nothing was received");
            }
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => match accept_timeout {
                    Some(t) if t0.elapsed() >= t => {
                        anyhow::bail!("no source connected to {local} within {:.0} s", t.as_secs_f64())
                    }
                    _ => std::thread::sleep(Duration::from_millis(10)),
                },
                Err(e) => return Err(e).context("accepting the source"),
            }
        };
        drop(waiting);
        let conn = listener
            .admit(conn, HELLO_LIMIT)
            .with_context(|| format!("migration from {peer} refused before anything was read"))?;
        let interrupt = vec![conn.shut_on_stop(format!(
            "the migration from {peer} is abandoned (the source keeps its guest) and the memory file removed"
        ))?];
        let mut reader = FrameReader::new(BufReader::with_capacity(1 << 20, conn.try_clone()?));
        let mut writer = FrameWriter::new(conn, false);
        let hello = match reader.next_frame().map_err(ReceiveError::from).and_then(check_hello) {
            Ok(h) => h,
            Err(e) if e.is_stall() => anyhow::bail!(
                "migration from {peer}: the source connected but sent no Hello within {} s; giving up on it",
                HELLO_LIMIT.as_secs()
            ),
            Err(e) => {
                let _ = writer.send(&Frame::Ack(Ack::refused(e.to_string())));
                return Err(anyhow::anyhow!("migration from {peer}: {e}"));
            }
        };
        tracing::info!(
            "migration from {peer}: {} MiB RAM, {} vCPU(s), {} connection(s)",
            hello.mem_size >> 20,
            hello.vcpus,
            hello.connections
        );
        writer.get_mut().set_timeouts(Some(IDLE_LIMIT), Some(HELLO_LIMIT))?;
        let channels = match super::multifd::accept_channels(&listener, &hello) {
            Ok(c) => c,
            Err(e) => {
                let _ = writer.send(&Frame::Ack(Ack::refused(e.to_string())));
                return Err(anyhow::anyhow!("migration from {peer}: {e}"));
            }
        };
        let hello_postcopy = hello.postcopy && hello.migration != 0;
        Ok(Incoming {
            reader,
            writer,
            hello,
            peer,
            answered: false,
            postcopy: None,
            channels,
            received: None,
            interrupt,
            listener: hello_postcopy.then_some(listener),
            recover_within: DEFAULT_RECOVER_TIMEOUT,
        })
    }

    /// How long to wait for the source to resume a post-copy migration
    /// whose link broke after the switchover (zero: the guest is lost at
    /// once, as before recovery existed).
    pub fn recover_within(&mut self, within: Duration) {
        self.recover_within = within;
    }

    /// How a broken post-copy link is waited out, if it is (the listener
    /// is closed otherwise).
    fn rejoin(&mut self) -> Option<Rejoin> {
        let listener = self.listener.take()?;
        (!self.recover_within.is_zero()).then(|| Rejoin {
            listener,
            migration: self.hello.migration,
            within: self.recover_within,
        })
    }

    /// What the source announced.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Accepts the `Hello` (once the memory file is known to be usable).
    pub fn welcome(&mut self) -> anyhow::Result<()> {
        self.writer.send(&Frame::Ack(Ack::ok()))?;
        Ok(())
    }

    /// Refuses the migration, telling the source why.
    pub fn refuse(&mut self, why: &str) {
        self.answer(Ack::refused(why));
    }

    /// Sends the final answer (once).
    fn answer(&mut self, ack: Ack) {
        if self.answered {
            return;
        }
        self.answered = true;
        if let Err(e) = self.writer.send(&Frame::Ack(ack)).and_then(|_| self.writer.flush()) {
            tracing::warn!("migration from {}: cannot answer the source: {e}", self.peer);
        }
    }
}

impl IncomingVm for Incoming {
    fn receive(&mut self, file: &File, path: &Path, ram: &GuestRam) -> Result<MachineState, IncomingError> {
        let file = file.try_clone().map_err(|source| IncomingError::File { path: path.to_path_buf(), source })?;
        let peer = self.peer.clone();
        let channels = std::mem::take(&mut self.channels);
        for c in &channels {
            // Said once, by the main connection's hook.
            self.interrupt.push(
                c.get_ref()
                    .get_ref()
                    .shut_on_stop(String::new())
                    .map_err(|source| IncomingError::Watch { peer: peer.clone(), source })?,
            );
        }
        let r = self.receive_frames(file, path, ram, channels);
        match (r, signals::requested_name()) {
            (Err(e), Some(signal)) => {
                Err(IncomingError::Abandoned { peer, signal, mib: self.reader.bytes() >> 20, source: Box::new(e) })
            }
            (r, _) => r,
        }
    }

    fn started(&mut self, result: Result<(), &VmError>, loading: &Arc<AtomicBool>) {
        // The guest runs here (or will not): the connections are no longer
        // the stop's to shut (post-copy pages still come over them).
        self.interrupt.clear();
        self.answer_started(result, loading)
    }
}

impl Incoming {
    fn receive_frames(
        &mut self,
        file: File,
        path: &Path,
        ram: &GuestRam,
        channels: Vec<FrameReader<BufReader<Stream>>>,
    ) -> Result<MachineState, IncomingError> {
        let peer = self.peer.clone();
        let channels_failed = |why| IncomingError::Channels { peer: peer.clone(), why };
        let stream = |source: ReceiveError, bytes: u64| match source.is_stall() {
            true => IncomingError::Stalled { peer: peer.clone(), secs: IDLE_LIMIT.as_secs(), mib: bytes >> 20 },
            false => IncomingError::Stream { peer: peer.clone(), source },
        };
        let mut channels = match channels.is_empty() {
            true => None,
            false => Some(Channels::start(channels, &file, path, &self.hello).map_err(channels_failed)?),
        };
        let mut rx = Receiver::new(file, path, self.hello.clone());
        let t0 = Instant::now();
        let mut rounds = 0u64;
        loop {
            let f = self.reader.next_frame().map_err(|e| stream(e.into(), self.reader.bytes()))?;
            if matches!(f, Frame::State(_)) {
                // Every page connection ended before the state: their
                // pages count towards the totals `Done` is checked against.
                if let Some(c) = channels.take() {
                    let (p, z) = c.finish().map_err(channels_failed)?;
                    rx.add_received(p, z);
                }
            }
            match rx.apply(f).map_err(|e| stream(e, self.reader.bytes()))? {
                Step::Continue | Step::ChannelDone { .. } => {}
                Step::Round { round, pages } => {
                    rounds += 1;
                    if let Some(c) = &channels {
                        c.wait_round(rounds).map_err(channels_failed)?;
                    }
                    tracing::info!(
                        "migration round {round}: {pages} pages; {} MiB received in {:.0} ms",
                        self.reader.bytes() >> 20,
                        t0.elapsed().as_secs_f64() * 1e3
                    );
                    // The round is stored: the source may count it done.
                    self.writer.send(&Frame::Ack(Ack::ok())).map_err(|source| IncomingError::Ack {
                        peer: peer.clone(),
                        round,
                        source,
                    })?;
                }
                Step::Done(state) => {
                    self.received = Some(format!(
                        "smudge: migration from {} received: {} MiB in {:.0} ms{}",
                        self.peer,
                        self.reader.bytes() >> 20,
                        t0.elapsed().as_secs_f64() * 1e3,
                        match rx.verified_digest() {
                            Some(d) => format!("; memory checksum {d:#010x} matches the source's"),
                            None => String::new(),
                        }
                    ));
                    return Ok(*state);
                }
                Step::Postcopy(state, owed) => {
                    self.received = Some(format!(
                        "smudge: post-copy switchover from {}: {} MiB received in {:.0} ms; {} pages still owed, \
                         the guest runs here now",
                        self.peer,
                        self.reader.bytes() >> 20,
                        t0.elapsed().as_secs_f64() * 1e3,
                        owed.remaining()
                    ));
                    self.postcopy =
                        Some(PostcopyDest::prepare(ram, &self.hello.layout, owed).map_err(IncomingError::Postcopy)?);
                    return Ok(*state);
                }
            }
        }
    }

    fn answer_started(&mut self, result: Result<(), &VmError>, loading: &Arc<AtomicBool>) {
        let running_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_micros()).ok());
        let ok = result.is_ok();
        self.answer(match result {
            Ok(()) => Ack { running_at_unix_us: running_at, ..Ack::ok() },
            Err(e) => Ack::refused(format!("the destination could not start the guest: {e}")),
        });
        if let (true, Some(line)) = (ok, self.received.take()) {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
        if let (true, Some(pc)) = (ok, self.postcopy.take()) {
            // The receive and fault threads take the connection over (what
            // stays here are unused duplicates of its socket).
            let taken = self.writer.get_mut().try_clone().and_then(|s| Ok((s.try_clone()?, s))).map(|(a, b)| {
                (
                    std::mem::replace(&mut self.reader, FrameReader::new(BufReader::new(a))),
                    std::mem::replace(&mut self.writer, FrameWriter::new(b, false)),
                )
            });
            match taken {
                Ok((r, w)) => {
                    let rejoin = self.rejoin();
                    pc.run(r, w, self.peer.clone(), rejoin, loading.clone())
                }
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "smudge: post-copy: {e}; the guest cannot continue");
                    std::process::exit(i32::from(EXIT_MEMORY_LOST));
                }
            }
        }
        // Pre-copy converged before the switch to post-copy (or the guest
        // did not start): nobody comes back here.
        self.listener = None;
    }
}
