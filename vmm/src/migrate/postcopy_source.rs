//! The source's post-copy switchover and phase: pause, tell the
//! destination which pages it is still owed (`Postcopy`), send the machine
//! state, and once the destination's guest runs, send every owed page
//! exactly once — the ones its vCPUs fault on first (`PageRequest`), the
//! rest in file order in the background — then `Done`.
//!
//! After the switchover the guest's newest state is on the destination,
//! so the source never resumes it by itself: if the stream breaks, the
//! guest here stays paused at the switchover point (`postcopy-paused`,
//! [`Recovery`]) while the destination, missing pages that exist only
//! here, waits for it to come back. `ctl migrate --resume` reconnects
//! (QEMU's postcopy-recover): a `Resume` frame names the migration's id,
//! the destination answers with what it still owes and the pages its
//! vCPUs wait for, and each of those pages goes exactly once — then `Done`
//! as after any post-copy phase. Another break pauses it again. `ctl
//! resume` here would continue from the switchover point, losing what ran
//! on the destination; once it did, the migration can no longer resume.

use std::io::BufReader;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use smudge::dirty_set::DirtySet;
use smudge::harvest::Subscription;
use smudge::memory::file_offset_to_gpa;
use smudge::migration::frame::{Ack, Frame, FrameReader, PAGE};
use smudge::migration::postcopy::Owed;

use super::source::{
    ms_since, read_ack, stop_to_running, stream_err, MigrateError, MigrateOptions, MigrationReport, MigrationSource,
    RoundReport, Sender,
};
use super::transport::{Dialer, Stream};

/// Most pages in one background send (small, so a page asked for by a
/// faulting vCPU waits behind little).
const BACKGROUND_PAGES: u64 = 32;
/// How long the destination may take to confirm the end.
const END_ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// What the post-copy phase sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PostcopyReport {
    /// Pages owed at the switchover.
    pub owed_pages: u64,
    /// Data pages sent because a vCPU on the destination faulted on them.
    pub pages_on_demand: u64,
    /// Data pages sent in the background.
    pub pages_streamed: u64,
    /// Owed pages that were zero (sent as markers).
    pub zero_pages: u64,
    /// Page requests received.
    pub requests: u64,
    /// Switchover to the destination's last acknowledgement.
    pub ms: f64,
    /// The phase step by step (ms from the destination's "it runs"):
    /// the first page request in, …
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_request_ms: Option<f64>,
    /// … every owed page on the wire (`Done` sent), …
    pub sent_ms: f64,
    /// … and the destination's acknowledgement that all are placed.
    pub acked_ms: f64,
    /// The phase was resumed this many times after its link broke; the
    /// figures above are the last resume's (`owed_pages`: what the
    /// destination still owed when it resumed).
    #[serde(skip_serializing_if = "is_zero")]
    pub resumes: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A post-copy migration whose link broke after the switchover: the guest
/// stays paused here until it is resumed (`ctl migrate --resume`).
#[derive(Debug, Clone)]
struct Paused {
    /// How it was asked for; `to` where it went last.
    opts: MigrateOptions,
    /// Its id, from its `Hello`.
    migration: u64,
    /// The report up to the switchover.
    report: MigrationReport,
    /// Times its link broke.
    breaks: u32,
    /// Why it broke last.
    why: String,
}

/// The post-copy migration of this VM that waits to be resumed, if any.
#[derive(Debug, Clone, Default)]
pub struct Recovery(Arc<Mutex<Option<Paused>>>);

impl Recovery {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Paused>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a paused migration went, if one is paused.
    pub fn paused_to(&self) -> Option<String> {
        self.slot().as_ref().map(|p| p.opts.to.clone())
    }

    /// A paused migration, for the control API's `stats` (`migration`).
    fn status(&self) -> Option<serde_json::Value> {
        self.slot().as_ref().map(|p| {
            serde_json::json!({
                "state": "postcopy-paused",
                "to": p.opts.to,
                "breaks": p.breaks,
                "error": p.why,
            })
        })
    }
}

/// What the destination says during the phase.
enum Upstream {
    Request(Vec<(u64, u32)>),
    Ack(Ack),
    Failed(String),
}

/// Runs of (file offset, pages) covering `set` (a residue) or, with none,
/// every data range of the memory file, split where RAM regions end.
fn owed_runs(src: &MigrationSource, s: &Sender, set: Option<&DirtySet>) -> Result<Vec<(u64, u32)>, MigrateError> {
    let ranges: Vec<(u64, u64)> = match set {
        Some(set) => crate::persist::precopy::file_extents(set, src.mem_size),
        None => smudge::file_io::data_ranges(&src.file, src.mem_size)
            .map_err(|e| MigrateError::Stream(format!("SEEK_DATA on the memory file: {e}")))?,
    };
    let mut runs = Vec::new();
    for (off, len) in ranges {
        for r in &s.layout {
            let (a, b) = (off.max(r.file_offset), (off + len).min(r.file_offset + r.len));
            let (a, b) = (a & !(PAGE - 1), b.div_ceil(PAGE) * PAGE);
            let mut at = a;
            while at < b {
                let n = ((b - at) / PAGE).min(u64::from(u32::MAX));
                runs.push((at, n as u32));
                at += n * PAGE;
            }
        }
    }
    Ok(runs)
}

impl MigrationSource {
    /// The post-copy migration paused here, for the control API's `stats`
    /// (`migration`); once the guest was resumed here (`ctl resume`) it
    /// can no longer be resumed, and is forgotten.
    pub fn paused_postcopy(&self) -> Option<serde_json::Value> {
        if !self.vcpus.shared.is_paused() {
            *self.recovery.slot() = None;
        }
        self.recovery.status()
    }

    /// Post-copy switchover and phase (see the module doc). `residue`: the
    /// pages dirty since the last pre-copy round and the subscription whose
    /// last harvest joins them; `None` for pure post-copy (all data owed).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn postcopy(
        &self,
        opts: &MigrateOptions,
        s: &mut Sender,
        reader: &mut FrameReader<BufReader<Stream>>,
        residue: Option<(DirtySet, &Subscription)>,
        rounds: Vec<RoundReport>,
        converge: String,
        bandwidth: f64,
    ) -> Result<MigrationReport, MigrateError> {
        // If the switchover fails the destination's guest never ran: the
        // guest goes on here.
        let ((runs, stop_to_running_ms), parts, tp) = self.paused(|tp, parts| {
            self.vcpus.request_state();
            let set = self.final_set(residue)?;
            let runs = owed_runs(self, s, set.as_ref())?;
            s.finish_channels()?;
            s.w.send(&Frame::Postcopy(runs.clone())).map_err(stream_err("sending the owed pages"))?;
            parts.residue_ms = ms_since(tp) - parts.pause_ms;
            let state = self.vcpus.collect_state().map_err(|e| MigrateError::Vcpus(e.to_string()))?;
            s.w.send(&Frame::State(Box::new(state))).map_err(stream_err("sending the machine state"))?;
            s.w.flush().map_err(stream_err("sending the machine state"))?;
            parts.state_ms = ms_since(tp) - parts.pause_ms - parts.residue_ms;
            let sent = ms_since(tp);
            let ack = read_ack(reader, "the post-copy switchover")?;
            parts.destination_ms = ms_since(tp) - sent;
            Ok((runs, stop_to_running(tp, &ack)))
        })?;
        let downtime = tp.elapsed();
        tracing::info!("post-copy switchover in {:.2} ms; the guest runs on {}", downtime.as_secs_f64() * 1e3, opts.to);

        // From here on the guest must not run here again by itself.
        let b0 = s.bytes();
        let report = MigrationReport {
            downtime_parts: parts,
            stop_to_running_ms,
            ..MigrationReport::switched(opts, s, rounds, converge, bandwidth, downtime)
        };
        let (opts, migration) = (opts.clone(), s.migration);
        let paused = Paused { opts, migration, report, breaks: 0, why: String::new() };
        self.run_phase(paused, s, reader, &runs, b0, tp)
    }

    /// Runs the phase on `s` and `reader` for the owed `runs`, and fills in
    /// the report; if the link breaks the migration is kept `paused`.
    fn run_phase(
        &self,
        mut paused: Paused,
        s: &mut Sender,
        reader: &mut FrameReader<BufReader<Stream>>,
        runs: &[(u64, u32)],
        b0: u64,
        t0: Instant,
    ) -> Result<MigrationReport, MigrateError> {
        let mut pc = match self.phase(s, reader, runs) {
            Ok(pc) => pc,
            Err(e) => {
                let why = e.to_string();
                paused.breaks += 1;
                paused.why = why.clone();
                *self.recovery.slot() = Some(paused);
                return Err(MigrateError::Postcopy(why));
            }
        };
        pc.ms = ms_since(t0);
        pc.resumes = paused.breaks;
        tracing::info!(
            "post-copy done: {} pages owed, {} on demand, {} streamed, {} zero, in {:.0} ms (all sent {:.0} ms, \
             placed {:.0} ms after the guest ran here)",
            pc.owed_pages,
            pc.pages_on_demand,
            pc.pages_streamed,
            pc.zero_pages,
            pc.ms,
            pc.sent_ms,
            pc.acked_ms
        );
        let mut r = paused.report;
        r.rounds.push(RoundReport {
            round: r.rounds.len() as u32,
            pages: pc.pages_on_demand + pc.pages_streamed,
            zero_pages: pc.zero_pages,
            bytes: s.bytes() - b0,
            ms: pc.ms,
            throttle_pct: 0,
            vcpu_throttle_pct: Vec::new(),
        });
        r.bytes_sent += s.bytes() - b0;
        r.pages_sent += pc.pages_on_demand + pc.pages_streamed;
        r.zero_pages_sent += pc.zero_pages;
        r.to = paused.opts.to;
        r.postcopy = Some(pc);
        Ok(r)
    }

    /// The phase proper: page requests read on a thread of their own while
    /// the owed pages go out.
    fn phase(
        &self,
        s: &mut Sender,
        reader: &mut FrameReader<BufReader<Stream>>,
        runs: &[(u64, u32)],
    ) -> Result<PostcopyReport, MigrateError> {
        // The destination may stay quiet for long (its guest faults on
        // nothing): no read timeout; a dead peer still ends the read.
        let sock = reader.get_ref().get_ref().try_clone().map_err(|e| MigrateError::Postcopy(e.to_string()))?;
        sock.set_read_timeout(None).map_err(|e| MigrateError::Postcopy(e.to_string()))?;
        let report = std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel();
            scope.spawn(move || loop {
                let up = match reader.next_frame() {
                    Ok(Frame::PageRequest(r)) => Upstream::Request(r),
                    Ok(Frame::Ack(a)) => Upstream::Ack(a),
                    Ok(other) => Upstream::Failed(format!("the destination sent {:?} during post-copy", other.kind())),
                    Err(e) => Upstream::Failed(format!("the destination's stream: {e}")),
                };
                let last = !matches!(up, Upstream::Request(_));
                if tx.send(up).is_err() || last {
                    break;
                }
            });
            let r = self.stream_owed(s, runs, &rx, Instant::now());
            if r.is_err() {
                // Unblock the reader so the scope can end.
                let _ = sock.shutdown(std::net::Shutdown::Both);
            }
            r
        });
        report.map_err(|e| match e {
            MigrateError::Postcopy(m) => MigrateError::Postcopy(m),
            other => MigrateError::Postcopy(other.to_string()),
        })
    }

    /// Resumes the paused post-copy migration (`opts.resume`): to `opts.to`
    /// (empty: where it went last), with `opts.tls` (none: its own).
    pub(super) fn resume_postcopy(&self, opts: &MigrateOptions) -> Result<MigrationReport, MigrateError> {
        let Some(mut paused) = self.recovery.slot().take() else { return Err(MigrateError::NothingPaused) };
        if !self.vcpus.shared.is_paused() {
            return Err(MigrateError::Stream(format!(
                "the guest was resumed here after the post-copy to {} broke: it ran on from the switchover point, \
                 and the migration can no longer be resumed",
                paused.opts.to
            )));
        }
        if !opts.to.is_empty() {
            paused.opts.to = opts.to.clone();
        }
        if opts.tls.is_some() {
            paused.opts.tls = opts.tls.clone();
        }
        let t0 = Instant::now();
        let connected = self.reconnect(&paused);
        let (mut s, mut reader, runs) = match connected {
            Ok(c) => c,
            Err(e) => {
                paused.why = e.to_string();
                *self.recovery.slot() = Some(paused);
                return Err(e);
            }
        };
        let owed: u64 = runs.iter().map(|&(_, n)| u64::from(n)).sum();
        tracing::info!("post-copy to {} resumed: {owed} pages still owed", paused.opts.to);
        let mut r = self.run_phase(paused, &mut s, &mut reader, &runs, 0, t0)?;
        // From the resume on: the time to the first switchover is in the
        // answer that paused it.
        r.total_ms = ms_since(t0);
        Ok(r)
    }

    /// A new connection to the destination of `p`, the migration named,
    /// and what the destination says it still owes.
    #[allow(clippy::type_complexity)]
    fn reconnect(&self, p: &Paused) -> Result<(Sender, FrameReader<BufReader<Stream>>, Vec<(u64, u32)>), MigrateError> {
        let dialer = Dialer::new(&p.opts.to, p.opts.tls.clone())?;
        let conn = dialer.dial(Duration::from_secs(30))?;
        let rd = conn.try_clone().map_err(stream_err("socket"))?;
        let mut reader = FrameReader::new(BufReader::new(rd));
        let mut s = Sender::new(conn, p.opts.lz4, self.mem_size, p.opts.bandwidth);
        s.migration = p.migration;
        s.past_abandoning();
        s.w.send(&Frame::Resume { migration: p.migration }).map_err(stream_err("sending Resume"))?;
        s.w.flush().map_err(stream_err("sending Resume"))?;
        let mut runs = Vec::new();
        loop {
            match reader.next_frame() {
                Ok(Frame::Postcopy(r)) => runs.extend(r),
                Ok(Frame::Ack(Ack { ok: true, .. })) => return Ok((s, reader, runs)),
                Ok(Frame::Ack(Ack { error, .. })) => {
                    return Err(MigrateError::Stream(format!(
                        "the destination refused the resume: {}",
                        error.unwrap_or_else(|| "no reason given".into())
                    )))
                }
                Ok(other) => {
                    return Err(MigrateError::Stream(format!(
                        "the destination answered the resume with {:?}",
                        other.kind()
                    )))
                }
                Err(e) => return Err(MigrateError::Stream(format!("no answer from the destination to Resume: {e}"))),
            }
        }
    }

    /// Sends each owed page once: asked-for pages first, the rest in order.
    fn stream_owed(
        &self,
        s: &mut Sender,
        runs: &[(u64, u32)],
        rx: &mpsc::Receiver<Upstream>,
        running: Instant,
    ) -> Result<PostcopyReport, MigrateError> {
        let broke = MigrateError::Postcopy;
        let mut unsent = Owed::new(self.mem_size);
        unsent.add(runs).map_err(|e| broke(e.to_string()))?;
        let mut report = PostcopyReport { owed_pages: unsent.remaining(), ..Default::default() };
        let (p0, z0) = (s.pages, s.zero_pages);
        // Sent without waiting for the bandwidth cap: the wait comes after
        // each background piece, and a page request ends it early.
        let send = |s: &mut Sender, unsent: &mut Owed, off: u64, n: u64| -> Result<(), MigrateError> {
            unsent.deliver(off, n).map_err(|e| broke(e.to_string()))?;
            let gpa = file_offset_to_gpa(&s.layout, off).ok_or_else(|| broke(format!("{off:#x} is not RAM")))?;
            s.unpaced(|s| s.send_range(&self.ram, gpa, n * PAGE, false))
        };
        let (mut run, mut at) = (0usize, 0u64);
        // What came in while the stream waited for the cap.
        let mut early = None;
        loop {
            // Pages a vCPU waits for go first.
            loop {
                let up = match early.take() {
                    Some(up) => Ok(up),
                    None if unsent.remaining() == 0 => break,
                    None => rx.try_recv(),
                };
                match up {
                    Ok(Upstream::Request(req)) => {
                        report.requests += 1;
                        report.first_request_ms.get_or_insert_with(|| ms_since(running));
                        let before = s.pages;
                        for (off, count) in req {
                            for p in 0..u64::from(count) {
                                let o = off + p * PAGE;
                                if unsent.owes(o) {
                                    send(s, &mut unsent, o, 1)?;
                                }
                            }
                        }
                        report.pages_on_demand += s.pages - before;
                        s.flush_zero()?;
                        s.w.flush().map_err(|e| broke(format!("sending asked-for pages: {e}")))?;
                    }
                    Ok(Upstream::Ack(a)) => {
                        return Err(broke(format!("the destination answered before the end: {:?}", a.error)))
                    }
                    Ok(Upstream::Failed(e)) => return Err(broke(e)),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return Err(broke("the stream reader ended".into())),
                }
            }
            if unsent.remaining() == 0 {
                break;
            }
            // Then the next few owed pages in order.
            while run < runs.len() && at >= u64::from(runs[run].1) {
                (run, at) = (run + 1, 0);
            }
            let Some(&(off, count)) = runs.get(run) else { break };
            let o = off + at * PAGE;
            let mut n = 0;
            while at + n < u64::from(count) && n < BACKGROUND_PAGES && unsent.owes(o + n * PAGE) {
                n += 1;
            }
            if n == 0 {
                at += 1;
                continue;
            }
            let before = s.pages;
            send(s, &mut unsent, o, n)?;
            report.pages_streamed += s.pages - before;
            at += n;
            // The cap's wait, cut short by a page request.
            let wait = s.pace_due();
            if !wait.is_zero() {
                s.w.flush().map_err(|e| broke(format!("sending owed pages: {e}")))?;
                match rx.recv_timeout(wait) {
                    Ok(up) => early = Some(up),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Err(broke("the stream reader ended".into())),
                }
            }
        }
        s.flush_zero()?;
        report.zero_pages = s.zero_pages - z0;
        debug_assert_eq!(report.pages_on_demand + report.pages_streamed, s.pages - p0);
        s.w.send(&Frame::Done { pages: s.pages - p0, zero_pages: s.zero_pages - z0 })
            .and_then(|_| s.w.flush())
            .map_err(|e| broke(format!("sending Done: {e}")))?;
        report.sent_ms = ms_since(running);
        let t0 = Instant::now();
        loop {
            match rx.recv_timeout(END_ACK_TIMEOUT.saturating_sub(t0.elapsed())) {
                // Asked for before it arrived there: already on its way.
                Ok(Upstream::Request(_)) => report.requests += 1,
                Ok(Upstream::Ack(Ack { ok: true, .. })) => {
                    report.acked_ms = ms_since(running);
                    return Ok(report);
                }
                Ok(Upstream::Ack(Ack { error, .. })) => {
                    return Err(broke(format!("the destination refused the end: {}", error.unwrap_or_default())))
                }
                Ok(Upstream::Failed(e)) => return Err(broke(e)),
                Err(_) => return Err(broke("no answer from the destination after Done".into())),
            }
        }
    }
}
