//! The virtio-blk request engine, generic over how guest memory is reached.
//!
//! A request is framed however the driver likes (virtio 1.x 5.2.6.4): the header is the first
//! 16 device-readable bytes, the status is the last device-writable byte, the data is what lies
//! between. Every guest-controlled field is validated; a bad request completes with IOERR (or
//! UNSUPP) and never panics.

use super::disk::RawFile;
use super::{SECTOR_SIZE, VIRTIO_BLK_ID_BYTES};
use crate::LogLimiter;
use log::warn;
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
const HEADER_LEN: u64 = 16;
/// Largest transfer a single request may ask for; bounds work per request.
const MAX_REQUEST_BYTES: u64 = 64 << 20;

static BAD_REQUEST_LOG: LogLimiter = LogLimiter::new(10, 10_000);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetDeviceId,
    Unsupported(u32),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("Descriptor chain has no status byte")]
    NoStatus,
    #[error("Header shorter than 16 bytes")]
    ShortHeader,
    #[error("Device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("Header is not in guest memory")]
    HeaderAccess,
    #[error("Data length {0} is not a multiple of the sector size")]
    Unaligned(u64),
    #[error("Sectors {sector}+{len} lie beyond the disk end")]
    OutOfRange { sector: u64, len: u64 },
    #[error("Request of {0} bytes is too large")]
    TooLarge(u64),
    #[error("Write to a read-only disk")]
    ReadOnly,
    #[error("Data buffer {0:#x} is not accessible")]
    BadBuffer(u64),
    #[error("Disk I/O failed: {0}")]
    Io(String),
}

/// A span of guest memory, from one descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// Data spans, in order (device-readable for OUT, device-writable otherwise).
    pub data: Vec<Segment>,
    pub status: GuestAddress,
}

/// The `len` bytes that follow the first `skip` bytes of `segs`, as sub-spans.
fn sub_spans(segs: &[Segment], mut skip: u64, mut len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        if len == 0 {
            break;
        }
        let slen = u64::from(s.len);
        if skip >= slen {
            skip -= slen;
            continue;
        }
        let take = (slen - skip).min(len);
        out.push(Segment {
            addr: s.addr.wrapping_add(skip),
            len: take as u32,
        });
        len -= take;
        skip = 0;
    }
    out
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

impl Request {
    /// Parses a chain. Errors after the status byte is known come back as `Err` together with
    /// where to write the status.
    pub fn parse<M, T>(
        chain: DescriptorChain<T>,
        mem: &M,
    ) -> Result<Request, (RequestError, Option<GuestAddress>)>
    where
        M: GuestMemory + ?Sized,
        T: std::ops::Deref<Target = M>,
    {
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut order_error = false;
        for d in chain {
            let seg = Segment {
                addr: d.addr().0,
                len: d.len(),
            };
            if d.is_write_only() {
                writable.push(seg);
            } else {
                order_error |= !writable.is_empty();
                readable.push(seg);
            }
        }
        // The status byte is the chain's last writable byte.
        let wtotal = total(&writable);
        let status = match sub_spans(&writable, wtotal.saturating_sub(1), 1).first() {
            Some(s) if wtotal > 0 => GuestAddress(s.addr),
            _ => return Err((RequestError::NoStatus, None)),
        };
        let fail = |e| Err((e, Some(status)));
        if order_error {
            return fail(RequestError::ReadableAfterWritable);
        }
        if total(&readable) < HEADER_LEN {
            return fail(RequestError::ShortHeader);
        }
        let mut header = [0u8; HEADER_LEN as usize];
        let mut filled = 0usize;
        for s in sub_spans(&readable, 0, HEADER_LEN) {
            let dst = &mut header[filled..filled + s.len as usize];
            if mem.read_slice(dst, GuestAddress(s.addr)).is_err() {
                return fail(RequestError::HeaderAccess);
            }
            filled += s.len as usize;
        }
        let kind = match u32::from_le_bytes(header[0..4].try_into().unwrap()) {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetDeviceId,
            t => RequestType::Unsupported(t),
        };
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let data = match kind {
            RequestType::Out => {
                let rtotal = total(&readable);
                sub_spans(&readable, HEADER_LEN, rtotal - HEADER_LEN)
            }
            _ => sub_spans(&writable, 0, wtotal - 1),
        };
        Ok(Request {
            kind,
            sector,
            data,
            status,
        })
    }

    pub fn data_len(&self) -> u64 {
        total(&self.data)
    }
}

#[derive(Default)]
pub struct BlockCounters {
    pub read_ops: AtomicU64,
    pub write_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flush_ops: AtomicU64,
    pub io_errors: AtomicU64,
    pub bad_requests: AtomicU64,
    /// GET_ID and unsupported types.
    pub other_ops: AtomicU64,
}

impl BlockCounters {
    /// Requests answered so far, whatever their outcome.
    pub fn requests(&self) -> u64 {
        [
            &self.read_ops,
            &self.write_ops,
            &self.flush_ops,
            &self.io_errors,
            &self.bad_requests,
            &self.other_ops,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    pub fn snapshot(&self) -> crate::Counters {
        let mut c = crate::Counters::new();
        for (k, v) in [
            ("read_ops", &self.read_ops),
            ("write_ops", &self.write_ops),
            ("read_bytes", &self.read_bytes),
            ("write_bytes", &self.write_bytes),
            ("flush_ops", &self.flush_ops),
            ("io_errors", &self.io_errors),
            ("bad_requests", &self.bad_requests),
            ("other_ops", &self.other_ops),
        ] {
            c.insert(k.to_string(), v.load(Ordering::Relaxed));
        }
        c
    }
}

/// Executes requests against a disk. Holds no guest memory: callers pass their view of it.
pub struct BlockEngine<'a> {
    pub disk: &'a RawFile,
    pub serial: &'a [u8; VIRTIO_BLK_ID_BYTES],
    pub counters: &'a BlockCounters,
}

impl BlockEngine<'_> {
    fn capacity_sectors(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    fn check_range(&self, req: &Request) -> Result<u64, RequestError> {
        let len = req.data_len();
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::Unaligned(len));
        }
        if len > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(len));
        }
        let end = req.sector.checked_add(len / SECTOR_SIZE);
        if end.is_none_or(|e| e > self.capacity_sectors()) {
            return Err(RequestError::OutOfRange {
                sector: req.sector,
                len,
            });
        }
        Ok(len)
    }

    /// Runs a parsed request; returns the bytes written into device-writable buffers,
    /// excluding the status byte.
    pub fn execute<M: GuestMemory + ?Sized>(
        &self,
        req: &Request,
        mem: &M,
    ) -> Result<u32, RequestError> {
        match req.kind {
            RequestType::In | RequestType::Out => {
                let len = self.check_range(req)?;
                let write = req.kind == RequestType::Out;
                if write && self.disk.readonly() {
                    return Err(RequestError::ReadOnly);
                }
                let access = if write {
                    Permissions::Read
                } else {
                    Permissions::Write
                };
                let mut offset = req.sector * SECTOR_SIZE;
                for seg in &req.data {
                    let slices = mem
                        .get_slices(GuestAddress(seg.addr), seg.len as usize, access)
                        .map_err(|_| RequestError::BadBuffer(seg.addr))?;
                    for slice in slices {
                        let slice = slice.map_err(|_| RequestError::BadBuffer(seg.addr))?;
                        let r = if write {
                            self.disk.write_from(&slice, offset)
                        } else {
                            self.disk.read_into(&slice, offset)
                        };
                        r.map_err(|e| RequestError::Io(e.to_string()))?;
                        offset += slice.len() as u64;
                    }
                }
                let (ops, bytes) = if write {
                    (&self.counters.write_ops, &self.counters.write_bytes)
                } else {
                    (&self.counters.read_ops, &self.counters.read_bytes)
                };
                ops.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(len, Ordering::Relaxed);
                Ok(if write { 0 } else { len as u32 })
            }
            RequestType::Flush => {
                self.disk
                    .flush()
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                self.counters.flush_ops.fetch_add(1, Ordering::Relaxed);
                Ok(0)
            }
            RequestType::GetDeviceId => {
                let mut written = 0u32;
                for seg in sub_spans(&req.data, 0, VIRTIO_BLK_ID_BYTES as u64) {
                    let src = &self.serial[written as usize..written as usize + seg.len as usize];
                    mem.write_slice(src, GuestAddress(seg.addr))
                        .map_err(|_| RequestError::BadBuffer(seg.addr))?;
                    written += seg.len;
                }
                self.counters.other_ops.fetch_add(1, Ordering::Relaxed);
                Ok(written)
            }
            RequestType::Unsupported(_) => {
                self.counters.other_ops.fetch_add(1, Ordering::Relaxed);
                Ok(0)
            }
        }
    }

    /// Handles one chain end to end; returns the used length to report.
    pub fn handle_chain<M, T>(&self, chain: DescriptorChain<T>, mem: &M) -> u32
    where
        M: GuestMemory + ?Sized,
        T: std::ops::Deref<Target = M>,
    {
        let (status, len, status_addr) = match Request::parse(chain, mem) {
            Ok(req) => {
                let (status, len) = match (req.kind, self.execute(&req, mem)) {
                    (RequestType::Unsupported(_), _) => (VIRTIO_BLK_S_UNSUPP, 0),
                    (_, Ok(len)) => (VIRTIO_BLK_S_OK, len),
                    (_, Err(e)) => {
                        self.bad_request(&e);
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                };
                (status, len, Some(req.status))
            }
            Err((e, status_addr)) => {
                self.bad_request(&e);
                (VIRTIO_BLK_S_IOERR, 0, status_addr)
            }
        };
        match status_addr {
            Some(addr) if mem.write_obj(status, addr).is_ok() => len + 1,
            _ => 0,
        }
    }

    fn bad_head(&self) {
        self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
        if BAD_REQUEST_LOG.hit() {
            warn!("virtio-blk: skipping an avail entry with an invalid head index");
        }
    }

    fn bad_request(&self, e: &RequestError) {
        if matches!(e, RequestError::Io(_)) {
            self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
        }
        if BAD_REQUEST_LOG.hit() {
            warn!("virtio-blk request failed: {e}");
        }
    }

    /// Serves every available chain; returns true when the driver should be notified.
    pub fn process_queue<M: GuestMemory>(
        &self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, virtio_queue::Error> {
        self.process_some(queue, mem, usize::MAX)
            .map(|(notify, _)| notify)
    }

    /// `process_queue`, stopping after `budget` chains. Returns (the driver needs an interrupt,
    /// chains may be left: call again).
    pub fn process_some<M: GuestMemory>(
        &self,
        queue: &mut Queue,
        mem: &M,
        budget: usize,
    ) -> Result<(bool, bool), virtio_queue::Error> {
        let mut used_any = false;
        let drained = self.drain_some(queue, mem, budget, |q, head, len| {
            used_any = true;
            q.add_used(mem, head, len).map(|()| Completion::Done)
        })?;
        Ok((
            used_any && queue.needs_notification(mem)?,
            drained == Drained::Budget,
        ))
    }

    /// Executes every available chain and hands (head, used length) to `complete`, which may
    /// publish it at once or later.
    ///
    /// Every iteration consumes an avail entry, so a hostile ring cannot make this spin: an
    /// invalid head index is skipped, an avail index more than a queue ahead is an error.
    pub fn drain_queue<M: GuestMemory>(
        &self,
        queue: &mut Queue,
        mem: &M,
        mut complete: impl FnMut(&mut Queue, u16, u32) -> Result<(), virtio_queue::Error>,
    ) -> Result<(), virtio_queue::Error> {
        self.drain_some(queue, mem, usize::MAX, |q, head, len| {
            complete(q, head, len).map(|()| Completion::Done)
        })
        .map(|_| ())
    }

    /// `drain_queue`, stopping after `budget` chains with notifications still disabled: a
    /// device whose memory view is a lock others wait for (DMA unmaps, VIO captures) drops it
    /// between bounded batches, however fast the driver refills the ring. `complete` may also
    /// hand a chain back (a page request): it stays available, to run again from the start,
    /// and the drain stops there.
    pub fn drain_some<M: GuestMemory>(
        &self,
        queue: &mut Queue,
        mem: &M,
        budget: usize,
        complete: impl FnMut(&mut Queue, u16, u32) -> Result<Completion, virtio_queue::Error>,
    ) -> Result<Drained, virtio_queue::Error> {
        self.drain_some_or_wait(queue, mem, budget, complete, || false)
    }

    /// `drain_some`, where an avail entry that cannot be read is skipped only if `wait` says
    /// so: a device that can ask for the ring's page (a page request) waits for it instead.
    pub fn drain_some_or_wait<M: GuestMemory>(
        &self,
        queue: &mut Queue,
        mem: &M,
        budget: usize,
        mut complete: impl FnMut(&mut Queue, u16, u32) -> Result<Completion, virtio_queue::Error>,
        mut wait: impl FnMut() -> bool,
    ) -> Result<Drained, virtio_queue::Error> {
        let mut left = budget;
        loop {
            queue.disable_notification(mem)?;
            loop {
                let avail = queue.avail_idx(mem, Ordering::Acquire)?;
                let pending = avail - std::num::Wrapping(queue.next_avail());
                if pending.0 == 0 {
                    break;
                }
                if pending.0 > queue.size() {
                    return Err(virtio_queue::Error::InvalidAvailRingIndex);
                }
                if left == 0 {
                    return Ok(Drained::Budget);
                }
                left -= 1;
                match queue.pop_descriptor_chain(mem) {
                    // The chain of an out-of-range head has no descriptors and no used slot.
                    Some(chain) if chain.head_index() >= queue.size() => self.bad_head(),
                    Some(chain) => {
                        let head = chain.head_index();
                        let len = self.handle_chain(chain, mem);
                        if complete(queue, head, len)? == Completion::HandBack {
                            queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                            return Ok(Drained::HandedBack);
                        }
                    }
                    // The avail entry itself could not be read.
                    None if wait() => return Ok(Drained::HandedBack),
                    None => {
                        self.bad_head();
                        queue.set_next_avail(queue.next_avail().wrapping_add(1));
                    }
                }
            }
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        Ok(Drained::Empty)
    }
}

/// What `drain_some`'s caller did with a chain it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Completed, or queued to complete later.
    Done,
    /// Not completed: put back, to run again (its pages were not all reachable).
    HandBack,
}

/// How `drain_some` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Nothing left, notifications re-enabled.
    Empty,
    /// The budget ran out; chains may be left.
    Budget,
    /// A chain was handed back; the queue stops there.
    HandedBack,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestMemoryMmap;
    use std::io::Write;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const QSIZE: u16 = 16;
    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    struct Rig {
        mem: GuestMemoryMmap,
        queue: Queue,
        disk: RawFile,
        path: std::path::PathBuf,
        serial: [u8; VIRTIO_BLK_ID_BYTES],
        counters: BlockCounters,
        avail_idx: u16,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn rig(readonly: bool) -> Rig {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "vio-engine-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = std::fs::File::create(&path).unwrap();
        let content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i / 512) as u8).collect();
        f.write_all(&content).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(&mem));
        Rig {
            disk: RawFile::open(&path, readonly).unwrap(),
            mem,
            queue,
            path,
            serial: *b"vio-test-serial-0001",
            counters: BlockCounters::default(),
            avail_idx: 0,
        }
    }

    fn desc_at(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    impl Rig {
        /// Writes descriptors `(addr, len, flags)` chained from index `first` and makes
        /// `first` available.
        fn chain(&mut self, first: u16, descs: &[(u64, u32, u16)]) {
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let idx = first + i as u16;
                let next = if i + 1 < descs.len() { N } else { 0 };
                desc_at(
                    &self.mem,
                    DESC + 16 * u64::from(idx),
                    addr,
                    len,
                    flags | next,
                    idx + 1,
                );
            }
            self.publish(first);
        }

        fn publish(&mut self, head: u16) {
            let slot = self.avail_idx % QSIZE;
            self.mem
                .write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
        }

        fn run(&mut self) -> Result<bool, virtio_queue::Error> {
            let engine = BlockEngine {
                disk: &self.disk,
                serial: &self.serial,
                counters: &self.counters,
            };
            engine.process_queue(&mut self.queue, &self.mem)
        }

        /// (id, len) of used element `i`.
        fn used(&self, i: u16) -> (u32, u32) {
            let e = USED + 4 + 8 * u64::from(i);
            (
                self.mem.read_obj(GuestAddress(e)).unwrap(),
                self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
            )
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
        }

        fn status(&self, at: u64) -> u8 {
            self.mem.read_obj(GuestAddress(at)).unwrap()
        }
    }

    #[test]
    fn read_request() {
        let mut r = rig(false);
        header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, 2);
        r.mem.write_obj(0xffu8, GuestAddress(0x12000)).unwrap();
        r.chain(0, &[(0x10000, 16, R), (0x11000, 1024, W), (0x12000, 1, W)]);
        r.run().unwrap();
        assert_eq!(r.used_idx(), 1);
        assert_eq!(r.used(0), (0, 1025));
        assert_eq!(r.status(0x12000), VIRTIO_BLK_S_OK);
        let mut data = [0u8; 1024];
        r.mem.read_slice(&mut data, GuestAddress(0x11000)).unwrap();
        assert!(data[..512].iter().all(|&b| b == 2) && data[512..].iter().all(|&b| b == 3));
        assert_eq!(r.counters.read_bytes.load(Ordering::Relaxed), 1024);
    }

    /// A bounded batch stops at its budget and says so; the next picks up where it stopped.
    #[test]
    fn a_bounded_batch_leaves_the_rest_for_the_next() {
        let mut r = rig(false);
        for i in 0..3u16 {
            let at = 0x10000 + 0x1000 * u64::from(i);
            header(&r.mem, at, VIRTIO_BLK_T_IN, 0);
            r.chain(
                3 * i,
                &[(at, 16, R), (at + 0x100, 512, W), (at + 0x800, 1, W)],
            );
        }
        let engine = BlockEngine {
            disk: &r.disk,
            serial: &r.serial,
            counters: &r.counters,
        };
        assert!(engine.process_some(&mut r.queue, &r.mem, 2).unwrap().1);
        assert_eq!(r.used_idx(), 2);
        assert!(!engine.process_some(&mut r.queue, &r.mem, 2).unwrap().1);
        assert_eq!(r.used_idx(), 3);
        assert_eq!(r.status(0x12800), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn write_request_with_header_and_data_in_one_descriptor() {
        let mut r = rig(false);
        header(&r.mem, 0x10000, VIRTIO_BLK_T_OUT, 4);
        r.mem
            .write_slice(&[0x5a; 512], GuestAddress(0x10010))
            .unwrap();
        r.chain(0, &[(0x10000, 16 + 512, R), (0x12000, 1, W)]);
        r.run().unwrap();
        assert_eq!(r.status(0x12000), VIRTIO_BLK_S_OK);
        assert_eq!(r.used(0), (0, 1));
        let mut b = [0u8; 512];
        r.disk.read_at(&mut b, 4 * 512).unwrap();
        assert_eq!(b, [0x5a; 512]);
    }

    #[test]
    fn data_split_across_descriptors_and_status_in_data_descriptor() {
        let mut r = rig(false);
        header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, 1);
        // 512 data bytes in two pieces; the status is the last byte of the last piece.
        r.chain(0, &[(0x10000, 16, R), (0x11000, 300, W), (0x11800, 213, W)]);
        r.run().unwrap();
        assert_eq!(r.status(0x11800 + 212), VIRTIO_BLK_S_OK);
        assert_eq!(r.used(0), (0, 513));
    }

    #[test]
    fn get_id_and_flush_and_unsupported() {
        let mut r = rig(false);
        header(&r.mem, 0x10000, VIRTIO_BLK_T_GET_ID, 0);
        r.chain(0, &[(0x10000, 16, R), (0x11000, 20, W), (0x12000, 1, W)]);
        header(&r.mem, 0x10100, VIRTIO_BLK_T_FLUSH, 0);
        r.chain(3, &[(0x10100, 16, R), (0x12001, 1, W)]);
        header(&r.mem, 0x10200, 99, 0);
        r.chain(5, &[(0x10200, 16, R), (0x12002, 1, W)]);
        r.run().unwrap();
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(0x11000)).unwrap();
        assert_eq!(&id, b"vio-test-serial-0001");
        assert_eq!(r.used(0), (0, 21));
        assert_eq!(r.status(0x12001), VIRTIO_BLK_S_OK);
        assert_eq!(r.status(0x12002), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(r.counters.flush_ops.load(Ordering::Relaxed), 1);
    }

    fn expect_ioerr(r: &mut Rig, status: u64) {
        r.run().unwrap();
        assert_eq!(r.used_idx(), 1, "the chain is returned, not dropped");
        assert_eq!(r.used(0).1, 1);
        assert_eq!(r.status(status), VIRTIO_BLK_S_IOERR);
        assert_eq!(r.counters.bad_requests.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn beyond_the_disk_end_is_ioerr() {
        let mut r = rig(false);
        header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, (1 << 20) / 512 - 1);
        r.chain(0, &[(0x10000, 16, R), (0x11000, 1024, W), (0x12000, 1, W)]);
        expect_ioerr(&mut r, 0x12000);
        // Sector arithmetic that would wrap.
        let mut r = rig(false);
        header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, u64::MAX);
        r.chain(0, &[(0x10000, 16, R), (0x11000, 512, W), (0x12000, 1, W)]);
        expect_ioerr(&mut r, 0x12000);
    }

    #[test]
    fn buffer_outside_guest_memory_is_ioerr() {
        let mut r = rig(false);
        header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, 0);
        r.chain(
            0,
            &[(0x10000, 16, R), (0xffff_f000, 512, W), (0x12000, 1, W)],
        );
        expect_ioerr(&mut r, 0x12000);
        // Straddling the end of RAM.
        let mut r = rig(false);
        header(&r.mem, 0x10000, VIRTIO_BLK_T_OUT, 0);
        r.chain(
            0,
            &[(0x10000, 16, R), ((1 << 20) - 256, 512, R), (0x12000, 1, W)],
        );
        expect_ioerr(&mut r, 0x12000);
    }

    #[test]
    fn malformed_framing_is_ioerr() {
        // Readable after writable.
        let mut r = rig(false);
        header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, 0);
        r.chain(
            0,
            &[
                (0x10000, 16, R),
                (0x11000, 512, W),
                (0x10100, 16, R),
                (0x12000, 1, W),
            ],
        );
        expect_ioerr(&mut r, 0x12000);
        // Short header.
        let mut r = rig(false);
        r.chain(0, &[(0x10000, 8, R), (0x12000, 1, W)]);
        expect_ioerr(&mut r, 0x12000);
        // Unaligned length.
        let mut r = rig(false);
        header(&r.mem, 0x10000, VIRTIO_BLK_T_OUT, 0);
        r.chain(0, &[(0x10000, 16, R), (0x11000, 100, R), (0x12000, 1, W)]);
        expect_ioerr(&mut r, 0x12000);
        // Header outside guest memory.
        let mut r = rig(false);
        r.chain(0, &[(0xffff_0000, 16, R), (0x12000, 1, W)]);
        expect_ioerr(&mut r, 0x12000);
    }

    #[test]
    fn no_status_descriptor_returns_the_chain_with_zero_length() {
        let mut r = rig(false);
        header(&r.mem, 0x10000, VIRTIO_BLK_T_OUT, 0);
        r.chain(0, &[(0x10000, 16, R), (0x11000, 512, R)]);
        r.run().unwrap();
        assert_eq!(r.used_idx(), 1);
        assert_eq!(r.used(0), (0, 0));
    }

    #[test]
    fn descriptor_loop_terminates() {
        let mut r = rig(false);
        header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, 0);
        desc_at(&r.mem, DESC, 0x10000, 16, N, 1);
        desc_at(&r.mem, DESC + 16, 0x11000, 512, W | N, 0); // points back to the head
        r.publish(0);
        r.run().unwrap();
        assert_eq!(r.used_idx(), 1, "a looping chain is bounded and returned");
    }

    #[test]
    fn head_index_out_of_range_does_not_panic() {
        let mut r = rig(false);
        r.publish(QSIZE + 3);
        r.run().unwrap();
        assert_eq!(r.counters.bad_requests.load(Ordering::Relaxed), 1);
        // The bad entry is skipped and the queue keeps serving.
        header(&r.mem, 0x10000, VIRTIO_BLK_T_FLUSH, 0);
        r.chain(0, &[(0x10000, 16, R), (0x12000, 1, W)]);
        r.run().unwrap();
        assert_eq!(r.used_idx(), 1);
        assert_eq!(r.status(0x12000), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn avail_index_far_ahead_is_an_error_not_a_hang() {
        let mut r = rig(false);
        r.mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
        assert!(matches!(
            r.run(),
            Err(virtio_queue::Error::InvalidAvailRingIndex)
        ));
        assert_eq!(r.used_idx(), 0, "nothing is consumed from a corrupt ring");
    }

    #[test]
    fn indirect_tables() {
        let mut r = rig(false);
        header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, 0);
        desc_at(&r.mem, 0x20000, 0x10000, 16, N, 1);
        desc_at(&r.mem, 0x20010, 0x11000, 512, W | N, 2);
        desc_at(&r.mem, 0x20020, 0x12000, 1, W, 0);
        desc_at(&r.mem, DESC, 0x20000, 48, VRING_DESC_F_INDIRECT as u16, 0);
        r.publish(0);
        r.run().unwrap();
        assert_eq!(r.status(0x12000), VIRTIO_BLK_S_OK);
        assert_eq!(r.used(0), (0, 513));

        // A nested indirect table and a misaligned table size end the chain: no status found.
        let mut r = rig(false);
        desc_at(
            &r.mem,
            0x20000,
            0x20100,
            16,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        desc_at(&r.mem, DESC, 0x20000, 16, VRING_DESC_F_INDIRECT as u16, 0);
        r.publish(0);
        desc_at(
            &r.mem,
            DESC + 16,
            0x20000,
            17,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        r.publish(1);
        r.run().unwrap();
        assert_eq!(r.used_idx(), 2);
        assert_eq!(r.used(0), (0, 0));
        assert_eq!(r.used(1), (1, 0));
    }

    #[test]
    fn readonly_disk_rejects_writes() {
        let mut r = rig(true);
        header(&r.mem, 0x10000, VIRTIO_BLK_T_OUT, 0);
        r.chain(0, &[(0x10000, 16, R), (0x11000, 512, R), (0x12000, 1, W)]);
        expect_ioerr(&mut r, 0x12000);
    }
}
