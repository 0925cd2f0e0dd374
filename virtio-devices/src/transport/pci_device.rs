//! virtio-pci modern transport (virtio 1.x 4.1): one 64-bit memory BAR holding the common,
//! ISR, device and notify structures plus the MSI-X table and PBA.

use crate::*;
use log::{debug, info, warn};
use pci::{
    BarReprogram, MsiInterruptGroup, MsixCap, MsixConfig, PciBarRegion, PciBarType, PciClass,
    PciConfiguration, PciDevice, PciHeader,
};
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};

const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
const VIRTIO_PCI_CAP_ID: u8 = 0x09;
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const NO_VECTOR: u16 = 0xffff;

/// Where each structure sits in BAR 0.
pub struct VirtioPciLayout;

impl VirtioPciLayout {
    pub const BAR_SIZE: u64 = 0x8_0000;
    pub const COMMON: u64 = 0x0000;
    pub const COMMON_LEN: u64 = 0x38;
    pub const ISR: u64 = 0x2000;
    pub const ISR_LEN: u64 = 1;
    pub const DEVICE: u64 = 0x4000;
    pub const DEVICE_LEN: u64 = 0x1000;
    pub const NOTIFY: u64 = 0x6000;
    pub const NOTIFY_LEN: u64 = 0x1000;
    pub const NOTIFY_MULTIPLIER: u32 = 4;
    pub const MSIX_TABLE: u64 = 0x8000;
    pub const MSIX_TABLE_LEN: u64 = 0x4_0000;
    pub const MSIX_PBA: u64 = 0x4_8000;
    pub const MSIX_PBA_LEN: u64 = 0x800;
    /// The VIO shadow-index control block (present only on devices that offer it).
    pub const VIO: u64 = 0x5_0000;
    pub const VIO_LEN: u64 = 0x1000;

    pub fn notify_addr(bar: u64, queue: u16) -> u64 {
        bar + Self::NOTIFY + u64::from(queue) * u64::from(Self::NOTIFY_MULTIPLIER)
    }
}

/// The VIO hardware extension: a vendor-specific capability (virtio layout, `cfg_type`
/// `VIO_CAP_SHADOW_INDEX`, which virtio drivers ignore) pointing at a control block in BAR 0.
/// Per queue, a client may make the device read the available index from a 16-bit shadow at a
/// given IOVA instead of the guest's `avail->idx`, and switch back. It may also take over the
/// device's notification suppression: the device then writes `used->flags` and `avail_event`
/// to the shadow (at +2 and +4) instead of the guest's used ring, and the client decides what
/// the guest sees there (the device's view lags the shadow index, so only the client can say
/// truthfully when the guest may skip a doorbell).
///
/// Control block (little endian): `0x0` magic `VIO_SHADOW_MAGIC` (u32, RO), `0x4` version 1
/// (u32, RO), `0x8` number of queues (u32, RO); queue *n* at `0x10 + 16n`: shadow IOVA (u64),
/// control (u32: bit 0 = read the index from the shadow, bit 1 = also redirect the device's
/// notification suppression; 0 = everything from and to the ring again).
pub const VIO_CAP_SHADOW_INDEX: u8 = 0x80;
pub const VIO_SHADOW_MAGIC: u32 = 0x5348_4956; // "VIHS"
pub const VIO_SHADOW_ENABLE: u32 = 1;
pub const VIO_SHADOW_SUPPRESSION: u32 = 2;

/// Where a device reads its available indices from.
pub trait ShadowIndex: Send + Sync {
    /// Reads of the 16-bit index at `avail_idx_addr` come from `shadow` (or, with `None`,
    /// from the ring again).
    fn redirect(&self, avail_idx_addr: u64, shadow: Option<u64>);
}

#[derive(Clone, Default)]
struct ShadowReg {
    iova: u64,
    control: u32,
    /// The ring addresses redirects were installed for, while enabled.
    active: Vec<u64>,
}

pub use pci::IoEventRegistrar;

/// Who applies MSI-X masking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptDelivery {
    /// The transport emulates the MSI-X table and its masks (a VMM-emulated device).
    Emulated,
    /// The device signals each vector's eventfd; the client in front of it emulates the table
    /// and its masks (a vfio-user device, as with real passthrough hardware).
    Direct,
}

struct MsixVectors {
    msix: Arc<Mutex<MsixConfig>>,
    direct: Option<Arc<dyn MsiInterruptGroup>>,
    config: AtomicU16,
    queues: Vec<AtomicU16>,
    isr: AtomicU8,
}

impl VirtioInterrupt for MsixVectors {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        let vector = match kind {
            VirtioInterruptType::Config => {
                self.isr.fetch_or(2, Ordering::SeqCst);
                self.config.load(Ordering::Acquire)
            }
            VirtioInterruptType::Queue(q) => {
                self.isr.fetch_or(1, Ordering::SeqCst);
                self.queues
                    .get(q as usize)
                    .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
            }
        };
        // Without a vector the driver polls (INTx is not wired).
        if vector == NO_VECTOR {
            return Ok(());
        }
        match &self.direct {
            Some(group) => group.trigger(vector),
            None => {
                self.msix.lock().unwrap().trigger(vector);
                Ok(())
            }
        }
    }
}

pub struct VirtioPciDevice {
    id: String,
    config: PciConfiguration,
    device: Arc<Mutex<dyn VirtioDevice>>,
    device_type: u32,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    vectors: Arc<MsixVectors>,
    msix_cap_reg: usize,
    pci_cfg_cap: usize,
    ioevents: Arc<dyn IoEventRegistrar>,
    bar: u64,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    config_generation: u8,
    activated: bool,
    shadow: Option<(Arc<dyn ShadowIndex>, Vec<ShadowReg>)>,
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    // cap_len, cfg_type, bar, id, padding[2], offset, length (after cap_vndr/cap_next)
    let mut b = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl VirtioPciDevice {
    /// `bar` is the guest-physical base the VMM allocated for BAR 0 (64-bit, BAR_SIZE bytes).
    pub fn new(
        id: String,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupts: Arc<dyn MsiInterruptGroup>,
        ioevents: Arc<dyn IoEventRegistrar>,
        bar: u64,
        delivery: InterruptDelivery,
    ) -> Result<Self, String> {
        let (device_type, max_sizes) = {
            let d = device.lock().unwrap();
            (d.device_type(), d.queue_max_sizes().to_vec())
        };
        let nq = max_sizes.len();
        let num_vectors = (nq + 1) as u16;
        let class = if device_type == VIRTIO_ID_BLOCK {
            PciClass::MassStorage
        } else {
            PciClass::Other
        };
        let mut config = PciConfiguration::new(
            VIRTIO_PCI_VENDOR_ID,
            VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16,
            1,
            class,
            0,
            0,
            PciHeader::Device,
            VIRTIO_PCI_VENDOR_ID,
            0x40,
        );
        config.add_bar(PciBarRegion {
            index: 0,
            addr: bar,
            size: VirtioPciLayout::BAR_SIZE,
            kind: PciBarType::Mem64,
            prefetchable: false,
        })?;
        let caps = [
            virtio_cap(
                CAP_COMMON_CFG,
                VirtioPciLayout::COMMON,
                VirtioPciLayout::COMMON_LEN,
                &[],
            ),
            virtio_cap(
                CAP_ISR_CFG,
                VirtioPciLayout::ISR,
                VirtioPciLayout::ISR_LEN,
                &[],
            ),
            virtio_cap(
                CAP_DEVICE_CFG,
                VirtioPciLayout::DEVICE,
                VirtioPciLayout::DEVICE_LEN,
                &[],
            ),
            virtio_cap(
                CAP_NOTIFY_CFG,
                VirtioPciLayout::NOTIFY,
                VirtioPciLayout::NOTIFY_LEN,
                &VirtioPciLayout::NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
        ];
        for c in &caps {
            config.add_capability(VIRTIO_PCI_CAP_ID, c, &[])?;
        }
        // VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length and the data window are driver-writable.
        let pci_cfg = virtio_cap(CAP_PCI_CFG, 0, 0, &[0; 4]);
        let mut wmask = vec![0u8; pci_cfg.len()];
        wmask[2] = 0xff;
        wmask[6..18].fill(0xff);
        let pci_cfg_cap = config.add_capability(VIRTIO_PCI_CAP_ID, &pci_cfg, &wmask)?;
        let cap = MsixCap::new(
            0,
            num_vectors,
            VirtioPciLayout::MSIX_TABLE as u32,
            VirtioPciLayout::MSIX_PBA as u32,
        );
        let msix_off = config.add_capability(MsixCap::id(), &cap.bytes(), &MsixCap::writable())?;

        let mut queues = Vec::with_capacity(nq);
        let mut kicks = Vec::with_capacity(nq);
        for &s in &max_sizes {
            queues.push(Queue::new(s).map_err(|e| format!("queue of size {s}: {e}"))?);
            kicks.push(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?);
        }
        let vectors = Arc::new(MsixVectors {
            direct: (delivery == InterruptDelivery::Direct).then(|| interrupts.clone()),
            msix: Arc::new(Mutex::new(MsixConfig::new(num_vectors, interrupts))),
            config: AtomicU16::new(NO_VECTOR),
            queues: (0..nq).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            isr: AtomicU8::new(0),
        });
        let dev = VirtioPciDevice {
            id,
            config,
            device,
            device_type,
            queues,
            kicks,
            vectors,
            msix_cap_reg: msix_off / 4,
            pci_cfg_cap,
            ioevents,
            bar,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
            activated: false,
            shadow: None,
        };
        dev.register_ioevents(bar)
            .map_err(|e| format!("ioeventfd: {e}"))?;
        Ok(dev)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Offers the VIO shadow-index extension, backed by `host`.
    pub fn with_shadow_index(mut self, host: Arc<dyn ShadowIndex>) -> Result<Self, String> {
        let cap = virtio_cap(
            VIO_CAP_SHADOW_INDEX,
            VirtioPciLayout::VIO,
            VirtioPciLayout::VIO_LEN,
            &[],
        );
        self.config.add_capability(VIRTIO_PCI_CAP_ID, &cap, &[])?;
        self.shadow = Some((host, vec![ShadowReg::default(); self.queues.len()]));
        Ok(self)
    }

    fn shadow_access(&mut self, offset: u64, data: &mut [u8], write: Option<&[u8]>) {
        let nq = self.queues.len();
        let Some((host, regs)) = &mut self.shadow else {
            return data.fill(0);
        };
        let read = |v: u64, data: &mut [u8], at: u64| {
            let b = v.to_le_bytes();
            for (i, d) in data.iter_mut().enumerate() {
                *d = b.get(at as usize + i).copied().unwrap_or(0);
            }
        };
        if offset < 0x10 {
            if write.is_none() {
                let header = u64::from(VIO_SHADOW_MAGIC) | 1 << 32;
                match offset {
                    0..=7 => read(header, data, offset),
                    _ => read(nq as u64, data, offset - 8),
                }
            }
            return;
        }
        let q = ((offset - 0x10) / 16) as usize;
        let field = (offset - 0x10) % 16;
        let Some(reg) = regs.get_mut(q) else {
            return data.fill(0);
        };
        let Some(w) = write else {
            match field {
                0..=7 => read(reg.iova, data, field),
                8..=11 => read(u64::from(reg.control), data, field - 8),
                _ => data.fill(0),
            }
            return;
        };
        let mut v = [0u8; 8];
        v[..w.len()].copy_from_slice(w);
        let v = u64::from_le_bytes(v);
        match (field, w.len()) {
            (0, 8) => reg.iova = v,
            (0, 4) => reg.iova = (reg.iova & !0xffff_ffff) | v,
            (4, 4) => reg.iova = (reg.iova & 0xffff_ffff) | v << 32,
            (8, 4) | (8, 2) | (8, 1) => {
                for old in reg.active.drain(..) {
                    host.redirect(old, None);
                }
                let v = v as u32 & (VIO_SHADOW_ENABLE | VIO_SHADOW_SUPPRESSION);
                reg.control = 0;
                if v & VIO_SHADOW_ENABLE != 0 {
                    let queue = &self.queues[q];
                    let mut redirects = vec![(queue.avail_ring() + 2, reg.iova)];
                    if v & VIO_SHADOW_SUPPRESSION != 0 {
                        let used = queue.used_ring();
                        let avail_event = used + 4 + 8 * u64::from(queue.size());
                        redirects.push((used, reg.iova + 2));
                        redirects.push((avail_event, reg.iova + 4));
                    }
                    for (from, to) in redirects {
                        host.redirect(from, Some(to));
                        reg.active.push(from);
                    }
                    reg.control = v;
                }
            }
            _ => debug!("{}: ignored VIO control write at {offset:#x}", self.id),
        }
    }

    fn reset_shadow(&mut self) {
        if let Some((host, regs)) = &mut self.shadow {
            for r in regs.iter_mut() {
                for old in r.active.drain(..) {
                    host.redirect(old, None);
                }
                r.iova = 0;
                r.control = 0;
            }
        }
    }

    pub fn bar(&self) -> u64 {
        self.bar
    }

    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// Each queue's doorbell: its offset in BAR 0 and the eventfd that kicks the device.
    pub fn queue_notifiers(&self) -> std::io::Result<Vec<(u64, EventFd)>> {
        self.kicks
            .iter()
            .enumerate()
            .map(|(i, k)| Ok((VirtioPciLayout::notify_addr(0, i as u16), k.try_clone()?)))
            .collect()
    }

    /// A device-level reset, as the client of a passthrough device may ask for.
    pub fn reset_device(&mut self) {
        self.reset();
    }

    fn register_ioevents(&self, bar: u64) -> std::io::Result<()> {
        for (i, k) in self.kicks.iter().enumerate() {
            self.ioevents
                .register(k, VirtioPciLayout::notify_addr(bar, i as u16))?;
        }
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let q = self.queue_select as usize;
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => {
                let f = self.device.lock().unwrap().features();
                if self.device_feature_select < 2 {
                    (f >> (32 * self.device_feature_select)) & 0xffff_ffff
                } else {
                    0
                }
            }
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => {
                if self.driver_feature_select < 2 {
                    (self.driver_features >> (32 * self.driver_feature_select)) & 0xffff_ffff
                } else {
                    0
                }
            }
            (0x10, 2) => u64::from(self.vectors.config.load(Ordering::Acquire)),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status),
            (0x15, 1) => u64::from(self.config_generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => self.queues.get(q).map_or(0, |x| u64::from(x.size())),
            (0x1a, 2) => self
                .vectors
                .queues
                .get(q)
                .map_or(u64::from(NO_VECTOR), |v| {
                    u64::from(v.load(Ordering::Acquire))
                }),
            (0x1c, 2) => self.queues.get(q).map_or(0, |x| u64::from(x.ready())),
            (0x1e, 2) => q as u64, // queue_notify_off: queue i at NOTIFY + i * multiplier
            (0x20, 4) | (0x24, 4) | (0x28, 4) | (0x2c, 4) | (0x30, 4) | (0x34, 4) => {
                let Some(x) = self.queues.get(q) else {
                    data.fill(0);
                    return;
                };
                let full = match offset & !7 {
                    0x20 => x.desc_table(),
                    0x28 => x.avail_ring(),
                    _ => x.used_ring(),
                };
                if offset & 4 == 0 {
                    full & 0xffff_ffff
                } else {
                    full >> 32
                }
            }
            _ => {
                debug!(
                    "{}: unhandled common config read at {offset:#x} len {}",
                    self.id,
                    data.len()
                );
                0
            }
        };
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let q = self.queue_select as usize;
        // Queue configuration is frozen once the driver enabled the queue or the device runs.
        let queue_writable = !self.activated && self.queues.get(q).is_some_and(|x| !x.ready());
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            (0x0c, 4) => {
                if self.status & DEVICE_FEATURES_OK == 0 && self.driver_feature_select < 2 {
                    let shift = 32 * self.driver_feature_select;
                    self.driver_features =
                        (self.driver_features & !(0xffff_ffff << shift)) | (v << shift);
                }
            }
            (0x10, 2) => self
                .vectors
                .config
                .store(self.vector_or_none(v as u16), Ordering::Release),
            (0x14, 1) => self.write_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) if queue_writable => {
                if let Some(x) = self.selected_queue() {
                    x.set_size(v as u16);
                }
            }
            (0x1a, 2) => {
                let vec = self.vector_or_none(v as u16);
                if let Some(slot) = self.vectors.queues.get(q) {
                    slot.store(vec, Ordering::Release);
                }
            }
            (0x1c, 2) if queue_writable => {
                if v == 1 {
                    if let Some(x) = self.selected_queue() {
                        x.set_ready(true);
                    }
                }
            }
            (0x20..=0x37, 4) if queue_writable => {
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v as u32), None)
                } else {
                    (None, Some(v as u32))
                };
                if let Some(x) = self.selected_queue() {
                    match offset & !7 {
                        0x20 => x.set_desc_table_address(lo, hi),
                        0x28 => x.set_avail_ring_address(lo, hi),
                        _ => x.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => debug!(
                "{}: ignored common config write at {offset:#x} len {}",
                self.id,
                data.len()
            ),
        }
    }

    /// A vector the device does not have reads back as NO_VECTOR (virtio 1.x 4.1.5.1.2).
    fn vector_or_none(&self, v: u16) -> u16 {
        if v < self.vectors.msix.lock().unwrap().num_vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let newly = status & !self.status;
        if newly & DEVICE_FEATURES_OK != 0 {
            let offered = self.device.lock().unwrap().features();
            let bad = self.driver_features & !offered;
            let packed = self.driver_features & VIRTIO_F_RING_PACKED != 0;
            if bad != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 || packed {
                warn!(
                    "{}: driver features {:#x} not acceptable",
                    self.id, self.driver_features
                );
                self.status = status & !DEVICE_FEATURES_OK;
                return;
            }
            self.device
                .lock()
                .unwrap()
                .ack_features(self.driver_features);
        }
        self.status = status;
        if newly & DEVICE_DRIVER_OK != 0 && status & DEVICE_FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_F_RING_EVENT_IDX != 0;
        let mut active = Vec::new();
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                continue;
            }
            q.set_event_idx(event_idx);
            let kick = match self.kicks[i].try_clone() {
                Ok(k) => k,
                Err(e) => {
                    warn!("{}: {e}", self.id);
                    self.status |= DEVICE_NEEDS_RESET;
                    return;
                }
            };
            let queue = match Queue::try_from(q.state()) {
                Ok(q) => q,
                Err(e) => {
                    warn!("{}: queue {i}: {e}", self.id);
                    self.status |= DEVICE_NEEDS_RESET;
                    return;
                }
            };
            active.push(ActiveQueue {
                index: i as u16,
                queue,
                kick,
            });
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.vectors.clone();
        match self.device.lock().unwrap().activate(interrupt, active) {
            Ok(()) => {
                self.activated = true;
                info!(
                    "{}: activated, features {:#x}",
                    self.id, self.driver_features
                );
            }
            Err(e) => {
                warn!("{}: activation failed: {e}", self.id);
                self.status |= DEVICE_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        self.device.lock().unwrap().reset();
        self.reset_shadow();
        for q in &mut self.queues {
            q.reset();
        }
        for v in &self.vectors.queues {
            v.store(NO_VECTOR, Ordering::Release);
        }
        self.vectors.config.store(NO_VECTOR, Ordering::Release);
        self.vectors.isr.store(0, Ordering::Release);
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.activated = false;
    }

    fn bar_access(&mut self, offset: u64, data: &mut [u8], write: Option<&[u8]>) {
        use VirtioPciLayout as L;
        let within =
            |start: u64, len: u64| offset >= start && offset + data.len() as u64 <= start + len;
        if within(L::COMMON, L::COMMON_LEN) {
            match write {
                Some(w) => self.common_write(offset - L::COMMON, w),
                None => self.common_read(offset - L::COMMON, data),
            }
        } else if within(L::ISR, L::ISR_LEN) {
            if write.is_none() {
                // Reading the ISR clears it.
                data[0] = self.vectors.isr.swap(0, Ordering::AcqRel);
            }
        } else if within(L::DEVICE, L::DEVICE_LEN) {
            let mut d = self.device.lock().unwrap();
            match write {
                Some(w) => d.write_config(offset - L::DEVICE, w),
                None => d.read_config(offset - L::DEVICE, data),
            }
        } else if within(L::NOTIFY, L::NOTIFY_LEN) {
            // A notify that reached the VMM (no ioeventfd matched, e.g. through the PCI
            // configuration access window): kick the queue it names.
            if write.is_some() {
                let q = ((offset - L::NOTIFY) / u64::from(L::NOTIFY_MULTIPLIER)) as usize;
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            } else {
                data.fill(0);
            }
        } else if within(L::MSIX_TABLE, L::MSIX_TABLE_LEN) {
            let mut m = self.vectors.msix.lock().unwrap();
            match write {
                Some(w) => m.write_table(offset - L::MSIX_TABLE, w),
                None => m.read_table(offset - L::MSIX_TABLE, data),
            }
        } else if within(L::VIO, L::VIO_LEN) {
            self.shadow_access(offset - L::VIO, data, write);
        } else if within(L::MSIX_PBA, L::MSIX_PBA_LEN) {
            if write.is_none() {
                self.vectors
                    .msix
                    .lock()
                    .unwrap()
                    .read_pba(offset - L::MSIX_PBA, data);
            }
        } else if write.is_none() {
            data.fill(0);
        }
    }

    /// The VIRTIO_PCI_CAP_PCI_CFG window: an access to pci_cfg_data reaches BAR 0.
    fn pci_cfg_access(&mut self, data: &mut [u8], write: Option<&[u8]>) {
        let base = self.pci_cfg_cap / 4;
        let bar = (self.config.read_reg(base + 1) & 0xff) as u8;
        let offset = u64::from(self.config.read_reg(base + 2));
        let length = self.config.read_reg(base + 3) as usize;
        if bar != 0 || !matches!(length, 1 | 2 | 4) {
            return;
        }
        let n = length.min(data.len());
        match write {
            Some(w) => {
                let mut scratch = [0u8; 4];
                self.bar_access(offset, &mut scratch[..n], Some(&w[..n]));
            }
            None => self.bar_access(offset, &mut data[..n], None),
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg == self.pci_cfg_cap / 4 + 4 {
            let mut d = [0u8; 4];
            self.pci_cfg_access(&mut d, None);
            return u32::from_le_bytes(d);
        }
        if reg == self.msix_cap_reg {
            let ctl = u32::from(self.vectors.msix.lock().unwrap().msg_ctl());
            return (self.config.read_reg(reg) & 0xffff) | ctl << 16;
        }
        self.config.read_reg(reg)
    }

    fn write_config_register(
        &mut self,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarReprogram> {
        if reg == self.pci_cfg_cap / 4 + 4 {
            let mut scratch = [0u8; 4];
            self.pci_cfg_access(&mut scratch, Some(data));
            return None;
        }
        let mv = self.config.write_reg(reg, offset, data);
        if reg == self.msix_cap_reg {
            let ctl = (self.config.read_reg(reg) >> 16) as u16;
            self.vectors.msix.lock().unwrap().set_msg_ctl(ctl);
        }
        mv
    }

    fn read_bar(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.bar_access(offset, data, None);
    }

    fn write_bar(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let mut scratch = [0u8; 8];
        let n = data.len().min(8);
        self.bar_access(offset, &mut scratch[..n], Some(&data[..n]));
    }

    fn move_bar(&mut self, old_base: u64, new_base: u64) -> std::io::Result<()> {
        for (i, k) in self.kicks.iter().enumerate() {
            self.ioevents
                .unregister(k, VirtioPciLayout::notify_addr(old_base, i as u16))?;
        }
        self.register_ioevents(new_base)?;
        self.bar = new_base;
        Ok(())
    }
}

impl VirtioPciDevice {
    pub fn device_type(&self) -> u32 {
        self.device_type
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pci::MsiMessage;
    use std::sync::Mutex as StdMutex;
    use vm_memory::GuestAddress;

    const BAR: u64 = 0x1_0000_0000;

    #[derive(Default)]
    struct Events {
        registered: StdMutex<Vec<u64>>,
    }
    impl IoEventRegistrar for Events {
        fn register(&self, _fd: &EventFd, addr: u64) -> std::io::Result<()> {
            self.registered.lock().unwrap().push(addr);
            Ok(())
        }
        fn unregister(&self, _fd: &EventFd, addr: u64) -> std::io::Result<()> {
            self.registered.lock().unwrap().retain(|&a| a != addr);
            Ok(())
        }
    }

    struct NoInterrupts;
    impl MsiInterruptGroup for NoInterrupts {
        fn update(&self, _i: u16, _m: MsiMessage, _masked: bool) -> std::io::Result<()> {
            Ok(())
        }
        fn trigger(&self, _i: u16) -> std::io::Result<()> {
            Ok(())
        }
        fn notifier(&self, _i: u16) -> Option<EventFd> {
            None
        }
    }

    #[derive(Default)]
    struct Fake {
        acked: u64,
        activated: Vec<(u16, u16)>,
        resets: u32,
    }
    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            VIRTIO_ID_BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[64, 32]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | 1
        }
        fn ack_features(&mut self, f: u64) {
            self.acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data)
        }
        fn activate(
            &mut self,
            _i: Arc<dyn VirtioInterrupt>,
            q: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            if q.iter().any(|a| !a.queue.is_valid(&mem)) {
                return Err(ActivateError::BadQueue("outside memory".into()));
            }
            self.activated = q.iter().map(|a| (a.index, a.queue.size())).collect();
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn device() -> (VirtioPciDevice, Arc<StdMutex<Fake>>, Arc<Events>) {
        let fake = Arc::new(StdMutex::new(Fake::default()));
        let events = Arc::new(Events::default());
        let dev = VirtioPciDevice::new(
            "t".into(),
            fake.clone(),
            Arc::new(NoInterrupts),
            events.clone(),
            BAR,
            InterruptDelivery::Emulated,
        )
        .unwrap();
        (dev, fake, events)
    }

    fn r(d: &mut VirtioPciDevice, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.read_bar(BAR, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn w(d: &mut VirtioPciDevice, off: u64, len: usize, v: u64) {
        d.write_bar(BAR, off, &v.to_le_bytes()[..len]);
    }

    #[test]
    fn identity_and_capabilities() {
        let (mut d, _, events) = device();
        assert_eq!(d.read_config_register(0), 0x1042_1af4);
        assert_eq!(d.read_config_register(4) & 0xf, 0x4, "64-bit memory BAR");
        assert_eq!(d.read_config_register(5), 1);
        let mut types = Vec::new();
        let mut ptr = (d.read_config_register(13) & 0xff) as usize;
        while ptr != 0 {
            let reg = d.read_config_register(ptr / 4);
            let id = reg & 0xff;
            types.push(if id == 0x09 {
                (d.read_config_register(ptr / 4) >> 24) as u8
            } else {
                0x11
            });
            ptr = ((reg >> 8) & 0xff) as usize;
        }
        assert_eq!(
            types,
            vec![
                CAP_COMMON_CFG,
                CAP_ISR_CFG,
                CAP_DEVICE_CFG,
                CAP_NOTIFY_CFG,
                CAP_PCI_CFG,
                0x11
            ]
        );
        assert_eq!(
            *events.registered.lock().unwrap(),
            vec![BAR + 0x6000, BAR + 0x6004]
        );
    }

    #[test]
    fn common_config_registers() {
        let (mut d, fake, _) = device();
        w(&mut d, 0x00, 4, 1);
        assert_eq!(r(&mut d, 0x04, 4), 1, "high feature word: VERSION_1");
        w(&mut d, 0x00, 4, 0);
        assert_eq!(r(&mut d, 0x04, 4), (1 << 29) | 1);
        w(&mut d, 0x00, 4, 7);
        assert_eq!(r(&mut d, 0x04, 4), 0, "selectors past 1 read zero");
        assert_eq!(r(&mut d, 0x12, 2), 2, "num_queues");
        w(&mut d, 0x16, 2, 1);
        assert_eq!(r(&mut d, 0x18, 2), 32, "queue 1 max size");
        assert_eq!(r(&mut d, 0x1e, 2), 1, "queue_notify_off");
        w(&mut d, 0x18, 2, 16);
        assert_eq!(r(&mut d, 0x18, 2), 16);
        for (off, v) in [(0x20u64, 0x1000u64), (0x28, 0x2000), (0x30, 0x3000)] {
            w(&mut d, off, 4, v);
            w(&mut d, off + 4, 4, 0);
            assert_eq!(r(&mut d, off, 4), v);
            assert_eq!(r(&mut d, off + 4, 4), 0);
        }
        w(&mut d, 0x1a, 2, 1);
        assert_eq!(r(&mut d, 0x1a, 2), 1, "vector 1 exists (3 vectors)");
        w(&mut d, 0x1a, 2, 9);
        assert_eq!(
            r(&mut d, 0x1a, 2),
            0xffff,
            "a vector the device lacks reads NO_VECTOR"
        );
        w(&mut d, 0x16, 2, 5);
        assert_eq!(
            r(&mut d, 0x18, 2),
            0,
            "a queue that does not exist has size 0"
        );
        assert_eq!(r(&mut d, 0x4000, 4), 0x0403_0201, "device config window");

        // Feature negotiation: a feature the device does not offer is refused.
        w(
            &mut d,
            0x14,
            1,
            u64::from(DEVICE_ACKNOWLEDGE | DEVICE_DRIVER),
        );
        w(&mut d, 0x08, 4, 0);
        w(&mut d, 0x0c, 4, 1 << 5);
        w(&mut d, 0x08, 4, 1);
        w(&mut d, 0x0c, 4, 1);
        w(
            &mut d,
            0x14,
            1,
            u64::from(DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK),
        );
        assert_eq!(r(&mut d, 0x14, 1) as u8 & DEVICE_FEATURES_OK, 0);
        w(&mut d, 0x08, 4, 0);
        w(&mut d, 0x0c, 4, (1 << 29) | 1);
        w(
            &mut d,
            0x14,
            1,
            u64::from(DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK),
        );
        assert_ne!(r(&mut d, 0x14, 1) as u8 & DEVICE_FEATURES_OK, 0);
        assert_eq!(
            fake.lock().unwrap().acked,
            VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | 1
        );

        // Enable queue 1 only, then DRIVER_OK activates with it.
        w(&mut d, 0x16, 2, 1);
        w(&mut d, 0x1c, 2, 1);
        assert_eq!(r(&mut d, 0x1c, 2), 1);
        w(
            &mut d,
            0x14,
            1,
            u64::from(DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK | DEVICE_DRIVER_OK),
        );
        assert_eq!(fake.lock().unwrap().activated, vec![(1, 16)]);
        // Queue registers are frozen while the device runs.
        w(&mut d, 0x18, 2, 8);
        assert_eq!(r(&mut d, 0x18, 2), 16);

        // Reset.
        w(&mut d, 0x14, 1, 0);
        assert_eq!(r(&mut d, 0x14, 1), 0);
        assert!(fake.lock().unwrap().resets >= 1);
        assert_eq!(r(&mut d, 0x16, 2), 0, "queue_select is reset");
        w(&mut d, 0x16, 2, 1);
        assert_eq!(r(&mut d, 0x1c, 2), 0, "queues are disabled by reset");
        assert_eq!(r(&mut d, 0x18, 2), 32, "and back at their max size");
    }

    #[test]
    fn invalid_queue_layout_sets_needs_reset() {
        let (mut d, fake, _) = device();
        w(&mut d, 0x08, 4, 1);
        w(&mut d, 0x0c, 4, 1);
        w(
            &mut d,
            0x14,
            1,
            u64::from(DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK),
        );
        w(&mut d, 0x16, 2, 0);
        w(&mut d, 0x20, 4, 0xfff_0000); // descriptor table outside guest memory
        w(&mut d, 0x1c, 2, 1);
        w(
            &mut d,
            0x14,
            1,
            u64::from(DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK | DEVICE_DRIVER_OK),
        );
        assert_ne!(r(&mut d, 0x14, 1) as u8 & DEVICE_NEEDS_RESET, 0);
        assert!(fake.lock().unwrap().activated.is_empty());
    }

    #[test]
    fn isr_clears_on_read_and_pci_cfg_window_reaches_the_bar() {
        let (mut d, _, _) = device();
        d.vectors.trigger(VirtioInterruptType::Queue(0)).unwrap();
        assert_eq!(r(&mut d, 0x2000, 1), 1);
        assert_eq!(r(&mut d, 0x2000, 1), 0);
        // Through VIRTIO_PCI_CAP_PCI_CFG: read num_queues (offset 0x12, 2 bytes).
        let base = d.pci_cfg_cap / 4;
        d.write_config_register(base + 1, 0, &[0]);
        d.write_config_register(base + 2, 0, &0x12u32.to_le_bytes());
        d.write_config_register(base + 3, 0, &2u32.to_le_bytes());
        assert_eq!(d.read_config_register(base + 4) & 0xffff, 2);
    }

    #[test]
    fn moving_the_bar_moves_the_doorbells() {
        let (mut d, _, events) = device();
        d.move_bar(BAR, 0x2_0000_0000).unwrap();
        assert_eq!(
            *events.registered.lock().unwrap(),
            vec![0x2_0000_6000, 0x2_0000_6004]
        );
        assert_eq!(d.bar(), 0x2_0000_0000);
    }

    #[test]
    fn msix_enable_through_config_space() {
        let (mut d, _, _) = device();
        let reg = d.msix_cap_reg;
        assert_eq!(d.read_config_register(reg) >> 16, 2, "table size - 1");
        d.write_config_register(reg, 2, &0x8000u16.to_le_bytes());
        assert!(d.vectors.msix.lock().unwrap().enabled());
        assert_eq!(d.read_config_register(reg) >> 16, 0x8002);
    }
}
