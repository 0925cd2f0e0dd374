//! Arbitrary virtqueues through the virtio-net frame engine: frames offered to a receive queue
//! (merged or not), then the same ring read as a transmit queue.
//! Input: [queue size exponent, next avail lo, hi, flags (event idx, mergeable), frame length
//! lo, hi] then a 64 KiB memory image (descriptor table at 0x0, avail ring at 0x1000, used ring
//! at 0x2000; buffers anywhere).
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_devices::net::engine::{
    publish_used, read_tx, write_rx, MAX_FRAME_LEN, NET_HDR_LEN,
};
use virtio_devices::net::{NetCounters, RxOutcome};
use virtio_devices::queue::{drain, Completion};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 64 << 10;

fn queue(m: &GuestMemoryMmap<()>, size: u16, next: u16, event_idx: bool) -> Option<Queue> {
    let mut q = Queue::new(256).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_event_idx(event_idx);
    q.set_next_avail(next);
    q.set_next_used(next);
    q.set_ready(true);
    q.is_valid(m).then_some(q)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let size = 1u16 << (data[0] % 9);
    let next = u16::from_le_bytes([data[1], data[2]]);
    let (event_idx, mergeable) = (data[3] & 1 == 1, data[3] & 2 == 2);
    let len = usize::from(u16::from_le_bytes([data[4], data[5]])) % (MAX_FRAME_LEN + 1);
    let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let image = &data[6..];
    m.write_slice(&image[..image.len().min(MEM as usize)], GuestAddress(0))
        .unwrap();
    let frame: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let counters = NetCounters::default();

    let Some(mut q) = queue(&m, size, next, event_idx) else {
        return;
    };
    // Every frame consumes at least one entry or stops: the ring is through within its size.
    let mut used = Vec::new();
    let mut ended = false;
    for _ in 0..usize::from(size) + 2 {
        let before = q.next_avail();
        match write_rx(&mut q, &m, &frame, mergeable, &mut used, &counters) {
            Ok(RxOutcome::Delivered) => assert_ne!(q.next_avail(), before, "delivered from nothing"),
            Ok(RxOutcome::Dropped) => {}
            Ok(RxOutcome::NoBuffers(_)) | Err(_) => {
                ended = true;
                break;
            }
        }
        if q.next_avail() == before {
            ended = true;
            break;
        }
    }
    assert!(ended, "the receive queue kept taking frames");
    assert!(used.len() <= usize::from(size), "{} used of a ring of {size}", used.len());
    for &(head, l) in &used {
        assert!(head < size, "used head {head} of a ring of {size}");
        assert!(l as usize <= NET_HDR_LEN + len, "used length {l} for a frame of {len}");
    }
    let _ = publish_used(&mut q, &m, &used);

    let Some(mut q) = queue(&m, size, next, event_idx) else {
        return;
    };
    let mut buf = Vec::new();
    let mut served = 0usize;
    let r = drain(
        &mut q,
        &m,
        usize::from(size),
        |chain| {
            served += 1;
            if read_tx(chain, &m, &mut buf).is_ok() {
                assert!(buf.len() <= MAX_FRAME_LEN);
            }
            0
        },
        || {},
        |q, head, l| q.add_used(&m, head, l).map(|()| Completion::Done),
        || false,
    );
    let _ = r;
    assert!(served <= usize::from(size));
});
