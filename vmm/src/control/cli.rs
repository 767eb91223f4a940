//! Command-line interface of the `smudge` binary.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use smudge::control::{Compression, DirtyRateRequest, MigrateRequest, Request, SnapshotRequest};
use smudge::harvest::DirtyLogMode;
use smudge::writeback::Threshold;

/// smudge: a small VMM for hypervisor-level dirty-page logging with KVM.
#[derive(Debug, Parser)]
#[command(name = "smudge", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest on file-backed shared RAM with dirty logging on.
    Run(Box<RunArgs>),
    /// Write the bundled guest ELF to a file (to boot it under QEMU, say).
    ExportGuest {
        /// Where to write the ELF.
        path: PathBuf,
    },
    /// Work with a durable-mode journal on disk.
    #[command(subcommand)]
    Journal(JournalCommand),
    /// Run a benchmark (goals are ratios measured in one run): `smudge bench boot [--json]`.
    Bench(BenchArgs),
    /// Talk to a running smudge over its control socket.
    Ctl(CtlArgs),
    /// Continue a snapshotted guest in a new process, on a new memory file.
    Restore(Box<RestoreArgs>),
    /// Wait for one guest migrated from another smudge, then run it.
    MigrateRecv(Box<MigrateRecvArgs>),
    /// Work with snapshots on disk.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

/// `smudge run`.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Guest RAM backing file, mapped in place (MAP_SHARED; the host's
    /// page cache is guest RAM, so a killed smudge loses no guest write):
    /// created (sparse) if missing; an existing file must already have
    /// exactly --mem-size bytes. Needed unless --backing-file is given.
    #[arg(long, required_unless_present = "backing_file")]
    pub mem_file: Option<PathBuf>,
    /// `run`: guest RAM is the --mem-file itself (the default, said
    /// explicitly).
    #[arg(long, conflicts_with = "backing_file")]
    pub in_place: bool,
    /// Keep guest RAM in shared memory (a memfd) and persist it to this
    /// disk file through the writeback engine (only smudge writes it): no
    /// host writeback faults, no block allocation on a first touch, hot
    /// pages written out without re-protecting them; but a killed smudge
    /// loses what was not yet written out. The file is created if missing;
    /// an existing one (exactly --mem-size bytes) is loaded first. Instead
    /// of --mem-file.
    #[arg(long, conflicts_with_all = ["mem_file", "writeback_image", "no_writeback", "no_dirty_log"])]
    pub backing_file: Option<PathBuf>,
    /// Guest RAM size, with an optional K/M/G suffix (binary units).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem_size: u64,
    /// Guest kernel: a PVH ELF. Default: the bundled tiny guest.
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Guest command line. Default for the bundled guest: a short workload.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Number of vCPUs (the bundled guest runs its workload on the first).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub vcpus: u8,
    /// Where the guest's serial output goes: a file path, or "-" for stdout.
    #[arg(long, default_value = "-")]
    pub serial: String,
    /// End the run (exit code 103) if the guest has not exited after this many
    /// seconds; 0 waits forever.
    #[arg(long, default_value_t = 0.0)]
    pub timeout: f64,
    /// Event-loop tick in milliseconds (drives periodic work).
    #[arg(long, default_value_t = 100)]
    pub tick_ms: u64,
    /// Ask for transparent huge pages on guest RAM (madvise).
    #[arg(long)]
    pub hugepages: bool,
    /// Register RAM without KVM_MEM_LOG_DIRTY_PAGES (for comparisons only).
    #[arg(long, conflicts_with = "dirty_log")]
    pub no_dirty_log: bool,
    /// Dirty-log mechanism: auto (manual protect if KVM offers it, else
    /// bitmap), bitmap, manual, ring.
    #[arg(long, default_value = "auto")]
    pub dirty_log: DirtyLogMode,
    /// Dirty ring entries per vCPU (power of two, 256 .. KVM's maximum).
    #[arg(long, default_value_t = 4096)]
    pub ring_entries: u32,
    /// Keep this image file equal to guest memory: every tick harvests and
    /// copies the dirty pages into it (a live check of "no lost write").
    #[arg(long)]
    pub shadow: Option<PathBuf>,
    /// At the end, write every page dirtied during the run (extents) here.
    #[arg(long)]
    pub dump_dirty: Option<PathBuf>,
    /// Print dirty rate and harvest cost every this many seconds.
    #[arg(long)]
    pub stats_interval: Option<f64>,
    /// No writeback engine: the backing file is left to the host kernel.
    #[arg(long)]
    pub no_writeback: bool,
    /// Flusher period in milliseconds (the kernel's dirty_writeback).
    #[arg(long, default_value_t = 250)]
    pub dirty_writeback_ms: u64,
    /// Write pages back once dirty this long, in milliseconds (dirty_expire).
    #[arg(long, default_value_t = 30000)]
    pub dirty_expire_ms: u64,
    /// Start writing the oldest pages above this much dirty memory: bytes
    /// (64M) or percent of RAM (10%).
    #[arg(long, default_value = "10%")]
    pub dirty_background: Threshold,
    /// Throttle the vCPUs above this much dirty memory (bytes or percent).
    #[arg(long, default_value = "40%")]
    pub dirty_limit: Threshold,
    /// Also run a full sync (every dirty page + fdatasync) this often, in
    /// milliseconds; 0: only at the end of the run.
    #[arg(long, default_value_t = 0)]
    pub sync_every_ms: u64,
    /// Write dirty pages into this image file (at their RAM offsets) instead
    /// of persisting the backing file in place.
    #[arg(long)]
    pub writeback_image: Option<PathBuf>,
    /// Take a full snapshot this many milliseconds after start (needs
    /// --snapshot-dir).
    #[arg(long, requires = "snapshot_dir")]
    pub snapshot_at_ms: Option<u64>,
    /// Where --snapshot-at-ms puts its snapshot (a new directory inside).
    #[arg(long, requires = "snapshot_at_ms")]
    pub snapshot_dir: Option<PathBuf>,
    /// While the guest runs, copy the pages of the next diff snapshot into a
    /// staging file beside the last snapshot this often (milliseconds), so a
    /// diff's pause copies only the residue; 0: copy everything during the
    /// pause (what Firecracker does).
    #[arg(long, default_value_t = 50)]
    pub snapshot_precopy_ms: u64,
    /// Serve the control API (JSON over this unix socket, mode 0600).
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// Durable mode: every --epoch-ms, append a consistent epoch (the
    /// pages dirtied since the last, vCPU and device state) to the journal
    /// in this directory and commit it with fdatasync; `smudge restore
    /// --journal` continues the guest from the newest committed one. With
    /// `restore`: the journal to recover from.
    #[arg(long)]
    pub journal: Option<PathBuf>,
    /// Epoch length in milliseconds (default 20). With `restore
    /// --journal`: journal the recovered guest on into the same directory
    /// (epochs after the recovered one are cut off first).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub epoch_ms: Option<u64>,
    /// Keep committed epochs in the journal this long (rewind window:
    /// 500ms, 10s, 2m); older ones are checkpointed into its base image.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub retain: std::time::Duration,
    /// Bound on the journal's segments (K/M/G suffixes): beyond it the
    /// oldest epochs are checkpointed even within --retain.
    #[arg(long, value_parser = parse_size)]
    pub journal_max_bytes: Option<u64>,
    /// Memory for the pages the journal wrote last (K/M/G suffixes): a
    /// page written again while held goes to the journal as the bytes that
    /// changed, not whole. Default: an eighth of RAM, 16 MiB to 512 MiB;
    /// 0 writes every page whole.
    #[arg(long, value_parser = parse_size)]
    pub journal_cache: Option<u64>,
    /// Draw a dirty-page heatmap of the run into this SVG file: guest
    /// address against time, coloured by pages dirtied per period, with the
    /// dirty rate below; the numbers behind it go to FILE.json. Re-protects
    /// the pages it sees every period (so it sees the next write), which
    /// costs the guest a fault per page per period.
    #[arg(long)]
    pub heatmap: Option<PathBuf>,
    /// The heatmap's period (milliseconds).
    #[arg(long, default_value_t = 100)]
    pub heatmap_period_ms: u64,
    /// The heatmap's address buckets (rows).
    #[arg(long, default_value_t = 128)]
    pub heatmap_buckets: usize,
    /// Treat a KVM capability as absent (manual, ring); repeatable.
    #[arg(long, hide = true)]
    pub hide_cap: Vec<String>,
    /// KVM device node.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    pub kvm_dev: PathBuf,
    /// Run without seccomp filters (by default each thread may only make
    /// the syscalls its kind needs; a forbidden one stops smudge, exit 106).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Test hook: vCPU 0 makes one syscall its filter forbids (socket)
    /// right after the filter is on.
    #[arg(long, hide = true)]
    pub seccomp_selftest: bool,
    /// Test hook: wait at this point until SIGTERM/SIGINT comes (start,
    /// live-snapshot), or act on a first signal never (stop); repeatable.
    #[arg(long, hide = true, value_enum)]
    pub test_hold: Vec<crate::control::signals::Hold>,
    /// Test hook: pause the vCPUs (as `ctl pause` would) when the guest
    /// reports sync point N (`sync=1`: the end of its pass N), so a test
    /// acts on a guest held at a known point instead of waiting for it.
    #[arg(long, hide = true, value_name = "N")]
    pub test_pause_at_sync: Option<u32>,
    /// Test hook: the journal's writer waits this long before each batch
    /// of epochs, as a disk that cannot keep up would.
    #[arg(long, hide = true, value_name = "MS")]
    pub test_journal_write_delay_ms: Option<u64>,
    /// Test hook: run only these parts of each epoch (the benchmark
    /// switches them on one at a time to measure each one's share).
    #[arg(long, hide = true, value_enum, default_value = "full")]
    pub test_epoch_parts: crate::persist::epoch::EpochParts,
    /// Test hook: this many pre-copy passes in every epoch, instead of
    /// as many as the guest's writes call for.
    #[arg(long, hide = true, value_name = "N")]
    pub test_epoch_passes: Option<u32>,
    /// Test hook: every N ticks, hold the periodic harvest (`--shadow`,
    /// `--dump-dirty`) until a vCPU's dirty ring fills, so the ring-full
    /// path runs because the harvester is held, not because the guest
    /// happens to outrun it.
    #[arg(long, hide = true, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub test_hold_harvests: Option<u64>,
}

/// `smudge ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The socket `smudge run --api-sock` serves.
    #[arg(long)]
    pub api_sock: PathBuf,
    /// Print the answer as JSON (default: readable text for stats,
    /// dirty-rate and migrate; JSON for the rest).
    #[arg(long)]
    pub json: bool,
    /// Wait this many seconds for a socket that does not exist yet or
    /// refuses connections (a `smudge run` still starting), then fail.
    #[arg(long, default_value_t = crate::control::api::CTL_WAIT_SECS as f64, value_parser = parse_wait)]
    pub wait_secs: f64,
    /// The request.
    #[command(subcommand)]
    pub cmd: CtlCommand,
}

/// `smudge restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot directory (or --journal DIR: continue from a journal).
    #[arg(long, required_unless_present = "journal", conflicts_with = "journal")]
    pub snapshot: Option<PathBuf>,
    /// With --journal: continue from this committed epoch (default: the
    /// newest).
    #[arg(long, requires = "journal", conflicts_with = "at")]
    pub epoch: Option<u64>,
    /// With --journal: continue from the newest epoch at least this much
    /// older than the newest one (-2s, -500ms).
    #[arg(long, requires = "journal", allow_hyphen_values = true, value_parser = parse_ago)]
    pub at: Option<std::time::Duration>,
    /// Run the guest on the memory file itself, loaded behind it (the
    /// default restore keeps RAM in shared memory and builds the memory
    /// file in the background instead): the memory file must be on tmpfs
    /// (/dev/shm).
    #[arg(long)]
    pub lazy: bool,
    /// Test hook: act as if userfaultfd were refused (the default restore
    /// then copies the snapshot first, saying why).
    #[arg(long, hide = true)]
    pub test_no_userfaultfd: bool,
    /// Run options (the memory file must not exist; size and vCPUs come
    /// from the snapshot; --guest and --cmdline do not apply).
    #[command(flatten)]
    pub run: RunArgs,
}

/// `smudge migrate-recv`.
#[derive(Debug, Args, Clone)]
pub struct MigrateRecvArgs {
    /// Where to listen: HOST:PORT, a PORT alone for 127.0.0.1 (loopback
    /// unless told otherwise), or unix:PATH for a unix socket (mode 0600,
    /// removed once the source is in). Port 0 picks a free one; the address
    /// is printed on stderr.
    #[arg(long)]
    pub listen: String,
    /// Give up if no source connects within this many seconds (0: wait
    /// forever).
    #[arg(long, default_value_t = 0.0)]
    pub accept_timeout: f64,
    /// Take over a guest from a smudge on this host by mapping its RAM
    /// file (the source runs `ctl migrate --local`): --mem-file names the
    /// source's memory file, which must exist; no page data is sent.
    #[arg(long)]
    pub local: bool,
    /// Require TLS 1.3 of every connection: DIR holds ca-cert.pem,
    /// server-cert.pem and server-key.pem (QEMU's layout); the source must
    /// show a certificate the CA signed.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// TLS 1.3 with a pre-shared key instead (tests, labs): FILE is
    /// QEMU's keys.psk (IDENTITY:HEXKEY lines, keys of 16 bytes or more);
    /// the source must prove the key of the identity it presents.
    #[arg(long, value_name = "FILE", conflicts_with = "tls_creds")]
    pub tls_psk: Option<PathBuf>,
    /// With --tls-psk: take only this identity's key.
    #[arg(long, value_name = "NAME", requires = "tls_psk")]
    pub tls_psk_identity: Option<String>,
    /// When a post-copy link breaks after the switchover, keep running the
    /// guest and wait this many seconds for the source to resume (`ctl
    /// migrate --resume`) before giving up (exit 107); 0: give up at once.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub postcopy_recover_timeout: u64,
    /// Run options (the memory file must not exist, unless --local; size
    /// and vCPUs come from the source; --guest and --cmdline do not apply).
    #[command(flatten)]
    pub run: RunArgs,
}

/// `smudge snapshot …`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Check a snapshot and every parent of it: format, version, checksums.
    Verify {
        /// The snapshot directory.
        dir: PathBuf,
    },
    /// Fold a chain (full, then diffs) into one full snapshot.
    Merge {
        /// The last snapshot of the chain.
        dir: PathBuf,
        /// The new full snapshot's directory (must not exist or be empty).
        out: PathBuf,
    },
}

/// `smudge journal …`.
#[derive(Debug, Subcommand)]
pub enum JournalCommand {
    /// The committed epochs a journal holds, and where its scan stopped.
    List {
        /// The journal directory.
        dir: PathBuf,
    },
    /// Read every record and check it; exit 1 if no epoch is recoverable.
    Verify {
        /// The journal directory.
        dir: PathBuf,
    },
}

/// Control requests.
#[derive(Debug, Subcommand, Clone)]
pub enum CtlCommand {
    /// Harvest and writeback counters (like /proc/vmstat).
    Stats,
    /// Write back every dirty page and fdatasync (WB_SYNC_ALL).
    Sync,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Snapshots of the running VM.
    #[command(subcommand)]
    Snapshot(SnapshotCtl),
    /// Live-migrate the guest to a `smudge migrate-recv` (pre-copy over
    /// TCP); on success this VM ends and the guest runs there.
    Migrate(MigrateCtl),
    /// Measure how fast the guest dirties memory (QEMU's calc-dirty-rate):
    /// pages/s, MB/s, the working set, and per vCPU with the ring.
    DirtyRate {
        /// Length of the measurement window.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
    },
    /// End the run (exit code 0).
    Stop,
}

/// `smudge ctl migrate`.
#[derive(Debug, Args, Clone)]
pub struct MigrateCtl {
    /// The destination, HOST:PORT or unix:PATH (with --resume: where to
    /// reconnect; default where it went last).
    #[arg(long, required_unless_present = "resume")]
    pub to: Option<String>,
    /// Downtime budget in milliseconds: the final, paused round starts once
    /// its estimated time fits (default 20).
    #[arg(long)]
    pub downtime_ms: Option<u64>,
    /// Pre-copy rounds after the first before the final round is forced
    /// (default 30).
    #[arg(long)]
    pub max_rounds: Option<u32>,
    /// Send at most this many bytes per second (K/M/G suffixes, binary).
    #[arg(long, value_parser = parse_size)]
    pub bandwidth_limit: Option<u64>,
    /// Page data compression: none or lz4.
    #[arg(long, default_value = "none", value_parser = ["none", "lz4"])]
    pub compress: String,
    /// Never throttle the vCPUs, even when pre-copy does not converge.
    #[arg(long)]
    pub no_auto_converge: bool,
    /// Check end to end: the destination compares a CRC-32 per MiB of its
    /// memory with the source's at switchover, and refuses on a mismatch
    /// (reads all RAM during the pause: longer downtime).
    #[arg(long)]
    pub verify_memory: bool,
    /// Same-host migration: the destination (on this host) maps this
    /// guest's RAM file and only vCPU/device state is sent — for swapping
    /// the smudge binary under a running guest. Start the destination with
    /// `migrate-recv --mem-file` naming the same file.
    #[arg(long)]
    pub local: bool,
    /// Post-copy: switch over at once and let the guest run on the
    /// destination while its pages follow (fetched on first touch, the
    /// rest streamed). Downtime no longer grows with the dirty rate, but
    /// once switched, losing the source loses the guest (a broken link can
    /// be resumed: --resume). The destination's memory file must be on
    /// tmpfs (/dev/shm).
    #[arg(long, conflicts_with_all = ["postcopy_after", "local", "verify_memory"])]
    pub postcopy: bool,
    /// Pre-copy for N rounds (round 0 sends everything), then switch to
    /// post-copy for what is still dirty.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with_all = ["local", "verify_memory"])]
    pub postcopy_after: Option<u32>,
    /// Split page data over N TCP connections, each with its own sending
    /// thread (and receiving thread on the destination); control stays on
    /// the first. Pre-copy rounds only: post-copy's on-demand pages use
    /// the first.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64), conflicts_with = "local")]
    pub connections: u32,
    /// TLS 1.3 on every connection: DIR holds ca-cert.pem, client-cert.pem
    /// and client-key.pem (QEMU's layout); the destination's certificate
    /// must be the CA's and name the host of --to (localhost for unix:).
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// TLS 1.3 with a pre-shared key instead (tests, labs): FILE is
    /// QEMU's keys.psk (IDENTITY:HEXKEY lines); each end proves the key.
    #[arg(long, value_name = "FILE", conflicts_with = "tls_creds")]
    pub tls_psk: Option<PathBuf>,
    /// With --tls-psk: the identity whose key is used (default: the
    /// file's first line).
    #[arg(long, value_name = "NAME", requires = "tls_psk")]
    pub tls_psk_identity: Option<String>,
    /// Resume the post-copy migration whose link broke after the
    /// switchover (this VM is `postcopy-paused`): reconnect and send the
    /// pages the destination still owes.
    #[arg(long)]
    pub resume: bool,
}

/// `smudge ctl snapshot ...`.
#[derive(Debug, Subcommand, Clone)]
pub enum SnapshotCtl {
    /// Take a snapshot into DIR (pause, save, resume): full, or with
    /// --diff --parent a diff holding only the pages dirtied since then.
    Create {
        /// Directory to create (must not exist or be empty).
        dir: PathBuf,
        /// A diff snapshot (needs --parent).
        #[arg(long, requires = "parent")]
        diff: bool,
        /// Write a diff on this snapshot (the last one this run took);
        /// implies --diff.
        #[arg(long)]
        parent: Option<PathBuf>,
        /// Leave the vCPUs paused afterwards.
        #[arg(long)]
        no_resume: bool,
        /// A full snapshot taken while the guest runs: RAM is copied in
        /// rounds (each copying what the guest wrote during the last) and
        /// the vCPUs pause only for the last, small residue.
        #[arg(long, conflicts_with_all = ["parent", "diff"])]
        live: bool,
        /// With --live: pause for about this long at most (default 10 ms;
        /// the rounds stop once the residue fits, or after 10 rounds).
        #[arg(long, requires = "live")]
        pause_budget_ms: Option<u64>,
    },
}

impl CtlCommand {
    /// The request, in the API's own types.
    pub fn request(&self) -> Request {
        // The server resolves paths from its own working directory.
        let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        match self {
            CtlCommand::Stats => Request::Stats,
            CtlCommand::Sync => Request::Sync,
            CtlCommand::Pause => Request::Pause,
            CtlCommand::Resume => Request::Resume,
            CtlCommand::Snapshot(SnapshotCtl::Create { dir, parent, no_resume, live, pause_budget_ms, .. }) => {
                Request::Snapshot(SnapshotRequest {
                    dir: abs(dir),
                    parent: parent.as_ref().map(abs),
                    resume: !no_resume,
                    live: *live,
                    pause_budget_ms: *pause_budget_ms,
                })
            }
            CtlCommand::Migrate(m) => Request::Migrate(MigrateRequest {
                to: m.to.clone().unwrap_or_default(),
                downtime_ms: m.downtime_ms,
                max_rounds: m.max_rounds,
                bandwidth_limit: m.bandwidth_limit,
                compress: if m.compress == "lz4" { Compression::Lz4 } else { Compression::None },
                auto_converge: !m.no_auto_converge,
                verify_memory: m.verify_memory,
                local: m.local,
                postcopy_after: if m.postcopy { Some(0) } else { m.postcopy_after },
                connections: m.connections,
                tls_creds: m.tls_creds.as_ref().map(abs),
                tls_psk: m.tls_psk.as_ref().map(abs),
                tls_psk_identity: m.tls_psk_identity.clone(),
                resume: m.resume,
            }),
            CtlCommand::DirtyRate { seconds } => Request::DirtyRate(DirtyRateRequest { seconds: *seconds }),
            CtlCommand::Stop => Request::Stop,
        }
    }
}

/// `smudge bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark: boot, harvest, writeback, snapshot, migrate, reliability, durable or durable-parts.
    pub name: String,
    /// Print one JSON object (results and goals) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Fewer repetitions (keeps the code path alive in CI; no timing claims).
    #[arg(long)]
    pub quick: bool,
    /// Repetitions per case (median reported).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Directory for scratch files (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// A command-line value that does not parse (clap prints the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// `--wait`: not a number of seconds in range.
    #[error("'{0}': a number of seconds in 0..=3600")]
    Wait(String),
    /// Not a size.
    #[error("{0}")]
    Size(String),
    /// Not a duration.
    #[error("'{0}': a duration such as 500ms, 10s or 2m")]
    Duration(String),
}

/// Parses `500ms`, `10s`, `2m`, `1.5s`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, ArgError> {
    let bad = || ArgError::Duration(s.to_string());
    let (num, unit) = s.trim().split_at(s.trim().find(|c: char| c.is_ascii_alphabetic()).ok_or_else(bad)?);
    let v: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(bad()),
    };
    std::time::Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

/// Parses `-2s` (or `2s`): how far back from the newest epoch.
fn parse_ago(s: &str) -> Result<std::time::Duration, ArgError> {
    parse_duration(s.strip_prefix('-').unwrap_or(s))
}

fn parse_wait(s: &str) -> Result<f64, ArgError> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(ArgError::Wait(s.to_string())),
    }
}

/// Parses `256M`, `1G`, `4096`, `64k` (binary units).
pub fn parse_size(s: &str) -> Result<u64, ArgError> {
    smudge::writeback::parse_bytes(s).map_err(|e| ArgError::Size(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_ago("-2s"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5x").is_err());
    }
}
