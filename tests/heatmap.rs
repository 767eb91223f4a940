//! The dirty-page heatmap: `smudge run --heatmap FILE.svg` draws
//! an SVG of the requested size and writes the numbers behind it; a sweep
//! and a hot/cold workload differ where they should, in the data.

use serde_json::Value;
use smudge_testkit::*;

/// Runs the bundled guest with a heatmap; returns the SVG text and its data.
fn heatmap(workload: &str) -> (String, Value) {
    require_kvm();
    let dir = tmpdir();
    let svg = path(&dir, "map.svg");
    let r = run_smudge(&[
        "--in-place",
        "--mem-file",
        path(&dir, "m").to_str().unwrap(),
        "--mem-size",
        "256M",
        "--serial",
        "/dev/null",
        "--heatmap",
        svg.to_str().unwrap(),
        "--heatmap-buckets",
        "64",
        "--cmdline",
        workload,
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("heatmap of "), "{r:?}");
    let text = std::fs::read_to_string(&svg).unwrap();
    let data: Value = serde_json::from_slice(&std::fs::read(svg.with_extension("json")).unwrap()).unwrap();
    (text, data)
}

fn counts(data: &Value) -> Vec<Vec<u64>> {
    data["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect())
        .collect()
}

/// Which bucket holds the guest's working set start (4 MiB: the bundled
/// guest's table ends there) — buckets below are the loader and tables.
fn bucket_of(data: &Value, offset: u64) -> usize {
    (offset / data["bucket_bytes"].as_u64().unwrap()) as usize
}

#[test]
fn the_svg_has_the_size_asked_and_the_data_behind_it() {
    let (svg, data) = heatmap("workload=random pages=20000 ms=600");
    let root = &svg[svg.find("<svg").unwrap()..];
    let root = &root[..root.find('>').unwrap()];
    assert!(root.contains("width=\"1200\"") && root.contains("height=\"800\""), "{root}");
    assert!(svg.contains("workload=random pages=20000 ms=600"), "the title names the workload");
    assert_eq!(data["mem_size"], 256u64 << 20);
    assert_eq!(data["bucket_bytes"], 4u64 << 20);
    let c = counts(&data);
    assert!(c.len() >= 5 && c.iter().all(|p| p.len() == 64), "{} periods", c.len());
    assert_eq!(data["rates"].as_array().unwrap().len(), c.len());
}

#[test]
fn a_sweep_climbs_while_hot_cold_stays_low() {
    // A sweep of 60000 pages (234 MiB) at its natural speed takes several
    // periods per pass: the busiest bucket climbs through the first pass.
    let (_, sweep) = heatmap("workload=seq pages=60000 passes=1");
    let c = counts(&sweep);
    let ws = bucket_of(&sweep, 4 << 20);
    let busiest: Vec<usize> = c
        .iter()
        .filter(|p| p[ws..].iter().sum::<u64>() > 0)
        .map(|p| (ws..p.len()).max_by_key(|&b| p[b]).unwrap())
        .collect();
    assert!(busiest.len() >= 3, "the sweep took {} periods: {busiest:?}", busiest.len());
    assert!(busiest.windows(2).all(|w| w[0] <= w[1]), "busiest bucket per period: {busiest:?}");
    assert!(busiest.last().unwrap() - busiest[0] >= 10, "{busiest:?}");

    // Hot/cold: 90 % of writes to the first 10 % of 60000 pages (23 MiB
    // from 4 MiB up): those 6-7 buckets get most of the dirty pages.
    let (_, hc) = heatmap("workload=hotcold pages=60000 ms=1500");
    let c = counts(&hc);
    let per_bucket: Vec<u64> = (0..64).map(|b| c.iter().map(|p| p[b]).sum()).collect();
    let (hot_start, hot_end) = (bucket_of(&hc, 4 << 20), bucket_of(&hc, (4 << 20) + 6000 * 4096));
    // Per bucket of address space (a hot page counts once per period however
    // often it is written, so totals depend on the guest's speed; densities
    // do not): the hot band is far denser than the cold rest.
    let cold_end = bucket_of(&hc, (4 << 20) + 60000 * 4096);
    let density = |r: std::ops::Range<usize>| per_bucket[r.clone()].iter().sum::<u64>() as f64 / r.len() as f64;
    let (hot, cold) = (density(hot_start + 1..hot_end), density(hot_end + 1..cold_end));
    assert!(hot >= 3.0 * cold, "hot buckets {hot:.0} pages each, cold {cold:.0}: {per_bucket:?}");
    // And the sweep's pages spread over the whole working set, not a band.
    let sweep_total: Vec<u64> = (0..64).map(|b| counts(&sweep).iter().map(|p| p[b]).sum()).collect();
    let sweep_low: u64 = sweep_total[hot_start..=hot_end].iter().sum();
    let sweep_all: u64 = sweep_total[hot_start..].iter().sum();
    assert!(sweep_low * 4 < sweep_all, "{sweep_total:?}");
}
