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

    /// Routes `gsi` to `msg`, or (with `None`) drops what its irqfd signals.
    fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        let mut g = self.msi.lock().unwrap();
        match msg {
            Some(msg) => {
                let mut e = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                e.u.msi.address_lo = msg.addr_lo;
                e.u.msi.address_hi = msg.addr_hi;
                e.u.msi.data = msg.data;
                if g.0
                    .get(&gsi)
                    .is_some_and(|old| old.type_ == e.type_ && unsafe_msi_eq(old, &e))
                {
                    return Ok(());
                }
                g.0.insert(gsi, e);
            }
            None => {
                if g.0.remove(&gsi).is_none() {
                    return Ok(());
                }
            }
        }
        self.commit(&g.0)
    }
}

fn unsafe_msi_eq(a: &kvm_irq_routing_entry, b: &kvm_irq_routing_entry) -> bool {
    // SAFETY: both entries are of type KVM_IRQ_ROUTING_MSI, whose union member is `msi`.
    let (x, y) = unsafe { (a.u.msi, b.u.msi) };
    x.address_lo == y.address_lo && x.address_hi == y.address_hi && x.data == y.data
}

/// A device's MSI-X vectors: each a GSI with an MSI route and an irqfd.
pub struct KvmMsiGroup {
    router: Arc<GsiRouter>,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
}

impl KvmMsiGroup {
    pub fn new(router: Arc<GsiRouter>, vectors: u16) -> io::Result<Self> {
        let gsis = router.allocate(u32::from(vectors));
        let mut irqfds = Vec::new();
        for &gsi in &gsis {
            let fd = EventFd::new(libc::EFD_NONBLOCK)?;
            router
                .vm
                .register_irqfd(&fd, gsi)
                .map_err(io::Error::from)?;
            irqfds.push(fd);
        }
        Ok(KvmMsiGroup {
            router,
            gsis,
            irqfds,
        })
    }
}

impl MsiInterruptGroup for KvmMsiGroup {
    fn update(&self, index: u16, msg: MsiMessage, masked: bool) -> io::Result<()> {
        // A passthrough device writes the irqfd itself, so a masked vector must have no route.
        let gsi = *self
            .gsis
            .get(index as usize)
            .ok_or(io::ErrorKind::InvalidInput)?;
        self.router.set_msi(gsi, (!masked).then_some(msg))
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
