//! The `vio` device variant: a vfio-user virtio device passed through to the guest, with
//! IOPA-Snoop in front of its doorbells so guest memory stays reclaimable.
//!
//! Data still flows device <-> guest memory directly, and interrupts stay direct (irqfds the
//! device signals). What changes:
//! - The device reads each queue's available index from a shadow page the VMM owns (the VIO
//!   shadow-index extension, which this front end programs and hides from the guest).
//! - The guest's doorbells are the VMM's eventfds. On one, the snoop thread walks the new
//!   chains, makes every page they touch resident, pinned and DMA-mapped (`DmaWindow`), then
//!   publishes the shadow index and rings the device's own doorbell.
//! - Completions (the used ring) release the pins; the reclaimer may then take the pages,
//!   DMA-unmapping them first.
//!
//! Packed rings have no available index to shadow, so VIRTIO_F_RING_PACKED is masked.

use crate::vfio_user::protocol::PCI_CONFIG_REGION_INDEX;
use crate::vfio_user::{ClientError, VfioUserClient, VfioUserPciDevice};
use crate::{DmaBacking, DmaMapping};
use log::{info, warn};
use pci::{BarReprogram, IoEventRegistrar, PciBarRegion, PciDevice};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;
use vio::walker::PAGE_SIZE;
use vio::{
    DmaWindow, LatencyHistogram, LogLimiter, QueueLayout, SnoopHost, SnoopQueue, SnoopStats,
    WalkLimits,
};
use vm_memory::{Bytes, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// Where the shadow page sits in the device's IOVA space: above any guest RAM this VMM lays
/// out (guest RAM is mapped at IOVA = guest-physical address).
pub const SHADOW_IOVA: u64 = 1 << 46;
/// One cache line per queue's shadow index.
const SHADOW_STRIDE: u64 = 64;
const MAX_QUEUES: u16 = (PAGE_SIZE / SHADOW_STRIDE) as u16;

const PCI_CAP_ID_VNDR: u8 = 0x09;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIO_CAP_SHADOW_INDEX: u8 = 0x80;
const VIO_SHADOW_MAGIC: u32 = 0x5348_4956;
const VIO_SHADOW_ENABLE: u32 = 1;
/// The device writes `used->flags` and `avail_event` to the shadow slot (+2, +4).
const VIO_SHADOW_SUPPRESSION: u32 = 2;
const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// VIRTIO_F_RING_PACKED (34) in the upper feature word.
const RING_PACKED_HI: u32 = 1 << 2;

// Common configuration (virtio 1.x 4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

static SNOOP_LOG: LogLimiter = LogLimiter::new(10, 10_000);

#[derive(Debug, Error)]
pub enum VioDeviceError {
    #[error("vfio-user")]
    Client(#[from] ClientError),
    #[error("The device has no virtio {0} capability")]
    MissingCap(&'static str),
    #[error("The device does not offer the VIO shadow-index extension")]
    NoShadowIndex,
    #[error("The device has {0} queues; at most {MAX_QUEUES} can be snooped")]
    TooManyQueues(u16),
    #[error("Failed to set up the shadow page")]
    ShadowPage(#[source] std::io::Error),
    #[error("Failed to DMA-map the shadow page")]
    ShadowMap(#[source] crate::DmaError),
    #[error("Failed to set up doorbells")]
    Doorbell(#[source] std::io::Error),
    #[error("The device's doorbells were registered with the hypervisor")]
    DoorbellsTaken,
}

/// A capability's window into a BAR.
#[derive(Clone, Copy, Debug, Default)]
struct CapRegion {
    bar: usize,
    offset: u64,
    len: u64,
}

impl CapRegion {
    fn contains(&self, bar: usize, offset: u64, len: usize) -> bool {
        bar == self.bar && offset >= self.offset && offset + len as u64 <= self.offset + self.len
    }
}

/// The virtio capabilities the front end needs, and how to unlink the VIO one.
#[derive(Debug, Default)]
struct Caps {
    common: CapRegion,
    notify: CapRegion,
    notify_mult: u32,
    vio: CapRegion,
    /// The hidden capability's config-space bytes [start, end).
    hidden: (usize, usize),
    /// Where the pointer to the hidden capability lives (byte offset), and what the guest reads
    /// there instead.
    link: (usize, u8),
}

impl Caps {
    fn parse(cfg: &dyn Fn(usize) -> Result<u32, ClientError>) -> Result<Caps, VioDeviceError> {
        let mut caps = Caps::default();
        let (mut common, mut notify, mut vio) = (false, false, false);
        let mut link_at = 0x34usize;
        let mut ptr = (cfg(0x34 / 4)? & 0xfc) as usize;
        for _ in 0..48 {
            if ptr < 0x40 {
                break;
            }
            let head = cfg(ptr / 4)?;
            let next = ((head >> 8) & 0xfc) as u8;
            if head as u8 == PCI_CAP_ID_VNDR {
                let cap_len = ((head >> 16) & 0xff) as usize;
                let cfg_type = (head >> 24) as u8;
                let region = CapRegion {
                    bar: (cfg(ptr / 4 + 1)? & 0xff) as usize,
                    offset: u64::from(cfg(ptr / 4 + 2)?),
                    len: u64::from(cfg(ptr / 4 + 3)?),
                };
                match cfg_type {
                    VIRTIO_PCI_CAP_COMMON_CFG if !common => {
                        caps.common = region;
                        common = true;
                    }
                    VIRTIO_PCI_CAP_NOTIFY_CFG if !notify => {
                        caps.notify = region;
                        caps.notify_mult = cfg(ptr / 4 + 4)?;
                        notify = true;
                    }
                    VIO_CAP_SHADOW_INDEX if !vio => {
                        caps.vio = region;
                        caps.hidden = (ptr, ptr + cap_len.max(16));
                        caps.link = (link_at, next);
                        vio = true;
                    }
                    _ => {}
                }
            }
            link_at = ptr + 1;
            ptr = next as usize;
        }
        if !common {
            return Err(VioDeviceError::MissingCap("common configuration"));
        }
        if !notify {
            return Err(VioDeviceError::MissingCap("notification"));
        }
        if !vio {
            return Err(VioDeviceError::NoShadowIndex);
        }
        Ok(caps)
    }

    /// The guest's view of config register `reg`: the VIO capability unlinked and blanked.
    fn filter(&self, reg: usize, v: u32) -> u32 {
        let (start, end) = self.hidden;
        let mut b = v.to_le_bytes();
        for (i, byte) in b.iter_mut().enumerate() {
            let at = reg * 4 + i;
            if at == self.link.0 {
                *byte = self.link.1;
            } else if (start..end).contains(&at) {
                *byte = 0;
            }
        }
        u32::from_le_bytes(b)
    }
}

/// The VMM-owned page holding every queue's shadow available index.
struct ShadowPage {
    _file: File,
    ptr: *mut u8,
}

// SAFETY: the page is only accessed through atomics (`slot`).
unsafe impl Send for ShadowPage {}
// SAFETY: as above.
unsafe impl Sync for ShadowPage {}

impl ShadowPage {
    fn new() -> std::io::Result<Self> {
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"vio-shadow".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let file = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
        file.set_len(PAGE_SIZE)?;
        // SAFETY: a new shared mapping of the whole (page-sized) file; checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ShadowPage {
            _file: file,
            ptr: ptr as *mut u8,
        })
    }

    fn slot(&self, q: u16) -> &AtomicU16 {
        self.field(q, 0)
    }

    /// The u16 at byte `off` (0, 2 or 4) of queue `q`'s slot: the index the VMM publishes, and
    /// the device's `used->flags` and `avail_event`.
    fn field(&self, q: u16, off: usize) -> &AtomicU16 {
        assert!(q < MAX_QUEUES && off <= 4 && off.is_multiple_of(2));
        // SAFETY: in bounds of the live page mapping (q < MAX_QUEUES, off < SHADOW_STRIDE),
        // 2-byte aligned; the device process accesses it concurrently, hence atomics.
        unsafe {
            &*(self.ptr.add(usize::from(q) * SHADOW_STRIDE as usize + off) as *const AtomicU16)
        }
    }
}

impl Drop for ShadowPage {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`; no reference outlives `self`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, PAGE_SIZE as usize) };
    }
}

/// How the VMM rings the device after publishing.
enum DeviceKick {
    Fd(EventFd),
    /// No doorbell fd from the device: a region write, as a base-protocol client would.
    Region(u64, u16),
}

#[derive(Default)]
struct QueueSlot {
    snoop: Option<SnoopQueue>,
    /// Vring pages held while the queue is enabled.
    ring_pages: Vec<u64>,
    /// Stats of earlier incarnations (before a device reset).
    past: SnoopStats,
    faultin_ns: LatencyHistogram,
    ring_errors: u64,
}

struct Snoop<M> {
    id: String,
    mem: Arc<M>,
    window: Arc<DmaWindow>,
    client: Arc<VfioUserClient>,
    shadow: ShadowPage,
    kicks: Vec<DeviceKick>,
    queues: Mutex<Vec<QueueSlot>>,
    poll: Duration,
    stop: AtomicBool,
    wake: EventFd,
    polls: AtomicU64,
}

struct QueueHost<'a, M> {
    snoop: &'a Snoop<M>,
    q: u16,
    hist: &'a LatencyHistogram,
}

impl<M> SnoopHost for QueueHost<'_, M> {
    fn acquire(&self, gfn: u64) -> Result<bool, String> {
        let t0 = Instant::now();
        let r = self.snoop.window.acquire(gfn).map_err(|e| e.to_string());
        if let Ok(true) = r {
            self.hist.record(t0.elapsed().as_nanos() as u64);
        }
        r
    }
    fn release(&self, gfn: u64) {
        self.snoop.window.release(gfn);
    }
    fn publish(&self, idx: u16) {
        self.snoop.shadow.slot(self.q).store(idx, Ordering::Release);
    }
    fn device_suppression(&self) -> Option<(u16, u16)> {
        let shadow = &self.snoop.shadow;
        Some((
            shadow.field(self.q, 2).load(Ordering::Acquire),
            shadow.field(self.q, 4).load(Ordering::Acquire),
        ))
    }
    fn kick(&self) {
        let r = match &self.snoop.kicks[usize::from(self.q)] {
            DeviceKick::Fd(fd) => fd.write(1),
            DeviceKick::Region(off, q) => self
                .snoop
                .client
                .region_write(0, *off, &q.to_le_bytes())
                .map_err(std::io::Error::other),
        };
        if let Err(e) = r {
            if SNOOP_LOG.hit() {
                warn!("{}: kicking queue {}: {e}", self.snoop.id, self.q);
            }
        }
    }
}

impl<M: GuestMemory + Send + Sync + 'static> Snoop<M> {
    fn host<'a>(&'a self, q: u16, hist: &'a LatencyHistogram) -> QueueHost<'a, M> {
        QueueHost {
            snoop: self,
            q,
            hist,
        }
    }

    /// Handles the doorbells in `kicked`, reaps completions, and re-checks queues with requests
    /// in flight. Returns whether any queue still needs polling.
    fn service(&self, kicked: &[bool], polling: bool) -> bool {
        let mut queues = self.queues.lock().unwrap();
        let mut again = false;
        for (i, slot) in queues.iter_mut().enumerate() {
            let QueueSlot {
                snoop, faultin_ns, ..
            } = slot;
            let Some(sq) = snoop.as_mut() else {
                continue;
            };
            let host = self.host(i as u16, faultin_ns);
            let kicked = kicked.get(i).copied().unwrap_or(false);
            again |= sq.service(&*self.mem, &host, kicked, polling);
            if let Some(e) = sq.last_error.take() {
                if SNOOP_LOG.hit() {
                    warn!("{}: queue {i}: {e}", self.id);
                }
            }
        }
        again
    }

    fn run(self: Arc<Self>, doorbells: Vec<Arc<EventFd>>) {
        if let Err(e) = self.event_loop(&doorbells) {
            log::error!("{}: snoop thread: {e}", self.id);
        }
    }

    fn event_loop(&self, doorbells: &[Arc<EventFd>]) -> std::io::Result<()> {
        let epoll = Epoll::new()?;
        let mut timer = TimerFd::new()?;
        let wake_token = doorbells.len() as u64;
        let timer_token = wake_token + 1;
        for (q, fd) in doorbells.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, q as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            self.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, wake_token),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, timer_token),
        )?;
        let mut events = vec![EpollEvent::default(); doorbells.len() + 2];
        let mut armed = false;
        while !self.stop.load(Ordering::Acquire) {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut kicked = vec![false; doorbells.len()];
            let mut polling = false;
            for ev in &events[..n] {
                let t = ev.data();
                if t < wake_token {
                    let _ = doorbells[t as usize].read();
                    kicked[t as usize] = true;
                } else if t == wake_token {
                    let _ = self.wake.read();
                } else {
                    let _ = timer.wait();
                    polling = true;
                    self.polls.fetch_add(1, Ordering::Relaxed);
                }
            }
            // While anything is in flight the device may have consumed entries the guest made
            // available without a doorbell (event-idx), and completions must be reaped: poll.
            let again = self.service(&kicked, polling);
            if again != armed {
                if again {
                    timer.reset(self.poll, Some(self.poll))?;
                } else {
                    timer.clear()?;
                }
                armed = again;
            }
        }
        Ok(())
    }
}

/// Options of a `vio` device.
#[derive(Clone, Debug)]
pub struct VioOptions {
    /// How often queues with requests in flight are re-checked.
    pub poll: Duration,
}

pub struct VioPciDevice<M: GuestMemory + Send + Sync + 'static> {
    inner: VfioUserPciDevice,
    caps: Caps,
    registrar: Arc<dyn IoEventRegistrar>,
    /// The doorbells the guest rings (the VMM's), by queue: BAR 0 offset and eventfd.
    doorbells: Vec<(u64, Arc<EventFd>)>,
    snoop: Arc<Snoop<M>>,
    thread: Option<JoinHandle<()>>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    guest_vio_accesses: u64,
}

impl<M: GuestMemory + Send + Sync + 'static> VioPciDevice<M> {
    /// Puts IOPA-Snoop in front of `inner`, whose doorbell fds must not be registered with the
    /// hypervisor (the VMM's own take their place). `window` is the device's DMA window onto
    /// guest RAM; nothing of guest RAM needs to be mapped yet.
    pub fn new(
        inner: VfioUserPciDevice,
        mem: Arc<M>,
        window: Arc<DmaWindow>,
        registrar: Arc<dyn IoEventRegistrar>,
        opts: VioOptions,
    ) -> Result<Self, VioDeviceError> {
        let client = inner.client().clone();
        let id = inner.id().to_string();
        let cfg = |reg: usize| -> Result<u32, ClientError> {
            let mut b = [0u8; 4];
            client.region_read(PCI_CONFIG_REGION_INDEX, (reg * 4) as u64, &mut b)?;
            Ok(u32::from_le_bytes(b))
        };
        let caps = Caps::parse(&cfg)?;
        let read = |bar: usize, off: u64, n: usize| -> Result<u64, ClientError> {
            let mut b = [0u8; 8];
            client.region_read(bar as u32, off, &mut b[..n])?;
            Ok(u64::from_le_bytes(b))
        };
        if read(caps.vio.bar, caps.vio.offset, 4)? != u64::from(VIO_SHADOW_MAGIC) {
            return Err(VioDeviceError::NoShadowIndex);
        }
        let c = caps.common;
        let nq = read(c.bar, c.offset + NUM_QUEUES, 2)? as u16;
        if nq > MAX_QUEUES {
            return Err(VioDeviceError::TooManyQueues(nq));
        }
        // Each queue's doorbell address, and the device's own doorbell fd there.
        let mut device_fds: BTreeMap<u64, EventFd> = inner
            .doorbell_fds()
            .map_err(VioDeviceError::Doorbell)?
            .into_iter()
            .collect();
        let mut doorbells = Vec::new();
        let mut kicks = Vec::new();
        for q in 0..nq {
            client.region_write(c.bar as u32, c.offset + QUEUE_SELECT, &q.to_le_bytes())?;
            let off = read(c.bar, c.offset + QUEUE_NOTIFY_OFF, 2)?;
            let at = caps.notify.offset + off * u64::from(caps.notify_mult);
            kicks.push(match device_fds.remove(&at) {
                Some(fd) => DeviceKick::Fd(fd),
                None => DeviceKick::Region(at, q),
            });
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(VioDeviceError::Doorbell)?;
            doorbells.push((at, Arc::new(fd)));
        }
        client.region_write(c.bar as u32, c.offset + QUEUE_SELECT, &0u16.to_le_bytes())?;

        let shadow = ShadowPage::new().map_err(VioDeviceError::ShadowPage)?;
        client
            .map(
                SHADOW_IOVA,
                PAGE_SIZE,
                &DmaBacking {
                    file: &shadow._file,
                    file_offset: 0,
                    host_addr: shadow.ptr as u64,
                },
            )
            .map_err(VioDeviceError::ShadowMap)?;
        let snoop = Arc::new(Snoop {
            id: id.clone(),
            mem,
            window,
            client: client.clone(),
            shadow,
            kicks,
            queues: Mutex::new((0..nq).map(|_| QueueSlot::default()).collect()),
            poll: opts.poll,
            stop: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(VioDeviceError::Doorbell)?,
            polls: AtomicU64::new(0),
        });
        let mut dev = VioPciDevice {
            inner,
            caps,
            registrar,
            doorbells,
            snoop: snoop.clone(),
            thread: None,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            guest_vio_accesses: 0,
        };
        dev.register_doorbells(dev.bar0())
            .map_err(VioDeviceError::Doorbell)?;
        let fds = dev.doorbells.iter().map(|(_, f)| f.clone()).collect();
        dev.thread = Some(
            std::thread::Builder::new()
                .name(format!("{id}-snoop"))
                .spawn(move || snoop.run(fds))
                .map_err(VioDeviceError::Doorbell)?,
        );
        info!(
            "{id}: vio (snoop) with {nq} queue(s), shadow page at IOVA {SHADOW_IOVA:#x}, poll {:?}",
            opts.poll
        );
        Ok(dev)
    }

    fn bar0(&self) -> u64 {
        self.inner.bar(0).map(|b| b.addr).unwrap_or(0)
    }

    fn register_doorbells(&self, base: u64) -> std::io::Result<()> {
        for (off, fd) in &self.doorbells {
            self.registrar.register(fd, base + off)?;
        }
        Ok(())
    }

    fn unregister_doorbells(&self, base: u64) {
        for (off, fd) in &self.doorbells {
            let _ = self.registrar.unregister(fd, base + off);
        }
    }

    pub fn id(&self) -> &str {
        self.inner.id()
    }

    pub fn client(&self) -> &Arc<VfioUserClient> {
        self.inner.client()
    }

    pub fn bar(&self, index: usize) -> Option<PciBarRegion> {
        self.inner.bar(index)
    }

    /// Reads a common-configuration field from the device (64-bit ones as two halves, as the
    /// spec has drivers do).
    fn common_read(&self, off: u64, len: usize) -> u64 {
        let c = self.caps.common;
        let mut v = 0u64;
        for half in 0..len.div_ceil(4) {
            let n = len.min(4);
            let mut b = [0u8; 4];
            let at = c.offset + off + 4 * half as u64;
            if let Err(e) = self
                .inner
                .client()
                .region_read(c.bar as u32, at, &mut b[..n])
            {
                warn!("{}: reading queue configuration: {e}", self.id());
                return u64::MAX;
            }
            v |= u64::from(u32::from_le_bytes(b)) << (32 * half);
        }
        v
    }

    /// The guest enables the selected queue: hold its vring, point the device at the shadow
    /// index, start snooping from index 0.
    fn enable_queue(&mut self, q: u16) {
        let layout = QueueLayout {
            size: self.common_read(QUEUE_SIZE, 2) as u16,
            desc_table: self.common_read(QUEUE_DESC, 8),
            avail_ring: self.common_read(QUEUE_DRIVER, 8),
            used_ring: self.common_read(QUEUE_DEVICE, 8),
        };
        let mut queues = self.snoop.queues.lock().unwrap();
        let Some(slot) = queues.get_mut(usize::from(q)) else {
            return;
        };
        self.snoop.teardown(q, slot);
        if layout.size == 0 || !layout.size.is_power_of_two() {
            warn!("{}: queue {q} enabled with size {}", self.id(), layout.size);
            slot.ring_errors += 1;
            return;
        }
        let n = u64::from(layout.size);
        for (addr, len) in [
            (layout.desc_table, 16 * n),
            (layout.avail_ring, 6 + 2 * n),
            (layout.used_ring, 6 + 8 * n),
        ] {
            let Some(end) = addr.checked_add(len) else {
                slot.ring_errors += 1;
                continue;
            };
            let (first, last) = (addr / PAGE_SIZE, (end - 1) / PAGE_SIZE);
            match self.snoop.window.acquire_range(first, last - first + 1) {
                Ok(_) => slot.ring_pages.extend(first..=last),
                Err(e) => {
                    // The device will fault on this ring and fail the queue itself.
                    slot.ring_errors += 1;
                    warn!("{}: queue {q} ring at {addr:#x}: {e}", self.id());
                }
            }
        }
        for off in [0, 2, 4] {
            self.snoop.shadow.field(q, off).store(0, Ordering::Release);
        }
        let v = self.caps.vio;
        let reg = v.offset + 0x10 + 16 * u64::from(q);
        let client = self.inner.client();
        let r = client
            .region_write(
                v.bar as u32,
                reg,
                &(SHADOW_IOVA + SHADOW_STRIDE * u64::from(q)).to_le_bytes(),
            )
            .and_then(|_| {
                client.region_write(
                    v.bar as u32,
                    reg + 8,
                    &(VIO_SHADOW_ENABLE | VIO_SHADOW_SUPPRESSION).to_le_bytes(),
                )
            });
        if let Err(e) = r {
            warn!("{}: programming queue {q}'s shadow index: {e}", self.id());
        }
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let sq = SnoopQueue::new(layout, 0, WalkLimits::default()).with_event_idx(event_idx);
        // The device now writes its suppression to the shadow page; the guest sees ours.
        sq.state_suppression(&*self.snoop.mem);
        slot.snoop = Some(sq);
    }

    /// Driver reset: the device has stopped; drop every pin.
    fn reset_queues(&self) {
        let mut queues = self.snoop.queues.lock().unwrap();
        for (q, slot) in queues.iter_mut().enumerate() {
            self.snoop.teardown(q as u16, slot);
        }
    }

    /// Intercepts common-configuration accesses; returns true when handled here.
    fn common_write(&mut self, off: u64, data: &[u8]) -> bool {
        let mut v = [0u8; 8];
        v[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let v = u64::from_le_bytes(v);
        let c = self.caps.common;
        let base = self.bar_base(c.bar);
        match (off, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = v as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = v as u32,
            (DRIVER_FEATURE, 4) => {
                let mut w = v as u32;
                if self.driver_feature_select == 1 {
                    w &= !RING_PACKED_HI;
                }
                match self.driver_feature_select {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(w)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | u64::from(w) << 32
                    }
                    _ => {}
                }
                self.inner.write_bar(base, c.offset + off, &w.to_le_bytes());
                return true;
            }
            (QUEUE_SELECT, 2) => self.queue_select = v as u16,
            (QUEUE_ENABLE, 2) if v == 1 => {
                self.enable_queue(self.queue_select);
            }
            (DEVICE_STATUS, 1) if v == 0 => {
                self.inner.write_bar(base, c.offset + off, data);
                self.reset_queues();
                return true;
            }
            _ => {}
        }
        false
    }

    fn bar_base(&self, index: usize) -> u64 {
        self.inner.bar(index).map(|b| b.addr).unwrap_or(0)
    }

    pub fn counters(&self) -> BTreeMap<String, u64> {
        let mut c = self.inner.counters();
        let queues = self.snoop.queues.lock().unwrap();
        let mut total = SnoopStats::default();
        for (q, slot) in queues.iter().enumerate() {
            let mut s = slot.past.clone();
            if let Some(sq) = &slot.snoop {
                s.add(&sq.stats);
                s.shadow_idx = sq.stats.shadow_idx;
                c.insert(format!("q{q}_inflight"), sq.inflight() as u64);
                // The guest's and the device's positions, to tell a stalled ring's side.
                let l = sq.layout;
                let rd = |a: u64| {
                    self.snoop
                        .mem
                        .read_obj::<u16>(vm_memory::GuestAddress(a))
                        .map_or(u64::MAX, u64::from)
                };
                c.insert(format!("q{q}_avail_idx"), rd(l.avail_ring + 2));
                c.insert(format!("q{q}_used_idx"), rd(l.used_ring + 2));
                c.insert(format!("q{q}_used_flags"), rd(l.used_ring));
            }
            for (k, v) in [
                ("kicks", s.kicks),
                ("chains", s.chains),
                ("descriptors", s.descriptors),
                ("pages_checked", s.pages_checked),
                ("faultins", s.faultins),
                ("faultin_ns_p50", slot.faultin_ns.percentile(50)),
                ("faultin_ns_p99", slot.faultin_ns.percentile(99)),
                ("shadow_idx", u64::from(s.shadow_idx)),
                ("bad_chains", s.bad_chains),
                ("acquire_errors", s.acquire_errors),
                ("device_kicks", s.device_kicks),
                ("device_kicks_suppressed", s.device_kicks_suppressed),
                ("ring_errors", slot.ring_errors),
            ] {
                c.insert(format!("q{q}_{k}"), v);
            }
            total.add(&s);
        }
        let w = &self.snoop.window.stats;
        for (k, v) in [
            ("kicks", total.kicks),
            ("chains", total.chains),
            ("faultins", total.faultins),
            ("bad_chains", total.bad_chains),
            ("acquire_errors", total.acquire_errors),
            ("polls", self.snoop.polls.load(Ordering::Relaxed)),
            ("dma_maps", w.maps.load(Ordering::Relaxed)),
            ("dma_unmaps", w.unmaps.load(Ordering::Relaxed)),
            (
                "dma_window_bytes",
                w.mapped_pages.load(Ordering::Relaxed) * PAGE_SIZE,
            ),
            ("guest_vio_accesses", self.guest_vio_accesses),
            ("driver_features", self.driver_features),
        ] {
            c.insert(k.to_string(), v);
        }
        c
    }
}

impl<M: GuestMemory + Send + Sync + 'static> Snoop<M> {
    /// Stops snooping queue `q`: in-flight pins and the vring are released.
    fn teardown(&self, q: u16, slot: &mut QueueSlot) {
        if let Some(mut sq) = slot.snoop.take() {
            let QueueSlot {
                faultin_ns, past, ..
            } = slot;
            sq.release_all(&self.host(q, faultin_ns));
            past.add(&sq.stats);
            past.shadow_idx = sq.stats.shadow_idx;
        }
        for p in slot.ring_pages.drain(..) {
            self.window.release(p);
        }
    }
}

impl<M: GuestMemory + Send + Sync + 'static> PciDevice for VioPciDevice<M> {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        let v = self.inner.read_config_register(reg);
        self.caps.filter(reg, v)
    }

    fn write_config_register(
        &mut self,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarReprogram> {
        let (start, end) = self.caps.hidden;
        if (start..end).contains(&(reg * 4)) {
            return None;
        }
        self.inner.write_config_register(reg, offset, data)
    }

    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let index = self.inner.bar_index(base);
        if let Some(bar) = index {
            if self.caps.vio.contains(bar, offset, data.len())
                || self.caps.vio.contains(bar, offset, 1)
            {
                self.guest_vio_accesses += 1;
                return data.fill(0);
            }
        }
        self.inner.read_bar(base, offset, data);
        if let Some(bar) = index {
            let c = self.caps.common;
            if c.contains(bar, offset, data.len())
                && offset - c.offset == DEVICE_FEATURE
                && data.len() == 4
                && self.device_feature_select == 1
            {
                let v = u32::from_le_bytes(data[..4].try_into().unwrap()) & !RING_PACKED_HI;
                data.copy_from_slice(&v.to_le_bytes());
            }
        }
    }

    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) {
        if let Some(bar) = self.inner.bar_index(base) {
            if self.caps.vio.contains(bar, offset, 1) {
                // The guest does not see the capability; a guest poking here anyway is ignored.
                self.guest_vio_accesses += 1;
                return;
            }
            if self.caps.notify.contains(bar, offset, data.len()) {
                // A doorbell that reached the VMM instead of the eventfd (not yet registered,
                // or an odd-sized write): same path.
                if let Some((_, fd)) = self.doorbells.iter().find(|(o, _)| *o == offset) {
                    let _ = fd.write(1);
                }
                return;
            }
            let c = self.caps.common;
            if c.contains(bar, offset, data.len()) && self.common_write(offset - c.offset, data) {
                return;
            }
        }
        self.inner.write_bar(base, offset, data);
    }

    fn move_bar(&mut self, old_base: u64, new_base: u64) -> std::io::Result<()> {
        if self.inner.bar_index(new_base) == Some(0) {
            self.unregister_doorbells(old_base);
            self.register_doorbells(new_base)?;
        }
        self.inner.move_bar(old_base, new_base)
    }
}

impl<M: GuestMemory + Send + Sync + 'static> Drop for VioPciDevice<M> {
    fn drop(&mut self) {
        self.snoop.stop.store(true, Ordering::Release);
        let _ = self.snoop.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.reset_queues();
        self.unregister_doorbells(self.bar0());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vio_capability_is_unlinked_and_blanked() {
        // Caps at 0x40 (MSI-X) -> 0x50 (VIO, 16 bytes) -> 0x60 (common).
        let caps = Caps {
            hidden: (0x50, 0x60),
            link: (0x41, 0x60),
            ..Default::default()
        };
        assert_eq!(caps.filter(0x40 / 4, 0x0000_5011), 0x0000_6011);
        assert_eq!(caps.filter(0x50 / 4, 0x8010_6009), 0);
        assert_eq!(caps.filter(0x5c / 4, 0xdead_beef), 0);
        assert_eq!(caps.filter(0x60 / 4, 0x0100_0009), 0x0100_0009);
        // First in the list: the header's capability pointer skips it.
        let caps = Caps {
            hidden: (0x40, 0x50),
            link: (0x34, 0x50),
            ..Default::default()
        };
        assert_eq!(caps.filter(0x34 / 4, 0x40), 0x50);
    }
}
