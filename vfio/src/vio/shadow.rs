//! The VMM-owned page holding every queue's shadow slot (`vio::spec`), shared with the device
//! through a DMA mapping.

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::atomic::AtomicU16;
use vio::spec::{MAX_QUEUES, PAGE_SIZE, SLOT_STRIDE};

pub(super) struct ShadowPage {
    file: File,
    ptr: *mut u8,
}

// SAFETY: the page is only accessed through atomics (`field`).
unsafe impl Send for ShadowPage {}
// SAFETY: as above.
unsafe impl Sync for ShadowPage {}

impl ShadowPage {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"vio-shadow".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(PAGE_SIZE)?;
        Self::adopt(file)
    }

    /// Maps a shadow page another process made (a live upgrade: the device has it mapped).
    pub fn adopt(file: File) -> std::io::Result<Self> {
        if file.metadata()?.len() != PAGE_SIZE {
            return Err(std::io::Error::other("The shadow page is not one page"));
        }
        // SAFETY: a new shared mapping of the whole (page-sized) file; checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ShadowPage {
            file,
            ptr: ptr as *mut u8,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn host_addr(&self) -> u64 {
        self.ptr as u64
    }

    /// The u16 at byte `off` (a `vio::spec::SLOT_*` field) of queue `q`'s slot.
    pub fn field(&self, q: u16, off: u64) -> &AtomicU16 {
        assert!(q < MAX_QUEUES && off < SLOT_STRIDE && off.is_multiple_of(2));
        // SAFETY: in bounds of the live page mapping (q < MAX_QUEUES, off < SLOT_STRIDE),
        // 2-byte aligned; the device process accesses it concurrently, hence atomics.
        unsafe { &*(self.ptr.add((u64::from(q) * SLOT_STRIDE + off) as usize) as *const AtomicU16) }
    }
}

impl Drop for ShadowPage {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`; no reference outlives `self`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, PAGE_SIZE as usize) };
    }
}
