//! MSI-X as a vfio-user device raises it: one client eventfd per vector (SET_IRQS), with the
//! mask and pending state the client may drive through SET_IRQS actions.

use pci::{MsiInterruptGroup, MsiMessage};
use std::io;
use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

#[derive(Default)]
struct Vector {
    fd: Option<EventFd>,
    masked: bool,
    pending: bool,
}

pub struct ClientIrqs {
    vectors: Mutex<Vec<Vector>>,
}

impl ClientIrqs {
    pub fn new(count: u16) -> Self {
        ClientIrqs {
            vectors: Mutex::new((0..count).map(|_| Vector::default()).collect()),
        }
    }

    pub fn count(&self) -> u32 {
        self.vectors.lock().unwrap().len() as u32
    }

    /// Installs (or with `None`, removes) the eventfd of vector `i`.
    pub fn set_fd(&self, i: u32, fd: Option<EventFd>) {
        if let Some(v) = self.vectors.lock().unwrap().get_mut(i as usize) {
            v.fd = fd;
            v.pending = false;
        }
    }

    pub fn set_masked(&self, i: u32, masked: bool) {
        let mut vs = self.vectors.lock().unwrap();
        let Some(v) = vs.get_mut(i as usize) else {
            return;
        };
        v.masked = masked;
        if !masked && v.pending {
            v.pending = false;
            if let Some(fd) = &v.fd {
                let _ = fd.write(1);
            }
        }
    }

    pub fn clear(&self) {
        for v in self.vectors.lock().unwrap().iter_mut() {
            *v = Vector::default();
        }
    }
}

impl MsiInterruptGroup for ClientIrqs {
    /// The client owns the MSI-X table (it routes the eventfd); nothing to do here.
    fn update(&self, _index: u16, _msg: MsiMessage, _masked: bool) -> io::Result<()> {
        Ok(())
    }

    fn trigger(&self, index: u16) -> io::Result<()> {
        let mut vs = self.vectors.lock().unwrap();
        let Some(v) = vs.get_mut(index as usize) else {
            return Ok(());
        };
        if v.masked {
            v.pending = true;
            return Ok(());
        }
        match &v.fd {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }

    fn notifier(&self, index: u16) -> Option<EventFd> {
        self.vectors
            .lock()
            .unwrap()
            .get(index as usize)?
            .fd
            .as_ref()?
            .try_clone()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_mask_and_pending() {
        let irqs = ClientIrqs::new(2);
        irqs.trigger(0).unwrap(); // no fd yet: dropped
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        irqs.set_fd(0, Some(fd.try_clone().unwrap()));
        irqs.trigger(0).unwrap();
        assert_eq!(fd.read().unwrap(), 1);
        irqs.set_masked(0, true);
        irqs.trigger(0).unwrap();
        assert!(fd.read().is_err(), "masked: nothing delivered");
        irqs.set_masked(0, false);
        assert_eq!(fd.read().unwrap(), 1, "pending delivered at unmask");
        irqs.trigger(7).unwrap();
    }
}
