//! Writes the seed corpus of every fuzz target, `CORPUS_DIR/TARGET/seed-*`
//! (default `corpus/` of this crate). Seeds are small, valid inputs made by
//! the library's own writers (`FrameWriter`, `write_full`, `begin_diff`) or
//! taken from the VMM's documentation and tests, and checked to pass the
//! parser they seed; they are the same bytes on every run.
//!
//! ```text
//! cargo run --example make_corpus [CORPUS_DIR]
//! ```

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events};
use smudge::guest_abi::Config;
use smudge::kvm::vcpu_state::{FpuState, VcpuState};
use smudge::migration::frame::{Ack, Frame, FrameWriter, Hello, PAGE};
use smudge::machine_state::{DeviceState, MachineState, UartState};
use smudge::snapshot::{begin_diff, parse_extents, parse_manifest, parse_state, write_full, Manifest};

/// Writes `TARGET/seed-NAME` files under the corpus directory.
struct Out {
    root: PathBuf,
    total: usize,
}

impl Out {
    fn write(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let p = dir.join(format!("seed-{name}"));
        std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        self.total += bytes.len();
    }
}

fn encode(frames: &[Frame], lz4: bool) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new(), lz4);
    for f in frames {
        w.send(f).expect("encoding a frame into a Vec");
    }
    std::mem::take(w.get_mut())
}

fn hello(mem_size: u64, vcpus: usize) -> Frame {
    Frame::Hello(Hello::new(mem_size, vcpus))
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

/// `migration_frame`: one valid frame of each kind per file, and whole
/// streams, all made by `FrameWriter`.
fn migration_frame(out: &mut Out) {
    let (sparse, noise) = pages();
    let singles: Vec<(&str, Frame, bool)> = vec![
        ("hello", hello(64 << 20, 2), false),
        ("hello-high-ram", hello(5 << 30, 4), false),
        ("pages-raw", Frame::Pages { offset: 0x3000, data: noise.clone() }, false),
        ("pages-lz4", Frame::Pages { offset: 0x8000, data: sparse.clone() }, true),
        ("zero", Frame::Zero(vec![(0x8000, 3), (0x20000, 1)]), false),
        ("round-end", Frame::RoundEnd { round: 1, pages: 42 }, false),
        ("state", Frame::State(Box::default()), false),
        (
            "state-vcpus",
            Frame::State(Box::new(MachineState { vcpus: vec![vcpu(0, true), vcpu(1, true)], ..Default::default() })),
            false,
        ),
        ("done", Frame::Done { pages: 2, zero_pages: 4 }, false),
        ("ack-ok", Frame::Ack(Ack::ok()), false),
        ("ack-running", Frame::Ack(Ack { running_at_unix_us: Some(1_764_000_000_123_456), ..Ack::ok() }), false),
        ("ack-error", Frame::Ack(Ack::refused("layout differs")), false),
        ("abort", Frame::Abort("source gave up".into()), false),
        ("checksums", Frame::Checksums(vec![0x1234_5678, 0, 0xffff_ffff]), false),
        ("postcopy", Frame::Postcopy(vec![(0, 16), (64 * PAGE, 8)]), false),
        ("page-request", Frame::PageRequest(vec![(3 * PAGE, 1)]), false),
    ];
    let mut write = |name: &str, bytes: Vec<u8>| {
        out.write("migration_frame", name, &bytes);
        // The same stream, sent over TLS by a peer (mode byte 0).
        out.write("migration_tls", name, &[&[0u8][..], &bytes].concat());
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
    // Post-copy, as the destination reads it: the owed pages, the state,
    // then the owed pages arriving.
    write(
        "stream-postcopy",
        encode(
            &[
                Frame::Hello(Hello { postcopy: true, ..Hello::new(64 << 20, 1) }),
                Frame::Postcopy(vec![(0, 16), (64 * PAGE, 8)]),
                Frame::State(Box::<MachineState>::default()),
                Frame::Pages { offset: 0, data: noise.repeat(16) },
                Frame::Zero(vec![(64 * PAGE, 8)]),
                Frame::Done { pages: 16, zero_pages: 8 },
            ],
            false,
        ),
    );
}

/// A vCPU stopped in the tiny guest's long-mode code, as `vcpu_state::save`
/// returns one (LAPIC registers only with an in-kernel irqchip).
fn vcpu(id: u8, lapic: bool) -> VcpuState {
    let code = kvm_segment {
        selector: 0x8,
        type_: 0xb,
        present: 1,
        s: 1,
        l: 1,
        g: 1,
        limit: 0xffff_ffff,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        present: 1,
        s: 1,
        db: 1,
        g: 1,
        limit: 0xffff_ffff,
        ..Default::default()
    };
    let sregs = kvm_sregs {
        cs: code,
        ds: data,
        es: data,
        ss: data,
        cr0: 0x8005_0033,
        cr3: 0x10_3000,
        cr4: 0x20,
        efer: 0x500,
        ..Default::default()
    };
    let regs = kvm_regs { rip: 0x10_0040 + u64::from(id), rsp: 0x1f_f000, rflags: 0x202, rax: 7, ..Default::default() };
    let mut apic = kvm_lapic_state::default();
    apic.regs[0x20 + 3] = id as _; // APIC ID
    apic.regs[0xf0] = 0xff_u8 as _; // spurious vector, enabled
    apic.regs[0xf1] = 1;
    VcpuState {
        id,
        regs,
        sregs,
        fpu: FpuState::from(&kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }),
        msrs: vec![(0x10, 0x1234_5678_9abc), (0x277, 0x0007_0406_0007_0406), (0xc000_0103, u64::from(id))],
        lapic: lapic.then_some(apic),
        mp_state: kvm_mp_state { mp_state: 0 },
        events: kvm_vcpu_events::default(),
    }
}

fn state(vcpus: &[VcpuState], in_buffer: &[u8]) -> MachineState {
    let com1 = UartState {
        baud_divisor_low: 1,
        interrupt_identification: 1,
        line_control: 3,
        line_status: 0x60,
        modem_control: 8,
        modem_status: 0xb0,
        in_buffer: in_buffer.to_vec(),
        ..Default::default()
    };
    MachineState { vcpus: vcpus.to_vec(), devices: DeviceState { com1: Some(com1) } }
}

/// A manifest with fixed ids and parent path and its checksum made right,
/// pretty-printed like the writer's: the same bytes on every run.
fn fixed_manifest(dir: &Path, id: &str, parent: Option<&str>) -> Vec<u8> {
    let p = dir.join("manifest.json");
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(&p).expect("manifest written")).expect("manifest");
    m.id = id.into();
    m.parent = parent.map(Into::into);
    m.parent_dir = parent.map(|p| PathBuf::from("/var/lib/smudge/snapshots").join(p));
    m.checksum = m.self_checksum();
    let bytes = serde_json::to_vec_pretty(&m).expect("serialize");
    assert_eq!(parse_manifest(&bytes, &p).expect("seed manifest parses"), m);
    bytes
}

/// `snapshot_manifest`, `snapshot_state` and `diff_extents`: the files of a
/// real full snapshot and a diff on top, written by the library from a
/// small sparse RAM file, plus states and tables it would write.
fn snapshots(out: &mut Out) {
    let tmp = std::env::temp_dir().join(format!("smudge-make-corpus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
    const MEM: u64 = 4 << 20;
    let mem_path = tmp.join("mem");
    let mem: File = OpenOptions::new().read(true).write(true).create_new(true).open(&mem_path).expect("RAM file");
    mem.set_len(MEM).expect("size the RAM file");
    mem.write_all_at(b"smudge fuzz seed", 0).expect("write RAM");
    mem.write_all_at(&[0xa5; 4096], 0x3000).expect("write RAM");
    let one = state(&[vcpu(0, false)], b"");
    let (full, _) = write_full(&tmp.join("full"), &mem, MEM, &one).expect("full snapshot");
    mem.write_all_at(&[0x5a; 4096], 0x3000).expect("write RAM");
    mem.write_all_at(&[0x77; 8192], 0x10000).expect("write RAM");
    let extents = [(0x3000, 0x1000), (0x10000, 0x2000)];
    begin_diff(&tmp.join("diff"), &full, &tmp.join("full"), &mem, &extents, &one)
        .and_then(|p| p.commit())
        .expect("diff snapshot");

    let full_bytes = fixed_manifest(&tmp.join("full"), "18f0c0ffee000001-2a", None);
    out.write("snapshot_manifest", "full", &full_bytes);
    // Refused since the checksum lists are checked: a sealed manifest with
    // no chunk checksums for memory.img (its data went unchecked).
    let mut short: Manifest = serde_json::from_slice(&full_bytes).expect("manifest");
    short.files.get_mut("memory.img").expect("memory.img listed").crc32.clear();
    short.checksum = short.self_checksum();
    let short = serde_json::to_vec_pretty(&short).expect("serialize");
    parse_manifest(&short, Path::new("manifest.json")).expect_err("a short checksum list is refused");
    out.write("snapshot_manifest", "refused-short-crc", &short);
    out.write(
        "snapshot_manifest",
        "diff",
        &fixed_manifest(&tmp.join("diff"), "18f0c0ffee000002-2a", Some("18f0c0ffee000001-2a")),
    );

    // The writer pretty-prints (a byte a line for the KVM structures);
    // the seeds are compact to stay small.
    let state_path = tmp.join("full/state.json");
    let written = std::fs::read(&state_path).expect("state written");
    let written = parse_state(&written, 1, &state_path).expect("seed state parses");
    assert_eq!(written, one);
    let lapic = state(&[vcpu(0, true)], b"ls\r");
    let two = state(&[vcpu(0, false), vcpu(1, false)], b"");
    // Before the UART was saved: no "devices".
    let mut old = serde_json::to_value(state(&[vcpu(0, false)], b"")).expect("serialize");
    old.as_object_mut().expect("an object").remove("devices");
    for (name, bytes, n) in [
        ("1vcpu", serde_json::to_vec(&one), 1),
        ("1vcpu-lapic", serde_json::to_vec(&lapic), 1),
        ("2vcpus", serde_json::to_vec(&two), 2),
        ("no-devices", serde_json::to_vec(&old), 1),
    ] {
        let bytes = bytes.expect("serialize");
        parse_state(&bytes, n, &state_path).expect("seed state parses");
        out.write("snapshot_state", name, &bytes);
    }

    // diff_extents: RAM size and memory.diff length (u64 LE each), then
    // the table.
    let ext_path = tmp.join("diff/extents.json");
    let table = |mem_size: u64, data_len: u64, json: &[u8]| {
        parse_extents(json, mem_size, data_len, &ext_path).expect("seed table parses");
        [&mem_size.to_le_bytes()[..], &data_len.to_le_bytes(), json].concat()
    };
    let refused = |mem_size: u64, data_len: u64, json: &[u8]| {
        parse_extents(json, mem_size, data_len, &ext_path).expect_err("seed table is refused");
        [&mem_size.to_le_bytes()[..], &data_len.to_le_bytes(), json].concat()
    };
    let written = std::fs::read(&ext_path).expect("extents written");
    out.write("diff_extents", "diff", &table(MEM, 0x3000, &written));
    // Refused since the tables are checked: restores used to write past
    // the end of RAM, or panic sizing a buffer to the length.
    out.write("diff_extents", "refused-outside-ram", &refused(1 << 20, 4096, b"[[1073741824,4096]]"));
    out.write("diff_extents", "refused-huge-len", &refused(1 << 20, 0, b"[[4096,18446744073709547520]]"));
    out.write("diff_extents", "refused-overlap", &refused(MEM, 0x3000, b"[[8192,8192],[12288,4096]]"));
    out.write("diff_extents", "empty", &table(MEM, 0, b"[]"));
    // Across the 3 GiB boundary of a 5 GiB RAM's file, compact JSON.
    let high: Vec<(u64, u64)> =
        vec![(0x1000, 0x1000), (0xbfff_f000, 0x1000), (0xc000_0000, 0x2000), (0x1_3fff_f000, 0x1000)];
    let json = serde_json::to_vec(&high).expect("serialize");
    out.write("diff_extents", "high-ram", &table(5 << 30, 0x5000, &json));
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `api_request`: request lines as `smudge ctl` sends them.
fn api_requests(out: &mut Out) {
    let lines = [
        ("stats", r#"{"cmd":"stats"}"#),
        ("sync", r#"{"cmd":"sync"}"#),
        ("pause", r#"{"cmd":"pause"}"#),
        ("resume", r#"{"cmd":"resume"}"#),
        ("stop", r#"{"cmd":"stop"}"#),
        ("snapshot", r#"{"cmd":"snapshot","dir":"/var/lib/smudge/s1","resume":false}"#),
        ("snapshot-diff", r#"{"cmd":"snapshot","dir":"s2","parent":"s1"}"#),
        (
            "migrate",
            r#"{"cmd":"migrate","to":"10.0.0.2:7700","downtime_ms":300,"max_rounds":30,"bandwidth_limit":125000000,"compress":"lz4","auto_converge":true,"verify_memory":true}"#,
        ),
        ("migrate-min", r#"{"cmd":"migrate","to":"[::1]:7700","compress":"none","max_rounds":null}"#),
        ("dirty-rate", r#"{"cmd":"dirty-rate","seconds":0.25}"#),
        ("snapshot-live", r#"{"cmd":"snapshot","dir":"/s/3","live":true,"pause_budget_ms":25}"#),
        (
            "migrate-all",
            r#"{"cmd":"migrate","to":"h:1","local":false,"postcopy_after":2,"connections":8,"auto_converge":false}"#,
        ),
        ("typo", r#"{"cmd":"snapshot","dir":"D","parnet":"P"}"#),
        ("wrong-type", r#"{"cmd":"snapshot","dir":"D","resume":"yes"}"#),
        ("unknown", r#"{"cmd":"reboot"}"#),
        ("not-json", "stats please"),
    ];
    for (name, line) in lines {
        out.write("api_request", name, format!("{line}\n").as_bytes());
    }
}

/// `guest_cmdline`: command lines the tests and benchmarks boot with (the
/// VMM appends `tsc_khz=`).
fn guest_cmdlines(out: &mut Out) {
    let lines = [
        ("default", ""),
        ("seq", "workload=seq passes=3 sync=1 tsc_khz=2400000"),
        ("random", "workload=random pages=12000 writes=60000 seed=5 verify=1 tsc_khz=2400000"),
        ("hotcold", "workload=hotcold hot_pct=10 hot_share=99 ms=1500 tsc_khz=0x249f00"),
        ("rate", "workload=rate pages=4000 rate=5k ms=3000 seed=6 verify=yes linger=100 tsc_khz=2m"),
        ("stride", "workload=stride pages=4096 stride=64 offset=63 run=2 passes=2 wipe=1"),
        ("idle", "workload=idle ms=10000 poke=0x80 fault=0 tsc_khz=2400000"),
        ("verify", "workload=verify pages=2000"),
        ("triple", "workload=random pages=2000 writes=20000 seed=7 fault=triple"),
        ("bad", "workload=nonsense console=ttyS0"),
    ];
    for (name, line) in lines {
        assert_eq!(Config::parse(line).is_ok(), name != "bad", "seed '{line}'");
        out.write("guest_cmdline", name, line.as_bytes());
    }
}

fn main() {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    let mut out = Out { root, total: 0 };
    migration_frame(&mut out);
    snapshots(&mut out);
    api_requests(&mut out);
    guest_cmdlines(&mut out);
    println!("wrote {} bytes of seeds to {}", out.total, out.root.display());
}
