//! Virtio devices emulated in the VMM and the virtio-pci modern transport that presents them.
//!
//! The virtio-blk request engine (`block::engine`) and the virtio-net frame engine
//! (`net::engine`) are generic over how guest memory is reached
//! (any vm-memory `GuestMemory`), so a device outside the VMM can serve the same requests through
//! an IOMMU-checked view of guest memory.

pub mod block;
mod memory;
pub mod net;
mod pause;
pub mod queue;
pub mod seccomp;
mod thread;
pub mod transport;

pub use memory::MemoryView;
pub use pause::PauseGate;
pub use vio::stats::LogLimiter;

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;

pub const DEVICE_ACKNOWLEDGE: u8 = 1;
pub const DEVICE_DRIVER: u8 = 2;
pub const DEVICE_DRIVER_OK: u8 = 4;
pub const DEVICE_FEATURES_OK: u8 = 8;
pub const DEVICE_NEEDS_RESET: u8 = 0x40;
pub const DEVICE_FAILED: u8 = 0x80;

pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_ID_BLOCK: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterruptType {
    Config,
    Queue(u16),
}

/// How a device raises its interrupts; the transport decides what that means.
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()>;
}

#[derive(Debug, Error)]
pub enum ActivateError {
    #[error("Bad queue configuration: {0}")]
    BadQueue(String),
    #[error("Failed to start the device worker")]
    Worker(#[source] io::Error),
}

/// A queue handed to a device at activation: its index, its state and its doorbell.
pub struct ActiveQueue {
    pub index: u16,
    pub queue: Queue,
    pub kick: EventFd,
}

pub type Counters = BTreeMap<String, u64>;

pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn queue_max_sizes(&self) -> &[u16];
    fn features(&self) -> u64;
    fn ack_features(&mut self, features: u64);
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving `queues`. The device reaches guest memory through its own view of it
    /// (plain for a VMM-emulated device, IOMMU-checked for vdpu) and validates the queues there.
    fn activate(
        &mut self,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// Stops processing; the transport resets its queue state.
    fn reset(&mut self);
    /// Stops processing requests until `resume`, keeping all state.
    fn pause(&mut self) {}
    fn resume(&mut self) {}
    fn counters(&self) -> Counters {
        Counters::new()
    }
    /// Stops the device's worker (paused, with nothing in flight) for a live upgrade and says
    /// where each active queue is; `resume_stopped` runs it again from there (the upgrade
    /// failed). A device with no worker state returns nothing.
    fn stop_for_handover(&mut self) -> Vec<QueuePosition> {
        Vec::new()
    }
    fn resume_stopped(&mut self) {}
}

/// Where a device is in an active queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuePosition {
    pub index: u16,
    pub next_avail: u16,
    pub next_used: u16,
}

/// Copies the `data.len()` bytes of `config` at `offset` (zeros past its end).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = offset as usize;
    if start < config.len() {
        let end = (start + data.len()).min(config.len());
        data[..end - start].copy_from_slice(&config[start..end]);
    }
}
