//! The source side of a live migration: iterative pre-copy over TCP or a
//! unix socket ([`super::transport`]).
//!
//! ```text
//! connect, Hello -> Ack
//! new dirty-log subscription (re-protect all)  pages written from here on are logged
//! round 0: every page with data (SEEK_DATA), zero pages skipped
//!          each round ends when the destination has stored it (RoundEnd -> Ack)
//! round n: the pages the subscription collected during round n-1
//!          until sending what is dirty now fits the downtime budget
//!          (bandwidth measured each round) or rounds run out;
//!          auto-converge throttles the vCPUs when rounds do not shrink
//! pause, final collect, residue, State, Done -> Ack (destination runs)
//! ```
//!
//! Rounds after round 0 run on the pre-copy round driver
//! (`persist::precopy::run_rounds`), this module's hooks sending each.
//!
//! Guest memory is only read, and the subscription is this migration's own, so
//! a failure at any point (the destination dies, the stream breaks, a bad
//! answer) resumes the guest with nothing lost.
//!
//! A stop signal (SIGTERM, SIGINT) before the switchover abandons the
//! migration as a broken stream would: the connection is shut down (a
//! blocked write or read ends) and the rounds give up at their next page
//! chunk; the guest stays here and the run stops. From the switchover on
//! the migration is let finish: the destination may already run the guest.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use smudge::dirty_set::DirtySet;
use smudge::harvest::{HarvestError, Harvester, Subscription};
use smudge::memory::{file_offset_to_gpa, gpa_to_file_offset, ram_layout, GuestRam, RamRegion};
use smudge::migration::checksum::{digest, memory_crcs};
use smudge::migration::frame::{Ack, Frame, FrameReader, FrameWriter, Hello, MAX_FRAME_PAGES, PAGE};
use smudge::migration::local::LocalRam;
use vm_memory::{Bytes, GuestAddress};

use super::converge::{Converger, Throttle};
use super::tls::TlsClient;
use super::transport::{AddressError, DialError, Dialer, Stream};
use crate::control::signals::{self, OnStop};
use crate::persist::precopy::{run_rounds, Budget, End, Look, Round, RoundHooks};
use crate::vm::vcpu_control::VcpuControl;

/// How to migrate.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Destination, `HOST:PORT` or `unix:PATH`.
    pub to: String,
    /// Longest pause the final round may take (estimated from bandwidth).
    pub downtime: Duration,
    /// Rounds after round 0 before the final round is forced.
    pub max_rounds: u32,
    /// Send at most this many bytes per second.
    pub bandwidth: Option<u64>,
    /// LZ4 page data.
    pub lz4: bool,
    /// Throttle the vCPUs when pre-copy does not converge.
    pub auto_converge: bool,
    /// Send a CRC-32 per MiB of RAM at switchover for the destination to
    /// check its memory against (costs a read of all RAM in the pause).
    pub verify_memory: bool,
    /// Same-host handover: the destination maps this VM's RAM file and
    /// only the machine state is sent.
    pub local: bool,
    /// Page connections (1: the main one only).
    pub connections: u32,
    /// TLS on every connection (`--tls-creds`), each end verifying the other.
    pub tls: Option<TlsClient>,
    /// Switch to post-copy after this many pre-copy rounds (0: at once,
    /// no round at all): the guest then runs on the destination while the
    /// pages still here follow, streamed and fetched on demand.
    pub postcopy_after: Option<u32>,
    /// Resume the post-copy migration whose link broke (`to` empty: where
    /// it went last; `tls` none: its credentials).
    pub resume: bool,
}

/// The default downtime budget: the pause covers the final round's pages
/// plus a fixed cost of ~2-5 ms here (pausing the vCPUs, saving their
/// state, the destination restoring it and starting its threads). 20 ms
/// leaves room for a few MiB of residue at loopback speed, 15x below the
/// 300 ms QEMU and Cloud Hypervisor default to.
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(20);
/// A final round estimated below this is not worth another round.
const MIN_WORTH_A_ROUND: Duration = Duration::from_micros(500);
/// Default cap on rounds after round 0.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;

/// One pre-copy round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    /// Round number (0 sends everything; the last is the paused one).
    pub round: u32,
    /// Data pages sent.
    pub pages: u64,
    /// Zero pages sent as markers.
    pub zero_pages: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Duration.
    pub ms: f64,
    /// Auto-converge throttle during the round (percent).
    pub throttle_pct: u32,
    /// Dirty-limit throttle of each vCPU during the round (percent; only
    /// with the ring, once a limit was needed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vcpu_throttle_pct: Vec<u32>,
}

/// What a migration did.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    /// Destination.
    pub to: String,
    /// Connect to acknowledgement.
    pub total_ms: f64,
    /// Opening the main connection: the connect and, with TLS, the
    /// handshake (both ends' certificates checked). Before the pre-copy
    /// rounds, so no part of the downtime.
    pub handshake_ms: f64,
    /// vCPUs paused here until the destination said its guest runs.
    pub downtime_ms: f64,
    /// The budget asked for.
    pub downtime_budget_ms: f64,
    /// Every round, the final (paused) one last.
    pub rounds: Vec<RoundReport>,
    /// Bytes on the wire in all.
    pub bytes_sent: u64,
    /// Data pages sent in all.
    pub pages_sent: u64,
    /// Zero-page markers sent in all.
    pub zero_pages_sent: u64,
    /// How convergence was reached: `none` (it converged by itself),
    /// `auto-converge N%` (the highest throttle used) or `max-rounds`.
    pub converge: String,
    /// Measured send rate of the last running round, MB/s.
    pub bandwidth_mbps: f64,
    /// Digest of the memory checksums at switchover, which the destination
    /// matched (with `verify_memory`).
    pub memory_crc32: Option<u32>,
    /// Where the downtime went.
    pub downtime_parts: DowntimeParts,
    /// The pause's start here to the destination's vCPUs set running, by
    /// the two hosts' realtime clocks: QEMU's STOP-to-RESUME. `downtime_ms`
    /// adds the answer's trip back and this thread's wake-up (on 2 busy
    /// cores up to ~2 ms). None unless the figure lies within 0 and
    /// `downtime_ms` (the destination did not say, or clocks disagree).
    pub stop_to_running_ms: Option<f64>,
    /// Data pages sent per connection (the main one first).
    pub connection_pages: Vec<u64>,
    /// The post-copy phase, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<super::postcopy_source::PostcopyReport>,
}

impl MigrationReport {
    /// What a migration that switched over reports, from the sender's
    /// counts; the caller adds the checksum, the downtime's parts and the
    /// post-copy phase where it has them (`total_ms` is set last).
    pub(super) fn switched(
        opts: &MigrateOptions,
        s: &Sender,
        rounds: Vec<RoundReport>,
        converge: String,
        bandwidth: f64,
        downtime: Duration,
    ) -> MigrationReport {
        MigrationReport {
            to: opts.to.clone(),
            total_ms: 0.0,
            handshake_ms: 0.0,
            downtime_ms: downtime.as_secs_f64() * 1e3,
            downtime_budget_ms: opts.downtime.as_secs_f64() * 1e3,
            rounds,
            bytes_sent: s.bytes(),
            connection_pages: s.connection_pages(),
            pages_sent: s.pages,
            zero_pages_sent: s.zero_pages,
            converge,
            bandwidth_mbps: bandwidth / 1e6,
            memory_crc32: None,
            downtime_parts: DowntimeParts::default(),
            stop_to_running_ms: None,
            postcopy: None,
        }
    }
}

/// The downtime, phase by phase (ms).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DowntimeParts {
    /// Asking the vCPUs to stop until all are parked.
    pub pause_ms: f64,
    /// Final harvest and the residue on the wire (and checksums, if asked).
    pub residue_ms: f64,
    /// Each vCPU's thread reading its state, and the devices'; sending it.
    pub state_ms: f64,
    /// From the last byte sent to the destination's "running" (it loads
    /// the state, starts its vCPUs, answers).
    pub destination_ms: f64,
}

/// Stop to running from the pause start `tp` (this clock) and the
/// destination's answer (its clock); see [`MigrationReport::stop_to_running_ms`].
pub(super) fn stop_to_running(tp: Instant, ack: &Ack) -> Option<f64> {
    let running_at = ack.running_at_unix_us?;
    let to_ack = tp.elapsed();
    let paused_at = SystemTime::now().checked_sub(to_ack)?.duration_since(UNIX_EPOCH).ok()?;
    let ms = (running_at as f64 - paused_at.as_micros() as f64) / 1e3;
    (0.0..=to_ack.as_secs_f64() * 1e3).contains(&ms).then_some(ms)
}

pub(super) fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Progress while a round is sent and after each round, for the control
/// API's `stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// The round being sent (`sending`), else the round just finished.
    pub round: u32,
    /// Whether `round` is being sent now.
    pub sending: bool,
    /// While sending: the pages of the round not read yet (of this
    /// connection's share, with `--connections`). After a round: pages
    /// dirty now (the next round's work).
    pub remaining_pages: u64,
    /// Send rate, MB/s (of the round so far, while sending).
    pub rate_mbps: f64,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Throttle now (percent).
    pub throttle_pct: u32,
}

/// Why a migration failed; the guest runs on here.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The destination's address is not one.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// Could not reach the destination, or TLS refused it.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The stream broke or the destination refused.
    #[error("{0}")]
    Stream(String),
    /// The dirty log failed.
    #[error("dirty log: {0}")]
    DirtyLog(#[from] HarvestError),
    /// The stream broke after a post-copy switchover: the guest ran on the
    /// destination, and stays paused here at the switchover point.
    #[error("post-copy broke after the switchover: {0}")]
    Postcopy(String),
    /// Pausing or saving the vCPUs failed.
    #[error("{0}")]
    Vcpus(String),
    /// `--resume` with no post-copy migration paused.
    #[error(
        "no post-copy migration is paused here: nothing to resume (--resume continues a post-copy migration whose \
         link broke after the switchover)"
    )]
    NothingPaused,
    /// A new migration while a post-copy one is paused.
    #[error(
        "a post-copy migration to {0} is paused: the guest runs there and waits for its pages; resume it \
         (ctl migrate --resume [--to ADDR]) instead of starting another"
    )]
    PostcopyPaused(String),
}

/// What a migration reads: the VM's RAM and its dirty log.
#[derive(Debug, Clone)]
pub struct MigrationSource {
    /// The vCPUs.
    pub vcpus: VcpuControl,
    /// The dirty log.
    pub harvester: Arc<Mutex<Harvester>>,
    /// Guest RAM.
    pub ram: GuestRam,
    /// The backing file (for `SEEK_DATA`).
    pub file: Arc<File>,
    /// Its path (named to the destination of a same-host handover).
    pub path: std::path::PathBuf,
    /// RAM bytes.
    pub mem_size: u64,
    /// A post-copy migration whose link broke, waiting to be resumed.
    pub recovery: super::postcopy_source::Recovery,
}

/// The sending half: frames, counters and the bandwidth cap.
pub(super) struct Sender {
    pub(super) w: FrameWriter<BufWriter<Stream>>,
    pub(super) layout: Vec<RamRegion>,
    buf: Vec<u8>,
    zero_runs: Vec<(u64, u32)>,
    limit: Option<u64>,
    window: (Instant, u64),
    pub(super) pages: u64,
    pub(super) zero_pages: u64,
    /// Extra page connections (`--connections`), and the bytes they sent.
    channels: Option<super::multifd::Workers>,
    channel_bytes: u64,
    /// Held while a stop signal may abandon the migration (before the
    /// switchover): it shuts the connection down.
    interrupt: Option<OnStop>,
    /// Pages read on this connection in the round being sent.
    round_read_pages: u64,
    /// The migration's id (its `Hello`'s).
    pub(super) migration: u64,
}

/// Told after each frame of a round on the main connection: the sender,
/// and the round's pages read so far on it.
pub(super) type Tick<'a> = &'a mut dyn FnMut(&Sender, u64);

pub(super) fn stream_err(what: &str) -> impl FnOnce(std::io::Error) -> MigrateError + '_ {
    move |e| MigrateError::Stream(format!("{what}: {e}"))
}

impl Sender {
    /// A sender on `conn` for RAM of `mem_size` bytes.
    pub(super) fn new(conn: Stream, lz4: bool, mem_size: u64, limit: Option<u64>) -> Self {
        Sender {
            w: FrameWriter::new(BufWriter::with_capacity(1 << 20, conn), lz4),
            layout: ram_layout(mem_size),
            buf: Vec::new(),
            zero_runs: Vec::new(),
            limit,
            window: (Instant::now(), 0),
            pages: 0,
            zero_pages: 0,
            channels: None,
            channel_bytes: 0,
            interrupt: None,
            round_read_pages: 0,
            migration: 0,
        }
    }

    /// Gives up when a stop signal came before the switchover.
    fn abandon_point(&self) -> Result<(), MigrateError> {
        match (&self.interrupt, signals::requested_name()) {
            (Some(_), Some(sig)) => Err(MigrateError::Stream(format!("abandoned: smudge is stopping on {sig}"))),
            _ => Ok(()),
        }
    }

    /// From here on the migration is let finish: a stop signal no longer
    /// shuts its connection down.
    pub(super) fn past_abandoning(&mut self) {
        self.interrupt = None;
    }

    /// Bytes sent on every connection.
    pub(super) fn bytes(&self) -> u64 {
        self.w.bytes() + self.channel_bytes
    }

    /// Data pages sent per connection, the main one first.
    pub(super) fn connection_pages(&self) -> Vec<u64> {
        let extra = self.channels.as_ref().map_or(Vec::new(), |c| c.pages.clone());
        std::iter::once(self.pages - extra.iter().sum::<u64>()).chain(extra).collect()
    }

    /// Sends `pieces` (guest address, length) of a round: all on this
    /// connection, or dealt out over the extra ones too (each ends its
    /// part with a `RoundEnd` of its own).
    fn send_pieces(
        &mut self,
        ram: &GuestRam,
        pieces: &[(u64, u64)],
        skip_zero: bool,
        round: u32,
        tick: Tick,
    ) -> Result<(), MigrateError> {
        self.round_read_pages = 0;
        let Some(ch) = self.channels.as_ref() else {
            for &(gpa, len) in pieces {
                self.send_range_ticking(ram, gpa, len, skip_zero, tick)?;
            }
            return self.flush_zero();
        };
        let mut groups = super::multifd::split(pieces, ch.len() + 1);
        let mine = groups.remove(0);
        ch.start_round(groups, skip_zero, round)?;
        let sent = mine.iter().try_for_each(|&(gpa, len)| self.send_range_ticking(ram, gpa, len, skip_zero, tick));
        let sent = sent.and_then(|_| self.flush_zero());
        // Wait for the others even when this part failed: their threads
        // must be idle before anything else is asked of them.
        let theirs = self.channels.as_mut().map(|c| c.wait_round()).unwrap_or(Ok((0, 0, 0)));
        sent?;
        let (p, z, b) = theirs?;
        self.pages += p;
        self.zero_pages += z;
        self.channel_bytes += b;
        Ok(())
    }

    /// Ends the extra connections (each sends its totals), before the
    /// machine state goes out.
    pub(super) fn finish_channels(&mut self) -> Result<(), MigrateError> {
        match self.channels.as_mut() {
            Some(c) => c.finish(),
            None => Ok(()),
        }
    }

    /// Holds the stream to the bandwidth cap.
    pub(super) fn pace(&mut self) {
        let wait = self.pace_due();
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// How long the stream must wait to keep to the bandwidth cap (zero
    /// without one).
    pub(super) fn pace_due(&mut self) -> Duration {
        let Some(limit) = self.limit else { return Duration::ZERO };
        let sent = self.w.bytes() - self.window.1;
        let due = Duration::from_secs_f64(sent as f64 / limit as f64);
        let spent = self.window.0.elapsed();
        if spent > Duration::from_secs(1) {
            self.window = (Instant::now(), self.w.bytes());
        }
        due.saturating_sub(spent)
    }

    /// Runs `f` without waiting for the bandwidth cap (the caller waits,
    /// see [`Self::pace_due`]); what it sends still counts against it.
    pub(super) fn unpaced<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let limit = self.limit.take();
        let r = f(self);
        self.limit = limit;
        r
    }

    /// Sends `[gpa, gpa + len)` from RAM: runs of data pages as `Pages`
    /// frames, zero pages as markers (or not at all when `skip_zero`: the
    /// destination's new file already reads zero there).
    pub(super) fn send_range(
        &mut self,
        ram: &GuestRam,
        gpa: u64,
        len: u64,
        skip_zero: bool,
    ) -> Result<(), MigrateError> {
        self.send_range_ticking(ram, gpa, len, skip_zero, &mut |_, _| {})
    }

    /// [`Self::send_range`], calling `tick` after each frame.
    fn send_range_ticking(
        &mut self,
        ram: &GuestRam,
        gpa: u64,
        len: u64,
        skip_zero: bool,
        tick: Tick,
    ) -> Result<(), MigrateError> {
        let chunk = u64::from(MAX_FRAME_PAGES) * PAGE;
        let mut at = gpa;
        while at < gpa + len {
            self.abandon_point()?;
            let n = (gpa + len - at).min(chunk);
            self.buf.resize(n as usize, 0);
            ram.read_slice(&mut self.buf, GuestAddress(at))
                .map_err(|e| MigrateError::Stream(format!("reading guest RAM at {at:#x}: {e}")))?;
            let off = gpa_to_file_offset(&self.layout, at)
                .ok_or_else(|| MigrateError::Stream(format!("{at:#x} is not RAM")))?;
            let buf = std::mem::take(&mut self.buf);
            let r = self.send_pages(&buf, off, skip_zero);
            self.buf = buf;
            r?;
            self.pace();
            at += n;
            self.round_read_pages += n / PAGE;
            tick(self, self.round_read_pages);
        }
        Ok(())
    }

    fn send_pages(&mut self, buf: &[u8], off: u64, skip_zero: bool) -> Result<(), MigrateError> {
        let is_zero = |p: &[u8]| p.chunks_exact(16).all(|c| c == [0u8; 16]);
        let pages: Vec<bool> = buf.chunks_exact(PAGE as usize).map(is_zero).collect();
        let mut i = 0;
        while i < pages.len() {
            let mut j = i;
            while j < pages.len() && pages[j] == pages[i] {
                j += 1;
            }
            let o = off + i as u64 * PAGE;
            if pages[i] {
                if !skip_zero {
                    self.zero_runs.push((o, (j - i) as u32));
                    self.zero_pages += (j - i) as u64;
                }
            } else {
                self.w
                    .send_pages(o, &buf[i * PAGE as usize..j * PAGE as usize])
                    .map_err(stream_err("sending pages"))?;
                self.pages += (j - i) as u64;
            }
            i = j;
        }
        if self.zero_runs.len() >= 4096 {
            self.flush_zero()?;
        }
        Ok(())
    }

    pub(super) fn flush_zero(&mut self) -> Result<(), MigrateError> {
        if !self.zero_runs.is_empty() {
            let runs = std::mem::take(&mut self.zero_runs);
            self.w.send(&Frame::Zero(runs)).map_err(stream_err("sending zero-page markers"))?;
        }
        Ok(())
    }

    fn send_set(&mut self, ram: &GuestRam, set: &DirtySet, round: u32, tick: Tick) -> Result<(), MigrateError> {
        let pieces: Vec<(u64, u64)> = set.extents().iter().map(|e| (e.gpa, e.len)).collect();
        self.send_pieces(ram, &pieces, false, round, tick)
    }

    /// Ends a round and waits until the destination has stored all of it:
    /// nothing of a running round may still sit in socket buffers when the
    /// guest is paused, and the round's time is then the real throughput.
    fn end_round(
        &mut self,
        round: u32,
        pages: u64,
        reader: &mut FrameReader<BufReader<Stream>>,
    ) -> Result<(), MigrateError> {
        self.w.send(&Frame::RoundEnd { round, pages }).map_err(stream_err("sending a round end"))?;
        self.w.flush().map_err(stream_err("sending a round end"))?;
        read_ack(reader, &format!("round {round}")).map(drop)
    }
}

/// A [`Tick`] reporting `round` (of `pages` pages, started at `t0` with
/// `b0` bytes sent) as it is sent.
fn sending<'a>(
    progress: &'a dyn Fn(&Progress),
    round: u32,
    pages: u64,
    t0: Instant,
    b0: u64,
    throttle_pct: u32,
) -> impl FnMut(&Sender, u64) + 'a {
    move |s, read| {
        let bytes = s.bytes();
        progress(&Progress {
            round,
            sending: true,
            remaining_pages: pages.saturating_sub(read),
            rate_mbps: bytes.saturating_sub(b0) as f64 / t0.elapsed().as_secs_f64().max(1e-6) / 1e6,
            bytes_sent: bytes,
            throttle_pct,
        })
    }
}

/// A migration's pre-copy rounds after round 0: each sends what the
/// guest dirtied during the last, with auto-converge or a dirty limit
/// throttling the vCPUs when rounds do not shrink.
struct MigrationRounds<'a> {
    src: &'a MigrationSource,
    progress: &'a dyn Fn(&Progress),
    s: &'a mut Sender,
    reader: &'a mut FrameReader<BufReader<Stream>>,
    converge: Converger,
    rounds: Vec<RoundReport>,
}

impl MigrationRounds<'_> {
    /// The rounds sent, and how convergence was reached: `none`, or what
    /// helped (`auto-converge N%`, a dirty limit, `max-rounds`,
    /// `post-copy`). Ends the throttle.
    fn finish(self, end: End) -> (Vec<RoundReport>, String) {
        let mut how = self.converge.finish();
        match end {
            End::MaxRounds => how.push("max-rounds".into()),
            End::Switch => how.push("post-copy".into()),
            End::Converged => {}
        }
        let converge = if how.is_empty() { "none".into() } else { how.join(", then ") };
        (self.rounds, converge)
    }
}

impl RoundHooks for MigrationRounds<'_> {
    type Error = MigrateError;

    fn check(&mut self) -> Result<(), MigrateError> {
        self.s.abandon_point()
    }

    fn looked(&mut self, look: &Look) {
        let counts = if self.converge.limits_vcpus() { self.src.vcpu_counts() } else { Vec::new() };
        let (sent, secs, vcpus) = (look.last.bytes, look.last.time.as_secs_f64(), self.src.vcpus.threads.len());
        self.converge.after_round(sent, look.pages * PAGE, look.rate, secs, vcpus, &counts);
        let (pct, vcpu_pct) = (self.converge.pct(), self.converge.vcpu_pct());
        (self.progress)(&Progress {
            round: look.round,
            sending: false,
            remaining_pages: look.pages,
            rate_mbps: look.rate / 1e6,
            bytes_sent: self.s.bytes(),
            throttle_pct: pct,
        });
        tracing::info!(
            "migration round {} sent {} pages in {:.1} ms ({:.0} MB/s); {} pages dirty now, estimated final round {:.1} ms{}",
            look.round,
            self.rounds.last().map_or(0, |r| r.pages),
            look.last.time.as_secs_f64() * 1e3,
            look.rate / 1e6,
            look.pages,
            look.estimate.as_secs_f64() * 1e3,
            match (pct, vcpu_pct.iter().max()) {
                (0, Some(&v)) if v > 0 => format!(", dirty limit: vCPU throttles {vcpu_pct:?} %"),
                (0, _) => String::new(),
                (p, _) => format!(", auto-converge {p}%"),
            }
        );
    }

    fn copy(&mut self, round: u32, set: &DirtySet) -> Result<Round, MigrateError> {
        let s = &mut *self.s;
        let (t, b, p, z) = (Instant::now(), s.bytes(), s.pages, s.zero_pages);
        let mut tick = sending(self.progress, round, set.count(), t, b, self.converge.pct());
        s.send_set(&self.src.ram, set, round, &mut tick)?;
        s.end_round(round, s.pages - p, self.reader)?;
        let time = t.elapsed();
        self.rounds.push(RoundReport {
            round,
            pages: s.pages - p,
            zero_pages: s.zero_pages - z,
            bytes: s.bytes() - b,
            ms: time.as_secs_f64() * 1e3,
            throttle_pct: self.converge.pct(),
            vcpu_throttle_pct: self.converge.vcpu_pct().to_vec(),
        });
        Ok(Round { bytes: s.bytes() - b, time })
    }
}

/// Reads the destination's `Ack`; a refusal carries its reason.
pub(super) fn read_ack(r: &mut FrameReader<BufReader<Stream>>, after: &str) -> Result<Ack, MigrateError> {
    match r.next_frame() {
        Ok(Frame::Ack(a)) if a.ok => Ok(a),
        Ok(Frame::Ack(Ack { error, .. })) => Err(MigrateError::Stream(format!(
            "the destination refused after {after}: {}",
            error.unwrap_or_else(|| "no reason given".into())
        ))),
        Ok(other) => Err(MigrateError::Stream(format!("the destination answered {after} with {:?}", other.kind()))),
        Err(e) => Err(MigrateError::Stream(format!("no answer from the destination after {after}: {e}"))),
    }
}

impl MigrationSource {
    /// Migrates the VM to `opts.to`. On success the guest is paused here
    /// and runs on the destination (the caller ends this VM); on failure it
    /// runs on here (resumed unless it was paused before).
    pub fn migrate(
        &self,
        opts: &MigrateOptions,
        progress: &dyn Fn(&Progress),
    ) -> Result<MigrationReport, MigrateError> {
        if opts.resume {
            return self.resume_postcopy(opts);
        }
        if let (Some(to), Some(_)) = (self.recovery.paused_to(), self.paused_postcopy()) {
            return Err(MigrateError::PostcopyPaused(to));
        }
        let t0 = Instant::now();
        let dialer = Dialer::new(&opts.to, opts.tls.clone())?;
        let conn = dialer.dial(Duration::from_secs(30))?;
        let handshake_ms = t0.elapsed().as_secs_f64() * 1e3;
        let rd = conn.try_clone().map_err(stream_err("socket"))?;
        let mut reader = FrameReader::new(BufReader::new(rd));
        let n = opts.connections.max(1);
        let interrupt = conn
            .shut_on_stop(format!("the migration to {} is abandoned (the guest stays here and stops)", opts.to))
            .map_err(stream_err("socket"))?;
        let mut s = Sender::new(conn, opts.lz4, self.mem_size, opts.bandwidth.map(|b| b / u64::from(n)));
        s.interrupt = Some(interrupt);
        match self.precopy(opts, progress, &mut s, &mut reader, &dialer) {
            Ok(mut r) => {
                r.total_ms = t0.elapsed().as_secs_f64() * 1e3;
                r.handshake_ms = handshake_ms;
                Ok(r)
            }
            Err(e) if s.interrupt.is_some() && signals::requested().is_some() => {
                // Stopping before the switchover: the guest stays here. The
                // connection is shut down (or about to be): tell the
                // destination if it still can be told, wait for nothing.
                let e = match e {
                    MigrateError::Stream(m) if m.starts_with("abandoned") => MigrateError::Stream(m),
                    e => MigrateError::Stream(format!(
                        "abandoned: smudge is stopping on {} ({e})",
                        signals::requested_name().unwrap_or_default()
                    )),
                };
                let _ = s.w.send(&Frame::Abort(e.to_string()));
                let _ = s.w.flush();
                Err(e)
            }
            Err(e) => {
                // Tell a destination that still listens; and if the stream
                // broke because the destination gave up, say why it did.
                let _ = s.w.send(&Frame::Abort(e.to_string()));
                let _ = s.w.flush();
                let _ = reader.get_ref().get_ref().set_read_timeout(Some(Duration::from_secs(2)));
                match (&e, reader.next_frame()) {
                    (MigrateError::Stream(m), Ok(Frame::Ack(Ack { ok: false, error: Some(why), .. }))) => {
                        Err(MigrateError::Stream(format!("{m}; the destination said: {why}")))
                    }
                    _ => Err(e),
                }
            }
        }
    }

    fn precopy(
        &self,
        opts: &MigrateOptions,
        progress: &dyn Fn(&Progress),
        s: &mut Sender,
        reader: &mut FrameReader<BufReader<Stream>>,
        dialer: &Dialer,
    ) -> Result<MigrationReport, MigrateError> {
        self.hello(opts, s, reader, dialer)?;
        if opts.local {
            s.past_abandoning();
            // The destination maps the same RAM file: no rounds, only the
            // machine state crosses, with the guest paused.
            return self.switchover(opts, s, reader, None, Vec::new(), "none (same-host handover)".into(), 0.0);
        }
        if opts.postcopy_after == Some(0) {
            // Pure post-copy: every page follows the switchover.
            s.past_abandoning();
            return self.postcopy(opts, s, reader, None, Vec::new(), "post-copy".into(), 0.0);
        }
        // What was dirty before now is in round 0, read after this.
        let sub = Subscription::from_now(&self.harvester)?;
        // Post-copy is how a migration that asks for it converges: the
        // rounds before the switch never slow the guest down.
        let throttle = match opts.auto_converge && opts.postcopy_after.is_none() {
            true => Some(
                Throttle::start(self.vcpus.clone()).map_err(|e| MigrateError::Vcpus(format!("auto-converge: {e}")))?,
            ),
            false => None,
        };
        let first = self.round_zero(progress, s, reader)?;
        let budget = Budget {
            pause: opts.downtime,
            max_rounds: opts.max_rounds,
            shrink: (3, 4),
            worth_a_round: MIN_WORTH_A_ROUND,
            switch_after: opts.postcopy_after,
        };
        let time = Duration::from_secs_f64(first.ms / 1e3);
        let first_round = Round { bytes: first.bytes, time };
        let converge = Converger::new(throttle, &self.vcpu_counts());
        let mut hooks = MigrationRounds { src: self, progress, s, reader, converge, rounds: vec![first] };
        let residue = run_rounds(&sub, &budget, first_round, &mut hooks)?;
        let (rounds, converge) = hooks.finish(residue.end);
        s.abandon_point()?;
        s.past_abandoning();
        let (set, bandwidth) = (Some((residue.set, &sub)), residue.rate);
        if residue.end == End::Switch {
            return self.postcopy(opts, s, reader, set, rounds, converge, bandwidth);
        }
        self.switchover(opts, s, reader, set, rounds, converge, bandwidth)
    }

    /// Sends `Hello` (opening the extra page connections, if any) and
    /// waits for the destination's answer.
    fn hello(
        &self,
        opts: &MigrateOptions,
        s: &mut Sender,
        reader: &mut FrameReader<BufReader<Stream>>,
        dialer: &Dialer,
    ) -> Result<(), MigrateError> {
        let local = match opts.local {
            true => Some(LocalRam::describe(&self.path, &self.file).map_err(|e| MigrateError::Stream(e.to_string()))?),
            false => None,
        };
        let connections = if opts.local { 1 } else { opts.connections.max(1) };
        let session = if connections > 1 { super::multifd::new_session() } else { 0 };
        s.migration = super::multifd::new_session().rotate_left(17) | 1;
        let hello = Hello {
            local,
            postcopy: opts.postcopy_after.is_some(),
            connections,
            session,
            migration: s.migration,
            ..Hello::new(self.mem_size, self.vcpus.threads.len())
        };
        s.w.send(&Frame::Hello(hello)).map_err(stream_err("sending Hello"))?;
        s.w.flush().map_err(stream_err("sending Hello"))?;
        if connections > 1 {
            // Opened before the answer: the destination takes them all
            // before it accepts the migration.
            let limit = opts.bandwidth.map(|b| b / u64::from(connections));
            s.channels = Some(super::multifd::Workers::connect(
                dialer,
                session,
                connections - 1,
                opts.lz4,
                limit,
                &self.ram,
                self.mem_size,
            )?);
        }
        read_ack(reader, "Hello").map(drop)
    }

    /// Round 0: every page with data (`SEEK_DATA`), zero pages skipped.
    fn round_zero(
        &self,
        progress: &dyn Fn(&Progress),
        s: &mut Sender,
        reader: &mut FrameReader<BufReader<Stream>>,
    ) -> Result<RoundReport, MigrateError> {
        let r0 = Instant::now();
        let (b0, p0) = (s.bytes(), s.pages);
        let data = smudge::file_io::data_ranges(&self.file, self.mem_size)
            .map_err(|e| MigrateError::Stream(format!("SEEK_DATA on the memory file: {e}")))?;
        let mut pieces = Vec::new();
        for (off, len) in data {
            for r in &s.layout {
                let (a, b) = (off.max(r.file_offset), (off + len).min(r.file_offset + r.len));
                if a < b {
                    pieces.push((r.gpa + a - r.file_offset, b - a));
                }
            }
        }
        // Progress shows round 0 as it goes: a capped link takes long.
        let pages0 = pieces.iter().map(|p| p.1 / PAGE).sum::<u64>();
        let mut tick = sending(progress, 0, pages0, r0, b0, 0);
        s.send_pieces(&self.ram, &pieces, true, 0, &mut tick)?;
        s.end_round(0, s.pages - p0, reader)?;
        Ok(RoundReport {
            round: 0,
            pages: s.pages - p0,
            zero_pages: 0,
            bytes: s.bytes() - b0,
            ms: r0.elapsed().as_secs_f64() * 1e3,
            throttle_pct: 0,
            vcpu_throttle_pct: Vec::new(),
        })
    }

    /// Runs `f` with the vCPUs paused (a switchover), given when the pause
    /// began and where the downtime goes; if it fails the guest runs on
    /// here (resumed unless it was paused before). Returns what `f` did,
    /// the downtime parts and when the pause began.
    pub(super) fn paused<T>(
        &self,
        f: impl FnOnce(Instant, &mut DowntimeParts) -> Result<T, MigrateError>,
    ) -> Result<(T, DowntimeParts, Instant), MigrateError> {
        let was_paused = self.vcpus.shared.is_paused();
        let tp = Instant::now();
        let mut parts = DowntimeParts::default();
        let r = self.vcpus.pause().map_err(|e| MigrateError::Vcpus(e.to_string())).and_then(|_| {
            parts.pause_ms = ms_since(tp);
            f(tp, &mut parts)
        });
        match r {
            Ok(v) => Ok((v, parts, tp)),
            Err(e) => {
                if !was_paused {
                    self.vcpus.resume();
                }
                Err(e)
            }
        }
    }

    /// The pages still to send at the switchover: `residue` with the last
    /// harvest of its subscription (None: no residue, e.g. pure post-copy).
    pub(super) fn final_set(
        &self,
        residue: Option<(DirtySet, &Subscription)>,
    ) -> Result<Option<DirtySet>, MigrateError> {
        let Some((mut set, sub)) = residue else { return Ok(None) };
        set.union_with(&sub.collect()?).map_err(HarvestError::from)?;
        Ok(Some(set))
    }

    /// The per-vCPU dirty page counters (ring only; else empty).
    fn vcpu_counts(&self) -> Vec<u64> {
        self.harvester.lock().unwrap_or_else(|p| p.into_inner()).vcpu_dirty_pages().to_vec()
    }

    /// The final round, paused: the residue (with the subscription whose last
    /// harvest joins it; `None` for a same-host handover, which sends no
    /// pages), the machine state, the
    /// destination's answer. On failure the guest runs on here.
    #[allow(clippy::too_many_arguments)]
    fn switchover(
        &self,
        opts: &MigrateOptions,
        s: &mut Sender,
        reader: &mut FrameReader<BufReader<Stream>>,
        residue: Option<(DirtySet, &Subscription)>,
        mut rounds: Vec<RoundReport>,
        converge: String,
        bandwidth: f64,
    ) -> Result<MigrationReport, MigrateError> {
        let round = rounds.len() as u32;
        let mut digest_sent = None;
        let ((fin, stop_to_running_ms), parts, tp) = self.paused(|tp, parts| {
            // The vCPU threads read their state while the residue goes out.
            self.vcpus.request_state();
            let (b, p, z) = (s.bytes(), s.pages, s.zero_pages);
            if let Some(set) = self.final_set(residue)? {
                s.send_set(&self.ram, &set, round, &mut |_, _| {})?;
            }
            s.finish_channels()?;
            if opts.verify_memory {
                let crcs = memory_crcs(&s.layout, |o, b| {
                    let gpa = file_offset_to_gpa(&s.layout, o)
                        .ok_or_else(|| std::io::Error::other(format!("file offset {o:#x} is not RAM")))?;
                    self.ram.read_slice(b, GuestAddress(gpa)).map_err(std::io::Error::other)
                })
                .map_err(stream_err("checksumming guest RAM"))?;
                digest_sent = Some(digest(&crcs));
                s.w.send(&Frame::Checksums(crcs)).map_err(stream_err("sending memory checksums"))?;
            }
            s.w.flush().map_err(stream_err("sending the final round"))?;
            parts.residue_ms = ms_since(tp) - parts.pause_ms;
            let state = self.vcpus.collect_state().map_err(|e| MigrateError::Vcpus(e.to_string()))?;
            s.w.send(&Frame::State(Box::new(state))).map_err(stream_err("sending the machine state"))?;
            s.w.send(&Frame::Done { pages: s.pages, zero_pages: s.zero_pages }).map_err(stream_err("sending Done"))?;
            s.w.flush().map_err(stream_err("sending the final round"))?;
            parts.state_ms = ms_since(tp) - parts.pause_ms - parts.residue_ms;
            let fin = RoundReport {
                round,
                pages: s.pages - p,
                zero_pages: s.zero_pages - z,
                bytes: s.bytes() - b,
                ms: tp.elapsed().as_secs_f64() * 1e3,
                throttle_pct: 0,
                vcpu_throttle_pct: Vec::new(),
            };
            let sent = ms_since(tp);
            let ack = read_ack(reader, "the final round")?;
            parts.destination_ms = ms_since(tp) - sent;
            Ok((fin, stop_to_running(tp, &ack)))
        })?;
        let downtime = tp.elapsed();
        rounds.push(fin);
        Ok(MigrationReport {
            memory_crc32: digest_sent,
            downtime_parts: parts,
            stop_to_running_ms,
            ..MigrationReport::switched(opts, s, rounds, converge, bandwidth, downtime)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now_us() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
    }

    #[test]
    fn stop_to_running_is_taken_only_when_it_lies_within_the_pause() {
        let tp = Instant::now();
        // At least 20 ms pass (more on a busy machine: measured below).
        std::thread::sleep(Duration::from_millis(20));
        // Running 10 ms before now: 10 ms less than the pause so far.
        let at = |us: u64| Ack { running_at_unix_us: Some(us), ..Ack::ok() };
        let before = ms_since(tp);
        let ms = stop_to_running(tp, &at(now_us() - 10_000)).expect("within the pause");
        let after = ms_since(tp);
        // (1 ms for the two clocks' reads.)
        assert!(ms >= before - 11.0 && ms <= after - 9.0, "{before} <= {ms} + 10 <= {after}");
        // Before the pause, after the answer, or not said: no figure.
        assert_eq!(stop_to_running(tp, &at(now_us() - 60_000)), None);
        assert_eq!(stop_to_running(tp, &at(now_us() + 60_000)), None);
        assert_eq!(stop_to_running(tp, &Ack::ok()), None);
    }
}
