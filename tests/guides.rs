//! The README's guides, run as written: each guide's commands sit in one
//! code block after a `<!-- guide: NAME -->` marker; a shell guide is run
//! with `bash -euo pipefail` in an empty directory with the `smudge` cargo
//! built first on `PATH` (what the README's set-up lines do), and must exit
//! 0 leaving no process behind, with the outcomes it promises on disk. The
//! harness guide is Rust: it is compiled and run here as a module, and the
//! README must show exactly that module's text. The command-line reference
//! the README links to (`docs/cli.md`) is checked against `smudge --help`.

#[path = "guides/harness.rs"]
mod harness_guide;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const README: &str = include_str!("../README.md");
const CLI_REFERENCE: &str = include_str!("../docs/cli.md");
const HARNESS_GUIDE: &str = include_str!("guides/harness.rs");

/// Every guide the README has, and the language of its block.
const GUIDES: [(&str, &str); 5] =
    [("snapshot", "sh"), ("durable", "sh"), ("migrate", "sh"), ("harness", "rust"), ("watch", "sh")];

/// How long a guide may run before the test gives up on it: the slowest
/// takes about 25 s on an idle machine and 2 minutes at a load of 16 on 2
/// cores (its guests pace their writes by the clock and lose the ones a
/// descheduled vCPU misses).
const GUIDE_LIMIT: Duration = Duration::from_secs(600);

/// The code block after `<!-- guide: NAME -->`, and the language its fence names.
fn guide_block(name: &str) -> (String, String) {
    let marker = format!("<!-- guide: {name} -->");
    let mut lines = README.lines().skip_while(|l| l.trim() != marker);
    assert!(lines.next().is_some(), "README.md has no `{marker}`");
    let fence = lines.next().unwrap_or_default();
    let lang =
        fence.strip_prefix("```").unwrap_or_else(|| panic!("`{marker}` is not followed by a code fence: {fence:?}"));
    let mut body = String::new();
    for line in lines.by_ref() {
        if line == "```" {
            return (lang.to_string(), body);
        }
        body.push_str(line);
        body.push('\n');
    }
    panic!("the block after `{marker}` never ends");
}

/// A shell guide that ran: where, and what it printed.
struct GuideRun {
    name: &'static str,
    script: String,
    /// The guide's working directory (the files it made).
    work: PathBuf,
    /// The shell's pid: `$$` in the guide.
    shell_pid: u32,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// Holds the directories until the test ends.
    _root: tempfile::TempDir,
}

impl GuideRun {
    /// The text of a file the guide made, or a failure naming it.
    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.work.join(name)).unwrap_or_else(|e| panic!("{name}: {e}\n{self}"))
    }

    /// The one line of `file` that starts with `prefix`.
    fn line(&self, file: &str, prefix: &str) -> String {
        let text = self.file(file);
        let found: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
        assert_eq!(found.len(), 1, "{file}: want one line starting {prefix:?}\n{self}");
        found[0].to_string()
    }
}

impl std::fmt::Display for GuideRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "guide {:?} exited with {:?} in {}", self.name, self.code, self.work.display())?;
        writeln!(f, "--- script ---\n{}", self.script)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        writeln!(f, "--- stderr ---\n{}", self.stderr)?;
        let mut names: Vec<String> = std::fs::read_dir(&self.work)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        writeln!(f, "--- files: {} ---", names.join(" "))?;
        for n in names.iter().filter(|n| n.ends_with(".serial") || n.ends_with(".log")) {
            let text = std::fs::read_to_string(self.work.join(n)).unwrap_or_default();
            writeln!(f, "--- {n} ---\n{text}")?;
        }
        Ok(())
    }
}

/// Whether any process of group `pgid` is still there.
fn group_alive(pgid: u32) -> bool {
    Command::new("kill")
        .args(["-0", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn kill_group(pgid: u32) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
}

/// Runs shell guide `name` in a fresh directory and checks it exited 0
/// and left no process running.
fn run_guide(name: &'static str) -> GuideRun {
    let (lang, script) = guide_block(name);
    assert_eq!(lang, "sh", "guide {name} should be a shell block");
    run_script(name, script)
}

/// Runs `script` as a guide runs: in a fresh directory, the `smudge` cargo
/// built first on `PATH`; checks it exited 0 and left no process running.
fn run_script(name: &'static str, script: String) -> GuideRun {
    smudge_testkit::require_kvm();
    let root = smudge_testkit::tmpdir();
    let work = root.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let smudge = Path::new(env!("CARGO_BIN_EXE_smudge"));
    let bin_dir = smudge.parent().unwrap();
    let path = match std::env::var_os("PATH") {
        Some(p) => std::env::join_paths(std::iter::once(bin_dir.to_path_buf()).chain(std::env::split_paths(&p))),
        None => std::env::join_paths([bin_dir]),
    }
    .unwrap();
    let (out_path, err_path) = (root.path().join("stdout"), root.path().join("stderr"));
    // Its own process group: the guide's background processes are in it,
    // so none can outlive a failed run.
    let mut child = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(&work)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .process_group(0)
        .spawn()
        .expect("spawn bash");
    let pgid = child.id();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t0.elapsed() > GUIDE_LIMIT {
            kill_group(pgid);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let left_running = group_alive(pgid);
    kill_group(pgid);
    let run = GuideRun {
        name,
        script,
        work,
        shell_pid: pgid,
        code: status.and_then(|s| s.code()),
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        _root: root,
    };
    assert!(status.is_some(), "guide {name} still ran after {GUIDE_LIMIT:?}\n{run}");
    assert_eq!(run.code, Some(0), "{run}");
    assert!(!left_running, "guide {name} left processes running\n{run}");
    run
}

/// The verify line of a guest that checked all 10000 pages of its working
/// set and found each as it last wrote it.
fn assert_verified(run: &GuideRun, serial: &str) {
    let done = run.line(serial, "workload rate done: ");
    assert!(done.contains(" writes=40000 ") && done.ends_with(" total_writes=40000"), "{serial}: {done}\n{run}");
    let verify = run.line(serial, "verify: ");
    assert!(
        verify.starts_with("verify: pages=10000 ok=10000 ") && verify.ends_with(" mismatches=0"),
        "{serial}\n{run}"
    );
    assert_eq!(run.line(serial, "exit status="), "exit status=0", "{run}");
}

#[test]
fn the_readme_has_these_guides_each_once() {
    let markers: Vec<&str> = README.lines().filter(|l| l.starts_with("<!-- guide:")).collect();
    let want: Vec<String> = GUIDES.iter().map(|(n, _)| format!("<!-- guide: {n} -->")).collect();
    assert_eq!(markers, want);
    for (name, lang) in GUIDES {
        assert_eq!(guide_block(name).0, lang, "guide {name}");
    }
}

#[test]
fn each_shell_guide_names_its_files_its_own_way() {
    for (name, prefix) in [("snapshot", "snap"), ("durable", "dur"), ("migrate", "mig-"), ("watch", "watch")] {
        let (_, script) = guide_block(name);
        let files: Vec<&str> = script
            .split(|c: char| c.is_whitespace() || "\"'(),;:".contains(c))
            .filter(|w| [".mem", ".sock", ".serial", ".log", ".svg", ".json"].iter().any(|e| w.ends_with(e)))
            .collect();
        assert!(!files.is_empty(), "guide {name} names no files");
        for f in files {
            // Relative names in the scratch directory, or tmpfs for a lazy restore.
            assert!(
                f.starts_with(prefix) || f.starts_with("/dev/shm/snap-"),
                "guide {name}: file {f:?} is not {prefix}*"
            );
        }
    }
}

#[test]
fn snapshot_guide_runs_as_written() {
    let run = run_guide("snapshot");
    let lazy_mem = PathBuf::from(format!("/dev/shm/snap-lazy-{}.mem", run.shell_pid));
    let lazy_left = lazy_mem.exists();
    let _ = std::fs::remove_file(&lazy_mem);
    assert!(!lazy_left, "the guide should remove {}\n{run}", lazy_mem.display());

    assert!(run.stdout.contains("\nchain of 2 snapshot(s) verified\n"), "{run}");
    assert!(run.stdout.contains("snap-merged: full snapshot "), "{run}");
    for dir in ["snap-full", "snap-d1", "snap-merged"] {
        assert!(run.work.join(dir).join("manifest.json").is_file(), "{dir}\n{run}");
    }
    // The source stopped paused, before its workload ended: its guest
    // never printed a verify line (stdout), each restored copy did.
    assert!(!run.stdout.lines().any(|l| l.starts_with("verify:")), "{run}");
    for serial in ["snap-restored.serial", "snap-lazy.serial"] {
        assert_verified(&run, serial);
        let shown = format!("{serial}:{}", run.line(serial, "verify: "));
        assert!(run.stdout.lines().any(|l| l == shown), "the guide's grep shows {shown:?}\n{run}");
    }
    assert!(run.stderr.contains("smudge: lazy restore: the guest runs "), "{run}");
}

#[test]
fn durable_guide_runs_as_written() {
    let run = run_guide("durable");
    // Killed mid-workload: the source's guest never verified; both
    // recovered copies did, from two different epochs.
    assert!(!run.file("dur.serial").contains("verify:"), "{run}");
    for serial in ["dur-restored.serial", "dur-rewound.serial"] {
        assert_verified(&run, serial);
    }
    assert!(run.stdout.contains("recoverable: epochs 1..="), "{run}");
    let epochs: Vec<u64> =
        run.stderr.lines().filter_map(|l| l.split(": epoch ").nth(1)?.split(' ').next()?.parse().ok()).collect();
    assert!(epochs.len() == 2 && epochs[0] >= 100 && epochs[1] < epochs[0], "recovered {epochs:?}\n{run}");
}

#[test]
fn migrate_guide_runs_as_written() {
    let run = run_guide("migrate");
    assert!(run.stderr.contains("smudge: guest migrated to 127.0.0.1:"), "{run}");
    assert!(run.file("mig-dest.log").contains("smudge: migration from 127.0.0.1:"), "{run}");
    // The source's guest never got to its verify (stdout); the
    // destination's did, and the guide's grep shows that line alone.
    assert_verified(&run, "mig-dest.serial");
    let verify: Vec<&str> = run.stdout.lines().filter(|l| l.starts_with("verify:")).collect();
    assert_eq!(verify, [run.line("mig-dest.serial", "verify: ")], "{run}");
}

#[test]
fn watch_guide_runs_as_written() {
    let run = run_guide("watch");
    assert!(run.stdout.lines().any(|l| l.starts_with("dirty rate ") && l.contains(" pages/s = ")), "{run}");
    assert!(run.stdout.lines().any(|l| l.starts_with("working set ")), "{run}");
    assert!(run.stdout.lines().any(|l| l.starts_with("writeback ")), "{run}");
    assert!(run.stdout.contains("\"stopping\": true"), "{run}");
    assert!(run.file("watch-map.svg").starts_with("<svg"), "{run}");
    let data: serde_json::Value = serde_json::from_str(&run.file("watch-map.json")).unwrap();
    let periods = data["counts"].as_array().unwrap_or_else(|| panic!("watch-map.json has no counts\n{run}"));
    assert!(!periods.is_empty() && periods.iter().all(|p| p.is_array()), "{run}");
    assert!(run.stderr.contains("smudge: stopped by the control API"), "{run}");
}

#[test]
fn the_readme_shows_the_harness_guide_this_test_runs() {
    let (_, shown) = guide_block("harness");
    let module: String =
        HARNESS_GUIDE.lines().skip_while(|l| l.starts_with("//!") || l.is_empty()).fold(String::new(), |mut s, l| {
            s.push_str(l);
            s.push('\n');
            s
        });
    assert_eq!(shown, module, "README.md's harness guide differs from tests/guides/harness.rs");
}

/// What `smudge ARGS --help` prints.
fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_smudge")).args(args).arg("--help").output().expect("run smudge");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "smudge {} --help: {:?}\n{text}", args.join(" "), out.status);
    text
}

/// The flags `smudge ARGS --help` lists (an option line, not a
/// description line under it), `--help` and `--version` left out.
fn help_flags(args: &[&str]) -> BTreeSet<String> {
    help(args)
        .lines()
        .filter(|l| l.len() - l.trim_start().len() < 10)
        .map(|l| l.trim_start().trim_start_matches("-h, ").trim_start_matches("-V, "))
        .filter(|l| l.starts_with("--"))
        .filter_map(|l| l.split([' ', ',']).next())
        .filter(|f| !["--help", "--version"].contains(f))
        .map(str::to_string)
        .collect()
}

/// The flags in the table right under `heading` in docs/cli.md (up to the
/// next heading): rows that start with a flag in backquotes.
fn documented_flags(heading: &str) -> BTreeSet<String> {
    let mut lines = CLI_REFERENCE.lines().skip_while(|l| *l != heading);
    assert!(lines.next().is_some(), "docs/cli.md has no heading {heading:?}");
    lines
        .take_while(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("| `--"))
        .map(|rest| format!("--{}", rest.split(['`', ' ']).next().unwrap_or_default()))
        .collect()
}

#[test]
fn the_cli_reference_lists_every_command() {
    let top = help(&[]);
    let commands: Vec<&str> = top
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 7, "smudge --help lists {commands:?}\n{top}");
    for c in commands {
        let heading = format!("## `smudge {c}`");
        assert!(CLI_REFERENCE.lines().any(|l| l == heading), "docs/cli.md has no {heading:?}");
    }
}

#[test]
fn the_cli_reference_lists_every_flag() {
    let run = help_flags(&["run"]);
    let sections: [(&str, &[&str]); 8] = [
        ("## `smudge run`", &["run"]),
        ("## `smudge restore`", &["restore"]),
        ("## `smudge migrate-recv`", &["migrate-recv"]),
        ("## `smudge ctl`", &["ctl"]),
        ("### `smudge ctl snapshot create`", &["ctl", "snapshot", "create"]),
        ("### `smudge ctl migrate`", &["ctl", "migrate"]),
        ("### `smudge ctl dirty-rate`", &["ctl", "dirty-rate"]),
        ("## `smudge bench`", &["bench"]),
    ];
    for (heading, args) in sections {
        let mut want = help_flags(args);
        assert!(!want.is_empty(), "smudge {} --help lists no flags", args.join(" "));
        // restore and migrate-recv take every run flag; their tables give
        // only their own and say so.
        if args[0] != "run" && want.is_superset(&run) {
            want.retain(|f| !run.contains(f));
        }
        assert_eq!(documented_flags(heading), want, "docs/cli.md {heading} against smudge {} --help", args.join(" "));
    }
}

/// The README's first command, as written but for two things: the binary
/// cargo built for this test stands for `cargo run … --`, and its `/tmp/`
/// files land in the scratch directory. The guest's 20000 first writes to
/// a new memory file take seconds here (~180 µs each), so it still runs at
/// the 200 ms the snapshot is taken at.
#[test]
fn the_readmes_first_command_boots_and_snapshots() {
    let cargo_run = "cargo run --release -p smudge-vmm -- ";
    let line = README.lines().find(|l| l.contains(cargo_run)).expect("README.md has no `cargo run` command");
    let run = run_script("command 1", line.replace(cargo_run, "smudge ").replace("/tmp/", ""));
    let snapshots: Vec<PathBuf> = std::fs::read_dir(run.work.join("smudge-snapshots"))
        .unwrap_or_else(|e| panic!("smudge-snapshots: {e}\n{run}"))
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(snapshots.len(), 1, "{snapshots:?}\n{run}");
    assert!(snapshots[0].join("manifest.json").is_file(), "{run}");
    assert!(run.stderr.contains("smudge: snapshot ") && run.stderr.contains(" vCPUs paused "), "{run}");
    assert!(run.stderr.contains("smudge: guest exited with status 0 after "), "{run}");
    let verify: Vec<&str> = run.stdout.lines().filter(|l| l.starts_with("verify: ")).collect();
    assert!(verify.len() == 1 && verify[0].ends_with(" mismatches=0"), "{run}");
    let check = Command::new(env!("CARGO_BIN_EXE_smudge"))
        .args(["snapshot", "verify"])
        .arg(&snapshots[0])
        .output()
        .expect("run smudge snapshot verify");
    assert!(check.status.success(), "{}\n{run}", String::from_utf8_lossy(&check.stderr));
}
