//! Type-0 PCI configuration space: identity, command/status, six BARs and a capability list.

use log::warn;
use thiserror::Error;

pub const NUM_CONFIGURATION_REGISTERS: usize = 64;
const STATUS_REG: usize = 1;
const STATUS_CAPABILITIES: u32 = 1 << 20;
const BAR0_REG: usize = 4;
const CAPABILITY_POINTER_REG: usize = 13;
const FIRST_CAPABILITY_OFFSET: usize = 0x40;
const NUM_BARS: usize = 6;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} is not free")]
    BarTaken(usize),
    #[error("BAR {0} size {1:#x} at {2:#x} is not naturally aligned")]
    BarAlignment(usize, u64, u64),
    #[error("BAR {0} does not fit its type")]
    BarType(usize),
    #[error("The capability list is full")]
    CapabilitiesFull,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PciBarType {
    Io,
    Mem32,
    Mem64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciHeader {
    Device,
    Bridge,
}

#[derive(Clone, Copy, Debug)]
pub enum PciClass {
    Bridge = 0x06,
    MassStorage = 0x01,
    Network = 0x02,
    Other = 0xff,
}

/// A BAR as the VMM placed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciBarRegion {
    pub index: usize,
    pub addr: u64,
    pub size: u64,
    pub kind: PciBarType,
    pub prefetchable: bool,
}

/// The guest moved a BAR: the VMM must move the device's bus range and ioeventfds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarReprogram {
    pub old_base: u64,
    pub new_base: u64,
    pub len: u64,
    pub kind: PciBarType,
}

pub struct PciConfiguration {
    registers: [u32; NUM_CONFIGURATION_REGISTERS],
    writable: [u32; NUM_CONFIGURATION_REGISTERS],
    bars: [Option<PciBarRegion>; NUM_BARS],
    last_capability: Option<(usize, usize)>,
}

impl PciConfiguration {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vendor: u16,
        device: u16,
        revision: u8,
        class: PciClass,
        subclass: u8,
        prog_if: u8,
        header: PciHeader,
        subsystem_vendor: u16,
        subsystem_id: u16,
    ) -> Self {
        let mut registers = [0u32; NUM_CONFIGURATION_REGISTERS];
        let mut writable = [0u32; NUM_CONFIGURATION_REGISTERS];
        registers[0] = u32::from(device) << 16 | u32::from(vendor);
        // Command: I/O, memory, bus master, INTx disable are the bits a driver flips.
        writable[1] = 0x0000_0407;
        registers[2] = (class as u32) << 24
            | u32::from(subclass) << 16
            | u32::from(prog_if) << 8
            | u32::from(revision);
        let header_type = match header {
            PciHeader::Device => 0,
            PciHeader::Bridge => 1,
        };
        registers[3] = header_type << 16;
        writable[3] = 0x0000_00ff; // cache line size
        registers[11] = u32::from(subsystem_id) << 16 | u32::from(subsystem_vendor);
        writable[15] = 0x0000_00ff; // interrupt line
        PciConfiguration {
            registers,
            writable,
            bars: [None; NUM_BARS],
            last_capability: None,
        }
    }

    pub fn read_reg(&self, idx: usize) -> u32 {
        self.registers.get(idx).copied().unwrap_or(0xffff_ffff)
    }

    /// Raw access for capability state the device manages itself.
    pub fn set_reg(&mut self, idx: usize, value: u32) {
        if let Some(r) = self.registers.get_mut(idx) {
            *r = value;
        }
    }

    /// Applies a guest write of `data` at byte `offset` of register `idx`, honouring the
    /// writable mask. Returns the BAR move it causes, if any.
    pub fn write_reg(&mut self, idx: usize, offset: u64, data: &[u8]) -> Option<BarReprogram> {
        if idx >= NUM_CONFIGURATION_REGISTERS || offset as usize + data.len() > 4 || data.is_empty()
        {
            warn!(
                "Bad PCI config write: register {idx} offset {offset} len {}",
                data.len()
            );
            return None;
        }
        let shift = offset * 8;
        let mask = match data.len() {
            1 => 0xffu32,
            2 => 0xffff,
            4 => 0xffff_ffff,
            _ => return None,
        } << shift;
        let mut value = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << (i * 8);
        }
        let value = value << shift;
        let w = self.writable[idx] & mask;
        let old = self.registers[idx];
        self.registers[idx] = (old & !w) | (value & w);
        if idx == STATUS_REG {
            // Status bits are write-one-to-clear; none are emulated as set.
            return None;
        }
        if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&idx) {
            return self.detect_bar_move(idx - BAR0_REG);
        }
        None
    }

    fn bar_of_register(&self, reg: usize) -> Option<usize> {
        if self.bars[reg].is_some() {
            return Some(reg);
        }
        // The upper half of a 64-bit BAR.
        (reg > 0)
            .then(|| reg - 1)
            .filter(|&i| matches!(self.bars[i], Some(b) if b.kind == PciBarType::Mem64))
    }

    fn detect_bar_move(&mut self, reg: usize) -> Option<BarReprogram> {
        let i = self.bar_of_register(reg)?;
        let bar = self.bars[i]?;
        let lo_reg = BAR0_REG + i;
        let lo_mask = self.writable[lo_reg];
        let lo = self.registers[lo_reg] & lo_mask;
        // All address bits set is the sizing probe, not a placement.
        if lo == lo_mask {
            return None;
        }
        let new = match bar.kind {
            PciBarType::Mem64 => {
                let hi = self.registers[lo_reg + 1];
                if hi == self.writable[lo_reg + 1] && hi != 0 {
                    return None;
                }
                u64::from(hi) << 32 | u64::from(lo)
            }
            _ => u64::from(lo),
        };
        if new == bar.addr {
            return None;
        }
        self.bars[i] = Some(PciBarRegion { addr: new, ..bar });
        Some(BarReprogram {
            old_base: bar.addr,
            new_base: new,
            len: bar.size,
            kind: bar.kind,
        })
    }

    /// Places BAR `region.index` at `region.addr`; the size must be a power of two and the
    /// address aligned to it.
    pub fn add_bar(&mut self, region: PciBarRegion) -> Result<(), ConfigError> {
        let i = region.index;
        let slots = if region.kind == PciBarType::Mem64 {
            2
        } else {
            1
        };
        if i + slots > NUM_BARS
            || self.bars[i].is_some()
            || (slots == 2 && self.bars[i + 1].is_some())
        {
            return Err(ConfigError::BarTaken(i));
        }
        if !region.size.is_power_of_two() || !region.addr.is_multiple_of(region.size) {
            return Err(ConfigError::BarAlignment(i, region.size, region.addr));
        }
        let min = if region.kind == PciBarType::Io { 4 } else { 16 };
        if region.size < min
            || (region.kind != PciBarType::Mem64 && region.addr + region.size > 1 << 32)
        {
            return Err(ConfigError::BarType(i));
        }
        let reg = BAR0_REG + i;
        let type_bits = match region.kind {
            PciBarType::Io => 0x1,
            PciBarType::Mem32 => 0x0,
            PciBarType::Mem64 => 0x4,
        } | if region.prefetchable { 0x8 } else { 0 };
        let size_mask = !(region.size - 1);
        self.registers[reg] = (region.addr as u32) | type_bits;
        self.writable[reg] = size_mask as u32
            & if region.kind == PciBarType::Io {
                !0x3
            } else {
                !0xf
            };
        if slots == 2 {
            self.registers[reg + 1] = (region.addr >> 32) as u32;
            self.writable[reg + 1] = (size_mask >> 32) as u32;
        }
        self.bars[i] = Some(region);
        Ok(())
    }

    /// Every register's value, for a live upgrade.
    pub fn registers(&self) -> Vec<u32> {
        self.registers.to_vec()
    }

    /// Takes over saved register values (the layout, capabilities and write masks are the
    /// device's own, built the same way). Returns the BARs the guest had moved away from where
    /// this configuration placed them.
    pub fn restore_registers(&mut self, regs: &[u32]) -> Vec<BarReprogram> {
        for (r, v) in self.registers.iter_mut().zip(regs) {
            *r = *v;
        }
        (0..NUM_BARS)
            .filter_map(|i| {
                let bar = self.bars[i]?;
                let lo = self.registers[BAR0_REG + i] & self.writable[BAR0_REG + i];
                let hi = match bar.kind {
                    PciBarType::Mem64 => u64::from(self.registers[BAR0_REG + i + 1]) << 32,
                    _ => 0,
                };
                let addr = hi | u64::from(lo);
                (addr != bar.addr).then(|| {
                    self.bars[i] = Some(PciBarRegion { addr, ..bar });
                    BarReprogram {
                        old_base: bar.addr,
                        new_base: addr,
                        len: bar.size,
                        kind: bar.kind,
                    }
                })
            })
            .collect()
    }

    pub fn bar(&self, index: usize) -> Option<PciBarRegion> {
        self.bars.get(index).copied().flatten()
    }

    pub fn bars(&self) -> impl Iterator<Item = PciBarRegion> + '_ {
        self.bars.iter().flatten().copied()
    }

    pub fn memory_enabled(&self) -> bool {
        self.registers[1] & 0x2 != 0
    }

    /// Appends a capability (its bytes from offset 2 on; id and next pointer are filled in)
    /// and returns its offset. `writable` gives the guest-writable bits per byte of `body`.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = (body.len() + 2).next_multiple_of(4);
        let offset = match self.last_capability {
            Some((off, l)) => off + l,
            None => FIRST_CAPABILITY_OFFSET,
        };
        if offset + len > NUM_CONFIGURATION_REGISTERS * 4 {
            return Err(ConfigError::CapabilitiesFull);
        }
        let mut bytes = vec![id, 0];
        bytes.extend_from_slice(body);
        let mut wmask = vec![0u8, 0u8];
        wmask.extend_from_slice(writable);
        wmask.resize(bytes.len(), 0);
        for (i, (b, w)) in bytes.iter().zip(wmask.iter()).enumerate() {
            self.set_byte(offset + i, *b, *w);
        }
        match self.last_capability {
            Some((prev, _)) => self.set_byte(prev + 1, offset as u8, 0),
            None => {
                self.set_byte(CAPABILITY_POINTER_REG * 4, offset as u8, 0);
                self.registers[STATUS_REG] |= STATUS_CAPABILITIES;
            }
        }
        self.last_capability = Some((offset, len));
        Ok(offset)
    }

    fn set_byte(&mut self, off: usize, v: u8, writable: u8) {
        let (reg, shift) = (off / 4, (off % 4) * 8);
        self.registers[reg] = (self.registers[reg] & !(0xff << shift)) | u32::from(v) << shift;
        self.writable[reg] = (self.writable[reg] & !(0xff << shift)) | u32::from(writable) << shift;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfiguration {
        PciConfiguration::new(
            0x1af4,
            0x1042,
            1,
            PciClass::MassStorage,
            0,
            0,
            PciHeader::Device,
            0x1af4,
            0x40,
        )
    }

    fn w32(c: &mut PciConfiguration, reg: usize, v: u32) -> Option<BarReprogram> {
        c.write_reg(reg, 0, &v.to_le_bytes())
    }

    #[test]
    fn identity_registers() {
        let c = cfg();
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        assert_eq!(c.read_reg(2) >> 24, 0x01);
        assert_eq!(c.read_reg(11), 0x0040_1af4);
        assert_eq!(c.read_reg(64), 0xffff_ffff);
    }

    #[test]
    fn read_only_registers_ignore_writes() {
        let mut c = cfg();
        w32(&mut c, 0, 0xdead_beef);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        c.write_reg(1, 0, &[0x06, 0x00]);
        assert!(c.memory_enabled());
        assert_eq!(c.read_reg(1) & 0xffff, 0x6);
    }

    #[test]
    fn bar32_sizing_and_move() {
        let mut c = cfg();
        c.add_bar(PciBarRegion {
            index: 0,
            addr: 0xc000_0000,
            size: 0x1000,
            kind: PciBarType::Mem32,
            prefetchable: false,
        })
        .unwrap();
        assert_eq!(
            w32(&mut c, 4, 0xffff_ffff),
            None,
            "sizing probe is not a move"
        );
        assert_eq!(c.read_reg(4), 0xffff_f000);
        let mv = w32(&mut c, 4, 0xc000_0000);
        assert_eq!(mv, None, "restoring the address is not a move");
        let mv = w32(&mut c, 4, 0xd000_0000).unwrap();
        assert_eq!(
            (mv.old_base, mv.new_base, mv.len),
            (0xc000_0000, 0xd000_0000, 0x1000)
        );
        assert_eq!(c.bar(0).unwrap().addr, 0xd000_0000);
    }

    #[test]
    fn bar64_sizing_and_move() {
        let mut c = cfg();
        c.add_bar(PciBarRegion {
            index: 2,
            addr: 0x1_0000_0000,
            size: 0x8_0000,
            kind: PciBarType::Mem64,
            prefetchable: true,
        })
        .unwrap();
        assert_eq!(c.read_reg(6), 0x0000_000c);
        assert_eq!(c.read_reg(7), 0x1);
        assert_eq!(w32(&mut c, 6, 0xffff_ffff), None);
        assert_eq!(w32(&mut c, 7, 0xffff_ffff), None);
        assert_eq!(c.read_reg(6), 0xfff8_000c);
        assert_eq!(c.read_reg(7), 0xffff_ffff);
        w32(&mut c, 6, 0);
        let mv = w32(&mut c, 7, 0x2).unwrap();
        assert_eq!(mv.new_base, 0x2_0000_0000);
        assert_eq!(mv.kind, PciBarType::Mem64);
    }

    #[test]
    fn bar_validation() {
        let mut c = cfg();
        let bad_align = PciBarRegion {
            index: 0,
            addr: 0x1800,
            size: 0x1000,
            kind: PciBarType::Mem32,
            prefetchable: false,
        };
        assert!(c.add_bar(bad_align).is_err());
        let not_pow2 = PciBarRegion {
            index: 0,
            addr: 0,
            size: 0x1800,
            kind: PciBarType::Mem32,
            prefetchable: false,
        };
        assert!(c.add_bar(not_pow2).is_err());
        let last64 = PciBarRegion {
            index: 5,
            addr: 0,
            size: 0x1000,
            kind: PciBarType::Mem64,
            prefetchable: false,
        };
        assert!(c.add_bar(last64).is_err());
    }

    #[test]
    fn capability_list() {
        let mut c = cfg();
        let a = c
            .add_capability(0x09, &[16, 1, 0, 0], &[0, 0, 0, 0])
            .unwrap();
        let b = c
            .add_capability(0x11, &[0x03, 0x00, 0, 0, 0, 0, 0, 0, 0, 0], &[0, 0xc0])
            .unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_ne!(c.read_reg(1) & STATUS_CAPABILITIES, 0);
        assert_eq!(c.read_reg(13) & 0xff, 0x40);
        assert_eq!((c.read_reg(0x40 / 4) >> 8) & 0xff, 0x48);
        assert_eq!(c.read_reg(0x48 / 4) & 0xff, 0x11);
        // Only MSI-X enable/mask bits are writable in its message control.
        c.write_reg(0x48 / 4, 2, &[0xff, 0xff]);
        assert_eq!(c.read_reg(0x48 / 4) >> 16, 0xc003);
    }

    /// A live upgrade: registers move whole; a BAR the guest had moved is reported moved.
    #[test]
    fn restored_registers_report_moved_bars() {
        let mk = || {
            let mut c = PciConfiguration::new(
                0x1af4,
                0x1042,
                1,
                PciClass::Other,
                0,
                0,
                PciHeader::Device,
                0,
                0,
            );
            c.add_bar(PciBarRegion {
                index: 0,
                addr: 0x1_0000_0000,
                size: 0x8_0000,
                kind: PciBarType::Mem64,
                prefetchable: false,
            })
            .unwrap();
            c
        };
        let mut old = mk();
        old.write_reg(1, 0, &[0x06, 0]);
        old.write_reg(4, 0, &0x2008_0000u32.to_le_bytes());
        old.write_reg(5, 0, &1u32.to_le_bytes());
        let mut new = mk();
        let moves = new.restore_registers(&old.registers());
        assert_eq!(new.registers(), old.registers());
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].old_base, 0x1_0000_0000);
        assert_eq!(moves[0].new_base, 0x1_2008_0000);
        assert_eq!(new.bar(0).unwrap().addr, 0x1_2008_0000);
        assert!(new.memory_enabled());
        assert!(mk().restore_registers(&mk().registers()).is_empty());
    }
}
