//! virtio-net: the frame engine, the TAP backend, the worker and the device (VMM-emulated over
//! a TAP, or vdpu's network function).

mod device;
pub mod engine;
pub mod tap;
mod worker;

pub use device::{net_config_space, net_features, parse_mac, Net, NetConfig};
pub use engine::{ChainError, NetCounters, RxOutcome, NET_HDR_LEN};
pub use tap::{Tap, TapError};

pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// The queues of the one queue pair: receive, then transmit.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
