//! A standard vfio-user client (the `vfio_user` crate's, as Cloud Hypervisor's `--user-device`
//! uses) driving an in-process vdpu's virtio-blk queues by hand: 1 MiB of client memory,
//! 16-entry rings, one read request at a time per slot.

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

pub const MSIX: u32 = 2;
pub const MEM: u64 = 1 << 20;
const QUEUE_SIZE: u16 = 16;

/// Queue `q`'s rings and request buffers live in the `q`th quarter of client memory.
pub fn base(q: u16) -> u64 {
    u64::from(q) * 0x4_0000
}
pub fn desc(q: u16) -> u64 {
    base(q) + 0x1000
}
pub fn avail(q: u16) -> u64 {
    base(q) + 0x2000
}
pub fn used(q: u16) -> u64 {
    base(q) + 0x3000
}
/// Where slot `slot` of queue `q` has its status byte.
pub fn status(q: u16, slot: u16) -> u64 {
    base(q) + 0x12000 + u64::from(slot)
}

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

pub struct Rig {
    pub client: Client,
    pub mem: File,
    /// Queue 0's completion interrupt.
    pub irq: EventFd,
    avail_idx: Vec<u16>,
    pub sock: PathBuf,
    pub disk: PathBuf,
}

impl Rig {
    pub fn w(&mut self, off: u64, data: &[u8]) {
        self.client.region_write(0, off, data).unwrap();
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.client.region_read(0, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    pub fn r8(&mut self, off: u64) -> u8 {
        let mut b = [0u8; 1];
        self.client.region_read(0, off, &mut b).unwrap();
        b[0]
    }

    pub fn put<T: Copy>(&self, at: u64, v: T) {
        // SAFETY: T is a plain integer type; viewing it as bytes is sound.
        let b = unsafe {
            std::slice::from_raw_parts(&v as *const T as *const u8, std::mem::size_of::<T>())
        };
        self.mem.write_all_at(b, at).unwrap();
    }

    pub fn get8(&self, at: u64) -> u8 {
        let mut b = [0u8; 1];
        self.mem.read_exact_at(&mut b, at).unwrap();
        b[0]
    }

    pub fn used_idx(&self, q: u16) -> u16 {
        let mut b = [0u8; 2];
        self.mem.read_exact_at(&mut b, used(q) + 2).unwrap();
        u16::from_le_bytes(b)
    }

    /// Posts a read of one sector into `data` on queue `q` and rings its doorbell over the
    /// socket.
    pub fn read_request(&mut self, q: u16, slot: u16, sector: u64, data: u64) {
        let hdr = base(q) + 0x10000 + 0x100 * u64::from(slot);
        let status = status(q, slot);
        self.put(hdr, 0u32);
        self.put(hdr + 8, sector);
        self.mem.write_all_at(&[0xff], status).unwrap();
        let d = desc(q) + 16 * 3 * u64::from(slot);
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
        let idx = &mut self.avail_idx[usize::from(q)];
        let at = avail(q) + 4 + 2 * u64::from(*idx % QUEUE_SIZE);
        *idx = idx.wrapping_add(1);
        let idx = *idx;
        self.put(at, 3 * slot);
        self.put(avail(q) + 2, idx);
        self.w(0x6000 + 4 * u64::from(q), &q.to_le_bytes());
    }

    pub fn wait_used(&self, q: u16, idx: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx(q) != idx {
            assert!(Instant::now() < deadline, "request never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The device's counters (its JSON region).
    pub fn counters(&mut self) -> serde_json::Value {
        let mut buf = vec![0u8; 1024];
        self.client.region_read(9, 0, &mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf);
        serde_json::from_str(text.trim_end_matches('\0')).unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.disk);
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// Starts an in-process vdpu (`--blk path=...,{blk_extra}` over 64 sectors numbered 0..64).
pub fn start(blk_extra: &str) -> (PathBuf, PathBuf) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir();
    let disk = dir.join(format!("vdpu-rig-{}-{n}.img", std::process::id()));
    let mut f = File::create(&disk).unwrap();
    for s in 0..64u8 {
        f.write_all(&[s; 512]).unwrap();
    }
    let sock = dir.join(format!("vdpu-rig-{}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap();
    let cfg = BlkConfig::parse(&format!("path={}{blk_extra}", disk.display())).unwrap();
    let mut dev = build_blk(&cfg).unwrap();
    std::thread::spawn(move || vdpu::server::run(listener, &mut dev));
    (sock, disk)
}

/// Connects, maps all of client memory, wires MSI-X and brings queues 0..`queues` up.
pub fn setup(blk_extra: &str, queues: u16) -> Rig {
    let (sock, disk) = start(blk_extra);
    let mut client = Client::new(&sock).expect("version negotiation and region discovery");
    assert_eq!(client.region(7).map(|r| r.size), Some(256));
    assert_eq!(client.region(0).map(|r| r.size), Some(0x80000));
    let mut id = [0u8; 4];
    client.region_read(7, 0, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), 0x1042_1af4, "virtio-blk modern");

    let mem = memfd(MEM);
    client.dma_map(0, 0, MEM, mem.as_raw_fd()).unwrap();
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
        avail_idx: vec![0; usize::from(queues)],
        sock,
        disk,
    };

    rig.w(0x14, &[1 | 2]);
    rig.w(0x00, &1u32.to_le_bytes());
    assert_eq!(rig.r32(0x04) & 1, 1, "VERSION_1 offered");
    rig.w(0x08, &1u32.to_le_bytes());
    rig.w(0x0c, &1u32.to_le_bytes());
    rig.w(0x14, &[1 | 2 | 8]);
    assert_eq!(rig.r8(0x14) & 8, 8, "FEATURES_OK");
    for q in 0..queues {
        rig.w(0x16, &q.to_le_bytes());
        rig.w(0x18, &QUEUE_SIZE.to_le_bytes());
        for (off, addr) in [(0x20u64, desc(q)), (0x28, avail(q)), (0x30, used(q))] {
            rig.w(off, &(addr as u32).to_le_bytes());
            rig.w(off + 4, &0u32.to_le_bytes());
        }
        rig.w(0x1a, &(q + 1).to_le_bytes());
        rig.w(0x1c, &1u16.to_le_bytes());
    }
    rig.w(0x14, &[1 | 2 | 8 | 4]);
    rig
}
