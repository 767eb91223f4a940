//! The migration stream's wire format: framed, versioned, checksummed
//! messages. Everything read off the wire is checked here — magic, version,
//! kind, length, CRC, sequence number and every field's bounds — before a
//! caller sees a [`Frame`]; nothing here touches guest memory.
//!
//! ```text
//! header (20 bytes, little endian)
//!   magic "SMIG" | version u16 | kind u8 | flags u8 | seq u32 | len u32 | crc32 u32
//! payload (len bytes); crc32 covers the header (crc field 0) and the payload
//!
//! Hello     JSON {mem_size, page_size, vcpus, layout}         source -> dest
//! Pages     offset u64 | count u32 | count pages (or LZ4 of them, flag bit 0)
//! Zero      n u32 | n x (offset u64 | count u32)    pages that are all zero
//! RoundEnd  round u32 | pages u64     answered by an Ack once stored
//! State     postcard MachineState (vCPUs and devices; binary: it is on
//!           the downtime's critical path, JSON cost ~60 µs both ends)
//! Done      pages u64 | zero_pages u64     totals, cross-checked by the dest
//! Ack       JSON {ok, error}                                   dest -> source
//! Abort     UTF-8 reason                                       source -> dest
//! Checksums n u32 | n x crc32   RAM per 1 MiB at switchover (optional, before Done)
//! Postcopy  n u32 | n x (offset u64 | count u32)  pages still owed (before State)
//! PageRequest  n u32 | n x (offset u64 | count u32)  pages a vCPU waits for, dest -> source
//! Channel   session u64 | index u32    first frame of an extra page connection
//! Resume    migration u64   first frame of a post-copy recovery connection
//! ```
//!
//! Hello also carries `local` (a same-host handover: no pages follow) and
//! `postcopy` (the guest resumes on the destination before all pages are
//! there) when they apply.
//!
//! Offsets are backing-file offsets (the layout both ends derive from the
//! RAM size), always page aligned.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::machine_state::MachineState;
use crate::memory::RamRegion;

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"SMIG";
/// The stream version this code speaks.
pub const VERSION: u16 = 2;
/// Header bytes.
pub const HEADER_LEN: usize = 20;
/// Page size on the wire.
pub const PAGE: u64 = 4096;
/// Most pages in one `Pages` frame (1 MiB).
pub const MAX_FRAME_PAGES: u32 = 256;
/// Largest payload accepted (a full raw `Pages` frame plus its fields;
/// JSON frames are far smaller).
pub const MAX_PAYLOAD: u32 = MAX_FRAME_PAGES * PAGE as u32 + 64 * 1024;
/// Most ranges in one `Zero` frame.
pub const MAX_ZERO_RANGES: u32 = 65_536;
/// Flag: the `Pages` data is one LZ4 block.
pub const FLAG_LZ4: u8 = 1;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source introduces the VM.
    Hello = 1,
    /// Page data.
    Pages = 2,
    /// Zero-page marker.
    Zero = 3,
    /// A pre-copy round ended.
    RoundEnd = 4,
    /// vCPU and device state.
    State = 5,
    /// Nothing more follows.
    Done = 6,
    /// Destination's answer.
    Ack = 7,
    /// Source gives up.
    Abort = 8,
    /// Memory checksums at switchover.
    Checksums = 9,
    /// Post-copy: the pages the source still owes after the switchover.
    Postcopy = 10,
    /// Post-copy: pages the destination's guest is waiting for.
    PageRequest = 11,
    /// First frame of an extra page connection.
    Channel = 12,
    /// Reconnects a broken post-copy migration.
    Resume = 13,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Pages,
            3 => Kind::Zero,
            4 => Kind::RoundEnd,
            5 => Kind::State,
            6 => Kind::Done,
            7 => Kind::Ack,
            8 => Kind::Abort,
            9 => Kind::Checksums,
            10 => Kind::Postcopy,
            11 => Kind::PageRequest,
            12 => Kind::Channel,
            13 => Kind::Resume,
            _ => return None,
        })
    }
}

/// The source's description of the VM it sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Guest RAM bytes.
    pub mem_size: u64,
    /// Page size of the stream.
    pub page_size: u64,
    /// vCPU count.
    pub vcpus: usize,
    /// RAM layout (both ends must agree).
    pub layout: Vec<RamRegion>,
    /// A same-host handover: the destination maps this file and no page
    /// data follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<crate::migration::local::LocalRam>,
    /// Post-copy: after a `Postcopy` frame and the state the destination
    /// runs the guest while the owed pages arrive.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub postcopy: bool,
    /// Page connections in all (this one and `connections - 1` extra,
    /// each opened with a `Channel` frame naming `session`).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub connections: u32,
    /// Ties the extra connections to this migration.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub session: u64,
    /// This migration's id: a source reconnecting after a post-copy
    /// link break names it (`Resume`), and the destination refuses any
    /// other (0: none; such a migration cannot be recovered).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub migration: u64,
}

fn one() -> u32 {
    1
}
fn is_one(n: &u32) -> bool {
    *n == 1
}
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Hello {
    /// A `Hello` for `vcpus` vCPUs and `mem_size` bytes of RAM in smudge's
    /// layout, whose pages follow in the stream.
    pub fn new(mem_size: u64, vcpus: usize) -> Self {
        Hello {
            mem_size,
            page_size: PAGE,
            vcpus,
            layout: crate::memory::ram_layout(mem_size),
            local: None,
            postcopy: false,
            connections: 1,
            session: 0,
            migration: 0,
        }
    }
}

/// The destination's answer to `Hello` and to `Done`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Whether all is well.
    pub ok: bool,
    /// Why not.
    #[serde(default)]
    pub error: Option<String>,
    /// In the answer to `Done` (or a post-copy `State`): when the
    /// destination set its vCPUs running, µs since the Unix epoch on its
    /// realtime clock. A source on the same host times stop-to-running
    /// from it, as QEMU's STOP and RESUME events do, without the answer's
    /// trip back and its own wake-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_at_unix_us: Option<u64>,
}

impl Ack {
    /// All is well.
    pub fn ok() -> Ack {
        Ack { ok: true, error: None, running_at_unix_us: None }
    }

    /// A refusal and its reason.
    pub fn refused(why: impl Into<String>) -> Ack {
        Ack { ok: false, error: Some(why.into()), running_at_unix_us: None }
    }
}

/// One decoded, validated message.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// Page data at a backing-file offset; `data` is whole pages.
    Pages {
        /// Backing-file offset of the first page.
        offset: u64,
        /// The pages.
        data: Vec<u8>,
    },
    /// Runs of all-zero pages: (offset, page count).
    Zero(Vec<(u64, u32)>),
    /// A pre-copy round ended having sent `pages` pages.
    RoundEnd {
        /// Round number (0 is the first).
        round: u32,
        /// Pages sent in it.
        pages: u64,
    },
    /// vCPU and device state.
    State(Box<MachineState>),
    /// The end: totals the destination checks against what it received.
    Done {
        /// Data pages sent in all.
        pages: u64,
        /// Zero-marked pages sent in all.
        zero_pages: u64,
    },
    /// See [`Ack`].
    Ack(Ack),
    /// The source gave up (the reason).
    Abort(String),
    /// CRC-32 of each MiB of RAM at switchover, for an end-to-end check.
    Checksums(Vec<u32>),
    /// Post-copy switchover (before `State`): runs (offset, page count) of
    /// the pages the source still owes; they follow, as `Pages` or `Zero`,
    /// after the destination's guest runs. Any other page not in the
    /// destination's file is zero.
    Postcopy(Vec<(u64, u32)>),
    /// Post-copy, destination to source: runs of pages a vCPU waits for.
    PageRequest(Vec<(u64, u32)>),
    /// Opens extra page connection `index` (1..connections) of the
    /// migration whose `Hello` carried `session`.
    Channel {
        /// The migration's session id.
        session: u64,
        /// This connection's index.
        index: u32,
    },
    /// The first frame of a connection a source opens to resume a
    /// post-copy migration whose link broke: the `Hello`'s migration id.
    Resume {
        /// The migration's id ([`Hello::migration`]).
        migration: u64,
    },
}

impl Frame {
    /// This frame's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Hello(_) => Kind::Hello,
            Frame::Pages { .. } => Kind::Pages,
            Frame::Zero(_) => Kind::Zero,
            Frame::RoundEnd { .. } => Kind::RoundEnd,
            Frame::State(_) => Kind::State,
            Frame::Done { .. } => Kind::Done,
            Frame::Ack(_) => Kind::Ack,
            Frame::Abort(_) => Kind::Abort,
            Frame::Checksums(_) => Kind::Checksums,
            Frame::Postcopy(_) => Kind::Postcopy,
            Frame::PageRequest(_) => Kind::PageRequest,
            Frame::Channel { .. } => Kind::Channel,
            Frame::Resume { .. } => Kind::Resume,
        }
    }
}

/// Why bytes off the wire are not a good frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Reading or writing the connection failed.
    #[error("migration stream I/O: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("the peer closed the migration stream")]
    Closed,
    /// The peer closed the connection inside a frame.
    #[error("the peer closed the migration stream in the middle of frame {seq} ({kind:?}, {len} payload bytes)")]
    Truncated {
        /// Sequence number.
        seq: u32,
        /// Kind.
        kind: Kind,
        /// Payload length announced.
        len: u32,
    },
    /// Not a smudge migration stream.
    #[error("bad magic {0:02x?} at frame {1}: not a smudge migration stream")]
    Magic([u8; 4], u32),
    /// Another version.
    #[error("migration stream version {0}, this smudge speaks {VERSION}")]
    Version(u16),
    /// Unknown kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// Payload longer than allowed.
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLong(u32),
    /// Checksum mismatch.
    #[error("frame {seq} ({kind:?}) fails its CRC-32 check: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// Sequence number.
        seq: u32,
        /// Kind.
        kind: Kind,
        /// CRC in the header.
        stored: u32,
        /// CRC of what arrived.
        computed: u32,
    },
    /// A frame out of order (lost, duplicated or injected).
    #[error("frame sequence {got}, expected {want}: a frame was lost, repeated or injected")]
    Sequence {
        /// Received.
        got: u32,
        /// Expected.
        want: u32,
    },
    /// A field out of bounds or a body of the wrong shape.
    #[error("malformed {kind:?} frame: {what}")]
    Malformed {
        /// Kind.
        kind: Kind,
        /// What is wrong.
        what: String,
    },
}

fn malformed(kind: Kind, what: impl Into<String>) -> FrameError {
    FrameError::Malformed { kind, what: what.into() }
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Kind.
    pub kind: Kind,
    /// Flags.
    pub flags: u8,
    /// Sequence number.
    pub seq: u32,
    /// Payload length.
    pub len: u32,
    /// CRC-32 of header (crc 0) and payload.
    pub crc: u32,
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}
fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Parses and checks a header (magic, version, kind, length).
pub fn decode_header(b: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let seq = le_u32(&b[8..12]);
    let magic = [b[0], b[1], b[2], b[3]];
    if magic != MAGIC {
        return Err(FrameError::Magic(magic, seq));
    }
    let version = le_u16(&b[4..6]);
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let kind = Kind::from_u8(b[6]).ok_or(FrameError::Kind(b[6]))?;
    let len = le_u32(&b[12..16]);
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLong(len));
    }
    Ok(Header { kind, flags: b[7], seq, len, crc: le_u32(&b[16..20]) })
}

fn encode_header(kind: Kind, flags: u8, seq: u32, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6] = kind as u8;
    h[7] = flags;
    h[8..12].copy_from_slice(&seq.to_le_bytes());
    h[12..16].copy_from_slice(&len.to_le_bytes());
    h
}

fn checksum(header: &[u8; HEADER_LEN], payload: &[u8]) -> u32 {
    let mut h = *header;
    h[16..20].fill(0);
    let mut c = crc32fast::Hasher::new();
    c.update(&h);
    c.update(payload);
    c.finalize()
}

/// Checks the CRC and decodes the payload of a frame whose header `h` was
/// read from `raw_header`.
pub fn decode_payload(raw_header: &[u8; HEADER_LEN], h: &Header, payload: &[u8]) -> Result<Frame, FrameError> {
    let computed = checksum(raw_header, payload);
    if computed != h.crc {
        return Err(FrameError::Checksum { seq: h.seq, kind: h.kind, stored: h.crc, computed });
    }
    if h.flags & !FLAG_LZ4 != 0 || (h.flags & FLAG_LZ4 != 0 && h.kind != Kind::Pages) {
        return Err(malformed(h.kind, format!("unknown flags {:#04x}", h.flags)));
    }
    let json = |what| move |e: serde_json::Error| malformed(h.kind, format!("{what}: {e}"));
    Ok(match h.kind {
        Kind::Hello => {
            let hello: Hello = serde_json::from_slice(payload).map_err(json("bad JSON"))?;
            if hello.page_size != PAGE {
                return Err(malformed(h.kind, format!("page size {} (smudge uses {PAGE})", hello.page_size)));
            }
            Frame::Hello(hello)
        }
        Kind::Pages => {
            if payload.len() < 12 {
                return Err(malformed(h.kind, "shorter than its 12-byte head"));
            }
            let offset = le_u64(&payload[..8]);
            let count = le_u32(&payload[8..12]);
            if !offset.is_multiple_of(PAGE) {
                return Err(malformed(h.kind, format!("offset {offset:#x} is not page aligned")));
            }
            if count == 0 || count > MAX_FRAME_PAGES {
                return Err(malformed(h.kind, format!("{count} pages (1..={MAX_FRAME_PAGES} allowed)")));
            }
            let want = count as usize * PAGE as usize;
            let body = &payload[12..];
            let data = if h.flags & FLAG_LZ4 != 0 {
                let mut out = vec![0u8; want];
                let n = lz4_flex::block::decompress_into(body, &mut out)
                    .map_err(|e| malformed(h.kind, format!("LZ4 data does not decompress: {e}")))?;
                if n != want {
                    return Err(malformed(h.kind, format!("LZ4 data gives {n} bytes, {count} pages need {want}")));
                }
                out
            } else {
                if body.len() != want {
                    return Err(malformed(h.kind, format!("{} data bytes for {count} pages", body.len())));
                }
                body.to_vec()
            };
            Frame::Pages { offset, data }
        }
        Kind::Zero => Frame::Zero(decode_ranges(h.kind, payload)?),
        Kind::Postcopy => Frame::Postcopy(decode_ranges(h.kind, payload)?),
        Kind::PageRequest => Frame::PageRequest(decode_ranges(h.kind, payload)?),
        Kind::Channel => {
            if payload.len() != 12 {
                return Err(malformed(h.kind, format!("{} bytes, want 12", payload.len())));
            }
            Frame::Channel { session: le_u64(&payload[..8]), index: le_u32(&payload[8..12]) }
        }
        Kind::Resume => {
            if payload.len() != 8 {
                return Err(malformed(h.kind, format!("{} bytes, want 8", payload.len())));
            }
            Frame::Resume { migration: le_u64(payload) }
        }
        Kind::RoundEnd => {
            if payload.len() != 12 {
                return Err(malformed(h.kind, format!("{} bytes, want 12", payload.len())));
            }
            Frame::RoundEnd { round: le_u32(&payload[..4]), pages: le_u64(&payload[4..12]) }
        }
        Kind::State => Frame::State(Box::new(decode_state(h.kind, payload)?)),
        Kind::Done => {
            if payload.len() != 16 {
                return Err(malformed(h.kind, format!("{} bytes, want 16", payload.len())));
            }
            Frame::Done { pages: le_u64(&payload[..8]), zero_pages: le_u64(&payload[8..16]) }
        }
        Kind::Ack => Frame::Ack(serde_json::from_slice(payload).map_err(json("bad JSON"))?),
        Kind::Abort => Frame::Abort(String::from_utf8_lossy(payload).into_owned()),
        Kind::Checksums => {
            if payload.len() < 4 {
                return Err(malformed(h.kind, "shorter than its count"));
            }
            let n = le_u32(&payload[..4]) as usize;
            if payload.len() != 4 + n * 4 {
                return Err(malformed(h.kind, format!("{n} checksums in {} bytes", payload.len())));
            }
            Frame::Checksums(payload[4..].chunks_exact(4).map(le_u32).collect())
        }
    })
}

/// A `State` payload: exactly one postcard-encoded [`MachineState`], no
/// bytes left over.
fn decode_state(kind: Kind, payload: &[u8]) -> Result<MachineState, FrameError> {
    let (state, rest) =
        postcard::take_from_bytes::<MachineState>(payload).map_err(|e| malformed(kind, format!("bad state: {e}")))?;
    if !rest.is_empty() {
        return Err(malformed(kind, format!("{} bytes after the state", rest.len())));
    }
    Ok(state)
}

/// A body of page runs: n u32 | n x (offset u64 | count u32), each run
/// page aligned and not empty.
fn decode_ranges(kind: Kind, payload: &[u8]) -> Result<Vec<(u64, u32)>, FrameError> {
    if payload.len() < 4 {
        return Err(malformed(kind, "shorter than its count"));
    }
    let n = le_u32(&payload[..4]);
    if n > MAX_ZERO_RANGES || payload.len() != 4 + n as usize * 12 {
        return Err(malformed(kind, format!("{n} ranges in {} bytes", payload.len())));
    }
    let mut v = Vec::with_capacity(n as usize);
    for r in payload[4..].chunks_exact(12) {
        let (offset, count) = (le_u64(&r[..8]), le_u32(&r[8..12]));
        if !offset.is_multiple_of(PAGE) || count == 0 {
            return Err(malformed(kind, format!("range ({offset:#x}, {count} pages)")));
        }
        v.push((offset, count));
    }
    Ok(v)
}

/// Decodes the first frame of `buf` (any sequence number): the frame and
/// the bytes it took. For tests and fuzzing; streams use [`FrameReader`].
pub fn decode_slice(buf: &[u8]) -> Result<(Frame, usize), FrameError> {
    let raw: &[u8; HEADER_LEN] = buf
        .get(..HEADER_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| FrameError::Io(io::ErrorKind::UnexpectedEof.into()))?;
    let h = decode_header(raw)?;
    let end = HEADER_LEN + h.len as usize;
    let payload = buf.get(HEADER_LEN..end).ok_or_else(|| FrameError::Io(io::ErrorKind::UnexpectedEof.into()))?;
    Ok((decode_payload(raw, &h, payload)?, end))
}

/// Reads frames off a stream, checking each and the sequence.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    seq: u32,
    bytes: u64,
    buf: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    /// A reader expecting sequence number 0 first.
    pub fn new(inner: R) -> Self {
        FrameReader { inner, seq: 0, bytes: 0, buf: Vec::new() }
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The next frame, validated.
    pub fn next_frame(&mut self) -> Result<Frame, FrameError> {
        let mut raw = [0u8; HEADER_LEN];
        match self.inner.read_exact(&mut raw) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
            Err(e) => return Err(e.into()),
        }
        let h = decode_header(&raw)?;
        self.buf.resize(h.len as usize, 0);
        match self.inner.read_exact(&mut self.buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(FrameError::Truncated { seq: h.seq, kind: h.kind, len: h.len })
            }
            Err(e) => return Err(e.into()),
        }
        self.bytes += (HEADER_LEN + self.buf.len()) as u64;
        let f = decode_payload(&raw, &h, &self.buf)?;
        if h.seq != self.seq {
            return Err(FrameError::Sequence { got: h.seq, want: self.seq });
        }
        self.seq = self.seq.wrapping_add(1);
        Ok(f)
    }
}

/// Writes frames to a stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    seq: u32,
    bytes: u64,
    lz4: bool,
    scratch: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    /// A writer; `lz4` compresses page data where that makes it smaller.
    pub fn new(inner: W, lz4: bool) -> Self {
        FrameWriter { inner, seq: 0, bytes: 0, lz4, scratch: Vec::new() }
    }

    /// Bytes written so far (headers included).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    fn emit(&mut self, kind: Kind, flags: u8, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len32 = u32::try_from(len).ok().filter(|&l| l <= MAX_PAYLOAD).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{kind:?} frame of {len} bytes is too long"))
        })?;
        let mut header = encode_header(kind, flags, self.seq, len32);
        let mut c = crc32fast::Hasher::new();
        c.update(&header);
        for p in parts {
            c.update(p);
        }
        header[16..20].copy_from_slice(&c.finalize().to_le_bytes());
        self.inner.write_all(&header)?;
        for p in parts {
            self.inner.write_all(p)?;
        }
        self.seq = self.seq.wrapping_add(1);
        self.bytes += (HEADER_LEN + len) as u64;
        Ok(())
    }

    /// Sends whole pages at backing-file `offset` (at most
    /// [`MAX_FRAME_PAGES`]).
    pub fn send_pages(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let count = data.len() as u64 / PAGE;
        if !(data.len() as u64).is_multiple_of(PAGE) || count == 0 || count > u64::from(MAX_FRAME_PAGES) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "pages frame needs 1..=256 whole pages"));
        }
        let mut head = [0u8; 12];
        head[..8].copy_from_slice(&offset.to_le_bytes());
        head[8..].copy_from_slice(&(count as u32).to_le_bytes());
        if self.lz4 {
            let mut scratch = std::mem::take(&mut self.scratch);
            scratch.resize(lz4_flex::block::get_maximum_output_size(data.len()), 0);
            let r = match lz4_flex::block::compress_into(data, &mut scratch) {
                Ok(n) if n < data.len() => Some(self.emit(Kind::Pages, FLAG_LZ4, &[&head, &scratch[..n]])),
                _ => None,
            };
            self.scratch = scratch;
            if let Some(r) = r {
                return r;
            }
        }
        self.emit(Kind::Pages, 0, &[&head, data])
    }

    /// Sends any frame.
    pub fn send(&mut self, f: &Frame) -> io::Result<()> {
        let json = |v: &dyn erased::Ser| v.to_json();
        match f {
            Frame::Hello(h) => self.emit(Kind::Hello, 0, &[&json(h)?]),
            Frame::Pages { offset, data } => {
                for (i, chunk) in data.chunks((MAX_FRAME_PAGES as u64 * PAGE) as usize).enumerate() {
                    self.send_pages(offset + i as u64 * MAX_FRAME_PAGES as u64 * PAGE, chunk)?;
                }
                Ok(())
            }
            Frame::Zero(ranges) => self.emit_ranges(Kind::Zero, ranges),
            Frame::Postcopy(ranges) => self.emit_ranges(Kind::Postcopy, ranges),
            Frame::PageRequest(ranges) => self.emit_ranges(Kind::PageRequest, ranges),
            Frame::Channel { session, index } => {
                self.emit(Kind::Channel, 0, &[&session.to_le_bytes(), &index.to_le_bytes()])
            }
            Frame::Resume { migration } => self.emit(Kind::Resume, 0, &[&migration.to_le_bytes()]),
            Frame::RoundEnd { round, pages } => {
                self.emit(Kind::RoundEnd, 0, &[&round.to_le_bytes(), &pages.to_le_bytes()])
            }
            Frame::State(s) => {
                self.emit(Kind::State, 0, &[&postcard::to_stdvec(s.as_ref()).map_err(std::io::Error::other)?])
            }
            Frame::Done { pages, zero_pages } => {
                self.emit(Kind::Done, 0, &[&pages.to_le_bytes(), &zero_pages.to_le_bytes()])
            }
            Frame::Ack(a) => self.emit(Kind::Ack, 0, &[&json(a)?]),
            Frame::Abort(r) => self.emit(Kind::Abort, 0, &[r.as_bytes()]),
            Frame::Checksums(c) => {
                let mut b = Vec::with_capacity(4 + c.len() * 4);
                b.extend_from_slice(&(c.len() as u32).to_le_bytes());
                for x in c {
                    b.extend_from_slice(&x.to_le_bytes());
                }
                self.emit(Kind::Checksums, 0, &[&b])
            }
        }
    }

    /// Page runs, in as many frames as they need.
    fn emit_ranges(&mut self, kind: Kind, ranges: &[(u64, u32)]) -> io::Result<()> {
        for part in ranges.chunks(MAX_ZERO_RANGES as usize) {
            let mut b = Vec::with_capacity(4 + part.len() * 12);
            b.extend_from_slice(&(part.len() as u32).to_le_bytes());
            for (o, n) in part {
                b.extend_from_slice(&o.to_le_bytes());
                b.extend_from_slice(&n.to_le_bytes());
            }
            self.emit(kind, 0, &[&b])?;
        }
        Ok(())
    }

    /// Flushes the stream.
    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

mod erased {
    //! JSON encoding of the frame bodies through one object-safe trait.
    pub trait Ser {
        fn to_json(&self) -> std::io::Result<Vec<u8>>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> std::io::Result<Vec<u8>> {
            serde_json::to_vec(self).map_err(std::io::Error::other)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(frames: &[Frame], lz4: bool) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new(), lz4);
        for f in frames {
            w.send(f).unwrap();
        }
        w.inner
    }

    fn sample() -> Vec<Frame> {
        let mut page = vec![0u8; 2 * PAGE as usize];
        page[5] = 7;
        page[PAGE as usize + 9] = 0xee;
        vec![
            Frame::Hello(Hello::new(64 << 20, 2)),
            Frame::Pages { offset: 0x3000, data: page },
            Frame::Zero(vec![(0x8000, 3), (0x20000, 1)]),
            Frame::RoundEnd { round: 4, pages: 99 },
            Frame::State(Box::default()),
            Frame::Done { pages: 2, zero_pages: 4 },
            Frame::Ack(Ack::refused("no")),
            Frame::Ack(Ack { running_at_unix_us: Some(1_764_000_000_123_456), ..Ack::ok() }),
            Frame::Abort("gone".into()),
            Frame::Checksums(vec![1, 0xdead_beef, 3]),
            Frame::Postcopy(vec![(0x4000, 2), (0x10000, 7)]),
            Frame::PageRequest(vec![(0x5000, 1)]),
            Frame::Channel { session: 0xfeed, index: 3 },
            Frame::Resume { migration: 0xdead_beef_f00d },
        ]
    }

    #[test]
    fn frames_round_trip_raw_and_compressed() {
        for lz4 in [false, true] {
            let bytes = encode(&sample(), lz4);
            let mut r = FrameReader::new(&bytes[..]);
            for f in sample() {
                assert_eq!(r.next_frame().unwrap(), f);
            }
            assert!(matches!(r.next_frame(), Err(FrameError::Closed)));
            assert_eq!(r.bytes(), bytes.len() as u64);
        }
    }

    fn machine_state() -> MachineState {
        use crate::kvm::vcpu_state::{FpuState, VcpuState};
        use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 1;
        let vcpu = |id| VcpuState {
            id,
            regs: kvm_regs { rip: 0x10_0000 + u64::from(id), rsp: 0x7000, rflags: 2, ..Default::default() },
            sregs: kvm_sregs { cr0: 0x8000_0011, cr3: 0x1000, efer: 0x500, ..Default::default() },
            fpu: FpuState::from(&kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }),
            msrs: vec![(0x10, 12345), (0xc000_0080, 0x500)],
            lapic: Some(lapic),
            mp_state: Default::default(),
            events: Default::default(),
        };
        MachineState { vcpus: vec![vcpu(0), vcpu(1)], devices: Default::default() }
    }

    #[test]
    fn a_machine_state_round_trips_and_a_damaged_one_is_refused() {
        let st = machine_state();
        let bytes = encode(&[Frame::State(Box::new(st.clone()))], false);
        assert_eq!(decode_slice(&bytes).unwrap().0, Frame::State(Box::new(st.clone())));
        // Behind a good header and CRC: a cut payload, and bytes left over.
        let payload = postcard::to_stdvec(&st).unwrap();
        for bad in [&payload[..payload.len() / 2], &[&payload[..], &[0u8][..]].concat()[..]] {
            let mut w = FrameWriter::new(Vec::new(), false);
            w.emit(Kind::State, 0, &[bad]).unwrap();
            let e = decode_slice(&w.inner).unwrap_err().to_string();
            assert!(e.contains("State") && e.contains("state"), "{e}");
        }
    }

    #[test]
    fn compressible_pages_travel_compressed() {
        let data = vec![3u8; (MAX_FRAME_PAGES as u64 * PAGE) as usize];
        let raw = encode(&[Frame::Pages { offset: 0, data: data.clone() }], false);
        let small = encode(&[Frame::Pages { offset: 0, data: data.clone() }], true);
        assert!(small.len() < raw.len() / 20, "{} vs {}", small.len(), raw.len());
        assert_eq!(decode_slice(&small).unwrap().0, Frame::Pages { offset: 0, data });
    }

    #[test]
    fn every_flipped_bit_of_a_frame_is_caught() {
        let bytes = encode(&sample()[1..2], false);
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_slice(&b).is_err(), "bit {bit} flipped went unnoticed");
        }
    }

    #[test]
    fn sequence_gaps_are_caught() {
        let a = encode(&sample()[..3], false);
        let (_, first) = decode_slice(&a).unwrap();
        let mut r = FrameReader::new(&a[first..]);
        assert!(matches!(r.next_frame(), Err(FrameError::Sequence { got: 1, want: 0 })));
    }

    #[test]
    fn bad_fields_are_named() {
        let mut w = FrameWriter::new(Vec::new(), false);
        w.emit(Kind::Pages, 0, &[&0x1001u64.to_le_bytes(), &1u32.to_le_bytes(), &[0u8; 4096]]).unwrap();
        let e = decode_slice(&w.inner).unwrap_err().to_string();
        assert!(e.contains("not page aligned"), "{e}");
        let mut w = FrameWriter::new(Vec::new(), false);
        w.emit(Kind::Pages, FLAG_LZ4, &[&0u64.to_le_bytes(), &1u32.to_le_bytes(), &[0xffu8; 16]]).unwrap();
        let e = decode_slice(&w.inner).unwrap_err().to_string();
        assert!(e.contains("LZ4"), "{e}");
        let mut bytes = encode(&sample()[..1], false);
        bytes[4] = 9;
        assert!(matches!(decode_slice(&bytes), Err(FrameError::Version(9))));
        bytes[0] = b'X';
        assert!(matches!(decode_slice(&bytes), Err(FrameError::Magic(..))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_slice(&b);
        }

        #[test]
        fn arbitrary_payloads_behind_a_good_header_never_panic(
            kind in 1u8..=9, flags in 0u8..=1, body in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            let mut w = FrameWriter::new(Vec::new(), false);
            let k = Kind::from_u8(kind).unwrap();
            w.emit(k, flags, &[&body]).unwrap();
            let _ = decode_slice(&w.inner);
        }
    }
}
