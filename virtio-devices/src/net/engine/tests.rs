use super::*;
use crate::GuestMemoryMmap;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 8;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;
const OUTSIDE: u64 = 1 << 40;

struct Rig {
    mem: GuestMemoryMmap,
    queue: Queue,
    avail_idx: u16,
    next_desc: u16,
    counters: NetCounters,
}

fn rig(event_idx: bool) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut queue = Queue::new(QSIZE).unwrap();
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    assert!(queue.is_valid(&mem));
    Rig {
        mem,
        queue,
        avail_idx: 0,
        next_desc: 0,
        counters: NetCounters::default(),
    }
}

impl Rig {
    /// Makes a chain of `(addr, len, flags)` available; returns its head.
    fn chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let at = DESC + 16 * u64::from(idx);
            let more = i + 1 < descs.len();
            let flags = flags | if more { VRING_DESC_F_NEXT as u16 } else { 0 };
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem
                .write_obj((idx + 1) % QSIZE, GuestAddress(at + 14))
                .unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        head
    }

    fn tx(&mut self) -> Result<Vec<u8>, ChainError> {
        let chain = self.queue.pop_descriptor_chain(&self.mem).unwrap();
        let mut frame = Vec::new();
        read_tx(chain, &self.mem, &mut frame).map(|()| frame)
    }

    fn rx(&mut self, frame: &[u8], mergeable: bool, used: &mut Vec<(u16, u32)>) -> RxOutcome {
        write_rx(
            &mut self.queue,
            &self.mem,
            frame,
            mergeable,
            used,
            &self.counters,
        )
        .unwrap()
    }

    fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(i % QSIZE);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

fn frame(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn tx_gathers_the_frame_behind_a_split_header() {
    let mut r = rig(false);
    let f = frame(100);
    r.mem.write_slice(&[0; 12], GuestAddress(0x10000)).unwrap();
    r.mem.write_slice(&f, GuestAddress(0x20000)).unwrap();
    // Header in two pieces, the second also carrying the frame's first 40 bytes.
    r.mem
        .write_slice(&f[..40], GuestAddress(0x10008 + 4))
        .unwrap();
    r.chain(&[(0x10000, 8, R), (0x10008, 44, R), (0x20000 + 40, 60, R)]);
    assert_eq!(r.tx().unwrap(), f);
}

#[test]
fn tx_refuses_bad_chains() {
    let mut r = rig(false);
    r.chain(&[(0x10000, 12, R), (0x20000, 13, R)]);
    assert_eq!(r.tx(), Err(ChainError::TooShort(13)));
    r.chain(&[(0x10000, 12, R), (0x20000, 60, W)]);
    assert_eq!(r.tx(), Err(ChainError::WritableInTx));
    // A length past the largest frame is refused before anything is read.
    r.chain(&[(0x10000, 12, R), (0x20000, 70_000, R)]);
    let e = r.tx();
    assert!(matches!(e, Err(ChainError::TooLarge(_))), "{e:?}");
    r.chain(&[(0x10000, 12, R), (OUTSIDE, 60, R)]);
    assert_eq!(r.tx(), Err(ChainError::BadBuffer(OUTSIDE)));
    // A descriptor naming itself as next: cut at a queue's worth, and refused.
    let head = r.chain(&[(0x10000, 12, R)]);
    let at = DESC + 16 * u64::from(head);
    r.mem
        .write_obj(VRING_DESC_F_NEXT as u16, GuestAddress(at + 12))
        .unwrap();
    r.mem.write_obj(head, GuestAddress(at + 14)).unwrap();
    assert_eq!(r.tx(), Err(ChainError::Unterminated));
}

#[test]
fn rx_writes_header_and_frame_into_one_chain() {
    let mut r = rig(false);
    let head = r.chain(&[(0x10000, 2048, W)]);
    let f = frame(1514);
    let mut used = Vec::new();
    assert_eq!(r.rx(&f, false, &mut used), RxOutcome::Delivered);
    assert_eq!(used, vec![(head, 12 + 1514)]);
    let hdr = r.bytes(0x10000, 12);
    assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(r.bytes(0x10000 + 12, 1514), f);
    // Nothing is visible before the batch is published.
    assert_eq!(r.used_idx(), 0);
    assert!(publish_used(&mut r.queue, &r.mem, &used).unwrap());
    assert_eq!(r.used_idx(), 1);
    assert_eq!(r.used_elem(0), (u32::from(head), 1526));
    assert_eq!(r.counters.rx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(r.counters.rx_bytes.load(Ordering::Relaxed), 1514);
}

#[test]
fn rx_merges_buffers_and_publishes_them_together() {
    let mut r = rig(false);
    let heads = [
        r.chain(&[(0x10000, 600, W)]),
        r.chain(&[(0x20000, 300, W), (0x28000, 300, W)]),
        r.chain(&[(0x30000, 600, W)]),
        r.chain(&[(0x40000, 600, W)]),
    ];
    let f = frame(1500);
    let mut used = Vec::new();
    assert_eq!(r.rx(&f, true, &mut used), RxOutcome::Delivered);
    assert_eq!(
        used,
        vec![(heads[0], 600), (heads[1], 600), (heads[2], 312)]
    );
    assert_eq!(r.bytes(0x10000 + 10, 2), [3, 0], "num_buffers");
    let mut got = r.bytes(0x10000 + 12, 588);
    got.extend(r.bytes(0x20000, 300));
    got.extend(r.bytes(0x28000, 300));
    got.extend(r.bytes(0x30000, 312));
    assert_eq!(got, f);
    publish_used(&mut r.queue, &r.mem, &used).unwrap();
    assert_eq!(r.used_idx(), 3);
    assert_eq!(r.used_elem(2), (u32::from(heads[2]), 312));
    // The fourth buffer is still there for the next frame.
    used.clear();
    assert_eq!(r.rx(&frame(60), true, &mut used), RxOutcome::Delivered);
    assert_eq!(used, vec![(heads[3], 72)]);
}

#[test]
fn rx_waits_for_buffers_and_leaves_the_queue_as_it_was() {
    let mut r = rig(true);
    r.chain(&[(0x10000, 600, W)]);
    let f = frame(1500);
    let mut used = Vec::new();
    assert_eq!(r.rx(&f, true, &mut used), RxOutcome::NoBuffers(1));
    assert!(used.is_empty());
    assert_eq!(r.queue.next_avail(), 0);
    // Asked for a doorbell past index 1; none came yet.
    assert!(!want_buffers_past(&r.queue, &r.mem, 1).unwrap());
    let event: u16 = r
        .mem
        .read_obj(GuestAddress(USED + 4 + 8 * u64::from(QSIZE)))
        .unwrap();
    assert_eq!(event, 1);
    r.chain(&[(0x20000, 2048, W)]);
    assert!(want_buffers_past(&r.queue, &r.mem, 1).unwrap());
    assert_eq!(r.rx(&f, true, &mut used), RxOutcome::Delivered);
    assert_eq!(used.len(), 2);
}

#[test]
fn rx_without_merging_keeps_a_buffer_too_small_for_the_frame() {
    let mut r = rig(false);
    r.chain(&[(0x10000, 1000, W)]);
    let mut used = Vec::new();
    assert_eq!(r.rx(&frame(1500), false, &mut used), RxOutcome::Dropped);
    assert_eq!(r.queue.next_avail(), 0);
    assert_eq!(r.counters.rx_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(r.rx(&frame(900), false, &mut used), RxOutcome::Delivered);
}

#[test]
fn rx_drops_a_frame_a_full_ring_cannot_hold() {
    let mut r = rig(false);
    for i in 0..QSIZE {
        r.chain(&[(0x10000 + 0x1000 * u64::from(i), 100, W)]);
    }
    let mut used = Vec::new();
    assert_eq!(r.rx(&frame(1500), true, &mut used), RxOutcome::Dropped);
    assert!(used.is_empty());
    assert_eq!(r.queue.next_avail(), 0);
    assert_eq!(r.rx(&frame(80), true, &mut used), RxOutcome::Delivered);
}

#[test]
fn rx_completes_bad_chains_empty() {
    let mut r = rig(false);
    let readable = r.chain(&[(0x10000, 2048, R)]);
    let outside = r.chain(&[(OUTSIDE, 2048, W)]);
    // In memory, but its length runs far past the end: refused, not clipped.
    let absurd = r.chain(&[(0x10000, u32::MAX, W)]);
    let good = r.chain(&[(0x20000, 2048, W)]);
    // The bad chains go back empty and the frame goes on to the good one.
    let mut used = Vec::new();
    assert_eq!(r.rx(&frame(100), false, &mut used), RxOutcome::Delivered);
    assert_eq!(
        used,
        vec![(readable, 0), (outside, 0), (absurd, 0), (good, 112)]
    );
    assert_eq!(r.counters.bad_chains.load(Ordering::Relaxed), 3);
    assert_eq!(r.counters.rx_dropped.load(Ordering::Relaxed), 0);
    // With only bad chains left, they go back and the frame waits for more buffers.
    let bad = r.chain(&[(OUTSIDE, 2048, W)]);
    used.clear();
    assert_eq!(r.rx(&frame(100), false, &mut used), RxOutcome::NoBuffers(5));
    assert_eq!(used, vec![(bad, 0)]);
    assert_eq!(
        r.queue.next_avail(),
        5,
        "the bad chain is not offered again"
    );
    // Mid-frame: the buffers already filled go back empty with the bad one.
    let first = r.chain(&[(0x10000, 600, W)]);
    let bad = r.chain(&[(OUTSIDE, 600, W)]);
    used.clear();
    assert_eq!(r.rx(&frame(1000), true, &mut used), RxOutcome::Dropped);
    assert_eq!(used, vec![(bad, 0), (first, 0)]);
    assert_eq!(r.counters.rx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(r.counters.rx_dropped.load(Ordering::Relaxed), 1);
}

#[test]
fn rx_looping_chain_is_bounded() {
    let mut r = rig(false);
    // A descriptor that names itself as next: the walk stops after a queue's worth.
    let at = DESC;
    r.mem.write_obj(0x10000u64, GuestAddress(at)).unwrap();
    r.mem.write_obj(64u32, GuestAddress(at + 8)).unwrap();
    r.mem
        .write_obj(W | VRING_DESC_F_NEXT as u16, GuestAddress(at + 12))
        .unwrap();
    r.mem.write_obj(0u16, GuestAddress(at + 14)).unwrap();
    r.mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    r.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    let mut used = Vec::new();
    assert_eq!(r.rx(&frame(300), true, &mut used), RxOutcome::NoBuffers(1));
    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(r.counters.bad_chains.load(Ordering::Relaxed), 1);
}

#[test]
fn rx_refuses_an_avail_index_too_far_ahead() {
    let mut r = rig(false);
    r.mem.write_obj(QSIZE + 1, GuestAddress(AVAIL + 2)).unwrap();
    let e = write_rx(
        &mut r.queue,
        &r.mem,
        &frame(60),
        true,
        &mut Vec::new(),
        &r.counters,
    );
    assert!(matches!(e, Err(virtio_queue::Error::InvalidAvailRingIndex)));
}

#[test]
fn publish_used_honours_used_event() {
    let mut r = rig(true);
    for _ in 0..3 {
        r.chain(&[(0x10000, 2048, W)]);
    }
    // The driver wants an interrupt once entry 1 is used.
    r.mem
        .write_obj(1u16, GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE)))
        .unwrap();
    let mut used = Vec::new();
    r.rx(&frame(60), false, &mut used);
    assert!(!publish_used(&mut r.queue, &r.mem, &used).unwrap());
    used.clear();
    r.rx(&frame(60), false, &mut used);
    r.rx(&frame(60), false, &mut used);
    assert!(publish_used(&mut r.queue, &r.mem, &used).unwrap());
    assert_eq!(r.used_idx(), 3);
}
