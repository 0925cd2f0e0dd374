/*
 * PVH entry for the VIO test guest.
 *
 * Guest CPL0 is emulated instruction by instruction on the test machine (~1 us each), so this
 * stub does the least it can at CPL0: every table (page tables, GDT, TSS with its I/O bitmap)
 * is built by the assembler, and the code only loads them and drops to CPL3.
 */

    .section .note.Xen, "a"
    .balign 4
    .long 4                     /* namesz: "Xen\0" */
    .long 4                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %esi              /* hvm_start_info, handed to Rust */
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x620, %eax             /* PAE | OSFXSR | OSXMMEXCPT: compiled Rust uses SSE */
    mov %eax, %cr4
    mov $0xC0000080, %ecx       /* EFER */
    rdmsr
    or $0x100, %eax             /* LME */
    wrmsr
    mov %cr0, %eax
    and $0xFFFFFFF3, %eax       /* clear EM and TS */
    or $0x80000023, %eax        /* PG | NE | MP | PE */
    mov %eax, %cr0
    lgdt gdt_ptr
    ljmp $0x08, $long_mode

    .code64
long_mode:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    lea boot_stack_top(%rip), %rsp

    /* The TSS base cannot be split into descriptor fields at link time. */
    lea tss(%rip), %rax
    lea gdt_tss(%rip), %rdi
    mov %ax, 2(%rdi)
    shr $16, %rax
    mov %al, 4(%rdi)
    mov %ah, 7(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    mov $0x28, %ax
    ltr %ax

    /* iretq to CPL3: IOPL=3, IF=0; stack as after a call (RSP = 8 mod 16). */
    mov %rsi, %rdi
    lea user_stack_top(%rip), %rax
    sub $8, %rax
    pushq $0x23
    push %rax
    pushq $0x3002
    pushq $0x1b
    movabs $rust_start, %rax
    push %rax
    iretq

    .section .data.boot, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF    /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF    /* 0x10 kernel data */
    .quad 0x00AFFA000000FFFF    /* 0x18 user code, 64-bit */
    .quad 0x00CFF2000000FFFF    /* 0x20 user data */
gdt_tss:
    .quad 0x0000890000002068    /* 0x28 available 64-bit TSS, limit covers the I/O bitmap */
    .quad 0
gdt_end:

gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt

    /*
     * This KVM checks CPL3 port I/O against the TSS I/O permission bitmap even with IOPL=3:
     * an all-zero bitmap (plus the terminating 0xff byte) allows every port.
     */
    .balign 16
tss:
    .long 0
    .quad boot_stack_top        /* rsp0 */
    .quad 0, 0                  /* rsp1, rsp2 */
    .quad 0
    .quad 0, 0, 0, 0, 0, 0, 0   /* ist1..7 */
    .quad 0
    .word 0
    .word 104                   /* I/O bitmap offset */
    .fill 8192, 1, 0
    .byte 0xff

    /* Identity map of the low 4 GiB with 2 MiB user pages; the MMIO hole above 3 GiB uncached. */
    .balign 4096
    .global pml4
pml4:
    .quad pdpt0 + 0x7
    .fill 511, 8, 0
    .global pdpt0
pdpt0:
    .quad pd0 + 0x7
    .quad pd0 + 0x1000 + 0x7
    .quad pd0 + 0x2000 + 0x7
    .quad pd0 + 0x3000 + 0x7
    .fill 508, 8, 0
pd0:
    .set addr, 0
    .rept 2048
    .if addr >= 0xC0000000
    .quad addr | 0x9F
    .else
    .quad addr | 0x87
    .endif
    .set addr, addr + 0x200000
    .endr

    .section .bss.boot, "aw", @nobits
    .balign 4096
boot_stack:
    .skip 4096
boot_stack_top:
    .balign 4096
user_stack:
    .skip 262144
    .global user_stack_top
user_stack_top:
