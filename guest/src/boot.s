# The CPL0 part of the tiny guest, kept as short as possible: on this
# machine's KVM every CPL0 instruction is emulated (~2 us each). Page tables,
# GDT, IDT and TSS are built at link time; this code only loads them, enters
# long mode and drops to CPL3, where the workload runs natively.

# ---- PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY (type 18) ----
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4

# ---- 32-bit PVH entry: ebx = physical address of hvm_start_info ----
    .section .text.boot, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    mov %ebx, (start_info_paddr)
    mov $0x620, %eax            # CR4 = PAE | OSFXSR | OSXMMEXCPT
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx       # EFER.LME
    rdmsr
    or $0x100, %eax
    wrmsr
    mov $0x80000023, %eax       # CR0 = PG | NE | MP | PE (EM clear: SSE on)
    mov %eax, %cr0
    lgdt (gdt_ptr)
    ljmp $0x08, $long_entry

    .code64
long_entry:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $kstack_top, %esp
    lidt idt_ptr(%rip)
    mov $0x28, %eax
    ltr %ax
    mov start_info_paddr(%rip), %rdi
    push $0x23                  # SS: user data, RPL 3
    push $ustack_top            # RSP
    push $0x2                   # RFLAGS: IF=0, IOPL=0
    push $0x1b                  # CS: user code, RPL 3
    push $user_entry
    iretq

# ---- CPL3 from here on: runs natively ----
user_entry:
    mov %rdi, %rbx
    mov $__bss_start, %edi      # the loader does not zero .bss
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    cld
    rep stosb
    mov %rbx, %rdi
    and $-16, %rsp
    call guest_main
1:  jmp 1b

# ---- #GP: the port I/O CPL3 may not do itself, done here at CPL0 ----
# Stack on entry: error code, rip, cs, rflags, rsp, ss. Handles
# out dx,al (ee), out dx,eax (ef), in al,dx (ec), in eax,dx (ed) and
# rep outsb (f3 6e); anything else is a real #GP.
    .text
    .globl gp_handler
gp_handler:
    push %rcx
    mov 16(%rsp), %rcx
    movzbl (%rcx), %ecx
    cmp $0xee, %ecx
    je 1f
    cmp $0xf3, %ecx
    je 5f
    cmp $0xef, %ecx
    je 2f
    cmp $0xec, %ecx
    je 3f
    cmp $0xed, %ecx
    je 4f
6:  pop %rcx
    jmp fault_stubs + 16 * 13
1:  out %al, %dx
    jmp 8f
2:  out %eax, %dx
    jmp 8f
3:  in %dx, %al
    jmp 8f
4:  in %dx, %eax
8:  pop %rcx
    addq $1, 8(%rsp)
    add $8, %rsp
    iretq
5:  mov 16(%rsp), %rcx
    cmpb $0x6e, 1(%rcx)
    jne 6b
    pop %rcx
    rep outsb
    addq $2, 8(%rsp)
    add $8, %rsp
    iretq

# ---- every other exception: exit with status 0x20 + vector ----
    .balign 512
    .globl fault_stubs
fault_stubs:
    .set vec, 0
    .rept 32
    .balign 16
    push $vec
    jmp fault_common
    .set vec, vec + 1
    .endr
fault_common:
    mov (%rsp), %eax
    add $0x20, %eax
    mov $0xf4, %edx
    out %al, %dx
7:  hlt
    jmp 7b

# ---- descriptor tables and page tables, all built at link time ----
    .section .data.pagetables, "aw"
    .balign 4096
    .globl pdpt
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .set i, 0
    .rept 4
    .quad pd + i * 4096 + 0x7
    .set i, i + 1
    .endr
    .fill 508, 8, 0
pd:                             # low 4 GiB identity map, 2 MiB pages, U/S=1
    .set i, 0
    .rept 512 * 4
    .quad (i << 21) + 0x87
    .set i, i + 1
    .endr

    .data
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9b000000ffff    # 0x08 code64, DPL0
    .quad 0x00cf93000000ffff    # 0x10 data, DPL0
    .quad 0x00affb000000ffff    # 0x18 code64, DPL3
    .quad 0x00cff3000000ffff    # 0x20 data, DPL3
    .quad __tss_desc_lo         # 0x28 TSS (64-bit, 16 bytes)
    .quad 0
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 16
idt:
    .set vec, 0
    .rept 32
    .if vec == 13
    .word __gp_lo
    .word 0x08
    .byte 0, 0x8e
    .word __gp_hi
    .else
    .word __stubs_lo + 16 * vec
    .word 0x08
    .byte 0, 0x8e
    .word __stubs_hi
    .endif
    .long 0, 0
    .set vec, vec + 1
    .endr
idt_end:
    .balign 8
idt_ptr:
    .word idt_end - idt - 1
    .quad idt
    .balign 16
    .globl tss
tss:
    .long 0
    .quad kstack_top            # RSP0
    .fill 0x66 - 12, 1, 0
    .word 0x68                  # I/O map base past the limit: no bitmap
    .globl start_info_paddr
start_info_paddr:
    .quad 0

# Page directories for RAM above 4 GiB: paging.rs fills one per GiB the
# memory map reports and links it into pdpt (at CPL3, natively), so neither
# the loader nor the emulated CPL0 code touches one a small guest never needs.
    .section .pagetables_high, "aw", @nobits
    .balign 4096
    .globl pd_high
pd_high:
    .skip 4096 * 124

    .section .stacks, "aw", @nobits
    .balign 16
kstack:
    .skip 16384
kstack_top:
    .balign 16
ustack:
    .skip 131072
ustack_top:
