//! A raw disk image file, accessed with positional I/O straight into guest memory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, VolatileSlice};

pub struct RawFile {
    file: File,
    readonly: bool,
    size: u64,
}

impl RawFile {
    pub fn open(path: &Path, readonly: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!readonly).open(path)?;
        Self::from_file(file, readonly)
    }

    /// An image already open (a live upgrade hands the old process's descriptor on).
    pub fn from_file(file: File, readonly: bool) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(RawFile {
            file,
            readonly,
            size,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Fills `slice` from the file at `offset`; past the end of the file reads as zeros.
    pub fn read_into<B: BitmapSlice>(
        &self,
        slice: &VolatileSlice<B>,
        offset: u64,
    ) -> io::Result<()> {
        let guard = slice.ptr_guard_mut();
        let mut done = 0usize;
        while done < slice.len() {
            // SAFETY: the pointer and length come from a VolatileSlice of mapped guest memory
            // that stays mapped while the guard lives; pread writes at most len - done bytes.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    guard.as_ptr().add(done) as *mut libc::c_void,
                    slice.len() - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            match n {
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                0 => {
                    let rest = slice
                        .subslice(done, slice.len() - done)
                        .map_err(io::Error::other)?;
                    rest.write_slice(&vec![0; rest.len()], 0)
                        .map_err(io::Error::other)?;
                    break;
                }
                n => done += n as usize,
            }
        }
        slice.bitmap().mark_dirty(0, slice.len());
        Ok(())
    }

    /// Writes `slice` to the file at `offset`.
    pub fn write_from<B: BitmapSlice>(
        &self,
        slice: &VolatileSlice<B>,
        offset: u64,
    ) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        let guard = slice.ptr_guard();
        let mut done = 0usize;
        while done < slice.len() {
            // SAFETY: as in read_into; pwrite only reads the slice.
            let n = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    guard.as_ptr().add(done) as *const libc::c_void,
                    slice.len() - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            done += n as usize;
        }
        Ok(())
    }

    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Plain positional read, for tools and tests.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }
}
