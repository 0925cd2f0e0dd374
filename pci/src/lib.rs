//! PCI: the address-range buses, type-0 configuration space with BARs and capabilities,
//! MSI-X, and the host bridge with its two configuration mechanisms (0xCF8/0xCFC and ECAM).

mod bus;
mod configuration;
mod msix;
mod root;

pub use bus::{Bus, BusDevice, BusError};
pub use configuration::{
    BarReprogram, ConfigError, PciBarRegion, PciBarType, PciClass, PciConfiguration, PciHeader,
    NUM_CONFIGURATION_REGISTERS,
};
pub use msix::{
    MsiInterruptGroup, MsiMessage, MsixCap, MsixConfig, MsixState, MsixStateError, MSIX_ENTRY_SIZE,
};
pub use root::{DeviceRelocation, PciBus, PciConfigIo, PciConfigMmio, PciDevice, PciRoot};

/// Registers doorbell eventfds with the hypervisor so guest writes to them bypass the VMM.
pub trait IoEventRegistrar: Send + Sync {
    fn register(&self, fd: &vmm_sys_util::eventfd::EventFd, addr: u64) -> std::io::Result<()>;
    fn unregister(&self, fd: &vmm_sys_util::eventfd::EventFd, addr: u64) -> std::io::Result<()>;
}
