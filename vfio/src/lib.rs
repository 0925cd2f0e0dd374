//! Passthrough devices: the vfio-user protocol (both ends), and the DMA-mapping seam between
//! guest memory and a device.

pub mod dma;
pub mod kernel;
pub mod vfio_user;
pub mod vio_device;

pub use dma::{DmaBacking, DmaError, DmaMapping};
