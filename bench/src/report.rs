//! The benchmark report: raw results, and goals that
//! are ratios measured side by side in the same run.

use serde::Serialize;

/// One raw figure.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// What was measured.
    pub case: String,
    /// Metric with unit, e.g. `first_byte_ms`.
    pub metric: String,
    /// The value (a median where runs repeat); `null` in JSON (NaN here)
    /// when the case could not run, `note` saying why.
    pub value: f64,
    /// Between which two moments the figure is taken, where a peer's and
    /// smudge's figures are set side by side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brackets: Option<String>,
    /// Why there is no value (e.g. "not found": a peer's binary is absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A goal: a ratio and its target.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    /// What the ratio compares.
    pub name: String,
    /// Measured ratio.
    pub value: f64,
    /// Target ratio.
    pub target: f64,
    /// `lower` or `higher`.
    pub better: &'static str,
}

impl Goal {
    /// Whether the measured value is on the right side of the target.
    pub fn met(&self) -> bool {
        if self.better == "lower" {
            self.value <= self.target
        } else {
            self.value >= self.target
        }
    }
}

/// A whole benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Benchmark name.
    pub bench: String,
    /// Machine description.
    pub machine: String,
    /// Raw figures.
    pub results: Vec<BenchResult>,
    /// Goals.
    pub goals: Vec<Goal>,
}

impl Report {
    /// An empty report for `bench` on this machine.
    pub fn new(bench: &str) -> Self {
        Report { bench: bench.into(), machine: machine(), results: Vec::new(), goals: Vec::new() }
    }

    /// Adds a raw figure.
    pub fn result(&mut self, case: &str, metric: &str, value: f64) {
        self.results.push(BenchResult { case: case.into(), metric: metric.into(), value, brackets: None, note: None });
    }

    /// Adds a raw figure taken between the moments `brackets` names.
    pub fn bracketed(&mut self, case: &str, metric: &str, value: f64, brackets: &str) {
        self.result(case, metric, value);
        if let Some(r) = self.results.last_mut() {
            r.brackets = Some(brackets.into());
        }
    }

    /// Adds a row that has no figure, `note` saying why.
    pub fn missing(&mut self, case: &str, metric: &str, note: &str) {
        self.result(case, metric, f64::NAN);
        if let Some(r) = self.results.last_mut() {
            r.note = Some(note.into());
        }
    }

    /// Adds a goal.
    pub fn goal(&mut self, name: &str, value: f64, target: f64, better: &'static str) {
        self.goals.push(Goal { name: name.into(), value, target, better });
    }

    /// Prints JSON (one object) or a human table.
    pub fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(self)?);
            return Ok(());
        }
        println!("bench {} on {}", self.bench, self.machine);
        println!("{:<52} {:<22} {:>12}", "case", "metric", "value");
        for r in &self.results {
            match &r.note {
                Some(note) => println!("{:<52} {:<22} {:>12}", r.case, r.metric, note),
                None => println!("{:<52} {:<22} {:>12.3}", r.case, r.metric, r.value),
            }
            if let Some(b) = &r.brackets {
                println!("    brackets: {b}");
            }
        }
        println!();
        println!("{:<60} {:>9} {:>9} {:>6} {:>5}", "goal", "value", "target", "better", "met");
        for g in &self.goals {
            println!(
                "{:<60} {:>9.3} {:>9.3} {:>6} {:>5}",
                g.name,
                g.value,
                g.target,
                g.better,
                if g.met() { "yes" } else { "NO" }
            );
        }
        Ok(())
    }
}

/// Median of `v` (0 for an empty slice).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kvm = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm (nested, shadow paging)"
    } else if std::path::Path::new("/sys/module/kvm_intel").exists() {
        "kvm_intel"
    } else if std::path::Path::new("/sys/module/kvm_amd").exists() {
        "kvm_amd"
    } else {
        "kvm"
    };
    format!("{cores} cores, Linux {}, {kvm}", kernel.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_goals() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(Goal { name: "x".into(), value: 0.05, target: 0.1, better: "lower" }.met());
        assert!(!Goal { name: "x".into(), value: 0.5, target: 0.75, better: "higher" }.met());
    }

    #[test]
    fn a_missing_row_is_null_with_its_note() {
        let mut rep = Report::new("x");
        rep.missing("firecracker", "first_byte_ms", "not found");
        rep.bracketed("smudge", "first_byte_ms", 1.5, "spawn to first serial byte");
        let v = serde_json::to_value(&rep).unwrap();
        assert_eq!(
            v["results"],
            serde_json::json!([
                {"case": "firecracker", "metric": "first_byte_ms", "value": null, "note": "not found"},
                {"case": "smudge", "metric": "first_byte_ms", "value": 1.5, "brackets": "spawn to first serial byte"}
            ])
        );
    }
}
