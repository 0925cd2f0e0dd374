//! Transports that present a `VirtioDevice` to the guest.

mod pci_device;

pub use pci_device::{
    InterruptDelivery, IoEventRegistrar, ShadowIndex, VirtioPciDevice, VirtioPciLayout,
    VIO_CAP_SHADOW_INDEX, VIO_SHADOW_MAGIC,
};
