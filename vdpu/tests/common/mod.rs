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

/// MSI-X vectors that go nowhere (each with an eventfd of its own).
pub struct Irqs;

impl pci::MsiInterruptGroup for Irqs {
    fn update(&self, _: u16, _: pci::MsiMessage, _: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn trigger(&self, _: u16) -> std::io::Result<()> {
        Ok(())
    }
    fn notifier(&self, _: u16) -> Option<vmm_sys_util::eventfd::EventFd> {
        vmm_sys_util::eventfd::EventFd::new(0).ok()
    }
}

/// Records the addresses doorbells are registered at.
#[derive(Default)]
pub struct Registrar(pub std::sync::Mutex<Vec<u64>>);

impl pci::IoEventRegistrar for Registrar {
    fn register(&self, _: &vmm_sys_util::eventfd::EventFd, addr: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().push(addr);
        Ok(())
    }
    fn unregister(&self, _: &vmm_sys_util::eventfd::EventFd, addr: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().retain(|&a| a != addr);
        Ok(())
    }
}
