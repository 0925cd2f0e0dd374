//! Cold-page detection: sampling drops the CPU mappings of resident pages so that the next
//! access is seen (as a MINOR fault), and ages the pages no access reached.

use super::*;

impl Reclaimer {
    /// Drops the mappings of every resident page so the next CPU access is observed. Pinned pages
    /// are sampled too: a device's own mapping is untouched, and the unsafe path needs to know
    /// which pinned pages are cold.
    pub fn sample(&self) {
        let Some(_g) = self.pass_guard() else {
            return;
        };
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

    pub(super) fn drop_mappings(&self, start: u64, end: u64) {
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
}
