//! ACPI tables, as Cloud Hypervisor gives them to a PVH guest: RSDP -> XSDT -> FADT (with the
//! DSDT), MADT, MCFG. A hardware-reduced platform: power-off and reset go through the
//! sleep-control register at 0x600 (`devices::AcpiShutdown`), the PM timer is at 0x608.
//! The guest finds the RSDP through `hvm_start_info.rsdp_paddr`.

use crate::layout;
use acpi_tables::aml::{self, AddressSpaceCacheable};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

const OEM_ID: [u8; 6] = *b"VIOVMM";
const OEM_TABLE_ID: [u8; 8] = *b"VIOVMM  ";
const SLEEP_CONTROL_PORT: u64 = 0x600;
const SLEEP_STATUS_PORT: u64 = 0x601;
const PM_TIMER_PORT: u64 = 0x608;

fn serialize(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT's AML: the S5 sleep state (so the guest can power off) and the PCI host bridge with
/// its resources (ECAM bus range, the config ports, the 32- and 64-bit MMIO windows).
fn dsdt(ram_size: u64) -> Vec<u8> {
    let mut body = Vec::new();
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&5u8])).to_aml_bytes(&mut body);
    let buses = (layout::PCI_MMCONFIG_SIZE >> 20) as u16;
    let mmio32_end = layout::MEM_32BIT_DEVICES_START + layout::MEM_32BIT_DEVICES_SIZE - 1;
    let mmio64 = layout::mem_64bit_devices_start(ram_size);
    let mmio64_end = mmio64 + layout::MEM_64BIT_DEVICES_SIZE - 1;
    let bus = aml::AddressSpace::new_bus_number(0u16, buses - 1);
    let cfg_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0x0cf7, None);
    let io_high = aml::AddressSpace::new_io(0x0d00u16, 0xffff, None);
    let mem32 = aml::AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout::MEM_32BIT_DEVICES_START as u32,
        mmio32_end as u32,
        None,
    );
    let mem64 = aml::AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio64,
        mmio64_end,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg_ports, &io_low, &io_high, &mem32, &mem64]);
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let names = [
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_CID".into(), &cid),
        aml::Name::new("_ADR".into(), &aml::ZERO),
        aml::Name::new("_SEG".into(), &aml::ZERO),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_BBN".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &crs),
    ];
    let pci = aml::Device::new(
        "_SB_.PCI0".into(),
        names.iter().map(|n| n as &dyn Aml).collect(),
    );
    pci.to_aml_bytes(&mut body);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let port = |addr: u64, bits: u8, size: AccessSize| {
        GAS::new(AddressSpace::SystemIo, bits, 0, size, addr)
    };
    f.reset_reg = port(SLEEP_CONTROL_PORT, 8, AccessSize::ByteAccess);
    f.reset_value = crate::devices::SLEEP_RESET;
    f.sleep_control_reg = port(SLEEP_CONTROL_PORT, 8, AccessSize::ByteAccess);
    f.sleep_status_reg = port(SLEEP_STATUS_PORT, 8, AccessSize::ByteAccess);
    f.x_pm_tmr_blk = port(PM_TIMER_PORT, 32, AccessSize::DwordAccess);
    f.pm_tmr_len = 4;
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"VIOVMM  ").into();
    serialize(&f.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(layout::APIC_START as u32),
    );
    for id in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, layout::IOAPIC_START as u32, 0));
    serialize(&m)
}

fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, 1);
    let last_bus = ((layout::PCI_MMCONFIG_SIZE >> 20) - 1) as u8;
    m.add_ecam(layout::PCI_MMCONFIG_START, 0, 0, last_bus);
    serialize(&m)
}

/// Writes the tables at `layout::RSDP_START` on; returns the RSDP's address.
pub fn create_acpi_tables<M: GuestMemory>(
    mem: &M,
    vcpus: u8,
    ram_size: u64,
) -> Result<GuestAddress, vm_memory::GuestMemoryError> {
    let rsdp_at = GuestAddress(layout::RSDP_START);
    let mut next = rsdp_at.0 + Rsdp::len() as u64;
    let mut place = |bytes: &[u8]| -> Result<u64, vm_memory::GuestMemoryError> {
        let at = next.next_multiple_of(8);
        mem.write_slice(bytes, GuestAddress(at))?;
        next = at + bytes.len() as u64;
        Ok(at)
    };
    let dsdt_at = place(&dsdt(ram_size))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(place(&fadt(dsdt_at))?);
    xsdt.add_entry(place(&madt(vcpus))?);
    xsdt.add_entry(place(&mcfg())?);
    let xsdt_at = place(&serialize(&xsdt))?;
    assert!(next <= layout::RSDP_START + layout::ACPI_TABLES_MAX_SIZE);
    mem.write_slice(&serialize(&Rsdp::new(OEM_ID, xsdt_at)), rsdp_at)?;
    Ok(rsdp_at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
    }

    /// The guest walks RSDP -> XSDT -> tables; every one is where the pointers say, with its
    /// signature, its length and a valid checksum.
    #[test]
    fn tables_link_up_with_valid_checksums() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = create_acpi_tables(&mem, 2, 512 << 20).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let table = |addr: u64| -> Vec<u8> {
            let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
            let mut t = vec![0u8; len as usize];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert!(checksum_ok(&t), "{:?}", String::from_utf8_lossy(&t[..4]));
            t
        };
        let xsdt = table(u64::from_le_bytes(r[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[..4], b"XSDT");
        let sigs: Vec<Vec<u8>> = xsdt[36..]
            .chunks(8)
            .map(|c| table(u64::from_le_bytes(c.try_into().unwrap()))[..4].to_vec())
            .collect();
        assert_eq!(sigs, [b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]);
        let fadt = table(u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
        let dsdt = table(u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(
            dsdt.windows(4).any(|w| w == b"_S5_"),
            "the guest can find S5"
        );
        let madt = table(u64::from_le_bytes(xsdt[44..52].try_into().unwrap()));
        // Two local APICs (type 0) and an I/O APIC (type 1) after the 44-byte header.
        let types: Vec<u8> = {
            let mut v = Vec::new();
            let mut at = 44;
            while at < madt.len() {
                v.push(madt[at]);
                at += madt[at + 1] as usize;
            }
            v
        };
        assert_eq!(types, [0, 0, 1]);
    }
}
