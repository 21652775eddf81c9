/* entry.S: multiboot v1 header, 32-bit entry, switch to 64-bit long mode, interrupt stubs, AP trampoline.
 *
 * Paging: identity map of the low 4 GiB with 2 MiB pages (PML4[0] -> PDPT[0..3] -> 4 page directories).
 * Pages at and above 0xFE000000 (IOAPIC 0xFEC00000, local APIC 0xFEE00000) are mapped uncached (PCD|PWT).
 * GDT: 0x08 flat 32-bit code, 0x10 flat data, 0x18 64-bit code (shared by the BSP entry and the trampoline).
 */
#define STACK_SIZE 16384
#define TRAMPOLINE_ADDR 0x8000
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* bit 0: page-align modules, bit 1: memory information wanted */

	.section .multiboot, "a"
	.balign 4
multiboot_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.data
	.balign 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00CF9A000000FFFF /* 0x08: 32-bit code, base 0, limit 4 GiB */
	.quad 0x00CF92000000FFFF /* 0x10: data, base 0, limit 4 GiB */
	.quad 0x00AF9A000000FFFF /* 0x18: 64-bit code (L=1) */
gdt_end:
	.balign 8
gdt_ptr32:
	.word gdt_end - gdt - 1
	.long gdt

	.bss
	.balign 4096
	.globl pml4
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4 * 4096

	.text
	.code32
	.globl _start
_start:
	cli
	cld
	movl %eax, multiboot_magic
	movl %ebx, multiboot_info
	movl $(cpu_stacks + STACK_SIZE), %esp

	/* Clear PML4 and PDPT (the loader zero-fills .bss, but do not rely on it for the tables). */
	movl $pml4, %edi
	xorl %eax, %eax
	movl $2048, %ecx
	rep stosl
	movl $(pdpt + 3), pml4          /* present | writable */
	movl $(pd + 0x0000 + 3), pdpt + 0
	movl $(pd + 0x1000 + 3), pdpt + 8
	movl $(pd + 0x2000 + 3), pdpt + 16
	movl $(pd + 0x3000 + 3), pdpt + 24

	/* 2048 entries of 2 MiB: entry i maps i << 21. */
	xorl %ecx, %ecx
1:	movl %ecx, %eax
	shll $21, %eax
	orl $0x83, %eax                 /* present | writable | 2 MiB page */
	cmpl $(0xFE000000 >> 21), %ecx
	jb 2f
	orl $0x18, %eax                 /* PWT | PCD: uncached for the APIC/IOAPIC region */
2:	movl %eax, pd(, %ecx, 8)
	movl $0, pd + 4(, %ecx, 8)
	incl %ecx
	cmpl $2048, %ecx
	jb 1b

	lgdt gdt_ptr32
	call enter_long_mode_32
	ljmp $0x18, $bsp_long_entry

/* Shared by the BSP and the trampoline: PAE, CR3, EFER.LME, CR0.PG (CR0.PE is already set). */
enter_long_mode_32:
	movl %cr4, %eax
	orl $0x20, %eax                 /* CR4.PAE */
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $0xC0000080, %ecx          /* IA32_EFER */
	rdmsr
	orl $0x100, %eax                /* LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax           /* PG | PE */
	movl %eax, %cr0
	ret

	.code64
bsp_long_entry:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	movq $(cpu_stacks + STACK_SIZE), %rsp
	xorl %ebp, %ebp
	call bsp_main
3:	cli
	hlt
	jmp 3b

	.globl ap_long_entry
ap_long_entry:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	cmpl $0, ap_broadcast(%rip)
	jne 5f
	movq ap_boot_stack, %rsp
	movl ap_boot_cpu, %edi
	xorl %ebp, %ebp
	call ap_main
	jmp 4f
	/* Broadcast start-up (smp_start_all_broadcast): every AP runs this at once. A locked ticket gives each its
	 * CPU index (ticket + 1) and so its stack; an AP past the library's MAX_CPUS halts. */
5:	movl $1, %edi
	lock xaddl %edi, ap_tickets(%rip)
	incl %edi
	cmpl ap_max_cpus(%rip), %edi
	jae 4f
	movl %edi, %eax
	incq %rax
	imulq $STACK_SIZE, %rax
	leaq cpu_stacks(%rip), %rsp
	addq %rax, %rsp
	xorl %ebp, %ebp
	call ap_main
4:	cli
	hlt
	jmp 4b

/* ---- interrupt stubs: 256 entries, 16 bytes apart, each pushes (error code or 0) and the vector ---- */
	.balign 16
	.globl isr_stubs
isr_stubs:
	.set vec, 0
	.rept 256
	.balign 16
	.if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq $0
	.endif
	pushq $vec
	jmp isr_common
	.set vec, vec + 1
	.endr

isr_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	cld
	call isr_dispatch
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp                  /* vector and error code */
	iretq

/* ---- AP trampoline: copied to TRAMPOLINE_ADDR; the SIPI vector is TRAMPOLINE_ADDR >> 12.
 * Real mode (CS = 0x0800, IP = 0) -> protected mode with the kernel GDT -> long mode -> ap_long_entry. ---- */
	.balign 16
	.globl trampoline_start, trampoline_end
	.code16
trampoline_start:
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	rdtsc                           /* when this AP started, for bench_boot's phases */
	movl %eax, (tramp_tsc - trampoline_start)
	movl %edx, (tramp_tsc - trampoline_start + 4)
	lgdtl (tramp_gdtr - trampoline_start)
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $0x08, $(TRAMPOLINE_ADDR + tramp32 - trampoline_start)
	.code32
tramp32:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movl $(TRAMPOLINE_ADDR + tramp_stack_top - trampoline_start), %esp
	movl $enter_long_mode_32, %eax
	call *%eax
	ljmp $0x18, $ap_long_entry
	.balign 8
tramp_gdtr:
	.word gdt_end - gdt - 1
	.long gdt
	.balign 8
	.globl tramp_tsc
tramp_tsc:                              /* the TSC at the first instruction (in the copy at TRAMPOLINE_ADDR) */
	.quad 0
	.balign 16
	.skip 64                        /* a tiny stack for the call above */
tramp_stack_top:
trampoline_end:
