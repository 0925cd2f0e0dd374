//! Passthrough devices: the vfio-user protocol (both ends), the DMA-mapping seam between guest
//! memory and a device, and the `vio` device's front end beside the passthrough device.

pub mod dma;
pub mod handover;
pub mod vfio_user;
pub mod vio;

pub use dma::{DmaBacking, DmaError, DmaMapping};
