/* syscall: SYSCALL from CPL 3 and SYSRETQ back, as Linux's system calls use them (SDM vol. 2B, SYSCALL and
 * SYSRET; vol. 3 5.8.8).
 *
 * The guest loads a GDT with a DPL-0 data segment after the library's 64-bit code segment (the SYSCALL pair
 * STAR[47:32] = 0x18, SS 0x20) and a SYSRET triple at STAR[63:48] = 0x28 (SS 0x30|3, 64-bit CS 0x38|3), a TSS
 * (RSP0 for exceptions taken in user mode), sets EFER.SCE, STAR, LSTAR and SFMASK, maps one code page and one
 * stack page with U/S = 1 at USER_VA (everything else stays supervisor, including the LSTAR handler), and
 * enters CPL 3 with IRETQ. The user code runs SYSCALL; the handler at LSTAR records CS, SS, RCX, R11 and RFLAGS
 * and returns with SYSRETQ; the user code records its CS, SS and RFLAGS and makes a second SYSCALL, whose
 * handler goes back to the kernel side. A fault taken on the way (the LSTAR page fetched at CPL 3, a #GP, a
 * #UD) is recorded and ends the user part. Then the kernel jumps to LSTAR itself at CPL 0, which must just run
 * the handler (irqvm watches LSTAR on hosts that leave SYSCALL half done: docs/kvm-facts.md, "SYSCALL and
 * SYSRET here"), and the guest's DR7 must read the same before and after: nothing of such a watch shows.
 * Linux's first system call from init met the host gap this guest reproduces in a second. The first system
 * call's handler also writes FS base (as Linux's arch_prctl(ARCH_SET_FS) does), and the kernel side checks
 * that the second system call, which irqvm finishes with KVM_GET_SREGS/KVM_SET_SREGS on this host, left it
 * alone (docs/benchmarks.md, "Fourth session": a 4-vCPU Linux whose processes lost their FS base).
 * The same round trip from compatibility mode (as a 32-bit Linux process makes it through the vDSO on AMD): a
 * 32-bit code page and stack at COMPAT_VA, entered with IRETQ to the 32-bit DPL-3 code segment 0x2B, SYSCALL to
 * CSTAR (a handler of its own that notes the arrival, then LSTAR's) and SYSRETL back (AMD APM vol. 3, SYSCALL and
 * SYSRET; SDM vol. 2B), once plainly and once with IF = 0 while an interrupt waits. That part depends on the
 * vendor the guest's CPUID shows (the host's): on AMD it runs as above (checks tagged [amd]); Intel has no
 * SYSCALL outside 64-bit mode, so there SYSCALL must raise #UD at the instruction (SDM vol. 2B, SYSCALL:
 * "#UD If in compatibility mode", checks tagged [intel]); guests/README.md, "Expected outcomes". */
#include "guest.h"

#define KCODE 0x18                 /* the library's 64-bit code: STAR[47:32] */
#define KDATA 0x20                 /* SYSCALL's SS = STAR[47:32] + 8 */
#define SYSRET_BASE 0x28           /* STAR[63:48] */
#define UDATA (SYSRET_BASE + 8 + 3)  /* SYSRETQ's SS: 0x33 */
#define UCODE (SYSRET_BASE + 16 + 3) /* SYSRETQ's 64-bit CS: 0x3B */
#define TSS_SEL 0x40

#define MSR_EFER 0xC0000080
#define MSR_STAR 0xC0000081
#define MSR_LSTAR 0xC0000082
#define MSR_CSTAR 0xC0000083
#define MSR_SFMASK 0xC0000084
#define EFER_SCE 1ul

#define RFLAGS_CF 0x1ul
#define RFLAGS_FIXED 0x2ul
#define RFLAGS_IF 0x200ul
#define RFLAGS_DF 0x400ul
#define RFLAGS_AC 0x40000ul
/* The user code's flags (from the IRETQ frame): CF (kept by SYSCALL), IF, DF and AC (cleared by SFMASK). */
#define USER_FLAGS (RFLAGS_FIXED | RFLAGS_CF | RFLAGS_IF | RFLAGS_DF | RFLAGS_AC)
#define SFMASK (RFLAGS_IF | RFLAGS_DF | RFLAGS_AC)

#define USER_VA 0x8000000000ul     /* PML4 slot 1: nothing else is mapped there */
/* Compatibility-mode code addresses 32 bits: its page and stack go at 1 GiB, above the guest's RAM, whose 2 MiB
 * page of the library's identity map this guest replaces with a page table of its own. */
#define COMPAT_VA 0x40000000ul
#define UCODE32 (SYSRET_BASE + 3)  /* SYSRETL's 32-bit CS: 0x2B */
#define PTE_P 1ul
#define PTE_W 2ul
#define PTE_U 4ul

/* What the handler at LSTAR saw, per system call number 1 and 2 (and 3: the kernel's own jump there; 4 and 5: the
 * compatibility-mode calls, which arrive through CSTAR). */
struct entry_record {
	u64 cs, ss, rcx, r11, rflags;
	/* registers the user code filled in before the call */
	u64 rbx, rdx, rsi, r8, r9, r10, rdi;
};
struct entry_record sc_rec[8];
volatile u8 sc_cstar_seen[256];    /* arrivals at the CSTAR handler, per system call number (low byte of RAX) */
u64 sc_tmp_rcx, sc_tmp_rdi;
volatile u32 sc_entries;
u64 sc_resume_rsp;                 /* enter_user's stack, where the way back to the kernel side resumes */
u64 sc_user_rsp;
u64 sc_tmp;
u32 sc_left_by;                    /* 0: the second system call; else the vector of the fault + 1 */

static bool intel; /* the CPUID vendor is GenuineIntel: SYSCALL from compatibility mode is #UD */

/* Fault taken on the way to or in user mode. */
static volatile u64 fault_rip, fault_cs, fault_error, fault_rcx, fault_r11, fault_rflags, fault_ss, fault_rsp;

extern char user_code[], user_code_end[], user_after_first[], user_after_second[], sc_entry[], sc_leave[];
extern char compat_code[], compat_after_first[], compat_after_second[], sc_cstar_entry[];
u32 enter_user(u64 rip, u64 rsp, u64 rflags, u64 cs);
u32 jump_to_lstar(void);
u32 touch(u64 addr);

__asm__(
	"	.text\n"
	/* enter_user(rip, rsp, rflags, cs): saves the callee-saved registers, points TSS.RSP0 below them, IRETQ to CPL 3
	 * (64-bit or compatibility mode, as CS says). Returns (through sc_leave) sc_left_by. */
	"	.globl enter_user\n"
	"enter_user:\n"
	"	pushq %rbp\n	pushq %rbx\n	pushq %r12\n	pushq %r13\n	pushq %r14\n	pushq %r15\n"
	"	movq %rsp, sc_resume_rsp(%rip)\n"
	"	leaq -512(%rsp), %rax\n"
	"	movq %rax, tss+4(%rip)\n"
	"	pushq $" "0x33" "\n"         /* SS */
	"	pushq %rsi\n"                /* RSP */
	"	pushq %rdx\n"                /* RFLAGS */
	"	pushq %rcx\n"                /* CS */
	"	pushq %rdi\n"                /* RIP */
	"	iretq\n"
	/* jump_to_lstar(): the kernel runs the LSTAR handler itself at CPL 0 (system call number 3). */
	"	.globl jump_to_lstar\n"
	"jump_to_lstar:\n"
	"	pushq %rbp\n	pushq %rbx\n	pushq %r12\n	pushq %r13\n	pushq %r14\n	pushq %r15\n"
	"	movq %rsp, sc_resume_rsp(%rip)\n"
	"	movl $3, %eax\n"
	"	xorl %ecx, %ecx\n"
	"	xorl %r11d, %r11d\n"
	"	jmp sc_entry\n"
	/* touch(addr): reads addr at CPL 0; a fault there ends it through sc_leave (returns 0 otherwise). */
	"	.globl touch\n"
	"touch:\n"
	"	pushq %rbp\n	pushq %rbx\n	pushq %r12\n	pushq %r13\n	pushq %r14\n	pushq %r15\n"
	"	movq %rsp, sc_resume_rsp(%rip)\n"
	"	movl $0, sc_left_by(%rip)\n"
	"	movq (%rdi), %rax\n"
	"	jmp sc_leave\n"
	/* sc_leave: back to enter_user's / jump_to_lstar's caller with sc_left_by. */
	"	.globl sc_leave\n"
	"sc_leave:\n"
	"	movq sc_resume_rsp(%rip), %rsp\n"
	"	movl sc_left_by(%rip), %eax\n"
	"	popq %r15\n	popq %r14\n	popq %r13\n	popq %r12\n	popq %rbx\n	popq %rbp\n"
	"	ret\n"
	/* The handler at CSTAR (SYSCALL from compatibility mode): notes the arrival, then as at LSTAR. Nothing here
	 * changes the flags. */
	"	.balign 16\n"
	"	.globl sc_cstar_entry\n"
	"sc_cstar_entry:\n"
	"	movq %rax, sc_tmp(%rip)\n"
	"	movq %rcx, sc_tmp_rcx(%rip)\n"
	"	movzbl %al, %ecx\n"
	"	leaq sc_cstar_seen(%rip), %rax\n"
	"	movb $1, (%rax,%rcx)\n"
	"	movq sc_tmp_rcx(%rip), %rcx\n"
	"	movq sc_tmp(%rip), %rax\n"
	"	jmp sc_entry\n"
	/* The handler at LSTAR. RSP is still the caller's: switch to the kernel side's stack first. RAX is the system
	 * call number (its upper half undefined after compatibility mode: SDM vol. 1 3.4.1.1). */
	"	.balign 16\n"
	"	.globl sc_entry\n"
	"sc_entry:\n"
	"	movl %eax, %eax\n"
	"	movq %rsp, sc_user_rsp(%rip)\n"
	"	movq sc_resume_rsp(%rip), %rsp\n"
	"	leaq -256(%rsp), %rsp\n"    /* not SUB: the flags are recorded next */
	"	pushfq\n"
	"	movq %rax, sc_tmp(%rip)\n"
	"	movq %rdi, sc_tmp_rdi(%rip)\n"
	"	andq $7, %rax\n"
	"	imulq $96, %rax\n"           /* sizeof(struct entry_record) */
	"	leaq sc_rec(%rip), %rdi\n"
	"	addq %rax, %rdi\n"
	"	popq %rax\n"
	"	movq %rax, 32(%rdi)\n"       /* rflags */
	"	xorl %eax, %eax\n"
	"	movw %cs, %ax\n"
	"	movq %rax, 0(%rdi)\n"
	"	movw %ss, %ax\n"
	"	movq %rax, 8(%rdi)\n"
	"	movq %rcx, 16(%rdi)\n"
	"	movq %r11, 24(%rdi)\n"
	"	movq %rbx, 40(%rdi)\n"
	"	movq %rdx, 48(%rdi)\n"
	"	movq %rsi, 56(%rdi)\n"
	"	movq %r8, 64(%rdi)\n"
	"	movq %r9, 72(%rdi)\n"
	"	movq %r10, 80(%rdi)\n"
	"	movq sc_tmp_rdi(%rip), %rax\n"
	"	movq %rax, 88(%rdi)\n"
	"	lock incl sc_entries(%rip)\n"
	"	cmpq $4, sc_tmp(%rip)\n"
	"	je 2f\n"
	"	cmpq $1, sc_tmp(%rip)\n"
	"	jne 1f\n"
	/* System call 1: FS base changed inside the call (as Linux's arch_prctl does), then back to the
	 * user code, RIP = RCX, RFLAGS = R11. */
	"	movq %rcx, %r12\n"
	"	movl $0xC0000100, %ecx\n"
	"	movl $0x12345000, %eax\n"
	"	xorl %edx, %edx\n"
	"	wrmsr\n"
	"	movq %r12, %rcx\n"
	"	movq sc_user_rsp(%rip), %rsp\n"
	"	sysretq\n"
	"1:	movl $0, sc_left_by(%rip)\n"
	"	jmp sc_leave\n"
	/* System call 4, from compatibility mode: back there with SYSRETL (0F 07 without REX.W; SDM vol. 2B, SYSRET:
	 * CS = STAR[63:48] | 3, SS = STAR[63:48] + 8 | 3, EIP = ECX, RFLAGS = R11). */
	"2:	movq sc_user_rsp(%rip), %rsp\n"
	"	sysretl\n"
	/* The user code, alone on its page (mapped at USER_VA), position independent. */
	"	.balign 4096\n"
	"	.globl user_code, user_after_first, user_after_second, user_code_end\n"
	"user_code:\n"
	"	pushfq\n"
	"	popq %r8\n"                  /* the flags SYSCALL must save in R11 */
	"	leaq user_after_first(%rip), %r9\n"
	"	movl $1, %eax\n"
	"	syscall\n"
	"user_after_first:\n"
	"	movq %rcx, %r10\n"           /* SYSRETQ leaves RCX as it was */
	"	movq %cs, %rbx\n"            /* no instruction here changes the flags (an earlier XOR did) */
	"	movq %ss, %rdx\n"
	"	pushfq\n"
	"	popq %rsi\n"
	"	movl $2, %eax\n"
	"	syscall\n"
	"user_after_second:\n"
	"	ud2\n"
	"user_code_end:\n"
	"	.balign 4096\n"
	/* The compatibility-mode user code, alone on its page (mapped at COMPAT_VA): SYSCALL (to CSTAR, on AMD; Intel
	 * raises #UD outside 64-bit mode) with number 4, whose handler returns with SYSRETL; then the CS, SS, flags
	 * and ECX that SYSRETL left, and SYSCALL number 5, whose handler goes back to the kernel side. */
	"	.code32\n"
	"	.globl compat_code, compat_after_first, compat_after_second\n"
	"compat_code:\n"
	"	pushfl\n"
	"	popl %esi\n"                 /* the flags SYSCALL must save in R11 */
	"	movl $4, %eax\n"
	"	syscall\n"
	"compat_after_first:\n"
	"	movl %ecx, %edi\n"           /* SYSRETL leaves ECX as it was */
	"	movl %cs, %ebx\n"            /* no instruction here changes the flags */
	"	movl %ss, %edx\n"
	"	pushfl\n"
	"	popl %esi\n"
	"	movl $5, %eax\n"
	"	syscall\n"
	"compat_after_second:\n"
	"	ud2\n"
	"	.balign 4096\n"
	"	.code64\n");

/* GDT: the library's four descriptors, then this guest's (flat, 4 GiB limit). */
static u64 gdt_sc[10] __attribute__((aligned(16))) = {
	0,
	0x00CF9A000000FFFFul, /* 0x08: 32-bit code */
	0x00CF92000000FFFFul, /* 0x10: data */
	0x00AF9A000000FFFFul, /* 0x18: 64-bit code, DPL 0 (KCODE) */
	0x00CF92000000FFFFul, /* 0x20: data, DPL 0 (KDATA) */
	0x00CFFA000000FFFFul, /* 0x28: 32-bit code, DPL 3 (SYSRET's compatibility-mode CS) */
	0x00CFF2000000FFFFul, /* 0x30: data, DPL 3 (UDATA) */
	0x00AFFA000000FFFFul, /* 0x38: 64-bit code, DPL 3 (UCODE) */
	0, 0,                 /* 0x40: the TSS (16 bytes, filled in below) */
};
/* 64-bit TSS (SDM vol. 3 8.7): RSP0 at offset 4. */
u8 tss[104] __attribute__((aligned(16)));

static u64 user_pdpt[512] __attribute__((aligned(4096)));
static u64 user_pd[512] __attribute__((aligned(4096)));
static u64 user_pt[512] __attribute__((aligned(4096)));
static u8 user_stack[4096] __attribute__((aligned(4096)));
static u64 compat_pt[512] __attribute__((aligned(4096)));
static u8 compat_stack[4096] __attribute__((aligned(4096)));
extern u64 pml4[512];

static void load_gdt_and_tss(void)
{
	u64 base = (u64)tss, limit = sizeof(tss) - 1;
	/* Available 64-bit TSS, present, DPL 0 (type 9, SDM vol. 3 8.2.3). */
	gdt_sc[TSS_SEL / 8] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89ul << 40) |
			      (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
	gdt_sc[TSS_SEL / 8 + 1] = base >> 32;
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) d = { sizeof(gdt_sc) - 1, (u64)gdt_sc };
	__asm__ volatile("lgdt %0" : : "m"(d) : "memory");
	__asm__ volatile("ltr %w0" : : "r"((u16)TSS_SEL) : "memory");
}

static void map_user_pages(void)
{
	user_pt[0] = (u64)user_code | PTE_P | PTE_U;
	user_pt[1] = (u64)user_stack | PTE_P | PTE_W | PTE_U;
	user_pd[0] = (u64)user_pt | PTE_P | PTE_W | PTE_U;
	user_pdpt[0] = (u64)user_pd | PTE_P | PTE_W | PTE_U;
	pml4[USER_VA >> 39] = (u64)user_pdpt | PTE_P | PTE_W | PTE_U;
	/* The compatibility-mode pages: U/S = 1 on the way down (the library's PML4[0] and PDPT entry for the
	 * second GiB; their other leaves stay supervisor) and a page table for the 2 MiB page at COMPAT_VA. */
	compat_pt[0] = (u64)compat_code | PTE_P | PTE_U;
	compat_pt[1] = (u64)compat_stack | PTE_P | PTE_W | PTE_U;
	pml4[0] |= PTE_U;
	u64 *pdpt = (u64 *)(pml4[0] & ~0xFFFul);
	pdpt[COMPAT_VA >> 30] |= PTE_U;
	u64 *pd = (u64 *)(pdpt[COMPAT_VA >> 30] & ~0xFFFul);
	pd[(COMPAT_VA >> 21) & 511] = (u64)compat_pt | PTE_P | PTE_W | PTE_U;
	u64 cr3;
	__asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
}

static u64 user_addr(const char *sym) { return USER_VA + (u64)(sym - user_code); }
static u64 compat_addr(const char *sym) { return COMPAT_VA + (u64)(sym - compat_code); }

/* A fault on the way to or in user mode: recorded, and the kernel side resumes at sc_leave. */
static void user_fault(struct irq_frame *f, u32 cpu)
{
	fault_rip = f->rip;
	fault_cs = f->cs;
	fault_error = f->error;
	fault_rcx = f->rcx;
	fault_r11 = f->r11;
	fault_rflags = f->rflags;
	fault_ss = f->ss;
	fault_rsp = f->rsp;
	sc_left_by = (u32)f->vector + 1;
	f->rip = (u64)sc_leave;
	f->cs = KCODE;
	f->ss = 0x10;
	f->rsp = sc_resume_rsp - 1024;
	f->rflags = RFLAGS_FIXED;
}

static u64 read_dr7(void)
{
	u64 v;
	__asm__ volatile("mov %%dr7, %0" : "=r"(v));
	return v;
}

static void check_user_round_trip(u32 left)
{
	const struct entry_record *first = &sc_rec[1], *second = &sc_rec[2];
	if (!check(left == 0, "syscall from cpl 3 runs the lstar handler at cpl 0",
		   "left by vector %u at rip %lx cs %lx error %lx (%u handler entries)", left - 1, fault_rip,
		   fault_cs, fault_error, sc_entries)) {
		printf("INFO: at the fault rcx %lx r11 %lx rflags %lx ss %lx rsp %lx\n", fault_rcx, fault_r11,
		       fault_rflags, fault_ss, fault_rsp);
		return;
	}
	check(first->cs == KCODE, "syscall loads cs from star bits 47-32", "cs %lx", first->cs);
	check(first->ss == KDATA, "syscall loads ss from star bits 47-32 + 8", "ss %lx", first->ss);
	check(first->rcx == user_addr(user_after_first), "syscall saves the next rip in rcx", "rcx %lx, expected %lx",
	      first->rcx, user_addr(user_after_first));
	check(first->r11 == USER_FLAGS && first->r8 == USER_FLAGS, "syscall saves rflags in r11",
	      "r11 %lx, the user code's flags %lx, expected %lx", first->r11, first->r8, USER_FLAGS);
	check(first->rflags == (USER_FLAGS & ~SFMASK), "syscall clears the rflags bits set in sfmask",
	      "rflags %lx, expected %lx", first->rflags, USER_FLAGS & ~SFMASK);
	check((u16)second->rbx == UCODE, "sysretq loads cs from star bits 63-48 + 16, rpl 3 [pvm-sysret]", "cs %lx", second->rbx);
	check((u16)second->rdx == UDATA, "sysretq loads ss from star bits 63-48 + 8, rpl 3 [pvm-sysret]", "ss %lx", second->rdx);
	check(second->r10 == user_addr(user_after_first), "sysretq resumes at rcx with rcx kept", "rcx %lx",
	      second->r10);
	check(second->rsi == USER_FLAGS, "sysretq loads rflags from r11", "rflags %lx, expected %lx", second->rsi,
	      USER_FLAGS);
	u64 fs_base = rdmsr(0xC0000100);
	check(fs_base == 0x12345000, "fs base written in a system call survives the next one", "fs base %lx",
	      fs_base);
	check(second->cs == KCODE && second->ss == KDATA && second->rcx == user_addr(user_after_second) &&
		      second->r11 == second->rsi,
	      "a second syscall after sysretq reaches lstar at cpl 0", "cs %lx ss %lx rcx %lx r11 %lx (flags %lx)",
	      second->cs, second->ss, second->rcx, second->r11, second->rsi);
}

/* SYSCALL from compatibility mode (CS 0x2B, L = 0) and SYSRETL back: on an AMD host, whose vendor irqvm's CPUID
 * shows, RIP = CSTAR, RCX = the next EIP, R11 = RFLAGS, CS and SS from STAR[47:32] as from 64-bit mode (AMD APM vol.
 * 3, SYSCALL; SDM vol. 2B, SYSCALL, which #UDs there on Intel). */
/* Intel: the compatibility-mode code's first SYSCALL (the 2 bytes before compat_after_first) raised #UD there,
 * with the user CS, and no handler ran. */
static bool compat_syscall_raised_ud(u32 left)
{
	return left == 6 + 1 && fault_rip == compat_addr(compat_after_first) - 2 && (fault_cs & 3) == 3 &&
	       !sc_cstar_seen[4];
}

static void check_compat_round_trip(u32 left)
{
	const struct entry_record *first = &sc_rec[4], *second = &sc_rec[5];
	if (intel) {
		check(compat_syscall_raised_ud(left), "syscall from compatibility mode raises ud at the instruction [intel]",
		      "left by vector %u at rip %lx cs %lx (%u handler entries, cstar %u)", left - 1, fault_rip, fault_cs,
		      sc_entries, sc_cstar_seen[4]);
		return;
	}
	if (!check(left == 0 && sc_cstar_seen[4], "syscall from compatibility mode runs the cstar handler at cpl 0 [amd]",
		   "left by vector %u at rip %lx cs %lx error %lx (%u handler entries, cstar %u)", left - 1, fault_rip,
		   fault_cs, fault_error, sc_entries, sc_cstar_seen[4])) {
		printf("INFO: at the fault rcx %lx r11 %lx rflags %lx ss %lx rsp %lx\n", fault_rcx, fault_r11,
		       fault_rflags, fault_ss, fault_rsp);
		return;
	}
	check(first->cs == KCODE, "compat syscall loads cs from star bits 47-32 [amd]", "cs %lx", first->cs);
	check(first->ss == KDATA, "compat syscall loads ss from star bits 47-32 + 8 [amd]", "ss %lx", first->ss);
	check(first->rcx == compat_addr(compat_after_first), "compat syscall saves the next eip in rcx [amd]",
	      "rcx %lx, expected %lx", first->rcx, compat_addr(compat_after_first));
	check(first->r11 == USER_FLAGS && (u32)first->rsi == USER_FLAGS, "compat syscall saves rflags in r11 [amd]",
	      "r11 %lx, the user code's flags %lx, expected %lx", first->r11, first->rsi, USER_FLAGS);
	check(first->rflags == (USER_FLAGS & ~SFMASK), "compat syscall clears the rflags bits set in sfmask [amd]",
	      "rflags %lx, expected %lx", first->rflags, USER_FLAGS & ~SFMASK);
	check((u16)second->rbx == UCODE32, "sysretl loads cs from star bits 63-48, rpl 3 [amd] [pvm-sysretl]", "cs %lx", second->rbx);
	check((u16)second->rdx == UDATA, "sysretl loads ss from star bits 63-48 + 8, rpl 3 [amd] [pvm-sysretl]", "ss %lx", second->rdx);
	check((u32)second->rdi == compat_addr(compat_after_first), "sysretl resumes at ecx with ecx kept [amd]", "ecx %lx",
	      second->rdi);
	check((u32)second->rsi == USER_FLAGS, "sysretl loads rflags from r11 [amd]", "rflags %lx, expected %lx",
	      second->rsi, USER_FLAGS);
	check(sc_cstar_seen[5] && second->cs == KCODE && second->ss == KDATA &&
		      second->rcx == compat_addr(compat_after_second) && second->r11 == (u32)second->rsi,
	      "a second compat syscall after sysretl reaches cstar at cpl 0 [amd] [pvm-sysretl]",
	      "cstar %u cs %lx ss %lx rcx %lx r11 %lx (flags %lx)", sc_cstar_seen[5], second->cs, second->ss,
	      second->rcx, second->r11, second->rsi);
}

/* System calls while an interrupt waits for IF: the kernel side sends itself an IPI with IF = 0 and enters CPL 3
 * with IF = 0 in its IRETQ frame, so irqvm's exact-boundaries stepper (user and split mode) single-steps the
 * way there, the IRETQ included, and the SYSCALL watch must still finish the host's half of each SYSCALL
 * (Linux met the two together: "segfault at <LSTAR> ... error 15" in init). The interrupt is taken once: at
 * the kernel side's STI, or, on this host, where CPL 3 runs with IF = 1 whatever the frame says
 * (docs/kvm-facts.md, "User mode's IF here"), in user mode. */
#define WAITING_VECTOR 0x61
static void check_syscall_while_interrupt_waits(void)
{
	memset(sc_rec, 0, sizeof(sc_rec));
	platform_init(false);
	cli();
	u32 taken = irq_count[0][WAITING_VECTOR];
	u64 flags = USER_FLAGS & ~RFLAGS_IF;
	apic_icr_write(0, APIC_SH_SELF | WAITING_VECTOR);
	u32 left = enter_user(USER_VA, USER_VA + 0x2000, flags, UCODE);
	u32 in_user = irq_count[0][WAITING_VECTOR] - taken;
	const struct entry_record *first = &sc_rec[1], *second = &sc_rec[2];
	if (check(left == 0, "a syscall while an interrupt waits runs the lstar handler at cpl 0",
		  "left by vector %u at rip %lx cs %lx error %lx rflags %lx (%u handler entries)", left - 1,
		  fault_rip, fault_cs, fault_error, fault_rflags, sc_entries)) {
		check(first->cs == KCODE && first->ss == KDATA && first->rcx == user_addr(user_after_first) &&
			      (first->r11 & ~RFLAGS_IF) == flags && first->rflags == (flags & ~SFMASK) &&
			      second->cs == KCODE && second->rcx == user_addr(user_after_second),
		      "syscalls while an interrupt waits load cs, ss, rcx and r11 and mask rflags",
		      "cs %lx ss %lx rcx %lx r11 %lx (flags %lx) rflags %lx; second cs %lx rcx %lx", first->cs,
		      first->ss, first->rcx, first->r11, flags, first->rflags, second->cs, second->rcx);
		check(first->r11 == flags && in_user == 0,
		      "iretq to cpl 3 with if = 0 keeps the interrupt waiting in user mode [pvm-user-if]",
		      "r11 %lx (flags %lx), interrupt taken %u times in user mode", first->r11, flags, in_user);
	}
	sti_nop_cli();
	u32 all = irq_count[0][WAITING_VECTOR] - taken;
	check(all == 1, "the interrupt waiting across the syscalls is taken once", "%u times (%u in user mode)",
	      all, in_user);
}

/* The same from compatibility mode: SYSCALL to CSTAR (which this host completes itself) with IF = 0 in the IRETQ
 * frame while an interrupt waits. Unlike 64-bit user code here, compatibility-mode code keeps IF = 0 (R11 shows it)
 * and the interrupt waits for the kernel side's STI; `user` and `split` mode end their stepping at the IRETQ to
 * CPL 3 (irqvm's backend::step), so it comes with their next interrupt-window kick, as in `kernel` mode
 * ([kvm-late-window]): the kernel side waits for it with IF = 1. */
static void check_compat_syscall_while_interrupt_waits(void)
{
	memset(sc_rec, 0, sizeof(sc_rec));
	memset((void *)sc_cstar_seen, 0, sizeof(sc_cstar_seen));
	cli();
	u32 taken = irq_count[0][WAITING_VECTOR];
	u64 flags = USER_FLAGS & ~RFLAGS_IF;
	apic_icr_write(0, APIC_SH_SELF | WAITING_VECTOR);
	u32 left = enter_user(COMPAT_VA, COMPAT_VA + 0x2000, flags, UCODE32);
	u32 in_user = irq_count[0][WAITING_VECTOR] - taken;
	const struct entry_record *first = &sc_rec[4];
	if (intel) {
		check(compat_syscall_raised_ud(left), "a compat syscall while an interrupt waits raises ud [intel]",
		      "left by vector %u at rip %lx cs %lx (%u handler entries, cstar %u)", left - 1, fault_rip, fault_cs,
		      sc_entries, sc_cstar_seen[4]);
	} else if (check(left == 0 && sc_cstar_seen[4], "a compat syscall while an interrupt waits runs the cstar handler at cpl 0 [amd]",
		  "left by vector %u at rip %lx cs %lx error %lx rflags %lx (%u handler entries, cstar %u)", left - 1,
		  fault_rip, fault_cs, fault_error, fault_rflags, sc_entries, sc_cstar_seen[4])) {
		check(first->cs == KCODE && first->ss == KDATA && first->rcx == compat_addr(compat_after_first) &&
			      (first->r11 & ~RFLAGS_IF) == flags && first->rflags == (flags & ~SFMASK),
		      "a compat syscall while an interrupt waits loads cs, ss, rcx and r11 and masks rflags [amd]",
		      "cs %lx ss %lx rcx %lx r11 %lx (flags %lx) rflags %lx", first->cs, first->ss, first->rcx,
		      first->r11, flags, first->rflags);
		check(first->r11 == flags && in_user == 0,
		      "iretq to compatibility mode with if = 0 keeps the interrupt waiting in user mode [amd]",
		      "r11 %lx (flags %lx), interrupt taken %u times in user mode", first->r11, flags, in_user);
	}
	sti();
	for (u32 i = 0; i < 100000000 && irq_count[0][WAITING_VECTOR] == taken; i++)
		__asm__ volatile("pause");
	cli();
	u32 all = irq_count[0][WAITING_VECTOR] - taken;
	check(all == 1, "the interrupt waiting across the compat syscalls is taken once", "%u times (%u in user mode)",
	      all, in_user);
}

void guest_main(void)
{
	u64 dr7_before = read_dr7();
	load_gdt_and_tss();
	map_user_pages();
	wrmsr(MSR_STAR, ((u64)SYSRET_BASE << 48) | ((u64)KCODE << 32));
	wrmsr(MSR_LSTAR, (u64)sc_entry);
	wrmsr(MSR_CSTAR, (u64)sc_cstar_entry);
	wrmsr(MSR_SFMASK, SFMASK);
	wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);
	irq_set_handler(6, user_fault);
	irq_set_handler(13, user_fault);
	irq_set_handler(14, user_fault);
	u32 vendor[4] = { 0 }, eax;
	cpuid(0, 0, &eax, &vendor[0], &vendor[2], &vendor[1]);
	intel = vendor[0] == 0x756E6547 && vendor[1] == 0x49656E69 && vendor[2] == 0x6C65746E; /* GenuineIntel */
	printf("INFO: user code at %lx (physical %lx), lstar %lx; compatibility-mode code at %lx (physical %lx), "
	       "cstar %lx; cpu vendor %s\n",
	       USER_VA, (u64)user_code, (u64)sc_entry, COMPAT_VA, (u64)compat_code, (u64)sc_cstar_entry,
	       (const char *)vendor);

	check_user_round_trip(enter_user(USER_VA, USER_VA + 0x2000, USER_FLAGS, UCODE));
	check_compat_round_trip(enter_user(COMPAT_VA, COMPAT_VA + 0x2000, USER_FLAGS, UCODE32));

	/* Page faults that are no system call reach the guest's handler once each, with their own frame. */
	u32 faults = irq_count[0][14];
	u32 left = enter_user(USER_VA + 0x5000, USER_VA + 0x2000, USER_FLAGS, UCODE);
	check(left == 15 && fault_rip == USER_VA + 0x5000 && (fault_cs & 3) == 3 && irq_count[0][14] == faults + 1,
	      "a user-mode page fault elsewhere is delivered once", "left by %u at rip %lx cs %lx, %u faults", left,
	      fault_rip, fault_cs, irq_count[0][14] - faults);
	u32 touched = touch(USER_VA + 0x400000);
	check(touched == 15 && fault_cs == KCODE && irq_count[0][14] == faults + 2,
	      "a kernel-mode page fault is delivered once", "left by %u, cs %lx, %u faults", touched, fault_cs,
	      irq_count[0][14] - faults - 1);

	check_syscall_while_interrupt_waits();
	check_compat_syscall_while_interrupt_waits();

	u32 entries = sc_entries;
	u32 again = jump_to_lstar();
	check(again == 0 && sc_entries == entries + 1 && sc_rec[3].cs == KCODE,
	      "a jump to lstar at cpl 0 runs the handler once", "left by %u, %u entries, cs %lx", again,
	      sc_entries - entries, sc_rec[3].cs);
	u64 dr7_after = read_dr7();
	check(dr7_after == dr7_before, "the guest's dr7 reads the same before and after", "%lx before, %lx after",
	      dr7_before, dr7_after);
}
