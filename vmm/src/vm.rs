//! One VM: KVM VM fd, guest RAM, devices, vCPUs; booted from a PVH ELF.

use crate::config::VmConfig;
use crate::cpu::{self, CpuError, VcpuSet};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::devices::ExitNotifier;
use crate::layout;
use crate::memory_manager::{MemoryError, MemoryManager};
use kvm_ioctls::{Kvm, VmFd};
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader};
use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("Failed to open /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("Failed to create the KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("Failed to set up the KVM VM: {0}")]
    SetupVm(&'static str, #[source] kvm_ioctls::Error),
    #[error("Guest memory")]
    Memory(#[from] MemoryError),
    #[error("Devices")]
    Devices(#[from] DeviceError),
    #[error("vCPUs")]
    Cpu(#[from] CpuError),
    #[error("Failed to open kernel {0}")]
    OpenKernel(String, #[source] std::io::Error),
    #[error("Failed to load the kernel")]
    LoadKernel(#[source] linux_loader::loader::Error),
    #[error("Kernel has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry,
    #[error("Invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("Failed to open initramfs {0}")]
    Initramfs(String, #[source] std::io::Error),
    #[error("Failed to load initramfs {0}")]
    LoadInitramfs(String, #[source] vm_memory::GuestMemoryError),
    #[error("The initramfs ({0} bytes) does not fit in low RAM above the kernel")]
    InitramfsTooLarge(u64),
    #[error("Failed to write the ACPI tables")]
    Acpi(#[source] vm_memory::GuestMemoryError),
    #[error("Failed to write boot information")]
    BootParams(#[source] linux_loader::configurator::Error),
    #[error("Live upgrade")]
    Handover(#[source] Box<handover::HandoverError>),
}

pub struct Vm {
    config: VmConfig,
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    memory: MemoryManager,
    devices: DeviceManager,
    vcpus: Option<VcpuSet>,
    /// vCPUs off their threads: frozen for a live upgrade, or adopted and not yet started.
    parked: Option<Vec<(u8, kvm_ioctls::VcpuFd)>>,
    exit: ExitNotifier,
}

#[path = "vm_handover.rs"]
pub mod handover;

impl Vm {
    pub fn new(config: &VmConfig, start: Instant, exit: ExitNotifier) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let vm_fd = Arc::new(kvm.create_vm().map_err(VmError::CreateVm)?);
        Self::setup_vm(&vm_fd)?;
        let mut memory = MemoryManager::new(config.memory.size, config.memory.shared)?;
        if config.memory.reclaim {
            memory.enable_reclaim(config.reclaim.clone())?;
        }
        memory.register_with_kvm(&vm_fd)?;
        let devices =
            DeviceManager::new(vm_fd.clone(), config, &memory, exit.clone(), start, None)?;
        Ok(Vm {
            config: config.clone(),
            kvm,
            vm_fd,
            memory,
            devices,
            vcpus: None,
            parked: None,
            exit,
        })
    }

    fn setup_vm(vm_fd: &VmFd) -> Result<(), VmError> {
        vm_fd
            .set_tss_address(layout::KVM_TSS_START as usize)
            .map_err(|e| VmError::SetupVm("TSS address", e))?;
        vm_fd
            .set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
            .map_err(|e| VmError::SetupVm("identity map", e))?;
        vm_fd
            .create_irq_chip()
            .map_err(|e| VmError::SetupVm("irqchip", e))
    }

    fn load_kernel(&self) -> Result<u64, VmError> {
        let path = &self.config.payload.kernel;
        let mut f =
            File::open(path).map_err(|e| VmError::OpenKernel(path.display().to_string(), e))?;
        let mem = self.memory.memory();
        let r = Elf::load(
            mem.as_ref(),
            None,
            &mut f,
            Some(GuestAddress(layout::HIGH_RAM_START)),
        )
        .map_err(VmError::LoadKernel)?;
        let PvhBootCapability::PvhEntryPresent(entry) = r.pvh_boot_cap else {
            return Err(VmError::NoPvhEntry);
        };
        let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(VmError::Cmdline)?;
        if !self.config.payload.cmdline.is_empty() {
            cmdline
                .insert_str(&self.config.payload.cmdline)
                .map_err(VmError::Cmdline)?;
        }
        load_cmdline(mem.as_ref(), GuestAddress(layout::CMDLINE_START), &cmdline)
            .map_err(VmError::LoadKernel)?;
        let initramfs = self.load_initramfs(r.kernel_end)?;
        let rsdp = crate::acpi::create_acpi_tables(
            mem.as_ref(),
            self.config.cpus.boot_vcpus,
            self.config.memory.size,
        )
        .map_err(VmError::Acpi)?;
        self.write_start_info(initramfs, rsdp)?;
        Ok(entry.0)
    }

    /// Loads the initramfs at the top of low RAM (as Cloud Hypervisor does), above the kernel.
    fn load_initramfs(&self, kernel_end: u64) -> Result<Option<hvm_modlist_entry>, VmError> {
        let Some(path) = &self.config.payload.initramfs else {
            return Ok(None);
        };
        let err = |e| VmError::Initramfs(path.display().to_string(), e);
        let mut f = File::open(path).map_err(err)?;
        let size = f.metadata().map_err(err)?.len();
        let low_end = self
            .config
            .memory
            .size
            .min(layout::MEM_32BIT_RESERVED_START);
        let at = low_end
            .checked_sub(size)
            .map(|a| a & !(vio::spec::PAGE_SIZE - 1))
            .filter(|&a| a >= kernel_end)
            .ok_or(VmError::InitramfsTooLarge(size))?;
        self.memory
            .memory()
            .read_exact_volatile_from(GuestAddress(at), &mut f, size as usize)
            .map_err(|e| VmError::LoadInitramfs(path.display().to_string(), e))?;
        Ok(Some(hvm_modlist_entry {
            paddr: at,
            size,
            ..Default::default()
        }))
    }

    fn write_start_info(
        &self,
        initramfs: Option<hvm_modlist_entry>,
        rsdp: GuestAddress,
    ) -> Result<(), VmError> {
        let mut memmap = vec![hvm_memmap_table_entry {
            addr: 0,
            size: layout::EBDA_START,
            type_: E820_RAM,
            reserved: 0,
        }];
        for r in self.memory.regions() {
            let (addr, size) = if r.guest_addr == 0 {
                (
                    layout::HIGH_RAM_START,
                    r.size.saturating_sub(layout::HIGH_RAM_START),
                )
            } else {
                (r.guest_addr, r.size)
            };
            memmap.push(hvm_memmap_table_entry {
                addr,
                size,
                type_: E820_RAM,
                reserved: 0,
            });
        }
        memmap.push(hvm_memmap_table_entry {
            addr: layout::PCI_MMCONFIG_START,
            size: layout::PCI_MMCONFIG_SIZE,
            type_: E820_RESERVED,
            reserved: 0,
        });
        let modules: Vec<hvm_modlist_entry> = initramfs.into_iter().collect();
        let start_info = hvm_start_info {
            magic: XEN_HVM_START_MAGIC_VALUE,
            version: 1,
            cmdline_paddr: layout::CMDLINE_START,
            memmap_paddr: layout::MEMMAP_START,
            memmap_entries: memmap.len() as u32,
            nr_modules: modules.len() as u32,
            modlist_paddr: if modules.is_empty() {
                0
            } else {
                layout::MODLIST_START
            },
            rsdp_paddr: rsdp.0,
            ..Default::default()
        };
        let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_INFO_START));
        params.set_sections(&memmap, GuestAddress(layout::MEMMAP_START));
        if !modules.is_empty() {
            params.set_modules(&modules, GuestAddress(layout::MODLIST_START));
        }
        PvhBootConfigurator::write_bootparams(&params, self.memory.memory().as_ref())
            .map_err(VmError::BootParams)
    }

    pub fn boot(&mut self) -> Result<(), VmError> {
        let entry = self.load_kernel()?;
        cpu::write_boot_gdt(&self.memory.memory())?;
        cpu::register_kick_signal()?;
        let n = self.config.cpus.boot_vcpus;
        let mut vcpus = Vec::new();
        for id in 0..n {
            let fd = cpu::create_vcpu(&self.vm_fd, id)?;
            let tsc_khz = fd.get_tsc_khz().ok();
            let cpuid = cpu::guest_cpuid(&self.kvm, id, n, tsc_khz)?;
            cpu::configure_vcpu(&fd, id, &cpuid, (id == 0).then_some(entry))?;
            vcpus.push((id, fd));
        }
        self.vcpus = Some(VcpuSet::start(
            vcpus,
            self.devices.pio_bus(),
            self.devices.mmio_bus(),
            self.exit.clone(),
        )?);
        log::info!(
            "VM booted: {} vCPU(s), {} MiB, entry {entry:#x}",
            n,
            self.config.memory.size >> 20
        );
        Ok(())
    }

    /// Stops the vCPUs, then the device workers; nothing runs until `resume`.
    pub fn pause(&self) {
        if let Some(v) = &self.vcpus {
            v.pause();
        }
        self.devices.pause();
    }

    pub fn resume(&self) {
        self.devices.resume();
        if let Some(v) = &self.vcpus {
            v.resume();
        }
    }

    pub fn shutdown(&mut self) {
        if let Some(mut v) = self.vcpus.take() {
            v.stop();
        }
        self.devices.reset();
    }

    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        let mut c = self.devices.counters();
        if let Some(r) = self.memory.reclaimer() {
            c.insert("memory".into(), r.counters());
        }
        c
    }

    pub fn reclaim(
        &self,
        bytes: u64,
        unsafe_unmap_dma: bool,
        dma_only: bool,
    ) -> Option<crate::reclaim::ReclaimReport> {
        self.memory.reclaimer().map(|r| {
            if dma_only {
                r.reclaim_dma_mapped(bytes)
            } else {
                r.reclaim(bytes, unsafe_unmap_dma)
            }
        })
    }

    pub fn dma_unmap(&self, id: &str, iova: u64, size: u64) -> Result<(), DeviceError> {
        self.devices.dma_unmap(id, iova, size)
    }

    pub fn vio_mode(
        &self,
        id: &str,
        mode: crate::config::VioMode,
    ) -> Result<Option<vfio::vio::SwitchReport>, DeviceError> {
        self.devices.vio_mode(id, mode)
    }

    pub fn vio_info(&self) -> Vec<vfio::vio::VioInfo> {
        self.devices.vio_info()
    }

    pub fn memory_manager(&self) -> &MemoryManager {
        &self.memory
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
