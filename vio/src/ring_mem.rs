//! Small reads of guest memory on the snoop path (ring indices, used entries, descriptors): one
//! region lookup and a copy where the memory is plain guest RAM, as it is for the VMM;
//! vm-memory's general path otherwise (a read across regions, an IOMMU's translation). The
//! general path builds an iterator of slices for every read, which the snoop thread paid for
//! on every descriptor and ring entry: a fifth of its CPU at qd 32.

use std::mem::size_of;
use std::sync::atomic::Ordering;
use vm_memory::{AtomicAccess, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

/// Fills `buf` from guest address `addr`; false if any of it is outside guest memory.
pub fn read<M: GuestMemory + ?Sized>(mem: &M, addr: u64, buf: &mut [u8]) -> bool {
    if let Some(plain) = mem.physical_memory() {
        if let Ok(s) = plain.get_slice(GuestAddress(addr), buf.len()) {
            return s.copy_to(buf) == buf.len();
        }
    }
    mem.read_slice(buf, GuestAddress(addr)).is_ok()
}

/// Reads the naturally aligned integer at `addr` in one access. Ring indices change under the
/// reader (the guest writes `avail->idx`, the device `used->idx`), and `read` may copy byte by
/// byte (its alignment is the lesser of source and destination): 0x01ff -> 0x0200 could read
/// as 0x02ff, an index a queue ahead that publishes nothing. A misaligned field reads as
/// `None`, as the device treats such a ring.
fn load<T: AtomicAccess, M: GuestMemory + ?Sized>(mem: &M, addr: u64) -> Option<T> {
    if let Some(plain) = mem.physical_memory() {
        if let Ok(s) = plain.get_slice(GuestAddress(addr), size_of::<T>()) {
            return s.load(0, Ordering::Acquire).ok();
        }
    }
    mem.load(GuestAddress(addr), Ordering::Acquire).ok()
}

pub fn read_u16<M: GuestMemory + ?Sized>(mem: &M, addr: u64) -> Option<u16> {
    load(mem, addr)
}

pub fn read_u32<M: GuestMemory + ?Sized>(mem: &M, addr: u64) -> Option<u32> {
    load(mem, addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use vm_memory::GuestMemoryMmap;

    /// Inside a region, across two adjacent regions (the general path), and outside memory.
    #[test]
    fn reads_inside_across_and_outside() {
        let m: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        m.write_obj(0x1234u16, GuestAddress(0x10)).unwrap();
        m.write_obj(0xdead_beefu32, GuestAddress(0xffe)).unwrap();
        assert_eq!(read_u16(&m, 0x1000), Some(0xdead), "the second region");
        assert_eq!(read_u16(&m, 0x10), Some(0x1234));
        assert_eq!(read_u32(&m, 0xffc), Some(0xbeef_0000));
        assert_eq!(read_u32(&m, 0xffe), None, "misaligned");
        assert_eq!(read_u16(&m, 0x1fff), None);
        assert_eq!(read_u16(&m, u64::MAX), None);
        let mut b = [0u8; 16];
        assert!(!read(&m, 0x1ff8, &mut b));
    }

    const VALUES: [u16; 4] = [0x00ff, 0x0100, 0xffff, 0x0000];

    /// The guest writes its 16-bit indices while the VMM reads them: a read must see the old
    /// value or the new one, never a mix of their bytes (0x01ff -> 0x0200 read as 0x02ff looks
    /// like a garbage index, and the entries it hides are never published).
    #[test]
    fn index_reads_are_not_torn() {
        let m: Arc<GuestMemoryMmap<()>> =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap());
        m.store(VALUES[0], GuestAddress(0x102), Ordering::Release)
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (m, stop) = (m.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // Only steps that change both bytes can tear: flip across them.
                    for x in VALUES {
                        m.store(x, GuestAddress(0x102), Ordering::Release).unwrap();
                    }
                }
            })
        };
        let mut torn = 0;
        for _ in 0..20_000_000 {
            let v = read_u16(&*m, 0x102).unwrap();
            if !VALUES.contains(&v) {
                torn += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert_eq!(torn, 0, "torn index reads");
    }
}
