//! Lockpage: which guest pages DMA keeps hitting, so they stay pinned (resident, DMA-mapped,
//! skipped by reclaim) instead of being reclaimed only for the next request to fault them back.
//!
//! Hotness is a decayed touch counter per page: every page a snooped request touches adds one
//! (up to `HEAT_MAX`; a touch that had to fault the page back in adds `FAULT_BONUS` more), and every tick (the caller's period, a second by default) halves them all. A
//! page whose heat reaches `lock_at` is locked on the spot if the budget has room; a locked
//! page whose heat has decayed to zero (untouched for a few periods) is unlocked at a tick.
//! When hot pages were turned away by a full budget, the tick swaps them in for colder locked
//! ones, coldest first. So the I/O path pays one byte increment and a bit test per page (no
//! allocation, no lock beyond the caller's), and the tick's scans are off it.
//!
//! Memory: one byte of heat and one bit per guest page (288 KiB per GiB of guest RAM).
//!
//! Locked pages also bound the DMA mappings they keep: contiguous locked pages are one mapping
//! (the device joins adjacent ones), and a page that would start a new run of locked pages is
//! not locked once `max_runs` runs are locked, so the mappings that reclaim and trimming can
//! never remove stay well below the device's limit.

/// Heat saturates here: a page that stops being hit cools to zero within five ticks however
/// hot it was, so a hot set that moves frees its old pages within seconds.
pub const HEAT_MAX: u8 = 31;

/// What a touch that had to fault the page back in adds on top of the touch: reclaim took a
/// page DMA came back for, which is the waste Lockpage exists to stop. A page used about once
/// a second is not hot by count alone, but two fault-ins within a tick lock it.
pub const FAULT_BONUS: u8 = 2;

/// When a page is locked and how much may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockPolicy {
    /// Locked pages at most.
    pub budget_pages: u64,
    /// Heat at which a page is locked (touches, halved every tick).
    pub lock_at: u8,
    /// Runs of contiguous locked pages (DMA mappings) at most.
    pub max_runs: u64,
}

impl LockPolicy {
    /// A page touched this many times within about one tick is hot.
    pub const DEFAULT_LOCK_AT: u8 = 4;
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockStats {
    pub locked_pages: u64,
    pub locked_runs: u64,
    pub locks: u64,
    pub unlocks: u64,
    /// Hot pages turned away because the budget (or the run limit) was full.
    pub denied: u64,
}

/// What a tick decided: the caller unlocks and locks these pages (in that order).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TickPlan {
    pub unlock: Vec<u64>,
    pub lock: Vec<u64>,
}

pub struct Lockpage {
    policy: LockPolicy,
    heat: Vec<u8>,
    locked: Vec<u64>,
    /// Hot pages denied since the last tick: only then is a swap worth a scan.
    denied_since_tick: u64,
    pub stats: LockStats,
}

impl Lockpage {
    /// Tracks guest pages [0, `pages`).
    pub fn new(pages: u64, policy: LockPolicy) -> Self {
        Lockpage {
            policy,
            heat: vec![0; pages as usize],
            locked: vec![0; pages.div_ceil(64) as usize],
            denied_since_tick: 0,
            stats: LockStats::default(),
        }
    }

    pub fn policy(&self) -> LockPolicy {
        self.policy
    }

    pub fn is_locked(&self, gfn: u64) -> bool {
        self.locked
            .get((gfn / 64) as usize)
            .is_some_and(|w| w & (1 << (gfn % 64)) != 0)
    }

    fn set_locked(&mut self, gfn: u64, on: bool) {
        let neighbours =
            u64::from(gfn > 0 && self.is_locked(gfn - 1)) + u64::from(self.is_locked(gfn + 1));
        let w = &mut self.locked[(gfn / 64) as usize];
        if on {
            *w |= 1 << (gfn % 64);
            self.stats.locked_pages += 1;
            // One more run, unless it joins one or two (which it then merges).
            self.stats.locked_runs = self.stats.locked_runs + 1 - neighbours;
        } else {
            *w &= !(1 << (gfn % 64));
            self.stats.locked_pages -= 1;
            self.stats.locked_runs = self.stats.locked_runs + neighbours - 1;
        }
    }

    /// Whether locking `gfn` now stays within the budget and the run limit.
    fn room_for(&self, gfn: u64) -> bool {
        if self.stats.locked_pages >= self.policy.budget_pages {
            return false;
        }
        let joins = (gfn > 0 && self.is_locked(gfn - 1)) || self.is_locked(gfn + 1);
        joins || self.stats.locked_runs < self.policy.max_runs
    }

    /// Whether unlocking `gfn` keeps the run limit: splitting a run adds one, so at the limit
    /// a page inside a locked run stays locked (one page, no extra mapping).
    fn can_unlock(&self, gfn: u64) -> bool {
        let splits = gfn > 0 && self.is_locked(gfn - 1) && self.is_locked(gfn + 1);
        !splits || self.stats.locked_runs < self.policy.max_runs
    }

    /// A snooped request touches `gfn`, which had to be faulted back in if `faulted`. Returns
    /// true if the page is to be locked now (the caller pins it; if that fails it calls
    /// `forget`). O(1), no allocation.
    pub fn touch(&mut self, gfn: u64, faulted: bool) -> bool {
        let Some(h) = self.heat.get_mut(gfn as usize) else {
            return false;
        };
        let add = if faulted { 1 + FAULT_BONUS } else { 1 };
        *h = (*h + add).min(HEAT_MAX);
        if *h < self.policy.lock_at || self.is_locked(gfn) {
            return false;
        }
        if !self.room_for(gfn) {
            self.stats.denied += 1;
            self.denied_since_tick += 1;
            return false;
        }
        self.set_locked(gfn, true);
        self.stats.locks += 1;
        true
    }

    /// The caller could not lock `gfn` after all: it is not locked.
    pub fn forget(&mut self, gfn: u64) {
        if self.is_locked(gfn) {
            self.set_locked(gfn, false);
            self.stats.locks -= 1;
        }
    }

    /// Every locked page, in order.
    fn locked_pages(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.stats.locked_pages as usize);
        for (i, &w) in self.locked.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                out.push(i as u64 * 64 + u64::from(w.trailing_zeros()));
                w &= w - 1;
            }
        }
        out
    }

    /// One period has passed: swap hot pages the budget turned away for colder locked ones,
    /// decay every page's heat, and unlock the locked pages that went cold.
    pub fn tick(&mut self) -> TickPlan {
        let mut plan = TickPlan::default();
        if std::mem::take(&mut self.denied_since_tick) > 0 {
            self.swap_in_hotter(&mut plan);
        }
        // Halving, eight pages at a time.
        let mut chunks = self.heat.chunks_exact_mut(8);
        for c in &mut chunks {
            let v = u64::from_ne_bytes((&*c).try_into().expect("8 bytes"));
            c.copy_from_slice(&((v >> 1) & 0x7f7f_7f7f_7f7f_7f7f).to_ne_bytes());
        }
        chunks.into_remainder().iter_mut().for_each(|h| *h >>= 1);
        for gfn in self.locked_pages() {
            if self.heat[gfn as usize] == 0 && self.can_unlock(gfn) {
                self.set_locked(gfn, false);
                self.stats.unlocks += 1;
                plan.unlock.push(gfn);
            }
        }
        plan
    }

    /// Hot unlocked pages displace colder locked ones, the hottest against the coldest, while
    /// they are strictly hotter (equal heat stays put: no churn between equals).
    fn swap_in_hotter(&mut self, plan: &mut TickPlan) {
        let lock_at = self.policy.lock_at;
        let mut hot: Vec<u64> = (0..self.heat.len() as u64)
            .filter(|&g| self.heat[g as usize] >= lock_at && !self.is_locked(g))
            .collect();
        hot.sort_by_key(|&g| std::cmp::Reverse(self.heat[g as usize]));
        let mut cold = self.locked_pages();
        cold.sort_by_key(|&g| self.heat[g as usize]);
        let mut cold = cold.into_iter().peekable();
        for g in hot {
            if !self.room_for(g) {
                while cold.peek().is_some_and(|&c| !self.can_unlock(c)) {
                    cold.next();
                }
                match cold.peek() {
                    Some(&c) if self.heat[c as usize] < self.heat[g as usize] => {
                        self.set_locked(c, false);
                        self.stats.unlocks += 1;
                        plan.unlock.push(c);
                        cold.next();
                    }
                    _ => break,
                }
                if !self.room_for(g) {
                    continue;
                }
            }
            self.set_locked(g, true);
            self.stats.locks += 1;
            plan.lock.push(g);
        }
    }

    /// Unlocks everything (the device goes away); returns the pages to unpin.
    pub fn unlock_all(&mut self) -> Vec<u64> {
        let pages = self.locked_pages();
        for &g in &pages {
            self.set_locked(g, false);
        }
        self.stats.unlocks += pages.len() as u64;
        pages
    }

    pub fn heat(&self, gfn: u64) -> u8 {
        self.heat.get(gfn as usize).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn lp(budget: u64) -> Lockpage {
        Lockpage::new(
            1000,
            LockPolicy {
                budget_pages: budget,
                lock_at: 4,
                max_runs: 1000,
            },
        )
    }

    fn touch_n(l: &mut Lockpage, gfn: u64, n: u32) -> u32 {
        (0..n).map(|_| u32::from(l.touch(gfn, false))).sum()
    }

    #[test]
    fn a_page_is_locked_once_hot_and_unlocked_once_cold() {
        let mut l = lp(10);
        assert_eq!(touch_n(&mut l, 7, 3), 0, "three touches: not hot yet");
        assert!(l.touch(7, false), "the fourth locks it");
        assert_eq!(touch_n(&mut l, 7, 100), 0, "locked once");
        assert!(l.is_locked(7));
        assert_eq!(l.heat(7), HEAT_MAX);
        // Kept hot by touches between ticks: stays locked.
        for _ in 0..5 {
            assert!(l.tick().unlock.is_empty());
            touch_n(&mut l, 7, 1);
        }
        // Untouched: 1 or 2 after the touches, then 0.
        let mut ticks = 0;
        while l.is_locked(7) {
            let plan = l.tick();
            ticks += 1;
            assert!(ticks < 10, "never unlocked");
            if !l.is_locked(7) {
                assert_eq!(plan.unlock, vec![7]);
            }
        }
        assert_eq!(
            (l.stats.locks, l.stats.unlocks, l.stats.locked_pages),
            (1, 1, 0)
        );
        assert_eq!(l.stats.locked_runs, 0);
    }

    /// Used once a second, a page is never hot by count; faulted back in on each use (reclaim
    /// keeps taking it), it is locked at the second fault-in.
    #[test]
    fn pages_reclaim_keeps_taking_are_locked_sooner() {
        let mut l = lp(10);
        for _ in 0..10 {
            assert!(!l.touch(1, false));
            l.tick();
        }
        assert!(!l.touch(2, true), "one fault-in: not yet");
        l.tick();
        assert!(l.touch(2, true), "a second, a tick later");
    }

    #[test]
    fn the_budget_bounds_locked_pages_and_hotter_pages_displace_the_coldest() {
        let mut l = lp(3);
        for g in [1, 2, 3] {
            touch_n(&mut l, g, 4);
        }
        assert_eq!(l.stats.locked_pages, 3);
        // Page 3 goes lukewarm, page 9 gets very hot: denied now, swapped in at the tick.
        touch_n(&mut l, 1, 20);
        touch_n(&mut l, 2, 20);
        assert_eq!(touch_n(&mut l, 9, 30), 0, "over budget");
        assert!(l.stats.denied > 0);
        let plan = l.tick();
        assert_eq!(plan.unlock, vec![3], "the coldest goes first");
        assert_eq!(plan.lock, vec![9]);
        assert!(l.is_locked(9) && !l.is_locked(3));
        assert_eq!(l.stats.locked_pages, 3, "never past the budget");
        // Equally hot pages do not churn.
        let mut l = lp(1);
        touch_n(&mut l, 1, 8);
        touch_n(&mut l, 2, 8);
        let plan = l.tick();
        assert!(plan.lock.is_empty() && plan.unlock.is_empty(), "{plan:?}");
    }

    #[test]
    fn a_moving_hot_set_moves_the_locks() {
        let mut l = lp(100);
        let first: Vec<u64> = (100..150).collect();
        let second: Vec<u64> = (500..550).collect();
        for _ in 0..3 {
            first.iter().for_each(|&g| {
                touch_n(&mut l, g, 5);
            });
            l.tick();
        }
        assert!(first.iter().all(|&g| l.is_locked(g)));
        assert_eq!(
            l.stats.locked_runs, 1,
            "contiguous locked pages are one run"
        );
        let mut unlocked = BTreeSet::new();
        for _ in 0..12 {
            second.iter().for_each(|&g| {
                touch_n(&mut l, g, 5);
            });
            unlocked.extend(l.tick().unlock);
        }
        assert_eq!(unlocked, first.iter().copied().collect());
        assert!(second.iter().all(|&g| l.is_locked(g)));
        assert_eq!(l.stats.locked_pages, 50);
    }

    #[test]
    fn scattered_locks_stop_at_the_run_limit_but_joining_pages_still_lock() {
        let mut l = Lockpage::new(
            1000,
            LockPolicy {
                budget_pages: 1000,
                lock_at: 1,
                max_runs: 3,
            },
        );
        for g in [10, 20, 30, 40] {
            l.touch(g, false);
        }
        assert_eq!((l.stats.locked_pages, l.stats.locked_runs), (3, 3));
        assert!(!l.is_locked(40), "a fourth run");
        assert!(l.touch(11, false), "extends a run");
        assert!(l.touch(21, false) && l.touch(19, false));
        assert_eq!((l.stats.locked_pages, l.stats.locked_runs), (6, 3));
        // Filling the gap between two runs merges them.
        for g in 12..19 {
            l.touch(g, false);
        }
        assert_eq!(l.stats.locked_runs, 2);
        let all = l.unlock_all();
        assert_eq!(all.len(), 13);
        assert_eq!((l.stats.locked_pages, l.stats.locked_runs), (0, 0));
    }

    /// Against a model: random touches and ticks never exceed the budget or the run limit, the
    /// run count is the true number of runs, and the plans account for every change.
    #[test]
    fn random_touches_keep_the_invariants() {
        let mut l = Lockpage::new(
            300,
            LockPolicy {
                budget_pages: 40,
                lock_at: 3,
                max_runs: 12,
            },
        );
        let mut model: BTreeSet<u64> = BTreeSet::new();
        let mut x: u64 = 12345;
        for step in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if step % 500 == 499 {
                let plan = l.tick();
                for g in plan.unlock {
                    assert!(model.remove(&g));
                }
                for g in plan.lock {
                    assert!(model.insert(g));
                }
            } else {
                // Hot spots that move with the step.
                let g = (x % 60 + (step / 4000) * 50) % 300;
                if l.touch(g, false) {
                    assert!(model.insert(g));
                }
            }
            assert_eq!(model.len() as u64, l.stats.locked_pages);
            assert!(l.stats.locked_pages <= 40);
            let runs = model
                .iter()
                .filter(|&&g| g == 0 || !model.contains(&(g - 1)))
                .count() as u64;
            assert_eq!(runs, l.stats.locked_runs);
            assert!(runs <= 12);
        }
        assert!(l.stats.unlocks > 0 && l.stats.denied > 0);
    }
}
