//! The `smudge` binary: the command-line edge of the VMM.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use smudge::writeback::WritebackPolicy;
use smudge_vmm::control::bench;
use smudge_vmm::control::cli::{
    Cli, Command, CtlArgs, CtlCommand, JournalCommand, MigrateRecvArgs, RestoreArgs, RunArgs, SnapshotCommand,
    SnapshotCtl,
};
use smudge_vmm::control::signals;
use smudge_vmm::observe::tracking::DirtyOptions;
use smudge_vmm::persist::flusher::WritebackOptions;
use smudge_vmm::vm::guest_image::{DEFAULT_CMDLINE, GUEST_ELF};
use smudge_vmm::vm::outcome::{EXIT_SETUP, EXIT_SIGNALLED, EXIT_WRITEBACK};
use smudge_vmm::vm::{self, VmConfig};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_SETUP } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // `run` says which dirty-log mechanism it chose; benchmarks stay quiet.
    let default_filter = if matches!(cli.command, Command::Run(_)) { "warn,smudge_vmm::vm=info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SMUDGE_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into a pipe or file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_timer(tracing_subscriber::fmt::time::uptime())
        // A closed stderr must not panic a vCPU thread that logs.
        .log_internal_errors(false)
        .init();
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "smudge: error: {e:#}");
            ExitCode::from(EXIT_SETUP)
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Run(args) => {
            take_stop_signals(&args)?;
            run(*args, Start::Boot)
        }
        Command::Restore(r) => restore(*r),
        Command::MigrateRecv(m) => migrate_recv(*m),
        Command::Snapshot(SnapshotCommand::Verify { dir }) => {
            let links = smudge::snapshot::chain(&dir)?;
            for (d, m) in &links {
                println!(
                    "{}: {} snapshot {} ({} MiB RAM, {} vCPU(s)): intact",
                    d.display(),
                    m.kind,
                    m.id,
                    m.mem_size >> 20,
                    m.vcpus
                );
            }
            println!("chain of {} snapshot(s) verified", links.len());
            Ok(0)
        }
        Command::Snapshot(SnapshotCommand::Merge { dir, out }) => {
            let mut bar = progress_bar("merging");
            let m = smudge::snapshot::merge_with(&dir, &out, &mut bar)?;
            println!("{}: full snapshot {} merged from the chain ending at {}", out.display(), m.id, dir.display());
            Ok(0)
        }
        Command::Journal(JournalCommand::List { dir }) => smudge_vmm::persist::journal_cli::list(&dir),
        Command::Journal(JournalCommand::Verify { dir }) => smudge_vmm::persist::journal_cli::verify(&dir),
        Command::ExportGuest { path } => {
            std::fs::write(&path, GUEST_ELF).with_context(|| format!("writing {}", path.display()))?;
            Ok(0)
        }
        Command::Ctl(args) => ctl(&args),
        Command::Bench(args) => bench::run(&args),
    }
}

/// `smudge restore`: the guest runs at once and its memory loads behind it
/// while the new memory file is built beside it (see
/// `smudge_vmm::persist::restore`); without userfaultfd, the snapshot's
/// memory is copied into the memory file first. `--lazy`: the guest runs
/// on a tmpfs memory file loaded behind it.
fn restore(r: RestoreArgs) -> anyhow::Result<u8> {
    let t0 = std::time::Instant::now();
    take_stop_signals(&r.run)?;
    if r.run.guest.is_some() || r.run.cmdline.is_some() {
        anyhow::bail!("--guest and --cmdline do not apply to a restore: the guest continues where it was");
    }
    let Some(mem_file) = r.run.mem_file.clone().filter(|_| r.run.backing_file.is_none()) else {
        anyhow::bail!("restore takes --mem-file NEW: the new memory file (it must not exist)");
    };
    if r.run.in_place {
        anyhow::bail!("--in-place is for run: a restore keeps RAM in shared memory, or with --lazy on the memory file");
    }
    // Every restore builds a new memory file: never one over an existing file.
    if mem_file.exists() {
        anyhow::bail!(smudge::snapshot::SnapshotError::MemExists(mem_file));
    }
    if let Some(dir) = r.run.journal.clone() {
        return journal_restore(r, &dir, mem_file, t0);
    }
    let snapshot = r.snapshot.clone().context("--snapshot or --journal names what to restore")?;
    if r.lazy {
        smudge_vmm::persist::lazy::check_tmpfs(&mem_file)?;
        let (lazy, m) = smudge_vmm::persist::lazy::LazyRestore::open(&snapshot, t0)?;
        let ran = run(r.run, Start::Incoming(m.mem_size, m.vcpus, Box::new(lazy)));
        return stopped_before_running(ran, Some(&mem_file), "the guest stays in its snapshot");
    }
    match smudge_vmm::persist::restore::why_not_behind(&r) {
        None => return restore_behind(r, &snapshot, mem_file, t0),
        Some(why) => {
            let _ = writeln!(
                std::io::stderr(),
                "smudge: restore: {why}; copying the snapshot into {} before the guest runs",
                mem_file.display()
            );
        }
    }
    // Its memory chunks are checked as they are copied.
    let (manifest, state) = smudge::snapshot::load_lazily(&snapshot)?;
    let restoring = signals::on_stop("the restore ends before the guest runs", |_| {});
    let mut bar = progress_bar("restoring memory");
    smudge::snapshot::materialize_with(&snapshot, &mem_file, &mut bar)?;
    drop(restoring);
    let ran = match signals::requested() {
        // Came while the memory was copied (the copy is not cut short).
        Some(sig) => Err(smudge_vmm::vm::VmError::Stopped(sig).into()),
        None => run(r.run, Start::Restore(Box::new((manifest, state, t0)))),
    };
    stopped_before_running(ran, Some(&mem_file), "the guest stays in its snapshot")
}

/// The default restore with userfaultfd: RAM in a memfd filled behind the
/// running guest, the memory file built in the background and kept by
/// writeback once built.
fn restore_behind(
    r: RestoreArgs,
    snapshot: &std::path::Path,
    mem_file: std::path::PathBuf,
    t0: std::time::Instant,
) -> anyhow::Result<u8> {
    let (fill, m) = smudge_vmm::persist::lazy::LazyRestore::open(snapshot, t0)?;
    let made = smudge_vmm::persist::restore::NewMemoryFile::create(&mem_file, m.mem_size, t0)?;
    let ready = made.ready();
    let fill = Box::new(fill.behind(made));
    let ran = vm_config(&r.run, Start::Incoming(m.mem_size, m.vcpus, fill)).and_then(|mut cfg| {
        cfg.ram_in_memfd = true;
        let w = cfg.writeback.as_mut().context("the default restore needs writeback")?;
        w.image = Some(mem_file.clone());
        w.image_ready = Some(ready);
        run_config(cfg)
    });
    stopped_before_running(ran, Some(&mem_file), "the guest stays in its snapshot")
}

/// `smudge restore --journal DIR`: the chosen committed epoch's RAM built
/// into the memory file (base image plus the epochs up to it), then the
/// run from its machine state; with `--epoch-ms` journalled on into DIR.
fn journal_restore(
    r: RestoreArgs,
    dir: &std::path::Path,
    mem_file: std::path::PathBuf,
    t0: std::time::Instant,
) -> anyhow::Result<u8> {
    if r.lazy {
        anyhow::bail!("--lazy does not apply to --journal: a journal restore builds the memory file first");
    }
    let target = smudge_vmm::persist::journal_cli::target(r.epoch, r.at);
    let rec = smudge_vmm::persist::journal_cli::recover(dir, target, &mem_file)?;
    let ran = match signals::requested() {
        Some(sig) => Err(smudge_vmm::vm::VmError::Stopped(sig).into()),
        None => {
            let after = r.run.epoch_ms.map(|_| rec.epoch.epoch);
            run(r.run, Start::Recovered(Box::new((rec.ram_size, rec.state, t0, after))))
        }
    };
    stopped_before_running(ran, Some(&mem_file), "the guest stays in its journal")
}

/// `smudge migrate-recv`: waits for a source, checks this side can take
/// its guest (refusing it, saying why, if not), then the run.
fn migrate_recv(m: MigrateRecvArgs) -> anyhow::Result<u8> {
    take_stop_signals(&m.run)?;
    let Some(mem_file) = m.run.mem_file.clone().filter(|_| m.run.backing_file.is_none()) else {
        anyhow::bail!("migrate-recv takes --mem-file");
    };
    if m.run.in_place {
        anyhow::bail!("--in-place is for run: an incoming guest's RAM is the memory file");
    }
    if m.run.guest.is_some() || m.run.cmdline.is_some() {
        anyhow::bail!("--guest and --cmdline do not apply to migrate-recv: the guest continues where it was");
    }
    if !(m.accept_timeout >= 0.0 && m.accept_timeout.is_finite()) {
        anyhow::bail!("--accept-timeout must be a number of seconds >= 0");
    }
    if m.local {
        if !mem_file.is_file() {
            anyhow::bail!(
                "{}: --local takes over the source's memory file, and there is none here",
                mem_file.display()
            );
        }
    } else if mem_file.exists() {
        anyhow::bail!(
            "{}: exists; migrate-recv makes a new memory file and will not overwrite one \
             (--local takes over a running guest's file on this host)",
            mem_file.display()
        );
    }
    let timeout = (m.accept_timeout > 0.0).then(|| Duration::from_secs_f64(m.accept_timeout));
    let tls = smudge_vmm::migrate::tls::TlsServer::from_flags(
        m.tls_creds.as_deref(),
        m.tls_psk.as_deref(),
        m.tls_psk_identity.as_deref(),
    );
    let mut inc = match tls.and_then(|tls| smudge_vmm::migrate::incoming::Incoming::accept(&m.listen, timeout, tls)) {
        Ok(i) => i,
        Err(e) => return stopped_before_running(Err(e), None, "no source had connected"),
    };
    inc.recover_within(Duration::from_secs(m.postcopy_recover_timeout));
    let hello = inc.hello();
    if let Err(why) = destination_ready(&m, &mem_file, hello.local.as_ref(), hello.mem_size, hello.postcopy) {
        inc.refuse(&why.to_string());
        // The message alone, as the source is told.
        anyhow::bail!("{why}");
    }
    if let Err(e) = inc.welcome() {
        return stopped_before_running(Err(e), None, "the source keeps its guest");
    }
    let (size, vcpus) = (inc.hello().mem_size, inc.hello().vcpus);
    let r = run(m.run, Start::Incoming(size, vcpus, Box::new(inc)));
    if r.is_err() && !m.local {
        // The guest never ran here: the partial memory file is no one's.
        // (A handed-over file is the source's guest's RAM: kept.)
        let _ = std::fs::remove_file(&mem_file);
        return stopped_before_running(r, Some(&mem_file), "the source keeps its guest");
    }
    stopped_before_running(r, None, "the source keeps its guest")
}

/// Why this side cannot take the guest a source announced.
#[derive(Debug, thiserror::Error)]
enum NotReady {
    /// `--local` here, pages from the source.
    #[error(
        "this side waits for a same-host handover (--local); the source sends pages (run `ctl migrate --local` there)"
    )]
    WantsHandover,
    /// A handover from the source, no `--local` here.
    #[error(
        "the source hands over its RAM file (--local); start migrate-recv with --local and --mem-file naming that file"
    )]
    WantsPages,
    /// The memory file cannot be opened (a handover) or removed again
    /// (the check that one can be made).
    #[error("{}: {err}", path.display())]
    Io {
        /// The memory file.
        path: std::path::PathBuf,
        /// What the OS said.
        err: std::io::Error,
    },
    /// The handed-over file is not the source's RAM.
    #[error(transparent)]
    Handover(#[from] smudge::migration::local::LocalError),
    /// A new memory file cannot be made here.
    #[error("{}: cannot create the memory file: {err}", path.display())]
    Create {
        /// The memory file.
        path: std::path::PathBuf,
        /// What the OS said.
        err: std::io::Error,
    },
    /// Post-copy needs the memory file on tmpfs.
    #[error("{0}")]
    NotTmpfs(String),
}

/// Checks this side can take the guest a source announced: `local`, its
/// same-host handover, if any; `mem_size` bytes of RAM; post-copy or not.
fn destination_ready(
    m: &MigrateRecvArgs,
    mem_file: &std::path::Path,
    local: Option<&smudge::migration::local::LocalRam>,
    mem_size: u64,
    postcopy: bool,
) -> Result<(), NotReady> {
    match (m.local, local) {
        (true, Some(local)) => handover_file(mem_file, local, mem_size),
        (true, None) => Err(NotReady::WantsHandover),
        (false, Some(_)) => Err(NotReady::WantsPages),
        (false, None) if postcopy => {
            smudge_vmm::migrate::postcopy_dest::check_tmpfs(mem_file).map_err(|e| NotReady::NotTmpfs(e.to_string()))?;
            creatable(mem_file)
        }
        (false, None) => creatable(mem_file),
    }
}

/// Checks that a new memory file can be made at `path` before the source
/// starts sending (`vm::run` then makes it afresh, sparse, at the
/// announced size).
fn creatable(path: &std::path::Path) -> Result<(), NotReady> {
    match std::fs::OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(_) => std::fs::remove_file(path).map_err(|err| NotReady::Io { path: path.to_path_buf(), err }),
        Err(err) => Err(NotReady::Create { path: path.to_path_buf(), err }),
    }
}

/// Checks that `path` is the RAM file a same-host source handed over.
fn handover_file(
    path: &std::path::Path,
    local: &smudge::migration::local::LocalRam,
    mem_size: u64,
) -> Result<(), NotReady> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|err| NotReady::Io { path: path.to_path_buf(), err })?;
    Ok(local.check(&f, mem_size)?)
}

/// `smudge ctl`: one request to a running smudge, its answer printed.
fn ctl(args: &CtlArgs) -> anyhow::Result<u8> {
    let long_job =
        matches!(args.cmd, CtlCommand::Migrate(_) | CtlCommand::Snapshot(SnapshotCtl::Create { live: true, .. }));
    let watch = long_job.then(|| watch_progress(args.api_sock.clone()));
    let wait = Duration::from_secs_f64(args.wait_secs);
    let answer = smudge::control::Client::new(&args.api_sock).connect_wait(wait).call(&args.cmd.request());
    if let Some(stop) = watch {
        stop();
    }
    let answer = answer?;
    match smudge_vmm::control::ctl_view::render(&args.cmd, &answer).filter(|_| !args.json) {
        Some(text) => println!("{text}"),
        None => println!("{}", serde_json::to_string_pretty(&answer)?),
    }
    let ok = answer.get("ok").and_then(serde_json::Value::as_bool) == Some(true);
    Ok(if ok { 0 } else { 1 })
}

/// Takes SIGTERM and SIGINT over for a run (before any thread starts):
/// they stop it cleanly (see `smudge_vmm::control::signals`).
fn take_stop_signals(args: &RunArgs) -> anyhow::Result<()> {
    signals::install(!args.no_seccomp, &args.test_hold)?;
    Ok(())
}

/// A run that failed because SIGTERM or SIGINT came before the guest ran
/// here (a restore, an incoming migration): exit code 108, and `removed`,
/// the memory file the command made, is removed. Any other result is
/// passed on.
fn stopped_before_running(
    ran: anyhow::Result<u8>,
    removed: Option<&std::path::Path>,
    guest: &str,
) -> anyhow::Result<u8> {
    let (Err(e), Some(sig)) = (&ran, signals::requested_name()) else { return ran };
    if let Some(p) = removed {
        let _ = std::fs::remove_file(p);
    }
    let why = match e.downcast_ref::<vm::VmError>() {
        Some(vm::VmError::Stopped(_)) => String::new(),
        _ => format!(" ({e:#})"),
    };
    let _ = writeln!(
        std::io::stderr(),
        "smudge: stopped by {sig} before the guest ran here{why}; {guest}{}",
        removed.map(|p| format!("; {} removed", p.display())).unwrap_or_default()
    );
    Ok(EXIT_SIGNALLED)
}

/// A progress bar on a terminal (bytes done of all), nothing otherwise.
fn progress_bar(what: &'static str) -> impl FnMut(u64, u64) {
    use std::io::IsTerminal;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(what);
        b
    });
    move |done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
            if done >= total {
                b.finish_and_clear();
            }
        }
    }
}

/// On a terminal, a spinner showing a long job's progress from `stats`
/// until the returned function is called.
fn watch_progress(sock: std::path::PathBuf) -> impl FnOnce() {
    use std::io::IsTerminal;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let thread = std::io::stderr().is_terminal().then(|| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let bar = indicatif::ProgressBar::new_spinner();
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(200));
                let Ok(v) = smudge::control::Client::new(&sock).call(&smudge::control::Request::Stats) else {
                    continue;
                };
                if let Some(p) = v.get("progress").filter(|p| !p.is_null()) {
                    let n = |k: &str| p.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
                    bar.set_message(match p.get("bytes_sent") {
                        // A migration.
                        Some(_) => format!(
                            "round {:.0}: {:.0} pages dirty, {:.0} MB/s, {:.0} MiB sent, throttle {:.0}%",
                            n("round"),
                            n("remaining_pages"),
                            n("rate_mbps"),
                            n("bytes_sent") / 1048576.0,
                            n("throttle_pct")
                        ),
                        // A live snapshot.
                        None => format!(
                            "copy round {:.0}: {:.0} pages dirty, {:.0} MB/s, {:.0} MiB copied",
                            n("round"),
                            n("remaining_pages"),
                            n("rate_mbps"),
                            n("bytes") / 1048576.0
                        ),
                    });
                    bar.tick();
                }
            }
            bar.finish_and_clear();
        })
    });
    move || {
        stop.store(true, Ordering::Release);
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// How a run begins.
enum Start {
    /// Boot the guest.
    Boot,
    /// Continue a snapshot (its memory file is materialized).
    /// With when the command started (for the time to first instruction).
    Restore(Box<(smudge::snapshot::Manifest, smudge::snapshot::MachineState, std::time::Instant)>),
    /// Continue a journal's epoch (its memory file is built): RAM size,
    /// state, when the command started, and the epoch to journal on after
    /// (None: no journal for this run).
    Recovered(Box<(u64, smudge::snapshot::MachineState, std::time::Instant, Option<u64>)>),
    /// Receive a guest (a migration, or a lazy restore) whose RAM size and
    /// vCPU count are known.
    Incoming(u64, usize, Box<dyn vm::IncomingVm>),
}

/// Runs the VM `args` and `start` describe, prints what it did and
/// returns the exit code.
fn run(args: RunArgs, start: Start) -> anyhow::Result<u8> {
    let cfg = vm_config(&args, start)?;
    run_config(cfg)
}

/// Runs the VM `cfg` describes, prints what it did and
/// returns the exit code.
fn run_config(cfg: VmConfig) -> anyhow::Result<u8> {
    let mem_size = cfg.mem_size;
    let ram = match cfg.ram_in_memfd {
        true => format!("shared memory, persisted to {}", cfg.mem_file.display()),
        false => cfg.mem_file.display().to_string(),
    };
    let report = vm::run(cfg)?;
    Ok(summarize(&report, mem_size, &ram))
}

/// The run `args` ask for, beginning as `start` says.
fn vm_config(args: &RunArgs, start: Start) -> anyhow::Result<VmConfig> {
    let mut journal_after = None;
    let (restore, incoming, announced) = match start {
        Start::Boot => (None, None, None),
        Start::Restore(r) => {
            let (m, state, t0) = *r;
            (Some((m.mem_size, m.vcpus, state, t0)), None, None)
        }
        Start::Incoming(size, vcpus, i) => (None, Some(i), Some((size, vcpus))),
        Start::Recovered(r) => {
            let (size, state, t0, after) = *r;
            journal_after = Some(after);
            (Some((size, state.vcpus.len(), state, t0)), None, None)
        }
    };
    let journal = smudge_vmm::persist::journal_cli::epoch_options(args, journal_after)?;
    let (guest_elf, cmdline) = match &args.guest {
        Some(p) => (
            std::fs::read(p).with_context(|| format!("reading guest kernel {}", p.display()))?,
            args.cmdline.clone().unwrap_or_default(),
        ),
        None => (GUEST_ELF.to_vec(), args.cmdline.clone().unwrap_or_else(|| DEFAULT_CMDLINE.to_string())),
    };
    let serial: Box<dyn Write + Send> = if args.serial == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(File::create(&args.serial).with_context(|| format!("creating serial output {}", args.serial))?)
    };
    if !(args.timeout >= 0.0 && args.timeout.is_finite()) {
        anyhow::bail!("--timeout must be a number of seconds >= 0");
    }
    let (mem_size, vcpus) = match (&restore, announced) {
        (Some((size, vcpus, _, _)), _) => (*size, u8::try_from(*vcpus)?),
        (None, Some((size, vcpus))) => (size, u8::try_from(vcpus)?),
        (None, None) => (args.mem_size, args.vcpus),
    };
    let mem_file = match (&args.backing_file, &args.mem_file) {
        (Some(p), _) | (None, Some(p)) => p.clone(),
        (None, None) => anyhow::bail!("--mem-file or --backing-file is needed"),
    };
    // In place unless --backing-file: a kill -9 of smudge then loses no
    // write the guest made (the host's page cache holds them), which RAM
    // in a memfd cannot promise for pages not yet written out.
    let ram_in_memfd = args.backing_file.is_some();
    let image_of_memfd = mem_file.clone();
    Ok(VmConfig {
        mem_file,
        ram_in_memfd,
        mem_size,
        guest_elf,
        cmdline,
        vcpus,
        serial,
        timeout: (args.timeout > 0.0).then(|| Duration::from_secs_f64(args.timeout)),
        tick: Duration::from_millis(args.tick_ms.max(1)),
        hugepages: args.hugepages,
        dirty_log: (!args.no_dirty_log).then_some(args.dirty_log),
        ring_entries: args.ring_entries,
        on_sync: None,
        api_sock: args.api_sock.clone(),
        restore: restore.as_ref().map(|(_, _, s, _)| s.clone()),
        started_at: restore.as_ref().map(|(_, _, _, t)| *t),
        snapshot_at: match (args.snapshot_at_ms, &args.snapshot_dir) {
            (Some(ms), Some(d)) => {
                // An output directory, made as `mkdir -p` would: before the
                // guest runs, so a path that cannot be made fails at once.
                std::fs::create_dir_all(d).with_context(|| format!("--snapshot-dir {}", d.display()))?;
                Some((Duration::from_millis(ms), d.clone()))
            }
            _ => None,
        },
        snapshot_precopy: (args.snapshot_precopy_ms > 0).then(|| Duration::from_millis(args.snapshot_precopy_ms)),
        journal,
        writeback: (!args.no_writeback && !args.no_dirty_log).then_some(WritebackOptions {
            policy: WritebackPolicy {
                writeback_interval: Duration::from_millis(args.dirty_writeback_ms.max(1)),
                dirty_expire: Duration::from_millis(args.dirty_expire_ms),
                background: args.dirty_background,
                limit: args.dirty_limit,
            },
            sync_every: (args.sync_every_ms > 0).then(|| Duration::from_millis(args.sync_every_ms)),
            image: if ram_in_memfd { Some(image_of_memfd) } else { args.writeback_image.clone() },
            image_ready: None,
            hot_pages: true,
        }),
        hide_caps: args.hide_cap.clone(),
        dirty: DirtyOptions {
            shadow: args.shadow.clone(),
            dump: args.dump_dirty.clone(),
            hold_harvests_every: args.test_hold_harvests,
            stats_interval: match args.stats_interval {
                Some(s) if s > 0.0 && s.is_finite() => Some(Duration::from_secs_f64(s)),
                Some(_) => anyhow::bail!("--stats-interval must be a positive number of seconds"),
                None => None,
            },
        },
        kvm_dev: args.kvm_dev.clone(),
        seccomp: !args.no_seccomp,
        seccomp_selftest: args.seccomp_selftest,
        pause_at_sync: args.test_pause_at_sync,
        heatmap: match &args.heatmap {
            Some(p) => {
                if args.heatmap_period_ms == 0 || args.heatmap_buckets == 0 {
                    anyhow::bail!("--heatmap-period-ms and --heatmap-buckets must be above 0");
                }
                // Fail before the guest runs, not after.
                std::fs::write(p, b"").with_context(|| format!("--heatmap {}: cannot write there", p.display()))?;
                Some((p.clone(), Duration::from_millis(args.heatmap_period_ms), args.heatmap_buckets))
            }
            None => None,
        },
        incoming,
    })
}

/// Prints the run's last line (and the heatmap's) to stderr; returns the
/// exit code: the outcome's, or [`EXIT_WRITEBACK`] if the final sync failed.
fn summarize(report: &vm::RunReport, mem_size: u64, ram: &str) -> u8 {
    let dirty = match &report.dirty {
        Some(d) => format!(
            "dirty log {}: {} pages dirtied, {} harvests ({:.1} us each), {} ring-full exits{}",
            d.mechanism,
            d.pages,
            d.stats.harvests,
            d.stats.harvest_time.as_secs_f64() * 1e6 / d.stats.harvests.max(1) as f64,
            d.stats.ring_full_exits,
            if d.shadow_bytes > 0 { format!(", {} bytes to the shadow", d.shadow_bytes) } else { String::new() }
        ),
        None => "dirty logging off".to_string(),
    };
    let mut code = report.outcome.exit_code();
    let writeback = match &report.writeback {
        Some(w) => {
            let s = &w.stats;
            let sync = match &w.final_sync {
                Ok(n) => format!("final sync wrote {n} pages"),
                Err(e) => {
                    code = code.max(EXIT_WRITEBACK);
                    format!("FINAL SYNC FAILED: {e}")
                }
            };
            format!(
                "; writeback: {} pages written ({} MiB), {} errors, {sync}, throttled {} ms in {} slices, at most {} pages dirty",
                s.nr_written,
                s.bytes_written >> 20,
                s.write_errors,
                w.throttled.as_millis(),
                w.throttle_slices,
                w.max_dirty
            )
        }
        None => String::new(),
    };
    match &report.heatmap {
        Some(Ok((p, n))) => {
            let _ = writeln!(
                std::io::stderr(),
                "smudge: heatmap of {n} periods in {} (its data in {})",
                p.display(),
                p.with_extension("json").display()
            );
        }
        Some(Err(e)) => {
            let _ = writeln!(std::io::stderr(), "smudge: heatmap not written: {e}");
        }
        None => {}
    }
    let _ = writeln!(
        std::io::stderr(),
        "smudge: {} after {:.3} s; RAM {} MiB in {}{}; {dirty}{writeback}",
        report.outcome,
        report.elapsed.as_secs_f64(),
        mem_size >> 20,
        ram,
        if report.created_mem_file { " (created)" } else { "" },
    );
    code
}
