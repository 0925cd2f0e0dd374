//! vCPUs: CPUID, MSRs, LAPIC and PVH entry state, and the run loop that dispatches exits.

use crate::devices::{ExitNotifier, ExitReason};
use crate::layout;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use pci::Bus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use thiserror::Error;
use virtio_devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

#[derive(Debug, Error)]
pub enum CpuError {
    #[error("Failed to create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    #[error("Failed to read KVM's supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("Failed to configure vCPU {0}: {1}")]
    Configure(u8, &'static str, #[source] kvm_ioctls::Error),
    #[error("Failed to write the boot GDT")]
    Gdt(#[source] vm_memory::GuestMemoryError),
    #[error("Failed to start a vCPU thread")]
    Thread(#[source] std::io::Error),
    #[error("Failed to register the vCPU kick signal")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;

/// Which CPUID leaves a guest sees: KVM's supported set, with the topology, the hypervisor
/// bit and the TSC frequency leaf (0x40000010, as Cloud Hypervisor fills it) set per vCPU.
pub fn guest_cpuid(
    kvm: &Kvm,
    id: u8,
    nr_vcpus: u8,
    tsc_khz: Option<u32>,
) -> Result<CpuId, CpuError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuError::SupportedCpuid)?;
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ecx |= 1 << 31; // hypervisor present
                e.ebx = (e.ebx & 0x0000_ffff) | u32::from(id) << 24 | u32::from(nr_vcpus) << 16;
                e.edx |= 1 << 28; // HTT: the logical count in ebx is valid
            }
            0xb | 0x1f => e.edx = u32::from(id),
            0x4000_0000 => e.eax = e.eax.max(0x4000_0010),
            _ => {}
        }
    }
    if let Some(khz) = tsc_khz {
        entries.retain(|e| e.function != 0x4000_0010);
        entries.push(kvm_cpuid_entry2 {
            function: 0x4000_0010,
            eax: khz,
            ebx: 1_000_000,
            ..Default::default()
        });
    }
    CpuId::from_entries(&entries)
        .map_err(|_| CpuError::SupportedCpuid(kvm_ioctls::Error::new(libc::E2BIG)))
}

fn boot_msrs() -> Msrs {
    crate::vcpu_state::msrs([
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),          // fast strings
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, write-back default
    ])
    .expect("static MSR list fits")
}

/// The flat 32-bit GDT the PVH entry expects: null, code (0x08), data (0x10), TSS (0x18).
const BOOT_GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_0067,
];

fn segment(selector: u16, entry: u64) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let l = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            if entry & (1 << 55) != 0 {
                (l << 12) | 0xfff
            } else {
                l
            }
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

pub fn write_boot_gdt(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    for (i, e) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))
            .map_err(CpuError::Gdt)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(CpuError::Gdt)
}

/// Sets up a vCPU; the boot vCPU also gets the PVH entry state (32-bit protected mode,
/// paging off, %ebx = hvm_start_info).
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    id: u8,
    cpuid: &CpuId,
    entry: Option<u64>,
) -> Result<(), CpuError> {
    let err = |what| move |e| CpuError::Configure(id, what, e);
    vcpu.set_cpuid2(cpuid).map_err(err("CPUID"))?;
    vcpu.set_msrs(&boot_msrs()).map_err(err("MSRs"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(err("FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(err("LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, 0x7u32), (APIC_LVT1, 0x4)] {
        let mut b = [0u8; 4];
        for (k, v) in b.iter_mut().enumerate() {
            *v = lapic.regs[reg + k] as u8;
        }
        let val = (u32::from_le_bytes(b) & !0x700) | (mode << 8); // ExtINT on LINT0, NMI on LINT1
        for (k, v) in val.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + k] = *v as libc::c_char;
        }
    }
    vcpu.set_lapic(&lapic).map_err(err("LAPIC"))?;
    let Some(entry) = entry else { return Ok(()) };
    let mut sregs = vcpu.get_sregs().map_err(err("sregs"))?;
    sregs.cs = segment(0x08, BOOT_GDT[1]);
    let data = segment(0x10, BOOT_GDT[2]);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(0x18, BOOT_GDT[3]);
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cr0 = 0x1; // PE
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(err("sregs"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rbx: layout::PVH_INFO_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(err("regs"))
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

pub fn register_kick_signal() -> Result<(), CpuError> {
    register_signal_handler(SIGRTMIN(), handle_kick).map_err(CpuError::Signal)
}

#[derive(Default)]
struct PauseState {
    paused: bool,
    parked: usize,
}

/// Shared by the VMM and the vCPU threads: stop and pause requests.
#[derive(Default)]
struct Control {
    stop: AtomicBool,
    pause: Mutex<PauseState>,
    cv: Condvar,
}

impl Control {
    /// vCPU side, before each KVM_RUN: parks while paused. Returns false once stopped.
    fn checkpoint(&self) -> bool {
        let mut p = self.pause.lock().unwrap();
        if p.paused && !self.stop.load(Ordering::Acquire) {
            p.parked += 1;
            self.cv.notify_all();
            while p.paused && !self.stop.load(Ordering::Acquire) {
                p = self.cv.wait(p).unwrap();
            }
            p.parked -= 1;
        }
        !self.stop.load(Ordering::Acquire)
    }
}

/// The running vCPU threads and how to pause and stop them.
pub struct VcpuSet {
    threads: Vec<JoinHandle<(u8, VcpuFd)>>,
    control: Arc<Control>,
}

struct VcpuContext {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: ExitNotifier,
    control: Arc<Control>,
}

/// Runs `vcpu` until it stops; returns it with any I/O exit completed (its state is then
/// whole, as a save needs it).
fn run_vcpu(mut vcpu: VcpuFd, id: u8, ctx: VcpuContext) -> VcpuFd {
    let reason = loop {
        if !ctx.control.checkpoint() {
            break None;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if !ctx.pio.write(u64::from(port), data) {
                    log::debug!("vCPU {id}: unhandled out {port:#x}");
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !ctx.mmio.write(addr, data) {
                    log::debug!("vCPU {id}: unhandled MMIO write at {addr:#x}");
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::Shutdown) => {
                break Some(ExitReason::Crash(format!(
                    "vCPU {id}: triple fault (shutdown exit)"
                )))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => break Some(ExitReason::PowerOff),
                KVM_SYSTEM_EVENT_RESET => break Some(ExitReason::Reset),
                KVM_SYSTEM_EVENT_CRASH => {
                    break Some(ExitReason::Crash(format!("vCPU {id}: guest crash event")))
                }
                k => log::warn!("vCPU {id}: unknown system event {k}"),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                break Some(ExitReason::Crash(format!(
                    "vCPU {id}: entry failed, reason {reason:#x} on cpu {cpu}"
                )))
            }
            Ok(VcpuExit::InternalError) => {
                let regs = vcpu
                    .get_regs()
                    .map(|r| format!("rip {:#x}", r.rip))
                    .unwrap_or_default();
                break Some(ExitReason::Crash(format!(
                    "vCPU {id}: KVM internal error (emulation failure) {regs}"
                )));
            }
            Ok(other) => {
                break Some(ExitReason::Crash(format!(
                    "vCPU {id}: unexpected exit {other:?}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => break Some(ExitReason::Crash(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        }
    };
    if let Some(r) = reason {
        if let ExitReason::Crash(msg) = &r {
            log::error!("{msg}");
        }
        ctx.exit.notify(r);
    }
    // KVM finishes an MMIO or port read (the value into the register, RIP past the
    // instruction) at the next KVM_RUN; with immediate exit set it does only that.
    vcpu.set_kvm_immediate_exit(1);
    match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        r => log::debug!("vCPU {id}: completing the last exit: {:?}", r.err()),
    }
    vcpu.set_kvm_immediate_exit(0);
    vcpu
}

impl VcpuSet {
    pub fn start(
        vcpus: Vec<(u8, VcpuFd)>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: ExitNotifier,
    ) -> Result<Self, CpuError> {
        Self::start_as(vcpus, pio, mmio, exit, false)
    }

    /// Threads for `vcpus`; `paused`: parked before their first KVM_RUN until `resume` (a
    /// paused VM moved by a live upgrade stays paused).
    pub fn start_as(
        vcpus: Vec<(u8, VcpuFd)>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: ExitNotifier,
        paused: bool,
    ) -> Result<Self, CpuError> {
        let control = Arc::new(Control::default());
        control.pause.lock().unwrap().paused = paused;
        let mut threads = Vec::new();
        for (id, vcpu) in vcpus {
            let ctx = VcpuContext {
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: exit.clone(),
                control: control.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    virtio_devices::seccomp::narrow("vcpu");
                    (id, run_vcpu(vcpu, id, ctx))
                })
                .map_err(CpuError::Thread)?;
            threads.push(t);
        }
        Ok(VcpuSet { threads, control })
    }

    fn kick(&self) {
        for t in &self.threads {
            if !t.is_finished() {
                let _ = t.kill(SIGRTMIN());
            }
        }
    }

    /// Returns once every vCPU thread is parked (or has exited). The signal interrupts a
    /// KVM_RUN in progress; it is repeated, closing the race with the check before the ioctl.
    pub fn pause(&self) {
        self.control.pause.lock().unwrap().paused = true;
        loop {
            let live = self.threads.iter().filter(|t| !t.is_finished()).count();
            if self.control.pause.lock().unwrap().parked >= live {
                return;
            }
            self.kick();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn resume(&self) {
        self.control.pause.lock().unwrap().paused = false;
        self.control.cv.notify_all();
    }

    /// Stops every vCPU thread and joins it.
    pub fn stop(&mut self) {
        self.take();
    }

    /// Stops every vCPU thread and returns the vCPUs, their state complete (for a save, or to
    /// run them again).
    pub fn take(&mut self) -> Vec<(u8, VcpuFd)> {
        self.control.stop.store(true, Ordering::Release);
        self.resume();
        while self.threads.iter().any(|t| !t.is_finished()) {
            self.kick();
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut vcpus: Vec<_> = self
            .threads
            .drain(..)
            .filter_map(|t| t.join().ok())
            .collect();
        vcpus.sort_by_key(|(id, _)| *id);
        vcpus
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn create_vcpu(vm: &VmFd, id: u8) -> Result<VcpuFd, CpuError> {
    vm.create_vcpu(u64::from(id))
        .map_err(|e| CpuError::Create(id, e))
}
