//! vfio-user (qemu's docs/interop/vfio-user.rst), protocol version 0.1.

pub mod protocol;
