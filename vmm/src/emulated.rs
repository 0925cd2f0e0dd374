//! The VMM-emulated virtio devices: disks (virtio-blk over an image file) and network devices
//! (virtio-net over a TAP interface), each behind a virtio-pci transport on segment 0.

use crate::config::VmConfig;
use crate::device_manager::{AddressAllocator, DeviceError, DeviceRestore, PciBarHandler};
use crate::interrupt::{GsiRouter, KvmMsiGroup};
use pci::{Bus, PciBus, PciDevice};
use std::fs::File;
use std::sync::{Arc, Mutex};
use virtio_devices::block::{Block, BlockConfig, RawFile};
use virtio_devices::net::{Net, NetConfig, Tap, TapError};
use virtio_devices::transport::{
    InterruptDelivery, IoEventRegistrar, VirtioPciDevice, VirtioPciLayout, VirtioPciState,
};
use virtio_devices::{GuestMemoryMmap, VirtioDevice};

/// Where a device goes: the PCI bus, BAR space, and how its interrupts and doorbells reach KVM.
pub struct PciSpace<'a> {
    pub pci_bus: &'a Arc<Mutex<PciBus>>,
    pub mmio_bus: &'a Arc<Bus>,
    pub bars64: &'a mut AddressAllocator,
    pub router: &'a Arc<GsiRouter>,
    pub ioevents: &'a Arc<dyn IoEventRegistrar>,
}

#[derive(Default)]
pub struct Emulated {
    pub virtio: Vec<(String, Arc<Mutex<dyn VirtioDevice>>)>,
    /// The devices' transports, in the same order: the disks, then the network devices.
    pub transports: Vec<Arc<Mutex<VirtioPciDevice>>>,
    pub msi_groups: Vec<Arc<KvmMsiGroup>>,
    /// The disks' image files and the network devices' TAPs, in order (a live upgrade hands
    /// them on).
    pub disk_files: Vec<File>,
    pub tap_files: Vec<File>,
}

impl Emulated {
    pub fn new(
        config: &VmConfig,
        memory: &Arc<GuestMemoryMmap>,
        space: &mut PciSpace,
        mut restore: Option<&mut DeviceRestore>,
    ) -> Result<Self, DeviceError> {
        let mut e = Emulated::default();
        for (i, disk) in config.disks.iter().enumerate() {
            let id = disk.id.clone().unwrap_or_else(|| format!("_disk{i}"));
            let open_err = |err| DeviceError::OpenDisk(disk.path.display().to_string(), err);
            let file = match restore.as_deref_mut() {
                Some(r) => RawFile::from_file(r.disk_file(i)?, disk.readonly),
                None => RawFile::open(&disk.path, disk.readonly),
            }
            .map_err(open_err)?;
            e.disk_files
                .push(file.file().try_clone().map_err(open_err)?);
            let block = Block::new(
                file,
                &BlockConfig {
                    id: id.clone(),
                    num_queues: disk.num_queues,
                    queue_size: disk.queue_size,
                    latency: None,
                },
                memory.clone(),
            );
            let state = restore.as_deref().map(|r| &r.state.disks[i]);
            let what = format!("virtio-blk {}", disk.path.display());
            e.add(space, id, Arc::new(Mutex::new(block)), state, &what)?;
        }
        for (i, net) in config.net.iter().enumerate() {
            let id = net.id.clone().unwrap_or_else(|| format!("_net{i}"));
            let tap = match restore.as_deref_mut() {
                Some(r) => Tap::from_file(r.tap_file(i)?, net.tap.as_deref().unwrap_or("")),
                None => Tap::open(
                    net.tap.as_deref().unwrap_or("vmtap%d"),
                    Some(net.ip),
                    Some(net.mask),
                )
                .map_err(|err| DeviceError::Tap(id.clone(), err))?,
            };
            e.tap_files.push(
                tap.file()
                    .try_clone()
                    .map_err(|err| DeviceError::Tap(id.clone(), TapError::Dup(err)))?,
            );
            let what = format!("virtio-net on {}", tap.name());
            let device = Net::new(
                tap,
                &NetConfig {
                    id: id.clone(),
                    mac: net.mac_bytes(),
                    queue_size: net.queue_size,
                },
                memory.clone(),
            );
            let state = restore.as_deref().map(|r| &r.state.nets[i]);
            e.add(space, id, Arc::new(Mutex::new(device)), state, &what)?;
        }
        Ok(e)
    }

    /// Puts `device` behind a virtio-pci transport in a free slot (restored from `state`, when a
    /// live upgrade hands it over).
    fn add(
        &mut self,
        space: &mut PciSpace,
        id: String,
        device: Arc<Mutex<dyn VirtioDevice>>,
        state: Option<&VirtioPciState>,
        what: &str,
    ) -> Result<(), DeviceError> {
        let bar = space
            .bars64
            .allocate(VirtioPciLayout::BAR_SIZE)
            .ok_or(DeviceError::BarSpace(VirtioPciLayout::BAR_SIZE))?;
        let queues = device.lock().unwrap().queue_max_sizes().len() as u16;
        let group = Arc::new(
            KvmMsiGroup::new(space.router.clone(), queues + 1).map_err(DeviceError::Interrupts)?,
        );
        self.msi_groups.push(group.clone());
        let mut transport = VirtioPciDevice::new(
            id.clone(),
            device.clone(),
            group,
            space.ioevents.clone(),
            bar,
            InterruptDelivery::Emulated,
        )
        .map_err(DeviceError::VirtioPci)?;
        if let Some(s) = state {
            transport.restore(s).map_err(DeviceError::VirtioPci)?;
        }
        // Where the guest has BAR 0 now (moved, in a restored device).
        let bar = transport.bar();
        let transport = Arc::new(Mutex::new(transport));
        self.transports.push(transport.clone());
        let pci_dev: Arc<Mutex<dyn PciDevice>> = transport;
        let mut bus = space.pci_bus.lock().unwrap();
        let slot = bus.next_device_number().ok_or(DeviceError::NoPciSlot)?;
        bus.add_device(slot, pci_dev.clone())
            .map_err(|_| DeviceError::NoPciSlot)?;
        space.mmio_bus.insert(
            Arc::new(Mutex::new(PciBarHandler(pci_dev))),
            bar,
            VirtioPciLayout::BAR_SIZE,
        )?;
        log::info!("{id}: {what} at 00:{slot:02x}.0, BAR0 {bar:#x}");
        self.virtio.push((id, device));
        Ok(())
    }
}
