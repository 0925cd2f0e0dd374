//! Pages pinned for requests in flight on a snooping (`vio`) device: the snoop engine pins each
//! page of a request before the device may see it (`Residency::pin`, which also brings the page
//! back if it was reclaimed) and unpins it on completion. Pins are per page and short-lived;
//! reclaim skips a pinned page, and DMA-evicts an unpinned one from every snooping device's
//! window before it takes the page's contents.

use super::*;

impl Reclaimer {
    /// A snooping device's DMA window: reclaim DMA-unmaps pages from it before taking them.
    pub fn add_window(&self, w: &Arc<DmaWindow>) {
        let mut windows = self.windows.lock().unwrap();
        windows.retain(|w| w.strong_count() > 0);
        windows.push(Arc::downgrade(w));
    }

    pub(super) fn inflight_pinned(&self, page: u64) -> bool {
        self.inflight_pins[page as usize].load(Ordering::Relaxed) != 0
    }

    pub(super) fn locked(&self, page: u64) -> bool {
        self.locks[page as usize].load(Ordering::Relaxed) != 0
    }
}

impl Residency for Reclaimer {
    fn pin(&self, gfn: u64) -> Result<bool, PageError> {
        let page = gfn
            .checked_mul(PAGE)
            .and_then(|gpa| self.page_of_guest(gpa))
            .ok_or(PageError::OutsideRam(gfn))?;
        // Everything that can fail is looked up before the page is pinned and locked, so an
        // error leaves neither behind.
        let host = self.host_addr(page).ok_or(PageError::OutsideRam(gfn))? as *mut libc::c_void;
        let pins = &self.inflight_pins[page as usize];
        if pins.fetch_add(1, Ordering::SeqCst) == u16::MAX {
            pins.fetch_sub(1, Ordering::SeqCst);
            return Err(PageError::TooManyPins(gfn));
        }
        // Dekker with `lock_run`: we publish the pin, then look at the page; it marks the page
        // busy, then looks at the pins. Either it saw our pin and backs off, or we see its busy
        // mark here and wait for the page to be reclaimed, then bring it back. A page neither
        // busy nor reclaimed is resident and stays so: only the access mark is left to set.
        let slot = &self.pages[page as usize];
        if slot.load(Ordering::SeqCst) & (BUSY | RECLAIMED) == 0 {
            slot.fetch_or(ACCESSED, Ordering::AcqRel);
            return Ok(false);
        }
        let st = self.lock_page(page);
        let restored = st & RECLAIMED != 0;
        if restored {
            let mut buf = Box::new([0u8; PAGE_SIZE]);
            self.restore(page, host, &mut buf);
            self.stats.dma_faultins.fetch_add(1, Ordering::Relaxed);
        }
        // A device access is an access: the page is not cold.
        self.pages[page as usize].fetch_or(ACCESSED, Ordering::AcqRel);
        self.unlock_page(page);
        if restored {
            // A vCPU may be faulting on the page too; it finds it present now.
            let _ = self.uffd.wake(host, PAGE_SIZE);
        }
        Ok(restored)
    }

    fn pin_range(&self, gfn: u64, n: u64) -> Result<u64, PageError> {
        self.pin_run(gfn, n)
    }

    /// The pages are pinned, so none is being reclaimed and every reclaimed one has been
    /// restored: the holes left are pages never written. They are filled with zero pages
    /// through the userfaultfd, which never replaces a page that is there (a vCPU's racing
    /// first touch wins), and leaves them as ordinary data pages that reclaim can take again.
    fn populate(&self, gfn: u64, n: u64) -> Result<(), PageError> {
        let first = gfn
            .checked_mul(PAGE)
            .and_then(|gpa| self.page_of_guest(gpa))
            .ok_or(PageError::OutsideRam(gfn))?;
        let end = first + n;
        let mut at = first;
        for (s, e) in self.resident_ranges() {
            for hole in [(at, s.min(end))].into_iter().filter(|&(a, b)| a < b) {
                self.zero_fill(hole.0, hole.1 - hole.0);
            }
            at = at.max(e);
            if at >= end {
                return Ok(());
            }
        }
        if at < end {
            self.zero_fill(at, end - at);
        }
        Ok(())
    }

    /// A lock is a pin that the reports call locked. Counted saturating: two devices locking one
    /// page past 255 times is not a case, and the pin, not this count, keeps the page.
    fn lock(&self, gfn: u64) -> Result<bool, PageError> {
        let restored = self.pin(gfn)?;
        if let Some(page) = self.page_of_guest(gfn * PAGE) {
            let _ =
                self.locks[page as usize]
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_add(1));
        }
        Ok(restored)
    }

    fn unlock(&self, gfn: u64) {
        if let Some(page) = self.page_of_guest(gfn * PAGE) {
            let _ =
                self.locks[page as usize]
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(1));
        }
        self.unpin(gfn);
    }

    fn unpin(&self, gfn: u64) {
        if let Some(page) = self.page_of_guest(gfn * PAGE) {
            let pins = &self.inflight_pins[page as usize];
            if pins.fetch_sub(1, Ordering::SeqCst) == 0 {
                pins.fetch_add(1, Ordering::SeqCst);
                warn!("Unpin of unpinned guest page {gfn:#x}");
            }
        }
    }
}
