//! The VIO core: the wire contract of the shadow-index extension (`spec`), IOPA-Snoop's chain
//! walker (which pages will the device DMA to?), the per-queue snoop engine behind the shadow
//! index, and the DMA window that keeps mapped pages resident; and the page-request contract of
//! the PRI baseline (`pri`). Free of KVM: everything works on
//! vm-memory's `GuestMemory`, so it is testable on plain memory.

pub mod elastic;
pub mod lockpage;
pub mod pages;
pub mod pri;
pub mod ring_mem;
pub mod snoop;
pub mod spec;
pub mod stats;
pub mod walker;

pub use lockpage::{LockPolicy, LockStats, Lockpage, TickPlan};
pub use pages::{DmaWindow, IoMapper, PageError, Residency, SourceError};
pub use snoop::{SnoopError, SnoopHost, SnoopQueue, SnoopStats};
pub use stats::{error_chain, LatencyHistogram, LogLimiter};
pub use walker::{ChainWalker, QueueLayout, WalkLimits, WalkReport};
