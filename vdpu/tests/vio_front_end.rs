//! The VMM's `vio` front end (`vfio::vio::VioPciDevice`) in front of a real vdpu, as the
//! guest sees it through config space and BAR 0: the VIO capability is gone, its control block
//! reads zeros, packed rings are not offered, and the guest's doorbells are the VMM's.

mod common;

use common::{Irqs, Registrar};
use pci::PciDevice;
use std::collections::HashMap;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;
use vfio::vfio_user::{VfioUserClient, VfioUserPciDevice};
use vfio::vio::{VioOptions, VioPciDevice};
use vio::elastic::{Mode, Setting, Thresholds};
use vio::{DmaWindow, IoMapper, PageError, Residency, SourceError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BAR0: u64 = 0x1_0000_0000;

struct Resident;
impl Residency for Resident {
    fn pin(&self, _: u64) -> Result<bool, PageError> {
        Ok(false)
    }
    fn unpin(&self, _: u64) {}
    fn populate(&self, _: u64, _: u64) -> Result<(), PageError> {
        Ok(())
    }
}
struct NoMap;
impl IoMapper for NoMap {
    fn map(&self, _: u64, _: u64) -> Result<(), SourceError> {
        Ok(())
    }
    fn unmap(&self, _: u64, _: u64) -> Result<(), SourceError> {
        Ok(())
    }
}

fn start_vdpu(name: &str) -> std::path::PathBuf {
    common::start_server("vio", name, 1 << 16)
}

type Mem = GuestMemoryMmap<()>;

/// The front end over a fresh vdpu, with guest RAM `mem` reached through `residency`.
fn front_end(
    name: &str,
    mem: Arc<Mem>,
    residency: Arc<dyn Residency>,
    registrar: Arc<Registrar>,
) -> VioPciDevice<Mem> {
    let client = Arc::new(VfioUserClient::connect(&start_vdpu(name)).unwrap());
    let mut next = BAR0;
    let mut alloc = |size: u64, _: bool| {
        let a = next;
        next += size;
        Some(a)
    };
    let inner = VfioUserPciDevice::new(
        name.into(),
        client,
        Arc::new(Irqs),
        registrar.clone(),
        &mut alloc,
        false,
    )
    .unwrap();
    let window = Arc::new(DmaWindow::new(residency, Arc::new(NoMap), 256));
    VioPciDevice::new(
        inner,
        mem,
        window,
        vec![(0, 256)],
        registrar,
        VioOptions {
            poll: Duration::from_millis(1),
            setting: Setting::Fixed(Mode::Snoop),
            thresholds: Thresholds {
                iops_high: 2,
                iops_low: 1,
                dwell: Duration::from_secs(1),
            },
            lockpage: None,
        },
    )
    .unwrap()
}

fn cfg32(d: &mut dyn PciDevice, at: usize) -> u32 {
    d.read_config_register(at / 4) >> (8 * (at % 4))
}

#[test]
fn the_guest_sees_a_plain_virtio_device() {
    let sock = start_vdpu("raw");
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
    let mem = Arc::new(Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let mut dev = front_end("plain", mem, Arc::new(Resident), registrar.clone());

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

/// Guest RAM whose page `SLOW_GFN` takes until `release` to fault in (a reclaim store on slow
/// media), counting pins so a leak shows.
struct SlowPage {
    released: Mutex<bool>,
    cv: Condvar,
    entered: Mutex<Option<mpsc::Sender<()>>>,
    pins: Mutex<HashMap<u64, i64>>,
}

const SLOW_GFN: u64 = 0x40;

impl SlowPage {
    fn release(&self) {
        *self.released.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl Residency for SlowPage {
    fn pin(&self, gfn: u64) -> Result<bool, PageError> {
        *self.pins.lock().unwrap().entry(gfn).or_default() += 1;
        if gfn != SLOW_GFN {
            return Ok(false);
        }
        if let Some(tx) = self.entered.lock().unwrap().take() {
            let _ = tx.send(());
        }
        let mut r = self.released.lock().unwrap();
        while !*r {
            r = self.cv.wait(r).unwrap();
        }
        Ok(true)
    }
    fn unpin(&self, gfn: u64) {
        *self.pins.lock().unwrap().entry(gfn).or_default() -= 1;
    }
    fn populate(&self, _: u64, _: u64) -> Result<(), PageError> {
        Ok(())
    }
}

/// A queue's vring at 0x10000 (descriptors), 0x11000 (available), 0x12000 (used), 8 entries,
/// set up and enabled as a driver does through common configuration.
fn enable_queue0(dev: &mut VioPciDevice<Mem>) {
    let w = |dev: &mut VioPciDevice<Mem>, off: u64, v: &[u8]| dev.write_bar(BAR0, off, v);
    w(dev, 0x16, &0u16.to_le_bytes());
    w(dev, 0x18, &8u16.to_le_bytes());
    for (off, addr) in [(0x20u64, 0x10000u64), (0x28, 0x11000), (0x30, 0x12000)] {
        w(dev, off, &(addr as u32).to_le_bytes());
        w(dev, off + 4, &0u32.to_le_bytes());
    }
    w(dev, 0x1c, &1u16.to_le_bytes());
}

/// A vCPU's queue enable and device reset must not wait behind the snoop thread's fault-ins:
/// with the snoop thread stuck faulting in a request's page, both complete; and the request's
/// index, published by an engine the guest has since reset, never reaches the device.
#[test]
fn a_queue_enable_does_not_wait_for_a_slow_fault_in() {
    let mem = Arc::new(Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let (tx, entered) = mpsc::channel();
    let slow = Arc::new(SlowPage {
        released: Mutex::new(false),
        cv: Condvar::new(),
        entered: Mutex::new(Some(tx)),
        pins: Mutex::new(HashMap::new()),
    });
    let mut dev = front_end(
        "slow-faultin",
        mem.clone(),
        slow.clone(),
        Arc::new(Registrar::default()),
    );
    enable_queue0(&mut dev);
    // One request whose buffer is the slow page; the doorbell reaches the VMM's eventfd.
    mem.write_obj(SLOW_GFN << 12, GuestAddress(0x10000))
        .unwrap();
    mem.write_obj(512u32, GuestAddress(0x10008)).unwrap();
    mem.write_obj(0u16, GuestAddress(0x11004)).unwrap();
    mem.write_obj(1u16, GuestAddress(0x11002)).unwrap();
    dev.write_bar(BAR0, 0x6000, &0u16.to_le_bytes());
    entered
        .recv_timeout(Duration::from_secs(30))
        .expect("the snoop thread faults the page in");

    let (done_tx, done) = mpsc::channel();
    std::thread::scope(|s| {
        let dev = &mut dev;
        s.spawn(move || {
            dev.write_bar(BAR0, 0x14, &[0]); // device reset
            enable_queue0(dev);
            let _ = done_tx.send(());
        });
        let r = done.recv_timeout(Duration::from_secs(20));
        // Let the fault-in finish either way, so a failure does not hang the test.
        slow.release();
        r.expect("the vCPU's reset and queue enable completed while the fault-in was stuck");
    });
    // The snoop thread comes back from the fault-in to a reset queue: nothing is published.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while dev.counters()["q0_faultins"] == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let c = dev.counters();
    assert_eq!(c["q0_faultins"], 1, "{c:?}");
    assert_eq!(
        c["q0_shadow_idx"], 0,
        "a reset queue's engine does not publish"
    );
    drop(dev);
    let pins = slow.pins.lock().unwrap();
    assert!(
        pins.values().all(|&n| n == 0),
        "every pin is released: {pins:?}"
    );
}
