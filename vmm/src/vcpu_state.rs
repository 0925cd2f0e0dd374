//! What KVM holds of a vCPU and of the VM's in-kernel devices, saved and restored for a live
//! upgrade: everything KVM exposes, so the new process's VM resumes at the same instruction.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("Failed to read {0} of vCPU {1}")]
    Get(&'static str, u8, #[source] kvm_ioctls::Error),
    #[error("Failed to restore {0} of vCPU {1}")]
    Set(&'static str, u8, #[source] kvm_ioctls::Error),
    #[error("Failed to read the VM's {0}")]
    GetVm(&'static str, #[source] kvm_ioctls::Error),
    #[error("Failed to restore the VM's {0}")]
    SetVm(&'static str, #[source] kvm_ioctls::Error),
    #[error("Invalid saved {0}")]
    Invalid(&'static str),
    #[error("vCPU {0}: KVM refused MSR {1:#x}")]
    MsrRefused(u8, u32),
}

/// One vCPU's state. The floating-point state is the XSAVE area where KVM offers it (it holds
/// the legacy FPU state too), else the legacy FPU state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Option<kvm_xsave>,
    pub fpu: Option<FpuState>,
    pub xcrs: Option<kvm_xcrs>,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<(u32, u64)>,
    pub debug_regs: kvm_debugregs,
    pub events: kvm_vcpu_events,
}

/// `kvm_fpu` has no serde support; its fields are plain arrays.
#[derive(Clone, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: Vec<u8>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<u8>,
    pub mxcsr: u32,
}

impl FpuState {
    fn from_kvm(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.iter().flatten().copied().collect(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.iter().flatten().copied().collect(),
            mxcsr: f.mxcsr,
        }
    }

    fn to_kvm(&self) -> Result<kvm_fpu, StateError> {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        let fpr = f.fpr.as_flattened_mut();
        if self.fpr.len() != fpr.len() {
            return Err(StateError::Invalid("FPU registers"));
        }
        fpr.copy_from_slice(&self.fpr);
        let xmm = f.xmm.as_flattened_mut();
        if self.xmm.len() != xmm.len() {
            return Err(StateError::Invalid("XMM registers"));
        }
        xmm.copy_from_slice(&self.xmm);
        Ok(f)
    }
}

const MSR_IA32_TSC: u32 = 0x10;

/// KVM's MSR list from (index, value) pairs.
pub fn msrs(pairs: impl IntoIterator<Item = (u32, u64)>) -> Result<Msrs, StateError> {
    let entries: Vec<kvm_msr_entry> = pairs
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| StateError::Invalid("MSR list"))
}

/// The MSRs KVM can save for a guest (its save list, which includes those a KVM flavour such
/// as PVM adds), less those this host's KVM refuses to read.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| StateError::GetVm("MSR list", e))?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    // KVM_GET_MSRS stops at the first MSR it cannot read: drop it and go on.
    let mut start = 0;
    while start < indices.len() {
        let mut msrs = msrs(indices[start..].iter().map(|&i| (i, 0)))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| StateError::Get("MSRs", 0, e))?;
        start += n;
        if start < indices.len() {
            indices.remove(start);
        }
    }
    Ok(indices)
}

pub fn save_vcpu(vcpu: &VcpuFd, id: u8, msr_list: &[u32]) -> Result<VcpuState, StateError> {
    let get = |what| move |e| StateError::Get(what, id, e);
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(get("CPUID"))?
        .as_slice()
        .to_vec();
    let xsave = vcpu.get_xsave().ok();
    let fpu = match xsave {
        Some(_) => None,
        None => Some(FpuState::from_kvm(&vcpu.get_fpu().map_err(get("FPU"))?)),
    };
    let mut msrs = msrs(msr_list.iter().map(|&i| (i, 0)))?;
    let n = vcpu.get_msrs(&mut msrs).map_err(get("MSRs"))?;
    let msrs = msrs.as_slice()[..n]
        .iter()
        .map(|e| (e.index, e.data))
        .collect();
    Ok(VcpuState {
        id,
        cpuid,
        mp_state: vcpu.get_mp_state().map_err(get("MP state"))?,
        regs: vcpu.get_regs().map_err(get("registers"))?,
        sregs: vcpu.get_sregs().map_err(get("special registers"))?,
        xsave,
        fpu,
        xcrs: vcpu.get_xcrs().ok(),
        lapic: vcpu.get_lapic().map_err(get("LAPIC"))?,
        msrs,
        debug_regs: vcpu.get_debug_regs().map_err(get("debug registers"))?,
        events: vcpu.get_vcpu_events().map_err(get("pending events"))?,
    })
}

/// Restores `s` into a fresh vCPU, in the order KVM needs: CPUID before anything it gates,
/// special registers (EFER) before the MSRs, the LAPIC before its timer MSR, pending events
/// last.
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let id = s.id;
    let set = |what| move |e| StateError::Set(what, id, e);
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| StateError::Invalid("CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(set("CPUID"))?;
    vcpu.set_mp_state(s.mp_state).map_err(set("MP state"))?;
    vcpu.set_sregs(&s.sregs).map_err(set("special registers"))?;
    vcpu.set_regs(&s.regs).map_err(set("registers"))?;
    match (&s.xsave, &s.fpu) {
        // SAFETY: a legacy (4 KiB) XSAVE area, the size KVM_SET_XSAVE reads.
        (Some(x), _) => unsafe { vcpu.set_xsave(x) }.map_err(set("XSAVE area"))?,
        (None, Some(f)) => vcpu.set_fpu(&f.to_kvm()?).map_err(set("FPU"))?,
        (None, None) => return Err(StateError::Invalid("floating-point state")),
    }
    if let Some(x) = &s.xcrs {
        vcpu.set_xcrs(x).map_err(set("XCRs"))?;
    }
    vcpu.set_lapic(&s.lapic).map_err(set("LAPIC"))?;
    // The TSC first: a TSC deadline (and anything else kept in guest TSC units) armed before
    // the new VM's TSC is set would count from the wrong origin, and the guest's timer would
    // fire only after as long as the guest has been running.
    let (tsc, rest): (Vec<_>, Vec<_>) = s.msrs.iter().partition(|(i, _)| *i == MSR_IA32_TSC);
    for part in [tsc, rest] {
        let n = vcpu
            .set_msrs(&msrs(part.iter().copied())?)
            .map_err(set("MSRs"))?;
        if let Some(&(index, _)) = part.get(n) {
            return Err(StateError::MsrRefused(id, index));
        }
    }
    vcpu.set_debug_regs(&s.debug_regs)
        .map_err(set("debug registers"))?;
    vcpu.set_vcpu_events(&s.events)
        .map_err(set("pending events"))
}

/// The VM's in-kernel interrupt controllers and its clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    pub irqchips: Vec<kvm_irqchip>,
    pub clock: kvm_clock_data,
}

pub fn save_vm(vm: &VmFd) -> Result<VmKvmState, StateError> {
    let mut irqchips = Vec::new();
    for chip in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut c = kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)
            .map_err(|e| StateError::GetVm("interrupt controllers", e))?;
        irqchips.push(c);
    }
    let clock = vm.get_clock().map_err(|e| StateError::GetVm("clock", e))?;
    Ok(VmKvmState { irqchips, clock })
}

pub fn restore_vm(vm: &VmFd, s: &VmKvmState) -> Result<(), StateError> {
    for c in &s.irqchips {
        vm.set_irqchip(c)
            .map_err(|e| StateError::SetVm("interrupt controllers", e))?;
    }
    // Only the clock value: the flags KVM_GET_CLOCK reports are not all settable.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(|e| StateError::SetVm("clock", e))
}
