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

pub mod store;

use log::{debug, warn};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::{Store, StoreError, PAGE_SIZE};
use thiserror::Error;
use userfaultfd::{Event, FaultKind, RegisterMode, Uffd, UffdBuilder};
use vfio::DmaMapping;
use vio::{DmaWindow, LatencyHistogram, PageError, Residency};

const RECLAIMED: u8 = 1;
const BUSY: u8 = 2;
const SAMPLED: u8 = 4;
const ACCESSED: u8 = 8;
const PAGE: u64 = PAGE_SIZE as u64;

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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReclaimConfig {
    /// Policy period; 0 disables the background reclaimer (only `vm.reclaim` reclaims).
    pub interval_ms: u64,
    /// A page is cold when it was not accessed for this long.
    pub idle_ms: u64,
    /// The policy reclaims until this share of guest RAM is reclaimed.
    pub target_pct: u8,
    pub store_dir: PathBuf,
    pub compress: bool,
    pub store_max_bytes: u64,
    /// Added to every restore (fault-latency experiments).
    pub fault_latency_us: u64,
}

impl Default for ReclaimConfig {
    fn default() -> Self {
        ReclaimConfig {
            interval_ms: 0,
            idle_ms: 1000,
            target_pct: 50,
            store_dir: std::env::temp_dir(),
            compress: true,
            store_max_bytes: u64::MAX,
            fault_latency_us: 0,
        }
    }
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
    pub reclaim_runs: AtomicU64,
    pub sample_runs: AtomicU64,
    pub restore_ns_total: AtomicU64,
    /// Restore latencies, log-linear buckets (8 per power of two).
    pub restore_hist: LatencyHistogram,
}

/// A device that can reach guest memory by DMA, and so pins what it has mapped.
pub struct DmaPin {
    pub id: String,
    pub mapping: Arc<dyn DmaMapping>,
    /// Page indices [start, end) the device has mapped.
    pub pages: Vec<(u64, u64)>,
}

/// What one reclaim call did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReclaimReport {
    pub reclaimed_bytes: u64,
    pub skipped_pinned_bytes: u64,
    pub skipped_reason: Option<String>,
    pub errors: u64,
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
    pins: Mutex<Vec<DmaPin>>,
    /// Per page: pins held by snooping devices for requests in flight (and their vrings).
    snoop_pins: Vec<AtomicU16>,
    /// The DMA windows of snooping devices; reclaim evicts a page from them first. Weak: a
    /// window holds the reclaimer (its `Residency`), and a device that goes away takes its
    /// window with it.
    windows: Mutex<Vec<std::sync::Weak<DmaWindow>>>,
    cfg: ReclaimConfig,
    stop: AtomicBool,
    last_sample: Mutex<Option<Instant>>,
    /// Serialises reclaim and sampling passes.
    pass: Mutex<()>,
}

impl Reclaimer {
    pub fn new(
        memfd: Arc<File>,
        ranges: Vec<HostRange>,
        cfg: ReclaimConfig,
    ) -> Result<Arc<Self>, ReclaimError> {
        let total = ranges
            .iter()
            .map(|r| r.file_offset + r.size)
            .max()
            .unwrap_or(0)
            / PAGE;
        // KVM touches guest memory from the kernel, so faults from kernel mode must reach us.
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(ReclaimError::Uffd)?;
        for r in &ranges {
            uffd.register_with_mode(
                r.host_addr as *mut libc::c_void,
                r.size as usize,
                RegisterMode::MISSING | RegisterMode::MINOR,
            )
            .map_err(ReclaimError::Register)?;
        }
        let store = Store::create(&cfg.store_dir, cfg.compress, cfg.store_max_bytes)?;
        let r = Arc::new(Reclaimer {
            memfd,
            ranges,
            pages: (0..total).map(|_| AtomicU8::new(0)).collect(),
            ages: (0..total).map(|_| AtomicU8::new(0)).collect(),
            store,
            uffd,
            stats: ReclaimStats::default(),
            pins: Mutex::new(Vec::new()),
            snoop_pins: (0..total).map(|_| AtomicU16::new(0)).collect(),
            windows: Mutex::new(Vec::new()),
            cfg,
            stop: AtomicBool::new(false),
            last_sample: Mutex::new(None),
            pass: Mutex::new(()),
        });
        let fr = r.clone();
        std::thread::Builder::new()
            .name("uffd".into())
            .spawn(move || fr.fault_loop())
            .map_err(ReclaimError::Thread)?;
        if r.cfg.interval_ms > 0 {
            let pr = r.clone();
            std::thread::Builder::new()
                .name("reclaim".into())
                .spawn(move || pr.policy_loop())
                .map_err(ReclaimError::Thread)?;
        }
        Ok(r)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    pub fn add_pin(&self, pin: DmaPin) {
        self.pins.lock().unwrap().push(pin);
    }

    /// A snooping device's DMA window: reclaim DMA-unmaps pages from it before taking them.
    pub fn add_window(&self, w: &Arc<DmaWindow>) {
        let mut windows = self.windows.lock().unwrap();
        windows.retain(|w| w.strong_count() > 0);
        windows.push(Arc::downgrade(w));
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

    /// Copies reclaimed `page` back from the store into guest RAM at `host` (this process's
    /// mapping of it). The caller holds the page lock, and wakes threads faulting on the page
    /// once it released it.
    fn restore(&self, page: u64, host: *mut libc::c_void, buf: &mut [u8; PAGE_SIZE]) {
        let t0 = Instant::now();
        if self.cfg.fault_latency_us > 0 {
            std::thread::sleep(Duration::from_micros(self.cfg.fault_latency_us));
        }
        if let Err(e) = self.store.take(page, buf) {
            // Nothing sensible to give the guest: the page is lost. Say so loudly.
            log::error!("Restoring guest page {page}: {e}; mapping zeros");
            buf.fill(0);
        }
        // SAFETY: `buf` is a page of our own memory; `host` is a page of the registered guest
        // RAM mapping, which UFFDIO_COPY fills atomically (waking any thread faulting on it).
        let r = unsafe {
            self.uffd
                .copy(buf.as_ptr() as *const libc::c_void, host, PAGE_SIZE, false)
        };
        if let Err(e) = r {
            debug!("UFFDIO_COPY at {host:?}: {e}");
        }
        let slot = &self.pages[page as usize];
        slot.fetch_and(!(RECLAIMED | SAMPLED), Ordering::AcqRel);
        slot.fetch_or(ACCESSED, Ordering::AcqRel);
        self.stats.reclaimed_pages.fetch_sub(1, Ordering::Relaxed);
        let ns = t0.elapsed().as_nanos() as u64;
        self.stats.restore_ns_total.fetch_add(ns, Ordering::Relaxed);
        self.stats.restore_hist.record(ns);
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

    fn wait_not_busy(&self, page: u64) {
        while self.state(page) & BUSY != 0 {
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    fn fault_loop(&self) {
        let mut buf = Box::new([0u8; PAGE_SIZE]);
        while !self.stop.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                continue;
            }
            loop {
                let ev = match self.uffd.read_event() {
                    Ok(Some(e)) => e,
                    Ok(None) => break,
                    Err(e) => {
                        warn!("userfaultfd read: {e}");
                        break;
                    }
                };
                if let Event::Pagefault { kind, addr, .. } = ev {
                    self.handle_fault(kind, addr as u64, &mut buf);
                }
            }
        }
    }

    fn handle_fault(&self, kind: FaultKind, addr: u64, buf: &mut [u8; PAGE_SIZE]) {
        let Some(page) = self.page_of_host(addr) else {
            return warn!("userfaultfd: fault outside guest RAM at {addr:#x}");
        };
        let host = (addr & !(PAGE - 1)) as *mut libc::c_void;
        self.wait_not_busy(page);
        let slot = &self.pages[page as usize];
        match kind {
            FaultKind::Minor => {
                self.stats.minor_faults.fetch_add(1, Ordering::Relaxed);
                if slot.load(Ordering::Acquire) & RECLAIMED != 0 {
                    // Reclaimed while this fault waited: retried, it becomes a MISSING fault.
                    let _ = self.uffd.wake(host, PAGE_SIZE);
                    return;
                }
                slot.fetch_or(ACCESSED, Ordering::AcqRel);
                slot.fetch_and(!SAMPLED, Ordering::AcqRel);
                if let Err(e) = self.uffd.r#continue(host, PAGE_SIZE, true) {
                    debug!("UFFDIO_CONTINUE at {addr:#x}: {e}");
                    let _ = self.uffd.wake(host, PAGE_SIZE);
                }
            }
            _ => {
                // Faulting threads are woken only after the page lock is released, so nothing
                // they do next can find the page busy.
                let st = self.lock_page(page);
                let mut wake = (host, PAGE_SIZE);
                if st & RECLAIMED != 0 {
                    self.restore(page, host, buf);
                    self.stats.cpu_refaults.fetch_add(1, Ordering::Relaxed);
                } else if let Some(block) = self.zero_fill_block(page) {
                    wake = block;
                } else {
                    // SAFETY: `host` is the faulting page of registered guest RAM. If a snooping
                    // device's fault-in got there first, the kernel refuses (EEXIST) and the
                    // wake lets the access retry.
                    if let Err(e) = unsafe { self.uffd.zeropage(host, PAGE_SIZE, false) } {
                        debug!("UFFDIO_ZEROPAGE at {addr:#x}: {e}");
                    }
                    self.stats.zero_fills.fetch_add(1, Ordering::Relaxed);
                }
                self.unlock_page(page);
                let _ = self.uffd.wake(wake.0, wake.1);
            }
        }
    }

    /// A guest's first touches of never-used RAM come in streams: zero-fill the aligned 64 KiB
    /// block around `page` (which the caller holds locked) at once. Only when no page of it is
    /// reclaimed or busy, and only while
    /// holding the reclaim-pass lock so no reclaim can punch a page of the block meanwhile (a
    /// page zero-filled after its content went to the store would be lost). The kernel refuses
    /// (EEXIST) if any page of the block is present; the caller then fills just its page.
    /// Returns the block filled, for the caller to wake.
    fn zero_fill_block(&self, page: u64) -> Option<(*mut libc::c_void, usize)> {
        const BLOCK: u64 = 16;
        let Ok(_g) = self.pass.try_lock() else {
            return None;
        };
        let start = page & !(BLOCK - 1);
        let end = start + BLOCK;
        if end as usize > self.pages.len()
            || (start..end)
                .any(|p| self.state(p) & RECLAIMED != 0 || (p != page && self.state(p) & BUSY != 0))
        {
            return None;
        }
        let (Some(h0), Some(h1)) = (self.host_addr(start), self.host_addr(end - 1)) else {
            return None;
        };
        if h1 != h0 + (BLOCK - 1) * PAGE {
            return None; // crosses a range boundary
        }
        // SAFETY: [h0, h0 + 64 KiB) is registered guest RAM holding no reclaimed or busy page;
        // UFFDIO_ZEROPAGE maps zero pages only where nothing is present.
        match unsafe {
            self.uffd
                .zeropage(h0 as *mut libc::c_void, (BLOCK * PAGE) as usize, false)
        } {
            Ok(_) => {
                self.stats.zero_fills.fetch_add(BLOCK, Ordering::Relaxed);
                Some((h0 as *mut libc::c_void, (BLOCK * PAGE) as usize))
            }
            Err(_) => None,
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

    fn pinned(&self, page: u64) -> Option<String> {
        self.pins
            .lock()
            .unwrap()
            .iter()
            .find(|p| p.pages.iter().any(|&(s, e)| page >= s && page < e))
            .map(|p| p.id.clone())
    }

    /// Drops the mappings of every resident page so the next CPU access is observed. Pinned pages
    /// are sampled too: a device's own mapping is untouched, and the unsafe path needs to know
    /// which pinned pages are cold.
    pub fn sample(&self) {
        let _g = self.pass.lock().unwrap();
        for (s, e) in self.resident_ranges() {
            let mut run: Option<u64> = None;
            for p in s..=e {
                let ok = p < e && self.state(p) & (RECLAIMED | BUSY) == 0;
                if ok {
                    let slot = &self.pages[p as usize];
                    // A page still sampled and untouched since the last round has aged a round.
                    let age = &self.ages[p as usize];
                    if slot.load(Ordering::Acquire) & (SAMPLED | ACCESSED) == SAMPLED {
                        let a = age.load(Ordering::Relaxed);
                        age.store(a.saturating_add(1), Ordering::Relaxed);
                    } else {
                        age.store(0, Ordering::Relaxed);
                    }
                    slot.fetch_and(!ACCESSED, Ordering::AcqRel);
                    slot.fetch_or(SAMPLED, Ordering::AcqRel);
                    run.get_or_insert(p);
                } else if let Some(start) = run.take() {
                    self.drop_mappings(start, p);
                }
            }
        }
        self.stats.sample_runs.fetch_add(1, Ordering::Relaxed);
        *self.last_sample.lock().unwrap() = Some(Instant::now());
    }

    fn drop_mappings(&self, start: u64, end: u64) {
        let Some(host) = self.host_addr(start) else {
            return;
        };
        // SAFETY: [host, host + len) is registered guest RAM of this process. MADV_DONTNEED on a
        // shared mapping drops the page-table entries only; the pages stay in the memfd.
        let r = unsafe {
            libc::madvise(
                host as *mut libc::c_void,
                ((end - start) * PAGE) as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            warn!(
                "madvise(DONTNEED) at page {start}: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Reclaims up to `bytes` of the coldest reclaimable pages now.
    pub fn reclaim(&self, bytes: u64, unsafe_unmap_dma: bool) -> ReclaimReport {
        let _g = self.pass.lock().unwrap();
        self.stats.reclaim_runs.fetch_add(1, Ordering::Relaxed);
        let want = bytes.div_ceil(PAGE);
        let mut report = ReclaimReport::default();
        // Oldest first. Once sampling has aged pages, only cold ones (a whole round untouched)
        // qualify: "up to N bytes of the coldest". Without sampling there is no such knowledge and
        // any page may go, coldest first by address.
        let informed = self.stats.sample_runs.load(Ordering::Relaxed) >= 2;
        let mut by_age: Vec<Vec<u64>> = vec![Vec::new(); 256];
        for (s, e) in self.resident_ranges() {
            for p in s..e {
                let a = self.age(p);
                if a >= 1 || !informed {
                    by_age[a as usize].push(p);
                }
            }
        }
        let mut chosen = Vec::new();
        for p in by_age.into_iter().rev().flatten() {
            if chosen.len() as u64 >= want {
                break;
            }
            if self.state(p) & (RECLAIMED | BUSY) != 0 || self.snoop_pinned(p) {
                continue;
            }
            if let Some(id) = self.pinned(p) {
                if !unsafe_unmap_dma {
                    report.skipped_pinned_bytes += PAGE;
                    report.skipped_reason = Some(format!(
                        "DMA-mapped to passthrough device {id} (pinned: devices cannot fault)"
                    ));
                    continue;
                }
                self.unpin(p);
            }
            chosen.push(p);
        }
        let (done, errors) = self.reclaim_pages(chosen);
        report.reclaimed_bytes = done * PAGE;
        report.errors = errors;
        report
    }

    /// Reclaims `pages` in contiguous runs (one madvise, one pread and one hole punch per
    /// run). Returns (pages reclaimed, errors).
    fn reclaim_pages(&self, mut pages: Vec<u64>) -> (u64, u64) {
        const MAX_RUN: u64 = 512;
        // Pages held and DMA-evicted together: one unmap can then cover many runs.
        const GROUP: u64 = 16384;
        pages.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in pages {
            match runs.last_mut() {
                Some((s, n)) if *s + *n == p && *n < MAX_RUN => *n += 1,
                _ => runs.push((p, 1)),
            }
        }
        let (mut done, mut errors) = (0, 0);
        let mut rest = &runs[..];
        while !rest.is_empty() {
            let mut take = 0;
            let mut pages = 0;
            while take < rest.len() && pages < GROUP {
                pages += rest[take].1;
                take += 1;
            }
            let (group, next) = rest.split_at(take);
            rest = next;
            let held: Vec<(u64, u64)> = group
                .iter()
                .map(|&(s, n)| (s, self.lock_run(s, n)))
                .filter(|&(_, n)| n > 0)
                .collect();
            let unlock = |runs: &[(u64, u64)]| {
                for &(s, n) in runs {
                    (s..s + n).for_each(|p| self.unlock_page(p));
                }
            };
            if let Err(e) = self.evict(&held) {
                // A device may still reach them: keep them.
                unlock(&held);
                errors += 1;
                warn!("Reclaim: DMA unmap failed, pages kept: {e}");
                continue;
            }
            for (k, &(start, n)) in held.iter().enumerate() {
                let (saved, err) = self.finish_run(start, n);
                done += saved;
                if let Some(e) = err {
                    errors += 1;
                    warn!("Reclaiming pages {start}..{}: {e}", start + n);
                    if matches!(e, StoreError::Full(_)) {
                        unlock(&held[k + 1..]);
                        return (done, errors);
                    }
                }
            }
        }
        (done, errors)
    }

    /// DMA-unmaps `page` from every device that had it (the unsafe path).
    fn unpin(&self, page: u64) {
        let Some(gpa) = self.guest_addr(page) else {
            return;
        };
        for pin in self.pins.lock().unwrap().iter_mut() {
            if let Err(e) = pin.mapping.unmap(gpa, PAGE) {
                debug!("{}: {e}", pin.id);
            }
            let mut next = Vec::new();
            for &(s, e) in &pin.pages {
                if page >= s && page < e {
                    if s < page {
                        next.push((s, page));
                    }
                    if page + 1 < e {
                        next.push((page + 1, e));
                    }
                } else {
                    next.push((s, e));
                }
            }
            pin.pages = next;
        }
    }

    /// A store failure part-way through a run keeps the rest resident. Returns the pages
    /// reclaimed and the error, if any.
    /// Holds the first pages of [start, start+n) for reclaim (busy, and not pinned by a snooping
    /// device: see `pin`); stops at the first page another pass or a pin holds. Returns how
    /// many.
    fn lock_run(&self, start: u64, n: u64) -> u64 {
        let mut len = 0;
        while len < n
            && self.pages[(start + len) as usize].fetch_or(BUSY, Ordering::SeqCst) & BUSY == 0
        {
            // Pinned after it was chosen: a snooping device is about to use it.
            if self.snoop_pins[(start + len) as usize].load(Ordering::SeqCst) != 0 {
                self.unlock_page(start + len);
                break;
            }
            len += 1;
        }
        len
    }

    /// Reclaims the held run [start, start+len), already DMA-evicted.
    fn finish_run(&self, start: u64, len: u64) -> (u64, Option<StoreError>) {
        let release = |from: u64| {
            for p in from..len {
                self.pages[(start + p) as usize].fetch_and(!BUSY, Ordering::AcqRel);
            }
        };
        self.drop_mappings(start, start + len);
        let mut buf = vec![0u8; (len * PAGE) as usize];
        if let Err(e) = self.memfd.read_exact_at(&mut buf, start * PAGE) {
            release(0);
            return (0, Some(StoreError::Io(e)));
        }
        let mut saved = 0;
        let mut err = None;
        for (k, chunk) in buf.chunks_exact(PAGE_SIZE).enumerate() {
            match self.store.save(
                start + k as u64,
                chunk.try_into().expect("page-sized chunk"),
            ) {
                Ok(()) => saved += 1,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        if saved == 0 {
            release(0);
            return (0, err);
        }
        // SAFETY: punching a hole in our own memfd; nothing maps these pages now (mappings were
        // dropped and faults on them wait for BUSY to clear).
        let rc = unsafe {
            libc::fallocate(
                self.memfd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (start * PAGE) as i64,
                (saved * PAGE) as i64,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            (start..start + saved).for_each(|p| self.store.forget(p));
            release(0);
            return (0, Some(StoreError::Io(e)));
        }
        for p in start..start + saved {
            let slot = &self.pages[p as usize];
            slot.fetch_or(RECLAIMED, Ordering::AcqRel);
            slot.fetch_and(!(BUSY | SAMPLED | ACCESSED), Ordering::AcqRel);
            self.ages[p as usize].store(0, Ordering::Relaxed);
        }
        release(saved);
        self.stats
            .reclaimed_pages
            .fetch_add(saved, Ordering::Relaxed);
        (saved, err)
    }

    /// DMA-unmaps the held (busy, unpinned) page runs from every snooping device.
    fn evict(&self, held: &[(u64, u64)]) -> Result<(), PageError> {
        let windows: Vec<Arc<DmaWindow>> = self
            .windows
            .lock()
            .unwrap()
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        if windows.is_empty() || held.is_empty() {
            return Ok(());
        }
        // As guest page runs: contiguous in the memfd, contiguous in guest-physical space
        // except across a region boundary, where a run is split.
        let mut gfns: Vec<(u64, u64)> = Vec::new();
        for &(start, n) in held {
            for p in start..start + n {
                let Some(gfn) = self.guest_addr(p).map(|a| a / PAGE) else {
                    continue;
                };
                match gfns.last_mut() {
                    Some((s, l)) if *s + *l == gfn => *l += 1,
                    _ => gfns.push((gfn, 1)),
                }
            }
        }
        gfns.sort_unstable();
        for w in windows {
            w.evict_held(&gfns)?;
        }
        Ok(())
    }

    fn snoop_pinned(&self, page: u64) -> bool {
        self.snoop_pins[page as usize].load(Ordering::Relaxed) != 0
    }

    fn policy_loop(&self) {
        let total = self.pages.len() as u64 * PAGE;
        while !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(self.cfg.interval_ms));
            let idle_enough = self
                .last_sample
                .lock()
                .unwrap()
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(self.cfg.idle_ms));
            if idle_enough {
                let target = total * u64::from(self.cfg.target_pct) / 100;
                let have = self.stats.reclaimed_pages.load(Ordering::Relaxed) * PAGE;
                if have < target {
                    // Only pages untouched since the last sample: the policy never takes hot pages.
                    self.reclaim_cold(target - have);
                }
            }
            if self
                .last_sample
                .lock()
                .unwrap()
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(self.cfg.idle_ms))
            {
                self.sample();
            }
        }
    }

    fn reclaim_cold(&self, bytes: u64) {
        let _g = self.pass.lock().unwrap();
        self.stats.reclaim_runs.fetch_add(1, Ordering::Relaxed);
        let want = bytes.div_ceil(PAGE) as usize;
        let cold: Vec<u64> = self
            .resident_ranges()
            .into_iter()
            .flat_map(|(s, e)| s..e)
            .filter(|&p| {
                self.age(p) >= 1
                    && self.state(p) & (RECLAIMED | BUSY) == 0
                    && !self.snoop_pinned(p)
                    && self.pinned(p).is_none()
            })
            .take(want)
            .collect();
        self.reclaim_pages(cold);
    }

    pub fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        let s = &self.stats;
        let pinned: u64 = self
            .pins
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
                self.snoop_pins
                    .iter()
                    .filter(|p| p.load(Ordering::Relaxed) != 0)
                    .count() as u64
                    * PAGE,
            ),
            ("reclaim_runs", s.reclaim_runs.load(Ordering::Relaxed)),
            ("sample_runs", s.sample_runs.load(Ordering::Relaxed)),
            ("minor_faults", s.minor_faults.load(Ordering::Relaxed)),
            ("zero_fills", s.zero_fills.load(Ordering::Relaxed)),
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

impl Residency for Reclaimer {
    fn pin(&self, gfn: u64) -> Result<bool, PageError> {
        let page = gfn
            .checked_mul(PAGE)
            .and_then(|gpa| self.page_of_guest(gpa))
            .ok_or(PageError::OutsideRam(gfn))?;
        let pins = &self.snoop_pins[page as usize];
        if pins.fetch_add(1, Ordering::SeqCst) == u16::MAX {
            pins.fetch_sub(1, Ordering::SeqCst);
            return Err(PageError::TooManyPins(gfn));
        }
        // Dekker with reclaim_run: we publish the pin, then look at the page; it marks the page
        // busy, then looks at the pins. Either it saw our pin and backs off, or we see its busy
        // mark here and wait for the page to be reclaimed, then bring it back.
        let st = self.lock_page(page);
        let restored = st & RECLAIMED != 0;
        if restored {
            let mut buf = Box::new([0u8; PAGE_SIZE]);
            let host = self.host_addr(page).ok_or(PageError::OutsideRam(gfn))? as *mut libc::c_void;
            self.restore(page, host, &mut buf);
            self.stats.dma_faultins.fetch_add(1, Ordering::Relaxed);
        }
        // A device access is an access: the page is not cold.
        self.pages[page as usize].fetch_or(ACCESSED, Ordering::AcqRel);
        self.unlock_page(page);
        if restored {
            // A vCPU may be faulting on the page too; it finds it present now.
            let host = self.host_addr(page).unwrap_or(0) as *mut libc::c_void;
            let _ = self.uffd.wake(host, PAGE_SIZE);
        }
        Ok(restored)
    }

    fn unpin(&self, gfn: u64) {
        if let Some(page) = self.page_of_guest(gfn * PAGE) {
            let pins = &self.snoop_pins[page as usize];
            if pins.fetch_sub(1, Ordering::SeqCst) == 0 {
                pins.fetch_add(1, Ordering::SeqCst);
                warn!("Unpin of unpinned guest page {gfn:#x}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_manager::MemoryManager;

    use vm_memory::{Bytes, GuestAddress};

    const MB: u64 = 1 << 20;

    fn setup(cfg: ReclaimConfig) -> MemoryManager {
        let mut mm = MemoryManager::new(32 * MB, true).unwrap();
        mm.enable_reclaim(cfg).unwrap();
        mm
    }

    fn fill(mm: &MemoryManager, pages: u64) {
        let mem = mm.memory();
        for p in 0..pages {
            mem.write_obj(p * 7 + 1, GuestAddress(p * PAGE)).unwrap();
            mem.write_obj(0xfeed_u64 + p, GuestAddress(p * PAGE + 2048))
                .unwrap();
        }
    }

    fn check(mm: &MemoryManager, pages: u64) {
        let mem = mm.memory();
        for p in 0..pages {
            assert_eq!(
                mem.read_obj::<u64>(GuestAddress(p * PAGE)).unwrap(),
                p * 7 + 1,
                "page {p}"
            );
            assert_eq!(
                mem.read_obj::<u64>(GuestAddress(p * PAGE + 2048)).unwrap(),
                0xfeed + p,
                "page {p}"
            );
        }
    }

    #[test]
    fn reclaim_frees_memory_and_faults_restore_it() {
        let cfg = ReclaimConfig {
            fault_latency_us: 200,
            ..Default::default()
        };
        let mm = setup(cfg);
        let r = mm.reclaimer().unwrap().clone();
        fill(&mm, 2048);
        let before = r.resident_bytes();
        assert!(before >= 8 * MB, "{before}");
        let rep = r.reclaim(6 * MB, false);
        assert_eq!(rep.reclaimed_bytes, 6 * MB);
        assert_eq!(rep.errors, 0);
        let after = r.resident_bytes();
        assert!(
            before - after >= 6 * MB,
            "the memfd gave back its blocks: {before} -> {after}"
        );
        assert!(r.store.used_bytes() > 0);
        // Touching every page faults the reclaimed ones back, with their content.
        check(&mm, 2048);
        let c = r.counters();
        assert_eq!(c["cpu_refaults"], 1536);
        assert_eq!(c["reclaimed_bytes"], 0);
        assert!(
            c["restore_ns_p50"] >= 200_000,
            "the injected fault latency shows: {c:?}"
        );
        assert_eq!(r.store.pages(), 0, "restored pages leave the store");
    }

    #[test]
    fn sampling_finds_cold_pages_and_keeps_hot_ones() {
        let mm = setup(ReclaimConfig::default());
        let r = mm.reclaimer().unwrap().clone();
        fill(&mm, 64);
        let mem = mm.memory();
        r.sample();
        r.sample();
        // Pages 0..8 are touched between rounds; the others are not.
        for round in 0..2 {
            for p in 0..8 {
                let _ = mem.read_obj::<u64>(GuestAddress(p * PAGE)).unwrap();
            }
            r.sample();
            assert!(
                r.counters()["minor_faults"] >= 8 * (round + 1),
                "touches are observed"
            );
        }
        for p in 0..8 {
            let _ = mem.read_obj::<u64>(GuestAddress(p * PAGE)).unwrap();
        }
        assert!((0..8).all(|p| r.age(p) == 0), "touched pages are hot");
        assert!((8..64).all(|p| r.age(p) >= 2), "untouched pages aged");
        // Asking for more than the cold pages takes only cold ones.
        let rep = r.reclaim(128 * PAGE, false);
        assert_eq!(rep.reclaimed_bytes, 56 * PAGE);
        assert!((0..8).all(|p| r.state(p) & RECLAIMED == 0));
        check(&mm, 64);
    }

    struct Recorder(Mutex<Vec<(u64, u64)>>);
    impl DmaMapping for Recorder {
        fn map(&self, _: u64, _: u64, _: &vfio::DmaBacking) -> Result<(), vfio::DmaError> {
            Ok(())
        }
        fn unmap(&self, iova: u64, size: u64) -> Result<(), vfio::DmaError> {
            self.0.lock().unwrap().push((iova, size));
            Ok(())
        }
    }

    /// An IOMMU that checks the window's invariant: a page is mapped only while resident.
    struct CheckedIommu {
        r: Mutex<Option<Arc<Reclaimer>>>,
        mapped: Mutex<std::collections::BTreeSet<u64>>,
    }
    impl vio::IoMapper for CheckedIommu {
        fn map(&self, gfn: u64, pages: u64) -> Result<(), String> {
            let r = self.r.lock().unwrap().clone().unwrap();
            for p in gfn..gfn + pages {
                assert_eq!(r.state(p) & RECLAIMED, 0, "page {p} mapped while reclaimed");
                assert!(self.mapped.lock().unwrap().insert(p));
            }
            Ok(())
        }
        fn unmap(&self, gfn: u64, pages: u64) -> Result<(), String> {
            let mut m = self.mapped.lock().unwrap();
            let before = m.len();
            m.retain(|p| !(gfn..gfn + pages).contains(p));
            assert!(m.len() < before, "unmap of {gfn}+{pages}: nothing mapped");
            Ok(())
        }
    }

    fn snooped(mm: &MemoryManager) -> (Arc<Reclaimer>, Arc<CheckedIommu>, Arc<DmaWindow>) {
        let r = mm.reclaimer().unwrap().clone();
        let io = Arc::new(CheckedIommu {
            r: Mutex::new(Some(r.clone())),
            mapped: Mutex::new(Default::default()),
        });
        let w = Arc::new(DmaWindow::new(r.clone(), io.clone(), 32 * MB / PAGE));
        r.add_window(&w);
        (r, io, w)
    }

    #[test]
    fn snoop_pins_fault_in_map_and_block_reclaim() {
        let mm = setup(ReclaimConfig::default());
        let (r, io, w) = snooped(&mm);
        fill(&mm, 16);
        assert_eq!(r.reclaim(16 * PAGE, false).reclaimed_bytes, 16 * PAGE);
        // The device needs pages 3 and 4: they come back (from the store, with their data) and
        // are mapped, without any CPU access.
        assert_eq!(w.acquire(3), Ok(true));
        assert_eq!(w.acquire(4), Ok(true));
        assert_eq!(r.counters()["dma_faultins"], 2);
        assert_eq!(r.counters()["cpu_refaults"], 0);
        assert_eq!(io.mapped.lock().unwrap().len(), 2);
        let mut b = [0u8; 8];
        r.memfd.read_exact_at(&mut b, 3 * PAGE).unwrap();
        assert_eq!(
            u64::from_ne_bytes(b),
            3 * 7 + 1,
            "restored into the memfd the device maps"
        );
        // Pinned: reclaim takes neither.
        assert_eq!(r.reclaim(16 * PAGE, false).reclaimed_bytes, 0);
        assert_eq!(r.counters()["inflight_pinned_bytes"], 2 * PAGE);
        // Released: reclaim unmaps them from the device first, then takes them.
        w.release(3);
        w.release(4);
        assert_eq!(r.reclaim(16 * PAGE, false).reclaimed_bytes, 2 * PAGE);
        assert!(io.mapped.lock().unwrap().is_empty());
        check(&mm, 16);
        assert_eq!(w.acquire(1 << 30), Err(PageError::OutsideRam(1 << 30)));
    }

    /// Reclaim and acquire race on the same pages; the IOMMU asserts the invariant throughout,
    /// and no page's content is lost or duplicated.
    #[test]
    fn snoop_pins_race_reclaim() {
        let mm = setup(ReclaimConfig::default());
        let (r, _io, w) = snooped(&mm);
        fill(&mm, 64);
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let (r, stop) = (r.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    r.reclaim(64 * PAGE, false);
                }
            })
        };
        let t0 = Instant::now();
        let mut round = 0u64;
        while r.counters()["dma_faultins"] < 200 && t0.elapsed() < Duration::from_secs(20) {
            let p = (round * 13) % 64;
            let q = (p + 1) % 64;
            round += 1;
            w.acquire(p).unwrap();
            w.acquire(q).unwrap();
            for x in [p, q] {
                assert!(w.is_mapped(x), "acquired page {x} is mapped");
                let mut b = [0u8; 8];
                r.memfd.read_exact_at(&mut b, x * PAGE).unwrap();
                assert_eq!(
                    u64::from_ne_bytes(b),
                    x * 7 + 1,
                    "acquired page {x} holds its data"
                );
            }
            // Reclaim runs meanwhile and must not take either.
            std::thread::yield_now();
            for x in [p, q] {
                assert!(
                    w.is_mapped(x) && r.state(x) & RECLAIMED == 0,
                    "page {x} kept"
                );
            }
            w.release(p);
            w.release(q);
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
        check(&mm, 64);
        assert!(r.counters()["dma_faultins"] >= 200, "{:?}", r.counters());
    }

    #[test]
    fn pinned_pages_are_skipped_unless_unsafe() {
        let mm = setup(ReclaimConfig::default());
        let r = mm.reclaimer().unwrap().clone();
        fill(&mm, 16);
        let dev = Arc::new(Recorder(Mutex::new(Vec::new())));
        r.add_pin(DmaPin {
            id: "dev0".into(),
            mapping: dev.clone(),
            pages: vec![(0, 8)],
        });
        let rep = r.reclaim(16 * PAGE, false);
        assert_eq!(rep.reclaimed_bytes, 8 * PAGE);
        assert_eq!(rep.skipped_pinned_bytes, 8 * PAGE);
        assert!(rep.skipped_reason.unwrap().contains("dev0"));
        assert_eq!(r.counters()["pinned_bytes"], 8 * PAGE);
        check(&mm, 16);
        let rep = r.reclaim(2 * PAGE, true);
        assert_eq!(rep.reclaimed_bytes, 2 * PAGE);
        assert_eq!(
            dev.0.lock().unwrap().len(),
            2,
            "each page was DMA-unmapped first"
        );
        assert_eq!(r.counters()["pinned_bytes"], 6 * PAGE);
        check(&mm, 16);
    }

    #[test]
    fn a_full_store_reclaims_what_fits_and_loses_nothing() {
        let cfg = ReclaimConfig {
            compress: false,
            store_max_bytes: 4 * PAGE,
            ..Default::default()
        };
        let mm = setup(cfg);
        let r = mm.reclaimer().unwrap().clone();
        fill(&mm, 16);
        let rep = r.reclaim(16 * PAGE, false);
        assert_eq!(rep.reclaimed_bytes, 4 * PAGE);
        assert_eq!(rep.errors, 1, "stops at the first full-store error");
        check(&mm, 16);
    }
}
