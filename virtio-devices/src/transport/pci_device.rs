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
                cap_type::COMMON_CFG,
                cap_type::ISR_CFG,
                cap_type::DEVICE_CFG,
                cap_type::NOTIFY_CFG,
                cap_type::PCI_CFG,
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
