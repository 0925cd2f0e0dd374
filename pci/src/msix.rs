//! MSI-X: the vector table and pending-bit array a device exposes in a BAR, and their
//! delivery through an interrupt group the VMM backs with KVM routes and irqfds.

use log::{debug, warn};
use std::io;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

pub const MSIX_ENTRY_SIZE: u64 = 16;
pub const MSIX_CAP_ID: u8 = 0x11;
const MSG_CTL_ENABLE: u16 = 1 << 15;
const MSG_CTL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// An MSI-X table's state: per vector (address low, address high, data, vector control).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    pub entries: Vec<[u32; 4]>,
    pub pba: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("Saved MSI-X table has {0} vectors, the device {1}")]
pub struct MsixStateError(pub usize, pub usize);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
}

/// Interrupt vectors of one device, as the hypervisor delivers them.
pub trait MsiInterruptGroup: Send + Sync {
    /// Points vector `index` at `msg`; `masked` vectors must not be delivered.
    fn update(&self, index: u16, msg: MsiMessage, masked: bool) -> io::Result<()>;
    /// Delivers vector `index` now.
    fn trigger(&self, index: u16) -> io::Result<()>;
    /// The eventfd that delivers vector `index` when written, for a device that signals
    /// without going through the VMM.
    fn notifier(&self, index: u16) -> Option<EventFd>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    msg: MsiMessage,
    vector_ctl: u32,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            msg: MsiMessage::default(),
            vector_ctl: VECTOR_MASKED,
        }
    }
}

impl Entry {
    fn masked(&self) -> bool {
        self.vector_ctl & VECTOR_MASKED != 0
    }
}

pub struct MsixConfig {
    entries: Vec<Entry>,
    pba: Vec<u64>,
    group: Arc<dyn MsiInterruptGroup>,
    enabled: bool,
    function_masked: bool,
}

impl MsixConfig {
    pub fn new(vectors: u16, group: Arc<dyn MsiInterruptGroup>) -> Self {
        assert!(
            vectors > 0 && vectors <= 2048,
            "MSI-X supports 1..2048 vectors"
        );
        MsixConfig {
            entries: vec![Entry::default(); vectors as usize],
            pba: vec![0; (vectors as usize).div_ceil(64)],
            group,
            enabled: false,
            function_masked: false,
        }
    }

    pub fn num_vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// The guest wrote the capability's message control.
    pub fn set_msg_ctl(&mut self, ctl: u16) {
        let was_deliverable = self.enabled && !self.function_masked;
        self.enabled = ctl & MSG_CTL_ENABLE != 0;
        self.function_masked = ctl & MSG_CTL_FUNCTION_MASK != 0;
        for i in 0..self.entries.len() {
            self.push_route(i);
        }
        if !was_deliverable && self.enabled && !self.function_masked {
            for i in 0..self.entries.len() {
                self.fire_if_pending(i);
            }
        }
    }

    pub fn msg_ctl(&self) -> u16 {
        let mut ctl = self.num_vectors() - 1;
        if self.enabled {
            ctl |= MSG_CTL_ENABLE;
        }
        if self.function_masked {
            ctl |= MSG_CTL_FUNCTION_MASK;
        }
        ctl
    }

    fn deliverable(&self, i: usize) -> bool {
        self.enabled && !self.function_masked && !self.entries[i].masked()
    }

    fn push_route(&self, i: usize) {
        let e = self.entries[i];
        if let Err(err) = self.group.update(i as u16, e.msg, !self.deliverable(i)) {
            warn!("Failed to update MSI-X vector {i}: {err}");
        }
    }

    fn fire_if_pending(&mut self, i: usize) {
        if self.deliverable(i) && self.pba[i / 64] & (1 << (i % 64)) != 0 {
            self.pba[i / 64] &= !(1 << (i % 64));
            if let Err(err) = self.group.trigger(i as u16) {
                warn!("Failed to deliver MSI-X vector {i}: {err}");
            }
        }
    }

    /// Guest read of the table, at `offset` from its start.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let idx = (offset / MSIX_ENTRY_SIZE) as usize;
        let Some(e) = self.entries.get(idx) else {
            return;
        };
        let field = offset % MSIX_ENTRY_SIZE;
        let raw: [u32; 4] = [e.msg.addr_lo, e.msg.addr_hi, e.msg.data, e.vector_ctl];
        let bytes: Vec<u8> = raw.iter().flat_map(|v| v.to_le_bytes()).collect();
        let end = (field as usize + data.len()).min(16);
        let n = end - field as usize;
        data[..n].copy_from_slice(&bytes[field as usize..end]);
    }

    /// Guest write of the table. 4- and 8-byte accesses, as the spec allows.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let idx = (offset / MSIX_ENTRY_SIZE) as usize;
        let field = (offset % MSIX_ENTRY_SIZE) as usize;
        if idx >= self.entries.len()
            || !(data.len() == 4 || data.len() == 8)
            || !field.is_multiple_of(4)
            || field + data.len() > 16
        {
            debug!(
                "Ignoring MSI-X table write at {offset:#x} len {}",
                data.len()
            );
            return;
        }
        let old = self.entries[idx];
        let mut raw = [
            old.msg.addr_lo,
            old.msg.addr_hi,
            old.msg.data,
            old.vector_ctl,
        ];
        for (k, chunk) in data.chunks(4).enumerate() {
            raw[field / 4 + k] = u32::from_le_bytes(chunk.try_into().unwrap());
        }
        let new = Entry {
            msg: MsiMessage {
                addr_lo: raw[0],
                addr_hi: raw[1],
                data: raw[2],
            },
            vector_ctl: raw[3] & VECTOR_MASKED,
        };
        self.entries[idx] = new;
        if new != old {
            self.push_route(idx);
        }
        if old.masked() && !new.masked() {
            self.fire_if_pending(idx);
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let bytes: Vec<u8> = self.pba.iter().flat_map(|v| v.to_le_bytes()).collect();
        let start = offset as usize;
        if start < bytes.len() {
            let end = (start + data.len()).min(bytes.len());
            data[..end - start].copy_from_slice(&bytes[start..end]);
        }
    }

    /// The device raises vector `index`: delivered now, or left pending while masked.
    pub fn trigger(&mut self, index: u16) {
        let i = index as usize;
        if i >= self.entries.len() || !self.enabled {
            return;
        }
        if self.deliverable(i) {
            if let Err(err) = self.group.trigger(index) {
                warn!("Failed to deliver MSI-X vector {i}: {err}");
            }
        } else {
            self.pba[i / 64] |= 1 << (i % 64);
        }
    }

    /// The table, pending bits and message control, for a live upgrade.
    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self
                .entries
                .iter()
                .map(|e| [e.msg.addr_lo, e.msg.addr_hi, e.msg.data, e.vector_ctl])
                .collect(),
            pba: self.pba.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Takes over `s` (saved by `state` of a table of the same size) and routes every vector
    /// as it was: unmasked ones are delivered through the new interrupt group from now on.
    pub fn restore(&mut self, s: &MsixState) -> Result<(), MsixStateError> {
        if s.entries.len() != self.entries.len() || s.pba.len() != self.pba.len() {
            return Err(MsixStateError(s.entries.len(), self.entries.len()));
        }
        for (e, raw) in self.entries.iter_mut().zip(&s.entries) {
            *e = Entry {
                msg: MsiMessage {
                    addr_lo: raw[0],
                    addr_hi: raw[1],
                    data: raw[2],
                },
                vector_ctl: raw[3] & VECTOR_MASKED,
            };
        }
        self.pba.copy_from_slice(&s.pba);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        for i in 0..self.entries.len() {
            self.push_route(i);
        }
        Ok(())
    }

    pub fn pending(&self, index: u16) -> bool {
        let i = index as usize;
        i < self.entries.len() && self.pba[i / 64] & (1 << (i % 64)) != 0
    }
}

/// The MSI-X capability body (after id and next pointer).
pub struct MsixCap {
    pub msg_ctl: u16,
    pub table: u32,
    pub pba: u32,
}

impl MsixCap {
    pub fn new(bar: u8, vectors: u16, table_offset: u32, pba_offset: u32) -> Self {
        MsixCap {
            msg_ctl: vectors - 1,
            table: table_offset | u32::from(bar & 7),
            pba: pba_offset | u32::from(bar & 7),
        }
    }

    pub fn id() -> u8 {
        MSIX_CAP_ID
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut b = self.msg_ctl.to_le_bytes().to_vec();
        b.extend_from_slice(&self.table.to_le_bytes());
        b.extend_from_slice(&self.pba.to_le_bytes());
        b
    }

    /// Enable and function-mask are the only guest-writable bits.
    pub fn writable() -> Vec<u8> {
        vec![0x00, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        fired: Mutex<Vec<u16>>,
        routes: Mutex<Vec<(u16, MsiMessage, bool)>>,
    }

    impl MsiInterruptGroup for Recorder {
        fn update(&self, index: u16, msg: MsiMessage, masked: bool) -> io::Result<()> {
            self.routes.lock().unwrap().push((index, msg, masked));
            Ok(())
        }
        fn trigger(&self, index: u16) -> io::Result<()> {
            self.fired.lock().unwrap().push(index);
            Ok(())
        }
        fn notifier(&self, _index: u16) -> Option<EventFd> {
            None
        }
    }

    fn write_entry(m: &mut MsixConfig, i: u64, addr: u32, data: u32, ctl: u32) {
        m.write_table(i * 16, &addr.to_le_bytes());
        m.write_table(i * 16 + 4, &0u32.to_le_bytes());
        m.write_table(i * 16 + 8, &data.to_le_bytes());
        m.write_table(i * 16 + 12, &ctl.to_le_bytes());
    }

    #[test]
    fn delivery_masking_and_pending() {
        let rec = Arc::new(Recorder::default());
        let mut m = MsixConfig::new(4, rec.clone());
        m.trigger(1);
        assert!(
            rec.fired.lock().unwrap().is_empty(),
            "disabled MSI-X delivers nothing"
        );
        m.set_msg_ctl(MSG_CTL_ENABLE);
        write_entry(&mut m, 1, 0xfee0_0000, 0x31, 0);
        m.trigger(1);
        assert_eq!(*rec.fired.lock().unwrap(), vec![1]);
        // Masked vector: pending, fired at unmask.
        m.write_table(16 + 12, &1u32.to_le_bytes());
        m.trigger(1);
        assert!(m.pending(1));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert!(!m.pending(1));
        assert_eq!(*rec.fired.lock().unwrap(), vec![1, 1]);
        // Function mask.
        m.set_msg_ctl(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK);
        m.trigger(1);
        assert_eq!(rec.fired.lock().unwrap().len(), 2);
        m.set_msg_ctl(MSG_CTL_ENABLE);
        assert_eq!(rec.fired.lock().unwrap().len(), 3);
        let routes = rec.routes.lock().unwrap();
        let last = routes.iter().rev().find(|r| r.0 == 1).unwrap();
        assert!(!last.2, "vector 1 is deliverable");
        assert_eq!(
            last.1,
            MsiMessage {
                addr_lo: 0xfee0_0000,
                addr_hi: 0,
                data: 0x31
            }
        );
    }

    #[test]
    fn table_reads_and_bad_writes() {
        let rec = Arc::new(Recorder::default());
        let mut m = MsixConfig::new(2, rec);
        write_entry(&mut m, 0, 0xfee0_1000, 0x45, 0);
        let mut b = [0u8; 4];
        m.read_table(8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x45);
        m.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        let mut q = [0u8; 8];
        m.read_table(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
        // Out-of-range and odd-sized accesses are ignored.
        m.write_table(5 * 16, &[1, 2, 3, 4]);
        m.write_table(2, &[1, 2]);
        m.read_table(8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x45);
        m.read_table(64, &mut b);
        assert_eq!(b, [0; 4]);
        assert_eq!(m.msg_ctl(), 1);
        let cap = MsixCap::new(0, 2, 0x8000, 0x48000);
        assert_eq!(cap.bytes().len(), 10);
    }

    /// A live upgrade: the table moves whole, and the new group gets every vector's route, an
    /// unmasked one as deliverable; a pending vector stays pending.
    #[test]
    fn state_moves_to_a_new_group_with_every_route() {
        let old = Arc::new(Recorder::default());
        let mut m = MsixConfig::new(3, old.clone());
        m.set_msg_ctl(MSG_CTL_ENABLE);
        write_entry(&mut m, 0, 0xfee0_0000, 0x41, 0);
        write_entry(&mut m, 1, 0xfee0_1000, 0x42, VECTOR_MASKED);
        m.trigger(1);
        let s = m.state();
        let new = Arc::new(Recorder::default());
        let mut n = MsixConfig::new(3, new.clone());
        n.restore(&s).unwrap();
        assert_eq!(n.state(), s);
        assert_eq!(n.msg_ctl(), m.msg_ctl());
        assert!(n.pending(1));
        let routes = new.routes.lock().unwrap();
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[0].1.data, 0x41);
        assert!(!routes[0].2, "vector 0 deliverable");
        assert!(routes[1].2 && routes[2].2, "vectors 1 and 2 masked");
        assert!(new.fired.lock().unwrap().is_empty());
        let mut small = MsixConfig::new(2, new.clone());
        assert!(small.restore(&s).is_err());
    }
}
