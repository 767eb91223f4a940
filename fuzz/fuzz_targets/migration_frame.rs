//! Fuzzes the migration stream's frame decoder: every byte string must
//! decode to frames or to an error, never a panic.
//!
//! Each input is decoded twice: as it is (so CRC and sequence checks are
//! exercised), and with every frame's CRC and sequence number rewritten to
//! be right, so mutated payloads get past the checksum to the field checks,
//! the LZ4 and JSON decoders, `check_hello` and the post-copy receiver's
//! owed-page checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smudge::migration::frame::{decode_slice, Frame, FrameReader, HEADER_LEN, PAGE};
use smudge::migration::postcopy::{Owed, Placement, PostcopyReceiver};
use smudge::migration::receiver::check_hello;

/// A post-copy destination owed a few runs of a 1 MiB RAM, fed every
/// frame of the stream: it must refuse what was not owed, never panic.
fn postcopy_receiver() -> PostcopyReceiver {
    let mut owed = Owed::new(1 << 20);
    owed.add(&[(0, 16), (64 * PAGE, 8)]).expect("seed runs fit");
    PostcopyReceiver::new(owed)
}

fn check(frame: Frame) {
    if let Frame::Hello(_) = frame {
        let _ = check_hello(frame);
    }
}

fn decode_all(data: &[u8]) {
    // Frame by frame over the buffer, any sequence numbers.
    let mut rest = data;
    while let Ok((frame, used)) = decode_slice(rest) {
        assert!(used >= HEADER_LEN && used <= rest.len(), "decode_slice took {used} of {} bytes", rest.len());
        rest = &rest[used..];
        check(frame);
    }
    // As a stream: sequence numbers checked, ends on the first error.
    let mut r = FrameReader::new(data);
    let mut pc = postcopy_receiver();
    while let Ok(frame) = r.next_frame() {
        assert!(r.bytes() <= data.len() as u64, "read {} of {} bytes", r.bytes(), data.len());
        let before = pc.owed().remaining();
        match pc.apply(frame.clone()) {
            Ok(Placement::Pages { data, .. }) => {
                assert_eq!(before - pc.owed().remaining(), data.len() as u64 / PAGE, "pages taken off the debt")
            }
            Ok(Placement::Done) => assert_eq!(pc.owed().remaining(), 0, "Done with pages owed"),
            Ok(Placement::Zero(_)) => {}
            Err(_) => assert_eq!(pc.owed().remaining(), before, "a refused frame changed the debt"),
        }
        check(frame);
    }
}

/// `data` with each frame's sequence number set to its index and its CRC
/// (header with CRC 0, then payload, cut short where the input ends) made
/// right. Frames are found by their length fields alone.
fn fix_up(data: &[u8]) -> Vec<u8> {
    let mut b = data.to_vec();
    let (mut pos, mut seq) = (0usize, 0u32);
    while b.len() - pos >= HEADER_LEN {
        let len = u32::from_le_bytes(b[pos + 12..pos + 16].try_into().unwrap()) as usize;
        let end = (pos + HEADER_LEN).saturating_add(len).min(b.len());
        b[pos + 8..pos + 12].copy_from_slice(&seq.to_le_bytes());
        b[pos + 16..pos + 20].fill(0);
        let crc = crc32fast::hash(&b[pos..end]);
        b[pos + 16..pos + 20].copy_from_slice(&crc.to_le_bytes());
        pos = end;
        seq = seq.wrapping_add(1);
    }
    b
}

fuzz_target!(|data: &[u8]| {
    decode_all(data);
    let fixed = fix_up(data);
    if fixed != data {
        decode_all(&fixed);
    }
});
