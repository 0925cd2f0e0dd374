//! Handing a live device to another VMM process (a live upgrade): saved state refers to the
//! descriptors it needs by their index in the list that travels with it (SCM_RIGHTS).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Error)]
pub enum HandoverError {
    #[error("Descriptor {0} is missing or used twice")]
    Fd(usize),
    #[error("Invalid saved state: {0}")]
    Invalid(String),
    #[error("Failed to duplicate a descriptor")]
    Dup(#[source] std::io::Error),
}

/// Descriptors on their way out, borrowed from their owners until the message is sent.
#[derive(Default)]
pub struct FdsOut(Vec<RawFd>);

impl FdsOut {
    pub fn add(&mut self, fd: &impl AsRawFd) -> usize {
        self.0.push(fd.as_raw_fd());
        self.0.len() - 1
    }

    pub fn raw(&self) -> &[RawFd] {
        &self.0
    }
}

/// Descriptors received: each taken once, by index.
pub struct FdsIn(Vec<Option<OwnedFd>>);

impl FdsIn {
    pub fn new(fds: Vec<OwnedFd>) -> Self {
        FdsIn(fds.into_iter().map(Some).collect())
    }

    pub fn take(&mut self, i: usize) -> Result<OwnedFd, HandoverError> {
        self.0
            .get_mut(i)
            .and_then(Option::take)
            .ok_or(HandoverError::Fd(i))
    }

    pub fn take_eventfd(&mut self, i: usize) -> Result<EventFd, HandoverError> {
        use std::os::fd::{FromRawFd, IntoRawFd};
        let fd = self.take(i)?;
        // SAFETY: the sender put an eventfd at this index; we own the descriptor.
        Ok(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
    }

    /// Descriptors nobody took (a sender that sent more than its state names).
    pub fn left(&self) -> usize {
        self.0.iter().filter(|f| f.is_some()).count()
    }
}

/// Binary sections too large for the JSON state (per-page tables), written into one memfd that
/// travels as a descriptor.
pub struct BlobOut {
    file: std::fs::File,
    len: u64,
}

/// Where a section is in the blob: (offset, length).
pub type Section = (u64, u64);

impl BlobOut {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vio-upgrade".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(BlobOut { file, len: 0 })
    }

    pub fn put(&mut self, data: &[u8]) -> std::io::Result<Section> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(data, self.len)?;
        let at = self.len;
        self.len += data.len() as u64;
        Ok((at, data.len() as u64))
    }

    pub fn file(&self) -> &std::fs::File {
        &self.file
    }
}

pub struct BlobIn {
    file: std::fs::File,
    len: u64,
}

impl BlobIn {
    pub fn new(fd: OwnedFd) -> Result<Self, HandoverError> {
        let file = std::fs::File::from(fd);
        let len = file.metadata().map_err(HandoverError::Dup)?.len();
        Ok(BlobIn { file, len })
    }

    /// A section's bytes, if it lies within the blob and is at most `max` long.
    pub fn get(&self, (at, n): Section, max: u64) -> Result<Vec<u8>, HandoverError> {
        use std::os::unix::fs::FileExt;
        if n > max || at.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(HandoverError::Invalid(format!(
                "section {at:#x}+{n:#x} of a {:#x}-byte blob",
                self.len
            )));
        }
        let mut v = vec![0u8; n as usize];
        self.file
            .read_exact_at(&mut v, at)
            .map_err(HandoverError::Dup)?;
        Ok(v)
    }
}
