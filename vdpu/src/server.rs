//! The device side of vfio-user: one client at a time on a Unix socket. Every message is
//! validated; a bad one gets an error reply (errno), a malformed header closes the connection.
//! When a client goes away the device is reset and its DMA mappings dropped, so a new client
//! can connect.

use crate::iommu::Iommu;
use crate::irq::ClientIrqs;
use crate::pri::PageRequests;
use log::{debug, info, warn};
use std::fs::File;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use vfio::vfio_user::protocol::*;
use vio::pri;
use virtio_devices::transport::{VirtioPciDevice, VirtioPciLayout};
use virtio_devices::{Counters, VirtioDevice};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

/// Device-specific region (after the standard PCI ones) where the client reads the device's
/// counters: a NUL-terminated JSON object.
pub const COUNTERS_REGION_INDEX: u32 = PCI_NUM_REGIONS;
pub const COUNTERS_REGION_SIZE: u64 = 4096;
const CONFIG_SPACE_SIZE: u64 = 256;

pub struct Device {
    pub pci: VirtioPciDevice,
    pub virtio: Arc<Mutex<dyn VirtioDevice>>,
    pub iommu: Arc<Iommu>,
    pub irqs: Arc<ClientIrqs>,
    pub notifiers: Vec<(u64, EventFd)>,
    /// Page requests (`pri=on`): the page-request region and interrupt exist.
    pub pri: Option<Arc<PageRequests>>,
}

impl Device {
    pub fn counters(&self) -> Counters {
        let mut c = self.virtio.lock().unwrap().counters();
        if let Some(p) = &self.pri {
            let s = &p.stats;
            for (k, v) in [
                ("pri_requests", &s.requests),
                ("pri_resolved", &s.resolved),
                ("pri_failed", &s.failed),
                ("pri_timeouts", &s.timeouts),
                ("pri_stray_answers", &s.stray_answers),
            ] {
                c.insert(k.into(), v.load(Ordering::Relaxed));
            }
        }
        c.insert(
            "iopf".into(),
            self.iommu.stats().iopf.load(Ordering::Relaxed),
        );
        c.insert(
            "last_iopf_iova".into(),
            self.iommu.stats().last_iopf_iova.load(Ordering::Relaxed),
        );
        c.insert("dma_mapped_bytes".into(), self.iommu.mapped_bytes());
        c
    }

    /// A closure that reports the counters as JSON from any thread.
    pub fn counters_handle(&self) -> impl Fn() -> String + Send + 'static {
        let (virtio, iommu) = (self.virtio.clone(), self.iommu.clone());
        move || {
            let mut c = virtio.lock().unwrap().counters();
            c.insert("iopf".into(), iommu.stats().iopf.load(Ordering::Relaxed));
            serde_json::to_string(&c).unwrap_or_default()
        }
    }

    fn counters_json(&self) -> Vec<u8> {
        let mut j = serde_json::to_vec(&self.counters()).unwrap_or_default();
        j.push(0);
        j
    }

    fn region_size(&self, index: u32) -> Option<(u64, u32)> {
        match index {
            PCI_BAR0_REGION_INDEX => Some((
                VirtioPciLayout::BAR_SIZE,
                REGION_FLAG_READ | REGION_FLAG_WRITE,
            )),
            PCI_CONFIG_REGION_INDEX => {
                Some((CONFIG_SPACE_SIZE, REGION_FLAG_READ | REGION_FLAG_WRITE))
            }
            COUNTERS_REGION_INDEX => Some((COUNTERS_REGION_SIZE, REGION_FLAG_READ)),
            i if i < PCI_NUM_REGIONS => Some((0, 0)),
            pri::REGION_INDEX if self.pri.is_some() => {
                Some((pri::REGION_SIZE, REGION_FLAG_READ | REGION_FLAG_WRITE))
            }
            _ => None,
        }
    }

    fn num_regions(&self) -> u32 {
        if self.pri.is_some() {
            pri::REGION_INDEX + 1
        } else {
            COUNTERS_REGION_INDEX + 1
        }
    }

    fn num_irqs(&self) -> u32 {
        if self.pri.is_some() {
            pri::IRQ_INDEX + 1
        } else {
            PCI_NUM_IRQS
        }
    }

    /// Resets the device and forgets the client's mappings and eventfds.
    pub fn disconnect(&mut self) {
        self.pci.reset_device();
        self.irqs.clear();
        self.iommu.unmap_all();
        if let Some(p) = &self.pri {
            p.reset();
        }
    }

    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            let reg = self.pci_read_reg(at / 4);
            *b = reg.to_le_bytes()[at % 4];
        }
    }

    fn pci_read_reg(&mut self, reg: usize) -> u32 {
        use pci::PciDevice;
        self.pci.read_config_register(reg)
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        use pci::PciDevice;
        // Split at register boundaries; each piece is a 1-, 2- or 4-byte write.
        let mut at = offset as usize;
        let mut rest = data;
        while !rest.is_empty() {
            let within = at % 4;
            let mut n = (4 - within).min(rest.len());
            if n == 3 {
                n = 2;
            }
            if !within.is_multiple_of(n) {
                n = 1;
            }
            let _ = self
                .pci
                .write_config_register(at / 4, within as u64, &rest[..n]);
            at += n;
            rest = &rest[n..];
        }
    }
}

type Reply = Result<(Vec<u8>, Vec<RawFd>), i32>;

fn ok(payload: Vec<u8>) -> Reply {
    Ok((payload, vec![]))
}

fn version_reply(msg: &Message) -> Reply {
    let v: Version = msg.read().map_err(|_| libc::EINVAL)?;
    if v.major != VERSION_MAJOR {
        return Err(libc::ENOTSUP);
    }
    let caps = serde_json::json!({"capabilities": {
        "max_msg_fds": MAX_FDS,
        "max_data_xfer_size": MAX_DATA_XFER,
        "max_dma_maps": crate::iommu::MAX_MAPPINGS,
        "pgsizes": crate::iommu::PAGE_SIZE,
    }});
    let mut p = Version {
        major: VERSION_MAJOR,
        minor: v.minor.min(VERSION_MINOR),
    }
    .as_slice()
    .to_vec();
    p.extend_from_slice(caps.to_string().as_bytes());
    p.push(0);
    ok(p)
}

fn handle(dev: &mut Device, msg: Message) -> Reply {
    match msg.header.cmd {
        CMD_VERSION => version_reply(&msg),
        CMD_DMA_MAP => {
            let m: DmaMap = msg.read().map_err(|_| libc::EINVAL)?;
            let file = msg.fds.into_iter().next().ok_or_else(|| {
                warn!("DMA_MAP without an fd: vdpu needs mappable client memory");
                libc::EINVAL
            })?;
            if m.flags & DMA_READ == 0 {
                return Err(libc::EINVAL);
            }
            dev.iommu
                .map(
                    dev.iommu.intern(file),
                    m.offset,
                    m.address,
                    m.size,
                    m.flags & DMA_WRITE != 0,
                )
                .map_err(|e| {
                    warn!("DMA_MAP {:#x}+{:#x}: {e}", m.address, m.size);
                    e.errno()
                })?;
            ok(vec![])
        }
        CMD_DMA_UNMAP => {
            let u: DmaUnmap = msg.read().map_err(|_| libc::EINVAL)?;
            dev.iommu.unmap(u.address, u.size).map_err(|e| {
                warn!("DMA_UNMAP {:#x}+{:#x}: {e}", u.address, u.size);
                e.errno()
            })?;
            ok(u.as_slice().to_vec())
        }
        CMD_DEVICE_GET_INFO => ok(DeviceInfo {
            argsz: std::mem::size_of::<DeviceInfo>() as u32,
            flags: DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI,
            num_regions: dev.num_regions(),
            num_irqs: dev.num_irqs(),
        }
        .as_slice()
        .to_vec()),
        CMD_DEVICE_GET_REGION_INFO => {
            let r: RegionInfo = msg.read().map_err(|_| libc::EINVAL)?;
            let (size, flags) = dev.region_size(r.index).ok_or(libc::EINVAL)?;
            ok(RegionInfo {
                argsz: 32,
                flags,
                index: r.index,
                cap_offset: 0,
                size,
                offset: 0,
            }
            .as_slice()
            .to_vec())
        }
        CMD_DEVICE_GET_REGION_IO_FDS => {
            let r: RegionIoFds = msg.read().map_err(|_| libc::EINVAL)?;
            dev.region_size(r.index).ok_or(libc::EINVAL)?;
            let subs: Vec<IoFdSubRegion> = if r.index == PCI_BAR0_REGION_INDEX {
                dev.notifiers
                    .iter()
                    .enumerate()
                    .map(|(i, (off, _))| IoFdSubRegion {
                        offset: *off,
                        size: 0,
                        fd_index: i as u32,
                        type_: IO_FD_TYPE_IOEVENTFD,
                        flags: 0,
                        padding: 0,
                        datamatch: 0,
                    })
                    .collect()
            } else {
                vec![]
            };
            let head = RegionIoFds {
                argsz: (16 + 40 * subs.len()) as u32,
                flags: 0,
                index: r.index,
                count: subs.len() as u32,
            };
            let mut p = head.as_slice().to_vec();
            for s in &subs {
                p.extend_from_slice(s.as_slice());
            }
            let fds = if r.index == PCI_BAR0_REGION_INDEX {
                dev.notifiers.iter().map(|(_, e)| e.as_raw_fd()).collect()
            } else {
                vec![]
            };
            Ok((p, fds))
        }
        CMD_DEVICE_GET_IRQ_INFO => {
            let i: IrqInfo = msg.read().map_err(|_| libc::EINVAL)?;
            if i.index >= dev.num_irqs() {
                return Err(libc::EINVAL);
            }
            let (flags, count) = match i.index {
                PCI_MSIX_IRQ_INDEX => (
                    IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
                    dev.irqs.count(),
                ),
                pri::IRQ_INDEX => (IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE, 1),
                _ => (0, 0),
            };
            ok(IrqInfo {
                argsz: 16,
                flags,
                index: i.index,
                count,
            }
            .as_slice()
            .to_vec())
        }
        CMD_DEVICE_SET_IRQS => set_irqs(dev, msg),
        CMD_REGION_READ => {
            let a: RegionAccess = msg.read().map_err(|_| libc::EINVAL)?;
            let mut data = vec![0u8; a.count as usize];
            region_access(dev, &a, Access::Read(&mut data))?;
            let mut p = a.as_slice().to_vec();
            p.extend_from_slice(&data);
            ok(p)
        }
        CMD_REGION_WRITE => {
            let a: RegionAccess = msg.read().map_err(|_| libc::EINVAL)?;
            let data = &msg.payload[std::mem::size_of::<RegionAccess>()..];
            if data.len() != a.count as usize {
                return Err(libc::EINVAL);
            }
            region_access(dev, &a, Access::Write(data))?;
            ok(a.as_slice().to_vec())
        }
        CMD_DEVICE_RESET => {
            dev.pci.reset_device();
            ok(vec![])
        }
        other => {
            debug!("Unsupported vfio-user command {other}");
            Err(libc::ENOSYS)
        }
    }
}

enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

fn region_access(dev: &mut Device, a: &RegionAccess, access: Access) -> Result<(), i32> {
    let (size, flags) = dev.region_size(a.region).ok_or(libc::EINVAL)?;
    let end = a
        .offset
        .checked_add(u64::from(a.count))
        .ok_or(libc::EINVAL)?;
    if end > size || a.count as usize > MAX_DATA_XFER {
        return Err(libc::EINVAL);
    }
    use pci::PciDevice;
    match (a.region, access) {
        (PCI_CONFIG_REGION_INDEX, Access::Read(d)) => dev.config_read(a.offset, d),
        (PCI_CONFIG_REGION_INDEX, Access::Write(d)) => dev.config_write(a.offset, d),
        (PCI_BAR0_REGION_INDEX, access) => {
            if !matches!(a.count, 1 | 2 | 4 | 8) {
                return Err(libc::EINVAL);
            }
            match access {
                Access::Read(d) => dev.pci.read_bar(0, a.offset, d),
                Access::Write(d) => dev.pci.write_bar(0, a.offset, d),
            }
        }
        (COUNTERS_REGION_INDEX, Access::Read(d)) => {
            let j = dev.counters_json();
            for (i, b) in d.iter_mut().enumerate() {
                *b = j.get(a.offset as usize + i).copied().unwrap_or(0);
            }
        }
        (pri::REGION_INDEX, access) => {
            // region_size said the region exists: page requests are on.
            let p = dev.pri.as_ref().ok_or(libc::EINVAL)?;
            match access {
                Access::Read(d) => {
                    let t = p.table();
                    for (i, b) in d.iter_mut().enumerate() {
                        *b = t.get(a.offset as usize + i).copied().unwrap_or(0);
                    }
                }
                Access::Write(d) if a.offset == pri::REG_RESPONSE => p.respond(d)?,
                Access::Write(_) => return Err(libc::EINVAL),
            }
        }
        (_, Access::Write(_)) if flags & REGION_FLAG_WRITE == 0 => return Err(libc::EPERM),
        _ => return Err(libc::EINVAL),
    }
    Ok(())
}

fn set_irqs(dev: &mut Device, msg: Message) -> Reply {
    let s: IrqSet = msg.read().map_err(|_| libc::EINVAL)?;
    let data_flags = s.flags & (IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD);
    let action = s.flags & (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER);
    if data_flags.count_ones() != 1 || action.count_ones() != 1 {
        return Err(libc::EINVAL);
    }
    if let (pri::IRQ_INDEX, Some(p)) = (s.index, &dev.pri) {
        return match (data_flags, action, s.start, s.count) {
            (IRQ_SET_DATA_EVENTFD, IRQ_SET_ACTION_TRIGGER, 0, 1) if msg.fds.len() == 1 => {
                p.set_notify(msg.fds.into_iter().next().map(eventfd_from_file));
                ok(vec![])
            }
            (IRQ_SET_DATA_NONE | IRQ_SET_DATA_EVENTFD, IRQ_SET_ACTION_TRIGGER, 0, 0) => {
                p.set_notify(None);
                ok(vec![])
            }
            _ => Err(libc::EINVAL),
        };
    }
    if s.index != PCI_MSIX_IRQ_INDEX {
        // No other interrupt type exists; disabling it is a no-op.
        return if s.count == 0 {
            ok(vec![])
        } else {
            Err(libc::EINVAL)
        };
    }
    if s.count == 0 && data_flags == IRQ_SET_DATA_NONE && action == IRQ_SET_ACTION_TRIGGER {
        dev.irqs.clear();
        return ok(vec![]);
    }
    let end = s.start.checked_add(s.count).ok_or(libc::EINVAL)?;
    if end > dev.irqs.count() {
        return Err(libc::EINVAL);
    }
    let bools = &msg.payload[std::mem::size_of::<IrqSet>().min(msg.payload.len())..];
    let selected =
        |k: u32| data_flags != IRQ_SET_DATA_BOOL || bools.get(k as usize).is_some_and(|&b| b != 0);
    if data_flags == IRQ_SET_DATA_BOOL && bools.len() < s.count as usize {
        return Err(libc::EINVAL);
    }
    match (data_flags, action) {
        (IRQ_SET_DATA_EVENTFD, IRQ_SET_ACTION_TRIGGER) => {
            if !msg.fds.is_empty() && msg.fds.len() != s.count as usize {
                return Err(libc::EINVAL);
            }
            let mut fds = msg.fds.into_iter();
            for k in 0..s.count {
                let fd = fds.next().map(eventfd_from_file);
                dev.irqs.set_fd(s.start + k, fd);
            }
        }
        (IRQ_SET_DATA_EVENTFD, _) => return Err(libc::ENOTSUP),
        (_, IRQ_SET_ACTION_TRIGGER) => {
            use pci::MsiInterruptGroup;
            for k in (0..s.count).filter(|&k| selected(k)) {
                let _ = dev.irqs.trigger((s.start + k) as u16);
            }
        }
        (_, act) => {
            for k in (0..s.count).filter(|&k| selected(k)) {
                dev.irqs.set_masked(s.start + k, act == IRQ_SET_ACTION_MASK);
            }
        }
    }
    ok(vec![])
}

fn eventfd_from_file(f: File) -> EventFd {
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    // SAFETY: the client sent this descriptor as an eventfd; we take sole ownership of it.
    unsafe { EventFd::from_raw_fd(f.into_raw_fd()) }
}

/// Serves one client until it disconnects or breaks the protocol.
pub fn serve_connection(dev: &mut Device, sock: &UnixStream) -> Result<(), ProtocolError> {
    loop {
        let msg = match recv(sock) {
            Ok(m) => m,
            Err(ProtocolError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        };
        let h = msg.header;
        if h.flags & 0xf != 0 {
            // Replies from the client: vdpu sends no commands, so none are expected.
            warn!("Unexpected reply message (cmd {}); closing", h.cmd);
            return Err(ProtocolError::BadSize(h.size));
        }
        let no_reply = h.flags & FLAG_NO_REPLY != 0;
        let reply = handle(dev, msg);
        if no_reply {
            continue;
        }
        let mut rh = Header {
            msg_id: h.msg_id,
            cmd: h.cmd,
            flags: FLAG_REPLY,
            ..Default::default()
        };
        match reply {
            Ok((payload, fds)) => send(sock, rh, &[&payload], &fds)?,
            Err(errno) => {
                rh.flags |= FLAG_ERROR;
                rh.error = errno as u32;
                send(sock, rh, &[], &[])?;
            }
        }
    }
}

/// Accepts clients one after another, forever.
pub fn run(listener: UnixListener, dev: &mut Device) {
    for conn in listener.incoming() {
        let sock = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!("accept: {e}");
                continue;
            }
        };
        info!("Client connected");
        if let Err(e) = serve_connection(dev, &sock) {
            warn!("Client connection ended: {e}");
        } else {
            info!("Client disconnected");
        }
        dev.disconnect();
    }
}
