//! vfio-user messages and their framing on a Unix socket. Every structure is plain data in host
//! byte order (the spec's rule for this revision); file descriptors travel as SCM_RIGHTS.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use thiserror::Error;
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const VERSION_MAJOR: u16 = 0;
pub const VERSION_MINOR: u16 = 1;

pub const CMD_VERSION: u16 = 1;
pub const CMD_DMA_MAP: u16 = 2;
pub const CMD_DMA_UNMAP: u16 = 3;
pub const CMD_DEVICE_GET_INFO: u16 = 4;
pub const CMD_DEVICE_GET_REGION_INFO: u16 = 5;
pub const CMD_DEVICE_GET_REGION_IO_FDS: u16 = 6;
pub const CMD_DEVICE_GET_IRQ_INFO: u16 = 7;
pub const CMD_DEVICE_SET_IRQS: u16 = 8;
pub const CMD_REGION_READ: u16 = 9;
pub const CMD_REGION_WRITE: u16 = 10;
pub const CMD_DMA_READ: u16 = 11;
pub const CMD_DMA_WRITE: u16 = 12;
pub const CMD_DEVICE_RESET: u16 = 13;

pub const FLAG_REPLY: u32 = 0x1;
pub const FLAG_NO_REPLY: u32 = 0x10;
pub const FLAG_ERROR: u32 = 0x20;

pub const DMA_READ: u32 = 1;
pub const DMA_WRITE: u32 = 2;

pub const DEVICE_FLAGS_RESET: u32 = 1;
pub const DEVICE_FLAGS_PCI: u32 = 2;

pub const REGION_FLAG_READ: u32 = 1;
pub const REGION_FLAG_WRITE: u32 = 2;

pub const IO_FD_TYPE_IOEVENTFD: u32 = 0;

pub const IRQ_INFO_EVENTFD: u32 = 1;
pub const IRQ_INFO_MASKABLE: u32 = 2;
pub const IRQ_INFO_NORESIZE: u32 = 8;

pub const IRQ_SET_DATA_NONE: u32 = 1;
pub const IRQ_SET_DATA_BOOL: u32 = 2;
pub const IRQ_SET_DATA_EVENTFD: u32 = 4;
pub const IRQ_SET_ACTION_MASK: u32 = 8;
pub const IRQ_SET_ACTION_UNMASK: u32 = 16;
pub const IRQ_SET_ACTION_TRIGGER: u32 = 32;

/// VFIO PCI region and IRQ indices (linux/vfio.h).
pub const PCI_BAR0_REGION_INDEX: u32 = 0;
pub const PCI_CONFIG_REGION_INDEX: u32 = 7;
pub const PCI_NUM_REGIONS: u32 = 9;
pub const PCI_INTX_IRQ_INDEX: u32 = 0;
pub const PCI_MSIX_IRQ_INDEX: u32 = 2;
pub const PCI_NUM_IRQS: u32 = 5;

/// The largest message either side accepts: a data transfer of `MAX_DATA_XFER` plus headers.
pub const MAX_DATA_XFER: usize = 1 << 20;
pub const MAX_MESSAGE: usize = MAX_DATA_XFER + 64;
pub const MAX_FDS: usize = 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub msg_id: u16,
    pub cmd: u16,
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    pub offset: u64,
    pub address: u64,
    pub size: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub address: u64,
    pub size: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionIoFds {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoFdSubRegion {
    pub offset: u64,
    pub size: u64,
    pub fd_index: u32,
    pub type_: u32,
    pub flags: u32,
    pub padding: u32,
    pub datamatch: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqSet {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionAccess {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
}

// SAFETY: all of these are repr(C) structs of integers with no padding holes that could hold
// uninitialised bytes (each field is naturally aligned and the sizes add up to the struct size).
unsafe impl ByteValued for Header {}
// SAFETY: as above.
unsafe impl ByteValued for Version {}
// SAFETY: as above.
unsafe impl ByteValued for DmaMap {}
// SAFETY: as above.
unsafe impl ByteValued for DmaUnmap {}
// SAFETY: as above.
unsafe impl ByteValued for DeviceInfo {}
// SAFETY: as above.
unsafe impl ByteValued for RegionInfo {}
// SAFETY: as above.
unsafe impl ByteValued for RegionIoFds {}
// SAFETY: as above.
unsafe impl ByteValued for IoFdSubRegion {}
// SAFETY: as above.
unsafe impl ByteValued for IrqInfo {}
// SAFETY: as above.
unsafe impl ByteValued for IrqSet {}
// SAFETY: as above.
unsafe impl ByteValued for RegionAccess {}

#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("Peer closed the connection")]
    Closed,
    #[error("Socket I/O failed")]
    Io(#[source] io::Error),
    #[error("Message size {0} is out of bounds")]
    BadSize(u32),
    #[error("Too many file descriptors in one message")]
    TooManyFds,
    #[error("Payload of {got} bytes is shorter than {want}")]
    Short { got: usize, want: usize },
}

/// A received message: header, payload, and the descriptors that came with it (owned).
pub struct Message {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<File>,
}

impl Message {
    /// The payload's leading structure.
    pub fn read<T: ByteValued + Default>(&self) -> Result<T, ProtocolError> {
        read_struct(&self.payload)
    }
}

pub fn read_struct<T: ByteValued + Default>(bytes: &[u8]) -> Result<T, ProtocolError> {
    let want = std::mem::size_of::<T>();
    if bytes.len() < want {
        return Err(ProtocolError::Short {
            got: bytes.len(),
            want,
        });
    }
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(&bytes[..want]);
    Ok(v)
}

/// Sends a message; `payload` follows the header, `fds` ride along as SCM_RIGHTS.
pub fn send(
    sock: &UnixStream,
    mut header: Header,
    payload: &[&[u8]],
    fds: &[RawFd],
) -> Result<(), ProtocolError> {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    header.size = (std::mem::size_of::<Header>() + len) as u32;
    let mut buf = Vec::with_capacity(header.size as usize);
    buf.extend_from_slice(header.as_slice());
    for p in payload {
        buf.extend_from_slice(p);
    }
    if fds.is_empty() {
        return (&*sock).write_all(&buf).map_err(ProtocolError::Io);
    }
    if fds.len() > MAX_FDS {
        return Err(ProtocolError::TooManyFds);
    }
    // The descriptors go with the first chunk; the rest follows as plain data.
    let n = sock
        .send_with_fds(&[&buf[..]], fds)
        .map_err(|e| ProtocolError::Io(io::Error::from_raw_os_error(e.errno())))?;
    (&*sock).write_all(&buf[n..]).map_err(ProtocolError::Io)
}

/// Receives one message. Descriptors arrive with the header.
pub fn recv(sock: &UnixStream) -> Result<Message, ProtocolError> {
    let mut header = Header::default();
    let mut fds = [-1; MAX_FDS];
    let hlen = std::mem::size_of::<Header>();
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_slice().as_mut_ptr() as *mut libc::c_void,
        iov_len: hlen,
    }];
    // SAFETY: the iovec points at `header`, which outlives the call and is hlen bytes long; the
    // received descriptors are written into `fds` and owned below.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| ProtocolError::Io(io::Error::from_raw_os_error(e.errno())))?;
    // SAFETY: recv_with_fds returned nfds fresh descriptors that nothing else owns.
    let files: Vec<File> = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(ProtocolError::Closed);
    }
    if n < hlen {
        (&*sock)
            .read_exact(&mut header.as_mut_slice()[n..])
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
                _ => ProtocolError::Io(e),
            })?;
    }
    let size = header.size as usize;
    if size < hlen || size > MAX_MESSAGE {
        return Err(ProtocolError::BadSize(header.size));
    }
    let mut payload = vec![0; size - hlen];
    (&*sock)
        .read_exact(&mut payload)
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
            _ => ProtocolError::Io(e),
        })?;
    Ok(Message {
        header,
        payload,
        fds: files,
    })
}

/// Bytes of a plain-data value, for building payloads.
pub fn bytes<T: ByteValued>(v: &T) -> &[u8] {
    v.as_slice()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn struct_sizes_match_the_spec() {
        assert_eq!(std::mem::size_of::<Header>(), 16);
        assert_eq!(std::mem::size_of::<DmaMap>(), 32);
        assert_eq!(std::mem::size_of::<DmaUnmap>(), 24);
        assert_eq!(std::mem::size_of::<DeviceInfo>(), 16);
        assert_eq!(std::mem::size_of::<RegionInfo>(), 32);
        assert_eq!(std::mem::size_of::<RegionIoFds>(), 16);
        assert_eq!(std::mem::size_of::<IoFdSubRegion>(), 40);
        assert_eq!(std::mem::size_of::<IrqInfo>(), 16);
        assert_eq!(std::mem::size_of::<IrqSet>(), 20);
        assert_eq!(std::mem::size_of::<RegionAccess>(), 16);
    }

    #[test]
    fn round_trip_with_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let map = DmaMap {
            argsz: 32,
            flags: DMA_READ | DMA_WRITE,
            offset: 4096,
            address: 0x10000,
            size: 8192,
        };
        send(
            &a,
            Header {
                msg_id: 7,
                cmd: CMD_DMA_MAP,
                ..Default::default()
            },
            &[bytes(&map)],
            &[f.as_raw_fd()],
        )
        .unwrap();
        let m = recv(&b).unwrap();
        assert_eq!(m.header.cmd, CMD_DMA_MAP);
        assert_eq!(m.header.msg_id, 7);
        assert_eq!(m.header.size, 48);
        assert_eq!(m.read::<DmaMap>().unwrap(), map);
        assert_eq!(m.fds.len(), 1);
        assert!(
            m.read::<IoFdSubRegion>().is_err(),
            "payload shorter than the struct"
        );
    }

    #[test]
    fn bad_sizes_and_closed_peers() {
        let (a, b) = UnixStream::pair().unwrap();
        let h = Header {
            size: 8,
            ..Default::default()
        };
        (&a).write_all(h.as_slice()).unwrap();
        assert!(matches!(recv(&b), Err(ProtocolError::BadSize(8))));
        let h = Header {
            size: u32::MAX,
            ..Default::default()
        };
        (&a).write_all(h.as_slice()).unwrap();
        assert!(matches!(recv(&b), Err(ProtocolError::BadSize(_))));
        // Truncated: header promises a payload that never comes.
        let h = Header {
            size: 100,
            ..Default::default()
        };
        (&a).write_all(h.as_slice()).unwrap();
        drop(a);
        assert!(matches!(recv(&b), Err(ProtocolError::Closed)));
        assert!(matches!(recv(&b), Err(ProtocolError::Closed)));
    }
}
