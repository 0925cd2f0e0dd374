//! CPU-level helpers usable at CPL3 with IOPL=3.

use core::arch::{asm, global_asm};

// The precompiled libcore for the gnu target expects libc's memory functions. Written in
// assembly so the compiler cannot lower them back into calls to themselves.
global_asm!(
    ".section .text.memfns, \"ax\"",
    ".global memcpy",
    "memcpy:",
    "    mov rax, rdi",
    "    mov rcx, rdx",
    "    rep movsb",
    "    ret",
    ".global memmove",
    "memmove:",
    "    mov rax, rdi",
    "    mov rcx, rdx",
    "    cmp rdi, rsi",
    "    jbe 2f",
    "    lea r8, [rsi + rdx]",
    "    cmp rdi, r8",
    "    jae 2f",
    "    lea rsi, [rsi + rdx - 1]",
    "    lea rdi, [rdi + rdx - 1]",
    "    std",
    "    rep movsb",
    "    cld",
    "    ret",
    "2:",
    "    rep movsb",
    "    ret",
    ".global memset",
    "memset:",
    "    mov r8, rdi",
    "    mov eax, esi",
    "    mov rcx, rdx",
    "    rep stosb",
    "    mov rax, r8",
    "    ret",
    ".global memcmp",
    ".global bcmp",
    "memcmp:",
    "bcmp:",
    "    xor eax, eax",
    "3:",
    "    test rdx, rdx",
    "    jz 4f",
    "    movzx eax, byte ptr [rdi]",
    "    movzx ecx, byte ptr [rsi]",
    "    sub eax, ecx",
    "    jnz 4f",
    "    inc rdi",
    "    inc rsi",
    "    dec rdx",
    "    jmp 3b",
    "4:",
    "    ret",
);

#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

#[inline(always)]
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O is permitted at CPL3 by IOPL=3 and the TSS I/O bitmap; it has no memory
    // effects visible to Rust.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    }
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for outb.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

#[inline(always)]
pub fn outw(port: u16, val: u16) {
    // SAFETY: as for outb.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") val, options(nomem, nostack, preserves_flags))
    }
}

#[inline(always)]
pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as for outb.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

#[inline(always)]
pub fn outl(port: u16, val: u32) {
    // SAFETY: as for outb.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags))
    }
}

#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for outb.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc is allowed at CPL3 (CR4.TSD clear) and touches no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

/// Raises #UD; with no IDT loaded the CPU triple-faults.
pub fn undefined_instruction() -> ! {
    // SAFETY: deliberately faults; nothing after it runs.
    unsafe { asm!("ud2", options(noreturn)) }
}

/// Cloud Hypervisor's ACPI sleep-control port: S5 with the SLP_EN bit powers the VM off.
pub fn power_off() -> ! {
    outb(0x600, (5 << 2) | (1 << 5));
    loop {
        pause();
    }
}

/// Boot-progress codes on the POST port; the VMM timestamps them (as Cloud Hypervisor does).
pub fn post_code(code: u8) {
    outb(0x80, code);
}

#[inline(always)]
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: addr is a device register inside a BAR mapped by paging::map_range.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

#[inline(always)]
pub fn mmio_read16(addr: u64) -> u16 {
    // SAFETY: as for mmio_read32.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

#[inline(always)]
pub fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: as for mmio_read32.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

#[inline(always)]
pub fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as for mmio_read32.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

#[inline(always)]
pub fn mmio_write16(addr: u64, v: u16) {
    // SAFETY: as for mmio_read32.
    unsafe { core::ptr::write_volatile(addr as *mut u16, v) }
}

#[inline(always)]
pub fn mmio_write8(addr: u64, v: u8) {
    // SAFETY: as for mmio_read32.
    unsafe { core::ptr::write_volatile(addr as *mut u8, v) }
}
