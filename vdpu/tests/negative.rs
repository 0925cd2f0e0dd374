//! Malformed and hostile vfio-user messages: an error reply or a closed connection, never a
//! crash; the device serves the next client.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use vfio::vfio_user::protocol::*;
use vm_memory::ByteValued;

fn server(name: &str) -> PathBuf {
    common::start_server("neg", name, 1 << 20)
}

fn connect(sock: &PathBuf) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let v = Version { major: 0, minor: 1 };
    send(
        &s,
        Header {
            msg_id: 1,
            cmd: CMD_VERSION,
            ..Default::default()
        },
        &[v.as_slice(), b"{}\0"],
        &[],
    )
    .unwrap();
    let r = recv(&s).unwrap();
    assert_eq!(r.header.flags & FLAG_ERROR, 0);
    s
}

fn call(s: &UnixStream, cmd: u16, payload: &[&[u8]], fds: &[i32]) -> Message {
    send(
        s,
        Header {
            msg_id: 9,
            cmd,
            ..Default::default()
        },
        payload,
        fds,
    )
    .unwrap();
    let r = recv(s).unwrap();
    assert_eq!(r.header.msg_id, 9);
    assert_eq!(r.header.flags & FLAG_REPLY, FLAG_REPLY);
    r
}

fn errno(m: &Message) -> Option<u32> {
    (m.header.flags & FLAG_ERROR != 0).then_some(m.header.error)
}

fn memfd() -> File {
    let name = std::ffi::CString::new("m").unwrap();
    // SAFETY: valid name; the fd is owned by the File.
    let f = unsafe { File::from_raw_fd(libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC)) };
    f.set_len(1 << 20).unwrap();
    f
}

fn still_serves(sock: &PathBuf) {
    let s = connect(sock);
    let q = DeviceInfo {
        argsz: 16,
        ..Default::default()
    };
    let r = call(&s, CMD_DEVICE_GET_INFO, &[q.as_slice()], &[]);
    assert_eq!(errno(&r), None);
    assert_eq!(
        r.read::<DeviceInfo>().unwrap().flags & DEVICE_FLAGS_PCI,
        DEVICE_FLAGS_PCI
    );
}

#[test]
fn bad_commands_get_error_replies() {
    let sock = server("cmds");
    let s = connect(&sock);
    // Unknown command.
    assert_eq!(errno(&call(&s, 99, &[], &[])), Some(libc::ENOSYS as u32));
    // Payload shorter than the command's structure.
    assert_eq!(
        errno(&call(&s, CMD_DMA_MAP, &[&[1, 2, 3]], &[])),
        Some(libc::EINVAL as u32)
    );
    assert_eq!(
        errno(&call(&s, CMD_REGION_READ, &[], &[])),
        Some(libc::EINVAL as u32)
    );
    // Region index out of range; access beyond a region; odd BAR access size.
    let bad_region = RegionInfo {
        argsz: 32,
        index: 77,
        ..Default::default()
    };
    assert_eq!(
        errno(&call(
            &s,
            CMD_DEVICE_GET_REGION_INFO,
            &[bad_region.as_slice()],
            &[]
        )),
        Some(libc::EINVAL as u32)
    );
    let past_end = RegionAccess {
        offset: 250,
        region: PCI_CONFIG_REGION_INDEX,
        count: 16,
    };
    assert_eq!(
        errno(&call(&s, CMD_REGION_READ, &[past_end.as_slice()], &[])),
        Some(libc::EINVAL as u32)
    );
    let huge = RegionAccess {
        offset: u64::MAX - 2,
        region: 0,
        count: 8,
    };
    assert_eq!(
        errno(&call(&s, CMD_REGION_READ, &[huge.as_slice()], &[])),
        Some(libc::EINVAL as u32)
    );
    let odd = RegionAccess {
        offset: 0,
        region: 0,
        count: 3,
    };
    assert_eq!(
        errno(&call(&s, CMD_REGION_READ, &[odd.as_slice()], &[])),
        Some(libc::EINVAL as u32)
    );
    // Write data shorter than its count; write to the read-only counters region.
    let short = RegionAccess {
        offset: 0,
        region: PCI_CONFIG_REGION_INDEX,
        count: 4,
    };
    assert_eq!(
        errno(&call(&s, CMD_REGION_WRITE, &[short.as_slice(), &[1]], &[])),
        Some(libc::EINVAL as u32)
    );
    let ro = RegionAccess {
        offset: 0,
        region: PCI_NUM_REGIONS,
        count: 1,
    };
    assert_eq!(
        errno(&call(&s, CMD_REGION_WRITE, &[ro.as_slice(), &[1]], &[])),
        Some(libc::EPERM as u32)
    );
    // IRQ index out of range; SET_IRQS with several action flags, or past the vectors.
    let irq = IrqInfo {
        argsz: 16,
        index: 9,
        ..Default::default()
    };
    assert_eq!(
        errno(&call(&s, CMD_DEVICE_GET_IRQ_INFO, &[irq.as_slice()], &[])),
        Some(libc::EINVAL as u32)
    );
    let both = IrqSet {
        argsz: 20,
        flags: IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_TRIGGER,
        index: PCI_MSIX_IRQ_INDEX,
        start: 0,
        count: 1,
    };
    assert_eq!(
        errno(&call(&s, CMD_DEVICE_SET_IRQS, &[both.as_slice()], &[])),
        Some(libc::EINVAL as u32)
    );
    let past = IrqSet {
        argsz: 20,
        flags: IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
        index: PCI_MSIX_IRQ_INDEX,
        start: 1,
        count: 100,
    };
    assert_eq!(
        errno(&call(&s, CMD_DEVICE_SET_IRQS, &[past.as_slice()], &[])),
        Some(libc::EINVAL as u32)
    );
    // vdpu serves one client at a time: the next one is served once this one leaves.
    drop(s);
    still_serves(&sock);
}

#[test]
fn dma_map_limits() {
    let sock = server("dma");
    let s = connect(&sock);
    let f = memfd();
    let map = |address: u64, size: u64, offset: u64, fds: &[i32]| {
        let m = DmaMap {
            argsz: 32,
            flags: DMA_READ | DMA_WRITE,
            offset,
            address,
            size,
        };
        errno(&call(&s, CMD_DMA_MAP, &[m.as_slice()], fds))
    };
    assert_eq!(
        map(0x1000, 0x1000, 0, &[]),
        Some(libc::EINVAL as u32),
        "no fd"
    );
    assert_eq!(
        map(0x1001, 0x1000, 0, &[f.as_raw_fd()]),
        Some(libc::EINVAL as u32),
        "unaligned address"
    );
    assert_eq!(
        map(0x1000, 0, 0, &[f.as_raw_fd()]),
        Some(libc::EINVAL as u32),
        "empty"
    );
    assert_eq!(
        map(!0xfff, 0x2000, 0, &[f.as_raw_fd()]),
        Some(libc::EINVAL as u32),
        "wraps around"
    );
    assert_eq!(
        map(0x1000, 0x1000, 0x123, &[f.as_raw_fd()]),
        Some(libc::EINVAL as u32),
        "unaligned offset"
    );
    assert_eq!(map(0x1000, 0x4000, 0, &[f.as_raw_fd()]), None);
    assert_eq!(
        map(0x2000, 0x1000, 0, &[f.as_raw_fd()]),
        Some(libc::EEXIST as u32),
        "overlap"
    );
    let un = DmaUnmap {
        argsz: 24,
        flags: 0,
        address: 0x100000,
        size: 0x1000,
    };
    assert_eq!(
        errno(&call(&s, CMD_DMA_UNMAP, &[un.as_slice()], &[])),
        Some(libc::ENOENT as u32)
    );
    let un = DmaUnmap {
        argsz: 24,
        flags: 0,
        address: 0x2000,
        size: 0x1000,
    };
    let r = call(&s, CMD_DMA_UNMAP, &[un.as_slice()], &[]);
    assert_eq!(errno(&r), None);
    assert_eq!(
        r.read::<DmaUnmap>().unwrap(),
        un,
        "the reply echoes the entry"
    );
    drop(s);
    still_serves(&sock);
}

#[test]
fn malformed_framing_closes_the_connection_only() {
    let sock = server("frame");
    // Truncated header, then close.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&[1, 0, 1]).unwrap();
    drop(s);
    // A size below the header, and a huge size.
    for size in [4u32, 0x7fff_ffff] {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let h = Header {
            msg_id: 1,
            cmd: CMD_VERSION,
            size,
            ..Default::default()
        };
        s.write_all(h.as_slice()).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "connection closed");
    }
    // A reply-typed message from the client.
    let s = connect(&sock);
    let h = Header {
        msg_id: 1,
        cmd: CMD_DEVICE_GET_INFO,
        flags: FLAG_REPLY,
        ..Default::default()
    };
    send(&s, h, &[], &[]).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!((&s).read(&mut buf).unwrap_or(0), 0, "connection closed");
    // A header promising a payload that never comes.
    let mut s = UnixStream::connect(&sock).unwrap();
    let h = Header {
        msg_id: 1,
        cmd: CMD_VERSION,
        size: 64,
        ..Default::default()
    };
    s.write_all(h.as_slice()).unwrap();
    drop(s);
    still_serves(&sock);
}
