//! Fuzzes the guest's command-line parser, `guest_abi::Config::parse`, on
//! any UTF-8 (the guest reads up to 4 KiB from the PVH start info; the VMM
//! passes `--cmdline` through), and the guest-abi layout helpers the guest
//! then runs on what it parsed.
//!
//! Checked: no panic; an error names a word of the input; an accepted
//! config keeps its invariants, reads back the same once written out again,
//! and every page of its working set is RAM (either side of the 32-bit hole).
#![no_main]

use libfuzzer_sys::fuzz_target;
use smudge::guest_abi::{stride_pages, CmdlineError, Config, RamMap, WsLayout, MAPPED_LIMIT, PAGE_SIZE};

/// `c` as a command line, every key spelled out.
fn to_cmdline(c: &Config) -> String {
    let mut s = format!(
        "workload={} seed={} passes={} ms={} hot_pct={} hot_share={} rate={} stride={} offset={} run={} \
         sync={} verify={} linger={} tsc_khz={} wipe={} fault={}",
        c.workload.name(),
        c.seed,
        c.passes,
        c.ms,
        c.hot_pct,
        c.hot_share,
        c.rate,
        c.stride,
        c.offset,
        c.run,
        u8::from(c.sync),
        u8::from(c.verify),
        c.linger,
        c.tsc_khz,
        u8::from(c.wipe),
        c.fault.name(),
    );
    for (k, v) in [("pages", c.pages), ("ws_base", c.ws_base), ("writes", c.writes), ("poke", c.poke.map(u64::from))] {
        if let Some(v) = v {
            s.push_str(&format!(" {k}={v}"));
        }
    }
    s
}

/// Whether `part` is a slice of `whole` (errors borrow from the input).
fn within(part: &str, whole: &str) -> bool {
    let (p, w) = (part.as_ptr() as usize, whole.as_ptr() as usize);
    p >= w && p + part.len() <= w + whole.len()
}

/// What `guest/src/workload.rs` computes from the config before it writes:
/// every page of the working set must be RAM in `map`, every page it stamps
/// in it.
fn layout(c: &Config, map: &RamMap) {
    let pages = c.pages.unwrap_or_else(|| c.ws_base.map_or_else(|| map.max_pages(), |b| map.pages_from(b)));
    let Ok(l) = WsLayout::new(map, c.ws_base, pages) else {
        return; // the guest refuses it (BAD_CMDLINE or NO_MEMORY)
    };
    let high = map.high.unwrap_or((0, 0));
    for i in [0, l.low_pages().saturating_sub(1), l.low_pages().min(pages - 1), pages - 1] {
        let a = l.page_addr(i);
        let ram = (a >= 0x10_0000 && a + PAGE_SIZE <= map.low_end) || (a >= high.0 && a + PAGE_SIZE <= high.1);
        assert!(ram, "page {i} of {pages} at {a:#x} is not RAM in {map:?}");
    }
    // A pass of `stride` (only its start: a pass can be all of RAM).
    for i in stride_pages(pages, c.stride, c.offset, c.run).take(4096) {
        assert!(i < pages, "stride writes page {i} of {pages}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    match Config::parse(line) {
        Ok(c) => {
            assert!((1..=100).contains(&c.hot_pct) && c.hot_share <= 100, "{c:?}");
            assert!(c.stride >= 1 && c.run >= 1, "{c:?}");
            let text = to_cmdline(&c);
            assert_eq!(Config::parse(&text), Ok(c), "written out as '{text}'");
            for mem_size in [16 << 20, 3 << 30, (3 << 30) + (64 << 20), MAPPED_LIMIT - (1 << 30)] {
                layout(&c, &RamMap::for_mem_size(mem_size));
            }
        }
        Err(CmdlineError::UnknownKey(k)) => {
            assert!(within(k, line) && !k.contains(' ') && !k.contains('='), "unknown key '{k}'");
        }
        Err(CmdlineError::BadValue(w)) => {
            assert!(within(w, line) && !w.is_empty() && !w.contains(' '), "bad value '{w}'");
        }
    }
});
