//! The VIO shadow-index extension: the wire contract between a virtio-pci device that offers it
//! (vdpu's transport) and the VMM that drives it (the `vio` front end). Both ends use these
//! definitions and nothing else; `docs/vio.md` ("The VIO extension, as a spec") says the same in
//! prose.
//!
//! Discovery: a vendor-specific PCI capability in the virtio layout (`virtio_pci_cap`) with
//! `cfg_type` = [`CAP_CFG_TYPE`]; virtio drivers skip capability types they do not know. Its
//! `bar`/`offset`/`length` locate the control block.
//!
//! Control block (little endian, 4- or 8-byte accesses):
//!
//! | offset             | field         | access | meaning                                    |
//! |--------------------|---------------|--------|--------------------------------------------|
//! | [`REG_MAGIC`]      | u32           | RO     | [`MAGIC`]                                  |
//! | [`REG_VERSION`]    | u32           | RO     | [`VERSION`]                                |
//! | [`REG_NUM_QUEUES`] | u32           | RO     | queues the device has                      |
//! | [`queue_reg`]`(n)` | u64 shadow    | RW     | IOVA of queue *n*'s shadow slot            |
//! | `+` [`QUEUE_CONTROL`] | u32 control | RW     | [`CTRL_SHADOW_INDEX`], [`CTRL_SUPPRESSION`], [`CTRL_CAPTURE`] |
//!
//! Shadow slot (in memory the client owns and DMA-maps for the device), one per queue, every
//! field a naturally aligned u16:
//! - [`SLOT_AVAIL_IDX`]: written by the client (release ordering, after everything the index
//!   exposes is reachable), read by the device instead of the guest's `avail->idx` while
//!   [`CTRL_SHADOW_INDEX`] is set.
//! - [`SLOT_USED_FLAGS`], [`SLOT_AVAIL_EVENT`]: written by the device instead of the guest's
//!   `used->flags` and `avail_event` while [`CTRL_SUPPRESSION`] is set; the client decides what
//!   the guest sees there.
//!
//! Ordering: the client writes a queue's shadow IOVA before setting its control bits, and sets
//! them after the queue's ring addresses are final (after `queue_enable`); a control write of 0
//! returns the queue to the guest's ring. A device reset clears every queue's registers; control
//! bits written while a queue's shadow IOVA is 0 are ignored.
//!
//! Switching a running queue (elastic passthrough, version 2): a control write of 0 hands the
//! queue to the guest's ring; the device then reads indices the client never published, so the
//! client must have made all of guest RAM reachable first. A write of [`CTRL_SHADOW_INDEX`] |
//! [`CTRL_CAPTURE`] takes a running queue back: before the device reads the shadow slot, it
//! copies the guest's `avail->idx` there, atomically with respect to its own reads of the
//! index, so the index it sees never goes backwards. The completion of the write (the
//! vfio-user reply) is the device's acknowledgement; the client reads the captured index from
//! the slot after it, and owns the slot from then on.

/// The page size both ends assume for DMA mappings and the shadow page.
pub const PAGE_SIZE: u64 = 4096;

/// `cfg_type` of the vendor-specific capability that locates the control block.
pub const CAP_CFG_TYPE: u8 = 0x80;
/// "VIHS", little endian.
pub const MAGIC: u32 = 0x5348_4956;
/// 2: [`CTRL_CAPTURE`] (running queues can be switched between the shadow and the ring).
pub const VERSION: u32 = 2;

pub const REG_MAGIC: u64 = 0x0;
pub const REG_VERSION: u64 = 0x4;
pub const REG_NUM_QUEUES: u64 = 0x8;
/// Queue 0's registers; queue *n*'s are [`QUEUE_REG_STRIDE`] bytes further on.
pub const REG_QUEUES: u64 = 0x10;
pub const QUEUE_REG_STRIDE: u64 = 16;
/// Within a queue's registers: the shadow slot's IOVA (u64) and the control word (u32).
pub const QUEUE_SHADOW_IOVA: u64 = 0x0;
pub const QUEUE_CONTROL: u64 = 0x8;

/// Control bit 0: read the available index from the shadow slot.
pub const CTRL_SHADOW_INDEX: u32 = 1;
/// Control bit 1: write `used->flags` and `avail_event` to the shadow slot.
pub const CTRL_SUPPRESSION: u32 = 2;
/// Control bit 2, with [`CTRL_SHADOW_INDEX`]: first copy the guest's `avail->idx` into the
/// slot (a running queue switching back to the shadow index). Reads back as 0.
pub const CTRL_CAPTURE: u32 = 4;

/// One cache line per queue's shadow slot.
pub const SLOT_STRIDE: u64 = 64;
pub const SLOT_AVAIL_IDX: u64 = 0;
pub const SLOT_USED_FLAGS: u64 = 2;
pub const SLOT_AVAIL_EVENT: u64 = 4;

/// Queues one shadow page can serve.
pub const MAX_QUEUES: u16 = (PAGE_SIZE / SLOT_STRIDE) as u16;
/// The control block's length; a device's BAR window for it may be larger.
pub const CONTROL_BLOCK_LEN: u64 = REG_QUEUES + QUEUE_REG_STRIDE * MAX_QUEUES as u64;

// A device can place the control block in one page of a BAR.
const _: () = assert!(CONTROL_BLOCK_LEN <= PAGE_SIZE);

/// Offset of queue `q`'s registers in the control block.
pub const fn queue_reg(q: u16) -> u64 {
    REG_QUEUES + QUEUE_REG_STRIDE * q as u64
}

/// Where a register access lands in the control block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Register {
    /// The read-only header, at this offset of it.
    Header(u64),
    /// Queue `queue`'s registers, at offset `field` within them.
    Queue { queue: u16, field: u64 },
}

/// Decodes a control-block offset.
pub fn decode(offset: u64) -> Register {
    if offset < REG_QUEUES {
        return Register::Header(offset);
    }
    let rel = offset - REG_QUEUES;
    match u16::try_from(rel / QUEUE_REG_STRIDE) {
        Ok(queue) => Register::Queue {
            queue,
            field: rel % QUEUE_REG_STRIDE,
        },
        Err(_) => Register::Header(offset),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_and_decodes() {
        assert_eq!(MAX_QUEUES, 64);
        assert_eq!(decode(REG_NUM_QUEUES), Register::Header(8));
        assert_eq!(
            decode(queue_reg(3) + QUEUE_CONTROL),
            Register::Queue {
                queue: 3,
                field: QUEUE_CONTROL
            }
        );
        assert_eq!(MAGIC.to_le_bytes(), *b"VIHS");
    }
}
