//! The virtio-net worker: one thread moving frames between the TAP and the queue pair.
//!
//! Receive is driven by the TAP and by the driver's buffers: a frame read from the TAP waits
//! (one at most) until the receive queue can hold it; while it waits the TAP is not read, so
//! the kernel's queue in front of the TAP is the backlog, and the driver is asked for a doorbell
//! when it posts buffers. Transmit is driven by doorbells.

use super::engine::{
    publish_used, read_tx, want_buffers_past, write_rx, NetCounters, RxOutcome, MAX_FRAME_LEN,
};
use super::tap::Tap;
use super::{RX_QUEUE, TX_QUEUE};
use crate::queue::{drain, Completion, Drained};
use crate::thread::{QueueStats, WorkerControl};
use crate::{ActiveQueue, LogLimiter, MemoryView, VirtioInterrupt, VirtioInterruptType};
use log::{error, warn};
use std::io::ErrorKind;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Frames per hold of the memory view (see the virtio-blk worker's BATCH).
const BATCH: usize = 64;

static NET_LOG: LogLimiter = LogLimiter::new(10, 10_000);

pub(super) struct NetParts<V> {
    pub tap: Arc<Tap>,
    pub counters: Arc<NetCounters>,
    pub queue_stats: Arc<Vec<QueueStats>>,
    pub mem: Arc<V>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub mergeable: bool,
}

struct Worker<'q, V> {
    p: NetParts<V>,
    control: WorkerControl,
    queues: &'q mut [ActiveQueue],
    epoll: Epoll,
    /// The frame read from the TAP, waiting for receive buffers.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    /// Whether the TAP is in the epoll set (it is not while a frame waits for buffers).
    tap_armed: bool,
    tx_frame: Vec<u8>,
    used: Vec<(u16, u32)>,
}

const TAP: u64 = 2;
const KILL: u64 = 3;
const PAUSE: u64 = 4;

/// Runs until killed; the queues stay the caller's (a live upgrade takes them over).
pub(super) fn run<V: MemoryView>(
    p: NetParts<V>,
    control: WorkerControl,
    queues: &mut [ActiveQueue],
) {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => return error!("virtio-net: epoll: {e}"),
    };
    let mut w = Worker {
        p,
        control,
        queues,
        epoll,
        rx_frame: vec![0; MAX_FRAME_LEN],
        rx_pending: None,
        tap_armed: false,
        tx_frame: Vec::with_capacity(MAX_FRAME_LEN),
        used: Vec::new(),
    };
    if let Err(e) = w.run() {
        error!("virtio-net: worker: {e}");
    }
}

impl<V: MemoryView> Worker<'_, V> {
    fn run(&mut self) -> std::io::Result<()> {
        for (fd, token) in [
            (self.queues[RX_QUEUE].kick.as_raw_fd(), RX_QUEUE as u64),
            (self.queues[TX_QUEUE].kick.as_raw_fd(), TX_QUEUE as u64),
            (self.control.kill.as_raw_fd(), KILL),
            (self.control.gate.wake.as_raw_fd(), PAUSE),
        ] {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        self.epoll.ctl(
            ControlOperation::Add,
            self.p.tap.as_raw_fd(),
            EpollEvent::new(EventSet::empty(), TAP),
        )?;
        self.arm_tap(true)?;
        let mut events = vec![EpollEvent::default(); 5];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let (mut rx, mut tx, mut killed) = (false, false, false);
            for ev in &events[..n] {
                match ev.data() {
                    KILL => killed = true,
                    PAUSE => self.control.gate.park_if_paused(),
                    TAP => rx = true,
                    q => {
                        let q = q as usize;
                        let _ = self.queues[q].kick.read();
                        self.p.queue_stats[q].kicks.fetch_add(1, Ordering::Relaxed);
                        rx |= q == RX_QUEUE;
                        tx |= q == TX_QUEUE;
                    }
                }
            }
            // Doorbells read in the same wake-up as the kill are served first: a worker
            // stopped for a live upgrade hands over queues with no doorbell swallowed.
            if tx {
                self.serve_tx();
            }
            if rx {
                self.serve_rx()?;
            }
            if killed {
                return Ok(());
            }
        }
    }

    fn arm_tap(&mut self, on: bool) -> std::io::Result<()> {
        if on != self.tap_armed {
            let events = if on { EventSet::IN } else { EventSet::empty() };
            self.epoll.ctl(
                ControlOperation::Modify,
                self.p.tap.as_raw_fd(),
                EpollEvent::new(events, TAP),
            )?;
            self.tap_armed = on;
        }
        Ok(())
    }

    fn interrupt(&self, q: usize) {
        let index = self.queues[q].index;
        if let Err(e) = self.p.interrupt.trigger(VirtioInterruptType::Queue(index)) {
            warn!("virtio-net: interrupt: {e}");
        }
    }

    /// Moves frames from the TAP into receive buffers until the TAP is empty or the buffers
    /// run out; in the latter case the TAP is left alone until the driver rings.
    fn serve_rx(&mut self) -> std::io::Result<()> {
        let mem = self.p.mem.clone();
        loop {
            let view = mem.view();
            let q = &mut self.queues[RX_QUEUE].queue;
            let mut moved = 0;
            // The avail index that did not have enough buffers; `broken`: the ring is unusable.
            let mut waiting = None;
            let mut broken = false;
            while moved < BATCH {
                let len = match self.rx_pending {
                    Some(len) => len,
                    None => match self.p.tap.read_frame(&mut self.rx_frame) {
                        Ok(len) => len,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => {
                            if NET_LOG.hit() {
                                warn!("virtio-net: reading {}: {e}", self.p.tap.name());
                            }
                            break;
                        }
                    },
                };
                self.rx_pending = Some(len);
                let frame = &self.rx_frame[..len];
                match write_rx(
                    q,
                    &*view,
                    frame,
                    self.p.mergeable,
                    &mut self.used,
                    &self.p.counters,
                ) {
                    Ok(RxOutcome::NoBuffers(avail)) => {
                        waiting = Some(avail);
                        break;
                    }
                    Ok(RxOutcome::Delivered | RxOutcome::Dropped) => {
                        self.rx_pending = None;
                        moved += 1;
                    }
                    Err(e) => {
                        // The ring itself is broken: wait for the driver to ring again.
                        if NET_LOG.hit() {
                            warn!("virtio-net: receive queue: {e}");
                        }
                        broken = true;
                        break;
                    }
                }
            }
            self.p.queue_stats[RX_QUEUE]
                .chains
                .fetch_add(self.used.len() as u64, Ordering::Relaxed);
            let notify = publish_used(q, &*view, &self.used);
            self.used.clear();
            // Out of buffers: ask for a doorbell when more come, and look again in case they
            // came already. With buffers left, the driver need not ring.
            let buffers_came = match waiting {
                Some(seen) => want_buffers_past(q, &*view, seen).unwrap_or(false),
                None if broken => {
                    let _ = q.enable_notification(&*view);
                    false
                }
                None => {
                    let _ = q.disable_notification(&*view);
                    false
                }
            };
            drop(view);
            match notify {
                Ok(true) => self.interrupt(RX_QUEUE),
                Ok(false) => {}
                Err(e) => {
                    if NET_LOG.hit() {
                        warn!("virtio-net: receive used ring: {e}");
                    }
                }
            }
            let stalled = waiting.is_some() || broken;
            if buffers_came || (!stalled && moved == BATCH) {
                continue;
            }
            return self.arm_tap(!stalled);
        }
    }

    /// Sends every frame the driver made available.
    fn serve_tx(&mut self) {
        let mem = self.p.mem.clone();
        loop {
            let view = mem.view();
            let (tap, counters) = (&self.p.tap, &self.p.counters);
            let frame = &mut self.tx_frame;
            let q = &mut self.queues[TX_QUEUE].queue;
            let mut sent = 0u64;
            let result = drain(
                q,
                &*view,
                BATCH,
                |chain| {
                    sent += 1;
                    match read_tx(chain, &*view, frame) {
                        Ok(()) => match tap.write_frame(frame) {
                            Ok(()) => {
                                counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                                counters
                                    .tx_bytes
                                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                            }
                            Err(e) => {
                                counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                                if NET_LOG.hit() {
                                    warn!("virtio-net: writing {}: {e}", tap.name());
                                }
                            }
                        },
                        Err(e) => counters.bad_chain(&e),
                    }
                    0
                },
                || counters.bad_chain(&super::ChainError::BadHead),
                |q, head, len| q.add_used(&*view, head, len).map(|()| Completion::Done),
                || false,
            )
            .and_then(|d| Ok((sent > 0 && q.needs_notification(&*view)?, d)));
            drop(view);
            self.p.queue_stats[TX_QUEUE]
                .chains
                .fetch_add(sent, Ordering::Relaxed);
            match result {
                Ok((notify, drained)) => {
                    if notify {
                        self.interrupt(TX_QUEUE);
                    }
                    if drained != Drained::Budget {
                        return;
                    }
                }
                Err(e) => {
                    if NET_LOG.hit() {
                        warn!("virtio-net: transmit queue: {e}");
                    }
                    return;
                }
            }
        }
    }
}
