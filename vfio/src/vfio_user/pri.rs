//! The host side of page requests (the PRI baseline, `vio::pri`): for a passthrough device that
//! can raise them, guest RAM is DMA-mapped without pins, so reclaim may unmap any of it; when
//! the device stops on an unmapped page it posts a request, and this handler brings the page
//! back, maps it and answers. As an IOMMU driver's page-request handler does for ATS/PRI
//! hardware.

use super::client::{ClientError, VfioUserClient};
use super::protocol::*;
use log::warn;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use thiserror::Error;
use vio::pri;
use vio::{DmaWindow, LatencyHistogram, LogLimiter};
use vmm_sys_util::eventfd::EventFd;

static PRI_LOG: LogLimiter = LogLimiter::new(10, 10_000);

#[derive(Debug, Error)]
pub enum PriError {
    #[error("The device offers no page requests (region {0}, interrupt {1})")]
    NotOffered(u32, u32),
    #[error("vfio-user")]
    Client(#[from] ClientError),
    #[error("Failed to start the page-request handler")]
    Thread(#[source] std::io::Error),
}

#[derive(Default)]
pub struct PriStats {
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    /// Requests for pages outside guest RAM (also failures).
    pub outside_ram: AtomicU64,
    pub resolve_ns: LatencyHistogram,
}

/// Resolves a device's page requests on a thread of its own.
pub struct PriHandler {
    pub stats: Arc<PriStats>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl PriHandler {
    /// Checks that the device offers page requests, hands it the interrupt eventfd and starts
    /// resolving through `window` (which maps guest RAM for the device; reclaim unmaps from it).
    pub fn start(
        id: &str,
        client: Arc<VfioUserClient>,
        window: Arc<DmaWindow>,
    ) -> Result<Self, PriError> {
        let offered = client
            .region_info(pri::REGION_INDEX)
            .is_ok_and(|r| r.size >= pri::REGION_SIZE)
            && client
                .irq_info(pri::IRQ_INDEX)
                .is_ok_and(|i| i.count == 1 && i.flags & IRQ_INFO_EVENTFD != 0);
        if !offered {
            return Err(PriError::NotOffered(pri::REGION_INDEX, pri::IRQ_INDEX));
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(PriError::Thread)?;
        client.set_irqs(
            pri::IRQ_INDEX,
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            &[irq.as_raw_fd()],
        )?;
        let stats = Arc::new(PriStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(PriError::Thread)?);
        let worker = Resolver {
            client,
            window,
            stats: stats.clone(),
        };
        let (stop_t, wake_t) = (stop.clone(), wake.clone());
        let thread = std::thread::Builder::new()
            .name(format!("{id}-pri"))
            .spawn(move || {
                virtio_devices::seccomp::narrow("pri");
                worker.run(&irq, &wake_t, &stop_t)
            })
            .map_err(PriError::Thread)?;
        Ok(PriHandler {
            stats,
            stop,
            wake,
            thread: Some(thread),
        })
    }

    pub fn counters(&self) -> [(&'static str, u64); 5] {
        let s = &self.stats;
        [
            ("pri_host_requests", s.requests.load(Ordering::Relaxed)),
            ("pri_host_failures", s.failures.load(Ordering::Relaxed)),
            ("pri_outside_ram", s.outside_ram.load(Ordering::Relaxed)),
            ("pri_resolve_ns_p50", s.resolve_ns.percentile(50)),
            ("pri_resolve_ns_p99", s.resolve_ns.percentile(99)),
        ]
    }
}

impl Drop for PriHandler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Resolver {
    client: Arc<VfioUserClient>,
    window: Arc<DmaWindow>,
    stats: Arc<PriStats>,
}

impl Resolver {
    fn run(&self, irq: &EventFd, wake: &EventFd, stop: &AtomicBool) {
        let mut fds = [irq.as_raw_fd(), wake.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        while !stop.load(Ordering::Acquire) {
            // SAFETY: two valid pollfds for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                continue; // EINTR
            }
            let _ = wake.read();
            if irq.read().is_err() {
                continue;
            }
            if let Err(e) = self.serve() {
                if PRI_LOG.hit() {
                    warn!("Page requests: {e}");
                }
                if self.client.broken() {
                    return;
                }
            }
        }
    }

    /// Answers every request in the device's table.
    fn serve(&self) -> Result<(), ClientError> {
        let mut table = vec![0u8; pri::REG_RESPONSE as usize];
        self.client
            .region_read(pri::REGION_INDEX, pri::REG_TABLE, &mut table)?;
        for r in pri::decode_table(&table) {
            let t0 = Instant::now();
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let gfn = r.iova / vio::spec::PAGE_SIZE;
            // Brought back and mapped, not pinned: reclaim may take it again, and the device
            // will ask again.
            let ok = match self.window.acquire(gfn) {
                Ok(_) => {
                    self.window.release(gfn);
                    true
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    if matches!(e, vio::PageError::OutsideRam(_)) {
                        self.stats.outside_ram.fetch_add(1, Ordering::Relaxed);
                    }
                    if PRI_LOG.hit() {
                        warn!(
                            "Page request for IOVA {:#x} failed: {}",
                            r.iova,
                            vio::error_chain(&e)
                        );
                    }
                    false
                }
            };
            self.client.region_write(
                pri::REGION_INDEX,
                pri::REG_RESPONSE,
                &pri::encode_response(r.seq, ok),
            )?;
            self.stats.resolve_ns.record(t0.elapsed().as_nanos() as u64);
        }
        Ok(())
    }
}
