//! An in-process vdpu serving a blank disk, for tests that talk to it over the socket.
#![allow(dead_code)]

pub mod rig;

use std::fs::File;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use vdpu::device::{build_blk, BlkConfig};

/// Starts a vdpu server thread on a fresh socket, backed by a blank disk of `disk_size` bytes.
pub fn start_server(prefix: &str, name: &str, disk_size: u64) -> PathBuf {
    let dir = std::env::temp_dir();
    let id = format!("vdpu-{prefix}-{}-{name}", std::process::id());
    let disk = dir.join(format!("{id}.img"));
    File::create(&disk).unwrap().set_len(disk_size).unwrap();
    let sock = dir.join(format!("{id}.sock"));
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap();
    let mut dev =
        build_blk(&BlkConfig::parse(&format!("path={}", disk.display())).unwrap()).unwrap();
    std::thread::spawn(move || vdpu::server::run(listener, &mut dev));
    sock
}
