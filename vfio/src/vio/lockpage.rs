//! Lockpage on a `vio` device: the snoop thread tells the hotness tracker (`vio::lockpage`)
//! every page a request touches, locks the pages it calls hot through the DMA window (a pin
//! reclaim reports as locked) and, once a period, applies its unlocks and swaps.

use log::warn;
use std::sync::Mutex;
use std::time::Duration;
use vio::spec::PAGE_SIZE;
use vio::{DmaWindow, LockPolicy, LockStats, Lockpage};

/// How often heat decays and cold locked pages are unlocked.
pub const LOCK_PERIOD: Duration = Duration::from_secs(1);

/// Lockpage options of a `vio` device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockOptions {
    /// Locked memory at most, in percent of guest RAM.
    pub budget_pct: u8,
}

pub(super) struct Locks {
    tracker: Mutex<Lockpage>,
    guest_pages: u64,
    /// Sample periods since the last tick.
    samples: Mutex<u32>,
}

/// `vm.vio-info`'s view of Lockpage.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LockInfo {
    pub budget_bytes: u64,
    pub locked_bytes: u64,
    /// Locked memory / guest RAM.
    pub lock_rate: f64,
    pub locked_runs: u64,
    pub locks: u64,
    pub unlocks: u64,
    /// Hot pages turned away by a full budget (or the mapping limit).
    pub denied: u64,
}

impl Locks {
    /// `window_pages` is the window's extent (guest page frames), `guest_pages` the RAM in it.
    pub fn new(opts: LockOptions, window_pages: u64, guest_pages: u64, max_maps: u64) -> Self {
        let policy = LockPolicy {
            budget_pages: guest_pages * u64::from(opts.budget_pct) / 100,
            lock_at: LockPolicy::DEFAULT_LOCK_AT,
            // Half the device's mappings at most are locked runs: the rest serve requests.
            max_runs: max_maps / 2,
        };
        Locks {
            tracker: Mutex::new(Lockpage::new(window_pages, policy)),
            guest_pages,
            samples: Mutex::new(0),
        }
    }

    /// A request touches `gfn`, which the caller has just acquired (faulting it in if
    /// `faulted`).
    pub fn touch(&self, window: &DmaWindow, gfn: u64, faulted: bool) {
        let mut t = self.tracker.lock().unwrap();
        if t.touch(gfn, faulted) && window.lock(gfn).is_err() {
            t.forget(gfn);
        }
    }

    /// Called every sample period; ticks the tracker every `LOCK_PERIOD`.
    pub fn sample(&self, window: &DmaWindow, period: Duration) {
        let mut n = self.samples.lock().unwrap();
        *n += 1;
        if Duration::from_nanos(period.as_nanos() as u64 * u64::from(*n)) < LOCK_PERIOD {
            return;
        }
        *n = 0;
        drop(n);
        let mut t = self.tracker.lock().unwrap();
        let plan = t.tick();
        for &g in &plan.unlock {
            window.unlock(g);
        }
        for &g in &plan.lock {
            // A page swapped in may have been reclaimed since it was hot: this faults it in.
            if let Err(e) = window.lock(g) {
                t.forget(g);
                warn!(
                    "Lockpage: locking guest page {g:#x}: {}",
                    vio::error_chain(&e)
                );
            }
        }
    }

    /// Unlocks every page (the device goes away).
    pub fn release_all(&self, window: &DmaWindow) {
        for g in self.tracker.lock().unwrap().unlock_all() {
            window.unlock(g);
        }
    }

    pub fn stats(&self) -> (LockStats, LockPolicy) {
        let t = self.tracker.lock().unwrap();
        (t.stats.clone(), t.policy())
    }

    pub fn info(&self) -> LockInfo {
        let (s, p) = self.stats();
        LockInfo {
            budget_bytes: p.budget_pages * PAGE_SIZE,
            locked_bytes: s.locked_pages * PAGE_SIZE,
            lock_rate: s.locked_pages as f64 / self.guest_pages.max(1) as f64,
            locked_runs: s.locked_runs,
            locks: s.locks,
            unlocks: s.unlocks,
            denied: s.denied,
        }
    }
}
