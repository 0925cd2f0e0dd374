//! vdpu against a standard vfio-user client (the `vfio_user` crate's, as Cloud Hypervisor's
//! `--user-device` uses): base protocol only — region reads and writes over the socket, no io
//! fds. A real virtio-blk request is served by DMA through the IOMMU, its completion interrupt
//! arrives on the client's eventfd, and a request into an unmapped page fails as an IOPF.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vdpu::device::{build_blk, BlkConfig};
use vfio_user::Client;
use vmm_sys_util::eventfd::EventFd;

const MSIX: u32 = 2;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

fn memfd(size: u64) -> File {
    let name = std::ffi::CString::new("guest").unwrap();
    // SAFETY: valid name; the new fd is owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

struct Rig {
    client: Client,
    mem: File,
    irq: EventFd,
    avail_idx: u16,
}

impl Rig {
    fn w(&mut self, off: u64, data: &[u8]) {
        self.client.region_write(0, off, data).unwrap();
    }

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.client.region_read(0, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn r8(&mut self, off: u64) -> u8 {
        let mut b = [0u8; 1];
        self.client.region_read(0, off, &mut b).unwrap();
        b[0]
    }

    fn put<T: Copy>(&self, at: u64, v: T) {
        // SAFETY: T is a plain integer type; viewing it as bytes is sound.
        let b = unsafe {
            std::slice::from_raw_parts(&v as *const T as *const u8, std::mem::size_of::<T>())
        };
        self.mem.write_all_at(b, at).unwrap();
    }

    fn get8(&self, at: u64) -> u8 {
        let mut b = [0u8; 1];
        self.mem.read_exact_at(&mut b, at).unwrap();
        b[0]
    }

    fn used_idx(&self) -> u16 {
        let mut b = [0u8; 2];
        self.mem.read_exact_at(&mut b, USED + 2).unwrap();
        u16::from_le_bytes(b)
    }

    /// Posts a read of one sector into `data` and rings the doorbell over the socket.
    fn read_request(&mut self, slot: u16, sector: u64, data: u64) {
        let hdr = 0x10000 + 0x100 * slot as u64;
        let status = 0x12000 + slot as u64;
        self.put(hdr, 0u32);
        self.put(hdr + 8, sector);
        self.mem.write_all_at(&[0xff], status).unwrap();
        let d = DESC + 16 * 3 * slot as u64;
        for (i, (addr, len, flags)) in [(hdr, 16u32, 1u16), (data, 512, 3), (status, 1, 2)]
            .iter()
            .enumerate()
        {
            let at = d + 16 * i as u64;
            self.put(at, *addr);
            self.put(at + 8, *len);
            self.put(at + 12, *flags);
            self.put(at + 14, 3 * slot + i as u16 + 1);
        }
        self.put(AVAIL + 4 + 2 * (self.avail_idx % 16) as u64, 3 * slot);
        self.avail_idx += 1;
        self.put(AVAIL + 2, self.avail_idx);
        self.w(0x6000, &0u16.to_le_bytes());
    }

    fn wait_used(&self, idx: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx() != idx {
            assert!(Instant::now() < deadline, "request never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn start() -> (PathBuf, PathBuf) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir();
    let disk = dir.join(format!("vdpu-base-{}-{n}.img", std::process::id()));
    let mut f = File::create(&disk).unwrap();
    for s in 0..64u8 {
        f.write_all(&[s; 512]).unwrap();
    }
    let sock = dir.join(format!("vdpu-base-{}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap();
    let mut dev =
        build_blk(&BlkConfig::parse(&format!("path={}", disk.display())).unwrap()).unwrap();
    std::thread::spawn(move || vdpu::server::run(listener, &mut dev));
    (sock, disk)
}

/// Connects, maps 1 MiB of client memory, wires MSI-X and brings queue 0 up.
fn setup() -> (Rig, PathBuf, PathBuf) {
    let (sock, disk) = start();
    let mut client = Client::new(&sock).expect("version negotiation and region discovery");
    assert_eq!(client.region(7).map(|r| r.size), Some(256));
    assert_eq!(client.region(0).map(|r| r.size), Some(0x80000));
    let mut id = [0u8; 4];
    client.region_read(7, 0, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), 0x1042_1af4, "virtio-blk modern");

    let mem = memfd(1 << 20);
    client.dma_map(0, 0, 1 << 20, mem.as_raw_fd()).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let none = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // DATA_EVENTFD | ACTION_TRIGGER on vectors 0 (config) and 1 (queue 0).
    client
        .set_irqs(MSIX, 4 | 32, 0, 2, &[none.as_raw_fd(), irq.as_raw_fd()])
        .unwrap();
    let mut rig = Rig {
        client,
        mem,
        irq,
        avail_idx: 0,
    };

    rig.w(0x14, &[1 | 2]);
    rig.w(0x00, &1u32.to_le_bytes());
    assert_eq!(rig.r32(0x04) & 1, 1, "VERSION_1 offered");
    rig.w(0x08, &1u32.to_le_bytes());
    rig.w(0x0c, &1u32.to_le_bytes());
    rig.w(0x14, &[1 | 2 | 8]);
    assert_eq!(rig.r8(0x14) & 8, 8, "FEATURES_OK");
    rig.w(0x16, &0u16.to_le_bytes());
    rig.w(0x18, &16u16.to_le_bytes());
    for (off, addr) in [(0x20u64, DESC), (0x28, AVAIL), (0x30, USED)] {
        rig.w(off, &(addr as u32).to_le_bytes());
        rig.w(off + 4, &0u32.to_le_bytes());
    }
    rig.w(0x1a, &1u16.to_le_bytes());
    rig.w(0x1c, &1u16.to_le_bytes());
    rig.w(0x14, &[1 | 2 | 8 | 4]);

    (rig, sock, disk)
}

#[test]
fn standard_client_serves_a_request_and_sees_iopf() {
    let (mut rig, sock, disk) = setup();
    let mut id = [0u8; 4];
    rig.read_request(0, 5, 0x11000);
    rig.wait_used(1);
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
    rig.read_request(1, 6, 0x11000);
    rig.wait_used(2);
    assert_eq!(
        rig.get8(0x12001),
        1,
        "IOERR for a buffer in an unmapped page"
    );
    rig.mem.read_exact_at(&mut data, 0x11000).unwrap();
    assert_eq!(data, [0x77; 512], "the unmapped page was not written");
    let mut counters = vec![0u8; 512];
    rig.client.region_read(9, 0, &mut counters).unwrap();
    let text = String::from_utf8_lossy(&counters);
    let json: serde_json::Value = serde_json::from_str(text.trim_end_matches('\0')).unwrap();
    assert!(json["iopf"].as_u64().unwrap() >= 1, "{json}");
    assert_eq!(json["last_iopf_iova"].as_u64(), Some(0x11000));
    assert_eq!(json["read_ops"].as_u64(), Some(1));

    // A new client can connect after this one leaves.
    drop(rig);
    let mut again = Client::new(&sock).expect("reconnect");
    again.region_read(7, 0, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&sock);
}

/// The VIO hardware extension: with a shadow index enabled, the device sees only what the
/// shadow publishes, whatever the guest's avail->idx says; disabled, it reads the ring again.
#[test]
fn shadow_index_gates_the_device() {
    let (mut rig, sock, disk) = setup();
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

    rig.read_request(0, 7, 0x11000);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        rig.used_idx(),
        0,
        "the guest's index alone does not reach the device"
    );
    rig.put(SHADOW, 1u16);
    rig.w(0x6000, &0u16.to_le_bytes());
    rig.wait_used(1);
    assert_eq!(rig.get8(0x12000), 0);

    rig.w(base + 0x18, &0u32.to_le_bytes());
    rig.read_request(1, 8, 0x11200);
    rig.wait_used(2);
    assert_eq!(rig.get8(0x12001), 0, "switched back to the ring's index");
    drop(rig);
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&sock);
}
