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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
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
}

pub struct DmaWindow {
    residency: Arc<dyn Residency>,
    io: Arc<dyn IoMapper>,
    /// One bit per guest page: mapped to the device. Set only by `acquire` (page pinned),
    /// cleared only by `evict_held` (page unpinned and held by the reclaimer), so the two never race
    /// on the same bit.
    mapped: Vec<AtomicU64>,
    /// Held shared while a page is being mapped, exclusively by `evict_held`: a page that is
    /// not mapped when an eviction span is computed stays unmapped until the span is unmapped.
    map_lock: RwLock<()>,
    pub stats: WindowStats,
}

impl DmaWindow {
    /// A window over guest pages [0, `pages`).
    pub fn new(residency: Arc<dyn Residency>, io: Arc<dyn IoMapper>, pages: u64) -> Self {
        DmaWindow {
            residency,
            io,
            mapped: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            map_lock: RwLock::new(()),
            stats: WindowStats::default(),
        }
    }

    fn bit(&self, gfn: u64) -> Option<(&AtomicU64, u64)> {
        let w = self.mapped.get(usize::try_from(gfn / 64).ok()?)?;
        Some((w, 1 << (gfn % 64)))
    }

    pub fn is_mapped(&self, gfn: u64) -> bool {
        self.bit(gfn)
            .is_some_and(|(w, b)| w.load(Ordering::Acquire) & b != 0)
    }

    /// Pins `gfn`, makes it resident and DMA-maps it. Returns whether it was faulted in. On
    /// error nothing stays pinned.
    pub fn acquire(&self, gfn: u64) -> Result<bool, PageError> {
        let (word, bit) = self.bit(gfn).ok_or(PageError::OutsideRam(gfn))?;
        let faulted = self.residency.pin(gfn)?;
        let _map = self.map_lock.read().unwrap();
        if word.load(Ordering::Acquire) & bit == 0 {
            if let Err(e) = self.io.map(gfn, 1) {
                self.residency.unpin(gfn);
                return Err(PageError::Map(gfn, 1, e));
            }
            word.fetch_or(bit, Ordering::AcqRel);
            self.stats.maps.fetch_add(1, Ordering::Relaxed);
            self.stats.mapped_pages.fetch_add(1, Ordering::Relaxed);
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
        let faulted = self.residency.pin_range(gfn, n)?;
        let _map = self.map_lock.read().unwrap();
        for (start, len) in runs(gfn, n, |p| !self.is_mapped(p)) {
            if let Err(e) = self.io.map(start, len) {
                (gfn..gfn + n).for_each(|q| self.residency.unpin(q));
                return Err(PageError::Map(start, len, e));
            }
            for p in start..start + len {
                let (w, b) = self.bit(p).expect("checked above");
                w.fetch_or(b, Ordering::AcqRel);
            }
            self.stats.maps.fetch_add(1, Ordering::Relaxed);
            self.stats.mapped_pages.fetch_add(len, Ordering::Relaxed);
        }
        Ok(faulted)
    }

    pub fn release(&self, gfn: u64) {
        self.residency.unpin(gfn);
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
        let mut spans: Vec<(u64, u64)> = Vec::new();
        let mut open: Option<(u64, u64)> = None; // first and last mapped held page
        let mut cursor = None;
        for &(start, n) in held {
            // Pages between the previous run and this one are not held: a mapped one ends
            // the span before it.
            if let (Some(from), Some(_)) = (cursor, open) {
                if (from..start).any(|p| self.is_mapped(p)) {
                    spans.extend(open.take());
                }
            }
            for p in start..start + n {
                if self.is_mapped(p) {
                    open = Some(open.map_or((p, p), |(a, _)| (a, p)));
                }
            }
            cursor = Some(start + n);
        }
        spans.extend(open);
        for &(a, b) in &spans {
            self.io
                .unmap(a, b + 1 - a)
                .map_err(|e| PageError::Unmap(a, b + 1 - a, e))?;
            self.stats.unmaps.fetch_add(1, Ordering::Relaxed);
        }
        // The spans cover every mapped held page.
        let mut done = 0;
        for &(start, n) in held {
            for p in start..start + n {
                if let Some((w, bit)) = self.bit(p) {
                    if w.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                        done += 1;
                    }
                }
            }
        }
        self.stats.mapped_pages.fetch_sub(done, Ordering::Relaxed);
        Ok(done)
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
}
