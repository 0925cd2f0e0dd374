//! virtio-net with one queue pair, served by one worker thread, over any view of guest memory.

use super::engine::NetCounters;
use super::tap::Tap;
use super::worker::{self, NetParts};
use super::*;
use crate::thread::{check_queues, DeviceWorker, QueueStats, WorkerThread};
use crate::{
    read_config_bytes, ActivateError, ActiveQueue, Counters, GuestMemoryMmap, MemoryView,
    QueuePosition, VirtioDevice, VirtioInterrupt, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_NET,
};
use log::error;
use std::sync::Arc;

/// virtio_net_config up to `max_virtqueue_pairs`: mac, status, pairs.
const CONFIG_LEN: usize = 10;

pub struct NetConfig {
    pub id: String,
    pub mac: [u8; 6],
    pub queue_size: u16,
}

/// Features every virtio-net of this project offers (the emulated one and vdpu's alike): no
/// offloads, so every frame is whole and every header all zeros but `num_buffers`.
pub fn net_features() -> u64 {
    VIRTIO_F_VERSION_1
        | VIRTIO_F_RING_INDIRECT_DESC
        | VIRTIO_F_RING_EVENT_IDX
        | VIRTIO_NET_F_MAC
        | VIRTIO_NET_F_MRG_RXBUF
        | VIRTIO_NET_F_STATUS
}

pub fn net_config_space(mac: [u8; 6]) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[..6].copy_from_slice(&mac);
    c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
    c[8..10].copy_from_slice(&1u16.to_le_bytes());
    c
}

/// `12:34:56:78:9a:bc`; a unicast address (the low bit of the first byte clear).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().filter(|p| p.len() == 2);
        *b = p
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .ok_or_else(|| format!("\"{s}\" is not a MAC address (xx:xx:xx:xx:xx:xx)"))?;
    }
    if parts.next().is_some() {
        return Err(format!("\"{s}\" is not a MAC address (xx:xx:xx:xx:xx:xx)"));
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s} is a multicast address"));
    }
    Ok(mac)
}

pub struct Net<V: MemoryView = GuestMemoryMmap> {
    tap: Arc<Tap>,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: Vec<u16>,
    counters: Arc<NetCounters>,
    queue_stats: Arc<Vec<QueueStats>>,
    memory: Arc<V>,
    worker: DeviceWorker,
}

impl<V: MemoryView> Net<V> {
    pub fn new(tap: Tap, cfg: &NetConfig, memory: Arc<V>) -> Self {
        Net {
            tap: Arc::new(tap),
            avail_features: net_features(),
            acked_features: 0,
            config: net_config_space(cfg.mac),
            queue_sizes: vec![cfg.queue_size; 2],
            counters: Arc::new(NetCounters::default()),
            queue_stats: Arc::new((0..2).map(|_| QueueStats::default()).collect()),
            memory,
            worker: DeviceWorker::default(),
        }
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    fn spawn_worker(
        &mut self,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let parts = NetParts {
            tap: self.tap.clone(),
            counters: self.counters.clone(),
            queue_stats: self.queue_stats.clone(),
            mem: self.memory.clone(),
            interrupt: interrupt.clone(),
            mergeable: self.acked_features & VIRTIO_NET_F_MRG_RXBUF != 0,
        };
        self.worker.start(interrupt, queues, move |queues| {
            WorkerThread::spawn("virtio-net", queues, move |control, queues| {
                worker::run(parts, control, queues)
            })
        })
    }
}

impl<V: MemoryView> VirtioDevice for Net<V> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
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
        let indices: Vec<u16> = queues.iter().map(|q| q.index).collect();
        if indices != [RX_QUEUE as u16, TX_QUEUE as u16] {
            return Err(ActivateError::BadQueue(format!(
                "virtio-net needs its receive and transmit queues enabled, got {indices:?}"
            )));
        }
        check_queues(&queues, &*self.memory)?;
        self.reset();
        self.spawn_worker(interrupt, queues)
    }

    fn reset(&mut self) {
        self.worker.reset();
    }

    fn pause(&mut self) {
        self.worker.pause();
    }

    fn resume(&mut self) {
        self.worker.resume();
    }

    fn stop_for_handover(&mut self) -> Vec<QueuePosition> {
        self.worker.stop_for_handover()
    }

    fn resume_stopped(&mut self) {
        if let Some((interrupt, queues)) = self.worker.take_stopped() {
            if let Err(e) = self.spawn_worker(interrupt, queues) {
                error!("virtio-net: restarting the worker: {e}");
            }
        }
    }

    fn counters(&self) -> Counters {
        let mut c = self.counters.snapshot();
        QueueStats::report(&self.queue_stats, "frames", &mut c);
        c
    }
}

impl<V: MemoryView> Drop for Net<V> {
    fn drop(&mut self) {
        self.reset();
    }
}
