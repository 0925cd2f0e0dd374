//! KVM interrupt routing: legacy IOAPIC/PIC pins plus one MSI route and irqfd per device vector.
//! KVM_SET_GSI_ROUTING replaces the whole table, so every change re-commits all routes.

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use pci::{MsiInterruptGroup, MsiMessage};
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

const IOAPIC_PINS: u32 = 24;

pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: Mutex<(BTreeMap<u32, kvm_irq_routing_entry>, u32)>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> io::Result<Arc<Self>> {
        let r = Arc::new(GsiRouter {
            vm,
            msi: Mutex::new((BTreeMap::new(), IOAPIC_PINS)),
        });
        r.commit(&r.msi.lock().unwrap().0)?;
        Ok(r)
    }

    fn commit(&self, msi: &BTreeMap<u32, kvm_irq_routing_entry>) -> io::Result<()> {
        let mut entries = Vec::new();
        for pin in 0..IOAPIC_PINS {
            if pin < 8 {
                entries.push(irqchip_entry(pin, KVM_IRQCHIP_PIC_MASTER, pin));
            } else if pin < 16 && pin != 2 {
                entries.push(irqchip_entry(pin, KVM_IRQCHIP_PIC_SLAVE, pin - 8));
            }
            entries.push(irqchip_entry(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        entries.extend(msi.values().copied());
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        self.vm.set_gsi_routing(&routing).map_err(io::Error::from)
    }

    fn allocate(&self, n: u32) -> Vec<u32> {
        let mut g = self.msi.lock().unwrap();
        let start = g.1;
        g.1 += n;
        (start..start + n).collect()
    }

    /// Routes `gsi` to `msg`.
    fn set_msi(&self, gsi: u32, msg: MsiMessage) -> io::Result<()> {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = msg.addr_lo;
        e.u.msi.address_hi = msg.addr_hi;
        e.u.msi.data = msg.data;
        let mut g = self.msi.lock().unwrap();
        if g.0
            .get(&gsi)
            .is_some_and(|old| old.type_ == e.type_ && unsafe_msi_eq(old, &e))
        {
            return Ok(());
        }
        g.0.insert(gsi, e);
        self.commit(&g.0)
    }
}

fn unsafe_msi_eq(a: &kvm_irq_routing_entry, b: &kvm_irq_routing_entry) -> bool {
    // SAFETY: both entries are of type KVM_IRQ_ROUTING_MSI, whose union member is `msi`.
    let (x, y) = unsafe { (a.u.msi, b.u.msi) };
    x.address_lo == y.address_lo && x.address_hi == y.address_hi && x.data == y.data
}

/// A device's MSI-X vectors: each a GSI with an MSI route and an irqfd.
///
/// A passthrough device writes its irqfds itself, so masking cannot be left to the device
/// model: a masked vector's irqfd is deassigned from KVM, and what the device signals meanwhile
/// stays counted in the eventfd. Unmasking routes the vector first and then reassigns the irqfd;
/// KVM injects at assignment if the eventfd is already readable, which is the pending bit's
/// delivery. (Dropping the route instead would lose every interrupt raised while masked.)
pub struct KvmMsiGroup {
    router: Arc<GsiRouter>,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
    assigned: Mutex<Vec<bool>>,
    /// Vectors taken off KVM by `detach`, for `reattach`.
    detached: Mutex<Vec<usize>>,
}

impl KvmMsiGroup {
    pub fn new(router: Arc<GsiRouter>, vectors: u16) -> io::Result<Self> {
        let irqfds = (0..vectors)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self::with_eventfds(router, irqfds))
    }

    /// Vectors delivered through `irqfds`, eventfds a device already signals (a live upgrade:
    /// the device keeps the ones it was given).
    pub fn with_eventfds(router: Arc<GsiRouter>, irqfds: Vec<EventFd>) -> Self {
        let gsis = router.allocate(irqfds.len() as u32);
        KvmMsiGroup {
            router,
            assigned: Mutex::new(vec![false; gsis.len()]),
            detached: Mutex::new(Vec::new()),
            gsis,
            irqfds,
        }
    }

    pub fn eventfds(&self) -> &[EventFd] {
        &self.irqfds
    }

    /// Takes every vector's irqfd off KVM: what the device signals from now on stays counted
    /// in the eventfd (and is injected wherever it is assigned next), so the interrupt
    /// controllers' state can be saved whole.
    pub fn detach(&self) -> io::Result<()> {
        let mut assigned = self.assigned.lock().unwrap();
        let mut detached = self.detached.lock().unwrap();
        for (i, a) in assigned.iter_mut().enumerate() {
            if *a {
                self.router
                    .vm
                    .unregister_irqfd(&self.irqfds[i], self.gsis[i])
                    .map_err(io::Error::from)?;
                *a = false;
                detached.push(i);
            }
        }
        Ok(())
    }

    /// Undoes `detach`; KVM injects what was signalled meanwhile.
    ///
    /// An eventfd is an irqfd of one VM at a time here (KVM waits on it exclusively): while a
    /// VM that took it over is being torn down (a receiver that failed or died), assigning it
    /// fails with EBUSY until the teardown is done, which it is within milliseconds.
    pub fn reattach(&self) -> io::Result<()> {
        let mut assigned = self.assigned.lock().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        for i in std::mem::take(&mut *self.detached.lock().unwrap()) {
            loop {
                match self.router.vm.register_irqfd(&self.irqfds[i], self.gsis[i]) {
                    Ok(()) => break,
                    Err(e) if e.errno() == libc::EBUSY && std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            assigned[i] = true;
        }
        Ok(())
    }
}

impl MsiInterruptGroup for KvmMsiGroup {
    fn update(&self, index: u16, msg: MsiMessage, masked: bool) -> io::Result<()> {
        let i = index as usize;
        let (Some(&gsi), Some(fd)) = (self.gsis.get(i), self.irqfds.get(i)) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        let mut assigned = self.assigned.lock().unwrap();
        if masked {
            if assigned[i] {
                self.router
                    .vm
                    .unregister_irqfd(fd, gsi)
                    .map_err(io::Error::from)?;
                assigned[i] = false;
            }
            return Ok(());
        }
        self.router.set_msi(gsi, msg)?;
        if !assigned[i] {
            self.router
                .vm
                .register_irqfd(fd, gsi)
                .map_err(io::Error::from)?;
            assigned[i] = true;
        }
        Ok(())
    }

    fn trigger(&self, index: u16) -> io::Result<()> {
        self.irqfds
            .get(index as usize)
            .ok_or(io::ErrorKind::InvalidInput)?
            .write(1)
    }

    fn notifier(&self, index: u16) -> Option<EventFd> {
        self.irqfds.get(index as usize)?.try_clone().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::{Kvm, VcpuFd};
    use std::time::{Duration, Instant};

    /// A fixed, edge-triggered MSI to APIC id 0.
    fn msi(vector: u32) -> MsiMessage {
        MsiMessage {
            addr_lo: 0xfee0_0000,
            addr_hi: 0,
            data: vector,
        }
    }

    /// Waits (irqfd injection runs in a kernel worker) for `vector`'s bit in the local APIC's
    /// interrupt request register.
    fn requested(vcpu: &VcpuFd, vector: u32, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let lapic = vcpu.get_lapic().unwrap();
            let reg = 0x200 + 0x10 * (vector as usize / 32);
            let word = u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[reg + i] as u8));
            if word & (1 << (vector % 32)) != 0 {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What a passthrough device signals while its vector is masked is delivered at unmask,
    /// not lost; and nothing is delivered while masked.
    #[test]
    fn a_vector_signalled_while_masked_is_delivered_at_unmask() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("*** SKIPPED a_vector_signalled_while_masked_is_delivered_at_unmask: /dev/kvm is not present ***");
            return;
        }
        let kvm = Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        // Software-enable the local APIC (spurious vector register), as a guest does: a
        // disabled one accepts no fixed interrupts.
        let mut lapic = vcpu.get_lapic().unwrap();
        lapic.regs[0xf0] = -1; // 0xff
        lapic.regs[0xf1] = 0x01;
        vcpu.set_lapic(&lapic).unwrap();
        let group = KvmMsiGroup::new(GsiRouter::new(vm.clone()).unwrap(), 2).unwrap();
        // The device's own handle on the vectors, as vdpu holds them.
        let device: Vec<EventFd> = (0..2).map(|v| group.notifier(v).unwrap()).collect();

        group.update(0, msi(0x41), false).unwrap();
        device[0].write(1).unwrap();
        assert!(
            requested(&vcpu, 0x41, Duration::from_secs(5)),
            "unmasked: delivered"
        );

        group.update(1, msi(0x52), false).unwrap();
        group.update(1, msi(0x52), true).unwrap();
        device[1].write(1).unwrap();
        assert!(
            !requested(&vcpu, 0x52, Duration::from_millis(200)),
            "masked: held back"
        );
        group.update(1, msi(0x52), false).unwrap();
        assert!(
            requested(&vcpu, 0x52, Duration::from_secs(5)),
            "pending: delivered at unmask"
        );
    }

    /// A live upgrade: with the vectors detached, what the device signals stays in its eventfd
    /// (the interrupt controllers can be saved whole); a group made from the same eventfds on
    /// another VM delivers it there once routed.
    #[test]
    fn detached_vectors_deliver_where_they_are_attached_next() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("*** SKIPPED detached_vectors_deliver_where_they_are_attached_next: /dev/kvm is not present ***");
            return;
        }
        let kvm = Kvm::new().unwrap();
        let vm_with_vcpu = || {
            let vm = Arc::new(kvm.create_vm().unwrap());
            vm.create_irq_chip().unwrap();
            let vcpu = vm.create_vcpu(0).unwrap();
            let mut lapic = vcpu.get_lapic().unwrap();
            lapic.regs[0xf0] = -1;
            lapic.regs[0xf1] = 0x01;
            vcpu.set_lapic(&lapic).unwrap();
            (vm, vcpu)
        };
        let (old_vm, old_vcpu) = vm_with_vcpu();
        let old = KvmMsiGroup::new(GsiRouter::new(old_vm).unwrap(), 1).unwrap();
        let device = old.notifier(0).unwrap();
        old.update(0, msi(0x61), false).unwrap();
        old.detach().unwrap();
        device.write(1).unwrap();
        assert!(
            !requested(&old_vcpu, 0x61, Duration::from_millis(200)),
            "detached: not delivered"
        );
        let (new_vm, new_vcpu) = vm_with_vcpu();
        let fds = old
            .eventfds()
            .iter()
            .map(|f| f.try_clone().unwrap())
            .collect();
        let new = KvmMsiGroup::with_eventfds(GsiRouter::new(new_vm).unwrap(), fds);
        new.update(0, msi(0x61), false).unwrap();
        assert!(
            requested(&new_vcpu, 0x61, Duration::from_secs(5)),
            "delivered on the new VM"
        );
        assert!(!requested(&old_vcpu, 0x61, Duration::from_millis(50)));
        // The new VM goes away (an upgrade that failed): reattached, the old group delivers
        // again.
        drop(new);
        drop(new_vcpu);
        old.reattach().unwrap();
        device.write(1).unwrap();
        assert!(requested(&old_vcpu, 0x61, Duration::from_secs(5)));
    }
}
