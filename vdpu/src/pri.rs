//! vdpu's page-request queue (`--blk ...,pri=on`), as an IOMMU's: the worker posts a request
//! for the page a queue could not reach and signals the client's eventfd; the client reads the
//! table through the page-request region and writes its answers there (`vio::pri`).

use log::warn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use vio::pri::{self, PageRequest};
use virtio_devices::block::PageRequester;
use vmm_sys_util::eventfd::EventFd;

static PRI_LOG: vio::LogLimiter = vio::LogLimiter::new(10, 10_000);

#[derive(Default)]
pub struct PriStats {
    pub requests: AtomicU64,
    pub resolved: AtomicU64,
    pub failed: AtomicU64,
    pub timeouts: AtomicU64,
    /// Answers to no pending request (late, repeated or made up).
    pub stray_answers: AtomicU64,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    pending: Option<PageRequest>,
    answer: Option<bool>,
}

pub struct PageRequests {
    slots: Mutex<Vec<Slot>>,
    next_seq: AtomicU64,
    /// The client's eventfd (SET_IRQS on `pri::IRQ_INDEX`). Giving it is how a client turns
    /// page requests on: without it a fault fails at once, as on a device without PRI.
    notify: Mutex<Option<EventFd>>,
    wake: EventFd,
    timeout: Duration,
    pub stats: PriStats,
}

impl PageRequests {
    pub fn new(queues: u16, timeout: Duration) -> std::io::Result<Self> {
        Ok(PageRequests {
            slots: Mutex::new(vec![Slot::default(); usize::from(queues)]),
            next_seq: AtomicU64::new(1),
            notify: Mutex::new(None),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            timeout,
            stats: PriStats::default(),
        })
    }

    pub fn set_notify(&self, fd: Option<EventFd>) {
        *self.notify.lock().unwrap() = fd;
    }

    /// The table the client reads: one slot per queue.
    pub fn table(&self) -> Vec<u8> {
        let slots = self.slots.lock().unwrap();
        let pending: Vec<Option<PageRequest>> = slots.iter().map(|s| s.pending).collect();
        pri::encode_table(&pending)
    }

    /// The client's answer (`pri::REG_RESPONSE`). Anything but 8 bytes is refused.
    pub fn respond(&self, data: &[u8]) -> Result<(), i32> {
        let (seq, ok) = pri::decode_response(data).ok_or(libc::EINVAL)?;
        let mut slots = self.slots.lock().unwrap();
        let Some(slot) = slots
            .iter_mut()
            .find(|s| s.pending.is_some_and(|r| r.seq == seq))
        else {
            self.stats.stray_answers.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        slot.pending = None;
        slot.answer = Some(ok);
        drop(slots);
        let counter = if ok {
            &self.stats.resolved
        } else {
            &self.stats.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let _ = self.wake.write(1);
        Ok(())
    }

    /// A client went away: what it was asked is forgotten, and waiting queues fail their
    /// requests now rather than at their timeouts.
    pub fn reset(&self) {
        let mut slots = self.slots.lock().unwrap();
        for s in slots.iter_mut().filter(|s| s.pending.is_some()) {
            s.pending = None;
            s.answer = Some(false);
        }
        drop(slots);
        self.set_notify(None);
        let _ = self.wake.write(1);
    }
}

impl PageRequester for PageRequests {
    fn request(&self, q: u16, iova: u64, write: bool) -> bool {
        let notify = self.notify.lock().unwrap();
        let Some(fd) = &*notify else {
            return false;
        };
        // 32-bit sequence numbers on the wire, never 0 (an empty slot).
        let seq = (self.next_seq.fetch_add(1, Ordering::Relaxed) % u64::from(u32::MAX)) as u32 + 1;
        {
            let mut slots = self.slots.lock().unwrap();
            let Some(slot) = slots.get_mut(usize::from(q)) else {
                return false;
            };
            slot.pending = Some(PageRequest {
                slot: q,
                seq,
                iova,
                write,
            });
            slot.answer = None;
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = fd.write(1) {
            if PRI_LOG.hit() {
                warn!("Page request interrupt: {e}");
            }
        }
        true
    }

    fn answer(&self, q: u16) -> Option<bool> {
        self.slots
            .lock()
            .unwrap()
            .get_mut(usize::from(q))
            .and_then(|s| s.answer.take())
    }

    fn cancel(&self, q: u16) {
        if let Some(s) = self.slots.lock().unwrap().get_mut(usize::from(q)) {
            if let Some(r) = s.pending.take() {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                if PRI_LOG.hit() {
                    warn!(
                        "Page request {} for IOVA {:#x} (queue {q}) timed out; the access fails",
                        r.seq, r.iova
                    );
                }
            }
            s.answer = None;
        }
    }

    fn wake(&self) -> &EventFd {
        &self.wake
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request appears in the table and signals the client; the answer with its sequence
    /// number wakes the worker and is taken once; answers to nothing pending are counted and
    /// ignored; a cancelled request's late answer finds nothing.
    #[test]
    fn request_table_answer() {
        let p = PageRequests::new(2, Duration::from_secs(1)).unwrap();
        assert!(
            !p.request(1, 0x7000, true),
            "off until the client gives its eventfd"
        );
        assert!(pri::decode_table(&p.table()).is_empty());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        p.set_notify(Some(irq.try_clone().unwrap()));
        assert!(p.request(1, 0x7000, true));
        assert_eq!(irq.read().unwrap(), 1);
        let t = pri::decode_table(&p.table());
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].slot, t[0].iova, t[0].write), (1, 0x7000, true));
        assert_eq!(p.answer(1), None);
        p.respond(&pri::encode_response(t[0].seq, true)).unwrap();
        assert_eq!(p.wake.read().unwrap(), 1);
        assert_eq!(p.answer(1), Some(true));
        assert_eq!(p.answer(1), None, "taken once");
        assert!(pri::decode_table(&p.table()).is_empty());
        p.respond(&pri::encode_response(t[0].seq, true)).unwrap();
        assert_eq!(p.stats.stray_answers.load(Ordering::Relaxed), 1);
        assert_eq!(p.respond(&[1, 2, 3]), Err(libc::EINVAL));

        p.request(0, 0x9000, false);
        let seq = pri::decode_table(&p.table())[0].seq;
        p.cancel(0);
        assert_eq!(p.stats.timeouts.load(Ordering::Relaxed), 1);
        p.respond(&pri::encode_response(seq, true)).unwrap();
        assert_eq!(p.answer(0), None, "late");
        assert_eq!(p.stats.stray_answers.load(Ordering::Relaxed), 2);
    }
}
