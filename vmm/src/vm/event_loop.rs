//! The VMM's main loop: an event-manager epoll loop with a `TimerFd` tick
//! (the hook periodic work such as a flusher plugs into) and the vCPUs'
//! exit event.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// Work to run at every tick; gets the time since the run started.
pub type TickHook = Box<dyn FnMut(Duration) + Send>;

/// A file descriptor to watch and what to do when it is readable.
pub type Watch = (RawFd, Box<dyn FnMut() + Send>);

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopEnd {
    /// A vCPU recorded an outcome.
    VcpuExit,
    /// The timeout passed first.
    Timeout(Duration),
}

struct Controller {
    exit_evt: EventFd,
    timer: TimerFd,
    start: Instant,
    timeout: Option<Duration>,
    hooks: Vec<TickHook>,
    watches: Vec<Watch>,
    end: Option<LoopEnd>,
    ticks: u64,
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        let extra: Vec<RawFd> = self.watches.iter().map(|(fd, _)| *fd).collect();
        for fd in [self.exit_evt.as_raw_fd(), self.timer.as_raw_fd()].into_iter().chain(extra) {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("event loop: cannot watch fd {fd}: {e:?}");
                self.end = Some(LoopEnd::VcpuExit);
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.exit_evt.as_raw_fd() {
            let _ = self.exit_evt.read();
            self.end = Some(LoopEnd::VcpuExit);
        } else if events.fd() == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            self.ticks += 1;
            let t = self.start.elapsed();
            for h in &mut self.hooks {
                h(t);
            }
            if let Some(limit) = self.timeout.filter(|l| t >= *l) {
                self.end.get_or_insert(LoopEnd::Timeout(limit));
            }
        } else if let Some((_, f)) = self.watches.iter_mut().find(|(fd, _)| *fd == events.fd()) {
            f();
        }
    }
}

/// Runs the loop until a vCPU exits or `timeout` passes.
pub fn run(
    exit_evt: &EventFd,
    tick: Duration,
    timeout: Option<Duration>,
    hooks: Vec<TickHook>,
    watches: Vec<Watch>,
) -> std::io::Result<LoopEnd> {
    let mut timer = TimerFd::new()?;
    timer.reset(tick, Some(tick))?;
    let controller = Controller {
        exit_evt: exit_evt.try_clone()?,
        timer,
        start: Instant::now(),
        timeout,
        hooks,
        watches,
        end: None,
        ticks: 0,
    };
    let mut em = EventManager::<Controller>::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    let id = em.add_subscriber(controller);
    loop {
        em.run().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let c = em.subscriber_mut(id).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        if let Some(end) = c.end {
            tracing::debug!("event loop ends after {} ticks: {end:?}", c.ticks);
            return Ok(end);
        }
    }
}
