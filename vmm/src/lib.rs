//! The VIO virtual machine monitor: VM lifecycle, configuration, vCPUs, guest memory and devices.

pub mod config;
pub mod cpu;
pub mod device_manager;
pub mod devices;
pub mod interrupt;
pub mod layout;
pub mod memory_manager;
pub mod vm;

pub use config::VmConfig;
pub use devices::ExitReason;
pub use vm::{run, Vm, VmError};
