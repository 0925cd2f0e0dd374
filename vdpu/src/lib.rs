//! vdpu: the software DPU. A separate process that serves a virtio device over vfio-user and
//! reaches guest memory only through its IOMMU model (`iommu`).

pub mod device;
pub mod iommu;
pub mod irq;
pub mod pri;
pub mod seccomp;
pub mod server;
