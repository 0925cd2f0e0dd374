//! Guest memory reclaim: cold pages leave RAM for a store, and any access faults them back.
//!
//! Guest RAM is one shared memfd. One userfaultfd covers all of it, registered for MISSING and
//! MINOR faults:
//! - **Reclaiming** page p: mark it busy, drop every mapping of it (MADV_DONTNEED on the
//!   VMM's mapping, which KVM follows), copy it from the memfd (not through a mapping) into the
//!   store, punch it out of the memfd (the host gets the memory back), mark it reclaimed. An
//!   access in between raises a MINOR fault that waits for the busy mark to clear and is then
//!   retried, which turns it into a MISSING fault.
//! - **Restoring**: a MISSING fault on a reclaimed page copies it back from the store
//!   (UFFDIO_COPY); on a page that was never written, it maps a zero page. The fault thread
//!   never touches guest memory through the faulting mapping.
//! - **Cold detection**: sampling drops the mappings of resident pages (the pages stay in the
//!   memfd); the next access raises a MINOR fault, marks the page accessed, and maps it back
//!   (UFFDIO_CONTINUE). Each sampling round ages the pages not accessed since the previous one;
//!   a page is cold once it went a whole round untouched, and the oldest go first. (Right after
//!   a round every page looks untouched, so "not accessed since sampling" alone is not enough.)
//! - Pages DMA-mapped to a passthrough device are pinned: a device cannot fault. Reclaiming
//!   them anyway (the unsafe switch) DMA-unmaps them first, and the device then takes I/O page
//!   faults it cannot resolve.
//! - Under IOPA-Snoop (`vio` devices) pins are per page and short-lived: the snoop engine pins
//!   the pages of a request before the device sees it and unpins them on completion
//!   (`Residency`). Reclaim marks a page busy, then checks its pins (both sides use sequentially
//!   consistent operations, so one of them sees the other), then DMA-unmaps it from every
//!   snooping device's window before taking its contents: the device never reaches a page that
//!   is not resident, and never loses one it was promised.

mod bulk;
mod fault;
mod handover;
mod inflight;
mod pass;
mod passthrough;
mod policy;
mod sample;
pub mod store;

pub use handover::ReclaimState;
pub use passthrough::PassthroughMapping;

use log::{debug, warn};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::{Store, StoreError, PAGE_SIZE};
use thiserror::Error;

pub use crate::config::{Compression, ReclaimConfig};
use userfaultfd::{Event, FaultKind, RegisterMode, Uffd, UffdBuilder};
use vfio::DmaMapping;
use vio::spec::PAGE_SIZE as PAGE;
use vio::{DmaWindow, LatencyHistogram, PageError, Residency};

const RECLAIMED: u8 = 1;
const BUSY: u8 = 2;
const SAMPLED: u8 = 4;
const ACCESSED: u8 = 8;

#[derive(Debug, Error)]
pub enum ReclaimError {
    #[error("Failed to create the userfaultfd")]
    Uffd(#[source] userfaultfd::Error),
    #[error("Failed to register guest RAM with the userfaultfd")]
    Register(#[source] userfaultfd::Error),
    #[error("Page store")]
    Store(#[from] StoreError),
    #[error("Failed to start the fault thread")]
    Thread(#[source] std::io::Error),
    #[error("Invalid reclaim state: {0}")]
    Adopt(String),
}

/// Pages of the memfd that `ranges` span.
fn total_pages(ranges: &[HostRange]) -> u64 {
    ranges
        .iter()
        .map(|r| r.file_offset + r.size)
        .max()
        .unwrap_or(0)
        / PAGE
}

/// A range of guest RAM as this process maps it.
#[derive(Clone, Copy, Debug)]
pub struct HostRange {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
    pub host_addr: u64,
}

#[derive(Default)]
pub struct ReclaimStats {
    pub reclaimed_pages: AtomicU64,
    pub cpu_refaults: AtomicU64,
    pub dma_faultins: AtomicU64,
    pub minor_faults: AtomicU64,
    pub zero_fills: AtomicU64,
    /// Reclaim passes a store failure ended (the pages stayed in RAM).
    pub store_errors: AtomicU64,
    /// Restores whose store read failed: the guest got a zero page instead of its data.
    pub restore_errors: AtomicU64,
    pub reclaim_runs: AtomicU64,
    pub sample_runs: AtomicU64,
    pub restore_ns_total: AtomicU64,
    /// Restore latencies, log-linear buckets (8 per power of two).
    pub restore_hist: LatencyHistogram,
}

/// What one reclaim call did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReclaimReport {
    pub reclaimed_bytes: u64,
    pub skipped_pinned_bytes: u64,
    /// Cold enough to go, but locked by Lockpage (a device keeps hitting them).
    pub skipped_locked_bytes: u64,
    pub skipped_reason: Option<String>,
    pub errors: u64,
    /// The store failure that ended the pass early, if one did.
    pub error: Option<String>,
}

pub struct Reclaimer {
    memfd: Arc<File>,
    ranges: Vec<HostRange>,
    pages: Vec<AtomicU8>,
    /// Sampling rounds a page has gone untouched: 0 = touched in the last round (or unknown).
    ages: Vec<AtomicU8>,
    store: Store,
    uffd: Uffd,
    pub stats: ReclaimStats,
    /// Plain passthrough devices' mappings: pinned as long as the device is there.
    passthrough: Mutex<Vec<PassthroughMapping>>,
    /// Per page: pins held by snooping devices for requests in flight (and their vrings).
    inflight_pins: Vec<AtomicU16>,
    /// Per page: how many of those pins are Lockpage's (hot pages kept), for the reports.
    locks: Vec<AtomicU8>,
    /// The DMA windows of snooping devices; reclaim evicts a page from them first. Weak: a
    /// window holds the reclaimer (its `Residency`), and a device that goes away takes its
    /// window with it.
    windows: Mutex<Vec<std::sync::Weak<DmaWindow>>>,
    cfg: ReclaimConfig,
    stop: AtomicBool,
    last_sample: Mutex<Option<Instant>>,
    /// Serialises reclaim and sampling passes.
    pass: Mutex<()>,
    /// No pass runs (a live upgrade is handing the pages over).
    frozen: AtomicBool,
}

impl Reclaimer {
    pub fn new(
        memfd: Arc<File>,
        ranges: Vec<HostRange>,
        cfg: ReclaimConfig,
    ) -> Result<Arc<Self>, ReclaimError> {
        let uffd = Self::uffd_for(&ranges)?;
        let lz4 = cfg.compress == Compression::Lz4;
        let store = Store::create(&cfg.store_dir, lz4, cfg.store_max_bytes)?;
        Self::build(memfd, ranges, cfg, store, uffd)
    }

    fn uffd_for(ranges: &[HostRange]) -> Result<Uffd, ReclaimError> {
        // KVM touches guest memory from the kernel, so faults from kernel mode must reach us.
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(ReclaimError::Uffd)?;
        for r in ranges {
            uffd.register_with_mode(
                r.host_addr as *mut libc::c_void,
                r.size as usize,
                RegisterMode::MISSING | RegisterMode::MINOR,
            )
            .map_err(ReclaimError::Register)?;
        }
        Ok(uffd)
    }

    fn build(
        memfd: Arc<File>,
        ranges: Vec<HostRange>,
        cfg: ReclaimConfig,
        store: Store,
        uffd: Uffd,
    ) -> Result<Arc<Self>, ReclaimError> {
        let total = total_pages(&ranges);
        let r = Arc::new(Reclaimer {
            memfd,
            ranges,
            pages: (0..total).map(|_| AtomicU8::new(0)).collect(),
            ages: (0..total).map(|_| AtomicU8::new(0)).collect(),
            store,
            uffd,
            stats: ReclaimStats::default(),
            passthrough: Mutex::new(Vec::new()),
            inflight_pins: (0..total).map(|_| AtomicU16::new(0)).collect(),
            locks: (0..total).map(|_| AtomicU8::new(0)).collect(),
            windows: Mutex::new(Vec::new()),
            cfg,
            stop: AtomicBool::new(false),
            last_sample: Mutex::new(None),
            pass: Mutex::new(()),
            frozen: AtomicBool::new(false),
        });
        r.start_threads()?;
        Ok(r)
    }

    fn start_threads(self: &Arc<Self>) -> Result<(), ReclaimError> {
        let r = self;
        let fr = r.clone();
        std::thread::Builder::new()
            .name("uffd".into())
            .spawn(move || {
                virtio_devices::seccomp::narrow("uffd");
                fr.fault_loop()
            })
            .map_err(ReclaimError::Thread)?;
        if r.cfg.interval_ms > 0 {
            let pr = r.clone();
            std::thread::Builder::new()
                .name("reclaim".into())
                .spawn(move || {
                    virtio_devices::seccomp::narrow("reclaim");
                    pr.policy_loop()
                })
                .map_err(ReclaimError::Thread)?;
        }
        Ok(())
    }

    /// The pass lock, unless passes are frozen.
    fn pass_guard(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        let g = self.pass.lock().unwrap();
        (!self.frozen.load(Ordering::Acquire)).then_some(g)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    fn page_of_guest(&self, gpa: u64) -> Option<u64> {
        self.locate(|r| r.guest_addr, gpa)
            .map(|(r, off)| (r.file_offset + off) / PAGE)
    }

    /// The range holding `addr` in the address space `base` picks (memfd offset, guest-physical
    /// or host virtual), and the offset into it.
    fn locate(&self, base: impl Fn(&HostRange) -> u64, addr: u64) -> Option<(&HostRange, u64)> {
        self.ranges
            .iter()
            .find(|r| addr >= base(r) && addr < base(r) + r.size)
            .map(|r| (r, addr - base(r)))
    }

    /// Takes the page's busy mark as a lock (restores must not race each other or a reclaim).
    fn lock_page(&self, page: u64) -> u8 {
        let slot = &self.pages[page as usize];
        loop {
            let st = slot.fetch_or(BUSY, Ordering::SeqCst);
            if st & BUSY == 0 {
                return st;
            }
            self.wait_not_busy(page);
        }
    }

    fn unlock_page(&self, page: u64) {
        self.pages[page as usize].fetch_and(!BUSY, Ordering::AcqRel);
    }

    fn host_addr(&self, page: u64) -> Option<u64> {
        self.locate(|r| r.file_offset, page * PAGE)
            .map(|(r, off)| r.host_addr + off)
    }

    fn guest_addr(&self, page: u64) -> Option<u64> {
        self.locate(|r| r.file_offset, page * PAGE)
            .map(|(r, off)| r.guest_addr + off)
    }

    fn page_of_host(&self, addr: u64) -> Option<u64> {
        self.locate(|r| r.host_addr, addr)
            .map(|(r, off)| (r.file_offset + off) / PAGE)
    }

    fn state(&self, page: u64) -> u8 {
        self.pages[page as usize].load(Ordering::Acquire)
    }

    /// Rounds untouched; a page touched since it was last sampled is not cold, whatever its age.
    fn age(&self, page: u64) -> u8 {
        if self.state(page) & (SAMPLED | ACCESSED) == SAMPLED {
            self.ages[page as usize].load(Ordering::Relaxed)
        } else {
            0
        }
    }

    /// Allocated (resident) pages of the memfd, as [start, end) page ranges.
    fn resident_ranges(&self) -> Vec<(u64, u64)> {
        let fd = self.memfd.as_raw_fd();
        let size = self.pages.len() as u64 * PAGE;
        let mut out = Vec::new();
        let mut off = 0i64;
        while (off as u64) < size {
            // SAFETY: lseek on our own memfd; no memory is involved.
            let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
            if data < 0 {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { size as i64 } else { hole };
            out.push((data as u64 / PAGE, (end as u64).div_ceil(PAGE)));
            off = end;
        }
        out
    }

    /// Bytes of guest RAM the host holds (the memfd's allocated blocks).
    pub fn resident_bytes(&self) -> u64 {
        // SAFETY: fstat on our own fd into a zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(self.memfd.as_raw_fd(), &mut st) } == 0 {
            st.st_blocks as u64 * 512
        } else {
            0
        }
    }

    pub fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        let s = &self.stats;
        let pinned: u64 = self
            .passthrough
            .lock()
            .unwrap()
            .iter()
            .flat_map(|p| p.pages.iter().map(|(a, b)| b - a))
            .sum::<u64>()
            * PAGE;
        let refaults = s.cpu_refaults.load(Ordering::Relaxed);
        [
            ("resident_bytes", self.resident_bytes()),
            (
                "reclaimed_bytes",
                s.reclaimed_pages.load(Ordering::Relaxed) * PAGE,
            ),
            ("store_bytes", self.store.used_bytes()),
            ("cpu_refaults", refaults),
            ("dma_faultins", s.dma_faultins.load(Ordering::Relaxed)),
            ("pinned_bytes", pinned),
            (
                "inflight_pinned_bytes",
                self.inflight_pins
                    .iter()
                    .filter(|p| p.load(Ordering::Relaxed) != 0)
                    .count() as u64
                    * PAGE,
            ),
            (
                "locked_bytes",
                self.locks
                    .iter()
                    .filter(|p| p.load(Ordering::Relaxed) != 0)
                    .count() as u64
                    * PAGE,
            ),
            ("reclaim_runs", s.reclaim_runs.load(Ordering::Relaxed)),
            ("sample_runs", s.sample_runs.load(Ordering::Relaxed)),
            ("minor_faults", s.minor_faults.load(Ordering::Relaxed)),
            ("zero_fills", s.zero_fills.load(Ordering::Relaxed)),
            ("store_errors", s.store_errors.load(Ordering::Relaxed)),
            ("restore_errors", s.restore_errors.load(Ordering::Relaxed)),
            (
                "restore_ns_avg",
                s.restore_ns_total
                    .load(Ordering::Relaxed)
                    .checked_div(refaults)
                    .unwrap_or(0),
            ),
            ("restore_ns_p50", s.restore_hist.percentile(50)),
            ("restore_ns_p99", s.restore_hist.percentile(99)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

#[cfg(test)]
mod tests;
