//! PCI: the address-range buses, type-0 configuration space with BARs and capabilities,
//! MSI-X, and the host bridge with its two configuration mechanisms (0xCF8/0xCFC and ECAM).

mod bus;
mod configuration;
mod msix;
mod root;

pub use bus::{Bus, BusDevice, BusError};
pub use configuration::{
    BarReprogram, PciBarRegion, PciBarType, PciClass, PciConfiguration, PciHeader,
    NUM_CONFIGURATION_REGISTERS,
};
pub use msix::{MsiInterruptGroup, MsiMessage, MsixCap, MsixConfig, MSIX_ENTRY_SIZE};
pub use root::{DeviceRelocation, PciBus, PciConfigIo, PciConfigMmio, PciDevice, PciRoot};
