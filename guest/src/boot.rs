//! What the PVH loader hands over: hvm_start_info, the command line and the memory map.

const START_INFO_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
pub const MAX_RANGES: usize = 16;

#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    type_: u32,
    reserved: u32,
}

pub struct BootInfo {
    cmdline: [u8; 4096],
    cmdline_len: usize,
    /// RAM ranges [start, end) as reported by the memory map.
    pub ram: [(u64, u64); MAX_RANGES],
    pub ram_count: usize,
}

impl BootInfo {
    /// # Safety
    /// `addr` must be the hvm_start_info pointer the loader passed in %ebx.
    pub unsafe fn parse(addr: u64) -> Result<BootInfo, &'static str> {
        // SAFETY: the caller passes the loader's start-info pointer, identity-mapped.
        let si = unsafe { &*(addr as *const StartInfo) };
        if si.magic != START_INFO_MAGIC {
            return Err("bad hvm_start_info magic");
        }
        let mut info = BootInfo {
            cmdline: [0; 4096],
            cmdline_len: 0,
            ram: [(0, 0); MAX_RANGES],
            ram_count: 0,
        };
        if si.cmdline_paddr != 0 {
            let p = si.cmdline_paddr as *const u8;
            while info.cmdline_len < info.cmdline.len() - 1 {
                // SAFETY: the loader's NUL-terminated command line, read up to the NUL or the
                // buffer's length, whichever comes first.
                let b = unsafe { *p.add(info.cmdline_len) };
                if b == 0 {
                    break;
                }
                info.cmdline[info.cmdline_len] = b;
                info.cmdline_len += 1;
            }
        }
        if si.version >= 1 && si.memmap_paddr != 0 {
            let entries = si.memmap_paddr as *const MemmapEntry;
            for i in 0..si.memmap_entries as usize {
                // SAFETY: the loader's memory map holds `memmap_entries` entries.
                let e = unsafe { &*entries.add(i) };
                if e.type_ == E820_RAM && e.size != 0 && info.ram_count < MAX_RANGES {
                    info.ram[info.ram_count] = (e.addr, e.addr + e.size);
                    info.ram_count += 1;
                }
            }
        }
        if info.ram_count == 0 {
            return Err("no RAM in the memory map");
        }
        Ok(info)
    }

    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// Value of `key=value` on the command line.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.cmdline().split_ascii_whitespace().find_map(|tok| {
            let (k, v) = tok.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    pub fn param_u64(&self, key: &str, default: u64) -> Result<u64, &'static str> {
        match self.param(key) {
            None => Ok(default),
            Some(v) => parse_u64(v).ok_or("bad number on the command line"),
        }
    }

    pub fn ram_bytes(&self) -> u64 {
        self.ram[..self.ram_count].iter().map(|(s, e)| e - s).sum()
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let v = if let Some(hex) = digits.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()?
    } else {
        digits.parse::<u64>().ok()?
    };
    v.checked_mul(mult)
}
