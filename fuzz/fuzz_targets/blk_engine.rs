//! Arbitrary virtqueues through the virtio-blk request engine, as a device serves them.
//! Input: [queue size exponent, next avail lo, hi, budget, flags] then a 64 KiB memory image
//! (descriptor table at 0x0, avail ring at 0x1000, used ring at 0x2000; data anywhere).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use virtio_devices::block::{BlockCounters, BlockEngine, RawFile};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 64 << 10;

fn disk() -> &'static RawFile {
    static DISK: OnceLock<RawFile> = OnceLock::new();
    DISK.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("vio-fuzz-blk-{}.img", std::process::id()));
        std::fs::write(&p, vec![0xa5; 64 * 512]).unwrap();
        let f = RawFile::open(&p, false).unwrap();
        let _ = std::fs::remove_file(&p);
        f
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let size = 1u16 << (data[0] % 9);
    let next_avail = u16::from_le_bytes([data[1], data[2]]);
    let budget = usize::from(data[3]) + 1;
    let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let image = &data[5..];
    m.write_slice(&image[..image.len().min(MEM as usize)], GuestAddress(0))
        .unwrap();
    let mut q = Queue::new(256).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_event_idx(data[4] & 1 == 1);
    q.set_next_avail(next_avail);
    q.set_next_used(u16::from_le_bytes([data[1], data[2]]));
    q.set_ready(true);
    if !q.is_valid(&m) {
        return;
    }
    let counters = BlockCounters::default();
    let engine = BlockEngine {
        disk: disk(),
        serial: &[b's'; 20],
        counters: &counters,
    };
    // The avail index is at most a queue ahead (else the ring is refused), so the engine is
    // through it within a bounded number of calls, each serving at most its budget.
    let (mut total, mut done) = (0usize, false);
    for _ in 0..usize::from(size) + 2 {
        let before = q.next_avail();
        let r = engine.process_some(&mut q, &m, budget);
        let served = usize::from(q.next_avail().wrapping_sub(before));
        assert!(served <= budget, "{served} > {budget}");
        total += served;
        if !matches!(r, Ok((_, true))) {
            done = true;
            break;
        }
    }
    assert!(done, "the engine kept finding work");
    assert!(
        total <= usize::from(size),
        "{total} entries from a ring of {size}"
    );
});
