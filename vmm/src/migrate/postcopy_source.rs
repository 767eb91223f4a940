//! The source's post-copy switchover and phase: pause, tell the
//! destination which pages it is still owed (`Postcopy`), send the machine
//! state, and once the destination's guest runs, send every owed page
//! exactly once — the ones its vCPUs fault on first (`PageRequest`), the
//! rest in file order in the background — then `Done`.
//!
//! After the switchover the guest's newest state is on the destination,
//! so the source never resumes it by itself: if the stream breaks, the
//! guest here stays paused at the switchover point, and the destination,
//! missing pages that exist only here, stops (QEMU's post-copy has the
//! same hazard). `ctl resume` here would continue from the switchover
//! point, losing what ran on the destination.

use std::io::BufReader;
use std::sync::mpsc;
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
use super::transport::Stream;

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
        mut rounds: Vec<RoundReport>,
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

        // From here on the guest must not run here again by itself. The
        // destination may stay quiet for long (its guest faults on
        // nothing): no read timeout; a dead peer still ends the read.
        let sock = reader.get_ref().get_ref().try_clone().map_err(|e| MigrateError::Postcopy(e.to_string()))?;
        sock.set_read_timeout(None).map_err(|e| MigrateError::Postcopy(e.to_string()))?;
        let b0 = s.bytes();
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
            let r = self.stream_owed(s, &runs, &rx, Instant::now());
            if r.is_err() {
                // Unblock the reader so the scope can end.
                let _ = sock.shutdown(std::net::Shutdown::Read);
            }
            r
        });
        let mut pc = report.map_err(|e| match e {
            MigrateError::Postcopy(m) => MigrateError::Postcopy(m),
            other => MigrateError::Postcopy(other.to_string()),
        })?;
        pc.ms = ms_since(tp);
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
        rounds.push(RoundReport {
            round: rounds.len() as u32,
            pages: pc.pages_on_demand + pc.pages_streamed,
            zero_pages: pc.zero_pages,
            bytes: s.bytes() - b0,
            ms: pc.ms,
            throttle_pct: 0,
            vcpu_throttle_pct: Vec::new(),
        });
        Ok(MigrationReport {
            downtime_parts: parts,
            stop_to_running_ms,
            postcopy: Some(pc),
            ..MigrationReport::switched(opts, s, rounds, converge, bandwidth, downtime)
        })
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
