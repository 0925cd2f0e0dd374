//! PCI segment 0: the host bridge, the device table, and configuration access through
//! mechanism #1 (ports 0xCF8/0xCFC) and ECAM (memory-mapped).

use crate::bus::BusDevice;
use crate::configuration::{BarReprogram, PciClass, PciConfiguration, PciHeader};
use log::{debug, warn};
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

/// A function on the PCI bus.
pub trait PciDevice: Send {
    fn read_config_register(&mut self, reg: usize) -> u32;
    /// Returns the BAR move the write caused, for the VMM to apply.
    fn write_config_register(
        &mut self,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarReprogram>;
    fn read_bar(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
    /// The device's BAR moved: re-home what is tied to the old address (ioeventfds).
    fn move_bar(&mut self, _old_base: u64, _new_base: u64) -> io::Result<()> {
        Ok(())
    }
}

/// Applies a BAR move outside the PCI layer (bus ranges, ioeventfds).
pub trait DeviceRelocation: Send + Sync {
    fn move_bar(&self, mv: &BarReprogram, dev: &mut dyn PciDevice) -> io::Result<()>;
}

/// The host bridge at 00:00.0.
pub struct PciRoot {
    config: PciConfiguration,
}

impl PciRoot {
    pub fn new() -> Self {
        PciRoot {
            config: PciConfiguration::new(
                0x8086,
                0x0d57,
                0,
                PciClass::Bridge,
                0,
                0,
                PciHeader::Device,
                0,
                0,
            ),
        }
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for PciRoot {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn write_config_register(
        &mut self,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarReprogram> {
        self.config.write_reg(reg, offset, data)
    }
}

pub struct PciBus {
    devices: BTreeMap<u8, Arc<Mutex<dyn PciDevice>>>,
    relocation: Arc<dyn DeviceRelocation>,
}

impl PciBus {
    pub fn new(root: PciRoot, relocation: Arc<dyn DeviceRelocation>) -> Self {
        let mut devices: BTreeMap<u8, Arc<Mutex<dyn PciDevice>>> = BTreeMap::new();
        devices.insert(0, Arc::new(Mutex::new(root)));
        PciBus {
            devices,
            relocation,
        }
    }

    pub fn next_device_number(&self) -> Option<u8> {
        (1..32u8).find(|d| !self.devices.contains_key(d))
    }

    pub fn add_device(&mut self, number: u8, dev: Arc<Mutex<dyn PciDevice>>) -> io::Result<()> {
        if number >= 32 || self.devices.contains_key(&number) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("PCI slot {number} is taken"),
            ));
        }
        self.devices.insert(number, dev);
        Ok(())
    }

    fn device(&self, bus: u8, dev: u8, func: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.devices.get(&dev)
    }

    pub fn config_read(&self, bus: u8, dev: u8, func: u8, reg: usize) -> u32 {
        match self.device(bus, dev, func) {
            // No extended capabilities: the extended space reads as an empty list.
            Some(_) if reg >= crate::NUM_CONFIGURATION_REGISTERS => 0,
            Some(d) => d.lock().unwrap().read_config_register(reg),
            None => 0xffff_ffff,
        }
    }

    pub fn config_write(&self, bus: u8, dev: u8, func: u8, reg: usize, offset: u64, data: &[u8]) {
        let Some(d) = self.device(bus, dev, func) else {
            return;
        };
        if reg >= crate::NUM_CONFIGURATION_REGISTERS {
            return;
        }
        let mut d = d.lock().unwrap();
        if let Some(mv) = d.write_config_register(reg, offset, data) {
            debug!(
                "PCI {bus:02x}:{dev:02x}.{func}: BAR moves {:#x} -> {:#x}",
                mv.old_base, mv.new_base
            );
            if let Err(e) = self.relocation.move_bar(&mv, &mut *d) {
                warn!(
                    "Failed to move BAR {:#x} -> {:#x}: {e}",
                    mv.old_base, mv.new_base
                );
            }
        }
    }
}

fn read_bytes(value: u32, byte: usize, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(byte + i).copied().unwrap_or(0xff);
    }
}

fn access_ok(byte: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && byte + len <= 4
}

/// Configuration mechanism #1: address latch at 0xCF8, data window at 0xCFC..0xCFF.
pub struct PciConfigIo {
    bus: Arc<Mutex<PciBus>>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        PciConfigIo { bus, address: 0 }
    }

    /// The address latch: a guest between its address write and its data access keeps it
    /// across a live upgrade.
    pub fn address(&self) -> u32 {
        self.address
    }

    pub fn set_address(&mut self, address: u32) {
        self.address = address;
    }

    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let a = self.address;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 7) as u8,
            ((a & 0xfc) >> 2) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let offset = offset as usize;
        if offset < 4 {
            if access_ok(offset, data.len()) {
                read_bytes(self.address, offset, data);
            } else {
                data.fill(0xff);
            }
            return;
        }
        let byte = offset - 4;
        match self.target() {
            Some((b, d, f, reg)) if access_ok(byte, data.len()) => {
                let v = self.bus.lock().unwrap().config_read(b, d, f, reg);
                read_bytes(v, byte, data);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let offset = offset as usize;
        if offset < 4 {
            if !access_ok(offset, data.len()) {
                return;
            }
            let mut bytes = self.address.to_le_bytes();
            bytes[offset..offset + data.len()].copy_from_slice(data);
            self.address = u32::from_le_bytes(bytes);
            return;
        }
        let byte = offset - 4;
        if let Some((b, d, f, reg)) = self.target() {
            if access_ok(byte, data.len()) {
                self.bus
                    .lock()
                    .unwrap()
                    .config_write(b, d, f, reg, byte as u64, data);
            }
        }
    }
}

/// ECAM: 4 KiB of configuration space per function, 1 MiB per bus.
pub struct PciConfigMmio {
    bus: Arc<Mutex<PciBus>>,
}

impl PciConfigMmio {
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        PciConfigMmio { bus }
    }

    fn decode(offset: u64) -> (u8, u8, u8, usize, usize) {
        (
            ((offset >> 20) & 0xff) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 7) as u8,
            ((offset & 0xfff) >> 2) as usize,
            (offset & 3) as usize,
        )
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let (b, d, f, reg, byte) = Self::decode(offset);
        if !access_ok(byte, data.len()) {
            data.fill(0xff);
            return;
        }
        let v = self.bus.lock().unwrap().config_read(b, d, f, reg);
        read_bytes(v, byte, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (b, d, f, reg, byte) = Self::decode(offset);
        if access_ok(byte, data.len()) {
            self.bus
                .lock()
                .unwrap()
                .config_write(b, d, f, reg, byte as u64, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::{PciBarRegion, PciBarType};

    struct NoRelocation(Mutex<Vec<BarReprogram>>);
    impl DeviceRelocation for NoRelocation {
        fn move_bar(&self, mv: &BarReprogram, _dev: &mut dyn PciDevice) -> io::Result<()> {
            self.0.lock().unwrap().push(*mv);
            Ok(())
        }
    }

    struct Dev(PciConfiguration);
    impl PciDevice for Dev {
        fn read_config_register(&mut self, reg: usize) -> u32 {
            self.0.read_reg(reg)
        }
        fn write_config_register(
            &mut self,
            reg: usize,
            offset: u64,
            data: &[u8],
        ) -> Option<BarReprogram> {
            self.0.write_reg(reg, offset, data)
        }
    }

    fn setup() -> (Arc<Mutex<PciBus>>, Arc<NoRelocation>) {
        let rel = Arc::new(NoRelocation(Mutex::new(vec![])));
        let bus = Arc::new(Mutex::new(PciBus::new(PciRoot::new(), rel.clone())));
        let mut cfg = PciConfiguration::new(
            0x1af4,
            0x1042,
            1,
            PciClass::MassStorage,
            0,
            0,
            PciHeader::Device,
            0x1af4,
            2,
        );
        cfg.add_bar(PciBarRegion {
            index: 0,
            addr: 0xc000_0000,
            size: 0x1000,
            kind: PciBarType::Mem32,
            prefetchable: false,
        })
        .unwrap();
        let n = bus.lock().unwrap().next_device_number().unwrap();
        assert_eq!(n, 1);
        bus.lock()
            .unwrap()
            .add_device(n, Arc::new(Mutex::new(Dev(cfg))))
            .unwrap();
        (bus, rel)
    }

    fn cf8(io: &mut PciConfigIo, dev: u32, reg: u32) {
        io.write(0xcf8, 0, &(0x8000_0000 | dev << 11 | reg).to_le_bytes());
    }

    #[test]
    fn mechanism1_reads_and_writes() {
        let (bus, rel) = setup();
        let mut io = PciConfigIo::new(bus);
        cf8(&mut io, 0, 0);
        let mut d = [0u8; 4];
        io.read(0xcf8, 4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        cf8(&mut io, 1, 0);
        let mut w = [0u8; 2];
        io.read(0xcf8, 6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1042);
        cf8(&mut io, 7, 0);
        io.read(0xcf8, 4, &mut d);
        assert_eq!(d, [0xff; 4], "empty slot reads all ones");
        // Disabled address: all ones.
        io.write(0xcf8, 0, &0x0000_0800u32.to_le_bytes());
        io.read(0xcf8, 4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // BAR move through config writes reaches the relocation hook.
        cf8(&mut io, 1, 0x10);
        io.write(0xcf8, 4, &0xd000_0000u32.to_le_bytes());
        assert_eq!(rel.0.lock().unwrap()[0].new_base, 0xd000_0000);
        // Misaligned data access is refused.
        io.read(0xcf8, 7, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn ecam_reads_and_extended_space() {
        let (bus, _) = setup();
        let mut m = PciConfigMmio::new(bus);
        let mut d = [0u8; 4];
        m.read(0, 1 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1042_1af4);
        m.read(0, (1 << 15) | 0x100, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        m.read(0, 1 << 20, &mut d);
        assert_eq!(d, [0xff; 4], "bus 1 is empty");
    }
}
