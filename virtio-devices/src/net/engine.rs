//! The virtio-net frame engine, generic over how guest memory is reached.
//!
//! Transmit: a chain's device-readable bytes are a 12-byte `virtio_net_hdr_v1` and the frame.
//! Receive: a frame goes to the next available chain (or, with VIRTIO_NET_F_MRG_RXBUF, the next
//! chains), behind a header whose `num_buffers` says how many it took. No offloads are offered,
//! so the header asks for nothing and says nothing else. Every guest-controlled field is
//! checked; a bad chain is completed with length 0 and counted, and never panics.

use crate::LogLimiter;
use log::warn;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// `virtio_net_hdr_v1`: the header is this long with VIRTIO_F_VERSION_1, whatever else is on.
pub const NET_HDR_LEN: usize = 12;
/// Where `num_buffers` sits in the header.
const NUM_BUFFERS_OFF: u64 = 10;
/// An Ethernet header: nothing shorter is a frame.
pub const MIN_FRAME_LEN: usize = 14;
/// The largest frame either way: with no segmentation offload a frame is at most an MTU of
/// 64 KiB plus the Ethernet and VLAN headers; this bounds the work per chain.
pub const MAX_FRAME_LEN: usize = 65536 + 18;

static BAD_CHAIN_LOG: LogLimiter = LogLimiter::new(10, 10_000);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("Device-writable descriptor in a transmit chain")]
    WritableInTx,
    #[error("Device-readable descriptor in a receive chain")]
    ReadableInRx,
    #[error("Frame of {0} bytes is too large")]
    TooLarge(u64),
    #[error("Frame of {0} bytes is shorter than an Ethernet header")]
    TooShort(u64),
    #[error("Buffer {0:#x} is not accessible")]
    BadBuffer(u64),
    #[error("Available ring entry is not a descriptor")]
    BadHead,
    #[error("Chain does not end within the queue (a loop, or a bad next index)")]
    Unterminated,
}

#[derive(Default)]
pub struct NetCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames from the backend that found no room: the chains could not hold them (a ring
    /// too small for the frame) or were bad.
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames the backend refused.
    pub tx_dropped: AtomicU64,
    /// Chains that broke the rules (either direction), completed with length 0.
    pub bad_chains: AtomicU64,
}

impl NetCounters {
    pub fn snapshot(&self) -> crate::Counters {
        let mut c = crate::Counters::new();
        for (k, v) in [
            ("rx_frames", &self.rx_frames),
            ("rx_bytes", &self.rx_bytes),
            ("rx_dropped", &self.rx_dropped),
            ("tx_frames", &self.tx_frames),
            ("tx_bytes", &self.tx_bytes),
            ("tx_dropped", &self.tx_dropped),
            ("bad_chains", &self.bad_chains),
        ] {
            c.insert(k.to_string(), v.load(Ordering::Relaxed));
        }
        c
    }

    pub fn bad_chain(&self, e: &ChainError) {
        self.bad_chains.fetch_add(1, Ordering::Relaxed);
        if BAD_CHAIN_LOG.hit() {
            warn!("virtio-net: {e}");
        }
    }
}

/// Gathers a transmit chain's frame, the header skipped, into `frame`.
pub fn read_tx<M, T>(
    chain: DescriptorChain<T>,
    mem: &M,
    frame: &mut Vec<u8>,
) -> Result<(), ChainError>
where
    M: GuestMemory + ?Sized,
    T: std::ops::Deref<Target = M>,
{
    frame.clear();
    let mut total = 0u64;
    let mut skip = NET_HDR_LEN as u64;
    let mut more = false;
    for d in chain {
        more = d.has_next();
        if d.is_write_only() {
            return Err(ChainError::WritableInTx);
        }
        let len = u64::from(d.len());
        total += len;
        // Before anything is allocated for it.
        if total > (NET_HDR_LEN + MAX_FRAME_LEN) as u64 {
            return Err(ChainError::TooLarge(
                total.saturating_sub(NET_HDR_LEN as u64),
            ));
        }
        let hdr = skip.min(len);
        skip -= hdr;
        if len > hdr {
            let start = frame.len();
            frame.resize(start + (len - hdr) as usize, 0);
            let at = d.addr().0.wrapping_add(hdr);
            mem.read_slice(&mut frame[start..], GuestAddress(at))
                .map_err(|_| ChainError::BadBuffer(at))?;
        }
    }
    if more {
        return Err(ChainError::Unterminated);
    }
    if frame.len() < MIN_FRAME_LEN {
        return Err(ChainError::TooShort(frame.len() as u64));
    }
    Ok(())
}

/// The device-writable spans of one receive chain.
struct RxChain {
    head: u16,
    segs: Vec<(u64, u32)>,
}

impl RxChain {
    /// Every descriptor must be device-writable and lie in memory the device can reach (a
    /// length past the end is refused, not clipped), and the chain must end.
    fn parse<M, T>(chain: DescriptorChain<T>, mem: &M) -> Result<RxChain, (u16, ChainError)>
    where
        M: GuestMemory + ?Sized,
        T: std::ops::Deref<Target = M>,
    {
        let head = chain.head_index();
        let mut segs = Vec::new();
        let mut more = false;
        for d in chain {
            more = d.has_next();
            if !d.is_write_only() {
                return Err((head, ChainError::ReadableInRx));
            }
            if !mem.check_range(d.addr(), d.len() as usize, Permissions::Write) {
                return Err((head, ChainError::BadBuffer(d.addr().0)));
            }
            segs.push((d.addr().0, d.len()));
        }
        if more {
            return Err((head, ChainError::Unterminated));
        }
        Ok(RxChain { head, segs })
    }

    fn capacity(&self) -> u64 {
        self.segs.iter().map(|&(_, l)| u64::from(l)).sum()
    }

    /// Writes `data` at byte `offset` of the chain (which must hold it).
    fn write_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        mut offset: u64,
        mut data: &[u8],
    ) -> Result<(), ChainError> {
        for &(addr, len) in &self.segs {
            if data.is_empty() {
                break;
            }
            let len = u64::from(len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = (len - offset).min(data.len() as u64) as usize;
            let at = addr.wrapping_add(offset);
            mem.write_slice(&data[..n], GuestAddress(at))
                .map_err(|_| ChainError::BadBuffer(at))?;
            data = &data[n..];
            offset = 0;
        }
        Ok(())
    }
}

/// What became of a frame offered to the receive queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written; its chains are in the used list.
    Delivered,
    /// Not enough buffers in the ring up to this avail index: the queue is where it was, the
    /// frame waits (`want_buffers_past`).
    NoBuffers(u16),
    /// Dropped (counted): no buffer could ever hold it, or a chain was bad.
    Dropped,
}

/// Offers `frame` to the receive queue. Completed chains are appended to `used` (head, length)
/// for `publish_used`; nothing is visible to the driver before that.
pub fn write_rx<M: GuestMemory + ?Sized>(
    queue: &mut Queue,
    mem: &M,
    frame: &[u8],
    mergeable: bool,
    used: &mut Vec<(u16, u32)>,
    counters: &NetCounters,
) -> Result<RxOutcome, virtio_queue::Error> {
    // Where the queue goes back to if the frame must wait: past any bad chain completed on
    // the way (they are the driver's again, empty).
    let mut start = queue.next_avail();
    let avail = queue.avail_idx(mem, Ordering::Acquire)?.0;
    if avail.wrapping_sub(start) > queue.size() {
        return Err(virtio_queue::Error::InvalidAvailRingIndex);
    }
    let mut header = [0u8; NET_HDR_LEN];
    header[NUM_BUFFERS_OFF as usize] = 1;
    let need = (NET_HDR_LEN + frame.len()) as u64;
    let mut taken: Vec<(RxChain, u32)> = Vec::new();
    let mut done = 0u64;
    while done < need {
        if queue.next_avail() == avail {
            queue.set_next_avail(start);
            if avail.wrapping_sub(start) == queue.size() {
                // A full ring cannot hold it: it never will.
                counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(RxOutcome::Dropped);
            }
            return Ok(RxOutcome::NoBuffers(avail));
        }
        let chain = match queue.pop_descriptor_chain(mem) {
            Some(c) if c.head_index() < queue.size() => RxChain::parse(c, mem),
            // An out-of-range head has no descriptors and no used slot; an unreadable entry
            // is skipped.
            other => {
                if other.is_none() {
                    queue.set_next_avail(queue.next_avail().wrapping_add(1));
                }
                counters.bad_chain(&ChainError::BadHead);
                if taken.is_empty() {
                    start = queue.next_avail();
                }
                continue;
            }
        };
        let r = chain.and_then(|chain| {
            let cap = chain.capacity();
            let take = cap.min(need - done);
            if !mergeable && cap < need {
                return Ok((chain, None));
            }
            let mut r = Ok(());
            if done < NET_HDR_LEN as u64 {
                let h = &header[done as usize..(NET_HDR_LEN as u64).min(done + take) as usize];
                r = chain.write_at(mem, 0, h);
            }
            let fstart = done.max(NET_HDR_LEN as u64);
            if r.is_ok() && done + take > fstart {
                let f = &frame
                    [(fstart - NET_HDR_LEN as u64) as usize..(done + take) as usize - NET_HDR_LEN];
                r = chain.write_at(mem, fstart - done, f);
            }
            match r {
                Ok(()) => Ok((chain, Some(take))),
                Err(e) => Err((chain.head, e)),
            }
        });
        match r {
            Ok((chain, Some(take))) => {
                done += take;
                taken.push((chain, take as u32));
            }
            Ok((_, None)) => {
                // Too small for the frame: the buffer stays for a frame it can hold.
                queue.set_next_avail(start);
                counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(RxOutcome::Dropped);
            }
            Err((head, e)) => {
                // A bad chain goes back empty. Before any of the frame is written the frame
                // goes on to the next chain; after, whatever it filled goes back empty too
                // (a driver reading `num_buffers` must not find a bad chain among them), and
                // the frame is dropped.
                counters.bad_chain(&e);
                used.push((head, 0));
                if taken.is_empty() {
                    start = queue.next_avail();
                    continue;
                }
                counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                used.extend(taken.iter().map(|(c, _)| (c.head, 0)));
                return Ok(RxOutcome::Dropped);
            }
        }
    }
    if taken.len() > 1 {
        let n = (taken.len() as u16).to_le_bytes();
        if let Err(e) = taken[0].0.write_at(mem, NUM_BUFFERS_OFF, &n) {
            counters.bad_chain(&e);
            counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            used.extend(taken.iter().map(|(c, _)| (c.head, 0)));
            return Ok(RxOutcome::Dropped);
        }
    }
    used.extend(taken.iter().map(|(c, len)| (c.head, *len)));
    counters.rx_frames.fetch_add(1, Ordering::Relaxed);
    counters
        .rx_bytes
        .fetch_add(frame.len() as u64, Ordering::Relaxed);
    Ok(RxOutcome::Delivered)
}

/// Asks the driver for a doorbell once its avail index passes `seen` (avail_event with
/// VIRTIO_F_EVENT_IDX, else a clear `used->flags`), then looks again: true if it has already.
pub fn want_buffers_past<M: GuestMemory + ?Sized>(
    queue: &Queue,
    mem: &M,
    seen: u16,
) -> Result<bool, virtio_queue::Error> {
    let used = queue.used_ring();
    let (at, value) = if queue.event_idx_enabled() {
        (used + 4 + 8 * u64::from(queue.size()), seen)
    } else {
        (used, 0)
    };
    mem.store(value.to_le(), GuestAddress(at), Ordering::Relaxed)
        .map_err(virtio_queue::Error::GuestMemory)?;
    // The driver publishes its index, then reads this: one of the two sees the other.
    fence(Ordering::SeqCst);
    let now = queue.avail_idx(mem, Ordering::Acquire)?.0;
    Ok(now != seen)
}

/// Puts `used` on the used ring with a single index update, so the buffers of a mergeable
/// frame become visible to the driver together (Linux fails a frame whose `num_buffers` it
/// cannot all collect at once). Returns whether the driver wants an interrupt.
pub fn publish_used<M: GuestMemory + ?Sized>(
    queue: &mut Queue,
    mem: &M,
    used: &[(u16, u32)],
) -> Result<bool, virtio_queue::Error> {
    if used.is_empty() {
        return Ok(false);
    }
    let size = queue.size();
    let ring = queue.used_ring();
    let old = queue.next_used();
    for (i, &(head, len)) in used.iter().enumerate() {
        let slot = u64::from(old.wrapping_add(i as u16) % size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        let at = ring
            .checked_add(4 + 8 * slot)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        mem.write_slice(&elem, GuestAddress(at))
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    let new = old.wrapping_add(used.len() as u16);
    mem.store(new.to_le(), GuestAddress(ring + 2), Ordering::Release)
        .map_err(virtio_queue::Error::GuestMemory)?;
    queue.set_next_used(new);
    // The index must be visible before the driver's wishes are read (virtio 2.7.10).
    fence(Ordering::SeqCst);
    let avail = queue.avail_ring();
    if queue.event_idx_enabled() {
        let at = avail + 4 + 2 * u64::from(size);
        let event: u16 = mem
            .load(GuestAddress(at), Ordering::Relaxed)
            .map(u16::from_le)
            .map_err(virtio_queue::Error::GuestMemory)?;
        Ok(new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old))
    } else {
        let flags: u16 = mem
            .load(GuestAddress(avail), Ordering::Relaxed)
            .map(u16::from_le)
            .map_err(virtio_queue::Error::GuestMemory)?;
        Ok(flags & 1 == 0)
    }
}

#[cfg(test)]
mod tests;
