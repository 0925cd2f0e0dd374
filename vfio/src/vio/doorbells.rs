//! Where the guest's doorbells go: to the VMM's eventfds while the device is snooped, straight
//! to the device's own doorbell fds (its vfio-user io fds) while it is passed through. One lock
//! serialises the three things that move them: a mode switch, a BAR move and a queue enable
//! (which must program the device for the mode it is enabled in).

use pci::IoEventRegistrar;
use std::sync::Arc;
use vio::elastic::Mode;
use vmm_sys_util::eventfd::EventFd;

pub(super) struct Doorbells {
    registrar: Arc<dyn IoEventRegistrar>,
    /// BAR 0's guest-physical address; 0 while unassigned.
    base: u64,
    pub mode: Mode,
    /// Per queue: the doorbell's offset in BAR 0, the VMM's eventfd, the device's fd if it
    /// gave one.
    queues: Vec<(u64, Arc<EventFd>, Option<EventFd>)>,
}

impl Doorbells {
    /// Doorbells for `mode`, not yet registered (`move_to` places them).
    pub fn new(
        registrar: Arc<dyn IoEventRegistrar>,
        queues: Vec<(u64, Arc<EventFd>, Option<EventFd>)>,
        mode: Mode,
    ) -> Self {
        Doorbells {
            registrar,
            base: 0,
            mode,
            queues,
        }
    }

    /// The fd that takes queue `q`'s doorbell in `mode`: the device's in passthrough if it
    /// has one (else the VMM relays).
    fn target(&self, q: usize, mode: Mode) -> &EventFd {
        let (_, vmm, dev) = &self.queues[q];
        match (mode, dev) {
            (Mode::Passthrough, Some(d)) => d,
            _ => vmm,
        }
    }

    fn register(&self, base: u64, mode: Mode) -> std::io::Result<()> {
        if base == 0 {
            return Ok(());
        }
        for (q, (off, _, _)) in self.queues.iter().enumerate() {
            self.registrar.register(self.target(q, mode), base + off)?;
        }
        Ok(())
    }

    fn unregister(&self) {
        if self.base == 0 {
            return;
        }
        for (q, (off, _, _)) in self.queues.iter().enumerate() {
            let _ = self
                .registrar
                .unregister(self.target(q, self.mode), self.base + off);
        }
    }

    /// BAR 0 moved (or was first placed) at `base`.
    pub fn move_to(&mut self, base: u64) -> std::io::Result<()> {
        self.unregister();
        self.base = base;
        self.register(base, self.mode)
    }

    /// Points every doorbell at `mode`'s target. A doorbell rung in between lands on one fd or
    /// the other; the caller kicks the device afterwards, so none is lost.
    pub fn switch(&mut self, mode: Mode) -> std::io::Result<()> {
        if mode == self.mode {
            return Ok(());
        }
        self.unregister();
        let r = self.register(self.base, mode);
        self.mode = mode;
        r
    }

    /// The VMM's own doorbell eventfds, by queue (the snoop thread waits on them).
    pub fn vmm_fds(&self) -> Vec<Arc<EventFd>> {
        self.queues.iter().map(|(_, f, _)| f.clone()).collect()
    }

    /// The VMM's eventfd for a doorbell at BAR 0 offset `off` (a doorbell write that trapped).
    pub fn vmm_fd_at(&self, off: u64) -> Option<&Arc<EventFd>> {
        self.queues
            .iter()
            .find(|(o, _, _)| *o == off)
            .map(|(_, f, _)| f)
    }

    pub fn unregister_all(&mut self) {
        self.unregister();
        self.base = 0;
    }
}
