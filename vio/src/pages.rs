//! A device's DMA window onto guest RAM under IOPA-Snoop.
//!
//! Invariant: a guest page is DMA-mapped to the device only while it is resident, and it is
//! pinned (the reclaimer skips it) while a published request may touch it. `acquire` pins the
//! page first, then makes it resident, then maps it; the reclaimer `evict_held`s (DMA-unmaps) a page
//! before it takes the page's contents away, and never evicts a pinned one. So the device can
//! reach a page only while it holds the guest's data, and it is never handed an index whose
//! pages it cannot reach.
//!
//! Mappings stay in place after a request completes: a page the device uses again costs one
//! atomic increment, not a map. Only reclaim removes them.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use thiserror::Error;

/// The error of the layer below a seam (the page store, the IOMMU), kept as the source.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Error)]
pub enum PageError {
    #[error("Guest page {0:#x} is outside guest RAM")]
    OutsideRam(u64),
    #[error("Guest page {0:#x} has too many pins")]
    TooManyPins(u64),
    #[error("Failed to DMA-map guest pages {0:#x}+{1}")]
    Map(u64, u64, #[source] SourceError),
    #[error("Failed to DMA-unmap guest pages {0:#x}+{1}")]
    Unmap(u64, u64, #[source] SourceError),
    #[error("Failed to back guest pages {0:#x}+{1} with memory")]
    Populate(u64, u64, #[source] SourceError),
}

/// The memory manager's side: page residency and reclaim pins, by guest page frame number.
pub trait Residency: Send + Sync {
    /// Pins `gfn` and makes it resident; it stays resident until the matching `unpin`. Returns
    /// whether it had to be brought back (a fault-in).
    fn pin(&self, gfn: u64) -> Result<bool, PageError>;
    fn unpin(&self, gfn: u64);
    /// Pins [gfn, gfn+n) as `pin` does each page (all or nothing); returns how many had to be
    /// brought back. A memory manager may bring them back in bulk.
    fn pin_range(&self, gfn: u64, n: u64) -> Result<u64, PageError> {
        pin_each(self, gfn, n)
    }
    /// Backs [gfn, gfn+n), all pinned, with memory, as plain passthrough's pinning of all of
    /// guest RAM would (pages never written included).
    fn populate(&self, gfn: u64, n: u64) -> Result<(), PageError>;
    /// Pins `gfn` as `pin` does, for as long as it stays hot (Lockpage): reclaim tells locked
    /// pages apart from those in flight.
    fn lock(&self, gfn: u64) -> Result<bool, PageError> {
        self.pin(gfn)
    }
    fn unlock(&self, gfn: u64) {
        self.unpin(gfn)
    }
}

/// `Residency::pin_range` page by page: all or nothing.
pub fn pin_each<R: Residency + ?Sized>(r: &R, gfn: u64, n: u64) -> Result<u64, PageError> {
    let mut faulted = 0;
    for p in gfn..gfn + n {
        match r.pin(p) {
            Ok(f) => faulted += u64::from(f),
            Err(e) => {
                (gfn..p).for_each(|q| r.unpin(q));
                return Err(e);
            }
        }
    }
    Ok(faulted)
}

/// The IOMMU side: maps guest pages to the device at IOVA = guest-physical address.
pub trait IoMapper: Send + Sync {
    fn map(&self, gfn: u64, pages: u64) -> Result<(), SourceError>;
    /// Returns once the device can no longer touch the pages.
    fn unmap(&self, gfn: u64, pages: u64) -> Result<(), SourceError>;
}

#[derive(Default)]
pub struct WindowStats {
    pub maps: AtomicU64,
    pub unmaps: AtomicU64,
    pub mapped_pages: AtomicU64,
    /// DMA mappings in use: runs of contiguous mapped pages (the device joins adjacent maps).
    pub mappings: AtomicU64,
    /// Maps the device refused.
    pub map_failures: AtomicU64,
    /// Times the mappings neared the device's limit and the idle ones were dropped.
    pub trims: AtomicU64,
}

/// Mappings kept free below the device's limit: the shadow page, and maps racing a trim.
const MAP_HEADROOM: u64 = 16;

pub struct DmaWindow {
    residency: Arc<dyn Residency>,
    io: Arc<dyn IoMapper>,
    /// One bit per guest page: mapped to the device. Set only with the page held by this
    /// window (`acquire`, under `map_lock` shared and `map_one`), cleared only under `map_lock`
    /// exclusively (`evict_held`, `trim`) and only for pages this window does not hold.
    mapped: Vec<AtomicU64>,
    /// This device's holds per page (requests in flight, vrings, locks): what `trim` spares.
    holds: Vec<AtomicU16>,
    /// Held shared while a page is being mapped, exclusively to unmap: a page that is not
    /// mapped when an unmap span is computed stays unmapped until the span is unmapped.
    map_lock: RwLock<()>,
    /// Serialises maps (two acquirers of one page map it once) and the mapping count.
    map_one: Mutex<()>,
    /// The device's limit on simultaneous DMA mappings (vfio-user `max_dma_maps`).
    max_maps: u64,
    pub stats: WindowStats,
}

impl DmaWindow {
    /// A window over guest pages [0, `pages`).
    pub fn new(residency: Arc<dyn Residency>, io: Arc<dyn IoMapper>, pages: u64) -> Self {
        DmaWindow {
            residency,
            io,
            mapped: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            holds: (0..pages).map(|_| AtomicU16::new(0)).collect(),
            map_lock: RwLock::new(()),
            map_one: Mutex::new(()),
            max_maps: u64::MAX,
            stats: WindowStats::default(),
        }
    }

    /// The device holds at most `n` mappings at once; idle ones are dropped before that.
    pub fn with_max_maps(mut self, n: u64) -> Self {
        self.max_maps = n;
        self
    }

    pub fn max_maps(&self) -> u64 {
        self.max_maps
    }

    fn bit(&self, gfn: u64) -> Option<(&AtomicU64, u64)> {
        let w = self.mapped.get(usize::try_from(gfn / 64).ok()?)?;
        Some((w, 1 << (gfn % 64)))
    }

    pub fn is_mapped(&self, gfn: u64) -> bool {
        self.bit(gfn)
            .is_some_and(|(w, b)| w.load(Ordering::Acquire) & b != 0)
    }

    fn hold(&self, gfn: u64) -> Result<(), PageError> {
        let h = self
            .holds
            .get(gfn as usize)
            .ok_or(PageError::OutsideRam(gfn))?;
        if h.fetch_add(1, Ordering::SeqCst) == u16::MAX {
            h.fetch_sub(1, Ordering::SeqCst);
            return Err(PageError::TooManyPins(gfn));
        }
        Ok(())
    }

    fn unhold(&self, gfn: u64) {
        if let Some(h) = self.holds.get(gfn as usize) {
            h.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Pins `gfn`, makes it resident and DMA-maps it. Returns whether it was faulted in. On
    /// error nothing stays pinned.
    pub fn acquire(&self, gfn: u64) -> Result<bool, PageError> {
        self.acquire_as(gfn, false)
    }

    /// As `acquire`, as a lock (`Residency::lock`): reclaim reports it as locked, not in flight.
    pub fn lock(&self, gfn: u64) -> Result<bool, PageError> {
        self.acquire_as(gfn, true)
    }

    fn acquire_as(&self, gfn: u64, lock: bool) -> Result<bool, PageError> {
        self.bit(gfn).ok_or(PageError::OutsideRam(gfn))?;
        self.hold(gfn)?;
        let pinned = if lock {
            self.residency.lock(gfn)
        } else {
            self.residency.pin(gfn)
        };
        let undo = || {
            if lock {
                self.residency.unlock(gfn)
            } else {
                self.residency.unpin(gfn)
            }
            self.unhold(gfn);
        };
        let faulted = match pinned {
            Ok(f) => f,
            Err(e) => {
                self.unhold(gfn);
                return Err(e);
            }
        };
        if let Err(e) = self.map_runs(&[(gfn, 1)]) {
            undo();
            return Err(e);
        }
        Ok(faulted)
    }

    /// Acquires [gfn, gfn+n), mapping the pages not yet mapped in contiguous runs (vrings).
    /// All or nothing.
    pub fn acquire_range(&self, gfn: u64, n: u64) -> Result<u64, PageError> {
        if n > 0 {
            self.bit(gfn + n - 1)
                .ok_or(PageError::OutsideRam(gfn + n - 1))?;
        }
        for p in gfn..gfn + n {
            if let Err(e) = self.hold(p) {
                (gfn..p).for_each(|q| self.unhold(q));
                return Err(e);
            }
        }
        let faulted = match self.residency.pin_range(gfn, n) {
            Ok(f) => f,
            Err(e) => {
                (gfn..gfn + n).for_each(|q| self.unhold(q));
                return Err(e);
            }
        };
        if let Err(e) = self.map_runs(&runs(gfn, n, |_| true)) {
            (gfn..gfn + n).for_each(|q| self.release(q));
            return Err(e);
        }
        Ok(faulted)
    }

    /// Maps the unmapped pages of `runs` (held), in contiguous runs; first drops idle mappings
    /// if the device is near its limit.
    fn map_runs(&self, want: &[(u64, u64)]) -> Result<(), PageError> {
        let unmapped = |&(s, n): &(u64, u64)| (s..s + n).any(|p| !self.is_mapped(p));
        // Under the lock even to look: a trim may be unmapping a page this caller has just
        // taken a hold on, having looked at its holds before.
        let mut map = self.map_lock.read().unwrap();
        if !want.iter().any(unmapped) {
            return Ok(());
        }
        if self.stats.mappings.load(Ordering::Relaxed) + MAP_HEADROOM >= self.max_maps {
            drop(map);
            self.trim()?;
            map = self.map_lock.read().unwrap();
        }
        let _map = map;
        let _one = self.map_one.lock().unwrap();
        for &(g, n) in want {
            for (start, len) in runs(g, n, |p| !self.is_mapped(p)) {
                if let Err(e) = self.io.map(start, len) {
                    self.stats.map_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(PageError::Map(start, len, e));
                }
                // One more run, less the runs it joins on either side.
                let joins = u64::from(start > 0 && self.is_mapped(start - 1))
                    + u64::from(self.is_mapped(start + len));
                for p in start..start + len {
                    let (w, b) = self.bit(p).expect("checked by the caller");
                    w.fetch_or(b, Ordering::AcqRel);
                }
                self.stats.mappings.fetch_add(1, Ordering::Relaxed);
                self.stats.mappings.fetch_sub(joins, Ordering::Relaxed);
                self.stats.maps.fetch_add(1, Ordering::Relaxed);
                self.stats.mapped_pages.fetch_add(len, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The runs of pages mapped to the device (first, count), for a live upgrade.
    pub fn mapped_runs(&self) -> Vec<(u64, u64)> {
        let n = self.holds.len() as u64;
        runs(0, n, |p| self.is_mapped(p))
    }

    /// Records runs another process mapped for the device (a live upgrade): nothing is mapped
    /// again, and the mappings count as this window's from now on.
    pub fn adopt_mapped(&self, mapped: &[(u64, u64)]) -> Result<(), PageError> {
        let _map = self.map_lock.write().unwrap();
        for &(g, n) in mapped {
            let last = g
                .checked_add(n.max(1) - 1)
                .ok_or(PageError::OutsideRam(g))?;
            if last >= self.holds.len() as u64 {
                return Err(PageError::OutsideRam(last));
            }
        }
        for &(g, n) in mapped {
            for p in g..g + n {
                let (w, b) = self.bit(p).expect("checked above");
                w.fetch_or(b, Ordering::AcqRel);
            }
            self.stats.mapped_pages.fetch_add(n, Ordering::Relaxed);
        }
        let runs = self.mapped_runs().len() as u64;
        self.stats.mappings.store(runs, Ordering::Relaxed);
        Ok(())
    }

    pub fn release(&self, gfn: u64) {
        self.residency.unpin(gfn);
        self.unhold(gfn);
    }

    /// Undoes `lock`.
    pub fn unlock(&self, gfn: u64) {
        self.residency.unlock(gfn);
        self.unhold(gfn);
    }

    /// Backs [gfn, gfn+n) with memory; the caller holds pins on all of it.
    pub fn populate(&self, gfn: u64, n: u64) -> Result<(), PageError> {
        self.residency.populate(gfn, n)
    }

    /// For the reclaimer, about to take the pages of `held` (sorted, disjoint runs of guest
    /// pages it holds, none pinned): DMA-unmaps the mapped ones with as few unmaps as possible.
    /// A span may cross pages that are not held as long as none of them is mapped; the map
    /// lock keeps it so until the span is unmapped. Returns the pages unmapped; on error none
    /// of the held pages may be reclaimed.
    pub fn evict_held(&self, held: &[(u64, u64)]) -> Result<u64, PageError> {
        let _map = self.map_lock.write().unwrap();
        let pages = held.iter().flat_map(|&(s, n)| s..s + n);
        self.unmap_where(pages, |_| true)
    }

    /// Drops every mapping this device does not hold a page of (nothing in flight, no vring, no
    /// lock), in as few unmaps as possible: the device is near its limit. The pages stay
    /// resident; the next request that needs one maps it again.
    pub fn trim(&self) -> Result<u64, PageError> {
        let _map = self.map_lock.write().unwrap();
        self.stats.trims.fetch_add(1, Ordering::Relaxed);
        let mapped = self.mapped.iter().enumerate().flat_map(|(i, w)| {
            let mut w = w.load(Ordering::Acquire);
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let p = i as u64 * 64 + u64::from(w.trailing_zeros());
                    w &= w - 1;
                    p
                })
            })
        });
        let idle = |p: u64| self.holds[p as usize].load(Ordering::SeqCst) == 0;
        self.unmap_where(mapped, idle)
    }

    /// With `map_lock` held exclusively: unmaps the mapped pages among `pages` (ascending) that
    /// `take` accepts, in spans that cross unmapped pages but never a mapped page left in
    /// place. Returns the pages unmapped.
    fn unmap_where(
        &self,
        pages: impl Iterator<Item = u64>,
        take: impl Fn(u64) -> bool,
    ) -> Result<u64, PageError> {
        let mut spans: Vec<(u64, u64)> = Vec::new();
        let mut open: Option<(u64, u64)> = None; // first and last page of the span
        let mut last = None;
        for p in pages {
            // Pages skipped since the previous one are not candidates: a mapped one ends the
            // span before it.
            if let (Some(from), Some(_)) = (last, open) {
                if (from + 1..p).any(|q| self.is_mapped(q)) {
                    spans.extend(open.take());
                }
            }
            last = Some(p);
            if !self.is_mapped(p) {
                continue;
            }
            if take(p) {
                open = Some(open.map_or((p, p), |(a, _)| (a, p)));
            } else {
                spans.extend(open.take());
            }
        }
        spans.extend(open);
        for &(a, b) in &spans {
            self.io
                .unmap(a, b + 1 - a)
                .map_err(|e| PageError::Unmap(a, b + 1 - a, e))?;
            self.stats.unmaps.fetch_add(1, Ordering::Relaxed);
        }
        // The spans cover every mapped page taken, and no mapped page that was not.
        let mut done = 0;
        for &(a, b) in &spans {
            for p in a..=b {
                let (w, bit) = self.bit(p).expect("inside the window");
                if w.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                    done += 1;
                }
            }
        }
        self.stats.mapped_pages.fetch_sub(done, Ordering::Relaxed);
        if done > 0 {
            self.stats
                .mappings
                .store(self.count_runs(), Ordering::Relaxed);
        }
        Ok(done)
    }

    /// Runs of contiguous mapped pages.
    fn count_runs(&self) -> u64 {
        let mut carry = 0;
        let mut n = 0;
        for w in &self.mapped {
            let w = w.load(Ordering::Acquire);
            n += u64::from((w & !((w << 1) | carry)).count_ones());
            carry = w >> 63;
        }
        n
    }
}

/// Maximal runs of consecutive pages in [gfn, gfn+n) that satisfy `f`.
fn runs(gfn: u64, n: u64, f: impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in gfn..gfn.saturating_add(n) {
        if !f(p) {
            continue;
        }
        match out.last_mut() {
            Some((s, l)) if *s + *l == p => *l += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;

    /// Plain memory with a reclaimed set, and an IOMMU that records its mappings.
    #[derive(Default)]
    struct Fake {
        reclaimed: Mutex<BTreeSet<u64>>,
        pins: Mutex<BTreeMap<u64, u32>>,
        iommu: Mutex<BTreeSet<u64>>,
        fail_map: Mutex<bool>,
        calls: Mutex<Vec<String>>,
    }

    impl Residency for Fake {
        fn pin(&self, gfn: u64) -> Result<bool, PageError> {
            if gfn >= 1000 {
                return Err(PageError::OutsideRam(gfn));
            }
            *self.pins.lock().unwrap().entry(gfn).or_default() += 1;
            Ok(self.reclaimed.lock().unwrap().remove(&gfn))
        }
        fn unpin(&self, gfn: u64) {
            let mut p = self.pins.lock().unwrap();
            let c = p.get_mut(&gfn).expect("unpin of an unpinned page");
            *c -= 1;
            if *c == 0 {
                p.remove(&gfn);
            }
        }
        fn populate(&self, _: u64, _: u64) -> Result<(), PageError> {
            Ok(())
        }
    }

    impl IoMapper for Fake {
        fn map(&self, gfn: u64, pages: u64) -> Result<(), SourceError> {
            if *self.fail_map.lock().unwrap() {
                return Err("refused".into());
            }
            self.calls
                .lock()
                .unwrap()
                .push(format!("map {gfn}+{pages}"));
            let mut m = self.iommu.lock().unwrap();
            for p in gfn..gfn + pages {
                assert!(m.insert(p), "page {p} mapped twice");
                assert!(
                    !self.reclaimed.lock().unwrap().contains(&p),
                    "mapped while reclaimed"
                );
            }
            Ok(())
        }
        fn unmap(&self, gfn: u64, pages: u64) -> Result<(), SourceError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("unmap {gfn}+{pages}"));
            let mut m = self.iommu.lock().unwrap();
            let before = m.len();
            m.retain(|p| !(gfn..gfn + pages).contains(p));
            assert!(m.len() < before, "unmap of {gfn}+{pages}: nothing mapped");
            Ok(())
        }
    }

    fn window() -> (Arc<Fake>, DmaWindow) {
        let f = Arc::new(Fake::default());
        let w = DmaWindow::new(f.clone(), f.clone(), 1000);
        (f, w)
    }

    #[test]
    fn acquire_faults_in_maps_once_and_pins() {
        let (f, w) = window();
        f.reclaimed.lock().unwrap().insert(5);
        assert!(matches!(w.acquire(5), Ok(true)));
        assert!(
            matches!(w.acquire(5), Ok(false)),
            "resident and mapped: no fault, no map"
        );
        assert_eq!(f.calls.lock().unwrap().len(), 1);
        assert_eq!(f.pins.lock().unwrap()[&5], 2);
        w.release(5);
        w.release(5);
        assert!(f.pins.lock().unwrap().is_empty());
        assert!(w.is_mapped(5), "mappings outlive requests");
    }

    #[test]
    fn evict_unmaps_the_span_of_mapped_pages_once() {
        let (f, w) = window();
        for p in [10, 11, 12, 14] {
            w.acquire(p).unwrap();
            w.release(p);
        }
        assert_eq!(w.evict_held(&[(9, 6)]).unwrap(), 4);
        assert_eq!(f.calls.lock().unwrap()[4..], ["unmap 10+5".to_string()]);
        assert!(f.iommu.lock().unwrap().is_empty());
        assert_eq!(w.stats.mapped_pages.load(Ordering::Relaxed), 0);
        // Reclaimed, then needed again: faulted in and mapped again.
        f.reclaimed.lock().unwrap().insert(10);
        assert!(matches!(w.acquire(10), Ok(true)));
        assert!(f.iommu.lock().unwrap().contains(&10));
    }

    /// Held runs with unmapped gaps between them go in one unmap; a mapped page that is not
    /// held (in flight) splits the span and stays mapped.
    #[test]
    fn evict_held_batches_across_gaps_and_spares_what_is_not_held() {
        let (f, w) = window();
        for p in [10, 12, 20, 30, 40] {
            w.acquire(p).unwrap();
            w.release(p);
        }
        w.acquire(35).unwrap(); // in flight: not held by the reclaimer
        let done = w.evict_held(&[(10, 3), (20, 1), (30, 2), (40, 1)]).unwrap();
        assert_eq!(done, 5);
        assert_eq!(
            f.calls.lock().unwrap()[6..],
            ["unmap 10+21".to_string(), "unmap 40+1".to_string()]
        );
        assert!(w.is_mapped(35), "the in-flight page is untouched");
        assert_eq!(*f.iommu.lock().unwrap(), [35].into_iter().collect());
        assert_eq!(
            w.evict_held(&[(0, 35)]).unwrap(),
            0,
            "nothing held is mapped"
        );
        w.release(35);
    }

    /// A live upgrade: the new process's window takes over what the old one mapped without a
    /// map call, counts the mappings the device holds, and unmaps them like its own.
    #[test]
    fn adopted_mappings_are_the_windows_own() {
        let (f, old) = window();
        for p in [3, 4, 5, 9, 20] {
            old.acquire(p).unwrap();
            old.release(p);
        }
        let runs = old.mapped_runs();
        assert_eq!(runs, [(3, 3), (9, 1), (20, 1)]);
        // The new process's window onto the same device.
        let new = DmaWindow::new(f.clone(), f.clone(), 1000);
        let calls = || f.calls.lock().unwrap().len();
        let before = calls();
        new.adopt_mapped(&runs).unwrap();
        assert_eq!(calls(), before, "nothing mapped again");
        assert_eq!(new.mapped_runs(), runs);
        assert_eq!(new.stats.mappings.load(Ordering::Relaxed), 3);
        assert_eq!(new.stats.mapped_pages.load(Ordering::Relaxed), 5);
        assert!(matches!(new.acquire(4), Ok(false)));
        assert_eq!(calls(), before, "mapped already");
        new.release(4);
        assert_eq!(new.evict_held(&[(3, 3)]).unwrap(), 3);
        assert_eq!(f.calls.lock().unwrap()[before..], ["unmap 3+3".to_string()]);
        assert!(matches!(
            new.adopt_mapped(&[(990, 20)]),
            Err(PageError::OutsideRam(_))
        ));
    }

    #[test]
    fn errors_leave_nothing_pinned() {
        let (f, w) = window();
        assert!(matches!(w.acquire(5000), Err(PageError::OutsideRam(5000))));
        assert!(matches!(
            w.acquire_range(998, 4),
            Err(PageError::OutsideRam(1000))
        ));
        *f.fail_map.lock().unwrap() = true;
        assert!(matches!(w.acquire(7), Err(PageError::Map(7, 1, _))));
        assert!(matches!(w.acquire_range(20, 3), Err(PageError::Map(..))));
        assert!(f.pins.lock().unwrap().is_empty());
        assert!(!w.is_mapped(7));
    }

    #[test]
    fn acquire_range_maps_the_gaps() {
        let (f, w) = window();
        w.acquire(21).unwrap();
        assert_eq!(w.acquire_range(20, 4).unwrap(), 0);
        assert_eq!(
            f.calls.lock().unwrap()[1..],
            ["map 20+1".to_string(), "map 22+2".to_string()]
        );
        assert_eq!(f.pins.lock().unwrap()[&21], 2);
        assert_eq!(w.evict_held(&[(0, 1000)]).unwrap(), 4);
    }

    /// Near the device's mapping limit the idle mappings go, in one unmap that crosses unmapped
    /// pages; pages in flight and locked pages stay mapped; adjacent pages count as one mapping.
    #[test]
    fn near_the_mapping_limit_idle_mappings_are_trimmed() {
        let f = Arc::new(Fake::default());
        let w = DmaWindow::new(f.clone(), f.clone(), 1000).with_max_maps(MAP_HEADROOM + 4);
        for p in [10, 12, 14] {
            w.acquire(p).unwrap();
            w.release(p);
        }
        w.acquire(16).unwrap(); // in flight
        assert_eq!(w.stats.mappings.load(Ordering::Relaxed), 4);
        assert_eq!(w.stats.trims.load(Ordering::Relaxed), 0);
        w.lock(18).unwrap();
        assert_eq!(w.stats.trims.load(Ordering::Relaxed), 1);
        assert_eq!(
            f.calls.lock().unwrap()[4..],
            ["unmap 10+5".to_string(), "map 18+1".to_string()]
        );
        assert_eq!(w.stats.mappings.load(Ordering::Relaxed), 2);
        w.acquire(17).unwrap();
        assert_eq!(w.stats.mappings.load(Ordering::Relaxed), 1, "16..18 joined");
        assert_eq!(*f.iommu.lock().unwrap(), [16, 17, 18].into_iter().collect());
        // Nothing idle: a trim unmaps nothing.
        assert_eq!(w.trim().unwrap(), 0);
        w.release(17);
        w.release(16);
        w.unlock(18);
        assert_eq!(w.trim().unwrap(), 3);
        assert_eq!(w.stats.mappings.load(Ordering::Relaxed), 0);
        assert_eq!(w.stats.map_failures.load(Ordering::Relaxed), 0);
        assert!(f.pins.lock().unwrap().is_empty());
    }
}
