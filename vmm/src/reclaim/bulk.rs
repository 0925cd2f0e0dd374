//! Bringing guest RAM in by the range (a `vio` device entering passthrough pins all of it):
//! reclaimed pages come back from the store in batches of up to 1 MiB, one store read per run of
//! them that lies back to back in the store file and one UFFDIO_COPY and one wake per batch
//! instead of one per page, and pages never written are filled with zero pages in runs.

use super::*;

/// Reclaimed pages restored with one copy at most (1 MiB).
const BATCH: u64 = 256;

/// Locked, reclaimed pages waiting for their contents: [start, start + len) memfd pages,
/// contiguous in the mapping from `host`.
struct Pending {
    start: u64,
    host: u64,
    len: u64,
}

impl Reclaimer {
    /// `Residency::pin_range`: every page is pinned and locked in turn, as `pin` does (the same
    /// handshake with reclaim); the reclaimed ones stay locked until their batch is restored.
    pub(super) fn pin_run(&self, gfn: u64, n: u64) -> Result<u64, PageError> {
        if n == 0 {
            return Ok(0);
        }
        let first = gfn
            .checked_mul(PAGE)
            .and_then(|gpa| self.page_of_guest(gpa));
        let contiguous = first.and_then(|f| {
            let (h0, h1) = (self.host_addr(f)?, self.host_addr(f + n - 1)?);
            let last = self.page_of_guest((gfn + n - 1) * PAGE)?;
            (last == f + n - 1 && h1 == h0 + (n - 1) * PAGE).then_some((f, h0))
        });
        // A slow store is modelled per page (`fault_latency_us`), and a run across RAM ranges
        // has no single mapping: page by page.
        let Some((first, host0)) = contiguous.filter(|_| self.cfg.fault_latency_us == 0) else {
            return vio::pages::pin_each(self, gfn, n);
        };
        let mut buf = vec![0u8; (BATCH * PAGE) as usize];
        let mut pending: Option<Pending> = None;
        let mut faulted = 0;
        for i in 0..n {
            let page = first + i;
            let pins = &self.inflight_pins[page as usize];
            if pins.fetch_add(1, Ordering::SeqCst) == u16::MAX {
                pins.fetch_sub(1, Ordering::SeqCst);
                if let Some(p) = pending.take() {
                    self.restore_batch(p, &mut buf);
                }
                (gfn..gfn + i).for_each(|q| self.unpin(q));
                return Err(PageError::TooManyPins(gfn + i));
            }
            let st = self.lock_page(page);
            if st & RECLAIMED == 0 {
                if let Some(p) = pending.take() {
                    self.restore_batch(p, &mut buf);
                }
                self.pages[page as usize].fetch_or(ACCESSED, Ordering::AcqRel);
                self.unlock_page(page);
                continue;
            }
            faulted += 1;
            let p = pending.get_or_insert(Pending {
                start: page,
                host: host0 + i * PAGE,
                len: 0,
            });
            p.len += 1;
            if p.len == BATCH {
                let p = pending.take().unwrap();
                self.restore_batch(p, &mut buf);
            }
        }
        if let Some(p) = pending.take() {
            self.restore_batch(p, &mut buf);
        }
        Ok(faulted)
    }

    /// Installs the contents gathered in `buf` for the locked pages of `p`, then unlocks them
    /// and wakes anyone faulting on them.
    fn restore_batch(&self, p: Pending, buf: &mut [u8]) {
        let t0 = Instant::now();
        let bytes = (p.len * PAGE) as usize;
        self.store.take_run(p.start, &mut buf[..bytes], |page, e| {
            self.stats.restore_errors.fetch_add(1, Ordering::Relaxed);
            log::error!(
                "Restoring guest page {page}: {}; the guest gets a zero page",
                vio::error_chain(&e)
            );
            self.store.forget(page);
        });
        // SAFETY: the pages are ours to fill: reclaimed (absent from the memfd and every
        // mapping) and locked, so no one else installs them; `buf` holds `bytes` bytes.
        let copied = unsafe {
            self.uffd.copy(
                buf.as_ptr() as *const libc::c_void,
                p.host as *mut libc::c_void,
                bytes,
                false,
            )
        };
        if let Err(e) = copied {
            // Page by page then; a page that is somehow there already is left as it is.
            debug!("UFFDIO_COPY of {} pages at {:#x}: {e}", p.len, p.host);
            for i in 0..p.len {
                let at = (i * PAGE) as usize;
                // SAFETY: as above, one page of the run.
                let _ = unsafe {
                    self.uffd.copy(
                        buf[at..].as_ptr() as *const libc::c_void,
                        (p.host + i * PAGE) as *mut libc::c_void,
                        PAGE_SIZE,
                        false,
                    )
                };
            }
        }
        for page in p.start..p.start + p.len {
            let slot = &self.pages[page as usize];
            slot.fetch_and(!(RECLAIMED | SAMPLED), Ordering::AcqRel);
            slot.fetch_or(ACCESSED, Ordering::AcqRel);
            self.unlock_page(page);
        }
        self.stats
            .reclaimed_pages
            .fetch_sub(p.len, Ordering::Relaxed);
        self.stats.dma_faultins.fetch_add(p.len, Ordering::Relaxed);
        let ns = t0.elapsed().as_nanos() as u64;
        self.stats.restore_ns_total.fetch_add(ns, Ordering::Relaxed);
        self.stats.restore_hist.record(ns / p.len);
        let _ = self.uffd.wake(p.host as *mut libc::c_void, bytes);
    }

    /// Zero-fills the hole [page, page+n) (memfd pages, one RAM range); pages that appeared
    /// meanwhile are left alone.
    pub(super) fn zero_fill(&self, page: u64, n: u64) {
        if let (Some(h0), Some(h1)) = (self.host_addr(page), self.host_addr(page + n - 1)) {
            if h1 == h0 + (n - 1) * PAGE {
                // SAFETY: as below, for a run of pages that is contiguous in our mapping.
                let r = unsafe {
                    self.uffd
                        .zeropage(h0 as *mut libc::c_void, (n * PAGE) as usize, true)
                };
                if r.is_ok() {
                    self.stats.zero_fills.fetch_add(n, Ordering::Relaxed);
                    return;
                }
            }
        }
        // A page appeared in the run (or it spans two RAM ranges): page by page.
        for p in page..page + n {
            let Some(host) = self.host_addr(p) else {
                continue;
            };
            // SAFETY: a page of guest RAM registered with our userfaultfd; ZEROPAGE only fills
            // a missing page (EEXIST otherwise) and wakes any thread faulting on it.
            if unsafe {
                self.uffd
                    .zeropage(host as *mut libc::c_void, PAGE_SIZE, true)
            }
            .is_ok()
            {
                self.stats.zero_fills.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
