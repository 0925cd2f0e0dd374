//! The virtio-blk worker: one thread serving every queue of a device, over any view of guest
//! memory, with the service-time model (completions held until their deadline) and, for a
//! device that raises page requests, queues parked on a missing page (`pri`).

use super::disk::RawFile;
use super::engine::{BlockCounters, BlockEngine, Completion, Drained};
use super::pri::{PageRequester, Parking};
use super::VIRTIO_BLK_ID_BYTES;
use crate::thread::{QueueStats, WorkerControl};
use crate::{ActiveQueue, MemoryView, VirtioInterrupt, VirtioInterruptType};
use log::{error, warn};
use std::collections::VecDeque;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

/// Chains per hold of the memory view: at a few microseconds each (4 KiB on tmpfs), whoever
/// waits for the view (an unmap, a VIO capture) waits about 0.1 ms, well inside the 1 ms an
/// elastic switch may pause the device; taking the view again costs next to nothing.
const BATCH: usize = 32;

/// What the worker thread is given.
pub(super) struct WorkerParts<V> {
    pub disk: Arc<RawFile>,
    pub serial: Arc<[u8; VIRTIO_BLK_ID_BYTES]>,
    pub counters: Arc<BlockCounters>,
    pub queue_stats: Arc<Vec<QueueStats>>,
    pub mem: Arc<V>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Service-time model: a request completes no earlier than this after it was seen.
    pub latency: Option<Duration>,
    pub pri: Option<Arc<dyn PageRequester>>,
}

struct Worker<'q, V> {
    p: WorkerParts<V>,
    control: WorkerControl,
    queues: &'q mut [ActiveQueue],
    /// Per queue, completions waiting for their deadline (latency model).
    pending: Vec<VecDeque<(u16, u32, Instant)>>,
    timer: TimerFd,
    parking: Option<Parking>,
}

/// Runs until killed; the queues stay the caller's (a live upgrade takes them over).
pub(super) fn run<V: MemoryView>(
    p: WorkerParts<V>,
    control: WorkerControl,
    queues: &mut [ActiveQueue],
) {
    let timer = match TimerFd::new() {
        Ok(t) => t,
        Err(e) => return error!("virtio-blk: timerfd: {e}"),
    };
    let parking = p.pri.clone().map(|r| Parking::new(r, queues.len()));
    let mut w = Worker {
        pending: queues.iter().map(|_| VecDeque::new()).collect(),
        p,
        control,
        queues,
        timer,
        parking,
    };
    if let Err(e) = w.run() {
        error!("virtio-blk: worker: {e}");
    }
}

impl<V: MemoryView> Worker<'_, V> {
    fn run(&mut self) -> std::io::Result<()> {
        let epoll = Epoll::new()?;
        let n = self.queues.len() as u64;
        let (kill, pause, timer, pri) = (n, n + 1, n + 2, n + 3);
        let mut fds = vec![
            (self.control.kill.as_raw_fd(), kill),
            (self.control.gate.wake.as_raw_fd(), pause),
            (self.timer.as_raw_fd(), timer),
        ];
        fds.extend(
            self.queues
                .iter()
                .enumerate()
                .map(|(i, q)| (q.kick.as_raw_fd(), i as u64)),
        );
        fds.extend(
            self.parking
                .as_ref()
                .map(|p| (p.wake_fd().as_raw_fd(), pri)),
        );
        for (fd, token) in fds {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let mut events = vec![EpollEvent::default(); self.queues.len() + 4];
        loop {
            // A parked queue's deadline bounds the sleep: it runs again then, answered or not.
            let wait = self
                .parking
                .as_ref()
                .and_then(|p| p.next_wait(Instant::now()))
                .map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32 + 1);
            let n = match epoll.wait(wait, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut serve = Vec::new();
            // Doorbells read in the same wake-up as the kill are served first: a worker
            // stopped for a live upgrade hands over queues with no doorbell swallowed.
            let mut killed = false;
            for ev in &events[..n] {
                match ev.data() {
                    t if t == kill => killed = true,
                    t if t == pause => self.control.gate.park_if_paused(),
                    t if t == timer => {
                        let _ = self.timer.wait();
                        self.complete_due();
                    }
                    t if t == pri => {
                        if let Some(p) = &self.parking {
                            let _ = p.wake_fd().read();
                        }
                    }
                    q => {
                        let q = q as usize;
                        let _ = self.queues[q].kick.read();
                        if let Some(st) = self.p.queue_stats.get(self.queues[q].index as usize) {
                            st.kicks.fetch_add(1, Ordering::Relaxed);
                        }
                        serve.push(q);
                    }
                }
            }
            if let Some(p) = &mut self.parking {
                let ready = p.ready(Instant::now());
                if !ready.is_empty() {
                    // Completions held back while a queue waited go out now.
                    self.arm_timer(Instant::now());
                }
                serve.extend(ready);
            }
            serve.sort_unstable();
            serve.dedup();
            for q in serve {
                // A doorbell for a parked queue waits for the page like the rest of the queue.
                if !self.parking.as_ref().is_some_and(|p| p.is_parked(q)) {
                    self.serve(q);
                }
            }
            if killed {
                return Ok(());
            }
        }
    }

    /// Runs queue `qi`'s available chains. The view is held for a batch of at most `BATCH`
    /// chains: a DMA unmap or a VIO control write waits for it, so a driver that keeps the ring
    /// full must not make the batch endless. Between batches the view is dropped and taken
    /// again.
    fn serve(&mut self, qi: usize) {
        let before = self.p.counters.requests();
        let mem = self.p.mem.clone();
        // A fault left over from elsewhere (a completion's used-ring write) is not this
        // queue's requests'.
        let _ = mem.take_fault();
        loop {
            let view = mem.view();
            let engine = BlockEngine {
                disk: &self.p.disk,
                serial: &self.p.serial,
                counters: &self.p.counters,
            };
            let q = &mut self.queues[qi];
            let parking = &mut self.parking;
            // Shared by the completion and the unreadable-entry hooks: one queue, one request
            // outstanding.
            let hand_back = std::cell::RefCell::new(|| {
                parking
                    .as_mut()
                    .is_some_and(|p| p.hand_back(qi, mem.take_fault()))
            });
            let hand_back = || (hand_back.borrow_mut())();
            let mut used_any = false;
            let mut arm = None;
            let result = match self.p.latency {
                None => engine
                    .drain_some_or_wait(
                        &mut q.queue,
                        &*view,
                        BATCH,
                        |queue, head, len| {
                            if hand_back() {
                                return Ok(Completion::HandBack);
                            }
                            match queue.add_used(&*view, head, len) {
                                Ok(()) => {
                                    used_any = true;
                                    Ok(Completion::Done)
                                }
                                // The used ring itself was unreachable: the request runs
                                // again once it is.
                                Err(_) if hand_back() => Ok(Completion::HandBack),
                                Err(e) => Err(e),
                            }
                        },
                        hand_back,
                    )
                    .and_then(|d| {
                        let notify = used_any && q.queue.needs_notification(&*view)?;
                        Ok((notify, d))
                    }),
                Some(lat) => {
                    let seen = Instant::now();
                    let due = &mut self.pending[qi];
                    let was_idle = due.is_empty();
                    let r = engine.drain_some_or_wait(
                        &mut q.queue,
                        &*view,
                        BATCH,
                        |_, head, len| {
                            if hand_back() {
                                return Ok(Completion::HandBack);
                            }
                            due.push_back((head, len, seen + lat));
                            Ok(Completion::Done)
                        },
                        hand_back,
                    );
                    if was_idle && !due.is_empty() {
                        arm = Some(seen);
                    }
                    r.map(|d| (false, d))
                }
            };
            drop(view);
            if let Some(seen) = arm {
                self.arm_timer(seen);
            }
            let index = self.queues[qi].index;
            let more = match result {
                Ok((notify, drained)) => {
                    if notify {
                        self.interrupt(index);
                    }
                    drained == Drained::Budget
                }
                Err(e) => {
                    // Nothing was popped (the ring itself was unreachable): ask for its page.
                    let fault = mem.take_fault();
                    if !self
                        .parking
                        .as_mut()
                        .is_some_and(|p| p.hand_back(qi, fault))
                    {
                        warn!("virtio-blk: queue {index}: {e}");
                    }
                    false
                }
            };
            if !more {
                break;
            }
        }
        if let Some(st) = self.p.queue_stats.get(self.queues[qi].index as usize) {
            st.chains
                .fetch_add(self.p.counters.requests() - before, Ordering::Relaxed);
        }
    }

    /// The latency model's timer: completes what is due, on every queue not waiting for a page.
    fn complete_due(&mut self) {
        let now = Instant::now();
        let mem = self.p.mem.clone();
        let view = mem.view();
        for qi in 0..self.queues.len() {
            if self.parking.as_ref().is_some_and(|p| p.is_parked(qi)) {
                continue;
            }
            let q = &mut self.queues[qi];
            let due = &mut self.pending[qi];
            let mut used = false;
            while let Some(&(head, len, t)) = due.front().filter(|&&(_, _, t)| t <= now) {
                due.pop_front();
                let _ = mem.take_fault();
                if let Err(e) = q.queue.add_used(&*view, head, len) {
                    let fault = mem.take_fault();
                    if self
                        .parking
                        .as_mut()
                        .is_some_and(|p| p.hand_back(qi, fault))
                    {
                        // The used ring's page first; this completion waits at the front.
                        due.push_front((head, len, t));
                        break;
                    }
                    warn!("virtio-blk: queue {}: {e}", q.index);
                }
                used = true;
            }
            if used && q.queue.needs_notification(&*view).unwrap_or(true) {
                let index = q.index;
                self.interrupt(index);
            }
        }
        drop(view);
        self.arm_timer(now);
    }

    fn interrupt(&self, index: u16) {
        if let Err(e) = self.p.interrupt.trigger(VirtioInterruptType::Queue(index)) {
            warn!("virtio-blk: interrupt: {e}");
        }
    }

    /// Arms the timer for the earliest pending completion of a queue not waiting for a page
    /// (or disarms it).
    fn arm_timer(&mut self, now: Instant) {
        let parking = &self.parking;
        let next = self
            .pending
            .iter()
            .enumerate()
            .filter(|(q, _)| !parking.as_ref().is_some_and(|p| p.is_parked(*q)))
            .filter_map(|(_, p)| p.front().map(|&(_, _, t)| t))
            .min();
        let r = match next {
            // A zero duration would disarm the timer: fire as soon as possible instead.
            Some(t) => self.timer.reset(
                t.saturating_duration_since(now)
                    .max(Duration::from_nanos(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        if let Err(e) = r {
            warn!("virtio-blk: timerfd: {e}");
        }
    }
}
