//! The VIO core: IOPA-Snoop's chain walker (which pages will the device DMA to?), the per-queue
//! snoop engine behind the shadow index, and the DMA window that keeps mapped pages resident;
//! later lockpage and the elastic controller. Free of KVM: everything works on
//! vm-memory's `GuestMemory`, so it is testable on plain memory.

pub mod pages;
pub mod snoop;
pub mod stats;
pub mod walker;

pub use pages::{DmaWindow, IoMapper, PageError, Residency};
pub use snoop::{SnoopHost, SnoopQueue, SnoopStats};
pub use stats::{LatencyHistogram, LogLimiter};
pub use walker::{ChainWalker, QueueLayout, WalkLimits, WalkReport};
