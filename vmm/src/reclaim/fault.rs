//! The userfaultfd fault service: a MISSING fault restores a reclaimed page from the store or
//! zero-fills a never-used one; a MINOR fault marks a sampled page accessed and maps it back.

use super::*;

impl Reclaimer {
    pub(super) fn fault_loop(&self) {
        let mut buf = Box::new([0u8; PAGE_SIZE]);
        while !self.stop.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                continue;
            }
            loop {
                let ev = match self.uffd.read_event() {
                    Ok(Some(e)) => e,
                    Ok(None) => break,
                    Err(e) => {
                        warn!("userfaultfd read: {e}");
                        break;
                    }
                };
                if let Event::Pagefault { kind, addr, .. } = ev {
                    self.handle_fault(kind, addr as u64, &mut buf);
                }
            }
        }
    }

    pub(super) fn handle_fault(&self, kind: FaultKind, addr: u64, buf: &mut [u8; PAGE_SIZE]) {
        let Some(page) = self.page_of_host(addr) else {
            return warn!("userfaultfd: fault outside guest RAM at {addr:#x}");
        };
        let host = (addr & !(PAGE - 1)) as *mut libc::c_void;
        self.wait_not_busy(page);
        let slot = &self.pages[page as usize];
        match kind {
            FaultKind::Minor => {
                self.stats.minor_faults.fetch_add(1, Ordering::Relaxed);
                if slot.load(Ordering::Acquire) & RECLAIMED != 0 {
                    // Reclaimed while this fault waited: retried, it becomes a MISSING fault.
                    let _ = self.uffd.wake(host, PAGE_SIZE);
                    return;
                }
                slot.fetch_or(ACCESSED, Ordering::AcqRel);
                slot.fetch_and(!SAMPLED, Ordering::AcqRel);
                if let Err(e) = self.uffd.r#continue(host, PAGE_SIZE, true) {
                    debug!("UFFDIO_CONTINUE at {addr:#x}: {e}");
                    let _ = self.uffd.wake(host, PAGE_SIZE);
                }
            }
            _ => {
                // Faulting threads are woken only after the page lock is released, so nothing
                // they do next can find the page busy.
                let st = self.lock_page(page);
                let mut wake = (host, PAGE_SIZE);
                if st & RECLAIMED != 0 {
                    self.restore(page, host, buf);
                    self.stats.cpu_refaults.fetch_add(1, Ordering::Relaxed);
                } else if let Some(block) = self.zero_fill_block(page) {
                    wake = block;
                } else {
                    // SAFETY: `host` is the faulting page of registered guest RAM. If a snooping
                    // device's fault-in got there first, the kernel refuses (EEXIST) and the
                    // wake lets the access retry.
                    if let Err(e) = unsafe { self.uffd.zeropage(host, PAGE_SIZE, false) } {
                        debug!("UFFDIO_ZEROPAGE at {addr:#x}: {e}");
                    }
                    self.stats.zero_fills.fetch_add(1, Ordering::Relaxed);
                }
                self.unlock_page(page);
                let _ = self.uffd.wake(wake.0, wake.1);
            }
        }
    }

    /// Copies reclaimed `page` back from the store into guest RAM at `host` (this process's
    /// mapping of it). The caller holds the page lock, and wakes threads faulting on the page
    /// once it released it.
    pub(super) fn restore(&self, page: u64, host: *mut libc::c_void, buf: &mut [u8; PAGE_SIZE]) {
        let t0 = Instant::now();
        if self.cfg.fault_latency_us > 0 {
            std::thread::sleep(Duration::from_micros(self.cfg.fault_latency_us));
        }
        if let Err(e) = self.store.take(page, buf) {
            // Nothing sensible to give the guest: the page is lost. Say so loudly
            // (docs/security.md: what the guest sees, and why).
            self.stats.restore_errors.fetch_add(1, Ordering::Relaxed);
            log::error!(
                "Restoring guest page {page}: {}; the guest gets a zero page",
                vio::error_chain(&e)
            );
            self.store.forget(page);
            buf.fill(0);
        }
        // SAFETY: `buf` is a page of our own memory; `host` is a page of the registered guest
        // RAM mapping, which UFFDIO_COPY fills atomically (waking any thread faulting on it).
        let r = unsafe {
            self.uffd
                .copy(buf.as_ptr() as *const libc::c_void, host, PAGE_SIZE, false)
        };
        if let Err(e) = r {
            debug!("UFFDIO_COPY at {host:?}: {e}");
        }
        let slot = &self.pages[page as usize];
        slot.fetch_and(!(RECLAIMED | SAMPLED), Ordering::AcqRel);
        slot.fetch_or(ACCESSED, Ordering::AcqRel);
        self.stats.reclaimed_pages.fetch_sub(1, Ordering::Relaxed);
        let ns = t0.elapsed().as_nanos() as u64;
        self.stats.restore_ns_total.fetch_add(ns, Ordering::Relaxed);
        self.stats.restore_hist.record(ns);
    }

    /// A guest's first touches of never-used RAM come in streams: zero-fill the aligned 64 KiB
    /// block around `page` (which the caller holds locked) at once. Only when no page of it is
    /// reclaimed or busy, and only while
    /// holding the reclaim-pass lock so no reclaim can punch a page of the block meanwhile (a
    /// page zero-filled after its content went to the store would be lost). The kernel refuses
    /// (EEXIST) if any page of the block is present; the caller then fills just its page.
    /// Returns the block filled, for the caller to wake.
    pub(super) fn zero_fill_block(&self, page: u64) -> Option<(*mut libc::c_void, usize)> {
        const BLOCK: u64 = 16;
        let Ok(_g) = self.pass.try_lock() else {
            return None;
        };
        let start = page & !(BLOCK - 1);
        let end = start + BLOCK;
        if end as usize > self.pages.len()
            || (start..end)
                .any(|p| self.state(p) & RECLAIMED != 0 || (p != page && self.state(p) & BUSY != 0))
        {
            return None;
        }
        let (Some(h0), Some(h1)) = (self.host_addr(start), self.host_addr(end - 1)) else {
            return None;
        };
        if h1 != h0 + (BLOCK - 1) * PAGE {
            return None; // crosses a range boundary
        }
        // SAFETY: [h0, h0 + 64 KiB) is registered guest RAM holding no reclaimed or busy page;
        // UFFDIO_ZEROPAGE maps zero pages only where nothing is present.
        match unsafe {
            self.uffd
                .zeropage(h0 as *mut libc::c_void, (BLOCK * PAGE) as usize, false)
        } {
            Ok(_) => {
                self.stats.zero_fills.fetch_add(BLOCK, Ordering::Relaxed);
                Some((h0 as *mut libc::c_void, (BLOCK * PAGE) as usize))
            }
            Err(_) => None,
        }
    }

    pub(super) fn wait_not_busy(&self, page: u64) {
        while self.state(page) & BUSY != 0 {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}
