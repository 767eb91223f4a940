//! How `smudge ctl` answers look to a person: a few aligned lines for
//! `stats`, `dirty-rate` and `migrate` (the JSON stays one `--json` away).

use serde_json::Value;

use crate::control::cli::CtlCommand;

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

/// One line for a snapshot taken.
fn snapshot(v: &Value) -> String {
    let f = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    format!(
        "{}{} snapshot {} in {}: {:.1} MiB of memory; vCPUs paused {:.2} ms ({:.1} MiB copied in the pause){}",
        if v.get("live").and_then(Value::as_bool) == Some(true) { "live " } else { "" },
        s("kind"),
        s("id"),
        s("dir"),
        f("memory_bytes") / 1048576.0,
        f("pause_ms"),
        f("pause_copied_bytes") / 1048576.0,
        if v.get("resumed").and_then(Value::as_bool) == Some(false) { "; left paused" } else { "" }
    )
}

/// Readable text for `answer` to `cmd`, or None where JSON is the best view.
pub fn render(cmd: &CtlCommand, answer: &Value) -> Option<String> {
    if answer.get("ok").and_then(Value::as_bool) != Some(true) {
        let e = answer.get("error").and_then(Value::as_str).unwrap_or("no error message");
        return Some(format!("error: {e}"));
    }
    match cmd {
        CtlCommand::Stats => Some(stats(answer)),
        CtlCommand::DirtyRate { .. } => Some(dirty_rate(answer)),
        CtlCommand::Migrate(_) => Some(migration_report(answer)),
        CtlCommand::Snapshot(_) => Some(snapshot(answer)),
        _ => None,
    }
}

fn stats(v: &Value) -> String {
    let mut out = format!(
        "vCPUs       {}{}\n",
        if v["paused"] == true { "paused" } else { "running" },
        v["job"].as_str().map(|j| format!("; busy with {j}")).unwrap_or_default()
    );
    if let Some(d) = v.get("dirty_log").filter(|d| d.is_object()) {
        out += &format!(
            "dirty log   {}: {:.0} harvests ({:.1} us each), {:.0} guest pages and {:.0} VMM pages dirtied, {:.0} ring-full exits\n",
            d["mechanism"].as_str().unwrap_or("?"),
            num(d, "harvests"),
            num(d, "harvest_us_avg"),
            num(d, "guest_pages"),
            num(d, "vmm_pages"),
            num(d, "ring_full_exits"),
        );
    }
    if let Some(w) = v.get("writeback").filter(|w| w.is_object()) {
        out += &format!(
            "writeback   {:.0} dirty, {:.0} under writeback, {:.0} written ({:.1} MiB), oldest dirty {:.0} ms, {:.0} syncs, {:.0} errors, throttled {:.0} ms\n",
            num(w, "nr_dirty"),
            num(w, "nr_writeback"),
            num(w, "nr_written"),
            num(w, "bytes_written") / 1048576.0,
            num(w, "oldest_dirty_ms"),
            num(w, "syncs"),
            num(w, "write_errors"),
            num(w, "throttle_ms"),
        );
    }
    if let Some(j) = v.get("journal").filter(|j| j.is_object()) {
        out += &format!(
            "journal     epoch {:.0} committed {} ago, {:.0} sealed, pause p50 {:.0} us p99 {:.0} us, {:.0} lengthened, {:.0} throttled, {:.1} MiB in segments{}\n",
            num(j, "newest_committed"),
            j["committed_age_ms"].as_u64().map_or("(none yet)".to_string(), |ms| format!("{ms} ms")),
            num(j, "sealed"),
            num(j, "pause_us_p50"),
            num(j, "pause_us_p99"),
            num(j, "lengthened"),
            num(j, "throttled"),
            num(j, "journal_bytes") / 1048576.0,
            j["error"].as_str().map(|e| format!("; FAILED: {e}")).unwrap_or_default(),
        );
    }
    if let Some(p) = v.get("progress").filter(|p| p.is_object()) {
        let sending = p.get("sending").and_then(Value::as_bool).unwrap_or(false);
        out += &format!(
            "migration   round {:.0}{}: {:.0} pages {}, {:.0} MB/s, {:.1} MiB sent, throttle {:.0}%\n",
            num(p, "round"),
            if sending { " sending" } else { "" },
            num(p, "remaining_pages"),
            if sending { "to go" } else { "dirty" },
            num(p, "rate_mbps"),
            num(p, "bytes_sent") / 1048576.0,
            num(p, "throttle_pct"),
        );
    }
    out.trim_end().to_string()
}

fn dirty_rate(v: &Value) -> String {
    let mut out = format!(
        "dirty rate  {:.0} pages/s = {:.1} MB/s over {:.2} s ({:.0} samples, {})\nworking set {:.0} pages ({:.1} MiB)",
        num(v, "pages_per_s"),
        num(v, "mb_per_s"),
        num(v, "seconds"),
        num(v, "samples"),
        v["mechanism"].as_str().unwrap_or("?"),
        num(v, "working_set_pages"),
        num(v, "working_set_mib"),
    );
    for c in v["per_vcpu"].as_array().into_iter().flatten() {
        out += &format!(
            "\n  vCPU {:<3} {:.0} pages/s = {:.1} MB/s",
            num(c, "vcpu"),
            num(c, "pages_per_s"),
            num(c, "mb_per_s")
        );
    }
    out
}

/// A migration report (the `migrate` answer) as a summary line and a table
/// of rounds: what `ctl migrate` prints and the source logs.
pub fn migration_report(v: &Value) -> String {
    let mut out = format!(
        "migrated to {} in {:.1} ms; downtime {:.2} ms{} (budget {:.0} ms); {:.1} MiB sent; converge: {}\n",
        v["to"].as_str().unwrap_or("?"),
        num(v, "total_ms"),
        num(v, "downtime_ms"),
        match v["stop_to_running_ms"].as_f64() {
            Some(ms) => format!(", {ms:.2} ms to the destination's guest running"),
            None => String::new(),
        },
        num(v, "downtime_budget_ms"),
        num(v, "bytes_sent") / 1048576.0,
        v["converge"].as_str().unwrap_or("?"),
    );
    out += "round    pages     zero       MiB        ms  throttle\n";
    for r in v["rounds"].as_array().into_iter().flatten() {
        out += &format!(
            "{:>5} {:>8.0} {:>8.0} {:>9.1} {:>9.1}  {}%{}\n",
            num(r, "round"),
            num(r, "pages"),
            num(r, "zero_pages"),
            num(r, "bytes") / 1048576.0,
            num(r, "ms"),
            num(r, "throttle_pct"),
            r.get("vcpu_throttle_pct").map(|p| format!(" per vCPU {p}")).unwrap_or_default()
        );
    }
    if let Some(c) = v.get("memory_crc32").and_then(Value::as_u64) {
        out += &format!("memory checksum {c:#010x} matched on the destination\n");
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn stats_read_at_a_glance_and_errors_say_error() {
        let v = json!({"ok": true, "paused": false, "job": null, "progress": null,
            "dirty_log": {"mechanism": "ring", "harvests": 3, "harvest_us_avg": 12.5, "guest_pages": 40,
                          "vmm_pages": 2, "ring_full_exits": 0}});
        let t = render(&CtlCommand::Stats, &v).unwrap();
        assert_eq!(t.lines().count(), 2, "{t}");
        assert!(t.contains("ring: 3 harvests (12.5 us each), 40 guest pages"), "{t}");
        let e = render(&CtlCommand::Stop, &json!({"ok": false, "error": "boom"})).unwrap();
        assert_eq!(e, "error: boom");
        assert!(render(&CtlCommand::Pause, &json!({"ok": true})).is_none());
    }

    #[test]
    fn dirty_rate_lists_vcpus() {
        let v = json!({"ok": true, "pages_per_s": 5000.0, "mb_per_s": 20.48, "seconds": 1.0, "samples": 10,
            "mechanism": "ring", "working_set_pages": 4900, "working_set_mib": 19.1,
            "per_vcpu": [{"vcpu": 0, "pages_per_s": 5000.0, "mb_per_s": 20.48}, {"vcpu": 1, "pages_per_s": 0.0, "mb_per_s": 0.0}]});
        let t = render(&CtlCommand::DirtyRate { seconds: 1.0 }, &v).unwrap();
        assert!(t.starts_with("dirty rate  5000 pages/s = 20.5 MB/s"), "{t}");
        assert!(t.contains("vCPU 1   0 pages/s"), "{t}");
    }
}
