//! Passthrough devices: the vfio-user client, kernel VFIO, and the DMA-mapping seam between
//! guest memory and a device (the vdpu issue builds them).
