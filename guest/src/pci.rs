//! PCI configuration mechanism #1 (ports 0xCF8/0xCFC), segment 0, bus 0.

use crate::arch::{inl, inw, outl, outw};

#[derive(Clone, Copy)]
pub struct Function {
    pub dev: u8,
    pub func: u8,
    pub vendor: u16,
    pub device: u16,
}

fn address(f: &Function, off: u8) -> u32 {
    0x8000_0000 | (f.dev as u32) << 11 | (f.func as u32) << 8 | (off as u32 & 0xfc)
}

impl Function {
    pub fn read32(&self, off: u8) -> u32 {
        outl(0xcf8, address(self, off));
        inl(0xcfc)
    }

    pub fn read16(&self, off: u8) -> u16 {
        outl(0xcf8, address(self, off));
        inw(0xcfc + (off as u16 & 2))
    }

    pub fn read8(&self, off: u8) -> u8 {
        (self.read32(off) >> ((off & 3) * 8)) as u8
    }

    pub fn write16(&self, off: u8, v: u16) {
        outl(0xcf8, address(self, off));
        outw(0xcfc + (off as u16 & 2), v);
    }

    /// Address of memory BAR `bar`, if it is one and is assigned.
    pub fn bar_address(&self, bar: u8) -> Option<u64> {
        if bar > 5 {
            return None;
        }
        let off = 0x10 + bar * 4;
        let lo = self.read32(off);
        if lo & 1 != 0 {
            return None; // I/O BAR
        }
        let mut addr = (lo & !0xf) as u64;
        if (lo >> 1) & 3 == 2 && bar < 5 {
            addr |= (self.read32(off + 4) as u64) << 32;
        }
        (addr != 0).then_some(addr)
    }

    /// Walks the capability list: calls `f(offset, id)` for each.
    pub fn for_each_capability(&self, mut f: impl FnMut(u8, u8)) {
        if self.read16(0x06) & (1 << 4) == 0 {
            return;
        }
        let mut ptr = self.read8(0x34) & !3;
        // A malformed list cannot loop forever: there are at most 48 capabilities in 256 bytes.
        for _ in 0..48 {
            if ptr < 0x40 {
                break;
            }
            f(ptr, self.read8(ptr));
            ptr = self.read8(ptr + 1) & !3;
        }
    }

    pub fn enable_memory_and_bus_master(&self) {
        let cmd = self.read16(0x04);
        self.write16(0x04, cmd | 0x6);
    }
}

/// All functions on bus 0.
pub fn scan(mut found: impl FnMut(Function)) {
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let probe = Function {
                dev,
                func,
                vendor: 0,
                device: 0,
            };
            let id = probe.read32(0);
            if id & 0xffff == 0xffff {
                if func == 0 {
                    break;
                }
                continue;
            }
            let f = Function {
                dev,
                func,
                vendor: id as u16,
                device: (id >> 16) as u16,
            };
            found(f);
            if func == 0 && f.read8(0x0e) & 0x80 == 0 {
                break;
            }
        }
    }
}
