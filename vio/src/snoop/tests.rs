use super::*;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use vm_memory::GuestMemoryMmap;

type Mem = GuestMemoryMmap<()>;
const Q: QueueLayout = QueueLayout {
    size: 8,
    desc_table: 0x1000,
    avail_ring: 0x2000,
    used_ring: 0x3000,
};

#[derive(Default)]
struct Host {
    resident: RefCell<BTreeSet<u64>>,
    pins: RefCell<HashMap<u64, u32>>,
    published: RefCell<Vec<u16>>,
    kicks: RefCell<u32>,
    /// Pages that must be pinned when an index is published: (index, pages pinned then).
    at_publish: RefCell<Vec<(u16, BTreeSet<u64>)>>,
    on_acquire: RefCell<Option<Box<dyn Fn()>>>,
    /// The device's own suppression, as it would write it to the shadow.
    device: RefCell<Option<(u16, u16)>>,
    /// The guest reset or re-enabled the queue: publishing is refused.
    retired: RefCell<bool>,
}

impl SnoopHost for Host {
    fn acquire(&self, gfn: u64) -> Result<bool, PageError> {
        if let Some(f) = self.on_acquire.borrow().as_ref() {
            f();
        }
        if gfn >= 0x100 {
            return Err(PageError::OutsideRam(gfn));
        }
        *self.pins.borrow_mut().entry(gfn).or_default() += 1;
        Ok(self.resident.borrow_mut().insert(gfn))
    }
    fn release(&self, gfn: u64) {
        let mut p = self.pins.borrow_mut();
        let c = p.get_mut(&gfn).expect("release of an unpinned page");
        *c -= 1;
        if *c == 0 {
            p.remove(&gfn);
        }
    }
    fn publish(&self, idx: u16, then: &dyn Fn()) -> bool {
        if *self.retired.borrow() {
            return false;
        }
        let pinned = self.pins.borrow().keys().copied().collect();
        self.at_publish.borrow_mut().push((idx, pinned));
        self.published.borrow_mut().push(idx);
        then();
        true
    }
    fn kick(&self) {
        *self.kicks.borrow_mut() += 1;
    }
    fn device_suppression(&self) -> Option<(u16, u16)> {
        *self.device.borrow()
    }
}

fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
}

/// One-descriptor chain `i` -> page 0x10 + i.
fn post(m: &Mem, pos: u16, head: u16) {
    let d = Q.desc_table + 16 * u64::from(head);
    m.write_obj(0x10000 + 0x1000 * u64::from(head), GuestAddress(d))
        .unwrap();
    m.write_obj(512u32, GuestAddress(d + 8)).unwrap();
    m.write_obj(0u16, GuestAddress(d + 12)).unwrap();
    m.write_obj(
        head,
        GuestAddress(Q.avail_ring + 4 + 2 * u64::from(pos % Q.size)),
    )
    .unwrap();
}

fn set_avail(m: &Mem, idx: u16) {
    m.write_obj(idx, GuestAddress(Q.avail_ring + 2)).unwrap();
}

fn complete(m: &Mem, used_idx: u16, head: u16) {
    let slot = Q.used_ring + 4 + 8 * u64::from((used_idx - 1) % Q.size);
    m.write_obj(u32::from(head), GuestAddress(slot)).unwrap();
    m.write_obj(used_idx, GuestAddress(Q.used_ring + 2))
        .unwrap();
}

#[test]
fn publishes_only_after_pages_are_acquired_then_releases_on_completion() {
    let m = mem();
    let h = Host::default();
    let mut q = SnoopQueue::new(Q, 0, WalkLimits::default());
    post(&m, 0, 0);
    post(&m, 1, 1);
    set_avail(&m, 2);
    assert_eq!(q.on_kick(&m, &h), 2);
    let (idx, pinned) = h.at_publish.borrow()[0].clone();
    assert_eq!(idx, 2);
    assert_eq!(
        pinned,
        [0x10u64, 0x11].into_iter().collect(),
        "every page pinned before the device sees the index"
    );
    assert_eq!(q.stats.faultins, 2);
    assert_eq!(q.inflight(), 2);
    complete(&m, 1, 1);
    assert_eq!(q.reap_used(&m, &h), 1);
    assert_eq!(
        h.pins.borrow().keys().copied().collect::<Vec<_>>(),
        vec![0x10]
    );
    complete(&m, 2, 0);
    q.reap_used(&m, &h);
    assert!(h.pins.borrow().is_empty());
    assert!(
        !q.service(&m, &h, false, true),
        "idle and armed: no polling"
    );
    // Nothing new: no publish, no device kick.
    let kicks = *h.kicks.borrow();
    q.on_kick(&m, &h);
    assert_eq!(*h.kicks.borrow(), kicks);
}

/// A page that cannot be made reachable (here: pages from 0x100 on) is counted and the
/// request still published (the device fails it), but only the pages actually pinned are
/// released at completion: the test host panics on a release without its acquire.
#[test]
fn a_page_that_fails_to_pin_is_not_released() {
    let m = mem();
    let h = Host::default();
    let mut q = SnoopQueue::new(Q, 0, WalkLimits::default());
    post(&m, 0, 0);
    // Head 1: two descriptors, page 0x11 and page 0x150 (in guest memory, not pinnable).
    post(&m, 1, 1);
    let d1 = Q.desc_table + 16;
    m.write_obj(1u16, GuestAddress(d1 + 12)).unwrap(); // NEXT
    m.write_obj(2u16, GuestAddress(d1 + 14)).unwrap();
    let d2 = Q.desc_table + 32;
    m.write_obj(0x150_000u64, GuestAddress(d2)).unwrap();
    m.write_obj(512u32, GuestAddress(d2 + 8)).unwrap();
    m.write_obj(0u16, GuestAddress(d2 + 12)).unwrap();
    set_avail(&m, 2);
    assert_eq!(q.on_kick(&m, &h), 2);
    assert_eq!(q.stats.acquire_errors, 1);
    assert!(matches!(q.last_error, Some(SnoopError::Acquire(_))));
    complete(&m, 1, 1);
    complete(&m, 2, 0);
    q.reap_used(&m, &h);
    assert!(h.pins.borrow().is_empty(), "{:?}", h.pins.borrow());
    assert_eq!(q.inflight(), 0);
}

/// Passthrough to snoop: the device was shown heads 0..5 on its own and completed two of
/// them out of order; the three in flight stay pinned until their completions, and the
/// engine publishes only what comes after.
#[test]
fn adopting_a_running_queue_pins_what_the_device_still_holds() {
    let m = mem();
    let h = Host::default();
    for i in 0..5 {
        post(&m, i, i);
    }
    set_avail(&m, 5);
    complete(&m, 1, 3);
    complete(&m, 2, 0);
    let mut q = SnoopQueue::adopt(Q, 2, 5, WalkLimits::default(), &m, &h);
    assert!(h.published.borrow().is_empty(), "nothing published");
    assert_eq!(q.stats.chains, 0, "nothing counted as snooped");
    for gfn in [0x11u64, 0x12, 0x14] {
        assert!(h.pins.borrow().contains_key(&gfn), "in flight: {gfn:#x}");
    }
    complete(&m, 3, 1);
    complete(&m, 4, 2);
    complete(&m, 5, 4);
    q.reap_used(&m, &h);
    for gfn in [0x11u64, 0x12, 0x14] {
        assert!(!h.pins.borrow().contains_key(&gfn), "completed: {gfn:#x}");
    }
    // A head completed before the switch is released when the guest reuses it.
    post(&m, 5, 3);
    set_avail(&m, 6);
    assert_eq!(q.on_kick(&m, &h), 6);
    assert_eq!(*h.published.borrow(), vec![6]);
    assert_eq!(
        h.pins.borrow().get(&0x13),
        Some(&1),
        "{:?}",
        h.pins.borrow()
    );
    q.release_all(&h);
    assert!(h.pins.borrow().is_empty(), "{:?}", h.pins.borrow());
}

#[test]
fn entries_added_while_walking_are_published_in_the_same_call() {
    let m = mem();
    let h = Host::default();
    post(&m, 0, 0);
    set_avail(&m, 1);
    // The guest adds entry 1 (without a doorbell) while the VMM faults in entry 0's page.
    let m2 = m.clone();
    *h.on_acquire.borrow_mut() = Some(Box::new(move || {
        if m2.read_obj::<u16>(GuestAddress(Q.avail_ring + 2)).unwrap() == 1 {
            post(&m2, 1, 1);
            set_avail(&m2, 2);
        }
    }));
    let mut q = SnoopQueue::new(Q, 0, WalkLimits::default());
    assert_eq!(
        q.on_kick(&m, &h),
        2,
        "re-reading avail->idx after publishing catches it"
    );
    assert_eq!(*h.published.borrow(), vec![1, 2]);
}

/// Once the guest has reset or re-enabled the queue, the engine neither publishes nor writes
/// to the old ring (which may be guest memory put to other use by now), nor rings.
#[test]
fn a_retired_queue_is_left_alone() {
    let m = mem();
    let h = Host::default();
    let mut q = SnoopQueue::new(Q, 0, WalkLimits::default()).with_event_idx(true);
    let avail_event = Q.used_ring + 4 + 8 * u64::from(Q.size);
    m.write_obj(0xabcdu16, GuestAddress(avail_event)).unwrap();
    post(&m, 0, 0);
    set_avail(&m, 1);
    *h.retired.borrow_mut() = true;
    assert_eq!(q.on_kick(&m, &h), 0);
    assert!(h.published.borrow().is_empty());
    assert_eq!(*h.kicks.borrow(), 0);
    assert_eq!(
        m.read_obj::<u16>(GuestAddress(avail_event)).unwrap(),
        0xabcd,
        "the old ring is not written"
    );
    q.release_all(&h);
    assert!(h.pins.borrow().is_empty());
}

/// The event-idx race: the guest skips its doorbell because the device's avail_event lags;
/// the poll while requests are in flight publishes the entry anyway.
#[test]
fn polling_while_in_flight_closes_the_event_idx_window() {
    let m = mem();
    let h = Host::default();
    let mut q = SnoopQueue::new(Q, 0, WalkLimits::default());
    post(&m, 0, 0);
    set_avail(&m, 1);
    q.on_kick(&m, &h);
    // The guest adds an entry and, per a stale avail_event, does not ring.
    post(&m, 1, 1);
    set_avail(&m, 2);
    assert!(
        q.service(&m, &h, false, false),
        "something is in flight, so the VMM keeps polling"
    );
    assert!(q.service(&m, &h, false, true));
    assert_eq!(q.published(), 2, "the poll published it");
}

/// Towards the device the VMM is the driver: it skips the doorbell the device said it does
/// not need, and rings when the device re-armed.
#[test]
fn the_device_is_rung_only_when_it_asks() {
    for event_idx in [false, true] {
        let m = mem();
        let h = Host::default();
        let mut q = SnoopQueue::new(Q, 0, WalkLimits::default()).with_event_idx(event_idx);
        let busy = if event_idx { (0, 0) } else { (1, 0) };
        post(&m, 0, 0);
        set_avail(&m, 1);
        q.service(&m, &h, true, false);
        assert_eq!(*h.kicks.borrow(), 1, "an idle device is rung");
        // The device works (it consumed up to 0 and suppresses, or its avail_event is 0).
        *h.device.borrow_mut() = Some(busy);
        post(&m, 1, 1);
        set_avail(&m, 2);
        q.service(&m, &h, true, false);
        assert_eq!(
            *h.kicks.borrow(),
            1,
            "event_idx={event_idx}: a busy device is not"
        );
        assert_eq!(q.stats.device_kicks_suppressed, 1);
        // It re-armed: for event-idx at index 2 (it consumed 0 and 1).
        *h.device.borrow_mut() = Some((0, 2));
        post(&m, 2, 2);
        set_avail(&m, 3);
        q.service(&m, &h, true, false);
        assert_eq!(
            *h.kicks.borrow(),
            2,
            "event_idx={event_idx}: re-armed, rung"
        );
    }
}

/// The guest's doorbell rule (virtio 2.7.10.2 / vring_need_event) against what the VMM
/// states: whatever the device does, an entry the VMM has not published makes the guest
/// ring, or is picked up by the re-read that follows a publish.
#[test]
fn the_guest_rings_for_every_unpublished_entry() {
    fn guest_rings(m: &Mem, event_idx: bool, old: u16, new: u16) -> bool {
        if event_idx {
            let ev: u16 = m
                .read_obj(GuestAddress(Q.used_ring + 4 + 8 * u64::from(Q.size)))
                .unwrap();
            new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            m.read_obj::<u16>(GuestAddress(Q.used_ring)).unwrap() & 1 == 0
        }
    }
    for event_idx in [false, true] {
        let m = mem();
        let h = Host::default();
        // A device that asked for no doorbells before VIO took over.
        m.write_obj(1u16, GuestAddress(Q.used_ring)).unwrap();
        m.write_obj(0x7777u16, GuestAddress(Q.used_ring + 4 + 8 * 8))
            .unwrap();
        let q = SnoopQueue::new(Q, 0, WalkLimits::default()).with_event_idx(event_idx);
        q.state_suppression(&m);
        let mut q = q;
        for i in 0..20u16 {
            post(&m, i, i % 8);
            set_avail(&m, i + 1);
            assert!(
                guest_rings(&m, event_idx, i, i + 1),
                "entry {i}, event_idx={event_idx}"
            );
            q.service(&m, &h, true, false);
            assert_eq!(q.published(), i + 1);
            complete(&m, i + 1, i % 8);
        }
        // Two entries in one batch: one doorbell covers both.
        post(&m, 20, 0);
        post(&m, 21, 1);
        set_avail(&m, 22);
        assert!(guest_rings(&m, event_idx, 20, 22));
        q.service(&m, &h, true, false);
        assert_eq!(q.published(), 22);
    }
}

/// Entries added while the VMM publishes, without a doorbell (the guest saw an avail_event
/// it had not crossed yet): the re-read after the publish picks them up.
#[test]
fn entries_added_during_a_publish_without_a_doorbell_are_published() {
    let m = mem();
    let h = Host::default();
    let mut q = SnoopQueue::new(Q, 0, WalkLimits::default()).with_event_idx(true);
    q.state_suppression(&m);
    post(&m, 0, 0);
    post(&m, 1, 1);
    set_avail(&m, 2);
    let m2 = m.clone();
    *h.on_acquire.borrow_mut() = Some(Box::new(move || {
        if m2.read_obj::<u16>(GuestAddress(Q.avail_ring + 2)).unwrap() == 2 {
            post(&m2, 2, 2);
            set_avail(&m2, 3);
        }
    }));
    q.service(&m, &h, true, false);
    assert_eq!(q.published(), 3);
    let ev: u16 = m
        .read_obj(GuestAddress(Q.used_ring + 4 + 8 * u64::from(Q.size)))
        .unwrap();
    assert_eq!(ev, 3, "avail_event follows the published index");
}

/// The guest reuses a head as soon as its completion is visible; the VMM may see the new
/// entry before it reaped the old completion. The new request's pages stay pinned.
#[test]
fn a_reused_head_keeps_the_new_requests_pages() {
    let m = mem();
    let h = Host::default();
    let mut q = SnoopQueue::new(Q, 0, WalkLimits::default());
    post(&m, 0, 3);
    set_avail(&m, 1);
    q.on_kick(&m, &h);
    complete(&m, 1, 3);
    // Head 3 again, now with a different buffer; no reap in between.
    let d = Q.desc_table + 16 * 3;
    m.write_obj(0x40000u64, GuestAddress(d)).unwrap();
    post_avail_only(&m, 1, 3);
    set_avail(&m, 2);
    q.on_kick(&m, &h);
    q.reap_used(&m, &h);
    assert_eq!(
        h.pins.borrow().keys().copied().collect::<Vec<_>>(),
        vec![0x40],
        "the old buffer is released, the new one still pinned"
    );
}

fn post_avail_only(m: &Mem, pos: u16, head: u16) {
    m.write_obj(
        head,
        GuestAddress(Q.avail_ring + 4 + 2 * u64::from(pos % Q.size)),
    )
    .unwrap();
}

#[test]
fn bad_chains_are_published_and_failed_acquires_do_not_block() {
    let m = mem();
    let h = Host::default();
    let mut q = SnoopQueue::new(Q, 0, WalkLimits::default());
    // Head 9 is out of range; head 2 points at a page the host cannot map (0x200).
    m.write_obj(9u16, GuestAddress(Q.avail_ring + 4)).unwrap();
    let d = Q.desc_table + 32;
    m.write_obj(0x10_0000u64, GuestAddress(d)).unwrap(); // in RAM, but the host cannot map it
    m.write_obj(8u32, GuestAddress(d + 8)).unwrap();
    m.write_obj(2u16, GuestAddress(Q.avail_ring + 6)).unwrap();
    set_avail(&m, 2);
    assert_eq!(
        q.on_kick(&m, &h),
        2,
        "published so the device fails them itself"
    );
    assert_eq!(q.stats.bad_chains, 1);
    assert_eq!(q.stats.acquire_errors, 1);
    // A garbage index is not published.
    set_avail(&m, 100);
    assert_eq!(q.on_kick(&m, &h), 2);
}

#[test]
fn budget_stops_and_the_rest_follows_on_the_next_call() {
    let m = mem();
    let h = Host::default();
    let mut q = SnoopQueue::new(
        Q,
        0,
        WalkLimits {
            max_descriptors_per_call: 3,
            ..Default::default()
        },
    );
    for i in 0..6 {
        post(&m, i, i);
    }
    set_avail(&m, 6);
    // Each round walks 3; the loop continues until everything is published.
    assert_eq!(q.on_kick(&m, &h), 6);
    assert_eq!(*h.published.borrow(), vec![3, 6]);
    q.release_all(&h);
    assert!(h.pins.borrow().is_empty());
}

/// An index the engine cannot use (here more than a queue ahead, as a torn read of it once
/// looked) publishes nothing; with nothing in flight the engine still asks to be polled,
/// because the guest, waiting for those requests, rings no more. The next poll publishes
/// them once the index reads right, and then polling stops.
#[test]
fn entries_left_behind_are_polled_for() {
    let m = mem();
    let h = Host::default();
    let mut q = SnoopQueue::new(Q, 0, WalkLimits::default());
    post(&m, 0, 0);
    post(&m, 1, 1);
    set_avail(&m, 0x102);
    assert!(
        q.service(&m, &h, true, false),
        "nothing in flight, entries behind: poll"
    );
    assert_eq!(q.published(), 0);
    set_avail(&m, 2);
    assert!(q.service(&m, &h, false, true));
    assert_eq!(q.published(), 2);
    complete(&m, 1, 0);
    complete(&m, 2, 1);
    assert!(!q.service(&m, &h, false, true), "caught up and idle");
}

/// A guest that keeps adding entries holds a poll for at most its round cap; what is left
/// is the next poll's, without a doorbell.
#[test]
fn the_round_cap_leaves_a_poll_behind() {
    let m = mem();
    let h = Host::default();
    post(&m, 0, 0);
    set_avail(&m, 1);
    let m2 = m.clone();
    *h.on_acquire.borrow_mut() = Some(Box::new(move || {
        let idx = m2.read_obj::<u16>(GuestAddress(Q.avail_ring + 2)).unwrap();
        if idx <= MAX_ROUNDS as u16 {
            post(&m2, idx, idx % Q.size);
            set_avail(&m2, idx + 1);
        }
    }));
    let mut q = SnoopQueue::new(Q, 0, WalkLimits::default());
    q.service(&m, &h, true, false);
    assert_eq!(q.published(), MAX_ROUNDS as u16);
    // Complete everything published: only the entries behind keep the poll going.
    for i in 1..=MAX_ROUNDS as u16 {
        complete(&m, i, (i - 1) % Q.size);
    }
    q.reap_used(&m, &h);
    assert_eq!(q.inflight(), 0);
    *h.on_acquire.borrow_mut() = None;
    assert!(q.service(&m, &h, false, false), "behind: poll");
    q.poll(&m, &h);
    assert_eq!(q.published(), MAX_ROUNDS as u16 + 1, "the one added last");
}

/// Entries waiting with nothing in flight and no doorbell are found by the periodic idle
/// check once they have waited `IDLE_CHECKS` checks at the same index, and counted; an
/// index that moves, or requests in flight, restart the count.
#[test]
fn the_idle_check_finds_a_lost_doorbell() {
    let m = mem();
    let h = Host::default();
    let mut q = SnoopQueue::new(Q, 0, WalkLimits::default());
    assert_eq!(q.check_idle(&m), None, "nothing waiting");
    post(&m, 0, 0);
    set_avail(&m, 1);
    for _ in 1..IDLE_CHECKS {
        assert_eq!(q.check_idle(&m), None);
    }
    post(&m, 1, 1);
    set_avail(&m, 2);
    for _ in 1..IDLE_CHECKS {
        assert_eq!(q.check_idle(&m), None, "the guest is still adding");
    }
    assert_eq!(q.check_idle(&m), Some(2));
    assert_eq!(q.stats.missed_doorbells, 1);
    q.poll(&m, &h);
    assert_eq!(q.published(), 2);
    // In flight: the poll covers it, nothing is lost.
    post(&m, 2, 2);
    set_avail(&m, 3);
    for _ in 0..2 * IDLE_CHECKS {
        assert_eq!(q.check_idle(&m), None);
    }
    assert_eq!(q.stats.missed_doorbells, 1);
}
