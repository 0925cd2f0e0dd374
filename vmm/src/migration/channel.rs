//! The local migration channel: messages framed on a Unix stream socket, each a JSON body and
//! the file descriptors it refers to (SCM_RIGHTS).
//!
//! A frame is a 24-byte header (magic, body length, descriptor count), the body, and the
//! descriptors: up to `FDS_PER_MSG` ride on the header's `sendmsg`; the rest follow on one-byte
//! frames of their own. Both ends bound what they accept, so a confused or hostile peer gets
//! an error, not an allocation of its choosing.

use serde::{de::DeserializeOwned, Serialize};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MAGIC: u32 = 0x4d4f_4956; // "VIOM"
const HEADER_LEN: usize = 24;
/// Below the kernel's SCM_MAX_FD (253).
const FDS_PER_MSG: usize = 240;
pub const MAX_BODY: u64 = 64 << 20;
pub const MAX_FDS: u32 = 8192;

#[derive(Debug, Error)]
pub enum ChannelError {
    #[error("Socket I/O")]
    Io(#[from] io::Error),
    #[error("The peer closed the connection")]
    Closed,
    #[error("Not a migration stream (magic {0:#x})")]
    Magic(u32),
    #[error("Frame too large: {0} bytes, {1} descriptors")]
    TooLarge(u64, u32),
    #[error("Expected {0} descriptors, received {1}")]
    Fds(u32, usize),
    #[error("Invalid message")]
    Json(#[from] serde_json::Error),
}

pub struct Channel(UnixStream);

fn sys(e: vmm_sys_util::errno::Error) -> ChannelError {
    ChannelError::Io(io::Error::from_raw_os_error(e.errno()))
}

impl Channel {
    pub fn new(s: UnixStream) -> Self {
        Channel(s)
    }

    pub fn stream(&self) -> &UnixStream {
        &self.0
    }

    /// Sends `msg` with `fds`; returns the body's length.
    pub fn send<T: Serialize>(&mut self, msg: &T, fds: &[RawFd]) -> Result<usize, ChannelError> {
        let body = serde_json::to_vec(msg)?;
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        header[8..16].copy_from_slice(&(body.len() as u64).to_le_bytes());
        header[16..20].copy_from_slice(&(fds.len() as u32).to_le_bytes());
        let mut chunks = fds.chunks(FDS_PER_MSG);
        let first = chunks.next().unwrap_or(&[]);
        let n = self.0.send_with_fds(&[&header[..]], first).map_err(sys)?;
        self.0.write_all(&header[n..])?;
        for c in chunks {
            self.0.send_with_fds(&[&[0u8][..]], c).map_err(sys)?;
        }
        self.0.write_all(&body)?;
        Ok(body.len())
    }

    /// Reads into `buf` (filling it) and returns the descriptors that came with its first
    /// bytes.
    fn recv_exact(&mut self, buf: &mut [u8], max_fds: usize) -> Result<Vec<OwnedFd>, ChannelError> {
        let mut raw = vec![-1; max_fds.max(1)];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec covers `buf`, which is ours for the call.
        let (n, nfds) = unsafe { self.0.recv_with_fds(&mut iov, &mut raw) }.map_err(sys)?;
        let fds = raw[..nfds]
            .iter()
            // SAFETY: the kernel installed these descriptors for this process just now; each
            // is owned from here on by exactly one OwnedFd.
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if n == 0 {
            return Err(ChannelError::Closed);
        }
        self.0
            .read_exact(&mut buf[n..])
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => ChannelError::Closed,
                _ => e.into(),
            })?;
        Ok(fds)
    }

    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        let mut header = [0u8; HEADER_LEN];
        let mut fds = self.recv_exact(&mut header, FDS_PER_MSG)?;
        let word = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&header[r]);
            u64::from_le_bytes(b)
        };
        let magic = word(0..4) as u32;
        if magic != MAGIC {
            return Err(ChannelError::Magic(magic));
        }
        let (len, nfds) = (word(8..16), word(16..20) as u32);
        if len > MAX_BODY || nfds > MAX_FDS {
            return Err(ChannelError::TooLarge(len, nfds));
        }
        while fds.len() < nfds as usize {
            let mut b = [0u8; 1];
            let more = self.recv_exact(&mut b, FDS_PER_MSG)?;
            if more.is_empty() {
                return Err(ChannelError::Fds(nfds, fds.len()));
            }
            fds.extend(more);
        }
        if fds.len() != nfds as usize {
            return Err(ChannelError::Fds(nfds, fds.len()));
        }
        let mut body = vec![0u8; len as usize];
        self.0.read_exact(&mut body).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ChannelError::Closed,
            _ => e.into(),
        })?;
        Ok((serde_json::from_slice(&body)?, fds))
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn messages_carry_their_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Channel::new(a), Channel::new(b));
        let files: Vec<_> = (0..300)
            .map(|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let t = std::thread::spawn(move || {
            a.send(&serde_json::json!({"n": 300}), &raw).unwrap();
            a
        });
        let (v, fds): (serde_json::Value, _) = b.recv().unwrap();
        t.join().unwrap();
        assert_eq!(v["n"], 300);
        assert_eq!(fds.len(), 300);
        // The 300th descriptor is the 300th eventfd: a write through one is read through the
        // other.
        files[299].write(7).unwrap();
        let dup = fds[299].as_fd().try_clone_to_owned().unwrap();
        // SAFETY: `dup` is an eventfd we own.
        let ev = unsafe {
            vmm_sys_util::eventfd::EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(dup))
        };
        assert_eq!(ev.read().unwrap(), 7);
    }

    #[test]
    fn garbage_and_lies_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut raw = a.try_clone().unwrap();
        let mut b = Channel::new(b);
        raw.write_all(&[0x55; HEADER_LEN]).unwrap();
        assert!(matches!(
            b.recv::<serde_json::Value>(),
            Err(ChannelError::Magic(_))
        ));
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[8..16].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        raw.write_all(&h).unwrap();
        assert!(matches!(
            b.recv::<serde_json::Value>(),
            Err(ChannelError::TooLarge(..))
        ));
        drop(raw);
        drop(a);
        assert!(matches!(
            b.recv::<serde_json::Value>(),
            Err(ChannelError::Closed)
        ));
    }
}
