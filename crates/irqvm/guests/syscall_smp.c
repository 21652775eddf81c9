/* syscall_smp: system calls on every CPU at once, with FS and GS bases changed inside them the way Linux does
 * (SDM vol. 2B, SYSCALL, SYSRET, SWAPGS; vol. 3 5.8.8; vol. 4, IA32_FS_BASE, IA32_GS_BASE and
 * IA32_KERNEL_GS_BASE).
 *
 * Each CPU has its own TSS (RSP0 on its own stack) in its own GDT slot, its own user stack page, its own
 * slots in the user-mapped TLS pages (shared with the other CPUs' slots), and a per-CPU kernel area that
 * IA32_GS_BASE points at in the kernel and IA32_KERNEL_GS_BASE in user mode (Linux's per-CPU area). The GDT
 * has Linux's layout for SYSCALL/SYSRET: STAR[47:32] = 0x18 (kernel CS 0x18, SS 0x20) and STAR[63:48] = 0x23
 * (SYSRETQ to CS 0x33, SS 0x2B: what this host loads whatever STAR says, [pvm-sysret] in guests/README.md);
 * FMASK is Linux's. Every CPU, for a few thousand round trips bounded by time, with its LAPIC timer firing
 * every `tick_us` microseconds, an IPI to its neighbour every 8 round trips and a HLT every 64:
 * - enters CPL 3 with SWAPGS and IRETQ;
 * - the user code makes SYSCALL 1; the handler at LSTAR does Linux's entry (SWAPGS, the user RSP saved in and
 *   the kernel stack loaded from the per-CPU area through GS), records FS_BASE, GS_BASE and KERNEL_GS_BASE,
 *   and does what Linux 6.1's arch_prctl(ARCH_SET_FS) and (ARCH_SET_GS) do without FSGSBASE: null selector
 *   into FS, load_gs_index(0), WRMSR of a new per-CPU, per-iteration FS base and of a new user GS base into
 *   KERNEL_GS_BASE; it leaves with SWAPGS and SYSRETQ;
 * - the user code reads `%fs:0` and `%gs:0`, which must give the tags the kernel placed at those bases (every
 *   fourth round trip the page behind the new FS base is unmapped first, so that read takes a page fault,
 *   which maps it back in, as a new process's first TLS access does under Linux), and
 *   reads them again in a loop long enough for timer interrupts to arrive in user mode (each read must give
 *   the same), then makes SYSCALL 2, whose handler records the three MSRs and the user's reads and returns
 *   to the kernel side;
 * - a timer interrupt from user mode does Linux's SWAPGS in and out, checks the three MSRs, and on every
 *   other such tick switches away to a task with bases 0 and back as Linux's context switch does
 *   (load_seg_legacy() with X86_BUG_NULL_SEG: this host is an AMD one); the kernel side does the same
 *   every fourth round trip. No interrupt may arrive where the interrupted code has IF = 0.
 * The kernel side checks everything recorded against what it must be, and RDMSRs the three again.
 * On this host (kvm_pvm) irqvm finishes every one of these SYSCALLs with KVM_GET_SREGS/KVM_SET_SREGS
 * (emulate/syscall.rs): a 4-vCPU Linux here had processes whose FS base was wrong (docs/benchmarks.md, "the
 * segfault is open"); this is the multi-vCPU form of guests/syscall.c's FS-base check.
 * Command line: iters=N (the round trips per CPU, default 150; a CPU goes on past them until one tick has
 * interrupted its user mode), ms=N (a bound per CPU, default 15000: the run normally ends by the round trips;
 * the bound only ends a starved or hung one, which must still have made 20 of them), tick_us=N
 * (LAPIC timer period, default 500; 100 livelocks the guest in its ticks on a loaded host), verbose=1 (one
 * line per bad value, up to 20 per CPU). */
#include "usermode.h"


#define MSR_EFER 0xC0000080
#define MSR_STAR 0xC0000081
#define MSR_LSTAR 0xC0000082
#define MSR_SFMASK 0xC0000084
#define MSR_FS_BASE 0xC0000100
#define MSR_GS_BASE 0xC0000101
#define MSR_KERNEL_GS_BASE 0xC0000102
#define EFER_SCE 1ul
#define SFMASK 0x47700ul            /* Linux's: TF, DF, IF, IOPL, NT, AC */
#define USER_FLAGS 0x202ul          /* IF set: timer interrupts arrive in user mode on every host */

#define USER_VA 0x8000000000ul      /* PML4 slot 1: nothing else is mapped there */
#define PTE_P 1ul
#define PTE_W 2ul
#define PTE_U 4ul
/* User pages: PT index 0 the code, 16 + c CPU c's stack, 32.. the TLS pages (FS slots, then GS slots). */
#define STACK_PT 16
#define TLS_PT 32
#define TLS_SLOTS 64                /* per CPU; iteration i uses slot i % TLS_SLOTS */
#define TLS_PAGES (2 * TLS_SLOTS * MAX_CPUS * 8 / 4096)
#define GS_TLS_OFF (TLS_SLOTS * MAX_CPUS * 8)

#define V_TICK 0x40
#define V_IPI 0x41
#define USER_LOOPS 400              /* the user code's re-reads of %fs:0 and %gs:0 */

/* The per-CPU kernel area, at IA32_GS_BASE in the kernel (IA32_KERNEL_GS_BASE in user mode); the assembly
 * below uses the offsets. */
struct pcpu {
	u64 self;                   /* 0 */
	u64 user_rsp;               /* 8: saved at SYSCALL entry */
	u64 kstack;                 /* 16: the SYSCALL handler's stack */
	u64 resume_rsp;             /* 24: enter_user's frame, where SYSCALL 2 and faults go back to */
	u64 next_fs;                /* 32: the FS base SYSCALL 1 writes */
	u64 next_ugs;               /* 40: the user GS base SYSCALL 1 writes (into KERNEL_GS_BASE) */
	u64 u_fs, u_gs, u_bad, u_loops; /* 48..72: the user code's %fs:0, %gs:0, differing re-reads, loops left */
	u64 e1_fs, e1_gs, e1_kgs;   /* 80..96: the MSRs at SYSCALL 1's entry, after SWAPGS */
	u64 e2_fs, e2_gs, e2_kgs;   /* 104..120: at SYSCALL 2's entry, after SWAPGS */
	u64 tss;                    /* 128: this CPU's TSS */
	u64 entries1, entries2;     /* 136, 144 */
	u64 cur_fs, cur_ugs;        /* 152, 160: the user's FS and GS bases now (SYSCALL 1 updates them) */
	u64 pad[11];
} __attribute__((aligned(64)));
_Static_assert(sizeof(struct pcpu) == 256, "the assembly's offsets");
struct pcpu pcpu[MAX_CPUS];

extern char user_code[], user_code_end[], sc_entry[], sc_fault_leave[];
u32 enter_user(u64 rip, u64 rsp, u64 rflags);

__asm__(
	"	.text\n"
	/* enter_user(rip, rsp, rflags), GS_BASE = this CPU's area: saves the callee-saved registers, records
	 * where to come back to, points TSS.RSP0 and the SYSCALL stack below them, SWAPGS and IRETQ to CPL 3.
	 * Returns 0 through SYSCALL 2, or 1 through sc_fault_leave. */
	"	.globl enter_user\n"
	"enter_user:\n"
	"	pushq %rbp\n	pushq %rbx\n	pushq %r12\n	pushq %r13\n	pushq %r14\n	pushq %r15\n"
	"	cli\n"
	"	movq %rsp, %gs:24\n"
	"	leaq -256(%rsp), %rax\n"
	"	movq %rax, %gs:16\n"
	"	leaq -1024(%rsp), %rax\n"
	"	movq %gs:128, %rcx\n"
	"	movq %rax, 4(%rcx)\n"        /* TSS.RSP0 (SDM vol. 3 8.7) */
	"	pushq $0x2B\n"               /* SS */
	"	pushq %rsi\n"                /* RSP */
	"	pushq %rdx\n"                /* RFLAGS */
	"	pushq $0x33\n"               /* CS */
	"	pushq %rdi\n"                /* RIP */
	"	swapgs\n"
	"	iretq\n"
	"	.globl sc_fault_leave\n"
	"sc_fault_leave:\n"              /* a fault handler's way back: RSP = resume_rsp */
	"	movl $1, %eax\n"
	"	jmp 9f\n"
	/* The handler at LSTAR: Linux's entry_SYSCALL_64 shape. */
	"	.balign 16\n"
	"	.globl sc_entry\n"
	"sc_entry:\n"
	"	swapgs\n"
	"	movq %rsp, %gs:8\n"
	"	movq %gs:16, %rsp\n"
	"	pushq %rcx\n"
	"	pushq %r11\n"
	"	cmpq $1, %rax\n"
	"	je 1f\n"
	"	movq %rbx, %gs:48\n"         /* SYSCALL 2: the user code's reads */
	"	movq %rsi, %gs:56\n"
	"	movq %rdi, %gs:64\n"
	"	movq %r8, %gs:72\n"
	"1:	movq %rax, %r13\n"
	"	movl $0xC0000100, %ecx\n	rdmsr\n	shlq $32, %rdx\n	orq %rdx, %rax\n	movq %rax, %r9\n"
	"	movl $0xC0000101, %ecx\n	rdmsr\n	shlq $32, %rdx\n	orq %rdx, %rax\n	movq %rax, %r10\n"
	"	movl $0xC0000102, %ecx\n	rdmsr\n	shlq $32, %rdx\n	orq %rdx, %rax\n	movq %rax, %r12\n"
	"	cmpq $1, %r13\n"
	"	jne 2f\n"
	/* SYSCALL 1: record, write the new FS base and user GS base, back to the user code. */
	"	movq %r9, %gs:80\n	movq %r10, %gs:88\n	movq %r12, %gs:96\n"
	/* arch_prctl(ARCH_SET_FS) and (ARCH_SET_GS) in Linux 6.1 without FSGSBASE: loadsegment(fs, 0) and
	 * load_gs_index(0) (SWAPGS around the load) before the WRMSRs. */
	"	xorl %eax, %eax\n	movw %ax, %fs\n"
	"	swapgs\n	movw %ax, %gs\n	swapgs\n"
	"	movl $0xC0000100, %ecx\n	movq %gs:32, %rax\n	movq %rax, %rdx\n	shrq $32, %rdx\n	wrmsr\n"
	"	movl $0xC0000102, %ecx\n	movq %gs:40, %rax\n	movq %rax, %rdx\n	shrq $32, %rdx\n	wrmsr\n"
	"	movq %gs:32, %rax\n	movq %rax, %gs:152\n"
	"	movq %gs:40, %rax\n	movq %rax, %gs:160\n"
	"	incq %gs:136\n"
	"	popq %r11\n"
	"	popq %rcx\n"
	"	movq %gs:8, %rsp\n"
	"	swapgs\n"
	"	sysretq\n"
	/* SYSCALL 2: record, back to enter_user's caller with GS_BASE = this CPU's area. */
	"2:	movq %r9, %gs:104\n	movq %r10, %gs:112\n	movq %r12, %gs:120\n"
	"	incq %gs:144\n"
	"	movq %gs:24, %rsp\n"
	"	xorl %eax, %eax\n"
	"9:	popq %r15\n	popq %r14\n	popq %r13\n	popq %r12\n	popq %rbx\n	popq %rbp\n"
	"	ret\n"
	/* The user code, alone on its page (mapped at USER_VA), position independent. */
	"	.balign 4096\n"
	"	.globl user_code, user_code_end\n"
	"user_code:\n"
	"	movl $1, %eax\n"
	"	syscall\n"
	"	movq %fs:0, %rbx\n"
	"	movq %gs:0, %rsi\n"
	"	xorl %edi, %edi\n"
	"	movl $400, %r8d\n"           /* USER_LOOPS */
	"1:	movq %fs:0, %rax\n"
	"	cmpq %rax, %rbx\n"
	"	je 2f\n"
	"	incq %rdi\n"
	"2:	movq %gs:0, %rax\n"
	"	cmpq %rax, %rsi\n"
	"	je 3f\n"
	"	incq %rdi\n"
	"3:	pause\n"
	"	decl %r8d\n"
	"	jnz 1b\n"
	"	movl $2, %eax\n"
	"	syscall\n"
	"	ud2\n"
	"user_code_end:\n"
	"	.balign 4096\n");

static u64 user_pdpt[512] __attribute__((aligned(4096)));
static u64 user_pd[512] __attribute__((aligned(4096)));
static u64 user_pt[512] __attribute__((aligned(4096)));
static u8 user_stack[MAX_CPUS][4096] __attribute__((aligned(4096)));
/* The TLS pages: FS slot (c, s) at index s * MAX_CPUS + c, GS slots after them; neighbours' slots share pages. */
static volatile u64 tls[TLS_PAGES * 512] __attribute__((aligned(4096)));
extern u64 pml4[512];

static u64 fs_slot(u32 c, u64 i) { return (i % TLS_SLOTS) * MAX_CPUS + c; }
static u64 fs_va(u32 c, u64 i) { return USER_VA + TLS_PT * 4096ul + fs_slot(c, i) * 8; }
static u64 gs_va(u32 c, u64 i) { return fs_va(c, i) + GS_TLS_OFF; }
static u64 fs_tag(u32 c, u64 i) { return 0xF5F5000000000000ul | (u64)c << 40 | i; }
static u64 gs_tag(u32 c, u64 i) { return 0x6565000000000000ul | (u64)c << 40 | i; }

/* What each CPU found wrong: counts and the first case of each kind. */
enum bad_kind {
	BAD_FS_READ,        /* %fs:0 in user mode after SYSCALL 1 */
	BAD_GS_READ,        /* %gs:0 */
	BAD_USER_REREAD,    /* the re-reads in user mode differed */
	BAD_E1_FS,          /* FS_BASE at SYSCALL 1's entry: the one SYSCALL 1 wrote in the iteration before */
	BAD_E1_GS,          /* GS_BASE after SWAPGS at SYSCALL 1: this CPU's area */
	BAD_E1_KGS,         /* KERNEL_GS_BASE after SWAPGS at SYSCALL 1: the user GS base of the iteration before */
	BAD_E2_FS,          /* FS_BASE at SYSCALL 2: the one SYSCALL 1 wrote */
	BAD_E2_GS,
	BAD_E2_KGS,
	BAD_K_FS,           /* RDMSR on the kernel side after SYSCALL 2 */
	BAD_K_GS,
	BAD_K_KGS,
	BAD_T_FS,           /* FS_BASE at a timer interrupt from user mode: the user's */
	BAD_T_GS,           /* GS_BASE there after SWAPGS: this CPU's area */
	BAD_T_KGS,          /* KERNEL_GS_BASE there after SWAPGS: the user's GS base */
	BAD_KINDS
};
static const char *const bad_name[BAD_KINDS] = {
	"user %fs:0", "user %gs:0", "user re-reads", "fs_base at syscall 1", "gs_base at syscall 1",
	"kernel_gs_base at syscall 1", "fs_base at syscall 2", "gs_base at syscall 2", "kernel_gs_base at syscall 2",
	"fs_base after return", "gs_base after return", "kernel_gs_base after return",
	"fs_base at a tick from user mode", "gs_base at a tick from user mode",
	"kernel_gs_base at a tick from user mode",
};
struct first_bad {
	u64 iter, expected, seen;
};
struct cpu_stats {
	u64 iters, bad[BAD_KINDS];
	struct first_bad first[BAD_KINDS];
	u32 printed;
	u32 faulted;
	u64 fault_vector, fault_rip, fault_cs, fault_error, fault_cr2, fault_iter;
	volatile u32 user_ticks, ticks;
	u32 if_clear;                       /* interrupts taken where the interrupted code had IF = 0 */
	volatile u32 demand_faults;         /* user-mode page faults on a TLS page, mapped back in */
	u64 if_clear_rip, if_clear_rflags;
	u64 ms;
} __attribute__((aligned(64)));
static struct cpu_stats stats[MAX_CPUS];
static volatile u32 workers_done;
static u64 opt_iters, opt_ms, opt_tick_us, opt_verbose;

static u64 read_cr2(void)
{
	u64 v;
	__asm__ volatile("mov %%cr2, %0" : "=r"(v));
	return v;
}

/* A fault in user mode or in the SYSCALL handler: recorded, and the kernel side resumes at sc_fault_leave. */
static void user_fault(struct irq_frame *f, u32 unused)
{
	u32 c = cpu_by_apic();
	struct cpu_stats *s = &stats[c];
	s->faulted = 1;
	s->fault_vector = f->vector;
	s->fault_rip = f->rip;
	s->fault_cs = f->cs;
	s->fault_error = f->error;
	s->fault_cr2 = read_cr2();
	s->fault_iter = s->iters;
	f->rip = (u64)sc_fault_leave;
	f->cs = KCODE;
	f->ss = 0x10;
	f->rsp = pcpu[c].resume_rsp;
	f->rflags = 2;
}

static void note(struct cpu_stats *s, u32 c, enum bad_kind k, u64 iter, u64 expected, u64 seen);
static void expect_eq(struct cpu_stats *s, u32 c, enum bad_kind k, u64 iter, u64 expected, u64 seen);

/* A context switch away from the user's task and back, as Linux 6.1's load_seg_legacy() does it without
 * FSGSBASE on a CPU with X86_BUG_NULL_SEG (this host is an AMD one): the other task has FS and GS base 0,
 * so FS and GS get __USER_DS and then the null selector (which loads base 0), GS through load_gs_index()
 * (SWAPGS around the load: it is the user's GS that changes); coming back writes the task's bases with
 * WRMSR to FS_BASE and KERNEL_GS_BASE. Runs with GS_BASE = this CPU's area. */
static void switch_away_and_back(u64 fs, u64 ugs)
{
	__asm__ volatile("movw %w0, %%fs\n\tmovw %w1, %%fs" : : "r"(UDATA), "r"(0) : "memory");
	__asm__ volatile("swapgs\n\tmovw %w0, %%gs\n\tmovw %w1, %%gs\n\tswapgs" : : "r"(UDATA), "r"(0) : "memory");
	wrmsr(MSR_FS_BASE, fs);
	wrmsr(MSR_KERNEL_GS_BASE, ugs);
}

/* The tick. From user mode it does what Linux's entry does (SWAPGS in and out), checks the three MSRs, and
 * on every other such tick switches away and back (a preemption in user mode). */
/* An interrupt the interrupted code could not take (IF = 0 in its frame: the SYSCALL handler, which FMASK
 * runs with IF = 0, or a CLI section). A VMM that finishes a SYSCALL must not deliver one at LSTAR. */
static void check_if(struct irq_frame *f, u32 cpu)
{
	struct cpu_stats *s = &stats[cpu];
	if (f->rflags & 0x200)
		return;
	if (s->if_clear++ == 0) {
		s->if_clear_rip = f->rip;
		s->if_clear_rflags = f->rflags;
	}
}

/* A page fault. On a TLS page whose PTE a CPU cleared (a page not yet faulted in, as the TLS block of a
 * process that just ran exec is): maps it back and returns to the faulting read, as Linux's demand paging
 * does. Anything else ends the round trip. */
static void page_fault(struct irq_frame *f, u32 cpu)
{
	u64 cr2 = read_cr2(), tls_va = USER_VA + TLS_PT * 4096ul;
	if ((f->cs & 3) == 3 && cr2 >= tls_va && cr2 < tls_va + TLS_PAGES * 4096ul) {
		u64 page = (cr2 - tls_va) / 4096;
		WRITE_ONCE(user_pt[TLS_PT + page], ((u64)tls + 4096ul * page) | PTE_P | PTE_U);
		__asm__ volatile("invlpg (%0)" : : "r"(cr2) : "memory");
		stats[cpu_by_apic()].demand_faults++;
		return;
	}
	user_fault(f, cpu);
}

static void tick_handler(struct irq_frame *f, u32 cpu)
{
	struct cpu_stats *s = &stats[cpu];
	check_if(f, cpu);
	s->ticks++;
	if (f->cs & 3) {
		struct pcpu *p = &pcpu[cpu];
		s->user_ticks++;
		__asm__ volatile("swapgs" ::: "memory");
		u64 fs = rdmsr(MSR_FS_BASE), gs = rdmsr(MSR_GS_BASE), kgs = rdmsr(MSR_KERNEL_GS_BASE);
		expect_eq(s, cpu, BAD_T_FS, s->iters, p->cur_fs, fs);
		expect_eq(s, cpu, BAD_T_GS, s->iters, (u64)p, gs);
		expect_eq(s, cpu, BAD_T_KGS, s->iters, p->cur_ugs, kgs);
		if (s->user_ticks % 2 == 0)
			switch_away_and_back(p->cur_fs, p->cur_ugs);
		__asm__ volatile("swapgs" ::: "memory");
	}
	apic_eoi();
}

static void ipi_handler(struct irq_frame *f, u32 cpu)
{
	check_if(f, cpu);
	ring_received(cpu);
	apic_eoi();
}

static void note(struct cpu_stats *s, u32 c, enum bad_kind k, u64 iter, u64 expected, u64 seen)
{
	if (s->bad[k]++ == 0)
		s->first[k] = (struct first_bad){ iter, expected, seen };
	if (opt_verbose && s->printed < 20) {
		s->printed++;
		printf("INFO: cpu %u iteration %lu: %s expected %lx, seen %lx\n", c, iter, bad_name[k], expected,
		       seen);
	}
}

static void expect_eq(struct cpu_stats *s, u32 c, enum bad_kind k, u64 iter, u64 expected, u64 seen)
{
	if (expected != seen)
		note(s, c, k, iter, expected, seen);
}

static void map_user_pages(void)
{
	user_pt[0] = (u64)user_code | PTE_P | PTE_U;
	for (u32 c = 0; c < MAX_CPUS; c++)
		user_pt[STACK_PT + c] = (u64)user_stack[c] | PTE_P | PTE_W | PTE_U;
	for (u32 p = 0; p < TLS_PAGES; p++)
		user_pt[TLS_PT + p] = ((u64)tls + 4096ul * p) | PTE_P | PTE_U;
	user_pd[0] = (u64)user_pt | PTE_P | PTE_W | PTE_U;
	user_pdpt[0] = (u64)user_pd | PTE_P | PTE_W | PTE_U;
	pml4[USER_VA >> 39] = (u64)user_pdpt | PTE_P | PTE_W | PTE_U;
	u64 cr3;
	__asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
}

/* Each CPU: its GDT slot and TSS, the SYSCALL MSRs (per CPU, as Linux's syscall_init), its kernel GS base,
 * its timer; then the iterations. */
static void worker(void *unused)
{
	u32 c = this_cpu();
	struct cpu_stats *s = &stats[c];
	struct pcpu *p = &pcpu[c];
	cli();
	load_user_gdt(c);
	wrmsr(MSR_STAR, ((u64)SYSRET_BASE << 48) | ((u64)KCODE << 32));
	wrmsr(MSR_LSTAR, (u64)sc_entry);
	wrmsr(MSR_SFMASK, SFMASK);
	wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);
	p->self = (u64)p;
	p->tss = (u64)user_tss[c];
	u64 kgs = (u64)p;
	/* Kernel side: GS_BASE = the per-CPU area, KERNEL_GS_BASE = the user's GS base (0 to start with). */
	__asm__ volatile("movw %w0, %%fs\n\tmovw %w0, %%gs" : : "r"(0) : "memory"); /* Linux's user selectors */
	wrmsr(MSR_GS_BASE, kgs);
	wrmsr(MSR_KERNEL_GS_BASE, 0);
	wrmsr(MSR_FS_BASE, 0);
	u64 prev_fs = 0, prev_ugs = 0;
	start_periodic_tick(V_TICK, opt_tick_us);
	u64 t0 = rdtsc(), deadline = t0 + ms_to_tsc(opt_ms);
	u64 user_rsp = USER_VA + (STACK_PT + c + 1) * 4096ul;
	for (u64 i = 0; (i < opt_iters || s->user_ticks == 0) && rdtsc() < deadline; i++) {
		u64 fs = fs_va(c, i), ugs = gs_va(c, i);
		tls[fs_slot(c, i)] = fs_tag(c, i);
		tls[GS_TLS_OFF / 8 + fs_slot(c, i)] = gs_tag(c, i);
		p->next_fs = fs;
		p->next_ugs = ugs;
		p->cur_fs = prev_fs;
		p->cur_ugs = prev_ugs;
		/* Every fourth round trip the page behind the new FS base is not mapped: the user's first read
		 * through FS faults (the other CPUs' reads of their slots there may too). */
		if (i % 4 == 1) {
			WRITE_ONCE(user_pt[TLS_PT + fs_slot(c, i) * 8 / 4096], 0);
			__asm__ volatile("invlpg (%0)" : : "r"(fs) : "memory");
		}
		p->u_fs = p->u_gs = p->u_bad = p->u_loops = ~0ul;
		p->e1_fs = p->e1_gs = p->e1_kgs = p->e2_fs = p->e2_gs = p->e2_kgs = ~0ul;
		u32 left = enter_user(USER_VA, user_rsp, USER_FLAGS);
		if (left) {
			/* Back through the fault handler: GS_BASE may be the user's. */
			wrmsr(MSR_GS_BASE, kgs);
			sti();
			break;
		}
		u64 k_fs = rdmsr(MSR_FS_BASE), k_gs = rdmsr(MSR_GS_BASE), k_kgs = rdmsr(MSR_KERNEL_GS_BASE);
		sti();
		s->iters = i + 1;
		expect_eq(s, c, BAD_FS_READ, i, fs_tag(c, i), p->u_fs);
		expect_eq(s, c, BAD_GS_READ, i, gs_tag(c, i), p->u_gs);
		expect_eq(s, c, BAD_USER_REREAD, i, 0, p->u_bad);
		expect_eq(s, c, BAD_E1_FS, i, prev_fs, p->e1_fs);
		expect_eq(s, c, BAD_E1_GS, i, kgs, p->e1_gs);
		expect_eq(s, c, BAD_E1_KGS, i, prev_ugs, p->e1_kgs);
		expect_eq(s, c, BAD_E2_FS, i, fs, p->e2_fs);
		expect_eq(s, c, BAD_E2_GS, i, kgs, p->e2_gs);
		expect_eq(s, c, BAD_E2_KGS, i, ugs, p->e2_kgs);
		expect_eq(s, c, BAD_K_FS, i, fs, k_fs);
		expect_eq(s, c, BAD_K_GS, i, kgs, k_gs);
		expect_eq(s, c, BAD_K_KGS, i, ugs, k_kgs);
		/* What the next iteration's SYSCALL 1 must find: the values as they are now (a bad one counted
		 * once, not again in every later iteration). */
		prev_fs = k_fs;
		prev_ugs = k_kgs;
		/* Every fourth round trip a context switch on the kernel side too (a schedule() in a system call). */
		if (i % 4 == 2)
			switch_away_and_back(prev_fs, prev_ugs);
		if (i % 8 == 0)
			ring_ping(c, V_IPI);
		/* Now and then wait for the next tick: the vCPU thread sleeps and wakes (maybe on another core). */
		if (i % 64 == 63) {
			cli();
			sti_hlt();
		}
	}
	stop_tick();
	s->ms = (rdtsc() - t0) / tsc_khz();
	atomic_inc(&workers_done);
}

void guest_main(void)
{
	opt_iters = cmdline_u64("iters", 150);
	opt_ms = cmdline_u64("ms", 15000);
	opt_tick_us = cmdline_u64("tick_us", 500);
	opt_verbose = cmdline_u64("verbose", 0);
	platform_init(false);
	irq_set_handler(6, user_fault);
	irq_set_handler(13, user_fault);
	irq_set_handler(14, page_fault);
	irq_set_handler(V_TICK, tick_handler);
	irq_set_handler(V_IPI, ipi_handler);
	map_user_pages();
	check(smp_start_all() == ncpus, "all cpus online", "not all APs came up");
	printf("INFO: %u cpus, %lu round trips each (more until a tick in user mode), bound %lu ms, timer every %lu us\n",
	       ncpus, opt_iters, opt_ms,
	       opt_tick_us);
	bool started = true;
	for (u32 c = 1; c < ncpus; c++)
		started &= smp_call_async(c, worker, NULL);
	worker(NULL);
	bool all_done = wait_eq(&workers_done, ncpus, opt_ms + WAIT_MS);
	for (u32 c = 1; c < ncpus; c++)
		smp_wait(c, WAIT_MS);
	check(started && all_done, "the system call loop ran on every cpu", "started %d, %u of %u cpus done",
	      started, workers_done, ncpus);

	u64 total_iters = 0, bad[BAD_KINDS] = { 0 }, faulted = 0, if_clear = 0, demand_faults = 0, page_faults = 0, min_iters = ~0ul, min_user_ticks = ~0ul;
	for (u32 c = 0; c < ncpus; c++) {
		struct cpu_stats *s = &stats[c];
		printf("INFO: cpu %u: %lu iterations in %lu ms, %lu syscall entries, %u ticks (%u in user mode), "
		       "%u ipis sent, %u received\n",
		       c, s->iters, s->ms, pcpu[c].entries1 + pcpu[c].entries2, s->ticks, s->user_ticks,
		       ring_sent[c], ring_got[c]);
		printf("INFO: cpu %u: %u tls page faults mapped in\n", c, s->demand_faults);
		demand_faults += s->demand_faults;
		page_faults += irq_count[c][14];
		if (s->faulted)
			printf("INFO: cpu %u: fault %lu at iteration %lu: rip %lx cs %lx error %lx cr2 %lx\n", c,
			       s->fault_vector, s->fault_iter, s->fault_rip, s->fault_cs, s->fault_error,
			       s->fault_cr2);
		if (s->if_clear)
			printf("INFO: cpu %u: %u interrupts taken with IF = 0, the first at rip %lx (rflags %lx)\n", c,
			       s->if_clear, s->if_clear_rip, s->if_clear_rflags);
		if_clear += s->if_clear;
		for (u32 k = 0; k < BAD_KINDS; k++) {
			bad[k] += s->bad[k];
			if (s->bad[k])
				printf("INFO: cpu %u: %s wrong %lu times, first at iteration %lu: expected %lx, "
				       "seen %lx\n",
				       c, bad_name[k], s->bad[k], s->first[k].iter, s->first[k].expected,
				       s->first[k].seen);
		}
		total_iters += s->iters;
		faulted += s->faulted;
		min_iters = s->iters < min_iters ? s->iters : min_iters;
		min_user_ticks = s->user_ticks < min_user_ticks ? s->user_ticks : min_user_ticks;
	}
	printf("INFO: %lu round trips (SYSCALL 1 and 2 each) in all\n", total_iters);
	/* tests/common/mod.rs reads this: every page fault is a hit of irqvm's breakpoint on this host. */
	printf("INFO: %lu page faults in all\n", page_faults);
	check(demand_faults > 0 && demand_faults == page_faults,
	      "user reads through fs fault the unmapped tls pages in, and nothing else faults",
	      "%lu tls page faults of %lu page faults", demand_faults, page_faults);
	check(faulted == 0, "no fault in user mode or the syscall handler", "%lu cpus faulted", faulted);
	check(min_iters >= 20, "every cpu made at least 20 round trips", "fewest %lu of %lu in %lu ms", min_iters,
	      opt_iters, opt_ms);
	check(bad[BAD_FS_READ] == 0, "user mode reads the fs base the first syscall wrote", "%lu wrong",
	      bad[BAD_FS_READ]);
	check(bad[BAD_GS_READ] == 0, "user mode reads the gs base the first syscall wrote", "%lu wrong",
	      bad[BAD_GS_READ]);
	check(bad[BAD_USER_REREAD] == 0, "fs and gs reads in user mode do not change across interrupts",
	      "%lu iterations with differing reads", bad[BAD_USER_REREAD]);
	check(bad[BAD_E1_FS] + bad[BAD_E2_FS] + bad[BAD_K_FS] == 0, "fs base msr keeps the value a syscall wrote",
	      "%lu wrong at syscall 1, %lu at syscall 2, %lu after", bad[BAD_E1_FS], bad[BAD_E2_FS], bad[BAD_K_FS]);
	check(bad[BAD_E1_GS] + bad[BAD_E2_GS] + bad[BAD_K_GS] == 0, "gs base msr after swapgs is the cpu's kernel area",
	      "%lu wrong at syscall 1, %lu at syscall 2, %lu after", bad[BAD_E1_GS], bad[BAD_E2_GS], bad[BAD_K_GS]);
	check(bad[BAD_E1_KGS] + bad[BAD_E2_KGS] + bad[BAD_K_KGS] == 0,
	      "kernel gs base msr after swapgs holds the user gs base",
	      "%lu wrong at syscall 1, %lu at syscall 2, %lu after", bad[BAD_E1_KGS], bad[BAD_E2_KGS],
	      bad[BAD_K_KGS]);
	check(bad[BAD_T_FS] + bad[BAD_T_GS] + bad[BAD_T_KGS] == 0,
	      "timer interrupts from user mode see the user's fs base and gs bases",
	      "%lu wrong fs_base, %lu gs_base, %lu kernel_gs_base", bad[BAD_T_FS], bad[BAD_T_GS], bad[BAD_T_KGS]);
	check(if_clear == 0, "no interrupt is taken where the interrupted code has if = 0", "%lu taken", if_clear);
	check(min_user_ticks > 0, "timer interrupts arrived in user mode on every cpu", "fewest %lu",
	      min_user_ticks);
	if (ncpus > 1)
		check(wait_until(ring_all_landed, NULL, WAIT_MS), "every ipi between the cpus arrived",
		      "sent and received differ");
	else
		skip("every ipi between the cpus arrived", "only 1 CPU");
}
