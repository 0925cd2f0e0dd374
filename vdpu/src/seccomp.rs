//! What each vdpu thread may ask of the kernel (the model: `virtio_devices::seccomp`).
//!
//! The main thread serves clients one after another and creates the device's queue workers;
//! the signal thread prints counters and exits on request. Nothing opens a file or a socket
//! once the device is built and the socket bound: the main thread confines itself after that.

use virtio_devices::seccomp::{any, virtio_blk_worker, virtio_net_worker, Filters, Rules};

/// The filter of every kind of vdpu thread.
pub fn filters() -> Filters {
    let mut f = Filters::new();
    f.insert("virtio-blk", virtio_blk_worker());
    f.insert("virtio-net", virtio_net_worker());
    f.insert("signals", Vec::new());
    let mut main = server();
    for rules in f.values() {
        main.extend(rules.iter().cloned());
    }
    f.insert("vdpu", main);
    f
}

/// Serving a client: its socket, the memory it maps for DMA (descriptors on the socket) and
/// the eventfds it sends.
fn server() -> Rules {
    any(&[
        libc::SYS_accept4,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_eventfd2,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::SeccompAction;
    use virtio_devices::seccomp::program;

    #[test]
    fn every_filter_builds() {
        for (name, rules) in filters() {
            program(name, rules, SeccompAction::Trap).unwrap();
        }
    }
}
