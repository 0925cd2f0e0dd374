//! The `vio` device variant: a vfio-user virtio device passed through to the guest, with
//! IOPA-Snoop in front of its doorbells so guest memory stays reclaimable.
//!
//! Data still flows device <-> guest memory directly, and interrupts stay direct (irqfds the
//! device signals). What changes:
//! - The device reads each queue's available index from a shadow page the VMM owns (the VIO
//!   shadow-index extension, `vio::spec`, which this front end programs and hides from the
//!   guest).
//! - The guest's doorbells are the VMM's eventfds. On one, the snoop thread walks the new
//!   chains, makes every page they touch resident, pinned and DMA-mapped (`DmaWindow`), then
//!   publishes the shadow index and rings the device's own doorbell.
//! - Completions (the used ring) release the pins; the reclaimer may then take the pages,
//!   DMA-unmapping them first.
//!
//! One concern per file: `caps` (finding and hiding the VIO capability), `shadow` (the shadow
//! page), `common_cfg` (what the guest's common-configuration writes mean here), `snoop` (the
//! snoop thread and what it shares with the vCPU path), `doorbells` (where the guest's
//! doorbells go), `elastic` (switching between snoop and passthrough), `counters`. This file
//! is the PCI device: it routes the guest's accesses.

mod caps;
mod common_cfg;
mod counters;
mod doorbells;
mod elastic;
mod handover;
mod lockpage;
mod shadow;
mod snoop;

pub use elastic::{QueueInfo, SwitchError, SwitchReport, VioHandle, VioInfo};
pub use handover::{Adoption, RingState, VioDescription, VioSetup, VioState};
pub use lockpage::{LockInfo, LockOptions, LOCK_PERIOD};

use crate::vfio_user::protocol::PCI_CONFIG_REGION_INDEX;
use crate::vfio_user::{ClientError, VfioUserClient, VfioUserPciDevice};
use crate::{DmaBacking, DmaMapping};
use caps::Caps;
use common_cfg::{CommonCfgView, CommonWrite};
use doorbells::Doorbells;
use elastic::Elastic;
use log::{info, warn};
use pci::{BarReprogram, IoEventRegistrar, PciBarRegion, PciDevice};
use shadow::ShadowPage;
use snoop::{Command, DeviceKick, Snoop};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use thiserror::Error;
use vio::elastic::{Mode, Setting, Thresholds};
use vio::spec::{self, PAGE_SIZE};
use vio::{DmaWindow, QueueLayout};
use virtio_devices::transport::pci_common_config::offset;
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

/// Where the shadow page sits in the device's IOVA space: above any guest RAM this VMM lays
/// out (guest RAM is mapped at IOVA = guest-physical address).
pub const SHADOW_IOVA: u64 = 1 << 46;

#[derive(Debug, Error)]
pub enum VioDeviceError {
    #[error("vfio-user")]
    Client(#[from] ClientError),
    #[error("The device has no virtio {0} capability")]
    MissingCap(&'static str),
    #[error("The device does not offer the VIO shadow-index extension")]
    NoShadowIndex,
    #[error("The device has {0} queues; at most {max} can be snooped", max = spec::MAX_QUEUES)]
    TooManyQueues(u16),
    #[error("Failed to set up the shadow page")]
    ShadowPage(#[source] std::io::Error),
    #[error("Failed to DMA-map the shadow page")]
    ShadowMap(#[source] crate::DmaError),
    #[error("Failed to set up doorbells")]
    Doorbell(#[source] std::io::Error),
    #[error("Failed to start the snoop thread")]
    Thread(#[source] std::io::Error),
    #[error("Failed to start in passthrough mode")]
    Switch(#[source] SwitchError),
    #[error("Failed to take the device over")]
    Adopt(#[source] crate::handover::HandoverError),
}

/// Options of a `vio` device.
#[derive(Clone, Debug)]
pub struct VioOptions {
    /// How often queues with requests in flight are re-checked.
    pub poll: Duration,
    /// Snoop, passthrough, or chosen by the request rate.
    pub setting: Setting,
    pub thresholds: Thresholds,
    /// Keep the pages DMA keeps hitting locked, within a budget.
    pub lockpage: Option<LockOptions>,
}

pub struct VioPciDevice<M: GuestMemory + Send + Sync + 'static> {
    inner: VfioUserPciDevice,
    caps: Caps,
    snoop: Arc<Snoop<M>>,
    thread: Option<JoinHandle<()>>,
    common: CommonCfgView,
    guest_vio_accesses: u64,
    /// Each queue's doorbell offset in BAR 0.
    notify: Vec<u64>,
    /// An adopted front end's start, left for `go`.
    pending: Option<handover::PendingStart>,
    /// Adopted in passthrough mode, guest RAM not pinned yet (`settle` does).
    unpinned: bool,
}

/// What `probe` learns of a device (and a live upgrade carries over instead of asking again).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct DeviceLayout {
    caps: Caps,
    version: u32,
    notify: Vec<u64>,
}

/// What a front end is assembled from.
struct Parts<M> {
    mem: Arc<M>,
    window: Arc<DmaWindow>,
    ram: Vec<(u64, u64)>,
    registrar: Arc<dyn IoEventRegistrar>,
    opts: VioOptions,
    shadow: ShadowPage,
    mode: Mode,
    common: CommonCfgView,
}

impl<M: GuestMemory + Send + Sync + 'static> VioPciDevice<M> {
    /// Puts IOPA-Snoop in front of `inner`, whose doorbell fds must not be registered with the
    /// hypervisor (the VMM's own take their place). `window` is the device's DMA window onto
    /// guest RAM, whose page runs (first page frame, count) are `ram`; nothing of guest RAM
    /// needs to be mapped yet.
    pub fn new(
        inner: VfioUserPciDevice,
        mem: Arc<M>,
        window: Arc<DmaWindow>,
        ram: Vec<(u64, u64)>,
        registrar: Arc<dyn IoEventRegistrar>,
        opts: VioOptions,
    ) -> Result<Self, VioDeviceError> {
        let layout = Self::probe(&inner)?;
        let shadow = Self::new_shadow(&inner)?;
        let setting = opts.setting;
        let dev = Self::assemble(
            inner,
            layout,
            Parts {
                mem,
                window,
                ram,
                registrar,
                opts,
                shadow,
                mode: Mode::Snoop,
                common: CommonCfgView::default(),
            },
        )?;
        let dev = dev.start()?;
        // Before the guest enables a queue: a fixed passthrough device is all mapped from the
        // start, and auto mode starts snooped.
        if setting != Setting::Fixed(Mode::Snoop) {
            dev.handle().set(setting).map_err(VioDeviceError::Switch)?;
        }
        Ok(dev)
    }

    /// Reads what the front end needs to know of the device: its capabilities, the VIO
    /// extension's version, its queues and where each one's doorbell is. The queue selector is
    /// left as it was (a driver may be between selecting a queue and using it).
    fn probe(inner: &VfioUserPciDevice) -> Result<DeviceLayout, VioDeviceError> {
        let client = inner.client();
        let cfg = |reg: usize| -> Result<u32, ClientError> {
            let mut b = [0u8; 4];
            client.region_read(PCI_CONFIG_REGION_INDEX, (reg * 4) as u64, &mut b)?;
            Ok(u32::from_le_bytes(b))
        };
        let caps = Caps::parse(&cfg)?;
        let read = |bar: usize, off: u64, n: usize| -> Result<u64, ClientError> {
            let mut b = [0u8; 8];
            client.region_read(bar as u32, off, &mut b[..n])?;
            Ok(u64::from_le_bytes(b))
        };
        let magic = read(caps.vio.bar, caps.vio.offset + spec::REG_MAGIC, 4)?;
        if magic != u64::from(spec::MAGIC) {
            return Err(VioDeviceError::NoShadowIndex);
        }
        let version = read(caps.vio.bar, caps.vio.offset + spec::REG_VERSION, 4)? as u32;
        let c = caps.common;
        let nq = read(c.bar, c.offset + offset::NUM_QUEUES, 2)? as u16;
        if nq > spec::MAX_QUEUES {
            return Err(VioDeviceError::TooManyQueues(nq));
        }
        let select = read(c.bar, c.offset + offset::QUEUE_SELECT, 2)? as u16;
        let mut notify = Vec::new();
        for q in 0..nq {
            client.region_write(
                c.bar as u32,
                c.offset + offset::QUEUE_SELECT,
                &q.to_le_bytes(),
            )?;
            let off = read(c.bar, c.offset + offset::QUEUE_NOTIFY_OFF, 2)?;
            notify.push(caps.notify.offset + off * u64::from(caps.notify_mult));
        }
        client.region_write(
            c.bar as u32,
            c.offset + offset::QUEUE_SELECT,
            &select.to_le_bytes(),
        )?;
        Ok(DeviceLayout {
            caps,
            version,
            notify,
        })
    }

    /// A new shadow page, DMA-mapped for the device.
    fn new_shadow(inner: &VfioUserPciDevice) -> Result<ShadowPage, VioDeviceError> {
        let shadow = ShadowPage::new().map_err(VioDeviceError::ShadowPage)?;
        Self::map_shadow(inner, &shadow)?;
        Ok(shadow)
    }

    fn map_shadow(inner: &VfioUserPciDevice, shadow: &ShadowPage) -> Result<(), VioDeviceError> {
        inner
            .client()
            .map(
                SHADOW_IOVA,
                PAGE_SIZE,
                &DmaBacking {
                    file: shadow.file(),
                    file_offset: 0,
                    host_addr: shadow.host_addr(),
                },
            )
            .map_err(VioDeviceError::ShadowMap)
    }

    /// The front end over `inner`, its doorbells placed for `parts.mode`; the snoop thread is
    /// not started yet.
    fn assemble(
        inner: VfioUserPciDevice,
        layout: DeviceLayout,
        parts: Parts<M>,
    ) -> Result<Self, VioDeviceError> {
        let id = inner.id().to_string();
        let (doorbells, kicks) = Self::doorbells(&inner, &layout.notify)?;
        let doorbells = Doorbells::new(parts.registrar, doorbells, parts.mode);
        let nq = layout.notify.len();
        let elastic = Elastic::new(
            Setting::Fixed(parts.mode),
            parts.opts.thresholds,
            layout.version,
            nq,
        );
        let locks = parts.opts.lockpage.map(|o| {
            let ram = &parts.ram;
            let extent = ram.iter().map(|&(s, n)| s + n).max().unwrap_or(0);
            let pages = ram.iter().map(|&(_, n)| n).sum();
            lockpage::Locks::new(o, extent, pages, parts.window.max_maps())
        });
        let snoop = Snoop::new(
            id.clone(),
            parts.mem,
            parts.window,
            inner.client().clone(),
            parts.shadow,
            kicks,
            doorbells,
            (layout.caps.vio.bar as u32, layout.caps.vio.offset),
            parts.ram,
            elastic,
            locks,
            parts.opts.poll,
        )
        .map_err(VioDeviceError::Doorbell)?;
        let dev = VioPciDevice {
            inner,
            caps: layout.caps,
            snoop: Arc::new(snoop),
            thread: None,
            common: parts.common,
            guest_vio_accesses: 0,
            notify: layout.notify,
            pending: None,
            unpinned: false,
        };
        let bar0 = dev.bar0();
        dev.snoop
            .doorbells
            .lock()
            .unwrap()
            .move_to(bar0)
            .map_err(VioDeviceError::Doorbell)?;
        info!(
            "{id}: vio ({}) with {nq} queue(s), shadow page at IOVA {SHADOW_IOVA:#x}, poll {:?}, extension version {}",
            parts.opts.setting.name(),
            parts.opts.poll,
            layout.version,
        );
        Ok(dev)
    }

    fn start(mut self) -> Result<Self, VioDeviceError> {
        self.thaw()?;
        Ok(self)
    }

    /// The handle the API switches the device's mode through.
    pub fn handle(&self) -> VioHandle<M> {
        VioHandle(self.snoop.clone())
    }

    /// Each queue's doorbell: the VMM's eventfd the guest rings at the queue's notify address,
    /// and how the VMM rings the device (its own doorbell fd there, or a region write).
    #[allow(clippy::type_complexity)]
    fn doorbells(
        inner: &VfioUserPciDevice,
        notify: &[u64],
    ) -> Result<(Vec<(u64, Arc<EventFd>, Option<EventFd>)>, Vec<DeviceKick>), VioDeviceError> {
        let mut device_fds: BTreeMap<u64, EventFd> = inner
            .doorbell_fds()
            .map_err(VioDeviceError::Doorbell)?
            .into_iter()
            .collect();
        let mut doorbells = Vec::new();
        let mut kicks = Vec::new();
        for (q, &at) in notify.iter().enumerate() {
            let device_fd = device_fds.remove(&at);
            let passthrough_fd = device_fd
                .as_ref()
                .map(EventFd::try_clone)
                .transpose()
                .map_err(VioDeviceError::Doorbell)?;
            kicks.push(match device_fd {
                Some(fd) => DeviceKick::Fd(fd),
                None => DeviceKick::Region(at, q as u16),
            });
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(VioDeviceError::Doorbell)?;
            doorbells.push((at, Arc::new(fd), passthrough_fd));
        }
        Ok((doorbells, kicks))
    }

    fn bar0(&self) -> u64 {
        self.bar_base(0)
    }

    fn bar_base(&self, index: usize) -> u64 {
        self.inner.bar(index).map(|b| b.addr).unwrap_or(0)
    }

    pub fn id(&self) -> &str {
        self.inner.id()
    }

    pub fn client(&self) -> &Arc<VfioUserClient> {
        self.inner.client()
    }

    pub fn bar(&self, index: usize) -> Option<PciBarRegion> {
        self.inner.bar(index)
    }

    /// Reads a common-configuration field from the device (64-bit ones as two halves, as the
    /// spec has drivers do).
    fn common_read(&self, off: u64, len: usize) -> Result<u64, ClientError> {
        let c = self.caps.common;
        let mut v = 0u64;
        for half in 0..len.div_ceil(4) {
            let mut b = [0u8; 4];
            let at = c.offset + off + 4 * half as u64;
            self.inner
                .client()
                .region_read(c.bar as u32, at, &mut b[..len.min(4)])?;
            v |= u64::from(u32::from_le_bytes(b)) << (32 * half);
        }
        Ok(v)
    }

    fn queue_layout(&self) -> Result<QueueLayout, ClientError> {
        Ok(QueueLayout {
            size: self.common_read(offset::QUEUE_SIZE, 2)? as u16,
            desc_table: self.common_read(offset::QUEUE_DESC, 8)?,
            avail_ring: self.common_read(offset::QUEUE_DRIVER, 8)?,
            used_ring: self.common_read(offset::QUEUE_DEVICE, 8)?,
        })
    }

    /// The guest enables queue `q`: hold its vring, point the device at the shadow slot, and
    /// have the snoop thread start from index 0. Only this vCPU's own vfio-user round trips and
    /// vring fault-ins happen here; nothing waits for the snoop thread.
    fn enable_queue(&mut self, q: u16) {
        if q >= self.snoop.queue_count() {
            return;
        }
        let generation = self.snoop.retire(q);
        let errors = &self.snoop.ring_errors[usize::from(q)];
        let layout = match self.queue_layout() {
            Ok(l) => l,
            Err(e) => {
                warn!("{}: reading queue {q}'s layout: {e}", self.id());
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if layout.size == 0 || !layout.size.is_power_of_two() {
            warn!("{}: queue {q} enabled with size {}", self.id(), layout.size);
            errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let ring_pages = self.acquire_ring(q, &layout);
        // Programmed and posted under the doorbell lock: the snoop thread applies the enable
        // in the mode it was programmed for (a switch applies pending enables first).
        let doorbells = self.snoop.doorbells.lock().unwrap();
        if doorbells.mode == Mode::Snoop {
            if let Err(e) = self.program_shadow(q) {
                warn!("{}: programming queue {q}'s shadow index: {e}", self.id());
            }
        }
        self.snoop.post(Command::Enable {
            q,
            layout,
            event_idx: self.common.event_idx(),
            generation,
            ring_pages,
        });
        drop(doorbells);
    }

    /// Holds queue `q`'s vring pages (resident and mapped) for as long as it is enabled. A ring
    /// outside RAM is counted; the device will fault on it and fail the queue itself.
    fn acquire_ring(&self, q: u16, layout: &QueueLayout) -> Vec<u64> {
        let errors = &self.snoop.ring_errors[usize::from(q)];
        let n = u64::from(layout.size);
        let mut ring_pages = Vec::new();
        for (addr, len) in [
            (layout.desc_table, 16 * n),
            (layout.avail_ring, 6 + 2 * n),
            (layout.used_ring, 6 + 8 * n),
        ] {
            let Some(end) = addr.checked_add(len) else {
                errors.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (first, last) = (addr / PAGE_SIZE, (end - 1) / PAGE_SIZE);
            match self.snoop.window.acquire_range(first, last - first + 1) {
                Ok(_) => ring_pages.extend(first..=last),
                Err(e) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "{}: queue {q} ring at {addr:#x}: {}",
                        self.id(),
                        vio::error_chain(&e)
                    );
                }
            }
        }
        ring_pages
    }

    /// Points queue `q` of the device at its shadow slot (IOVA first, then control: `vio::spec`).
    fn program_shadow(&self, q: u16) -> Result<(), ClientError> {
        let v = self.caps.vio;
        let reg = v.offset + spec::queue_reg(q);
        let client = self.inner.client();
        let iova = SHADOW_IOVA + spec::SLOT_STRIDE * u64::from(q);
        client.region_write(
            v.bar as u32,
            reg + spec::QUEUE_SHADOW_IOVA,
            &iova.to_le_bytes(),
        )?;
        let control = spec::CTRL_SHADOW_INDEX | spec::CTRL_SUPPRESSION;
        client.region_write(
            v.bar as u32,
            reg + spec::QUEUE_CONTROL,
            &control.to_le_bytes(),
        )
    }

    /// Driver reset (the device has been reset): no engine may touch the old rings; their pins
    /// are dropped by the snoop thread.
    fn reset_queues(&self) {
        for q in 0..self.snoop.queue_count() {
            self.snoop.retire(q);
        }
        self.snoop.post(Command::Reset);
    }

    pub fn counters(&self) -> BTreeMap<String, u64> {
        let mut c = self.inner.counters();
        counters::add_snoop_counters(&self.snoop, &mut c);
        c.insert("guest_vio_accesses".into(), self.guest_vio_accesses);
        c.insert("driver_features".into(), self.common.driver_features);
        c
    }
}

impl<M: GuestMemory + Send + Sync + 'static> PciDevice for VioPciDevice<M> {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        let v = self.inner.read_config_register(reg);
        self.caps.filter(reg, v)
    }

    fn write_config_register(
        &mut self,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarReprogram> {
        let (start, end) = self.caps.hidden;
        if (start..end).contains(&(reg * 4)) {
            return None;
        }
        self.inner.write_config_register(reg, offset, data)
    }

    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let index = self.inner.bar_index(base);
        if let Some(bar) = index {
            if self.caps.vio.contains(bar, offset, data.len())
                || self.caps.vio.contains(bar, offset, 1)
            {
                self.guest_vio_accesses += 1;
                return data.fill(0);
            }
        }
        self.inner.read_bar(base, offset, data);
        let c = self.caps.common;
        if index.is_some_and(|bar| c.contains(bar, offset, data.len())) {
            self.common.filter_read(offset - c.offset, data);
        }
    }

    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) {
        if let Some(bar) = self.inner.bar_index(base) {
            if self.caps.vio.contains(bar, offset, 1) {
                // The guest does not see the capability; a guest poking here anyway is ignored.
                self.guest_vio_accesses += 1;
                return;
            }
            if self.caps.notify.contains(bar, offset, data.len()) {
                // A doorbell that reached the VMM instead of the eventfd (not yet registered,
                // or an odd-sized write): same path.
                if let Some(fd) = self.snoop.doorbells.lock().unwrap().vmm_fd_at(offset) {
                    let _ = fd.write(1);
                }
                return;
            }
            let c = self.caps.common;
            if c.contains(bar, offset, data.len()) {
                match self.common.write(offset - c.offset, data) {
                    CommonWrite::Forward => {}
                    CommonWrite::ForwardMasked(v) => {
                        return self.inner.write_bar(base, offset, &v.to_le_bytes());
                    }
                    CommonWrite::EnableQueue(q) => self.enable_queue(q),
                    CommonWrite::Reset => {
                        self.inner.write_bar(base, offset, data);
                        return self.reset_queues();
                    }
                }
            }
        }
        self.inner.write_bar(base, offset, data);
    }

    fn move_bar(&mut self, old_base: u64, new_base: u64) -> std::io::Result<()> {
        if self.inner.bar_index(new_base) == Some(0) {
            self.snoop.doorbells.lock().unwrap().move_to(new_base)?;
        }
        self.inner.move_bar(old_base, new_base)
    }
}

impl<M: GuestMemory + Send + Sync + 'static> Drop for VioPciDevice<M> {
    fn drop(&mut self) {
        self.snoop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.snoop.shutdown();
        self.snoop.doorbells.lock().unwrap().unregister_all();
    }
}
