//! Writes the seed corpus of the `migration_frame` target: one valid frame
//! of each kind per file, and whole streams, all made by `FrameWriter`.
//!
//! ```text
//! cargo run --example make_corpus [OUT_DIR]   # default corpus/migration_frame
//! ```

use std::path::PathBuf;

use smudge::memory::ram_layout;
use smudge::migration::frame::{Ack, Frame, FrameWriter, Hello, PAGE};
use smudge::snapshot::MachineState;

fn encode(frames: &[Frame], lz4: bool) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new(), lz4);
    for f in frames {
        w.send(f).expect("encoding a frame into a Vec");
    }
    std::mem::take(w.get_mut())
}

fn hello(mem_size: u64, vcpus: usize) -> Frame {
    Frame::Hello(Hello { mem_size, page_size: PAGE, vcpus, layout: ram_layout(mem_size) })
}

/// One page that LZ4 shrinks (mostly zero) and one it cannot (noise).
fn pages() -> (Vec<u8>, Vec<u8>) {
    let mut sparse = vec![0u8; PAGE as usize];
    sparse[..16].copy_from_slice(b"smudge fuzz seed");
    sparse[PAGE as usize - 1] = 0xee;
    let mut x: u32 = 0x9e37_79b9;
    let noise = (0..PAGE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    (sparse, noise)
}

fn main() {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/migration_frame"));
    std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    let (sparse, noise) = pages();
    let singles: Vec<(&str, Frame, bool)> = vec![
        ("hello", hello(64 << 20, 2), false),
        ("hello-high-ram", hello(5 << 30, 4), false),
        ("pages-raw", Frame::Pages { offset: 0x3000, data: noise.clone() }, false),
        ("pages-lz4", Frame::Pages { offset: 0x8000, data: sparse.clone() }, true),
        ("zero", Frame::Zero(vec![(0x8000, 3), (0x20000, 1)]), false),
        ("round-end", Frame::RoundEnd { round: 1, pages: 42 }, false),
        ("state", Frame::State(Box::default()), false),
        ("done", Frame::Done { pages: 2, zero_pages: 4 }, false),
        ("ack-ok", Frame::Ack(Ack { ok: true, error: None }), false),
        ("ack-error", Frame::Ack(Ack { ok: false, error: Some("layout differs".into()) }), false),
        ("abort", Frame::Abort("source gave up".into()), false),
        ("checksums", Frame::Checksums(vec![0x1234_5678, 0, 0xffff_ffff]), false),
    ];
    let mut total = 0;
    let mut write = |name: &str, bytes: Vec<u8>| {
        let p = out.join(format!("seed-{name}"));
        std::fs::write(&p, &bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        total += bytes.len();
    };
    for (name, f, lz4) in singles {
        let bytes = encode(std::slice::from_ref(&f), lz4);
        // The seeds must be good frames, or they seed nothing deep.
        let (back, used) = smudge::migration::frame::decode_slice(&bytes).expect("seed decodes");
        assert_eq!((back, used), (f, bytes.len()), "seed {name} round-trips");
        write(name, bytes);
    }
    // A whole migration, in order with sequence numbers 0.., as the
    // destination reads it; once with page data compressed.
    let stream = |data: &[u8]| {
        vec![
            hello(64 << 20, 1),
            Frame::Pages { offset: 0, data: data.to_vec() },
            Frame::Zero(vec![(PAGE, 2)]),
            Frame::RoundEnd { round: 0, pages: 1 },
            Frame::State(Box::<MachineState>::default()),
            Frame::Done { pages: 1, zero_pages: 2 },
        ]
    };
    write("stream-raw", encode(&stream(&noise), false));
    write("stream-lz4", encode(&stream(&sparse), true));
    write("stream-abort", encode(&[hello(64 << 20, 1), Frame::Abort("cancelled".into())], false));
    println!("wrote {total} bytes of seeds to {}", out.display());
}
