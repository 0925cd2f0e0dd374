//! The client side of vfio-user, as a VMM uses it: one socket, requests answered in order.

use super::protocol::*;
use crate::dma::{DmaBacking, DmaError, DmaMapping};
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use thiserror::Error;
use vm_memory::ByteValued;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("Failed to connect to {0}")]
    Connect(String, #[source] io::Error),
    #[error("vfio-user protocol")]
    Protocol(#[from] ProtocolError),
    #[error("Server refused command {cmd}: errno {errno}")]
    Refused { cmd: u16, errno: u32 },
    #[error("Unexpected reply to command {0}")]
    BadReply(u16),
    #[error("Server version {0}.{1} is not supported")]
    Version(u16, u16),
}

impl ClientError {
    fn io(self) -> io::Error {
        io::Error::other(self.to_string())
    }
}

pub struct VfioUserClient {
    sock: Mutex<(UnixStream, u16)>,
    /// DMA mappings the server holds at once (its `max_dma_maps` capability).
    max_dma_maps: std::sync::atomic::AtomicU64,
}

/// The spec's `max_dma_maps` when the server does not say.
pub const DEFAULT_MAX_DMA_MAPS: u64 = 65535;

pub struct RegionIoFd {
    pub offset: u64,
    pub size: u64,
    pub fd: File,
}

impl VfioUserClient {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let s = UnixStream::connect(path)
            .map_err(|e| ClientError::Connect(path.display().to_string(), e))?;
        let c = VfioUserClient {
            sock: Mutex::new((s, 0)),
            max_dma_maps: DEFAULT_MAX_DMA_MAPS.into(),
        };
        c.negotiate()?;
        Ok(c)
    }

    /// Takes over a connection another process negotiated (a live upgrade): no VERSION is
    /// sent, as the server sees one client throughout; message ids continue from `next_id`.
    pub fn adopt(sock: UnixStream, next_id: u16, max_dma_maps: u64) -> Self {
        VfioUserClient {
            sock: Mutex::new((sock, next_id)),
            max_dma_maps: max_dma_maps.into(),
        }
    }

    /// What `adopt` needs in the new process: the socket (a descriptor to pass on) and the
    /// next message id. The caller must not issue requests from here on.
    pub fn handover(&self) -> std::io::Result<(UnixStream, u16)> {
        let g = self.sock.lock().unwrap();
        Ok((g.0.try_clone()?, g.1))
    }

    /// Sends a command and waits for its reply.
    pub fn request(
        &self,
        cmd: u16,
        payload: &[&[u8]],
        fds: &[RawFd],
    ) -> Result<Message, ClientError> {
        let mut g = self.sock.lock().unwrap();
        let id = g.1;
        g.1 = g.1.wrapping_add(1);
        send(
            &g.0,
            Header {
                msg_id: id,
                cmd,
                ..Default::default()
            },
            payload,
            fds,
        )?;
        let reply = recv(&g.0)?;
        if reply.header.flags & 0xf != FLAG_REPLY
            || reply.header.msg_id != id
            || reply.header.cmd != cmd
        {
            return Err(ClientError::BadReply(cmd));
        }
        if reply.header.flags & FLAG_ERROR != 0 {
            return Err(ClientError::Refused {
                cmd,
                errno: reply.header.error,
            });
        }
        Ok(reply)
    }

    fn negotiate(&self) -> Result<(), ClientError> {
        let caps = format!("{{\"capabilities\":{{\"max_msg_fds\":{MAX_FDS},\"max_data_xfer_size\":{MAX_DATA_XFER}}}}}\0");
        let v = Version {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
        };
        let r = self.request(CMD_VERSION, &[v.as_slice(), caps.as_bytes()], &[])?;
        let got: Version = r.read()?;
        if got.major != VERSION_MAJOR || got.minor > VERSION_MINOR {
            return Err(ClientError::Version(got.major, got.minor));
        }
        let json = r
            .payload
            .get(std::mem::size_of::<Version>()..)
            .unwrap_or(&[]);
        let max = server_max_dma_maps(json).ok_or(ClientError::BadReply(CMD_VERSION))?;
        self.max_dma_maps
            .store(max, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// DMA mappings the server holds at once: the client keeps below this.
    pub fn max_dma_maps(&self) -> u64 {
        self.max_dma_maps.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn device_info(&self) -> Result<DeviceInfo, ClientError> {
        let q = DeviceInfo {
            argsz: 16,
            ..Default::default()
        };
        Ok(self
            .request(CMD_DEVICE_GET_INFO, &[q.as_slice()], &[])?
            .read()?)
    }

    pub fn region_info(&self, index: u32) -> Result<RegionInfo, ClientError> {
        let q = RegionInfo {
            argsz: 32,
            index,
            ..Default::default()
        };
        Ok(self
            .request(CMD_DEVICE_GET_REGION_INFO, &[q.as_slice()], &[])?
            .read()?)
    }

    /// The ioeventfds the server offers for `index` (VFIO_USER_DEVICE_GET_REGION_IO_FDS).
    pub fn region_io_fds(&self, index: u32) -> Result<Vec<RegionIoFd>, ClientError> {
        let q = RegionIoFds {
            argsz: 16 + 40 * 64,
            index,
            ..Default::default()
        };
        let r = self.request(CMD_DEVICE_GET_REGION_IO_FDS, &[q.as_slice()], &[])?;
        let head: RegionIoFds = r.read()?;
        let mut fds: Vec<Option<File>> = r.fds.into_iter().map(Some).collect();
        let mut out = Vec::new();
        for i in 0..head.count as usize {
            let at = 16 + 40 * i;
            let sub: IoFdSubRegion = read_struct(r.payload.get(at..).unwrap_or(&[]))?;
            if sub.type_ != IO_FD_TYPE_IOEVENTFD || sub.flags != 0 {
                continue;
            }
            let fd = fds
                .get_mut(sub.fd_index as usize)
                .and_then(|f| f.as_ref())
                .ok_or(ClientError::BadReply(CMD_DEVICE_GET_REGION_IO_FDS))?;
            let fd = fd
                .try_clone()
                .map_err(|e| ClientError::Protocol(ProtocolError::Io(e)))?;
            out.push(RegionIoFd {
                offset: sub.offset,
                size: sub.size,
                fd,
            });
        }
        fds.clear();
        Ok(out)
    }

    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, ClientError> {
        let q = IrqInfo {
            argsz: 16,
            index,
            ..Default::default()
        };
        Ok(self
            .request(CMD_DEVICE_GET_IRQ_INFO, &[q.as_slice()], &[])?
            .read()?)
    }

    pub fn set_irqs(
        &self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[RawFd],
    ) -> Result<(), ClientError> {
        let q = IrqSet {
            argsz: 20,
            flags,
            index,
            start,
            count,
        };
        self.request(CMD_DEVICE_SET_IRQS, &[q.as_slice()], fds)
            .map(|_| ())
    }

    pub fn region_read(
        &self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), ClientError> {
        let q = RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        let r = self.request(CMD_REGION_READ, &[q.as_slice()], &[])?;
        let body = r
            .payload
            .get(16..16 + data.len())
            .ok_or(ClientError::BadReply(CMD_REGION_READ))?;
        data.copy_from_slice(body);
        Ok(())
    }

    pub fn region_write(&self, region: u32, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let q = RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        self.request(CMD_REGION_WRITE, &[q.as_slice(), data], &[])
            .map(|_| ())
    }

    /// A second handle on the socket, for watching it (not for requests).
    pub fn try_clone_socket(&self) -> std::io::Result<UnixStream> {
        self.sock.lock().unwrap().0.try_clone()
    }

    pub fn reset(&self) -> Result<(), ClientError> {
        self.request(CMD_DEVICE_RESET, &[], &[]).map(|_| ())
    }
}

impl DmaMapping for VfioUserClient {
    fn map(&self, iova: u64, size: u64, b: &DmaBacking) -> Result<(), DmaError> {
        let m = DmaMap {
            argsz: 32,
            flags: DMA_READ | DMA_WRITE,
            offset: b.file_offset,
            address: iova,
            size,
        };
        self.request(CMD_DMA_MAP, &[m.as_slice()], &[b.file.as_raw_fd()])
            .map(|_| ())
            .map_err(|e| DmaError::Map {
                iova,
                size,
                source: e.io(),
            })
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), DmaError> {
        let u = DmaUnmap {
            argsz: 24,
            flags: 0,
            address: iova,
            size,
        };
        self.request(CMD_DMA_UNMAP, &[u.as_slice()], &[])
            .map(|_| ())
            .map_err(|e| DmaError::Unmap {
                iova,
                size,
                source: e.io(),
            })
    }
}

/// The server's `max_dma_maps` from its VERSION reply's JSON (NUL-terminated, optional): the
/// default if absent; `None` if the JSON is malformed or the value is not a positive integer.
fn server_max_dma_maps(json: &[u8]) -> Option<u64> {
    let text = json.split(|&b| b == 0).next().unwrap_or(&[]);
    if text.iter().all(u8::is_ascii_whitespace) {
        return Some(DEFAULT_MAX_DMA_MAPS);
    }
    let v: serde_json::Value = serde_json::from_slice(text).ok()?;
    match v.get("capabilities").and_then(|c| c.get("max_dma_maps")) {
        None => Some(DEFAULT_MAX_DMA_MAPS),
        Some(n) => n.as_u64().filter(|&n| n > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_dma_maps_from_the_version_reply() {
        let m = |s: &str| server_max_dma_maps(s.as_bytes());
        assert_eq!(m(""), Some(DEFAULT_MAX_DMA_MAPS));
        assert_eq!(m("{\"capabilities\":{\"max_dma_maps\":100}}\0"), Some(100));
        assert_eq!(
            m("{\"capabilities\":{\"max_msg_fds\":8}}\0"),
            Some(DEFAULT_MAX_DMA_MAPS)
        );
        assert_eq!(m("{\"capabilities\":{\"max_dma_maps\":0}}"), None);
        assert_eq!(m("{\"capabilities\":{\"max_dma_maps\":-1}}"), None);
        assert_eq!(m("{not json"), None);
    }
}
