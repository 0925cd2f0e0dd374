//! virtio-blk served by one worker thread for all its queues, over any view of guest memory.

use super::disk::RawFile;
use super::engine::BlockCounters;
use super::pri::PageRequester;
use super::worker::{self, WorkerParts};
use super::*;
use crate::thread::{check_queues, DeviceWorker, QueueStats, WorkerThread};
use crate::{
    read_config_bytes, ActivateError, ActiveQueue, Counters, GuestMemoryMmap, MemoryView,
    QueuePosition, VirtioDevice, VirtioInterrupt, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK,
};
use log::error;
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_QUEUE_SIZE: u16 = 256;
const CONFIG_LEN: usize = 60;

pub struct BlockConfig {
    pub id: String,
    pub num_queues: u16,
    pub queue_size: u16,
    /// Service-time model: each request completes no earlier than this after the device saw it.
    pub latency: Option<Duration>,
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
    worker: DeviceWorker,
    /// Page requests instead of failed DMAs (a device with PRI).
    pri: Option<Arc<dyn PageRequester>>,
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
            worker: DeviceWorker::default(),
            pri: None,
        }
    }

    /// A DMA to a page the device cannot reach becomes a page request (`super::pri`).
    pub fn with_pri(mut self, pri: Arc<dyn PageRequester>) -> Self {
        self.pri = Some(pri);
        self
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
                error!("virtio-blk: restarting the worker: {e}");
            }
        }
    }

    fn counters(&self) -> Counters {
        let mut c = self.counters.snapshot();
        QueueStats::report(&self.queue_stats, "requests", &mut c);
        c
    }
}

impl<V: MemoryView> Block<V> {
    fn spawn_worker(
        &mut self,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let parts = WorkerParts {
            disk: self.disk.clone(),
            serial: self.serial.clone(),
            counters: self.counters.clone(),
            queue_stats: self.queue_stats.clone(),
            mem: self.memory.clone(),
            interrupt: interrupt.clone(),
            latency: self.latency,
            pri: self.pri.clone(),
        };
        self.worker.start(interrupt, queues, move |queues| {
            WorkerThread::spawn("virtio-blk", queues, move |control, queues| {
                worker::run(parts, control, queues)
            })
        })
    }
}

impl<V: MemoryView> Drop for Block<V> {
    fn drop(&mut self) {
        self.reset();
    }
}
