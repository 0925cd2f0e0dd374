//! Arbitrary device replies to the VMM's vfio-user client: version negotiation, then setting
//! up a passthrough PCI function from what the device says (regions, BARs, capabilities,
//! MSI-X, doorbell io-fds), then config, BAR and counter accesses as a guest drives them.
//!
//! Input: the replies, in order, each [flags, length (2 bytes), payload]. Flags: 1 keeps the reply's
//! message id, 2 its command, 4 makes it an error reply, 8 sends two eventfds with it. The
//! device hangs up when the input runs out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pci::{IoEventRegistrar, MsiInterruptGroup, MsiMessage, PciDevice};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use vfio::vfio_user::protocol::{self, Header, FLAG_ERROR, FLAG_REPLY};
use vfio::vfio_user::{VfioUserClient, VfioUserPciDevice};
use vmm_sys_util::eventfd::EventFd;

struct Vectors;

impl MsiInterruptGroup for Vectors {
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

/// Checks every doorbell lands inside a BAR the VMM placed: a device must not be able to put
/// an ioeventfd on another device's (or RAM's) addresses.
struct Doorbells(Arc<Mutex<Vec<(u64, u64)>>>);

impl IoEventRegistrar for Doorbells {
    fn register(&self, _: &EventFd, addr: u64) -> std::io::Result<()> {
        let bars = self.0.lock().unwrap();
        assert!(
            bars.iter()
                .any(|&(base, size)| addr >= base && addr < base + size),
            "doorbell at {addr:#x} outside the BARs {bars:x?}"
        );
        Ok(())
    }
    fn unregister(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

fn device(sock: UnixStream, mut data: &[u8]) {
    while let Ok(req) = protocol::recv(&sock) {
        let [flags, lo, hi, rest @ ..] = data else {
            return;
        };
        let len = u16::from_le_bytes([*lo, *hi]);
        let (payload, rest) = rest.split_at(usize::from(len).min(rest.len()));
        data = rest;
        let mut h = Header {
            msg_id: if flags & 1 == 0 {
                req.header.msg_id
            } else {
                len
            },
            cmd: if flags & 2 == 0 {
                req.header.cmd
            } else {
                u16::from(*flags)
            },
            flags: FLAG_REPLY,
            ..Default::default()
        };
        if flags & 4 != 0 {
            h.flags |= FLAG_ERROR;
            h.error = libc::EINVAL as u32;
        }
        let fds = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
        let raw: Vec<RawFd> = if flags & 8 != 0 {
            fds.iter().map(|f| f.as_raw_fd()).collect()
        } else {
            Vec::new()
        };
        if protocol::send(&sock, h, &[payload], &raw).is_err() {
            return;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (vmm, dev) = UnixStream::pair().unwrap();
    // Hanging up our end at the close ends the device's thread and the device monitor's.
    let hang_up = vmm.try_clone().unwrap();
    let input = data.to_vec();
    let server = std::thread::spawn(move || device(dev, &input));
    if let Ok(client) = VfioUserClient::negotiate_on(vmm) {
        let client = Arc::new(client);
        let bars = Arc::new(Mutex::new(Vec::new()));
        let (placed, mut next) = (bars.clone(), 1u64 << 32);
        let mut alloc = move |size: u64, _: bool| {
            let base = next.checked_next_multiple_of(size)?;
            next = base.checked_add(size)?;
            placed.lock().unwrap().push((base, size));
            Some(base)
        };
        if let Ok(mut d) = VfioUserPciDevice::new(
            "fuzz".into(),
            client.clone(),
            Arc::new(Vectors),
            Arc::new(Doorbells(bars.clone())),
            &mut alloc,
            true,
        ) {
            let _ = d.counters();
            for reg in [0, 1, 4, 13, 16, 17, 20] {
                let v = d.read_config_register(reg);
                d.write_config_register(reg, 0, &v.to_le_bytes());
            }
            let placed = bars.lock().unwrap().clone();
            for (base, size) in placed {
                let mut b = [0u8; 4];
                for off in [0, 0x1000, 0x2000, 0x3000, 0x6000, size - 4] {
                    d.read_bar(base, off, &mut b);
                    d.write_bar(base, off, &b);
                }
            }
            let _ = d.counters();
        }
    }
    let _ = hang_up.shutdown(std::net::Shutdown::Both);
    server.join().unwrap();
});
