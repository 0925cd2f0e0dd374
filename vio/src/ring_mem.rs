//! Small reads of guest memory on the snoop path (ring indices, used entries, descriptors): one
//! region lookup and a copy where the memory is plain guest RAM, as it is for the VMM;
//! vm-memory's general path otherwise (a read across regions, an IOMMU's translation). The
//! general path builds an iterator of slices for every read, which the snoop thread paid for
//! on every descriptor and ring entry: a fifth of its CPU at qd 32.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

/// Fills `buf` from guest address `addr`; false if any of it is outside guest memory.
pub fn read<M: GuestMemory + ?Sized>(mem: &M, addr: u64, buf: &mut [u8]) -> bool {
    if let Some(plain) = mem.physical_memory() {
        if let Ok(s) = plain.get_slice(GuestAddress(addr), buf.len()) {
            return s.copy_to(buf) == buf.len();
        }
    }
    mem.read_slice(buf, GuestAddress(addr)).is_ok()
}

pub fn read_u16<M: GuestMemory + ?Sized>(mem: &M, addr: u64) -> Option<u16> {
    let mut b = [0u8; 2];
    read(mem, addr, &mut b).then(|| u16::from_le_bytes(b))
}

pub fn read_u32<M: GuestMemory + ?Sized>(mem: &M, addr: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    read(mem, addr, &mut b).then(|| u32::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!(read_u16(&m, 0x10), Some(0x1234));
        assert_eq!(read_u32(&m, 0xffe), Some(0xdead_beef));
        assert_eq!(read_u16(&m, 0x1fff), None);
        assert_eq!(read_u16(&m, u64::MAX), None);
        let mut b = [0u8; 16];
        assert!(!read(&m, 0x1ff8, &mut b));
    }
}
