//! The device's IOMMU. Guest memory is reachable only through mappings the client made with
//! VFIO_USER_DMA_MAP (an fd and offset, mmapped here), at 4 KiB granularity: a map or unmap may
//! cover any page-aligned range, splitting earlier mappings. Every access the device makes is
//! checked; one that touches an unmapped page, or writes a read-only one, is an I/O page fault
//! the device cannot resolve: it is counted, its IOVA logged, and the access is not performed.

use log::warn;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Deref;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, Weak};
use thiserror::Error;
use virtio_devices::transport::ShadowIndex;
use virtio_devices::{GuestMemoryMmap, LogLimiter, MemoryView};
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{GuestMemorySliceIterator, Result as MemResult};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, Permissions, VolatileSlice,
};

pub const PAGE_SIZE: u64 = 4096;
/// Mappings the IOMMU holds at most (the vfio-user default for max_dma_maps).
pub const MAX_MAPPINGS: usize = 65535;

static IOPF_LOG: LogLimiter = LogLimiter::new(10, 10_000);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IommuError {
    #[error("Range {iova:#x}+{len:#x} is not page aligned")]
    Unaligned { iova: u64, len: u64 },
    #[error("Range {iova:#x}+{len:#x} overlaps an existing mapping")]
    Exists { iova: u64, len: u64 },
    #[error("Range {iova:#x}+{len:#x} is not mapped")]
    NotMapped { iova: u64, len: u64 },
    #[error("Too many mappings")]
    TooMany,
    #[error("Failed to map the client's memory: {0}")]
    Mmap(String),
}

impl IommuError {
    /// The errno a vfio-user reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            IommuError::Exists { .. } => libc::EEXIST,
            IommuError::NotMapped { .. } => libc::ENOENT,
            IommuError::TooMany => libc::ENOSPC,
            IommuError::Mmap(_) => libc::ENOMEM,
            IommuError::Unaligned { .. } => libc::EINVAL,
        }
    }
}

/// One contiguous mapped range: its own mmap of the client's fd.
#[derive(Clone)]
struct Run {
    len: u64,
    writable: bool,
    map: Arc<FileMap>,
    file_offset: u64,
    region: Arc<GuestRegionMmap>,
}

/// One shared mapping of a whole client file. A DMA mapping is a window into it, so mappings
/// cost no mmap (and no VMA) each: a client that maps guest RAM page by page would otherwise
/// run into the kernel's per-process mapping limit (vm.max_map_count, 65530).
struct FileMap {
    ptr: *mut u8,
    size: u64,
    writable: bool,
    _file: Arc<File>,
}

// SAFETY: the mapping is plain shared memory; every access goes through vm-memory's volatile
// slices, and the pointer is only read.
unsafe impl Send for FileMap {}
// SAFETY: as above.
unsafe impl Sync for FileMap {}

impl FileMap {
    fn new(file: &Arc<File>) -> Result<Self, IommuError> {
        let size = file
            .metadata()
            .map_err(|e| IommuError::Mmap(e.to_string()))?
            .len();
        if size == 0 {
            return Err(IommuError::Mmap("the file is empty".into()));
        }
        let mmap = |prot| {
            // SAFETY: a new shared mapping of the whole file, checked for failure.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size as usize,
                    prot,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            (p != libc::MAP_FAILED).then_some(p as *mut u8)
        };
        // A client may hand over a read-only fd; then only read-only mappings are possible.
        let (ptr, writable) = match mmap(libc::PROT_READ | libc::PROT_WRITE) {
            Some(p) => (p, true),
            None => (
                mmap(libc::PROT_READ)
                    .ok_or_else(|| IommuError::Mmap(std::io::Error::last_os_error().to_string()))?,
                false,
            ),
        };
        Ok(FileMap {
            ptr,
            size,
            writable,
            _file: file.clone(),
        })
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no run refers to it any more.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.size as usize) };
    }
}

pub struct IommuStats {
    pub iopf: AtomicU64,
    pub last_iopf_iova: AtomicU64,
    /// Page requests are on: the first fault since `take_fault` is kept for the device.
    pri: AtomicBool,
    /// That fault: the page's IOVA, bit 0 set for a write; `NO_FAULT` when there is none.
    fault: AtomicU64,
}

const NO_FAULT: u64 = u64::MAX;

impl Default for IommuStats {
    fn default() -> Self {
        IommuStats {
            iopf: AtomicU64::new(0),
            last_iopf_iova: AtomicU64::new(0),
            pri: AtomicBool::new(false),
            fault: AtomicU64::new(NO_FAULT),
        }
    }
}

/// The mappings. The device works on a read guard of it; map and unmap change it in place
/// under the write lock, which also makes them wait for device accesses in progress.
pub struct Snapshot {
    runs: BTreeMap<u64, Run>,
    /// VIO shadow indices: a 2-byte access at the first address goes to the second.
    redirects: Vec<(u64, u64)>,
    stats: Arc<IommuStats>,
}

pub struct Iommu {
    current: RwLock<Snapshot>,
    stats: Arc<IommuStats>,
    /// Client files by (device, inode): every DMA_MAP carries an fd, usually of the same
    /// memory, and keeping one per mapping would exhaust the process's descriptors.
    files: Mutex<HashMap<(u64, u64), Weak<File>>>,
    /// Whole-file mappings by (device, inode), shared by the runs that use them.
    maps: Mutex<HashMap<(u64, u64), Weak<FileMap>>>,
}

fn map_run(
    map: &Arc<FileMap>,
    file_offset: u64,
    iova: u64,
    len: u64,
    writable: bool,
) -> Result<Run, IommuError> {
    if writable && !map.writable {
        return Err(IommuError::Mmap("the client's fd is read-only".into()));
    }
    if file_offset
        .checked_add(len)
        .is_none_or(|end| end > map.size)
    {
        return Err(IommuError::Mmap(format!(
            "{file_offset:#x}+{len:#x} is beyond the end of the client's file"
        )));
    }
    let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
    // SAFETY: [ptr + file_offset, + len) lies within the live whole-file mapping, which the run
    // keeps alive (it holds the Arc) for as long as the region exists.
    let mapping = unsafe {
        MmapRegion::build_raw(
            map.ptr.add(file_offset as usize),
            len as usize,
            prot,
            libc::MAP_SHARED,
        )
    }
    .map_err(|e| IommuError::Mmap(e.to_string()))?;
    let region = GuestRegionMmap::new(mapping, GuestAddress(iova))
        .ok_or_else(|| IommuError::Mmap(format!("{iova:#x}+{len:#x} wraps around")))?;
    Ok(Run {
        len,
        writable,
        map: map.clone(),
        file_offset,
        region: Arc::new(region),
    })
}

fn check_aligned(iova: u64, len: u64) -> Result<u64, IommuError> {
    let end = iova
        .checked_add(len)
        .ok_or(IommuError::Unaligned { iova, len })?;
    if len == 0 || !iova.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(IommuError::Unaligned { iova, len });
    }
    Ok(end)
}

impl Iommu {
    pub fn new() -> Self {
        let stats = Arc::new(IommuStats::default());
        Iommu {
            current: RwLock::new(Snapshot {
                runs: BTreeMap::new(),
                redirects: Vec::new(),
                stats: stats.clone(),
            }),
            stats,
            files: Mutex::new(HashMap::new()),
            maps: Mutex::new(HashMap::new()),
        }
    }

    /// The whole-file mapping of `file`, covering at least `end` bytes.
    fn file_map(&self, file: &Arc<File>, end: u64) -> Result<Arc<FileMap>, IommuError> {
        let meta = file
            .metadata()
            .map_err(|e| IommuError::Mmap(e.to_string()))?;
        let key = (meta.dev(), meta.ino());
        let mut maps = self.maps.lock().unwrap();
        if let Some(m) = maps.get(&key).and_then(Weak::upgrade) {
            if m.size >= end {
                return Ok(m);
            }
        }
        // New, or the file grew: a fresh mapping; runs on the old one keep it alive.
        maps.retain(|_, w| w.strong_count() > 0);
        let m = Arc::new(FileMap::new(file)?);
        maps.insert(key, Arc::downgrade(&m));
        Ok(m)
    }

    /// The shared handle of `file`'s underlying object: an fd received earlier for the same
    /// file is reused and this one closed.
    pub fn intern(&self, file: File) -> Arc<File> {
        let Ok(meta) = file.metadata() else {
            return Arc::new(file);
        };
        let key = (meta.dev(), meta.ino());
        let mut files = self.files.lock().unwrap();
        if let Some(f) = files.get(&key).and_then(Weak::upgrade) {
            return f;
        }
        files.retain(|_, w| w.strong_count() > 0);
        let f = Arc::new(file);
        files.insert(key, Arc::downgrade(&f));
        f
    }

    /// Keeps the first fault for the device to raise a page request about (`take_fault`).
    pub fn enable_page_requests(&self) {
        self.stats.pri.store(true, Ordering::Relaxed);
    }

    pub fn stats(&self) -> &IommuStats {
        &self.stats
    }

    /// Maps `len` bytes of `file` at `file_offset` to IOVA `iova`.
    pub fn map(
        &self,
        file: Arc<File>,
        file_offset: u64,
        iova: u64,
        len: u64,
        writable: bool,
    ) -> Result<(), IommuError> {
        let end = check_aligned(iova, len)?;
        if !file_offset.is_multiple_of(PAGE_SIZE) {
            return Err(IommuError::Unaligned { iova, len });
        }
        // The mmap is made before taking the lock, so the device waits only for the insert.
        let map = self.file_map(&file, file_offset.saturating_add(len))?;
        let run = map_run(&map, file_offset, iova, len, writable)?;
        let mut cur = self.current.write().unwrap();
        if cur.runs.len() >= MAX_MAPPINGS {
            return Err(IommuError::TooMany);
        }
        if let Some((&s, r)) = cur.runs.range(..end).next_back() {
            if s + r.len > iova {
                return Err(IommuError::Exists { iova, len });
            }
        }
        // A mapping that continues a neighbour (same file, contiguous offsets, same access)
        // joins it, as an IOMMU's page tables would use a larger page: a client that maps page
        // by page and then fills the gaps ends with one run, and lookups stay short.
        let joins = |r: &Run, at_offset: u64| {
            Arc::ptr_eq(&r.map, &map) && r.writable == writable && r.file_offset == at_offset
        };
        let (mut start, mut off, mut total) = (iova, file_offset, len);
        if let Some((&s, r)) = cur.runs.range(..iova).next_back() {
            if s + r.len == iova && joins(r, file_offset.wrapping_sub(r.len)) {
                (start, off, total) = (s, r.file_offset, r.len + len);
            }
        }
        if let Some(r) = cur.runs.get(&end) {
            if joins(r, file_offset + len) {
                total += r.len;
            }
        }
        if total == len {
            cur.runs.insert(iova, run);
            return Ok(());
        }
        let joined = map_run(&map, off, start, total, writable)?;
        if start != iova {
            cur.runs.remove(&start);
        }
        if start + total != end {
            cur.runs.remove(&end);
        }
        cur.runs.insert(start, joined);
        Ok(())
    }

    /// Unmaps every mapped page of [iova, iova+len); returns once no device access can touch
    /// them. Returns the bytes that were mapped.
    pub fn unmap(&self, iova: u64, len: u64) -> Result<u64, IommuError> {
        let end = check_aligned(iova, len)?;
        let mut cur = self.current.write().unwrap();
        // Runs overlapping the range: the one starting before it, and those starting inside.
        let mut hit: Vec<u64> = cur.runs.range(iova..end).map(|(&s, _)| s).collect();
        if let Some((&s, r)) = cur.runs.range(..iova).next_back() {
            if s + r.len > iova {
                hit.push(s);
            }
        }
        if hit.is_empty() {
            return Err(IommuError::NotMapped { iova, len });
        }
        let mut removed = 0;
        for s in hit {
            let r = cur.runs.remove(&s).expect("listed above");
            let e = s + r.len;
            removed += e.min(end) - s.max(iova);
            // Keep the parts outside the range, each with an mmap of its own.
            if s < iova {
                let part = map_run(&r.map, r.file_offset, s, iova - s, r.writable)?;
                cur.runs.insert(s, part);
            }
            if e > end {
                let part = map_run(&r.map, r.file_offset + (end - s), end, e - end, r.writable)?;
                cur.runs.insert(end, part);
            }
        }
        Ok(removed)
    }

    pub fn unmap_all(&self) {
        self.current.write().unwrap().runs.clear();
    }

    pub fn mapped_bytes(&self) -> u64 {
        self.current
            .read()
            .unwrap()
            .runs
            .values()
            .map(|r| r.len)
            .sum()
    }
}

impl ShadowIndex for Iommu {
    fn redirect(&self, avail_idx_addr: u64, shadow: Option<u64>, capture: bool) {
        // Under the write lock no device access is in progress, so no read of the index can
        // fall between the copy and the redirect.
        let mut cur = self.current.write().unwrap();
        cur.redirects.retain(|&(from, _)| from != avail_idx_addr);
        if let Some(to) = shadow {
            if capture {
                let snap: &Snapshot = &cur;
                let copied = snap
                    .read_obj::<u16>(GuestAddress(avail_idx_addr))
                    .and_then(|v| snap.write_obj(v, GuestAddress(to)));
                if let Err(e) = copied {
                    warn!("Capturing the available index at {avail_idx_addr:#x}: {e}");
                }
            }
            cur.redirects.push((avail_idx_addr, to));
        }
    }
}

impl Default for Iommu {
    fn default() -> Self {
        Self::new()
    }
}

pub struct IommuGuard<'a>(RwLockReadGuard<'a, Snapshot>);

impl Deref for IommuGuard<'_> {
    type Target = Snapshot;
    fn deref(&self) -> &Snapshot {
        &self.0
    }
}

impl MemoryView for Iommu {
    type Mem = Snapshot;
    type Guard<'a> = IommuGuard<'a>;

    fn view(&self) -> IommuGuard<'_> {
        IommuGuard(self.current.read().unwrap())
    }

    fn take_fault(&self) -> Option<(u64, bool)> {
        let f = self.stats.fault.swap(NO_FAULT, Ordering::AcqRel);
        (f != NO_FAULT).then_some((f & !1, f & 1 != 0))
    }
}

impl Snapshot {
    /// Whether every page of [addr, addr+count) is mapped with `access`.
    fn allowed(&self, addr: u64, count: usize, access: Permissions) -> bool {
        let Some(end) = addr.checked_add(count as u64) else {
            return false;
        };
        let mut at = addr;
        while at < end {
            let Some((&s, r)) = self.runs.range(..=at).next_back() else {
                return false;
            };
            if at >= s + r.len || (access.has_write() && !r.writable) {
                return false;
            }
            at = s + r.len;
        }
        true
    }

    fn fault(&self, addr: u64, access: Permissions) {
        self.stats.iopf.fetch_add(1, Ordering::Relaxed);
        self.stats.last_iopf_iova.store(addr, Ordering::Relaxed);
        if self.stats.pri.load(Ordering::Relaxed) {
            // Becomes a page request: not worth a warning.
            let page = (addr & !(PAGE_SIZE - 1)) | u64::from(access.has_write());
            let _ = self.stats.fault.compare_exchange(
                NO_FAULT,
                page,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
            return;
        }
        if IOPF_LOG.hit() {
            warn!(
                "IOPF: device {} at IOVA {addr:#x} is not mapped; access refused",
                if access.has_write() { "write" } else { "read" }
            );
        }
    }

    /// Where an access really goes: the avail index of a shadowed queue is read elsewhere.
    fn translate(&self, addr: GuestAddress, count: usize) -> GuestAddress {
        if count == 2 {
            if let Some(&(_, to)) = self.redirects.iter().find(|&&(from, _)| from == addr.0) {
                return GuestAddress(to);
            }
        }
        addr
    }

    fn check(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        let ok = count == 0 || self.allowed(addr.0, count, access);
        if !ok {
            self.fault(addr.0, access);
        }
        ok
    }
}

/// The pieces of a checked access, run by run.
pub struct Slices<'a> {
    snap: &'a Snapshot,
    addr: u64,
    left: usize,
}

impl<'a> Iterator for Slices<'a> {
    type Item = MemResult<VolatileSlice<'a, BS<'a, ()>>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let at = self.addr;
        let found = self
            .snap
            .runs
            .range(..=at)
            .next_back()
            .filter(|(&s, r)| at < s + r.len);
        let Some((&s, r)) = found else {
            self.left = 0;
            return Some(Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(at))));
        };
        let n = self.left.min((s + r.len - at) as usize);
        self.addr += n as u64;
        self.left -= n;
        let slice = r.region.get_slice(MemoryRegionAddress(at - s), n);
        if slice.is_err() {
            self.left = 0;
        }
        Some(slice)
    }
}

impl std::iter::FusedIterator for Slices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, BS<'a, ()>> for Slices<'a> {}

impl GuestMemory for Snapshot {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        self.check(self.translate(addr, count), count, access)
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> MemResult<impl GuestMemorySliceIterator<'a, BS<'a, Self::Bitmap>>> {
        let addr = self.translate(addr, count);
        if !self.check(addr, count, access) {
            return Err(GuestMemoryError::InvalidGuestAddress(addr));
        }
        Ok(Slices {
            snap: self,
            addr: addr.0,
            left: count,
        })
    }
}

#[cfg(test)]
mod tests;
