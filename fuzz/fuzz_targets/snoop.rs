//! Arbitrary ring + memory contents through the chain walker and the snoop engine.
//! Input: [size exponent, from lo, from hi, to lo, to hi, budget] then a 64 KiB memory image
//! (descriptor table at 0x0, avail ring at 0x1000, used ring at 0x2000).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::collections::HashMap;
use vio::{ChainWalker, QueueLayout, SnoopHost, SnoopQueue, WalkLimits};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 64 << 10;

#[derive(Default)]
struct Host {
    pins: RefCell<HashMap<u64, i64>>,
}

impl SnoopHost for Host {
    fn acquire(&self, gfn: u64) -> Result<bool, vio::PageError> {
        assert!(
            gfn < MEM / vio::spec::PAGE_SIZE,
            "acquire outside memory: {gfn}"
        );
        *self.pins.borrow_mut().entry(gfn).or_default() += 1;
        Ok(false)
    }
    fn release(&self, gfn: u64) {
        let mut p = self.pins.borrow_mut();
        let c = p.entry(gfn).or_default();
        *c -= 1;
        assert!(*c >= 0, "released more than acquired");
    }
    fn publish(&self, _idx: u16, then: &dyn Fn()) -> bool {
        then();
        true
    }
    fn kick(&self) {}
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let size = 1u16 << (data[0] % 9);
    let from = u16::from_le_bytes([data[1], data[2]]);
    let to = u16::from_le_bytes([data[3], data[4]]);
    let budget = u32::from(data[5]) * 16 + 1;
    let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let image = &data[6..];
    m.write_slice(&image[..image.len().min(MEM as usize)], GuestAddress(0))
        .unwrap();
    let q = QueueLayout {
        size,
        desc_table: 0,
        avail_ring: 0x1000,
        used_ring: 0x2000,
    };
    let limits = WalkLimits {
        max_descriptors_per_call: budget,
        ..Default::default()
    };

    let r = ChainWalker::new(limits).walk(&m, &q, from, to);
    assert!(r.descriptors <= budget);
    assert!(r.chains <= u32::from(size));
    assert!(r.pages.iter().all(|&p| p < MEM / vio::spec::PAGE_SIZE));

    let host = Host::default();
    let mut sq = SnoopQueue::new(q, from, limits).with_event_idx(data[5] & 1 == 1);
    sq.state_suppression(&m);
    sq.service(&m, &host, true, false);
    sq.service(&m, &host, false, true);
    sq.release_all(&host);
    assert!(host.pins.borrow().values().all(|&c| c == 0), "pins leaked");
});
