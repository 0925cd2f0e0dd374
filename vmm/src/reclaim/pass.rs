//! Reclaim passes: choose pages, hold them, DMA-evict them from snooping devices, then move
//! their contents to the store and punch them out of the memfd, in contiguous runs.

use super::*;

impl Reclaimer {
    /// Reclaims up to `bytes` of the coldest reclaimable pages now.
    pub fn reclaim(&self, bytes: u64, unsafe_unmap_dma: bool) -> ReclaimReport {
        self.reclaim_among(bytes, unsafe_unmap_dma, false)
    }

    /// Reclaims up to `bytes` of the pages some `vio` device has DMA-mapped and is not using
    /// (oldest first, whatever their age): each comes back as a snoop fault-in the next time
    /// the device needs it. This is how the bench makes device page faults at a chosen rate.
    pub fn reclaim_dma_mapped(&self, bytes: u64) -> ReclaimReport {
        self.reclaim_among(bytes, false, true)
    }

    fn reclaim_among(&self, bytes: u64, unsafe_unmap_dma: bool, dma_only: bool) -> ReclaimReport {
        let Some(_g) = self.pass_guard() else {
            return ReclaimReport {
                skipped_reason: Some("reclaim is frozen for a live upgrade".into()),
                ..Default::default()
            };
        };
        self.stats.reclaim_runs.fetch_add(1, Ordering::Relaxed);
        let want = bytes.div_ceil(PAGE);
        let mut report = ReclaimReport::default();
        // Oldest first. Once sampling has aged pages, only cold ones (a whole round untouched)
        // qualify: "up to N bytes of the coldest". Without sampling there is no such knowledge and
        // any page may go, coldest first by address.
        let informed = self.stats.sample_runs.load(Ordering::Relaxed) >= 2 && !dma_only;
        let windows: Vec<Arc<DmaWindow>> = if dma_only {
            self.windows
                .lock()
                .unwrap()
                .iter()
                .filter_map(std::sync::Weak::upgrade)
                .collect()
        } else {
            Vec::new()
        };
        let dma_mapped = |p: u64| {
            self.guest_addr(p)
                .is_some_and(|a| windows.iter().any(|w| w.is_mapped(a / PAGE)))
        };
        let mut by_age: Vec<Vec<u64>> = vec![Vec::new(); 256];
        for (s, e) in self.resident_ranges() {
            for p in s..e {
                let a = self.age(p);
                if (a >= 1 || !informed) && (!dma_only || dma_mapped(p)) {
                    by_age[a as usize].push(p);
                }
            }
        }
        let mut chosen = Vec::new();
        for p in by_age.into_iter().rev().flatten() {
            if chosen.len() as u64 >= want {
                break;
            }
            if self.state(p) & (RECLAIMED | BUSY) != 0 {
                continue;
            }
            if self.inflight_pinned(p) {
                if self.locked(p) {
                    report.skipped_locked_bytes += PAGE;
                }
                continue;
            }
            if let Some(id) = self.passthrough_owner(p) {
                if !unsafe_unmap_dma {
                    report.skipped_pinned_bytes += PAGE;
                    report.skipped_reason = Some(format!(
                        "DMA-mapped to passthrough device {id} (pinned: devices cannot fault)"
                    ));
                    continue;
                }
                self.revoke_passthrough(p);
            }
            chosen.push(p);
        }
        let (done, errors, error) = self.reclaim_pages(chosen);
        report.reclaimed_bytes = done * PAGE;
        report.errors = errors;
        report.error = error.map(|e| vio::error_chain(&e));
        report
    }

    /// Reclaims `pages` in contiguous runs (one madvise, one pread and one hole punch per
    /// run). A store failure (full, or an I/O error) ends the pass: the pages not yet saved
    /// stay resident, and a store that failed once is likely to fail again. Returns (pages
    /// reclaimed, errors, the store failure that ended the pass).
    pub(super) fn reclaim_pages(&self, mut pages: Vec<u64>) -> (u64, u64, Option<StoreError>) {
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
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "Reclaim stopped at pages {start}..{} (kept in RAM): {}",
                        start + n,
                        vio::error_chain(&e)
                    );
                    unlock(&held[k + 1..]);
                    return (done, errors, Some(e));
                }
            }
        }
        (done, errors, None)
    }

    /// Holds the first pages of [start, start+n) for reclaim (busy, and not pinned for a request
    /// in flight: see `Residency::pin` in `inflight`); stops at the first page another pass or
    /// a pin holds. Returns how many.
    pub(super) fn lock_run(&self, start: u64, n: u64) -> u64 {
        let mut len = 0;
        while len < n
            && self.pages[(start + len) as usize].fetch_or(BUSY, Ordering::SeqCst) & BUSY == 0
        {
            // Pinned after it was chosen: a snooping device is about to use it.
            if self.inflight_pins[(start + len) as usize].load(Ordering::SeqCst) != 0 {
                self.unlock_page(start + len);
                break;
            }
            len += 1;
        }
        len
    }

    /// Reclaims the held run [start, start+len), already DMA-evicted. A store failure part-way
    /// through keeps the rest resident. Returns the pages reclaimed and the error, if any.
    pub(super) fn finish_run(&self, start: u64, len: u64) -> (u64, Option<StoreError>) {
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
    pub(super) fn evict(&self, held: &[(u64, u64)]) -> Result<(), PageError> {
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
}
