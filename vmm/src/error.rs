//! The VMM thread's errors, as a request sees them. A leaf of the module graph: the API layer
//! maps them to HTTP statuses, the VMM thread produces them from the VM and device layers.

use crate::device_manager::DeviceError;
use crate::vm::VmError;
use thiserror::Error;

/// Why the VMM refused or failed a request. The API layer maps these to HTTP statuses.
#[derive(Debug, Error)]
pub enum VmmError {
    #[error("A VM is already created")]
    VmAlreadyCreated,
    #[error("No VM is created")]
    VmNotCreated,
    #[error("The VM is already booted")]
    VmAlreadyBooted,
    #[error("The VM is not booted")]
    VmNotBooted,
    #[error("The VM is not running")]
    VmNotRunning,
    #[error("The VM is not paused")]
    VmNotPaused,
    #[error("Reclaim is not enabled (--memory ...,shared=on,reclaim=on)")]
    ReclaimDisabled,
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("Failed to serialise the reply")]
    Reply(#[source] serde_json::Error),
    #[error("Live upgrade")]
    Migration(#[from] crate::migration::MigrationError),
}

/// A reply to a request: a JSON body, or none.
pub type VmmResult = Result<Option<serde_json::Value>, VmmError>;
