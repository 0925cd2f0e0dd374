//! A generic virtio-pci modern driver (virtio 1.x, split virtqueues), polled.

use crate::arch::*;
use crate::memory::Ram;
use crate::paging;
use crate::pci::Function;
use core::sync::atomic::{fence, Ordering};

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_FAILED: u8 = 0x80;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
const NO_VECTOR: u16 = 0xffff;

// Common configuration structure offsets (virtio 1.x 4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

pub struct VirtioPci {
    common: u64,
    notify: u64,
    notify_mult: u32,
    pub device_cfg: u64,
    pub features: u64,
}

impl VirtioPci {
    /// Finds the virtio structures through the vendor capabilities and maps their BARs.
    pub fn probe(f: &Function) -> Result<VirtioPci, &'static str> {
        let mut common = None;
        let mut notify = None;
        let mut device_cfg = None;
        let mut notify_mult = 0;
        let mut err = None;
        f.for_each_capability(|off, id| {
            if id != 0x09 {
                return;
            }
            let cfg_type = f.read8(off + 3);
            let bar = f.read8(off + 4);
            let offset = f.read32(off + 8) as u64;
            let length = f.read32(off + 12) as u64;
            let Some(base) = f.bar_address(bar) else {
                return;
            };
            if let Err(e) = paging::map_range(base + offset, length.max(1), true) {
                err = Some(e);
            }
            let addr = base + offset;
            match cfg_type {
                1 if common.is_none() => common = Some(addr),
                2 if notify.is_none() => {
                    notify = Some(addr);
                    notify_mult = f.read32(off + 16);
                }
                4 if device_cfg.is_none() => device_cfg = Some(addr),
                _ => {}
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        f.enable_memory_and_bus_master();
        Ok(VirtioPci {
            common: common.ok_or("no common config capability")?,
            notify: notify.ok_or("no notify capability")?,
            notify_mult,
            device_cfg: device_cfg.ok_or("no device config capability")?,
            features: 0,
        })
    }

    fn status(&self) -> u8 {
        mmio_read8(self.common + DEVICE_STATUS)
    }

    fn set_status(&self, s: u8) {
        mmio_write8(self.common + DEVICE_STATUS, s);
    }

    /// Reset, acknowledge, and negotiate `wanted` ∩ offered (VERSION_1 is required).
    pub fn init(&mut self, wanted: u64) -> Result<u64, &'static str> {
        self.set_status(0);
        let mut n = 0;
        while self.status() != 0 {
            n += 1;
            if n > 1_000_000 {
                return Err("device does not reset");
            }
            pause();
        }
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            mmio_write32(self.common + DEVICE_FEATURE_SELECT, sel);
            offered |= (mmio_read32(self.common + DEVICE_FEATURE) as u64) << (32 * sel);
        }
        if offered & F_VERSION_1 == 0 {
            self.set_status(STATUS_FAILED);
            return Err("device is not virtio 1.x");
        }
        let features = offered & (wanted | F_VERSION_1);
        for sel in 0..2u32 {
            mmio_write32(self.common + DRIVER_FEATURE_SELECT, sel);
            mmio_write32(
                self.common + DRIVER_FEATURE,
                (features >> (32 * sel)) as u32,
            );
        }
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            self.set_status(STATUS_FAILED);
            return Err("device rejected the features");
        }
        mmio_write16(self.common + MSIX_CONFIG, NO_VECTOR);
        self.features = features;
        Ok(features)
    }

    pub fn setup_queue(
        &self,
        index: u16,
        max: u16,
        ram: &mut Ram,
    ) -> Result<Virtqueue, &'static str> {
        mmio_write16(self.common + QUEUE_SELECT, index);
        let dev_max = mmio_read16(self.common + QUEUE_SIZE);
        if dev_max == 0 {
            return Err("queue not available");
        }
        let size = dev_max.min(max);
        if !size.is_power_of_two() {
            return Err("queue size is not a power of two");
        }
        let n = size as u64;
        let desc = ram.alloc(16 * n).ok_or("out of memory")?;
        let avail = ram.alloc(6 + 2 * n).ok_or("out of memory")?;
        let used = ram.alloc(6 + 8 * n).ok_or("out of memory")?;
        mmio_write16(self.common + QUEUE_SIZE, size);
        mmio_write16(self.common + QUEUE_MSIX_VECTOR, NO_VECTOR);
        for (reg, addr) in [
            (QUEUE_DESC, desc),
            (QUEUE_DRIVER, avail),
            (QUEUE_DEVICE, used),
        ] {
            mmio_write32(self.common + reg, addr as u32);
            mmio_write32(self.common + reg + 4, (addr >> 32) as u32);
        }
        let notify_off = mmio_read16(self.common + QUEUE_NOTIFY_OFF) as u64;
        let event_idx = self.features & F_EVENT_IDX != 0;
        let vq = Virtqueue {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            last_used: 0,
            notify_addr: self.notify + notify_off * self.notify_mult as u64,
            index,
            event_idx,
            kicks: 0,
        };
        // Polled driver: ask for no interrupts.
        if !event_idx {
            vq.write_avail_u16(0, AVAIL_F_NO_INTERRUPT);
        }
        mmio_write16(self.common + QUEUE_ENABLE, 1);
        Ok(vq)
    }

    pub fn driver_ok(&self) {
        self.set_status(self.status() | STATUS_DRIVER_OK);
    }

    pub fn reset(&self) {
        self.set_status(0);
    }
}

pub struct Virtqueue {
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Next free avail slot (shadow of avail->idx not yet published).
    avail_idx: u16,
    last_used: u16,
    notify_addr: u64,
    index: u16,
    event_idx: bool,
    pub kicks: u64,
}

impl Virtqueue {
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(
            self.desc + 16 * (i as u64 % self.size as u64),
            addr,
            len,
            flags,
            next,
        );
    }

    fn write_avail_u16(&self, off: u64, v: u16) {
        // SAFETY: the avail ring is driver memory allocated for this queue.
        unsafe { core::ptr::write_volatile((self.avail + off) as *mut u16, v) }
    }

    fn read_used_u16(&self, off: u64) -> u16 {
        // SAFETY: the used ring is driver memory allocated for this queue.
        unsafe { core::ptr::read_volatile((self.used + off) as *const u16) }
    }

    /// Queues chain `head` without publishing it yet.
    pub fn push(&mut self, head: u16) {
        let slot = self.avail_idx % self.size;
        self.write_avail_u16(4 + 2 * slot as u64, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes pushed chains and notifies the device if it asked for it.
    pub fn publish(&mut self, old_idx: u16) {
        fence(Ordering::Release);
        self.write_avail_u16(2, self.avail_idx);
        // The device's avail_event / NO_NOTIFY must be read after the index is visible.
        fence(Ordering::SeqCst);
        let notify = if self.event_idx {
            let event = self.read_used_u16(4 + 8 * self.size as u64);
            self.avail_idx.wrapping_sub(event).wrapping_sub(1)
                < self.avail_idx.wrapping_sub(old_idx)
        } else {
            self.read_used_u16(0) & USED_F_NO_NOTIFY == 0
        };
        if notify {
            self.kicks += 1;
            mmio_write16(self.notify_addr, self.index);
        }
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Next used element (id, len), if the device returned one.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        if self.read_used_u16(2) == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let e = self.used + 4 + 8 * (self.last_used % self.size) as u64;
        // SAFETY: e is inside the used ring.
        let (id, len) = unsafe {
            (
                core::ptr::read_volatile(e as *const u32),
                core::ptr::read_volatile((e + 4) as *const u32),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            // Keep used_event half the index space ahead: the polled driver wants no interrupts.
            self.write_avail_u16(
                4 + 2 * self.size as u64,
                self.last_used.wrapping_add(0x8000),
            );
        }
        Some((id, len))
    }
}

pub fn write_desc(at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    // SAFETY: `at` is a descriptor slot in driver-owned memory (a ring or an indirect table).
    unsafe {
        core::ptr::write_volatile(at as *mut u64, addr);
        core::ptr::write_volatile((at + 8) as *mut u32, len);
        core::ptr::write_volatile((at + 12) as *mut u16, flags);
        core::ptr::write_volatile((at + 14) as *mut u16, next);
    }
}
