//! net-echo and net-stream: frames of the VIO test protocol through a virtio-net device, to and
//! from `vio-netpeer` on the host side of its TAP; every frame's data is verified.
//!
//! Receive buffers come from a pool of pages, each posted buffer on the next page of the pool:
//! a buffer is on a page the guest has not touched for a while (under VIO, a page reclaim may
//! have taken, which the VMM brings back before it publishes the buffer).

use crate::arch::rdtsc;
use crate::boot::BootInfo;
use crate::memory::{Ram, PAGE};
use crate::report::Report;
use crate::stats::mix;
use crate::tsc::Clock;
use crate::virtio::*;

const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const HDR: usize = 12;
const ETH_HLEN: usize = 14;
const PHDR: usize = 28;
const MAX_FRAME: usize = 1514;
const MAX_DATA: u64 = (MAX_FRAME - ETH_HLEN - PHDR) as u64;
const ETHERTYPE: u16 = 0x88b5;
const MAGIC: u32 = 0x4e4f_4956; // "VION"
const ECHO_REQ: u8 = 1;
const ECHO_REP: u8 = 2;
const DATA: u8 = 3;
const PULL: u8 = 4;
const STATS_REQ: u8 = 6;
const STATS_REP: u8 = 7;
const RESET: u8 = 8;
const BROADCAST: [u8; 6] = [0xff; 6];
/// Where a deliberately malformed receive buffer points: far outside guest RAM.
const OUTSIDE_RAM: u64 = 1 << 44;

/// The data of frame `seq` (the same function as vio-netpeer's).
fn pattern(seq: u64, i: usize) -> u8 {
    (mix((seq << 16) ^ (i as u64 / 8)) >> (8 * (i % 8))) as u8
}

/// Whether `data` is the `len` bytes of `pattern(seq)` with their checksum `csum`.
fn intact(data: &[u8], len: u64, csum: u32, seq: u64) -> bool {
    data.len() as u64 == len
        && fnv1a(data) == csum
        && data.iter().enumerate().all(|(i, &b)| b == pattern(seq, i))
}

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

struct Params {
    ops: u64,
    len: u64,
    window: u64,
    pool_pages: u64,
    rx_buf: u64,
    mergeable: bool,
    event_idx: bool,
    bad_rx_every: u64,
    stall_s: u64,
    /// net-stream: each direction stops after this long (0: after `ops` frames).
    secs: u64,
    /// Idle this long (receive buffers posted, nothing sent) before the workload.
    idle_ms: u64,
}

impl Params {
    fn parse(info: &BootInfo, default_len: u64) -> Result<Params, &'static str> {
        let p = Params {
            ops: info.param_u64("vio.ops", 10_000)?,
            len: info.param_u64("vio.len", default_len)?,
            window: info.param_u64("vio.window", 64)?,
            pool_pages: info.param_u64("vio.pool_pages", 1024)?,
            rx_buf: info.param_u64("vio.rx_buf", 2048)?,
            mergeable: info.param_u64("vio.mrg", 1)? != 0,
            event_idx: info.param_u64("vio.event_idx", 0)? != 0,
            bad_rx_every: info.param_u64("vio.bad_rx_every", 0)?,
            stall_s: info.param_u64("vio.stall_s", 10)?,
            secs: info.param_u64("vio.secs", 0)?,
            idle_ms: info.param_u64("vio.idle_ms", 0)?,
        };
        if p.len > MAX_DATA {
            return Err("vio.len must be at most 1472");
        }
        if p.rx_buf < 64 || p.rx_buf > PAGE {
            return Err("vio.rx_buf must be 64..4096");
        }
        if !p.mergeable && p.rx_buf < (HDR + MAX_FRAME) as u64 {
            return Err("without vio.mrg, vio.rx_buf must hold a whole frame (1526)");
        }
        if p.window == 0 {
            return Err("vio.window must be > 0");
        }
        Ok(p)
    }
}

/// A received frame of the protocol.
struct Rx {
    kind: u8,
    seq: u64,
    len: usize,
    csum: u32,
}

struct NetDev {
    dev: VirtioPci,
    rx: Virtqueue,
    tx: Virtqueue,
    mac: [u8; 6],
    mergeable: bool,
    /// Receive buffers: the pool, its next page, and each descriptor's current page.
    pool: u64,
    pool_pages: u64,
    next_page: u64,
    rx_buf: u64,
    rx_page: u64,
    /// Every `bad_rx_every`-th receive buffer posted is malformed (0: none).
    bad_rx_every: u64,
    posted: u64,
    /// Transmit buffers, one page per descriptor.
    tx_pages: u64,
    tx_free: u64,
    /// The frame being reassembled, and its length.
    frame: u64,
    /// Malformed buffers the device returned (empty), and frames not of the protocol.
    pub bad_returned: u64,
    pub bad_accepted: u64,
    pub foreign: u64,
    pub rx_errors: u64,
}

impl NetDev {
    fn open(p: &Params, ram: &mut Ram) -> Result<NetDev, &'static str> {
        let mut func = None;
        crate::pci::scan(|f| {
            if func.is_none() && f.vendor == 0x1af4 && f.device == 0x1041 {
                func = Some(f);
            }
        });
        let func = func.ok_or("no virtio-net device")?;
        let mut dev = VirtioPci::probe(&func)?;
        let mut wanted = F_MAC;
        if p.mergeable {
            wanted |= F_MRG_RXBUF;
        }
        if p.event_idx {
            wanted |= F_EVENT_IDX;
        }
        let features = dev.init(wanted)?;
        if features & F_MAC == 0 {
            return Err("device has no MAC address");
        }
        if p.mergeable && features & F_MRG_RXBUF == 0 {
            return Err("device does not merge receive buffers");
        }
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = crate::arch::mmio_read8(dev.device_cfg + i as u64);
        }
        let rx = dev.setup_queue(0, 256, ram)?;
        let tx = dev.setup_queue(1, 256, ram)?;
        if p.pool_pages <= u64::from(rx.size) + 1 {
            return Err("vio.pool_pages must exceed the receive queue size");
        }
        let pool = ram.alloc(p.pool_pages * PAGE).ok_or("out of memory")?;
        let rx_page = ram.alloc(8 * u64::from(rx.size)).ok_or("out of memory")?;
        let tx_pages = ram
            .alloc(u64::from(tx.size) * PAGE)
            .ok_or("out of memory")?;
        let frame = ram.alloc(PAGE).ok_or("out of memory")?;
        let mut n = NetDev {
            dev,
            rx,
            tx,
            mac,
            mergeable: p.mergeable,
            pool,
            pool_pages: p.pool_pages,
            next_page: 0,
            rx_buf: p.rx_buf,
            rx_page,
            bad_rx_every: p.bad_rx_every,
            posted: 0,
            tx_pages,
            tx_free: 0,
            frame,
            bad_returned: 0,
            bad_accepted: 0,
            foreign: 0,
            rx_errors: 0,
        };
        n.tx_free = u64::from(n.tx.size);
        let old = n.rx.avail_idx();
        for d in 0..n.rx.size {
            n.post_rx(d);
        }
        n.rx.publish(old);
        n.dev.driver_ok();
        Ok(n)
    }

    /// Puts receive descriptor `d` on the ring with the pool's next page (or, now and then on
    /// request, malformed: outside RAM, an absurd length, or a chain that loops).
    fn post_rx(&mut self, d: u16) {
        self.posted += 1;
        let bad = self.bad_rx_every != 0 && self.posted.is_multiple_of(self.bad_rx_every);
        let (addr, len, flags, next) = match (bad, self.posted / self.bad_rx_every.max(1) % 3) {
            (true, 0) => (OUTSIDE_RAM, self.rx_buf as u32, DESC_F_WRITE, 0),
            (true, 1) => (self.pool, u32::MAX, DESC_F_WRITE, 0),
            (true, _) => (self.pool, self.rx_buf as u32, DESC_F_WRITE | DESC_F_NEXT, d),
            (false, _) => {
                // Page 0 of the pool is for malformed buffers only.
                let page = self.pool + (1 + self.next_page % (self.pool_pages - 1)) * PAGE;
                self.next_page += 1;
                (page, self.rx_buf as u32, DESC_F_WRITE, 0)
            }
        };
        // SAFETY: rx_page has a slot per receive descriptor.
        unsafe { core::ptr::write_volatile((self.rx_page + 8 * u64::from(d)) as *mut u64, addr) };
        self.rx.set_desc(d, addr, len, flags, next);
        self.rx.push(d);
    }

    /// Sends a protocol frame; `data` fills its data bytes.
    fn send(&mut self, kind: u8, seq: u64, count: u32, len: u64, data: impl Fn(usize) -> u8) {
        while self.tx_free == 0 {
            while self.tx.pop_used().is_some() {
                self.tx_free += 1;
            }
            crate::arch::pause();
        }
        // Descriptors are used in order: the next one is free.
        let d = self.tx.avail_idx() % self.tx.size;
        self.tx_free -= 1;
        let buf = self.tx_pages + u64::from(d) * PAGE;
        let total = HDR + ETH_HLEN + PHDR + len as usize;
        // SAFETY: `buf` is this descriptor's own page, which the device no longer reads.
        let b = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, total) };
        b[..HDR].fill(0);
        let f = &mut b[HDR..];
        f[0..6].copy_from_slice(&BROADCAST);
        f[6..12].copy_from_slice(&self.mac);
        f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        let (h, payload) = f[ETH_HLEN..].split_at_mut(PHDR);
        for (i, v) in payload.iter_mut().enumerate() {
            *v = data(i);
        }
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&[kind, 0, 0, 0]);
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        h[16..20].copy_from_slice(&count.to_le_bytes());
        h[20..24].copy_from_slice(&(len as u32).to_le_bytes());
        h[24..28].copy_from_slice(&fnv1a(payload).to_le_bytes());
        self.tx.set_desc(d, buf, total as u32, 0, 0);
        let old = self.tx.avail_idx();
        self.tx.push(d);
        self.tx.publish(old);
        while self.tx.pop_used().is_some() {
            self.tx_free += 1;
        }
    }

    /// The next received frame of the protocol, if one has arrived; its data is at
    /// `self.data()`.
    fn recv(&mut self) -> Option<Rx> {
        loop {
            let (id, len) = self.rx.pop_used()?;
            let old = self.rx.avail_idx();
            let got = self.collect(id as u16, len);
            self.rx.publish(old);
            let Some(flen) = got else { continue };
            // SAFETY: `frame` holds `flen` bytes just assembled.
            let f = unsafe { core::slice::from_raw_parts(self.frame as *const u8, flen) };
            if flen < ETH_HLEN + PHDR
                || f[12..14] != ETHERTYPE.to_be_bytes()
                || f[14..18] != MAGIC.to_le_bytes()
            {
                self.foreign += 1;
                continue;
            }
            let h = &f[ETH_HLEN..];
            let rx = Rx {
                kind: h[4],
                seq: u64::from_le_bytes(h[8..16].try_into().unwrap()),
                len: u32::from_le_bytes(h[20..24].try_into().unwrap()) as usize,
                csum: u32::from_le_bytes(h[24..28].try_into().unwrap()),
            };
            if rx.len > flen - ETH_HLEN - PHDR {
                self.rx_errors += 1;
                continue;
            }
            return Some(rx);
        }
    }

    fn data(&self, len: usize) -> &[u8] {
        // SAFETY: `frame` holds the last frame `recv` returned, of at least this many bytes.
        unsafe {
            core::slice::from_raw_parts((self.frame + (ETH_HLEN + PHDR) as u64) as *const u8, len)
        }
    }

    /// Copies the frame starting in descriptor `d` (and, merged, the buffers after it) into
    /// `frame`, reposting every buffer. None: no frame (an empty buffer, an error).
    fn collect(&mut self, d: u16, len: u32) -> Option<usize> {
        if d >= self.rx.size {
            self.rx_errors += 1;
            return None;
        }
        // SAFETY: rx_page has a slot per receive descriptor.
        let addr =
            unsafe { core::ptr::read_volatile((self.rx_page + 8 * u64::from(d)) as *const u64) };
        if addr == OUTSIDE_RAM || addr == self.pool {
            // A malformed buffer must come back empty.
            if len == 0 {
                self.bad_returned += 1;
            } else {
                self.bad_accepted += 1;
            }
            self.post_rx(d);
            return None;
        }
        if (len as usize) < HDR || len > self.rx_buf as u32 {
            self.rx_errors += 1;
            self.post_rx(d);
            return None;
        }
        // SAFETY: the device wrote `len` bytes into this descriptor's buffer.
        let buf = unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) };
        let nbufs = if self.mergeable {
            u16::from_le_bytes([buf[10], buf[11]])
        } else {
            1
        };
        let mut flen = 0usize;
        let mut ok = nbufs >= 1;
        let frame = self.frame;
        let take = |flen: &mut usize, data: &[u8]| {
            if *flen + data.len() > PAGE as usize {
                return false;
            }
            // SAFETY: `frame` is a page; the bound was checked.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    (frame + *flen as u64) as *mut u8,
                    data.len(),
                )
            };
            *flen += data.len();
            true
        };
        ok &= take(&mut flen, &buf[HDR..]);
        self.post_rx(d);
        for _ in 1..nbufs {
            // Merged buffers are published together with the first.
            let Some((id, l)) = self.rx.pop_used() else {
                self.rx_errors += 1;
                return None;
            };
            let d = id as u16;
            if d >= self.rx.size || l > self.rx_buf as u32 {
                self.rx_errors += 1;
                return None;
            }
            // SAFETY: rx_page has a slot per receive descriptor.
            let a = unsafe {
                core::ptr::read_volatile((self.rx_page + 8 * u64::from(d)) as *const u64)
            };
            // SAFETY: the device wrote `l` bytes into this buffer.
            let b = unsafe { core::slice::from_raw_parts(a as *const u8, l as usize) };
            ok &= take(&mut flen, b);
            self.post_rx(d);
        }
        if !ok {
            self.rx_errors += 1;
            return None;
        }
        Some(flen)
    }

    /// Waits up to `ticks` for a frame of `kind` (and `seq`, if given); others are dropped.
    fn wait_for(&mut self, kind: u8, seq: Option<u64>, ticks: u64) -> Option<Rx> {
        let start = rdtsc();
        loop {
            if let Some(rx) = self.recv() {
                if rx.kind == kind && seq.is_none_or(|s| s == rx.seq) {
                    return Some(rx);
                }
                continue;
            }
            if rdtsc() - start > ticks {
                return None;
            }
            crate::arch::pause();
        }
    }

    /// Waits until the peer answers (it may attach after the guest starts) and resets its
    /// counters.
    fn sync(&mut self, clock: &Clock, stall_s: u64) -> Result<(), &'static str> {
        let tries = stall_s * 10;
        for i in 0..tries {
            self.send(RESET, i, 0, 0, |_| 0);
            if self
                .wait_for(RESET, Some(i), clock.ticks(100_000_000))
                .is_some()
            {
                return Ok(());
            }
        }
        Err("no answer from the network peer")
    }
}

fn echo(p: &Params, n: &mut NetDev, clock: &Clock, report: &mut Report) {
    let stall = clock.ticks(p.stall_s * 1_000_000_000);
    let start = rdtsc();
    let mut lost = 0;
    for seq in 0..p.ops {
        let t0 = rdtsc();
        n.send(ECHO_REQ, seq, 0, p.len, |i| pattern(seq ^ 0x5a5a, i));
        match n.wait_for(ECHO_REP, Some(seq), stall) {
            Some(rx) => {
                report.hist.record(clock.ns(rdtsc() - t0));
                let data = n.data(rx.len);
                if !intact(data, p.len, rx.csum, seq ^ 0x5a5a) {
                    report.mismatches += 1;
                }
                report.reads += 1;
            }
            None => lost += 1,
        }
        report.writes += 1;
        report.ops += 1;
    }
    report.elapsed_ns = clock.ns(rdtsc() - start);
    report.io_errors += lost;
    report.extra("lost", lost);
}

fn stream(
    p: &Params,
    n: &mut NetDev,
    clock: &Clock,
    report: &mut Report,
) -> Result<(), &'static str> {
    let stall = clock.ticks(p.stall_s * 1_000_000_000);
    // Transmit: windows of frames, each confirmed by the peer's counts (no queue overflows,
    // whatever the speeds).
    let limit = clock.ticks(p.secs.saturating_mul(1_000_000_000));
    let over = |since: u64| p.secs != 0 && rdtsc() - since > limit;
    let t0 = rdtsc();
    let mut seq = 0;
    let mut stats = [0u64; 4];
    while seq < p.ops && !over(t0) {
        let end = (seq + p.window).min(p.ops);
        for s in seq..end {
            n.send(DATA, s, 0, p.len, |i| pattern(s, i));
        }
        seq = end;
        n.send(STATS_REQ, seq, 0, 0, |_| 0);
        let rx = n
            .wait_for(STATS_REP, Some(seq), stall)
            .ok_or("the peer stopped answering")?;
        let d = n.data(rx.len.min(32));
        for (i, v) in stats.iter_mut().enumerate() {
            *v = u64::from_le_bytes(d[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]));
        }
    }
    let tx_ns = clock.ns(rdtsc() - t0);
    let tx_sent = seq;
    let [tx_frames, tx_corrupt, _, tx_bytes] = stats;
    // Receive: the peer sends windows of frames on request.
    let t1 = rdtsc();
    let (mut rx_frames, mut rx_corrupt, mut rx_bytes) = (0u64, 0u64, 0u64);
    seq = 0;
    while seq < p.ops && !over(t1) {
        let count = p.window.min(p.ops - seq);
        n.send(PULL, seq, count as u32, p.len, |_| 0);
        let mut got = 0;
        let start = rdtsc();
        while got < count && rdtsc() - start < stall {
            let Some(rx) = n.recv() else {
                crate::arch::pause();
                continue;
            };
            if rx.kind != DATA || rx.seq < seq || rx.seq >= seq + count {
                continue;
            }
            got += 1;
            let data = n.data(rx.len);
            rx_corrupt += u64::from(!intact(data, p.len, rx.csum, rx.seq));
            rx_bytes += rx.len as u64;
        }
        rx_frames += got;
        seq += count;
    }
    let rx_ns = clock.ns(rdtsc() - t1);
    let lost = (tx_sent - tx_frames.min(tx_sent)) + (seq - rx_frames);
    report.writes = tx_frames;
    report.reads = rx_frames;
    report.ops = tx_frames + rx_frames;
    report.mismatches = tx_corrupt + rx_corrupt;
    report.io_errors = lost;
    report.elapsed_ns = tx_ns + rx_ns;
    report.extra("lost", lost);
    report.extra("tx_mbps", tx_bytes * 8 * 1000 / tx_ns.max(1));
    report.extra("rx_mbps", rx_bytes * 8 * 1000 / rx_ns.max(1));
    report.extra("tx_fps", tx_frames * 1_000_000_000 / tx_ns.max(1));
    report.extra("rx_fps", rx_frames * 1_000_000_000 / rx_ns.max(1));
    Ok(())
}

pub fn run_echo(
    info: &BootInfo,
    ram: &mut Ram,
    clock: &Clock,
    report: &mut Report,
) -> Result<(), &'static str> {
    run(info, ram, clock, report, false)
}

pub fn run_stream(
    info: &BootInfo,
    ram: &mut Ram,
    clock: &Clock,
    report: &mut Report,
) -> Result<(), &'static str> {
    run(info, ram, clock, report, true)
}

fn run(
    info: &BootInfo,
    ram: &mut Ram,
    clock: &Clock,
    report: &mut Report,
    bulk: bool,
) -> Result<(), &'static str> {
    let p = Params::parse(info, if bulk { MAX_DATA } else { 64 })?;
    let mut n = NetDev::open(&p, ram)?;
    n.sync(clock, p.stall_s)?;
    let m = n.mac;
    crate::println!(
        "VIO-GUEST-INFO {{\"device\":\"virtio-net\",\"mac\":\"{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}\",\"features\":{},\"queue_size\":{}}}",
        m[0], m[1], m[2], m[3], m[4], m[5], n.dev.features, n.rx.size
    );
    let idle = rdtsc();
    while rdtsc() - idle < clock.ticks(p.idle_ms.saturating_mul(1_000_000)) {
        crate::arch::pause();
    }
    if bulk {
        stream(&p, &mut n, clock, report)?;
    } else {
        echo(&p, &mut n, clock, report);
    }
    report.extra("bad_rx_returned", n.bad_returned);
    report.extra("bad_rx_accepted", n.bad_accepted);
    report.extra("rx_errors", n.rx_errors);
    report.extra("foreign", n.foreign);
    report.extra("rx_kicks", n.rx.kicks);
    report.extra("tx_kicks", n.tx.kicks);
    n.dev.reset();
    Ok(())
}
