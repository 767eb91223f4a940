//! The background tasks of a running VM — writeback's flusher, snapshot
//! pre-copy, the heatmap, the periodic dirty-log work, stats, a timed
//! snapshot and the control API (which serves snapshots and migrations) —
//! all started and stopped through one interface, [`Task`], and held by one
//! registry, [`Tasks`].
//!
//! A task runs on a thread of its own ([`ThreadTask`]) or on the event loop
//! ([`LoopTask`], [`LoopPart`]). The registry stops them in a defined order:
//! the last started first, each stopped and joined before the next, so a
//! task never outlives one it uses (the API, started last, ends before the
//! flusher it syncs through).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::vm::event_loop::{TickHook, Watch};
use crate::vm::vcpu::Shared;

/// Why a task did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// Its thread could not be started.
    #[error("spawning the {name} thread")]
    Spawn {
        /// The task.
        name: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Its thread panicked.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
}

/// What a task runs on the event loop.
pub enum LoopPart {
    /// Work at every tick.
    Tick(TickHook),
    /// Work when a file descriptor is readable.
    Watch(Watch),
}

impl std::fmt::Debug for LoopPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoopPart::Tick(_) => f.write_str("Tick"),
            LoopPart::Watch((fd, _)) => write!(f, "Watch({fd})"),
        }
    }
}

/// One background task of a running VM.
pub trait Task: Send {
    /// Its name, for logs and errors.
    fn name(&self) -> &'static str;
    /// What it runs on the event loop, handed over once when the loop
    /// starts (None: nothing; a thread task).
    fn take_loop_part(&mut self) -> Option<LoopPart>;
    /// Tells it to stop; returns at once.
    fn stop(&mut self);
    /// Waits until it has ended and let go of what it held.
    fn join(self: Box<Self>) -> Result<(), TaskError>;
}

/// What a task thread polls to know it must end: its own stop, or the
/// VM's (every vCPU is told to stop).
#[derive(Debug, Clone)]
pub struct StopFlag {
    task: Arc<AtomicBool>,
    vm: Arc<Shared>,
}

impl StopFlag {
    /// Whether the task must end now.
    pub fn is_set(&self) -> bool {
        self.task.load(Ordering::Acquire) || self.vm.stop.load(Ordering::Acquire)
    }
}

/// A task on a thread of its own. The thread waits with
/// `std::thread::park_timeout` between rounds of work: a stop unparks it.
#[derive(Debug)]
pub struct ThreadTask {
    name: &'static str,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl ThreadTask {
    /// Starts `body` on a thread named `thread_name`; it gets the flag that
    /// tells it to end.
    pub fn spawn(
        name: &'static str,
        thread_name: &str,
        vm: &Arc<Shared>,
        body: impl FnOnce(StopFlag) + Send + 'static,
    ) -> Result<ThreadTask, TaskError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = StopFlag { task: stop.clone(), vm: vm.clone() };
        let thread = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || body(flag))
            .map_err(|source| TaskError::Spawn { name, source })?;
        Ok(ThreadTask { name, stop, thread })
    }
}

impl Task for ThreadTask {
    fn name(&self) -> &'static str {
        self.name
    }

    fn take_loop_part(&mut self) -> Option<LoopPart> {
        None
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.thread.thread().unpark();
    }

    fn join(self: Box<Self>) -> Result<(), TaskError> {
        self.thread.join().map_err(|_| TaskError::Panicked(self.name))
    }
}

/// A task on the event loop: it ends with the loop, and what it held goes
/// with its [`LoopPart`].
#[derive(Debug)]
pub struct LoopTask {
    name: &'static str,
    part: Option<LoopPart>,
}

impl LoopTask {
    /// `f` at every event-loop tick, with the time since the loop started.
    pub fn tick(name: &'static str, f: impl FnMut(std::time::Duration) + Send + 'static) -> LoopTask {
        LoopTask { name, part: Some(LoopPart::Tick(Box::new(f))) }
    }
}

impl Task for LoopTask {
    fn name(&self) -> &'static str {
        self.name
    }

    fn take_loop_part(&mut self) -> Option<LoopPart> {
        self.part.take()
    }

    fn stop(&mut self) {}

    fn join(self: Box<Self>) -> Result<(), TaskError> {
        Ok(())
    }
}

/// The tasks of one run, in the order they started.
#[derive(Default)]
pub struct Tasks {
    started: Vec<Box<dyn Task>>,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.started.iter().map(|t| t.name())).finish()
    }
}

impl Tasks {
    /// Adds a started task: it stops before every task added earlier.
    pub fn add(&mut self, task: impl Task + 'static) {
        tracing::debug!("task {} started", task.name());
        self.started.push(Box::new(task));
    }

    /// The names of the tasks, in the order they started.
    pub fn names(&self) -> Vec<&'static str> {
        self.started.iter().map(|t| t.name()).collect()
    }

    /// What the tasks run on the event loop: its tick hooks and watches.
    pub fn loop_parts(&mut self) -> (Vec<TickHook>, Vec<Watch>) {
        let (mut hooks, mut watches) = (Vec::new(), Vec::new());
        for part in self.started.iter_mut().filter_map(|t| t.take_loop_part()) {
            match part {
                LoopPart::Tick(h) => hooks.push(h),
                LoopPart::Watch(w) => watches.push(w),
            }
        }
        (hooks, watches)
    }

    /// Stops every task, the last started first, each stopped and joined
    /// before the next. All are stopped; the first failure is returned.
    pub fn stop_all(mut self) -> Result<(), TaskError> {
        let mut first = Ok(());
        while let Some(mut t) = self.started.pop() {
            let name = t.name();
            t.stop();
            let joined = t.join();
            tracing::debug!("task {name} stopped");
            if first.is_ok() {
                first = joined;
            }
        }
        first
    }
}

impl Drop for Tasks {
    /// A run that fails after some tasks started stops them all the same.
    fn drop(&mut self) {
        if !self.started.is_empty() {
            let left = Tasks { started: std::mem::take(&mut self.started) };
            if let Err(e) = left.stop_all() {
                tracing::error!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A task that records when it is stopped and joined.
    struct Recorder(&'static str, Arc<Mutex<Vec<String>>>);

    impl Task for Recorder {
        fn name(&self) -> &'static str {
            self.0
        }
        fn take_loop_part(&mut self) -> Option<LoopPart> {
            None
        }
        fn stop(&mut self) {
            self.1.lock().unwrap().push(format!("stop {}", self.0));
        }
        fn join(self: Box<Self>) -> Result<(), TaskError> {
            self.1.lock().unwrap().push(format!("join {}", self.0));
            match self.0 {
                "b" => Err(TaskError::Panicked("b")),
                _ => Ok(()),
            }
        }
    }

    #[test]
    fn tasks_stop_last_started_first_and_all_are_joined() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Tasks::default();
        for name in ["a", "b", "c"] {
            tasks.add(Recorder(name, log.clone()));
        }
        assert_eq!(tasks.names(), ["a", "b", "c"]);
        let end = tasks.stop_all();
        assert_eq!(end.unwrap_err().to_string(), "the b thread panicked");
        assert_eq!(*log.lock().unwrap(), ["stop c", "join c", "stop b", "join b", "stop a", "join a"]);
    }

    #[test]
    fn tasks_left_running_are_stopped_when_dropped() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Tasks::default();
        tasks.add(Recorder("a", log.clone()));
        tasks.add(Recorder("c", log.clone()));
        drop(tasks);
        assert_eq!(*log.lock().unwrap(), ["stop c", "join c", "stop a", "join a"]);
    }

    fn shared() -> Arc<Shared> {
        use crate::vm::devices::{PortBus, SerialConsole};
        use vmm_sys_util::eventfd::EventFd;
        let fd = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Arc::new(Shared::new(
            fd(),
            PortBus::new(SerialConsole::new(fd(), Box::new(std::io::sink()))),
            None,
            None,
            false,
        ))
    }

    /// A thread task that reports each round on `rounds` and then parks
    /// for an hour: only a stop's unpark ends it in a test's time.
    fn reporter(vm: &Arc<Shared>) -> (ThreadTask, std::sync::mpsc::Receiver<()>) {
        let (tx, rounds) = std::sync::mpsc::channel();
        let task = ThreadTask::spawn("reporter", "test-reporter", vm, move |stop| {
            while !stop.is_set() {
                let _ = tx.send(());
                std::thread::park_timeout(std::time::Duration::from_secs(3600));
            }
        })
        .unwrap();
        (task, rounds)
    }

    #[test]
    fn a_thread_task_ends_when_stopped_or_when_the_vm_stops() {
        let limit = std::time::Duration::from_secs(30);
        // Its own stop, through the registry: the park is cut short.
        let vm = shared();
        let (task, rounds) = reporter(&vm);
        rounds.recv_timeout(limit).expect("the task's first round within 30 s");
        let mut tasks = Tasks::default();
        tasks.add(task);
        let t0 = std::time::Instant::now();
        assert!(tasks.stop_all().is_ok());
        assert!(t0.elapsed() < limit, "the stop did not wake the parked task: {:?}", t0.elapsed());
        // The VM's stop ends it too (woken as a stop would).
        let vm = shared();
        let (task, rounds) = reporter(&vm);
        rounds.recv_timeout(limit).expect("the task's first round within 30 s");
        vm.stop.store(true, Ordering::Release);
        task.thread.thread().unpark();
        let t0 = std::time::Instant::now();
        assert!(Box::new(task).join().is_ok());
        assert!(t0.elapsed() < limit, "the VM's stop did not end the task: {:?}", t0.elapsed());
    }

    #[test]
    fn a_panicked_thread_task_is_named_in_the_error() {
        let task = ThreadTask::spawn("doomed", "test-doomed", &shared(), |_| panic!("on purpose")).unwrap();
        assert_eq!(Box::new(task).join().unwrap_err().to_string(), "the doomed thread panicked");
    }

    #[test]
    fn loop_parts_are_handed_over_once() {
        let mut tasks = Tasks::default();
        tasks.add(LoopTask::tick("one", |_| {}));
        tasks.add(LoopTask::tick("two", |_| {}));
        assert_eq!(tasks.loop_parts().0.len(), 2);
        assert_eq!(tasks.loop_parts().0.len(), 0);
        assert!(tasks.stop_all().is_ok());
    }
}
