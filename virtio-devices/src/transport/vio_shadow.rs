//! The device side of the VIO shadow-index extension (`vio::spec`): the control block in BAR 0
//! and what its control words do to the device's view of the rings.

use log::debug;
use std::sync::Arc;
use vio::spec::{self, Register};
use virtio_queue::{Queue, QueueT};

/// Where a device reads its available indices from.
pub trait ShadowIndex: Send + Sync {
    /// Reads of the 16-bit index at `avail_idx_addr` come from `shadow` (or, with `None`,
    /// from the ring again). The same redirect serves the device's suppression fields. With
    /// `capture`, the value at `avail_idx_addr` is first copied to `shadow`, with no device
    /// access to either in between.
    fn redirect(&self, avail_idx_addr: u64, shadow: Option<u64>, capture: bool);
}

#[derive(Clone, Default)]
struct QueueRegs {
    iova: u64,
    control: u32,
    /// The ring addresses redirects were installed for, while enabled.
    active: Vec<u64>,
}

/// The control block of one device.
pub struct VioControlBlock {
    host: Arc<dyn ShadowIndex>,
    regs: Vec<QueueRegs>,
}

/// Copies bytes [at, at + data.len()) of little-endian `v` into `data` (zeros past its end).
fn read_le(v: u64, data: &mut [u8], at: u64) {
    let b = v.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = b.get(at as usize + i).copied().unwrap_or(0);
    }
}

impl VioControlBlock {
    pub fn new(host: Arc<dyn ShadowIndex>, queues: usize) -> Self {
        VioControlBlock {
            host,
            regs: vec![QueueRegs::default(); queues],
        }
    }

    /// A driver access at `offset` of the control block; `queues` are the transport's.
    pub fn access(&mut self, offset: u64, data: &mut [u8], write: Option<&[u8]>, queues: &[Queue]) {
        let (queue, field) = match spec::decode(offset) {
            Register::Header(at) => {
                if write.is_none() {
                    let header = u64::from(spec::MAGIC) | u64::from(spec::VERSION) << 32;
                    match at {
                        spec::REG_MAGIC..spec::REG_NUM_QUEUES => read_le(header, data, at),
                        spec::REG_NUM_QUEUES..spec::REG_QUEUES => {
                            read_le(self.regs.len() as u64, data, at - spec::REG_NUM_QUEUES)
                        }
                        _ => data.fill(0),
                    }
                }
                return;
            }
            Register::Queue { queue, field } => (usize::from(queue), field),
        };
        let (Some(reg), Some(ring)) = (self.regs.get_mut(queue), queues.get(queue)) else {
            return data.fill(0);
        };
        let Some(w) = write else {
            match field {
                spec::QUEUE_SHADOW_IOVA..spec::QUEUE_CONTROL => read_le(reg.iova, data, field),
                spec::QUEUE_CONTROL..=11 => {
                    read_le(u64::from(reg.control), data, field - spec::QUEUE_CONTROL)
                }
                _ => data.fill(0),
            }
            return;
        };
        let mut v = [0u8; 8];
        v[..w.len()].copy_from_slice(w);
        let v = u64::from_le_bytes(v);
        match (field, w.len()) {
            (spec::QUEUE_SHADOW_IOVA, 8) => reg.iova = v,
            (spec::QUEUE_SHADOW_IOVA, 4) => reg.iova = (reg.iova & !0xffff_ffff) | v,
            (4, 4) => reg.iova = (reg.iova & 0xffff_ffff) | v << 32,
            (spec::QUEUE_CONTROL, 1 | 2 | 4) => {
                Self::set_control(&*self.host, reg, ring, v as u32);
            }
            _ => debug!("ignored VIO control write at {offset:#x}"),
        }
    }

    fn set_control(host: &dyn ShadowIndex, reg: &mut QueueRegs, ring: &Queue, v: u32) {
        for old in reg.active.drain(..) {
            host.redirect(old, None, false);
        }
        let v = v & (spec::CTRL_SHADOW_INDEX | spec::CTRL_SUPPRESSION | spec::CTRL_CAPTURE);
        reg.control = 0;
        // A reset clears the address: bits set before it is given again are ignored, so a
        // capture never writes through an address the driver did not give.
        if v & spec::CTRL_SHADOW_INDEX == 0 || reg.iova == 0 {
            return;
        }
        let capture = v & spec::CTRL_CAPTURE != 0;
        let mut redirects = vec![(
            ring.avail_ring() + 2,
            reg.iova + spec::SLOT_AVAIL_IDX,
            capture,
        )];
        if v & spec::CTRL_SUPPRESSION != 0 {
            let used = ring.used_ring();
            let avail_event = used + 4 + 8 * u64::from(ring.size());
            // The device's own suppression comes along with a capture: it may be asleep,
            // armed on what it last wrote to the ring.
            redirects.push((used, reg.iova + spec::SLOT_USED_FLAGS, capture));
            redirects.push((avail_event, reg.iova + spec::SLOT_AVAIL_EVENT, capture));
        }
        for (from, to, capture) in redirects {
            host.redirect(from, Some(to), capture);
            reg.active.push(from);
        }
        reg.control = v & !spec::CTRL_CAPTURE;
    }

    /// A device reset clears every queue's registers.
    pub fn reset(&mut self) {
        for r in &mut self.regs {
            for old in r.active.drain(..) {
                self.host.redirect(old, None, false);
            }
            r.iova = 0;
            r.control = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Option<u64>, bool)>>);

    impl ShadowIndex for Recorder {
        fn redirect(&self, from: u64, to: Option<u64>, capture: bool) {
            self.0.lock().unwrap().push((from, to, capture));
        }
    }

    fn write(cb: &mut VioControlBlock, q: &[Queue], at: u64, v: &[u8]) {
        let mut scratch = [0u8; 8];
        cb.access(at, &mut scratch[..v.len()], Some(v), q);
    }

    /// A capture reaches the device's memory view only with an address the driver gave; the
    /// suppression fields are captured with the index, and the bit reads back as 0.
    #[test]
    fn capture_needs_an_address_and_reads_back_as_zero() {
        let host = Arc::new(Recorder::default());
        let mut cb = VioControlBlock::new(host.clone(), 1);
        let mut ring = Queue::new(8).unwrap();
        ring.set_avail_ring_address(Some(0x2000), None);
        ring.set_used_ring_address(Some(0x3000), None);
        let queues = [ring];
        let control = spec::queue_reg(0) + spec::QUEUE_CONTROL;
        let all = spec::CTRL_SHADOW_INDEX | spec::CTRL_SUPPRESSION | spec::CTRL_CAPTURE;
        write(&mut cb, &queues, control, &all.to_le_bytes());
        assert!(host.0.lock().unwrap().is_empty(), "no address: ignored");
        write(
            &mut cb,
            &queues,
            spec::queue_reg(0),
            &0x9000u64.to_le_bytes(),
        );
        write(&mut cb, &queues, control, &all.to_le_bytes());
        let got = host.0.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![
                (0x2002, Some(0x9000), true),
                (0x3000, Some(0x9002), true),
                (0x3000 + 4 + 8 * 8, Some(0x9004), true),
            ]
        );
        let mut back = [0u8; 4];
        cb.access(control, &mut back, None, &queues);
        assert_eq!(
            u32::from_le_bytes(back),
            spec::CTRL_SHADOW_INDEX | spec::CTRL_SUPPRESSION
        );
    }
}
