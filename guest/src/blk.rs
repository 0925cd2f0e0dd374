//! blk-verify: random reads and writes through a virtio-blk device; every written block
//! carries a stamp (lba, generation, seed) that every later read of it verifies in full.

use crate::arch::{mmio_read32, rdtsc};
use crate::boot::BootInfo;
use crate::memory::{Ram, PAGE};
use crate::report::Report;
use crate::stats::{mix, Rng};
use crate::tsc::Clock;
use crate::virtio::*;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const F_SEG_MAX: u64 = 1 << 2;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const MAGIC: u64 = 0x5649_4f42_4c4b_3031; // "VIOBLK01"
const NONE: u32 = u32::MAX;
/// Data descriptors per request at most (`vio.segs`): long chains, as seg_max allows.
const MAX_SEGS: u64 = 64;
/// Where a deliberately malformed request points its data buffer: far outside guest RAM.
const OUTSIDE_RAM: u64 = 1 << 44;

struct Params {
    ops: u64,
    qd: u64,
    bs: u64,
    rate: u64,
    pool_pages: u64,
    /// After this many requests the buffers move to a second pool, disjoint from the first
    /// (a hot set that moves); 0: one pool throughout.
    pool_switch: u64,
    indirect: bool,
    event_idx: bool,
    seed: u64,
    write_pct: u64,
    stall_s: u64,
    segs: u64,
    bad_every: u64,
    phases: Phases,
}

/// `vio.phases=RATE:DURATION,...`: the rate (ops/s, 0 = as fast as possible) changes over
/// time, e.g. `500:3s,0:3s,500:3s`; the run ends with the last phase (`vio.ops` still caps it).
#[derive(Clone, Copy, Default)]
struct Phases {
    /// (rate, end in ns since the start)
    list: [(u64, u64); 8],
    len: usize,
}

impl Phases {
    fn parse(raw: Option<&str>) -> Result<Phases, &'static str> {
        const BAD: &str = "vio.phases must be RATE:DURATION(s|ms),... (up to 8)";
        let mut p = Phases::default();
        let Some(raw) = raw else {
            return Ok(p);
        };
        let mut end = 0u64;
        for item in raw.split(',') {
            let (rate, dur) = item.split_once(':').ok_or(BAD)?;
            let rate = rate.parse::<u64>().map_err(|_| BAD)?;
            let ns = if let Some(ms) = dur.strip_suffix("ms") {
                ms.parse::<u64>().map_err(|_| BAD)?.checked_mul(1_000_000)
            } else if let Some(sec) = dur.strip_suffix('s') {
                sec.parse::<u64>()
                    .map_err(|_| BAD)?
                    .checked_mul(1_000_000_000)
            } else {
                None
            };
            end = end.checked_add(ns.ok_or(BAD)?).ok_or(BAD)?;
            *p.list.get_mut(p.len).ok_or(BAD)? = (rate, end);
            p.len += 1;
        }
        Ok(p)
    }

    /// The phase in force `ns` after the start: its index and rate; `None` once all are over.
    fn at(&self, ns: u64) -> Option<(usize, u64)> {
        self.list[..self.len]
            .iter()
            .position(|&(_, end)| ns < end)
            .map(|i| (i, self.list[i].0))
    }
}

impl Params {
    fn parse(info: &BootInfo) -> Result<Params, &'static str> {
        let p = Params {
            ops: info.param_u64("vio.ops", 10_000)?,
            qd: info.param_u64("vio.qd", 1)?,
            bs: info.param_u64("vio.bs", 4096)?,
            rate: info.param_u64("vio.rate", 0)?,
            pool_pages: info.param_u64("vio.pool_pages", 256)?,
            pool_switch: info.param_u64("vio.pool_switch", 0)?,
            indirect: info.param_u64("vio.indirect", 0)? != 0,
            event_idx: info.param_u64("vio.event_idx", 0)? != 0,
            seed: info.param_u64("vio.seed", 1)?,
            write_pct: info.param_u64("vio.write_pct", 50)?,
            stall_s: info.param_u64("vio.stall_s", 30)?,
            segs: info.param_u64("vio.segs", 1)?,
            bad_every: info.param_u64("vio.bad_every", 0)?,
            phases: Phases::parse(info.param("vio.phases"))?,
        };
        if p.segs == 0 || p.segs > MAX_SEGS || !p.bs.is_multiple_of(p.segs) {
            return Err("vio.segs must be 1..64 and divide vio.bs");
        }
        if p.bs < 512 || p.bs > PAGE || !p.bs.is_multiple_of(512) {
            return Err("vio.bs must be a multiple of 512 up to 4096");
        }
        if p.qd == 0 || p.write_pct > 100 {
            return Err("vio.qd must be > 0 and vio.write_pct <= 100");
        }
        if p.pool_pages < p.qd {
            return Err("vio.pool_pages must be >= vio.qd");
        }
        Ok(p)
    }
}

/// Per in-flight request: a control page (header at 0, status at 16, indirect table at 64).
#[derive(Clone, Copy)]
struct Slot {
    ctrl: u64,
    lba: u64,
    pool: u32,
    gen: u32,
    write: bool,
    /// Malformed on purpose (`vio.bad_every`): its data buffer lies outside guest RAM.
    bad: bool,
    start: u64,
}

/// Fixed-size arrays carved out of the arena.
struct Array<T: Copy> {
    base: *mut T,
    len: u64,
}

impl<T: Copy> Array<T> {
    fn new(ram: &mut Ram, len: u64) -> Result<Self, &'static str> {
        let base = ram
            .alloc(len * core::mem::size_of::<T>() as u64)
            .ok_or("out of memory")? as *mut T;
        Ok(Array { base, len })
    }
    fn get(&self, i: u64) -> T {
        assert!(i < self.len);
        // SAFETY: bounds-checked index into arena memory zeroed at allocation (all-zero is a
        // valid value for the integer and plain-data types used here).
        unsafe { self.base.add(i as usize).read() }
    }
    fn set(&self, i: u64, v: T) {
        assert!(i < self.len);
        // SAFETY: as in get.
        unsafe { self.base.add(i as usize).write(v) }
    }
}

fn block_word(lba: u64, gen: u32, seed: u64, i: u64) -> u64 {
    match i {
        0 => MAGIC,
        1 => lba,
        2 => gen as u64,
        3 => seed,
        _ => mix(lba.wrapping_mul(0x1_0000_0001) ^ (gen as u64) << 40 ^ seed.rotate_left(29) ^ i),
    }
}

fn fill_block(page: u64, bs: u64, lba: u64, gen: u32, seed: u64) {
    let p = page as *mut u64;
    for i in 0..bs / 8 {
        // SAFETY: page is a pool page owned by this request while it is not in flight.
        unsafe {
            p.add(i as usize)
                .write_volatile(block_word(lba, gen, seed, i))
        };
    }
}

fn check_block(page: u64, bs: u64, lba: u64, gen: u32, seed: u64) -> bool {
    let p = page as *const u64;
    (0..bs / 8).all(|i| {
        // SAFETY: as in fill_block; the device has completed the request.
        let v = unsafe { p.add(i as usize).read_volatile() };
        v == block_word(lba, gen, seed, i)
    })
}

struct Disk {
    dev: VirtioPci,
    vq: Virtqueue,
    indirect: bool,
    /// The data buffer goes in this many descriptors.
    segs: u16,
}

impl Disk {
    /// Descriptors one request takes in the ring.
    fn per_slot(&self) -> u16 {
        if self.indirect {
            1
        } else {
            self.segs + 2
        }
    }

    /// Lays the request out as Linux does: header, data (in `segs` pieces), status, each its
    /// own descriptor.
    fn post(&mut self, slot: u16, ctrl: u64, kind: u32, sector: u64, data: u64, len: u32) {
        // SAFETY: ctrl is this slot's control page.
        unsafe {
            core::ptr::write_volatile(ctrl as *mut u32, kind);
            core::ptr::write_volatile((ctrl + 4) as *mut u32, 0);
            core::ptr::write_volatile((ctrl + 8) as *mut u64, sector);
            core::ptr::write_volatile((ctrl + 16) as *mut u8, 0xff);
        }
        let data_flags = if kind == T_OUT { 0 } else { DESC_F_WRITE };
        let mut segs = [(0u64, 0u32, 0u16); MAX_SEGS as usize + 2];
        segs[0] = (ctrl, 16, 0);
        let pieces = if len == 0 { 0 } else { u32::from(self.segs) };
        for i in 0..pieces {
            let l = len / pieces;
            segs[1 + i as usize] = (data + u64::from(i * l), l, data_flags);
        }
        let n = pieces as usize + 2;
        segs[n - 1] = (ctrl + 16, 1, DESC_F_WRITE);
        let segs = &segs[..n];
        if self.indirect {
            let table = ctrl + 64;
            for (i, &(a, l, f)) in segs.iter().enumerate() {
                let next = if i + 1 < n { DESC_F_NEXT } else { 0 };
                write_desc(table + 16 * i as u64, a, l, f | next, i as u16 + 1);
            }
            self.vq
                .set_desc(slot, table, 16 * n as u32, DESC_F_INDIRECT, 0);
            self.vq.push(slot);
        } else {
            let head = slot * self.per_slot();
            for (i, &(a, l, f)) in segs.iter().enumerate() {
                let next = if i + 1 < n { DESC_F_NEXT } else { 0 };
                self.vq
                    .set_desc(head + i as u16, a, l, f | next, head + i as u16 + 1);
            }
            self.vq.push(head);
        }
    }

    fn slot_of(&self, id: u32) -> u32 {
        id / u32::from(self.per_slot())
    }

    /// One synchronous request (setup and teardown), on slot 0.
    fn sync(&mut self, ctrl: u64, kind: u32, data: u64, len: u32) -> Result<u8, &'static str> {
        let old = self.vq.avail_idx();
        self.post(0, ctrl, kind, 0, data, len);
        self.vq.publish(old);
        let t0 = rdtsc();
        loop {
            if self.vq.pop_used().is_some() {
                // SAFETY: status byte of slot 0's control page.
                return Ok(unsafe { core::ptr::read_volatile((ctrl + 16) as *const u8) });
            }
            if rdtsc() - t0 > 1u64 << 40 {
                return Err("device does not complete a request");
            }
        }
    }
}

pub fn run(
    info: &BootInfo,
    ram: &mut Ram,
    clock: &Clock,
    report: &mut Report,
) -> Result<(), &'static str> {
    let p = Params::parse(info)?;
    let mut func = None;
    crate::pci::scan(|f| {
        if func.is_none() && f.vendor == 0x1af4 && f.device == 0x1042 {
            func = Some(f);
        }
    });
    let func = func.ok_or("no virtio-blk device")?;
    let mut dev = VirtioPci::probe(&func)?;
    let mut wanted = F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
    if p.indirect {
        wanted |= F_INDIRECT_DESC;
    }
    if p.event_idx {
        wanted |= F_EVENT_IDX;
    }
    let features = dev.init(wanted)?;
    if p.indirect && features & F_INDIRECT_DESC == 0 {
        return Err("device does not offer indirect descriptors");
    }
    if p.event_idx && features & F_EVENT_IDX == 0 {
        return Err("device does not offer event-idx");
    }
    let capacity =
        mmio_read32(dev.device_cfg) as u64 | (mmio_read32(dev.device_cfg + 4) as u64) << 32;
    // virtio-blk config: capacity (u64), size_max (u32), seg_max (u32).
    if features & F_SEG_MAX != 0 && p.segs > mmio_read32(dev.device_cfg + 12) as u64 {
        return Err("vio.segs exceeds the device's seg_max");
    }
    let blocks = capacity * 512 / p.bs;
    if blocks < 2 * p.qd {
        return Err("disk too small for vio.qd");
    }
    let vq = dev.setup_queue(0, 256, ram)?;
    let per_req = if p.indirect { 1 } else { p.segs + 2 };
    if p.qd * per_req > vq.size as u64 {
        return Err("vio.qd does not fit in the queue");
    }
    dev.driver_ok();
    let mut disk = Disk {
        dev,
        vq,
        indirect: p.indirect,
        segs: p.segs as u16,
    };

    let ctrl_base = ram.alloc(p.qd * PAGE).ok_or("out of memory")?;
    let gens: Array<u32> = Array::new(ram, blocks)?;
    let busy: Array<u8> = Array::new(ram, blocks)?;
    let pools = if p.pool_switch > 0 { 2 } else { 1 };
    let pool_busy: Array<u8> = Array::new(ram, pools * p.pool_pages)?;
    let slots: Array<Slot> = Array::new(ram, p.qd)?;
    let free: Array<u32> = Array::new(ram, p.qd)?;
    let pool: Array<u64> = Array::new(ram, pools * p.pool_pages)?;
    for i in 0..pools * p.pool_pages {
        pool.set(
            i,
            ram.spread_page(i, pools * p.pool_pages)
                .ok_or("vio.pool_pages exceeds free RAM")?,
        );
    }

    // GET_ID through the same path, as a smoke test of the device.
    let id_buf = ctrl_base + 512;
    if disk.sync(ctrl_base, T_GET_ID, id_buf, 20)? == S_OK {
        // SAFETY: 20 bytes the device just wrote into slot 0's control page.
        let id = unsafe { core::slice::from_raw_parts(id_buf as *const u8, 20) };
        let len = id.iter().position(|&b| b == 0).unwrap_or(20);
        crate::println!(
            "VIO-GUEST-INFO {{\"device_id\":\"{}\",\"capacity_sectors\":{},\"features\":{},\"queue_size\":{}}}",
            core::str::from_utf8(&id[..len]).unwrap_or("?"),
            capacity,
            features,
            disk.vq.size
        );
    }

    for i in 0..p.qd {
        free.set(i, i as u32);
    }
    let mut nfree = p.qd;
    let mut rng = Rng::new(p.seed);
    let mut submitted = 0u64;
    let ticks_per_op = |rate: u64| (clock.khz * 1000).checked_div(rate).unwrap_or(0);
    let mut tick_per_op = ticks_per_op(p.rate);
    let mut next_submit = rdtsc();
    let start = rdtsc();
    let mut last_progress = start;
    let mut idle_since = rdtsc();
    let mut phase = None;
    let mut phases_over = false;

    while report.ops < p.ops && !(phases_over && nfree == p.qd) {
        let old = disk.vq.avail_idx();
        let mut pushed = false;
        if p.phases.len > 0 && !phases_over {
            let now = rdtsc();
            match p.phases.at(clock.ns(now - start)) {
                None => phases_over = true,
                Some((i, rate)) if phase != Some(i) => {
                    phase = Some(i);
                    tick_per_op = ticks_per_op(rate);
                    next_submit = now;
                }
                Some(_) => {}
            }
        }
        while nfree > 0 && submitted < p.ops && !phases_over {
            let now = rdtsc();
            if tick_per_op != 0 {
                if now < next_submit {
                    break;
                }
                next_submit += tick_per_op;
            }
            let mut lba = rng.below(blocks);
            while busy.get(lba) != 0 {
                lba = (lba + 1) % blocks;
            }
            let base = if p.pool_switch > 0 && submitted >= p.pool_switch {
                p.pool_pages
            } else {
                0
            };
            let mut pi = base + rng.below(p.pool_pages);
            while pool_busy.get(pi) != 0 {
                pi = base + (pi - base + 1) % p.pool_pages;
            }
            nfree -= 1;
            let s = free.get(nfree);
            let write = rng.below(100) < p.write_pct;
            let bad = p.bad_every != 0 && (submitted + 1).is_multiple_of(p.bad_every);
            let mut gen = gens.get(lba);
            if write && !bad {
                gen = gen.wrapping_add(1).max(1);
                fill_block(pool.get(pi), p.bs, lba, gen, p.seed);
            }
            busy.set(lba, 1);
            pool_busy.set(pi, 1);
            let ctrl = ctrl_base + s as u64 * PAGE;
            slots.set(
                s as u64,
                Slot {
                    ctrl,
                    lba,
                    pool: pi as u32,
                    gen,
                    write,
                    bad,
                    start: now,
                },
            );
            let kind = if write { T_OUT } else { T_IN };
            disk.post(
                s as u16,
                ctrl,
                kind,
                lba * p.bs / 512,
                if bad { OUTSIDE_RAM } else { pool.get(pi) },
                p.bs as u32,
            );
            submitted += 1;
            pushed = true;
        }
        if pushed {
            disk.vq.publish(old);
        }

        let mut progressed = false;
        while let Some((id, _len)) = disk.vq.pop_used() {
            progressed = true;
            let s = disk.slot_of(id) as u64;
            if s >= p.qd || slots.get(s).pool == NONE {
                return Err("device returned an unknown descriptor id");
            }
            let slot = slots.get(s);
            let now = rdtsc();
            // SAFETY: status byte in the slot's control page, written by the device.
            let status = unsafe { core::ptr::read_volatile((slot.ctrl + 16) as *const u8) };
            if slot.bad {
                // The device never reached the buffer, so the block is as it was.
                if status == S_OK {
                    report.bad_succeeded += 1;
                } else {
                    report.bad_failed += 1;
                }
            } else if slot.write {
                report.writes += 1;
                // A failed write leaves the block's content unknown.
                gens.set(slot.lba, if status == S_OK { slot.gen } else { 0 });
            } else {
                report.reads += 1;
            }
            if slot.bad {
                // Counted above.
            } else if status != S_OK {
                report.io_errors += 1;
            } else if !slot.write
                && slot.gen != 0
                && !check_block(pool.get(slot.pool as u64), p.bs, slot.lba, slot.gen, p.seed)
            {
                report.mismatches += 1;
                if report.mismatches <= 5 {
                    crate::println!(
                        "VIO-GUEST-MISMATCH {{\"lba\":{},\"gen\":{}}}",
                        slot.lba,
                        slot.gen
                    );
                }
            }
            report.hist.record(clock.ns(now - slot.start));
            report.ops += 1;
            busy.set(slot.lba, 0);
            pool_busy.set(slot.pool as u64, 0);
            slots.set(s, Slot { pool: NONE, ..slot });
            free.set(nfree, s as u32);
            nfree += 1;
        }
        let now = rdtsc();
        if progressed || nfree == p.qd {
            idle_since = now;
        } else if clock.ns(now - idle_since) > p.stall_s.saturating_mul(1_000_000_000) {
            return Err("requests stalled (vio.stall_s)");
        }
        if clock.ns(now - last_progress) >= 1_000_000_000 {
            last_progress = now;
            report.progress(clock.ns(now - start));
        }
    }
    report.elapsed_ns = clock.ns(rdtsc() - start);
    if disk.sync(ctrl_base, T_FLUSH, 0, 0)? != S_OK {
        report.io_errors += 1;
    }
    disk.dev.reset();
    report.progress(report.elapsed_ns);
    Ok(())
}
