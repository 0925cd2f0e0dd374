//! The VIO virtual machine monitor: VM lifecycle, configuration, vCPUs, guest memory and devices.

pub mod acpi;
pub mod api;
pub mod config;
pub mod cpu;
pub mod device_manager;
pub mod devices;
mod emulated;
pub mod error;
pub mod interrupt;
pub mod layout;
pub mod memory_manager;
pub mod migration;
pub mod reclaim;
pub mod seccomp_filters;
pub mod vcpu_state;
pub mod vm;
pub mod vmm;

pub use config::VmConfig;
pub use devices::ExitReason;
pub use error::VmmError;
pub use vio::error_chain;
pub use vm::{Vm, VmError};
pub use vmm::{Vmm, VmmExit};
