//! How a device reaches guest memory: plain guest RAM for VMM-emulated devices, an
//! IOMMU-checked view for a passthrough device.

use crate::GuestMemoryMmap;
use std::ops::Deref;
use vm_memory::GuestMemory;

pub trait MemoryView: Send + Sync + 'static {
    type Mem: GuestMemory;
    type Guard<'a>: Deref<Target = Self::Mem>
    where
        Self: 'a;

    /// Guest memory as the device may access it now. The view stays valid (and mappings in it
    /// stay in place) while the guard lives: hold it for the duration of a DMA.
    fn view(&self) -> Self::Guard<'_>;

    /// The first access since the last call that found no mapping: (page IOVA, a write), if
    /// this view records them (an IOMMU with page requests on). Plain RAM has no such faults.
    fn take_fault(&self) -> Option<(u64, bool)> {
        None
    }
}

impl MemoryView for GuestMemoryMmap {
    type Mem = GuestMemoryMmap;
    type Guard<'a> = &'a GuestMemoryMmap;

    fn view(&self) -> &GuestMemoryMmap {
        self
    }
}
