//! The snoop thread: it owns every queue's snoop engine, serves the doorbells and the poll of
//! queues with requests in flight, and applies the queue changes the vCPU path posts.
//!
//! What a vCPU and this thread share, and for how long:
//! - the command list: a vCPU pushes a queue enable or a reset, under a lock held for the push;
//! - each queue's gate, a generation number: this thread holds it across one publish and the
//!   ring write that goes with it; a vCPU holds it to retire the queue (bump the generation,
//!   zero the shadow slot). Neither holds it across I/O or a fault-in;
//! - the shadow page (atomics).
//!
//! The engines, their in-flight pins and their fault-ins and DMA maps are this thread's alone, so
//! a guest's queue enable or reset never waits behind a slow fault-in; a retired engine can no
//! longer publish or write the old ring, and its pins are dropped when the thread next wakes.
//! Counters (API thread) read the engines under each queue's own lock.

use crate::vfio_user::VfioUserClient;
use log::warn;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vio::spec::{SLOT_AVAIL_EVENT, SLOT_AVAIL_IDX, SLOT_USED_FLAGS};
use vio::{
    DmaWindow, LatencyHistogram, LogLimiter, PageError, QueueLayout, SnoopHost, SnoopQueue,
    SnoopStats, WalkLimits,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::doorbells::Doorbells;
use super::elastic::{Elastic, SwitchReply};
use super::lockpage::Locks;
use super::shadow::ShadowPage;
use vio::elastic::Mode;

static SNOOP_LOG: LogLimiter = LogLimiter::new(10, 10_000);

/// How far an idle poll backs off: up to this many times `poll_us` between polls.
const MAX_BACKOFF: u32 = 64;

/// A round of the snoop thread longer than this is logged.
const SLOW_ROUND: Duration = Duration::from_millis(500);

/// How often the request rate is sampled (auto mode and `vm.vio-info`).
const SAMPLE_PERIOD: Duration = Duration::from_millis(100);

/// A queue change from the vCPU path, applied by the snoop thread in order.
pub(super) enum Command {
    /// Snoop queue `q` from index 0. The vCPU has acquired the vring's pages (`ring_pages`),
    /// which the engine holds until it is torn down.
    Enable {
        q: u16,
        layout: QueueLayout,
        event_idx: bool,
        generation: u64,
        ring_pages: Vec<u64>,
    },
    /// The device was reset: stop snooping every queue.
    Reset,
    /// Switch the device to `to` (the API); the outcome goes to `reply`.
    Switch { to: Mode, reply: SwitchReply },
}

/// How the VMM rings the device after publishing.
pub(super) enum DeviceKick {
    Fd(EventFd),
    /// No doorbell fd from the device: a region write, as a base-protocol client would.
    Region(u64, u16),
}

#[derive(Default)]
pub(super) struct QueueSlot {
    /// The engine, while the queue is enabled and the device snooped.
    pub snoop: Option<SnoopQueue>,
    /// The enabled queue's ring and whether it uses event-idx, in either mode.
    pub ring: Option<(QueueLayout, bool)>,
    pub generation: u64,
    /// Vring pages held while the queue is enabled.
    pub ring_pages: Vec<u64>,
    /// Stats of earlier incarnations (before a device reset).
    pub past: SnoopStats,
    pub faultin_ns: LatencyHistogram,
}

pub(super) struct Snoop<M> {
    pub id: String,
    pub mem: Arc<M>,
    pub window: Arc<DmaWindow>,
    pub client: Arc<VfioUserClient>,
    pub shadow: ShadowPage,
    pub kicks: Vec<DeviceKick>,
    /// Where the guest's doorbells go; held across a mode switch.
    pub doorbells: Mutex<Doorbells>,
    /// The VIO control block: BAR index and offset.
    pub control: (u32, u64),
    /// Guest RAM as runs of page frame numbers (first, count).
    pub ram: Vec<(u64, u64)>,
    pub elastic: Mutex<Elastic>,
    /// Lockpage, if on: fed every page a request touches.
    pub locks: Option<Locks>,
    gates: Vec<Mutex<u64>>,
    commands: Mutex<Vec<Command>>,
    pub queues: Vec<Mutex<QueueSlot>>,
    /// Enables whose vring could not be set up (bad size, pages outside RAM).
    pub ring_errors: Vec<AtomicU64>,
    poll: Duration,
    stop: AtomicBool,
    wake: EventFd,
    pub polls: AtomicU64,
    /// The snoop thread's own CPU time (its thread CPU clock), updated every sample period and
    /// when it stops: what snooping costs the host.
    pub cpu_ns: AtomicU64,
}

/// The calling thread's CPU time.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub(super) struct QueueHost<'a, M> {
    snoop: &'a Snoop<M>,
    q: u16,
    generation: u64,
    hist: &'a LatencyHistogram,
}

impl<M: GuestMemory + Send + Sync + 'static> SnoopHost for QueueHost<'_, M> {
    fn acquire(&self, gfn: u64) -> Result<bool, PageError> {
        // Only a page that is not mapped can need a fault-in: the common case reads no clock.
        let t0 = (!self.snoop.window.is_mapped(gfn)).then(Instant::now);
        let r = self.snoop.window.acquire(gfn);
        if let (Ok(true), Some(t0)) = (&r, t0) {
            self.hist.record(t0.elapsed().as_nanos() as u64);
        }
        if let (Ok(_), Some(locks)) = (&r, &self.snoop.locks) {
            locks.touch(&self.snoop.window, gfn, matches!(r, Ok(true)));
        }
        r
    }
    fn release(&self, gfn: u64) {
        self.snoop.window.release(gfn);
    }
    fn publish(&self, idx: u16, then: &dyn Fn()) -> bool {
        self.snoop.publish(self.q, self.generation, idx, then)
    }
    fn device_suppression(&self) -> Option<(u16, u16)> {
        let shadow = &self.snoop.shadow;
        Some((
            shadow
                .field(self.q, SLOT_USED_FLAGS)
                .load(Ordering::Acquire),
            shadow
                .field(self.q, SLOT_AVAIL_EVENT)
                .load(Ordering::Acquire),
        ))
    }
    fn kick(&self) {
        self.snoop.kick(self.q);
    }
}

impl<M: GuestMemory + Send + Sync + 'static> Snoop<M> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        mem: Arc<M>,
        window: Arc<DmaWindow>,
        client: Arc<VfioUserClient>,
        shadow: ShadowPage,
        kicks: Vec<DeviceKick>,
        doorbells: Doorbells,
        control: (u32, u64),
        ram: Vec<(u64, u64)>,
        elastic: Elastic,
        locks: Option<Locks>,
        poll: Duration,
    ) -> std::io::Result<Self> {
        let nq = kicks.len();
        Ok(Snoop {
            id,
            mem,
            window,
            client,
            shadow,
            kicks,
            doorbells: Mutex::new(doorbells),
            control,
            ram,
            elastic: Mutex::new(elastic),
            locks,
            gates: (0..nq).map(|_| Mutex::new(0)).collect(),
            commands: Mutex::new(Vec::new()),
            queues: (0..nq).map(|_| Mutex::new(QueueSlot::default())).collect(),
            ring_errors: (0..nq).map(|_| AtomicU64::new(0)).collect(),
            poll,
            stop: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            polls: AtomicU64::new(0),
            cpu_ns: AtomicU64::new(0),
        })
    }

    pub fn queue_count(&self) -> u16 {
        self.kicks.len() as u16
    }

    /// vCPU path: queue `q`'s current engine may no longer publish or write its ring, and the
    /// device reads index 0 from the shadow slot. Returns the queue's new generation.
    pub fn retire(&self, q: u16) -> u64 {
        let mut gate = self.gates[usize::from(q)].lock().unwrap();
        *gate += 1;
        for off in [SLOT_AVAIL_IDX, SLOT_USED_FLAGS, SLOT_AVAIL_EVENT] {
            self.shadow.field(q, off).store(0, Ordering::Release);
        }
        *gate
    }

    /// vCPU path: hands a queue change to the snoop thread.
    pub fn post(&self, cmd: Command) {
        self.commands.lock().unwrap().push(cmd);
        // A full eventfd counter still wakes the thread.
        let _ = self.wake.write(1);
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
    }

    /// Lets a stopped thread's `run` be called again.
    pub fn unstop(&self) {
        self.stop.store(false, Ordering::Release);
    }

    /// Writes queue `q`'s shadow index, then `then`, unless the queue was retired since
    /// `generation`.
    pub fn publish(&self, q: u16, generation: u64, idx: u16, then: &dyn Fn()) -> bool {
        let gate = self.gates[usize::from(q)].lock().unwrap();
        if *gate != generation {
            return false;
        }
        self.shadow
            .field(q, SLOT_AVAIL_IDX)
            .store(idx, Ordering::Release);
        then();
        true
    }

    /// Rings queue `q`'s doorbell on the device.
    pub fn kick(&self, q: u16) {
        let r = match &self.kicks[usize::from(q)] {
            DeviceKick::Fd(fd) => fd.write(1),
            DeviceKick::Region(off, q) => self
                .client
                .region_write(0, *off, &q.to_le_bytes())
                .map_err(std::io::Error::other),
        };
        if let Err(e) = r {
            if SNOOP_LOG.hit() {
                warn!("{}: kicking queue {q}: {e}", self.id);
            }
        }
    }

    pub fn mode(&self) -> Mode {
        self.doorbells.lock().unwrap().mode
    }

    pub(super) fn host<'a>(&'a self, q: u16, slot: &'a QueueSlot) -> QueueHost<'a, M> {
        QueueHost {
            snoop: self,
            q,
            generation: slot.generation,
            hist: &slot.faultin_ns,
        }
    }

    /// Applies the vCPU path's queue changes, in the order they were made, and the mode
    /// switches asked for. A queue's enable was programmed for the mode in force when it was
    /// posted, which is the mode now: a switch applies the commands before it changes mode.
    pub(super) fn apply_commands(&self) {
        let commands = std::mem::take(&mut *self.commands.lock().unwrap());
        for cmd in commands {
            if let Command::Switch { to, reply } = cmd {
                let r = self.switch(to);
                let _ = reply.send(r);
                continue;
            }
            self.apply(cmd);
        }
    }

    /// The queue commands already posted (a switch takes them first, under the doorbell lock).
    pub(super) fn apply_queue_commands(&self, mode: Mode) {
        let mut commands = self.commands.lock().unwrap();
        let mut later = Vec::new();
        for cmd in std::mem::take(&mut *commands) {
            match cmd {
                Command::Switch { .. } => later.push(cmd),
                cmd => self.apply_in(cmd, mode),
            }
        }
        // Switches asked for meanwhile run after this one, in order.
        later.append(&mut commands);
        *commands = later;
    }

    fn apply(&self, cmd: Command) {
        self.apply_in(cmd, self.mode())
    }

    fn apply_in(&self, cmd: Command, mode: Mode) {
        match cmd {
            Command::Reset => {
                for q in 0..self.queue_count() {
                    let mut slot = self.queues[usize::from(q)].lock().unwrap();
                    self.teardown(q, &mut slot);
                    slot.ring = None;
                }
                // The driver's buffers are gone with it; a rebooted guest's are learnt afresh.
                if let Some(locks) = &self.locks {
                    locks.release_all(&self.window);
                }
            }
            // Never here: the callers take switches out of the list first.
            Command::Switch { .. } => {}
            Command::Enable {
                q,
                layout,
                event_idx,
                generation,
                ring_pages,
            } => {
                let mut slot = self.queues[usize::from(q)].lock().unwrap();
                self.teardown(q, &mut slot);
                slot.ring_pages = ring_pages;
                slot.generation = generation;
                slot.ring = Some((layout, event_idx));
                if mode == Mode::Passthrough {
                    // The device reads the guest's ring itself; all of RAM is mapped.
                    return;
                }
                let sq =
                    SnoopQueue::new(layout, 0, WalkLimits::default()).with_event_idx(event_idx);
                // The device now writes its suppression to the shadow page; the guest
                // sees ours. Unless the guest has moved on already.
                if self
                    .host(q, &slot)
                    .publish(0, &|| sq.state_suppression(&*self.mem))
                {
                    slot.snoop = Some(sq);
                }
            }
        }
    }

    /// Stops snooping queue `q`: in-flight pins and the vring are released.
    fn teardown(&self, q: u16, slot: &mut QueueSlot) {
        if let Some(mut sq) = slot.snoop.take() {
            sq.release_all(&self.host(q, slot));
            slot.past.add(&sq.stats);
            slot.past.shadow_idx = sq.stats.shadow_idx;
        }
        for p in slot.ring_pages.drain(..) {
            self.window.release(p);
        }
    }

    /// After the thread has stopped: drops every pin it or a pending command holds.
    pub fn shutdown(&self) {
        for cmd in std::mem::take(&mut *self.commands.lock().unwrap()) {
            if let Command::Enable { ring_pages, .. } = cmd {
                ring_pages.into_iter().for_each(|p| self.window.release(p));
            }
        }
        for q in 0..self.queue_count() {
            self.teardown(q, &mut self.queues[usize::from(q)].lock().unwrap());
        }
        if let Some(locks) = &self.locks {
            locks.release_all(&self.window);
        }
    }

    /// Handles the doorbells in `kicked`, reaps completions, and re-checks queues with requests
    /// in flight. Returns whether any queue still needs polling, and whether it needs it soon:
    /// the pass did something (published, reaped) or left entries behind.
    pub(super) fn service(&self, kicked: &[bool], polling: bool) -> (bool, bool) {
        let (mut again, mut busy) = (false, false);
        for (i, slot) in self.queues.iter().enumerate() {
            let mut slot = slot.lock().unwrap();
            let slot = &mut *slot;
            let kicked = kicked.get(i).copied().unwrap_or(false);
            let Some(mut sq) = slot.snoop.take() else {
                // Passed through: a doorbell the VMM still sees (the device has no doorbell
                // fd, or it was rung during a switch) is the device's.
                if kicked && slot.ring.is_some() {
                    self.kick(i as u16);
                }
                continue;
            };
            let before = sq.progress();
            again |= sq.service(&*self.mem, &self.host(i as u16, slot), kicked, polling);
            busy |= sq.is_behind() || sq.progress() != before;
            if let Some(e) = sq.last_error.take() {
                if SNOOP_LOG.hit() {
                    warn!("{}: queue {i}: {}", self.id, vio::error_chain(&e));
                }
            }
            slot.snoop = Some(sq);
        }
        (again, busy)
    }

    /// The sampler's check for lost doorbells (`SnoopQueue::check_idle`): one found is
    /// reported with everything that decides who should have rung whom, then published.
    fn check_idle(&self) {
        // Before any queue's lock: a switch takes the doorbells' lock first.
        let mode = self.mode();
        for (i, slot) in self.queues.iter().enumerate() {
            let mut slot = slot.lock().unwrap();
            let slot = &mut *slot;
            let Some(mut sq) = slot.snoop.take() else {
                continue;
            };
            if let Some(avail) = sq.check_idle(&*self.mem) {
                let q = i as u16;
                let l = sq.layout;
                let rd = |a: u64| self.mem.read_obj::<u16>(GuestAddress(a)).ok();
                let field = |f| self.shadow.field(q, f).load(Ordering::Acquire);
                warn!(
                    "{}: queue {q}: a doorbell was lost: guest avail {avail}, published {}, \
                     shadow {}, used {:?}, guest avail_event {:?}, used flags {:?}, device \
                     avail_event {} flags {}, mode {}",
                    self.id,
                    sq.published(),
                    field(SLOT_AVAIL_IDX),
                    rd(l.used_ring + 2),
                    rd(l.used_ring + 4 + 8 * u64::from(l.size)),
                    rd(l.used_ring),
                    field(SLOT_AVAIL_EVENT),
                    field(SLOT_USED_FLAGS),
                    mode.name(),
                );
                sq.poll(&*self.mem, &self.host(q, slot));
            }
            slot.snoop = Some(sq);
        }
    }

    pub fn run(self: Arc<Self>) {
        let doorbells = self.doorbells.lock().unwrap().vmm_fds();
        if let Err(e) = self.event_loop(&doorbells) {
            log::error!("{}: snoop thread: {e}", self.id);
        }
        self.cpu_ns.store(thread_cpu_ns(), Ordering::Relaxed);
    }

    fn event_loop(&self, doorbells: &[Arc<EventFd>]) -> std::io::Result<()> {
        let epoll = Epoll::new()?;
        let mut timer = TimerFd::new()?;
        let mut sampler = TimerFd::new()?;
        sampler.reset(SAMPLE_PERIOD, Some(SAMPLE_PERIOD))?;
        let wake_token = doorbells.len() as u64;
        let timer_token = wake_token + 1;
        let fds = doorbells.iter().map(|fd| fd.as_raw_fd()).chain([
            self.wake.as_raw_fd(),
            timer.as_raw_fd(),
            sampler.as_raw_fd(),
        ]);
        for (token, fd) in fds.enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token as u64),
            )?;
        }
        let mut events = vec![EpollEvent::default(); doorbells.len() + 3];
        let mut armed = false;
        let mut period = self.poll;
        while !self.stop.load(Ordering::Acquire) {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let t0 = Instant::now();
            let mut kicked = vec![false; doorbells.len()];
            let mut polling = false;
            for ev in &events[..n] {
                let t = ev.data();
                if t < wake_token {
                    let _ = doorbells[t as usize].read();
                    kicked[t as usize] = true;
                } else if t == wake_token {
                    let _ = self.wake.read();
                } else if t == timer_token {
                    let _ = timer.wait();
                    polling = true;
                    self.polls.fetch_add(1, Ordering::Relaxed);
                } else {
                    let _ = sampler.wait();
                    self.cpu_ns.store(thread_cpu_ns(), Ordering::Relaxed);
                    self.sample();
                    self.check_idle();
                    if let Some(locks) = &self.locks {
                        locks.sample(&self.window, SAMPLE_PERIOD);
                    }
                }
            }
            // A doorbell seen here was rung after the queue change that preceded it was
            // posted, so the change is applied first.
            self.apply_commands();
            let t1 = Instant::now();
            // While anything is in flight completions must be reaped (they release pins), and
            // entries left behind must be published: poll.
            let (again, busy) = self.service(&kicked, polling);
            // Nothing is published while this thread is elsewhere: a long absence is worth a
            // line (a guest gives up after a few seconds without completions).
            if t0.elapsed() > SLOW_ROUND && SNOOP_LOG.hit() {
                warn!(
                    "{}: snoop thread away {} ms (timers and commands {} ms, queues {} ms)",
                    self.id,
                    t0.elapsed().as_millis(),
                    (t1 - t0).as_millis(),
                    t1.elapsed().as_millis()
                );
            }
            // A poll that found nothing to do doubles the period, up to MAX_BACKOFF times
            // `poll_us`: a receive queue keeps its posted buffers in flight for as long as no
            // frame comes, and an idle device should not wake the VMM a thousand times a
            // second. Work done, a doorbell, or entries left behind bring the period back.
            let next = if busy || kicked.iter().any(|&k| k) {
                self.poll
            } else if polling {
                (period * 2).min(self.poll * MAX_BACKOFF)
            } else {
                period
            };
            if again != armed || (again && next != period) {
                if again {
                    timer.reset(next, Some(next))?;
                } else {
                    timer.clear()?;
                }
                armed = again;
            }
            period = next;
        }
        Ok(())
    }
}
