//! A Linux TAP interface as a virtio-net backend: one frame per read or write, no packet-info
//! prefix and no vnet header (no offloads are offered, so the engine strips and synthesises it).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use thiserror::Error;

// <linux/if_tun.h> and <linux/sockios.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;
/// The ioctl requests a TAP set-up makes, for the seccomp filter of the thread that does it.
pub const TAP_IOCTLS: &[u64] = &[
    TUNSETIFF,
    TUNGETIFF,
    SIOCGIFFLAGS,
    SIOCSIFFLAGS,
    SIOCSIFADDR,
    SIOCSIFNETMASK,
];
const IFNAMSIZ: usize = 16;

#[derive(Debug, Error)]
pub enum TapError {
    #[error("Interface name \"{0}\" is empty or longer than 15 bytes")]
    Name(String),
    #[error("Failed to open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("Failed to create or attach TAP interface {0}")]
    SetIff(String, #[source] io::Error),
    #[error("Failed to configure TAP interface {0}")]
    Configure(String, #[source] io::Error),
    #[error("Failed to duplicate the TAP descriptor")]
    Dup(#[source] io::Error),
}

/// `struct ifreq`: the interface name, then a 24-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut r = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }

    /// `struct sockaddr_in` of `addr` in the union.
    fn with_ipv4(name: &str, addr: Ipv4Addr) -> Self {
        let mut r = IfReq::new(name);
        r.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        r.data[4..8].copy_from_slice(&addr.octets());
        r
    }

    fn name(&self) -> String {
        let len = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..len]).into_owned()
    }

    fn ioctl(&mut self, fd: RawFd, request: libc::c_ulong) -> io::Result<()> {
        // SAFETY: every request used here reads or writes one `struct ifreq`, which `self` is
        // (name, then the union), and `fd` is open.
        let r = unsafe { libc::ioctl(fd, request, self as *mut IfReq) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates TAP interface `name` (or attaches to it, if it exists and is free; a `%d` in it
    /// lets the kernel number a new one), brings it up, and gives the host side `ip`/`mask`.
    pub fn open(name: &str, ip: Option<Ipv4Addr>, mask: Option<Ipv4Addr>) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new(name);
        req.data[..2].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        req.ioctl(file.as_raw_fd(), TUNSETIFF)
            .map_err(|e| TapError::SetIff(name.to_string(), e))?;
        let tap = Tap {
            file,
            name: req.name(),
        };
        tap.configure(ip, mask)
            .map_err(|e| TapError::Configure(name.to_string(), e))?;
        Ok(tap)
    }

    /// A backend from an open descriptor with a TAP's semantics: a handed-over TAP (which
    /// says its name), or a datagram socket in tests (called `name`).
    pub fn from_file(file: File, name: &str) -> Tap {
        let mut req = IfReq::new("");
        let name = match req.ioctl(file.as_raw_fd(), TUNGETIFF) {
            Ok(()) => req.name(),
            Err(_) => name.to_string(),
        };
        Tap { file, name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    fn configure(&self, ip: Option<Ipv4Addr>, mask: Option<Ipv4Addr>) -> io::Result<()> {
        configure_interface(&self.name, ip, mask)
    }

    /// Reads one frame; `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        let n = (&self.file).write(frame)?;
        if n != frame.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
        }
        Ok(())
    }
}

/// Gives interface `name` (in this thread's network namespace) an address and netmask, if set,
/// and brings it up.
pub fn configure_interface(
    name: &str,
    ip: Option<Ipv4Addr>,
    mask: Option<Ipv4Addr>,
) -> io::Result<()> {
    if name.is_empty() || name.len() >= IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    // SAFETY: socket(2) with constant arguments; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let sock = unsafe { File::from_raw_fd(fd) };
    let fd = sock.as_raw_fd();
    if let Some(ip) = ip {
        IfReq::with_ipv4(name, ip).ioctl(fd, SIOCSIFADDR)?;
    }
    if let Some(mask) = mask {
        IfReq::with_ipv4(name, mask).ioctl(fd, SIOCSIFNETMASK)?;
    }
    let mut req = IfReq::new(name);
    req.ioctl(fd, SIOCGIFFLAGS)?;
    let flags = i16::from_ne_bytes([req.data[0], req.data[1]]) | libc::IFF_UP as i16;
    req.data[..2].copy_from_slice(&flags.to_ne_bytes());
    req.ioctl(fd, SIOCSIFFLAGS)
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
