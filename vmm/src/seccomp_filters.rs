//! What each VMM thread may ask of the kernel (see `virtio_devices::seccomp` for the model:
//! a thread is bounded by its own filter and its creators').
//!
//! The VMM thread (the process's main thread, which runs the control loop, boots the VM,
//! reclaims on request and performs live upgrades) creates every other thread, so its filter
//! is the union of theirs plus its own work; what it leaves out is what a VMM never does
//! (start programs, trace or signal other processes, open network sockets (an Internet
//! datagram socket configures TAPs, nothing else), mount, change
//! credentials, load modules, ...). Each thread it starts narrows to its own work.

use kvm_bindings::*;
use virtio_devices::seccomp::{
    any, arg_is, ioctls, tap_setup, virtio_blk_worker, virtio_net_worker, Filters, Rules,
    SeccompError, EVENT_LOOP,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

const fn io(nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0) as u64
}
const fn ior<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, std::mem::size_of::<T>() as u32) as u64
}
const fn iow<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_WRITE, KVMIO, nr, std::mem::size_of::<T>() as u32) as u64
}
const fn iowr<T>(nr: u32) -> u64 {
    ioctl_expr(
        _IOC_READ | _IOC_WRITE,
        KVMIO,
        nr,
        std::mem::size_of::<T>() as u32,
    ) as u64
}

// /dev/kvm and the VM.
const KVM_GET_API_VERSION: u64 = io(0x00);
const KVM_CREATE_VM: u64 = io(0x01);
const KVM_GET_MSR_INDEX_LIST: u64 = iowr::<kvm_msr_list>(0x02);
const KVM_CHECK_EXTENSION: u64 = io(0x03);
const KVM_GET_VCPU_MMAP_SIZE: u64 = io(0x04);
const KVM_GET_SUPPORTED_CPUID: u64 = iowr::<kvm_cpuid2>(0x05);
const KVM_CREATE_VCPU: u64 = io(0x41);
const KVM_SET_USER_MEMORY_REGION: u64 = iow::<kvm_userspace_memory_region>(0x46);
const KVM_SET_TSS_ADDR: u64 = io(0x47);
const KVM_SET_IDENTITY_MAP_ADDR: u64 = iow::<u64>(0x48);
const KVM_CREATE_IRQCHIP: u64 = io(0x60);
const KVM_GET_IRQCHIP: u64 = iowr::<kvm_irqchip>(0x62);
const KVM_SET_IRQCHIP: u64 = ior::<kvm_irqchip>(0x63);
const KVM_SET_GSI_ROUTING: u64 = iow::<kvm_irq_routing>(0x6a);
const KVM_IRQFD: u64 = iow::<kvm_irqfd>(0x76);
const KVM_CREATE_PIT2: u64 = iow::<kvm_pit_config>(0x77);
const KVM_IOEVENTFD: u64 = iow::<kvm_ioeventfd>(0x79);
const KVM_SET_CLOCK: u64 = iow::<kvm_clock_data>(0x7b);
const KVM_GET_CLOCK: u64 = ior::<kvm_clock_data>(0x7c);
const KVM_SIGNAL_MSI: u64 = iow::<kvm_msi>(0xa5);
const KVM_ENABLE_CAP: u64 = iow::<kvm_enable_cap>(0xa3);
// A vCPU.
const KVM_RUN: u64 = io(0x80);
const KVM_GET_REGS: u64 = ior::<kvm_regs>(0x81);
const KVM_SET_REGS: u64 = iow::<kvm_regs>(0x82);
const KVM_GET_SREGS: u64 = ior::<kvm_sregs>(0x83);
const KVM_SET_SREGS: u64 = iow::<kvm_sregs>(0x84);
const KVM_GET_MSRS: u64 = iowr::<kvm_msrs>(0x88);
const KVM_SET_MSRS: u64 = iow::<kvm_msrs>(0x89);
const KVM_GET_FPU: u64 = ior::<kvm_fpu>(0x8c);
const KVM_SET_FPU: u64 = iow::<kvm_fpu>(0x8d);
const KVM_GET_LAPIC: u64 = ior::<kvm_lapic_state>(0x8e);
const KVM_SET_LAPIC: u64 = iow::<kvm_lapic_state>(0x8f);
const KVM_SET_CPUID2: u64 = iow::<kvm_cpuid2>(0x90);
const KVM_GET_CPUID2: u64 = iowr::<kvm_cpuid2>(0x91);
const KVM_GET_MP_STATE: u64 = ior::<kvm_mp_state>(0x98);
const KVM_SET_MP_STATE: u64 = iow::<kvm_mp_state>(0x99);
const KVM_GET_VCPU_EVENTS: u64 = ior::<kvm_vcpu_events>(0x9f);
const KVM_SET_VCPU_EVENTS: u64 = iow::<kvm_vcpu_events>(0xa0);
const KVM_GET_DEBUGREGS: u64 = ior::<kvm_debugregs>(0xa1);
const KVM_SET_DEBUGREGS: u64 = iow::<kvm_debugregs>(0xa2);
const KVM_SET_TSC_KHZ: u64 = io(0xa2);
const KVM_GET_TSC_KHZ: u64 = io(0xa3);
const KVM_GET_XSAVE: u64 = ior::<kvm_xsave>(0xa4);
const KVM_SET_XSAVE: u64 = iow::<kvm_xsave>(0xa5);
const KVM_GET_XCRS: u64 = ior::<kvm_xcrs>(0xa6);
const KVM_SET_XCRS: u64 = iow::<kvm_xcrs>(0xa7);

// userfaultfd (linux/userfaultfd.h).
const USERFAULTFD_IOC_NEW: u64 = 0xaa00;
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
const UFFDIO_WAKE: u64 = 0x8010_aa02;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
const UFFDIO_CONTINUE: u64 = 0xc020_aa07;

/// What a vCPU does to its own fd: run, and its state read and written (boot, live upgrade).
const VCPU_IOCTLS: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_SET_REGS,
    KVM_GET_SREGS,
    KVM_SET_SREGS,
    KVM_GET_MSRS,
    KVM_SET_MSRS,
    KVM_GET_FPU,
    KVM_SET_FPU,
    KVM_GET_LAPIC,
    KVM_SET_LAPIC,
    KVM_SET_CPUID2,
    KVM_GET_CPUID2,
    KVM_GET_MP_STATE,
    KVM_SET_MP_STATE,
    KVM_GET_VCPU_EVENTS,
    KVM_SET_VCPU_EVENTS,
    KVM_GET_DEBUGREGS,
    KVM_SET_DEBUGREGS,
    KVM_SET_TSC_KHZ,
    KVM_GET_TSC_KHZ,
    KVM_GET_XSAVE,
    KVM_SET_XSAVE,
    KVM_GET_XCRS,
    KVM_SET_XCRS,
];

/// What device emulation does to the VM on a guest's access (a BAR moved, an MSI-X vector
/// programmed or fired, a device activated).
const DEVICE_VM_IOCTLS: &[u64] = &[
    KVM_IOEVENTFD,
    KVM_IRQFD,
    KVM_SET_GSI_ROUTING,
    KVM_SIGNAL_MSI,
    KVM_SET_USER_MEMORY_REGION,
];

/// Building and tearing down a VM.
const VM_IOCTLS: &[u64] = &[
    KVM_GET_API_VERSION,
    KVM_CREATE_VM,
    KVM_GET_MSR_INDEX_LIST,
    KVM_CHECK_EXTENSION,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_GET_SUPPORTED_CPUID,
    KVM_CREATE_VCPU,
    KVM_SET_TSS_ADDR,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_CREATE_IRQCHIP,
    KVM_GET_IRQCHIP,
    KVM_SET_IRQCHIP,
    KVM_CREATE_PIT2,
    KVM_SET_CLOCK,
    KVM_GET_CLOCK,
    KVM_ENABLE_CAP,
];

/// Resolving faults on guest RAM.
const UFFD_FAULT_IOCTLS: &[u64] = &[UFFDIO_WAKE, UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_CONTINUE];

/// Setting userfaultfd up on guest RAM.
const UFFD_SETUP_IOCTLS: &[u64] = &[
    USERFAULTFD_IOC_NEW,
    UFFDIO_API,
    UFFDIO_REGISTER,
    UFFDIO_UNREGISTER,
];

/// A vfio-user device's socket and the descriptors that travel on it (DMA maps, eventfds).
fn vfio_user() -> Rules {
    any(&[
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_eventfd2,
    ])
}

/// The filter of every kind of VMM thread, for `virtio_devices::seccomp::init`.
pub fn filters() -> Result<Filters, SeccompError> {
    let mut f = Filters::new();
    f.insert("api-forward", Vec::new());
    f.insert("http-server", http_server());
    f.insert("http-conn", http_connection());
    f.insert("vcpu", vcpu()?);
    f.insert("uffd", uffd()?);
    f.insert("reclaim", reclaim()?);
    f.insert("snoop", snoop()?);
    f.insert("pri", page_requests()?);
    f.insert("monitor", Vec::new());
    f.insert("virtio-blk", virtio_blk_worker());
    f.insert("virtio-net", virtio_net_worker());
    // The VMM thread creates all the others.
    let mut vmm = vmm_thread()?;
    for rules in f.values() {
        vmm.extend(rules.iter().cloned());
    }
    f.insert("vmm", vmm);
    Ok(f)
}

/// The VMM thread's own work: building the VM (files, KVM, memory, sockets), reclaim passes
/// asked for on the API, live upgrades.
fn vmm_thread() -> Result<Rules, SeccompError> {
    let name = "vmm";
    let mut r = any(&[
        libc::SYS_accept4,
        libc::SYS_bind,
        libc::SYS_connect,
        libc::SYS_listen,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_shutdown,
        libc::SYS_openat,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_statx,
        libc::SYS_lseek,
        libc::SYS_access,
        libc::SYS_readlink,
        libc::SYS_getdents64,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_memfd_create,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
        libc::SYS_umask,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_pipe2,
        libc::SYS_prlimit64,
        libc::SYS_rt_sigaction,
        // Kicking vCPU threads out of KVM_RUN.
        libc::SYS_tgkill,
        libc::SYS_userfaultfd,
        libc::SYS_uname,
        libc::SYS_getcwd,
    ]);
    r.extend(any(EVENT_LOOP));
    // Unix sockets only: the API, vfio-user devices, the live-upgrade channel.
    r.push((libc::SYS_socket, arg_is(name, 0, &[libc::AF_UNIX as u64])?));
    r.push((
        libc::SYS_socketpair,
        arg_is(name, 0, &[libc::AF_UNIX as u64])?,
    ));
    let all: Vec<u64> = [
        VM_IOCTLS,
        VCPU_IOCTLS,
        DEVICE_VM_IOCTLS,
        UFFD_SETUP_IOCTLS,
        UFFD_FAULT_IOCTLS,
    ]
    .concat();
    r.extend(ioctls(name, &all)?);
    r.extend(vfio_user());
    // The TAPs of emulated virtio-net devices.
    r.extend(tap_setup(name)?);
    Ok(r)
}

/// A vCPU: running the guest, and emulating what it touches, which can start a device's
/// worker (a virtio-blk or virtio-net queue thread, created on this one).
fn vcpu() -> Result<Rules, SeccompError> {
    let mut r = ioctls("vcpu", &[VCPU_IOCTLS, DEVICE_VM_IOCTLS].concat())?;
    r.extend(vfio_user());
    r.extend(virtio_blk_worker());
    r.extend(virtio_net_worker());
    Ok(r)
}

/// Bringing a page back from the page store into guest RAM (and freeing its store space).
fn restore(name: &'static str) -> Result<Rules, SeccompError> {
    let mut r = ioctls(name, UFFD_FAULT_IOCTLS)?;
    r.extend(any(&[
        libc::SYS_pread64,
        libc::SYS_preadv,
        libc::SYS_lseek,
        libc::SYS_fallocate,
    ]));
    Ok(r)
}

/// The userfaultfd thread: resolving faults from the page store.
fn uffd() -> Result<Rules, SeccompError> {
    restore("uffd")
}

/// The reclaim policy thread: passes write pages to the store and drop them from RAM (and
/// have devices unmap them).
fn reclaim() -> Result<Rules, SeccompError> {
    let mut r = restore("reclaim")?;
    r.extend(any(&[
        libc::SYS_pwrite64,
        libc::SYS_pwritev,
        libc::SYS_fallocate,
        libc::SYS_ftruncate,
    ]));
    r.extend(vfio_user());
    Ok(r)
}

/// A VIO device's snoop thread: doorbells and timers, faulting pages in, DMA maps, and
/// elastic switches (which move the guest's doorbells between KVM and the device).
fn snoop() -> Result<Rules, SeccompError> {
    let mut r = restore("snoop")?;
    r.extend(ioctls("snoop", DEVICE_VM_IOCTLS)?);
    r.extend(any(EVENT_LOOP));
    r.extend(vfio_user());
    Ok(r)
}

/// A PRI device's page-request thread: reading requests, faulting pages in, answering.
fn page_requests() -> Result<Rules, SeccompError> {
    let mut r = restore("pri")?;
    r.extend(vfio_user());
    Ok(r)
}

/// The API server's accepting thread, which starts a thread per connection.
fn http_server() -> Rules {
    let mut r = any(&[libc::SYS_accept4]);
    r.extend(http_connection());
    r
}

/// An API connection: its socket, checking a `vm.create` body (whether the files it names
/// exist), and handing requests to the VMM thread.
fn http_connection() -> Rules {
    any(&[
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_shutdown,
        libc::SYS_statx,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_access,
        libc::SYS_readlink,
        libc::SYS_getcwd,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::SeccompAction;
    use virtio_devices::seccomp::program;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // From linux/kvm.h as the kernel computes them.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_CREATE_VM, 0xae01);
        assert_eq!(KVM_SET_REGS, 0x4090_ae82);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_GET_SUPPORTED_CPUID, 0xc008_ae05);
        assert_eq!(KVM_GET_XSAVE, 0x9000_aea4);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(UFFDIO_COPY, u64::from(userfaultfd_sys::UFFDIO_COPY));
        assert_eq!(UFFDIO_CONTINUE, u64::from(userfaultfd_sys::UFFDIO_CONTINUE));
        assert_eq!(UFFDIO_API, u64::from(userfaultfd_sys::UFFDIO_API));
    }

    #[test]
    fn every_filter_builds() {
        let f = filters().unwrap();
        for (name, rules) in f {
            program(name, rules, SeccompAction::Trap).unwrap();
        }
    }
}
