//! Snapshots that fail: a directory that cannot hold one is refused before
//! anything is written (an empty path wrote the files into smudge's working
//! directory), and a snapshot that fails at any later step — out of room
//! while copying, at the commit, full, diff or live — leaves no files and
//! leaves the run's chain as it was: a diff on the last good snapshot then
//! holds every page written since it, and the chain restores to exactly the
//! guest's memory.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use smudge_testkit::*;

/// One request line sent as is (`smudge ctl` refuses an empty path itself).
fn raw(sock: &Path, line: &str) -> Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{line}: {e}: {answer:?}"))
}

fn snapshot(sock: &Path, dir: &Path, parent: Option<&Path>, live: bool) -> Value {
    let mut args = vec!["snapshot", "create", dir.to_str().unwrap()];
    if let Some(p) = parent {
        args.extend(["--parent", p.to_str().unwrap()]);
    }
    if live {
        args.push("--live");
    }
    ctl(sock, &args)
}

/// The names in `dir` (none when it does not exist).
fn names(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    }
}

/// The running VM, its working directory and its stderr file.
struct Vm {
    child: Child,
    sock: PathBuf,
    mem: PathBuf,
    cwd: PathBuf,
    stderr: PathBuf,
}

impl Vm {
    fn start(dir: &tempfile::TempDir) -> Vm {
        let (mem, sock, cwd, stderr) = (path(dir, "m"), path(dir, "api.sock"), path(dir, "cwd"), path(dir, "stderr"));
        std::fs::create_dir(&cwd).unwrap();
        // A slow writer that runs far longer than the test: it is paused by
        // the last snapshot and stopped.
        let cmdline = "workload=rate rate=300 pages=4000 seed=31 ms=600000 wipe=1";
        let mut cmd = smudge();
        cmd.current_dir(&cwd)
            .args(["run", "--in-place", "--mem-file", mem.to_str().unwrap(), "--mem-size", "64M", "--timeout", "300"])
            .args(["--api-sock", sock.to_str().unwrap(), "--cmdline", cmdline])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let child = spawn_with_api(&mut cmd, &sock, WAIT).unwrap_or_else(|e| {
            let log = std::fs::read_to_string(&stderr).unwrap_or_default();
            panic!("{}; smudge said:\n{log}", error_chain(&e))
        });
        Vm { child, sock, mem, cwd, stderr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Checks a refused snapshot: its error holds every one of `says`,
    /// nothing is left in `dir` or smudge's working directory, the guest
    /// runs on.
    fn refused(&self, r: &Value, dir: &Path, says: &[&str]) {
        assert_eq!(r["ok"], false, "{r}");
        let e = r["error"].as_str().unwrap_or_else(|| panic!("{r}"));
        for s in says {
            assert!(e.contains(s), "the error should say {s:?}: {e}");
        }
        assert_eq!(names(dir), Vec::<String>::new(), "a failed snapshot left files in {}: {r}", dir.display());
        assert_eq!(names(&self.cwd), Vec::<String>::new(), "a failed snapshot wrote into smudge's working directory");
        let s = ctl(&self.sock, &["stats"]);
        assert_eq!(s["paused"], false, "the guest runs on after: {r}\n{s}");
    }
}

#[test]
fn a_failed_snapshot_at_any_step_writes_nothing_and_keeps_the_chain() {
    require_kvm();
    let dir = tmpdir();
    let mut vm = Vm::start(&dir);
    let sock = vm.sock.clone();
    let s0 = path(&dir, "s0");
    let r = snapshot(&sock, &s0, None, false);
    assert_eq!(r["ok"], true, "{r}\n{}", vm.log());
    let s0_img = std::fs::read(s0.join("memory.img")).unwrap();

    // Refused before anything is written.
    let r = raw(&sock, r#"{"cmd":"snapshot","dir":""}"#);
    vm.refused(&r, &vm.cwd, &["snapshot directory ''", "an empty path"]);
    let r =
        raw(&sock, r#"{"cmd":"snapshot","dir":"","parent":"PARENT"}"#.replace("PARENT", s0.to_str().unwrap()).as_str());
    vm.refused(&r, &vm.cwd, &["an empty path"]);
    let deep = path(&dir, "no/such/snap");
    vm.refused(&snapshot(&sock, &deep, None, false), &path(&dir, "no"), &["no/such", "parent directory"]);
    let taken = path(&dir, "taken");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("keep"), b"mine").unwrap();
    let r = snapshot(&sock, &taken, None, false);
    assert!(r["error"].as_str().unwrap_or_default().contains("exists and is not empty"), "{r}");
    assert_eq!(names(&taken), ["keep"]);
    assert_eq!(std::fs::read(taken.join("keep")).unwrap(), b"mine");
    let ro = Tmpfs::mount(&path(&dir, "ro"), "ro,size=64m");
    vm.refused(
        &snapshot(&sock, &ro.0.join("full"), None, false),
        &ro.0,
        &["ro/full", "cannot be created", "Read-only"],
    );
    vm.refused(&snapshot(&sock, &ro.0.join("d"), Some(&s0), false), &ro.0, &["Read-only"]);
    vm.refused(&snapshot(&sock, &ro.0.join("live"), None, true), &ro.0, &["Read-only"]);

    // Out of room while copying: one page of space.
    let tiny = Tmpfs::mount(&path(&dir, "tiny"), "size=4k");
    vm.refused(&snapshot(&sock, &tiny.0.join("full"), None, false), &tiny.0, &["No space left", "tiny/full"]);
    vm.refused(&snapshot(&sock, &tiny.0.join("d"), Some(&s0), false), &tiny.0, &["No space left", "tiny/d"]);
    vm.refused(&snapshot(&sock, &tiny.0.join("live"), None, true), &tiny.0, &["No space left", "tiny/live"]);

    // At the commit: room for the data files, no inode left for the
    // manifest (a tmpfs's root takes one, the snapshot directory another).
    let full_inodes = Tmpfs::mount(&path(&dir, "i4"), "size=256m,nr_inodes=4");
    let at_commit = ["manifest.json.tmp", "No space left"];
    vm.refused(&snapshot(&sock, &full_inodes.0.join("full"), None, false), &full_inodes.0, &at_commit);
    vm.refused(&snapshot(&sock, &full_inodes.0.join("live"), None, true), &full_inodes.0, &at_commit);
    let diff_inodes = Tmpfs::mount(&path(&dir, "i5"), "size=256m,nr_inodes=5");
    vm.refused(&snapshot(&sock, &diff_inodes.0.join("d"), Some(&s0), false), &diff_inodes.0, &at_commit);

    // The guest has written since s0 (it writes 300 pages a second): the
    // diff below has pages to carry.
    let t0 = Instant::now();
    while std::fs::read(&vm.mem).unwrap() == s0_img {
        assert!(t0.elapsed() < Duration::from_secs(60), "the guest wrote nothing after s0; smudge said:\n{}", vm.log());
        std::thread::sleep(Duration::from_millis(20));
    }

    // The chain is as it was: a diff on s0 is taken (paused, then stop),
    // and s0 + diff is exactly the guest's memory.
    let d1 = path(&dir, "d1");
    let args = ["snapshot", "create", d1.to_str().unwrap(), "--parent", s0.to_str().unwrap(), "--no-resume"];
    let r = ctl(&sock, &args);
    assert_eq!((r["ok"].clone(), r["kind"].clone()), (true.into(), "diff".into()), "{r}\n{}", vm.log());
    assert!(r["memory_bytes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(ctl(&sock, &["stop"])["ok"], true);
    let st = vm.child.wait().unwrap();
    assert_eq!(st.code(), Some(0), "{}", vm.log());
    assert_eq!(names(&vm.cwd), Vec::<String>::new());
    let out = smudge().args(["snapshot", "verify", d1.to_str().unwrap()]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("chain of 2 snapshot(s) verified"), "{out:?}");
    let back = path(&dir, "back");
    smudge::snapshot::materialize(&d1, &back).unwrap();
    assert!(
        std::fs::read(&back).unwrap() == std::fs::read(&vm.mem).unwrap(),
        "s0 + the diff differ from the guest's memory at the diff: a failed snapshot lost pages"
    );
}
