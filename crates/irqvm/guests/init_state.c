/* init_state: what INIT resets and what it leaves alone. SDM vol. 3, table "IA-32 and Intel 64 Processor States
 * Following Power-up, Reset, or INIT" (Table 10-1; 9-1 in older editions) and its note 2 (CR0.CD and CR0.NW
 * unchanged by INIT); SDM 10.1: "during an INIT, the internal caches, MSRs, MTRRs, and x87 FPU/MMX/SSE state are
 * left unchanged". IA32_EFER is cleared (the processor leaves IA-32e mode). KVM's paravirtual clock MSR is
 * disabled by INIT (KVM's kvm_vcpu_reset), checked only where CPUID says KVM.
 *
 * AP 1 dirties everything it can reach: CR0/CR2/CR4, EFER, DR0-DR7, segment selectors and FS/GS bases, GDTR,
 * IDTR, TR and LDTR (from a private GDT), RFLAGS and all sixteen general registers; and it sets MSRs that INIT
 * keeps, the x87 control word, MXCSR and XMM0. It records the TSC and parks in `cli; hlt`. The BSP sends INIT and
 * one SIPI to this guest's own trampoline at ISTATE_ADDR, which stores every register it can read in real mode
 * before touching any, then takes the library's way to long mode (the same steps as lib/entry.S) and stores
 * R8-R15 at its first 64-bit instruction. The AP reports the rest from C once it is online again. x87/SSE state
 * goes through FXSAVE/FXRSTOR only: the kvm_pvm instruction emulator fails on FLDCW, LDMXCSR, STMXCSR and MOVQ
 * to or from XMM registers, and runs FXSAVE/FXRSTOR. MSRs that do not take a value here (a #GP, or a different
 * read-back) are SKIPped. MTRRs are not written: changing memory types under a running guest is not worth it.
 *
 * Known host gaps, tagged: QEMU TCG (7.2) loads CR0 = 60000010H at INIT, not the table's "CD and NW unchanged"
 * ([tcg-init-cr0]); KVM on the kvm_pvm hosts (irqvm's kernel and split modes, QEMU -accel kvm) resets the FS and
 * GS bases memory accesses use, but RDMSR of IA32_FS_BASE / IA32_GS_BASE still returns the values from before
 * INIT ([kvm-init-fsgs-msr]). */
#include "guest.h"

#define ISTATE_ADDR 0x9000 /* SIPI vector 0x09; the library trampoline stays at TRAMPOLINE_ADDR */
#define ISTATE_VECTOR (ISTATE_ADDR >> 12)
#define AP 1u

/* Words of the real-mode capture area (u32 each; segment selectors in the low half). Macros, not an enum:
 * the trampoline's assembly needs them as numbers. */
#define CAP_DONE 0
#define CAP_EAX 1
#define CAP_EBX 2
#define CAP_ECX 3
#define CAP_EDX 4
#define CAP_ESI 5
#define CAP_EDI 6
#define CAP_EBP 7
#define CAP_ESP 8
#define CAP_EFLAGS 9
#define CAP_CR0 10
#define CAP_CR2 11
#define CAP_CR3 12
#define CAP_CR4 13
#define CAP_EFER_LO 14
#define CAP_EFER_HI 15
#define CAP_FSBASE_LO 16
#define CAP_FSBASE_HI 17
#define CAP_GSBASE_LO 18
#define CAP_GSBASE_HI 19
#define CAP_DR0 20
#define CAP_DR1 21
#define CAP_DR2 22
#define CAP_DR3 23
#define CAP_DR6 24
#define CAP_DR7 25
#define CAP_CS 26
#define CAP_DS 27
#define CAP_ES 28
#define CAP_FS 29
#define CAP_GS 30
#define CAP_SS 31
#define CAP_GDTR 32
#define CAP_GDTR_HI 33
#define CAP_IDTR 34
#define CAP_IDTR_HI 35
#define CAP_FS_MEM 36
#define CAP_GS_MEM 37
#define CAP_WORDS 38
#define CAP_DONE_MAGIC 0x1417D0E5u
/* The trampoline reads a word at this offset through FS and GS: the word at base 0 (low memory the guests do
 * not use) and the ones at the old bases hold different markers. */
#define SEG_PROBE_OFFSET 0x7F0
#define MARK_BASE0 0xB0B0B0B0u
#define MARK_FS 0xF5F5F5F5u
#define MARK_GS 0x65656565u

/* ---- the trampoline ------------------------------------------------------------------------------------------ */
#define S_(x) #x
#define S(x) S_(x)
/* %cs-relative address of capture word N inside the trampoline copy. */
#define CAPW(n) "%cs:(istate_cap - istate_tramp_start + 4 * " S(n) ")"
#define SAVE32(reg, n) "movl %" reg ", " CAPW(n) "\n\t"
#define SAVE_SREG(reg, n) "movw %" reg ", " CAPW(n) "\n\t"
#define SAVE_CR(cr, n) "movl %" cr ", %eax\n\tmovl %eax, " CAPW(n) "\n\t"
#define SAVE_MSR(msr, lo, hi) \
	"movl $" S(msr) ", %ecx\n\trdmsr\n\tmovl %eax, " CAPW(lo) "\n\tmovl %edx, " CAPW(hi) "\n\t"

__asm__(
	".pushsection .text\n\t"
	".globl istate_tramp_start, istate_tramp_end\n\t"
	".code16\n"
	"istate_tramp_start:\n\t"
	/* Nothing may change a register before it is stored: general registers and selectors first. */
	SAVE32("eax", CAP_EAX) SAVE32("ebx", CAP_EBX) SAVE32("ecx", CAP_ECX) SAVE32("edx", CAP_EDX)
	SAVE32("esi", CAP_ESI) SAVE32("edi", CAP_EDI) SAVE32("ebp", CAP_EBP) SAVE32("esp", CAP_ESP)
	SAVE_SREG("cs", CAP_CS) SAVE_SREG("ds", CAP_DS) SAVE_SREG("es", CAP_ES) SAVE_SREG("fs", CAP_FS)
	SAVE_SREG("gs", CAP_GS) SAVE_SREG("ss", CAP_SS)
	/* A stack inside the page for PUSHF (SS and ESP are saved). */
	"movw %cs, %ax\n\t"
	"movw %ax, %ss\n\t"
	"movl $(istate_stack_top - istate_tramp_start), %esp\n\t"
	"pushfl\n\t"
	"popl %eax\n\t"
	"movl %eax, " CAPW(CAP_EFLAGS) "\n\t"
	SAVE_CR("cr0", CAP_CR0) SAVE_CR("cr2", CAP_CR2) SAVE_CR("cr3", CAP_CR3) SAVE_CR("cr4", CAP_CR4)
	SAVE_CR("dr0", CAP_DR0) SAVE_CR("dr1", CAP_DR1) SAVE_CR("dr2", CAP_DR2) SAVE_CR("dr3", CAP_DR3)
	SAVE_CR("dr6", CAP_DR6) SAVE_CR("dr7", CAP_DR7)
	SAVE_MSR(0xC0000080, CAP_EFER_LO, CAP_EFER_HI)
	SAVE_MSR(0xC0000100, CAP_FSBASE_LO, CAP_FSBASE_HI)
	SAVE_MSR(0xC0000101, CAP_GSBASE_LO, CAP_GSBASE_HI)
	/* The bases as memory accesses see them, not only as RDMSR reports them. */
	"movl %fs:" S(SEG_PROBE_OFFSET) ", %eax\n\t"
	"movl %eax, " CAPW(CAP_FS_MEM) "\n\t"
	"movl %gs:" S(SEG_PROBE_OFFSET) ", %eax\n\t"
	"movl %eax, " CAPW(CAP_GS_MEM) "\n\t"
	"sgdtl " CAPW(CAP_GDTR) "\n\t"
	"sidtl " CAPW(CAP_IDTR) "\n\t"
	"movl $" S(CAP_DONE_MAGIC) ", " CAPW(CAP_DONE) "\n\t"
	/* From here the steps of lib/entry.S's trampoline: protected mode with the kernel GDT, then long mode. */
	"cli\n\t"
	"cld\n\t"
	"movw %cs, %ax\n\t"
	"movw %ax, %ds\n\t"
	"lgdtl (istate_gdtr - istate_tramp_start)\n\t"
	"movl %cr0, %eax\n\t"
	"orl $1, %eax\n\t"
	"movl %eax, %cr0\n\t"
	"ljmpl $0x08, $(" S(ISTATE_ADDR) " + istate_t32 - istate_tramp_start)\n\t"
	".code32\n"
	"istate_t32:\n\t"
	"movw $0x10, %ax\n\t"
	"movw %ax, %ds\n\t"
	"movw %ax, %es\n\t"
	"movw %ax, %ss\n\t"
	"movl %cr4, %eax\n\t"
	"orl $0x20, %eax\n\t" /* CR4.PAE */
	"movl %eax, %cr4\n\t"
	"movl $pml4, %eax\n\t"
	"movl %eax, %cr3\n\t"
	"movl $0xC0000080, %ecx\n\t"
	"rdmsr\n\t"
	"orl $0x100, %eax\n\t" /* EFER.LME */
	"wrmsr\n\t"
	"movl %cr0, %eax\n\t"
	"orl $0x80000001, %eax\n\t" /* PG | PE */
	"movl %eax, %cr0\n\t"
	"ljmp $0x18, $istate_long_entry\n\t"
	".balign 8\n"
	"istate_gdtr:\n\t"
	".word 4 * 8 - 1\n\t" /* lib/entry.S's gdt: null, code32, data, code64 */
	".long gdt\n\t"
	".balign 16\n"
	"istate_cap:\n\t"
	".skip 4 * " S(CAP_WORDS) "\n\t"
	".balign 16\n\t"
	".skip 64\n"
	"istate_stack_top:\n"
	"istate_tramp_end:\n\t"
	".code64\n"
	/* First 64-bit instruction after the restart: R8-R15 still hold what INIT left there. */
	"istate_long_entry:\n\t"
	"movq %r8, istate_r8_r15 + 0\n\t"
	"movq %r9, istate_r8_r15 + 8\n\t"
	"movq %r10, istate_r8_r15 + 16\n\t"
	"movq %r11, istate_r8_r15 + 24\n\t"
	"movq %r12, istate_r8_r15 + 32\n\t"
	"movq %r13, istate_r8_r15 + 40\n\t"
	"movq %r14, istate_r8_r15 + 48\n\t"
	"movq %r15, istate_r8_r15 + 56\n\t"
	"jmp ap_long_entry\n\t"
	".popsection\n");

extern char istate_tramp_start[], istate_tramp_end[], istate_cap[];
volatile u64 istate_r8_r15[8];
extern volatile u64 ap_boot_stack;
extern volatile u32 ap_boot_cpu;
extern u8 cpu_stacks[MAX_CPUS][STACK_SIZE];

static volatile u32 *cap_word(u32 n)
{
	return (volatile u32 *)(ISTATE_ADDR + (istate_cap - istate_tramp_start) + 4 * n);
}
/* A pointer to guest-physical `addr` (identity mapped), hidden from the compiler's null-page warnings. */
static volatile u32 *at(u64 addr)
{
	__asm__("" : "+r"(addr));
	return (volatile u32 *)addr;
}
static u64 cap_u64(u32 lo) { return (u64)*cap_word(lo + 1) << 32 | *cap_word(lo); }

/* ---- #GP-safe MSR access: a #GP while `gp_armed` skips the 2-byte RDMSR/WRMSR ------------------------------ */
static volatile u32 gp_armed[MAX_CPUS], gp_hit[MAX_CPUS];
static void gp_handler(struct irq_frame *f, u32 cpu)
{
	if (!gp_armed[cpu])
		panic("#GP on CPU %u at rip %lx, error %lx", cpu, f->rip, f->error);
	gp_hit[cpu] = 1;
	f->rip += 2;
}
static bool wrmsr_safe(u32 msr, u64 v)
{
	u32 cpu = this_cpu();
	gp_hit[cpu] = 0;
	gp_armed[cpu] = 1;
	wrmsr(msr, v);
	gp_armed[cpu] = 0;
	return !gp_hit[cpu];
}
static bool rdmsr_safe(u32 msr, u64 *v)
{
	u32 cpu = this_cpu(), lo = 0, hi = 0;
	gp_hit[cpu] = 0;
	gp_armed[cpu] = 1;
	__asm__ volatile("rdmsr" : "+a"(lo), "+d"(hi) : "c"(msr));
	gp_armed[cpu] = 0;
	*v = (u64)hi << 32 | lo;
	return !gp_hit[cpu];
}

/* ---- control registers and friends ------------------------------------------------------------------------ */
#define CR0_MP (1ul << 1)
#define CR0_ET (1ul << 4)
#define CR0_NE (1ul << 5)
#define CR0_WP (1ul << 16)
#define CR0_AM (1ul << 18)
#define CR0_NW (1ul << 29)
#define CR0_CD (1ul << 30)
#define CR4_PGE (1ul << 7)
#define CR4_OSFXSR (1ul << 9)
#define CR4_OSXMMEXCPT (1ul << 10)
#define EFER_SCE (1ul << 0)
#define EFER_NXE (1ul << 11)
#define MSR_EFER 0xC0000080
#define MSR_FS_BASE 0xC0000100
#define MSR_GS_BASE 0xC0000101
#define MSR_KVM_SYSTEM_TIME_NEW 0x4B564D01
#define KVM_FEATURE_CLOCKSOURCE2 (1u << 3)
#define READ_CR(n) ({ u64 v_; __asm__ volatile("mov %%cr" #n ", %0" : "=r"(v_)); v_; })
#define WRITE_CR(n, v) __asm__ volatile("mov %0, %%cr" #n : : "r"((u64)(v)) : "memory")
#define WRITE_DR(n, v) __asm__ volatile("mov %0, %%dr" #n : : "r"((u64)(v)))

static bool cpuid_bit(u32 leaf, int reg, u32 bit)
{
	u32 r[4], max, b, c, d;
	cpuid(leaf & 0x80000000, 0, &max, &b, &c, &d);
	if (max < leaf)
		return false;
	cpuid(leaf, 0, &r[0], &r[1], &r[2], &r[3]);
	return (r[reg] >> bit) & 1;
}
enum { EAX, EBX, ECX, EDX };

/* KVM's paravirtual clock MSR is there: CPUID 0x40000000 says "KVMKVMKVM" and 0x40000001 has CLOCKSOURCE2. */
static bool kvm_clock_present(void)
{
	u32 a, sig[3];
	cpuid(0x40000000, 0, &a, &sig[0], &sig[1], &sig[2]);
	if (memcmp(sig, "KVMKVMKVM\0\0\0", 12) != 0 || a < 0x40000001)
		return false;
	u32 b, c, d;
	cpuid(0x40000001, 0, &a, &b, &c, &d);
	return a & KVM_FEATURE_CLOCKSOURCE2;
}

/* ---- MSRs INIT keeps ------------------------------------------------------------------------------------------ */
struct kept_msr {
	u32 index;
	u64 value;         /* written before INIT (differs from every reset value) */
	const char *name;
};
/* Per entry of kept[]: the write stuck before INIT; readable after the restart; the value then. */
static bool kept_set[16], kept_readable[16];
static u64 kept_after[16];
static struct kept_msr kept[] = {
	{ 0x174, 0x10, "ia32_sysenter_cs" },
	{ 0x175, 0x12345000, "ia32_sysenter_esp" },
	{ 0x176, 0x12346000, "ia32_sysenter_eip" },
	{ 0xC0000081, 0x0023001000000000ul, "ia32_star" },
	{ 0xC0000082, 0x12347000, "ia32_lstar" },
	{ 0xC0000083, 0x12348000, "ia32_cstar" },
	{ 0xC0000084, 0x4700, "ia32_fmask" },
	{ 0xC0000102, 0x12349000, "ia32_kernel_gs_base" },
	{ 0x277, 0x0007040600070106ul, "ia32_pat" }, /* PA1 = WC instead of WT; PA3 (UC, the APIC pages) kept */
	{ 0xC0000103, 0x5A, "ia32_tsc_aux" },
};
#define N_KEPT (sizeof(kept) / sizeof(kept[0]))

/* ---- what the AP sets before INIT ----------------------------------------------------------------------------- */
#define FCW_VALUE 0x027F    /* not the power-up 0040H nor FNINIT's 037FH */
#define MXCSR_VALUE 0x7F80  /* round toward zero, exceptions masked; power-up is 1F80H */
#define XMM0_VALUE 0x1122334455667788ul
#define CR2_VALUE 0xDEADB000ul
#define FS_BASE_VALUE 0x5550000ul
#define GS_BASE_VALUE 0x6660000ul

static struct {
	u64 cr0, efer, tsc, kvmclock;
	bool kvmclock_set, fpu_set;
} before;

/* The FXSAVE image (SDM vol. 1, "FXSAVE"): FCW at 0, MXCSR at 24, XMM0 at 160. */
#define FX_FCW 0
#define FX_MXCSR 24
#define FX_XMM0 160
static u8 fx[512] __attribute__((aligned(16)));
static void fxsave(u8 *area) { __asm__ volatile("fxsave64 %0" : "=m"(*(u8(*)[512])area)); }
static void fxrstor(u8 *area) { __asm__ volatile("fxrstor64 %0" : : "m"(*(u8(*)[512])area)); }
static volatile u32 ap_dirty_done;

/* A private GDT: the kernel's four descriptors, then an LDT (0x20) and a 64-bit TSS (0x30), 16 bytes each. */
static u64 private_gdt[8] __attribute__((aligned(16)));
static u8 private_tss[104] __attribute__((aligned(16)));
static u64 private_ldt[2] __attribute__((aligned(16)));
extern u64 gdt[];
#define SEL_LDT 0x20
#define SEL_TSS 0x30

static void system_descriptor(u64 *d, u64 base, u32 limit, u32 type)
{
	d[0] = (limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | (u64)type << 40 | 1ul << 47 /* present */ |
	       (u64)(limit >> 16 & 0xF) << 48 | (base >> 24 & 0xFF) << 56;
	d[1] = base >> 32;
}

static void load_private_gdt_tr_ldtr(void)
{
	memcpy(private_gdt, gdt, 4 * 8);
	system_descriptor(&private_gdt[4], (u64)private_ldt, sizeof(private_ldt) - 1, 0x2);
	system_descriptor(&private_gdt[6], (u64)private_tss, sizeof(private_tss) - 1, 0x9);
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) d = { sizeof(private_gdt) - 1, (u64)private_gdt };
	__asm__ volatile("lgdt %0" : : "m"(d));
	__asm__ volatile("lldt %w0" : : "r"(SEL_LDT));
	__asm__ volatile("ltr %w0" : : "r"(SEL_TSS));
}

static void set_kept_state(void)
{
	for (u32 i = 0; i < N_KEPT; i++) {
		u64 v = 0;
		kept_set[i] = wrmsr_safe(kept[i].index, kept[i].value) && rdmsr_safe(kept[i].index, &v) &&
			      v == kept[i].value;
	}
	/* FXSAVE/FXRSTOR: this host's instruction emulator runs them but not FLDCW, LDMXCSR or MOVQ to XMM. */
	WRITE_CR(4, READ_CR(4) | CR4_OSFXSR | CR4_OSXMMEXCPT);
	fxsave(fx);
	*(u16 *)&fx[FX_FCW] = FCW_VALUE;
	*(u32 *)&fx[FX_MXCSR] = MXCSR_VALUE;
	*(u64 *)&fx[FX_XMM0] = XMM0_VALUE;
	fxrstor(fx);
	fxsave(fx);
	before.fpu_set = *(u16 *)&fx[FX_FCW] == FCW_VALUE && *(u32 *)&fx[FX_MXCSR] == MXCSR_VALUE &&
			 *(u64 *)&fx[FX_XMM0] == XMM0_VALUE;
	if (kvm_clock_present()) {
		static u8 pvclock[64] __attribute__((aligned(64)));
		before.kvmclock = (u64)pvclock | 1;
		u64 v = 0;
		before.kvmclock_set = wrmsr_safe(MSR_KVM_SYSTEM_TIME_NEW, before.kvmclock) &&
				      rdmsr_safe(MSR_KVM_SYSTEM_TIME_NEW, &v) && v == before.kvmclock;
	}
}

static void set_reset_state(void)
{
	u64 efer = rdmsr(MSR_EFER) | EFER_SCE;
	if (cpuid_bit(0x80000001, EDX, 20))
		efer |= EFER_NXE;
	wrmsr(MSR_EFER, efer);
	before.efer = rdmsr(MSR_EFER);
	/* CD set, NW clear: INIT must keep exactly this pair (the AP's power-up value has both set). */
	WRITE_CR(0, (READ_CR(0) | CR0_MP | CR0_NE | CR0_WP | CR0_AM | CR0_CD) & ~CR0_NW);
	before.cr0 = READ_CR(0);
	WRITE_CR(2, CR2_VALUE);
	if (cpuid_bit(1, EDX, 13))
		WRITE_CR(4, READ_CR(4) | CR4_PGE);
	WRITE_DR(0, 0x1000);
	WRITE_DR(1, 0x2000);
	WRITE_DR(2, 0x3000);
	WRITE_DR(3, 0x4000);
	WRITE_DR(6, 0xFFFF0FF1ul);  /* B0 */
	WRITE_DR(7, 0x700);         /* LE | GE, no breakpoint enabled */
	load_private_gdt_tr_ldtr();
	/* Long-mode loads of FS/GS take base 0 from the descriptor: write the bases after the selectors. */
	__asm__ volatile("movw %w0, %%fs; movw %w0, %%gs" : : "r"(0x10));
	wrmsr(MSR_FS_BASE, FS_BASE_VALUE);
	wrmsr(MSR_GS_BASE, GS_BASE_VALUE);
}

/* Runs on the AP: dirty everything, then park in `cli; hlt` with every general register, RFLAGS.DF and
 * RFLAGS.AC set. Never returns. */
static void dirty_and_park(void *unused)
{
	cli();
	set_kept_state();
	set_reset_state();
	before.tsc = rdtsc();
	WRITE_ONCE(ap_dirty_done, 1);
	__asm__ volatile(
		"movq $0x1111111111111111, %%rax\n\t"
		"movq $0x2222222222222222, %%rbx\n\t"
		"movq $0x3333333333333333, %%rcx\n\t"
		"movq $0x4444444444444444, %%rdx\n\t"
		"movq $0x5555555555555555, %%rsi\n\t"
		"movq $0x6666666666666666, %%rdi\n\t"
		"movq $0x7777777777777777, %%rbp\n\t"
		"movq $0x8888888888888888, %%r8\n\t"
		"movq $0x9999999999999999, %%r9\n\t"
		"movq $0xAAAAAAAAAAAAAAAA, %%r10\n\t"
		"movq $0xBBBBBBBBBBBBBBBB, %%r11\n\t"
		"movq $0xCCCCCCCCCCCCCCCC, %%r12\n\t"
		"movq $0xDDDDDDDDDDDDDDDD, %%r13\n\t"
		"movq $0xEEEEEEEEEEEEEEEE, %%r14\n\t"
		"movq $0xFFFFFFFFFFFFFFFF, %%r15\n\t"
		"pushq $0x40402\n\t" /* AC | DF | bit 1; IF clear */
		"popfq\n"
		"1: cli\n\t"
		"hlt\n\t"
		"jmp 1b"
		: : : "memory");
	__builtin_unreachable();
}

/* ---- after the restart -------------------------------------------------------------------------------------- */
static struct {
	u64 tsc;
	u16 fcw, tr, ldtr;
	u32 mxcsr;
	u64 xmm0, kvmclock;
	bool kvmclock_readable;
} after;

static void read_after(void *unused)
{
	after.tsc = rdtsc();
	for (u32 i = 0; i < N_KEPT; i++)
		kept_readable[i] = rdmsr_safe(kept[i].index, &kept_after[i]);
	__asm__ volatile("str %0" : "=m"(after.tr));
	__asm__ volatile("sldt %0" : "=m"(after.ldtr));
	WRITE_CR(4, READ_CR(4) | CR4_OSFXSR); /* INIT cleared it; setting it does not touch MXCSR or XMM0 */
	fxsave(fx);
	after.fcw = *(u16 *)&fx[FX_FCW];
	after.mxcsr = *(u32 *)&fx[FX_MXCSR];
	after.xmm0 = *(u64 *)&fx[FX_XMM0];
	if (before.kvmclock_set)
		after.kvmclock_readable = rdmsr_safe(MSR_KVM_SYSTEM_TIME_NEW, &after.kvmclock);
}

static void check_reset(void)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	bool gprs = true;
	for (u32 w = CAP_EAX; w <= CAP_ESP; w++)
		gprs &= w == CAP_EDX || *cap_word(w) == 0;
	for (u32 i = 0; i < 8; i++)
		gprs &= istate_r8_r15[i] == 0;
	check(gprs, "init clears the general registers", "eax %x ebx %x ecx %x esi %x edi %x ebp %x esp %x r8 %lx r15 %lx",
	      *cap_word(CAP_EAX), *cap_word(CAP_EBX), *cap_word(CAP_ECX), *cap_word(CAP_ESI), *cap_word(CAP_EDI),
	      *cap_word(CAP_EBP), *cap_word(CAP_ESP), istate_r8_r15[0], istate_r8_r15[7]);
	check(*cap_word(CAP_EDX) == a, "init loads edx with the cpuid signature", "edx %x, cpuid.1:eax %x",
	      *cap_word(CAP_EDX), a);
	check(*cap_word(CAP_EFLAGS) == 0x2, "init loads eflags 2", "eflags %x", *cap_word(CAP_EFLAGS));
	u32 cr0 = *cap_word(CAP_CR0), want = CR0_ET | (before.cr0 & (CR0_CD | CR0_NW));
	check(cr0 == want, "init cr0 is et with cd and nw kept [tcg-init-cr0]", "cr0 %x, expected %x (before %lx)",
	      cr0, want, before.cr0);
	check(*cap_word(CAP_CR2) == 0 && *cap_word(CAP_CR3) == 0 && *cap_word(CAP_CR4) == 0,
	      "init clears cr2 cr3 cr4", "cr2 %x cr3 %x cr4 %x", *cap_word(CAP_CR2), *cap_word(CAP_CR3),
	      *cap_word(CAP_CR4));
	check(cap_u64(CAP_EFER_LO) == 0, "init clears efer", "efer %lx (before %lx)", cap_u64(CAP_EFER_LO),
	      before.efer);
	u32 cs = *cap_word(CAP_CS) & 0xFFFF;
	bool data_zero = true;
	for (u32 w = CAP_DS; w <= CAP_SS; w++)
		data_zero &= (*cap_word(w) & 0xFFFF) == 0;
	check(cs == ISTATE_VECTOR << 8 && data_zero, "init and sipi load the selectors",
	      "cs %x ds %x es %x fs %x gs %x ss %x", cs, *cap_word(CAP_DS), *cap_word(CAP_ES), *cap_word(CAP_FS),
	      *cap_word(CAP_GS), *cap_word(CAP_SS));
	check(*cap_word(CAP_FS_MEM) == MARK_BASE0 && *cap_word(CAP_GS_MEM) == MARK_BASE0,
	      "init clears the fs and gs bases", "fs:%x reads %x, gs:%x reads %x (%x at base 0, %x and %x at the old bases)",
	      SEG_PROBE_OFFSET, *cap_word(CAP_FS_MEM), SEG_PROBE_OFFSET, *cap_word(CAP_GS_MEM), MARK_BASE0, MARK_FS,
	      MARK_GS);
	check(cap_u64(CAP_FSBASE_LO) == 0 && cap_u64(CAP_GSBASE_LO) == 0,
	      "init clears ia32_fs_base and ia32_gs_base [kvm-init-fsgs-msr]", "rdmsr: fs base %lx gs base %lx",
	      cap_u64(CAP_FSBASE_LO), cap_u64(CAP_GSBASE_LO));
	u32 glimit = *cap_word(CAP_GDTR) & 0xFFFF, ilimit = *cap_word(CAP_IDTR) & 0xFFFF;
	u32 gbase = *cap_word(CAP_GDTR) >> 16 | *cap_word(CAP_GDTR_HI) << 16;
	u32 ibase = *cap_word(CAP_IDTR) >> 16 | *cap_word(CAP_IDTR_HI) << 16;
	check(glimit == 0xFFFF && gbase == 0 && ilimit == 0xFFFF && ibase == 0, "init loads gdtr and idtr base 0 limit ffff",
	      "gdtr %x/%x idtr %x/%x", gbase, glimit, ibase, ilimit);
	bool dr = *cap_word(CAP_DR0) == 0 && *cap_word(CAP_DR1) == 0 && *cap_word(CAP_DR2) == 0 &&
		  *cap_word(CAP_DR3) == 0 && *cap_word(CAP_DR6) == 0xFFFF0FF0 && *cap_word(CAP_DR7) == 0x400;
	check(dr, "init loads the debug registers", "dr0-3 %x %x %x %x dr6 %x dr7 %x", *cap_word(CAP_DR0),
	      *cap_word(CAP_DR1), *cap_word(CAP_DR2), *cap_word(CAP_DR3), *cap_word(CAP_DR6), *cap_word(CAP_DR7));
	check(after.tr == 0 && after.ldtr == 0, "init clears tr and ldtr", "tr %x ldtr %x (were %x %x)", after.tr,
	      after.ldtr, SEL_TSS, SEL_LDT);
}

static void check_kept(void)
{
	char name[64];
	for (u32 i = 0; i < N_KEPT; i++) {
		struct kept_msr *k = &kept[i];
		sfmt(name, sizeof(name), "init keeps %s", k->name);
		if (!kept_set[i])
			skip(name, "the msr does not take %lx here", k->value);
		else
			check(kept_readable[i] && kept_after[i] == k->value, name, "reads %lx, was %lx", kept_after[i],
			      k->value);
	}
	check(after.tsc > before.tsc, "init keeps the tsc running", "tsc %lx before, %lx after", before.tsc,
	      after.tsc);
	if (!before.fpu_set) {
		skip("init keeps the x87 and sse state", "FXRSTOR did not load the test values");
	} else {
		check(after.fcw == FCW_VALUE, "init keeps the x87 control word", "fcw %x, was %x", after.fcw,
		      FCW_VALUE);
		check(after.mxcsr == MXCSR_VALUE, "init keeps mxcsr", "mxcsr %x, was %x", after.mxcsr, MXCSR_VALUE);
		check(after.xmm0 == XMM0_VALUE, "init keeps xmm0", "xmm0 %lx, was %lx", after.xmm0, XMM0_VALUE);
	}
	if (!before.kvmclock_set)
		skip("init disables the kvm clock msr", "no KVM paravirtual clock here");
	else
		check(after.kvmclock_readable && after.kvmclock == 0, "init disables the kvm clock msr",
		      "msr 4b564d01 reads %lx, was %lx", after.kvmclock, before.kvmclock);
}

void guest_main(void)
{
	platform_init(false);
	if (ncpus < 2) {
		skip("init state", "only %u CPU", ncpus);
		return;
	}
	irq_set_handler(13, gp_handler);
	if (!check(smp_start_ap(AP), "ap first start", "AP %u did not come online", AP))
		return;
	check(smp_call_async(AP, dirty_and_park, NULL), "dirty request sent", "kick failed");
	if (!check(wait_nonzero(&ap_dirty_done, WAIT_MS), "ap dirtied its state and parked", "AP did not finish"))
		return;
	delay_ms(1); /* into its `cli; hlt` */

	*at(SEG_PROBE_OFFSET) = MARK_BASE0;
	*at(FS_BASE_VALUE + SEG_PROBE_OFFSET) = MARK_FS;
	*at(GS_BASE_VALUE + SEG_PROBE_OFFSET) = MARK_GS;
	memcpy((void *)ISTATE_ADDR, istate_tramp_start, istate_tramp_end - istate_tramp_start);
	for (u32 w = 0; w < CAP_WORDS; w++)
		*cap_word(w) = 0;
	WRITE_ONCE(cpu_online[AP], 0);
	ap_boot_cpu = AP;
	ap_boot_stack = (u64)&cpu_stacks[AP][STACK_SIZE];
	barrier();
	apic_icr_write(cpu_to_apic_id(AP), APIC_DM_INIT | APIC_LEVEL_ASSERT);
	delay_ms(10);
	apic_icr_write(cpu_to_apic_id(AP), APIC_DM_STARTUP | ISTATE_VECTOR);
	bool up = wait_nonzero(&cpu_online[AP], WAIT_MS);
	if (!check(up && *cap_word(CAP_DONE) == CAP_DONE_MAGIC, "ap restarted through the capturing trampoline",
		   "online %u, capture %x", up, *cap_word(CAP_DONE)))
		return;
	if (!check(smp_call(AP, read_after, NULL), "ap reports its state after the restart", "call did not run"))
		return;
	check_reset();
	check_kept();
}
