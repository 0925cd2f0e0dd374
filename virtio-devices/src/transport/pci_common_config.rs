//! The virtio-pci common configuration structure (virtio 1.x 4.1.4.3): its register offsets,
//! which the VMM's `vio` front end also intercepts, and the transport's handling of them.
//!
//! Device status transitions (feature negotiation, activation, reset) need the whole transport,
//! so a status write is handed back to it as a [`CommonWrite::Status`].

use super::pci_device::NO_VECTOR;
use log::debug;
use std::sync::atomic::{AtomicU16, Ordering};
use virtio_queue::{Queue, QueueT};

/// Register offsets in `virtio_pci_common_cfg`.
pub mod offset {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Length of the structure.
    pub const LEN: u64 = 0x38;
}

/// PCI capability `cfg_type`s of the virtio-pci layout (virtio 1.x 4.1.4).
pub mod cap_type {
    pub const COMMON_CFG: u8 = 1;
    pub const NOTIFY_CFG: u8 = 2;
    pub const ISR_CFG: u8 = 3;
    pub const DEVICE_CFG: u8 = 4;
    pub const PCI_CFG: u8 = 5;
}

/// MSI-X vector numbers the driver programmed (config and per queue).
pub struct VectorSelection {
    pub config: AtomicU16,
    pub queues: Vec<AtomicU16>,
    /// Vectors the device has: a larger number reads back as NO_VECTOR (virtio 4.1.5.1.2).
    count: u16,
}

impl VectorSelection {
    pub fn new(queues: usize, count: u16) -> Self {
        VectorSelection {
            config: AtomicU16::new(NO_VECTOR),
            queues: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            count,
        }
    }

    fn valid(&self, v: u16) -> u16 {
        if v < self.count {
            v
        } else {
            NO_VECTOR
        }
    }

    pub fn reset(&self) {
        self.config.store(NO_VECTOR, Ordering::Release);
        for v in &self.queues {
            v.store(NO_VECTOR, Ordering::Release);
        }
    }
}

/// What a common-configuration write asks of the transport.
#[derive(Debug, PartialEq, Eq)]
pub enum CommonWrite {
    Done,
    /// The driver wrote `device_status`.
    Status(u8),
}

/// The driver-visible state of the common configuration.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CommonConfig {
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub status: u8,
    pub config_generation: u8,
    /// The device runs: queue configuration is frozen.
    pub activated: bool,
}

impl CommonConfig {
    /// Back to the state after a device reset.
    pub fn reset(&mut self) {
        *self = CommonConfig {
            config_generation: self.config_generation,
            ..Default::default()
        };
    }

    /// The value of the `len`-byte register at `off`.
    pub fn read(
        &self,
        off: u64,
        len: usize,
        queues: &[Queue],
        device_features: u64,
        vectors: &VectorSelection,
    ) -> u64 {
        use offset::*;
        let q = usize::from(self.queue_select);
        let word = |v: u64, select: u32| {
            if select < 2 {
                (v >> (32 * select)) & 0xffff_ffff
            } else {
                0
            }
        };
        match (off, len) {
            (DEVICE_FEATURE_SELECT, 4) => u64::from(self.device_feature_select),
            (DEVICE_FEATURE, 4) => word(device_features, self.device_feature_select),
            (DRIVER_FEATURE_SELECT, 4) => u64::from(self.driver_feature_select),
            (DRIVER_FEATURE, 4) => word(self.driver_features, self.driver_feature_select),
            (MSIX_CONFIG, 2) => u64::from(vectors.config.load(Ordering::Acquire)),
            (NUM_QUEUES, 2) => queues.len() as u64,
            (DEVICE_STATUS, 1) => u64::from(self.status),
            (CONFIG_GENERATION, 1) => u64::from(self.config_generation),
            (QUEUE_SELECT, 2) => u64::from(self.queue_select),
            (QUEUE_SIZE, 2) => queues.get(q).map_or(0, |x| u64::from(x.size())),
            (QUEUE_MSIX_VECTOR, 2) => vectors.queues.get(q).map_or(u64::from(NO_VECTOR), |v| {
                u64::from(v.load(Ordering::Acquire))
            }),
            (QUEUE_ENABLE, 2) => queues.get(q).map_or(0, |x| u64::from(x.ready())),
            // Queue i's doorbell is at NOTIFY + i * multiplier.
            (QUEUE_NOTIFY_OFF, 2) => q as u64,
            (QUEUE_DESC..LEN, 4) => {
                let Some(x) = queues.get(q) else {
                    return 0;
                };
                let full = match off & !7 {
                    QUEUE_DESC => x.desc_table(),
                    QUEUE_DRIVER => x.avail_ring(),
                    _ => x.used_ring(),
                };
                if off & 4 == 0 {
                    full & 0xffff_ffff
                } else {
                    full >> 32
                }
            }
            _ => {
                debug!("unhandled common config read at {off:#x} len {len}");
                0
            }
        }
    }

    /// Applies a `len`-byte write of `v` at `off`.
    pub fn write(
        &mut self,
        off: u64,
        len: usize,
        v: u64,
        queues: &mut [Queue],
        vectors: &VectorSelection,
    ) -> CommonWrite {
        use offset::*;
        let q = usize::from(self.queue_select);
        // Queue configuration is frozen once the driver enabled the queue or the device runs.
        let writable = !self.activated && queues.get(q).is_some_and(|x| !x.ready());
        let selected = if writable { queues.get_mut(q) } else { None };
        match (off, len) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = v as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = v as u32,
            (DRIVER_FEATURE, 4) => {
                if self.status & crate::DEVICE_FEATURES_OK == 0 && self.driver_feature_select < 2 {
                    let shift = 32 * self.driver_feature_select;
                    self.driver_features =
                        (self.driver_features & !(0xffff_ffff << shift)) | (v << shift);
                }
            }
            (MSIX_CONFIG, 2) => vectors
                .config
                .store(vectors.valid(v as u16), Ordering::Release),
            (DEVICE_STATUS, 1) => return CommonWrite::Status(v as u8),
            (QUEUE_SELECT, 2) => self.queue_select = v as u16,
            (QUEUE_SIZE, 2) => {
                if let Some(x) = selected {
                    x.set_size(v as u16);
                }
            }
            (QUEUE_MSIX_VECTOR, 2) => {
                if let Some(slot) = vectors.queues.get(q) {
                    slot.store(vectors.valid(v as u16), Ordering::Release);
                }
            }
            (QUEUE_ENABLE, 2) => {
                if let Some(x) = selected.filter(|_| v == 1) {
                    x.set_ready(true);
                }
            }
            (QUEUE_DESC..LEN, 4) => {
                if let Some(x) = selected {
                    let (lo, hi) = if off & 4 == 0 {
                        (Some(v as u32), None)
                    } else {
                        (None, Some(v as u32))
                    };
                    match off & !7 {
                        QUEUE_DESC => x.set_desc_table_address(lo, hi),
                        QUEUE_DRIVER => x.set_avail_ring_address(lo, hi),
                        _ => x.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => debug!("ignored common config write at {off:#x} len {len}"),
        }
        CommonWrite::Done
    }
}
