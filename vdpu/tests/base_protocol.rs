//! vdpu against a standard vfio-user client (the `vfio_user` crate's, as Cloud Hypervisor's
//! `--user-device` uses): base protocol only — region reads and writes over the socket, no io
//! fds. A real virtio-blk request is served by DMA through the IOMMU, its completion interrupt
//! arrives on the client's eventfd, and a request into an unmapped page fails as an IOPF.

mod common;

use common::rig::{setup, Rig};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vfio_user::Client;

#[test]
fn standard_client_serves_a_request_and_sees_iopf() {
    let mut rig = setup("", 1);
    let mut id = [0u8; 4];
    rig.read_request(0, 0, 5, 0x11000);
    rig.wait_used(0, 1);
    assert_eq!(rig.get8(0x12000), 0, "status OK");
    let mut data = [0u8; 512];
    rig.mem.read_exact_at(&mut data, 0x11000).unwrap();
    assert_eq!(data, [5u8; 512], "sector 5 DMAed into client memory");
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.irq.read().is_err() {
        assert!(
            Instant::now() < deadline,
            "no completion interrupt on the client's eventfd"
        );
        std::thread::sleep(Duration::from_millis(1));
    }

    // The client unmaps the data page: the device cannot reach it and fails the request.
    rig.client.dma_unmap(0, 1 << 20).unwrap();
    rig.client
        .dma_map(0, 0, 0x11000, rig.mem.as_raw_fd())
        .unwrap();
    rig.client
        .dma_map(0x12000, 0x12000, (1 << 20) - 0x12000, rig.mem.as_raw_fd())
        .unwrap();
    rig.mem.write_all_at(&[0x77; 512], 0x11000).unwrap();
    rig.read_request(0, 1, 6, 0x11000);
    rig.wait_used(0, 2);
    assert_eq!(
        rig.get8(0x12001),
        1,
        "IOERR for a buffer in an unmapped page"
    );
    rig.mem.read_exact_at(&mut data, 0x11000).unwrap();
    assert_eq!(data, [0x77; 512], "the unmapped page was not written");
    let json = rig.counters();
    assert!(json["iopf"].as_u64().unwrap() >= 1, "{json}");
    assert_eq!(json["last_iopf_iova"].as_u64(), Some(0x11000));
    assert_eq!(json["read_ops"].as_u64(), Some(1));

    // A new client can connect after this one leaves.
    let sock = std::mem::replace(&mut rig.sock, PathBuf::new());
    drop(rig);
    let mut again = Client::new(&sock).expect("reconnect");
    again.region_read(7, 0, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
    let _ = std::fs::remove_file(&sock);
}

/// The VIO hardware extension: with a shadow index enabled, the device sees only what the
/// shadow publishes, whatever the guest's avail->idx says; disabled, it reads the ring again.
#[test]
fn shadow_index_gates_the_device() {
    let mut rig = setup("", 1);
    // Find the capability (cfg_type 0x80) in config space.
    let cfg = |rig: &mut Rig, off: u64| {
        let mut b = [0u8; 4];
        rig.client.region_read(7, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    };
    let mut ptr = u64::from(cfg(&mut rig, 0x34) & 0xfc);
    let mut found = None;
    while ptr != 0 {
        let head = cfg(&mut rig, ptr);
        if head & 0xff == 0x09 && (head >> 24) & 0xff == 0x80 {
            found = Some(cfg(&mut rig, ptr + 8));
        }
        ptr = u64::from((head >> 8) & 0xfc);
    }
    let base = u64::from(found.expect("VIO shadow-index capability"));
    assert_eq!(rig.r32(base), 0x5348_4956, "magic");
    assert_eq!(rig.r32(base + 8), 1, "one queue");
    const SHADOW: u64 = 0x20000;
    rig.put(SHADOW, 0u16);
    rig.w(base + 0x10, &SHADOW.to_le_bytes());
    rig.w(base + 0x18, &1u32.to_le_bytes());
    assert_eq!(rig.r32(base + 0x18), 1);

    rig.read_request(0, 0, 7, 0x11000);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        rig.used_idx(0),
        0,
        "the guest's index alone does not reach the device"
    );
    rig.put(SHADOW, 1u16);
    rig.w(0x6000, &0u16.to_le_bytes());
    rig.wait_used(0, 1);
    assert_eq!(rig.get8(0x12000), 0);

    rig.w(base + 0x18, &0u32.to_le_bytes());
    rig.read_request(0, 1, 8, 0x11200);
    rig.wait_used(0, 2);
    assert_eq!(rig.get8(0x12001), 0, "switched back to the ring's index");
}
