//! Extends the boot identity map (low 4 GiB) on demand: BARs of 64-bit PCI devices and RAM
//! above 4 GiB live higher. Page tables are user-writable and only new entries are added,
//! so no TLB flush (a privileged instruction) is ever needed.

extern "C" {
    static mut pml4: [u64; 512];
}

const PRESENT_RW_USER: u64 = 0x7;
const LARGE: u64 = 0x80;
const UNCACHED: u64 = 0x18;
const TABLES: usize = 32;
const TWO_MB: u64 = 2 << 20;

#[repr(C, align(4096))]
struct Table([u64; 512]);

static mut POOL: [Table; TABLES] = [const { Table([0; 512]) }; TABLES];
static mut POOL_USED: usize = 0;

/// Identity-maps [start, start+len) with 2 MiB user pages.
pub fn map_range(start: u64, len: u64, mmio: bool) -> Result<(), &'static str> {
    let mut addr = start & !(TWO_MB - 1);
    let end = start.checked_add(len).ok_or("mapping overflows")?;
    while addr < end {
        if addr >= 1 << 32 {
            map_2m(addr, mmio)?;
        }
        addr += TWO_MB;
    }
    Ok(())
}

fn next_table(entry: *mut u64) -> Result<*mut u64, &'static str> {
    // SAFETY: entry points into a live page table; the guest is single-threaded.
    unsafe {
        if *entry & 1 == 0 {
            if POOL_USED == TABLES {
                return Err("out of page tables");
            }
            let t = core::ptr::addr_of_mut!(POOL[POOL_USED]) as u64;
            POOL_USED += 1;
            *entry = t | PRESENT_RW_USER;
        }
        Ok((*entry & 0x000f_ffff_ffff_f000) as *mut u64)
    }
}

fn map_2m(addr: u64, mmio: bool) -> Result<(), &'static str> {
    let l4 = ((addr >> 39) & 511) as usize;
    let l3 = ((addr >> 30) & 511) as usize;
    let l2 = ((addr >> 21) & 511) as usize;
    // SAFETY: the boot PML4 is a static table of the image; indices are < 512.
    unsafe {
        let pdpt = next_table(core::ptr::addr_of_mut!(pml4[l4]))?;
        let pd = next_table(pdpt.add(l3))?;
        let e = pd.add(l2);
        if *e & 1 == 0 {
            *e = addr | PRESENT_RW_USER | LARGE | if mmio { UNCACHED } else { 0 };
        }
    }
    Ok(())
}
