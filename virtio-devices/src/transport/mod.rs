//! Transports that present a `VirtioDevice` to the guest.

mod pci_device;

pub use pci_device::{InterruptDelivery, IoEventRegistrar, VirtioPciDevice, VirtioPciLayout};
