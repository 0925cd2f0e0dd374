//! virtio-blk served by one worker thread for all its queues, over any view of guest memory.

use super::disk::RawFile;
use super::engine::{BlockCounters, BlockEngine};
use super::*;
use crate::{
    read_config_bytes, ActivateError, ActiveQueue, Counters, GuestMemoryMmap, MemoryView,
    PauseGate, QueuePosition, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK,
};
use log::{error, warn};
use std::collections::VecDeque;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

pub const DEFAULT_QUEUE_SIZE: u16 = 256;
const CONFIG_LEN: usize = 60;

pub struct BlockConfig {
    pub id: String,
    pub num_queues: u16,
    pub queue_size: u16,
    /// Service-time model: each request completes no earlier than this after the device saw it.
    pub latency: Option<Duration>,
}

struct Worker {
    kill: EventFd,
    gate: Arc<PauseGate>,
    /// The worker hands its queues back when it stops.
    handle: JoinHandle<Vec<ActiveQueue>>,
}

/// Per queue: doorbells seen and requests served.
#[derive(Default)]
struct QueueStats {
    kicks: AtomicU64,
    requests: AtomicU64,
}

pub struct Block<V: MemoryView = GuestMemoryMmap> {
    disk: Arc<RawFile>,
    serial: Arc<[u8; VIRTIO_BLK_ID_BYTES]>,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: Vec<u16>,
    counters: Arc<BlockCounters>,
    queue_stats: Arc<Vec<QueueStats>>,
    memory: Arc<V>,
    latency: Option<Duration>,
    worker: Option<Worker>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    /// Queues of a worker stopped for a live upgrade, to run again if it fails.
    stopped: Option<Vec<ActiveQueue>>,
}

/// Features every virtio-blk of this project offers (the emulated disk and vdpu alike).
pub fn block_features(readonly: bool) -> u64 {
    let mut f = VIRTIO_F_VERSION_1
        | VIRTIO_F_RING_INDIRECT_DESC
        | VIRTIO_F_RING_EVENT_IDX
        | VIRTIO_BLK_F_SEG_MAX
        | VIRTIO_BLK_F_BLK_SIZE
        | VIRTIO_BLK_F_FLUSH;
    if readonly {
        f |= VIRTIO_BLK_F_RO;
    }
    f
}

/// virtio_blk_config: capacity, size_max, seg_max, geometry, blk_size, topology, ..., num_queues.
pub fn block_config_space(
    capacity_sectors: u64,
    queue_size: u16,
    num_queues: u16,
) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    // seg_max: the queue minus header and status descriptors, as Linux expects.
    c[12..16].copy_from_slice(&u32::from(queue_size.saturating_sub(2)).to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    c
}

/// The 20-byte device id reported by GET_ID.
pub fn block_serial(id: &str) -> [u8; VIRTIO_BLK_ID_BYTES] {
    let mut s = [0u8; VIRTIO_BLK_ID_BYTES];
    let b = id.as_bytes();
    let n = b.len().min(VIRTIO_BLK_ID_BYTES);
    s[..n].copy_from_slice(&b[..n]);
    s
}

impl<V: MemoryView> Block<V> {
    pub fn new(disk: RawFile, cfg: &BlockConfig, memory: Arc<V>) -> Self {
        let capacity = disk.size() / SECTOR_SIZE;
        Block {
            avail_features: block_features(disk.readonly()),
            acked_features: 0,
            config: block_config_space(capacity, cfg.queue_size, cfg.num_queues),
            queue_sizes: vec![cfg.queue_size; cfg.num_queues as usize],
            serial: Arc::new(block_serial(&cfg.id)),
            disk: Arc::new(disk),
            counters: Arc::new(BlockCounters::default()),
            queue_stats: Arc::new((0..cfg.num_queues).map(|_| QueueStats::default()).collect()),
            memory,
            latency: cfg.latency,
            worker: None,
            interrupt: None,
            stopped: None,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_worker<V: MemoryView>(
    disk: Arc<RawFile>,
    serial: Arc<[u8; VIRTIO_BLK_ID_BYTES]>,
    counters: Arc<BlockCounters>,
    queue_stats: Arc<Vec<QueueStats>>,
    mem: Arc<V>,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: &mut [ActiveQueue],
    kill: EventFd,
    gate: Arc<PauseGate>,
    latency: Option<Duration>,
) {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => return error!("virtio-blk: epoll: {e}"),
    };
    let kill_token = queues.len() as u64;
    let pause_token = kill_token + 1;
    let mut setup = epoll.ctl(
        ControlOperation::Add,
        kill.as_raw_fd(),
        EpollEvent::new(EventSet::IN, kill_token),
    );
    setup = setup.and(epoll.ctl(
        ControlOperation::Add,
        gate.wake.as_raw_fd(),
        EpollEvent::new(EventSet::IN, pause_token),
    ));
    for (i, q) in queues.iter().enumerate() {
        setup = setup.and(epoll.ctl(
            ControlOperation::Add,
            q.kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i as u64),
        ));
    }
    if let Err(e) = setup {
        return error!("virtio-blk: epoll setup: {e}");
    }
    let engine = BlockEngine {
        disk: &disk,
        serial: &serial,
        counters: &counters,
    };
    // The service-time model: completions wait in per-queue FIFOs until their deadline.
    let timer_token = pause_token + 1;
    let mut timer = match TimerFd::new() {
        Ok(t) => t,
        Err(e) => return error!("virtio-blk: timerfd: {e}"),
    };
    if let Err(e) = epoll.ctl(
        ControlOperation::Add,
        timer.as_raw_fd(),
        EpollEvent::new(EventSet::IN, timer_token),
    ) {
        return error!("virtio-blk: epoll setup: {e}");
    }
    let mut pending: Vec<VecDeque<(u16, u32, Instant)>> =
        queues.iter().map(|_| VecDeque::new()).collect();
    let mut events = vec![EpollEvent::default(); queues.len() + 3];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return error!("virtio-blk: epoll wait: {e}"),
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == kill_token {
                return;
            }
            if token == pause_token {
                gate.park_if_paused();
                continue;
            }
            if token == timer_token {
                let _ = timer.wait();
                let now = Instant::now();
                let view = mem.view();
                for (q, due) in queues.iter_mut().zip(pending.iter_mut()) {
                    let mut used = false;
                    while due.front().is_some_and(|&(_, _, t)| t <= now) {
                        let (head, len, _) = due.pop_front().unwrap();
                        if let Err(e) = q.queue.add_used(&*view, head, len) {
                            warn!("virtio-blk: queue {}: {e}", q.index);
                        }
                        used = true;
                    }
                    if used && q.queue.needs_notification(&*view).unwrap_or(true) {
                        if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(q.index)) {
                            warn!("virtio-blk: interrupt: {e}");
                        }
                    }
                }
                drop(view);
                arm_timer(&mut timer, &pending, now);
                continue;
            }
            let qi = token as usize;
            let q = &mut queues[qi];
            let _ = q.kick.read();
            let stats = queue_stats.get(q.index as usize);
            if let Some(st) = stats {
                st.kicks.fetch_add(1, AtomicOrdering::Relaxed);
            }
            let before = counters.requests();
            // The view is held for a batch of at most `BATCH` chains: a DMA unmap or a VIO
            // control write waits for it, so a driver that keeps the ring full must not make
            // the batch endless. Between batches the view is dropped and taken again.
            loop {
                let view = mem.view();
                let result = match latency {
                    None => engine.process_some(&mut q.queue, &*view, BATCH),
                    Some(lat) => {
                        let seen = Instant::now();
                        let due = &mut pending[qi];
                        let was_idle = due.is_empty();
                        let r = engine.drain_some(&mut q.queue, &*view, BATCH, |_, head, len| {
                            due.push_back((head, len, seen + lat));
                            Ok(())
                        });
                        if was_idle {
                            arm_timer(&mut timer, &pending, seen);
                        }
                        r.map(|more| (false, more))
                    }
                };
                drop(view);
                let more = match result {
                    Ok((notify, more)) => {
                        if notify {
                            if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(q.index)) {
                                warn!("virtio-blk: interrupt: {e}");
                            }
                        }
                        more
                    }
                    Err(e) => {
                        warn!("virtio-blk: queue {}: {e}", q.index);
                        false
                    }
                };
                if !more {
                    break;
                }
            }
            if let Some(st) = stats {
                st.requests
                    .fetch_add(counters.requests() - before, AtomicOrdering::Relaxed);
            }
        }
    }
}

/// Chains per hold of the memory view: at a few microseconds each (4 KiB on tmpfs), whoever
/// waits for the view (an unmap, a VIO capture) waits about 0.1 ms, well inside the 1 ms an
/// elastic switch may pause the device; taking the view again costs next to nothing.
const BATCH: usize = 32;

/// Arms `timer` for the earliest pending completion (or disarms it).
fn arm_timer(timer: &mut TimerFd, pending: &[VecDeque<(u16, u32, Instant)>], now: Instant) {
    let next = pending
        .iter()
        .filter_map(|p| p.front().map(|&(_, _, t)| t))
        .min();
    let r = match next {
        // A zero duration would disarm the timer: fire as soon as possible instead.
        Some(t) => timer.reset(
            t.saturating_duration_since(now)
                .max(Duration::from_nanos(1)),
            None,
        ),
        None => timer.clear(),
    };
    if let Err(e) = r {
        warn!("virtio-blk: timerfd: {e}");
    }
}

impl<V: MemoryView> VirtioDevice for Block<V> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        for q in &queues {
            if !q.queue.is_valid(&*self.memory.view()) {
                return Err(ActivateError::BadQueue(format!(
                    "queue {} lies outside guest memory",
                    q.index
                )));
            }
        }
        self.reset();
        self.spawn_worker(interrupt, queues)
    }

    fn reset(&mut self) {
        self.stopped = None;
        if let Some(w) = self.worker.take() {
            w.gate.resume();
            let _ = w.kill.write(1);
            let _ = w.handle.join();
        }
    }

    fn pause(&mut self) {
        if let Some(w) = &self.worker {
            if !w.gate.pause(std::time::Duration::from_secs(5)) {
                warn!("virtio-blk: worker did not pause");
            }
        }
    }

    fn resume(&mut self) {
        if let Some(w) = &self.worker {
            w.gate.resume();
        }
    }

    fn stop_for_handover(&mut self) -> Vec<QueuePosition> {
        let Some(w) = self.worker.take() else {
            return Vec::new();
        };
        // Paused, the worker is parked between requests: nothing is half done.
        let _ = w.kill.write(1);
        w.gate.resume();
        let queues = w.handle.join().unwrap_or_default();
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

    fn resume_stopped(&mut self) {
        if let (Some(queues), Some(interrupt)) = (self.stopped.take(), self.interrupt.clone()) {
            if let Err(e) = self.spawn_worker(interrupt, queues) {
                error!("virtio-blk: restarting the worker: {e}");
            }
        }
    }

    fn counters(&self) -> Counters {
        let mut c = self.counters.snapshot();
        for (i, q) in self.queue_stats.iter().enumerate() {
            c.insert(
                format!("queue{i}_kicks"),
                q.kicks.load(AtomicOrdering::Relaxed),
            );
            c.insert(
                format!("queue{i}_requests"),
                q.requests.load(AtomicOrdering::Relaxed),
            );
        }
        c
    }
}

impl<V: MemoryView> Block<V> {
    fn spawn_worker(
        &mut self,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        self.interrupt = Some(interrupt.clone());
        let mem = self.memory.clone();
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let kill_worker = kill.try_clone().map_err(ActivateError::Worker)?;
        let gate = Arc::new(PauseGate::new().map_err(ActivateError::Worker)?);
        let gate_worker = gate.clone();
        let latency = self.latency;
        let queue_stats = self.queue_stats.clone();
        let (disk, serial, counters) = (
            self.disk.clone(),
            self.serial.clone(),
            self.counters.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || {
                run_worker(
                    disk,
                    serial,
                    counters,
                    queue_stats,
                    mem,
                    interrupt,
                    &mut queues,
                    kill_worker,
                    gate_worker,
                    latency,
                );
                queues
            })
            .map_err(ActivateError::Worker)?;
        self.worker = Some(Worker { kill, gate, handle });
        Ok(())
    }
}

impl<V: MemoryView> Drop for Block<V> {
    fn drop(&mut self) {
        self.reset();
    }
}
