//! Transports that present a `VirtioDevice` to the guest.

pub mod pci_common_config;
mod pci_device;
mod vio_shadow;

pub use pci_device::{
    InterruptDelivery, IoEventRegistrar, QueueConfig, VirtioPciDevice, VirtioPciError,
    VirtioPciLayout, VirtioPciState,
};
pub use vio_shadow::{ShadowIndex, VioControlBlock};
