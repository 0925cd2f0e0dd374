//! DMA mapping for devices bound to the kernel's VFIO driver: guest RAM is mapped into the
//! container's IOMMU domain (VFIO_IOMMU_MAP_DMA through vfio-ioctls).
//!
//! This machine has no /dev/vfio and no IOMMU, so this path is built and its error handling
//! tested, but a real mapping cannot run here.

use crate::dma::{DmaBacking, DmaError, DmaMapping};
use std::sync::Arc;
use thiserror::Error;
use vfio_ioctls::VfioContainer;

#[derive(Debug, Error)]
pub enum KernelVfioError {
    #[error("Failed to open the VFIO container")]
    Container(#[source] vfio_ioctls::VfioError),
}

pub struct KernelVfioDma {
    container: Arc<VfioContainer>,
}

impl KernelVfioDma {
    /// Opens a new container (/dev/vfio/vfio).
    pub fn new() -> Result<Self, KernelVfioError> {
        Ok(KernelVfioDma {
            container: Arc::new(VfioContainer::new(None).map_err(KernelVfioError::Container)?),
        })
    }

    /// Uses the container a VFIO device's group is attached to.
    pub fn with_container(container: Arc<VfioContainer>) -> Self {
        KernelVfioDma { container }
    }
}

fn io(e: vfio_ioctls::VfioError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl DmaMapping for KernelVfioDma {
    fn map(&self, iova: u64, size: u64, b: &DmaBacking) -> Result<(), DmaError> {
        // SAFETY: host_addr..host_addr+size is guest RAM mapped by this process for the VM's
        // lifetime; the device may read and write it concurrently, which is what guest RAM is for.
        unsafe {
            self.container
                .vfio_dma_map(iova, size as usize, b.host_addr as *mut u8)
        }
        .map_err(|e| DmaError::Map {
            iova,
            size,
            source: io(e),
        })
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), DmaError> {
        self.container
            .vfio_dma_unmap(iova, size as usize)
            .map_err(|e| DmaError::Unmap {
                iova,
                size,
                source: io(e),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_vfio_is_a_clear_error() {
        if std::path::Path::new("/dev/vfio/vfio").exists() {
            eprintln!(
                "*** /dev/vfio/vfio exists: the no-VFIO error path is not exercised here ***"
            );
            return;
        }
        let e = KernelVfioDma::new()
            .err()
            .expect("no container without /dev/vfio");
        assert!(e.to_string().contains("VFIO container"), "{e}");
        assert!(
            std::error::Error::source(&e).is_some(),
            "the cause is chained"
        );
    }
}
