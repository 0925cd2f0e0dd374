//! IOPA-Snoop for one split virtqueue: the device reads a shadow available index that only the
//! VMM advances, after every page of every new request is resident and DMA-mapped.
//!
//! On a doorbell (`on_kick`): read the guest's `avail->idx`; walk the new chains; acquire every
//! page they touch (fault in, DMA-map, pin); publish the shadow index (release ordering, through
//! the host); kick the device. Then re-read `avail->idx` and repeat (bounded), so entries added
//! while we worked are not left behind. Completed requests (`reap_used`, driven by the used ring)
//! release their pages to the normal reclaim policy.
//!
//! No lost wakeups. The guest skips doorbells the device said it does not need: with
//! VIRTIO_F_EVENT_IDX while its new index does not cross `avail_event`, without it while
//! `used->flags` has VRING_USED_F_NO_NOTIFY. A device computes those from its own progress,
//! which lags the shadow index, and re-checks only the shadow before sleeping; so if the guest
//! believed the device, an entry made available while the device was busy (or merely between
//! two wake-ups: virtio-queue devices disarm and re-arm on every wake) would never be
//! published. The VMM therefore owns notification suppression (the device writes its own to the
//! shadow page, see the VIO extension) and states it against the *published* index:
//! - without EVENT_IDX, `used->flags` stays 0: the guest rings for every batch;
//! - with EVENT_IDX, `avail_event` = the published index, written after every publish and
//!   before `avail->idx` is re-read (sequentially consistent). An entry the re-read misses was
//!   made available after it, so the guest compares against the new `avail_event`, crosses it,
//!   and rings.
//!
//! Either way every available entry is published by the doorbell it causes or by the re-read
//! that follows a publish. A poll that stops before that re-read (its round cap, or an index
//! it cannot use) asks to be polled again, and the next poll re-reads. Polling while requests
//! are in flight otherwise only reaps completions early (to release their pins).
//!
//! Indices the guest and the device write while we read them are read in one access
//! (`ring_mem`): a torn `avail->idx` looks like garbage, and the entries behind it would wait
//! for a doorbell the guest, waiting for them, never rings.

use crate::pages::PageError;
use crate::ring_mem;
use crate::walker::{ChainWalker, QueueLayout, WalkLimits, WalkReport};
use std::sync::atomic::{fence, Ordering};
use virtio_bindings::bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// What the VMM provides to the snoop engine.
pub trait SnoopHost {
    /// Makes guest page `gfn` resident and DMA-mapped, and keeps it so (pinned) until
    /// `release`. Returns whether it had to be faulted in.
    fn acquire(&self, gfn: u64) -> Result<bool, PageError>;
    fn release(&self, gfn: u64);
    /// Writes the shadow available index the device reads, then runs `then` (the engine's
    /// writes to the guest's ring that go with it) before anyone can retire the queue. Returns
    /// false, having done neither, if the queue was retired (reset or re-enabled by the guest):
    /// the engine must then leave the device and the ring alone.
    fn publish(&self, idx: u16, then: &dyn Fn()) -> bool;
    fn kick(&self);
    /// The notification suppression the device last wrote for itself (`used->flags`,
    /// `avail_event`), if the host can see it; the VMM is the device's driver and rings it only
    /// when asked to. `None`: ring after every publish.
    fn device_suppression(&self) -> Option<(u16, u16)> {
        None
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SnoopStats {
    pub kicks: u64,
    pub chains: u64,
    pub descriptors: u64,
    pub pages_checked: u64,
    pub faultins: u64,
    pub bad_chains: u64,
    pub acquire_errors: u64,
    /// Doorbells the VMM rang on the device, and the ones the device's suppression spared.
    pub device_kicks: u64,
    pub device_kicks_suppressed: u64,
    /// Entries found waiting with nothing in flight and no doorbell for them (`check_idle`):
    /// a lost wake-up, which the argument above says cannot happen, published late.
    pub missed_doorbells: u64,
    pub shadow_idx: u16,
}

impl SnoopStats {
    /// Adds `other`'s counts (the shadow index, a position, is left alone).
    pub fn add(&mut self, other: &SnoopStats) {
        self.kicks += other.kicks;
        self.chains += other.chains;
        self.descriptors += other.descriptors;
        self.pages_checked += other.pages_checked;
        self.faultins += other.faultins;
        self.bad_chains += other.bad_chains;
        self.acquire_errors += other.acquire_errors;
        self.device_kicks += other.device_kicks;
        self.device_kicks_suppressed += other.device_kicks_suppressed;
        self.missed_doorbells += other.missed_doorbells;
    }
}

pub struct SnoopQueue {
    pub layout: QueueLayout,
    walker: ChainWalker,
    published: u16,
    last_used: u16,
    inflight: Inflight,
    /// The last poll left entries unpublished (its round cap, or an index it could not use):
    /// the next poll must come without waiting for a doorbell the guest may never ring.
    behind: bool,
    /// Completions reaped so far (with `stats.chains`, what `progress` counts).
    reaped: u64,
    /// Idle checks in a row that found the guest's index ahead, and the index they found.
    idle_ahead: (u32, u16),
    /// The last walk's report, reused.
    report: WalkReport,
    event_idx: bool,
    pub stats: SnoopStats,
    /// Why the last bad chain or failed acquire failed, for the caller's rate-limited log.
    pub last_error: Option<SnoopError>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnoopError {
    #[error("Bad chain: {0}")]
    BadChain(&'static str),
    #[error("Failed to make a page reachable for the device")]
    Acquire(#[source] PageError),
}

/// Publish rounds per doorbell: each consumes at least one new entry, so this only caps how
/// long a guest that keeps adding entries can hold the VMM in one call.
const MAX_ROUNDS: u32 = 8;

/// Idle checks (`check_idle`) that must see the same unpublished index to call it lost.
pub const IDLE_CHECKS: u32 = 3;

impl SnoopQueue {
    /// Starts snooping a queue whose device has consumed up to `start_idx`.
    pub fn new(layout: QueueLayout, start_idx: u16, limits: WalkLimits) -> Self {
        SnoopQueue {
            layout,
            walker: ChainWalker::new(limits),
            published: start_idx,
            last_used: start_idx,
            inflight: Inflight::new(layout.size),
            behind: false,
            reaped: 0,
            idle_ahead: (0, 0),
            report: WalkReport::default(),
            event_idx: false,
            last_error: None,
            stats: SnoopStats {
                shadow_idx: start_idx,
                ..Default::default()
            },
        }
    }

    /// Takes over a running queue whose device has been reading the guest's ring (passthrough
    /// to snoop): it has been shown entries up to `exposed` and has completed up to `used`. The
    /// requests still in flight are among the last `size` heads made available (a device may
    /// complete out of order), so the pages of all of them are pinned as in flight; those
    /// already completed are released when the guest reuses their heads, or at teardown.
    /// Nothing is published and nothing is counted as snooped: the device had all of it.
    pub fn adopt<M: GuestMemory>(
        layout: QueueLayout,
        used: u16,
        exposed: u16,
        limits: WalkLimits,
        mem: &M,
        host: &dyn SnoopHost,
    ) -> Self {
        let mut sq = Self::new(layout, exposed, limits);
        sq.last_used = used;
        if used != exposed {
            let from = exposed.wrapping_sub(layout.size);
            let r = sq.walker.walk(mem, &sq.layout, from, exposed);
            for (head, pages) in r.chains() {
                if let Some(pinned) = sq.inflight.start(head, host) {
                    pinned.extend(pages.iter().filter(|&&p| host.acquire(p).is_ok()));
                }
            }
        }
        sq
    }

    fn guest_avail<M: GuestMemory>(&self, mem: &M) -> Option<u16> {
        let v = ring_mem::read_u16(mem, self.layout.avail_ring + 2);
        fence(Ordering::Acquire);
        v
    }

    /// The guest negotiated VIRTIO_F_EVENT_IDX (decides how the device asks for doorbells).
    pub fn with_event_idx(mut self, on: bool) -> Self {
        self.event_idx = on;
        self
    }

    /// Tells the guest when to ring, against the published index (see the module docs). Called
    /// once the device writes its own suppression elsewhere, and after every publish.
    pub fn state_suppression<M: GuestMemory>(&self, mem: &M) {
        self.state_suppression_at(mem, self.published)
    }

    fn state_suppression_at<M: GuestMemory>(&self, mem: &M, published: u16) {
        let used = self.layout.used_ring;
        // A failed write leaves the guest's ring as it was: the guest then rings or not by
        // stale data, and the in-flight poll still publishes its entries.
        let _ = if self.event_idx {
            let at = used + 4 + 8 * u64::from(self.layout.size);
            mem.write_obj(published, GuestAddress(at))
        } else {
            mem.write_obj(0u16, GuestAddress(used))
        };
        fence(Ordering::SeqCst);
    }

    /// One pass for the VMM: reap completions, publish new entries on a doorbell or a poll.
    /// Returns whether to poll again: requests are in flight (their completions release pins)
    /// or entries were left behind.
    pub fn service<M: GuestMemory>(
        &mut self,
        mem: &M,
        host: &dyn SnoopHost,
        kicked: bool,
        polling: bool,
    ) -> bool {
        self.reap_used(mem, host);
        if kicked {
            self.on_kick(mem, host);
        } else if polling {
            self.poll(mem, host);
        }
        self.inflight.count > 0 || self.behind
    }

    /// The VMM is the device's driver: it rings only if the device asked for it (virtio
    /// 2.7.10). The publish and this read of the device's suppression are separated by a full
    /// fence, as the device separates re-arming from re-reading the (shadow) index, so one of
    /// the two always sees the other.
    fn device_wants_kick(&self, host: &dyn SnoopHost, prev: u16, new: u16) -> bool {
        fence(Ordering::SeqCst);
        match host.device_suppression() {
            None => true,
            Some((_, event)) if self.event_idx => {
                new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(prev)
            }
            Some((flags, _)) => u32::from(flags) & VRING_USED_F_NO_NOTIFY == 0,
        }
    }

    /// Handles a doorbell. Returns the shadow index now published.
    pub fn on_kick<M: GuestMemory>(&mut self, mem: &M, host: &dyn SnoopHost) -> u16 {
        self.stats.kicks += 1;
        self.poll(mem, host)
    }

    /// Publishes whatever the guest made available since the last call, doorbell or not.
    pub fn poll<M: GuestMemory>(&mut self, mem: &M, host: &dyn SnoopHost) -> u16 {
        self.behind = true;
        for _ in 0..MAX_ROUNDS {
            let Some(avail) = self.guest_avail(mem) else {
                break;
            };
            if avail == self.published {
                self.behind = false;
                break;
            }
            // A head the guest reuses was completed first, and the guest saw that completion
            // before making the head available again, so it is in the used ring now: reap it,
            // or its (later) reaping would release the new request's pages.
            self.reap_used(mem, host);
            let mut r = std::mem::take(&mut self.report);
            self.walker
                .walk_into(mem, &self.layout, self.published, avail, &mut r);
            self.stats.chains += u64::from(r.chains);
            self.stats.descriptors += u64::from(r.descriptors);
            self.stats.bad_chains += u64::from(r.bad_chains);
            if let Some(e) = r.last_error {
                self.last_error = Some(SnoopError::BadChain(e));
            }
            let new = match r.stopped_at {
                Some(at) => at,
                // A garbage index (more than a queue ahead) publishes nothing: the device would
                // only see garbage. The guest's next valid index is picked up then.
                None if r.per_chain.is_empty() && r.bad_chains > 0 => {
                    self.report = r;
                    break;
                }
                None => avail,
            };
            for (head, pages) in r.chains() {
                // A head out of range is a bad chain with no pages: nothing to pin or track.
                let Some(pinned) = self.inflight.start(head, host) else {
                    continue;
                };
                for &p in pages {
                    self.stats.pages_checked += 1;
                    match host.acquire(p) {
                        Ok(faulted) => {
                            self.stats.faultins += u64::from(faulted);
                            pinned.push(p);
                        }
                        // The device will fail this request through its IOPF path.
                        Err(e) => {
                            self.stats.acquire_errors += 1;
                            self.last_error = Some(SnoopError::Acquire(e));
                        }
                    }
                }
            }
            self.report = r;
            fence(Ordering::Release);
            let published = host.publish(new, &|| {
                if self.event_idx {
                    self.state_suppression_at(mem, new);
                }
            });
            if !published {
                // Retired: this engine is done with the ring.
                self.behind = false;
                break;
            }
            let prev = std::mem::replace(&mut self.published, new);
            self.stats.shadow_idx = new;
            if self.device_wants_kick(host, prev, new) {
                host.kick();
                self.stats.device_kicks += 1;
            } else {
                self.stats.device_kicks_suppressed += 1;
            }
        }
        self.published
    }

    /// Releases the pages of requests the device has completed (per the used ring).
    pub fn reap_used<M: GuestMemory>(&mut self, mem: &M, host: &dyn SnoopHost) -> usize {
        let Some(used) = ring_mem::read_u16(mem, self.layout.used_ring + 2) else {
            return 0;
        };
        fence(Ordering::Acquire);
        let n = used.wrapping_sub(self.last_used).min(self.layout.size);
        for i in 0..n {
            let slot = self.layout.used_ring
                + 4
                + 8 * u64::from(self.last_used.wrapping_add(i) % self.layout.size);
            if let Some(id) = ring_mem::read_u32(mem, slot) {
                self.inflight.complete(id, host);
            }
        }
        self.last_used = used;
        self.reaped += u64::from(n);
        usize::from(n)
    }

    /// A periodic check of an engine with nothing to poll for (nothing in flight, nothing left
    /// behind): if the guest's index has stood ahead of the published one for `IDLE_CHECKS`
    /// checks in a row, its doorbell was lost. Returns the guest's index then, counted in
    /// `missed_doorbells`; the caller reports it and polls. A guest between writing its index
    /// and ringing is ahead for an instant, not for several checks.
    pub fn check_idle<M: GuestMemory>(&mut self, mem: &M) -> Option<u16> {
        let avail = self.guest_avail(mem).filter(|&a| a != self.published);
        let (n, seen) = self.idle_ahead;
        self.idle_ahead = match avail {
            Some(a) if self.inflight.count == 0 && !self.behind => {
                (if seen == a { n + 1 } else { 1 }, a)
            }
            _ => (0, 0),
        };
        if self.idle_ahead.0 < IDLE_CHECKS {
            return None;
        }
        self.idle_ahead = (0, 0);
        self.stats.missed_doorbells += 1;
        avail
    }

    /// Requests published and not yet seen completed.
    /// Entries published and completions reaped so far: a pass that leaves this unchanged did
    /// nothing.
    pub fn progress(&self) -> u64 {
        self.stats.chains + self.reaped
    }

    /// The last pass left entries unpublished: the next poll must come soon.
    pub fn is_behind(&self) -> bool {
        self.behind
    }

    pub fn inflight(&self) -> usize {
        self.inflight.count
    }

    pub fn published(&self) -> u16 {
        self.published
    }

    /// Pins of every in-flight page, e.g. to release them all when snooping stops.
    pub fn release_all(&mut self, host: &dyn SnoopHost) {
        for head in 0..self.inflight.slots.len() {
            self.inflight.complete(head as u32, host);
        }
    }
}

/// Pages pinned for published, not yet completed chains, by head index. A slot keeps its
/// allocation when its request completes, so a busy queue allocates nothing per request.
struct Inflight {
    slots: Vec<Slot>,
    count: usize,
}

#[derive(Default)]
struct Slot {
    busy: bool,
    pages: Vec<u64>,
}

impl Inflight {
    fn new(size: u16) -> Self {
        Inflight {
            slots: (0..size).map(|_| Slot::default()).collect(),
            count: 0,
        }
    }

    /// Head `head` is in flight from now on; returns the list its pinned pages go into, or
    /// None for a head out of range. A head still in flight was reused before its completion
    /// was seen: the guest broke the ring protocol, and its old pages are released rather than
    /// their pins leaked.
    fn start(&mut self, head: u16, host: &dyn SnoopHost) -> Option<&mut Vec<u64>> {
        let slot = self.slots.get_mut(usize::from(head))?;
        if slot.busy {
            slot.pages.iter().for_each(|&p| host.release(p));
        } else {
            slot.busy = true;
            self.count += 1;
        }
        slot.pages.clear();
        Some(&mut slot.pages)
    }

    /// The device completed head `id` (as the used ring says, so any value may come).
    fn complete(&mut self, id: u32, host: &dyn SnoopHost) {
        let Some(slot) = usize::try_from(id).ok().and_then(|i| self.slots.get_mut(i)) else {
            return;
        };
        if slot.busy {
            slot.pages.iter().for_each(|&p| host.release(p));
            slot.pages.clear();
            slot.busy = false;
            self.count -= 1;
        }
    }
}

#[cfg(test)]
mod tests;
