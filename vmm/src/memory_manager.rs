//! Guest RAM: one memfd, mapped shared (so another process, such as a device, can map the
//! same pages) or private, and registered with KVM as memory slots.

use crate::layout;
use crate::reclaim::{HostRange, ReclaimConfig, Reclaimer};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::io::FromRawFd;
use std::sync::Arc;
use thiserror::Error;
use vfio::{DmaBacking, DmaMapping};
use vio::spec::PAGE_SIZE;
use vio::{IoMapper, PageError, Residency, SourceError};
use virtio_devices::GuestMemoryMmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("Failed to create the guest RAM memfd")]
    Memfd(#[source] io::Error),
    #[error("Failed to size the guest RAM memfd")]
    Truncate(#[source] io::Error),
    #[error("Failed to map guest RAM: {0}")]
    Mmap(String),
    #[error("Failed to set up reclaim")]
    Reclaim(#[from] crate::reclaim::ReclaimError),
    #[error("Failed to register guest RAM with KVM")]
    SetRegion(#[source] kvm_ioctls::Error),
}

/// One contiguous piece of guest RAM and where it lives in the memfd.
#[derive(Clone, Copy, Debug)]
pub struct RamRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

pub struct MemoryManager {
    reclaimer: Option<Arc<Reclaimer>>,
    memfd: Arc<File>,
    memory: Arc<GuestMemoryMmap>,
    regions: Vec<RamRegion>,
    shared: bool,
}

fn memfd_create(name: &str) -> io::Result<File> {
    let name = CString::new(name).unwrap();
    // SAFETY: name is a valid NUL-terminated string; the returned fd is owned below.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl MemoryManager {
    pub fn new(size: u64, shared: bool) -> Result<Self, MemoryError> {
        let memfd = memfd_create("vio_guest_ram").map_err(MemoryError::Memfd)?;
        memfd.set_len(size).map_err(MemoryError::Truncate)?;
        Self::with_memfd(memfd, size, shared)
    }

    /// Guest RAM that another process created (a live upgrade): the same memfd, mapped anew.
    pub fn adopt(memfd: File, size: u64, shared: bool) -> Result<Self, MemoryError> {
        let len = memfd.metadata().map_err(MemoryError::Truncate)?.len();
        if len != size {
            return Err(MemoryError::Mmap(format!(
                "the memfd holds {len} bytes, the configuration {size}"
            )));
        }
        Self::with_memfd(memfd, size, shared)
    }

    fn with_memfd(memfd: File, size: u64, shared: bool) -> Result<Self, MemoryError> {
        let memfd = Arc::new(memfd);
        let mut regions = Vec::new();
        let mut mapped = Vec::new();
        let mut offset = 0;
        for (addr, len) in layout::ram_ranges(size) {
            let flags = libc::MAP_NORESERVE
                | if shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
            let mapping = MmapRegionBuilder::new(len as usize)
                .with_file_offset(FileOffset::from_arc(memfd.clone(), offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .build()
                .map_err(|e| MemoryError::Mmap(e.to_string()))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(addr))
                .ok_or_else(|| MemoryError::Mmap(format!("region at {addr:#x} wraps around")))?;
            mapped.push(Arc::new(region));
            regions.push(RamRegion {
                guest_addr: addr,
                size: len,
                file_offset: offset,
            });
            offset += len;
        }
        let memory = GuestMemoryMmap::from_arc_regions(mapped)
            .map_err(|e| MemoryError::Mmap(e.to_string()))?;
        Ok(MemoryManager {
            reclaimer: None,
            memfd,
            memory: Arc::new(memory),
            regions,
            shared,
        })
    }

    /// Starts reclaim over all of guest RAM (needs a shared mapping).
    pub fn enable_reclaim(&mut self, cfg: ReclaimConfig) -> Result<(), MemoryError> {
        let ranges = self.host_ranges();
        self.reclaimer = Some(Reclaimer::new(self.memfd.clone(), ranges, cfg)?);
        Ok(())
    }

    /// Takes over reclaim as another process left it (a live upgrade).
    pub fn adopt_reclaim(
        &mut self,
        cfg: ReclaimConfig,
        state: &crate::reclaim::ReclaimState,
        fds: &mut vfio::handover::FdsIn,
        blob: &vfio::handover::BlobIn,
    ) -> Result<(), MemoryError> {
        let ranges = self.host_ranges();
        self.reclaimer = Some(Reclaimer::adopt(
            self.memfd.clone(),
            ranges,
            cfg,
            state,
            fds,
            blob,
        )?);
        Ok(())
    }

    fn host_ranges(&self) -> Vec<HostRange> {
        self.memory
            .iter()
            .zip(self.regions.iter())
            .map(|(m, r)| HostRange {
                guest_addr: r.guest_addr,
                size: r.size,
                file_offset: r.file_offset,
                host_addr: m.as_ptr() as u64,
            })
            .collect()
    }

    pub fn reclaimer(&self) -> Option<&Arc<Reclaimer>> {
        self.reclaimer.as_ref()
    }

    /// Who keeps guest pages resident for a snooping device: the reclaimer, or (without
    /// reclaim) nobody needs to, as every page stays resident.
    pub fn residency(&self) -> Arc<dyn Residency> {
        match &self.reclaimer {
            Some(r) => r.clone(),
            None => Arc::new(AlwaysResident(self.regions.clone(), self.memfd.clone())),
        }
    }

    /// Guest page frames [0, n) cover all of guest RAM.
    pub fn guest_pages(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| (r.guest_addr + r.size).div_ceil(PAGE_SIZE))
            .max()
            .unwrap_or(0)
    }

    /// Maps guest pages for `device` at IOVA = guest-physical address.
    pub fn io_mapper(&self, device: Arc<dyn DmaMapping>) -> Arc<dyn IoMapper> {
        Arc::new(RamIoMapper {
            device,
            memfd: self.memfd.clone(),
            regions: self.regions.clone(),
        })
    }

    pub fn memory(&self) -> Arc<GuestMemoryMmap> {
        self.memory.clone()
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    pub fn memfd(&self) -> &Arc<File> {
        &self.memfd
    }

    pub fn shared(&self) -> bool {
        self.shared
    }

    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    pub fn register_with_kvm(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the mapping stays alive as long as the VM: both are owned by the Vm and
            // the memory manager outlives the VM fd's use of it.
            unsafe { vm.set_user_memory_region(mem_region) }.map_err(MemoryError::SetRegion)?;
        }
        Ok(())
    }
}

impl Drop for MemoryManager {
    fn drop(&mut self) {
        if let Some(r) = &self.reclaimer {
            r.stop();
        }
    }
}

fn region_of(regions: &[RamRegion], gpa: u64) -> Option<&RamRegion> {
    regions
        .iter()
        .find(|r| gpa >= r.guest_addr && gpa < r.guest_addr + r.size)
}

struct AlwaysResident(Vec<RamRegion>, Arc<File>);

impl Residency for AlwaysResident {
    fn pin(&self, gfn: u64) -> Result<bool, PageError> {
        gfn.checked_mul(PAGE_SIZE)
            .and_then(|gpa| region_of(&self.0, gpa))
            .map(|_| false)
            .ok_or(PageError::OutsideRam(gfn))
    }
    fn unpin(&self, _gfn: u64) {}
    fn populate(&self, gfn: u64, n: u64) -> Result<(), PageError> {
        let gpa = gfn * PAGE_SIZE;
        let r = region_of(&self.0, gpa).ok_or(PageError::OutsideRam(gfn))?;
        allocate(&self.1, r.file_offset + (gpa - r.guest_addr), n * PAGE_SIZE)
            .map_err(|e| PageError::Populate(gfn, n, e.into()))
    }
}

/// Backs [offset, offset+len) of `memfd` with memory (pages already there are left alone).
pub fn allocate(memfd: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: allocating blocks of our own memfd; mode 0 never changes existing contents.
    let rc = unsafe {
        libc::fallocate(
            std::os::unix::io::AsRawFd::as_raw_fd(memfd),
            0,
            offset as i64,
            len as i64,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

struct RamIoMapper {
    device: Arc<dyn DmaMapping>,
    memfd: Arc<File>,
    regions: Vec<RamRegion>,
}

#[derive(Debug, Error)]
#[error("{0:#x}+{1:#x} is not within one RAM region")]
struct NotOneRegion(u64, u64);

impl IoMapper for RamIoMapper {
    fn map(&self, gfn: u64, pages: u64) -> Result<(), SourceError> {
        let (gpa, len) = (gfn * PAGE_SIZE, pages * PAGE_SIZE);
        let r = region_of(&self.regions, gpa)
            .filter(|r| gpa + len <= r.guest_addr + r.size)
            .ok_or(NotOneRegion(gpa, len))?;
        let backing = DmaBacking {
            file: &self.memfd,
            file_offset: r.file_offset + gpa - r.guest_addr,
            host_addr: 0,
        };
        Ok(self.device.map(gpa, len, &backing)?)
    }

    fn unmap(&self, gfn: u64, pages: u64) -> Result<(), SourceError> {
        Ok(self.device.unmap(gfn * PAGE_SIZE, pages * PAGE_SIZE)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn shared_memory_is_visible_through_the_memfd() {
        let mm = MemoryManager::new(32 << 20, true).unwrap();
        mm.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_at(mm.memfd().as_ref(), &mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        assert_eq!(mm.size(), 32 << 20);
    }

    #[test]
    fn private_memory_is_not() {
        let mm = MemoryManager::new(32 << 20, false).unwrap();
        mm.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_at(mm.memfd().as_ref(), &mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0);
    }
}
