//! The VIO core: IOPA-Snoop's chain walker (which pages will the device DMA to?), and later the
//! shadow index, lockpage and the elastic controller. Free of KVM: everything works on
//! vm-memory's `GuestMemory`, so it is testable on plain memory.

pub mod snoop;
pub mod walker;

pub use snoop::{SnoopHost, SnoopQueue, SnoopStats};
pub use walker::{ChainWalker, QueueLayout, WalkLimits, WalkReport};
