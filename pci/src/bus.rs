//! Dispatch of guest port-I/O and MMIO accesses to the device owning the address range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use thiserror::Error;

/// A device on the port-I/O or MMIO bus. `base` is where its range starts, `offset` is
/// relative to it.
pub trait BusDevice: Send {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

#[derive(Debug, Error)]
pub enum BusError {
    #[error("Range {base:#x}+{len:#x} overlaps an existing one")]
    Overlap { base: u64, len: u64 },
    #[error("Range of zero length at {0:#x}")]
    ZeroLength(u64),
    #[error("No device at {0:#x}")]
    NotFound(u64),
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// Non-overlapping ranges, keyed by base address.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    fn lookup(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let ranges = self.ranges.read().unwrap();
        let (base, (len, dev)) = ranges.range(..=addr).next_back()?;
        (addr - base < *len).then(|| (*base, dev.clone()))
    }

    pub fn insert(
        &self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let mut ranges = self.ranges.write().unwrap();
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((b, (l, _))) = ranges.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        ranges.insert(base, (len, dev));
        Ok(())
    }

    pub fn remove(&self, base: u64) -> Result<(), BusError> {
        self.ranges
            .write()
            .unwrap()
            .remove(&base)
            .map(|_| ())
            .ok_or(BusError::NotFound(base))
    }

    /// Moves the range at `old` to `new`, keeping its device and length.
    pub fn relocate(&self, old: u64, new: u64) -> Result<(), BusError> {
        let (len, dev) = {
            let mut ranges = self.ranges.write().unwrap();
            ranges.remove(&old).ok_or(BusError::NotFound(old))?
        };
        if let Err(e) = self.insert(dev.clone(), new, len) {
            self.ranges.write().unwrap().insert(old, (len, dev));
            return Err(e);
        }
        Ok(())
    }

    /// Returns false when nothing is mapped at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((base, dev)) => {
                dev.lock().unwrap().read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr) {
            Some((base, dev)) => {
                dev.lock().unwrap().write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_overlap_and_relocate() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(10)));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev.clone(), 0x108, 0x10),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0xf8, 0x10),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(dev.clone(), 0x110, 0x10).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x103, &mut b));
        assert_eq!(b[0], 13);
        assert!(!bus.read(0x120, &mut b));
        assert!(!bus.read(0xff, &mut b));
        assert!(bus.write(0x100, &[7]));
        bus.relocate(0x100, 0x200).unwrap();
        assert!(!bus.read(0x100, &mut b));
        assert!(bus.read(0x201, &mut b));
        assert_eq!(b[0], 8);
        assert!(bus.relocate(0x200, 0x110).is_err());
        assert!(
            bus.read(0x200, &mut b),
            "failed relocation keeps the old range"
        );
    }
}
