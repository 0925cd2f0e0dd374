//! The client side of vfio-user, as a VMM uses it: one socket, requests answered in order.

use super::protocol::*;
use crate::dma::{DmaBacking, DmaError, DmaMapping};
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
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
    #[error("No reply to command {0} within {1:?}")]
    Timeout(u16, Duration),
    #[error("The connection is out of step after an earlier failure")]
    Broken,
}

impl ClientError {
    fn io(self) -> io::Error {
        io::Error::other(self.to_string())
    }
}

/// How long a request waits for its reply. A device that takes longer is treated as hung: the
/// request fails and the connection is closed to requests (its replies would come out of
/// step), so a vCPU or the snoop thread waits at most this long for a dead device once.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

struct Conn {
    sock: UnixStream,
    next_id: u16,
}

pub struct VfioUserClient {
    conn: Mutex<Conn>,
    /// A request failed between its send and its reply: what arrives next may answer it.
    /// Set under `conn`, read without it.
    broken: AtomicBool,
    timeout: Duration,
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
        Self::negotiate_on(s)
    }

    /// A new client on a connected socket: negotiates the version first.
    pub fn negotiate_on(sock: UnixStream) -> Result<Self, ClientError> {
        let c = Self::adopt(sock, 0, DEFAULT_MAX_DMA_MAPS);
        c.negotiate()?;
        Ok(c)
    }

    /// Replies are waited for at most `timeout` (default `REQUEST_TIMEOUT`).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        Self::apply_timeout(&self.conn.get_mut().unwrap().sock, timeout);
        self
    }

    fn apply_timeout(sock: &UnixStream, t: Duration) {
        let r = sock
            .set_read_timeout(Some(t))
            .and_then(|()| sock.set_write_timeout(Some(t)));
        if let Err(e) = r {
            log::warn!("vfio-user: no request timeout on the socket: {e}");
        }
    }

    /// Takes over a connection another process negotiated (a live upgrade): no VERSION is
    /// sent, as the server sees one client throughout; message ids continue from `next_id`.
    pub fn adopt(sock: UnixStream, next_id: u16, max_dma_maps: u64) -> Self {
        Self::apply_timeout(&sock, REQUEST_TIMEOUT);
        VfioUserClient {
            conn: Mutex::new(Conn { sock, next_id }),
            broken: AtomicBool::new(false),
            timeout: REQUEST_TIMEOUT,
            max_dma_maps: max_dma_maps.into(),
        }
    }

    /// What `adopt` needs in the new process: the socket (a descriptor to pass on) and the
    /// next message id. The caller must not issue requests from here on.
    pub fn handover(&self) -> std::io::Result<(UnixStream, u16)> {
        let g = self.conn.lock().unwrap();
        Ok((g.sock.try_clone()?, g.next_id))
    }

    /// Sends a command and waits for its reply. A request that fails anywhere between the two
    /// (an I/O error, no reply in time, a reply to something else) leaves the connection out
    /// of step, and every later request fails at once.
    pub fn request(
        &self,
        cmd: u16,
        payload: &[&[u8]],
        fds: &[RawFd],
    ) -> Result<Message, ClientError> {
        if fds.len() > MAX_FDS {
            // Refused before anything is sent: the connection stays in step.
            return Err(ProtocolError::TooManyFds.into());
        }
        let mut g = self.conn.lock().unwrap();
        if self.broken.load(Ordering::Acquire) {
            return Err(ClientError::Broken);
        }
        let id = g.next_id;
        g.next_id = g.next_id.wrapping_add(1);
        let reply = self
            .exchange(&g.sock, id, cmd, payload, fds)
            .and_then(|reply| {
                let h = &reply.header;
                if h.flags & 0xf != FLAG_REPLY || h.msg_id != id || h.cmd != cmd {
                    return Err(ClientError::BadReply(cmd));
                }
                Ok(reply)
            })
            .inspect_err(|_| self.broken.store(true, Ordering::Release))?;
        if reply.header.flags & FLAG_ERROR != 0 {
            return Err(ClientError::Refused {
                cmd,
                errno: reply.header.error,
            });
        }
        Ok(reply)
    }

    fn exchange(
        &self,
        sock: &UnixStream,
        id: u16,
        cmd: u16,
        payload: &[&[u8]],
        fds: &[RawFd],
    ) -> Result<Message, ClientError> {
        let timeout = |e: ProtocolError| match e {
            ProtocolError::Io(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ClientError::Timeout(cmd, self.timeout)
            }
            ProtocolError::Io(e) if e.kind() == io::ErrorKind::TimedOut => {
                ClientError::Timeout(cmd, self.timeout)
            }
            e => ClientError::Protocol(e),
        };
        let header = Header {
            msg_id: id,
            cmd,
            ..Default::default()
        };
        send(sock, header, payload, fds).map_err(timeout)?;
        recv(sock).map_err(timeout)
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

    /// A request failed between its send and its reply (see `request`): the device is gone
    /// for this connection.
    pub fn broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
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
        self.conn.lock().unwrap().sock.try_clone()
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
    use std::time::Instant;

    /// A device that answers the first `good` requests, then answers none (`Silent`) or
    /// answers with another request's id (`WrongId`).
    enum Then {
        Silent,
        WrongId,
    }

    fn device(good: usize, then: Then) -> (VfioUserClient, std::thread::JoinHandle<()>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut served = 0;
            while let Ok(m) = recv(&theirs) {
                let mut h = Header {
                    flags: FLAG_REPLY,
                    ..m.header
                };
                if served >= good {
                    match then {
                        Then::Silent => continue,
                        Then::WrongId => h.msg_id = h.msg_id.wrapping_add(7),
                    }
                }
                served += 1;
                let _ = send(&theirs, h, &[], &[]);
            }
        });
        let c = VfioUserClient::adopt(ours, 0, DEFAULT_MAX_DMA_MAPS)
            .with_timeout(Duration::from_millis(200));
        (c, server)
    }

    /// A device that stops answering fails the request in bounded time, and every request
    /// after it fails at once: a late reply must not be taken for the next request's.
    #[test]
    fn a_silent_device_times_out_and_the_connection_is_closed_to_requests() {
        let (c, server) = device(1, Then::Silent);
        c.region_write(0, 0, &[1]).expect("answered");
        let t = Instant::now();
        let e = c.region_write(0, 0, &[2]).unwrap_err();
        assert!(
            matches!(e, ClientError::Timeout(CMD_REGION_WRITE, _)),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let t = Instant::now();
        assert!(matches!(c.reset(), Err(ClientError::Broken)));
        assert!(t.elapsed() < Duration::from_millis(100));
        assert!(c.broken());
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn a_reply_to_another_request_breaks_the_connection() {
        let (c, server) = device(0, Then::WrongId);
        assert!(matches!(c.reset(), Err(ClientError::BadReply(_))));
        assert!(matches!(c.reset(), Err(ClientError::Broken)));
        drop(c);
        server.join().unwrap();
    }

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
