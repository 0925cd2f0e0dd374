//! Reclaim on plain memory: restore, sampling, in-flight pins racing reclaim, passthrough
//! mappings, a full store.

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
    fn map(&self, gfn: u64, pages: u64) -> Result<(), vio::SourceError> {
        let r = self.r.lock().unwrap().clone().unwrap();
        for p in gfn..gfn + pages {
            assert_eq!(r.state(p) & RECLAIMED, 0, "page {p} mapped while reclaimed");
            assert!(self.mapped.lock().unwrap().insert(p));
        }
        Ok(())
    }
    fn unmap(&self, gfn: u64, pages: u64) -> Result<(), vio::SourceError> {
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
    assert!(matches!(w.acquire(3), Ok(true)));
    assert!(matches!(w.acquire(4), Ok(true)));
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
    assert!(matches!(
        w.acquire(1 << 30),
        Err(PageError::OutsideRam(0x4000_0000))
    ));
}

/// `reclaim_dma_mapped` takes only pages a device has mapped and is not using, whatever else
/// is resident and older; each then comes back as a device fault-in.
#[test]
fn dma_only_reclaim_takes_idle_device_pages() {
    let mm = setup(ReclaimConfig::default());
    let (r, io, w) = snooped(&mm);
    fill(&mm, 16);
    for p in [2, 9, 11] {
        w.acquire(p).unwrap();
    }
    w.release(2);
    w.release(9);
    // Page 11 is in flight (pinned); the 13 unmapped resident pages are not candidates.
    let rep = r.reclaim_dma_mapped(16 * PAGE);
    assert_eq!(rep.reclaimed_bytes, 2 * PAGE, "{rep:?}");
    assert_eq!(*io.mapped.lock().unwrap(), [11].into_iter().collect());
    assert!(
        matches!(w.acquire(9), Ok(true)),
        "back as a device fault-in"
    );
    assert_eq!(r.counters()["dma_faultins"], 1);
    check(&mm, 16);
}

/// Locked pages are pins that reclaim reports as locked; unlocked, they are reclaimable.
#[test]
fn locked_pages_are_skipped_and_reported() {
    let mm = setup(ReclaimConfig::default());
    let (r, io, w) = snooped(&mm);
    fill(&mm, 16);
    assert_eq!(r.reclaim(16 * PAGE, false).reclaimed_bytes, 16 * PAGE);
    assert!(matches!(w.lock(5), Ok(true)), "a locked page is faulted in");
    w.acquire(6).unwrap();
    assert_eq!(r.counters()["locked_bytes"], PAGE);
    // Bring the rest back, so there is something to skip.
    for p in (0..16).filter(|&p| p != 5 && p != 6) {
        w.acquire(p).unwrap();
        w.release(p);
    }
    let rep = r.reclaim(16 * PAGE, false);
    assert_eq!(rep.reclaimed_bytes, 14 * PAGE);
    assert_eq!(rep.skipped_locked_bytes, PAGE, "{rep:?}");
    assert_eq!(*io.mapped.lock().unwrap(), [5, 6].into_iter().collect());
    w.unlock(5);
    w.release(6);
    assert_eq!(r.counters()["locked_bytes"], 0);
    let rep = r.reclaim(16 * PAGE, false);
    assert_eq!(
        (rep.reclaimed_bytes, rep.skipped_locked_bytes),
        (2 * PAGE, 0)
    );
    check(&mm, 16);
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
    r.add_passthrough(PassthroughMapping {
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
        compress: Compression::None,
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

/// The store's write fails part-way through a pass (an I/O error, not a full store): the pass
/// stops there with the error reported, the page whose write failed and everything after it
/// stay resident, and the guest's data is intact.
#[test]
fn a_store_write_failure_ends_the_pass_and_loses_nothing() {
    let cfg = ReclaimConfig {
        compress: Compression::None,
        ..Default::default()
    };
    let mm = setup(cfg);
    let r = mm.reclaimer().unwrap().clone();
    fill(&mm, 64);
    let resident = r.resident_bytes();
    r.store.ok_writes.store(10, Ordering::SeqCst);
    let rep = r.reclaim(64 * PAGE, false);
    assert_eq!(rep.reclaimed_bytes, 10 * PAGE);
    assert_eq!(rep.errors, 1, "the pass stopped at the first failure");
    let why = rep.error.expect("the failure is reported");
    assert!(why.contains("Page store I/O failed"), "{why}");
    assert_eq!(r.counters()["store_errors"], 1);
    assert_eq!(resident - r.resident_bytes(), 10 * PAGE);
    check(&mm, 64);
}

/// A restore whose store read fails: the guest gets a zero page (the data is gone), and that is
/// counted and logged, not hidden; the other pages come back intact.
#[test]
fn a_failed_restore_is_counted_and_the_rest_comes_back() {
    let mm = setup(ReclaimConfig::default());
    let r = mm.reclaimer().unwrap().clone();
    fill(&mm, 4);
    assert_eq!(r.reclaim(4 * PAGE, false).reclaimed_bytes, 4 * PAGE);
    r.store.ok_reads.store(0, Ordering::SeqCst);
    let mem = mm.memory();
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(0)).unwrap(),
        0,
        "lost: zeros"
    );
    assert_eq!(r.counters()["restore_errors"], 1);
    assert_eq!(r.store.pages(), 3, "the lost page's store space is freed");
    r.store.ok_reads.store(u64::MAX, Ordering::SeqCst);
    for p in 1..4 {
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(p * PAGE)).unwrap(),
            p * 7 + 1
        );
    }
}

/// A range pinned in bulk (a `vio` device entering passthrough): the reclaimed pages in it
/// come back with their contents, in runs and around pages that were never taken, all stay
/// pinned (reclaim skips them) until unpinned, and the holes are then filled with zero pages
/// that reclaim can take again.
#[test]
fn pinning_a_range_restores_it_in_bulk() {
    let mm = setup(ReclaimConfig::default());
    let r = mm.reclaimer().unwrap().clone();
    fill(&mm, 1024);
    assert_eq!(r.reclaim(3 * MB, false).reclaimed_bytes, 3 * MB);
    let all = 32 * MB / PAGE;
    let faulted = r.pin_range(0, all).unwrap();
    assert_eq!(faulted, 768);
    let c = r.counters();
    assert_eq!(c["dma_faultins"], 768);
    assert_eq!(c["reclaimed_bytes"], 0);
    assert_eq!(r.store.pages(), 0);
    assert_eq!(
        r.reclaim(32 * MB, false).reclaimed_bytes,
        0,
        "pinned pages stay"
    );
    r.populate(0, all).unwrap();
    assert_eq!(r.resident_bytes(), 32 * MB, "every page backed");
    check(&mm, 1024);
    assert_eq!(
        r.counters()["cpu_refaults"],
        0,
        "nothing faulted back by the CPU"
    );
    (0..all).for_each(|p| r.unpin(p));
    assert_eq!(r.reclaim(32 * MB, false).reclaimed_bytes, 32 * MB);
    check(&mm, 1024);
}
