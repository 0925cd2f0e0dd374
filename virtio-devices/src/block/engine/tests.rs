use super::*;
use crate::GuestMemoryMmap;
use std::io::Write;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

struct Rig {
    mem: GuestMemoryMmap,
    queue: Queue,
    disk: RawFile,
    path: std::path::PathBuf,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    counters: BlockCounters,
    avail_idx: u16,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn rig(readonly: bool) -> Rig {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "vio-engine-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = std::fs::File::create(&path).unwrap();
    let content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i / 512) as u8).collect();
    f.write_all(&content).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut queue = Queue::new(QSIZE).unwrap();
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    assert!(queue.is_valid(&mem));
    Rig {
        disk: RawFile::open(&path, readonly).unwrap(),
        mem,
        queue,
        path,
        serial: *b"vio-test-serial-0001",
        counters: BlockCounters::default(),
        avail_idx: 0,
    }
}

fn desc_at(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    mem.write_obj(addr, GuestAddress(at)).unwrap();
    mem.write_obj(len, GuestAddress(at + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
    mem.write_obj(next, GuestAddress(at + 14)).unwrap();
}

fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

impl Rig {
    /// Writes descriptors `(addr, len, flags)` chained from index `first` and makes
    /// `first` available.
    fn chain(&mut self, first: u16, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = first + i as u16;
            let next = if i + 1 < descs.len() { N } else { 0 };
            desc_at(
                &self.mem,
                DESC + 16 * u64::from(idx),
                addr,
                len,
                flags | next,
                idx + 1,
            );
        }
        self.publish(first);
    }

    fn publish(&mut self, head: u16) {
        let slot = self.avail_idx % QSIZE;
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn run(&mut self) -> Result<bool, virtio_queue::Error> {
        let engine = BlockEngine {
            disk: &self.disk,
            serial: &self.serial,
            counters: &self.counters,
        };
        engine.process_queue(&mut self.queue, &self.mem)
    }

    /// (id, len) of used element `i`.
    fn used(&self, i: u16) -> (u32, u32) {
        let e = USED + 4 + 8 * u64::from(i);
        (
            self.mem.read_obj(GuestAddress(e)).unwrap(),
            self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
        )
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }
}

#[test]
fn read_request() {
    let mut r = rig(false);
    header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, 2);
    r.mem.write_obj(0xffu8, GuestAddress(0x12000)).unwrap();
    r.chain(0, &[(0x10000, 16, R), (0x11000, 1024, W), (0x12000, 1, W)]);
    r.run().unwrap();
    assert_eq!(r.used_idx(), 1);
    assert_eq!(r.used(0), (0, 1025));
    assert_eq!(r.status(0x12000), VIRTIO_BLK_S_OK);
    let mut data = [0u8; 1024];
    r.mem.read_slice(&mut data, GuestAddress(0x11000)).unwrap();
    assert!(data[..512].iter().all(|&b| b == 2) && data[512..].iter().all(|&b| b == 3));
    assert_eq!(r.counters.read_bytes.load(Ordering::Relaxed), 1024);
}

/// A bounded batch stops at its budget and says so; the next picks up where it stopped.
#[test]
fn a_bounded_batch_leaves_the_rest_for_the_next() {
    let mut r = rig(false);
    for i in 0..3u16 {
        let at = 0x10000 + 0x1000 * u64::from(i);
        header(&r.mem, at, VIRTIO_BLK_T_IN, 0);
        r.chain(
            3 * i,
            &[(at, 16, R), (at + 0x100, 512, W), (at + 0x800, 1, W)],
        );
    }
    let engine = BlockEngine {
        disk: &r.disk,
        serial: &r.serial,
        counters: &r.counters,
    };
    assert!(engine.process_some(&mut r.queue, &r.mem, 2).unwrap().1);
    assert_eq!(r.used_idx(), 2);
    assert!(!engine.process_some(&mut r.queue, &r.mem, 2).unwrap().1);
    assert_eq!(r.used_idx(), 3);
    assert_eq!(r.status(0x12800), VIRTIO_BLK_S_OK);
}

#[test]
fn write_request_with_header_and_data_in_one_descriptor() {
    let mut r = rig(false);
    header(&r.mem, 0x10000, VIRTIO_BLK_T_OUT, 4);
    r.mem
        .write_slice(&[0x5a; 512], GuestAddress(0x10010))
        .unwrap();
    r.chain(0, &[(0x10000, 16 + 512, R), (0x12000, 1, W)]);
    r.run().unwrap();
    assert_eq!(r.status(0x12000), VIRTIO_BLK_S_OK);
    assert_eq!(r.used(0), (0, 1));
    let mut b = [0u8; 512];
    r.disk.read_at(&mut b, 4 * 512).unwrap();
    assert_eq!(b, [0x5a; 512]);
}

#[test]
fn data_split_across_descriptors_and_status_in_data_descriptor() {
    let mut r = rig(false);
    header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, 1);
    // 512 data bytes in two pieces; the status is the last byte of the last piece.
    r.chain(0, &[(0x10000, 16, R), (0x11000, 300, W), (0x11800, 213, W)]);
    r.run().unwrap();
    assert_eq!(r.status(0x11800 + 212), VIRTIO_BLK_S_OK);
    assert_eq!(r.used(0), (0, 513));
}

#[test]
fn get_id_and_flush_and_unsupported() {
    let mut r = rig(false);
    header(&r.mem, 0x10000, VIRTIO_BLK_T_GET_ID, 0);
    r.chain(0, &[(0x10000, 16, R), (0x11000, 20, W), (0x12000, 1, W)]);
    header(&r.mem, 0x10100, VIRTIO_BLK_T_FLUSH, 0);
    r.chain(3, &[(0x10100, 16, R), (0x12001, 1, W)]);
    header(&r.mem, 0x10200, 99, 0);
    r.chain(5, &[(0x10200, 16, R), (0x12002, 1, W)]);
    r.run().unwrap();
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(0x11000)).unwrap();
    assert_eq!(&id, b"vio-test-serial-0001");
    assert_eq!(r.used(0), (0, 21));
    assert_eq!(r.status(0x12001), VIRTIO_BLK_S_OK);
    assert_eq!(r.status(0x12002), VIRTIO_BLK_S_UNSUPP);
    assert_eq!(r.counters.flush_ops.load(Ordering::Relaxed), 1);
}

fn expect_ioerr(r: &mut Rig, status: u64) {
    r.run().unwrap();
    assert_eq!(r.used_idx(), 1, "the chain is returned, not dropped");
    assert_eq!(r.used(0).1, 1);
    assert_eq!(r.status(status), VIRTIO_BLK_S_IOERR);
    assert_eq!(r.counters.bad_requests.load(Ordering::Relaxed), 1);
}

#[test]
fn beyond_the_disk_end_is_ioerr() {
    let mut r = rig(false);
    header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, (1 << 20) / 512 - 1);
    r.chain(0, &[(0x10000, 16, R), (0x11000, 1024, W), (0x12000, 1, W)]);
    expect_ioerr(&mut r, 0x12000);
    // Sector arithmetic that would wrap.
    let mut r = rig(false);
    header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, u64::MAX);
    r.chain(0, &[(0x10000, 16, R), (0x11000, 512, W), (0x12000, 1, W)]);
    expect_ioerr(&mut r, 0x12000);
}

#[test]
fn buffer_outside_guest_memory_is_ioerr() {
    let mut r = rig(false);
    header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, 0);
    r.chain(
        0,
        &[(0x10000, 16, R), (0xffff_f000, 512, W), (0x12000, 1, W)],
    );
    expect_ioerr(&mut r, 0x12000);
    // Straddling the end of RAM.
    let mut r = rig(false);
    header(&r.mem, 0x10000, VIRTIO_BLK_T_OUT, 0);
    r.chain(
        0,
        &[(0x10000, 16, R), ((1 << 20) - 256, 512, R), (0x12000, 1, W)],
    );
    expect_ioerr(&mut r, 0x12000);
}

#[test]
fn malformed_framing_is_ioerr() {
    // Readable after writable.
    let mut r = rig(false);
    header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, 0);
    r.chain(
        0,
        &[
            (0x10000, 16, R),
            (0x11000, 512, W),
            (0x10100, 16, R),
            (0x12000, 1, W),
        ],
    );
    expect_ioerr(&mut r, 0x12000);
    // Short header.
    let mut r = rig(false);
    r.chain(0, &[(0x10000, 8, R), (0x12000, 1, W)]);
    expect_ioerr(&mut r, 0x12000);
    // Unaligned length.
    let mut r = rig(false);
    header(&r.mem, 0x10000, VIRTIO_BLK_T_OUT, 0);
    r.chain(0, &[(0x10000, 16, R), (0x11000, 100, R), (0x12000, 1, W)]);
    expect_ioerr(&mut r, 0x12000);
    // Header outside guest memory.
    let mut r = rig(false);
    r.chain(0, &[(0xffff_0000, 16, R), (0x12000, 1, W)]);
    expect_ioerr(&mut r, 0x12000);
}

#[test]
fn no_status_descriptor_returns_the_chain_with_zero_length() {
    let mut r = rig(false);
    header(&r.mem, 0x10000, VIRTIO_BLK_T_OUT, 0);
    r.chain(0, &[(0x10000, 16, R), (0x11000, 512, R)]);
    r.run().unwrap();
    assert_eq!(r.used_idx(), 1);
    assert_eq!(r.used(0), (0, 0));
}

#[test]
fn descriptor_loop_terminates() {
    let mut r = rig(false);
    header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, 0);
    desc_at(&r.mem, DESC, 0x10000, 16, N, 1);
    desc_at(&r.mem, DESC + 16, 0x11000, 512, W | N, 0); // points back to the head
    r.publish(0);
    r.run().unwrap();
    assert_eq!(r.used_idx(), 1, "a looping chain is bounded and returned");
}

#[test]
fn head_index_out_of_range_does_not_panic() {
    let mut r = rig(false);
    r.publish(QSIZE + 3);
    r.run().unwrap();
    assert_eq!(r.counters.bad_requests.load(Ordering::Relaxed), 1);
    // The bad entry is skipped and the queue keeps serving.
    header(&r.mem, 0x10000, VIRTIO_BLK_T_FLUSH, 0);
    r.chain(0, &[(0x10000, 16, R), (0x12000, 1, W)]);
    r.run().unwrap();
    assert_eq!(r.used_idx(), 1);
    assert_eq!(r.status(0x12000), VIRTIO_BLK_S_OK);
}

#[test]
fn avail_index_far_ahead_is_an_error_not_a_hang() {
    let mut r = rig(false);
    r.mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
    assert!(matches!(
        r.run(),
        Err(virtio_queue::Error::InvalidAvailRingIndex)
    ));
    assert_eq!(r.used_idx(), 0, "nothing is consumed from a corrupt ring");
}

#[test]
fn indirect_tables() {
    let mut r = rig(false);
    header(&r.mem, 0x10000, VIRTIO_BLK_T_IN, 0);
    desc_at(&r.mem, 0x20000, 0x10000, 16, N, 1);
    desc_at(&r.mem, 0x20010, 0x11000, 512, W | N, 2);
    desc_at(&r.mem, 0x20020, 0x12000, 1, W, 0);
    desc_at(&r.mem, DESC, 0x20000, 48, VRING_DESC_F_INDIRECT as u16, 0);
    r.publish(0);
    r.run().unwrap();
    assert_eq!(r.status(0x12000), VIRTIO_BLK_S_OK);
    assert_eq!(r.used(0), (0, 513));

    // A nested indirect table and a misaligned table size end the chain: no status found.
    let mut r = rig(false);
    desc_at(
        &r.mem,
        0x20000,
        0x20100,
        16,
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    desc_at(&r.mem, DESC, 0x20000, 16, VRING_DESC_F_INDIRECT as u16, 0);
    r.publish(0);
    desc_at(
        &r.mem,
        DESC + 16,
        0x20000,
        17,
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    r.publish(1);
    r.run().unwrap();
    assert_eq!(r.used_idx(), 2);
    assert_eq!(r.used(0), (0, 0));
    assert_eq!(r.used(1), (1, 0));
}

#[test]
fn readonly_disk_rejects_writes() {
    let mut r = rig(true);
    header(&r.mem, 0x10000, VIRTIO_BLK_T_OUT, 0);
    r.chain(0, &[(0x10000, 16, R), (0x11000, 512, R), (0x12000, 1, W)]);
    expect_ioerr(&mut r, 0x12000);
}
