//! virtio-blk: the request engine, the file backend, the worker and the device (VMM-emulated,
//! or vdpu's, which may raise page requests).

mod device;
pub mod disk;
pub mod engine;
pub mod pri;
mod worker;

pub use device::{
    block_config_space, block_features, block_serial, Block, BlockConfig, DEFAULT_QUEUE_SIZE,
};
pub use disk::RawFile;
pub use engine::{
    BlockCounters, BlockEngine, Completion, Drained, Request, RequestError, RequestType,
};
pub use pri::PageRequester;

pub const SECTOR_SIZE: u64 = 512;
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
