//! The virtio-blk request engine, generic over how guest memory is reached.
//!
//! A request is framed however the driver likes (virtio 1.x 5.2.6.4): the header is the first
//! 16 device-readable bytes, the status is the last device-writable byte, the data is what lies
//! between. Every guest-controlled field is validated; a bad request completes with IOERR (or
//! UNSUPP) and never panics.

use super::disk::RawFile;
use super::{SECTOR_SIZE, VIRTIO_BLK_ID_BYTES};
pub use crate::queue::{Completion, Drained};
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
        complete: impl FnMut(&mut Queue, u16, u32) -> Result<Completion, virtio_queue::Error>,
        wait: impl FnMut() -> bool,
    ) -> Result<Drained, virtio_queue::Error> {
        crate::queue::drain(
            queue,
            mem,
            budget,
            |chain| self.handle_chain(chain, mem),
            || self.bad_head(),
            complete,
            wait,
        )
    }
}

#[cfg(test)]
mod tests;
