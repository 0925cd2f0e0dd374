//! virtio-blk: the request engine, the file backend and the VMM-emulated device.

mod device;
pub mod disk;
pub mod engine;

pub use device::{
    block_config_space, block_features, block_serial, Block, BlockConfig, DEFAULT_QUEUE_SIZE,
};
pub use disk::RawFile;
pub use engine::{BlockCounters, BlockEngine, Request, RequestError, RequestType};

pub const SECTOR_SIZE: u64 = 512;
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
