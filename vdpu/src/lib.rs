//! vdpu: the software DPU. A separate process that serves virtio devices over vfio-user and
//! reaches guest memory only through an IOMMU model (the vdpu issue builds it).
