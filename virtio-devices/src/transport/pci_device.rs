//! virtio-pci modern transport (virtio 1.x 4.1): one 64-bit memory BAR holding the common,
//! ISR, device and notify structures plus the MSI-X table and PBA.

use super::pci_common_config::{cap_type, offset, CommonConfig, CommonWrite, VectorSelection};
use super::vio_shadow::{ShadowIndex, VioControlBlock};
use crate::*;
use log::{info, warn};
use pci::{
    BarReprogram, MsiInterruptGroup, MsixCap, MsixConfig, PciBarRegion, PciBarType, PciClass,
    PciConfiguration, PciDevice, PciHeader,
};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};

const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
const VIRTIO_PCI_CAP_ID: u8 = 0x09;
pub(super) const NO_VECTOR: u16 = 0xffff;

const _: () = assert!(VirtioPciLayout::VIO_LEN >= vio::spec::CONTROL_BLOCK_LEN);

/// Where each structure sits in BAR 0.
pub struct VirtioPciLayout;

impl VirtioPciLayout {
    pub const BAR_SIZE: u64 = 0x8_0000;
    pub const COMMON: u64 = 0x0000;
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

pub use pci::IoEventRegistrar;

#[derive(Debug, Error)]
pub enum VirtioPciError {
    #[error("Invalid PCI configuration")]
    Config(#[from] pci::ConfigError),
    #[error("Invalid queue of size {0}")]
    Queue(u16, #[source] virtio_queue::Error),
    #[error("Failed to set up doorbells")]
    Doorbell(#[source] std::io::Error),
    #[error("Invalid saved state: {0}")]
    Restore(String),
}

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
    selection: VectorSelection,
    isr: AtomicU8,
}

impl VirtioInterrupt for MsixVectors {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        let vector = match kind {
            VirtioInterruptType::Config => {
                self.isr.fetch_or(2, Ordering::SeqCst);
                self.selection.config.load(Ordering::Acquire)
            }
            VirtioInterruptType::Queue(q) => {
                self.isr.fetch_or(1, Ordering::SeqCst);
                self.selection
                    .queues
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
    common: CommonConfig,
    shadow: Option<VioControlBlock>,
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
    ) -> Result<Self, VirtioPciError> {
        let (device_type, max_sizes) = {
            let d = device.lock().unwrap();
            (d.device_type(), d.queue_max_sizes().to_vec())
        };
        let nq = max_sizes.len();
        let num_vectors = (nq + 1) as u16;
        let class = match device_type {
            VIRTIO_ID_BLOCK => PciClass::MassStorage,
            VIRTIO_ID_NET => PciClass::Network,
            _ => PciClass::Other,
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
                cap_type::COMMON_CFG,
                VirtioPciLayout::COMMON,
                offset::LEN,
                &[],
            ),
            virtio_cap(
                cap_type::ISR_CFG,
                VirtioPciLayout::ISR,
                VirtioPciLayout::ISR_LEN,
                &[],
            ),
            virtio_cap(
                cap_type::DEVICE_CFG,
                VirtioPciLayout::DEVICE,
                VirtioPciLayout::DEVICE_LEN,
                &[],
            ),
            virtio_cap(
                cap_type::NOTIFY_CFG,
                VirtioPciLayout::NOTIFY,
                VirtioPciLayout::NOTIFY_LEN,
                &VirtioPciLayout::NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
        ];
        for c in &caps {
            config.add_capability(VIRTIO_PCI_CAP_ID, c, &[])?;
        }
        // VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length and the data window are driver-writable.
        let pci_cfg = virtio_cap(cap_type::PCI_CFG, 0, 0, &[0; 4]);
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
            queues.push(Queue::new(s).map_err(|e| VirtioPciError::Queue(s, e))?);
            kicks.push(EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioPciError::Doorbell)?);
        }
        let vectors = Arc::new(MsixVectors {
            direct: (delivery == InterruptDelivery::Direct).then(|| interrupts.clone()),
            msix: Arc::new(Mutex::new(MsixConfig::new(num_vectors, interrupts))),
            selection: VectorSelection::new(nq, num_vectors),
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
            common: CommonConfig::default(),
            shadow: None,
        };
        dev.register_ioevents(bar)
            .map_err(VirtioPciError::Doorbell)?;
        Ok(dev)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Offers the VIO shadow-index extension, backed by `host`.
    pub fn with_shadow_index(mut self, host: Arc<dyn ShadowIndex>) -> Result<Self, VirtioPciError> {
        let cap = virtio_cap(
            vio::spec::CAP_CFG_TYPE,
            VirtioPciLayout::VIO,
            VirtioPciLayout::VIO_LEN,
            &[],
        );
        self.config.add_capability(VIRTIO_PCI_CAP_ID, &cap, &[])?;
        self.shadow = Some(VioControlBlock::new(host, self.queues.len()));
        Ok(self)
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

    fn common_read(&mut self, off: u64, data: &mut [u8]) {
        let features = self.device.lock().unwrap().features();
        let v = self.common.read(
            off,
            data.len(),
            &self.queues,
            features,
            &self.vectors.selection,
        );
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let r = self.common.write(
            off,
            data.len(),
            v,
            &mut self.queues,
            &self.vectors.selection,
        );
        if let CommonWrite::Status(status) = r {
            self.write_status(status);
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let newly = status & !self.common.status;
        if newly & DEVICE_FEATURES_OK != 0 {
            let offered = self.device.lock().unwrap().features();
            let bad = self.common.driver_features & !offered;
            let packed = self.common.driver_features & VIRTIO_F_RING_PACKED != 0;
            if bad != 0 || self.common.driver_features & VIRTIO_F_VERSION_1 == 0 || packed {
                warn!(
                    "{}: driver features {:#x} not acceptable",
                    self.id, self.common.driver_features
                );
                self.common.status = status & !DEVICE_FEATURES_OK;
                return;
            }
            self.device
                .lock()
                .unwrap()
                .ack_features(self.common.driver_features);
        }
        self.common.status = status;
        if newly & DEVICE_DRIVER_OK != 0 && status & DEVICE_FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.common.driver_features & VIRTIO_F_RING_EVENT_IDX != 0;
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
                    self.common.status |= DEVICE_NEEDS_RESET;
                    return;
                }
            };
            let queue = match Queue::try_from(q.state()) {
                Ok(q) => q,
                Err(e) => {
                    warn!("{}: queue {i}: {e}", self.id);
                    self.common.status |= DEVICE_NEEDS_RESET;
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
                self.common.activated = true;
                info!(
                    "{}: activated, features {:#x}",
                    self.id, self.common.driver_features
                );
            }
            Err(e) => {
                warn!("{}: activation failed: {e}", self.id);
                self.common.status |= DEVICE_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        self.device.lock().unwrap().reset();
        if let Some(s) = &mut self.shadow {
            s.reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.vectors.selection.reset();
        self.vectors.isr.store(0, Ordering::Release);
        self.common.reset();
    }

    fn bar_access(&mut self, offset: u64, data: &mut [u8], write: Option<&[u8]>) {
        use VirtioPciLayout as L;
        let within =
            |start: u64, len: u64| offset >= start && offset + data.len() as u64 <= start + len;
        if within(L::COMMON, offset::LEN) {
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
            match &mut self.shadow {
                Some(s) => s.access(offset - L::VIO, data, write, &self.queues),
                None => data.fill(0),
            }
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

#[path = "pci_device_state.rs"]
mod state;
pub use state::{QueueConfig, VirtioPciState};

#[cfg(test)]
#[path = "pci_device_tests.rs"]
mod tests;
