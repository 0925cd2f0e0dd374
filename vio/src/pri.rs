//! Page requests (the PRI baseline): the wire contract between a device that can stop on a
//! missing translation and ask for the page (vdpu with `pri=on`, standing in for PCIe ATS/PRI
//! hardware) and the VMM that resolves them. Both ends use these definitions; `docs/vio.md`
//! ("The PRI baseline") says the same in prose.
//!
//! Transport: vfio-user's own messages, no new command. The device offers
//! - a device-specific region, [`REGION_INDEX`] ([`REGION_SIZE`] bytes, read/write): the page
//!   request queue. Reading at [`REG_TABLE`] returns a header (u32 slot count, u32 reserved)
//!   and one [`SLOT_SIZE`]-byte slot per queue: u32 sequence number (0: empty), u32 flags
//!   ([`FLAG_PENDING`], [`FLAG_WRITE`]), u64 IOVA of the page. Writing 8 bytes at
//!   [`REG_RESPONSE`] answers one request: u32 sequence number, u32 status ([`STATUS_OK`]:
//!   the page is mapped now, retry; anything else: fail the access).
//! - a device-specific interrupt, [`IRQ_INDEX`] (one eventfd, set with SET_IRQS): signalled
//!   each time a request is posted, as an IOMMU raises its page-request interrupt.
//!
//! Bounds: one outstanding request per queue (a queue stops at its first missing page and
//! waits), so the table never overflows; the device gives up on a request after its timeout and
//! fails the access as an I/O page fault, and an answer for a sequence number that is no longer
//! pending is ignored.

/// The region after the device's counters region (vfio-user region indices 0-8 are PCI's).
pub const REGION_INDEX: u32 = 10;
pub const REGION_SIZE: u64 = 4096;
/// The interrupt index after PCI's five (INTx, MSI, MSI-X, ERR, REQ).
pub const IRQ_INDEX: u32 = 5;

pub const REG_TABLE: u64 = 0;
pub const REG_RESPONSE: u64 = 0x800;
pub const HEADER_SIZE: usize = 8;
pub const SLOT_SIZE: usize = 16;
/// Queues the table has room for.
pub const MAX_SLOTS: usize = (REG_RESPONSE as usize - HEADER_SIZE) / SLOT_SIZE;

pub const FLAG_PENDING: u32 = 1;
pub const FLAG_WRITE: u32 = 2;
pub const STATUS_OK: u32 = 0;
pub const STATUS_FAILED: u32 = 1;

/// One posted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// Which queue's slot (the device's queue index).
    pub slot: u16,
    pub seq: u32,
    /// Page-aligned.
    pub iova: u64,
    /// The device wanted to write the page.
    pub write: bool,
}

/// Encodes a table of `slots` (one per queue, `None` for an empty slot).
pub fn encode_table(slots: &[Option<PageRequest>]) -> Vec<u8> {
    let mut t = Vec::with_capacity(HEADER_SIZE + SLOT_SIZE * slots.len());
    t.extend_from_slice(&(slots.len() as u32).to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    for s in slots {
        let (seq, flags, iova) = match s {
            Some(r) => (
                r.seq,
                FLAG_PENDING | if r.write { FLAG_WRITE } else { 0 },
                r.iova,
            ),
            None => (0, 0, 0),
        };
        t.extend_from_slice(&seq.to_le_bytes());
        t.extend_from_slice(&flags.to_le_bytes());
        t.extend_from_slice(&iova.to_le_bytes());
    }
    t
}

/// Decodes the pending requests of a table the device sent; a table that is short, or claims
/// more slots than it carries or the region holds, yields what it does carry.
pub fn decode_table(t: &[u8]) -> Vec<PageRequest> {
    let u32_at = |at: usize| {
        t.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let Some(n) = u32_at(0) else {
        return Vec::new();
    };
    let n = (n as usize).min(MAX_SLOTS);
    let mut out = Vec::new();
    for i in 0..n {
        let at = HEADER_SIZE + SLOT_SIZE * i;
        let (Some(seq), Some(flags), Some(iova)) = (
            u32_at(at),
            u32_at(at + 4),
            t.get(at + 8..at + 16)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap())),
        ) else {
            break;
        };
        if flags & FLAG_PENDING != 0 && seq != 0 {
            out.push(PageRequest {
                slot: i as u16,
                seq,
                iova: iova & !(crate::spec::PAGE_SIZE - 1),
                write: flags & FLAG_WRITE != 0,
            });
        }
    }
    out
}

pub fn encode_response(seq: u32, ok: bool) -> [u8; 8] {
    let mut r = [0u8; 8];
    r[..4].copy_from_slice(&seq.to_le_bytes());
    let status = if ok { STATUS_OK } else { STATUS_FAILED };
    r[4..].copy_from_slice(&status.to_le_bytes());
    r
}

/// (sequence number, the page is mapped now) from a response write; `None` if it is not 8 bytes.
pub fn decode_response(r: &[u8]) -> Option<(u32, bool)> {
    let r: &[u8; 8] = r.try_into().ok()?;
    let seq = u32::from_le_bytes(r[..4].try_into().unwrap());
    let status = u32::from_le_bytes(r[4..].try_into().unwrap());
    Some((seq, status == STATUS_OK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_response_round_trip() {
        let r = PageRequest {
            slot: 1,
            seq: 7,
            iova: 0x12_3000,
            write: true,
        };
        let t = encode_table(&[None, Some(r)]);
        assert_eq!(t.len(), HEADER_SIZE + 2 * SLOT_SIZE);
        assert_eq!(decode_table(&t), vec![r]);
        assert_eq!(decode_response(&encode_response(7, true)), Some((7, true)));
        assert_eq!(
            decode_response(&encode_response(8, false)),
            Some((8, false))
        );
        assert_eq!(decode_response(&[0; 4]), None);
    }

    /// A device's table is not trusted: short, lying about its slot count, or garbage.
    #[test]
    fn hostile_tables_decode_to_what_they_carry() {
        let r = PageRequest {
            slot: 0,
            seq: 3,
            iova: 0x5000,
            write: false,
        };
        let mut t = encode_table(&[Some(r)]);
        t[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode_table(&t),
            vec![r],
            "claims more slots than it carries"
        );
        assert!(
            decode_table(&t[..HEADER_SIZE + 8]).is_empty(),
            "cut in a slot"
        );
        assert!(decode_table(&[1, 2]).is_empty());
        // An unaligned IOVA is taken as its page.
        t[HEADER_SIZE + 8..HEADER_SIZE + 16].copy_from_slice(&0x5123u64.to_le_bytes());
        assert_eq!(decode_table(&t)[0].iova, 0x5000);
    }
}
