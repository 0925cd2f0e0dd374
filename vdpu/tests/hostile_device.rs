//! Every value a device sends the VMM is checked: the VMM's vfio-user client and its
//! passthrough PCI function talk to a real vdpu through a proxy that falsifies one reply at a
//! time. A lie during set-up refuses the device with an error that names it; a lie later marks
//! the device failed. Nothing panics, and nothing the device says places a BAR, an MSI-X table
//! or a doorbell where the VMM did not put it.

mod common;

use common::{Irqs, Registrar};
use pci::PciDevice;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vfio::vfio_user::protocol::{self, Header, CMD_REGION_READ};
use vfio::vfio_user::{VfioUserClient, VfioUserPciDevice};

/// Rewrites a reply: (the request's header and payload, the reply's header and payload).
type Lie = Box<dyn FnMut(&Header, &[u8], &mut Header, &mut Vec<u8>) + Send>;

/// A client socket whose server is a real vdpu behind `lie`.
fn lying_device(mut lie: Lie) -> UnixStream {
    let (sock, disk) = common::rig::start("");
    let dev = UnixStream::connect(&sock).unwrap();
    // vdpu holds both open from here on.
    let _ = std::fs::remove_file(sock);
    let _ = std::fs::remove_file(disk);
    let (vmm, ours) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        while let Ok(req) = protocol::recv(&ours) {
            let fds: Vec<RawFd> = req.fds.iter().map(|f| f.as_raw_fd()).collect();
            if protocol::send(&dev, req.header, &[&req.payload], &fds).is_err() {
                return;
            }
            let Ok(mut rep) = protocol::recv(&dev) else {
                return;
            };
            lie(&req.header, &req.payload, &mut rep.header, &mut rep.payload);
            let fds: Vec<RawFd> = rep.fds.iter().map(|f| f.as_raw_fd()).collect();
            if protocol::send(&ours, rep.header, &[&rep.payload], &fds).is_err() {
                return;
            }
        }
    });
    vmm
}

const BAR_BASE: u64 = 0x1_0000_0000;

/// Sets up a passthrough function behind `lie`, as the device manager does.
fn function(lie: Lie) -> Result<(VfioUserPciDevice, Arc<Registrar>), String> {
    let client = VfioUserClient::negotiate_on(lying_device(lie)).map_err(|e| chain(&e))?;
    let doorbells = Arc::new(Registrar::default());
    let mut next = BAR_BASE;
    let mut alloc = |size: u64, _: bool| {
        let base = next;
        next += size;
        Some(base)
    };
    VfioUserPciDevice::new(
        "hostile".into(),
        Arc::new(client),
        Arc::new(Irqs),
        doorbells.clone(),
        &mut alloc,
        true,
    )
    .map(|d| (d, doorbells))
    .map_err(|e| chain(&e))
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(e) = src {
        s += &format!(": {e}");
        src = e.source();
    }
    s
}

fn region_access(payload: &[u8]) -> (u64, u32) {
    (
        u64::from_le_bytes(payload[..8].try_into().unwrap()),
        u32::from_le_bytes(payload[8..12].try_into().unwrap()),
    )
}

/// A lie about the first reply to `cmd`.
fn on(cmd: u16, mut f: impl FnMut(&mut Header, &mut Vec<u8>) + Send + 'static) -> Lie {
    let mut done = false;
    Box::new(move |req, _, h, p| {
        if req.cmd == cmd && !done {
            done = true;
            f(h, p);
        }
    })
}

fn set_u32(p: &mut [u8], at: usize, v: u32) {
    p[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn set_u64(p: &mut [u8], at: usize, v: u64) {
    p[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn an_honest_device_sets_up_inside_its_bars() {
    let (dev, doorbells) = function(Box::new(|_, _, _, _| {})).expect("vdpu sets up");
    let bar0 = dev.bar(0).expect("BAR 0 placed");
    let rings = doorbells.0.lock().unwrap().clone();
    assert!(!rings.is_empty(), "vdpu offers doorbell io-fds");
    assert!(
        rings
            .iter()
            .all(|&a| a >= bar0.addr && a < bar0.addr + bar0.size),
        "{rings:x?} in {bar0:x?}"
    );
    assert_eq!(dev.counters()["failed"], 0);
}

#[test]
fn lies_during_set_up_refuse_the_device() {
    const VERSION: u16 = protocol::CMD_VERSION;
    const INFO: u16 = protocol::CMD_DEVICE_GET_INFO;
    const REGION: u16 = protocol::CMD_DEVICE_GET_REGION_INFO;
    const IO_FDS: u16 = protocol::CMD_DEVICE_GET_REGION_IO_FDS;
    let cases: Vec<(&str, Lie, &str)> = vec![
        (
            "a newer major version",
            on(VERSION, |_, p| p[..2].copy_from_slice(&1u16.to_le_bytes())),
            "version 1.1 is not supported",
        ),
        (
            "max_dma_maps that is not a number",
            on(VERSION, |_, p| {
                let json = String::from_utf8_lossy(&p[4..]).replace("65535", "\"many\"");
                p.truncate(4);
                p.extend_from_slice(json.as_bytes());
            }),
            "Unexpected reply to command 1",
        ),
        (
            "a reply to another message",
            on(INFO, |h, _| h.msg_id = h.msg_id.wrapping_add(7)),
            "Unexpected reply to command 4",
        ),
        (
            "a short payload",
            on(INFO, |_, p| p.truncate(6)),
            "shorter than 16",
        ),
        (
            "not a PCI device",
            on(INFO, |_, p| set_u32(p, 4, 1)),
            "not a PCI device",
        ),
        (
            "a BAR larger than any",
            on(REGION, |_, p| set_u64(p, 16, 1 << 50)),
            "larger than a BAR of its kind",
        ),
        (
            "a BAR of u64::MAX bytes",
            on(REGION, |_, p| set_u64(p, 16, u64::MAX)),
            "larger than a BAR of its kind",
        ),
        (
            "a doorbell beyond BAR 0",
            on(IO_FDS, |_, p| set_u64(p, 16, 0x1_0000_0000)),
            "doorbell of",
        ),
        (
            "a doorbell whose end wraps",
            on(IO_FDS, |_, p| set_u64(p, 16, u64::MAX - 1)),
            "doorbell of",
        ),
        (
            "a doorbell of 3 bytes",
            on(IO_FDS, |_, p| set_u64(p, 24, 3)),
            "doorbell of 3 bytes",
        ),
        (
            "a doorbell naming a descriptor it did not send",
            on(IO_FDS, |_, p| set_u32(p, 32, 40)),
            "Unexpected reply to command 6",
        ),
        ("an MSI-X table beyond its BAR", msix_lie(1), "MSI-X table"),
        ("an MSI-X PBA beyond its BAR", msix_lie(2), "MSI-X PBA"),
    ];
    for (what, lie, want) in cases {
        let e = function(lie)
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(e.contains(want), "{what}: {e}");
    }
}

/// Moves the MSI-X table (`reg` 1) or PBA (2) to the top of a 32-bit offset in its BAR.
fn msix_lie(reg: u64) -> Lie {
    let mut cap_at = None;
    Box::new(move |req, payload, _, p| {
        if req.cmd != CMD_REGION_READ || p.len() < 20 {
            return;
        }
        let (offset, region) = region_access(payload);
        if region != protocol::PCI_CONFIG_REGION_INDEX {
            return;
        }
        let v = u32::from_le_bytes(p[16..20].try_into().unwrap());
        if offset >= 0x40 && v & 0xff == 0x11 {
            cap_at = Some(offset);
        } else if cap_at.is_some_and(|c| offset == c + 4 * reg) {
            set_u32(p, 16, 0xffff_fff0 | (v & 7));
        }
    })
}

#[test]
fn lies_after_set_up_mark_the_device_failed() {
    let lying = Arc::new(AtomicBool::new(false));
    let on_cue = lying.clone();
    let (mut dev, _) = function(Box::new(move |req, payload, _, p| {
        let (_, region) = region_access(payload);
        if on_cue.load(Ordering::Relaxed) && req.cmd == CMD_REGION_READ {
            if region == protocol::PCI_NUM_REGIONS {
                // Counters that are not JSON: ignored, the device is not failed for them.
                p.truncate(16);
                p.resize(16 + 4096, b'{');
            } else {
                p.truncate(18); // fewer bytes than asked for
            }
        }
    }))
    .expect("vdpu sets up");
    let base = dev.bar(0).unwrap().addr;
    lying.store(true, Ordering::Relaxed);

    let c = dev.counters();
    assert_eq!(c["failed"], 0, "{c:?}");
    assert!(
        !c.contains_key("read_ops"),
        "junk counters were taken: {c:?}"
    );

    let mut b = [0u8; 4];
    dev.read_bar(base, 0, &mut b);
    assert_eq!(b, [0xff; 4], "a short read reads as all-ones");
    assert!(dev.failed());
    assert_eq!(dev.counters()["failed"], 1);
    assert_eq!(dev.read_config_register(0), 0xffff_ffff);
}
