//! vfio-user (qemu's docs/interop/vfio-user.rst), protocol version 0.1.

pub mod client;
pub mod pci_device;
pub mod pri;
pub mod protocol;

pub use client::{ClientError, RegionIoFd, VfioUserClient};
pub use pci_device::{MsixLayoutState, PciFunctionState, VfioUserDeviceError, VfioUserPciDevice};
pub use pri::{PriError, PriHandler};
