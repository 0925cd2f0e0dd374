//! A device's worker thread: it serves the device's queues until stopped and then hands them
//! back (a live upgrade takes them over, a failed one runs them again).

use crate::{
    ActivateError, ActiveQueue, Counters, MemoryView, PauseGate, QueuePosition, VirtioInterrupt,
};
use log::warn;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

/// What the thread watches to know it must stop or park.
pub struct WorkerControl {
    pub kill: EventFd,
    pub gate: Arc<PauseGate>,
}

pub struct WorkerThread {
    name: &'static str,
    kill: EventFd,
    gate: Arc<PauseGate>,
    handle: JoinHandle<Vec<ActiveQueue>>,
}

impl WorkerThread {
    /// Starts `run` on `queues` in a thread called `name`, confined to the seccomp rules of
    /// that name.
    pub fn spawn<F>(name: &'static str, mut queues: Vec<ActiveQueue>, run: F) -> io::Result<Self>
    where
        F: FnOnce(WorkerControl, &mut [ActiveQueue]) + Send + 'static,
    {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let gate = Arc::new(PauseGate::new()?);
        let control = WorkerControl {
            kill: kill.try_clone()?,
            gate: gate.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                crate::seccomp::narrow(name);
                run(control, &mut queues);
                queues
            })?;
        Ok(WorkerThread {
            name,
            kill,
            gate,
            handle,
        })
    }

    pub fn pause(&self) {
        if !self.gate.pause(Duration::from_secs(5)) {
            warn!("{}: worker did not pause", self.name);
        }
    }

    pub fn resume(&self) {
        self.gate.resume();
    }

    /// Stops the thread (a paused one is parked between requests: nothing is half done) and
    /// takes its queues back.
    pub fn stop(self) -> Vec<ActiveQueue> {
        let _ = self.kill.write(1);
        self.gate.resume();
        self.handle.join().unwrap_or_default()
    }
}

/// A device's side of its worker: the running thread, or the queues it handed back when it
/// stopped for a live upgrade (to run again if the upgrade fails).
#[derive(Default)]
pub struct DeviceWorker {
    thread: Option<WorkerThread>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    stopped: Option<Vec<ActiveQueue>>,
}

impl DeviceWorker {
    /// `spawn` starts the thread on `queues` (raising `interrupt`, kept for a restart).
    pub fn start(
        &mut self,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
        spawn: impl FnOnce(Vec<ActiveQueue>) -> io::Result<WorkerThread>,
    ) -> Result<(), ActivateError> {
        self.interrupt = Some(interrupt);
        self.thread = Some(spawn(queues).map_err(ActivateError::Worker)?);
        Ok(())
    }

    pub fn reset(&mut self) {
        self.stopped = None;
        if let Some(t) = self.thread.take() {
            t.stop();
        }
    }

    pub fn pause(&self) {
        if let Some(t) = &self.thread {
            t.pause();
        }
    }

    pub fn resume(&self) {
        if let Some(t) = &self.thread {
            t.resume();
        }
    }

    /// Stops the thread (paused: between requests) and says where each queue is.
    pub fn stop_for_handover(&mut self) -> Vec<QueuePosition> {
        let Some(t) = self.thread.take() else {
            return Vec::new();
        };
        let queues = t.stop();
        let positions = queues
            .iter()
            .map(|q| QueuePosition {
                index: q.index,
                next_avail: q.queue.next_avail(),
                next_used: q.queue.next_used(),
            })
            .collect();
        self.stopped = Some(queues);
        positions
    }

    /// What `start` needs to run the stopped queues again, if any.
    pub fn take_stopped(&mut self) -> Option<(Arc<dyn VirtioInterrupt>, Vec<ActiveQueue>)> {
        let queues = self.stopped.take()?;
        Some((self.interrupt.clone()?, queues))
    }
}

/// Refuses queues whose rings do not lie in the memory the device reaches.
pub fn check_queues<V: MemoryView>(
    queues: &[ActiveQueue],
    memory: &V,
) -> Result<(), ActivateError> {
    let view = memory.view();
    match queues.iter().find(|q| !q.queue.is_valid(&*view)) {
        Some(q) => Err(ActivateError::BadQueue(format!(
            "queue {} lies outside guest memory",
            q.index
        ))),
        None => Ok(()),
    }
}

/// Per queue: doorbells seen and chains served.
#[derive(Default)]
pub struct QueueStats {
    pub kicks: AtomicU64,
    pub chains: AtomicU64,
}

impl QueueStats {
    /// `queue<i>_kicks` and `queue<i>_<chains>` of every queue, into `c`.
    pub fn report(stats: &[QueueStats], chains: &str, c: &mut Counters) {
        for (i, q) in stats.iter().enumerate() {
            c.insert(format!("queue{i}_kicks"), q.kicks.load(Ordering::Relaxed));
            c.insert(
                format!("queue{i}_{chains}"),
                q.chains.load(Ordering::Relaxed),
            );
        }
    }
}
