//! Walks the descriptor chains a guest made available and lists every guest page the device
//! will touch for them (buffers and indirect tables), so they can be made resident and
//! DMA-mapped before the device sees the request.
//!
//! The ring is guest-controlled and may be hostile. The walker never reads outside guest
//! memory, never loops, bounds its work per call, and treats every violation as a bad chain: the
//! chain's valid pages are still reported, the chain is counted, and the caller still publishes
//! the index so the device fails the request through its own error path instead of the ring
//! stalling.

use crate::ring_mem;
use crate::spec::PAGE_SIZE;
use std::collections::BTreeSet;
use std::ops::Range;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use vm_memory::{GuestAddress, GuestMemory};

const DESC_SIZE: u64 = 16;

/// Where a split virtqueue lives in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkLimits {
    /// Descriptors an indirect table may hold.
    pub max_indirect: u32,
    /// Bytes a single descriptor may cover.
    pub max_desc_len: u32,
    /// Descriptors walked per call, over all chains.
    pub max_descriptors_per_call: u32,
}

impl Default for WalkLimits {
    fn default() -> Self {
        WalkLimits {
            max_indirect: 1024,
            max_desc_len: 16 << 20,
            max_descriptors_per_call: 65536,
        }
    }
}

/// What one walk found. Reusable: `walk_into` clears it and keeps its allocations, so the
/// snoop path allocates nothing per chain.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WalkReport {
    pub chains: u32,
    pub descriptors: u32,
    pub bad_chains: u32,
    /// Guest page frame numbers the device will touch: each chain's, sorted and unique within
    /// it, one chain after the other.
    pub pages: Vec<u64>,
    /// Per walked chain (good or bad): its head index and where its pages are in `pages`.
    pub per_chain: Vec<(u16, Range<usize>)>,
    /// Why the last bad chain was bad, for logging.
    pub last_error: Option<&'static str>,
    /// The walk stopped early at the per-call budget; entries from this avail index on were not
    /// looked at.
    pub stopped_at: Option<u16>,
}

impl WalkReport {
    /// Each walked chain's head and pages.
    pub fn chains(&self) -> impl Iterator<Item = (u16, &[u64])> {
        self.per_chain
            .iter()
            .map(|(head, r)| (*head, &self.pages[r.clone()]))
    }

    /// Every page of the walk, once.
    pub fn all_pages(&self) -> BTreeSet<u64> {
        self.pages.iter().copied().collect()
    }

    fn clear(&mut self) {
        self.chains = 0;
        self.descriptors = 0;
        self.bad_chains = 0;
        self.pages.clear();
        self.per_chain.clear();
        self.last_error = None;
        self.stopped_at = None;
    }
}

enum Stop {
    Bad(&'static str),
    Budget,
}

impl From<&'static str> for Stop {
    fn from(e: &'static str) -> Self {
        Stop::Bad(e)
    }
}

#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

pub struct ChainWalker {
    pub limits: WalkLimits,
}

fn read_desc<M: GuestMemory>(mem: &M, table: u64, index: u64) -> Option<Desc> {
    let at = table.checked_add(index.checked_mul(DESC_SIZE)?)?;
    let mut raw = [0u8; 16];
    if !ring_mem::read(mem, at, &mut raw) {
        return None;
    }
    Some(Desc {
        addr: u64::from_le_bytes(raw[0..8].try_into().unwrap()),
        len: u32::from_le_bytes(raw[8..12].try_into().unwrap()),
        flags: u16::from_le_bytes(raw[12..14].try_into().unwrap()),
        next: u16::from_le_bytes(raw[14..16].try_into().unwrap()),
    })
}

/// Adds the pages of [addr, addr+len) if they all lie in guest memory.
fn add_range<M: GuestMemory>(
    mem: &M,
    pages: &mut Vec<u64>,
    addr: u64,
    len: u64,
) -> Result<(), &'static str> {
    if len == 0 {
        return Ok(());
    }
    let end = addr
        .checked_add(len)
        .ok_or("buffer wraps around the address space")?;
    if !mem.check_range(
        GuestAddress(addr),
        len as usize,
        vm_memory::Permissions::Read,
    ) {
        return Err("buffer outside guest memory");
    }
    pages.extend(addr / PAGE_SIZE..end.div_ceil(PAGE_SIZE));
    Ok(())
}

/// Sorts `pages[from..]` and drops its repeats.
fn sort_unique_tail(pages: &mut Vec<u64>, from: usize) {
    pages[from..].sort_unstable();
    let mut kept = from;
    for i in from..pages.len() {
        if kept == from || pages[i] != pages[kept - 1] {
            pages[kept] = pages[i];
            kept += 1;
        }
    }
    pages.truncate(kept);
}

impl ChainWalker {
    pub fn new(limits: WalkLimits) -> Self {
        ChainWalker { limits }
    }

    /// Walks the chains at avail ring positions [from, to) (wrapping 16-bit indices).
    pub fn walk<M: GuestMemory>(&self, mem: &M, q: &QueueLayout, from: u16, to: u16) -> WalkReport {
        let mut r = WalkReport::default();
        self.walk_into(mem, q, from, to, &mut r);
        r
    }

    /// `walk`, into a report that is cleared first and keeps its allocations.
    pub fn walk_into<M: GuestMemory>(
        &self,
        mem: &M,
        q: &QueueLayout,
        from: u16,
        to: u16,
        r: &mut WalkReport,
    ) {
        r.clear();
        if q.size == 0 || !q.size.is_power_of_two() {
            r.last_error = Some("queue size is not a power of two");
            return;
        }
        let pending = to.wrapping_sub(from);
        if pending > q.size {
            // More entries than the ring holds: the index is garbage. Nothing here is trustworthy.
            r.bad_chains = 1;
            r.last_error = Some("avail index is more than a queue ahead");
            return;
        }
        let mut budget = self.limits.max_descriptors_per_call;
        for i in 0..pending {
            let pos = from.wrapping_add(i);
            if budget == 0 {
                r.stopped_at = Some(pos);
                break;
            }
            let slot = q.avail_ring + 4 + 2 * u64::from(pos % q.size);
            r.chains += 1;
            let head = match ring_mem::read_u16(mem, slot) {
                Some(h) => h,
                None => {
                    r.bad_chains += 1;
                    r.last_error = Some("avail ring outside guest memory");
                    continue;
                }
            };
            let descriptors = r.descriptors;
            let start = r.pages.len();
            match self.walk_chain(mem, q, head, &mut r.descriptors, &mut r.pages, &mut budget) {
                Ok(()) => {}
                Err(Stop::Bad(e)) => {
                    r.bad_chains += 1;
                    r.last_error = Some(e);
                }
                Err(Stop::Budget) => {
                    // Not bad, just not finished: the caller publishes up to here and walks the
                    // rest next time.
                    r.chains -= 1;
                    r.descriptors = descriptors;
                    r.pages.truncate(start);
                    r.stopped_at = Some(pos);
                    break;
                }
            }
            sort_unique_tail(&mut r.pages, start);
            r.per_chain.push((head, start..r.pages.len()));
        }
    }

    fn walk_chain<M: GuestMemory>(
        &self,
        mem: &M,
        q: &QueueLayout,
        head: u16,
        descriptors: &mut u32,
        pages: &mut Vec<u64>,
        budget: &mut u32,
    ) -> Result<(), Stop> {
        if head >= q.size {
            return Err("head index out of range".into());
        }
        // The main chain may not be longer than the queue (that would be a loop).
        let mut next = Some(head);
        let mut steps = 0u32;
        while let Some(i) = next {
            if steps >= u32::from(q.size) {
                return Err("chain longer than the queue (loop)".into());
            }
            if *budget == 0 {
                return Err(Stop::Budget);
            }
            steps += 1;
            *budget -= 1;
            *descriptors += 1;
            let d = read_desc(mem, q.desc_table, u64::from(i))
                .ok_or(Stop::Bad("descriptor table outside guest memory"))?;
            if u32::from(d.flags) & VRING_DESC_F_INDIRECT != 0 {
                self.walk_indirect(mem, d, descriptors, pages, budget)?;
            } else {
                if d.len > self.limits.max_desc_len {
                    return Err("descriptor too long".into());
                }
                add_range(mem, pages, d.addr, u64::from(d.len))?;
            }
            next = if u32::from(d.flags) & VRING_DESC_F_NEXT != 0 {
                if d.next >= q.size {
                    return Err("next index out of range".into());
                }
                Some(d.next)
            } else {
                None
            };
        }
        Ok(())
    }

    fn walk_indirect<M: GuestMemory>(
        &self,
        mem: &M,
        t: Desc,
        descriptors: &mut u32,
        pages: &mut Vec<u64>,
        budget: &mut u32,
    ) -> Result<(), Stop> {
        if !u64::from(t.len).is_multiple_of(DESC_SIZE) || t.len == 0 {
            return Err("indirect table length is not a multiple of 16".into());
        }
        let n = u64::from(t.len) / DESC_SIZE;
        if n > u64::from(self.limits.max_indirect) {
            return Err("indirect table too large".into());
        }
        // The device reads the table itself.
        add_range(mem, pages, t.addr, u64::from(t.len))?;
        let mut next = Some(0u64);
        let mut steps = 0u64;
        while let Some(i) = next {
            if steps >= n {
                return Err("indirect chain loops".into());
            }
            if *budget == 0 {
                return Err(Stop::Budget);
            }
            steps += 1;
            *budget -= 1;
            *descriptors += 1;
            let d = read_desc(mem, t.addr, i)
                .ok_or(Stop::Bad("indirect table outside guest memory"))?;
            if u32::from(d.flags) & VRING_DESC_F_INDIRECT != 0 {
                return Err("nested indirect table".into());
            }
            if d.len > self.limits.max_desc_len {
                return Err("descriptor too long".into());
            }
            add_range(mem, pages, d.addr, u64::from(d.len))?;
            next = if u32::from(d.flags) & VRING_DESC_F_NEXT != 0 {
                if u64::from(d.next) >= n {
                    return Err("indirect next index out of range".into());
                }
                Some(u64::from(d.next))
            } else {
                None
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;
    use vm_memory::GuestMemoryMmap;

    type Mem = GuestMemoryMmap<()>;
    const MEM: u64 = 1 << 20;
    const Q: QueueLayout = QueueLayout {
        size: 8,
        desc_table: 0x1000,
        avail_ring: 0x2000,
        used_ring: 0x3000,
    };
    const N: u16 = VRING_DESC_F_NEXT as u16;
    const IND: u16 = VRING_DESC_F_INDIRECT as u16;

    fn mem() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn desc(m: &Mem, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + 16 * i;
        m.write_obj(addr, GuestAddress(at)).unwrap();
        m.write_obj(len, GuestAddress(at + 8)).unwrap();
        m.write_obj(flags, GuestAddress(at + 12)).unwrap();
        m.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn avail(m: &Mem, pos: u16, head: u16) {
        m.write_obj(
            head,
            GuestAddress(Q.avail_ring + 4 + 2 * u64::from(pos % Q.size)),
        )
        .unwrap();
    }

    fn walk(m: &Mem, from: u16, to: u16) -> WalkReport {
        ChainWalker::new(WalkLimits::default()).walk(m, &Q, from, to)
    }

    fn pages(r: &WalkReport) -> Vec<u64> {
        r.all_pages().into_iter().collect()
    }

    #[test]
    fn direct_chain_pages() {
        let m = mem();
        desc(&m, Q.desc_table, 0, 0x10000, 16, N, 1);
        desc(&m, Q.desc_table, 1, 0x20ff0, 0x20, N, 2); // straddles two pages
        desc(&m, Q.desc_table, 2, 0x30000, 1, 0, 0);
        avail(&m, 0, 0);
        let r = walk(&m, 0, 1);
        assert_eq!((r.chains, r.descriptors, r.bad_chains), (1, 3, 0));
        assert_eq!(pages(&r), vec![0x10, 0x20, 0x21, 0x30]);
    }

    #[test]
    fn indirect_chain_includes_its_table() {
        let m = mem();
        desc(&m, 0x40000, 0, 0x50000, 0x2000, N, 1);
        desc(&m, 0x40000, 1, 0x60000, 1, 0, 0);
        desc(&m, Q.desc_table, 3, 0x40000, 32, IND, 0);
        avail(&m, 5, 3);
        let r = walk(&m, 5, 6);
        assert_eq!(r.bad_chains, 0);
        assert_eq!(pages(&r), vec![0x40, 0x50, 0x51, 0x60]);
    }

    #[test]
    fn wrapping_indices() {
        let m = mem();
        for i in 0..4u16 {
            desc(
                &m,
                Q.desc_table,
                u64::from(i),
                0x10000 + 0x1000 * u64::from(i),
                8,
                0,
                0,
            );
        }
        // Positions 65534, 65535, 0, 1 map to ring slots 6, 7, 0, 1.
        for (k, pos) in [65534u16, 65535, 0, 1].iter().enumerate() {
            avail(&m, *pos, k as u16);
        }
        let r = walk(&m, 65534, 2);
        assert_eq!((r.chains, r.bad_chains), (4, 0));
        assert_eq!(pages(&r), vec![0x10, 0x11, 0x12, 0x13]);
    }

    fn bad(r: &WalkReport, why: &str) {
        assert_eq!(r.bad_chains, 1, "{r:?}");
        assert!(
            r.last_error.unwrap().contains(why),
            "{:?} vs {why}",
            r.last_error
        );
    }

    #[test]
    fn hostile_rings() {
        let m = mem();
        // Head index >= queue size.
        avail(&m, 0, 9);
        bad(&walk(&m, 0, 1), "head index");
        // next index >= queue size.
        desc(&m, Q.desc_table, 0, 0x10000, 8, N, 77);
        avail(&m, 0, 0);
        bad(&walk(&m, 0, 1), "next index");
        // A loop.
        desc(&m, Q.desc_table, 0, 0x10000, 8, N, 1);
        desc(&m, Q.desc_table, 1, 0x11000, 8, N, 0);
        let r = walk(&m, 0, 1);
        bad(&r, "loop");
        assert!(r.descriptors <= u32::from(Q.size));
        // Buffer outside guest RAM, and wrapping around.
        desc(&m, Q.desc_table, 0, MEM - 8, 16, 0, 0);
        bad(&walk(&m, 0, 1), "outside guest memory");
        desc(&m, Q.desc_table, 0, u64::MAX - 4, 16, 0, 0);
        bad(&walk(&m, 0, 1), "wraps");
        // Oversized descriptor.
        desc(&m, Q.desc_table, 0, 0, u32::MAX, 0, 0);
        bad(&walk(&m, 0, 1), "too long");
        // Avail index far ahead of the ring.
        let r = walk(&m, 0, 100);
        bad(&r, "more than a queue ahead");
        assert_eq!(r.chains, 0);
    }

    #[test]
    fn hostile_indirect_tables() {
        let m = mem();
        avail(&m, 0, 0);
        // Misaligned length.
        desc(&m, Q.desc_table, 0, 0x40000, 17, IND, 0);
        bad(&walk(&m, 0, 1), "multiple of 16");
        // Oversized table.
        desc(&m, Q.desc_table, 0, 0x40000, 16 * 4096, IND, 0);
        bad(&walk(&m, 0, 1), "too large");
        // Table outside memory.
        desc(&m, Q.desc_table, 0, MEM - 16, 32, IND, 0);
        bad(&walk(&m, 0, 1), "outside guest memory");
        // Nested indirect.
        desc(&m, 0x40000, 0, 0x50000, 16, IND, 0);
        desc(&m, Q.desc_table, 0, 0x40000, 16, IND, 0);
        bad(&walk(&m, 0, 1), "nested");
        // Loop inside the table.
        desc(&m, 0x40000, 0, 0x50000, 8, N, 1);
        desc(&m, 0x40000, 1, 0x51000, 8, N, 0);
        desc(&m, Q.desc_table, 0, 0x40000, 32, IND, 0);
        bad(&walk(&m, 0, 1), "loops");
        // next beyond the table.
        desc(&m, 0x40000, 0, 0x50000, 8, N, 5);
        bad(&walk(&m, 0, 1), "indirect next");
    }

    #[test]
    fn bad_chains_do_not_hide_good_ones_and_work_is_bounded() {
        let m = mem();
        desc(&m, Q.desc_table, 0, 0x10000, 8, 0, 0);
        avail(&m, 0, 9); // bad
        avail(&m, 1, 0); // good
        let r = walk(&m, 0, 2);
        assert_eq!((r.chains, r.bad_chains), (2, 1));
        assert_eq!(pages(&r), vec![0x10]);
        // A budget of 3 descriptors stops a walk of 8 one-descriptor chains.
        for i in 0..8u16 {
            avail(&m, i, 0);
        }
        let w = ChainWalker::new(WalkLimits {
            max_descriptors_per_call: 3,
            ..Default::default()
        });
        let r = w.walk(&m, &Q, 0, 8);
        assert_eq!(r.descriptors, 3);
        assert_eq!(r.stopped_at, Some(3));
    }

    #[test]
    fn avail_ring_outside_memory() {
        let m = mem();
        let q = QueueLayout {
            avail_ring: MEM - 2,
            ..Q
        };
        let r = ChainWalker::new(WalkLimits::default()).walk(&m, &q, 0, 1);
        assert_eq!(r.bad_chains, 1);
        assert!(r.pages.is_empty());
    }
}
