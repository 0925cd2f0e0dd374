//! The VMM's `vio` front end (`vfio::vio_device::VioPciDevice`) in front of a real vdpu, as the
//! guest sees it through config space and BAR 0: the VIO capability is gone, its control block
//! reads zeros, packed rings are not offered, and the guest's doorbells are the VMM's.

mod common;

use pci::{IoEventRegistrar, MsiInterruptGroup, MsiMessage, PciDevice};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vfio::vfio_user::{VfioUserClient, VfioUserPciDevice};
use vfio::vio_device::{VioOptions, VioPciDevice};
use vio::{DmaWindow, IoMapper, PageError, Residency};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const BAR0: u64 = 0x1_0000_0000;

struct Irqs;
impl MsiInterruptGroup for Irqs {
    fn update(&self, _: u16, _: MsiMessage, _: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn trigger(&self, _: u16) -> std::io::Result<()> {
        Ok(())
    }
    fn notifier(&self, _: u16) -> Option<EventFd> {
        EventFd::new(0).ok()
    }
}

#[derive(Default)]
struct Registrar(Mutex<Vec<u64>>);
impl IoEventRegistrar for Registrar {
    fn register(&self, _: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().push(addr);
        Ok(())
    }
    fn unregister(&self, _: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().retain(|&a| a != addr);
        Ok(())
    }
}

struct Resident;
impl Residency for Resident {
    fn pin(&self, _: u64) -> Result<bool, PageError> {
        Ok(false)
    }
    fn unpin(&self, _: u64) {}
}
struct NoMap;
impl IoMapper for NoMap {
    fn map(&self, _: u64, _: u64) -> Result<(), String> {
        Ok(())
    }
    fn unmap(&self, _: u64, _: u64) -> Result<(), String> {
        Ok(())
    }
}

fn start_vdpu() -> std::path::PathBuf {
    common::start_server("vio", "front-end", 1 << 16)
}

fn cfg32(d: &mut dyn PciDevice, at: usize) -> u32 {
    d.read_config_register(at / 4) >> (8 * (at % 4))
}

#[test]
fn the_guest_sees_a_plain_virtio_device() {
    let sock = start_vdpu();
    let client = Arc::new(VfioUserClient::connect(&sock).unwrap());
    // What the device itself offers, before the front end hides it.
    let mut raw_types = Vec::new();
    let mut ptr = {
        let mut b = [0u8; 4];
        client.region_read(7, 0x34, &mut b).unwrap();
        b[0] as usize
    };
    while ptr != 0 {
        let mut b = [0u8; 4];
        client.region_read(7, ptr as u64, &mut b).unwrap();
        if b[0] == 0x09 {
            raw_types.push(b[3]);
        }
        ptr = b[1] as usize;
    }
    assert!(raw_types.contains(&0x80), "vdpu offers the extension");

    let registrar = Arc::new(Registrar::default());
    let mut next = BAR0;
    let mut alloc = |size: u64, _: bool| {
        let a = next;
        next += size;
        Some(a)
    };
    let inner = VfioUserPciDevice::new(
        "dpu0".into(),
        client,
        Arc::new(Irqs),
        registrar.clone(),
        &mut alloc,
        false,
    )
    .unwrap();
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let window = Arc::new(DmaWindow::new(Arc::new(Resident), Arc::new(NoMap), 256));
    let mut dev = VioPciDevice::new(
        inner,
        mem,
        window,
        registrar.clone(),
        VioOptions {
            poll: Duration::from_millis(1),
        },
    )
    .unwrap();

    // The capability list as the guest walks it.
    let mut types = Vec::new();
    let mut ptr = cfg32(&mut dev, 0x34) as u8 as usize;
    let mut hops = 0;
    while ptr != 0 && hops < 48 {
        let head = cfg32(&mut dev, ptr);
        if head as u8 == 0x09 {
            types.push((head >> 24) as u8);
        }
        ptr = ((head >> 8) & 0xfc) as usize;
        hops += 1;
    }
    assert!(
        !types.contains(&0x80),
        "the VIO capability is hidden: {types:?}"
    );
    assert!(
        types.contains(&1) && types.contains(&2),
        "virtio caps still there: {types:?}"
    );

    // The control block reads zeros and ignores writes.
    let mut b = [0xffu8; 4];
    dev.read_bar(BAR0, 0x5_0000, &mut b);
    assert_eq!(b, [0; 4]);
    dev.write_bar(BAR0, 0x5_0018, &0u32.to_le_bytes());
    assert_eq!(dev.counters()["guest_vio_accesses"], 2);

    // Device features, upper word: no packed ring; VERSION_1 still offered.
    dev.write_bar(BAR0, 0x0, &1u32.to_le_bytes());
    let mut f = [0u8; 4];
    dev.read_bar(BAR0, 0x4, &mut f);
    let hi = u32::from_le_bytes(f);
    assert_eq!(hi & (1 << 2), 0, "VIRTIO_F_RING_PACKED masked");
    assert_ne!(hi & 1, 0, "VIRTIO_F_VERSION_1 offered");

    // The guest's doorbell for queue 0 is the VMM's eventfd, at the notify address.
    assert_eq!(*registrar.0.lock().unwrap(), vec![BAR0 + 0x6000]);
    drop(dev);
    assert!(
        registrar.0.lock().unwrap().is_empty(),
        "unregistered on drop"
    );
}
