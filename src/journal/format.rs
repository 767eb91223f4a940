//! The journal's on-disk records: a fixed header with its own CRC, then a
//! payload with a CRC in that header. Every record of a segment file is
//! one of these, back to back.
//!
//! ```text
//! record header (32 bytes, little endian)
//!   0  magic        u32  "SMJR"
//!   4  kind         u8   1 segment | 2 begin | 3 pages | 4 state | 5 commit
//!                        | 6 deltas (version 2)
//!   5  reserved     [u8; 3] = 0
//!   8  epoch        u64  the epoch the record belongs to (segment: its first)
//!  16  len          u64  payload bytes
//!  24  payload_crc  u32  CRC-32 of the payload
//!  28  header_crc   u32  CRC-32 of bytes 0..28
//! payload (len bytes)
//!   segment: version u32, reserved u32, journal id u128, sequence u64
//!   begin:   vm id u128, unix time ns u64, RAM size u64, page size u64
//!   pages:   n u64, n file offsets u64, n pages of data
//!   deltas:  n u64, n file offsets u64, n delta lengths u32, n deltas
//!            (delta.rs: the page's changed runs since its previous record)
//!   state:   the machine state as JSON (crate::machine_state)
//!   commit:  pages u64, page records u64, payload bytes u64
//! ```
//!
//! An epoch is `begin, (pages | deltas)*, state, commit`, all with its
//! number; a record that does not parse, fails a CRC or ends past the end
//! of the file ends the journal there. Version 1 segments (written before
//! deltas) hold no deltas record and are read as they are.

use std::io;

/// The magic of every record ("SMJR", little endian).
pub const MAGIC: u32 = u32::from_le_bytes(*b"SMJR");
/// The format version a new segment header names.
pub const VERSION: u32 = 2;
/// The oldest segment format version read (1: pages only, no deltas).
pub const OLDEST_VERSION: u32 = 1;
/// Bytes of a record header.
pub const HEADER: usize = 32;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Never written: a zeroed header is not a record.
    Invalid = 0,
    /// Opens a segment file.
    Segment = 1,
    /// Opens an epoch.
    Begin = 2,
    /// Pages of an epoch.
    Pages = 3,
    /// The machine state at the epoch's boundary.
    State = 4,
    /// Closes an epoch: committed once a sync covering it has returned.
    Commit = 5,
    /// Pages of an epoch as deltas against their previous records.
    Deltas = 6,
}

impl Kind {
    fn from_u8(v: u8) -> Kind {
        match v {
            1 => Kind::Segment,
            2 => Kind::Begin,
            3 => Kind::Pages,
            4 => Kind::State,
            5 => Kind::Commit,
            6 => Kind::Deltas,
            _ => Kind::Invalid,
        }
    }
}

/// A record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the record holds.
    pub kind: Kind,
    /// Its epoch (a segment: the first epoch in it).
    pub epoch: u64,
    /// Payload bytes.
    pub len: u64,
    /// CRC-32 of the payload.
    pub payload_crc: u32,
}

/// Why bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes than a header or its payload (a torn write).
    #[error("torn: the record ends past the end of the file")]
    Torn,
    /// Not a record header (no magic, an unknown kind, a bad header CRC).
    #[error("not a record header")]
    BadHeader,
    /// The payload's CRC does not match.
    #[error("payload checksum mismatch")]
    BadPayload,
    /// A payload of the wrong size or contents for its kind.
    #[error("malformed {0:?} payload")]
    Malformed(Kind),
    /// A segment of a format version this smudge does not read.
    #[error("segment format version {0} (this smudge reads versions {OLDEST_VERSION} to {VERSION})")]
    Version(u32),
}

impl Header {
    /// The header of a record of `kind` for `epoch` with `payload`.
    pub fn of(kind: Kind, epoch: u64, payload: &[u8]) -> Header {
        Header { kind, epoch, len: payload.len() as u64, payload_crc: crc32fast::hash(payload) }
    }

    /// Its 32 bytes.
    pub fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.kind as u8;
        b[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..28].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses 32 bytes.
    pub fn decode(b: &[u8; HEADER]) -> Result<Header, RecordError> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let kind = Kind::from_u8(b[4]);
        if u32_at(0) != MAGIC || kind == Kind::Invalid || b[5..8] != [0; 3] || crc32fast::hash(&b[0..28]) != u32_at(28)
        {
            return Err(RecordError::BadHeader);
        }
        Ok(Header { kind, epoch: u64_at(8), len: u64_at(16), payload_crc: u32_at(24) })
    }

    /// Checks `payload` against this header.
    pub fn check(&self, payload: &[u8]) -> Result<(), RecordError> {
        if payload.len() as u64 != self.len {
            return Err(RecordError::Torn);
        }
        if crc32fast::hash(payload) != self.payload_crc {
            return Err(RecordError::BadPayload);
        }
        Ok(())
    }
}

/// A segment's header payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHead {
    /// Its format version ([`VERSION`] for a new one).
    pub version: u32,
    /// The journal this segment belongs to.
    pub journal: u128,
    /// Its place among the journal's segments (0, 1, …).
    pub sequence: u64,
}

/// An epoch's opening payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// The VM the epoch is of.
    pub vm: u128,
    /// When its boundary was (nanoseconds since the Unix epoch).
    pub time_ns: u64,
    /// Guest RAM bytes.
    pub ram_size: u64,
    /// Bytes per page.
    pub page_size: u64,
}

/// An epoch's closing payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Commit {
    /// Pages in the epoch.
    pub pages: u64,
    /// Page records in the epoch.
    pub page_records: u64,
    /// Payload bytes of all the epoch's records (begin to state).
    pub bytes: u64,
}

fn u64s<const N: usize>(p: &[u8], kind: Kind) -> Result<[u64; N], RecordError> {
    if p.len() != N * 8 {
        return Err(RecordError::Malformed(kind));
    }
    let mut out = [0u64; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u64::from_le_bytes(p[i * 8..i * 8 + 8].try_into().map_err(|_| RecordError::Malformed(kind))?);
    }
    Ok(out)
}

fn cat(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

impl SegmentHead {
    /// Its payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32);
        v.extend_from_slice(&self.version.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&self.journal.to_le_bytes());
        v.extend_from_slice(&self.sequence.to_le_bytes());
        v
    }

    /// Parses a payload of a version from [`OLDEST_VERSION`] to
    /// [`VERSION`].
    pub fn decode(p: &[u8]) -> Result<SegmentHead, RecordError> {
        let bad = RecordError::Malformed(Kind::Segment);
        if p.len() != 32 {
            return Err(bad);
        }
        let version = u32::from_le_bytes(p[0..4].try_into().map_err(|_| bad.clone())?);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(RecordError::Version(version));
        }
        let journal = u128::from_le_bytes(p[8..24].try_into().map_err(|_| bad.clone())?);
        let sequence = u64::from_le_bytes(p[24..32].try_into().map_err(|_| bad)?);
        Ok(SegmentHead { version, journal, sequence })
    }
}

impl Begin {
    /// Its payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.vm.to_le_bytes().to_vec();
        v.extend(cat(&[self.time_ns, self.ram_size, self.page_size]));
        v
    }

    /// Parses a payload.
    pub fn decode(p: &[u8]) -> Result<Begin, RecordError> {
        let bad = RecordError::Malformed(Kind::Begin);
        if p.len() != 40 {
            return Err(bad);
        }
        let vm = u128::from_le_bytes(p[0..16].try_into().map_err(|_| bad.clone())?);
        let [time_ns, ram_size, page_size] = u64s::<3>(&p[16..], Kind::Begin)?;
        if page_size == 0 || !page_size.is_power_of_two() || ram_size % page_size != 0 {
            return Err(bad);
        }
        Ok(Begin { vm, time_ns, ram_size, page_size })
    }
}

impl Commit {
    /// Its payload.
    pub fn encode(&self) -> Vec<u8> {
        cat(&[self.pages, self.page_records, self.bytes])
    }

    /// Parses a payload.
    pub fn decode(p: &[u8]) -> Result<Commit, RecordError> {
        let [pages, page_records, bytes] = u64s::<3>(p, Kind::Commit)?;
        Ok(Commit { pages, page_records, bytes })
    }
}

/// The head of a pages payload: the page count and their file offsets
/// (the data follows, `page_size` bytes each).
pub fn encode_page_offsets(offsets: &[u64]) -> Vec<u8> {
    let mut v = (offsets.len() as u64).to_le_bytes().to_vec();
    v.extend(cat(offsets));
    v
}

/// Splits a pages payload into its offsets and its data, checking that
/// every offset is a page of a RAM of `ram_size` bytes.
pub fn decode_pages(p: &[u8], page_size: u64, ram_size: u64) -> Result<(Vec<u64>, &[u8]), RecordError> {
    let bad = RecordError::Malformed(Kind::Pages);
    let n = u64::from_le_bytes(p.get(0..8).ok_or(bad.clone())?.try_into().map_err(|_| bad.clone())?);
    let head = n.checked_mul(8).and_then(|h| h.checked_add(8)).ok_or(bad.clone())?;
    let want = n.checked_mul(page_size).and_then(|d| d.checked_add(head)).ok_or(bad.clone())?;
    if want != p.len() as u64 {
        return Err(bad);
    }
    let offsets: Vec<u64> =
        p[8..head as usize].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0xff; 8]))).collect();
    if offsets.iter().any(|&o| o % page_size != 0 || o >= ram_size) {
        return Err(bad);
    }
    Ok((offsets, &p[head as usize..]))
}

/// The head of a deltas payload: the count, the pages' file offsets and
/// their deltas' lengths (the deltas follow, back to back).
pub fn encode_delta_heads(offsets: &[u64], lens: &[u32]) -> Vec<u8> {
    let mut v = (offsets.len() as u64).to_le_bytes().to_vec();
    v.extend(cat(offsets));
    v.extend(lens.iter().flat_map(|l| l.to_le_bytes()));
    v
}

/// Splits a deltas payload into (file offset, delta) pairs, checking
/// that every offset is a page of a RAM of `ram_size` bytes and every
/// delta is well formed for a page of `page_size`.
pub fn decode_deltas(p: &[u8], page_size: u64, ram_size: u64) -> Result<Vec<(u64, &[u8])>, RecordError> {
    let bad = || RecordError::Malformed(Kind::Deltas);
    let n = u64::from_le_bytes(p.get(0..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
    let offs_end = n.checked_mul(8).and_then(|h| h.checked_add(8)).filter(|&e| e <= p.len() as u64).ok_or_else(bad)?;
    let head_end =
        n.checked_mul(4).and_then(|h| h.checked_add(offs_end)).filter(|&e| e <= p.len() as u64).ok_or_else(bad)?;
    let (offs_end, head_end) = (offs_end as usize, head_end as usize);
    let offsets = p[8..offs_end].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0xff; 8])));
    let lens = p[offs_end..head_end].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or([0xff; 4])));
    let mut at = head_end;
    let mut out = Vec::with_capacity(n as usize);
    for (off, len) in offsets.zip(lens) {
        let end = at.checked_add(len as usize).filter(|&e| e <= p.len()).ok_or_else(bad)?;
        let d = &p[at..end];
        if off % page_size != 0 || off >= ram_size || super::delta::check(d, page_size as usize).is_err() {
            return Err(bad());
        }
        out.push((off, d));
        at = end;
    }
    if at != p.len() {
        return Err(bad());
    }
    Ok(out)
}

/// The payload checksum over several pieces written back to back.
pub fn crc_of(pieces: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in pieces {
        h.update(p);
    }
    h.finalize()
}

/// A record header for pieces written back to back as one payload.
pub fn header_of(kind: Kind, epoch: u64, pieces: &[&[u8]]) -> Header {
    Header { kind, epoch, len: pieces.iter().map(|p| p.len() as u64).sum(), payload_crc: crc_of(pieces) }
}

/// Reads exactly `buf.len()` bytes at `off`, or says the file ended
/// first ([`RecordError::Torn`] for the caller).
pub fn read_at(file: &std::fs::File, buf: &mut [u8], off: u64) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    match file.read_exact_at(buf, off) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_and_any_flipped_bit_is_caught() {
        let h = Header::of(Kind::Pages, 7, b"payload");
        let b = h.encode();
        assert_eq!(Header::decode(&b), Ok(h));
        assert_eq!(h.check(b"payload"), Ok(()));
        assert_eq!(h.check(b"paylaod"), Err(RecordError::BadPayload));
        assert_eq!(h.check(b"pay"), Err(RecordError::Torn));
        for bit in 0..HEADER * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(Header::decode(&c), Err(RecordError::BadHeader), "bit {bit}");
        }
        assert_eq!(Header::decode(&[0; HEADER]), Err(RecordError::BadHeader));
    }

    #[test]
    fn payloads_round_trip_and_bad_ones_are_refused() {
        let s = SegmentHead { version: VERSION, journal: 0x1234_5678_9abc, sequence: 3 };
        assert_eq!(SegmentHead::decode(&s.encode()), Ok(s));
        let v1 = SegmentHead { version: 1, ..s };
        assert_eq!(SegmentHead::decode(&v1.encode()), Ok(v1), "version 1 is still read");
        let v3 = SegmentHead { version: 3, ..s };
        assert_eq!(SegmentHead::decode(&v3.encode()), Err(RecordError::Version(3)));
        let b = Begin { vm: 99, time_ns: 5, ram_size: 1 << 20, page_size: 4096 };
        assert_eq!(Begin::decode(&b.encode()), Ok(b));
        let odd = Begin { page_size: 3000, ..b };
        assert_eq!(Begin::decode(&odd.encode()), Err(RecordError::Malformed(Kind::Begin)));
        let c = Commit { pages: 2, page_records: 1, bytes: 99 };
        assert_eq!(Commit::decode(&c.encode()), Ok(c));
        // pages: [0x1000, 0x3000], 4-byte pages for the drawing.
        let mut p = encode_page_offsets(&[0x1000, 0x3000]);
        p.extend_from_slice(&[1; 8192]);
        let (offs, data) = decode_pages(&p, 4096, 1 << 20).unwrap();
        assert_eq!((offs, data.len()), (vec![0x1000, 0x3000], 8192));
        assert!(decode_pages(&p[..p.len() - 1], 4096, 1 << 20).is_err());
        assert!(decode_pages(&p, 4096, 0x2000).is_err(), "an offset past RAM");
    }

    #[test]
    fn a_deltas_payload_round_trips_and_bad_ones_are_refused() {
        // Two deltas: page 0x1000 bytes 4..6 = [1, 2]; page 0x3000 byte 0 = 9.
        let (a, b): (&[u8], &[u8]) = (&[4, 2, 1, 2], &[0, 1, 9]);
        let mut p = encode_delta_heads(&[0x1000, 0x3000], &[4, 3]);
        p.extend_from_slice(a);
        p.extend_from_slice(b);
        assert_eq!(decode_deltas(&p, 4096, 1 << 20), Ok(vec![(0x1000, a), (0x3000, b)]));
        let bad = Err(RecordError::Malformed(Kind::Deltas));
        assert_eq!(decode_deltas(&p[..p.len() - 1], 4096, 1 << 20), bad, "cut short");
        assert_eq!(decode_deltas(&[&p[..], &[0]].concat(), 4096, 1 << 20), bad, "a byte too many");
        assert_eq!(decode_deltas(&p, 4096, 0x2000), bad, "an offset past RAM");
        assert_eq!(decode_deltas(&p, 4, 1 << 20), bad, "a run past the page");
        let mut odd = encode_delta_heads(&[0x1001], &[3]);
        odd.extend_from_slice(b);
        assert_eq!(decode_deltas(&odd, 4096, 1 << 20), bad, "an unaligned offset");
        let mut huge = encode_delta_heads(&[0x1000], &[3]);
        huge[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode_deltas(&huge, 4096, 1 << 20), bad, "a count past the payload");
        assert_eq!(decode_deltas(&encode_delta_heads(&[], &[]), 4096, 1 << 20), Ok(vec![]));
    }
}
