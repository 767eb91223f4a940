//! The destination's side of a migration: checks each frame against the VM
//! announced in `Hello` (order, bounds, totals) and only then writes its
//! pages into the new memory file.
//!
//! ```text
//! Hello -> (Pages | Zero | RoundEnd)* -> State -> Done
//! Hello(postcopy) -> (Pages | Zero | RoundEnd)* -> Postcopy* -> State -> (see postcopy)
//! ```

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::checksum::{digest, memory_crcs, CHUNK};
use super::frame::{Frame, FrameError, Hello, PAGE};
use super::postcopy::Owed;
use crate::machine_state::MachineState;
use crate::memory::{check_ram_size, ram_layout};

/// Most vCPUs a stream may announce.
pub const MAX_VCPUS: usize = 64;
/// Most page connections a migration may use.
pub const MAX_CONNECTIONS: u32 = 64;

/// Why an incoming migration failed (guest memory holds only checked pages).
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// A frame failed its checks.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A good frame at the wrong point of the stream.
    #[error("migration protocol: {0}")]
    Protocol(String),
    /// Pages outside guest RAM.
    #[error("pages at [{offset:#x}, +{len:#x}) lie outside the {mem_size:#x} bytes of guest RAM")]
    OutOfBounds {
        /// Backing-file offset.
        offset: u64,
        /// Length.
        len: u64,
        /// RAM size.
        mem_size: u64,
    },
    /// Writing the memory file failed.
    #[error("{path}: writing {len} bytes at offset {offset:#x}: {source}")]
    Write {
        /// File.
        path: PathBuf,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The source gave up.
    #[error("the source aborted the migration: {0}")]
    Aborted(String),
    /// The memory built here differs from the source's at switchover.
    #[error("memory differs from the source's at switchover: MiB {chunk} (file offset {offset:#x}) has CRC-32 {got:#010x}, the source's {want:#010x}")]
    Mismatch {
        /// Chunk index.
        chunk: usize,
        /// Its file offset.
        offset: u64,
        /// Here.
        got: u32,
        /// Source.
        want: u32,
    },
    /// `Done` totals differ from what arrived.
    #[error("the source says it sent {sent} data and {sent_zero} zero pages; {got} and {got_zero} arrived")]
    Totals {
        /// Data pages the source counted.
        sent: u64,
        /// Zero pages the source counted.
        sent_zero: u64,
        /// Data pages received.
        got: u64,
        /// Zero pages received.
        got_zero: u64,
    },
}

impl ReceiveError {
    /// Whether a read ran into the connection's read timeout: the peer is
    /// connected but sent nothing for that long (it stalled), which is
    /// neither a closed nor a damaged stream.
    pub fn is_stall(&self) -> bool {
        matches!(self, ReceiveError::Frame(FrameError::Io(e))
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// Checks the (data, zero) page totals a `Done` announces against what
/// arrived.
pub(crate) fn check_totals(sent: (u64, u64), got: (u64, u64)) -> Result<(), ReceiveError> {
    if sent == got {
        return Ok(());
    }
    Err(ReceiveError::Totals { sent: sent.0, sent_zero: sent.1, got: got.0, got_zero: got.1 })
}

/// Checks that the first frame is a `Hello` describing a VM this smudge
/// can run.
pub fn check_hello(f: Frame) -> Result<Hello, ReceiveError> {
    let h = match f {
        Frame::Hello(h) => h,
        Frame::Abort(r) => return Err(ReceiveError::Aborted(r)),
        other => return Err(ReceiveError::Protocol(format!("expected Hello first, got {:?}", other.kind()))),
    };
    let bad = |what: String| Err(ReceiveError::Protocol(format!("Hello: {what}")));
    if let Err(e) = check_ram_size(h.mem_size) {
        return bad(e.to_string());
    }
    if h.connections == 0 || h.connections > MAX_CONNECTIONS {
        return bad(format!("{} connections (1..={MAX_CONNECTIONS})", h.connections));
    }
    if h.vcpus == 0 || h.vcpus > MAX_VCPUS {
        return bad(format!("{} vCPUs (1..={MAX_VCPUS})", h.vcpus));
    }
    if h.layout != ram_layout(h.mem_size) {
        return bad(format!("RAM layout {:?} differs from this smudge's for {:#x} bytes", h.layout, h.mem_size));
    }
    Ok(h)
}

/// What to do after a frame.
#[derive(Debug)]
pub enum Step {
    /// Read on.
    Continue,
    /// A pre-copy round ended.
    Round {
        /// Its number.
        round: u32,
        /// Pages the source sent in it.
        pages: u64,
    },
    /// The stream is complete: the machine state to resume with.
    Done(Box<MachineState>),
    /// Post-copy switchover: start the guest with this state; the pages
    /// owed follow (see [`super::postcopy`]).
    Postcopy(Box<MachineState>, Owed),
    /// An extra page connection's end: its totals matched.
    ChannelDone {
        /// Data pages it carried.
        pages: u64,
        /// Zero pages it carried.
        zero_pages: u64,
    },
}

/// Applies a checked stream to a memory file.
#[derive(Debug)]
pub struct Receiver {
    file: File,
    path: PathBuf,
    hello: Hello,
    pages: u64,
    zero_pages: u64,
    state: Option<Box<MachineState>>,
    checksums: Option<Vec<u32>>,
    verified: Option<u32>,
    zeros: Vec<u8>,
    /// Post-copy: the pages announced as still owed.
    owed: Option<Owed>,
    /// An extra page connection: pages, zero runs and round ends only.
    channel: bool,
    /// Round ends seen.
    rounds: u64,
}

impl Receiver {
    /// A receiver writing the VM of `hello` into `file` (at `path`, for
    /// messages), which must already be `hello.mem_size` bytes.
    pub fn new(file: File, path: &Path, hello: Hello) -> Self {
        Receiver {
            file,
            path: path.to_path_buf(),
            hello,
            pages: 0,
            zero_pages: 0,
            state: None,
            checksums: None,
            verified: None,
            zeros: Vec::new(),
            owed: None,
            channel: false,
            rounds: 0,
        }
    }

    /// A receiver for an extra page connection of the VM of `hello`:
    /// `Pages`, `Zero` and `RoundEnd` frames, then `Done` with this
    /// connection's own totals.
    pub fn channel(file: File, path: &Path, hello: Hello) -> Self {
        Receiver { channel: true, ..Receiver::new(file, path, hello) }
    }

    /// Counts pages that arrived on the extra connections into this (the
    /// main) receiver's totals, which `Done` is checked against.
    pub fn add_received(&mut self, pages: u64, zero_pages: u64) {
        self.pages += pages;
        self.zero_pages += zero_pages;
    }

    /// Data pages written so far.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The digest of the memory checksums the source sent and this side
    /// matched (None: the source asked for no check).
    pub fn verified_digest(&self) -> Option<u32> {
        self.verified
    }

    fn check_memory(&mut self, want: &[u32]) -> Result<(), ReceiveError> {
        let layout = ram_layout(self.hello.mem_size);
        let got = memory_crcs(&layout, |o, b| self.file.read_exact_at(b, o)).map_err(|source| ReceiveError::Write {
            path: self.path.clone(),
            offset: 0,
            len: self.hello.mem_size,
            source,
        })?;
        if got.len() != want.len() {
            return Err(ReceiveError::Protocol(format!(
                "{} memory checksums for {} MiB of RAM",
                want.len(),
                got.len()
            )));
        }
        if let Some(chunk) = (0..got.len()).find(|&i| got[i] != want[i]) {
            return Err(ReceiveError::Mismatch {
                chunk,
                offset: chunk as u64 * CHUNK,
                got: got[chunk],
                want: want[chunk],
            });
        }
        self.verified = Some(digest(&got));
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ReceiveError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.hello.mem_size => Ok(()),
            _ => Err(ReceiveError::OutOfBounds { offset, len, mem_size: self.hello.mem_size }),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ReceiveError> {
        self.file.write_all_at(data, offset).map_err(|source| ReceiveError::Write {
            path: self.path.clone(),
            offset,
            len: data.len() as u64,
            source,
        })
    }

    /// Punches `[offset, offset + len)` out of the file (a hole).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on a file we own, within its size (checked by
        // the callers: bounds for `zero`, `Owed::add` for `discard`).
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Drops `[offset, offset + len)` from the file (a hole), so a mapping
    /// of it faults there again; unlike [`Self::zero`] there is no
    /// fallback — written zeros would be taken for the page itself.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), ReceiveError> {
        self.punch_hole(offset, len).map_err(|source| ReceiveError::Write {
            path: self.path.clone(),
            offset,
            len,
            source,
        })
    }

    /// Makes `[offset, offset + len)` read as zeros: a hole punched in the
    /// file, or zeros written where the filesystem cannot punch.
    fn zero(&mut self, offset: u64, len: u64) -> Result<(), ReceiveError> {
        if self.punch_hole(offset, len).is_ok() {
            return Ok(());
        }
        self.zeros.resize(PAGE as usize * 256, 0);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(self.zeros.len() as u64);
            self.write(offset + done, &self.zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Checks `f` against the stream so far and applies it.
    pub fn apply(&mut self, f: Frame) -> Result<Step, ReceiveError> {
        if self.channel {
            match f {
                Frame::Pages { .. } | Frame::Zero(_) | Frame::RoundEnd { .. } | Frame::Abort(_) => {}
                Frame::Done { pages, zero_pages } => {
                    check_totals((pages, zero_pages), (self.pages, self.zero_pages))?;
                    return Ok(Step::ChannelDone { pages, zero_pages });
                }
                other => {
                    return Err(ReceiveError::Protocol(format!("{:?} frame on an extra page connection", other.kind())))
                }
            }
        }
        if self.state.is_some() && !matches!(f, Frame::Done { .. } | Frame::Abort(_) | Frame::Checksums(_)) {
            return Err(ReceiveError::Protocol(format!("{:?} after the machine state", f.kind())));
        }
        if self.hello.local.is_some() && matches!(f, Frame::Pages { .. } | Frame::Zero(_)) {
            return Err(ReceiveError::Protocol(format!(
                "{:?} in a same-host handover (the RAM file is shared; no page data may follow)",
                f.kind()
            )));
        }
        match f {
            Frame::Pages { offset, data } => {
                self.check_range(offset, data.len() as u64)?;
                self.write(offset, &data)?;
                self.pages += data.len() as u64 / PAGE;
                Ok(Step::Continue)
            }
            Frame::Zero(ranges) => {
                for &(offset, count) in &ranges {
                    self.check_range(offset, u64::from(count) * PAGE)?;
                }
                for (offset, count) in ranges {
                    self.zero(offset, u64::from(count) * PAGE)?;
                    self.zero_pages += u64::from(count);
                }
                Ok(Step::Continue)
            }
            Frame::RoundEnd { round, pages } => {
                self.rounds += 1;
                Ok(Step::Round { round, pages })
            }
            Frame::State(s) => {
                if s.vcpus.len() != self.hello.vcpus {
                    return Err(ReceiveError::Protocol(format!(
                        "state holds {} vCPUs, Hello announced {}",
                        s.vcpus.len(),
                        self.hello.vcpus
                    )));
                }
                if self.hello.postcopy {
                    if self.checksums.is_some() {
                        return Err(ReceiveError::Protocol("memory checksums in a post-copy migration".into()));
                    }
                    let owed = self.owed.take().unwrap_or_else(|| Owed::new(self.hello.mem_size));
                    return Ok(Step::Postcopy(s, owed));
                }
                self.state = Some(s);
                Ok(Step::Continue)
            }
            Frame::Checksums(c) => {
                self.checksums = Some(c);
                Ok(Step::Continue)
            }
            Frame::Done { pages, zero_pages } => {
                let Some(state) = self.state.take() else {
                    return Err(ReceiveError::Protocol("Done before the machine state".into()));
                };
                if let Some(want) = self.checksums.take() {
                    self.check_memory(&want)?;
                }
                check_totals((pages, zero_pages), (self.pages, self.zero_pages))?;
                Ok(Step::Done(state))
            }
            Frame::Postcopy(runs) if self.hello.postcopy => {
                let owed = self.owed.get_or_insert_with(|| Owed::new(self.hello.mem_size));
                owed.add(&runs)?;
                // Nothing was received yet (post-copy from the start): the
                // new file is a hole everywhere, nothing to drop (in the
                // pause).
                if self.rounds == 0 && self.pages == 0 && self.zero_pages == 0 {
                    return Ok(Step::Continue);
                }
                // What the file holds there is stale: make it missing, so
                // the guest's first touch waits for the source's copy.
                for (offset, count) in runs {
                    self.discard(offset, u64::from(count) * PAGE)?;
                }
                Ok(Step::Continue)
            }
            Frame::Abort(r) => Err(ReceiveError::Aborted(r)),
            other => Err(ReceiveError::Protocol(format!("unexpected {:?} frame mid-stream", other.kind()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello::new(1 << 20, 1)
    }

    fn receiver(dir: &Path) -> (Receiver, PathBuf) {
        let p = dir.join("mem");
        let f = File::options().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        (Receiver::new(f, &p, hello()), p)
    }

    #[test]
    fn hello_is_checked() {
        assert_eq!(check_hello(Frame::Hello(hello())).unwrap(), hello());
        let mut h = hello();
        h.layout[0].len += PAGE;
        assert!(check_hello(Frame::Hello(h)).unwrap_err().to_string().contains("layout"));
        let mut h = hello();
        h.vcpus = 0;
        assert!(check_hello(Frame::Hello(h)).is_err());
        assert!(check_hello(Frame::Done { pages: 0, zero_pages: 0 }).unwrap_err().to_string().contains("Hello"));
    }

    #[test]
    fn pages_land_and_totals_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, p) = receiver(dir.path());
        r.apply(Frame::Pages { offset: 0x2000, data: vec![5; 8192] }).unwrap();
        r.apply(Frame::Zero(vec![(0x3000, 1)])).unwrap();
        r.apply(Frame::State(Box::new(MachineState { vcpus: vec![], devices: Default::default() }))).unwrap_err();
        let bytes = std::fs::read(&p).unwrap();
        assert!(bytes[0x2000..0x3000].iter().all(|&b| b == 5));
        assert!(bytes[0x3000..0x4000].iter().all(|&b| b == 0));
        let e = r.apply(Frame::Done { pages: 2, zero_pages: 1 }).unwrap_err();
        assert!(e.to_string().contains("before the machine state"), "{e}");
    }

    #[test]
    fn out_of_bounds_pages_touch_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, p) = receiver(dir.path());
        let e = r.apply(Frame::Pages { offset: (1 << 20) - PAGE, data: vec![1; 8192] }).unwrap_err();
        assert!(matches!(e, ReceiveError::OutOfBounds { .. }), "{e}");
        let e = r.apply(Frame::Zero(vec![(0, 1), (u64::MAX - PAGE + 1, 2)])).unwrap_err();
        assert!(matches!(e, ReceiveError::OutOfBounds { .. }), "{e}");
        assert!(std::fs::read(&p).unwrap().iter().all(|&b| b == 0));
        assert_eq!(r.pages(), 0);
    }
}
