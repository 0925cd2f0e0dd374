//! The background policy: sample every `idle_ms`, and reclaim cold pages until `target_pct` of
//! guest RAM is reclaimed.

use super::*;

impl Reclaimer {
    pub(super) fn policy_loop(&self) {
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

    pub(super) fn reclaim_cold(&self, bytes: u64) {
        let Some(_g) = self.pass_guard() else {
            return;
        };
        self.stats.reclaim_runs.fetch_add(1, Ordering::Relaxed);
        let want = bytes.div_ceil(PAGE) as usize;
        let cold: Vec<u64> = self
            .resident_ranges()
            .into_iter()
            .flat_map(|(s, e)| s..e)
            .filter(|&p| {
                self.age(p) >= 1
                    && self.state(p) & (RECLAIMED | BUSY) == 0
                    && !self.inflight_pinned(p)
                    && self.passthrough_owner(p).is_none()
            })
            .take(want)
            .collect();
        self.reclaim_pages(cold);
    }
}
