//! Arbitrary client messages to vdpu's vfio-user server (a virtio-blk function, PRI on or
//! off): the framing, every command's payload, region accesses reaching the virtio-pci
//! transport, and, through DMA maps of real memory, the device's queues.
//!
//! Input: one selector byte, then a byte stream cut into messages by their headers' `size`
//! fields. A DMA_MAP message carries a 1 MiB memfd and a SET_IRQS message two eventfds, so
//! the paths behind them are reachable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::OnceLock;
use vdpu::device::{build_blk, BlkConfig};
use vfio::vfio_user::protocol::{CMD_DEVICE_SET_IRQS, CMD_DMA_MAP};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The device's disk: a memfd, named through /proc so `--blk path=` can open it and nothing
/// is left behind.
fn disk() -> &'static PathBuf {
    static DISK: OnceLock<(File, PathBuf)> = OnceLock::new();
    &DISK
        .get_or_init(|| {
            let f = memfd(64 * 512);
            (&f).write_all(&[0x5a; 64 * 512]).unwrap();
            let p = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
            (f, p)
        })
        .1
}

fn memfd(size: u64) -> File {
    let name = std::ffi::CString::new("fuzz").unwrap();
    // SAFETY: a valid name; the new descriptor is owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// Writes the messages in `data`, with descriptors where a command takes them.
fn client(sock: UnixStream, mut data: &[u8]) {
    while data.len() >= 16 {
        let cmd = u16::from_le_bytes([data[2], data[3]]);
        let size = u32::from_le_bytes([data[4], data[5], data[6], data[7]]) as usize;
        let (msg, rest) = data.split_at(size.clamp(16, data.len()));
        data = rest;
        let (mem, irqs) = (
            memfd(1 << 20),
            [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()],
        );
        let fds: Vec<RawFd> = match cmd {
            CMD_DMA_MAP => vec![mem.as_raw_fd()],
            CMD_DEVICE_SET_IRQS => irqs.iter().map(|e| e.as_raw_fd()).collect(),
            _ => Vec::new(),
        };
        let sent = if fds.is_empty() {
            (&sock).write_all(msg).map(|_| msg.len())
        } else {
            sock.send_with_fds(&[msg], &fds)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        };
        match sent {
            Ok(n) if n < msg.len() => {
                if (&sock).write_all(&msg[n..]).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return, // the server closed the connection
        }
    }
    let _ = (&sock).write_all(data);
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    let pri = if sel & 1 == 1 {
        ",pri=on,pri_timeout_ms=1"
    } else {
        ""
    };
    let cfg = BlkConfig::parse(&format!(
        "path={},num_queues={},queue_size=16{pri}",
        disk().display(),
        1 + (sel >> 1) % 2
    ))
    .unwrap();
    let mut dev = build_blk(&cfg).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    // Replies are drained on their own thread, so neither side can block the other.
    let reader = ours.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0; 1 << 16];
        while matches!((&reader).read(&mut buf), Ok(n) if n > 0) {}
    });
    let input = data.to_vec();
    let writer = std::thread::spawn(move || {
        client(ours.try_clone().unwrap(), &input);
        let _ = ours.shutdown(std::net::Shutdown::Write);
    });
    let _ = vdpu::server::serve_connection(&mut dev, &theirs);
    drop(theirs);
    dev.disconnect();
    writer.join().unwrap();
    drain.join().unwrap();
});
