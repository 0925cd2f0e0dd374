//! The seam between guest memory and a device's DMA: what a device may reach, and how the VMM
//! grants and revokes it.

use std::fs::File;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DmaError {
    #[error("DMA map of {iova:#x}+{size:#x} failed")]
    Map {
        iova: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("DMA unmap of {iova:#x}+{size:#x} failed")]
    Unmap {
        iova: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Guest memory backing a DMA range: the file it lives in and where this process maps it.
pub struct DmaBacking<'a> {
    pub file: &'a File,
    pub file_offset: u64,
    pub host_addr: u64,
}

/// Grants and revokes a device's access to guest memory at IOVA = guest-physical address.
pub trait DmaMapping: Send + Sync {
    fn map(&self, iova: u64, size: u64, backing: &DmaBacking) -> Result<(), DmaError>;
    /// Returns once the device can no longer touch the range.
    fn unmap(&self, iova: u64, size: u64) -> Result<(), DmaError>;
}
