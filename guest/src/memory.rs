//! Guest RAM above the image: a bump arena for driver structures, and the rest handed out in
//! page-sized pieces spread over all of RAM so host-side reclaim can hit them.

use crate::boot::{BootInfo, MAX_RANGES};

pub const PAGE: u64 = 4096;

extern "C" {
    static __image_end: u8;
}

pub struct Ram {
    ranges: [(u64, u64); MAX_RANGES],
    count: usize,
    /// Bump pointer: (range index, next free address).
    cur: (usize, u64),
}

impl Ram {
    pub fn new(info: &BootInfo) -> Ram {
        // Only the address of the linker symbol is taken, never its value.
        let image_end = core::ptr::addr_of!(__image_end) as u64;
        let floor = align_up(image_end, PAGE).max(0x10_0000);
        let mut ranges = [(0, 0); MAX_RANGES];
        let mut count = 0;
        for &(s, e) in &info.ram[..info.ram_count] {
            let s = align_up(s.max(floor), PAGE);
            let e = e & !(PAGE - 1);
            if e > s {
                ranges[count] = (s, e);
                count += 1;
            }
        }
        Ram {
            ranges,
            count,
            cur: (0, ranges[0].0),
        }
    }

    /// Zeroed, page-aligned memory from the arena.
    pub fn alloc(&mut self, bytes: u64) -> Option<u64> {
        let len = align_up(bytes.max(1), PAGE);
        while self.cur.0 < self.count {
            let (_, end) = self.ranges[self.cur.0];
            if self.cur.1 + len <= end {
                let addr = self.cur.1;
                self.cur.1 += len;
                // SAFETY: [addr, addr+len) is RAM above the image, handed out once.
                unsafe { core::ptr::write_bytes(addr as *mut u8, 0, len as usize) };
                return Some(addr);
            }
            self.cur.0 += 1;
            if self.cur.0 < self.count {
                self.cur.1 = self.ranges[self.cur.0].0;
            }
        }
        None
    }

    /// Pages not yet handed out, as ranges.
    fn free_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        (self.cur.0..self.count).map(move |i| {
            let (s, e) = self.ranges[i];
            if i == self.cur.0 {
                (self.cur.1, e)
            } else {
                (s, e)
            }
        })
    }

    pub fn free_pages(&self) -> u64 {
        self.free_ranges().map(|(s, e)| (e - s) / PAGE).sum()
    }

    /// The `i`-th of `n` pages spread evenly over the free RAM.
    pub fn spread_page(&self, i: u64, n: u64) -> Option<u64> {
        let total = self.free_pages();
        if n == 0 || n > total || i >= n {
            return None;
        }
        let mut idx = i * (total / n);
        for (s, e) in self.free_ranges() {
            let pages = (e - s) / PAGE;
            if idx < pages {
                return Some(s + idx * PAGE);
            }
            idx -= pages;
        }
        None
    }
}

pub fn align_up(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}
