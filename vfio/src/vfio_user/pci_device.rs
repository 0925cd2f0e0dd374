//! A PCI function served by a vfio-user device process, as the guest sees it. The VMM owns the
//! BAR placement and the MSI-X table (vectors become irqfds the device writes directly);
//! doorbells are the device's own eventfds registered as ioeventfds; everything else is
//! forwarded over the socket. If the device process dies, the function turns into one that
//! reads all ones and ignores writes, and the VM keeps running.

use super::client::{ClientError, VfioUserClient};
use super::pri::{PriError, PriHandler};
use super::protocol::*;
use crate::handover::{FdsIn, FdsOut, HandoverError};
use log::{error, warn};
use pci::{
    BarReprogram, IoEventRegistrar, MsiInterruptGroup, MsixConfig, PciBarRegion, PciBarType,
    PciClass, PciConfiguration, PciDevice, PciHeader,
};
use std::collections::BTreeMap;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

const BAR0_REG: usize = 4;
const NUM_BARS: usize = 6;
const MSIX_CAP_ID: u8 = 0x11;
/// Vendor region where vdpu-style devices publish counters (JSON).
const COUNTERS_REGION: u32 = PCI_NUM_REGIONS;

#[derive(Debug, Error)]
pub enum VfioUserDeviceError {
    #[error("vfio-user")]
    Client(#[from] ClientError),
    #[error("The device is not a PCI device")]
    NotPci,
    #[error("No room for BAR {0} of {1:#x} bytes")]
    BarSpace(usize, u64),
    #[error("BAR {0} is an I/O BAR, which is not supported")]
    IoBar(usize),
    #[error("Invalid BAR {0}")]
    Bar(usize, #[source] pci::ConfigError),
    #[error("Failed to register doorbells")]
    IoEvent(#[source] std::io::Error),
    #[error("Failed to take the device over")]
    Adopt(#[source] HandoverError),
    #[error("BAR {0} of {1:#x} bytes is larger than a BAR of its kind can be")]
    BarSize(usize, u64),
    #[error("The MSI-X {0} ({1:#x} bytes at {2:#x} in BAR {3}) lies outside the device's BARs")]
    MsixOutsideBar(&'static str, u64, u64, usize),
    #[error("A doorbell of {1} bytes at {0:#x} lies outside BAR 0 or has an invalid size")]
    Doorbell(u64, u64),
}

/// Largest BARs a device may ask for: what a 32-bit BAR can address, and for a 64-bit BAR far
/// more than any device has (the VMM places it in guest-physical space).
const MAX_BAR32: u64 = 1 << 31;
const MAX_BAR64: u64 = 1 << 40;

struct Msix {
    cap_reg: usize,
    table: (usize, u64, u64),
    pba: (usize, u64, u64),
    config: Arc<Mutex<MsixConfig>>,
}

/// What the VMM holds of a vfio-user PCI function, for a new VMM process to take it over: the
/// BARs it placed, the MSI-X table it emulates, and the device's doorbell fds (by index in
/// the handover's descriptor list). The rest of the function's state lives in the device.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PciFunctionState {
    pub bars: Vec<PciBarRegion>,
    pub msix: Option<MsixLayoutState>,
    pub doorbells: Vec<(u64, usize)>,
    pub registered: bool,
    pub has_counters: bool,
    pub vmm_doorbells: u64,
    pub failed: bool,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MsixLayoutState {
    pub cap_reg: usize,
    pub table: (usize, u64, u64),
    pub pba: (usize, u64, u64),
    pub state: pci::MsixState,
}

/// Allocates guest-physical space for a BAR: (size, 64-bit) -> address.
pub type BarAllocator<'a> = &'a mut dyn FnMut(u64, bool) -> Option<u64>;

pub struct VfioUserPciDevice {
    id: String,
    client: Arc<VfioUserClient>,
    failed: Arc<AtomicBool>,
    bars: PciConfiguration,
    msix: Option<Msix>,
    doorbells: Vec<(u64, EventFd)>,
    registered: bool,
    registrar: Arc<dyn IoEventRegistrar>,
    vmm_doorbells: AtomicU64,
    has_counters: bool,
    /// Page requests from the device, resolved by the VMM (the PRI baseline).
    pri: Option<PriHandler>,
}

impl VfioUserPciDevice {
    /// Sets the device up behind `client`: BARs placed with `alloc`, MSI-X vectors wired to
    /// `interrupts`' eventfds, doorbells registered through `registrar` when `use_io_fds`.
    pub fn new(
        id: String,
        client: Arc<VfioUserClient>,
        interrupts: Arc<dyn MsiInterruptGroup>,
        registrar: Arc<dyn IoEventRegistrar>,
        alloc: BarAllocator,
        use_io_fds: bool,
    ) -> Result<Self, VfioUserDeviceError> {
        let info = client.device_info()?;
        if info.flags & DEVICE_FLAGS_PCI == 0 {
            return Err(VfioUserDeviceError::NotPci);
        }
        let cfg = |reg: usize| -> Result<u32, ClientError> {
            let mut b = [0u8; 4];
            client.region_read(PCI_CONFIG_REGION_INDEX, (reg * 4) as u64, &mut b)?;
            Ok(u32::from_le_bytes(b))
        };
        // A local configuration holds only the BARs the VMM placed.
        let mut bars =
            PciConfiguration::new(0, 0, 0, PciClass::Other, 0, 0, PciHeader::Device, 0, 0);
        let mut i = 0;
        while i < NUM_BARS {
            let size = client.region_info(i as u32)?.size;
            if size == 0 {
                i += 1;
                continue;
            }
            let raw = cfg(BAR0_REG + i)?;
            let kind = if raw & 1 == 1 {
                return Err(VfioUserDeviceError::IoBar(i));
            } else if (raw >> 1) & 3 == 2 {
                PciBarType::Mem64
            } else {
                PciBarType::Mem32
            };
            let max = if kind == PciBarType::Mem64 {
                MAX_BAR64
            } else {
                MAX_BAR32
            };
            if size > max {
                return Err(VfioUserDeviceError::BarSize(i, size));
            }
            let size = size.next_power_of_two().max(4096);
            let addr = alloc(size, kind == PciBarType::Mem64)
                .ok_or(VfioUserDeviceError::BarSpace(i, size))?;
            bars.add_bar(PciBarRegion {
                index: i,
                addr,
                size,
                kind,
                prefetchable: raw & 8 != 0,
            })
            .map_err(|e| VfioUserDeviceError::Bar(i, e))?;
            i += if kind == PciBarType::Mem64 { 2 } else { 1 };
        }
        let msix = Self::find_msix(&cfg, interrupts.clone())?;
        if let Some(m) = &msix {
            Self::check_msix(&bars, m)?;
        }
        if let Some(m) = &msix {
            let n = m.config.lock().unwrap().num_vectors();
            let fds: Vec<EventFd> = (0..n).filter_map(|v| interrupts.notifier(v)).collect();
            if fds.len() == n as usize {
                let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
                client.set_irqs(
                    PCI_MSIX_IRQ_INDEX,
                    IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                    0,
                    u32::from(n),
                    &raw,
                )?;
            }
        }
        // Doorbell offsets are learnt even when the fds are not used, to count doorbells the
        // VMM relays.
        // A device may not offer io-fds (the command is optional); one that answers with a
        // malformed list is refused like any other bad reply.
        let io_fds = match client.region_io_fds(PCI_BAR0_REGION_INDEX) {
            Err(e @ ClientError::Refused { .. }) => {
                warn!("{id}: no region io fds ({e}); doorbells go through the VMM");
                Vec::new()
            }
            r => r?,
        };
        let bar0 = bars.bar(0).map(|b| b.size).unwrap_or(0);
        // KVM takes ioeventfds of 1, 2, 4 or 8 bytes (0: any width); one outside BAR 0 would
        // sit on guest-physical addresses that belong to something else.
        if let Some(r) = io_fds.iter().find(|r| {
            !matches!(r.size, 0 | 1 | 2 | 4 | 8)
                || r.offset.checked_add(r.size.max(1)).is_none_or(|e| e > bar0)
        }) {
            return Err(VfioUserDeviceError::Doorbell(r.offset, r.size));
        }
        let doorbells = io_fds
            .into_iter()
            .map(|r| (r.offset, eventfd(r.fd)))
            .collect();
        let has_counters = client
            .region_info(COUNTERS_REGION)
            .map(|r| r.size > 0)
            .unwrap_or(false);
        let mut dev = VfioUserPciDevice {
            id,
            client,
            failed: Arc::new(AtomicBool::new(false)),
            bars,
            msix,
            doorbells,
            registered: false,
            registrar,
            vmm_doorbells: AtomicU64::new(0),
            has_counters,
            pri: None,
        };
        if use_io_fds {
            dev.register_doorbells()
                .map_err(VfioUserDeviceError::IoEvent)?;
        }
        dev.start_monitor();
        Ok(dev)
    }

    /// Resolves the device's page requests through `window`, which maps guest RAM for it
    /// without pins (the PRI baseline).
    pub fn start_page_requests(&mut self, window: Arc<vio::DmaWindow>) -> Result<(), PriError> {
        self.pri = Some(PriHandler::start(&self.id, self.client.clone(), window)?);
        Ok(())
    }

    pub fn has_page_requests(&self) -> bool {
        self.pri.is_some()
    }

    /// The function as the VMM holds it, for `adopt` in another process.
    pub fn save(&self, fds: &mut FdsOut) -> PciFunctionState {
        PciFunctionState {
            bars: self.bars.bars().collect(),
            msix: self.msix.as_ref().map(|m| MsixLayoutState {
                cap_reg: m.cap_reg,
                table: m.table,
                pba: m.pba,
                state: m.config.lock().unwrap().state(),
            }),
            doorbells: self
                .doorbells
                .iter()
                .map(|(off, fd)| (*off, fds.add(fd)))
                .collect(),
            registered: self.registered,
            has_counters: self.has_counters,
            vmm_doorbells: self.vmm_doorbells.load(Ordering::Relaxed),
            failed: self.failed(),
        }
    }

    /// Takes over a function another VMM process set up (a live upgrade), without a message
    /// to the device: `client` adopted the connection, `interrupts` deliver through the same
    /// eventfds the device already signals, and the MSI-X routes and doorbells are made again
    /// on this process's VM.
    pub fn adopt(
        id: String,
        client: Arc<VfioUserClient>,
        interrupts: Arc<dyn MsiInterruptGroup>,
        registrar: Arc<dyn IoEventRegistrar>,
        s: &PciFunctionState,
        fds: &mut FdsIn,
    ) -> Result<Self, VfioUserDeviceError> {
        let invalid = |what: String| VfioUserDeviceError::Adopt(HandoverError::Invalid(what));
        let mut bars =
            PciConfiguration::new(0, 0, 0, PciClass::Other, 0, 0, PciHeader::Device, 0, 0);
        for b in &s.bars {
            bars.add_bar(*b)
                .map_err(|e| VfioUserDeviceError::Bar(b.index, e))?;
        }
        let msix = match &s.msix {
            None => None,
            Some(m) => {
                let n = m.state.entries.len();
                if n == 0 || n > 2048 {
                    return Err(invalid(format!("{n} MSI-X vectors")));
                }
                let mut config = MsixConfig::new(n as u16, interrupts);
                config
                    .restore(&m.state)
                    .map_err(|e| invalid(e.to_string()))?;
                Some(Msix {
                    cap_reg: m.cap_reg,
                    table: m.table,
                    pba: m.pba,
                    config: Arc::new(Mutex::new(config)),
                })
            }
        };
        let doorbells = s
            .doorbells
            .iter()
            .map(|&(off, i)| Ok((off, fds.take_eventfd(i)?)))
            .collect::<Result<Vec<_>, HandoverError>>()
            .map_err(VfioUserDeviceError::Adopt)?;
        let mut dev = VfioUserPciDevice {
            id,
            client,
            failed: Arc::new(AtomicBool::new(s.failed)),
            bars,
            msix,
            doorbells,
            registered: false,
            registrar,
            vmm_doorbells: AtomicU64::new(s.vmm_doorbells),
            has_counters: s.has_counters,
            pri: None,
        };
        if s.registered {
            dev.register_doorbells()
                .map_err(VfioUserDeviceError::IoEvent)?;
        }
        dev.start_monitor();
        Ok(dev)
    }

    fn find_msix(
        cfg: &dyn Fn(usize) -> Result<u32, ClientError>,
        interrupts: Arc<dyn MsiInterruptGroup>,
    ) -> Result<Option<Msix>, ClientError> {
        if (cfg(1)? >> 16) & (1 << 4) == 0 {
            return Ok(None);
        }
        let mut ptr = (cfg(13)? & 0xfc) as usize;
        for _ in 0..48 {
            if ptr < 0x40 {
                break;
            }
            let head = cfg(ptr / 4)?;
            if head as u8 == MSIX_CAP_ID {
                let ctl = (head >> 16) as u16;
                let n = (ctl & 0x7ff) + 1;
                let table = cfg(ptr / 4 + 1)?;
                let pba = cfg(ptr / 4 + 2)?;
                let config = Arc::new(Mutex::new(MsixConfig::new(n, interrupts)));
                return Ok(Some(Msix {
                    cap_reg: ptr / 4,
                    table: (
                        (table & 7) as usize,
                        u64::from(table & !7),
                        u64::from(n) * 16,
                    ),
                    pba: (
                        (pba & 7) as usize,
                        u64::from(pba & !7),
                        u64::from(n).div_ceil(64) * 8,
                    ),
                    config,
                }));
            }
            ptr = ((head >> 8) & 0xfc) as usize;
        }
        Ok(None)
    }

    /// The MSI-X table and PBA must lie inside BARs the VMM placed, or guest accesses to them
    /// would reach the device instead of the VMM's emulation (or nothing at all).
    fn check_msix(bars: &PciConfiguration, m: &Msix) -> Result<(), VfioUserDeviceError> {
        for (what, (bir, off, len)) in [("table", m.table), ("PBA", m.pba)] {
            let inside = bars
                .bars()
                .find(|b| b.index == bir)
                .is_some_and(|b| off.checked_add(len).is_some_and(|e| e <= b.size));
            if !inside {
                return Err(VfioUserDeviceError::MsixOutsideBar(what, len, off, bir));
            }
        }
        Ok(())
    }

    fn bar0(&self) -> u64 {
        self.bars.bar(0).map(|b| b.addr).unwrap_or(0)
    }

    /// Registers the device's doorbell fds as the guest's doorbells (KVM ioeventfds).
    pub fn register_doorbells(&mut self) -> std::io::Result<()> {
        let base = self.bar0();
        for (off, fd) in &self.doorbells {
            self.registrar.register(fd, base + off)?;
        }
        self.registered = !self.doorbells.is_empty();
        Ok(())
    }

    /// Watches the socket for the device process going away.
    fn start_monitor(&self) {
        let Ok(sock) = self.client.try_clone_socket() else {
            return;
        };
        let (failed, id) = (self.failed.clone(), self.id.clone());
        let _ = std::thread::Builder::new()
            .name(format!("{id}-monitor"))
            .spawn(move || {
                virtio_devices::seccomp::narrow("monitor");
                loop {
                    let mut pfd = libc::pollfd {
                        fd: sock.as_raw_fd(),
                        events: libc::POLLRDHUP,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    let r = unsafe { libc::poll(&mut pfd, 1, 500) };
                    if r > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
                    {
                        if !failed.swap(true, Ordering::AcqRel) {
                            error!(
                                "{id}: the device process went away; the device is marked failed"
                            );
                        }
                        return;
                    }
                    if failed.load(Ordering::Acquire) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
    }

    fn fail(&self, e: &ClientError) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            error!("{}: device failed: {e}", self.id);
        }
    }

    /// The device process went away, or a request to it failed: a connection that lost a
    /// reply (a hung device's, say) is one whoever used it last may not have reported.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire) || self.client.broken()
    }

    pub fn bar(&self, index: usize) -> Option<PciBarRegion> {
        self.bars.bar(index)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn client(&self) -> &Arc<VfioUserClient> {
        &self.client
    }

    /// The device's doorbell eventfds by BAR 0 offset, for a front end that rings them itself
    /// (only when they were not registered with the hypervisor).
    pub fn doorbell_fds(&self) -> std::io::Result<Vec<(u64, EventFd)>> {
        if self.registered {
            return Ok(Vec::new());
        }
        self.doorbells
            .iter()
            .map(|(o, fd)| Ok((*o, fd.try_clone()?)))
            .collect()
    }

    pub fn bar_index(&self, base: u64) -> Option<usize> {
        self.bar_of(base)
    }

    /// The device's own counters (from its vendor region) and the VMM's view of it.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let mut c = BTreeMap::new();
        if self.has_counters && !self.failed() {
            let mut buf = vec![0u8; 4096];
            match self.client.region_read(COUNTERS_REGION, 0, &mut buf) {
                Ok(()) => {
                    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
                    if let Ok(m) = serde_json::from_slice::<BTreeMap<String, u64>>(&buf[..end]) {
                        c.extend(m);
                    }
                }
                Err(e) => self.fail(&e),
            }
        }
        c.insert(
            "vmm_doorbells".into(),
            self.vmm_doorbells.load(Ordering::Relaxed),
        );
        c.insert("failed".into(), u64::from(self.failed()));
        if let Some(p) = &self.pri {
            c.extend(p.counters().map(|(k, v)| (k.to_string(), v)));
        }
        c
    }

    fn bar_of(&self, base: u64) -> Option<usize> {
        self.bars.bars().find(|b| b.addr == base).map(|b| b.index)
    }

    fn in_range(r: &(usize, u64, u64), index: usize, offset: u64, len: usize) -> bool {
        r.0 == index && offset >= r.1 && offset + len as u64 <= r.1 + r.2
    }
}

fn eventfd(f: std::fs::File) -> EventFd {
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    // SAFETY: the server sent this descriptor as an ioeventfd; we own it from here on.
    unsafe { EventFd::from_raw_fd(f.into_raw_fd()) }
}

impl PciDevice for VfioUserPciDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
            return self.bars.read_reg(reg);
        }
        if reg == 12 {
            return 0; // no expansion ROM
        }
        if self.failed() {
            return 0xffff_ffff;
        }
        let mut b = [0u8; 4];
        if let Err(e) = self
            .client
            .region_read(PCI_CONFIG_REGION_INDEX, (reg * 4) as u64, &mut b)
        {
            self.fail(&e);
            return 0xffff_ffff;
        }
        let v = u32::from_le_bytes(b);
        match &self.msix {
            Some(m) if m.cap_reg == reg => {
                (v & 0xffff) | u32::from(m.config.lock().unwrap().msg_ctl()) << 16
            }
            _ => v,
        }
    }

    fn write_config_register(
        &mut self,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarReprogram> {
        if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
            return self.bars.write_reg(reg, offset, data);
        }
        if let Some(m) = &self.msix {
            if m.cap_reg == reg && offset + data.len() as u64 > 2 {
                // Message control lives in the upper half of the capability's first register.
                let mut ctl = m.config.lock().unwrap().msg_ctl().to_le_bytes();
                for (i, b) in data.iter().enumerate() {
                    let at = offset as usize + i;
                    if at >= 2 {
                        ctl[at - 2] = *b;
                    }
                }
                m.config
                    .lock()
                    .unwrap()
                    .set_msg_ctl(u16::from_le_bytes(ctl));
            }
        }
        if !self.failed() {
            if let Err(e) =
                self.client
                    .region_write(PCI_CONFIG_REGION_INDEX, reg as u64 * 4 + offset, data)
            {
                self.fail(&e);
            }
        }
        None
    }

    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let Some(index) = self.bar_of(base) else {
            return data.fill(0xff);
        };
        if let Some(m) = &self.msix {
            if Self::in_range(&m.table, index, offset, data.len()) {
                return m
                    .config
                    .lock()
                    .unwrap()
                    .read_table(offset - m.table.1, data);
            }
            if Self::in_range(&m.pba, index, offset, data.len()) {
                return m.config.lock().unwrap().read_pba(offset - m.pba.1, data);
            }
        }
        if self.failed() {
            return data.fill(0xff);
        }
        if let Err(e) = self.client.region_read(index as u32, offset, data) {
            self.fail(&e);
            data.fill(0xff);
        }
    }

    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(index) = self.bar_of(base) else {
            return;
        };
        if let Some(m) = &self.msix {
            if Self::in_range(&m.table, index, offset, data.len()) {
                return m
                    .config
                    .lock()
                    .unwrap()
                    .write_table(offset - m.table.1, data);
            }
            if Self::in_range(&m.pba, index, offset, data.len()) {
                return;
            }
        }
        if index == 0 && self.doorbells.iter().any(|(o, _)| *o == offset) {
            self.vmm_doorbells.fetch_add(1, Ordering::Relaxed);
        }
        if self.failed() {
            return;
        }
        if let Err(e) = self.client.region_write(index as u32, offset, data) {
            self.fail(&e);
        }
    }

    /// Called once the configuration holds the new address.
    fn move_bar(&mut self, old_base: u64, new_base: u64) -> std::io::Result<()> {
        if self.registered && self.bar_of(new_base) == Some(0) {
            for (off, fd) in &self.doorbells {
                self.registrar.unregister(fd, old_base + off)?;
            }
            for (off, fd) in &self.doorbells {
                self.registrar.register(fd, new_base + off)?;
            }
        }
        Ok(())
    }
}

impl Drop for VfioUserPciDevice {
    fn drop(&mut self) {
        if self.registered {
            let base = self.bar0();
            for (off, fd) in &self.doorbells {
                let _ = self.registrar.unregister(fd, base + off);
            }
        }
        self.failed.store(true, Ordering::Release);
    }
}
