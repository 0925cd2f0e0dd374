//! Creates and wires the VM's devices: legacy ports, PCI segment 0, the emulated virtio-pci
//! devices (`emulated`) and the passthrough devices.

use crate::config::{ConsoleMode, UserDeviceConfig, VioMode, VmConfig};
use crate::devices::{
    AcpiPmTimer, AcpiShutdown, DebugPort, ExitNotifier, LineWriter, SerialDevice, I8042,
};
use crate::emulated::{Emulated, PciSpace};
use crate::interrupt::{GsiRouter, KvmMsiGroup};
use crate::layout;
use crate::memory_manager::MemoryManager;
use crate::reclaim::PassthroughMapping;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::{
    BarReprogram, Bus, BusDevice, DeviceRelocation, PciBus, PciConfigIo, PciConfigMmio, PciDevice,
    PciRoot,
};
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use thiserror::Error;
use vfio::vfio_user::{VfioUserClient, VfioUserPciDevice};
use vfio::vio::{LockOptions, SwitchReport, VioInfo, VioOptions, VioPciDevice};
use vfio::{DmaBacking, DmaMapping};
use vio::elastic::{Mode, Setting, Thresholds};
use vio::spec::PAGE_SIZE;
use virtio_devices::transport::{IoEventRegistrar, VirtioPciDevice};
use virtio_devices::GuestMemoryMmap;
use virtio_devices::VirtioDevice;
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("Failed to open disk image {0}")]
    OpenDisk(String, #[source] io::Error),
    #[error("Network device {0}")]
    Tap(String, #[source] virtio_devices::net::TapError),
    #[error("Failed to open serial output file")]
    SerialFile(#[source] io::Error),
    #[error("Failed to set up interrupts")]
    Interrupts(#[source] io::Error),
    #[error("No room for a BAR of {0:#x} bytes")]
    BarSpace(u64),
    #[error("No free PCI slot")]
    NoPciSlot,
    #[error("Failed to create a virtio-pci device")]
    VirtioPci(#[source] virtio_devices::transport::VirtioPciError),
    #[error("Bus conflict")]
    Bus(#[from] pci::BusError),
    #[error("User device {0}")]
    UserDevice(String, #[source] UserDeviceError),
    #[error("No passthrough device {0}")]
    NoSuchDevice(String),
    #[error("Device {0} is not a vio device")]
    NotVio(String),
    #[error("Device {0}")]
    Switch(String, #[source] vfio::vio::SwitchError),
    #[error("Cannot take the devices over: {0}")]
    Restore(String),
}

/// Why a vfio-user device could not be added.
#[derive(Debug, Error)]
pub enum UserDeviceError {
    #[error("vfio-user")]
    Client(#[from] vfio::vfio_user::ClientError),
    #[error("Failed to set up the PCI function")]
    Pci(#[from] vfio::vfio_user::VfioUserDeviceError),
    #[error("Failed to set up VIO")]
    Vio(#[from] vfio::vio::VioDeviceError),
    #[error("Failed to DMA-map guest RAM")]
    DmaMap(#[from] vfio::DmaError),
    #[error("Failed to take the device over")]
    Handover(#[source] vfio::handover::HandoverError),
    #[error("Failed to map guest RAM for page requests")]
    Map(#[source] vio::PageError),
    #[error("Page requests")]
    Pri(#[source] vfio::vfio_user::PriError),
}

/// Bump allocation of naturally aligned BAR space.
pub(crate) struct AddressAllocator {
    next: u64,
    end: u64,
}

impl AddressAllocator {
    pub fn new(start: u64, size: u64) -> Self {
        AddressAllocator {
            next: start,
            end: start + size,
        }
    }

    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        let base = self.next.checked_next_multiple_of(size)?;
        let end = base.checked_add(size)?;
        (end <= self.end).then(|| {
            self.next = end;
            base
        })
    }
}

struct KvmIoEvents(Arc<VmFd>);

impl IoEventRegistrar for KvmIoEvents {
    fn register(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.0
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io::Error::from)
    }
    fn unregister(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.0
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io::Error::from)
    }
}

/// A device served by another process: plain passthrough, or under VIO.
#[derive(Clone)]
enum UserDevice {
    Passthrough(Arc<Mutex<VfioUserPciDevice>>),
    Vio(Arc<Mutex<VioPciDevice<GuestMemoryMmap>>>),
}

impl UserDevice {
    fn pci(&self) -> Arc<Mutex<dyn PciDevice>> {
        match self {
            UserDevice::Passthrough(d) => d.clone(),
            UserDevice::Vio(d) => d.clone(),
        }
    }

    fn with<T>(
        &self,
        pt: impl FnOnce(&VfioUserPciDevice) -> T,
        vio: impl FnOnce(&VioPciDevice<GuestMemoryMmap>) -> T,
    ) -> T {
        match self {
            UserDevice::Passthrough(d) => pt(&d.lock().unwrap()),
            UserDevice::Vio(d) => vio(&d.lock().unwrap()),
        }
    }

    fn id(&self) -> String {
        self.with(|d| d.id().to_string(), |d| d.id().to_string())
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        self.with(|d| d.counters(), |d| d.counters())
    }

    fn client(&self) -> Arc<VfioUserClient> {
        self.with(|d| d.client().clone(), |d| d.client().clone())
    }

    fn bars(&self) -> Vec<pci::PciBarRegion> {
        self.with(
            |d| (0..6).filter_map(|b| d.bar(b)).collect(),
            |d| (0..6).filter_map(|b| d.bar(b)).collect(),
        )
    }
}

/// The MMIO bus side of a PCI device: BAR accesses go to the device.
pub(crate) struct PciBarHandler(pub Arc<Mutex<dyn PciDevice>>);

impl BusDevice for PciBarHandler {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        self.0.lock().unwrap().read_bar(base, offset, data)
    }
    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        self.0.lock().unwrap().write_bar(base, offset, data)
    }
}

/// Follows a guest BAR move on the MMIO bus, then lets the device re-home its ioeventfds.
/// Weak: the MMIO bus holds the PCI bus (through ECAM), which holds this; a strong reference
/// would be a cycle that keeps every device alive after the VM is gone (and a passthrough
/// device's connection open, so a rebooted VM could not reconnect).
struct BusRelocation(std::sync::Weak<Bus>);

impl DeviceRelocation for BusRelocation {
    fn move_bar(&self, mv: &BarReprogram, dev: &mut dyn PciDevice) -> io::Result<()> {
        self.0
            .upgrade()
            .ok_or_else(|| io::Error::other("The MMIO bus is gone"))?
            .relocate(mv.old_base, mv.new_base)
            .map_err(io::Error::other)?;
        dev.move_bar(mv.old_base, mv.new_base)
    }
}

pub struct DeviceManager {
    pio_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    virtio: Vec<(String, Arc<Mutex<dyn VirtioDevice>>)>,
    /// The virtio devices' transports, in the same order.
    transports: Vec<Arc<Mutex<VirtioPciDevice>>>,
    /// The disks' image files and the network devices' TAPs, in the same order (a live upgrade
    /// hands them on).
    disk_files: Vec<std::fs::File>,
    tap_files: Vec<std::fs::File>,
    user: Vec<UserDevice>,
    /// Each user device's vectors, in the same order.
    user_msi: Vec<Arc<KvmMsiGroup>>,
    /// Every device's vectors (virtio and user), to take them off KVM for a live upgrade.
    msi_groups: Vec<Arc<KvmMsiGroup>>,
    serial_irq: EventFd,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    /// The serial output file, if any (a live upgrade hands it on rather than reopening it).
    serial_file: Option<std::fs::File>,
    pm_timer: Arc<Mutex<AcpiPmTimer>>,
    pci_io: Arc<Mutex<PciConfigIo>>,
}

/// What a new VMM process builds its devices from instead of from scratch (a live upgrade).
pub struct DeviceRestore<'a> {
    pub state: &'a handover::DevicesState,
    pub fds: &'a mut vfio::handover::FdsIn,
    /// Plain passthrough devices the configuration asked to hold under VIO but that do not
    /// offer the extension: they stay plain passthrough.
    pub kept_passthrough: Vec<String>,
}

impl DeviceManager {
    pub fn new(
        vm: Arc<VmFd>,
        config: &VmConfig,
        ram: &MemoryManager,
        exit: ExitNotifier,
        start: Instant,
        mut restore: Option<&mut DeviceRestore>,
    ) -> Result<Self, DeviceError> {
        let memory = ram.memory();
        let pio_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::Interrupts)?;
        vm.register_irqfd(&serial_irq, 4)
            .map_err(|e| DeviceError::Interrupts(e.into()))?;
        let serial_file = match (&config.serial, restore.as_deref_mut()) {
            (ConsoleMode::File(_), Some(r)) => Some(r.serial_file()?),
            (ConsoleMode::File(p), None) => {
                Some(std::fs::File::create(p).map_err(DeviceError::SerialFile)?)
            }
            _ => None,
        };
        let out: Option<Box<dyn io::Write + Send>> = match &config.serial {
            ConsoleMode::Tty => Some(Box::new(LineWriter(io::stdout()))),
            ConsoleMode::File(_) => Some(Box::new(LineWriter(
                serial_file
                    .as_ref()
                    .expect("opened above")
                    .try_clone()
                    .map_err(DeviceError::SerialFile)?,
            ))),
            ConsoleMode::Null => Some(Box::new(io::sink())),
            ConsoleMode::Off => None,
        };
        let mut serial = None;
        if let Some(out) = out {
            let irq = serial_irq.try_clone().map_err(DeviceError::Interrupts)?;
            let dev = match restore.as_deref().and_then(|r| r.state.serial.as_ref()) {
                Some(s) => {
                    SerialDevice::from_state(s, irq, out).map_err(DeviceError::Interrupts)?
                }
                None => SerialDevice::new(irq, out),
            };
            let dev = Arc::new(Mutex::new(dev));
            pio_bus.insert(dev.clone(), 0x3f8, 8)?;
            serial = Some(dev);
        }
        pio_bus.insert(
            Arc::new(Mutex::new(AcpiShutdown::new(exit.clone()))),
            0x600,
            8,
        )?;
        pio_bus.insert(
            Arc::new(Mutex::new(I8042::new(exit))),
            I8042::BASE,
            I8042::LEN,
        )?;
        pio_bus.insert(Arc::new(Mutex::new(DebugPort::new(start))), 0x80, 1)?;
        let pm_timer = Arc::new(Mutex::new(match restore.as_deref() {
            Some(r) => {
                AcpiPmTimer::continuing(std::time::Duration::from_nanos(r.state.pm_timer_ns))
            }
            None => AcpiPmTimer::new(),
        }));
        pio_bus.insert(pm_timer.clone(), AcpiPmTimer::PORT, 4)?;

        let relocation = Arc::new(BusRelocation(Arc::downgrade(&mmio_bus)));
        let pci_bus = Arc::new(Mutex::new(PciBus::new(PciRoot::new(), relocation)));
        let pci_io = Arc::new(Mutex::new(PciConfigIo::new(pci_bus.clone())));
        if let Some(r) = restore.as_deref() {
            pci_io
                .lock()
                .unwrap()
                .set_address(r.state.pci_config_address);
        }
        pio_bus.insert(pci_io.clone(), 0xcf8, 8)?;
        mmio_bus.insert(
            Arc::new(Mutex::new(PciConfigMmio::new(pci_bus.clone()))),
            layout::PCI_MMCONFIG_START,
            layout::PCI_MMCONFIG_SIZE,
        )?;

        let router = GsiRouter::new(vm.clone()).map_err(DeviceError::Interrupts)?;
        let ioevents: Arc<dyn IoEventRegistrar> = Arc::new(KvmIoEvents(vm.clone()));
        let mut bars64 = AddressAllocator::new(
            layout::mem_64bit_devices_start(config.memory.size),
            layout::MEM_64BIT_DEVICES_SIZE,
        );
        if let Some(r) = restore.as_deref() {
            r.check_counts(config)?;
        }
        let Emulated {
            virtio,
            transports,
            mut msi_groups,
            disk_files,
            tap_files,
        } = Emulated::new(
            config,
            &memory,
            &mut PciSpace {
                pci_bus: &pci_bus,
                mmio_bus: &mmio_bus,
                bars64: &mut bars64,
                router: &router,
                ioevents: &ioevents,
            },
            restore.as_deref_mut(),
        )?;
        let mut bars32 = AddressAllocator::new(
            layout::MEM_32BIT_DEVICES_START,
            layout::MEM_32BIT_DEVICES_SIZE,
        );
        let mut user = Vec::new();
        let mut user_msi = Vec::new();
        for (i, u) in config.user_devices.iter().enumerate() {
            let id = u.id.clone().unwrap_or_else(|| format!("_user{i}"));
            let (dev, group) = match restore.as_deref_mut() {
                Some(r) => r.adopt_user_device(&id, i, u, ram, &router, &ioevents)?,
                None => Self::add_user_device(
                    &id,
                    u,
                    ram,
                    &router,
                    &ioevents,
                    &mut bars32,
                    &mut bars64,
                )?,
            };
            msi_groups.push(group.clone());
            user_msi.push(group);
            let bars = dev.bars();
            let pci_dev = dev.pci();
            let mut bus = pci_bus.lock().unwrap();
            let slot = bus.next_device_number().ok_or(DeviceError::NoPciSlot)?;
            bus.add_device(slot, pci_dev.clone())
                .map_err(|_| DeviceError::NoPciSlot)?;
            for b in bars {
                mmio_bus.insert(
                    Arc::new(Mutex::new(PciBarHandler(pci_dev.clone()))),
                    b.addr,
                    b.size,
                )?;
                log::info!("{id}: BAR{} {:#x}+{:#x}", b.index, b.addr, b.size);
            }
            log::info!(
                "{id}: vfio-user device {} at 00:{slot:02x}.0{}",
                u.socket.display(),
                if u.vio.is_some() { " under VIO" } else { "" }
            );
            user.push(dev);
        }
        Ok(DeviceManager {
            pio_bus,
            mmio_bus,
            virtio,
            transports,
            disk_files,
            tap_files,
            user,
            user_msi,
            msi_groups,
            serial_irq,
            serial,
            serial_file,
            pm_timer,
            pci_io,
        })
    }

    fn add_user_device(
        id: &str,
        u: &UserDeviceConfig,
        ram: &MemoryManager,
        router: &Arc<GsiRouter>,
        ioevents: &Arc<dyn IoEventRegistrar>,
        bars32: &mut AddressAllocator,
        bars64: &mut AddressAllocator,
    ) -> Result<(UserDevice, Arc<KvmMsiGroup>), DeviceError> {
        let err = |e: UserDeviceError| DeviceError::UserDevice(id.to_string(), e);
        let client = Arc::new(VfioUserClient::connect(&u.socket).map_err(|e| err(e.into()))?);
        let vectors = client
            .irq_info(vfio::vfio_user::protocol::PCI_MSIX_IRQ_INDEX)
            .map_err(|e| err(e.into()))?
            .count;
        let group = Arc::new(
            KvmMsiGroup::new(router.clone(), vectors.clamp(1, 2048) as u16)
                .map_err(DeviceError::Interrupts)?,
        );
        let mut alloc = |size: u64, is64: bool| {
            if is64 {
                bars64.allocate(size)
            } else {
                bars32.allocate(size)
            }
        };
        if let Some(vio) = &u.vio {
            // Nothing of guest RAM is mapped up front: the snoop engine maps what requests need.
            let inner = VfioUserPciDevice::new(
                id.to_string(),
                client.clone(),
                group.clone(),
                ioevents.clone(),
                &mut alloc,
                false,
            )
            .map_err(|e| err(e.into()))?;
            let dev = VioPciDevice::new(
                inner,
                ram.memory(),
                vio_window(ram, &client),
                ram_pages(ram),
                ioevents.clone(),
                vio_options(vio),
            )
            .map_err(|e| err(e.into()))?;
            return Ok((UserDevice::Vio(Arc::new(Mutex::new(dev))), group));
        }
        // Plain passthrough: all of guest RAM is DMA-mapped, at IOVA = guest-physical address;
        // pinned, unless the device takes page faults (PRI): then reclaim unmaps what it takes,
        // and the device asks for it back.
        let pri_window = if u.pri {
            let window = vio_window(ram, &client);
            for (first, n) in ram_pages(ram) {
                window
                    .acquire_range(first, n)
                    .map_err(|e| err(UserDeviceError::Map(e)))?;
                (first..first + n).for_each(|p| window.release(p));
            }
            Some(window)
        } else {
            pin_for_passthrough(ram, id, &client);
            for r in ram.regions() {
                let backing = DmaBacking {
                    file: ram.memfd(),
                    file_offset: r.file_offset,
                    host_addr: 0,
                };
                client
                    .map(r.guest_addr, r.size, &backing)
                    .map_err(|e| err(e.into()))?;
            }
            None
        };
        let mut dev = VfioUserPciDevice::new(
            id.to_string(),
            client,
            group.clone(),
            ioevents.clone(),
            &mut alloc,
            u.io_fds(),
        )
        .map_err(|e| err(e.into()))?;
        if let Some(window) = pri_window {
            dev.start_page_requests(window)
                .map_err(|e| err(UserDeviceError::Pri(e)))?;
        }
        Ok((UserDevice::Passthrough(Arc::new(Mutex::new(dev))), group))
    }

    pub fn pio_bus(&self) -> Arc<Bus> {
        self.pio_bus.clone()
    }

    pub fn mmio_bus(&self) -> Arc<Bus> {
        self.mmio_bus.clone()
    }

    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        let mut all: BTreeMap<String, BTreeMap<String, u64>> = self
            .virtio
            .iter()
            .map(|(id, d)| (id.clone(), d.lock().unwrap().counters()))
            .collect();
        for d in &self.user {
            all.insert(d.id(), d.counters());
        }
        all
    }

    /// Sets how `vio` device `id` runs; a fixed mode switches now (and reports the switch).
    pub fn vio_mode(&self, id: &str, mode: VioMode) -> Result<Option<SwitchReport>, DeviceError> {
        let handle = match self.user.iter().find(|d| d.id() == id) {
            None => return Err(DeviceError::NoSuchDevice(id.to_string())),
            Some(UserDevice::Passthrough(_)) => return Err(DeviceError::NotVio(id.to_string())),
            // The device lock is not held across the switch: the guest keeps using the device.
            Some(UserDevice::Vio(d)) => d.lock().unwrap().handle(),
        };
        handle
            .set(vio_setting(mode))
            .map_err(|e| DeviceError::Switch(id.to_string(), e))
    }

    /// `vm.vio-info`: every `vio` device's mode, rate and queues.
    pub fn vio_info(&self) -> Vec<VioInfo> {
        self.user
            .iter()
            .filter_map(|d| match d {
                UserDevice::Vio(d) => Some(d.lock().unwrap().handle()),
                UserDevice::Passthrough(_) => None,
            })
            .map(|h| h.info())
            .collect()
    }

    /// Revokes passthrough device `id`'s DMA access to [iova, iova+size).
    pub fn dma_unmap(&self, id: &str, iova: u64, size: u64) -> Result<(), DeviceError> {
        let dev = self
            .user
            .iter()
            .find(|d| d.id() == id)
            .ok_or_else(|| DeviceError::NoSuchDevice(id.to_string()))?;
        dev.client()
            .unmap(iova, size)
            .map_err(|e| DeviceError::UserDevice(id.to_string(), e.into()))
    }

    pub fn pause(&self) {
        for (_, d) in &self.virtio {
            d.lock().unwrap().pause();
        }
    }

    pub fn resume(&self) {
        for (_, d) in &self.virtio {
            d.lock().unwrap().resume();
        }
    }

    /// Stops every device worker.
    pub fn reset(&self) {
        for (_, d) in &self.virtio {
            d.lock().unwrap().reset();
        }
        let _ = self.serial_irq.read();
    }
}

/// A `vio` device's DMA window onto guest RAM, known to the reclaimer.
fn vio_window(ram: &MemoryManager, client: &Arc<VfioUserClient>) -> Arc<vio::DmaWindow> {
    let window = Arc::new(
        vio::DmaWindow::new(
            ram.residency(),
            ram.io_mapper(client.clone()),
            ram.guest_pages(),
        )
        .with_max_maps(client.max_dma_maps()),
    );
    if let Some(r) = ram.reclaimer() {
        r.add_window(&window);
    }
    window
}

/// Guest RAM as runs of page frames (first, count).
fn ram_pages(ram: &MemoryManager) -> Vec<(u64, u64)> {
    ram.regions()
        .iter()
        .map(|r| (r.guest_addr / PAGE_SIZE, r.size / PAGE_SIZE))
        .collect()
}

fn vio_options(vio: &crate::config::VioConfig) -> VioOptions {
    VioOptions {
        poll: std::time::Duration::from_micros(vio.poll_us),
        setting: vio_setting(vio.mode),
        thresholds: Thresholds {
            iops_high: vio.iops_high,
            iops_low: vio.iops_low,
            dwell: std::time::Duration::from_millis(vio.dwell_ms),
        },
        lockpage: vio.lockpage.then_some(LockOptions {
            budget_pct: vio.lock_budget_pct,
        }),
    }
}

/// Plain passthrough maps all of guest RAM, so all of it is pinned for reclaim.
fn pin_for_passthrough(ram: &MemoryManager, id: &str, client: &Arc<VfioUserClient>) {
    if let Some(r) = ram.reclaimer() {
        let pages = ram
            .regions()
            .iter()
            .map(|r| {
                (
                    r.file_offset / PAGE_SIZE,
                    (r.file_offset + r.size) / PAGE_SIZE,
                )
            })
            .collect();
        r.add_passthrough(PassthroughMapping {
            id: id.to_string(),
            mapping: client.clone(),
            pages,
        });
    }
}

pub fn vio_setting(mode: VioMode) -> Setting {
    match mode {
        VioMode::Snoop => Setting::Fixed(Mode::Snoop),
        VioMode::Passthrough => Setting::Fixed(Mode::Passthrough),
        VioMode::Auto => Setting::Auto,
    }
}

#[path = "device_handover.rs"]
pub mod handover;

#[cfg(test)]
mod tests {
    use super::AddressAllocator;

    #[test]
    fn allocator_aligns_and_bounds() {
        let mut a = AddressAllocator::new(0x1000, 0x10_0000);
        assert_eq!(a.allocate(0x8_0000), Some(0x8_0000));
        assert_eq!(a.allocate(0x1000), Some(0x10_0000));
        assert_eq!(a.allocate(0x8_0000), None);
    }
}
