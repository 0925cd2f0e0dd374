//! The virtio-pci transport as a driver sees it: identity, capabilities, common configuration,
//! ISR, the PCI configuration access window, doorbells and MSI-X.

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
