//! x86_64 guest-physical layout, as Cloud Hypervisor lays it out for PVH guests.

/// Boot GDT and IDT the VMM installs for the 32-bit PVH entry.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// hvm_start_info, its memory map, and the command line.
pub const PVH_INFO_START: u64 = 0x6000;
pub const MEMMAP_START: u64 = 0x7000;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first), below 1 MiB outside the E820 RAM map, as in Cloud Hypervisor.
pub const RSDP_START: u64 = 0xa0000;
pub const ACPI_TABLES_MAX_SIZE: u64 = 0x10000;
/// The PVH module list (the initramfs entry).
pub const MODLIST_START: u64 = 0x6040;
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// RAM stops below the 32-bit device hole and continues at 4 GiB.
pub const MEM_32BIT_RESERVED_START: u64 = 0xc000_0000;
pub const RAM_64BIT_START: u64 = 1 << 32;

/// BARs of 32-bit devices.
pub const MEM_32BIT_DEVICES_START: u64 = 0xc000_0000;
pub const MEM_32BIT_DEVICES_SIZE: u64 = 0x2800_0000;
/// PCI ECAM for segment 0 (buses 0..255).
pub const PCI_MMCONFIG_START: u64 = 0xe800_0000;
pub const PCI_MMCONFIG_SIZE: u64 = 0x1000_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// 64-bit BARs live in this window above RAM.
pub const MEM_64BIT_DEVICES_SIZE: u64 = 64 << 30;

/// Guest RAM ranges for `size` bytes: below the 32-bit hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MEM_32BIT_RESERVED_START);
    let mut r = vec![(0, low)];
    if size > low {
        r.push((RAM_64BIT_START, size - low));
    }
    r
}

/// Start of the 64-bit device window: the first GiB boundary past RAM and 4 GiB.
pub fn mem_64bit_devices_start(ram_size: u64) -> u64 {
    let end = ram_ranges(ram_size).last().map(|(s, l)| s + l).unwrap_or(0);
    end.max(RAM_64BIT_START).next_multiple_of(1 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_at_the_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(mem_64bit_devices_start(512 << 20), 4 << 30);
        assert_eq!(mem_64bit_devices_start((4 << 30) + 1), 6 << 30);
    }
}
